//! Helpers shared by the integration tests: loading and running pipelines, awaiting
//! conditions, and an MQTT publisher and subscriber (rumqttc, independent of the connectors)
//! for the tests against the Mosquitto on 127.0.0.1:1883.
#![allow(dead_code, unreachable_pub)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rumqttc::v5;
use tidewatch::engine::{Diagnostic, EngineError, Pipeline, RunContext, ValidationErrors};

pub mod process;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Loads pipeline text with `${VAR}` taken from `vars` only.
pub fn load(text: &str, vars: &[(&str, String)]) -> Result<Pipeline, ValidationErrors> {
    let vars: Vec<(String, String)> =
        vars.iter().map(|(name, value)| (name.to_string(), value.clone())).collect();
    tidewatch::engine::load_str(text, "test.toml", &root(), &tidewatch::builtins(), move |name| {
        vars.iter().find(|(candidate, _)| candidate == name).map(|(_, value)| value.clone())
    })
}

/// The text of a shipped pipeline file, `pipelines/<name>`.
pub fn shipped(name: &str) -> String {
    let path = root().join("pipelines").join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()))
}

/// Loads the text of a shipped pipeline (relative paths resolved against `pipelines/`) with
/// `${VAR}` taken from `vars` only: unset variables take their defaults.
pub fn load_shipped(text: &str, vars: &[(&str, String)]) -> Result<Pipeline, ValidationErrors> {
    let vars: Vec<(String, String)> =
        vars.iter().map(|(name, value)| (name.to_string(), value.clone())).collect();
    tidewatch::engine::load_str(
        text,
        "pipelines/shipped.toml",
        &root().join("pipelines"),
        &tidewatch::builtins(),
        move |name| {
            vars.iter().find(|(candidate, _)| candidate == name).map(|(_, value)| value.clone())
        },
    )
}

/// Loads and runs pipeline text on `workers` workers; returns the run context (metrics).
pub fn run(text: &str, vars: &[(&str, String)], workers: usize) -> RunContext {
    let pipeline =
        load(text, vars).unwrap_or_else(|errors| panic!("invalid test pipeline:\n{errors}"));
    let context = RunContext::default();
    tidewatch::run(&pipeline, workers, &context).expect("pipeline runs");
    context
}

/// Writes `count` JSON lines of readings to `path`: device `pump-{i % 10}`, one second apart
/// from 1 700 000 000 000 ms, and `value(i)` as their `value`.
pub fn write_pump_readings(path: &Path, count: u64, value: impl Fn(u64) -> u64) {
    let mut text = String::new();
    for i in 0..count {
        text.push_str(&format!(
            "{{\"device\":\"pump-{}\",\"ts\":{},\"value\":{}}}\n",
            i % 10,
            1_700_000_000_000_u64 + i * 1_000,
            value(i)
        ));
    }
    std::fs::write(path, text).expect("input");
}

/// The head of a pipeline that reads `in.jsonl` (of [`write_pump_readings`], at 400x) on two
/// workers with a checkpoint every second into `checkpoints`, into readings `readings` of the
/// feature `value`; the caller adds what follows.
pub fn checkpointed_readings_toml(checkpoints: &Path) -> String {
    format!(
        r#"
[pipeline]
workers = 2
checkpoint_interval_secs = 1
checkpoint_url = "{}"

[sources.in]
type = "file"
path = "in.jsonl"
speed = 400.0
timestamp_field = "ts"
timestamp_format = "unix_ms"

[transforms.readings]
type = "normalize"
inputs = ["in"]
device_field = "device"
timestamp_field = "ts"
timestamp_format = "unix_ms"
features = ["value"]
"#,
        checkpoints.display()
    )
}

/// The JSON lines of a file.
pub fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|line| serde_json::from_str(line).expect("every output line is JSON"))
        .collect()
}

/// The diagnostics of a fixture file.
pub fn diagnostics(fixture: &str) -> Vec<Diagnostic> {
    let path = root().join("tests/fixtures").join(fixture);
    match tidewatch::engine::load_file(&path, &tidewatch::builtins()) {
        Ok(pipeline) => pipeline.warnings,
        Err(errors) => errors.diagnostics,
    }
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, condition: impl FnMut() -> bool) {
    wait_until_or(what, timeout, condition, String::new);
}

