//! What gets stored besides a plain 200, end to end (three replicas on a real Redis store and NATS
//! bus): error answers under `error_ttl` (negative caching), and responses that vary on request
//! headers (`Vary`, with and without `vary: honor`).

mod support;

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
