//! Session windows: per device, the readings that follow each other by less than `gap_ms`,
//! optionally cut at `max_size_ms` from the session's first reading.
//!
//! A reading at `t` opens the session `[t, t + gap_ms)`; sessions whose spans overlap merge,
//! so a session is a run of readings each less than `gap_ms` after the one before it, and spans
//! `[first, last + gap_ms)`. With `max_size_ms`, a reading at or after `first + max_size_ms`
//! starts the next session, and the session ends at `min(last + gap_ms, first + max_size_ms)`.
//!
//! Event time works as for the other windows: a session is emitted when the watermark reaches
//! its end, and a reading is **late** when its own session would already be closed,
//! `t + min(gap_ms, max_size_ms) <= W` with `W` the greater of the operator's watermark and the
//! producer's when it sent the batch. A reading that is out of order but not late lands in its
//! place: it may extend a session, or **bridge** the gap between two open sessions, which then
//! merge into one. Sessions that end at or before `W` are emitted before a batch's readings are
//! added, so what a reading joins does not depend on when the operator was scheduled.
//!
//! The open readings are kept per device in time order; the sessions are computed from them
//! when the watermark moves (the first one's end is cached until a reading changes it).

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tidewatch_api::{
    Batch, ComponentContext, ComponentError, ConfigError, DeviceId, EventTime, Outputs,
    ReadingBatch, Schema, Transform, Window,
};

use super::config::{SessionGeometry, WindowConfig, session_geometry};
use super::{readings_only, schema_index, time_in_range};
use crate::util::IdHash;

/// The open (not yet emitted) readings of one device, in time order.
#[derive(Clone, Debug)]
struct Open {
    schema: Arc<Schema>,
    times: Vec<EventTime>,
    /// `times.len()` rows of `schema.len()` values.
    values: Vec<f32>,
    labels: Vec<u8>,
    /// The end and the number of readings of the first session, until a reading changes them.
    first: Option<(EventTime, usize)>,
}

impl Open {
    fn new(schema: Arc<Schema>) -> Open {
        Open { schema, times: Vec::new(), values: Vec::new(), labels: Vec::new(), first: None }
    }

    /// Adds a reading in its place (after the readings of the same time: arrival order).
    fn insert(&mut self, time: EventTime, values: &[f32], label: u8, geometry: &SessionGeometry) {
        let at = self.times.partition_point(|known| *known <= time);
        self.first = self.first_after_insert(at, time, geometry);
        let width = self.schema.len();
        self.times.insert(at, time);
        self.labels.insert(at, label);
        let row = at * width;
        self.values.splice(row..row, values.iter().copied());
    }

    /// The cached first session once a reading at `time` goes in at `at`, when it can be told
    /// without a scan (so a session that grows reading by reading costs no scan per reading);
    /// `None` to compute it again.
    fn first_after_insert(
        &self,
        at: usize,
        time: EventTime,
        geometry: &SessionGeometry,
    ) -> Option<(EventTime, usize)> {
        let (end, count) = self.first?;
        if at > count {
            // After a reading that did not join the first session: neither does this one.
            return Some((end, count));
        }
        if at == 0 {
            // A new first reading: the session starts earlier, its maximum moves.
            return None;
        }
        if at < count {
            // Between two of its readings: same first and last reading, same end.
            return Some((end, count + 1));
        }
        let (start, last) = (self.times[0], self.times[count - 1]);
        let limit = geometry.max_size.map_or(EventTime::MAX, |max| start.saturating_add(max));
        if time >= last.saturating_add(geometry.gap) || time >= limit {
            return Some((end, count));
        }
        // It extends the first session: at the end of the readings that is all; otherwise the
        // readings after it may join too.
        (at == self.times.len()).then(|| (time.saturating_add(geometry.gap).min(limit), count + 1))
    }