/// [`wait_until`], and on time-out the panic message carries `context()` (e.g. the logs of
/// the processes waited on: CI keeps nothing else).
pub fn wait_until_or(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> bool,
    context: impl FnOnce() -> String,
) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}\n{}", context());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A topic prefix and id stem unique to this test run.
pub fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() % 1_000_000_000_000)
        .unwrap_or(0);
    format!("twtest-{name}-{}-{nanos}", std::process::id())
}

/// A pipeline running in a thread; stopped (drained) when dropped.
pub struct Running {
    pub context: RunContext,
    handle: Option<JoinHandle<Result<(), EngineError>>>,
}

impl Running {
    /// Loads `text` (variables from `vars` only) and runs it on `workers` workers.
    pub fn start(text: &str, vars: &[(&str, String)], workers: usize) -> Running {
        let pipeline = load(text, vars)
            .unwrap_or_else(|errors| panic!("invalid test pipeline:\n{errors}\n{text}"));
        Running::run(pipeline, workers)
    }

    /// Runs a loaded pipeline on `workers` workers.
    pub fn run(pipeline: Pipeline, workers: usize) -> Running {
        let context = RunContext::default();
        let shared = context.clone();
        let handle = std::thread::spawn(move || tidewatch::run(&pipeline, workers, &shared));
        Running { context, handle: Some(handle) }
    }

    pub fn received(&self, component: &str, kind: &str) -> u64 {
        self.context.metrics.received(component, kind)
    }

    pub fn errors(&self, component: &str) -> u64 {
        self.context.metrics.errors(component)
    }

    /// Asks the pipeline to stop and waits for it (drained, sinks closed).
    pub fn stop(mut self) -> Result<(), EngineError> {
        self.context.request_shutdown();
        self.join(Duration::from_secs(60))
    }

