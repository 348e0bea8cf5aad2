//! `catalog`: device metadata rows, sent as differences, from one of three places:
//!
//! - a file (CSV or JSON lines, see [`tidewatch_api::catalog`]), `path`: read at open; each
//!   poll after `poll_interval_ms` looks at its size and modification time and, when they
//!   changed, reads it again and compares the rows with the last ones read ([`CatalogSource`]);
//! - a Kafka compacted topic, the `kafka` table: key = device id, value = one JSON row, a
//!   tombstone deletes the row ([`kafka::KafkaCatalogSource`], feature `kafka`);
//! - retained MQTT messages, the `mqtt` table: one JSON row per topic, an empty payload (which
//!   clears a retained message) deletes the row ([`mqtt::MqttCatalogSource`], feature `mqtt`).
//!
//! Only the difference leaves the source, as a batch of
//! [`CatalogUpdate`](tidewatch_api::catalog::CatalogUpdate)s (a changed row retracted and
//! inserted again, a removed row retracted) whose rows the source shares with their readers.
//! A line or message that is not a row goes to `<id>.errors` and counts as absent. The keyed
//! sources share [`keyed::KeyedCatalog`].
//!
//! Every worker reads the whole catalog and sends the whole difference: `enrich` keeps a copy
//! of the catalog on each worker, so records are joined wherever they are.

#[cfg(feature = "kafka")]
pub mod kafka;
pub mod keyed;
#[cfg(feature = "mqtt")]
pub mod mqtt;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;
use tidewatch_api::catalog::{CatalogFormat, CatalogRow, diff_catalogs, parse_catalog};
use tidewatch_api::{
    ComponentContext, ComponentError, ConfigError, Kind, Outputs, PortType, Source, SourceFactory,
    SourcePoll, ValidateContext,
};

use keyed::emit_updates;

/// The options of a catalog on a Kafka compacted topic (the `kafka` table).
#[cfg(feature = "kafka")]
pub type KafkaCatalogOptions = kafka::KafkaCatalogConfig;
/// The options of a catalog on a Kafka compacted topic: this build has no `kafka` feature, so
/// a `kafka` table is refused when the pipeline is validated.
#[cfg(not(feature = "kafka"))]
pub type KafkaCatalogOptions = serde::de::IgnoredAny;

/// The options of a catalog in retained MQTT messages (the `mqtt` table).
#[cfg(feature = "mqtt")]
pub type MqttCatalogOptions = mqtt::MqttCatalogConfig;
/// The options of a catalog in retained MQTT messages: this build has no `mqtt` feature, so
/// an `mqtt` table is refused when the pipeline is validated.
#[cfg(not(feature = "mqtt"))]
pub type MqttCatalogOptions = serde::de::IgnoredAny;

/// Options of the `catalog` source: exactly one of `path`, `kafka` and `mqtt` says where the
/// rows are.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogSourceConfig {
    /// The catalog file; relative to the pipeline file.
    #[serde(default)]
    pub path: Option<String>,
    /// A Kafka compacted topic of rows keyed by device (`kafka = { brokers, topic, ... }`).
    #[serde(default)]
    pub kafka: Option<KafkaCatalogOptions>,
    /// Retained MQTT messages of one row each (`mqtt = { url, topics, ... }`).
    #[serde(default)]
    pub mqtt: Option<MqttCatalogOptions>,
    /// `csv` or `jsonl`; by default from the file's extension (`.jsonl`/`.ndjson`/`.json` are
    /// JSON lines, anything else CSV). Kafka and MQTT rows are JSON (`jsonl` or unset).
    #[serde(default)]
    pub format: Option<CatalogFormat>,
    /// Keep watching the file, or the Kafka topic, after the first read (an unbounded
    /// source); `false` reads the file once, or the topic up to its end offsets as of the
    /// start, and finishes. An MQTT catalog is always watched.
    #[serde(default = "default_watch")]
    pub watch: bool,
    /// How often the file is checked for changes, ms (the file only).
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
}

fn default_watch() -> bool {
    true
}

fn default_poll_interval_ms() -> u64 {
    1_000
}

/// An error about an option of a nested table, named `<table>.<option>`.
#[cfg(any(feature = "kafka", feature = "mqtt"))]
pub(crate) fn nested(table: &str, mut error: ConfigError) -> ConfigError {
    error.field = Some(match error.field.take() {
        Some(field) => format!("{table}.{field}"),
        None => table.to_owned(),
    });
    error
}

