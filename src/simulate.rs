//! `tidewatch simulate`: publishes the simulated pump fleet, or replays a CSV file, to an MQTT
//! broker or a Kafka topic (`--kafka BROKERS --topic T`, each message keyed by its device).
//!
//! The fleet is the `simulator` source's (same physics, same seed, same payloads); a replayed
//! CSV file (SKAB files as they are: `;`-separated, CRLF) is published row by row as JSON
//! objects with the header's column names plus the device, paced at the recorded speed times
//! `--speed`. Progress goes to stderr once a second, and the achieved rate at the end.
//!
//! Before streaming, the first message is published with QoS 1 and, on MQTT 5, published again
//! (every 100 ms, up to `--wait-subscriber-secs`) while the broker answers that no
//! subscription matches it: a pipeline started at the same moment does not miss the start.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use tidewatch_api::codec::{Delimiter, csv};
use tidewatch_api::{Batch, ComponentContext, Outputs, RawBatch, Source, SourcePoll};
#[cfg(feature = "kafka")]
use tidewatch_connectors::kafka::KafkaPublisher;
#[cfg(feature = "mqtt")]
use tidewatch_connectors::mqtt::{ConnectionSettings, MqttPublisher, Protocol};
use tidewatch_connectors::{FileSource, FileSourceConfig, SimulatorConfig, SimulatorSource};

/// MQTT protocol versions on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProtocolArg {
    /// MQTT 3.1.1.
    V4,
    /// MQTT 5.
    V5,
}

/// The options of `tidewatch simulate`.
#[derive(Debug, Clone, Args)]
pub struct SimulateArgs {
    /// Broker URL: mqtt://host:port or mqtts://host:port.
    #[arg(long, value_name = "URL", required_unless_present = "kafka", conflicts_with = "kafka")]
    pub mqtt: Option<String>,
    /// Kafka bootstrap brokers (host:port, comma-separated): publish to the topic --topic instead,
    /// each message keyed by its device.
    #[arg(long, value_name = "BROKERS")]
    pub kafka: Option<String>,
    /// Pumps in the simulated fleet.
    #[arg(long, default_value_t = 10)]
    pub devices: usize,
    /// Messages per second for the whole fleet; 0 = as fast as the broker takes them.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Stop after this many messages (default: run until Ctrl-C, or the end of --replay).
    #[arg(long)]
    pub count: Option<u64>,
    /// QoS of the publishes: 0, 1 or 2.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Topic template; {device} is replaced with the device name. With --kafka: the Kafka
    /// topic (default `readings`).
    #[arg(long)]
    pub topic: Option<String>,
    /// Simulated time between two readings of one pump, ms (default: devices * 1000 / rate,
    /// so event time follows the wall clock; 1000 when --rate is 0).
    #[arg(long)]
    pub interval_ms: Option<u64>,
    /// Seed of the simulation.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Replace this fraction of the messages (0 to 1, drawn from --seed) with malformed ones,
    /// of six kinds in turn: truncated JSON, bytes that are not UTF-8, no timestamp, a
    /// timestamp that is not a time, JSON that is not an object, an empty payload. For soak
    /// and robustness runs: each must land on an error output (benches/soak.sh counts them).
    #[arg(long, default_value_t = 0.0)]
    pub malformed: f64,
    /// Replay this CSV file instead of simulating (each row becomes one JSON message).
    #[arg(long, value_name = "FILE.csv")]
    pub replay: Option<PathBuf>,
    /// Replay speed: 1 = the recorded speed, 10 = ten times faster, 0 = as fast as possible.
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// CSV field delimiter of --replay (SKAB files use `;`).
    #[arg(long, default_value_t = ',')]
    pub delimiter: char,
    /// The timestamp column of --replay (used to pace the replay).
    #[arg(long, default_value = "datetime")]
    pub timestamp_column: String,
    /// The device of replayed rows that have no `device` column (default: the file's name
    /// without extension).
    #[arg(long)]
    pub device: Option<String>,
    /// MQTT protocol version.
    #[arg(long, value_enum, default_value_t = ProtocolArg::V5)]
    pub protocol: ProtocolArg,
    /// Client identifier (default: tidewatch-simulate-PID).
    #[arg(long)]
    pub client_id: Option<String>,
    /// User name (default: $MQTT_USER).
    #[arg(long)]
    pub username: Option<String>,
    /// Password (default: $MQTT_PASSWORD).
    #[arg(long)]
    pub password: Option<String>,
    /// CA certificates (PEM) for mqtts://.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// How long to wait for a subscriber before streaming (MQTT 5 and QoS >= 1), s; 0 = no wait.
    #[arg(long, default_value_t = 10)]
    pub wait_subscriber_secs: u64,
}

