//! `corral serve` started while its store or bus is down: it serves as it would through the same
//! outage at run time (each route's `on_store_error`, `/readyz` degraded), connects once the
//! server is back, and coalesces from then on. `--require-backends` keeps the old refusal, naming
//! the part that is down.

use crate::support;

use std::net::SocketAddr;
use std::process::Stdio;

use support::http::Http;
use support::process::{CorralServe, ServeReplicas, corral_bin};
use support::proxy::fill;
use support::servers::free_port;
use support::upstream::Upstream;
use support::{TestNats, TestRedis, eventually, patience};

/// `{{backing}}` names the store and bus; `{{on_store_error}}` what a route does without them.
const CONFIG: &str = r#"
listen: {{listen}}
admin: { listen: {{admin}} }
namespace: backends
{{backing}}
defaults: { ttl: 60s, wait_timeout: 10s, lease_ttl: 10s, poll_interval: 1s, on_store_error: {{on_store_error}} }
routes:
  - name: reports
    match: { path_prefix: /reports }
    upstream: {{upstream}}
"#;

/// [`CONFIG`] filled but for `{{listen}}` and `{{admin}}`, each replica's own ports.
fn config(backing: &str, on_store_error: &str, upstream: &Upstream) -> String {
    CONFIG
        .replace("{{backing}}", backing)
        .replace("{{on_store_error}}", on_store_error)
        .replace("{{upstream}}", &upstream.url())
}

fn redis_store(redis: &TestRedis) -> String {
    format!("store: {{ kind: redis, url: \"{}\" }}", redis.url())
}

async fn readyz(http: &Http, replica: &CorralServe) -> (u16, String) {
    let reply = http
        .get(format!("{}/readyz", replica.admin_url()))
        .send()
        .await;
    (reply.status.as_u16(), reply.text())
}

/// Waits until `replica`'s `/readyz` says plain "ready" (the store answers, the bus is up).
async fn wait_fully_ready(http: &Http, replica: &CorralServe) {
    eventually("/readyz says ready, not degraded", || async {
        http.get(format!("{}/readyz", replica.admin_url()))
            .try_send()
            .await
            .is_ok_and(|reply| reply.status == 200 && reply.text().starts_with("ready\n"))
    })
    .await;
}

/// Two replicas started with Redis down serve each request by themselves (`on_store_error:
/// open`: one fetch per replica) and say so on `/readyz`; once Redis is up on that port they
/// connect without a restart, and a burst on both is fetched once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_starts_with_redis_down_degrades_then_connects_and_coalesces() {
    let mut redis = TestRedis::start().await;
    redis.kill();
    let upstream = Upstream::start().await;
    let replicas = ServeReplicas::start(2, &config(&redis_store(&redis), "open", &upstream)).await;
    let http = Http::new();

    for replica in replicas.all() {
        let (status, text) = readyz(&http, replica).await;
        assert_eq!(status, 200, "{text}");
        assert!(
            text.starts_with("ready, degraded") && text.contains("redis store"),
            "{text}"
        );
        let reply = http
            .get(format!("{}/reports/down", replica.url()))
            .send()
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(
        upstream.hits("/reports/down"),
        2,
        "each replica fetched for itself"
    );

    redis.restart().await;
    for replica in replicas.all() {
        wait_fully_ready(&http, replica).await;
        assert!(
            replica.output().contains("connected the store (redis at"),
            "the log says the store is back:\n{}",
            replica.output()
        );
    }

    // One fetch for both replicas: A leads under a lease in Redis, B waits on it.
    let hold = upstream.hold("/reports/up");
    let a = tokio::spawn(http.get(format!("{}/reports/up", replicas[0].url())).send());
    upstream.wait_for_hits("/reports/up", 1).await;
    let b = tokio::spawn(http.get(format!("{}/reports/up", replicas[1].url())).send());
    eventually("B's request waits on A's lease", || async {
        support::process::metric_sum(&replicas[1].metrics().await, "corral_flights_inflight", &[])
            == 1.0
    })
    .await;
    hold.release();
    let (a, b) = (a.await.expect("join"), b.await.expect("join"));
    assert_eq!(
        (a.status.as_u16(), b.status.as_u16()),
        (200, 200),
        "{} / {}",
        a.text(),
        b.text()
    );
    assert_eq!((a.x_cache(), b.x_cache()), ("MISS", "COALESCED"));
    assert_eq!(
        upstream.hits("/reports/up"),
        1,
        "fetched once for both replicas"
    );
}

