//! What checkpoints cost: `pipelines/bench.toml` (simulator, 1000 pumps -> `normalize` ->
//! 10 s `window` -> `stats` -> `blackhole`) on two workers with checkpoints off and with a
//! checkpoint every second into a local folder, side by side in the same run. Throughput is
//! in readings; the aim is at least 90 % of the throughput without checkpoints.
//!
//! A run has to last several checkpoint intervals: under `cargo bench` 8,000,000 readings
//! (a few seconds each); under `cargo test` (a debug build, one iteration) 20,000.
//!
//! `cargo bench -p tidewatch-benches --bench checkpoints`

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tidewatch_benches::{SLOW_SAMPLING, bench_pipeline_with, sized};
use tidewatch_engine::{RunContext, run};

/// `checkpoints/{off,every_1s}`.
fn checkpoints(c: &mut Criterion) {
    let count = sized(8_000_000, 20_000);
    let mut group = c.benchmark_group("checkpoints");
    group.sampling_mode(SLOW_SAMPLING);
    group.throughput(Throughput::Elements(count as u64));
    let folder = tempfile::tempdir().expect("a temporary folder");
    for (name, settings) in [
        ("off", String::new()),
        (
            "every_1s",
            format!(
                "checkpoint_interval_secs = 1\ncheckpoint_url = \"{}\"",
                folder.path().join("ck").display()
            ),
        ),
    ] {
        let pipeline = bench_pipeline_with(count, &settings);
        group.bench_function(name, |b| {
            b.iter(|| {
                // Each run starts afresh (a checkpoint of the previous run would be restored).
                let _ = std::fs::remove_dir_all(folder.path().join("ck"));
                let context = RunContext::default();
                run(&pipeline, 2, &context).expect("the bench pipeline runs");
                context
            });
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(60))
        .sample_size(10)
        .without_plots();
    targets = checkpoints
}
criterion_main!(benches);
