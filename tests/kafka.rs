//! The `kafka` source and sink against the real broker on 127.0.0.1:9092
//! (`scripts/services.sh start kafka`; scripts/test.sh starts it), through the real binary:
//!
//! - the check: `tidewatch run pipelines/cloud.toml` + `tidewatch simulate --kafka`
//!   counts exactly what was produced, `/readyz` waits for the assignment, and offsets are
//!   committed (a restart reads nothing again);
//! - a run to the end of the topic (`stop_at_end`) resumes at its group's committed offsets;
//! - two processes in one group split the partitions; one is killed; the other takes over
//!   and together they saw every record;
//! - `pipelines/edge.toml` through a 30 s broker outage and a crash of tidewatch during it:
//!   every reading arrives, in order per device.
//!
//! The tests share one broker and the outage test stops it: they run one at a time.
#![cfg(all(feature = "kafka", feature = "mqtt"))]

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::process::{Process, http_get, metric_sum};
use common::{Publisher, root, unique, wait_until};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

const BROKERS: &str = common::KAFKA_BROKERS;
/// Partitions of an auto-created topic (scripts/services.sh configures the broker so).
const PARTITIONS: i32 = 4;

fn simulate_kafka(topic: &str, devices: usize, count: u64, seed: u64) {
    let output = Command::new(env!("CARGO_BIN_EXE_tidewatch"))
        .args(["simulate", "--kafka", BROKERS, "--topic", topic])
        .args(["--devices", &devices.to_string(), "--count", &count.to_string()])
        .args(["--seed", &seed.to_string(), "--interval-ms", "1"])
        .output()
        .expect("simulate runs");
    assert!(
        output.status.success(),
        "simulate --kafka failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("acknowledged {count}")), "{stderr}");
}

/// Every message of `topic` from the start of each partition, until `count` distinct ones
/// arrived: per partition, in order, as (key, payload).
fn consume(topic: &str, count: usize, timeout: Duration) -> BTreeMap<i32, Vec<(String, String)>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        assignment.add_partition_offset(topic, partition, Offset::Beginning).expect("partition");
    }
    consumer.assign(&assignment).expect("assign");
    let mut messages: BTreeMap<i32, Vec<(String, String)>> = BTreeMap::new();
    let mut distinct: BTreeSet<(String, String)> = BTreeSet::new();
    let deadline = Instant::now() + timeout;
    while distinct.len() < count {
        let seen = distinct.len();
        assert!(
            Instant::now() < deadline,
            "only {seen} of {count} messages arrived in {topic} within {timeout:?}"
        );
        let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) else { continue };
        let key = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
        let payload = String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned();
        distinct.insert((key.clone(), payload.clone()));
        messages.entry(message.partition()).or_default().push((key, payload));
    }
    messages
}

fn write_pipeline(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("pipeline file");
    path
}

// ---------------------------------------------------------------------------------------------
// The check
// ---------------------------------------------------------------------------------------------

