//! Turns a validated [`Pipeline`] into a timely dataflow and runs it.
//!
//! Every worker builds the same dataflow from trait objects. Timestamps are event time in ms:
//! - sources of raw messages hold their capability at 0 until they finish (raw messages have
//!   no event time yet);
//! - a transform that assigns event time (`normalize`) is built by `assigner_operator`: it is
//!   disconnected from its input in timely's progress tracking and holds its own capability at
//!   its watermark: the greatest event time it emitted minus `out_of_orderness_ms`. When it has
//!   seen no data for `idle_timeout_ms` its watermark advances with the wall clock and catches
//!   up with its siblings on other workers of the process (a watermark kept in the run's
//!   [`ProcessShared`]), so an idle worker or a silent device stalls nothing;
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
//! not partitioned already.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidewatch_api::{
    Batch, ComponentContext, ComponentError, ErrorRecord, EventTime, Outputs, ProcessShared,
    ReadingBatch, Sink, Source, SourcePoll, Transform, Waker,
};
use timely::dataflow::channels::pact::{
    Exchange as ExchangePact, ParallelizationContract, Pipeline as PipelinePact,
};
use timely::dataflow::channels::pushers;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::{Capability, Concatenate};
use timely::dataflow::{Scope, Stream};
use timely::progress::Antichain;

use crate::http::Health;
use crate::metrics::{BacklogGauges, ComponentMetrics, Metrics};
use crate::spec::{Configured, Pipeline, Port};

type Data<'scope> = Stream<'scope, u64, Vec<Batch>>;
type Output = pushers::Output<u64, Vec<Batch>>;

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
        }
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

/// Runs `pipeline` on `workers` threads until every source finished (or shutdown was
/// requested and the data drained).
pub fn run(pipeline: &Pipeline, workers: usize, run: &RunContext) -> Result<(), EngineError> {
    let workers = workers.max(1);
    run.metrics.set_workers(workers);
    run.metrics.set_running(true);
    let config =
        if workers == 1 { timely::Config::thread() } else { timely::Config::process(workers) };
    let pipeline = Arc::new(pipeline.clone());
    let shared = run.clone();
    // What the workers of this process share in this run; dropped when the run ends.
    let process_shared = ProcessShared::new();
    let guards = timely::execute(config, move |worker| {
        let index = worker.index();
        let peers = worker.peers();
        worker.dataflow::<u64, _, _>(|scope| {
            build(scope, &pipeline, index, peers, &shared, &process_shared);
        });
        if shared.built.fetch_add(1, Ordering::SeqCst) + 1 == peers
            && !shared.shutdown.load(Ordering::SeqCst)
        {
            shared.health.set_ready(true);
        }
        while worker.step_or_park(Some(Duration::from_millis(50))) {}
    })
    .map_err(EngineError::Workers)?;
    let results = guards.join();
    run.metrics.set_running(false);
    run.health.set_ready(false);
    for result in results {
        if let Err(panic) = result {
            return Err(EngineError::WorkerPanic(panic));
        }
    }
    let mut errors =
        run.errors.lock().map(|mut errors| std::mem::take(&mut *errors)).unwrap_or_default();
    if errors.is_empty() { Ok(()) } else { Err(errors.remove(0)) }
}

