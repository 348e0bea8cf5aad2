//! Robustness through the real binary:
//!
//! - secrets (an MQTT password, a Kafka SASL password, a webhook token and HMAC secret, S3
//!   keys) set in the environment never appear in what tidewatch prints: `validate` of a
//!   good and of a bad file, `graph`, the logs of a run at debug level against a real broker
//!   and unreachable endpoints, and `/metrics`;
//! - a closed stdout (`tidewatch run ... | head -1`) stops the pipeline cleanly, with one log
//!   line.
#![cfg(all(feature = "mqtt", feature = "kafka", feature = "s3"))]

mod common;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::process::{Process, http_get};
use common::{unique, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_tidewatch");

/// The secrets of the test, by environment variable; each value is unique to this run.
fn secrets() -> Vec<(&'static str, String)> {
    [
        "TW_SECRET_MQTT",
        "TW_SECRET_KAFKA",
        "TW_SECRET_HMAC",
        "TW_SECRET_TOKEN",
        "AWS_SECRET_ACCESS_KEY",
    ]
    .into_iter()
    .map(|name| (name, unique(&format!("s3cr3t-{}", name.to_lowercase()))))
    .collect()
}

/// MQTT (the test broker, with a user and password) -> normalize -> windows -> stats ->
/// threshold -> a webhook (a token header, HMAC signed; its endpoint answers 500), a Kafka
/// sink (SASL, unreachable) and Parquet on S3 (unreachable).
fn pipeline(topic: &str, webhook: &str, lake: &str) -> String {
    format!(
        r#"
[pipeline]
name = "secrets"
idle_timeout_ms = 200
out_of_orderness_ms = 0

[sources.telemetry]
type = "mqtt"
url = "mqtt://127.0.0.1:1883"
topics = ["{topic}/+"]

[sources.telemetry.connection]
username = "tidewatch"
password = "${{TW_SECRET_MQTT}}"

[transforms.readings]
type = "normalize"
inputs = ["telemetry"]
device_field = "device"
timestamp_field = "ts"
timestamp_format = "unix_ms"
features = ["v"]

[transforms.windows]
type = "window"
inputs = ["readings"]
size_readings = 2

[transforms.scores]
type = "stats"
inputs = ["windows"]
threshold = 0.5
warmup_windows = 1

[transforms.alerts]
type = "threshold"
inputs = ["scores"]
n = 1
m = 1
hysteresis = 1

[sinks.hook]
type = "webhook"
inputs = ["alerts"]
url = "{webhook}"
secret_env = "TW_SECRET_HMAC"
drain_timeout_ms = 500
dead_letter_path = "hook-dead-letters.jsonl"
headers = {{ Authorization = "Bearer ${{TW_SECRET_TOKEN}}" }}

[sinks.uplink]
type = "kafka"
inputs = ["readings"]
brokers = "127.0.0.1:1"
topic = "secrets"
flush_timeout_ms = 500

[sinks.uplink.sasl]
mechanism = "PLAIN"
username = "tidewatch"
password = "${{TW_SECRET_KAFKA}}"

[sinks.lake]
type = "parquet"
inputs = ["scores"]
path = "{lake}"
drain_timeout_ms = 500
spill_dir = "spill"

[sinks.lake.s3]
endpoint = "http://127.0.0.1:1"
"#
    )
}

/// An HTTP endpoint that answers every request with 500 and counts them.
fn failing_endpoint() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("address");
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&count);
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
            let mut buf = [0_u8; 65536];
            let _ = stream.read(&mut buf);
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = stream.write_all(
                b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            );
        }
    });
    (format!("http://{address}/hook"), count)
}

/// Fails naming every secret of `secrets` found in `text` (`what` says where).
fn assert_no_secret(what: &str, text: &str, secrets: &[(&str, String)]) {
    for (name, value) in secrets {
        assert!(!text.contains(value.as_str()), "{what} shows the secret {name}:\n{text}");
    }
}

