//! Timestamps: `parse_timestamp` on the input as text and `timestamp_from_number` on its first
//! eight bytes as an `f64`, in every `TimestampFormat`. Nothing panics; a number read is
//! within the bound (|ms| <= 9e15); text in `auto` reads as the number it spells; a time
//! written back as RFC 3339 (years 0-9999) reads as the same time.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidewatch_api::time::format_rfc3339;
use tidewatch_api::{TimestampFormat, parse_timestamp, timestamp_from_number};

const FORMATS: [TimestampFormat; 7] = [
    TimestampFormat::Auto,
    TimestampFormat::UnixMs,
    TimestampFormat::UnixS,
    TimestampFormat::UnixUs,
    TimestampFormat::UnixNs,
    TimestampFormat::Rfc3339,
    TimestampFormat::Datetime,
];

/// 0000-01-01T00:00:00Z and 9999-12-31T23:59:59.999Z, in ms.
const YEAR_0: i64 = -62_167_219_200_000;
const YEAR_9999_END: i64 = 253_402_300_799_999;

fn round_trip(ms: i64) {
    let text = format_rfc3339(ms);
    if (YEAR_0..=YEAR_9999_END).contains(&ms) {
        assert_eq!(
            parse_timestamp(&text, TimestampFormat::Rfc3339),
            Ok(ms),
            "{ms} written as {text:?}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some(bytes) = data.get(..8) {
        let mut number = [0u8; 8];
        number.copy_from_slice(bytes);
        let value = f64::from_le_bytes(number);
        for format in FORMATS {
            if let Ok(ms) = timestamp_from_number(value, format) {
                assert!(ms.unsigned_abs() <= 9_000_000_000_000_000, "{value} -> {ms}");
                round_trip(ms);
            }
        }
    }
    let Ok(text) = std::str::from_utf8(data) else { return };
    for format in FORMATS {
        match parse_timestamp(text, format) {
            Ok(ms) => round_trip(ms),
            Err(error) => {
                assert_eq!(error.format, format);
                assert!(error.text.len() <= 64);
                let _ = error.to_string();
            }
        }
    }
    if let Ok(value) = text.trim().parse::<f64>() {
        assert_eq!(
            parse_timestamp(text, TimestampFormat::Auto).ok(),
            timestamp_from_number(value, TimestampFormat::Auto).ok(),
            "{text:?} in auto"
        );
    }
});
