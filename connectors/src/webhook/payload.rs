//! What the `webhook` sink sends: the body of an anomaly event (an Alertmanager webhook
//! payload by default, or a template), its idempotency key, and the HMAC-SHA256 signature.

use std::collections::BTreeMap;

use ring::{digest, hmac};
use serde::Serialize;
use tidewatch_api::template::{
    EVENT_FIELDS, Escape, Template, TemplateError, alert_status, top_feature, write_event_field,
};
use tidewatch_api::time::format_rfc3339;
use tidewatch_api::{AnomalyEvent, AnomalyState};

/// Alertmanager's `endsAt` of an alert that has not ended.
const NOT_ENDED: &str = "0001-01-01T00:00:00Z";

/// The fields a `template` can use: every [`EVENT_FIELDS`] entry, then these.
pub const EXTRA_FIELDS: &[&str] = &["idempotency_key", "fingerprint", "pipeline"];

/// The fields of a webhook template, [`EVENT_FIELDS`] followed by [`EXTRA_FIELDS`].
pub fn template_fields() -> Vec<&'static str> {
    EVENT_FIELDS.iter().chain(EXTRA_FIELDS).copied().collect()
}

/// SHA-256 over the parts, each followed by a 0 byte, as 32 hex digits (128 bits).
fn digest_of(parts: &[&[u8]]) -> String {
    let mut context = digest::Context::new(&digest::SHA256);
    for part in parts {
        context.update(part);
        context.update(&[0]);
    }
    hex::encode(&context.finish().as_ref()[..16])
}

/// The idempotency key of an event: the same for every delivery attempt and for a replay of
/// the same event after a restart (it is a hash of what identifies the event, not a counter),
/// different for the open and the close of one anomaly.
pub fn idempotency_key(pipeline: &str, component: &str, event: &AnomalyEvent) -> String {
    digest_of(&[
        pipeline.as_bytes(),
        component.as_bytes(),
        event.device.name().as_bytes(),
        event.state.name().as_bytes(),
        &event.started_ms.to_be_bytes(),
        &event.time_ms.to_be_bytes(),
    ])
}

/// The fingerprint of the alert an event belongs to: equal for its open and close events
/// (Alertmanager's `fingerprint` identifies an alert across its notifications).
pub fn fingerprint(pipeline: &str, component: &str, event: &AnomalyEvent) -> String {
    digest_of(&[
        pipeline.as_bytes(),
        component.as_bytes(),
        event.device.name().as_bytes(),
        &event.started_ms.to_be_bytes(),
    ])[..16]
        .to_owned()
}

/// The signature header value of a body sent at `timestamp` (s since the epoch):
/// `sha256=` and the hex HMAC-SHA256, keyed with the secret, of `"<timestamp>.<body>"`.
///
/// Signing the timestamp with the body lets a receiver reject replays of an old request.
///
/// ```
/// use tidewatch_connectors::webhook::{sign, verify};
///
/// let header = sign(b"s3cret", 1_700_000_000, b"{}");
/// assert!(header.starts_with("sha256="));
/// assert!(verify(b"s3cret", "1700000000", b"{}", &header));
/// assert!(!verify(b"other", "1700000000", b"{}", &header));
/// ```
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut context = hmac::Context::with_key(&key);
    context.update(timestamp.to_string().as_bytes());
    context.update(b".");
    context.update(body);
    format!("sha256={}", hex::encode(context.sign().as_ref()))
}

/// Checks a signature header (`sha256=<hex>`) against the timestamp header and the body, in
/// constant time. What a receiver written in Rust does; docs/reference shows it in Python.
pub fn verify(secret: &[u8], timestamp: &str, body: &[u8], header: &str) -> bool {
    let Some(hex_mac) = header.trim().strip_prefix("sha256=") else { return false };
    let mut mac = [0_u8; 32];
    if hex::decode_to_slice(hex_mac, &mut mac).is_err() {
        return false;
    }
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut message = Vec::with_capacity(timestamp.len() + 1 + body.len());
    message.extend_from_slice(timestamp.as_bytes());
    message.push(b'.');
    message.extend_from_slice(body);
    hmac::verify(&key, &message, &mac).is_ok()
}

/// How the sink turns an event into a body.
#[derive(Clone, Debug)]
pub(crate) enum Body {
    /// Alertmanager's webhook payload (version 4) with one alert.
    Alertmanager {
        /// `alertname` label.
        alertname: String,
        /// `severity` label.
        severity: String,
        /// Extra static labels.
        labels: BTreeMap<String, String>,
    },
    /// A template over [`template_fields`], values JSON-escaped.
    Template(Template),
}

/// Identity of the sending component, for keys and payloads.
#[derive(Clone, Debug)]
pub(crate) struct Origin {
    pub(crate) pipeline: String,
    pub(crate) component: String,
}

impl Body {
    /// The template body of `text`, checked against [`template_fields`].
    pub(crate) fn template(text: &str) -> Result<Body, TemplateError> {
        Template::parse(text, &template_fields()).map(Body::Template)
    }

