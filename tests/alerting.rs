//! The alerting loop end to end, against a real Prometheus and Alertmanager on 127.0.0.1
//! (`scripts/services.sh start prometheus` and `start alertmanager`; scripts/test.sh does):
//!
//! a file replayed at its recorded speed (a synthetic device with an anomalous segment) ->
//! normalize -> window -> stats (threshold) -> threshold (open/close events) -> `prometheus`
//! sink on the engine's `/metrics` (127.0.0.1:19898) -> Prometheus scrapes it every second and
//! evaluates the SHIPPED rules (k8s/monitoring/prometheus-rules.yml) -> Alertmanager, with the
//! SHIPPED config (k8s/monitoring/alertmanager.yml, only the webhook URL substituted) -> a
//! webhook receiver in this test (127.0.0.1:19899) gets the firing alert, then the resolved
//! notice once the anomaly closed.
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
// The webhook receiver: records the body of every POST, answers 200
// ---------------------------------------------------------------------------------------------

struct Receiver {
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn read_request(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut data = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let read = stream.read(&mut chunk)?;
        if read == 0 {
            return Ok(Vec::new());
        }
        data.extend_from_slice(&chunk[..read]);
        let Some(end) = data.windows(4).position(|window| window == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0);
        while data.len() < end + 4 + length {
            let read = stream.read(&mut chunk)?;
            if read == 0 {
                break;
            }
            data.extend_from_slice(&chunk[..read]);
        }
        let body_end = (end + 4 + length).min(data.len());
        return Ok(data[end + 4..body_end].to_vec());
    }
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind(WEBHOOK_ADDRESS).unwrap_or_else(|error| {
            panic!("cannot listen on {WEBHOOK_ADDRESS} for Alertmanager's webhook: {error}")
        });
        listener.set_nonblocking(true).expect("non-blocking listener");
        let bodies: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, stopping) = (Arc::clone(&bodies), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        if let Ok(body) = read_request(&mut stream) {
                            if let Ok(value) = serde_json::from_slice(&body) {
                                seen.lock().expect("bodies").push(value);
                            }
                            let _ = stream.write_all(
                                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                            );
                        }
                    }
                    // Nothing to accept: look again shortly (a poll, not a synchronisation).
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Receiver { bodies, stop, thread: Some(thread) }
    }

    /// The alerts named `alertname` for `device` received so far, with their status.
    fn alerts(&self, alertname: &str, device: &str) -> Vec<serde_json::Value> {
        let bodies = self.bodies.lock().expect("bodies");
        bodies
            .iter()
            .flat_map(|body| body["alerts"].as_array().cloned().unwrap_or_default())
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

const PIPELINE: &str = r#"
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

[sinks.gauges]
type = "prometheus"
inputs = ["detector", "alerts"]
labels = ["device"]
max_series = 100
top_n = 3
top_window_secs = 60
"#;

/// Readings every 100 ms from now on: 10 s normal, 2 s at a far higher level (the anomaly),
/// then normal for three minutes (the test stops the pipeline before the end).
fn write_data(path: &std::path::Path, device: &str) {
    let start = tidewatch::api::records::now_ms() / 1000 * 1000;
    let mut text = String::from("device,ts,value\n");
    for step in 0..1900i64 {
        let normal = 10.0 + 0.5 * (step as f64 * 1.3).sin();
        let value = if (100..120).contains(&step) { 60.0 } else { normal };
        text.push_str(&format!("{device},{},{value:.4}\n", start + step * 100));
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
    let receiver = Receiver::start();

    let dir = tempfile::tempdir().expect("temp dir");
    let device = format!("pump-alert-{}-{}", std::process::id(), tidewatch::api::records::now_ms());
    let data = dir.path().join("readings.csv");
    write_data(&data, &device);

    let pipeline = common::load(PIPELINE, &[("DATA", data.display().to_string())])
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
