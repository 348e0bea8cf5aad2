//! `normalize`: raw messages (JSON objects or delimited lines) to [`ReadingBatch`]es — the
//! mediation step between what devices send and what the detectors read.
//!
//! Each message becomes one reading: a device, an event time, the configured features in order
//! and an optional label. On the way, `normalize` can read nested fields through JSON pointers
//! (`/sensors/0/vib`), take the device id from the message's topic (`topic_template`), convert
//! units or apply linear transforms per feature (`convert`), fill in missing values
//! (`on_missing`, `missing`) and standardise the features with a model's scaler
//! (`scale_from_model`), in that order. A message that cannot be read goes to `<id>.errors`
//! with a short `error_type` (`parse`, `missing_field`, `bad_value`, `bad_timestamp`, `topic_mismatch`,
//! `unsupported_format`), the reason, its topic and its payload, and the batch goes on.
//!
//! The data path allocates nothing per message: JSON objects are read by a serde visitor that
//! matches keys against the needed field names and skips every other value (a pointer descends
//! only into the objects and arrays on its path), CSV lines are split once with the column
//! positions worked out once per distinct header, and device names are interned through a
//! per-operator cache.

mod topic;
mod units;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use serde::Deserializer as _;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use tidewatch_api::{
    Batch, ComponentContext, ComponentError, ConfigError, DeviceId, EventTime, Kind, LABEL_ANOMALY,
    LABEL_NORMAL, PayloadFormat, PortType, RawBatch, ReadingBatch, Schema, TimestampFormat,
    Transform, TransformFactory, TransformProperties, ValidateContext, parse_timestamp,
    timestamp_from_number,
};
use tidewatch_inference::{ModelSpec, model_files};

use self::topic::TopicTemplate;
use self::units::Linear;
pub use self::units::{Conversion, Quantity, Unit};
use crate::util::{IdHash, config_error, excerpt};

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

/// What `normalize` does with a message that lacks a feature (absent, `null` or empty text).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnMissing {
    /// The message goes to `<id>.errors` with `missing_field`.
    #[default]
    Error,
    /// The missing feature is NaN and the reading is emitted.
    Nan,
    /// The message is dropped and counted as `missing_value` (not an error).
    Drop,
    /// The feature takes the last value read for it from the same device (after `convert`,
    /// before scaling); NaN while the device has none yet.
    HoldLast,
    /// The feature takes `fill_values.<feature>`, else `fill_value` (in the unit after
    /// `convert`, before scaling).
    Fill,
}

/// How `normalize` reads a message: the payload format, where the device, the event time,
/// the features and the label are, and the default missing-value policy.
///
/// The options beyond reading (topics, conversions, per-feature missing values, scaling) are in
/// [`MediationConfig`]; [`NormalizeOptions`] holds both and is what a pipeline file gives.
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
    /// the field of its own name. A field starting with `/` is a JSON pointer (RFC 6901) into
    /// nested objects and arrays: `"/sensors/0/vib"`.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// Field (or JSON pointer) that holds the device id (text or number). Exactly one of
    /// `device_field`, `device` and `device_from_topic` must be set.
    #[serde(default)]
    pub device_field: Option<String>,
    /// Constant device id for every message. Exactly one of `device_field`, `device` and
    /// `device_from_topic` must be set.
    #[serde(default)]
    pub device: Option<String>,
    /// Field (or JSON pointer) that holds the event time.
    pub timestamp_field: String,
    /// How the event time is written: `auto`, `unix_ms`, `unix_s`, `unix_us`, `unix_ns`,
    /// `rfc3339` or `datetime`.
    #[serde(default)]
    pub timestamp_format: TimestampFormat,
    /// Field (or JSON pointer) that holds the anomaly label (number or boolean; nonzero or
    /// `true` means anomalous). A message without it is labelled normal.
    #[serde(default)]
    pub label_field: Option<String>,
    /// What to do when a feature is missing (absent, `null` or empty): `error`, `nan`, `drop`,
    /// `hold_last` or `fill`; `missing` overrides it per feature.
    #[serde(default)]
    pub on_missing: OnMissing,
}

