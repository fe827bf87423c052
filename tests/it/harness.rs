//! Checks that the real-server test harness in `tests/support` does what the
//! other integration tests rely on. None of this touches the machine's own
//! Redis (6379) or NATS (4222).

use crate::support;

use std::time::Duration;

use redis::AsyncCommands;
use support::servers::{nats_info_line, parse_nats_version};
use support::{TestNats, TestRedis, eventually};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// True when no process with this pid exists any more (not even a zombie).
#[allow(unsafe_code)] // test harness: signals and process limits, see SAFETY below
fn pid_gone(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence; nothing is delivered.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

async fn ping(conn: &mut redis::aio::MultiplexedConnection) -> redis::RedisResult<String> {
    redis::cmd("PING").query_async(conn).await
}

// ---------------------------------------------------------------- redis ----

#[tokio::test]
async fn redis_set_get() {
    let redis = TestRedis::start().await;
    assert_ne!(redis.port(), 6379);
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}/", redis.port()));
    let mut conn = redis.client().await;
    let _: () = conn.set("k", "v").await.unwrap();
    let v: Option<String> = conn.get("k").await.unwrap();
    assert_eq!(v.as_deref(), Some("v"));
    let _: () = conn.pset_ex("t", "x", 60_000).await.unwrap();
    let pttl: i64 = conn.pttl("t").await.unwrap();
    assert!(pttl > 0 && pttl <= 60_000, "pttl {pttl}");
}

#[tokio::test]
async fn redis_restart_keeps_port_and_loses_data() {
    let mut redis = TestRedis::start().await;
    let (port, pid) = (redis.port(), redis.pid());
    let mut conn = redis.client().await;
    let _: () = conn.set("k", "before").await.unwrap();

    redis.restart().await;
    assert_eq!(redis.port(), port);
    assert_ne!(redis.pid(), pid);
    assert!(pid_gone(pid), "old redis-server {pid} still exists");

    let mut conn = redis.client().await;
    let v: Option<String> = conn.get("k").await.unwrap();
    assert_eq!(v, None, "nothing is persisted across a restart");
    let _: () = conn.set("k", "after").await.unwrap();
    let v: Option<String> = conn.get("k").await.unwrap();
    assert_eq!(v.as_deref(), Some("after"));

    // Restart after an explicit kill works too.
    redis.kill();
    assert!(!redis.is_running());
    redis.restart().await;
    assert!(redis.is_running());
    assert_eq!(ping(&mut redis.client().await).await.unwrap(), "PONG");
}

#[tokio::test]
async fn redis_pause_and_resume() {
    let mut redis = TestRedis::start().await;
    let mut conn = redis.client().await;
    assert_eq!(ping(&mut conn).await.unwrap(), "PONG");

    redis.pause();
    let r = tokio::time::timeout(Duration::from_millis(300), ping(&mut conn)).await;
    assert!(r.is_err(), "a paused redis-server answered: {r:?}");

    redis.resume();
    let r = tokio::time::timeout(Duration::from_secs(5), ping(&mut conn)).await;
    assert_eq!(r.expect("no answer after resume").unwrap(), "PONG");
    assert_eq!(ping(&mut redis.client().await).await.unwrap(), "PONG");
}

#[tokio::test]
async fn redis_kill_pubsub_clients() {
    let redis = TestRedis::start().await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("corral-test-channel").await.unwrap();

    let killed = redis.kill_pubsub_clients().await;
    assert!(killed >= 1, "killed {killed} pubsub clients");

    let mut admin = redis.client().await;
    eventually("no pubsub clients left", || {
        let mut admin = admin.clone();
        async move {
            let list: String = redis::cmd("CLIENT")
                .arg("LIST")
                .arg("TYPE")
                .arg("pubsub")
                .query_async(&mut admin)
                .await
                .unwrap();
            list.trim().is_empty()
        }
    })
    .await;
    assert_eq!(
        ping(&mut admin).await.unwrap(),
        "PONG",
        "admin connection survives"
    );
    assert_eq!(redis.kill_pubsub_clients().await, 0);
}

#[tokio::test]
async fn redis_command_calls() {
    let redis = TestRedis::start().await;
    let mut conn = redis.client().await;
    let _: Option<String> = conn.get("warm-up").await.unwrap();
    redis.reset_stats().await;
    assert_eq!(redis.command_calls("get").await, 0);
    for _ in 0..3 {
        let _: Option<String> = conn.get("k").await.unwrap();
    }
    let _: () = conn.set("k", "v").await.unwrap();
    assert_eq!(redis.command_calls("get").await, 3);
    assert_eq!(redis.command_calls("GET").await, 3);
    assert_eq!(redis.command_calls("set").await, 1);
    assert_eq!(redis.command_calls("evalsha").await, 0);
    redis.reset_stats().await;
    assert_eq!(redis.command_calls("get").await, 0);
}

