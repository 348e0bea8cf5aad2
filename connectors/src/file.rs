//! The `file` source: replays a file of records, one per line (CSV, JSON lines, any text), as
//! fast as possible or paced by its timestamps.
//!
//! The file is streamed line by line (never loaded whole). Empty lines are skipped and a
//! trailing `\r` is stripped, so files with CRLF line ends (SKAB's) read as they are. Each
//! line becomes one raw message: its payload is the line's bytes, its topic the `path` option
//! as written, its position the 1-based line number in the file. The source does not decode
//! lines: with `header` (CSV files), it passes the first non-empty line along unparsed as the
//! batches' [`RawBatch::header`], and `normalize` (the codec) reads the column names from it.
//! Only worker 0 reads; the other workers finish at once.
//!
//! **Checkpoints.** Worker 0's instance snapshots its position: the file's path, the byte
//! offset and the line number after the last line emitted (a line read but held back by
//! `speed` is not emitted yet: it is read again), and a hash of the file's first bytes (up to
//! 64 KiB, and not past the offset). A restore seeks there: a restarted pipeline goes on with
//! the next line, line numbers (the messages' positions) going on too, and reads what was
//! appended since. Pacing starts afresh from the first line after the position. When the file
//! is now shorter than the offset, or its first bytes differ (it was replaced), or the
//! checkpoint was taken on another `path`, a warning is logged and the file is read from its
//! start. The other workers' instances snapshot nothing and ignore what they are given; when
//! several positions are restored into one instance, the furthest wins.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tidewatch_api::codec::{Decoder, DecoderOptions, Delimiter, PayloadCodec};
use tidewatch_api::records::now_ms;
use tidewatch_api::{
    Batch, ComponentContext, ComponentError, ConfigError, EventTime, Kind, Outputs, PortType,
    RawBatch, Source, SourceFactory, SourcePoll, TimestampFormat, ValidateContext,
};

/// The longest line the source reads; longer lines are skipped and reported on `<id>.errors`.
pub const MAX_LINE_BYTES: usize = 8 * 1024 * 1024;

/// How many of a file's first bytes a checkpoint's hash covers (to notice a replaced file).
const HEAD_BYTES: usize = 64 * 1024;

/// How the lines of a file are encoded (deprecated on the source: it only chooses the default
/// of `header`; the encoding is `normalize`'s `format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    /// Delimited text with a header line.
    Csv,
    /// One JSON object per line (JSON lines).
    Json,
}

fn default_batch_size() -> usize {
    1_024
}

/// Options of the `file` source.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSourceConfig {
    /// The file to read; a relative path resolves against the pipeline file's folder.
    pub path: String,
    /// The first non-empty line names the fields of the others (a CSV header): it is passed
    /// along to the codec instead of being emitted. Default: true for `.csv`, `.tsv` and
    /// `.txt` files, false otherwise.
    #[serde(default)]
    pub header: Option<bool>,
    /// Deprecated: the file's encoding now belongs to `normalize` (`format`); here it only
    /// sets the default of `header` (true for `csv`).
    #[serde(default)]
    pub format: Option<FileFormat>,
    /// Replay speed relative to the recorded event time: 0 = as fast as possible, 1 = the
    /// recorded speed, 10 = ten times faster. Needs `timestamp_field`.
    #[serde(default)]
    pub speed: f64,
    /// Pacing: the column (CSV) or field (JSON, a name or pointer) holding each line's event
    /// time, read through the codec.
    #[serde(default)]
    pub timestamp_field: Option<String>,
    /// How `timestamp_field` is written: `auto`, `unix_ms`, `unix_s`, `unix_us`, `unix_ns`,
    /// `rfc3339` or `datetime`.
    #[serde(default)]
    pub timestamp_format: TimestampFormat,
    /// Pacing of CSV files: the delimiter (default: sniffed from the header line).
    #[serde(default)]
    pub delimiter: Option<Delimiter>,
    /// Most lines emitted per poll (the batch size).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Deal the batches read out to every worker of the process for decoding (by a
    /// `normalize` without `hold_last`), round robin, instead of decoding them on the worker
    /// that reads. Faster with several workers; but each worker then holds its own watermark,
    /// so with input out of order near `out_of_orderness_ms` which readings are late (and how
    /// session windows merge) can depend on the interleaving. Default false.
    #[serde(default)]
    pub spread: bool,
}

impl FileSourceConfig {
    /// A config reading `path` with every other option at its default.
    pub fn new(path: impl Into<String>) -> FileSourceConfig {
        FileSourceConfig {
            path: path.into(),
            header: None,
            format: None,
            speed: 0.0,
            timestamp_field: None,
            timestamp_format: TimestampFormat::Auto,
            delimiter: None,
            batch_size: default_batch_size(),
            spread: false,
        }
    }

