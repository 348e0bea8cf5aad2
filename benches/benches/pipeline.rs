//! The whole engine end to end: `pipelines/bench.toml` (simulator, CSV, 1000 pumps ->
//! `normalize` -> 10 s tumbling `window` -> `stats` -> `blackhole`) loaded with
//! `tidewatch_engine::load_str` and run with `tidewatch_engine::run` on one and on two
//! workers. Each iteration is a whole run: timely workers started, the dataflow built, every
//! reading generated, processed and dropped, the workers joined. Throughput is in readings.
//!
//! Under `cargo bench` a run has 1,000,000 readings; under `cargo test` (a debug build, one
//! iteration) 20,000.
//!
//! `cargo bench -p tidewatch-benches --bench pipeline`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tidewatch_benches::{SLOW_SAMPLING, bench_pipeline, sized, slow_criterion_config};
use tidewatch_engine::{RunContext, run};

/// `pipeline/workers_{1,2}`.
fn pipeline(c: &mut Criterion) {
    let count = sized(1_000_000, 20_000);
    let pipeline = bench_pipeline(count);
    let mut group = c.benchmark_group("pipeline");
    group.sampling_mode(SLOW_SAMPLING);
    group.throughput(Throughput::Elements(count as u64));
    for workers in [1, 2] {
        group.bench_function(format!("workers_{workers}"), |b| {
            b.iter(|| {
                let context = RunContext::default();
                run(&pipeline, workers, &context).expect("the bench pipeline runs");
                context
            });
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = slow_criterion_config();
    targets = pipeline
}
criterion_main!(benches);
