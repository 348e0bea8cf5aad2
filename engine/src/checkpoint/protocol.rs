//! The checkpoint protocol as pure decision logic: which epoch is open, who has reported for
//! it, and when the cut is complete. No threads, no I/O: the runtime drives it and the unit
//! tests below exercise it alone.

use std::collections::BTreeMap;

use tidewatch_api::{EventTime, Staged};

/// One operator instance: a component (by its index in the pipeline) on a worker.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Instance {
    /// The component's index in `Pipeline::components`.
    pub component: usize,
    /// The worker.
    pub worker: usize,
}

/// What an instance contributes to a checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// The engine's watermark state of the instance (the greatest event time an event-time
    /// assigner or source has seen), if it keeps one.
    pub watermark: Option<EventTime>,
    /// The component's snapshot.
    pub state: Option<Vec<u8>>,
    /// Sink output to publish once the checkpoint is durable.
    pub staged: Vec<Staged>,
    /// The instance could not make its part durable (a sink's flush failed): the checkpoint
    /// is not written, and its staged output moves on to the next one.
    pub failed: bool,
}

/// A complete cut: every instance's report for one epoch.
#[derive(Debug, PartialEq, Eq)]
pub struct Cut {
    /// The epoch.
    pub epoch: u64,
    /// True for the final checkpoint of a stop (sources end after it).
    pub stop: bool,
    /// Every instance's report.
    pub reports: BTreeMap<Instance, Report>,
}

#[derive(Debug)]
struct Pending {
    epoch: u64,
    stop: bool,
    reports: BTreeMap<Instance, Report>,
}

#[derive(Debug)]
struct Ended {
    /// The first epoch the instance did not take part in: from there on its final report
    /// stands for it.
    from: u64,
    report: Report,
}

/// The decision logic of one process's checkpoints.
#[derive(Debug)]
pub struct Protocol {
    participants: usize,
    last_begun: u64,
    pending: Option<Pending>,
    ended: BTreeMap<Instance, Ended>,
}

impl Protocol {
    /// A protocol for `participants` instances whose last complete checkpoint is `restored`
    /// (0: none).
    pub fn new(participants: usize, restored: u64) -> Protocol {
        Protocol { participants, last_begun: restored, pending: None, ended: BTreeMap::new() }
    }

    /// Opens the next epoch (the one still open, if any) and returns it.
    pub fn begin(&mut self, stop: bool) -> u64 {
        if let Some(pending) = &mut self.pending {
            pending.stop |= stop;
            return pending.epoch;
        }
        self.last_begun += 1;
        self.pending = Some(Pending { epoch: self.last_begun, stop, reports: BTreeMap::new() });
        self.last_begun
    }

    /// The open epoch.
    pub fn open_epoch(&self) -> Option<u64> {
        self.pending.as_ref().map(|pending| pending.epoch)
    }

    /// `instance` reached the barrier of `epoch`; false for an epoch that is not open.
    pub fn report(&mut self, instance: Instance, epoch: u64, report: Report) -> bool {
        match &mut self.pending {
            Some(pending) if pending.epoch == epoch => {
                pending.reports.insert(instance, report);
                true
            }
            _ => false,
        }
    }

    /// `instance` ended: it takes part in no epoch from `from` on, and `report` (its final
    /// state and output) stands for it in them.
    pub fn end(&mut self, instance: Instance, from: u64, report: Report) {
        self.ended.insert(instance, Ended { from, report });
    }

    fn stands_in(&self, instance: &Instance, epoch: u64) -> bool {
        self.ended.get(instance).is_some_and(|ended| ended.from <= epoch)
    }

    /// True when every instance reported for the open epoch or ended before it.
    pub fn is_complete(&self) -> bool {
        let Some(pending) = &self.pending else { return false };
        let ended = self
            .ended
            .keys()
            .filter(|instance| {
                !pending.reports.contains_key(instance) && self.stands_in(instance, pending.epoch)
            })
            .count();
        pending.reports.len() + ended >= self.participants
    }

    /// The instances the open epoch still waits for, out of `all`.
    pub fn missing(&self, all: impl Iterator<Item = Instance>) -> Vec<Instance> {
        let Some(pending) = &self.pending else { return Vec::new() };
        all.filter(|instance| {
            !pending.reports.contains_key(instance) && !self.stands_in(instance, pending.epoch)
        })
        .collect()
    }

