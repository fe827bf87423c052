//! What an operator relies on: `/readyz` following the store, and the access log a log pipeline
//! reads (`corral serve --log-format json`, one line per request).

use crate::support;

use std::net::SocketAddr;
use std::time::Duration;

use corral::engine::READINESS_PROBE;
use http::Method;
use support::http::Http;
use support::process::{ConfigFrom, CorralServe};
use support::proxy::{ProxyCluster, fill, percent_encode};
use support::servers::free_port;
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

/// How long past its own store probe `/readyz` may take to answer: the probe's bound is what
/// keeps it from hanging on a frozen store; this slack only absorbs a loaded machine.
const READYZ_SLACK: Duration = Duration::from_secs(3);

// ------------------------------------------------------------------ readiness ----

/// A frozen Redis (SIGSTOP: connections stay open, nothing answers) makes `/readyz` report the
/// store degraded within its probe's bound, naming it; the status stays 200, since the route
/// degrades (`on_store_error: open`, the default) and the replica still serves. Once Redis thaws
/// the report is plain "ready" again. (A route with `on_store_error: closed` makes it 503:
/// `tests/degrade.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_the_store_degraded_while_redis_is_paused_and_ready_after() {
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
    assert_eq!(paused.status, 200, "{:?}", paused.text());
    assert!(
        paused.text().contains("degraded") && paused.text().contains("redis store"),
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
    eventually("/readyz says ready once Redis is resumed", || async {
        readyz()
            .try_send()
            .await
            .is_ok_and(|r| r.status == 200 && r.text().starts_with("ready\n"))
    })
    .await;
    proxy.stop().await;
}

// ------------------------------------------------------------------ access log ----

/// The access lines a `corral serve` process has printed so far, parsed from its JSON log.
fn access_lines(output: &str) -> Vec<serde_json::Value> {
    output
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"))
        })
        .filter(|line| line["target"] == "corral::access")
        .collect()
}

/// `corral serve --log-format json` (here through `CORRAL_LOG_FORMAT`) writes one JSON access
/// line per request, with its request id, route, outcome, status, duration and key digest prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_access_log_has_one_line_per_request() {
    let upstream = Upstream::start().await;
    let dir = tempfile::Builder::new()
        .prefix("corral-ops-")
        .tempdir()
        .expect("a temporary directory");
    let public = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let yaml = fill(
        CONFIG,
        &[
            ("listen", &public.to_string()),
            ("admin", &admin.to_string()),
            ("backing", "store: { kind: memory }"),
            ("upstream", &upstream.url()),
        ],
    );
    let path = dir.path().join("corral.yaml");
    std::fs::write(&path, yaml).expect("write the config");
    let proxy = CorralServe::start_with_env(
        &path,
        public,
        admin,
        ConfigFrom::Flag,
        &[("CORRAL_LOG_FORMAT", "json"), ("RUST_LOG", "corral=info")],
    )
    .await;
    let http = Http::new();
    let url = |path: &str| format!("{}{path}", proxy.url());

    let miss = http
        .get(url("/reports?id=1"))
        .header("x-request-id", "ops-1")
        .send()
        .await;
    let hit = http.get(url("/reports?id=1")).send().await;
    let unrouted = http.get(url("/elsewhere")).send().await;
    assert_eq!((miss.x_cache(), hit.x_cache()), ("MISS", "HIT"));
    assert_eq!(unrouted.status, 404);

    let sent = 3;
    eventually("an access line for each of the 3 requests", || async {
        access_lines(&proxy.output()).len() >= sent
    })
    .await;
    let lines = access_lines(&proxy.output());
    assert_eq!(lines.len(), sent, "one line per request:\n{lines:#?}");
    // The event's fields sit at the top level of each line, beside `message` and `target`.
    let fields: Vec<&serde_json::Value> = lines.iter().collect();

    let key = http
        .get(format!(
            "{}/admin/status?url={}",
            proxy.admin_url(),
            percent_encode("/reports?id=1")
        ))
        .bearer("secret")
        .send()
        .await
        .json()["key"]
        .as_str()
        .expect("the status names the key")
        .to_owned();
    let expected = [
        ("ops-1", "reports", "miss", 200),
        (
            hit.header("x-request-id").expect("an id"),
            "reports",
            "hit",
            200,
        ),
        (
            unrouted.header("x-request-id").expect("an id"),
            "none",
            "bypass",
            404,
        ),
    ];
    for (line, (id, route, outcome, status)) in fields.iter().zip(expected) {
        assert_eq!(line["request_id"], id, "{line}");
        assert_eq!(line["route"], route, "{line}");
        assert_eq!(line["outcome"], outcome, "{line}");
        assert_eq!(line["status"], status, "{line}");
        assert_eq!(line["method"], "GET", "{line}");
        let duration = line["duration_ms"].as_f64().expect("a duration in ms");
        assert!(duration >= 0.0, "{line}");
    }
    // Cached requests log the first 16 hex digits of their key's digest; a request no route
    // took has no key.
    for line in &fields[..2] {
        let prefix = line["key"].as_str().expect("a key prefix");
        assert_eq!(prefix.len(), 16, "{line}");
        assert!(key.starts_with(prefix), "{prefix} is a prefix of {key}");
    }
    assert_eq!(fields[2]["key"], "-");
    assert_eq!(fields[0]["path"], "/reports");
}
