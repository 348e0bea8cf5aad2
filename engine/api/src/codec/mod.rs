//! The codec: the one owner of payload formats.
//!
//! Sources carry bytes plus metadata (topic, key, headers, partition, offset, timestamps) and
//! know nothing of what the bytes mean; `normalize` (and anything else that must read a
//! payload, such as a paced file replay) decodes them here, once per message. The codec reads:
//!
//! - JSON objects, through a [`FieldPlan`] of top-level names and JSON pointers
//!   (`/sensors/0/vib`) that skips every value it does not need;
//! - delimited text ([`csv`]): one record per message, RFC 4180 quoting on `csv_core`, column
//!   names from the options or from a header line the source passed along
//!   ([`RawBatch::header`](crate::RawBatch::header)), the delimiter given or sniffed;
//! - little-endian `f32` arrays (`f32le`), one value per named column;
//! - the topic, through one [`TopicTemplate`] grammar whose captures fill fields of the same
//!   name that the payload lacks;
//! - metadata fields (`@key`, `@partition`, `@offset`, `@timestamp`, `@arrival`,
//!   `@header.NAME`, `@topic`).
//!
//! Decoding calls back with `(field, value)` for every needed field found; what the values
//! become (features, device ids, event times) is the caller's business.
//!
//! ```
//! use tidewatch_api::codec::{Decoder, DecoderOptions, PayloadCodec, Value};
//! use tidewatch_api::RawBatch;
//!
//! let options = DecoderOptions { format: PayloadCodec::Json, ..DecoderOptions::default() };
//! let mut decoder = Decoder::new(&options, &[("features", "/sensors/0/temp")]).expect("valid");
//! let mut batch = RawBatch::default();
//! batch.push("plant/p1", br#"{"sensors": [{"temp": 21.5}]}"#, 0, 0);
//! let mut temp = None;
//! for message in batch.iter() {
//!     decoder
//!         .decode(batch.header(), &message, |_field, value| {
//!             if let Value::F64(v) = value {
//!                 temp = Some(v)
//!             }
//!         })
//!         .expect("decodes");
//! }
//! assert_eq!(temp, Some(21.5));
//! ```

pub mod csv;
mod plan;
mod topic;

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use serde::Deserialize;

pub use self::csv::Delimiter;
pub use self::plan::{FieldPlan, KeyOrder, MetaField};
pub use self::topic::TopicTemplate;
use crate::factory::ConfigError;
use crate::records::{EventTime, RawMessage};
use crate::time::{TimestampFormat, parse_timestamp, timestamp_from_number};

/// A field's value as the message has it, borrowed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value<'a> {
    /// `null` (JSON), or a non-finite `f32le` value.
    Null,
    /// A boolean.
    Bool(bool),
    /// A non-negative integer.
    U64(u64),
    /// A negative integer.
    I64(i64),
    /// Any other number.
    F64(f64),
    /// Text (JSON strings, CSV fields, topic captures, keys and headers).
    Str(&'a str),
    /// An object or array (only its nested fields are read).
    Composite,
}

impl fmt::Display for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("null"),
            Value::Bool(value) => write!(f, "{value}"),
            Value::U64(value) => write!(f, "{value}"),
            Value::I64(value) => write!(f, "{value}"),
            Value::F64(value) => write!(f, "{value}"),
            Value::Str(text) => {
                let cut = text.char_indices().nth(64).map_or(text.len(), |(at, _)| at);
                if cut < text.len() {
                    write!(f, "{:?}...", &text[..cut])
                } else {
                    write!(f, "{text:?}")
                }
            }
            Value::Composite => f.write_str("an object or array"),
        }
    }
}

/// A value that is not a number, numeric text or a boolean.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a number, numeric text or boolean")]
pub struct NotANumber;

