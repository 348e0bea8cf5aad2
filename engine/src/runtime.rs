//! Turns a validated [`Pipeline`] into a timely dataflow and runs it.
//!
//! Every worker builds the same dataflow from trait objects. Timestamps are event time in ms:
//! - sources of raw messages hold their capability at 0 until they finish (raw messages have
//!   no event time yet);
//! - a transform that assigns event time (`normalize`) is built by `assigner_operator`: it is
//!   disconnected from its input in timely's progress tracking and holds its own capability at
//!   its watermark: the greatest event time it emitted minus `out_of_orderness_ms`. When it has
//!   seen no data for `idle_timeout_ms` its watermark advances with the wall clock and catches
//!   up with its siblings on the other workers of the run, in this process and (through the
//!   gossip dataflow of `engine/src/gossip.rs`) the others, so an idle worker or a silent device
//!   stalls nothing;
//! - every other transform is built by `follower_operator`: it holds a capability at its
//!   input frontier and calls `on_watermark` when it advances; an empty frontier means the input
//!   ended (`on_watermark(MAX)`, `close`). Sinks follow their input frontier the same way.
//!
//! Both transform operators share `TransformState` (open, process a batch, advance, finish).
//! The engine makes one [`ProcessShared`] per run and hands it to every component's context:
//! state shared by the workers of this process lives there and drops with the run.
//!
//! Keyed transforms (`window`, `stats`) receive each device's records on the worker that owns
//! the device (`DeviceId::worker`); batches are split and exchanged only where the input is
//! not partitioned already. A gathered transform (`fleet`) receives every record on the first
//! worker.
//!
//! With checkpoints (`checkpoint_interval_secs`), barriers travel with the data ([`Flow`]):
//! every operator counts them on its input (`Barriers`), snapshots when it has them all, and
//! pauses until every instance of the run has (see [`crate::checkpoint`]).

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::flow_control::{Flight, InFlight};
use crate::gossip::AssignerWatermarks;
use tidewatch_api::{
    Batch, ComponentContext, ComponentError, ErrorRecord, EventTime, Outputs, ProcessShared,
    ReadingBatch, Sink, Source, SourcePoll, Transform, Waker,
};
use timely::communication::Pull;
use timely::dataflow::channels::Message;
use timely::dataflow::channels::pact::{
    Exchange as ExchangePact, ParallelizationContract, Pipeline as PipelinePact,
};
use timely::dataflow::channels::pushers;
use timely::dataflow::operators::generic::InputHandleCore;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::{Capability, Concatenate};
use timely::dataflow::{Scope, Stream};
use timely::progress::Antichain;

use crate::checkpoint::{
    CheckpointInstance as Instance, CheckpointReport as Report, CheckpointSettings,
    CheckpointStore, Checkpoints, LocalStore,
};
use crate::http::Health;
use crate::metrics::{BacklogGauges, ComponentMetrics, Metrics};
use crate::spec::{Configured, Pipeline, Port};

/// What moves between operators: data, and the checkpoint markers that travel with it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub enum Flow {
    /// A batch of records.
    Data(Batch),
    /// The cut of checkpoint `epoch`: everything before it on this channel belongs to it.
    /// `to` is the worker an exchange routes it to.
    Barrier {
        /// The epoch.
        epoch: u64,
        /// The receiving worker (exchanges send one copy to each).
        to: u32,
    },
    /// The channel ends: its sender takes part in no epoch from `from` on.
    End {
        /// The first epoch the sender did not reach.
        from: u64,
        /// The receiving worker.
        to: u32,
    },
}

impl Flow {
    fn route_hash(&self) -> u64 {
        match self {
            Flow::Data(batch) => batch.route_hash(),
            Flow::Barrier { to, .. } | Flow::End { to, .. } => u64::from(*to),
        }
    }

    /// Routes data to the first worker and markers to their worker (a gathered transform).
    fn route_gathered(&self) -> u64 {
        match self {
            Flow::Data(_) => 0,
            Flow::Barrier { to, .. } | Flow::End { to, .. } => u64::from(*to),
        }
    }

    /// Splits for an exchange: data by owning worker (or whole, when `gathered`), markers
    /// copied to every worker.
    fn split(self, peers: usize, gathered: bool) -> Vec<Flow> {
        match self {
            Flow::Data(batch) if gathered => vec![Flow::Data(batch)],
            Flow::Data(batch) => {
                batch.split_by_worker(peers).into_iter().map(|(_, part)| Flow::Data(part)).collect()
            }
            Flow::Barrier { epoch, .. } => {
                (0..peers).map(|to| Flow::Barrier { epoch, to: to as u32 }).collect()
            }
            Flow::End { from, .. } => {
                (0..peers).map(|to| Flow::End { from, to: to as u32 }).collect()
            }
        }
    }
}

type Data<'scope> = Stream<'scope, u64, Vec<Flow>>;
type Output = pushers::Output<u64, Vec<Flow>>;

/// Why a pipeline could not run to its end.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A component failed to build or open.
    #[error("component `{component}`: {source}")]
    Component {
        /// The component id.
        component: String,
        /// What went wrong.
        #[source]
        source: ComponentError,
    },
    /// timely could not start its workers.
    #[error("cannot start the workers: {0}")]
    Workers(String),
    /// A worker thread panicked (a bug: input never causes one).
    #[error("a worker stopped abnormally: {0}")]
    WorkerPanic(String),
    /// The checkpoint store could not be opened or read.
    #[error("checkpoints: {0}")]
    Checkpoints(String),
    /// The cluster of processes could not be formed.
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    /// A process of the cluster died (its connection closed): the cluster cannot go on.
    #[error(
        "this process lost its connection to another process of the cluster ({0}); a cluster cannot go on without one of its processes: restart every process"
    )]
    PeerLost(String),
}

/// Shared state of one run: metrics, health, the stop flag and the first fatal errors.
#[derive(Clone, Debug)]
pub struct RunContext {
    /// Metrics of the run.
    pub metrics: Arc<Metrics>,
    /// Readiness for `/readyz`.
    pub health: Arc<Health>,
    /// Set to stop: sources end, in-flight data drains, sinks flush.
    pub shutdown: Arc<AtomicBool>,
    errors: Arc<Mutex<Vec<EngineError>>>,
    built: Arc<AtomicUsize>,
    checkpoint_store: Option<Arc<dyn CheckpointStore>>,
    cluster: Option<crate::cluster::Cluster>,
}

impl Default for RunContext {
    fn default() -> Self {
        RunContext::new(Arc::new(Metrics::new()))
    }
}

impl RunContext {
    /// A run context reporting into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> RunContext {
        RunContext {
            metrics,
            health: Arc::new(Health::default()),
            shutdown: Arc::new(AtomicBool::new(false)),
            errors: Arc::new(Mutex::new(Vec::new())),
            built: Arc::new(AtomicUsize::new(0)),
            checkpoint_store: None,
            cluster: None,
        }
    }

    /// Runs as one process of a cluster: `workers` threads here, as many in every other
    /// process, one dataflow over all of them.
    pub fn with_cluster(mut self, cluster: crate::cluster::Cluster) -> RunContext {
        self.cluster = Some(cluster);
        self
    }

    /// Keeps checkpoints in `store` (when the pipeline takes any) instead of the local folder
    /// its `checkpoint_url` names: the `tidewatch` binary passes the object store here for
    /// `s3://` URLs.
    pub fn with_checkpoint_store(mut self, store: Arc<dyn CheckpointStore>) -> RunContext {
        self.checkpoint_store = Some(store);
        self
    }

    /// Asks the pipeline to stop gracefully.
    pub fn request_shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        self.health.set_ready(false);
    }

    fn fail(&self, component: &str, source: ComponentError) {
        tracing::error!(component, error = %source, "component failed; stopping the pipeline");
        if let Ok(mut errors) = self.errors.lock() {
            errors.push(EngineError::Component { component: component.to_owned(), source });
        }
        self.request_shutdown();
    }
}

