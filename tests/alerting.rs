//! The alerting loop end to end, against a real Prometheus and Alertmanager on 127.0.0.1
//! (`scripts/services.sh start prometheus` and `start alertmanager`; scripts/test.sh does):
//!
//! a file replayed at its recorded speed (two synthetic devices with an anomalous segment) ->
//! normalize -> window -> stats (threshold) -> threshold (open/close events) ->
//! `enrich` (the device's site from a catalog) -> `prometheus` sink (`labels = ["device",
//! "site"]`) on the engine's `/metrics` (127.0.0.1:19898) -> Prometheus scrapes it every second and
//! evaluates the SHIPPED rules (k8s/monitoring/prometheus-rules.yml) -> Alertmanager, with the
//! SHIPPED config (k8s/monitoring/alertmanager.yml, only the webhook URL substituted) -> a
//! webhook receiver in this test (127.0.0.1:19899) gets the firing alert, then the resolved
//! notice once the anomaly closed; the alert of a device at site north at north's receiver
//! (`/alerts/site/north`, the shipped config's example route) only, one at site south at the
//! default receiver only.
//!
//! The ports are the defaults of scripts/services.sh (`TIDEWATCH_SCRAPE_TARGET`,
//! `TIDEWATCH_ALERT_WEBHOOK_URL`). Every run uses its own device name, so the alerts of an
//! earlier run do not count.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tidewatch::engine::{EngineError, RunContext};

const METRICS_ADDRESS: &str = "127.0.0.1:19898";
const WEBHOOK_ADDRESS: &str = "127.0.0.1:19899";
const PROMETHEUS: &str = "127.0.0.1:9090";
const ALERTMANAGER: &str = "127.0.0.1:9093";

/// A GET over plain HTTP/1.0; the status code and body.
fn http_get(address: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(
        &address.parse().map_err(std::io::Error::other)?,
        Duration::from_secs(2),
    )?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status line"))?;
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
    Ok((status, body))
}

fn require_ready(name: &str, address: &str) {
    match http_get(address, "/-/ready") {
        Ok((200, _)) => {}
        other => panic!(
            "{name} is not ready on {address} ({other:?}): start it with \
             `scripts/services.sh start {name}` (scripts/test.sh does)"
        ),
    }
}

/// Polls `condition` every 100 ms until it holds or `timeout` passes.
fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------------
// A webhook receiver: records every POST (headers, body, the status it answered)
// ---------------------------------------------------------------------------------------------

/// How the receiver answers a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Status(u16),
    /// Keep the connection open without answering (a receiver that hangs).
    Hang,
}

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Received {
    /// The request's path (`/alerts`, `/alerts/site/north`).
    path: String,
    headers: Headers,
    body: Vec<u8>,
    answered: Answer,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(candidate, _)| candidate.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

type Answering = Box<dyn FnMut() -> Answer + Send>;

struct Receiver {
    address: String,
    requests: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Header names (lowercase) and values, in order.
type Headers = Vec<(String, String)>;

/// Reads one HTTP/1.1 request: its path, headers and body (`None` at a closed connection).
fn read_request(stream: &mut TcpStream) -> std::io::Result<Option<(String, Headers, Vec<u8>)>> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut data = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let read = stream.read(&mut chunk)?;
        if read == 0 {
            return Ok(None);
        }
        data.extend_from_slice(&chunk[..read]);
        let Some(end) = data.windows(4).position(|window| window == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&data[..end]).into_owned();
        let path = head.split(' ').nth(1).unwrap_or_default().to_owned();
        let headers: Headers = head
            .lines()
            .skip(1)
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
            .collect();
        let length: usize = headers
            .iter()
            .find(|(name, _)| name == "content-length")
            .and_then(|(_, value)| value.parse().ok())
            .unwrap_or(0);
        while data.len() < end + 4 + length {
            let read = stream.read(&mut chunk)?;
            if read == 0 {
                break;
            }
            data.extend_from_slice(&chunk[..read]);
        }
        let body_end = (end + 4 + length).min(data.len());
        return Ok(Some((path, headers, data[end + 4..body_end].to_vec())));
    }
}

