//! Pipeline files: loading, environment interpolation and validation in stages.
//!
//! 1. environment interpolation (`${VAR}`, `${VAR:-default}`);
//! 2. TOML syntax (every syntax error);
//! 3. structure: top-level tables, component ids, `type`, `inputs`;
//! 4. component options, for every component whatever its inputs: the typed config (unknown
//!    options, bad values) and the factory's checks that need no input type
//!    (`TransformFactory::validate` ...), so a component downstream of a broken one is checked
//!    too;
//! 5. the graph, in named steps: `resolve_inputs` (dangling inputs, unknown ports), `order`
//!    (cycles), `infer_types` (record kinds between components, each transform's
//!    `output_type`), `endpoints` (a source and a sink);
//! 6. warnings: `unused_outputs`, components whose output nobody reads.
//!
//! Every stage reports every problem it finds as `path:line:col: message` with a hint; a stage
//! runs on what the previous ones accepted, and a component whose input type is unknown (its
//! producer is broken) skips only the checks that need that type.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use tidewatch_api::factory::{ConfiguredSink, ConfiguredSource, ConfiguredTransform};
use tidewatch_api::{
    ComponentFactory, ConfigError, ConfigValue, Kind, PipelineInfo, PortType, TransformProperties,
    ValidateContext,
};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::diagnostics::{Diagnostic, Reporter, Severity, closest, did_you_mean};
use crate::interpolate::interpolate;
use crate::registry::{Class, Registry};
use crate::testing::{PipelineTest, parse_tests};

/// The `[pipeline]` table.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    /// Name of the pipeline, used in logs and metrics. Default: the file name without extension.
    #[serde(default)]
    pub name: Option<String>,
    /// Worker threads. Default 1; `--workers` on the command line overrides it.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// How far behind the greatest event time seen a reading may arrive and still count as on
    /// time, ms. Default 5000.
    #[serde(default = "default_out_of_orderness_ms")]
    pub out_of_orderness_ms: u64,
    /// After this long without data, a stream's watermark advances with the wall clock (and
    /// catches up with the other workers), ms. Default 1000.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Address of the HTTP endpoint (`/metrics`, `/healthz`, `/readyz`); empty disables it.
    /// Default `127.0.0.1:9898`.
    #[serde(default = "default_http_address")]
    pub http_address: String,
    /// Seconds between two checkpoints; 0 (the default) takes none. With checkpoints a
    /// restarted pipeline resumes from the latest one (docs/operations.md, "Checkpoints and
    /// recovery").
    #[serde(default)]
    pub checkpoint_interval_secs: u64,
    /// Where checkpoints go: a folder (relative to the pipeline file's folder), `file://PATH`
    /// or `s3://BUCKET/PREFIX` (endpoint and credentials from the environment, as the lake).
    /// Default `checkpoints/<pipeline name>`.
    #[serde(default)]
    pub checkpoint_url: Option<String>,
    /// Complete checkpoints kept; older ones are deleted. Default 3.
    #[serde(default = "default_checkpoint_keep")]
    pub checkpoint_keep: usize,
    /// Backpressure: sources stop polling while more records than this are in flight between
    /// the operators (sent and not yet taken, in every process of the run); 0: no bound.
    /// Default 100000.
    #[serde(default = "default_max_in_flight_records")]
    pub max_in_flight_records: u64,
}

fn default_max_in_flight_records() -> u64 {
    100_000
}

fn default_checkpoint_keep() -> usize {
    3
}

fn default_workers() -> usize {
    1
}
fn default_out_of_orderness_ms() -> u64 {
    5_000
}
fn default_idle_timeout_ms() -> u64 {
    1_000
}
fn default_http_address() -> String {
    "127.0.0.1:9898".to_owned()
}

impl Default for PipelineSettings {
    fn default() -> Self {
        PipelineSettings {
            name: None,
            workers: default_workers(),
            out_of_orderness_ms: default_out_of_orderness_ms(),
            idle_timeout_ms: default_idle_timeout_ms(),
            checkpoint_interval_secs: 0,
            checkpoint_url: None,
            checkpoint_keep: default_checkpoint_keep(),
            max_in_flight_records: default_max_in_flight_records(),
            http_address: default_http_address(),
        }
    }
}

/// Which output of a component an input reads.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Port {
    /// The main output (`<id>`).
    Main,
    /// The error side output (`<id>.errors`).
    Errors,
    /// The late side output (`<id>.late`), for components that have one.
    Late,
    /// A named output (`<id>.<name>`) that the transform's options declare (`route`).
    Named(Arc<str>),
}

impl Port {
    /// The suffix written after the component id (`""`, `".errors"`, `".late"`, `".<name>"`).
    pub fn suffix(&self) -> std::borrow::Cow<'static, str> {
        match self {
            Port::Main => "".into(),
            Port::Errors => ".errors".into(),
            Port::Late => ".late".into(),
            Port::Named(name) => format!(".{name}").into(),
        }
    }
}

/// One input of a transform or sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputRef {
    /// The producing component's id.
    pub component: String,
    /// Which of its outputs.
    pub port: Port,
}

impl std::fmt::Display for InputRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.component, self.port.suffix())
    }
}

/// A configured component, ready to be built on each worker.
#[derive(Clone)]
pub enum Configured {
    /// A source.
    Source(Arc<dyn ConfiguredSource>),
    /// A transform and its dataflow properties.
    Transform(Arc<dyn ConfiguredTransform>, TransformProperties),
    /// A sink.
    Sink(Arc<dyn ConfiguredSink>),
}

