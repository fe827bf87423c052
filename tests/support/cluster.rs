//! Several replicas (separate engines, each with its own connections) on one backend.
//!
//! `Cluster::start(Kind::RedisNats)` starts the servers that kind needs; `cluster.dictionaries(3,
//! config)` opens three replicas of one dictionary on them. The `on_every_backend!` macro turns one
//! test body into a test per backend kind.

use std::time::Duration;

use bytes::Bytes;
use corral::engine::{
    Backend, BusConfig, Dictionary, DictionaryConfig, Engine, EngineConfig, StoreConfig,
};
use corral::key::KeyHash;
use corral::store::memory::MemoryStore;
use corral::store::nats_kv::{NatsKvConfig, NatsKvStore};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::topology::TestRedisCluster;
use super::{TestNats, TestRedis};

/// Which store and bus the replicas share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The in-process store and bus.
    Memory,
    /// Redis store, Redis pub/sub bus (events published by the store's scripts).
    Redis,
    /// Redis store, core NATS bus.
    RedisNats,
    /// NATS JetStream KV store, with its events from the bucket's stream: NATS only.
    NatsKv,
    /// A three-primary Redis Cluster for store and bus (events by classic pub/sub, cluster-wide).
    RedisCluster,
}

pub struct Cluster {
    pub kind: Kind,
    pub redis: Option<TestRedis>,
    pub nats: Option<TestNats>,
    /// The Redis Cluster, when `kind` is `RedisCluster`.
    pub redis_cluster: Option<TestRedisCluster>,
    pub backend: Backend,
    /// The memory store, when `kind` is `Memory` (for inspecting TTLs and writing raw bytes).
    memory: Option<MemoryStore>,
}

impl Cluster {
    pub async fn start(kind: Kind) -> Cluster {
        match kind {
            Kind::Memory => {
                let backend = Backend::memory();
                let StoreConfig::Memory(store) = &backend.store else {
                    unreachable!("memory backend")
                };
                let memory = Some(store.clone());
                Cluster {
                    kind,
                    redis: None,
                    nats: None,
                    redis_cluster: None,
                    backend,
                    memory,
                }
            }
            Kind::Redis => {
                let redis = TestRedis::start().await;
                let backend = Backend::redis(redis.url());
                Cluster {
                    kind,
                    redis: Some(redis),
                    nats: None,
                    redis_cluster: None,
                    backend,
                    memory: None,
                }
            }
            Kind::NatsKv => {
                let nats = TestNats::start().await;
                let backend = Backend::nats_kv(nats.url());
                Cluster {
                    kind,
                    redis: None,
                    nats: Some(nats),
                    redis_cluster: None,
                    backend,
                    memory: None,
                }
            }
            Kind::RedisNats => {
                let (redis, nats) = tokio::join!(TestRedis::start(), TestNats::start());
                let backend = Backend::new(
                    StoreConfig::Redis { url: redis.url() },
                    BusConfig::Nats { url: nats.url() },
                );
                Cluster {
                    kind,
                    redis: Some(redis),
                    nats: Some(nats),
                    redis_cluster: None,
                    backend,
                    memory: None,
                }
            }
            Kind::RedisCluster => {
                let redis_cluster = TestRedisCluster::start().await;
                let backend = Backend::redis(redis_cluster.url());
                Cluster {
                    kind,
                    redis: None,
                    nats: None,
                    redis_cluster: Some(redis_cluster),
                    backend,
                    memory: None,
                }
            }
        }
    }

    /// `n` replicas of one dictionary, each with its own engine and connections.
    pub async fn dictionaries<K, V>(
        &self,
        n: usize,
        config: &DictionaryConfig,
    ) -> Vec<Dictionary<K, V>>
    where
        K: Serialize,
        V: Serialize + DeserializeOwned + Send + 'static,
    {
        let mut replicas = Vec::with_capacity(n);
        for _ in 0..n {
            replicas.push(
                Dictionary::open(config.clone(), &self.backend)
                    .await
                    .expect("replica connects"),
            );
        }
        replicas
    }

    /// `n` engines on namespace `namespace`, each with its own connections.
    pub async fn engines(&self, n: usize, namespace: &str) -> Vec<Engine> {
        let mut replicas = Vec::with_capacity(n);
        for _ in 0..n {
            replicas.push(
                Engine::connect(EngineConfig::new(namespace), &self.backend)
                    .await
                    .expect("replica connects"),
            );
        }
        replicas
    }

