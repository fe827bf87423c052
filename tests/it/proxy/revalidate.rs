//! Revalidation with the upstream, coalesced across replicas: three replicas on a real Redis store
//! and NATS bus (and once on the NATS KV store), a real upstream. A stored answer past its
//! freshness that names a validator is refreshed with one conditional request for the whole
//! deployment; a `304` updates its headers and freshness and keeps its body; every waiter, on
//! every replica, gets the result.
//!
//! Bursts are held at the upstream until every request has joined a flight (the replicas'
//! `corral_followers_waiting` says so), so "one request per burst" never rests on timing.

use crate::support;

use support::eventually;
use support::http::{Reply, send_all};
use support::proxy::{ProxyCluster, fill};
use support::stale;
use support::upstream::{Upstream, pattern};

/// The admin token of [`CONFIG`].
const TOKEN: &str = "secret";

/// The namespace of [`CONFIG`], which prefixes every Redis key.
const NS: &str = "reval";

/// Requests in a burst, spread over the three replicas.
const BURST: usize = 300;

/// A body too large to ride inside a READY event: waiters on other replicas read it from the store.
const LARGE: usize = 20 * 1024;

/// One route honouring the upstream's `Cache-Control`, and one serving stale while it refreshes.
/// `{{upstream}}` and `{{backend}}` are filled by [`start`], `{{redis}}` and `{{nats}}` by the
/// cluster.
const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0, token: secret }
namespace: reval
{{backend}}
defaults: { ttl: 60s, wait_timeout: 30s, lease_ttl: 10s, poll_interval: 5s, max_fetch: 20s, honor_cache_control: true }
routes:
  - name: swr
    match: { path_prefix: /swr }
    upstream: {{upstream}}
    stale_while_revalidate: 1h
  - name: api
    match: { path_prefix: / }
    upstream: {{upstream}}
"#;

/// A Redis store beside a NATS bus; the store's timeout is raised from its 50 ms default, so a
/// stall on two loaded cores does not degrade a flight to a fetch of its own.
const REDIS: &str = "store: { kind: redis, url: \"{{redis}}\", timeout: 1s }\nbus: { kind: nats, url: \"{{nats}}\" }";
/// The NATS KV store, whose stream is also the bus (its timeout raised likewise).
const NATS_KV: &str = "store: { kind: nats, url: \"{{nats}}\", timeout: 1s }";

/// Three replicas on a fresh Redis (or NATS KV, with `store` [`NATS_KV`]) and NATS bus.
async fn start(upstream: &Upstream, backend: &str) -> ProxyCluster {
    let yaml = fill(
        CONFIG,
        &[("upstream", &upstream.url()), ("backend", backend)],
    );
    ProxyCluster::with_redis_nats(3, &yaml).await
}

/// Makes the upstream answer under `prefix` with `status` and exactly these headers.
fn answer(upstream: &Upstream, prefix: &str, status: u16, headers: &[(&str, &str)]) {
    let headers: Vec<_> = headers
        .iter()
        .map(|(name, value)| (name.parse().unwrap(), (*value).to_owned()))
        .collect();
    upstream.set(prefix, move |b| b.headers = headers);
    upstream.set_status(prefix, status);
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
            .filter(|line| line.split(['{', ' ']).next() == Some(name))
            .filter(|line| labels.iter().all(|label| line.contains(label)))
            .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum::<f64>();
    }
    sum
}

/// Revalidations of `route` that ended in `result`, over every replica.
async fn revalidations(cluster: &ProxyCluster, route: &str, result: &str) -> f64 {
    let labels = [
        &format!("route=\"{route}\"")[..],
        &format!("result=\"{result}\""),
    ];
    metric(cluster, "corral_revalidations_total", &labels).await
}

