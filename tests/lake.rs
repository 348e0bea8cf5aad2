//! The Parquet lake against a real Ceph (radosgw on 127.0.0.1:7480, started by
//! `scripts/services.sh start ceph`, which scripts/test.sh does), read back with pyarrow
//! (`.venv/bin/python`, `scripts/python-env.sh`).
//!
//! Without Ceph the S3 tests say so and pass without checking anything; the `file://` tests
//! need only pyarrow.

mod common;

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Running, python, read_lake, root, unique, wait_until};
use serde_json::Value;

const FEATURES: [&str; 5] = ["vibration", "current", "pressure", "temperature", "flow"];

/// Environment variables, name and value.
type Env = Vec<(String, String)>;

/// Held by every test that talks to Ceph: the outage test stops radosgw, which the others
/// must not see.
static CEPH: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Ceph to a test (the variables of `scripts/services.sh env ceph`) and the lock, when
/// radosgw answers.
fn ceph() -> Option<(Env, std::sync::MutexGuard<'static, ()>)> {
    let guard = CEPH.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(vars) = common::ceph_env() else {
        eprintln!(
            "SKIPPED: no Ceph radosgw on 127.0.0.1:7480; start it with \
             `scripts/services.sh start ceph` (scripts/test.sh does)"
        );
        return None;
    };
    Some((vars, guard))
}

fn var<'a>(vars: &'a [(String, String)], name: &str) -> &'a str {
    vars.iter()
        .find(|(candidate, _)| candidate == name)
        .map(|(_, value)| value.as_str())
        .expect(name)
}

/// A credentials file in the AWS format, so the pipeline needs no environment.
fn credentials_file(dir: &Path, env: &[(String, String)]) -> PathBuf {
    let path = dir.join("credentials");
    std::fs::write(
        &path,
        format!(
            "[lake]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            var(env, "AWS_ACCESS_KEY_ID"),
            var(env, "AWS_SECRET_ACCESS_KEY")
        ),
    )
    .expect("credentials");
    path
}

/// The `[sinks.lake.s3]` table for the local Ceph.
fn s3_table(dir: &Path, env: &[(String, String)]) -> String {
    s3_table_of("sinks.lake", dir, env)
}

/// The `[<component>.s3]` table for the local Ceph (`component` as `sources.history`).
fn s3_table_of(component: &str, dir: &Path, env: &[(String, String)]) -> String {
    format!(
        "[{component}.s3]\nendpoint = \"{}\"\nregion = \"{}\"\ncredentials_file = \"{}\"\nprofile = \"lake\"\n",
        var(env, "AWS_ENDPOINT_URL"),
        var(env, "AWS_REGION"),
        credentials_file(dir, env).display()
    )
}

/// simulator -> normalize -> parquet (and the same readings as JSON lines in `sent`).
fn pipeline(
    lake: &str,
    sent: Option<&Path>,
    spill: &Path,
    simulator: &str,
    sink: &str,
    s3: &str,
) -> String {
    // Without `sent`, a blackhole: JSON lines of every reading would slow a fast run down.
    let sent = match sent {
        Some(path) => format!("type = \"file\"\npath = \"{}\"", path.display()),
        None => "type = \"blackhole\"".to_owned(),
    };
    format!(
        r#"
[pipeline]
name = "lake-test"
workers = 2
out_of_orderness_ms = 1000
idle_timeout_ms = 200
http_address = ""

[sources.fleet]
type = "simulator"
seed = 5
{simulator}

[transforms.readings]
type = "normalize"
inputs = ["fleet"]
device_field = "device"
timestamp_field = "ts"
timestamp_format = "unix_ms"
features = {features:?}
label_field = "anomaly"

[sinks.lake]
type = "parquet"
inputs = ["readings"]
path = "{lake}"
spill_dir = "{spill}"
{sink}

[sinks.sent]
inputs = ["readings"]
{sent}

{s3}
"#,
        features = FEATURES,
        spill = spill.display(),
    )
}

