//! Session windows across a crash: killed after a checkpoint and restarted, a pipeline emits
//! the same sessions as a run that was never interrupted (the open sessions and the watermark
//! come back from the checkpoint, the file source resumes at its position).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::process::Process;

type Session = (String, i64, i64, usize);

fn sessions(path: &Path) -> BTreeSet<Session> {
    common::json_lines(path)
        .iter()
        .map(|window| {
            (
                window["device"].as_str().expect("device").to_owned(),
                window["start_ms"].as_i64().expect("start_ms"),
                window["end_ms"].as_i64().expect("end_ms"),
                window["times"].as_array().map_or(0, Vec::len),
            )
        })
        .collect()
}

/// Writes the pipeline `name` in `dir`: the pump readings through sessions (a reading every
/// 10 s per pump, so only `max_size_ms` ends them: 12 readings each) into `out`.
fn pipeline(dir: &Path, name: &str, out: &str) -> std::path::PathBuf {
    let text = common::checkpointed_readings_toml(&dir.join(format!("ck-{name}")))
        + &format!(
            r#"
[transforms.sessions]
type = "window"
inputs = ["readings"]
gap_ms = 25000
max_size_ms = 120000

[sinks.out]
type = "file"
inputs = ["sessions"]
path = "{out}"
"#
        );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("pipeline");
    path
}

#[test]
fn sessions_restored_from_a_checkpoint_match_a_straight_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    common::write_pump_readings(&dir.path().join("in.jsonl"), 3_000, |i| i);
    let debug = || vec![("RUST_LOG", "info,tidewatch_engine::checkpoint=debug".to_owned())];

    let straight = pipeline(dir.path(), "straight", "straight.jsonl");
    Process::run(&straight, &debug(), dir.path().join("straight.log"))
        .wait_exit(Duration::from_secs(120));
    let expected = sessions(&dir.path().join("straight.jsonl"));
    assert_eq!(expected.len(), 250, "3000 readings of 10 pumps, 12 to a session");

    let crashing = pipeline(dir.path(), "crash", "before.jsonl");
    let first = Process::run(&crashing, &debug(), dir.path().join("before.log"));
    common::wait_until("a checkpoint completes", Duration::from_secs(60), || {
        first.log().contains("checkpoint complete")
    });
    first.crash();
    let before = sessions(&dir.path().join("before.jsonl"));
    // The restart writes to a file of its own (the file sink starts its file afresh).
    let text = std::fs::read_to_string(&crashing).expect("pipeline");
    std::fs::write(&crashing, text.replace("before.jsonl", "after.jsonl")).expect("pipeline");
    let log = Process::run(&crashing, &debug(), dir.path().join("after.log"))
        .wait_exit(Duration::from_secs(120));
    assert!(log.contains("restoring from checkpoint"), "{log}");
    let after = sessions(&dir.path().join("after.jsonl"));

    let first_session = expected.iter().next().expect("a session").clone();
    assert!(!after.contains(&first_session), "the restart resumed, it did not start over");
    assert!(after.len() < expected.len(), "{} of {}", after.len(), expected.len());
    let union: BTreeSet<Session> = before.union(&after).cloned().collect();
    assert_eq!(union, expected, "no session lost, none changed, none added");
}
