//! Built-in sources and sinks of tidewatch.
//!
//! | class | type | what it does |
//! |---|---|---|
//! | source | `simulator` | a fleet of pumps with correlated sensors and labelled anomalies ([`simulator`]) |
//! | source | `file` | replays a CSV or JSON-lines file, optionally paced by its timestamps ([`mod@file`]) |
//! | source | `catalog` | device metadata rows from a file, a Kafka compacted topic or retained MQTT messages, sent as differences ([`catalog`]) |
//! | source | `kafka` | a consumer group member per worker, at-least-once offsets ([`kafka::source`]) |
//! | source | `mqtt` | subscribes to an MQTT broker, at-least-once for QoS 1 and 2 ([`mqtt::source`]) |
//! | sink | `stdout` | JSON lines on standard output ([`sinks`]) |
//! | sink | `file` | JSON lines in a file, shared by the workers of the process ([`sinks`]) |
//! | sink | `blackhole` | drops everything (benchmarks) ([`sinks`]) |
//! | sink | `mqtt` | publishes every record as JSON to a topic template ([`mqtt::sink`]) |
//! | sink | `kafka` | keyed, idempotent, compressed; dead letters; store-and-forward buffer ([`kafka::sink`]) |
//! | sink | `prometheus` | per-device anomaly gauges and a top-N on the engine's `/metrics` ([`mod@prometheus`]) |
//! | sink | `webhook` | anomaly events to an HTTP receiver: retries, signature, dead letters ([`webhook`]) |
//! | sink | `parquet` | readings or scores as Parquet files in a lake on a folder or S3 (feature `s3`, [`lake`]) |
//!
//! [`builtins`] lists their factories for the engine's registry. The configs and factories are
//! public so that embedders and benchmarks can build components directly, for example:
//!
//! ```
//! use tidewatch_api::{ComponentContext, Outputs, Source};
//! use tidewatch_connectors::{SimulatorConfig, SimulatorSource};
//!
//! let config = SimulatorConfig { devices: 3, count: Some(30), ..SimulatorConfig::default() };
//! let ctx = ComponentContext::for_test("sim", "simulator");
//! let mut source = SimulatorSource::new(&config, &ctx).expect("valid config");
//! let mut out = Outputs::new("sim");
//! source.poll(&mut out).expect("poll");
//! assert_eq!(out.take_main()[0].len(), 30);
//! ```
//!
//! The options of every component are documented in `docs/reference/sources-and-sinks.md`.
//!
//! Cargo features, one per connector family, all on by default: `mqtt` (the MQTT source and
//! sink), `kafka` (the Kafka source and sink, on rdkafka) and `s3` (the Parquet lake on a
//! folder or S3, and its model registry).

mod backoff;
pub mod catalog;
mod dead_letter;
pub mod file;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "s3")]
pub mod lake;
#[cfg(feature = "mqtt")]
pub mod mqtt;
pub mod prometheus;
mod shared;
pub mod simulator;
pub mod sinks;
pub mod tls;
pub mod webhook;

pub use catalog::{CatalogSource, CatalogSourceConfig, CatalogSourceFactory};
pub use file::{FileFormat, FileSource, FileSourceConfig, FileSourceFactory};
#[cfg(feature = "kafka")]
pub use kafka::{
    KafkaClientOptions, KafkaSinkConfig, KafkaSinkFactory, KafkaSourceConfig, KafkaSourceFactory,
};
#[cfg(feature = "s3")]
pub use lake::{
    ParquetSink, ParquetSinkConfig, ParquetSinkFactory, ParquetSource, ParquetSourceConfig,
    ParquetSourceFactory,
};
#[cfg(feature = "mqtt")]
pub use mqtt::{MqttSinkConfig, MqttSinkFactory, MqttSourceConfig, MqttSourceFactory};
pub use prometheus::{LabelField, PrometheusSink, PrometheusSinkConfig, PrometheusSinkFactory};
pub use simulator::{
    AnomalyKind, SimulatorConfig, SimulatorFactory, SimulatorFormat, SimulatorSource,
};
pub use sinks::{
    BlackholeSink, BlackholeSinkConfig, BlackholeSinkFactory, FileSink, FileSinkConfig,
    FileSinkFactory, StdoutSink, StdoutSinkConfig, StdoutSinkFactory,
};
use tidewatch_api::ComponentFactory;
pub use tls::TlsConfig;
pub use webhook::{WebhookSink, WebhookSinkConfig, WebhookSinkFactory};

