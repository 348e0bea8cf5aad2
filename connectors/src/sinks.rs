//! The built-in sinks: `stdout`, `file` and `blackhole`.
//!
//! `stdout` and `file` write every record as one JSON object per line, in the encoding of
//! [`tidewatch_api::json`]. All three accept every kind of record.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use serde::Deserialize;
use tidewatch_api::json::write_json_lines;
use tidewatch_api::{
    Batch, ComponentContext, ComponentError, ConfigError, Kind, ProcessShared, Sink, SinkFactory,
    ValidateContext,
};

/// A batch buffer that grew beyond this is shrunk back after use.
const BUFFER_KEEP_BYTES: usize = 4 * 1024 * 1024;

fn encode(batch: &Batch, buf: &mut Vec<u8>) -> Result<(), ComponentError> {
    buf.clear();
    if buf.capacity() > BUFFER_KEEP_BYTES {
        buf.shrink_to(BUFFER_KEEP_BYTES);
    }
    write_json_lines(batch, buf).map_err(|error| ComponentError::io("encoding a batch", error))
}

// ---------------------------------------------------------------------------------------------
// stdout
// ---------------------------------------------------------------------------------------------

/// Options of the `stdout` sink (it has none).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutSinkConfig {}

/// Makes `stdout` sinks.
#[derive(Clone, Copy, Debug, Default)]
pub struct StdoutSinkFactory;

impl SinkFactory for StdoutSinkFactory {
    type Config = StdoutSinkConfig;

    fn accepts(&self, _config: &StdoutSinkConfig) -> Vec<Kind> {
        Kind::ALL.to_vec()
    }

    fn build(
        &self,
        _config: &StdoutSinkConfig,
        _ctx: &ComponentContext,
    ) -> Result<Box<dyn Sink>, ComponentError> {
        Ok(Box::new(StdoutSink::new()))
    }
}

/// Writes JSON lines to standard output, one batch at a time under the stdout lock (so the
/// lines of a batch never interleave with another worker's), flushed after every batch.
///
/// When stdout is closed (`tidewatch run ... | head -1`: the reader went away), the sink
/// stops the pipeline as SIGINT would, with one log line for the whole process, and drops
/// what it is given from then on.
#[derive(Debug, Default)]
pub struct StdoutSink {
    buf: Vec<u8>,
    ctx: Option<ComponentContext>,
    closed: bool,
}

/// Whether a `stdout` sink of this process saw its stdout closed (one log line in all).
static STDOUT_CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl StdoutSink {
    /// A new stdout sink.
    pub fn new() -> StdoutSink {
        StdoutSink::default()
    }
}

impl StdoutSink {
    /// The outcome of a write or flush: a closed stdout stops the pipeline instead of failing.
    fn outcome(&mut self, result: io::Result<()>, what: &str) -> Result<(), ComponentError> {
        match result {
            Err(error) if error.kind() == io::ErrorKind::BrokenPipe => {
                self.closed = true;
                if !STDOUT_CLOSED.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    tracing::info!(
                        "stdout was closed (its reader went away): stopping the pipeline"
                    );
                }
                if let Some(ctx) = &self.ctx {
                    ctx.request_shutdown();
                }
                Ok(())
            }
            result => result.map_err(|error| ComponentError::io(what, error)),
        }
    }
}

impl Sink for StdoutSink {
    fn open(&mut self, ctx: &ComponentContext) -> Result<(), ComponentError> {
        self.ctx = Some(ctx.clone());
        Ok(())
    }

    fn write_batch(&mut self, batch: Batch) -> Result<(), ComponentError> {
        if self.closed {
            return Ok(());
        }
        encode(&batch, &mut self.buf)?;
        if self.buf.is_empty() {
            return Ok(());
        }
        let result = {
            let stdout = io::stdout();
            let mut lock = stdout.lock();
            lock.write_all(&self.buf).and_then(|()| lock.flush())
        };
        self.outcome(result, "writing to stdout")
    }

    fn flush(&mut self) -> Result<(), ComponentError> {
        if self.closed {
            return Ok(());
        }
        let result = io::stdout().lock().flush();
        self.outcome(result, "flushing stdout")
    }
}

// ---------------------------------------------------------------------------------------------
// file
// ---------------------------------------------------------------------------------------------

/// Options of the `file` sink.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// The file to write JSON lines to; a relative path resolves against the pipeline file's
    /// folder. Missing parent folders are created.
    pub path: String,
    /// Append to an existing file instead of truncating it when the pipeline starts.
    #[serde(default)]
    pub append: bool,
}

