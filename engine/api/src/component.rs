//! The traits a source, transform or sink implements, and what the engine hands them.
//!
//! Every hook but the data path has a default body, so a component implements only what it
//! needs. The engine calls them on the worker thread that owns the instance; one instance runs
//! on every worker (timely builds the same dataflow everywhere).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::error::ComponentError;
use crate::records::{Batch, ErrorRecord, EventTime, ReadingBatch};
use crate::shared::ProcessShared;

/// Pipeline-wide settings a component may read.
#[derive(Clone, Debug)]
pub struct PipelineInfo {
    /// The pipeline's name.
    pub name: String,
    /// How far behind the greatest event time seen a reading may arrive and still be on time, ms.
    pub out_of_orderness_ms: u64,
    /// After this long without data, a source's watermark advances with the wall clock, ms.
    pub idle_timeout_ms: u64,
    /// The folder of the pipeline file; relative paths in options resolve against it.
    pub base_dir: PathBuf,
    /// True when the pipeline takes checkpoints (`checkpoint_interval_secs` > 0): sinks hold
    /// their output back until the checkpoint that covers it is durable ([`Sink::pre_commit`]).
    pub checkpoints: bool,
}

impl Default for PipelineInfo {
    fn default() -> Self {
        PipelineInfo {
            name: "pipeline".to_owned(),
            out_of_orderness_ms: 5_000,
            idle_timeout_ms: 1_000,
            base_dir: PathBuf::from("."),
            checkpoints: false,
        }
    }
}

/// The engine's Prometheus registry (served on `/metrics`), with an identity.
///
/// Components register their own collectors in it. One engine run hands the same
/// `MetricsRegistry` to every worker, so [`MetricsRegistry::id`] tells a component whether
/// another worker's instance already registered a collector there (register once per
/// registry and component id, share the collector between workers).
#[derive(Clone, Debug)]
pub struct MetricsRegistry {
    registry: prometheus::Registry,
    id: u64,
}

impl MetricsRegistry {
    /// Wraps a registry, giving it a process-unique id.
    pub fn new(registry: prometheus::Registry) -> MetricsRegistry {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        MetricsRegistry { registry, id: NEXT.fetch_add(1, Ordering::Relaxed) }
    }

    /// The registry.
    pub fn registry(&self) -> &prometheus::Registry {
        &self.registry
    }

    /// A process-unique id: equal for clones of the same `MetricsRegistry`.
    pub fn id(&self) -> u64 {
        self.id
    }
}

/// What the engine tells a component instance about where it runs.
#[derive(Clone, Debug)]
pub struct ComponentContext {
    /// The component's id in the pipeline file.
    pub component_id: Arc<str>,
    /// The component's type name.
    pub component_type: Arc<str>,
    /// This worker's index, `0..workers`.
    pub worker_index: usize,
    /// Number of workers in the whole dataflow.
    pub workers: usize,
    /// Pipeline-wide settings.
    pub pipeline: Arc<PipelineInfo>,
    shutdown: Arc<AtomicBool>,
    metrics: Option<MetricsRegistry>,
    shared: ProcessShared,
    waker: Option<Waker>,
}

/// Wakes the worker that polls a source, from any thread.
///
/// A source whose data arrives on a thread of its own (a network client) calls
/// [`Waker::wake`] when it queued something for `poll`: the engine then polls it at once
/// instead of after the `wake_after_ms` of its last [`SourcePoll::Idle`], so a lone reading
/// waits for nobody.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use tidewatch_api::{ComponentContext, Waker};
///
/// let woken = Arc::new(AtomicUsize::new(0));
/// let counter = Arc::clone(&woken);
/// let ctx = ComponentContext::for_test("in", "mqtt")
///     .with_waker(Waker::new(move || { counter.fetch_add(1, Ordering::Relaxed); }));
/// let waker = ctx.waker().cloned().expect("the engine set one");
/// std::thread::spawn(move || waker.wake()).join().expect("woken");
/// assert_eq!(woken.load(Ordering::Relaxed), 1);
/// ```
#[derive(Clone)]
pub struct Waker(Arc<dyn Fn() + Send + Sync>);