#[tokio::test]
async fn redis_instances_are_separate() {
    let a = TestRedis::start().await;
    let b = TestRedis::start().await;
    assert_ne!(a.port(), b.port());
    assert_ne!(a.pid(), b.pid());
    let mut ca = a.client().await;
    let mut cb = b.client().await;
    let _: () = ca.set("k", "a").await.unwrap();
    let v: Option<String> = cb.get("k").await.unwrap();
    assert_eq!(v, None);
}

#[tokio::test]
async fn redis_drop_reaps_child() {
    let redis = TestRedis::start().await;
    let pid = redis.pid();
    assert!(!pid_gone(pid));
    assert!(
        redis.log().contains("Ready to accept connections"),
        "log: {}",
        redis.log()
    );
    drop(redis);
    assert!(pid_gone(pid), "redis-server {pid} still exists after drop");

    // A paused server is killed and reaped too.
    let mut redis = TestRedis::start().await;
    let pid = redis.pid();
    redis.pause();
    drop(redis);
    assert!(
        pid_gone(pid),
        "paused redis-server {pid} still exists after drop"
    );
}

// ----------------------------------------------------------------- nats ----

#[tokio::test]
async fn nats_starts_with_jetstream() {
    let nats = TestNats::start().await;
    assert_ne!(nats.port(), 4222);
    assert_eq!(nats.url(), format!("nats://127.0.0.1:{}", nats.port()));

    let stream = tokio::net::TcpStream::connect(("127.0.0.1", nats.port()))
        .await
        .unwrap();
    let mut reader = BufReader::new(stream);
    let mut info = String::new();
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut info))
        .await
        .expect("no INFO line within 5 s")
        .unwrap();
    assert!(info.starts_with("INFO {"), "{info}");
    assert!(info.contains("\"jetstream\":true"), "{info}");
    assert!(
        info.contains(&format!("\"port\":{}", nats.port())),
        "{info}"
    );
    assert!(
        info.contains(&format!("\"server_name\":\"{}\"", nats.server_name())),
        "{info}"
    );
    let version = info
        .split("\"version\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(parse_nats_version)
        .expect("version in INFO");
    assert!((version.0, version.1) >= (2, 11), "{version:?}");

    // The server speaks the client protocol.
    reader
        .get_mut()
        .write_all(b"CONNECT {\"verbose\":false}\r\nPING\r\n")
        .await
        .unwrap();
    let mut pong = String::new();
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut pong))
        .await
        .expect("no PONG within 5 s")
        .unwrap();
    assert_eq!(pong.trim_end(), "PONG");

    assert!(
        nats.js_dir().join("jetstream").is_dir(),
        "JetStream store dir missing"
    );
    // Clients may be served a moment before this line is written.
    eventually("nats-server logs that it is ready", || {
        let ready = nats.log().contains("Server is ready");
        async move { ready }
    })
    .await;
}

#[tokio::test]
async fn nats_restart_keeps_port() {
    let mut nats = TestNats::start().await;
    let (port, pid) = (nats.port(), nats.pid());
    nats.restart().await;
    assert_eq!(nats.port(), port);
    assert_ne!(nats.pid(), pid);
    assert!(pid_gone(pid), "old nats-server {pid} still exists");
    let info = nats.info_line().await;
    assert!(info.contains("\"jetstream\":true"), "{info}");

    nats.kill();
    assert!(!nats.is_running());
    assert!(
        nats_info_line(port, Duration::from_millis(300))
            .await
            .is_err()
    );
    nats.restart().await;
    assert!(nats.is_running());
    assert!(nats.info_line().await.contains(&format!("\"port\":{port}")));
}

