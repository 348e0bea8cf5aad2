//! Publishing finished Parquet files off the dataflow's threads, through outages.
//!
//! One uploader per `parquet` sink component and process (shared by its workers): a thread
//! with a current-thread tokio runtime takes finished files in order and publishes each with
//! [`Store::put_atomic`], retrying with exponential backoff and jitter for as long as it takes.
//! While the store is away files wait in memory up to `max_pending_bytes`; beyond that they
//! are written to the spill folder (complete files, written then renamed), and a file still
//! waiting when the run ends is spilled too. A new run publishes what it finds in the spill
//! folder first. Nothing is dropped: every file is counted when queued, spilled, retried and
//! published.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};
use tidewatch_api::ComponentError;

use super::store::{Store, StoreError, key_path, list_local, write_then_rename};
use crate::backoff::Backoff;

/// A finished file waiting to be published.
#[derive(Debug)]
pub(crate) struct Finished {
    /// Its key under the lake's root: `<partition>/<name>.parquet`.
    pub(crate) key: String,
    /// Rows in it.
    pub(crate) rows: u64,
    /// Where the bytes are.
    pub(crate) body: Body,
}

#[derive(Debug)]
pub(crate) enum Body {
    Memory(Bytes),
    Spilled { path: PathBuf, bytes: u64 },
}

impl Finished {
    fn bytes(&self) -> u64 {
        match &self.body {
            Body::Memory(bytes) => bytes.len() as u64,
            Body::Spilled { bytes, .. } => *bytes,
        }
    }
}

/// The counters and gauges of one `parquet` sink component (label `component_id`).
#[derive(Clone, Debug)]
pub(crate) struct LakeMetrics {
    /// Rows in files published.
    pub(crate) rows: IntCounter,
    /// Files published.
    pub(crate) files: IntCounter,
    /// Bytes published.
    pub(crate) bytes: IntCounter,
    /// Failed publish attempts, by error type (`store`, `io`).
    pub(crate) failures: IntCounterVec,
    /// Files written to the spill folder.
    pub(crate) spilled: IntCounter,
    /// Finished files not yet published (in memory or spilled).
    pub(crate) pending_files: IntGauge,
    /// Rows in finished files not yet published.
    pub(crate) pending_rows: IntGauge,
    /// Bytes of finished files held in memory.
    pub(crate) pending_memory_bytes: IntGauge,
    /// Bytes of finished files in the spill folder.
    pub(crate) pending_spilled_bytes: IntGauge,
    /// Rows received and not yet in a finished file (open files).
    pub(crate) open_rows: IntGauge,
}

fn metric_error(error: prometheus::Error) -> ComponentError {
    ComponentError::Internal(format!("parquet sink metric: {error}"))
}

impl LakeMetrics {
    pub(crate) fn new(component_id: &str) -> Result<LakeMetrics, ComponentError> {
        let opts = |name: &str, help: &str| {
            Opts::new(name, help).const_label("component_id", component_id)
        };
        let counter = |name: &str, help: &str| IntCounter::with_opts(opts(name, help));
        let gauge = |name: &str, help: &str| IntGauge::with_opts(opts(name, help));
        Ok(LakeMetrics {
            rows: counter("tidewatch_lake_rows_written_total", "Rows in Parquet files published.")
                .map_err(metric_error)?,
            files: counter("tidewatch_lake_files_written_total", "Parquet files published.")
                .map_err(metric_error)?,
            bytes: counter(
                "tidewatch_lake_bytes_written_total",
                "Bytes of Parquet files published.",
            )
            .map_err(metric_error)?,
            failures: IntCounterVec::new(
                opts(
                    "tidewatch_lake_publish_failures_total",
                    "Failed attempts to publish a Parquet file (each is retried), by error type.",
                ),
                &["error_type"],
            )
            .map_err(metric_error)?,
            spilled: counter(
                "tidewatch_lake_spilled_files_total",
                "Parquet files written to the local spill folder while the store was away.",
            )
            .map_err(metric_error)?,
            pending_files: gauge(
                "tidewatch_lake_pending_files",
                "Finished Parquet files not yet published (in memory or spilled).",
            )
            .map_err(metric_error)?,
            pending_rows: gauge(
                "tidewatch_lake_pending_rows",
                "Rows in finished Parquet files not yet published.",
            )
            .map_err(metric_error)?,
            pending_memory_bytes: gauge(
                "tidewatch_lake_pending_memory_bytes",
                "Bytes of finished Parquet files held in memory, not yet published.",
            )
            .map_err(metric_error)?,
            pending_spilled_bytes: gauge(
                "tidewatch_lake_pending_spilled_bytes",
                "Bytes of finished Parquet files in the spill folder, not yet published.",
            )
            .map_err(metric_error)?,
            open_rows: gauge(
                "tidewatch_lake_open_rows",
                "Rows received and buffered in open (not yet finished) Parquet files.",
            )
            .map_err(metric_error)?,
        })
    }

