//! Topic templates: the one grammar for reading values out of a message's topic (MQTT topic,
//! Kafka topic or file name), used by `topic_template` and `device_from_topic`.
//!
//! A template is the topic split at `/`, each segment literal text, one named capture with
//! optional literal text around it, `+` (any one level) or, last, `#` (any remaining levels):
//! `factory/{site}/pump/{device}/telemetry`, `valve1/{device}.csv`, `factory/+/pump/{device}/#`.
//! A topic matches when its levels match the segments in order (as many, unless the template
//! ends with `#`), every literal segment is equal, and every capture takes at least one
//! character.

use std::ops::Range;

use crate::factory::ConfigError;
use crate::template::{self, Piece as Scanned};

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(Box<str>),
    Capture {
        prefix: Box<str>,
        suffix: Box<str>,
        slot: usize,
    },
    /// `+`: any one level.
    Any,
    /// `#`, last: any remaining levels (none included).
    Rest,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Literal(Box<str>),
    Slot(usize),
}

/// A parsed `topic_template`, with the `device_from_topic` pattern when there is one.
#[derive(Clone, Debug)]
pub struct TopicTemplate {
    text: Box<str>,
    segments: Vec<Segment>,
    names: Vec<Box<str>>,
    device: Option<Vec<Piece>>,
}

/// Splits `text` into literal pieces (`Ok`) and `{name}` captures (`Err`); `Err` names the
/// problem. The `{name}` syntax is the one of [`crate::template`].
fn pieces(text: &str) -> Result<Vec<Result<&str, &str>>, String> {
    template::pieces(text)
        .into_iter()
        .map(|piece| match piece {
            Scanned::Text(text) => Ok(Ok(text)),
            Scanned::Name(name) => Ok(Err(name)),
            Scanned::Brace('}') => Err("a `}` without its `{`".to_owned()),
            Scanned::Brace(_) => {
                Err("a `{` that opens no capture (`{name}`: letters, digits, `_` and `-`)"
                    .to_owned())
            }
        })
        .collect()
}

impl TopicTemplate {
    /// Parses `template` and, if given, the `device_from_topic` option: a capture name
    /// (`"device"`) or a pattern of captures and text (`"{site}-{device}"`).
    pub fn parse(
        template: &str,
        device_from_topic: Option<&str>,
    ) -> Result<TopicTemplate, ConfigError> {
        let bad = |message: String| {
            ConfigError::at_field("topic_template", message).with_hint(
                "write the topic with `{name}` for each varying segment, e.g. \
                 \"factory/{site}/pump/{device}/telemetry\"",
            )
        };
        if template.is_empty() {
            return Err(bad("`topic_template` is empty".to_owned()));
        }
        let mut names: Vec<Box<str>> = Vec::new();
        let mut segments = Vec::new();
        let levels = template.split('/').count();
        for (index, segment) in template.split('/').enumerate() {
            match segment {
                "+" => {
                    segments.push(Segment::Any);
                    continue;
                }
                "#" if index + 1 == levels => {
                    segments.push(Segment::Rest);
                    continue;
                }
                "#" => {
                    return Err(bad(format!(
                        "`topic_template` {template:?}: `#` must be the last level"
                    )));
                }
                _ if segment.contains(['+', '#']) => {
                    return Err(bad(format!(
                        "`topic_template` {template:?}: `+` and `#` must be whole levels"
                    )));
                }
                _ => {}
            }
            let parts = pieces(segment)
                .map_err(|problem| bad(format!("`topic_template` {template:?}: {problem}")))?;
            let captures = parts.iter().filter(|part| part.is_err()).count();
            if captures > 1 {
                return Err(bad(format!(
                    "`topic_template` segment {segment:?} has {captures} captures; \
                     at most one per segment"
                )));
            }
            let parsed = match parts.iter().position(Result::is_err) {
                None => Segment::Literal(segment.into()),
                Some(position) => {
                    let name = parts[position].err().unwrap_or_default();
                    if names.iter().any(|known| &**known == name) {
                        return Err(bad(format!("`topic_template` names `{{{name}}}` twice")));
                    }
                    names.push(name.into());
                    let join = |parts: &[Result<&str, &str>]| -> Box<str> {
                        parts.iter().filter_map(|part| part.ok()).collect::<String>().into()
                    };
                    Segment::Capture {
                        prefix: join(&parts[..position]),
                        suffix: join(&parts[position + 1..]),
                        slot: names.len() - 1,
                    }
                }
            };
            segments.push(parsed);
        }
        let device = match device_from_topic {
            None => None,
            Some(pattern) => Some(Self::device_pattern(pattern, &names)?),
        };
        Ok(TopicTemplate { text: template.into(), segments, names, device })
    }

    fn device_pattern(pattern: &str, names: &[Box<str>]) -> Result<Vec<Piece>, ConfigError> {
        let hint = || {
            format!(
                "name one of the template's captures ({}), or combine them as \"{{site}}-{{device}}\"",
                names.iter().map(|name| format!("`{name}`")).collect::<Vec<_>>().join(", ")
            )
        };
        let slot = |name: &str| {
            names.iter().position(|known| &**known == name).ok_or_else(|| {
                ConfigError::at_field(
                    "device_from_topic",
                    format!("`topic_template` has no capture `{{{name}}}`"),
                )
                .with_hint(hint())
            })
        };
        if !pattern.contains(['{', '}']) {
            return Ok(vec![Piece::Slot(slot(pattern)?)]);
        }
        let parts = pieces(pattern).map_err(|problem| {
            ConfigError::at_field("device_from_topic", format!("`device_from_topic`: {problem}"))
                .with_hint(hint())
        })?;
        parts
            .into_iter()
            .map(|part| match part {
                Ok(text) => Ok(Piece::Literal(text.into())),
                Err(name) => slot(name).map(Piece::Slot),
            })
            .collect()
    }

