//! The `parquet` source: readings back from the lake, by time range, partition and device
//! (backtests, and choosing training data).
//!
//! The first worker lists the Parquet files under `path`, keeps those whose Hive-style
//! partition can hold wanted rows (`date=`/`hour=` against `start`/`end`, other `key=value`
//! folders against `partitions`), and reads them one time partition after the other: all
//! files of a `date=`/`hour=` partition are read, their rows filtered by time and device,
//! sorted by event time and emitted as readings. Event time therefore only moves forward from
//! one partition to the next, so windows downstream see an ordered stream.
//!
//! ```toml
//! [sources.history]
//! type = "parquet"
//! path = "s3://tidewatch/lake"
//! features = ["vibration", "current", "pressure", "temperature", "flow"]
//! start = "2026-11-29T00:00:00Z"
//! end = "2026-11-30T00:00:00Z"
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use arrow_array::{
    Array, Float32Array, Float64Array, LargeStringArray, RecordBatch, StringArray,
    TimestampMicrosecondArray, TimestampMillisecondArray, TimestampNanosecondArray,
    TimestampSecondArray, UInt8Array,
};
use bytes::Bytes;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::Deserialize;
use tidewatch_api::time::{TimestampFormat, parse_timestamp};
use tidewatch_api::{
    Batch, ComponentContext, ComponentError, ConfigError, DeviceId, EventTime, Kind, Outputs,
    PortType, ReadingBatch, Schema, Source, SourceFactory, SourcePoll, ValidateContext,
};

use super::columns::READING_COLUMNS;
use super::store::{LakeUrl, S3Config, Store};

fn default_batch_size() -> usize {
    4096
}

/// Options of the `parquet` source.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParquetSourceConfig {
    /// The lake: `s3://bucket/prefix`, `file://folder` or a folder (relative to the pipeline
    /// file's folder).
    pub path: String,
    /// The feature columns to read, in this order (the readings' schema).
    pub features: Vec<String>,
    /// Rows from this event time on (RFC 3339, inclusive); default: the earliest.
    #[serde(default)]
    pub start: Option<String>,
    /// Rows before this event time (RFC 3339, exclusive); default: the latest.
    #[serde(default)]
    pub end: Option<String>,
    /// Only these devices (the `device` column and `device=` partitions); default: all.
    #[serde(default)]
    pub devices: Vec<String>,
    /// Only files under these partition values, by partition key (`{ site = ["north"] }`);
    /// a key a file's path does not have does not exclude it.
    #[serde(default)]
    pub partitions: BTreeMap<String, Vec<String>>,
    /// Most readings per emitted batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// S3 options (endpoint, region, addressing, credentials file), as for the sink.
    #[serde(default)]
    pub s3: S3Config,
}

/// The time range of a config, `[start, end)` in ms.
fn time_range(config: &ParquetSourceConfig) -> Result<(EventTime, EventTime), ConfigError> {
    let bound = |field: &str, text: &Option<String>, default: EventTime| match text {
        None => Ok(default),
        Some(text) => parse_timestamp(text, TimestampFormat::Rfc3339).map_err(|error| {
            ConfigError::at_field(field, error.to_string())
                .with_hint("an RFC 3339 time, for example \"2026-11-29T00:00:00Z\"")
        }),
    };
    let start = bound("start", &config.start, EventTime::MIN)?;
    let end = bound("end", &config.end, EventTime::MAX)?;
    if start >= end {
        return Err(ConfigError::at_field("end", "end must be after start"));
    }
    Ok((start, end))
}

impl ParquetSourceConfig {
    /// Checks the options beyond their types.
    pub fn validate(&self, ctx: &ValidateContext) -> Result<(), ConfigError> {
        LakeUrl::parse(&self.path, &ctx.pipeline.base_dir)
            .map_err(|error| ConfigError::at_field("path", error.to_string()))?;
        if self.features.is_empty() {
            return Err(ConfigError::at_field(
                "features",
                "features must name at least one column",
            ));
        }
        for (index, feature) in self.features.iter().enumerate() {
            if READING_COLUMNS.contains(&feature.as_str()) {
                return Err(ConfigError::at_field(
                    "features",
                    format!("`{feature}` is a column of every readings file, not a feature"),
                ));
            }
            if self.features[..index].contains(feature) {
                return Err(ConfigError::at_field("features", format!("`{feature}` twice")));
            }
        }
        if self.batch_size == 0 {
            return Err(ConfigError::at_field("batch_size", "batch_size must be at least 1"));
        }
        time_range(self).map(|_| ())
    }
}

