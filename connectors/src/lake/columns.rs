//! Readings and scores as Arrow record batches, column by column, and the Hive-style
//! partition of each record.
//!
//! Readings: `device` (string), `time` (timestamp, ms, UTC: the event time), one `float32`
//! column per feature in the pipeline's order, `label` (`uint8`). Scores: `device`, `time`
//! (the window's start), `end` (its end), `detector`, `version`, `score`, `threshold`
//! (nullable), `anomaly` (bool), `label`, then one `float32` column per detail value.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::builder::StringBuilder;
use arrow_array::{
    ArrayRef, BooleanArray, Float32Array, RecordBatch, TimestampMillisecondArray, UInt8Array,
};
use arrow_schema::{ArrowError, DataType, Field, Schema as ArrowSchema, SchemaRef, TimeUnit};
use tidewatch_api::template::{Escape, Template, TemplateError};
use tidewatch_api::time::format_rfc3339;
use tidewatch_api::{DeviceId, EventTime, ReadingBatch, Schema, Score};

/// The columns every readings file starts with; feature names must differ from them.
pub(crate) const READING_COLUMNS: &[&str] = &["device", "time", "label"];
/// The columns every scores file starts with.
pub(crate) const SCORE_COLUMNS: &[&str] =
    &["device", "time", "end", "detector", "version", "score", "threshold", "anomaly", "label"];

/// The fields a partition template may use.
pub(crate) const PARTITION_FIELDS: &[&str] =
    &["date", "hour", "minute", "year", "month", "day", "device", "detector", "version"];
const DATE: usize = 0;
const HOUR: usize = 1;
const MINUTE: usize = 2;
const YEAR: usize = 3;
const MONTH: usize = 4;
const DAY: usize = 5;
const DEVICE: usize = 6;
const DETECTOR: usize = 7;
const VERSION: usize = 8;

fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some(Arc::from("UTC")))
}

/// The Arrow schema of readings with these features.
pub(crate) fn readings_schema(features: &Schema) -> SchemaRef {
    let mut fields = vec![
        Field::new("device", DataType::Utf8, false),
        Field::new("time", timestamp_type(), false),
    ];
    fields.extend(features.names().iter().map(|name| Field::new(&**name, DataType::Float32, true)));
    fields.push(Field::new("label", DataType::UInt8, false));
    Arc::new(ArrowSchema::new(fields))
}

/// The Arrow schema of scores with these detail columns.
pub(crate) fn scores_schema(columns: &Schema) -> SchemaRef {
    let mut fields = vec![
        Field::new("device", DataType::Utf8, false),
        Field::new("time", timestamp_type(), false),
        Field::new("end", timestamp_type(), false),
        Field::new("detector", DataType::Utf8, false),
        Field::new("version", DataType::Utf8, false),
        Field::new("score", DataType::Float32, false),
        Field::new("threshold", DataType::Float32, true),
        Field::new("anomaly", DataType::Boolean, false),
        Field::new("label", DataType::UInt8, false),
    ];
    fields.extend(columns.names().iter().map(|name| Field::new(&**name, DataType::Float32, true)));
    Arc::new(ArrowSchema::new(fields))
}

/// Device names by interned id, so a batch costs one lookup per device, not per row.
#[derive(Debug, Default)]
pub(crate) struct DeviceNames {
    names: HashMap<DeviceId, Arc<str>>,
}

impl DeviceNames {
    fn get(&mut self, device: DeviceId) -> &str {
        self.names.entry(device).or_insert_with(|| device.name())
    }
}

