//! Dead-letter files: what a sink could not deliver, one JSON line each, flushed at once (dead
//! letters are rare and must survive a crash that follows), counted by reason. The webhook
//! and Kafka sinks write them.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::PoisonError;

use prometheus::IntCounterVec;
use serde_json::{Map, Value};
use tidewatch_api::time::format_rfc3339;
use tidewatch_api::{ComponentError, ProcessShared};

use crate::sinks::{SharedWriter, shared_writer};

/// A dead-letter file shared by the workers of a process (appended to), and the counter of
/// its lines by `reason`.
#[derive(Debug)]
pub(crate) struct DeadLetterFile {
    path: PathBuf,
    writer: SharedWriter,
    component: String,
    counter: IntCounterVec,
}

impl DeadLetterFile {
    /// Opens `path` for appending, for component `component`; `counter` has a `reason` label.
    pub(crate) fn open(
        shared: &ProcessShared,
        path: PathBuf,
        component: &str,
        counter: IntCounterVec,
    ) -> Result<DeadLetterFile, ComponentError> {
        let writer = shared_writer(shared, &path, true).map_err(|error| {
            ComponentError::io(
                format!("cannot open the dead-letter file {}", path.display()),
                error,
            )
        })?;
        Ok(DeadLetterFile { path, writer, component: component.to_owned(), counter })
    }

    /// Appends one line: `time`, `component` and `reason`, then `fields` (a JSON object), and
    /// counts it under `reason`. A failure to write is logged with `what` (the record is lost).
    pub(crate) fn write(&self, reason: &str, fields: Value, what: &str) {
        let mut line = Map::new();
        line.insert("time".into(), format_rfc3339(tidewatch_api::records::now_ms()).into());
        line.insert("component".into(), self.component.clone().into());
        line.insert("reason".into(), reason.into());
        if let Value::Object(fields) = fields {
            line.extend(fields);
        }
        let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let written = serde_json::to_writer(&mut *writer, &line)
            .map_err(std::io::Error::from)
            .and_then(|()| writer.write_all(b"\n"))
            .and_then(|()| writer.flush());
        self.counter.with_label_values(&[reason]).inc();
        if let Err(error) = written {
            tracing::error!(path = %self.path.display(), %error, what, "cannot write a dead letter; the record is lost");
        }
    }

    /// The component the file belongs to.
    #[cfg(feature = "kafka")]
    pub(crate) fn component(&self) -> &str {
        &self.component
    }
}