impl Receiver {
    /// Listens on `address` (`127.0.0.1:0` for a free port); `answer` decides each answer.
    fn start(address: &str, mut answer: Answering) -> Receiver {
        let listener = TcpListener::bind(address)
            .unwrap_or_else(|error| panic!("cannot listen on {address} for webhooks: {error}"));
        let address = listener.local_addr().expect("local address").to_string();
        listener.set_nonblocking(true).expect("non-blocking listener");
        let requests: Arc<Mutex<Vec<Received>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, stopping) = (Arc::clone(&requests), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut hanging = Vec::new();
            while !stopping.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        // One request per connection (answers say `Connection: close`).
                        let Ok(Some((path, headers, body))) = read_request(&mut stream) else {
                            continue;
                        };
                        let answered = answer();
                        let received = Received { path, headers, body, answered };
                        seen.lock().expect("requests").push(received);
                        match answered {
                            Answer::Status(code) => {
                                let _ = write!(
                                    stream,
                                    "HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                                );
                            }
                            Answer::Hang => hanging.push(stream),
                        }
                    }
                    // Nothing to accept: look again shortly (a poll, not a synchronisation).
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Receiver { address, requests, stop, thread: Some(thread) }
    }

    /// A receiver answering 200 to everything.
    fn ok(address: &str) -> Receiver {
        Receiver::start(address, Box::new(|| Answer::Status(200)))
    }

    fn requests(&self) -> Vec<Received> {
        self.requests.lock().expect("requests").clone()
    }

    /// The Alertmanager alerts named `alertname` for `device` received so far.
    fn alerts(&self, alertname: &str, device: &str) -> Vec<serde_json::Value> {
        self.alerts_at(None, alertname, device)
    }

    /// The same, of the requests to `path` only (any path for `None`).
    fn alerts_at(
        &self,
        path: Option<&str>,
        alertname: &str,
        device: &str,
    ) -> Vec<serde_json::Value> {
        self.requests()
            .iter()
            .filter(|request| path.is_none_or(|path| request.path == path))
            .flat_map(|request| request.json()["alerts"].as_array().cloned().unwrap_or_default())
            .filter(|alert| {
                alert["labels"]["alertname"] == alertname && alert["labels"]["device"] == device
            })
            .collect()
    }

