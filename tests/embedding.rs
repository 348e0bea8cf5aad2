//! The embedding example builds and runs: a custom operator registered by name and used in TOML.

#[path = "../examples/custom_operator.rs"]
#[allow(unreachable_pub, dead_code)]
mod custom_operator;

#[test]
fn custom_operator_runs_inside_a_pipeline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("scores.jsonl");
    let lines = custom_operator::run_embedded(&out, 2).expect("embedded pipeline runs");
    // 4 devices x 100 readings at 1 s = 100 s each: 10 windows of 10 s per device.
    assert_eq!(lines, 40);
}

#[test]
fn custom_operator_options_are_validated() {
    let registry = custom_operator::registry();
    let text = custom_operator::PIPELINE.replace("alpha = 0.3", "alpha = 3.0");
    let errors = tidewatch::engine::load_str(
        &text,
        "embedded.toml",
        std::path::Path::new("."),
        &registry,
        |_| Some("x".into()),
    )
    .expect_err("alpha out of range");
    let message = errors.to_string();
    assert!(message.contains("`alpha` must be in (0, 1]"), "{message}");
    assert!(message.contains("embedded.toml:24:1"), "{message}");
}
