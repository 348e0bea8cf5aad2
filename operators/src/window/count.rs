//! Count windows: per device, the last `size_readings` readings in event-time order, one
//! window every `slide_readings` readings.
//!
//! A model trained on "W consecutive readings" needs exactly this: time windows hold a
//! varying number of readings wherever the sampling has gaps. A reading is final once the
//! watermark reaches its time (no earlier reading can still arrive on time: with
//! `out_of_orderness_ms = 0`, as soon as it is processed); final readings are
//! appended to the device's history in time order, and every `slide_readings`-th of them ends a
//! window of the last `size_readings` (once that many were seen). The window spans
//! `[time of its first reading, time of its last reading + 1 ms)`. A reading older than the
//! watermark is late (`<id>.late`): the readings after it were already final.
//!
//! The histories and readings not yet final are checkpointed ([`Transform::snapshot`]); a
//! restore keeps the devices this worker owns.
//!
//! Memory: a device's history is a ring of exactly `size_readings` steps once full (no
//! doubling slack), its times `u32` offsets from a base while they span less than 49.7 days
//! (`i64` otherwise), its labels held only while one is not 0; readings not yet final wait in
//! one buffer for all devices.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tidewatch_api::{
    Batch, ComponentContext, ComponentError, ConfigError, DeviceId, EventTime, Outputs,
    ReadingBatch, Schema, Transform, Window,
};

use super::config::{WindowConfig, count_geometry};
use super::{readings_only, schema_index};
use crate::util::IdHash;

/// A device's history takes room for at most this many values (16 KiB of `f32`) before its
/// first window; a longer window grows by doubling, capped at the window's size, as readings
/// come (a device that sends a few readings does not hold a whole window's room).
const PRESIZE_VALUES: usize = 4096;

/// The operator-wide pending buffers are shrunk when they held less than a quarter of a
/// capacity greater than this many elements.
const SHRINK_ABOVE: usize = 4096;

/// A reading not yet final, of any device; its values are in
/// [`CountWindowOperator::pending_values`] at `start..start + width` (one flat buffer for all
/// devices: no allocation per reading, and none per device).
#[derive(Clone, Copy, Debug)]
struct Pending {
    device: DeviceId,
    time: EventTime,
    start: usize,
    width: usize,
    label: u8,
}

/// The event times of a device's history: `u32` offsets from a base while the times held
/// span less than 2³² ms (49.7 days), `i64` otherwise (any input stays exact).
#[derive(Debug)]
enum Times {
    /// Time of step `i` = `base + offsets[i]`.
    Narrow { base: EventTime, offsets: Vec<u32> },
    /// The times themselves.
    Wide(Vec<EventTime>),
}

impl Default for Times {
    fn default() -> Self {
        Times::Narrow { base: 0, offsets: Vec::new() }
    }
}

/// `time - base` as an offset, when it is one.
fn offset(base: EventTime, time: EventTime) -> Option<u32> {
    time.checked_sub(base).and_then(|delta| u32::try_from(delta).ok())
}

impl Times {
    /// The narrowest form of `times`, with room for `capacity` steps.
    fn from_times(times: &[EventTime], capacity: usize) -> Times {
        let capacity = capacity.max(times.len());
        let (Some(&min), Some(&max)) = (times.iter().min(), times.iter().max()) else {
            return Times::Narrow { base: 0, offsets: Vec::with_capacity(capacity) };
        };
        if offset(min, max).is_some() {
            let mut offsets = Vec::with_capacity(capacity);
            offsets.extend(times.iter().map(|&time| offset(min, time).unwrap_or(0)));
            Times::Narrow { base: min, offsets }
        } else {
            let mut wide = Vec::with_capacity(capacity);
            wide.extend_from_slice(times);
            Times::Wide(wide)
        }
    }

    fn len(&self) -> usize {
        match self {
            Times::Narrow { offsets, .. } => offsets.len(),
            Times::Wide(times) => times.len(),
        }
    }

    fn capacity(&self) -> usize {
        match self {
            Times::Narrow { offsets, .. } => offsets.capacity(),
            Times::Wide(times) => times.capacity(),
        }
    }

    fn reserve_exact(&mut self, additional: usize) {
        match self {
            Times::Narrow { offsets, .. } => offsets.reserve_exact(additional),
            Times::Wide(times) => times.reserve_exact(additional),
        }
    }

    /// The time of storage slot `index` (`EventTime::MIN` past the end, which never happens).
    fn get(&self, index: usize) -> EventTime {
        match self {
            Times::Narrow { base, offsets } => offsets
                .get(index)
                .map_or(EventTime::MIN, |offset| base.wrapping_add(i64::from(*offset))),
            Times::Wide(times) => times.get(index).copied().unwrap_or(EventTime::MIN),
        }
    }

    /// Appends the times of storage slots `range` to `out`.
    fn extend_into(&self, range: std::ops::Range<usize>, out: &mut Vec<EventTime>) {
        match self {
            Times::Narrow { base, offsets } => out.extend(
                offsets
                    .get(range)
                    .unwrap_or_default()
                    .iter()
                    .map(|offset| base.wrapping_add(i64::from(*offset))),
            ),
            Times::Wide(times) => out.extend_from_slice(times.get(range).unwrap_or_default()),
        }
    }

    /// All times, in storage order.
    fn to_vec(&self) -> Vec<EventTime> {
        let mut times = Vec::with_capacity(self.len());
        self.extend_into(0..self.len(), &mut times);
        times
    }

    /// Appends `time`.
    fn push(&mut self, time: EventTime) {
        match self {
            Times::Narrow { base, offsets } => {
                if offsets.is_empty() {
                    *base = time;
                    offsets.push(0);
                    return;
                }
                if let Some(offset) = offset(*base, time) {
                    offsets.push(offset);
                    return;
                }
            }
            Times::Wide(times) => {
                times.push(time);
                return;
            }
        }
        // Out of the offsets' range: a new base, or i64 times.
        let mut times = self.to_vec();
        let capacity = self.capacity();
        times.push(time);
        *self = Times::from_times(&times, capacity);
    }

