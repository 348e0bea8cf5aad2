//! An edge host and a cloud host, and the link between them cut.
//!
//! The edge host is a Linux network namespace joined to this one (the cloud host) by a veth
//! pair. On the edge run a Mosquitto of its own, `tidewatch simulate` publishing pumps'
//! readings to it, and `tidewatch run pipelines/edge.toml` (MQTT in, windows, `stats`
//! scores, alerts, and the Kafka uplink with its disk buffer). On the cloud host run the
//! Kafka broker of scripts/test.sh and `tidewatch run pipelines/cloud.toml`. The edge reaches
//! the broker through the veth link only (a TCP forwarder on each side, so the broker's
//! advertised `127.0.0.1:9092` works from the edge).
//!
//! The link goes down for a while: the edge keeps scoring windows through the cut, and once
//! the link is up again the cloud receives every reading, none missing, none twice.
//!
//! Needs root (or CAP_NET_ADMIN) for `ip netns`; the test says so and passes without it.
#![cfg(all(feature = "kafka", feature = "mqtt"))]

mod common;

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::process::{Process, sum_samples};
use common::{unique, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_tidewatch");

/// Runs `ip ARGS`; true when it succeeded.
fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// The edge host: a network namespace, its end of a veth pair (10.231.7.2) and the host's
/// end (10.231.7.1, `host_link`); the children run in it, killed and the namespace deleted
/// when dropped.
struct Edge {
    name: String,
    host_link: String,
    children: Vec<Child>,
}

impl Edge {
    /// `None` when this machine cannot make namespaces (not root).
    fn create() -> Option<Edge> {
        let id = std::process::id() % 100_000;
        let name = format!("twedge{id}");
        if !ip(&["netns", "add", &name]) {
            return None;
        }
        let (host_link, edge_link) = (format!("twc{id}"), format!("twe{id}"));
        let edge = Edge { name, host_link, children: Vec::new() };
        let ns = edge.name.as_str();
        let steps: [&[&str]; 8] = [
            &["link", "add", &edge.host_link, "type", "veth", "peer", "name", &edge_link],
            &["link", "set", &edge_link, "netns", ns],
            &["addr", "add", "10.231.7.1/30", "dev", &edge.host_link],
            &["link", "set", &edge.host_link, "up"],
            &["-n", ns, "addr", "add", "10.231.7.2/30", "dev", &edge_link],
            &["-n", ns, "link", "set", &edge_link, "up"],
            &["-n", ns, "link", "set", "lo", "up"],
            &["-n", ns, "route", "add", "default", "via", "10.231.7.1"],
        ];
        for step in steps {
            assert!(ip(step), "ip {step:?} failed");
        }
        Some(edge)
    }

    /// A command that runs `program` on the edge host.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// Cuts (`false`) or restores (`true`) the link between the hosts.
    fn link(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        assert!(ip(&["link", "set", &self.host_link, state]), "link {state}");
    }

    /// GET http://10.231.7.2:9898{path} from the edge host itself (works through a cut).
    fn http(&self, path: &str) -> Option<String> {
        let output = self
            .command("curl")
            .args(["-sf", "--max-time", "5", &format!("http://10.231.7.2:9898{path}")])
            .output()
            .ok()?;
        output.status.success().then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The sum of the edge pipeline's samples of `name` with `labels`.
    fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        self.http("/metrics").and_then(|body| sum_samples(&body, name, labels)).unwrap_or(0.0)
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The veth pair goes with the namespace.
        ip(&["netns", "del", &self.name]);
        ip(&["link", "del", &self.host_link]);
    }
}

/// Starts `tests/fixtures/tcp_forward.py LISTEN TARGET` (on the edge host when `edge` is
/// given) and waits until it listens.
fn forward(edge: Option<&mut Edge>, listen: &str, target: &str) -> Option<Child> {
    let script = common::root().join("tests/fixtures/tcp_forward.py");
    let mut command = match &edge {
        Some(edge) => edge.command("python3"),
        None => Command::new("python3"),
    };
    let mut child = command
        .arg(&script)
        .args([listen, target])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs the forwarder");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read");
    assert_eq!(line.trim(), "listening", "the forwarder {listen} -> {target} started");
    match edge {
        Some(edge) => {
            edge.children.push(child);
            None
        }
        None => Some(child),
    }
}

