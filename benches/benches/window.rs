//! Windowing and scoring pre-normalized readings of 1000 pumps (one reading a second each, in
//! batches of 1024): tumbling 10 s and sliding 30 s / 10 s `window`, and `window` followed by
//! `stats`. After every batch the watermark advances to the batch's greatest event time (as
//! `normalize` with `out_of_orderness_ms = 0` would move it), so windows close as the data
//! goes; the run ends with the final watermark. Throughput is in readings. `window_count`:
//! count windows of 60 readings (slide 60 and 10) followed by `stats`, over the same readings.
//!
//! `cargo bench -p tidewatch-benches --bench window`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tidewatch_api::{Batch, ComponentContext, EventTime, Outputs, ReadingBatch, Transform};
use tidewatch_benches::{criterion_config, reading_batches, sized, total_len};
use tidewatch_operators::{
    CountWindowOperator, StatsConfig, StatsDetector, WindowConfig, WindowOperator,
};

/// Drives a fresh window operator (and optionally `stats`) over `batches` the way the engine
/// does; returns the number of windows and of scores produced.
fn run(batches: &[ReadingBatch], config: &WindowConfig, with_stats: bool) -> (usize, usize) {
    let ctx = ComponentContext::for_test("windows", "window");
    let mut window = WindowOperator::new(config, &ctx).expect("valid window config");
    let mut stats = with_stats.then(|| {
        StatsDetector::new(&StatsConfig::default(), &ComponentContext::for_test("stats", "stats"))
            .expect("valid stats config")
    });
    let mut out = Outputs::new("windows");
    let mut scored = Outputs::new("stats");
    let (mut windows, mut scores) = (0, 0);
    let mut watermark = EventTime::MIN;
    let mut drain = |out: &mut Outputs, stats: &mut Option<StatsDetector>| {
        for batch in out.take_main() {
            windows += batch.len();
            match stats.as_mut() {
                Some(stats) => {
                    stats.process_batch(batch, &mut scored);
                    for batch in scored.take_main() {
                        scores += black_box(batch).len();
                    }
                }
                None => drop(black_box(batch)),
            }
        }
    };
    for batch in batches {
        out.set_batch_watermark(watermark);
        window.add_readings(batch, &mut out);
        if let Some(max) = batch.max_time()
            && max > watermark
        {
            watermark = max;
            window.on_watermark(watermark, &mut out);
        }
        drain(&mut out, &mut stats);
    }
    window.on_watermark(EventTime::MAX, &mut out);
    drain(&mut out, &mut stats);
    assert!(out.take_late().is_empty() && out.take_errors().is_empty());
    (windows, scores)
}

/// `window/{tumbling_10s,sliding_30s_10s}` and `window_stats/tumbling_10s`.
fn windows(c: &mut Criterion) {
    // 200 s of event time for 1000 pumps: 20 tumbling windows per pump.
    let batches = reading_batches(sized(200_000, 10_000));
    let readings = total_len(&batches, ReadingBatch::len);
    let tumbling = WindowConfig::tumbling(10_000);
    let sliding = WindowConfig::sliding(30_000, 10_000);

    let mut group = c.benchmark_group("window");
    group.throughput(Throughput::Elements(readings));
    group.bench_function("tumbling_10s", |b| b.iter(|| run(&batches, &tumbling, false)));
    group.bench_function("sliding_30s_10s", |b| b.iter(|| run(&batches, &sliding, false)));
    group.finish();

    let mut group = c.benchmark_group("window_stats");
    group.throughput(Throughput::Elements(readings));
    group.bench_function("tumbling_10s", |b| b.iter(|| run(&batches, &tumbling, true)));
    group.bench_function("sliding_30s_10s", |b| b.iter(|| run(&batches, &sliding, true)));
    group.finish();
}

/// Drives a fresh count window operator and `stats` over `batches` like [`run`] (the
/// operator takes owned batches: each is cloned in, in both the measured versions); returns
/// the number of scores.
fn run_count(batches: &[ReadingBatch], config: &WindowConfig) -> usize {
    let mut window = CountWindowOperator::new(config).expect("valid count window config");
    let mut stats =
        StatsDetector::new(&StatsConfig::default(), &ComponentContext::for_test("stats", "stats"))
            .expect("valid stats config");
    let mut out = Outputs::new("windows");
    let mut scored = Outputs::new("stats");
    let mut scores = 0;
    let mut watermark = EventTime::MIN;
    let mut drain = |out: &mut Outputs| {
        for batch in out.take_main() {
            stats.process_batch(batch, &mut scored);
            for batch in scored.take_main() {
                scores += black_box(batch).len();
            }
        }
    };
    for batch in batches {
        out.set_batch_watermark(watermark);
        window.process_batch(Batch::Readings(batch.clone()), &mut out);
        if let Some(max) = batch.max_time()
            && max > watermark
        {
            watermark = max;
            window.on_watermark(watermark, &mut out);
        }
        drain(&mut out);
    }
    window.on_watermark(EventTime::MAX, &mut out);
    drain(&mut out);
    assert!(out.take_late().is_empty() && out.take_errors().is_empty());
    scores
}

/// `window_count/{count_60,count_60_slide_10}`: count windows and `stats`.
fn count_windows(c: &mut Criterion) {
    let batches = reading_batches(sized(200_000, 10_000));
    let readings = total_len(&batches, ReadingBatch::len);
    let mut group = c.benchmark_group("window_count");
    group.throughput(Throughput::Elements(readings));
    for (name, slide) in [("count_60", 60), ("count_60_slide_10", 10)] {
        let config = WindowConfig::count(60, slide);
        group.bench_function(name, |b| b.iter(|| run_count(&batches, &config)));
    }
    group.finish();
}

/// `stats/tumbling_10s`: `stats` alone over the windows of the tumbling run (built once);
/// throughput in the readings those windows hold, comparable with the rest of this file.
fn stats(c: &mut Criterion) {
    let batches = reading_batches(sized(200_000, 10_000));
    let ctx = ComponentContext::for_test("windows", "window");
    let mut window =
        WindowOperator::new(&WindowConfig::tumbling(10_000), &ctx).expect("valid window config");
    let mut out = Outputs::new("windows");
    for batch in &batches {
        window.add_readings(batch, &mut out);
    }
    window.on_watermark(EventTime::MAX, &mut out);
    let windows: Vec<Batch> = out.take_main();
    let readings: usize = windows
        .iter()
        .map(|batch| match batch {
            Batch::Windows(windows) => windows.iter().map(|window| window.times.len()).sum(),
            _ => 0,
        })
        .sum();

    let mut group = c.benchmark_group("stats");
    group.throughput(Throughput::Elements(readings as u64));
    group.bench_function("tumbling_10s", |b| {
        b.iter(|| {
            let mut stats = StatsDetector::new(
                &StatsConfig::default(),
                &ComponentContext::for_test("stats", "stats"),
            )
            .expect("valid stats config");
            let mut scores = 0;
            for batch in &windows {
                if let Batch::Windows(windows) = batch {
                    for window in windows {
                        scores += black_box(stats.score_window(window)).values.len();
                    }
                }
            }
            scores
        });
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = criterion_config();
    targets = windows, count_windows, stats
}
criterion_main!(benches);
