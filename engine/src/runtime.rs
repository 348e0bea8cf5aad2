//! Turns a validated [`Pipeline`] into a timely dataflow and runs it.
//!
//! Every worker builds the same dataflow from trait objects. Timestamps are event time in ms:
//! - sources of raw messages hold their capability at 0 until they finish (raw messages have
//!   no event time yet);
//! - a transform that assigns event time (`normalize`) is disconnected from its input in
//!   timely's progress tracking and holds its own capability at its watermark: the greatest
//!   event time it emitted minus `out_of_orderness_ms`. When it has seen no data for
//!   `idle_timeout_ms` its watermark advances with the wall clock and catches up with its
//!   siblings on other workers, so an idle worker or a silent device stalls nothing;
//! - every other operator holds a capability at its input frontier and calls `on_watermark`
//!   when it advances; an empty frontier means the input ended (`on_watermark(MAX)`, `close`).
//!
//! Keyed transforms (`window`, `stats`) receive each device's records on the worker that owns
//! the device (`DeviceId::worker`); batches are split and exchanged only where the input is
//! not partitioned already.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidewatch_api::{
    Batch, ComponentContext, ComponentError, ErrorRecord, EventTime, Outputs, ReadingBatch, Sink,
    Source, SourcePoll, Transform, TransformProperties,
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
    let watermarks: Arc<Mutex<HashMap<String, Arc<AtomicI64>>>> = Arc::default();
    let guards = timely::execute(config, move |worker| {
        let index = worker.index();
        let peers = worker.peers();
        worker.dataflow::<u64, _, _>(|scope| {
            build(scope, &pipeline, index, peers, &shared, &watermarks);
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
    watermarks: &Arc<Mutex<HashMap<String, Arc<AtomicI64>>>>,
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
        .with_metrics_registry(run.metrics.shared_registry().clone());
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
                let shared_watermark = properties.assigns_event_time.then(|| {
                    let mut map =
                        watermarks.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                    Arc::clone(
                        map.entry(component.id.clone())
                            .or_insert_with(|| Arc::new(AtomicI64::new(EventTime::MIN))),
                    )
                });
                let spec = TransformSpec {
                    properties: *properties,
                    ctx,
                    metrics,
                    run: run.clone(),
                    shared_watermark,
                };
                let (main, errors, late) = if properties.keyed && peers > 1 && !inputs_partitioned {
                    let split = input.flat_map(move |batch: Batch| {
                        batch.split_by_worker(peers).into_iter().map(|(_, part)| part)
                    });
                    transform_operator(
                        scope,
                        split,
                        ExchangePact::new(|batch: &Batch| batch.route_hash()),
                        instance,
                        spec,
                    )
                } else {
                    transform_operator(scope, input, PipelinePact, instance, spec)
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

struct TransformSpec {
    properties: TransformProperties,
    ctx: ComponentContext,
    metrics: ComponentMetrics,
    run: RunContext,
    shared_watermark: Option<Arc<AtomicI64>>,
}

fn transform_operator<'scope, P>(
    scope: Scope<'scope, u64>,
    input: Data<'scope>,
    pact: P,
    mut transform: Box<dyn Transform>,
    spec: TransformSpec,
) -> (Data<'scope>, Data<'scope>, Data<'scope>)
where
    P: ParallelizationContract<u64, Vec<Batch>>,
{
    let TransformSpec { properties, ctx, metrics, run, shared_watermark } = spec;
    let mut builder = OperatorBuilder::new(ctx.component_id.to_string(), scope);
    let info = builder.operator_info();
    let activator = scope.activator_for(Rc::clone(&info.address));
    let (mut main_out, main) = builder.new_output::<Vec<Batch>>();
    let (mut error_out, errors) = builder.new_output::<Vec<Batch>>();
    let (mut late_out, late) = builder.new_output::<Vec<Batch>>();
    let assigner = properties.assigns_event_time;
    // An event-time assigner's outputs do not depend on its input's timestamps.
    let connection: Vec<(usize, Antichain<u64>)> = if assigner {
        Vec::new()
    } else {
        (0..3).map(|output| (output, Antichain::from_elem(0))).collect()
    };
    let mut input = builder.new_input_connection(input, pact, connection);
    builder.build(move |caps| {
        let mut caps = Some(caps);
        let mut opened = false;
        let mut outs = Outputs::new(&ctx.component_id);
        let out_of_orderness = ctx.pipeline.out_of_orderness_ms as i64;
        let idle_timeout = Duration::from_millis(ctx.pipeline.idle_timeout_ms);
        let mut watermark: EventTime = 0;
        let mut max_seen: Option<EventTime> = None;
        let mut last_data = Instant::now();
        let mut last_tick = Instant::now();
        move |frontiers| {
            if !opened {
                opened = true;
                if let Err(error) = transform.open(&ctx) {
                    run.fail(&ctx.component_id, error);
                }
            }
            let Some(held) = caps.as_mut() else {
                // The input ended; nothing may be sent any more.
                input.for_each(|_cap, data| data.clear());
                return;
            };
            let mut got_data = false;
            input.for_each(|cap, data| {
                let batch_time = cap.least().map_or(0, |time| *time as EventTime);
                outs.set_batch_watermark(batch_time);
                for batch in data.drain(..) {
                    got_data = true;
                    metrics.received(batch.len());
                    transform.process_batch(batch, &mut outs);
                    let mut outputs = [&mut main_out, &mut error_out, &mut late_out];
                    let emitted_max = ship(&mut outs, held, &mut outputs, &metrics);
                    // An assigner moves its watermark after every batch, so where the
                    // watermark stands between batches does not depend on scheduling.
                    if assigner && let Some(time) = emitted_max {
                        let seen = max_seen.map_or(time, |seen: EventTime| seen.max(time));
                        max_seen = Some(seen);
                        let target = seen.saturating_sub(out_of_orderness);
                        if target > watermark {
                            watermark = target;
                            advance(
                                &mut *transform,
                                watermark,
                                held,
                                &mut outputs,
                                &mut outs,
                                &metrics,
                                shared_watermark.as_deref(),
                            );
                        }
                    }
                }
            });
            let frontier = frontiers[0].frontier().first().copied();
            let now = Instant::now();
            let target = if assigner {
                if got_data {
                    last_data = now;
                }
                let mut target = watermark;
                if now.duration_since(last_data) >= idle_timeout {
                    let elapsed = now.duration_since(last_tick).as_millis() as i64;
                    target = target.saturating_add(elapsed);
                    if let Some(shared) = &shared_watermark {
                        target = target.max(shared.load(Ordering::Relaxed));
                    }
                }
                last_tick = now;
                frontier.map(|_| target)
            } else {
                frontier.map(|time| time as EventTime)
            };
            let mut outputs = [&mut main_out, &mut error_out, &mut late_out];
            match target {
                Some(target) if target > watermark => {
                    watermark = target;
                    advance(
                        &mut *transform,
                        watermark,
                        held,
                        &mut outputs,
                        &mut outs,
                        &metrics,
                        shared_watermark.as_deref(),
                    );
                }
                Some(_) => {}
                None => {
                    transform.on_watermark(EventTime::MAX, &mut outs);
                    transform.close(&mut outs);
                    ship(&mut outs, held, &mut outputs, &metrics);
                    caps = None;
                    return;
                }
            }
            if assigner {
                activator.activate_after(
                    (idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_millis(250)),
                );
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
                    match sink.write_batch(batch) {
                        Ok(()) => metrics.sent(count),
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

use std::rc::Rc;