    /// Replaces the time of storage slot `index` (< `len`).
    fn set(&mut self, index: usize, time: EventTime) {
        match self {
            Times::Narrow { base, offsets } => {
                if let (Some(slot), Some(offset)) = (offsets.get_mut(index), offset(*base, time)) {
                    *slot = offset;
                    return;
                }
            }
            Times::Wide(times) => {
                if let Some(slot) = times.get_mut(index) {
                    *slot = time;
                }
                return;
            }
        }
        let mut times = self.to_vec();
        if let Some(slot) = times.get_mut(index) {
            *slot = time;
        }
        *self = Times::from_times(&times, self.capacity());
    }

    /// Goes back to offsets when i64 times now span less than 2³² ms.
    fn narrow(&mut self) {
        if let Times::Wide(times) = self
            && let (Some(&min), Some(&max)) = (times.iter().min(), times.iter().max())
            && offset(min, max).is_some()
        {
            *self = Times::from_times(times, times.capacity());
        }
    }
}

/// The last `size` final readings of a device: a ring of steps, allocated at its final size
/// (no doubling slack) once full.
#[derive(Debug, Default)]
struct Ring {
    /// `width` values per step, in storage order.
    values: Vec<f32>,
    /// One time per step, in storage order.
    times: Times,
    /// One label per step, in storage order; empty while every label held is 0.
    labels: Vec<u8>,
    /// Storage slot of the oldest step once the ring is full (0 until then).
    head: usize,
}

impl Ring {
    /// A ring holding `times`, `values` and `labels` (oldest first, as checked by the caller).
    fn from_parts(
        size: usize,
        width: usize,
        times: &[EventTime],
        values: Vec<f32>,
        labels: Vec<u8>,
    ) -> Ring {
        let capacity = times.len().max(first_capacity(size, width));
        let mut ring_values = Vec::with_capacity(capacity.saturating_mul(width));
        ring_values.extend_from_slice(&values);
        let labels = if labels.iter().all(|label| *label == 0) {
            Vec::new()
        } else {
            let mut ring_labels = Vec::with_capacity(capacity);
            ring_labels.extend_from_slice(&labels);
            ring_labels
        };
        Ring { values: ring_values, times: Times::from_times(times, capacity), labels, head: 0 }
    }

    /// Steps held.
    fn len(&self) -> usize {
        self.times.len()
    }

    /// Makes room for more steps: the first time `first_capacity`, then twice as many, never
    /// more than `size`.
    fn grow(&mut self, size: usize, width: usize) {
        let len = self.len();
        let capacity = self.times.capacity();
        let target = if capacity == 0 {
            first_capacity(size, width)
        } else {
            capacity.saturating_mul(2).min(size)
        }
        .max(len + 1);
        let additional = target - len;
        self.times.reserve_exact(additional);
        self.values.reserve_exact(additional.saturating_mul(width));
        if !self.labels.is_empty() {
            self.labels.reserve_exact(target - self.labels.len());
        }
    }

    /// Appends a step; once `size` are held, it takes the place of the oldest.
    fn push(&mut self, size: usize, width: usize, time: EventTime, values: &[f32], label: u8) {
        let len = self.len();
        if len < size {
            if len == self.times.capacity() {
                self.grow(size, width);
            }
            self.times.push(time);
            self.values.extend_from_slice(values);
            if self.labels.is_empty() && label != 0 {
                self.labels.reserve_exact(self.times.capacity());
                self.labels.resize(len, 0);
                self.labels.push(label);
            } else if !self.labels.is_empty() {
                self.labels.push(label);
            }
            return;
        }
        let head = self.head;
        self.times.set(head, time);
        if let Some(slot) = self.values.get_mut(head * width..(head + 1) * width) {
            slot.copy_from_slice(values);
        }
        if label != 0 && self.labels.is_empty() {
            self.labels.reserve_exact(len);
            self.labels.resize(len, 0);
        }
        if let Some(slot) = self.labels.get_mut(head) {
            *slot = label;
        }
        self.head = (head + 1) % len;
        if self.head == 0 {
            // Once a turn: back to the compact forms when the input allows it.
            self.times.narrow();
            if self.labels.iter().all(|label| *label == 0) {
                self.labels = Vec::new();
            }
        }
    }

    /// The storage slots in time order: `head..len`, then `0..head`.
    fn order(&self) -> [std::ops::Range<usize>; 2] {
        [self.head..self.len(), 0..self.head]
    }

    /// The time of the oldest step.
    fn first_time(&self) -> EventTime {
        self.times.get(self.head)
    }

    /// The times, oldest first.
    fn times(&self) -> Vec<EventTime> {
        let mut times = Vec::with_capacity(self.len());
        for range in self.order() {
            self.times.extend_into(range, &mut times);
        }
        times
    }

    /// The values, oldest step first.
    fn values(&self, width: usize) -> Vec<f32> {
        let mut values = Vec::with_capacity(self.values.len());
        for range in self.order() {
            values.extend_from_slice(
                self.values.get(range.start * width..range.end * width).unwrap_or_default(),
            );
        }
        values
    }

    /// The labels, oldest first.
    fn labels(&self) -> Vec<u8> {
        if self.labels.is_empty() {
            return vec![0; self.len()];
        }
        let mut labels = Vec::with_capacity(self.len());
        for range in self.order() {
            labels.extend_from_slice(self.labels.get(range).unwrap_or_default());
        }
        labels
    }

    /// The greatest label held.
    fn max_label(&self) -> u8 {
        self.labels.iter().copied().max().unwrap_or(0)
    }
}