impl std::fmt::Debug for Configured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Configured::Source(_) => f.write_str("Configured::Source"),
            Configured::Transform(_, properties) => {
                write!(f, "Configured::Transform({properties:?})")
            }
            Configured::Sink(_) => f.write_str("Configured::Sink"),
        }
    }
}

/// A validated component.
#[derive(Clone, Debug)]
pub struct Component {
    /// Its id (the key under `[sources]`, `[transforms]` or `[sinks]`).
    pub id: String,
    /// Its class.
    pub class: Class,
    /// Its type name.
    pub type_name: String,
    /// What it reads (empty for sources).
    pub inputs: Vec<InputRef>,
    /// The configured factory.
    pub configured: Configured,
    /// The type of its main output (`None` for sinks); a transform's named outputs carry it too.
    pub output: Option<PortType>,
    /// The type of its late output, if it has one.
    pub late: Option<PortType>,
    /// Its named outputs (`<id>.<name>`), in the order the transform sends to them; a
    /// transform with named outputs has no main output.
    pub named_outputs: Vec<Arc<str>>,
}

/// A validated pipeline: components in an order where every producer precedes its consumers.
#[derive(Clone, Debug)]
pub struct Pipeline {
    /// The file it was loaded from, as given.
    pub path: String,
    /// The `[pipeline]` table.
    pub settings: PipelineSettings,
    /// Settings handed to components.
    pub info: Arc<PipelineInfo>,
    /// Components, producers before consumers.
    pub components: Vec<Component>,
    /// Warnings found while validating.
    pub warnings: Vec<Diagnostic>,
    /// Its `[[tests]]` (run by `tidewatch test`, see [`crate::testing`]).
    pub tests: Vec<PipelineTest>,
}

impl Pipeline {
    /// The component named `id`.
    pub fn component(&self, id: &str) -> Option<&Component> {
        self.components.iter().find(|component| component.id == id)
    }
}

/// Every problem found in a pipeline file (errors and warnings).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", render(.diagnostics))]
pub struct ValidationErrors {
    /// All diagnostics, errors first in file order.
    pub diagnostics: Vec<Diagnostic>,
}

fn render(diagnostics: &[Diagnostic]) -> String {
    diagnostics.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
}

impl ValidationErrors {
    /// Only the errors.
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|diagnostic| diagnostic.severity == Severity::Error)
    }
}

/// The variable tidewatch sets for a pipeline file when the environment does not: the
/// process's index in its cluster (`--process`, or the StatefulSet ordinal; 0 alone).
pub const PROCESS_VARIABLE: &str = "TIDEWATCH_PROCESS";

/// How `${VAR}` is looked up in a pipeline file of process `process`: the environment, and
/// [`PROCESS_VARIABLE`] when the environment does not set it.
pub fn process_env(process: usize) -> impl Fn(&str) -> Option<String> {
    move |name| {
        std::env::var(name).ok().or_else(|| (name == PROCESS_VARIABLE).then(|| process.to_string()))
    }
}

/// Loads and validates a pipeline file, reading `${VAR}` from the process environment (and
/// `${TIDEWATCH_PROCESS}` as 0, see [`process_env`]).
pub fn load_file(path: &Path, registry: &Registry) -> Result<Pipeline, ValidationErrors> {
    load_file_with(path, registry, process_env(0))
}

/// Loads and validates a pipeline file, looking `${VAR}` up with `env` (e.g. the process
/// environment with a few variables of the engine's own on top).
pub fn load_file_with(
    path: &Path,
    registry: &Registry,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Pipeline, ValidationErrors> {
    let (text, label, base_dir) = read_file(path)?;
    load_str(&text, &label, &base_dir, registry, env)
}

/// The text of a file, its label in diagnostics and its folder (where relative paths in it
/// resolve); a file that cannot be read is an error at its 1:1.
pub(crate) fn read_file(path: &Path) -> Result<(String, String, PathBuf), ValidationErrors> {
    let label = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|error| ValidationErrors {
        diagnostics: vec![Diagnostic {
            severity: Severity::Error,
            path: label.clone(),
            line: 1,
            column: 1,
            message: format!("cannot read the file: {error}"),
            hint: None,
        }],
    })?;
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    Ok((text, label, base_dir))
}

