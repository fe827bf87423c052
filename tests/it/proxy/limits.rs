//! Limits: what one client connection and one request may ask of a replica, and what a route's
//! keys and upstream may be asked at once. Each over-limit request gets its status (or its
//! connection closed), is counted in `corral_limit_rejections_total`, and leaves nothing stored.

use crate::support;

use std::net::SocketAddr;
use std::time::Duration;

use http::Method;
use support::http::{Http, Reply};
use support::proxy::{ProxyCluster, fill};
use support::upstream::Upstream;
use support::{Deadline, eventually, patience};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0 }
namespace: limits
store: { kind: memory }
limits: { {{limits}} }
defaults: { lease_ttl: 5s, poll_interval: 1s, {{defaults}} }
routes:
  - name: search
    match: { path: /search, methods: [POST] }
    upstream: {{upstream}}
    key: { body: true }
  - name: upload
    match: { path: /upload, methods: [POST] }
    upstream: {{upstream}}
    cache: false
  - name: direct
    match: { path_prefix: /direct }
    upstream: {{upstream}}
    cache: false
  - name: reports
    match: { path_prefix: / }
    upstream: {{upstream}}
"#;

/// `replicas` replicas on one memory store in front of `upstream`.
async fn replicas(n: usize, upstream: &Upstream, limits: &str, defaults: &str) -> ProxyCluster {
    let yaml = fill(
        CONFIG,
        &[
            ("limits", limits),
            ("defaults", defaults),
            ("upstream", &upstream.url()),
        ],
    );
    ProxyCluster::on_memory(n, &yaml).await
}

/// The public listener's address of replica `i`.
fn addr(proxy: &ProxyCluster, i: usize) -> SocketAddr {
    proxy.url(i)["http://".len()..].parse().expect("ip:port")
}

/// The value of one series in replica `i`'s `/metrics` (0 when absent).
async fn metric(proxy: &ProxyCluster, i: usize, series: &str) -> f64 {
    let text = proxy.admin(i, Method::GET, "/metrics").send().await.text();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |value| value.trim().parse().expect("a number"))
}

async fn rejections(proxy: &ProxyCluster, i: usize, limit: &str) -> f64 {
    metric(
        proxy,
        i,
        &format!("corral_limit_rejections_total{{limit=\"{limit}\"}}"),
    )
    .await
}

/// Sends `request` on a fresh connection and reads until the server closes it; what was read.
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // The server may answer and close before it has read everything (that is the point of a
    // limit), so a failed write is not a failure of the test.
    let _ = stream.write_all(request).await;
    read_to_close(&mut stream).await
}

/// Reads until the peer closes (or resets) the connection, within the test's patience.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut read = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Deadline::after(patience());
    loop {
        match tokio::time::timeout(deadline.remaining(), stream.read(&mut buf)).await {
            Err(_) => panic!(
                "the connection was still open after {:?}; read so far: {:?}",
                patience(),
                String::from_utf8_lossy(&read)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return String::from_utf8_lossy(&read).into_owned(),
            Ok(Ok(n)) => read.extend_from_slice(&buf[..n]),
        }
    }
}

fn status_of(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"))
}

fn get(target: &str, headers: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nhost: test\r\n{headers}connection: close\r\n\r\n")
        .into_bytes()
}

/// The key `/page` was never stored: a normal request for it is a MISS that reaches the upstream.
async fn assert_nothing_stored(proxy: &ProxyCluster, upstream: &Upstream, path: &str) {
    let before = upstream.hits(path);
    let reply = proxy.get(0, path).send().await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.x_cache(), "MISS");
    assert_eq!(upstream.hits(path), before + 1);
}