/// Sends [`BURST`] GETs of `path` over the replicas while the upstream holds its answers under
/// `prefix`, and releases it only once one request reached it and every other request waits on
/// a flight (each replica's flight is started by one request; the rest follow). Returns the
/// replies, and checks that the burst cost the upstream exactly one request.
async fn burst(
    cluster: &ProxyCluster,
    upstream: &Upstream,
    prefix: &str,
    path: &str,
) -> Vec<Reply> {
    let before = upstream.hits(path);
    let held = upstream.hold(prefix);
    let replies = tokio::spawn(send_all(cluster.spread(BURST, path)));
    upstream.wait_for_hits(path, before + 1).await;
    let followers = (BURST - cluster.len()) as f64;
    eventually("every request of the burst waits on a flight", || async {
        metric(cluster, "corral_followers_waiting", &[]).await == followers
    })
    .await;
    held.release();
    let replies = replies.await.expect("the burst");
    assert_eq!(
        upstream.hits(path),
        before + 1,
        "one upstream request for {BURST} requests over three replicas"
    );
    replies
}

/// Every reply is a 200 with `body` and the header `name: value`.
fn assert_all(replies: &[Reply], body: &[u8], name: &str, value: &str) {
    for (i, reply) in replies.iter().enumerate() {
        assert_eq!(reply.status, 200, "request {i}: {}", reply.text());
        assert!(reply.body == body, "request {i}: the stored body");
        assert_eq!(reply.header(name), Some(value), "request {i}: {name}");
    }
}

/// The last request the upstream received for `path`.
fn last_request(upstream: &Upstream, path: &str) -> support::upstream::Recorded {
    upstream
        .requests_for(path)
        .pop()
        .unwrap_or_else(|| panic!("no request for {path}"))
}

// ---------------------------------------------------------------- revalidation ----

/// A stale answer with an `ETag`: one `If-None-Match` for a burst over three replicas, a `304`
/// whose new header every client sees with the stored body, and the entry fresh again after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_entry_is_revalidated_once_for_the_whole_deployment() {
    let upstream = Upstream::start().await;
    let v1 = [
        ("etag", "\"v1\""),
        ("cache-control", "max-age=1"),
        ("x-version", "1"),
    ];
    answer(&upstream, "/etag", 200, &v1);
    let cluster = start(&upstream, REDIS).await;
    let first = cluster.get(0, "/etag").send().await;
    assert_eq!(first.x_cache(), "MISS");
    let body = first.body.clone();
    stale::wait_until_stale(&cluster, NS, TOKEN, "/etag").await;

    let v2 = [
        ("etag", "\"v1\""),
        ("cache-control", "max-age=3600"),
        ("x-version", "2"),
    ];
    answer(&upstream, "/etag", 304, &v2);
    let replies = burst(&cluster, &upstream, "/etag", "/etag").await;
    assert_all(&replies, &body, "x-version", "2");
    let asked = last_request(&upstream, "/etag");
    assert_eq!(asked.header("if-none-match"), Some("\"v1\""));

    // Fresh again on every replica, from the updated entry, without asking again.
    for i in 0..3 {
        let reply = cluster.get(i, "/etag").send().await;
        assert!(
            matches!(reply.x_cache(), "HIT"),
            "replica {i}: {}",
            reply.x_cache()
        );
        assert_eq!(reply.header("x-version"), Some("2"), "replica {i}");
        assert!(reply.body == body, "replica {i}");
    }
    assert_eq!(upstream.hits("/etag"), 2);
    assert_eq!(revalidations(&cluster, "api", "304").await, 1.0);
}

