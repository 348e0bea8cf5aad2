//! Feedback control end to end against the real Mosquitto on 127.0.0.1:1883
//! (`scripts/services.sh start mosquitto`; the test script starts it): the shipped
//! `pipelines/feedback-control.toml`, with only its topic prefix, client ids and HTTP address
//! overridden, reads three pumps' telemetry from MQTT, and publishes commands back to the one
//! pump that has an anomaly: `anomaly_open`, then `anomaly_close`, with the event's fields.
//!
//! Every condition is awaited with a deadline; the assertions are on event time only.

mod common;

use std::ops::Range;
use std::time::Duration;

use common::{Publisher, Running, Subscriber, prepare_session, require_broker, unique, wait_until};
use serde_json::Value;
use tidewatch::api::time::{TimestampFormat, parse_timestamp};

const PIPELINE: &str = "feedback-control.toml";
const PUMPS: [&str; 3] = ["pump-1", "pump-2", "pump-3"];
/// The pump with an anomaly.
const ANOMALOUS: &str = "pump-2";
/// Readings per pump, one a second of event time.
const READINGS: i64 = 100;
/// The seconds of the anomaly: a blocked outlet, pressure up, flow down.
const ANOMALY: Range<i64> = 30..60;

/// The pump sensors the pipeline reads, with the test rig's typical value (the model's training
/// mean) and spread (its standard deviation).
const SENSORS: [(&str, f64, f64); 8] = [
    ("vibration1", 0.2126, 0.00474),
    ("vibration2", 0.2684, 0.00399),
    ("current", 2.403, 0.486),
    ("pressure", 0.1113, 0.2533),
    ("temperature", 89.47, 0.667),
    ("thermocouple", 28.47, 0.731),
    ("voltage", 228.6, 10.98),
    ("flow", 125.2, 1.605),
];

/// The telemetry message of pump `pump` at second `second`: typical values with a small,
/// deterministic wobble; during [`ANOMALY`] the anomalous pump's pressure is 4 bar higher and
/// its flow 15 l/min lower.
fn telemetry(pump: usize, second: i64, ts: i64) -> String {
    let anomalous = PUMPS[pump] == ANOMALOUS && ANOMALY.contains(&second);
    let mut message = format!("{{\"ts\":{ts}");
    for (index, (name, mean, std)) in SENSORS.iter().enumerate() {
        let phase = 0.7 * second as f64 + 1.3 * index as f64 + 2.1 * pump as f64;
        let mut value = mean + 0.3 * std * phase.sin();
        if anomalous && *name == "pressure" {
            value += 4.0;
        }
        if anomalous && *name == "flow" {
            value -= 15.0;
        }
        message.push_str(&format!(",\"{name}\":{value:.4}"));
    }
    message.push('}');
    message
}

/// The calibrated threshold of the shipped model.
fn model_threshold() -> f64 {
    let path = common::root().join("models/pump-ae/model.json");
    let text = std::fs::read_to_string(&path).expect("models/pump-ae/model.json");
    let model: Value = serde_json::from_str(&text).expect("model.json is JSON");
    model["threshold"]["value"].as_f64().expect("threshold.value")
}

fn number(command: &Value, field: &str) -> f64 {
    command[field].as_f64().unwrap_or_else(|| panic!("{field} is a number in {command}"))
}

fn text<'a>(command: &'a Value, field: &str) -> &'a str {
    command[field].as_str().unwrap_or_else(|| panic!("{field} is a string in {command}"))
}

