//! The `webhook` sink: POSTs anomaly open/close events to an HTTP(S) receiver.
//!
//! - **Body**: Alertmanager's webhook payload (version 4, one alert per request) by default,
//!   so receivers written for Alertmanager take it as it is; or a `template`.
//! - **At least once**: every event carries an `Idempotency-Key` header, a hash of what
//!   identifies the event (the same on every retry and on a replay after a restart); a
//!   receiver that remembers the keys it processed gets each event exactly once.
//! - **Retries**: 5xx, 408, 425, 429, timeouts and network errors are retried with exponential
//!   backoff and jitter (`Retry-After` in seconds is honoured), up to `max_retries`; other
//!   answers are final. An event that is not delivered lands in the dead-letter file with the
//!   reason, the attempts and the last error, so nothing is lost silently.
//! - **Signature**: with `secret_env`, an `X-Tidewatch-Timestamp` header and an
//!   `X-Tidewatch-Signature: sha256=<hex>` header, the HMAC-SHA256 of `"<timestamp>.<body>"`
//!   ([`sign`], [`verify`]).
//! - **Cooldown and dedupe**: per device, an anomaly opening within `cooldown_ms` (event time)
//!   of the last one notified is not sent, nor is its close; an event whose key was already
//!   sent is not sent again.
//! - **Never blocks detection**: delivery runs on its own thread; past `queue_capacity`
//!   queued events, new ones go straight to the dead-letter file.
//!
//! The workers of a process share one queue, one network thread and one set of metrics per
//! component (`tidewatch_webhook_*`, label `component_id`).

mod delivery;
mod payload;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::Uri;
use hyper::header::{HeaderName, HeaderValue};
use serde::Deserialize;
use tidewatch_api::template::{JSON_TEMPLATE_HINT, check_renders_json, sample_event};
use tidewatch_api::{
    AnomalyEvent, AnomalyState, Batch, ComponentContext, ComponentError, ConfigError, DeviceId,
    EventTime, Kind, MovedOption, Sink, SinkFactory, ValidateContext,
};

use self::delivery::{DeadLetters, Dispatcher, Job, RequestSettings, WebhookMetrics};
use self::payload::{Body, Origin};
pub use self::payload::{
    EXTRA_FIELDS, fingerprint, idempotency_key, sign, template_fields, verify,
};
use crate::shared::{Registered, per_component};
use crate::tls::{TLS_MOVED_OPTIONS, TlsConfig};

fn default_content_type() -> String {
    "application/json".to_owned()
}
fn default_alertname() -> String {
    "TidewatchAnomaly".to_owned()
}
fn default_severity() -> String {
    "warning".to_owned()
}
fn default_signature_header() -> String {
    "X-Tidewatch-Signature".to_owned()
}
fn default_timeout_ms() -> u64 {
    5_000
}
fn default_connect_timeout_ms() -> u64 {
    2_000
}
fn default_max_retries() -> u32 {
    8
}
fn default_backoff_initial_ms() -> u64 {
    500
}
fn default_backoff_max_ms() -> u64 {
    30_000
}
fn default_concurrency() -> usize {
    4
}
fn default_queue_capacity() -> usize {
    10_000
}
fn default_dedupe_keys() -> usize {
    100_000
}
fn default_dead_letter_path() -> String {
    "webhook-dead-letters.jsonl".to_owned()
}
fn default_drain_timeout_ms() -> u64 {
    10_000
}

