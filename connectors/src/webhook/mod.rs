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
//!
//! **Checkpoints.** Each worker's instance snapshots what it is responsible for in the shared
//! state: the events it queued that are not delivered or dead-lettered yet (queued or in a
//! request: the key and the event), and the cooldown and dedupe entries it last updated (per
//! device the time of the last open sent and whether the open anomaly was suppressed; the
//! recent idempotency keys, oldest first). So N instances sharing a queue store each event
//! once. A restore merges every snapshot into the shared cooldown and dedupe state, and the
//! instance of worker `w % workers` (`w` the instance that took the snapshot) queues its
//! events again, with their idempotency keys, skipping a key already queued. Their bodies are
//! rendered with the current options (a changed `template` applies); past `queue_capacity`
//! they go to the dead-letter file as usual; `dedupe_keys` keeps the newest keys. An event
//! delivered after the checkpoint and before a crash is sent again with the same key.

mod delivery;
mod payload;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use hyper::Uri;
use hyper::header::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use tidewatch_api::template::{JSON_TEMPLATE_HINT, check_renders_json, sample_event};
use tidewatch_api::{
    AnomalyEvent, AnomalyState, Batch, ComponentContext, ComponentError, ConfigError, DeviceId,
    EventTime, Kind, MovedOption, Schema, Secret, Sink, SinkFactory, ValidateContext,
};

use self::delivery::{DeadLetters, Dispatcher, Job, Queued, RequestSettings, WebhookMetrics};
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
    /// Their values are never shown (`Secret`): they often carry tokens.
    pub headers: BTreeMap<String, Secret>,
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
                let mut value = HeaderValue::try_from(value.expose()).map_err(|_| {
                    ConfigError::at_field(
                        "headers",
                        format!("the value of {name:?} is not a valid header value"),
                    )
                })?;
                value.set_sensitive(true);
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
                Ok(secret) if !secret.is_empty() => Some(Secret::from(secret)),
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
///
/// Every entry names the worker whose instance last updated it (its checkpoints hold it).
#[derive(Debug, Default)]
struct Gate {
    devices: HashMap<DeviceId, Cooldown>,
    /// The recent keys and the worker that admitted each.
    keys: HashMap<String, usize>,
    /// The recent keys, oldest first.
    order: VecDeque<String>,
}

/// The cooldown state of one device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Cooldown {
    /// Event time of the last open event sent.
    last_open: Option<EventTime>,
    /// The anomaly open now was suppressed (then its close is too).
    suppressed: bool,
    /// The worker whose instance last updated it.
    worker: usize,
}