/// The rows `rows` of `batch` as a record batch of `schema` (from [`readings_schema`]).
pub(crate) fn readings_batch(
    schema: &SchemaRef,
    batch: &ReadingBatch,
    rows: &[usize],
    names: &mut DeviceNames,
) -> Result<RecordBatch, ArrowError> {
    let width = batch.width();
    let mut devices = StringBuilder::with_capacity(rows.len(), rows.len() * 12);
    for &row in rows {
        devices.append_value(names.get(batch.devices[row]));
    }
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(width + 3);
    columns.push(Arc::new(devices.finish()));
    columns.push(Arc::new(
        TimestampMillisecondArray::from_iter_values(rows.iter().map(|&row| batch.times[row]))
            .with_timezone("UTC"),
    ));
    for feature in 0..width {
        columns.push(Arc::new(Float32Array::from_iter_values(
            rows.iter().map(|&row| batch.values[row * width + feature]),
        )));
    }
    columns.push(Arc::new(UInt8Array::from_iter_values(rows.iter().map(|&row| batch.labels[row]))));
    RecordBatch::try_new(Arc::clone(schema), columns)
}

/// `scores` as a record batch of `schema` (from [`scores_schema`] with their columns).
pub(crate) fn scores_batch(
    schema: &SchemaRef,
    scores: &[&Score],
    names: &mut DeviceNames,
) -> Result<RecordBatch, ArrowError> {
    let details = schema.fields().len() - SCORE_COLUMNS.len();
    let mut devices = StringBuilder::new();
    let mut detectors = StringBuilder::new();
    let mut versions = StringBuilder::new();
    for score in scores {
        devices.append_value(names.get(score.device));
        detectors.append_value(&score.detector);
        versions.append_value(&score.version);
    }
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(devices.finish()),
        Arc::new(
            TimestampMillisecondArray::from_iter_values(scores.iter().map(|s| s.start_ms))
                .with_timezone("UTC"),
        ),
        Arc::new(
            TimestampMillisecondArray::from_iter_values(scores.iter().map(|s| s.end_ms))
                .with_timezone("UTC"),
        ),
        Arc::new(detectors.finish()),
        Arc::new(versions.finish()),
        Arc::new(Float32Array::from_iter_values(scores.iter().map(|s| s.score))),
        Arc::new(Float32Array::from_iter(scores.iter().map(|s| s.threshold))),
        Arc::new(BooleanArray::from_iter(scores.iter().map(|s| Some(s.anomaly)))),
        Arc::new(UInt8Array::from_iter_values(scores.iter().map(|s| s.label))),
    ];
    for detail in 0..details {
        columns.push(Arc::new(Float32Array::from_iter(
            scores.iter().map(|s| s.values.get(detail).copied()),
        )));
    }
    RecordBatch::try_new(Arc::clone(schema), columns)
}

/// A parsed partition template, e.g. `date={date}/hour={hour}`.
#[derive(Clone, Debug)]
pub(crate) struct Partitioner {
    template: Template,
    /// Records whose event times fall into the same bucket of this many ms share the time
    /// fields of the partition (0: no time field).
    bucket_ms: i64,
    uses_device: bool,
}

impl Partitioner {
    pub(crate) fn parse(text: &str) -> Result<Partitioner, TemplateError> {
        let template = Template::parse(text, PARTITION_FIELDS)?;
        let mut used = [false; PARTITION_FIELDS.len()];
        template.render(&mut String::new(), Escape::None, |field, _| used[field] = true);
        let bucket_ms = if used[MINUTE] {
            60_000
        } else if used[HOUR] {
            3_600_000
        } else if used[DATE] || used[DAY] {
            86_400_000
        } else {
            0
        };
        // Months and years are not a fixed number of ms: a day's bucket still renders them.
        let bucket_ms =
            if bucket_ms == 0 && (used[MONTH] || used[YEAR]) { 86_400_000 } else { bucket_ms };
        Ok(Partitioner { template, bucket_ms, uses_device: used[DEVICE] })
    }

    /// True when the template uses the detector or the version (scores only).
    pub(crate) fn uses_score_fields(text: &str) -> bool {
        Template::parse(text, PARTITION_FIELDS).is_ok_and(|template| {
            let mut uses = false;
            template.render(&mut String::new(), Escape::None, |field, _| {
                uses |= field == DETECTOR || field == VERSION;
            });
            uses
        })
    }

