//! Checkpoints: consistent cuts of every operator's state and every source's position, so a
//! pipeline killed at any moment resumes where its last checkpoint left it.
//!
//! The design (docs/architecture.md, "Checkpoints"): a checkpoint thread opens an epoch
//! every `checkpoint_interval_secs`; each source instance, at its next activation, records
//! its position, sends a barrier down every output and pauses; each operator counts the
//! barriers of the epoch on its input (one per upstream instance that feeds it), and when it
//! has them all (every record before the cut is processed, channels being FIFO) it snapshots,
//! forwards the barrier and pauses too; sinks pre-commit (staged output). When every instance
//! has reported, the cut is complete: everything resumes, and the thread writes the states
//! and the manifest ([`manifest`]) to the store ([`store`]), then publishes the staged output
//! and lets the sources commit (Kafka offsets, MQTT acknowledgements).
//!
//! [`protocol`] is the decision logic alone, unit-tested with an in-memory store.

pub(crate) mod control;
pub mod manifest;
pub mod protocol;
pub mod store;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Opts};
use tidewatch_api::{ComponentError, Publisher};
use timely::scheduling::activate::SyncActivator;

pub use self::manifest::{CheckpointError, Loaded, Manifest};
use self::protocol::{Cut, Instance, Protocol, Report};
pub use self::store::{CheckpointStore, LocalStore, MemoryStore, StoreError};

/// How long a graceful stop waits for its final checkpoint before it stops without one.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// The checkpoint metrics of a run.
#[derive(Clone, Debug)]
pub struct CheckpointMetrics {
    duration: Histogram,
    size: IntGauge,
    last_completed: IntGauge,
    failures: IntCounter,
    epoch: IntGauge,
}

impl CheckpointMetrics {
    fn new(registry: &prometheus::Registry, interval: Duration) -> CheckpointMetrics {
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "tidewatch_checkpoint_duration_seconds",
                "From opening a checkpoint to its manifest being durable.",
            )
            .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
        )
        .unwrap_or_else(|error| unreachable!("static histogram: {error}"));
        let gauge = |name: &str, help: &str| {
            IntGauge::with_opts(Opts::new(name, help))
                .unwrap_or_else(|error| unreachable!("static gauge {name}: {error}"))
        };
        let size =
            gauge("tidewatch_checkpoint_size_bytes", "Bytes written by the last checkpoint.");
        let last_completed = gauge(
            "tidewatch_checkpoint_last_completed_timestamp_seconds",
            "When the last checkpoint completed, seconds since the Unix epoch.",
        );
        let epoch =
            gauge("tidewatch_checkpoint_epoch", "The epoch of the last complete checkpoint.");
        let interval_gauge = gauge(
            "tidewatch_checkpoint_interval_seconds",
            "The configured checkpoint interval (checkpoint_interval_secs).",
        );
        interval_gauge.set(interval.as_secs() as i64);
        let failures = IntCounter::with_opts(Opts::new(
            "tidewatch_checkpoint_failures_total",
            "Checkpoints that could not be written or did not complete.",
        ))
        .unwrap_or_else(|error| unreachable!("static counter: {error}"));
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(duration.clone()),
            Box::new(size.clone()),
            Box::new(last_completed.clone()),
            Box::new(epoch.clone()),
            Box::new(interval_gauge.clone()),
            Box::new(failures.clone()),
        ];
        for collector in collectors {
            if let Err(error) = registry.register(collector) {
                tracing::debug!(%error, "checkpoint metric registered twice");
            }
        }
        CheckpointMetrics { duration, size, last_completed, failures, epoch }
    }
}

/// What the checkpoints of a run need to know about the pipeline.
#[derive(Clone, Debug)]
pub struct CheckpointSettings {
    /// The store.
    pub store: Arc<dyn CheckpointStore>,
    /// Between two checkpoints.
    pub interval: Duration,
    /// Complete checkpoints kept.
    pub keep: usize,
}