impl Gate {
    /// `Ok` to send `event` (its key is remembered), or why not; `worker` is the instance
    /// deciding.
    fn admit(
        &mut self,
        key: &str,
        event: &AnomalyEvent,
        cooldown_ms: u64,
        capacity: usize,
        worker: usize,
    ) -> Result<(), &'static str> {
        if self.keys.contains_key(key) {
            return Err("duplicate");
        }
        let device = self.devices.entry(event.device).or_default();
        device.worker = worker;
        match event.state {
            AnomalyState::Open => {
                let cooling = device.last_open.is_some_and(|last| {
                    event.time_ms >= last && ((event.time_ms - last) as u64) < cooldown_ms
                });
                device.suppressed = cooling;
                if cooling {
                    return Err("cooldown");
                }
                device.last_open = Some(event.time_ms);
            }
            AnomalyState::Close if device.suppressed => {
                device.suppressed = false;
                return Err("cooldown");
            }
            AnomalyState::Close => {}
        }
        self.remember(key, worker, capacity);
        Ok(())
    }

    /// Remembers `key` (admitted by `worker`) unless it is known, forgetting the oldest keys
    /// past `capacity`.
    fn remember(&mut self, key: &str, worker: usize, capacity: usize) {
        if self.keys.contains_key(key) {
            return;
        }
        self.keys.insert(key.to_owned(), worker);
        self.order.push_back(key.to_owned());
        while self.order.len() > capacity {
            if let Some(old) = self.order.pop_front() {
                self.keys.remove(&old);
            }
        }
    }

    /// The devices (by name) and keys (oldest first) the instance of `worker` holds.
    fn snapshot(&self, worker: usize) -> (Vec<SnapshotDevice>, Vec<String>) {
        let mut devices: Vec<SnapshotDevice> = self
            .devices
            .iter()
            .filter(|(_, cooldown)| cooldown.worker == worker)
            .map(|(device, cooldown)| SnapshotDevice {
                device: *device,
                last_open_ms: cooldown.last_open,
                suppressed: cooldown.suppressed,
            })
            .collect();
        devices.sort_by_cached_key(|device| device.device.name());
        let keys = self
            .order
            .iter()
            .filter(|key| self.keys.get(key.as_str()) == Some(&worker))
            .cloned()
            .collect();
        (devices, keys)
    }

    /// Merges a snapshot's devices and keys; new entries belong to `owner`. Merging the same
    /// snapshot again changes nothing: the latest open wins, a suppression stays.
    fn merge(
        &mut self,
        devices: &[SnapshotDevice],
        keys: &[String],
        owner: usize,
        capacity: usize,
    ) {
        for restored in devices {
            let device = self.devices.entry(restored.device).or_insert(Cooldown {
                last_open: None,
                suppressed: false,
                worker: owner,
            });
            device.last_open = device.last_open.max(restored.last_open_ms);
            device.suppressed |= restored.suppressed;
        }
        for key in keys {
            self.remember(key, owner, capacity);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Checkpoint state
// ---------------------------------------------------------------------------------------------

/// What one instance checkpoints (JSON).
#[derive(Debug, Serialize, Deserialize)]
struct Snapshot {
    /// The worker of the instance that took it.
    worker: usize,
    /// Its events queued or in flight, oldest first.
    queued: Vec<SnapshotJob>,
    /// The cooldown state of its devices.
    devices: Vec<SnapshotDevice>,
    /// The idempotency keys it admitted, oldest first.
    keys: Vec<String>,
}

/// An event waiting for delivery.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotJob {
    key: String,
    event: SnapshotEvent,
}

/// The cooldown state of a device.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotDevice {
    device: DeviceId,
    last_open_ms: Option<EventTime>,
    suppressed: bool,
}

/// An [`AnomalyEvent`] with its numbers as `f32::to_bits` (JSON has no NaN).
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotEvent {
    device: DeviceId,
    state: AnomalyState,
    time_ms: EventTime,
    started_ms: EventTime,
    score: u32,
    peak_score: u32,
    threshold: Option<u32>,
    detector: String,
    version: String,
    label: u8,
    columns: Schema,
    values: Vec<u32>,
}

impl SnapshotEvent {
    fn of(event: &AnomalyEvent) -> SnapshotEvent {
        SnapshotEvent {
            device: event.device,
            state: event.state,
            time_ms: event.time_ms,
            started_ms: event.started_ms,
            score: event.score.to_bits(),
            peak_score: event.peak_score.to_bits(),
            threshold: event.threshold.map(f32::to_bits),
            detector: event.detector.to_string(),
            version: event.version.to_string(),
            label: event.label,
            columns: Schema::clone(&event.columns),
            values: event.values.iter().map(|value| value.to_bits()).collect(),
        }
    }