#[tokio::test]
async fn nats_pause_and_resume() {
    let mut nats = TestNats::start().await;
    nats.pause();
    let r = nats_info_line(nats.port(), Duration::from_millis(300)).await;
    assert!(r.is_err(), "a paused nats-server answered: {r:?}");
    nats.resume();
    let info = nats_info_line(nats.port(), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(info.starts_with("INFO "), "{info}");
}

#[tokio::test]
async fn nats_drop_reaps_child() {
    let nats = TestNats::start().await;
    let pid = nats.pid();
    assert!(!pid_gone(pid));
    drop(nats);
    assert!(pid_gone(pid), "nats-server {pid} still exists after drop");
}

#[tokio::test]
async fn redis_and_nats_together() {
    let redis = TestRedis::start().await;
    let nats = TestNats::start().await;
    assert_ne!(redis.port(), nats.port());
}

// ---------------------------------------------------------------- misc -----

#[test]
fn parses_nats_versions() {
    assert_eq!(
        parse_nats_version("nats-server: v2.12.8\n"),
        Some((2, 12, 8))
    );
    assert_eq!(parse_nats_version("nats-server: v2.9.10"), Some((2, 9, 10)));
    assert_eq!(parse_nats_version("v2.11.0-RC.1"), Some((2, 11, 0)));
    assert_eq!(parse_nats_version("2.12.8"), Some((2, 12, 8)));
    assert_eq!(parse_nats_version("nats-server: dev"), None);
}

#[tokio::test]
async fn eventually_returns_once_true() {
    let mut calls = 0u32;
    eventually("the third call", || {
        calls += 1;
        let done = calls >= 3;
        async move { done }
    })
    .await;
    assert_eq!(calls, 3);
}

// ------------------------------------------------------------ upstream ----

use support::http::{Http, send_all};
use support::upstream::{Upstream, pattern};

#[tokio::test]
async fn upstream_answers_per_prefix_and_records_what_it_received() {
    let upstream = Upstream::start()
        .await
        .status("/gone", 410)
        .header("/gone", "x-seq", "request {n}")
        .body("/gone", &b"bye\0"[..])
        .body_size("/big", 1000)
        .distinct_bodies("/each");
    let http = Http::new();

    let echo = http
        .get(format!("{}/plain?a=1", upstream.url()))
        .send()
        .await;
    assert_eq!(echo.status, 200);
    assert_eq!(echo.text(), "upstream body for /plain?a=1");

    let gone = http
        .get(format!("{}/gone/x", upstream.url()))
        .header("x-probe", "yes")
        .body("ignored?")
        .send()
        .await;
    assert_eq!(gone.status, 410);
    assert_eq!(&gone.body[..], b"bye\0");
    assert_eq!(gone.header("x-seq"), Some("request 2"));

    let big = http.get(format!("{}/big", upstream.url())).send().await;
    assert_eq!(big.body, pattern(1000));
    assert_eq!(big.body[0], 0, "the pattern starts with a NUL byte");

    let each = send_all((0..3).map(|_| http.get(format!("{}/each", upstream.url())))).await;
    let bodies: std::collections::HashSet<_> = each.iter().map(|r| r.text()).collect();
    assert_eq!(bodies.len(), 3, "{bodies:?}");

    assert_eq!(upstream.hits("/plain?a=1"), 1);
    assert_eq!(upstream.hits("/plain"), 0, "hits are per path and query");
    assert_eq!(upstream.hits_under("/each"), 3);
    let recorded = upstream.requests_for("/gone/x");
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].header("x-probe"), Some("yes"));
    assert_eq!(&recorded[0].body[..], b"ignored?");
    assert_eq!(upstream.requests().len(), 6);
}

#[tokio::test]
async fn upstream_holds_responses_until_released() {
    let upstream = Upstream::start()
        .await
        .slow("/slow", Duration::from_millis(50));
    let hold = upstream.hold("/held");
    let http = Http::new();
    let waiting = tokio::spawn(http.get(format!("{}/held", upstream.url())).send());
    upstream.wait_for_hits("/held", 1).await;
    assert!(!waiting.is_finished(), "the response waits for the latch");
    hold.release();
    let reply = waiting.await.unwrap();
    assert_eq!(reply.status, 200);

    let slow = http.get(format!("{}/slow", upstream.url())).send().await;
    assert!(slow.took >= Duration::from_millis(50), "{:?}", slow.took);
}

#[tokio::test]
async fn a_refusing_upstream_refuses() {
    let url = Upstream::refusing();
    let result = Http::new().get(format!("{url}/x")).try_send().await;
    assert!(result.is_err(), "{result:?}");
}

#[tokio::test]
async fn hop_by_hop_headers_travel_between_the_client_and_upstream_without_a_proxy() {
    // The proxy tests rely on the upstream really sending these, so that stripping them is the
    // proxy's doing.
    let upstream = Upstream::start()
        .await
        .header("/hop", "connection", "x-hop-secret")
        .header("/hop", "x-hop-secret", "s3cret")
        .header("/hop", "keep-alive", "timeout=5");
    let reply = Http::new()
        .get(format!("{}/hop", upstream.url()))
        .header("connection", "x-client-hop")
        .header("x-client-hop", "1")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .send()
        .await;
    let sent = &upstream.requests_for("/hop")[0];
    assert_eq!(sent.header("connection"), Some("x-client-hop"));
    assert_eq!(sent.header("x-client-hop"), Some("1"));
    assert_eq!(sent.header("keep-alive"), Some("timeout=5"));
    assert_eq!(sent.header("proxy-connection"), Some("keep-alive"));
    assert_eq!(reply.header("connection"), Some("x-hop-secret"));
    assert_eq!(reply.header("x-hop-secret"), Some("s3cret"));
    assert_eq!(reply.header("keep-alive"), Some("timeout=5"));
}
