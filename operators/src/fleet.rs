//! `fleet`: rollups over the whole fleet and the exact top-N devices by score, maintained
//! incrementally as a differential dataflow.
//!
//! Each device's state is its latest record by event time (a score's `end_ms`, an event's
//! `time_ms`; of equal times the later one to arrive): its score, whether it is anomalous (a
//! score's `anomaly`, an event's `open`), and its `site` and `asset` labels (as `enrich` adds
//! them; `""` when missing). From the collection of device states the dataflow maintains:
//!
//! - anomalous devices per site and per asset type;
//! - devices, anomalous devices and their ratio over the fleet;
//! - the `top` devices by score (ties by device name), with their ranks.
//!
//! The rollups are one `count` over the states' standings (site, asset type, anomalous), an
//! input of their own apart from the scores, so that a new score of a device whose standing
//! did not change leaves the rollups alone. The top-N does not read every device each
//! round: an index of the devices by score bucket (buckets of under 1 % of a score, in score
//! order) gives the highest buckets that together hold at least `top` devices (a walk down
//! its few top buckets after each round); the devices in those buckets are the candidates,
//! which `Fleet` keeps in rank order (a sorted set), so the top is its first `top` entries.
//! A round costs what its changes touch, also when most devices share one score (a starting
//! fleet, whose first windows all score 0): the candidates are then most devices, but only
//! those that changed move.
//!
//! With `require_catalog`, only devices present in the catalog (a `catalog` source among the
//! inputs) count: a device retired from the catalog leaves every rollup and the top-N. The
//! catalog's changes take a device's latest state into the dataflow's input or out of it.
//!
//! The engine sends all of `fleet`'s input to one worker (it is *gathered*), so the answer is
//! the same whatever the number of workers and processes. What changed after each batch
//! leaves as scores (see [`FleetRecord`]): a rollup that went away is sent once more with
//! `score = 0` and the label `removed = "true"`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::ops::Bound::{Excluded, Included, Unbounded};
use std::sync::Arc;

use differential_dataflow::input::{Input, InputSession};
use serde::{Deserialize, Serialize};
use tidewatch_api::prometheus::{Gauge, GaugeVec, Opts};
use tidewatch_api::{
    AnomalyState, Batch, ComponentContext, ComponentError, ConfigError, DeviceId, EventTime, Kind,
    Labels, Outputs, PortType, Schema, Score, Transform, TransformFactory, TransformProperties,
    ValidateContext,
};
use timely::dataflow::ProbeHandle;

use crate::dataflow::{Captured, Local};
use crate::util::{DeviceTable, IdHash};

/// Options of the `fleet` transform.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// How many devices the top list holds (1 to 1000).
    #[serde(default = "default_top")]
    pub top: usize,
    /// Count only devices present in the catalog (a `catalog` source must be among the
    /// inputs); a retired device leaves the rollups.
    #[serde(default)]
    pub require_catalog: bool,
}

fn default_top() -> usize {
    10
}

/// The most devices `top` may ask for.
pub const MAX_TOP: usize = 1000;

/// Makes `fleet` transforms.
#[derive(Debug, Clone, Copy, Default)]
pub struct FleetFactory;

impl TransformFactory for FleetFactory {
    type Config = FleetConfig;

    fn accepts(&self, _config: &FleetConfig) -> Vec<Kind> {
        vec![Kind::Catalog, Kind::Scores, Kind::Events]
    }

    fn validate(&self, config: &FleetConfig, _ctx: &ValidateContext) -> Result<(), ConfigError> {
        if config.top == 0 || config.top > MAX_TOP {
            return Err(ConfigError::at_field("top", format!("must be 1 to {MAX_TOP}")));
        }
        Ok(())
    }

    fn output_type(
        &self,
        _config: &FleetConfig,
        input: &PortType,
        _ctx: &ValidateContext,
    ) -> Result<PortType, ConfigError> {
        match input.kind {
            Kind::Scores | Kind::Events => Ok(PortType::of(Kind::Scores)),
            _ => Err(ConfigError::new("`fleet` rolls up scores or anomaly events")
                .with_hint("give it the output of `enrich` (or of a detector or `threshold`)")),
        }
    }

    fn properties(&self, _config: &FleetConfig) -> TransformProperties {
        // Gathered: one instance sees the whole fleet. Its own watermark, as `enrich`'s.
        TransformProperties {
            gathered: true,
            catalog_side_input: true,
            assigns_event_time: true,
            ..TransformProperties::default()
        }
    }

    fn build(
        &self,
        config: &FleetConfig,
        ctx: &ComponentContext,
    ) -> Result<Box<dyn Transform>, ComponentError> {
        Ok(Box::new(Fleet::new(config, ctx)))
    }
}

/// A score as a totally ordered key (greater score, greater key); NaN never gets here.
fn score_key(score: f32) -> u32 {
    let bits = score.to_bits();
    if bits >> 31 == 1 { !bits } else { bits | 0x8000_0000 }
}

