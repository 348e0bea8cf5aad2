//! The catalog on a Kafka compacted topic: key = device id (UTF-8), value = one JSON row (a
//! line of a JSON-lines catalog), a tombstone (no value) deletes the device's row.
//!
//! Every worker reads the whole topic: a `BaseConsumer` assigned every partition from the
//! beginning, outside any consumer group (nothing is committed; a restart reads the topic
//! again, which the compaction keeps short). [`KeyedCatalog`] turns each record into the
//! difference against the row its key held. A value whose `device` is not the key is refused
//! (reported, and the key holds no row): with key = device, two records can never both hold a
//! device, and the compaction keeps exactly the row the source keeps.
//!
//! With `watch = false` the source finishes once every partition is read to the end offset it
//! had when the source started (a bounded replay); otherwise it never finishes. The topic's
//! partitions are read when the source starts (and, while the topic does not exist yet, every
//! half second until it does): partitions added later are read after a restart.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::Deserialize;
use tidewatch_api::catalog::CatalogUpdate;
use tidewatch_api::{ComponentContext, ComponentError, ConfigError, Outputs, Source, SourcePoll};

use super::CatalogSourceConfig;
use super::keyed::{KeyedCatalog, emit_updates};
use crate::kafka::{KafkaClientOptions, error_text};

/// Most records read per poll.
const BATCH: usize = 1_024;

/// The `kafka` table of a `catalog` source: the client options of the `kafka` source
/// (`brokers`, `tls`, `sasl`, `librdkafka`) and the topic.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaCatalogConfig {
    /// How the client reaches the brokers: `brokers`, `tls`, `sasl`, `librdkafka`.
    #[serde(flatten)]
    pub client: KafkaClientOptions,
    /// The compacted topic of catalog rows, keyed by device id.
    pub topic: String,
}

impl KafkaCatalogConfig {
    /// Checks the options beyond their types (errors name them as in the table).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.client.validate()?;
        if self.topic.trim().is_empty() {
            return Err(ConfigError::at_field("topic", "topic must name the catalog's topic")
                .with_hint("for example topic = \"device-catalog\""));
        }
        Ok(())
    }
}

/// A `catalog` source reading a Kafka compacted topic (see the module documentation).
pub struct KafkaCatalogSource {
    config: KafkaCatalogConfig,
    ctx: ComponentContext,
    watch: bool,
    consumer: Option<BaseConsumer>,
    /// The partitions read, once the topic's metadata named them.
    partitions: Option<Vec<i32>>,
    /// `watch = false`: each partition's end offset when it was assigned.
    ends: BTreeMap<i32, i64>,
    /// The next offset of each partition (after the last record read).
    next: BTreeMap<i32, i64>,
    /// Partitions that reported their end (librdkafka's partition EOF).
    at_eof: BTreeSet<i32>,
    assign_retry: Option<Instant>,
    catalog: KeyedCatalog,
    last_data: Instant,
}

impl fmt::Debug for KafkaCatalogSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaCatalogSource")
            .field("brokers", &self.config.client.brokers)
            .field("topic", &self.config.topic)
            .field("partitions", &self.partitions)
            .field("devices", &self.catalog.len())
            .finish_non_exhaustive()
    }
}

impl KafkaCatalogSource {
    /// The source of one worker; it connects at [`Source::open`].
    pub fn new(
        config: &KafkaCatalogConfig,
        source: &CatalogSourceConfig,
        ctx: &ComponentContext,
    ) -> KafkaCatalogSource {
        KafkaCatalogSource {
            config: config.clone(),
            ctx: ctx.clone(),
            watch: source.watch,
            consumer: None,
            partitions: None,
            ends: BTreeMap::new(),
            next: BTreeMap::new(),
            at_eof: BTreeSet::new(),
            assign_retry: None,
            catalog: KeyedCatalog::new(true),
            last_data: Instant::now(),
        }
    }

    /// The number of devices with a row now.
    pub fn devices(&self) -> usize {
        self.catalog.len()
    }