/// Options of the `webhook` sink (docs/reference/sources-and-sinks.md#webhook).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSinkConfig {
    /// Receiver URL, `http://` or `https://`.
    pub url: String,
    /// Body template over [`template_fields`] (values JSON-escaped); default: Alertmanager's
    /// webhook payload.
    #[serde(default)]
    pub template: Option<String>,
    /// `Content-Type` of the requests.
    #[serde(default = "default_content_type")]
    pub content_type: String,
    /// Extra request headers, e.g. `Authorization = "Bearer ${HOOK_TOKEN}"`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// `alertname` label of the default payload.
    #[serde(default = "default_alertname")]
    pub alertname: String,
    /// `severity` label of the default payload.
    #[serde(default = "default_severity")]
    pub severity: String,
    /// Extra static labels of the default payload (e.g. `site`, `team`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Name of the environment variable holding the HMAC secret; none: requests are unsigned.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// Header carrying the signature.
    #[serde(default = "default_signature_header")]
    pub signature_header: String,
    /// Longest wait for a receiver's answer (connect included), ms.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Longest wait for a TCP connection, ms.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Retries of a failed request (5xx, 408, 425, 429, timeout, network) before the event is
    /// dead-lettered; 0 sends once.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Delay before the first retry, ms; doubles per retry, with jitter.
    #[serde(default = "default_backoff_initial_ms")]
    pub backoff_initial_ms: u64,
    /// Longest delay between retries, ms.
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// Requests in flight at once (one per lane; a device's events share a lane, in order).
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Most events queued for delivery; beyond it new events are dead-lettered.
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
    /// Per device: an anomaly opening within this time (event time) after the last one sent
    /// is not sent, nor its close, ms; 0 sends every anomaly.
    #[serde(default)]
    pub cooldown_ms: u64,
    /// How many recent idempotency keys are remembered to drop duplicates.
    #[serde(default = "default_dedupe_keys")]
    pub dedupe_keys: usize,
    /// JSON-lines file of the events that were not delivered (appended; relative to the
    /// pipeline file's folder).
    #[serde(default = "default_dead_letter_path")]
    pub dead_letter_path: String,
    /// At the end of a run, how long to wait for queued events before dead-lettering them, ms.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    /// The TLS files of an `https://` receiver: its CA, a client certificate and key.
    #[serde(default)]
    pub tls: TlsConfig,
}

impl WebhookSinkConfig {
    /// A config posting to `url`, every other option at its default.
    pub fn new(url: impl Into<String>) -> WebhookSinkConfig {
        WebhookSinkConfig {
            url: url.into(),
            template: None,
            content_type: default_content_type(),
            headers: BTreeMap::new(),
            alertname: default_alertname(),
            severity: default_severity(),
            labels: BTreeMap::new(),
            secret_env: None,
            signature_header: default_signature_header(),
            timeout_ms: default_timeout_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
            max_retries: default_max_retries(),
            backoff_initial_ms: default_backoff_initial_ms(),
            backoff_max_ms: default_backoff_max_ms(),
            concurrency: default_concurrency(),
            queue_capacity: default_queue_capacity(),
            cooldown_ms: 0,
            dedupe_keys: default_dedupe_keys(),
            dead_letter_path: default_dead_letter_path(),
            drain_timeout_ms: default_drain_timeout_ms(),
            tls: TlsConfig::default(),
        }
    }

    fn uri(&self) -> Result<Uri, ConfigError> {
        let uri: Uri = self.url.parse().map_err(|error| {
            ConfigError::at_field("url", format!("invalid URL {:?}: {error}", self.url))
        })?;
        match uri.scheme_str() {
            Some("http" | "https") if uri.host().is_some() => Ok(uri),
            _ => Err(ConfigError::at_field(
                "url",
                format!("{:?} is not an http:// or https:// URL with a host", self.url),
            )
            .with_hint("for example \"https://ops.example.com/hooks/tidewatch\"")),
        }
    }

    fn body(&self) -> Result<Body, ConfigError> {
        match &self.template {
            Some(text) => Body::template(text)
                .map_err(|error| ConfigError::at_field("template", error.to_string())),
            None => Ok(Body::Alertmanager {
                alertname: self.alertname.clone(),
                severity: self.severity.clone(),
                labels: self.labels.clone(),
            }),
        }
    }