/// The checkpoints of one run, shared by the workers and the checkpoint thread.
pub struct Checkpoints {
    protocol: Mutex<Protocol>,
    changed: Condvar,
    /// The epoch whose barrier sources send next (0: none yet).
    requested: AtomicU64,
    /// The epoch after which sources end (a graceful stop); 0: none.
    stop_epoch: AtomicU64,
    /// The latest epoch every instance reached: paused operators resume.
    aligned: AtomicU64,
    /// The latest durable epoch: sources commit.
    committed: AtomicU64,
    /// Stop without a final checkpoint (it could not complete).
    abandoned: AtomicBool,
    /// The run is over (the workers are gone).
    finished: AtomicBool,
    activators: Mutex<Vec<SyncActivator>>,
    publishers: Mutex<BTreeMap<String, Arc<dyn Publisher>>>,
    /// Staged output of a cut that could not be written: it goes into the next one.
    carried: Mutex<BTreeMap<Instance, Vec<tidewatch_api::Staged>>>,
    /// True in a single process and in process 0 of a cluster: the protocol and the thread
    /// run here. A follower sends its reports to the leader ([`control`]).
    leader: bool,
    /// A follower's reports and end notices waiting for the control dataflow.
    outbox: Mutex<Vec<control::Control>>,
    /// The leader's checkpoint thread is done (a follower learns it from a decision).
    thread_done: AtomicBool,
    /// Another process of the cluster was asked to stop.
    remote_stop: AtomicBool,
    restored: Option<Loaded>,
    settings: CheckpointSettings,
    component_ids: Vec<String>,
    pipeline: String,
    workers: usize,
    metrics: CheckpointMetrics,
}

