//! Prometheus metrics of a running pipeline.
//!
//! Every component has the four counters of the Vector/Prometheus convention, labelled by
//! `component_id` and `component_type` (bounded: one series per component):
//! `tidewatch_component_received_events_total`, `..._sent_events_total`,
//! `..._errors_total{error_type}` and `..._discarded_events_total{reason}`; event-time progress
//! is `tidewatch_watermark_lag_seconds{component_id}`, and how far behind the wall clock the
//! records reach each sink is the histogram `tidewatch_sink_event_lag_seconds{component_id}`.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tidewatch_api::{EventTime, MetricsRegistry};

/// The metrics of one engine (one process may hold several, e.g. in tests).
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    shared: MetricsRegistry,
    received: IntCounterVec,
    sent: IntCounterVec,
    errors: IntCounterVec,
    discarded: IntCounterVec,
    watermark_lag: GaugeVec,
    event_lag: HistogramVec,
    backlog: IntGaugeVec,
    backlog_capacity: IntGaugeVec,
    workers: IntGauge,
    up: IntGauge,
    in_flight: IntGauge,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let vec = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|error| unreachable!("static metric definition {name} is valid: {error}"));
    if let Err(error) = registry.register(Box::new(vec.clone())) {
        tracing::warn!(%error, name, "metric registered twice");
    }
    vec
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh set of metrics in its own registry.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let component = &["component_id", "component_type"];
        let received = counter(
            &registry,
            "tidewatch_component_received_events_total",
            "Records received by a component.",
            component,
        );
        let sent = counter(
            &registry,
            "tidewatch_component_sent_events_total",
            "Records sent by a component on its main output.",
            component,
        );
        let errors = counter(
            &registry,
            "tidewatch_component_errors_total",
            "Records a component could not process (sent to <id>.errors) and failed writes.",
            &["component_id", "component_type", "error_type"],
        );
        let discarded = counter(
            &registry,
            "tidewatch_component_discarded_events_total",
            "Records a component dropped on purpose (late, filtered, too few steps).",
            &["component_id", "component_type", "reason"],
        );
        let watermark_lag = GaugeVec::new(
            Opts::new(
                "tidewatch_watermark_lag_seconds",
                "Wall clock minus the event-time watermark at a component's input.",
            ),
            &["component_id"],
        )
        .unwrap_or_else(|error| unreachable!("static metric definition is valid: {error}"));
        let _ = registry.register(Box::new(watermark_lag.clone()));
        let event_lag = HistogramVec::new(
            HistogramOpts::new(
                "tidewatch_sink_event_lag_seconds",
                "Wall clock minus the event time of the newest record of each batch a sink \
                 writes: with event time taken at the device, the latency from reading to \
                 output.",
            )
            .buckets(EVENT_LAG_BUCKETS.to_vec()),
            &["component_id"],
        )
        .unwrap_or_else(|error| unreachable!("static metric definition is valid: {error}"));
        let _ = registry.register(Box::new(event_lag.clone()));
        let gauge = |name: &str, help: &str| {
            let gauge = IntGaugeVec::new(Opts::new(name, help), &["component_id", "worker"])
                .unwrap_or_else(|error| unreachable!("static metric definition is valid: {error}"));
            let _ = registry.register(Box::new(gauge.clone()));
            gauge
        };
        let backlog = gauge(
            "tidewatch_source_backlog_records",
            "Records a source received and the pipeline has not consumed yet (consumer lag).",
        );
        let backlog_capacity = gauge(
            "tidewatch_source_backlog_capacity_records",
            "The most records that can wait at a source before it stops taking more.",
        );
        let workers = IntGauge::new("tidewatch_workers", "Worker threads of this process.")
            .unwrap_or_else(|error| unreachable!("static metric definition is valid: {error}"));
        let _ = registry.register(Box::new(workers.clone()));
        let up = IntGauge::new(
            "tidewatch_pipeline_running",
            "1 while the pipeline runs, 0 once it stopped.",
        )
        .unwrap_or_else(|error| unreachable!("static metric definition is valid: {error}"));
        let _ = registry.register(Box::new(up.clone()));
        let in_flight = IntGauge::new(
            "tidewatch_in_flight_records",
            "Records sent between the operators and not yet taken, in every process of the run: \
             sources wait while it is above max_in_flight_records.",
        )
        .unwrap_or_else(|error| unreachable!("static metric definition is valid: {error}"));
        let _ = registry.register(Box::new(in_flight.clone()));
        let shared = MetricsRegistry::new(registry.clone());
        Metrics {
            registry,
            shared,
            received,
            sent,
            errors,
            discarded,
            watermark_lag,
            event_lag,
            backlog,
            backlog_capacity,
            workers,
            up,
            in_flight,
        }
    }

    /// The counters of one component (cheap to clone; increments are atomic).
    pub fn component(&self, component_id: &str, component_type: &str) -> ComponentMetrics {
        ComponentMetrics {
            received: self.received.with_label_values(&[component_id, component_type]),
            sent: self.sent.with_label_values(&[component_id, component_type]),
            errors: self.errors.clone(),
            discarded: self.discarded.clone(),
            watermark_lag: self.watermark_lag.clone(),
            event_lag: self.event_lag.clone(),
            backlog: self.backlog.clone(),
            backlog_capacity: self.backlog_capacity.clone(),
            id: component_id.to_owned(),
            type_name: component_type.to_owned(),
            flight: None,
        }
    }

    /// Sets the worker-count gauge.
    pub fn set_workers(&self, workers: usize) {
        self.workers.set(workers as i64);
    }

    /// Sets the records-in-flight gauge.
    pub fn set_in_flight(&self, records: i64) {
        self.in_flight.set(records);
    }

    /// Sets the running gauge.
    pub fn set_running(&self, running: bool) {
        self.up.set(i64::from(running));
    }

    /// The underlying registry, to add metrics of an embedder's own.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The registry with its identity, as components get it
    /// ([`tidewatch_api::ComponentContext::metrics_registry`]).
    pub fn shared_registry(&self) -> &MetricsRegistry {
        &self.shared
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(error) = encoder.encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(%error, "cannot encode metrics");
        }
        String::from_utf8_lossy(&buffer).into_owned()
    }

    /// The current value of a component counter (`received`, `sent`), for tests and reports.
    pub fn received(&self, component_id: &str, component_type: &str) -> u64 {
        self.received.with_label_values(&[component_id, component_type]).get()
    }

    /// The current number of records sent by a component.
    pub fn sent(&self, component_id: &str, component_type: &str) -> u64 {
        self.sent.with_label_values(&[component_id, component_type]).get()
    }

    /// The current number of errors of a component, over all error types.
    pub fn errors(&self, component_id: &str) -> u64 {
        self.sum(&self.errors, component_id)
    }

    /// The current number of discarded records of a component, over all reasons.
    pub fn discarded(&self, component_id: &str) -> u64 {
        self.sum(&self.discarded, component_id)
    }

    fn sum(&self, vec: &IntCounterVec, component_id: &str) -> u64 {
        use prometheus::core::Collector;
        vec.collect()
            .iter()
            .flat_map(|family| family.get_metric().iter())
            .filter(|metric| {
                metric
                    .get_label()
                    .iter()
                    .any(|label| label.name() == "component_id" && label.value() == component_id)
            })
            .map(|metric| metric.get_counter().get_value() as u64)
            .sum()
    }
}