fn key_score(key: u32) -> f32 {
    f32::from_bits(if key >> 31 == 1 { key & 0x7fff_ffff } else { !key })
}

/// The histogram bucket of a score key: its top 16 bits (the sign, the exponent and 7 bits of
/// the mantissa). Buckets order like scores, and one spans less than 1 % of its scores.
fn bucket(key: u32) -> u32 {
    key >> 16
}

/// One device's state: its `site` and `asset` as indexes into [`Fleet::names`], whether it
/// is anomalous, its score key and its [`name_prefix`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DeviceState {
    prefix: u128,
    site: u32,
    asset: u32,
    anomalous: bool,
    score: u32,
}

/// What the rollups count a device by: its site, its asset type, whether it is anomalous.
type Standing = (u32, u32, bool);

/// What `fleet` knows of a device.
#[derive(Clone, Copy, Debug, Default)]
struct Known {
    /// With `require_catalog`: the catalog rows it has (it counts while it has one).
    rows: i64,
    /// Its latest record: event time, state.
    latest: Option<(EventTime, DeviceState)>,
}

/// What ranks a device in the top-N: its score key and its name prefix.
type Rank = (u32, u128);

impl DeviceState {
    fn standing(&self) -> Standing {
        (self.site, self.asset, self.anomalous)
    }

    fn rank(&self) -> Rank {
        (self.score, self.prefix)
    }
}

/// What a rollup counts devices by (sites and asset types as indexes into
/// [`Fleet::names`]): one `count` of the dataflow keeps them all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
enum Rollup {
    /// Anomalous devices at a site.
    Site(u32),
    /// Anomalous devices of an asset type.
    Asset(u32),
    /// Devices.
    Devices,
    /// Anomalous devices.
    Anomalous,
}

impl Rollup {
    /// The rollups a device of `standing` counts in.
    fn of((site, asset, flagged): Standing) -> impl Iterator<Item = Rollup> {
        [
            Some(Rollup::Devices),
            flagged.then_some(Rollup::Anomalous),
            flagged.then_some(Rollup::Site(site)),
            flagged.then_some(Rollup::Asset(asset)),
        ]
        .into_iter()
        .flatten()
    }
}

/// The first 16 bytes of a device name as a number: names that differ in them order like
/// their prefixes, so ties of score are mostly broken without looking names up.
fn name_prefix(name: &str) -> u128 {
    let mut bytes = [0u8; 16];
    let head = &name.as_bytes()[..name.len().min(16)];
    bytes[..head.len()].copy_from_slice(head);
    u128::from_be_bytes(bytes)
}

/// A top-N candidate: its score key reversed (best first), its name prefix, the device.
type Entry = (Reverse<u32>, u128, DeviceId);

/// The first `top` of `candidates` (in order: by score, best first, then by name prefix),
/// with devices of equal score and prefix ordered by their whole names: the exact top list.
fn first_by_score_then_name<'a>(
    candidates: impl Iterator<Item = &'a Entry>,
    top: usize,
) -> Vec<Entry> {
    let mut candidates = candidates.peekable();
    let mut chosen: Vec<Entry> = candidates.by_ref().take(top).copied().collect();
    let Some(&(score, prefix, _)) = chosen.last() else { return chosen };
    let same = |entry: &Entry| entry.0 == score && entry.1 == prefix;
    if candidates.peek().is_some_and(|entry| same(entry)) {
        // More devices share the last score and prefix than there are places left: take
        // them by name.
        let first_tie = chosen.iter().position(same).unwrap_or(0);
        let mut ties: Vec<(Arc<str>, Entry)> =
            chosen[first_tie..].iter().map(|entry| (entry.2.name(), *entry)).collect();
        ties.extend(
            candidates.take_while(|entry| same(entry)).map(|entry| (entry.2.name(), *entry)),
        );
        ties.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        chosen.truncate(first_tie);
        chosen.extend(ties.into_iter().take(top - first_tie).map(|(_, entry)| entry));
    }
    chosen
}

/// The rollups as they stand.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FleetView {
    /// Anomalous devices per site (sites with none are absent).
    pub sites: BTreeMap<String, u64>,
    /// Anomalous devices per asset type (types with none are absent).
    pub assets: BTreeMap<String, u64>,
    /// Devices counted.
    pub devices: u64,
    /// Anomalous devices.
    pub anomalous: u64,
    /// The top devices, best first: device, score, site, asset.
    pub top: Vec<(String, f32, String, String)>,
}

impl FleetView {
    /// Anomalous devices over devices; 0 for an empty fleet.
    pub fn rate(&self) -> f64 {
        if self.devices == 0 { 0.0 } else { self.anomalous as f64 / self.devices as f64 }
    }
}

