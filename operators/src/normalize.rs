//! `normalize`: raw messages (JSON objects or delimited lines) to [`ReadingBatch`]es.
//!
//! Each message becomes one reading: a device, an event time, the configured features in order
//! and an optional label. A message that cannot be read goes to `<id>.errors` with a short
//! `error_type` (`parse`, `missing_field`, `bad_value`, `bad_timestamp`, `unsupported_format`),
//! the reason, its topic and its payload, and the batch goes on.
//!
//! The data path allocates nothing per message: JSON objects are read by a serde visitor that
//! matches keys against the needed field names and skips every other value, CSV lines are split
//! once with the column positions worked out once per distinct header, and device names are
//! interned through a per-operator cache.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use serde::Deserializer as _;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use tidewatch_api::{
    Batch, ComponentContext, ComponentError, ConfigError, DeviceId, EventTime, Kind, LABEL_ANOMALY,
    LABEL_NORMAL, PayloadFormat, PortType, RawBatch, ReadingBatch, Schema, TimestampFormat,
    Transform, TransformFactory, TransformProperties, ValidateContext, parse_timestamp,
    timestamp_from_number,
};

use crate::util::{config_error, excerpt};

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

/// How `normalize` decides the encoding of the payloads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormalizeFormat {
    /// Use the format the source put on each batch; a batch of unknown format is rejected
    /// message by message with `unsupported_format`.
    #[default]
    Auto,
    /// Every payload is one JSON object, whatever the source says.
    Json,
    /// Every payload is one delimited line; the column names come from `columns` or, failing
    /// that, from the header the source put on the batch.
    Csv,
}

/// What `normalize` does with a message that lacks a feature.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnMissing {
    /// The message goes to `<id>.errors` with `missing_field`.
    #[default]
    Error,
    /// The missing feature is NaN and the reading is emitted.
    Nan,
}

/// Options of the `normalize` transform.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NormalizeConfig {
    /// Payload encoding: `auto` (the batch's format, as the source tells it), `json` or `csv`.
    #[serde(default)]
    pub format: NormalizeFormat,
    /// Field delimiter of CSV lines (one ASCII character). Defaults to the delimiter the source
    /// reports with the header, else `,`; when set, it overrides the source's.
    #[serde(default)]
    pub delimiter: Option<char>,
    /// Column names of CSV lines, in order. Defaults to the header the source reports; when
    /// set, it overrides the source's header.
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    /// The feature names of the output readings, in order (the output schema).
    pub features: Vec<String>,
    /// Source field to read for a feature, as `feature = "field"`; a feature not listed reads
    /// the field of its own name.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// Field that holds the device id (text or number). Exactly one of `device_field` and
    /// `device` must be set.
    #[serde(default)]
    pub device_field: Option<String>,
    /// Constant device id for every message. Exactly one of `device_field` and `device` must
    /// be set.
    #[serde(default)]
    pub device: Option<String>,
    /// Field that holds the event time.
    pub timestamp_field: String,
    /// How the event time is written: `auto`, `unix_ms`, `unix_s`, `unix_us`, `unix_ns`,
    /// `rfc3339` or `datetime`.
    #[serde(default)]
    pub timestamp_format: TimestampFormat,
    /// Field that holds the anomaly label (number or boolean; nonzero or `true` means
    /// anomalous). A message without it is labelled normal.
    #[serde(default)]
    pub label_field: Option<String>,
    /// What to do when a feature is missing (absent, `null` or empty): `error` or `nan`.
    #[serde(default)]
    pub on_missing: OnMissing,
}

// ---------------------------------------------------------------------------------------------
// The field plan: which source fields are needed and what each one feeds
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Feature(usize),
    Device,
    Timestamp,
    Label,
}

/// Above this many distinct fields, keys are looked up in a hash map instead of a linear scan.
const LINEAR_LOOKUP_LIMIT: usize = 16;

#[derive(Debug)]
struct Plan {
    /// Distinct source field names.
    names: Vec<Box<str>>,
    /// What each source field feeds.
    targets: Vec<Vec<Target>>,
    /// Name -> field index, when there are many fields.
    index: Option<HashMap<Box<str>, usize>>,
    /// Feature names of the output schema.
    features: Vec<Box<str>>,
    /// Source field of each feature.
    feature_fields: Vec<usize>,
    device_field: Option<usize>,
    timestamp_field: usize,
    timestamp_format: TimestampFormat,
}

impl Plan {
    fn add(&mut self, name: &str, target: Target) -> usize {
        let field = match self.names.iter().position(|known| &**known == name) {
            Some(field) => field,
            None => {
                self.names.push(name.into());
                self.targets.push(Vec::new());
                self.names.len() - 1
            }
        };
        if let Some(targets) = self.targets.get_mut(field) {
            targets.push(target);
        }
        field
    }

    #[inline]
    fn lookup(&self, key: &str) -> Option<usize> {
        match &self.index {
            Some(index) => index.get(key).copied(),
            None => {
                let key = key.as_bytes();
                let first = key.first().copied();
                self.names.iter().position(|name| {
                    let name = name.as_bytes();
                    name.len() == key.len() && name.first().copied() == first && name == key
                })
            }
        }
    }

    fn field_name(&self, field: usize) -> &str {
        self.names.get(field).map_or("?", |name| name)
    }
}

/// Everything derived from the options once: the checks of `output_type` and `build`.
#[derive(Debug)]
struct Prepared {
    plan: Plan,
    schema: Arc<Schema>,
    columns: Option<Arc<[Arc<str>]>>,
    delimiter: Option<u8>,
}

