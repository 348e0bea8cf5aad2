//! Time windows, tumbling or sliding (see [`super`] for their semantics).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tidewatch_api::{
    Batch, ComponentContext, ComponentError, ConfigError, DeviceId, EventTime, Outputs,
    ReadingBatch, Schema, Transform, Window,
};

use super::config::{Geometry, WindowConfig, geometry};
use super::{readings_only, schema_index, time_in_range};
use crate::util::IdHash;

// ---------------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------------

/// The readings gathered so far for one device in one window.
#[derive(Clone, Debug)]
struct OpenWindow {
    schema: Arc<Schema>,
    times: Vec<EventTime>,
    values: Vec<f32>,
    label: u8,
    /// The times were appended in ascending order (no sort needed at emission).
    sorted: bool,
}

impl OpenWindow {
    fn new(schema: Arc<Schema>) -> OpenWindow {
        OpenWindow { schema, times: Vec::new(), values: Vec::new(), label: 0, sorted: true }
    }

    fn push(&mut self, time: EventTime, values: &[f32], label: u8) {
        if self.times.last().is_some_and(|last| *last > time) {
            self.sorted = false;
        }
        self.times.push(time);
        self.values.extend_from_slice(values);
        self.label = self.label.max(label);
    }

    /// The finished window, steps sorted by time (stable: equal times keep arrival order).
    fn finish(self, device: DeviceId, start_ms: EventTime, end_ms: EventTime) -> Window {
        let OpenWindow { schema, mut times, mut values, label, sorted } = self;
        if !sorted {
            let width = schema.len();
            let mut order: Vec<usize> = (0..times.len()).collect();
            order.sort_by_key(|step| times.get(*step).copied().unwrap_or(EventTime::MAX));
            let mut sorted_values = Vec::with_capacity(values.len());
            for step in &order {
                if let Some(row) = values.get(step * width..(step + 1) * width) {
                    sorted_values.extend_from_slice(row);
                }
            }
            times = order.iter().filter_map(|step| times.get(*step).copied()).collect();
            values = sorted_values;
        }
        Window { device, start_ms, end_ms, schema, times, values, label }
    }
}

/// Open windows of one end time, by device.
type ByDevice = HashMap<DeviceId, OpenWindow, IdHash>;

/// The `window` transform: per-device event-time windows.
#[derive(Debug)]
pub struct WindowOperator {
    geometry: Geometry,
    /// The greatest watermark seen; windows with `end <= watermark` are closed.
    watermark: EventTime,
    /// Open windows by end time, then device.
    open: BTreeMap<EventTime, ByDevice>,
    /// This instance's worker and the number of workers: a restore keeps the devices it owns.
    worker: usize,
    workers: usize,
    /// True once a snapshot was restored (the next one merges).
    restored: bool,
}

impl WindowOperator {
    /// Builds the transform from its options (the same checks as the factory's).
    pub fn new(
        config: &WindowConfig,
        ctx: &ComponentContext,
    ) -> Result<WindowOperator, ConfigError> {
        Ok(WindowOperator {
            geometry: geometry(config)?,
            watermark: EventTime::MIN,
            open: BTreeMap::new(),
            worker: ctx.worker_index,
            workers: ctx.workers,
            restored: false,
        })
    }

    /// The greatest watermark seen so far (`EventTime::MIN` before the first).
    pub fn watermark(&self) -> EventTime {
        self.watermark
    }

    /// Number of windows currently open (over every device).
    pub fn open_windows(&self) -> usize {
        self.open.values().map(HashMap::len).sum()
    }