/// How many kinds of malformed message `--malformed` sends.
const MALFORMED_KINDS: u64 = 6;

/// Message `index`'s payload: `payload`, or (with probability `fraction`, drawn from `seed`
/// and `index`) a malformed one of a kind chosen by the same draw. The first message is never
/// replaced (it finds the subscriber).
fn malform(seed: u64, index: u64, fraction: f64, payload: Vec<u8>) -> (Vec<u8>, bool) {
    let draw = tidewatch_connectors::simulator::splitmix64(seed ^ index.wrapping_mul(0x9e37_79b9));
    let uniform = (draw >> 11) as f64 / (1_u64 << 53) as f64;
    if index == 0 || uniform >= fraction {
        return (payload, false);
    }
    let malformed = match draw % MALFORMED_KINDS {
        0 => payload[..payload.len() / 2].to_vec(),
        1 => [&[0xff_u8, 0xfe][..], &payload].concat(),
        2 => String::from_utf8_lossy(&payload).replace("\"ts\":", "\"tz\":").into_bytes(),
        3 => br#"{"device":"pump-0000","ts":"not a time"}"#.to_vec(),
        4 => b"[1,2,3]".to_vec(),
        _ => Vec::new(),
    };
    (malformed, true)
}

/// One message to publish.
struct Message {
    topic: String,
    payload: Vec<u8>,
}

/// Where the messages come from.
enum Feed {
    Fleet(Box<SimulatorSource>),
    Replay { source: Box<FileSource>, device: String, topic: String, delimiter: Delimiter },
}

impl Feed {
    /// The next messages, or `None` at the end; waits while the source paces itself.
    fn next(
        &mut self,
        out: &mut Outputs,
        stop: &AtomicBool,
    ) -> anyhow::Result<Option<Vec<Message>>> {
        loop {
            if stop.load(Ordering::SeqCst) {
                return Ok(None);
            }
            let poll = match self {
                Feed::Fleet(source) => source.poll(out),
                Feed::Replay { source, .. } => source.poll(out),
            }
            .context("reading the messages")?;
            let mut messages = Vec::new();
            for batch in out.take_main() {
                if let Batch::Raw(raw) = batch {
                    self.convert(&raw, &mut messages);
                }
            }
            for error in out.take_errors() {
                eprintln!("skipped: {}", error.reason);
            }
            if !messages.is_empty() {
                return Ok(Some(messages));
            }
            match poll {
                SourcePoll::Finished => return Ok(None),
                SourcePoll::Ready => {}
                SourcePoll::Idle { wake_after_ms } => {
                    std::thread::sleep(Duration::from_millis(wake_after_ms.clamp(1, 100)));
                }
            }
        }
    }

    fn convert(&self, raw: &RawBatch, messages: &mut Vec<Message>) {
        match self {
            Feed::Fleet(_) => messages.extend(raw.iter().map(|message| Message {
                topic: message.topic.to_owned(),
                payload: message.payload.to_vec(),
            })),
            Feed::Replay { device, topic, delimiter, .. } => {
                let Some(header) = raw.header() else { return };
                let Ok(header) = csv::header_names(header, *delimiter) else { return };
                let topic = topic.replace("{device}", device);
                for message in raw.iter() {
                    messages.push(Message {
                        topic: topic.clone(),
                        payload: row_json(&header, *delimiter, message.payload, device),
                    });
                }
            }
        }
    }
}