    /// True when every instance ended.
    pub fn all_ended(&self) -> bool {
        self.ended.len() >= self.participants
    }

    /// Closes the open epoch if it is complete and returns its cut. An ended instance's
    /// staged output goes into the first cut it stands in, and only that one.
    pub fn take(&mut self) -> Option<Cut> {
        if !self.is_complete() {
            return None;
        }
        let Pending { epoch, stop, mut reports } = self.pending.take()?;
        for (instance, ended) in &mut self.ended {
            if ended.from <= epoch && !reports.contains_key(instance) {
                let staged = std::mem::take(&mut ended.report.staged);
                reports.insert(
                    *instance,
                    Report {
                        watermark: ended.report.watermark,
                        state: ended.report.state.clone(),
                        staged,
                        failed: ended.report.failed,
                    },
                );
            }
        }
        Some(Cut { epoch, stop, reports })
    }

    /// Gives up the open epoch (it cannot complete); its number is not reused.
    pub fn abandon(&mut self) {
        self.pending = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(component: usize, worker: usize) -> Instance {
        Instance { component, worker }
    }

    fn state(bytes: &[u8]) -> Report {
        Report { state: Some(bytes.to_vec()), ..Report::default() }
    }

    #[test]
    fn a_cut_completes_when_every_instance_reported() {
        let mut protocol = Protocol::new(3, 0);
        let epoch = protocol.begin(false);
        assert_eq!(epoch, 1);
        assert!(protocol.report(at(0, 0), 1, state(b"a")));
        assert!(protocol.report(at(1, 0), 1, state(b"b")));
        assert!(!protocol.is_complete());
        assert!(protocol.take().is_none(), "incomplete cuts are not taken");
        assert!(!protocol.report(at(2, 0), 7, state(b"c")), "a report for another epoch");
        assert!(protocol.report(at(2, 0), 1, state(b"c")));
        let cut = protocol.take().expect("complete");
        assert_eq!((cut.epoch, cut.reports.len()), (1, 3));
        assert_eq!(protocol.begin(false), 2, "epochs only grow");
    }

    #[test]
    fn an_ended_instance_stands_in_with_its_final_report_and_publishes_once() {
        let mut protocol = Protocol::new(2, 4);
        let staged = Staged { key: "part".into(), bytes: b"rows".to_vec() };
        protocol.end(
            at(1, 0),
            5,
            Report {
                state: Some(b"end".to_vec()),
                staged: vec![staged.clone()],
                ..Report::default()
            },
        );
        assert_eq!(protocol.begin(false), 5);
        protocol.report(at(0, 0), 5, state(b"a"));
        let cut = protocol.take().expect("the ended instance counts");
        assert_eq!(cut.reports[&at(1, 0)].staged, vec![staged]);
        protocol.begin(false);
        protocol.report(at(0, 0), 6, state(b"a"));
        let cut = protocol.take().expect("complete");
        assert_eq!(cut.reports[&at(1, 0)].state.as_deref(), Some(&b"end"[..]));
        assert!(cut.reports[&at(1, 0)].staged.is_empty(), "staged output is published once");
        assert!(!protocol.all_ended());
        protocol.end(at(0, 0), 7, state(b"a"));
        assert!(protocol.all_ended());
    }

    #[test]
    fn an_instance_that_ends_after_its_barrier_is_not_counted_twice() {
        let mut protocol = Protocol::new(2, 0);
        protocol.begin(true);
        protocol.report(at(0, 0), 1, state(b"source"));
        protocol.end(at(0, 0), 2, state(b"source"));
        assert!(!protocol.is_complete(), "the other instance has not reported");
        protocol.report(at(1, 0), 1, state(b"sink"));
        let cut = protocol.take().expect("complete");
        assert!(cut.stop);
    }

    #[test]
    fn an_abandoned_epoch_is_not_reused() {
        let mut protocol = Protocol::new(1, 0);
        assert_eq!(protocol.begin(false), 1);
        protocol.abandon();
        assert_eq!(protocol.open_epoch(), None);
        assert_eq!(protocol.begin(false), 2);
    }
}
