//! A blocking MQTT publisher: the engine of the `mqtt` sink and of `tidewatch simulate`.
//!
//! A network thread drives rumqttc's event loop (reconnecting with backoff); [`publish`]
//! queues a message and blocks while rumqttc's request queue is full (at most `max_inflight`
//! QoS 1/2 messages await their ack), which slows the caller to what the broker takes.
//! [`flush`] waits until every queued message went out (QoS 0) or was acknowledged (QoS 1:
//! PUBACK, QoS 2: PUBCOMP).
//!
//! [`publish`]: MqttPublisher::publish
//! [`flush`]: MqttPublisher::flush

use std::fmt;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tidewatch_api::ComponentError;

use super::connection::{
    Backoff, ConnectionSettings, LinkClient, NetEvent, first_connection, runtime,
};

/// Counters of a publisher.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublisherStats {
    /// Messages handed to [`MqttPublisher::publish`].
    pub requested: u64,
    /// Messages sent (QoS 0) or acknowledged by the broker (QoS 1 and 2).
    pub completed: u64,
    /// MQTT 5: acknowledgements saying that no subscription matched the message.
    pub no_subscribers: u64,
    /// Connections lost and re-established.
    pub reconnects: u64,
    /// The last connection error, if any.
    pub last_error: Option<String>,
}

#[derive(Debug, Default)]
struct Shared {
    stats: Mutex<PublisherStats>,
    changed: Condvar,
}

impl Shared {
    fn update(&self, change: impl FnOnce(&mut PublisherStats)) {
        let mut stats = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        change(&mut stats);
        self.changed.notify_all();
    }
}

/// A connected publisher.
pub struct MqttPublisher {
    client: LinkClient,
    handle: tokio::runtime::Handle,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    url: String,
}

impl fmt::Debug for MqttPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttPublisher").field("url", &self.url).finish_non_exhaustive()
    }
}

impl MqttPublisher {
    /// Connects (waiting for the broker's CONNACK, up to `connect_timeout_secs`).
    pub fn connect(settings: &ConnectionSettings) -> Result<MqttPublisher, ComponentError> {
        let (client, mut eventloop) =
            settings.link(false, usize::from(settings.connection.max_inflight))?;
        let runtime = runtime()?;
        let handle = runtime.handle().clone();
        let shared = Arc::new(Shared::default());
        let (startup_tx, startup_rx) = std::sync::mpsc::sync_channel(1);
        let thread_shared = Arc::clone(&shared);
        let thread_settings = settings.clone();
        let thread = std::thread::Builder::new()
            .name("mqtt-publisher".to_owned())
            .spawn(move || {
                runtime.block_on(async move {
                    let settings = thread_settings;
                    if let Err(reason) = first_connection(&mut eventloop, &settings).await {
                        let _ = startup_tx.send(Err(reason));
                        return;
                    }
                    let _ = startup_tx.send(Ok(()));
                    let mut backoff =
                        Backoff::new(settings.connection.reconnect_initial_ms, settings.connection.reconnect_max_ms).with_jitter();
                    let mut disconnecting: Option<Instant> = None;
                    loop {
                        if let Some(since) = disconnecting {
                            // Read until the broker closes the connection after our DISCONNECT.
                            let left = Duration::from_secs(5).saturating_sub(since.elapsed());
                            match tokio::time::timeout(left, eventloop.poll()).await {
                                Ok(Ok(_)) => continue,
                                Ok(Err(_)) | Err(_) => break,
                            }
                        }
                        match eventloop.poll().await {
                            Ok(NetEvent::Connected { .. }) => backoff.reset(),
                            Ok(NetEvent::PubAck { no_subscribers }) => {
                                thread_shared.update(|stats| {
                                    stats.completed += 1;
                                    stats.no_subscribers += u64::from(no_subscribers);
                                });
                            }
                            Ok(NetEvent::PubComp) | Ok(NetEvent::PublishSent { pkid: 0 }) => {
                                thread_shared.update(|stats| stats.completed += 1);
                            }
                            Ok(NetEvent::DisconnectSent) => disconnecting = Some(Instant::now()),
                            Ok(_) => {}
                            Err(error) if error.closed => break,
                            Err(error) => {
                                let delay = backoff.next_delay();
                                tracing::warn!(error = %error.message, retry_in_ms = delay.as_millis() as u64, "MQTT publisher connection lost; reconnecting");
                                thread_shared.update(|stats| {
                                    stats.reconnects += 1;
                                    stats.last_error = Some(error.message);
                                });
                                tokio::time::sleep(delay).await;
                            }
                        }
                    }
                });
            })
            .map_err(|error| ComponentError::io("cannot start the MQTT network thread", error))?;
        let wait = Duration::from_secs(settings.connection.connect_timeout_secs.saturating_add(30));
        let outcome = startup_rx
            .recv_timeout(wait)
            .unwrap_or_else(|_| Err("no answer from the network thread".to_owned()));
        match outcome {
            Ok(()) => Ok(MqttPublisher {
                client,
                handle,
                shared,
                thread: Some(thread),
                url: settings.url.clone(),
            }),
            Err(reason) => {
                drop(client);
                let _ = thread.join();
                Err(ComponentError::External(format!("MQTT broker {}: {reason}", settings.url)))
            }
        }
    }

    /// Queues one message; blocks while rumqttc's request queue is full.
    pub fn publish(
        &self,
        topic: String,
        qos: u8,
        retain: bool,
        payload: impl Into<Bytes>,
    ) -> Result<(), ComponentError> {
        self.shared.update(|stats| stats.requested += 1);
        let result = self.handle.block_on(self.client.publish(topic, qos, retain, payload.into()));
        result.map_err(|reason| {
            self.shared.update(|stats| stats.requested -= 1);
            ComponentError::External(format!("cannot publish to {}: {reason}", self.url))
        })
    }

    /// Waits until every message was sent (QoS 0) or acknowledged (QoS 1, 2), up to `timeout`.
    pub fn flush(&self, timeout: Duration) -> Result<(), ComponentError> {
        let deadline = Instant::now() + timeout;
        let mut stats = self.shared.stats.lock().unwrap_or_else(PoisonError::into_inner);
        while stats.completed < stats.requested {
            let now = Instant::now();
            if now >= deadline {
                let missing = stats.requested - stats.completed;
                let cause = stats
                    .last_error
                    .as_deref()
                    .map(|error| format!(" (last connection error: {error})"))
                    .unwrap_or_default();
                return Err(ComponentError::External(format!(
                    "{missing} of {} messages to {} were not acknowledged within {} s{cause}",
                    stats.requested,
                    self.url,
                    timeout.as_secs_f64()
                )));
            }
            stats = self
                .shared
                .changed
                .wait_timeout(stats, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        Ok(())
    }

    /// The counters so far.
    pub fn stats(&self) -> PublisherStats {
        self.shared.stats.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Flushes (up to `timeout`), disconnects and stops the network thread.
    pub fn close(&mut self, timeout: Duration) -> Result<(), ComponentError> {
        let flushed = self.flush(timeout);
        if let Some(thread) = self.thread.take() {
            let _ = self.handle.block_on(self.client.disconnect());
            let deadline = Instant::now() + Duration::from_secs(5);
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
        flushed
    }
}

impl Drop for MqttPublisher {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.close(Duration::from_secs(1));
        }
    }
}
