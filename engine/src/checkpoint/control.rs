//! The checkpoints of a cluster of processes: process 0 leads (its checkpoint thread opens
//! the epochs, its [`Protocol`](super::protocol::Protocol) counts every instance of every
//! process, it writes the checkpoints and publishes staged output); the others follow.
//!
//! They talk through a small timely dataflow of their own, built next to the pipeline's in
//! every worker: a follower's reports and end notices (with their states and staged output)
//! are exchanged to worker 0, and worker 0 broadcasts the leader's decisions (the requested,
//! aligned and committed epochs, the stop epoch, abandonment, the end) to every worker, which
//! applies them to its process's [`Checkpoints`] and wakes its operators. The control
//! dataflow ends once the leader's checkpoint thread is done and the worker's pipeline ended.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use timely::dataflow::Scope;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;

use super::Checkpoints;
use super::protocol::{Instance, Report};

/// The leader's decisions, as broadcast.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Decision {
    pub(crate) requested: u64,
    pub(crate) stop_epoch: u64,
    pub(crate) aligned: u64,
    pub(crate) committed: u64,
    pub(crate) abandoned: bool,
    /// The leader's checkpoint thread is done: nothing more will be decided.
    pub(crate) done: bool,
}

/// What travels on the control dataflow.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum Control {
    /// A follower's instance reached a barrier.
    Report { instance: Instance, epoch: u64, report: Report },
    /// A follower's instance ended.
    End { instance: Instance, from: u64, report: Report },
    /// A follower was asked to stop (SIGINT/SIGTERM): the leader takes the final checkpoint.
    Stop,
    /// The leader's decisions, for worker `to`.
    Decision { to: u32, decision: Decision },
}

impl Control {
    fn route(&self) -> u64 {
        match self {
            Control::Decision { to, .. } => u64::from(*to),
            _ => 0,
        }
    }
}

/// Builds the control dataflow of one worker. `main_done` turns true when the worker's
/// pipeline dataflow ended; `shutdown` is the process's stop flag.
pub(crate) fn build<'scope>(
    scope: Scope<'scope, u64>,
    checkpoints: Arc<Checkpoints>,
    shutdown: Arc<AtomicBool>,
    main_done: Rc<Cell<bool>>,
) {
    let index = scope.index();
    let peers = scope.peers();
    let mut builder = OperatorBuilder::new("checkpoint-control".to_owned(), scope);
    let info = builder.operator_info();
    let activator = scope.activator_for(Rc::clone(&info.address));
    let (mut output, stream) = builder.new_output::<Vec<Control>>();
    let source_checkpoints = Arc::clone(&checkpoints);
    builder.build(move |caps| {
        let mut cap = caps.into_iter().next();
        let mut last: Option<Decision> = None;
        let mut stop_sent = false;
        let checkpoints = source_checkpoints;
        move |_frontiers| {
            let Some(held) = cap.as_ref() else { return };
            // Read before the decision below: the leader's thread may finish in between, and
            // its last decision (`done`) must go out before this operator ends, or the
            // followers wait for it forever.
            let done = checkpoints.decided_done();
            let mut messages: Vec<Control> = checkpoints.take_outbox();
            if !checkpoints.is_leader() && !stop_sent && shutdown.load(Ordering::SeqCst) {
                stop_sent = true;
                messages.push(Control::Stop);
            }
            if checkpoints.is_leader() && index == 0 {
                let decision = checkpoints.decision();
                if last != Some(decision) {
                    last = Some(decision);
                    messages
                        .extend((0..peers).map(|to| Control::Decision { to: to as u32, decision }));
                }
            }
            if !messages.is_empty() {
                output.activate().give(held, &mut messages);
            }
            if done && main_done.get() {
                tracing::debug!(worker = index, "the checkpoint control dataflow ends");
                cap = None;
                return;
            }
            activator.activate_after(Duration::from_millis(2));
        }
    });
    let mut builder = OperatorBuilder::new("checkpoint-control-in".to_owned(), scope);
    let mut input = builder.new_input(stream, Exchange::new(Control::route));
    builder.build(move |_caps| {
        move |_frontiers| {
            input.for_each(|_cap, data| {
                for message in data.drain(..) {
                    match message {
                        Control::Report { instance, epoch, report } => {
                            checkpoints.report(instance, epoch, report);
                        }
                        Control::End { instance, from, report } => {
                            checkpoints.end(instance, from, report);
                        }
                        Control::Stop => {
                            tracing::info!(
                                "a process of the cluster was asked to stop: stopping all of them"
                            );
                            checkpoints.request_stop();
                        }
                        Control::Decision { decision, .. } => checkpoints.apply(decision),
                    }
                }
            });
        }
    });
}