impl Value<'_> {
    /// The value as a number: numbers, numeric text and booleans (1/0); `Ok(None)` for null.
    #[inline]
    pub fn as_f32(self) -> Result<Option<f32>, NotANumber> {
        match self {
            Value::Null => Ok(None),
            Value::Bool(flag) => Ok(Some(if flag { 1.0 } else { 0.0 })),
            Value::U64(number) => Ok(Some(number as f32)),
            Value::I64(number) => Ok(Some(number as f32)),
            Value::F64(number) => Ok(Some(number as f32)),
            Value::Str(text) => text.parse::<f32>().map(Some).map_err(|_| NotANumber),
            Value::Composite => Err(NotANumber),
        }
    }

    /// The value as an event time in `format`: `Ok(None)` for null; `Err` with the reason.
    pub fn as_timestamp(self, format: TimestampFormat) -> Result<Option<EventTime>, String> {
        let time = match self {
            Value::Null => return Ok(None),
            Value::U64(number) => timestamp_from_number(number as f64, format),
            Value::I64(number) => timestamp_from_number(number as f64, format),
            Value::F64(number) => timestamp_from_number(number, format),
            Value::Str(text) => parse_timestamp(text, format),
            Value::Bool(_) | Value::Composite => {
                return Err(format!("{self} is not a number or text"));
            }
        };
        time.map(Some).map_err(|error| error.to_string())
    }
}

/// How payloads are encoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadCodec {
    /// Delimited text when the source passed a header line along (a CSV file), else JSON.
    #[default]
    Auto,
    /// One JSON object per message.
    Json,
    /// One delimited record per message; column names from `columns` or the header line.
    Csv,
    /// Little-endian `f32` values, one per name in `columns`.
    F32le,
}

/// The decoding options a component gives (those of `normalize`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DecoderOptions {
    /// The payload encoding.
    pub format: PayloadCodec,
    /// CSV: the delimiter; default: sniffed from the header line, else `,`.
    pub delimiter: Option<Delimiter>,
    /// CSV: the column names (they replace a header line's); `f32le`: the name of each value.
    pub columns: Option<Vec<String>>,
    /// The shape of the topics; its captures fill fields of the same name the payload lacks.
    pub topic_template: Option<String>,
    /// With `topic_template`: the device id from the topic (a capture, or a pattern of them).
    pub device_from_topic: Option<String>,
}

/// Why a message could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    /// A short classification: `parse`, `topic_mismatch` or `unsupported_format`.
    pub error_type: &'static str,
    /// What is wrong, in words.
    pub reason: String,
}

impl DecodeError {
    fn new(error_type: &'static str, reason: impl Into<String>) -> DecodeError {
        DecodeError { error_type, reason: reason.into() }
    }
}

/// How the columns of one header map to the needed fields.
#[derive(Debug)]
struct CsvLayout {
    header: Option<Arc<[u8]>>,
    delimiter: Delimiter,
    /// The needed field of each column (up to the last needed column).
    column_fields: Vec<Option<usize>>,
}

impl CsvLayout {
    fn new(
        plan: &FieldPlan,
        names: &[Arc<str>],
        header: Option<Arc<[u8]>>,
        delimiter: Delimiter,
    ) -> CsvLayout {
        let mut column_fields: Vec<Option<usize>> =
            names.iter().map(|name| plan.top_level_field(name.trim())).collect();
        while column_fields.last() == Some(&None) {
            column_fields.pop();
        }
        CsvLayout { header, delimiter, column_fields }
    }
}

/// At most this many header layouts are remembered.
const CSV_LAYOUT_LIMIT: usize = 8;

/// Decodes messages into field values, by a [`FieldPlan`] and [`DecoderOptions`].
#[derive(Debug)]
pub struct Decoder {
    plan: FieldPlan,
    /// The key order of the JSON objects decoded so far.
    key_order: KeyOrder,
    format: PayloadCodec,
    delimiter: Option<Delimiter>,
    columns: Option<Arc<[Arc<str>]>>,
    /// f32le: the field of each value.
    value_fields: Vec<Option<usize>>,
    layouts: Vec<CsvLayout>,
    topic: Option<TopicTemplate>,
    /// The field each topic capture fills, if any.
    capture_fields: Vec<Option<usize>>,
    captures: Vec<Range<usize>>,
}

