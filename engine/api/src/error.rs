//! Typed errors of components at run time.

/// An error a component reports at run time (at open, or while processing).
///
/// Errors about single records do not use this: they become [`crate::ErrorRecord`]s on the
/// component's `<id>.errors` output and the pipeline goes on.
#[derive(Debug, thiserror::Error)]
pub enum ComponentError {
    /// Reading or writing a file or socket failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path or address.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The options are valid TOML but cannot work (a missing file, a bad combination).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An external system (broker, server) refused or failed.
    #[error("external system: {0}")]
    External(String),
    /// A bug or broken invariant inside the component.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ComponentError {
    /// An I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> ComponentError {
        ComponentError::Io { context: context.into(), source }
    }

    /// True when retrying later may succeed (external systems, I/O).
    pub fn is_retryable(&self) -> bool {
        matches!(self, ComponentError::Io { .. } | ComponentError::External(_))
    }
}
