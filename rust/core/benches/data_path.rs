//! `cargo bench`: the data path on the synthetic mix the docs use (prompt 20–400 tokens,
//! completions 10–500, batch 8, vocab 49,152).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use epsdpo_core::collate::{collate, CollateConfig, Layout};
use epsdpo_core::sampler::{BatchSampler, SamplerConfig, SamplerMode};
use epsdpo_core::store::{PairColumns, PreferenceStore};
use std::hint::black_box;

const PAIRS: usize = 4096;
const BATCH: usize = 8;

struct Lcg(u64);
impl Lcg {
    fn next(&mut self, lo: usize, hi: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        lo + ((self.0 >> 33) as usize) % (hi - lo + 1)
    }
}

/// Flat columns for `PAIRS` synthetic pairs.
fn columns() -> [(Vec<u32>, Vec<u64>); 3] {
    let mut rng = Lcg(7);
    let ranges = [(20, 400), (10, 500), (10, 500)];
    ranges.map(|(lo, hi)| {
        let mut tokens = Vec::new();
        let mut offsets = vec![0u64];
        for _ in 0..PAIRS {
            let n = rng.next(lo, hi);
            tokens.extend((0..n).map(|_| rng.next(0, 49_151) as u32));
            offsets.push(tokens.len() as u64);
        }
        (tokens, offsets)
    })
}

fn build_store(cols: &[(Vec<u32>, Vec<u64>); 3]) -> PreferenceStore {
    let mut store = PreferenceStore::new(Some(49_152)).expect("store");
    store
        .append(PairColumns { prompt: (&cols[0].0, &cols[0].1), chosen: (&cols[1].0, &cols[1].1), rejected: (&cols[2].0, &cols[2].1), ids: None })
        .expect("valid synthetic pairs");
    store
}

fn bench(c: &mut Criterion) {
    let cols = columns();
    let store = build_store(&cols);
    let batches: Vec<Vec<u32>> = (0..PAIRS as u32).collect::<Vec<_>>().chunks(BATCH).map(<[u32]>::to_vec).collect();

    let mut group = c.benchmark_group("collate");
    group.throughput(Throughput::Elements(BATCH as u64));
    for layout in Layout::ALL {
        let config = CollateConfig { layout, ..Default::default() };
        let mut k = 0;
        group.bench_function(layout.name(), |b| {
            b.iter(|| {
                k = (k + 1) % batches.len();
                black_box(collate(&store, &batches[k], &config).expect("collate"))
            })
        });
    }
    group.finish();

    let (prompt, chosen, rejected) = store.lengths();
    let chosen: Vec<u32> = (0..PAIRS).map(|i| prompt[i] + chosen[i]).collect();
    let rejected: Vec<u32> = (0..PAIRS).map(|i| prompt[i] + rejected[i]).collect();
    let mut group = c.benchmark_group("sampler");
    group.throughput(Throughput::Elements(PAIRS as u64));
    for (name, mode) in [
        ("shuffle_epoch", SamplerMode::Shuffle),
        ("length_grouped_epoch", SamplerMode::LengthGrouped { mega_batch_mult: 50 }),
        ("token_budget_epoch", SamplerMode::TokenBudget { max_tokens: 16_384, padded: false, mega_batch_mult: 50 }),
    ] {
        let config = SamplerConfig { batch_size: BATCH, mode, seed: 0, world_size: 1, rank: 0, drop_last: false };
        let sampler = BatchSampler::new(chosen.clone(), rejected.clone(), config).expect("sampler");
        let mut epoch = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                epoch += 1;
                black_box(sampler.epoch_batches(epoch).expect("batches"))
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("store");
    group.throughput(Throughput::Elements(PAIRS as u64));
    group.sample_size(20);
    group.bench_function("append_4096_pairs", |b| b.iter(|| black_box(build_store(&cols))));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bench.store");
    store.save(&path).expect("save");
    group.bench_function("load_4096_pairs", |b| b.iter(|| black_box(PreferenceStore::load(&path).expect("load"))));
    group.bench_function("save_4096_pairs", |b| b.iter_batched(|| (), |_| store.save(&path).expect("save"), BatchSize::SmallInput));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
