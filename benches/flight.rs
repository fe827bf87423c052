//! The cost of joining a flight: N callers of one key on one engine (memory backend), one build.
//! Reported per caller, so a flat line means joining costs the same however many callers join.
//!
//! Run with: `cargo bench --bench flight`

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use corral::engine::{Backend, Built, Engine, EngineConfig, Policy};
use corral::envelope::Entry;
use corral::key::{KeyBuilder, KeyHash};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn entry() -> Entry {
    Entry {
        status: 200,
        headers: vec![],
        body: Bytes::from_static(b"value"),
        stored_at_ms: 0,
        ttl: Duration::from_secs(60),
        stale: Duration::ZERO,
        stale_if_error: Duration::ZERO,
        fetch_time: Duration::ZERO,
        key: KeyHash::from_bytes([0; 32]),
        form: corral::envelope::Form::Answer,
    }
}

fn join(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut config = EngineConfig::new("bench");
    // The L1 would answer every caller after the first build; the bench measures flights.
    config.l1_max_bytes = 0;
    let engine = runtime
        .block_on(Engine::connect(config, &Backend::memory()))
        .expect("engine");
    let policy = Policy::default();
    let mut group = c.benchmark_group("flight_join");
    let mut round = 0u64;
    for callers in [1u64, 10, 100, 1000] {
        group.throughput(Throughput::Elements(callers));
        group.bench_with_input(BenchmarkId::from_parameter(callers), &callers, |b, &n| {
            b.iter(|| {
                round += 1;
                let key = KeyBuilder::new().part(round.to_be_bytes()).finish().hash;
                runtime.block_on(async {
                    // The build is held until every other caller has joined the flight as a
                    // follower, so the measurement is the join and the wake-up, not a race.
                    let release = Arc::new(tokio::sync::Semaphore::new(0));
                    let held = release.clone();
                    let builder: corral::engine::Builder = Arc::new(move |_| {
                        let held = held.clone();
                        Box::pin(async move {
                            let _permit = held.acquire().await.expect("open");
                            Ok(Built::Shared(entry()))
                        })
                    });
                    let mut calls = Vec::with_capacity(n as usize);
                    for _ in 0..n {
                        let (engine, policy, builder) =
                            (engine.clone(), policy.clone(), builder.clone());
                        calls.push(tokio::spawn(async move {
                            engine
                                .fetch(&key, &policy, builder, Duration::from_secs(5))
                                .await
                        }));
                    }
                    let followers = engine.metrics().followers_waiting.clone();
                    for _ in 0..10_000_000 {
                        if followers.get() >= n as i64 - 1 {
                            break;
                        }
                        tokio::task::yield_now().await;
                    }
                    release.add_permits(1);
                    for call in calls {
                        call.await.expect("task").expect("value");
                    }
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, join);
criterion_main!(benches);