#[test]
fn cloud_pipeline_counts_exactly_what_simulate_produced_and_commits_its_offsets() {
    let _serial = common::kafka_serial();
    common::require_kafka();
    let topic = unique("cloud");
    let dir = tempfile::tempdir().expect("tempdir");
    let lake = format!("file://{}", dir.path().join("lake").display());
    let env = [
        ("TIDEWATCH_KAFKA_BROKERS", BROKERS.to_owned()),
        ("TIDEWATCH_KAFKA_TOPIC", topic.clone()),
        ("TIDEWATCH_KAFKA_GROUP", unique("cloud-group")),
        ("TIDEWATCH_ALERT_WEBHOOK_URL", "http://127.0.0.1:9/alerts".to_owned()),
        ("TIDEWATCH_STATE_DIR", dir.path().display().to_string()),
        ("TIDEWATCH_LAKE_URL", lake.clone()),
        ("TIDEWATCH_CHECKPOINT_URL", dir.path().join("checkpoints").display().to_string()),
    ];
    let pipeline = root().join("pipelines/cloud.toml");
    let cloud = Process::run(&pipeline, &env, dir.path().join("cloud-1.log"));
    // Ready only once both workers' consumers have their partitions (the topic is created by
    // the subscription).
    wait_until("/readyz of the cloud pipeline", Duration::from_secs(60), || cloud.ready());
    simulate_kafka(&topic, 50, 20_000, 1);
    wait_until("20000 records received by the kafka source", Duration::from_secs(60), || {
        cloud.received("kafka") >= 20_000
    });
    // Exactly: nothing counted twice. Every partition reports its lag (librdkafka's
    // statistics, once a second per consumer), and it comes down to 0.
    let lag_series = |address: &str| {
        http_get(address, "/metrics")
            .map(|(_, body)| {
                body.lines()
                    .filter(|line| {
                        line.starts_with("tidewatch_kafka_consumer_lag{") && line.contains(&topic)
                    })
                    .count()
            })
            .unwrap_or(0)
    };
    wait_until("a lag of 0 on every partition", Duration::from_secs(15), || {
        lag_series(&cloud.address) == PARTITIONS as usize
            && metric_sum(&cloud.address, "tidewatch_kafka_consumer_lag", &[&topic]) == Some(0.0)
    });
    assert_eq!(cloud.received("kafka"), 20_000);
    assert_eq!(cloud.received("normalize"), 20_000);
    let log = cloud.stop();
    // The lake has every reading once: a device, an event time and the five features.
    let read = common::read_lake(&lake, &[], true);
    assert_eq!(read["num_rows"], 20_000, "{log}");
    assert_eq!(read["unreadable"], serde_json::json!([]));
    for column in ["device", "time", "vibration", "current", "pressure", "temperature", "flow"] {
        assert!(read["columns"].get(column).is_some(), "no column {column} in the lake");
    }

    // A restart of the same group reads nothing again: the offsets were committed.
    let again = Process::run(&pipeline, &env, dir.path().join("cloud-2.log"));
    wait_until("/readyz after the restart", Duration::from_secs(60), || again.ready());
    simulate_kafka(&topic, 5, 100, 2);
    wait_until("the 100 new records", Duration::from_secs(60), || again.received("kafka") >= 100);
    wait_until("the consumer lag at 0", Duration::from_secs(10), || {
        metric_sum(&again.address, "tidewatch_kafka_consumer_lag", &[&topic]) == Some(0.0)
    });
    assert_eq!(again.received("kafka"), 100, "{}", again.log());
    again.stop();
}

// ---------------------------------------------------------------------------------------------
// A group's committed offsets when the source assigns the partitions itself
// ---------------------------------------------------------------------------------------------

/// `stop_at_end` (each worker takes a fixed share of the partitions, no group rebalance): a
/// run reads from the offsets its group committed in the run before, and a new group from the
/// start of the topic.
#[test]
fn a_run_to_the_end_resumes_at_the_offsets_its_group_committed() {
    let _serial = common::kafka_serial();
    common::require_kafka();
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = unique("resume");
    let group = unique("resume-group");
    let run = |group: &str, name: &str| -> usize {
        let out = dir.path().join(format!("{name}.jsonl"));
        let pipeline_table = "[pipeline]\nname = \"resume\"\nworkers = 2\n";
        let text = readings_to_file(pipeline_table, &topic, group, "stop_at_end = true", &out);
        let pipeline = write_pipeline(dir.path(), &format!("{name}.toml"), &text);
        Process::run(&pipeline, &[], dir.path().join(format!("{name}.log")))
            .wait_exit(Duration::from_secs(120));
        common::json_lines(&out).len()
    };
    simulate_kafka(&topic, 10, 1_000, 1);
    assert_eq!(run(&group, "first"), 1_000, "a new group reads the topic from its start");
    simulate_kafka(&topic, 10, 500, 2);
    assert_eq!(run(&group, "second"), 500, "the group goes on where it committed");
    assert_eq!(run(&unique("other-group"), "other"), 1_500, "another group reads it all");
}

// ---------------------------------------------------------------------------------------------
// Two members of one group
// ---------------------------------------------------------------------------------------------

fn split_pipeline(topic: &str, group: &str, out: &Path) -> String {
    let pipeline_table = "[pipeline]\nname = \"split\"\nworkers = 1\nidle_timeout_ms = 500\n";
    let source_options = "session_timeout_ms = 6000\ncommit_interval_ms = 200";
    readings_to_file(pipeline_table, topic, group, source_options, out)
}