    fn bucket(&self, time: EventTime) -> i64 {
        if self.bucket_ms == 0 { 0 } else { time.div_euclid(self.bucket_ms) * self.bucket_ms }
    }

    fn render(&self, time: EventTime, device: &str, detector: &str, version: &str) -> String {
        let stamp = format_rfc3339(time);
        let part = |range: std::ops::Range<usize>| stamp.get(range).unwrap_or("");
        let mut out = String::new();
        self.template.render(&mut out, Escape::None, |field, out| {
            let value = match field {
                DATE => part(0..10),
                HOUR => part(11..13),
                MINUTE => part(14..16),
                YEAR => part(0..4),
                MONTH => part(5..7),
                DAY => part(8..10),
                DEVICE => device,
                DETECTOR => detector,
                _ => version,
            };
            // A value never adds a level to the path.
            out.extend(value.chars().map(|c| if c == '/' || c == '\\' { '_' } else { c }));
        });
        out
    }

    /// The rows of `batch` by partition.
    pub(crate) fn split_readings(
        &self,
        batch: &ReadingBatch,
        names: &mut DeviceNames,
    ) -> Vec<(String, Vec<usize>)> {
        let mut groups: HashMap<(i64, Option<DeviceId>), Vec<usize>> = HashMap::new();
        for (row, (&time, &device)) in batch.times.iter().zip(&batch.devices).enumerate() {
            let key = (self.bucket(time), self.uses_device.then_some(device));
            groups.entry(key).or_default().push(row);
        }
        let mut out: Vec<(String, Vec<usize>)> = groups
            .into_iter()
            .map(|((bucket, device), rows)| {
                let device = device.map(|device| names.get(device).to_owned()).unwrap_or_default();
                (self.render(bucket, &device, "", ""), rows)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The scores by partition.
    pub(crate) fn split_scores<'a>(
        &self,
        scores: &'a [Score],
        names: &mut DeviceNames,
    ) -> Vec<(String, Vec<&'a Score>)> {
        let mut groups: HashMap<String, Vec<&'a Score>> = HashMap::new();
        for score in scores {
            let key = self.render(
                self.bucket(score.start_ms),
                names.get(score.device),
                &score.detector,
                &score.version,
            );
            groups.entry(key).or_default().push(score);
        }
        let mut out: Vec<_> = groups.into_iter().collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_become_columns_and_partitions() {
        let schema = Arc::new(Schema::new(["vibration", "flow"]));
        let mut batch = ReadingBatch::new(Arc::clone(&schema));
        let a = DeviceId::intern("pump-a");
        let b = DeviceId::intern("pump-b");
        // 2026-01-01T23:59:59.999Z and 2026-01-02T00:00:00Z
        batch.push(a, 1_767_311_999_999, &[1.0, 2.0], 0);
        batch.push(b, 1_767_312_000_000, &[3.0, 4.0], 1);
        batch.push(a, 1_767_312_000_500, &[5.0, 6.0], 0);
        let partitioner = Partitioner::parse("date={date}/hour={hour}").expect("template");
        let mut names = DeviceNames::default();
        let groups = partitioner.split_readings(&batch, &mut names);
        assert_eq!(
            groups,
            [
                ("date=2026-01-01/hour=23".to_owned(), vec![0]),
                ("date=2026-01-02/hour=00".to_owned(), vec![1, 2])
            ]
        );
        let arrow = readings_schema(&schema);
        let record = readings_batch(&arrow, &batch, &groups[1].1, &mut names).expect("batch");
        assert_eq!(record.num_rows(), 2);
        let names_of: Vec<&str> = arrow.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names_of, ["device", "time", "vibration", "flow", "label"]);
        let flow = record.column(3).as_any().downcast_ref::<Float32Array>().expect("f32");
        assert_eq!(flow.values().to_vec(), vec![4.0, 6.0]);
        let by_device = Partitioner::parse("site={device}").expect("template");
        assert_eq!(by_device.split_readings(&batch, &mut names).len(), 2);
        assert!(Partitioner::parse("{nope}").is_err());
    }
}
