//! `enrich`: joins scores or anomaly events with the device catalog, adding the catalog's
//! fields as labels.
//!
//! Its inputs are the records and a `catalog` source (whose updates are raw messages, see
//! [`tidewatch_api::catalog`]). The catalog is a differential collection arranged by device;
//! each batch of records is joined with it as it stands when the batch arrives: a record whose
//! device has a row leaves on `<id>.matched` with `site`, `asset`, `owner` and the row's free
//! labels added (they replace labels of the same name), one whose device has none leaves on
//! `<id>.unmatched`, unchanged, and is counted
//! (`tidewatch_enrich_unmatched_records_total{component_id}`). A row's `threshold` override
//! replaces the detector's threshold of the device's scores (their `threshold`, and their
//! `anomaly` flag: score above it), so a `threshold` transform placed after `enrich`
//! debounces each device by its own bound.
//!
//! Every worker holds the whole catalog (every `catalog` instance sends it to its own worker's
//! `enrich`), so records are joined on the worker they are on and nothing is exchanged.
//!
//! # Examples
//!
//! ```
//! use std::sync::Arc;
//! use tidewatch_api::catalog::{CatalogRow, CatalogUpdate};
//! use tidewatch_api::{Batch, ComponentContext, DeviceId, Outputs, RawBatch, Schema, Score, Transform};
//! use tidewatch_operators::Enrich;
//!
//! let ctx = ComponentContext::for_test("enrich", "enrich");
//! let mut enrich = Enrich::new(&ctx);
//! let mut out = Outputs::new("enrich");
//! let row = CatalogRow {
//!     device: "p1".into(), site: "north".into(), asset: "pump".into(), ..Default::default()
//! };
//! let mut raw = RawBatch::new();
//! raw.push("catalog", &CatalogUpdate { diff: 1, row }.to_json(), 0, 0);
//! enrich.process_batch(Batch::Raw(raw), &mut out);
//! let score = |device: &str| Score {
//!     device: DeviceId::intern(device), start_ms: 0, end_ms: 10, detector: "m".into(),
//!     version: "1".into(), score: 0.5, threshold: None, anomaly: false, label: 0,
//!     columns: Arc::new(Schema::new(Vec::<String>::new())), values: vec![],
//!     labels: Default::default(),
//! };
//! enrich.process_batch(Batch::Scores(vec![score("p1"), score("p9")]), &mut out);
//! let mut named = out.take_named().into_iter();
//! let Some((0, Batch::Scores(matched))) = named.next() else { panic!("matched scores") };
//! assert_eq!(matched[0].labels.get("site"), Some("north"));
//! let Some((1, Batch::Scores(unmatched))) = named.next() else { panic!("unmatched scores") };
//! assert_eq!(unmatched[0].device.name().as_ref(), "p9");
//! ```

use std::fmt;

use differential_dataflow::input::{Input, InputSession};
use serde::Deserialize;
use tidewatch_api::catalog::CatalogRow;
use tidewatch_api::prometheus::{IntCounter, Opts};
use tidewatch_api::{
    AnomalyEvent, Batch, ComponentContext, ComponentError, ConfigError, DeviceId, Kind, Labels,
    Outputs, PortType, Score, Transform, TransformFactory, TransformProperties, ValidateContext,
};
use timely::dataflow::ProbeHandle;

use crate::dataflow::{Captured, Local, catalog_updates, take_inserted};

/// Options of the `enrich` transform (none yet).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrichConfig {}

/// The name of `enrich`'s output for the labelled records (`<id>.matched`, port 0).
pub const MATCHED: &str = "matched";
/// The name of `enrich`'s output for records of devices missing from the catalog
/// (`<id>.unmatched`, port 1).
pub const UNMATCHED: &str = "unmatched";

/// Makes `enrich` transforms.
#[derive(Debug, Clone, Copy, Default)]
pub struct EnrichFactory;

impl TransformFactory for EnrichFactory {
    type Config = EnrichConfig;

    fn accepts(&self, _config: &EnrichConfig) -> Vec<Kind> {
        vec![Kind::Raw, Kind::Scores, Kind::Events]
    }

    fn output_type(
        &self,
        _config: &EnrichConfig,
        input: &PortType,
        _ctx: &ValidateContext,
    ) -> Result<PortType, ConfigError> {
        match input.kind {
            Kind::Scores | Kind::Events => Ok(input.clone()),
            _ => Err(ConfigError::new(
                "`enrich` joins scores or events with a catalog: give it both as inputs",
            )
            .with_hint("inputs = [\"<catalog source>\", \"<detector or threshold>\"]")),
        }
    }

