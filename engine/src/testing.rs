//! Pipeline tests: `[[tests]]` tables in a pipeline file, run by `tidewatch test`.
//!
//! A test inserts records as the output of named components (raw payloads for a source,
//! catalog updates as JSON for a `catalog` source, readings for a component that emits
//! readings), runs only the transforms between those and
//! the outputs it checks, on one worker and without any source or sink (no broker, no file),
//! and compares what reaches each checked output with what it expects:
//!
//! The tables may also stand in a file of their own beside the pipeline, which names it with
//! `pipeline = "<file>"` ([`load_for_test`]).
//!
//! ```toml
//! [[tests]]
//! name = "hot readings take the hot route"
//!
//! [[tests.inputs]]
//! insert_at = "fleet"                      # a source: raw payloads
//! payloads = ['{"device":"p1","ts":1000,"temperature":95}']
//!
//! [[tests.outputs]]
//! extract_from = "by_heat.hot"             # any output: <id>, <id>.<name>, <id>.errors ...
//! records = [{ device = "p1", values = { temperature = 95.0 } }]
//! ```
//!
//! Each transform processes all its input, batch after batch, then its input ends
//! (`on_watermark` to the end of time and `close`): windows close at the end, nothing is late.
//! Records are compared in their JSON-lines form (`tidewatch_api::json`): by their number
//! (`count`), with expected records (`records`, in order) or one expected for each (`each`),
//! each a subset of the actual record (keys it leaves out are not compared), and with
//! conditions on fields (`conditions`: `{ field = "score", op = "gt", value = 3.0 }`); numbers
//! are equal within 10⁻⁵ relative.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use serde::Deserialize;
use tidewatch_api::catalog::CatalogUpdate;
use tidewatch_api::{
    Batch, ComponentContext, ConfigValue, DeviceId, EventTime, Kind, LABEL_ANOMALY, LABEL_NORMAL,
    Outputs, RawBatch, ReadingBatch, Transform,
};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::diagnostics::Reporter;
use crate::interpolate::interpolate;
use crate::registry::Registry;
use crate::spec::{
    Component, Configured, InputRef, Pipeline, Port, ValidationErrors, load_str, read_file,
};

/// One `[[tests]]` table, checked against the pipeline.
#[derive(Clone, Debug)]
pub struct PipelineTest {
    /// Its `name`.
    pub name: String,
    /// Where it is in the file (1-based line and column of the table).
    pub line: usize,
    /// See `line`.
    pub column: usize,
    /// The records inserted, by component.
    pub inputs: Vec<TestInput>,
    /// The outputs checked.
    pub outputs: Vec<TestOutput>,
}

/// Records inserted as a component's output.
#[derive(Clone, Debug)]
pub struct TestInput {
    /// The component whose output they stand for.
    pub insert_at: String,
    /// The records.
    pub batch: Batch,
}

/// What one output must carry.
#[derive(Clone, Debug)]
pub struct TestOutput {
    /// The output.
    pub extract_from: InputRef,
    /// Where `extract_from` is in the file (1-based line and column).
    pub line: usize,
    /// See `line`.
    pub column: usize,
    /// Exactly this many records.
    pub count: Option<usize>,
    /// Exactly these records, in order, each a subset of the actual one.
    pub records: Option<Vec<serde_json::Value>>,
    /// A subset of every record.
    pub each: Option<serde_json::Value>,
    /// Conditions every record meets.
    pub conditions: Vec<TestCondition>,
}

/// A comparison every record of an output must pass: `field` `op` `value`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestCondition {
    /// A field of the record's JSON form, nested fields joined by `.` (`values.temperature`).
    pub field: String,
    /// The comparison.
    pub op: CompareOp,
    /// What the field is compared with: a number for `gt`, `ge`, `lt` and `le`; any value for
    /// `eq` and `ne`.
    pub value: serde_json::Value,
}

