//! The `prometheus` sink: per-device anomaly gauges and a top-N of the most anomalous devices,
//! served on the engine's `/metrics`.
//!
//! Families (labels from the configured record fields only, `device` by default):
//!
//! * `tidewatch_anomaly_score{..}`: the latest score;
//! * `tidewatch_reconstruction_error{..}`: the same value (an autoencoder's score is its
//!   reconstruction error), under the name dashboards look for;
//! * `tidewatch_anomaly_active{..}`: 1 while an anomaly is open. Once the sink has seen an
//!   anomaly event (open/close, from `threshold`) for a series, only events set it; before
//!   that, each score's `anomaly` flag does;
//! * `tidewatch_anomaly_topn{rank,device}`: the `top_n` devices with the highest score over the
//!   last `top_window_secs` of event time, rank 1 the highest;
//! * `tidewatch_prometheus_evicted_series_total`: series dropped by the `max_series` bound
//!   (least recently updated first).
//!
//! The gauges are per process: every worker's instance shares one set (kept in the run's
//! process-shared state, `ComponentContext::shared`), registered once per engine run and
//! component id, and unregistered when the run ends.
//!
//! **Checkpoints.** Each series and each top-N device remembers the worker whose instance
//! last updated it, and an instance snapshots those (so instances sharing the gauges store
//! each series once): per series its label values, its latest score and `active` flag with
//! their event times, and whether events set it; per device the scores of the top-N's
//! sliding maximum (those that can still rank within `top_window_secs`); and the window's
//! end. Entries go in least-recently-updated order, so a restore keeps the `max_series`
//! eviction order. A restore merges every snapshot into the shared state (a series' newer
//! value wins; a device's scores join its own) and sets the gauges and the top-N from it. A
//! changed `labels` option makes the snapshot's series meaningless: they are skipped (with a
//! warning) and the top-N alone is restored; a changed `top_window_secs`, `top_n` or
//! `max_series` applies to the restored state.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus::core::Collector;
use prometheus::{GaugeVec, IntCounter, Opts, Registry};

use crate::shared::{Registered, per_component};
use serde::{Deserialize, Serialize};
use tidewatch_api::{
    AnomalyEvent, AnomalyState, Batch, ComponentContext, ComponentError, ConfigError, EventTime,
    Kind, Score, Sink, SinkFactory, ValidateContext,
};

/// A record field usable as a label.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub enum LabelField {
    /// The device name.
    Device,
    /// The detector (component id or model name).
    Detector,
    /// The detector's or model's version.
    Version,
    /// One of the record's labels, by name (e.g. `site` or `owner`, which `enrich` adds from
    /// the device catalog); empty text when the record has none.
    Record(String),
}

/// Label names the sink's families use themselves.
const RESERVED_LABELS: [&str; 3] = ["component_id", "rank", "le"];

impl TryFrom<String> for LabelField {
    type Error = String;

    fn try_from(name: String) -> Result<LabelField, String> {
        Ok(match name.as_str() {
            "device" => LabelField::Device,
            "detector" => LabelField::Detector,
            "version" => LabelField::Version,
            _ => {
                let mut chars = name.chars();
                let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && !name.starts_with("__");
                if !valid {
                    return Err(format!(
                        "{name:?} is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*, not __...)"
                    ));
                }
                if RESERVED_LABELS.contains(&name.as_str()) {
                    return Err(format!("{name:?} is a label the sink sets itself"));
                }
                LabelField::Record(name)
            }
        })
    }
}

impl LabelField {
    /// The label name.
    pub fn name(&self) -> &str {
        match self {
            LabelField::Device => "device",
            LabelField::Detector => "detector",
            LabelField::Version => "version",
            LabelField::Record(name) => name,
        }
    }
}

fn default_labels() -> Vec<LabelField> {
    vec![LabelField::Device]
}
fn default_max_series() -> usize {
    10_000
}
fn default_top_n() -> usize {
    10
}
fn default_top_window_secs() -> u64 {
    300
}

/// Options of the `prometheus` sink.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrometheusSinkConfig {
    /// Record fields that become labels of the per-device gauges: `device`, `detector`,
    /// `version`, or the name of one of the record's labels (`site`, `owner`: what `enrich`
    /// adds from the catalog), each at most once. Nothing else of a record becomes a label.
    #[serde(default = "default_labels")]
    pub labels: Vec<LabelField>,
    /// Most label sets kept per gauge family; past it the least recently updated series is
    /// removed (counted in `tidewatch_prometheus_evicted_series_total`). Also bounds the
    /// devices the top-N tracks.
    #[serde(default = "default_max_series")]
    pub max_series: usize,
    /// Number of devices in `tidewatch_anomaly_topn`; 0 disables the family.
    #[serde(default = "default_top_n")]
    pub top_n: usize,
    /// Length of the sliding window of the top-N, in seconds of event time (a device's rank
    /// value is its highest score whose window ended in the last `top_window_secs`).
    #[serde(default = "default_top_window_secs")]
    pub top_window_secs: u64,
}

impl Default for PrometheusSinkConfig {
    fn default() -> Self {
        PrometheusSinkConfig {
            labels: default_labels(),
            max_series: default_max_series(),
            top_n: default_top_n(),
            top_window_secs: default_top_window_secs(),
        }
    }
}

impl PrometheusSinkConfig {
    /// Checks the options beyond their types.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.labels.is_empty() {
            return Err(ConfigError::at_field("labels", "labels must name at least one field")
                .with_hint("labels = [\"device\"]"));
        }
        for (index, label) in self.labels.iter().enumerate() {
            if self.labels[..index].contains(label) {
                return Err(ConfigError::at_field(
                    "labels",
                    format!("label {:?} is listed twice", label.name()),
                ));
            }
        }
        if self.max_series == 0 {
            return Err(ConfigError::at_field("max_series", "max_series must be at least 1"));
        }
        if self.top_n > 1_000 {
            return Err(ConfigError::at_field("top_n", "top_n must be at most 1000"));
        }
        if self.top_window_secs == 0 || self.top_window_secs > 366 * 86_400 {
            return Err(ConfigError::at_field(
                "top_window_secs",
                "top_window_secs must be between 1 and 31622400 (a year)",
            ));
        }
        Ok(())
    }
}

