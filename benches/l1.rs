//! The cost of an L1 lookup, the first thing a cacheable request does after keying: a hit on a
//! 1 KiB entry among 10,000, and a miss. Both update the L1 hit/miss counters, as in the proxy.
//!
//! Run with: `cargo bench --bench l1 -- --warm-up-time 1 --measurement-time 2`

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use corral::l1::L1;
use corral::metrics::Metrics;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// Entries held while looking up, so the lookup is not into an empty table.
const ENTRIES: u64 = 10_000;

fn bench(c: &mut Criterion) {
    let l1 = L1::new(64 << 20, Metrics::new());
    for n in 0..ENTRIES {
        let key = common::nth_key(n);
        l1.insert(key, Arc::new(common::entry(key)), Duration::from_secs(3600));
    }
    let (held, absent) = (common::nth_key(ENTRIES / 2), common::nth_key(ENTRIES));
    assert!(l1.get(&held).is_some(), "the hit hits");
    assert!(l1.get(&absent).is_none(), "the miss misses");

    let mut group = c.benchmark_group("l1");
    group.throughput(Throughput::Elements(1));
    group.bench_function("hit", |b| b.iter(|| l1.get(black_box(&held))));
    group.bench_function("miss", |b| b.iter(|| l1.get(black_box(&absent))));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
