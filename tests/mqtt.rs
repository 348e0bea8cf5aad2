//! MQTT against a real Mosquitto on 127.0.0.1 (`scripts/services.sh start mosquitto`; the test
//! script starts it): plain, TLS + password and client-certificate listeners, clear errors,
//! QoS 1 and 2 end to end by count, a broker restart under load, a pipeline restart resuming
//! its persistent session, shared subscriptions, malformed messages, the sink, and
//! `tidewatch simulate`.
//!
//! Every test uses its own topic prefix and client ids. Messages carry sequence numbers;
//! the tests count distinct and duplicate sequence numbers in the pipeline's output.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use common::{Publisher, Running, Subscriber, prepare_session, require_broker, unique, wait_until};

const PLAIN: &str = "mqtt://127.0.0.1:1883";
const TLS: &str = "mqtts://127.0.0.1:8883";
const CLIENT_CERT: &str = "mqtts://127.0.0.1:8884";
const USER: &str = "tidewatch";
const PASSWORD: &str = "tidewatch-test";

/// Tests take it shared; the broker-restart test takes it exclusively.
static BROKER: RwLock<()> = RwLock::new(());

fn broker_shared() -> std::sync::RwLockReadGuard<'static, ()> {
    require_broker();
    BROKER.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn certs() -> PathBuf {
    common::root().join(".services/mosquitto")
}

// ---------------------------------------------------------------------------------------------
// Pipelines
// ---------------------------------------------------------------------------------------------

/// The test pipeline: mqtt -> normalize (feature `seq`, device from the topic) -> file sink,
/// errors of both to another file.
fn pipeline(name: &str, source: &str, dir: &Path) -> String {
    format!(
        r#"
[pipeline]
name = "{name}"
http_address = ""
idle_timeout_ms = 200

[sources.in]
type = "mqtt"
{source}

[transforms.norm]
type = "normalize"
inputs = ["in"]
topic_template = "+/{{device}}/data"
device_field = "device"
timestamp_field = "ts"
timestamp_format = "unix_ms"
features = ["seq"]

[sinks.out]
type = "file"
inputs = ["norm"]
path = "{out}"

[sinks.errors]
type = "file"
inputs = ["in.errors", "norm.errors"]
path = "{errors}"
"#,
        out = dir.join("readings.jsonl").display(),
        errors = dir.join("errors.jsonl").display(),
    )
}

/// Source options for `prefix/<device>/data` messages.
fn source(url: &str, filter: &str, client_id: &str, extra: &str) -> String {
    format!(
        "url = \"{url}\"\ntopics = [\"{filter}\"]\nqos = 1\nconnection.client_id = \"{client_id}\"\n{extra}\n"
    )
}

/// The distinct sequence numbers in readings files, and the number of readings.
fn sequences(paths: &[PathBuf]) -> (HashSet<u64>, usize) {
    let mut seen = HashSet::new();
    let mut lines = 0;
    for path in paths {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        for line in text.lines() {
            // The file may end in a line being written.
            let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            if let Some(seq) = value["values"]["seq"].as_f64() {
                seen.insert(seq as u64);
                lines += 1;
            }
        }
    }
    (seen, lines)
}

// ---------------------------------------------------------------------------------------------
// Sequence-numbered messages from the shared publisher (common::Publisher)
// ---------------------------------------------------------------------------------------------