// ------------------------------------------------------------------ request heads ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uri_over_the_limit_is_414_and_nothing_is_stored() {
    let upstream = Upstream::start().await;
    let proxy = replicas(1, &upstream, "max_uri_length: 1KiB", "").await;
    let long = format!("/page?x={}", "a".repeat(2000));
    let response = raw(addr(&proxy, 0), &get(&long, "")).await;
    assert_eq!(status_of(&response), 414, "{response}");
    // A target far beyond what the head buffer holds is refused by the parser, as a head too
    // large (431); either way it never reaches the route.
    let huge = format!("/page?x={}", "a".repeat(200_000));
    let response = raw(addr(&proxy, 0), &get(&huge, "")).await;
    assert_eq!(status_of(&response), 431, "{response}");
    assert_eq!(upstream.requests().len(), 0);
    assert_eq!(rejections(&proxy, 0, "uri_length").await, 1.0);
    assert_eq!(rejections(&proxy, 0, "headers").await, 1.0);
    assert_nothing_stored(&proxy, &upstream, "/page").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_or_too_large_headers_are_431_and_nothing_is_stored() {
    let upstream = Upstream::start().await;
    let proxy = replicas(
        1,
        &upstream,
        "max_header_count: 20, max_header_bytes: 4KiB",
        "",
    )
    .await;
    let many: String = (0..40).map(|i| format!("x-h{i}: v\r\n")).collect();
    let response = raw(addr(&proxy, 0), &get("/page", &many)).await;
    assert_eq!(status_of(&response), 431, "too many: {response}");
    // Over max_header_bytes but within the parser's buffer: refused by the head check.
    let large = format!("x-big: {}\r\n", "b".repeat(5000));
    let response = raw(addr(&proxy, 0), &get("/page", &large)).await;
    assert_eq!(status_of(&response), 431, "large: {response}");
    // Far over: refused by the parser.
    let huge = format!("x-big: {}\r\n", "b".repeat(100_000));
    let response = raw(addr(&proxy, 0), &get("/page", &huge)).await;
    assert_eq!(status_of(&response), 431, "huge: {response}");
    assert_eq!(upstream.requests().len(), 0);
    assert_eq!(rejections(&proxy, 0, "headers").await, 3.0);
    assert_nothing_stored(&proxy, &upstream, "/page").await;
}

// ------------------------------------------------------------------ request bodies ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_is_413_on_every_route_declared_or_streamed() {
    let upstream = Upstream::start().await;
    let proxy = replicas(1, &upstream, "max_request_body: 1KiB", "").await;
    let big = vec![b'x'; 4096];
    let http = Http::new();

    // Declared: refused before a byte of it is read.
    for path in ["/search", "/upload"] {
        let reply = http
            .call(Method::POST, format!("{}{path}", proxy.url(0)))
            .body(big.clone())
            .send()
            .await;
        assert_eq!(reply.status, 413, "{path}: {}", reply.text());
    }
    assert_eq!(upstream.requests().len(), 0);

    // Streamed (chunked, no length): counted as it arrives.
    for path in ["/search", "/upload"] {
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nhost: test\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        )
        .into_bytes();
        for _ in 0..4 {
            request.extend_from_slice(format!("400\r\n{}\r\n", "y".repeat(1024)).as_bytes());
        }
        request.extend_from_slice(b"0\r\n\r\n");
        let response = raw(addr(&proxy, 0), &request).await;
        assert_eq!(status_of(&response), 413, "{path}: {response}");
    }
    assert_eq!(rejections(&proxy, 0, "request_body").await, 4.0);

    // A body within the limit still goes through, and the keyed one was never stored.
    let reply = http
        .call(Method::POST, format!("{}/search", proxy.url(0)))
        .body(vec![b'y'; 1024])
        .send()
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.x_cache(), "MISS");
}