fn run_command(args: &[&str], env: &[(&str, String)]) -> String {
    let mut command = Command::new(BIN);
    command.args(args).env("RUST_LOG", "debug");
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().expect("tidewatch runs");
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn secrets_never_appear_in_logs_errors_metrics_graph_or_validate() {
    common::require_broker();
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = secrets();
    let mut env = secrets.clone();
    env.push(("AWS_ACCESS_KEY_ID", "tidewatch-test-key".to_owned()));
    let topic = unique("secrets");
    let (webhook, requests) = failing_endpoint();
    let text = pipeline(&topic, &webhook, "s3://tidewatch-secrets/lake");
    let good = dir.path().join("good.toml");
    std::fs::write(&good, &text).expect("pipeline");
    // A bad file: errors on the lines that hold the secrets.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        text.replace("password = \"${TW_SECRET_MQTT}\"", "passwrd = \"${TW_SECRET_MQTT}\"")
            .replace("username = \"tidewatch\"\npassword", "username = 5\npassword")
            .replace("Authorization = ", "\"bad header\" = "),
    )
    .expect("pipeline");
    let good = good.display().to_string();
    let bad = bad.display().to_string();

    let validated = run_command(&["validate", &good], &env);
    assert!(validated.contains("ok"), "{validated}");
    assert_no_secret("validate", &validated, &secrets);
    let invalid = run_command(&["validate", &bad], &env);
    assert!(invalid.contains("passwrd"), "the bad file's errors are reported:\n{invalid}");
    assert_no_secret("validate of a bad file", &invalid, &secrets);
    for format in ["mermaid", "dot"] {
        let graph = run_command(&["graph", &good, "--format", format], &env);
        assert!(graph.contains("hook"), "{graph}");
        assert_no_secret("graph", &graph, &secrets);
    }

    // A run: the broker accepts the user (the plain listener takes any), the webhook answers
    // 500, Kafka and S3 are unreachable.
    let mut run_env = env.clone();
    run_env.push(("RUST_LOG", "debug".to_owned()));
    let process = Process::run(&common::root().join(&good), &run_env, dir.path().join("run.log"));
    wait_until("the pipeline is ready", Duration::from_secs(60), || process.ready());
    let publisher = common::Publisher::new(&unique("secrets-pub"));
    for (step, value) in [1.0, 1.0, 1.0, 1.0, 50.0, 50.0].into_iter().enumerate() {
        let payload = serde_json::json!({"device": "d1", "ts": 1_700_000_000_000_i64 + step as i64, "v": value});
        publisher.publish(&format!("{topic}/d1"), 1, payload.to_string());
    }
    publisher.wait_acked(6, Duration::from_secs(30));
    wait_until("the webhook is called", Duration::from_secs(60), || {
        requests.load(std::sync::atomic::Ordering::SeqCst) > 0
    });
    let (_, metrics) = http_get(&process.address, "/metrics").expect("/metrics");
    assert!(metrics.contains("tidewatch_component_received_events_total"), "{metrics}");
    assert_no_secret("/metrics", &metrics, &secrets);
    let log = process.stop();
    assert!(log.contains("DEBUG"), "debug logs were on:\n{log}");
    assert_no_secret("the run's logs", &log, &secrets);
}

