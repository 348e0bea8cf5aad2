//! Factories: how a component type turns its TOML options into running instances.
//!
//! Each component type implements one typed trait ([`SourceFactory`], [`TransformFactory`] or
//! [`SinkFactory`]) with its own `Config` struct (serde, `deny_unknown_fields`). The registry
//! stores the erased form ([`DynSourceFactory`] ...), which takes a [`ConfigValue`] (the
//! component's TOML table with its source positions) so that every option error points at a
//! line and column of the pipeline file.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::component::{ComponentContext, PipelineInfo, Sink, Source, Transform};
use crate::error::ComponentError;
use crate::records::{Kind, Schema};

/// The type of a port: the kind of records, and for readings/windows/scores the feature
/// names when the validator can know them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortType {
    /// The kind of records.
    pub kind: Kind,
    /// The feature names, when known at validation time.
    pub schema: Option<Arc<Schema>>,
}

impl PortType {
    /// A port of `kind` with no known schema.
    pub fn of(kind: Kind) -> PortType {
        PortType { kind, schema: None }
    }

    /// A port of `kind` with known feature names.
    pub fn with_schema(kind: Kind, schema: Arc<Schema>) -> PortType {
        PortType { kind, schema: Some(schema) }
    }
}

/// An option error: a message, where it is (a byte span in the file, or an option name that
/// the engine locates), and a hint.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ConfigError {
    /// What is wrong.
    pub message: String,
    /// Byte span in the pipeline file, when known.
    pub span: Option<Range<usize>>,
    /// The option the error is about, when the span is not known.
    pub field: Option<String>,
    /// How to fix it.
    pub hint: Option<String>,
}

impl ConfigError {
    /// An error about the component as a whole.
    pub fn new(message: impl Into<String>) -> ConfigError {
        ConfigError { message: message.into(), span: None, field: None, hint: None }
    }

    /// An error about option `field`.
    pub fn at_field(field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            message: message.into(),
            span: None,
            field: Some(field.to_owned()),
            hint: None,
        }
    }

    /// Adds a hint.
    pub fn with_hint(mut self, hint: impl Into<String>) -> ConfigError {
        self.hint = Some(hint.into());
        self
    }
}

/// A component's options as written in the pipeline file (without `type` and `inputs`), with
/// the byte spans of every key and value.
#[derive(Clone, Debug)]
pub struct ConfigValue {
    value: Spanned<DeValue<'static>>,
}

impl ConfigValue {
    /// Wraps a parsed TOML value.
    pub fn new(value: Spanned<DeValue<'static>>) -> ConfigValue {
        ConfigValue { value }
    }

    /// Parses a TOML table given as text (tests, embedders building pipelines in code). Spans
    /// then refer to `text`. The text is kept for the life of the process.
    pub fn parse(text: &str) -> Result<ConfigValue, ConfigError> {
        let text: &'static str = Box::leak(text.to_owned().into_boxed_str());
        let table = toml::de::DeTable::parse(text).map_err(|error| ConfigError {
            message: error.message().to_owned(),
            span: error.span(),
            field: None,
            hint: None,
        })?;
        let span = table.span();
        Ok(ConfigValue { value: Spanned::new(span, DeValue::Table(table.into_inner())) })
    }

