//! Timestamp formats and their parsing, shared by every component that reads event time.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::records::EventTime;

/// How a timestamp field is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestampFormat {
    /// Numbers: seconds if below 10^11, else milliseconds; text: RFC 3339 or `datetime`.
    #[default]
    Auto,
    /// Milliseconds since the Unix epoch.
    UnixMs,
    /// Seconds since the Unix epoch (fractions allowed).
    UnixS,
    /// Microseconds since the Unix epoch.
    UnixUs,
    /// Nanoseconds since the Unix epoch.
    UnixNs,
    /// RFC 3339, e.g. `2020-03-09T10:14:33.250Z` or `...+02:00`.
    Rfc3339,
    /// `YYYY-MM-DD HH:MM:SS[.fff]` (or with `T`), read as UTC (SKAB's format).
    Datetime,
}

/// Why a timestamp could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot read {text:?} as a {format} timestamp")]
pub struct TimestampError {
    /// The offending text (truncated to 64 bytes).
    pub text: String,
    /// The expected format.
    pub format: TimestampFormat,
}

impl fmt::Display for TimestampFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TimestampFormat::Auto => "auto",
            TimestampFormat::UnixMs => "unix_ms",
            TimestampFormat::UnixS => "unix_s",
            TimestampFormat::UnixUs => "unix_us",
            TimestampFormat::UnixNs => "unix_ns",
            TimestampFormat::Rfc3339 => "rfc3339",
            TimestampFormat::Datetime => "datetime",
        })
    }
}

fn error(text: &str, format: TimestampFormat) -> TimestampError {
    let mut end = text.len().min(64);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    TimestampError { text: text[..end].to_owned(), format }
}

/// Reads a numeric timestamp (already a number, as in JSON) in `format`.
pub fn timestamp_from_number(
    value: f64,
    format: TimestampFormat,
) -> Result<EventTime, TimestampError> {
    if !value.is_finite() {
        return Err(error(&value.to_string(), format));
    }
    let ms = match format {
        TimestampFormat::UnixMs => value,
        TimestampFormat::UnixS => value * 1e3,
        TimestampFormat::UnixUs => value / 1e3,
        TimestampFormat::UnixNs => value / 1e6,
        TimestampFormat::Auto => {
            if value.abs() < 1e11 {
                value * 1e3
            } else {
                value
            }
        }
        TimestampFormat::Rfc3339 | TimestampFormat::Datetime => {
            return Err(error(&value.to_string(), format));
        }
    };
    if ms.abs() > 9.0e15 {
        return Err(error(&value.to_string(), format));
    }
    Ok(ms.floor() as EventTime)
}

/// Reads a timestamp written as text in `format`.
pub fn parse_timestamp(text: &str, format: TimestampFormat) -> Result<EventTime, TimestampError> {
    let trimmed = text.trim();
    match format {
        TimestampFormat::UnixMs
        | TimestampFormat::UnixS
        | TimestampFormat::UnixUs
        | TimestampFormat::UnixNs => {
            let value: f64 = trimmed.parse().map_err(|_| error(text, format))?;
            timestamp_from_number(value, format)
        }
        TimestampFormat::Rfc3339 | TimestampFormat::Datetime => {
            parse_datetime(trimmed).ok_or_else(|| error(text, format))
        }
        TimestampFormat::Auto => match trimmed.parse::<f64>() {
            Ok(value) => timestamp_from_number(value, format),
            Err(_) => parse_datetime(trimmed).ok_or_else(|| error(text, format)),
        },
    }
}

fn digits(bytes: &[u8]) -> Option<i64> {
    if bytes.is_empty() {
        return None;
    }
    let mut value: i64 = 0;
    for byte in bytes {
        if !byte.is_ascii_digit() {
            return None;
        }
        value = value * 10 + i64::from(byte - b'0');
    }
    Some(value)
}

