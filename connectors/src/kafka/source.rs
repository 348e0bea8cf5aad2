//! The `kafka` source: a consumer group member per worker; raw messages with key, headers,
//! partition, offset and timestamp; offsets committed only for records safely downstream.
//!
//! # Partitions and workers
//!
//! Every timely worker of every process runs one consumer, all in the group `group_id`, and
//! the group coordinator spreads the topic's partitions over them (cooperative-sticky
//! assignment, so a member joining or leaving moves only the partitions it must). A worker
//! without a partition (more workers than partitions) stays idle and adopts its siblings'
//! watermark (`idle_timeout_ms`), so it holds nothing back.
//!
//! # Offsets: at-least-once
//!
//! Automatic offset *storing* is off. Every emitted [`RawBatch`] carries an [`AckToken`];
//! when the engine drops the batch's last copy (after the consuming operators processed it)
//! the token reports the batch's greatest offset per partition back to the source, which
//! stores `offset + 1` for the partition, in emission order. librdkafka commits the stored
//! offsets every `commit_interval_ms`, and the source commits synchronously at close. A
//! crash loses nothing: what was not stored is consumed again (at-least-once). The stored
//! positions are what [`Source::snapshot`] returns, and [`Source::restore`] seeks to them at
//! the next assignment: the checkpoint issue keeps them in checkpoints with no change here.
//!
//! # Checkpoints: exactly-once positions
//!
//! When the pipeline takes checkpoints, the source does not join a group: it reads the
//! topics' partitions from the broker and assigns itself every `workers`-th one (worker `i`
//! takes partitions `i`, `i + workers`, ... of the sorted `(topic, partition)` list), so a
//! partition never moves in the middle of an epoch. [`Source::snapshot`] is then the position
//! after the last message *emitted* per partition, the checkpoint holds it, and a restart
//! (with any number of workers) seeks every partition there. The group's committed offsets
//! follow the checkpoints ([`Source::commit`]), for lag monitoring; they start a pipeline
//! that has no checkpoint yet.
//!
//! # Reading to the end
//!
//! With `stop_at_end = true` each worker finishes once its partitions are read up to the end
//! offsets they had when it got them (a bounded replay of a topic). The partitions are then
//! assigned as with checkpoints (a fixed share per worker, not the group protocol): a
//! rebalance would hand a finished worker's partitions around.
//!
//! # Flow control
//!
//! At most `max_in_flight_records` records are emitted and not yet acknowledged; beyond it
//! the consumer pauses its partitions (it keeps polling, so it stays in the group) and resumes
//! them once half of them were acknowledged. Memory stays bounded however slow the pipeline.
//!
//! # Lag and readiness
//!
//! librdkafka's statistics (every `statistics_interval_ms`) give the consumer lag of every
//! assigned partition: exported as `tidewatch_kafka_consumer_lag{component_id, topic,
//! partition}`, and their sum as the source's [`Backlog`] against `max_lag_records`, which
//! drives the shipped `TidewatchConsumerLag` alert. The source is ready once its consumer
//! received its first assignment (possibly empty: more workers than partitions).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use prometheus::{IntGaugeVec, Opts};
use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::message::{Headers, Message};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tidewatch_api::records::now_ms;
use tidewatch_api::{
    AckToken, Backlog, Batch, ComponentContext, ComponentError, ConfigError, Kind, MessageExtras,
    Outputs, PortType, RawBatch, Source, SourceFactory, SourcePoll, ValidateContext,
};

use super::{KafkaClientOptions, error_text};
use crate::shared::{Registered, per_component};

fn default_batch_size() -> usize {
    1_024
}
fn default_commit_interval_ms() -> u64 {
    1_000
}
fn default_session_timeout_ms() -> u64 {
    10_000
}
fn default_statistics_interval_ms() -> u64 {
    1_000
}
fn default_max_in_flight_records() -> u64 {
    50_000
}
fn default_max_lag_records() -> u64 {
    100_000
}

/// Where a group without a committed offset starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    /// The oldest message the broker keeps.
    #[default]
    Earliest,
    /// Only messages produced from now on.
    Latest,
}

/// Options of the `kafka` source.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// How the client reaches the brokers: `brokers`, `tls`, `sasl`, `librdkafka`.
    #[serde(flatten)]
    pub client: KafkaClientOptions,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// Consumer group; default `tidewatch-<pipeline>-<component>`. Pipelines in one group
    /// split the partitions between them.
    #[serde(default)]
    pub group_id: Option<String>,
    /// Where a group without committed offsets starts: `earliest` or `latest`.
    #[serde(default)]
    pub start_from: StartFrom,
    /// Most messages emitted per poll (the batch size).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// How often stored offsets (records safely downstream) are committed, ms.
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// How long the group waits for a silent member before moving its partitions, ms.
    #[serde(default = "default_session_timeout_ms")]
    pub session_timeout_ms: u64,
    /// How often librdkafka reports statistics (consumer lag), ms.
    #[serde(default = "default_statistics_interval_ms")]
    pub statistics_interval_ms: u64,
    /// Records emitted and not yet processed downstream beyond which the partitions pause.
    #[serde(default = "default_max_in_flight_records")]
    pub max_in_flight_records: u64,
    /// The consumer lag (records, per worker) reported as the backlog's capacity: the
    /// `TidewatchConsumerLag` alert fires when the lag stays above 80 % of it.
    #[serde(default = "default_max_lag_records")]
    pub max_lag_records: u64,
    /// Finish once the partitions are read up to the end offsets they had when assigned,
    /// instead of waiting for more.
    #[serde(default)]
    pub stop_at_end: bool,
}

