//! model.json: `ModelSpec::parse` (what `ModelSpec::read` does with the file's text): the
//! parse and the consistency checks. Nothing panics; an accepted spec has a width.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidewatch_inference::ModelSpec;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(spec) = ModelSpec::parse(text) {
        assert!(spec.check().is_ok());
        assert!(spec.width() >= 1);
        let _ = serde_json::to_string(&spec);
    }
});