/// A CSV row as a JSON object: numbers stay numbers, other values are strings; `device` is
/// added when the header has no such column.
fn row_json(header: &[Arc<str>], delimiter: Delimiter, line: &[u8], device: &str) -> Vec<u8> {
    let mut object = serde_json::Map::new();
    let _ = csv::split_record(line, delimiter, |column, field| {
        let Some(name) = header.get(column) else { return false };
        let field = String::from_utf8_lossy(&field);
        let text = field.trim();
        let value = match text.parse::<f64>() {
            Ok(number) if number.is_finite() => serde_json::Number::from_f64(number)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            _ if text.is_empty() => serde_json::Value::Null,
            _ => serde_json::Value::String(text.to_owned()),
        };
        object.insert(name.to_string(), value);
        true
    });
    object.entry("device").or_insert_with(|| serde_json::Value::String(device.to_owned()));
    serde_json::to_vec(&object).unwrap_or_default()
}

/// The MQTT topic template when none is given.
#[cfg(feature = "mqtt")]
const DEFAULT_MQTT_TOPIC: &str = "factory/site-1/pump/{device}/telemetry";
/// The Kafka topic when none is given.
#[cfg(feature = "kafka")]
const DEFAULT_KAFKA_TOPIC: &str = "readings";

#[cfg(feature = "mqtt")]
fn settings(args: &SimulateArgs, url: &str) -> ConnectionSettings {
    let client_id = args
        .client_id
        .clone()
        .unwrap_or_else(|| format!("tidewatch-simulate-{}", std::process::id()));
    let mut settings = ConnectionSettings::new(url.to_owned(), client_id);
    let connection = &mut settings.connection;
    connection.protocol = match args.protocol {
        ProtocolArg::V4 => Protocol::V4,
        ProtocolArg::V5 => Protocol::V5,
    };
    connection.username = args.username.clone().or_else(|| std::env::var("MQTT_USER").ok());
    connection.password =
        args.password.clone().or_else(|| std::env::var("MQTT_PASSWORD").ok()).map(Into::into);
    connection.max_inflight = 1_000;
    // Persistent (for a minute on MQTT 5), so that QoS 1/2 publishes in flight when the
    // connection drops are sent again after reconnecting.
    connection.clean_start = false;
    connection.session_expiry_secs = (connection.protocol == Protocol::V5).then_some(60);
    settings.tls.ca_file = args.ca_file.clone();
    settings
}

/// `topic`: the simulator's topic template (with Kafka, `{device}`: the key).
fn feed(args: &SimulateArgs, topic: &str) -> anyhow::Result<Feed> {
    let ctx = ComponentContext::for_test("simulate", "simulator");
    match &args.replay {
        None => {
            if !args.rate.is_finite() || args.rate < 0.0 {
                bail!("--rate must be a number >= 0");
            }
            let interval_ms = args.interval_ms.unwrap_or(if args.rate > 0.0 {
                ((args.devices as f64 * 1000.0 / args.rate).round() as u64).max(1)
            } else {
                1_000
            });
            let config = SimulatorConfig {
                devices: args.devices,
                seed: args.seed,
                count: args.count,
                rate_per_sec: args.rate,
                interval_ms,
                batch_size: 256,
                topic: topic.to_owned(),
                ..SimulatorConfig::default()
            };
            let source = SimulatorSource::new(&config, &ctx).context("the fleet simulator")?;
            Ok(Feed::Fleet(Box::new(source)))
        }
        Some(path) => {
            let path_text = path.to_string_lossy().into_owned();
            let mut config = FileSourceConfig::new(path_text.clone());
            let delimiter = Delimiter::new(args.delimiter).map_err(anyhow::Error::msg)?;
            config.header = Some(true);
            config.delimiter = Some(delimiter);
            config.batch_size = 256;
            if args.speed > 0.0 {
                config.speed = args.speed;
                config.timestamp_field = Some(args.timestamp_column.clone());
            }
            let mut source =
                FileSource::new(&config, &ctx).with_context(|| format!("replaying {path_text}"))?;
            source.open(&ctx).with_context(|| format!("opening {path_text}"))?;
            let device = args.device.clone().unwrap_or_else(|| {
                path.file_stem().map(|stem| stem.to_string_lossy().into_owned()).unwrap_or_default()
            });
            Ok(Feed::Replay {
                source: Box::new(source),
                device,
                topic: topic.to_owned(),
                delimiter,
            })
        }
    }
}

