//! State shared by the workers of one process during one engine run.
//!
//! Timely runs one instance of every component on every worker thread. Some things exist once
//! per process, not once per worker: a file that every worker's sink appends to, one set of
//! metrics for a component, the start time every worker's simulator counts from, the watermark
//! an event-time assigner's instances catch up with. [`ProcessShared`] holds them: the engine
//! makes one per run and process and hands it to every [`ComponentContext`]; it (and whatever it
//! holds) drops with the run, so two runs in one process never share.
//!
//! [`ComponentContext`]: crate::ComponentContext

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

type Value = Arc<dyn Any + Send + Sync>;
/// One slot per key and type, locked on its own while its value is made (so a `make` may use
/// other slots).
type Slot = Arc<Mutex<Option<Value>>>;
type Entries = HashMap<(String, TypeId), Slot>;

/// A map of values shared by the workers of one process for one engine run, keyed by a name
/// (usually a component id) and the value's type.
///
/// Clones share the map. Components reach it through
/// [`ComponentContext::shared`](crate::ComponentContext::shared) (scoped to the component) or
/// [`ComponentContext::process_shared`](crate::ComponentContext::process_shared) (any key).
///
/// ```
/// use tidewatch_api::ProcessShared;
///
/// let shared = ProcessShared::new();
/// let a = shared.get_or_init("fleet", || 42_u64);
/// let b = shared.clone().get_or_init("fleet", || 7_u64);
/// assert_eq!((*a, *b), (42, 42));
/// assert_eq!(*ProcessShared::new().get_or_init("fleet", || 7_u64), 7);
/// ```
#[derive(Clone, Default)]
pub struct ProcessShared {
    entries: Arc<Mutex<Entries>>,
}

impl fmt::Debug for ProcessShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let len = self.entries.lock().map(|entries| entries.len()).unwrap_or_default();
        f.debug_struct("ProcessShared").field("entries", &len).finish()
    }
}

impl ProcessShared {
    /// An empty map (the engine makes one per run and process).
    pub fn new() -> ProcessShared {
        ProcessShared::default()
    }

    /// The `T` stored under `key`, made by `make` on the first call; later calls (from any
    /// worker holding a clone of this map) get the same instance.
    pub fn get_or_init<T: Send + Sync + 'static>(
        &self,
        key: &str,
        make: impl FnOnce() -> T,
    ) -> Arc<T> {
        match self.get_or_try_init::<T, std::convert::Infallible>(key, || Ok(make())) {
            Ok(value) => value,
            Err(never) => match never {},
        }
    }

    /// Like [`ProcessShared::get_or_init`], with a `make` that may fail: the error is returned
    /// and nothing is stored, so the next call tries again.
    ///
    /// Other callers for the same key and type wait while `make` runs; `make` may use other
    /// slots of this map, but not its own.
    pub fn get_or_try_init<T: Send + Sync + 'static, E>(
        &self,
        key: &str,
        make: impl FnOnce() -> Result<T, E>,
    ) -> Result<Arc<T>, E> {
        let slot = {
            let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(entries.entry((key.to_owned(), TypeId::of::<T>())).or_default())
        };
        let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(Ok(value)) = slot.clone().map(|value| value.downcast::<T>()) {
            return Ok(value);
        }
        let value = Arc::new(make()?);
        let erased: Value = value.clone();
        *slot = Some(erased);
        Ok(value)
    }

    /// True when `other` is a clone of this map (the same run and process).
    pub fn same_as(&self, other: &ProcessShared) -> bool {
        Arc::ptr_eq(&self.entries, &other.entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_types_are_separate_slots() {
        let shared = ProcessShared::new();
        assert_eq!(*shared.get_or_init("a", || 1_u32), 1);
        assert_eq!(*shared.get_or_init("a", || 2_u32), 1);
        assert_eq!(*shared.get_or_init("b", || 3_u32), 3);
        assert_eq!(*shared.get_or_init("a", || 4_u64), 4);
    }

    #[test]
    fn a_failed_make_stores_nothing() {
        let shared = ProcessShared::new();
        assert_eq!(shared.get_or_try_init::<u32, &str>("a", || Err("no")).err(), Some("no"));
        assert_eq!(shared.get_or_try_init::<u32, &str>("a", || Ok(5)).ok().as_deref(), Some(&5));
    }

    #[test]
    fn make_may_use_other_slots() {
        let shared = ProcessShared::new();
        let outer = shared.get_or_init("outer", || *shared.get_or_init("inner", || 3_u32) + 1);
        assert_eq!(*outer, 4);
    }

    #[test]
    fn clones_share_and_fresh_maps_do_not() {
        let shared = ProcessShared::new();
        let clone = shared.clone();
        assert!(shared.same_as(&clone));
        assert!(!shared.same_as(&ProcessShared::new()));
        let value = shared.get_or_init("a", || 1_u8);
        assert!(Arc::ptr_eq(&value, &clone.get_or_init("a", || 2_u8)));
    }
}