impl KafkaSourceConfig {
    /// A config for `topics` on `brokers`, every other option at its default.
    pub fn new(brokers: impl Into<String>, topics: Vec<String>) -> KafkaSourceConfig {
        KafkaSourceConfig {
            client: KafkaClientOptions::new(brokers),
            topics,
            group_id: None,
            start_from: StartFrom::default(),
            batch_size: default_batch_size(),
            commit_interval_ms: default_commit_interval_ms(),
            session_timeout_ms: default_session_timeout_ms(),
            statistics_interval_ms: default_statistics_interval_ms(),
            max_in_flight_records: default_max_in_flight_records(),
            max_lag_records: default_max_lag_records(),
            stop_at_end: false,
        }
    }

    /// Checks the options beyond their types.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.client.validate()?;
        if self.topics.is_empty() || self.topics.iter().any(|topic| topic.trim().is_empty()) {
            return Err(ConfigError::at_field("topics", "topics must name at least one topic")
                .with_hint("for example topics = [\"readings\"]"));
        }
        for (field, value) in [
            ("batch_size", self.batch_size as u64),
            ("commit_interval_ms", self.commit_interval_ms),
            ("session_timeout_ms", self.session_timeout_ms),
            ("statistics_interval_ms", self.statistics_interval_ms),
            ("max_in_flight_records", self.max_in_flight_records),
            ("max_lag_records", self.max_lag_records),
        ] {
            if value == 0 {
                return Err(ConfigError::at_field(field, format!("{field} must be at least 1")));
            }
        }
        Ok(())
    }

    /// The consumer group of the component `ctx` runs.
    pub fn group(&self, ctx: &ComponentContext) -> String {
        self.group_id
            .clone()
            .unwrap_or_else(|| format!("tidewatch-{}-{}", ctx.pipeline.name, ctx.component_id))
    }
}

/// Makes `kafka` sources.
#[derive(Clone, Copy, Debug, Default)]
pub struct KafkaSourceFactory;

impl SourceFactory for KafkaSourceFactory {
    type Config = KafkaSourceConfig;

    fn output_type(
        &self,
        config: &KafkaSourceConfig,
        _ctx: &ValidateContext,
    ) -> Result<PortType, ConfigError> {
        config.validate()?;
        Ok(PortType::of(Kind::Raw))
    }

    fn build(
        &self,
        config: &KafkaSourceConfig,
        ctx: &ComponentContext,
    ) -> Result<Box<dyn Source>, ComponentError> {
        Ok(Box::new(KafkaSource::new(config, ctx)?))
    }
}

// ---------------------------------------------------------------------------------------------
// Offsets
// ---------------------------------------------------------------------------------------------

/// A topic and partition.
type PartitionKey = (String, i32);

/// The next offset to consume per partition: what is safely downstream, in the shape
/// [`Source::snapshot`] returns (JSON).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Positions {
    /// `topic -> partition -> next offset`.
    pub topics: BTreeMap<String, BTreeMap<i32, i64>>,
}

impl Positions {
    fn set(&mut self, (topic, partition): &PartitionKey, next: i64) {
        self.topics.entry(topic.clone()).or_default().insert(*partition, next);
    }

    /// Keeps the greater position of every partition in `self` or `other` (positions only
    /// move forward: the greater one is the later).
    fn merge(&mut self, other: &Positions) {
        for (topic, partitions) in &other.topics {
            let mine = self.topics.entry(topic.clone()).or_default();
            for (partition, next) in partitions {
                let entry = mine.entry(*partition).or_insert(*next);
                *entry = (*entry).max(*next);
            }
        }
    }

    fn get(&self, topic: &str, partition: i32) -> Option<i64> {
        self.topics.get(topic)?.get(&partition).copied()
    }
}

/// Orders the acknowledgements of emitted batches: batch `seq` covers the offsets in its map
/// (greatest offset per partition); positions advance only over a prefix of done batches, so
/// an offset is never stored past a batch still in the pipeline.
#[derive(Debug, Default)]
pub(crate) struct AckOrder {
    next_seq: u64,
    issued: u64,
    done: BTreeMap<u64, (u64, Vec<(PartitionKey, i64)>)>,
}

impl AckOrder {
    /// A number for the next emitted batch.
    pub(crate) fn issue(&mut self) -> u64 {
        let seq = self.issued;
        self.issued += 1;
        seq
    }