/// The local folder of a `checkpoint_url` (a path or `file://PATH`), relative paths against
/// `base`; `None` for another scheme (`s3://`: the embedder opens that store).
pub fn local_checkpoint_folder(url: &str, base: &std::path::Path) -> Option<std::path::PathBuf> {
    let path = match url.split_once("://") {
        Some(("file", path)) => path,
        Some(_) => return None,
        None => url,
    };
    Some(tidewatch_api::resolve_path(base, path))
}

/// The checkpoints of a run, if the pipeline takes any.
fn open_checkpoints(
    pipeline: &Pipeline,
    workers: usize,
    leader: bool,
    run: &RunContext,
) -> Result<Option<Arc<Checkpoints>>, EngineError> {
    let settings = &pipeline.settings;
    if settings.checkpoint_interval_secs == 0 {
        return Ok(None);
    }
    let store: Arc<dyn CheckpointStore> = match &run.checkpoint_store {
        Some(store) => Arc::clone(store),
        None => {
            let default = format!("checkpoints/{}", pipeline.info.name);
            let url = settings.checkpoint_url.as_deref().unwrap_or(&default);
            let folder =
                local_checkpoint_folder(url, &pipeline.info.base_dir).ok_or_else(|| {
                    EngineError::Checkpoints(format!(
                        "checkpoint_url {url:?}: this build keeps checkpoints in local folders only"
                    ))
                })?;
            Arc::new(
                LocalStore::open(folder)
                    .map_err(|error| EngineError::Checkpoints(error.to_string()))?,
            )
        }
    };
    let ids = pipeline.components.iter().map(|component| component.id.clone()).collect();
    let checkpoints = Checkpoints::open(
        CheckpointSettings {
            store,
            interval: Duration::from_secs(settings.checkpoint_interval_secs),
            keep: settings.checkpoint_keep,
        },
        &pipeline.info.name,
        ids,
        workers,
        leader,
        run.metrics.registry(),
    )
    .map_err(|error| EngineError::Checkpoints(error.to_string()))?;
    Ok(Some(Arc::new(checkpoints)))
}

/// Runs `pipeline` on `workers` threads until every source finished (or shutdown was
/// requested and the data drained). With checkpoints it resumes from the latest one, takes
/// one every `checkpoint_interval_secs`, and a final one at a graceful stop.
pub fn run(pipeline: &Pipeline, workers: usize, run: &RunContext) -> Result<(), EngineError> {
    let workers = workers.max(1);
    let cluster = run.cluster.as_ref().filter(|cluster| cluster.processes() > 1);
    // Process 0 of a cluster leads the checkpoints; the others follow (checkpoint::control).
    let leader = cluster.is_none_or(|cluster| cluster.process == 0);
    let all_workers = workers * cluster.map_or(1, crate::cluster::Cluster::processes);
    let checkpoints = open_checkpoints(pipeline, all_workers, leader, run)?;
    run.metrics.set_workers(workers);
    run.metrics.set_running(true);
    let config =
        if workers == 1 { timely::Config::thread() } else { timely::Config::process(workers) };
    let pipeline = Arc::new(pipeline.clone());
    let shared = run.clone();
    // What the workers of this process share in this run; dropped when the run ends.
    let process_shared = ProcessShared::new();
    let thread = match &checkpoints {
        Some(checkpoints) if leader => {
            let checkpoints = Arc::clone(checkpoints);
            let stopping = Arc::clone(&run.shutdown);
            Some(
                std::thread::Builder::new()
                    .name("tidewatch-checkpoints".into())
                    .spawn(move || checkpoints.run_thread(&stopping))
                    .map_err(|error| EngineError::Workers(error.to_string()))?,
            )
        }
        _ => None,
    };
    let worker_checkpoints = checkpoints.clone();
    let clustered = cluster.is_some();
    let body = move |worker: &mut timely::worker::Worker| {
        let index = worker.index();
        let peers = worker.peers();
        let main = worker.next_dataflow_index();
        worker.dataflow::<u64, _, _>(|scope| {
            let layout = Layout { index, peers, local: workers };
            build(scope, &pipeline, layout, &shared, &process_shared, &worker_checkpoints);
        });
        // A cluster's checkpoints are coordinated through a dataflow of their own.
        let main_done = Rc::new(std::cell::Cell::new(false));
        if let Some(checkpoints) = worker_checkpoints.as_ref().filter(|_| clustered) {
            let (checkpoints, stop, done) =
                (Arc::clone(checkpoints), Arc::clone(&shared.shutdown), Rc::clone(&main_done));
            worker.dataflow::<u64, _, _>(move |scope| {
                crate::checkpoint::control::build(scope, checkpoints, stop, done);
            });
        }
        // So do the watermarks of idle assigners, which catch up with other processes'.
        if clustered {
            let (watermarks, in_flight, done) = (
                AssignerWatermarks::of(&process_shared),
                InFlight::of(&process_shared),
                Rc::clone(&main_done),
            );
            worker.dataflow::<u64, _, _>(move |scope| {
                crate::gossip::build(scope, watermarks, in_flight, workers, done);
            });
        }
        // Ready once this process's workers built the dataflow (and its sources connected).
        if shared.built.fetch_add(1, Ordering::SeqCst) + 1 == workers
            && !shared.shutdown.load(Ordering::SeqCst)
        {
            shared.health.set_ready(true);
        }
        let local = index % workers;
        while worker.step_or_park(Some(Duration::from_millis(50))) {
            shared.health.heartbeat(local);
            if clustered && !main_done.get() && !worker.installed_dataflows().contains(&main) {
                tracing::debug!(worker = index, "the pipeline's dataflow ended");
                main_done.set(true);
            }
        }
        tracing::debug!(worker = index, "worker done");
    };
    run.health.start_workers(workers);
    let guards = match cluster {
        Some(cluster) => {
            let (builders, network) = cluster.allocators(workers)?;
            timely::execute::execute_from(builders, network, timely::WorkerConfig::default(), body)
        }
        _ => timely::execute(config, body),
    }
    .map_err(EngineError::Workers)?;
    // A cluster's network threads panic when a peer's connection breaks, and joining them
    // (when the guards drop) panics in turn: that is a lost peer, not a bug here.
    let results = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| guards.join())) {
        Ok(results) => results,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|text| (*text).to_owned()))
                .unwrap_or_default();
            vec![Err(format!("timely communication error: {message}"))]
        }
    };
    tracing::debug!("every worker of this process is done");
    if let Some(checkpoints) = &checkpoints {
        checkpoints.finish();
    }
    if let Some(thread) = thread
        && thread.join().is_err()
    {
        tracing::error!("the checkpoint thread stopped abnormally");
    }
    run.metrics.set_running(false);
    run.health.set_ready(false);
    run.health.stop_workers();
    for result in results {
        if let Err(panic) = result {
            // timely's network threads take the workers down when a peer's connection breaks.
            if panic.contains("MergeQueue poisoned") || panic.contains("timely communication error")
            {
                return Err(EngineError::PeerLost(panic));
            }
            return Err(EngineError::WorkerPanic(panic));
        }
    }
    let mut errors =
        run.errors.lock().map(|mut errors| std::mem::take(&mut *errors)).unwrap_or_default();
    if errors.is_empty() { Ok(()) } else { Err(errors.remove(0)) }
}

