//! Checkpoints and recovery, through the real binary, against the real Kafka broker on
//! 127.0.0.1:9092 and (for the cloud pipeline) the real Ceph radosgw on 127.0.0.1:7480, both
//! started by scripts/test.sh; the lakes are read back with pyarrow.
//!
//! - golden: Kafka -> normalize -> window -> autoencoder -> Parquet (readings and scores) runs
//!   straight through once; the same pipeline with checkpoints is killed with SIGKILL three
//!   times at random moments while the topic is being produced, and restarted; both lakes
//!   hold exactly the same rows, none lost, none twice;
//! - rescaling: stopped gracefully (SIGINT: a final checkpoint, open windows kept) and resumed
//!   with 1 worker instead of 2, and with 2 instead of 1: the same output again;
//! - a truncated manifest and a missing state file: skipped with a log line, the checkpoint
//!   before is restored, and no reading is lost;
//! - the issue's check: `pipelines/cloud.toml` with its lake and its checkpoints on Ceph,
//!   killed three times while `tidewatch simulate --kafka --rate 2000` produces: exactly
//!   20000 readings in the lake, 20000 distinct (device, time) pairs.
//!
//! The tests share the broker: they run one at a time.
#![cfg(all(feature = "kafka", feature = "s3", feature = "tract"))]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::process::{Process, metric_sum};
use common::{root, unique, wait_until};

const BROKERS: &str = common::KAFKA_BROKERS;
const FEATURES: [&str; 5] = ["vibration", "current", "pressure", "temperature", "flow"];

/// `tidewatch simulate --kafka` of `count` readings of `devices` pumps, one simulated second
/// apart per pump, at `rate` per second (0: as fast as the broker takes them).
fn produce(topic: &str, devices: usize, count: u64, rate: u64) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tidewatch"))
        .args(["simulate", "--kafka", BROKERS, "--topic", topic])
        .args(["--devices", &devices.to_string(), "--count", &count.to_string()])
        .args(["--rate", &rate.to_string(), "--interval-ms", "1000", "--seed", "3"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("simulate runs")
}

fn finish_producing(child: Child, count: u64) {
    let output = child.wait_with_output().expect("simulate ends");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "simulate --kafka failed:\n{stderr}");
    assert!(stderr.contains(&format!("acknowledged {count}")), "{stderr}");
}

/// A cheap deterministic random number in `range` (the moments of the kills).
fn random_in(state: &mut u64, range: std::ops::Range<u64>) -> u64 {
    *state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
    range.start + (*state >> 33) % (range.end - range.start)
}