/// Makes `parquet` sources.
#[derive(Clone, Copy, Debug, Default)]
pub struct ParquetSourceFactory;

impl SourceFactory for ParquetSourceFactory {
    type Config = ParquetSourceConfig;

    fn output_type(
        &self,
        config: &ParquetSourceConfig,
        ctx: &ValidateContext,
    ) -> Result<PortType, ConfigError> {
        config.validate(ctx)?;
        Ok(PortType::with_schema(Kind::Readings, Arc::new(Schema::new(&config.features))))
    }

    fn build(
        &self,
        config: &ParquetSourceConfig,
        ctx: &ComponentContext,
    ) -> Result<Box<dyn Source>, ComponentError> {
        Ok(Box::new(ParquetSource::new(config, ctx)?))
    }
}

/// The time a partition folder holds, from its `date=` and `hour=` values: `[from, to)` ms.
fn partition_span(segments: &[(&str, &str)]) -> Option<(EventTime, EventTime)> {
    let date = segments.iter().find(|(key, _)| *key == "date").map(|(_, value)| *value)?;
    let day = parse_timestamp(&format!("{date}T00:00:00Z"), TimestampFormat::Rfc3339).ok()?;
    match segments
        .iter()
        .find(|(key, _)| *key == "hour")
        .and_then(|(_, hour)| hour.parse::<i64>().ok())
    {
        Some(hour) if (0..24).contains(&hour) => {
            let from = day + hour * 3_600_000;
            Some((from, from + 3_600_000))
        }
        _ => Some((day, day + 86_400_000)),
    }
}

/// The `key=value` folders of a file's key.
fn segments(key: &str) -> Vec<(&str, &str)> {
    let folders = key.rsplit_once('/').map_or("", |(folders, _)| folders);
    folders.split('/').filter_map(|folder| folder.split_once('=')).collect()
}

/// One row read back.
struct Row {
    device: DeviceId,
    time: EventTime,
    values: Vec<f32>,
    label: u8,
}

/// The `parquet` source of one worker (only the first reads).
pub struct ParquetSource {
    config: ParquetSourceConfig,
    schema: Arc<Schema>,
    range: (EventTime, EventTime),
    store: Option<Store>,
    runtime: Option<tokio::runtime::Runtime>,
    /// The files still to read, one entry per time partition, in time order.
    groups: Option<VecDeque<Vec<String>>>,
    /// Rows of the current partition, sorted by time, not emitted yet.
    rows: VecDeque<Row>,
    active: bool,
}

impl std::fmt::Debug for ParquetSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParquetSource").field("path", &self.config.path).finish_non_exhaustive()
    }
}

