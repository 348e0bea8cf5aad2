//! The `kafka` sink: every record as one JSON object, keyed by its device, through an
//! idempotent producer with compression; optionally behind the store-and-forward
//! [`buffer`](super::buffer).
//!
//! Readings travel flat, the way devices send them, so a cloud pipeline reads forwarded
//! readings and device messages with the same `normalize` options:
//! `{"device": "pump-7", "ts": 1700000000000, "vibration": 0.41, ..., "anomaly": 0}` (`ts` in
//! ms since the epoch; a missing value is `null`). Every other kind is the JSON-lines
//! encoding of the `stdout`, `file` and `mqtt` sinks.
//!
//! # Delivery
//!
//! One producer per process and component (the workers' instances share it). It is
//! idempotent (`enable.idempotence`): librdkafka retries a failed send, with backoff
//! (`retry_backoff_ms` .. `retry_backoff_max_ms`), without duplicating or reordering records
//! of a partition, for up to `delivery_timeout_ms`. A record still not delivered then, or
//! refused for good (too large, not authorized), goes to the dead-letter file (one JSON line
//! with the reason, topic, key and value) and is counted in
//! `tidewatch_kafka_sink_dead_letters_total{reason}`. Records of one device share a key, so
//! they land in one partition, in order.
//!
//! Every record carries the header `tidewatch-dedupe-key`: 16 hex digits of a hash of its key
//! and value. A record produced again (after a crash, from the buffer or from a pipeline
//! resumed from its checkpoint) has the same key, so a consumer that must see it once drops
//! the keys it has seen.
//!
//! # Store and forward
//!
//! With a `[sinks.x.buffer]` table, `write_batch` appends the records to the on-disk buffer
//! and returns; a forwarder thread sends them oldest first, at most `max_in_flight_records`
//! at a time, and removes a record from the buffer only once the broker acknowledged it. The
//! producer then never gives up on a record (no delivery timeout): while the broker is
//! unreachable, records wait on disk (up to the buffer's bound) and the pipeline keeps
//! detecting. Records handed to the producer but not acknowledged when tidewatch stops stay
//! in the buffer and are sent again at the next start (at-least-once).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};
use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use serde::Deserialize;
use serde_json::json;
use tidewatch_api::json::write_json_lines;
use tidewatch_api::{
    Batch, ComponentContext, ComponentError, ConfigError, DeviceId, Kind, ReadingBatch, Sink,
    SinkFactory, ValidateContext,
};

use super::buffer::{BufferConfig, DiskBuffer};
use super::{KafkaClientOptions, error_text};
use crate::dead_letter::DeadLetterFile;
use crate::shared::{Registered, per_component};
use crate::sinks::record_devices;

fn default_linger_ms() -> u64 {
    5
}
fn default_delivery_timeout_ms() -> u64 {
    120_000
}
fn default_retry_backoff_ms() -> u64 {
    100
}
fn default_retry_backoff_max_ms() -> u64 {
    1_000
}
fn default_queue_max_records() -> u64 {
    100_000
}
fn default_max_in_flight_records() -> u64 {
    10_000
}
fn default_flush_timeout_ms() -> u64 {
    10_000
}
fn default_dead_letter_path() -> String {
    "kafka-dead-letters.jsonl".to_owned()
}

/// Compression of produced message batches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// None.
    None,
    /// gzip.
    Gzip,
    /// Snappy.
    Snappy,
    /// LZ4.
    Lz4,
    /// Zstandard.
    #[default]
    Zstd,
}