    /// The body of `event`.
    pub(crate) fn render(&self, origin: &Origin, event: &AnomalyEvent, key: &str) -> Vec<u8> {
        match self {
            Body::Alertmanager { alertname, severity, labels } => {
                alertmanager(origin, event, alertname, severity, labels)
            }
            Body::Template(template) => {
                let mut out = String::new();
                template.render(&mut out, Escape::Json, |index, out| {
                    match index.checked_sub(EVENT_FIELDS.len()) {
                        None => write_event_field(event, index, out),
                        Some(0) => out.push_str(key),
                        Some(1) => {
                            out.push_str(&fingerprint(&origin.pipeline, &origin.component, event))
                        }
                        Some(_) => out.push_str(&origin.pipeline),
                    }
                });
                out.into_bytes()
            }
        }
    }
}

/// Alertmanager's webhook payload (version 4), in its field order.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Notification<'a> {
    version: &'static str,
    group_key: String,
    truncated_alerts: u32,
    status: &'static str,
    receiver: &'a str,
    group_labels: GroupLabels<'a>,
    common_labels: &'a BTreeMap<&'a str, &'a str>,
    common_annotations: &'a Annotations<'a>,
    #[serde(rename = "externalURL")]
    external_url: &'static str,
    alerts: [Alert<'a>; 1],
}

/// The labels the alerts of a notification are grouped by.
#[derive(Debug, Serialize)]
struct GroupLabels<'a> {
    alertname: &'a str,
    device: &'a str,
}

/// The annotations of an alert.
#[derive(Debug, Serialize)]
struct Annotations<'a> {
    summary: String,
    description: String,
    score: String,
    peak_score: String,
    threshold: &'a str,
    top_feature: &'a str,
    model_version: &'a str,
}

/// One alert of a notification.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Alert<'a> {
    status: &'static str,
    labels: &'a BTreeMap<&'a str, &'a str>,
    annotations: &'a Annotations<'a>,
    starts_at: String,
    ends_at: String,
    #[serde(rename = "generatorURL")]
    generator_url: &'static str,
    fingerprint: String,
}