    /// Deserializes the options into a typed config.
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        let deserializer = toml::de::ValueDeserializer::from(self.value.clone());
        T::deserialize(deserializer).map_err(|error| {
            let message = error.message().to_owned();
            // A config with a flattened group (`#[serde(flatten)]`) reports an unknown option
            // without its place: point at the option's key, not at the table.
            let unknown = message
                .strip_prefix("unknown field `")
                .and_then(|rest| rest.split_once('`'))
                .and_then(|(name, _)| self.span_of(name));
            let span = match (error.span(), unknown) {
                (Some(span), Some(key)) if span == self.span() => Some(key),
                (None, Some(key)) => Some(key),
                (span, _) => span,
            };
            ConfigError { message, span, field: None, hint: None }
        })
    }

    /// The byte span of option `field`'s key, if present; `field` may be a dotted path into
    /// nested tables (`tls.ca_file`).
    pub fn span_of(&self, field: &str) -> Option<Range<usize>> {
        let mut table = self.value.get_ref().as_table()?;
        let mut parts = field.split('.').peekable();
        while let Some(part) = parts.next() {
            let (key, value) = table.get_key_value(part)?;
            if parts.peek().is_none() {
                return Some(key.span());
            }
            table = value.get_ref().as_table()?;
        }
        None
    }

    /// Moves the options of `moved` written at the top level (their old place) into their
    /// table, keeping their spans, so that the typed config sees them where they belong now;
    /// returns the moved config and a warning for each option moved. An option written in both
    /// places is an error.
    pub fn with_moved(
        &self,
        moved: &[MovedOption],
    ) -> Result<(ConfigValue, Vec<String>), ConfigError> {
        let mut value = self.value.clone();
        let mut warnings = Vec::new();
        let DeValue::Table(table) = value.get_mut() else { return Ok((self.clone(), warnings)) };
        for option in moved {
            let Some((key, old)) = table.remove_entry(option.key) else { continue };
            let key_span = key.span();
            let nested = match table.get_mut(option.table).map(Spanned::get_mut) {
                Some(DeValue::Table(nested)) => nested,
                Some(_) => {
                    return Err(ConfigError {
                        message: format!("`{}` must be a table", option.table),
                        span: self.span_of(option.table),
                        field: None,
                        hint: None,
                    });
                }
                None => {
                    let name = Spanned::new(key_span.clone(), Cow::Borrowed(option.table));
                    let empty = Spanned::new(key_span.clone(), DeValue::Table(DeTable::new()));
                    table.insert(name, empty);
                    match table.get_mut(option.table).map(Spanned::get_mut) {
                        Some(DeValue::Table(nested)) => nested,
                        _ => continue,
                    }
                }
            };
            if nested.contains_key(option.key) {
                return Err(ConfigError {
                    message: format!(
                        "`{}` is set twice: at the top level and in the `{}` table",
                        option.key, option.table
                    ),
                    span: Some(key_span),
                    field: None,
                    hint: Some(format!("keep the one in the `{}` table", option.table)),
                });
            }
            nested.insert(key, old);
            warnings.push(format!(
                "option `{key}` is deprecated at the top level of a component: write it in its \
                 `{table}` table ([<sources|sinks>.<id>.{table}] {key} = ...); the old form \
                 goes away in the next release",
                key = option.key,
                table = option.table,
            ));
        }
        Ok((ConfigValue { value }, warnings))
    }

    /// [`ConfigValue::with_moved`], logging its warnings, then [`ConfigValue::deserialize`];
    /// an error about a field gets the span of the field.
    fn deserialize_moved<T: DeserializeOwned>(
        &self,
        moved: &[MovedOption],
    ) -> Result<(ConfigValue, T), ConfigError> {
        let (config, warnings) = self.with_moved(moved)?;
        for warning in warnings {
            tracing::warn!("{warning}");
        }
        let typed = config.deserialize()?;
        Ok((config, typed))
    }

    /// Gives `error` the span of its field in this config, when it has none.
    fn locate(&self, mut error: ConfigError) -> ConfigError {
        if error.span.is_none() {
            error.span = error.field.as_deref().and_then(|field| self.span_of(field));
        }
        error
    }

    /// The byte span of the whole table.
    pub fn span(&self) -> Range<usize> {
        self.value.span()
    }
}

/// An option that moved from the top level of a component into a nested table (`ca_file`
/// into `tls`): still accepted in its old place for one release, with a warning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MovedOption {
    /// The option's name, the same in both places.
    pub key: &'static str,
    /// The table it belongs to now.
    pub table: &'static str,
}

/// What a factory may consult while validating: pipeline settings.
#[derive(Clone, Debug, Default)]
pub struct ValidateContext {
    /// Pipeline-wide settings.
    pub pipeline: Arc<PipelineInfo>,
}

/// Properties of a transform that shape the dataflow around it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransformProperties {
    /// Its state is per device: the engine routes records so that each device's records reach
    /// the worker that owns the device.
    pub keyed: bool,
    /// It turns raw messages into timestamped records and so assigns event time: the engine
    /// holds the watermark (greatest event time seen minus the out-of-orderness) at its output.
    pub assigns_event_time: bool,
    /// It has a `<id>.late` output (readings).
    pub late_output: bool,
    /// Its state spans the whole fleet (`fleet`'s top-N): the engine sends all its input to
    /// the first worker of the cluster, so that one instance sees every record; the others
    /// receive nothing. Takes precedence over `keyed`.
    pub gathered: bool,
    /// Besides its records it reads the updates of a `catalog` source on its inputs
    /// (`enrich`, `fleet`): validation lets catalog inputs stand beside inputs of one other
    /// kind, and the output type follows that other kind.
    pub catalog_side_input: bool,
    /// It decodes raw messages and keeps no state per device or per message order
    /// (`normalize` without `hold_last`): when its inputs are sources that read on one worker
    /// only ([`SourceFactory::reads_on_one_worker`]), the engine spreads their raw batches
    /// over the workers of the process, round robin, so that the decoding runs in parallel.
    pub spreadable: bool,
}

