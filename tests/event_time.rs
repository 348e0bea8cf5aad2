//! Event time: out-of-order data within the bound lands in its window, beyond it goes to
//! `.late`; an idle device stalls nothing; 1 and 4 workers give the same output.

mod common;

use std::fmt::Write as _;
use std::path::Path;

const PIPELINE: &str = r#"
[pipeline]
out_of_orderness_ms = 2000
idle_timeout_ms = 200
http_address = ""

[sources.input]
type = "file"
path = "${INPUT}"
format = "json"
batch_size = 1

[transforms.readings]
type = "normalize"
inputs = ["input"]
device_field = "device"
timestamp_field = "ts"
timestamp_format = "unix_ms"
features = ["value"]

[transforms.windows]
type = "window"
inputs = ["readings"]
size_ms = 10000

[sinks.windows_out]
type = "file"
inputs = ["windows"]
path = "${OUT}/windows.jsonl"

[sinks.late_out]
type = "file"
inputs = ["windows.late"]
path = "${OUT}/late.jsonl"

[sinks.errors_out]
type = "file"
inputs = ["readings.errors"]
path = "${OUT}/errors.jsonl"
"#;

fn run_lines(lines: &[String], out: &Path, workers: usize) {
    let input = out.join("input.jsonl");
    std::fs::write(&input, lines.join("\n")).expect("write input");
    common::run(
        PIPELINE,
        &[("INPUT", input.display().to_string()), ("OUT", out.display().to_string())],
        workers,
    );
}

fn reading(device: &str, ts: i64, value: f64) -> String {
    format!(r#"{{"device":"{device}","ts":{ts},"value":{value}}}"#)
}

fn window_of<'a>(
    windows: &'a [serde_json::Value],
    device: &str,
    start: i64,
) -> Option<&'a serde_json::Value> {
    windows.iter().find(|window| window["device"] == device && window["start_ms"] == start)
}

#[test]
fn out_of_order_within_the_bound_is_on_time_and_beyond_it_is_late() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut lines: Vec<String> =
        (1..=15).map(|second| reading("a", second * 1000, second as f64)).collect();
    lines.push(reading("a", 14_000 - 500, 99.0)); // 1.5 s behind the newest: within the 2 s bound
    lines.push(reading("a", 9_500, 77.0)); // its window [0, 10 s) closed when the watermark passed 10 s
    lines.extend((16..=25).map(|second| reading("a", second * 1000, second as f64)));
    run_lines(&lines, dir.path(), 1);

    let windows = common::json_lines(&dir.path().join("windows.jsonl"));
    let first = window_of(&windows, "a", 0).expect("window [0, 10 s)");
    assert_eq!(first["times"].as_array().map(Vec::len), Some(9), "{first}");
    let second = window_of(&windows, "a", 10_000).expect("window [10 s, 20 s)");
    let times: Vec<i64> =
        second["times"].as_array().expect("times").iter().filter_map(|t| t.as_i64()).collect();
    assert!(
        times.contains(&13_500),
        "the out-of-order reading within the bound is in its window: {times:?}"
    );
    assert_eq!(times.len(), 11);
    assert!(times.windows(2).all(|pair| pair[0] <= pair[1]), "steps are in time order: {times:?}");

    let late = common::json_lines(&dir.path().join("late.jsonl"));
    assert_eq!(late.len(), 1, "{late:?}");
    assert_eq!(late[0]["time_ms"], 9_500);
    assert_eq!(late[0]["values"]["value"], 77.0);
    // Nothing lost: every reading is in a window or late.
    let in_windows: usize = windows.iter().map(|w| w["times"].as_array().map_or(0, Vec::len)).sum();
    assert_eq!(in_windows + late.len(), lines.len());
}

#[test]
fn malformed_lines_go_to_errors_and_the_rest_flows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut lines: Vec<String> = (1..=12).map(|second| reading("a", second * 1000, 1.0)).collect();
    lines.insert(3, "{not json".to_owned());
    lines.insert(6, r#"{"device":"a","ts":5500}"#.to_owned());
    run_lines(&lines, dir.path(), 1);
    let errors = common::json_lines(&dir.path().join("errors.jsonl"));
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors.iter().all(|error| error["component"] == "readings"));
    assert!(errors.iter().any(|error| error["payload"] == "{not json"));
    assert!(
        errors.iter().any(|error| error["reason"].as_str().unwrap_or_default().contains("value"))
    );
    let windows = common::json_lines(&dir.path().join("windows.jsonl"));
    let total: usize = windows.iter().map(|w| w["times"].as_array().map_or(0, Vec::len)).sum();
    assert_eq!(total, 12);
}

