//! What a leader's store work costs: ACQUIRE (leading on a fresh key) then COMMIT of a 1 KiB
//! value, on Redis (one Lua script each) and on NATS JetStream KV (a read and a compare-and-set
//! publish, then a compare-and-set publish), side by side in one run. `sequential` is one pair at a
//! time, so its time is the latency of the pair; `concurrent_16` runs 16 pairs at once on one
//! connection, so its throughput is what one process can push.
//!
//! The servers are started by the bench, as the tests start theirs (`CORRAL_REDIS_SERVER`,
//! `CORRAL_NATS_SERVER`, or what `scripts/test` installed), on ephemeral loopback ports.
//!
//! Run with: `cargo bench --bench store -- --warm-up-time 1 --measurement-time 3`

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use corral::bus::{Event, EventKind};
use corral::key::{KeyBuilder, KeyHash};
use corral::store::nats_kv::{NatsKvConfig, NatsKvStore};
use corral::store::redis::{RedisStore, RedisStoreConfig};
use corral::store::{Acquired, Fenced, LeaseRequest, Store, Token};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use support::{TestNats, TestRedis};

/// Pairs in flight at once in the concurrent variant.
const CONCURRENCY: u64 = 16;

/// Leads on a fresh key and commits a value under the lease.
async fn acquire_commit(store: &dyn Store, key: KeyHash, value: &Bytes) {
    let lease = LeaseRequest {
        token: Token::random(),
        node: "bench".into(),
        ttl: Duration::from_secs(10),
    };
    let acquired = store.acquire(&key, &lease, None).await.expect("acquire");
    assert!(matches!(acquired, Acquired::Lead { .. }), "{acquired:?}");
    let event = Event::new(key, EventKind::Ready { inline: None }).encode();
    let committed = store
        .commit(
            &key,
            lease.token,
            value.clone(),
            Duration::from_secs(10),
            false,
            event,
        )
        .await
        .expect("commit");
    assert_eq!(committed, Fenced::Done);
}

fn round_trips(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (redis, nats) =
        runtime.block_on(async { tokio::join!(TestRedis::start(), TestNats::start()) });
    let stores: Vec<(&str, Arc<dyn Store>)> = runtime.block_on(async {
        let mut redis_config = RedisStoreConfig::new(redis.url(), "bench");
        // Events published by the scripts, as with a Redis bus on the same server.
        redis_config.announce = true;
        let redis_store = RedisStore::connect(redis_config)
            .await
            .expect("redis store");
        let nats_store = NatsKvStore::connect(NatsKvConfig::new(nats.url(), "bench"))
            .await
            .expect("nats kv store");
        vec![
            ("redis", Arc::new(redis_store) as Arc<dyn Store>),
            ("nats_kv", Arc::new(nats_store) as Arc<dyn Store>),
        ]
    });
    let value = Bytes::from(vec![0x5a; 1024]);
    let next = AtomicU64::new(0);
    let fresh = || {
        let n = next.fetch_add(1, Ordering::Relaxed);
        KeyBuilder::new().part(n.to_be_bytes()).finish().hash
    };

    let mut group = c.benchmark_group("acquire_commit/sequential");
    group.throughput(Throughput::Elements(1));
    for (name, store) in &stores {
        group.bench_function(*name, |b| {
            b.to_async(&runtime)
                .iter(|| acquire_commit(store.as_ref(), fresh(), &value));
        });
    }
    group.finish();

    let mut group = c.benchmark_group("acquire_commit/concurrent_16");
    group.throughput(Throughput::Elements(CONCURRENCY));
    for (name, store) in &stores {
        group.bench_function(*name, |b| {
            b.to_async(&runtime).iter(|| {
                let pairs: Vec<_> = (0..CONCURRENCY)
                    .map(|_| acquire_commit(store.as_ref(), fresh(), &value))
                    .collect();
                futures::future::join_all(pairs)
            });
        });
    }
    group.finish();
    drop((redis, nats));
}

criterion_group!(benches, round_trips);
criterion_main!(benches);