/// Where a worker stands in the cluster.
#[derive(Clone, Copy, Debug)]
struct Layout {
    /// Its index among all the workers of the cluster.
    index: usize,
    /// All the workers of the cluster.
    peers: usize,
    /// The workers of its process (indices `index - index % local ..`).
    local: usize,
}

impl Layout {
    /// The route that sends data round robin over the workers of this process (markers to
    /// their worker): raw batches keep their acknowledgement tokens in the process.
    fn round_robin(self) -> impl FnMut(&Flow) -> u64 + 'static {
        let base = (self.index - self.index % self.local) as u64;
        let local = self.local as u64;
        let mut next = (self.index % self.local) as u64;
        move |flow: &Flow| match flow {
            Flow::Data(_) => {
                next = (next + 1) % local;
                base + next
            }
            Flow::Barrier { to, .. } | Flow::End { to, .. } => u64::from(*to),
        }
    }
}

fn build<'scope>(
    scope: Scope<'scope, u64>,
    pipeline: &Pipeline,
    layout: Layout,
    run: &RunContext,
    process_shared: &ProcessShared,
    checkpoints: &Option<Arc<Checkpoints>>,
) {
    let Layout { index, peers, .. } = layout;
    let mut streams: HashMap<(String, Port), Data<'scope>> = HashMap::new();
    let mut partitioned: HashMap<String, bool> = HashMap::new();
    // Sources only one worker reads: their raw batches may be spread (`spreadable`).
    let mut one_reader: HashMap<String, bool> = HashMap::new();
    // Backpressure (flow_control): how many inputs read each output.
    let mut readers: HashMap<(&str, &Port), i64> = HashMap::new();
    for input in pipeline.components.iter().flat_map(|component| &component.inputs) {
        *readers.entry((input.component.as_str(), &input.port)).or_default() += 1;
    }
    let in_flight = InFlight::of(process_shared);
    let bound = pipeline.settings.max_in_flight_records;
    for (position, component) in pipeline.components.iter().enumerate() {
        let ctx = ComponentContext::new(
            &component.id,
            &component.type_name,
            index,
            peers,
            Arc::clone(&pipeline.info),
            Arc::clone(&run.shutdown),
        )
        .with_metrics_registry(run.metrics.shared_registry().clone())
        .with_process_shared(process_shared.clone());
        // Its timely outputs in order: a source's main and errors, a transform's main, errors,
        // late and named outputs, none for a sink.
        let ports: Vec<Port> = match &component.configured {
            Configured::Source(_) => vec![Port::Main, Port::Errors],
            Configured::Transform(..) => [Port::Main, Port::Errors, Port::Late]
                .into_iter()
                .chain(component.named_outputs.iter().cloned().map(Port::Named))
                .collect(),
            Configured::Sink(_) => Vec::new(),
        };
        let fanout = ports
            .iter()
            .map(|port| readers.get(&(component.id.as_str(), port)).copied().unwrap_or(0))
            .collect();
        let metrics = run
            .metrics
            .component(&component.id, &component.type_name)
            .with_flight(Flight::new(Arc::clone(&in_flight), fanout, bound));
        let inputs: Vec<Data<'scope>> = component
            .inputs
            .iter()
            .filter_map(|input| {
                streams.get(&(input.component.clone(), input.port.clone())).cloned()
            })
            .collect();
        let inputs_partitioned = component.inputs.iter().all(|input| {
            input.port != Port::Errors
                && partitioned.get(&input.component).copied().unwrap_or(false)
        });
        let instance = Instance { component: position, worker: index };
        match &component.configured {
            Configured::Source(configured) => {
                let instance_impl = configured.build(&ctx).unwrap_or_else(|error| {
                    run.fail(&component.id, error);
                    Box::new(Finished)
                });
                let barriers = checkpoints
                    .as_ref()
                    .map(|checkpoints| Barriers::new(Arc::clone(checkpoints), instance, 0));
                let (main, errors) =
                    source_operator(scope, instance_impl, ctx, metrics, run.clone(), barriers);
                streams.insert((component.id.clone(), Port::Main), main);
                streams.insert((component.id.clone(), Port::Errors), errors);
                partitioned.insert(component.id.clone(), false);
                one_reader.insert(component.id.clone(), configured.reads_on_one_worker());
            }
            Configured::Transform(configured, properties) => {
                let transform = configured.build(&ctx).unwrap_or_else(|error| {
                    run.fail(&component.id, error);
                    Box::new(Inert)
                });
                let count = inputs.len();
                let input =
                    if inputs.len() == 1 { inputs[0].clone() } else { scope.concatenate(inputs) };
                let assigner = properties.assigns_event_time;
                let gathered = properties.gathered && peers > 1;
                let exchanged = gathered || (properties.keyed && peers > 1 && !inputs_partitioned);
                // Decoding in parallel what one worker reads (the file source).
                let spread = properties.spreadable
                    && !exchanged
                    && layout.local > 1
                    && component.inputs.iter().all(|input| {
                        input.port == Port::Main
                            && one_reader.get(&input.component).copied().unwrap_or(false)
                    });
                // One barrier per epoch from every upstream instance that feeds this one.
                let expected = if exchanged || spread { count * peers } else { count };
                let barriers = checkpoints
                    .as_ref()
                    .map(|checkpoints| Barriers::new(Arc::clone(checkpoints), instance, expected));
                let state = TransformState::new(transform, ctx, metrics, run.clone(), barriers);
                let named = component.named_outputs.len();
                let outputs = if exchanged {
                    let split = input.flat_map(move |flow: Flow| flow.split(peers, gathered));
                    let route = if gathered { Flow::route_gathered } else { Flow::route_hash };
                    let pact = ExchangePact::new(route);
                    if assigner {
                        assigner_operator(scope, split, pact, state, named)
                    } else {
                        follower_operator(scope, split, pact, state, named)
                    }
                } else if spread {
                    // Batches whole, markers to every worker.
                    let split = input.flat_map(move |flow: Flow| flow.split(peers, true));
                    let pact = ExchangePact::new(layout.round_robin());
                    if assigner {
                        assigner_operator(scope, split, pact, state, named)
                    } else {
                        follower_operator(scope, split, pact, state, named)
                    }
                } else if assigner {
                    assigner_operator(scope, input, PipelinePact, state, named)
                } else {
                    follower_operator(scope, input, PipelinePact, state, named)
                };
                let ports = [Port::Main, Port::Errors, Port::Late]
                    .into_iter()
                    .chain(component.named_outputs.iter().cloned().map(Port::Named));
                for (port, stream) in ports.zip(outputs) {
                    streams.insert((component.id.clone(), port), stream);
                }
                let keyed = properties.keyed || inputs_partitioned;
                partitioned.insert(component.id.clone(), keyed && !properties.gathered);
            }
            Configured::Sink(configured) => {
                let sink = configured.build(&ctx).unwrap_or_else(|error| {
                    run.fail(&component.id, error);
                    Box::new(Inert)
                });
                let count = inputs.len();
                let input =
                    if inputs.len() == 1 { inputs[0].clone() } else { scope.concatenate(inputs) };
                let barriers = checkpoints
                    .as_ref()
                    .map(|checkpoints| Barriers::new(Arc::clone(checkpoints), instance, count));
                sink_operator(scope, input, sink, ctx, metrics, run.clone(), barriers);
            }
        }
    }
}