// ------------------------------------------------------------------ slow and idle clients ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_trickles_its_head_is_dropped_after_the_header_read_timeout() {
    let upstream = Upstream::start().await;
    let proxy = replicas(1, &upstream, "header_read_timeout: 500ms", "").await;
    let mut stream = TcpStream::connect(addr(&proxy, 0)).await.expect("connect");
    stream
        .write_all(b"GET /page HTTP/1.1\r\nhost: test\r\n")
        .await
        .expect("the first line");
    // One header byte every 100 ms: always something arriving, never a whole head. Bounded by a
    // count far past the timeout; the server must close the connection long before.
    let mut closed = false;
    for _ in 0..200 {
        if stream.write_all(b"x").await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => panic!(
                "the server answered a head it never got: {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(_) => {}
        }
    }
    assert!(closed, "a trickling client was never dropped");
    assert_eq!(rejections(&proxy, 0, "header_read_timeout").await, 1.0);
    assert_eq!(upstream.requests().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_but_a_slow_answer_is_not_cut() {
    let upstream = Upstream::start()
        .await
        .slow("/slow", Duration::from_millis(1500));
    let proxy = replicas(1, &upstream, "idle_timeout: 500ms", "").await;
    let mut stream = TcpStream::connect(addr(&proxy, 0)).await.expect("connect");
    // A request slower than the idle timeout is answered: the connection was busy, not idle.
    stream
        .write_all(b"GET /slow HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .expect("write");
    let mut buf = vec![0u8; 8192];
    let n = tokio::time::timeout(patience(), stream.read(&mut buf))
        .await
        .expect("an answer within patience")
        .expect("read");
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert_eq!(status_of(&head), 200, "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    // Then the kept-alive connection, left idle, is closed by the server.
    let rest = read_to_close(&mut stream).await;
    assert!(
        format!("{head}{rest}").ends_with("upstream body for /slow"),
        "the answer was cut: {head}{rest}"
    );
}

// ------------------------------------------------------------------ connections ----

/// Two kept-alive connections are served; a third is refused at once (a 503 or just the close,
/// never a wait) and counted under `limit`; once one closes, a new connection is served again.
async fn a_third_connection_is_refused_until_one_closes(proxy: &ProxyCluster, limit: &str) {
    let keep = b"GET /page HTTP/1.1\r\nhost: test\r\n\r\n";
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(addr(proxy, 0)).await.expect("connect");
        stream.write_all(keep).await.expect("write");
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(patience(), stream.read(&mut buf))
            .await
            .expect("an answer")
            .expect("read");
        assert_eq!(status_of(&String::from_utf8_lossy(&buf[..n])), 200);
        open.push(stream);
    }
    let refused = raw(addr(proxy, 0), &get("/page", "")).await;
    assert!(
        refused.is_empty() || status_of(&refused) == 503,
        "a connection over the limit was served: {refused:?}"
    );
    assert_eq!(rejections(proxy, 0, limit).await, 1.0);
    drop(open.pop());
    eventually("a freed connection slot is used again", || async {
        let response = raw(addr(proxy, 0), &get("/page", "")).await;
        !response.is_empty() && status_of(&response) == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_refused_at_once_not_queued() {
    let upstream = Upstream::start().await;
    let proxy = replicas(1, &upstream, "max_connections: 2", "").await;
    a_third_connection_is_refused_until_one_closes(&proxy, "connections").await;
}

/// With `max_connections_per_client`, one address's connections beyond it are refused at once,
/// under the listener's own limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_per_client_cap_are_refused() {
    let upstream = Upstream::start().await;
    let proxy = replicas(1, &upstream, "max_connections_per_client: 2", "").await;
    a_third_connection_is_refused_until_one_closes(&proxy, "connections_per_client").await;
    assert_eq!(rejections(&proxy, 0, "connections").await, 0.0);
}

// ------------------------------------------------------------------ followers ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_beyond_max_followers_gets_503_and_other_replicas_are_unaffected() {
    let upstream = Upstream::start().await;
    let hold = upstream.hold("/page");
    let proxy = replicas(3, &upstream, "", "max_followers: 2, wait_timeout: 20s").await;
    let waiting: Vec<_> = (0..3)
        .map(|_| tokio::spawn(proxy.get(0, "/page?k=1").send()))
        .collect();
    upstream.wait_for_hits("/page?k=1", 1).await;
    eventually("two followers wait on replica 0", || async {
        metric(&proxy, 0, "corral_followers_waiting").await == 2.0
    })
    .await;
    let refused = proxy.get(0, "/page?k=1").send().await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(rejections(&proxy, 0, "followers").await, 1.0);
    // Another replica's requests wait on their own flight, within its own limit.
    let elsewhere = tokio::spawn(proxy.get(1, "/page?k=1").send());
    eventually("replica 1 waits on the same key", || async {
        metric(&proxy, 1, "corral_followers_waiting").await == 0.0
            && metric(&proxy, 1, "corral_flights_inflight").await == 1.0
    })
    .await;
    hold.release();
    for reply in waiting {
        let reply: Reply = reply.await.expect("join");
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let reply = elsewhere.await.expect("join");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.x_cache(), "COALESCED");
    assert_eq!(upstream.hits("/page?k=1"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_beyond_max_followers_gets_the_stale_copy_when_there_is_one() {
    let upstream = Upstream::start().await;
    let proxy = replicas(
        1,
        &upstream,
        "",
        "max_followers: 1, ttl: 1s, stale_if_error: 60s, honor_cache_control: false",
    )
    .await;
    let first = proxy.get(0, "/page?k=2").send().await;
    assert_eq!(first.x_cache(), "MISS");
    // Past its freshness (1 s): the next request refreshes, and waits for it.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let hold = upstream.hold("/page");
    let leader = tokio::spawn(proxy.get(0, "/page?k=2").send());
    upstream.wait_for_hits("/page?k=2", 2).await;
    let follower = tokio::spawn(proxy.get(0, "/page?k=2").send());
    eventually("one follower waits", || async {
        metric(&proxy, 0, "corral_followers_waiting").await == 1.0
    })
    .await;
    let refused = proxy.get(0, "/page?k=2").send().await;
    assert_eq!(refused.status, 200, "{}", refused.text());
    assert_eq!(refused.x_cache(), "STALE");
    assert_eq!(refused.text(), first.text());
    assert_eq!(rejections(&proxy, 0, "followers").await, 1.0);
    hold.release();
    assert_eq!(leader.await.expect("join").status, 200);
    assert_eq!(follower.await.expect("join").status, 200);
}

// ------------------------------------------------------------------ upstream fetches ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_fetches_beyond_the_limit_wait_for_a_slot_then_get_503() {
    let upstream = Upstream::start().await;
    let hold = upstream.hold("/");
    let proxy = replicas(
        1,
        &upstream,
        "",
        "max_upstream_fetches: 1, wait_timeout: 1s, max_fetch: 20s",
    )
    .await;
    // A pass-through holds the route's only slot...
    let direct = tokio::spawn(proxy.get(0, "/direct/a").send());
    upstream.wait_for_hits("/direct/a", 1).await;
    // ...so the next one waits its wait timeout for a slot, then is refused.
    let refused = proxy.get(0, "/direct/b").send().await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(upstream.hits("/direct/b"), 0);
    // Fills have a budget of their own, as large: one key's fetch holds its slot (its client
    // stops waiting at its wait timeout; the fetch goes on), another key's fetch waits, then
    // fails.
    let first = tokio::spawn(proxy.get(0, "/page?k=a").send());
    upstream.wait_for_hits("/page?k=a", 1).await;
    let second = proxy.get(0, "/page?k=b").send().await;
    assert_eq!(second.status, 503, "{}", second.text());
    assert_eq!(upstream.hits("/page?k=b"), 0);
    assert_eq!(rejections(&proxy, 0, "upstream_passes").await, 1.0);
    assert_eq!(rejections(&proxy, 0, "upstream_fetches").await, 1.0);
    // The held fetch's own client stops waiting at its wait timeout.
    assert_eq!(first.await.expect("join").status, 504);
    hold.release();
    assert_eq!(direct.await.expect("join").status, 200);
    // Answered once its fetch ended, which gave its slot back.
    let stored = proxy.get(0, "/page?k=a").send().await;
    assert_eq!(stored.status, 200, "{}", stored.text());
    // Slots are free again; the refused key was never stored.
    let again = proxy.get(0, "/page?k=b").send().await;
    assert_eq!(again.status, 200);
    assert_eq!(again.x_cache(), "MISS");
}

// ------------------------------------------------------------------ clients that never read ----

/// A client with a small receive buffer that asks for `target` and then reads nothing: what it
/// was sent fills its buffer and the server's, and the server's writes to it wait.
async fn never_reading(addr: SocketAddr, target: &str, headers: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("a small receive buffer");
    let mut stream = socket.connect(addr).await.expect("connect");
    let request = format!("GET {target} HTTP/1.1\r\nhost: test\r\n{headers}\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    stream
}

/// Whether the server closed `stream` within the test's patience (reading what it holds first).
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let deadline = Deadline::after(patience());
    let mut buf = vec![0u8; 64 << 10];
    // Bounded by the answer's bytes, however few each read gets.
    for _ in 0..(16 << 10) {
        match tokio::time::timeout(deadline.remaining(), stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
    false
}

/// Clients that ask for a large pass-through (a `Cookie` sends any request on a cached route
/// straight through) and never read take every pass slot of the route; the route's cache fills
/// still get theirs, and the stuck clients are cut after `send_timeout`, which frees their
/// slots for the next pass-through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_neither_starve_fills_nor_hold_slots_past_the_send_timeout() {
    // Larger than the kernel's socket buffers on both sides can hold (up to 4 MiB each).
    let upstream = Upstream::start().await.body_size("/big", 16 << 20);
    let proxy = replicas(
        1,
        &upstream,
        "send_timeout: 1s, min_send_rate: 0",
        "max_upstream_fetches: 4, wait_timeout: 5s",
    )
    .await;
    let mut stuck = Vec::new();
    for i in 0..4 {
        let target = format!("/big?c={i}");
        stuck.push(never_reading(addr(&proxy, 0), &target, "cookie: sid=1\r\n").await);
        upstream.wait_for_hits(&target, 1).await;
    }
    // Every pass slot is taken; a cache fill on the same route has its own.
    let fill = proxy.get(0, "/page?k=1").send().await;
    assert_eq!(fill.status, 200, "{}", fill.text());
    assert_eq!(fill.x_cache(), "MISS");
    // Another pass-through waits for a slot, which the first stuck client's cut frees.
    let pass = proxy
        .get(0, "/page?k=2")
        .header("cookie", "sid=2")
        .send()
        .await;
    assert_eq!(pass.status, 200, "{}", pass.text());
    assert_eq!(pass.x_cache(), "BYPASS");
    // Reading now would drain a stuck client that is not cut yet: wait for the cuts first.
    eventually("every stuck client is cut", || async {
        rejections(&proxy, 0, "send_timeout").await == 4.0
    })
    .await;
    for stream in &mut stuck {
        assert!(
            closed_by_server(stream).await,
            "a stuck client was never cut"
        );
    }
    assert_eq!(rejections(&proxy, 0, "upstream_passes").await, 0.0);
}

// ------------------------------------------------------------------ http/2 ----

/// An HTTP/2 client can stop taking one stream's data (its flow-control window shut) while its
/// connection stays healthy, which no connection-level send limit sees: that stream is reset
/// after twice `send_timeout` and its pass slot is freed for the next pass-through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_its_client_stopped_reading_is_reset_and_frees_its_slot() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let upstream = Upstream::start().await.body_size("/big", 16 << 20);
    let proxy = replicas(
        1,
        &upstream,
        "send_timeout: 1s, min_send_rate: 0",
        "max_upstream_fetches: 1, wait_timeout: 10s",
    )
    .await;
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Empty<bytes::Bytes>>();
    let request = http::Request::get(format!("{}/big?h2=1", proxy.url(0)))
        .header("cookie", "sid=1")
        .body(Empty::new())
        .expect("a request");
    let response = tokio::time::timeout(patience(), client.request(request))
        .await
        .expect("a head within patience")
        .expect("an HTTP/2 answer");
    assert_eq!(response.version(), http::Version::HTTP_2);
    // Its body is held, never read: the stream's window shuts after its first 64 KiB.
    let (_parts, mut held) = response.into_parts();
    // The one pass slot is the held stream's until it is reset; then this pass-through gets it.
    let pass = proxy
        .get(0, "/page?k=h2")
        .header("cookie", "sid=2")
        .send()
        .await;
    assert_eq!(pass.status, 200, "{}", pass.text());
    assert_eq!(rejections(&proxy, 0, "send_timeout").await, 1.0);
    assert_eq!(rejections(&proxy, 0, "upstream_passes").await, 0.0);
    // The held stream ends in an error, short of its 16 MiB.
    let mut taken = 0usize;
    let ended = loop {
        match tokio::time::timeout(patience(), held.frame()).await {
            Ok(Some(Ok(frame))) => taken += frame.data_ref().map_or(0, bytes::Bytes::len),
            Ok(Some(Err(_))) => break true,
            Ok(None) => break false,
            Err(_) => panic!("the held stream neither ended nor gave data within patience"),
        }
    };
    assert!(
        ended,
        "the held stream ended as if whole after {taken} bytes"
    );
    assert!(taken < 16 << 20, "the whole answer arrived");
}

/// Clients may speak HTTP/2 with prior knowledge (h2c); its heads meet the same limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_is_served_within_the_same_limits() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let upstream = Upstream::start().await;
    let proxy = replicas(1, &upstream, "max_header_bytes: 4KiB", "").await;
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Empty<bytes::Bytes>>();
    let send = |header: Option<String>| {
        let mut request = http::Request::get(format!("{}/page?h2=1", proxy.url(0)));
        if let Some(value) = header {
            request = request.header("x-big", value);
        }
        let request = request.body(Empty::new()).expect("a request");
        let client = client.clone();
        async move {
            let response = tokio::time::timeout(patience(), client.request(request))
                .await
                .expect("an answer within patience")
                .expect("an HTTP/2 answer");
            let (parts, body) = response.into_parts();
            let body = body.collect().await.expect("a body").to_bytes();
            (parts, body)
        }
    };
    let (parts, body) = send(None).await;
    assert_eq!(parts.version, http::Version::HTTP_2);
    assert_eq!(parts.status, 200);
    assert_eq!(body, "upstream body for /page?h2=1");
    let (parts, _) = send(Some("b".repeat(5000))).await;
    assert_eq!(parts.status, 431);
    assert_eq!(rejections(&proxy, 0, "headers").await, 1.0);
    assert_eq!(upstream.hits("/page?h2=1"), 1);
}

// ------------------------------------------------------------------ metrics ----

/// Every limit's refusals are a series at 0 from the first scrape, and open connections are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_limit_is_exported_at_zero_from_the_start() {
    let upstream = Upstream::start().await;
    let proxy = replicas(1, &upstream, "", "").await;
    let text = proxy.admin(0, Method::GET, "/metrics").send().await.text();
    for family in ["corral_limit_rejections_total", "corral_connections_open"] {
        let help = text
            .lines()
            .find_map(|line| line.strip_prefix(&format!("# HELP {family} ")))
            .unwrap_or_else(|| panic!("{family} has no help text:\n{text}"));
        assert!(help.ends_with('.'), "{family}'s help is not a sentence");
    }
    for limit in corral::metrics::LIMITS {
        assert_eq!(rejections(&proxy, 0, limit).await, 0.0, "{limit}");
    }
    // The scrape itself is on an open admin connection.
    assert!(metric(&proxy, 0, "corral_connections_open").await >= 1.0);
}