fn prepare(config: &NormalizeConfig) -> Result<Prepared, ConfigError> {
    if config.features.is_empty() {
        return Err(ConfigError::at_field("features", "`features` must name at least one feature")
            .with_hint("list the feature names of the readings, e.g. features = [\"temp\"]"));
    }
    for (position, feature) in config.features.iter().enumerate() {
        if feature.trim().is_empty() {
            return Err(ConfigError::at_field("features", "feature names must not be empty"));
        }
        if config.features[..position].contains(feature) {
            return Err(ConfigError::at_field(
                "features",
                format!("feature `{feature}` is listed twice"),
            ));
        }
    }
    for (feature, field) in &config.rename {
        if !config.features.contains(feature) {
            return Err(ConfigError::at_field(
                "rename",
                format!("`rename` maps `{feature}`, which is not one of `features`"),
            )
            .with_hint("write rename = { feature = \"source field\" }, keyed by feature name"));
        }
        if field.is_empty() {
            return Err(ConfigError::at_field(
                "rename",
                format!("`rename` maps `{feature}` to an empty field name"),
            ));
        }
    }
    match (&config.device_field, &config.device) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::at_field(
                "device",
                "`device_field` and `device` are both set; set exactly one",
            )
            .with_hint(
                "use `device_field` to read the device id from each message, or `device` for \
                 one constant device id",
            ));
        }
        (None, None) => {
            return Err(ConfigError::at_field(
                "device_field",
                "neither `device_field` nor `device` is set; set exactly one",
            )
            .with_hint(
                "use `device_field` to read the device id from each message, or `device` for \
                 one constant device id",
            ));
        }
        (Some(field), None) if field.is_empty() => {
            return Err(ConfigError::at_field("device_field", "`device_field` is empty"));
        }
        (None, Some(device)) if device.is_empty() => {
            return Err(ConfigError::at_field("device", "`device` is empty"));
        }
        _ => {}
    }
    if config.timestamp_field.is_empty() {
        return Err(ConfigError::at_field("timestamp_field", "`timestamp_field` is empty"));
    }
    if config.label_field.as_deref() == Some("") {
        return Err(ConfigError::at_field("label_field", "`label_field` is empty"));
    }
    let delimiter = match config.delimiter {
        None => None,
        Some(delimiter) => {
            if !delimiter.is_ascii() || matches!(delimiter, '"' | '\n' | '\r') {
                return Err(ConfigError::at_field(
                    "delimiter",
                    format!("{delimiter:?} cannot be a delimiter"),
                )
                .with_hint("use one ASCII character other than a quote or a line break"));
            }
            Some(delimiter as u8)
        }
    };
    if config.format == NormalizeFormat::Json {
        if config.columns.is_some() {
            return Err(ConfigError::at_field("columns", "`columns` only applies to CSV")
                .with_hint("remove `columns`, or set format = \"csv\""));
        }
        if config.delimiter.is_some() {
            return Err(ConfigError::at_field("delimiter", "`delimiter` only applies to CSV")
                .with_hint("remove `delimiter`, or set format = \"csv\""));
        }
    }

    let mut plan = Plan {
        names: Vec::new(),
        targets: Vec::new(),
        index: None,
        features: config.features.iter().map(|name| name.as_str().into()).collect(),
        feature_fields: Vec::with_capacity(config.features.len()),
        device_field: None,
        timestamp_field: 0,
        timestamp_format: config.timestamp_format,
    };
    for (position, feature) in config.features.iter().enumerate() {
        let source = config.rename.get(feature).unwrap_or(feature);
        let field = plan.add(source, Target::Feature(position));
        plan.feature_fields.push(field);
    }
    if let Some(device_field) = &config.device_field {
        plan.device_field = Some(plan.add(device_field, Target::Device));
    }
    plan.timestamp_field = plan.add(&config.timestamp_field, Target::Timestamp);
    if let Some(label_field) = &config.label_field {
        plan.add(label_field, Target::Label);
    }
    if plan.names.len() > LINEAR_LOOKUP_LIMIT {
        plan.index = Some(
            plan.names.iter().enumerate().map(|(field, name)| (name.clone(), field)).collect(),
        );
    }

    let columns = match &config.columns {
        None => None,
        Some(columns) => {
            if columns.is_empty() {
                return Err(ConfigError::at_field("columns", "`columns` is empty"));
            }
            let mut required: Vec<&str> = vec![&config.timestamp_field];
            if let Some(device_field) = &config.device_field {
                required.push(device_field);
            }
            if config.on_missing == OnMissing::Error {
                for field in &plan.feature_fields {
                    required.push(plan.field_name(*field));
                }
            }
            if let Some(absent) = required.iter().find(|name| !columns.iter().any(|c| c == *name)) {
                return Err(ConfigError::at_field(
                    "columns",
                    format!("`columns` has no column `{absent}`, which is needed"),
                )
                .with_hint("name every CSV column in order, or map features with `rename`"));
            }
            Some(columns.iter().map(|name| Arc::from(name.as_str())).collect())
        }
    };

    let schema = Arc::new(Schema::new(&config.features));
    Ok(Prepared { plan, schema, columns, delimiter })
}

// ---------------------------------------------------------------------------------------------
// Factory
// ---------------------------------------------------------------------------------------------

/// Factory of the `normalize` transform.
#[derive(Clone, Copy, Debug, Default)]
pub struct NormalizeFactory;

impl TransformFactory for NormalizeFactory {
    type Config = NormalizeConfig;

    fn accepts(&self, _config: &NormalizeConfig) -> Vec<Kind> {
        vec![Kind::Raw]
    }

    fn output_type(
        &self,
        config: &NormalizeConfig,
        input: &PortType,
        _ctx: &ValidateContext,
    ) -> Result<PortType, ConfigError> {
        if input.kind != Kind::Raw {
            return Err(ConfigError::new(format!(
                "`normalize` reads raw messages, but its input carries {}",
                input.kind
            ))
            .with_hint("connect `normalize` to a source"));
        }
        let prepared = prepare(config)?;
        Ok(PortType::with_schema(Kind::Readings, prepared.schema))
    }

    fn properties(&self, _config: &NormalizeConfig) -> TransformProperties {
        TransformProperties { keyed: false, assigns_event_time: true, late_output: false }
    }

    fn build(
        &self,
        config: &NormalizeConfig,
        ctx: &ComponentContext,
    ) -> Result<Box<dyn Transform>, ComponentError> {
        let operator = Normalize::new(config, ctx).map_err(config_error)?;
        Ok(Box::new(operator))
    }
}

// ---------------------------------------------------------------------------------------------
// Per-message state
// ---------------------------------------------------------------------------------------------

/// A field's value as the payload has it, borrowed.
#[derive(Clone, Copy, Debug)]
enum Value<'a> {
    Null,
    Bool(bool),
    U64(u64),
    I64(i64),
    F64(f64),
    Str(&'a str),
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
            Value::Str(text) => write!(f, "{:?}", excerpt(text, 64)),
            Value::Composite => f.write_str("an object or array"),
        }
    }
}

/// The reading being assembled from one message; reused from message to message.
#[derive(Debug)]
struct Message {
    values: Vec<f32>,
    present: Vec<bool>,
    device: Option<DeviceId>,
    time: Option<EventTime>,
    label: u8,
    /// The first problem found: (error_type, reason).
    error: Option<(&'static str, String)>,
    /// The timestamp field holds its own column name: a repeated CSV header line.
    header_echo: bool,
}

impl Message {
    fn new(width: usize) -> Message {
        Message {
            values: vec![f32::NAN; width],
            present: vec![false; width],
            device: None,
            time: None,
            label: LABEL_NORMAL,
            error: None,
            header_echo: false,
        }
    }

