//! The Redis store against a real `redis-server` started by each test (never the machine's own).

// The harness re-exports helpers (TestNats) this file does not use.
#[allow(unused_imports)]
use crate::support;

use std::time::Duration;

use bytes::Bytes;
use corral::key::{KeyBuilder, KeyHash};
use corral::store::redis::{RedisStore, RedisStoreConfig};
use corral::store::{
    Acquired, Fenced, KeyStatus, LeaseRequest, Refresh, Renewed, Store, StoreError, Token, Touch,
};
use futures::StreamExt;
use redis::AsyncCommands;
use support::TestRedis;

const NS: &str = "corral-test";
/// Outer bound on any call that is expected to fail by itself (timeouts, refused connections).
const OUTER: Duration = Duration::from_secs(5);

fn key(name: &str) -> KeyHash {
    KeyBuilder::new().part(name).finish().hash
}

fn lease(ttl: Duration) -> LeaseRequest {
    LeaseRequest {
        token: Token::random(),
        node: "node-a".into(),
        ttl,
    }
}

async fn store(redis: &TestRedis, announce: bool) -> RedisStore {
    let mut config = RedisStoreConfig::new(redis.url(), NS);
    config.announce = announce;
    RedisStore::connect(config)
        .await
        .expect("connect to test redis")
}

async fn pttl(redis: &TestRedis, name: &str) -> i64 {
    redis.client().await.pttl(name).await.expect("PTTL")
}

async fn exists(redis: &TestRedis, names: &[String]) -> i64 {
    redis.client().await.exists(names).await.expect("EXISTS")
}

