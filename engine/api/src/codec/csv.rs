//! Delimited text: one record per message (a CSV line), split on [`csv_core`] (RFC 4180
//! quoting, any one-byte delimiter), with a plain split for the common line without quotes.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use csv_core::{ReadFieldResult, Reader, ReaderBuilder};
use serde::{Deserialize, Deserializer};

use crate::factory::ConfigError;

/// A field delimiter: one ASCII character other than a quote or a line end.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Delimiter(u8);

impl Delimiter {
    /// `,`
    pub const COMMA: Delimiter = Delimiter(b',');
    /// `;`
    pub const SEMICOLON: Delimiter = Delimiter(b';');
    /// A tab.
    pub const TAB: Delimiter = Delimiter(b'\t');

    /// The delimiter `c`, or why it cannot be one.
    pub fn new(c: char) -> Result<Delimiter, String> {
        if c.is_ascii() && !matches!(c, '"' | '\n' | '\r') {
            Ok(Delimiter(c as u8))
        } else {
            Err(format!(
                "{c:?} cannot be a delimiter: use one ASCII character other than a quote or a line end"
            ))
        }
    }

    /// The delimiter written as `text` (one character), or why it cannot be one.
    pub fn parse(text: &str) -> Result<Delimiter, String> {
        let mut chars = text.chars();
        match (chars.next(), chars.next()) {
            (Some(c), None) => Delimiter::new(c),
            _ => Err(format!("a delimiter is one character, not {text:?}")),
        }
    }

    /// The delimiter as a config error at `option`, with a hint.
    pub fn parse_option(option: &str, text: &str) -> Result<Delimiter, ConfigError> {
        Delimiter::parse(text).map_err(|problem| {
            ConfigError::at_field(option, problem).with_hint("for example \",\", \";\" or \"\\t\"")
        })
    }

    /// The delimiter byte.
    pub fn byte(self) -> u8 {
        self.0
    }

    /// The most frequent of `,` `;` tab and `|` outside quotes in a header line (`,` when none
    /// occurs): the delimiter of a file whose options do not say.
    pub fn sniff(header: &[u8]) -> Delimiter {
        let mut counts = [0usize; 4];
        let candidates = [b',', b';', b'\t', b'|'];
        let mut quoted = false;
        for byte in header {
            if *byte == b'"' {
                quoted = !quoted;
            } else if !quoted && let Some(at) = candidates.iter().position(|c| c == byte) {
                counts[at] += 1;
            }
        }
        let best = (0..candidates.len()).max_by_key(|at| (counts[*at], usize::MAX - at));
        match best {
            Some(at) if counts[at] > 0 => Delimiter(candidates[at]),
            _ => Delimiter::COMMA,
        }
    }
}

impl Default for Delimiter {
    fn default() -> Delimiter {
        Delimiter::COMMA
    }
}

impl fmt::Debug for Delimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", char::from(self.0))
    }
}

