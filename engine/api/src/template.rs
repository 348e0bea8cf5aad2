//! Text templates with `{field}` placeholders: topics of the `mqtt` sink, bodies of the
//! `webhook` sink, commands of a feedback loop.
//!
//! A template is parsed once, against the fields its user offers, so an unknown field is a
//! configuration error (with the list of known ones) and rendering is a walk over literal and
//! field parts. Only `{name}` is a placeholder; other braces are literal (`{{` escapes one).
//!
//! ```
//! use tidewatch_api::template::{Escape, Template};
//!
//! let template = Template::parse("devices/{device}/commands", &["device"]).expect("valid");
//! let mut topic = String::new();
//! template.render(&mut topic, Escape::None, |_field, out| out.push_str("pump-1"));
//! assert_eq!(topic, "devices/pump-1/commands");
//! assert!(Template::parse("{site}", &["device"]).is_err());
//! ```

use std::fmt::Write as _;

use thiserror::Error;

use crate::records::{AnomalyEvent, AnomalyState};
use crate::time::format_rfc3339;

/// Why a template text is not valid.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum TemplateError {
    /// `{name}` names no known field.
    #[error("unknown field {{{name}}} in the template; known fields: {known}")]
    UnknownField {
        /// The unknown name.
        name: String,
        /// The known fields, comma separated, in braces.
        known: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    /// Index into the fields the template was parsed against.
    Field(usize),
}

/// How rendered field values are escaped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Escape {
    /// As they are.
    None,
    /// As the inside of a JSON string (quotes, backslashes and control characters escaped),
    /// for templates of JSON documents: write `"{device}"` in the template.
    Json,
}

/// A parsed template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

/// A piece of a text with `{name}` placeholders, as [`pieces`] finds them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Piece<'a> {
    /// Literal text (`{{` stands for the text `{`).
    Text(&'a str),
    /// A placeholder's name.
    Name(&'a str),
    /// A brace that opens or closes no placeholder.
    Brace(char),
}

/// Whether `name` can be a placeholder's name: ASCII letters, digits, `_` and `-`.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-')
}

/// Splits `text` into literal text, `{name}` placeholders and stray braces: the one scanner of
/// `{name}` syntax, for rendered templates (stray braces are literal) and topic templates
/// (stray braces are errors).
pub(crate) fn pieces(text: &str) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(['{', '}']) {
        if at > 0 {
            out.push(Piece::Text(&rest[..at]));
        }
        let after = &rest[at + 1..];
        if rest.as_bytes().get(at) == Some(&b'}') {
            out.push(Piece::Brace('}'));
            rest = after;
            continue;
        }
        if let Some(escaped) = after.strip_prefix('{') {
            out.push(Piece::Text("{"));
            rest = escaped;
            continue;
        }
        match after.find('}') {
            Some(close) if valid_name(&after[..close]) => {
                out.push(Piece::Name(&after[..close]));
                rest = &after[close + 1..];
            }
            _ => {
                out.push(Piece::Brace('{'));
                rest = after;
            }
        }
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest));
    }
    out
}

impl Template {
    /// Parses `text`, whose placeholders must be among `fields`.
    ///
    /// A placeholder is `{name}` with `name` made of ASCII letters, digits, `_` and `-`; every
    /// other brace is literal, so JSON bodies need no escaping (`{"device": "{device}"}`). `{{`
    /// stands for a literal `{`, to write a literal `{name}`.
    pub fn parse(text: &str, fields: &[&str]) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        for piece in pieces(text) {
            let name = match piece {
                Piece::Text(text) => {
                    literal.push_str(text);
                    continue;
                }
                Piece::Brace(brace) => {
                    literal.push(brace);
                    continue;
                }
                Piece::Name(name) => name,
            };
            let Some(index) = fields.iter().position(|field| *field == name) else {
                let known: Vec<String> =
                    fields.iter().map(|field| format!("{{{field}}}")).collect();
                return Err(TemplateError::UnknownField {
                    name: name.to_owned(),
                    known: known.join(", "),
                });
            };
            if !literal.is_empty() {
                parts.push(Part::Literal(std::mem::take(&mut literal)));
            }
            parts.push(Part::Field(index));
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Template { parts })
    }

    /// The template has no placeholder: every rendering is the same text.
    pub fn is_constant(&self) -> bool {
        self.parts.iter().all(|part| matches!(part, Part::Literal(_)))
    }

    /// Appends the rendering to `out`; `value(index, out)` appends the value of field `index`
    /// (its position in the `fields` given to [`Template::parse`]).
    pub fn render(
        &self,
        out: &mut String,
        escape: Escape,
        mut value: impl FnMut(usize, &mut String),
    ) {
        let mut scratch = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Field(index) if escape == Escape::None => value(*index, out),
                Part::Field(index) => {
                    scratch.clear();
                    value(*index, &mut scratch);
                    escape_json(&scratch, out);
                }
            }
        }
    }
}

