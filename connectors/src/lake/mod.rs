//! The Parquet lake (feature `s3`): the `parquet` sink and source ([`source`]), on a local
//! folder or S3 (Ceph's radosgw, MinIO, AWS).
//!
//! Each worker converts the readings or scores it receives to Arrow record batches, column by
//! column ([`columns`]), and appends them to one open Parquet file (zstd) per Hive-style
//! partition (`date=YYYY-MM-DD/hour=HH` by default). A file is finished when it reaches
//! `max_file_bytes` or `max_file_age_secs`, or when the run ends, and is then published under
//! its final name, atomically ([`store`]): a reader sees complete files or none. Names are
//! `part-<worker>-<run>-<sequence>.parquet`, the run id being the process's start time (ms),
//! so no run reuses another's names. Publishing runs on a thread of its own that rides out
//! store outages, holding finished files in memory and spilling them to disk.
//!
//! When the pipeline takes checkpoints, finished files are not published by the uploader:
//! they are staged ([`Sink::pre_commit`]) and the engine keeps them in the checkpoint, then
//! publishes them through [`StorePublisher`] once the checkpoint is durable (again after a
//! crash: same key, same bytes). Every row reaches the lake exactly once.
//!
//! ```toml
//! [sinks.lake]
//! type = "parquet"
//! inputs = ["readings"]
//! path = "${TIDEWATCH_LAKE_URL:-file://./lake}"
//! partition = "date={date}/hour={hour}"
//!
//! [sinks.lake.s3]
//! endpoint = "http://127.0.0.1:7480"
//! ```

pub mod columns;
pub mod registry;
pub mod source;
pub mod store;
mod upload;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};
use tidewatch_api::{
    Batch, ComponentContext, ComponentError, ConfigError, EventTime, Kind, Publisher, Schema, Sink,
    SinkFactory, Staged, ValidateContext,
};

use self::columns::{DeviceNames, Partitioner, READING_COLUMNS, SCORE_COLUMNS};
pub use self::source::{ParquetSource, ParquetSourceConfig, ParquetSourceFactory};
pub use self::store::{LakeUrl, S3Config, Store, StoreError};
use self::upload::{Body, Finished, LakeMetrics, UploadSettings, Uploader};
use crate::shared::{Registered, per_component};

fn default_partition() -> String {
    "date={date}/hour={hour}".to_owned()
}
fn default_max_file_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_max_file_age_secs() -> u64 {
    300
}
fn default_row_group_rows() -> usize {
    65_536
}
fn default_zstd_level() -> i32 {
    3
}
fn default_max_pending_bytes() -> u64 {
    256 * 1024 * 1024
}
fn default_spill_dir() -> String {
    "lake-spill".to_owned()
}
fn default_drain_timeout_ms() -> u64 {
    30_000
}
fn default_backoff_initial_ms() -> u64 {
    500
}
fn default_backoff_max_ms() -> u64 {
    30_000
}

/// Options of the `parquet` sink.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParquetSinkConfig {
    /// The lake: `s3://bucket/prefix`, `file://folder` or a folder (relative to the pipeline
    /// file's folder).
    pub path: String,
    /// The Hive-style partition of each record, a template over `{date}` (`YYYY-MM-DD`),
    /// `{hour}` (`HH`), `{minute}`, `{year}`, `{month}`, `{day}` (of the event time, UTC),
    /// `{device}`, and for scores `{detector}` and `{version}`; `""` for none.
    #[serde(default = "default_partition")]
    pub partition: String,
    /// A file is finished once it holds this many bytes (encoded, before the footer).
    #[serde(default = "default_max_file_bytes")]
    pub max_file_bytes: u64,
    /// A file is finished once it has been open this long, s.
    #[serde(default = "default_max_file_age_secs")]
    pub max_file_age_secs: u64,
    /// Rows per Parquet row group.
    #[serde(default = "default_row_group_rows")]
    pub row_group_rows: usize,
    /// zstd compression level (1 to 22).
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
    /// Finished files held in memory while the store is away, at most this many bytes; the
    /// rest is spilled to `spill_dir`.
    #[serde(default = "default_max_pending_bytes")]
    pub max_pending_bytes: u64,
    /// Local folder for files that wait for the store (a subfolder per component); relative
    /// to the pipeline file's folder. The next run publishes what it finds there.
    #[serde(default = "default_spill_dir")]
    pub spill_dir: String,
    /// At the end of a run, how long to wait for files to be published before spilling them,
    /// ms.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    /// First delay between attempts to publish a file, ms (doubling, with jitter).
    #[serde(default = "default_backoff_initial_ms")]
    pub backoff_initial_ms: u64,
    /// Longest delay between attempts, ms.
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// S3 options (endpoint, region, addressing, credentials file).
    #[serde(default)]
    pub s3: S3Config,
}