impl CatalogSourceConfig {
    /// A config for the catalog file `path`, every other option at its default.
    pub fn file(path: impl Into<String>) -> CatalogSourceConfig {
        CatalogSourceConfig {
            path: Some(path.into()),
            kafka: None,
            mqtt: None,
            format: None,
            watch: default_watch(),
            poll_interval_ms: default_poll_interval_ms(),
        }
    }

    /// Checks the options beyond their types: exactly one of `path`, `kafka` and `mqtt`, and
    /// each one's own options.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let given: Vec<&str> = [
            ("path", self.path.is_some()),
            ("kafka", self.kafka.is_some()),
            ("mqtt", self.mqtt.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, given)| given.then_some(name))
        .collect();
        let hint = "for example path = \"devices.csv\", \
            kafka = { brokers = \"127.0.0.1:9092\", topic = \"device-catalog\" } or \
            mqtt = { url = \"mqtt://127.0.0.1:1883\", topics = [\"catalog/#\"] }";
        match given.as_slice() {
            [] => {
                return Err(ConfigError::new("the catalog needs one of `path`, `kafka` or `mqtt`")
                    .with_hint(hint));
            }
            [_] => {}
            [first, second, ..] => {
                return Err(ConfigError::at_field(
                    second,
                    format!("`{second}` and `{first}` are both given: a catalog has one origin"),
                )
                .with_hint("keep one of `path`, `kafka` and `mqtt`"));
            }
        }
        if self.poll_interval_ms == 0 {
            return Err(ConfigError::at_field("poll_interval_ms", "must be at least 1 ms"));
        }
        if let Some(path) = &self.path
            && path.trim().is_empty()
        {
            return Err(ConfigError::at_field("path", "the catalog's path is empty"));
        }
        if self.path.is_none() && self.format == Some(CatalogFormat::Csv) {
            return Err(ConfigError::at_field(
                "format",
                "the rows of a Kafka or MQTT catalog are JSON, one row per message",
            )
            .with_hint("remove `format` (or set it to \"jsonl\")"));
        }
        if let Some(kafka) = &self.kafka {
            #[cfg(feature = "kafka")]
            kafka.validate().map_err(|error| nested("kafka", error))?;
            #[cfg(not(feature = "kafka"))]
            let _ = kafka;
            #[cfg(not(feature = "kafka"))]
            return Err(ConfigError::at_field(
                "kafka",
                "this tidewatch was built without the `kafka` feature: no Kafka catalog",
            )
            .with_hint("build with `--features kafka`, or read the catalog from a file"));
        }
        if let Some(mqtt) = &self.mqtt {
            #[cfg(feature = "mqtt")]
            mqtt.validate().map_err(|error| nested("mqtt", error))?;
            #[cfg(not(feature = "mqtt"))]
            let _ = mqtt;
            #[cfg(not(feature = "mqtt"))]
            return Err(ConfigError::at_field(
                "mqtt",
                "this tidewatch was built without the `mqtt` feature: no MQTT catalog",
            )
            .with_hint("build with `--features mqtt`, or read the catalog from a file"));
            #[cfg(feature = "mqtt")]
            if !self.watch {
                return Err(ConfigError::at_field(
                    "watch",
                    "an MQTT catalog is always watched: MQTT does not tell when the retained \
                     messages are all delivered",
                )
                .with_hint("remove `watch = false`"));
            }
        }
        Ok(())
    }

    /// The format: the option, or the file's extension (JSON for Kafka and MQTT).
    pub fn format(&self) -> CatalogFormat {
        self.format.unwrap_or_else(|| {
            let Some(path) = &self.path else { return CatalogFormat::Jsonl };
            let lower = path.to_ascii_lowercase();
            if [".jsonl", ".ndjson", ".json"].iter().any(|ext| lower.ends_with(ext)) {
                CatalogFormat::Jsonl
            } else {
                CatalogFormat::Csv
            }
        })
    }
}

/// Makes `catalog` sources.
#[derive(Debug, Clone, Copy, Default)]
pub struct CatalogSourceFactory;

impl SourceFactory for CatalogSourceFactory {
    type Config = CatalogSourceConfig;

    fn output_type(
        &self,
        config: &CatalogSourceConfig,
        _ctx: &ValidateContext,
    ) -> Result<PortType, ConfigError> {
        config.validate()?;
        Ok(PortType::of(Kind::Catalog))
    }