    /// The end of the first session and how many readings it holds.
    fn first_session(&mut self, geometry: &SessionGeometry) -> Option<(EventTime, usize)> {
        if self.first.is_none() {
            let start = *self.times.first()?;
            let limit = geometry.max_size.map_or(EventTime::MAX, |max| start.saturating_add(max));
            let mut last = start;
            let mut count = 1;
            for &time in &self.times[1..] {
                if time >= last.saturating_add(geometry.gap) || time >= limit {
                    break;
                }
                last = time;
                count += 1;
            }
            self.first = Some((last.saturating_add(geometry.gap).min(limit), count));
        }
        self.first
    }

    /// Takes the first `count` readings as the window `[start, end)`.
    fn take(&mut self, device: DeviceId, count: usize, end: EventTime) -> Window {
        let width = self.schema.len();
        let times: Vec<EventTime> = self.times.drain(..count).collect();
        let values: Vec<f32> = self.values.drain(..count * width).collect();
        let label = self.labels.drain(..count).max().unwrap_or(0);
        self.first = None;
        Window {
            device,
            start_ms: times.first().copied().unwrap_or(end),
            end_ms: end,
            schema: Arc::clone(&self.schema),
            times,
            values,
            label,
        }
    }
}

/// The `window` transform with `gap_ms`: per-device session windows.
#[derive(Debug)]
pub struct SessionWindowOperator {
    geometry: SessionGeometry,
    /// The greatest watermark seen; sessions with `end <= watermark` are closed.
    watermark: EventTime,
    open: HashMap<DeviceId, Open, IdHash>,
    /// This instance's worker and the number of workers: a restore keeps the devices it owns.
    worker: usize,
    workers: usize,
    /// True once a snapshot was restored (the next one merges).
    restored: bool,
}

impl SessionWindowOperator {
    /// Builds the transform from its options (the same checks as the factory's).
    pub fn new(
        config: &WindowConfig,
        ctx: &ComponentContext,
    ) -> Result<SessionWindowOperator, ConfigError> {
        Ok(SessionWindowOperator {
            geometry: session_geometry(config)?,
            watermark: EventTime::MIN,
            open: HashMap::default(),
            worker: ctx.worker_index,
            workers: ctx.workers,
            restored: false,
        })
    }

    /// The greatest watermark seen so far (`EventTime::MIN` before the first).
    pub fn watermark(&self) -> EventTime {
        self.watermark
    }

    /// Number of readings in sessions not emitted yet (over every device).
    pub fn open_readings(&self) -> usize {
        self.open.values().map(|open| open.times.len()).sum()
    }

    /// How far after a lone reading its session ends.
    fn reach(&self) -> EventTime {
        self.geometry.max_size.map_or(self.geometry.gap, |max| max.min(self.geometry.gap))
    }

    /// Adds the readings of `batch` to their sessions; late readings go to `<id>.late`.
    pub fn add_readings(&mut self, batch: &ReadingBatch, out: &mut Outputs) {
        // What is closed for these readings: the operator's watermark or the producer's when
        // it sent the batch. Sessions that ended by then go first, so that no reading of
        // this batch joins them whatever the scheduling.
        let closed_until = self.watermark.max(out.batch_watermark());
        self.close_until(closed_until, out);
        let reach = self.reach();
        let mut late: Option<ReadingBatch> = None;
        for reading in batch.iter() {
            let time = reading.time_ms;
            if !time_in_range(&reading, out) {
                continue;
            }
            if time + reach <= closed_until {
                late.get_or_insert_with(|| ReadingBatch::new(Arc::clone(&batch.schema))).push(
                    reading.device,
                    time,
                    reading.values,
                    reading.label,
                );
                continue;
            }
            let open = self
                .open
                .entry(reading.device)
                .or_insert_with(|| Open::new(Arc::clone(&batch.schema)));
            if Arc::ptr_eq(&open.schema, &batch.schema) || open.schema == batch.schema {
                open.insert(time, reading.values, reading.label, &self.geometry);
            } else {
                out.error(
                    "bad_value",
                    format!(
                        "reading of device `{}` at {time} ms has features {:?}, but its open \
                         session has {:?}",
                        reading.device,
                        batch.schema.names(),
                        open.schema.names()
                    ),
                    None,
                    None,
                );
            }
        }
        if let Some(late) = late {
            out.late(late);
        }
    }