#[test]
fn an_anomalous_pump_is_sent_safe_mode_then_resume_and_the_others_nothing() {
    require_broker();
    let prefix = unique("feedback");
    let client_id = format!("{prefix}-tw");
    // The pipeline's session exists before it starts: no telemetry is missed.
    prepare_session(&format!("{client_id}-telemetry"), &[format!("{prefix}/+/telemetry")], 1, true);
    let subscriber = Subscriber::new(&format!("{prefix}-pumps"), &format!("{prefix}/+/commands"));
    let vars = [
        ("FEEDBACK_TOPIC_PREFIX", prefix.clone()),
        ("FEEDBACK_CLIENT_ID", client_id),
        ("TIDEWATCH_HTTP_ADDRESS", String::new()),
    ];
    let pipeline = common::load_shipped(&common::shipped(PIPELINE), &vars)
        .unwrap_or_else(|errors| panic!("the shipped pipeline does not load:\n{errors}"));
    let running = Running::run(pipeline, 1);

    let publisher = Publisher::new(&format!("{prefix}-telemetry-pub"));
    let start = tidewatch::api::records::now_ms();
    for second in 0..READINGS {
        for (pump, name) in PUMPS.iter().enumerate() {
            let topic = format!("{prefix}/{name}/telemetry");
            publisher.publish(&topic, 1, telemetry(pump, second, start + second * 1_000));
        }
    }
    let published = READINGS as u64 * PUMPS.len() as u64;
    publisher.wait_acked(published, Duration::from_secs(60));
    wait_until("every reading processed and two commands", Duration::from_secs(90), || {
        running.received("readings", "normalize") >= published && subscriber.count() >= 2
    });
    assert_eq!(running.received("readings", "normalize"), published, "each reading once");
    assert_eq!(running.errors("readings"), 0, "every telemetry message is valid");
    running.stop().expect("the pipeline ran");

    // The broker acknowledged every command before `stop` returned; a marker published now
    // reaches the subscriber after all of them.
    let marker = format!("{prefix}/marker/commands");
    publisher.publish(&marker, 1, "marker");
    wait_until("the marker after the commands", Duration::from_secs(30), || {
        subscriber.messages().iter().any(|(topic, _)| *topic == marker)
    });
    let messages: Vec<(String, Vec<u8>)> =
        subscriber.messages().into_iter().filter(|(topic, _)| *topic != marker).collect();
    for (topic, _) in &messages {
        assert_eq!(topic, &format!("{prefix}/{ANOMALOUS}/commands"), "only {ANOMALOUS} is told");
    }
    let commands: Vec<Value> = messages
        .iter()
        .map(|(_, payload)| serde_json::from_slice(payload).expect("every command is JSON"))
        .collect();
    let names: Vec<&str> = commands.iter().map(|command| text(command, "command")).collect();
    assert_eq!(names, ["anomaly_open", "anomaly_close"], "{commands:#?}");
    let (open, close) = (&commands[0], &commands[1]);

    let threshold = model_threshold();
    for command in [open, close] {
        assert_eq!(text(command, "device"), ANOMALOUS);
        assert_eq!(text(command, "reason"), "anomaly");
        assert_eq!(text(command, "detector"), "pump-ae");
        assert_eq!(text(command, "version"), "1");
        assert!((number(command, "threshold") - threshold).abs() < 1e-6, "{command}");
        assert!(number(command, "peak_score") >= number(command, "score"), "{command}");
    }
    assert!(number(open, "score") > threshold, "the deciding window exceeds: {open}");
    assert!(number(close, "score") <= threshold, "the deciding window is calm: {close}");
    assert!(number(close, "peak_score") >= number(open, "score"));
    assert_eq!(text(open, "top_feature"), "Pressure", "the blocked outlet shows in the pressure");

    // Event time: the anomaly opened while the pump's pressure was up, and closed after it
    // came back; both commands name the same start, so the pump can tell they belong together.
    assert_eq!(text(close, "started"), text(open, "started"));
    let started = parse_timestamp(text(open, "started"), TimestampFormat::Rfc3339)
        .expect("started is RFC 3339");
    assert_eq!(started, number(open, "time_ms") as i64, "an open starts the anomaly");
    let anomaly_ms = start + ANOMALY.start * 1_000..start + ANOMALY.end * 1_000 + 1;
    assert!(anomaly_ms.contains(&started), "opened at {started}, anomaly {anomaly_ms:?}");
    assert!(number(close, "time_ms") as i64 > start + ANOMALY.end * 1_000);
    assert_eq!(text(open, "id"), format!("{ANOMALOUS}/{started}/open"));
    assert_eq!(text(close, "id"), format!("{ANOMALOUS}/{started}/close"));
}

