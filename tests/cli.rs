//! The command line, as a user runs it: validate, graph, run with /metrics and SIGINT.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn tidewatch() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tidewatch"));
    command.current_dir(common::root());
    command
}

#[test]
fn validate_accepts_every_shipped_pipeline() {
    let mut command = tidewatch();
    command.arg("validate");
    for entry in std::fs::read_dir(common::root().join("pipelines")).expect("pipelines/") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|ext| ext.to_str()) == Some("toml") {
            command.arg(path);
        }
    }
    let output = command.output().expect("runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("demo.toml: ok"));
}

#[test]
fn validate_reports_every_error_with_line_and_column_and_fails() {
    let output = tidewatch()
        .args(["validate", "tests/fixtures/invalid/broken.toml"])
        .output()
        .expect("runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "tests/fixtures/invalid/broken.toml:3:8: error: unknown source type `simulatorr`"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("hint: did you mean `simulator`?"), "{stderr}");
    assert!(
        stderr.contains("tests/fixtures/invalid/broken.toml:15:11: error: dangling input"),
        "{stderr}"
    );
    assert!(stderr.contains("hint: did you mean `readings`?"), "{stderr}");
}

#[test]
fn validate_reports_errors_downstream_of_a_broken_component() {
    let fixture = "tests/fixtures/invalid/downstream_errors.toml";
    let output = tidewatch().args(["validate", fixture]).output().expect("runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        ":4:8: error: unknown source type `simulatr`",
        ":26:1: error: `m` = 3 must be between n = 5 and 64",
        ":30:21: error: dangling input",
    ] {
        assert!(stderr.contains(&format!("{fixture}{expected}")), "{expected}: {stderr}");
    }
}

#[test]
fn graph_renders_mermaid_and_dot() {
    let output = tidewatch().args(["graph", "pipelines/demo.toml"]).output().expect("runs");
    assert!(output.status.success());
    let mermaid = String::from_utf8_lossy(&output.stdout);
    assert!(mermaid.starts_with("flowchart LR"), "{mermaid}");
    assert!(mermaid.contains("fleet -->|raw messages| readings"), "{mermaid}");
    assert!(mermaid.contains("readings -.->|errors| rejects"), "{mermaid}");
    let output = tidewatch()
        .args(["graph", "pipelines/demo.toml", "--format", "dot"])
        .output()
        .expect("runs");
    let dot = String::from_utf8_lossy(&output.stdout);
    assert!(dot.starts_with("digraph"), "{dot}");
    assert!(dot.contains("\"windows\" -> \"baseline\" [label=\"windows\", style=solid]"), "{dot}");
}

fn http_get(address: &str, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").to_string()
}

#[test]
fn run_serves_metrics_and_stops_cleanly_on_sigint() {
    let address = free_address();
    let mut child = tidewatch()
        .args(["run", "pipelines/demo.toml", "--http-address", &address])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts");
    // Wait until /metrics shows the simulator's records flowing through normalize.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut metrics = String::new();
    while Instant::now() < deadline {
        if let Some(body) = http_get(&address, "/metrics")
            && body.contains("tidewatch_component_received_events_total{component_id=\"readings\",component_type=\"normalize\"}")
        {
            metrics = body;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(metrics.starts_with("HTTP/1.1 200"), "no metrics within 30 s: {metrics}");
    assert!(metrics.contains(
        "tidewatch_component_sent_events_total{component_id=\"fleet\",component_type=\"simulator\"}"
    ));
    let health = http_get(&address, "/healthz").unwrap_or_default();
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let ready = http_get(&address, "/readyz").unwrap_or_default();
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");

    let status =
        Command::new("kill").args(["-INT", &child.id().to_string()]).status().expect("kill");
    assert!(status.success());
    let stopped = Instant::now();
    let exit = loop {
        if let Some(exit) = child.try_wait().expect("wait") {
            break exit;
        }
        assert!(stopped.elapsed() < Duration::from_secs(5), "still running 5 s after SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child.stderr.take().expect("stderr").read_to_string(&mut stderr).expect("read");
    assert!(exit.success(), "exit {exit:?}: {stderr}");
    assert!(stderr.contains("draining"), "{stderr}");
}

#[test]
fn run_fails_clearly_when_a_component_cannot_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pipeline = dir.path().join("missing.toml");
    std::fs::write(
        &pipeline,
        "[pipeline]\nhttp_address = \"\"\n[sources.f]\ntype = \"file\"\npath = \"does-not-exist.csv\"\n[sinks.o]\ntype = \"blackhole\"\ninputs = [\"f\"]\n",
    )
    .expect("write");
    let output = tidewatch().arg("run").arg(&pipeline).output().expect("runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("component `f`"), "{stderr}");
    assert!(stderr.contains("does-not-exist.csv"), "{stderr}");
}
