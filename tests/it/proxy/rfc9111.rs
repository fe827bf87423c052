//! `semantics: rfc9111`, a route that behaves as a standard shared cache, and the targeted
//! `CDN-Cache-Control` / `Corral-Cache-Control` fields (RFC 9213): one test per rule, named
//! after the section that states it. Freshness comes from the upstream alone, so each test sets
//! the upstream's headers and watches whether a second request is a `HIT`.

use crate::support;

use http::Method;
use support::http::Reply;
use support::proxy::{ProxyCluster, fill};
use support::upstream::Upstream;

const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0, token: secret }
namespace: rfc9111
store: { kind: memory }
defaults: { ttl: 60s, wait_timeout: 10s, lease_ttl: 5s, poll_interval: 1s, pass_ttl: 60s }
routes:
  - name: heuristic
    match: { path_prefix: /heuristic }
    upstream: {{upstream}}
    semantics: rfc9111
    heuristic: 10%
    heuristic_max: 1h
  - name: coalescing
    match: { path_prefix: /coalescing }
    upstream: {{upstream}}
  - name: standard
    match: { path_prefix: /, methods: [] }
    upstream: {{upstream}}
    semantics: rfc9111
"#;

async fn start(upstream: &Upstream) -> ProxyCluster {
    ProxyCluster::on_memory(1, &fill(CONFIG, &[("upstream", &upstream.url())])).await
}

/// Two GETs of `path`: the first and the second answer.
async fn twice(proxy: &ProxyCluster, path: &str) -> (Reply, Reply) {
    let first = proxy.get(0, path).send().await;
    let second = proxy.get(0, path).send().await;
    (first, second)
}

/// `path` was stored by its first fetch: the second request is a `HIT`, one upstream request.
async fn assert_stored(proxy: &ProxyCluster, upstream: &Upstream, path: &str) -> Reply {
    let (first, second) = twice(proxy, path).await;
    assert_eq!(first.x_cache(), "MISS", "{path}: {}", first.cache_status());
    assert_eq!(second.x_cache(), "HIT", "{path}: {}", second.cache_status());
    assert_eq!(upstream.hits(path), 1, "{path}");
    second
}

/// `path` was stored with no freshness: the first fetch stored it, and the second request went to
/// the upstream again rather than be a `HIT`.
async fn assert_stored_stale(proxy: &ProxyCluster, upstream: &Upstream, path: &str) {
    let (first, second) = twice(proxy, path).await;
    assert!(
        first.cache_status().contains("stored"),
        "{path}: {}",
        first.cache_status()
    );
    assert_ne!(second.x_cache(), "HIT", "{path}: {}", second.cache_status());
    assert_eq!(upstream.hits(path), 2, "{path}");
}

