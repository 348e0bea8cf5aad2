//! `filter`: keeps the readings, windows or scores that match a condition; the others are
//! dropped and counted as `filtered`.
//!
//! A [`Condition`] is one TOML table whose keys are tests, all of which must hold:
//!
//! - `field` + `op` (+ `value`): a numeric comparison of a feature (readings: its value;
//!   windows: a statistic of its steps, `stat`, default the mean) or, for scores, of `score`,
//!   `threshold` or a value column;
//! - `device` (names) and `device_prefix` (prefixes of names): the record's device is one of
//!   them;
//! - `anomaly` (scores) and `label` (every kind): the flag equals the given boolean;
//! - `all`, `any` (lists of conditions) and `not` (one condition): combinations.
//!
//! A comparison involving NaN (a missing value, or a window with no value for the feature)
//! is false, whatever the operator; `op = "is_nan"` tests for it.
//!
//! The same conditions drive [`crate::route`].

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;
use tidewatch_api::{
    Batch, ComponentContext, ComponentError, ConfigError, DeviceId, Kind, LABEL_ANOMALY, Outputs,
    PortType, Reading, ReadingBatch, Schema, Score, Transform, TransformFactory,
    TransformProperties, ValidateContext, Window,
};

use crate::util::{IdHash, config_error};

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

/// A comparison operator of a [`Condition`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// `field > value`.
    Gt,
    /// `field >= value`.
    Ge,
    /// `field < value`.
    Lt,
    /// `field <= value`.
    Le,
    /// `field == value` (exactly, as `f32` widened to `f64`).
    Eq,
    /// `field != value` (false for NaN).
    Ne,
    /// The field is NaN (missing); takes no `value`.
    IsNan,
}

impl Op {
    /// The name written in options.
    pub fn name(self) -> &'static str {
        match self {
            Op::Gt => "gt",
            Op::Ge => "ge",
            Op::Lt => "lt",
            Op::Le => "le",
            Op::Eq => "eq",
            Op::Ne => "ne",
            Op::IsNan => "is_nan",
        }
    }
}

/// How a window's steps of one feature become the value a condition compares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stat {
    /// Mean of the non-NaN steps (NaN when there is none).
    #[default]
    Mean,
    /// Smallest non-NaN step.
    Min,
    /// Greatest non-NaN step.
    Max,
    /// The first step (NaN or not).
    First,
    /// The last step (NaN or not).
    Last,
}

/// A condition on a record: every test it sets must hold (and it must set at least one).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Condition {
    /// The value compared: a feature (readings, windows), or `score`, `threshold` or a value
    /// column (scores).
    pub field: Option<String>,
    /// The comparison; required with `field`.
    pub op: Option<Op>,
    /// The number compared with; required by every `op` but `is_nan`.
    pub value: Option<f64>,
    /// Windows: how the feature's steps become one value. Default `mean`.
    pub stat: Option<Stat>,
    /// The record's device is one of these.
    pub device: Option<Vec<String>>,
    /// The record's device name starts with one of these.
    pub device_prefix: Option<Vec<String>>,
    /// Scores: the anomaly flag equals this.
    pub anomaly: Option<bool>,
    /// The label (anomalous = `true`) equals this.
    pub label: Option<bool>,
    /// Every one of these conditions holds.
    pub all: Option<Vec<Condition>>,
    /// At least one of these conditions holds.
    pub any: Option<Vec<Condition>>,
    /// This condition does not hold.
    pub not: Option<Box<Condition>>,
}

/// Options of the `filter` transform: the [`Condition`] records must meet to be kept, written
/// at the top of the transform's table.
pub type FilterConfig = Condition;

// ---------------------------------------------------------------------------------------------
// Checking and compiling conditions
// ---------------------------------------------------------------------------------------------

/// A compiled condition.
#[derive(Clone, Debug)]
enum Test {
    Compare { slot: usize, stat: Stat, op: Op, value: f64 },
    Device(Vec<DeviceId>),
    DevicePrefix { prefixes: Vec<Box<str>>, cache: usize },
    Anomaly(bool),
    Label(bool),
    All(Vec<Test>),
    Any(Vec<Test>),
    Not(Box<Test>),
}

/// Where a field's value is, for one schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Column {
    Index(usize),
    Score,
    Threshold,
    Absent,
}

/// Names the two score fields that are not value columns.
const SCORE_FIELDS: [&str; 2] = ["score", "threshold"];

/// Compiles conditions, collecting the field names they read.
#[derive(Debug)]
struct Compiler<'a> {
    kind: Kind,
    schema: Option<&'a Schema>,
    fields: Vec<Box<str>>,
    prefix_caches: usize,
    /// The top-level option every error is reported at (a condition nested in another
    /// option); by default, the condition's own top-level key.
    option: Option<&'static str>,
}