    /// The template as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The capture names, in order.
    pub fn names(&self) -> &[Box<str>] {
        &self.names
    }

    /// Matches `topic`, leaving the byte range of each capture in `captures`; false when the
    /// topic does not match.
    pub fn matches(&self, topic: &str, captures: &mut Vec<Range<usize>>) -> bool {
        captures.clear();
        captures.resize(self.names.len(), 0..0);
        let mut start = 0;
        let mut parts = topic.split('/');
        for segment in &self.segments {
            if *segment == Segment::Rest {
                return true;
            }
            let Some(part) = parts.next() else { return false };
            let part_start = start;
            start += part.len() + 1;
            match segment {
                Segment::Literal(text) => {
                    if part != &**text {
                        return false;
                    }
                }
                Segment::Any | Segment::Rest => {}
                Segment::Capture { prefix, suffix, slot } => {
                    // Empty affixes (the usual case) are not compared: a zero-length
                    // comparison still calls `bcmp`, which costs more than the whole match.
                    let bytes = part.as_bytes();
                    if bytes.len() <= prefix.len() + suffix.len()
                        || (!prefix.is_empty() && !bytes.starts_with(prefix.as_bytes()))
                        || (!suffix.is_empty() && !bytes.ends_with(suffix.as_bytes()))
                    {
                        return false;
                    }
                    if let Some(capture) = captures.get_mut(*slot) {
                        *capture =
                            part_start + prefix.len()..part_start + part.len() - suffix.len();
                    }
                }
            }
        }
        parts.next().is_none()
    }

    /// The device id of a matched topic: the one capture, borrowed, or the pattern written
    /// into `buffer`. `None` without `device_from_topic`.
    pub fn device<'a>(
        &self,
        topic: &'a str,
        captures: &[Range<usize>],
        buffer: &'a mut String,
    ) -> Option<&'a str> {
        let pieces = self.device.as_ref()?;
        let capture = |slot: usize| {
            captures.get(slot).and_then(|range| topic.get(range.clone())).unwrap_or_default()
        };
        if let [Piece::Slot(slot)] = pieces.as_slice() {
            return Some(capture(*slot));
        }
        buffer.clear();
        for piece in pieces {
            match piece {
                Piece::Literal(text) => buffer.push_str(text),
                Piece::Slot(slot) => buffer.push_str(capture(*slot)),
            }
        }
        Some(buffer.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(template: &TopicTemplate, topic: &str) -> Option<String> {
        let mut captures = Vec::new();
        let mut buffer = String::new();
        if !template.matches(topic, &mut captures) {
            return None;
        }
        template.device(topic, &captures, &mut buffer).map(str::to_owned)
    }

    #[test]
    fn segments_match_and_capture() {
        let template =
            TopicTemplate::parse("factory/{site}/pump/{device}/telemetry", Some("device"))
                .expect("template");
        assert_eq!(template.names().len(), 2);
        assert_eq!(device(&template, "factory/north/pump/p-7/telemetry").as_deref(), Some("p-7"));
        for topic in [
            "factory/north/pump/p-7",
            "factory/north/pump/p-7/telemetry/extra",
            "factory/north/valve/p-7/telemetry",
            "factory//pump/p-7/telemetry",
            "factory/north/pump//telemetry",
            "",
            "/factory/north/pump/p-7/telemetry",
        ] {
            assert_eq!(device(&template, topic), None, "{topic}");
        }
    }

    #[test]
    fn captures_with_text_around_and_composed_devices() {
        let template = TopicTemplate::parse("data/{site}/{device}.csv", Some("{site}:{device}"))
            .expect("template");
        assert_eq!(device(&template, "data/north/pump-1.csv").as_deref(), Some("north:pump-1"));
        assert_eq!(device(&template, "data/north/.csv"), None);
        assert_eq!(device(&template, "data/north/pump-1.json"), None);

        let wildcards =
            TopicTemplate::parse("factory/+/pump/{device}/#", Some("device")).expect("template");
        assert_eq!(device(&wildcards, "factory/north/pump/p-1/telemetry").as_deref(), Some("p-1"));
        assert_eq!(device(&wildcards, "factory//pump/p-1/a/b/c").as_deref(), Some("p-1"));
        assert_eq!(device(&wildcards, "factory/north/pump/p-1").as_deref(), Some("p-1"));
        assert_eq!(device(&wildcards, "factory/north/pump"), None);
        assert_eq!(device(&wildcards, "factory/north/valve/p-1/x"), None);

        let no_device = TopicTemplate::parse("a/{x}", None).expect("template");
        assert_eq!(device(&no_device, "a/b"), None);
        assert!(no_device.matches("a/b", &mut Vec::new()));
    }

    #[test]
    fn bad_templates_are_rejected() {
        for (template, device, field) in [
            ("", None, "topic_template"),
            ("factory/#/pump", None, "topic_template"),
            ("factory/pump+", None, "topic_template"),
            ("factory/{x}#", None, "topic_template"),
            ("a/{x}{y}", None, "topic_template"),
            ("a/{x}/{x}", None, "topic_template"),
            ("a/{x", None, "topic_template"),
            ("a/x}", None, "topic_template"),
            ("a/{}", None, "topic_template"),
            ("a/{x y}", None, "topic_template"),
            ("a/{x}", Some("y"), "device_from_topic"),
            ("a/{x}", Some("{x}-{y}"), "device_from_topic"),
            ("a/{x}", Some("{x"), "device_from_topic"),
        ] {
            let error = TopicTemplate::parse(template, device).expect_err(template);
            assert_eq!(error.field.as_deref(), Some(field), "{template}: {error:?}");
        }
    }
}