async fn pexpire(redis: &TestRedis, name: &str, ms: i64) {
    let set: bool = redis
        .client()
        .await
        .pexpire(name, ms)
        .await
        .expect("PEXPIRE");
    assert!(set, "{name} should exist");
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[tokio::test]
async fn key_names_share_one_hash_tag() {
    let redis = TestRedis::start().await;
    let store = store(&redis, false).await;
    let k = key("layout");
    let hex = k.to_hex();
    assert_eq!(
        store.key_names(&k),
        [
            format!("{NS}:{{{hex}}}:v"),
            format!("{NS}:{{{hex}}}:l"),
            format!("{NS}:{{{hex}}}:p"),
        ]
    );
    assert_eq!(store.kind(), "redis");
    assert!(!store.announces());
}

#[tokio::test]
async fn acquire_leads_on_empty_others_wait_and_the_owner_leads_again() {
    let redis = TestRedis::start().await;
    let store = store(&redis, false).await;
    let k = key("lead");
    let [_, l, _] = store.key_names(&k);
    let first = lease(secs(5));

    let Acquired::Lead { fence } = store.acquire(&k, &first, None).await.unwrap() else {
        panic!("empty key should lead")
    };
    let lease_pttl = pttl(&redis, &l).await;
    assert!(
        lease_pttl > 0 && lease_pttl <= 5000,
        "lease pttl {lease_pttl}"
    );
    let fields: std::collections::HashMap<String, String> =
        redis.client().await.hgetall(&l).await.unwrap();
    assert_eq!(fields["token"], first.token.to_hex());
    assert_eq!(fields["node"], "node-a");
    assert_eq!(fields["fence"], fence.to_string());
    assert!(fields["start"].parse::<u64>().unwrap() > 0);

    // The lease's public name is kept beside it and told to whoever waits on it, never the token.
    assert_eq!(fields["id"], first.token.lease_id().to_hex());
    match store.acquire(&k, &lease(secs(5)), None).await.unwrap() {
        Acquired::Wait { lease_left, lease } => {
            assert!(
                lease_left <= secs(5) && lease_left > Duration::ZERO,
                "{lease_left:?}"
            );
            assert_eq!(lease, Some(first.token.lease_id()));
        }
        other => panic!("another token should wait, got {other:?}"),
    }
    // A retry after a client-side timeout: the owner's own lease answers LEAD, same fence.
    assert_eq!(
        store.acquire(&k, &first, None).await,
        Ok(Acquired::Lead { fence })
    );
}

#[tokio::test]
async fn peek_on_empty_is_empty_and_creates_nothing() {
    let redis = TestRedis::start().await;
    let store = store(&redis, false).await;
    let k = key("peek");
    let names = store.key_names(&k);
    assert_eq!(store.peek(&k, None).await, Ok(Acquired::Empty));
    assert_eq!(exists(&redis, &names).await, 0);

    store.acquire(&k, &lease(secs(5)), None).await.unwrap();
    assert!(matches!(
        store.peek(&k, None).await,
        Ok(Acquired::Wait { .. })
    ));
}

#[tokio::test]
async fn renew_resets_the_lease_for_its_owner_only() {
    let redis = TestRedis::start().await;
    let store = store(&redis, false).await;
    let k = key("renew");
    let [_, l, _] = store.key_names(&k);
    let held = lease(secs(5));
    store.acquire(&k, &held, None).await.unwrap();

    pexpire(&redis, &l, 3000).await;
    assert_eq!(
        store.renew(&k, Token::random(), secs(20)).await,
        Ok(Renewed::Lost)
    );
    assert!(
        pttl(&redis, &l).await <= 3000,
        "a foreign renew must not extend"
    );

    assert_eq!(
        store.renew(&k, held.token, secs(20)).await,
        Ok(Renewed::Held)
    );
    assert!(
        pttl(&redis, &l).await > 15_000,
        "renew sets the lease ttl anew"
    );
    // Idempotent: a retried renew is still held.
    assert_eq!(
        store.renew(&k, held.token, secs(20)).await,
        Ok(Renewed::Held)
    );

    redis.client().await.del::<_, ()>(&l).await.unwrap();
    assert_eq!(
        store.renew(&k, held.token, secs(20)).await,
        Ok(Renewed::Lost)
    );
}

#[tokio::test]
async fn commit_stores_the_value_and_ends_the_lease() {
    let redis = TestRedis::start().await;
    let store = store(&redis, false).await;
    let k = key("commit");
    let [v, l, p] = store.key_names(&k);
    let held = lease(secs(5));
    store.acquire(&k, &held, None).await.unwrap();
    // A stale pass marker must not outlive a fresh value.
    redis
        .client()
        .await
        .pset_ex::<_, _, ()>(&p, "1", 60_000)
        .await
        .unwrap();

    let value = Bytes::from_static(b"\x00binary\xffvalue");
    assert_eq!(
        store
            .commit(&k, held.token, value.clone(), secs(60), false, Bytes::new())
            .await,
        Ok(Fenced::Done)
    );
    assert_eq!(
        exists(&redis, &[l, p]).await,
        0,
        "lease and pass marker are gone"
    );
    let value_pttl = pttl(&redis, &v).await;
    assert!(value_pttl > 55_000 && value_pttl <= 60_000, "{value_pttl}");

    match store.acquire(&k, &lease(secs(5)), None).await.unwrap() {
        Acquired::Hit {
            value: got,
            ttl_left,
        } => {
            assert_eq!(got, value);
            assert!(ttl_left > secs(55) && ttl_left <= secs(60), "{ttl_left:?}");
        }
        other => panic!("expected a hit, got {other:?}"),
    }
    assert!(matches!(
        store.status(&k).await,
        Ok(KeyStatus::Exists { .. })
    ));
}

#[tokio::test]
async fn commit_with_a_wrong_or_stale_token_writes_nothing() {
    let redis = TestRedis::start().await;
    let store = store(&redis, false).await;
    let k = key("stale");
    let [v, l, _] = store.key_names(&k);
    let held = lease(secs(5));
    store.acquire(&k, &held, None).await.unwrap();

    let value = Bytes::from_static(b"v");
    assert_eq!(
        store
            .commit(
                &k,
                Token::random(),
                value.clone(),
                secs(60),
                false,
                Bytes::new()
            )
            .await,
        Ok(Fenced::Lost)
    );
    assert_eq!(exists(&redis, std::slice::from_ref(&v)).await, 0);
    assert_eq!(
        exists(&redis, std::slice::from_ref(&l)).await,
        1,
        "the owner's lease stays"
    );

    // The lease expired: the former owner's commit is stale.
    redis.client().await.del::<_, ()>(&l).await.unwrap();
    assert_eq!(
        store
            .commit(&k, held.token, value, secs(60), false, Bytes::new())
            .await,
        Ok(Fenced::Lost)
    );
    assert_eq!(exists(&redis, &[v]).await, 0);
}

#[tokio::test]
async fn purge_during_a_lease_makes_the_old_commit_lost() {
    let redis = TestRedis::start().await;
    let store = store(&redis, false).await;
    let k = key("purge");
    let held = lease(secs(5));
    store.acquire(&k, &held, None).await.unwrap();

    assert_eq!(store.purge(&k, Bytes::new()).await, Ok(true));
    assert_eq!(
        store
            .commit(
                &k,
                held.token,
                Bytes::from_static(b"old"),
                secs(60),
                false,
                Bytes::new()
            )
            .await,
        Ok(Fenced::Lost)
    );
    assert_eq!(store.status(&k).await, Ok(KeyStatus::Empty));
    assert_eq!(exists(&redis, &store.key_names(&k)).await, 0);
    assert_eq!(store.purge(&k, Bytes::new()).await, Ok(false));
}

#[tokio::test]
async fn give_up_leaves_a_pass_marker() {
    let redis = TestRedis::start().await;
    let store = store(&redis, false).await;
    let k = key("give-up");
    let [_, l, p] = store.key_names(&k);
    let held = lease(secs(5));
    store.acquire(&k, &held, None).await.unwrap();

    assert_eq!(
        store
            .give_up(&k, Token::random(), secs(30), Bytes::new())
            .await,
        Ok(Fenced::Lost)
    );
    assert_eq!(exists(&redis, std::slice::from_ref(&p)).await, 0);

    assert_eq!(
        store.give_up(&k, held.token, secs(30), Bytes::new()).await,
        Ok(Fenced::Done)
    );
    assert_eq!(exists(&redis, &[l]).await, 0);
    let pass_pttl = pttl(&redis, &p).await;
    assert!(pass_pttl > 25_000 && pass_pttl <= 30_000, "{pass_pttl}");
    match store.acquire(&k, &lease(secs(5)), None).await.unwrap() {
        Acquired::Pass { ttl_left } => {
            assert!(ttl_left > secs(25) && ttl_left <= secs(30), "{ttl_left:?}")
        }
        other => panic!("expected pass, got {other:?}"),
    }
    assert!(matches!(store.status(&k).await, Ok(KeyStatus::Pass { .. })));
}

#[tokio::test]
async fn release_lets_another_token_lead_with_a_larger_fence() {
    let redis = TestRedis::start().await;
    let store = store(&redis, false).await;
    let k = key("release");
    let held = lease(secs(5));
    let Acquired::Lead { fence: first } = store.acquire(&k, &held, None).await.unwrap() else {
        panic!("should lead")
    };

    assert_eq!(
        store.release(&k, Token::random(), Bytes::new()).await,
        Ok(Fenced::Lost)
    );
    assert_eq!(
        store.release(&k, held.token, Bytes::new()).await,
        Ok(Fenced::Done)
    );
    assert_eq!(
        store.release(&k, held.token, Bytes::new()).await,
        Ok(Fenced::Lost)
    );

    match store.acquire(&k, &lease(secs(5)), None).await.unwrap() {
        Acquired::Lead { fence } => assert!(fence > first, "{fence} after {first}"),
        other => panic!("another token should lead, got {other:?}"),
    }
}

#[tokio::test]
async fn sliding_touch_only_pexpires_below_the_slack_and_never_rewrites() {
    let redis = TestRedis::start().await;
    let store = store(&redis, false).await;
    let k = key("sliding");
    let [v, _, _] = store.key_names(&k);
    let held = lease(secs(5));
    store.acquire(&k, &held, None).await.unwrap();
    let value = Bytes::from_static(b"sliding value");
    store
        .commit(
            &k,
            held.token,
            value.clone(),
            secs(100),
            false,
            Bytes::new(),
        )
        .await
        .unwrap();
    let touch = Touch {
        ttl: secs(100),
        slack: secs(20),
    };

    // Above ttl - slack: left alone.
    pexpire(&redis, &v, 90_000).await;
    redis.reset_stats().await;
    let Acquired::Hit { ttl_left, .. } = store
        .acquire(&k, &lease(secs(5)), Some(touch))
        .await
        .unwrap()
    else {
        panic!("expected a hit")
    };
    assert!(ttl_left <= secs(90), "{ttl_left:?}");
    assert!(pttl(&redis, &v).await <= 90_000);

    // Below ttl - slack: touched back to ttl, by PEXPIRE alone (commandstats counts the commands a
    // script calls under their own names).
    pexpire(&redis, &v, 50_000).await;
    redis.reset_stats().await;
    let got = store
        .acquire(&k, &lease(secs(5)), Some(touch))
        .await
        .unwrap();
    assert_eq!(
        got,
        Acquired::Hit {
            value: value.clone(),
            ttl_left: secs(100)
        }
    );
    assert!(pttl(&redis, &v).await > 95_000);
    assert_eq!(redis.command_calls("pexpire").await, 1);
    assert_eq!(
        redis.command_calls("set").await,
        0,
        "the value is never rewritten"
    );
    let stored: Vec<u8> = redis.client().await.get(&v).await.unwrap();
    assert_eq!(stored, value.as_ref());

    // Peek touches the same way.
    pexpire(&redis, &v, 50_000).await;
    assert!(matches!(
        store.peek(&k, Some(touch)).await,
        Ok(Acquired::Hit { ttl_left, .. }) if ttl_left == secs(100)
    ));
}

#[tokio::test]
async fn absolute_hits_and_status_never_change_a_ttl() {
    let redis = TestRedis::start().await;
    let store = store(&redis, false).await;
    let k = key("absolute");
    let [v, l, p] = store.key_names(&k);

    // Pending: status reads the lease without touching it.
    let held = lease(secs(5));
    store.acquire(&k, &held, None).await.unwrap();
    pexpire(&redis, &l, 3000).await;
    match store.status(&k).await.unwrap() {
        KeyStatus::Pending { lease_left } => assert!(lease_left <= secs(3), "{lease_left:?}"),
        other => panic!("expected pending, got {other:?}"),
    }
    assert!(pttl(&redis, &l).await <= 3000);

    store
        .commit(
            &k,
            held.token,
            Bytes::from_static(b"v"),
            secs(100),
            false,
            Bytes::new(),
        )
        .await
        .unwrap();
    pexpire(&redis, &v, 10_000).await;
    redis.reset_stats().await;
    let Acquired::Hit { ttl_left, .. } = store.acquire(&k, &lease(secs(5)), None).await.unwrap()
    else {
        panic!("expected a hit")
    };
    assert!(ttl_left <= secs(10), "{ttl_left:?}");
    match store.status(&k).await.unwrap() {
        KeyStatus::Exists { ttl_left } => assert!(ttl_left <= secs(10), "{ttl_left:?}"),
        other => panic!("expected exists, got {other:?}"),
    }
    assert!(pttl(&redis, &v).await <= 10_000);
    assert_eq!(redis.command_calls("pexpire").await, 0);

    // Pass marker.
    redis.client().await.del::<_, ()>(&v).await.unwrap();
    redis
        .client()
        .await
        .pset_ex::<_, _, ()>(&p, "1", 7000)
        .await
        .unwrap();
    match store.status(&k).await.unwrap() {
        KeyStatus::Pass { ttl_left } => assert!(ttl_left <= secs(7), "{ttl_left:?}"),
        other => panic!("expected pass, got {other:?}"),
    }
    assert!(pttl(&redis, &p).await <= 7000);
    redis.client().await.del::<_, ()>(&p).await.unwrap();
    assert_eq!(store.status(&k).await, Ok(KeyStatus::Empty));
    assert_eq!(redis.command_calls("pexpire").await, 0);
}

#[tokio::test]
async fn discard_removes_only_identical_bytes() {
    let redis = TestRedis::start().await;
    let store = store(&redis, false).await;
    let k = key("discard");
    let [v, _, _] = store.key_names(&k);
    redis
        .client()
        .await
        .pset_ex::<_, _, ()>(&v, b"corrupt\x00".as_slice(), 60_000)
        .await
        .unwrap();

    assert_eq!(
        store.discard(&k, &Bytes::from_static(b"corrupt")).await,
        Ok(false)
    );
    assert_eq!(exists(&redis, std::slice::from_ref(&v)).await, 1);
    assert_eq!(
        store.discard(&k, &Bytes::from_static(b"corrupt\x00")).await,
        Ok(true)
    );
    assert_eq!(exists(&redis, std::slice::from_ref(&v)).await, 0);
    assert_eq!(
        store.discard(&k, &Bytes::from_static(b"corrupt\x00")).await,
        Ok(false)
    );
}

/// Subscribes to the namespace's event channel and waits until the subscription is live.
async fn subscribe(redis: &TestRedis) -> redis::aio::PubSub {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub connection");
    pubsub
        .subscribe(corral::bus::redis_channel(NS))
        .await
        .expect("SUBSCRIBE");
    pubsub
}

/// Publishes a sentinel on the channel: the next message after the expected ones must be it, so
/// nothing else was published in between.
async fn publish_sentinel(redis: &TestRedis) -> Bytes {
    let sentinel = Bytes::from_static(b"sentinel");
    let _: i64 = redis
        .client()
        .await
        .publish(corral::bus::redis_channel(NS), sentinel.as_ref())
        .await
        .unwrap();
    sentinel
}

async fn next_payload(messages: &mut (impl futures::Stream<Item = redis::Msg> + Unpin)) -> Bytes {
    let msg = tokio::time::timeout(OUTER, messages.next())
        .await
        .expect("a message within 5 s")
        .expect("subscription open");
    Bytes::copy_from_slice(msg.get_payload_bytes())
}

#[tokio::test]
async fn announce_publishes_exactly_the_event_bytes() {
    let redis = TestRedis::start().await;
    let store = store(&redis, true).await;
    assert!(store.announces());
    let mut pubsub = subscribe(&redis).await;
    let mut messages = pubsub.on_message();
    let event = |tag: u8| Bytes::from(vec![0x00, tag, 0xff, b'\n', 0x80]);
    let k = key("announce");

    let held = lease(secs(5));
    store.acquire(&k, &held, None).await.unwrap();
    // Lost writes publish nothing.
    store
        .commit(
            &k,
            Token::random(),
            Bytes::from_static(b"x"),
            secs(60),
            false,
            event(9),
        )
        .await
        .unwrap();
    store
        .commit(
            &k,
            held.token,
            Bytes::from_static(b"v"),
            secs(60),
            false,
            event(1),
        )
        .await
        .unwrap();
    assert_eq!(next_payload(&mut messages).await, event(1));

    let k2 = key("announce-release");
    let held = lease(secs(5));
    store.acquire(&k2, &held, None).await.unwrap();
    assert_eq!(
        store.release(&k2, held.token, event(2)).await,
        Ok(Fenced::Done)
    );
    assert_eq!(next_payload(&mut messages).await, event(2));

    let held = lease(secs(5));
    store.acquire(&k2, &held, None).await.unwrap();
    assert_eq!(
        store.give_up(&k2, held.token, secs(30), event(3)).await,
        Ok(Fenced::Done)
    );
    assert_eq!(next_payload(&mut messages).await, event(3));

    assert_eq!(store.purge(&k, event(4)).await, Ok(true));
    assert_eq!(next_payload(&mut messages).await, event(4));
    // Purge announces even when nothing was there: other processes' L1 may hold a copy.
    assert_eq!(store.purge(&key("nothing"), event(5)).await, Ok(false));
    assert_eq!(next_payload(&mut messages).await, event(5));

    let sentinel = publish_sentinel(&redis).await;
    assert_eq!(next_payload(&mut messages).await, sentinel);
}

#[tokio::test]
async fn without_announce_nothing_is_published() {
    let redis = TestRedis::start().await;
    let store = store(&redis, false).await;
    let mut pubsub = subscribe(&redis).await;
    let mut messages = pubsub.on_message();
    let event = Bytes::from_static(b"event");
    let k = key("quiet");

    let held = lease(secs(5));
    store.acquire(&k, &held, None).await.unwrap();
    store
        .commit(
            &k,
            held.token,
            Bytes::from_static(b"v"),
            secs(60),
            false,
            event.clone(),
        )
        .await
        .unwrap();
    let held = lease(secs(5));
    store.acquire(&key("quiet-2"), &held, None).await.unwrap();
    store
        .release(&key("quiet-2"), held.token, event.clone())
        .await
        .unwrap();
    let held = lease(secs(5));
    store.acquire(&key("quiet-3"), &held, None).await.unwrap();
    store
        .give_up(&key("quiet-3"), held.token, secs(30), event.clone())
        .await
        .unwrap();
    store.purge(&k, event.clone()).await.unwrap();

    let sentinel = publish_sentinel(&redis).await;
    assert_eq!(next_payload(&mut messages).await, sentinel);
}

#[tokio::test]
async fn scripts_are_reloaded_after_script_flush() {
    let redis = TestRedis::start().await;
    let store = store(&redis, false).await;
    let k = key("flush");
    let held = lease(secs(5));
    store.acquire(&k, &held, None).await.unwrap();

    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut redis.client().await)
        .await
        .unwrap();
    redis.reset_stats().await;
    assert_eq!(
        store
            .acquire(&k, &held, None)
            .await
            .map(|a| matches!(a, Acquired::Lead { .. })),
        Ok(true)
    );
    assert_eq!(redis.command_calls("script|load").await, 1, "reloaded once");
    assert_eq!(redis.command_calls("eval").await, 0, "never sent as EVAL");
    // The EVALSHA that got NOSCRIPT, then the one after the SCRIPT LOAD.
    assert_eq!(redis.command_calls("evalsha").await, 2);
    // Loaded again, so plain EVALSHA from here on.
    assert!(matches!(
        store.acquire(&k, &held, None).await,
        Ok(Acquired::Lead { .. })
    ));
    assert_eq!(redis.command_calls("script|load").await, 1);
    assert_eq!(redis.command_calls("evalsha").await, 3);
}

