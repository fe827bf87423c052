//! Graceful shutdown of real `corral serve` processes on Redis + NATS: SIGTERM turns `/readyz`
//! 503 and closes the public listener at once; a fetch that ends within `shutdown_grace` is
//! answered and shared; one that outlives it has its lease abandoned, so another replica's waiting
//! request takes over at once rather than after `lease_ttl`; and the process exits 0.

use crate::support;

use std::net::SocketAddr;
use std::path::Path;

use support::http::Http;
use support::process::{ConfigFrom, CorralServe};
use support::proxy::fill;
use support::servers::free_port;
use support::upstream::Upstream;
use support::{TestNats, TestRedis, eventually, patience};
use tokio::net::TcpStream;

/// Long leases and waits shorter than them: a waiting request answered 200 was answered before the
/// lease it waited on could have expired.
const CONFIG: &str = r#"
listen: {{public}}
admin: { listen: {{admin}} }
namespace: shutdown
store: { kind: redis, url: "{{redis}}" }
bus: { kind: nats, url: "{{nats}}" }
limits: { shutdown_grace: {{grace}} }
defaults: { lease_ttl: 30s, wait_timeout: 15s, max_fetch: 60s, poll_interval: 20s }
routes:
  - name: slow
    match: { path_prefix: / }
    upstream: {{upstream}}
"#;

/// A `corral serve` process in front of `upstream`, on `redis` and `nats`.
async fn serve(
    dir: &Path,
    name: &str,
    upstream: &Upstream,
    redis: &TestRedis,
    nats: &TestNats,
    grace: &str,
) -> (CorralServe, SocketAddr) {
    let public = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let yaml = fill(
        CONFIG,
        &[
            ("public", &public.to_string()),
            ("admin", &admin.to_string()),
            ("redis", &redis.url()),
            ("nats", &nats.url()),
            ("grace", grace),
            ("upstream", &upstream.url()),
        ],
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).expect("write the config");
    (
        CorralServe::start(&path, public, admin, ConfigFrom::Flag).await,
        public,
    )
}

/// The value of one series in a process's `/metrics` (0 when absent).
async fn metric(http: &Http, process: &CorralServe, series: &str) -> f64 {
    let text = http
        .get(format!("{}/metrics", process.admin_url()))
        .send()
        .await
        .text();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |value| value.trim().parse().expect("a number"))
}

/// Replica A leads a fetch the upstream holds, replica B waits on A's lease; then A is sent
/// SIGTERM. Returns both requests still waiting.
struct Scene {
    a: CorralServe,
    a_public: SocketAddr,
    b: CorralServe,
    upstream: Upstream,
    hold: support::upstream::Hold,
    a_reply: tokio::task::JoinHandle<support::http::Reply>,
    b_reply: tokio::task::JoinHandle<support::http::Reply>,
    http: Http,
    _servers: (TestRedis, TestNats, tempfile::TempDir),
}

async fn scene(grace: &str) -> Scene {
    let (redis, nats) = tokio::join!(TestRedis::start(), TestNats::start());
    let upstream = Upstream::start().await;
    let hold = upstream.hold("/slow");
    let dir = tempfile::Builder::new()
        .prefix("corral-shutdown-")
        .tempdir()
        .expect("a temporary directory");
    let (a, a_public) = serve(dir.path(), "a", &upstream, &redis, &nats, grace).await;
    let (b, _) = serve(dir.path(), "b", &upstream, &redis, &nats, grace).await;
    let http = Http::new();
    let a_reply = tokio::spawn(http.get(format!("{}/slow?k=1", a.url())).send());
    upstream.wait_for_hits("/slow?k=1", 1).await;
    let b_reply = tokio::spawn(http.get(format!("{}/slow?k=1", b.url())).send());
    eventually("B's request waits on A's lease", || async {
        metric(&http, &b, "corral_flights_inflight").await == 1.0
    })
    .await;
    let mut scene = Scene {
        a,
        a_public,
        b,
        upstream,
        hold,
        a_reply,
        b_reply,
        http,
        _servers: (redis, nats, dir),
    };
    assert!(scene.a.signal(libc::SIGTERM), "SIGTERM to A");
    scene
}

