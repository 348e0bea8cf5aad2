//! The fleet view (#14): `catalog` -> `enrich` -> `fleet`.
//!
//! - `fleet`'s rollups and top-N equal a brute-force recomputation over random update
//!   sequences (scores, devices moving between sites, catalog insertions and retirements);
//! - a pipeline gives the same fleet view on 1, 2 and 4 workers, equal to a brute-force
//!   recomputation over the enriched scores that entered `fleet`;
//! - a catalog file edited while the pipeline runs gives the later records the new site;
//! - so do a catalog on a Kafka compacted topic (the real broker on 127.0.0.1:9092: a new row
//!   for the key, a tombstone) and one in retained MQTT messages (the Mosquitto on
//!   127.0.0.1:1883: a new retained row, an empty retained payload); a Kafka catalog with
//!   `watch = false` reads its topic to the end and finishes;
//! - `fleet` with checkpoints, reading Kafka, stopped and started again: the second run counts
//!   the devices of the first with its own.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use common::{Running, json_lines, run, wait_until};
use proptest::prelude::*;
use tidewatch_api::catalog::{CatalogRow, CatalogUpdate};
use tidewatch_api::{Batch, ComponentContext, DeviceId, Labels, Outputs, Schema, Score, Transform};
use tidewatch_operators::{Fleet, FleetConfig, FleetView};

// ---------------------------------------------------------------------------------------------
// Brute force
// ---------------------------------------------------------------------------------------------

/// One device's latest record, as the brute force sees it.
#[derive(Clone, Debug)]
struct Latest {
    time: i64,
    score: f32,
    anomalous: bool,
    site: String,
    asset: String,
}

/// The fleet view of devices' latest records, recomputed from scratch.
fn brute_force(latest: &HashMap<String, Latest>, top: usize) -> FleetView {
    let mut view = FleetView::default();
    for state in latest.values() {
        view.devices += 1;
        if state.anomalous {
            view.anomalous += 1;
            *view.sites.entry(state.site.clone()).or_default() += 1;
            *view.assets.entry(state.asset.clone()).or_default() += 1;
        }
    }
    let mut ranked: Vec<(&String, &Latest)> = latest.iter().collect();
    ranked.sort_by(|a, b| b.1.score.total_cmp(&a.1.score).then_with(|| a.0.cmp(b.0)));
    view.top = ranked
        .into_iter()
        .take(top)
        .map(|(device, state)| {
            (device.clone(), state.score, state.site.clone(), state.asset.clone())
        })
        .collect();
    view
}

/// Keeps a record if it is the device's latest (by event time; the later of equal times).
fn observe(latest: &mut HashMap<String, Latest>, device: &str, record: Latest) {
    if latest.get(device).is_none_or(|seen| seen.time <= record.time) {
        latest.insert(device.to_owned(), record);
    }
}

// ---------------------------------------------------------------------------------------------
// The transform on its own: random update sequences
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    /// A score of device `device` at `time`, labelled with site and asset (a new site is a move).
    Score { device: u8, time: i64, score: f32, anomalous: bool, site: u8, asset: u8 },
    /// The device enters the catalog.
    Catalog(u8),
    /// The device leaves the catalog.
    Retire(u8),
}

/// Scores that tie often, scores that differ by less than one histogram bucket of `fleet`'s
/// top-N (1e-4 apart near 1), and negative ones.
fn score_value() -> impl Strategy<Value = f32> {
    prop_oneof![
        (0u8..8).prop_map(|value| f32::from(value) / 2.0),
        (0u16..50).prop_map(|step| 1.0 + f32::from(step) * 1e-4),
        (-4i8..4).prop_map(f32::from),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..12, 0i64..40, score_value(), any::<bool>(), 0u8..3, 0u8..2).prop_map(
            |(device, time, score, anomalous, site, asset)| Op::Score {
                device,
                time,
                score,
                anomalous,
                site,
                asset
            }
        ),
        1 => (0u8..12).prop_map(Op::Catalog),
        1 => (0u8..12).prop_map(Op::Retire),
    ]
}

fn score(device: &str, time: i64, value: f32, anomalous: bool, labels: Labels) -> Score {
    Score {
        device: DeviceId::intern(device),
        start_ms: time - 10,
        end_ms: time,
        detector: "test".into(),
        version: "1".into(),
        score: value,
        threshold: None,
        anomaly: anomalous,
        label: 0,
        columns: std::sync::Arc::new(Schema::new(Vec::<String>::new())),
        values: Vec::new(),
        labels,
    }
}

fn catalog_batch(device: &str, diff: i64) -> Batch {
    let row = CatalogRow { device: device.to_owned(), ..CatalogRow::default() };
    Batch::Catalog(vec![CatalogUpdate::new(diff, row)])
}

