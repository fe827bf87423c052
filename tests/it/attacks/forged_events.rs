//! Forged bus events that carry a payload: a READY with an inline value and a FAILED with an error
//! response (and an UNCACHEABLE, which would send every waiter to the upstream), published by someone who can publish on the bus (NATS, or Redis pub/sub) but cannot
//! write the store, while a real lease on the key is live.
//!
//! Waiting requests must never be answered with the forged payload: each forged event only sends
//! the waiting flight back to the store (which still reports the live lease), and the real answer
//! reaches everyone once the real fetch commits, from one upstream fetch.
//!
//! Events about a key or route rather than a lease: a forged GENERATION (even the largest number)
//! only prompts a re-read of the route's generation from the store, and a forged DELETED costs L1
//! copies, nothing more. Last, the least-privilege grants of docs/backends.md: corral runs with
//! them, and a client without them cannot publish an event corral takes.

use crate::support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use corral::bus::{Event, EventKind, nats_subject, redis_channel};
use corral::envelope::{self, Entry};
use corral::key::KeyHash;
use corral::store::Token;
use http::Method;
use support::proxy::{ProxyCluster, fill};
use support::secured::{SecuredServer, nats_conf, redis_plain};
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
/// A Redis store and the bus the replicas listen to: core NATS beside it, or Redis's pub/sub.
struct Backing {
    redis: TestRedis,
    nats: Option<TestNats>,
    /// The config's `store:` (and `bus:`) lines.
    yaml: String,
}

impl Backing {
    async fn with_nats_bus() -> Self {
        let (redis, nats) = tokio::join!(TestRedis::start(), TestNats::start());
        let yaml = format!(
            "store: {{ kind: redis, url: \"{}\" }}\nbus: {{ kind: nats, url: \"{}\" }}",
            redis.url(),
            nats.url()
        );
        Backing {
            redis,
            nats: Some(nats),
            yaml,
        }
    }

    async fn with_redis_bus() -> Self {
        let redis = TestRedis::start().await;
        let yaml = format!("store: {{ kind: redis, url: \"{}\" }}", redis.url());
        Backing {
            redis,
            nats: None,
            yaml,
        }
    }

    /// A client that can publish on the replicas' bus.
    async fn forger(&self) -> Forger {
        match &self.nats {
            Some(nats) => Forger::Nats(
                async_nats::connect(nats.url())
                    .await
                    .expect("connect to NATS"),
            ),
            None => Forger::Redis(self.redis.client().await),
        }
    }
}

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