/// A random seed from the clock, printed so a failure can be replayed.
fn seed() -> u64 {
    let seed = std::env::var("TIDEWATCH_TEST_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| tidewatch::api::records::now_ms() as u64);
    eprintln!("kill moments from seed {seed} (TIDEWATCH_TEST_SEED={seed} replays them)");
    seed
}

/// A model of the five simulator features (PCA, windows of 5 readings).
fn model(dir: &Path) -> PathBuf {
    let csv = dir.join("fleet.csv");
    common::simulator_training_csv(&csv, 400);
    let model = dir.join("model");
    let mut args = vec!["--family", "pca", "--window", "5", "--features"];
    args.extend(FEATURES);
    common::train(&csv, &model, &args);
    model
}

/// Kafka -> normalize -> 5 s windows -> autoencoder -> Parquet (readings and scores), with a
/// checkpoint every second. Nothing is ever late (the out-of-orderness covers the whole run,
/// whatever the order the partitions are read in), so every run computes the same windows.
fn golden_pipeline(
    topic: &str,
    model: &Path,
    lake: &Path,
    checkpoints: &Path,
    workers: usize,
    stop_at_end: bool,
) -> String {
    format!(
        r#"
[pipeline]
name = "golden"
workers = {workers}
out_of_orderness_ms = 86400000
idle_timeout_ms = 86400000
checkpoint_interval_secs = 1
checkpoint_url = "{checkpoints}"
{sources}
[transforms.model]
type = "autoencoder"
inputs = ["windows"]
model = "{model}"
backend = "tract"

[sinks.lake-readings]
type = "parquet"
inputs = ["readings"]
path = "file://{lake}/readings"

[sinks.lake-scores]
type = "parquet"
inputs = ["model"]
path = "file://{lake}/scores"
"#,
        checkpoints = checkpoints.display(),
        sources = common::kafka_readings_windows_toml(topic, stop_at_end),
        model = model.display(),
        lake = lake.display(),
    )
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("pipeline file");
    path
}

/// The (device, time) pairs of a readings lake, and how many rows it has.
fn pairs(url: &str, env: &[(String, String)]) -> (usize, BTreeSet<(String, i64)>) {
    let read = common::read_lake(url, env, true);
    let count = read["num_rows"].as_u64().expect("num_rows") as usize;
    let devices = read["columns"]["device"].as_array().cloned().unwrap_or_default();
    let times = read["columns"]["time"].as_array().cloned().unwrap_or_default();
    let pairs = devices
        .iter()
        .zip(&times)
        .map(|(device, time)| {
            (device.as_str().expect("device").to_owned(), time.as_i64().expect("time"))
        })
        .collect();
    (count, pairs)
}

fn straight_run(dir: &Path, topic: &str, model: &Path, workers: usize) -> PathBuf {
    std::fs::create_dir_all(dir).expect("folder");
    let lake = dir.join("straight-lake");
    let text = golden_pipeline(topic, model, &lake, &dir.join("straight-ck"), workers, true);
    let pipeline = write(dir, "straight.toml", &text);
    Process::run(&pipeline, &[], dir.join("straight.log")).wait_exit(Duration::from_secs(300));
    lake
}

fn compare(expected: &Path, got: &Path, count: usize) {
    let url = |lake: &Path, part: &str| format!("file://{}/{part}", lake.display());
    let readings = common::assert_same_lake(&url(expected, "readings"), &url(got, "readings"));
    assert_eq!(readings, count, "the straight run has every reading once");
    let scores = common::assert_same_lake(&url(expected, "scores"), &url(got, "scores"));
    assert!(scores > 0, "the straight run scored windows");
}

#[test]
fn killed_three_times_the_lake_equals_a_straight_run_exactly() {
    let _serial = common::kafka_serial();
    common::require_kafka();
    let dir = tempfile::tempdir().expect("tempdir");
    let model = model(dir.path());
    let topic = unique("golden");
    let count = 20_000;
    let mut random = seed();

    // Killed at random moments while the topic is produced (2000 readings/s), restarted each
    // time; the last run reads to the end of the topic and ends.
    let lake = dir.path().join("killed-lake");
    let checkpoints = dir.path().join("killed-ck");
    let live = write(
        dir.path(),
        "killed.toml",
        &golden_pipeline(&topic, &model, &lake, &checkpoints, 2, false),
    );
    let producer = produce(&topic, 40, count, 2_000);
    let mut restored = 0;
    for kill in 0..3 {
        let process = Process::run(&live, &[], dir.path().join(format!("killed-{kill}.log")));
        std::thread::sleep(Duration::from_millis(random_in(&mut random, 1_500..4_000)));
        let log = process.log();
        restored += usize::from(log.contains("restoring from checkpoint"));
        process.crash();
    }
    finish_producing(producer, count);
    let last = write(
        dir.path(),
        "last.toml",
        &golden_pipeline(&topic, &model, &lake, &checkpoints, 2, true),
    );
    let log =
        Process::run(&last, &[], dir.path().join("last.log")).wait_exit(Duration::from_secs(300));
    restored += usize::from(log.contains("restoring from checkpoint"));
    assert!(restored >= 2, "the restarts resumed from checkpoints ({restored} of 3):\n{log}");

    let straight = straight_run(dir.path(), &topic, &model, 2);
    compare(&straight, &lake, count as usize);
}

#[test]
fn rescaling_from_a_checkpoint_two_to_one_and_one_to_two_gives_the_same_output() {
    let _serial = common::kafka_serial();
    common::require_kafka();
    let dir = tempfile::tempdir().expect("tempdir");
    let model = model(dir.path());
    let half = 4_000;
    for (name, before, after) in [("two-to-one", 2, 1), ("one-to-two", 1, 2)] {
        let topic = unique(name);
        let lake = dir.path().join(format!("{name}-lake"));
        let checkpoints = dir.path().join(format!("{name}-ck"));
        // The first half with `before` workers, stopped gracefully once it has read it: a
        // final checkpoint holding the Kafka positions and every open window.
        finish_producing(produce(&topic, 20, half, 0), half);
        let first = write(
            dir.path(),
            &format!("{name}-1.toml"),
            &golden_pipeline(&topic, &model, &lake, &checkpoints, before, false),
        );
        let process = Process::run(&first, &[], dir.path().join(format!("{name}-1.log")));
        wait_until("the first half consumed", Duration::from_secs(60), || {
            process.received("normalize") >= half
        });
        process.stop();
        // The second half, read to the end with `after` workers.
        finish_producing(produce(&topic, 20, half, 0), half);
        let second = write(
            dir.path(),
            &format!("{name}-2.toml"),
            &golden_pipeline(&topic, &model, &lake, &checkpoints, after, true),
        );
        let log = Process::run(&second, &[], dir.path().join(format!("{name}-2.log")))
            .wait_exit(Duration::from_secs(300));
        assert!(
            log.contains(&format!("workers={before}")),
            "restored a {before}-worker checkpoint:\n{log}"
        );
        assert!(log.contains("restoring from checkpoint"), "{log}");
        let straight = straight_run(&dir.path().join(name), &topic, &model, before);
        compare(&straight, &lake, 2 * half as usize);
    }
}

#[test]
fn a_damaged_checkpoint_is_skipped_and_the_one_before_restored() {
    let _serial = common::kafka_serial();
    common::require_kafka();
    let dir = tempfile::tempdir().expect("tempdir");
    let model = model(dir.path());
    let topic = unique("damaged");
    let count = 6_000;
    let lake = dir.path().join("lake");
    let checkpoints = dir.path().join("ck");
    let live = write(
        dir.path(),
        "live.toml",
        &golden_pipeline(&topic, &model, &lake, &checkpoints, 2, false),
    );
    let producer = produce(&topic, 20, count, 1_000);
    let process = Process::run(&live, &[], dir.path().join("live.log"));
    let manifests = || -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(&checkpoints)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|entry| entry.path().join("manifest.json"))
                    .filter(|path| path.is_file())
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        found
    };
    wait_until("three checkpoints", Duration::from_secs(60), || manifests().len() >= 3);
    process.crash();
    finish_producing(producer, count);
    // The newest manifest truncated, a state file of the one before missing.
    let found = manifests();
    let newest = &found[found.len() - 1];
    let text = std::fs::read(newest).expect("manifest");
    std::fs::write(newest, &text[..text.len() / 2]).expect("truncate");
    let before = found[found.len() - 2].parent().expect("folder").to_path_buf();
    let state = before.join("state/windows/0");
    std::fs::remove_file(&state).expect("a window state to delete");
    let oldest = found[found.len() - 3].parent().expect("folder").to_path_buf();
    let epoch: u64 =
        oldest.file_name().and_then(|name| name.to_str()?.parse().ok()).expect("an epoch folder");

    let last = write(
        dir.path(),
        "last.toml",
        &golden_pipeline(&topic, &model, &lake, &checkpoints, 2, true),
    );
    let log =
        Process::run(&last, &[], dir.path().join("last.log")).wait_exit(Duration::from_secs(300));
    assert!(log.contains("is incomplete or damaged"), "{log}");
    assert!(log.contains(&format!("restoring from checkpoint epoch={epoch}")), "{log}");
    // Going back past the damaged checkpoints publishes again what they had published:
    // duplicates are possible, a loss is not.
    let (rows, pairs) = pairs(&format!("file://{}/readings", lake.display()), &[]);
    assert_eq!(pairs.len(), count as usize, "every reading is in the lake ({rows} rows)");
}

