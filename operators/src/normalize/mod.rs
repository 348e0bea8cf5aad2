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

mod units;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tidewatch_api::codec::{Decoder, DecoderOptions, Delimiter, FieldPlan, PayloadCodec, Value};
use tidewatch_api::{
    Batch, ComponentContext, ComponentError, ConfigError, DeviceId, EventTime, Kind, LABEL_ANOMALY,
    LABEL_NORMAL, PortType, RawBatch, ReadingBatch, Schema, TimestampFormat, Transform,
    TransformFactory, TransformProperties, ValidateContext, parse_timestamp, timestamp_from_number,
};
use tidewatch_inference::{ModelSpec, model_files};

use self::units::Linear;
pub use self::units::{Conversion, Quantity, Unit};
use crate::util::{IdHash, config_error};

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

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
    /// Payload encoding: `auto` (CSV when the source passes a header line along, as the
    /// `file` source does for CSV files; JSON otherwise), `json`, `csv` or `f32le`.
    #[serde(default)]
    pub format: PayloadCodec,
    /// Field delimiter of CSV lines (one ASCII character). Default: sniffed from the header
    /// line (the most frequent of `,` `;` tab `|`), else `,`.
    #[serde(default)]
    pub delimiter: Option<Delimiter>,
    /// CSV: the column names of each line, in order (they replace a header line's names);
    /// `f32le`: the name of each little-endian `f32` value, in order.
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

/// What `normalize` accepts at most: a larger message, an event time out of range, or a
/// device beyond the bound goes to `<id>.errors` (`too_large`, `bad_timestamp`,
/// `too_many_devices`) instead of into the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NormalizeLimits {
    /// The largest payload read, bytes (default 1 MiB). A larger message is an error
    /// (`too_large`) whose record keeps the first KiB of the payload.
    pub max_message_bytes: usize,
    /// The earliest event time accepted, ms since the Unix epoch (default 0: 1970-01-01).
    pub min_time_ms: EventTime,
    /// How far ahead of the wall clock an event time may be, ms (default 31622400000: 366
    /// days, which catches garbage such as nanoseconds read as milliseconds and lets a
    /// simulated fleet run its clock ahead); 0 turns the check off.
    pub max_future_ms: u64,
    /// How many distinct devices one worker of the transform accepts (default 1,000,000).
    /// A message of a further device is an error (`too_many_devices`): every device costs
    /// memory for as long as the process runs (its interned name, and its state in the
    /// windows and detectors downstream), so a flood of made-up device ids must not grow it
    /// without bound.
    pub max_devices: usize,
}

impl Default for NormalizeLimits {
    fn default() -> NormalizeLimits {
        NormalizeLimits {
            max_message_bytes: 1 << 20,
            min_time_ms: 0,
            max_future_ms: 366 * 86_400_000,
            max_devices: 1_000_000,
        }
    }
}

/// How much of an oversized payload its error record keeps, bytes.
const TOO_LARGE_KEPT_BYTES: usize = 1024;

/// Every option of the `normalize` transform, as a `[transforms.<id>]` table gives them (one
/// flat table: the reading options of [`NormalizeConfig`] beside those of [`MediationConfig`]
/// and the [`NormalizeLimits`]).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(from = "FlatOptions")]
pub struct NormalizeOptions {
    /// How messages are read.
    pub read: NormalizeConfig,
    /// What is done with the values read.
    pub mediation: MediationConfig,
    /// What is accepted at most.
    pub limits: NormalizeLimits,
}

impl From<NormalizeConfig> for NormalizeOptions {
    fn from(read: NormalizeConfig) -> NormalizeOptions {
        NormalizeOptions {
            read,
            mediation: MediationConfig::default(),
            limits: NormalizeLimits::default(),
        }
    }
}

/// The flat table of every option (see the fields of [`NormalizeConfig`] and
/// [`MediationConfig`]).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlatOptions {
    #[serde(default)]
    format: PayloadCodec,
    #[serde(default)]
    delimiter: Option<Delimiter>,
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
    max_message_bytes: Option<usize>,
    min_time_ms: Option<EventTime>,
    max_future_ms: Option<u64>,
    max_devices: Option<usize>,
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
            limits: NormalizeLimits {
                max_message_bytes: flat
                    .max_message_bytes
                    .unwrap_or(NormalizeLimits::default().max_message_bytes),
                min_time_ms: flat.min_time_ms.unwrap_or(NormalizeLimits::default().min_time_ms),
                max_future_ms: flat
                    .max_future_ms
                    .unwrap_or(NormalizeLimits::default().max_future_ms),
                max_devices: flat.max_devices.unwrap_or(NormalizeLimits::default().max_devices),
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What each decoded field feeds
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Feature(usize),
    Device,
    Timestamp,
    Label,
}