impl Waker {
    /// A waker that runs `wake` (the engine's: activate the source's operator).
    pub fn new(wake: impl Fn() + Send + Sync + 'static) -> Waker {
        Waker(Arc::new(wake))
    }

    /// Asks for the source to be polled soon.
    pub fn wake(&self) {
        (self.0)();
    }
}

impl fmt::Debug for Waker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Waker")
    }
}

impl ComponentContext {
    /// A context; the engine makes these, tests and benchmarks may too.
    pub fn new(
        component_id: &str,
        component_type: &str,
        worker_index: usize,
        workers: usize,
        pipeline: Arc<PipelineInfo>,
        shutdown: Arc<AtomicBool>,
    ) -> ComponentContext {
        ComponentContext {
            component_id: Arc::from(component_id),
            component_type: Arc::from(component_type),
            worker_index,
            workers: workers.max(1),
            pipeline,
            shutdown,
            metrics: None,
            shared: ProcessShared::new(),
            waker: None,
        }
    }

    /// Hands the state shared by the workers of this process in this run to the component
    /// (the engine does, with one [`ProcessShared`] per run). Without it every context has a
    /// map of its own, so nothing is shared.
    pub fn with_process_shared(mut self, shared: ProcessShared) -> ComponentContext {
        self.shared = shared;
        self
    }

    /// The state shared by the workers of this process in this run, under any key (for
    /// example a file path that several components write).
    pub fn process_shared(&self) -> &ProcessShared {
        &self.shared
    }

    /// This component's `T` in this process and run: the first worker's call makes it, the
    /// others get the same instance (waiting while it is made); it drops with the run.
    ///
    /// ```
    /// use std::sync::atomic::{AtomicU64, Ordering};
    /// use tidewatch_api::{ComponentContext, ProcessShared};
    ///
    /// let shared = ProcessShared::new();
    /// let worker0 = ComponentContext::for_test("sim", "simulator").with_process_shared(shared.clone());
    /// let worker1 = ComponentContext::for_test("sim", "simulator").with_process_shared(shared);
    /// let a = worker0.shared(|| Ok::<_, ()>(AtomicU64::new(0))).expect("made");
    /// let b = worker1.shared(|| Ok::<_, ()>(AtomicU64::new(0))).expect("shared");
    /// a.fetch_add(1, Ordering::Relaxed);
    /// assert_eq!(b.load(Ordering::Relaxed), 1);
    /// ```
    pub fn shared<T: Send + Sync + 'static, E>(
        &self,
        make: impl FnOnce() -> Result<T, E>,
    ) -> Result<Arc<T>, E> {
        self.shared.get_or_try_init(&self.component_id, make)
    }

    /// Hands the engine's metrics registry to the component (the engine does).
    pub fn with_metrics_registry(mut self, registry: MetricsRegistry) -> ComponentContext {
        self.metrics = Some(registry);
        self
    }

    /// The registry served on the engine's `/metrics`, where a component may register
    /// collectors of its own; `None` outside an engine (unit tests, benchmarks).
    pub fn metrics_registry(&self) -> Option<&MetricsRegistry> {
        self.metrics.as_ref()
    }

    /// Hands the source its [`Waker`] (the engine does, for every source).
    pub fn with_waker(mut self, waker: Waker) -> ComponentContext {
        self.waker = Some(waker);
        self
    }

    /// The waker of the source this context belongs to; `None` outside an engine and for
    /// transforms and sinks.
    pub fn waker(&self) -> Option<&Waker> {
        self.waker.as_ref()
    }

    /// A context for a single worker with default pipeline settings (tests, benchmarks).
    pub fn for_test(component_id: &str, component_type: &str) -> ComponentContext {
        ComponentContext::new(
            component_id,
            component_type,
            0,
            1,
            Arc::new(PipelineInfo::default()),
            Arc::new(AtomicBool::new(false)),
        )
    }

    /// True once the process was asked to stop (SIGINT/SIGTERM): unbounded sources should end.
    pub fn shutdown_requested(&self) -> bool {
        self.shutdown.load(Ordering::Relaxed)
    }

    /// Asks the engine to stop the pipeline gracefully, as SIGINT does: sources end, what is
    /// in flight drains (e.g. the `stdout` sink once its reader went away).
    pub fn request_shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
    }

    /// Resolves a path from an option against the pipeline file's folder.
    pub fn resolve_path(&self, path: &str) -> PathBuf {
        resolve_path(&self.pipeline.base_dir, path)
    }
}