impl<'de> Deserialize<'de> for Delimiter {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Delimiter::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Drops trailing line ends.
pub fn trim_line_end(mut line: &[u8]) -> &[u8] {
    while let [rest @ .., b'\n' | b'\r'] = line {
        line = rest;
    }
    line
}

/// Splits one record at `delimiter` and calls `field(column, bytes)` for each column until it
/// returns false. Quoted fields (`""` inside quotes is a quote) are unquoted; a line without
/// quotes is split without copying.
pub fn split_record(
    line: &[u8],
    delimiter: Delimiter,
    mut field: impl FnMut(usize, Cow<'_, [u8]>) -> bool,
) -> Result<(), &'static str> {
    let line = trim_line_end(line);
    if !line.contains(&b'"') {
        for (column, text) in line.split(|byte| *byte == delimiter.0).enumerate() {
            if !field(column, Cow::Borrowed(text)) {
                break;
            }
        }
        return Ok(());
    }
    if line.iter().filter(|byte| **byte == b'"').count() % 2 == 1 {
        return Err("a quoted field is not closed");
    }
    let mut reader: Reader = ReaderBuilder::new().delimiter(delimiter.0).build();
    let mut input = line;
    let mut out = Vec::with_capacity(line.len());
    let mut column = 0;
    let mut field_start = 0;
    loop {
        if out.len() == out.capacity() {
            out.reserve(64);
        }
        let spare = out.capacity() - out.len();
        let start = out.len();
        out.resize(start + spare, 0);
        let (result, read, written) = reader.read_field(input, &mut out[start..]);
        out.truncate(start + written);
        input = &input[read..];
        match result {
            ReadFieldResult::InputEmpty => {
                if input.is_empty() {
                    // Signal the end of input so the last field is finished.
                    let (result, _, written) = reader.read_field(&[], &mut []);
                    debug_assert_eq!(written, 0);
                    if matches!(result, ReadFieldResult::Field { .. }) {
                        field(column, Cow::Borrowed(out.get(field_start..).unwrap_or_default()));
                    }
                    return Ok(());
                }
            }
            ReadFieldResult::OutputFull => {}
            ReadFieldResult::Field { record_end } => {
                let text = out.get(field_start..).unwrap_or_default();
                if !field(column, Cow::Borrowed(text)) || record_end {
                    return Ok(());
                }
                column += 1;
                out.clear();
                field_start = 0;
            }
            ReadFieldResult::End => return Ok(()),
        }
    }
}

/// The column names of a header line: split like a record, trimmed, a leading byte-order mark
/// dropped.
pub fn header_names(line: &[u8], delimiter: Delimiter) -> Result<Arc<[Arc<str>]>, &'static str> {
    let line = line.strip_prefix(b"\xef\xbb\xbf").unwrap_or(line);
    let mut names = Vec::new();
    split_record(line, delimiter, |_, text| {
        names.push(Arc::from(String::from_utf8_lossy(&text).trim()));
        true
    })?;
    Ok(names.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(line: &str, delimiter: Delimiter) -> Vec<String> {
        let mut out = Vec::new();
        split_record(line.as_bytes(), delimiter, |_, text| {
            out.push(String::from_utf8(text.into_owned()).expect("utf8"));
            true
        })
        .expect("valid");
        out
    }

    #[test]
    fn plain_and_quoted_records_split_alike() {
        assert_eq!(fields("a,b,,c\r\n", Delimiter::COMMA), ["a", "b", "", "c"]);
        assert_eq!(
            fields("\"a,1\",\"say \"\"hi\"\"\",c", Delimiter::COMMA),
            ["a,1", "say \"hi\"", "c"]
        );
        assert_eq!(fields("x;\"y;z\"", Delimiter::SEMICOLON), ["x", "y;z"]);
        assert_eq!(fields("\"\",", Delimiter::COMMA), ["", ""]);
    }

    #[test]
    fn a_long_quoted_field_grows_the_buffer() {
        let long = "v".repeat(5000);
        let line = format!("\"{long}\",2");
        assert_eq!(fields(&line, Delimiter::COMMA), [long.as_str(), "2"]);
    }

    #[test]
    fn headers_are_trimmed_and_delimiters_sniffed() {
        let header = b"\xef\xbb\xbfdatetime; Current ;\"Volume Flow RateRMS\"";
        let delimiter = Delimiter::sniff(header);
        assert_eq!(delimiter, Delimiter::SEMICOLON);
        let names = header_names(header, delimiter).expect("header");
        let names: Vec<&str> = names.iter().map(|name| &**name).collect();
        assert_eq!(names, ["datetime", "Current", "Volume Flow RateRMS"]);
        assert_eq!(Delimiter::sniff(b"a\tb\tc"), Delimiter::TAB);
        assert_eq!(Delimiter::sniff(b"single"), Delimiter::COMMA);
    }

    #[test]
    fn delimiters_are_checked() {
        assert!(Delimiter::parse(";").is_ok());
        assert!(Delimiter::parse("\"").is_err());
        assert!(Delimiter::parse(",,").is_err());
        assert!(Delimiter::parse("é").is_err());
    }
}