/// What `normalize` does with the values it read: the device id from the topic, unit
/// conversions, per-feature missing-value policies and scaling. Every option is off by default.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MediationConfig {
    /// The shape of the messages' topics (MQTT topic, or file name), `/`-separated, with a
    /// `{name}` capture per varying segment (and `+`, a final `#`, as in the `mqtt` source):
    /// `"factory/{site}/pump/{device}/telemetry"`. A message whose topic does not match goes
    /// to `<id>.errors` as `topic_mismatch`.
    pub topic_template: Option<String>,
    /// The device id from the topic: a capture name of `topic_template` (`"device"`), or a
    /// pattern of captures and text (`"{site}-{device}"`).
    pub device_from_topic: Option<String>,
    /// Conversion of each listed feature, applied after reading and before scaling.
    pub convert: BTreeMap<String, Conversion>,
    /// Missing-value policy per feature, overriding `on_missing`.
    pub missing: BTreeMap<String, OnMissing>,
    /// The value of a missing feature whose policy is `fill`.
    pub fill_value: Option<f32>,
    /// Per-feature fill values, overriding `fill_value`.
    pub fill_values: BTreeMap<String, f32>,
    /// A model (folder, `model.json` or `model.onnx`) whose scaler standardises the features:
    /// `z = (x - mean) / std`. Relative to the pipeline file's folder.
    pub scale_from_model: Option<String>,
}

/// Every option of the `normalize` transform, as a `[transforms.<id>]` table gives them (one
/// flat table: the reading options of [`NormalizeConfig`] beside those of [`MediationConfig`]).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(from = "FlatOptions")]
pub struct NormalizeOptions {
    /// How messages are read.
    pub read: NormalizeConfig,
    /// What is done with the values read.
    pub mediation: MediationConfig,
}

impl From<NormalizeConfig> for NormalizeOptions {
    fn from(read: NormalizeConfig) -> NormalizeOptions {
        NormalizeOptions { read, mediation: MediationConfig::default() }
    }
}

/// The flat table of every option (see the fields of [`NormalizeConfig`] and
/// [`MediationConfig`]).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlatOptions {
    #[serde(default)]
    format: NormalizeFormat,
    #[serde(default)]
    delimiter: Option<char>,
    #[serde(default)]
    columns: Option<Vec<String>>,
    features: Vec<String>,
    #[serde(default)]
    rename: BTreeMap<String, String>,
    #[serde(default)]
    device_field: Option<String>,
    #[serde(default)]
    device: Option<String>,
    timestamp_field: String,
    #[serde(default)]
    timestamp_format: TimestampFormat,
    #[serde(default)]
    label_field: Option<String>,
    #[serde(default)]
    on_missing: OnMissing,
    #[serde(default)]
    topic_template: Option<String>,
    #[serde(default)]
    device_from_topic: Option<String>,
    #[serde(default)]
    convert: BTreeMap<String, Conversion>,
    #[serde(default)]
    missing: BTreeMap<String, OnMissing>,
    #[serde(default)]
    fill_value: Option<f32>,
    #[serde(default)]
    fill_values: BTreeMap<String, f32>,
    #[serde(default)]
    scale_from_model: Option<String>,
}