    /// The shortest lease TTL the store keeps (NATS KV: one second); tests that want short
    /// leases ask for at least this.
    pub fn min_lease_ttl(&self) -> Duration {
        match self.kind {
            Kind::NatsKv => corral::store::nats_kv::MIN_LEASE_TTL,
            _ => Duration::ZERO,
        }
    }

    /// A NATS KV store of its own on the namespace's bucket, to look at entries (NATS KV only).
    pub async fn kv(&self, namespace: &str) -> Option<NatsKvStore> {
        if self.kind != Kind::NatsKv {
            return None;
        }
        let nats = self.nats.as_ref().expect("nats");
        Some(
            NatsKvStore::connect(NatsKvConfig::new(nats.url(), namespace))
                .await
                .expect("inspection store connects"),
        )
    }

    fn value_name(namespace: &str, key: &KeyHash) -> String {
        format!("{namespace}:{{{}}}:v", key.to_hex())
    }

    /// The store's remaining TTL of a key's value (PTTL on Redis; from the entry's server
    /// timestamp and touch record on NATS KV).
    pub async fn value_ttl(&self, namespace: &str, key: &KeyHash) -> Option<Duration> {
        if let Some(memory) = &self.memory {
            return memory.value_ttl(key);
        }
        if let Some(kv) = self.kv(namespace).await {
            return kv.value_ttl(key).await.expect("value ttl");
        }
        let pttl: i64 = self
            .redis_query(redis::cmd("PTTL").arg(Self::value_name(namespace, key)))
            .await
            .expect("PTTL");
        (pttl >= 0).then(|| Duration::from_millis(pttl as u64))
    }

    /// The stored bytes of a key's value.
    pub async fn raw_value(&self, namespace: &str, key: &KeyHash) -> Option<Bytes> {
        if let Some(memory) = &self.memory {
            return memory.raw(key);
        }
        if let Some(kv) = self.kv(namespace).await {
            return kv.raw(key).await.expect("raw value");
        }
        let value: Option<Vec<u8>> = self
            .redis_query(redis::cmd("GET").arg(Self::value_name(namespace, key)))
            .await
            .expect("GET");
        value.map(Bytes::from)
    }

    /// Writes raw bytes under a key's value name, as a foreign or broken writer would.
    pub async fn put_raw_value(&self, namespace: &str, key: &KeyHash, value: Bytes) {
        if let Some(memory) = &self.memory {
            memory.put_raw(key, value, Duration::from_secs(60));
            return;
        }
        if let Some(kv) = self.kv(namespace).await {
            kv.put_raw(key, value, Duration::from_secs(60))
                .await
                .expect("put raw value");
            return;
        }
        let _: () = self
            .redis_query(
                redis::cmd("SET")
                    .arg(Self::value_name(namespace, key))
                    .arg(value.as_ref())
                    .arg("PX")
                    .arg(60_000),
            )
            .await
            .expect("SET");
    }

    /// One command on the Redis server, or on the Redis Cluster (routed by its key).
    async fn redis_query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> redis::RedisResult<T> {
        if let Some(cluster) = &self.redis_cluster {
            return cmd.query_async(&mut cluster.client().await).await;
        }
        let mut client = self.redis.as_ref().expect("redis").client().await;
        cmd.query_async(&mut client).await
    }
}

/// Writes one `#[tokio::test]` per backend kind for each test body:
///
/// ```ignore
/// on_every_backend! {
///     async fn builds_once(cluster) { ... }
/// }
/// ```
#[macro_export]
macro_rules! on_every_backend {
    ($(async fn $name:ident($cluster:ident) $body:block)*) => {
        $(
            mod $name {
                #[allow(unused_imports)]
                use super::*;

                async fn body($cluster: $crate::support::cluster::Cluster) $body

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn memory() {
                    body($crate::support::cluster::Cluster::start($crate::support::cluster::Kind::Memory).await).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn redis() {
                    body($crate::support::cluster::Cluster::start($crate::support::cluster::Kind::Redis).await).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn redis_store_nats_bus() {
                    body($crate::support::cluster::Cluster::start($crate::support::cluster::Kind::RedisNats).await).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn nats_kv() {
                    body($crate::support::cluster::Cluster::start($crate::support::cluster::Kind::NatsKv).await).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn redis_cluster() {
                    body($crate::support::cluster::Cluster::start($crate::support::cluster::Kind::RedisCluster).await).await
                }
            }
        )*
    };
}