#[tokio::test]
async fn a_paused_redis_times_out_and_the_retry_leads() {
    let mut redis = TestRedis::start().await;
    let mut config = RedisStoreConfig::new(redis.url(), NS);
    config.response_timeout = Duration::from_millis(300);
    let store = RedisStore::connect(config).await.unwrap();
    let k = key("paused");
    let [_, l, _] = store.key_names(&k);
    // Connection up and the ACQUIRE script loaded (peek runs the same script), so the paused call
    // is a plain EVALSHA that the server will run once it resumes.
    assert_eq!(store.peek(&k, None).await, Ok(Acquired::Empty));

    let held = lease(secs(30));
    redis.pause();
    let result = tokio::time::timeout(OUTER, store.acquire(&k, &held, None)).await;
    redis.resume();
    assert_eq!(
        result.expect("acquire must return on its own"),
        Err(StoreError::Timeout { op: "acquire" })
    );

    // The timed-out acquire still ran once the server resumed and created the lease ...
    support::eventually("the timed-out acquire creates its lease", || async {
        exists(&redis, std::slice::from_ref(&l)).await == 1
    })
    .await;
    // ... so the engine's retry with the same token must lead on it, never wait on its own lease,
    // and the connection still pairs every reply with its own request.
    let retry = tokio::time::timeout(OUTER, store.acquire(&k, &held, None))
        .await
        .expect("acquire must return");
    assert!(matches!(retry, Ok(Acquired::Lead { .. })), "{retry:?}");
    assert!(matches!(
        store.acquire(&k, &lease(secs(5)), None).await,
        Ok(Acquired::Wait { .. })
    ));
}