    /// Adds the readings of `batch` to their open windows; late readings go to `<id>.late`.
    pub fn add_readings(&mut self, batch: &ReadingBatch, out: &mut Outputs) {
        let Geometry { size, slide, .. } = self.geometry;
        // Windows ending at or before this are closed for these readings: the operator's own
        // watermark, or the producer's when it sent the batch (which may be ahead of the
        // `on_watermark` calls this operator has had so far; using it keeps lateness
        // independent of scheduling).
        let closed_until = self.watermark.max(out.batch_watermark());
        let mut late: Option<ReadingBatch> = None;
        for reading in batch.iter() {
            let time = reading.time_ms;
            if !time_in_range(&reading, out) {
                continue;
            }
            // The latest window holding `time` starts at the last multiple of `slide` <= time.
            let last_start = time.div_euclid(slide) * slide;
            if last_start + size <= closed_until {
                late.get_or_insert_with(|| ReadingBatch::new(Arc::clone(&batch.schema))).push(
                    reading.device,
                    time,
                    reading.values,
                    reading.label,
                );
                continue;
            }
            let mut start = last_start;
            while start > time - size {
                let end = start + size;
                if end <= closed_until {
                    break;
                }
                let window = self
                    .open
                    .entry(end)
                    .or_default()
                    .entry(reading.device)
                    .or_insert_with(|| OpenWindow::new(Arc::clone(&batch.schema)));
                if Arc::ptr_eq(&window.schema, &batch.schema) || window.schema == batch.schema {
                    window.push(time, reading.values, reading.label);
                } else {
                    out.error(
                        "bad_value",
                        format!(
                            "reading of device `{}` at {time} ms has features {:?}, but its \
                             open window [{}, {end}) has {:?}",
                            reading.device,
                            batch.schema.names(),
                            end - size,
                            window.schema.names()
                        ),
                        None,
                        None,
                    );
                }
                start -= slide;
            }
        }
        if let Some(late) = late {
            out.late(late);
        }
    }

    /// Emits every open window with `end <= watermark`, in order of (end, device), as one batch.
    fn close_until(&mut self, watermark: EventTime, out: &mut Outputs) {
        let mut windows = Vec::new();
        let mut too_few = 0u64;
        while let Some(entry) = self.open.first_entry() {
            let end = *entry.key();
            if end > watermark {
                break;
            }
            let mut devices: Vec<(DeviceId, OpenWindow)> = entry.remove().into_iter().collect();
            devices.sort_unstable_by_key(|(device, _)| *device);
            for (device, window) in devices {
                if window.times.len() < self.geometry.min_steps {
                    too_few += 1;
                } else {
                    windows.push(window.finish(device, end - self.geometry.size, end));
                }
            }
        }
        out.discard("too_few_steps", too_few);
        out.emit(Batch::Windows(windows));
    }
}

impl Transform for WindowOperator {
    fn process_batch(&mut self, batch: Batch, out: &mut Outputs) {
        readings_only(batch, out, |readings, out| self.add_readings(readings, out));
    }

    fn on_watermark(&mut self, watermark_ms: EventTime, out: &mut Outputs) {
        if watermark_ms <= self.watermark {
            return;
        }
        self.watermark = watermark_ms;
        self.close_until(watermark_ms, out);
    }

    fn snapshot(&mut self) -> Result<Option<Vec<u8>>, ComponentError> {
        let mut schemas: Vec<Arc<Schema>> = Vec::new();
        let mut windows = Vec::with_capacity(self.open_windows());
        for (end, devices) in &self.open {
            let mut devices: Vec<_> = devices.iter().collect();
            devices.sort_unstable_by_key(|(device, _)| **device);
            for (device, window) in devices {
                let schema = schema_index(&mut schemas, &window.schema);
                windows.push(SnapshotWindow {
                    device: *device,
                    end_ms: *end,
                    schema,
                    times: window.times.clone(),
                    values: window.values.iter().map(|value| value.to_bits()).collect(),
                    label: window.label,
                });
            }
        }
        let snapshot = Snapshot {
            size_ms: self.geometry.size,
            slide_ms: self.geometry.slide,
            watermark_ms: self.watermark,
            schemas: schemas.iter().map(|schema| Schema::clone(schema)).collect(),
            windows,
        };
        serde_json::to_vec(&snapshot)
            .map(Some)
            .map_err(|error| ComponentError::Internal(format!("window snapshot: {error}")))
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), ComponentError> {
        let snapshot: Snapshot = serde_json::from_slice(state)
            .map_err(|error| ComponentError::Internal(format!("window snapshot: {error}")))?;
        if snapshot.size_ms != self.geometry.size || snapshot.slide_ms != self.geometry.slide {
            return Err(ComponentError::Config(format!(
                "the window snapshot was taken with size_ms = {} and slide_ms = {}, not {} and {}",
                snapshot.size_ms, snapshot.slide_ms, self.geometry.size, self.geometry.slide
            )));
        }
        let schemas: Vec<Arc<Schema>> = snapshot.schemas.into_iter().map(Arc::new).collect();
        // Several snapshots (one per instance that took the checkpoint) merge; each instance
        // keeps the devices it owns now.
        let mut open = std::mem::take(&mut self.open);
        for window in snapshot.windows {
            if window.device.worker(self.workers) != self.worker {
                continue;
            }
            let schema = schemas.get(window.schema).ok_or_else(|| {
                ComponentError::Internal("window snapshot: unknown schema index".to_owned())
            })?;
            if window.values.len() != window.times.len() * schema.len() {
                return Err(ComponentError::Internal(
                    "window snapshot: values do not match times and schema".to_owned(),
                ));
            }
            let sorted = window.times.is_sorted();
            open.entry(window.end_ms).or_default().insert(
                window.device,
                OpenWindow {
                    schema: Arc::clone(schema),
                    times: window.times,
                    values: window.values.into_iter().map(f32::from_bits).collect(),
                    label: window.label,
                    sorted,
                },
            );
        }
        self.watermark = if self.restored {
            self.watermark.min(snapshot.watermark_ms)
        } else {
            snapshot.watermark_ms
        };
        self.restored = true;
        self.open = open;
        Ok(())
    }
}

