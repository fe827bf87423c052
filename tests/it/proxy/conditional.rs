//! Conditional requests answered from the cache (RFC 9110 section 13): a client whose copy is
//! current gets a bodiless `304` from a HIT, COALESCED or STALE answer, one whose `If-Match`
//! fails gets a `412`, and everyone else the full answer. A real upstream that sends validators,
//! and a replica on the in-memory store and bus.

use crate::support;

use http::Method;
use std::sync::{Arc, Mutex};
use support::eventually;

use support::http::Reply;
use support::proxy::{ProxyCluster, fill};
use support::upstream::Upstream;

/// `{{upstream}}` is filled by [`start`].
const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0, token: secret }
namespace: cond
store: { kind: memory }
defaults: { ttl: 60s, wait_timeout: 10s, lease_ttl: 5s, poll_interval: 1s }
routes:
  - name: stale
    match: { path_prefix: /stale }
    upstream: {{upstream}}
    ttl: 1s
    stale_while_revalidate: 1h
  - name: all
    match: { path_prefix: / }
    upstream: {{upstream}}
"#;

const LAST_MODIFIED: &str = "Tue, 01 Dec 2026 10:00:00 GMT";

/// An upstream whose answers under `/doc` carry an `ETag`, a `Last-Modified` and a
/// `Cache-Control`, and whose `/missing` is a `404` with an `ETag`.
async fn upstream() -> Upstream {
    Upstream::start()
        .await
        .header("/doc", "etag", "\"v1\"")
        .header("/doc", "last-modified", LAST_MODIFIED)
        .header("/doc", "cache-control", "max-age=60")
        .header("/doc", "content-type", "text/plain")
        .header("/stale", "etag", "\"v1\"")
        .header("/missing", "etag", "\"gone\"")
        .status("/missing", 404)
}

/// One replica in front of `upstream`.
async fn start(upstream: &Upstream) -> ProxyCluster {
    ProxyCluster::on_memory(1, &fill(CONFIG, &[("upstream", &upstream.url())])).await
}

/// Stores `path` with a first, unconditional GET.
async fn stored(proxy: &ProxyCluster, path: &str) -> Reply {
    let first = proxy.get(0, path).send().await;
    assert_eq!(first.x_cache(), "MISS", "{}", first.text());
    first
}

/// A GET of `path` with one request header.
async fn get_with(proxy: &ProxyCluster, path: &str, name: &str, value: &str) -> Reply {
    proxy.get(0, path).header(name, value).send().await
}

/// A `304` as RFC 9110 section 15.4.5 shapes it, from the cache.
fn assert_not_modified(reply: &Reply, x_cache: &str) {
    assert_eq!(reply.status, 304, "{:?}", reply.headers);
    assert!(
        reply.body.is_empty(),
        "a 304 has no body: {:?}",
        reply.text()
    );
    assert_eq!(reply.header("etag"), Some("\"v1\""));
    assert_eq!(reply.header("cache-control"), Some("max-age=60"));
    assert_eq!(reply.x_cache(), x_cache);
    assert!(reply.header("age").is_some(), "{:?}", reply.headers);
    assert!(reply.header("x-request-id").is_some());
    assert!(
        reply.header("content-type").is_none(),
        "{:?}",
        reply.headers
    );
    assert!(
        reply.header("content-length").is_none_or(|len| len == "0"),
        "{:?}",
        reply.headers
    );
}