fn build<'scope>(
    scope: Scope<'scope, u64>,
    pipeline: &Pipeline,
    index: usize,
    peers: usize,
    run: &RunContext,
    process_shared: &ProcessShared,
) {
    let mut streams: HashMap<(String, Port), Data<'scope>> = HashMap::new();
    let mut partitioned: HashMap<String, bool> = HashMap::new();
    for component in &pipeline.components {
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
        let metrics = run.metrics.component(&component.id, &component.type_name);
        let inputs: Vec<Data<'scope>> = component
            .inputs
            .iter()
            .filter_map(|input| streams.get(&(input.component.clone(), input.port)).cloned())
            .collect();
        let inputs_partitioned = component.inputs.iter().all(|input| {
            input.port != Port::Errors
                && partitioned.get(&input.component).copied().unwrap_or(false)
        });
        match &component.configured {
            Configured::Source(configured) => {
                let instance = configured.build(&ctx).unwrap_or_else(|error| {
                    run.fail(&component.id, error);
                    Box::new(Finished)
                });
                let (main, errors) = source_operator(scope, instance, ctx, metrics, run.clone());
                streams.insert((component.id.clone(), Port::Main), main);
                streams.insert((component.id.clone(), Port::Errors), errors);
                partitioned.insert(component.id.clone(), false);
            }
            Configured::Transform(configured, properties) => {
                let instance = configured.build(&ctx).unwrap_or_else(|error| {
                    run.fail(&component.id, error);
                    Box::new(Inert)
                });
                let input =
                    if inputs.len() == 1 { inputs[0].clone() } else { scope.concatenate(inputs) };
                let state = TransformState::new(instance, ctx, metrics, run.clone());
                let assigner = properties.assigns_event_time;
                let (main, errors, late) = if properties.keyed && peers > 1 && !inputs_partitioned {
                    let split = input.flat_map(move |batch: Batch| {
                        batch.split_by_worker(peers).into_iter().map(|(_, part)| part)
                    });
                    let pact = ExchangePact::new(|batch: &Batch| batch.route_hash());
                    if assigner {
                        assigner_operator(scope, split, pact, state)
                    } else {
                        follower_operator(scope, split, pact, state)
                    }
                } else if assigner {
                    assigner_operator(scope, input, PipelinePact, state)
                } else {
                    follower_operator(scope, input, PipelinePact, state)
                };
                streams.insert((component.id.clone(), Port::Main), main);
                streams.insert((component.id.clone(), Port::Errors), errors);
                streams.insert((component.id.clone(), Port::Late), late);
                partitioned.insert(component.id.clone(), properties.keyed || inputs_partitioned);
            }
            Configured::Sink(configured) => {
                let instance = configured.build(&ctx).unwrap_or_else(|error| {
                    run.fail(&component.id, error);
                    Box::new(Inert)
                });
                let input =
                    if inputs.len() == 1 { inputs[0].clone() } else { scope.concatenate(inputs) };
                sink_operator(scope, input, instance, ctx, metrics, run.clone());
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

/// Sends what a component produced: main batches, error records, late readings, discards.
fn ship(
    outs: &mut Outputs,
    caps: &[Capability<u64>],
    outputs: &mut [&mut Output],
    metrics: &ComponentMetrics,
) -> Option<EventTime> {
    let mut max_time: Option<EventTime> = None;
    let mut main = outs.take_main();
    if !main.is_empty() {
        let sent: usize = main.iter().map(Batch::len).sum();
        metrics.sent(sent);
        max_time = main.iter().filter_map(Batch::max_event_time).max();
        if let (Some(cap), Some(output)) = (caps.first(), outputs.get_mut(0)) {
            output.activate().give(cap, &mut main);
        }
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
            output.activate().give(cap, &mut vec![Batch::Errors(errors)]);
        }
    }
    let late: Vec<ReadingBatch> = outs.take_late();
    if !late.is_empty() {
        let count: usize = late.iter().map(ReadingBatch::len).sum();
        metrics.discarded("late", count as u64);
        if let (Some(cap), Some(output)) = (caps.get(2), outputs.get_mut(2)) {
            let mut batches: Vec<Batch> = late.into_iter().map(Batch::Readings).collect();
            output.activate().give(cap, &mut batches);
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

fn source_operator<'scope>(
    scope: Scope<'scope, u64>,
    mut source: Box<dyn Source>,
    ctx: ComponentContext,
    metrics: ComponentMetrics,
    run: RunContext,
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
    let (mut main_out, main) = builder.new_output::<Vec<Batch>>();
    let (mut error_out, errors) = builder.new_output::<Vec<Batch>>();
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
        run.health.source_waiting();
        move |_frontiers| {
            let Some(held) = caps.as_mut() else { return };
            let mut finished = false;
            if !opened {
                opened = true;
                if let Err(error) = source.open(&ctx) {
                    run.fail(&ctx.component_id, error);
                    finished = true;
                }
            }
            if !finished && run.shutdown.load(Ordering::Relaxed) {
                finished = true;
            }
            if !finished {
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
            let mut outputs = [&mut main_out, &mut error_out];
            if let Some(time) = ship(&mut outs, held, &mut outputs, &metrics) {
                max_seen = Some(max_seen.map_or(time, |seen| seen.max(time)));
                if let Some(seen) = max_seen {
                    let watermark = seen.saturating_sub(out_of_orderness);
                    downgrade_all(held, to_time(watermark));
                    metrics.watermark(watermark);
                }
            }
            if finished {
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

type Streams<'scope> = (Data<'scope>, Data<'scope>, Data<'scope>);

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
}

impl TransformState {
    fn new(
        transform: Box<dyn Transform>,
        ctx: ComponentContext,
        metrics: ComponentMetrics,
        run: RunContext,
    ) -> TransformState {
        let outs = Outputs::new(&ctx.component_id);
        TransformState { transform, ctx, metrics, run, outs, opened: false, watermark: 0 }
    }

    /// Calls `open` at the first activation.
    fn open_once(&mut self) {
        if !self.opened {
            self.opened = true;
            if let Err(error) = self.transform.open(&self.ctx) {
                self.run.fail(&self.ctx.component_id, error);
            }
        }
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
        self.metrics.received(batch.len());
        self.transform.process_batch(batch, &mut self.outs);
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

    /// The input ended: a last `on_watermark(MAX)`, `close`, and what they produced.
    fn finish(&mut self, held: &[Capability<u64>], outputs: &mut [&mut Output]) {
        self.transform.on_watermark(EventTime::MAX, &mut self.outs);
        self.transform.close(&mut self.outs);
        ship(&mut self.outs, held, outputs, &self.metrics);
    }
}

/// The watermark of an event-time assigner, shared by its instances on the workers of one
/// process (kept in the run's [`ProcessShared`]): an idle instance catches up with it.
struct AssignerWatermark(AtomicI64);

/// An event-time assigner (`normalize`): disconnected from its input's timestamps, it holds
/// its capabilities at its own watermark, the greatest event time it emitted minus the
/// out-of-orderness, advanced after every batch and, when idle, with the wall clock.
fn assigner_operator<'scope, P>(
    scope: Scope<'scope, u64>,
    input: Data<'scope>,
    pact: P,
    mut state: TransformState,
) -> Streams<'scope>
where
    P: ParallelizationContract<u64, Vec<Batch>>,
{
    let mut builder = OperatorBuilder::new(state.ctx.component_id.to_string(), scope);
    let info = builder.operator_info();
    let activator = scope.activator_for(Rc::clone(&info.address));
    let (mut main_out, main) = builder.new_output::<Vec<Batch>>();
    let (mut error_out, errors) = builder.new_output::<Vec<Batch>>();
    let (mut late_out, late) = builder.new_output::<Vec<Batch>>();
    // Its outputs do not depend on its input's timestamps.
    let mut input = builder.new_input_connection(input, pact, Vec::new());
    let shared = state
        .ctx
        .shared(|| Ok::<_, ComponentError>(AssignerWatermark(AtomicI64::new(EventTime::MIN))))
        .ok();
    builder.build(move |caps| {
        let mut caps = Some(caps);
        let out_of_orderness = state.ctx.pipeline.out_of_orderness_ms as i64;
        let idle_timeout = Duration::from_millis(state.ctx.pipeline.idle_timeout_ms);
        let mut max_seen: Option<EventTime> = None;
        let mut last_data = Instant::now();
        let mut last_tick = Instant::now();
        move |frontiers| {
            state.open_once();
            let Some(held) = caps.as_mut() else {
                // The input ended; nothing may be sent any more.
                input.for_each(|_cap, data| data.clear());
                return;
            };
            let shared = shared.as_deref().map(|shared| &shared.0);
            let mut got_data = false;
            input.for_each(|cap, data| {
                let batch_time = cap.least().map_or(0, |time| *time as EventTime);
                for batch in data.drain(..) {
                    got_data = true;
                    let mut outputs = [&mut main_out, &mut error_out, &mut late_out];
                    // The watermark moves after every batch, so where it stands between
                    // batches does not depend on scheduling.
                    if let Some(time) = state.process(batch, batch_time, held, &mut outputs) {
                        let seen = max_seen.map_or(time, |seen: EventTime| seen.max(time));
                        max_seen = Some(seen);
                        let target = seen.saturating_sub(out_of_orderness);
                        state.advance_to(target, held, &mut outputs, shared);
                    }
                }
            });
            let mut outputs = [&mut main_out, &mut error_out, &mut late_out];
            if frontiers[0].frontier().is_empty() {
                state.finish(held, &mut outputs);
                caps = None;
                return;
            }
            // Idle: advance with the wall clock, and catch up with the siblings.
            let now = Instant::now();
            if got_data {
                last_data = now;
            }
            let mut target = state.watermark;
            if now.duration_since(last_data) >= idle_timeout {
                let elapsed = now.duration_since(last_tick).as_millis() as i64;
                target = target.saturating_add(elapsed);
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
    (main, errors, late)
}

/// An ordinary transform: its capabilities follow its input frontier, and `on_watermark` runs
/// when the frontier advances.
fn follower_operator<'scope, P>(
    scope: Scope<'scope, u64>,
    input: Data<'scope>,
    pact: P,
    mut state: TransformState,
) -> Streams<'scope>
where
    P: ParallelizationContract<u64, Vec<Batch>>,
{
    let mut builder = OperatorBuilder::new(state.ctx.component_id.to_string(), scope);
    let (mut main_out, main) = builder.new_output::<Vec<Batch>>();
    let (mut error_out, errors) = builder.new_output::<Vec<Batch>>();
    let (mut late_out, late) = builder.new_output::<Vec<Batch>>();
    let connection: Vec<(usize, Antichain<u64>)> =
        (0..3).map(|output| (output, Antichain::from_elem(0))).collect();
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
            input.for_each(|cap, data| {
                let batch_time = cap.least().map_or(0, |time| *time as EventTime);
                for batch in data.drain(..) {
                    let mut outputs = [&mut main_out, &mut error_out, &mut late_out];
                    state.process(batch, batch_time, held, &mut outputs);
                }
            });
            let mut outputs = [&mut main_out, &mut error_out, &mut late_out];
            match frontiers[0].frontier().first().copied() {
                Some(time) => state.advance_to(time as EventTime, held, &mut outputs, None),
                None => {
                    state.finish(held, &mut outputs);
                    caps = None;
                }
            }
        }
    });
    (main, errors, late)
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

fn sink_operator<'scope>(
    scope: Scope<'scope, u64>,
    input: Data<'scope>,
    mut sink: Box<dyn Sink>,
    ctx: ComponentContext,
    metrics: ComponentMetrics,
    run: RunContext,
) {
    let mut builder = OperatorBuilder::new(ctx.component_id.to_string(), scope);
    let mut input = builder.new_input(input, PipelinePact);
    builder.build(move |_caps| {
        let mut opened = false;
        let mut closed = false;
        let mut failed = false;
        let mut watermark: EventTime = 0;
        move |frontiers| {
            if !opened {
                opened = true;
                if let Err(error) = sink.open(&ctx) {
                    run.fail(&ctx.component_id, error);
                    failed = true;
                }
            }
            input.for_each(|_cap, data| {
                for batch in data.drain(..) {
                    let count = batch.len();
                    metrics.received(count);
                    if failed || closed {
                        metrics.discarded("sink_unavailable", count as u64);
                        continue;
                    }
                    let newest = batch.max_event_time();
                    match sink.write_batch(batch) {
                        Ok(()) => {
                            metrics.sent(count);
                            if let Some(time) = newest {
                                metrics.event_lag(time);
                            }
                        }
                        Err(error) => {
                            metrics.error("write", count);
                            tracing::warn!(component = %ctx.component_id, %error, records = count, "sink write failed");
                        }
                    }
                }
            });
            if closed || failed {
                return;
            }
            match frontiers[0].frontier().first().copied() {
                Some(time) if time as EventTime > watermark => {
                    watermark = time as EventTime;
                    if let Err(error) = sink.on_watermark(watermark) {
                        metrics.error("watermark", 1);
                        tracing::warn!(component = %ctx.component_id, %error, "sink watermark hook failed");
                    }
                }
                Some(_) => {}
                None => {
                    closed = true;
                    if let Err(error) = sink.close() {
                        metrics.error("close", 1);
                        tracing::warn!(component = %ctx.component_id, %error, "sink close failed");
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::registry::Registry;
    use crate::spec::load_str;

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