/// The comparison of a [`TestCondition`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompareOp {
    /// Greater than.
    Gt,
    /// Greater than or equal.
    Ge,
    /// Less than.
    Lt,
    /// Less than or equal.
    Le,
    /// Equal (numbers within 10⁻⁵ relative).
    Eq,
    /// Not equal.
    Ne,
}

impl CompareOp {
    fn name(self) -> &'static str {
        match self {
            CompareOp::Gt => "gt",
            CompareOp::Ge => "ge",
            CompareOp::Lt => "lt",
            CompareOp::Le => "le",
            CompareOp::Eq => "eq",
            CompareOp::Ne => "ne",
        }
    }
}

/// A failed expectation of a test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestFailure {
    /// The line of the output (or test) it is about.
    pub line: usize,
    /// Its column.
    pub column: usize,
    /// What differs.
    pub message: String,
}

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

/// Loads what `tidewatch test` runs from `path`: a pipeline file and its `[[tests]]`, or a
/// tests file of its own beside it, which names its pipeline with `pipeline = "<file>"` (a
/// string, relative to the tests file's folder; a pipeline file's `[pipeline]` is a table)
/// and holds only `[[tests]]`. `${VAR}` is read from the process environment in both.
pub fn load_for_test(
    path: &Path,
    registry: &Registry,
) -> Result<(Pipeline, Vec<PipelineTest>), ValidationErrors> {
    let (text, label, base_dir) = read_file(path)?;
    let (interpolated, interpolation_errors) = interpolate(&text, crate::spec::process_env(0));
    // The spans of the tests live as long as the process, like a pipeline's.
    let interpolated: &'static str = Box::leak(interpolated.into_boxed_str());
    let (root, syntax_errors) = DeTable::parse_recoverable(interpolated);
    let names_pipeline =
        root.get_ref().get("pipeline").is_some_and(|value| value.get_ref().as_str().is_some());
    if !names_pipeline {
        let pipeline = load_str(&text, &label, &base_dir, registry, crate::spec::process_env(0))?;
        let tests = pipeline.tests.clone();
        return Ok((pipeline, tests));
    }
    let mut reporter = Reporter::new(&label, interpolated);
    for error in interpolation_errors {
        reporter.error(Some(error.span), error.message, error.hint);
    }
    for error in syntax_errors {
        reporter.error(error.span(), format!("TOML syntax: {}", error.message().trim()), None);
    }
    if reporter.has_errors() {
        return Err(ValidationErrors { diagnostics: reporter.diagnostics });
    }
    let mut pipeline_path = None;
    let mut tests = None;
    for (key, value) in root.get_ref().iter() {
        match key.get_ref().as_ref() {
            "pipeline" => {
                pipeline_path = value.get_ref().as_str().map(|file| base_dir.join(file));
            }
            "tests" => tests = Some(value.clone()),
            other => reporter.error(
                Some(key.span()),
                format!("unknown key `{other}` in a tests file"),
                Some("a tests file holds `pipeline = \"<pipeline file>\"` and [[tests]]".into()),
            ),
        }
    }
    let Some(pipeline_path) = pipeline_path else {
        return Err(ValidationErrors { diagnostics: reporter.diagnostics });
    };
    let pipeline = crate::spec::load_file(&pipeline_path, registry)?;
    let tests = match tests {
        Some(tests) => parse_tests(&tests, &pipeline.components, &mut reporter),
        None => Vec::new(),
    };
    if reporter.has_errors() {
        return Err(ValidationErrors { diagnostics: reporter.diagnostics });
    }
    Ok((pipeline, tests))
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestSpec {
    name: String,
    #[serde(default)]
    inputs: Vec<InputSpec>,
    #[serde(default)]
    outputs: Vec<OutputSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputSpec {
    insert_at: String,
    /// Raw payloads, for a source.
    #[serde(default)]
    payloads: Vec<String>,
    /// The topic (or file name) of the payloads.
    #[serde(default)]
    topic: String,
    /// The header line of the stream of the payloads (a CSV file's first line).
    #[serde(default)]
    header: Option<String>,
    /// Readings, for a component that emits readings.
    #[serde(default)]
    readings: Vec<ReadingSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadingSpec {
    device: String,
    time_ms: EventTime,
    values: BTreeMap<String, f64>,
    #[serde(default)]
    label: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputSpec {
    extract_from: String,
    #[serde(default)]
    count: Option<usize>,
    #[serde(default)]
    records: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    each: Option<serde_json::Value>,
    #[serde(default)]
    conditions: Vec<TestCondition>,
}

/// The span of `key` in the `index`-th table of the array `array` of `table`.
fn span_in(
    table: &Spanned<DeValue<'static>>,
    array: &str,
    index: usize,
    key: &str,
) -> Option<Range<usize>> {
    let array = table.get_ref().as_table()?.get(array)?.get_ref().as_array()?;
    let entry = array.get(index)?.get_ref().as_table()?;
    entry.get(key).map(Spanned::span)
}

/// Parses and checks the `[[tests]]` of a pipeline against its validated components;
/// reports every problem with its position.
pub(crate) fn parse_tests(
    value: &Spanned<DeValue<'static>>,
    components: &[Component],
    reporter: &mut Reporter,
) -> Vec<PipelineTest> {
    let Some(tables) = value.get_ref().as_array() else {
        reporter.error(
            Some(value.span()),
            "`tests` must be an array of tables",
            Some("write [[tests]] sections".into()),
        );
        return Vec::new();
    };
    let mut tests = Vec::new();
    for table in tables.iter() {
        let spec: TestSpec = match ConfigValue::new(table.clone()).deserialize() {
            Ok(spec) => spec,
            Err(error) => {
                reporter.error(error.span.or(Some(table.span())), error.message, error.hint);
                continue;
            }
        };
        let (line, column) = reporter.position(table.span().start);
        let mut ok = true;
        let mut inputs = Vec::new();
        for (index, input) in spec.inputs.into_iter().enumerate() {
            let span = span_in(table, "inputs", index, "insert_at").or(Some(table.span()));
            match test_input(input, components) {
                Ok(input) => inputs.push(input),
                Err((message, hint)) => {
                    reporter.error(span, format!("test `{}`: {message}", spec.name), hint);
                    ok = false;
                }
            }
        }
        let mut outputs = Vec::new();
        for (index, output) in spec.outputs.into_iter().enumerate() {
            let span = span_in(table, "outputs", index, "extract_from").unwrap_or(table.span());
            match output_ref(&output.extract_from, components) {
                Ok(extract_from) => {
                    let (line, column) = reporter.position(span.start);
                    outputs.push(TestOutput {
                        extract_from,
                        line,
                        column,
                        count: output.count,
                        records: output.records,
                        each: output.each,
                        conditions: output.conditions,
                    });
                }
                Err((message, hint)) => {
                    reporter.error(Some(span), format!("test `{}`: {message}", spec.name), hint);
                    ok = false;
                }
            }
        }
        if ok && (inputs.is_empty() || outputs.is_empty()) {
            reporter.error(
                Some(table.span()),
                format!("test `{}` needs at least one of `inputs` and of `outputs`", spec.name),
                Some("[[tests.inputs]] insert_at = \"<id>\" ... [[tests.outputs]] extract_from = \"<id>\" ...".into()),
            );
            ok = false;
        }
        if ok {
            tests.push(PipelineTest { name: spec.name, line, column, inputs, outputs });
        }
    }
    tests
}

type Problem = (String, Option<String>);

fn component<'c>(id: &str, components: &'c [Component]) -> Result<&'c Component, Problem> {
    components.iter().find(|component| component.id == id).ok_or_else(|| {
        let ids: Vec<&str> = components.iter().map(|component| component.id.as_str()).collect();
        (format!("`{id}` is not a component"), Some(format!("components: {}", ids.join(", "))))
    })
}

fn test_input(input: InputSpec, components: &[Component]) -> Result<TestInput, Problem> {
    let target = component(&input.insert_at, components)?;
    let kind = target.output.as_ref().map(|port| port.kind);
    let batch = match (input.payloads.is_empty(), input.readings.is_empty(), kind) {
        (false, true, Some(Kind::Raw)) => {
            let mut raw = RawBatch::new();
            if let Some(header) = &input.header {
                raw.set_header(Arc::from(header.as_bytes()));
            }
            for (position, payload) in input.payloads.iter().enumerate() {
                raw.push(&input.topic, payload.as_bytes(), 0, position as u64);
            }
            Batch::Raw(raw)
        }
        (false, true, Some(Kind::Catalog)) => {
            let mut updates = Vec::with_capacity(input.payloads.len());
            for (index, payload) in input.payloads.iter().enumerate() {
                let update = CatalogUpdate::from_json(payload.as_bytes()).map_err(|error| {
                    (
                        format!("payload {} of `{}`: {error}", index + 1, target.id),
                        Some(r#"a catalog update is {"diff":1,"row":{"device":"pump-1","site":"north"}} (diff -1 retracts the row)"#.to_owned()),
                    )
                })?;
                updates.push(update);
            }
            Batch::Catalog(updates)
        }
        (true, false, Some(Kind::Readings)) => {
            let schema =
                target.output.as_ref().and_then(|port| port.schema.clone()).ok_or_else(|| {
                    (format!("the features of `{}` are not known", target.id), None)
                })?;
            let mut batch = ReadingBatch::new(Arc::clone(&schema));
            for reading in &input.readings {
                let mut values = Vec::with_capacity(schema.len());
                for name in schema.names() {
                    let value = reading.values.get(&**name).ok_or_else(|| {
                        (
                            format!("a reading of `{}` lacks the feature `{name}`", reading.device),
                            Some(format!("the features are {:?}", schema.names())),
                        )
                    })?;
                    values.push(*value as f32);
                }
                if let Some(extra) =
                    reading.values.keys().find(|name| schema.index_of(name).is_none())
                {
                    return Err((
                        format!("`{extra}` is not a feature of `{}`", target.id),
                        Some(format!("the features are {:?}", schema.names())),
                    ));
                }
                let label = if reading.label { LABEL_ANOMALY } else { LABEL_NORMAL };
                batch.push(DeviceId::intern(&reading.device), reading.time_ms, &values, label);
            }
            Batch::Readings(batch)
        }
        (false, false, _) => {
            return Err(("give `payloads` or `readings`, not both".into(), None));
        }
        (_, _, kind) => {
            let emits = kind.map_or("nothing".to_owned(), |kind| kind.to_string());
            return Err((
                format!(
                    "`{}` emits {emits}: insert `payloads` at a source or `readings` at a component that emits readings",
                    target.id
                ),
                None,
            ));
        }
    };
    Ok(TestInput { insert_at: input.insert_at, batch })
}

fn output_ref(name: &str, components: &[Component]) -> Result<InputRef, Problem> {
    let (id, suffix) = match name.split_once('.') {
        Some((id, suffix)) => (id, Some(suffix)),
        None => (name, None),
    };
    let producer = component(id, components)?;
    let named = |port: &str| producer.named_outputs.iter().any(|known| &**known == port);
    let port = match suffix {
        None if producer.named_outputs.is_empty() => Port::Main,
        Some("errors") => Port::Errors,
        Some("late") if producer.late.is_some() => Port::Late,
        Some(port) if named(port) => Port::Named(Arc::from(port)),
        _ => {
            let mut ports: Vec<String> = if producer.named_outputs.is_empty() {
                vec![id.to_owned()]
            } else {
                producer.named_outputs.iter().map(|port| format!("{id}.{port}")).collect()
            };
            ports.push(format!("{id}.errors"));
            if producer.late.is_some() {
                ports.push(format!("{id}.late"));
            }
            return Err((
                format!("`{name}` is not an output of `{id}`"),
                Some(format!("its outputs: {}", ports.join(", "))),
            ));
        }
    };
    if producer.output.is_none() {
        return Err((format!("`{id}` is a sink and has no output"), None));
    }
    Ok(InputRef { component: id.to_owned(), port })
}

// ---------------------------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------------------------

type Ports = HashMap<(String, Port), Vec<Batch>>;

/// Runs one test of `pipeline`: the transforms between its inputs and its outputs, then its
/// expectations. Returns what failed (nothing when it passed).
pub fn run_test(pipeline: &Pipeline, test: &PipelineTest) -> Vec<TestFailure> {
    let components = &pipeline.components;
    let inserted: HashSet<&str> =
        test.inputs.iter().map(|input| input.insert_at.as_str()).collect();
    let position: HashMap<&str, usize> =
        components.iter().enumerate().map(|(index, c)| (c.id.as_str(), index)).collect();
    // Downstream of an input (components are in producer-first order) ...
    let mut reached = vec![false; components.len()];
    for (index, component) in components.iter().enumerate() {
        reached[index] = inserted.contains(component.id.as_str())
            || component.inputs.iter().any(|input| {
                position.get(input.component.as_str()).is_some_and(|producer| reached[*producer])
            });
    }
    // ... and upstream of a checked output.
    let mut needed = vec![false; components.len()];
    for output in &test.outputs {
        if let Some(index) = position.get(output.extract_from.component.as_str()) {
            needed[*index] = true;
        }
    }
    for index in (0..components.len()).rev() {
        if needed[index] {
            for input in &components[index].inputs {
                if let Some(producer) = position.get(input.component.as_str()) {
                    needed[*producer] = true;
                }
            }
        }
    }
    let mut ports: Ports = HashMap::new();
    for input in &test.inputs {
        ports.entry((input.insert_at.clone(), Port::Main)).or_default().push(input.batch.clone());
    }
    let mut failures = Vec::new();
    for (index, component) in components.iter().enumerate() {
        if !reached[index] || !needed[index] || inserted.contains(component.id.as_str()) {
            continue;
        }
        let Configured::Transform(configured, _) = &component.configured else { continue };
        let ctx = ComponentContext::new(
            &component.id,
            &component.type_name,
            0,
            1,
            Arc::clone(&pipeline.info),
            Arc::new(AtomicBool::new(false)),
        );
        let built = configured
            .build(&ctx)
            .and_then(|mut transform| transform.open(&ctx).map(|()| transform));
        match built {
            Ok(transform) => run_transform(component, transform, &mut ports),
            Err(error) => failures.push(TestFailure {
                line: test.line,
                column: test.column,
                message: format!("component `{}` cannot start: {error}", component.id),
            }),
        }
    }
    for output in &test.outputs {
        let key = (output.extract_from.component.clone(), output.extract_from.port.clone());
        let batches = ports.get(&key).map(Vec::as_slice).unwrap_or_default();
        if let Some(message) = check(output, batches) {
            failures.push(TestFailure {
                line: output.line,
                column: output.column,
                message: format!("`{}`: {message}", output.extract_from),
            });
        }
    }
    failures
}

fn run_transform(component: &Component, mut transform: Box<dyn Transform>, ports: &mut Ports) {
    let mut outs = Outputs::new(&component.id);
    let mut input: Vec<Batch> = Vec::new();
    for source in &component.inputs {
        let key = (source.component.clone(), source.port.clone());
        input.extend(ports.get(&key).into_iter().flatten().cloned());
    }
    for batch in input {
        transform.process_batch(batch, &mut outs);
        collect(component, &mut outs, ports);
    }
    transform.on_watermark(EventTime::MAX, &mut outs);
    transform.close(&mut outs);
    collect(component, &mut outs, ports);
}

/// Files what the transform produced under its ports.
fn collect(component: &Component, outs: &mut Outputs, ports: &mut Ports) {
    let id = &component.id;
    let mut file = |port: Port, batch: Batch| {
        ports.entry((id.clone(), port)).or_default().push(batch);
    };
    for batch in outs.take_main() {
        file(Port::Main, batch);
    }
    for (port, batch) in outs.take_named() {
        if let Some(name) = component.named_outputs.get(port) {
            file(Port::Named(Arc::clone(name)), batch);
        }
    }
    let errors = outs.take_errors();
    if !errors.is_empty() {
        file(Port::Errors, Batch::Errors(errors));
    }
    for late in outs.take_late() {
        file(Port::Late, Batch::Readings(late));
    }
    outs.take_discarded();
}

/// The records of `batches` in their JSON-lines form.
fn records(batches: &[Batch]) -> Result<Vec<serde_json::Value>, String> {
    let mut text = Vec::new();
    for batch in batches {
        tidewatch_api::json::write_json_lines(batch, &mut text)
            .map_err(|error| format!("cannot encode the records: {error}"))?;
    }
    String::from_utf8_lossy(&text)
        .lines()
        .map(|line| serde_json::from_str(line).map_err(|error| format!("bad record: {error}")))
        .collect()
}

/// What is wrong with the records of an output, if anything.
fn check(output: &TestOutput, batches: &[Batch]) -> Option<String> {
    let actual = match records(batches) {
        Ok(actual) => actual,
        Err(error) => return Some(error),
    };
    let expected_count = output.count.or(output.records.as_ref().map(Vec::len));
    if let Some(count) = expected_count
        && actual.len() != count
    {
        return Some(format!(
            "{} records, expected {count}{}",
            actual.len(),
            first_records(&actual)
        ));
    }
    if expected_count.is_none()
        && output.each.is_none()
        && output.conditions.is_empty()
        && actual.is_empty()
    {
        return Some("no records, expected at least one".into());
    }
    if let Some(records) = &output.records {
        for (index, (expected, actual)) in records.iter().zip(&actual).enumerate() {
            if let Some(difference) = difference(expected, actual, "") {
                return Some(format!("record {index}: {difference} (the record: {actual})"));
            }
        }
    }
    if let Some(each) = &output.each {
        for (index, actual) in actual.iter().enumerate() {
            if let Some(difference) = difference(each, actual, "") {
                return Some(format!("record {index}: {difference} (the record: {actual})"));
            }
        }
    }
    for condition in &output.conditions {
        for (index, actual) in actual.iter().enumerate() {
            if let Some(failure) = unmet(condition, actual) {
                return Some(format!("record {index}: {failure} (the record: {actual})"));
            }
        }
    }
    None
}

/// Why `record` does not meet `condition`, if it does not.
fn unmet(condition: &TestCondition, record: &serde_json::Value) -> Option<String> {
    let field = &condition.field;
    let value = field.split('.').try_fold(record, |value, key| value.get(key));
    let Some(value) = value else {
        return Some(format!("`{field}` is missing"));
    };
    let expected = &condition.value;
    let met = match (condition.op, value.as_f64(), expected.as_f64()) {
        (CompareOp::Eq, _, _) => difference(expected, value, field).is_none(),
        (CompareOp::Ne, _, _) => difference(expected, value, field).is_some(),
        (op, Some(actual), Some(bound)) => match op {
            CompareOp::Gt => actual > bound,
            CompareOp::Ge => actual >= bound,
            CompareOp::Lt => actual < bound,
            _ => actual <= bound,
        },
        (op, _, _) => {
            return Some(format!(
                "`{field}` is {value}: `{}` compares numbers with a number",
                op.name()
            ));
        }
    };
    (!met).then(|| format!("`{field}` is {value}, expected {} {expected}", condition.op.name()))
}

/// The first records, for a message.
fn first_records(actual: &[serde_json::Value]) -> String {
    if actual.is_empty() {
        return String::new();
    }
    let shown: Vec<String> = actual.iter().take(3).map(ToString::to_string).collect();
    let more = if actual.len() > 3 { ", ..." } else { "" };
    format!(": {}{more}", shown.join(", "))
}

/// Where `actual` differs from `expected` (keys `expected` lacks are not compared).
fn difference(
    expected: &serde_json::Value,
    actual: &serde_json::Value,
    path: &str,
) -> Option<String> {
    use serde_json::Value;
    let at =
        |path: &str| if path.is_empty() { "the record".to_owned() } else { format!("`{path}`") };
    match (expected, actual) {
        (Value::Object(expected), Value::Object(actual)) => {
            expected.iter().find_map(|(key, expected)| {
                let path = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                match actual.get(key) {
                    Some(actual) => difference(expected, actual, &path),
                    None => Some(format!("`{path}` is missing, expected {expected}")),
                }
            })
        }
        (Value::Array(expected), Value::Array(actual)) => {
            if expected.len() != actual.len() {
                return Some(format!(
                    "{} has {} elements, expected {}",
                    at(path),
                    actual.len(),
                    expected.len()
                ));
            }
            expected.iter().zip(actual).enumerate().find_map(|(index, (expected, actual))| {
                difference(expected, actual, &format!("{path}[{index}]"))
            })
        }
        (Value::Number(expected), Value::Number(actual)) => {
            let (e, a) =
                (expected.as_f64().unwrap_or(f64::NAN), actual.as_f64().unwrap_or(f64::NAN));
            let close = (e - a).abs() <= 1e-5 * e.abs().max(1.0);
            (!close).then(|| format!("{} is {actual}, expected {expected}", at(path)))
        }
        (expected, actual) if expected == actual => None,
        (expected, actual) => Some(format!("{} is {actual}, expected {expected}", at(path))),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn conditions_compare_fields_of_every_record() {
        let record = json!({"device": "p1", "score": 2.5, "values": {"t": 95.0}});
        let condition = |field: &str, op: CompareOp, value: serde_json::Value| TestCondition {
            field: field.to_owned(),
            op,
            value,
        };
        assert_eq!(unmet(&condition("score", CompareOp::Gt, json!(2.0)), &record), None);
        assert_eq!(unmet(&condition("values.t", CompareOp::Le, json!(95)), &record), None);
        assert_eq!(unmet(&condition("device", CompareOp::Ne, json!("p2")), &record), None);
        assert_eq!(unmet(&condition("device", CompareOp::Eq, json!("p1")), &record), None);
        assert_eq!(
            unmet(&condition("score", CompareOp::Gt, json!(3.0)), &record).as_deref(),
            Some("`score` is 2.5, expected gt 3.0")
        );
        assert_eq!(
            unmet(&condition("values.x", CompareOp::Gt, json!(3.0)), &record).as_deref(),
            Some("`values.x` is missing")
        );
        assert_eq!(
            unmet(&condition("device", CompareOp::Lt, json!(3.0)), &record).as_deref(),
            Some("`device` is \"p1\": `lt` compares numbers with a number")
        );
    }

    #[test]
    fn expected_records_are_subsets_with_close_numbers() {
        let actual = json!({"device": "p1", "values": {"t": 95.000001, "p": 1.0}, "times": [1, 2]});
        assert_eq!(difference(&json!({"values": {"t": 95.0}}), &actual, ""), None);
        assert_eq!(
            difference(&json!({"values": {"t": 70.0}}), &actual, "").as_deref(),
            Some("`values.t` is 95.000001, expected 70.0")
        );
        assert_eq!(
            difference(&json!({"device": "p2"}), &actual, "").as_deref(),
            Some("`device` is \"p1\", expected \"p2\"")
        );
        assert_eq!(
            difference(&json!({"label": 1}), &actual, "").as_deref(),
            Some("`label` is missing, expected 1")
        );
        assert_eq!(
            difference(&json!({"times": [1]}), &actual, "").as_deref(),
            Some("`times` has 2 elements, expected 1")
        );
    }
}