/// Makes `prometheus` sinks.
#[derive(Clone, Copy, Debug, Default)]
pub struct PrometheusSinkFactory;

impl SinkFactory for PrometheusSinkFactory {
    type Config = PrometheusSinkConfig;

    fn accepts(&self, _config: &PrometheusSinkConfig) -> Vec<Kind> {
        vec![Kind::Scores, Kind::Events]
    }

    fn validate(
        &self,
        config: &PrometheusSinkConfig,
        _ctx: &ValidateContext,
    ) -> Result<(), ConfigError> {
        config.validate()
    }

    fn build(
        &self,
        config: &PrometheusSinkConfig,
        ctx: &ComponentContext,
    ) -> Result<Box<dyn Sink>, ComponentError> {
        Ok(Box::new(PrometheusSink::for_context(config, ctx)?))
    }
}

// ---------------------------------------------------------------------------------------------
// Least-recently-updated order
// ---------------------------------------------------------------------------------------------

/// Keys in the order they were last touched: `touch` is O(log n).
#[derive(Debug)]
struct Lru<K> {
    stamps: HashMap<K, u64>,
    order: BTreeMap<u64, K>,
    clock: u64,
}

impl<K: Clone + Eq + Hash> Lru<K> {
    fn new() -> Lru<K> {
        Lru { stamps: HashMap::new(), order: BTreeMap::new(), clock: 0 }
    }

    /// Marks `key` as just updated; returns the keys evicted to stay within `bound`.
    fn touch(&mut self, key: &K, bound: usize) -> Vec<K> {
        self.clock += 1;
        if let Some(old) = self.stamps.insert(key.clone(), self.clock) {
            self.order.remove(&old);
        }
        self.order.insert(self.clock, key.clone());
        let mut evicted = Vec::new();
        while self.stamps.len() > bound {
            let Some((_, oldest)) = self.order.pop_first() else { break };
            self.stamps.remove(&oldest);
            evicted.push(oldest);
        }
        evicted
    }

    fn len(&self) -> usize {
        self.stamps.len()
    }

    /// Forgets `key`.
    fn remove(&mut self, key: &K) {
        if let Some(stamp) = self.stamps.remove(key) {
            self.order.remove(&stamp);
        }
    }

    /// The keys, least recently updated first.
    fn oldest_first(&self) -> impl Iterator<Item = &K> {
        self.order.values()
    }
}

// ---------------------------------------------------------------------------------------------
// Top-N over a sliding window, maintained incrementally
// ---------------------------------------------------------------------------------------------

/// A total order on scores (NaN lowest).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Ordered(f32);
impl Eq for Ordered {}
impl PartialOrd for Ordered {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Ordered {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let key = |value: f32| if value.is_nan() { f32::NEG_INFINITY } else { value };
        key(self.0).total_cmp(&key(other.0))
    }
}

/// Per device a monotonic deque of (time, score) (the sliding maximum), a set of the devices
/// ordered by their current maximum, and a set ordered by the time of each deque's front (so
/// the window's advance touches only devices whose maximum expires). Every update is
/// O(log devices) amortized; the top N is read off the ordered set.
#[derive(Debug)]
struct TopN {
    window_ms: i64,
    devices: HashMap<Arc<str>, VecDeque<(EventTime, f32)>>,
    by_score: BTreeSet<(Ordered, Arc<str>)>,
    by_front: BTreeSet<(EventTime, Arc<str>)>,
    now: EventTime,
}

impl TopN {
    fn new(window_secs: u64) -> TopN {
        TopN {
            window_ms: i64::try_from(window_secs.saturating_mul(1000)).unwrap_or(i64::MAX),
            devices: HashMap::new(),
            by_score: BTreeSet::new(),
            by_front: BTreeSet::new(),
            now: EventTime::MIN,
        }
    }

    fn unindex(&mut self, device: &Arc<str>) {
        if let Some(&(time, score)) = self.devices.get(device).and_then(VecDeque::front) {
            self.by_score.remove(&(Ordered(score), Arc::clone(device)));
            self.by_front.remove(&(time, Arc::clone(device)));
        }
    }

    fn index(&mut self, device: &Arc<str>) {
        match self.devices.get(device).and_then(VecDeque::front) {
            Some(&(time, score)) => {
                self.by_score.insert((Ordered(score), Arc::clone(device)));
                self.by_front.insert((time, Arc::clone(device)));
            }
            None => {
                self.devices.remove(device);
            }
        }
    }

    fn cutoff(&self) -> EventTime {
        self.now.saturating_sub(self.window_ms)
    }

    fn insert(&mut self, device: &Arc<str>, time: EventTime, score: f32) {
        self.unindex(device);
        let cutoff = self.cutoff();
        let deque = self.devices.entry(Arc::clone(device)).or_default();
        if time > cutoff {
            while deque.back().is_some_and(|&(_, last)| Ordered(last) <= Ordered(score)) {
                deque.pop_back();
            }
            deque.push_back((time, score));
        }
        self.index(device);
        if time > self.now {
            self.advance(time);
        }
    }

    /// Moves the window's end to `now` and expires what fell out of it.
    fn advance(&mut self, now: EventTime) {
        self.now = self.now.max(now);
        let cutoff = self.cutoff();
        while let Some((time, device)) = self.by_front.first().cloned() {
            if time > cutoff {
                break;
            }
            self.unindex(&device);
            if let Some(deque) = self.devices.get_mut(&device) {
                while deque.front().is_some_and(|&(time, _)| time <= cutoff) {
                    deque.pop_front();
                }
            }
            self.index(&device);
        }
    }

    fn remove(&mut self, device: &Arc<str>) {
        self.unindex(device);
        self.devices.remove(device);
    }