#[test]
fn the_command_sink_takes_only_anomaly_events() {
    let text = common::shipped(PIPELINE);
    let sink = text.find("[sinks.commands]").expect("the commands sink");
    let inputs = text[sink..].find("inputs = [\"alerts\"]").expect("its inputs") + sink;
    let scores = format!("{}inputs = [\"model\"]{}", &text[..inputs], &text[inputs + 19..]);
    let errors = common::load_shipped(&scores, &[]).expect_err("scores are not events");
    assert!(errors.to_string().contains("record-kind mismatch"), "{errors}");
    assert!(errors.to_string().contains("`commands` (mqtt) accepts anomaly events"), "{errors}");
}

/// With `out_of_orderness_ms = 0` and `n = m = hysteresis = 1`, the reading that shows an
/// anomaly is commanded on its own: no later reading, and no idle timeout (an hour here), has
/// to come first.
#[test]
fn an_anomaly_is_commanded_without_waiting_for_the_next_reading() {
    require_broker();
    let prefix = unique("feedback-now");
    let client_id = format!("{prefix}-tw");
    prepare_session(&format!("{client_id}-telemetry"), &[format!("{prefix}/+/telemetry")], 1, true);
    let subscriber = Subscriber::new(&format!("{prefix}-pumps"), &format!("{prefix}/+/commands"));
    let derived: String = common::shipped(PIPELINE)
        .lines()
        .map(|line| {
            for (option, value) in [
                ("out_of_orderness_ms", "0"),
                ("idle_timeout_ms", "3600000"),
                ("n", "1"),
                ("m", "1"),
                ("hysteresis", "1"),
            ] {
                if line.starts_with(&format!("{option} = ")) {
                    return format!("{option} = {value}\n");
                }
            }
            format!("{line}\n")
        })
        .collect();
    assert!(derived.contains("idle_timeout_ms = 3600000") && derived.contains("hysteresis = 1\n"));
    let vars = [
        ("FEEDBACK_TOPIC_PREFIX", prefix.clone()),
        ("FEEDBACK_CLIENT_ID", client_id),
        ("TIDEWATCH_HTTP_ADDRESS", String::new()),
    ];
    let pipeline = common::load_shipped(&derived, &vars)
        .unwrap_or_else(|errors| panic!("the derived pipeline does not load:\n{errors}"));
    let running = Running::run(pipeline, 1);

    // pump-2's first 12 readings are calm (the 10-reading windows fill), its 13th is far off.
    let publisher = Publisher::new(&format!("{prefix}-telemetry-pub"));
    let topic = format!("{prefix}/{ANOMALOUS}/telemetry");
    let start = tidewatch::api::records::now_ms();
    for second in 0..12 {
        publisher.publish(&topic, 1, telemetry(1, second, start + second * 1_000));
    }
    let anomalous_ts = start + 12_000;
    let mut reading: Value = serde_json::from_str(&telemetry(1, 12, anomalous_ts)).expect("json");
    reading["pressure"] = (number(&reading, "pressure") + 8.0).into();
    reading["flow"] = (number(&reading, "flow") - 30.0).into();
    publisher.publish(&topic, 1, reading.to_string());
    publisher.wait_acked(13, Duration::from_secs(30));

    wait_until("the anomaly_open of the 13th reading", Duration::from_secs(30), || {
        subscriber.count() >= 1
    });
    let messages = subscriber.messages();
    let command: Value = serde_json::from_slice(&messages[0].1).expect("the command is JSON");
    assert_eq!(text(&command, "command"), "anomaly_open", "{command}");
    assert_eq!(number(&command, "time_ms") as i64, anomalous_ts + 1, "{command}");
    assert_eq!(running.received("readings", "normalize"), 13);
    running.stop().expect("the pipeline ran");
}