    /// Batch `seq` (of `records` records, greatest offsets `offsets`) is done with; returns
    /// the positions (next offsets) that became safe, and the records they cover.
    pub(crate) fn done(
        &mut self,
        seq: u64,
        records: u64,
        offsets: Vec<(PartitionKey, i64)>,
    ) -> (Vec<(PartitionKey, i64)>, u64) {
        self.done.insert(seq, (records, offsets));
        let mut safe: HashMap<PartitionKey, i64> = HashMap::new();
        let mut covered = 0;
        while let Some((records, offsets)) = self.done.remove(&self.next_seq) {
            self.next_seq += 1;
            covered += records;
            for (key, offset) in offsets {
                let next = safe.entry(key).or_insert(offset + 1);
                *next = (*next).max(offset + 1);
            }
        }
        (safe.into_iter().collect(), covered)
    }

    /// Batches emitted and not yet done with.
    pub(crate) fn outstanding(&self) -> u64 {
        self.issued - self.next_seq
    }
}

// ---------------------------------------------------------------------------------------------
// The consumer's context: rebalances, statistics
// ---------------------------------------------------------------------------------------------

/// Per-process collectors of one `kafka` source component.
struct SourceMetrics {
    lag: IntGaugeVec,
    _registered: Option<Registered>,
}

impl fmt::Debug for SourceMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceMetrics").finish_non_exhaustive()
    }
}

/// What librdkafka's callbacks (run inside `poll`) share with the source.
struct Callbacks {
    component: Arc<str>,
    assigned: AtomicBool,
    /// Set by a rebalance: the source re-reads its assignment.
    changed: AtomicBool,
    lag: Mutex<HashMap<PartitionKey, i64>>,
    /// Positions to start from at the next assignment ([`Source::restore`]).
    restore: Mutex<Positions>,
    metrics: Arc<SourceMetrics>,
}