// ---------------------------------------------------------------------------------------------
// Typed factories
// ---------------------------------------------------------------------------------------------

/// Makes sources of one type from a typed config.
pub trait SourceFactory: Send + Sync + 'static {
    /// The options, deserialized from TOML (use `#[serde(deny_unknown_fields)]`).
    type Config: DeserializeOwned + Send + Sync + 'static;
    /// Options that moved into a nested table and are still accepted at the top level.
    fn moved_options(&self) -> &'static [MovedOption] {
        &[]
    }
    /// Checks the options beyond their types and tells what the source emits.
    fn output_type(
        &self,
        config: &Self::Config,
        ctx: &ValidateContext,
    ) -> Result<PortType, ConfigError>;
    /// True when only one worker of the cluster reads and the source lets the engine spread
    /// what it reads over the process's workers for a
    /// [spreadable](TransformProperties::spreadable) consumer (the `file` source with
    /// `spread = true`). Default: false.
    fn reads_on_one_worker(&self, _config: &Self::Config) -> bool {
        false
    }
    /// Builds the instance for one worker.
    fn build(
        &self,
        config: &Self::Config,
        ctx: &ComponentContext,
    ) -> Result<Box<dyn Source>, ComponentError>;
}

/// Makes transforms of one type from a typed config.
pub trait TransformFactory: Send + Sync + 'static {
    /// The options, deserialized from TOML (use `#[serde(deny_unknown_fields)]`).
    type Config: DeserializeOwned + Send + Sync + 'static;
    /// The kinds of records the transform accepts.
    fn accepts(&self, config: &Self::Config) -> Vec<Kind>;
    /// Checks the options on their own, whatever the input. The engine runs it for every
    /// transform, also one whose input type is unknown (downstream of a broken component), so
    /// put here every check that does not need the input type; `output_type` then runs only on
    /// options that passed.
    fn validate(&self, _config: &Self::Config, _ctx: &ValidateContext) -> Result<(), ConfigError> {
        Ok(())
    }
    /// Checks the options against the input type and tells what the transform emits.
    fn output_type(
        &self,
        config: &Self::Config,
        input: &PortType,
        ctx: &ValidateContext,
    ) -> Result<PortType, ConfigError>;
    /// Shape of the dataflow around the transform.
    fn properties(&self, _config: &Self::Config) -> TransformProperties {
        TransformProperties::default()
    }
    /// The transform's named outputs, in order, as its options declare them (`route`: one per
    /// route). Consumers read them as `<id>.<name>`; the transform sends to the `i`-th with
    /// [`Outputs::emit_to(i, ..)`](crate::Outputs::emit_to). A transform with named outputs
    /// has no main output (`<id>`): its records go to the named ones, each of the type
    /// [`TransformFactory::output_type`] returns. Names are letters, digits, `_` and `-`, and
    /// neither `errors` nor `late`. Default: none.
    fn named_outputs(&self, _config: &Self::Config) -> Vec<String> {
        Vec::new()
    }
    /// Builds the instance for one worker.
    fn build(
        &self,
        config: &Self::Config,
        ctx: &ComponentContext,
    ) -> Result<Box<dyn Transform>, ComponentError>;
}

/// Makes sinks of one type from a typed config.
pub trait SinkFactory: Send + Sync + 'static {
    /// The options, deserialized from TOML (use `#[serde(deny_unknown_fields)]`).
    type Config: DeserializeOwned + Send + Sync + 'static;
    /// The kinds of records the sink accepts.
    fn accepts(&self, config: &Self::Config) -> Vec<Kind>;
    /// Options that moved into a nested table and are still accepted at the top level.
    fn moved_options(&self) -> &'static [MovedOption] {
        &[]
    }
    /// Checks the options beyond their types.
    fn validate(&self, _config: &Self::Config, _ctx: &ValidateContext) -> Result<(), ConfigError> {
        Ok(())
    }
    /// Builds the instance for one worker.
    fn build(
        &self,
        config: &Self::Config,
        ctx: &ComponentContext,
    ) -> Result<Box<dyn Sink>, ComponentError>;
}

// ---------------------------------------------------------------------------------------------
// Erased factories
// ---------------------------------------------------------------------------------------------

/// A source type with its options checked, ready to build instances.
pub trait ConfiguredSource: Send + Sync {
    /// What the source emits.
    fn output_type(&self) -> &PortType;
    /// Only one worker of the cluster reads (see [`SourceFactory::reads_on_one_worker`]).
    fn reads_on_one_worker(&self) -> bool {
        false
    }
    /// Builds the instance for one worker.
    fn build(&self, ctx: &ComponentContext) -> Result<Box<dyn Source>, ComponentError>;
}