    fn reset(&mut self, device: Option<DeviceId>) {
        self.values.fill(f32::NAN);
        self.present.fill(false);
        self.device = device;
        self.time = None;
        self.label = LABEL_NORMAL;
        self.error = None;
        self.header_echo = false;
    }

    fn fail(&mut self, error_type: &'static str, reason: impl FnOnce() -> String) {
        if self.error.is_none() {
            self.error = Some((error_type, reason()));
        }
    }
}

/// Device ids by name, so that the global interner's lock is rarely taken.
#[derive(Debug, Default)]
struct DeviceCache {
    last_name: String,
    last_id: Option<DeviceId>,
    ids: HashMap<Box<str>, DeviceId>,
}

/// The cache forgets everything past this many names (the interner keeps them).
const DEVICE_CACHE_LIMIT: usize = 1 << 16;

impl DeviceCache {
    #[inline]
    fn get(&mut self, name: &str) -> DeviceId {
        if let Some(id) = self.last_id
            && self.last_name == name
        {
            return id;
        }
        let id = match self.ids.get(name) {
            Some(id) => *id,
            None => {
                if self.ids.len() >= DEVICE_CACHE_LIMIT {
                    self.ids.clear();
                }
                let id = DeviceId::intern(name);
                self.ids.insert(name.into(), id);
                id
            }
        };
        self.last_name.clear();
        self.last_name.push_str(name);
        self.last_id = Some(id);
        id
    }
}

fn feature_value(value: Value<'_>) -> Result<Option<f32>, ()> {
    match value {
        Value::Null => Ok(None),
        Value::Bool(flag) => Ok(Some(if flag { 1.0 } else { 0.0 })),
        Value::U64(number) => Ok(Some(number as f32)),
        Value::I64(number) => Ok(Some(number as f32)),
        Value::F64(number) => Ok(Some(number as f32)),
        Value::Str(text) => text.parse::<f32>().map(Some).map_err(|_| ()),
        Value::Composite => Err(()),
    }
}

fn label_value(value: Value<'_>) -> Result<Option<u8>, ()> {
    let anomalous = match value {
        Value::Null => return Ok(None),
        Value::Bool(flag) => flag,
        Value::U64(number) => number != 0,
        Value::I64(number) => number != 0,
        Value::F64(number) => number != 0.0 && !number.is_nan(),
        Value::Str(text) => {
            if text.eq_ignore_ascii_case("true") {
                true
            } else if text.eq_ignore_ascii_case("false") {
                false
            } else {
                let number: f64 = text.parse().map_err(|_| ())?;
                number != 0.0 && !number.is_nan()
            }
        }
        Value::Composite => return Err(()),
    };
    Ok(Some(if anomalous { LABEL_ANOMALY } else { LABEL_NORMAL }))
}

impl Plan {
    /// Feeds one field's value to every target of the field.
    fn apply(&self, field: usize, value: Value<'_>, msg: &mut Message, devices: &mut DeviceCache) {
        let value = match value {
            Value::Str(text) => match text.trim_ascii() {
                "" => Value::Null,
                trimmed => Value::Str(trimmed),
            },
            other => other,
        };
        let Some(targets) = self.targets.get(field) else { return };
        for target in targets {
            match *target {
                Target::Feature(position) => match feature_value(value) {
                    Ok(Some(number)) => {
                        if let (Some(slot), Some(present)) =
                            (msg.values.get_mut(position), msg.present.get_mut(position))
                        {
                            *slot = number;
                            *present = true;
                        }
                    }
                    Ok(None) => {}
                    Err(()) => msg.fail("bad_value", || {
                        format!(
                            "field `{}` is {value}, not a number, numeric text or boolean",
                            self.field_name(field)
                        )
                    }),
                },
                Target::Device => {
                    let device = match value {
                        Value::Null => None,
                        Value::Str(text) => Some(devices.get(text)),
                        Value::U64(number) => Some(devices.get(&number.to_string())),
                        Value::I64(number) => Some(devices.get(&number.to_string())),
                        Value::F64(number) if number.is_finite() => {
                            Some(devices.get(&number.to_string()))
                        }
                        Value::F64(_) | Value::Bool(_) | Value::Composite => {
                            msg.fail("bad_value", || {
                                format!(
                                    "device field `{}` is {value}, not text or a number",
                                    self.field_name(field)
                                )
                            });
                            None
                        }
                    };
                    if device.is_some() {
                        msg.device = device;
                    }
                }
                Target::Timestamp => {
                    let time = match value {
                        Value::Null => continue,
                        Value::U64(number) => {
                            timestamp_from_number(number as f64, self.timestamp_format)
                        }
                        Value::I64(number) => {
                            timestamp_from_number(number as f64, self.timestamp_format)
                        }
                        Value::F64(number) => timestamp_from_number(number, self.timestamp_format),
                        Value::Str(text) => parse_timestamp(text, self.timestamp_format),
                        Value::Bool(_) | Value::Composite => {
                            msg.fail("bad_timestamp", || {
                                format!(
                                    "timestamp field `{}` is {value}, not a number or text",
                                    self.field_name(field)
                                )
                            });
                            continue;
                        }
                    };
                    match time {
                        Ok(time) => msg.time = Some(time),
                        Err(error) => {
                            if let Value::Str(text) = value
                                && text == self.field_name(field)
                            {
                                msg.header_echo = true;
                            }
                            msg.fail("bad_timestamp", || {
                                format!("timestamp field `{}`: {error}", self.field_name(field))
                            });
                        }
                    }
                }
                Target::Label => match label_value(value) {
                    Ok(Some(label)) => msg.label = label,
                    Ok(None) => {}
                    Err(()) => msg.fail("bad_value", || {
                        format!(
                            "label field `{}` is {value}, not a number or boolean",
                            self.field_name(field)
                        )
                    }),
                },
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// JSON: a visitor over the top-level object
// ---------------------------------------------------------------------------------------------

struct Fill<'p> {
    plan: &'p Plan,
    msg: &'p mut Message,
    devices: &'p mut DeviceCache,
}

/// Visits the top-level object.
struct ObjectVisitor<'p>(Fill<'p>);

impl<'de> Visitor<'de> for ObjectVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let fill = self.0;
        while let Some(key) = map.next_key_seed(KeySeed(fill.plan))? {
            match key {
                Some(field) => map.next_value_seed(ValueSeed {
                    plan: fill.plan,
                    field,
                    msg: &mut *fill.msg,
                    devices: &mut *fill.devices,
                })?,
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// Reads a key and tells which needed field it names, if any.
struct KeySeed<'p>(&'p Plan);

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Option<usize>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self.0.lookup(key))
    }
}

/// Reads the value of a needed field straight into the message.
struct ValueSeed<'p> {
    plan: &'p Plan,
    field: usize,
    msg: &'p mut Message,
    devices: &'p mut DeviceCache,
}