    fn headers(&self) -> Result<Vec<(HeaderName, HeaderValue)>, ConfigError> {
        self.headers
            .iter()
            .map(|(name, value)| {
                let header = HeaderName::try_from(name.as_str()).map_err(|_| {
                    ConfigError::at_field("headers", format!("{name:?} is not a valid header name"))
                })?;
                let value = HeaderValue::try_from(value.as_str()).map_err(|_| {
                    ConfigError::at_field(
                        "headers",
                        format!("the value of {name:?} is not a valid header value"),
                    )
                })?;
                Ok((header, value))
            })
            .collect()
    }

    /// Checks the options beyond their types.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let uri = self.uri()?;
        let body = self.body()?;
        if self.content_type.contains("json") {
            // A template of a JSON body must render JSON: try it on a sample event.
            let origin = Origin { pipeline: "p".into(), component: "c".into() };
            let rendered = body.render(&origin, &sample_event(), "key");
            if let Err(reason) = check_renders_json(&rendered) {
                return Err(ConfigError::at_field("template", reason).with_hint(JSON_TEMPLATE_HINT));
            }
        }
        self.headers()?;
        HeaderValue::try_from(self.content_type.as_str()).map_err(|_| {
            ConfigError::at_field("content_type", "content_type is not a valid header value")
        })?;
        HeaderName::try_from(self.signature_header.as_str()).map_err(|_| {
            ConfigError::at_field("signature_header", "signature_header is not a valid header name")
        })?;
        if self.secret_env.as_deref().is_some_and(|name| name.trim().is_empty()) {
            return Err(ConfigError::at_field("secret_env", "secret_env names no variable")
                .with_hint(
                    "the NAME of the environment variable, e.g. \"TIDEWATCH_WEBHOOK_SECRET\"",
                ));
        }
        for (field, value) in [
            ("timeout_ms", self.timeout_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("backoff_initial_ms", self.backoff_initial_ms),
            ("queue_capacity", self.queue_capacity as u64),
            ("dedupe_keys", self.dedupe_keys as u64),
        ] {
            if value == 0 {
                return Err(ConfigError::at_field(field, format!("{field} must be at least 1")));
            }
        }
        if self.backoff_max_ms < self.backoff_initial_ms {
            return Err(ConfigError::at_field(
                "backoff_max_ms",
                "backoff_max_ms must be at least backoff_initial_ms",
            ));
        }
        if !(1..=256).contains(&self.concurrency) {
            return Err(ConfigError::at_field("concurrency", "concurrency must be 1 to 256"));
        }
        if self.dead_letter_path.trim().is_empty() {
            return Err(ConfigError::at_field(
                "dead_letter_path",
                "dead_letter_path must name a file",
            ));
        }
        self.tls.validate(uri.scheme_str() == Some("https"), "use an https:// url")
    }

    /// The request settings, with the secret read from the environment and the TLS files.
    fn request_settings(&self, ctx: &ComponentContext) -> Result<RequestSettings, ComponentError> {
        let config_error = |error: ConfigError| ComponentError::Config(error.message);
        let secret = match &self.secret_env {
            Some(name) => match std::env::var(name) {
                Ok(secret) if !secret.is_empty() => Some(secret.into_bytes()),
                _ => {
                    return Err(ComponentError::Config(format!(
                        "secret_env: the environment variable {name} that holds the webhook \
                         secret is not set or empty"
                    )));
                }
            },
            None => None,
        };
        let url = self.uri().map_err(config_error)?;
        let tls = if url.scheme_str() == Some("https") {
            self.tls.resolved(|path| ctx.resolve_path(path)).client_config()?
        } else {
            // Never used for http:// (no handshake), but the connector wants one.
            Arc::new(
                rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(|error| ComponentError::Internal(format!("TLS versions: {error}")))?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
            )
        };
        Ok(RequestSettings {
            url,
            content_type: HeaderValue::try_from(self.content_type.as_str())
                .map_err(|_| ComponentError::Config("content_type is not a valid header".into()))?,
            headers: self.headers().map_err(config_error)?,
            secret,
            signature_header: HeaderName::try_from(self.signature_header.as_str()).map_err(
                |_| ComponentError::Config("signature_header is not a valid header".into()),
            )?,
            timeout: Duration::from_millis(self.timeout_ms),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            max_retries: self.max_retries,
            backoff_initial_ms: self.backoff_initial_ms,
            backoff_max_ms: self.backoff_max_ms,
            concurrency: self.concurrency,
            queue_capacity: self.queue_capacity,
            tls,
        })
    }
}