impl FileSinkConfig {
    /// A config writing to `path`, truncating it first.
    pub fn new(path: impl Into<String>) -> FileSinkConfig {
        FileSinkConfig { path: path.into(), append: false }
    }
}

/// Makes `file` sinks.
#[derive(Clone, Copy, Debug, Default)]
pub struct FileSinkFactory;

impl SinkFactory for FileSinkFactory {
    type Config = FileSinkConfig;

    fn accepts(&self, _config: &FileSinkConfig) -> Vec<Kind> {
        Kind::ALL.to_vec()
    }

    fn validate(&self, config: &FileSinkConfig, _ctx: &ValidateContext) -> Result<(), ConfigError> {
        if config.path.trim().is_empty() {
            return Err(ConfigError::at_field("path", "path must not be empty"));
        }
        if config.path.ends_with('/') || config.path.ends_with('\\') {
            return Err(ConfigError::at_field(
                "path",
                format!("path {:?} names a folder, not a file", config.path),
            ));
        }
        Ok(())
    }

    fn build(
        &self,
        config: &FileSinkConfig,
        ctx: &ComponentContext,
    ) -> Result<Box<dyn Sink>, ComponentError> {
        Ok(Box::new(FileSink::new(config, ctx)))
    }
}

pub(crate) type SharedWriter = Arc<Mutex<BufWriter<File>>>;

/// The canonical form of `path` (its parent folder is created and canonicalized).
fn canonical_target(path: &Path) -> io::Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "the path does not name a file")
    })?;
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)?;
    Ok(parent.canonicalize()?.join(name))
}

/// The device of every record of a batch, in order (`None` for raw messages and errors): the
/// topic or key of what the broker sinks publish.
#[cfg(any(feature = "mqtt", feature = "kafka"))]
pub(crate) fn record_devices(batch: &Batch) -> Vec<Option<tidewatch_api::DeviceId>> {
    match batch {
        Batch::Raw(raw) => vec![None; raw.len()],
        Batch::Readings(readings) => readings.devices.iter().copied().map(Some).collect(),
        Batch::Windows(windows) => windows.iter().map(|window| Some(window.device)).collect(),
        Batch::Scores(scores) => scores.iter().map(|score| Some(score.device)).collect(),
        Batch::Events(events) => events.iter().map(|event| Some(event.device)).collect(),
        Batch::Catalog(updates) => updates
            .iter()
            .map(|update| Some(tidewatch_api::DeviceId::intern(&update.row.device)))
            .collect(),
        Batch::Errors(errors) => vec![None; errors.len()],
    }
}

/// The writer of `path` in this engine run and process ([`ProcessShared`], keyed by the
/// canonical path), opened (truncated unless `append`) by the first caller; the next run opens
/// (and truncates) the file again.
///
/// The writer holds an exclusive lock on the file (`flock`) while the run lasts: another
/// process (another run, or another process of a cluster on the same host or volume) that
/// opens the same path gets an error naming the remedy instead of interleaving its lines.
pub(crate) fn shared_writer(
    shared: &ProcessShared,
    path: &Path,
    append: bool,
) -> io::Result<SharedWriter> {
    let target = canonical_target(path)?;
    let key = format!("file:{}", target.display());
    shared.get_or_try_init(&key, || {
        let mut options = OpenOptions::new();
        options.create(true);
        if append {
            options.append(true);
        } else {
            // Truncated only once the lock is ours.
            options.write(true);
        }
        let file = options.open(&target)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    "another process writes this file; give each process its own path \
                     (in a cluster, e.g. `path = \"out-${TIDEWATCH_PROCESS}.jsonl\"`)",
                ));
            }
            // A file system without locks: write as before.
            Err(std::fs::TryLockError::Error(error))
                if error.kind() == io::ErrorKind::Unsupported => {}
            Err(std::fs::TryLockError::Error(error)) => return Err(error),
        }
        if !append {
            file.set_len(0)?;
        }
        Ok(Mutex::new(BufWriter::with_capacity(256 * 1024, file)))
    })
}

/// Writes JSON lines to a file. The instances of all workers of the process that write the
/// same path share one buffered writer, so the lines of a batch never interleave.
pub struct FileSink {
    path: PathBuf,
    append: bool,
    shared: ProcessShared,
    writer: Option<SharedWriter>,
    buf: Vec<u8>,
}

impl fmt::Debug for FileSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileSink")
            .field("path", &self.path)
            .field("append", &self.append)
            .field("open", &self.writer.is_some())
            .finish_non_exhaustive()
    }
}