    /// Assigns every partition of the topic from its beginning, once the topic has some;
    /// `watch = false` notes their end offsets first.
    fn assign(&mut self) -> Result<(), ComponentError> {
        let Some(consumer) = &self.consumer else { return Ok(()) };
        let topic = self.config.topic.as_str();
        let metadata = match consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
            Ok(metadata) => metadata,
            Err(error) => {
                tracing::debug!(component = %self.ctx.component_id, topic, error = %error_text(&error), "no metadata for the catalog topic yet");
                return Ok(());
            }
        };
        let mut partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|found| found.name() == topic && found.error().is_none())
            .flat_map(|found| found.partitions().iter().map(|partition| partition.id()))
            .collect();
        if partitions.is_empty() {
            // Not created yet: try again at a later poll.
            tracing::debug!(component = %self.ctx.component_id, topic, "the catalog topic has no partitions yet");
            return Ok(());
        }
        partitions.sort_unstable();
        if !self.watch {
            for partition in &partitions {
                match consumer.fetch_watermarks(topic, *partition, Duration::from_secs(5)) {
                    Ok((_, high)) => {
                        self.ends.insert(*partition, high);
                    }
                    Err(error) => {
                        tracing::debug!(component = %self.ctx.component_id, topic, partition, error = %error_text(&error), "no end offset yet");
                        self.ends.clear();
                        return Ok(());
                    }
                }
            }
        }
        let mut list = TopicPartitionList::new();
        for partition in &partitions {
            list.add_partition_offset(topic, *partition, Offset::Beginning).map_err(|error| {
                ComponentError::Internal(format!("partition list: {}", error_text(&error)))
            })?;
        }
        consumer.assign(&list).map_err(|error| {
            ComponentError::External(format!(
                "cannot assign the partitions of {topic}: {}",
                error_text(&error)
            ))
        })?;
        tracing::info!(component = %self.ctx.component_id, worker = self.ctx.worker_index, topic, partitions = ?partitions, "reading the catalog topic from the beginning");
        self.partitions = Some(partitions);
        Ok(())
    }

    /// `watch = false`: every partition read up to its end offset at assignment.
    fn at_end(&self) -> bool {
        let Some(partitions) = &self.partitions else { return false };
        partitions.iter().all(|partition| {
            let end = self.ends.get(partition).copied().unwrap_or(0);
            self.at_eof.contains(partition) || self.next.get(partition).copied().unwrap_or(0) >= end
        })
    }
}

impl Source for KafkaCatalogSource {
    fn open(&mut self, ctx: &ComponentContext) -> Result<(), ComponentError> {
        let mut client = self.config.client.client_config(ctx);
        // Outside any group: nothing is committed, every worker reads every partition. The
        // group id only satisfies librdkafka.
        let group = format!(
            "tidewatch-catalog-{}-{}-{}-{}",
            ctx.pipeline.name,
            ctx.component_id,
            ctx.worker_index,
            std::process::id()
        );
        client
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest");
        if !self.config.client.librdkafka.contains_key("allow.auto.create.topics") {
            client.set("allow.auto.create.topics", "true");
        }
        let consumer: BaseConsumer = client.create().map_err(|error| {
            ComponentError::Config(format!("kafka consumer: {}", error_text(&error)))
        })?;
        self.consumer = Some(consumer);
        self.assign()
    }

