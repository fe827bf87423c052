//! Faults of the upstream, and bodies too large to keep: three replicas on a real Redis store and
//! NATS bus whose upstream resets its connection or breaks off mid-body (through a fault proxy),
//! and `corral serve` streaming half a gigabyte.
//!
//! What these hold the code to: a failed fetch is never stored and never served as complete (a
//! client sees an error status or a body that ends in an error), and the next request fetches
//! afresh; a body larger than `max_body` streams through with bounded memory, byte for byte, and
//! is not stored.
//!
//! Elsewhere, on the same three replicas: a 5xx shared by every waiter and not stored
//! (`tests/proxy.rs`, `an_upstream_error_reaches_every_waiter_at_once_and_is_not_stored`), and an
//! upstream slower than `wait_timeout` (`past_wait_timeout_a_request_gets_a_504_and_the_fetch_
//! still_lands`, `with_on_wait_timeout_bypass_a_request_fetches_for_itself_and_stores_nothing`).

use crate::support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::fault::{Fault, FaultProxy};
use support::http::Reply;
use support::process::ServeReplicas;
use support::proxy::{ProxyCluster, fill};
use support::upstream::{Upstream, pattern};
use support::{TestNats, TestRedis, eventually, patience};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

const MIB: usize = 1024 * 1024;

/// Three replicas whose upstream is reached through a fault proxy. `cached` keeps answers up to
/// `max_body` (1 MiB); `small` up to 64 KiB, so a larger answer streams to its own client;
/// `live` is never cached.
const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0, token: secret }
namespace: upfaults
store: { kind: redis, url: "{{redis}}" }
bus: { kind: nats, url: "{{nats}}" }
defaults: { ttl: 60s, wait_timeout: 5s, lease_ttl: 5s, poll_interval: 1s, max_body: 1MiB, pass_ttl: 2s, max_fetch: 4s }
routes:
  - name: small
    match: { path_prefix: /small }
    upstream: {{upstream}}
    max_body: 64KiB
  - name: live
    match: { path_prefix: /live }
    upstream: {{upstream}}
    cache: false
  - name: cached
    match: { path_prefix: / }
    upstream: {{upstream}}
    key: { query: all }
"#;

/// An upstream, a fault proxy in front of it, and three replicas that reach it through the proxy.
struct Stack {
    cluster: ProxyCluster,
    link: FaultProxy,
    upstream: Upstream,
}

async fn stack(upstream: Upstream) -> Stack {
    let link = FaultProxy::start(upstream.addr()).await;
    let yaml = fill(CONFIG, &[("upstream", &format!("http://{}", link.addr()))]);
    let cluster = ProxyCluster::with_redis_nats(3, &yaml).await;
    Stack {
        cluster,
        link,
        upstream,
    }
}

/// How many followers wait, over every replica.
async fn followers_waiting(cluster: &ProxyCluster) -> f64 {
    let mut sum = 0.0;
    for i in 0..cluster.len() {
        let text = cluster
            .admin(i, http::Method::GET, "/metrics")
            .send()
            .await
            .text();
        sum += support::process::metric_sum(&text, "corral_followers_waiting", &[]);
    }
    sum
}

/// Sends `n` requests for `url` spread over the replicas while the upstream holds them, waits
/// until one fetch has arrived and every other request has joined a flight, sets `fault` on the
/// link, then lets the upstream answer.
async fn burst_under(stack: &Stack, url: &str, prefix: &str, n: usize, fault: Fault) -> Vec<Reply> {
    let hold = stack.upstream.hold(prefix);
    let calls: Vec<_> = stack
        .cluster
        .spread(n, url)
        .into_iter()
        .map(|call| tokio::spawn(call.send()))
        .collect();
    stack.upstream.wait_for_hits(url, 1).await;
    let joined = (n - stack.cluster.len()) as f64;
    eventually("every request has joined a flight", || async {
        followers_waiting(&stack.cluster).await >= joined
    })
    .await;
    stack.link.set(fault);
    hold.release();
    let mut replies = Vec::with_capacity(n);
    for call in calls {
        replies.push(call.await.expect("a request task"));
    }
    replies
}