impl ValueSeed<'_> {
    fn apply(self, value: Value<'_>) {
        self.plan.apply(self.field, value, self.msg, self.devices);
    }
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<(), E> {
        self.apply(Value::Bool(value));
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<(), E> {
        self.apply(Value::I64(value));
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<(), E> {
        self.apply(Value::U64(value));
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<(), E> {
        self.apply(Value::F64(value));
        Ok(())
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<(), E> {
        self.apply(Value::Str(value));
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.apply(Value::Null);
        Ok(())
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.apply(Value::Null);
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        self.apply(Value::Composite);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        self.apply(Value::Composite);
        Ok(())
    }
}

fn read_json(
    plan: &Plan,
    payload: &[u8],
    msg: &mut Message,
    devices: &mut DeviceCache,
) -> Result<(), serde_json::Error> {
    let mut deserializer = serde_json::Deserializer::from_slice(payload);
    (&mut deserializer).deserialize_map(ObjectVisitor(Fill { plan, msg, devices }))?;
    deserializer.end()
}

// ---------------------------------------------------------------------------------------------
// CSV
// ---------------------------------------------------------------------------------------------

/// How the columns of one header map to the needed fields.
#[derive(Debug)]
struct CsvLayout {
    header: Arc<[Arc<str>]>,
    delimiter: u8,
    /// The needed field of each column (up to the last needed column).
    column_fields: Vec<Option<usize>>,
}

impl CsvLayout {
    fn new(plan: &Plan, header: Arc<[Arc<str>]>, delimiter: u8) -> CsvLayout {
        let mut column_fields: Vec<Option<usize>> = header
            .iter()
            .map(|name| plan.lookup(name.trim_start_matches('\u{feff}').trim()))
            .collect();
        while column_fields.last() == Some(&None) {
            column_fields.pop();
        }
        CsvLayout { header, delimiter, column_fields }
    }
}

/// At most this many headers are remembered.
const CSV_LAYOUT_LIMIT: usize = 8;

/// Splits `line` at `delimiter`, honouring double-quoted fields (`""` inside quotes is a
/// quote), and calls `field(column, text)` for each column until it returns false.
fn split_csv(
    line: &[u8],
    delimiter: u8,
    mut field: impl FnMut(usize, Cow<'_, [u8]>) -> bool,
) -> Result<(), &'static str> {
    let len = line.len();
    let mut pos = 0;
    let mut column = 0;
    loop {
        let next;
        let text: Cow<'_, [u8]> = if line.get(pos) == Some(&b'"') {
            let mut unquoted = Vec::new();
            pos += 1;
            loop {
                let rest = line.get(pos..).unwrap_or_default();
                let Some(quote) = rest.iter().position(|byte| *byte == b'"') else {
                    return Err("a quoted field is not closed");
                };
                unquoted.extend_from_slice(&rest[..quote]);
                pos += quote + 1;
                if line.get(pos) == Some(&b'"') {
                    unquoted.push(b'"');
                    pos += 1;
                } else {
                    break;
                }
            }
            match line.get(pos) {
                None => next = len,
                Some(byte) if *byte == delimiter => next = pos,
                Some(_) => return Err("unexpected text after a closing quote"),
            }
            Cow::Owned(unquoted)
        } else {
            let rest = line.get(pos..).unwrap_or_default();
            next = rest.iter().position(|byte| *byte == delimiter).map_or(len, |end| pos + end);
            Cow::Borrowed(line.get(pos..next).unwrap_or_default())
        };
        if !field(column, text) || next >= len {
            return Ok(());
        }
        pos = next + 1;
        column += 1;
    }
}

fn read_csv(
    plan: &Plan,
    layout: &CsvLayout,
    payload: &[u8],
    msg: &mut Message,
    devices: &mut DeviceCache,
) -> Result<(), &'static str> {
    let mut line = payload;
    while let [rest @ .., b'\n' | b'\r'] = line {
        line = rest;
    }
    let needed = layout.column_fields.len();
    if needed == 0 {
        return Ok(());
    }
    // Fast path: a valid UTF-8 line without quotes is split as text, checked once.
    if layout.delimiter.is_ascii()
        && !line.contains(&b'"')
        && let Ok(text) = std::str::from_utf8(line)
    {
        let delimiter = char::from(layout.delimiter);
        for (column, text) in text.split(delimiter).take(needed).enumerate() {
            if let Some(Some(field)) = layout.column_fields.get(column) {
                plan.apply(*field, Value::Str(text), msg, devices);
            }
        }
        return Ok(());
    }
    let mut not_utf8 = false;
    split_csv(line, layout.delimiter, |column, text| {
        if let Some(Some(field)) = layout.column_fields.get(column) {
            match std::str::from_utf8(&text) {
                Ok(text) => plan.apply(*field, Value::Str(text), msg, devices),
                Err(_) => not_utf8 = true,
            }
        }
        column + 1 < needed
    })?;
    if not_utf8 {
        return Err("a needed field is not valid UTF-8");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The transform
// ---------------------------------------------------------------------------------------------

/// The `normalize` transform: raw messages in, readings out.
#[derive(Debug)]
pub struct Normalize {
    plan: Plan,
    schema: Arc<Schema>,
    format: NormalizeFormat,
    columns: Option<Arc<[Arc<str>]>>,
    delimiter: Option<u8>,
    on_missing: OnMissing,
    constant_device: Option<DeviceId>,
    devices: DeviceCache,
    layouts: Vec<CsvLayout>,
    msg: Message,
}

/// How the messages of one batch are read.
enum Mode {
    Json,
    Csv(usize),
    Unsupported(String),
}

impl Normalize {
    /// Builds the transform from its options (the same checks as the factory's).
    pub fn new(
        config: &NormalizeConfig,
        _ctx: &ComponentContext,
    ) -> Result<Normalize, ConfigError> {
        let Prepared { plan, schema, columns, delimiter } = prepare(config)?;
        let width = schema.len();
        Ok(Normalize {
            plan,
            schema,
            format: config.format,
            columns,
            delimiter,
            on_missing: config.on_missing,
            constant_device: config.device.as_deref().map(DeviceId::intern),
            devices: DeviceCache::default(),
            layouts: Vec::new(),
            msg: Message::new(width),
        })
    }

    /// The schema of the readings it emits.
    pub fn schema(&self) -> &Arc<Schema> {
        &self.schema
    }

    /// The index in `self.layouts` of the layout of `header`, made on first sight.
    fn layout(&mut self, header: &Arc<[Arc<str>]>, delimiter: u8) -> usize {
        let found = self.layouts.iter().position(|layout| {
            layout.delimiter == delimiter
                && (Arc::ptr_eq(&layout.header, header) || layout.header == *header)
        });
        if let Some(index) = found {
            return index;
        }
        if self.layouts.len() >= CSV_LAYOUT_LIMIT {
            self.layouts.remove(0);
        }
        self.layouts.push(CsvLayout::new(&self.plan, Arc::clone(header), delimiter));
        self.layouts.len() - 1
    }

    fn mode(&mut self, format: &PayloadFormat) -> Mode {
        let csv = |this: &mut Normalize, source: Option<(&Arc<[Arc<str>]>, u8)>| {
            let delimiter = this.delimiter.or(source.map(|(_, delimiter)| delimiter));
            let delimiter = delimiter.unwrap_or(b',');
            let header = match (&this.columns, source) {
                (Some(columns), _) => Arc::clone(columns),
                (None, Some((header, _))) => Arc::clone(header),
                (None, None) => {
                    return Mode::Unsupported(
                        "format is csv but no column names are known: set `columns`".to_owned(),
                    );
                }
            };
            Mode::Csv(this.layout(&header, delimiter))
        };
        let source_csv = match format {
            PayloadFormat::Csv { header, delimiter } => Some((header, *delimiter)),
            _ => None,
        };
        match (self.format, format) {
            (NormalizeFormat::Json, _) | (NormalizeFormat::Auto, PayloadFormat::Json) => Mode::Json,
            (NormalizeFormat::Csv, _) | (NormalizeFormat::Auto, PayloadFormat::Csv { .. }) => {
                csv(self, source_csv)
            }
            (NormalizeFormat::Auto, PayloadFormat::Unknown) => Mode::Unsupported(
                "the source does not tell the payload format: set `format` to json or csv"
                    .to_owned(),
            ),
            (NormalizeFormat::Auto, PayloadFormat::F32Le) => Mode::Unsupported(
                "normalize cannot read f32le payloads (no device or timestamp)".to_owned(),
            ),
        }
    }

    /// Reads every message of `raw` into one reading batch (emitted), errors to `<id>.errors`.
    pub fn normalize_batch(&mut self, raw: &RawBatch, out: &mut tidewatch_api::Outputs) {
        let mode = self.mode(&raw.format);
        if let Mode::Unsupported(reason) = &mode {
            for message in raw.iter() {
                out.error(
                    "unsupported_format",
                    reason.as_str(),
                    Some(message.topic),
                    Some(message.payload),
                );
            }
            return;
        }
        let mut readings = ReadingBatch::with_capacity(Arc::clone(&self.schema), raw.len());
        let mut header_lines = 0u64;
        for message in raw.iter() {
            self.msg.reset(self.constant_device);
            let syntax = match &mode {
                Mode::Json => {
                    read_json(&self.plan, message.payload, &mut self.msg, &mut self.devices)
                        .map_err(|error| error.to_string())
                }
                Mode::Csv(layout) => match self.layouts.get(*layout) {
                    Some(layout) => read_csv(
                        &self.plan,
                        layout,
                        message.payload,
                        &mut self.msg,
                        &mut self.devices,
                    )
                    .map_err(str::to_owned),
                    None => Err("internal: CSV layout lost".to_owned()),
                },
                Mode::Unsupported(_) => continue,
            };
            if let Err(reason) = syntax {
                out.error("parse", reason, Some(message.topic), Some(message.payload));
                continue;
            }
            if self.msg.header_echo && matches!(mode, Mode::Csv(_)) {
                header_lines += 1;
                continue;
            }
            if let Some((error_type, reason)) = self.msg.error.take() {
                out.error(error_type, reason, Some(message.topic), Some(message.payload));
                continue;
            }
            if let Some(reason) = self.missing() {
                out.error("missing_field", reason, Some(message.topic), Some(message.payload));
                continue;
            }
            let (Some(device), Some(time)) = (self.msg.device, self.msg.time) else {
                continue;
            };
            readings.push(device, time, &self.msg.values, self.msg.label);
        }
        out.discard("csv_header", header_lines);
        out.emit(Batch::Readings(readings));
    }

    /// Why the assembled message is incomplete, if it is.
    fn missing(&self) -> Option<String> {
        if self.msg.device.is_none() {
            let field = self.plan.device_field.map_or("?", |field| self.plan.field_name(field));
            return Some(format!("missing device field `{field}`"));
        }
        if self.msg.time.is_none() {
            return Some(format!(
                "missing timestamp field `{}`",
                self.plan.field_name(self.plan.timestamp_field)
            ));
        }
        if self.on_missing == OnMissing::Error
            && let Some(position) = self.msg.present.iter().position(|present| !present)
        {
            let feature = self.plan.features.get(position).map_or("?", |name| name);
            let field = self
                .plan
                .feature_fields
                .get(position)
                .map_or("?", |field| self.plan.field_name(*field));
            return Some(if feature == field {
                format!("missing feature `{feature}`")
            } else {
                format!("missing field `{field}` (feature `{feature}`)")
            });
        }
        None
    }
}

impl Transform for Normalize {
    fn process_batch(&mut self, batch: Batch, out: &mut tidewatch_api::Outputs) {
        match batch {
            Batch::Raw(raw) => self.normalize_batch(&raw, out),
            other => out.error(
                "unsupported_format",
                format!("normalize reads raw messages, got a batch of {}", other.kind()),
                None,
                None,
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use tidewatch_api::{ConfigValue, ErrorRecord, Outputs};

    use super::*;

    fn config(toml: &str) -> NormalizeConfig {
        ConfigValue::parse(toml).expect("toml").deserialize().expect("config")
    }

    fn build(toml: &str) -> Normalize {
        Normalize::new(&config(toml), &ComponentContext::for_test("norm", "normalize"))
            .expect("valid config")
    }

    fn run(op: &mut Normalize, raw: RawBatch) -> (ReadingBatch, Vec<ErrorRecord>, Outputs) {
        let mut out = Outputs::new("norm");
        op.process_batch(Batch::Raw(raw), &mut out);
        let mut main = out.take_main();
        let errors = out.take_errors();
        let readings = match main.pop() {
            Some(Batch::Readings(readings)) => readings,
            None => ReadingBatch::new(Arc::clone(op.schema())),
            Some(other) => panic!("unexpected batch {other:?}"),
        };
        assert!(main.is_empty(), "one batch per input batch");
        (readings, errors, out)
    }

    fn json_batch(payloads: &[&str]) -> RawBatch {
        let mut raw = RawBatch::new(PayloadFormat::Json);
        for (position, payload) in payloads.iter().enumerate() {
            raw.push("sensors/a", payload.as_bytes(), 0, position as u64);
        }
        raw
    }

    const JSON_CONFIG: &str = r#"
        features = ["temp", "pressure"]
        device_field = "dev"
        timestamp_field = "ts"
        timestamp_format = "unix_ms"
    "#;

    #[test]
    fn json_messages_become_readings() {
        let mut op = build(JSON_CONFIG);
        let raw = json_batch(&[
            r#"{"dev":"pump-1","ts":1000,"temp":21.5,"pressure":"1.25","extra":{"a":[1,2]}}"#,
            r#"{"pressure":3,"ignored":null,"temp":true,"ts":2000.0,"dev":"pump-2"}"#,
            r#"{"dev":"pump\u002d1","ts":"3000","temp":-1e2,"pressure":0}"#,
        ]);
        let (readings, errors, _) = run(&mut op, raw);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(readings.len(), 3);
        assert_eq!(readings.schema.names().len(), 2);
        let first = readings.get(0).expect("reading");
        assert_eq!(first.device, DeviceId::intern("pump-1"));
        assert_eq!(first.time_ms, 1000);
        assert_eq!(first.values, &[21.5, 1.25]);
        assert_eq!(first.label, LABEL_NORMAL);
        let second = readings.get(1).expect("reading");
        assert_eq!(second.device, DeviceId::intern("pump-2"));
        assert_eq!(second.time_ms, 2000);
        assert_eq!(second.values, &[1.0, 3.0]);
        let third = readings.get(2).expect("reading");
        assert_eq!(third.device, DeviceId::intern("pump-1"));
        assert_eq!(third.time_ms, 3000);
        assert_eq!(third.values, &[-100.0, 0.0]);
    }

    #[test]
    fn csv_skab_header_with_rename_and_label() {
        let mut op = build(
            r#"
            features = ["vibration", "temperature"]
            rename = { vibration = "Accelerometer1RMS", temperature = "Temperature" }
            device = "skab-valve1"
            timestamp_field = "datetime"
            timestamp_format = "datetime"
            label_field = "anomaly"
            "#,
        );
        let header: Arc<[Arc<str>]> = [
            "datetime",
            "Accelerometer1RMS",
            "Accelerometer2RMS",
            "Current",
            "Pressure",
            "Temperature",
            "Thermocouple",
            "Voltage",
            "Volume Flow RateRMS",
            "anomaly",
            "changepoint",
        ]
        .iter()
        .map(|name| Arc::from(*name))
        .collect();
        let mut raw = RawBatch::new(PayloadFormat::Csv { header, delimiter: b';' });
        raw.push(
            "valve1/0.csv",
            b"2020-03-09 10:14:33;0.0265;0.0407;1.3300;0.0545;90.732;27.8;232.5;32.0;0.0;0.0\r\n",
            0,
            1,
        );
        raw.push(
            "valve1/0.csv",
            b"2020-03-09 10:14:34;0.0275;0.0409;1.3;0.05;90.8;27.8;232.5;32.0;1.0;0.0",
            0,
            2,
        );
        let (readings, errors, _) = run(&mut op, raw);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(readings.len(), 2);
        let first = readings.get(0).expect("reading");
        assert_eq!(first.device, DeviceId::intern("skab-valve1"));
        assert_eq!(first.time_ms, 1_583_748_873_000);
        assert_eq!(first.values, &[0.0265, 90.732]);
        assert_eq!(first.label, LABEL_NORMAL);
        let second = readings.get(1).expect("reading");
        assert_eq!(second.time_ms, 1_583_748_874_000);
        assert_eq!(second.label, LABEL_ANOMALY);
    }

    #[test]
    fn csv_columns_option_delimiter_and_quotes() {
        let mut op = build(
            r#"
            format = "csv"
            columns = ["ts", "dev", "temp"]
            delimiter = "|"
            features = ["temp"]
            device_field = "dev"
            timestamp_field = "ts"
            "#,
        );
        let mut raw = RawBatch::new(PayloadFormat::Unknown);
        raw.push("", b"1583748873|\"pump \"\"A\"\"|x\"|4.5", 0, 0);
        raw.push("", b"ts|dev|temp", 0, 1);
        raw.push("", b"1583748874|pump-b|", 0, 2);
        raw.push("", b"1583748875|\"unterminated|1", 0, 3);
        let (readings, errors, mut out) = run(&mut op, raw);
        assert_eq!(readings.len(), 1);
        let reading = readings.get(0).expect("reading");
        assert_eq!(&*reading.device.name(), "pump \"A\"|x");
        assert_eq!(reading.time_ms, 1_583_748_873_000);
        assert_eq!(reading.values, &[4.5]);
        assert_eq!(out.take_discarded(), vec![("csv_header", 1)]);
        let types: Vec<&str> = errors.iter().map(|error| &*error.error_type).collect();
        assert_eq!(types, ["missing_field", "parse"]);
        assert!(errors[0].reason.contains("temp"), "{}", errors[0].reason);
    }

    #[test]
    fn csv_header_names_are_trimmed_and_layouts_cached() {
        let mut op = build(
            r#"
            features = ["v"]
            device = "d"
            timestamp_field = "t"
            timestamp_format = "unix_s"
            "#,
        );
        let header: Arc<[Arc<str>]> =
            ["\u{feff}t", " v "].iter().map(|name| Arc::from(*name)).collect();
        for _ in 0..3 {
            let mut raw =
                RawBatch::new(PayloadFormat::Csv { header: Arc::clone(&header), delimiter: b',' });
            raw.push("", b" 2 , 0.5\n", 0, 0);
            let (readings, errors, _) = run(&mut op, raw);
            assert!(errors.is_empty(), "{errors:?}");
            assert_eq!(readings.times, vec![2_000]);
            assert_eq!(readings.values, vec![0.5]);
        }
        assert_eq!(op.layouts.len(), 1);
    }

    #[test]
    fn csv_without_header_is_unsupported() {
        let mut op = build(
            r#"
            format = "csv"
            features = ["temp"]
            device = "d"
            timestamp_field = "ts"
            "#,
        );
        let mut raw = RawBatch::new(PayloadFormat::Json);
        raw.push("t", b"1,2", 0, 0);
        let (readings, errors, _) = run(&mut op, raw);
        assert!(readings.is_empty());
        assert_eq!(errors.len(), 1);
        assert_eq!(&*errors[0].error_type, "unsupported_format");
        assert!(errors[0].reason.contains("columns"));
    }

    #[test]
    fn constant_device_versus_device_field() {
        let mut constant = build(
            r#"
            features = ["v"]
            device = "fixed"
            timestamp_field = "t"
            "#,
        );
        let (readings, errors, _) =
            run(&mut constant, json_batch(&[r#"{"t":1,"v":1,"dev":"other"}"#]));
        assert!(errors.is_empty());
        assert_eq!(readings.devices, vec![DeviceId::intern("fixed")]);

        let mut field = build(
            r#"
            features = ["v"]
            device_field = "dev"
            timestamp_field = "t"
            "#,
        );
        let (readings, errors, _) = run(
            &mut field,
            json_batch(&[
                r#"{"t":1,"v":1,"dev":"other"}"#,
                r#"{"t":1,"v":1,"dev":17}"#,
                r#"{"t":1,"v":1,"dev":"other"}"#,
            ]),
        );
        assert!(errors.is_empty());
        assert_eq!(
            readings.devices,
            vec![DeviceId::intern("other"), DeviceId::intern("17"), DeviceId::intern("other")]
        );
        let (readings, errors, _) = run(&mut field, json_batch(&[r#"{"t":1,"v":1}"#]));
        assert!(readings.is_empty());
        assert_eq!(&*errors[0].error_type, "missing_field");
        assert!(errors[0].reason.contains("dev"));
    }

    #[test]
    fn label_field_values() {
        let mut op = build(
            r#"
            features = ["v"]
            device = "d"
            timestamp_field = "t"
            label_field = "y"
            "#,
        );
        let (readings, errors, _) = run(
            &mut op,
            json_batch(&[
                r#"{"t":1,"v":1,"y":1}"#,
                r#"{"t":2,"v":1,"y":0}"#,
                r#"{"t":3,"v":1,"y":true}"#,
                r#"{"t":4,"v":1,"y":false}"#,
                r#"{"t":5,"v":1,"y":"1.0"}"#,
                r#"{"t":6,"v":1}"#,
                r#"{"t":7,"v":1,"y":null}"#,
                r#"{"t":8,"v":1,"y":0.5}"#,
                r#"{"t":9,"v":1,"y":"yes"}"#,
            ]),
        );
        assert_eq!(readings.labels, vec![1, 0, 1, 0, 1, 0, 0, 1]);
        assert_eq!(errors.len(), 1);
        assert_eq!(&*errors[0].error_type, "bad_value");
    }

    #[test]
    fn missing_feature_is_an_error_with_reason_and_payload() {
        let mut op = build(JSON_CONFIG);
        let payload = r#"{"dev":"p","ts":5,"temp":1}"#;
        let (readings, errors, _) = run(&mut op, json_batch(&[payload]));
        assert!(readings.is_empty());
        assert_eq!(errors.len(), 1);
        let error = &errors[0];
        assert_eq!(&*error.component, "norm");
        assert_eq!(&*error.error_type, "missing_field");
        assert_eq!(error.reason, "missing feature `pressure`");
        assert_eq!(error.topic.as_deref(), Some("sensors/a"));
        assert_eq!(error.payload.as_deref(), Some(payload));
    }

    #[test]
    fn missing_feature_becomes_nan_on_request() {
        let mut op = build(&format!("{JSON_CONFIG}\non_missing = \"nan\""));
        let (readings, errors, _) = run(
            &mut op,
            json_batch(&[
                r#"{"dev":"p","ts":5,"temp":1}"#,
                r#"{"dev":"p","ts":6,"temp":null,"pressure":""}"#,
            ]),
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(readings.len(), 2);
        let first = readings.get(0).expect("reading");
        assert_eq!(first.values[0], 1.0);
        assert!(first.values[1].is_nan());
        let second = readings.get(1).expect("reading");
        assert!(second.values.iter().all(|value| value.is_nan()));
        // The timestamp and device stay required.
        let (readings, errors, _) = run(&mut op, json_batch(&[r#"{"dev":"p","temp":1}"#]));
        assert!(readings.is_empty());
        assert_eq!(&*errors[0].error_type, "missing_field");
    }

    #[test]
    fn non_numeric_values_are_bad_values() {
        let mut op = build(JSON_CONFIG);
        let (readings, errors, _) = run(
            &mut op,
            json_batch(&[
                r#"{"dev":"p","ts":5,"temp":"hot","pressure":1}"#,
                r#"{"dev":"p","ts":5,"temp":[1],"pressure":1}"#,
                r#"{"dev":"p","ts":5,"temp":{"x":1},"pressure":1}"#,
                r#"{"dev":["p"],"ts":5,"temp":1,"pressure":1}"#,
            ]),
        );
        assert!(readings.is_empty());
        let types: Vec<&str> = errors.iter().map(|error| &*error.error_type).collect();
        assert_eq!(types, ["bad_value"; 4]);
        assert!(errors[0].reason.contains("\"hot\""), "{}", errors[0].reason);
    }

    #[test]
    fn bad_timestamps() {
        let mut op = build(JSON_CONFIG);
        let (readings, errors, _) = run(
            &mut op,
            json_batch(&[
                r#"{"dev":"p","ts":"yesterday","temp":1,"pressure":1}"#,
                r#"{"dev":"p","ts":true,"temp":1,"pressure":1}"#,
                r#"{"dev":"p","ts":1e300,"temp":1,"pressure":1}"#,
            ]),
        );
        assert!(readings.is_empty());
        let types: Vec<&str> = errors.iter().map(|error| &*error.error_type).collect();
        assert_eq!(types, ["bad_timestamp"; 3]);
    }

    #[test]
    fn malformed_json_is_a_parse_error_and_the_batch_goes_on() {
        let mut op = build(JSON_CONFIG);
        let (readings, errors, _) = run(
            &mut op,
            json_batch(&[
                r#"{"dev":"p","ts":1,"temp":1,"pressure":1}"#,
                r#"{"dev":"p","ts":2,"temp":1,"#,
                r#"[1,2,3]"#,
                r#"{"dev":"p","ts":3,"temp":1,"pressure":1} trailing"#,
                "\u{1}\u{2}",
                r#"{"dev":"p","ts":4,"temp":1,"pressure":1}"#,
            ]),
        );
        assert_eq!(readings.times, vec![1, 4]);
        let types: Vec<&str> = errors.iter().map(|error| &*error.error_type).collect();
        assert_eq!(types, ["parse"; 4]);
        assert!(errors[1].reason.contains("JSON object"), "{}", errors[1].reason);
    }

    #[test]
    fn unknown_format_is_rejected_per_message() {
        let mut op = build(
            r#"
            features = ["v"]
            device = "d"
            timestamp_field = "t"
            "#,
        );
        let mut raw = RawBatch::new(PayloadFormat::Unknown);
        raw.push("x", b"{\"t\":1,\"v\":2}", 0, 0);
        raw.push("x", b"{\"t\":1,\"v\":2}", 0, 1);
        let (readings, errors, _) = run(&mut op, raw);
        assert!(readings.is_empty());
        assert_eq!(errors.len(), 2);
        assert!(errors.iter().all(|error| &*error.error_type == "unsupported_format"));
        assert_eq!(errors[0].payload.as_deref(), Some("{\"t\":1,\"v\":2}"));
    }

    #[test]
    fn many_fields_use_the_hash_lookup() {
        let features: Vec<String> = (0..20).map(|index| format!("f{index}")).collect();
        let list = features.iter().map(|name| format!("{name:?}")).collect::<Vec<_>>().join(",");
        let mut op =
            build(&format!("features = [{list}]\ndevice = \"d\"\ntimestamp_field = \"t\"\n"));
        let body = features
            .iter()
            .enumerate()
            .rev()
            .map(|(index, name)| format!("\"{name}\":{index}"))
            .collect::<Vec<_>>()
            .join(",");
        let payload = format!("{{\"t\":1,{body}}}");
        let (readings, errors, _) = run(&mut op, json_batch(&[&payload]));
        assert!(errors.is_empty(), "{errors:?}");
        let expected: Vec<f32> = (0..20).map(|index| index as f32).collect();
        assert_eq!(readings.values, expected);
    }

    #[test]
    fn config_validation() {
        let factory = NormalizeFactory;
        let raw = PortType::of(Kind::Raw);
        let ctx = ValidateContext::default();
        let check = |toml: &str| factory.output_type(&config(toml), &raw, &ctx);

        let both = check(
            r#"
            features = ["v"]
            device = "d"
            device_field = "dev"
            timestamp_field = "t"
            "#,
        )
        .expect_err("both device options");
        assert_eq!(both.field.as_deref(), Some("device"));
        assert!(both.hint.is_some());

        let neither = check(
            r#"
            features = ["v"]
            timestamp_field = "t"
            "#,
        )
        .expect_err("no device option");
        assert_eq!(neither.field.as_deref(), Some("device_field"));

        let unknown = ConfigValue::parse(
            r#"
            features = ["v"]
            device = "d"
            timestamp_field = "t"
            colour = "blue"
            "#,
        )
        .expect("toml")
        .deserialize::<NormalizeConfig>()
        .expect_err("unknown option");
        assert!(unknown.message.contains("colour"), "{}", unknown.message);
        assert!(unknown.span.is_some());

        let missing_required = ConfigValue::parse("device = \"d\"\ntimestamp_field = \"t\"")
            .expect("toml")
            .deserialize::<NormalizeConfig>()
            .expect_err("features is required");
        assert!(missing_required.message.contains("features"), "{}", missing_required.message);

        for (toml, field) in [
            ("features = []\ndevice = \"d\"\ntimestamp_field = \"t\"", "features"),
            ("features = [\"a\",\"a\"]\ndevice = \"d\"\ntimestamp_field = \"t\"", "features"),
            (
                "features = [\"a\"]\nrename = { b = \"x\" }\ndevice = \"d\"\ntimestamp_field = \"t\"",
                "rename",
            ),
            (
                "features = [\"a\"]\ndelimiter = \"é\"\nformat = \"csv\"\ndevice = \"d\"\ntimestamp_field = \"t\"",
                "delimiter",
            ),
            (
                "features = [\"a\"]\nformat = \"csv\"\ncolumns = [\"t\"]\ndevice = \"d\"\ntimestamp_field = \"t\"",
                "columns",
            ),
            (
                "features = [\"a\"]\nformat = \"json\"\ncolumns = [\"t\", \"a\"]\ndevice = \"d\"\ntimestamp_field = \"t\"",
                "columns",
            ),
        ] {
            let error = check(toml).expect_err(toml);
            assert_eq!(error.field.as_deref(), Some(field), "{toml}: {error:?}");
        }

        let good = check(JSON_CONFIG).expect("valid");
        assert_eq!(good.kind, Kind::Readings);
        assert_eq!(good.schema.as_deref(), Some(&Schema::new(["temp", "pressure"])));
        let wrong_input =
            factory.output_type(&config(JSON_CONFIG), &PortType::of(Kind::Readings), &ctx);
        assert!(wrong_input.is_err());
        assert!(factory.properties(&config(JSON_CONFIG)).assigns_event_time);
    }

    mod never_panics {
        use proptest::prelude::*;

        use super::*;

        fn count(op: &mut Normalize, raw: RawBatch) -> (usize, usize, u64) {
            let mut out = Outputs::new("norm");
            op.process_batch(Batch::Raw(raw), &mut out);
            let readings: usize = out.take_main().iter().map(Batch::len).sum();
            let errors = out.take_errors().len();
            let discarded: u64 = out.take_discarded().iter().map(|(_, count)| count).sum();
            (readings, errors, discarded)
        }

        fn payloads() -> impl Strategy<Value = Vec<Vec<u8>>> {
            let bytes = proptest::collection::vec(any::<u8>(), 0..64);
            let jsonish = "[{}\\[\\]\":,;0-9a-zA-Z. \\-\\\\]{0,48}".prop_map(String::into_bytes);
            let object = (any::<i32>(), any::<f32>(), "[a-z0-9\" ]{0,6}").prop_map(|(t, v, d)| {
                format!("{{\"t\":{t},\"v\":{v},\"d\":\"{d}\"}}").into_bytes()
            });
            let line = (any::<i64>(), "[a-z0-9;\"., -]{0,12}", any::<f64>())
                .prop_map(|(t, d, v)| format!("{t};{d};{v}").into_bytes());
            proptest::collection::vec(prop_oneof![bytes, jsonish, object, line], 0..24)
        }

        proptest! {
            #[test]
            fn json_and_csv_account_for_every_message(payloads in payloads()) {
                let json = r#"
                    format = "json"
                    features = ["v", "w"]
                    device_field = "d"
                    timestamp_field = "t"
                    label_field = "y"
                    on_missing = "nan"
                "#;
                let csv = r#"
                    format = "csv"
                    columns = ["t", "d", "v"]
                    delimiter = ";"
                    features = ["v"]
                    device_field = "d"
                    timestamp_field = "t"
                "#;
                for toml in [json, csv] {
                    let mut op = build(toml);
                    let mut raw = RawBatch::new(PayloadFormat::Unknown);
                    for (position, payload) in payloads.iter().enumerate() {
                        raw.push("topic", payload, 0, position as u64);
                    }
                    let (readings, errors, discarded) = count(&mut op, raw);
                    prop_assert_eq!(readings + errors + discarded as usize, payloads.len());
                }
            }
        }
    }
}