/// The state of a [`WindowOperator`] as checkpointed (JSON).
#[derive(Debug, Serialize, Deserialize)]
struct Snapshot {
    size_ms: EventTime,
    slide_ms: EventTime,
    watermark_ms: EventTime,
    schemas: Vec<Schema>,
    windows: Vec<SnapshotWindow>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SnapshotWindow {
    device: DeviceId,
    end_ms: EventTime,
    schema: usize,
    times: Vec<EventTime>,
    /// `f32::to_bits` of each value (JSON has no NaN).
    values: Vec<u32>,
    label: u8,
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use tidewatch_api::{LABEL_ANOMALY, LABEL_NORMAL};

    use super::*;

    fn operator(config: WindowConfig) -> WindowOperator {
        WindowOperator::new(&config, &ComponentContext::for_test("win", "window"))
            .expect("valid config")
    }

    fn schema() -> Arc<Schema> {
        Arc::new(Schema::new(["a", "b"]))
    }

    fn batch(schema: &Arc<Schema>, readings: &[(&str, EventTime, f32)]) -> Batch {
        let mut batch = ReadingBatch::new(Arc::clone(schema));
        for (device, time, value) in readings {
            batch.push(DeviceId::intern(device), *time, &[*value, -*value], LABEL_NORMAL);
        }
        Batch::Readings(batch)
    }

    fn windows(out: &mut Outputs) -> Vec<Window> {
        let main = out.take_main();
        assert!(main.len() <= 1, "one batch per watermark");
        main.into_iter()
            .flat_map(|batch| match batch {
                Batch::Windows(windows) => windows,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    fn bounds(windows: &[Window]) -> Vec<(String, EventTime, EventTime, Vec<EventTime>)> {
        windows
            .iter()
            .map(|w| (w.device.name().to_string(), w.start_ms, w.end_ms, w.times.clone()))
            .collect()
    }

    #[test]
    fn tumbling_assignment() {
        let schema = schema();
        let mut op = operator(WindowConfig::tumbling(10));
        let mut out = Outputs::new("win");
        op.process_batch(
            batch(&schema, &[("t1", 0, 1.0), ("t1", 9, 2.0), ("t1", 10, 3.0), ("t1", -1, 4.0)]),
            &mut out,
        );
        assert!(out.take_main().is_empty());
        op.on_watermark(EventTime::MAX, &mut out);
        let emitted = windows(&mut out);
        assert_eq!(
            bounds(&emitted),
            vec![
                ("t1".to_owned(), -10, 0, vec![-1]),
                ("t1".to_owned(), 0, 10, vec![0, 9]),
                ("t1".to_owned(), 10, 20, vec![10]),
            ]
        );
        assert_eq!(emitted[1].values, vec![1.0, -1.0, 2.0, -2.0]);
        assert_eq!(emitted[1].schema, schema);
    }

    #[test]
    fn sliding_windows_hold_each_reading_size_over_slide_times() {
        let schema = schema();
        let mut op = operator(WindowConfig::sliding(30, 10));
        let mut out = Outputs::new("win");
        op.process_batch(batch(&schema, &[("s1", 25, 1.0)]), &mut out);
        assert_eq!(op.open_windows(), 3);
        op.on_watermark(EventTime::MAX, &mut out);
        let emitted = windows(&mut out);
        let spans: Vec<(EventTime, EventTime)> =
            emitted.iter().map(|w| (w.start_ms, w.end_ms)).collect();
        assert_eq!(spans, vec![(0, 30), (10, 40), (20, 50)]);
        assert!(emitted.iter().all(|w| w.times == vec![25]));

        // size not a multiple of slide: windows start at multiples of slide.
        let mut op = operator(WindowConfig::sliding(25, 10));
        op.process_batch(batch(&schema, &[("s1", 12, 1.0), ("s1", 27, 2.0)]), &mut out);
        op.on_watermark(EventTime::MAX, &mut out);
        let spans: Vec<(EventTime, EventTime, Vec<EventTime>)> =
            windows(&mut out).iter().map(|w| (w.start_ms, w.end_ms, w.times.clone())).collect();
        assert_eq!(
            spans,
            vec![
                (-10, 15, vec![12]),
                (0, 25, vec![12]),
                (10, 35, vec![12, 27]),
                (20, 45, vec![27])
            ]
        );
    }

    #[test]
    fn watermark_closes_windows_exactly_at_their_end() {
        let schema = schema();
        let mut op = operator(WindowConfig::tumbling(100));
        let mut out = Outputs::new("win");
        op.process_batch(batch(&schema, &[("w1", 5, 1.0), ("w1", 150, 2.0)]), &mut out);
        op.on_watermark(99, &mut out);
        assert!(windows(&mut out).is_empty());
        op.on_watermark(100, &mut out);
        assert_eq!(bounds(&windows(&mut out)), vec![("w1".to_owned(), 0, 100, vec![5])]);
        // A lower watermark is ignored.
        op.on_watermark(50, &mut out);
        assert_eq!(op.watermark(), 100);
        op.on_watermark(199, &mut out);
        assert!(windows(&mut out).is_empty());
        op.on_watermark(200, &mut out);
        assert_eq!(bounds(&windows(&mut out)), vec![("w1".to_owned(), 100, 200, vec![150])]);
    }

    #[test]
    fn out_of_order_readings_are_sorted_within_their_window() {
        let schema = schema();
        let mut op = operator(WindowConfig::tumbling(100));
        let mut out = Outputs::new("win");
        op.process_batch(batch(&schema, &[("o1", 50, 5.0), ("o1", 10, 1.0)]), &mut out);
        op.on_watermark(40, &mut out);
        op.process_batch(batch(&schema, &[("o1", 45, 4.0), ("o1", 10, 1.5)]), &mut out);
        op.on_watermark(100, &mut out);
        let emitted = windows(&mut out);
        assert_eq!(emitted.len(), 1);
        assert_eq!(emitted[0].times, vec![10, 10, 45, 50]);
        assert_eq!(emitted[0].values, vec![1.0, -1.0, 1.5, -1.5, 4.0, -4.0, 5.0, -5.0]);
        assert!(out.take_late().is_empty());
    }

    #[test]
    fn readings_of_closed_windows_are_late() {
        let schema = schema();
        let mut op = operator(WindowConfig::tumbling(100));
        let mut out = Outputs::new("win");
        op.process_batch(batch(&schema, &[("l1", 10, 1.0)]), &mut out);
        op.on_watermark(150, &mut out);
        assert_eq!(windows(&mut out).len(), 1);
        op.process_batch(
            batch(&schema, &[("l1", 99, 2.0), ("l1", 120, 3.0), ("l2", 0, 4.0)]),
            &mut out,
        );
        let late = out.take_late();
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].schema, schema);
        assert_eq!(late[0].times, vec![99, 0]);
        assert_eq!(late[0].values, vec![2.0, -2.0, 4.0, -4.0]);
        op.on_watermark(EventTime::MAX, &mut out);
        assert_eq!(bounds(&windows(&mut out)), vec![("l1".to_owned(), 100, 200, vec![120])]);

        // The producer's watermark at sending time decides lateness too, before this operator
        // had the matching `on_watermark`.
        let mut op = operator(WindowConfig::tumbling(100));
        out.set_batch_watermark(100);
        op.process_batch(batch(&schema, &[("l4", 99, 1.0), ("l4", 100, 2.0)]), &mut out);
        out.set_batch_watermark(EventTime::MIN);
        assert_eq!(out.take_late()[0].times, vec![99]);
        op.on_watermark(EventTime::MAX, &mut out);
        assert_eq!(bounds(&windows(&mut out)), vec![("l4".to_owned(), 100, 200, vec![100])]);

        // Sliding: a reading joins the windows still open and is late only if all are closed.
        let mut op = operator(WindowConfig::sliding(20, 10));
        op.on_watermark(20, &mut out);
        op.process_batch(batch(&schema, &[("l3", 15, 1.0), ("l3", 5, 2.0)]), &mut out);
        assert_eq!(out.take_late()[0].times, vec![5]);
        op.on_watermark(EventTime::MAX, &mut out);
        assert_eq!(bounds(&windows(&mut out)), vec![("l3".to_owned(), 10, 30, vec![15])]);
    }

    #[test]
    fn windows_with_too_few_steps_are_discarded_and_counted() {
        let schema = schema();
        let mut op = operator(WindowConfig { min_steps: 2, ..WindowConfig::tumbling(10) });
        let mut out = Outputs::new("win");
        op.process_batch(
            batch(&schema, &[("m1", 1, 1.0), ("m1", 2, 1.0), ("m1", 11, 1.0), ("m2", 3, 1.0)]),
            &mut out,
        );
        op.on_watermark(EventTime::MAX, &mut out);
        assert_eq!(bounds(&windows(&mut out)), vec![("m1".to_owned(), 0, 10, vec![1, 2])]);
        assert_eq!(out.take_discarded(), vec![("too_few_steps", 2)]);
    }

    #[test]
    fn final_flush_emits_everything_in_end_then_device_order() {
        let schema = schema();
        let mut op = operator(WindowConfig::tumbling(10));
        let mut out = Outputs::new("win");
        let first = DeviceId::intern("flush-a");
        let second = DeviceId::intern("flush-b");
        op.process_batch(
            batch(&schema, &[("flush-b", 25, 1.0), ("flush-a", 5, 1.0), ("flush-b", 5, 1.0)]),
            &mut out,
        );
        op.process_batch(batch(&schema, &[("flush-a", 1_000_000, 1.0)]), &mut out);
        op.on_watermark(EventTime::MAX, &mut out);
        let order: Vec<(EventTime, DeviceId)> =
            windows(&mut out).iter().map(|w| (w.end_ms, w.device)).collect();
        assert_eq!(order, vec![(10, first), (10, second), (30, second), (1_000_010, first)]);
        assert_eq!(op.open_windows(), 0);
        op.close(&mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn devices_are_kept_apart_and_labels_propagate() {
        let schema = schema();
        let mut op = operator(WindowConfig::tumbling(10));
        let mut out = Outputs::new("win");
        let mut readings = ReadingBatch::new(Arc::clone(&schema));
        readings.push(DeviceId::intern("k1"), 1, &[1.0, 1.0], LABEL_NORMAL);
        readings.push(DeviceId::intern("k2"), 2, &[2.0, 2.0], LABEL_ANOMALY);
        readings.push(DeviceId::intern("k1"), 3, &[3.0, 3.0], LABEL_NORMAL);
        op.process_batch(Batch::Readings(readings), &mut out);
        op.on_watermark(10, &mut out);
        let emitted = windows(&mut out);
        assert_eq!(emitted.len(), 2);
        let k1 = emitted.iter().find(|w| &*w.device.name() == "k1").expect("k1");
        let k2 = emitted.iter().find(|w| &*w.device.name() == "k2").expect("k2");
        assert_eq!(k1.values, vec![1.0, 1.0, 3.0, 3.0]);
        assert_eq!(k1.label, LABEL_NORMAL);
        assert_eq!(k2.values, vec![2.0, 2.0]);
        assert_eq!(k2.label, LABEL_ANOMALY);
    }

    #[test]
    fn snapshot_and_restore_keep_open_windows() {
        let schema = schema();
        let mut op = operator(WindowConfig::tumbling(10));
        let mut out = Outputs::new("win");
        let mut readings = ReadingBatch::new(Arc::clone(&schema));
        readings.push(DeviceId::intern("snap"), 7, &[f32::NAN, 1.0], LABEL_ANOMALY);
        readings.push(DeviceId::intern("snap"), 3, &[2.0, 3.0], LABEL_NORMAL);
        op.process_batch(Batch::Readings(readings), &mut out);
        op.on_watermark(2, &mut out);
        let state = op.snapshot().expect("snapshot").expect("state");

        let mut restored = operator(WindowConfig::tumbling(10));
        restored.restore(&state).expect("restore");
        assert_eq!(restored.watermark(), 2);
        restored.on_watermark(EventTime::MAX, &mut out);
        let emitted = windows(&mut out);
        assert_eq!(emitted.len(), 1);
        assert_eq!(emitted[0].times, vec![3, 7]);
        assert_eq!(emitted[0].values[..2], [2.0, 3.0]);
        assert!(emitted[0].values[2].is_nan());
        assert_eq!(emitted[0].values[3], 1.0);
        assert_eq!(emitted[0].label, LABEL_ANOMALY);

        let mut other = operator(WindowConfig::tumbling(20));
        assert!(other.restore(&state).is_err());
    }
}
