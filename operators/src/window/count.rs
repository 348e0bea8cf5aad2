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

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tidewatch_api::{
    Batch, ComponentContext, ComponentError, ConfigError, DeviceId, EventTime, Outputs,
    ReadingBatch, Schema, Transform, Window,
};

use super::config::{WindowConfig, count_geometry};
use super::{readings_only, schema_index};

/// A reading not yet final; its values are in [`DeviceHistory::pending_values`], at the same
/// index (one flat buffer per device: no allocation per reading).
#[derive(Debug)]
struct Pending {
    time: EventTime,
    label: u8,
}

#[derive(Debug)]
struct DeviceHistory {
    schema: Arc<Schema>,
    /// Readings not yet final, in arrival order.
    pending: Vec<Pending>,
    /// Their values, `schema.len()` per reading, in the order of `pending`.
    pending_values: Vec<f32>,
    /// The last `size` final readings.
    times: VecDeque<EventTime>,
    values: VecDeque<f32>,
    labels: VecDeque<u8>,
    /// Final readings so far.
    count: u64,
}

/// The count-window operator.
#[derive(Debug)]
pub struct CountWindowOperator {
    size: usize,
    slide: usize,
    watermark: EventTime,
    devices: HashMap<DeviceId, DeviceHistory>,
    /// The devices with readings not yet final.
    waiting: BTreeSet<DeviceId>,
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
            devices: HashMap::new(),
            waiting: BTreeSet::new(),
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
                pending: Vec::new(),
                pending_values: Vec::new(),
                times: VecDeque::new(),
                values: VecDeque::new(),
                labels: VecDeque::new(),
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
            history.pending.push(Pending { time: reading.time_ms, label: reading.label });
            history.pending_values.extend_from_slice(reading.values);
            self.waiting.insert(reading.device);
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
        let mut windows = Vec::new();
        let width_of = |history: &DeviceHistory| history.schema.len();
        let mut done = Vec::new();
        for device in &self.waiting {
            let Some(history) = self.devices.get_mut(device) else { continue };
            let width = width_of(history);
            sort_pending(history, width);
            let ready =
                history.pending.iter().take_while(|pending| pending.time <= watermark).count();
            for (index, pending) in history.pending.drain(..ready).enumerate() {
                history.times.push_back(pending.time);
                history.values.extend(&history.pending_values[index * width..(index + 1) * width]);
                history.labels.push_back(pending.label);
                if history.times.len() > self.size {
                    history.times.pop_front();
                    history.labels.pop_front();
                    history.values.drain(..width);
                }
                history.count += 1;
                if history.times.len() == self.size
                    && (history.count - self.size as u64).is_multiple_of(self.slide as u64)
                {
                    let first = history.times.front().copied().unwrap_or(pending.time);
                    windows.push(Window {
                        device: *device,
                        start_ms: first,
                        end_ms: pending.time.saturating_add(1),
                        schema: Arc::clone(&history.schema),
                        times: history.times.iter().copied().collect(),
                        values: history.values.iter().copied().collect(),
                        label: history.labels.iter().copied().max().unwrap_or(0),
                    });
                }
            }
            history.pending_values.drain(..ready * width);
            if history.pending.is_empty() {
                done.push(*device);
            }
        }
        for device in done {
            self.waiting.remove(&device);
        }
        windows.sort_by_key(|window| (window.end_ms, window.device));
        out.emit(Batch::Windows(windows));
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
                    pending: history
                        .pending
                        .iter()
                        .enumerate()
                        .map(|(index, pending)| {
                            let width = history.schema.len();
                            let values = history
                                .pending_values
                                .get(index * width..(index + 1) * width)
                                .unwrap_or_default();
                            SnapshotReading {
                                time: pending.time,
                                values: values.iter().map(|value| value.to_bits()).collect(),
                                label: pending.label,
                            }
                        })
                        .collect(),
                    times: history.times.iter().copied().collect(),
                    values: history.values.iter().map(|value| value.to_bits()).collect(),
                    labels: history.labels.iter().copied().collect(),
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
                pending_values: device
                    .pending
                    .iter()
                    .flat_map(|pending| pending.values.iter().copied().map(f32::from_bits))
                    .collect(),
                pending: device
                    .pending
                    .into_iter()
                    .map(|pending| Pending { time: pending.time, label: pending.label })
                    .collect(),
                times: device.times.into(),
                values: device.values.into_iter().map(f32::from_bits).collect(),
                labels: device.labels.into(),
                count: device.count,
            };
            restored.push((device.device, history));
        }
        // Several snapshots (one per instance that took the checkpoint) merge; each instance
        // keeps the devices it owns now.
        for (device, history) in restored {
            if history.pending.is_empty() {
                self.waiting.remove(&device);
            } else {
                self.waiting.insert(device);
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

/// Sorts a device's pending readings by time, stably (arrival order among equal times), with
/// their values. Readings usually arrive in order: then nothing moves.
fn sort_pending(history: &mut DeviceHistory, width: usize) {
    if history.pending.is_sorted_by_key(|pending| pending.time) {
        return;
    }
    let mut order: Vec<usize> = (0..history.pending.len()).collect();
    order.sort_by_key(|&index| history.pending[index].time);
    let mut values = Vec::with_capacity(history.pending_values.len());
    for &index in &order {
        values.extend_from_slice(&history.pending_values[index * width..(index + 1) * width]);
    }
    let mut pending: Vec<Option<Pending>> = history.pending.drain(..).map(Some).collect();
    history.pending = order.iter().filter_map(|&index| pending[index].take()).collect();
    history.pending_values = values;
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
            assert_eq!(restored.waiting.len(), 1, "worker {worker}");
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
}