/// A stand-in for a component that failed to build: it does nothing and ends at once.
struct Finished;
impl Source for Finished {
    fn poll(&mut self, _out: &mut Outputs) -> Result<SourcePoll, ComponentError> {
        Ok(SourcePoll::Finished)
    }
}

/// A stand-in for a transform or sink that failed to build: it drops what it receives.
struct Inert;
impl Transform for Inert {
    fn process_batch(&mut self, _batch: Batch, _out: &mut Outputs) {}
}
impl Sink for Inert {
    fn write_batch(&mut self, _batch: Batch) -> Result<(), ComponentError> {
        Ok(())
    }
}

/// One operator instance's side of the checkpoint protocol: the barriers counted on its
/// input, the epoch it passed last, and whether it waits for the rest of the run.
struct Barriers {
    checkpoints: Arc<Checkpoints>,
    instance: Instance,
    /// Barriers per epoch: one from every upstream instance feeding this one.
    expected: usize,
    counts: BTreeMap<u64, usize>,
    /// The `from` of every input channel that ended.
    ended: Vec<u64>,
    /// The last epoch this instance passed.
    last: u64,
    /// Waiting for every instance to reach this epoch.
    paused: Option<u64>,
    /// Passed the final barrier of a stop: nothing more is sent.
    stopped: bool,
    /// Input that arrived while paused, with its batch time.
    held: Vec<(Flow, EventTime)>,
}

impl Barriers {
    fn new(checkpoints: Arc<Checkpoints>, instance: Instance, expected: usize) -> Barriers {
        // The restored epoch, not the requested one: a worker that builds its dataflow after
        // the first epoch was opened (a slow start, a process that joins the cluster late)
        // must still send that epoch's barrier.
        let last = checkpoints.restored_epoch();
        Barriers {
            checkpoints,
            instance,
            expected,
            counts: BTreeMap::new(),
            ended: Vec::new(),
            last,
            paused: None,
            stopped: false,
            held: Vec::new(),
        }
    }

    /// True while this instance waits for the rest of the run (resumes when it no longer must).
    fn is_paused(&mut self) -> bool {
        if let Some(epoch) = self.paused
            && (self.checkpoints.aligned() >= epoch || self.checkpoints.abandoned())
        {
            self.paused = None;
        }
        self.paused.is_some()
    }

    /// Counts a marker; returns the epoch whose barriers are now all in, if any.
    fn arrived(&mut self, flow: &Flow) -> Option<u64> {
        tracing::trace!(instance = ?self.instance, ?flow, counts = ?self.counts, ended = ?self.ended, "marker");
        match flow {
            Flow::Barrier { epoch, .. } => *self.counts.entry(*epoch).or_default() += 1,
            Flow::End { from, .. } => self.ended.push(*from),
            Flow::Data(_) => return None,
        }
        let (&epoch, &count) = self.counts.first_key_value()?;
        let ended = self.ended.iter().filter(|from| **from <= epoch).count();
        (count + ended >= self.expected).then(|| {
            self.counts.remove(&epoch);
            epoch
        })
    }

    /// The epoch this instance must pass by itself: every channel of its input ended (their
    /// senders on this worker finished) while the dataflow goes on elsewhere, so no barrier
    /// will reach it any more, yet the run's checkpoints need its part.
    fn orphaned(&self) -> Option<u64> {
        let epoch = self.checkpoints.requested();
        (self.paused.is_none()
            && !self.stopped
            && self.expected > 0
            && self.ended.len() >= self.expected
            && epoch > self.last)
            .then_some(epoch)
    }

    /// This instance passed `epoch`: report, and pause (or stop, after a stop's barrier).
    fn passed(&mut self, epoch: u64, report: Report) {
        tracing::trace!(instance = ?self.instance, epoch, "passed");
        self.last = epoch;
        if self.checkpoints.is_stop(epoch) {
            self.stopped = true;
        } else {
            self.paused = Some(epoch);
        }
        self.checkpoints.report(self.instance, epoch, report);
    }

    /// This instance ends: its final report stands for it from the next epoch on.
    fn end(&mut self, report: Report) -> Flow {
        let from = self.last + 1;
        tracing::debug!(instance = ?self.instance, from, "instance ended");
        self.checkpoints.end(self.instance, from, report);
        Flow::End { from, to: self.instance.worker as u32 }
    }

    fn marker(&self, epoch: u64) -> Flow {
        Flow::Barrier { epoch, to: self.instance.worker as u32 }
    }