impl ClientContext for Callbacks {
    fn stats(&self, statistics: Statistics) {
        let mut lag = self.lag.lock().unwrap_or_else(PoisonError::into_inner);
        lag.clear();
        for (topic, stats) in &statistics.topics {
            for (partition, stats) in &stats.partitions {
                // Partition -1 is librdkafka's internal "unassigned" queue; -1 lag: unknown.
                if *partition < 0 || stats.consumer_lag < 0 {
                    continue;
                }
                let fetching =
                    matches!(stats.fetch_state.as_str(), "active" | "offset-query" | "offset-wait");
                if !fetching {
                    continue;
                }
                lag.insert((topic.clone(), *partition), stats.consumer_lag);
                let partition = partition.to_string();
                self.metrics
                    .lag
                    .with_label_values(&[topic.as_str(), partition.as_str()])
                    .set(stats.consumer_lag);
            }
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::warn!(component = %self.component, error = %error, reason, "kafka consumer error");
    }
}

impl ConsumerContext for Callbacks {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            let mut lag = self.lag.lock().unwrap_or_else(PoisonError::into_inner);
            for element in partitions.elements() {
                let key = (element.topic().to_owned(), element.partition());
                lag.remove(&key);
                let partition = element.partition().to_string();
                let _ = self.metrics.lag.remove_label_values(&[element.topic(), &partition]);
            }
            tracing::info!(component = %self.component, partitions = partitions.count(), "kafka partitions revoked");
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => {
                let listed: Vec<String> = partitions
                    .elements()
                    .iter()
                    .map(|element| format!("{}/{}", element.topic(), element.partition()))
                    .collect();
                tracing::info!(component = %self.component, partitions = ?listed, "kafka partitions assigned");
                let restore = self.restore.lock().unwrap_or_else(PoisonError::into_inner);
                for element in partitions.elements() {
                    if let Some(next) = restore.get(element.topic(), element.partition()) {
                        let seek = consumer.seek(
                            element.topic(),
                            element.partition(),
                            Offset::Offset(next),
                            Duration::from_secs(5),
                        );
                        if let Err(error) = seek {
                            tracing::warn!(component = %self.component, %error, "cannot seek to the restored offset");
                        }
                    }
                }
                self.assigned.store(true, Ordering::SeqCst);
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => {
                tracing::warn!(component = %self.component, %error, "kafka rebalance failed");
            }
        }
        self.changed.store(true, Ordering::SeqCst);
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(error) = result {
            // No new offsets to commit is not an error worth a line.
            if !matches!(
                error.rdkafka_error_code(),
                Some(rdkafka::types::RDKafkaErrorCode::NoOffset)
            ) {
                tracing::warn!(component = %self.component, %error, "kafka offset commit failed");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The source
// ---------------------------------------------------------------------------------------------

/// What an ack token reports: batch `seq` of `records` records, its greatest offsets.
type Done = (u64, u64, Vec<(PartitionKey, i64)>);

/// A running `kafka` source instance (one per worker).
pub struct KafkaSource {
    config: KafkaSourceConfig,
    group: String,
    client_id: String,
    consumer: Option<BaseConsumer<Callbacks>>,
    metrics: Arc<SourceMetrics>,
    component: Arc<str>,
    order: AckOrder,
    done_tx: mpsc::Sender<Done>,
    done_rx: mpsc::Receiver<Done>,
    /// Records emitted and not yet acknowledged.
    in_flight: Arc<AtomicU64>,
    paused: bool,
    stored: Positions,
    restored: Positions,
    assignment: TopicPartitionList,
    last_data: Instant,
    received: u64,
    /// Checkpoint mode: partitions assigned by the source itself, positions of what it
    /// emitted.
    checkpointed: bool,
    /// Partitions assigned by the source itself (checkpoints, `stop_at_end`), not the group.
    static_assignment: bool,
    worker: usize,
    workers: usize,
    /// Checkpoint mode: the partitions assigned (after the first poll).
    manual: Option<Vec<PartitionKey>>,
    /// The position after the last message emitted, per partition.
    emitted: Positions,
    /// The positions of the last snapshot (committed once its checkpoint is durable).
    snapshotted: Positions,
    /// `stop_at_end`: the end offset of each assigned partition when it was assigned.
    ends: HashMap<PartitionKey, i64>,
    /// Checkpoint mode: when to try again to assign partitions of a topic not created yet,
    /// or whose group's committed offsets could not be read yet.
    assign_retry: Option<Instant>,
    /// Static assignment: the group's committed offset of each assigned partition that has
    /// one and no restored position.
    committed: HashMap<PartitionKey, i64>,
}

impl fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSource")
            .field("brokers", &self.config.client.brokers)
            .field("topics", &self.config.topics)
            .field("group", &self.group)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

fn metric_error(error: prometheus::Error) -> ComponentError {
    ComponentError::Internal(format!("kafka metric: {error}"))
}

impl KafkaSource {
    /// The source of one worker; it joins the group at [`Source::open`].
    pub fn new(
        config: &KafkaSourceConfig,
        ctx: &ComponentContext,
    ) -> Result<KafkaSource, ComponentError> {
        config.validate().map_err(|error| ComponentError::Config(error.to_string()))?;
        let metrics = per_component(ctx, |registry| {
            let lag = IntGaugeVec::new(
                Opts::new(
                    "tidewatch_kafka_consumer_lag",
                    "Messages in a partition not yet consumed by this group member.",
                )
                .const_label("component_id", ctx.component_id.to_string()),
                &["topic", "partition"],
            )
            .map_err(metric_error)?;
            let registered = match registry {
                Some(registry) => Some(
                    Registered::all(registry.registry(), vec![Box::new(lag.clone())])
                        .map_err(metric_error)?,
                ),
                None => None,
            };
            Ok(SourceMetrics { lag, _registered: registered })
        })?;
        let (done_tx, done_rx) = mpsc::channel();
        Ok(KafkaSource {
            config: config.clone(),
            group: config.group(ctx),
            client_id: format!(
                "tidewatch-{}-{}-{}-{}",
                ctx.pipeline.name,
                ctx.component_id,
                std::process::id(),
                ctx.worker_index
            ),
            consumer: None,
            metrics,
            component: Arc::clone(&ctx.component_id),
            order: AckOrder::default(),
            done_tx,
            done_rx,
            in_flight: Arc::new(AtomicU64::new(0)),
            paused: false,
            stored: Positions::default(),
            restored: Positions::default(),
            assignment: TopicPartitionList::new(),
            last_data: Instant::now(),
            received: 0,
            checkpointed: ctx.pipeline.checkpoints,
            static_assignment: ctx.pipeline.checkpoints || config.stop_at_end,
            worker: ctx.worker_index,
            workers: ctx.workers.max(1),
            manual: None,
            emitted: Positions::default(),
            snapshotted: Positions::default(),
            ends: HashMap::new(),
            assign_retry: None,
            committed: HashMap::new(),
        })
    }

    /// Checkpoint mode (and `stop_at_end`): assigns this worker its share of the topics'
    /// partitions, each at its restored position (else the group's committed offset, else
    /// `start_from`).
    fn assign_own(&mut self) -> Result<(), ComponentError> {
        let Some(consumer) = &self.consumer else { return Ok(()) };
        let mut all: Vec<PartitionKey> = Vec::new();
        for topic in &self.config.topics {
            let metadata =
                consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).map_err(|error| {
                    ComponentError::External(format!(
                        "no metadata for topic {topic:?}: {}",
                        error_text(&error)
                    ))
                })?;
            let before = all.len();
            for found in metadata.topics() {
                for partition in found.partitions() {
                    all.push((found.name().to_owned(), partition.id()));
                }
            }
            if all.len() == before {
                // Not created yet (the broker creates it at the first produce or metadata
                // request): try again at a later poll.
                tracing::debug!(component = %self.component, topic, "no partitions yet");
                return Ok(());
            }
        }
        all.sort();
        let mine: Vec<PartitionKey> = all
            .into_iter()
            .enumerate()
            .filter(|(index, _)| index % self.workers == self.worker)
            .map(|(_, key)| key)
            .collect();
        // The group's committed offsets of the partitions that no checkpoint positions, read
        // here rather than left to librdkafka (`Offset::Stored`): on a broker that just
        // started, the group coordinator may not be ready, and a manually assigned partition
        // whose committed offset could not be fetched then waits forever. A failed lookup is
        // tried again at a later poll.
        let mut unknown = TopicPartitionList::new();
        for (topic, partition) in &mine {
            if self.restored.get(topic, *partition).is_none() {
                unknown.add_partition(topic, *partition);
            }
        }
        self.committed.clear();
        if unknown.count() > 0 {
            let found = match consumer.committed_offsets(unknown, Duration::from_secs(5)) {
                Ok(found) => found,
                Err(error) => {
                    tracing::info!(component = %self.component, error = %error_text(&error), "the group's committed offsets cannot be read yet; trying again");
                    return Ok(());
                }
            };
            for element in found.elements() {
                if let Offset::Offset(next) = element.offset() {
                    self.committed.insert((element.topic().to_owned(), element.partition()), next);
                }
            }
        }
        let mut list = TopicPartitionList::new();
        for (topic, partition) in &mine {
            let key = (topic.clone(), *partition);
            let offset = match (self.restored.get(topic, *partition), self.committed.get(&key)) {
                (Some(next), _) | (None, Some(&next)) => Offset::Offset(next),
                (None, None) => match self.config.start_from {
                    StartFrom::Earliest => Offset::Beginning,
                    StartFrom::Latest => Offset::End,
                },
            };
            list.add_partition_offset(topic, *partition, offset).map_err(|error| {
                ComponentError::Internal(format!("partition list: {}", error_text(&error)))
            })?;
        }
        consumer.assign(&list).map_err(|error| {
            ComponentError::External(format!("cannot assign partitions: {}", error_text(&error)))
        })?;
        tracing::info!(component = %self.component, worker = self.worker, partitions = ?mine, "kafka partitions assigned by the source (a fixed share per worker)");
        self.assignment = list;
        consumer.context().assigned.store(true, Ordering::SeqCst);
        self.manual = Some(mine);
        Ok(())
    }

    /// The partitions this worker reads now.
    fn assigned(&self) -> Vec<PartitionKey> {
        match &self.manual {
            Some(mine) => mine.clone(),
            None => self
                .assignment
                .elements()
                .iter()
                .map(|element| (element.topic().to_owned(), element.partition()))
                .collect(),
        }
    }

    /// `stop_at_end`: true once every assigned partition is read to its end offset.
    fn at_end(&mut self) -> bool {
        let Some(consumer) = &self.consumer else { return true };
        if !consumer.context().assigned.load(Ordering::SeqCst) {
            return false;
        }
        let assigned = self.assigned();
        for key in &assigned {
            if !self.ends.contains_key(key) {
                match consumer.fetch_watermarks(&key.0, key.1, Duration::from_secs(5)) {
                    Ok((low, high)) => {
                        self.ends.insert(key.clone(), high);
                        // Where reading starts: the restored position, else the group's
                        // committed offset, else `start_from`.
                        let start = self
                            .restored
                            .get(&key.0, key.1)
                            .or_else(|| self.committed.get(key).copied());
                        let start = start.unwrap_or(match self.config.start_from {
                            StartFrom::Earliest => low,
                            StartFrom::Latest => high,
                        });
                        self.emitted
                            .topics
                            .entry(key.0.clone())
                            .or_default()
                            .entry(key.1)
                            .or_insert(start);
                    }
                    Err(error) => {
                        tracing::debug!(component = %self.component, error = %error_text(&error), "no end offset yet");
                        return false;
                    }
                }
            }
        }
        let positions = consumer.position().unwrap_or_default();
        assigned.iter().all(|key| {
            let end = self.ends.get(key).copied().unwrap_or(0);
            let emitted = self.emitted.get(&key.0, key.1).unwrap_or(0);
            let position = positions
                .find_partition(&key.0, key.1)
                .and_then(|element| match element.offset() {
                    Offset::Offset(next) => Some(next),
                    _ => None,
                })
                .unwrap_or(0);
            emitted.max(position) >= end
        })
    }

    /// The consumer group this source joins.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// Stores the positions of every batch that became safe (acknowledged in order).
    fn store_done(&mut self) {
        let mut offsets = TopicPartitionList::new();
        while let Ok((seq, records, batch_offsets)) = self.done_rx.try_recv() {
            let (safe, covered) = self.order.done(seq, records, batch_offsets);
            self.in_flight
                .fetch_sub(covered.min(self.in_flight.load(Ordering::SeqCst)), Ordering::SeqCst);
            for (key, next) in safe {
                self.stored.set(&key, next);
                let _ = offsets.add_partition_offset(&key.0, key.1, Offset::Offset(next));
            }
        }
        if offsets.count() == 0 || self.checkpointed {
            // With checkpoints the group's offsets follow the checkpoints instead.
            return;
        }
        if let Some(consumer) = &self.consumer {
            // A partition revoked meanwhile refuses the store: its records go to the new owner
            // again (at-least-once).
            if let Err(error) = consumer.store_offsets(&offsets) {
                tracing::debug!(component = %self.component, %error, "offsets not stored (partitions moved)");
            }
        }
    }

    /// Pauses every assigned partition while too much is in flight; resumes below half.
    fn flow_control(&mut self) {
        let Some(consumer) = &self.consumer else { return };
        let in_flight = self.in_flight.load(Ordering::SeqCst);
        if consumer.context().changed.swap(false, Ordering::SeqCst) {
            self.assignment = consumer.assignment().unwrap_or_default();
            if self.paused {
                // Newly assigned partitions start fetching: pause them too.
                let _ = consumer.pause(&self.assignment);
            }
        }
        let limit = self.config.max_in_flight_records;
        if !self.paused && in_flight >= limit {
            if consumer.pause(&self.assignment).is_ok() {
                self.paused = true;
                tracing::debug!(component = %self.component, in_flight, "pausing kafka partitions");
            }
        } else if self.paused && in_flight <= limit / 2 && consumer.resume(&self.assignment).is_ok()
        {
            self.paused = false;
            tracing::debug!(component = %self.component, in_flight, "resuming kafka partitions");
        }
    }
}

/// librdkafka's prefetch bound for the consumer's local queue, in KiB (its default: 65536).
const PREFETCH_KBYTES: &str = "16384";
/// librdkafka's prefetch target per partition, in messages (its default: 100000).
const PREFETCH_MESSAGES: &str = "10000";

impl Source for KafkaSource {
    fn open(&mut self, ctx: &ComponentContext) -> Result<(), ComponentError> {
        let mut client = self.config.client.client_config(ctx);
        client
            .set("group.id", &self.group)
            .set("client.id", &self.client_id)
            .set("enable.auto.commit", if self.checkpointed { "false" } else { "true" })
            .set("enable.auto.offset.store", "false")
            .set("auto.commit.interval.ms", self.config.commit_interval_ms.to_string())
            .set("session.timeout.ms", self.config.session_timeout_ms.to_string())
            .set("statistics.interval.ms", self.config.statistics_interval_ms.to_string())
            .set(
                "auto.offset.reset",
                match self.config.start_from {
                    StartFrom::Earliest => "earliest",
                    StartFrom::Latest => "latest",
                },
            );
        // Defaults the `librdkafka` table may override: moving only the partitions that must
        // move at a rebalance, a topic that does not exist yet is created (with the broker's
        // default partitions) rather than waited for, and a prefetch queue sized for a small
        // box (librdkafka's own defaults let it prefetch 64 MB and 100000 messages a
        // partition ahead of a pipeline that is not taking them).
        for (name, value) in [
            ("partition.assignment.strategy", "cooperative-sticky"),
            ("allow.auto.create.topics", "true"),
            ("queued.max.messages.kbytes", PREFETCH_KBYTES),
            ("queued.min.messages", PREFETCH_MESSAGES),
        ] {
            if !self.config.client.librdkafka.contains_key(name) {
                client.set(name, value);
            }
        }
        let callbacks = Callbacks {
            component: Arc::clone(&self.component),
            assigned: AtomicBool::new(false),
            changed: AtomicBool::new(false),
            lag: Mutex::default(),
            restore: Mutex::new(self.restored.clone()),
            metrics: Arc::clone(&self.metrics),
        };
        let consumer: BaseConsumer<Callbacks> =
            client.create_with_context(callbacks).map_err(|error| {
                ComponentError::Config(format!("kafka consumer: {}", error_text(&error)))
            })?;
        let topics: Vec<&str> = self.config.topics.iter().map(String::as_str).collect();
        // Ask for each topic once: the broker creates a missing one (when it allows), so the
        // group can assign its partitions before anything was produced.
        for topic in &topics {
            if let Err(error) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
                tracing::warn!(component = %self.component, topic, error = %error_text(&error), "no metadata for the topic yet");
            }
        }
        if !self.static_assignment {
            consumer.subscribe(&topics).map_err(|error| {
                ComponentError::External(format!(
                    "cannot subscribe to {:?}: {}",
                    self.config.topics,
                    error_text(&error)
                ))
            })?;
        }
        tracing::info!(
            component = %self.component,
            brokers = %self.config.client.brokers,
            group = %self.group,
            topics = ?self.config.topics,
            "joining the kafka consumer group"
        );
        self.consumer = Some(consumer);
        Ok(())
    }

    fn poll(&mut self, out: &mut Outputs) -> Result<SourcePoll, ComponentError> {
        if self.static_assignment && self.manual.is_none() && self.consumer.is_some() {
            if self.assign_retry.is_some_and(|at| Instant::now() < at) {
                return Ok(SourcePoll::Idle { wake_after_ms: 100 });
            }
            // After `restore`: the positions to seek to are known now.
            self.assign_own()?;
            if self.manual.is_none() {
                self.assign_retry = Some(Instant::now() + Duration::from_millis(500));
                return Ok(SourcePoll::Idle { wake_after_ms: 100 });
            }
        }
        self.store_done();
        self.flow_control();
        if self.config.stop_at_end && self.at_end() {
            return Ok(SourcePoll::Finished);
        }
        let Some(consumer) = &self.consumer else {
            return Ok(SourcePoll::Finished);
        };
        let batch_size = self.config.batch_size;
        let mut batch = RawBatch::with_capacity(batch_size.min(1_024), 64 * 1024);
        let mut greatest: HashMap<PartitionKey, i64> = HashMap::new();
        let mut headers: Vec<(String, Vec<u8>)> = Vec::new();
        let arrival_ms = now_ms();
        while batch.len() < batch_size {
            // Serves rebalances and statistics too; never blocks.
            let Some(next) = consumer.poll(Duration::ZERO) else { break };
            let message = match next {
                Ok(message) => message,
                Err(error) => {
                    // Transient (broker down, rebalance): librdkafka recovers by itself.
                    out.error("kafka_consumer", error_text(&error), None, None);
                    break;
                }
            };
            let key = (message.topic().to_owned(), message.partition());
            let offset = message.offset();
            self.emitted.set(&key, offset + 1);
            let entry = greatest.entry(key).or_insert(offset);
            *entry = (*entry).max(offset);
            let Some(payload) = message.payload().filter(|payload| !payload.is_empty()) else {
                out.error(
                    "empty_payload",
                    "the message has an empty payload",
                    Some(message.topic()),
                    None,
                );
                continue;
            };
            headers.clear();
            if let Some(list) = message.headers() {
                for header in list.iter() {
                    headers
                        .push((header.key.to_owned(), header.value.unwrap_or_default().to_vec()));
                }
            }
            let borrowed: Vec<(&str, &[u8])> =
                headers.iter().map(|(name, value)| (name.as_str(), value.as_slice())).collect();
            let extras = MessageExtras {
                key: message.key(),
                partition: u32::try_from(message.partition()).ok(),
                timestamp_ms: message.timestamp().to_millis(),
                headers: &borrowed,
            };
            batch.push_with_extras(
                message.topic(),
                payload,
                arrival_ms,
                u64::try_from(offset).unwrap_or_default(),
                &extras,
            );
        }
        let got = greatest.len();
        if got > 0 {
            self.last_data = Instant::now();
            let records = batch.len() as u64;
            self.received += records;
            let seq = self.order.issue();
            let offsets: Vec<(PartitionKey, i64)> = greatest.into_iter().collect();
            if batch.is_empty() {
                // Nothing went downstream (every message was rejected to `.errors`).
                let _ = self.done_tx.send((seq, 0, offsets));
            } else {
                self.in_flight.fetch_add(records, Ordering::SeqCst);
                let done = self.done_tx.clone();
                batch.set_ack(AckToken::new(move || {
                    let _ = done.send((seq, records, offsets));
                }));
            }
        }
        let full = batch.len() >= batch_size;
        out.emit(Batch::Raw(batch));
        if full {
            return Ok(SourcePoll::Ready);
        }
        let quiet = self.last_data.elapsed() > Duration::from_millis(200);
        Ok(SourcePoll::Idle { wake_after_ms: if quiet { 20 } else { 1 } })
    }

    /// The consumer lag of this member's partitions (from librdkafka's statistics) against
    /// `max_lag_records`.
    fn backlog(&self) -> Option<Backlog> {
        let callbacks = self.consumer.as_ref()?.context();
        let lag = callbacks.lag.lock().unwrap_or_else(PoisonError::into_inner);
        let records = lag.values().map(|lag| u64::try_from(*lag).unwrap_or_default()).sum();
        Some(Backlog { records, capacity: self.config.max_lag_records })
    }

    /// True once the consumer received its first assignment from the group.
    fn ready(&self) -> bool {
        self.consumer
            .as_ref()
            .is_some_and(|consumer| consumer.context().assigned.load(Ordering::SeqCst))
    }

    /// The next offset per partition (JSON): with checkpoints, after what was emitted (the
    /// checkpoint's cut); otherwise what is safely downstream.
    fn snapshot(&mut self) -> Result<Option<Vec<u8>>, ComponentError> {
        self.store_done();
        let positions = if self.checkpointed {
            let mut positions = self.restored.clone();
            positions.merge(&self.emitted);
            positions
        } else {
            self.stored.clone()
        };
        let bytes = serde_json::to_vec(&positions)
            .map_err(|error| ComponentError::Internal(format!("kafka positions: {error}")))?;
        self.snapshotted = positions;
        Ok(Some(bytes))
    }

    /// Starts every partition assigned from now on at the snapshot's position; several
    /// snapshots (one per worker that took the checkpoint) merge.
    fn restore(&mut self, state: &[u8]) -> Result<(), ComponentError> {
        let positions: Positions = serde_json::from_slice(state).map_err(|error| {
            ComponentError::Config(format!("not a kafka source snapshot: {error}"))
        })?;
        self.restored.merge(&positions);
        if let Some(consumer) = &self.consumer {
            *consumer.context().restore.lock().unwrap_or_else(PoisonError::into_inner) =
                self.restored.clone();
        }
        Ok(())
    }

    /// Commits the positions of the last snapshot as the group's offsets (its checkpoint is
    /// durable), for lag monitoring and for a start without a checkpoint.
    fn commit(&mut self) -> Result<(), ComponentError> {
        let Some(consumer) = &self.consumer else { return Ok(()) };
        let mut list = TopicPartitionList::new();
        for (topic, partition) in self.assigned() {
            if let Some(next) = self.snapshotted.get(&topic, partition) {
                let _ = list.add_partition_offset(&topic, partition, Offset::Offset(next));
            }
        }
        if list.count() == 0 {
            return Ok(());
        }
        consumer.commit(&list, CommitMode::Async).map_err(|error| {
            ComponentError::External(format!("kafka commit: {}", error_text(&error)))
        })
    }

    fn close(&mut self) -> Result<(), ComponentError> {
        // Commit what is safe now; the batches still in the pipeline are stored and committed
        // when the source is dropped, after the dataflow drained.
        self.store_done();
        if let Some(consumer) = &self.consumer
            && !self.checkpointed
            && let Err(error) = consumer.commit_consumer_state(CommitMode::Sync)
        {
            tracing::debug!(component = %self.component, %error, "kafka commit at close");
        }
        Ok(())
    }
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        if self.consumer.is_none() {
            return;
        }
        self.store_done();
        // A partition list from librdkafka holds references to its partitions: release it
        // before the consumer, whose destruction waits for every reference.
        self.assignment = TopicPartitionList::new();
        let Some(consumer) = self.consumer.take() else { return };
        if self.checkpointed {
            return;
        }
        if let Err(error) = consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(component = %self.component, %error, "final kafka commit");
        }
        if !self.static_assignment {
            consumer.unsubscribe();
        }
        tracing::info!(
            component = %self.component,
            received = self.received,
            outstanding_batches = self.order.outstanding(),
            "kafka source closed; offsets of processed records committed"
        );
    }
}

