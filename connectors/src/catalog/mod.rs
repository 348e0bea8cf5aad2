//! `catalog`: a file of device metadata, watched and re-read on change, sent as differences.
//!
//! The file (CSV or JSON lines, see [`tidewatch_api::catalog`]) is read at open; each poll after
//! `poll_interval_ms` looks at its size and modification time and, when they changed, reads it
//! again and compares the rows with the last ones read. Only the difference leaves the source:
//! one raw message per [`CatalogUpdate`](tidewatch_api::catalog::CatalogUpdate) (a changed row retracted and inserted again, a removed
//! row retracted). A line that is not a row goes to `<id>.errors` and counts as absent.
//!
//! Every worker reads the file and sends the whole difference: `enrich` keeps a copy of the
//! catalog on each worker, so records are joined wherever they are.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;
use tidewatch_api::catalog::{CatalogFormat, CatalogRow, diff_catalogs, parse_catalog};
use tidewatch_api::records::now_ms;
use tidewatch_api::{
    ComponentContext, ComponentError, ConfigError, Kind, Outputs, PortType, RawBatch, Source,
    SourceFactory, SourcePoll, ValidateContext,
};

/// Options of the `catalog` source.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogSourceConfig {
    /// The catalog file; relative to the pipeline file.
    pub path: String,
    /// `csv` or `jsonl`; by default from the file's extension (`.jsonl`/`.ndjson`/`.json` are
    /// JSON lines, anything else CSV).
    #[serde(default)]
    pub format: Option<CatalogFormat>,
    /// Keep watching the file after the first read (an unbounded source); `false` reads it
    /// once and finishes.
    #[serde(default = "default_watch")]
    pub watch: bool,
    /// How often the file is checked for changes, ms.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// The topic written on every update message.
    #[serde(default = "default_topic")]
    pub topic: String,
}

fn default_watch() -> bool {
    true
}

fn default_poll_interval_ms() -> u64 {
    1_000
}

fn default_topic() -> String {
    "catalog".to_owned()
}

impl CatalogSourceConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.path.trim().is_empty() {
            return Err(ConfigError::at_field("path", "the catalog's path is empty"));
        }
        if self.poll_interval_ms == 0 {
            return Err(ConfigError::at_field("poll_interval_ms", "must be at least 1 ms"));
        }
        Ok(())
    }

    /// The format: the option, or the file's extension.
    pub fn format(&self) -> CatalogFormat {
        self.format.unwrap_or_else(|| {
            let lower = self.path.to_ascii_lowercase();
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
        Ok(PortType::of(Kind::Raw))
    }

    fn build(
        &self,
        config: &CatalogSourceConfig,
        ctx: &ComponentContext,
    ) -> Result<Box<dyn Source>, ComponentError> {
        config.validate().map_err(|error| ComponentError::Config(error.to_string()))?;
        Ok(Box::new(CatalogSource::new(config, ctx)))
    }
}

/// What the file looked like when last read: size and modification time.
type Stamp = (u64, Option<SystemTime>);

/// The `catalog` source (see the module documentation).
#[derive(Debug)]
pub struct CatalogSource {
    ctx: ComponentContext,
    path: PathBuf,
    format: CatalogFormat,
    watch: bool,
    interval: Duration,
    topic: String,
    rows: BTreeMap<String, CatalogRow>,
    stamp: Option<Stamp>,
    next_check: Option<Instant>,
    sent: u64,
    missing_reported: bool,
}

impl CatalogSource {
    /// A source for one worker.
    pub fn new(config: &CatalogSourceConfig, ctx: &ComponentContext) -> CatalogSource {
        CatalogSource {
            ctx: ctx.clone(),
            path: ctx.resolve_path(&config.path),
            format: config.format(),
            watch: config.watch,
            interval: Duration::from_millis(config.poll_interval_ms),
            topic: config.topic.clone(),
            rows: BTreeMap::new(),
            stamp: None,
            next_check: None,
            sent: 0,
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
        let topic = Some(self.topic.as_str());
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
        let arrival = now_ms();
        let mut batch = RawBatch::with_capacity(updates.len(), updates.len() * 96);
        for update in &updates {
            batch.push(&self.topic, &update.to_json(), arrival, self.sent);
            self.sent += 1;
        }
        out.emit(tidewatch_api::Batch::Raw(batch));
        self.rows = parsed.rows;
        self.stamp = Some(stamp);
        Ok(!updates.is_empty())
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
                    out.error("catalog", error.to_string(), Some(&self.topic), None);
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
    use tidewatch_api::catalog::CatalogUpdate;

    use super::*;

    fn updates(out: &mut Outputs) -> Vec<(String, String, i64)> {
        out.take_main()
            .into_iter()
            .flat_map(|batch| match batch {
                Batch::Raw(raw) => raw
                    .iter()
                    .map(|message| {
                        let update = CatalogUpdate::from_json(message.payload).expect("update");
                        (update.row.device, update.row.site, update.diff)
                    })
                    .collect::<Vec<_>>(),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn an_edited_file_sends_only_what_changed() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("devices.csv");
        std::fs::write(&path, "device,site\np1,north\np2,north\n").expect("write");
        let config = CatalogSourceConfig {
            path: path.display().to_string(),
            format: None,
            watch: true,
            poll_interval_ms: 1,
            topic: default_topic(),
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
            path: dir.path().join("none.jsonl").display().to_string(),
            format: None,
            watch: false,
            poll_interval_ms: 1,
            topic: default_topic(),
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