impl Decoder {
    /// A decoder for `fields` (`(option, spec)` pairs, in the order their indexes are wanted:
    /// the first pair's field is index 0 unless a spec repeats) under `options`.
    pub fn new(options: &DecoderOptions, fields: &[(&str, &str)]) -> Result<Decoder, ConfigError> {
        let mut plan = FieldPlan::new();
        for (option, spec) in fields {
            plan.add(option, spec)?;
        }
        Decoder::with_plan(options, plan)
    }

    /// A decoder over a plan already made.
    pub fn with_plan(options: &DecoderOptions, plan: FieldPlan) -> Result<Decoder, ConfigError> {
        let format = options.format;
        let csv_only = |option: &str| {
            ConfigError::at_field(option, format!("`{option}` only applies to CSV"))
                .with_hint("remove it, or set format = \"csv\"")
        };
        match format {
            PayloadCodec::Json => {
                if options.columns.is_some() {
                    return Err(csv_only("columns")
                        .with_hint("remove `columns`, or set format = \"csv\" (or \"f32le\")"));
                }
                if options.delimiter.is_some() {
                    return Err(csv_only("delimiter"));
                }
            }
            PayloadCodec::F32le => {
                if options.columns.as_ref().is_none_or(Vec::is_empty) {
                    return Err(ConfigError::at_field(
                        "columns",
                        "format f32le needs `columns`: the name of each value, in order",
                    ));
                }
                if options.delimiter.is_some() {
                    return Err(csv_only("delimiter"));
                }
            }
            PayloadCodec::Csv | PayloadCodec::Auto => {}
        }
        if let Some(columns) = &options.columns
            && columns.is_empty()
        {
            return Err(ConfigError::at_field("columns", "`columns` is empty"));
        }
        if let Some(nested) = plan.nested_field()
            && (matches!(format, PayloadCodec::Csv | PayloadCodec::F32le)
                || (format == PayloadCodec::Auto && options.columns.is_some()))
        {
            return Err(ConfigError::at_field(
                "format",
                format!(
                    "the JSON pointer {nested:?} reaches into nested values, which {} payloads \
                     do not have",
                    if format == PayloadCodec::F32le { "f32le" } else { "CSV" }
                ),
            )
            .with_hint("read columns by name; pointers need JSON payloads"));
        }
        let topic = match (&options.topic_template, &options.device_from_topic) {
            (Some(template), device) => Some(TopicTemplate::parse(template, device.as_deref())?),
            (None, Some(_)) => {
                return Err(ConfigError::at_field(
                    "device_from_topic",
                    "`device_from_topic` needs `topic_template`",
                )
                .with_hint("add topic_template = \"factory/{site}/pump/{device}/telemetry\""));
            }
            (None, None) => None,
        };
        let capture_fields = topic
            .iter()
            .flat_map(|topic| topic.names().iter().map(|name| plan.top_level_field(name)))
            .collect();
        let columns: Option<Arc<[Arc<str>]>> = options
            .columns
            .as_ref()
            .map(|columns| columns.iter().map(|name| Arc::from(name.as_str())).collect());
        let value_fields = match (format, &columns) {
            (PayloadCodec::F32le, Some(columns)) => {
                columns.iter().map(|name| plan.top_level_field(name)).collect()
            }
            _ => Vec::new(),
        };
        Ok(Decoder {
            plan,
            key_order: KeyOrder::default(),
            format,
            delimiter: options.delimiter,
            columns,
            value_fields,
            layouts: Vec::new(),
            topic,
            capture_fields,
            captures: Vec::new(),
        })
    }

    /// The plan of needed fields.
    pub fn plan(&self) -> &FieldPlan {
        &self.plan
    }

    /// The column names given in the options, if any.
    pub fn columns(&self) -> Option<&[Arc<str>]> {
        self.columns.as_deref()
    }

    /// How many distinct header layouts it remembers (at most 8).
    pub fn header_layouts(&self) -> usize {
        self.layouts.len()
    }

    /// The topic template, if any.
    pub fn topic_template(&self) -> Option<&TopicTemplate> {
        self.topic.as_ref()
    }