/// The lake at `url` read back by a `parquet` source with `options` (and the `[..s3]` table
/// `s3`, for `sources.history`), written as JSON lines to `out`.
fn read_back(url: &str, options: &str, s3: &str, out: &Path) {
    let text = format!(
        r#"
[pipeline]
name = "lake-read"
out_of_orderness_ms = 0
http_address = ""

[sources.history]
type = "parquet"
path = "{url}"
features = {features:?}
batch_size = 500
{options}

[sinks.out]
type = "file"
inputs = ["history"]
path = "{out}"

{s3}
"#,
        features = FEATURES,
        out = out.display(),
    );
    let context = common::run(&text, &[], 2);
    assert_eq!(context.metrics.errors("history"), 0, "the lake reads without errors");
}

/// The readings of the `sent` file, by (device, time): label and features.
fn sent_readings(path: &Path) -> BTreeMap<(String, i64), (u64, Vec<f32>)> {
    common::json_lines(path)
        .into_iter()
        .map(|line| {
            let values = FEATURES
                .iter()
                .map(|name| line["values"][name].as_f64().map_or(f32::NAN, |v| v as f32))
                .collect();
            let key = (
                line["device"].as_str().expect("device").to_owned(),
                line["time_ms"].as_i64().expect("time"),
            );
            (key, (line["label"].as_u64().expect("label"), values))
        })
        .collect()
}

/// The rows of the lake, keyed the same way.
fn lake_readings(lake: &Value) -> BTreeMap<(String, i64), (u64, Vec<f32>)> {
    let columns = &lake["columns"];
    let rows = lake["num_rows"].as_u64().expect("num_rows") as usize;
    (0..rows)
        .map(|row| {
            let values = FEATURES
                .iter()
                .map(|name| columns[name][row].as_f64().map_or(f32::NAN, |v| v as f32))
                .collect();
            let key = (
                columns["device"][row].as_str().expect("device").to_owned(),
                columns["time"][row].as_i64().expect("time"),
            );
            (key, (columns["label"][row].as_u64().expect("label"), values))
        })
        .collect()
}

/// Checks a read-back lake: every object a readable, zstd-compressed Parquet file in a
/// `date=/hour=` partition that its rows belong to; nothing else visible.
fn check_layout(lake: &Value, expected_files_at_least: usize) {
    assert_eq!(lake["unreadable"], serde_json::json!([]), "unreadable objects: {lake:#}");
    assert_eq!(lake["other"], serde_json::json!([]), "objects that are not Parquet files");
    assert_eq!(lake["partition_mismatches"], serde_json::json!([]), "rows outside their partition");
    let files = lake["files"].as_array().expect("files");
    assert!(files.len() >= expected_files_at_least, "{} files", files.len());
    for file in files {
        let key = file["key"].as_str().expect("key");
        let parts: Vec<&str> = key.split('/').collect();
        assert_eq!(parts.len(), 3, "{key}");
        assert!(parts[0].starts_with("date=") && parts[0].len() == 15, "{key}");
        assert!(parts[1].starts_with("hour=") && parts[1].len() == 7, "{key}");
        assert!(parts[2].starts_with("part-") && parts[2].ends_with(".parquet"), "{key}");
        assert_eq!(file["compression"], "ZSTD", "{key}");
    }
}

