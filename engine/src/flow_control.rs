//! Backpressure: a bound on the records in flight between the operators of a run.
//!
//! timely's channels are unbounded: when a transform or a sink is slower than the sources,
//! what they have not taken yet piles up in the channels, and memory grows. tidewatch counts
//! it. Every record a component sends counts once per input that reads the output it goes to
//! (its fan-out); every record a transform or sink takes off its input counts back. The sum,
//! [`InFlight::total`], is what has been sent and not yet taken, everywhere in the run. While
//! it is above the pipeline's `max_in_flight_records`, sources are not polled: a Kafka
//! consumer's fetch queue fills up to librdkafka's own bound and stops fetching, the MQTT
//! source's bounded queue fills and it stops acknowledging (the broker keeps the rest), the
//! `file` source stops reading. What a component holds itself (open windows, an inference
//! batch, a sink's delivery queue) is its own state, bounded by its own options.
//!
//! Within a process the count is one atomic (in the run's [`ProcessShared`]); in a cluster a
//! record sent to another process counts up here and back there, so each process also keeps
//! the others' counts, which the gossip dataflow ([`crate::gossip`]) brings every 100 ms.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tidewatch_api::ProcessShared;

/// The records in flight in this process, and the last counts of the others.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    local: AtomicI64,
    others: Mutex<HashMap<u32, i64>>,
    others_sum: AtomicI64,
    /// When a source of this process last waited (ms since the Unix epoch; 0: never).
    throttled_at: AtomicI64,
}

impl InFlight {
    /// The process's instance, kept in the run's [`ProcessShared`].
    pub(crate) fn of(shared: &ProcessShared) -> Arc<InFlight> {
        shared.get_or_init("tidewatch.in-flight", InFlight::default)
    }

    fn add(&self, records: i64) {
        self.local.fetch_add(records, Ordering::Relaxed);
    }

    /// This process's count (records sent here and not yet taken here; negative when it took
    /// more from other processes than it sent).
    pub(crate) fn local(&self) -> i64 {
        self.local.load(Ordering::Relaxed)
    }

    /// The run's records in flight: this process's count and the others'.
    pub(crate) fn total(&self) -> i64 {
        self.local() + self.others_sum.load(Ordering::Relaxed)
    }

    /// A source of this process waits for the records in flight to drain.
    fn note_throttled(&self) {
        self.throttled_at.store(tidewatch_api::records::now_ms(), Ordering::Relaxed);
    }

    /// Whether a source of this process waited within the last `window_ms`: its stream is
    /// held back, not idle, so event-time assigners must not advance with the wall clock
    /// (what comes after the wait would be late).
    pub(crate) fn throttled_within(&self, window_ms: i64) -> bool {
        let at = self.throttled_at.load(Ordering::Relaxed);
        at > 0 && tidewatch_api::records::now_ms().saturating_sub(at) <= window_ms
    }

    /// Process `process` said its count is `records`.
    pub(crate) fn set_other(&self, process: u32, records: i64) {
        let mut others = self.others.lock().unwrap_or_else(PoisonError::into_inner);
        others.insert(process, records);
        self.others_sum.store(others.values().sum(), Ordering::Relaxed);
    }
}

/// One component instance's part in the count: how many inputs read each of its outputs, in
/// the order of its timely outputs (main, errors, late, then the named ones; a source has
/// main and errors).
#[derive(Clone, Debug)]
pub(crate) struct Flight {
    records: Arc<InFlight>,
    fanout: Arc<[i64]>,
    /// The pipeline's `max_in_flight_records`; 0: no bound.
    bound: u64,
}

impl Flight {
    pub(crate) fn new(records: Arc<InFlight>, fanout: Vec<i64>, bound: u64) -> Flight {
        Flight { records, fanout: fanout.into(), bound }
    }

    /// `count` records were sent on timely output `output`.
    pub(crate) fn sent(&self, output: usize, count: usize) {
        let readers = self.fanout.get(output).copied().unwrap_or(0);
        if readers > 0 {
            self.records.add(readers * count as i64);
        }
    }

    /// `count` records were taken off the input.
    pub(crate) fn taken(&self, count: usize) {
        self.records.add(-(count as i64));
    }

    /// Whether sources should wait: the run has more records in flight than its bound (noted,
    /// see [`InFlight::throttled_within`]).
    pub(crate) fn full(&self) -> bool {
        let full = self.bound > 0 && self.records.total() > self.bound as i64;
        if full {
            self.records.note_throttled();
        }
        full
    }

    /// The run's records in flight (for the gauge).
    pub(crate) fn total(&self) -> i64 {
        self.records.total()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_count_once_per_reader_and_back_when_taken() {
        let shared = ProcessShared::new();
        let records = InFlight::of(&shared);
        // Main read by two inputs, errors by none.
        let source = Flight::new(Arc::clone(&records), vec![2, 0], 10);
        let sink = Flight::new(Arc::clone(&records), Vec::new(), 10);
        source.sent(0, 4);
        source.sent(1, 100);
        assert_eq!(records.total(), 8);
        assert!(!source.full());
        source.sent(0, 2);
        assert!(source.full(), "12 in flight, bound 10");
        sink.taken(6);
        sink.taken(6);
        assert_eq!((records.total(), source.full()), (0, false));
        // Another process took what this one sent: the sum is what counts.
        source.sent(0, 10);
        records.set_other(1, -20);
        assert_eq!(records.total(), 0);
        assert!(!Flight::new(records, vec![1], 0).full(), "0: no bound");
    }
}