/// Makes `webhook` sinks.
#[derive(Clone, Copy, Debug, Default)]
pub struct WebhookSinkFactory;

impl SinkFactory for WebhookSinkFactory {
    type Config = WebhookSinkConfig;

    fn accepts(&self, _config: &WebhookSinkConfig) -> Vec<Kind> {
        vec![Kind::Events]
    }

    fn moved_options(&self) -> &'static [MovedOption] {
        TLS_MOVED_OPTIONS
    }

    fn validate(
        &self,
        config: &WebhookSinkConfig,
        _ctx: &ValidateContext,
    ) -> Result<(), ConfigError> {
        config.validate()
    }

    fn build(
        &self,
        config: &WebhookSinkConfig,
        ctx: &ComponentContext,
    ) -> Result<Box<dyn Sink>, ComponentError> {
        Ok(Box::new(WebhookSink::for_context(config, ctx)?))
    }
}

/// Per-device cooldown and the recent keys, deciding which events are sent.
#[derive(Debug, Default)]
struct Gate {
    /// Per device: event time of the last open event sent, and whether the anomaly open now
    /// was suppressed (then its close is too).
    devices: HashMap<DeviceId, (Option<EventTime>, bool)>,
    keys: HashSet<String>,
    order: VecDeque<String>,
}

impl Gate {
    /// `Ok` to send `event` (its key is remembered), or why not.
    fn admit(
        &mut self,
        key: &str,
        event: &AnomalyEvent,
        cooldown_ms: u64,
        capacity: usize,
    ) -> Result<(), &'static str> {
        if self.keys.contains(key) {
            return Err("duplicate");
        }
        let (last_open, suppressed) = self.devices.entry(event.device).or_insert((None, false));
        match event.state {
            AnomalyState::Open => {
                let cooling = last_open.is_some_and(|last| {
                    event.time_ms >= last && ((event.time_ms - last) as u64) < cooldown_ms
                });
                *suppressed = cooling;
                if cooling {
                    return Err("cooldown");
                }
                *last_open = Some(event.time_ms);
            }
            AnomalyState::Close if *suppressed => {
                *suppressed = false;
                return Err("cooldown");
            }
            AnomalyState::Close => {}
        }
        self.keys.insert(key.to_owned());
        self.order.push_back(key.to_owned());
        while self.order.len() > capacity {
            if let Some(old) = self.order.pop_front() {
                self.keys.remove(&old);
            }
        }
        Ok(())
    }
}

/// The state of one webhook component, shared by its workers' instances.
#[derive(Debug)]
struct Shared {
    config: WebhookSinkConfig,
    origin: Origin,
    body: Body,
    metrics: WebhookMetrics,
    gate: Mutex<Gate>,
    dispatcher: Dispatcher,
    _registered: Option<Registered>,
}