/// The view rebuilt from `fleet`'s output records alone (as a consumer of the stream would).
#[derive(Default)]
struct Replayed {
    sites: BTreeMap<String, u64>,
    assets: BTreeMap<String, u64>,
    devices: u64,
    anomalous: u64,
    top: BTreeMap<usize, (String, f32, String, String)>,
}

impl Replayed {
    fn apply(
        &mut self,
        version: &str,
        device: &str,
        score: f32,
        labels: &dyn Fn(&str) -> Option<String>,
        values: (f32, f32),
    ) {
        let removed = labels("removed").as_deref() == Some("true");
        match version {
            "site" | "asset" => {
                let map = if version == "site" { &mut self.sites } else { &mut self.assets };
                let name = labels(version).expect("named rollup");
                if removed {
                    map.remove(&name);
                } else {
                    map.insert(name, score as u64);
                }
            }
            "fleet" => (self.devices, self.anomalous) = (values.0 as u64, values.1 as u64),
            "top" => {
                let rank: usize = labels("rank").and_then(|r| r.parse().ok()).expect("rank");
                if removed {
                    self.top.remove(&rank);
                } else {
                    let entry = (
                        device.to_owned(),
                        score,
                        labels("site").unwrap_or_default(),
                        labels("asset").unwrap_or_default(),
                    );
                    self.top.insert(rank, entry);
                }
            }
            other => panic!("unknown fleet record {other}"),
        }
    }

    fn view(&self) -> FleetView {
        FleetView {
            sites: self.sites.clone(),
            assets: self.assets.clone(),
            devices: self.devices,
            anomalous: self.anomalous,
            top: self.top.values().cloned().collect(),
        }
    }
}