impl FileSink {
    /// The sink of one worker; the file opens at [`Sink::open`] (or the first write).
    pub fn new(config: &FileSinkConfig, ctx: &ComponentContext) -> FileSink {
        FileSink {
            path: ctx.resolve_path(&config.path),
            append: config.append,
            shared: ctx.process_shared().clone(),
            writer: None,
            buf: Vec::new(),
        }
    }

    fn writer(&mut self) -> Result<&SharedWriter, ComponentError> {
        if self.writer.is_none() {
            let writer = shared_writer(&self.shared, &self.path, self.append).map_err(|error| {
                ComponentError::io(format!("cannot open {}", self.path.display()), error)
            })?;
            self.writer = Some(writer);
        }
        self.writer.as_ref().ok_or_else(|| ComponentError::Internal("writer not open".into()))
    }

    fn flush_writer(&self) -> Result<(), ComponentError> {
        if let Some(writer) = &self.writer {
            let mut writer = writer.lock().unwrap_or_else(PoisonError::into_inner);
            writer.flush().map_err(|error| {
                ComponentError::io(format!("cannot flush {}", self.path.display()), error)
            })?;
        }
        Ok(())
    }
}

impl Sink for FileSink {
    fn open(&mut self, _ctx: &ComponentContext) -> Result<(), ComponentError> {
        self.writer().map(|_| ())
    }

    fn write_batch(&mut self, batch: Batch) -> Result<(), ComponentError> {
        let mut buf = std::mem::take(&mut self.buf);
        let result = encode(&batch, &mut buf).and_then(|()| {
            if buf.is_empty() {
                return Ok(());
            }
            let path = self.path.display().to_string();
            let writer = self.writer()?;
            let mut writer = writer.lock().unwrap_or_else(PoisonError::into_inner);
            writer
                .write_all(&buf)
                .map_err(|error| ComponentError::io(format!("cannot write {path}"), error))
        });
        self.buf = buf;
        result
    }

    /// The watermark moves after every batch and while idle: lines reach the file then, so a
    /// running pipeline's output can be followed (`tail -f`) without a flush per record.
    fn on_watermark(
        &mut self,
        _watermark_ms: tidewatch_api::EventTime,
    ) -> Result<(), ComponentError> {
        self.flush_writer()
    }

    fn flush(&mut self) -> Result<(), ComponentError> {
        self.flush_writer()
    }

    fn close(&mut self) -> Result<(), ComponentError> {
        let result = self.flush_writer();
        self.writer = None;
        result
    }
}

// ---------------------------------------------------------------------------------------------
// blackhole
// ---------------------------------------------------------------------------------------------

/// Options of the `blackhole` sink.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlackholeSinkConfig {
    /// Take at most this many records per second, sleeping in each write for as long as its
    /// records take at that rate (default 0: no limit): a deliberately slow sink, for tests
    /// and benchmarks of backpressure.
    #[serde(default)]
    pub records_per_sec: u64,
}

/// Makes `blackhole` sinks.
#[derive(Clone, Copy, Debug, Default)]
pub struct BlackholeSinkFactory;

impl SinkFactory for BlackholeSinkFactory {
    type Config = BlackholeSinkConfig;

    fn accepts(&self, _config: &BlackholeSinkConfig) -> Vec<Kind> {
        Kind::ALL.to_vec()
    }

    fn build(
        &self,
        config: &BlackholeSinkConfig,
        _ctx: &ComponentContext,
    ) -> Result<Box<dyn Sink>, ComponentError> {
        let mut sink = BlackholeSink::new();
        sink.records_per_sec = config.records_per_sec;
        Ok(Box::new(sink))
    }
}

/// Accepts every batch and drops it (benchmarks, tests); only counts the records.
#[derive(Debug, Default)]
pub struct BlackholeSink {
    received: u64,
    records_per_sec: u64,
}

impl BlackholeSink {
    /// A new blackhole.
    pub fn new() -> BlackholeSink {
        BlackholeSink::default()
    }

    /// The number of records received so far.
    pub fn received(&self) -> u64 {
        self.received
    }
}