/// A lake metric of the run (summed over its label sets).
fn lake_metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with(['{', ' ']))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn readings_round_trip_through_a_local_lake() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lake = dir.path().join("lake");
    let sent = dir.path().join("sent.jsonl");
    let text = pipeline(
        &format!("file://{}", lake.display()),
        Some(&sent),
        &dir.path().join("spill"),
        "devices = 20\ncount = 3000\ninterval_ms = 600000",
        "max_file_bytes = 20000",
        "",
    );
    common::run(&text, &[], 2);
    let read = read_lake(&format!("file://{}", lake.display()), &[], true);
    check_layout(&read, 2);
    let expected = sent_readings(&sent);
    assert_eq!(expected.len(), 3000);
    assert_eq!(read["num_rows"], 3000);
    assert_eq!(lake_readings(&read), expected);
    assert!(!dir.path().join("spill/lake").read_dir().is_ok_and(|mut d| d.next().is_some()));

    // Read back by the `parquet` source: everything, in event-time order ...
    let url = format!("file://{}", lake.display());
    let all = dir.path().join("all.jsonl");
    read_back(&url, "", "", &all);
    assert_eq!(sent_readings(&all), expected);
    let times: Vec<i64> = common::json_lines(&all)
        .iter()
        .map(|line| line["time_ms"].as_i64().expect("time_ms"))
        .collect();
    assert!(times.windows(2).all(|pair| pair[0] <= pair[1]), "in event-time order");
    // ... and a time range of two devices (files of other hours are not even read).
    let (from, to) = (times[times.len() / 4], times[times.len() / 2]);
    let rfc3339 = tidewatch::api::time::format_rfc3339;
    let options = format!(
        "start = \"{}\"\nend = \"{}\"\ndevices = [\"pump-0003\", \"pump-0007\"]",
        rfc3339(from),
        rfc3339(to)
    );
    let some = dir.path().join("some.jsonl");
    read_back(&url, &options, "", &some);
    let wanted: BTreeMap<_, _> = expected
        .into_iter()
        .filter(|((device, time), _)| {
            (device == "pump-0003" || device == "pump-0007") && (from..to).contains(time)
        })
        .collect();
    assert!(!wanted.is_empty());
    assert_eq!(sent_readings(&some), wanted);
}

#[test]
fn readings_round_trip_through_ceph() {
    let Some((env, _ceph)) = ceph() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("s3://tidewatch/{}", unique("lake"));
    let sent = dir.path().join("sent.jsonl");
    let text = pipeline(
        &url,
        Some(&sent),
        &dir.path().join("spill"),
        "devices = 50\ncount = 5000\ninterval_ms = 1000",
        "max_file_bytes = 40000\nrow_group_rows = 1000",
        &s3_table(dir.path(), &env),
    );
    common::run(&text, &[], 2);
    let read = read_lake(&url, &env, true);
    check_layout(&read, 2);
    assert_eq!(read["num_rows"], 5000);
    let schema = &read["schema"];
    assert_eq!(schema["device"], "string");
    assert_eq!(schema["time"], "timestamp[ms, tz=UTC]");
    for feature in FEATURES {
        assert_eq!(schema[feature], "float", "{feature}: {schema}");
    }
    assert_eq!(lake_readings(&read), sent_readings(&sent));
    // Read back from Ceph by the `parquet` source.
    let back = dir.path().join("back.jsonl");
    read_back(&url, "", &s3_table_of("sources.history", dir.path(), &env), &back);
    assert_eq!(sent_readings(&back), sent_readings(&sent));
}

#[test]
fn an_object_store_outage_of_30_seconds_loses_nothing() {
    let Some((env, _ceph)) = ceph() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("s3://tidewatch/{}", unique("outage"));
    let sent = dir.path().join("sent.jsonl");
    // 8000 readings at 200/s: the run lasts about 40 s; files finish every second.
    let text = pipeline(
        &url,
        Some(&sent),
        &dir.path().join("spill"),
        "devices = 20\ncount = 8000\ninterval_ms = 1000\nrate_per_sec = 200",
        "max_file_age_secs = 1\nmax_pending_bytes = 20000\nbackoff_initial_ms = 200\n\
         backoff_max_ms = 2000\ndrain_timeout_ms = 60000",
        &s3_table(dir.path(), &env),
    );
    let running = Running::start(&text, &[], 2);
    let metrics = || running.context.metrics.render();
    wait_until("a first file published", Duration::from_secs(30), || {
        lake_metric(&metrics(), "tidewatch_lake_files_written_total") >= 1.0
    });
    let services = root().join("scripts/services.sh");
    let stopped = Command::new(&services).args(["stop", "ceph-rgw"]).status().expect("stop");
    assert!(stopped.success());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until("a failed publish", Duration::from_secs(30), || {
            lake_metric(&metrics(), "tidewatch_lake_publish_failures_total") >= 1.0
        });
        // The outage itself: the store stays away for 30 s while readings keep coming.
        std::thread::sleep(Duration::from_secs(30));
        let during = metrics();
        assert!(lake_metric(&during, "tidewatch_lake_pending_files") >= 1.0, "{during}");
        assert!(lake_metric(&during, "tidewatch_lake_spilled_files_total") >= 1.0, "{during}");
    }));
    let started = Command::new(&services).args(["start", "ceph-rgw"]).status().expect("start");
    assert!(started.success(), "radosgw did not come back");
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    let mut running = running;
    running.join(Duration::from_secs(180)).expect("the run ends cleanly");
    let read = read_lake(&url, &env, true);
    check_layout(&read, 5);
    assert_eq!(read["num_rows"], 8000);
    assert_eq!(lake_readings(&read), sent_readings(&sent));
}

