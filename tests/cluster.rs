//! tidewatch as a cluster of processes on loopback (`tidewatch run --processes N --process I
//! --peers ...`), through the real binary, against the real Kafka broker on 127.0.0.1:9092
//! (started by scripts/test.sh); lakes are read back with pyarrow.
//!
//! - 1, 2 and 3 processes of one Kafka pipeline (normalize -> windows -> stats -> Parquet)
//!   write the same rows;
//! - a process that dies takes the others down with an error naming the lost peer, instead
//!   of leaving them waiting;
//! - start-up waits for the peers a bounded time and names the missing ones.
//!
//! The tests share the broker: they run one at a time.
#![cfg(all(feature = "kafka", feature = "s3"))]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::process::{Process, cluster_args, free_address};
use common::{unique, wait_until, wait_until_or};

const BROKERS: &str = common::KAFKA_BROKERS;

fn produce(topic: &str, devices: usize, count: u64) {
    let output = Command::new(env!("CARGO_BIN_EXE_tidewatch"))
        .args(["simulate", "--kafka", BROKERS, "--topic", topic])
        .args(["--devices", &devices.to_string(), "--count", &count.to_string()])
        .args(["--interval-ms", "1000", "--seed", "5"])
        .stdout(Stdio::null())
        .output()
        .expect("simulate runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "simulate --kafka failed:\n{stderr}");
    assert!(stderr.contains(&format!("acknowledged {count}")), "{stderr}");
}

/// Kafka (read to its end) -> normalize -> 5 s windows -> stats -> Parquet (readings and
/// scores). Nothing is late, whatever the order partitions are read in.
fn pipeline(
    dir: &Path,
    topic: &str,
    lake: &Path,
    stop_at_end: bool,
    checkpoints: Option<&Path>,
) -> PathBuf {
    let checkpoints = checkpoints
        .map(|folder| {
            format!("checkpoint_interval_secs = 1\ncheckpoint_url = \"{}\"\n", folder.display())
        })
        .unwrap_or_default();
    let text = format!(
        r#"
[pipeline]
name = "cluster"
workers = 1
out_of_orderness_ms = 86400000
idle_timeout_ms = 86400000
{checkpoints}{sources}
[transforms.baseline]
type = "stats"
inputs = ["windows"]

[sinks.lake-readings]
type = "parquet"
inputs = ["readings"]
path = "file://{lake}/readings"

[sinks.lake-scores]
type = "parquet"
inputs = ["baseline"]
path = "file://{lake}/scores"
"#,
        sources = common::kafka_readings_windows_toml(topic, stop_at_end),
        lake = lake.display(),
    );
    let path = dir.join(format!("{}.toml", unique("cluster")));
    std::fs::write(&path, text).expect("pipeline file");
    path
}

/// Runs `processes` processes of the pipeline to their end (with checkpoints in
/// `checkpoints`, if given) into `lake`.
fn run_cluster(
    dir: &Path,
    topic: &str,
    processes: usize,
    lake: &Path,
    checkpoints: Option<&Path>,
) -> Vec<String> {
    let file = pipeline(dir, topic, lake, true, checkpoints);
    let peers: Vec<String> = (0..processes).map(|_| free_address()).collect();
    let running: Vec<Process> = (0..processes)
        .map(|index| {
            // Debug logs of the engine: when a run does not end, its log says where it stands.
            Process::run_with(
                &file,
                &cluster_args(index, &peers),
                &[("RUST_LOG", "info,tidewatch_engine=debug".to_owned())],
                dir.join(format!("{topic}-run-{processes}-{index}.log")),
            )
        })
        .collect();
    Process::wait_exit_all(running, Duration::from_secs(180))
}

#[test]
fn one_two_and_three_processes_write_the_same_rows() {
    let _serial = common::kafka_serial();
    common::require_kafka();
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = unique("cluster");
    let count = 12_000;
    produce(&topic, 30, count);
    let single = dir.path().join("lake-1");
    run_cluster(dir.path(), &topic, 1, &single, None);
    let url = |lake: &Path, part: &str| format!("file://{}/{part}", lake.display());
    for processes in [2, 3] {
        let lake = dir.path().join(format!("lake-{processes}"));
        run_cluster(dir.path(), &topic, processes, &lake, None);
        let readings = common::assert_same_lake(&url(&single, "readings"), &url(&lake, "readings"));
        assert_eq!(readings, count as usize, "every reading once");
        let scores = common::assert_same_lake(&url(&single, "scores"), &url(&lake, "scores"));
        assert!(scores > 0, "windows were scored");
    }
}

/// Two processes with checkpoints read the first half of a topic; the second is killed.
/// Returns the lake and checkpoint folders.
fn kill_one_of_two(dir: &Path, topic: &str, half: u64) -> (PathBuf, PathBuf) {
    produce(topic, 20, half);
    let lake = dir.join("lake");
    let checkpoints = dir.join("ck");
    let file = pipeline(dir, topic, &lake, false, Some(&checkpoints));
    let peers: Vec<String> = (0..2).map(|_| free_address()).collect();
    let debug = [("RUST_LOG", "info,tidewatch_engine=debug".to_owned())];
    let first = Process::run_with(&file, &cluster_args(0, &peers), &debug, dir.join("first.log"));
    let second = Process::run_with(&file, &cluster_args(1, &peers), &debug, dir.join("second.log"));
    let logs = || format!("first:\n{}\nsecond:\n{}", first.log(), second.log());
    wait_until_or(
        "both processes ready",
        Duration::from_secs(60),
        || first.ready() && second.ready(),
        logs,
    );
    wait_until_or(
        "the first half consumed",
        Duration::from_secs(60),
        || first.received("normalize") + second.received("normalize") >= half,
        logs,
    );
    // A checkpoint taken after everything was read (the leader writes them).
    let manifests = || {
        std::fs::read_dir(&checkpoints)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|entry| entry.path().join("manifest.json").is_file())
                    .count()
            })
            .unwrap_or(0)
    };
    let before = manifests();
    wait_until_or(
        "a checkpoint of the cluster",
        Duration::from_secs(30),
        || manifests() > before,
        logs,
    );
    second.crash();
    let (status, log) = first.wait_status(Duration::from_secs(60));
    assert!(!status.success(), "the survivor fails:\n{log}");
    assert!(log.contains("lost its connection to another process of the cluster"), "{log}");
    (lake, checkpoints)
}

