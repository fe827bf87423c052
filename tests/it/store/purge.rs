//! The store operations behind purges beyond one key (route generations, the path and tag
//! indexes), on every backend: memory, a real Redis and a real NATS JetStream KV.

#[allow(unused_imports)]
use crate::support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corral::bus::{Event, EventKind, EventSink};
use corral::key::generation_key;
use corral::key::{KeyBuilder, KeyHash};
use corral::store::memory::MemoryStore;
use corral::store::nats_kv::{NatsKvConfig, NatsKvEvents, NatsKvStore};
use corral::store::redis::{RedisStore, RedisStoreConfig};
use corral::store::{IndexEntry, Selector, Store};
use futures::StreamExt;
use redis::AsyncCommands;
use support::{TestNats, TestRedis, eventually};

const NS: &str = "purge-test";

fn key(name: &str) -> KeyHash {
    KeyBuilder::new().part(name).finish().hash
}

fn entry(route: &str, path: &str, name: &str, tags: &[&str], ttl: Duration) -> IndexEntry {
    IndexEntry {
        route: route.into(),
        path: path.into(),
        key: key(name),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ttl,
    }
}

fn keys(names: &[&str]) -> BTreeSet<KeyHash> {
    names.iter().map(|n| key(n)).collect()
}

async fn indexed(store: &dyn Store, selector: Selector) -> BTreeSet<KeyHash> {
    store
        .indexed(&selector, 1000)
        .await
        .expect("indexed")
        .into_iter()
        .collect()
}

fn prefix(route: &str, prefix: &str) -> Selector {
    Selector::Prefix {
        route: route.into(),
        prefix: prefix.into(),
    }
}

fn tag(tag: &str) -> Selector {
    Selector::Tag(tag.into())
}

/// What every backend must do: generations count up per route, and the indexes answer exactly the
/// keys under a prefix (of that route only) and the keys carrying a tag.
async fn generations_and_indexes(store: &dyn Store) {
    assert_eq!(store.route_generation("reports").await, Ok(0));
    let g = generation_key("reports");
    assert_eq!(store.bump_generation("reports", &g).await, Ok(1));
    assert_eq!(store.bump_generation("reports", &g).await, Ok(2));
    assert_eq!(store.route_generation("reports").await, Ok(2));
    assert_eq!(
        store.route_generation("other").await,
        Ok(0),
        "a bump is per route"
    );

    let minute = Duration::from_secs(60);
    for indexed in [
        entry("reports", "/reports/2024/a", "a", &["user-42"], minute),
        entry("reports", "/reports/2024/b", "b", &["user-42", "x"], minute),
        entry("reports", "/reports/2023/c", "c", &[], minute),
        entry("other", "/reports/2024/d", "d", &["x"], minute),
        // The same key indexed again (a refill) is one key.
        entry("reports", "/reports/2024/a", "a", &["user-42"], minute),
    ] {
        store.index(&indexed).await.expect("index");
    }
    assert_eq!(
        indexed(store, prefix("reports", "/reports/2024/")).await,
        keys(&["a", "b"])
    );
    assert_eq!(
        indexed(store, prefix("reports", "/reports/")).await,
        keys(&["a", "b", "c"])
    );
    assert_eq!(
        indexed(store, prefix("reports", "/reports/2024/a")).await,
        keys(&["a"]),
        "a prefix may be a whole path"
    );
    assert_eq!(
        indexed(store, prefix("other", "/")).await,
        keys(&["d"]),
        "only the named route's keys"
    );
    assert!(
        indexed(store, prefix("reports", "/elsewhere"))
            .await
            .is_empty()
    );
    assert!(indexed(store, prefix("unknown", "/")).await.is_empty());
    assert_eq!(indexed(store, tag("user-42")).await, keys(&["a", "b"]));
    assert_eq!(indexed(store, tag("x")).await, keys(&["b", "d"]));
    assert!(indexed(store, tag("nobody")).await.is_empty());
    let limited = store
        .indexed(&prefix("reports", "/reports/"), 2)
        .await
        .expect("indexed");
    assert_eq!(limited.len(), 2, "the limit bounds the answer");
}

/// A tag's index forgets an entry once the entry's TTL has passed.
async fn tag_index_expires_with_its_entries(store: &dyn Store, ttl: Duration) {
    store
        .index(&entry(
            "reports",
            "/reports/short",
            "short",
            &["brief"],
            ttl,
        ))
        .await
        .expect("index");
    assert_eq!(indexed(store, tag("brief")).await, keys(&["short"]));
    eventually("the tag index to forget an expired entry", || async {
        indexed(store, tag("brief")).await.is_empty()
    })
    .await;
}