impl Compression {
    fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

/// Options of the `kafka` sink.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// How the client reaches the brokers: `brokers`, `tls`, `sasl`, `librdkafka`.
    #[serde(flatten)]
    pub client: KafkaClientOptions,
    /// The topic records are produced to.
    pub topic: String,
    /// Compression: `none`, `gzip`, `snappy`, `lz4` or `zstd`.
    #[serde(default)]
    pub compression: Compression,
    /// How long the producer waits to fill a batch, ms.
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
    /// How long a record may take to be delivered, retries included, before it is
    /// dead-lettered, ms (without a buffer; with one, records wait in the buffer instead).
    #[serde(default = "default_delivery_timeout_ms")]
    pub delivery_timeout_ms: u64,
    /// Delay before the first retry of a failed send, ms (it grows up to
    /// `retry_backoff_max_ms`).
    #[serde(default = "default_retry_backoff_ms")]
    pub retry_backoff_ms: u64,
    /// Longest delay between retries, ms.
    #[serde(default = "default_retry_backoff_max_ms")]
    pub retry_backoff_max_ms: u64,
    /// Records the producer holds in memory; writing waits beyond it (without a buffer).
    #[serde(default = "default_queue_max_records")]
    pub queue_max_records: u64,
    /// With a buffer: records handed to the producer and not yet acknowledged, at most.
    #[serde(default = "default_max_in_flight_records")]
    pub max_in_flight_records: u64,
    /// How long a flush (at the end of the pipeline) waits for acknowledgements, ms.
    #[serde(default = "default_flush_timeout_ms")]
    pub flush_timeout_ms: u64,
    /// Where records that could not be delivered are written, one JSON line each (relative
    /// to the pipeline file).
    #[serde(default = "default_dead_letter_path")]
    pub dead_letter_path: String,
    /// The store-and-forward buffer (`[sinks.x.buffer]`); none: records go straight to the
    /// producer.
    #[serde(default)]
    pub buffer: Option<BufferConfig>,
}

impl KafkaSinkConfig {
    /// A config producing to `topic` on `brokers`, every other option at its default.
    pub fn new(brokers: impl Into<String>, topic: impl Into<String>) -> KafkaSinkConfig {
        KafkaSinkConfig {
            client: KafkaClientOptions::new(brokers),
            topic: topic.into(),
            compression: Compression::default(),
            linger_ms: default_linger_ms(),
            delivery_timeout_ms: default_delivery_timeout_ms(),
            retry_backoff_ms: default_retry_backoff_ms(),
            retry_backoff_max_ms: default_retry_backoff_max_ms(),
            queue_max_records: default_queue_max_records(),
            max_in_flight_records: default_max_in_flight_records(),
            flush_timeout_ms: default_flush_timeout_ms(),
            dead_letter_path: default_dead_letter_path(),
            buffer: None,
        }
    }

    /// Checks the options beyond their types.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.client.validate()?;
        let topic = self.topic.trim();
        if topic.is_empty()
            || topic.len() > 249
            || !topic.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(ConfigError::at_field(
                "topic",
                format!("{:?} is not a Kafka topic name", self.topic),
            )
            .with_hint("1 to 249 characters of a-z, A-Z, 0-9, '.', '_' and '-'"));
        }
        for (field, value) in [
            ("delivery_timeout_ms", self.delivery_timeout_ms),
            ("retry_backoff_ms", self.retry_backoff_ms),
            ("retry_backoff_max_ms", self.retry_backoff_max_ms),
            ("queue_max_records", self.queue_max_records),
            ("max_in_flight_records", self.max_in_flight_records),
            ("flush_timeout_ms", self.flush_timeout_ms),
        ] {
            if value == 0 {
                return Err(ConfigError::at_field(field, format!("{field} must be at least 1")));
            }
        }
        if self.retry_backoff_max_ms < self.retry_backoff_ms {
            return Err(ConfigError::at_field(
                "retry_backoff_max_ms",
                "retry_backoff_max_ms must be at least retry_backoff_ms",
            ));
        }
        if self.dead_letter_path.trim().is_empty() {
            return Err(ConfigError::at_field(
                "dead_letter_path",
                "dead_letter_path must name a file",
            ));
        }
        if let Some(buffer) = &self.buffer {
            if buffer.dir.as_os_str().is_empty() {
                return Err(ConfigError::at_field("buffer.dir", "buffer.dir must name a folder"));
            }
            if buffer.segment_bytes < 1024 {
                return Err(ConfigError::at_field(
                    "buffer.segment_bytes",
                    "buffer.segment_bytes must be at least 1024",
                ));
            }
            if buffer.max_bytes < 2 * buffer.segment_bytes {
                return Err(ConfigError::at_field(
                    "buffer.max_bytes",
                    "buffer.max_bytes must hold at least two segments (2 x segment_bytes)",
                ));
            }
        }
        Ok(())
    }
}

/// Makes `kafka` sinks.
#[derive(Clone, Copy, Debug, Default)]
pub struct KafkaSinkFactory;

impl SinkFactory for KafkaSinkFactory {
    type Config = KafkaSinkConfig;