impl From<FlatOptions> for NormalizeOptions {
    fn from(flat: FlatOptions) -> NormalizeOptions {
        NormalizeOptions {
            read: NormalizeConfig {
                format: flat.format,
                delimiter: flat.delimiter,
                columns: flat.columns,
                features: flat.features,
                rename: flat.rename,
                device_field: flat.device_field,
                device: flat.device,
                timestamp_field: flat.timestamp_field,
                timestamp_format: flat.timestamp_format,
                label_field: flat.label_field,
                on_missing: flat.on_missing,
            },
            mediation: MediationConfig {
                topic_template: flat.topic_template,
                device_from_topic: flat.device_from_topic,
                convert: flat.convert,
                missing: flat.missing,
                fill_value: flat.fill_value,
                fill_values: flat.fill_values,
                scale_from_model: flat.scale_from_model,
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Field paths: plain names and JSON pointers
// ---------------------------------------------------------------------------------------------

/// A source field: a top-level key, or a JSON pointer's tokens (the first one a top-level key).
fn field_path(option: &str, spec: &str) -> Result<Vec<Box<str>>, ConfigError> {
    let Some(pointer) = spec.strip_prefix('/') else {
        return Ok(vec![spec.into()]);
    };
    pointer
        .split('/')
        .map(|token| {
            let mut decoded = String::with_capacity(token.len());
            let mut chars = token.chars();
            while let Some(c) = chars.next() {
                if c != '~' {
                    decoded.push(c);
                    continue;
                }
                match chars.next() {
                    Some('0') => decoded.push('~'),
                    Some('1') => decoded.push('/'),
                    _ => {
                        return Err(ConfigError::at_field(
                            option,
                            format!("JSON pointer {spec:?} has a `~` not followed by 0 or 1"),
                        )
                        .with_hint("write `~0` for `~` and `~1` for `/` inside a key"));
                    }
                }
            }
            Ok(decoded.into_boxed_str())
        })
        .collect()
}

/// The array index a pointer token stands for, if it is one (`0`, or digits without a
/// leading zero).
fn array_index(token: &str) -> Option<usize> {
    if token.is_empty() || (token.len() > 1 && token.starts_with('0')) {
        return None;
    }
    if !token.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    token.parse().ok()
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

/// Above this many distinct top-level keys, keys are looked up in a hash map instead of a
/// linear scan.
const LINEAR_LOOKUP_LIMIT: usize = 16;

/// A distinct source field (path) and what it feeds.
#[derive(Debug)]
struct Field {
    path: Vec<Box<str>>,
    /// As written in the options: `temp` or `/sensors/0/vib`.
    name: Box<str>,
    targets: Vec<Target>,
}

/// A child of a node on a pointer's path.
#[derive(Debug)]
struct Child {
    key: Box<str>,
    index: Option<usize>,
    node: usize,
}

/// A place in the message: a field ends here, or pointers go deeper, or both.
#[derive(Debug, Default)]
struct Node {
    field: Option<usize>,
    children: Vec<Child>,
}

#[derive(Debug)]
struct Plan {
    /// Distinct top-level keys.
    names: Vec<Box<str>>,
    /// The node of each top-level key.
    roots: Vec<usize>,
    nodes: Vec<Node>,
    /// Key -> top-level key index, when there are many keys.
    index: Option<HashMap<Box<str>, usize>>,
    fields: Vec<Field>,
    /// Feature names of the output schema.
    features: Vec<Box<str>>,
    /// Source field of each feature.
    feature_fields: Vec<usize>,
    device_field: Option<usize>,
    timestamp_field: usize,
    timestamp_format: TimestampFormat,
}

impl Plan {
    fn add(&mut self, option: &str, spec: &str, target: Target) -> Result<usize, ConfigError> {
        let path = field_path(option, spec)?;
        if let Some(field) = self.fields.iter().position(|field| field.path == path) {
            if let Some(field) = self.fields.get_mut(field) {
                field.targets.push(target);
            }
            return Ok(field);
        }
        let field = self.fields.len();
        self.fields.push(Field { path: path.clone(), name: spec.into(), targets: vec![target] });
        let mut tokens = path.into_iter();
        let first = tokens.next().unwrap_or_default();
        let mut node = match self.names.iter().position(|known| *known == first) {
            Some(key) => self.roots.get(key).copied().unwrap_or_default(),
            None => {
                self.names.push(first);
                self.nodes.push(Node::default());
                self.roots.push(self.nodes.len() - 1);
                self.nodes.len() - 1
            }
        };
        for token in tokens {
            let existing = self.nodes.get(node).and_then(|parent| {
                parent.children.iter().find(|child| child.key == token).map(|child| child.node)
            });
            node = match existing {
                Some(child) => child,
                None => {
                    self.nodes.push(Node::default());
                    let child = self.nodes.len() - 1;
                    if let Some(parent) = self.nodes.get_mut(node) {
                        let index = array_index(&token);
                        parent.children.push(Child { key: token, index, node: child });
                    }
                    child
                }
            };
        }
        if let Some(end) = self.nodes.get_mut(node) {
            end.field = Some(field);
        }
        Ok(field)
    }

    /// The top-level key index of `key`.
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

    /// The node of top-level key `key`.
    #[inline]
    fn root(&self, key: usize) -> Option<&Node> {
        self.roots.get(key).and_then(|node| self.nodes.get(*node))
    }

    fn field_name(&self, field: usize) -> &str {
        self.fields.get(field).map_or("?", |field| &field.name)
    }

    /// True when a field is deeper than a top-level key.
    fn nested(&self) -> bool {
        self.fields.iter().any(|field| field.path.len() > 1)
    }
}

// ---------------------------------------------------------------------------------------------
// Checking the options
// ---------------------------------------------------------------------------------------------

/// The per-feature mediation, worked out once.
#[derive(Debug)]
struct Mediation {
    topic: Option<TopicTemplate>,
    /// Conversion of each feature (identity when not converted).
    convert: Vec<Option<Linear>>,
    /// Missing-value policy of each feature.
    policies: Vec<OnMissing>,
    /// Fill value of each feature (NaN unless its policy is `fill`).
    fills: Vec<f32>,
    /// `(mean, 1 / std)` of each feature.
    scale: Option<Vec<(f32, f32)>>,
}

/// Everything derived from the options once: the checks of `output_type` and `build`.
#[derive(Debug)]
struct Prepared {
    plan: Plan,
    schema: Arc<Schema>,
    columns: Option<Arc<[Arc<str>]>>,
    delimiter: Option<u8>,
    mediation: Mediation,
}

/// An error unless every key of table option `option` is a feature.
fn keys_are_features<'a>(
    option: &str,
    mut keys: impl Iterator<Item = &'a String>,
    features: &[String],
) -> Result<(), ConfigError> {
    match keys.find(|key| !features.contains(key)) {
        None => Ok(()),
        Some(key) => Err(ConfigError::at_field(
            option,
            format!("`{option}` names `{key}`, which is not one of `features`"),
        )
        .with_hint(format!("key `{option}` by feature name: {features:?}"))),
    }
}

fn prepare(options: &NormalizeOptions, base_dir: &Path) -> Result<Prepared, ConfigError> {
    let config = &options.read;
    let extra = &options.mediation;
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
    keys_are_features("rename", config.rename.keys(), &config.features)?;
    for (feature, field) in &config.rename {
        if field.is_empty() {
            return Err(ConfigError::at_field(
                "rename",
                format!("`rename` maps `{feature}` to an empty field name"),
            ));
        }
    }
    let device_options =
        [config.device_field.is_some(), config.device.is_some(), extra.device_from_topic.is_some()];
    let device_hint = "use `device_field` to read the device id from each message, \
                       `device_from_topic` to take it from the topic, or `device` for one \
                       constant device id";
    match device_options.iter().filter(|set| **set).count() {
        0 => {
            return Err(ConfigError::at_field(
                "device_field",
                "none of `device_field`, `device` and `device_from_topic` is set; set exactly one",
            )
            .with_hint(device_hint));
        }
        1 => {}
        _ => {
            let field = if config.device.is_some() { "device" } else { "device_from_topic" };
            return Err(ConfigError::at_field(
                field,
                "more than one of `device_field`, `device` and `device_from_topic` is set; \
                 set exactly one",
            )
            .with_hint(device_hint));
        }
    }
    if config.device_field.as_deref() == Some("") {
        return Err(ConfigError::at_field("device_field", "`device_field` is empty"));
    }
    if config.device.as_deref() == Some("") {
        return Err(ConfigError::at_field("device", "`device` is empty"));
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
        roots: Vec::new(),
        nodes: Vec::new(),
        index: None,
        fields: Vec::new(),
        features: config.features.iter().map(|name| name.as_str().into()).collect(),
        feature_fields: Vec::with_capacity(config.features.len()),
        device_field: None,
        timestamp_field: 0,
        timestamp_format: config.timestamp_format,
    };
    for (position, feature) in config.features.iter().enumerate() {
        let (option, source) = match config.rename.get(feature) {
            Some(source) => ("rename", source),
            None => ("features", feature),
        };
        let field = plan.add(option, source, Target::Feature(position))?;
        plan.feature_fields.push(field);
    }
    if let Some(device_field) = &config.device_field {
        plan.device_field = Some(plan.add("device_field", device_field, Target::Device)?);
    }
    plan.timestamp_field =
        plan.add("timestamp_field", &config.timestamp_field, Target::Timestamp)?;
    if let Some(label_field) = &config.label_field {
        plan.add("label_field", label_field, Target::Label)?;
    }
    if plan.names.len() > LINEAR_LOOKUP_LIMIT {
        plan.index =
            Some(plan.names.iter().enumerate().map(|(key, name)| (name.clone(), key)).collect());
    }
    if plan.nested() && (config.format == NormalizeFormat::Csv || config.columns.is_some()) {
        let nested = plan.fields.iter().find(|field| field.path.len() > 1);
        return Err(ConfigError::at_field(
            "format",
            format!(
                "the JSON pointer {:?} reaches into nested values, which CSV lines do not have",
                nested.map_or("?", |field| &*field.name)
            ),
        )
        .with_hint("read CSV columns by name; pointers need JSON payloads"));
    }

    let mediation = prepare_mediation(config, extra, base_dir)?;

    let columns = match &config.columns {
        None => None,
        Some(columns) => {
            if columns.is_empty() {
                return Err(ConfigError::at_field("columns", "`columns` is empty"));
            }
            let column_of = |field: usize| -> &str {
                plan.fields
                    .get(field)
                    .and_then(|field| field.path.first())
                    .map_or("?", |key| &**key)
            };
            let mut required: Vec<&str> = vec![column_of(plan.timestamp_field)];
            if let Some(device_field) = plan.device_field {
                required.push(column_of(device_field));
            }
            for (position, field) in plan.feature_fields.iter().enumerate() {
                if mediation.policies.get(position) == Some(&OnMissing::Error) {
                    required.push(column_of(*field));
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
    Ok(Prepared { plan, schema, columns, delimiter, mediation })
}

fn prepare_mediation(
    config: &NormalizeConfig,
    extra: &MediationConfig,
    base_dir: &Path,
) -> Result<Mediation, ConfigError> {
    let features = &config.features;
    let topic = match (&extra.topic_template, &extra.device_from_topic) {
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

    keys_are_features("convert", extra.convert.keys(), features)?;
    let mut convert = vec![None; features.len()];
    for (feature, conversion) in &extra.convert {
        if let Some(position) = features.iter().position(|name| name == feature) {
            let linear = conversion.linear(feature)?;
            if linear.scale != 1.0 || linear.offset != 0.0 {
                convert[position] = Some(linear);
            }
        }
    }

    keys_are_features("missing", extra.missing.keys(), features)?;
    let policies: Vec<OnMissing> = features
        .iter()
        .map(|feature| extra.missing.get(feature).copied().unwrap_or(config.on_missing))
        .collect();
    keys_are_features("fill_values", extra.fill_values.keys(), features)?;
    let mut fills = vec![f32::NAN; features.len()];
    for (position, feature) in features.iter().enumerate() {
        let policy = policies.get(position).copied().unwrap_or_default();
        let value = extra.fill_values.get(feature).copied().or(extra.fill_value);
        match (policy, value) {
            (OnMissing::Fill, Some(value)) => fills[position] = value,
            (OnMissing::Fill, None) => {
                return Err(ConfigError::at_field(
                    "fill_value",
                    format!("feature `{feature}` is filled when missing, but has no fill value"),
                )
                .with_hint("set `fill_value` (every filled feature) or `fill_values.<feature>`"));
            }
            _ => {}
        }
        if extra.fill_values.contains_key(feature) && policy != OnMissing::Fill {
            return Err(ConfigError::at_field(
                "fill_values",
                format!("`fill_values` sets `{feature}`, whose missing-value policy is not `fill`"),
            )
            .with_hint("set on_missing = \"fill\", or missing.<feature> = \"fill\""));
        }
    }
    if extra.fill_value.is_some() && !policies.contains(&OnMissing::Fill) {
        return Err(ConfigError::at_field(
            "fill_value",
            "`fill_value` is set but no feature's missing-value policy is `fill`",
        )
        .with_hint("set on_missing = \"fill\", or missing.<feature> = \"fill\""));
    }

    let scale = match &extra.scale_from_model {
        None => None,
        Some(location) => Some(model_scaler(features, &base_dir.join(location))?),
    };
    Ok(Mediation { topic, convert, policies, fills, scale })
}

/// `(mean, 1 / std)` of each feature from the scaler of the model at `location`.
fn model_scaler(features: &[String], location: &Path) -> Result<Vec<(f32, f32)>, ConfigError> {
    let (json, _) = model_files(location);
    let spec = ModelSpec::read(&json).map_err(|error| {
        ConfigError::at_field("scale_from_model", error.to_string())
            .with_hint("point at a model folder or its model.json (training/train.py writes one)")
    })?;
    let factors = spec.scaler.factors();
    features
        .iter()
        .map(|feature| {
            spec.features
                .iter()
                .position(|name| name == feature)
                .and_then(|position| factors.get(position).copied())
                .ok_or_else(|| {
                    ConfigError::at_field(
                        "scale_from_model",
                        format!(
                            "feature `{feature}` is not one of the model's features {:?}",
                            spec.features
                        ),
                    )
                    .with_hint("name the features as the model does (use `rename` for the fields)")
                })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Factory
// ---------------------------------------------------------------------------------------------

/// Factory of the `normalize` transform.
#[derive(Clone, Copy, Debug, Default)]
pub struct NormalizeFactory;

impl TransformFactory for NormalizeFactory {
    type Config = NormalizeOptions;

    fn accepts(&self, _config: &NormalizeOptions) -> Vec<Kind> {
        vec![Kind::Raw]
    }

    fn output_type(
        &self,
        config: &NormalizeOptions,
        input: &PortType,
        ctx: &ValidateContext,
    ) -> Result<PortType, ConfigError> {
        if input.kind != Kind::Raw {
            return Err(ConfigError::new(format!(
                "`normalize` reads raw messages, but its input carries {}",
                input.kind
            ))
            .with_hint("connect `normalize` to a source"));
        }
        let prepared = prepare(config, &ctx.pipeline.base_dir)?;
        Ok(PortType::with_schema(Kind::Readings, prepared.schema))
    }

    fn properties(&self, _config: &NormalizeOptions) -> TransformProperties {
        TransformProperties { keyed: false, assigns_event_time: true, late_output: false }
    }

    fn build(
        &self,
        config: &NormalizeOptions,
        ctx: &ComponentContext,
    ) -> Result<Box<dyn Transform>, ComponentError> {
        let operator = Normalize::with_options(config, ctx).map_err(config_error)?;
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
        let Some(targets) = self.fields.get(field).map(|field| &field.targets) else { return };
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
// JSON: a visitor over the top-level object, descending only along the pointers' paths
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
            match key.and_then(|key| fill.plan.root(key)) {
                Some(node) => map.next_value_seed(ValueSeed {
                    plan: fill.plan,
                    node,
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

/// Reads a top-level key and tells which needed key it is, if any.
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

/// Reads a key of a nested object and tells which child of `node` it names, if any.
struct ChildKeySeed<'p>(&'p Plan, &'p Node);

impl<'de, 'p> DeserializeSeed<'de> for ChildKeySeed<'p> {
    type Value = Option<&'p Node>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de, 'p> Visitor<'de> for ChildKeySeed<'p> {
    type Value = Option<&'p Node>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        let ChildKeySeed(plan, node) = self;
        Ok(node
            .children
            .iter()
            .find(|child| &*child.key == key)
            .and_then(|child| plan.nodes.get(child.node)))
    }
}

/// Reads the value at a node: a needed field's value straight into the message, and the
/// nested values that pointers reach through it.
struct ValueSeed<'p> {
    plan: &'p Plan,
    node: &'p Node,
    msg: &'p mut Message,
    devices: &'p mut DeviceCache,
}

impl ValueSeed<'_> {
    fn apply(self, value: Value<'_>) {
        if let Some(field) = self.node.field {
            self.plan.apply(field, value, self.msg, self.devices);
        }
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
        if self.node.children.is_empty() {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        } else {
            while let Some(child) = map.next_key_seed(ChildKeySeed(self.plan, self.node))? {
                match child {
                    Some(node) => map.next_value_seed(ValueSeed {
                        plan: self.plan,
                        node,
                        msg: &mut *self.msg,
                        devices: &mut *self.devices,
                    })?,
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
        }
        self.apply(Value::Composite);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.node.children.iter().all(|child| child.index.is_none()) {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
        } else {
            let mut position = 0;
            loop {
                let child = self
                    .node
                    .children
                    .iter()
                    .find(|child| child.index == Some(position))
                    .and_then(|child| self.plan.nodes.get(child.node));
                let more = match child {
                    Some(node) => seq
                        .next_element_seed(ValueSeed {
                            plan: self.plan,
                            node,
                            msg: &mut *self.msg,
                            devices: &mut *self.devices,
                        })?
                        .is_some(),
                    None => seq.next_element::<IgnoredAny>()?.is_some(),
                };
                if !more {
                    break;
                }
                position += 1;
            }
        }
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
            .map(|name| {
                plan.lookup(name.trim_start_matches('\u{feff}').trim())
                    .and_then(|key| plan.root(key))
                    .and_then(|node| node.field)
            })
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
    mediation: Mediation,
    /// True when every feature's missing-value policy is `error`.
    strict: bool,
    /// True when a feature is converted.
    converts: bool,
    /// The features whose policy is `hold_last`.
    hold_positions: Vec<usize>,
    /// The last value read of each feature, per device (only with `hold_last`).
    held: HashMap<DeviceId, Box<[f32]>, IdHash>,
    constant_device: Option<DeviceId>,
    devices: DeviceCache,
    layouts: Vec<CsvLayout>,
    msg: Message,
    /// Reused by topic matching.
    captures: Vec<Range<usize>>,
    device_buffer: String,
}

/// How the messages of one batch are read.
enum Mode {
    Json,
    Csv(usize),
    Unsupported(String),
}

/// What becomes of an assembled message.
enum Verdict {
    Emit,
    Error(String),
    Drop,
}

/// The checkpointed state of `hold_last`: the last values per device.
#[derive(Serialize, Deserialize)]
struct HeldSnapshot {
    features: Vec<String>,
    /// `(device, f32 bits of each feature)`.
    devices: Vec<(DeviceId, Vec<u32>)>,
}

impl Normalize {
    /// Builds the transform from its reading options only (no mediation).
    pub fn new(config: &NormalizeConfig, ctx: &ComponentContext) -> Result<Normalize, ConfigError> {
        Normalize::with_options(&NormalizeOptions::from(config.clone()), ctx)
    }

    /// Builds the transform from all its options (the same checks as the factory's).
    pub fn with_options(
        options: &NormalizeOptions,
        ctx: &ComponentContext,
    ) -> Result<Normalize, ConfigError> {
        let Prepared { plan, schema, columns, delimiter, mediation } =
            prepare(options, &ctx.pipeline.base_dir)?;
        let width = schema.len();
        let strict = mediation.policies.iter().all(|policy| *policy == OnMissing::Error);
        let converts = mediation.convert.iter().any(Option::is_some);
        let hold_positions = (0..width)
            .filter(|position| mediation.policies.get(*position) == Some(&OnMissing::HoldLast))
            .collect();
        let config = &options.read;
        Ok(Normalize {
            plan,
            schema,
            format: config.format,
            columns,
            delimiter,
            mediation,
            strict,
            converts,
            hold_positions,
            held: HashMap::default(),
            constant_device: config.device.as_deref().map(DeviceId::intern),
            devices: DeviceCache::default(),
            layouts: Vec::new(),
            msg: Message::new(width),
            captures: Vec::new(),
            device_buffer: String::new(),
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
        let mut dropped = 0u64;
        for message in raw.iter() {
            self.msg.reset(self.constant_device);
            if let Some(template) = &self.mediation.topic {
                if !template.matches(message.topic, &mut self.captures) {
                    out.error(
                        "topic_mismatch",
                        format!(
                            "topic {:?} does not match `topic_template` {:?}",
                            excerpt(message.topic, 256),
                            template.text()
                        ),
                        Some(message.topic),
                        Some(message.payload),
                    );
                    continue;
                }
                if let Some(name) =
                    template.device(message.topic, &self.captures, &mut self.device_buffer)
                {
                    self.msg.device = Some(self.devices.get(name));
                }
            }
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
            match self.verdict() {
                Verdict::Emit => {}
                Verdict::Error(reason) => {
                    out.error("missing_field", reason, Some(message.topic), Some(message.payload));
                    continue;
                }
                Verdict::Drop => {
                    dropped += 1;
                    continue;
                }
            }
            let (Some(device), Some(time)) = (self.msg.device, self.msg.time) else {
                continue;
            };
            self.mediate(device);
            readings.push(device, time, &self.msg.values, self.msg.label);
        }
        out.discard("csv_header", header_lines);
        out.discard("missing_value", dropped);
        out.emit(Batch::Readings(readings));
    }

    /// Whether the assembled message becomes a reading, an error (with the reason) or is
    /// dropped, by the missing-value policies of its missing features.
    fn verdict(&self) -> Verdict {
        if self.msg.device.is_none() {
            let field = self.plan.device_field.map_or("?", |field| self.plan.field_name(field));
            return Verdict::Error(format!("missing device field `{field}`"));
        }
        if self.msg.time.is_none() {
            return Verdict::Error(format!(
                "missing timestamp field `{}`",
                self.plan.field_name(self.plan.timestamp_field)
            ));
        }
        let missing = |position: usize| !self.msg.present.get(position).copied().unwrap_or(true);
        let width = self.msg.present.len();
        let policy = |position: usize| {
            self.mediation.policies.get(position).copied().unwrap_or(OnMissing::Error)
        };
        if let Some(position) =
            (0..width).find(|position| missing(*position) && policy(*position) == OnMissing::Error)
        {
            let feature = self.plan.features.get(position).map_or("?", |name| name);
            let field = self
                .plan
                .feature_fields
                .get(position)
                .map_or("?", |field| self.plan.field_name(*field));
            return Verdict::Error(if feature == field {
                format!("missing feature `{feature}`")
            } else {
                format!("missing field `{field}` (feature `{feature}`)")
            });
        }
        if !self.strict
            && (0..width).any(|position| missing(position) && policy(position) == OnMissing::Drop)
        {
            return Verdict::Drop;
        }
        Verdict::Emit
    }

    /// Converts the values read, fills in the missing ones, remembers what `hold_last` needs
    /// and scales: the values of the reading of `device`.
    fn mediate(&mut self, device: DeviceId) {
        let Mediation { convert, policies, fills, scale, .. } = &self.mediation;
        let msg = &mut self.msg;
        if self.converts {
            for ((value, present), conversion) in
                msg.values.iter_mut().zip(&msg.present).zip(convert)
            {
                if let (true, Some(conversion)) = (*present, conversion) {
                    *value = conversion.apply(*value);
                }
            }
        }
        if !self.strict {
            let mut held = None;
            if !self.hold_positions.is_empty() {
                let width = msg.values.len();
                let last = self
                    .held
                    .entry(device)
                    .or_insert_with(|| vec![f32::NAN; width].into_boxed_slice());
                for position in &self.hold_positions {
                    if let (Some(true), Some(value), Some(slot)) = (
                        msg.present.get(*position),
                        msg.values.get(*position),
                        last.get_mut(*position),
                    ) {
                        *slot = *value;
                    }
                }
                held = Some(&**last);
            }
            for (position, (value, present)) in msg.values.iter_mut().zip(&msg.present).enumerate()
            {
                if *present {
                    continue;
                }
                *value = match policies.get(position) {
                    Some(OnMissing::Fill) => fills.get(position).copied().unwrap_or(f32::NAN),
                    Some(OnMissing::HoldLast) => {
                        held.and_then(|held| held.get(position).copied()).unwrap_or(f32::NAN)
                    }
                    _ => f32::NAN,
                };
            }
        }
        if let Some(scale) = scale {
            for (value, (mean, inverse_std)) in msg.values.iter_mut().zip(scale) {
                *value = (*value - mean) * inverse_std;
            }
        }
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

    /// With `hold_last`, the last value of each feature per device; otherwise stateless.
    fn snapshot(&mut self) -> Result<Option<Vec<u8>>, ComponentError> {
        if self.hold_positions.is_empty() {
            return Ok(None);
        }
        let mut devices: Vec<(DeviceId, Vec<u32>)> = self
            .held
            .iter()
            .map(|(device, values)| (*device, values.iter().map(|value| value.to_bits()).collect()))
            .collect();
        devices.sort_unstable_by_key(|(device, _)| *device);
        let snapshot = HeldSnapshot {
            features: self.plan.features.iter().map(|name| name.to_string()).collect(),
            devices,
        };
        serde_json::to_vec(&snapshot)
            .map(Some)
            .map_err(|error| ComponentError::Internal(format!("normalize snapshot: {error}")))
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), ComponentError> {
        let snapshot: HeldSnapshot = serde_json::from_slice(state)
            .map_err(|error| ComponentError::Internal(format!("normalize snapshot: {error}")))?;
        let features: Vec<&str> = self.plan.features.iter().map(|name| &**name).collect();
        if snapshot.features != features {
            return Err(ComponentError::Config(format!(
                "the normalize snapshot was taken with features {:?}, not {features:?}",
                snapshot.features
            )));
        }
        self.held = snapshot
            .devices
            .into_iter()
            .filter(|(_, values)| values.len() == features.len())
            .map(|(device, values)| (device, values.into_iter().map(f32::from_bits).collect()))
            .collect();
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod mediation_tests;

#[cfg(test)]
mod tests {
    use tidewatch_api::{ConfigValue, ErrorRecord, Outputs};

    use super::*;

    fn config(toml: &str) -> NormalizeOptions {
        ConfigValue::parse(toml).expect("toml").deserialize().expect("config")
    }

    fn build(toml: &str) -> Normalize {
        Normalize::with_options(&config(toml), &ComponentContext::for_test("norm", "normalize"))
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
        .deserialize::<NormalizeOptions>()
        .expect_err("unknown option");
        assert!(unknown.message.contains("colour"), "{}", unknown.message);
        assert!(unknown.span.is_some());

        let missing_required = ConfigValue::parse("device = \"d\"\ntimestamp_field = \"t\"")
            .expect("toml")
            .deserialize::<NormalizeOptions>()
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