/// A transform type with its options parsed, ready to build instances.
pub trait ConfiguredTransform: Send + Sync {
    /// The kinds of records the transform accepts.
    fn accepts(&self) -> Vec<Kind>;
    /// What the transform emits for this input.
    fn output_type(&self, input: &PortType, ctx: &ValidateContext)
    -> Result<PortType, ConfigError>;
    /// Shape of the dataflow around the transform.
    fn properties(&self) -> TransformProperties;
    /// Its named outputs (see [`TransformFactory::named_outputs`]); none by default.
    fn named_outputs(&self) -> Vec<String> {
        Vec::new()
    }
    /// Builds the instance for one worker.
    fn build(&self, ctx: &ComponentContext) -> Result<Box<dyn Transform>, ComponentError>;
}

/// A sink type with its options checked, ready to build instances.
pub trait ConfiguredSink: Send + Sync {
    /// The kinds of records the sink accepts.
    fn accepts(&self) -> Vec<Kind>;
    /// Builds the instance for one worker.
    fn build(&self, ctx: &ComponentContext) -> Result<Box<dyn Sink>, ComponentError>;
}

/// The erased form of a [`SourceFactory`], as the registry stores it.
pub trait DynSourceFactory: Send + Sync {
    /// Parses and checks the options.
    fn configure(
        &self,
        config: &ConfigValue,
        ctx: &ValidateContext,
    ) -> Result<Arc<dyn ConfiguredSource>, ConfigError>;
}

/// The erased form of a [`TransformFactory`], as the registry stores it.
pub trait DynTransformFactory: Send + Sync {
    /// Parses the options and runs the checks that do not need the input type
    /// ([`TransformFactory::validate`]).
    fn configure(
        &self,
        config: &ConfigValue,
        ctx: &ValidateContext,
    ) -> Result<Arc<dyn ConfiguredTransform>, ConfigError>;
}

/// The erased form of a [`SinkFactory`], as the registry stores it.
pub trait DynSinkFactory: Send + Sync {
    /// Parses and checks the options.
    fn configure(
        &self,
        config: &ConfigValue,
        ctx: &ValidateContext,
    ) -> Result<Arc<dyn ConfiguredSink>, ConfigError>;
}

struct SourceWithConfig<F: SourceFactory> {
    factory: Arc<F>,
    config: F::Config,
    output: PortType,
}

impl<F: SourceFactory> ConfiguredSource for SourceWithConfig<F> {
    fn output_type(&self) -> &PortType {
        &self.output
    }
    fn reads_on_one_worker(&self) -> bool {
        self.factory.reads_on_one_worker(&self.config)
    }
    fn build(&self, ctx: &ComponentContext) -> Result<Box<dyn Source>, ComponentError> {
        self.factory.build(&self.config, ctx)
    }
}

struct TransformWithConfig<F: TransformFactory> {
    factory: Arc<F>,
    config: F::Config,
}

impl<F: TransformFactory> ConfiguredTransform for TransformWithConfig<F> {
    fn accepts(&self) -> Vec<Kind> {
        self.factory.accepts(&self.config)
    }
    fn output_type(
        &self,
        input: &PortType,
        ctx: &ValidateContext,
    ) -> Result<PortType, ConfigError> {
        self.factory.output_type(&self.config, input, ctx)
    }
    fn properties(&self) -> TransformProperties {
        self.factory.properties(&self.config)
    }
    fn named_outputs(&self) -> Vec<String> {
        self.factory.named_outputs(&self.config)
    }
    fn build(&self, ctx: &ComponentContext) -> Result<Box<dyn Transform>, ComponentError> {
        self.factory.build(&self.config, ctx)
    }
}

struct SinkWithConfig<F: SinkFactory> {
    factory: Arc<F>,
    config: F::Config,
}

impl<F: SinkFactory> ConfiguredSink for SinkWithConfig<F> {
    fn accepts(&self) -> Vec<Kind> {
        self.factory.accepts(&self.config)
    }
    fn build(&self, ctx: &ComponentContext) -> Result<Box<dyn Sink>, ComponentError> {
        self.factory.build(&self.config, ctx)
    }
}

/// Erases a typed [`SourceFactory`].
#[derive(Debug)]
pub struct ErasedSource<F>(pub Arc<F>);
/// Erases a typed [`TransformFactory`].
#[derive(Debug)]
pub struct ErasedTransform<F>(pub Arc<F>);
/// Erases a typed [`SinkFactory`].
#[derive(Debug)]
pub struct ErasedSink<F>(pub Arc<F>);

