//! The catalog in retained MQTT messages: one JSON row per topic (a line of a JSON-lines
//! catalog), the topic being the row's key; an empty payload (what clears a retained message)
//! deletes the row that topic held.
//!
//! Every worker connects with its own client id and a clean session and subscribes to the
//! filters at QoS 1: the broker sends it every retained message at once, then every message
//! published later. A network thread per worker runs rumqttc's event loop on a current-thread
//! tokio runtime (the connection code of the `mqtt` source) and hands the messages to
//! [`Source::poll`] through a bounded queue, waking the worker. [`KeyedCatalog`] turns each
//! message into the difference against the row its topic held; two topics holding the same
//! device are reported, and the first topic in byte order keeps it.
//!
//! After a lost connection the thread reconnects (with backoff) and subscribes again: the
//! broker sends the retained messages again, and those that did not change send nothing. A
//! retained message *cleared* while the connection was down is not seen: its row stays until
//! the pipeline restarts (MQTT has no end marker after the retained messages that would let
//! the source retract what did not come back).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use tidewatch_api::catalog::CatalogUpdate;
use tidewatch_api::{
    ComponentContext, ComponentError, ConfigError, Outputs, Source, SourcePoll, Waker,
};
use tokio::sync::{mpsc, oneshot};

use super::keyed::{KeyedCatalog, emit_updates};
use crate::mqtt::connection::{
    Backoff, ConnectionSettings, LinkClient, LinkLoop, MqttConnection, NetEvent, first_connection,
    runtime,
};
use crate::mqtt::source::{validate_filter, wake_once};
use crate::tls::TlsConfig;

/// Messages queued between the network thread and `poll`.
const QUEUE: usize = 10_000;
/// Most messages taken per poll.
const BATCH: usize = 1_024;

/// The `mqtt` table of a `catalog` source.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttCatalogConfig {
    /// Broker URL: `mqtt://host:port` or `mqtts://host:port`.
    pub url: String,
    /// Topic filters of the catalog's retained messages (`+` and `#` wildcards; no shared
    /// subscriptions: every worker needs every row).
    pub topics: Vec<String>,
    /// The connection options of the `mqtt` source; `clean_start` is always true here (a
    /// persistent session would not get the retained messages again).
    #[serde(default)]
    pub connection: MqttConnection,
    /// The TLS files of an `mqtts://` connection.
    #[serde(default)]
    pub tls: TlsConfig,
}

impl MqttCatalogConfig {
    /// The connection settings of one instance: a clean session, client id `client_id`.
    pub fn settings(
        &self,
        client_id: String,
        resolve: impl Fn(&str) -> std::path::PathBuf,
    ) -> ConnectionSettings {
        let mut connection = self.connection.clone();
        connection.clean_start = true;
        connection.session_expiry_secs = None;
        let mut settings =
            ConnectionSettings::configured(&self.url, client_id, &connection, &self.tls, resolve);
        settings.receive_maximum = Some(1_024);
        settings
    }

    /// Checks the options beyond their types (errors name them as in the table).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let client_id = self.connection.client_id.clone().unwrap_or_else(|| "tidewatch".to_owned());
        self.settings(client_id, |path: &str| std::path::PathBuf::from(path)).validate()?;
        if self.topics.is_empty() {
            return Err(ConfigError::at_field(
                "topics",
                "topics must name at least one topic filter",
            )
            .with_hint("for example topics = [\"catalog/#\"]"));
        }
        for topic in &self.topics {
            if topic.starts_with("$share/") {
                return Err(ConfigError::at_field(
                    "topics",
                    format!("{topic:?}: every worker needs every row, not a share of them"),
                )
                .with_hint("subscribe without $share/<group>/"));
            }
            validate_filter(topic).map_err(|reason| {
                ConfigError::at_field("topics", format!("topic filter {topic:?}: {reason}"))
            })?;
        }
        Ok(())
    }
}