    /// Waits for the run to end by itself.
    pub fn join(&mut self, timeout: Duration) -> Result<(), EngineError> {
        let handle = self.handle.take().expect("running");
        let deadline = Instant::now() + timeout;
        while !handle.is_finished() {
            assert!(Instant::now() < deadline, "the pipeline did not stop within {timeout:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        handle.join().expect("the run thread does not panic")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.handle.is_some() {
            self.context.request_shutdown();
            let _ = self.join(Duration::from_secs(60));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// MQTT: the broker, a publisher and subscribers on rumqttc, independent of the connectors
// ---------------------------------------------------------------------------------------------

/// Fails the test unless a broker listens on 127.0.0.1:1883.
pub fn require_broker() {
    let address = "127.0.0.1:1883".parse().expect("address");
    TcpStream::connect_timeout(&address, Duration::from_secs(2)).expect(
        "no MQTT broker on 127.0.0.1:1883: start it with `scripts/services.sh start mosquitto` \
         (scripts/test.sh does)",
    );
}

fn qos_v4(qos: u8) -> rumqttc::QoS {
    match qos {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

/// A publisher counting the broker's acknowledgements.
pub struct Publisher {
    client: rumqttc::Client,
    acked: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Publisher {
    /// An MQTT 3.1.1 publisher on the plain listener, with a persistent session (so that
    /// publishes in flight when the broker restarts are sent again).
    pub fn new(client_id: &str) -> Publisher {
        let mut options = rumqttc::MqttOptions::new(client_id, "127.0.0.1", 1883);
        options.set_clean_session(false).set_inflight(200).set_keep_alive(Duration::from_secs(5));
        // Large payloads too (the robustness tests send some of several MiB).
        options.set_max_packet_size(32 << 20, 32 << 20);
        let (client, mut connection) = rumqttc::Client::new(options, 1_000);
        let acked = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&acked);
        let thread = std::thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))
                    | Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubComp(_)))
                    | Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Publish(0))) => {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    // The broker is restarting: retry shortly (not a synchronisation).
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        Publisher { client, acked, thread: Some(thread) }
    }

    /// Queues a publish (not retained).
    pub fn publish(&self, topic: &str, qos: u8, payload: impl Into<Vec<u8>>) {
        self.client.publish(topic, qos_v4(qos), false, payload).expect("publish queued");
    }

    /// Queues a retained publish (an empty payload clears the topic's retained message).
    pub fn publish_retained(&self, topic: &str, qos: u8, payload: impl Into<Vec<u8>>) {
        self.client.publish(topic, qos_v4(qos), true, payload).expect("publish queued");
    }

    /// Waits until the broker acknowledged `count` publishes (QoS 0: until they were sent).
    pub fn wait_acked(&self, count: u64, timeout: Duration) {
        wait_until("the broker's acknowledgements", timeout, || {
            self.acked.load(Ordering::SeqCst) >= count
        });
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let _ = self.client.disconnect();
        if let Some(thread) = self.thread.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Creates the persistent session `client_id` with a subscription to `filters`, then
/// disconnects: what is published from now on waits in the session for the pipeline.
pub fn prepare_session(client_id: &str, filters: &[String], qos: u8, protocol_v5: bool) {
    if protocol_v5 {
        let mut options = v5::MqttOptions::new(client_id, "127.0.0.1", 1883);
        options.set_clean_start(false).set_session_expiry_interval(Some(86_400));
        let (client, mut connection) = v5::Client::new(options, 10);
        let qos = match qos {
            0 => v5::mqttbytes::QoS::AtMostOnce,
            1 => v5::mqttbytes::QoS::AtLeastOnce,
            _ => v5::mqttbytes::QoS::ExactlyOnce,
        };
        client
            .subscribe_many(
                filters.iter().map(|filter| v5::mqttbytes::v5::Filter::new(filter.clone(), qos)),
            )
            .expect("subscribe");
        for event in connection.iter() {
            match event.expect("preparing the session") {
                v5::Event::Incoming(v5::mqttbytes::v5::Packet::SubAck(_)) => {
                    client.disconnect().expect("disconnect");
                }
                v5::Event::Outgoing(rumqttc::Outgoing::Disconnect) => break,
                _ => {}
            }
        }
    } else {
        let mut options = rumqttc::MqttOptions::new(client_id, "127.0.0.1", 1883);
        options.set_clean_session(false);
        let (client, mut connection) = rumqttc::Client::new(options, 10);
        let qos = qos_v4(qos);
        client
            .subscribe_many(
                filters.iter().map(|filter| rumqttc::SubscribeFilter::new(filter.clone(), qos)),
            )
            .expect("subscribe");
        for event in connection.iter() {
            match event.expect("preparing the session") {
                rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) => {
                    client.disconnect().expect("disconnect");
                }
                rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect) => break,
                _ => {}
            }
        }
    }
}

/// Messages as (topic, payload).
pub type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A subscriber collecting (topic, payload) of every message, subscribed when it returns.
pub struct Subscriber {
    pub messages: Received,
    client: rumqttc::Client,
}

impl Subscriber {
    pub fn new(client_id: &str, filter: &str) -> Subscriber {
        let mut options = rumqttc::MqttOptions::new(client_id, "127.0.0.1", 1883);
        options.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut connection) = rumqttc::Client::new(options, 100);
        client.subscribe(filter, rumqttc::QoS::AtLeastOnce).expect("subscribe");
        let messages: Received = Arc::default();
        let sink = Arc::clone(&messages);
        let (subscribed_tx, subscribed_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        let _ = subscribed_tx.send(());
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(publish))) => {
                        sink.lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner())
                            .push((publish.topic, publish.payload.to_vec()));
                    }
                    Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        });
        subscribed_rx.recv_timeout(Duration::from_secs(10)).expect("subscribed");
        Subscriber { messages, client }
    }

    pub fn count(&self) -> usize {
        self.messages.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).len()
    }

    /// A copy of the messages received so far, in arrival order.
    pub fn messages(&self) -> Vec<(String, Vec<u8>)> {
        self.messages.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.client.disconnect();
    }
}

/// The project's Python (`.venv`, made by scripts/python-env.sh).
pub fn python() -> PathBuf {
    let python = root().join(".venv/bin/python");
    assert!(python.exists(), "no .venv: run scripts/python-env.sh (scripts/test.sh does)");
    python
}