impl Shared {
    fn new(
        config: &WebhookSinkConfig,
        ctx: &ComponentContext,
        registry: Option<&prometheus::Registry>,
    ) -> Result<Shared, ComponentError> {
        config.validate().map_err(|error| {
            ComponentError::Config(format!(
                "{}: {}",
                error.field.as_deref().unwrap_or("webhook"),
                error.message
            ))
        })?;
        let settings = config.request_settings(ctx)?;
        let metrics = WebhookMetrics::new(&ctx.component_id)?;
        let registered = match registry {
            Some(registry) => {
                Some(Registered::all(registry, metrics.collectors()).map_err(|error| {
                    ComponentError::Config(format!(
                        "cannot register the metrics of webhook sink {:?}: {error}",
                        ctx.component_id
                    ))
                })?)
            }
            None => None,
        };
        let dead = DeadLetters::open(
            ctx.process_shared(),
            ctx.resolve_path(&config.dead_letter_path),
            &ctx.component_id,
            &config.url,
            metrics.clone(),
        )?;
        let body = config.body().map_err(|error| ComponentError::Config(error.message))?;
        let dispatcher = Dispatcher::start(settings, metrics.clone(), Arc::new(dead))?;
        Ok(Shared {
            config: config.clone(),
            origin: Origin {
                pipeline: ctx.pipeline.name.to_string(),
                component: ctx.component_id.to_string(),
            },
            body,
            metrics,
            gate: Mutex::new(Gate::default()),
            dispatcher,
            _registered: registered,
        })
    }

    fn send(&self, event: &AnomalyEvent) {
        let key = idempotency_key(&self.origin.pipeline, &self.origin.component, event);
        let admitted = self.gate.lock().unwrap_or_else(PoisonError::into_inner).admit(
            &key,
            event,
            self.config.cooldown_ms,
            self.config.dedupe_keys,
        );
        if let Err(reason) = admitted {
            self.metrics.suppressed.with_label_values(&[reason]).inc();
            return;
        }
        let body = self.body.render(&self.origin, event, &key);
        self.dispatcher.enqueue(Job {
            event: event.clone(),
            key,
            body: Bytes::from(body),
            queued_at: Instant::now(),
        });
    }
}

/// One worker's handle on a `webhook` sink component.
#[derive(Debug)]
pub struct WebhookSink {
    shared: Arc<Shared>,
}

impl WebhookSink {
    /// The sink of a worker: the workers of a process share the queue, the network thread and
    /// the metrics (in the engine's registry) of the component.
    pub fn for_context(
        config: &WebhookSinkConfig,
        ctx: &ComponentContext,
    ) -> Result<WebhookSink, ComponentError> {
        let shared = per_component(ctx, |metrics| {
            Shared::new(config, ctx, metrics.map(|metrics| metrics.registry()))
        })?;
        Ok(WebhookSink { shared })
    }
}

impl Sink for WebhookSink {
    fn write_batch(&mut self, batch: Batch) -> Result<(), ComponentError> {
        if let Batch::Events(events) = &batch {
            for event in events {
                self.shared.send(event);
            }
        }
        Ok(())
    }