/// What the network thread hands the source.
#[derive(Debug)]
enum Inbound {
    /// A message: its topic and payload.
    Message(Bytes, Bytes),
    /// The connection was lost, or a reconnect failed; the thread tries again.
    Lost(String),
    /// The broker refused a subscription after a reconnect.
    Refused(String),
    /// The broker refused the first subscription: the source fails.
    Fatal(String),
}

/// A `catalog` source reading retained MQTT messages (see the module documentation).
pub struct MqttCatalogSource {
    config: MqttCatalogConfig,
    settings: ConnectionSettings,
    component: Arc<str>,
    inbound: Option<mpsc::Receiver<Inbound>>,
    /// Set by the network thread when it woke the worker, cleared by `poll`.
    woken: Arc<AtomicBool>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    catalog: KeyedCatalog,
}

impl fmt::Debug for MqttCatalogSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttCatalogSource")
            .field("url", &self.settings.url)
            .field("client_id", &self.settings.client_id)
            .field("devices", &self.catalog.len())
            .finish_non_exhaustive()
    }
}

impl MqttCatalogSource {
    /// The source of one worker (its own client id: `<client_id>-<worker>`, or
    /// `tidewatch-<pipeline>-<component>-<worker>`); it connects at [`Source::open`].
    pub fn new(config: &MqttCatalogConfig, ctx: &ComponentContext) -> MqttCatalogSource {
        let client_id = config.connection.client_id_for(ctx, true);
        MqttCatalogSource {
            config: config.clone(),
            settings: config.settings(client_id, |path| ctx.resolve_path(path)),
            component: Arc::clone(&ctx.component_id),
            inbound: None,
            woken: Arc::new(AtomicBool::new(false)),
            stop: None,
            thread: None,
            catalog: KeyedCatalog::new(false),
        }
    }

    /// The client id this instance connects with.
    pub fn client_id(&self) -> &str {
        &self.settings.client_id
    }

    /// The number of devices with a row now.
    pub fn devices(&self) -> usize {
        self.catalog.len()
    }