    /// After a successful [`Decoder::decode`] of a message with a topic template: the device
    /// id `device_from_topic` makes of its topic (`None` without that option).
    pub fn device_from_topic<'a>(&self, topic: &'a str, buffer: &'a mut String) -> Option<&'a str> {
        self.topic.as_ref()?.device(topic, &self.captures, buffer)
    }

    /// The index in `self.layouts` of the layout for this batch header.
    fn layout(&mut self, header: Option<&Arc<[u8]>>) -> Result<usize, DecodeError> {
        let header = if self.columns.is_some() { None } else { header };
        let found = self.layouts.iter().position(|layout| match (&layout.header, header) {
            (None, None) => true,
            (Some(known), Some(header)) => Arc::ptr_eq(known, header) || **known == **header,
            _ => false,
        });
        if let Some(index) = found {
            // The same line in a new allocation (each batch of a file carries its own): keep
            // the newest, so the batch's next messages match by pointer.
            if let (Some(layout), Some(header)) = (self.layouts.get_mut(index), header) {
                layout.header = Some(Arc::clone(header));
            }
            return Ok(index);
        }
        let (names, delimiter) = match (&self.columns, header) {
            (Some(columns), _) => (Arc::clone(columns), self.delimiter.unwrap_or_default()),
            (None, Some(line)) => {
                let delimiter = self.delimiter.unwrap_or_else(|| Delimiter::sniff(line));
                let names = csv::header_names(line, delimiter).map_err(|problem| {
                    DecodeError::new("parse", format!("the header line: {problem}"))
                })?;
                (names, delimiter)
            }
            (None, None) => {
                return Err(DecodeError::new(
                    "unsupported_format",
                    "format is csv but no column names are known: set `columns`, or read \
                     from a source that passes a header line",
                ));
            }
        };
        if self.layouts.len() >= CSV_LAYOUT_LIMIT {
            self.layouts.remove(0);
        }
        self.layouts.push(CsvLayout::new(&self.plan, &names, header.cloned(), delimiter));
        Ok(self.layouts.len() - 1)
    }

    /// Reads a header line ahead of the messages: an error when it lacks a needed column.
    pub fn decode_header(&mut self, header: &Arc<[u8]>) -> Result<(), DecodeError> {
        let layout = self.layout(Some(header))?;
        let fields = self.layouts.get(layout).map(|layout| &layout.column_fields);
        let found = |field: usize| fields.is_some_and(|fields| fields.contains(&Some(field)));
        match (0..self.plan.len())
            .find(|field| self.plan.column(*field).is_some() && !found(*field))
        {
            Some(missing) => Err(DecodeError::new(
                "missing_field",
                format!("the header line has no column `{}`", self.plan.name(missing)),
            )),
            None => Ok(()),
        }
    }

