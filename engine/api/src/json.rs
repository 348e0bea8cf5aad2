//! JSON-lines encoding of batches: one JSON object per record, as the `stdout` and `file`
//! sinks write them.
//!
//! | kind | object |
//! |---|---|
//! | raw | `{"topic","position","arrival_ms","payload"}` (payload as text) |
//! | readings | `{"device","time_ms","label","values":{name: value}}` |
//! | windows | `{"device","start_ms","end_ms","label","steps","times":[..],"values":{name:[..]}}` |
//! | scores | `{"device","start_ms","end_ms","detector","version","score","threshold","anomaly","label","values":{name: value}}` |
//! | events | `{"device","state","time_ms","started_ms","score","peak_score","threshold","detector","version","label","values":{name: value}}` |
//! | catalog updates | `{"diff","row":{"device","site","asset","owner","labels":{..},"threshold","valid_from"}}` (`threshold`, `valid_from` when given) |
//! | errors | `{"component","error_type","reason","time_ms","topic","payload"}` |
//!
//! Floats that are not finite are written as `null`.

use std::io::{self, Write};

use crate::records::{Batch, Labels, Schema};

fn write_str<W: Write>(out: &mut W, text: &str) -> io::Result<()> {
    serde_json::to_writer(&mut *out, text).map_err(io::Error::other)
}

fn write_f32<W: Write>(out: &mut W, value: f32) -> io::Result<()> {
    if value.is_finite() { write!(out, "{value}") } else { out.write_all(b"null") }
}

fn write_named_values<W: Write>(out: &mut W, schema: &Schema, values: &[f32]) -> io::Result<()> {
    out.write_all(b"{")?;
    for (index, (name, value)) in schema.names().iter().zip(values).enumerate() {
        if index > 0 {
            out.write_all(b",")?;
        }
        write_str(out, name)?;
        out.write_all(b":")?;
        write_f32(out, *value)?;
    }
    out.write_all(b"}")
}

/// Writes `,"labels":{...}` when there are labels, nothing otherwise.
fn write_labels<W: Write>(out: &mut W, labels: &Labels) -> io::Result<()> {
    if labels.is_empty() {
        return Ok(());
    }
    out.write_all(b",\"labels\":{")?;
    for (index, (name, value)) in labels.iter().enumerate() {
        if index > 0 {
            out.write_all(b",")?;
        }
        write_str(out, name)?;
        out.write_all(b":")?;
        write_str(out, value)?;
    }
    out.write_all(b"}")
}