/// An answer with only `Last-Modified` is revalidated with `If-Modified-Since`, and only corral's
/// own validators go upstream: never a client's `If-None-Match`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_modified_alone_is_sent_as_if_modified_since() {
    let upstream = Upstream::start().await;
    let date = "Wed, 21 Oct 2015 07:28:00 GMT";
    answer(
        &upstream,
        "/dated",
        200,
        &[("last-modified", date), ("cache-control", "no-cache")],
    );
    let cluster = start(&upstream, REDIS).await;
    let first = cluster.get(0, "/dated").send().await;
    assert_eq!(first.x_cache(), "MISS");

    answer(
        &upstream,
        "/dated",
        304,
        &[("cache-control", "no-cache"), ("x-checked", "yes")],
    );
    let reply = cluster
        .get(1, "/dated")
        .header("if-none-match", "\"client-tag\"")
        .send()
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-checked"), Some("yes"));
    assert_eq!(reply.body, first.body);
    let asked = last_request(&upstream, "/dated");
    assert_eq!(asked.header("if-modified-since"), Some(date));
    assert_eq!(
        asked.header("if-none-match"),
        None,
        "a client's validator went upstream"
    );
    assert_eq!(upstream.hits("/dated"), 2);
}

/// `no-cache`, `max-age=0` and a `must-revalidate` answer past its freshness are stored, and each
/// burst of their use costs exactly one conditional request; waiters on other replicas read the
/// confirmed entry from the store (its body is too large to ride in the event).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answers_that_must_be_revalidated_cost_one_conditional_request_per_burst() {
    let upstream = Upstream::start().await;
    let cases = [
        ("/nc/no-cache", "no-cache", true),
        ("/nc/max-age-0", "max-age=0", true),
        ("/nc/must-revalidate", "must-revalidate, max-age=1", false),
    ];
    for (path, cache_control, _) in cases {
        upstream.set(path, |b| b.body = support::upstream::BodySpec::Size(LARGE));
        answer(
            &upstream,
            path,
            200,
            &[("etag", "\"e\""), ("cache-control", cache_control)],
        );
    }
    let cluster = start(&upstream, REDIS).await;
    let body = pattern(LARGE);
    for (path, cache_control, every_use) in cases {
        let first = cluster.get(0, path).send().await;
        assert_eq!(first.x_cache(), "MISS", "{path}");
        assert_eq!(first.body, body, "{path}");
        let stored = cluster.status(0, TOKEN, path).await.json();
        assert_eq!(stored["status"], "EXISTS", "{path} is stored: {stored}");
        if !every_use {
            stale::wait_until_stale(&cluster, NS, TOKEN, path).await;
        }
        let confirmed = [
            ("etag", "\"e\""),
            ("cache-control", cache_control),
            ("x-round", "1"),
        ];
        answer(&upstream, path, 304, &confirmed);
        let replies = burst(&cluster, &upstream, path, path).await;
        assert_all(&replies, &body, "x-round", "1");
        let asked = last_request(&upstream, path);
        assert_eq!(asked.header("if-none-match"), Some("\"e\""), "{path}");
        if every_use {
            // The next use asks again: once more for the whole burst.
            let confirmed = [
                ("etag", "\"e\""),
                ("cache-control", cache_control),
                ("x-round", "2"),
            ];
            answer(&upstream, path, 304, &confirmed);
            let replies = burst(&cluster, &upstream, path, path).await;
            assert_all(&replies, &body, "x-round", "2");
        }
    }
    assert_eq!(revalidations(&cluster, "api", "304").await, 5.0);
}

/// The revalidation metric counts a `304`, a new answer in the entry's place, and a failure; the
/// new answer replaces the entry as a fill would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revalidations_are_counted_by_result() {
    let upstream = Upstream::start().await.distinct_bodies("/counted");
    answer(
        &upstream,
        "/counted",
        200,
        &[("etag", "\"a\""), ("cache-control", "no-cache")],
    );
    let cluster = start(&upstream, REDIS).await;
    let first = cluster.get(0, "/counted").send().await;
    assert_eq!(first.text(), "response 1 for /counted");

    upstream.set_status("/counted", 304);
    let confirmed = cluster.get(1, "/counted").send().await;
    assert_eq!(confirmed.text(), "response 1 for /counted");
    assert_eq!(revalidations(&cluster, "api", "304").await, 1.0);

    answer(
        &upstream,
        "/counted",
        200,
        &[("etag", "\"b\""), ("cache-control", "no-cache")],
    );
    let replaced = cluster.get(2, "/counted").send().await;
    assert_eq!(replaced.text(), "response 3 for /counted");
    assert_eq!(revalidations(&cluster, "api", "200").await, 1.0);
    // The new answer is the entry now: it is what the next revalidation asks about.
    answer(&upstream, "/counted", 304, &[("cache-control", "no-cache")]);
    let again = cluster.get(0, "/counted").send().await;
    assert_eq!(again.text(), "response 3 for /counted");
    assert_eq!(
        last_request(&upstream, "/counted").header("if-none-match"),
        Some("\"b\"")
    );

    upstream.set_status("/counted", 500);
    let failed = cluster.get(1, "/counted").send().await;
    assert_eq!(failed.status, 500);
    assert_eq!(revalidations(&cluster, "api", "error").await, 1.0);
    assert_eq!(revalidations(&cluster, "api", "304").await, 2.0);
}