/// The built-in components, by type name, for the engine's registry (which keys them by class
/// and name, so the `file` source and the `file` sink coexist).
pub fn builtins() -> Vec<(&'static str, ComponentFactory)> {
    vec![
        ("simulator", ComponentFactory::source(SimulatorFactory)),
        ("file", ComponentFactory::source(FileSourceFactory)),
        ("catalog", ComponentFactory::source(CatalogSourceFactory)),
        #[cfg(feature = "mqtt")]
        ("mqtt", ComponentFactory::source(MqttSourceFactory)),
        #[cfg(feature = "kafka")]
        ("kafka", ComponentFactory::source(KafkaSourceFactory)),
        #[cfg(feature = "s3")]
        ("parquet", ComponentFactory::source(ParquetSourceFactory)),
        ("stdout", ComponentFactory::sink(StdoutSinkFactory)),
        ("file", ComponentFactory::sink(FileSinkFactory)),
        ("blackhole", ComponentFactory::sink(BlackholeSinkFactory)),
        #[cfg(feature = "mqtt")]
        ("mqtt", ComponentFactory::sink(MqttSinkFactory)),
        #[cfg(feature = "kafka")]
        ("kafka", ComponentFactory::sink(KafkaSinkFactory)),
        ("prometheus", ComponentFactory::sink(PrometheusSinkFactory)),
        ("webhook", ComponentFactory::sink(WebhookSinkFactory)),
        #[cfg(feature = "s3")]
        ("parquet", ComponentFactory::sink(ParquetSinkFactory)),
    ]
}

#[cfg(test)]
mod tests {
    use tidewatch_api::{ConfigValue, ValidateContext};

    use super::*;

    #[test]
    #[cfg(all(feature = "mqtt", feature = "kafka", feature = "s3"))]
    fn builtins_configure_from_toml() {
        let ctx = ValidateContext::default();
        let mut seen = Vec::new();
        for (name, factory) in builtins() {
            let options = match (name, factory.class()) {
                ("file", "source") => "path = \"data.csv\"",
                ("catalog", "source") => "path = \"devices.csv\"",
                ("file", "sink") => "path = \"out.jsonl\"",
                ("mqtt", "source") => "url = \"mqtt://127.0.0.1\"\ntopics = [\"a/#\"]",
                ("mqtt", "sink") => "url = \"mqtt://127.0.0.1\"\ntopic = \"a/{device}\"",
                ("kafka", "source") => "topics = [\"readings\"]",
                ("kafka", "sink") => "topic = \"readings\"",
                ("webhook", "sink") => "url = \"http://127.0.0.1:9/hook\"",
                ("parquet", "sink") => "path = \"file://./lake\"",
                ("parquet", "source") => "path = \"file://./lake\"\nfeatures = [\"a\"]",
                _ => "",
            };
            let options = ConfigValue::parse(options).expect("toml");
            match &factory {
                ComponentFactory::Source(source) => {
                    let configured = source.configure(&options, &ctx).expect(name);
                    // The lake holds readings already, the catalog its updates; every other
                    // source emits raw messages.
                    let expected = match name {
                        "parquet" => tidewatch_api::Kind::Readings,
                        "catalog" => tidewatch_api::Kind::Catalog,
                        _ => tidewatch_api::Kind::Raw,
                    };
                    assert_eq!(configured.output_type().kind, expected);
                }
                ComponentFactory::Sink(sink) => {
                    let configured = sink.configure(&options, &ctx).expect(name);
                    let expected = match name {
                        "prometheus" => {
                            vec![tidewatch_api::Kind::Scores, tidewatch_api::Kind::Events]
                        }
                        "webhook" => vec![tidewatch_api::Kind::Events],
                        "parquet" => {
                            vec![tidewatch_api::Kind::Readings, tidewatch_api::Kind::Scores]
                        }
                        _ => tidewatch_api::Kind::ALL.to_vec(),
                    };
                    assert_eq!(configured.accepts(), expected);
                }
                ComponentFactory::Transform(_) => panic!("no transforms here"),
            }
            seen.push((factory.class(), name));
        }
        assert_eq!(
            seen,
            [
                ("source", "simulator"),
                ("source", "file"),
                ("source", "catalog"),
                ("source", "mqtt"),
                ("source", "kafka"),
                ("source", "parquet"),
                ("sink", "stdout"),
                ("sink", "file"),
                ("sink", "blackhole"),
                ("sink", "mqtt"),
                ("sink", "kafka"),
                ("sink", "prometheus"),
                ("sink", "webhook"),
                #[cfg(feature = "s3")]
                ("sink", "parquet"),
            ]
        );
    }

    #[test]
    fn unknown_options_point_at_the_option() {
        let options = ConfigValue::parse("devices = 3\nrate = 5").expect("toml");
        let Some((_, ComponentFactory::Source(simulator))) = builtins().into_iter().next() else {
            panic!("simulator first");
        };
        let Err(error) = simulator.configure(&options, &ValidateContext::default()) else {
            panic!("unknown option accepted");
        };
        assert!(error.message.contains("rate"), "{}", error.message);
        assert!(error.span.is_some());
    }
}
