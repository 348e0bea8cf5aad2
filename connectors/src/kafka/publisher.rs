//! A blocking Kafka publisher for `tidewatch simulate --kafka` and the tests: an idempotent
//! producer that counts acknowledgements and failures.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use tidewatch_api::ComponentError;

use super::error_text;

/// Counts of delivery reports.
#[derive(Debug, Default)]
struct Counts {
    acknowledged: AtomicU64,
    failed: AtomicU64,
}

struct Counting(Arc<Counts>);

impl ClientContext for Counting {}

impl ProducerContext for Counting {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.0.acknowledged.fetch_add(1, Ordering::Relaxed),
            Err((error, _)) => {
                tracing::warn!(error = %error_text(error), "kafka delivery failed");
                self.0.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// Publishes messages to one topic (see the module documentation).
pub struct KafkaPublisher {
    producer: ThreadedProducer<Counting>,
    topic: String,
    counts: Arc<Counts>,
}

impl fmt::Debug for KafkaPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaPublisher").field("topic", &self.topic).finish_non_exhaustive()
    }
}

impl KafkaPublisher {
    /// A publisher to `topic` on `brokers` (`host:port[,...]`); it connects in the background.
    pub fn connect(brokers: &str, topic: &str) -> Result<KafkaPublisher, ComponentError> {
        let counts = Arc::new(Counts::default());
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("compression.type", "zstd")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "60000")
            .create_with_context(Counting(Arc::clone(&counts)))
            .map_err(|error| {
                ComponentError::Config(format!("kafka producer: {}", error_text(&error)))
            })?;
        Ok(KafkaPublisher { producer, topic: topic.to_owned(), counts })
    }

    /// Queues one message (waits while the producer's queue is full).
    pub fn publish(&self, key: &[u8], payload: &[u8]) -> Result<(), ComponentError> {
        let mut record = BaseRecord::to(&self.topic).key(key).payload(payload);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((error, _)) => {
                    return Err(ComponentError::External(format!(
                        "cannot produce to {}: {}",
                        self.topic,
                        error_text(&error)
                    )));
                }
            }
        }
    }

    /// Waits up to `timeout` until every queued message was acknowledged (or failed).
    pub fn flush(&self, timeout: Duration) -> Result<(), ComponentError> {
        self.producer.flush(timeout).map_err(|error| {
            ComponentError::External(format!(
                "{} messages not acknowledged: {}",
                self.producer.in_flight_count(),
                error_text(&error)
            ))
        })
    }

    /// Messages the brokers acknowledged.
    pub fn acknowledged(&self) -> u64 {
        self.counts.acknowledged.load(Ordering::Relaxed)
    }

    /// Messages that could not be delivered.
    pub fn failed(&self) -> u64 {
        self.counts.failed.load(Ordering::Relaxed)
    }
}
