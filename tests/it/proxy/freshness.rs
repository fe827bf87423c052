//! Freshness under the lease, end to end: three replicas on a real Redis store and NATS bus, a
//! real upstream, answers past their freshness served stale while one refresh runs
//! (stale-while-revalidate), in place of a failed refresh (stale-if-error), and values refreshed
//! before they expire (early refresh).
//!
//! Freshness is one second; tests wait for it to end by watching the store's own clock (the
//! fresh-until marker beside the value, against Redis `TIME`), never by sleeping blind.

use crate::support;

use std::collections::HashSet;
use std::time::Duration;

use redis::AsyncCommands;
use support::eventually;
use support::http::{Reply, send_all};
use support::proxy::{ProxyCluster, fill};
use support::stale;
use support::upstream::Upstream;
use tokio::time::Instant;

const MS: Duration = Duration::from_millis(1);

/// The admin token of [`CONFIG`].
const TOKEN: &str = "secret";

/// The namespace of [`CONFIG`], which prefixes every Redis key.
const NS: &str = "fresh";

/// One route per behaviour, each fresh for one second. `{{upstream}}` and `{{down}}` (an upstream
/// the tests stop) are filled by [`start`], `{{redis}}` and `{{nats}}` by the cluster. The store's
/// timeout is raised from its 50 ms default: a stall on two loaded cores would degrade a flight to
/// its own fetch, which the held upstream then holds past the tests' bounds.
const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0, token: secret }
namespace: fresh
store: { kind: redis, url: "{{redis}}", timeout: 1s }
bus: { kind: nats, url: "{{nats}}" }
defaults: { ttl: 1s, wait_timeout: 10s, lease_ttl: 5s, poll_interval: 1s, honor_cache_control: false }
routes:
  - name: swr
    match: { path_prefix: /swr }
    upstream: {{upstream}}
    stale_while_revalidate: 1h
  - name: sie
    match: { path_prefix: /sie }
    upstream: {{upstream}}
    stale_if_error: 1h
  - name: sie-short
    match: { path_prefix: /short }
    upstream: {{upstream}}
    stale_if_error: 1s
  - name: sie-down
    match: { path_prefix: /down }
    upstream: {{down}}
    stale_if_error: 1h
  - name: revalidate
    match: { path_prefix: /revalidate }
    upstream: {{upstream}}
    honor_cache_control: true
    stale_if_error: 1h
  - name: early
    match: { path_prefix: /early }
    upstream: {{upstream}}
    early_refresh: 1
    stale_while_revalidate: 1h
"#;

/// Three replicas on a fresh Redis and NATS, in front of `upstream` (and `down`, where given).
async fn start(upstream: &Upstream, down: Option<&Upstream>) -> ProxyCluster {
    let down = down.map_or_else(Upstream::refusing, Upstream::url);
    let yaml = fill(CONFIG, &[("upstream", &upstream.url()), ("down", &down)]);
    ProxyCluster::with_redis_nats(3, &yaml).await
}

/// The store's name for the key of a GET of `path`, as the admin status reports it.
async fn value_key(cluster: &ProxyCluster, path: &str) -> String {
    stale::value_key(cluster, NS, TOKEN, path).await
}

/// Waits until the stored answer to a GET of `path` is past its freshness by the store's clock.
async fn wait_until_stale(cluster: &ProxyCluster, path: &str) {
    stale::wait_until_stale(cluster, NS, TOKEN, path).await
}

/// Waits until the store no longer holds an answer to a GET of `path`.
async fn wait_until_gone(cluster: &ProxyCluster, path: &str) {
    let value = format!("{}:v", value_key(cluster, path).await);
    eventually(&format!("{path} leaves the store"), || async {
        let held: bool = cluster
            .redis()
            .client()
            .await
            .exists(&value)
            .await
            .expect("EXISTS");
        !held
    })
    .await;
}