    /// Whether the first non-empty line is a header: given, or from `format`, or from the
    /// extension.
    pub fn has_header(&self) -> bool {
        if let Some(header) = self.header {
            return header;
        }
        if let Some(format) = self.format {
            return format == FileFormat::Csv;
        }
        let extension = Path::new(&self.path)
            .extension()
            .map(|extension| extension.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        matches!(extension.as_str(), "csv" | "tsv" | "txt")
    }

    /// The pacing decoder: the timestamp field through the codec (CSV when there is a header).
    fn pacing_decoder(&self) -> Result<Option<Decoder>, ConfigError> {
        let Some(field) = self.timestamp_field.as_deref().filter(|_| self.speed > 0.0) else {
            return Ok(None);
        };
        let options = DecoderOptions {
            format: if self.has_header() { PayloadCodec::Csv } else { PayloadCodec::Json },
            delimiter: self.delimiter.filter(|_| self.has_header()),
            ..DecoderOptions::default()
        };
        Decoder::new(&options, &[("timestamp_field", field)]).map(Some)
    }

    /// Checks the options beyond their types.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.path.trim().is_empty() {
            return Err(ConfigError::at_field("path", "path must not be empty"));
        }
        if self.batch_size == 0 {
            return Err(ConfigError::at_field("batch_size", "batch_size must be at least 1"));
        }
        if !self.speed.is_finite() || self.speed < 0.0 {
            return Err(ConfigError::at_field(
                "speed",
                format!(
                    "speed must be a finite number >= 0 (0 = as fast as possible), not {}",
                    self.speed
                ),
            ));
        }
        if self.speed > 0.0 && self.timestamp_field.is_none() {
            return Err(ConfigError::at_field(
                "timestamp_field",
                "replaying at a speed needs timestamp_field: the field holding each line's event time",
            ));
        }
        if self.delimiter.is_some() && !self.has_header() {
            return Err(ConfigError::at_field(
                "delimiter",
                "delimiter applies to CSV files (with a header line) only",
            )
            .with_hint("the encoding is normalize's: set `format` and `delimiter` there"));
        }
        self.pacing_decoder()?;
        Ok(())
    }
}

/// Makes `file` sources.
#[derive(Clone, Copy, Debug, Default)]
pub struct FileSourceFactory;

impl SourceFactory for FileSourceFactory {
    type Config = FileSourceConfig;

    /// Only worker 0 reads the file: with `spread`, its batches may be dealt out.
    fn reads_on_one_worker(&self, config: &FileSourceConfig) -> bool {
        config.spread
    }

    fn output_type(
        &self,
        config: &FileSourceConfig,
        _ctx: &ValidateContext,
    ) -> Result<PortType, ConfigError> {
        config.validate()?;
        Ok(PortType::of(Kind::Raw))
    }

    fn build(
        &self,
        config: &FileSourceConfig,
        ctx: &ComponentContext,
    ) -> Result<Box<dyn Source>, ComponentError> {
        Ok(Box::new(FileSource::new(config, ctx)?))
    }
}

// ---------------------------------------------------------------------------------------------
// Line reading
// ---------------------------------------------------------------------------------------------

enum LineRead {
    /// End of file.
    Eof,
    /// A line (without its `\n`) is in the buffer; the bytes it took in the file.
    Line(usize),
    /// A line longer than the limit was skipped; its length in bytes.
    TooLong(usize),
}