/// After a failed fetch: with the link passing again, the next request fetches afresh (a MISS)
/// and gets the whole body.
async fn next_is_a_fresh_miss(stack: &Stack, url: &str, body: &[u8], fetches_before: usize) {
    stack.link.restore();
    let next = stack.cluster.get(1, url).send().await;
    assert_eq!(next.status, 200, "{url} after the fault: {}", next.text());
    assert_eq!(
        next.x_cache(),
        "MISS",
        "{url}: the failed fetch was not stored"
    );
    assert!(next.body == body, "{url}: the refetch is whole");
    assert_eq!(stack.upstream.hits(url), fetches_before + 1);
}

/// Fault test 9: the upstream connection is reset while the fetch is held. The one fetch fails;
/// every waiter on every replica gets the same 502 at once; nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_upstream_connection_fails_every_waiter_and_nothing_is_stored() {
    let stack = stack(Upstream::start().await).await;
    let url = "/reset?k=1";

    let replies = burst_under(&stack, url, "/reset", 30, Fault::Reset).await;

    for (i, reply) in replies.iter().enumerate() {
        assert_eq!(reply.status, 502, "request {i}: {}", reply.text());
    }
    assert_eq!(stack.upstream.hits(url), 1, "one fetch, its failure shared");
    next_is_a_fresh_miss(
        &stack,
        url,
        format!("upstream body for {url}").as_bytes(),
        1,
    )
    .await;
}

/// Fault test 9: the upstream's answer breaks off halfway through its body (the connection
/// closes after 100 KB of a 200 KB answer that would be stored). The fetch fails for every
/// waiter: no 200 with a cut body reaches anyone; nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_cut_mid_body_is_an_error_for_every_waiter_and_is_not_stored() {
    const LEN: usize = 200_000;
    let stack = stack(Upstream::start().await.body_size("/cut", LEN)).await;
    let url = "/cut?k=1";

    let replies = burst_under(&stack, url, "/cut", 30, Fault::CloseAfter(100_000)).await;

    for (i, reply) in replies.iter().enumerate() {
        assert_eq!(reply.status, 502, "request {i}: {} bytes", reply.body.len());
    }
    assert_eq!(stack.upstream.hits(url), 1, "one fetch, its failure shared");
    next_is_a_fresh_miss(&stack, url, &pattern(LEN), 1).await;
}

/// Fault test 9: an answer larger than the route keeps (64 KiB) streams to its own client; when
/// it breaks off midway, that client's body ends in an error rather than looking complete; the
/// same on a route that never caches. Nothing is stored: the next request is not a HIT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_cut_while_streaming_ends_the_clients_body_in_an_error() {
    const LEN: usize = MIB;
    let upstream = Upstream::start()
        .await
        .body_size("/small", LEN)
        .body_size("/live", LEN);
    let stack = stack(upstream).await;

    for url in ["/small/cut?k=1", "/live/cut?k=1"] {
        stack.link.set(Fault::CloseAfter(300_000));
        let cut = stack.cluster.get(0, url).try_send().await;
        println!(
            "{url} cut mid-body: {}",
            match &cut {
                Ok(reply) => format!("{} with {} bytes", reply.status, reply.body.len()),
                Err(error) => error.clone(),
            }
        );
        match cut {
            Err(error) => assert!(
                error.contains("reading the body failed"),
                "{url}: the client should see its body break off: {error}"
            ),
            Ok(reply) => assert_ne!(
                reply.status,
                200,
                "{url}: a cut answer was served as complete ({} of {LEN} bytes)",
                reply.body.len()
            ),
        }
        stack.link.restore();
        let next = stack.cluster.get(1, url).send().await;
        assert_eq!(next.status, 200, "{url}");
        assert_ne!(next.x_cache(), "HIT", "{url}: the cut answer was stored");
        assert!(next.body == pattern(LEN), "{url}: the next answer is whole");
    }
}

// --------------------------------------------------------------------------- large bodies ----

