//! The pipeline TOML loader and validator: `load_str` with the built-in components and no
//! environment. Nothing panics; a rejection has errors at real lines and columns of the text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    tidewatch_fuzz::load_and_check(text, |_| None, true);
});