    fn shut_down(&mut self) {
        self.inbound = None;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Source for MqttCatalogSource {
    fn open(&mut self, ctx: &ComponentContext) -> Result<(), ComponentError> {
        let (client, eventloop) = self.settings.link(false, 64)?;
        let runtime = runtime()?;
        let (inbound_tx, inbound_rx) = mpsc::channel(QUEUE);
        let inbox = Inbox {
            queue: inbound_tx,
            waker: ctx.waker().cloned(),
            woken: Arc::clone(&self.woken),
        };
        let (stop_tx, stop_rx) = oneshot::channel();
        let (startup_tx, startup_rx) = std::sync::mpsc::sync_channel(1);
        let network = Network {
            client,
            eventloop,
            settings: self.settings.clone(),
            filters: self.config.topics.clone(),
            component: self.component.to_string(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("catalog-{}", self.component))
            .spawn(move || runtime.block_on(network.run(inbox, stop_rx, startup_tx)))
            .map_err(|error| ComponentError::io("cannot start the MQTT network thread", error))?;
        self.thread = Some(thread);
        self.stop = Some(stop_tx);
        let wait =
            Duration::from_secs(self.settings.connection.connect_timeout_secs.saturating_add(10));
        let outcome = startup_rx
            .recv_timeout(wait)
            .unwrap_or_else(|_| Err("no answer from the network thread".to_owned()));
        match outcome {
            Ok(()) => {
                self.inbound = Some(inbound_rx);
                tracing::info!(
                    component = %self.component,
                    broker = %self.settings.url,
                    client_id = %self.settings.client_id,
                    topics = ?self.config.topics,
                    "catalog: connected; subscribing to the retained rows"
                );
                Ok(())
            }
            Err(reason) => {
                self.shut_down();
                Err(ComponentError::External(format!(
                    "MQTT broker {}: {reason}",
                    self.settings.url
                )))
            }
        }
    }

    fn poll(&mut self, out: &mut Outputs) -> Result<SourcePoll, ComponentError> {
        let Some(inbound) = self.inbound.as_mut() else { return Ok(SourcePoll::Finished) };
        // Before draining: what the network thread queues from now on wakes the worker again.
        self.woken.store(false, Ordering::Release);
        let mut updates: Vec<CatalogUpdate> = Vec::new();
        let mut taken = 0;
        let mut stopped = false;
        while taken < BATCH {
            match inbound.try_recv() {
                Ok(Inbound::Message(topic, payload)) => {
                    taken += 1;
                    let Ok(key) = std::str::from_utf8(&topic) else {
                        out.error("catalog", "the topic is not valid UTF-8", None, Some(&payload));
                        continue;
                    };
                    let payload = (!payload.is_empty()).then_some(&payload[..]);
                    let applied = self.catalog.apply(key, payload);
                    if let Some(error) = applied.error {
                        out.error("catalog", error.to_string(), Some(key), payload);
                    }
                    updates.extend(applied.updates);
                }
                Ok(Inbound::Lost(reason)) => out.error("connection_lost", reason, None, None),
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
                    stopped = true;
                    break;
                }
            }
        }
        emit_updates(out, updates);
        if stopped {
            return Err(ComponentError::External(format!(
                "the MQTT network thread of `{}` stopped",
                self.component
            )));
        }
        if taken >= BATCH {
            return Ok(SourcePoll::Ready);
        }
        // The network thread wakes the worker when a message comes; this is a safety net.
        Ok(SourcePoll::Idle { wake_after_ms: 50 })
    }

    /// Messages received and not yet read by `poll`.
    fn backlog(&self) -> Option<tidewatch_api::Backlog> {
        let inbound = self.inbound.as_ref()?;
        Some(tidewatch_api::Backlog { records: inbound.len() as u64, capacity: QUEUE as u64 })
    }

    fn close(&mut self) -> Result<(), ComponentError> {
        self.shut_down();
        Ok(())
    }
}

impl Drop for MqttCatalogSource {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// The queue from the network thread to `poll`, and the worker's waker.
struct Inbox {
    queue: mpsc::Sender<Inbound>,
    waker: Option<Waker>,
    woken: Arc<AtomicBool>,
}

impl Inbox {
    /// Queues `message` (waiting while the queue is full); false once `poll`'s side is gone.
    async fn send(&self, message: Inbound) -> bool {
        let sent = self.queue.send(message).await.is_ok();
        if sent {
            wake_once(self.waker.as_ref(), &self.woken);
        }
        sent
    }
}

/// The network side of one instance.
struct Network {
    client: LinkClient,
    eventloop: LinkLoop,
    settings: ConnectionSettings,
    filters: Vec<String>,
    component: String,
}

/// After our DISCONNECT, how long the thread waits for the broker to close the connection.
const DISCONNECT_DRAIN: Duration = Duration::from_secs(2);

impl Network {
    async fn run(
        mut self,
        inbox: Inbox,
        mut stop: oneshot::Receiver<()>,
        startup: std::sync::mpsc::SyncSender<Result<(), String>>,
    ) {
        if let Err(reason) = first_connection(&mut self.eventloop, &self.settings).await {
            let _ = startup.send(Err(reason));
            return;
        }
        let _ = startup.send(Ok(()));
        let mut subscribed = false;
        let mut taking = match self.client.subscribe(&self.filters, 1).await {
            Ok(()) => true,
            Err(reason) => inbox.send(Inbound::Fatal(format!("cannot subscribe: {reason}"))).await,
        };
        let mut backoff = Backoff::new(
            self.settings.connection.reconnect_initial_ms,
            self.settings.connection.reconnect_max_ms,
        )
        .with_jitter();
        let mut connected = true;
        while taking {
            let event = tokio::select! {
                _ = &mut stop => break,
                event = self.eventloop.poll() => event,
            };
            match event {
                Ok(NetEvent::Connected { .. }) => {
                    backoff.reset();
                    connected = true;
                    tracing::info!(component = %self.component, "catalog: reconnected to the MQTT broker; subscribing again");
                    // A clean session: subscribe again, and the broker sends the retained rows.
                    let _ = self.client.subscribe(&self.filters, 1).await;
                }
                Ok(NetEvent::SubAck { refused }) => {
                    if !refused.is_empty() {
                        let reason = format!(
                            "the broker refused the subscription to {:?}: {}",
                            self.filters,
                            refused.join(", ")
                        );
                        let message = if subscribed {
                            Inbound::Refused(reason)
                        } else {
                            Inbound::Fatal(reason)
                        };
                        taking = inbox.send(message).await;
                    }
                    subscribed = true;
                }
                Ok(NetEvent::Message(delivery)) => {
                    taking = inbox.send(Inbound::Message(delivery.topic, delivery.payload)).await;
                }
                Ok(_) => {}
                Err(error) if error.closed => break,
                Err(error) => {
                    let delay = backoff.next_delay();
                    let lost = std::mem::replace(&mut connected, false);
                    tracing::warn!(component = %self.component, error = %error.message, retry_in_ms = delay.as_millis() as u64, "catalog: MQTT connection lost or reconnect failed");
                    let reason = format!(
                        "{}{}; reconnecting in {} ms",
                        if lost { "" } else { "reconnect failed: " },
                        error.message,
                        delay.as_millis()
                    );
                    taking = inbox.send(Inbound::Lost(reason)).await;
                    tokio::select! {
                        _ = &mut stop => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        if connected && self.client.disconnect().await.is_ok() {
            // Let the DISCONNECT go out, until the broker closes the connection.
            let _ = tokio::time::timeout(DISCONNECT_DRAIN, async {
                while self.eventloop.poll().await.is_ok() {}
            })
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use tidewatch_api::ConfigValue;

    use super::super::CatalogSourceConfig;
    use super::*;

    fn config(text: &str) -> CatalogSourceConfig {
        ConfigValue::parse(text).expect("toml").deserialize().expect("config")
    }

    #[test]
    fn the_mqtt_table_is_checked_and_every_worker_has_its_own_client() {
        let parsed = config(
            "mqtt = { url = \"mqtt://127.0.0.1:1883\", topics = [\"catalog/#\"], \
             connection = { client_id = \"fleet\" } }",
        );
        parsed.validate().expect("valid");
        for (text, field) in [
            ("mqtt = { url = \"http://h\", topics = [\"a/#\"] }", "mqtt.url"),
            ("mqtt = { url = \"mqtt://h\", topics = [] }", "mqtt.topics"),
            ("mqtt = { url = \"mqtt://h\", topics = [\"$share/g/a/#\"] }", "mqtt.topics"),
            ("mqtt = { url = \"mqtt://h\", topics = [\"a/#/b\"] }", "mqtt.topics"),
            (
                "mqtt = { url = \"mqtt://h\", topics = [\"a\"], tls = { ca_file = \"ca\" } }",
                "mqtt.tls.ca_file",
            ),
            ("mqtt = { url = \"mqtt://h\", topics = [\"a\"] }\nwatch = false", "watch"),
        ] {
            let error = config(text).validate().expect_err(text);
            assert_eq!(error.field.as_deref(), Some(field), "{text}: {}", error.message);
        }
        let pipeline =
            Arc::new(tidewatch_api::PipelineInfo { name: "edge".into(), ..Default::default() });
        let context = |worker| {
            ComponentContext::new(
                "devices",
                "catalog",
                worker,
                2,
                Arc::clone(&pipeline),
                Arc::new(AtomicBool::new(false)),
            )
        };
        let mqtt = parsed.mqtt.as_ref().expect("mqtt");
        let first = MqttCatalogSource::new(mqtt, &context(0));
        let second = MqttCatalogSource::new(mqtt, &context(1));
        assert_eq!((first.client_id(), second.client_id()), ("fleet-0", "fleet-1"));
        assert!(first.settings.connection.clean_start);
        assert_eq!(first.settings.connection.session_expiry(), Some(0));
    }
}
