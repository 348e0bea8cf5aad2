//! Validation: one fixture per error class, with message and line:col asserted.

mod common;

use tidewatch::engine::Severity;

fn single_error(fixture: &str) -> tidewatch::engine::Diagnostic {
    let diagnostics = common::diagnostics(fixture);
    let errors: Vec<_> =
        diagnostics.iter().filter(|d| d.severity == Severity::Error).cloned().collect();
    assert_eq!(errors.len(), 1, "{fixture}: expected one error, got {errors:#?}");
    errors.into_iter().next().expect("one error")
}

#[test]
fn unknown_component_type_suggests_the_closest_name() {
    let error = single_error("invalid/unknown_type.toml");
    assert_eq!((error.line, error.column), (2, 8));
    assert!(error.message.contains("unknown source type `simulatr`"), "{error}");
    assert_eq!(error.hint.as_deref(), Some("did you mean `simulator`?"));
    assert!(error.path.ends_with("unknown_type.toml"));
}

#[test]
fn dangling_input_points_at_the_input() {
    let error = single_error("invalid/dangling_input.toml");
    assert_eq!((error.line, error.column), (6, 11));
    assert!(error.message.contains("dangling input"), "{error}");
    assert!(error.message.contains("`flet`"), "{error}");
    assert_eq!(error.hint.as_deref(), Some("did you mean `fleet`?"));
}

#[test]
fn toml_syntax_errors_are_all_located() {
    let diagnostics = common::diagnostics("invalid/syntax.toml");
    assert!(
        diagnostics
            .iter()
            .all(|d| d.severity == Severity::Error && d.message.starts_with("TOML syntax"))
    );
    let first = &diagnostics[0];
    assert_eq!((first.line, first.column), (3, 11), "{first}");
    assert!(first.message.contains("extra `=`"), "{first}");
    assert!(
        diagnostics.iter().any(|d| d.line == 7 && d.message.contains("unclosed array")),
        "{diagnostics:#?}"
    );
}

#[test]
fn unknown_option_is_located_with_a_hint() {
    let error = single_error("invalid/unknown_option.toml");
    assert_eq!((error.line, error.column), (3, 1), "{error}");
    assert!(error.message.contains("unknown field `devcies`"), "{error}");
    assert_eq!(error.hint.as_deref(), Some("did you mean `devices`?"));
}

#[test]
fn unknown_option_in_a_tls_table_is_located() {
    let error = single_error("invalid/unknown_tls_option.toml");
    assert_eq!((error.line, error.column), (7, 1), "{error}");
    assert!(error.message.contains("unknown field `ca_fle`"), "{error}");
    assert_eq!(error.hint.as_deref(), Some("did you mean `ca_file`?"));
}

#[test]
fn an_error_about_an_option_of_a_nested_table_points_at_it() {
    let error = single_error("invalid/tls_needs_tls_url.toml");
    assert_eq!((error.line, error.column), (11, 1), "{error}");
    assert!(error.message.contains("tls.ca_file needs a TLS connection"), "{error}");
    assert_eq!(error.hint.as_deref(), Some("use an mqtts:// url"));
}

