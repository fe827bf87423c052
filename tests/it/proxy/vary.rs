//! `Vary` in general, end to end (three replicas on a real Redis store and NATS bus): headers the
//! route forwards make variants, their values are normalised before keying, a key holds at most
//! `max_variants`, and `Vary: *` is never stored.

use crate::support;

use std::time::Duration;

use support::http::{Reply, send_all};
use support::proxy::{ProxyCluster, fill};
use support::upstream::Upstream;

const MS: Duration = Duration::from_millis(1);

const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0, token: secret }
namespace: vary
store: { kind: redis, url: "{{redis}}" }
bus: { kind: nats, url: "{{nats}}" }
defaults: { ttl: 60s, wait_timeout: 5s, lease_ttl: 5s, poll_interval: 1s, pass_ttl: 2s }
routes:
  - name: tenants
    match: { path_prefix: /tenants }
    upstream: {{upstream}}
    forward_headers: [{ name: x-tenant, unkeyed: true }]
  - name: negotiated
    match: { path_prefix: /negotiated }
    upstream: {{upstream}}
    vary: honor
    max_variants: 2
  - name: plain
    match: { path_prefix: / }
    upstream: {{upstream}}
"#;

async fn three_replicas(upstream: &Upstream) -> ProxyCluster {
    let config = fill(CONFIG, &[("upstream", &upstream.url())]);
    ProxyCluster::with_redis_nats(3, &config).await
}

/// The request number in a distinct body (`response <n> for ...`).
fn seq_of(reply: &Reply) -> u64 {
    let text = reply.text();
    text.strip_prefix("response ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a distinct body: {text:?}"))
}

#[tokio::test]
async fn a_forwarded_header_named_in_vary_makes_one_variant_per_value_across_replicas() {
    let upstream = Upstream::start()
        .await
        .header("/tenants", "vary", "X-Tenant, Accept-Encoding")
        .distinct_bodies("/tenants")
        .slow("/tenants", 100 * MS);
    let proxy = three_replicas(&upstream).await;
    let page = "/tenants/home";

    let calls = (0..60).map(|i| {
        let tenant = ["acme", "globex"][i % 2];
        proxy.get(i % 3, page).header("x-tenant", tenant)
    });
    let replies = send_all(calls).await;
    // The first answer revealed the variation; the other tenant's variant is one more fetch.
    assert_eq!(upstream.hits(page), 2, "one fetch per tenant cluster-wide");
    let seen = upstream.requests_for(page);
    let seq_for = |tenant: &str| {
        seen.iter()
            .find(|r| r.header("x-tenant") == Some(tenant))
            .unwrap_or_else(|| panic!("no fetch for {tenant}"))
            .seq
    };
    for (i, reply) in replies.iter().enumerate() {
        let tenant = ["acme", "globex"][i % 2];
        assert_eq!(reply.status, 200, "request {i}");
        assert_eq!(
            seq_of(reply),
            seq_for(tenant),
            "request {i} got another tenant's"
        );
    }
    for i in 0..3 {
        let reply = proxy.get(i, page).header("x-tenant", "globex").send().await;
        assert_eq!(
            (reply.x_cache(), seq_of(&reply)),
            ("HIT", seq_for("globex"))
        );
    }
    assert_eq!(upstream.hits(page), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn two_spellings_of_one_value_are_one_variant_and_one_fetch() {
    let upstream = Upstream::start()
        .await
        .header("/negotiated", "vary", "Accept")
        .distinct_bodies("/negotiated");
    let proxy = three_replicas(&upstream).await;
    let page = "/negotiated/doc";

    let first = proxy
        .get(0, page)
        .header("accept", "text/html, application/json;q=0.9")
        .send()
        .await;
    assert_eq!(first.x_cache(), "MISS");
    for (i, spelling) in [
        "Application/JSON ; q=0.9,TEXT/html",
        "text/html,application/json;q=0.9",
    ]
    .into_iter()
    .enumerate()
    {
        let reply = proxy
            .get(i + 1, page)
            .header("accept", spelling)
            .send()
            .await;
        assert_eq!(
            (reply.x_cache(), seq_of(&reply)),
            ("HIT", seq_of(&first)),
            "{spelling}"
        );
    }
    assert_eq!(upstream.hits(page), 1, "one entry, one fetch");
    proxy.stop().await;
}

#[tokio::test]
async fn variants_past_max_variants_are_passed_with_a_reason() {
    let upstream = Upstream::start()
        .await
        .header("/negotiated", "vary", "Accept-Language")
        .distinct_bodies("/negotiated");
    let proxy = three_replicas(&upstream).await;
    let page = "/negotiated/many";
    let get = |i: usize, language: &str| proxy.get(i, page).header("accept-language", language);

    let en = get(0, "en").send().await;
    let fr = get(1, "fr").send().await;
    assert_eq!((en.x_cache(), fr.x_cache()), ("MISS", "MISS"));
    // A third language on a route that keeps two: answered, never stored.
    for i in 0..3 {
        let de = get(i, "de").send().await;
        assert_eq!(
            (de.status.as_u16(), de.x_cache()),
            (200, "PASS"),
            "replica {i}"
        );
        assert!(
            de.cache_status().contains("detail=max-variants"),
            "{}",
            de.cache_status()
        );
    }
    // The two it keeps are still shared everywhere.
    for i in 0..3 {
        let again = get(i, "fr").send().await;
        assert_eq!((again.x_cache(), seq_of(&again)), ("HIT", seq_of(&fr)));
    }
    assert_eq!(
        upstream.hits(page),
        2 + 3,
        "en, fr, then each de request its own"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn vary_star_is_never_stored_on_any_route() {
    let upstream = Upstream::start()
        .await
        .header("/", "vary", "*")
        .distinct_bodies("/");
    let proxy = three_replicas(&upstream).await;
    for path in ["/tenants/star", "/negotiated/star", "/star"] {
        for i in 0..3 {
            let reply = proxy.get(i, path).header("x-tenant", "acme").send().await;
            assert_eq!(reply.x_cache(), "PASS", "{path} on replica {i}");
            assert!(
                reply.cache_status().contains("detail=vary-star"),
                "{}",
                reply.cache_status()
            );
        }
        assert_eq!(upstream.hits(path), 3, "{path}");
    }
    proxy.stop().await;
}