impl std::fmt::Debug for Checkpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoints")
            .field("store", &self.settings.store.describe())
            .field("requested", &self.requested.load(Ordering::Relaxed))
            .field("committed", &self.committed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Checkpoints {
    /// Prepares the checkpoints of a run: reads the latest complete checkpoint (skipping
    /// damaged ones) and discards the remains of later, incomplete ones.
    ///
    /// `workers` counts the workers of every process; `leader` is false in processes other
    /// than 0 of a cluster (they only read the checkpoint; process 0 decides and writes).
    pub fn open(
        settings: CheckpointSettings,
        pipeline: &str,
        component_ids: Vec<String>,
        workers: usize,
        leader: bool,
        registry: &prometheus::Registry,
    ) -> Result<Checkpoints, StoreError> {
        let store = Arc::clone(&settings.store);
        let (restored, _) = manifest::latest(&*store)?;
        let epoch = restored.as_ref().map_or(0, |loaded| loaded.manifest.epoch);
        if leader {
            manifest::discard_after(&*store, epoch)?;
        }
        match &restored {
            Some(loaded) => tracing::info!(
                epoch,
                store = %store.describe(),
                workers = loaded.manifest.workers,
                "restoring from checkpoint"
            ),
            None => tracing::info!(store = %store.describe(), "no checkpoint yet: starting afresh"),
        }
        let metrics = CheckpointMetrics::new(registry, settings.interval);
        metrics.epoch.set(epoch as i64);
        let participants = component_ids.len() * workers;
        Ok(Checkpoints {
            protocol: Mutex::new(Protocol::new(participants, epoch)),
            changed: Condvar::new(),
            requested: AtomicU64::new(epoch),
            stop_epoch: AtomicU64::new(0),
            aligned: AtomicU64::new(epoch),
            committed: AtomicU64::new(epoch),
            abandoned: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            activators: Mutex::new(Vec::new()),
            publishers: Mutex::new(BTreeMap::new()),
            carried: Mutex::new(BTreeMap::new()),
            leader,
            outbox: Mutex::new(Vec::new()),
            thread_done: AtomicBool::new(false),
            remote_stop: AtomicBool::new(false),
            restored,
            settings,
            component_ids,
            pipeline: pipeline.to_owned(),
            workers,
            metrics,
        })
    }

    /// The epoch of the checkpoint the run resumes from (0: none).
    pub fn restored_epoch(&self) -> u64 {
        self.restored.as_ref().map_or(0, |loaded| loaded.manifest.epoch)
    }

    /// The checkpoint the run resumes from.
    pub fn restored(&self) -> Option<&Loaded> {
        self.restored.as_ref()
    }

    /// The store.
    pub fn store(&self) -> &dyn CheckpointStore {
        &*self.settings.store
    }

    /// The epoch whose barrier sources send next.
    pub fn requested(&self) -> u64 {
        self.requested.load(Ordering::SeqCst)
    }

    /// True when sources end after the barrier of `epoch` (a graceful stop).
    pub fn is_stop(&self, epoch: u64) -> bool {
        self.stop_epoch.load(Ordering::SeqCst) == epoch && epoch > 0
    }

    /// The latest epoch every instance reached.
    pub fn aligned(&self) -> u64 {
        self.aligned.load(Ordering::SeqCst)
    }

    /// The latest durable epoch.
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::SeqCst)
    }

    /// True when the stop goes on without a final checkpoint.
    pub fn abandoned(&self) -> bool {
        self.abandoned.load(Ordering::SeqCst)
    }

    /// Registers an operator to wake when an epoch aligns or commits.
    pub fn register(&self, activator: SyncActivator) {
        lock(&self.activators).push(activator);
    }

    /// Registers the publisher of a sink component (once per component is enough).
    pub fn register_publisher(&self, component: &str, publisher: Arc<dyn Publisher>) {
        lock(&self.publishers).entry(component.to_owned()).or_insert(publisher);
    }

    fn wake_all(&self) {
        for activator in lock(&self.activators).iter() {
            // An error means the worker is gone: nothing to wake.
            let _ = activator.activate();
        }
    }

    fn settle(&self, protocol: &Protocol) {
        if protocol.is_complete()
            && let Some(epoch) = protocol.open_epoch()
        {
            self.aligned.fetch_max(epoch, Ordering::SeqCst);
            self.wake_all();
        }
        self.changed.notify_all();
    }

    /// True where the protocol runs (a single process, or process 0 of a cluster).
    pub fn is_leader(&self) -> bool {
        self.leader
    }

    /// A follower's messages for the leader, taken.
    pub(crate) fn take_outbox(&self) -> Vec<control::Control> {
        std::mem::take(&mut *lock(&self.outbox))
    }

    /// The leader's decisions as they stand.
    pub(crate) fn decision(&self) -> control::Decision {
        control::Decision {
            requested: self.requested(),
            stop_epoch: self.stop_epoch.load(Ordering::SeqCst),
            aligned: self.aligned(),
            committed: self.committed(),
            abandoned: self.abandoned(),
            done: self.thread_done.load(Ordering::SeqCst),
        }
    }

    /// True once the leader's thread is done (nothing more will be decided).
    pub(crate) fn decided_done(&self) -> bool {
        self.thread_done.load(Ordering::SeqCst)
    }

    /// A follower applies the leader's decisions and wakes its operators.
    pub(crate) fn apply(&self, decision: control::Decision) {
        if decision.stop_epoch > 0 {
            self.stop_epoch.store(decision.stop_epoch, Ordering::SeqCst);
        }
        self.requested.fetch_max(decision.requested, Ordering::SeqCst);
        self.aligned.fetch_max(decision.aligned, Ordering::SeqCst);
        let before = self.committed.fetch_max(decision.committed, Ordering::SeqCst);
        if decision.committed > before && !self.leader {
            self.metrics.epoch.set(decision.committed as i64);
            self.metrics.last_completed.set(tidewatch_api::records::now_ms() / 1_000);
        }
        if decision.abandoned {
            self.abandoned.store(true, Ordering::SeqCst);
        }
        if decision.done && !self.thread_done.swap(true, Ordering::SeqCst) {
            tracing::debug!("the leader's checkpoint thread is done");
        }
        self.wake_all();
    }

    /// The leader takes the final checkpoint of a stop another process was asked for.
    pub(crate) fn request_stop(&self) {
        self.remote_stop.store(true, Ordering::SeqCst);
        let _guard = lock(&self.protocol);
        self.changed.notify_all();
    }

    /// `instance` reached the barrier of `epoch`.
    pub fn report(&self, instance: Instance, epoch: u64, report: Report) {
        if !self.leader {
            lock(&self.outbox).push(control::Control::Report { instance, epoch, report });
            return;
        }
        let mut protocol = lock(&self.protocol);
        if !protocol.report(instance, epoch, report) {
            tracing::debug!(?instance, epoch, "a report for an epoch that is not open");
        }
        self.settle(&protocol);
    }

    /// `instance` ended; its final report stands for it from epoch `from` on.
    pub fn end(&self, instance: Instance, from: u64, report: Report) {
        if !self.leader {
            lock(&self.outbox).push(control::Control::End { instance, from, report });
            return;
        }
        let mut protocol = lock(&self.protocol);
        protocol.end(instance, from, report);
        self.settle(&protocol);
    }

    /// The workers are gone: the checkpoint thread stops waiting.
    pub fn finish(&self) {
        self.finished.store(true, Ordering::SeqCst);
        let _guard = lock(&self.protocol);
        self.changed.notify_all();
    }

    /// Waits until `ready` holds (checked under the protocol lock) or `deadline` passes.
    fn wait_for(
        &self,
        deadline: Instant,
        mut ready: impl FnMut(&Protocol) -> bool,
    ) -> MutexGuard<'_, Protocol> {
        let mut protocol = lock(&self.protocol);
        loop {
            if ready(&protocol) || self.finished.load(Ordering::SeqCst) {
                return protocol;
            }
            let now = Instant::now();
            if now >= deadline {
                return protocol;
            }
            protocol = self
                .changed
                .wait_timeout(protocol, (deadline - now).min(Duration::from_millis(200)))
                .map(|(guard, _)| guard)
                .unwrap_or_else(|poisoned| poisoned.into_inner().0);
        }
    }

    /// The checkpoint thread: an epoch every interval, a final one at a stop (`stopping`
    /// set) or when every instance ended, until the run is over.
    pub fn run_thread(&self, stopping: &AtomicBool) {
        self.thread_loop(stopping);
        tracing::debug!("the checkpoint thread is done");
        self.thread_done.store(true, Ordering::SeqCst);
        self.wake_all();
    }

    fn thread_loop(&self, stopping: &AtomicBool) {
        let stopping =
            || stopping.load(Ordering::SeqCst) || self.remote_stop.load(Ordering::SeqCst);
        loop {
            let started = Instant::now();
            let interval_end = started + self.settings.interval;
            // Sleep out the interval, waking early for a stop or the natural end.
            drop(self.wait_for(interval_end, |protocol| stopping() || protocol.all_ended()));
            let all_ended = lock(&self.protocol).all_ended();
            if self.finished.load(Ordering::SeqCst) && !all_ended {
                return;
            }
            let stop = stopping();
            let opened = Instant::now();
            let epoch = {
                let mut protocol = lock(&self.protocol);
                let epoch = protocol.begin(stop);
                if stop {
                    self.stop_epoch.store(epoch, Ordering::SeqCst);
                }
                self.requested.store(epoch, Ordering::SeqCst);
                self.settle(&protocol);
                epoch
            };
            self.wake_all();
            let deadline = if stop { opened + STOP_TIMEOUT } else { opened + Duration::MAX / 4 };
            let cut = {
                // Say who holds a checkpoint up when it takes long (a stuck sink, a bug).
                let slow = opened + (self.settings.interval * 10).max(Duration::from_secs(30));
                let mut protocol =
                    self.wait_for(slow.min(deadline), |protocol| protocol.is_complete());
                if !protocol.is_complete() && !self.finished.load(Ordering::SeqCst) {
                    let workers = self.workers;
                    let all = (0..self.component_ids.len()).flat_map(|component| {
                        (0..workers).map(move |worker| Instance { component, worker })
                    });
                    let missing: Vec<String> = protocol
                        .missing(all)
                        .iter()
                        .map(|instance| {
                            let id = self.component_ids.get(instance.component);
                            format!("{}@{}", id.map_or("?", String::as_str), instance.worker)
                        })
                        .collect();
                    tracing::warn!(
                        epoch,
                        ?missing,
                        "checkpoint {epoch} is waiting for these instances"
                    );
                    drop(protocol);
                    protocol = self.wait_for(deadline, Protocol::is_complete);
                }
                let cut = protocol.take();
                if cut.is_none() {
                    protocol.abandon();
                }
                cut
            };
            let Some(cut) = cut else {
                if self.finished.load(Ordering::SeqCst) {
                    return;
                }
                tracing::error!(
                    epoch,
                    "checkpoint {epoch} did not complete in time; stopping without it"
                );
                self.metrics.failures.inc();
                self.abandoned.store(true, Ordering::SeqCst);
                self.wake_all();
                return;
            };
            let final_cut = cut.stop || lock(&self.protocol).all_ended();
            self.complete(cut, opened);
            if final_cut || stop {
                if self.committed() < epoch {
                    // The final checkpoint failed: sources waiting for it end without it.
                    self.abandoned.store(true, Ordering::SeqCst);
                    self.wake_all();
                }
                return;
            }
        }
    }

    /// Writes a complete cut, publishes its staged output and lets sources commit.
    fn complete(&self, mut cut: Cut, opened: Instant) {
        let epoch = cut.epoch;
        let store = &*self.settings.store;
        // Output staged for a checkpoint that failed comes first.
        for (instance, mut staged) in std::mem::take(&mut *lock(&self.carried)) {
            let report = cut.reports.entry(instance).or_default();
            staged.append(&mut report.staged);
            report.staged = staged;
        }
        if let Some((instance, _)) = cut.reports.iter().find(|(_, report)| report.failed) {
            let component = self.component_ids.get(instance.component).cloned().unwrap_or_default();
            tracing::warn!(
                epoch,
                component,
                worker = instance.worker,
                "checkpoint {epoch} failed: an instance could not pre-commit; its output moves to the next checkpoint"
            );
            self.metrics.failures.inc();
            let mut carried = lock(&self.carried);
            for (instance, report) in cut.reports {
                if !report.staged.is_empty() {
                    carried.insert(instance, report.staged);
                }
            }
            return;
        }
        let written =
            manifest::write(store, &cut, &self.pipeline, self.workers, &self.component_ids);
        let (manifest, bytes) = match written {
            Ok(written) => written,
            Err(error) => {
                tracing::error!(epoch, %error, "cannot write checkpoint {epoch}; its output moves to the next one");
                self.metrics.failures.inc();
                let mut carried = lock(&self.carried);
                for (instance, report) in cut.reports {
                    if !report.staged.is_empty() {
                        carried.insert(instance, report.staged);
                    }
                }
                return;
            }
        };
        self.metrics.duration.observe(opened.elapsed().as_secs_f64());
        self.metrics.size.set(bytes as i64);
        self.metrics.epoch.set(epoch as i64);
        self.metrics.last_completed.set(tidewatch_api::records::now_ms() / 1_000);
        tracing::debug!(epoch, bytes, "checkpoint complete");
        if let Err(error) = self.publish(&manifest, &cut) {
            // The checkpoint stands: the next start publishes it again.
            tracing::error!(epoch, %error, "cannot publish the output of checkpoint {epoch}");
            self.metrics.failures.inc();
        }
        self.committed.store(epoch, Ordering::SeqCst);
        self.wake_all();
        if let Err(error) = manifest::collect_garbage(store, epoch, self.settings.keep) {
            tracing::warn!(%error, "cannot delete old checkpoints");
        }
    }

    /// Publishes the staged output of a cut, retrying a failing publisher a few times.
    fn publish(&self, manifest: &Manifest, cut: &Cut) -> Result<(), ComponentError> {
        for (instance, report) in &cut.reports {
            if report.staged.is_empty() {
                continue;
            }
            let component = self.component_ids.get(instance.component).cloned().unwrap_or_default();
            let publisher = lock(&self.publishers).get(&component).cloned().ok_or_else(|| {
                ComponentError::Internal(format!(
                    "sink {component:?} staged output but has no publisher"
                ))
            })?;
            for staged in &report.staged {
                publish_retrying(&*publisher, &staged.key, &staged.bytes)?;
            }
        }
        tracing::trace!(epoch = manifest.epoch, "published");
        Ok(())
    }

    /// Publishes again the staged output of the restored checkpoint's instances of
    /// `component` that `keep` selects (recovery; publishing is idempotent).
    pub fn republish(
        &self,
        component: &str,
        publisher: &dyn Publisher,
        mut keep: impl FnMut(usize) -> bool,
    ) -> Result<usize, ComponentError> {
        let Some(loaded) = &self.restored else { return Ok(0) };
        let mut published = 0;
        for (entry, _) in loaded.component(component) {
            if !keep(entry.worker) {
                continue;
            }
            for staged in &entry.staged {
                let bytes = manifest::read_blob(self.store(), &staged.blob)
                    .map_err(|error| ComponentError::Internal(error.to_string()))?;
                publish_retrying(publisher, &staged.publish, &bytes)?;
                published += 1;
            }
        }
        Ok(published)
    }
}

fn publish_retrying(
    publisher: &dyn Publisher,
    key: &str,
    bytes: &[u8],
) -> Result<(), ComponentError> {
    let mut delay = Duration::from_millis(200);
    let mut attempt = 0;
    loop {
        match publisher.publish(key, bytes) {
            Ok(()) => return Ok(()),
            Err(error) if attempt < 8 => {
                tracing::warn!(key, %error, attempt, "publishing staged output failed; retrying");
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(10));
                attempt += 1;
            }
            Err(error) => return Err(error),
        }
    }
}

pub use self::protocol::{Instance as CheckpointInstance, Report as CheckpointReport};