/// Steps of room a history takes at its first reading: the whole window when it is at most
/// [`PRESIZE_VALUES`] values.
fn first_capacity(size: usize, width: usize) -> usize {
    size.min((PRESIZE_VALUES / width.max(1)).max(1))
}

#[derive(Debug)]
struct DeviceHistory {
    schema: Arc<Schema>,
    /// The last `size` final readings.
    ring: Ring,
    /// Final readings so far.
    count: u64,
}

/// The count-window operator.
#[derive(Debug)]
pub struct CountWindowOperator {
    size: usize,
    slide: usize,
    watermark: EventTime,
    devices: HashMap<DeviceId, DeviceHistory, IdHash>,
    /// The readings not yet final, of every device, in arrival order.
    pending: Vec<Pending>,
    /// Their values.
    pending_values: Vec<f32>,
    /// The readings a finalise makes final (kept from call to call for its buffer).
    ready: Vec<Pending>,
    /// This instance's worker and the number of workers (set by `open`): a restore keeps the
    /// devices it owns.
    worker: usize,
    workers: usize,
    /// True once a snapshot was restored (the next one merges).
    restored: bool,
}

impl CountWindowOperator {
    /// An operator for count-window options.
    pub fn new(config: &WindowConfig) -> Result<CountWindowOperator, ConfigError> {
        let (size, slide) = count_geometry(config)?;
        Ok(CountWindowOperator {
            size,
            slide,
            watermark: EventTime::MIN,
            devices: HashMap::default(),
            pending: Vec::new(),
            pending_values: Vec::new(),
            ready: Vec::new(),
            worker: 0,
            workers: 1,
            restored: false,
        })
    }

    fn add(&mut self, batch: &ReadingBatch, out: &mut Outputs) {
        let closed_until = self.watermark.max(out.batch_watermark());
        let mut late: Option<ReadingBatch> = None;
        // A reading at the watermark itself is final at once (the watermark does not move
        // for it: a second reading with the same time).
        let mut final_now = false;
        for reading in batch.iter() {
            if reading.time_ms < closed_until {
                late.get_or_insert_with(|| ReadingBatch::new(Arc::clone(&batch.schema))).push(
                    reading.device,
                    reading.time_ms,
                    reading.values,
                    reading.label,
                );
                continue;
            }
            let history = self.devices.entry(reading.device).or_insert_with(|| DeviceHistory {
                schema: Arc::clone(&batch.schema),
                ring: Ring::default(),
                count: 0,
            });
            if !(Arc::ptr_eq(&history.schema, &batch.schema) || history.schema == batch.schema) {
                out.error(
                    "bad_value",
                    format!(
                        "reading of device `{}` has features {:?}, not {:?}",
                        reading.device,
                        batch.schema.names(),
                        history.schema.names()
                    ),
                    None,
                    None,
                );
                continue;
            }
            self.pending.push(Pending {
                device: reading.device,
                time: reading.time_ms,
                start: self.pending_values.len(),
                width: reading.values.len(),
                label: reading.label,
            });
            self.pending_values.extend_from_slice(reading.values);
            final_now |= reading.time_ms <= self.watermark;
        }
        if let Some(late) = late {
            out.late(late);
        }
        if final_now {
            self.finalise(self.watermark, out);
        }
    }

    fn finalise(&mut self, watermark: EventTime, out: &mut Outputs) {
        if self.pending.is_empty() {
            return;
        }
        // The readings now final, out of the pending ones (which keep their arrival order),
        // in time order (arrival order among equal times): per device, the order in which
        // they join its history.
        let mut ready = std::mem::take(&mut self.ready);
        ready.clear();
        let (pending_before, values_before) = (self.pending.len(), self.pending_values.len());
        self.pending.retain(|pending| {
            let is_final = pending.time <= watermark;
            if is_final {
                ready.push(*pending);
            }
            !is_final
        });
        if !ready.is_sorted_by_key(|pending| pending.time) {
            ready.sort_by_key(|pending| pending.time);
        }
        let mut windows = Vec::new();
        for pending in &ready {
            let Some(history) = self.devices.get_mut(&pending.device) else { continue };
            let values = self
                .pending_values
                .get(pending.start..pending.start + pending.width)
                .unwrap_or_default();
            history.ring.push(self.size, pending.width, pending.time, values, pending.label);
            history.count += 1;
            if history.ring.len() == self.size
                && (history.count - self.size as u64).is_multiple_of(self.slide as u64)
            {
                windows.push(Window {
                    device: pending.device,
                    start_ms: history.ring.first_time(),
                    end_ms: pending.time.saturating_add(1),
                    schema: Arc::clone(&history.schema),
                    times: history.ring.times(),
                    values: history.ring.values(pending.width),
                    label: history.ring.max_label(),
                });
            }
        }
        // The values of the readings still pending move to the front, in order.
        let mut end = 0;
        for pending in &mut self.pending {
            self.pending_values.copy_within(pending.start..pending.start + pending.width, end);
            pending.start = end;
            end += pending.width;
        }
        self.pending_values.truncate(end);
        shrink_if_sparse(&mut self.pending, pending_before);
        shrink_if_sparse(&mut self.pending_values, values_before);
        let ready_len = ready.len();
        ready.clear();
        shrink_if_sparse(&mut ready, ready_len);
        self.ready = ready;
        windows.sort_by_key(|window| (window.end_ms, window.device));
        out.emit(Batch::Windows(windows));
    }

    /// Drops the pending readings of `devices` (their restored state replaces them).
    fn drop_pending(&mut self, devices: &HashSet<DeviceId, IdHash>) {
        if devices.is_empty() || self.pending.is_empty() {
            return;
        }
        let mut values = Vec::with_capacity(self.pending_values.len());
        let old_values = std::mem::take(&mut self.pending_values);
        self.pending.retain_mut(|pending| {
            if devices.contains(&pending.device) {
                return false;
            }
            let start = values.len();
            values.extend_from_slice(
                old_values.get(pending.start..pending.start + pending.width).unwrap_or_default(),
            );
            pending.start = start;
            true
        });
        self.pending_values = values;
    }
}