/// A is draining: `/readyz` says 503 and the public listener refuses new connections.
async fn assert_draining(scene: &Scene) {
    let readyz = format!("{}/readyz", scene.a.admin_url());
    eventually("A's /readyz answers 503", || async {
        matches!(scene.http.get(&readyz).try_send().await, Ok(reply) if reply.status == 503)
    })
    .await;
    eventually("A refuses new connections", || async {
        TcpStream::connect(scene.a_public).await.is_err()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_that_ends_within_the_grace_is_answered_and_shared_then_the_process_exits_0() {
    let mut scene = scene("20s").await;
    assert_draining(&scene).await;
    assert!(
        !scene.a_reply.is_finished(),
        "A answered its request before the fetch ended"
    );
    scene.hold.release();
    let a = scene.a_reply.await.expect("join");
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.x_cache(), "MISS");
    let b = scene.b_reply.await.expect("join");
    assert_eq!(b.status, 200, "{}", b.text());
    assert_eq!(b.x_cache(), "COALESCED");
    let exit = scene.a.wait_exit(patience()).await;
    assert!(
        exit.is_some_and(|status| status.success()),
        "A did not exit 0 within {:?}: {exit:?}\n{}",
        patience(),
        scene.a.output()
    );
    assert_eq!(scene.upstream.hits("/slow?k=1"), 1);
    assert_eq!(
        metric(
            &scene.http,
            &scene.b,
            "corral_lease_events_total{event=\"taken_over\"}"
        )
        .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_that_outlives_the_grace_is_abandoned_and_another_replica_takes_over_at_once() {
    let mut scene = scene("1s").await;
    assert_draining(&scene).await;
    // At the end of the grace A abandons its lease, answers its own request 503, and exits 0,
    // while the upstream still holds its fetch.
    let exit = scene.a.wait_exit(patience()).await;
    assert!(
        exit.is_some_and(|status| status.success()),
        "A did not exit 0 within {:?}: {exit:?}\n{}",
        patience(),
        scene.a.output()
    );
    let a = scene.a_reply.await.expect("join");
    assert_eq!(a.status, 503, "{}", a.text());
    // B took over: its own fetch reached the upstream, long before A's 30 s lease could expire
    // (B's request waits at most 15 s, so a 200 proves it).
    scene.upstream.wait_for_hits("/slow?k=1", 2).await;
    scene.hold.release();
    let b = scene.b_reply.await.expect("join");
    assert_eq!(b.status, 200, "{}", b.text());
    assert_eq!(b.x_cache(), "MISS");
    assert_eq!(
        metric(
            &scene.http,
            &scene.b,
            "corral_lease_events_total{event=\"taken_over\"}"
        )
        .await,
        1.0
    );
    assert_eq!(scene.upstream.hits("/slow?k=1"), 2);
}

/// Idle keep-alive connections are closed as the drain begins: they do not hold shutdown up for
/// the grace (ten minutes here, far past the test's patience).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed_at_once_when_shutdown_begins() {
    use support::proxy::ProxyCluster;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let upstream = Upstream::start().await;
    let yaml = format!(
        "store: {{ kind: memory }}\nlimits: {{ shutdown_grace: 600s, idle_timeout: 600s }}\n\
         routes:\n  - name: all\n    match: {{ path_prefix: / }}\n    upstream: {}\n",
        upstream.url()
    );
    let proxy = ProxyCluster::on_memory(1, &yaml).await;
    let mut stream = TcpStream::connect(&proxy.url(0)["http://".len()..])
        .await
        .expect("connect");
    stream
        .write_all(b"GET /a HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(patience(), stream.read(&mut buf))
        .await
        .expect("an answer")
        .expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // The connection is now idle and kept alive; stopping must close it rather than wait for it.
    proxy.stop().await;
    let closed = tokio::time::timeout(patience(), stream.read(&mut buf))
        .await
        .expect("the idle connection was closed");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
}