    /// The scores kept for `device` (oldest first): the candidates of its sliding maximum.
    fn scores(&self, device: &Arc<str>) -> impl Iterator<Item = (EventTime, f32)> + '_ {
        self.devices.get(device).into_iter().flatten().copied()
    }

    /// Joins `scores` to the ones kept for `device`, as if every score had been inserted in
    /// event-time order; joining the same scores again changes nothing.
    fn merge(&mut self, device: &Arc<str>, scores: impl IntoIterator<Item = (EventTime, f32)>) {
        self.unindex(device);
        let mut all: Vec<(EventTime, f32)> =
            self.devices.remove(device).map(Vec::from).unwrap_or_default();
        all.extend(scores);
        all.sort_by(|a, b| a.0.cmp(&b.0).then(Ordered(a.1).cmp(&Ordered(b.1))));
        all.dedup_by(|a, b| a.0 == b.0 && a.1.to_bits() == b.1.to_bits());
        let cutoff = self.cutoff();
        let deque = self.devices.entry(Arc::clone(device)).or_default();
        for (time, score) in all {
            if time <= cutoff {
                continue;
            }
            while deque.back().is_some_and(|&(_, last)| Ordered(last) <= Ordered(score)) {
                deque.pop_back();
            }
            deque.push_back((time, score));
        }
        self.index(device);
    }

    fn top(&self, n: usize) -> impl Iterator<Item = (&Arc<str>, f32)> {
        self.by_score.iter().rev().take(n).map(|(score, device)| (device, score.0))
    }
}

// ---------------------------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Series {
    /// An anomaly event was seen for the series: events alone set `active`.
    from_events: bool,
    /// The latest score and the end of its window (the score and reconstruction-error gauges).
    score: Option<(EventTime, f32)>,
    /// The latest `active` value and the event time it was set at.
    active: Option<(EventTime, bool)>,
    /// The worker whose instance last updated it (its checkpoints hold it).
    worker: usize,
}

impl Series {
    fn new(worker: usize) -> Series {
        Series { from_events: false, score: None, active: None, worker }
    }
}

#[derive(Debug)]
struct State {
    series: HashMap<Vec<String>, Series>,
    /// With record labels among `labels`: each series' key by its identity (see
    /// `Shared::identity`).
    identities: HashMap<Vec<String>, Vec<String>>,
    lru: Lru<Vec<String>>,
    top: TopN,
    top_devices: Lru<Arc<str>>,
    /// The worker whose instance last scored each device of `top_devices`.
    top_owners: HashMap<Arc<str>, usize>,
    /// The device published at each rank.
    published: Vec<Option<Arc<str>>>,
}

/// What one instance checkpoints (JSON).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Snapshot {
    /// The worker of the instance that took it.
    worker: usize,
    /// The label names of the series' values (the `labels` option).
    labels: Vec<String>,
    /// The end of the top-N's window (the greatest event time seen), ms.
    now_ms: EventTime,
    /// Its series, least recently updated first.
    series: Vec<SnapshotSeries>,
    /// Its top-N devices, least recently updated first.
    top: Vec<SnapshotDevice>,
}

/// A series: numbers as `f32::to_bits` (JSON has no NaN).
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotSeries {
    values: Vec<String>,
    from_events: bool,
    score: Option<(EventTime, u32)>,
    active: Option<(EventTime, bool)>,
}

/// A device's scores in the top-N's window, oldest first.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotDevice {
    device: String,
    scores: Vec<(EventTime, u32)>,
}

/// The newer of two timed values (on a tie the greater, so merging is order-independent).
fn newer<T: PartialOrd + Copy>(
    current: Option<(EventTime, T)>,
    restored: Option<(EventTime, T)>,
) -> Option<(EventTime, T)> {
    match (current, restored) {
        (Some(a), Some(b)) if b.0 > a.0 || (b.0 == a.0 && b.1 > a.1) => Some(b),
        (Some(a), _) => Some(a),
        (None, b) => b,
    }
}

/// The gauges of one sink component in one registry, shared by its workers.
#[derive(Debug)]
struct Shared {
    config: PrometheusSinkConfig,
    score: GaugeVec,
    error: GaugeVec,
    active: GaugeVec,
    topn: GaugeVec,
    evicted: IntCounter,
    /// The collectors' registration; dropping it unregisters them.
    registered: Option<Registered>,
    state: Mutex<State>,
}

fn collectors(shared: &Shared) -> Vec<Box<dyn Collector>> {
    vec![
        Box::new(shared.score.clone()),
        Box::new(shared.error.clone()),
        Box::new(shared.active.clone()),
        Box::new(shared.topn.clone()),
        Box::new(shared.evicted.clone()),
    ]
}

fn metric_error(error: prometheus::Error) -> ComponentError {
    ComponentError::Internal(format!("prometheus metric: {error}"))
}