#[test]
fn the_cloud_pipeline_killed_three_times_writes_every_reading_to_ceph_once() {
    let _serial = common::kafka_serial();
    common::require_kafka();
    let env = common::ceph_env().expect(
        "no Ceph radosgw on 127.0.0.1:7480: start it with `scripts/services.sh start ceph` \
         (scripts/test.sh does)",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = unique("cloud-ck");
    let prefix = unique("ck");
    let lake = format!("s3://tidewatch/{prefix}/lake-ck");
    let mut vars: Vec<(&str, String)> =
        env.iter().map(|(name, value)| (name.as_str(), value.clone())).collect();
    vars.extend([
        ("TIDEWATCH_LAKE_URL", lake.clone()),
        ("TIDEWATCH_CHECKPOINT_URL", format!("s3://tidewatch/{prefix}/ck")),
        ("TIDEWATCH_KAFKA_TOPIC", topic.clone()),
        ("TIDEWATCH_KAFKA_GROUP", unique("cloud-ck-group")),
        ("TIDEWATCH_ALERT_WEBHOOK_URL", "http://127.0.0.1:9/alerts".to_owned()),
        ("TIDEWATCH_STATE_DIR", dir.path().display().to_string()),
    ]);
    let pipeline = root().join("pipelines/cloud.toml");
    let mut random = seed();
    let count = 20_000;
    let producer = produce(&topic, 50, count, 2_000);
    let started = Instant::now();
    for kill in 0..3 {
        let process = Process::run(&pipeline, &vars, dir.path().join(format!("cloud-{kill}.log")));
        std::thread::sleep(Duration::from_millis(random_in(&mut random, 1_000..3_500)));
        process.crash();
    }
    finish_producing(producer, count);
    let last = Process::run(&pipeline, &vars, dir.path().join("cloud-last.log"));
    wait_until("everything consumed", Duration::from_secs(120), || {
        metric_sum(&last.address, "tidewatch_kafka_consumer_lag", &[&topic]) == Some(0.0)
            && last.received("normalize") > 0
    });
    let log = last.stop();
    let (rows, pairs) = pairs(&lake, &env);
    assert_eq!(
        (rows, pairs.len()),
        (count as usize, count as usize),
        "readings and distinct (device, time) pairs in {lake} after {:?}:\n{log}",
        started.elapsed()
    );
}

#[test]
fn mqtt_qos1_across_kills_loses_nothing_and_repeats_at_most_one_epoch_per_crash() {
    let _serial = common::kafka_serial();
    common::require_broker();
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = unique("ck-mqtt");
    let filter = format!("{prefix}/#");
    let client_id = format!("{prefix}-in");
    // The session exists before anything is published: the broker keeps what arrives while
    // the pipeline is down.
    common::prepare_session(&client_id, std::slice::from_ref(&filter), 1, true);
    let lake = dir.path().join("lake");
    let text = format!(
        r#"
[pipeline]
name = "mqtt-ck"
checkpoint_interval_secs = 1
checkpoint_url = "{checkpoints}"

[sources.in]
type = "mqtt"
url = "mqtt://127.0.0.1:1883"
topics = ["{filter}"]
qos = 1
connection.client_id = "{client_id}"

[transforms.readings]
type = "normalize"
inputs = ["in"]
device_field = "device"
timestamp_field = "ts"
timestamp_format = "unix_ms"
features = ["value"]

[sinks.lake]
type = "parquet"
inputs = ["readings"]
path = "file://{lake}"
"#,
        checkpoints = dir.path().join("ck").display(),
        lake = lake.display(),
    );
    let pipeline = write(dir.path(), "mqtt.toml", &text);
    let count: u64 = 6_000;
    let rate: u64 = 1_000;
    let publisher = std::thread::spawn({
        let prefix = prefix.clone();
        move || {
            let publisher = common::Publisher::new(&format!("{prefix}-out"));
            let started = Instant::now();
            for i in 0..count {
                let payload = format!(
                    r#"{{"device":"pump-{}","ts":{},"value":{i}}}"#,
                    i % 10,
                    1_700_000_000_000 + (i / 10) * 1_000
                );
                publisher.publish(&format!("{prefix}/pump-{}", i % 10), 1, payload);
                // Paced at `rate` per second.
                let due = Duration::from_millis(i * 1_000 / rate);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            publisher.wait_acked(count, Duration::from_secs(60));
        }
    });
    let mut random = seed();
    let kills = 3;
    for kill in 0..kills {
        let process = Process::run(&pipeline, &[], dir.path().join(format!("mqtt-{kill}.log")));
        std::thread::sleep(Duration::from_millis(random_in(&mut random, 800..2_000)));
        process.crash();
    }
    publisher.join().expect("publisher");
    let last = Process::run(&pipeline, &[], dir.path().join("mqtt-last.log"));
    // The lake gets a checkpoint's files once it is durable: every message is there once the
    // last run caught up.
    let url = format!("file://{}", lake.display());
    wait_until("every message in the lake", Duration::from_secs(120), || {
        lake.exists() && pairs(&url, &[]).1.len() as u64 >= count
    });
    last.stop();
    let (rows, pairs) = pairs(&url, &[]);
    let duplicates = rows - pairs.len();
    eprintln!("lake: {rows} rows, {} distinct, {duplicates} duplicates", pairs.len());
    assert_eq!(pairs.len() as u64, count, "no message lost");
    // A duplicate comes only from a crash between a checkpoint being durable and its acks
    // reaching the broker: each crash repeats at most the messages of that one epoch (1 s at
    // `rate`, with room for what queued at the broker while the process started).
    let allowance = kills * rate * 3 / 2;
    assert!(duplicates as u64 <= allowance, "{duplicates} duplicates over {kills} crashes");
}

#[test]
fn an_instance_whose_inputs_all_ended_still_takes_part_in_checkpoints() {
    // The file source reads on worker 0 only: worker 1's instances of everything fed by it
    // see their input end at once, while the global frontier waits for worker 0. They must
    // pass each checkpoint by themselves, or the first checkpoint never completes and the
    // paused worker 0 waits for ever.
    let dir = tempfile::tempdir().expect("tempdir");
    let lines = 3_000;
    common::write_pump_readings(&dir.path().join("in.jsonl"), lines, |i| i);
    // 3000 lines, 1000 s of event time at 400x: about 2.5 s, several checkpoint intervals.
    let text = common::checkpointed_readings_toml(&dir.path().join("ck"))
        + r#"
[transforms.windows]
type = "window"
inputs = ["readings"]
size_ms = 10000

[sinks.out]
type = "file"
inputs = ["windows"]
path = "out.jsonl"
"#;
    let pipeline = write(dir.path(), "file.toml", &text);
    let log = Process::run(&pipeline, &[], dir.path().join("file.log"))
        .wait_exit(Duration::from_secs(120));
    let completed = log.matches("checkpoint complete").count()
        + std::fs::read_dir(dir.path().join("ck")).map(|entries| entries.count()).unwrap_or(0);
    assert!(completed >= 2, "checkpoints were taken while the file was read:\n{log}");
    let windows = common::json_lines(&dir.path().join("out.jsonl"));
    let readings: usize =
        windows.iter().map(|window| window["times"].as_array().map_or(0, Vec::len)).sum();
    assert_eq!(readings, lines as usize, "every line in a window, once");
}
