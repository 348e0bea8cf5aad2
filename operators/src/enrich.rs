//! `enrich`: joins scores or anomaly events with the device catalog, adding the catalog's
//! fields as labels.
//!
//! Its inputs are the records and a `catalog` source (whose updates are raw messages, see
//! [`tidewatch_api::catalog`]). The catalog is a differential collection of row *versions*
//! arranged by device, each valid from an event time on; each record is joined with the
//! version valid at its own event time (an as-of join: the newest version valid at or before
//! it), looked up in the arrangement: a batch's records, in device order, read it with one
//! forward pass of a cursor, so records never enter the dataflow. A version is valid from
//! the row's `valid_from`, when the catalog gives one, or else from the greatest event time
//! of the records this instance has seen when the update reaches it: an update applies to the
//! records after it in event time, and a record of an earlier time that arrives later still
//! gets the row as it was. A retracted row is a version
//! that says "not in the catalog". Versions that no record on time can use any more (followed
//! by a newer one valid at or before the watermark) are dropped; a late record takes the
//! oldest version kept.
//!
//! A record whose device has a row at its time leaves on `<id>.matched` with `site`, `asset`,
//! `owner` and the row's free labels added (they replace labels of the same name), one whose
//! device has none leaves on `<id>.unmatched`, unchanged, and is counted
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
//! use tidewatch_api::{Batch, ComponentContext, DeviceId, Outputs, Schema, Score, Transform};
//! use tidewatch_operators::Enrich;
//!
//! let ctx = ComponentContext::for_test("enrich", "enrich");
//! let mut enrich = Enrich::new(&ctx);
//! let mut out = Outputs::new("enrich");
//! let row = CatalogRow {
//!     device: "p1".into(), site: "north".into(), asset: "pump".into(), ..Default::default()
//! };
//! enrich.process_batch(Batch::Catalog(vec![CatalogUpdate::new(1, row)]), &mut out);
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

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;

use differential_dataflow::input::{Input, InputSession};
use differential_dataflow::operators::arrange::TraceAgent;
use differential_dataflow::trace::TraceReader;
use differential_dataflow::trace::cursor::{Cursor, cursor_list};
use differential_dataflow::trace::implementations::ValSpine;
use serde::Deserialize;
use tidewatch_api::catalog::{CatalogRow, CatalogUpdate, TextPool};
use tidewatch_api::prometheus::{IntCounter, Opts};
use tidewatch_api::{
    AnomalyEvent, Batch, ComponentContext, ComponentError, ConfigError, DeviceId, EventTime, Kind,
    Labels, Outputs, PortType, Score, Transform, TransformFactory, TransformProperties,
    ValidateContext,
};
use timely::dataflow::ProbeHandle;
use timely::dataflow::operators::Probe;
use timely::progress::frontier::{Antichain, AntichainRef};

use crate::dataflow::Local;
use crate::util::IdHash;

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
        vec![Kind::Catalog, Kind::Scores, Kind::Events]
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
            catalog_side_input: true,
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
    /// Its event time: the catalog as it stood then applies.
    fn time(&self) -> EventTime;
    fn labels_mut(&mut self) -> &mut Labels;
    /// Takes what else of the device's row applies to the record.
    fn apply(&mut self, _row: &Row) {}
}

impl Labelled for Score {
    fn device(&self) -> DeviceId {
        self.device
    }
    fn time(&self) -> EventTime {
        self.end_ms
    }
    fn labels_mut(&mut self) -> &mut Labels {
        &mut self.labels
    }
    /// The row's threshold override replaces the detector's threshold: the score's
    /// `threshold`, and its `anomaly` flag as the detectors set it (score above threshold),
    /// so that a `threshold` transform after `enrich` debounces by the device's own bound.
    fn apply(&mut self, row: &Row) {
        if let Some(bound) = row.threshold {
            self.threshold = Some(bound);
            self.anomaly = self.score > bound;
        }
    }
}