/// `path` as written in an option: itself when absolute, else relative to `base` (the
/// pipeline file's folder).
pub fn resolve_path(base: &Path, path: impl AsRef<Path>) -> PathBuf {
    let path = path.as_ref();
    if path.is_absolute() { path.to_path_buf() } else { base.join(path) }
}

/// Where a component puts what it produces; the engine drains it after every call.
///
/// `emit` goes to the main output, `emit_to` to a named output (`<id>.<name>`, for transforms
/// that declare named outputs), `error` to `<id>.errors`, `late` to `<id>.late`, and
/// `discard` only counts (`tidewatch_component_discarded_events_total{reason}`).
#[derive(Debug)]
pub struct Outputs {
    component: Arc<str>,
    main: Vec<Batch>,
    named: Vec<(usize, Batch)>,
    errors: Vec<ErrorRecord>,
    late: Vec<ReadingBatch>,
    discarded: Vec<(&'static str, u64)>,
    batch_watermark: EventTime,
}

impl Outputs {
    /// Empty outputs for component `component`.
    pub fn new(component: &str) -> Outputs {
        Outputs {
            component: Arc::from(component),
            main: Vec::new(),
            named: Vec::new(),
            errors: Vec::new(),
            late: Vec::new(),
            discarded: Vec::new(),
            batch_watermark: EventTime::MIN,
        }
    }

    /// The event-time watermark its producer had when it sent the batch being processed.
    ///
    /// Records older than it were already behind the watermark when they left their
    /// event-time assigner: a window that ends at or before it is closed for them, whatever
    /// the scheduling. Deciding lateness with it (and not only with `on_watermark`) keeps the
    /// output deterministic. `EventTime::MIN` when unknown.
    pub fn batch_watermark(&self) -> EventTime {
        self.batch_watermark
    }

    /// Sets [`Outputs::batch_watermark`] (the engine does, before each `process_batch`).
    pub fn set_batch_watermark(&mut self, watermark: EventTime) {
        self.batch_watermark = watermark;
    }

    /// The id of the component these outputs belong to.
    pub fn component_id(&self) -> &Arc<str> {
        &self.component
    }

    /// Sends a batch to the main output (empty batches are dropped).
    pub fn emit(&mut self, batch: Batch) {
        if !batch.is_empty() {
            self.main.push(batch);
        }
    }

    /// Sends a batch to named output number `port`: the position of its name in what the
    /// factory's `named_outputs` returned (empty batches are dropped). The engine drops a
    /// batch for a port the transform did not declare.
    pub fn emit_to(&mut self, port: usize, batch: Batch) {
        if !batch.is_empty() {
            self.named.push((port, batch));
        }
    }

    /// Sends a record that could not be processed to `<id>.errors`.
    pub fn error(
        &mut self,
        error_type: &str,
        reason: impl Into<String>,
        topic: Option<&str>,
        payload: Option<&[u8]>,
    ) {
        let record =
            ErrorRecord::new(Arc::clone(&self.component), error_type, reason, topic, payload);
        self.errors.push(record);
    }

    /// Sends a prepared error record to `<id>.errors`.
    pub fn error_record(&mut self, record: ErrorRecord) {
        self.errors.push(record);
    }

    /// Sends readings that arrived after their window closed to `<id>.late`.
    pub fn late(&mut self, batch: ReadingBatch) {
        if !batch.is_empty() {
            self.late.push(batch);
        }
    }

    /// Counts `count` records dropped on purpose (filtered, deduplicated ...) for `reason`.
    pub fn discard(&mut self, reason: &'static str, count: u64) {
        if count > 0 {
            self.discarded.push((reason, count));
        }
    }