/// Alertmanager's webhook payload (version 4) for one event: one alert, firing for an open
/// event, resolved (with `endsAt`) for a close event. Receivers written for Alertmanager
/// (PagerDuty bridges, chat relays, runbooks automation) take it as it is.
fn alertmanager(
    origin: &Origin,
    event: &AnomalyEvent,
    alertname: &str,
    severity: &str,
    extra: &BTreeMap<String, String>,
) -> Vec<u8> {
    let device = event.device.name();
    let mut labels: BTreeMap<&str, &str> =
        extra.iter().map(|(name, value)| (name.as_str(), value.as_str())).collect();
    labels.insert("alertname", alertname);
    labels.insert("device", &device);
    labels.insert("pipeline", &origin.pipeline);
    labels.insert("detector", &event.detector);
    labels.insert("severity", severity);
    let threshold = event.threshold.map(|threshold| threshold.to_string()).unwrap_or_default();
    let top = top_feature(event).unwrap_or_default();
    let summary = match event.state {
        AnomalyState::Open => format!("Anomaly on device {device} (score {})", event.score),
        AnomalyState::Close => format!("Anomaly on device {device} ended"),
    };
    let annotations = Annotations {
        summary,
        description: format!(
            "{} reports an anomaly on {device} since {}: score {}, peak {}, threshold {}{}.",
            origin.component,
            format_rfc3339(event.started_ms),
            event.score,
            event.peak_score,
            if threshold.is_empty() { "none" } else { &threshold },
            if top.is_empty() { String::new() } else { format!(", mostly {top}") },
        ),
        score: event.score.to_string(),
        peak_score: event.peak_score.to_string(),
        threshold: &threshold,
        top_feature: top,
        model_version: &event.version,
    };
    let status = alert_status(event.state);
    let ends_at = match event.state {
        AnomalyState::Open => NOT_ENDED.to_owned(),
        AnomalyState::Close => format_rfc3339(event.time_ms),
    };
    let notification = Notification {
        version: "4",
        group_key: format!("{{}}/{{}}:{{alertname=\"{alertname}\", device=\"{device}\"}}"),
        truncated_alerts: 0,
        status,
        receiver: &origin.component,
        group_labels: GroupLabels { alertname, device: &device },
        common_labels: &labels,
        common_annotations: &annotations,
        external_url: "",
        alerts: [Alert {
            status,
            labels: &labels,
            annotations: &annotations,
            starts_at: format_rfc3339(event.started_ms),
            ends_at,
            generator_url: "",
            fingerprint: fingerprint(&origin.pipeline, &origin.component, event),
        }],
    };
    serde_json::to_vec(&notification).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::{Value, json};
    use tidewatch_api::{DeviceId, Schema};

    use super::*;

    pub(crate) fn event(device: &str, state: AnomalyState, time_ms: i64) -> AnomalyEvent {
        AnomalyEvent {
            device: DeviceId::intern(device),
            state,
            time_ms,
            started_ms: 1_700_000_000_000,
            score: 3.5,
            peak_score: 4.25,
            threshold: Some(1.5),
            detector: Arc::from("ae"),
            version: Arc::from("7"),
            label: 0,
            columns: Arc::new(Schema::new(["flow", "pressure"])),
            values: vec![0.9, 0.2],
            labels: Default::default(),
        }
    }

    fn origin() -> Origin {
        Origin { pipeline: "plant".into(), component: "hook".into() }
    }

    #[test]
    fn alertmanager_payload_has_the_v4_shape() {
        let body = Body::Alertmanager {
            alertname: "TidewatchAnomaly".into(),
            severity: "critical".into(),
            labels: BTreeMap::from([("site".to_owned(), "north".to_owned())]),
        };
        let open = event("pump-1", AnomalyState::Open, 1_700_000_000_000);
        let close = event("pump-1", AnomalyState::Close, 1_700_000_060_000);
        let parse = |event: &AnomalyEvent| -> Value {
            serde_json::from_slice(&body.render(&origin(), event, "k")).expect("JSON")
        };
        let (firing, resolved) = (parse(&open), parse(&close));
        assert_eq!(firing["version"], "4");
        assert_eq!(firing["status"], "firing");
        let alert = &firing["alerts"][0];
        assert_eq!(alert["labels"]["alertname"], "TidewatchAnomaly");
        assert_eq!(alert["labels"]["device"], "pump-1");
        assert_eq!(alert["labels"]["severity"], "critical");
        assert_eq!(alert["labels"]["site"], "north");
        assert_eq!(alert["labels"]["pipeline"], "plant");
        assert_eq!(alert["annotations"]["top_feature"], "flow");
        assert_eq!(alert["startsAt"], "2023-11-14T22:13:20.000Z");
        assert_eq!(alert["endsAt"], NOT_ENDED);
        assert_eq!(resolved["status"], "resolved");
        assert_eq!(resolved["alerts"][0]["endsAt"], "2023-11-14T22:14:20.000Z");
        // One alert across its notifications.
        assert_eq!(alert["fingerprint"], resolved["alerts"][0]["fingerprint"]);
        assert_eq!(firing["groupKey"], resolved["groupKey"]);
    }

    #[test]
    fn keys_are_stable_and_distinct() {
        let open = event("pump-1", AnomalyState::Open, 1_700_000_000_000);
        let close = event("pump-1", AnomalyState::Close, 1_700_000_060_000);
        let other = event("pump-2", AnomalyState::Open, 1_700_000_000_000);
        let key = |event: &AnomalyEvent| idempotency_key("plant", "hook", event);
        assert_eq!(key(&open), key(&open.clone()));
        assert_eq!(key(&open).len(), 32);
        assert_ne!(key(&open), key(&close));
        assert_ne!(key(&open), key(&other));
        assert_ne!(key(&open), idempotency_key("plant", "other-hook", &open));
        // Keys must not change between versions (receivers store them): this vector is
        // sha256 of the NUL-terminated parts, computed with Python's hashlib.
        assert_eq!(key(&open), "05a2789f4b54a9ab92fdb3d415fa06c4");
    }

    #[test]
    fn signatures_verify_and_reject_tampering() {
        let header = sign(b"secret", 1_700_000_000, b"{\"a\":1}");
        // RFC 4231-style check against an independent computation of the same construction.
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"secret");
        let expected = hex::encode(hmac::sign(&key, b"1700000000.{\"a\":1}").as_ref());
        assert_eq!(header, format!("sha256={expected}"));
        assert!(verify(b"secret", "1700000000", b"{\"a\":1}", &header));
        assert!(!verify(b"secret", "1700000001", b"{\"a\":1}", &header));
        assert!(!verify(b"secret", "1700000000", b"{\"a\":2}", &header));
        assert!(!verify(b"secret", "1700000000", b"{\"a\":1}", "sha256=zz"));
        assert!(!verify(b"secret", "1700000000", b"{\"a\":1}", &header.replace("sha256=", "")));
    }

    #[test]
    fn templates_render_event_and_extra_fields() {
        let body = Body::template(
            "{\"device\": \"{device}\", \"state\": \"{state}\", \"key\": \"{idempotency_key}\", \
             \"pipeline\": \"{pipeline}\", \"score\": {score}}",
        )
        .expect("valid template");
        let rendered = body.render(&origin(), &event("p\"1", AnomalyState::Open, 0), "abc");
        let value: Value = serde_json::from_slice(&rendered).expect("JSON");
        assert_eq!(
            value,
            json!({"device": "p\"1", "state": "open", "key": "abc", "pipeline": "plant", "score": 3.5})
        );
        assert!(Body::template("{nope}").is_err());
    }
}
