//! The hand-written limit of workload (a) in `benches/e2e/run.sh`: one thread, one loop over
//! the JSON lines, no engine. Per line: parse, normalise (intern the device, the 8 features in
//! order as `f32`), push into the device's count window (60 readings, a window every 10), and
//! for each window the mean, population std, min and max of every feature (what `stats`
//! computes), counted.
//!
//!   e2e_limit serde|fast FILE
//!
//! `serde` parses each line with serde_json into a borrowed struct; `fast` with a flat-object
//! scanner written for this (keys in any order, no escapes; a line it cannot read falls back to
//! serde_json). Prints one line:
//! `limit-<parser> readings N windows W seconds S readings_per_sec R checksum C`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::time::Instant;

const FEATURES: usize = 8;
const SIZE: usize = 60;
const SLIDE: usize = 10;
const NAMES: [&str; FEATURES] = ["f0", "f1", "f2", "f3", "f4", "f5", "f6", "f7"];

#[derive(serde::Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    device: Cow<'a, str>,
    ts: i64,
    f0: f32,
    f1: f32,
    f2: f32,
    f3: f32,
    f4: f32,
    f5: f32,
    f6: f32,
    f7: f32,
}

/// One device's count window: the last `SIZE` readings, row after row, in a ring.
struct Device {
    ring: Vec<f32>,
    seen: usize,
    last_ts: i64,
}

struct Windows {
    index: HashMap<String, usize>,
    devices: Vec<Device>,
    windows: u64,
    checksum: f64,
}

impl Windows {
    fn new() -> Windows {
        Windows { index: HashMap::new(), devices: Vec::new(), windows: 0, checksum: 0.0 }
    }

    fn push(&mut self, device: &str, ts: i64, values: &[f32; FEATURES]) {
        let slot = match self.index.get(device) {
            Some(&slot) => slot,
            None => {
                let slot = self.devices.len();
                self.index.insert(device.to_owned(), slot);
                self.devices.push(Device {
                    ring: vec![0.0; SIZE * FEATURES],
                    seen: 0,
                    last_ts: i64::MIN,
                });
                slot
            }
        };
        let state = &mut self.devices[slot];
        let row = state.seen % SIZE;
        state.ring[row * FEATURES..(row + 1) * FEATURES].copy_from_slice(values);
        state.seen += 1;
        state.last_ts = state.last_ts.max(ts);
        if state.seen >= SIZE && state.seen.is_multiple_of(SLIDE) {
            let mut sum = 0.0f64;
            for feature in 0..FEATURES {
                let (mut total, mut min, mut max) = (0.0f64, f32::INFINITY, f32::NEG_INFINITY);
                for step in 0..SIZE {
                    let x = state.ring[step * FEATURES + feature];
                    total += f64::from(x);
                    min = min.min(x);
                    max = max.max(x);
                }
                let mean = total / SIZE as f64;
                let mut squares = 0.0f64;
                for step in 0..SIZE {
                    let d = f64::from(state.ring[step * FEATURES + feature]) - mean;
                    squares += d * d;
                }
                let std = (squares / SIZE as f64).sqrt();
                sum += mean + std + f64::from(min) + f64::from(max);
            }
            self.windows += 1;
            self.checksum += sum;
        }
    }
}

fn parse_serde(line: &[u8], windows: &mut Windows) -> bool {
    let Ok(line) = serde_json::from_slice::<Line<'_>>(line) else {
        return false;
    };
    let values = [line.f0, line.f1, line.f2, line.f3, line.f4, line.f5, line.f6, line.f7];
    windows.push(&line.device, line.ts, &values);
    true
}

fn skip_ws(bytes: &[u8], mut at: usize) -> usize {
    while at < bytes.len() && bytes[at].is_ascii_whitespace() {
        at += 1;
    }
    at
}

/// A string without escapes starting at the quote at `at`: its bytes and the index after it.
fn string(bytes: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let rest = bytes.get(at + 1..)?;
    let end = rest.iter().position(|&b| b == b'"' || b == b'\\')?;
    (rest[end] == b'"').then(|| (&rest[..end], at + 1 + end + 1))
}

/// The flat-object scanner: `{"key": value, ...}` with string or number values.
fn parse_fast(bytes: &[u8], windows: &mut Windows) -> Option<()> {
    let mut at = skip_ws(bytes, 0);
    if bytes.get(at) != Some(&b'{') {
        return None;
    }
    at += 1;
    let (mut device, mut ts, mut values, mut found) = (None, None, [0.0f32; FEATURES], 0u32);
    loop {
        at = skip_ws(bytes, at);
        match bytes.get(at)? {
            b'}' => break,
            b',' => {
                at += 1;
                continue;
            }
            b'"' => {}
            _ => return None,
        }
        let (key, after) = string(bytes, at)?;
        at = skip_ws(bytes, after);
        if bytes.get(at) != Some(&b':') {
            return None;
        }
        at = skip_ws(bytes, at + 1);
        if bytes.get(at) == Some(&b'"') {
            let (value, after) = string(bytes, at)?;
            if key == b"device" {
                device = Some(std::str::from_utf8(value).ok()?);
            }
            at = after;
            continue;
        }
        let start = at;
        while at < bytes.len() && !matches!(bytes[at], b',' | b'}' | b' ' | b'\t' | b'\r' | b'\n') {
            at += 1;
        }
        let number = std::str::from_utf8(&bytes[start..at]).ok()?;
        if key == b"ts" {
            ts = Some(number.parse::<i64>().ok()?);
        } else if let Some(feature) = NAMES.iter().position(|name| name.as_bytes() == key) {
            values[feature] = number.parse::<f32>().ok()?;
            found |= 1 << feature;
        }
    }
    if found != (1 << FEATURES) - 1 {
        return None;
    }
    windows.push(device?, ts?, &values);
    Some(())
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(parser), Some(path)) = (args.next(), args.next()) else {
        eprintln!("usage: e2e_limit serde|fast FILE");
        std::process::exit(2);
    };
    let fast = match parser.as_str() {
        "serde" => false,
        "fast" => true,
        other => {
            eprintln!("unknown parser {other:?}: serde or fast");
            std::process::exit(2);
        }
    };
    let started = Instant::now();
    let file = File::open(&path).expect("opening the input file");
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut line = Vec::with_capacity(256);
    let mut windows = Windows::new();
    let (mut readings, mut errors) = (0u64, 0u64);
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).expect("reading the input file") == 0 {
            break;
        }
        let bytes = line.strip_suffix(b"\n").unwrap_or(&line);
        if bytes.is_empty() {
            continue;
        }
        let ok = if fast {
            parse_fast(bytes, &mut windows).is_some() || parse_serde(bytes, &mut windows)
        } else {
            parse_serde(bytes, &mut windows)
        };
        if ok {
            readings += 1;
        } else {
            errors += 1;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    if errors > 0 {
        eprintln!("{errors} lines could not be read");
    }
    println!(
        "limit-{parser} readings {readings} windows {} seconds {seconds:.3} readings_per_sec {:.0} checksum {:.6e}",
        windows.windows,
        readings as f64 / seconds,
        windows.checksum,
    );
}
