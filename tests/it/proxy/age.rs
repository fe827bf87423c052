//! `Age` per RFC 9111: the age an answer had when it arrived (the upstream's own `Age`, its first
//! member, plus the time the answer took) counts against its freshness, and every answer served
//! from the entry carries that age plus its time in the cache.

use crate::support;

use support::eventually;
use support::proxy::{ProxyCluster, fill};
use support::upstream::Upstream;

const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0, token: secret }
namespace: age
store: { kind: memory }
defaults: { ttl: 60s, wait_timeout: 10s, lease_ttl: 5s, poll_interval: 1s }
routes:
  - name: all
    match: { path_prefix: / }
    upstream: {{upstream}}
"#;

async fn start(upstream: &Upstream) -> ProxyCluster {
    ProxyCluster::on_memory(1, &fill(CONFIG, &[("upstream", &upstream.url())])).await
}

fn age_of(reply: &support::http::Reply) -> u64 {
    reply
        .header("age")
        .and_then(|age| age.parse().ok())
        .unwrap_or_else(|| panic!("no numeric Age: {:?}", reply.headers))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstreams_age_is_kept_and_grows_in_the_cache() {
    let upstream = Upstream::start()
        .await
        .header("/doc", "cache-control", "max-age=600")
        .header("/doc", "age", "30");
    let proxy = start(&upstream).await;

    let miss = proxy.get(0, "/doc/a").send().await;
    assert_eq!(miss.x_cache(), "MISS");
    assert!(
        age_of(&miss) >= 30,
        "the upstream's Age was dropped: {}",
        age_of(&miss)
    );
    let hit = proxy.get(0, "/doc/a").send().await;
    assert_eq!(hit.x_cache(), "HIT");
    assert!(
        age_of(&hit) >= 30,
        "a HIT lost the upstream's Age: {}",
        age_of(&hit)
    );
    assert_eq!(upstream.hits("/doc/a"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_arrived_old_is_stale_when_its_lifetime_is_used_up() {
    // 58 of its 60 seconds were used before corral got it: two are left, not sixty.
    let upstream = Upstream::start()
        .await
        .header("/doc", "cache-control", "max-age=60")
        .header("/doc", "age", "58, 0");
    let proxy = start(&upstream).await;

    let miss = proxy.get(0, "/doc/b").send().await;
    assert_eq!(miss.x_cache(), "MISS");
    eventually("the entry goes stale after its two seconds", || async {
        proxy.get(0, "/doc/b").send().await.x_cache() == "MISS"
    })
    .await;
    assert_eq!(upstream.hits("/doc/b"), 2);
}
