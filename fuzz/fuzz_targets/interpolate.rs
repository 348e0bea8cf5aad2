//! `${VAR}` / `${VAR:-default}` / `$$` interpolation, through `load_str` (the interpolation
//! module is private): variables whose names start with `A`-`M` are set, to values with TOML
//! quotes, newlines and `${` of their own, the others are unset. Nothing panics and every
//! diagnostic points at a line of the text (a value's newlines never add lines).
#![no_main]

use libfuzzer_sys::fuzz_target;

fn env(name: &str) -> Option<String> {
    match name.as_bytes().first()? {
        b'A'..=b'D' => Some(format!("{name}-value")),
        b'E'..=b'G' => Some("a\"b\nc = 1\n[x]".to_owned()),
        b'H'..=b'J' => Some("${NESTED} $$ ${".to_owned()),
        b'K'..=b'M' => Some(String::new()),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    tidewatch_fuzz::load_and_check(text, env, false);
});