#[test]
fn a_dead_process_stops_the_other_with_an_error_naming_the_lost_peer() {
    let _serial = common::kafka_serial();
    common::require_kafka();
    let dir = tempfile::tempdir().expect("tempdir");
    kill_one_of_two(dir.path(), &unique("cluster-dead"), 3_000);
}

#[test]
fn after_a_dead_process_all_resume_from_the_checkpoint() {
    let _serial = common::kafka_serial();
    common::require_kafka();
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = unique("cluster-dead");
    let half = 3_000;
    let (lake, checkpoints) = kill_one_of_two(dir.path(), &topic, half);
    // The second half, then the whole cluster again, reading to the end.
    produce(&topic, 20, half);
    let logs = run_cluster(dir.path(), &topic, 2, &lake, Some(&checkpoints));
    for log in &logs {
        assert!(log.contains("restoring from checkpoint"), "{log}");
    }
    let straight = dir.path().join("straight");
    run_cluster(dir.path(), &topic, 1, &straight, Some(&dir.path().join("straight-ck")));
    let url = |lake: &Path, part: &str| format!("file://{}/{part}", lake.display());
    let readings = common::assert_same_lake(&url(&straight, "readings"), &url(&lake, "readings"));
    assert_eq!(readings, 2 * half as usize, "every reading once");
    let scores = common::assert_same_lake(&url(&straight, "scores"), &url(&lake, "scores"));
    assert!(scores > 0, "windows were scored");
}

#[test]
fn start_up_names_the_peers_that_do_not_come() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = pipeline(dir.path(), "unused", &dir.path().join("lake"), false, None);
    let peers = vec![free_address(), free_address()];
    let mut args = cluster_args(0, &peers);
    args.extend(["--connect-timeout-secs".into(), "2".into()]);
    let (status, log) = Process::run_with(&file, &args, &[], dir.path().join("alone.log"))
        .wait_status(Duration::from_secs(60));
    assert!(!status.success(), "{log}");
    assert!(log.contains("processes [1] did not connect within 2s"), "{log}");
}