fn option_of(condition_key: &str) -> &'static str {
    match condition_key {
        "field" => "field",
        "op" => "op",
        "value" => "value",
        "stat" => "stat",
        "device" => "device",
        "device_prefix" => "device_prefix",
        "anomaly" => "anomaly",
        "label" => "label",
        "all" => "all",
        "any" => "any",
        _ => "not",
    }
}

impl Compiler<'_> {
    fn error(&self, path: &str, key: &str, message: impl Into<String>) -> ConfigError {
        let top = path.split(['[', '.']).next().filter(|top| !top.is_empty()).unwrap_or(key);
        let field = self.option.unwrap_or_else(|| option_of(top));
        let at = if path.is_empty() { String::new() } else { format!("{path}: ") };
        ConfigError::at_field(field, format!("{at}{}", message.into()))
    }

    fn slot(&mut self, name: &str) -> usize {
        match self.fields.iter().position(|known| &**known == name) {
            Some(slot) => slot,
            None => {
                self.fields.push(name.into());
                self.fields.len() - 1
            }
        }
    }

    fn compile(&mut self, condition: &Condition, path: &str) -> Result<Test, ConfigError> {
        let mut tests = Vec::new();
        match (&condition.field, condition.op) {
            (Some(field), Some(op)) => {
                if field.is_empty() {
                    return Err(self.error(path, "field", "`field` is empty"));
                }
                self.check_field(field, path)?;
                let value = match (op, condition.value) {
                    (Op::IsNan, None) => f64::NAN,
                    (Op::IsNan, Some(_)) => {
                        return Err(self
                            .error(path, "value", "`op = \"is_nan\"` takes no `value`")
                            .with_hint("remove `value`"));
                    }
                    (_, None) => {
                        return Err(self
                            .error(
                                path,
                                "value",
                                format!("`op = \"{}\"` needs a `value`", op.name()),
                            )
                            .with_hint("e.g. field = \"temperature\", op = \"gt\", value = 80.0"));
                    }
                    (_, Some(value)) if !value.is_finite() => {
                        return Err(self.error(path, "value", "`value` must be a finite number"));
                    }
                    (_, Some(value)) => value,
                };
                let stat = match (condition.stat, self.kind) {
                    (Some(stat), Kind::Windows) => stat,
                    (None, _) => Stat::Mean,
                    (Some(_), kind) => {
                        return Err(self.error(
                            path,
                            "stat",
                            format!("`stat` applies to windows, and the input carries {kind}"),
                        ));
                    }
                };
                let slot = self.slot(field);
                tests.push(Test::Compare { slot, stat, op, value });
            }
            (Some(_), None) => {
                return Err(self
                    .error(path, "field", "`field` needs `op`")
                    .with_hint("op is one of gt, ge, lt, le, eq, ne, is_nan"));
            }
            (None, Some(_)) => {
                return Err(self.error(path, "op", "`op` needs `field`"));
            }
            (None, None) => {
                if condition.value.is_some() {
                    return Err(self.error(path, "value", "`value` needs `field` and `op`"));
                }
                if condition.stat.is_some() {
                    return Err(self.error(path, "stat", "`stat` needs `field` and `op`"));
                }
            }
        }
        if let Some(devices) = &condition.device {
            if devices.is_empty() || devices.iter().any(String::is_empty) {
                return Err(self.error(
                    path,
                    "device",
                    "`device` must list at least one device, with no empty name",
                ));
            }
            let mut ids: Vec<DeviceId> =
                devices.iter().map(|name| DeviceId::intern(name)).collect();
            ids.sort_unstable();
            ids.dedup();
            tests.push(Test::Device(ids));
        }
        if let Some(prefixes) = &condition.device_prefix {
            if prefixes.is_empty() || prefixes.iter().any(String::is_empty) {
                return Err(self.error(
                    path,
                    "device_prefix",
                    "`device_prefix` must list at least one prefix, with no empty one",
                ));
            }
            let prefixes = prefixes.iter().map(|prefix| prefix.as_str().into()).collect();
            tests.push(Test::DevicePrefix { prefixes, cache: self.prefix_caches });
            self.prefix_caches += 1;
        }
        if let Some(anomaly) = condition.anomaly {
            if self.kind != Kind::Scores {
                return Err(self
                    .error(
                        path,
                        "anomaly",
                        format!("`anomaly` applies to scores, and the input carries {}", self.kind),
                    )
                    .with_hint("use `label` for the anomaly label of readings and windows"));
            }
            tests.push(Test::Anomaly(anomaly));
        }
        if let Some(label) = condition.label {
            tests.push(Test::Label(label));
        }
        for (key, list) in [("all", &condition.all), ("any", &condition.any)] {
            let Some(list) = list else { continue };
            if list.is_empty() {
                return Err(self.error(path, key, format!("`{key}` is an empty list")));
            }
            let mut compiled = Vec::with_capacity(list.len());
            for (index, inner) in list.iter().enumerate() {
                let inner_path = if path.is_empty() {
                    format!("{key}[{index}]")
                } else {
                    format!("{path}.{key}[{index}]")
                };
                compiled.push(self.compile(inner, &inner_path)?);
            }
            tests.push(if key == "all" { Test::All(compiled) } else { Test::Any(compiled) });
        }
        if let Some(inner) = &condition.not {
            let inner_path = if path.is_empty() { "not".to_owned() } else { format!("{path}.not") };
            tests.push(Test::Not(Box::new(self.compile(inner, &inner_path)?)));
        }
        match tests.len() {
            0 => Err(self.error(path, "field", "the condition sets no test").with_hint(
                "set field/op/value, device, device_prefix, anomaly, label, all, any or not",
            )),
            1 => Ok(tests.pop().unwrap_or(Test::All(Vec::new()))),
            _ => Ok(Test::All(tests)),
        }
    }

    fn check_field(&self, field: &str, path: &str) -> Result<(), ConfigError> {
        let Some(schema) = self.schema else { return Ok(()) };
        let known = schema.index_of(field).is_some()
            || (self.kind == Kind::Scores && SCORE_FIELDS.contains(&field));
        if known {
            return Ok(());
        }
        let mut names: Vec<&str> = Vec::new();
        if self.kind == Kind::Scores {
            names.extend(SCORE_FIELDS);
        }
        names.extend(schema.names().iter().map(|name| &**name));
        Err(self
            .error(path, "field", format!("the input has no field `{field}`"))
            .with_hint(format!("the fields of the {} are {names:?}", self.kind)))
    }
}

