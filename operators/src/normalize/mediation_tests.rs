//! Tests of the mediation options: JSON pointers, topics, conversions, missing values, scaling.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use tidewatch_api::{ConfigValue, ErrorRecord, Outputs, PipelineInfo};

use super::*;

fn options(toml: &str) -> NormalizeOptions {
    ConfigValue::parse(toml).expect("toml").deserialize().expect("options")
}

fn build(toml: &str) -> Normalize {
    Normalize::with_options(&options(toml), &ComponentContext::for_test("norm", "normalize"))
        .expect("valid options")
}

fn check(toml: &str) -> Result<PortType, ConfigError> {
    NormalizeFactory.output_type(
        &options(toml),
        &PortType::of(Kind::Raw),
        &ValidateContext::default(),
    )
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

struct Run {
    readings: ReadingBatch,
    errors: Vec<ErrorRecord>,
    discarded: Vec<(&'static str, u64)>,
}

fn run_topics(op: &mut Normalize, messages: &[(&str, &str)]) -> Run {
    let mut raw = RawBatch::new();
    for (position, (topic, payload)) in messages.iter().enumerate() {
        raw.push(topic, payload.as_bytes(), 0, position as u64);
    }
    let mut out = Outputs::new("norm");
    op.process_batch(Batch::Raw(raw), &mut out);
    let readings = match out.take_main().pop() {
        Some(Batch::Readings(readings)) => readings,
        None => ReadingBatch::new(Arc::clone(op.schema())),
        Some(other) => panic!("unexpected {other:?}"),
    };
    Run { readings, errors: out.take_errors(), discarded: out.take_discarded() }
}

fn run(op: &mut Normalize, payloads: &[&str]) -> Run {
    let messages: Vec<(&str, &str)> = payloads.iter().map(|payload| ("t", *payload)).collect();
    run_topics(op, &messages)
}

fn error_types(errors: &[ErrorRecord]) -> Vec<&str> {
    errors.iter().map(|error| &*error.error_type).collect()
}

// ---------------------------------------------------------------------------------------------
// JSON pointers
// ---------------------------------------------------------------------------------------------

const POINTERS: &str = r#"
    features = ["vib0", "vib1", "odd", "temp"]
    rename = { vib0 = "/sensors/0/vib", vib1 = "/sensors/1/vib", odd = "/sensors/1/a~1b/~0x", temp = "/temp" }
    device_field = "/meta/id"
    timestamp_field = "/meta/time/ms"
    timestamp_format = "unix_ms"
    label_field = "/flags/0"
"#;

#[test]
fn nested_pointers_with_escapes() {
    let mut op = build(POINTERS);
    let result = run(
        &mut op,
        &[
            r#"{"meta":{"id":"p-1","time":{"ms":1000},"junk":[1,{"a":2}]},"temp":20,
                "sensors":[{"vib":0.5,"x":[1]},{"vib":0.7,"a/b":{"~x":3,"y":4}},{"vib":9}],
                "flags":[true,false]}"#,
            r#"{"flags":[0],"sensors":[{"vib":"1.5"},{"a/b":{"~x":-1},"vib":2}],"temp":"21",
                "meta":{"time":{"ms":"2000"},"id":17}}"#,
        ],
    );
    assert!(result.errors.is_empty(), "{:?}", result.errors);
    let readings = result.readings;
    assert_eq!(readings.len(), 2);
    let first = readings.get(0).expect("reading");
    assert_eq!(first.device, DeviceId::intern("p-1"));
    assert_eq!(first.time_ms, 1000);
    assert_eq!(first.values, &[0.5, 0.7, 3.0, 20.0]);
    assert_eq!(first.label, LABEL_ANOMALY);
    let second = readings.get(1).expect("reading");
    assert_eq!(second.device, DeviceId::intern("17"));
    assert_eq!(second.time_ms, 2000);
    assert_eq!(second.values, &[1.5, 2.0, -1.0, 21.0]);
    assert_eq!(second.label, LABEL_NORMAL);
}