fn assert_whole(reply: &Reply, path: &str) {
    assert_eq!(reply.status, 200, "{:?}", reply.headers);
    assert_eq!(reply.text(), format!("upstream body for {path}"));
    assert_eq!(reply.header("content-type"), Some("text/plain"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_whose_etag_the_client_has_is_304_and_any_other_is_the_whole_answer() {
    let upstream = upstream().await;
    let proxy = start(&upstream).await;
    let path = "/doc/inm";
    stored(&proxy, path).await;

    for matching in [
        "\"v1\"",
        "W/\"v1\"",
        "\"v0\", \"v1\"",
        "\"a,b\", W/\"v1\"",
        "*",
    ] {
        let reply = get_with(&proxy, path, "if-none-match", matching).await;
        assert_not_modified(&reply, "HIT");
        assert_eq!(reply.cache_status(), "corral; hit");
    }
    for other in ["\"v2\"", "\"v0\", W/\"v2\"", "v1", "\"v1\" junk"] {
        let reply = get_with(&proxy, path, "if-none-match", other).await;
        assert_whole(&reply, path);
    }
    let head = proxy
        .call(0, Method::HEAD, path)
        .header("if-none-match", "\"v1\"")
        .send()
        .await;
    // A HEAD is answered from the GET's entry, its conditions evaluated the same way.
    assert_eq!(head.status, 304);
    assert_eq!(head.x_cache(), "HIT");
    assert_eq!(head.header("etag"), Some("\"v1\""));
    assert_eq!(
        upstream.hits(path),
        1,
        "one fetch for the GETs and the HEAD"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_modified_since_is_304_at_or_after_last_modified_and_200_before() {
    let upstream = upstream().await;
    let proxy = start(&upstream).await;
    let path = "/doc/ims";
    stored(&proxy, path).await;

    for since in [LAST_MODIFIED, "Wed, 02 Dec 2026 10:00:00 GMT"] {
        let reply = get_with(&proxy, path, "if-modified-since", since).await;
        assert_not_modified(&reply, "HIT");
    }
    for since in ["Mon, 30 Nov 2026 10:00:00 GMT", "not a date"] {
        let reply = get_with(&proxy, path, "if-modified-since", since).await;
        assert_whole(&reply, path);
    }
    // If-None-Match outranks it: a different tag gets the whole answer whatever the date.
    let reply = proxy
        .get(0, path)
        .header("if-none-match", "\"v2\"")
        .header("if-modified-since", LAST_MODIFIED)
        .send()
        .await;
    assert_whole(&reply, path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_match_against_another_tag_is_412_and_against_the_etag_is_the_answer() {
    let upstream = upstream().await;
    let proxy = start(&upstream).await;
    let path = "/doc/im";
    stored(&proxy, path).await;

    let failed = get_with(&proxy, path, "if-match", "\"v2\"").await;
    assert_eq!(failed.status, 412, "{:?}", failed.headers);
    assert!(failed.body.is_empty());
    assert_eq!(failed.x_cache(), "HIT");
    let weak = get_with(&proxy, path, "if-match", "W/\"v1\"").await;
    assert_eq!(weak.status, 412, "If-Match compares strongly");
    let modified = get_with(
        &proxy,
        path,
        "if-unmodified-since",
        "Mon, 30 Nov 2026 10:00:00 GMT",
    )
    .await;
    assert_eq!(modified.status, 412);

    assert_whole(&get_with(&proxy, path, "if-match", "\"v1\"").await, path);
    assert_whole(&get_with(&proxy, path, "if-match", "*").await, path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_404_with_an_etag_is_never_304() {
    let upstream = upstream().await;
    let proxy = start(&upstream).await;
    let path = "/missing/page";
    let first = proxy.get(0, path).send().await;
    assert_eq!(first.status, 404);

    for (name, value) in [
        ("if-none-match", "\"gone\""),
        ("if-none-match", "*"),
        ("if-match", "\"other\""),
    ] {
        let reply = get_with(&proxy, path, name, value).await;
        assert_eq!(reply.status, 404, "{name}: {value}");
        assert_eq!(reply.x_cache(), "HIT");
        assert_eq!(reply.text(), format!("upstream body for {path}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_of_a_burst_that_have_the_etag_get_304_from_the_shared_answer() {
    let upstream = upstream().await;
    let hold = upstream.hold("/doc");
    let proxy = start(&upstream).await;
    let path = "/doc/burst";

    let leader = tokio::spawn(proxy.get(0, path).send());
    upstream.wait_for_hits(path, 1).await;
    let followers: Vec<_> = (0..3)
        .map(|_| {
            let call = proxy.get(0, path).header("if-none-match", "\"v1\"");
            tokio::spawn(call.send())
        })
        .collect();
    eventually("three followers wait on the leader's fetch", || async {
        metric(&proxy, "corral_followers_waiting").await == 3.0
    })
    .await;
    hold.release();

    let leader = leader.await.expect("join");
    assert_whole(&leader, path);
    assert_eq!(leader.x_cache(), "MISS");
    for follower in followers {
        let reply = follower.await.expect("join");
        assert_not_modified(&reply, "COALESCED");
        assert_eq!(reply.cache_status(), "corral; fwd=miss; collapsed");
    }
    assert_eq!(upstream.hits(path), 1);
}

/// One series' value on the replica's `/metrics` (0 when absent).
async fn metric(proxy: &ProxyCluster, series: &str) -> f64 {
    let text = proxy.admin(0, Method::GET, "/metrics").send().await.text();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |value| value.trim().parse().expect("a number"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_answer_is_304_to_a_client_that_has_it() {
    let upstream = upstream().await;
    let proxy = start(&upstream).await;
    let path = "/stale/page";
    stored(&proxy, path).await;

    // Fresh for one second: every conditional GET is a 304, a HIT until the copy goes stale.
    let last = Arc::new(Mutex::new(None::<Reply>));
    eventually("the stored copy is served stale", || {
        let call = proxy.get(0, path).header("if-none-match", "\"v1\"");
        let last = last.clone();
        async move {
            let reply = call.send().await;
            assert_eq!(
                reply.status,
                304,
                "{}: {:?}",
                reply.x_cache(),
                reply.headers
            );
            let stale = reply.x_cache() == "STALE";
            *last.lock().unwrap() = Some(reply);
            stale
        }
    })
    .await;
    let reply = last.lock().unwrap().take().expect("a reply");
    assert_eq!(reply.status, 304, "{:?}", reply.headers);
    assert!(reply.body.is_empty());
    assert_eq!(reply.header("etag"), Some("\"v1\""));
    assert_eq!(
        reply.cache_status(),
        "corral; fwd=stale; detail=stale-while-revalidate"
    );
}