#[cfg(test)]
mod tests {
    use tidewatch_api::ConfigValue;

    use super::*;

    fn config(text: &str) -> KafkaSourceConfig {
        ConfigValue::parse(text).expect("toml").deserialize().expect("config")
    }

    #[test]
    fn options_are_checked() {
        let ctx = ValidateContext::default();
        let base = "topics = [\"readings\"]\n";
        assert!(KafkaSourceFactory.output_type(&config(base), &ctx).is_ok());
        for (extra, field) in [
            ("brokers = \"localhost\"", "brokers"),
            ("batch_size = 0", "batch_size"),
            ("max_in_flight_records = 0", "max_in_flight_records"),
            ("commit_interval_ms = 0", "commit_interval_ms"),
            ("librdkafka = { \"enable.auto.commit\" = \"true\" }", "librdkafka"),
            ("[tls]\nclient_cert_file = \"c.pem\"", "tls.client_key_file"),
        ] {
            let error = KafkaSourceFactory
                .output_type(&config(&format!("{base}{extra}")), &ctx)
                .expect_err(extra);
            assert_eq!(error.field.as_deref(), Some(field), "{extra}");
        }
        let error = KafkaSourceFactory.output_type(&config("topics = []"), &ctx).expect_err("[]");
        assert_eq!(error.field.as_deref(), Some("topics"));
        // Payload options belong to normalize; unknown options are errors.
        for unknown in [
            "format = \"json\"",
            "group = \"g\"",
            "[sasl]\nmechanism = \"PLAIN\"\nusername = \"u\"\npassword = \"p\"\nextra = 1",
        ] {
            let parsed = ConfigValue::parse(&format!("{base}{unknown}"))
                .expect("toml")
                .deserialize::<KafkaSourceConfig>();
            assert!(parsed.is_err(), "{unknown}");
        }
        let source = KafkaSource::new(&config(base), &ComponentContext::for_test("in", "kafka"))
            .expect("source");
        assert_eq!(source.group(), "tidewatch-pipeline-in");
        assert!(!source.ready(), "not ready before the group assigned partitions");
    }