    /// Records waiting on the main and the named outputs.
    pub fn pending_records(&self) -> usize {
        self.main.iter().chain(self.named.iter().map(|(_, batch)| batch)).map(Batch::len).sum()
    }

    /// True when nothing was produced since the last drain.
    pub fn is_empty(&self) -> bool {
        self.main.is_empty()
            && self.named.is_empty()
            && self.errors.is_empty()
            && self.late.is_empty()
            && self.discarded.is_empty()
    }

    /// Takes the main-output batches.
    pub fn take_main(&mut self) -> Vec<Batch> {
        std::mem::take(&mut self.main)
    }

    /// Takes the batches sent to named outputs, each with its port number, in the order sent.
    pub fn take_named(&mut self) -> Vec<(usize, Batch)> {
        std::mem::take(&mut self.named)
    }

    /// Takes the error records.
    pub fn take_errors(&mut self) -> Vec<ErrorRecord> {
        std::mem::take(&mut self.errors)
    }

    /// Takes the late readings.
    pub fn take_late(&mut self) -> Vec<ReadingBatch> {
        std::mem::take(&mut self.late)
    }

    /// Takes the discard counts.
    pub fn take_discarded(&mut self) -> Vec<(&'static str, u64)> {
        std::mem::take(&mut self.discarded)
    }
}

/// What a source's [`Source::poll`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourcePoll {
    /// Data was emitted (or more is ready): poll again soon.
    Ready,
    /// Nothing now; poll again after about this many ms (or earlier if woken).
    Idle {
        /// Suggested delay before the next poll, ms.
        wake_after_ms: u64,
    },
    /// The source is exhausted (a finite file, a simulator with a `count`): it ends.
    Finished,
}

/// A source: produces batches of raw messages.
///
/// A poll should emit at most about one batch (the component's `batch_size`) and return, so
/// the worker can move data on; long waits belong in [`SourcePoll::Idle`].
pub trait Source {
    /// Called once before the first poll (connect, open files).
    fn open(&mut self, _ctx: &ComponentContext) -> Result<(), ComponentError> {
        Ok(())
    }
    /// Emits what is available into `out`.
    fn poll(&mut self, out: &mut Outputs) -> Result<SourcePoll, ComponentError>;
    /// The position of everything emitted so far (offsets, a line number), taken at a
    /// checkpoint; `None` if the source cannot resume (it starts afresh after a restart).
    fn snapshot(&mut self) -> Result<Option<Vec<u8>>, ComponentError> {
        Ok(None)
    }
    /// Resumes from a [`Source::snapshot`], after `open`. Called once per instance that took
    /// the checkpoint (the number of workers may have changed): merge what they hold.
    fn restore(&mut self, _state: &[u8]) -> Result<(), ComponentError> {
        Ok(())
    }
    /// The checkpoint holding the position of [`Source::snapshot`] is durable: commit it to
    /// the outside world (Kafka offsets, MQTT acknowledgements withheld until now).
    fn commit(&mut self) -> Result<(), ComponentError> {
        Ok(())
    }
    /// Called once when the source finished or the pipeline stops.
    fn close(&mut self) -> Result<(), ComponentError> {
        Ok(())
    }
    /// The consumer lag the source can see after a poll: records waiting to be consumed, and
    /// how many can wait before the source stops taking more (its flow-control bound); `None`
    /// when it has no such notion (files, the simulator). The engine exports them as
    /// `tidewatch_source_backlog_records` and `tidewatch_source_backlog_capacity_records`.
    fn backlog(&self) -> Option<Backlog> {
        None
    }
    /// True once the source can take data (a Kafka consumer that has its partitions); the
    /// engine's `/readyz` answers ready only when every source instance is. Checked after each
    /// poll; a source that finishes counts as ready.
    fn ready(&self) -> bool {
        true
    }
}

/// What waits at a source (see [`Source::backlog`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Records received from the outside world and not yet consumed by the pipeline.
    pub records: u64,
    /// The most that can wait; beyond it the outside world holds them (an MQTT broker's
    /// queue, a Kafka partition).
    pub capacity: u64,
}

