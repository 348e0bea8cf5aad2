//! `window`: readings to per-device event-time [`Window`](tidewatch_api::Window)s, tumbling or
//! sliding, by time (`size_ms`), by count (`size_readings`, see [`count`]), or sessions
//! (`gap_ms`, see [`session`]).
//!
//! Windows are aligned on the epoch: they start at every multiple of `slide_ms` (which defaults
//! to `size_ms`, for tumbling windows) and last `size_ms`, so a reading at time `t` belongs to
//! every window `[s, s + size_ms)` with `s` a multiple of `slide_ms` and `s <= t < s + size_ms`
//! (`ceil(size_ms / slide_ms)` windows, or one fewer when `size_ms` is not a multiple of
//! `slide_ms` and `t` falls in a gap of the sequence).
//!
//! A window `[s, e)` closes when the input watermark reaches `e` (`watermark >= e`): it is then
//! emitted with its steps sorted by time, unless it has fewer than `min_steps` readings. A
//! reading whose windows have all closed is late and goes to `<id>.late`; a reading of which
//! only some windows have closed joins the ones still open. "Closed" for a reading means
//! `e <= max(highest watermark seen, the producer's watermark when it sent the batch)`
//! ([`Outputs::batch_watermark`](tidewatch_api::Outputs::batch_watermark)), so lateness does not
//! depend on when the operator was scheduled.

//!
//! The folder: `config.rs` holds the options and their checks, [`time`] the tumbling and
//! sliding time windows, [`count`] the count windows, [`session`] the session windows, and this
//! module the factory that picks one and the few helpers they share. They share `config` and
//! never import each other.

mod config;
pub mod count;
pub mod session;
pub mod time;

use std::sync::Arc;

use tidewatch_api::{
    Batch, ComponentContext, ComponentError, ConfigError, Kind, Outputs, PortType, Reading,
    ReadingBatch, Schema, Transform, TransformFactory, TransformProperties, ValidateContext,
};

use config::MAX_ABS_TIME_MS;
pub use config::{MAX_WINDOW_SIZE_MS, MAX_WINDOWS_PER_READING, WindowConfig};
pub use count::CountWindowOperator;
pub use session::SessionWindowOperator;
pub use time::WindowOperator;

use crate::util::config_error;

// ---------------------------------------------------------------------------------------------
// Shared by the window kinds
// ---------------------------------------------------------------------------------------------

/// The index of `schema` in a snapshot's table of schemas, added when new.
fn schema_index(schemas: &mut Vec<Arc<Schema>>, schema: &Arc<Schema>) -> usize {
    match schemas.iter().position(|known| Arc::ptr_eq(known, schema) || known == schema) {
        Some(index) => index,
        None => {
            schemas.push(Arc::clone(schema));
            schemas.len() - 1
        }
    }
}

/// Hands a batch of readings to `add`; any other batch is an `unsupported_format` error.
fn readings_only(batch: Batch, out: &mut Outputs, add: impl FnOnce(&ReadingBatch, &mut Outputs)) {
    match batch {
        Batch::Readings(readings) => add(&readings, out),
        other => out.error(
            "unsupported_format",
            format!("window reads readings, got a batch of {}", other.kind()),
            None,
            None,
        ),
    }
}

/// True when a reading's time is within ±2⁶² ms; otherwise reports a `bad_timestamp` error.
fn time_in_range(reading: &Reading<'_>, out: &mut Outputs) -> bool {
    let time = reading.time_ms;
    if (-MAX_ABS_TIME_MS..=MAX_ABS_TIME_MS).contains(&time) {
        return true;
    }
    out.error(
        "bad_timestamp",
        format!("reading of device `{}` has event time {time} ms, out of range", reading.device),
        None,
        None,
    );
    false
}

// ---------------------------------------------------------------------------------------------
// Factory
// ---------------------------------------------------------------------------------------------

/// Factory of the `window` transform.
#[derive(Clone, Copy, Debug, Default)]
pub struct WindowFactory;

impl TransformFactory for WindowFactory {
    type Config = WindowConfig;

    fn accepts(&self, _config: &WindowConfig) -> Vec<Kind> {
        vec![Kind::Readings]
    }