#[test]
fn flat_connection_and_tls_options_still_load_with_a_warning() {
    let path = common::root().join("tests/fixtures/deprecated/flat_options.toml");
    let pipeline = tidewatch::engine::load_file(&path, &tidewatch::builtins())
        .unwrap_or_else(|errors| panic!("the flat options no longer load:\n{errors}"));
    assert_eq!(pipeline.components.len(), 2);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tidewatch"))
        .arg("validate")
        .arg(&path)
        .output()
        .expect("tidewatch validate runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    for (option, table) in [
        ("client_id", "connection"),
        ("keep_alive_secs", "connection"),
        ("ca_file", "tls"),
        ("max_inflight", "connection"),
    ] {
        assert!(
            stderr.contains(&format!("option `{option}` is deprecated"))
                && stderr.contains(&format!("<id>.{table}] {option} =")),
            "no warning for {option}: {stderr}"
        );
    }
    // An error about a flat option points at it, in its old place.
    let text = "[sources.fleet]\ntype = \"simulator\"\n\n[sinks.out]\ntype = \"mqtt\"\n\
                inputs = [\"fleet\"]\nurl = \"mqtt://127.0.0.1:1883\"\ntopic = \"a/{device}\"\n\
                max_inflight = 0\n";
    let errors = common::load(text, &[]).expect_err("max_inflight = 0");
    let error = &errors.diagnostics[0];
    assert_eq!((error.line, error.column), (9, 1), "{error}");
    assert!(error.message.contains("max_inflight must be at least 1"), "{error}");
    // Written in both places, an option is an error at its flat place.
    let text = "[sources.fleet]\ntype = \"simulator\"\n\n[sinks.out]\ntype = \"mqtt\"\n\
                inputs = [\"fleet\"]\nurl = \"mqtt://127.0.0.1:1883\"\ntopic = \"a/{device}\"\n\
                client_id = \"a\"\nconnection = { client_id = \"b\" }\n";
    let errors = common::load(text, &[]).expect_err("client_id twice");
    let error = &errors.diagnostics[0];
    assert_eq!((error.line, error.column), (9, 1), "{error}");
    assert!(error.message.contains("`client_id` is set twice"), "{error}");
}

#[test]
fn invalid_option_value_is_located() {
    let error = single_error("invalid/invalid_value.toml");
    assert_eq!((error.line, error.column), (3, 11), "{error}");
    assert!(error.message.contains("invalid type"), "{error}");
}

#[test]
fn cycles_are_reported_for_every_member() {
    let diagnostics = common::diagnostics("invalid/cycle.toml");
    let cycle: Vec<_> = diagnostics.iter().filter(|d| d.message.starts_with("cycle")).collect();
    assert_eq!(cycle.len(), 2, "{diagnostics:#?}");
    assert_eq!((cycle[0].line, cycle[0].column), (6, 10));
    assert_eq!((cycle[1].line, cycle[1].column), (13, 10));
}

#[test]
fn record_kind_mismatch_names_both_ends_and_the_fix() {
    let error = single_error("invalid/kind_mismatch.toml");
    assert_eq!((error.line, error.column), (6, 11), "{error}");
    assert!(error.message.contains("record-kind mismatch"), "{error}");
    assert!(error.message.contains("accepts readings but `fleet` emits raw messages"), "{error}");
    assert_eq!(error.hint.as_deref(), Some("insert a `normalize` transform between them"));
}

#[test]
fn catalog_updates_sent_to_another_transform_point_to_enrich_and_fleet() {
    let error = single_error("invalid/catalog_mismatch.toml");
    assert_eq!((error.line, error.column), (7, 11), "{error}");
    assert!(
        error.message.contains("accepts readings but `devices` emits catalog updates"),
        "{error}"
    );
    assert_eq!(
        error.hint.as_deref(),
        Some("a catalog's updates are read by `enrich` and `fleet` (or a sink)")
    );
}

#[test]
fn unset_environment_variable_is_located() {
    let error = single_error("invalid/unset_env.toml");
    assert_eq!((error.line, error.column), (3, 10), "{error}");
    assert!(error.message.contains("TIDEWATCH_TEST_SURELY_UNSET_VARIABLE"), "{error}");
}

#[test]
fn late_port_of_a_component_without_one_is_an_error() {
    let error = single_error("invalid/bad_late_port.toml");
    assert_eq!((error.line, error.column), (13, 11), "{error}");
    assert!(error.message.contains("has no `.late` output"), "{error}");
}

#[test]
fn an_unknown_named_output_is_located_and_the_existing_ones_listed() {
    let error = single_error("invalid/unknown_port.toml");
    assert_eq!((error.line, error.column), (19, 26), "{error}");
    assert!(
        error.message.contains("unknown output `by_heat.nosuch`: `by_heat` has no output `nosuch`"),
        "{error}"
    );
    assert_eq!(
        error.hint.as_deref(),
        Some("the outputs of `by_heat` are `by_heat.hot`, `by_heat.normal` and `by_heat.errors`"),
        "{error}"
    );
}

