//! Factories: how a component type turns its TOML options into running instances.
//!
//! Each component type implements one typed trait ([`SourceFactory`], [`TransformFactory`] or
//! [`SinkFactory`]) with its own `Config` struct (serde, `deny_unknown_fields`). The registry
//! stores the erased form ([`DynSourceFactory`] ...), which takes a [`ConfigValue`] (the
//! component's TOML table with its source positions) so that every option error points at a
//! line and column of the pipeline file.

use std::ops::Range;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::DeValue;

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
        T::deserialize(deserializer).map_err(|error| ConfigError {
            message: error.message().to_owned(),
            span: error.span(),
            field: None,
            hint: None,
        })
    }

    /// The byte span of option `field`'s key, if present.
    pub fn span_of(&self, field: &str) -> Option<Range<usize>> {
        let table = self.value.get_ref().as_table()?;
        table.iter().find(|(key, _)| key.get_ref() == field).map(|(key, _)| key.span())
    }

    /// The byte span of the whole table.
    pub fn span(&self) -> Range<usize> {
        self.value.span()
    }
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
}

// ---------------------------------------------------------------------------------------------
// Typed factories
// ---------------------------------------------------------------------------------------------

/// Makes sources of one type from a typed config.
pub trait SourceFactory: Send + Sync + 'static {
    /// The options, deserialized from TOML (use `#[serde(deny_unknown_fields)]`).
    type Config: DeserializeOwned + Send + Sync + 'static;
    /// Checks the options beyond their types and tells what the source emits.
    fn output_type(
        &self,
        config: &Self::Config,
        ctx: &ValidateContext,
    ) -> Result<PortType, ConfigError>;
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
        let typed: F::Config = config.deserialize()?;
        let output = self.0.output_type(&typed, ctx)?;
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
        let typed: F::Config = config.deserialize()?;
        self.0.validate(&typed, ctx)?;
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