/// Appends `text` escaped as the inside of a JSON string (serde_json's escaping).
fn escape_json(text: &str, out: &mut String) {
    // Serializing a string cannot fail.
    let quoted = serde_json::to_string(text).unwrap_or_default();
    let inner = quoted.strip_prefix('"').and_then(|rest| rest.strip_suffix('"'));
    out.push_str(inner.unwrap_or_default());
}

/// The fields of an anomaly event a template can use, in the order [`write_event_field`]
/// numbers them.
///
/// | field | value |
/// |---|---|
/// | `device` | device id |
/// | `state` | `open` or `close` |
/// | `status` | `firing` (open) or `resolved` (close), as in Alertmanager |
/// | `time` / `time_ms` | event time of the decision, RFC 3339 / ms since the epoch |
/// | `started` / `started_ms` | when the anomaly opened, RFC 3339 / ms |
/// | `score`, `peak_score` | score of the deciding window, highest score while open |
/// | `threshold` | the detector's threshold (empty when it has none) |
/// | `detector`, `version` | detector name and model version |
/// | `top_feature` | the column with the largest detail value (the sensor that explains it) |
pub const EVENT_FIELDS: &[&str] = &[
    "device",
    "state",
    "status",
    "time",
    "time_ms",
    "started",
    "started_ms",
    "score",
    "peak_score",
    "threshold",
    "detector",
    "version",
    "top_feature",
];

/// The column with the largest detail value of an event (which sensor explains it), if any.
pub fn top_feature(event: &AnomalyEvent) -> Option<&str> {
    let (index, _) = event
        .values
        .iter()
        .enumerate()
        .filter(|(_, value)| value.is_finite())
        .max_by(|a, b| a.1.total_cmp(b.1))?;
    event.columns.names().get(index).map(|name| name.as_ref())
}

/// Appends the value of [`EVENT_FIELDS`]`[index]` of `event` to `out`; indexes past the list
/// append nothing.
pub fn write_event_field(event: &AnomalyEvent, index: usize, out: &mut String) {
    let _ = match EVENT_FIELDS.get(index).copied() {
        Some("device") => write!(out, "{}", event.device.name()),
        Some("state") => write!(out, "{}", event.state.name()),
        Some("status") => write!(out, "{}", alert_status(event.state)),
        Some("time") => write!(out, "{}", format_rfc3339(event.time_ms)),
        Some("time_ms") => write!(out, "{}", event.time_ms),
        Some("started") => write!(out, "{}", format_rfc3339(event.started_ms)),
        Some("started_ms") => write!(out, "{}", event.started_ms),
        Some("score") => write!(out, "{}", event.score),
        Some("peak_score") => write!(out, "{}", event.peak_score),
        Some("threshold") => match event.threshold {
            Some(threshold) => write!(out, "{threshold}"),
            None => Ok(()),
        },
        Some("detector") => write!(out, "{}", event.detector),
        Some("version") => write!(out, "{}", event.version),
        Some("top_feature") => write!(out, "{}", top_feature(event).unwrap_or_default()),
        _ => Ok(()),
    };
}

/// `firing` for an open event, `resolved` for a close event (Alertmanager's words).
pub fn alert_status(state: AnomalyState) -> &'static str {
    match state {
        AnomalyState::Open => "firing",
        AnomalyState::Close => "resolved",
    }
}

