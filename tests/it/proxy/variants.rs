//! What gets stored besides a plain 200, end to end (three replicas on a real Redis store and NATS
//! bus): error answers under `error_ttl` (negative caching), and responses that vary on request
//! headers (`Vary`, with and without `vary: honor`).

use crate::support;

use std::time::Duration;

use support::eventually;
use support::http::{Reply, send_all};
use support::proxy::{ProxyCluster, fill};
use support::upstream::Upstream;

const MS: Duration = Duration::from_millis(1);

/// `{{routes}}` are filled per test; `{{upstream}}`, `{{redis}}` and `{{nats}}` by the helpers.
const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0, token: secret }
namespace: variants
store: { kind: redis, url: "{{redis}}" }
bus: { kind: nats, url: "{{nats}}" }
defaults: { ttl: 60s, wait_timeout: 5s, lease_ttl: 5s, poll_interval: 1s, pass_ttl: 2s }
routes:
{{routes}}
"#;

async fn three_replicas(upstream: &Upstream, routes: &str) -> ProxyCluster {
    let routes = fill(routes, &[("upstream", &upstream.url())]);
    ProxyCluster::with_redis_nats(3, &fill(CONFIG, &[("routes", &routes)])).await
}

fn assert_all(replies: &[Reply], status: u16, body: &str) {
    for (i, reply) in replies.iter().enumerate() {
        assert_eq!(reply.status, status, "request {i}: {:?}", reply.text());
        assert_eq!(reply.text(), body, "request {i}");
    }
}

// ---------------------------------------------------------------------------- negative caching ----

const ERROR_TTL_ROUTES: &str = r#"
  - name: lookups
    match: { path_prefix: /lookup }
    upstream: {{upstream}}
    error_ttl: { 404: 2s, 503: 30s }
  - name: plain
    match: { path_prefix: / }
    upstream: {{upstream}}
"#;

