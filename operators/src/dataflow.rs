//! A differential dataflow of a transform's own, on a private single-threaded timely worker.
//!
//! `enrich` and `fleet` keep their state as differential collections. The engine hands each
//! instance batches; the instance feeds them into its dataflow as the updates of one round
//! (a logical time), then steps its worker until the round is complete, and reads what changed
//! from the captured output. Rounds follow the order in which batches arrive.

use std::cell::RefCell;
use std::rc::Rc;

use timely::WorkerConfig;
use timely::communication::Allocator;
use timely::communication::allocator::thread::Thread;
use timely::dataflow::ProbeHandle;
use timely::worker::Worker;

/// A private worker that runs one dataflow.
pub(crate) struct Local {
    pub(crate) worker: Worker,
    /// The round now open for input.
    pub(crate) round: u64,
}

impl Local {
    /// A worker with no dataflow yet.
    pub(crate) fn new() -> Local {
        let allocator = Allocator::Thread(Thread::default());
        Local { worker: Worker::new(WorkerConfig::default(), allocator, None), round: 0 }
    }

    /// Steps the worker until `probe` has passed the round that just closed (`round - 1`).
    pub(crate) fn settle(&mut self, probe: &ProbeHandle<u64>) {
        let round = self.round;
        self.worker.step_while(|| probe.less_than(&round));
    }
}

/// Updates captured from a collection: `(data, time, diff)`, drained after each round.
pub(crate) type Captured<D> = Rc<RefCell<Vec<(D, u64, isize)>>>;