/// The value of a metric served by a running `tidewatch` on `port`.
fn scrape(port: u16, name: &str) -> f64 {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { return 0.0 };
    let _ = stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    lake_metric(&text, name)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Kills `tidewatch run` (SIGKILL) while it writes files of several MB, then reads the lake:
/// every object under a final name is a complete Parquet file.
fn kill_mid_file(url: &str, env: &[(String, String)], s3: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let text = pipeline(
        url,
        None,
        &dir.path().join("spill"),
        "devices = 200\ninterval_ms = 10",
        "max_file_bytes = 9000000\nrow_group_rows = 20000\nzstd_level = 1",
        s3,
    )
    .replace("http_address = \"\"", &format!("http_address = \"127.0.0.1:{port}\""));
    let file = dir.path().join("kill.toml");
    std::fs::write(&file, text).expect("pipeline");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidewatch"))
        .arg("run")
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tidewatch runs");
    let published = || scrape(port, "tidewatch_lake_files_written_total");
    let outcome = std::panic::catch_unwind(|| {
        wait_until("two files published", Duration::from_secs(120), || published() >= 2.0);
        // Mid-file: rows buffered in an open file (and, on S3, often an upload under way).
        wait_until("rows in an open file", Duration::from_secs(30), || {
            scrape(port, "tidewatch_lake_open_rows") > 0.0
        });
    });
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    let read = read_lake(url, env, false);
    check_layout(&read, 2);
}

#[test]
fn killing_tidewatch_mid_file_leaves_no_partial_file_in_a_local_lake() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("file://{}", dir.path().join("lake").display());
    kill_mid_file(&url, &[], "");
}

#[test]
fn killing_tidewatch_mid_file_leaves_no_partial_file_on_ceph() {
    let Some((env, _ceph)) = ceph() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("s3://tidewatch/{}", unique("kill"));
    kill_mid_file(&url, &env, &s3_table(dir.path(), &env));
}

fn tidewatch_cli(env: &[(String, String)], args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_tidewatch"))
        .args(args)
        .envs(env.iter().map(|(name, value)| (name.as_str(), value.as_str())))
        .output()
        .expect("tidewatch runs");
    assert!(
        output.status.success(),
        "tidewatch {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf8")
}