    fn properties(&self, _config: &EnrichConfig) -> TransformProperties {
        // A watching catalog never finishes and so holds its input's frontier: `enrich` keeps
        // a watermark of its own, from the event times of its records (as `normalize` does).
        TransformProperties {
            raw_side_input: true,
            assigns_event_time: true,
            ..TransformProperties::default()
        }
    }

    fn named_outputs(&self, _config: &EnrichConfig) -> Vec<String> {
        vec![MATCHED.to_owned(), UNMATCHED.to_owned()]
    }

    fn build(
        &self,
        _config: &EnrichConfig,
        ctx: &ComponentContext,
    ) -> Result<Box<dyn Transform>, ComponentError> {
        Ok(Box::new(Enrich::new(ctx)))
    }
}

/// A record `enrich` can label.
trait Labelled {
    fn device(&self) -> DeviceId;
    fn labels_mut(&mut self) -> &mut Labels;
    /// Takes what else of the device's row applies to the record.
    fn apply(&mut self, _row: &CatalogRow) {}
}

impl Labelled for Score {
    fn device(&self) -> DeviceId {
        self.device
    }
    fn labels_mut(&mut self) -> &mut Labels {
        &mut self.labels
    }
    /// The row's threshold override replaces the detector's threshold: the score's
    /// `threshold`, and its `anomaly` flag as the detectors set it (score above threshold),
    /// so that a `threshold` transform after `enrich` debounces by the device's own bound.
    fn apply(&mut self, row: &CatalogRow) {
        if let Some(bound) = row.threshold {
            self.threshold = Some(bound.0);
            self.anomaly = self.score > bound.0;
        }
    }
}

impl Labelled for AnomalyEvent {
    fn device(&self) -> DeviceId {
        self.device
    }
    fn labels_mut(&mut self) -> &mut Labels {
        &mut self.labels
    }
}

/// The `enrich` transform (see the module documentation).
pub struct Enrich {
    local: Local,
    catalog: InputSession<u64, (String, CatalogRow), isize>,
    records: InputSession<u64, (String, u64), isize>,
    probe: ProbeHandle<u64>,
    matched: Captured<(u64, CatalogRow)>,
    unmatched: Captured<u64>,
    /// The record keys of the last round, retracted at the next.
    last: Vec<(String, u64)>,
    next_seq: u64,
    unmatched_total: Option<IntCounter>,
}

impl fmt::Debug for Enrich {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Enrich").field("round", &self.local.round).finish_non_exhaustive()
    }
}

impl Enrich {
    /// An instance for one worker; it registers the unmatched counter in the context's
    /// metrics registry, if any.
    pub fn new(ctx: &ComponentContext) -> Enrich {
        let mut local = Local::new();
        let matched: Captured<(u64, CatalogRow)> = Captured::default();
        let unmatched: Captured<u64> = Captured::default();
        let (matched_out, unmatched_out) = (matched.clone(), unmatched.clone());
        let probe = ProbeHandle::new();
        let probe_in = probe.clone();
        let (catalog, records) = local.worker.dataflow::<u64, _, _>(move |scope| {
            let (catalog_in, catalog) = scope.new_collection::<(String, CatalogRow), isize>();
            let (records_in, records) = scope.new_collection::<(String, u64), isize>();
            let devices = catalog.clone().map(|(device, _)| device).distinct();
            records
                .clone()
                .join_core(catalog.arrange_by_key(), |_device, seq, row| Some((*seq, row.clone())))
                .inspect(move |(data, time, diff)| {
                    matched_out.borrow_mut().push((data.clone(), *time, *diff));
                })
                .probe_with(&probe_in);
            records
                .antijoin(devices)
                .inspect(move |((_, seq), time, diff)| {
                    unmatched_out.borrow_mut().push((*seq, *time, *diff));
                })
                .probe_with(&probe_in);
            (catalog_in, records_in)
        });
        let unmatched_total = ctx
            .shared(|| unmatched_counter(ctx))
            .map(|counter| counter.as_ref().clone())
            .map_err(|error| tracing::warn!(component = %ctx.component_id, "metrics: {error}"))
            .ok();
        Enrich {
            local,
            catalog,
            records,
            probe,
            matched,
            unmatched,
            last: Vec::new(),
            next_seq: 0,
            unmatched_total,
        }
    }

    /// Closes the round now open and runs the dataflow until it is complete.
    fn advance(&mut self) -> u64 {
        let round = self.local.round;
        self.local.round += 1;
        self.catalog.advance_to(self.local.round);
        self.records.advance_to(self.local.round);
        self.catalog.flush();
        self.records.flush();
        self.local.settle(&self.probe);
        round
    }

    fn apply_catalog(&mut self, batch: &tidewatch_api::RawBatch, out: &mut Outputs) {
        for update in catalog_updates(batch, out) {
            self.catalog.update((update.row.device.clone(), update.row), update.diff as isize);
        }
        self.advance();
        self.matched.borrow_mut().clear();
        self.unmatched.borrow_mut().clear();
    }