/// Frees most of a buffer's room when it held less than a quarter of a large capacity at its
/// fullest (`high_water`) since the last call: the room a burst took, not what every call
/// needs.
fn shrink_if_sparse<T>(buffer: &mut Vec<T>, high_water: usize) {
    let high_water = high_water.max(buffer.len());
    if buffer.capacity() > SHRINK_ABOVE && high_water < buffer.capacity() / 4 {
        buffer.shrink_to(high_water.saturating_mul(2).max(SHRINK_ABOVE));
    }
}

impl Transform for CountWindowOperator {
    fn open(&mut self, ctx: &ComponentContext) -> Result<(), ComponentError> {
        self.worker = ctx.worker_index;
        self.workers = ctx.workers;
        Ok(())
    }

    fn process_batch(&mut self, batch: Batch, out: &mut Outputs) {
        readings_only(batch, out, |readings, out| self.add(readings, out));
    }

    fn on_watermark(&mut self, watermark_ms: EventTime, out: &mut Outputs) {
        if watermark_ms <= self.watermark {
            return;
        }
        self.watermark = watermark_ms;
        self.finalise(watermark_ms, out);
    }

    fn snapshot(&mut self) -> Result<Option<Vec<u8>>, ComponentError> {
        // Each device's pending readings, in arrival order.
        let mut pending: BTreeMap<DeviceId, Vec<SnapshotReading>> = BTreeMap::new();
        for reading in &self.pending {
            let values = self
                .pending_values
                .get(reading.start..reading.start + reading.width)
                .unwrap_or_default();
            pending.entry(reading.device).or_default().push(SnapshotReading {
                time: reading.time,
                values: values.iter().map(|value| value.to_bits()).collect(),
                label: reading.label,
            });
        }
        let mut schemas: Vec<Arc<Schema>> = Vec::new();
        let mut devices: Vec<(&DeviceId, &DeviceHistory)> = self.devices.iter().collect();
        devices.sort_unstable_by_key(|(device, _)| **device);
        let devices = devices
            .into_iter()
            .map(|(device, history)| {
                let schema = schema_index(&mut schemas, &history.schema);
                SnapshotDevice {
                    device: *device,
                    schema,
                    pending: pending.remove(device).unwrap_or_default(),
                    times: history.ring.times(),
                    values: history
                        .ring
                        .values(history.schema.len())
                        .into_iter()
                        .map(f32::to_bits)
                        .collect(),
                    labels: history.ring.labels(),
                    count: history.count,
                }
            })
            .collect();
        let snapshot = Snapshot {
            size_readings: self.size,
            slide_readings: self.slide,
            watermark_ms: self.watermark,
            schemas: schemas.iter().map(|schema| Schema::clone(schema)).collect(),
            devices,
        };
        serde_json::to_vec(&snapshot)
            .map(Some)
            .map_err(|error| ComponentError::Internal(format!("count window snapshot: {error}")))
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), ComponentError> {
        let snapshot: Snapshot = serde_json::from_slice(state)
            .map_err(|error| ComponentError::Internal(format!("count window snapshot: {error}")))?;
        if snapshot.size_readings != self.size || snapshot.slide_readings != self.slide {
            return Err(ComponentError::Config(format!(
                "the count window snapshot was taken with size_readings = {} and \
                 slide_readings = {}, not {} and {}",
                snapshot.size_readings, snapshot.slide_readings, self.size, self.slide
            )));
        }
        let invalid =
            |what: &str| ComponentError::Internal(format!("count window snapshot: {what}"));
        let schemas: Vec<Arc<Schema>> = snapshot.schemas.into_iter().map(Arc::new).collect();
        // Checked in full before anything changes, so a bad snapshot leaves the state as it was.
        let mut restored = Vec::new();
        for device in snapshot.devices {
            if device.device.worker(self.workers) != self.worker {
                continue;
            }
            let schema =
                schemas.get(device.schema).ok_or_else(|| invalid("unknown schema index"))?;
            let width = schema.len();
            if device.times.len() > self.size
                || device.labels.len() != device.times.len()
                || device.values.len() != device.times.len() * width
                || device.count < device.times.len() as u64
            {
                return Err(invalid("the history does not match its size, schema and count"));
            }
            if device.pending.iter().any(|pending| pending.values.len() != width) {
                return Err(invalid("pending values do not match the schema"));
            }
            let history = DeviceHistory {
                schema: Arc::clone(schema),
                ring: Ring::from_parts(
                    self.size,
                    width,
                    &device.times,
                    device.values.into_iter().map(f32::from_bits).collect(),
                    device.labels,
                ),
                count: device.count,
            };
            restored.push((device.device, history, device.pending));
        }
        // Several snapshots (one per instance that took the checkpoint) merge; each instance
        // keeps the devices it owns now (a device restored again replaces its earlier state).
        let replaced: HashSet<DeviceId, IdHash> =
            restored.iter().map(|(device, _, _)| *device).collect();
        self.drop_pending(&replaced);
        for (device, history, pending) in restored {
            let width = history.schema.len();
            for reading in pending {
                self.pending.push(Pending {
                    device,
                    time: reading.time,
                    start: self.pending_values.len(),
                    width,
                    label: reading.label,
                });
                self.pending_values.extend(reading.values.into_iter().map(f32::from_bits));
            }
            self.devices.insert(device, history);
        }
        self.watermark = if self.restored {
            self.watermark.min(snapshot.watermark_ms)
        } else {
            snapshot.watermark_ms
        };
        self.restored = true;
        Ok(())
    }
}

/// The state of a [`CountWindowOperator`] as checkpointed (JSON).
#[derive(Debug, Serialize, Deserialize)]
struct Snapshot {
    size_readings: usize,
    slide_readings: usize,
    watermark_ms: EventTime,
    schemas: Vec<Schema>,
    devices: Vec<SnapshotDevice>,
}