#[tokio::test]
async fn connecting_to_a_closed_port_is_unavailable() {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let config = RedisStoreConfig::new(format!("redis://127.0.0.1:{port}/"), NS);
    let result = tokio::time::timeout(OUTER, RedisStore::connect(config))
        .await
        .expect("connect must return on its own");
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "{result:?}"
    );
}

#[tokio::test]
async fn connecting_to_a_silent_server_gives_up_after_the_connect_timeout() {
    // Accepts TCP connections (the kernel completes the handshake) but never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let mut config = RedisStoreConfig::new(format!("redis://127.0.0.1:{port}/"), NS);
    config.connect_timeout = Duration::from_millis(300);
    let result = tokio::time::timeout(OUTER, RedisStore::connect(config))
        .await
        .expect("connect must return on its own");
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "{result:?}"
    );
    drop(silent);
}

// ------------------------------------------------------------- stale entries ----

/// Commits `value` fresh for a minute and kept two, under a lease taken for it.
async fn commit_with_stale_window(store: &RedisStore, k: &KeyHash, value: &'static [u8]) {
    let held = lease(secs(5));
    assert!(matches!(
        store.acquire(k, &held, None).await,
        Ok(Acquired::Lead { .. })
    ));
    let done = store
        .commit_fresh(
            k,
            held.token,
            Bytes::from_static(value),
            secs(60),
            secs(120),
            false,
            Bytes::new(),
        )
        .await;
    assert_eq!(done, Ok(Fenced::Done));
}

