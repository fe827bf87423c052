//! Statuses beyond the usual: a 5xx the upstream gives explicit freshness is stored when the
//! route lists it in `cache_statuses` (three replicas on Redis and NATS share it), and an
//! upstream's interim `103 Early Hints` never becomes part of a stored answer.

use crate::support;

use std::net::SocketAddr;

use support::proxy::{ProxyCluster, fill};
use support::raw::{RawUpstream, Scripted, exchange};
use support::upstream::Upstream;

const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0, token: secret }
namespace: statuses
store: { kind: redis, url: "{{redis}}", timeout: 1s }
bus: { kind: nats, url: "{{nats}}" }
defaults: { ttl: 60s, wait_timeout: 10s, lease_ttl: 5s, poll_interval: 1s }
routes:
  - name: listed
    match: { path_prefix: /listed }
    upstream: {{upstream}}
    cache_statuses: [200, 503]
  - name: unlisted
    match: { path_prefix: /unlisted }
    upstream: {{upstream}}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_5xx_with_max_age_is_stored_when_listed_and_not_otherwise() {
    let upstream = Upstream::start()
        .await
        .status("/listed/fresh", 503)
        .header("/listed/fresh", "cache-control", "max-age=60")
        .status("/listed/bare", 503)
        .status("/unlisted", 503)
        .header("/unlisted", "cache-control", "max-age=60");
    let yaml = fill(CONFIG, &[("upstream", &upstream.url())]);
    let proxy = ProxyCluster::with_redis_nats(3, &yaml).await;

    let first = proxy.get(0, "/listed/fresh").send().await;
    assert_eq!(first.status, 503);
    assert_eq!(first.x_cache(), "MISS", "{}", first.cache_status());
    for i in 0..3 {
        let again = proxy.get(i, "/listed/fresh").send().await;
        assert_eq!(again.status, 503);
        assert_eq!(
            again.x_cache(),
            "HIT",
            "replica {i}: {}",
            again.cache_status()
        );
        assert_eq!(again.text(), first.text());
    }
    assert_eq!(upstream.hits("/listed/fresh"), 1);

    // Listed, but without explicit freshness: a failure, fetched again next time.
    for path in ["/listed/bare", "/unlisted/fresh"] {
        for i in 0..2 {
            let failed = proxy.get(i, path).send().await;
            assert_eq!(failed.status, 503, "{path}");
            assert!(
                failed.cache_status().contains("detail=upstream-error"),
                "{path}: {}",
                failed.cache_status()
            );
        }
        assert_eq!(upstream.hits(path), 2, "{path} was stored");
    }
}

const HINTS_CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0, token: secret }
namespace: hints
store: { kind: memory }
defaults: { ttl: 60s, wait_timeout: 10s, lease_ttl: 5s, poll_interval: 1s }
routes:
  - name: live
    match: { path_prefix: /live }
    upstream: {{upstream}}
    cache: false
  - name: cached
    match: { path_prefix: / }
    upstream: {{upstream}}
"#;

/// An upstream that answers every request with a `103 Early Hints` and then the `200`.
async fn hinting_upstream() -> RawUpstream {
    RawUpstream::start(|request| {
        let body = format!("page {}", request.target());
        let bytes = format!(
            "HTTP/1.1 103 Early Hints\r\nlink: </hint.css>; rel=preload\r\n\r\n\
             HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        Scripted {
            bytes: bytes.into_bytes(),
            close: false,
        }
    })
    .await
}

/// A raw GET of `path` on the proxy at `url`; what came back.
async fn raw_get(url: &str, path: &str) -> support::raw::Exchanged {
    let addr: SocketAddr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("proxy address");
    let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
    let got = exchange(addr, request.as_bytes()).await;
    assert!(got.closed, "no whole answer: {}", got.text);
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_hints_never_become_part_of_an_answer_on_a_miss_a_pass_or_a_hit() {
    let upstream = hinting_upstream().await;
    let proxy =
        ProxyCluster::on_memory(1, &fill(HINTS_CONFIG, &[("upstream", &upstream.url())])).await;

    // corral's HTTP server cannot write interim answers (docs/caching.md, "Interim answers"):
    // each client gets exactly one answer, the final one, whole.
    for (path, outcome) in [
        ("/page", "MISS"),
        ("/page", "HIT"),
        ("/live/page", "BYPASS"),
    ] {
        let got = raw_get(&proxy.url(0), path).await;
        assert_eq!(got.responses(), 1, "{path} {outcome}: {}", got.text);
        assert_eq!(got.status(), Some(200), "{path} {outcome}: {}", got.text);
        let lower = got.text.to_ascii_lowercase();
        assert!(
            lower.contains(&format!("x-cache: {}", outcome.to_ascii_lowercase())),
            "{path}: {}",
            got.text
        );
        assert!(
            got.text.ends_with(&format!("page {path}")),
            "{path} {outcome}: {}",
            got.text
        );
        assert!(
            !lower.contains("hint.css"),
            "the 103's fields leaked into the final answer: {}",
            got.text
        );
    }
    assert_eq!(
        upstream.hits("/page"),
        1,
        "the 200 after the 103 was stored"
    );
}