impl Sink for BlackholeSink {
    fn write_batch(&mut self, batch: Batch) -> Result<(), ComponentError> {
        self.received += batch.len() as u64;
        if self.records_per_sec > 0 {
            let seconds = batch.len() as f64 / self.records_per_sec as f64;
            std::thread::sleep(std::time::Duration::from_secs_f64(seconds));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use tidewatch_api::{
        ConfigValue, DeviceId, ErrorRecord, PipelineInfo, RawBatch, ReadingBatch, Schema, Score,
        Window,
    };

    use super::*;

    fn context(dir: &Path, worker: usize, shared: &ProcessShared) -> ComponentContext {
        let pipeline = PipelineInfo { base_dir: dir.to_path_buf(), ..PipelineInfo::default() };
        ComponentContext::new(
            "out",
            "file",
            worker,
            2,
            Arc::new(pipeline),
            Arc::new(AtomicBool::new(false)),
        )
        .with_process_shared(shared.clone())
    }

    /// One batch of every kind, with `n` records each.
    fn batches(n: usize) -> Vec<Batch> {
        let schema = Arc::new(Schema::new(["vibration", "flow"]));
        let device = DeviceId::intern("pump-0001");
        let mut raw = RawBatch::new();
        let mut readings = ReadingBatch::new(Arc::clone(&schema));
        let mut windows = Vec::new();
        let mut scores = Vec::new();
        let mut errors = Vec::new();
        for i in 0..n {
            let i64_i = i as i64;
            raw.push("t/\"q\"", b"{\"a\":1}\n\xff", i64_i, i as u64);
            readings.push(device, i64_i, &[i as f32, f32::NAN], 0);
            windows.push(Window {
                device,
                start_ms: i64_i,
                end_ms: i64_i + 10,
                schema: Arc::clone(&schema),
                times: vec![i64_i, i64_i + 5],
                values: vec![1.0, 2.0, f32::INFINITY, 4.0],
                label: 1,
            });
            scores.push(Score {
                device,
                start_ms: i64_i,
                end_ms: i64_i + 10,
                detector: Arc::from("stats"),
                version: Arc::from("1"),
                score: 0.5,
                threshold: if i % 2 == 0 { Some(3.0) } else { None },
                anomaly: false,
                label: 0,
                columns: Arc::clone(&schema),
                values: vec![0.1, 0.2],
                labels: Default::default(),
            });
            errors.push(ErrorRecord::new(Arc::from("n"), "parse", "bad", Some("t"), Some(b"x")));
        }
        vec![
            Batch::Raw(raw),
            Batch::Readings(readings),
            Batch::Windows(windows),
            Batch::Scores(scores),
            Batch::Errors(errors),
        ]
    }

    fn read_lines(path: &Path) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(path).expect("read back");
        text.lines().map(|line| serde_json::from_str(line).expect("valid JSON line")).collect()
    }

    #[test]
    fn file_sink_round_trips_every_kind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ctx = context(dir.path(), 0, &ProcessShared::new());
        let config: FileSinkConfig = ConfigValue::parse("path = \"nested/dir/out.jsonl\"")
            .expect("toml")
            .deserialize()
            .expect("config");
        let mut sink = FileSinkFactory.build(&config, &ctx).expect("build");
        sink.open(&ctx).expect("open");
        for batch in batches(3) {
            sink.write_batch(batch).expect("write");
        }
        sink.close().expect("close");
        let lines = read_lines(&dir.path().join("nested/dir/out.jsonl"));
        assert_eq!(lines.len(), 15);
        assert_eq!(lines[0]["topic"], "t/\"q\"");
        assert_eq!(lines[3]["device"], "pump-0001");
        assert!(lines[3]["values"]["flow"].is_null());
        assert_eq!(lines[6]["steps"], 2);
        assert_eq!(lines[9]["detector"], "stats");
        assert_eq!(lines[12]["error_type"], "parse");
    }