impl ParquetSinkConfig {
    /// A config writing to `path` with every other option at its default.
    pub fn new(path: impl Into<String>) -> ParquetSinkConfig {
        ParquetSinkConfig {
            path: path.into(),
            partition: default_partition(),
            max_file_bytes: default_max_file_bytes(),
            max_file_age_secs: default_max_file_age_secs(),
            row_group_rows: default_row_group_rows(),
            zstd_level: default_zstd_level(),
            max_pending_bytes: default_max_pending_bytes(),
            spill_dir: default_spill_dir(),
            drain_timeout_ms: default_drain_timeout_ms(),
            backoff_initial_ms: default_backoff_initial_ms(),
            backoff_max_ms: default_backoff_max_ms(),
            s3: S3Config::default(),
        }
    }

    fn check(&self) -> Result<(), ConfigError> {
        LakeUrl::parse(&self.path, std::path::Path::new("."))
            .map_err(|error| ConfigError::at_field("path", error.to_string()))?;
        Partitioner::parse(&self.partition)
            .map_err(|error| ConfigError::at_field("partition", error.to_string()))?;
        if self.max_file_bytes == 0 {
            return Err(ConfigError::at_field("max_file_bytes", "max_file_bytes must be > 0"));
        }
        if self.max_file_age_secs == 0 {
            return Err(ConfigError::at_field(
                "max_file_age_secs",
                "max_file_age_secs must be > 0",
            ));
        }
        if self.row_group_rows == 0 {
            return Err(ConfigError::at_field("row_group_rows", "row_group_rows must be > 0"));
        }
        if ZstdLevel::try_new(self.zstd_level).is_err() {
            return Err(ConfigError::at_field("zstd_level", "zstd_level must be within 1..=22"));
        }
        if self.spill_dir.trim().is_empty() {
            return Err(ConfigError::at_field("spill_dir", "spill_dir must name a folder"));
        }
        if self.backoff_initial_ms == 0 || self.backoff_max_ms < self.backoff_initial_ms {
            return Err(ConfigError::at_field(
                "backoff_max_ms",
                "backoff_initial_ms must be > 0 and backoff_max_ms at least backoff_initial_ms",
            ));
        }
        Ok(())
    }
}

/// Makes `parquet` sinks.
#[derive(Clone, Copy, Debug, Default)]
pub struct ParquetSinkFactory;

impl SinkFactory for ParquetSinkFactory {
    type Config = ParquetSinkConfig;

    fn accepts(&self, config: &ParquetSinkConfig) -> Vec<Kind> {
        if Partitioner::uses_score_fields(&config.partition) {
            vec![Kind::Scores]
        } else {
            vec![Kind::Readings, Kind::Scores]
        }
    }

    fn validate(
        &self,
        config: &ParquetSinkConfig,
        _ctx: &ValidateContext,
    ) -> Result<(), ConfigError> {
        config.check()
    }

    fn build(
        &self,
        config: &ParquetSinkConfig,
        ctx: &ComponentContext,
    ) -> Result<Box<dyn Sink>, ComponentError> {
        Ok(Box::new(ParquetSink::new(config, ctx)?))
    }
}

