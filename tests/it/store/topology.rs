//! corral on production Redis topologies, made of real processes: a primary and its replica under
//! three sentinels, and a three-primary Redis Cluster. The engine suite runs on the cluster too
//! (`on_every_backend!`'s `redis_cluster` case).

use crate::support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use corral::engine::{Dictionary, DictionaryConfig, Expiry};
use support::cluster::{Cluster, Kind};
use support::http::{Reply, send_all};
use support::proxy::{ProxyCluster, fill};
use support::topology::{TestRedisCluster, TestSentinels};
use support::upstream::Upstream;

const MS: Duration = Duration::from_millis(1);

/// Three replicas on the Redis deployment `{{url}}` (the bus follows the store), one route.
const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0 }
namespace: topo
store: { kind: redis, url: "{{url}}" }
defaults: { ttl: 60s, wait_timeout: {{wait}}, lease_ttl: 5s, poll_interval: 1s }
routes:
  - name: reports
    match: { path_prefix: /reports }
    upstream: {{upstream}}
"#;

async fn three_replicas(url: &str, upstream: &Upstream, wait: &str) -> ProxyCluster {
    let yaml = fill(
        CONFIG,
        &[("url", url), ("upstream", &upstream.url()), ("wait", wait)],
    );
    ProxyCluster::start(3, &yaml, None).await
}

/// What the test upstream answers for `path_and_query`: any other body is someone else's.
fn body_for(path_and_query: &str) -> String {
    format!("upstream body for {path_and_query}")
}

/// `per_key` GETs for each of `paths`, spread over the replicas.
fn burst(
    proxy: &ProxyCluster,
    paths: &[String],
    per_key: usize,
) -> Vec<(String, support::http::Call)> {
    let mut calls = Vec::new();
    for round in 0..per_key {
        for (k, path) in paths.iter().enumerate() {
            calls.push((path.clone(), proxy.get((k + round) % proxy.len(), path)));
        }
    }
    calls
}

/// Sends a burst and pairs each answer with the path it asked for.
async fn send_burst(calls: Vec<(String, support::http::Call)>) -> Vec<(String, Reply)> {
    let (paths, calls): (Vec<_>, Vec<_>) = calls.into_iter().unzip();
    paths.into_iter().zip(send_all(calls).await).collect()
}

fn assert_right_bodies(replies: &[(String, Reply)]) {
    for (path, reply) in replies {
        assert_eq!(reply.status, 200, "{path}: {reply:?}");
        assert_eq!(reply.text(), body_for(path), "{path}: a wrong body");
    }
}

fn paths(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("/reports/{prefix}-{i}")).collect()
}

