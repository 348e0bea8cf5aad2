//! The `mqtt` source: subscribes to topic filters on a broker and emits raw messages, with
//! at-least-once delivery for QoS 1 and 2.
//!
//! # Threads and backpressure
//!
//! A network thread per source instance runs rumqttc's event loop on a current-thread tokio
//! runtime and hands each message to [`Source::poll`] through a bounded queue of
//! `queue_capacity` messages. The event loop does not stop at a full queue: it must keep
//! reading the socket and sending pings and acks, or the connection lapses (keep-alive) and
//! the broker redelivers everything unacknowledged, processed messages included. What arrives
//! while the queue is full waits in a spill list on the network thread, and a second task moves
//! it into the queue as room frees up. A broker that honours the receive maximum (MQTT 5; set
//! to `queue_capacity`) never fills the spill list, as the source acknowledges only what went
//! through the pipeline. One that does not (Mosquitto 2.0.11 sends past it) fills it to
//! `queue_capacity` too; then the event loop waits for room and stops reading the socket, and
//! the broker and the TCP buffers hold the rest. Memory stays bounded (two `queue_capacity`s of
//! messages) however slow the pipeline is.
//!
//! # Acknowledgements
//!
//! rumqttc runs with manual acks. A QoS 1/2 message is acknowledged (PUBACK, or PUBREC for
//! QoS 2) only once its records are safely downstream: every emitted [`RawBatch`] carries an
//! [`AckToken`] whose callback runs when the engine drops the last copy of the batch, after
//! the consuming operators processed it. The callback sends the batch's packet ids back to the
//! network thread, which acknowledges batches in the order they were emitted.
//!
//! When the pipeline takes checkpoints the acks wait for them instead: the messages emitted
//! before a checkpoint's barrier are acknowledged once that checkpoint is durable
//! ([`Source::snapshot`] sets them aside, [`Source::commit`] releases them). A crash then
//! makes the broker redeliver only what no complete checkpoint covers (plus, if it comes
//! between a checkpoint and its acks, that one checkpoint's messages).
//!
//! Acks are tied to the connection a message came on: after a reconnect the broker redelivers
//! every unacknowledged message of a persistent session (with the DUP flag), so the acks of
//! the previous connection are dropped instead of being sent on the new one, where their
//! packet ids may already name other messages.
//!
//! # Workers
//!
//! Without shared subscriptions only worker 0 connects (two clients on the same filters would
//! each receive every message); the other workers finish at once. When every filter is a
//! shared subscription (`$share/<group>/<filter>`), every worker connects with its own client
//! id and the broker splits the stream between them.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fmt;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tidewatch_api::records::now_ms;
use tidewatch_api::{
    AckToken, Backlog, Batch, ComponentContext, ComponentError, ConfigError, EventTime, Kind,
    MovedOption, Outputs, PortType, RawBatch, Source, SourceFactory, SourcePoll, ValidateContext,
    Waker,
};
use tokio::sync::{Notify, mpsc};

use super::connection::{
    Backoff, ConnectionSettings, Delivery, LinkClient, LinkLoop, MQTT_MOVED_OPTIONS,
    MqttConnection, NetEvent, check_qos, first_connection, runtime,
};
use crate::tls::TlsConfig;

fn default_qos() -> u8 {
    1
}
fn default_batch_size() -> usize {
    1_024
}
fn default_queue_capacity() -> usize {
    10_000
}

/// Options of the `mqtt` source.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSourceConfig {
    /// Broker URL: `mqtt://host:port` (plain TCP, default port 1883) or `mqtts://host:port`
    /// (TLS, default port 8883).
    pub url: String,
    /// Topic filters to subscribe to (`+` and `#` wildcards; `$share/<group>/<filter>` for
    /// MQTT 5 shared subscriptions).
    pub topics: Vec<String>,
    /// Subscription QoS: 0, 1 or 2. QoS 1 and 2 messages are acknowledged only once their
    /// records are safely downstream.
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// The connection options: protocol, client id, credentials, session, timeouts,
    /// reconnect backoff.
    #[serde(default)]
    pub connection: MqttConnection,
    /// The TLS files of an `mqtts://` connection.
    #[serde(default)]
    pub tls: TlsConfig,
    /// Most messages emitted per poll (the batch size).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Messages buffered between the network thread and the pipeline; when full, reading
    /// from the broker pauses.
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
}

impl MqttSourceConfig {
    /// A config for `url` and `topics` with every other option at its default.
    pub fn new(url: impl Into<String>, topics: Vec<String>) -> MqttSourceConfig {
        MqttSourceConfig {
            url: url.into(),
            topics,
            qos: default_qos(),
            connection: MqttConnection::default(),
            tls: TlsConfig::default(),
            batch_size: default_batch_size(),
            queue_capacity: default_queue_capacity(),
        }
    }