    /// The restored states of this component, one per instance that took the checkpoint,
    /// with the engine's watermark of each.
    fn restored(&self, component: &str) -> Vec<(Option<EventTime>, Option<Vec<u8>>)> {
        self.checkpoints
            .restored()
            .map(|loaded| {
                loaded
                    .component(component)
                    .map(|(entry, state)| (entry.watermark, state.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Sends a marker on every output.
fn send_marker(flow: &Flow, caps: &[Capability<u64>], outputs: &mut [&mut Output]) {
    for (cap, output) in caps.iter().zip(outputs.iter_mut()) {
        output.activate().give(cap, &mut vec![flow.clone()]);
    }
}

/// Restores a component from every restored instance's state; returns the least restored
/// engine watermark (what an event-time assigner resumes from).
fn restore_each(
    barriers: Option<&Barriers>,
    ctx: &ComponentContext,
    run: &RunContext,
    mut restore: impl FnMut(&[u8]) -> Result<(), ComponentError>,
) -> Option<EventTime> {
    let barriers = barriers?;
    let mut watermark: Option<EventTime> = None;
    for (seen, state) in barriers.restored(&ctx.component_id) {
        if let Some(seen) = seen {
            watermark = Some(watermark.map_or(seen, |least| least.min(seen)));
        }
        if let Some(state) = state
            && let Err(error) = restore(&state)
        {
            run.fail(&ctx.component_id, error);
        }
    }
    watermark
}

/// The timely output of a transform's first named output: after main, errors and late.
const NAMED_OUTPUTS: usize = 3;

/// A transform operator's outputs: main, errors, late, then one per named output.
fn transform_outputs<'scope>(
    builder: &mut OperatorBuilder<'scope, u64>,
    named: usize,
) -> (Vec<Output>, Vec<Data<'scope>>) {
    (0..NAMED_OUTPUTS + named).map(|_| builder.new_output::<Vec<Flow>>()).unzip()
}

/// Sends what a component produced: main batches, batches of named outputs, error records,
/// late readings, discards.
fn ship(
    outs: &mut Outputs,
    caps: &[Capability<u64>],
    outputs: &mut [&mut Output],
    metrics: &ComponentMetrics,
) -> Option<EventTime> {
    let mut max_time: Option<EventTime> = None;
    let main = outs.take_main();
    if !main.is_empty() {
        let sent: usize = main.iter().map(Batch::len).sum();
        metrics.sent(sent);
        metrics.flight_sent(0, sent);
        max_time = main.iter().filter_map(Batch::max_event_time).max();
        if let (Some(cap), Some(output)) = (caps.first(), outputs.get_mut(0)) {
            let mut flows: Vec<Flow> = main.into_iter().map(Flow::Data).collect();
            output.activate().give(cap, &mut flows);
        }
    }
    for (port, batch) in outs.take_named() {
        let index = NAMED_OUTPUTS + port;
        let (Some(cap), Some(output)) = (caps.get(index), outputs.get_mut(index)) else {
            metrics.discarded("no_such_output", batch.len() as u64);
            continue;
        };
        metrics.sent(batch.len());
        metrics.flight_sent(index, batch.len());
        max_time = max_time.max(batch.max_event_time());
        output.activate().give(cap, &mut vec![Flow::Data(batch)]);
    }
    let errors: Vec<ErrorRecord> = outs.take_errors();
    if !errors.is_empty() {
        let mut by_type: HashMap<&str, usize> = HashMap::new();
        for error in &errors {
            *by_type.entry(&error.error_type).or_default() += 1;
        }
        for (error_type, count) in by_type {
            metrics.error(error_type, count);
        }
        if let (Some(cap), Some(output)) = (caps.get(1), outputs.get_mut(1)) {
            metrics.flight_sent(1, errors.len());
            output.activate().give(cap, &mut vec![Flow::Data(Batch::Errors(errors))]);
        }
    }
    let late: Vec<ReadingBatch> = outs.take_late();
    if !late.is_empty() {
        let count: usize = late.iter().map(ReadingBatch::len).sum();
        metrics.discarded("late", count as u64);
        if let (Some(cap), Some(output)) = (caps.get(2), outputs.get_mut(2)) {
            metrics.flight_sent(2, count);
            let mut flows: Vec<Flow> =
                late.into_iter().map(|batch| Flow::Data(Batch::Readings(batch))).collect();
            output.activate().give(cap, &mut flows);
        }
    }
    for (reason, count) in outs.take_discarded() {
        metrics.discarded(reason, count);
    }
    max_time
}

fn downgrade_all(caps: &mut [Capability<u64>], time: u64) {
    for cap in caps.iter_mut() {
        if *cap.time() < time {
            cap.downgrade(&time);
        }
    }
}

fn to_time(event_time: EventTime) -> u64 {
    event_time.max(0) as u64
}

/// Registers an operator to be woken when an epoch aligns or commits.
fn wake_on_checkpoints(scope: Scope<'_, u64>, address: &[usize], barriers: Option<&Barriers>) {
    if let Some(barriers) = barriers {
        barriers.checkpoints.register(scope.worker().sync_activator_for(address.to_vec()));
    }
}

fn source_operator<'scope>(
    scope: Scope<'scope, u64>,
    mut source: Box<dyn Source>,
    ctx: ComponentContext,
    metrics: ComponentMetrics,
    run: RunContext,
    mut barriers: Option<Barriers>,
) -> (Data<'scope>, Data<'scope>) {
    let mut builder = OperatorBuilder::new(ctx.component_id.to_string(), scope);
    let info = builder.operator_info();
    let activator = scope.activator_for(Rc::clone(&info.address));
    // A source's own threads wake this operator when they queued data (no poll interval).
    let sync_activator = scope.worker().sync_activator_for(info.address.to_vec());
    let ctx = ctx.with_waker(Waker::new(move || {
        // An error means the worker is gone: the run is over, nothing to wake.
        let _ = sync_activator.activate();
    }));
    wake_on_checkpoints(scope, &info.address, barriers.as_ref());
    let (mut main_out, main) = builder.new_output::<Vec<Flow>>();
    let (mut error_out, errors) = builder.new_output::<Vec<Flow>>();
    builder.build(move |caps| {
        let mut caps = Some(caps);
        let mut opened = false;
        let mut outs = Outputs::new(&ctx.component_id);
        // Event-time sources (emitting readings directly) hold their watermark like assigners.
        let mut max_seen: Option<EventTime> = None;
        let out_of_orderness = ctx.pipeline.out_of_orderness_ms as i64;
        // Resolved at the first backlog report: sources without one export no series.
        let mut backlog_gauges: Option<BacklogGauges> = None;
        // Counted as waiting until it reports ready (`/readyz`).
        let mut waiting = true;
        let mut committed = barriers.as_ref().map_or(0, |barriers| barriers.last);
        run.health.source_waiting();
        move |_frontiers| {
            let Some(held) = caps.as_mut() else { return };
            let mut finished = false;
            if !opened {
                opened = true;
                match source.open(&ctx) {
                    Ok(()) => {
                        max_seen = restore_each(barriers.as_ref(), &ctx, &run, |state| {
                            source.restore(state)
                        });
                    }
                    Err(error) => {
                        run.fail(&ctx.component_id, error);
                        finished = true;
                    }
                }
            }
            let mut outputs = [&mut main_out, &mut error_out];
            if let Some(barriers) = barriers.as_mut() {
                if barriers.is_paused() {
                    return;
                }
                let checkpoints = Arc::clone(&barriers.checkpoints);
                let durable = checkpoints.committed();
                if durable > committed {
                    committed = durable;
                    if let Err(error) = source.commit() {
                        tracing::warn!(component = %ctx.component_id, %error, "source commit failed");
                    }
                }
                let epoch = checkpoints.requested();
                if epoch > barriers.last && !finished {
                    let report = match source.snapshot() {
                        Ok(state) => Report { watermark: max_seen, state, ..Report::default() },
                        Err(error) => {
                            run.fail(&ctx.component_id, error);
                            Report::default()
                        }
                    };
                    send_marker(&barriers.marker(epoch), held, &mut outputs);
                    barriers.passed(epoch, report);
                    return;
                }
                if barriers.stopped {
                    // After a stop's barrier: wait until the final checkpoint is durable and
                    // commit it (MQTT acks, Kafka offsets), then end.
                    if checkpoints.committed() < barriers.last && !checkpoints.abandoned() {
                        return;
                    }
                    finished = true;
                } else if checkpoints.abandoned() {
                    finished = true;
                }
            } else if run.shutdown.load(Ordering::Relaxed) {
                finished = true;
            }
            // Backpressure: not polled while the run has too many records in flight.
            let (full, in_flight) = metrics.flight_full();
            run.metrics.set_in_flight(in_flight);
            if !finished && full {
                activator.activate_after(Duration::from_millis(1));
            } else if !finished {
                match source.poll(&mut outs) {
                    Ok(SourcePoll::Ready) => activator.activate(),
                    Ok(SourcePoll::Idle { wake_after_ms }) => {
                        activator.activate_after(Duration::from_millis(wake_after_ms.clamp(1, 100)));
                    }
                    Ok(SourcePoll::Finished) => finished = true,
                    Err(error) => {
                        run.fail(&ctx.component_id, error);
                        finished = true;
                    }
                }
            }
            // A source receives what it reads from the outside world and sends it on: both
            // counters count it (Vector's convention), so "received" works for every component.
            metrics.received(outs.pending_records());
            if waiting && (finished || source.ready()) {
                waiting = false;
                run.health.source_ready();
            }
            if let Some(backlog) = source.backlog() {
                let worker = ctx.worker_index;
                backlog_gauges.get_or_insert_with(|| metrics.backlog_gauges(worker)).set(backlog);
            }
            if let Some(time) = ship(&mut outs, held, &mut outputs, &metrics) {
                max_seen = Some(max_seen.map_or(time, |seen| seen.max(time)));
                if let Some(seen) = max_seen {
                    let watermark = seen.saturating_sub(out_of_orderness);
                    downgrade_all(held, to_time(watermark));
                    metrics.watermark(watermark);
                }
            }
            if finished {
                if let Some(barriers) = barriers.as_mut() {
                    let state = source.snapshot().unwrap_or_else(|error| {
                        tracing::warn!(component = %ctx.component_id, %error, "no final snapshot");
                        None
                    });
                    let end =
                        barriers.end(Report { watermark: max_seen, state, ..Report::default() });
                    send_marker(&end, held, &mut outputs);
                }
                if let Err(error) = source.close() {
                    tracing::warn!(component = %ctx.component_id, %error, "error while closing source");
                }
                tracing::debug!(component = %ctx.component_id, worker = ctx.worker_index, "source finished");
                caps = None;
            }
        }
    });
    (main, errors)
}

/// One worker's instance of a transform and what both kinds of transform operators keep
/// around it.
struct TransformState {
    transform: Box<dyn Transform>,
    ctx: ComponentContext,
    metrics: ComponentMetrics,
    run: RunContext,
    outs: Outputs,
    opened: bool,
    /// The watermark reached so far (event time, ms).
    watermark: EventTime,
    /// The greatest event time emitted (an event-time assigner's watermark state).
    max_seen: Option<EventTime>,
    barriers: Option<Barriers>,
}

impl TransformState {
    fn new(
        transform: Box<dyn Transform>,
        ctx: ComponentContext,
        metrics: ComponentMetrics,
        run: RunContext,
        barriers: Option<Barriers>,
    ) -> TransformState {
        let outs = Outputs::new(&ctx.component_id);
        TransformState {
            transform,
            ctx,
            metrics,
            run,
            outs,
            opened: false,
            watermark: 0,
            max_seen: None,
            barriers,
        }
    }

    /// Calls `open` at the first activation, then restores from the checkpoint.
    fn open_once(&mut self) {
        if !self.opened {
            self.opened = true;
            if let Err(error) = self.transform.open(&self.ctx) {
                self.run.fail(&self.ctx.component_id, error);
                return;
            }
            let transform = &mut self.transform;
            self.max_seen = restore_each(self.barriers.as_ref(), &self.ctx, &self.run, |state| {
                transform.restore(state)
            });
        }
    }

    /// True while the instance waits for the rest of the run at a checkpoint.
    fn paused(&mut self) -> bool {
        self.barriers.as_mut().is_some_and(Barriers::is_paused)
    }

    /// Passes the requested epoch when no barrier can reach this instance any more (see
    /// [`Barriers::orphaned`]); true if it did (it is paused or stopped now).
    fn pass_orphaned(&mut self, held: &[Capability<u64>], outputs: &mut [&mut Output]) -> bool {
        let Some(epoch) = self.barriers.as_ref().and_then(Barriers::orphaned) else {
            return false;
        };
        let report = self.report();
        if let Some(barriers) = self.barriers.as_mut() {
            send_marker(&barriers.marker(epoch), held, outputs);
            barriers.passed(epoch, report);
        }
        true
    }

    /// The input held while paused, once the pause is over and some is held.
    fn resumed_input(&mut self) -> Option<Vec<(Flow, EventTime)>> {
        let barriers = self.barriers.as_mut()?;
        if barriers.is_paused() || barriers.held.is_empty() {
            return None;
        }
        Some(std::mem::take(&mut barriers.held))
    }

    /// True after the final barrier of a stop: the instance sends nothing more.
    fn stopped(&self) -> bool {
        self.barriers.as_ref().is_some_and(|barriers| barriers.stopped)
    }

    /// Takes the input of this activation, after what was held while paused.
    fn take_input<P>(
        &mut self,
        input: &mut InputHandleCore<u64, Vec<Flow>, P>,
    ) -> Vec<(Flow, EventTime)>
    where
        P: Pull<Message<u64, Vec<Flow>>>,
    {
        let mut items = self
            .barriers
            .as_mut()
            .map(|barriers| std::mem::take(&mut barriers.held))
            .unwrap_or_default();
        input.for_each(|cap, data| {
            let batch_time = cap.least().map_or(0, |time| *time as EventTime);
            items.extend(data.drain(..).map(|flow| (flow, batch_time)));
        });
        items
    }

    /// Takes this activation's input (after what was held while paused) and handles it item
    /// by item, going on with held input as soon as a checkpoint aligned; `on_sent` gets the
    /// greatest event time each data batch sent. Returns whether data came.
    fn handle_input<P>(
        &mut self,
        input: &mut InputHandleCore<u64, Vec<Flow>, P>,
        held: &mut [Capability<u64>],
        outputs: &mut [&mut Output],
        mut on_sent: impl FnMut(
            &mut TransformState,
            EventTime,
            &mut [Capability<u64>],
            &mut [&mut Output],
        ),
    ) -> bool
    where
        P: Pull<Message<u64, Vec<Flow>>>,
    {
        let mut got_data = false;
        let mut items = self.take_input(input);
        loop {
            for (flow, batch_time) in items {
                got_data |= matches!(flow, Flow::Data(_));
                if let Some(time) = self.handle(flow, batch_time, held, outputs) {
                    on_sent(self, time, held, outputs);
                }
            }
            match self.resumed_input() {
                Some(more) => items = more,
                None => break,
            }
        }
        got_data
    }

    /// Handles one input item: processes data, counts markers and passes a barrier when all
    /// are in; returns the greatest event time sent on the main output. Items after a passed
    /// barrier are held until the instance resumes.
    fn handle(
        &mut self,
        flow: Flow,
        batch_time: EventTime,
        held: &[Capability<u64>],
        outputs: &mut [&mut Output],
    ) -> Option<EventTime> {
        if let Some(barriers) = self.barriers.as_mut()
            && barriers.paused.is_some()
        {
            barriers.held.push((flow, batch_time));
            return None;
        }
        match flow {
            Flow::Data(batch) => {
                if self.stopped() {
                    self.metrics.discarded("stopped", batch.len() as u64);
                    return None;
                }
                self.process(batch, batch_time, held, outputs)
            }
            marker => {
                let epoch = self.barriers.as_mut()?.arrived(&marker)?;
                let report = self.report();
                let barriers = self.barriers.as_mut()?;
                send_marker(&barriers.marker(epoch), held, outputs);
                barriers.passed(epoch, report);
                None
            }
        }
    }

    fn report(&mut self) -> Report {
        let state = self.transform.snapshot().unwrap_or_else(|error| {
            self.run.fail(&self.ctx.component_id, error);
            None
        });
        Report { watermark: self.max_seen, state, ..Report::default() }
    }

    /// Processes one input batch sent at `batch_time` and ships what it produced; returns the
    /// greatest event time sent on the main output.
    fn process(
        &mut self,
        batch: Batch,
        batch_time: EventTime,
        held: &[Capability<u64>],
        outputs: &mut [&mut Output],
    ) -> Option<EventTime> {
        self.outs.set_batch_watermark(batch_time);
        let count = batch.len();
        self.metrics.received(count);
        self.transform.process_batch(batch, &mut self.outs);
        self.metrics.flight_taken(count);
        ship(&mut self.outs, held, outputs, &self.metrics)
    }

    /// Moves the watermark to `target` if that is ahead (see [`advance`]).
    fn advance_to(
        &mut self,
        target: EventTime,
        held: &mut [Capability<u64>],
        outputs: &mut [&mut Output],
        shared: Option<&AtomicI64>,
    ) {
        if target > self.watermark {
            self.watermark = target;
            advance(
                &mut *self.transform,
                target,
                held,
                outputs,
                &mut self.outs,
                &self.metrics,
                shared,
            );
        }
    }

    /// The input ended: a last `on_watermark(MAX)`, `close`, and what they produced; with
    /// checkpoints, the final report and the end marker. After a stop's final barrier the
    /// open state stays in the checkpoint instead (nothing is flushed).
    fn finish(&mut self, held: &[Capability<u64>], outputs: &mut [&mut Output]) {
        if self.stopped() {
            self.transform.close(&mut self.outs);
            self.outs = Outputs::new(&self.ctx.component_id);
            return;
        }
        self.transform.on_watermark(EventTime::MAX, &mut self.outs);
        self.transform.close(&mut self.outs);
        ship(&mut self.outs, held, outputs, &self.metrics);
        if self.barriers.is_some() {
            let report = self.report();
            if let Some(barriers) = self.barriers.as_mut() {
                let end = barriers.end(report);
                send_marker(&end, held, outputs);
            }
        }
    }
}

/// An event-time assigner (`normalize`): disconnected from its input's timestamps, it holds
/// its capabilities at its own watermark, the greatest event time it emitted minus the
/// out-of-orderness, advanced after every batch and, when idle, with the wall clock.
fn assigner_operator<'scope, P>(
    scope: Scope<'scope, u64>,
    input: Data<'scope>,
    pact: P,
    mut state: TransformState,
    named: usize,
) -> Vec<Data<'scope>>
where
    P: ParallelizationContract<u64, Vec<Flow>>,
{
    let mut builder = OperatorBuilder::new(state.ctx.component_id.to_string(), scope);
    let info = builder.operator_info();
    let activator = scope.activator_for(Rc::clone(&info.address));
    wake_on_checkpoints(scope, &info.address, state.barriers.as_ref());
    let (mut outs, streams) = transform_outputs(&mut builder, named);
    // Its outputs do not depend on its input's timestamps.
    let mut input = builder.new_input_connection(input, pact, Vec::new());
    // Shared by its instances on every worker (and, through `gossip`, every process): an idle
    // instance catches up with it.
    let shared = AssignerWatermarks::of(state.ctx.process_shared()).slot(&state.ctx.component_id);
    let in_flight = InFlight::of(state.ctx.process_shared());
    builder.build(move |caps| {
        let mut caps = Some(caps);
        let out_of_orderness = state.ctx.pipeline.out_of_orderness_ms as i64;
        let idle_timeout = Duration::from_millis(state.ctx.pipeline.idle_timeout_ms);
        let mut last_data = Instant::now();
        let mut last_tick = Instant::now();
        let mut restored = false;
        move |frontiers| {
            state.open_once();
            let Some(held) = caps.as_mut() else {
                // The input ended; nothing may be sent any more.
                input.for_each(|_cap, data| data.clear());
                return;
            };
            let mut outputs: Vec<&mut Output> = outs.iter_mut().collect();
            let shared = Some(&*shared);
            if !restored {
                restored = true;
                // Resume at the restored watermark.
                if let Some(seen) = state.max_seen {
                    state.advance_to(
                        seen.saturating_sub(out_of_orderness),
                        held,
                        &mut outputs,
                        shared,
                    );
                }
            }
            // The watermark moves after every batch, so where it stands between batches does
            // not depend on scheduling.
            let got_data =
                state.handle_input(&mut input, held, &mut outputs, |state, time, held, outputs| {
                    let seen = state.max_seen.map_or(time, |seen: EventTime| seen.max(time));
                    state.max_seen = Some(seen);
                    state.advance_to(seen.saturating_sub(out_of_orderness), held, outputs, shared);
                });
            if state.paused() {
                return;
            }
            if state.pass_orphaned(held, &mut outputs) && state.paused() {
                return;
            }
            if frontiers[0].frontier().is_empty() {
                state.finish(held, &mut outputs);
                caps = None;
                return;
            }
            if state.stopped() {
                return;
            }
            // Idle: advance with the wall clock, and catch up with the siblings. Not with the
            // wall clock while a source waits for backpressure (in the last second, or idle
            // timeout): its stream is held back, not idle, and what it sends next would be late.
            let now = Instant::now();
            if got_data {
                last_data = now;
            }
            let mut target = state.watermark;
            if now.duration_since(last_data) >= idle_timeout {
                let held_back =
                    in_flight.throttled_within(idle_timeout.as_millis().max(1_000) as i64);
                if !held_back {
                    let elapsed = now.duration_since(last_tick).as_millis() as i64;
                    target = target.saturating_add(elapsed);
                }
                if let Some(shared) = shared {
                    target = target.max(shared.load(Ordering::Relaxed));
                }
            }
            last_tick = now;
            state.advance_to(target, held, &mut outputs, shared);
            activator.activate_after(
                (idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_millis(250)),
            );
        }
    });
    streams
}

/// An ordinary transform: its capabilities follow its input frontier, and `on_watermark` runs
/// when the frontier advances.
fn follower_operator<'scope, P>(
    scope: Scope<'scope, u64>,
    input: Data<'scope>,
    pact: P,
    mut state: TransformState,
    named: usize,
) -> Vec<Data<'scope>>
where
    P: ParallelizationContract<u64, Vec<Flow>>,
{
    let mut builder = OperatorBuilder::new(state.ctx.component_id.to_string(), scope);
    let info = builder.operator_info();
    wake_on_checkpoints(scope, &info.address, state.barriers.as_ref());
    let (mut outs, streams) = transform_outputs(&mut builder, named);
    let connection: Vec<(usize, Antichain<u64>)> =
        (0..outs.len()).map(|output| (output, Antichain::from_elem(0))).collect();
    let mut input = builder.new_input_connection(input, pact, connection);
    builder.build(move |caps| {
        let mut caps = Some(caps);
        move |frontiers| {
            state.open_once();
            let Some(held) = caps.as_mut() else {
                // The input ended; nothing may be sent any more.
                input.for_each(|_cap, data| data.clear());
                return;
            };
            let mut outputs: Vec<&mut Output> = outs.iter_mut().collect();
            state.handle_input(&mut input, held, &mut outputs, |_, _, _, _| {});
            if state.paused() {
                return;
            }
            if state.pass_orphaned(held, &mut outputs) && state.paused() {
                return;
            }
            match frontiers[0].frontier().first().copied() {
                Some(_) if state.stopped() => {}
                Some(time) => state.advance_to(time as EventTime, held, &mut outputs, None),
                None => {
                    state.finish(held, &mut outputs);
                    caps = None;
                }
            }
        }
    });
    streams
}

/// Moves an operator's watermark: `on_watermark`, ship what it closed, downgrade the
/// capabilities, publish the watermark to siblings and metrics.
fn advance(
    transform: &mut dyn Transform,
    watermark: EventTime,
    held: &mut [Capability<u64>],
    outputs: &mut [&mut Output],
    outs: &mut Outputs,
    metrics: &ComponentMetrics,
    shared: Option<&AtomicI64>,
) {
    if let Some(shared) = shared {
        shared.fetch_max(watermark, Ordering::Relaxed);
    }
    transform.on_watermark(watermark, outs);
    ship(outs, held, outputs, metrics);
    downgrade_all(held, to_time(watermark));
    metrics.watermark(watermark);
}

/// One worker's sink and its checkpoint side.
struct SinkState {
    sink: Box<dyn Sink>,
    ctx: ComponentContext,
    metrics: ComponentMetrics,
    run: RunContext,
    barriers: Option<Barriers>,
    failed: bool,
    closed: bool,
    watermark: EventTime,
}

impl SinkState {
    /// Opens the sink, restores it, registers its publisher and publishes again what the
    /// restored checkpoint staged for the instances this one replaces.
    fn open(&mut self) {
        if let Err(error) = self.sink.open(&self.ctx) {
            self.run.fail(&self.ctx.component_id, error);
            self.failed = true;
            return;
        }
        let sink = &mut self.sink;
        restore_each(self.barriers.as_ref(), &self.ctx, &self.run, |state| sink.restore(state));
        let Some(barriers) = &self.barriers else { return };
        let Some(publisher) = self.sink.publisher() else { return };
        let checkpoints = &barriers.checkpoints;
        checkpoints.register_publisher(&self.ctx.component_id, Arc::clone(&publisher));
        let (index, peers) = (self.ctx.worker_index, self.ctx.workers);
        match checkpoints
            .republish(&self.ctx.component_id, &*publisher, |worker| worker % peers == index)
        {
            Ok(0) => {}
            Ok(count) => {
                tracing::info!(component = %self.ctx.component_id, files = count, "published the restored checkpoint's output again");
            }
            Err(error) => self.run.fail(&self.ctx.component_id, error),
        }
    }

    /// The input held while paused.
    fn held(&mut self) -> Vec<Flow> {
        self.barriers
            .as_mut()
            .map(|barriers| barriers.held.drain(..).map(|(flow, _)| flow).collect())
            .unwrap_or_default()
    }

    fn write(&mut self, batch: Batch) {
        let count = batch.len();
        self.metrics.received(count);
        if self.failed || self.closed {
            self.metrics.discarded("sink_unavailable", count as u64);
            self.metrics.flight_taken(count);
            return;
        }
        let newest = batch.max_event_time();
        match self.sink.write_batch(batch) {
            Ok(()) => {
                self.metrics.sent(count);
                if let Some(time) = newest {
                    self.metrics.event_lag(time);
                }
            }
            Err(error) => {
                self.metrics.error("write", count);
                tracing::warn!(component = %self.ctx.component_id, %error, records = count, "sink write failed");
            }
        }
        // In flight until written: a sink takes what waits on its input all at once.
        self.metrics.flight_taken(count);
    }

    /// Pre-commits: what was written is durable or staged, and the sink's state.
    fn report(&mut self) -> Report {
        if self.failed {
            return Report::default();
        }
        let (staged, failed) = match self.sink.pre_commit() {
            Ok(staged) => (staged, false),
            Err(error) => {
                self.metrics.error("pre_commit", 1);
                tracing::warn!(component = %self.ctx.component_id, %error, "sink pre-commit failed: this checkpoint is not taken");
                (Vec::new(), true)
            }
        };
        let state = self.sink.snapshot().unwrap_or_else(|error| {
            self.run.fail(&self.ctx.component_id, error);
            None
        });
        Report { watermark: None, state, staged, failed }
    }

    fn handle(&mut self, flow: Flow) {
        if let Some(barriers) = self.barriers.as_mut()
            && barriers.paused.is_some()
        {
            barriers.held.push((flow, 0));
            return;
        }
        match flow {
            Flow::Data(batch) => self.write(batch),
            marker => {
                let Some(epoch) =
                    self.barriers.as_mut().and_then(|barriers| barriers.arrived(&marker))
                else {
                    return;
                };
                let report = self.report();
                if let Some(barriers) = self.barriers.as_mut() {
                    barriers.passed(epoch, report);
                }
            }
        }
    }

    fn close(&mut self) {
        self.closed = true;
        if self.barriers.as_ref().is_some_and(|barriers| !barriers.stopped) {
            let report = self.report();
            if let Some(barriers) = self.barriers.as_mut() {
                barriers.end(report);
            }
        }
        if self.failed {
            return;
        }
        if let Err(error) = self.sink.close() {
            self.metrics.error("close", 1);
            tracing::warn!(component = %self.ctx.component_id, %error, "sink close failed");
        }
    }
}

fn sink_operator<'scope>(
    scope: Scope<'scope, u64>,
    input: Data<'scope>,
    sink: Box<dyn Sink>,
    ctx: ComponentContext,
    metrics: ComponentMetrics,
    run: RunContext,
    barriers: Option<Barriers>,
) {
    let mut builder = OperatorBuilder::new(ctx.component_id.to_string(), scope);
    let info = builder.operator_info();
    wake_on_checkpoints(scope, &info.address, barriers.as_ref());
    let mut input = builder.new_input(input, PipelinePact);
    let mut state =
        SinkState { sink, ctx, metrics, run, barriers, failed: false, closed: false, watermark: 0 };
    // Incomplete until closed: a sink holds no capability, and timely would otherwise shut it
    // down once its input ended even while it waits for a checkpoint (paused), before it
    // made its final report.
    builder.build_reschedule(move |_caps| {
        let mut opened = false;
        move |frontiers| {
            if !opened {
                opened = true;
                state.open();
            }
            let mut items: Vec<Flow> = state.held();
            input.for_each(|_cap, data| items.append(data));
            loop {
                for flow in items {
                    state.handle(flow);
                }
                if state.closed || state.barriers.as_mut().is_some_and(Barriers::is_paused) {
                    return !state.closed;
                }
                if let Some(epoch) = state.barriers.as_ref().and_then(Barriers::orphaned) {
                    let report = state.report();
                    if let Some(barriers) = state.barriers.as_mut() {
                        barriers.passed(epoch, report);
                    }
                    items = Vec::new();
                    continue;
                }
                // Held input goes on as soon as the checkpoint aligned.
                items = state.held();
                if items.is_empty() {
                    break;
                }
            }
            match frontiers[0].frontier().first().copied() {
                Some(time) if time as EventTime > state.watermark && !state.failed => {
                    state.watermark = time as EventTime;
                    if let Err(error) = state.sink.on_watermark(state.watermark) {
                        state.metrics.error("watermark", 1);
                        tracing::warn!(component = %state.ctx.component_id, %error, "sink watermark hook failed");
                    }
                }
                Some(_) => {}
                None => state.close(),
            }
            !state.closed
        }
    });
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::registry::Registry;
    use crate::spec::load_str;

    #[test]
    fn spread_batches_go_round_robin_over_the_process_workers_and_markers_to_their_worker() {
        // Worker 5 of a cluster of 3 processes x 3 workers: process 1 has workers 3, 4, 5.
        let mut route = Layout { index: 5, peers: 9, local: 3 }.round_robin();
        let data = || Flow::Data(Batch::Raw(tidewatch_api::RawBatch::new()));
        let targets: Vec<u64> = (0..6).map(|_| route(&data())).collect();
        assert_eq!(targets, [3, 4, 5, 3, 4, 5]);
        assert_eq!(route(&Flow::Barrier { epoch: 1, to: 7 }), 7);
        assert_eq!(route(&Flow::End { from: 5, to: 0 }), 0);
        assert_eq!(route(&data()), 3, "markers do not move the rotation");
        // One process of one worker: everything stays.
        let mut alone = Layout { index: 0, peers: 1, local: 1 }.round_robin();
        assert_eq!((alone(&data()), alone(&data())), (0, 0));
    }

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .expect("output")
            .lines()
            .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
            .collect()
    }

    #[test]
    fn workers_share_a_run_and_runs_share_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = "[pipeline]\nhttp_address = \"\"\n\
                    [sources.fleet]\ntype = \"simulator\"\ndevices = 4\ncount = 200\n\
                    [sinks.out]\ntype = \"file\"\ninputs = [\"fleet\"]\npath = \"out.jsonl\"\n";
        let pipeline = load_str(text, "p.toml", dir.path(), &Registry::test_builtins(), |_| None)
            .expect("valid");
        let path = dir.path().join("out.jsonl");
        let mut counts = Vec::new();
        for _ in 0..2 {
            run(&pipeline, 2, &RunContext::default()).expect("runs");
            // Both workers wrote through one writer (whole lines), and each run opened the
            // file afresh (truncated) rather than reusing the previous run's writer.
            counts.push(lines(&path).len());
        }
        assert!(counts[0] > 0, "{counts:?}");
        assert_eq!(counts[0], counts[1], "{counts:?}");
    }
}