    /// Joins `records` with the catalog: the matched ones labelled, and the unmatched ones.
    fn join<R: Labelled>(&mut self, records: Vec<R>) -> (Vec<R>, Vec<R>) {
        for key in self.last.drain(..) {
            self.records.remove(key);
        }
        let first = self.next_seq;
        for record in &records {
            let key = (record.device().name().to_string(), self.next_seq);
            self.records.insert(key.clone());
            self.last.push(key);
            self.next_seq += 1;
        }
        let round = self.advance();
        let mut slots: Vec<Option<R>> = records.into_iter().map(Some).collect();
        let mut take = |seq: u64| {
            usize::try_from(seq - first).ok().and_then(|index| slots.get_mut(index)?.take())
        };
        let mut matched = Vec::new();
        for (seq, row) in take_inserted(&self.matched, round) {
            if let Some(mut record) = take(seq) {
                let labels = record.labels_mut();
                *labels = labels.merged(&row.labels());
                record.apply(&row);
                matched.push(record);
            }
        }
        let unmatched: Vec<R> =
            take_inserted(&self.unmatched, round).into_iter().filter_map(&mut take).collect();
        (matched, unmatched)
    }

    fn count_unmatched(&self, count: usize) {
        if let Some(counter) = &self.unmatched_total {
            counter.inc_by(count as u64);
        }
    }
}

fn unmatched_counter(ctx: &ComponentContext) -> Result<IntCounter, ComponentError> {
    let opts = Opts::new(
        "tidewatch_enrich_unmatched_records_total",
        "Records of devices missing from the catalog, sent to <id>.unmatched.",
    )
    .const_label("component_id", ctx.component_id.as_ref());
    let counter = IntCounter::with_opts(opts)
        .map_err(|error| ComponentError::Internal(format!("unmatched counter: {error}")))?;
    if let Some(registry) = ctx.metrics_registry() {
        registry
            .registry()
            .register(Box::new(counter.clone()))
            .map_err(|error| ComponentError::Internal(format!("unmatched counter: {error}")))?;
    }
    Ok(counter)
}