#[test]
fn a_route_has_no_main_output_and_its_named_outputs_validate() {
    let text =
        std::fs::read_to_string(common::root().join("tests/fixtures/invalid/unknown_port.toml"))
            .expect("fixture");
    let valid = text.replace(", \"by_heat.nosuch\"", "");
    let pipeline = common::load(&valid, &[]).unwrap_or_else(|errors| panic!("{errors}"));
    let route = pipeline.component("by_heat").expect("by_heat");
    let names: Vec<&str> = route.named_outputs.iter().map(|name| &**name).collect();
    assert_eq!(names, ["hot", "normal"]);
    let main = text.replace("\"by_heat.nosuch\"", "\"by_heat\"");
    let errors = common::load(&main, &[]).expect_err("a route has no main output");
    let error = errors.errors().next().expect("one error");
    assert_eq!((error.line, error.column), (19, 26), "{error}");
    assert!(error.message.contains("`by_heat` has no main output"), "{error}");
}

#[test]
fn every_error_is_reported_not_just_the_first() {
    let diagnostics = common::diagnostics("invalid/many_errors.toml");
    let lines: Vec<usize> =
        diagnostics.iter().filter(|d| d.severity == Severity::Error).map(|d| d.line).collect();
    assert!(lines.contains(&2), "workers = 0: {diagnostics:#?}");
    assert!(lines.contains(&5), "unknown type: {diagnostics:#?}");
    assert!(lines.contains(&9), "dangling input: {diagnostics:#?}");
}

#[test]
fn errors_downstream_of_a_broken_component_are_reported_too() {
    let diagnostics = common::diagnostics("invalid/downstream_errors.toml");
    let errors: Vec<_> = diagnostics.iter().filter(|d| d.severity == Severity::Error).collect();
    let at = |line, column, text: &str| {
        errors.iter().any(|d| (d.line, d.column) == (line, column) && d.message.contains(text))
    };
    assert!(at(4, 8, "unknown source type `simulatr`"), "{errors:#?}");
    assert!(at(30, 21, "dangling input"), "{errors:#?}");
    // The threshold is downstream of the unknown source: its own options are still checked.
    assert!(at(26, 1, "`m` = 3 must be between n = 5 and 64"), "{errors:#?}");
    assert_eq!(errors.len(), 3, "{errors:#?}");
}

#[test]
fn unused_components_are_warnings() {
    let diagnostics = common::diagnostics("warnings/unused.toml");
    assert_eq!(diagnostics.len(), 1, "{diagnostics:#?}");
    assert_eq!(diagnostics[0].severity, Severity::Warning);
    assert!(diagnostics[0].message.contains("unused component"));
    assert_eq!(diagnostics[0].line, 6);
}

#[test]
fn every_shipped_pipeline_validates() {
    let mut count = 0;
    for entry in std::fs::read_dir(common::root().join("pipelines")).expect("pipelines/") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|ext| ext.to_str()) != Some("toml") {
            continue;
        }
        count += 1;
        if let Err(errors) = tidewatch::engine::load_file(&path, &tidewatch::builtins()) {
            panic!("{} does not validate:\n{errors}", path.display());
        }
    }
    assert!(count >= 3, "expected the shipped pipelines, found {count}");
}

#[test]
fn environment_interpolation_fills_values_and_defaults() {
    let text = r#"
[pipeline]
http_address = "${ADDR:-127.0.0.1:0}"
workers = ${WORKERS}
[sources.fleet]
type = "simulator"
count = 5
[sinks.out]
type = "blackhole"
inputs = ["fleet"]
"#;
    let pipeline = common::load(text, &[("WORKERS", "3".into())]).expect("valid");
    assert_eq!(pipeline.settings.workers, 3);
    assert_eq!(pipeline.settings.http_address, "127.0.0.1:0");
}