/// Writes every record of `batch` as one JSON object per line.
pub fn write_json_lines<W: Write>(batch: &Batch, out: &mut W) -> io::Result<()> {
    match batch {
        Batch::Raw(raw) => {
            for message in raw.iter() {
                out.write_all(b"{\"topic\":")?;
                write_str(out, message.topic)?;
                write!(
                    out,
                    ",\"position\":{},\"arrival_ms\":{},\"payload\":",
                    message.position, message.arrival_ms
                )?;
                write_str(out, &String::from_utf8_lossy(message.payload))?;
                out.write_all(b"}\n")?;
            }
        }
        Batch::Readings(readings) => {
            for reading in readings.iter() {
                out.write_all(b"{\"device\":")?;
                write_str(out, &reading.device.name())?;
                write!(
                    out,
                    ",\"time_ms\":{},\"label\":{},\"values\":",
                    reading.time_ms, reading.label
                )?;
                write_named_values(out, &readings.schema, reading.values)?;
                out.write_all(b"}\n")?;
            }
        }
        Batch::Windows(windows) => {
            for window in windows {
                out.write_all(b"{\"device\":")?;
                write_str(out, &window.device.name())?;
                write!(
                    out,
                    ",\"start_ms\":{},\"end_ms\":{},\"label\":{},\"steps\":{},\"times\":",
                    window.start_ms,
                    window.end_ms,
                    window.label,
                    window.steps()
                )?;
                serde_json::to_writer(&mut *out, &window.times).map_err(io::Error::other)?;
                out.write_all(b",\"values\":{")?;
                for (column, name) in window.schema.names().iter().enumerate() {
                    if column > 0 {
                        out.write_all(b",")?;
                    }
                    write_str(out, name)?;
                    out.write_all(b":[")?;
                    for (step, value) in window.feature(column).enumerate() {
                        if step > 0 {
                            out.write_all(b",")?;
                        }
                        write_f32(out, value)?;
                    }
                    out.write_all(b"]")?;
                }
                out.write_all(b"}}\n")?;
            }
        }
        Batch::Scores(scores) => {
            for score in scores {
                out.write_all(b"{\"device\":")?;
                write_str(out, &score.device.name())?;
                write!(
                    out,
                    ",\"start_ms\":{},\"end_ms\":{},\"detector\":",
                    score.start_ms, score.end_ms
                )?;
                write_str(out, &score.detector)?;
                out.write_all(b",\"version\":")?;
                write_str(out, &score.version)?;
                out.write_all(b",\"score\":")?;
                write_f32(out, score.score)?;
                out.write_all(b",\"threshold\":")?;
                match score.threshold {
                    Some(threshold) => write_f32(out, threshold)?,
                    None => out.write_all(b"null")?,
                }
                write!(
                    out,
                    ",\"anomaly\":{},\"label\":{},\"values\":",
                    score.anomaly, score.label
                )?;
                write_named_values(out, &score.columns, &score.values)?;
                write_labels(out, &score.labels)?;
                out.write_all(b"}\n")?;
            }
        }
        Batch::Events(events) => {
            for event in events {
                out.write_all(b"{\"device\":")?;
                write_str(out, &event.device.name())?;
                write!(
                    out,
                    ",\"state\":\"{}\",\"time_ms\":{},\"started_ms\":{},\"score\":",
                    event.state.name(),
                    event.time_ms,
                    event.started_ms
                )?;
                write_f32(out, event.score)?;
                out.write_all(b",\"peak_score\":")?;
                write_f32(out, event.peak_score)?;
                out.write_all(b",\"threshold\":")?;
                match event.threshold {
                    Some(threshold) => write_f32(out, threshold)?,
                    None => out.write_all(b"null")?,
                }
                out.write_all(b",\"detector\":")?;
                write_str(out, &event.detector)?;
                out.write_all(b",\"version\":")?;
                write_str(out, &event.version)?;
                write!(out, ",\"label\":{},\"values\":", event.label)?;
                write_named_values(out, &event.columns, &event.values)?;
                write_labels(out, &event.labels)?;
                out.write_all(b"}\n")?;
            }
        }
        Batch::Catalog(updates) => {
            for update in updates {
                serde_json::to_writer(&mut *out, update).map_err(io::Error::other)?;
                out.write_all(b"\n")?;
            }
        }
        Batch::Errors(errors) => {
            for error in errors {
                serde_json::to_writer(&mut *out, error).map_err(io::Error::other)?;
                out.write_all(b"\n")?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::records::{DeviceId, ReadingBatch};

    #[test]
    fn readings_are_one_object_per_line_with_null_for_nan() {
        let mut batch = ReadingBatch::new(Arc::new(Schema::new(["a", "b"])));
        batch.push(DeviceId::intern("dev \"q\""), 7, &[1.5, f32::NAN], 1);
        let mut out = Vec::new();
        write_json_lines(&Batch::Readings(batch), &mut out).expect("write");
        let text = String::from_utf8(out).expect("utf8");
        let value: serde_json::Value = serde_json::from_str(text.trim()).expect("valid json");
        assert_eq!(value["device"], "dev \"q\"");
        assert_eq!(value["time_ms"], 7);
        assert_eq!(value["values"]["a"], 1.5);
        assert!(value["values"]["b"].is_null());
    }
}