fn replay_scores(replayed: &mut Replayed, out: &mut Outputs) {
    for batch in out.take_main() {
        let Batch::Scores(scores) = batch else { panic!("fleet emits scores") };
        for record in scores {
            let values = (
                record.values.first().copied().unwrap_or(0.0),
                record.values.get(1).copied().unwrap_or(0.0),
            );
            let labels = |name: &str| record.labels.get(name).map(str::to_owned);
            replayed.apply(&record.version, &record.device.name(), record.score, &labels, values);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn fleet_equals_a_brute_force_recomputation(
        ops in prop::collection::vec(op(), 1..60),
        top in 1usize..5,
        require_catalog in any::<bool>(),
    ) {
        let config = FleetConfig { top, require_catalog };
        let mut fleet = Fleet::new(&config, &ComponentContext::for_test("rollups", "fleet"));
        let mut out = Outputs::new("rollups");
        let mut latest: HashMap<String, Latest> = HashMap::new();
        let mut catalogued: BTreeMap<String, i64> = BTreeMap::new();
        let mut replayed = Replayed::default();
        for op in ops {
            match op {
                Op::Score { device, time, score: value, anomalous, site, asset } => {
                    let device = format!("d{device}");
                    let (site, asset) = (format!("s{site}"), format!("a{asset}"));
                    let labels = Labels::from_pairs([("site", site.as_str()), ("asset", asset.as_str())]);
                    fleet.process_batch(Batch::Scores(vec![score(&device, time, value, anomalous, labels)]), &mut out);
                    observe(&mut latest, &device, Latest { time, score: value, anomalous, site, asset });
                }
                Op::Catalog(device) => {
                    let device = format!("d{device}");
                    // The catalog source sends a row once; inserting twice would be a bug there.
                    if catalogued.get(&device).copied().unwrap_or(0) == 0 {
                        fleet.process_batch(catalog_batch(&device, 1), &mut out);
                        *catalogued.entry(device).or_default() += 1;
                    }
                }
                Op::Retire(device) => {
                    let device = format!("d{device}");
                    if catalogued.get(&device).copied().unwrap_or(0) == 1 {
                        fleet.process_batch(catalog_batch(&device, -1), &mut out);
                        catalogued.insert(device, 0);
                    }
                }
            }
            replay_scores(&mut replayed, &mut out);
            let counted: HashMap<String, Latest> = latest
                .iter()
                .filter(|(device, _)| !require_catalog || catalogued.get(*device).copied() == Some(1))
                .map(|(device, state)| (device.clone(), state.clone()))
                .collect();
            let expected = brute_force(&counted, top);
            prop_assert_eq!(fleet.view(), &expected);
            prop_assert_eq!(replayed.view(), expected);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Whole pipelines on 1, 2 and 4 workers
// ---------------------------------------------------------------------------------------------

const PIPELINE: &str = r#"
[pipeline]
name = "fleet-test"

[sources.devices]
type = "catalog"
path = "${CATALOG}"
watch = ${WATCH}
poll_interval_ms = 10

[sources.in]
SOURCE_BLOCK

[transforms.readings]
type = "normalize"
inputs = ["in"]
device_field = "device"
timestamp_field = "ts"
timestamp_format = "unix_ms"
features = ["value"]

[transforms.windows]
type = "window"
inputs = ["readings"]
size_ms = 1000

[transforms.scores]
type = "stats"
inputs = ["windows"]
warmup_windows = 1
threshold = 1.0

[transforms.enriched]
type = "enrich"
inputs = ["devices", "scores"]

[transforms.rollups]
type = "fleet"
inputs = ["enriched.matched"]
top = 4

[sinks.enriched_out]
type = "file"
inputs = ["enriched.matched"]
path = "${DIR}/enriched.jsonl"

[sinks.unmatched_out]
type = "file"
inputs = ["enriched.unmatched"]
path = "${DIR}/unmatched.jsonl"

[sinks.fleet_out]
type = "file"
inputs = ["rollups"]
path = "${DIR}/fleet.jsonl"

[sinks.rejects]
type = "blackhole"
inputs = ["windows.late", "readings.errors", "devices.errors"]
"#;

fn label(record: &serde_json::Value, name: &str) -> Option<String> {
    record["labels"][name].as_str().map(str::to_owned)
}

/// The brute-force view over the enriched scores of a run.
fn expected_from(enriched: &[serde_json::Value], top: usize) -> FleetView {
    let mut latest = HashMap::new();
    for record in enriched {
        let device = record["device"].as_str().expect("device");
        let state = Latest {
            time: record["end_ms"].as_i64().expect("end_ms"),
            score: record["score"].as_f64().expect("a finite score") as f32,
            anomalous: record["anomaly"].as_bool().expect("anomaly"),
            site: label(record, "site").unwrap_or_default(),
            asset: label(record, "asset").unwrap_or_default(),
        };
        observe(&mut latest, device, state);
    }
    brute_force(&latest, top)
}

/// The view replayed from the `fleet` output records of a run.
fn replayed_from(records: &[serde_json::Value]) -> FleetView {
    let mut replayed = Replayed::default();
    for record in records {
        let labels = |name: &str| label(record, name);
        let values = (
            record["values"]["devices"].as_f64().unwrap_or(0.0) as f32,
            record["values"]["anomalous"].as_f64().unwrap_or(0.0) as f32,
        );
        replayed.apply(
            record["version"].as_str().expect("version"),
            record["device"].as_str().expect("device"),
            record["score"].as_f64().expect("score") as f32,
            &labels,
            values,
        );
    }
    replayed.view()
}

/// The test pipeline with `source` as the options of its source `in`.
fn pipeline(source: &str) -> String {
    PIPELINE.replace("SOURCE_BLOCK", source)
}

fn file_vars(dir: &Path, watch: bool) -> Vec<(&'static str, String)> {
    vec![
        ("CATALOG", dir.join("devices.csv").display().to_string()),
        ("WATCH", watch.to_string()),
        ("DIR", dir.display().to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    #[test]
    fn the_fleet_view_is_the_same_on_1_2_and_4_workers_and_equals_a_brute_force(
        sites in prop::collection::vec(prop::option::of(0u8..3), 12),
        values in prop::collection::vec(0u8..20, 40..120),
    ) {
        let data = tempfile::tempdir().expect("dir");
        let mut catalog = String::from("device,site,asset,owner\n");
        for (device, site) in sites.iter().enumerate() {
            if let Some(site) = site {
                catalog.push_str(&format!("pump-{device},site-{site},type-{},ops\n", device % 2));
            }
        }
        let mut readings = String::new();
        for (i, value) in values.iter().enumerate() {
            let device = i % sites.len();
            let ts = 1_700_000_000_000_u64 + (i / sites.len()) as u64 * 1_000;
            readings.push_str(&format!("{{\"device\":\"pump-{device}\",\"ts\":{ts},\"value\":{value}}}\n"));
        }
        let readings_path = data.path().join("in.jsonl");
        std::fs::write(&readings_path, readings).expect("readings");
        let mut views = Vec::new();
        for workers in [1, 2, 4] {
            let dir = tempfile::tempdir().expect("dir");
            std::fs::write(dir.path().join("devices.csv"), &catalog).expect("catalog");
            // Spread: the readings are decoded on every worker.
            let source = format!("type = \"file\"\npath = \"{}\"\nspread = true\nbatch_size = 16", readings_path.display());
            let context = run(&pipeline(&source), &file_vars(dir.path(), false), workers);
            drop(context);
            let enriched = json_lines(&dir.path().join("enriched.jsonl"));
            let unmatched = json_lines(&dir.path().join("unmatched.jsonl"));
            for record in &enriched {
                let device: usize = record["device"].as_str().and_then(|d| d.strip_prefix("pump-")).and_then(|d| d.parse().ok()).expect("pump");
                prop_assert_eq!(label(record, "site"), sites[device].map(|site| format!("site-{site}")));
            }
            for record in &unmatched {
                let device: usize = record["device"].as_str().and_then(|d| d.strip_prefix("pump-")).and_then(|d| d.parse().ok()).expect("pump");
                prop_assert!(sites[device].is_none(), "{record}");
            }
            // Every device scores: each lands on one side.
            let scored = |records: &[serde_json::Value]| {
                records.iter().filter_map(|record| record["device"].as_str().map(str::to_owned)).collect::<std::collections::BTreeSet<_>>().len()
            };
            prop_assert_eq!(scored(&enriched) + scored(&unmatched), sites.len());
            let view = replayed_from(&json_lines(&dir.path().join("fleet.jsonl")));
            prop_assert_eq!(&view, &expected_from(&enriched, 4), "{} workers", workers);
            views.push((enriched.len(), unmatched.len(), view));
        }
        prop_assert_eq!(&views[0], &views[1]);
        prop_assert_eq!(&views[0], &views[2]);
        // Two processes of one worker each: records are enriched in both; the fleet view is
        // gathered on the first, and equals one worker's.
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("devices.csv"), &catalog).expect("catalog");
        let source = format!("type = \"file\"\npath = \"{}\"", readings_path.display());
        let outputs = run_processes(dir.path(), &pipeline(&source), 2);
        let enriched: Vec<serde_json::Value> =
            outputs.iter().flat_map(|out| json_lines(&out.join("enriched.jsonl"))).collect();
        let unmatched: Vec<serde_json::Value> =
            outputs.iter().flat_map(|out| json_lines(&out.join("unmatched.jsonl"))).collect();
        prop_assert!(
            json_lines(&outputs[1].join("fleet.jsonl")).is_empty(),
            "fleet is gathered on the first process"
        );
        let view = replayed_from(&json_lines(&outputs[0].join("fleet.jsonl")));
        prop_assert_eq!(&view, &expected_from(&enriched, 4), "2 processes");
        prop_assert_eq!(&(enriched.len(), unmatched.len(), view), &views[0], "2 processes");
    }
}

/// Runs `pipeline` (its catalog in `dir`/devices.csv, read once) as a cluster of `processes`
/// processes of one worker on loopback, to the end of its input; the output folder of each.
fn run_processes(dir: &Path, pipeline: &str, processes: usize) -> Vec<std::path::PathBuf> {
    let file = dir.join("pipeline.toml");
    std::fs::write(
        &file,
        pipeline.replace("name = \"fleet-test\"", "name = \"fleet-test\"\nworkers = 1"),
    )
    .expect("pipeline file");
    let peers: Vec<String> = (0..processes).map(|_| common::process::free_address()).collect();
    let running: Vec<(common::process::Process, std::path::PathBuf)> = (0..processes)
        .map(|index| {
            let out = dir.join(format!("process-{index}"));
            std::fs::create_dir_all(&out).expect("output folder");
            let args = common::process::cluster_args(index, &peers);
            let mut vars = file_vars(dir, false);
            vars.retain(|(name, _)| *name != "DIR");
            vars.push(("DIR", out.display().to_string()));
            let log = dir.join(format!("process-{index}.log"));
            (common::process::Process::run_with(&file, &args, &vars, log), out)
        })
        .collect();
    let (processes, outs): (Vec<_>, Vec<_>) = running.into_iter().unzip();
    common::process::Process::wait_exit_all(processes, Duration::from_secs(120));
    outs
}

// ---------------------------------------------------------------------------------------------
// A catalog edited while the pipeline runs
// ---------------------------------------------------------------------------------------------

#[test]
fn a_catalog_edited_while_running_gives_later_records_the_new_site() {
    let dir = tempfile::tempdir().expect("dir");
    let catalog = dir.path().join("devices.csv");
    std::fs::write(&catalog, "device,site,asset\npump-0000,north,pump\npump-0001,north,pump\n")
        .expect("catalog");
    let vars = vec![
        ("CATALOG", catalog.display().to_string()),
        ("WATCH", "true".to_owned()),
        ("DIR", dir.path().display().to_string()),
    ];
    let source =
        "type = \"simulator\"\ndevices = 2\ninterval_ms = 100\nrate_per_sec = 400\nseed = 3";
    let pipeline = pipeline(source).replace("features = [\"value\"]", "features = [\"vibration\"]");
    let running = Running::start(&pipeline, &vars, 2);
    let enriched = dir.path().join("enriched.jsonl");
    let unmatched = dir.path().join("unmatched.jsonl");
    let site_of = |device: &str, site: &str| {
        json_lines(&enriched).iter().any(|record| {
            record["device"] == device && label(record, "site").as_deref() == Some(site)
        })
    };
    wait_until("pump-0000 scored at north", Duration::from_secs(30), || {
        site_of("pump-0000", "north")
    });
    // Written aside and renamed, as the reference asks, so no half-written file is read.
    let edited = dir.path().join("devices.csv.new");
    std::fs::write(&edited, "device,site,asset\npump-0000,south,pump\n").expect("edit");
    std::fs::rename(&edited, &catalog).expect("rename");
    wait_until("pump-0000 scored at south", Duration::from_secs(30), || {
        site_of("pump-0000", "south")
    });
    wait_until("pump-0001 unmatched once retired", Duration::from_secs(30), || {
        json_lines(&unmatched).iter().any(|record| record["device"] == "pump-0001")
    });
    running.stop().expect("the pipeline stops cleanly");

    let records = json_lines(&enriched);
    let sites: Vec<String> = records
        .iter()
        .filter(|record| record["device"] == "pump-0000")
        .map(|record| label(record, "site").unwrap_or_default())
        .collect();
    let first_south = sites.iter().position(|site| site == "south").expect("a south record");
    assert!(first_south > 0, "{sites:?}");
    assert!(sites[..first_south].iter().all(|site| site == "north"), "{sites:?}");
    assert!(sites[first_south..].iter().all(|site| site == "south"), "{sites:?}");
    // Once retired, pump-0001 never comes out enriched again.
    let retired_at = json_lines(&unmatched)
        .iter()
        .filter(|record| record["device"] == "pump-0001")
        .filter_map(|record| record["end_ms"].as_i64())
        .min()
        .expect("an unmatched pump-0001");
    assert!(
        records
            .iter()
            .filter(|record| record["device"] == "pump-0001")
            .all(|record| record["end_ms"].as_i64().is_some_and(|end| end < retired_at)),
        "pump-0001 enriched after it was retired"
    );
    // The fleet view followed: pump-0000 is counted at south (if anomalous) and never at
    // north any more; the view equals the brute force over what entered it.
    let view = replayed_from(&json_lines(&dir.path().join("fleet.jsonl")));
    assert_eq!(view, expected_from(&records, 4));
    assert!(view.top.iter().any(|(device, _, site, _)| device == "pump-0000" && site == "south"));
}

// ---------------------------------------------------------------------------------------------
// A catalog on a Kafka compacted topic, and in retained MQTT messages
// ---------------------------------------------------------------------------------------------

/// The catalog rows of the keyed-catalog tests, as JSON (one row a message).
fn row_json(device: &str, site: &str) -> String {
    format!(r#"{{"device":"{device}","site":"{site}","asset":"pump"}}"#)
}

/// Runs the test pipeline on 2 workers over the simulator's pump-0000 and pump-0001, with
/// `catalog` (TOML lines) as the options of its `devices` source, which already holds both
/// pumps at north. Once both are scored at north, `change` moves pump-0000 to south and
/// deletes pump-0001 at the source; then pump-0000's next records must carry south and
/// pump-0001's go to `enriched.unmatched`. Returns the reasons of the source's `catalog`
/// error records (its `devices.errors` output).
fn moved_and_deleted(catalog: &str, change: impl FnOnce()) -> Vec<String> {
    let dir = tempfile::tempdir().expect("dir");
    let vars = vec![("DIR", dir.path().display().to_string())];
    let source =
        "type = \"simulator\"\ndevices = 2\ninterval_ms = 100\nrate_per_sec = 400\nseed = 3";
    let pipeline = pipeline(source)
        .replace("features = [\"value\"]", "features = [\"vibration\"]")
        .replace("path = \"${CATALOG}\"\nwatch = ${WATCH}\npoll_interval_ms = 10", catalog)
        .replace(", \"devices.errors\"]", "]")
        + "\n[sinks.catalog_errors]\ntype = \"file\"\ninputs = [\"devices.errors\"]\n\
           path = \"${DIR}/catalog_errors.jsonl\"\n";
    assert!(pipeline.contains("type = \"catalog\"\n") && !pipeline.contains("${CATALOG}"));
    let running = Running::start(&pipeline, &vars, 2);
    let enriched = dir.path().join("enriched.jsonl");
    let unmatched = dir.path().join("unmatched.jsonl");
    let site_of = |device: &str, site: &str| {
        json_lines(&enriched).iter().any(|record| {
            record["device"] == device && label(record, "site").as_deref() == Some(site)
        })
    };
    wait_until("both pumps scored at north", Duration::from_secs(60), || {
        site_of("pump-0000", "north") && site_of("pump-0001", "north")
    });
    // Records scored before the catalog arrived went to `unmatched`: only those after this
    // time tell the deletion.
    let loaded_at = json_lines(&enriched)
        .iter()
        .filter_map(|record| record["end_ms"].as_i64())
        .max()
        .expect("enriched records");
    change();
    wait_until("pump-0000 scored at south", Duration::from_secs(60), || {
        site_of("pump-0000", "south")
    });
    let deleted = |record: &serde_json::Value| {
        record["device"] == "pump-0001"
            && record["end_ms"].as_i64().is_some_and(|end| end > loaded_at)
    };
    wait_until("pump-0001 unmatched once deleted", Duration::from_secs(60), || {
        json_lines(&unmatched).iter().any(deleted)
    });
    running.stop().expect("the pipeline stops cleanly");

    let records = json_lines(&enriched);
    let sites: Vec<String> = records
        .iter()
        .filter(|record| record["device"] == "pump-0000")
        .map(|record| label(record, "site").unwrap_or_default())
        .collect();
    let first_south = sites.iter().position(|site| site == "south").expect("a south record");
    assert!(first_south > 0, "{sites:?}");
    assert!(sites[..first_south].iter().all(|site| site == "north"), "{sites:?}");
    assert!(sites[first_south..].iter().all(|site| site == "south"), "{sites:?}");
    let deleted_at = json_lines(&unmatched)
        .iter()
        .filter(|record| deleted(record))
        .filter_map(|record| record["end_ms"].as_i64())
        .min()
        .expect("an unmatched pump-0001");
    assert!(
        records
            .iter()
            .filter(|record| record["device"] == "pump-0001")
            .all(|record| record["end_ms"].as_i64().is_some_and(|end| end < deleted_at)),
        "pump-0001 enriched after it was deleted"
    );
    let view = replayed_from(&json_lines(&dir.path().join("fleet.jsonl")));
    assert_eq!(view, expected_from(&records, 4));
    json_lines(&dir.path().join("catalog_errors.jsonl"))
        .iter()
        .filter(|record| record["error_type"] == "catalog")
        .map(|record| record["reason"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// A Kafka producer of the tests: keyed records, `None` a tombstone; waits for every ack.
#[cfg(feature = "kafka")]
fn produce(topic: &str, records: &[(&str, Option<String>)]) {
    use rdkafka::ClientConfig;
    use rdkafka::producer::{BaseRecord, Producer};
    let producer: rdkafka::producer::BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", common::KAFKA_BROKERS)
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    for (key, value) in records {
        let record = BaseRecord::<str, str>::to(topic).key(*key);
        let record = match value {
            Some(value) => record.payload(value.as_str()),
            None => record,
        };
        producer.send(record).map_err(|(error, _)| error).expect("queued");
    }
    producer.flush(Duration::from_secs(30)).expect("every record acknowledged");
}

#[test]
#[cfg(feature = "kafka")]
fn a_kafka_catalog_moves_and_deletes_devices_by_key() {
    common::require_kafka();
    let _serial = common::kafka_serial();
    let topic = common::unique("catalog");
    produce(
        &topic,
        &[
            ("pump-0000", Some(row_json("pump-0000", "east"))),
            ("pump-0000", Some(row_json("pump-0000", "north"))),
            ("pump-0001", Some(row_json("pump-0001", "north"))),
            // Refused and counted: not JSON, and a value of another device than its key.
            ("pump-0099", Some("not json".to_owned())),
            ("pump-0098", Some(row_json("pump-0001", "west"))),
        ],
    );
    let catalog =
        format!("kafka = {{ brokers = \"{}\", topic = \"{topic}\" }}", common::KAFKA_BROKERS);
    let errors = moved_and_deleted(&catalog, || {
        produce(
            &topic,
            &[("pump-0000", Some(row_json("pump-0000", "south"))), ("pump-0001", None)],
        );
    });
    // Two bad records, read by each of the 2 workers.
    assert_eq!(errors.len(), 4, "{errors:?}");
    assert_eq!(errors.iter().filter(|reason| reason.contains("not JSON")).count(), 2);
    assert_eq!(errors.iter().filter(|reason| reason.contains("must be the device id")).count(), 2);
}

#[test]
#[cfg(feature = "kafka")]
fn a_kafka_catalog_not_watched_reads_the_topic_to_its_end_and_finishes() {
    use tidewatch_api::SourceFactory;
    use tidewatch_api::SourcePoll;
    use tidewatch_connectors::CatalogSourceFactory;

    common::require_kafka();
    let _serial = common::kafka_serial();
    let topic = common::unique("catalog-replay");
    let mut records: Vec<(String, Option<String>)> = Vec::new();
    for device in 0..30 {
        records.push((format!("d{device:02}"), Some(row_json(&format!("d{device:02}"), "north"))));
    }
    for device in 0..10 {
        records.push((format!("d{device:02}"), Some(row_json(&format!("d{device:02}"), "south"))));
    }
    for device in 20..30 {
        records.push((format!("d{device:02}"), None));
    }
    let borrowed: Vec<(&str, Option<String>)> =
        records.iter().map(|(key, value)| (key.as_str(), value.clone())).collect();
    produce(&topic, &borrowed);
    let options = tidewatch_api::ConfigValue::parse(&format!(
        "kafka = {{ brokers = \"{}\", topic = \"{topic}\" }}\nwatch = false",
        common::KAFKA_BROKERS
    ))
    .expect("toml");
    let config = options.deserialize().expect("config");
    let ctx = ComponentContext::for_test("devices", "catalog");
    let mut source = CatalogSourceFactory.build(&config, &ctx).expect("source");
    source.open(&ctx).expect("open");
    let mut catalog: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut out = Outputs::new("devices");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(std::time::Instant::now() < deadline, "the source did not finish");
        let state = source.poll(&mut out).expect("poll");
        for batch in out.take_main() {
            let Batch::Catalog(updates) = batch else { panic!("catalog updates") };
            for update in updates {
                let key = (update.row.device.clone(), update.row.site.to_string());
                let count = catalog.entry(key).or_default();
                *count += update.diff;
                assert!((0..=1).contains(count), "a row inserted twice or retracted when absent");
            }
        }
        match state {
            SourcePoll::Finished => break,
            SourcePoll::Idle { wake_after_ms } => {
                // The engine would wait so long before the next poll.
                std::thread::sleep(Duration::from_millis(wake_after_ms.min(50)));
            }
            SourcePoll::Ready => {}
        }
    }
    source.close().expect("close");
    catalog.retain(|_, count| *count != 0);
    let expected: BTreeMap<(String, String), i64> = (0..20)
        .map(|device| {
            let site = if device < 10 { "south" } else { "north" };
            ((format!("d{device:02}"), site.to_owned()), 1)
        })
        .collect();
    assert_eq!(catalog, expected);
    assert!(out.take_errors().is_empty());
}

#[test]
#[cfg(feature = "mqtt")]
fn an_mqtt_catalog_of_retained_messages_moves_and_deletes_devices_by_topic() {
    common::require_broker();
    let prefix = common::unique("catalog");
    let publisher = common::Publisher::new(&format!("{prefix}-pub"));
    publisher.publish_retained(&format!("{prefix}/pump-0000"), 1, row_json("pump-0000", "north"));
    publisher.publish_retained(&format!("{prefix}/pump-0001"), 1, row_json("pump-0001", "north"));
    // Refused and counted: not a row.
    publisher.publish_retained(&format!("{prefix}/bad"), 1, "{\"site\":\"north\"}");
    publisher.wait_acked(3, Duration::from_secs(10));
    let catalog =
        format!("mqtt = {{ url = \"mqtt://127.0.0.1:1883\", topics = [\"{prefix}/#\"] }}");
    let errors = moved_and_deleted(&catalog, || {
        publisher.publish_retained(
            &format!("{prefix}/pump-0000"),
            1,
            row_json("pump-0000", "south"),
        );
        // An empty retained payload clears the topic: its row is deleted.
        publisher.publish_retained(&format!("{prefix}/pump-0001"), 1, Vec::new());
        publisher.wait_acked(5, Duration::from_secs(10));
    });
    // The bad retained message, delivered to each of the 2 workers.
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors.iter().all(|reason| reason.contains("/bad`")), "{errors:?}");
    // Leave no retained message behind.
    for topic in ["pump-0000", "bad"] {
        publisher.publish_retained(&format!("{prefix}/{topic}"), 1, Vec::new());
    }
    publisher.wait_acked(7, Duration::from_secs(10));
}

/// `fleet` with checkpoints, reading Kafka: stopped (SIGINT's way: a final checkpoint) and
/// started again, it counts the devices of the first run with those of the second, whose
/// records the first run never saw, and the view equals a brute force over both runs' scores.
#[test]
#[cfg(feature = "kafka")]
fn a_fleet_restarted_from_its_checkpoint_counts_the_devices_of_the_first_run() {
    common::require_kafka();
    let _serial = common::kafka_serial();
    let topic = common::unique("fleet-restart");
    let dir = tempfile::tempdir().expect("dir");
    // The shared test pipeline (catalog -> enrich -> fleet) reading Kafka, with checkpoints.
    let source = format!(
        "type = \"kafka\"\nbrokers = \"{}\"\ntopics = [\"{topic}\"]\ngroup_id = \"{}\"",
        common::KAFKA_BROKERS,
        common::unique("group"),
    );
    let settings = format!(
        "name = \"fleet-test\"\nout_of_orderness_ms = 0\ncheckpoint_interval_secs = 1\n\
         checkpoint_url = \"{}\"",
        dir.path().join("checkpoints").display()
    );
    let text = pipeline(&source).replace("name = \"fleet-test\"", &settings);
    let catalog: String =
        (0..5).map(|device| format!("pump-{device},site-{},pump,ops\n", device % 2)).collect();
    std::fs::write(dir.path().join("devices.csv"), format!("device,site,asset,owner\n{catalog}"))
        .expect("catalog");
    let readings =
        |devices: std::ops::Range<usize>, from_s: u64| -> Vec<(String, Option<String>)> {
            let mut records = Vec::new();
            for second in 0..6u64 {
                // pump-0 stops early: its windows all close in the first run, so only the
                // checkpoint carries it into the second.
                for device in devices.clone().filter(|device| *device != 0 || second < 3) {
                    let ts = 1_700_000_000_000 + (from_s + second) * 1_000;
                    let value = (device * 7 + second as usize * 3) % 11;
                    let reading =
                        format!("{{\"device\":\"pump-{device}\",\"ts\":{ts},\"value\":{value}}}");
                    records.push((format!("pump-{device}"), Some(reading)));
                }
            }
            records
        };
    let send = |records: &[(String, Option<String>)]| {
        let borrowed: Vec<(&str, Option<String>)> =
            records.iter().map(|(key, value)| (key.as_str(), value.clone())).collect();
        produce(&topic, &borrowed);
    };
    // Each run writes into its own folder.
    let run_dir = |run: &str| dir.path().join(format!("run-{run}"));
    let vars = |run: &str| {
        std::fs::create_dir_all(run_dir(run)).expect("run folder");
        let mut vars = file_vars(dir.path(), false);
        vars.retain(|(name, _)| *name != "DIR");
        vars.push(("DIR", run_dir(run).display().to_string()));
        vars
    };
    let scores_of = |run: &str| json_lines(&run_dir(run).join("enriched.jsonl"));
    let fleet_of = |run: &str| replayed_from(&json_lines(&run_dir(run).join("fleet.jsonl")));

    // The first run sees pump-0 to pump-3.
    send(&readings(0..4, 0));
    let first = Running::start(&text, &vars("1"), 1);
    wait_until("the first run counts 4 devices", Duration::from_secs(60), || {
        fleet_of("1").devices == 4
    });
    first.stop().expect("a graceful stop");

    // The second run reads only what came after the checkpoint: pump-4.
    send(&readings(4..5, 10));
    let second = Running::start(&text, &vars("2"), 1);
    let first_scores = scores_of("1");
    let both = || {
        let mut scores = first_scores.clone();
        scores.extend(scores_of("2"));
        scores
    };
    wait_until("the second run's fleet view covers both runs", Duration::from_secs(60), || {
        let scores = both();
        scores.len() > first_scores.len() && fleet_of("2") == expected_from(&scores, 4)
    });
    second.stop().expect("a graceful stop");
    // The second run reads only what came after the checkpoint: pump-4's readings, and the
    // windows of pump-0 to pump-3 left open at the stop (kept in the checkpoint), which close
    // now. No window is scored in both runs.
    let windows = |records: &[serde_json::Value]| -> Vec<(String, i64)> {
        records
            .iter()
            .map(|record| {
                let device = record["device"].as_str().unwrap_or_default().to_owned();
                (device, record["end_ms"].as_i64().unwrap_or_default())
            })
            .collect()
    };
    let first_windows: std::collections::BTreeSet<(String, i64)> =
        windows(&first_scores).into_iter().collect();
    let second_windows = windows(&scores_of("2"));
    assert!(second_windows.iter().any(|(device, _)| device == "pump-4"));
    assert!(
        second_windows.iter().all(|(device, _)| device != "pump-0"),
        "pump-0 counts in the second run only through the checkpoint"
    );
    for window in &second_windows {
        assert!(!first_windows.contains(window), "{window:?} scored in both runs");
    }
    let view = fleet_of("2");
    assert_eq!(view.devices, 5, "the restored devices count: {view:?}");
    assert_eq!(view, expected_from(&both(), 4));
}
