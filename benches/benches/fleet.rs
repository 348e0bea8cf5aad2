//! The fleet view's hot paths at 100,000 catalogued devices (#14), side by side:
//!
//! - `catalog_load`: a CSV catalog (50 sites, 5 asset types, an owner per site, a free label,
//!   as `benches/fleet.sh` writes it) `split` into its cells only (the floor of reading it),
//!   `parse`d into rows, and `taken_in`: parsed, diffed against the empty catalog and applied
//!   by `enrich` and by `fleet` (`require_catalog`), what a pipeline does when it starts.
//!   Throughput in rows.
//! - `scores`: scores of the catalogued devices (round robin, in batches of 100, a wave and
//!   noise, some anomalous) through `enrich` alone and through `enrich` then `fleet` (top 10),
//!   against the `floor`: the same batches moved and dropped. Throughput in scores.
//!
//! `cargo bench -p tidewatch-benches --bench fleet`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use tidewatch_api::catalog::{CatalogFormat, diff_catalogs, parse_catalog};
use tidewatch_api::codec::csv::{Delimiter, split_record};
use tidewatch_api::{Batch, ComponentContext, DeviceId, Outputs, Schema, Score, Transform};
use tidewatch_benches::{criterion_config, sized};
use tidewatch_operators::{Enrich, Fleet, FleetConfig};

/// A catalog of `devices` rows, as `benches/fleet.sh` writes it.
fn catalog_csv(devices: usize) -> Vec<u8> {
    let mut text = String::from("device,site,asset,owner,line\n");
    for device in 0..devices {
        let (site, asset, line) = (device % 50, device % 5, device % 7);
        text.push_str(&format!("dev-{device:06},site-{site},asset-{asset},ops-{site},{line}\n"));
    }
    text.into_bytes()
}

/// `rounds` scores of each of `devices` devices, round robin, in batches of 100.
fn score_batches(devices: usize, rounds: usize) -> Vec<Vec<Score>> {
    let columns = Arc::new(Schema::new(Vec::<String>::new()));
    let names: Vec<DeviceId> =
        (0..devices).map(|device| DeviceId::intern(&format!("dev-{device:06}"))).collect();
    let detector: Arc<str> = Arc::from("scores");
    let version: Arc<str> = Arc::from("1");
    let mut batches = Vec::new();
    let mut batch = Vec::with_capacity(100);
    for index in 0..devices * rounds {
        let (device, round) = (index % devices, index / devices);
        let noise = (index as u64 * 2_654_435_761 % 10_007) as f32 / 5_003.5;
        let score = (round % 10) as f32 / 10.0 + noise;
        let anomaly = (device * 7 + round) % 97 == 0;
        let end_ms = 1_700_000_000_000 + index as i64;
        batch.push(Score {
            device: names[device],
            start_ms: end_ms - 10,
            end_ms,
            detector: Arc::clone(&detector),
            version: Arc::clone(&version),
            score: if anomaly { score + 25.0 } else { score },
            threshold: Some(3.0),
            anomaly,
            label: 0,
            columns: Arc::clone(&columns),
            values: Vec::new(),
            labels: Default::default(),
        });
        if batch.len() == 100 {
            batches.push(std::mem::replace(&mut batch, Vec::with_capacity(100)));
        }
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    batches
}

/// `enrich` and `fleet` with the catalog of `text` taken in; returns the number of rows.
fn take_in(text: &[u8], enrich: &mut Enrich, fleet: Option<&mut Fleet>) -> usize {
    let parsed = parse_catalog(text, CatalogFormat::Csv).expect("a catalog");
    let updates = diff_catalogs(&[], &parsed.rows);
    let mut out = Outputs::new("enrich");
    enrich.process_batch(Batch::Catalog(updates.clone()), &mut out);
    if let Some(fleet) = fleet {
        let mut out = Outputs::new("fleet");
        fleet.process_batch(Batch::Catalog(updates), &mut out);
    }
    parsed.rows.len()
}

fn enrich() -> Enrich {
    Enrich::new(&ComponentContext::for_test("enrich", "enrich"))
}

fn fleet() -> Fleet {
    let config = FleetConfig { top: 10, require_catalog: true };
    Fleet::new(&config, &ComponentContext::for_test("fleet", "fleet"))
}

/// `catalog_load/{split,parse,taken_in}`.
fn catalog_load(c: &mut Criterion) {
    let devices = sized(100_000, 5_000);
    let text = catalog_csv(devices);
    let mut group = c.benchmark_group("catalog_load");
    group.throughput(Throughput::Elements(devices as u64));
    group.bench_function("split", |b| {
        b.iter(|| {
            let mut cells = 0usize;
            for line in text.split(|byte| *byte == b'\n').skip(1) {
                let _ = split_record(line, Delimiter::COMMA, |_, cell| {
                    cells += black_box(cell).len();
                    true
                });
            }
            cells
        })
    });
    group.bench_function("parse", |b| {
        b.iter(|| parse_catalog(&text, CatalogFormat::Csv).map(|parsed| parsed.rows.len()))
    });
    group.bench_function("taken_in", |b| {
        b.iter_batched(
            || (enrich(), fleet()),
            |(mut enrich, mut fleet)| take_in(&text, &mut enrich, Some(&mut fleet)),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

/// `scores/{floor,enrich,enrich_fleet}`.
fn scores(c: &mut Criterion) {
    let devices = sized(100_000, 5_000);
    let text = catalog_csv(devices);
    let batches = score_batches(devices, 2);
    let scores = batches.iter().map(Vec::len).sum::<usize>() as u64;
    let mut group = c.benchmark_group("scores");
    group.throughput(Throughput::Elements(scores));
    group.bench_function("floor", |b| {
        b.iter_batched(
            || batches.clone(),
            |batches| batches.into_iter().map(|batch| black_box(batch).len()).sum::<usize>(),
            BatchSize::PerIteration,
        )
    });
    group.bench_function("enrich", |b| {
        b.iter_batched(
            || {
                let mut enrich = enrich();
                take_in(&text, &mut enrich, None);
                (enrich, batches.clone())
            },
            |(mut enrich, batches)| {
                let mut out = Outputs::new("enrich");
                let mut matched = 0;
                for batch in batches {
                    enrich.process_batch(Batch::Scores(batch), &mut out);
                    matched +=
                        out.take_named().into_iter().map(|(_, batch)| batch.len()).sum::<usize>();
                }
                assert_eq!(matched as u64, scores);
                matched
            },
            BatchSize::PerIteration,
        )
    });
    group.bench_function("enrich_fleet", |b| {
        b.iter_batched(
            || {
                let (mut enrich, mut fleet) = (enrich(), fleet());
                take_in(&text, &mut enrich, Some(&mut fleet));
                (enrich, fleet, batches.clone())
            },
            |(mut enrich, mut fleet, batches)| {
                let mut out = Outputs::new("enrich");
                let mut rolled = Outputs::new("fleet");
                for batch in batches {
                    enrich.process_batch(Batch::Scores(batch), &mut out);
                    for (port, batch) in out.take_named() {
                        if port == 0 {
                            fleet.process_batch(batch, &mut rolled);
                        }
                    }
                    black_box(rolled.take_main());
                }
                assert_eq!(fleet.view().devices, devices as u64);
                fleet.view().anomalous
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = criterion_config();
    targets = catalog_load, scores
}
criterion_main!(benches);
