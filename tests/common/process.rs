//! A `tidewatch run` process of the real binary, its HTTP endpoint and its metrics.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A GET over plain HTTP/1.0: the status code and body.
pub fn http_get(address: &str, path: &str) -> Option<(u16, String)> {
    let mut stream =
        TcpStream::connect_timeout(&address.parse().ok()?, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())?;
    Some((status, body))
}

/// The sum of a metric's samples whose labels contain every one of `labels`.
pub fn metric_sum(address: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let (_, body) = http_get(address, "/metrics")?;
    sum_samples(&body, name, labels)
}

/// The sum of the samples of metric `name` in a Prometheus text exposition whose labels
/// contain every one of `labels`; `None` when there is none.
pub fn sum_samples(body: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut sum = None;
    for line in body.lines() {
        let Some(rest) = line.strip_prefix(name) else { continue };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if !labels.iter().all(|label| rest.contains(label)) {
            continue;
        }
        let value: f64 = rest.rsplit(' ').next()?.parse().ok()?;
        sum = Some(sum.unwrap_or(0.0) + value);
    }
    sum
}

/// A loopback address (`127.0.0.1:PORT`) whose port no one listens on.
///
/// The port is below Linux's ephemeral range (32768 and up): a port the kernel hands out for
/// `bind(:0)` can be taken by any outgoing connection (a cluster peer's, say) before the
/// process that was given it binds it, and then that process fails with "address in use".
/// Outgoing connections never take a port below the range. Each call tries the next port of a
/// sequence that starts at a place given by the process id (test binaries run one at a time,
/// their tests in parallel), skipping ports in use.
pub fn free_address() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const PORTS: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id() * 97 % PORTS,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..PORTS {
        let port = FIRST + NEXT.fetch_add(1, Ordering::SeqCst) % PORTS;
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port as u16)) {
            return listener.local_addr().expect("address").to_string();
        }
    }
    panic!("no free port from {FIRST} to {}", FIRST + PORTS)
}

/// The cluster options of process `index` among `peers`.
pub fn cluster_args(index: usize, peers: &[String]) -> Vec<String> {
    vec![
        "--processes".into(),
        peers.len().to_string(),
        "--process".into(),
        index.to_string(),
        "--peers".into(),
        peers.join(","),
    ]
}

/// A `tidewatch` process; killed when dropped.
pub struct Process {
    pub child: Child,
    pub address: String,
    pub log: PathBuf,
}

impl Process {
    pub fn run(pipeline: &Path, env: &[(&str, String)], log: PathBuf) -> Process {
        Process::run_with(pipeline, &[], env, log)
    }

    /// `tidewatch run PIPELINE ARGS...` (e.g. the cluster options).
    pub fn run_with(
        pipeline: &Path,
        args: &[String],
        env: &[(&str, String)],
        log: PathBuf,
    ) -> Process {
        let address = free_address();
        let stderr = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_tidewatch"));
        command
            .args(["run", &pipeline.display().to_string(), "--http-address", &address])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(stderr);
        for (name, value) in env {
            command.env(name, value);
        }
        let child = command.spawn().expect("tidewatch starts");
        Process { child, address, log }
    }

    pub fn received(&self, component_type: &str) -> u64 {
        let label = format!("component_type=\"{component_type}\"");
        metric_sum(&self.address, "tidewatch_component_received_events_total", &[&label])
            .unwrap_or(0.0) as u64
    }

    pub fn ready(&self) -> bool {
        matches!(http_get(&self.address, "/readyz"), Some((200, _)))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGINT, then waits for a clean exit; returns the whole log.
    pub fn stop(mut self) -> String {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "tidewatch exited with {status}:\n{}", self.log());
                return self.log();
            }
            assert!(Instant::now() < deadline, "tidewatch did not stop:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the process ends by itself (its sources finished), successfully; returns
    /// the whole log.
    pub fn wait_exit(mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "tidewatch exited with {status}:\n{}", self.log());
                return self.log();
            }
            assert!(Instant::now() < deadline, "tidewatch did not finish:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until every process of a cluster ends by itself, successfully; returns their
    /// logs. When one fails or does not end, the panic message carries every log (the
    /// cause is often in a peer's).
    pub fn wait_exit_all(processes: Vec<Process>, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut processes = processes;
        let mut statuses = vec![None; processes.len()];
        while statuses.iter().any(Option::is_none) && Instant::now() < deadline {
            for (process, status) in processes.iter_mut().zip(statuses.iter_mut()) {
                if status.is_none() {
                    *status = process.child.try_wait().expect("wait");
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let logs: Vec<String> = processes.iter().map(Process::log).collect();
        if statuses.iter().any(|status| !status.is_some_and(|status| status.success())) {
            let report: Vec<String> = statuses
                .iter()
                .zip(&logs)
                .enumerate()
                .map(|(index, (status, log))| match status {
                    Some(status) => format!("process {index} exited with {status}:\n{log}"),
                    None => format!("process {index} did not finish:\n{log}"),
                })
                .collect();
            panic!("a process of the cluster failed:\n{}", report.join("\n"));
        }
        logs
    }

    /// Waits until the process ends by itself; its exit status and the whole log.
    pub fn wait_status(mut self, timeout: Duration) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return (status, self.log());
            }
            assert!(Instant::now() < deadline, "tidewatch did not stop:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: a crash.
    pub fn crash(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