// ------------------------------------------------------------------ Sentinel ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_during_a_burst_costs_at_most_one_fetch_per_key_per_replica_and_no_restart() {
    let mut sentinels = TestSentinels::start().await;
    let upstream = Upstream::start().await.slow("/reports", 1000 * MS);
    let wait = Duration::from_secs(8);
    let proxy = three_replicas(&sentinels.url(), &upstream, "8s").await;

    // Before: one fetch per key across the three replicas.
    let before = paths("before", 5);
    let replies = send_burst(burst(&proxy, &before, 6)).await;
    assert_right_bodies(&replies);
    for path in &before {
        assert_eq!(upstream.hits(path), 1, "{path} before the failover");
    }

    // During: every key's fetch is running (its lease taken) when the primary dies.
    let during = paths("during", 10);
    let burst_during = tokio::spawn(send_burst(burst(&proxy, &during, 6)));
    for path in &during {
        upstream.wait_for_hits(path, 1).await;
    }
    let killed = sentinels.kill_primary();
    let replies = burst_during.await.expect("the burst during the failover");

    assert_right_bodies(&replies);
    for (path, reply) in &replies {
        assert!(
            reply.took <= wait + 1000 * MS,
            "{path} took {:?}, past its {wait:?} deadline",
            reply.took
        );
    }
    let fetches: BTreeMap<&str, usize> = during
        .iter()
        .map(|p| (p.as_str(), upstream.hits(p)))
        .collect();
    // While no primary answers, a replica whose followers cannot reach the store fetches the key
    // itself, once (the degrade promise: at most one fetch per replica while the store is down);
    // the leader's own fetch is one of those.
    assert!(
        fetches.values().all(|&n| (1..=proxy.len()).contains(&n)),
        "a key in flight when the primary (pid {killed}) died was fetched more than once per \
         replica: {fetches:?}"
    );

    // After: the sentinels promoted the replica, and the same replicas (never restarted) serve
    // from it, one fetch per new key, and are ready.
    sentinels.wait_for_failover().await;
    let after = paths("after", 5);
    let replies = send_burst(burst(&proxy, &after, 6)).await;
    assert_right_bodies(&replies);
    for path in &after {
        assert_eq!(upstream.hits(path), 1, "{path} after the failover");
    }
    let mut promoted = sentinels.replica_client().await;
    let stored: Vec<String> = redis::cmd("KEYS")
        .arg("topo:*:v")
        .query_async(&mut promoted)
        .await
        .expect("KEYS on the promoted replica");
    assert!(
        stored.len() >= after.len(),
        "the values stored after the failover are on the promoted replica: {stored:?}"
    );
    for i in 0..proxy.len() {
        support::eventually(&format!("replica {i} to be ready again"), || async {
            proxy
                .http()
                .get(format!("{}/readyz", proxy.admin_url(i)))
                .try_send()
                .await
                .is_ok_and(|r| r.status == 200)
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_that_leaves_the_old_primary_up_is_followed_on_the_sentinels_notice() {
    // Nothing breaks the connections at first: the old primary keeps answering, and keeps taking
    // writes, until the sentinels reconfigure it as a replica (up to 10 s later). Only the
    // sentinels' +switch-master notice can move the replicas to the new primary before that.
    let sentinels = TestSentinels::start().await;
    let upstream = Upstream::start().await.slow("/reports", 200 * MS);
    let proxy = three_replicas(&sentinels.url(), &upstream, "8s").await;
    let before = paths("before", 3);
    assert_right_bodies(&send_burst(burst(&proxy, &before, 6)).await);

    sentinels.fail_over().await;
    sentinels.wait_for_failover().await;
    // Each replica's store connection, bus publisher and bus subscription.
    sentinels
        .wait_for_clients_on_new_primary(3 * proxy.len())
        .await;

    let after = paths("after", 5);
    let replies = send_burst(burst(&proxy, &after, 6)).await;
    assert_right_bodies(&replies);
    for path in &after {
        assert_eq!(upstream.hits(path), 1, "{path} after the failover");
    }
    let mut promoted = sentinels.replica_client().await;
    let stored: Vec<String> = redis::cmd("KEYS")
        .arg("topo:*:v")
        .query_async(&mut promoted)
        .await
        .expect("KEYS on the promoted replica");
    assert_eq!(
        stored.len(),
        before.len() + after.len(),
        "every value is on the new primary, none on the old one: {stored:?}"
    );
    // And once the old primary is a replica, nothing has to change.
    sentinels.wait_for_old_primary_to_replicate().await;
    let last = paths("last", 2);
    assert_right_bodies(&send_burst(burst(&proxy, &last, 3)).await);
}

/// A burst over three replicas on `url`, for six keys (so, on a cluster, scripts on every
/// primary publish): every follower is answered by the event, well before the 5 s poll would
/// have answered it.
async fn followers_wake_on_events(url: &str) {
    let upstream = Upstream::start().await.slow("/reports", 300 * MS);
    let yaml = fill(
        CONFIG,
        &[("url", url), ("upstream", &upstream.url()), ("wait", "8s")],
    )
    .replace("poll_interval: 1s", "poll_interval: 5s");
    let proxy = ProxyCluster::start(3, &yaml, None).await;
    let keys = paths("wake", 6);

    let replies = send_burst(burst(&proxy, &keys, 10)).await;

    assert_right_bodies(&replies);
    for path in &keys {
        assert_eq!(upstream.hits(path), 1, "{path}");
    }
    let slowest = replies
        .iter()
        .map(|(_, r)| r.took)
        .max()
        .unwrap_or_default();
    assert!(
        slowest < 3000 * MS,
        "the slowest follower took {slowest:?}: woken by the poll, not the event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sentinel_followers_wake_on_the_primary_s_events() {
    let sentinels = TestSentinels::start().await;
    followers_wake_on_events(&sentinels.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_followers_wake_on_events_published_on_any_primary() {
    // Each replica subscribes on one node; classic pub/sub carries events from every node.
    let cluster = TestRedisCluster::start().await;
    followers_wake_on_events(&cluster.url()).await;
}

// ------------------------------------------------------------------- Cluster ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_over_three_replicas_on_a_redis_cluster_reaches_the_upstream_once() {
    let cluster = TestRedisCluster::start().await;
    let upstream = Upstream::start().await.slow("/reports", 300 * MS);
    let proxy = three_replicas(&cluster.url(), &upstream, "8s").await;

    let replies = send_all(proxy.spread(90, "/reports/q1")).await;

    assert_eq!(upstream.hits("/reports/q1"), 1);
    for reply in &replies {
        assert_eq!(reply.status, 200);
        assert_eq!(reply.text(), body_for("/reports/q1"));
    }
    let misses = replies.iter().filter(|r| r.x_cache() == "MISS").count();
    assert_eq!(misses, 1, "exactly one MISS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_spread_over_every_primary_and_each_is_built_once() {
    let cluster = Cluster::start(Kind::RedisCluster).await;
    let config = DictionaryConfig::new("spread", Expiry::Absolute(Duration::from_secs(60)));
    let replicas: Vec<Dictionary<String, String>> = cluster.dictionaries(3, &config).await;
    let keys: Vec<String> = (0..30).map(|i| format!("key-{i}")).collect();
    let builds: Arc<Vec<AtomicUsize>> =
        Arc::new(keys.iter().map(|_| AtomicUsize::new(0)).collect());

    let mut calls = Vec::new();
    for (k, key) in keys.iter().enumerate() {
        for caller in 0..9 {
            let replica = replicas[caller % 3].clone();
            let (key, builds) = (key.clone(), builds.clone());
            calls.push(tokio::spawn(async move {
                let build = move || {
                    builds[k].fetch_add(1, Ordering::SeqCst);
                    let value = format!("value of {key}");
                    async move {
                        tokio::time::sleep(200 * MS).await;
                        Ok::<_, String>(value)
                    }
                };
                let key = format!("key-{k}");
                (
                    k,
                    replica
                        .build_or_retrieve(&key, build, Duration::from_secs(8))
                        .await,
                )
            }));
        }
    }
    for call in calls {
        let (k, value) = call.await.expect("caller");
        assert_eq!(value, Ok(format!("value of key-{k}")));
    }
    for (k, built) in builds.iter().enumerate() {
        assert_eq!(
            built.load(Ordering::SeqCst),
            1,
            "key-{k} was built more than once"
        );
    }
    let per_node = cluster
        .redis_cluster
        .as_ref()
        .expect("cluster")
        .keys_per_node()
        .await;
    assert!(
        per_node.iter().all(|&n| n > 0),
        "the values landed on every primary: {per_node:?}"
    );
}

// --------------------------------------------------------------- credentials ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn passwords_and_acl_users_work_through_sentinel_and_cluster() {
    // Sentinels and data nodes with passwords of their own; a cluster whose default user is off.
    let (sentinels, cluster) = tokio::join!(
        TestSentinels::with_passwords("data-secret", "watch-secret"),
        TestRedisCluster::with_acl_user("corral", "acl-secret"),
    );
    let upstream = Upstream::start().await.slow("/reports", 200 * MS);
    for (form, url) in [("sentinel", sentinels.url()), ("cluster", cluster.url())] {
        let proxy = three_replicas(&url, &upstream, "8s").await;
        let keys = paths(form, 3);
        let replies = send_burst(burst(&proxy, &keys, 6)).await;
        assert_right_bodies(&replies);
        for path in &keys {
            assert_eq!(upstream.hits(path), 1, "{form}: {path}");
        }
    }
}