/// Trains a model with `training/train.py` on `data` into the folder `out`.
pub fn train(data: &Path, out: &Path, args: &[&str]) {
    let output = std::process::Command::new(python())
        .arg(root().join("training/train.py"))
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(args)
        .output()
        .expect("train.py runs");
    assert!(
        output.status.success(),
        "train.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CSV of `rows` readings of the five simulator features (deterministic noise).
pub fn simulator_training_csv(path: &Path, rows: usize) {
    let mut seed: u64 = 42;
    let mut text = String::from("datetime;vibration;current;pressure;temperature;flow\n");
    for row in 0..rows {
        text.push_str(&format!("2026-01-01 00:{:02}:{:02}", row / 60 % 60, row % 60));
        for _ in 0..5 {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            text.push_str(&format!(";{:.4}", (seed >> 33) as f64 / (1u64 << 31) as f64));
        }
        text.push('\n');
    }
    std::fs::write(path, text).expect("csv");
}

/// Every row of a lake as a sorted list of JSON texts (the partition columns left out).
pub fn lake_rows(url: &str, env: &[(String, String)]) -> Vec<String> {
    let read = read_lake(url, env, true);
    assert_eq!(read["unreadable"], serde_json::json!([]), "{url}");
    let Some(columns) = read["columns"].as_object() else { return Vec::new() };
    let count = read["num_rows"].as_u64().expect("num_rows") as usize;
    let mut rows: Vec<String> = (0..count)
        .map(|row| {
            let fields: serde_json::Map<String, serde_json::Value> = columns
                .iter()
                .filter(|(name, _)| !matches!(name.as_str(), "date" | "hour"))
                .map(|(name, values)| (name.clone(), values[row].clone()))
                .collect();
            serde_json::Value::Object(fields).to_string()
        })
        .collect();
    rows.sort();
    rows
}

/// The `[sources.in]` (Kafka on 127.0.0.1:9092, `topic`, its own group, read to the end
/// with `stop_at_end`) and `[transforms.readings]` (normalize the simulator's JSON: device,
/// `ts` in ms, the five features) tables of the Kafka test pipelines, then 5 s windows
/// (`[transforms.windows]`). Nothing is late whatever the order partitions are read in when
/// the pipeline's `out_of_orderness_ms` covers the run.
pub fn kafka_readings_windows_toml(topic: &str, stop_at_end: bool) -> String {
    // Its own group: no committed offsets of another run.
    let source_options = format!("stop_at_end = {stop_at_end}");
    let readings = kafka_readings_toml(topic, &unique("group"), &source_options);
    format!(
        "{readings}\n[transforms.windows]\ntype = \"window\"\ninputs = [\"readings\"]\nsize_ms = 5000\n"
    )
}

/// `[sources.in]` (Kafka, the test broker, `topic`, consumer group `group`, then the lines of
/// `source_options`) and `[transforms.readings]` (normalize the simulator's JSON: device, `ts`
/// in ms, the five features).
pub fn kafka_readings_toml(topic: &str, group: &str, source_options: &str) -> String {
    format!(
        r#"
[sources.in]
type = "kafka"
brokers = "{KAFKA_BROKERS}"
topics = ["{topic}"]
group_id = "{group}"
{source_options}

[transforms.readings]
type = "normalize"
inputs = ["in"]
device_field = "device"
timestamp_field = "ts"
timestamp_format = "unix_ms"
features = ["vibration", "current", "pressure", "temperature", "flow"]
"#
    )
}

/// `[sources.in]` (MQTT, the test broker, QoS 1, the topic filter `filter`) and
/// `[transforms.readings]` (`normalize`: `device`, `ts` in unix ms and `features`).
pub fn mqtt_readings_toml(filter: &str, features: &[&str]) -> String {
    let features: Vec<String> = features.iter().map(|name| format!("\"{name}\"")).collect();
    format!(
        r#"
[sources.in]
type = "mqtt"
url = "mqtt://127.0.0.1:1883"
topics = ["{filter}"]
qos = 1

[transforms.readings]
type = "normalize"
inputs = ["in"]
device_field = "device"
timestamp_field = "ts"
timestamp_format = "unix_ms"
features = [{features}]
"#,
        features = features.join(", ")
    )
}

/// Asserts that the lake at `got` holds exactly the rows of the lake at `expected` (none
/// missing, none extra, none twice); returns how many.
pub fn assert_same_lake(expected: &str, got: &str) -> usize {
    let want = lake_rows(expected, &[]);
    let have = lake_rows(got, &[]);
    let missing = want.iter().filter(|row| have.binary_search(row).is_err()).count();
    let extra = have.iter().filter(|row| want.binary_search(row).is_err()).count();
    assert_eq!(
        (have.len(), missing, extra),
        (want.len(), 0, 0),
        "{got}: rows, missing and extra rows against {expected}"
    );
    assert_eq!(want, have, "{got}: the same rows as {expected}, none twice");
    want.len()
}

/// The Kafka broker of the tests (`scripts/services.sh start kafka`).
pub const KAFKA_BROKERS: &str = "127.0.0.1:9092";

/// One test at a time in a test binary for the tests that share the Kafka broker.
pub fn kafka_serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Fails with how to start it when no Kafka broker answers on 127.0.0.1:9092.
pub fn require_kafka() {
    let address = KAFKA_BROKERS.parse().expect("address");
    TcpStream::connect_timeout(&address, Duration::from_secs(2)).expect(
        "no Kafka broker on 127.0.0.1:9092: start it with `scripts/services.sh start kafka` \
         (scripts/test.sh does)",
    );
}

/// The `export K=V` lines of `scripts/services.sh env ceph` (endpoint and credentials of the
/// radosgw on 127.0.0.1:7480), when it answers.
pub fn ceph_env() -> Option<Vec<(String, String)>> {
    let address = "127.0.0.1:7480".parse().expect("address");
    TcpStream::connect_timeout(&address, Duration::from_secs(2)).ok()?;
    let output = std::process::Command::new(root().join("scripts/services.sh"))
        .args(["env", "ceph"])
        .output()
        .expect("scripts/services.sh env ceph");
    assert!(output.status.success(), "services.sh env ceph failed");
    let text = String::from_utf8(output.stdout).expect("utf8");
    Some(
        text.lines()
            .filter_map(|line| line.strip_prefix("export "))
            .filter_map(|line| line.split_once('='))
            .map(|(name, value)| (name.to_owned(), value.trim_matches('\'').to_owned()))
            .collect(),
    )
}

/// Reads the lake at `url` with pyarrow (tests/fixtures/lake_read.py).
pub fn read_lake(url: &str, env: &[(String, String)], rows: bool) -> serde_json::Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("lake.json");
    let mut command = std::process::Command::new(python());
    command.arg(root().join("tests/fixtures/lake_read.py")).arg(url).arg(&out);
    if rows {
        command.arg("--rows");
    }
    command.envs(env.iter().map(|(name, value)| (name.as_str(), value.as_str())));
    let status = command.status().expect("python runs");
    assert!(status.success(), "lake_read.py failed for {url}");
    serde_json::from_str(&std::fs::read_to_string(&out).expect("lake.json")).expect("json")
}

/// A fleet of 40 simulated pumps (400,000 readings at `rate_per_sec`) -> 5 s windows -> the
/// `autoencoder` of the folder `model` (watched every 20 ms) -> JSON lines in `out`: the
/// pipeline of the hot-swap tests.
pub fn hot_swap_pipeline(features: &[&str], model: &Path, out: &Path, rate_per_sec: u64) -> String {
    format!(
        r#"
[pipeline]
out_of_orderness_ms = 0
http_address = ""
[sources.fleet]
type = "simulator"
devices = 40
count = 400000
rate_per_sec = {rate_per_sec}
start_ms = 1700000000000
[transforms.readings]
type = "normalize"
inputs = ["fleet"]
device_field = "device"
timestamp_field = "ts"
features = {features:?}
[transforms.windows]
type = "window"
inputs = ["readings"]
size_ms = 5000
[transforms.model]
type = "autoencoder"
inputs = ["windows"]
model = "{model}"
reload_interval_ms = 20
max_batch_rows = 64
[sinks.out]
type = "file"
inputs = ["model"]
path = "{out}"
"#,
        model = model.display(),
        out = out.display(),
    )
}
