//! The alert-latency probe of `benches/latency.sh`: the feedback loop timed as a user sees it.
//!
//! ```text
//! latency-probe --prefix PREFIX --rate R --pumps P --anomalies K [--metrics URL]
//!               [--warmup 12] [--spacing 14] [--wait 5] [--broker 127.0.0.1:1883]
//!               [--model models/pump-ae/model.json] [--pipeline pipelines/feedback-control.toml]
//!               [--sink commands]
//! ```
//!
//! Publishes pump readings to `PREFIX/<pump>/telemetry` (one connection, QoS 0, so readings
//! reach the broker in publishing order), each pump at R readings/s, the pumps' phases spread
//! evenly over the period. The event time `ts` of a reading is the wall clock when it is
//! published. Every pump first sends `--warmup` normal readings (the model's windows fill),
//! then K anomalous readings in all (spread over the pumps), each followed by `--spacing`
//! normal readings (the anomaly leaves the window and the alert closes before the next one).
//!
//! A second connection subscribes to `PREFIX/+/commands` and takes the time each
//! `anomaly_open` command arrives; its `time_ms` is the end of the window that opened it (the
//! anomalous reading's ts + 1), which names the reading. Latency = arrival - publishing of
//! that reading, both on this process's monotonic clock. Prints one line:
//!
//! ```text
//! rate R pumps P p50 X ms p99 Y ms max Z ms (K/K alerts; /metrics p99 <= B ms)
//! ```
//!
//! The last part is the pipeline's own view: the `tidewatch_sink_event_lag_seconds` histogram
//! of the sink that published the commands (the upper bound of the bucket holding its 99th
//! percentile).
//!
//! MQTT 3.1.1 is spoken over std's sockets directly (CONNECT, PUBLISH at QoS 0, SUBSCRIBE at
//! QoS 0): a publish is one `write` on a socket without Nagle's delay, and an arrival is timed
//! as its bytes are read, with no client thread, queue or runtime between the clock and the
//! socket. (The Python probe it replaces lost up to 170 ms to its interpreter's lock at 1,000
//! readings/s.)

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};

/// The probe's options (see the crate documentation).
#[derive(Debug)]
struct Options {
    prefix: String,
    rate: f64,
    pumps: usize,
    anomalies: usize,
    warmup: usize,
    spacing: usize,
    wait: Duration,
    broker: String,
    model: PathBuf,
    pipeline: PathBuf,
    metrics: Option<String>,
    sink: String,
}

impl Options {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut options = Options {
            prefix: String::new(),
            rate: 0.0,
            pumps: 1,
            anomalies: 0,
            warmup: 12,
            spacing: 14,
            wait: Duration::from_secs(5),
            broker: "127.0.0.1:1883".to_owned(),
            model: root.join("models/pump-ae/model.json"),
            pipeline: root.join("pipelines/feedback-control.toml"),
            metrics: None,
            sink: "commands".to_owned(),
        };
        fn number<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, String> {
            value.parse().map_err(|_| format!("{name}: not a number: {value:?}"))
        }
        while let Some(name) = args.next() {
            let value = args.next().ok_or_else(|| format!("{name} needs a value"))?;
            match name.as_str() {
                "--prefix" => options.prefix = value,
                "--rate" => options.rate = number(&name, &value)?,
                "--pumps" => options.pumps = number(&name, &value)?,
                "--anomalies" => options.anomalies = number(&name, &value)?,
                "--warmup" => options.warmup = number(&name, &value)?,
                "--spacing" => options.spacing = number(&name, &value)?,
                "--wait" => options.wait = Duration::from_secs_f64(number(&name, &value)?),
                "--broker" => options.broker = value,
                "--model" => options.model = value.into(),
                "--pipeline" => options.pipeline = value.into(),
                "--metrics" => options.metrics = Some(value),
                "--sink" => options.sink = value,
                _ => return Err(format!("unknown option {name}")),
            }
        }
        if options.prefix.is_empty() || options.anomalies == 0 || options.pumps == 0 {
            return Err("--prefix, --anomalies and --pumps (> 0) are needed".to_owned());
        }
        if options.spacing == 0 {
            return Err("--spacing must be at least 1".to_owned());
        }
        if !(options.rate > 0.0 && options.rate.is_finite()) {
            return Err("--rate must be a positive number of readings/s".to_owned());
        }
        Ok(options)
    }
}

// --- MQTT 3.1.1, the few packets the probe needs -------------------------------------------

/// Appends MQTT's variable-length "remaining length".
fn put_length(out: &mut Vec<u8>, mut length: usize) {
    loop {
        let mut byte = (length % 128) as u8;
        length /= 128;
        if length > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if length == 0 {
            break;
        }
    }
}