/// The state of one `parquet` component in a process, shared by its workers.
#[derive(Debug)]
struct Shared {
    uploader: Uploader,
    publisher: Arc<StorePublisher>,
    metrics: LakeMetrics,
    /// The run id in file names: the run's start, ms since the epoch.
    run: u64,
    _registered: Option<Registered>,
}

impl Shared {
    fn new(
        config: &ParquetSinkConfig,
        ctx: &ComponentContext,
        registry: Option<&prometheus::Registry>,
    ) -> Result<Shared, ComponentError> {
        let url = LakeUrl::parse(&config.path, &ctx.pipeline.base_dir)
            .map_err(|error| ComponentError::Config(error.to_string()))?;
        let store = Store::open(&url, &config.s3, &ctx.pipeline.base_dir)
            .map_err(|error| ComponentError::Config(error.to_string()))?;
        let metrics = LakeMetrics::new(&ctx.component_id)?;
        let registered = match registry {
            Some(registry) => {
                Some(Registered::all(registry, metrics.collectors()).map_err(|error| {
                    ComponentError::Config(format!(
                        "cannot register the metrics of parquet sink {:?}: {error}",
                        ctx.component_id
                    ))
                })?)
            }
            None => None,
        };
        let settings = UploadSettings {
            spill_dir: ctx.resolve_path(&config.spill_dir).join(&*ctx.component_id),
            max_pending_bytes: config.max_pending_bytes,
            backoff_initial_ms: config.backoff_initial_ms,
            backoff_max_ms: config.backoff_max_ms,
        };
        tracing::info!(component = %ctx.component_id, lake = %store.display(), "parquet sink");
        let publisher = Arc::new(StorePublisher::new(store.clone())?);
        let uploader = Uploader::start(store, settings, metrics.clone())?;
        let run = u64::try_from(tidewatch_api::records::now_ms()).unwrap_or(0);
        Ok(Shared { uploader, publisher, metrics, run, _registered: registered })
    }
}

/// Publishes staged lake files (checkpoint mode): one atomic put per file, the same key for
/// the same file, so publishing twice leaves one copy.
pub struct StorePublisher {
    store: Store,
    runtime: tokio::runtime::Runtime,
}

impl fmt::Debug for StorePublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StorePublisher").field("store", &self.store.display()).finish()
    }
}

impl StorePublisher {
    /// A publisher into `store`.
    pub fn new(store: Store) -> Result<StorePublisher, ComponentError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|error| ComponentError::io("starting the lake's publish runtime", error))?;
        Ok(StorePublisher { store, runtime })
    }
}

impl Publisher for StorePublisher {
    fn publish(&self, key: &str, bytes: &[u8]) -> Result<(), ComponentError> {
        self.runtime
            .block_on(self.store.put_atomic(key, Bytes::copy_from_slice(bytes)))
            .map_err(|error| ComponentError::External(format!("publishing {key}: {error}")))
    }
}

/// One open (unfinished) Parquet file of a partition.
struct OpenFile {
    writer: ArrowWriter<Vec<u8>>,
    schema: SchemaRef,
    rows: u64,
    opened: Instant,
}

/// The next file name a `parquet` sink will use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParquetSinkState {
    /// The run id in file names.
    pub run: u64,
    /// The sequence number of the next file.
    pub sequence: u64,
}

/// One worker's `parquet` sink.
pub struct ParquetSink {
    shared: Arc<Shared>,
    partitioner: Partitioner,
    properties: WriterProperties,
    max_file_bytes: u64,
    max_file_age: Duration,
    drain_timeout: Duration,
    component: Arc<str>,
    worker: usize,
    state: ParquetSinkState,
    open: BTreeMap<String, OpenFile>,
    names: DeviceNames,
    /// Checkpoint mode: finished files waiting for the next pre-commit.
    staged: Option<Vec<Staged>>,
}

impl fmt::Debug for ParquetSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParquetSink")
            .field("component", &self.component)
            .field("worker", &self.worker)
            .field("state", &self.state)
            .field("open_files", &self.open.len())
            .finish_non_exhaustive()
    }
}

