//! The head-only commit of a revalidated value on a real `redis-server`: the body stays where it
//! is, and never crosses the network again.

use crate::support;

use std::time::Duration;

use bytes::Bytes;
use corral::envelope::{self, Entry, Form};
use corral::key::{KeyBuilder, KeyHash};
use corral::store::redis::{RedisStore, RedisStoreConfig};
use corral::store::{Acquired, Fenced, LeaseRequest, Refresh, Revalidation, Store, Token};
use redis::AsyncCommands;
use support::TestRedis;
use support::upstream::pattern;

const NS: &str = "revalidate";
/// A body far larger than both heads, so that sending it would show in the server's input bytes.
const BODY_LEN: usize = 1 << 20;

fn key(name: &str) -> KeyHash {
    KeyBuilder::new().part(name).finish().hash
}

fn lease() -> LeaseRequest {
    LeaseRequest {
        token: Token::random(),
        node: "node-a".into(),
        ttl: Duration::from_secs(5),
    }
}

async fn store(redis: &TestRedis) -> RedisStore {
    RedisStore::connect(RedisStoreConfig::new(redis.url(), NS))
        .await
        .expect("connect to test redis")
}

/// An answer to `k` with a 1 MiB body, an `ETag` and `version`.
fn answer(k: &KeyHash, version: &str) -> Entry {
    Entry {
        status: 200,
        headers: vec![
            ("etag".into(), Bytes::from_static(b"\"v1\"")),
            ("x-version".into(), Bytes::from(version.to_owned())),
        ],
        body: pattern(BODY_LEN),
        stored_at_ms: 1_700_000_000_000,
        ttl: Duration::from_secs(1),
        stale: Duration::ZERO,
        stale_if_error: Duration::ZERO,
        fetch_time: Duration::from_millis(3),
        key: *k,
        form: Form::Answer,
    }
}

/// The revalidation of `old` into `new` (same body).
fn revalidation(old: &Entry, new: &Entry) -> Revalidation {
    let value = envelope::encode(new).unwrap();
    Revalidation {
        new_head: value.slice(..value.len() - new.body.len()),
        value,
        old_head: envelope::encode_head(old).unwrap(),
    }
}

/// The bytes the server has read from its clients so far.
async fn input_bytes(redis: &TestRedis) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(&mut redis.client().await)
        .await
        .expect("INFO stats");
    info.lines()
        .find_map(|line| line.strip_prefix("total_net_input_bytes:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("INFO stats reports total_net_input_bytes")
}

/// Stores `entry`, ends its freshness as the server's clock passing it would, and takes the lease
/// to refresh it.
async fn stored_and_stale(
    redis: &TestRedis,
    store: &RedisStore,
    k: &KeyHash,
    entry: &Entry,
) -> LeaseRequest {
    let filler = lease();
    assert!(matches!(
        store.acquire(k, &filler, None).await,
        Ok(Acquired::Lead { .. })
    ));
    let value = envelope::encode(entry).unwrap();
    let (fresh, ttl) = (Duration::from_secs(60), Duration::from_secs(120));
    let done = store
        .commit_fresh(k, filler.token, value, fresh, ttl, false, Bytes::new())
        .await;
    assert_eq!(done, Ok(Fenced::Done));
    let _: () = redis::cmd("SET")
        .arg(store.fresh_key_name(k))
        .arg("0")
        .arg("PX")
        .arg(120_000)
        .query_async(&mut redis.client().await)
        .await
        .expect("SET");
    let refresher = lease();
    let taken = store.acquire(k, &refresher, None).await.expect("acquire");
    assert!(
        matches!(
            taken,
            Acquired::Stale {
                refresh: Refresh::Lead { .. },
                ..
            }
        ),
        "{taken:?}"
    );
    refresher
}

#[tokio::test]
async fn a_revalidated_value_gets_its_new_head_and_keeps_its_body_without_resending_it() {
    let redis = TestRedis::start().await;
    let store = store(&redis).await;
    let k = key("head-only");
    let old = answer(&k, "1");
    let refresher = stored_and_stale(&redis, &store, &k, &old).await;

    let new = Entry {
        ttl: Duration::from_secs(3600),
        stored_at_ms: old.stored_at_ms + 5_000,
        ..answer(&k, "two")
    };
    let update = revalidation(&old, &new);
    let before = input_bytes(&redis).await;
    let done = store
        .commit_revalidated(
            &k,
            refresher.token,
            &update,
            Duration::from_secs(3600),
            Duration::from_secs(4200),
            false,
            Bytes::new(),
        )
        .await;
    let sent = input_bytes(&redis).await - before;
    println!("the head-only commit sent Redis {sent} bytes for a {BODY_LEN}-byte body");
    assert_eq!(done, Ok(Fenced::Done));
    assert!(
        sent < 16 * 1024,
        "the commit sent {sent} bytes: the heads alone, not the {BODY_LEN}-byte body"
    );

    let stored: Vec<u8> = redis
        .client()
        .await
        .get(store.key_names(&k)[0].as_str())
        .await
        .expect("GET");
    assert_eq!(
        Bytes::from(stored),
        update.value,
        "the new head over the old body"
    );
    let decoded = envelope::decode_for(update.value.clone(), &k).unwrap();
    assert_eq!(decoded.body, old.body);
    // Fresh again, by the store's clock: a look is a hit.
    let again = store.acquire(&k, &lease(), None).await.expect("acquire");
    assert!(matches!(again, Acquired::Hit { .. }), "{again:?}");
}

#[tokio::test]
async fn a_head_only_commit_is_fenced_and_falls_back_to_the_whole_value() {
    let redis = TestRedis::start().await;
    let store = store(&redis).await;
    let k = key("fenced");
    let old = answer(&k, "1");
    let refresher = stored_and_stale(&redis, &store, &k, &old).await;
    let new = answer(&k, "2");

    // Without the lease, nothing is written.
    let update = revalidation(&old, &new);
    let (fresh, ttl) = (Duration::from_secs(60), Duration::from_secs(120));
    let lost = store
        .commit_revalidated(
            &k,
            Token::random(),
            &update,
            fresh,
            ttl,
            false,
            Bytes::new(),
        )
        .await;
    assert_eq!(lost, Ok(Fenced::Lost));

    // A head that is not the stored one (an older copy was revalidated): the whole value is
    // committed instead, so the result is still exactly the new value.
    let elsewhere = Entry {
        stored_at_ms: 1,
        ..old.clone()
    };
    let update = revalidation(&elsewhere, &new);
    let done = store
        .commit_revalidated(
            &k,
            refresher.token,
            &update,
            fresh,
            ttl,
            false,
            Bytes::new(),
        )
        .await;
    assert_eq!(done, Ok(Fenced::Done));
    let stored: Vec<u8> = redis
        .client()
        .await
        .get(store.key_names(&k)[0].as_str())
        .await
        .expect("GET");
    assert_eq!(Bytes::from(stored), update.value);
}