fn assert_stale(reply: &Reply, body: &str, why: &str, what: &str) {
    assert_eq!(reply.status, 200, "{what}: {}", reply.text());
    assert_eq!(reply.x_cache(), "STALE", "{what}");
    assert_eq!(
        reply.cache_status(),
        format!("corral; fwd=stale; detail={why}"),
        "{what}"
    );
    assert_eq!(reply.text(), body, "{what}: the stored answer");
}

/// The sum over every replica of one series of `/metrics`.
async fn metric(cluster: &ProxyCluster, name: &str, labels: &[&str]) -> f64 {
    let mut sum = 0.0;
    for i in 0..cluster.len() {
        let text = cluster
            .admin(i, http::Method::GET, "/metrics")
            .send()
            .await
            .text();
        sum += text
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter(|line| line.split('{').next() == Some(name))
            .filter(|line| labels.iter().all(|label| line.contains(label)))
            .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum::<f64>();
    }
    sum
}

/// 300 requests just after freshness ends are answered from the stored copy at once, all while the
/// one refresh they started is still held at the upstream; later requests get its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_answers_at_once_and_refreshes_once() {
    let upstream = Upstream::start().await.distinct_bodies("/swr");
    let cluster = start(&upstream, None).await;
    let first = cluster.get(0, "/swr/a").send().await;
    assert_eq!(first.x_cache(), "MISS");
    let old = first.text();
    wait_until_stale(&cluster, "/swr/a").await;

    let held = upstream.hold("/swr");
    let replies = send_all(cluster.spread(300, "/swr/a")).await;
    // Every request was answered while the refresh is still held at the upstream.
    for (i, reply) in replies.iter().enumerate() {
        assert_stale(
            reply,
            &old,
            "stale-while-revalidate",
            &format!("request {i}"),
        );
    }
    upstream.wait_for_hits("/swr/a", 2).await;
    assert_eq!(
        upstream.hits("/swr/a"),
        2,
        "the fill and exactly one refresh, across three replicas"
    );
    assert_eq!(
        metric(&cluster, "corral_requests_total", &["outcome=\"stale\""]).await,
        300.0
    );

    held.release();
    let mut round = 0;
    eventually("the refresh's answer replaces the stale one", || {
        round += 1;
        let call = cluster.get(round % 3, "/swr/a");
        let old = old.clone();
        async move {
            let reply = call.send().await;
            reply.x_cache() == "HIT" && reply.text() != old
        }
    })
    .await;
    for i in 0..3 {
        let reply = cluster.get(i, "/swr/a").send().await;
        assert_eq!(reply.x_cache(), "HIT", "replica {i} after the refresh");
        assert_eq!(reply.text(), "response 2 for /swr/a", "replica {i}");
    }
    assert_eq!(upstream.hits("/swr/a"), 2, "the refresh was the last fetch");
    assert_eq!(
        metric(
            &cluster,
            "corral_background_refreshes_total",
            &["reason=\"stale\"", "result=\"stored\""]
        )
        .await,
        1.0
    );
}

/// Inside its stale-if-error window, a stored answer stands in for an upstream 500 and for an
/// upstream that refuses connections, on every replica; past the window, the error comes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_answers_for_a_failing_upstream_inside_its_window_only() {
    let upstream = Upstream::start()
        .await
        .distinct_bodies("/sie")
        .distinct_bodies("/short");
    let down = Upstream::start().await.distinct_bodies("/down");
    let cluster = start(&upstream, Some(&down)).await;
    let mut stored = Vec::new();
    for path in ["/sie/a", "/down/a", "/short/a"] {
        let reply = cluster.get(0, path).send().await;
        assert_eq!(reply.x_cache(), "MISS", "{path}");
        stored.push(reply.text());
    }
    wait_until_stale(&cluster, "/sie/a").await;
    wait_until_stale(&cluster, "/down/a").await;

    // An upstream 500: every replica answers with the stale copy, never the error.
    upstream.set_status("/sie", 500);
    for (i, reply) in send_all(cluster.spread(30, "/sie/a"))
        .await
        .iter()
        .enumerate()
    {
        assert_stale(
            reply,
            &stored[0],
            "stale-if-error",
            &format!("500, request {i}"),
        );
    }
    assert!(upstream.hits("/sie/a") >= 2, "the refresh was tried");

    // An upstream that refuses connections.
    drop(down);
    for (i, reply) in send_all(cluster.spread(6, "/down/a"))
        .await
        .iter()
        .enumerate()
    {
        assert_stale(
            reply,
            &stored[1],
            "stale-if-error",
            &format!("refused, request {i}"),
        );
    }

    // Past the window the store has dropped the copy, and the error is the answer.
    upstream.set_status("/short", 500);
    wait_until_gone(&cluster, "/short/a").await;
    let reply = cluster.get(1, "/short/a").send().await;
    assert_eq!(reply.status, 500, "{}", reply.text());
    assert_eq!(reply.x_cache(), "MISS");
}