/// Runs `tidewatch simulate`.
pub fn run(args: &SimulateArgs) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&args.malformed) {
        bail!("--malformed {} is not a fraction between 0 and 1", args.malformed);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let stopper = Arc::clone(&stop);
    tidewatch_engine::signals::install(move || stopper.store(true, Ordering::SeqCst))
        .context("installing signal handlers")?;
    match (&args.kafka, &args.mqtt) {
        #[cfg(feature = "kafka")]
        (Some(brokers), _) => run_kafka(args, brokers, &stop),
        #[cfg(feature = "mqtt")]
        (None, Some(url)) => run_mqtt(args, url, &stop),
        (None, None) => bail!("give --mqtt URL or --kafka BROKERS"),
        #[allow(unreachable_patterns)]
        _ => bail!("this build of tidewatch has no support for that broker (cargo features)"),
    }
}

#[cfg(feature = "kafka")]
/// Publishes to a Kafka topic, keyed by device, and waits for every acknowledgement.
fn run_kafka(args: &SimulateArgs, brokers: &str, stop: &AtomicBool) -> anyhow::Result<()> {
    let topic = args.topic.clone().unwrap_or_else(|| DEFAULT_KAFKA_TOPIC.to_owned());
    // The simulator's "topic" is the device: the message key.
    let mut feed = feed(args, "{device}")?;
    let publisher = KafkaPublisher::connect(brokers, &topic).context("connecting to Kafka")?;
    eprintln!("producing to {brokers}, topic {topic}");
    let limit = args.count.unwrap_or(u64::MAX);
    let mut out = Outputs::new("simulate");
    let mut published: u64 = 0;
    let mut malformed: u64 = 0;
    let started = Instant::now();
    let mut last_report = Instant::now();
    'feed: while published < limit {
        let Some(messages) = feed.next(&mut out, stop)? else { break };
        for message in messages {
            if published >= limit || stop.load(Ordering::SeqCst) {
                break 'feed;
            }
            let (payload, bad) = malform(args.seed, published, args.malformed, message.payload);
            malformed += u64::from(bad);
            publisher.publish(message.topic.as_bytes(), &payload)?;
            published += 1;
            if last_report.elapsed() >= Duration::from_secs(1) {
                eprintln!("published {published} (acknowledged {})", publisher.acknowledged());
                last_report = Instant::now();
            }
        }
    }
    let flushed = publisher.flush(Duration::from_secs(30));
    let elapsed = started.elapsed().as_secs_f64();
    let rate = if elapsed > 0.0 { published as f64 / elapsed } else { 0.0 };
    eprintln!(
        "published {published} messages in {elapsed:.2} s: {rate:.0} msg/s (acknowledged {}, failed {}, malformed {malformed})",
        publisher.acknowledged(),
        publisher.failed()
    );
    flushed.context("waiting for the brokers' acknowledgements")?;
    if publisher.failed() > 0 {
        bail!("{} messages were not delivered", publisher.failed());
    }
    Ok(())
}

#[cfg(feature = "mqtt")]
fn run_mqtt(args: &SimulateArgs, url: &str, stop: &AtomicBool) -> anyhow::Result<()> {
    let topic = args.topic.clone().unwrap_or_else(|| DEFAULT_MQTT_TOPIC.to_owned());
    if !topic.contains("{device}") {
        eprintln!("note: --topic has no {{device}}: every message goes to {topic}");
    }
    let settings = settings(args, url);
    settings.validate().map_err(|error| {
        anyhow::anyhow!("{}: {}", error.field.as_deref().unwrap_or("options"), error.message)
    })?;
    let mut feed = feed(args, &topic)?;
    let mut publisher = MqttPublisher::connect(&settings).context("connecting")?;
    eprintln!("connected to {} as {}", settings.url, settings.client_id);

    let limit = args.count.unwrap_or(u64::MAX);
    let mut out = Outputs::new("simulate");
    let mut published: u64 = 0;
    let mut malformed: u64 = 0;
    let mut started: Option<Instant> = None;
    let mut last_report = Instant::now();
    let mut reported: u64 = 0;
    'feed: while published < limit {
        let Some(messages) = feed.next(&mut out, stop)? else { break };
        for message in messages {
            if published >= limit || stop.load(Ordering::SeqCst) {
                break 'feed;
            }
            if started.is_none() {
                wait_for_subscriber(&publisher, args, &settings, &message)?;
                started = Some(Instant::now());
                published += 1;
                continue;
            }
            let (payload, bad) = malform(args.seed, published, args.malformed, message.payload);
            malformed += u64::from(bad);
            publisher.publish(message.topic, args.qos, false, payload)?;
            published += 1;
            if last_report.elapsed() >= Duration::from_secs(1) {
                let stats = publisher.stats();
                let rate = (published - reported) as f64 / last_report.elapsed().as_secs_f64();
                eprintln!(
                    "published {published} (acknowledged {}), {rate:.0} msg/s",
                    stats.completed
                );
                last_report = Instant::now();
                reported = published;
            }
        }
    }
    let flushed = publisher.close(Duration::from_secs(30));
    let elapsed = started.map(|started| started.elapsed()).unwrap_or_default();
    let stats = publisher.stats();
    let rate =
        if elapsed.as_secs_f64() > 0.0 { published as f64 / elapsed.as_secs_f64() } else { 0.0 };
    eprintln!(
        "published {published} messages in {:.2} s: {rate:.0} msg/s (acknowledged {}, reconnects {}, malformed {malformed})",
        elapsed.as_secs_f64(),
        stats.completed,
        stats.reconnects
    );
    flushed.context("waiting for the broker's acknowledgements")?;
    Ok(())
}