/// A compiled condition with what evaluating it needs: the fields' columns for the current
/// schema and a cache of prefix tests per device.
#[derive(Debug)]
pub struct Matcher {
    test: Test,
    kind: Kind,
    fields: Vec<Box<str>>,
    columns: Vec<Column>,
    columns_for: Option<Arc<Schema>>,
    prefix_caches: Vec<HashMap<DeviceId, bool, IdHash>>,
    /// A field absent from a schema seen since the last [`Matcher::take_unknown`].
    unknown: Option<Box<str>>,
}

/// The most devices a prefix cache remembers before it starts over.
const PREFIX_CACHE_LIMIT: usize = 1 << 16;

/// One record, as a condition sees it.
#[derive(Clone, Copy, Debug)]
pub enum Record<'a> {
    /// A reading, with its batch's schema.
    Reading(Reading<'a>, &'a Arc<Schema>),
    /// A window.
    Window(&'a Window),
    /// A score.
    Score(&'a Score),
}

impl Record<'_> {
    fn device(&self) -> DeviceId {
        match self {
            Record::Reading(reading, _) => reading.device,
            Record::Window(window) => window.device,
            Record::Score(score) => score.device,
        }
    }

    fn label(&self) -> u8 {
        match self {
            Record::Reading(reading, _) => reading.label,
            Record::Window(window) => window.label,
            Record::Score(score) => score.label,
        }
    }

    fn schema(&self) -> &Arc<Schema> {
        match self {
            Record::Reading(_, schema) => schema,
            Record::Window(window) => &window.schema,
            Record::Score(score) => &score.columns,
        }
    }

    fn value(&self, column: Column, stat: Stat) -> f32 {
        match (self, column) {
            (_, Column::Absent) => f32::NAN,
            (Record::Reading(reading, _), Column::Index(index)) => {
                reading.values.get(index).copied().unwrap_or(f32::NAN)
            }
            (Record::Window(window), Column::Index(index)) => window_stat(window, index, stat),
            (Record::Score(score), Column::Index(index)) => {
                score.values.get(index).copied().unwrap_or(f32::NAN)
            }
            (Record::Score(score), Column::Score) => score.score,
            (Record::Score(score), Column::Threshold) => score.threshold.unwrap_or(f32::NAN),
            (_, Column::Score | Column::Threshold) => f32::NAN,
        }
    }
}

fn window_stat(window: &Window, column: usize, stat: Stat) -> f32 {
    if column >= window.schema.len() {
        return f32::NAN;
    }
    let mut values = window.feature(column);
    match stat {
        Stat::First => values.next().unwrap_or(f32::NAN),
        Stat::Last => values.last().unwrap_or(f32::NAN),
        Stat::Mean => {
            let (sum, count) = values
                .filter(|value| !value.is_nan())
                .fold((0.0f64, 0usize), |(sum, count), value| (sum + f64::from(value), count + 1));
            if count == 0 { f32::NAN } else { (sum / count as f64) as f32 }
        }
        Stat::Min => values.filter(|value| !value.is_nan()).reduce(f32::min).unwrap_or(f32::NAN),
        Stat::Max => values.filter(|value| !value.is_nan()).reduce(f32::max).unwrap_or(f32::NAN),
    }
}

