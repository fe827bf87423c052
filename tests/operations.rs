//! What an operator relies on: `/readyz` following the store.

mod support;

use std::time::Duration;

use corral::engine::READINESS_PROBE;
use http::Method;
use support::proxy::{ProxyCluster, fill};
use support::upstream::Upstream;
use support::{TestRedis, eventually};
use tokio::time::Instant;

/// One route in front of `{{upstream}}`, on the store and bus `{{backing}}` names.
const CONFIG: &str = r#"
listen: {{listen}}
admin: { listen: {{admin}}, token: secret }
namespace: ops
{{backing}}
defaults: { ttl: 60s, wait_timeout: 5s, lease_ttl: 5s, poll_interval: 1s }
routes:
  - name: reports
    match: { path_prefix: /reports }
    upstream: {{upstream}}
"#;

/// How long past its own store probe `/readyz` may take to say 503: the probe's bound is what
/// keeps it from hanging on a frozen store; this slack only absorbs a loaded machine.
const READYZ_SLACK: Duration = Duration::from_secs(3);

// ------------------------------------------------------------------ readiness ----

/// A frozen Redis (SIGSTOP: connections stay open, nothing answers) makes `/readyz` answer 503
/// within its probe's bound, naming the store; once Redis thaws it answers 200 again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_redis_is_paused_and_200_after() {
    let upstream = Upstream::start().await;
    let mut redis = TestRedis::start().await;
    let yaml = fill(
        CONFIG,
        &[
            ("listen", "127.0.0.1:0"),
            ("admin", "127.0.0.1:0"),
            (
                "backing",
                &format!("store: {{ kind: redis, url: \"{}\" }}", redis.url()),
            ),
            ("upstream", &upstream.url()),
        ],
    );
    let proxy = ProxyCluster::start(1, &yaml, None).await;
    let readyz = || proxy.admin(0, Method::GET, "/readyz");
    assert_eq!(readyz().send().await.status, 200, "ready before the pause");

    redis.pause();
    let asked = Instant::now();
    let paused = readyz().send().await;
    let took = asked.elapsed();
    assert_eq!(paused.status, 503, "{:?}", paused.text());
    assert!(
        paused.text().contains("redis store"),
        "the reason names the store: {:?}",
        paused.text()
    );
    assert!(
        took <= READINESS_PROBE + READYZ_SLACK,
        "/readyz took {took:?} with the store frozen; its probe is bounded by {READINESS_PROBE:?}"
    );
    // Liveness does not depend on the store.
    assert_eq!(
        proxy.admin(0, Method::GET, "/healthz").send().await.status,
        200
    );

    redis.resume();
    eventually("/readyz answers 200 once Redis is resumed", || async {
        readyz().try_send().await.is_ok_and(|r| r.status == 200)
    })
    .await;
    proxy.stop().await;
}