    #[test]
    fn offsets_advance_only_over_a_prefix_of_processed_batches() {
        let mut order = AckOrder::default();
        let key = |partition| ("t".to_owned(), partition);
        let (first, second, third) = (order.issue(), order.issue(), order.issue());
        // The second batch is done first: nothing is safe while the first is in the pipeline.
        let (safe, covered) = order.done(second, 2, vec![(key(0), 11), (key(1), 5)]);
        assert!(safe.is_empty());
        assert_eq!(covered, 0);
        assert_eq!(order.outstanding(), 3);
        let (mut safe, covered) = order.done(first, 3, vec![(key(0), 9)]);
        safe.sort();
        assert_eq!(safe, [(key(0), 12), (key(1), 6)], "next offsets: greatest + 1");
        assert_eq!(covered, 5);
        let (safe, covered) = order.done(third, 1, vec![(key(1), 6)]);
        assert_eq!(safe, [(key(1), 7)]);
        assert_eq!((covered, order.outstanding()), (1, 0));
    }

    #[test]
    fn snapshots_are_the_stored_positions_and_restore_them() {
        let ctx = ComponentContext::for_test("in", "kafka");
        let mut source =
            KafkaSource::new(&config("topics = [\"readings\"]"), &ctx).expect("source");
        let seq = source.order.issue();
        source.done_tx.send((seq, 4, vec![(("readings".to_owned(), 2), 41)])).expect("send");
        let snapshot = source.snapshot().expect("snapshot").expect("some");
        let positions: Positions = serde_json::from_slice(&snapshot).expect("json");
        assert_eq!(positions.get("readings", 2), Some(42));
        let mut other = KafkaSource::new(&config("topics = [\"readings\"]"), &ctx).expect("source");
        other.restore(&snapshot).expect("restore");
        assert_eq!(other.restored, positions);
        assert!(other.restore(b"not json").is_err());
    }
}