/// An anomaly event to try templates on, at validation.
pub fn sample_event() -> AnomalyEvent {
    AnomalyEvent {
        device: crate::records::DeviceId::intern("sample-device"),
        state: AnomalyState::Open,
        time_ms: 1_700_000_000_000,
        started_ms: 1_700_000_000_000,
        score: 1.5,
        peak_score: 1.5,
        threshold: Some(1.0),
        detector: "detector".into(),
        version: "1".into(),
        label: 0,
        columns: std::sync::Arc::new(crate::records::Schema::new(["feature"])),
        values: vec![1.5],
        labels: Default::default(),
    }
}

/// What to tell the author of a JSON template that does not render JSON.
pub const JSON_TEMPLATE_HINT: &str = "put text fields in quotes (\"{device}\", \"{state}\", \
     \"{started}\"); numbers ({score}, {time_ms}) go without";

/// Checks that a template's rendering of [`sample_event`] is one JSON document; the reason
/// (with the rendering) when it is not.
pub fn check_renders_json(rendered: &[u8]) -> Result<(), String> {
    match serde_json::from_slice::<serde_json::Value>(rendered) {
        Ok(_) => Ok(()),
        Err(error) => Err(format!(
            "the template does not render valid JSON ({error}): {}",
            String::from_utf8_lossy(rendered)
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::records::{DeviceId, Schema};

    fn render(text: &str, escape: Escape) -> Result<String, TemplateError> {
        let template = Template::parse(text, &["a", "b"])?;
        let mut out = String::new();
        template.render(&mut out, escape, |index, out| {
            out.push_str(if index == 0 { "x\"y" } else { "Z" })
        });
        Ok(out)
    }

    #[test]
    fn placeholders_literals_and_escapes() {
        assert_eq!(render("{a}-{b}/{ b }", Escape::None), Ok("x\"y-Z/{ b }".to_owned()));
        assert_eq!(
            render("{\"v\": \"{a}\", \"w\": {\"n\": 1}}", Escape::Json),
            Ok("{\"v\": \"x\\\"y\", \"w\": {\"n\": 1}}".to_owned())
        );
        assert_eq!(render("plain {{a} {", Escape::None), Ok("plain {a} {".to_owned()));
        let mut escaped = String::new();
        escape_json("a\\b\n\t\u{1}é\"", &mut escaped);
        assert_eq!(escaped, "a\\\\b\\n\\t\\u0001é\\\"");
        assert_eq!(render("ünï{b}ç}", Escape::None), Ok("ünïZç}".to_owned()));
        assert!(Template::parse("plain", &[]).is_ok_and(|template| template.is_constant()));
        assert!(Template::parse("{a}", &["a"]).is_ok_and(|template| !template.is_constant()));
    }

    #[test]
    fn unknown_fields_say_which_are_known() {
        let Err(error) = render("x{c}", Escape::None) else { panic!("unknown field accepted") };
        assert_eq!(error.to_string(), "unknown field {c} in the template; known fields: {a}, {b}");
    }

    #[test]
    fn every_event_field_renders() {
        let event = AnomalyEvent {
            device: DeviceId::intern("pump \"7\""),
            state: AnomalyState::Close,
            time_ms: 1_700_000_001_000,
            started_ms: 1_700_000_000_000,
            score: 2.5,
            peak_score: 4.0,
            threshold: Some(1.0),
            detector: Arc::from("ae"),
            version: Arc::from("3"),
            label: 0,
            columns: Arc::new(Schema::new(["flow", "pressure"])),
            values: vec![0.1, 0.7],
            labels: Default::default(),
        };
        let text: String =
            EVENT_FIELDS.iter().map(|field| format!("{field}={{{field}}};")).collect();
        let template = Template::parse(&text, EVENT_FIELDS).expect("every field is known");
        let mut out = String::new();
        template.render(&mut out, Escape::Json, |index, out| write_event_field(&event, index, out));
        assert_eq!(
            out,
            "device=pump \\\"7\\\";state=close;status=resolved;time=2023-11-14T22:13:21.000Z;\
             time_ms=1700000001000;started=2023-11-14T22:13:20.000Z;started_ms=1700000000000;\
             score=2.5;peak_score=4;threshold=1;detector=ae;version=3;top_feature=pressure;"
        );
    }
}
