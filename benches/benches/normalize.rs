//! Parsing and normalizing raw messages: `Normalize::normalize_batch` over simulated JSON and
//! CSV batches (1000 pumps, 1024 messages a batch), and, for comparison, the simulator that
//! generates them. Throughput is in messages.
//!
//! `cargo bench -p tidewatch-benches --bench normalize`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tidewatch_api::{Outputs, RawBatch};
use tidewatch_benches::{
    criterion_config, normalizer, raw_batches, simulate, simulator_config, sized, total_len,
};
use tidewatch_connectors::SimulatorFormat;

const FORMATS: [(&str, SimulatorFormat); 2] =
    [("json", SimulatorFormat::Json), ("csv", SimulatorFormat::Csv)];

/// `normalize/{json,csv}`: raw batches to reading batches, one operator reused throughout
/// (its device cache warm, as in a long run).
fn normalize(c: &mut Criterion) {
    let messages = sized(100 * 1_024, 4 * 1_024);
    let mut group = c.benchmark_group("normalize");
    for (name, format) in FORMATS {
        let batches: Vec<RawBatch> = raw_batches(format, messages);
        group.throughput(Throughput::Elements(total_len(&batches, RawBatch::len)));
        let mut operator = normalizer();
        let mut out = Outputs::new("readings");
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut readings = 0;
                for raw in &batches {
                    operator.normalize_batch(raw, &mut out);
                    for batch in out.take_main() {
                        readings += black_box(batch).len();
                    }
                }
                assert!(out.take_errors().is_empty());
                readings
            });
        });
    }
    group.finish();
}

/// `simulate/{json,csv}`: the simulator source generating those messages (pump physics and
/// payload formatting), which the end-to-end benchmark pays for too.
fn simulator(c: &mut Criterion) {
    let messages = sized(100 * 1_024, 4 * 1_024);
    let mut group = c.benchmark_group("simulate");
    group.throughput(Throughput::Elements(messages as u64));
    for (name, format) in FORMATS {
        let config = simulator_config(format, messages);
        group.bench_function(name, |b| b.iter(|| black_box(simulate(&config))));
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = criterion_config();
    targets = normalize, simulator
}
criterion_main!(benches);