/// Buckets of `tidewatch_sink_event_lag_seconds`, s: milliseconds for the edge loop up to a
/// minute for a cloud pipeline behind Kafka.
const EVENT_LAG_BUCKETS: [f64; 16] =
    [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0];

/// The counters of one component instance.
#[derive(Clone, Debug)]
pub struct ComponentMetrics {
    received: IntCounter,
    sent: IntCounter,
    errors: IntCounterVec,
    discarded: IntCounterVec,
    watermark_lag: GaugeVec,
    event_lag: HistogramVec,
    backlog: IntGaugeVec,
    backlog_capacity: IntGaugeVec,
    id: String,
    type_name: String,
    /// Its part in the records in flight (backpressure), once the runtime gave it one.
    flight: Option<crate::flow_control::Flight>,
}

impl ComponentMetrics {
    /// The same counters, taking part in the records in flight with `flight`.
    pub(crate) fn with_flight(mut self, flight: crate::flow_control::Flight) -> ComponentMetrics {
        self.flight = Some(flight);
        self
    }

    /// `count` records were sent on timely output `output` (records in flight).
    pub(crate) fn flight_sent(&self, output: usize, count: usize) {
        if let Some(flight) = &self.flight {
            flight.sent(output, count);
        }
    }

    /// `count` records were taken off the input (records in flight).
    pub(crate) fn flight_taken(&self, count: usize) {
        if let Some(flight) = &self.flight {
            flight.taken(count);
        }
    }

    /// Whether a source should wait, and the run's records in flight.
    pub(crate) fn flight_full(&self) -> (bool, i64) {
        self.flight.as_ref().map_or((false, 0), |flight| (flight.full(), flight.total()))
    }

    /// Counts records received.
    pub fn received(&self, count: usize) {
        self.received.inc_by(count as u64);
    }
    /// Counts records sent on the main output.
    pub fn sent(&self, count: usize) {
        self.sent.inc_by(count as u64);
    }
    /// Counts errors of one type.
    pub fn error(&self, error_type: &str, count: usize) {
        self.errors
            .with_label_values(&[&self.id, &self.type_name, error_type])
            .inc_by(count as u64);
    }
    /// Counts records discarded for a reason.
    pub fn discarded(&self, reason: &str, count: u64) {
        self.discarded.with_label_values(&[&self.id, &self.type_name, reason]).inc_by(count);
    }
    /// Records how far behind the wall clock a sink wrote the record of time `event_time_ms`.
    pub fn event_lag(&self, event_time_ms: EventTime) {
        let lag = (tidewatch_api::records::now_ms() - event_time_ms).max(0) as f64 / 1000.0;
        self.event_lag.with_label_values(&[&self.id]).observe(lag);
    }
    /// Records the watermark's lag behind the wall clock.
    pub fn watermark(&self, watermark_ms: EventTime) {
        let lag = (tidewatch_api::records::now_ms() - watermark_ms) as f64 / 1000.0;
        self.watermark_lag.with_label_values(&[&self.id]).set(lag);
    }
    /// The backlog gauges of a worker's instance of this source (labels resolved once).
    pub fn backlog_gauges(&self, worker: usize) -> BacklogGauges {
        let worker = worker.to_string();
        let labels = [self.id.as_str(), worker.as_str()];
        BacklogGauges {
            records: self.backlog.with_label_values(&labels),
            capacity: self.backlog_capacity.with_label_values(&labels),
        }
    }
}

/// `tidewatch_source_backlog_records` and `..._capacity_records` of one source instance.
#[derive(Clone, Debug)]
pub struct BacklogGauges {
    records: IntGauge,
    capacity: IntGauge,
}

impl BacklogGauges {
    /// Records what the source reports.
    pub fn set(&self, backlog: tidewatch_api::Backlog) {
        self.records.set(backlog.records as i64);
        self.capacity.set(backlog.capacity as i64);
    }
}
