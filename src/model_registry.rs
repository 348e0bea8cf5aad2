//! The `autoencoder` with a `registry` table (feature `s3`): the operators crate knows
//! models in folders, the connectors crate knows the model registry in the lake's store; this
//! factory, registered by [`builtins`](crate::builtins) in place of the plain one, joins them.
//!
//! At validation it copies the registry's active version into the `model` folder (so the
//! pipeline validates against the model it will run). While the pipeline runs, one follower
//! thread per process and component reads the active-version pointer every `interval_ms` and
//! copies a newly promoted version into the folder, `model.onnx` then `model.json`; the
//! autoencoder's `watch` sees `model.json` change and swaps the model between two batches.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use tidewatch_api::{
    ComponentContext, ComponentError, ConfigError, Kind, PortType, Transform, TransformFactory,
    TransformProperties, ValidateContext, resolve_path,
};
use tidewatch_connectors::lake::S3Config;
use tidewatch_connectors::lake::registry::ModelRegistry;
use tidewatch_operators::{AutoencoderConfig, AutoencoderFactory, RegistryFollow};

/// Makes `autoencoder` transforms that may follow a model registry (`registry` table).
#[derive(Clone, Copy, Debug, Default)]
pub struct AutoencoderWithRegistry;

/// Opens the registry a `registry` table names.
fn open(follow: &RegistryFollow, base: &Path) -> Result<ModelRegistry, String> {
    let s3: S3Config = match &follow.s3 {
        Some(value) => serde_json::from_value(value.clone())
            .map_err(|error| format!("registry.s3: {error}"))?,
        None => S3Config::default(),
    };
    ModelRegistry::open_in(&follow.url, &s3, base).map_err(|error| error.to_string())
}

/// The config without its `registry` table (what the plain factory takes), after copying the
/// active version into the model folder.
fn synced(config: &AutoencoderConfig, base: &Path) -> Result<AutoencoderConfig, ConfigError> {
    let mut plain = config.clone();
    let Some(follow) = plain.registry.take() else { return Ok(plain) };
    if follow.interval_ms == 0 {
        return Err(ConfigError::at_field(
            "registry.interval_ms",
            "registry.interval_ms must be at least 1",
        ));
    }
    let registry = open(&follow, base).map_err(|error| ConfigError::at_field("registry", error))?;
    let dir = resolve_path(base, &config.model);
    match registry.sync_active(&follow.name, &dir) {
        Ok(_) if dir.join("model.json").is_file() => Ok(plain),
        Ok(_) => Err(ConfigError::at_field(
            "registry",
            format!("model `{}` has no active version in {}", follow.name, follow.url),
        )
        .with_hint("publish one: tidewatch model push, then tidewatch model promote")),
        Err(error) => Err(ConfigError::at_field(
            "registry",
            format!("cannot copy the active version of `{}`: {error}", follow.name),
        )),
    }
}

/// The follower thread of one component in one process; stops when the run drops it.
struct Follower {
    /// Dropping it wakes the thread and ends it.
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Follower {
    fn start(
        follow: RegistryFollow,
        registry: ModelRegistry,
        dir: PathBuf,
        component: String,
    ) -> Result<Follower, ComponentError> {
        let (stop, stopped) = mpsc::channel::<()>();
        let interval = Duration::from_millis(follow.interval_ms);
        let thread = std::thread::Builder::new()
            .name(format!("registry-{component}"))
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                    match registry.sync_active(&follow.name, &dir) {
                        Ok(Some(version)) => tracing::info!(
                            component = %component, model = %follow.name, %version,
                            "the registry's active version copied in"
                        ),
                        Ok(None) => {}
                        Err(error) => tracing::warn!(
                            component = %component, model = %follow.name, %error,
                            "cannot read the model registry; keeping the current model"
                        ),
                    }
                }
            })
            .map_err(|error| ComponentError::io("cannot start the registry follower", error))?;
        Ok(Follower { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl TransformFactory for AutoencoderWithRegistry {
    type Config = AutoencoderConfig;

    fn accepts(&self, config: &AutoencoderConfig) -> Vec<Kind> {
        AutoencoderFactory.accepts(config)
    }

    fn validate(
        &self,
        config: &AutoencoderConfig,
        ctx: &ValidateContext,
    ) -> Result<(), ConfigError> {
        AutoencoderFactory.validate(&synced(config, &ctx.pipeline.base_dir)?, ctx)
    }

    fn output_type(
        &self,
        config: &AutoencoderConfig,
        input: &PortType,
        ctx: &ValidateContext,
    ) -> Result<PortType, ConfigError> {
        let mut plain = config.clone();
        plain.registry = None;
        AutoencoderFactory.output_type(&plain, input, ctx)
    }

    fn properties(&self, config: &AutoencoderConfig) -> TransformProperties {
        AutoencoderFactory.properties(config)
    }

    fn build(
        &self,
        config: &AutoencoderConfig,
        ctx: &ComponentContext,
    ) -> Result<Box<dyn Transform>, ComponentError> {
        let mut plain = config.clone();
        if let Some(follow) = plain.registry.take() {
            let base = ctx.pipeline.base_dir.clone();
            let dir = resolve_path(&base, &config.model);
            let component = ctx.component_id.to_string();
            // One follower per process and component, whatever the number of workers.
            ctx.shared(|| {
                let registry = open(&follow, &base).map_err(ComponentError::External)?;
                Follower::start(follow.clone(), registry, dir, component)
            })?;
        }
        AutoencoderFactory.build(&plain, ctx)
    }
}
