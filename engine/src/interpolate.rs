//! `${VAR}` and `${VAR:-default}` environment interpolation in pipeline files.
//!
//! Interpolation happens on the file's text before TOML parsing (so it works in any value),
//! line by line: a substituted value never adds lines, so line numbers in later diagnostics
//! stay true. `$$` writes a literal `$`.

use std::ops::Range;

/// An unset variable without default, or an unterminated `${`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InterpolationError {
    pub(crate) span: Range<usize>,
    pub(crate) message: String,
    pub(crate) hint: Option<String>,
}

/// Substitutes variables using `lookup`; returns the new text and every error.
pub(crate) fn interpolate(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> (String, Vec<InterpolationError>) {
    let mut out = String::with_capacity(text.len());
    let mut errors = Vec::new();
    let bytes = text.as_bytes();
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'$' && bytes.get(index + 1) == Some(&b'$') {
            out.push('$');
            index += 2;
            continue;
        }
        if bytes[index] == b'$' && bytes.get(index + 1) == Some(&b'{') {
            let start = index;
            let close = text[index + 2..].find(['}', '\n']).map(|offset| index + 2 + offset);
            match close {
                Some(end) if bytes[end] == b'}' => {
                    let inner = &text[index + 2..end];
                    let (name, default) = match inner.split_once(":-") {
                        Some((name, default)) => (name, Some(default)),
                        None => (inner, None),
                    };
                    let valid = !name.is_empty()
                        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                        && !name.starts_with(|c: char| c.is_ascii_digit());
                    if !valid {
                        errors.push(InterpolationError {
                            span: start..end + 1,
                            message: format!("invalid environment variable name `{name}`"),
                            hint: Some(
                                "names are letters, digits and `_`; write `$$` for a literal `$`"
                                    .into(),
                            ),
                        });
                    } else {
                        match (lookup(name), default) {
                            (Some(value), _) => out.push_str(&value.replace('\n', " ")),
                            (None, Some(default)) => out.push_str(default),
                            (None, None) => errors.push(InterpolationError {
                                span: start..end + 1,
                                message: format!("environment variable `{name}` is not set"),
                                hint: Some(format!(
                                    "set it, or give a default: `${{{name}:-value}}`"
                                )),
                            }),
                        }
                    }
                    index = end + 1;
                }
                _ => {
                    errors.push(InterpolationError {
                        span: start..start + 2,
                        message: "unterminated `${`".into(),
                        hint: Some(
                            "close it with `}` on the same line, or write `$$` for a literal `$`"
                                .into(),
                        ),
                    });
                    out.push_str("${");
                    index += 2;
                }
            }
            continue;
        }
        let next = text[index..].chars().next().map(char::len_utf8).unwrap_or(1);
        out.push_str(&text[index..index + next]);
        index += next;
    }
    (out, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "URL").then(|| "mqtt://h:1883".to_owned())
    }

    #[test]
    fn substitutes_defaults_and_escapes() {
        let (text, errors) =
            interpolate("a = \"${URL}\"\nb = \"${PORT:-9898}\"\nc = \"$$x é\"", env);
        assert!(errors.is_empty());
        assert_eq!(text, "a = \"mqtt://h:1883\"\nb = \"9898\"\nc = \"$x é\"");
    }

    #[test]
    fn reports_unset_and_unterminated() {
        let (_, errors) = interpolate("a = \"${MISSING}\"\nb = \"${OPEN\"\n", env);
        assert_eq!(errors.len(), 2);
        assert_eq!(errors[0].span, 5..15);
        assert!(errors[0].message.contains("MISSING"));
        assert!(errors[1].message.contains("unterminated"));
    }
}