    fn close(&mut self) -> Result<(), ComponentError> {
        let left = self
            .shared
            .dispatcher
            .drain(Duration::from_millis(self.shared.config.drain_timeout_ms));
        if left > 0 {
            tracing::warn!(
                component = %self.shared.origin.component,
                left,
                "webhook events still queued at the end of drain_timeout_ms go to the dead-letter file"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tidewatch_api::{ConfigValue, Schema};

    use super::*;

    fn config(text: &str) -> WebhookSinkConfig {
        ConfigValue::parse(text).expect("toml").deserialize().expect("config")
    }

    fn event(
        device: &str,
        state: AnomalyState,
        time_ms: EventTime,
        started_ms: EventTime,
    ) -> AnomalyEvent {
        AnomalyEvent {
            device: DeviceId::intern(device),
            state,
            time_ms,
            started_ms,
            score: 2.0,
            peak_score: 2.0,
            threshold: Some(1.0),
            detector: Arc::from("d"),
            version: Arc::from("1"),
            label: 0,
            columns: Arc::new(Schema::new(["a"])),
            values: vec![1.0],
        }
    }

    #[test]
    fn options_are_checked() {
        let base = "url = \"https://hooks.example.com/a\"\n";
        assert_eq!(config(base).validate(), Ok(()));
        for (extra, field) in [
            ("", "url"),
            ("template = \"{nope}\"", "template"),
            ("template = '{\"device\": \"{device}\"'", "template"),
            ("timeout_ms = 0", "timeout_ms"),
            ("backoff_initial_ms = 10\nbackoff_max_ms = 5", "backoff_max_ms"),
            ("concurrency = 0", "concurrency"),
            ("queue_capacity = 0", "queue_capacity"),
            ("secret_env = \" \"", "secret_env"),
            ("headers = { \"bad header\" = \"x\" }", "headers"),
            ("signature_header = \"a b\"", "signature_header"),
            ("tls.client_cert_file = \"c.pem\"", "tls.client_key_file"),
        ] {
            let text = if extra.is_empty() {
                "url = \"ftp://x/\"".to_owned()
            } else {
                format!("{base}{extra}")
            };
            let error = config(&text).validate().expect_err(extra);
            assert_eq!(error.field.as_deref(), Some(field), "{extra}: {}", error.message);
        }
        let error = config("url = \"http://h/\"\n[tls]\nca_file = \"ca.pem\"")
            .validate()
            .expect_err("ca over http");
        assert_eq!(error.field.as_deref(), Some("tls.ca_file"));
        assert!(
            ConfigValue::parse("url = \"http://h\"\nretries = 3")
                .expect("toml")
                .deserialize::<WebhookSinkConfig>()
                .is_err()
        );
    }

    #[test]
    fn cooldown_suppresses_reopen_and_its_close() {
        let mut gate = Gate::default();
        let mut admit = |e: &AnomalyEvent| {
            let key = idempotency_key("p", "c", e);
            gate.admit(&key, e, 60_000, 100)
        };
        assert_eq!(admit(&event("d1", AnomalyState::Open, 1_000, 1_000)), Ok(()));
        assert_eq!(admit(&event("d1", AnomalyState::Close, 5_000, 1_000)), Ok(()));
        // Reopens 30 s after the last open: within the cooldown.
        assert_eq!(admit(&event("d1", AnomalyState::Open, 31_000, 31_000)), Err("cooldown"));
        assert_eq!(admit(&event("d1", AnomalyState::Close, 35_000, 31_000)), Err("cooldown"));
        // Another device is independent.
        assert_eq!(admit(&event("d2", AnomalyState::Open, 32_000, 32_000)), Ok(()));
        // After the cooldown.
        assert_eq!(admit(&event("d1", AnomalyState::Open, 61_000, 61_000)), Ok(()));
        // A replayed event is a duplicate.
        assert_eq!(admit(&event("d1", AnomalyState::Open, 61_000, 61_000)), Err("duplicate"));
    }

    #[test]
    fn dedupe_remembers_a_bounded_number_of_keys() {
        let mut gate = Gate::default();
        for time in 0..10 {
            let e = event("d", AnomalyState::Close, time, 0);
            assert_eq!(gate.admit(&format!("k{time}"), &e, 0, 3), Ok(()));
        }
        assert_eq!(gate.keys.len(), 3);
        let e = event("d", AnomalyState::Close, 99, 0);
        assert_eq!(gate.admit("k9", &e, 0, 3), Err("duplicate"));
        assert_eq!(gate.admit("k0", &e, 0, 3), Ok(()));
    }

    #[test]
    fn a_missing_secret_is_a_build_error() {
        let mut config = WebhookSinkConfig::new("http://127.0.0.1:9/");
        config.secret_env = Some("TIDEWATCH_TEST_SECRET_THAT_IS_NOT_SET".to_owned());
        let dir = tempfile::tempdir().expect("temp dir");
        config.dead_letter_path = dir.path().join("dead.jsonl").display().to_string();
        let ctx = ComponentContext::for_test("hook", "webhook");
        let Err(error) = WebhookSink::for_context(&config, &ctx) else {
            panic!("built without its secret")
        };
        assert!(error.to_string().contains("TIDEWATCH_TEST_SECRET_THAT_IS_NOT_SET"), "{error}");
    }
}