    pub(crate) fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.rows.clone()),
            Box::new(self.files.clone()),
            Box::new(self.bytes.clone()),
            Box::new(self.failures.clone()),
            Box::new(self.spilled.clone()),
            Box::new(self.pending_files.clone()),
            Box::new(self.pending_rows.clone()),
            Box::new(self.pending_memory_bytes.clone()),
            Box::new(self.pending_spilled_bytes.clone()),
            Box::new(self.open_rows.clone()),
        ]
    }
}

/// How the uploader works.
#[derive(Clone, Debug)]
pub(crate) struct UploadSettings {
    pub(crate) spill_dir: PathBuf,
    pub(crate) max_pending_bytes: u64,
    pub(crate) backoff_initial_ms: u64,
    pub(crate) backoff_max_ms: u64,
}

#[derive(Debug, Default)]
struct Queue {
    files: VecDeque<Finished>,
    memory_bytes: u64,
    /// A file taken by the thread and not yet published or put back.
    in_flight: bool,
    /// The run ends: spill what waits and stop.
    stop: bool,
}

#[derive(Debug)]
struct State {
    queue: Mutex<Queue>,
    changed: Condvar,
    settings: UploadSettings,
    metrics: LakeMetrics,
    store: Store,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes `file` to the spill folder if it is in memory.
    fn spill(&self, file: Finished) -> Finished {
        let Body::Memory(bytes) = &file.body else { return file };
        let path = key_path(&self.settings.spill_dir, &file.key);
        match write_then_rename(&path, bytes) {
            Ok(()) => {
                self.metrics.spilled.inc();
                self.metrics.pending_memory_bytes.sub(bytes.len() as i64);
                self.metrics.pending_spilled_bytes.add(bytes.len() as i64);
                let size = bytes.len() as u64;
                Finished {
                    key: file.key,
                    rows: file.rows,
                    body: Body::Spilled { path, bytes: size },
                }
            }
            Err(error) => {
                self.metrics.failures.with_label_values(&["spill"]).inc();
                tracing::error!(%error, key = %file.key, "cannot spill a Parquet file; it stays in memory");
                file
            }
        }
    }
}

/// The finished files of an earlier run in the spill folder (hidden temporary files, which a
/// crash may leave, are not finished files).
fn spilled_files(dir: &Path) -> Vec<Finished> {
    let keys = match list_local(dir, "") {
        Ok(keys) => keys,
        Err(error) => {
            tracing::warn!(%error, spill_dir = %dir.display(), "cannot read the spill folder");
            return Vec::new();
        }
    };
    keys.into_iter()
        .filter(|key| key.ends_with(".parquet"))
        .map(|key| {
            let path = key_path(dir, &key);
            let bytes = std::fs::metadata(&path).map(|meta| meta.len()).unwrap_or(0);
            let rows = std::fs::File::open(&path)
                .ok()
                .and_then(|file| parquet::file::reader::SerializedFileReader::new(file).ok())
                .map(|reader| {
                    use parquet::file::reader::FileReader as _;
                    reader.metadata().file_metadata().num_rows().max(0) as u64
                })
                .unwrap_or(0);
            Finished { key, rows, body: Body::Spilled { path, bytes } }
        })
        .collect()
}