    fn accepts(&self, _config: &KafkaSinkConfig) -> Vec<Kind> {
        Kind::ALL.to_vec()
    }

    fn validate(
        &self,
        config: &KafkaSinkConfig,
        _ctx: &ValidateContext,
    ) -> Result<(), ConfigError> {
        config.validate()
    }

    fn build(
        &self,
        config: &KafkaSinkConfig,
        ctx: &ComponentContext,
    ) -> Result<Box<dyn Sink>, ComponentError> {
        Ok(Box::new(KafkaSink::new(config, ctx)?))
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics and dead letters
// ---------------------------------------------------------------------------------------------

/// The counters of one `kafka` sink component (label `component_id`).
#[derive(Clone, Debug)]
struct SinkMetrics {
    delivered: IntCounter,
    dead_letters: IntCounterVec,
    buffer_records: IntGauge,
    buffer_bytes: IntGauge,
    buffer_dropped: IntCounterVec,
}

fn metric_error(error: prometheus::Error) -> ComponentError {
    ComponentError::Internal(format!("kafka metric: {error}"))
}

impl SinkMetrics {
    fn new(component_id: &str) -> Result<SinkMetrics, ComponentError> {
        let opts = |name: &str, help: &str| {
            Opts::new(name, help).const_label("component_id", component_id)
        };
        Ok(SinkMetrics {
            delivered: IntCounter::with_opts(opts(
                "tidewatch_kafka_sink_delivered_total",
                "Records the Kafka brokers acknowledged.",
            ))
            .map_err(metric_error)?,
            dead_letters: IntCounterVec::new(
                opts(
                    "tidewatch_kafka_sink_dead_letters_total",
                    "Records written to the dead-letter file instead of Kafka, by reason.",
                ),
                &["reason"],
            )
            .map_err(metric_error)?,
            buffer_records: IntGauge::with_opts(opts(
                "tidewatch_kafka_buffer_records",
                "Records in the store-and-forward buffer, not yet acknowledged by Kafka.",
            ))
            .map_err(metric_error)?,
            buffer_bytes: IntGauge::with_opts(opts(
                "tidewatch_kafka_buffer_bytes",
                "Bytes of the store-and-forward buffer's segment files.",
            ))
            .map_err(metric_error)?,
            buffer_dropped: IntCounterVec::new(
                opts(
                    "tidewatch_kafka_buffer_dropped_total",
                    "Records dropped because the store-and-forward buffer was full, by policy.",
                ),
                &["reason"],
            )
            .map_err(metric_error)?,
        })
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.delivered.clone()),
            Box::new(self.dead_letters.clone()),
            Box::new(self.buffer_records.clone()),
            Box::new(self.buffer_bytes.clone()),
            Box::new(self.buffer_dropped.clone()),
        ]
    }
}

/// The dead-letter file: one JSON line per record that was not delivered.
#[derive(Debug)]
struct DeadLetters {
    file: DeadLetterFile,
    topic: String,
}

impl DeadLetters {
    fn write(&self, reason: &str, error: &str, key: Option<&[u8]>, value: &[u8]) {
        let fields = json!({
            "topic": self.topic,
            "error": error,
            "key": key.map(String::from_utf8_lossy),
            "value": String::from_utf8_lossy(value),
        });
        self.file.write(reason, fields, "kafka record");
    }
}

/// Why a delivery failed, as a metric label.
fn failure_reason(error: &KafkaError) -> &'static str {
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageTimedOut) => "timeout",
        Some(RDKafkaErrorCode::MessageSizeTooLarge) => "too_large",
        Some(
            RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed,
        ) => "not_authorized",
        Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
            "unknown_topic"
        }
        _ => "rejected",
    }
}

// ---------------------------------------------------------------------------------------------
// The producer's context: delivery reports
// ---------------------------------------------------------------------------------------------

/// Delivery reports (run on the producer's polling thread).
struct Deliveries {
    dead: DeadLetters,
    delivered: IntCounter,
    buffer: Option<Arc<DiskBuffer>>,
    in_flight: Arc<AtomicU64>,
}

impl ClientContext for Deliveries {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(component = %self.dead.file.component(), error = %error, reason, "kafka producer error");
    }
}