fn compare(value: f32, op: Op, target: f64) -> bool {
    let value = f64::from(value);
    match op {
        Op::IsNan => value.is_nan(),
        _ if value.is_nan() => false,
        Op::Gt => value > target,
        Op::Ge => value >= target,
        Op::Lt => value < target,
        Op::Le => value <= target,
        Op::Eq => value == target,
        Op::Ne => value != target,
    }
}

impl Matcher {
    /// Checks `condition` against the input port (the kind, and the field names when the
    /// schema is known) and compiles it. Errors name the top-level option they are about
    /// (`option` for a condition nested under another option, e.g. a route's `when`).
    pub fn new(condition: &Condition, input: &PortType) -> Result<Matcher, ConfigError> {
        Matcher::nested(condition, input, None)
    }

    pub(crate) fn nested(
        condition: &Condition,
        input: &PortType,
        at: Option<(&'static str, &str)>,
    ) -> Result<Matcher, ConfigError> {
        if !matches!(input.kind, Kind::Readings | Kind::Windows | Kind::Scores) {
            return Err(ConfigError::new(format!(
                "conditions read readings, windows or scores, but the input carries {}",
                input.kind
            )));
        }
        let (option, path) = match at {
            Some((option, path)) => (Some(option), path),
            None => (None, ""),
        };
        let mut compiler = Compiler {
            kind: input.kind,
            schema: input.schema.as_deref(),
            fields: Vec::new(),
            prefix_caches: 0,
            option,
        };
        let test = compiler.compile(condition, path)?;
        Ok(Matcher {
            test,
            kind: input.kind,
            fields: compiler.fields,
            columns: Vec::new(),
            columns_for: None,
            prefix_caches: (0..compiler.prefix_caches).map(|_| HashMap::default()).collect(),
            unknown: None,
        })
    }

    /// The kind of records it was checked against.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    fn resolve(&mut self, schema: &Arc<Schema>, scores: bool) {
        if let Some(known) = &self.columns_for
            && (Arc::ptr_eq(known, schema) || **known == **schema)
        {
            return;
        }
        self.columns = self
            .fields
            .iter()
            .map(|field| match schema.index_of(field) {
                Some(index) => Column::Index(index),
                None if scores && &**field == "score" => Column::Score,
                None if scores && &**field == "threshold" => Column::Threshold,
                None => Column::Absent,
            })
            .collect();
        if let Some(position) = self.columns.iter().position(|column| *column == Column::Absent) {
            self.unknown = self.fields.get(position).cloned();
        }
        self.columns_for = Some(Arc::clone(schema));
    }

    /// A field the records of a schema seen lately do not have (compared as NaN), once.
    pub fn take_unknown(&mut self) -> Option<Box<str>> {
        self.unknown.take()
    }

    /// True when `record` meets the condition.
    pub fn matches(&mut self, record: Record<'_>) -> bool {
        if !self.fields.is_empty() {
            self.resolve(record.schema(), matches!(record, Record::Score(_)));
        }
        let Matcher { test, columns, prefix_caches, .. } = self;
        eval(test, &record, columns, prefix_caches)
    }
}

fn eval(
    test: &Test,
    record: &Record<'_>,
    columns: &[Column],
    caches: &mut [HashMap<DeviceId, bool, IdHash>],
) -> bool {
    match test {
        Test::Compare { slot, stat, op, value } => {
            let column = columns.get(*slot).copied().unwrap_or(Column::Absent);
            compare(record.value(column, *stat), *op, *value)
        }
        Test::Device(devices) => devices.binary_search(&record.device()).is_ok(),
        Test::DevicePrefix { prefixes, cache } => {
            let device = record.device();
            let Some(cache) = caches.get_mut(*cache) else { return false };
            if let Some(known) = cache.get(&device) {
                return *known;
            }
            let name = device.name();
            let matched = prefixes.iter().any(|prefix| name.starts_with(&**prefix));
            if cache.len() >= PREFIX_CACHE_LIMIT {
                cache.clear();
            }
            cache.insert(device, matched);
            matched
        }
        Test::Anomaly(expected) => match record {
            Record::Score(score) => score.anomaly == *expected,
            _ => false,
        },
        Test::Label(expected) => (record.label() == LABEL_ANOMALY) == *expected,
        Test::All(tests) => tests.iter().all(|test| eval(test, record, columns, caches)),
        Test::Any(tests) => tests.iter().any(|test| eval(test, record, columns, caches)),
        Test::Not(test) => !eval(test, record, columns, caches),
    }
}

// ---------------------------------------------------------------------------------------------
// Splitting batches
// ---------------------------------------------------------------------------------------------