#[test]
fn two_processes_of_the_cloud_pipeline_share_the_topic_and_stop_on_sigint() {
    let _serial = common::kafka_serial();
    common::require_kafka();
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = unique("cloud-2p");
    let env = [
        ("TIDEWATCH_KAFKA_TOPIC", topic.clone()),
        ("TIDEWATCH_KAFKA_GROUP", unique("cloud-2p-group")),
        ("TIDEWATCH_ALERT_WEBHOOK_URL", "http://127.0.0.1:9/alerts".to_owned()),
        ("TIDEWATCH_STATE_DIR", dir.path().display().to_string()),
        ("TIDEWATCH_LAKE_URL", format!("file://{}", dir.path().join("lake").display())),
        ("TIDEWATCH_CHECKPOINT_URL", dir.path().join("checkpoints").display().to_string()),
    ];
    let cloud = common::root().join("pipelines/cloud.toml");
    let peers: Vec<String> = (0..2).map(|_| free_address()).collect();
    let processes: Vec<Process> = (0..2)
        .map(|index| {
            Process::run_with(
                &cloud,
                &cluster_args(index, &peers),
                &env,
                dir.path().join(format!("cloud-{index}.log")),
            )
        })
        .collect();
    wait_until("/readyz of both processes", Duration::from_secs(60), || {
        processes.iter().all(Process::ready)
    });
    produce(&topic, 50, 20_000);
    let received = || processes.iter().map(|process| process.received("kafka")).sum::<u64>();
    wait_until("20000 records between them", Duration::from_secs(60), || received() >= 20_000);
    assert_eq!(received(), 20_000, "nothing read twice");
    assert!(
        processes.iter().all(|process| process.received("kafka") > 0),
        "both processes read part of the topic"
    );
    for process in processes {
        process.stop();
    }
}

/// MQTT (a non-shared subscription: worker 0 of process 0 reads it all) -> normalize ->
/// 1 s windows, with a short idle timeout.
fn idle_process_pipeline(dir: &Path, prefix: &str) -> PathBuf {
    let text = format!(
        r#"
[pipeline]
name = "cluster-idle"
workers = 1
out_of_orderness_ms = 0
idle_timeout_ms = 200
{readings}
[transforms.windows]
type = "window"
inputs = ["readings"]
size_ms = 1000

[sinks.out]
type = "blackhole"
inputs = ["windows"]
"#,
        readings = common::mqtt_readings_toml(&format!("{prefix}/+"), &["vibration"]),
    );
    let path = dir.join("idle.toml");
    std::fs::write(&path, text).expect("pipeline file");
    path
}

/// Windows of every process close while the pipeline runs, although only process 0 reads:
/// process 1's idle `normalize` takes process 0's watermark (the gossip dataflow) instead of
/// holding every window of the cluster back.
#[test]
fn a_process_without_input_keeps_up_with_the_watermark_of_the_one_that_reads() {
    common::require_broker();
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = unique("cluster-idle");
    let file = idle_process_pipeline(dir.path(), &prefix);
    let peers: Vec<String> = (0..2).map(|_| free_address()).collect();
    let processes: Vec<Process> = (0..2)
        .map(|index| {
            Process::run_with(
                &file,
                &cluster_args(index, &peers),
                &[],
                dir.path().join(format!("idle-{index}.log")),
            )
        })
        .collect();
    wait_until("/readyz of both processes", Duration::from_secs(60), || {
        processes.iter().all(Process::ready)
    });
    let publisher = common::Publisher::new(&unique("cluster-idle-pub"));
    let (devices, steps, first) = (20, 30, 1_700_000_000_000_i64);
    for step in 0..steps {
        for device in 0..devices {
            let payload = serde_json::json!({
                "device": format!("pump-{device}"), "ts": first + step * 100, "vibration": 1.0,
            });
            publisher.publish(&format!("{prefix}/pump-{device}"), 1, payload.to_string());
        }
    }
    publisher.wait_acked((devices * steps) as u64, Duration::from_secs(30));
    let windows = |process: &Process| {
        common::process::metric_sum(
            &process.address,
            "tidewatch_component_sent_events_total",
            &["component_id=\"windows\""],
        )
        .unwrap_or(0.0)
    };
    // 3 s of event time: the first two seconds' windows of every device close.
    wait_until("both processes' windows close", Duration::from_secs(30), || {
        processes.iter().all(|process| windows(process) > 0.0)
    });
    assert_eq!(processes[1].received("mqtt"), 0, "process 1 reads nothing itself");
    for process in processes {
        process.stop();
    }
}