impl ParquetSink {
    /// The sink of one worker; the workers of a process share the uploader and the metrics.
    pub fn new(
        config: &ParquetSinkConfig,
        ctx: &ComponentContext,
    ) -> Result<ParquetSink, ComponentError> {
        config.check().map_err(|error| {
            ComponentError::Config(format!(
                "{}: {}",
                error.field.as_deref().unwrap_or("parquet"),
                error.message
            ))
        })?;
        let shared = per_component(ctx, |metrics| {
            Shared::new(config, ctx, metrics.map(|metrics| metrics.registry()))
        })?;
        let partitioner = Partitioner::parse(&config.partition)
            .map_err(|error| ComponentError::Config(error.to_string()))?;
        let level = ZstdLevel::try_new(config.zstd_level)
            .map_err(|error| ComponentError::Config(error.to_string()))?;
        let properties = WriterProperties::builder()
            .set_compression(Compression::ZSTD(level))
            .set_max_row_group_row_count(Some(config.row_group_rows))
            .set_created_by(format!("tidewatch {}", env!("CARGO_PKG_VERSION")))
            .build();
        let run = shared.run;
        Ok(ParquetSink {
            shared,
            partitioner,
            properties,
            max_file_bytes: config.max_file_bytes,
            max_file_age: Duration::from_secs(config.max_file_age_secs),
            drain_timeout: Duration::from_millis(config.drain_timeout_ms),
            component: Arc::clone(&ctx.component_id),
            worker: ctx.worker_index,
            state: ParquetSinkState { run, sequence: 0 },
            open: BTreeMap::new(),
            names: DeviceNames::default(),
            staged: ctx.pipeline.checkpoints.then(Vec::new),
        })
    }

    /// Appends `record` to the open file of `partition` (opening one, or finishing one of
    /// another schema first), and finishes it when it is big enough.
    fn append(
        &mut self,
        partition: &str,
        schema: &SchemaRef,
        record: &RecordBatch,
    ) -> Result<(), ComponentError> {
        if self.open.get(partition).is_some_and(|file| file.schema != *schema) {
            self.finish(partition)?;
        }
        if !self.open.contains_key(partition) {
            let writer =
                ArrowWriter::try_new(Vec::new(), Arc::clone(schema), Some(self.properties.clone()))
                    .map_err(|error| {
                        ComponentError::Internal(format!("parquet writer: {error}"))
                    })?;
            self.open.insert(
                partition.to_owned(),
                OpenFile { writer, schema: Arc::clone(schema), rows: 0, opened: Instant::now() },
            );
        }
        let file = self
            .open
            .get_mut(partition)
            .ok_or_else(|| ComponentError::Internal("open file vanished".into()))?;
        file.writer
            .write(record)
            .map_err(|error| ComponentError::Internal(format!("parquet write: {error}")))?;
        file.rows += record.num_rows() as u64;
        self.shared.metrics.open_rows.add(record.num_rows() as i64);
        let size = file.writer.bytes_written() + file.writer.in_progress_size();
        if size as u64 >= self.max_file_bytes {
            self.finish(partition)?;
        }
        Ok(())
    }

    /// Finishes the open file of `partition` and hands it to the uploader.
    fn finish(&mut self, partition: &str) -> Result<(), ComponentError> {
        let Some(file) = self.open.remove(partition) else { return Ok(()) };
        self.shared.metrics.open_rows.sub(file.rows as i64);
        let bytes = file.writer.into_inner().map_err(|error| {
            ComponentError::Internal(format!("finishing a parquet file: {error}"))
        })?;
        let name =
            format!("part-{}-{}-{}.parquet", self.worker, self.state.run, self.state.sequence);
        self.state.sequence += 1;
        let key = if partition.is_empty() { name } else { format!("{partition}/{name}") };
        if let Some(staged) = &mut self.staged {
            staged.push(Staged { key, bytes });
            return Ok(());
        }
        self.shared.uploader.enqueue(Finished {
            key,
            rows: file.rows,
            body: Body::Memory(Bytes::from(bytes)),
        });
        Ok(())
    }