/// Days from 1970-01-01 to the civil date (proleptic Gregorian).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = if year >= 0 { year } else { year - 399 } / 400;
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The civil date (year, month, day) of a day count from 1970-01-01 (proleptic Gregorian);
/// the inverse of `days_from_civil`.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Formats ms since the epoch as RFC 3339 in UTC with milliseconds,
/// e.g. `2026-11-29T07:15:00.250Z` (the format of Alertmanager's `startsAt`).
///
/// ```
/// assert_eq!(tidewatch_api::time::format_rfc3339(0), "1970-01-01T00:00:00.000Z");
/// assert_eq!(tidewatch_api::time::format_rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
/// ```
pub fn format_rfc3339(ms: EventTime) -> String {
    let days = ms.div_euclid(86_400_000);
    let in_day = ms.rem_euclid(86_400_000);
    let (year, month, day) = civil_from_days(days);
    let (hours, minutes) = (in_day / 3_600_000, in_day / 60_000 % 60);
    let (seconds, millis) = (in_day / 1_000 % 60, in_day % 1_000);
    format!("{year:04}-{month:02}-{day:02}T{hours:02}:{minutes:02}:{seconds:02}.{millis:03}Z")
}

/// `YYYY-MM-DD[T ]HH:MM[:SS[.fff]][Z|±HH:MM]`; no offset means UTC.
fn parse_datetime(text: &str) -> Option<EventTime> {
    let bytes = text.as_bytes();
    if bytes.len() < 16 || bytes[4] != b'-' || bytes[7] != b'-' || bytes[13] != b':' {
        return None;
    }
    if bytes[10] != b'T' && bytes[10] != b' ' && bytes[10] != b't' {
        return None;
    }
    let year = digits(&bytes[0..4])?;
    let month = digits(&bytes[5..7])?;
    let day = digits(&bytes[8..10])?;
    let hour = digits(&bytes[11..13])?;
    let minute = digits(&bytes[14..16])?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    let mut rest = &bytes[16..];
    let mut second = 0;
    let mut millis = 0;
    if let [b':', tail @ ..] = rest {
        if tail.len() < 2 {
            return None;
        }
        second = digits(&tail[..2])?;
        if second > 60 {
            return None;
        }
        rest = &tail[2..];
        if let [b'.', fraction @ ..] = rest {
            let count = fraction.iter().take_while(|byte| byte.is_ascii_digit()).count();
            if count == 0 {
                return None;
            }
            let mut scaled = 0;
            for (index, byte) in fraction[..count].iter().take(3).enumerate() {
                scaled += i64::from(byte - b'0') * [100, 10, 1][index];
            }
            millis = scaled;
            rest = &fraction[count..];
        }
    }
    let offset_minutes = match rest {
        [] | [b'Z'] | [b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let hours = digits(&[*h1, *h2])?;
            let minutes = digits(&[*m1, *m2])?;
            let total = hours * 60 + minutes;
            if *sign == b'+' { total } else { -total }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3_600 + minute * 60 + second - offset_minutes * 60;
    Some(seconds * 1_000 + millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips() {
        for ms in [0, 1, 951_782_400_000, 1_700_000_000_123, -86_400_001, 4_102_444_799_999] {
            let text = format_rfc3339(ms);
            assert_eq!(parse_timestamp(&text, TimestampFormat::Rfc3339), Ok(ms), "{text}");
        }
        assert_eq!(format_rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn reads_every_format() {
        assert_eq!(
            parse_timestamp("2020-03-09 10:14:33", TimestampFormat::Datetime),
            Ok(1_583_748_873_000)
        );
        assert_eq!(
            parse_timestamp("2020-03-09T10:14:33.25Z", TimestampFormat::Rfc3339),
            Ok(1_583_748_873_250)
        );
        assert_eq!(
            parse_timestamp("2020-03-09T12:14:33+02:00", TimestampFormat::Rfc3339),
            Ok(1_583_748_873_000)
        );
        assert_eq!(parse_timestamp("1583748873", TimestampFormat::UnixS), Ok(1_583_748_873_000));
        assert_eq!(parse_timestamp("1583748873000", TimestampFormat::Auto), Ok(1_583_748_873_000));
        assert_eq!(parse_timestamp("1583748873", TimestampFormat::Auto), Ok(1_583_748_873_000));
        assert_eq!(parse_timestamp("1970-01-01 00:00:00", TimestampFormat::Auto), Ok(0));
        assert_eq!(parse_timestamp("1969-12-31 23:59:59", TimestampFormat::Auto), Ok(-1_000));
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        for text in
            ["", "x", "2020-13-01 00:00:00", "2020-03-09 10:14:3", "ééééééééééééééééé", "1e400"]
        {
            assert!(parse_timestamp(text, TimestampFormat::Auto).is_err(), "{text}");
        }
    }
}