impl Shared {
    fn new(
        config: &PrometheusSinkConfig,
        registry: &Registry,
        component_id: &str,
    ) -> Result<Shared, ComponentError> {
        let labels: Vec<&str> = config.labels.iter().map(|label| label.name()).collect();
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            GaugeVec::new(Opts::new(name, help).const_label("component_id", component_id), labels)
                .map_err(metric_error)
        };
        let mut shared = Shared {
            config: config.clone(),
            score: gauge(
                "tidewatch_anomaly_score",
                "Latest anomaly score of a device (greater is more anomalous).",
                &labels,
            )?,
            error: gauge(
                "tidewatch_reconstruction_error",
                "Latest reconstruction error of a device (the score of its detector).",
                &labels,
            )?,
            active: gauge(
                "tidewatch_anomaly_active",
                "1 while an anomaly of a device is open, else 0.",
                &labels,
            )?,
            topn: gauge(
                "tidewatch_anomaly_topn",
                "Highest score over the sliding window of the most anomalous devices, by rank.",
                &["rank", "device"],
            )?,
            evicted: IntCounter::with_opts(
                Opts::new(
                    "tidewatch_prometheus_evicted_series_total",
                    "Series removed by the max_series bound of a prometheus sink.",
                )
                .const_label("component_id", component_id),
            )
            .map_err(metric_error)?,
            registered: None,
            state: Mutex::new(State {
                series: HashMap::new(),
                identities: HashMap::new(),
                lru: Lru::new(),
                top: TopN::new(config.top_window_secs),
                top_devices: Lru::new(),
                top_owners: HashMap::new(),
                published: Vec::new(),
            }),
        };
        let registered = Registered::all(registry, collectors(&shared)).map_err(|error| {
            ComponentError::Config(format!(
                "cannot register the gauges of prometheus sink {component_id:?}: {error} \
                 (all prometheus sinks of a process must use the same `labels`)"
            ))
        })?;
        shared.registered = Some(registered);
        Ok(shared)
    }

    fn label_values(
        &self,
        device: &str,
        detector: &str,
        version: &str,
        labels: &tidewatch_api::Labels,
    ) -> Vec<String> {
        self.config
            .labels
            .iter()
            .map(|label| match label {
                LabelField::Device => device.to_owned(),
                LabelField::Detector => detector.to_owned(),
                LabelField::Version => version.to_owned(),
                LabelField::Record(name) => labels.get(name).unwrap_or_default().to_owned(),
            })
            .collect()
    }

    /// With record labels among `labels`: the values of the record's own fields (device,
    /// detector, version) of a series' key, which name the one series a record updates.
    fn identity(&self, key: &[String]) -> Option<Vec<String>> {
        let fixed = |label: &&LabelField| !matches!(label, LabelField::Record(_));
        if self.config.labels.iter().all(|label| fixed(&label)) {
            return None;
        }
        Some(
            self.config
                .labels
                .iter()
                .zip(key)
                .filter(|(label, _)| fixed(label))
                .map(|(_, value)| value.clone())
                .collect(),
        )
    }

    /// Removes a series from the state and its three gauges.
    fn remove_series(&self, state: &mut State, key: &[String]) {
        state.series.remove(key);
        if let Some(identity) = self.identity(key)
            && state.identities.get(&identity).is_some_and(|current| current == key)
        {
            state.identities.remove(&identity);
        }
        let values: Vec<&str> = key.iter().map(String::as_str).collect();
        let _ = self.score.remove_label_values(&values);
        let _ = self.error.remove_label_values(&values);
        let _ = self.active.remove_label_values(&values);
    }

    fn touch(&self, state: &mut State, key: &[String]) {
        let key = key.to_vec();
        // A device whose record labels changed (moved to another site) has one series: the
        // old one goes, so that it neither lingers nor keeps an alert firing.
        if let Some(identity) = self.identity(&key)
            && let Some(old) = state.identities.insert(identity, key.clone())
            && old != key
        {
            state.lru.remove(&old);
            self.remove_series(state, &old);
        }
        for old in state.lru.touch(&key, self.config.max_series) {
            self.remove_series(state, &old);
            self.evicted.inc();
        }
    }

    /// Makes `device` the most recently scored of the top-N, owned by `worker`.
    fn touch_top(&self, state: &mut State, device: &Arc<str>, worker: usize) {
        for old in state.top_devices.touch(device, self.config.max_series) {
            state.top.remove(&old);
            state.top_owners.remove(&old);
        }
        state.top_owners.insert(Arc::clone(device), worker);
    }

    fn write_scores(&self, state: &mut State, scores: &[Score], worker: usize) {
        for score in scores {
            let device = score.device.name();
            let key = self.label_values(&device, &score.detector, &score.version, &score.labels);
            let values: Vec<&str> = key.iter().map(String::as_str).collect();
            self.score.with_label_values(&values).set(f64::from(score.score));
            self.error.with_label_values(&values).set(f64::from(score.score));
            let series = state.series.entry(key.clone()).or_insert_with(|| Series::new(worker));
            series.worker = worker;
            series.score = Some((score.end_ms, score.score));
            if !series.from_events {
                self.active.with_label_values(&values).set(f64::from(u8::from(score.anomaly)));
                series.active = Some((score.end_ms, score.anomaly));
            }
            self.touch(state, &key);
            if self.config.top_n > 0 {
                self.touch_top(state, &device, worker);
                state.top.insert(&device, score.end_ms, score.score);
            }
        }
    }

    fn write_events(&self, state: &mut State, events: &[AnomalyEvent], worker: usize) {
        for event in events {
            let device = event.device.name();
            let key = self.label_values(&device, &event.detector, &event.version, &event.labels);
            let values: Vec<&str> = key.iter().map(String::as_str).collect();
            let open = event.state == AnomalyState::Open;
            self.active.with_label_values(&values).set(if open { 1.0 } else { 0.0 });
            let series = state.series.entry(key.clone()).or_insert_with(|| Series::new(worker));
            series.from_events = true;
            series.worker = worker;
            series.active = Some((event.time_ms, open));
            self.touch(state, &key);
        }
    }

    /// Publishes the current top N: rank r's series carries the device at rank r.
    fn publish_top(&self, state: &mut State) {
        let n = self.config.top_n;
        if n == 0 {
            return;
        }
        let current: Vec<(Arc<str>, f32)> =
            state.top.top(n).map(|(device, score)| (Arc::clone(device), score)).collect();
        state.published.resize(n, None);
        for rank in 0..n {
            let label = (rank + 1).to_string();
            let next = current.get(rank);
            if let Some(old) = &state.published[rank]
                && next.is_none_or(|(device, _)| device != old)
            {
                let _ = self.topn.remove_label_values(&[label.as_str(), &**old]);
            }
            match next {
                Some((device, score)) => {
                    self.topn
                        .with_label_values(&[label.as_str(), &**device])
                        .set(f64::from(*score));
                    state.published[rank] = Some(Arc::clone(device));
                }
                None => state.published[rank] = None,
            }
        }
    }

    /// Writes `batch`, from the instance of `worker`.
    fn write(&self, batch: &Batch, worker: usize) -> Result<(), ComponentError> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match batch {
            Batch::Scores(scores) => {
                self.write_scores(&mut state, scores, worker);
                self.publish_top(&mut state);
                Ok(())
            }
            Batch::Events(events) => {
                self.write_events(&mut state, events, worker);
                Ok(())
            }
            other => Err(ComponentError::Internal(format!(
                "the prometheus sink takes scores and anomaly events, not {}",
                other.kind().name()
            ))),
        }
    }

    fn advance(&self, watermark_ms: EventTime) {
        if self.config.top_n == 0 || watermark_ms == EventTime::MAX {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if watermark_ms > state.top.now {
            state.top.advance(watermark_ms);
            self.publish_top(&mut state);
        }
    }

    fn label_names(&self) -> Vec<String> {
        self.config.labels.iter().map(|label| label.name().to_owned()).collect()
    }

    /// The series and top-N devices the instance of `worker` last updated.
    fn snapshot(&self, worker: usize) -> Snapshot {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let series = state
            .lru
            .oldest_first()
            .filter_map(|key| Some((key, state.series.get(key)?)))
            .filter(|(_, series)| series.worker == worker)
            .map(|(key, series)| SnapshotSeries {
                values: key.clone(),
                from_events: series.from_events,
                score: series.score.map(|(time, score)| (time, score.to_bits())),
                active: series.active,
            })
            .collect();
        let top = state
            .top_devices
            .oldest_first()
            .filter(|device| state.top_owners.get(*device) == Some(&worker))
            .map(|device| SnapshotDevice {
                device: device.to_string(),
                scores: state
                    .top
                    .scores(device)
                    .map(|(time, score)| (time, score.to_bits()))
                    .collect(),
            })
            .filter(|device| !device.scores.is_empty())
            .collect();
        Snapshot { worker, labels: self.label_names(), now_ms: state.top.now, series, top }
    }

    /// Merges `snapshot` (new entries owned by `owner`) and sets the gauges from it.
    fn restore(&self, snapshot: Snapshot, owner: usize, component: &str) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if snapshot.labels == self.label_names() {
            for restored in snapshot.series {
                if restored.values.len() != self.config.labels.len() {
                    continue;
                }
                let series = state
                    .series
                    .entry(restored.values.clone())
                    .or_insert_with(|| Series::new(owner));
                series.from_events |= restored.from_events;
                series.score = newer(
                    series.score,
                    restored.score.map(|(time, bits)| (time, f32::from_bits(bits))),
                );
                series.active = newer(series.active, restored.active);
                let values: Vec<&str> = restored.values.iter().map(String::as_str).collect();
                if let Some((_, score)) = series.score {
                    self.score.with_label_values(&values).set(f64::from(score));
                    self.error.with_label_values(&values).set(f64::from(score));
                }
                if let Some((_, active)) = series.active {
                    self.active.with_label_values(&values).set(f64::from(u8::from(active)));
                }
                self.touch(&mut state, &restored.values);
            }
        } else if !snapshot.series.is_empty() {
            tracing::warn!(
                component,
                was = ?snapshot.labels,
                now = ?self.label_names(),
                "the checkpoint's prometheus series have other `labels`: they are not restored"
            );
        }
        if self.config.top_n == 0 {
            return;
        }
        if snapshot.now_ms > state.top.now && snapshot.now_ms != EventTime::MAX {
            state.top.advance(snapshot.now_ms);
        }
        for restored in snapshot.top {
            let device: Arc<str> = Arc::from(restored.device);
            if !state.top_devices.stamps.contains_key(&device) {
                self.touch_top(&mut state, &device, owner);
            }
            let scores =
                restored.scores.into_iter().map(|(time, bits)| (time, f32::from_bits(bits)));
            state.top.merge(&device, scores);
        }
        self.publish_top(&mut state);
    }
}