    /// The connection settings for one instance (`client_id` as given or generated).
    pub fn settings(
        &self,
        client_id: String,
        resolve: impl Fn(&str) -> std::path::PathBuf,
    ) -> ConnectionSettings {
        let mut settings = ConnectionSettings::configured(
            &self.url,
            client_id,
            &self.connection,
            &self.tls,
            resolve,
        );
        settings.receive_maximum = Some(self.queue_capacity.clamp(1, usize::from(u16::MAX)) as u16);
        settings
    }

    /// True when every filter is a shared subscription (`$share/...`).
    pub fn shared(&self) -> bool {
        !self.topics.is_empty() && self.topics.iter().all(|topic| topic.starts_with("$share/"))
    }

    /// Checks the options beyond their types.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let client_id = self.connection.client_id.clone().unwrap_or_else(|| "tidewatch".to_owned());
        self.settings(client_id, |path: &str| std::path::PathBuf::from(path)).validate()?;
        check_qos("qos", self.qos)?;
        if self.topics.is_empty() {
            return Err(ConfigError::at_field(
                "topics",
                "topics must name at least one topic filter",
            )
            .with_hint("for example topics = [\"factory/+/pump/+/telemetry\"]"));
        }
        for topic in &self.topics {
            validate_filter(topic).map_err(|reason| {
                ConfigError::at_field("topics", format!("topic filter {topic:?}: {reason}"))
            })?;
        }
        let shared = self.topics.iter().filter(|topic| topic.starts_with("$share/")).count();
        if shared > 0 && shared < self.topics.len() {
            return Err(ConfigError::at_field(
                "topics",
                "topics mixes shared ($share/...) and plain filters",
            )
            .with_hint("declare the shared and the plain filters in two mqtt sources"));
        }
        if self.batch_size == 0 {
            return Err(ConfigError::at_field("batch_size", "batch_size must be at least 1"));
        }
        if self.queue_capacity == 0 {
            return Err(ConfigError::at_field(
                "queue_capacity",
                "queue_capacity must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Checks a subscription filter: non-empty, `#` only as the last level, `+` and `#` alone in
/// their level, and `$share/<group>/<filter>` well formed.
pub(crate) fn validate_filter(filter: &str) -> Result<(), String> {
    let filter = match filter.strip_prefix("$share/") {
        Some(rest) => {
            let (group, inner) =
                rest.split_once('/').ok_or("a shared subscription is $share/<group>/<filter>")?;
            if group.is_empty() || group.contains(['+', '#']) {
                return Err("the share group must be a non-empty name without + or #".to_owned());
            }
            inner
        }
        None => filter,
    };
    if filter.is_empty() {
        return Err("empty filter".to_owned());
    }
    if filter.contains('\0') {
        return Err("filters cannot contain NUL".to_owned());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (index, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || index + 1 != levels.len()) {
            return Err("# must be a whole level, the last one".to_owned());
        }
        if level.contains('+') && *level != "+" {
            return Err("+ must be a whole level".to_owned());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Factory
// ---------------------------------------------------------------------------------------------

/// Makes `mqtt` sources.
#[derive(Clone, Copy, Debug, Default)]
pub struct MqttSourceFactory;

impl SourceFactory for MqttSourceFactory {
    type Config = MqttSourceConfig;

    fn moved_options(&self) -> &'static [MovedOption] {
        MQTT_MOVED_OPTIONS
    }

    fn output_type(
        &self,
        config: &MqttSourceConfig,
        _ctx: &ValidateContext,
    ) -> Result<PortType, ConfigError> {
        config.validate()?;
        Ok(PortType::of(Kind::Raw))
    }

    fn build(
        &self,
        config: &MqttSourceConfig,
        ctx: &ComponentContext,
    ) -> Result<Box<dyn Source>, ComponentError> {
        Ok(Box::new(MqttSource::new(config, ctx)?))
    }
}

// ---------------------------------------------------------------------------------------------
// Between the network thread and the source
// ---------------------------------------------------------------------------------------------

/// What the network thread hands the source.
#[derive(Debug)]
enum Inbound {
    Message {
        delivery: Delivery,
        generation: u64,
        arrival_ms: EventTime,
    },
    /// The connection was lost; the thread reconnects after a delay.
    Lost(String),
    /// A reconnect attempt failed; the thread tries again after a longer delay.
    RetryFailed(String),
    /// A refused subscription after a reconnect.
    Refused(String),
    /// The first subscription was refused: the source fails.
    Fatal(String),
}

/// One message to acknowledge: its connection generation, QoS and packet id.
#[derive(Clone, Copy, Debug)]
struct PendingAck {
    generation: u64,
    qos: u8,
    pkid: u16,
}

/// What the source (and its ack tokens) tell the network thread.
#[derive(Debug)]
enum Control {
    /// The ack group `seq` is safely downstream.
    Done { seq: u64, acks: Vec<PendingAck> },
    /// The source closed: acknowledge what is outstanding (the ack groups before `until`,
    /// when given: later ones will not come), then disconnect.
    Close { until: Option<u64> },
}

/// Counters of one source instance, shared with its network thread.
#[derive(Debug, Default)]
struct Counters {
    /// Ack groups handed out (the next group's sequence number).
    issued: AtomicU64,
    received: AtomicU64,
    acked: AtomicU64,
    stale_acks: AtomicU64,
    redelivered: AtomicU64,
    reconnects: AtomicU64,
    /// Messages in the network thread's spill list (waiting for room in the queue).
    spilled: AtomicU64,
    /// The most that list held.
    spilled_peak: AtomicU64,
}

// ---------------------------------------------------------------------------------------------
// The source
// ---------------------------------------------------------------------------------------------

/// The longest the network thread waits, once the source closed, for the outstanding batches
/// to be processed before it disconnects (their messages are then redelivered).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `mqtt` source instance.
pub struct MqttSource {
    config: MqttSourceConfig,
    settings: ConnectionSettings,
    active: bool,
    inbound: Option<mpsc::Receiver<Inbound>>,
    /// Set by the network thread when it woke the worker, cleared by `poll`.
    woken: Arc<AtomicBool>,
    control: Option<mpsc::UnboundedSender<Control>>,
    counters: Arc<Counters>,
    thread: Option<JoinHandle<()>>,
    finished: Option<std::sync::mpsc::Receiver<()>>,
    position: u64,
    last_data: Instant,
    component: Arc<str>,
    /// Checkpoint mode: acks of the messages emitted since the last snapshot, by ack group.
    unsnapshotted: Option<Vec<(u64, Vec<PendingAck>)>>,
    /// Acks of the messages the last snapshots covered, released at the next commit.
    snapshotted: Vec<(u64, Vec<PendingAck>)>,
}

impl fmt::Debug for MqttSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttSource")
            .field("url", &self.settings.url)
            .field("client_id", &self.settings.client_id)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

impl MqttSource {
    /// The source of one worker; it connects at [`Source::open`].
    pub fn new(
        config: &MqttSourceConfig,
        ctx: &ComponentContext,
    ) -> Result<MqttSource, ComponentError> {
        config.validate().map_err(|error| ComponentError::Config(error.to_string()))?;
        let shared = config.shared();
        let active = shared || ctx.worker_index == 0;
        let client_id = config.connection.client_id_for(ctx, shared && ctx.workers > 1);
        let settings = config.settings(client_id, |path| ctx.resolve_path(path));
        Ok(MqttSource {
            config: config.clone(),
            settings,
            active,
            inbound: None,
            woken: Arc::new(AtomicBool::new(false)),
            control: None,
            counters: Arc::new(Counters::default()),
            thread: None,
            finished: None,
            position: 0,
            last_data: Instant::now(),
            component: Arc::clone(&ctx.component_id),
            unsnapshotted: ctx.pipeline.checkpoints.then(Vec::new),
            snapshotted: Vec::new(),
        })
    }

    /// The client id this instance connects with.
    pub fn client_id(&self) -> &str {
        &self.settings.client_id
    }

    /// Checkpoint mode: the first ack group that no durable checkpoint covers (none before
    /// it is still to come at a close).
    fn ack_until(&self) -> Option<u64> {
        let pending = self.unsnapshotted.as_ref()?;
        let first = self.snapshotted.first().or(pending.first()).map(|(seq, _)| *seq);
        Some(first.unwrap_or_else(|| self.counters.issued.load(Ordering::SeqCst)))
    }

    fn send_control(&self, message: Control) {
        if let Some(control) = &self.control {
            let _ = control.send(message);
        }
    }

    fn emit(&mut self, batch: RawBatch, acks: Vec<PendingAck>, out: &mut Outputs) {
        let mut batch = batch;
        if !acks.is_empty() {
            let seq = self.counters.issued.fetch_add(1, Ordering::SeqCst);
            if let Some(pending) = &mut self.unsnapshotted {
                // Acknowledged once a checkpoint covering the batch is durable.
                pending.push((seq, acks));
                out.emit(Batch::Raw(batch));
                return;
            }
            match (&self.control, batch.is_empty()) {
                (Some(control), false) => {
                    let control = control.clone();
                    batch.set_ack(AckToken::new(move || {
                        let _ = control.send(Control::Done { seq, acks });
                    }));
                }
                // Nothing went downstream (every message was rejected to `.errors`).
                _ => self.send_control(Control::Done { seq, acks }),
            }
        }
        out.emit(Batch::Raw(batch));
    }
}

impl Source for MqttSource {
    fn open(&mut self, ctx: &ComponentContext) -> Result<(), ComponentError> {
        if !self.active {
            return Ok(());
        }
        let (client, eventloop) = self.settings.link(true, 1_024)?;
        let runtime = runtime()?;
        let (inbound_tx, inbound_rx) = mpsc::channel(self.config.queue_capacity);
        let inbound_tx = Inbox::new(
            inbound_tx,
            ctx.waker().cloned(),
            Arc::clone(&self.woken),
            self.config.queue_capacity,
            Arc::clone(&self.counters),
        );
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let (startup_tx, startup_rx) = std::sync::mpsc::sync_channel(1);
        let (finished_tx, finished_rx) = std::sync::mpsc::sync_channel(1);
        let network = Network {
            client,
            eventloop,
            settings: self.settings.clone(),
            topics: self.config.topics.clone(),
            qos: self.config.qos,
            counters: Arc::clone(&self.counters),
            component: self.component.to_string(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("mqtt-{}", self.component))
            .spawn(move || {
                runtime.block_on(network.run(inbound_tx, control_rx, startup_tx));
                let _ = finished_tx.send(());
            })
            .map_err(|error| ComponentError::io("cannot start the MQTT network thread", error))?;
        self.thread = Some(thread);
        self.finished = Some(finished_rx);
        let broker = self.settings.url.clone();
        // The network thread answers once connected, or failed to, within connect_timeout_secs.
        let wait =
            Duration::from_secs(self.settings.connection.connect_timeout_secs.saturating_add(10));
        let outcome = match startup_rx.recv_timeout(wait) {
            Ok(outcome) => outcome,
            Err(_) => Err("no answer from the network thread".to_owned()),
        };
        match outcome {
            Ok(()) => {
                self.inbound = Some(inbound_rx);
                self.control = Some(control_tx);
                tracing::info!(
                    component = %self.component,
                    broker = %broker,
                    client_id = %self.settings.client_id,
                    topics = ?self.config.topics,
                    qos = self.config.qos,
                    "connected; subscribing"
                );
                Ok(())
            }
            Err(reason) => {
                drop(control_tx);
                drop(inbound_rx);
                if let Some(finished) = self.finished.take()
                    && finished.recv_timeout(Duration::from_secs(5)).is_ok()
                    && let Some(thread) = self.thread.take()
                {
                    let _ = thread.join();
                }
                Err(ComponentError::External(format!("MQTT broker {broker}: {reason}")))
            }
        }
    }

    /// Messages the network thread received and not yet handed to `poll`: the queue (at most
    /// `queue_capacity`) and what waits for room in it (bounded by the broker's in-flight
    /// window for QoS 1 and 2).
    fn backlog(&self) -> Option<Backlog> {
        let inbound = self.inbound.as_ref()?;
        let spilled = self.counters.spilled.load(Ordering::Relaxed);
        Some(Backlog {
            records: inbound.len() as u64 + spilled,
            capacity: self.config.queue_capacity as u64,
        })
    }

    fn poll(&mut self, out: &mut Outputs) -> Result<SourcePoll, ComponentError> {
        if !self.active {
            return Ok(SourcePoll::Finished);
        }
        let Some(inbound) = self.inbound.as_mut() else {
            return Ok(SourcePoll::Finished);
        };
        // Before draining: what the network thread queues from now on wakes the worker again.
        self.woken.store(false, Ordering::Release);
        let batch_size = self.config.batch_size;
        let mut batch = RawBatch::with_capacity(64, 8 * 1024);
        let mut acks: Vec<PendingAck> = Vec::new();
        let mut disconnected = false;
        while batch.len() < batch_size {
            match inbound.try_recv() {
                Ok(Inbound::Message { delivery, generation, arrival_ms }) => {
                    self.counters.received.fetch_add(1, Ordering::Relaxed);
                    if delivery.dup {
                        self.counters.redelivered.fetch_add(1, Ordering::Relaxed);
                    }
                    if delivery.qos > 0 {
                        acks.push(PendingAck {
                            generation,
                            qos: delivery.qos,
                            pkid: delivery.pkid,
                        });
                    }
                    let position = self.position;
                    self.position += 1;
                    let Ok(topic) = std::str::from_utf8(&delivery.topic) else {
                        out.error(
                            "bad_topic",
                            "the topic is not valid UTF-8",
                            None,
                            Some(&delivery.payload),
                        );
                        continue;
                    };
                    if delivery.payload.is_empty() {
                        out.error(
                            "empty_payload",
                            "the message has an empty payload",
                            Some(topic),
                            None,
                        );
                        continue;
                    }
                    batch.push(topic, &delivery.payload, arrival_ms, position);
                }
                Ok(Inbound::Lost(reason)) => {
                    out.error("connection_lost", reason, None, None);
                }
                Ok(Inbound::RetryFailed(reason)) => {
                    out.error("reconnect_failed", reason, None, None);
                }
                Ok(Inbound::Refused(reason)) => {
                    out.error("subscription_refused", reason, None, None);
                }
                Ok(Inbound::Fatal(reason)) => {
                    return Err(ComponentError::External(format!(
                        "MQTT broker {}: {reason}",
                        self.settings.url
                    )));
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    disconnected = true;
                    break;
                }
            }
        }
        let got = batch.len() + acks.len();
        if got > 0 {
            self.last_data = Instant::now();
        }
        let full = batch.len() >= batch_size;
        self.emit(batch, acks, out);
        if disconnected {
            return Err(ComponentError::External(format!(
                "the MQTT network thread of `{}` stopped",
                self.component
            )));
        }
        if full {
            return Ok(SourcePoll::Ready);
        }
        // Poll often while data flows, less when the stream is quiet.
        let quiet = self.last_data.elapsed() > Duration::from_millis(200);
        Ok(SourcePoll::Idle { wake_after_ms: if quiet { 20 } else { 1 } })
    }

    /// Checkpoint mode: sets aside the acks of everything emitted so far (the barrier
    /// follows); the source has no position of its own, the broker's session is it.
    fn snapshot(&mut self) -> Result<Option<Vec<u8>>, ComponentError> {
        if let Some(pending) = &mut self.unsnapshotted {
            self.snapshotted.append(pending);
        }
        Ok(None)
    }

    /// Checkpoint mode: the checkpoint is durable: acknowledge what it covers.
    fn commit(&mut self) -> Result<(), ComponentError> {
        for (seq, acks) in std::mem::take(&mut self.snapshotted) {
            self.send_control(Control::Done { seq, acks });
        }
        Ok(())
    }

    fn close(&mut self) -> Result<(), ComponentError> {
        // Stop taking messages; what is queued but not emitted is not acknowledged and will be
        // redelivered (persistent session). Outstanding batches are acknowledged as they are
        // processed, then the network thread disconnects. With checkpoints, what no durable
        // checkpoint covers is never acknowledged (the broker redelivers it).
        self.inbound = None;
        self.send_control(Control::Close { until: self.ack_until() });
        self.control = None;
        if self.active {
            let counters = &self.counters;
            tracing::info!(
                component = %self.component,
                received = counters.received.load(Ordering::Relaxed),
                redelivered = counters.redelivered.load(Ordering::Relaxed),
                acknowledged = counters.acked.load(Ordering::Relaxed),
                stale_acks_dropped = counters.stale_acks.load(Ordering::Relaxed),
                reconnects = counters.reconnects.load(Ordering::Relaxed),
                spilled_peak = counters.spilled_peak.load(Ordering::Relaxed),
                "mqtt source closing; acknowledging what is still in the pipeline"
            );
        }
        Ok(())
    }
}

impl Drop for MqttSource {
    fn drop(&mut self) {
        self.inbound = None;
        self.send_control(Control::Close { until: self.ack_until() });
        self.control = None;
        // Give the network thread the time to send the last acks and disconnect cleanly.
        if let Some(finished) = self.finished.take()
            && finished.recv_timeout(Duration::from_secs(5)).is_ok()
            && let Some(thread) = self.thread.take()
        {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The network thread
// ---------------------------------------------------------------------------------------------

struct Network {
    client: LinkClient,
    eventloop: LinkLoop,
    settings: ConnectionSettings,
    topics: Vec<String>,
    qos: u8,
    counters: Arc<Counters>,
    component: String,
}

impl Network {
    async fn run(
        self,
        inbound: Inbox,
        control: mpsc::UnboundedReceiver<Control>,
        startup: std::sync::mpsc::SyncSender<Result<(), String>>,
    ) {
        let Network { client, mut eventloop, settings, topics, qos, counters, component } = self;
        if let Err(reason) = first_connection(&mut eventloop, &settings).await {
            let _ = startup.send(Err(reason));
            return;
        }
        // Connected: the source may start polling. The subscription's answer comes through the
        // queue (a refusal fails the source), so that messages of a resumed session, which the
        // broker may send before the SUBACK, never wait for `open` to return.
        let _ = startup.send(Ok(()));
        // Shared by the two halves below, which run interleaved on this one thread: the
        // generation changes only between two awaits of the event half, so an ack is never
        // sent on a connection other than the one its message came on.
        let generation = Rc::new(Cell::new(1_u64));
        let qos2_pending: Rc<RefCell<HashSet<u16>>> = Rc::default();
        let events = EventHalf {
            client: client.clone(),
            eventloop,
            settings: &settings,
            topics: &topics,
            qos,
            counters: &counters,
            generation: Rc::clone(&generation),
            qos2_pending: Rc::clone(&qos2_pending),
            component: &component,
        };
        let acks = AckHalf { client, counters: &counters, generation, qos2_pending };
        tokio::join!(events.run(inbound), acks.run(control));
    }
}

struct EventHalf<'a> {
    client: LinkClient,
    eventloop: LinkLoop,
    settings: &'a ConnectionSettings,
    topics: &'a [String],
    qos: u8,
    counters: &'a Counters,
    generation: Rc<Cell<u64>>,
    qos2_pending: Rc<RefCell<HashSet<u16>>>,
    component: &'a str,
}

/// After our DISCONNECT, how long the event half keeps reading until the broker closes the
/// connection (so that the broker reads our last acks before it sees the socket close).
const DISCONNECT_DRAIN: Duration = Duration::from_secs(5);

impl EventHalf<'_> {
    /// Runs the event loop and, beside it, the forwarder of its spill list.
    async fn run(self, inbound: Inbox) {
        let events = async {
            self.event_loop(&inbound).await;
            inbound.finish();
        };
        tokio::join!(events, inbound.forward());
    }

    async fn event_loop(mut self, inbound: &Inbox) {
        let mut subscribed = false;
        let mut connected = true;
        let mut disconnecting: Option<Instant> = None;
        let mut backoff = Backoff::new(
            self.settings.connection.reconnect_initial_ms,
            self.settings.connection.reconnect_max_ms,
        )
        .with_jitter();
        let mut taking = match self.client.subscribe(self.topics, self.qos).await {
            Ok(()) => true,
            Err(reason) => {
                inbound.send(Inbound::Fatal(format!("cannot subscribe: {reason}")));
                false
            }
        };
        loop {
            let event = match disconnecting {
                None => self.eventloop.poll().await,
                // Keep reading until the broker closes the connection: closing the socket
                // while the broker still writes to it can make it drop what it has not read
                // yet, our last acks included.
                Some(since) => {
                    let left = DISCONNECT_DRAIN.saturating_sub(since.elapsed());
                    match tokio::time::timeout(left, self.eventloop.poll()).await {
                        Ok(Ok(_)) => continue,
                        Ok(Err(_)) | Err(_) => break,
                    }
                }
            };
            match event {
                Ok(NetEvent::Connected { session_present }) => {
                    backoff.reset();
                    connected = true;
                    tracing::info!(component = %self.component, session_present, "reconnected to the MQTT broker");
                    if !session_present {
                        let _ = self.client.subscribe(self.topics, self.qos).await;
                    }
                }
                Ok(NetEvent::SubAck { refused }) => {
                    if !refused.is_empty() && taking {
                        let reason = format!(
                            "the broker refused the subscription to {:?}: {}",
                            self.topics,
                            refused.join(", ")
                        );
                        let message = if subscribed {
                            Inbound::Refused(reason)
                        } else {
                            Inbound::Fatal(reason)
                        };
                        taking = inbound.send(message);
                    }
                    subscribed = true;
                }
                Ok(NetEvent::Message(delivery)) => {
                    if taking {
                        let message = Inbound::Message {
                            delivery,
                            generation: self.generation.get(),
                            arrival_ms: now_ms(),
                        };
                        // Waits only when the spill list is full too: the loop must go on
                        // sending pings and acks.
                        taking = inbound.send_message(message).await;
                    }
                }
                Ok(NetEvent::PubCompSent { pkid }) => {
                    self.qos2_pending.borrow_mut().remove(&pkid);
                }
                Ok(NetEvent::DisconnectSent) => disconnecting = Some(Instant::now()),
                Ok(_) => {}
                Err(error) => {
                    if error.closed {
                        break;
                    }
                    // No await between the connection drop (inside poll) and this line.
                    self.generation.set(self.generation.get() + 1);
                    if let Some(pkid) = error.unsolicited {
                        self.qos2_pending.borrow_mut().insert(pkid);
                    }
                    for pkid in self.qos2_pending.borrow().iter() {
                        self.eventloop.remember_qos2(*pkid);
                    }
                    if !taking && inbound.queue.is_closed() {
                        break;
                    }
                    let delay = backoff.next_delay();
                    let lost = std::mem::replace(&mut connected, false);
                    if lost {
                        self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::warn!(
                        component = %self.component,
                        error = %error.message,
                        retry_in_ms = delay.as_millis() as u64,
                        "{}",
                        if lost { "MQTT connection lost; reconnecting" } else { "MQTT reconnect failed; retrying" }
                    );
                    if taking {
                        let reason =
                            format!("{}; reconnecting in {} ms", error.message, delay.as_millis());
                        let message =
                            if lost { Inbound::Lost(reason) } else { Inbound::RetryFailed(reason) };
                        taking = inbound.send(message);
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

/// The queue from the network thread to `poll`, and the spill list in front of it.
struct Inbox {
    queue: mpsc::Sender<Inbound>,
    /// The engine's waker of this source: a message waits for no poll interval.
    waker: Option<Waker>,
    /// True while a wake is pending (`poll` has not run since): one wake per poll, however
    /// many messages come meanwhile.
    woken: Arc<AtomicBool>,
    /// What arrived while the queue was full, in arrival order; [`Inbox::forward`] moves it
    /// into the queue as room frees up (network thread only).
    spill: RefCell<VecDeque<Inbound>>,
    /// Signalled when the spill list gains an entry, and when the event loop ends.
    spilled: Notify,
    /// Signalled when the forwarder took an entry from the spill list.
    room: Notify,
    /// The event loop ended: the forwarder ends once the spill list is empty.
    done: Cell<bool>,
    /// `queue_capacity`: the most messages the spill list takes before the event loop waits.
    capacity: usize,
    counters: Arc<Counters>,
}

impl Inbox {
    fn new(
        queue: mpsc::Sender<Inbound>,
        waker: Option<Waker>,
        woken: Arc<AtomicBool>,
        capacity: usize,
        counters: Arc<Counters>,
    ) -> Inbox {
        Inbox {
            queue,
            waker,
            woken,
            spill: RefCell::default(),
            spilled: Notify::new(),
            room: Notify::new(),
            done: Cell::new(false),
            capacity,
            counters,
        }
    }

    /// Hands `message` on without waiting (into the queue, or behind what is spilled); false
    /// once `poll`'s side is gone.
    fn send(&self, message: Inbound) -> bool {
        if self.queue.is_closed() {
            return false;
        }
        let mut spill = self.spill.borrow_mut();
        if spill.is_empty() {
            match self.queue.try_send(message) {
                Ok(()) => {
                    self.wake();
                    return true;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
                Err(mpsc::error::TrySendError::Full(message)) => spill.push_back(message),
            }
        } else {
            spill.push_back(message);
        }
        self.count_spill(spill.len());
        self.spilled.notify_one();
        true
    }

    /// Hands on a message; waits while the spill list holds `capacity` messages (the event
    /// loop then stops reading the socket).
    async fn send_message(&self, message: Inbound) -> bool {
        if !self.send(message) {
            return false;
        }
        while self.spill.borrow().len() >= self.capacity && !self.queue.is_closed() {
            self.room.notified().await;
        }
        true
    }

    /// Moves the spill list into the queue as room frees up, until the event loop ended and
    /// nothing is left, or `poll`'s side is gone.
    async fn forward(&self) {
        loop {
            if self.spill.borrow().is_empty() {
                if self.done.get() {
                    return;
                }
                self.spilled.notified().await;
                continue;
            }
            let Ok(permit) = self.queue.reserve().await else {
                self.spill.borrow_mut().clear();
                self.count_spill(0);
                self.room.notify_one();
                return;
            };
            let (message, left) = {
                let mut spill = self.spill.borrow_mut();
                (spill.pop_front(), spill.len())
            };
            if let Some(message) = message {
                permit.send(message);
                self.wake();
            }
            self.count_spill(left);
            self.room.notify_one();
        }
    }

    /// The event loop ended.
    fn finish(&self) {
        self.done.set(true);
        self.spilled.notify_one();
    }

    fn count_spill(&self, len: usize) {
        self.counters.spilled.store(len as u64, Ordering::Relaxed);
        self.counters.spilled_peak.fetch_max(len as u64, Ordering::Relaxed);
    }

    fn wake(&self) {
        wake_once(self.waker.as_ref(), &self.woken);
    }
}

/// Wakes the worker of a source whose network thread queued something, unless a wake is
/// already pending (`woken`, cleared by the source's `poll`): one wake per poll, however many
/// messages come meanwhile.
pub(crate) fn wake_once(waker: Option<&Waker>, woken: &AtomicBool) {
    if let Some(waker) = waker
        && !woken.swap(true, Ordering::AcqRel)
    {
        waker.wake();
    }
}

struct AckHalf<'a> {
    client: LinkClient,
    counters: &'a Counters,
    generation: Rc<Cell<u64>>,
    qos2_pending: Rc<RefCell<HashSet<u16>>>,
}

impl AckHalf<'_> {
    async fn run(self, mut control: mpsc::UnboundedReceiver<Control>) {
        let mut next_seq: u64 = 0;
        let mut done: BTreeMap<u64, Vec<PendingAck>> = BTreeMap::new();
        let mut closing_since: Option<Instant> = None;
        // Set by a close: the ack groups still to come end before it.
        let mut expected: Option<u64> = None;
        loop {
            let message = match closing_since {
                None => control.recv().await,
                Some(since) => {
                    let left = DRAIN_TIMEOUT.saturating_sub(since.elapsed());
                    match tokio::time::timeout(left, control.recv()).await {
                        Ok(message) => message,
                        Err(_) => {
                            tracing::warn!(
                                outstanding =
                                    self.counters.issued.load(Ordering::SeqCst) - next_seq,
                                "MQTT source closed with batches still in the pipeline; their messages will be redelivered"
                            );
                            break;
                        }
                    }
                }
            };
            match message {
                Some(Control::Done { seq, acks }) => {
                    done.insert(seq, acks);
                    // Acknowledge in emission order.
                    while let Some(acks) = done.remove(&next_seq) {
                        next_seq += 1;
                        for ack in acks {
                            if ack.generation != self.generation.get() {
                                self.counters.stale_acks.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            if self.client.ack(ack.qos, ack.pkid).await.is_ok() {
                                self.counters.acked.fetch_add(1, Ordering::Relaxed);
                                if ack.qos == 2 {
                                    self.qos2_pending.borrow_mut().insert(ack.pkid);
                                }
                            }
                        }
                    }
                }
                Some(Control::Close { until }) => {
                    closing_since.get_or_insert_with(Instant::now);
                    if until.is_some() {
                        expected = until;
                    }
                }
                None => break,
            }
            let until = expected.unwrap_or_else(|| self.counters.issued.load(Ordering::SeqCst));
            if closing_since.is_some() && next_seq >= until {
                break;
            }
        }
        // Every ack is queued ahead of the DISCONNECT.
        let _ = self.client.disconnect().await;
    }
}

#[cfg(test)]
mod tests {
    use tidewatch_api::ConfigValue;

    use super::*;

    fn config(text: &str) -> MqttSourceConfig {
        ConfigValue::parse(text).expect("toml").deserialize().expect("config")
    }

    const BASE: &str =
        "url = \"mqtt://127.0.0.1:1883\"\ntopics = [\"factory/+/pump/+/telemetry\"]\n";

    #[test]
    fn invalid_options_are_rejected() {
        let factory = MqttSourceFactory;
        let ctx = ValidateContext::default();
        for (extra, field) in [
            ("qos = 3", "qos"),
            ("url = \"http://x\"", "url"),
            ("batch_size = 0", "batch_size"),
            ("queue_capacity = 0", "queue_capacity"),
            (
                "connection = { protocol = \"v4\", session_expiry_secs = 10 }",
                "connection.session_expiry_secs",
            ),
            ("connection = { keep_alive_secs = 2 }", "connection.keep_alive_secs"),
            ("connection = { keep_alive_secs = 0 }", "connection.keep_alive_secs"),
            ("tls.ca_file = \"ca.crt\"", "tls.ca_file"),
        ] {
            let mut text = String::new();
            let mut url_set = false;
            if extra.starts_with("url") {
                url_set = true;
            }
            if !url_set {
                text.push_str("url = \"mqtt://127.0.0.1:1883\"\n");
            }
            text.push_str("topics = [\"a/#\"]\n");
            text.push_str(extra);
            let error = factory.output_type(&config(&text), &ctx).expect_err(extra);
            assert_eq!(error.field.as_deref(), Some(field), "{extra}: {}", error.message);
        }
        for topics in
            ["[]", "[\"a/#/b\"]", "[\"a+/b\"]", "[\"$share/g\"]", "[\"$share/g/a\", \"b\"]"]
        {
            let text = format!("url = \"mqtt://h\"\ntopics = {topics}");
            let error = factory.output_type(&config(&text), &ctx).expect_err(topics);
            assert_eq!(error.field.as_deref(), Some("topics"), "{topics}");
        }
        assert!(factory.output_type(&config(BASE), &ctx).is_ok());
        assert!(
            ConfigValue::parse("url = \"mqtt://h\"\ntopics = [\"a\"]\ntopic = \"x\"")
                .expect("toml")
                .deserialize::<MqttSourceConfig>()
                .is_err()
        );
        // Payload options belong to normalize (the codec), not to the source.
        for moved in ["format = \"csv\"", "topic_template = \"a/{x}\"", "columns = [\"a\"]"] {
            let text = format!("{BASE}{moved}");
            let parsed = ConfigValue::parse(&text).expect("toml").deserialize::<MqttSourceConfig>();
            assert!(parsed.is_err(), "{moved}");
        }
    }

    #[test]
    fn client_ids_and_workers() {
        let pipeline =
            Arc::new(tidewatch_api::PipelineInfo { name: "edge".into(), ..Default::default() });
        let context = |worker| {
            ComponentContext::new(
                "in",
                "mqtt",
                worker,
                2,
                Arc::clone(&pipeline),
                Arc::new(std::sync::atomic::AtomicBool::new(false)),
            )
        };
        let plain = config(BASE);
        let first = MqttSource::new(&plain, &context(0)).expect("source");
        let second = MqttSource::new(&plain, &context(1)).expect("source");
        assert_eq!(first.client_id(), "tidewatch-edge-in-0");
        assert!(first.active && !second.active);
        let shared = config(
            "url = \"mqtt://h\"\ntopics = [\"$share/g/a/#\"]\nconnection.client_id = \"me\"",
        );
        let first = MqttSource::new(&shared, &context(0)).expect("source");
        let second = MqttSource::new(&shared, &context(1)).expect("source");
        assert!(first.active && second.active);
        assert_eq!((first.client_id(), second.client_id()), ("me-0", "me-1"));
    }
}