#[tokio::test]
async fn a_404_with_an_error_ttl_is_fetched_once_then_again_after_it_expires() {
    let upstream = Upstream::start()
        .await
        .status("/lookup/missing", 404)
        .slow("/lookup/missing", 100 * MS)
        .body("/lookup/missing", "no such thing");
    let proxy = three_replicas(&upstream, ERROR_TTL_ROUTES).await;

    let replies = send_all(proxy.spread(60, "/lookup/missing")).await;
    assert_all(&replies, 404, "no such thing");
    assert_eq!(
        upstream.hits("/lookup/missing"),
        1,
        "one fetch for the burst"
    );
    let again = proxy.get(1, "/lookup/missing").send().await;
    assert_eq!(again.x_cache(), "HIT", "{}", again.cache_status());
    assert_eq!(upstream.hits("/lookup/missing"), 1);

    // Once its 2 s are up, the next request fetches again (and only one does).
    eventually("the 404 expires and is fetched again", || async {
        proxy.get(2, "/lookup/missing").send().await.x_cache() == "MISS"
    })
    .await;
    assert_eq!(upstream.hits("/lookup/missing"), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn a_5xx_with_an_error_ttl_is_stored_and_shared_instead_of_failing() {
    let upstream = Upstream::start()
        .await
        .status("/lookup/down", 503)
        .body("/lookup/down", "maintenance")
        .status("/down", 503);
    let proxy = three_replicas(&upstream, ERROR_TTL_ROUTES).await;

    let first = proxy.get(0, "/lookup/down").send().await;
    assert_eq!((first.status.as_u16(), first.x_cache()), (503, "MISS"));
    assert!(
        first.cache_status().contains("stored"),
        "{}",
        first.cache_status()
    );
    for i in 0..3 {
        let reply = proxy.get(i, "/lookup/down").send().await;
        assert_eq!(
            (reply.status.as_u16(), reply.x_cache()),
            (503, "HIT"),
            "replica {i}"
        );
        assert_eq!(reply.text(), "maintenance");
    }
    assert_eq!(upstream.hits("/lookup/down"), 1);

    // Without an error TTL a 503 stores nothing: every later request fetches again.
    for i in 0..3 {
        let reply = proxy.get(i, "/down").send().await;
        assert_eq!(
            (reply.status.as_u16(), reply.x_cache()),
            (503, "MISS"),
            "replica {i}"
        );
    }
    assert_eq!(upstream.hits("/down"), 3);
    proxy.stop().await;
}

#[tokio::test]
async fn an_error_answer_that_is_private_is_never_stored() {
    let upstream = Upstream::start().await.status("/lookup/mine", 404).header(
        "/lookup/mine",
        "set-cookie",
        "session={n}",
    );
    let proxy = three_replicas(&upstream, ERROR_TTL_ROUTES).await;
    for i in 0..3 {
        let reply = proxy.get(i, "/lookup/mine").send().await;
        assert_eq!(reply.status, 404);
        assert_ne!(reply.x_cache(), "HIT", "replica {i}");
        assert_eq!(
            reply.header("set-cookie"),
            Some(format!("session={}", i + 1).as_str())
        );
    }
    assert_eq!(upstream.hits("/lookup/mine"), 3);
    proxy.stop().await;
}

// ------------------------------------------------------------------------------------ vary ----

const VARY_ROUTES: &str = r#"
  - name: encoded
    match: { path_prefix: /encoded }
    upstream: {{upstream}}
    key: { headers: [accept-encoding] }
  - name: honored
    match: { path_prefix: /honored }
    upstream: {{upstream}}
    vary: honor
  - name: plain
    match: { path_prefix: / }
    upstream: {{upstream}}
"#;

/// The request number in a distinct body (`response <n> for ...`).
fn seq_of(reply: &Reply) -> u64 {
    let text = reply.text();
    let n = text
        .strip_prefix("response ")
        .and_then(|rest| rest.split(' ').next());
    n.and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a distinct body: {text:?}"))
}

#[tokio::test]
async fn vary_on_a_keyed_header_is_stored_and_on_an_unkeyed_one_is_not() {
    let upstream = Upstream::start()
        .await
        .header("/", "vary", "Accept-Encoding")
        .distinct_bodies("/");
    let proxy = three_replicas(&upstream, VARY_ROUTES).await;

    for (i, encoding) in [(0, "gzip"), (1, "gzip"), (2, "br"), (0, "br")] {
        let reply = proxy
            .get(i, "/encoded/x")
            .header("accept-encoding", encoding)
            .send()
            .await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("vary"), Some("Accept-Encoding"));
    }
    assert_eq!(upstream.hits("/encoded/x"), 2, "one fetch per keyed value");
    let gzip = proxy
        .get(2, "/encoded/x")
        .header("accept-encoding", "gzip")
        .send()
        .await;
    assert_eq!((gzip.x_cache(), seq_of(&gzip)), ("HIT", 1));

    // Not in the key and no `vary: honor`: never stored (PASS), every request fetches.
    let upstream = upstream.header("/plain", "vary", "Accept-Language");
    for i in 0..3 {
        let reply = proxy
            .get(i, "/plain/x")
            .header("accept-language", "en")
            .send()
            .await;
        assert_eq!(
            reply.x_cache(),
            "PASS",
            "replica {i}: {}",
            reply.cache_status()
        );
        assert!(
            reply.cache_status().contains("detail=vary"),
            "{}",
            reply.cache_status()
        );
    }
    assert_eq!(upstream.hits("/plain/x"), 3);
    proxy.stop().await;
}

#[tokio::test]
async fn vary_honor_stores_one_variant_per_value_across_replicas() {
    let upstream = Upstream::start()
        .await
        .header("/honored", "vary", "Accept-Language")
        .distinct_bodies("/honored")
        .slow("/honored", 100 * MS);
    let proxy = three_replicas(&upstream, VARY_ROUTES).await;
    let page = "/honored/page";

    // The first request's answer is fetched once: it is stored as its own variant.
    let first = proxy
        .get(0, page)
        .header("accept-language", "en")
        .send()
        .await;
    assert_eq!((first.status.as_u16(), first.x_cache()), (200, "MISS"));
    assert_eq!(first.header("vary"), Some("Accept-Language"));
    let en = seq_of(&first);
    let again = proxy
        .get(1, page)
        .header("accept-language", "en")
        .send()
        .await;
    assert_eq!((again.x_cache(), seq_of(&again)), ("HIT", en));
    assert_eq!(upstream.hits(page), 1);
    let forwarded = upstream.requests_for(page);
    assert_eq!(
        forwarded[0].header("accept-language"),
        Some("en"),
        "the upstream saw it"
    );

    // A burst of both languages on every replica: one more fetch, for the new value only.
    let calls = (0..30).map(|i| {
        let language = if i % 2 == 0 { "en" } else { "fr" };
        proxy.get(i % 3, page).header("accept-language", language)
    });
    let replies = send_all(calls).await;
    assert_eq!(upstream.hits(page), 2, "one fetch per variant cluster-wide");
    let fr = upstream.requests_for(page)[1].seq;
    assert_eq!(
        upstream.requests_for(page)[1].header("accept-language"),
        Some("fr")
    );
    for (i, reply) in replies.iter().enumerate() {
        let wanted = if i % 2 == 0 { en } else { fr };
        assert_eq!(reply.status, 200, "request {i}");
        assert_eq!(
            seq_of(reply),
            wanted,
            "request {i} got another variant's answer"
        );
    }

    // Repeats are hits everywhere; whitespace around commas is the same variant, a new value not.
    for i in 0..3 {
        let reply = proxy
            .get(i, page)
            .header("accept-language", "fr")
            .send()
            .await;
        assert_eq!(
            (reply.x_cache(), seq_of(&reply)),
            ("HIT", fr),
            "replica {i}"
        );
    }
    let listed = proxy
        .get(0, page)
        .header("accept-language", "de,en")
        .send()
        .await;
    let spaced = proxy
        .get(1, page)
        .header("accept-language", "de , en")
        .send()
        .await;
    assert_eq!(seq_of(&listed), seq_of(&spaced));
    let absent = proxy.get(2, page).send().await;
    assert_ne!(seq_of(&absent), en, "no header is a variant of its own");
    assert_eq!(upstream.hits(page), 4);

    // Purging the URL drops the marker, and with it every variant hanging from it.
    let purged = proxy.purge(2, "secret", page).await;
    assert_eq!(purged.status, 200, "{}", purged.text());
    // (On the purging replica: the others' L1 copies go when the bus tells them.)
    let after = proxy
        .get(2, page)
        .header("accept-language", "en")
        .send()
        .await;
    assert_eq!(after.x_cache(), "MISS");
    assert_eq!(seq_of(&after), 5, "fetched afresh, not an old variant");
    proxy.stop().await;
}

#[tokio::test]
async fn vary_star_is_never_stored_even_when_honored() {
    let upstream = Upstream::start()
        .await
        .header("/honored/star", "vary", "*")
        .distinct_bodies("/honored/star");
    let proxy = three_replicas(&upstream, VARY_ROUTES).await;
    for i in 0..3 {
        let reply = proxy.get(i, "/honored/star").send().await;
        assert_eq!(reply.x_cache(), "PASS", "replica {i}");
        assert!(
            reply.cache_status().contains("detail=vary-star"),
            "{}",
            reply.cache_status()
        );
    }
    assert_eq!(upstream.hits("/honored/star"), 3);
    proxy.stop().await;
}