/// The uploader of one component in one process.
#[derive(Debug)]
pub(crate) struct Uploader {
    state: Arc<State>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Uploader {
    /// Starts the thread; files an earlier run left in the spill folder go first.
    pub(crate) fn start(
        store: Store,
        settings: UploadSettings,
        metrics: LakeMetrics,
    ) -> Result<Uploader, ComponentError> {
        let leftovers = spilled_files(&settings.spill_dir);
        if !leftovers.is_empty() {
            tracing::info!(
                files = leftovers.len(),
                spill_dir = %settings.spill_dir.display(),
                "publishing Parquet files an earlier run spilled"
            );
        }
        let mut queue = Queue::default();
        for file in leftovers {
            metrics.pending_files.inc();
            metrics.pending_rows.add(file.rows as i64);
            metrics.pending_spilled_bytes.add(file.bytes() as i64);
            queue.files.push_back(file);
        }
        let state = Arc::new(State {
            queue: Mutex::new(queue),
            changed: Condvar::new(),
            settings,
            metrics,
            store,
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|error| ComponentError::io("starting the lake's upload runtime", error))?;
        let thread_state = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("tidewatch-lake".to_owned())
            .spawn(move || run(&thread_state, &runtime))
            .map_err(|error| ComponentError::io("starting the lake's upload thread", error))?;
        Ok(Uploader { state, thread: Mutex::new(Some(thread)) })
    }

    /// Queues a finished file: in memory while under `max_pending_bytes`, else spilled.
    pub(crate) fn enqueue(&self, file: Finished) {
        let metrics = &self.state.metrics;
        metrics.pending_files.inc();
        metrics.pending_rows.add(file.rows as i64);
        metrics.pending_memory_bytes.add(file.bytes() as i64);
        let over = {
            let queue = self.state.lock();
            queue.memory_bytes + file.bytes() > self.state.settings.max_pending_bytes
        };
        let file = if over { self.state.spill(file) } else { file };
        let mut queue = self.state.lock();
        if let Body::Memory(bytes) = &file.body {
            queue.memory_bytes += bytes.len() as u64;
        }
        queue.files.push_back(file);
        self.state.changed.notify_all();
    }

    /// Waits up to `timeout` for every queued file to be published; returns how many are
    /// left (they stay queued).
    pub(crate) fn drain(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut queue = self.state.lock();
        loop {
            if queue.files.is_empty() && !queue.in_flight {
                return 0;
            }
            let now = Instant::now();
            if now >= deadline {
                return queue.files.len() + usize::from(queue.in_flight);
            }
            queue = self
                .state
                .changed
                .wait_timeout(queue, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for Uploader {
    /// The run ends: the thread spills what is still waiting in memory and stops.
    fn drop(&mut self) {
        self.state.lock().stop = true;
        self.state.changed.notify_all();
        let thread = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

fn run(state: &State, runtime: &tokio::runtime::Runtime) {
    let mut backoff =
        Backoff::new(state.settings.backoff_initial_ms, state.settings.backoff_max_ms)
            .with_jitter();
    loop {
        let file = {
            let mut queue = state.lock();
            loop {
                if queue.stop {
                    let left: Vec<Finished> = queue.files.drain(..).collect();
                    queue.memory_bytes = 0;
                    drop(queue);
                    let mut spilled = 0;
                    for file in left {
                        if matches!(state.spill(file).body, Body::Spilled { .. }) {
                            spilled += 1;
                        }
                    }
                    if spilled > 0 {
                        tracing::warn!(
                            files = spilled,
                            spill_dir = %state.settings.spill_dir.display(),
                            "Parquet files not yet published at the end of the run are in the spill folder; the next run publishes them"
                        );
                    }
                    return;
                }
                if let Some(file) = queue.files.pop_front() {
                    queue.in_flight = true;
                    break file;
                }
                queue = state.changed.wait(queue).unwrap_or_else(PoisonError::into_inner);
            }
        };
        let result = publish(state, runtime, &file);
        let mut queue = state.lock();
        match result {
            Ok(()) => {
                backoff.reset();
                let metrics = &state.metrics;
                metrics.files.inc();
                metrics.rows.inc_by(file.rows);
                metrics.bytes.inc_by(file.bytes());
                metrics.pending_files.dec();
                metrics.pending_rows.sub(file.rows as i64);
                match &file.body {
                    Body::Memory(bytes) => {
                        queue.memory_bytes -= bytes.len() as u64;
                        metrics.pending_memory_bytes.sub(bytes.len() as i64);
                    }
                    Body::Spilled { path, bytes } => {
                        metrics.pending_spilled_bytes.sub(*bytes as i64);
                        if let Err(error) = std::fs::remove_file(path) {
                            tracing::warn!(%error, path = %path.display(), "cannot remove a published spill file");
                        }
                    }
                }
                queue.in_flight = false;
                state.changed.notify_all();
            }
            Err(error) => {
                let error_type = match error {
                    StoreError::Io { .. } => "io",
                    _ => "store",
                };
                state.metrics.failures.with_label_values(&[error_type]).inc();
                let delay = backoff.next_delay();
                tracing::warn!(
                    store = %state.store.display(),
                    key = %file.key,
                    %error,
                    retry_in_ms = delay.as_millis() as u64,
                    "cannot publish a Parquet file; retrying"
                );
                // Back to the front (order kept); wait out the delay unless the run ends.
                queue.files.push_front(file);
                queue.in_flight = false;
                state.changed.notify_all();
                let deadline = Instant::now() + delay;
                while !queue.stop {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    queue = state
                        .changed
                        .wait_timeout(queue, deadline - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            }
        }
    }
}

fn publish(
    state: &State,
    runtime: &tokio::runtime::Runtime,
    file: &Finished,
) -> Result<(), StoreError> {
    let bytes = match &file.body {
        Body::Memory(bytes) => bytes.clone(),
        Body::Spilled { path, .. } => {
            Bytes::from(std::fs::read(path).map_err(|error| StoreError::Io {
                context: format!("reading the spill file {}", path.display()),
                source: error,
            })?)
        }
    };
    runtime.block_on(state.store.put_atomic(&file.key, bytes))
}