impl ParquetSource {
    /// A source for `config`; nothing is read before the first poll.
    pub fn new(
        config: &ParquetSourceConfig,
        ctx: &ComponentContext,
    ) -> Result<ParquetSource, ComponentError> {
        let range =
            time_range(config).map_err(|error| ComponentError::Config(error.to_string()))?;
        let active = ctx.worker_index == 0;
        let (store, runtime) = if active {
            let url = LakeUrl::parse(&config.path, &ctx.pipeline.base_dir)
                .map_err(|error| ComponentError::Config(error.to_string()))?;
            let store = Store::open(&url, &config.s3, &ctx.pipeline.base_dir)
                .map_err(|error| ComponentError::External(error.to_string()))?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|error| ComponentError::io("starting a runtime", error))?;
            (Some(store), Some(runtime))
        } else {
            (None, None)
        };
        Ok(ParquetSource {
            schema: Arc::new(Schema::new(&config.features)),
            config: config.clone(),
            range,
            store,
            runtime,
            groups: None,
            rows: VecDeque::new(),
            active,
        })
    }

    /// Whether a file's partition folders can hold wanted rows.
    fn wanted(&self, key: &str) -> bool {
        if !key.ends_with(".parquet") || key.rsplit('/').next().is_some_and(|n| n.starts_with('.'))
        {
            return false;
        }
        let segments = segments(key);
        if let Some((from, to)) = partition_span(&segments)
            && (to <= self.range.0 || from >= self.range.1)
        {
            return false;
        }
        segments.iter().all(|(key, value)| {
            let allowed = match *key {
                "device" if !self.config.devices.is_empty() => Some(&self.config.devices),
                _ => self.config.partitions.get(*key),
            };
            allowed.is_none_or(|values| values.iter().any(|allowed| allowed == value))
        })
    }

    /// Lists the lake and groups the wanted files by time partition.
    fn list(&self) -> Result<VecDeque<Vec<String>>, ComponentError> {
        let (Some(store), Some(runtime)) = (&self.store, &self.runtime) else {
            return Ok(VecDeque::new());
        };
        let keys = runtime
            .block_on(store.list(""))
            .map_err(|error| ComponentError::External(error.to_string()))?;
        let mut groups: BTreeMap<(EventTime, String), Vec<String>> = BTreeMap::new();
        for key in keys.into_iter().filter(|key| self.wanted(key)) {
            let segments = segments(&key);
            let span = partition_span(&segments).map_or(EventTime::MIN, |(from, _)| from);
            let label: String = segments
                .iter()
                .filter(|(name, _)| matches!(*name, "date" | "hour"))
                .map(|(name, value)| format!("{name}={value}/"))
                .collect();
            groups.entry((span, label)).or_default().push(key);
        }
        Ok(groups.into_values().collect())
    }

    /// Reads every file of one time partition into `self.rows`, sorted by time.
    fn load(&mut self, keys: &[String], out: &mut Outputs) -> Result<(), ComponentError> {
        let (Some(store), Some(runtime)) = (&self.store, &self.runtime) else { return Ok(()) };
        let mut rows = Vec::new();
        for key in keys {
            let bytes = runtime
                .block_on(store.get(key))
                .map_err(|error| ComponentError::External(error.to_string()))?;
            if let Err(reason) = self.decode(bytes, &mut rows) {
                out.error("parse", format!("{key}: {reason}"), None, None);
            }
        }
        rows.sort_by_key(|row| row.time);
        self.rows = rows.into();
        Ok(())
    }

    /// Appends the wanted rows of one Parquet file to `rows`.
    fn decode(&self, bytes: Bytes, rows: &mut Vec<Row>) -> Result<(), String> {
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .and_then(|builder| builder.with_batch_size(8192).build())
            .map_err(|error| error.to_string())?;
        for batch in reader {
            let batch = batch.map_err(|error| error.to_string())?;
            self.decode_batch(&batch, rows)?;
        }
        Ok(())
    }

    fn decode_batch(&self, batch: &RecordBatch, rows: &mut Vec<Row>) -> Result<(), String> {
        let column =
            |name: &str| batch.column_by_name(name).ok_or_else(|| format!("no column `{name}`"));
        // Each column is read once, whatever its Arrow type; rows then index plain vectors.
        let devices = strings(column("device")?.as_ref(), "device")?;
        let times = timestamps(column("time")?.as_ref())?;
        let features = self
            .config
            .features
            .iter()
            .map(|name| floats(column(name)?.as_ref(), name))
            .collect::<Result<Vec<_>, String>>()?;
        let labels = batch.column_by_name("label");
        let labels = labels.and_then(|array| array.as_any().downcast_ref::<UInt8Array>());
        let mut names: BTreeMap<&str, DeviceId> = BTreeMap::new();
        'rows: for row in 0..batch.num_rows() {
            let (Some(Some(name)), Some(Some(time))) = (devices.get(row), times.get(row)) else {
                continue;
            };
            if *time < self.range.0 || *time >= self.range.1 {
                continue;
            }
            if !self.config.devices.is_empty() && !self.config.devices.iter().any(|d| d == name) {
                continue;
            }
            let mut values = Vec::with_capacity(features.len());
            for column in &features {
                match column.get(row) {
                    Some(Some(value)) => values.push(*value),
                    _ => continue 'rows,
                }
            }
            let device = *names.entry(name).or_insert_with(|| DeviceId::intern(name));
            let label = labels.filter(|array| !array.is_null(row)).map_or(0, |a| a.value(row));
            rows.push(Row { device, time: *time, values, label });
        }
        Ok(())
    }
}