/// One device's [`DeviceHistory`]; values are `f32::to_bits` (JSON has no NaN).
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotDevice {
    device: DeviceId,
    /// Index into [`Snapshot::schemas`].
    schema: usize,
    /// Readings not yet final, in arrival order.
    pending: Vec<SnapshotReading>,
    times: Vec<EventTime>,
    values: Vec<u32>,
    labels: Vec<u8>,
    count: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct SnapshotReading {
    time: EventTime,
    values: Vec<u32>,
    label: u8,
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use tidewatch_api::PipelineInfo;

    use super::*;

    fn readings(device: &str, times: &[i64]) -> Batch {
        let mut batch = ReadingBatch::new(Arc::new(Schema::new(["v"])));
        for time in times {
            batch.push(DeviceId::intern(device), *time, &[*time as f32], u8::from(*time == 5));
        }
        Batch::Readings(batch)
    }

    fn windows(out: &mut Outputs) -> Vec<Window> {
        out.take_main()
            .into_iter()
            .flat_map(|batch| match batch {
                Batch::Windows(windows) => windows,
                _ => Vec::new(),
            })
            .collect()
    }

    #[test]
    fn a_window_ends_at_every_reading_once_size_readings_were_seen() {
        let mut operator = CountWindowOperator::new(&WindowConfig::count(3, 1)).expect("valid");
        let mut out = Outputs::new("w");
        // Out of order and with a gap in time: count windows do not care about spacing.
        operator.process_batch(readings("c", &[1, 3, 2, 10, 4, 5]), &mut out);
        operator.on_watermark(EventTime::MAX, &mut out);
        let windows = windows(&mut out);
        let times: Vec<Vec<i64>> = windows.iter().map(|window| window.times.clone()).collect();
        assert_eq!(times, [vec![1, 2, 3], vec![2, 3, 4], vec![3, 4, 5], vec![4, 5, 10]]);
        assert_eq!((windows[0].start_ms, windows[0].end_ms), (1, 4));
        assert_eq!(windows[0].values, [1.0, 2.0, 3.0]);
        assert_eq!(windows.iter().map(|window| window.label).collect::<Vec<_>>(), [0, 0, 1, 1]);
    }

    #[test]
    fn the_watermark_makes_readings_final_and_older_ones_late() {
        let mut operator = CountWindowOperator::new(&WindowConfig::count(2, 2)).expect("valid");
        let mut out = Outputs::new("w");
        operator.process_batch(readings("d", &[1, 2, 3, 4, 5]), &mut out);
        operator.on_watermark(3, &mut out);
        // Final: 1, 2, 3 (nothing earlier than 3 can come) -> one window [1, 2] (every second
        // reading from the second on).
        assert_eq!(
            windows(&mut out).iter().map(|window| window.times.clone()).collect::<Vec<_>>(),
            [vec![1, 2]]
        );
        operator.process_batch(readings("d", &[2]), &mut out);
        assert_eq!(out.take_late().iter().map(ReadingBatch::len).sum::<usize>(), 1);
        operator.on_watermark(EventTime::MAX, &mut out);
        assert_eq!(
            windows(&mut out).iter().map(|window| window.times.clone()).collect::<Vec<_>>(),
            [vec![3, 4]]
        );
    }

    #[test]
    fn the_reading_that_completes_a_window_emits_it_at_once_when_nothing_can_precede_it() {
        // out_of_orderness_ms = 0: the watermark is the newest reading's time, so the window
        // that reading completes is emitted with it, not when the next reading arrives.
        let mut operator = CountWindowOperator::new(&WindowConfig::count(2, 1)).expect("valid");
        let mut out = Outputs::new("w");
        for time in [10, 20, 30] {
            operator.process_batch(readings("e", &[time]), &mut out);
            operator.on_watermark(time, &mut out);
        }
        let ends: Vec<i64> = windows(&mut out).iter().map(|window| window.end_ms).collect();
        assert_eq!(ends, [21, 31]);
        // A second reading with the newest time: the watermark does not move, and it is final
        // at once all the same (it cannot precede the first one).
        operator.process_batch(readings("e", &[30]), &mut out);
        let windows = windows(&mut out);
        assert_eq!(
            windows.iter().map(|window| window.times.clone()).collect::<Vec<_>>(),
            [vec![30, 30]]
        );
        assert!(out.take_late().is_empty());
    }

    #[test]
    fn options_are_checked() {
        assert!(count_geometry(&WindowConfig::count(0, 1)).is_err());
        assert!(count_geometry(&WindowConfig::count(3, 4)).is_err());
        let mut both = WindowConfig::count(3, 1);
        both.size_ms = Some(10);
        assert!(count_geometry(&both).is_err());
        assert_eq!(count_geometry(&WindowConfig::count(5, 2)), Ok((5, 2)));
    }

    /// One step of input.
    enum Step {
        Readings(&'static str, &'static [i64]),
        Watermark(EventTime),
    }

    /// Runs `steps`; returns the windows and the late readings, in order.
    fn run(operator: &mut CountWindowOperator, steps: &[Step]) -> (Vec<Window>, Vec<ReadingBatch>) {
        let mut out = Outputs::new("w");
        let mut emitted = Vec::new();
        let mut late = Vec::new();
        for step in steps {
            match step {
                Step::Readings(device, times) => {
                    operator.process_batch(readings(device, times), &mut out);
                }
                Step::Watermark(watermark) => operator.on_watermark(*watermark, &mut out),
            }
            emitted.extend(windows(&mut out));
            late.extend(out.take_late());
        }
        assert!(out.take_errors().is_empty());
        (emitted, late)
    }

    fn times(windows: &[Window]) -> Vec<(String, Vec<i64>)> {
        windows
            .iter()
            .map(|window| (window.device.name().to_string(), window.times.clone()))
            .collect()
    }

    fn snapshot(operator: &mut CountWindowOperator) -> Vec<u8> {
        operator.snapshot().expect("snapshot").expect("state")
    }

    /// An opened operator for worker `worker` of `workers`.
    fn opened(config: &WindowConfig, worker: usize, workers: usize) -> CountWindowOperator {
        let ctx = ComponentContext::new(
            "w",
            "window",
            worker,
            workers,
            Arc::new(PipelineInfo::default()),
            Arc::new(AtomicBool::new(false)),
        );
        let mut operator = CountWindowOperator::new(config).expect("valid");
        operator.open(&ctx).expect("open");
        operator
    }

    #[test]
    fn a_restored_operator_goes_on_as_if_never_interrupted() {
        let config = WindowConfig::count(3, 2);
        let before = [
            Step::Readings("cnt-a", &[1, 2, 3, 4, 5]),
            Step::Readings("cnt-b", &[2, 1]),
            // cnt-a: 4 final readings (more than size_readings: the count sets the phase of
            // the slide), 5 pending.
            Step::Watermark(4),
            // Not final yet: pending at the cut.
            Step::Readings("cnt-a", &[7, 6]),
            Step::Readings("cnt-b", &[9]),
        ];
        let after = [
            Step::Readings("cnt-a", &[2]),
            Step::Readings("cnt-b", &[4, 3]),
            Step::Watermark(6),
            Step::Readings("cnt-b", &[6]),
            Step::Watermark(EventTime::MAX),
        ];
        let mut original = opened(&config, 0, 1);
        let (emitted, _) = run(&mut original, &before);
        assert_eq!(times(&emitted), [("cnt-a".to_owned(), vec![1, 2, 3])]);
        let state = snapshot(&mut original);
        let mut restored = opened(&config, 0, 1);
        restored.restore(&state).expect("restore");
        assert_eq!(restored.watermark, 4);

        let expected = run(&mut original, &after);
        assert_eq!(run(&mut restored, &after), expected);
        assert_eq!(
            times(&expected.0),
            [
                ("cnt-b".to_owned(), vec![1, 2, 4]),
                ("cnt-a".to_owned(), vec![3, 4, 5]),
                ("cnt-a".to_owned(), vec![5, 6, 7]),
                ("cnt-b".to_owned(), vec![4, 6, 9]),
            ]
        );
        // Older than the restored watermark: late.
        assert_eq!(
            expected.1.iter().map(|late| late.times.clone()).collect::<Vec<_>>(),
            [vec![2], vec![3]]
        );
        // The state mattered: without it the same input gives something else.
        assert_ne!(run(&mut opened(&config, 0, 1), &after), expected);
        // And the restored state is the one snapshotted.
        let mut again = opened(&config, 0, 1);
        again.restore(&state).expect("restore");
        assert_eq!(snapshot(&mut again), state);
    }

    #[test]
    fn values_and_labels_survive_a_snapshot_bit_for_bit() {
        let config = WindowConfig::count(2, 1);
        let mut original = opened(&config, 0, 1);
        let mut batch = ReadingBatch::new(Arc::new(Schema::new(["x", "y"])));
        let device = DeviceId::intern("cnt-bits");
        batch.push(device, 1, &[f32::NAN, -0.0], 1);
        batch.push(device, 3, &[2.5, f32::INFINITY], 0);
        let mut out = Outputs::new("w");
        original.process_batch(Batch::Readings(batch), &mut out);
        original.on_watermark(1, &mut out);
        let mut restored = opened(&config, 0, 1);
        restored.restore(&snapshot(&mut original)).expect("restore");
        restored.on_watermark(EventTime::MAX, &mut out);
        let emitted = windows(&mut out);
        assert_eq!(emitted.len(), 1);
        assert_eq!(emitted[0].schema.names().len(), 2);
        assert_eq!(emitted[0].times, [1, 3]);
        let bits: Vec<u32> = emitted[0].values.iter().map(|value| value.to_bits()).collect();
        let expected: Vec<u32> =
            [f32::NAN, -0.0, 2.5, f32::INFINITY].iter().map(|value| value.to_bits()).collect();
        assert_eq!(bits, expected);
        assert_eq!(emitted[0].label, 1);
    }

    #[test]
    fn restores_merge_the_devices_of_every_snapshot() {
        let config = WindowConfig::count(2, 1);
        let mut first = opened(&config, 0, 1);
        run(&mut first, &[Step::Readings("merge-a", &[1, 2]), Step::Watermark(1)]);
        let mut second = opened(&config, 0, 1);
        run(&mut second, &[Step::Readings("merge-b", &[5]), Step::Watermark(5)]);

        let mut merged = opened(&config, 0, 1);
        merged.restore(&snapshot(&mut first)).expect("first");
        merged.restore(&snapshot(&mut second)).expect("second");
        // The lowest watermark of the snapshots: nothing that was on time anywhere is late.
        assert_eq!(merged.watermark, 1);
        let (emitted, late) = run(
            &mut merged,
            &[
                Step::Readings("merge-a", &[3]),
                Step::Readings("merge-b", &[6]),
                Step::Watermark(EventTime::MAX),
            ],
        );
        assert!(late.is_empty());
        assert_eq!(
            times(&emitted),
            [
                ("merge-a".to_owned(), vec![1, 2]),
                ("merge-a".to_owned(), vec![2, 3]),
                ("merge-b".to_owned(), vec![5, 6]),
            ]
        );
    }

    #[test]
    fn a_restore_keeps_the_devices_this_worker_owns() {
        let owned_by = |worker: usize| -> &'static str {
            let name = (0..)
                .map(|index| format!("cnt-own-{index}"))
                .find(|name| DeviceId::intern(name).worker(2) == worker)
                .expect("a name");
            Box::leak(name.into_boxed_str())
        };
        let (zero, one) = (owned_by(0), owned_by(1));
        let config = WindowConfig::count(2, 1);
        let mut single = opened(&config, 0, 1);
        run(
            &mut single,
            &[Step::Readings(zero, &[1]), Step::Readings(one, &[1]), Step::Watermark(1)],
        );
        // Pending at the cut as well.
        run(&mut single, &[Step::Readings(zero, &[4]), Step::Readings(one, &[4])]);
        let state = snapshot(&mut single);
        for (worker, owned) in [(0, zero), (1, one)] {
            let mut restored = opened(&config, worker, 2);
            restored.restore(&state).expect("restore");
            assert_eq!(restored.devices.len(), 1, "worker {worker}");
            let waiting: HashSet<DeviceId> =
                restored.pending.iter().map(|pending| pending.device).collect();
            assert_eq!(waiting.len(), 1, "worker {worker}");
            let (emitted, _) = run(&mut restored, &[Step::Watermark(EventTime::MAX)]);
            assert_eq!(times(&emitted), [(owned.to_owned(), vec![1, 4])], "worker {worker}");
        }
    }

    #[test]
    fn a_snapshot_of_other_options_is_refused() {
        let mut original = opened(&WindowConfig::count(3, 2), 0, 1);
        run(&mut original, &[Step::Readings("cnt-opts", &[1])]);
        let state = snapshot(&mut original);
        for other in [WindowConfig::count(4, 2), WindowConfig::count(3, 1)] {
            let error = opened(&other, 0, 1).restore(&state).expect_err("other options");
            let ComponentError::Config(message) = error else { panic!("{error:?}") };
            assert!(message.contains("size_readings = 3 and slide_readings = 2"), "{message}");
        }
        assert!(matches!(
            opened(&WindowConfig::count(3, 2), 0, 1).restore(b"[]"),
            Err(ComponentError::Internal(_))
        ));
    }

    /// A window as compared in the tests below: values as bits (NaN included).
    type Seen = (DeviceId, EventTime, EventTime, Vec<EventTime>, Vec<u32>, u8);

    fn seen(window: &Window) -> Seen {
        (
            window.device,
            window.start_ms,
            window.end_ms,
            window.times.clone(),
            window.values.iter().map(|value| value.to_bits()).collect(),
            window.label,
        )
    }

    /// A reading: time, value bits, label.
    type Input = (EventTime, u32, u8);

    /// The count window as first written (a `VecDeque` of whole readings per device, pending
    /// readings sorted per device): the reference the rings and the shared pending buffer must
    /// match window for window, bit for bit.
    #[derive(Default)]
    struct Reference {
        size: usize,
        slide: usize,
        watermark: EventTime,
        devices: BTreeMap<DeviceId, (Vec<Input>, std::collections::VecDeque<Input>, u64)>,
    }

    impl Reference {
        fn new(size: usize, slide: usize) -> Reference {
            Reference { size, slide, watermark: EventTime::MIN, devices: BTreeMap::new() }
        }

        fn add(&mut self, device: DeviceId, readings: &[Input]) -> (Vec<Seen>, usize) {
            let mut late = 0;
            let mut final_now = false;
            for reading in readings {
                if reading.0 < self.watermark {
                    late += 1;
                    continue;
                }
                self.devices.entry(device).or_default().0.push(*reading);
                final_now |= reading.0 <= self.watermark;
            }
            let windows = if final_now { self.finalise(self.watermark) } else { Vec::new() };
            (windows, late)
        }

        fn on_watermark(&mut self, watermark: EventTime) -> Vec<Seen> {
            if watermark <= self.watermark {
                return Vec::new();
            }
            self.watermark = watermark;
            self.finalise(watermark)
        }

        fn finalise(&mut self, watermark: EventTime) -> Vec<Seen> {
            let mut windows = Vec::new();
            for (device, (pending, history, count)) in &mut self.devices {
                pending.sort_by_key(|reading| reading.0);
                let ready = pending.iter().take_while(|reading| reading.0 <= watermark).count();
                for reading in pending.drain(..ready) {
                    history.push_back(reading);
                    if history.len() > self.size {
                        history.pop_front();
                    }
                    *count += 1;
                    if history.len() == self.size
                        && (*count - self.size as u64).is_multiple_of(self.slide as u64)
                    {
                        windows.push((
                            *device,
                            history.front().map_or(0, |first| first.0),
                            reading.0.saturating_add(1),
                            history.iter().map(|step| step.0).collect(),
                            history.iter().map(|step| step.1).collect(),
                            history.iter().map(|step| step.2).max().unwrap_or(0),
                        ));
                    }
                }
            }
            windows.sort_by_key(|window| (window.2, window.0));
            windows
        }
    }

    /// One step of a generated run: readings of device `0..3`, or a watermark, or a
    /// snapshot and restore into a new operator.
    #[derive(Clone, Debug)]
    enum Event {
        Readings(usize, Vec<Input>),
        Watermark(EventTime),
        Restart,
    }

    /// Runs `events` through the operator and the reference; returns both outputs.
    fn both(size: usize, slide: usize, events: &[Event]) -> (Vec<Seen>, Vec<Seen>, usize, usize) {
        let config = WindowConfig::count(size, slide);
        let mut operator = opened(&config, 0, 1);
        let mut reference = Reference::new(size, slide);
        let names = ["ref-a", "ref-b", "ref-c"].map(DeviceId::intern);
        let (mut got, mut want, mut got_late, mut want_late) = (Vec::new(), Vec::new(), 0, 0);
        let mut out = Outputs::new("w");
        for event in events {
            match event {
                Event::Readings(device, readings) => {
                    let device = names[device % names.len()];
                    let mut batch = ReadingBatch::new(Arc::new(Schema::new(["x", "y"])));
                    for (time, bits, label) in readings {
                        let values = [f32::from_bits(*bits), f32::from_bits(bits.rotate_left(7))];
                        batch.push(device, *time, &values, *label);
                    }
                    operator.process_batch(Batch::Readings(batch), &mut out);
                    let (windows, late) = reference.add(device, readings);
                    want.extend(windows.into_iter().map(|mut window| {
                        // The reference holds one value per step: widen it as pushed.
                        window.4 =
                            window.4.iter().flat_map(|bits| [*bits, bits.rotate_left(7)]).collect();
                        window
                    }));
                    want_late += late;
                }
                Event::Watermark(watermark) => {
                    operator.on_watermark(*watermark, &mut out);
                    want.extend(reference.on_watermark(*watermark).into_iter().map(
                        |mut window| {
                            window.4 = window
                                .4
                                .iter()
                                .flat_map(|bits| [*bits, bits.rotate_left(7)])
                                .collect();
                            window
                        },
                    ));
                }
                Event::Restart => {
                    let state = snapshot(&mut operator);
                    operator = opened(&config, 0, 1);
                    operator.restore(&state).expect("restore");
                    assert_eq!(snapshot(&mut operator), state, "a restore changes nothing");
                }
            }
            got.extend(windows(&mut out).iter().map(seen));
            got_late += out.take_late().iter().map(ReadingBatch::len).sum::<usize>();
        }
        assert!(out.take_errors().is_empty());
        (got, want, got_late, want_late)
    }

    fn time() -> impl proptest::strategy::Strategy<Value = EventTime> {
        use proptest::prelude::*;
        prop_oneof![
            6 => 0i64..40,
            1 => (0i64..6).prop_map(|step| step * (1 << 31)),
            1 => (-2i64..2).prop_map(|step| step * (1 << 62)),
            1 => prop_oneof![Just(EventTime::MIN), Just(EventTime::MAX), Just(-1i64)],
        ]
    }

    fn events() -> impl proptest::strategy::Strategy<Value = Vec<Event>> {
        use proptest::prelude::*;
        let input = (time(), any::<u32>(), prop_oneof![4 => Just(0u8), 1 => any::<u8>()]);
        let event = prop_oneof![
            6 => (0usize..3, proptest::collection::vec(input, 0..6))
                .prop_map(|(device, readings)| Event::Readings(device, readings)),
            2 => time().prop_map(Event::Watermark),
            1 => Just(Event::Restart),
        ];
        proptest::collection::vec(event, 0..40)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

        /// Any input, times anywhere in i64 (the offsets' rebase and the i64 fallback),
        /// labels, restarts: the same windows and late readings as the reference.
        #[test]
        fn windows_match_the_reference(size in 1usize..5, slide_seed in 0usize..5, events in events()) {
            let slide = slide_seed % size + 1;
            let (got, want, got_late, want_late) = both(size, slide, &events);
            proptest::prop_assert_eq!(got, want);
            proptest::prop_assert_eq!(got_late, want_late);
        }
    }

    #[test]
    fn times_far_apart_stay_exact_through_rebases_and_the_wide_fallback() {
        // Steps 2³¹ ms apart (rebased every other reading), then a jump past 2³² ms and one
        // across the whole i64 range (i64 times), then back to close times (offsets again).
        let mut times: Vec<EventTime> = (0..10).map(|step| step * (1 << 31)).collect();
        times.push(times[9] + (1 << 40));
        times.push(EventTime::MAX - 5);
        times.extend((0..8).map(|step| EventTime::MAX - 4 + step / 2));
        let readings: Vec<Input> = times
            .iter()
            .enumerate()
            .map(|(index, time)| (*time, index as u32, u8::from(index == 3)))
            .collect();
        let events = [Event::Readings(0, readings), Event::Watermark(EventTime::MAX)];
        for (size, slide) in [(1, 1), (3, 1), (4, 2), (5, 5)] {
            let (got, want, _, _) = both(size, slide, &events);
            assert!(!got.is_empty());
            assert_eq!(got, want, "size {size}, slide {slide}");
        }
        let mut operator = opened(&WindowConfig::count(3, 1), 0, 1);
        run(
            &mut operator,
            &[Step::Readings("wide", &[0, 1 << 40, 2]), Step::Watermark(EventTime::MAX)],
        );
        let history = operator.devices.get(&DeviceId::intern("wide")).expect("history");
        assert!(matches!(history.ring.times, Times::Wide(_)));
        let mut operator = opened(&WindowConfig::count(2, 1), 0, 1);
        run(
            &mut operator,
            &[
                Step::Readings("narrow", &[0, 1 << 40, 1 << 40, (1 << 40) + 1]),
                Step::Watermark(EventTime::MAX),
            ],
        );
        let history = operator.devices.get(&DeviceId::intern("narrow")).expect("history");
        assert!(matches!(history.ring.times, Times::Narrow { .. }), "{:?}", history.ring.times);
    }

    #[test]
    fn a_full_history_takes_exactly_its_window_and_no_labels_when_all_are_0() {
        let mut operator = opened(&WindowConfig::count(60, 60), 0, 1);
        let mut batch =
            ReadingBatch::new(Arc::new(Schema::new(["a", "b", "c", "d", "e", "f", "g", "h"])));
        let device = DeviceId::intern("cnt-exact");
        for step in 0..150 {
            batch.push(device, 1_700_000_000_000 + step * 100_000, &[step as f32; 8], 0);
        }
        let mut out = Outputs::new("w");
        operator.process_batch(Batch::Readings(batch), &mut out);
        operator.on_watermark(EventTime::MAX, &mut out);
        assert_eq!(windows(&mut out).len(), 2);
        let ring = &operator.devices.get(&device).expect("history").ring;
        assert_eq!((ring.values.capacity(), ring.times.capacity()), (480, 60));
        assert!(matches!(ring.times, Times::Narrow { .. }));
        assert_eq!(ring.labels.capacity(), 0);
        assert!(operator.pending.is_empty() && operator.pending_values.is_empty());
    }
}