/// Kills a child of this test when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_edge_keeps_scoring_through_a_cut_link_and_the_cloud_gets_the_backlog_after() {
    let _serial = common::kafka_serial();
    common::require_kafka();
    let Some(mut edge) = Edge::create() else {
        eprintln!("skipped: `ip netns add` failed (this test needs root or CAP_NET_ADMIN)");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = unique("netns-uplink");

    // The cloud host: the broker (scripts/test.sh) reachable on the link, and cloud.toml.
    let _host_forward =
        forward(None, "10.231.7.1:19092", common::KAFKA_BROKERS).map(Killed).expect("forwarder");
    let cloud = Process::run(
        &common::root().join("pipelines/cloud.toml"),
        &[
            ("TIDEWATCH_KAFKA_TOPIC", topic.clone()),
            ("TIDEWATCH_KAFKA_GROUP", unique("netns-cloud")),
            ("TIDEWATCH_ALERT_WEBHOOK_URL", "http://127.0.0.1:9/alerts".to_owned()),
            ("TIDEWATCH_STATE_DIR", dir.path().join("cloud").display().to_string()),
            ("TIDEWATCH_LAKE_URL", format!("file://{}", dir.path().join("lake").display())),
            ("TIDEWATCH_CHECKPOINT_URL", dir.path().join("checkpoints").display().to_string()),
        ],
        dir.path().join("cloud.log"),
    );

    // The edge host: its broker, the way to the cloud's broker, and edge.toml.
    let config = dir.path().join("mosquitto.conf");
    std::fs::write(&config, "listener 1883 127.0.0.1\nallow_anonymous true\npersistence false\n")
        .expect("mosquitto.conf");
    let broker = edge
        .command("mosquitto")
        .arg("-c")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto starts");
    edge.children.push(broker);
    forward(Some(&mut edge), "127.0.0.1:9092", "10.231.7.1:19092");
    let edge_state = dir.path().join("edge");
    let stderr = std::fs::File::create(dir.path().join("edge.log")).expect("log");
    let pipeline = edge
        .command(BIN)
        .args(["run", &common::root().join("pipelines/edge.toml").display().to_string()])
        .args(["--http-address", "10.231.7.2:9898"])
        .env("RUST_LOG", "info")
        .env("TIDEWATCH_EDGE_CLIENT_ID", unique("netns-edge"))
        .env("TIDEWATCH_KAFKA_TOPIC", &topic)
        .env("TIDEWATCH_STATE_DIR", &edge_state)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("the edge pipeline starts");
    let edge_pid = pipeline.id();
    edge.children.push(pipeline);
    let edge_log = || std::fs::read_to_string(dir.path().join("edge.log")).unwrap_or_default();
    wait_until("the edge and the cloud are ready", Duration::from_secs(90), || {
        edge.http("/readyz").is_some() && cloud.ready()
    });

    // 5 pumps, 100 readings/s between them, for 40 s.
    let count = 4_000_u64;
    let simulate = edge
        .command(BIN)
        .args(["simulate", "--mqtt", "mqtt://127.0.0.1:1883", "--devices", "5"])
        .args(["--rate", "100", "--count", &count.to_string(), "--qos", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("simulate starts");
    let scores = |edge: &Edge| {
        edge.metric("tidewatch_component_sent_events_total", &["component_id=\"baseline\""])
    };
    wait_until("the cloud receives the uplink", Duration::from_secs(60), || {
        cloud.received("kafka") > 0
    });

    // The cut: the edge keeps scoring (10 s windows: one per pump at least).
    let readings = |edge: &Edge| {
        edge.metric("tidewatch_component_sent_events_total", &["component_id=\"readings\""])
    };
    edge.link(false);
    let (scored, read, received) = (scores(&edge), readings(&edge), cloud.received("kafka"));
    // Long enough that the edge reads 500 readings (5 s at 100/s) and scores 5 windows.
    wait_until("5 windows scored on the edge during the cut", Duration::from_secs(40), || {
        scores(&edge) >= scored + 5.0 && readings(&edge) >= read + 500.0
    });
    let read_during = readings(&edge) - read;
    let received_during = cloud.received("kafka") - received;
    edge.link(true);
    // What was on its way when the link went down may arrive; what came after may not.
    assert!(read_during >= 500.0, "the edge read {read_during} readings during the cut");
    assert!(
        (received_during as f64) < read_during / 2.0,
        "the cut held the uplink back: the cloud received {received_during} of the \
         {read_during} readings of the cut"
    );

    let output = simulate.wait_with_output().expect("simulate ends");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "simulate failed:\n{stderr}");
    wait_until("the edge normalized every reading", Duration::from_secs(60), || {
        edge.metric("tidewatch_component_sent_events_total", &["component_id=\"readings\""])
            >= count as f64
    });
    wait_until("the cloud receives the backlog", Duration::from_secs(180), || {
        cloud.received("kafka") >= count
    });
    assert_eq!(cloud.received("kafka"), count, "every reading once (idempotent producer)");
    assert_eq!(
        edge.metric("tidewatch_component_errors_total", &["component_id=\"uplink\""]),
        0.0,
        "no uplink errors:\n{}",
        edge_log()
    );

    // Both stop cleanly.
    assert!(
        Command::new("kill")
            .args(["-INT", &edge_pid.to_string()])
            .status()
            .is_ok_and(|status| status.success())
    );
    let pipeline = edge.children.iter_mut().find(|child| child.id() == edge_pid).expect("edge");
    let status = wait_exit(pipeline, Duration::from_secs(60));
    assert!(status.success(), "the edge exited with {status}:\n{}", edge_log());
    cloud.stop();
}

/// Waits for a child to exit (polling its status; a bounded wait).
fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let mut status = None;
    wait_until("the process exits", timeout, || {
        status = child.try_wait().expect("wait");
        status.is_some()
    });
    status.expect("exited")
}