/// A response that said `must-revalidate` is never served stale, whatever the route allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_must_revalidate_answer_is_not_served_stale_on_error() {
    let upstream = Upstream::start()
        .await
        .distinct_bodies("/revalidate")
        .header("/revalidate", "cache-control", "max-age=1, must-revalidate");
    let cluster = start(&upstream, None).await;
    let first = cluster.get(0, "/revalidate/a").send().await;
    assert_eq!(first.x_cache(), "MISS");
    let fresh = format!("{}:f", value_key(&cluster, "/revalidate/a").await);
    let marker: bool = cluster
        .redis()
        .client()
        .await
        .exists(&fresh)
        .await
        .expect("EXISTS");
    assert!(!marker, "stored without a stale window");

    upstream.set_status("/revalidate", 500);
    wait_until_gone(&cluster, "/revalidate/a").await;
    for i in 0..3 {
        let reply = cluster.get(i, "/revalidate/a").send().await;
        assert_eq!(reply.status, 500, "replica {i}: {}", reply.text());
        assert_ne!(reply.x_cache(), "STALE", "replica {i}");
    }
}

/// Under steady load across several expiries, early refresh renews the value before it expires:
/// every request after the first fill is answered from the cache (none waits on a fetch), and each
/// value is fetched once, never twice at the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_refresh_renews_under_load_without_a_waiting_request() {
    const ROUNDS: usize = 80;
    const PACE: Duration = Duration::from_millis(40);
    const FETCH: Duration = Duration::from_millis(100);
    let upstream = Upstream::start()
        .await
        .distinct_bodies("/early")
        .slow("/early", FETCH);
    let cluster = start(&upstream, None).await;
    let first = cluster.get(0, "/early/a").send().await;
    assert_eq!(first.x_cache(), "MISS");

    let began = Instant::now();
    let mut served = HashSet::from([first.text()]);
    for round in 0..ROUNDS {
        let replies = send_all((0..3).map(|i| cluster.get(i, "/early/a"))).await;
        for (i, reply) in replies.iter().enumerate() {
            assert_eq!(reply.status, 200, "round {round}, replica {i}");
            assert!(
                matches!(reply.x_cache(), "HIT" | "STALE"),
                "round {round}, replica {i}: {} (a request waited on a fetch)",
                reply.x_cache()
            );
            served.insert(reply.text());
        }
        tokio::time::sleep(PACE).await;
    }
    let elapsed = began.elapsed();

    let fetches = upstream.requests_for("/early/a");
    assert!(
        fetches.len() >= 3,
        "{} fetches in {elapsed:?}: the value was refreshed across its expiries",
        fetches.len()
    );
    for pair in fetches.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap >= 250 * MS,
            "fetches {} and {} came {gap:?} apart: two fetches for one expiry",
            pair[0].seq,
            pair[1].seq
        );
    }
    // Every fetch but possibly the last (still running, or just stored) was served.
    let wasted = fetches[..fetches.len() - 1]
        .iter()
        .filter(|fetch| !served.contains(&format!("response {} for /early/a", fetch.seq)))
        .count();
    assert_eq!(wasted, 0, "a fetched value that nobody was served");
    assert!(
        metric(
            &cluster,
            "corral_background_refreshes_total",
            &["reason=\"early\""]
        )
        .await
            >= 1.0,
        "at least one refresh started early"
    );
}