/// The fields `normalize` reads (through the codec) and what each one feeds.
#[derive(Debug)]
struct Plan {
    /// What each field of the decoder's plan feeds, by field index.
    targets: Vec<Vec<Target>>,
    /// Feature names of the output schema.
    features: Vec<Box<str>>,
    /// Source field of each feature.
    feature_fields: Vec<usize>,
    device_field: Option<usize>,
    timestamp_field: usize,
    timestamp_format: TimestampFormat,
    /// The name of each field as written in the options.
    names: Vec<Box<str>>,
}

impl Plan {
    fn field_name(&self, field: usize) -> &str {
        self.names.get(field).map_or("?", |name| name)
    }
}

// ---------------------------------------------------------------------------------------------
// Checking the options
// ---------------------------------------------------------------------------------------------

/// The per-feature mediation, worked out once.
#[derive(Debug)]
struct Mediation {
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
    decoder: Decoder,
    schema: Arc<Schema>,
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
    // The fields to decode, and what each one feeds.
    let mut fields = FieldPlan::new();
    let mut targets: Vec<Vec<Target>> = Vec::new();
    let mut add = |option: &str, spec: &str, target: Target| -> Result<usize, ConfigError> {
        let field = fields.add(option, spec)?;
        if targets.len() <= field {
            targets.resize_with(field + 1, Vec::new);
        }
        if let Some(feeds) = targets.get_mut(field) {
            feeds.push(target);
        }
        Ok(field)
    };
    let mut feature_fields = Vec::with_capacity(config.features.len());
    for (position, feature) in config.features.iter().enumerate() {
        let (option, source) = match config.rename.get(feature) {
            Some(source) => ("rename", source),
            None => ("features", feature),
        };
        feature_fields.push(add(option, source, Target::Feature(position))?);
    }
    let device_field = match &config.device_field {
        Some(device_field) => Some(add("device_field", device_field, Target::Device)?),
        None => None,
    };
    let timestamp_field = add("timestamp_field", &config.timestamp_field, Target::Timestamp)?;
    if let Some(label_field) = &config.label_field {
        add("label_field", label_field, Target::Label)?;
    }
    let names = (0..fields.len()).map(|field| fields.name(field).into()).collect();
    let codec = DecoderOptions {
        format: config.format,
        delimiter: config.delimiter,
        columns: config.columns.clone(),
        topic_template: extra.topic_template.clone(),
        device_from_topic: extra.device_from_topic.clone(),
    };
    let decoder = Decoder::with_plan(&codec, fields)?;
    let plan = Plan {
        targets,
        features: config.features.iter().map(|name| name.as_str().into()).collect(),
        feature_fields,
        device_field,
        timestamp_field,
        timestamp_format: config.timestamp_format,
        names,
    };

    let mediation = prepare_mediation(config, extra, base_dir)?;

    if let Some(columns) = &config.columns {
        let column_of = |field: usize| decoder.plan().column(field).unwrap_or("?");
        let mut required: Vec<&str> = Vec::new();
        let mut require = |field: usize| {
            if decoder.plan().column(field).is_some() {
                required.push(column_of(field));
            }
        };
        require(plan.timestamp_field);
        if let Some(device_field) = plan.device_field {
            require(device_field);
        }
        for (position, field) in plan.feature_fields.iter().enumerate() {
            if mediation.policies.get(position) == Some(&OnMissing::Error) {
                require(*field);
            }
        }
        let captured = |name: &str| {
            decoder
                .topic_template()
                .is_some_and(|template| template.names().iter().any(|known| &**known == name))
        };
        if let Some(absent) =
            required.iter().find(|name| !columns.iter().any(|c| c == *name) && !captured(name))
        {
            return Err(ConfigError::at_field(
                "columns",
                format!("`columns` has no column `{absent}`, which is needed"),
            )
            .with_hint("name every column in order, or map features with `rename`"));
        }
    }

    let schema = Arc::new(Schema::new(&config.features));
    Ok(Prepared { plan, decoder, schema, mediation })
}