// ---------------------------------------------------------------------------------------------
// The sink
// ---------------------------------------------------------------------------------------------

/// One worker's handle on the shared gauges of a `prometheus` sink.
#[derive(Debug)]
pub struct PrometheusSink {
    shared: Arc<Shared>,
    /// This instance's worker and the number of workers.
    worker: usize,
    workers: usize,
    component: Arc<str>,
}

impl PrometheusSink {
    /// A sink registering its gauges in `registry` (unregistered when the last handle drops).
    pub fn new(
        config: &PrometheusSinkConfig,
        registry: &Registry,
        component_id: &str,
    ) -> Result<PrometheusSink, ComponentError> {
        config.validate().map_err(|error| ComponentError::Config(error.message))?;
        Ok(PrometheusSink {
            shared: Arc::new(Shared::new(config, registry, component_id)?),
            worker: 0,
            workers: 1,
            component: Arc::from(component_id),
        })
    }

    /// The sink of a worker: the gauges go to the engine's registry, shared with the other
    /// workers' instances of the same component. Outside an engine (no registry) the gauges
    /// live in a private registry.
    pub fn for_context(
        config: &PrometheusSinkConfig,
        ctx: &ComponentContext,
    ) -> Result<PrometheusSink, ComponentError> {
        config.validate().map_err(|error| ComponentError::Config(error.message))?;
        let shared = per_component(ctx, |metrics| {
            let private = Registry::new();
            let registry = metrics.map_or(&private, |metrics| metrics.registry());
            Shared::new(config, registry, &ctx.component_id)
        })?;
        Ok(PrometheusSink {
            shared,
            worker: ctx.worker_index,
            workers: ctx.workers.max(1),
            component: Arc::clone(&ctx.component_id),
        })
    }

    /// Series currently kept per gauge family.
    pub fn series(&self) -> usize {
        self.shared.state.lock().unwrap_or_else(PoisonError::into_inner).lru.len()
    }

    /// Series evicted so far by `max_series`.
    pub fn evicted(&self) -> u64 {
        self.shared.evicted.get()
    }
}

impl Sink for PrometheusSink {
    fn write_batch(&mut self, batch: Batch) -> Result<(), ComponentError> {
        self.shared.write(&batch, self.worker)
    }

    fn on_watermark(&mut self, watermark_ms: EventTime) -> Result<(), ComponentError> {
        self.shared.advance(watermark_ms);
        Ok(())
    }

    /// The series and top-N scores this instance last updated (JSON).
    fn snapshot(&mut self) -> Result<Option<Vec<u8>>, ComponentError> {
        serde_json::to_vec(&self.shared.snapshot(self.worker))
            .map(Some)
            .map_err(|error| ComponentError::Internal(format!("prometheus snapshot: {error}")))
    }