impl Labelled for AnomalyEvent {
    fn device(&self) -> DeviceId {
        self.device
    }
    fn time(&self) -> EventTime {
        self.time_ms
    }
    fn labels_mut(&mut self) -> &mut Labels {
        &mut self.labels
    }
}

/// What a catalog row gives the records it matches: its labels and its threshold override.
#[derive(Debug)]
struct Row {
    labels: Labels,
    threshold: Option<f32>,
}

/// One version of a device's row: valid from its event time on, and the row's number in
/// [`Enrich::rows`] (`None`: the device is not in the catalog from then on). The dataflow
/// holds versions as small copyable values; the rows stay out of it, once each.
type Version = (EventTime, Option<u64>);

/// The catalog's versions arranged by device: what records are looked up in.
type CatalogTrace = TraceAgent<ValSpine<DeviceId, Version, u64, isize>>;

/// The `enrich` transform (see the module documentation).
pub struct Enrich {
    local: Local,
    /// The catalog's versions, by device.
    catalog: InputSession<u64, (DeviceId, Version), isize>,
    /// The catalog's arrangement, read by the records' lookups.
    trace: CatalogTrace,
    probe: ProbeHandle<u64>,
    /// The rows of the versions in the collection, by number.
    rows: HashMap<u64, Row, IdHash>,
    next_row: u64,
    /// Label names and values, shared by the label sets that have them (sites, owners repeat).
    strings: TextPool,
    /// Label sets, shared by the rows that have the same (devices of a site and asset type):
    /// the records of all of them then take one set, which stays in the cache. By a hash of
    /// their pairs, so that a row whose set is known builds none.
    label_sets: HashMap<u64, Vec<Labels>, IdHash>,
    /// The greatest event time of the records seen: where an update without `valid_from`
    /// takes effect.
    position: EventTime,
    /// The greatest watermark the record batches came with: versions superseded before it
    /// are dropped.
    watermark: EventTime,
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
        let probe = ProbeHandle::new();
        let probe_in = probe.clone();
        let (catalog, trace) = local.worker.dataflow::<u64, _, _>(move |scope| {
            let (catalog_in, catalog) = scope.new_collection::<(DeviceId, Version), isize>();
            let arranged = catalog.arrange_by_key();
            arranged.stream.probe_with(&probe_in);
            (catalog_in, arranged.trace)
        });
        let unmatched_total = ctx
            .shared(|| unmatched_counter(ctx))
            .map(|counter| counter.as_ref().clone())
            .map_err(|error| tracing::warn!(component = %ctx.component_id, "metrics: {error}"))
            .ok();
        Enrich {
            local,
            catalog,
            trace,
            probe,
            rows: HashMap::default(),
            next_row: 0,
            strings: TextPool::default(),
            label_sets: HashMap::default(),
            position: EventTime::MIN,
            watermark: EventTime::MIN,
            unmatched_total,
        }
    }

    /// Closes the round now open, runs the dataflow until the arrangement holds it, and lets
    /// the arrangement compact what came before.
    fn advance(&mut self) {
        self.local.round += 1;
        self.catalog.advance_to(self.local.round);
        self.catalog.flush();
        self.local.settle(&self.probe);
        let frontier = [self.local.round];
        self.trace.set_logical_compaction(AntichainRef::new(&frontier));
        self.trace.set_physical_compaction(AntichainRef::new(&frontier));
    }

    /// Applies a batch of catalog updates: per device, the row it ends with (the last one
    /// inserted; none when it was only retracted) becomes a version, valid from the row's
    /// `valid_from` or, without one, from the greatest event time of the records seen.
    fn apply_catalog(&mut self, updates: &[CatalogUpdate]) {
        // The updates by device, in the order they came: the arrangement is read in one pass.
        let mut order: Vec<(DeviceId, usize)> = updates
            .iter()
            .enumerate()
            .map(|(at, update)| (DeviceId::intern(&update.row.device), at))
            .collect();
        order.sort_unstable();
        let mut ending: Vec<(DeviceId, Option<&CatalogRow>)> = Vec::with_capacity(order.len());
        for (device, at) in order {
            let update = &updates[at];
            let row = (update.diff > 0).then_some(&*update.row);
            match ending.last_mut() {
                Some((last, ends_with)) if *last == device => {
                    if row.is_some() {
                        *ends_with = row;
                    }
                }
                _ => ending.push((device, row)),
            }
        }
        let mut read = versions_reader(&mut self.trace);
        let mut list = Vec::new();
        for (device, row) in ending {
            let from = row.as_ref().and_then(|row| row.valid_from).unwrap_or(self.position);
            let number = row.map(|row| self.add_row(row));
            read(device, &mut list);
            self.set_version(device, &mut list, (from, number));
        }
        self.advance();
    }

    /// Adds a version of `device`, whose versions in the arrangement are `list` (oldest
    /// first), replacing one valid from the same time; then drops the versions no record on
    /// time can use any more: those followed by one valid at or before the watermark.
    fn set_version(&mut self, device: DeviceId, list: &mut Vec<Version>, version: Version) {
        let mut dropped = Vec::new();
        let at = list.partition_point(|(from, _)| *from < version.0);
        if list.get(at).is_some_and(|(from, _)| *from == version.0) {
            dropped.push(std::mem::replace(&mut list[at], version));
        } else {
            list.insert(at, version);
        }
        self.catalog.insert((device, version));
        let watermark = self.watermark;
        let keep_from = list.iter().rposition(|(from, _)| *from <= watermark).unwrap_or(0);
        dropped.extend(list.drain(..keep_from));
        // A device whose only version says "not in the catalog" needs none.
        if let [(from, None)] = list.as_slice()
            && *from <= watermark
        {
            dropped.push(list.remove(0));
        }
        for old in dropped {
            self.catalog.remove((device, old));
            if let Some(number) = old.1 {
                self.rows.remove(&number);
            }
        }
    }

    /// Keeps a row's labels and threshold under a new number.
    fn add_row(&mut self, row: &CatalogRow) -> u64 {
        let labels = self.label_set(row);
        let number = self.next_row;
        self.next_row += 1;
        self.rows.insert(number, Row { labels, threshold: row.threshold.map(|t| t.0) });
        number
    }

    /// The one copy of the label set of `row`.
    fn label_set(&mut self, row: &CatalogRow) -> Labels {
        let mut pairs: Vec<(&str, &str)> = row.label_pairs().collect();
        Labels::order(&mut pairs);
        let hash = IdHash.hash_one(&pairs);
        let known = self.label_sets.get(&hash).and_then(|sets| {
            sets.iter().find(|labels| labels.iter().eq(pairs.iter().copied())).cloned()
        });
        if let Some(labels) = known {
            return labels;
        }
        let labels = Labels::from_pairs(
            pairs.iter().map(|(name, value)| (self.strings.get(name), self.strings.get(value))),
        );
        self.label_sets.entry(hash).or_default().push(labels.clone());
        labels
    }

    /// Joins `records` with the catalog as it stood at each record's event time: the matched
    /// ones labelled, and the unmatched ones. Each record is looked up in the catalog's
    /// arrangement (the records in device order, one forward pass of a cursor over it).
    fn join<R: Labelled>(&mut self, records: Vec<R>, watermark: EventTime) -> (Vec<R>, Vec<R>) {
        self.watermark = self.watermark.max(watermark);
        let mut order: Vec<(DeviceId, usize)> = Vec::with_capacity(records.len());
        for (index, record) in records.iter().enumerate() {
            self.position = self.position.max(record.time());
            order.push((record.device(), index));
        }
        order.sort_unstable();
        // The newest version each record may use: valid at or before its time.
        let mut picked: Vec<Option<Version>> = vec![None; records.len()];
        let mut read = versions_reader(&mut self.trace);
        // The versions in the catalog now of the device being looked up, oldest first.
        let mut present: Vec<Version> = Vec::new();
        let mut looked_up: Option<DeviceId> = None;
        for (device, index) in order {
            if looked_up != Some(device) {
                looked_up = Some(device);
                read(device, &mut present);
            }
            let time = records[index].time();
            picked[index] = present.iter().rev().find(|(from, _)| *from <= time).copied();
        }
        let mut matched = Vec::new();
        let mut unmatched = Vec::new();
        for (mut record, version) in records.into_iter().zip(picked) {
            match version.and_then(|(_, number)| self.rows.get(&number?)) {
                Some(row) => {
                    let labels = record.labels_mut();
                    *labels = labels.merged(&row.labels);
                    record.apply(row);
                    matched.push(record);
                }
                _ => unmatched.push(record),
            }
        }
        (matched, unmatched)
    }

    fn count_unmatched(&self, count: usize) {
        if let Some(counter) = &self.unmatched_total {
            counter.inc_by(count as u64);
        }
    }
}