    fn build(
        &self,
        config: &CatalogSourceConfig,
        ctx: &ComponentContext,
    ) -> Result<Box<dyn Source>, ComponentError> {
        config.validate().map_err(|error| ComponentError::Config(error.to_string()))?;
        #[cfg(feature = "kafka")]
        if let Some(kafka) = &config.kafka {
            return Ok(Box::new(kafka::KafkaCatalogSource::new(kafka, config, ctx)));
        }
        #[cfg(feature = "mqtt")]
        if let Some(mqtt) = &config.mqtt {
            return Ok(Box::new(mqtt::MqttCatalogSource::new(mqtt, ctx)));
        }
        Ok(Box::new(CatalogSource::new(config, ctx)))
    }
}

/// What the file looked like when last read: size and modification time.
type Stamp = (u64, Option<SystemTime>);

/// The `catalog` source reading a file (see the module documentation).
#[derive(Debug)]
pub struct CatalogSource {
    ctx: ComponentContext,
    path: PathBuf,
    format: CatalogFormat,
    watch: bool,
    interval: Duration,
    rows: Vec<Arc<CatalogRow>>,
    stamp: Option<Stamp>,
    next_check: Option<Instant>,
    missing_reported: bool,
}

impl CatalogSource {
    /// A source for one worker, reading the file of `config.path`.
    pub fn new(config: &CatalogSourceConfig, ctx: &ComponentContext) -> CatalogSource {
        CatalogSource {
            ctx: ctx.clone(),
            path: ctx.resolve_path(config.path.as_deref().unwrap_or_default()),
            format: config.format(),
            watch: config.watch,
            interval: Duration::from_millis(config.poll_interval_ms),
            rows: Vec::new(),
            stamp: None,
            next_check: None,
            missing_reported: false,
        }
    }

    fn stamp(&self) -> std::io::Result<Stamp> {
        let meta = std::fs::metadata(&self.path)?;
        Ok((meta.len(), meta.modified().ok()))
    }

    /// Reads the file if it changed and emits the difference; false when it did not change.
    fn refresh(&mut self, out: &mut Outputs) -> Result<bool, ComponentError> {
        let stamp = self.stamp().map_err(|error| {
            ComponentError::io(format!("reading {}", self.path.display()), error)
        })?;
        if self.stamp == Some(stamp) {
            return Ok(false);
        }
        let text = std::fs::read(&self.path).map_err(|error| {
            ComponentError::io(format!("reading {}", self.path.display()), error)
        })?;
        let path = self.path.display().to_string();
        let topic = Some(path.as_str());
        let parsed = match parse_catalog(&text, self.format) {
            Ok(parsed) => parsed,
            Err(error) => {
                // The whole file is unusable (a header being rewritten?): keep the last rows.
                out.error("catalog", error.to_string(), topic, None);
                self.stamp = Some(stamp);
                return Ok(false);
            }
        };
        for error in &parsed.errors {
            out.error("catalog", error.to_string(), topic, None);
        }
        let updates = diff_catalogs(&self.rows, &parsed.rows);
        let changed = !updates.is_empty();
        emit_updates(out, updates);
        self.rows = parsed.rows;
        self.stamp = Some(stamp);
        Ok(changed)
    }
}

impl Source for CatalogSource {
    fn open(&mut self, _ctx: &ComponentContext) -> Result<(), ComponentError> {
        // A catalog that is not there at the start is a configuration error.
        self.stamp()
            .map(|_| ())
            .map_err(|error| ComponentError::io(format!("opening {}", self.path.display()), error))
    }

    fn poll(&mut self, out: &mut Outputs) -> Result<SourcePoll, ComponentError> {
        if self.ctx.shutdown_requested() {
            return Ok(SourcePoll::Finished);
        }
        let now = Instant::now();
        if self.next_check.is_some_and(|next| now < next) {
            let wait = self.next_check.map_or(self.interval, |next| next - now);
            return Ok(SourcePoll::Idle { wake_after_ms: wait.as_millis().max(1) as u64 });
        }
        self.next_check = Some(now + self.interval);
        match self.refresh(out) {
            Ok(_) => self.missing_reported = false,
            // Gone for a moment (replaced by a rename): keep the last rows, say so once.
            Err(error) if self.stamp.is_some() && self.watch => {
                if !self.missing_reported {
                    let path = self.path.display().to_string();
                    out.error("catalog", error.to_string(), Some(&path), None);
                    self.missing_reported = true;
                }
            }
            Err(error) => return Err(error),
        }
        if !self.watch {
            return Ok(SourcePoll::Finished);
        }
        Ok(SourcePoll::Idle { wake_after_ms: self.interval.as_millis().max(1) as u64 })
    }
}

#[cfg(test)]
mod tests {
    use tidewatch_api::Batch;

    use super::*;