/// The output records of `fleet`, all scores with `detector` = the component id, `device` =
/// `fleet` (or the device, for `top`), times = the greatest event time seen, and:
///
/// | `version` | labels | `score` | `values` |
/// |---|---|---|---|
/// | `site` | `rollup = "site"`, `site` | anomalous devices at the site | |
/// | `asset` | `rollup = "asset"`, `asset` | anomalous devices of the type | |
/// | `fleet` | `rollup = "fleet"` | anomalous / devices | `devices`, `anomalous` |
/// | `top` | `rollup = "top"`, `rank` (1 = worst), `site`, `asset` | the device's score | |
#[derive(Debug, Clone, Copy)]
pub struct FleetRecord;

/// The `fleet` transform (see the module documentation).
pub struct Fleet {
    component: Arc<str>,
    local: Local,
    /// The standings of the devices that count (they change rarely: a device's anomaly
    /// state, a move), apart from their scores, so that a new score does not churn the
    /// rollups.
    standings: InputSession<u64, (DeviceId, Standing), isize>,
    /// Count only devices with a catalog row. Only the states of devices that count are in
    /// the dataflow's input.
    require_catalog: bool,
    probe: ProbeHandle<u64>,
    /// The rollups' counts, as captured.
    captured: Captured<(Rollup, isize)>,
    /// The lowest bucket the top-N is chosen from: it and every bucket above it (`None`: no
    /// device counts).
    lowest_selected: Option<u32>,
    /// The devices that count, by score bucket.
    by_bucket: BTreeMap<u32, HashSet<DeviceId, IdHash>>,
    /// The top-N candidates (the devices in the selected buckets), in rank order.
    candidates: BTreeSet<Entry>,
    top: usize,
    /// What is known of each device: its catalog rows, its latest record.
    devices: DeviceTable<Known>,
    /// The site and asset names seen, by index (sites and asset types are few).
    names: Vec<Arc<str>>,
    indexes: HashMap<Arc<str>, u32>,
    /// The rollups' counts as they stand.
    current: BTreeMap<(Rollup, isize), isize>,
    view: FleetView,
    watermark: EventTime,
    empty: Arc<Schema>,
    fleet_columns: Arc<Schema>,
    gauges: Option<Arc<FleetGauges>>,
    /// True on the instance that receives the records (the first worker's).
    receives: bool,
}

impl fmt::Debug for Fleet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fleet")
            .field("component", &self.component)
            .field(
                "devices",
                &self.devices.iter().filter(|(_, known)| known.latest.is_some()).count(),
            )
            .finish_non_exhaustive()
    }
}

impl Fleet {
    /// An instance for one worker.
    pub fn new(config: &FleetConfig, ctx: &ComponentContext) -> Fleet {
        let mut local = Local::new();
        let captured: Captured<(Rollup, isize)> = Captured::default();
        let sink = captured.clone();
        let probe = ProbeHandle::new();
        let probe_in = probe.clone();
        let top = config.top.clamp(1, MAX_TOP);
        let standings = local.worker.dataflow::<u64, _, _>(move |scope| {
            let (standings_in, standings) = scope.new_collection::<(DeviceId, Standing), isize>();
            // Every rollup in one count: devices, anomalous devices, and those per site and
            // per asset type.
            standings
                .flat_map(|(_, standing)| Rollup::of(standing))
                .count()
                .inspect(move |(counted, time, diff)| {
                    sink.borrow_mut().push((*counted, *time, *diff));
                })
                .probe_with(&probe_in);
            standings_in
        });
        Fleet {
            component: Arc::clone(&ctx.component_id),
            local,
            standings,
            require_catalog: config.require_catalog,
            probe,
            captured,
            lowest_selected: None,
            by_bucket: BTreeMap::new(),
            candidates: BTreeSet::new(),
            top,
            devices: DeviceTable::default(),
            names: Vec::new(),
            indexes: HashMap::new(),
            current: BTreeMap::new(),
            view: FleetView::default(),
            watermark: EventTime::MIN,
            empty: Arc::new(Schema::new(Vec::<String>::new())),
            fleet_columns: Arc::new(Schema::new(["devices", "anomalous"])),
            receives: true,
            gauges: ctx
                .shared(|| FleetGauges::new(ctx))
                .map_err(|error| tracing::warn!(component = %ctx.component_id, "metrics: {error}"))
                .ok(),
        }
    }

    /// The rollups as they stand after the last batch.
    pub fn view(&self) -> &FleetView {
        &self.view
    }

    /// Takes a device's new record into account.
    fn observe(&mut self, device: DeviceId, time: EventTime, record: Observed<'_>) {
        self.watermark = self.watermark.max(time);
        let known = self.latest(device);
        if known.is_some_and(|(seen, _)| seen > time) {
            return;
        }
        let prefix = known.map_or_else(|| name_prefix(&device.name()), |(_, old)| old.prefix);
        let state = DeviceState {
            prefix,
            site: self.index_of(record.site),
            asset: self.index_of(record.asset),
            anomalous: record.anomalous,
            score: score_key(record.score),
        };
        if self.counts(device) {
            self.replace(device, known.map(|(_, old)| old), Some(state));
        }
        self.devices.get_or_insert_with(device, Known::default).latest = Some((time, state));
    }