#[test]
fn pointers_that_do_not_reach_a_value() {
    let mut op = build(POINTERS);
    let base = r#""meta":{"id":"p","time":{"ms":1}},"temp":1"#;
    let result = run(
        &mut op,
        &[
            // Only one sensor: `/sensors/1/...` is missing.
            &format!(r#"{{{base},"sensors":[{{"vib":1}}]}}"#),
            // The sensors as an object keyed "0" and "1" are reached too (tokens are keys).
            &format!(
                r#"{{{base},"sensors":{{"0":{{"vib":1}},"1":{{"vib":2,"a/b":{{"~x":3}}}}}}}}"#
            ),
            // A number where the path wants an object: missing, not a crash.
            &format!(r#"{{{base},"sensors":5}}"#),
            // An object where a number is wanted: a bad value.
            &format!(r#"{{{base},"sensors":[{{"vib":{{"v":1}}}},{{"vib":1,"a/b":{{"~x":1}}}}]}}"#),
        ],
    );
    assert_eq!(result.readings.values, vec![1.0, 2.0, 3.0, 1.0]);
    assert_eq!(error_types(&result.errors), ["missing_field", "missing_field", "bad_value"]);
    assert_eq!(result.errors[0].reason, "missing field `/sensors/1/vib` (feature `vib1`)");
    assert!(result.errors[2].reason.contains("/sensors/0/vib"), "{}", result.errors[2].reason);
}

#[test]
fn a_field_and_a_pointer_through_it() {
    // `whole` wants `/a` as a number while `part` reads `/a/b` inside it.
    let mut op = build(
        r#"
        features = ["whole", "part"]
        rename = { whole = "a", part = "/a/b" }
        device = "d"
        timestamp_field = "t"
        timestamp_format = "unix_ms"
        on_missing = "nan"
        "#,
    );
    let result = run(&mut op, &[r#"{"t":1,"a":{"b":2}}"#, r#"{"t":2,"a":3}"#]);
    assert_eq!(error_types(&result.errors), ["bad_value"]);
    let reading = result.readings.get(0).expect("reading");
    assert_eq!(reading.time_ms, 2);
    assert_eq!(reading.values[0], 3.0);
    assert!(reading.values[1].is_nan());
}

#[test]
fn plain_names_and_one_token_pointers_are_the_same_field() {
    let mut op = build(
        r#"
        features = ["a", "b"]
        rename = { b = "/a" }
        device = "d"
        timestamp_field = "/t"
        "#,
    );
    assert_eq!(op.plan.names.len(), 2, "{:?}", op.plan.names);
    let result = run(&mut op, &[r#"{"t":1,"a":4}"#]);
    assert!(result.errors.is_empty(), "{:?}", result.errors);
    assert_eq!(result.readings.values, vec![4.0, 4.0]);
}

#[test]
fn pointer_options_are_checked() {
    let error = check(
        r#"
        features = ["a"]
        rename = { a = "/x/~2" }
        device = "d"
        timestamp_field = "t"
        "#,
    )
    .expect_err("bad escape");
    assert_eq!(error.field.as_deref(), Some("rename"));
    let error = check(
        r#"
        features = ["a"]
        device_field = "/d~"
        timestamp_field = "t"
        "#,
    )
    .expect_err("bad escape");
    assert_eq!(error.field.as_deref(), Some("device_field"));
    let error = check(
        r#"
        format = "csv"
        features = ["a"]
        rename = { a = "/x/y" }
        device = "d"
        timestamp_field = "t"
        "#,
    )
    .expect_err("nested pointer with csv");
    assert_eq!(error.field.as_deref(), Some("format"));
    // A one-token pointer is a column name, fine for CSV.
    check(
        r#"
        format = "csv"
        columns = ["t", "x"]
        features = ["a"]
        rename = { a = "/x" }
        device = "d"
        timestamp_field = "/t"
        "#,
    )
    .expect("one-token pointers name columns");
}

// ---------------------------------------------------------------------------------------------
// Topics
// ---------------------------------------------------------------------------------------------

const TOPIC: &str = r#"
    features = ["v"]
    timestamp_field = "t"
    timestamp_format = "unix_ms"
    topic_template = "factory/{site}/pump/{device}/telemetry"
    device_from_topic = "device"
"#;

#[test]
fn device_from_topic_segments() {
    let mut op = build(TOPIC);
    let result = run_topics(
        &mut op,
        &[
            ("factory/north/pump/p-1/telemetry", r#"{"t":1,"v":1}"#),
            ("factory/south/pump/p-2/telemetry", r#"{"t":2,"v":2}"#),
            ("factory/south/pump/p-2/status", r#"{"t":3,"v":3}"#),
            ("factory/north/pump/p-1/telemetry", r#"{"t":4,"v":4}"#),
            ("", r#"{"t":5,"v":5}"#),
        ],
    );
    assert_eq!(
        result.readings.devices,
        vec![DeviceId::intern("p-1"), DeviceId::intern("p-2"), DeviceId::intern("p-1")]
    );
    assert_eq!(result.readings.times, vec![1, 2, 4]);
    assert_eq!(error_types(&result.errors), ["topic_mismatch", "topic_mismatch"]);
    let error = &result.errors[0];
    assert!(error.reason.contains("factory/south/pump/p-2/status"), "{}", error.reason);
    assert!(error.reason.contains("{device}"), "{}", error.reason);
    assert_eq!(error.topic.as_deref(), Some("factory/south/pump/p-2/status"));
    assert_eq!(error.payload.as_deref(), Some(r#"{"t":3,"v":3}"#));
}

#[test]
fn composed_device_ids_and_templates_without_a_device() {
    let mut op = build(
        &TOPIC.replace("device_from_topic = \"device\"", "device_from_topic = \"{site}/{device}\""),
    );
    let result = run_topics(&mut op, &[("factory/north/pump/p-1/telemetry", r#"{"t":1,"v":1}"#)]);
    assert_eq!(result.readings.devices, vec![DeviceId::intern("north/p-1")]);

    // A template with the device from a field only checks the topics.
    let mut op = build(
        r#"
        features = ["v"]
        device_field = "d"
        timestamp_field = "t"
        topic_template = "{file}.csv"
        "#,
    );
    let result = run_topics(
        &mut op,
        &[("a.csv", r#"{"t":1,"v":1,"d":"x"}"#), ("a.json", r#"{"t":1,"v":1,"d":"x"}"#)],
    );
    assert_eq!(result.readings.devices, vec![DeviceId::intern("x")]);
    assert_eq!(error_types(&result.errors), ["topic_mismatch"]);
}

#[test]
fn topic_options_are_checked() {
    for (toml, field) in [
        (format!("{TOPIC}\ndevice = \"d\""), "device"),
        (format!("{TOPIC}\ndevice_field = \"d\""), "device_from_topic"),
        (
            TOPIC.replace("device_from_topic = \"device\"", "device_from_topic = \"pump\""),
            "device_from_topic",
        ),
        (TOPIC.replace("{site}", "+x"), "topic_template"),
        (
            TOPIC.replace("topic_template = \"factory/{site}/pump/{device}/telemetry\"", ""),
            "device_from_topic",
        ),
    ] {
        let error = check(&toml).expect_err(&toml);
        assert_eq!(error.field.as_deref(), Some(field), "{toml}: {error:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Conversions
// ---------------------------------------------------------------------------------------------

#[test]
fn unit_conversions_and_linear_transforms() {
    let mut op = build(
        r#"
        features = ["temperature", "pressure", "flow", "vibration", "current", "raw"]
        device = "d"
        timestamp_field = "t"
        on_missing = "nan"

        [convert.temperature]
        type = "unit"
        from = "degF"
        to = "degC"

        [convert.pressure]
        type = "unit"
        from = "psi"
        to = "bar"

        [convert.flow]
        type = "unit"
        from = "lpm"
        to = "m3_h"

        [convert.vibration]
        type = "unit"
        from = "in_s"
        to = "mm_s"

        [convert.current]
        type = "unit"
        from = "mA"
        to = "A"

        [convert.raw]
        type = "linear"
        scale = 1.8
        offset = 32.0
        "#,
    );
    let result = run(
        &mut op,
        &[
            r#"{"t":1,"temperature":212,"pressure":14.503773773,"flow":100,"vibration":0.5,"current":4000,"raw":100}"#,
            r#"{"t":2,"temperature":null,"raw":-40}"#,
        ],
    );
    assert!(result.errors.is_empty(), "{:?}", result.errors);
    let first = result.readings.get(0).expect("reading");
    let expected = [100.0, 1.0, 6.0, 12.7, 4.0, 212.0];
    for ((actual, expected), name) in first.values.iter().zip(expected).zip(op.schema().names()) {
        assert!((actual - expected).abs() < 1e-5, "{name}: {actual} != {expected}");
    }
    let second = result.readings.get(1).expect("reading");
    assert!(second.values[0].is_nan(), "a missing value stays missing");
    assert_eq!(second.values[5], -40.0);
}

#[test]
fn conversion_options_are_checked() {
    let base = "features = [\"a\"]\ndevice = \"d\"\ntimestamp_field = \"t\"\n";
    for toml in [
        format!("{base}[convert.b]\ntype = \"linear\"\nscale = 2.0"),
        format!("{base}[convert.a]\ntype = \"unit\"\nfrom = \"bar\"\nto = \"degC\""),
    ] {
        let error = check(&toml).expect_err(&toml);
        assert_eq!(error.field.as_deref(), Some("convert"), "{toml}: {error:?}");
    }
    let untagged = ConfigValue::parse(&format!("{base}convert = {{ a = {{ scale = 2.0 }} }}"))
        .expect("toml")
        .deserialize::<NormalizeOptions>()
        .expect_err("a conversion needs its type");
    assert!(untagged.message.contains("type"), "{}", untagged.message);
}

// ---------------------------------------------------------------------------------------------
// Missing values
// ---------------------------------------------------------------------------------------------

const MISSING: &str = r#"
    features = ["a", "b"]
    device_field = "d"
    timestamp_field = "t"
    timestamp_format = "unix_ms"
"#;

#[test]
fn drop_counts_the_messages_it_drops() {
    let mut op = build(&format!("{MISSING}\non_missing = \"drop\""));
    let result = run(
        &mut op,
        &[
            r#"{"d":"x","t":1,"a":1,"b":2}"#,
            r#"{"d":"x","t":2,"a":1}"#,
            r#"{"d":"x","t":3,"b":null}"#,
            r#"{"d":"x","a":1,"b":2}"#,
            r#"{"d":"x","t":5,"a":1,"b":2}"#,
        ],
    );
    assert_eq!(result.readings.times, vec![1, 5]);
    assert_eq!(error_types(&result.errors), ["missing_field"], "the timestamp stays required");
    assert_eq!(result.discarded, vec![("missing_value", 2)]);
}

#[test]
fn hold_last_per_device() {
    let mut op = build(&format!("{MISSING}\non_missing = \"hold_last\""));
    let result = run(
        &mut op,
        &[
            r#"{"d":"x","t":1,"a":1}"#,
            r#"{"d":"y","t":1,"a":10,"b":20}"#,
            r#"{"d":"x","t":2,"b":2}"#,
            r#"{"d":"y","t":2}"#,
            r#"{"d":"x","t":3,"a":"","b":null}"#,
            r#"{"d":"x","t":4,"a":"NaN","b":5}"#,
            r#"{"d":"x","t":5}"#,
        ],
    );
    // A NaN is not a value: that message is an error, and holds nothing.
    assert_eq!(error_types(&result.errors), ["bad_value"]);
    let values: Vec<(String, Vec<f32>)> = result
        .readings
        .iter()
        .map(|reading| (reading.device.name().to_string(), reading.values.to_vec()))
        .collect();
    let show = |values: &[f32]| values.iter().map(|v| format!("{v}")).collect::<Vec<_>>().join(",");
    let shown: Vec<String> =
        values.iter().map(|(device, values)| format!("{device}:{}", show(values))).collect();
    assert_eq!(
        shown,
        ["x:1,NaN", "y:10,20", "x:1,2", "y:10,20", "x:1,2", "x:1,2"],
        "b has no earlier value on x at first"
    );

    // The held values survive a checkpoint.
    let state = op.snapshot().expect("snapshot").expect("state");
    let mut restored = build(&format!("{MISSING}\non_missing = \"hold_last\""));
    restored.restore(&state).expect("restore");
    let result = run(&mut restored, &[r#"{"d":"y","t":9}"#]);
    assert_eq!(result.readings.values, vec![10.0, 20.0]);
    let mut other = build(&MISSING.replace("[\"a\", \"b\"]", "[\"a\", \"c\"]"));
    assert!(other.restore(&state).is_err(), "features differ");
    assert!(build(MISSING).snapshot().expect("snapshot").is_none(), "stateless otherwise");
}

#[test]
fn fill_values_and_per_feature_policies() {
    let mut op = build(&format!(
        "{MISSING}\non_missing = \"fill\"\nfill_value = -1.0\nfill_values = {{ b = 7.5 }}"
    ));
    let result = run(&mut op, &[r#"{"d":"x","t":1}"#, r#"{"d":"x","t":2,"a":3}"#]);
    assert_eq!(result.readings.values, vec![-1.0, 7.5, 3.0, 7.5]);

    let mut op = build(
        r#"
        features = ["a", "b", "c", "e"]
        device_field = "d"
        timestamp_field = "t"
        on_missing = "nan"
        missing = { b = "fill", c = "drop", e = "error" }
        fill_value = 0.0
        "#,
    );
    let result = run(
        &mut op,
        &[
            r#"{"d":"x","t":1,"c":1,"e":1}"#,
            r#"{"d":"x","t":2,"a":1,"b":2,"e":1}"#,
            r#"{"d":"x","t":3,"a":1,"b":2,"c":3}"#,
            r#"{"d":"x","t":4}"#,
        ],
    );
    let first = result.readings.get(0).expect("reading");
    assert!(first.values[0].is_nan());
    assert_eq!(&first.values[1..], &[0.0, 1.0, 1.0]);
    assert_eq!(result.readings.len(), 1);
    assert_eq!(result.discarded, vec![("missing_value", 1)]);
    assert_eq!(error_types(&result.errors), ["missing_field", "missing_field"]);
    assert_eq!(result.errors[0].reason, "missing feature `e`");
}

#[test]
fn filled_and_held_values_are_in_converted_units() {
    let mut op = build(
        r#"
        features = ["a", "b"]
        device = "d"
        timestamp_field = "t"
        missing = { a = "hold_last", b = "fill" }
        fill_value = 5.0
        convert = { a = { type = "linear", scale = 10.0 }, b = { type = "linear", scale = 10.0 } }
        "#,
    );
    let result = run(&mut op, &[r#"{"t":1,"a":1,"b":1}"#, r#"{"t":2}"#]);
    assert_eq!(result.readings.values, vec![10.0, 10.0, 10.0, 5.0]);
}

#[test]
fn missing_value_options_are_checked() {
    for (toml, field) in [
        (format!("{MISSING}\non_missing = \"fill\""), "fill_value"),
        (format!("{MISSING}\nmissing = {{ a = \"fill\" }}"), "fill_value"),
        (format!("{MISSING}\nfill_value = 1.0"), "fill_value"),
        (
            format!(
                "{MISSING}\nmissing = {{ a = \"fill\" }}\nfill_value = 1.0\nfill_values = {{ b = 1.0 }}"
            ),
            "fill_values",
        ),
        (format!("{MISSING}\nmissing = {{ z = \"nan\" }}"), "missing"),
        (
            format!(
                "{MISSING}\nfill_values = {{ z = 1.0 }}\non_missing = \"fill\"\nfill_value = 0.0"
            ),
            "fill_values",
        ),
    ] {
        let error = check(&toml).expect_err(&toml);
        assert_eq!(error.field.as_deref(), Some(field), "{toml}: {error:?}");
    }
    let bad = ConfigValue::parse(&format!("{MISSING}\non_missing = \"zero\""))
        .expect("toml")
        .deserialize::<NormalizeOptions>()
        .expect_err("unknown policy");
    assert!(bad.message.contains("hold_last"), "{}", bad.message);
    // CSV columns need only the fields of features that are errors when missing.
    check(&format!(
        "{MISSING}\nformat = \"csv\"\ncolumns = [\"d\", \"t\", \"a\"]\nmissing = {{ b = \"nan\" }}"
    ))
    .expect("b may be absent");
    let error = check(&format!(
        "{MISSING}\nformat = \"csv\"\ncolumns = [\"d\", \"t\", \"a\"]\nmissing = {{ a = \"nan\" }}"
    ))
    .expect_err("b is required");
    assert_eq!(error.field.as_deref(), Some("columns"));
}

// ---------------------------------------------------------------------------------------------
// Scaling from a model
// ---------------------------------------------------------------------------------------------

const SKAB: &str = r#"
    features = ["Accelerometer1RMS", "Temperature"]
    device = "valve1"
    timestamp_field = "datetime"
    timestamp_format = "datetime"
"#;

fn pump_ae() -> ModelSpec {
    ModelSpec::read(&repo_root().join("models/pump-ae/model.json")).expect("shipped model")
}

#[test]
fn scaling_uses_the_models_scaler_by_feature_name() {
    let spec = pump_ae();
    let model = repo_root().join("models/pump-ae");
    let mut op = build(&format!("{SKAB}\nscale_from_model = {:?}", model.display().to_string()));
    let payload =
        r#"{"datetime":"2020-03-09 10:14:33","Accelerometer1RMS":0.2213,"Temperature":90.5}"#;
    let result = run(&mut op, &[payload]);
    assert!(result.errors.is_empty(), "{:?}", result.errors);
    let values = &result.readings.values;
    for (position, (name, raw)) in
        [("Accelerometer1RMS", 0.2213), ("Temperature", 90.5)].into_iter().enumerate()
    {
        let index = spec.features.iter().position(|feature| feature == name).expect("feature");
        let expected = (raw - spec.scaler.mean[index]) / spec.scaler.std[index];
        assert!(
            (f64::from(values[position]) - expected).abs() < 1e-3,
            "{name}: {} != {expected}",
            values[position]
        );
    }
}

#[test]
fn scaling_comes_after_conversion_and_resolves_against_the_pipeline_folder() {
    let spec = pump_ae();
    let index = spec.features.iter().position(|name| name == "Temperature").expect("feature");
    let toml = format!(
        "{SKAB}\nscale_from_model = \"models/pump-ae/model.json\"\n\
         convert = {{ Temperature = {{ type = \"unit\", from = \"degF\", to = \"degC\" }} }}"
    );
    let info = PipelineInfo { base_dir: repo_root(), ..PipelineInfo::default() };
    let ctx = ComponentContext::new(
        "norm",
        "normalize",
        0,
        1,
        Arc::new(info.clone()),
        Arc::new(AtomicBool::new(false)),
    );
    let mut op = Normalize::with_options(&options(&toml), &ctx).expect("relative to the pipeline");
    let result = run(
        &mut op,
        &[
            r#"{"datetime":"2020-03-09 10:14:33","Accelerometer1RMS":0.2126043583344171,"Temperature":194}"#,
        ],
    );
    assert!(result.errors.is_empty(), "{:?}", result.errors);
    let expected = (90.0 - spec.scaler.mean[index]) / spec.scaler.std[index];
    assert!((f64::from(result.readings.values[1]) - expected).abs() < 1e-3);
    assert!(result.readings.values[0].abs() < 1e-3, "the mean scales to 0");

    let validate = ValidateContext { pipeline: Arc::new(info) };
    NormalizeFactory
        .output_type(&options(&toml), &PortType::of(Kind::Raw), &validate)
        .expect("validates against the pipeline folder");
    let error = check(&toml).expect_err("not found from the current folder");
    assert_eq!(error.field.as_deref(), Some("scale_from_model"));
}

#[test]
fn scaling_needs_the_models_features() {
    let model = repo_root().join("models/pump-ae").display().to_string();
    let error = check(&format!(
        "features = [\"Accelerometer1RMS\", \"vibration\"]\ndevice = \"d\"\ntimestamp_field = \"t\"\n\
         scale_from_model = {model:?}"
    ))
    .expect_err("vibration is not a model feature");
    assert_eq!(error.field.as_deref(), Some("scale_from_model"));
    assert!(error.message.contains("vibration"), "{}", error.message);
    let error =
        check(&format!("{SKAB}\nscale_from_model = \"/nonexistent/model\"")).expect_err("no model");
    assert_eq!(error.field.as_deref(), Some("scale_from_model"));
}

// ---------------------------------------------------------------------------------------------
// Never panics
// ---------------------------------------------------------------------------------------------

mod never_panics {
    use proptest::prelude::*;

    use super::*;

    fn payloads() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
        let topic = prop_oneof![
            Just("factory/n/pump/p-1/telemetry".to_owned()),
            "[a-z/{}+#]{0,24}",
            "factory/[a-z/]{0,6}/pump/[a-z0-9-]{0,4}/telemetry",
        ];
        let bytes = proptest::collection::vec(any::<u8>(), 0..64).boxed();
        let jsonish = "[{}\\[\\]\":,;0-9a-z/~. \\-\\\\]{0,64}".prop_map(String::into_bytes).boxed();
        let leaf = prop_oneof![
            any::<f64>().prop_map(|v| format!("{v}")),
            any::<i64>().prop_map(|v| v.to_string()),
            Just("null".to_owned()),
            Just("true".to_owned()),
            "\"[a-z0-9. ~/-]{0,6}\"",
        ];
        let value = leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4)
                    .prop_map(|items| format!("[{}]", items.join(","))),
                proptest::collection::vec(("(s|0|1|v|a/b|~x|t)", inner), 0..4).prop_map(
                    |entries| {
                        let body: Vec<String> = entries
                            .into_iter()
                            .map(|(key, value)| format!("{key:?}:{value}"))
                            .collect();
                        format!("{{{}}}", body.join(","))
                    }
                ),
            ]
        });
        let object = proptest::collection::vec(("(s|t|d|v|y|meta)", value), 0..6)
            .prop_map(|entries| {
                let body: Vec<String> =
                    entries.into_iter().map(|(key, value)| format!("{key:?}:{value}")).collect();
                format!("{{{}}}", body.join(",")).into_bytes()
            })
            .boxed();
        proptest::collection::vec((topic, prop_oneof![bytes, jsonish, object]), 0..24)
    }

    proptest! {
        #[test]
        fn pointers_topics_and_conversions_account_for_every_message(messages in payloads()) {
            let configs = [
                r#"
                    format = "json"
                    features = ["v", "w", "x"]
                    rename = { v = "/s/0/v", w = "/s/1/a~1b/~0x", x = "/meta/v" }
                    device_field = "/meta/d"
                    timestamp_field = "/t"
                    timestamp_format = "unix_ms"
                    label_field = "/s/1"
                    on_missing = "hold_last"
                    missing = { x = "fill" }
                    fill_value = 0.5
                    convert = { v = { type = "unit", from = "degF", to = "K" }, w = { type = "linear", scale = -3.0, offset = 1e30 } }
                "#,
                r#"
                    format = "json"
                    features = ["v", "w"]
                    rename = { v = "/s/0", w = "v" }
                    timestamp_field = "t"
                    topic_template = "factory/{site}/pump/{device}/telemetry"
                    device_from_topic = "{site}.{device}"
                    on_missing = "drop"
                    missing = { w = "error" }
                    convert = { v = { type = "unit", from = "psi", to = "bar" } }
                "#,
            ];
            for toml in configs {
                let mut op = build(toml);
                let mut raw = RawBatch::new();
                for (position, (topic, payload)) in messages.iter().enumerate() {
                    raw.push(topic, payload, 0, position as u64);
                }
                let mut out = Outputs::new("norm");
                op.process_batch(Batch::Raw(raw), &mut out);
                let readings: usize = out.take_main().iter().map(Batch::len).sum();
                let errors = out.take_errors().len();
                let discarded: u64 = out.take_discarded().iter().map(|(_, count)| count).sum();
                prop_assert_eq!(readings + errors + discarded as usize, messages.len());
                prop_assert!(op.snapshot().is_ok());
            }
        }
    }
}