    fn updates(out: &mut Outputs) -> Vec<(String, String, i64)> {
        out.take_main()
            .into_iter()
            .flat_map(|batch| match batch {
                Batch::Catalog(updates) => updates
                    .into_iter()
                    .map(|update| {
                        (update.row.device.clone(), update.row.site.to_string(), update.diff)
                    })
                    .collect::<Vec<_>>(),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn exactly_one_origin_is_given_and_old_files_stay_valid() {
        let parse = |text: &str| {
            tidewatch_api::ConfigValue::parse(text)
                .and_then(|value| value.deserialize::<CatalogSourceConfig>())
                .expect(text)
        };
        let old = parse("path = \"devices.csv\"\nwatch = false\npoll_interval_ms = 5");
        assert_eq!(old.validate(), Ok(()));
        assert_eq!(old.path.as_deref(), Some("devices.csv"));
        assert_eq!(old.format(), CatalogFormat::Csv);
        let none = parse("watch = true").validate().expect_err("no origin");
        assert!(none.message.contains("`path`, `kafka` or `mqtt`"), "{}", none.message);
        let both =
            parse("path = \"d.csv\"\nmqtt = { url = \"mqtt://h\", topics = [\"catalog/#\"] }");
        assert_eq!(both.validate().expect_err("two").field.as_deref(), Some("mqtt"));
        assert_eq!(
            parse("path = \" \"").validate().expect_err("empty").field.as_deref(),
            Some("path")
        );
    }

    #[test]
    #[cfg(not(all(feature = "kafka", feature = "mqtt")))]
    fn a_build_without_the_feature_refuses_its_table() {
        for (text, feature) in [
            ("kafka = { topic = \"device-catalog\" }", "kafka"),
            ("mqtt = { url = \"mqtt://h\", topics = [\"catalog/#\"] }", "mqtt"),
        ] {
            let built = match feature {
                "kafka" => cfg!(feature = "kafka"),
                _ => cfg!(feature = "mqtt"),
            };
            if built {
                continue;
            }
            let config: CatalogSourceConfig = tidewatch_api::ConfigValue::parse(text)
                .and_then(|value| value.deserialize())
                .expect(text);
            let error = config.validate().expect_err(text);
            assert_eq!(error.field.as_deref(), Some(feature));
            assert!(error.message.contains("feature"), "{}", error.message);
        }
    }

    #[test]
    fn an_edited_file_sends_only_what_changed() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("devices.csv");
        std::fs::write(&path, "device,site\np1,north\np2,north\n").expect("write");
        let config = CatalogSourceConfig {
            poll_interval_ms: 1,
            ..CatalogSourceConfig::file(path.display().to_string())
        };
        let ctx = ComponentContext::for_test("catalog", "catalog");
        let mut source = CatalogSource::new(&config, &ctx);
        source.open(&ctx).expect("open");
        let mut out = Outputs::new("catalog");
        source.poll(&mut out).expect("poll");
        assert_eq!(
            updates(&mut out),
            [("p1".into(), "north".into(), 1), ("p2".into(), "north".into(), 1)]
        );
        // Unchanged: nothing is sent.
        source.next_check = None;
        source.poll(&mut out).expect("poll");
        assert!(updates(&mut out).is_empty());
        std::fs::write(&path, "device,site\np1,south\np3,east\nbad,\"x\n").expect("write");
        source.next_check = None;
        source.poll(&mut out).expect("poll");
        assert_eq!(out.take_errors().len(), 1);
        assert_eq!(
            updates(&mut out),
            [
                ("p1".into(), "north".into(), -1),
                ("p1".into(), "south".into(), 1),
                ("p2".into(), "north".into(), -1),
                ("p3".into(), "east".into(), 1),
            ]
        );
    }

    #[test]
    fn a_missing_file_fails_at_open_and_a_read_once_catalog_finishes() {
        let dir = tempfile::tempdir().expect("dir");
        let config = CatalogSourceConfig {
            watch: false,
            poll_interval_ms: 1,
            ..CatalogSourceConfig::file(dir.path().join("none.jsonl").display().to_string())
        };
        assert_eq!(config.format(), CatalogFormat::Jsonl);
        let ctx = ComponentContext::for_test("catalog", "catalog");
        let mut source = CatalogSource::new(&config, &ctx);
        assert!(source.open(&ctx).is_err());
        std::fs::write(dir.path().join("none.jsonl"), "{\"device\":\"p1\"}\n").expect("write");
        let mut out = Outputs::new("catalog");
        assert_eq!(source.poll(&mut out).expect("poll"), SourcePoll::Finished);
        assert_eq!(updates(&mut out).len(), 1);
    }
}