    #[test]
    fn file_sink_truncates_unless_append() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ctx = context(dir.path(), 0, &ProcessShared::new());
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, "old line\n").expect("seed");
        let mut sink = FileSink::new(&FileSinkConfig::new("out.jsonl"), &ctx);
        sink.open(&ctx).expect("open");
        sink.write_batch(batches(1).remove(1)).expect("write");
        sink.close().expect("close");
        assert_eq!(read_lines(&path).len(), 1);
        let config = FileSinkConfig { path: "out.jsonl".into(), append: true };
        let mut sink = FileSink::new(&config, &ctx);
        sink.open(&ctx).expect("open");
        sink.write_batch(batches(2).remove(1)).expect("write");
        sink.close().expect("close");
        assert_eq!(read_lines(&path).len(), 3);
    }

    #[test]
    fn instances_of_one_path_share_one_writer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("shared.jsonl");
        let config = FileSinkConfig::new("shared.jsonl");
        let shared = ProcessShared::new();
        let (ctx0, ctx1) = (context(dir.path(), 0, &shared), context(dir.path(), 1, &shared));
        let mut first = FileSink::new(&config, &ctx0);
        let mut second = FileSink::new(&config, &ctx1);
        first.open(&ctx0).expect("open");
        first.write_batch(batches(5).remove(1)).expect("write");
        first.flush().expect("flush");
        // The second instance joins the open writer: it does not truncate the file.
        second.open(&ctx1).expect("open");
        assert!(Arc::ptr_eq(
            first.writer.as_ref().expect("open"),
            second.writer.as_ref().expect("open")
        ));
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for _ in 0..20 {
                    first.write_batch(batches(50).remove(1)).expect("write");
                }
            });
            scope.spawn(|| {
                for _ in 0..20 {
                    second.write_batch(batches(50).remove(3)).expect("write");
                }
            });
        });
        first.close().expect("close");
        second.close().expect("close");
        let lines = read_lines(&path);
        assert_eq!(lines.len(), 5 + 2 * 20 * 50);
        // Batches never interleave: kinds come in runs that are multiples of 50 after the first 5.
        let kinds: Vec<bool> =
            lines[5..].iter().map(|line| line.get("detector").is_some()).collect();
        for run in kinds.chunks(50) {
            assert!(run.iter().all(|kind| *kind == run[0]));
        }
    }

    #[test]
    fn a_second_process_writing_the_same_file_gets_an_error_and_truncates_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = FileSinkConfig::new("out.jsonl");
        // Two runs (as two processes of a cluster sharing a volume would be): two maps.
        let (one, other) = (ProcessShared::new(), ProcessShared::new());
        let first_ctx = context(dir.path(), 0, &one);
        let mut first = FileSink::new(&config, &first_ctx);
        first.open(&first_ctx).expect("open");
        first.write_batch(batches(4).remove(1)).expect("write");
        first.flush().expect("flush");
        let ctx = context(dir.path(), 0, &other);
        let error = FileSink::new(&config, &ctx).open(&ctx).expect_err("the file is taken");
        let message = error.to_string();
        assert!(message.contains("another process writes this file"), "{message}");
        assert!(message.contains("out.jsonl"), "{message}");
        assert_eq!(read_lines(&dir.path().join("out.jsonl")).len(), 4, "nothing truncated");
        // Once the first run is over, the file is free again.
        first.close().expect("close");
        drop((first, first_ctx, one));
        FileSink::new(&config, &ctx).open(&ctx).expect("free after the first run");
    }

    #[test]
    fn file_sink_rejects_bad_paths() {
        let ctx = ValidateContext::default();
        assert!(FileSinkFactory.validate(&FileSinkConfig::new(""), &ctx).is_err());
        assert!(FileSinkFactory.validate(&FileSinkConfig::new("out/"), &ctx).is_err());
        assert!(FileSinkFactory.validate(&FileSinkConfig::new("out.jsonl"), &ctx).is_ok());
        let unknown = ConfigValue::parse("path = \"a\"\nappend = true\nmode = \"x\"")
            .expect("toml")
            .deserialize::<FileSinkConfig>();
        assert!(unknown.is_err());
    }

    #[test]
    fn stdout_sink_writes_every_kind() {
        let mut sink = StdoutSink::new();
        for batch in batches(1) {
            sink.write_batch(batch).expect("write");
        }
        sink.close().expect("close");
        assert!(
            ConfigValue::parse("x = 1").expect("toml").deserialize::<StdoutSinkConfig>().is_err()
        );
        assert!(ConfigValue::parse("").expect("toml").deserialize::<StdoutSinkConfig>().is_ok());
    }

    #[test]
    fn blackhole_counts_and_drops() {
        let mut sink = BlackholeSink::new();
        for batch in batches(4) {
            sink.write_batch(batch).expect("write");
        }
        assert_eq!(sink.received(), 20);
        assert!(
            ConfigValue::parse("x = 1")
                .expect("toml")
                .deserialize::<BlackholeSinkConfig>()
                .is_err()
        );
    }

    #[test]
    fn every_sink_accepts_every_kind() {
        assert_eq!(StdoutSinkFactory.accepts(&StdoutSinkConfig {}), Kind::ALL);
        assert_eq!(FileSinkFactory.accepts(&FileSinkConfig::new("x")), Kind::ALL);
        assert_eq!(BlackholeSinkFactory.accepts(&BlackholeSinkConfig::default()), Kind::ALL);
    }
}