/// `path` was not stored: both requests reached the upstream, the first with `detail`.
async fn assert_not_stored(proxy: &ProxyCluster, upstream: &Upstream, path: &str, detail: &str) {
    let (first, second) = twice(proxy, path).await;
    assert_ne!(second.x_cache(), "HIT", "{path}: {}", second.cache_status());
    assert!(
        first.cache_status().contains(&format!("detail={detail}")),
        "{path}: {}",
        first.cache_status()
    );
    assert_eq!(upstream.hits(path), 2, "{path}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9111_4_2_1_s_maxage_overrides_max_age() {
    let upstream = Upstream::start()
        .await
        .header("/s", "cache-control", "max-age=0, s-maxage=60");
    let proxy = start(&upstream).await;
    assert_stored(&proxy, &upstream, "/s").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9111_5_3_invalid_expires_is_stale() {
    let upstream = Upstream::start()
        .await
        .header("/zero", "expires", "0")
        .header("/junk", "expires", "next tuesday");
    let proxy = start(&upstream).await;
    // Stored already stale: never a HIT, every use goes to the upstream (under the lease).
    assert_stored_stale(&proxy, &upstream, "/zero").await;
    assert_stored_stale(&proxy, &upstream, "/junk").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9111_4_2_no_freshness_means_no_default_ttl() {
    let upstream = Upstream::start().await;
    let proxy = start(&upstream).await;
    assert_not_stored(&proxy, &upstream, "/bare", "no-freshness").await;
    // The default semantics keeps the route's ttl for the same answer.
    assert_stored(&proxy, &upstream, "/coalescing/bare").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9111_4_3_1_an_answer_without_freshness_but_with_a_validator_is_stored_and_revalidated()
{
    let upstream = Upstream::start().await.header("/tagged", "etag", "\"v1\"");
    let proxy = start(&upstream).await;
    assert_stored_stale(&proxy, &upstream, "/tagged").await;
    let asked = upstream.requests_for("/tagged");
    assert_eq!(asked[0].header("if-none-match"), None);
    assert_eq!(asked[1].header("if-none-match"), Some("\"v1\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9111_4_2_2_heuristic_freshness_from_last_modified() {
    let upstream = Upstream::start().await.header(
        "/heuristic/old",
        "last-modified",
        "Sun, 06 Nov 1994 08:49:37 GMT",
    );
    let proxy = start(&upstream).await;
    assert_stored(&proxy, &upstream, "/heuristic/old").await;
    // Without Last-Modified there is nothing to reckon from.
    assert_not_stored(&proxy, &upstream, "/heuristic/new", "no-freshness").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9111_5_2_2_3_must_understand_overrides_no_store_for_an_understood_status() {
    let upstream = Upstream::start()
        .await
        .header(
            "/mu",
            "cache-control",
            "no-store, must-understand, max-age=60",
        )
        .header("/ns", "cache-control", "no-store, max-age=60");
    let proxy = start(&upstream).await;
    assert_stored(&proxy, &upstream, "/mu").await;
    assert_not_stored(&proxy, &upstream, "/ns", "no-store").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9111_5_2_1_4_a_client_no_cache_goes_to_the_upstream() {
    let upstream = Upstream::start()
        .await
        .header("/doc", "cache-control", "max-age=60");
    let proxy = start(&upstream).await;
    assert_stored(&proxy, &upstream, "/doc").await;
    let reload = proxy
        .get(0, "/doc")
        .header("cache-control", "no-cache")
        .send()
        .await;
    assert_eq!(reload.x_cache(), "BYPASS");
    assert!(reload.cache_status().contains("detail=client-no-cache"));
    assert_eq!(upstream.hits("/doc"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9111_3_5_a_request_with_authorization_is_not_shared_even_when_public() {
    // Stricter than the RFC, which lets `public` answer it from the cache.
    let upstream = Upstream::start()
        .await
        .header("/auth", "cache-control", "public, max-age=60");
    let proxy = start(&upstream).await;
    for _ in 0..2 {
        let reply = proxy
            .get(0, "/auth")
            .header("authorization", "Bearer alice")
            .send()
            .await;
        assert_eq!(reply.x_cache(), "BYPASS");
        assert!(reply.cache_status().contains("detail=authorization"));
    }
    assert_eq!(upstream.hits("/auth"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9111_end_to_end_request_headers_reach_a_shared_fetch() {
    let upstream = Upstream::start()
        .await
        .header("/e2e", "cache-control", "max-age=60");
    let proxy = start(&upstream).await;
    let reply = proxy
        .get(0, "/e2e")
        .header("accept-language", "fr")
        .header("x-forwarded-host", "evil.example")
        .send()
        .await;
    assert_eq!(reply.x_cache(), "MISS");
    let sent = &upstream.requests_for("/e2e")[0];
    assert_eq!(sent.header("accept-language"), Some("fr"));
    assert_eq!(
        sent.header("x-forwarded-host"),
        None,
        "never a forwarding header"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9111_4_1_vary_selects_among_stored_variants() {
    let upstream = Upstream::start()
        .await
        .distinct_bodies("/lang")
        .header("/lang", "cache-control", "max-age=60")
        .header("/lang", "vary", "Accept-Language");
    let proxy = start(&upstream).await;
    let ask = |lang: &'static str| proxy.get(0, "/lang").header("accept-language", lang).send();
    let fr = ask("fr").await;
    assert_eq!(fr.x_cache(), "MISS", "{}", fr.cache_status());
    let fr_again = ask("fr").await;
    assert_eq!(fr_again.x_cache(), "HIT", "{}", fr_again.cache_status());
    assert_eq!(fr_again.text(), fr.text());
    let en = ask("en").await;
    assert_ne!(
        en.x_cache(),
        "HIT",
        "another variant: {}",
        en.cache_status()
    );
    assert_ne!(en.text(), fr.text());
    let sent: Vec<_> = upstream
        .requests_for("/lang")
        .iter()
        .map(|r| r.header("accept-language").map(str::to_owned))
        .collect();
    assert_eq!(sent, [Some("fr".to_owned()), Some("en".to_owned())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9213_cdn_cache_control_wins() {
    let upstream = Upstream::start()
        .await
        .header("/cdn", "cache-control", "no-cache")
        .header("/cdn", "cdn-cache-control", "max-age=60");
    let proxy = start(&upstream).await;
    let hit = assert_stored(&proxy, &upstream, "/cdn").await;
    // It targets every CDN-like cache, so it is passed on.
    assert_eq!(hit.header("cdn-cache-control"), Some("max-age=60"));
    assert_eq!(hit.header("cache-control"), Some("no-cache"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9213_corral_cache_control_wins_and_stays_with_corral() {
    let upstream = Upstream::start()
        .await
        .header("/own", "cache-control", "max-age=0")
        .header("/own", "cdn-cache-control", "no-cache")
        .header("/own", "corral-cache-control", "max-age=60");
    let proxy = start(&upstream).await;
    let (first, second) = twice(&proxy, "/own").await;
    assert_eq!(second.x_cache(), "HIT", "{}", second.cache_status());
    for reply in [&first, &second] {
        assert_eq!(
            reply.header("corral-cache-control"),
            None,
            "{:?}",
            reply.headers
        );
        assert_eq!(reply.header("cdn-cache-control"), Some("no-cache"));
    }
    // A pass-through strips it too.
    let head = proxy.call(0, Method::OPTIONS, "/own").send().await;
    assert_eq!(head.header("corral-cache-control"), None);
}