/// A pipeline: `pipeline_table`, the Kafka readings of `topic` in consumer group `group`
/// ([`common::kafka_readings_toml`]) and a file sink of the readings to `out`.
fn readings_to_file(
    pipeline_table: &str,
    topic: &str,
    group: &str,
    source_options: &str,
    out: &Path,
) -> String {
    let readings = common::kafka_readings_toml(topic, group, source_options);
    let sink = format!(
        "[sinks.out]\ntype = \"file\"\ninputs = [\"readings\"]\npath = \"{}\"\n",
        out.display()
    );
    format!("{pipeline_table}{readings}\n{sink}")
}

/// The (device, time) of every reading a file sink wrote.
fn readings_of(path: &Path) -> Vec<(String, i64)> {
    common::json_lines(path)
        .into_iter()
        .map(|line| {
            (
                line["device"].as_str().unwrap_or_default().to_owned(),
                line["time_ms"].as_i64().unwrap_or_default(),
            )
        })
        .collect()
}

#[test]
fn two_consumers_split_the_partitions_and_one_takes_over_when_the_other_dies() {
    let _serial = common::kafka_serial();
    common::require_kafka();
    let topic = unique("split");
    let group = unique("split-group");
    let dir = tempfile::tempdir().expect("tempdir");
    let (out_a, out_b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    let a = Process::run(
        &write_pipeline(dir.path(), "a.toml", &split_pipeline(&topic, &group, &out_a)),
        &[],
        dir.path().join("a.log"),
    );
    wait_until("the first member's assignment", Duration::from_secs(60), || a.ready());
    let b = Process::run(
        &write_pipeline(dir.path(), "b.toml", &split_pipeline(&topic, &group, &out_b)),
        &[],
        dir.path().join("b.log"),
    );
    wait_until("the second member's assignment", Duration::from_secs(60), || b.ready());
    // Both members hold partitions once the cooperative rebalance settled: each receives some.
    simulate_kafka(&topic, 40, 4_000, 1);
    wait_until("4000 records split over both members", Duration::from_secs(60), || {
        a.received("kafka") + b.received("kafka") >= 4_000
    });
    let (first_a, first_b) = (a.received("kafka"), b.received("kafka"));
    assert!(first_a > 0 && first_b > 0, "one member got nothing: a {first_a}, b {first_b}");
    assert_eq!(first_a + first_b, 4_000, "each record went to one member");

    // A crash: its partitions go to the survivor after the session timeout.
    a.crash();
    simulate_kafka(&topic, 40, 4_000, 2);
    wait_until("the survivor took over every partition", Duration::from_secs(60), || {
        let mut seen: BTreeSet<(String, i64)> = readings_of(&out_a).into_iter().collect();
        seen.extend(readings_of(&out_b));
        seen.len() >= 8_000
    });
    let b_after = b.received("kafka");
    b.stop();
    let from_a = readings_of(&out_a);
    let from_b = readings_of(&out_b);
    let distinct: BTreeSet<&(String, i64)> = from_a.iter().chain(&from_b).collect();
    assert_eq!(distinct.len(), 8_000, "every produced record was read");
    // At-least-once: what the dead member processed after its last commit is read again.
    let duplicates = from_a.len() + from_b.len() - distinct.len();
    assert!(duplicates < 4_000, "{duplicates} duplicates");
    assert!(b_after >= first_b + 4_000 - first_a.min(4_000), "the survivor read the new records");
}

// ---------------------------------------------------------------------------------------------
// Store and forward through a broker outage
// ---------------------------------------------------------------------------------------------

fn services(action: &str) {
    let status = Command::new(root().join("scripts/services.sh"))
        .args([action, "kafka"])
        .current_dir(root())
        .stdout(Stdio::null())
        .status()
        .expect("scripts/services.sh runs");
    assert!(status.success(), "scripts/services.sh {action} kafka failed");
}

/// Starts the broker again if the test fails while it is stopped.
struct RestartBroker;
impl Drop for RestartBroker {
    fn drop(&mut self) {
        if TcpStream::connect_timeout(&BROKERS.parse().expect("address"), Duration::from_secs(1))
            .is_err()
        {
            services("start");
        }
    }
}

/// Publishes `count` readings per device over MQTT, `ts` counting up from `first`.
fn publish_readings(publisher: &Publisher, prefix: &str, devices: usize, first: i64, count: i64) {
    for step in 0..count {
        for device in 0..devices {
            let payload = serde_json::json!({
                "device": format!("pump-{device}"),
                "ts": first + step,
                "vibration": 1.0, "current": 2.0, "pressure": 3.0, "temperature": 4.0, "flow": 5.0,
                "anomaly": 0,
            });
            publisher.publish(
                &format!("factory/{prefix}/pump/pump-{device}/telemetry"),
                1,
                payload.to_string(),
            );
        }
    }
}

#[test]
fn edge_buffer_ships_every_reading_in_order_after_an_outage_and_a_crash() {
    let _serial = common::kafka_serial();
    common::require_kafka();
    common::require_broker();
    let topic = unique("edge");
    let prefix = unique("site");
    let dir = tempfile::tempdir().expect("tempdir");
    let env = [
        ("TIDEWATCH_KAFKA_BROKERS", BROKERS.to_owned()),
        ("TIDEWATCH_KAFKA_TOPIC", topic.clone()),
        ("TIDEWATCH_EDGE_CLIENT_ID", unique("edge")),
        ("TIDEWATCH_STATE_DIR", dir.path().display().to_string()),
    ];
    let pipeline = root().join("pipelines/edge.toml");
    let devices = 5;
    let publisher = Publisher::new(&unique("edge-pub"));
    let edge = Process::run(&pipeline, &env, dir.path().join("edge-1.log"));
    wait_until("/readyz of the edge pipeline", Duration::from_secs(60), || edge.ready());

    // With the link up, readings flow through the buffer to Kafka.
    let base = 1_700_000_000_000_i64;
    publish_readings(&publisher, &prefix, devices, base, 100);
    let _ = consume(&topic, 500, Duration::from_secs(60));

    // The link goes down for 30 s: detection goes on, readings wait on disk.
    let _restart = RestartBroker;
    services("stop");
    let down = Instant::now();
    publish_readings(&publisher, &prefix, devices, base + 100, 200);
    wait_until("1000 readings buffered", Duration::from_secs(60), || {
        metric_sum(&edge.address, "tidewatch_kafka_buffer_records", &[]).unwrap_or(0.0) >= 1_000.0
    });
    assert!(edge.received("normalize") >= 1_500, "detection goes on during the outage");
    // tidewatch crashes during the outage; the buffer survives it.
    edge.crash();
    publish_readings(&publisher, &prefix, devices, base + 300, 100);
    let edge = Process::run(&pipeline, &env, dir.path().join("edge-2.log"));
    wait_until(
        "the restarted pipeline buffered the newest readings too",
        Duration::from_secs(60),
        || {
            metric_sum(&edge.address, "tidewatch_kafka_buffer_records", &[]).unwrap_or(0.0)
                >= 1_500.0
        },
    );
    // The outage lasts 30 s: the point of this test, not a synchronisation.
    std::thread::sleep(Duration::from_secs(30).saturating_sub(down.elapsed()));
    services("start");

    // Every reading arrives, in order per device (at-least-once: a reading sent before the
    // crash and not yet acknowledged may arrive twice; its first copy keeps the order).
    let expected = devices * 400;
    let messages = consume(&topic, expected, Duration::from_secs(120));
    let mut times: HashMap<String, Vec<i64>> = HashMap::new();
    for (_, partition) in messages {
        for (key, payload) in partition {
            let value: serde_json::Value = serde_json::from_str(&payload).expect("JSON reading");
            assert_eq!(value["device"].as_str(), Some(key.as_str()), "keyed by device");
            times.entry(key).or_default().push(value["ts"].as_i64().expect("ts"));
        }
    }
    assert_eq!(times.len(), devices);
    for (device, times) in &times {
        let mut first_seen = Vec::new();
        let mut seen = BTreeSet::new();
        for time in times {
            if seen.insert(*time) {
                first_seen.push(*time);
            }
        }
        let expected: Vec<i64> = (base..base + 400).collect();
        assert_eq!(first_seen, expected, "{device}: every reading, in order");
    }
    edge.stop();
}