/// A string column's values (`None` for nulls).
fn strings<'a>(array: &'a dyn Array, name: &str) -> Result<Vec<Option<&'a str>>, String> {
    let any = array.as_any();
    if let Some(array) = any.downcast_ref::<StringArray>() {
        Ok(array.iter().collect())
    } else if let Some(array) = any.downcast_ref::<LargeStringArray>() {
        Ok(array.iter().collect())
    } else {
        Err(format!("column `{name}` is {}, not a string", array.data_type()))
    }
}

/// A timestamp column's values in ms (`None` for nulls), whatever its unit.
fn timestamps(array: &dyn Array) -> Result<Vec<Option<EventTime>>, String> {
    let any = array.as_any();
    if let Some(array) = any.downcast_ref::<TimestampMillisecondArray>() {
        Ok(array.iter().collect())
    } else if let Some(array) = any.downcast_ref::<TimestampMicrosecondArray>() {
        Ok(array.iter().map(|time| time.map(|us| us.div_euclid(1_000))).collect())
    } else if let Some(array) = any.downcast_ref::<TimestampNanosecondArray>() {
        Ok(array.iter().map(|time| time.map(|ns| ns.div_euclid(1_000_000))).collect())
    } else if let Some(array) = any.downcast_ref::<TimestampSecondArray>() {
        Ok(array.iter().map(|time| time.map(|s| s.saturating_mul(1_000))).collect())
    } else {
        Err(format!("column `time` is {}, not a timestamp", array.data_type()))
    }
}

/// A float column's values as `f32` (`None` for nulls).
fn floats(array: &dyn Array, name: &str) -> Result<Vec<Option<f32>>, String> {
    let any = array.as_any();
    if let Some(array) = any.downcast_ref::<Float32Array>() {
        Ok(array.iter().collect())
    } else if let Some(array) = any.downcast_ref::<Float64Array>() {
        Ok(array.iter().map(|value| value.map(|value| value as f32)).collect())
    } else {
        Err(format!("column `{name}` is {}, not a float", array.data_type()))
    }
}

impl Source for ParquetSource {
    fn poll(&mut self, out: &mut Outputs) -> Result<SourcePoll, ComponentError> {
        if !self.active {
            return Ok(SourcePoll::Finished);
        }
        if self.groups.is_none() {
            self.groups = Some(self.list()?);
        }
        while self.rows.is_empty() {
            let Some(keys) = self.groups.as_mut().and_then(VecDeque::pop_front) else {
                return Ok(SourcePoll::Finished);
            };
            self.load(&keys, out)?;
        }
        let take = self.rows.len().min(self.config.batch_size);
        let mut batch = ReadingBatch::with_capacity(Arc::clone(&self.schema), take);
        for row in self.rows.drain(..take) {
            batch.push(row.device, row.time, &row.values, row.label);
        }
        out.emit(Batch::Readings(batch));
        Ok(SourcePoll::Ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_pruned_by_time_and_value() {
        let span = partition_span(&segments("date=2026-11-29/hour=10/part-0.parquet"));
        let ten = parse_timestamp("2026-11-29T10:00:00Z", TimestampFormat::Rfc3339).expect("t");
        assert_eq!(span, Some((ten, ten + 3_600_000)));
        let day = partition_span(&segments("site=a/date=2026-11-29/part-0.parquet"));
        assert_eq!(day.map(|(from, to)| to - from), Some(86_400_000));
        assert_eq!(partition_span(&segments("part-0.parquet")), None);
    }

    #[test]
    fn options_are_checked() {
        let config = |text: &str| -> ParquetSourceConfig {
            let text = format!("path = \"lake\"\nfeatures = [\"a\"]\n{text}");
            tidewatch_api::ConfigValue::parse(&text)
                .and_then(|value| value.deserialize())
                .expect("options")
        };
        let ctx = ValidateContext::default();
        assert!(config("").validate(&ctx).is_ok());
        assert!(config("start = \"yesterday\"").validate(&ctx).is_err());
        let backwards = "start = \"2026-11-29T00:00:00Z\"\nend = \"2026-11-28T00:00:00Z\"";
        assert!(config(backwards).validate(&ctx).is_err());
        assert!(config("batch_size = 0").validate(&ctx).is_err());
        let mut reserved = config("");
        reserved.features = vec!["time".to_owned()];
        assert!(reserved.validate(&ctx).is_err());
    }
}