#[test]
fn a_closed_stdout_stops_the_pipeline_with_one_line() {
    let mut child = Command::new(BIN)
        .args(["run", &common::root().join("pipelines/demo.toml").display().to_string()])
        .args(["--http-address", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tidewatch runs");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("a line");
    assert!(line.starts_with('{'), "a JSON line: {line}");
    // The reader goes away, as `head -1` does.
    drop(stdout);
    let mut status = None;
    wait_until("tidewatch stops", Duration::from_secs(30), || {
        status = child.try_wait().expect("wait");
        status.is_some()
    });
    let mut stderr = String::new();
    child.stderr.take().expect("stderr").read_to_string(&mut stderr).expect("stderr");
    assert!(status.is_some_and(|status| status.success()), "exit status:\n{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("stdout") || line.contains("Broken pipe"))
        .collect();
    assert_eq!(lines.len(), 1, "one line about the closed stdout:\n{stderr}");
    assert!(!stderr.contains("WARN") && !stderr.contains("ERROR"), "{stderr}");
}

/// Where a message must land: the component and `error_type` that reject it, or `None` for a
/// good reading.
type Outcome = Option<(&'static str, &'static str)>;

/// Every kind of hostile message lands on the error output of the component that rejects it,
/// with its `error_type`, counted; the good ones around them go through; nothing crashes.
#[test]
fn hostile_messages_land_on_the_error_outputs_typed_and_counted() {
    common::require_broker();
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = unique("hostile");
    let text = format!(
        r#"
[pipeline]
name = "hostile"
{readings}
[sinks.good]
type = "blackhole"
inputs = ["readings"]

[sinks.rejected]
type = "file"
inputs = ["in.errors", "readings.errors"]
path = "rejected.jsonl"
"#,
        // Two devices at most: a third is refused, the first two still pass.
        readings = common::mqtt_readings_toml(&format!("{topic}/+"), &["v"]) + "max_devices = 2\n",
    );
    let file = dir.path().join("hostile.toml");
    std::fs::write(&file, text).expect("pipeline");
    let process = Process::run(&file, &[], dir.path().join("run.log"));
    wait_until("the pipeline is ready", Duration::from_secs(60), || process.ready());

    let t = 1_700_000_000_000_i64;
    let reading = |ts: &str, v: &str| format!(r#"{{"device":"d1","ts":{ts},"v":{v}}}"#);
    let deep = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let table: Vec<(Vec<u8>, Outcome)> = vec![
        (reading(&t.to_string(), "1").into_bytes(), None),
        (br#"{"device":"d1","ts":"#.to_vec(), Some(("readings", "parse"))),
        (b"\xff\xfe{\"device\":\"d1\"}".to_vec(), Some(("readings", "parse"))),
        (reading(&t.to_string(), "1e400").into_bytes(), Some(("readings", "parse"))),
        (br#"{"device":"d1","v":1}"#.to_vec(), Some(("readings", "missing_field"))),
        (reading("253402300800000", "1").into_bytes(), Some(("readings", "bad_timestamp"))),
        (reading("-62135596800001", "1").into_bytes(), Some(("readings", "bad_timestamp"))),
        (reading("\"yesterday\"", "1").into_bytes(), Some(("readings", "bad_timestamp"))),
        (Vec::new(), Some(("in", "empty_payload"))),
        (
            format!(r#"{{"device":"d1","ts":{t},"v":1,"pad":"{}"}}"#, "x".repeat(3 << 20))
                .into_bytes(),
            Some(("readings", "too_large")),
        ),
        (reading(&t.to_string(), &deep(200_000)).into_bytes(), Some(("readings", "bad_value"))),
        // Deep nesting where nothing is read: skipped without recursion, the reading is good.
        (format!(r#"{{"device":"d1","ts":{t},"v":2,"x":{}}}"#, deep(200_000)).into_bytes(), None),
        // Not finite as f32: NaN, infinity, beyond f32's range.
        (reading(&t.to_string(), "\"NaN\"").into_bytes(), Some(("readings", "bad_value"))),
        (reading(&t.to_string(), "\"-inf\"").into_bytes(), Some(("readings", "bad_value"))),
        (reading(&t.to_string(), "1e39").into_bytes(), Some(("readings", "bad_value"))),
        (format!(r#"{{"device":"d2","ts":{t},"v":1}}"#).into_bytes(), None),
        (
            format!(r#"{{"device":"d3","ts":{t},"v":1}}"#).into_bytes(),
            Some(("readings", "too_many_devices")),
        ),
        (reading(&(t + 1).to_string(), "3").into_bytes(), None),
    ];
    let publisher = common::Publisher::new(&unique("hostile-pub"));
    for (payload, _) in &table {
        publisher.publish(&format!("{topic}/d1"), 1, payload.clone());
    }
    publisher.wait_acked(table.len() as u64, Duration::from_secs(30));
    let good = table.iter().filter(|(_, expected)| expected.is_none()).count() as u64;
    let sent = |component: &str| {
        common::process::metric_sum(
            &process.address,
            "tidewatch_component_sent_events_total",
            &[&format!("component_id=\"{component}\"")],
        )
        .unwrap_or(0.0) as u64
    };
    let errors = |component: &str, error_type: &str| {
        common::process::metric_sum(
            &process.address,
            "tidewatch_component_errors_total",
            &[&format!("component_id=\"{component}\""), &format!("error_type=\"{error_type}\"")],
        )
        .unwrap_or(0.0) as u64
    };
    let rejected = table.len() as u64 - good;
    wait_until("every message accounted for", Duration::from_secs(30), || {
        process.received("file") >= rejected && sent("readings") >= good
    });
    let mut expected: std::collections::BTreeMap<(&str, &str), u64> = Default::default();
    for (_, outcome) in &table {
        if let Some(key) = outcome {
            *expected.entry(*key).or_default() += 1;
        }
    }
    for ((component, error_type), count) in &expected {
        assert_eq!(errors(component, error_type), *count, "{component} {error_type}");
    }
    assert_eq!(sent("readings"), good, "the good readings, and only them");
    assert!(matches!(http_get(&process.address, "/healthz"), Some((200, _))), "still healthy");
    process.stop();
    // Each rejected message is in the dead-letter file with its type and reason.
    let lines = common::json_lines(&dir.path().join("rejected.jsonl"));
    assert_eq!(lines.len() as u64, rejected);
    assert!(
        lines.iter().all(|line| line["reason"].as_str().is_some_and(|reason| !reason.is_empty()))
    );
    let too_large = lines.iter().find(|line| line["error_type"] == "too_large").expect("too_large");
    assert!(too_large["payload"].as_str().is_some_and(|payload| payload.len() <= 1024));
}

/// The largest `tidewatch_in_flight_records` seen while `running` runs, sampled until its
/// sink `out` received `count` records.
fn peak_in_flight(running: &common::Running, count: u64) -> f64 {
    let mut peak = 0.0_f64;
    wait_until("the slow sink receives everything", Duration::from_secs(120), || {
        for family in running.context.metrics.registry().gather() {
            if family.name() == "tidewatch_in_flight_records" {
                for metric in family.get_metric() {
                    peak = peak.max(metric.get_gauge().get_value());
                }
            }
        }
        running.received("out", "blackhole") >= count
    });
    peak
}

/// Backpressure: a file read on worker 0 as fast as it goes, every device owned by worker 1,
/// whose sink is slow. Without a bound what worker 1 has not taken yet piles up in timely's
/// channel; with `max_in_flight_records` the source waits, and the pile stays at the bound
/// (plus a batch in each channel), and nothing is lost either way.
#[test]
fn a_slow_sink_holds_the_source_back_at_the_in_flight_bound() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Devices that worker 1 of 2 owns.
    let devices: Vec<String> = (0..)
        .map(|index| format!("pump-{index}"))
        .filter(|name| tidewatch::api::DeviceId::intern(name).worker(2) == 1)
        .take(4)
        .collect();
    let count = 20_000_u64;
    let mut lines = String::new();
    for index in 0..count {
        let device = &devices[index as usize % devices.len()];
        lines.push_str(&format!(
            "{{\"device\":\"{device}\",\"ts\":{},\"v\":1}}\n",
            1_700_000_000_000_u64 + index
        ));
    }
    let input = dir.path().join("input.jsonl");
    std::fs::write(&input, lines).expect("input");
    let pipeline = |bound: u64| {
        format!(
            r#"
[pipeline]
name = "overload"
workers = 2
out_of_orderness_ms = 0
# Worker 1's normalize reads nothing: it follows worker 0's watermark after 10 ms, so that
# windows flow to the sink as they close.
idle_timeout_ms = 10
max_in_flight_records = {bound}

[sources.in]
type = "file"
path = "{input}"
format = "json"

[transforms.readings]
type = "normalize"
inputs = ["in"]
device_field = "device"
timestamp_field = "ts"
timestamp_format = "unix_ms"
features = ["v"]

[transforms.windows]
type = "window"
inputs = ["readings"]
size_readings = 1

[sinks.out]
type = "blackhole"
inputs = ["windows"]
records_per_sec = 2500
"#,
            input = input.display()
        )
    };
    let bound = 2_000_u64;
    let bounded = common::Running::start(&pipeline(bound), &[], 2);
    let peak = peak_in_flight(&bounded, count);
    bounded.stop().expect("clean stop");
    // Beyond the bound: the source's last batch (1024 lines), counted once in each of the
    // stages it passes before the sink (raw, readings, windows), and one more; and the
    // windows of a batch before it, which the window stage holds until the watermark passes
    // (worker 1 follows after its 10 ms idle timeout) and may release together with them.
    assert!(peak <= (bound + 5 * 1024) as f64, "in flight peaked at {peak}, bound {bound}");
    let unbounded = common::Running::start(&pipeline(0), &[], 2);
    let peak_unbounded = peak_in_flight(&unbounded, count);
    unbounded.stop().expect("clean stop");
    assert!(
        peak_unbounded > (3 * bound) as f64,
        "without a bound the slow sink's backlog grows (peak {peak_unbounded}): the test \
         exercises the bound"
    );
}