    /// Emits every session with `end <= watermark`, in order of (end, device), as one batch.
    fn close_until(&mut self, watermark: EventTime, out: &mut Outputs) {
        let mut windows = Vec::new();
        let mut too_few = 0u64;
        let geometry = self.geometry;
        self.open.retain(|device, open| {
            while let Some((end, count)) = open.first_session(&geometry) {
                if end > watermark {
                    break;
                }
                let window = open.take(*device, count, end);
                if window.times.len() < geometry.min_steps {
                    too_few += 1;
                } else {
                    windows.push(window);
                }
            }
            !open.times.is_empty()
        });
        windows.sort_unstable_by_key(|window| (window.end_ms, window.device));
        out.discard("too_few_steps", too_few);
        out.emit(Batch::Windows(windows));
    }
}

impl Transform for SessionWindowOperator {
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
        let mut devices: Vec<(&DeviceId, &Open)> = self.open.iter().collect();
        devices.sort_unstable_by_key(|(device, _)| **device);
        let devices = devices
            .into_iter()
            .map(|(device, open)| SnapshotDevice {
                device: *device,
                schema: schema_index(&mut schemas, &open.schema),
                times: open.times.clone(),
                values: open.values.iter().map(|value| value.to_bits()).collect(),
                labels: open.labels.clone(),
            })
            .collect();
        let snapshot = Snapshot {
            gap_ms: self.geometry.gap,
            max_size_ms: self.geometry.max_size,
            watermark_ms: self.watermark,
            schemas: schemas.iter().map(|schema| Schema::clone(schema)).collect(),
            devices,
        };
        serde_json::to_vec(&snapshot)
            .map(Some)
            .map_err(|error| ComponentError::Internal(format!("session window snapshot: {error}")))
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), ComponentError> {
        let invalid =
            |what: &str| ComponentError::Internal(format!("session window snapshot: {what}"));
        let snapshot: Snapshot =
            serde_json::from_slice(state).map_err(|error| invalid(&error.to_string()))?;
        if snapshot.gap_ms != self.geometry.gap || snapshot.max_size_ms != self.geometry.max_size {
            return Err(ComponentError::Config(format!(
                "the session window snapshot was taken with gap_ms = {} and max_size_ms = {:?}, \
                 not {} and {:?}",
                snapshot.gap_ms, snapshot.max_size_ms, self.geometry.gap, self.geometry.max_size
            )));
        }
        let schemas: Vec<Arc<Schema>> = snapshot.schemas.into_iter().map(Arc::new).collect();
        // Checked in full before anything changes, so a bad snapshot leaves the state as it was.
        let mut restored = Vec::new();
        for device in snapshot.devices {
            if device.device.worker(self.workers) != self.worker {
                continue;
            }
            let schema = schemas.get(device.schema).ok_or_else(|| invalid("unknown schema"))?;
            if device.labels.len() != device.times.len()
                || device.values.len() != device.times.len() * schema.len()
            {
                return Err(invalid("values do not match times and schema"));
            }
            restored.push((device, Arc::clone(schema)));
        }
        // Several snapshots (one per instance that took the checkpoint) merge; each instance
        // keeps the devices it owns now.
        for (device, schema) in restored {
            let width = schema.len();
            let open =
                self.open.entry(device.device).or_insert_with(|| Open::new(Arc::clone(&schema)));
            if open.schema != schema {
                return Err(invalid("two snapshots disagree on a device's features"));
            }
            for (step, (time, label)) in device.times.iter().zip(&device.labels).enumerate() {
                let row: Vec<f32> = device.values[step * width..(step + 1) * width]
                    .iter()
                    .map(|bits| f32::from_bits(*bits))
                    .collect();
                open.insert(*time, &row, *label, &self.geometry);
            }
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

/// The state of a [`SessionWindowOperator`] as checkpointed (JSON).
#[derive(Debug, Serialize, Deserialize)]
struct Snapshot {
    gap_ms: EventTime,
    max_size_ms: Option<EventTime>,
    watermark_ms: EventTime,
    schemas: Vec<Schema>,
    devices: Vec<SnapshotDevice>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SnapshotDevice {
    device: DeviceId,
    schema: usize,
    times: Vec<EventTime>,
    /// `f32::to_bits` of each value (JSON has no NaN).
    values: Vec<u32>,
    labels: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use tidewatch_api::{LABEL_ANOMALY, LABEL_NORMAL};

    use super::*;

    fn operator(gap: u64, max: Option<u64>) -> SessionWindowOperator {
        SessionWindowOperator::new(
            &WindowConfig::session(gap, max),
            &ComponentContext::for_test("sessions", "window"),
        )
        .expect("valid config")
    }

    fn schema() -> Arc<Schema> {
        Arc::new(Schema::new(["a"]))
    }

    fn batch(readings: &[(&str, EventTime)]) -> Batch {
        let mut batch = ReadingBatch::new(schema());
        for (device, time) in readings {
            batch.push(DeviceId::intern(device), *time, &[*time as f32], LABEL_NORMAL);
        }
        Batch::Readings(batch)
    }

    /// (device, start, end, times) of the windows emitted since the last call.
    fn sessions(out: &mut Outputs) -> Vec<(String, EventTime, EventTime, Vec<EventTime>)> {
        out.take_main()
            .into_iter()
            .flat_map(|batch| match batch {
                Batch::Windows(windows) => windows,
                other => panic!("unexpected {other:?}"),
            })
            .map(|w| (w.device.name().to_string(), w.start_ms, w.end_ms, w.times))
            .collect()
    }

    fn late_times(out: &mut Outputs) -> Vec<EventTime> {
        out.take_late().into_iter().flat_map(|batch| batch.times).collect()
    }

    #[test]
    fn a_gap_ends_a_session_and_the_watermark_closes_it_at_its_end() {
        let mut op = operator(10, None);
        let mut out = Outputs::new("sessions");
        op.process_batch(
            batch(&[("s1", 0), ("s1", 5), ("s1", 14), ("s1", 24), ("s1", 40)]),
            &mut out,
        );
        // 0, 5, 14 are each less than 10 apart; 24 is exactly 10 after 14: a new session.
        op.on_watermark(23, &mut out);
        assert!(sessions(&mut out).is_empty());
        op.on_watermark(24, &mut out);
        assert_eq!(sessions(&mut out), [("s1".to_owned(), 0, 24, vec![0, 5, 14])]);
        op.on_watermark(EventTime::MAX, &mut out);
        assert_eq!(
            sessions(&mut out),
            [("s1".to_owned(), 24, 34, vec![24]), ("s1".to_owned(), 40, 50, vec![40])]
        );
        assert_eq!(op.open_readings(), 0);
    }

    #[test]
    fn devices_have_sessions_of_their_own_emitted_in_end_then_device_order() {
        let mut op = operator(10, None);
        let mut out = Outputs::new("sessions");
        let first = DeviceId::intern("order-a");
        let second = DeviceId::intern("order-b");
        op.process_batch(
            batch(&[("order-b", 0), ("order-a", 3), ("order-a", 8), ("order-b", 8)]),
            &mut out,
        );
        op.on_watermark(EventTime::MAX, &mut out);
        let order: Vec<(EventTime, String)> =
            sessions(&mut out).into_iter().map(|(device, _, end, _)| (end, device)).collect();
        assert!(first < second);
        assert_eq!(order, [(18, "order-a".to_owned()), (18, "order-b".to_owned())]);
    }

    #[test]
    fn an_out_of_order_reading_that_is_not_late_bridges_two_sessions() {
        let mut op = operator(10, None);
        let mut out = Outputs::new("sessions");
        op.process_batch(batch(&[("b1", 0), ("b1", 18)]), &mut out);
        op.on_watermark(9, &mut out);
        assert!(sessions(&mut out).is_empty(), "[0, 10) is still open at 9");
        // 9 is 9 after 0 and 9 before 18: the two sessions merge into one.
        op.process_batch(batch(&[("b1", 9)]), &mut out);
        assert!(late_times(&mut out).is_empty());
        op.on_watermark(EventTime::MAX, &mut out);
        assert_eq!(sessions(&mut out), [("b1".to_owned(), 0, 28, vec![0, 9, 18])]);
    }

    #[test]
    fn a_reading_whose_own_session_is_closed_is_late_and_closed_sessions_stay_closed() {
        let mut op = operator(10, None);
        let mut out = Outputs::new("sessions");
        op.process_batch(batch(&[("l1", 0), ("l1", 30)]), &mut out);
        op.on_watermark(15, &mut out);
        assert_eq!(sessions(&mut out), [("l1".to_owned(), 0, 10, vec![0])]);
        // 4: its session [4, 14) ended at 14 <= 15: late. 6: [6, 16) is still open, but the
        // session of 0 was emitted: it starts a session of its own.
        op.process_batch(batch(&[("l1", 4), ("l1", 6)]), &mut out);
        assert_eq!(late_times(&mut out), [4]);
        op.on_watermark(EventTime::MAX, &mut out);
        assert_eq!(
            sessions(&mut out),
            [("l1".to_owned(), 6, 16, vec![6]), ("l1".to_owned(), 30, 40, vec![30])]
        );

        // The producer's watermark decides too, before this operator's `on_watermark`: the
        // session that ended by then is emitted first, and the reading does not join it.
        let mut op = operator(10, None);
        op.process_batch(batch(&[("l2", 0)]), &mut out);
        out.set_batch_watermark(12);
        op.process_batch(batch(&[("l2", 1), ("l2", 5)]), &mut out);
        out.set_batch_watermark(EventTime::MIN);
        assert_eq!(late_times(&mut out), [1]);
        assert_eq!(sessions(&mut out), [("l2".to_owned(), 0, 10, vec![0])]);
        op.on_watermark(EventTime::MAX, &mut out);
        assert_eq!(sessions(&mut out), [("l2".to_owned(), 5, 15, vec![5])]);
    }

    #[test]
    fn max_size_cuts_a_long_session() {
        let mut op = operator(10, Some(20));
        let mut out = Outputs::new("sessions");
        let times: Vec<(&str, EventTime)> = (0..9).map(|step| ("m1", step * 5)).collect();
        op.process_batch(batch(&times), &mut out);
        // Readings every 5 ms never leave a gap of 10: only the maximum of 20 ends sessions.
        op.on_watermark(20, &mut out);
        assert_eq!(sessions(&mut out), [("m1".to_owned(), 0, 20, vec![0, 5, 10, 15])]);
        op.on_watermark(EventTime::MAX, &mut out);
        assert_eq!(
            sessions(&mut out),
            [("m1".to_owned(), 20, 40, vec![20, 25, 30, 35]), ("m1".to_owned(), 40, 50, vec![40])]
        );
        // A maximum shorter than the gap: a lone reading's session lasts the maximum.
        let mut op = operator(10, Some(4));
        op.process_batch(batch(&[("m2", 0), ("m2", 3), ("m2", 4)]), &mut out);
        op.on_watermark(EventTime::MAX, &mut out);
        assert_eq!(
            sessions(&mut out),
            [("m2".to_owned(), 0, 4, vec![0, 3]), ("m2".to_owned(), 4, 8, vec![4])]
        );
    }

    #[test]
    fn min_steps_labels_and_values_follow_the_steps() {
        let config = WindowConfig { min_steps: 2, ..WindowConfig::session(10, None) };
        let mut op =
            SessionWindowOperator::new(&config, &ComponentContext::for_test("s", "window"))
                .expect("valid");
        let mut out = Outputs::new("sessions");
        let mut readings = ReadingBatch::new(schema());
        readings.push(DeviceId::intern("v1"), 7, &[7.0], LABEL_ANOMALY);
        readings.push(DeviceId::intern("v1"), 2, &[2.0], LABEL_NORMAL);
        readings.push(DeviceId::intern("v1"), 50, &[50.0], LABEL_NORMAL);
        op.process_batch(Batch::Readings(readings), &mut out);
        op.on_watermark(EventTime::MAX, &mut out);
        let windows: Vec<Window> = out
            .take_main()
            .into_iter()
            .flat_map(|batch| match batch {
                Batch::Windows(windows) => windows,
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(windows.len(), 1);
        assert_eq!(windows[0].times, [2, 7]);
        assert_eq!(windows[0].values, [2.0, 7.0]);
        assert_eq!(windows[0].label, LABEL_ANOMALY);
        assert_eq!(out.take_discarded(), [("too_few_steps", 1)]);
    }

    proptest::proptest! {
        /// The first session kept up to date across inserts is the one computed afresh.
        #[test]
        fn the_cached_first_session_is_the_computed_one(
            gap in 1i64..20,
            max in proptest::option::of(1i64..40),
            times in proptest::collection::vec(0i64..100, 1..40),
        ) {
            let geometry = SessionGeometry { gap, max_size: max, min_steps: 1 };
            let mut open = Open::new(schema());
            for time in times {
                open.first_session(&geometry);
                open.insert(time, &[0.0], LABEL_NORMAL, &geometry);
                let cached = open.first;
                open.first = None;
                let computed = open.first_session(&geometry);
                if cached.is_some() {
                    proptest::prop_assert_eq!(cached, computed, "{:?}", open.times);
                }
            }
        }
    }

    #[test]
    fn readings_appended_in_order_keep_the_first_session_without_a_scan() {
        let geometry = SessionGeometry { gap: 10, max_size: Some(100), min_steps: 1 };
        let mut open = Open::new(schema());
        open.insert(0, &[0.0], LABEL_NORMAL, &geometry);
        assert_eq!(open.first_session(&geometry), Some((10, 1)));
        for (step, time) in [5, 12, 20].into_iter().enumerate() {
            open.insert(time, &[0.0], LABEL_NORMAL, &geometry);
            assert_eq!(open.first, Some((time + 10, step + 2)), "kept, not dropped");
        }
        open.insert(50, &[0.0], LABEL_NORMAL, &geometry);
        assert_eq!(open.first, Some((30, 4)), "a reading after a gap leaves it as it was");
    }

    #[test]
    fn out_of_range_times_are_errors() {
        let mut op = operator(10, None);
        let mut out = Outputs::new("sessions");
        op.process_batch(batch(&[("e1", EventTime::MAX), ("e1", 1)]), &mut out);
        assert_eq!(out.take_errors().len(), 1);
        assert_eq!(op.open_readings(), 1);
    }

    #[test]
    fn snapshot_and_restore_keep_open_sessions() {
        let mut op = operator(10, Some(100));
        let mut out = Outputs::new("sessions");
        op.process_batch(batch(&[("r1", 3), ("r1", 0), ("r2", 50)]), &mut out);
        op.on_watermark(2, &mut out);
        let state = op.snapshot().expect("snapshot").expect("state");

        let mut restored = operator(10, Some(100));
        restored.restore(&state).expect("restore");
        assert_eq!(restored.watermark(), 2);
        assert_eq!(restored.open_readings(), 3);
        restored.process_batch(batch(&[("r1", 12)]), &mut out);
        restored.on_watermark(EventTime::MAX, &mut out);
        assert_eq!(
            sessions(&mut out),
            [("r1".to_owned(), 0, 22, vec![0, 3, 12]), ("r2".to_owned(), 50, 60, vec![50])]
        );
        assert!(operator(10, None).restore(&state).is_err());
        assert!(operator(10, Some(100)).restore(b"{").is_err());
    }
}