    fn finish_all(&mut self) -> Result<(), ComponentError> {
        let partitions: Vec<String> = self.open.keys().cloned().collect();
        let mut result = Ok(());
        for partition in partitions {
            if let Err(error) = self.finish(&partition) {
                result = Err(error);
            }
        }
        result
    }

    fn write_readings(
        &mut self,
        batch: &tidewatch_api::ReadingBatch,
    ) -> Result<(), ComponentError> {
        if let Some(name) =
            batch.schema.names().iter().find(|name| READING_COLUMNS.contains(&&***name))
        {
            return Err(ComponentError::Config(format!(
                "feature {name:?} has the name of a fixed lake column ({})",
                READING_COLUMNS.join(", ")
            )));
        }
        let schema = columns::readings_schema(&batch.schema);
        for (partition, rows) in self.partitioner.split_readings(batch, &mut self.names) {
            let record = columns::readings_batch(&schema, batch, &rows, &mut self.names)
                .map_err(|error| ComponentError::Internal(format!("arrow conversion: {error}")))?;
            self.append(&partition, &schema, &record)?;
        }
        Ok(())
    }

    fn write_scores(&mut self, scores: &[tidewatch_api::Score]) -> Result<(), ComponentError> {
        for (partition, group) in self.partitioner.split_scores(scores, &mut self.names) {
            // One schema per run of scores with the same detail columns.
            let mut start = 0;
            while start < group.len() {
                let columns: &Schema = &group[start].columns;
                let end = group[start..]
                    .iter()
                    .position(|score| *score.columns != *columns)
                    .map_or(group.len(), |offset| start + offset);
                if let Some(name) =
                    columns.names().iter().find(|name| SCORE_COLUMNS.contains(&&***name))
                {
                    return Err(ComponentError::Config(format!(
                        "score column {name:?} has the name of a fixed lake column"
                    )));
                }
                let schema = columns::scores_schema(columns);
                let record = columns::scores_batch(&schema, &group[start..end], &mut self.names)
                    .map_err(|error| {
                        ComponentError::Internal(format!("arrow conversion: {error}"))
                    })?;
                self.append(&partition, &schema, &record)?;
                start = end;
            }
        }
        Ok(())
    }
}

impl Sink for ParquetSink {
    fn write_batch(&mut self, batch: Batch) -> Result<(), ComponentError> {
        match &batch {
            Batch::Readings(readings) => self.write_readings(readings),
            Batch::Scores(scores) => self.write_scores(scores),
            other => Err(ComponentError::Internal(format!(
                "the parquet sink takes readings and scores, not {}",
                other.kind().name()
            ))),
        }
    }

    /// Finishes the files that have been open for `max_file_age_secs`.
    fn on_watermark(&mut self, _watermark_ms: EventTime) -> Result<(), ComponentError> {
        let old: Vec<String> = self
            .open
            .iter()
            .filter(|(_, file)| file.opened.elapsed() >= self.max_file_age)
            .map(|(partition, _)| partition.clone())
            .collect();
        for partition in old {
            self.finish(&partition)?;
        }
        Ok(())
    }

    /// Finishes every open file (they are published by the uploader).
    fn flush(&mut self) -> Result<(), ComponentError> {
        self.finish_all()
    }

    /// Checkpoint mode: finishes every open file and hands them all to the engine.
    fn pre_commit(&mut self) -> Result<Vec<Staged>, ComponentError> {
        self.finish_all()?;
        Ok(self.staged.as_mut().map(std::mem::take).unwrap_or_default())
    }

    fn publisher(&self) -> Option<Arc<dyn Publisher>> {
        self.staged.is_some().then(|| Arc::clone(&self.shared.publisher) as Arc<dyn Publisher>)
    }

    /// Finishes every open file and waits up to `drain_timeout_ms` for the uploader.
    fn close(&mut self) -> Result<(), ComponentError> {
        let result = self.finish_all();
        let left = self.shared.uploader.drain(self.drain_timeout);
        if left > 0 {
            tracing::warn!(
                component = %self.component,
                files = left,
                "parquet files not yet published at the end of drain_timeout_ms are spilled; the next run publishes them"
            );
        }
        result
    }
}