impl<F: SourceFactory> DynSourceFactory for ErasedSource<F> {
    fn configure(
        &self,
        config: &ConfigValue,
        ctx: &ValidateContext,
    ) -> Result<Arc<dyn ConfiguredSource>, ConfigError> {
        let (config, typed) = config.deserialize_moved::<F::Config>(self.0.moved_options())?;
        let output = self.0.output_type(&typed, ctx).map_err(|error| config.locate(error))?;
        Ok(Arc::new(SourceWithConfig { factory: Arc::clone(&self.0), config: typed, output }))
    }
}

impl<F: TransformFactory> DynTransformFactory for ErasedTransform<F> {
    fn configure(
        &self,
        config: &ConfigValue,
        ctx: &ValidateContext,
    ) -> Result<Arc<dyn ConfiguredTransform>, ConfigError> {
        let typed: F::Config = config.deserialize()?;
        self.0.validate(&typed, ctx)?;
        Ok(Arc::new(TransformWithConfig { factory: Arc::clone(&self.0), config: typed }))
    }
}

impl<F: SinkFactory> DynSinkFactory for ErasedSink<F> {
    fn configure(
        &self,
        config: &ConfigValue,
        ctx: &ValidateContext,
    ) -> Result<Arc<dyn ConfiguredSink>, ConfigError> {
        let (config, typed) = config.deserialize_moved::<F::Config>(self.0.moved_options())?;
        self.0.validate(&typed, ctx).map_err(|error| config.locate(error))?;
        Ok(Arc::new(SinkWithConfig { factory: Arc::clone(&self.0), config: typed }))
    }
}

/// One factory of any class, as registered.
#[derive(Clone)]
pub enum ComponentFactory {
    /// A source type.
    Source(Arc<dyn DynSourceFactory>),
    /// A transform type.
    Transform(Arc<dyn DynTransformFactory>),
    /// A sink type.
    Sink(Arc<dyn DynSinkFactory>),
}

impl std::fmt::Debug for ComponentFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let class = match self {
            ComponentFactory::Source(_) => "source",
            ComponentFactory::Transform(_) => "transform",
            ComponentFactory::Sink(_) => "sink",
        };
        write!(f, "ComponentFactory::{class}")
    }
}

impl ComponentFactory {
    /// Wraps a typed source factory.
    pub fn source<F: SourceFactory>(factory: F) -> ComponentFactory {
        ComponentFactory::Source(Arc::new(ErasedSource(Arc::new(factory))))
    }
    /// Wraps a typed transform factory.
    pub fn transform<F: TransformFactory>(factory: F) -> ComponentFactory {
        ComponentFactory::Transform(Arc::new(ErasedTransform(Arc::new(factory))))
    }
    /// Wraps a typed sink factory.
    pub fn sink<F: SinkFactory>(factory: F) -> ComponentFactory {
        ComponentFactory::Sink(Arc::new(ErasedSink(Arc::new(factory))))
    }
    /// `source`, `transform` or `sink`.
    pub fn class(&self) -> &'static str {
        match self {
            ComponentFactory::Source(_) => "source",
            ComponentFactory::Transform(_) => "transform",
            ComponentFactory::Sink(_) => "sink",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOVED: &[MovedOption] = &[
        MovedOption { key: "ca_file", table: "tls" },
        MovedOption { key: "client_id", table: "connection" },
    ];

    #[test]
    fn moved_options_go_into_their_table_with_their_spans() {
        let text = "url = \"u\"\nca_file = \"ca\"\n[connection]\nkeep_alive_secs = 5\n";
        let config = ConfigValue::parse(text).expect("toml");
        let (moved, warnings) = config.with_moved(MOVED).expect("moved");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("option `ca_file` is deprecated"), "{warnings:?}");
        assert_eq!(moved.span_of("ca_file"), None);
        let span = moved.span_of("tls.ca_file").expect("moved into tls");
        assert_eq!(&text[span], "ca_file");
        assert_eq!(
            config.span_of("connection.keep_alive_secs").map(|s| &text[s]),
            Some("keep_alive_secs")
        );
        assert_eq!(config.span_of("connection.nope"), None);

        let twice = ConfigValue::parse("client_id = \"a\"\nconnection = { client_id = \"b\" }")
            .expect("toml");
        let error = twice.with_moved(MOVED).expect_err("set twice");
        assert_eq!(error.span, Some(0..9));
        let not_table = ConfigValue::parse("client_id = \"a\"\nconnection = 3").expect("toml");
        assert!(not_table.with_moved(MOVED).is_err());
    }
}