#[test]
fn an_idle_device_or_worker_does_not_stall_the_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    // "quiet" sends twice and then never again; "busy" goes on for a minute of event time,
    // replayed at 10x (6 s). With 2 workers the file is read on worker 0 only, so worker 1's
    // normalize sees nothing at all: both must not hold windows back until the end of input.
    let mut lines = vec![reading("quiet", 1000, 1.0), reading("quiet", 2000, 1.0)];
    lines.extend((1..=60).map(|second| reading("busy", second * 1000, second as f64)));
    let input = dir.path().join("input.jsonl");
    std::fs::write(&input, lines.join("\n")).expect("write input");
    let text = PIPELINE.replace(
        "batch_size = 1",
        "batch_size = 1\nspeed = 10.0\ntimestamp_field = \"ts\"\ntimestamp_format = \"unix_ms\"",
    );
    let pipeline = common::load(
        &text,
        &[("INPUT", input.display().to_string()), ("OUT", dir.path().display().to_string())],
    )
    .expect("valid pipeline");
    let context = tidewatch::RunContext::default();
    let runner = {
        let context = context.clone();
        std::thread::spawn(move || tidewatch::run(&pipeline, 2, &context))
    };
    let started = std::time::Instant::now();
    let mut first_window = None;
    while !runner.is_finished() {
        if context.metrics.sent("windows", "window") > 0 {
            first_window = Some(started.elapsed());
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let still_running = !runner.is_finished();
    runner.join().expect("no panic").expect("pipeline runs");
    assert!(still_running && first_window.is_some(), "windows only came out at the end of input");
    // Windows of both devices came out, including the quiet one's.
    let windows = common::json_lines(&dir.path().join("windows.jsonl"));
    assert!(windows.iter().any(|w| w["device"] == "quiet" && w["start_ms"] == 0));
    let busy = windows.iter().filter(|w| w["device"] == "busy").count();
    assert_eq!(busy, 7, "{windows:?}");
}

#[test]
fn one_and_four_workers_give_the_same_output() {
    let mut lines = Vec::new();
    for second in 0..120 {
        for device in 0..13 {
            let mut line = String::new();
            let _ = write!(
                line,
                "{}",
                reading(
                    &format!("dev-{device}"),
                    second * 1000 + device,
                    (second * device) as f64 % 17.0
                )
            );
            lines.push(line);
        }
    }
    let sorted = |workers: usize| {
        let dir = tempfile::tempdir().expect("tempdir");
        run_lines(&lines, dir.path(), workers);
        let mut out: Vec<String> = std::fs::read_to_string(dir.path().join("windows.jsonl"))
            .expect("windows")
            .lines()
            .map(str::to_owned)
            .collect();
        out.sort();
        out
    };
    let one = sorted(1);
    let four = sorted(4);
    assert_eq!(one.len(), 13 * 12);
    assert_eq!(one, four);
}

/// A pump that runs in cycles, through session windows: one window per cycle, an
/// out-of-order reading bridging two bursts merges them, a reading whose session had closed
/// is late, and `max_size_ms` cuts a long cycle; with 1 and 2 workers alike.
#[test]
fn session_windows_follow_the_cycles_of_each_device() {
    let pipeline = PIPELINE.replace("size_ms = 10000", "gap_ms = 5000\nmax_size_ms = 60000");
    let mut lines: Vec<String> =
        (1..=10).map(|second| reading("pump", second * 1000, 1.0)).collect();
    lines.extend([20_000, 21_000, 27_000].map(|ts| reading("pump", ts, 2.0)));
    // The watermark is 25 s: the burst of 20-21 s (open until 26 s) and the one from 27 s
    // are still open, and 24 s is less than the gap from both.
    lines.push(reading("pump", 24_000, 2.0));
    lines.push(reading("pump", 28_000, 2.0));
    // The watermark is 26 s: the session of 9 s ended at 14 s. Late.
    lines.push(reading("pump", 9_000, 9.0));
    for second in 40..=110 {
        lines.push(reading("pump", second * 1000, 3.0));
        if second == 50 {
            lines.push(reading("fan", 50_000, 4.0));
        }
    }
    let mut outputs = Vec::new();
    for workers in [1, 2] {
        let dir = tempfile::tempdir().expect("tempdir");
        let input = dir.path().join("input.jsonl");
        std::fs::write(&input, lines.join("\n")).expect("write input");
        common::run(
            &pipeline,
            &[("INPUT", input.display().to_string()), ("OUT", dir.path().display().to_string())],
            workers,
        );
        let mut sessions: Vec<(String, i64, i64, usize)> =
            common::json_lines(&dir.path().join("windows.jsonl"))
                .iter()
                .map(|window| {
                    (
                        window["device"].as_str().expect("device").to_owned(),
                        window["start_ms"].as_i64().expect("start"),
                        window["end_ms"].as_i64().expect("end"),
                        window["times"].as_array().map_or(0, Vec::len),
                    )
                })
                .collect();
        sessions.sort();
        let late: Vec<i64> = common::json_lines(&dir.path().join("late.jsonl"))
            .iter()
            .filter_map(|reading| reading["time_ms"].as_i64())
            .collect();
        outputs.push((sessions, late));
    }
    let (sessions, late) = &outputs[0];
    assert_eq!(
        sessions,
        &[
            ("fan".to_owned(), 50_000, 55_000, 1),
            ("pump".to_owned(), 1_000, 15_000, 10),
            ("pump".to_owned(), 20_000, 33_000, 5),
            ("pump".to_owned(), 40_000, 100_000, 60),
            ("pump".to_owned(), 100_000, 115_000, 11),
        ]
    );
    assert_eq!(late, &[9_000]);
    assert_eq!(outputs[0], outputs[1], "1 and 2 workers");
}