/// With `on_store_error: closed`, a replica started with Redis down answers 503 and is not
/// ready, naming the store; once Redis is up it is ready and answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_route_answers_503_until_the_store_it_started_without_connects() {
    let mut redis = TestRedis::start().await;
    redis.kill();
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (public, admin) = (
        SocketAddr::from(([127, 0, 0, 1], free_port())),
        SocketAddr::from(([127, 0, 0, 1], free_port())),
    );
    let yaml = fill(
        &config(&redis_store(&redis), "closed", &upstream),
        &[
            ("listen", &public.to_string()),
            ("admin", &admin.to_string()),
        ],
    );
    let path = dir.path().join("closed.yaml");
    std::fs::write(&path, yaml).expect("write the config");
    let replica = CorralServe::start_live(&path, public, admin, &[]).await;
    let http = Http::new();

    let (status, text) = readyz(&http, &replica).await;
    assert_eq!(status, 503, "{text}");
    assert!(
        text.contains("redis store") && text.contains("closed"),
        "{text}"
    );
    let refused = http
        .get(format!("{}/reports/x", replica.url()))
        .send()
        .await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(upstream.hits("/reports/x"), 0);

    redis.restart().await;
    wait_fully_ready(&http, &replica).await;
    let served = http
        .get(format!("{}/reports/x", replica.url()))
        .send()
        .await;
    assert_eq!(served.status, 200, "{}", served.text());
    assert_eq!(upstream.hits("/reports/x"), 1);
}

/// Started with its NATS bus down (the Redis store up), a replica is ready, degraded ("followers
/// poll"), and subscribes once NATS is up on that port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_starts_with_the_bus_down_and_subscribes_once_it_is_up() {
    let (redis, mut nats) = tokio::join!(TestRedis::start(), TestNats::start());
    nats.kill();
    let upstream = Upstream::start().await;
    let backing = format!(
        "{}\nbus: {{ kind: nats, url: \"{}\" }}",
        redis_store(&redis),
        nats.url()
    );
    let replicas = ServeReplicas::start(1, &config(&backing, "open", &upstream)).await;
    let http = Http::new();
    let (status, text) = readyz(&http, &replicas[0]).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("the bus is disconnected"), "{text}");

    nats.restart().await;
    wait_fully_ready(&http, &replicas[0]).await;
    assert!(
        replicas[0].output().contains("connected the bus (nats at"),
        "{}",
        replicas[0].output()
    );
}

/// Started with its NATS KV store down (store and events are one connection), a replica is
/// ready, degraded, and connects both once NATS is up on that port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_starts_with_the_nats_kv_store_down_and_connects_once_it_is_up() {
    let mut nats = TestNats::start().await;
    nats.kill();
    let upstream = Upstream::start().await;
    let backing = format!("store: {{ kind: nats, url: \"{}\" }}", nats.url());
    let replicas = ServeReplicas::start(1, &config(&backing, "open", &upstream)).await;
    let http = Http::new();
    let (status, text) = readyz(&http, &replicas[0]).await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.starts_with("ready, degraded") && text.contains("nats_kv store"),
        "{text}"
    );

    nats.restart().await;
    wait_fully_ready(&http, &replicas[0]).await;
    assert!(
        replicas[0]
            .output()
            .contains("connected the store (nats_kv at"),
        "{}",
        replicas[0].output()
    );
}

/// `corral serve --require-backends` with its config.
async fn serve_requiring_backends(yaml: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let yaml = fill(
        yaml,
        &[
            ("listen", &format!("127.0.0.1:{}", free_port())),
            ("admin", &format!("127.0.0.1:{}", free_port())),
        ],
    );
    let path = dir.path().join("required.yaml");
    std::fs::write(&path, yaml).expect("write the config");
    let output = tokio::process::Command::new(corral_bin())
        .args(["serve", "--require-backends", "--config"])
        .arg(&path)
        .env_remove("CORRAL_CONFIG")
        .env_remove("CORRAL_LOG_FORMAT")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(patience(), output)
        .await
        .expect("corral serve --require-backends exits")
        .expect("run corral serve");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `--require-backends` keeps the fail-fast start, and the error names the part that is down and
/// its server: the store when Redis (store and bus) is down, the bus when only NATS is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_backends_refuses_to_start_naming_the_part_that_is_down() {
    let (mut redis, mut nats) = tokio::join!(TestRedis::start(), TestNats::start());
    let upstream = Upstream::start().await;
    nats.kill();
    let nats_bus = format!(
        "{}\nbus: {{ kind: nats, url: \"{}\" }}",
        redis_store(&redis),
        nats.url()
    );
    let (code, stderr) = serve_requiring_backends(&config(&nats_bus, "open", &upstream)).await;
    assert_eq!(code, Some(1), "{stderr}");
    let bus = format!("could not connect the bus (nats at {})", nats.url());
    assert!(stderr.contains(&bus), "expected {bus:?} in:\n{stderr}");

    redis.kill();
    let (code, stderr) =
        serve_requiring_backends(&config(&redis_store(&redis), "open", &upstream)).await;
    assert_eq!(code, Some(1), "{stderr}");
    let store = format!("could not connect the store (redis at {})", redis.url());
    assert!(stderr.contains(&store), "expected {store:?} in:\n{stderr}");
}