/// Loads and validates pipeline text. `label` names the file in diagnostics, `base_dir`
/// resolves relative paths, `env` looks variables up.
pub fn load_str(
    text: &str,
    label: &str,
    base_dir: &Path,
    registry: &Registry,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Pipeline, ValidationErrors> {
    let (text, interpolation_errors) = interpolate(text, env);
    let mut reporter = Reporter::new(label, &text);
    for error in interpolation_errors {
        reporter.error(Some(error.span), error.message, error.hint);
    }
    // The configs keep spans into the text for the life of the process.
    let text: &'static str = Box::leak(text.into_boxed_str());
    let (root, syntax_errors) = DeTable::parse_recoverable(text);
    for error in syntax_errors {
        reporter.error(error.span(), format!("TOML syntax: {}", error.message().trim()), None);
    }
    if reporter.has_errors() {
        return Err(ValidationErrors { diagnostics: reporter.diagnostics });
    }
    let mut validator = Validator { reporter, registry, entries: Vec::new(), tests: None };
    let settings = validator.structure(root.get_ref());
    let name = settings.name.clone().unwrap_or_else(|| {
        Path::new(label)
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let info = Arc::new(PipelineInfo {
        name,
        out_of_orderness_ms: settings.out_of_orderness_ms,
        idle_timeout_ms: settings.idle_timeout_ms,
        base_dir: base_dir.to_path_buf(),
        checkpoints: settings.checkpoint_interval_secs > 0,
    });
    let ctx = ValidateContext { pipeline: Arc::clone(&info) };
    validator.configure(&ctx);
    let components = validator.graph(&ctx);
    let Validator { mut reporter, tests, .. } = validator;
    // The tests refer to components and their outputs: checked once the graph is sound.
    let tests = match tests {
        Some(tests) if !reporter.has_errors() => parse_tests(&tests, &components, &mut reporter),
        _ => Vec::new(),
    };
    if reporter.has_errors() {
        let mut diagnostics = reporter.diagnostics;
        diagnostics
            .sort_by_key(|diagnostic| (diagnostic.severity, diagnostic.line, diagnostic.column));
        return Err(ValidationErrors { diagnostics });
    }
    Ok(Pipeline {
        path: label.to_owned(),
        settings,
        info,
        components,
        warnings: reporter.diagnostics,
        tests,
    })
}

/// A string from the file with its byte span.
type Located = (String, Range<usize>);

/// An input resolved to the component that produces it.
struct Resolved {
    input: InputRef,
    span: Range<usize>,
    producer: usize,
}

/// A component as read from the file, before its options are checked.
struct Entry {
    id: String,
    id_span: Range<usize>,
    class: Class,
    type_name: String,
    type_span: Range<usize>,
    inputs: Vec<Located>,
    inputs_span: Range<usize>,
    options: ConfigValue,
    configured: Option<Configured>,
    /// The named outputs its options declare (known once `configured` is).
    named: Vec<Arc<str>>,
}

impl Entry {
    /// Its outputs as consumers name them (`id`, `id.<name>`, `id.errors`, `id.late`);
    /// `None` while its options are broken (its outputs are unknown).
    fn output_names(&self) -> Option<Vec<String>> {
        let late = match self.configured.as_ref()? {
            Configured::Source(_) => false,
            Configured::Transform(_, properties) => properties.late_output,
            Configured::Sink(_) => return Some(Vec::new()),
        };
        let id = &self.id;
        let mut names: Vec<String> = if self.named.is_empty() {
            vec![id.clone()]
        } else {
            self.named.iter().map(|name| format!("{id}.{name}")).collect()
        };
        names.push(format!("{id}.errors"));
        if late {
            names.push(format!("{id}.late"));
        }
        Some(names)
    }
}

/// `a`, `b` and `c`, each in backquotes.
fn quoted_list(names: &[String]) -> String {
    let quoted: Vec<String> = names.iter().map(|name| format!("`{name}`")).collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => quoted.concat(),
    }
}

struct Validator<'r> {
    reporter: Reporter,
    registry: &'r Registry,
    entries: Vec<Entry>,
    /// The `[[tests]]` array, checked after the graph.
    tests: Option<Spanned<DeValue<'static>>>,
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl Validator<'_> {
    fn config_error(&mut self, options: &ConfigValue, fallback: Range<usize>, error: ConfigError) {
        let span = error
            .span
            .clone()
            .or_else(|| error.field.as_deref().and_then(|field| options.span_of(field)))
            .unwrap_or(fallback);
        let mut hint = error.hint.clone();
        if hint.is_none() {
            hint = unknown_field_hint(&error.message);
        }
        self.reporter.error(Some(span), error.message, hint);
    }

    /// Stage 3: top-level tables, ids, `type` and `inputs`.
    fn structure(&mut self, root: &DeTable<'static>) -> PipelineSettings {
        let mut settings = PipelineSettings::default();
        let mut seen_ids: HashMap<String, Class> = HashMap::new();
        for (key, value) in root.iter() {
            let class = match key.get_ref().as_ref() {
                "pipeline" => {
                    let options = ConfigValue::new(value.clone());
                    match options.deserialize::<PipelineSettings>() {
                        Ok(parsed) => {
                            if parsed.workers == 0 {
                                self.config_error(
                                    &options,
                                    key.span(),
                                    ConfigError::at_field(
                                        "workers",
                                        "`workers` must be at least 1",
                                    ),
                                );
                            }
                            if !parsed.http_address.is_empty()
                                && parsed.http_address.parse::<std::net::SocketAddr>().is_err()
                            {
                                self.config_error(
                                    &options,
                                    key.span(),
                                    ConfigError::at_field(
                                        "http_address",
                                        format!(
                                            "`{}` is not an address like 127.0.0.1:9898",
                                            parsed.http_address
                                        ),
                                    )
                                    .with_hint("write ip:port, or \"\" to disable the endpoint"),
                                );
                            }
                            settings = parsed;
                        }
                        Err(error) => self.config_error(&options, key.span(), error),
                    }
                    continue;
                }
                "tests" => {
                    self.tests = Some(value.clone());
                    continue;
                }
                "sources" => Class::Source,
                "transforms" => Class::Transform,
                "sinks" => Class::Sink,
                other => {
                    let hint = did_you_mean(other, ["pipeline", "sources", "transforms", "sinks", "tests"])
                        .or_else(|| Some("the top-level tables are [pipeline], [sources.<id>], [transforms.<id>], [sinks.<id>] and [[tests]]".into()));
                    self.reporter.error(
                        Some(key.span()),
                        format!("unknown top-level table `{other}`"),
                        hint,
                    );
                    continue;
                }
            };
            let Some(components) = value.get_ref().as_table() else {
                self.reporter.error(
                    Some(key.span()),
                    format!("`{}` must be a table of components", class.table()),
                    Some(format!("write [{}.<id>] sections", class.table())),
                );
                continue;
            };
            for (id_key, component) in components.iter() {
                let id = id_key.get_ref().to_string();
                if !valid_id(&id) {
                    self.reporter.error(
                        Some(id_key.span()),
                        format!("invalid component id `{id}`"),
                        Some("ids use letters, digits, `_` and `-` (no dots: `<id>.errors`, `<id>.late` and `<id>.<name>` name outputs)".into()),
                    );
                    continue;
                }
                if let Some(other) = seen_ids.insert(id.clone(), class) {
                    self.reporter.error(
                        Some(id_key.span()),
                        format!("duplicate component id `{id}` (already a {})", other.name()),
                        Some(
                            "component ids must be unique across sources, transforms and sinks"
                                .into(),
                        ),
                    );
                    continue;
                }
                if let Some(entry) = self.entry(class, id, id_key.span(), component) {
                    self.entries.push(entry);
                }
            }
        }
        settings
    }

    fn entry(
        &mut self,
        class: Class,
        id: String,
        id_span: Range<usize>,
        component: &Spanned<DeValue<'static>>,
    ) -> Option<Entry> {
        let Some(table) = component.get_ref().as_table() else {
            self.reporter.error(
                Some(id_span),
                format!("{} `{id}` must be a table", class.name()),
                Some(format!("write [{}.{id}] with a `type` key", class.table())),
            );
            return None;
        };
        let mut options = DeTable::new();
        let mut type_name: Option<(String, Range<usize>)> = None;
        let mut inputs: Option<(Vec<Located>, Range<usize>)> = None;
        let mut ok = true;
        for (key, value) in table.iter() {
            match key.get_ref().as_ref() {
                "type" => match value.get_ref().as_str() {
                    Some(name) => type_name = Some((name.to_owned(), value.span())),
                    None => {
                        self.reporter.error(Some(value.span()), "`type` must be a string", None);
                        ok = false;
                    }
                },
                "inputs" => {
                    if class == Class::Source {
                        self.reporter.error(
                            Some(key.span()),
                            format!("source `{id}` cannot have `inputs`"),
                            Some("sources read from the outside world; move this component to [transforms] or [sinks]".into()),
                        );
                        ok = false;
                        continue;
                    }
                    match value.get_ref().as_array() {
                        Some(array) => {
                            let mut list = Vec::new();
                            for item in array.iter() {
                                match item.get_ref().as_str() {
                                    Some(name) => list.push((name.to_owned(), item.span())),
                                    None => {
                                        self.reporter.error(Some(item.span()), "every input must be a string (a component id, `<id>.errors`, `<id>.late` or `<id>.<output>`)", None);
                                        ok = false;
                                    }
                                }
                            }
                            inputs = Some((list, value.span()));
                        }
                        None => {
                            self.reporter.error(
                                Some(value.span()),
                                "`inputs` must be an array of component ids",
                                Some(format!("inputs = [\"{}\"]", "<id>")),
                            );
                            ok = false;
                        }
                    }
                }
                _ => {
                    options.insert(key.clone(), value.clone());
                }
            }
        }
        let Some((type_name, type_span)) = type_name else {
            if ok {
                self.reporter.error(
                    Some(id_span),
                    format!("{} `{id}` has no `type`", class.name()),
                    Some(format!("one of: {}", self.registry.names(class).join(", "))),
                );
            }
            return None;
        };
        let (inputs, inputs_span) = match (class, inputs) {
            (Class::Source, _) => (Vec::new(), id_span.clone()),
            (_, Some((list, span))) if !list.is_empty() => (list, span),
            (_, Some((_, span))) => {
                self.reporter.error(
                    Some(span),
                    format!("{} `{id}` has an empty `inputs`", class.name()),
                    None,
                );
                return None;
            }
            (_, None) => {
                if ok {
                    self.reporter.error(
                        Some(id_span),
                        format!("{} `{id}` has no `inputs`", class.name()),
                        Some("add inputs = [\"<component id>\"]".into()),
                    );
                }
                return None;
            }
        };
        if !ok {
            return None;
        }
        let options = ConfigValue::new(Spanned::new(component.span(), DeValue::Table(options)));
        Some(Entry {
            id,
            id_span,
            class,
            type_name,
            type_span,
            inputs,
            inputs_span,
            options,
            configured: None,
            named: Vec::new(),
        })
    }

    /// Stage 4: each component's options, through its factory.
    fn configure(&mut self, ctx: &ValidateContext) {
        let mut entries = std::mem::take(&mut self.entries);
        for entry in &mut entries {
            let Some(factory) = self.registry.get(entry.class, &entry.type_name).cloned() else {
                let names = self.registry.names(entry.class);
                let mut hint = did_you_mean(&entry.type_name, names.iter().copied());
                if hint.is_none() {
                    for other in [Class::Source, Class::Transform, Class::Sink] {
                        if other != entry.class
                            && self.registry.get(other, &entry.type_name).is_some()
                        {
                            hint = Some(format!(
                                "`{}` is a {}: declare it under [{}.{}]",
                                entry.type_name,
                                other.name(),
                                other.table(),
                                entry.id
                            ));
                        }
                    }
                }
                let hint = hint.or_else(|| {
                    Some(format!("known {} types: {}", entry.class.name(), names.join(", ")))
                });
                self.reporter.error(
                    Some(entry.type_span.clone()),
                    format!("unknown {} type `{}`", entry.class.name(), entry.type_name),
                    hint,
                );
                continue;
            };
            let result = match factory {
                ComponentFactory::Source(factory) => {
                    factory.configure(&entry.options, ctx).map(Configured::Source)
                }
                ComponentFactory::Transform(factory) => {
                    factory.configure(&entry.options, ctx).map(|configured| {
                        let properties = configured.properties();
                        Configured::Transform(configured, properties)
                    })
                }
                ComponentFactory::Sink(factory) => {
                    factory.configure(&entry.options, ctx).map(Configured::Sink)
                }
            };
            match result {
                Ok(configured) => {
                    if let Configured::Transform(transform, _) = &configured {
                        entry.named = self.named_outputs(entry, transform.named_outputs());
                    }
                    entry.configured = Some(configured);
                }
                Err(error) => {
                    let options = entry.options.clone();
                    self.config_error(&options, entry.id_span.clone(), error);
                }
            }
        }
        self.entries = entries;
    }

    /// The named outputs a transform declares, checked: names like ids, not `errors` or
    /// `late`, each once (a bad name is the factory's fault, reported at the component).
    fn named_outputs(&mut self, entry: &Entry, declared: Vec<String>) -> Vec<Arc<str>> {
        let mut named: Vec<Arc<str>> = Vec::with_capacity(declared.len());
        for name in declared {
            let problem = if !valid_id(&name) {
                Some("is not letters, digits, `_` and `-`")
            } else if name == "errors" || name == "late" {
                Some("names a side output")
            } else if named.iter().any(|known| **known == *name) {
                Some("is declared twice")
            } else {
                None
            };
            match problem {
                Some(problem) => self.reporter.error(
                    Some(entry.id_span.clone()),
                    format!("`{}` declares an output named {name:?}, which {problem}", entry.id),
                    Some("choose another name".into()),
                ),
                None => named.push(Arc::from(name)),
            }
        }
        named
    }

    /// Stages 5 and 6: the graph, then warnings. Each step reports everything it finds; a
    /// component whose input type is unknown (its producer is broken) skips only the checks
    /// that need that type (its own options were checked in stage 4).
    fn graph(&mut self, ctx: &ValidateContext) -> Vec<Component> {
        let resolved = self.resolve_inputs();
        let components = match self.order(&resolved) {
            Some(order) => self.infer_types(&order, &resolved, ctx),
            None => Vec::new(),
        };
        self.unused_outputs(&resolved);
        self.endpoints();
        components
    }

    /// Every input resolved to its producer: unknown ports, dangling inputs, sinks read from,
    /// components reading themselves.
    fn resolve_inputs(&mut self) -> Vec<Vec<Resolved>> {
        let ids: BTreeMap<String, usize> = self
            .entries
            .iter()
            .enumerate()
            .map(|(index, entry)| (entry.id.clone(), index))
            .collect();
        let mut resolved: Vec<Vec<Resolved>> = Vec::new();
        for entry in &self.entries {
            let mut list = Vec::new();
            for (name, span) in &entry.inputs {
                let (component, suffix) = match name.split_once('.') {
                    Some((component, suffix)) => (component, Some(suffix)),
                    None => (name.as_str(), None),
                };
                let Some(&producer) = ids.get(component) else {
                    self.reporter.error(
                        Some(span.clone()),
                        format!(
                            "dangling input: {} `{}` reads `{name}`, which is not a component",
                            entry.class.name(),
                            entry.id
                        ),
                        did_you_mean(component, ids.keys().map(String::as_str)).or_else(|| {
                            Some(format!(
                                "declared components: {}",
                                ids.keys().cloned().collect::<Vec<_>>().join(", ")
                            ))
                        }),
                    );
                    continue;
                };
                let source = &self.entries[producer];
                if source.class == Class::Sink {
                    self.reporter.error(
                        Some(span.clone()),
                        format!("`{component}` is a sink and has no output to read"),
                        None,
                    );
                    continue;
                }
                if producer == ids[&entry.id] {
                    self.reporter.error(
                        Some(span.clone()),
                        format!("`{}` reads its own output", entry.id),
                        None,
                    );
                    continue;
                }
                let port = match suffix {
                    None if !source.named.is_empty() => {
                        let names = source.output_names().unwrap_or_default();
                        self.reporter.error(
                            Some(span.clone()),
                            format!(
                                "`{component}` has no main output: its records go to its named outputs"
                            ),
                            Some(format!("read one of {}", quoted_list(&names))),
                        );
                        continue;
                    }
                    None => Port::Main,
                    Some("errors") => Port::Errors,
                    Some("late") => Port::Late,
                    Some(other) if source.named.iter().any(|known| **known == *other) => {
                        Port::Named(Arc::from(other))
                    }
                    // Its options are broken (reported): its outputs are unknown, and so is
                    // this input's type.
                    Some(other) if source.configured.is_none() => Port::Named(Arc::from(other)),
                    Some(other) => {
                        let names = source.output_names().unwrap_or_default();
                        let ports = names.iter().filter_map(|name| name.split_once('.'));
                        let close = closest(other, ports.map(|(_, port)| port))
                            .map(|port| format!("did you mean `{component}.{port}`?"));
                        let outputs =
                            format!("the outputs of `{component}` are {}", quoted_list(&names));
                        self.reporter.error(
                            Some(span.clone()),
                            format!("unknown output `{component}.{other}`: `{component}` has no output `{other}`"),
                            Some(match close {
                                Some(close) => format!("{close} {outputs}"),
                                None => outputs,
                            }),
                        );
                        continue;
                    }
                };
                list.push(Resolved {
                    input: InputRef { component: component.to_owned(), port },
                    span: span.clone(),
                    producer,
                });
            }
            resolved.push(list);
        }
        resolved
    }

    /// Producers before consumers (Kahn's algorithm over the resolved edges); `None` after
    /// reporting every member of every cycle.
    fn order(&mut self, resolved: &[Vec<Resolved>]) -> Option<Vec<usize>> {
        let count = self.entries.len();
        let mut indegree = vec![0usize; count];
        let mut consumers: Vec<Vec<usize>> = vec![Vec::new(); count];
        for (consumer, inputs) in resolved.iter().enumerate() {
            let producers: BTreeSet<usize> = inputs.iter().map(|edge| edge.producer).collect();
            for producer in producers {
                indegree[consumer] += 1;
                consumers[producer].push(consumer);
            }
        }
        let mut ready: Vec<usize> = (0..count).filter(|index| indegree[*index] == 0).collect();
        ready.sort_by_key(|index| std::cmp::Reverse(self.entries[*index].class));
        let mut order = Vec::with_capacity(count);
        while let Some(next) = ready.pop() {
            order.push(next);
            for consumer in consumers[next].clone() {
                indegree[consumer] -= 1;
                if indegree[consumer] == 0 {
                    ready.push(consumer);
                }
            }
        }
        if order.len() == count {
            return Some(order);
        }
        // What is left leads into a cycle; keep only the members by also peeling off,
        // repeatedly, the components none of the rest reads.
        let mut left: BTreeSet<usize> = (0..count).filter(|index| indegree[*index] > 0).collect();
        loop {
            let leaves: Vec<usize> = left
                .iter()
                .copied()
                .filter(|index| !consumers[*index].iter().any(|consumer| left.contains(consumer)))
                .collect();
            if leaves.is_empty() {
                break;
            }
            for leaf in leaves {
                left.remove(&leaf);
            }
        }
        let in_cycle: Vec<usize> = left.into_iter().collect();
        let names: Vec<&str> =
            in_cycle.iter().map(|index| self.entries[*index].id.as_str()).collect();
        for index in &in_cycle {
            let entry = &self.entries[*index];
            self.reporter.error(
                Some(entry.inputs_span.clone()),
                format!("cycle: `{}` is part of a loop through {}", entry.id, names.join(" -> ")),
                Some("pipelines are acyclic; remove one of these inputs".into()),
            );
        }
        None
    }

    /// The record types of every port, in order: input types, kind checks, output types. A
    /// component whose inputs are not all known (a broken producer) is left out, and so are its
    /// consumers; every other component is checked.
    fn infer_types(
        &mut self,
        order: &[usize],
        resolved: &[Vec<Resolved>],
        ctx: &ValidateContext,
    ) -> Vec<Component> {
        let mut outputs: HashMap<usize, (PortType, Option<PortType>)> = HashMap::new();
        let mut components = Vec::new();
        for &index in order {
            let Some(configured) = self.entries[index].configured.clone() else { continue };
            let (input_types, mut inputs_ok) = self.input_types(&resolved[index], &outputs);
            inputs_ok &= self.check_kinds(index, &configured, &input_types);
            if !inputs_ok {
                continue;
            }
            let Some((output, late)) = self.output_type(index, &configured, &input_types, ctx)
            else {
                continue;
            };
            if let Some(output) = &output {
                outputs.insert(index, (output.clone(), late.clone()));
            }
            let entry = &self.entries[index];
            components.push(Component {
                id: entry.id.clone(),
                class: entry.class,
                type_name: entry.type_name.clone(),
                inputs: resolved[index].iter().map(|edge| edge.input.clone()).collect(),
                configured,
                output,
                late,
                named_outputs: entry.named.clone(),
            });
        }
        components
    }

    /// The types of a component's inputs that are known, and whether all of them are.
    fn input_types<'e>(
        &mut self,
        edges: &'e [Resolved],
        outputs: &HashMap<usize, (PortType, Option<PortType>)>,
    ) -> (Vec<(PortType, &'e Resolved)>, bool) {
        let mut types = Vec::new();
        let mut all_known = true;
        for edge in edges {
            let Some((main, late)) = outputs.get(&edge.producer) else {
                all_known = false;
                continue;
            };
            let port_type = match &edge.input.port {
                Port::Main | Port::Named(_) => main.clone(),
                Port::Errors => PortType::of(Kind::Errors),
                Port::Late => match late {
                    Some(late) => late.clone(),
                    None => {
                        self.reporter.error(
                            Some(edge.span.clone()),
                            format!("`{}` has no `.late` output", edge.input.component),
                            Some("only event-time windows produce late readings".into()),
                        );
                        all_known = false;
                        continue;
                    }
                },
            };
            types.push((port_type, edge));
        }
        (types, all_known)
    }

    /// Whether the component accepts the kinds of its known inputs (and a transform reads one
    /// kind only); reports every mismatch.
    fn check_kinds(
        &mut self,
        index: usize,
        configured: &Configured,
        input_types: &[(PortType, &Resolved)],
    ) -> bool {
        let entry = &self.entries[index];
        let accepts: Vec<Kind> = match configured {
            Configured::Source(_) => Vec::new(),
            Configured::Transform(transform, _) => transform.accepts(),
            Configured::Sink(sink) => sink.accepts(),
        };
        let accepted = accepts.iter().map(|kind| kind.name()).collect::<Vec<_>>();
        let mut ok = true;
        for (port_type, edge) in input_types {
            if accepts.contains(&port_type.kind) {
                continue;
            }
            let hint = match (port_type.kind, accepts.first()) {
                (Kind::Raw, Some(Kind::Readings)) => {
                    Some("insert a `normalize` transform between them".to_owned())
                }
                (Kind::Readings, Some(Kind::Windows)) => {
                    Some("insert a `window` transform between them".to_owned())
                }
                (Kind::Catalog, _) => Some(
                    "a catalog's updates are read by `enrich` and `fleet` (or a sink)".to_owned(),
                ),
                _ => None,
            }
            .or_else(|| Some(format!("`{}` accepts {}", entry.type_name, accepted.join(", "))));
            self.reporter.error(
                Some(edge.span.clone()),
                format!(
                    "record-kind mismatch: `{}` ({}) accepts {} but `{}` emits {}",
                    entry.id,
                    entry.type_name,
                    accepted.join(" or "),
                    edge.input,
                    port_type.kind
                ),
                hint,
            );
            ok = false;
        }
        if let Configured::Transform(_, properties) = configured {
            let mut kinds: BTreeSet<Kind> =
                input_types.iter().map(|(port_type, _)| port_type.kind).collect();
            if properties.catalog_side_input {
                kinds.remove(&Kind::Catalog);
            }
            if kinds.len() > 1 {
                self.reporter.error(
                    Some(entry.inputs_span.clone()),
                    format!(
                        "`{}` mixes inputs of different kinds ({})",
                        entry.id,
                        kinds.iter().map(|kind| kind.name()).collect::<Vec<_>>().join(", ")
                    ),
                    Some("a transform reads one kind of records; split it in two".into()),
                );
                ok = false;
            }
        }
        ok
    }

    /// A component's main and late output types; `None` (reported) when the transform rejects
    /// its input.
    fn output_type(
        &mut self,
        index: usize,
        configured: &Configured,
        input_types: &[(PortType, &Resolved)],
        ctx: &ValidateContext,
    ) -> Option<(Option<PortType>, Option<PortType>)> {
        match configured {
            Configured::Source(source) => Some((Some(source.output_type().clone()), None)),
            Configured::Transform(transform, properties) => {
                // Catalog side inputs do not shape the output.
                let side = |port_type: &PortType| {
                    properties.catalog_side_input
                        && port_type.kind == Kind::Catalog
                        && input_types.iter().any(|(other, _)| other.kind != Kind::Catalog)
                };
                let input_types: Vec<&(PortType, &Resolved)> =
                    input_types.iter().filter(|(port_type, _)| !side(port_type)).collect();
                let schemas: BTreeSet<Option<Vec<Arc<str>>>> = input_types
                    .iter()
                    .map(|(port_type, _)| {
                        port_type.schema.as_ref().map(|schema| schema.names().to_vec())
                    })
                    .collect();
                let input = match (input_types.first(), schemas.len()) {
                    (Some((first, _)), 1) => first.clone(),
                    (Some((first, _)), _) => PortType::of(first.kind),
                    (None, _) => return None,
                };
                match transform.output_type(&input, ctx) {
                    Ok(output) => {
                        let late = properties.late_output.then(|| input.clone());
                        Some((Some(output), late))
                    }
                    Err(error) => {
                        let options = self.entries[index].options.clone();
                        let span = self.entries[index].id_span.clone();
                        self.config_error(&options, span, error);
                        None
                    }
                }
            }
            Configured::Sink(_) => Some((None, None)),
        }
    }

    /// Warnings: components whose output nobody reads, and named outputs nobody reads.
    fn unused_outputs(&mut self, resolved: &[Vec<Resolved>]) {
        let read: BTreeSet<&str> =
            resolved.iter().flatten().map(|edge| edge.input.component.as_str()).collect();
        for entry in &self.entries {
            if entry.class != Class::Sink && !read.contains(entry.id.as_str()) {
                self.reporter.warning(
                    Some(entry.id_span.clone()),
                    format!(
                        "unused component: nothing reads the output of {} `{}`",
                        entry.class.name(),
                        entry.id
                    ),
                    Some(format!(
                        "add \"{}\" to the inputs of a transform or sink, or remove it",
                        entry.id
                    )),
                );
                continue;
            }
            // A named output nobody reads drops its records (a route taken by no consumer).
            for name in &entry.named {
                let port = Port::Named(Arc::clone(name));
                let is_read = resolved
                    .iter()
                    .flatten()
                    .any(|edge| edge.input.component == entry.id && edge.input.port == port);
                if !is_read {
                    self.reporter.warning(
                        Some(entry.id_span.clone()),
                        format!(
                            "unused output: nothing reads `{}.{name}`, so its records are dropped",
                            entry.id
                        ),
                        Some(format!(
                            "add \"{}.{name}\" to the inputs of a transform or sink",
                            entry.id
                        )),
                    );
                }
            }
        }
    }

    /// A pipeline needs at least one source and one sink.
    fn endpoints(&mut self) {
        if !self.entries.iter().any(|entry| entry.class == Class::Sink) && !self.entries.is_empty()
        {
            self.reporter.error(
                Some(0..0),
                "the pipeline has no sink",
                Some("add a [sinks.<id>] section, e.g. type = \"stdout\"".into()),
            );
        }
        if self.entries.iter().all(|entry| entry.class != Class::Source) {
            self.reporter.error(
                Some(0..0),
                "the pipeline has no source",
                Some("add a [sources.<id>] section, e.g. type = \"simulator\"".into()),
            );
        }
    }
}

/// Turns serde's "unknown field `x`, expected one of `a`, `b`" into a "did you mean" hint.
fn unknown_field_hint(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (field, expected) = rest.split_once('`')?;
    let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    did_you_mean(field, candidates.iter().copied()).or_else(|| {
        (!candidates.is_empty()).then(|| format!("known options: {}", candidates.join(", ")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn load(text: &str) -> Result<Pipeline, ValidationErrors> {
        load_str(text, "p.toml", Path::new("."), &Registry::test_builtins(), |_| None)
    }

    /// Pieces of pipeline files, valid and not, glued at random.
    fn fragment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("[pipeline]\n".to_owned()),
            Just("workers = 2\n".to_owned()),
            Just("[sources.a]\ntype = \"simulator\"\n".to_owned()),
            Just("[sources.b]\ntype = \"file\"\npath = \"x.csv\"\n".to_owned()),
            Just("[transforms.n]\ntype = \"normalize\"\ninputs = [\"a\"]\ndevice_field = \"device\"\ntimestamp_field = \"ts\"\nfeatures = [\"vibration\"]\n".to_owned()),
            Just("[transforms.w]\ntype = \"window\"\ninputs = [\"n\", \"w.late\"]\nsize_ms = 10\n".to_owned()),
            Just("[transforms.s]\ntype = \"stats\"\ninputs = [\"w\", \"a.errors\"]\n".to_owned()),
            Just("[sinks.o]\ntype = \"stdout\"\ninputs = [\"s\", \"n.errors\", \"zz\"]\n".to_owned()),
            Just("inputs = 3\n".to_owned()),
            Just("type = [1, 2]\n".to_owned()),
            Just("x = \"${UNSET}\" ${ \n".to_owned()),
            Just("[sinks]\n".to_owned()),
            Just("[[sources]]\n".to_owned()),
            "[a-z.\\[\\]=\"{}$ \n0-9]{0,40}",
        ]
    }

    proptest! {
        #[test]
        fn the_loader_never_panics_on_arbitrary_text(text in "\\PC{0,400}") {
            let _ = load(&text);
        }

        #[test]
        fn the_loader_never_panics_on_arbitrary_pipelines(fragments in proptest::collection::vec(fragment(), 0..12)) {
            let text = fragments.concat();
            match load(&text) {
                Ok(pipeline) => prop_assert!(!pipeline.components.is_empty()),
                Err(errors) => {
                    prop_assert!(errors.errors().count() > 0);
                    for diagnostic in &errors.diagnostics {
                        prop_assert!(diagnostic.line >= 1 && diagnostic.line <= text.lines().count().max(1) + 1);
                        prop_assert!(diagnostic.column >= 1);
                    }
                }
            }
        }
    }

    #[test]
    fn a_named_output_nobody_reads_is_a_warning() {
        let pipeline = load(
            "[sources.a]\ntype = \"simulator\"\n\
             [transforms.n]\ntype = \"normalize\"\ninputs = [\"a\"]\ndevice = \"d\"\ntimestamp_field = \"ts\"\nfeatures = [\"x\"]\n\
             [transforms.r]\ntype = \"route\"\ninputs = [\"n\"]\notherwise = \"rest\"\n\
             routes = [{ name = \"big\", when = { field = \"x\", op = \"gt\", value = 1.0 } }]\n\
             [sinks.o]\ntype = \"blackhole\"\ninputs = [\"r.big\"]\n",
        )
        .expect("valid");
        let warnings: Vec<String> =
            pipeline.warnings.iter().map(|warning| warning.message.clone()).collect();
        assert_eq!(
            warnings,
            ["unused output: nothing reads `r.rest`, so its records are dropped"],
            "{warnings:?}"
        );
        assert_eq!((pipeline.warnings[0].line, pipeline.warnings[0].column), (9, 13));
    }

    #[test]
    fn a_minimal_pipeline_is_ordered_producers_first() {
        let pipeline = load(
            "[sinks.o]\ntype = \"blackhole\"\ninputs = [\"w\"]\n[transforms.w]\ntype = \"window\"\ninputs = [\"n\"]\nsize_ms = 10\n\
             [transforms.n]\ntype = \"normalize\"\ninputs = [\"a\"]\ndevice = \"d\"\ntimestamp_field = \"ts\"\nfeatures = [\"x\"]\n\
             [sources.a]\ntype = \"simulator\"\n",
        )
        .expect("valid");
        let order: Vec<&str> =
            pipeline.components.iter().map(|component| component.id.as_str()).collect();
        assert_eq!(order, ["a", "n", "w", "o"]);
        let window = pipeline.component("w").expect("w");
        assert_eq!(window.output.as_ref().map(|port| port.kind), Some(Kind::Windows));
        assert_eq!(window.late.as_ref().map(|port| port.kind), Some(Kind::Readings));
    }
}