    /// Replaces a device's state (`None`: not counted) in the dataflow's input, when its
    /// standing changed, and in the index by score bucket and the candidates, when its rank
    /// changed.
    fn replace(&mut self, device: DeviceId, old: Option<DeviceState>, new: Option<DeviceState>) {
        let (old, new) = (old.as_ref(), new.as_ref());
        let standing = (old.map(DeviceState::standing), new.map(DeviceState::standing));
        replace_in(&mut self.standings, standing.0, standing.1, |standing| (device, standing));
        let (old, new) = (old.map(DeviceState::rank), new.map(DeviceState::rank));
        if old == new {
            return;
        }
        let (old_bucket, new_bucket) = (old.map(|r| bucket(r.0)), new.map(|r| bucket(r.0)));
        if old_bucket != new_bucket {
            if let Some(b) = old_bucket
                && let Some(devices) = self.by_bucket.get_mut(&b)
            {
                devices.remove(&device);
                if devices.is_empty() {
                    self.by_bucket.remove(&b);
                }
            }
            if let Some(b) = new_bucket {
                self.by_bucket.entry(b).or_default().insert(device);
            }
        }
        // The candidates follow the buckets selected now; the selection's own changes are
        // applied after the round (`select`).
        if let Some((score, prefix)) = old.filter(|(score, _)| self.selected(bucket(*score))) {
            self.candidates.remove(&(Reverse(score), prefix, device));
        }
        if let Some((score, prefix)) = new.filter(|(score, _)| self.selected(bucket(*score))) {
            self.candidates.insert((Reverse(score), prefix, device));
        }
    }

    /// True when the top-N is chosen from `bucket`.
    fn selected(&self, bucket: u32) -> bool {
        self.lowest_selected.is_some_and(|lowest| bucket >= lowest)
    }

    /// Selects the highest buckets of the index that together hold at least `top` devices
    /// (all of them when fewer), and applies the change: the devices of the buckets that came
    /// in become candidates, those of the buckets that left stop being.
    fn select(&mut self) {
        let mut devices = 0;
        let mut lowest = None;
        for (bucket, in_bucket) in self.by_bucket.iter().rev() {
            if devices >= self.top {
                break;
            }
            lowest = Some(*bucket);
            devices += in_bucket.len();
        }
        let before = std::mem::replace(&mut self.lowest_selected, lowest);
        // The buckets between the two bounds came in (the bound went down) or left (up).
        let (range, entering) = match (before, lowest) {
            (Some(before), Some(now)) if now < before => ((Included(now), Excluded(before)), true),
            (Some(before), Some(now)) if now > before => ((Included(before), Excluded(now)), false),
            (None, Some(now)) => ((Included(now), Unbounded), true),
            (Some(before), None) => ((Included(before), Unbounded), false),
            _ => return,
        };
        for devices in self.by_bucket.range(range).map(|(_, devices)| devices) {
            for device in devices {
                let Some((_, state)) = self.devices.get(*device).and_then(|known| known.latest)
                else {
                    continue;
                };
                let entry = (Reverse(state.score), state.prefix, *device);
                if entering {
                    self.candidates.insert(entry);
                } else {
                    self.candidates.remove(&entry);
                }
            }
        }
    }

    /// True when `device` counts in the rollups (always, without `require_catalog`).
    fn counts(&self, device: DeviceId) -> bool {
        !self.require_catalog || self.devices.get(device).is_some_and(|known| known.rows > 0)
    }

    /// The latest record of `device`: event time, state.
    fn latest(&self, device: DeviceId) -> Option<(EventTime, DeviceState)> {
        self.devices.get(device)?.latest
    }

    /// A catalog row of `device` was added (`diff = 1`) or retracted (`-1`): a device that
    /// enters or leaves the catalog brings its latest state into the rollups or takes it out.
    fn catalog_update(&mut self, device: DeviceId, diff: i64) {
        if !self.require_catalog {
            return;
        }
        let before = self.counts(device);
        let known = self.devices.get_or_insert_with(device, Known::default);
        known.rows += diff;
        let latest = known.latest;
        if known.rows == 0 && latest.is_none() {
            self.devices.remove(device);
        }
        let after = self.counts(device);
        if let Some((_, state)) = latest.filter(|_| before != after) {
            let (old, new) = if after { (None, Some(state)) } else { (Some(state), None) };
            self.replace(device, old, new);
        }
    }