/// Appends a length-prefixed UTF-8 string.
fn put_str(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u16).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// Fills `out` with one packet: `header`, the remaining length, `body`.
fn packet(out: &mut Vec<u8>, header: u8, body: &[u8]) {
    out.clear();
    out.push(header);
    put_length(out, body.len());
    out.extend_from_slice(body);
}

/// Reads one packet: its first byte and its body.
fn read_packet(reader: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    let mut byte = [0u8; 1];
    reader.read_exact(&mut byte)?;
    let header = byte[0];
    let (mut length, mut shift) = (0usize, 0u32);
    loop {
        reader.read_exact(&mut byte)?;
        length |= usize::from(byte[0] & 0x7f) << shift;
        if byte[0] & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return Err(std::io::Error::other("malformed remaining length"));
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    Ok((header, body))
}

/// A connected MQTT session (clean session, keep-alive 10 min: no pings during a case).
fn connect(broker: &str, client_id: &str) -> Result<TcpStream, String> {
    let mut stream =
        TcpStream::connect(broker).map_err(|error| format!("MQTT broker {broker}: {error}"))?;
    stream.set_nodelay(true).map_err(|error| error.to_string())?;
    let mut body = Vec::new();
    put_str(&mut body, "MQTT");
    body.extend_from_slice(&[4, 0x02]); // protocol level 4 (3.1.1), clean session
    body.extend_from_slice(&600u16.to_be_bytes());
    put_str(&mut body, client_id);
    let mut out = Vec::new();
    packet(&mut out, 0x10, &body);
    stream.write_all(&out).map_err(|error| format!("CONNECT: {error}"))?;
    let (header, ack) = read_packet(&mut stream).map_err(|error| format!("CONNACK: {error}"))?;
    if header != 0x20 || ack.get(1) != Some(&0) {
        return Err(format!("the broker refused the connection: {header:#x} {ack:?}"));
    }
    Ok(stream)
}

// --- the readings ----------------------------------------------------------------------------

/// What a reading's payload needs: the payload's name, mean and std of each model feature.
struct Features {
    names: Vec<String>,
    mean: Vec<f64>,
    std: Vec<f64>,
}

impl Features {
    /// The model's features, named as the pipeline's `normalize` (`transforms.readings`)
    /// expects them in the payload.
    fn load(options: &Options) -> Result<Features, String> {
        let read = |path: &PathBuf| {
            std::fs::read_to_string(path).map_err(|error| format!("{}: {error}", path.display()))
        };
        let spec: serde_json::Value = serde_json::from_str(&read(&options.model)?)
            .map_err(|error| format!("{}: {error}", options.model.display()))?;
        let pipeline: toml::Table = toml::from_str(&read(&options.pipeline)?)
            .map_err(|error| format!("{}: {error}", options.pipeline.display()))?;
        let rename = pipeline
            .get("transforms")
            .and_then(|transforms| transforms.get("readings"))
            .and_then(|readings| readings.get("rename"))
            .and_then(toml::Value::as_table);
        let floats = |field: &str| -> Result<Vec<f64>, String> {
            spec["scaler"][field]
                .as_array()
                .map(|values| values.iter().filter_map(serde_json::Value::as_f64).collect())
                .ok_or_else(|| format!("the model has no scaler.{field}"))
        };
        let names: Vec<String> = spec["features"]
            .as_array()
            .ok_or("the model names no features")?
            .iter()
            .filter_map(serde_json::Value::as_str)
            .map(|feature| {
                rename
                    .and_then(|table| table.get(feature))
                    .and_then(toml::Value::as_str)
                    .unwrap_or(feature)
                    .to_owned()
            })
            .collect();
        let (mean, std) = (floats("mean")?, floats("std")?);
        if mean.len() != names.len() || std.len() != names.len() {
            return Err("the model's scaler and features differ in length".to_owned());
        }
        Ok(Features { names, mean, std })
    }

    /// A reading at `ts`: normal noise around the mean, or 8 standard deviations out.
    fn payload(&self, ts: i64, anomalous: bool, rng: &mut StdRng, noise: &Normal<f64>) -> String {
        let mut values = serde_json::Map::new();
        for (i, name) in self.names.iter().enumerate() {
            let z = match (anomalous, i % 2 == 0) {
                (true, true) => 8.0,
                (true, false) => -8.0,
                (false, _) => noise.sample(rng),
            };
            let value = ((self.mean[i] + z * self.std[i]) * 1e6).round() / 1e6;
            values.insert(name.clone(), value.into());
        }
        values.insert("ts".to_owned(), ts.into());
        serde_json::Value::Object(values).to_string()
    }
}

/// The schedule: (due offset in s, pump, anomalous), in publishing order. Each pump's
/// anomalies come after its warm-up, `spacing` readings apart; the pumps take turns, and
/// their anomalies spread over 5 readings rather than one burst.
fn schedule(options: &Options) -> Vec<(f64, usize, bool)> {
    let pumps = options.pumps;
    let per_pump: Vec<usize> = (0..pumps)
        .map(|p| options.anomalies / pumps + usize::from(p < options.anomalies % pumps))
        .collect();
    let period = 1.0 / options.rate;
    let spread = pumps.min(5);
    let longest = per_pump.iter().copied().max().unwrap_or(0);
    let count = options.warmup + spread + longest * options.spacing + 2;
    let mut all = Vec::with_capacity(pumps * count);
    for (pump, anomalies) in per_pump.iter().enumerate() {
        let phase = period * pump as f64 / pumps as f64;
        let first = options.warmup + pump % spread;
        for i in 0..count {
            let anomalous = i >= first
                && (i - first).is_multiple_of(options.spacing)
                && (i - first) / options.spacing < *anomalies;
            all.push((phase + i as f64 * period, pump, anomalous));
        }
    }
    all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    all
}

// --- the pipeline's own view -------------------------------------------------------------------

/// The upper bound (ms) of the `tidewatch_sink_event_lag_seconds` bucket of `sink` holding
/// its 99th percentile, from a Prometheus text page at `url` (`http://host:port/path`).
fn metrics_p99(url: &str, sink: &str) -> Option<f64> {
    let rest = url.strip_prefix("http://")?;
    let (address, path) = rest.split_once('/').map_or((rest, "/"), |(a, _)| (a, &rest[a.len()..]));
    let mut stream = TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").ok()?;
    let mut page = String::new();
    stream.read_to_string(&mut page).ok()?;
    let component = format!("component_id=\"{sink}\"");
    let mut buckets: Vec<(f64, f64)> = page
        .lines()
        .filter(|line| line.starts_with("tidewatch_sink_event_lag_seconds_bucket{"))
        .filter(|line| line.contains(&component))
        .filter_map(|line| {
            let le = line.split_once("le=\"")?.1.split_once('"')?.0;
            let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((bound, line.rsplit_once(' ')?.1.parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    buckets.iter().find(|(_, count)| *count >= 0.99 * total).map(|(bound, _)| bound * 1000.0)
}

/// Nearest-rank percentile of sorted `values`.
fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let rank = ((q / 100.0 * values.len() as f64).ceil() as usize).max(1);
    values[rank - 1]
}

/// (device, reading ts) of each `anomaly_open` command -> when it arrived.
type Arrivals = Arc<Mutex<HashMap<(String, i64), Instant>>>;

/// Reads the command subscription until the socket closes; signals `done` once `expected`
/// distinct alerts have arrived.
fn receive(stream: TcpStream, arrived: Arrivals, expected: usize, done: mpsc::Sender<()>) {
    let mut reader = BufReader::new(stream);
    while let Ok((header, body)) = read_packet(&mut reader) {
        let now = Instant::now();
        if header >> 4 != 3 || body.len() < 2 {
            continue; // not a PUBLISH
        }
        let topic_end = 2 + usize::from(u16::from_be_bytes([body[0], body[1]]));
        // QoS 0 was asked for: no packet id follows the topic.
        let Some(payload) = body.get(topic_end..) else { continue };
        let Ok(command) = serde_json::from_slice::<serde_json::Value>(payload) else { continue };
        if command["command"] != "anomaly_open" {
            continue;
        }
        let device = command["device"].as_str().unwrap_or_default().to_owned();
        let ts = command["time_ms"].as_i64().unwrap_or(0) - 1;
        let Ok(mut arrived) = arrived.lock() else { return };
        arrived.entry((device, ts)).or_insert(now);
        if arrived.len() == expected {
            let _ = done.send(());
        }
    }
}

fn run(options: &Options) -> Result<bool, String> {
    let features = Features::load(options)?;
    let mut rng = StdRng::seed_from_u64(7);
    let noise = Normal::new(0.0, 0.3).map_err(|error| error.to_string())?;

    let arrived: Arrivals = Arc::default();
    let (done, finished) = mpsc::channel();
    let mut subscriber = connect(&options.broker, &format!("{}-sub", options.prefix))?;
    let mut body = vec![0, 1]; // packet id 1
    put_str(&mut body, &format!("{}/+/commands", options.prefix));
    body.push(0); // QoS 0
    let mut out = Vec::new();
    packet(&mut out, 0x82, &body);
    subscriber.write_all(&out).map_err(|error| format!("SUBSCRIBE: {error}"))?;
    let (header, ack) = read_packet(&mut subscriber).map_err(|error| format!("SUBACK: {error}"))?;
    if header != 0x90 || ack.get(2).is_none_or(|granted| *granted == 0x80) {
        return Err("the command subscription was refused".to_owned());
    }
    let reader = subscriber.try_clone().map_err(|error| error.to_string())?;
    let receiver = {
        let arrived = Arc::clone(&arrived);
        let expected = options.anomalies;
        std::thread::spawn(move || receive(reader, arrived, expected, done))
    };

    let mut publisher = connect(&options.broker, &format!("{}-pub", options.prefix))?;
    let topics: Vec<String> = (0..options.pumps)
        .map(|pump| format!("{}/pump-{pump}/telemetry", options.prefix))
        .collect();
    let mut published: HashMap<(String, i64), Instant> = HashMap::new();
    let mut last_ts = vec![0i64; options.pumps];
    let epoch_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|error| error.to_string())?
        .as_secs_f64()
        * 1000.0;
    let start = Instant::now();
    let mut message = Vec::new();
    for (due, pump, anomalous) in schedule(options) {
        let at = start + Duration::from_secs_f64(due);
        if let Some(delay) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(delay);
        }
        // Event time = the wall clock at publishing, never behind the pump's previous one.
        let ts = ((epoch_ms + start.elapsed().as_secs_f64() * 1000.0) as i64).max(last_ts[pump]);
        last_ts[pump] = ts;
        let payload = features.payload(ts, anomalous, &mut rng, &noise);
        let mut body = Vec::with_capacity(topics[pump].len() + payload.len() + 2);
        put_str(&mut body, &topics[pump]);
        body.extend_from_slice(payload.as_bytes());
        packet(&mut message, 0x30, &body);
        let now = Instant::now();
        publisher.write_all(&message).map_err(|error| format!("PUBLISH: {error}"))?;
        if anomalous {
            published.insert((format!("pump-{pump}"), ts), now);
        }
    }
    let _ = finished.recv_timeout(options.wait);
    let _ = publisher.write_all(&[0xe0, 0]); // DISCONNECT
    let _ = subscriber.write_all(&[0xe0, 0]);
    let _ = subscriber.shutdown(Shutdown::Both);
    let _ = receiver.join();

    let arrived = arrived.lock().map_err(|_| "the receiver failed".to_owned())?;
    let mut latencies: Vec<f64> = published
        .iter()
        .filter_map(|(key, sent)| Some(arrived.get(key)?.duration_since(*sent).as_secs_f64() * 1e3))
        .collect();
    latencies.sort_by(f64::total_cmp);
    let metrics = options
        .metrics
        .as_deref()
        .and_then(|url| metrics_p99(url, &options.sink))
        .map(|bound| format!("; /metrics p99 <= {bound} ms"))
        .unwrap_or_default();
    println!(
        "rate {} pumps {} p50 {:.1} ms p99 {:.1} ms max {:.1} ms ({}/{} alerts{metrics})",
        options.rate,
        options.pumps,
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        latencies.last().copied().unwrap_or(f64::NAN),
        latencies.len(),
        published.len(),
    );
    if latencies.len() < published.len() {
        eprintln!("{} anomalies raised no anomaly_open command", published.len() - latencies.len());
    }
    Ok(latencies.len() == published.len())
}

fn main() -> ExitCode {
    let options = match Options::parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(error) => {
            eprintln!("latency-probe: {error}");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("latency-probe: {error}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_lengths_round_trip() {
        for length in [0, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152] {
            let mut out = Vec::new();
            packet(&mut out, 0x30, &vec![7u8; length]);
            let (header, body) = read_packet(&mut out.as_slice()).expect("a packet");
            assert_eq!((header, body.len()), (0x30, length));
        }
    }

    #[test]
    fn the_schedule_spaces_each_pumps_anomalies_after_its_warm_up() {
        let options = Options::parse(
            ["--prefix", "p", "--rate", "10", "--pumps", "3", "--anomalies", "5"]
                .into_iter()
                .map(str::to_owned),
        )
        .expect("options");
        let all = schedule(&options);
        assert!(all.windows(2).all(|pair| pair[0].0 <= pair[1].0), "in time order");
        let anomalous: Vec<(usize, usize)> = (0..3)
            .flat_map(|pump| {
                all.iter()
                    .filter(move |(_, p, _)| *p == pump)
                    .enumerate()
                    .filter(|(_, (_, _, anomalous))| *anomalous)
                    .map(move |(index, _)| (pump, index))
            })
            .collect();
        // 5 anomalies over 3 pumps: 2, 2, 1; pump p starts at warm-up + p, 14 apart.
        assert_eq!(anomalous, vec![(0, 12), (0, 26), (1, 13), (1, 27), (2, 14)]);
    }
}