    fn into_event(self) -> AnomalyEvent {
        AnomalyEvent {
            device: self.device,
            state: self.state,
            time_ms: self.time_ms,
            started_ms: self.started_ms,
            score: f32::from_bits(self.score),
            peak_score: f32::from_bits(self.peak_score),
            threshold: self.threshold.map(f32::from_bits),
            detector: Arc::from(self.detector),
            version: Arc::from(self.version),
            label: self.label,
            columns: Arc::new(self.columns),
            values: self.values.into_iter().map(f32::from_bits).collect(),
            labels: Default::default(),
        }
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

    /// Sends `event` (written by the instance of `worker`) unless the gate holds it back.
    fn send(&self, event: &AnomalyEvent, worker: usize) {
        let key = idempotency_key(&self.origin.pipeline, &self.origin.component, event);
        let admitted = self.gate.lock().unwrap_or_else(PoisonError::into_inner).admit(
            &key,
            event,
            self.config.cooldown_ms,
            self.config.dedupe_keys,
            worker,
        );
        if let Err(reason) = admitted {
            self.metrics.suppressed.with_label_values(&[reason]).inc();
            return;
        }
        let body = self.body.render(&self.origin, event, &key);
        self.dispatcher.enqueue(Job::new(key, Bytes::from(body), event.clone(), worker));
    }

    /// The checkpoint state of the instance of `worker`.
    fn snapshot(&self, worker: usize) -> Snapshot {
        let queued = self
            .dispatcher
            .queued(worker)
            .iter()
            .map(|Queued { key, event, .. }| SnapshotJob {
                key: key.clone(),
                event: SnapshotEvent::of(event),
            })
            .collect();
        let (devices, keys) =
            self.gate.lock().unwrap_or_else(PoisonError::into_inner).snapshot(worker);
        Snapshot { worker, queued, devices, keys }
    }

    /// Merges `snapshot` into the gate and, when `requeue`, queues its events again (under
    /// `owner`, the restoring instance); the number of events queued.
    fn restore(&self, snapshot: Snapshot, owner: usize, requeue: bool) -> usize {
        self.gate.lock().unwrap_or_else(PoisonError::into_inner).merge(
            &snapshot.devices,
            &snapshot.keys,
            owner,
            self.config.dedupe_keys,
        );
        if !requeue {
            return 0;
        }
        let mut queued = 0;
        for SnapshotJob { key, event } in snapshot.queued {
            let event = event.into_event();
            let body = Bytes::from(self.body.render(&self.origin, &event, &key));
            if self.dispatcher.enqueue_unless_queued(Job::new(key, body, event, owner)) {
                queued += 1;
            }
        }
        queued
    }
}

/// One worker's handle on a `webhook` sink component.
#[derive(Debug)]
pub struct WebhookSink {
    shared: Arc<Shared>,
    /// This instance's worker and the number of workers.
    worker: usize,
    workers: usize,
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
        Ok(WebhookSink { shared, worker: ctx.worker_index, workers: ctx.workers.max(1) })
    }
}

impl Sink for WebhookSink {
    fn write_batch(&mut self, batch: Batch) -> Result<(), ComponentError> {
        if let Batch::Events(events) = &batch {
            for event in events {
                self.shared.send(event, self.worker);
            }
        }
        Ok(())
    }

    /// The events this instance queued that are not delivered or dead-lettered yet, and the
    /// cooldown and dedupe entries it last updated (JSON).
    fn snapshot(&mut self) -> Result<Option<Vec<u8>>, ComponentError> {
        serde_json::to_vec(&self.shared.snapshot(self.worker))
            .map(Some)
            .map_err(|error| ComponentError::Internal(format!("webhook snapshot: {error}")))
    }