#[tokio::test]
async fn memory_store_generations_and_indexes() {
    let store = MemoryStore::new();
    generations_and_indexes(&store).await;
    tag_index_expires_with_its_entries(&store, Duration::from_millis(200)).await;
}

// ---------------------------------------------------------------------------------- redis ----

async fn redis_store(redis: &TestRedis, announce: bool) -> RedisStore {
    let mut config = RedisStoreConfig::new(redis.url(), NS);
    config.announce = announce;
    RedisStore::connect(config).await.expect("connect to redis")
}

#[tokio::test]
async fn redis_store_generations_and_indexes() {
    let redis = TestRedis::start().await;
    let store = redis_store(&redis, false).await;
    generations_and_indexes(&store).await;
    tag_index_expires_with_its_entries(&store, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn redis_indexes_share_a_hash_tag_and_live_as_long_as_their_longest_entry() {
    let redis = TestRedis::start().await;
    let store = redis_store(&redis, false).await;
    let (g, pe, px) = (
        store.route_key_name("reports", "g"),
        store.route_key_name("reports", "pe"),
        store.route_key_name("reports", "px"),
    );
    for name in [&g, &pe, &px] {
        assert!(name.contains("{route:reports}"), "{name}");
    }
    assert!(store.tag_key_name("user-42").contains("{user-42}"));

    let ttl = Duration::from_secs(30);
    store
        .index(&entry("reports", "/reports/1", "one", &["user-42"], ttl))
        .await
        .unwrap();
    let mut client = redis.client().await;
    let tag_key = store.tag_key_name("user-42");
    for name in [&pe, &px, &tag_key] {
        let pttl: i64 = client.pttl(name).await.unwrap();
        assert!(pttl > 25_000 && pttl <= 30_000, "{name}: PTTL {pttl}");
    }
    store
        .index(&entry(
            "reports",
            "/reports/2",
            "two",
            &["user-42"],
            ttl * 10,
        ))
        .await
        .unwrap();
    store
        .index(&entry("reports", "/reports/3", "three", &["user-42"], ttl))
        .await
        .unwrap();
    for name in [&pe, &px, &tag_key] {
        let pttl: i64 = client.pttl(name).await.unwrap();
        assert!(
            pttl > 250_000,
            "{name} follows its longest entry: PTTL {pttl}"
        );
    }
    store
        .bump_generation("reports", &generation_key("reports"))
        .await
        .unwrap();
    let pttl: i64 = client.pttl(&g).await.unwrap();
    assert_eq!(pttl, -1, "a generation never expires");
}

#[tokio::test]
async fn redis_bump_announces_the_new_generation_when_announcing() {
    let redis = TestRedis::start().await;
    let store = redis_store(&redis, true).await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub
        .subscribe(corral::bus::redis_channel(NS))
        .await
        .expect("subscribe");
    let g = generation_key("reports");
    assert_eq!(store.bump_generation("reports", &g).await, Ok(1));
    assert_eq!(store.bump_generation("reports", &g).await, Ok(2));
    let mut messages = pubsub.on_message();
    for expected in [1, 2] {
        let message = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .expect("an event within 5 s")
            .expect("a message");
        let event = Event::decode(message.get_payload_bytes().to_vec().into()).expect("decodes");
        assert_eq!(
            event,
            Event::new(
                g,
                EventKind::Generation {
                    generation: expected
                }
            )
        );
    }
}

// -------------------------------------------------------------------------------- nats kv ----

async fn nats_store(nats: &TestNats) -> NatsKvStore {
    NatsKvStore::connect(NatsKvConfig::new(nats.url(), NS))
        .await
        .expect("connect to nats")
}

#[tokio::test]
async fn nats_kv_store_generations_and_indexes() {
    let nats = TestNats::start().await;
    let store = nats_store(&nats).await;
    generations_and_indexes(&store).await;
    // The server counts TTLs in whole seconds.
    tag_index_expires_with_its_entries(&store, Duration::from_secs(1)).await;
}

/// Everything a consumer delivered.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<Event>>,
    junk: AtomicUsize,
}

impl EventSink for Recorder {
    fn deliver(&self, event: Event) {
        self.events.lock().unwrap().push(event);
    }
    fn resync(&self) {}
    fn undecodable(&self) {
        self.junk.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn nats_kv_bumps_are_heard_by_every_consumer_and_index_writes_are_quiet() {
    let nats = TestNats::start().await;
    let store = nats_store(&nats).await;
    let other = nats_store(&nats).await;
    let recorder = Arc::new(Recorder::default());
    let _events = NatsKvEvents::start(&other, recorder.clone())
        .await
        .expect("consumer");
    let g = generation_key("reports");
    store
        .index(&entry(
            "reports",
            "/reports/1",
            "one",
            &["t"],
            Duration::from_secs(30),
        ))
        .await
        .unwrap();
    assert_eq!(store.bump_generation("reports", &g).await, Ok(1));
    eventually("the other process hears generation 1", || async {
        recorder
            .events
            .lock()
            .unwrap()
            .contains(&Event::new(g, EventKind::Generation { generation: 1 }))
    })
    .await;
    assert_eq!(
        recorder.junk.load(Ordering::SeqCst),
        0,
        "index records are not junk"
    );
    assert_eq!(other.route_generation("reports").await, Ok(1));
}

// ------------------------------------------------------------------------- long paths ----

/// Keys indexed with long paths by the tests below.
const LONG_PATHS: usize = 200;
/// Bytes of each of those paths: far past what an index keeps of one.
const LONG_PATH_LEN: usize = 8 * 1024;
/// The most a route's path index may hold per key, as docs/invalidation.md states it (on both
/// stores), whatever the length of the paths.
const INDEX_BYTES_PER_KEY: usize = 1024;

fn long_path(i: usize) -> String {
    let head = format!("/long/{i}/");
    format!("{head}{}", "x".repeat(LONG_PATH_LEN - head.len()))
}

/// Indexes [`LONG_PATHS`] keys with 8 KiB paths; a prefix purge still finds each one, by a short
/// prefix and by its whole path.
async fn index_long_paths(store: &dyn Store) {
    let minute = Duration::from_secs(60);
    for i in 0..LONG_PATHS {
        let name = format!("long-{i}");
        store
            .index(&entry("reports", &long_path(i), &name, &[], minute))
            .await
            .expect("index");
    }
    for i in [0, 7, LONG_PATHS - 1] {
        let name = format!("long-{i}");
        let short = format!("/long/{i}/");
        assert_eq!(
            indexed(store, prefix("reports", &short)).await,
            keys(&[&name]),
            "{short}"
        );
        assert_eq!(
            indexed(store, prefix("reports", &long_path(i))).await,
            keys(&[&name]),
            "the whole path of key {i}"
        );
    }
}

#[tokio::test]
async fn redis_path_index_is_bounded_in_bytes_whatever_the_paths() {
    let redis = TestRedis::start().await;
    let store = redis_store(&redis, false).await;
    index_long_paths(&store).await;
    let mut client = redis.client().await;
    let mut bytes = 0;
    for set in ["pe", "px"] {
        let used: usize = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(store.route_key_name("reports", set))
            .arg("SAMPLES")
            .arg(0)
            .query_async(&mut client)
            .await
            .expect("MEMORY USAGE");
        bytes += used;
    }
    println!(
        "redis path index: {bytes} bytes for {LONG_PATHS} keys with {LONG_PATH_LEN}-byte paths"
    );
    assert!(
        bytes <= LONG_PATHS * INDEX_BYTES_PER_KEY,
        "{bytes} bytes for {LONG_PATHS} keys"
    );
}

#[tokio::test]
async fn nats_kv_path_index_is_bounded_in_bytes_whatever_the_paths() {
    let nats = TestNats::start().await;
    let store = nats_store(&nats).await;
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let mut stream = js
        .get_stream(format!("KV_{}", store.bucket()))
        .await
        .expect("the bucket's stream");
    let before = stream.info().await.expect("stream info").state.bytes;
    index_long_paths(&store).await;
    let after = stream.info().await.expect("stream info").state.bytes;
    let bytes = (after - before) as usize;
    println!(
        "nats kv path index: {bytes} bytes for {LONG_PATHS} keys with {LONG_PATH_LEN}-byte paths"
    );
    assert!(
        bytes <= LONG_PATHS * INDEX_BYTES_PER_KEY,
        "{bytes} bytes for {LONG_PATHS} keys"
    );
}