/// Stale-while-revalidate answers at once with the stale copy and revalidates it in the
/// background with its validators; the `304` makes it fresh again with the updated headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_refreshes_with_a_conditional_request() {
    let upstream = Upstream::start().await;
    let v1 = [
        ("etag", "\"s1\""),
        ("cache-control", "max-age=1"),
        ("x-version", "1"),
    ];
    answer(&upstream, "/swr", 200, &v1);
    let cluster = start(&upstream, REDIS).await;
    let first = cluster.get(0, "/swr/a").send().await;
    assert_eq!(first.x_cache(), "MISS");
    stale::wait_until_stale(&cluster, NS, TOKEN, "/swr/a").await;

    let v2 = [
        ("etag", "\"s1\""),
        ("cache-control", "max-age=3600"),
        ("x-version", "2"),
    ];
    answer(&upstream, "/swr", 304, &v2);
    let stale = cluster.get(1, "/swr/a").send().await;
    assert_eq!(stale.x_cache(), "STALE");
    assert_eq!(stale.header("x-version"), Some("1"));
    upstream.wait_for_hits("/swr/a", 2).await;
    assert_eq!(
        last_request(&upstream, "/swr/a").header("if-none-match"),
        Some("\"s1\"")
    );
    let mut round = 0;
    eventually("the revalidated entry is served fresh", || {
        round += 1;
        let call = cluster.get(round % 3, "/swr/a");
        async move {
            let reply = call.send().await;
            reply.x_cache() == "HIT" && reply.header("x-version") == Some("2")
        }
    })
    .await;
    let reply = cluster.get(2, "/swr/a").send().await;
    assert_eq!(reply.body, first.body);
    assert_eq!(upstream.hits("/swr/a"), 2);
    assert_eq!(revalidations(&cluster, "swr", "304").await, 1.0);
    let refreshed = ["reason=\"stale\"", "result=\"stored\""];
    assert_eq!(
        metric(&cluster, "corral_background_refreshes_total", &refreshed).await,
        1.0
    );
}

/// On the NATS KV store (which re-puts the whole value), a `no-cache` answer is revalidated once
/// per burst over three replicas too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_the_nats_kv_store_a_burst_revalidates_once() {
    let upstream = Upstream::start().await.body_size("/kv", LARGE);
    answer(
        &upstream,
        "/kv",
        200,
        &[("etag", "\"k\""), ("cache-control", "no-cache")],
    );
    let cluster = start(&upstream, NATS_KV).await;
    let first = cluster.get(0, "/kv").send().await;
    assert_eq!(first.x_cache(), "MISS");

    answer(
        &upstream,
        "/kv",
        304,
        &[
            ("etag", "\"k\""),
            ("cache-control", "no-cache"),
            ("x-round", "1"),
        ],
    );
    let replies = burst(&cluster, &upstream, "/kv", "/kv").await;
    assert_all(&replies, &pattern(LARGE), "x-round", "1");
    assert_eq!(
        last_request(&upstream, "/kv").header("if-none-match"),
        Some("\"k\"")
    );
    assert_eq!(revalidations(&cluster, "api", "304").await, 1.0);
}