impl Publisher {
    /// Publishes `{"ts":..., "seq": seq}` for each seq, spread over `devices` devices.
    fn publish_seqs(&self, prefix: &str, seqs: std::ops::Range<u64>, devices: u64, qos: u8) {
        let ts = tidewatch::api::records::now_ms();
        for seq in seqs {
            let topic = format!("{prefix}/dev-{}/data", seq % devices);
            self.publish(&topic, qos, format!("{{\"ts\":{},\"seq\":{seq}}}", ts + seq as i64));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// End to end, by count
// ---------------------------------------------------------------------------------------------

/// Publishes `count` messages at `qos` through a pipeline with the given source options and
/// checks that every one was processed exactly once.
fn end_to_end(
    name: &str,
    url: &str,
    extra: &str,
    vars: &[(&str, String)],
    count: u64,
    qos: u8,
    v5_session: bool,
) {
    let _broker = broker_shared();
    let prefix = unique(name);
    let dir = tempfile::tempdir().expect("tempdir");
    let client_id = format!("{prefix}-in");
    let filter = format!("{prefix}/+/data");
    prepare_session(&client_id, std::slice::from_ref(&filter), qos, v5_session);
    let extra = format!("{extra}\nqos = {qos}");
    let text = pipeline(name, &source(url, &filter, &client_id, &extra), dir.path());
    let text = text.replacen("qos = 1\n", "", 1);
    let running = Running::start(&text, vars, 1);
    let publisher = Publisher::new(&format!("{prefix}-pub"));
    publisher.publish_seqs(&prefix, 0..count, 7, qos);
    publisher.wait_acked(count, Duration::from_secs(60));
    wait_until("every message processed", Duration::from_secs(60), || {
        running.received("norm", "normalize") >= count
    });
    assert_eq!(running.received("in", "mqtt"), count);
    running.stop().expect("the pipeline ran");
    let (seen, lines) = sequences(&[dir.path().join("readings.jsonl")]);
    assert_eq!(seen.len() as u64, count, "distinct messages processed");
    assert_eq!(lines as u64, count, "no duplicates without a reconnect");
}

#[test]
fn qos1_end_to_end_every_message_is_processed_once() {
    end_to_end("qos1", PLAIN, "", &[], 5_000, 1, true);
}

#[test]
fn qos1_end_to_end_over_mqtt_3_1_1() {
    end_to_end("v4", PLAIN, "connection.protocol = \"v4\"", &[], 2_000, 1, false);
}

#[test]
fn qos2_end_to_end() {
    end_to_end("qos2", PLAIN, "", &[], 1_000, 2, true);
}

#[test]
fn tls_listener_with_password_from_the_environment() {
    let ca = certs().join("ca.crt").display().to_string();
    let extra = format!(
        "tls.ca_file = \"{ca}\"\nconnection.username = \"${{MQTT_USER}}\"\n\
         connection.password = \"${{MQTT_PASSWORD}}\""
    );
    let vars = [("MQTT_USER", USER.to_owned()), ("MQTT_PASSWORD", PASSWORD.to_owned())];
    end_to_end("tls", TLS, &extra, &vars, 1_000, 1, true);
}

#[test]
fn tls_listener_with_a_client_certificate() {
    let dir = certs();
    let extra = format!(
        "tls = {{ ca_file = \"{}\", client_cert_file = \"{}\", client_key_file = \"{}\" }}",
        dir.join("ca.crt").display(),
        dir.join("client.crt").display(),
        dir.join("client.key").display()
    );
    end_to_end("cert", CLIENT_CERT, &extra, &[], 500, 1, true);
}

// ---------------------------------------------------------------------------------------------
// Clear errors
// ---------------------------------------------------------------------------------------------

/// Runs a pipeline that must fail to start; returns its error text.
fn start_error(name: &str, url: &str, extra: &str) -> String {
    let _broker = broker_shared();
    let prefix = unique(name);
    let dir = tempfile::tempdir().expect("tempdir");
    let text = pipeline(
        name,
        &source(url, &format!("{prefix}/+/data"), &format!("{prefix}-in"), extra),
        dir.path(),
    );
    let started = Instant::now();
    let mut running = Running::start(&text, &[], 1);
    let error = running.join(Duration::from_secs(20)).expect_err("the pipeline must fail");
    assert!(started.elapsed() < Duration::from_secs(15), "failing took {:?}", started.elapsed());
    error.to_string()
}

#[test]
fn wrong_password_is_a_clear_error() {
    let ca = certs().join("ca.crt").display().to_string();
    let error = start_error(
        "badpw",
        TLS,
        &format!(
            "tls.ca_file = \"{ca}\"\nconnection.username = \"{USER}\"\n\
             connection.password = \"wrong\""
        ),
    );
    assert!(error.contains("component `in`"), "{error}");
    assert!(error.contains("refused the connection"), "{error}");
    assert!(
        error.contains("bad user name or password") || error.contains("not authorized"),
        "{error}"
    );
}

#[test]
fn untrusted_certificate_is_a_clear_error() {
    let ca = certs().join("other-ca.crt").display().to_string();
    let error = start_error(
        "untrusted",
        TLS,
        &format!(
            "tls.ca_file = \"{ca}\"\nconnection.username = \"{USER}\"\n\
             connection.password = \"{PASSWORD}\""
        ),
    );
    assert!(error.contains("component `in`"), "{error}");
    assert!(error.contains("TLS handshake failed"), "{error}");
    assert!(error.contains("not signed by a CA in ca_file"), "{error}");
}

#[test]
fn missing_broker_is_a_clear_error() {
    let error =
        start_error("nobroker", "mqtt://127.0.0.1:1", "connection.connect_timeout_secs = 1");
    assert!(error.contains("component `in`"), "{error}");
    assert!(error.contains("cannot connect"), "{error}");
}

// ---------------------------------------------------------------------------------------------
// Restarts
// ---------------------------------------------------------------------------------------------

fn services(action: &str) {
    let status = std::process::Command::new(common::root().join("scripts/services.sh"))
        .args([action, "mosquitto"])
        .status()
        .expect("scripts/services.sh runs");
    assert!(status.success(), "services.sh {action} mosquitto failed");
}

#[test]
fn broker_restart_under_qos1_load_loses_nothing() {
    require_broker();
    let _exclusive = BROKER.write().unwrap_or_else(|poisoned| poisoned.into_inner());
    let prefix = unique("restart");
    let dir = tempfile::tempdir().expect("tempdir");
    let client_id = format!("{prefix}-in");
    let filter = format!("{prefix}/+/data");
    prepare_session(&client_id, std::slice::from_ref(&filter), 1, true);
    let text = pipeline(
        "restart",
        &source(
            PLAIN,
            &filter,
            &client_id,
            "connection.reconnect_initial_ms = 50\nconnection.reconnect_max_ms = 500",
        ),
        dir.path(),
    );
    let running = Running::start(&text, &[], 1);
    let count: u64 = 30_000;
    let publisher = Publisher::new(&format!("{prefix}-pub"));
    let publishing = std::thread::scope(|scope| {
        // About 10,000 messages per second, so that the restart falls mid-stream.
        let feeder = scope.spawn(|| {
            for chunk in (0..count).step_by(500) {
                publisher.publish_seqs(&prefix, chunk..(chunk + 500).min(count), 10, 1);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        // Restart mid-stream, with messages in flight both ways.
        wait_until("a third of the messages processed", Duration::from_secs(60), || {
            running.received("norm", "normalize") >= count / 3
        });
        services("stop");
        services("start");
        feeder.join().is_ok()
    });
    assert!(publishing);
    publisher.wait_acked(count, Duration::from_secs(120));
    let output = dir.path().join("readings.jsonl");
    wait_until("every message processed after the restart", Duration::from_secs(120), || {
        sequences(std::slice::from_ref(&output)).0.len() as u64 >= count
    });
    running.stop().expect("the pipeline ran");
    let (seen, lines) = sequences(&[output]);
    assert_eq!(seen.len() as u64, count, "zero loss");
    let duplicates = lines as u64 - count;
    let errors = common::json_lines(&dir.path().join("errors.jsonl"));
    let count_of = |kind: &str| errors.iter().filter(|error| error["error_type"] == kind).count();
    let (lost, failed) = (count_of("connection_lost"), count_of("reconnect_failed"));
    eprintln!(
        "broker restart: {count} messages, {duplicates} duplicates, {lost} connection lost, \
         {failed} failed reconnect attempts"
    );
    assert_eq!(lost, 1, "the restart is one connection loss");
    assert_eq!(errors.len(), lost + failed, "no other error");
}

#[test]
fn stopped_pipeline_resumes_its_persistent_session() {
    let _broker = broker_shared();
    let prefix = unique("resume");
    let client_id = format!("{prefix}-in");
    let filter = format!("{prefix}/+/data");
    prepare_session(&client_id, std::slice::from_ref(&filter), 1, true);
    let first_dir = tempfile::tempdir().expect("tempdir");
    let second_dir = tempfile::tempdir().expect("tempdir");
    let options = source(PLAIN, &filter, &client_id, "batch_size = 64\nqueue_capacity = 256");
    let publisher = Publisher::new(&format!("{prefix}-pub"));
    let (before, during) = (6_000_u64, 4_000_u64);

    // Stop the first run mid-stream: some messages processed, some still at the broker.
    let first = Running::start(&pipeline("resume", &options, first_dir.path()), &[], 1);
    publisher.publish_seqs(&prefix, 0..before, 5, 1);
    wait_until("part of the stream processed", Duration::from_secs(60), || {
        first.received("norm", "normalize") >= 1_000
    });
    first.stop().expect("the first run stopped cleanly");
    publisher.wait_acked(before, Duration::from_secs(60));

    // Published while no pipeline runs: kept in the session.
    publisher.publish_seqs(&prefix, before..before + during, 5, 1);
    publisher.wait_acked(before + during, Duration::from_secs(60));

    let second = Running::start(&pipeline("resume", &options, second_dir.path()), &[], 1);
    let outputs =
        [first_dir.path().join("readings.jsonl"), second_dir.path().join("readings.jsonl")];
    wait_until("the session's messages processed", Duration::from_secs(60), || {
        sequences(&outputs).0.len() as u64 >= before + during
    });
    second.stop().expect("the second run stopped cleanly");
    let (seen, lines) = sequences(&outputs);
    assert_eq!(seen.len() as u64, before + during, "nothing lost across the restart");
    let (first_seen, _) = sequences(&outputs[..1]);
    assert!((first_seen.len() as u64) < before + during, "the first run stopped mid-stream");
    let duplicates = lines as u64 - before - during;
    eprintln!("pipeline restart: {} by the first run, {duplicates} duplicates", first_seen.len());
    // A graceful stop acknowledges every message it processed before it disconnects.
    assert_eq!(duplicates, 0, "nothing processed twice after a graceful stop");
}

// ---------------------------------------------------------------------------------------------
// Shared subscriptions
// ---------------------------------------------------------------------------------------------

#[test]
fn shared_subscription_splits_the_stream_exactly_once() {
    let _broker = broker_shared();
    let prefix = unique("shared");
    let filter = format!("$share/{prefix}/{prefix}/+/data");
    let count: u64 = 6_000;
    let dirs = [tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir")];
    let mut runs = Vec::new();
    for (index, dir) in dirs.iter().enumerate() {
        let client_id = format!("{prefix}-in-{index}");
        prepare_session(&client_id, std::slice::from_ref(&filter), 1, true);
        let text = pipeline("shared", &source(PLAIN, &filter, &client_id, ""), dir.path());
        runs.push(Running::start(&text, &[], 1));
    }
    let publisher = Publisher::new(&format!("{prefix}-pub"));
    publisher.publish_seqs(&prefix, 0..count, 11, 1);
    publisher.wait_acked(count, Duration::from_secs(60));
    wait_until("every message processed by one of the two", Duration::from_secs(60), || {
        runs.iter().map(|run| run.received("norm", "normalize")).sum::<u64>() >= count
    });
    for run in runs {
        run.stop().expect("the pipeline ran");
    }
    let outputs: Vec<PathBuf> = dirs.iter().map(|dir| dir.path().join("readings.jsonl")).collect();
    let (a, a_lines) = sequences(&outputs[..1]);
    let (b, b_lines) = sequences(&outputs[1..]);
    assert!(!a.is_empty() && !b.is_empty(), "both consumers got part of the stream");
    assert!(a.is_disjoint(&b), "no message went to both");
    assert_eq!((a_lines + b_lines) as u64, count, "every message exactly once");
    assert_eq!((a.len() + b.len()) as u64, count);
}

#[test]
fn shared_subscription_across_workers() {
    let _broker = broker_shared();
    let prefix = unique("workers");
    let filter = format!("$share/{prefix}/{prefix}/+/data");
    let client_id = format!("{prefix}-in");
    for worker in 0..2 {
        prepare_session(&format!("{client_id}-{worker}"), std::slice::from_ref(&filter), 1, true);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let text = pipeline("workers", &source(PLAIN, &filter, &client_id, ""), dir.path());
    let running = Running::start(&text, &[], 2);
    let count: u64 = 3_000;
    let publisher = Publisher::new(&format!("{prefix}-pub"));
    publisher.publish_seqs(&prefix, 0..count, 13, 1);
    publisher.wait_acked(count, Duration::from_secs(60));
    wait_until("every message processed", Duration::from_secs(60), || {
        running.received("norm", "normalize") >= count
    });
    running.stop().expect("the pipeline ran");
    let (seen, lines) = sequences(&[dir.path().join("readings.jsonl")]);
    assert_eq!((seen.len() as u64, lines as u64), (count, count));
}

// ---------------------------------------------------------------------------------------------
// Malformed messages
// ---------------------------------------------------------------------------------------------

#[test]
fn malformed_messages_are_counted_in_errors_and_the_pipeline_keeps_running() {
    let _broker = broker_shared();
    let prefix = unique("malformed");
    let dir = tempfile::tempdir().expect("tempdir");
    let client_id = format!("{prefix}-in");
    let filter = format!("{prefix}/#");
    prepare_session(&client_id, std::slice::from_ref(&filter), 1, true);
    let text = pipeline("malformed", &source(PLAIN, &filter, &client_id, ""), dir.path());
    let running = Running::start(&text, &[], 1);
    let publisher = Publisher::new(&format!("{prefix}-pub"));
    publisher.publish_seqs(&prefix, 0..100, 3, 1);
    for index in 0..10 {
        publisher.publish(
            &format!("{prefix}/dev-bad/data"),
            1,
            format!("{{\"ts\":1,\"seq\":{index}"),
        );
    }
    for _ in 0..5 {
        publisher.publish(&format!("{prefix}/dev-empty/data"), 1, Vec::new());
    }
    for _ in 0..4 {
        publisher.publish(&format!("{prefix}/no/template/match"), 1, "{\"ts\":1,\"seq\":1}");
    }
    publisher.publish_seqs(&prefix, 100..200, 3, 1);
    publisher.wait_acked(219, Duration::from_secs(60));
    wait_until("the valid messages after the bad ones", Duration::from_secs(60), || {
        running.context.metrics.sent("norm", "normalize") >= 200
            && running.errors("norm") >= 14
            && running.errors("in") >= 5
    });
    // The source is a transport: only empty payloads stop there; decoding (payloads and
    // topic templates) is normalize's.
    assert_eq!(running.received("in", "mqtt"), 214, "every non-empty message went on");
    assert_eq!(running.errors("in"), 5, "5 empty payloads");
    assert_eq!(running.errors("norm"), 14, "10 unparsable payloads, 4 topics off the template");
    // The source's consumer lag is exported per worker (queue_capacity is 10000 by default).
    let exported = running.context.metrics.render();
    assert!(
        exported.lines().any(|line| line
            == "tidewatch_source_backlog_capacity_records{component_id=\"in\",worker=\"0\"} 10000"),
        "no backlog capacity for the mqtt source:\n{exported}"
    );
    running.stop().expect("the pipeline ran");
    let errors = common::json_lines(&dir.path().join("errors.jsonl"));
    let mut by_type: HashMap<String, usize> = HashMap::new();
    for error in &errors {
        *by_type.entry(error["error_type"].as_str().unwrap_or_default().to_owned()).or_default() +=
            1;
        assert!(error["topic"].as_str().is_some_and(|topic| topic.starts_with(&prefix)), "{error}");
    }
    assert_eq!(by_type.get("empty_payload"), Some(&5), "{by_type:?}");
    assert_eq!(by_type.get("topic_mismatch"), Some(&4), "{by_type:?}");
    assert_eq!(by_type.get("parse"), Some(&10), "{by_type:?}");
    let (seen, _) = sequences(&[dir.path().join("readings.jsonl")]);
    assert_eq!(seen.len(), 200);
}

/// The backlog a source reports is what the broker delivered and the pipeline did not take.
#[test]
fn backlog_counts_the_messages_waiting_for_the_pipeline() {
    use tidewatch::api::{ComponentContext, ConfigValue, Outputs, Source};
    use tidewatch::connectors::MqttSourceConfig;
    use tidewatch::connectors::mqtt::MqttSource;

    let _broker = broker_shared();
    let prefix = unique("backlog");
    let client_id = format!("{prefix}-in");
    let filter = format!("{prefix}/#");
    prepare_session(&client_id, std::slice::from_ref(&filter), 1, false);
    let publisher = Publisher::new(&format!("{prefix}-pub"));
    publisher.publish_seqs(&prefix, 0..50, 1, 1);
    publisher.wait_acked(50, Duration::from_secs(30));

    let options = format!(
        "url = \"{PLAIN}\"\ntopics = [\"{filter}\"]\nqos = 1\nqueue_capacity = 64\nbatch_size = 20\n\
         connection = {{ client_id = \"{client_id}\", protocol = \"v4\" }}"
    );
    let config: MqttSourceConfig =
        ConfigValue::parse(&options).expect("toml").deserialize().expect("config");
    let ctx = ComponentContext::for_test("in", "mqtt");
    let mut source = MqttSource::new(&config, &ctx).expect("source");
    source.open(&ctx).expect("connects");
    let records = |source: &MqttSource| source.backlog().map(|backlog| backlog.records);
    wait_until("the session's 50 messages in the source's queue", Duration::from_secs(30), || {
        records(&source) == Some(50)
    });
    assert_eq!(source.backlog().map(|backlog| backlog.capacity), Some(64));
    let mut out = Outputs::new("in");
    source.poll(&mut out).expect("poll");
    assert_eq!(out.pending_records(), 20, "batch_size");
    assert_eq!(records(&source), Some(30), "taken by the pipeline: no longer waiting");
    let mut taken = 20;
    while taken < 50 {
        let mut out = Outputs::new("in");
        source.poll(&mut out).expect("poll");
        taken += out.pending_records();
    }
    assert_eq!(records(&source), Some(0));
    source.close().expect("close");
}

/// A pipeline that takes nothing for several keep-alive periods (a slow sink, a stalled worker)
/// must not lose its connection: the network thread goes on with pings and acks while what
/// the broker sends waits beyond the full queue (in the spill list, up to another
/// `queue_capacity`). Before, the thread stopped reading the socket at a full queue, the
/// keep-alive lapsed and the broker redelivered what was in flight.
#[test]
fn a_source_not_polled_for_several_keep_alives_keeps_its_connection() {
    use tidewatch::api::{ComponentContext, ConfigValue, Outputs, Source};
    use tidewatch::connectors::MqttSourceConfig;
    use tidewatch::connectors::mqtt::MqttSource;

    let _broker = broker_shared();
    let prefix = unique("keepalive");
    let client_id = format!("{prefix}-in");
    let filter = format!("{prefix}/#");
    prepare_session(&client_id, std::slice::from_ref(&filter), 1, false);
    // MQTT 3.1.1 (keep-alive 1 s is allowed there; the test broker lets 1000 messages out
    // unacknowledged): 200 messages for a queue of 100, the other 100 in the spill list.
    let options = format!(
        "url = \"{PLAIN}\"\ntopics = [\"{filter}\"]\nqos = 1\nqueue_capacity = 100\nbatch_size = 50\n\
         connection = {{ client_id = \"{client_id}\", protocol = \"v4\", keep_alive_secs = 1 }}"
    );
    let config: MqttSourceConfig =
        ConfigValue::parse(&options).expect("toml").deserialize().expect("config");
    let ctx = ComponentContext::for_test("in", "mqtt");
    let mut source = MqttSource::new(&config, &ctx).expect("source");
    source.open(&ctx).expect("connects");
    let publisher = Publisher::new(&format!("{prefix}-pub"));
    publisher.publish_seqs(&prefix, 0..200, 1, 1);
    publisher.wait_acked(200, Duration::from_secs(30));
    let waiting = |source: &MqttSource| source.backlog().map_or(0, |backlog| backlog.records);
    wait_until("all 200 messages at the source (queue and spill)", Duration::from_secs(30), || {
        waiting(&source) == 200
    });
    // Not polled for four keep-alive periods: the broker drops a client silent for 1.5.
    std::thread::sleep(Duration::from_secs(4));
    let mut seqs = Vec::new();
    let mut errors = Vec::new();
    common::wait_until("the 200 messages taken", Duration::from_secs(30), || {
        let mut out = Outputs::new("in");
        source.poll(&mut out).expect("poll");
        for batch in out.take_main() {
            let tidewatch::api::Batch::Raw(batch) = batch else { continue };
            for message in batch.iter() {
                let value: serde_json::Value =
                    serde_json::from_slice(message.payload).expect("json");
                seqs.push(value["seq"].as_u64().expect("seq"));
            }
        }
        errors.extend(out.take_errors().into_iter().map(|error| error.error_type));
        seqs.len() >= 200
    });
    source.close().expect("close");
    assert!(errors.is_empty(), "the connection held: no connection_lost ({errors:?})");
    let distinct: HashSet<u64> = seqs.iter().copied().collect();
    assert_eq!((seqs.len(), distinct.len()), (200, 200), "each message once, none redelivered");
}

// ---------------------------------------------------------------------------------------------
// The sink
// ---------------------------------------------------------------------------------------------

#[test]
fn sink_publishes_each_record_to_its_device_topic() {
    let _broker = broker_shared();
    let prefix = unique("sink");
    let subscriber = Subscriber::new(&format!("{prefix}-sub"), &format!("{prefix}/+/commands"));
    let text = format!(
        r#"
[pipeline]
http_address = ""

[sources.fleet]
type = "simulator"
devices = 3
count = 300
start_ms = 1700000000000

[transforms.readings]
type = "normalize"
inputs = ["fleet"]
device_field = "device"
timestamp_field = "ts"
timestamp_format = "unix_ms"
features = ["vibration", "flow"]

[sinks.commands]
type = "mqtt"
inputs = ["readings"]
url = "{PLAIN}"
topic = "{prefix}/{{device}}/commands"
qos = 1
"#
    );
    let mut running = Running::start(&text, &[], 2);
    running.join(Duration::from_secs(60)).expect("the pipeline ran to its end");
    wait_until("300 messages at the subscriber", Duration::from_secs(30), || {
        subscriber.count() >= 300
    });
    let messages = subscriber.messages();
    assert_eq!(messages.len(), 300);
    let mut per_device: HashMap<String, usize> = HashMap::new();
    for (topic, payload) in &messages {
        let value: serde_json::Value = serde_json::from_slice(payload).expect("JSON payload");
        let device = value["device"].as_str().expect("device").to_owned();
        assert_eq!(topic, &format!("{prefix}/{device}/commands"));
        assert!(value["values"]["vibration"].is_number());
        *per_device.entry(device).or_default() += 1;
    }
    assert_eq!(per_device.len(), 3);
    assert!(per_device.values().all(|count| *count == 100), "{per_device:?}");
}

// ---------------------------------------------------------------------------------------------
// tidewatch simulate
// ---------------------------------------------------------------------------------------------

fn simulate_args(prefix: &str) -> tidewatch::simulate::SimulateArgs {
    tidewatch::simulate::SimulateArgs {
        mqtt: Some(PLAIN.to_owned()),
        kafka: None,
        devices: 5,
        rate: 0.0,
        count: Some(2_000),
        qos: 1,
        topic: Some(format!("{prefix}/{{device}}/data")),
        interval_ms: None,
        seed: 3,
        malformed: 0.0,
        replay: None,
        speed: 0.0,
        delimiter: ',',
        timestamp_column: "datetime".to_owned(),
        device: None,
        protocol: tidewatch::simulate::ProtocolArg::V5,
        client_id: Some(format!("{prefix}-simulate")),
        username: None,
        password: None,
        ca_file: None,
        wait_subscriber_secs: 20,
    }
}

/// mqtt -> normalize of the fleet's or a replay's messages, counted.
fn counting_pipeline(prefix: &str, features: &str, timestamp: &str) -> String {
    format!(
        r#"
[pipeline]
http_address = ""

[sources.in]
type = "mqtt"
url = "{PLAIN}"
topics = ["{prefix}/+/data"]
connection = {{ client_id = "{prefix}-in", clean_start = true }}

[transforms.norm]
type = "normalize"
inputs = ["in"]
device_field = "device"
{timestamp}
features = {features}

[sinks.out]
type = "blackhole"
inputs = ["norm", "norm.errors", "in.errors"]
"#
    )
}

#[test]
fn simulate_publishes_the_fleet_once_a_subscriber_is_there() {
    let _broker = broker_shared();
    let prefix = unique("simulate");
    // No prepared session: simulate waits until the pipeline's subscription exists.
    let text = counting_pipeline(
        &prefix,
        "[\"vibration\", \"current\", \"pressure\", \"temperature\", \"flow\"]",
        "timestamp_field = \"ts\"\ntimestamp_format = \"unix_ms\"",
    );
    let running = Running::start(&text, &[], 1);
    tidewatch::simulate::run(&simulate_args(&prefix)).expect("simulate");
    wait_until("2000 readings", Duration::from_secs(60), || {
        running.context.metrics.sent("norm", "normalize") >= 2_000
    });
    assert_eq!(running.received("in", "mqtt"), 2_000);
    assert_eq!(running.errors("norm"), 0);
    running.stop().expect("the pipeline ran");
}

#[test]
fn simulate_replays_a_skab_file() {
    let _broker = broker_shared();
    let prefix = unique("replay");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("valve1-0.csv");
    let mut csv = String::from("datetime;Accelerometer1RMS;Pressure;anomaly;changepoint\r\n");
    for row in 0..300 {
        csv.push_str(&format!(
            "2020-03-09 10:{:02}:{:02};0.0{};0.{};0.0;0.0\r\n",
            row / 60,
            row % 60,
            row % 10,
            row % 7
        ));
    }
    std::fs::write(&file, csv).expect("write csv");
    let text = counting_pipeline(
        &prefix,
        "[\"Accelerometer1RMS\", \"Pressure\"]",
        "timestamp_field = \"datetime\"\ntimestamp_format = \"datetime\"",
    );
    let running = Running::start(&text, &[], 1);
    let mut args = simulate_args(&prefix);
    args.replay = Some(file);
    args.delimiter = ';';
    args.speed = 600.0;
    args.count = None;
    tidewatch::simulate::run(&args).expect("simulate --replay");
    wait_until("300 readings", Duration::from_secs(60), || {
        running.context.metrics.sent("norm", "normalize") >= 300
    });
    assert_eq!(running.errors("norm"), 0);
    assert_eq!(running.received("in", "mqtt"), 300);
    running.stop().expect("the pipeline ran");
}

/// A `tidewatch run` process on a pipeline file.
fn spawn_tidewatch(pipeline: &Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_tidewatch"))
        .args(["--log-level", "warn", "run"])
        .arg(pipeline)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("tidewatch starts")
}

#[test]
fn killed_process_resumes_its_persistent_session_without_loss() {
    let _broker = broker_shared();
    let prefix = unique("kill");
    let client_id = format!("{prefix}-in");
    let filter = format!("{prefix}/+/data");
    prepare_session(&client_id, std::slice::from_ref(&filter), 1, true);
    let dirs = [tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir")];
    let options = source(PLAIN, &filter, &client_id, "batch_size = 64\nqueue_capacity = 256");
    let files: Vec<PathBuf> = dirs
        .iter()
        .map(|dir| {
            let file = dir.path().join("pipeline.toml");
            std::fs::write(&file, pipeline("kill", &options, dir.path())).expect("pipeline file");
            file
        })
        .collect();
    let outputs: Vec<PathBuf> = dirs.iter().map(|dir| dir.path().join("readings.jsonl")).collect();
    let publisher = Publisher::new(&format!("{prefix}-pub"));
    let (before, during) = (6_000_u64, 4_000_u64);

    // SIGKILL mid-stream: no drain, no final acks.
    let mut first = spawn_tidewatch(&files[0]);
    publisher.publish_seqs(&prefix, 0..before, 5, 1);
    wait_until("part of the stream processed", Duration::from_secs(60), || {
        sequences(&outputs[..1]).0.len() >= 1_000
    });
    first.kill().expect("SIGKILL");
    first.wait().expect("reaped");
    publisher.wait_acked(before, Duration::from_secs(60));

    // Published while nothing runs: kept in the persistent session.
    publisher.publish_seqs(&prefix, before..before + during, 5, 1);
    publisher.wait_acked(before + during, Duration::from_secs(60));

    let mut second = spawn_tidewatch(&files[1]);
    wait_until("every message processed after the restart", Duration::from_secs(90), || {
        sequences(&outputs).0.len() as u64 >= before + during
    });
    let status = std::process::Command::new("kill")
        .args(["-INT", &second.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = second.wait().expect("second run ends");
    assert!(exit.success(), "the restarted run exits 0 after SIGINT: {exit:?}");
    let (seen, lines) = sequences(&outputs);
    assert_eq!(seen.len() as u64, before + during, "nothing lost across the kill");
    let (first_seen, _) = sequences(&outputs[..1]);
    assert!((first_seen.len() as u64) < before + during, "the first run was killed mid-stream");
    // At-least-once: what the killed run processed but had not acknowledged comes again.
    eprintln!(
        "kill -9: {} by the first run, {} duplicates",
        first_seen.len(),
        lines as u64 - before - during
    );
}