    /// The index of a site or asset name in [`Fleet::names`].
    fn index_of(&mut self, name: &str) -> u32 {
        if let Some(index) = self.indexes.get(name) {
            return *index;
        }
        let index = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
        let name: Arc<str> = Arc::from(name);
        self.names.push(Arc::clone(&name));
        self.indexes.insert(name, index);
        index
    }

    /// A site or asset name by its index.
    fn name(&self, index: u32) -> String {
        self.names.get(index as usize).map(|name| name.to_string()).unwrap_or_default()
    }

    /// Closes the round, runs the dataflow and emits what changed.
    fn advance(&mut self, out: &mut Outputs) {
        self.local.round += 1;
        self.standings.advance_to(self.local.round);
        self.standings.flush();
        self.local.settle(&self.probe);
        let updates = std::mem::take(&mut *self.captured.borrow_mut());
        apply(&mut self.current, updates);
        self.select();
        // The top entries take their sites and asset types from the devices' latest states,
        // which may have changed without moving any rollup.
        let view = self.current_view();
        if view == self.view {
            return;
        }
        let records = self.changes(&view);
        if let Some(gauges) = &self.gauges {
            gauges.publish(&self.view, &view);
        }
        self.view = view;
        out.emit(Batch::Scores(records));
    }

    fn current_view(&self) -> FleetView {
        let mut view = FleetView::default();
        let count = |n: isize| u64::try_from(n).unwrap_or(0);
        let mut top = Vec::new();
        for (rollup, n) in self.current.keys() {
            match rollup {
                Rollup::Site(site) => drop(view.sites.insert(self.name(*site), count(*n))),
                Rollup::Asset(asset) => drop(view.assets.insert(self.name(*asset), count(*n))),
                Rollup::Devices => view.devices = count(*n),
                Rollup::Anomalous => view.anomalous = count(*n),
            }
        }
        for (Reverse(key), _, device) in first_by_score_then_name(self.candidates.iter(), self.top)
        {
            top.push((key, device.name(), device));
        }
        // Best first; equal scores by device name.
        top.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        for (key, name, device) in top {
            let (site, asset) = match self.latest(device) {
                Some((_, state)) => (self.name(state.site), self.name(state.asset)),
                None => (String::new(), String::new()),
            };
            view.top.push((name.to_string(), key_score(key), site, asset));
        }
        view
    }

    fn record(&self, device: &str, version: &str, score: f32, labels: Labels) -> Score {
        Score {
            device: DeviceId::intern(device),
            start_ms: self.watermark,
            end_ms: self.watermark,
            detector: Arc::clone(&self.component),
            version: Arc::from(version),
            score,
            threshold: None,
            anomaly: false,
            label: 0,
            columns: Arc::clone(&self.empty),
            values: Vec::new(),
            labels,
        }
    }

    /// The records for what differs between the last view and `view`.
    fn changes(&self, view: &FleetView) -> Vec<Score> {
        let mut records = Vec::new();
        for (rollup, old, new) in
            [("site", &self.view.sites, &view.sites), ("asset", &self.view.assets, &view.assets)]
        {
            for (name, count) in new {
                if old.get(name) != Some(count) {
                    let labels = Labels::from_pairs([("rollup", rollup), (rollup, name)]);
                    records.push(self.record("fleet", rollup, *count as f32, labels));
                }
            }
            for name in old.keys().filter(|name| !new.contains_key(*name)) {
                let labels =
                    Labels::from_pairs([("rollup", rollup), (rollup, name), ("removed", "true")]);
                records.push(self.record("fleet", rollup, 0.0, labels));
            }
        }
        if (view.devices, view.anomalous) != (self.view.devices, self.view.anomalous) {
            let mut record = self.record(
                "fleet",
                "fleet",
                view.rate() as f32,
                Labels::from_pairs([("rollup", "fleet")]),
            );
            record.columns = Arc::clone(&self.fleet_columns);
            record.values = vec![view.devices as f32, view.anomalous as f32];
            records.push(record);
        }
        let ranks = view.top.len().max(self.view.top.len());
        for index in 0..ranks {
            let rank = (index + 1).to_string();
            match (self.view.top.get(index), view.top.get(index)) {
                (old, Some(entry)) if old != Some(entry) => {
                    let (device, score, site, asset) = entry;
                    let labels = Labels::from_pairs([
                        ("rollup", "top"),
                        ("rank", rank.as_str()),
                        ("site", site.as_str()),
                        ("asset", asset.as_str()),
                    ]);
                    records.push(self.record(device, "top", *score, labels));
                }
                (Some(_), None) => {
                    let labels = Labels::from_pairs([
                        ("rollup", "top"),
                        ("rank", rank.as_str()),
                        ("removed", "true"),
                    ]);
                    records.push(self.record("fleet", "top", 0.0, labels));
                }
                _ => {}
            }
        }
        records
    }
}