impl ProducerContext for Deliveries {
    /// The record's sequence number in the buffer (0 without one).
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        match result {
            Ok(_) => self.delivered.inc(),
            Err((error, message)) => {
                let reason = failure_reason(error);
                tracing::warn!(component = %self.dead.file.component(), error = %error_text(error), reason, "kafka delivery failed; dead-lettered");
                self.dead.write(
                    reason,
                    &error_text(error),
                    message.key(),
                    message.payload().unwrap_or_default(),
                );
            }
        }
        if let Some(buffer) = &self.buffer {
            // Delivered or dead-lettered: either way it leaves the buffer.
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            if let Err(error) = buffer.ack(seq as u64) {
                tracing::error!(component = %self.dead.file.component(), %error, "store-and-forward buffer");
            }
        }
    }
}

type KafkaProducer = ThreadedProducer<Deliveries>;

/// What the workers' instances of one sink share: the producer, the buffer and its forwarder.
struct Shared {
    producer: Arc<KafkaProducer>,
    topic: String,
    buffer: Option<Arc<DiskBuffer>>,
    metrics: SinkMetrics,
    stop: Arc<AtomicBool>,
    forwarder: Option<JoinHandle<()>>,
    flush_timeout: Duration,
    component: String,
    _registered: Option<Registered>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared").field("topic", &self.topic).finish_non_exhaustive()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Give the forwarder up to the flush timeout to ship what is buffered.
        let deadline = Instant::now() + self.flush_timeout;
        while let Some(buffer) = &self.buffer
            && buffer.stats().records > 0
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.stop.store(true, Ordering::SeqCst);
        if let Some(forwarder) = self.forwarder.take() {
            let _ = forwarder.join();
        }
        if let Err(error) = self.producer.flush(self.flush_timeout) {
            tracing::warn!(component = %self.component, %error, in_flight = self.producer.in_flight_count(), "kafka producer closed with records unacknowledged");
        }
        if let Some(buffer) = &self.buffer {
            if let Err(error) = buffer.sync() {
                tracing::error!(component = %self.component, %error, "store-and-forward buffer");
            }
            let stats = buffer.stats();
            tracing::info!(component = %self.component, buffered_records = stats.records, "kafka sink closed; what is buffered is sent at the next start");
        }
    }
}

fn producer(
    config: &KafkaSinkConfig,
    ctx: &ComponentContext,
    deliveries: Deliveries,
) -> Result<KafkaProducer, ComponentError> {
    let mut client = config.client.client_config(ctx);
    let buffered = config.buffer.is_some();
    client
        .set("client.id", format!("tidewatch-{}-{}", ctx.pipeline.name, ctx.component_id))
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", config.compression.name())
        .set("linger.ms", config.linger_ms.to_string())
        .set("retry.backoff.ms", config.retry_backoff_ms.to_string())
        .set("retry.backoff.max.ms", config.retry_backoff_max_ms.to_string())
        .set("queue.buffering.max.messages", config.queue_max_records.to_string())
        // With the buffer, a record waits (on disk and in the producer) until delivered.
        .set(
            "message.timeout.ms",
            if buffered { "0".to_owned() } else { config.delivery_timeout_ms.to_string() },
        );
    client
        .create_with_context(deliveries)
        .map_err(|error| ComponentError::Config(format!("kafka producer: {}", error_text(&error))))
}