async fn forged_payloads_never_answer_a_wait(backing: &Backing) {
    let upstream = Upstream::start().await.distinct_bodies("/forge");
    let hold = upstream.hold("/forge");
    let yaml = fill(
        CONFIG,
        &[("backing", &backing.yaml), ("upstream", &upstream.url())],
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

    let mut forger = backing.forger().await;
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
    forged_payloads_never_answer_a_wait(&Backing::with_nats_bus().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_payloads_on_the_redis_bus_never_answer_a_wait() {
    forged_payloads_never_answer_a_wait(&Backing::with_redis_bus().await).await;
}

// ------------------------------------------------------------------ forged GENERATION ----

/// The digest replica `i` keys `url` with now.
async fn key_on(proxy: &ProxyCluster, i: usize, url: &str) -> String {
    let status = proxy.status(i, TOKEN, url).await;
    assert_eq!(status.status, 200, "{}", status.text());
    status.json()["key"].as_str().expect("a key").to_owned()
}

/// A GENERATION event with the largest number, about the route `rest`, published by someone who
/// can publish on the bus but not write the store. It may cost a store read of the route's
/// generation; it must not move any replica's keys, nor make a later route purge a no-op that
/// answers "purged", nor make a restarted replica key the route apart from the others.
async fn a_forged_generation_moves_nothing(backing: &Backing) {
    let upstream = Upstream::start().await.distinct_bodies("/gen");
    let yaml = fill(
        CONFIG,
        &[("backing", &backing.yaml), ("upstream", &upstream.url())],
    );
    let proxy = ProxyCluster::start(2, &yaml, None).await;
    let url = "/gen/report";
    let old = proxy.get(0, url).send().await.text();
    for i in 0..2 {
        assert_eq!(
            proxy.get(i, url).send().await.text(),
            old,
            "replica {i} warm"
        );
    }
    let keys = [key_on(&proxy, 0, url).await, key_on(&proxy, 1, url).await];
    assert_eq!(keys[0], keys[1]);

    let heard = "corral_bus_events_total{kind=\"generation\"}";
    let reads = "corral_store_operations_total{op=\"route_generation\",result=\"ok\"}";
    let mut before = Vec::new();
    for i in 0..2 {
        before.push((
            metric(&proxy, i, heard).await,
            metric(&proxy, i, reads).await,
        ));
    }
    let mut forger = backing.forger().await;
    let route = corral::key::generation_key("rest");
    let forged = Event::new(
        route,
        EventKind::Generation {
            generation: u64::MAX,
        },
    );
    forger.publish(&route, forged.encode()).await;
    for (i, (heard_before, reads_before)) in before.into_iter().enumerate() {
        eventually(
            &format!("replica {i} hears the forged GENERATION and re-reads the store"),
            || async {
                metric(&proxy, i, heard).await > heard_before
                    && metric(&proxy, i, reads).await > reads_before
            },
        )
        .await;
        assert_eq!(key_on(&proxy, i, url).await, keys[i], "replica {i} moved");
    }

    // A route purge takes effect, and says so truthfully.
    let reply = proxy
        .admin(0, Method::POST, "/admin/purge")
        .bearer(TOKEN)
        .json(&serde_json::json!({"route": "rest"}))
        .send()
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let answer = reply.json();
    assert_eq!(answer["purged"], serde_json::json!(true), "{answer}");
    assert_eq!(answer["generation"], serde_json::json!(1), "{answer}");
    assert_eq!(answer["previous"], serde_json::json!(0), "{answer}");
    let fresh = proxy.get(0, url).send().await;
    assert_eq!(fresh.x_cache(), "MISS", "the purge changed nothing");
    assert_ne!(fresh.text(), old);
    eventually("replica 1 drops the purged route", || async {
        proxy.get(1, url).send().await.text() == fresh.text()
    })
    .await;
    assert_eq!(
        upstream.hits(url),
        2,
        "one fetch before the purge, one after"
    );

    // A replica that starts now keys the route as the others do.
    let late = ProxyCluster::start(1, &yaml, None).await;
    let now = key_on(&proxy, 0, url).await;
    assert_ne!(now, keys[0], "the purge changed the key");
    assert_eq!(key_on(&proxy, 1, url).await, now);
    assert_eq!(key_on(&late, 0, url).await, now, "a restarted replica");
    assert_eq!(late.get(0, url).send().await.text(), fresh.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_generation_on_the_nats_bus_moves_nothing() {
    a_forged_generation_moves_nothing(&Backing::with_nats_bus().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_generation_on_the_redis_bus_moves_nothing() {
    a_forged_generation_moves_nothing(&Backing::with_redis_bus().await).await;
}

// --------------------------------------------------------------------- least privilege ----
//
// The grants docs/backends.md gives ("Least privilege"), for namespace `forge`: corral runs with
// them, and another client of the same servers, without them, can neither publish an event
// corral would take nor write corral's keys.

/// The Redis ACL of corral's user, as documented.
const CORRAL_ACL: [&str; 6] = [
    "resetkeys",
    "~forge:*",
    "resetchannels",
    "&forge:*",
    "+@all",
    "-@dangerous",
];

/// Forged DELETEs heard by replica 1 (any forged one that got through shows here).
async fn deletes_heard(proxy: &ProxyCluster) -> f64 {
    metric(proxy, 1, "corral_bus_events_total{kind=\"deleted\"}").await
}

/// After an attempt to publish that the server refused: a real purge is heard exactly once, so
/// the refused event never arrived.
async fn only_the_real_purge_is_heard(proxy: &ProxyCluster, url: &str, before: f64) {
    let purged = proxy.purge(0, TOKEN, url).await;
    assert_eq!(purged.status, 200, "{}", purged.text());
    eventually("replica 1 hears the real purge", || async {
        deletes_heard(proxy).await > before
    })
    .await;
    assert_eq!(deletes_heard(proxy).await, before + 1.0, "one DELETE heard");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_user_without_corrals_grants_gets_noperm_and_corral_hears_nothing() {
    let redis = SecuredServer::redis(|port| {
        let mut args = vec![
            "--user",
            "default",
            "off",
            "--user",
            "corral",
            "on",
            ">corral-pw",
        ];
        args.extend(CORRAL_ACL);
        args.extend([
            "--user",
            "app",
            "on",
            ">app-pw",
            "~app:*",
            "&app:*",
            "+@all",
            "-@dangerous",
        ]);
        redis_plain(port, &args)
    })
    .await;
    let upstream = Upstream::start().await;
    let backing = format!(
        "store: {{ kind: redis, url: 'redis://corral:corral-pw@127.0.0.1:{}/' }}",
        redis.port()
    );
    let yaml = fill(
        CONFIG,
        &[("backing", &backing), ("upstream", &upstream.url())],
    );
    // Corral works with the documented grants: both replicas ready, a fill shared.
    let proxy = ProxyCluster::start(2, &yaml, None).await;
    let url = "/granted";
    assert_eq!(proxy.get(0, url).send().await.status, 200);
    assert_eq!(proxy.get(1, url).send().await.x_cache(), "HIT");
    let key = KeyHash::from_hex(
        proxy.status(0, TOKEN, url).await.json()["key"]
            .as_str()
            .unwrap(),
    )
    .unwrap();

    let client =
        redis::Client::open(format!("redis://app:app-pw@127.0.0.1:{}/", redis.port())).unwrap();
    let mut app = client.get_multiplexed_async_connection().await.unwrap();
    let before = deletes_heard(&proxy).await;
    let published: redis::RedisResult<i64> = redis::cmd("PUBLISH")
        .arg(redis_channel("forge"))
        .arg(Event::new(key, EventKind::Deleted).encode().as_ref())
        .query_async(&mut app)
        .await;
    let refused = published.expect_err("the app user published on corral's channel");
    assert!(
        refused.to_string().to_lowercase().contains("noperm"),
        "{refused}"
    );
    let written: redis::RedisResult<()> = redis::cmd("SET")
        .arg(format!("forge:{{{}}}:v", key.to_hex()))
        .arg("forged")
        .query_async(&mut app)
        .await;
    let refused = written.expect_err("the app user wrote corral's key");
    assert!(
        refused.to_string().to_lowercase().contains("noperm"),
        "{refused}"
    );

    only_the_real_purge_is_heard(&proxy, url, before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_user_without_corrals_permissions_is_refused_and_corral_hears_nothing() {
    let nats = SecuredServer::nats(|port, dir| {
        let users = r#"authorization {
  users: [
    { user: corral, password: "corral-pw", permissions: { publish: ["forge.>"], subscribe: ["forge.>"] } }
    { user: app, password: "app-pw", permissions: { publish: ["app.>"], subscribe: ["app.>", "_INBOX.>"] } }
  ]
}"#;
        nats_conf(port, dir, users)
    })
    .await;
    let redis = TestRedis::start().await;
    let upstream = Upstream::start().await;
    let backing = format!(
        "store: {{ kind: redis, url: \"{}\" }}\nbus: {{ kind: nats, url: \"nats://127.0.0.1:{}\", username: corral, password: corral-pw }}",
        redis.url(),
        nats.port()
    );
    let yaml = fill(
        CONFIG,
        &[("backing", &backing), ("upstream", &upstream.url())],
    );
    let proxy = ProxyCluster::start(2, &yaml, None).await;
    let url = "/granted";
    assert_eq!(proxy.get(0, url).send().await.status, 200);
    let key = KeyHash::from_hex(
        proxy.status(0, TOKEN, url).await.json()["key"]
            .as_str()
            .unwrap(),
    )
    .unwrap();

    let (errors_tx, mut errors) = tokio::sync::mpsc::unbounded_channel();
    let app = async_nats::ConnectOptions::with_user_and_password("app".into(), "app-pw".into())
        .event_callback(move |event| {
            let errors_tx = errors_tx.clone();
            async move {
                if let async_nats::Event::ServerError(error) = event {
                    let _ = errors_tx.send(error.to_string());
                }
            }
        })
        .connect(format!("nats://127.0.0.1:{}", nats.port()))
        .await
        .expect("the app user connects");
    let before = deletes_heard(&proxy).await;
    app.publish(
        nats_subject("forge", &key),
        Event::new(key, EventKind::Deleted).encode(),
    )
    .await
    .expect("queued");
    app.flush().await.expect("flush");
    let refused = tokio::time::timeout(support::patience(), errors.recv())
        .await
        .expect("the server refuses within patience")
        .expect("an error");
    assert!(
        refused.to_lowercase().contains("permissions violation"),
        "{refused}"
    );

    only_the_real_purge_is_heard(&proxy, url, before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corral_runs_on_the_nats_kv_store_with_the_documented_permissions() {
    let nats = SecuredServer::nats(|port, dir| {
        let users = r#"authorization {
  users: [
    { user: corral, password: "corral-pw", permissions: {
        publish: ["$JS.API.>", "$KV.corral_forge.>", "$JS.ACK.>", "$JS.FC.>"],
        subscribe: ["_INBOX.>"] } }
    { user: app, password: "app-pw", permissions: { publish: ["app.>"], subscribe: ["app.>", "_INBOX.>"] } }
  ]
}"#;
        nats_conf(port, dir, users)
    })
    .await;
    let upstream = Upstream::start().await;
    let backing = format!(
        "store: {{ kind: nats, url: \"nats://127.0.0.1:{}\", username: corral, password: corral-pw }}",
        nats.port()
    );
    let yaml = fill(
        CONFIG,
        &[("backing", &backing), ("upstream", &upstream.url())],
    );
    let proxy = ProxyCluster::start(2, &yaml, None).await;
    let url = "/granted";
    assert_eq!(proxy.get(0, url).send().await.status, 200);
    eventually("replica 1 answers from the bucket", || async {
        proxy.get(1, url).send().await.status == 200 && upstream.hits(url) == 1
    })
    .await;
    let purged = proxy.purge(0, TOKEN, url).await;
    assert_eq!(purged.status, 200, "{}", purged.text());
    assert_eq!(purged.json()["purged"], serde_json::json!(true));

    let (errors_tx, mut errors) = tokio::sync::mpsc::unbounded_channel();
    let app = async_nats::ConnectOptions::with_user_and_password("app".into(), "app-pw".into())
        .event_callback(move |event| {
            let errors_tx = errors_tx.clone();
            async move {
                if let async_nats::Event::ServerError(error) = event {
                    let _ = errors_tx.send(error.to_string());
                }
            }
        })
        .connect(format!("nats://127.0.0.1:{}", nats.port()))
        .await
        .expect("the app user connects");
    app.publish("$KV.corral_forge.forged", "x".into())
        .await
        .expect("queued");
    app.flush().await.expect("flush");
    let refused = tokio::time::timeout(support::patience(), errors.recv())
        .await
        .expect("the server refuses within patience")
        .expect("an error");
    assert!(
        refused.to_lowercase().contains("permissions violation"),
        "{refused}"
    );
}

// --------------------------------------------------------------------- forged DELETED ----

/// A forged DELETED costs the replicas their L1 copy of the key, nothing more: the stored value
/// stays, and the next request is answered from the store, not from a new fetch.
async fn a_forged_delete_costs_an_l1_copy_only(backing: &Backing) {
    let upstream = Upstream::start().await.distinct_bodies("/del");
    let yaml = fill(
        CONFIG,
        &[("backing", &backing.yaml), ("upstream", &upstream.url())],
    );
    let proxy = ProxyCluster::start(2, &yaml, None).await;
    let url = "/del/report";
    let old = proxy.get(0, url).send().await.text();
    assert_eq!(proxy.get(1, url).send().await.text(), old);
    let key = KeyHash::from_hex(&key_on(&proxy, 0, url).await).expect("hex");

    let before = deletes_heard(&proxy).await;
    let mut forger = backing.forger().await;
    forger
        .publish(&key, Event::new(key, EventKind::Deleted).encode())
        .await;
    eventually("replica 1 hears the forged DELETED", || async {
        deletes_heard(&proxy).await > before
    })
    .await;
    let status = proxy.status(1, TOKEN, url).await;
    assert_eq!(
        status.json()["status"],
        serde_json::json!("EXISTS"),
        "{}",
        status.text()
    );
    let reply = proxy.get(1, url).send().await;
    assert_eq!(reply.x_cache(), "HIT");
    assert_eq!(reply.text(), old);
    assert_eq!(upstream.hits(url), 1, "no fetch because of a forged delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_delete_on_the_nats_bus_costs_an_l1_copy_only() {
    a_forged_delete_costs_an_l1_copy_only(&Backing::with_nats_bus().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_delete_on_the_redis_bus_costs_an_l1_copy_only() {
    a_forged_delete_costs_an_l1_copy_only(&Backing::with_redis_bus().await).await;
}