/// Reads one line into `buf` (without the `\n`), keeping at most `max` bytes.
fn read_line_capped<R: BufRead>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<LineRead> {
    buf.clear();
    let mut total = 0usize;
    let mut any = false;
    let mut overflow = false;
    loop {
        let available = match reader.fill_buf() {
            Ok(available) => available,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        if available.is_empty() {
            break;
        }
        any = true;
        let (used, done) = match available.iter().position(|byte| *byte == b'\n') {
            Some(at) => (at + 1, true),
            None => (available.len(), false),
        };
        let content = if done { &available[..used - 1] } else { &available[..used] };
        if !overflow {
            if buf.len() + content.len() > max {
                overflow = true;
                buf.clear();
            } else {
                buf.extend_from_slice(content);
            }
        }
        total += used;
        reader.consume(used);
        if done {
            break;
        }
    }
    Ok(if !any {
        LineRead::Eof
    } else if overflow {
        LineRead::TooLong(total)
    } else {
        LineRead::Line(total)
    })
}

fn trim_line(line: &mut Vec<u8>, first: bool) {
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    if first && line.starts_with(b"\xef\xbb\xbf") {
        line.drain(..3);
    }
}

fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

// ---------------------------------------------------------------------------------------------
// Checkpoint position
// ---------------------------------------------------------------------------------------------

/// Where the source is in its file, as checkpointed (JSON).
#[derive(Debug, Serialize, Deserialize)]
struct Position {
    /// The file (resolved against the pipeline's folder).
    path: String,
    /// Bytes of the file before the next line to read.
    offset: u64,
    /// Lines before it (the position of the last message emitted, or a skipped line).
    line: u64,
    /// How many of the file's first bytes `head_hash` covers.
    head_len: u64,
    /// FNV-1a (64 bits) of the file's first `head_len` bytes.
    head_hash: u64,
}

/// FNV-1a, 64 bits: stable across versions and platforms, enough to notice a changed file.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

// ---------------------------------------------------------------------------------------------
// Pacing
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Pacing {
    speed: f64,
    /// Reads the timestamp field of a line.
    decoder: Decoder,
    format: TimestampFormat,
    /// The first line's event time and when it was emitted.
    origin: Option<(EventTime, Instant)>,
}

impl Pacing {
    /// The event time of `line` (a message of a batch with this header), if it has one.
    fn line_time(&mut self, header: Option<&Arc<[u8]>>, line: &[u8]) -> Option<EventTime> {
        let mut batch = RawBatch::new();
        batch.push("", line, 0, 0);
        let message = batch.get(0)?;
        let format = self.format;
        let mut time = None;
        self.decoder
            .decode(header, &message, |_, value| {
                time = value.as_timestamp(format).ok().flatten();
            })
            .ok()?;
        time
    }

    /// When a line with event time `time` is due; `None` means now.
    fn due(&mut self, time: Option<EventTime>) -> Option<Instant> {
        let time = time?;
        let (origin_time, origin_instant) = *self.origin.get_or_insert((time, Instant::now()));
        let ahead_ms = time.saturating_sub(origin_time);
        if ahead_ms <= 0 {
            return None;
        }
        let delay = Duration::try_from_secs_f64(ahead_ms as f64 / 1_000.0 / self.speed).ok()?;
        origin_instant.checked_add(delay)
    }
}

// ---------------------------------------------------------------------------------------------
// The source
// ---------------------------------------------------------------------------------------------

/// A running `file` source.
pub struct FileSource {
    path: PathBuf,
    topic: String,
    header: bool,
    batch_size: usize,
    active: bool,
    reader: Option<BufReader<File>>,
    /// The header line, once read.
    header_line: Option<Arc<[u8]>>,
    line: Vec<u8>,
    line_number: u64,
    /// Bytes of the file read so far.
    consumed: u64,
    /// `consumed` before the line in `line` was read (the position while it is pending).
    line_start: u64,
    /// The file's first bytes (up to [`HEAD_BYTES`]), for the checkpoint's hash.
    head: Vec<u8>,
    /// `line` holds a line read but not emitted yet (waiting for its time), due at `due`.
    pending: bool,
    due: Option<Instant>,
    pacing: Option<Pacing>,
    finished: bool,
    ctx: ComponentContext,
}

impl fmt::Debug for FileSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileSource")
            .field("path", &self.path)
            .field("header", &self.header)
            .field("line_number", &self.line_number)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl FileSource {
    /// Builds the source of worker `ctx.worker_index`; only worker 0 reads the file.
    pub fn new(
        config: &FileSourceConfig,
        ctx: &ComponentContext,
    ) -> Result<FileSource, ComponentError> {
        config.validate().map_err(|error| ComponentError::Config(error.to_string()))?;
        if config.format.is_some() {
            tracing::warn!(
                component = %ctx.component_id,
                "option `format` of the file source is deprecated: set `header` here and \
                 `format` on normalize"
            );
        }
        let pacing = config
            .pacing_decoder()
            .map_err(|error| ComponentError::Config(error.to_string()))?
            .map(|decoder| Pacing {
                speed: config.speed,
                decoder,
                format: config.timestamp_format,
                origin: None,
            });
        Ok(FileSource {
            path: ctx.resolve_path(&config.path),
            topic: config.path.clone(),
            header: config.has_header(),
            batch_size: config.batch_size,
            active: ctx.worker_index == 0,
            reader: None,
            header_line: None,
            line: Vec::new(),
            line_number: 0,
            consumed: 0,
            line_start: 0,
            head: Vec::new(),
            pending: false,
            due: None,
            pacing,
            finished: false,
            ctx: ctx.clone(),
        })
    }

    fn io_error(&self, doing: &str, error: io::Error) -> ComponentError {
        ComponentError::io(format!("{doing} {}", self.path.display()), error)
    }

    /// Opens the file and reads its header line (worker 0 only).
    fn open_file(&mut self) -> Result<(), ComponentError> {
        let file = File::open(&self.path).map_err(|error| self.io_error("cannot open", error))?;
        let mut reader = BufReader::with_capacity(256 * 1024, file);
        self.line_number = 0;
        self.consumed = 0;
        // The first bytes, as the buffer's first fill holds them (nothing is consumed).
        let first = loop {
            match reader.fill_buf() {
                Ok(available) => break available,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(self.io_error("cannot read", error)),
            }
        };
        self.head.clear();
        self.head.extend_from_slice(&first[..first.len().min(HEAD_BYTES)]);
        if self.header {
            loop {
                match read_line_capped(&mut reader, &mut self.line, MAX_LINE_BYTES)
                    .map_err(|error| self.io_error("cannot read", error))?
                {
                    LineRead::Eof => break,
                    LineRead::TooLong(_) => {
                        self.line_number += 1;
                        return Err(ComponentError::Config(format!(
                            "the header line of {} is longer than {MAX_LINE_BYTES} bytes",
                            self.path.display()
                        )));
                    }
                    LineRead::Line(length) => {
                        self.line_number += 1;
                        self.consumed += length as u64;
                        trim_line(&mut self.line, self.line_number == 1);
                        if !is_blank(&self.line) {
                            self.header_line = Some(Arc::from(self.line.as_slice()));
                            break;
                        }
                    }
                }
            }
            self.line.clear();
            if let (Some(pacing), Some(header)) = (self.pacing.as_mut(), &self.header_line)
                && pacing.decoder.decode_header(header).is_err()
            {
                return Err(ComponentError::Config(format!(
                    "timestamp_field {:?} is not a column of {}",
                    pacing.decoder.plan().name(0),
                    self.path.display(),
                )));
            }
        }
        self.reader = Some(reader);
        Ok(())
    }

    /// The offset and line number after the last line emitted.
    fn position(&self) -> (u64, u64) {
        if self.pending {
            (self.line_start, self.line_number.saturating_sub(1))
        } else {
            (self.consumed, self.line_number)
        }
    }

    /// Why the file cannot resume at `position`, if it cannot.
    fn mismatch(&mut self, position: &Position) -> Result<Option<String>, ComponentError> {
        let Some(reader) = self.reader.as_ref() else {
            return Ok(Some("it is not open".to_owned()));
        };
        let length = reader.get_ref().metadata().map(|metadata| metadata.len());
        let length = length.map_err(|error| self.io_error("cannot read the metadata of", error))?;
        if length < position.offset {
            return Ok(Some(format!(
                "it is {length} bytes long, shorter than the checkpoint's offset {}",
                position.offset
            )));
        }
        let head = usize::try_from(position.head_len).unwrap_or(usize::MAX);
        if self.head.len() < head || fnv1a(&self.head[..head]) != position.head_hash {
            return Ok(Some(format!("its first {head} bytes changed since the checkpoint")));
        }
        Ok(None)
    }
}

impl Source for FileSource {
    fn open(&mut self, _ctx: &ComponentContext) -> Result<(), ComponentError> {
        if self.active && self.reader.is_none() {
            self.open_file()?;
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut Outputs) -> Result<SourcePoll, ComponentError> {
        if !self.active || self.finished || self.ctx.shutdown_requested() {
            self.finished = true;
            self.reader = None;
            return Ok(SourcePoll::Finished);
        }
        if self.reader.is_none() {
            self.open_file()?;
        }
        let mut batch = RawBatch::new();
        if let Some(header) = &self.header_line {
            batch.set_header(Arc::clone(header));
        }
        let arrival_ms = now_ms();
        let mut wait = None;
        while batch.len() < self.batch_size {
            if !self.pending {
                let Some(reader) = self.reader.as_mut() else {
                    self.finished = true;
                    break;
                };
                self.line_start = self.consumed;
                let read = read_line_capped(reader, &mut self.line, MAX_LINE_BYTES);
                let read = read.map_err(|error| self.io_error("cannot read", error))?;
                match read {
                    LineRead::Eof => {
                        self.finished = true;
                        self.reader = None;
                        break;
                    }
                    LineRead::TooLong(length) => {
                        self.line_number += 1;
                        self.consumed += length as u64;
                        out.error(
                            "line_too_long",
                            format!(
                                "line {} is {length} bytes long, more than the limit of {MAX_LINE_BYTES}",
                                self.line_number
                            ),
                            Some(&self.topic),
                            None,
                        );
                        continue;
                    }
                    LineRead::Line(length) => {
                        self.line_number += 1;
                        self.consumed += length as u64;
                        trim_line(&mut self.line, self.line_number == 1);
                        if is_blank(&self.line) {
                            continue;
                        }
                    }
                }
                self.due = match self.pacing.as_mut() {
                    Some(pacing) => {
                        let time = pacing.line_time(self.header_line.as_ref(), &self.line);
                        pacing.due(time)
                    }
                    None => None,
                };
                self.pending = true;
            }
            if let Some(due) = self.due {
                let now = Instant::now();
                if due > now {
                    wait = Some(due - now);
                    break;
                }
            }
            batch.push(&self.topic, &self.line, arrival_ms, self.line_number);
            self.pending = false;
            self.due = None;
        }
        let emitted = !batch.is_empty();
        out.emit(Batch::Raw(batch));
        if emitted {
            return Ok(SourcePoll::Ready);
        }
        if let Some(wait) = wait {
            let wake_after_ms = (wait.as_micros().div_ceil(1_000) as u64).clamp(1, 1_000);
            return Ok(SourcePoll::Idle { wake_after_ms });
        }
        Ok(if self.finished { SourcePoll::Finished } else { SourcePoll::Ready })
    }

    /// Worker 0's position after the last line emitted (JSON); nothing for the others.
    fn snapshot(&mut self) -> Result<Option<Vec<u8>>, ComponentError> {
        if !self.active {
            return Ok(None);
        }
        let (offset, line) = self.position();
        let head = self.head.len().min(usize::try_from(offset).unwrap_or(usize::MAX));
        let position = Position {
            path: self.path.display().to_string(),
            offset,
            line,
            head_len: head as u64,
            head_hash: fnv1a(&self.head[..head]),
        };
        serde_json::to_vec(&position)
            .map(Some)
            .map_err(|error| ComponentError::Internal(format!("file source snapshot: {error}")))
    }

    /// Seeks worker 0's file to a snapshot's position, if it is further than the current one
    /// and the file is still the one it was taken on (else the file is read from its start).
    fn restore(&mut self, state: &[u8]) -> Result<(), ComponentError> {
        let position: Position = serde_json::from_slice(state).map_err(|error| {
            ComponentError::Config(format!("not a file source snapshot: {error}"))
        })?;
        if !self.active {
            return Ok(());
        }
        let path = self.path.display().to_string();
        if position.path != path {
            tracing::warn!(
                component = %self.ctx.component_id,
                was = %position.path,
                now = %path,
                "the checkpoint's position is in another file: reading from the start of `path`"
            );
            return Ok(());
        }
        if position.offset <= self.position().0 {
            return Ok(());
        }
        if let Some(reason) = self.mismatch(&position)? {
            tracing::warn!(
                component = %self.ctx.component_id,
                path = %path,
                %reason,
                "the file changed since the checkpoint: reading it from its start"
            );
            return Ok(());
        }
        let Some(reader) = self.reader.as_mut() else { return Ok(()) };
        if let Err(error) = reader.seek(SeekFrom::Start(position.offset)) {
            return Err(self.io_error("cannot seek in", error));
        }
        self.consumed = position.offset;
        self.line_number = position.line;
        self.pending = false;
        self.due = None;
        tracing::info!(
            component = %self.ctx.component_id,
            path = %path,
            line = position.line,
            offset = position.offset,
            "resuming the file after the checkpoint's position"
        );
        Ok(())
    }

    fn close(&mut self) -> Result<(), ComponentError> {
        self.reader = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::atomic::AtomicBool;

    use proptest::prelude::*;
    use tidewatch_api::codec::csv;
    use tidewatch_api::{ConfigValue, PipelineInfo};

    use super::*;

    const SKAB_HEADER: &str = "datetime;Accelerometer1RMS;Accelerometer2RMS;Current;Pressure;Temperature;Thermocouple;Voltage;Volume Flow RateRMS;anomaly;changepoint";

    fn config(text: &str) -> FileSourceConfig {
        ConfigValue::parse(text).expect("toml").deserialize().expect("config")
    }

    fn context(dir: &Path, worker: usize, workers: usize) -> ComponentContext {
        let pipeline = PipelineInfo { base_dir: dir.to_path_buf(), ..PipelineInfo::default() };
        ComponentContext::new(
            "replay",
            "file",
            worker,
            workers,
            Arc::new(pipeline),
            Arc::new(AtomicBool::new(false)),
        )
    }

    fn write_file(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
        let path = dir.join(name);
        let mut file = File::create(&path).expect("create");
        file.write_all(content).expect("write");
        path
    }

    struct Read {
        header: Option<Arc<[u8]>>,
        messages: Vec<(u64, String, Vec<u8>)>,
    }

    fn read_all(source: &mut FileSource, ctx: &ComponentContext) -> Result<Read, ComponentError> {
        source.open(ctx)?;
        drain(source)
    }

    /// Polls an open source until it finishes.
    fn drain(source: &mut FileSource) -> Result<Read, ComponentError> {
        let mut out = Outputs::new("replay");
        let mut read = Read { header: None, messages: Vec::new() };
        for _ in 0..1_000_000 {
            let poll = source.poll(&mut out)?;
            for batch in out.take_main() {
                let Batch::Raw(raw) = batch else { panic!("raw batches only") };
                read.header = raw.header().cloned();
                for message in raw.iter() {
                    read.messages.push((
                        message.position,
                        message.topic.to_owned(),
                        message.payload.to_vec(),
                    ));
                }
            }
            match poll {
                SourcePoll::Finished => return Ok(read),
                SourcePoll::Idle { wake_after_ms } => {
                    std::thread::sleep(Duration::from_millis(wake_after_ms));
                }
                SourcePoll::Ready => {}
            }
        }
        panic!("the file source did not finish");
    }

    fn run(text: &str, dir: &Path) -> Result<Read, ComponentError> {
        let config = config(text);
        FileSourceFactory.output_type(&config, &ValidateContext::default()).expect("valid");
        let ctx = context(dir, 0, 1);
        let mut source = FileSource::new(&config, &ctx)?;
        read_all(&mut source, &ctx)
    }

    /// The column names of the header line the source passed along, as the codec reads them.
    fn header_names(read: &Read) -> Vec<String> {
        let header = read.header.as_ref().expect("a header line");
        let names = csv::header_names(header, Delimiter::sniff(header)).expect("header");
        names.iter().map(|name| name.to_string()).collect()
    }

    #[test]
    fn reads_a_skab_like_semicolon_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let content = format!(
            "{SKAB_HEADER}\r\n2020-03-09 10:14:33;0.0265878;0.0401113;1.3302;0.054711;79.3366;26.0199;233.062;32.0;0.0;0.0\r\n2020-03-09 10:14:34;0.0261697;0.0404525;1.35399;0.382638;79.5158;26.0258;236.04;32.0;0.0;0.0\r\n"
        );
        write_file(dir.path(), "skab.csv", content.as_bytes());
        let read = run("path = \"skab.csv\"\ndelimiter = \";\"", dir.path()).expect("read");
        assert_eq!(read.messages.len(), 2);
        let names = header_names(&read);
        assert_eq!(names.len(), 11);
        assert_eq!(names[0], "datetime");
        assert_eq!(names[8], "Volume Flow RateRMS");
        assert_eq!(Delimiter::sniff(read.header.as_deref().expect("header")), Delimiter::SEMICOLON);
        let (position, topic, payload) = &read.messages[0];
        assert_eq!(*position, 2);
        assert_eq!(topic, "skab.csv");
        assert!(payload.starts_with(b"2020-03-09 10:14:33;"));
        assert!(payload.ends_with(b";0.0;0.0"), "no \\r left");
    }

    #[test]
    fn reads_the_real_skab_file_when_present() {
        let path = Path::new("/work/shared/data/skab/data/valve1/0.csv");
        if !path.exists() {
            println!("skipping: {} is absent", path.display());
            return;
        }
        let text = std::fs::read_to_string(path).expect("read");
        let expected = text.lines().filter(|line| !line.trim().is_empty()).count() - 1;
        let dir = tempfile::tempdir().expect("tempdir");
        let read = run(
            &format!(
                "path = {:?}\ndelimiter = \";\"\nbatch_size = 100",
                path.display().to_string()
            ),
            dir.path(),
        )
        .expect("read");
        assert_eq!(read.messages.len(), expected);
        assert_eq!(header_names(&read).len(), 11);
        assert!(read.messages.iter().all(|(_, _, payload)| !payload.ends_with(b"\r")));
    }

    #[test]
    fn reads_json_lines_and_skips_empty_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_file(
            dir.path(),
            "data.jsonl",
            b"{\"device\":\"a\",\"ts\":1}\n\n   \n{\"device\":\"b\",\"ts\":2}\r\n{\"device\":\"c\",\"ts\":3}",
        );
        let read = run("path = \"data.jsonl\"", dir.path()).expect("read");
        assert!(read.header.is_none());
        let positions: Vec<u64> = read.messages.iter().map(|(position, ..)| *position).collect();
        assert_eq!(positions, [1, 4, 5]);
        for (_, _, payload) in &read.messages {
            let value: serde_json::Value = serde_json::from_slice(payload).expect("json");
            assert!(value["device"].is_string());
        }
    }

    #[test]
    fn header_false_emits_every_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_file(dir.path(), "raw.txt", b"1,2,3\n4,5,6\n");
        let read = run("path = \"raw.txt\"\nheader = false", dir.path()).expect("read");
        assert_eq!(read.messages.len(), 2);
        assert_eq!(read.messages[0].2, b"1,2,3");
        assert!(read.header.is_none());
    }

    #[test]
    fn crlf_is_stripped_and_bom_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_file(dir.path(), "crlf.csv", b"\xef\xbb\xbfa,\"b\"\r\n1,2\r\n\r\n3,4\r\n");
        let read = run("path = \"crlf.csv\"", dir.path()).expect("read");
        assert_eq!(header_names(&read), ["a", "b"]);
        let payloads: Vec<&[u8]> =
            read.messages.iter().map(|(_, _, payload)| payload.as_slice()).collect();
        assert_eq!(payloads, [b"1,2".as_slice(), b"3,4".as_slice()]);
    }

    #[test]
    fn tsv_defaults_to_tab() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_file(dir.path(), "t.tsv", b"a\tb\n1\t2\n");
        let read = run("path = \"t.tsv\"", dir.path()).expect("read");
        assert_eq!(header_names(&read), ["a", "b"]);
    }

    #[test]
    fn a_missing_file_is_an_io_error_with_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let Err(error) = run("path = \"nope.csv\"", dir.path()) else {
            panic!("expected an error");
        };
        assert!(matches!(error, ComponentError::Io { .. }), "{error:?}");
        assert!(error.to_string().contains("nope.csv"), "{error}");
    }

    #[test]
    fn other_workers_finish_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config("path = \"absent.csv\"");
        let ctx = context(dir.path(), 1, 2);
        let mut source = FileSource::new(&config, &ctx).expect("new");
        source.open(&ctx).expect("worker 1 does not open the file");
        let mut out = Outputs::new("replay");
        assert_eq!(source.poll(&mut out).expect("poll"), SourcePoll::Finished);
        assert!(out.is_empty());
    }

    #[test]
    fn batches_are_capped_by_batch_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let content: String = (0..25).map(|i| format!("{{\"i\":{i}}}\n")).collect();
        write_file(dir.path(), "n.ndjson", content.as_bytes());
        let config = config("path = \"n.ndjson\"\nbatch_size = 10");
        let ctx = context(dir.path(), 0, 1);
        let mut source = FileSource::new(&config, &ctx).expect("new");
        source.open(&ctx).expect("open");
        let mut out = Outputs::new("replay");
        let mut sizes = Vec::new();
        loop {
            let poll = source.poll(&mut out).expect("poll");
            sizes.extend(out.take_main().iter().map(Batch::len));
            if poll == SourcePoll::Finished {
                break;
            }
        }
        assert_eq!(sizes, [10, 10, 5]);
    }

    #[test]
    fn speed_paces_lines_by_their_timestamps() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_file(dir.path(), "paced.csv", b"ts,v\n1000,1\nbad,2\n1100,3\n1200,4\n");
        let config = config(
            "path = \"paced.csv\"\nspeed = 1.0\ntimestamp_field = \"ts\"\ntimestamp_format = \"unix_ms\"",
        );
        let ctx = context(dir.path(), 0, 1);
        let mut source = FileSource::new(&config, &ctx).expect("new");
        source.open(&ctx).expect("open");
        let mut out = Outputs::new("replay");
        let start = Instant::now();
        // The first line and the unparseable one go out at once; then the source waits.
        assert_eq!(source.poll(&mut out).expect("poll"), SourcePoll::Ready);
        assert_eq!(out.take_main().iter().map(Batch::len).sum::<usize>(), 2);
        match source.poll(&mut out).expect("poll") {
            SourcePoll::Idle { wake_after_ms } => assert!((1..=100).contains(&wake_after_ms)),
            other => panic!("expected idle, got {other:?}"),
        }
        let read = read_all(&mut source, &ctx).expect("read");
        assert_eq!(read.messages.len(), 2);
        assert!(start.elapsed() >= Duration::from_millis(190));
    }

    #[test]
    fn speed_paces_json_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_file(
            dir.path(),
            "paced.json",
            b"{\"ts\":\"2020-03-09T10:14:33.000Z\",\"x\":{\"ts\":5}}\n{\"x\":[1,2],\"ts\":\"2020-03-09T10:14:33.100Z\"}\n",
        );
        let config = config("path = \"paced.json\"\nspeed = 2.0\ntimestamp_field = \"ts\"");
        let ctx = context(dir.path(), 0, 1);
        let mut source = FileSource::new(&config, &ctx).expect("new");
        source.open(&ctx).expect("open");
        let mut out = Outputs::new("replay");
        assert_eq!(source.poll(&mut out).expect("poll"), SourcePoll::Ready);
        assert!(matches!(source.poll(&mut out).expect("poll"), SourcePoll::Idle { .. }));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(source.poll(&mut out).expect("poll"), SourcePoll::Ready);
        assert_eq!(out.take_main().iter().map(Batch::len).sum::<usize>(), 2);
    }

    #[test]
    fn a_missing_timestamp_column_is_a_config_error_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_file(dir.path(), "x.csv", b"a,b\n1,2\n");
        let config = config("path = \"x.csv\"\nspeed = 1.0\ntimestamp_field = \"ts\"");
        let ctx = context(dir.path(), 0, 1);
        let mut source = FileSource::new(&config, &ctx).expect("new");
        assert!(matches!(source.open(&ctx), Err(ComponentError::Config(_))));
    }

    #[test]
    fn overlong_lines_are_reported_and_skipped() {
        let mut reader = io::Cursor::new(b"abcdefgh\nxy\n".to_vec());
        let mut buf = Vec::new();
        assert!(matches!(read_line_capped(&mut reader, &mut buf, 4), Ok(LineRead::TooLong(9))));
        assert!(matches!(read_line_capped(&mut reader, &mut buf, 4), Ok(LineRead::Line(3))));
        assert_eq!(buf, b"xy");
        assert!(matches!(read_line_capped(&mut reader, &mut buf, 4), Ok(LineRead::Eof)));
    }

    #[test]
    fn invalid_options_are_rejected() {
        let ctx = ValidateContext::default();
        for (text, field) in [
            ("path = \"\"", "path"),
            ("path = \"a.jsonl\"\ndelimiter = \";\"", "delimiter"),
            ("path = \"a.csv\"\nspeed = 1.0", "timestamp_field"),
            ("path = \"a.csv\"\nspeed = -1.0", "speed"),
            ("path = \"a.csv\"\nbatch_size = 0", "batch_size"),
            ("path = \"a.csv\"\nspeed = 1.0\ntimestamp_field = \"/a/b\"", "format"),
        ] {
            let error = FileSourceFactory.output_type(&config(text), &ctx).expect_err(text);
            assert_eq!(error.field.as_deref(), Some(field), "{text}");
        }
        assert!(
            FileSourceFactory
                .output_type(&config("path = \"a.dat\"\nformat = \"csv\""), &ctx)
                .is_ok()
        );
        for text in ["path = \"a.csv\"\ndelimiter = \";;\"", "path = \"a.csv\"\ncolumns = [\"a\"]"]
        {
            let parsed = ConfigValue::parse(text).expect("toml").deserialize::<FileSourceConfig>();
            assert!(parsed.is_err(), "{text}");
        }
        let unknown = ConfigValue::parse("path = \"a.csv\"\nheaders = true")
            .expect("toml")
            .deserialize::<FileSourceConfig>();
        assert!(unknown.is_err());
        let missing_path =
            ConfigValue::parse("format = \"csv\"").expect("toml").deserialize::<FileSourceConfig>();
        assert!(missing_path.is_err());
    }

    /// Polls once; the positions of the lines emitted.
    fn poll_once(source: &mut FileSource) -> Vec<u64> {
        let mut out = Outputs::new("replay");
        source.poll(&mut out).expect("poll");
        let mut positions = Vec::new();
        for batch in out.take_main() {
            let Batch::Raw(raw) = batch else { panic!("raw batches only") };
            positions.extend(raw.iter().map(|message| message.position));
        }
        positions
    }

    fn snapshot_of(source: &mut FileSource) -> Vec<u8> {
        source.snapshot().expect("snapshot").expect("worker 0 has a position")
    }

    /// A fresh source of `text` on worker 0 of 1, opened, with `states` restored.
    fn restored(text: &str, dir: &Path, states: &[&[u8]]) -> FileSource {
        let ctx = context(dir, 0, 1);
        let mut source = FileSource::new(&config(text), &ctx).expect("new");
        source.open(&ctx).expect("open");
        for state in states {
            source.restore(state).expect("restore");
        }
        source
    }

    fn numbered(lines: std::ops::Range<u32>) -> String {
        lines.map(|i| format!("{i},{}\n", i * 10)).collect()
    }

    #[test]
    fn a_restored_source_emits_exactly_the_lines_after_its_position() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_file(dir.path(), "r.csv", format!("a,b\n{}", numbered(0..25)).as_bytes());
        let text = "path = \"r.csv\"\nbatch_size = 10";
        let ctx = context(dir.path(), 0, 1);
        let mut source = FileSource::new(&config(text), &ctx).expect("new");
        source.open(&ctx).expect("open");
        // A snapshot before anything was emitted resumes after the header.
        let start = snapshot_of(&mut source);
        assert_eq!(poll_once(&mut source), (2..12).collect::<Vec<u64>>());
        let state = snapshot_of(&mut source);
        let mut next = restored(text, dir.path(), &[&state]);
        let read = drain(&mut next).expect("read");
        assert_eq!(header_names(&read), ["a", "b"]);
        let positions: Vec<u64> = read.messages.iter().map(|(position, ..)| *position).collect();
        assert_eq!(positions, (12..27).collect::<Vec<u64>>());
        assert_eq!(read.messages[0].2, b"10,100");
        let everything = drain(&mut restored(text, dir.path(), &[&start])).expect("read");
        assert_eq!(everything.messages.len(), 25);
        // At the end: nothing more, until lines are appended.
        let end = snapshot_of(&mut next);
        assert!(drain(&mut restored(text, dir.path(), &[&end])).expect("read").messages.is_empty());
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("r.csv"))
            .expect("append");
        file.write_all(b"25,250\n\n26,260\n").expect("write");
        let appended = drain(&mut restored(text, dir.path(), &[&end])).expect("read");
        let lines: Vec<(u64, &[u8])> = appended
            .messages
            .iter()
            .map(|(position, _, payload)| (*position, payload.as_slice()))
            .collect();
        assert_eq!(lines, [(27, b"25,250".as_slice()), (29, b"26,260".as_slice())]);
    }

    #[test]
    fn restores_merge_to_the_furthest_position_and_only_worker_0_reads() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_file(dir.path(), "m.jsonl", numbered(0..30).as_bytes());
        let text = "path = \"m.jsonl\"\nbatch_size = 10";
        let ctx = context(dir.path(), 0, 1);
        let mut source = FileSource::new(&config(text), &ctx).expect("new");
        source.open(&ctx).expect("open");
        poll_once(&mut source);
        let first = snapshot_of(&mut source);
        poll_once(&mut source);
        let second = snapshot_of(&mut source);
        for states in [[&first[..], &second[..]], [&second[..], &first[..]]] {
            let read = drain(&mut restored(text, dir.path(), &states)).expect("read");
            let positions: Vec<u64> =
                read.messages.iter().map(|(position, ..)| *position).collect();
            assert_eq!(positions, (21..31).collect::<Vec<u64>>());
        }
        // Worker 1 snapshots nothing and ignores positions.
        let ctx = context(dir.path(), 1, 2);
        let mut other = FileSource::new(&config(text), &ctx).expect("new");
        other.open(&ctx).expect("open");
        other.restore(&second).expect("restore");
        assert_eq!(other.snapshot().expect("snapshot"), None);
        assert_eq!(other.poll(&mut Outputs::new("replay")).expect("poll"), SourcePoll::Finished);
        let mut source = restored(text, dir.path(), &[]);
        assert!(matches!(source.restore(b"{\"offset\": 1}"), Err(ComponentError::Config(_))));
    }

    #[test]
    fn a_changed_file_or_path_is_read_from_its_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_file(dir.path(), "c.jsonl", numbered(0..30).as_bytes());
        let text = "path = \"c.jsonl\"\nbatch_size = 20";
        let ctx = context(dir.path(), 0, 1);
        let mut source = FileSource::new(&config(text), &ctx).expect("new");
        source.open(&ctx).expect("open");
        poll_once(&mut source);
        let state = snapshot_of(&mut source);
        drop(source);
        let count = |state: &[u8]| drain(&mut restored(text, dir.path(), &[state])).expect("read");
        // Shorter than the offset.
        std::fs::write(&path, numbered(0..5)).expect("rewrite");
        let read = count(&state);
        assert_eq!(read.messages.len(), 5);
        assert_eq!(read.messages[0].0, 1);
        // As long, other first bytes (replaced).
        std::fs::write(&path, numbered(100..130)).expect("rewrite");
        assert_eq!(count(&state).messages.len(), 30);
        // Another path.
        write_file(dir.path(), "d.jsonl", numbered(0..30).as_bytes());
        let other = "path = \"d.jsonl\"\nbatch_size = 20";
        assert_eq!(
            drain(&mut restored(other, dir.path(), &[&state])).expect("read").messages.len(),
            30
        );
    }

    #[test]
    fn a_line_held_back_by_speed_is_read_again_after_a_restore() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_file(dir.path(), "p.csv", b"ts,v\n1000,1\n1100,2\n1200,3\n");
        let text = "path = \"p.csv\"\nspeed = 1.0\ntimestamp_field = \"ts\"\ntimestamp_format = \"unix_ms\"";
        let ctx = context(dir.path(), 0, 1);
        let mut source = FileSource::new(&config(text), &ctx).expect("new");
        source.open(&ctx).expect("open");
        // Line 2 goes out; line 3 is read and waits for its time.
        assert_eq!(poll_once(&mut source), [2]);
        let state = snapshot_of(&mut source);
        let read = drain(&mut restored(text, dir.path(), &[&state])).expect("read");
        let positions: Vec<u64> = read.messages.iter().map(|(position, ..)| *position).collect();
        assert_eq!(positions, [3, 4]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn never_panics_on_arbitrary_bytes(
            content in proptest::collection::vec(any::<u8>(), 0..2048),
            json in any::<bool>(),
            header in any::<bool>(),
            paced in any::<bool>(),
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let name = if json { "fuzz.jsonl" } else { "fuzz.csv" };
            write_file(dir.path(), name, &content);
            let mut text = format!("path = {name:?}\nbatch_size = 16\n");
            if !json {
                text.push_str(&format!("header = {header}\n"));
            }
            if paced {
                // Fast enough that any wait is short.
                text.push_str("speed = 1e12\ntimestamp_field = \"ts\"\n");
            }
            let config = config(&text);
            let ctx = context(dir.path(), 0, 1);
            let mut source = FileSource::new(&config, &ctx).expect("new");
            let read = match read_all(&mut source, &ctx) {
                Ok(read) => read,
                // A random header line need not have the pacing column: a clear error.
                Err(ComponentError::Config(reason)) if paced && header && !json => {
                    prop_assert!(reason.contains("timestamp_field"), "{}", reason);
                    return Ok(());
                }
                Err(error) => panic!("read: {error:?}"),
            };
            let lines = content
                .split(|byte| *byte == b'\n')
                .filter(|line| !is_blank(line.strip_suffix(b"\r").unwrap_or(line)))
                .count();
            prop_assert!(read.messages.len() <= lines);
            for (_, _, payload) in &read.messages {
                prop_assert!(!payload.contains(&b'\n'));
            }
        }
    }
}