    fn poll(&mut self, out: &mut Outputs) -> Result<SourcePoll, ComponentError> {
        if self.ctx.shutdown_requested() {
            return Ok(SourcePoll::Finished);
        }
        if self.partitions.is_none() {
            if self.assign_retry.is_some_and(|at| Instant::now() < at) {
                return Ok(SourcePoll::Idle { wake_after_ms: 100 });
            }
            self.assign()?;
            if self.partitions.is_none() {
                self.assign_retry = Some(Instant::now() + Duration::from_millis(500));
                return Ok(SourcePoll::Idle { wake_after_ms: 100 });
            }
        }
        let Some(consumer) = &self.consumer else { return Ok(SourcePoll::Finished) };
        let mut updates: Vec<CatalogUpdate> = Vec::new();
        let mut read = 0;
        while read < BATCH {
            let Some(next) = consumer.poll(Duration::ZERO) else { break };
            read += 1;
            let message = match next {
                Ok(message) => message,
                Err(KafkaError::PartitionEOF(partition)) => {
                    self.at_eof.insert(partition);
                    continue;
                }
                Err(error) => {
                    // Transient (a broker down): librdkafka recovers by itself.
                    out.error("kafka_consumer", error_text(&error), Some(&self.config.topic), None);
                    break;
                }
            };
            self.next.insert(message.partition(), message.offset() + 1);
            self.at_eof.remove(&message.partition());
            let Some(key) = message.key() else {
                out.error(
                    "catalog",
                    "a catalog record without a key (the key is the device id)",
                    Some(message.topic()),
                    message.payload(),
                );
                continue;
            };
            let Ok(key) = std::str::from_utf8(key) else {
                out.error(
                    "catalog",
                    "the record's key is not UTF-8 text",
                    Some(message.topic()),
                    message.payload(),
                );
                continue;
            };
            let applied = self.catalog.apply(key, message.payload());
            if let Some(error) = applied.error {
                out.error("catalog", error.to_string(), Some(message.topic()), message.payload());
            }
            updates.extend(applied.updates);
        }
        if read > 0 {
            self.last_data = Instant::now();
        }
        emit_updates(out, updates);
        if !self.watch && self.at_end() {
            tracing::info!(component = %self.ctx.component_id, devices = self.catalog.len(), "the catalog topic is read to its end");
            return Ok(SourcePoll::Finished);
        }
        if read >= BATCH {
            return Ok(SourcePoll::Ready);
        }
        let quiet = self.last_data.elapsed() > Duration::from_millis(200);
        Ok(SourcePoll::Idle { wake_after_ms: if quiet { 50 } else { 1 } })
    }

    /// Ready once the topic's partitions are assigned.
    fn ready(&self) -> bool {
        self.partitions.is_some()
    }

    fn close(&mut self) -> Result<(), ComponentError> {
        self.consumer = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tidewatch_api::ConfigValue;

    use super::*;

    fn config(text: &str) -> Result<CatalogSourceConfig, ConfigError> {
        ConfigValue::parse(text)?.deserialize::<CatalogSourceConfig>()
    }

    #[test]
    fn the_kafka_table_takes_the_client_options_and_a_topic() {
        let parsed = config(
            "kafka = { brokers = \"k1:9092,k2:9092\", topic = \"device-catalog\", \
             librdkafka = { \"socket.keepalive.enable\" = \"true\" } }\nwatch = false",
        )
        .expect("config");
        parsed.validate().expect("valid");
        let kafka = parsed.kafka.as_ref().expect("kafka");
        assert_eq!(kafka.client.brokers, "k1:9092,k2:9092");
        assert_eq!(kafka.topic, "device-catalog");
        assert!(!parsed.watch);
        let error = config("kafka = { topic = \"t\", group_id = \"g\" }").expect_err("unknown");
        assert!(error.message.contains("group_id"), "{}", error.message);
        for (text, field) in [
            ("kafka = { brokers = \"nope\", topic = \"t\" }", "kafka.brokers"),
            ("kafka = { topic = \" \" }", "kafka.topic"),
            (
                "kafka = { topic = \"t\", librdkafka = { \"group.id\" = \"x\" } }",
                "kafka.librdkafka",
            ),
            ("kafka = { topic = \"t\" }\nformat = \"csv\"", "format"),
            ("kafka = { topic = \"t\" }\npath = \"devices.csv\"", "kafka"),
        ] {
            let error = config(text).expect("parses").validate().expect_err(text);
            assert_eq!(error.field.as_deref(), Some(field), "{text}: {}", error.message);
        }
    }
}
