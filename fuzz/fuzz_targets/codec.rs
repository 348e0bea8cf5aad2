//! The payload codec: JSON, CSV (quoting, delimiters, header lines), f32le, field plans
//! (names, JSON pointers, `@` metadata) and topic templates with `device_from_topic`.
//!
//! The input is text lines (the last one runs to the end, so payloads may hold newlines):
//!
//! ```text
//! <format> [<delimiter>]      auto | json | csv | f32le, then a delimiter character or none
//! <fields>                    comma-separated field specs (`temp`, `/a/0/b`, `@topic`, ...)
//! <columns>                   comma-separated column names, empty for none
//! <topic_template>            empty for none
//! <device_from_topic>         empty for none
//! <topic>
//! <header line>               empty for none (a CSV file's header)
//! <payload>...                the message
//! ```
//!
//! Nothing panics; a bad configuration is a `ConfigError`; every message decodes into values
//! of known fields or a typed `DecodeError`, and decoding it twice gives the same outcome.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tidewatch_api::TimestampFormat;
use tidewatch_api::codec::{Decoder, DecoderOptions, Delimiter, PayloadCodec};
use tidewatch_api::records::RawBatch;

const ERROR_TYPES: [&str; 4] = ["parse", "topic_mismatch", "unsupported_format", "missing_field"];
const FORMATS: [TimestampFormat; 7] = [
    TimestampFormat::Auto,
    TimestampFormat::UnixMs,
    TimestampFormat::UnixS,
    TimestampFormat::UnixUs,
    TimestampFormat::UnixNs,
    TimestampFormat::Rfc3339,
    TimestampFormat::Datetime,
];

fn some(line: &str) -> Option<String> {
    (!line.is_empty()).then(|| line.to_owned())
}

fn list(line: &str) -> Option<Vec<String>> {
    (!line.is_empty()).then(|| line.split(',').map(str::to_owned).collect())
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(8, |byte| *byte == b'\n');
    let mut line = || std::str::from_utf8(parts.next().unwrap_or_default()).ok();
    let (Some(format), Some(fields), Some(columns), Some(template), Some(device), Some(topic)) =
        (line(), line(), line(), line(), line(), line())
    else {
        return;
    };
    let header = parts.next().unwrap_or_default();
    let payload = parts.next().unwrap_or_default();

    let mut words = format.splitn(2, ' ');
    let format = match words.next().unwrap_or_default() {
        "json" => PayloadCodec::Json,
        "csv" => PayloadCodec::Csv,
        "f32le" => PayloadCodec::F32le,
        _ => PayloadCodec::Auto,
    };
    let delimiter = match words.next() {
        Some(text) => match Delimiter::parse(text) {
            Ok(delimiter) => Some(delimiter),
            Err(_) => return,
        },
        None => None,
    };
    let options = DecoderOptions {
        format,
        delimiter,
        columns: list(columns),
        topic_template: some(template),
        device_from_topic: some(device),
    };
    let fields: Vec<(&str, &str)> = fields.split(',').map(|spec| ("fields", spec)).collect();
    let Ok(mut decoder) = Decoder::new(&options, &fields) else { return };
    let known = decoder.plan().len();

    let mut batch = RawBatch::default();
    if !header.is_empty() {
        batch.set_header(Arc::from(header));
    }
    batch.push(topic, payload, 1_700_000_000_000, 7);
    let header = batch.header().cloned();
    if let Some(header) = &header {
        if let Err(error) = decoder.decode_header(header) {
            assert!(ERROR_TYPES.contains(&error.error_type), "untyped error {error:?}");
        }
    }
    let mut outcomes = Vec::new();
    for _ in 0..2 {
        for message in batch.iter() {
            let mut values = Vec::new();
            let outcome = decoder.decode(header.as_ref(), &message, |field, value| {
                assert!(field < known, "field {field} of a plan of {known}");
                let _ = value.as_f32();
                for format in FORMATS {
                    let _ = value.as_timestamp(format);
                }
                values.push((field, value.to_string()));
            });
            match &outcome {
                Ok(()) => {
                    let mut buffer = String::new();
                    let device = decoder.device_from_topic(message.topic, &mut buffer);
                    assert_eq!(device.is_some(), options.device_from_topic.is_some());
                }
                Err(error) => {
                    assert!(ERROR_TYPES.contains(&error.error_type), "untyped error {error:?}");
                }
            }
            outcomes.push(outcome.map(|()| values));
        }
    }
    assert_eq!(outcomes[0], outcomes[1], "the same message decoded twice differently");
    assert!(decoder.header_layouts() <= 8);
});
