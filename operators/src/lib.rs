//! The built-in transforms of tidewatch: `normalize`, `filter`, `route`, `window`, `stats`,
//! `autoencoder` and `threshold`.
//!
//! | type | in | out | side outputs | state |
//! |---|---|---|---|---|
//! | [`normalize`] | raw messages | readings | `<id>.errors` | last values for `hold_last` (assigns event time) |
//! | [`filter`] | readings, windows or scores | the same | `<id>.errors` | none |
//! | [`route`] | readings, windows or scores | the same, on `<id>.<route>` per route | `<id>.errors` | none |
//! | [`window`] | readings | windows | `<id>.late`, `<id>.errors` | open windows per device |
//! | [`stats`] | windows | scores | `<id>.errors` | a moving baseline per device |
//! | [`autoencoder`] | windows | scores | `<id>.errors` | the model (hot-swapped) |
//! | [`threshold`] | scores | anomaly events (or scores) | `<id>.errors` | n-of-m state per device |
//!
//! [`builtins`] lists their factories under their type names for the engine's registry. The
//! configs, factories and operators are public so that benchmarks and embedders can build the
//! operators directly (`Normalize::new(&config, &ctx)` ...) without the engine. The option
//! reference is `docs/reference/transforms.md`.

pub mod autoencoder;
mod dataflow;
pub mod enrich;
pub mod filter;
pub mod fleet;
pub mod normalize;
pub mod route;
pub mod stats;
pub mod threshold;
mod util;
pub mod window;

use tidewatch_api::ComponentFactory;

pub use autoencoder::{
    Autoencoder, AutoencoderConfig, AutoencoderFactory, RegistryFollow, Scorer, WindowScore,
};
pub use enrich::{Enrich, EnrichConfig, EnrichFactory};
pub use filter::{Condition, Filter, FilterConfig, FilterFactory, Matcher, Op, Stat};
pub use fleet::{Fleet, FleetConfig, FleetFactory, FleetRecord, FleetView};
pub use normalize::{
    Conversion, MediationConfig, Normalize, NormalizeConfig, NormalizeFactory, NormalizeOptions,
    OnMissing, Quantity, Unit,
};
pub use route::{Route, RouteConfig, RouteFactory, RouteSpec, Router};
pub use stats::{STATS_VERSION, StatsConfig, StatsDetector, StatsFactory, stats_columns};
pub use threshold::{Emit, Threshold, ThresholdConfig, ThresholdFactory};
pub use window::{
    CountWindowOperator, SessionWindowOperator, WindowConfig, WindowFactory, WindowOperator,
};

/// The built-in transforms as `(type name, factory)`, for the engine's registry.
pub fn builtins() -> Vec<(&'static str, ComponentFactory)> {
    vec![
        ("normalize", ComponentFactory::transform(NormalizeFactory)),
        ("filter", ComponentFactory::transform(FilterFactory)),
        ("route", ComponentFactory::transform(RouteFactory)),
        ("window", ComponentFactory::transform(WindowFactory)),
        ("stats", ComponentFactory::transform(StatsFactory)),
        ("autoencoder", ComponentFactory::transform(AutoencoderFactory)),
        ("threshold", ComponentFactory::transform(ThresholdFactory)),
        ("enrich", ComponentFactory::transform(EnrichFactory)),
        ("fleet", ComponentFactory::transform(FleetFactory)),
    ]
}

#[cfg(test)]
mod tests {
    use tidewatch_api::{
        Batch, ComponentContext, ConfigValue, Kind, Outputs, PortType, RawBatch, ValidateContext,
    };

    use super::*;

    #[test]
    fn builtins_are_transforms_under_their_names() {
        let names: Vec<&str> = builtins().iter().map(|(name, _)| *name).collect();
        assert_eq!(
            names,
            [
                "normalize",
                "filter",
                "route",
                "window",
                "stats",
                "autoencoder",
                "threshold",
                "enrich",
                "fleet",
            ]
        );
        assert!(builtins().iter().all(|(_, factory)| factory.class() == "transform"));
    }

    /// normalize -> window -> stats through the erased factories, as the engine drives them.
    #[test]
    fn pipeline_through_erased_factories() {
        let ctx = ValidateContext::default();
        let configure = |name: &str, toml: &str| {
            let factory = builtins()
                .into_iter()
                .find(|(candidate, _)| *candidate == name)
                .map(|(_, factory)| factory)
                .expect("registered");
            let ComponentFactory::Transform(factory) = factory else { panic!("not a transform") };
            factory.configure(&ConfigValue::parse(toml).expect("toml"), &ctx).expect("configure")
        };
        let normalize = configure(
            "normalize",
            "features = [\"v\"]\ndevice_field = \"d\"\ntimestamp_field = \"t\"\ntimestamp_format = \"unix_ms\"",
        );
        let window = configure("window", "size_ms = 10");
        let stats = configure("stats", "warmup_windows = 2\nthreshold = 3.0");

        let raw_port = PortType::of(Kind::Raw);
        let readings_port = normalize.output_type(&raw_port, &ctx).expect("readings");
        let windows_port = window.output_type(&readings_port, &ctx).expect("windows");
        let scores_port = stats.output_type(&windows_port, &ctx).expect("scores");
        assert_eq!(scores_port.kind, Kind::Scores);
        assert_eq!(scores_port.schema.expect("schema").len(), 4);

        let mut normalize =
            normalize.build(&ComponentContext::for_test("n", "normalize")).expect("n");
        let mut window = window.build(&ComponentContext::for_test("w", "window")).expect("w");
        let mut stats = stats.build(&ComponentContext::for_test("s", "stats")).expect("s");

        let mut raw = RawBatch::new();
        for time in 0..40 {
            let value = if time >= 30 { 50.0 } else { (time % 2) as f32 };
            let payload = format!("{{\"d\":\"lib-dev\",\"t\":{time},\"v\":{value}}}");
            raw.push("", payload.as_bytes(), 0, time as u64);
        }
        let mut out = Outputs::new("n");
        normalize.process_batch(Batch::Raw(raw), &mut out);
        let mut out_w = Outputs::new("w");
        for batch in out.take_main() {
            window.process_batch(batch, &mut out_w);
        }
        window.on_watermark(i64::MAX, &mut out_w);
        let mut out_s = Outputs::new("s");
        for batch in out_w.take_main() {
            stats.process_batch(batch, &mut out_s);
        }
        let scores: Vec<_> = out_s
            .take_main()
            .into_iter()
            .flat_map(|batch| match batch {
                Batch::Scores(scores) => scores,
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(scores.len(), 4);
        let flags: Vec<bool> = scores.iter().map(|score| score.anomaly).collect();
        assert_eq!(flags, [false, false, false, true]);
    }
}