/// Replaces the record of `old` in `input` with that of `new` (`None`: no record; `record`
/// makes a record of either), when they differ.
fn replace_in<T, D>(
    input: &mut InputSession<u64, D, isize>,
    old: Option<T>,
    new: Option<T>,
    record: impl Fn(T) -> D,
) where
    T: PartialEq,
    D: differential_dataflow::ExchangeData,
{
    if old == new {
        return;
    }
    if let Some(old) = old {
        input.remove(record(old));
    }
    if let Some(new) = new {
        input.insert(record(new));
    }
}

/// Adds captured `updates` to a collection kept as counts (records whose count drops to
/// zero leave it).
fn apply<D: Ord>(collection: &mut BTreeMap<D, isize>, updates: Vec<(D, u64, isize)>) {
    for (data, _, diff) in updates {
        match collection.entry(data) {
            std::collections::btree_map::Entry::Occupied(mut entry) => {
                *entry.get_mut() += diff;
                if *entry.get() == 0 {
                    entry.remove();
                }
            }
            std::collections::btree_map::Entry::Vacant(entry) => {
                entry.insert(diff);
            }
        }
    }
}

/// `fleet`'s view as Prometheus gauges, one set per component (only the instance that
/// receives the records sets them). Series: one per site and asset type with anomalous
/// devices, and `top` ranks.
struct FleetGauges {
    sites: GaugeVec,
    assets: GaugeVec,
    devices: Gauge,
    anomalous: Gauge,
    ratio: Gauge,
    top: GaugeVec,
}

impl FleetGauges {
    fn new(ctx: &ComponentContext) -> Result<FleetGauges, ComponentError> {
        let id = ctx.component_id.as_ref();
        let opts = |name: &str, help: &str| Opts::new(name, help).const_label("component_id", id);
        let failed = |error: tidewatch_api::prometheus::Error| {
            ComponentError::Internal(format!("fleet gauges: {error}"))
        };
        let vec = |name: &str, help: &str, labels: &[&str]| {
            GaugeVec::new(opts(name, help), labels).map_err(failed)
        };
        let one = |name: &str, help: &str| Gauge::with_opts(opts(name, help)).map_err(failed);
        let gauges = FleetGauges {
            sites: vec(
                "tidewatch_fleet_site_anomalous_devices",
                "Anomalous devices at a site.",
                &["site"],
            )?,
            assets: vec(
                "tidewatch_fleet_asset_anomalous_devices",
                "Anomalous devices of an asset type.",
                &["asset"],
            )?,
            devices: one("tidewatch_fleet_devices", "Devices counted by fleet.")?,
            anomalous: one("tidewatch_fleet_anomalous_devices", "Anomalous devices in the fleet.")?,
            ratio: one("tidewatch_fleet_anomaly_ratio", "Anomalous devices over devices.")?,
            top: vec(
                "tidewatch_fleet_top_score",
                "Score of the device at a rank of the fleet's top-N (1 = highest).",
                &["rank", "device"],
            )?,
        };
        if let Some(registry) = ctx.metrics_registry() {
            let registry = registry.registry();
            let collectors: [Box<dyn tidewatch_api::prometheus::core::Collector>; 6] = [
                Box::new(gauges.sites.clone()),
                Box::new(gauges.assets.clone()),
                Box::new(gauges.devices.clone()),
                Box::new(gauges.anomalous.clone()),
                Box::new(gauges.ratio.clone()),
                Box::new(gauges.top.clone()),
            ];
            for collector in collectors {
                registry.register(collector).map_err(failed)?;
            }
        }
        Ok(gauges)
    }

    /// Moves the gauges from view `old` to view `new`: series that went away are removed.
    fn publish(&self, old: &FleetView, new: &FleetView) {
        for (vec, old, new) in
            [(&self.sites, &old.sites, &new.sites), (&self.assets, &old.assets, &new.assets)]
        {
            for name in old.keys().filter(|name| !new.contains_key(*name)) {
                let _ = vec.remove_label_values(&[name.as_str()]);
            }
            for (name, count) in new {
                vec.with_label_values(&[name.as_str()]).set(*count as f64);
            }
        }
        self.devices.set(new.devices as f64);
        self.anomalous.set(new.anomalous as f64);
        self.ratio.set(new.rate());
        for (index, (device, ..)) in old.top.iter().enumerate() {
            if new.top.get(index).is_none_or(|entry| &entry.0 != device) {
                let _ = self.top.remove_label_values(&[(index + 1).to_string().as_str(), device]);
            }
        }
        for (index, (device, score, ..)) in new.top.iter().enumerate() {
            self.top
                .with_label_values(&[(index + 1).to_string().as_str(), device])
                .set(f64::from(*score));
        }
    }
}

/// What `fleet` keeps of a record.
#[derive(Clone, Copy, Debug)]
struct Observed<'a> {
    site: &'a str,
    asset: &'a str,
    anomalous: bool,
    score: f32,
}

