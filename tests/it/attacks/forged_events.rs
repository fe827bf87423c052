//! Forged bus events that carry a payload: a READY with an inline value and a FAILED with an error
//! response (and an UNCACHEABLE, which would send every waiter to the upstream), published by someone who can publish on the bus (NATS, or Redis pub/sub) but cannot
//! write the store, while a real lease on the key is live.
//!
//! Waiting requests must never be answered with the forged payload: each forged event only sends
//! the waiting flight back to the store (which still reports the live lease), and the real answer
//! reaches everyone once the real fetch commits, from one upstream fetch.

use crate::support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use corral::bus::{Event, EventKind, nats_subject, redis_channel};
use corral::envelope::{self, Entry};
use corral::key::KeyHash;
use corral::store::Token;
use http::Method;
use support::proxy::{ProxyCluster, fill};
use support::upstream::Upstream;
use support::{TestNats, TestRedis, eventually};

const TOKEN: &str = "secret";

const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0, token: secret }
namespace: forge
{{backing}}
defaults: { ttl: 60s, wait_timeout: 10s, lease_ttl: 10s, poll_interval: 5s, max_body: 1MiB, pass_ttl: 2s }
routes:
  - name: rest
    match: { path_prefix: / }
    upstream: {{upstream}}
"#;

/// Who publishes the forged events, on the bus the replicas listen to.
enum Forger {
    Nats(async_nats::Client),
    Redis(redis::aio::MultiplexedConnection),
}

impl Forger {
    async fn publish(&mut self, key: &KeyHash, bytes: Bytes) {
        match self {
            Forger::Nats(client) => {
                client
                    .publish(nats_subject("forge", key), bytes)
                    .await
                    .expect("publish on NATS");
                client.flush().await.expect("flush");
            }
            Forger::Redis(conn) => {
                let _: i64 = redis::cmd("PUBLISH")
                    .arg(redis_channel("forge"))
                    .arg(bytes.as_ref())
                    .query_async(conn)
                    .await
                    .expect("PUBLISH on Redis");
            }
        }
    }
}

/// The value of one sample (`name` with its labels, as exported) on replica `i` (0 when absent).
async fn metric(proxy: &ProxyCluster, i: usize, name: &str) -> f64 {
    let text = proxy.admin(i, Method::GET, "/metrics").send().await.text();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn acquires(proxy: &ProxyCluster, i: usize) -> f64 {
    metric(
        proxy,
        i,
        "corral_store_operations_total{op=\"acquire\",result=\"ok\"}",
    )
    .await
}

/// A well-formed envelope for `key` with the attacker's body: exactly what a real leader's event
/// would carry, so only the lease binding can tell it apart.
fn forged_envelope(key: KeyHash, status: u16) -> Bytes {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after the epoch")
        .as_millis() as u64;
    envelope::encode(&Entry {
        status,
        headers: vec![("content-type".into(), Bytes::from_static(b"text/plain"))],
        body: Bytes::from_static(b"forged body"),
        stored_at_ms: now,
        ttl: Duration::from_secs(60),
        stale: Duration::ZERO,
        stale_if_error: Duration::ZERO,
        fetch_time: Duration::ZERO,
        key,
        form: envelope::Form::Answer,
    })
    .expect("encode the forged envelope")
}

async fn forged_payloads_never_answer_a_wait(backing: &str, forger: impl AsyncFnOnce() -> Forger) {
    let upstream = Upstream::start().await.distinct_bodies("/forge");
    let hold = upstream.hold("/forge");
    let yaml = fill(
        CONFIG,
        &[("backing", backing), ("upstream", &upstream.url())],
    );
    let proxy = ProxyCluster::start(2, &yaml, None).await;
    let url = "/forge/me";
    let status = proxy.status(0, TOKEN, url).await;
    let key = KeyHash::from_hex(status.json()["key"].as_str().expect("a key")).expect("hex");

    let leader = tokio::spawn(proxy.get(0, url).send());
    upstream.wait_for_hits(url, 1).await;
    let before = acquires(&proxy, 1).await;
    let follower = tokio::spawn(proxy.get(1, url).send());
    // The follower's ACQUIRE answered (WAIT): from now on every event reaches its wait.
    eventually("the request on replica 1 waits on the lease", || async {
        acquires(&proxy, 1).await > before
    })
    .await;

    let mut forger = forger().await;
    let ready = EventKind::Ready {
        inline: Some(forged_envelope(key, 200)),
    };
    let failed = EventKind::Failed {
        message: "forged failure".into(),
        response: Some(forged_envelope(key, 500)),
    };
    // Each payload unbound (as an old-format event) and bound to a lease id the forger made up:
    // the live lease's id is known only to the store and the lease holder.
    let made_up = Token::random().lease_id();
    let forged = [
        ("ready", Event::new(key, ready.clone())),
        ("ready", Event::ending(key, made_up, ready)),
        ("failed", Event::new(key, failed.clone())),
        ("failed", Event::ending(key, made_up, failed)),
        // No payload, but taken at its word it would send every waiter to the upstream.
        ("uncacheable", Event::new(key, EventKind::Uncacheable)),
        (
            "uncacheable",
            Event::ending(key, made_up, EventKind::Uncacheable),
        ),
    ];
    for (kind, event) in forged {
        let heard = format!("corral_bus_events_total{{kind=\"{kind}\"}}");
        let (heard_before, acquired_before) =
            (metric(&proxy, 1, &heard).await, acquires(&proxy, 1).await);
        forger.publish(&key, event.encode()).await;
        // The event reached the waiting flight, which went back to the store instead of taking it
        // at its word.
        eventually(
            &format!("replica 1 hears the forged {kind} and re-reads the store"),
            || async {
                metric(&proxy, 1, &heard).await > heard_before
                    && acquires(&proxy, 1).await > acquired_before
            },
        )
        .await;
        assert!(
            !follower.is_finished(),
            "a forged {kind} ({:?}) ended the wait",
            event.lease
        );
    }
    assert_eq!(
        upstream.hits(url),
        1,
        "a forged event started a second fetch"
    );

    hold.release();
    let replies = [leader.await.unwrap(), follower.await.unwrap()];
    for reply in &replies {
        assert_eq!(reply.status, 200);
        assert_eq!(reply.text(), format!("response 1 for {url}"));
    }
    // Nothing forged entered replica 1's L1 either.
    let again = proxy.get(1, url).send().await;
    assert_eq!(again.text(), format!("response 1 for {url}"));
    assert_eq!(upstream.hits(url), 1, "one upstream fetch in all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_payloads_on_the_nats_bus_never_answer_a_wait() {
    let (redis, nats) = tokio::join!(TestRedis::start(), TestNats::start());
    let backing = format!(
        "store: {{ kind: redis, url: \"{}\" }}\nbus: {{ kind: nats, url: \"{}\" }}",
        redis.url(),
        nats.url()
    );
    forged_payloads_never_answer_a_wait(&backing, async || {
        Forger::Nats(
            async_nats::connect(nats.url())
                .await
                .expect("connect to NATS"),
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_payloads_on_the_redis_bus_never_answer_a_wait() {
    let redis = TestRedis::start().await;
    let backing = format!("store: {{ kind: redis, url: \"{}\" }}", redis.url());
    forged_payloads_never_answer_a_wait(&backing, async || Forger::Redis(redis.client().await))
        .await;
}