/// A reader of the catalog's arrangement as it stands: called with devices in ascending
/// order, it fills `list` with each one's versions, oldest first (one forward pass of a
/// cursor).
fn versions_reader(trace: &mut CatalogTrace) -> impl FnMut(DeviceId, &mut Vec<Version>) + use<> {
    let batches = trace.batches_through(Antichain::new().borrow()).unwrap_or_default();
    let (mut cursor, storage) = cursor_list(batches);
    move |device, list| {
        list.clear();
        cursor.seek_key(&storage, &device);
        if cursor.get_key(&storage) != Some(&device) {
            return;
        }
        while let Some(version) = cursor.get_val(&storage) {
            let version = *version;
            let mut count = 0;
            cursor.map_times(&storage, |_, diff| count += *diff);
            if count > 0 {
                list.push(version);
            }
            cursor.step_val(&storage);
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
            Batch::Catalog(updates) => self.apply_catalog(&updates),
            Batch::Scores(scores) => {
                let (matched, unmatched) = self.join(scores, out.batch_watermark());
                self.count_unmatched(unmatched.len());
                out.emit_to(0, Batch::Scores(matched));
                out.emit_to(1, Batch::Scores(unmatched));
            }
            Batch::Events(events) => {
                let (matched, unmatched) = self.join(events, out.batch_watermark());
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
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use tidewatch_api::Schema;
    use tidewatch_api::catalog::{CatalogRow, CatalogUpdate};

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
        Batch::Catalog(
            list.iter().map(|(diff, row)| CatalogUpdate::new(*diff, row.clone())).collect(),
        )
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

    impl Enrich {
        /// The versions of `device` in the catalog's arrangement, oldest first.
        fn versions_of(&mut self, device: DeviceId) -> Vec<Version> {
            let mut list = Vec::new();
            versions_reader(&mut self.trace)(device, &mut list);
            list
        }
    }

    #[test]
    fn records_take_the_catalog_as_it_stands_when_they_arrive() {
        let ctx = ComponentContext::for_test("enrich", "enrich");
        let mut enrich = Enrich::new(&ctx);
        let mut out = Outputs::new("enrich");
        enrich
            .process_batch(updates(&[(1, row("p1", "north")), (1, row("p2", "north"))]), &mut out);
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
        enrich.process_batch(Batch::Events(vec![event("p1"), event("p2"), event("p3")]), &mut out);
        let (main, unmatched) = sites(&mut out);
        assert_eq!(main, [("p1".into(), "south".into()), ("p3".into(), "east".into())]);
        assert_eq!(unmatched, ["p2"]);
        assert_eq!(enrich.unmatched_total.as_ref().map(IntCounter::get), Some(2));
    }

    /// Events of `device` at the given event times.
    fn events_at(device: &str, times: &[i64]) -> Batch {
        Batch::Events(
            times
                .iter()
                .map(|time| AnomalyEvent { time_ms: *time, started_ms: *time, ..event(device) })
                .collect(),
        )
    }

    /// The (time, site) of the matched events and the times of the unmatched ones.
    fn sites_at(out: &mut Outputs) -> (Vec<(i64, String)>, Vec<i64>) {
        let mut matched = Vec::new();
        let mut unmatched = Vec::new();
        for (port, batch) in out.take_named() {
            let Batch::Events(events) = batch else { panic!("{batch:?}") };
            for event in events {
                if port == 0 {
                    matched.push((event.time_ms, event.labels.get("site").unwrap_or("").into()));
                } else {
                    unmatched.push(event.time_ms);
                }
            }
        }
        (matched, unmatched)
    }

    #[test]
    fn an_update_applies_to_the_records_after_it_in_event_time() {
        let ctx = ComponentContext::for_test("enrich", "enrich");
        let mut enrich = Enrich::new(&ctx);
        let mut out = Outputs::new("enrich");
        let site = |s: &str| s.to_owned();
        // The first catalog applies to every time.
        enrich.process_batch(updates(&[(1, row("p1", "north"))]), &mut out);
        enrich.process_batch(events_at("p1", &[100]), &mut out);
        assert_eq!(sites_at(&mut out), (vec![(100, site("north"))], vec![]));

        // A move without valid_from takes effect where the stream stands (100): a record of
        // earlier time that comes later still has the old site.
        let moved = [(-1, row("p1", "north")), (1, row("p1", "south"))];
        enrich.process_batch(updates(&moved), &mut out);
        enrich.process_batch(events_at("p1", &[50, 100, 150]), &mut out);
        let expected = vec![(50, site("north")), (100, site("south")), (150, site("south"))];
        assert_eq!(sites_at(&mut out), (expected, vec![]));

        // A move with valid_from takes effect then, before or after the stream's position.
        let east = CatalogRow { valid_from: Some(200), ..row("p1", "east") };
        enrich.process_batch(updates(&[(-1, row("p1", "south")), (1, east.clone())]), &mut out);
        enrich.process_batch(events_at("p1", &[120, 199, 200, 250]), &mut out);
        let expected = vec![
            (120, site("south")),
            (199, site("south")),
            (200, site("east")),
            (250, site("east")),
        ];
        assert_eq!(sites_at(&mut out), (expected, vec![]));

        // Retired where the stream stands (250): later records are unmatched, earlier not.
        enrich.process_batch(updates(&[(-1, east)]), &mut out);
        enrich.process_batch(events_at("p1", &[240, 260]), &mut out);
        assert_eq!(sites_at(&mut out), (vec![(240, site("east"))], vec![260]));

        // Once the watermark passed them, superseded versions are dropped; the device's
        // retirement then needs no version at all.
        assert_eq!(enrich.versions_of(DeviceId::intern("p1")).len(), 4);
        out.set_batch_watermark(300);
        enrich.process_batch(events_at("p1", &[300]), &mut out);
        assert_eq!(sites_at(&mut out), (vec![], vec![300]));
        enrich.process_batch(updates(&[(1, row("p2", "west"))]), &mut out);
        enrich.process_batch(updates(&[(1, row("p1", "north"))]), &mut out);
        assert_eq!(enrich.versions_of(DeviceId::intern("p1")).len(), 1, "only the live row");
        enrich.process_batch(events_at("p1", &[310]), &mut out);
        assert_eq!(sites_at(&mut out), (vec![(310, site("north"))], vec![]));
    }

    #[test]
    fn a_device_retired_twice_where_the_stream_stands_stays_retired() {
        let ctx = ComponentContext::for_test("enrich", "enrich");
        let mut enrich = Enrich::new(&ctx);
        let mut out = Outputs::new("enrich");
        enrich.process_batch(updates(&[(1, row("p1", "north"))]), &mut out);
        enrich.process_batch(events_at("p1", &[100]), &mut out);
        out.take_named();
        // Two retirements at the same position: the second replaces the first with itself
        // (an insertion and a removal of one version in one round) and must not undo it.
        enrich.process_batch(updates(&[(-1, row("p1", "north"))]), &mut out);
        enrich.process_batch(updates(&[(-1, row("p1", "north"))]), &mut out);
        enrich.process_batch(events_at("p1", &[50, 150]), &mut out);
        assert_eq!(sites_at(&mut out), (vec![(50, "north".to_owned())], vec![150]));
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

    /// A step of the property test: catalog updates (diff, device, site, valid_from) or
    /// records (device, event time).
    #[derive(Clone, Debug)]
    enum Step {
        Catalog(Vec<(i64, usize, usize, Option<i64>)>),
        Records(Vec<(usize, i64)>),
    }

    fn steps() -> impl proptest::strategy::Strategy<Value = Vec<Step>> {
        use proptest::prelude::*;
        let update =
            (prop_oneof![Just(1i64), Just(-1i64)], 0usize..6, 0usize..3, (0i64..4, 0i64..100))
                .prop_map(|(diff, device, site, (with, from))| {
                    (diff, device, site, (with == 0).then_some(from))
                });
        let step = prop_oneof![
            1 => proptest::collection::vec(update, 0..6).prop_map(Step::Catalog),
            2 => proptest::collection::vec((0usize..7, 0i64..100), 0..12).prop_map(Step::Records),
        ];
        proptest::collection::vec(step, 0..20)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

        /// Catalog updates (moves, retractions, rows valid from a given time) and records of
        /// many devices in any order: each record gets the row an as-of lookup in the catalog's
        /// history finds (the newest version valid at or before its time), in input order.
        #[test]
        fn records_get_the_row_an_as_of_lookup_finds(steps in steps()) {
            let ctx = ComponentContext::for_test("enrich", "enrich");
            let mut enrich = Enrich::new(&ctx);
            let mut out = Outputs::new("enrich");
            let name = |device: usize| format!("prop-{device}");
            // The model: each device's versions by start, and the stream's position.
            let mut history: BTreeMap<usize, BTreeMap<i64, Option<usize>>> = BTreeMap::new();
            let mut position = EventTime::MIN;
            for step in steps {
                match step {
                    Step::Catalog(list) => {
                        let rows: Vec<(i64, CatalogRow)> = list
                            .iter()
                            .map(|(diff, device, site, from)| {
                                let row = CatalogRow { valid_from: *from, ..row(&name(*device), &format!("s{site}")) };
                                (*diff, row)
                            })
                            .collect();
                        enrich.process_batch(updates(&rows), &mut out);
                        let mut ending: BTreeMap<usize, Option<(usize, Option<i64>)>> = BTreeMap::new();
                        for (diff, device, site, from) in list {
                            if diff > 0 {
                                ending.insert(device, Some((site, from)));
                            } else {
                                ending.entry(device).or_insert(None);
                            }
                        }
                        for (device, row) in ending {
                            let from = row.and_then(|(_, from)| from).unwrap_or(position);
                            history.entry(device).or_default().insert(from, row.map(|(site, _)| site));
                        }
                    }
                    Step::Records(list) => {
                        let batch = Batch::Events(
                            list.iter()
                                .map(|(device, time)| AnomalyEvent {
                                    time_ms: *time,
                                    started_ms: *time,
                                    ..event(&name(*device))
                                })
                                .collect(),
                        );
                        enrich.process_batch(batch, &mut out);
                        let mut matched = Vec::new();
                        let mut unmatched = Vec::new();
                        for (device, time) in list {
                            position = position.max(time);
                            let site = history
                                .get(&device)
                                .and_then(|versions| versions.range(..=time).next_back())
                                .and_then(|(_, site)| *site);
                            match site {
                                Some(site) => matched.push((name(device), time, format!("s{site}"))),
                                None => unmatched.push((name(device), time)),
                            }
                        }
                        let mut got_matched = Vec::new();
                        let mut got_unmatched = Vec::new();
                        for (port, batch) in out.take_named() {
                            let Batch::Events(events) = batch else { panic!("{batch:?}") };
                            for event in events {
                                let device = event.device.name().to_string();
                                if port == 0 {
                                    let site = event.labels.get("site").unwrap_or("").to_owned();
                                    got_matched.push((device, event.time_ms, site));
                                } else {
                                    got_unmatched.push((device, event.time_ms));
                                }
                            }
                        }
                        proptest::prop_assert_eq!(got_matched, matched);
                        proptest::prop_assert_eq!(got_unmatched, unmatched);
                    }
                }
            }
        }
    }
}