/// Ends the value's freshness now, as the server's clock passing it would (its fresh-until marker
/// says when, in the server's milliseconds).
async fn make_stale(redis: &TestRedis, store: &RedisStore, k: &KeyHash) {
    let name = store.fresh_key_name(k);
    let left = pttl(redis, &name).await;
    assert!(
        left > 0,
        "a value with a stale window has a fresh-until marker"
    );
    let _: () = redis::cmd("SET")
        .arg(&name)
        .arg("0")
        .arg("PX")
        .arg(left)
        .query_async(&mut redis.client().await)
        .await
        .expect("SET");
}

#[tokio::test]
async fn a_stale_value_tells_exactly_one_caller_to_lead_its_refresh() {
    let redis = TestRedis::start().await;
    let (a, b) = (store(&redis, false).await, store(&redis, false).await);
    let k = key("stale-leader");
    commit_with_stale_window(&a, &k, b"old").await;
    let [v, _, _] = a.key_names(&k);
    assert!(
        (119_000..=120_000).contains(&pttl(&redis, &v).await),
        "kept for freshness plus the stale window"
    );
    match a.acquire(&k, &lease(secs(5)), None).await {
        Ok(Acquired::Hit { ttl_left, .. }) => {
            assert!(ttl_left <= secs(60) && ttl_left > secs(59), "{ttl_left:?}")
        }
        other => panic!("a fresh value is a hit, got {other:?}"),
    }
    make_stale(&redis, &a, &k).await;

    // Concurrent acquires from two connections: exactly one leads the refresh.
    let leases = support::stale::leases(20, secs(5));
    let leader = support::stale::exactly_one_refresh_leader(&a, &b, &k, &leases, b"old").await;
    // Its retry leads again; a peek sees someone refreshing and takes nothing.
    assert!(matches!(
        a.acquire(&k, leader, None).await,
        Ok(Acquired::Stale {
            refresh: Refresh::Lead { .. },
            ..
        })
    ));
    assert!(matches!(
        b.peek(&k, None).await,
        Ok(Acquired::Stale {
            refresh: Refresh::Elsewhere { .. },
            ..
        })
    ));

    // A failed refresh leaves the stale value, and a later caller may lead.
    assert_eq!(
        a.release(&k, leader.token, Bytes::new()).await,
        Ok(Fenced::Done)
    );
    assert!(matches!(
        b.peek(&k, None).await,
        Ok(Acquired::Stale {
            refresh: Refresh::Idle,
            ..
        })
    ));
    let next = lease(secs(5));
    assert!(matches!(
        b.acquire(&k, &next, None).await,
        Ok(Acquired::Stale {
            refresh: Refresh::Lead { .. },
            ..
        })
    ));
    // Its commit replaces the value, fresh again.
    let done = b
        .commit_fresh(
            &k,
            next.token,
            Bytes::from_static(b"new"),
            secs(60),
            secs(120),
            false,
            Bytes::new(),
        )
        .await;
    assert_eq!(done, Ok(Fenced::Done));
    assert!(matches!(
        a.acquire(&k, &lease(secs(5)), None).await,
        Ok(Acquired::Hit { value, .. }) if value == Bytes::from_static(b"new")
    ));
}