/// A transform: turns batches into batches, keeping whatever state it needs.
pub trait Transform {
    /// Called once before the first batch.
    fn open(&mut self, _ctx: &ComponentContext) -> Result<(), ComponentError> {
        Ok(())
    }
    /// Processes one batch.
    fn process_batch(&mut self, batch: Batch, out: &mut Outputs);
    /// Called when the event-time watermark of the input advances to `watermark_ms`: no more
    /// on-time record older than it will arrive. Windows close here.
    fn on_watermark(&mut self, _watermark_ms: EventTime, _out: &mut Outputs) {}
    /// State to checkpoint; `None` if stateless.
    fn snapshot(&mut self) -> Result<Option<Vec<u8>>, ComponentError> {
        Ok(None)
    }
    /// Restores from a [`Transform::snapshot`], after `open`. Called once per instance that
    /// took the checkpoint (the number of workers may have changed): merge what they hold, and
    /// a keyed transform keeps the devices this worker owns
    /// ([`DeviceId::worker`](crate::DeviceId::worker) of `worker_index` among `workers`).
    fn restore(&mut self, _state: &[u8]) -> Result<(), ComponentError> {
        Ok(())
    }
    /// Called once when the input ended (after a final `on_watermark(EventTime::MAX)`).
    fn close(&mut self, _out: &mut Outputs) {}
}

/// A sink: writes batches out of the pipeline.
pub trait Sink {
    /// Called once before the first batch.
    fn open(&mut self, _ctx: &ComponentContext) -> Result<(), ComponentError> {
        Ok(())
    }
    /// Writes one batch. An error is counted against the sink and logged; the pipeline goes on.
    fn write_batch(&mut self, batch: Batch) -> Result<(), ComponentError>;
    /// Called when the event-time watermark of the input advances.
    fn on_watermark(&mut self, _watermark_ms: EventTime) -> Result<(), ComponentError> {
        Ok(())
    }
    /// Makes what was written durable (flush buffers, commit).
    fn flush(&mut self) -> Result<(), ComponentError> {
        Ok(())
    }
    /// State to checkpoint; `None` if stateless.
    fn snapshot(&mut self) -> Result<Option<Vec<u8>>, ComponentError> {
        Ok(None)
    }
    /// Restores from a [`Sink::snapshot`], after `open` (once per instance that took the
    /// checkpoint).
    fn restore(&mut self, _state: &[u8]) -> Result<(), ComponentError> {
        Ok(())
    }
    /// A checkpoint's cut reached the sink: everything written before it must be either
    /// durable now (flush; the default) or returned as [`Staged`] output, which the engine
    /// stores with the checkpoint and hands to [`Sink::publisher`] once the checkpoint is
    /// complete (and again after a crash, so publishing must be idempotent).
    fn pre_commit(&mut self) -> Result<Vec<Staged>, ComponentError> {
        self.flush().map(|()| Vec::new())
    }
    /// Publishes staged output (see [`Sink::pre_commit`]); `None` for sinks that stage nothing.
    fn publisher(&self) -> Option<Arc<dyn Publisher>> {
        None
    }
    /// Called once at the end; flushes by default.
    fn close(&mut self) -> Result<(), ComponentError> {
        self.flush()
    }
}

/// Sink output held back until the checkpoint covering it is durable (see [`Sink::pre_commit`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Staged {
    /// Where it is published (a key under the sink's destination, e.g. a Parquet file's path).
    pub key: String,
    /// The content.
    pub bytes: Vec<u8>,
}

/// Publishes a sink's [`Staged`] output once its checkpoint is complete. Called from the
/// engine's checkpoint thread, and again at recovery for the latest checkpoint: publishing
/// the same key twice must leave one copy.
pub trait Publisher: Send + Sync {
    /// Makes `bytes` visible at `key`, atomically (a reader sees all of it or nothing).
    fn publish(&self, key: &str, bytes: &[u8]) -> Result<(), ComponentError>;
}