    fn has(&self, alertname: &str, device: &str, status: &str) -> bool {
        self.alerts(alertname, device).iter().any(|alert| alert["status"] == status)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The pipeline
// ---------------------------------------------------------------------------------------------

struct Running {
    context: RunContext,
    handle: Option<JoinHandle<Result<(), EngineError>>>,
    _server: tidewatch::engine::HttpServer,
}

impl Running {
    fn stop(mut self) -> Result<(), EngineError> {
        self.context.request_shutdown();
        let handle = self.handle.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !handle.is_finished() {
            assert!(Instant::now() < deadline, "the pipeline did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
        handle.join().expect("the run thread does not panic")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.context.request_shutdown();
    }
}

/// From the replayed file (`[sources.replay]`) to open/close events (`alerts`): a moving
/// baseline per device, an event per anomalous window, closed after 5 calm ones.
const DETECTION: &str = r#"
[transforms.readings]
type = "normalize"
inputs = ["replay"]
device_field = "device"
timestamp_field = "ts"
timestamp_format = "unix_ms"
features = ["value"]

[transforms.windows]
type = "window"
inputs = ["readings"]
size_ms = 1000

[transforms.detector]
type = "stats"
inputs = ["windows"]
baseline_alpha = 0.1
warmup_windows = 3
threshold = 6.0

[transforms.alerts]
type = "threshold"
inputs = ["detector"]
n = 1
m = 1
hysteresis = 5
"#;

/// The pipeline of the alerting loop: DETECTION between a paced replay and the gauges, its
/// events labelled with their device's site from a catalog (`enrich`).
fn alerting_pipeline() -> String {
    let source = r#"
[pipeline]
name = "alerting-test"
out_of_orderness_ms = 0
idle_timeout_ms = 1000
http_address = ""

[sources.replay]
type = "file"
path = "${DATA}"
speed = 1.0
timestamp_field = "ts"
timestamp_format = "unix_ms"

[sources.devices]
type = "catalog"
path = "${CATALOG}"
"#;
    let sinks = r#"
[transforms.enriched]
type = "enrich"
inputs = ["devices", "alerts"]

[sinks.gauges]
type = "prometheus"
inputs = ["enriched.matched"]
labels = ["device", "site"]
max_series = 100
top_n = 3
top_window_secs = 60
"#;
    format!("{source}{DETECTION}{sinks}")
}

/// Readings every 100 ms from now on of each device: 10 s normal, 2 s at a far higher level
/// (the anomaly), then normal for three minutes (the test stops the pipeline before the end).
fn write_data(path: &std::path::Path, devices: &[&str]) {
    let start = tidewatch::api::records::now_ms() / 1000 * 1000;
    let mut text = String::from("device,ts,value\n");
    for step in 0..1900i64 {
        for device in devices {
            let normal = 10.0 + 0.5 * (step as f64 * 1.3).sin();
            let value = if (100..120).contains(&step) { 60.0 } else { normal };
            text.push_str(&format!("{device},{},{value:.4}\n", start + step * 100));
        }
    }
    std::fs::write(path, text).expect("write the data file");
}

/// The value of `tidewatch_anomaly_active` for `device` on the engine's /metrics.
fn active(device: &str) -> Option<f64> {
    let (_, body) = http_get(METRICS_ADDRESS, "/metrics").ok()?;
    body.lines()
        .filter(|line| line.starts_with("tidewatch_anomaly_active{"))
        .find(|line| line.contains(&format!("device=\"{device}\"")))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

#[test]
fn anomaly_fires_an_alert_through_prometheus_and_alertmanager_then_resolves() {
    require_ready("prometheus", PROMETHEUS);
    require_ready("alertmanager", ALERTMANAGER);
    let receiver = Receiver::ok(WEBHOOK_ADDRESS);

    let dir = tempfile::tempdir().expect("temp dir");
    let run = format!("{}-{}", std::process::id(), tidewatch::api::records::now_ms());
    // `device` is at site north, which the shipped Alertmanager config routes to its own
    // receiver; `elsewhere` is at site south, which takes the default route.
    let device = format!("pump-alert-{run}");
    let elsewhere = format!("pump-south-{run}");
    let data = dir.path().join("readings.csv");
    write_data(&data, &[&device, &elsewhere]);
    let catalog = dir.path().join("devices.csv");
    std::fs::write(&catalog, format!("device,site\n{device},north\n{elsewhere},south\n"))
        .expect("catalog");

    let variables =
        [("DATA", data.display().to_string()), ("CATALOG", catalog.display().to_string())];
    let pipeline = common::load(&alerting_pipeline(), &variables)
        .unwrap_or_else(|errors| panic!("invalid test pipeline:\n{errors}"));
    let context = RunContext::default();
    let server = tidewatch::engine::serve(
        METRICS_ADDRESS,
        Arc::clone(&context.metrics),
        Arc::clone(&context.health),
    )
    .unwrap_or_else(|error| panic!("serving /metrics on {METRICS_ADDRESS}: {error}"));
    let shared = context.clone();
    let handle = std::thread::spawn(move || tidewatch::run(&pipeline, 1, &shared));
    let running = Running { context, handle: Some(handle), _server: server };

    // The gauge opens (the anomalous segment starts 10 s in).
    wait_until("tidewatch_anomaly_active = 1 on /metrics", Duration::from_secs(60), || {
        active(&device) == Some(1.0)
    });
    let opened = Instant::now();

    // Prometheus scrapes it, the shipped rule fires after its `for`, Alertmanager notifies.
    wait_until("the firing alert at the webhook", Duration::from_secs(90), || {
        receiver.has("TidewatchAnomalyActive", &device, "firing")
    });
    let firing = receiver.alerts("TidewatchAnomalyActive", &device);
    let alert = firing.iter().find(|alert| alert["status"] == "firing").expect("firing");
    assert_eq!(alert["labels"]["job"], "tidewatch");
    assert_eq!(alert["labels"]["component_id"], "gauges");
    assert_eq!(alert["labels"]["severity"], "warning");
    assert!(
        opened.elapsed() >= Duration::from_secs(9),
        "the rule's `for: 10s` was not honoured: fired {:?} after the gauge opened",
        opened.elapsed()
    );
    assert!(
        !receiver.has("TidewatchAnomalyActive", &device, "resolved"),
        "resolved before the anomaly closed"
    );
    // Routed by the catalog's site: north's alert reached north's receiver only, south's the
    // default receiver only.
    assert_eq!(alert["labels"]["site"], "north");
    wait_until("the south device's firing alert", Duration::from_secs(60), || {
        receiver.has("TidewatchAnomalyActive", &elsewhere, "firing")
    });
    let at =
        |path: &str, device: &str| receiver.alerts_at(Some(path), "TidewatchAnomalyActive", device);
    assert!(!at("/alerts/site/north", &device).is_empty());
    assert!(at("/alerts", &device).is_empty(), "north's alert went to the default receiver too");
    assert!(!at("/alerts", &elsewhere).is_empty());
    assert!(at("/alerts/site/north", &elsewhere).is_empty(), "south's alert reached north");

    // The anomaly closes (threshold's hysteresis), the gauge goes back to 0 ...
    wait_until("tidewatch_anomaly_active = 0 on /metrics", Duration::from_secs(90), || {
        active(&device) == Some(0.0)
    });
    // ... and the resolved notice follows.
    wait_until("the resolved notice at the webhook", Duration::from_secs(90), || {
        receiver.has("TidewatchAnomalyActive", &device, "resolved")
    });
    // The pipeline was still running (the gauge, not the target's end, resolved it).
    assert!(running.handle.as_ref().is_some_and(|handle| !handle.is_finished()));
    assert!(active(&device) == Some(0.0));

    running.stop().expect("the pipeline stops cleanly");
}

// ---------------------------------------------------------------------------------------------
// The webhook sink, against receivers that fail, recover, reject or hang
// ---------------------------------------------------------------------------------------------

const SECRET: &str = "correct horse battery staple";

/// A pipeline from a replayed file to threshold's open/close events, written to `events.jsonl`
/// and to a `webhook` sink with `options`.
fn webhook_pipeline(
    dir: &std::path::Path,
    data: &std::path::Path,
    url: &str,
    options: &str,
) -> std::path::PathBuf {
    let text = format!(
        r#"
[pipeline]
name = "webhook-test"
out_of_orderness_ms = 0
http_address = ""

[sources.replay]
type = "file"
path = "{data}"

{DETECTION}
[sinks.events]
type = "file"
inputs = ["alerts"]
path = "{events}"

[sinks.hook]
type = "webhook"
inputs = ["alerts"]
url = "{url}"
secret_env = "TIDEWATCH_TEST_WEBHOOK_SECRET"
dead_letter_path = "{dead}"
{options}
"#,
        data = data.display(),
        events = dir.join("events.jsonl").display(),
        dead = dir.join("dead.jsonl").display(),
    );
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, text).expect("write the pipeline");
    path
}

/// `devices` devices, readings every 100 ms for 80 s, each with `anomalies` (at most 2)
/// anomalous segments of 2 s, 35 s apart (the `stats` baseline forgets the first) (far above the normal level); the number of anomalies injected.
fn write_fleet(path: &std::path::Path, devices: usize, anomalies: usize) -> usize {
    let start = 1_750_000_000_000i64;
    let mut text = String::from("device,ts,value\n");
    for step in 0..800i64 {
        for device in 0..devices {
            let normal = 10.0 + 0.5 * ((step + device as i64 * 7) as f64 * 1.3).sin();
            let anomalous =
                (0..anomalies as i64).any(|k| (100 + 350 * k..120 + 350 * k).contains(&step));
            let value = if anomalous { 60.0 } else { normal };
            text.push_str(&format!("hook-{device},{},{value:.4}\n", start + step * 100));
        }
    }
    std::fs::write(path, text).expect("write the data file");
    devices * anomalies
}

/// Runs the tidewatch binary on `pipeline` with the webhook secret in its environment; waits
/// for it to exit (bounded) and returns its status and standard error.
fn run_binary(pipeline: &std::path::Path) -> (std::process::ExitStatus, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tidewatch"))
        .args(["run", &pipeline.display().to_string()])
        .env("TIDEWATCH_TEST_WEBHOOK_SECRET", SECRET)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start tidewatch");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Some(status) = child.try_wait().expect("wait for tidewatch") {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                let _ = pipe.read_to_string(&mut stderr);
            }
            return (status, stderr);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("tidewatch did not finish within 180 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The identity of an event as the default (Alertmanager) payload shows it.
fn alert_identity(alert: &serde_json::Value) -> (String, String, String) {
    (
        alert["labels"]["device"].as_str().unwrap_or_default().to_owned(),
        alert["status"].as_str().unwrap_or_default().to_owned(),
        alert["startsAt"].as_str().unwrap_or_default().to_owned(),
    )
}

/// The same identity of an event of `events.jsonl`.
fn event_identity(event: &serde_json::Value) -> (String, String, String) {
    let status = if event["state"] == "open" { "firing" } else { "resolved" };
    let started = event["started_ms"].as_i64().expect("started_ms");
    (
        event["device"].as_str().unwrap_or_default().to_owned(),
        status.to_owned(),
        tidewatch::api::time::format_rfc3339(started),
    )
}

/// Checks the signature headers of a request with an independent HMAC-SHA256.
fn signature_verifies(request: &Received) -> bool {
    let (Some(timestamp), Some(signature)) =
        (request.header("x-tidewatch-timestamp"), request.header("x-tidewatch-signature"))
    else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let mut message = format!("{timestamp}.").into_bytes();
    message.extend_from_slice(&request.body);
    let expected: String = ring::hmac::sign(&key, &message)
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    signature == format!("sha256={expected}")
}

#[test]
fn webhook_delivers_every_event_once_through_a_receiver_outage() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("fleet.csv");
    let anomalies = write_fleet(&data, 6, 2);
    // 500 for the 10 s that follow the first request, then 200.
    let mut outage_start: Option<Instant> = None;
    let receiver = Receiver::start(
        "127.0.0.1:0",
        Box::new(move || {
            let start = *outage_start.get_or_insert_with(Instant::now);
            Answer::Status(if start.elapsed() < Duration::from_secs(10) { 500 } else { 200 })
        }),
    );
    let url = format!("http://{}/hooks/anomaly", receiver.address);
    let options = "max_retries = 40\nbackoff_initial_ms = 100\nbackoff_max_ms = 1000\n\
                   concurrency = 3\ndrain_timeout_ms = 120000";
    let pipeline = webhook_pipeline(dir.path(), &data, &url, options);
    let (status, stderr) = run_binary(&pipeline);
    assert!(status.success(), "tidewatch failed: {stderr}");

    let events = common::json_lines(&dir.path().join("events.jsonl"));
    assert_eq!(events.len(), 2 * anomalies, "one open and one close per injected anomaly");
    let requests = receiver.requests();
    assert!(
        requests.iter().any(|request| request.answered == Answer::Status(500)),
        "the outage did not happen"
    );
    // Every request is signed, and the signature verifies.
    for request in &requests {
        assert!(signature_verifies(request), "bad signature on {:?}", request.headers);
        assert_eq!(request.header("content-type"), Some("application/json"));
    }
    // Every event was delivered (a 2xx answer), none twice by idempotency key.
    let delivered: Vec<&Received> =
        requests.iter().filter(|request| request.answered == Answer::Status(200)).collect();
    let mut keys = std::collections::HashSet::new();
    for request in &delivered {
        let key = request.header("idempotency-key").expect("an idempotency key");
        assert!(keys.insert(key.to_owned()), "event {key} delivered twice");
    }
    let mut expected: Vec<_> = events.iter().map(event_identity).collect();
    let mut got: Vec<_> = delivered
        .iter()
        .flat_map(|request| request.json()["alerts"].as_array().cloned().unwrap_or_default())
        .map(|alert| alert_identity(&alert))
        .collect();
    expected.sort();
    got.sort();
    assert_eq!(got, expected, "delivered events differ from the events detected");
    // Failed attempts were retries of those same events.
    for request in &requests {
        let key = request.header("idempotency-key").unwrap_or_default();
        assert!(keys.contains(key), "a request for an event never delivered: {key}");
    }
    // Per device, the close never overtook the open.
    for device in 0..6 {
        let statuses: Vec<String> = delivered
            .iter()
            .map(|request| request.json())
            .filter(|body| body["alerts"][0]["labels"]["device"] == format!("hook-{device}"))
            .map(|body| body["status"].as_str().unwrap_or_default().to_owned())
            .collect();
        let alternating = statuses
            .iter()
            .enumerate()
            .all(|(index, status)| status == if index % 2 == 0 { "firing" } else { "resolved" });
        assert!(alternating, "hook-{device} got {statuses:?}");
    }
    assert!(common::json_lines(&dir.path().join("dead.jsonl")).is_empty(), "nothing dead-lettered");
}

#[test]
fn webhook_dead_letters_events_past_max_retries_and_rejections() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("fleet.csv");
    let anomalies = write_fleet(&data, 3, 1);
    let receiver = Receiver::start("127.0.0.1:0", Box::new(|| Answer::Status(503)));
    let url = format!("http://{}/hooks/anomaly", receiver.address);
    let options = "max_retries = 2\nbackoff_initial_ms = 20\nbackoff_max_ms = 50";
    let (status, stderr) = run_binary(&webhook_pipeline(dir.path(), &data, &url, options));
    assert!(status.success(), "tidewatch failed: {stderr}");

    let events = common::json_lines(&dir.path().join("events.jsonl"));
    assert_eq!(events.len(), 2 * anomalies);
    let dead = common::json_lines(&dir.path().join("dead.jsonl"));
    assert_eq!(dead.len(), events.len(), "every event lands in the dead-letter file");
    let requests = receiver.requests();
    for letter in &dead {
        assert_eq!(letter["reason"], "max_retries");
        assert_eq!(letter["attempts"], 3, "one request and max_retries = 2 retries");
        assert!(letter["last_error"].as_str().unwrap_or_default().contains("503"), "{letter}");
        let key = letter["idempotency_key"].as_str().expect("key");
        let tries = requests.iter().filter(|r| r.header("idempotency-key") == Some(key)).count();
        assert_eq!(tries, 3, "requests for {key}");
        // The letter holds what is needed to resend it.
        let body: serde_json::Value =
            serde_json::from_str(letter["body"].as_str().expect("body")).expect("JSON body");
        assert_eq!(body["alerts"][0]["labels"]["device"], letter["event"]["device"]);
    }
    let mut expected: Vec<_> = events.iter().map(event_identity).collect();
    let mut got: Vec<_> = dead.iter().map(|letter| event_identity(&letter["event"])).collect();
    expected.sort();
    got.sort();
    assert_eq!(got, expected);

    // A receiver that rejects (4xx) gets each event once: repeating would not help.
    let rejecting = Receiver::start("127.0.0.1:0", Box::new(|| Answer::Status(422)));
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("http://{}/hooks/anomaly", rejecting.address);
    let (status, stderr) = run_binary(&webhook_pipeline(dir.path(), &data, &url, options));
    assert!(status.success(), "tidewatch failed: {stderr}");
    let dead = common::json_lines(&dir.path().join("dead.jsonl"));
    assert_eq!(dead.len(), 2 * anomalies);
    assert!(dead.iter().all(|letter| letter["reason"] == "rejected" && letter["attempts"] == 1));
    assert_eq!(rejecting.requests().len(), 2 * anomalies);
}

#[test]
fn webhook_receiver_that_hangs_never_blocks_detection() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("fleet.csv");
    let anomalies = write_fleet(&data, 8, 2);
    let receiver = Receiver::start("127.0.0.1:0", Box::new(|| Answer::Hang));
    let url = format!("http://{}/hooks/anomaly", receiver.address);
    // One lane, stuck on its first request for a minute; room for 3 more events.
    let options = "concurrency = 1\nqueue_capacity = 4\ntimeout_ms = 60000\ndrain_timeout_ms = 200";
    let (status, stderr) = run_binary(&webhook_pipeline(dir.path(), &data, &url, options));
    assert!(status.success(), "tidewatch failed: {stderr}");

    // Detection ran to the end: every event was detected ...
    let events = common::json_lines(&dir.path().join("events.jsonl"));
    assert_eq!(events.len(), 2 * anomalies);
    // ... and every one that could not be delivered is in the dead-letter file, with why.
    let dead = common::json_lines(&dir.path().join("dead.jsonl"));
    assert_eq!(dead.len(), events.len(), "no event lost");
    let count = |reason: &str| dead.iter().filter(|letter| letter["reason"] == reason).count();
    assert_eq!(count("queue_full"), events.len() - 4, "beyond queue_capacity");
    assert_eq!(count("shutdown"), 4, "queued (or in flight) when the pipeline stopped");
    assert_eq!(receiver.requests().len(), 1, "one request in flight at a time");
}

/// The `verified` function of the docs is the one of scripts/webhook-receiver.py.
#[test]
fn the_documented_signature_check_is_the_shipped_receivers() {
    let docs = std::fs::read_to_string(common::root().join("docs/reference/sources-and-sinks.md"))
        .expect("the reference");
    let script = std::fs::read_to_string(common::root().join("scripts/webhook-receiver.py"))
        .expect("the receiver");
    let start = docs.find("def verified(").expect("the docs show verified()");
    let end = docs[start..].find("```").expect("the end of the block") + start;
    let function = docs[start..end].trim_end();
    assert!(script.contains(function), "docs and scripts/webhook-receiver.py differ:\n{function}");
}

#[test]
fn webhook_to_the_shipped_python_receiver_verifies_and_dedupes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("fleet.csv");
    let anomalies = write_fleet(&data, 3, 2);
    let mut receiver = std::process::Command::new("python3")
        .arg(common::root().join("scripts/webhook-receiver.py"))
        .args(["--port", "0"])
        .env("TIDEWATCH_WEBHOOK_SECRET", SECRET)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs scripts/webhook-receiver.py");
    let mut stderr = std::io::BufReader::new(receiver.stderr.take().expect("stderr"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut line).expect("the receiver's first line");
    let url = line.trim().strip_prefix("listening on ").expect("listening on URL").to_owned();
    let address = url.trim_start_matches("http://").to_owned();

    let (status, stderr) =
        run_binary(&webhook_pipeline(dir.path(), &data, &format!("{url}/hook"), ""));
    assert!(status.success(), "tidewatch failed: {stderr}");

    // A forged request is refused; a valid resend of a processed event is acknowledged and
    // not processed again.
    let post = |headers: &str, body: &str| -> u16 {
        let mut stream = TcpStream::connect(&address).expect("connect to the receiver");
        write!(
            stream,
            "POST /hook HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n{headers}\r\n{body}",
            body.len()
        )
        .expect("send");
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0)
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let forged = format!(
        "Idempotency-Key: forged\r\nX-Tidewatch-Timestamp: {now}\r\n\
         X-Tidewatch-Signature: sha256={}\r\n",
        "0".repeat(64)
    );
    assert_eq!(post(&forged, "{\"alerts\": []}"), 401);

    let events = common::json_lines(&dir.path().join("events.jsonl"));
    assert_eq!(events.len(), 2 * anomalies);
    // Resend the first event as tidewatch would on a retry: same key, fresh signature.
    let first = &events[0];
    let event = tidewatch::api::AnomalyEvent {
        device: tidewatch::api::DeviceId::intern(first["device"].as_str().expect("device")),
        state: if first["state"] == "open" {
            tidewatch::api::AnomalyState::Open
        } else {
            tidewatch::api::AnomalyState::Close
        },
        time_ms: first["time_ms"].as_i64().expect("time_ms"),
        started_ms: first["started_ms"].as_i64().expect("started_ms"),
        score: 0.0,
        peak_score: 0.0,
        threshold: None,
        detector: Arc::from("d"),
        version: Arc::from("v"),
        label: 0,
        columns: Arc::new(tidewatch::api::Schema::new(["value"])),
        values: Vec::new(),
        labels: Default::default(),
    };
    // The key depends on what identifies the event only.
    let first_key = tidewatch::connectors::webhook::idempotency_key("webhook-test", "hook", &event);
    let body = "{\"status\": \"firing\", \"alerts\": []}";
    let signature = tidewatch::connectors::webhook::sign(SECRET.as_bytes(), now, body.as_bytes());
    let resend = format!(
        "Idempotency-Key: {first_key}\r\nX-Tidewatch-Timestamp: {now}\r\n\
         X-Tidewatch-Signature: {signature}\r\n"
    );
    assert_eq!(post(&resend, body), 200);

    let _ = receiver.kill();
    let mut stdout = String::new();
    receiver.stdout.take().expect("stdout").read_to_string(&mut stdout).expect("read stdout");
    let _ = receiver.wait();
    let processed: Vec<serde_json::Value> =
        stdout.lines().map(|line| serde_json::from_str(line).expect("JSON line")).collect();
    assert_eq!(processed.len(), events.len(), "each event processed once:\n{stdout}");
    let keys: std::collections::HashSet<&str> =
        processed.iter().filter_map(|event| event["key"].as_str()).collect();
    assert_eq!(keys.len(), events.len());
    assert!(keys.contains(first_key.as_str()), "the key the sink sent is the documented one");
}
