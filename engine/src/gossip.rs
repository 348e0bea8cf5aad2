//! The watermarks of event-time assigners, shared by every worker of every process.
//!
//! An assigner instance (`normalize`) that has seen no data for `idle_timeout_ms` catches up
//! with the greatest watermark of its siblings (see [`crate::runtime`]), so a worker without
//! input (a Kafka partition short, or not the worker that reads a file or a non-shared MQTT
//! subscription) holds no window back. Within a process the siblings share one atomic per
//! assigner ([`AssignerWatermarks`], in the run's [`ProcessShared`]). Across the processes of
//! a cluster a small timely dataflow of its own, built in every worker next to the
//! pipeline's, carries them: the first worker of each process sends its process's watermarks,
//! whenever they moved, to the first worker of every other process, which merges them (a
//! maximum) into its own. The same messages carry each process's records in flight
//! ([`InFlight`], backpressure), of which every process keeps the others' last count. The
//! dataflow ends once every worker's pipeline ended.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidewatch_api::{EventTime, ProcessShared};

use crate::flow_control::InFlight;
use timely::dataflow::Scope;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;

/// How often the first worker of a process looks for watermarks and counts to send.
const INTERVAL: Duration = Duration::from_millis(100);

/// The watermark of every event-time assigner of the run, per component id, shared by the
/// workers of one process.
#[derive(Debug, Default)]
pub(crate) struct AssignerWatermarks {
    slots: Mutex<BTreeMap<String, Arc<AtomicI64>>>,
}

impl AssignerWatermarks {
    /// The process's instance, kept in the run's [`ProcessShared`].
    pub(crate) fn of(shared: &ProcessShared) -> Arc<AssignerWatermarks> {
        shared.get_or_init("tidewatch.assigner-watermarks", AssignerWatermarks::default)
    }

    /// The watermark of assigner `id` (starting at [`EventTime::MIN`]).
    pub(crate) fn slot(&self, id: &str) -> Arc<AtomicI64> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(
            slots.entry(id.to_owned()).or_insert_with(|| Arc::new(AtomicI64::new(EventTime::MIN))),
        )
    }

    /// Every assigner's watermark, in id order.
    fn snapshot(&self) -> Vec<(String, EventTime)> {
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.iter().map(|(id, slot)| (id.clone(), slot.load(Ordering::Relaxed))).collect()
    }

    /// Takes another process's watermark of assigner `id` if it is ahead.
    fn merge(&self, id: &str, watermark: EventTime) {
        self.slot(id).fetch_max(watermark, Ordering::Relaxed);
    }
}

/// Process `from`'s watermarks and records in flight, for the first worker of process
/// `to / workers`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Gossip {
    to: u32,
    from: u32,
    watermarks: Vec<(String, EventTime)>,
    in_flight: i64,
}

/// Builds the gossip dataflow of one worker of a cluster of processes with `workers` workers
/// each. `main_done` turns true when the worker's pipeline dataflow ended.
pub(crate) fn build<'scope>(
    scope: Scope<'scope, u64>,
    watermarks: Arc<AssignerWatermarks>,
    in_flight: Arc<InFlight>,
    workers: usize,
    main_done: Rc<Cell<bool>>,
) {
    let index = scope.index();
    let peers = scope.peers();
    let workers = workers.max(1);
    // Only the first worker of each process talks; the others merely end with the run.
    let first = index.is_multiple_of(workers);
    let mut builder = OperatorBuilder::new("watermark-gossip".to_owned(), scope);
    let info = builder.operator_info();
    let activator = scope.activator_for(Rc::clone(&info.address));
    let (mut output, stream) = builder.new_output::<Vec<Gossip>>();
    let sending = Arc::clone(&watermarks);
    let counting = Arc::clone(&in_flight);
    let from = (index / workers) as u32;
    builder.build(move |caps| {
        let mut cap = caps.into_iter().next();
        let mut sent: (Vec<(String, EventTime)>, i64) = (Vec::new(), 0);
        move |_frontiers| {
            let Some(held) = cap.as_ref() else { return };
            // The last counts go out before the end.
            let done = main_done.get();
            if first {
                let now = (sending.snapshot(), counting.local());
                if now != sent {
                    let mut messages: Vec<Gossip> = (0..peers)
                        .step_by(workers)
                        .filter(|&to| to != index)
                        .map(|to| Gossip {
                            to: to as u32,
                            from,
                            watermarks: now.0.clone(),
                            in_flight: now.1,
                        })
                        .collect();
                    if !messages.is_empty() {
                        output.activate().give(held, &mut messages);
                    }
                    sent = now;
                }
            }
            if done {
                tracing::debug!(worker = index, "the watermark gossip dataflow ends");
                cap = None;
                return;
            }
            activator.activate_after(INTERVAL);
        }
    });
    let mut builder = OperatorBuilder::new("watermark-gossip-in".to_owned(), scope);
    let mut input =
        builder.new_input(stream, Exchange::new(|gossip: &Gossip| u64::from(gossip.to)));
    builder.build(move |_caps| {
        move |_frontiers| {
            input.for_each(|_cap, data| {
                for gossip in data.drain(..) {
                    for (id, watermark) in &gossip.watermarks {
                        watermarks.merge(id, *watermark);
                    }
                    in_flight.set_other(gossip.from, gossip.in_flight);
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_keeps_the_greatest_watermark_per_assigner() {
        let shared = ProcessShared::new();
        let watermarks = AssignerWatermarks::of(&shared);
        let readings = watermarks.slot("readings");
        readings.fetch_max(10, Ordering::Relaxed);
        watermarks.merge("readings", 5);
        watermarks.merge("other", 7);
        assert_eq!(readings.load(Ordering::Relaxed), 10);
        watermarks.merge("readings", 12);
        assert_eq!(readings.load(Ordering::Relaxed), 12);
        // The same instance for every worker of the process.
        assert_eq!(
            AssignerWatermarks::of(&shared).snapshot(),
            vec![("other".to_owned(), 7), ("readings".to_owned(), 12)]
        );
    }
}