#[cfg(feature = "mqtt")]
/// Publishes the first message with QoS 1 until a subscription matches it (MQTT 5 tells), up
/// to `--wait-subscriber-secs`.
fn wait_for_subscriber(
    publisher: &MqttPublisher,
    args: &SimulateArgs,
    settings: &ConnectionSettings,
    message: &Message,
) -> anyhow::Result<()> {
    let probe = settings.connection.protocol == Protocol::V5 && args.wait_subscriber_secs > 0;
    let qos = if probe { args.qos.max(1) } else { args.qos };
    let deadline = Instant::now() + Duration::from_secs(args.wait_subscriber_secs);
    let mut waited = false;
    loop {
        let before = publisher.stats().no_subscribers;
        publisher.publish(message.topic.clone(), qos, false, message.payload.clone())?;
        if !probe {
            return Ok(());
        }
        publisher.flush(Duration::from_secs(10)).context("publishing the first message")?;
        if publisher.stats().no_subscribers == before {
            if waited {
                eprintln!("a subscriber is there: streaming");
            }
            return Ok(());
        }
        if Instant::now() >= deadline {
            eprintln!(
                "no subscriber for {} after {} s: streaming anyway",
                message.topic, args.wait_subscriber_secs
            );
            return Ok(());
        }
        if !waited {
            eprintln!("waiting for a subscriber to {} ...", message.topic);
            waited = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_become_json_objects() {
        let header: Vec<Arc<str>> =
            ["datetime", "Accelerometer1RMS", "anomaly"].into_iter().map(Arc::from).collect();
        let json =
            row_json(&header, Delimiter::SEMICOLON, b"2020-03-09 10:14:33;0.026;0", "valve1-0");
        let value: serde_json::Value = serde_json::from_slice(&json).expect("json");
        assert_eq!(value["datetime"], "2020-03-09 10:14:33");
        assert_eq!(value["Accelerometer1RMS"], 0.026);
        assert_eq!(value["anomaly"], 0.0);
        assert_eq!(value["device"], "valve1-0");
    }

    #[test]
    fn malformed_messages_are_the_fraction_asked_for_of_every_kind() {
        let good = br#"{"device":"pump-0001","ts":1000,"vibration":1.5}"#.to_vec();
        let mut kinds = std::collections::BTreeSet::new();
        let mut count = 0;
        for index in 0..20_000 {
            let (payload, bad) = malform(7, index, 0.3, good.clone());
            assert_eq!(bad, payload != good, "message {index}");
            if bad {
                count += 1;
                kinds.insert(payload);
            }
        }
        assert!((5_600..6_400).contains(&count), "{count} of 20000 malformed, not about 30 %");
        assert_eq!(kinds.len(), MALFORMED_KINDS as usize, "every kind");
        assert!(!malform(7, 0, 1.0, good.clone()).1, "the first message stays good");
        assert!(!malform(7, 5, 0.0, good).1, "none at 0");
    }
}