impl<'a> Observed<'a> {
    fn of(labels: &'a Labels, anomalous: bool, score: f32) -> Observed<'a> {
        let label = |name: &str| labels.get(name).unwrap_or("");
        Observed { site: label("site"), asset: label("asset"), anomalous, score }
    }
}

/// One device in a checkpoint of `fleet`: its latest record.
#[derive(Debug, Serialize, Deserialize)]
struct SavedDevice {
    device: String,
    time_ms: EventTime,
    site: String,
    asset: String,
    anomalous: bool,
    score: f32,
}

/// A checkpoint of `fleet`: every device's latest record. The catalog is not in it: the
/// `catalog` source sends the whole catalog again when the pipeline starts.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Snapshot {
    devices: Vec<SavedDevice>,
}

impl Transform for Fleet {
    fn open(&mut self, ctx: &ComponentContext) -> Result<(), ComponentError> {
        self.receives = ctx.worker_index == 0;
        Ok(())
    }

    fn snapshot(&mut self) -> Result<Option<Vec<u8>>, ComponentError> {
        let mut devices: Vec<SavedDevice> = self
            .devices
            .iter()
            .filter_map(|(device, known)| Some((device, known.latest?)))
            .map(|(device, (time, state))| SavedDevice {
                device: device.name().to_string(),
                time_ms: time,
                site: self.name(state.site),
                asset: self.name(state.asset),
                anomalous: state.anomalous,
                score: key_score(state.score),
            })
            .collect();
        devices.sort_by(|a, b| a.device.cmp(&b.device));
        serde_json::to_vec(&Snapshot { devices })
            .map(Some)
            .map_err(|error| ComponentError::Internal(format!("fleet snapshot: {error}")))
    }

    /// Takes the devices of a snapshot (of any instance: the one that received the records
    /// holds them all); only the instance that receives the records keeps them. They count
    /// from the next batch on.
    fn restore(&mut self, state: &[u8]) -> Result<(), ComponentError> {
        let snapshot: Snapshot = serde_json::from_slice(state)
            .map_err(|error| ComponentError::Internal(format!("fleet snapshot: {error}")))?;
        if !self.receives {
            return Ok(());
        }
        for saved in snapshot.devices.iter().filter(|saved| !saved.score.is_nan()) {
            let record = Observed {
                site: &saved.site,
                asset: &saved.asset,
                anomalous: saved.anomalous,
                score: saved.score,
            };
            self.observe(DeviceId::intern(&saved.device), saved.time_ms, record);
        }
        Ok(())
    }

    fn process_batch(&mut self, batch: Batch, out: &mut Outputs) {
        match batch {
            Batch::Catalog(updates) => {
                for update in updates {
                    self.catalog_update(DeviceId::intern(&update.row.device), update.diff);
                }
            }
            Batch::Scores(scores) => {
                for score in scores {
                    if score.score.is_nan() {
                        out.discard("nan_score", 1);
                        continue;
                    }
                    let record = Observed::of(&score.labels, score.anomaly, score.score);
                    self.observe(score.device, score.end_ms, record);
                }
            }
            Batch::Events(events) => {
                for event in events {
                    if event.score.is_nan() {
                        out.discard("nan_score", 1);
                        continue;
                    }
                    let open = event.state == AnomalyState::Open;
                    let record = Observed::of(&event.labels, open, event.score);
                    self.observe(event.device, event.time_ms, record);
                }
            }
            other => out.discard("unsupported_kind", other.len() as u64),
        }
        self.advance(out);
    }
}

#[cfg(test)]
mod tests {
    use tidewatch_api::MetricsRegistry;
    use tidewatch_api::prometheus::Registry;

    use super::*;

    fn scored(device: &str, time: EventTime, score: f32, anomaly: bool, site: &str) -> Score {
        Score {
            device: DeviceId::intern(device),
            start_ms: time - 10,
            end_ms: time,
            detector: "m".into(),
            version: "1".into(),
            score,
            threshold: None,
            anomaly,
            label: 0,
            columns: Arc::new(Schema::new(Vec::<String>::new())),
            values: Vec::new(),
            labels: Labels::from_pairs([("site", site), ("asset", "pump")]),
        }
    }

    /// The series of a gauge family: label values (without `component_id`, in the order of
    /// their names) and value.
    fn series(registry: &Registry, name: &str) -> Vec<(Vec<String>, f64)> {
        let families = registry.gather();
        let Some(family) = families.iter().find(|family| family.name() == name) else {
            return Vec::new();
        };
        let mut series: Vec<(Vec<String>, f64)> = family
            .get_metric()
            .iter()
            .map(|metric| {
                let labels = metric
                    .get_label()
                    .iter()
                    .filter(|label| label.name() != "component_id")
                    .map(|label| label.value().to_owned())
                    .collect();
                (labels, metric.get_gauge().get_value())
            })
            .collect();
        series.sort_by(|a, b| a.0.cmp(&b.0));
        series
    }

