//! Small helpers shared by the operators.

use std::hash::{BuildHasher, Hasher};

use tidewatch_api::DeviceId;

/// A fast multiplicative hasher for keys that the operators assign themselves (interned
/// [`tidewatch_api::DeviceId`]s, small integers). Not for keys chosen by the outside world.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct IdHasher {
    hash: u64,
}

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl IdHasher {
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.hash
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, value: u8) {
        self.add(u64::from(value));
    }

    fn write_u32(&mut self, value: u32) {
        self.add(u64::from(value));
    }

    fn write_u64(&mut self, value: u64) {
        self.add(value);
    }

    fn write_i64(&mut self, value: i64) {
        self.add(value as u64);
    }

    fn write_usize(&mut self, value: usize) {
        self.add(value as u64);
    }
}

/// Builds [`IdHasher`]s.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct IdHash;

impl BuildHasher for IdHash {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher::default()
    }
}

/// Values by device in a vector indexed by the device's interned index: no hashing, and
/// devices interned together (a catalog's, a file's) sit together. For state of most devices
/// of the process (`fleet`'s, which sees them all); sparse state belongs in a map.
#[derive(Clone, Debug)]
pub(crate) struct DeviceTable<V> {
    slots: Vec<Option<(DeviceId, V)>>,
}

impl<V> Default for DeviceTable<V> {
    fn default() -> Self {
        DeviceTable { slots: Vec::new() }
    }
}

impl<V> DeviceTable<V> {
    /// The value of `device`.
    pub(crate) fn get(&self, device: DeviceId) -> Option<&V> {
        let (_, value) = self.slots.get(device.index() as usize)?.as_ref()?;
        Some(value)
    }

    /// The value of `device`, inserted by `make` when it has none.
    pub(crate) fn get_or_insert_with(
        &mut self,
        device: DeviceId,
        make: impl FnOnce() -> V,
    ) -> &mut V {
        let at = device.index() as usize;
        if at >= self.slots.len() {
            self.slots.resize_with(at + 1, || None);
        }
        &mut self.slots[at].get_or_insert_with(|| (device, make())).1
    }

    /// Removes the value of `device`.
    pub(crate) fn remove(&mut self, device: DeviceId) {
        if let Some(slot) = self.slots.get_mut(device.index() as usize) {
            *slot = None;
        }
    }

    /// The devices and their values, by index.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (DeviceId, &V)> {
        self.slots.iter().filter_map(|slot| slot.as_ref().map(|(device, value)| (*device, value)))
    }
}

/// A [`tidewatch_api::ConfigError`] found at build time, as a run-time component error.
pub(crate) fn config_error(error: tidewatch_api::ConfigError) -> tidewatch_api::ComponentError {
    let mut message = error.message;
    if let Some(field) = error.field {
        message = format!("option `{field}`: {message}");
    }
    if let Some(hint) = error.hint {
        message = format!("{message} ({hint})");
    }
    tidewatch_api::ComponentError::Config(message)
}