/// Sends buffered records oldest first, keeping at most `window` in flight.
fn forward(
    buffer: &DiskBuffer,
    producer: &KafkaProducer,
    topic: &str,
    window: u64,
    in_flight: &AtomicU64,
    stop: &AtomicBool,
    metrics: &SinkMetrics,
) {
    let mut last_stats = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        if last_stats.elapsed() >= Duration::from_millis(200) {
            let stats = buffer.stats();
            metrics.buffer_records.set(stats.records as i64);
            metrics.buffer_bytes.set(stats.bytes as i64);
            last_stats = Instant::now();
        }
        let room = window.saturating_sub(in_flight.load(Ordering::SeqCst));
        if room == 0 {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let records = match buffer.next(room.min(1_000) as usize, Duration::from_millis(100)) {
            Ok(records) => records,
            Err(error) => {
                tracing::error!(%error, "cannot read the store-and-forward buffer; retrying");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        for record in records {
            in_flight.fetch_add(1, Ordering::SeqCst);
            let base: BaseRecord<'_, [u8], [u8], usize> =
                BaseRecord::with_opaque_to(topic, record.seq as usize).payload(&record.value);
            let base = with_key(base, record.key.as_deref(), &record.value);
            let mut pending = base;
            loop {
                match producer.send(pending) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        pending = back;
                        std::thread::sleep(Duration::from_millis(5));
                        if stop.load(Ordering::SeqCst) {
                            // Not sent: it stays in the buffer for the next start.
                            in_flight.fetch_sub(1, Ordering::SeqCst);
                            return;
                        }
                    }
                    Err((error, back)) => {
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                        let context = producer.context();
                        context.dead.write(
                            failure_reason(&error),
                            &error_text(&error),
                            back.key,
                            back.payload.unwrap_or_default(),
                        );
                        let _ = buffer.ack(record.seq);
                        break;
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The sink
// ---------------------------------------------------------------------------------------------

/// A running `kafka` sink instance (the workers' instances share one producer).
pub struct KafkaSink {
    shared: Arc<Shared>,
    buf: Vec<u8>,
    component: Arc<str>,
}

impl fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSink").field("topic", &self.shared.topic).finish_non_exhaustive()
    }
}

impl KafkaSink {
    /// The sink of one worker: the first worker's instance creates the producer (it connects
    /// in the background) and opens the buffer, the others share them.
    pub fn new(
        config: &KafkaSinkConfig,
        ctx: &ComponentContext,
    ) -> Result<KafkaSink, ComponentError> {
        config.validate().map_err(|error| ComponentError::Config(error.to_string()))?;
        let shared = per_component(ctx, |registry| {
            let metrics = SinkMetrics::new(&ctx.component_id)?;
            let registered = match registry {
                Some(registry) => Some(
                    Registered::all(registry.registry(), metrics.collectors())
                        .map_err(metric_error)?,
                ),
                None => None,
            };
            let file = DeadLetterFile::open(
                ctx.process_shared(),
                ctx.resolve_path(&config.dead_letter_path),
                &ctx.component_id,
                metrics.dead_letters.clone(),
            )?;
            let dead = DeadLetters { file, topic: config.topic.clone() };
            let buffer = match &config.buffer {
                Some(buffer) => {
                    let mut buffer = buffer.clone();
                    buffer.dir = ctx.resolve_path(&buffer.dir.to_string_lossy());
                    Some(Arc::new(DiskBuffer::open(buffer).map_err(|error| {
                        ComponentError::External(format!("store-and-forward buffer: {error}"))
                    })?))
                }
                None => None,
            };
            let in_flight = Arc::new(AtomicU64::new(0));
            let deliveries = Deliveries {
                dead,
                delivered: metrics.delivered.clone(),
                buffer: buffer.clone(),
                in_flight: Arc::clone(&in_flight),
            };
            let producer = Arc::new(producer(config, ctx, deliveries)?);
            let stop = Arc::new(AtomicBool::new(false));
            let forwarder = match &buffer {
                Some(buffer) => {
                    let (buffer, producer, stop, metrics) = (
                        Arc::clone(buffer),
                        Arc::clone(&producer),
                        Arc::clone(&stop),
                        metrics.clone(),
                    );
                    let topic = config.topic.clone();
                    let window = config.max_in_flight_records;
                    Some(
                        std::thread::Builder::new()
                            .name(format!("kafka-fwd-{}", ctx.component_id))
                            .spawn(move || {
                                forward(
                                    &buffer, &producer, &topic, window, &in_flight, &stop, &metrics,
                                );
                            })
                            .map_err(|error| {
                                ComponentError::io("cannot start the buffer's forwarder", error)
                            })?,
                    )
                }
                None => None,
            };
            Ok(Shared {
                producer,
                topic: config.topic.clone(),
                buffer,
                metrics,
                stop,
                forwarder,
                flush_timeout: Duration::from_millis(config.flush_timeout_ms),
                component: ctx.component_id.to_string(),
                _registered: registered,
            })
        })?;
        Ok(KafkaSink { shared, buf: Vec::new(), component: Arc::clone(&ctx.component_id) })
    }

    /// Produces one record, waiting while the producer's queue is full.
    fn send(&self, key: Option<&[u8]>, value: &[u8]) -> Result<(), ComponentError> {
        let record: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(&self.shared.topic, 0).payload(value);
        let mut record = with_key(record, key, value);
        let mut waited = Instant::now();
        loop {
            match self.shared.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // The brokers take less than the pipeline makes: wait (backpressure).
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                    if waited.elapsed() > Duration::from_secs(10) {
                        tracing::warn!(component = %self.component, "kafka producer queue full for 10 s; waiting");
                        waited = Instant::now();
                    }
                }
                Err((error, back)) => {
                    self.shared.producer.context().dead.write(
                        failure_reason(&error),
                        &error_text(&error),
                        back.key,
                        back.payload.unwrap_or_default(),
                    );
                    return Ok(());
                }
            }
        }
    }
}

/// The header a consumer dedupes by: the same for the same record produced again.
pub const DEDUPE_HEADER: &str = "tidewatch-dedupe-key";

/// Sets a record's key (its device) and its `tidewatch-dedupe-key` header.
fn with_key<'a>(
    record: BaseRecord<'a, [u8], [u8], usize>,
    key: Option<&'a [u8]>,
    value: &[u8],
) -> BaseRecord<'a, [u8], [u8], usize> {
    let mut hash = tidewatch_api::records::stable_hash(key.unwrap_or_default());
    hash ^= tidewatch_api::records::stable_hash(value).rotate_left(1);
    let headers = OwnedHeaders::new()
        .insert(Header { key: DEDUPE_HEADER, value: Some(&format!("{hash:016x}")) });
    let record = record.headers(headers);
    match key {
        Some(key) => record.key(key),
        None => record,
    }
}