/// Bytes per frame of [`BigUpstream`]: a multiple of the pattern's period (251), so every frame
/// starts the pattern afresh and one buffer serves them all.
const FRAME: usize = 251 * 256;

/// An HTTP/1.1 upstream that answers `GET /...?len=N` with `N` bytes of [`pattern`], generated
/// frame by frame as the reader takes them (one shared frame in memory), with a Content-Length.
struct BigUpstream {
    addr: SocketAddr,
    /// Requests answered so far.
    hits: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl Drop for BigUpstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl BigUpstream {
    async fn start() -> BigUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local_addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = hits.clone();
        let frame = pattern(FRAME);
        let accept = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let (frame, counted) = (frame.clone(), counted.clone());
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<_>| {
                        counted.fetch_add(1, Ordering::SeqCst);
                        let len: usize = request
                            .uri()
                            .query()
                            .and_then(|q| q.strip_prefix("len="))
                            .and_then(|n| n.parse().ok())
                            .unwrap_or(0);
                        let frame = frame.clone();
                        let frames =
                            futures::stream::iter((0..len.div_ceil(FRAME)).map(move |i| {
                                let n = FRAME.min(len - i * FRAME);
                                Ok::<_, Infallible>(Frame::data(frame.slice(..n)))
                            }));
                        let mut response = Response::new(StreamBody::new(frames));
                        response
                            .headers_mut()
                            .insert(http::header::CONTENT_LENGTH, len.into());
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        BigUpstream { addr, hits, accept }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// What a streamed GET brought back.
struct Streamed {
    status: StatusCode,
    x_cache: String,
    /// Bytes received.
    len: usize,
    /// Whether every byte was where [`pattern`] puts it.
    intact: bool,
    /// The largest resident set of the server seen while the body streamed, in KiB.
    peak_rss_kib: u64,
}

/// GETs `url` and checks each byte against [`pattern`] as it arrives (keeping nothing), while
/// sampling `rss` (the server's resident set) every few milliseconds.
async fn stream_get(url: &str, rss: impl Fn() -> u64) -> Streamed {
    // The pattern from every phase: a window into this is the expected bytes at any offset.
    let period = pattern(251 + 4 * FRAME);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let response = tokio::time::timeout(patience(), client.get(url.parse().expect("a URL")))
        .await
        .expect("a response head in time")
        .expect("a response");
    let status = response.status();
    let x_cache = response
        .headers()
        .get("x-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("(none)")
        .to_string();
    let mut body = response.into_body();
    let (mut len, mut intact, mut peak) = (0usize, true, rss());
    let mut sampled = Instant::now();
    // Each frame brings at least one byte; a body of N bytes has at most N frames, and the
    // whole read is bounded by a deadline well past what it needs.
    let deadline = Instant::now() + 6 * patience();
    loop {
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .expect("the body streams to its end in time");
        let Some(frame) = frame else { break };
        let Ok(data) = frame.expect("the body streams without error").into_data() else {
            continue;
        };
        for piece in data.chunks(4 * FRAME) {
            let at = len % 251;
            intact &= piece == &period[at..at + piece.len()];
            len += piece.len();
        }
        if sampled.elapsed() >= Duration::from_millis(20) {
            peak = peak.max(rss());
            sampled = Instant::now();
        }
    }
    Streamed {
        status,
        x_cache,
        len,
        intact,
        peak_rss_kib: peak.max(rss()),
    }
}

/// One `corral serve` (memory is read per process) in front of [`BigUpstream`]: a route that
/// never caches, and one that keeps answers up to 8 MiB.
const LARGE: &str = r#"
listen: {{listen}}
admin: { listen: {{admin}}, token: secret }
namespace: large
store: { kind: redis, url: "{{redis}}" }
bus: { kind: nats, url: "{{nats}}" }
defaults: { ttl: 60s, wait_timeout: 10s, lease_ttl: 5s, poll_interval: 1s, max_body: 8MiB, pass_ttl: 60s, max_fetch: 10s }
routes:
  - name: live
    match: { path_prefix: /live }
    upstream: {{upstream}}
    cache: false
  - name: cached
    match: { path_prefix: / }
    upstream: {{upstream}}
    key: { query: all }
"#;

/// `max_body` of [`LARGE`].
const MAX_BODY: usize = 8 * MIB;

/// Fault test 12: 500 MB through a route that never caches streams with the server's memory
/// growing by a small fraction of it, every byte intact; an answer just over `max_body` on a
/// cached route is served whole and not stored (the next request is a PASS), and one far over it
/// streams with bounded memory too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_intact_with_bounded_memory_and_are_not_stored() {
    const HUGE: usize = 500_000_000;
    const FAR_OVER: usize = 100_000_000;
    // Far below either body: what streaming costs, not what buffering would.
    const GROWTH_LIMIT_KIB: u64 = 48 * 1024;
    let upstream = BigUpstream::start().await;
    let (redis, nats) = tokio::join!(TestRedis::start(), TestNats::start());
    let yaml = fill(
        LARGE,
        &[
            ("redis", &redis.url()),
            ("nats", &nats.url()),
            ("upstream", &upstream.url()),
        ],
    );
    let replicas = ServeReplicas::start(1, &yaml).await;
    let proxy = &replicas[0];
    let rss = || proxy.rss_kib();

    // A small answer first, so the connections and pools exist before memory is measured.
    let warm = stream_get(&format!("{}/live/warm?len=1000", proxy.url()), rss).await;
    assert!(warm.intact && warm.len == 1000);

    let before = rss();
    let began = Instant::now();
    let huge = stream_get(&format!("{}/live/huge?len={HUGE}", proxy.url()), rss).await;
    let took = began.elapsed();
    let after = rss();
    println!(
        "500 MB through a bypass route in {took:?} ({:.0} MB/s): server RSS {before} KiB before, \
         {} KiB at peak, {after} KiB after",
        HUGE as f64 / 1e6 / took.as_secs_f64(),
        huge.peak_rss_kib
    );
    assert_eq!(huge.status, 200);
    assert_eq!(huge.x_cache, "BYPASS");
    assert_eq!(huge.len, HUGE, "every byte arrived");
    assert!(huge.intact, "every byte is where the pattern puts it");
    assert!(
        huge.peak_rss_kib.saturating_sub(before) < GROWTH_LIMIT_KIB,
        "the server grew by {} KiB streaming {HUGE} bytes",
        huge.peak_rss_kib.saturating_sub(before)
    );

    // Just over max_body on a cached route: served whole to its client, not stored.
    let over = MAX_BODY + 1;
    let url = format!("{}/over?len={over}", proxy.url());
    let first = stream_get(&url, rss).await;
    assert_eq!(
        (first.status, first.len, first.intact),
        (StatusCode::OK, over, true)
    );
    // Its own fetch, told apart from a shared answer: it was never the store's to give.
    assert_eq!(first.x_cache, "PASS");
    let second = stream_get(&url, rss).await;
    assert_eq!(
        (second.status, second.len, second.intact),
        (StatusCode::OK, over, true)
    );
    assert_eq!(
        second.x_cache, "PASS",
        "an answer over max_body is not stored"
    );
    assert_eq!(
        upstream.hits.load(Ordering::SeqCst),
        4,
        "warm, huge, and two over max_body"
    );

    // Far over max_body on a cached route: at most max_body is held, the rest streams.
    let before = rss();
    let far = stream_get(&format!("{}/far?len={FAR_OVER}", proxy.url()), rss).await;
    println!(
        "100 MB over an 8 MiB max_body on a cached route: server RSS {before} KiB before, {} KiB \
         at peak, {} KiB after",
        far.peak_rss_kib,
        rss()
    );
    assert_eq!(
        (far.status, far.len, far.intact),
        (StatusCode::OK, FAR_OVER, true)
    );
    assert!(
        far.peak_rss_kib.saturating_sub(before) < GROWTH_LIMIT_KIB,
        "the server grew by {} KiB streaming {FAR_OVER} bytes past an 8 MiB max_body",
        far.peak_rss_kib.saturating_sub(before)
    );
    drop(replicas);
    drop((redis, nats));
}