    fn validate(&self, config: &WindowConfig, _ctx: &ValidateContext) -> Result<(), ConfigError> {
        if config.is_count() {
            config::count_geometry(config).map(|_| ())
        } else if config.is_session() {
            config::session_geometry(config).map(|_| ())
        } else {
            config::geometry(config).map(|_| ())
        }
    }

    fn output_type(
        &self,
        config: &WindowConfig,
        input: &PortType,
        ctx: &ValidateContext,
    ) -> Result<PortType, ConfigError> {
        if input.kind != Kind::Readings {
            return Err(ConfigError::new(format!(
                "`window` reads readings, but its input carries {}",
                input.kind
            ))
            .with_hint("put a `normalize` transform before `window`"));
        }
        self.validate(config, ctx)?;
        Ok(PortType { kind: Kind::Windows, schema: input.schema.clone() })
    }

    fn properties(&self, _config: &WindowConfig) -> TransformProperties {
        TransformProperties { keyed: true, late_output: true, ..TransformProperties::default() }
    }

    fn build(
        &self,
        config: &WindowConfig,
        ctx: &ComponentContext,
    ) -> Result<Box<dyn Transform>, ComponentError> {
        if config.is_count() {
            let operator = CountWindowOperator::new(config).map_err(config_error)?;
            return Ok(Box::new(operator));
        }
        if config.is_session() {
            let operator = SessionWindowOperator::new(config, ctx).map_err(config_error)?;
            return Ok(Box::new(operator));
        }
        let operator = WindowOperator::new(config, ctx).map_err(config_error)?;
        Ok(Box::new(operator))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tidewatch_api::{ConfigValue, Schema};

    use super::*;

    fn schema() -> Arc<Schema> {
        Arc::new(Schema::new(["a", "b"]))
    }

    #[test]
    fn config_validation() {
        let factory = WindowFactory;
        let ctx = ValidateContext::default();
        let input = PortType::with_schema(Kind::Readings, schema());
        let parse = |toml: &str| -> WindowConfig {
            ConfigValue::parse(toml).expect("toml").deserialize().expect("config")
        };
        let output = factory.output_type(&parse("size_ms = 1000"), &input, &ctx).expect("valid");
        assert_eq!(output, PortType::with_schema(Kind::Windows, schema()));
        assert_eq!(parse("size_ms = 1000"), WindowConfig::tumbling(1000));
        assert_eq!(
            parse("gap_ms = 500\nmax_size_ms = 9000"),
            WindowConfig::session(500, Some(9000))
        );
        let sessions = factory.output_type(&parse("gap_ms = 500"), &input, &ctx).expect("valid");
        assert_eq!(sessions, PortType::with_schema(Kind::Windows, schema()));
        for (toml, field) in [
            ("size_ms = 0", "size_ms"),
            ("size_ms = 10\nslide_ms = 0", "slide_ms"),
            ("size_ms = 10\nslide_ms = 11", "slide_ms"),
            ("size_ms = 100000000\nslide_ms = 1", "slide_ms"),
            ("size_ms = 10\nmin_steps = 0", "min_steps"),
            ("gap_ms = 0", "gap_ms"),
            ("gap_ms = 10\nmax_size_ms = 0", "max_size_ms"),
            ("gap_ms = 10\nsize_ms = 10", "gap_ms"),
            ("gap_ms = 10\nsize_readings = 3", "gap_ms"),
            ("size_ms = 10\nmax_size_ms = 10", "max_size_ms"),
            ("gap_ms = 10\nmin_steps = 0", "min_steps"),
        ] {
            let error = factory.output_type(&parse(toml), &input, &ctx).expect_err(toml);
            assert_eq!(error.field.as_deref(), Some(field), "{toml}");
        }
        let unknown = ConfigValue::parse("size_ms = 10\nsize = 3")
            .expect("toml")
            .deserialize::<WindowConfig>()
            .expect_err("unknown option");
        assert!(unknown.message.contains("size"), "{}", unknown.message);
        assert!(
            factory.output_type(&parse("size_ms = 10"), &PortType::of(Kind::Raw), &ctx).is_err()
        );
        let properties = factory.properties(&parse("size_ms = 10"));
        assert!(properties.keyed && properties.late_output && !properties.assigns_event_time);
    }
}
