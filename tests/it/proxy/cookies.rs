//! Cookies per route, end to end on three replicas with a real Redis store and NATS bus:
//! `cookies: strip` serves browsers that carry analytics or session cookies from the shared
//! entry without the upstream ever seeing them; `cookies: {strip: [...]}` strips only the named
//! ones; `bypass` (the default) sends a cookie-carrying request straight through. Whatever the
//! setting, an answer that sets a cookie is never shared.

use crate::support;

use support::proxy::{ProxyCluster, fill};
use support::upstream::Upstream;

const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0, token: secret }
namespace: cookies
store: { kind: redis, url: "{{redis}}", timeout: 1s }
bus: { kind: nats, url: "{{nats}}" }
defaults: { ttl: 60s, wait_timeout: 10s, lease_ttl: 5s, poll_interval: 1s, pass_ttl: 60s }
routes:
  - name: strip
    match: { path_prefix: /strip }
    upstream: {{upstream}}
    cookies: strip
  - name: named
    match: { path_prefix: /named }
    upstream: {{upstream}}
    key: { cookies: [lang] }
    cookies: { strip: ["_ga*", _gid] }
  - name: bypass
    match: { path_prefix: /bypass }
    upstream: {{upstream}}
"#;

async fn three_replicas(upstream: &Upstream) -> ProxyCluster {
    ProxyCluster::with_redis_nats(3, &fill(CONFIG, &[("upstream", &upstream.url())])).await
}

/// The `Cookie` header of each request the upstream got for `path`, in order.
fn cookies_seen(upstream: &Upstream, path: &str) -> Vec<Option<String>> {
    upstream
        .requests_for(path)
        .iter()
        .map(|r| r.header("cookie").map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strip_serves_cookie_carrying_browsers_from_the_shared_entry() {
    let upstream = Upstream::start().await.distinct_bodies("/");
    let proxy = three_replicas(&upstream).await;

    let first = proxy
        .get(0, "/strip/page")
        .header("cookie", "session=alice; _ga=GA1.2.3")
        .send()
        .await;
    assert_eq!(first.status, 200);
    assert_eq!(first.x_cache(), "MISS", "{}", first.cache_status());
    for i in 0..3 {
        let other = proxy
            .get(i, "/strip/page")
            .header("cookie", &format!("session=user{i}"))
            .send()
            .await;
        assert_eq!(
            other.x_cache(),
            "HIT",
            "replica {i}: {}",
            other.cache_status()
        );
        assert_eq!(other.text(), first.text(), "replica {i}");
    }
    assert_eq!(upstream.hits("/strip/page"), 1);
    assert_eq!(
        cookies_seen(&upstream, "/strip/page"),
        [None],
        "the upstream saw a cookie"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn named_strip_removes_only_the_named_cookies_and_keeps_keyed_ones() {
    let upstream = Upstream::start().await.distinct_bodies("/");
    let proxy = three_replicas(&upstream).await;

    let first = proxy
        .get(0, "/named/page")
        .header("cookie", "_ga=1; _ga_XYZ=2; _gid=3; lang=en")
        .send()
        .await;
    assert_eq!(first.x_cache(), "MISS", "{}", first.cache_status());
    let shared = proxy
        .get(1, "/named/page")
        .header("cookie", "lang=en; _gid=other")
        .send()
        .await;
    assert_eq!(shared.x_cache(), "HIT", "{}", shared.cache_status());
    assert_eq!(shared.text(), first.text());
    assert_eq!(
        cookies_seen(&upstream, "/named/page"),
        [Some("lang=en".to_owned())],
        "only the keyed cookie reaches a shared fetch"
    );

    // One cookie the route neither keys nor strips: straight through, cookies unchanged.
    let sent = "_ga=1; session=s3cr3t; lang=en";
    let bypassed = proxy
        .get(2, "/named/page")
        .header("cookie", sent)
        .send()
        .await;
    assert_eq!(bypassed.x_cache(), "BYPASS");
    assert!(
        bypassed.cache_status().contains("detail=cookie"),
        "{}",
        bypassed.cache_status()
    );
    assert_ne!(bypassed.text(), first.text(), "a bypass has its own answer");
    assert_eq!(
        cookies_seen(&upstream, "/named/page").last(),
        Some(&Some(sent.to_owned()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bypass_sends_cookie_carrying_requests_straight_through_unchanged() {
    let upstream = Upstream::start().await.distinct_bodies("/");
    let proxy = three_replicas(&upstream).await;

    for i in 0..3 {
        let reply = proxy
            .get(i, "/bypass/page")
            .header("cookie", "_ga=1; session=s3cr3t")
            .send()
            .await;
        assert_eq!(reply.x_cache(), "BYPASS", "replica {i}");
    }
    assert_eq!(upstream.hits("/bypass/page"), 3);
    let seen = cookies_seen(&upstream, "/bypass/page");
    assert!(
        seen.iter()
            .all(|c| c.as_deref() == Some("_ga=1; session=s3cr3t")),
        "{seen:?}"
    );
    // Without a cookie the route caches as ever.
    let miss = proxy.get(0, "/bypass/plain").send().await;
    assert_eq!(miss.x_cache(), "MISS");
    let hit = proxy.get(1, "/bypass/plain").send().await;
    assert_eq!(hit.x_cache(), "HIT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_answer_setting_a_cookie_is_never_shared_under_strip_and_its_pass_gets_the_cookies() {
    let upstream = Upstream::start()
        .await
        .header("/strip/login", "set-cookie", "session=new")
        .distinct_bodies("/strip/login")
        .header("/named/login", "set-cookie", "session=new")
        .distinct_bodies("/named/login");
    let proxy = three_replicas(&upstream).await;

    for path in ["/strip/login", "/named/login"] {
        let first = proxy.get(0, path).header("cookie", "_ga=1").send().await;
        assert_eq!(first.x_cache(), "PASS", "{path}: {}", first.cache_status());
        assert!(first.cache_status().contains("detail=set-cookie"), "{path}");
        assert_eq!(first.header("set-cookie"), Some("session=new"));
        let second = proxy.get(1, path).header("cookie", "_ga=2").send().await;
        assert_eq!(
            second.x_cache(),
            "PASS",
            "{path}: {}",
            second.cache_status()
        );
        assert_ne!(
            second.text(),
            first.text(),
            "{path}: a set-cookie answer was shared"
        );
        assert_eq!(upstream.hits(path), 2, "{path}");
        // The shared fetch went without the cookie; the pass past the marker is the client's own.
        assert_eq!(
            cookies_seen(&upstream, path),
            [None, Some("_ga=2".to_owned())],
            "{path}"
        );
    }
}