fn prepare_mediation(
    config: &NormalizeConfig,
    extra: &MediationConfig,
    base_dir: &Path,
) -> Result<Mediation, ConfigError> {
    let features = &config.features;

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
    Ok(Mediation { convert, policies, fills, scale })
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

    /// Every check of the options: they need no input type, so they run downstream of a
    /// broken component too.
    fn validate(
        &self,
        config: &NormalizeOptions,
        ctx: &ValidateContext,
    ) -> Result<(), ConfigError> {
        prepare(config, &ctx.pipeline.base_dir).map(|_| ())
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

    fn properties(&self, config: &NormalizeOptions) -> TransformProperties {
        // `hold_last` keeps each device's last values: its readings must stay on one worker.
        let holds = config.read.on_missing == OnMissing::HoldLast
            || config.mediation.missing.values().any(|policy| *policy == OnMissing::HoldLast);
        TransformProperties {
            assigns_event_time: true,
            spreadable: !holds,
            ..TransformProperties::default()
        }
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

/// Device ids by name, so that the global interner's lock is taken once per device; and the
/// devices accepted so far, at most `limit` ([`NormalizeLimits::max_devices`]), which bounds
/// both.
#[derive(Debug)]
struct DeviceCache {
    last_name: String,
    last_id: Option<DeviceId>,
    ids: HashMap<Box<str>, DeviceId>,
    admitted: HashSet<DeviceId, IdHash>,
    limit: usize,
}

impl DeviceCache {
    fn new(limit: usize) -> DeviceCache {
        DeviceCache {
            last_name: String::new(),
            last_id: None,
            ids: HashMap::new(),
            admitted: HashSet::default(),
            limit,
        }
    }

    /// The id of device `name`; `None` when it would be one device more than the limit
    /// (such a name is not interned).
    #[inline]
    fn get(&mut self, name: &str) -> Option<DeviceId> {
        if let Some(id) = self.last_id
            && self.last_name == name
        {
            return Some(id);
        }
        let id = match self.ids.get(name) {
            Some(id) => *id,
            None => {
                let id = if self.admitted.len() < self.limit {
                    DeviceId::intern(name)
                } else {
                    // Full: only a device accepted before (restored from a checkpoint, not yet
                    // in `ids`) passes.
                    DeviceId::lookup(name).filter(|id| self.admitted.contains(id))?
                };
                self.admitted.insert(id);
                self.ids.insert(name.into(), id);
                id
            }
        };
        self.last_name.clear();
        self.last_name.push_str(name);
        self.last_id = Some(id);
        Some(id)
    }

    /// Sets the message's device to `name`, or fails it (`too_many_devices`).
    fn admit(&mut self, name: &str, msg: &mut Message) {
        match self.get(name) {
            Some(id) => msg.device = Some(id),
            None => msg.fail("too_many_devices", || {
                format!(
                    "device `{name}` would be one more than max_devices = {} (per worker)",
                    self.limit
                )
            }),
        }
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
                Target::Feature(position) => match value.as_f32() {
                    Ok(Some(number)) if !number.is_finite() => msg.fail("bad_value", || {
                        format!(
                            "field `{}` is {value}, not a finite number (f32: NaN, infinite or out of range)",
                            self.field_name(field)
                        )
                    }),
                    Ok(Some(number)) => {
                        if let (Some(slot), Some(present)) =
                            (msg.values.get_mut(position), msg.present.get_mut(position))
                        {
                            *slot = number;
                            *present = true;
                        }
                    }
                    Ok(None) => {}
                    Err(_) => msg.fail("bad_value", || {
                        format!(
                            "field `{}` is {value}, not a number, numeric text or boolean",
                            self.field_name(field)
                        )
                    }),
                },
                Target::Device => {
                    let name = match value {
                        Value::Null => continue,
                        Value::Str(text) => Cow::Borrowed(text),
                        Value::U64(number) => Cow::Owned(number.to_string()),
                        Value::I64(number) => Cow::Owned(number.to_string()),
                        Value::F64(number) if number.is_finite() => Cow::Owned(number.to_string()),
                        Value::F64(_) | Value::Bool(_) | Value::Composite => {
                            msg.fail("bad_value", || {
                                format!(
                                    "device field `{}` is {value}, not text or a number",
                                    self.field_name(field)
                                )
                            });
                            continue;
                        }
                    };
                    devices.admit(&name, msg);
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
// The transform
// ---------------------------------------------------------------------------------------------

/// The `normalize` transform: raw messages in, readings out.
#[derive(Debug)]
pub struct Normalize {
    plan: Plan,
    decoder: Decoder,
    schema: Arc<Schema>,
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
    msg: Message,
    device_buffer: String,
    limits: NormalizeLimits,
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
        let Prepared { plan, decoder, schema, mediation } =
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
            decoder,
            schema,
            mediation,
            strict,
            converts,
            hold_positions,
            held: HashMap::default(),
            constant_device: config.device.as_deref().map(DeviceId::intern),
            devices: DeviceCache::new(options.limits.max_devices),
            msg: Message::new(width),
            device_buffer: String::new(),
            limits: options.limits,
        })
    }

    /// The schema of the readings it emits.
    pub fn schema(&self) -> &Arc<Schema> {
        &self.schema
    }

    /// Reads every message of `raw` into one reading batch (emitted), errors to `<id>.errors`.
    pub fn normalize_batch(&mut self, raw: &RawBatch, out: &mut tidewatch_api::Outputs) {
        let mut readings = ReadingBatch::with_capacity(Arc::clone(&self.schema), raw.len());
        let mut header_lines = 0u64;
        let mut dropped = 0u64;
        let header = raw.header();
        let limits = self.limits;
        let latest = match limits.max_future_ms {
            0 => EventTime::MAX,
            ahead => tidewatch_api::records::now_ms().saturating_add(ahead as EventTime),
        };
        for message in raw.iter() {
            if message.payload.len() > limits.max_message_bytes {
                let kept = &message.payload[..TOO_LARGE_KEPT_BYTES.min(message.payload.len())];
                out.error(
                    "too_large",
                    format!(
                        "the message has {} bytes, more than max_message_bytes = {}",
                        message.payload.len(),
                        limits.max_message_bytes
                    ),
                    Some(message.topic),
                    Some(kept),
                );
                continue;
            }
            self.msg.reset(self.constant_device);
            let Normalize { plan, decoder, msg, devices, .. } = self;
            let decoded = decoder
                .decode(header, &message, |field, value| plan.apply(field, value, msg, devices));
            if let Err(error) = decoded {
                out.error(
                    error.error_type,
                    error.reason,
                    Some(message.topic),
                    Some(message.payload),
                );
                continue;
            }
            if let Some(name) =
                self.decoder.device_from_topic(message.topic, &mut self.device_buffer)
            {
                self.devices.admit(name, &mut self.msg);
            }
            if self.msg.header_echo {
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
            if time < limits.min_time_ms || time > latest {
                let bound = if time < limits.min_time_ms {
                    format!("before min_time_ms = {}", limits.min_time_ms)
                } else {
                    format!("more than max_future_ms = {} ahead of the clock", limits.max_future_ms)
                };
                out.error(
                    "bad_timestamp",
                    format!("event time {time} ms is {bound}"),
                    Some(message.topic),
                    Some(message.payload),
                );
                continue;
            }
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
        // Several snapshots (one per instance that took the checkpoint) merge: a device's
        // readings may reach any instance (normalize is not keyed).
        self.held.extend(
            snapshot
                .devices
                .into_iter()
                .filter(|(_, values)| values.len() == features.len())
                .map(|(device, values)| (device, values.into_iter().map(f32::from_bits).collect())),
        );
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
        let mut raw = RawBatch::new();
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
    fn oversized_messages_and_event_times_out_of_range_are_errors() {
        let mut op = build(&format!("{JSON_CONFIG}\nmax_message_bytes = 200\nmin_time_ms = 1000"));
        let future = tidewatch_api::records::now_ms() + 400 * 86_400_000;
        let big = format!(
            r#"{{"dev":"p","ts":5000,"temp":1,"pressure":1,"pad":"{}"}}"#,
            "x".repeat(3000)
        );
        let payloads = [
            r#"{"dev":"p","ts":5000,"temp":1,"pressure":1}"#.to_owned(),
            big,
            r#"{"dev":"p","ts":999,"temp":1,"pressure":1}"#.to_owned(),
            format!(r#"{{"dev":"p","ts":{future},"temp":1,"pressure":1}}"#),
        ];
        let payloads: Vec<&str> = payloads.iter().map(String::as_str).collect();
        let (readings, errors, _) = run(&mut op, json_batch(&payloads));
        assert_eq!(readings.len(), 1);
        let types: Vec<&str> = errors.iter().map(|error| &*error.error_type).collect();
        assert_eq!(types, ["too_large", "bad_timestamp", "bad_timestamp"]);
        // The record of an oversized message keeps only its start.
        assert_eq!(
            errors[0].payload.as_ref().map(|payload| payload.len()),
            Some(TOO_LARGE_KEPT_BYTES)
        );
        // max_future_ms = 0: no check.
        let mut op = build(&format!("{JSON_CONFIG}\nmax_future_ms = 0"));
        let (readings, errors, _) = run(&mut op, json_batch(&payloads[3..]));
        assert_eq!((readings.len(), errors.len()), (1, 0));
    }

    #[test]
    fn devices_beyond_max_devices_and_non_finite_values_are_errors() {
        let mut op = build(&format!("{JSON_CONFIG}\nmax_devices = 2"));
        let names: Vec<String> = (0..40).map(|i| format!("n-{i}")).collect();
        let payloads: Vec<String> = ["bounded-a", "bounded-b", "bounded-c", "bounded-a"]
            .iter()
            .map(|dev| format!(r#"{{"dev":"{dev}","ts":1000,"temp":1,"pressure":1}}"#))
            .chain(["\"NaN\"", "\"inf\"", "1e39", "-3.5e38"].iter().map(|temp| {
                format!(r#"{{"dev":"bounded-b","ts":1000,"temp":{temp},"pressure":1}}"#)
            }))
            .collect();
        let payloads: Vec<&str> = payloads.iter().map(String::as_str).collect();
        let (readings, errors, _) = run(&mut op, json_batch(&payloads));
        let types: Vec<&str> = errors.iter().map(|error| &*error.error_type).collect();
        assert_eq!(types, ["too_many_devices", "bad_value", "bad_value", "bad_value", "bad_value"]);
        assert_eq!(readings.len(), 3, "a, b and a again");
        assert_eq!(DeviceId::lookup("bounded-c"), None, "a refused name is not interned");
        // At the limit, the admitted devices still pass.
        let mut op = build(&format!("{JSON_CONFIG}\nmax_devices = {}", names.len()));
        let mut payloads: Vec<String> = names
            .iter()
            .map(|dev| format!(r#"{{"dev":"{dev}","ts":1000,"temp":1,"pressure":1}}"#))
            .collect();
        payloads.push(r#"{"dev":"n-0","ts":1000,"temp":1,"pressure":1}"#.to_owned());
        payloads.push(r#"{"dev":"one-too-many","ts":1000,"temp":1,"pressure":1}"#.to_owned());
        let payloads: Vec<&str> = payloads.iter().map(String::as_str).collect();
        let (readings, errors, _) = run(&mut op, json_batch(&payloads));
        assert_eq!(readings.len(), names.len() + 1);
        assert_eq!(errors.len(), 1);
        assert_eq!(&*errors[0].error_type, "too_many_devices");
    }

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
        let header: String = [
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
        .join(";");
        let mut raw = RawBatch::new();
        raw.set_header(Arc::from(header.as_bytes()));
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
        let mut raw = RawBatch::new();
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
        let header: Arc<[u8]> = Arc::from("\u{feff}t, v ".as_bytes());
        for _ in 0..3 {
            let mut raw = RawBatch::new();
            raw.set_header(Arc::clone(&header));
            raw.push("", b" 2 , 0.5\n", 0, 0);
            let (readings, errors, _) = run(&mut op, raw);
            assert!(errors.is_empty(), "{errors:?}");
            assert_eq!(readings.times, vec![2_000]);
            assert_eq!(readings.values, vec![0.5]);
        }
        assert_eq!(op.decoder.header_layouts(), 1);
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
        let mut raw = RawBatch::new();
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
    fn csv_without_column_names_is_rejected_per_message() {
        let mut op = build(
            r#"
            format = "csv"
            features = ["v"]
            device = "d"
            timestamp_field = "t"
            "#,
        );
        let mut raw = RawBatch::new();
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

        let bad_delimiter = ConfigValue::parse(
            "features = [\"a\"]\ndelimiter = \"é\"\nformat = \"csv\"\ndevice = \"d\"\ntimestamp_field = \"t\"",
        )
        .expect("toml")
        .deserialize::<NormalizeOptions>()
        .expect_err("not a delimiter");
        assert!(bad_delimiter.message.contains("delimiter"), "{}", bad_delimiter.message);
        assert!(bad_delimiter.span.is_some());

        for (toml, field) in [
            ("features = []\ndevice = \"d\"\ntimestamp_field = \"t\"", "features"),
            ("features = [\"a\",\"a\"]\ndevice = \"d\"\ntimestamp_field = \"t\"", "features"),
            (
                "features = [\"a\"]\nrename = { b = \"x\" }\ndevice = \"d\"\ntimestamp_field = \"t\"",
                "rename",
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
                    let mut raw = RawBatch::new();
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