    /// Merges a snapshot into the shared state and sets the gauges and the top-N from it.
    fn restore(&mut self, state: &[u8]) -> Result<(), ComponentError> {
        let snapshot: Snapshot = serde_json::from_slice(state).map_err(|error| {
            ComponentError::Config(format!("not a prometheus sink snapshot: {error}"))
        })?;
        let owner = snapshot.worker % self.workers;
        self.shared.restore(snapshot, owner, &self.component);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use prometheus::{Encoder, TextEncoder};
    use tidewatch_api::{DeviceId, Schema};

    use super::*;

    fn score(device: &str, end_ms: EventTime, value: f32, anomaly: bool) -> Score {
        Score {
            device: DeviceId::intern(device),
            start_ms: end_ms - 1000,
            end_ms,
            detector: Arc::from("stats"),
            version: Arc::from("stats-1"),
            score: value,
            threshold: Some(5.0),
            anomaly,
            label: 0,
            columns: Arc::new(Schema::default()),
            values: Vec::new(),
            labels: Default::default(),
        }
    }

    fn event(device: &str, state: AnomalyState) -> AnomalyEvent {
        AnomalyEvent {
            device: DeviceId::intern(device),
            state,
            time_ms: 1000,
            started_ms: 1000,
            score: 9.0,
            peak_score: 9.0,
            threshold: Some(5.0),
            detector: Arc::from("stats"),
            version: Arc::from("stats-1"),
            label: 0,
            columns: Arc::new(Schema::default()),
            values: Vec::new(),
            labels: Default::default(),
        }
    }

    fn render(registry: &Registry) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&registry.gather(), &mut buffer).expect("encode");
        String::from_utf8(buffer).expect("utf-8")
    }

    fn count_series(text: &str, family: &str) -> usize {
        text.lines().filter(|line| line.starts_with(&format!("{family}{{"))).count()
    }

    #[test]
    fn record_labels_become_gauge_labels_and_a_moved_device_keeps_one_series() {
        let registry = Registry::new();
        let labels: Vec<LabelField> = ["device", "site", "owner"]
            .into_iter()
            .map(|name| LabelField::try_from(name.to_owned()).expect("a label name"))
            .collect();
        assert_eq!(labels[1], LabelField::Record("site".into()));
        let config = PrometheusSinkConfig { labels, ..Default::default() };
        let mut sink = PrometheusSink::new(&config, &registry, "sites").expect("sink");
        let at = |site: &str, open: bool| {
            let mut event =
                event("moving", if open { AnomalyState::Open } else { AnomalyState::Close });
            event.labels = tidewatch_api::Labels::from_pairs([("site", site), ("zone", "z")]);
            event
        };
        sink.write_batch(Batch::Events(vec![at("north", true)])).expect("write");
        let text = render(&registry);
        assert!(
            text.contains(
                "tidewatch_anomaly_active{component_id=\"sites\",device=\"moving\",owner=\"\",site=\"north\"} 1"
            ),
            "{text}"
        );
        // The device moves: its north series goes (no alert stays firing there).
        sink.write_batch(Batch::Events(vec![at("south", false)])).expect("write");
        let text = render(&registry);
        assert_eq!(count_series(&text, "tidewatch_anomaly_active"), 1, "{text}");
        assert!(text.contains("site=\"south\"} 0"), "{text}");
        assert_eq!(sink.series(), 1);
        // Names a label cannot have, or that the sink sets itself, are refused.
        for bad in ["1site", "si-te", "__name", "component_id", "rank", ""] {
            assert!(LabelField::try_from(bad.to_owned()).is_err(), "{bad}");
        }
    }

    #[test]
    fn cardinality_bound_holds_with_ten_times_more_devices() {
        let registry = Registry::new();
        let config = PrometheusSinkConfig { max_series: 50, top_n: 5, ..Default::default() };
        let mut sink = PrometheusSink::new(&config, &registry, "prom").expect("sink");
        for round in 0..3 {
            for device in 0..500 {
                let name = format!("card-{device:04}");
                let time = 1_000 * (round * 500 + device + 1) as EventTime;
                sink.write_batch(Batch::Scores(vec![score(&name, time, device as f32, false)]))
                    .expect("write");
                assert!(sink.series() <= 50);
            }
        }
        let text = render(&registry);
        for family in [
            "tidewatch_anomaly_score",
            "tidewatch_reconstruction_error",
            "tidewatch_anomaly_active",
        ] {
            assert_eq!(count_series(&text, family), 50, "{family}:\n{text}");
        }
        assert_eq!(count_series(&text, "tidewatch_anomaly_topn"), 5);
        // 1500 updates of 500 distinct devices, 50 kept: every update of a device not kept
        // evicts one.
        assert_eq!(sink.evicted(), 1500 - 50);
        assert!(
            text.contains("tidewatch_prometheus_evicted_series_total{component_id=\"prom\"} 1450")
        );
        // The most recently updated devices are the ones kept.
        assert!(text.contains("device=\"card-0499\""));
        assert!(
            !text.contains("tidewatch_anomaly_score{component_id=\"prom\",device=\"card-0100\"}")
        );
    }

    #[test]
    fn active_follows_events_once_seen_and_scores_before() {
        let registry = Registry::new();
        let mut sink =
            PrometheusSink::new(&PrometheusSinkConfig::default(), &registry, "p").expect("sink");
        sink.write_batch(Batch::Scores(vec![score("act-1", 1000, 9.0, true)])).expect("write");
        assert!(
            render(&registry)
                .contains("tidewatch_anomaly_active{component_id=\"p\",device=\"act-1\"} 1")
        );
        sink.write_batch(Batch::Events(vec![event("act-1", AnomalyState::Close)])).expect("write");
        assert!(
            render(&registry)
                .contains("tidewatch_anomaly_active{component_id=\"p\",device=\"act-1\"} 0")
        );
        // Events rule now: an exceeding score does not reopen it.
        sink.write_batch(Batch::Scores(vec![score("act-1", 2000, 9.0, true)])).expect("write");
        let text = render(&registry);
        assert!(text.contains("tidewatch_anomaly_active{component_id=\"p\",device=\"act-1\"} 0"));
        assert!(text.contains("tidewatch_anomaly_score{component_id=\"p\",device=\"act-1\"} 9"));
        assert!(
            text.contains("tidewatch_reconstruction_error{component_id=\"p\",device=\"act-1\"} 9")
        );
        sink.write_batch(Batch::Events(vec![event("act-1", AnomalyState::Open)])).expect("write");
        assert!(
            render(&registry)
                .contains("tidewatch_anomaly_active{component_id=\"p\",device=\"act-1\"} 1")
        );
    }

    #[test]
    fn labels_come_from_configured_fields_only() {
        let registry = Registry::new();
        let config = PrometheusSinkConfig {
            labels: vec![LabelField::Device, LabelField::Version],
            ..Default::default()
        };
        let mut sink = PrometheusSink::new(&config, &registry, "p").expect("sink");
        sink.write_batch(Batch::Scores(vec![score("lab-1", 1000, 2.0, false)])).expect("write");
        let text = render(&registry);
        assert!(
            text.contains(
                "tidewatch_anomaly_score{component_id=\"p\",device=\"lab-1\",version=\"stats-1\"} 2"
            ),
            "{text}"
        );
        assert!(!text.contains("detector="));
    }

    #[test]
    fn top_n_is_the_sliding_maximum() {
        let registry = Registry::new();
        let config = PrometheusSinkConfig { top_n: 2, top_window_secs: 10, ..Default::default() };
        let mut sink = PrometheusSink::new(&config, &registry, "p").expect("sink");
        sink.write_batch(Batch::Scores(vec![
            score("top-a", 1_000, 9.0, false),
            score("top-b", 2_000, 5.0, false),
            score("top-c", 3_000, 1.0, false),
        ]))
        .expect("write");
        let text = render(&registry);
        assert!(
            text.contains(
                "tidewatch_anomaly_topn{component_id=\"p\",device=\"top-a\",rank=\"1\"} 9"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "tidewatch_anomaly_topn{component_id=\"p\",device=\"top-b\",rank=\"2\"} 5"
            ),
            "{text}"
        );
        // a's 9 leaves the window at 11 s; its later low score stays.
        sink.write_batch(Batch::Scores(vec![score("top-a", 4_000, 0.5, false)])).expect("write");
        sink.on_watermark(11_500).expect("watermark");
        let text = render(&registry);
        assert!(
            text.contains(
                "tidewatch_anomaly_topn{component_id=\"p\",device=\"top-b\",rank=\"1\"} 5"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "tidewatch_anomaly_topn{component_id=\"p\",device=\"top-c\",rank=\"2\"} 1"
            ),
            "{text}"
        );
        assert_eq!(count_series(&text, "tidewatch_anomaly_topn"), 2);
        // Everything expires.
        sink.on_watermark(100_000).expect("watermark");
        assert_eq!(count_series(&render(&registry), "tidewatch_anomaly_topn"), 0);
    }

    #[test]
    fn workers_share_one_registration_and_drop_unregisters() {
        let registry = Registry::new();
        let metrics = tidewatch_api::MetricsRegistry::new(registry.clone());
        let ctx = |worker, shared: &tidewatch_api::ProcessShared| {
            ComponentContext::new(
                "shared-prom",
                "prometheus",
                worker,
                2,
                Arc::new(tidewatch_api::PipelineInfo::default()),
                Arc::new(std::sync::atomic::AtomicBool::new(false)),
            )
            .with_metrics_registry(metrics.clone())
            .with_process_shared(shared.clone())
        };
        let config = PrometheusSinkConfig::default();
        let run = tidewatch_api::ProcessShared::new();
        let mut first = PrometheusSink::for_context(&config, &ctx(0, &run)).expect("worker 0");
        let mut second = PrometheusSink::for_context(&config, &ctx(1, &run)).expect("worker 1");
        first.write_batch(Batch::Scores(vec![score("sh-1", 1000, 1.0, false)])).expect("write");
        second.write_batch(Batch::Scores(vec![score("sh-2", 1000, 2.0, false)])).expect("write");
        assert_eq!(count_series(&render(&registry), "tidewatch_anomaly_score"), 2);
        // The run ends: its instances and its process-shared state drop.
        drop(first);
        drop(second);
        drop(run);
        assert_eq!(count_series(&render(&registry), "tidewatch_anomaly_score"), 0);
        // A new run with the same registry registers again.
        let next = tidewatch_api::ProcessShared::new();
        let _again = PrometheusSink::for_context(&config, &ctx(0, &next)).expect("again");
    }

    #[test]
    fn options_are_checked() {
        let bad = |config: PrometheusSinkConfig| config.validate().is_err();
        assert!(bad(PrometheusSinkConfig { max_series: 0, ..Default::default() }));
        assert!(bad(PrometheusSinkConfig { labels: vec![], ..Default::default() }));
        assert!(bad(PrometheusSinkConfig {
            labels: vec![LabelField::Device, LabelField::Device],
            ..Default::default()
        }));
        assert!(bad(PrometheusSinkConfig { top_window_secs: 0, ..Default::default() }));
        // A record label by name; a name Prometheus refuses is an error of the option.
        let options =
            tidewatch_api::ConfigValue::parse("labels = [\"device\", \"site\"]").expect("toml");
        let config = options.deserialize::<PrometheusSinkConfig>().expect("a record label");
        assert_eq!(config.labels, [LabelField::Device, LabelField::Record("site".into())]);
        let options = tidewatch_api::ConfigValue::parse("labels = [\"my-site\"]").expect("toml");
        assert!(options.deserialize::<PrometheusSinkConfig>().is_err());
    }

    /// The sorted series of the families that carry state (not the eviction counter).
    fn state_lines(registry: &Registry) -> Vec<String> {
        let mut lines: Vec<String> = render(registry)
            .lines()
            .filter(|line| {
                [
                    "tidewatch_anomaly_score{",
                    "tidewatch_reconstruction_error{",
                    "tidewatch_anomaly_active{",
                    "tidewatch_anomaly_topn{",
                ]
                .iter()
                .any(|family| line.starts_with(family))
            })
            .map(str::to_owned)
            .collect();
        lines.sort();
        lines
    }

    fn snapshot_of(sink: &mut PrometheusSink) -> (Vec<u8>, serde_json::Value) {
        let state = sink.snapshot().expect("snapshot").expect("state");
        let value = serde_json::from_slice(&state).expect("JSON");
        (state, value)
    }

    #[test]
    fn snapshot_and_restore_keep_the_top_n_and_the_gauges() {
        let config = PrometheusSinkConfig { top_n: 3, top_window_secs: 10, ..Default::default() };
        let registry = Registry::new();
        let mut sink = PrometheusSink::new(&config, &registry, "p").expect("sink");
        sink.write_batch(Batch::Scores(vec![
            score("rs-a", 1_000, 9.0, true),
            score("rs-b", 2_000, 5.0, false),
            score("rs-c", 3_000, 1.0, false),
            score("rs-d", 4_000, 3.0, false),
            score("rs-a", 5_000, 2.0, false),
        ]))
        .expect("write");
        sink.write_batch(Batch::Events(vec![event("rs-b", AnomalyState::Open)])).expect("write");
        let before = state_lines(&registry);
        assert_eq!(before.iter().filter(|line| line.contains("topn")).count(), 3, "{before:?}");
        let (state, _) = snapshot_of(&mut sink);
        let fresh = Registry::new();
        let mut restored = PrometheusSink::new(&config, &fresh, "p").expect("sink");
        restored.restore(&state).expect("restore");
        assert_eq!(state_lines(&fresh), before);
        assert_eq!(restored.series(), sink.series());
        // It goes on alike: a's 9 leaves the window at 11 s (its 2 at 5 s stays), then b's
        // active flag follows events, not scores.
        for target in [&mut sink, &mut restored] {
            target.on_watermark(11_500).expect("watermark");
            target
                .write_batch(Batch::Scores(vec![score("rs-b", 12_000, 0.5, false)]))
                .expect("write");
        }
        let after = state_lines(&registry);
        assert_eq!(state_lines(&fresh), after);
        assert!(
            after.contains(
                &"tidewatch_anomaly_topn{component_id=\"p\",device=\"rs-d\",rank=\"1\"} 3"
                    .to_owned()
            ),
            "{after:?}"
        );
        assert!(
            after.contains(
                &"tidewatch_anomaly_active{component_id=\"p\",device=\"rs-b\"} 1".to_owned()
            ),
            "{after:?}"
        );
        // Other labels: the series are skipped, the top-N is restored.
        let relabelled = Registry::new();
        let config = PrometheusSinkConfig {
            labels: vec![LabelField::Device, LabelField::Detector],
            ..config
        };
        let mut other = PrometheusSink::new(&config, &relabelled, "p").expect("sink");
        other.restore(&state).expect("restore");
        assert_eq!(other.series(), 0);
        assert_eq!(count_series(&render(&relabelled), "tidewatch_anomaly_topn"), 3);
        assert!(matches!(other.restore(b"not a snapshot"), Err(ComponentError::Config(_))));
    }

    #[test]
    fn restores_merge_the_snapshots_of_every_instance() {
        let registry = Registry::new();
        let metrics = tidewatch_api::MetricsRegistry::new(registry.clone());
        let ctx = |worker, workers, shared: &tidewatch_api::ProcessShared| {
            ComponentContext::new(
                "merge-prom",
                "prometheus",
                worker,
                workers,
                Arc::new(tidewatch_api::PipelineInfo::default()),
                Arc::new(std::sync::atomic::AtomicBool::new(false)),
            )
            .with_metrics_registry(metrics.clone())
            .with_process_shared(shared.clone())
        };
        let config = PrometheusSinkConfig { top_n: 4, top_window_secs: 60, ..Default::default() };
        let run = tidewatch_api::ProcessShared::new();
        let mut zero = PrometheusSink::for_context(&config, &ctx(0, 2, &run)).expect("worker 0");
        let mut one = PrometheusSink::for_context(&config, &ctx(1, 2, &run)).expect("worker 1");
        zero.write_batch(Batch::Scores(vec![
            score("mg-a", 1_000, 7.0, false),
            score("mg-b", 2_000, 4.0, false),
        ]))
        .expect("write");
        one.write_batch(Batch::Scores(vec![
            score("mg-c", 1_500, 8.0, false),
            score("mg-d", 2_500, 1.0, false),
            score("mg-c", 3_000, 2.0, false),
        ]))
        .expect("write");
        one.write_batch(Batch::Events(vec![event("mg-d", AnomalyState::Open)])).expect("write");
        let before = state_lines(&registry);
        let (first, value) = snapshot_of(&mut zero);
        assert_eq!(value["series"].as_array().map(Vec::len), Some(2), "{value}");
        assert_eq!(value["top"].as_array().map(Vec::len), Some(2), "{value}");
        let (second, value) = snapshot_of(&mut one);
        assert_eq!(value["series"].as_array().map(Vec::len), Some(2), "{value}");
        // c keeps its 8 (the maximum) and its later 2 (the maximum once the 8 expires).
        let top = value["top"].as_array().expect("top");
        let c = top.iter().find(|device| device["device"] == "mg-c").expect("mg-c");
        assert_eq!(c["scores"].as_array().map(Vec::len), Some(2), "{value}");
        drop((zero, one, run));
        // One instance restores both (one of them twice): the same state.
        let fresh = Registry::new();
        let mut sink = PrometheusSink::new(&config, &fresh, "merge-prom").expect("sink");
        for state in [&second, &first, &second] {
            sink.restore(state).expect("restore");
        }
        assert_eq!(state_lines(&fresh), before);
        assert_eq!(count_series(&render(&fresh), "tidewatch_anomaly_topn"), 4);
        let (_, value) = snapshot_of(&mut sink);
        assert_eq!(value["series"].as_array().map(Vec::len), Some(4), "{value}");
        assert_eq!(value["top"].as_array().map(Vec::len), Some(4), "{value}");
        // The newer value of a series wins whatever the order.
        sink.write_batch(Batch::Scores(vec![score("mg-a", 9_000, 3.0, false)])).expect("write");
        sink.restore(&first).expect("restore");
        assert!(
            render(&fresh)
                .contains("tidewatch_anomaly_score{component_id=\"merge-prom\",device=\"mg-a\"} 3")
        );
    }
}
