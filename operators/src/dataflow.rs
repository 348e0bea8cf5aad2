//! A differential dataflow of a transform's own, on a private single-threaded timely worker.
//!
//! `enrich` and `fleet` keep their state as differential collections. The engine hands each
//! instance batches; the instance feeds them into its dataflow as the updates of one round
//! (a logical time), then steps its worker until the round is complete, and reads what changed
//! from the captured output. Rounds follow the order in which batches arrive.

use std::cell::RefCell;
use std::rc::Rc;

use tidewatch_api::catalog::{CatalogUpdate, CatalogUpdateRef};
use tidewatch_api::{DeviceId, Outputs, RawBatch};
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

/// The devices and diffs of the catalog updates in a batch of raw messages (see
/// [`catalog_updates`]).
pub(crate) fn catalog_devices(batch: &RawBatch, out: &mut Outputs) -> Vec<(DeviceId, i64)> {
    catalog_updates(batch, out)
        .into_iter()
        .map(|update| (DeviceId::intern(&update.row.device), update.diff))
        .collect()
}

/// The catalog updates of a batch of raw messages, their strings borrowed from it; a message
/// that is not one goes to `<id>.errors` (`error_type = "catalog"`).
pub(crate) fn catalog_updates<'a>(
    batch: &'a RawBatch,
    out: &mut Outputs,
) -> Vec<CatalogUpdateRef<'a>> {
    let mut updates = Vec::with_capacity(batch.len());
    for message in batch.iter() {
        match CatalogUpdate::decode(message.payload) {
            Ok(update) => updates.push(update),
            Err(error) => {
                out.error("catalog", error.to_string(), Some(message.topic), Some(message.payload))
            }
        }
    }
    updates
}