impl Transform for Enrich {
    fn process_batch(&mut self, batch: Batch, out: &mut Outputs) {
        match batch {
            Batch::Raw(raw) => self.apply_catalog(&raw, out),
            Batch::Scores(scores) => {
                let (matched, unmatched) = self.join(scores);
                self.count_unmatched(unmatched.len());
                out.emit_to(0, Batch::Scores(matched));
                out.emit_to(1, Batch::Scores(unmatched));
            }
            Batch::Events(events) => {
                let (matched, unmatched) = self.join(events);
                self.count_unmatched(unmatched.len());
                out.emit_to(0, Batch::Events(matched));
                out.emit_to(1, Batch::Events(unmatched));
            }
            other => out.discard("unsupported_kind", other.len() as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tidewatch_api::catalog::CatalogUpdate;
    use tidewatch_api::{RawBatch, Schema};

    use super::*;

    fn row(device: &str, site: &str) -> CatalogRow {
        CatalogRow {
            device: device.into(),
            site: site.into(),
            asset: "pump".into(),
            labels: [("zone".to_owned(), "a".to_owned())].into(),
            ..CatalogRow::default()
        }
    }

    fn updates(list: &[(i64, CatalogRow)]) -> Batch {
        let mut raw = RawBatch::new();
        for (position, (diff, row)) in list.iter().enumerate() {
            let update = CatalogUpdate { diff: *diff, row: row.clone() };
            raw.push("catalog", &update.to_json(), 0, position as u64);
        }
        raw.push("catalog", b"{\"diff\":1}", 0, 99);
        Batch::Raw(raw)
    }

    fn event(device: &str) -> AnomalyEvent {
        AnomalyEvent {
            device: DeviceId::intern(device),
            state: tidewatch_api::AnomalyState::Open,
            time_ms: 10,
            started_ms: 10,
            score: 2.0,
            peak_score: 2.0,
            threshold: Some(1.0),
            detector: "m".into(),
            version: "1".into(),
            label: 0,
            columns: Arc::new(Schema::new(["a"])),
            values: vec![1.0],
            labels: Labels::from_pairs([("site", "stale"), ("kept", "yes")]),
        }
    }

    fn sites(out: &mut Outputs) -> (Vec<(String, String)>, Vec<String>) {
        let named = out.take_named();
        let port = |wanted: usize| {
            named.iter().filter(move |(port, _)| *port == wanted).flat_map(|(_, batch)| match batch
            {
                Batch::Events(events) => events.clone(),
                other => panic!("{other:?}"),
            })
        };
        let main = port(0)
            .map(|event| {
                assert_eq!(event.labels.get("kept"), Some("yes"));
                assert_eq!(event.labels.get("zone"), Some("a"));
                (event.device.name().to_string(), event.labels.get("site").unwrap_or("").into())
            })
            .collect();
        assert!(out.take_main().is_empty());
        let unmatched = port(1).map(|event| event.device.name().to_string()).collect();
        (main, unmatched)
    }

    #[test]
    fn records_take_the_catalog_as_it_stands_when_they_arrive() {
        let ctx = ComponentContext::for_test("enrich", "enrich");
        let mut enrich = Enrich::new(&ctx);
        let mut out = Outputs::new("enrich");
        enrich
            .process_batch(updates(&[(1, row("p1", "north")), (1, row("p2", "north"))]), &mut out);
        assert_eq!(out.take_errors().len(), 1, "the update without a row");
        enrich.process_batch(Batch::Events(vec![event("p1"), event("p3"), event("p2")]), &mut out);
        let (main, unmatched) = sites(&mut out);
        assert_eq!(main, [("p1".into(), "north".into()), ("p2".into(), "north".into())]);
        assert_eq!(unmatched, ["p3"]);

        // p1 moves, p2 retires, p3 arrives.
        let moves = [
            (-1, row("p1", "north")),
            (1, row("p1", "south")),
            (-1, row("p2", "north")),
            (1, row("p3", "east")),
        ];
        enrich.process_batch(updates(&moves), &mut out);
        out.take_errors();
        enrich.process_batch(Batch::Events(vec![event("p1"), event("p2"), event("p3")]), &mut out);
        let (main, unmatched) = sites(&mut out);
        assert_eq!(main, [("p1".into(), "south".into()), ("p3".into(), "east".into())]);
        assert_eq!(unmatched, ["p2"]);
        assert_eq!(enrich.unmatched_total.as_ref().map(IntCounter::get), Some(2));
    }

    #[test]
    fn a_rows_threshold_override_decides_its_devices_anomalies_downstream() {
        let ctx = ComponentContext::for_test("enrich", "enrich");
        let mut enrich = Enrich::new(&ctx);
        let mut out = Outputs::new("enrich");
        let strict = CatalogRow {
            threshold: Some(tidewatch_api::catalog::ThresholdOverride(0.5)),
            ..row("strict", "north")
        };
        let lenient = CatalogRow {
            threshold: Some(tidewatch_api::catalog::ThresholdOverride(5.0)),
            ..row("lenient", "north")
        };
        enrich.process_batch(
            updates(&[(1, strict), (1, lenient), (1, row("plain", "north"))]),
            &mut out,
        );
        out.take_errors();
        // The detector's threshold is 1.0: 2.0 is anomalous to it, 0.8 is not.
        let score = |device: &str, value: f32| Score {
            device: DeviceId::intern(device),
            start_ms: 0,
            end_ms: 10,
            detector: "m".into(),
            version: "1".into(),
            score: value,
            threshold: Some(1.0),
            anomaly: value > 1.0,
            label: 0,
            columns: Arc::new(Schema::new(["a"])),
            values: vec![1.0],
            labels: Labels::default(),
        };
        let scores = vec![score("strict", 0.8), score("lenient", 2.0), score("plain", 2.0)];
        enrich.process_batch(Batch::Scores(scores), &mut out);
        let matched: Vec<Score> = out
            .take_named()
            .into_iter()
            .filter(|(port, _)| *port == 0)
            .flat_map(|(_, batch)| match batch {
                Batch::Scores(scores) => scores,
                other => panic!("{other:?}"),
            })
            .collect();
        let seen: Vec<(String, Option<f32>, bool)> = matched
            .iter()
            .map(|score| (score.device.name().to_string(), score.threshold, score.anomaly))
            .collect();
        assert_eq!(
            seen,
            [
                ("strict".to_owned(), Some(0.5), true),
                ("lenient".to_owned(), Some(5.0), false),
                ("plain".to_owned(), Some(1.0), true),
            ]
        );
        // A `threshold` transform after `enrich` opens anomalies by the overridden flags.
        let config =
            crate::ThresholdConfig { n: 1, m: None, hysteresis: 1, emit: crate::Emit::default() };
        let mut threshold = crate::Threshold::new(&config);
        let mut events = Outputs::new("threshold");
        threshold.process_batch(Batch::Scores(matched), &mut events);
        let opened: Vec<String> = events
            .take_main()
            .into_iter()
            .flat_map(|batch| match batch {
                Batch::Events(events) => events,
                other => panic!("{other:?}"),
            })
            .map(|event| event.device.name().to_string())
            .collect();
        assert_eq!(opened, ["strict", "plain"]);
    }
}