#[test]
fn promoting_a_model_in_the_registry_swaps_it_in_a_running_pipeline() {
    let Some((env, _ceph)) = ceph() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("s3://tidewatch/{}/models", unique("registry"));
    let csv = dir.path().join("fleet.csv");
    common::simulator_training_csv(&csv, 400);
    // v1: trained and published (and promoted) by train.py; v2: pushed with the CLI.
    let train = |out: &Path, version: &str, extra: &[&str]| {
        let mut command = Command::new(python());
        command
            .arg(root().join("training/train.py"))
            .args(["--data", &csv.display().to_string(), "--out", &out.display().to_string()])
            .args(["--family", "pca", "--window", "5", "--name", "pump", "--version", version])
            .args(["--features", "vibration", "current", "pressure", "temperature", "flow"])
            .args(extra)
            .envs(env.iter().map(|(name, value)| (name.as_str(), value.as_str())))
            .stdout(Stdio::null());
        assert!(command.status().expect("train.py").success(), "train.py {version}");
    };
    train(&dir.path().join("v1"), "reg-1", &["--registry", &url, "--promote"]);
    train(&dir.path().join("v2"), "reg-2", &["--quantile", "0.5"]);
    let pushed = tidewatch_cli(
        &env,
        &["model", "push", &url, "pump", &dir.path().join("v2").display().to_string()],
    );
    assert!(pushed.contains("pushed pump version reg-2"), "{pushed}");
    let listed = tidewatch_cli(&env, &["model", "list", &url, "pump"]);
    assert_eq!(listed, "* reg-1\n  reg-2\n");

    // The edge: the autoencoder follows the registry (its `registry` table): validation copies
    // the active version into the empty `live` folder, a follower thread copies reg-2 once
    // it is promoted, and `watch` swaps it in.
    let live = dir.path().join("live");
    let scores = dir.path().join("scores.jsonl");
    let text = format!(
        "{}\n[transforms.model.registry]\nurl = \"{url}\"\nname = \"pump\"\ninterval_ms = 20\n\n{}",
        common::hot_swap_pipeline(&FEATURES, &live, &scores, 50_000),
        s3_table_of("transforms.model.registry", dir.path(), &env)
    );
    let mut running = Running::start(&text, &[], 2);
    wait_until("2000 windows scored with reg-1", Duration::from_secs(120), || {
        running.context.metrics.sent("model", "autoencoder") >= 2000
    });
    tidewatch_cli(&env, &["model", "promote", &url, "pump", "reg-2"]);
    running.join(Duration::from_secs(300)).expect("runs");
    let scores = common::json_lines(&scores);
    assert_eq!(scores.len(), 40 * 2000, "every window scored once");
    let v1 = scores.iter().filter(|s| s["version"] == "reg-1").count();
    let v2 = scores.iter().filter(|s| s["version"] == "reg-2").count();
    eprintln!("windows per model version: reg-1 {v1}, reg-2 {v2}");
    assert!(v1 >= 2000 && v2 > 0, "reg-1 {v1}, reg-2 {v2}");
    assert_eq!(v1 + v2, scores.len());
    let listed = tidewatch_cli(&env, &["model", "list", &url, "pump"]);
    assert_eq!(listed, "  reg-1\n* reg-2\n");
}

#[test]
fn the_shipped_lake_pipeline_writes_every_reading() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("file://{}", dir.path().join("lake").display());
    let pipeline = common::load_shipped(
        &common::shipped("lake.toml"),
        &[("TIDEWATCH_LAKE_URL", url.clone()), ("TIDEWATCH_HTTP_ADDRESS", String::new())],
    )
    .expect("pipelines/lake.toml validates");
    let mut running = Running::run(pipeline, 2);
    running.join(Duration::from_secs(120)).expect("runs");
    let read = read_lake(&url, &[], true);
    check_layout(&read, 1);
    assert_eq!(read["num_rows"], 20000);
    let devices: std::collections::BTreeSet<&str> = read["columns"]["device"]
        .as_array()
        .expect("devices")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(devices.len(), 20);
}

#[test]
fn an_autoencoder_following_an_empty_registry_is_a_validation_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = dir.path().join("registry");
    std::fs::create_dir_all(&registry).expect("registry folder");
    let text = format!(
        "{}\n[transforms.model.registry]\nurl = \"{}\"\nname = \"pump\"\n",
        common::hot_swap_pipeline(
            &FEATURES,
            &dir.path().join("live"),
            &dir.path().join("out.jsonl"),
            1000
        ),
        registry.display()
    );
    let errors = common::load(&text, &[]).expect_err("no active version to run");
    let text = errors.to_string();
    assert!(text.contains("model `pump` has no active version"), "{text}");
    assert!(text.contains("tidewatch model push"), "{text}");
}