/// Splits `batch` into `branches` batches: record by record, `choose` names its branch, or
/// drops it (`None`). A batch whose records all go to one branch is moved there whole.
/// Returns the branches (empty batches for branches that got nothing) and the number of
/// records dropped; a batch of another kind comes back as `Err`.
pub(crate) fn split(
    batch: Batch,
    branches: usize,
    mut choose: impl FnMut(Record<'_>) -> Option<usize>,
) -> Result<(Vec<Option<Batch>>, u64), Batch> {
    let choices: Vec<Option<usize>> = match &batch {
        Batch::Readings(readings) => readings
            .iter()
            .map(|reading| choose(Record::Reading(reading, &readings.schema)))
            .collect(),
        Batch::Windows(windows) => {
            windows.iter().map(|window| choose(Record::Window(window))).collect()
        }
        Batch::Scores(scores) => scores.iter().map(|score| choose(Record::Score(score))).collect(),
        _ => return Err(batch),
    };
    let dropped = choices.iter().filter(|choice| choice.is_none()).count() as u64;
    let mut out: Vec<Option<Batch>> = (0..branches).map(|_| None).collect();
    if let Some(first) = choices.first().copied().flatten()
        && choices.iter().all(|choice| *choice == Some(first))
    {
        if let Some(slot) = out.get_mut(first) {
            *slot = Some(batch);
        }
        return Ok((out, dropped));
    }
    match batch {
        Batch::Readings(readings) => {
            let mut parts: Vec<ReadingBatch> =
                (0..branches).map(|_| ReadingBatch::new(Arc::clone(&readings.schema))).collect();
            for (reading, choice) in readings.iter().zip(&choices) {
                if let Some(part) = choice.and_then(|branch| parts.get_mut(branch)) {
                    part.push(reading.device, reading.time_ms, reading.values, reading.label);
                }
            }
            for (slot, part) in out.iter_mut().zip(parts) {
                *slot = (!part.is_empty()).then_some(Batch::Readings(part));
            }
        }
        Batch::Windows(windows) => {
            for (slot, part) in out.iter_mut().zip(distribute(windows, &choices, branches)) {
                *slot = (!part.is_empty()).then_some(Batch::Windows(part));
            }
        }
        Batch::Scores(scores) => {
            for (slot, part) in out.iter_mut().zip(distribute(scores, &choices, branches)) {
                *slot = (!part.is_empty()).then_some(Batch::Scores(part));
            }
        }
        other => return Err(other),
    }
    Ok((out, dropped))
}

fn distribute<T>(items: Vec<T>, choices: &[Option<usize>], branches: usize) -> Vec<Vec<T>> {
    let mut parts: Vec<Vec<T>> = (0..branches).map(|_| Vec::new()).collect();
    for (item, choice) in items.into_iter().zip(choices) {
        if let Some(part) = choice.and_then(|branch| parts.get_mut(branch)) {
            part.push(item);
        }
    }
    parts
}

// ---------------------------------------------------------------------------------------------
// The transform
// ---------------------------------------------------------------------------------------------

/// Factory of the `filter` transform.
#[derive(Clone, Copy, Debug, Default)]
pub struct FilterFactory;

impl TransformFactory for FilterFactory {
    type Config = FilterConfig;

    fn accepts(&self, _config: &FilterConfig) -> Vec<Kind> {
        vec![Kind::Readings, Kind::Windows, Kind::Scores]
    }

    fn output_type(
        &self,
        config: &FilterConfig,
        input: &PortType,
        _ctx: &ValidateContext,
    ) -> Result<PortType, ConfigError> {
        Matcher::new(config, input)?;
        Ok(input.clone())
    }

    fn properties(&self, _config: &FilterConfig) -> TransformProperties {
        TransformProperties::default()
    }

    fn build(
        &self,
        config: &FilterConfig,
        _ctx: &ComponentContext,
    ) -> Result<Box<dyn Transform>, ComponentError> {
        Ok(Box::new(Filter::new(config)?))
    }
}

/// The `filter` transform: keeps the records that match its condition.
#[derive(Debug)]
pub struct Filter {
    config: Condition,
    /// One matcher per kind of record the condition applies to: the input's kind is known at
    /// validation, not when an instance is built.
    matchers: Vec<Matcher>,
}

impl Filter {
    /// A filter with `config` (checked for every kind it may be used with, as it is built
    /// before the input's kind is known to it).
    pub fn new(config: &FilterConfig) -> Result<Filter, ComponentError> {
        let mut matchers = Vec::new();
        let mut first_error = None;
        for kind in [Kind::Readings, Kind::Windows, Kind::Scores] {
            match Matcher::new(config, &PortType::of(kind)) {
                Ok(matcher) => matchers.push(matcher),
                Err(error) => first_error = first_error.or(Some(error)),
            }
        }
        match (matchers.is_empty(), first_error) {
            (true, Some(error)) => Err(config_error(error)),
            _ => Ok(Filter { config: config.clone(), matchers }),
        }
    }

    /// The condition.
    pub fn condition(&self) -> &Condition {
        &self.config
    }
}

impl Transform for Filter {
    fn process_batch(&mut self, batch: Batch, out: &mut Outputs) {
        let kind = batch.kind();
        let Some(matcher) = self.matchers.iter_mut().find(|matcher| matcher.kind() == kind) else {
            out.error(
                "unsupported_kind",
                format!("this filter's condition does not apply to {kind}"),
                None,
                None,
            );
            return;
        };
        match split(batch, 1, |record| matcher.matches(record).then_some(0)) {
            Ok((kept, dropped)) => {
                if let Some(field) = matcher.take_unknown() {
                    out.error(
                        "unknown_field",
                        format!("the {kind} have no field `{field}`; it compares as NaN"),
                        None,
                        None,
                    );
                }
                out.discard("filtered", dropped);
                for batch in kept.into_iter().flatten() {
                    out.emit(batch);
                }
            }
            Err(other) => out.error(
                "unsupported_kind",
                format!("filter reads readings, windows or scores, not {}", other.kind()),
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
    use tidewatch_api::{ConfigValue, LABEL_NORMAL};

    use super::*;

    fn condition(toml: &str) -> Condition {
        ConfigValue::parse(toml).expect("toml").deserialize().expect("condition")
    }

    fn readings_port() -> PortType {
        PortType::with_schema(Kind::Readings, Arc::new(Schema::new(["temperature", "pressure"])))
    }

    fn readings() -> ReadingBatch {
        let mut batch = ReadingBatch::new(Arc::new(Schema::new(["temperature", "pressure"])));
        batch.push(DeviceId::intern("pump-1"), 1, &[70.0, 1.0], LABEL_NORMAL);
        batch.push(DeviceId::intern("pump-2"), 2, &[85.0, 2.0], LABEL_ANOMALY);
        batch.push(DeviceId::intern("valve-1"), 3, &[95.0, f32::NAN], LABEL_NORMAL);
        batch.push(DeviceId::intern("pump-10"), 4, &[f32::NAN, 3.0], LABEL_NORMAL);
        batch
    }

    /// Runs a filter over `batch`; returns the times (or starts) kept and the out.
    fn run(toml: &str, batch: Batch) -> (Vec<i64>, Outputs) {
        let mut filter = Filter::new(&condition(toml)).expect("filter");
        let mut out = Outputs::new("f");
        filter.process_batch(batch, &mut out);
        let kept = out
            .take_main()
            .into_iter()
            .flat_map(|batch| match batch {
                Batch::Readings(readings) => readings.times,
                Batch::Windows(windows) => windows.iter().map(|window| window.start_ms).collect(),
                Batch::Scores(scores) => scores.iter().map(|score| score.start_ms).collect(),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        (kept, out)
    }

    fn kept(toml: &str) -> Vec<i64> {
        run(toml, Batch::Readings(readings())).0
    }

    #[test]
    fn numeric_comparisons_on_readings() {
        assert_eq!(kept("field = \"temperature\"\nop = \"gt\"\nvalue = 80.0"), [2, 3]);
        assert_eq!(kept("field = \"temperature\"\nop = \"ge\"\nvalue = 85"), [2, 3]);
        assert_eq!(kept("field = \"temperature\"\nop = \"lt\"\nvalue = 85"), [1]);
        assert_eq!(kept("field = \"temperature\"\nop = \"le\"\nvalue = 85"), [1, 2]);
        assert_eq!(kept("field = \"pressure\"\nop = \"eq\"\nvalue = 2"), [2]);
        // NaN never compares, not even with `ne`.
        assert_eq!(kept("field = \"pressure\"\nop = \"ne\"\nvalue = 2"), [1, 4]);
        assert_eq!(kept("field = \"pressure\"\nop = \"is_nan\""), [3]);
        assert_eq!(kept("not = { field = \"pressure\", op = \"is_nan\" }"), [1, 2, 4]);
    }

    #[test]
    fn device_lists_prefixes_and_labels() {
        assert_eq!(kept("device = [\"pump-1\", \"valve-1\"]"), [1, 3]);
        assert_eq!(kept("device_prefix = [\"pump-\"]"), [1, 2, 4]);
        assert_eq!(kept("device_prefix = [\"valve\", \"pump-1\"]"), [1, 3, 4]);
        assert_eq!(kept("label = true"), [2]);
        assert_eq!(kept("label = false"), [1, 3, 4]);
        // Several tests in one table must all hold.
        assert_eq!(
            kept("device_prefix = [\"pump-\"]\nfield = \"temperature\"\nop = \"gt\"\nvalue = 60"),
            [1, 2]
        );
    }

    #[test]
    fn all_any_and_not() {
        let any = r#"
            any = [
                { field = "temperature", op = "gt", value = 90.0 },
                { device = ["pump-1"] },
            ]
        "#;
        assert_eq!(kept(any), [1, 3]);
        let all = r#"
            all = [
                { device_prefix = ["pump-"] },
                { any = [ { label = true }, { field = "pressure", op = "ge", value = 3 } ] },
            ]
        "#;
        assert_eq!(kept(all), [2, 4]);
        let not = r#"
            not = { any = [ { device = ["pump-2"] }, { field = "temperature", op = "is_nan" } ] }
        "#;
        assert_eq!(kept(not), [1, 3]);
    }

    #[test]
    fn dropped_records_are_counted_and_whole_batches_pass_untouched() {
        let (kept, mut out) =
            run("field = \"temperature\"\nop = \"gt\"\nvalue = 80", Batch::Readings(readings()));
        assert_eq!(kept, [2, 3]);
        assert_eq!(out.take_discarded(), vec![("filtered", 2)]);
        assert!(out.take_errors().is_empty());

        let (kept, mut out) = run(
            "label = false\nnot = { label = true }",
            Batch::Readings({
                let mut batch = readings();
                batch.labels = vec![LABEL_NORMAL; 4];
                batch
            }),
        );
        assert_eq!(kept, [1, 2, 3, 4]);
        assert!(out.take_discarded().is_empty());

        let (kept, mut out) = run("device = [\"nobody\"]", Batch::Readings(readings()));
        assert!(kept.is_empty());
        assert_eq!(out.take_discarded(), vec![("filtered", 4)]);
    }

    fn window(device: &str, start: i64, values: &[f32], label: u8) -> Window {
        Window {
            device: DeviceId::intern(device),
            start_ms: start,
            end_ms: start + 10,
            schema: Arc::new(Schema::new(["temperature"])),
            times: (0..values.len() as i64).map(|step| start + step).collect(),
            values: values.to_vec(),
            label,
        }
    }

    #[test]
    fn windows_compare_a_statistic_of_their_steps() {
        let windows = || {
            Batch::Windows(vec![
                window("w", 0, &[1.0, 2.0, 9.0], LABEL_NORMAL),
                window("w", 10, &[4.0, f32::NAN, 4.0], LABEL_ANOMALY),
                window("w", 20, &[f32::NAN], LABEL_NORMAL),
            ])
        };
        let check = |toml: &str| run(toml, windows()).0;
        assert_eq!(check("field = \"temperature\"\nop = \"gt\"\nvalue = 3.9"), [0, 10]);
        assert_eq!(
            check("field = \"temperature\"\nop = \"eq\"\nvalue = 4\nstat = \"mean\""),
            [0, 10]
        );
        assert_eq!(check("field = \"temperature\"\nop = \"ge\"\nvalue = 9\nstat = \"max\""), [0]);
        assert_eq!(check("field = \"temperature\"\nop = \"le\"\nvalue = 1\nstat = \"min\""), [0]);
        assert_eq!(check("field = \"temperature\"\nop = \"eq\"\nvalue = 9\nstat = \"last\""), [0]);
        assert_eq!(
            check("field = \"temperature\"\nop = \"eq\"\nvalue = 4\nstat = \"first\""),
            [10]
        );
        assert_eq!(check("field = \"temperature\"\nop = \"is_nan\""), [20]);
        assert_eq!(check("label = true"), [10]);
    }

    fn score(device: &str, start: i64, value: f32, anomaly: bool) -> Score {
        Score {
            device: DeviceId::intern(device),
            start_ms: start,
            end_ms: start + 10,
            detector: Arc::from("ae"),
            version: Arc::from("1"),
            score: value,
            threshold: Some(0.5),
            anomaly,
            label: LABEL_NORMAL,
            columns: Arc::new(Schema::new(["vibration", "current"])),
            values: vec![value * 2.0, 0.1],
            labels: Default::default(),
        }
    }

    #[test]
    fn scores_by_anomaly_score_threshold_and_value_columns() {
        let scores = || {
            Batch::Scores(vec![
                score("pump-1", 0, 0.2, false),
                score("pump-1", 10, 0.9, true),
                score("pump-2", 20, 0.7, true),
            ])
        };
        let check = |toml: &str| run(toml, scores()).0;
        assert_eq!(check("anomaly = true"), [10, 20]);
        assert_eq!(check("anomaly = false"), [0]);
        assert_eq!(check("field = \"score\"\nop = \"gt\"\nvalue = 0.8"), [10]);
        assert_eq!(check("field = \"threshold\"\nop = \"eq\"\nvalue = 0.5"), [0, 10, 20]);
        assert_eq!(check("field = \"vibration\"\nop = \"gt\"\nvalue = 1.5"), [10]);
        assert_eq!(check("anomaly = true\ndevice = [\"pump-2\"]"), [20]);
    }

    #[test]
    fn a_field_missing_at_run_time_is_reported_once_per_batch() {
        let (kept, mut out) =
            run("field = \"flow\"\nop = \"gt\"\nvalue = 0", Batch::Readings(readings()));
        assert!(kept.is_empty());
        let errors = out.take_errors();
        assert_eq!(errors.len(), 1);
        assert_eq!(&*errors[0].error_type, "unknown_field");
        assert!(errors[0].reason.contains("flow"), "{}", errors[0].reason);
    }

    #[test]
    fn validation() {
        let factory = FilterFactory;
        let ctx = ValidateContext::default();
        let check = |toml: &str, port: &PortType| factory.output_type(&condition(toml), port, &ctx);
        let good = check("field = \"temperature\"\nop = \"gt\"\nvalue = 1", &readings_port())
            .expect("valid");
        assert_eq!(good, readings_port());
        let windows_port = PortType::with_schema(Kind::Windows, Arc::new(Schema::new(["t"])));
        let scores_port = PortType::with_schema(Kind::Scores, Arc::new(Schema::new(["v"])));
        check("field = \"t\"\nop = \"gt\"\nvalue = 1\nstat = \"max\"", &windows_port)
            .expect("stat on windows");
        check("field = \"score\"\nop = \"gt\"\nvalue = 1", &scores_port).expect("score");
        check("field = \"v\"\nop = \"gt\"\nvalue = 1", &scores_port).expect("value column");
        check("field = \"anything\"\nop = \"gt\"\nvalue = 1", &PortType::of(Kind::Readings))
            .expect("no schema known");

        for (toml, port, field) in [
            ("", readings_port(), "field"),
            ("field = \"flow\"\nop = \"gt\"\nvalue = 1", readings_port(), "field"),
            ("field = \"score\"\nop = \"gt\"\nvalue = 1", readings_port(), "field"),
            ("field = \"temperature\"\nvalue = 1", readings_port(), "field"),
            ("op = \"gt\"\nvalue = 1", readings_port(), "op"),
            ("field = \"temperature\"\nop = \"gt\"", readings_port(), "value"),
            ("field = \"temperature\"\nop = \"is_nan\"\nvalue = 1", readings_port(), "value"),
            ("field = \"temperature\"\nop = \"gt\"\nvalue = nan", readings_port(), "value"),
            ("value = 1", readings_port(), "value"),
            (
                "field = \"temperature\"\nop = \"gt\"\nvalue = 1\nstat = \"max\"",
                readings_port(),
                "stat",
            ),
            ("anomaly = true", readings_port(), "anomaly"),
            ("device = []", readings_port(), "device"),
            ("device = [\"\"]", readings_port(), "device"),
            ("device_prefix = []", readings_port(), "device_prefix"),
            ("all = []", readings_port(), "all"),
            ("any = [ { device = [\"a\"] }, {} ]", readings_port(), "any"),
            ("all = [ { field = \"nope\", op = \"gt\", value = 1 } ]", readings_port(), "all"),
            ("not = { anomaly = true }", readings_port(), "not"),
            (
                "any = [ { all = [ { field = \"x\", op = \"lt\", value = 1 } ] } ]",
                readings_port(),
                "any",
            ),
        ] {
            let error = check(toml, &port).expect_err(toml);
            assert_eq!(error.field.as_deref(), Some(field), "{toml}: {error:?}");
        }
        let nested = check("any = [ { device = [\"a\"] }, { op = \"gt\" } ]", &readings_port())
            .expect_err("nested");
        assert!(nested.message.starts_with("any[1]: "), "{}", nested.message);

        let unknown = ConfigValue::parse("feild = \"x\"")
            .expect("toml")
            .deserialize::<Condition>()
            .expect_err("unknown key");
        assert!(unknown.message.contains("feild"), "{}", unknown.message);

        let raw = check("label = true", &PortType::of(Kind::Raw)).expect_err("raw input");
        assert!(raw.message.contains("raw messages"), "{}", raw.message);
        assert_eq!(
            factory.accepts(&condition("label = true")),
            [Kind::Readings, Kind::Windows, Kind::Scores]
        );
    }

    #[test]
    fn the_built_filter_serves_each_kind_its_condition_applies_to() {
        // `anomaly` only applies to scores: the built filter takes scores and rejects readings.
        let (kept, _) = run(
            "anomaly = true",
            Batch::Scores(vec![score("a", 0, 1.0, true), score("a", 10, 0.0, false)]),
        );
        assert_eq!(kept, [0]);
        let (kept, mut out) = run("anomaly = true", Batch::Readings(readings()));
        assert!(kept.is_empty());
        assert_eq!(&*out.take_errors()[0].error_type, "unsupported_kind");
    }
}
