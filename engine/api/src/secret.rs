//! [`Secret`]: a configuration value that must never be shown.

use std::fmt;

use serde::Deserialize;

/// A password, token or key from a pipeline file (usually `${VAR}` from the environment).
///
/// Its `Debug` prints `Secret("***")`, so a configuration that holds one can be logged or
/// shown in an error without giving it away; [`Secret::expose`] is the one way to the value,
/// for the code that hands it to a client library.
///
/// ```
/// use tidewatch_api::Secret;
///
/// let password = Secret::from("hunter2");
/// assert_eq!(format!("{password:?}"), "Secret(\"***\")");
/// assert_eq!(password.expose(), "hunter2");
/// ```
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The value itself: only for handing it to what authenticates with it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the value is empty (an unset `${VAR:-}`), which options read as "none".
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Secret").field(&"***").finish()
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Secret {
        Secret(value.to_owned())
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret(value)
    }
}