impl Sink for KafkaSink {
    fn write_batch(&mut self, batch: Batch) -> Result<(), ComponentError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let encoded = match &batch {
            Batch::Readings(readings) => write_flat_readings(readings, &mut buf),
            other => write_json_lines(other, &mut buf),
        }
        .map_err(|error| ComponentError::io("cannot encode records as JSON", error));
        let result = encoded.and_then(|()| {
            let names: Vec<Option<std::sync::Arc<str>>> =
                record_devices(&batch).into_iter().map(|device| device.map(DeviceId::name)).collect();
            let lines = buf.split(|byte| *byte == b'\n').filter(|line| !line.is_empty());
            let records = lines.zip(names.iter()).map(|(line, name)| (name.as_deref().map(str::as_bytes), line));
            match &self.shared.buffer {
                Some(buffer) => {
                    let records: Vec<(Option<&[u8]>, &[u8])> = records.collect();
                    let dropped = buffer.append(records).map_err(|error| {
                        ComponentError::External(format!("store-and-forward buffer: {error}"))
                    })?;
                    if dropped > 0 {
                        let reason = self
                            .shared
                            .metrics
                            .buffer_dropped
                            .with_label_values(&[buffer_policy_reason(&self.shared)]);
                        reason.inc_by(dropped);
                        tracing::warn!(component = %self.component, dropped, "store-and-forward buffer full; records dropped");
                    }
                    Ok(())
                }
                None => {
                    for (key, value) in records {
                        self.send(key, value)?;
                    }
                    Ok(())
                }
            }
        });
        self.buf = buf;
        result
    }

    fn flush(&mut self) -> Result<(), ComponentError> {
        if self.shared.buffer.is_some() {
            // Durable once in the buffer; the forwarder sends on its own.
            return Ok(());
        }
        self.shared.producer.flush(self.shared.flush_timeout).map_err(|error| {
            ComponentError::External(format!(
                "kafka: {} records not acknowledged within {} ms: {}",
                self.shared.producer.in_flight_count(),
                self.shared.flush_timeout.as_millis(),
                error_text(&error)
            ))
        })
    }
}

/// Readings as flat JSON objects, one line each (see the module documentation).
fn write_flat_readings(readings: &ReadingBatch, out: &mut Vec<u8>) -> std::io::Result<()> {
    let names = readings.schema.names();
    for reading in readings.iter() {
        let mut object = serde_json::Map::with_capacity(names.len() + 3);
        object.insert("device".into(), reading.device.name().as_ref().into());
        object.insert("ts".into(), reading.time_ms.into());
        for (name, value) in names.iter().zip(reading.values) {
            let value = serde_json::Number::from_f64(f64::from(*value))
                .map_or(serde_json::Value::Null, serde_json::Value::Number);
            object.insert(name.to_string(), value);
        }
        object.insert("anomaly".into(), reading.label.into());
        serde_json::to_writer(&mut *out, &object).map_err(std::io::Error::from)?;
        out.push(b'\n');
    }
    Ok(())
}