    /// Merges the cooldown and dedupe state of a snapshot; the instance of worker
    /// `snapshot worker % workers` queues its events again (once, whatever the number of
    /// instances sharing the queue).
    fn restore(&mut self, state: &[u8]) -> Result<(), ComponentError> {
        let snapshot: Snapshot = serde_json::from_slice(state).map_err(|error| {
            ComponentError::Config(format!("not a webhook sink snapshot: {error}"))
        })?;
        let owner = snapshot.worker % self.workers;
        let from = snapshot.worker;
        let waiting = snapshot.queued.len();
        let queued = self.shared.restore(snapshot, owner, owner == self.worker);
        if queued > 0 {
            tracing::info!(
                component = %self.shared.origin.component,
                queued,
                from_worker = from,
                "webhook events waiting at the checkpoint are queued again"
            );
        } else if waiting > 0 && owner == self.worker {
            tracing::debug!(
                component = %self.shared.origin.component,
                waiting,
                "the checkpoint's webhook events are queued already"
            );
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
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use std::time::Instant;

    use tidewatch_api::{ConfigValue, PipelineInfo, ProcessShared, Schema};

    use super::*;

    /// A receiver answering 200 to every request; the idempotency keys it got.
    fn receiver() -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let url = format!("http://{}/hook", listener.local_addr().expect("address"));
        let keys: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen = Arc::clone(&keys);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                let seen = Arc::clone(&seen);
                std::thread::spawn(move || answer(stream, &seen));
            }
        });
        (url, keys)
    }

    /// Answers the requests of one (kept-alive) connection.
    fn answer(mut stream: TcpStream, seen: &Mutex<Vec<String>>) {
        let Ok(read) = stream.try_clone() else { return };
        let mut reader = BufReader::new(read);
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let (mut length, mut key) = (0usize, None);
            loop {
                line.clear();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                let header = line.trim_end();
                if header.is_empty() {
                    break;
                }
                if let Some((name, value)) = header.split_once(':') {
                    match name.trim().to_ascii_lowercase().as_str() {
                        "content-length" => length = value.trim().parse().unwrap_or(0),
                        "idempotency-key" => key = Some(value.trim().to_owned()),
                        _ => {}
                    }
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
            seen.lock().expect("keys").extend(key);
            if stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_err() {
                return;
            }
        }
    }

    /// A config whose requests wait for an answer that does not come (the listener never
    /// accepts): its events stay queued or in flight.
    fn silent(dir: &std::path::Path, listener: &TcpListener) -> WebhookSinkConfig {
        let address = listener.local_addr().expect("address");
        let mut config = WebhookSinkConfig::new(format!("http://{address}/hook"));
        config.timeout_ms = 600_000;
        config.cooldown_ms = 60_000;
        config.dead_letter_path = dir.join("dead.jsonl").display().to_string();
        config
    }

    fn worker(index: usize, workers: usize, shared: &ProcessShared) -> ComponentContext {
        ComponentContext::new(
            "hook",
            "webhook",
            index,
            workers,
            Arc::new(PipelineInfo::default()),
            Arc::new(AtomicBool::new(false)),
        )
        .with_process_shared(shared.clone())
    }

    fn key(event: &AnomalyEvent) -> String {
        idempotency_key("pipeline", "hook", event)
    }

    fn snapshot_of(sink: &mut WebhookSink) -> (Vec<u8>, serde_json::Value) {
        let state = sink.snapshot().expect("snapshot").expect("state");
        let value = serde_json::from_slice(&state).expect("JSON");
        (state, value)
    }

    fn queued_keys(sink: &WebhookSink, worker: usize) -> Vec<String> {
        sink.shared.dispatcher.queued(worker).into_iter().map(|job| job.key).collect()
    }

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
            labels: Default::default(),
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
            gate.admit(&key, e, 60_000, 100, 0)
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
            assert_eq!(gate.admit(&format!("k{time}"), &e, 0, 3, 0), Ok(()));
        }
        assert_eq!(gate.keys.len(), 3);
        let e = event("d", AnomalyState::Close, 99, 0);
        assert_eq!(gate.admit("k9", &e, 0, 3, 0), Err("duplicate"));
        assert_eq!(gate.admit("k0", &e, 0, 3, 0), Ok(()));
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

    #[test]
    fn queued_events_are_sent_after_a_restore_with_their_keys_and_cooldowns_go_on() {
        let dir = tempfile::tempdir().expect("temp dir");
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let config = silent(dir.path(), &listener);
        let events = [
            event("wh-r1", AnomalyState::Open, 1_000, 1_000),
            event("wh-r2", AnomalyState::Open, 1_000, 1_000),
            event("wh-r1", AnomalyState::Close, 5_000, 1_000),
        ];
        let mut expected: Vec<String> = events.iter().map(key).collect();
        expected.sort();
        let state = {
            let run = ProcessShared::new();
            let mut old = WebhookSink::for_context(&config, &worker(0, 1, &run)).expect("sink");
            old.write_batch(Batch::Events(events.to_vec())).expect("write");
            let (state, value) = snapshot_of(&mut old);
            assert_eq!(value["queued"].as_array().map(Vec::len), Some(3), "{value}");
            assert_eq!(value["keys"].as_array().map(Vec::len), Some(3), "{value}");
            state
            // The crash: the old run's queue goes (to the dead-letter file).
        };
        let (url, received) = receiver();
        let config = WebhookSinkConfig { url, ..config };
        let run = ProcessShared::new();
        let mut sink = WebhookSink::for_context(&config, &worker(0, 1, &run)).expect("sink");
        sink.restore(&state).expect("restore");
        let deadline = Instant::now() + Duration::from_secs(20);
        while received.lock().expect("keys").len() < 3 {
            assert!(Instant::now() < deadline, "not delivered after the restore");
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut keys = received.lock().expect("keys").clone();
        keys.sort();
        assert_eq!(keys, expected, "the same idempotency keys as before the crash");
        // The cooldown of wh-r1 (opened at 1 s) goes on; a replayed event is a duplicate.
        sink.write_batch(Batch::Events(vec![
            event("wh-r1", AnomalyState::Open, 31_000, 31_000),
            event("wh-r2", AnomalyState::Open, 1_000, 1_000),
        ]))
        .expect("write");
        let suppressed =
            |reason: &str| sink.shared.metrics.suppressed.with_label_values(&[reason]).get();
        assert_eq!((suppressed("cooldown"), suppressed("duplicate")), (1, 1));
        assert_eq!(sink.shared.dispatcher.drain(Duration::from_secs(20)), 0);
        assert_eq!(received.lock().expect("keys").len(), 3);
    }

    #[test]
    fn instances_sharing_a_queue_snapshot_their_own_events_and_restores_merge() {
        let dir = tempfile::tempdir().expect("temp dir");
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let config = silent(dir.path(), &listener);
        let (a, b, c) = (
            event("wh-m1", AnomalyState::Open, 1_000, 1_000),
            event("wh-m2", AnomalyState::Open, 2_000, 2_000),
            event("wh-m3", AnomalyState::Open, 3_000, 3_000),
        );
        let (first, second) = {
            let run = ProcessShared::new();
            let mut zero = WebhookSink::for_context(&config, &worker(0, 2, &run)).expect("0");
            let mut one = WebhookSink::for_context(&config, &worker(1, 2, &run)).expect("1");
            zero.write_batch(Batch::Events(vec![a.clone()])).expect("write");
            one.write_batch(Batch::Events(vec![b.clone(), c.clone()])).expect("write");
            let (first, value) = snapshot_of(&mut zero);
            assert_eq!(value["queued"].as_array().map(Vec::len), Some(1), "{value}");
            assert_eq!(value["devices"].as_array().map(Vec::len), Some(1), "{value}");
            let (second, value) = snapshot_of(&mut one);
            assert_eq!(value["queued"].as_array().map(Vec::len), Some(2), "{value}");
            (first, second)
        };
        // One instance now: it queues the events of both, once each, and knows every key
        // and device.
        let run = ProcessShared::new();
        let mut sink = WebhookSink::for_context(&config, &worker(0, 1, &run)).expect("sink");
        for state in [&first, &second, &second] {
            sink.restore(state).expect("restore");
        }
        assert_eq!(queued_keys(&sink, 0), [key(&a), key(&b), key(&c)]);
        sink.write_batch(Batch::Events(vec![
            b.clone(),
            event("wh-m1", AnomalyState::Open, 10_000, 10_000),
            event("wh-m3", AnomalyState::Open, 70_000, 70_000),
        ]))
        .expect("write");
        let suppressed =
            |reason: &str| sink.shared.metrics.suppressed.with_label_values(&[reason]).get();
        assert_eq!((suppressed("duplicate"), suppressed("cooldown")), (1, 1));
        assert_eq!(queued_keys(&sink, 0).len(), 4, "wh-m3 is past its cooldown");
        let (_, value) = snapshot_of(&mut sink);
        assert_eq!(value["queued"].as_array().map(Vec::len), Some(4), "{value}");
        assert_eq!(value["devices"].as_array().map(Vec::len), Some(3), "{value}");
        drop(sink);
        drop(run);
        // Two instances sharing a queue, each restoring both snapshots: each event once.
        let run = ProcessShared::new();
        let mut zero = WebhookSink::for_context(&config, &worker(0, 2, &run)).expect("0");
        let mut one = WebhookSink::for_context(&config, &worker(1, 2, &run)).expect("1");
        for state in [&first, &second] {
            zero.restore(state).expect("restore");
            one.restore(state).expect("restore");
        }
        assert_eq!(queued_keys(&zero, 0), [key(&a)]);
        assert_eq!(queued_keys(&one, 1), [key(&b), key(&c)]);
        assert_eq!(snapshot_of(&mut zero).1["keys"].as_array().map(Vec::len), Some(1));
        assert_eq!(snapshot_of(&mut one).1["keys"].as_array().map(Vec::len), Some(2));
        assert!(matches!(zero.restore(b"{}"), Err(ComponentError::Config(_))));
    }

    #[test]
    fn snapshot_events_keep_their_numbers() {
        let mut original = event("wh-n", AnomalyState::Open, 1, 1);
        original.values = vec![f32::NAN, 1.5];
        original.threshold = None;
        let json = serde_json::to_vec(&SnapshotEvent::of(&original)).expect("JSON");
        let back: SnapshotEvent = serde_json::from_slice(&json).expect("parse");
        let back = back.into_event();
        assert!(back.values[0].is_nan());
        assert_eq!(back.values[1], 1.5);
        assert_eq!(key(&back), key(&original));
        assert_eq!(back.columns, original.columns);
    }
}