    #[test]
    fn the_gauges_follow_the_view_and_drop_series_that_went_away() {
        let registry = Registry::new();
        let ctx = ComponentContext::for_test("rollups", "fleet")
            .with_metrics_registry(MetricsRegistry::new(registry.clone()));
        let config = FleetConfig { top: 2, require_catalog: false };
        let mut fleet = Fleet::new(&config, &ctx);
        let mut out = Outputs::new("rollups");
        let batch = vec![
            scored("p1", 10, 5.0, true, "north"),
            scored("p2", 10, 1.0, false, "north"),
            scored("p3", 10, 3.0, true, "south"),
        ];
        fleet.process_batch(Batch::Scores(batch), &mut out);
        let names = |values: &[&str]| values.iter().map(|value| value.to_string()).collect();
        assert_eq!(
            series(&registry, "tidewatch_fleet_site_anomalous_devices"),
            [(names(&["north"]), 1.0), (names(&["south"]), 1.0)]
        );
        assert_eq!(
            series(&registry, "tidewatch_fleet_top_score"),
            [(names(&["p1", "1"]), 5.0), (names(&["p3", "2"]), 3.0)]
        );
        assert_eq!(series(&registry, "tidewatch_fleet_anomaly_ratio"), [(vec![], 2.0 / 3.0)]);

        // p1 recovers and moves south, p2 climbs to the top.
        let batch =
            vec![scored("p1", 20, 0.5, false, "south"), scored("p2", 20, 4.0, true, "north")];
        fleet.process_batch(Batch::Scores(batch), &mut out);
        assert_eq!(
            series(&registry, "tidewatch_fleet_site_anomalous_devices"),
            [(names(&["north"]), 1.0), (names(&["south"]), 1.0)]
        );
        assert_eq!(
            series(&registry, "tidewatch_fleet_top_score"),
            [(names(&["p2", "1"]), 4.0), (names(&["p3", "2"]), 3.0)]
        );
        // p3 recovers: south has no anomalous device left and its series goes.
        fleet.process_batch(Batch::Scores(vec![scored("p3", 30, 0.1, false, "south")]), &mut out);
        assert_eq!(
            series(&registry, "tidewatch_fleet_site_anomalous_devices"),
            [(names(&["north"]), 1.0)]
        );
        assert_eq!(series(&registry, "tidewatch_fleet_devices"), [(vec![], 3.0)]);
    }

    #[test]
    fn a_restored_fleet_counts_the_devices_of_its_checkpoint() {
        let config = FleetConfig { top: 3, require_catalog: false };
        let mut before = Fleet::new(&config, &ComponentContext::for_test("rollups", "fleet"));
        let mut out = Outputs::new("rollups");
        let batch = vec![
            scored("p1", 10, 5.0, true, "north"),
            scored("p2", 10, 1.0, false, "north"),
            scored("p3", 12, 3.0, true, "south"),
            scored("p1", 20, 2.0, false, "south"),
        ];
        before.process_batch(Batch::Scores(batch), &mut out);
        let state = before.snapshot().expect("snapshot").expect("fleet has state");

        let opened = |worker: usize| {
            let ctx = ComponentContext::new(
                "rollups",
                "fleet",
                worker,
                2,
                Arc::new(tidewatch_api::PipelineInfo::default()),
                Arc::new(std::sync::atomic::AtomicBool::new(false)),
            );
            let mut fleet = Fleet::new(&config, &ctx);
            fleet.open(&ctx).expect("open");
            fleet.restore(&state).expect("restore");
            fleet
        };
        let mut after = opened(0);
        let mut other = opened(1);
        let next = || Batch::Scores(vec![scored("p4", 30, 4.0, true, "west")]);
        before.process_batch(next(), &mut out);
        after.process_batch(next(), &mut out);
        assert_eq!(after.view(), before.view());
        assert_eq!(after.view().devices, 4);
        assert_eq!(after.view().top[0].0, "p4");
        // An older record than the restored one does not replace it.
        after.process_batch(Batch::Scores(vec![scored("p1", 15, 9.0, true, "east")]), &mut out);
        assert_eq!(after.view(), before.view());
        // Only the instance that receives the records keeps them.
        other.process_batch(next(), &mut out);
        assert_eq!(other.view().devices, 1);
        assert!(
            Fleet::new(&config, &ComponentContext::for_test("r", "fleet"))
                .restore(b"not json")
                .is_err()
        );
    }

    #[test]
    fn score_keys_order_like_scores() {
        let scores = [f32::NEG_INFINITY, -2.5, -0.0, 0.0, 1e-9, 0.5, 3.0, f32::INFINITY];
        for pair in scores.windows(2) {
            assert!(score_key(pair[0]) <= score_key(pair[1]), "{pair:?}");
        }
        for score in scores {
            assert_eq!(key_score(score_key(score)).to_bits(), score.to_bits());
        }
    }
}