fn buffer_policy_reason(shared: &Shared) -> &'static str {
    shared.buffer.as_ref().map_or("buffer_full", |buffer| buffer.policy().reason())
}

#[cfg(test)]
mod tests {
    use tidewatch_api::{ConfigValue, LABEL_ANOMALY, Schema};

    use super::*;

    fn config(text: &str) -> KafkaSinkConfig {
        ConfigValue::parse(text).expect("toml").deserialize().expect("config")
    }

    #[test]
    fn options_are_checked() {
        let ctx = ValidateContext::default();
        assert!(KafkaSinkFactory.validate(&config("topic = \"readings\""), &ctx).is_ok());
        for (text, field) in [
            ("topic = \"a/b\"", "topic"),
            ("topic = \"\"", "topic"),
            ("topic = \"t\"\nbrokers = \"nowhere\"", "brokers"),
            ("topic = \"t\"\nflush_timeout_ms = 0", "flush_timeout_ms"),
            (
                "topic = \"t\"\nretry_backoff_ms = 500\nretry_backoff_max_ms = 100",
                "retry_backoff_max_ms",
            ),
            (
                "topic = \"t\"\n[buffer]\ndir = \"b\"\nmax_bytes = 1000\nsegment_bytes = 1024",
                "buffer.max_bytes",
            ),
            ("topic = \"t\"\n[tls]\nclient_key_file = \"k.pem\"", "tls.client_cert_file"),
        ] {
            let error = KafkaSinkFactory.validate(&config(text), &ctx).expect_err(text);
            assert_eq!(error.field.as_deref(), Some(field), "{text}");
        }
        let unknown = ConfigValue::parse("topic = \"t\"\n[buffer]\ndir = \"b\"\nmax_size = 3")
            .expect("toml")
            .deserialize::<KafkaSinkConfig>();
        assert!(unknown.is_err());
        let buffered = config("topic = \"t\"\n[buffer]\ndir = \"b\"\nwhen_full = \"drop_newest\"");
        assert_eq!(
            buffered.buffer.map(|buffer| buffer.when_full),
            Some(super::super::buffer::WhenFull::DropNewest)
        );
    }

    #[test]
    fn a_record_produced_again_has_the_same_dedupe_key() {
        use rdkafka::message::Headers as _;
        let dedupe = |key: Option<&[u8]>, value: &[u8]| -> Vec<u8> {
            let record: BaseRecord<'_, [u8], [u8], usize> =
                BaseRecord::with_opaque_to("t", 0).payload(value);
            let record = with_key(record, key, value);
            assert_eq!(record.key, key);
            let headers = record.headers.expect("headers");
            let header = headers.get(0);
            assert_eq!(header.key, DEDUPE_HEADER);
            header.value.expect("a value").to_vec()
        };
        let first = dedupe(Some(b"pump-7"), b"{\"ts\":1}");
        assert_eq!(first.len(), 16);
        assert_eq!(first, dedupe(Some(b"pump-7"), b"{\"ts\":1}"));
        assert_ne!(first, dedupe(Some(b"pump-8"), b"{\"ts\":1}"));
        assert_ne!(first, dedupe(Some(b"pump-7"), b"{\"ts\":2}"));
        assert_ne!(first, dedupe(None, b"{\"ts\":1}"));
    }

    #[test]
    fn readings_travel_flat() {
        let schema = Arc::new(Schema::new(["vibration", "flow"]));
        let mut readings = ReadingBatch::new(schema);
        readings.push(
            DeviceId::intern("pump-7"),
            1_700_000_000_000,
            &[0.5, f32::NAN],
            LABEL_ANOMALY,
        );
        let mut out = Vec::new();
        write_flat_readings(&readings, &mut out).expect("encode");
        let value: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(
            value,
            json!({"device": "pump-7", "ts": 1_700_000_000_000_i64, "vibration": 0.5, "flow": null, "anomaly": 1})
        );
        assert_eq!(out.last(), Some(&b'\n'));
    }
}
