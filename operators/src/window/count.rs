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

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use tidewatch_api::{
    Batch, ConfigError, DeviceId, EventTime, Outputs, ReadingBatch, Schema, Transform, Window,
};

use super::config::{WindowConfig, count_geometry};

#[derive(Debug)]
struct Pending {
    time: EventTime,
    values: Vec<f32>,
    label: u8,
}

#[derive(Debug)]
struct DeviceHistory {
    schema: Arc<Schema>,
    /// Readings not yet final, in arrival order.
    pending: Vec<Pending>,
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
    waiting: BTreeSet<DeviceId>,
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
            history.pending.push(Pending {
                time: reading.time_ms,
                values: reading.values.to_vec(),
                label: reading.label,
            });
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
            history.pending.sort_by_key(|pending| pending.time);
            let ready =
                history.pending.iter().take_while(|pending| pending.time <= watermark).count();
            let width = width_of(history);
            for pending in history.pending.drain(..ready) {
                history.times.push_back(pending.time);
                history.values.extend(pending.values.iter().copied());
                history.labels.push_back(pending.label);
                if history.times.len() > self.size {
                    history.times.pop_front();
                    history.labels.pop_front();
                    for _ in 0..width {
                        history.values.pop_front();
                    }
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
    fn process_batch(&mut self, batch: Batch, out: &mut Outputs) {
        match batch {
            Batch::Readings(readings) => self.add(&readings, out),
            other => out.error(
                "unsupported_format",
                format!("window reads readings, got a batch of {}", other.kind()),
                None,
                None,
            ),
        }
    }

    fn on_watermark(&mut self, watermark_ms: EventTime, out: &mut Outputs) {
        if watermark_ms <= self.watermark {
            return;
        }
        self.watermark = watermark_ms;
        self.finalise(watermark_ms, out);
    }
}

#[cfg(test)]
mod tests {
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
}