    /// Decodes one message of a batch whose header line is `header`, calling
    /// `each(field, value)` for every needed field found: topic captures first, then metadata
    /// fields, then the payload's (so a payload value wins over a capture of the same name).
    pub fn decode<F>(
        &mut self,
        header: Option<&Arc<[u8]>>,
        message: &RawMessage<'_>,
        mut each: F,
    ) -> Result<(), DecodeError>
    where
        F: FnMut(usize, Value<'_>),
    {
        if let Some(template) = &self.topic {
            if !template.matches(message.topic, &mut self.captures) {
                let topic = message.topic;
                let cut = topic.char_indices().nth(256).map_or(topic.len(), |(at, _)| at);
                return Err(DecodeError::new(
                    "topic_mismatch",
                    format!(
                        "topic {:?} does not match `topic_template` {:?}",
                        &topic[..cut],
                        template.text()
                    ),
                ));
            }
            for (capture, field) in self.captures.iter().zip(&self.capture_fields) {
                if let (Some(field), Some(text)) = (field, message.topic.get(capture.clone())) {
                    each(*field, Value::Str(text));
                }
            }
        }
        for (meta, field) in self.plan.meta_fields() {
            let mut number = |value: Option<i64>| match value {
                Some(value) => each(*field, Value::I64(value)),
                None => each(*field, Value::Null),
            };
            match meta {
                MetaField::Topic => each(*field, Value::Str(message.topic)),
                MetaField::Key => match message.key.map(std::str::from_utf8) {
                    Some(Ok(key)) => each(*field, Value::Str(key)),
                    Some(Err(_)) => {
                        return Err(DecodeError::new("parse", "the message key is not UTF-8"));
                    }
                    None => each(*field, Value::Null),
                },
                MetaField::Partition => number(message.partition.map(i64::from)),
                MetaField::Offset => number(i64::try_from(message.position).ok()),
                MetaField::Timestamp => number(message.timestamp_ms),
                MetaField::Arrival => number(Some(message.arrival_ms)),
                MetaField::Header(name) => match message.header(name).map(std::str::from_utf8) {
                    Some(Ok(value)) => each(*field, Value::Str(value)),
                    Some(Err(_)) => {
                        return Err(DecodeError::new(
                            "parse",
                            format!("header {name:?} is not UTF-8"),
                        ));
                    }
                    None => each(*field, Value::Null),
                },
            }
        }
        let payload = message.payload;
        let csv = match self.format {
            PayloadCodec::Json => false,
            PayloadCodec::Csv => true,
            PayloadCodec::Auto => header.is_some() || self.columns.is_some(),
            PayloadCodec::F32le => {
                let expected = self.value_fields.len() * 4;
                if payload.len() != expected {
                    return Err(DecodeError::new(
                        "parse",
                        format!(
                            "an f32le message of {} values has {} bytes, not {expected}",
                            self.value_fields.len(),
                            payload.len()
                        ),
                    ));
                }
                for (field, chunk) in self.value_fields.iter().zip(payload.chunks_exact(4)) {
                    if let (Some(field), [a, b, c, d]) = (field, chunk) {
                        let value = f32::from_le_bytes([*a, *b, *c, *d]);
                        if value.is_finite() {
                            each(*field, Value::F64(f64::from(value)));
                        } else {
                            each(*field, Value::Null);
                        }
                    }
                }
                return Ok(());
            }
        };
        if !csv {
            return self
                .plan
                .read_json(payload, &mut self.key_order, &mut each)
                .map_err(|error| DecodeError::new("parse", error.to_string()));
        }
        let layout = self.layout(header)?;
        let Some(layout) = self.layouts.get(layout) else {
            return Err(DecodeError::new("parse", "internal: CSV layout lost"));
        };
        let needed = layout.column_fields.len();
        if needed == 0 {
            return Ok(());
        }
        let line = csv::trim_line_end(payload);
        // Fast path: a valid UTF-8 line without quotes is split as text, checked once.
        if memchr::memchr(b'"', line).is_none()
            && let Ok(text) = std::str::from_utf8(line)
        {
            // The delimiter is ASCII, so every cut is at a character boundary (`str::split`
            // with a `char` pattern would compare each match's UTF-8 bytes again).
            let delimiter = layout.delimiter.byte();
            let (mut start, mut column) = (0, 0);
            while column < needed {
                let end = text
                    .as_bytes()
                    .get(start..)
                    .and_then(|rest| memchr::memchr(delimiter, rest))
                    .map_or(text.len(), |at| start + at);
                if let Some(Some(field)) = layout.column_fields.get(column) {
                    each(*field, Value::Str(text.get(start..end).unwrap_or_default()));
                }
                if end == text.len() {
                    break;
                }
                (start, column) = (end + 1, column + 1);
            }
            return Ok(());
        }
        let mut not_utf8 = false;
        let column_fields = &layout.column_fields;
        csv::split_record(line, layout.delimiter, |column, text| {
            if let Some(Some(field)) = column_fields.get(column) {
                match std::str::from_utf8(&text) {
                    Ok(text) => each(*field, Value::Str(text)),
                    Err(_) => not_utf8 = true,
                }
            }
            column + 1 < needed
        })
        .map_err(|problem| DecodeError::new("parse", problem))?;
        if not_utf8 {
            return Err(DecodeError::new("parse", "a needed field is not valid UTF-8"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::RawBatch;

    fn decode_all(
        decoder: &mut Decoder,
        batch: &RawBatch,
    ) -> Vec<Result<Vec<(usize, String)>, DecodeError>> {
        batch
            .iter()
            .map(|message| {
                let mut values = Vec::new();
                decoder
                    .decode(batch.header(), &message, |field, value| {
                        values.push((field, value.to_string()))
                    })
                    .map(|()| values)
            })
            .collect()
    }

    #[test]
    fn csv_with_a_header_line_and_topic_captures() {
        let options = DecoderOptions {
            topic_template: Some("plant/{site}/{device}".into()),
            ..DecoderOptions::default()
        };
        let mut decoder =
            Decoder::new(&options, &[("f", "temp"), ("f", "device"), ("f", "site")]).expect("ok");
        let mut batch = RawBatch::default();
        batch.set_header(Arc::from(&b"ts;temp;site"[..]));
        batch.push("plant/north/p1", b"1;\"2,5\";south", 0, 1);
        batch.push("other", b"1;2;x", 0, 2);
        let results = decode_all(&mut decoder, &batch);
        assert_eq!(
            results[0].as_ref().expect("decoded"),
            &vec![
                (2, "\"north\"".to_owned()),
                (1, "\"p1\"".to_owned()),
                (0, "\"2,5\"".to_owned()),
                (2, "\"south\"".to_owned()),
            ]
        );
        assert_eq!(results[1].as_ref().expect_err("mismatch").error_type, "topic_mismatch");
    }

    #[test]
    fn json_keys_in_a_changing_order_read_the_right_fields() {
        let mut decoder = Decoder::new(
            &DecoderOptions { format: PayloadCodec::Json, ..DecoderOptions::default() },
            &[("f", "a"), ("f", "bb"), ("f", "ab")],
        )
        .expect("ok");
        let mut batch = RawBatch::default();
        // The order of the first object is the hint for the next ones, right or wrong.
        for payload in [
            &br#"{"a":1,"bb":2,"ab":3}"#[..],
            br#"{"a":4,"bb":5,"ab":6}"#,
            br#"{"ab":7,"a":8,"x":0,"bb":9}"#,
            br#"{"x":0,"bb":10,"ab":11,"a":12}"#,
            br#"{"a":13,"b":0,"ab":14}"#,
        ] {
            batch.push("t", payload, 0, 0);
        }
        let fields = |values: &Vec<(usize, String)>| {
            let mut sorted = values.clone();
            sorted.sort();
            sorted.into_iter().map(|(field, value)| format!("{field}={value}")).collect::<Vec<_>>()
        };
        let results: Vec<Vec<String>> = decode_all(&mut decoder, &batch)
            .iter()
            .map(|result| fields(result.as_ref().expect("decoded")))
            .collect();
        assert_eq!(
            results,
            [
                vec!["0=1", "1=2", "2=3"],
                vec!["0=4", "1=5", "2=6"],
                vec!["0=8", "1=9", "2=7"],
                vec!["0=12", "1=10", "2=11"],
                vec!["0=13", "2=14"],
            ]
        );
    }

    #[test]
    fn f32le_and_metadata_fields() {
        let options = DecoderOptions {
            format: PayloadCodec::F32le,
            columns: Some(vec!["a".into(), "b".into()]),
            ..DecoderOptions::default()
        };
        let mut decoder =
            Decoder::new(&options, &[("f", "a"), ("f", "b"), ("t", "@arrival")]).expect("ok");
        let mut batch = RawBatch::default();
        let mut payload = 1.5f32.to_le_bytes().to_vec();
        payload.extend_from_slice(&f32::NAN.to_le_bytes());
        batch.push("t", &payload, 42, 0);
        batch.push("t", b"abc", 43, 1);
        let results = decode_all(&mut decoder, &batch);
        assert_eq!(
            results[0].as_ref().expect("decoded"),
            &vec![(2, "42".to_owned()), (0, "1.5".to_owned()), (1, "null".to_owned()),]
        );
        assert_eq!(results[1].as_ref().expect_err("short").error_type, "parse");
        assert!(Decoder::new(&options, &[("f", "@nope")]).is_err());
    }
}