#[tokio::test]
async fn an_uncacheable_refresh_takes_the_stale_value_with_it() {
    let redis = TestRedis::start().await;
    let store = store(&redis, false).await;
    let k = key("stale-give-up");
    commit_with_stale_window(&store, &k, b"old").await;
    make_stale(&redis, &store, &k).await;
    let refresher = lease(secs(5));
    store.acquire(&k, &refresher, None).await.unwrap();
    assert_eq!(
        store
            .give_up(&k, refresher.token, secs(2), Bytes::new())
            .await,
        Ok(Fenced::Done)
    );
    assert!(matches!(
        store.peek(&k, None).await,
        Ok(Acquired::Pass { .. })
    ));
    let [v, _, _] = store.key_names(&k);
    assert_eq!(exists(&redis, &[v, store.fresh_key_name(&k)]).await, 0);
}

#[tokio::test]
async fn an_early_refresh_leases_a_fresh_value_once_and_never_an_absent_one() {
    let redis = TestRedis::start().await;
    let store = store(&redis, false).await;
    let k = key("early");
    assert_eq!(
        store.lead_refresh(&k, &lease(secs(5)), secs(61)).await,
        Ok(Refresh::Idle)
    );
    assert_eq!(
        store.status(&k).await,
        Ok(KeyStatus::Empty),
        "no lease over nothing"
    );
    commit_with_stale_window(&store, &k, b"v").await;
    // Fresh for a minute: not within ten seconds of its end, so nothing is taken.
    assert_eq!(
        store.lead_refresh(&k, &lease(secs(5)), secs(10)).await,
        Ok(Refresh::Idle)
    );
    let [_, l, _] = store.key_names(&k);
    assert_eq!(exists(&redis, &[l]).await, 0, "no lease taken");
    let first = lease(secs(5));
    assert!(matches!(
        store.lead_refresh(&k, &first, secs(61)).await,
        Ok(Refresh::Lead { .. })
    ));
    assert!(matches!(
        store.lead_refresh(&k, &lease(secs(5)), secs(61)).await,
        Ok(Refresh::Elsewhere { .. })
    ));
    // Readers keep the fresh value while the early refresh runs.
    assert!(matches!(
        store.acquire(&k, &lease(secs(5)), None).await,
        Ok(Acquired::Hit { .. })
    ));
}

#[tokio::test]
async fn a_value_without_a_stale_window_is_fresh_until_it_expires() {
    let redis = TestRedis::start().await;
    let store = store(&redis, false).await;
    let k = key("no-window");
    let held = lease(secs(5));
    store.acquire(&k, &held, None).await.unwrap();
    store
        .commit(
            &k,
            held.token,
            Bytes::from_static(b"v"),
            secs(60),
            false,
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(exists(&redis, &[store.fresh_key_name(&k)]).await, 0);
    assert!(matches!(
        store.acquire(&k, &lease(secs(5)), None).await,
        Ok(Acquired::Hit { .. })
    ));
}
