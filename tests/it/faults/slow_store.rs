//! Faults: first the fault proxy itself, in front of a real Redis; then three replicas on a real
//! Redis store and NATS bus while the store is slow, and under a thundering herd.
//!
//! A store that does not answer at all (frozen, held, partitioned, killed) is the subject of
//! `tests/degrade.rs`: the breaker, the degrade modes and recovery.

use crate::support;

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use http::Method;
use support::fault::{Fault, FaultProxy};
use support::http::{Reply, send_all};
use support::proxy::{ProxyCluster, fill};
use support::upstream::Upstream;
use support::{TestNats, TestRedis, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

const MS: Duration = Duration::from_millis(1);

/// How long a test waits for something that should not happen (an answer through a black hole).
const SILENCE: Duration = Duration::from_millis(300);

/// Longest wait for something that should happen at once on loopback.
const PROMPT: Duration = Duration::from_secs(5);

fn redis_addr(redis: &TestRedis) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], redis.port()))
}

/// A raw connection through `proxy`, speaking RESP by hand so the test sees every byte.
async fn connect(proxy: &FaultProxy) -> TcpStream {
    timeout(PROMPT, TcpStream::connect(proxy.addr()))
        .await
        .expect("connect in time")
        .expect("connect to the fault proxy")
}

/// Sends `PING` and reads up to `+PONG\r\n` (7 bytes) or the end of the stream, within `within`.
/// `Ok(bytes)` with what arrived; `Err(kind)` for a transport error; `None` on silence.
async fn ping(stream: &mut TcpStream, within: Duration) -> Option<Result<Vec<u8>, ErrorKind>> {
    if let Err(error) = stream.write_all(b"PING\r\n").await {
        return Some(Err(error.kind()));
    }
    read_reply(stream, within).await
}

/// Reads up to 7 bytes or the end of the stream, within `within`.
async fn read_reply(
    stream: &mut TcpStream,
    within: Duration,
) -> Option<Result<Vec<u8>, ErrorKind>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    let read = async {
        // At most 7 reads: each brings at least one byte or ends the loop.
        for _ in 0..7 {
            match stream.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if got.len() >= 7 {
                        break;
                    }
                }
                Err(error) => return Err(error.kind()),
            }
        }
        Ok(())
    };
    match timeout(within, read).await {
        Err(_) => None,
        Ok(Err(kind)) => Some(Err(kind)),
        Ok(Ok(())) => Some(Ok(got)),
    }
}

fn pong() -> Option<Result<Vec<u8>, ErrorKind>> {
    Some(Ok(b"+PONG\r\n".to_vec()))
}

/// A Redis, a fault proxy in front of it, and a connection through the proxy that has answered
/// one PING.
async fn linked() -> (TestRedis, FaultProxy, TcpStream) {
    let redis = TestRedis::start().await;
    let proxy = FaultProxy::start(redis_addr(&redis)).await;
    let mut stream = connect(&proxy).await;
    assert_eq!(ping(&mut stream, PROMPT).await, pong());
    (redis, proxy, stream)
}

// --------------------------------------------------------------- the fault proxy ----

#[tokio::test]
async fn by_default_the_fault_proxy_passes_traffic_both_ways() {
    let (_redis, proxy, mut stream) = linked().await;
    for _ in 0..3 {
        assert_eq!(ping(&mut stream, PROMPT).await, pong());
    }
    assert_eq!(proxy.fault(), Fault::Pass);
}

#[tokio::test]
async fn latency_delays_every_chunk_in_each_direction() {
    let (_redis, proxy, mut stream) = linked().await;
    proxy.set(Fault::Latency(150 * MS));
    let started = Instant::now();
    assert_eq!(ping(&mut stream, PROMPT).await, pong());
    let took = started.elapsed();
    // One chunk each way, each held 150 ms: the added latency is the fault's doing, not speed.
    assert!(
        took >= 300 * MS,
        "a PING took {took:?}, less than 2 x 150 ms"
    );
}

#[tokio::test]
async fn a_black_hole_keeps_connections_open_and_silent_until_restored() {
    let (_redis, proxy, mut old) = linked().await;

    proxy.set(Fault::BlackHole);
    assert_eq!(
        ping(&mut old, SILENCE).await,
        None,
        "an open connection answered"
    );
    let mut new = connect(&proxy).await;
    assert_eq!(
        ping(&mut new, SILENCE).await,
        None,
        "a new connection answered"
    );

    // The held requests go through once the hole closes; nothing was lost or doubled.
    proxy.restore();
    assert_eq!(read_reply(&mut old, PROMPT).await, pong());
    assert_eq!(read_reply(&mut new, PROMPT).await, pong());
    assert_eq!(ping(&mut old, PROMPT).await, pong());
}

#[tokio::test]
async fn a_cut_closes_open_connections_and_new_ones_until_restored() {
    let (_redis, proxy, mut old) = linked().await;

    proxy.cut();
    let closed = read_reply(&mut old, PROMPT).await;
    assert_eq!(
        closed,
        Some(Ok(vec![])),
        "the open connection was not closed"
    );
    let mut new = connect(&proxy).await;
    let refused = ping(&mut new, PROMPT).await;
    assert!(
        matches!(&refused, Some(Ok(bytes)) if bytes.is_empty()) || matches!(refused, Some(Err(_))),
        "a new connection during the cut was not closed: {refused:?}"
    );

    proxy.restore();
    let mut after = connect(&proxy).await;
    assert_eq!(ping(&mut after, PROMPT).await, pong());
}

#[tokio::test]
async fn a_reset_sends_an_rst_on_open_and_new_connections() {
    let (_redis, proxy, mut old) = linked().await;

    proxy.set(Fault::Reset);
    assert_eq!(
        read_reply(&mut old, PROMPT).await,
        Some(Err(ErrorKind::ConnectionReset))
    );
    let mut new = connect(&proxy).await;
    // The RST may arrive before or after the PING is written; either way the read sees it.
    let _ = new.write_all(b"PING\r\n").await;
    assert_eq!(
        read_reply(&mut new, PROMPT).await,
        Some(Err(ErrorKind::ConnectionReset))
    );
}

#[tokio::test]
async fn close_after_n_bytes_ends_a_connection_after_exactly_n_bytes() {
    let redis = TestRedis::start().await;
    let proxy = FaultProxy::start(redis_addr(&redis)).await;
    proxy.set(Fault::CloseAfter(10));
    let mut stream = connect(&proxy).await;
    // 6 bytes up ("PING\r\n"), so 4 of the 7 down ("+PONG\r\n"), then the end of the stream.
    assert_eq!(ping(&mut stream, PROMPT).await, Some(Ok(b"+PON".to_vec())));
    assert_eq!(read_reply(&mut stream, PROMPT).await, Some(Ok(vec![])));
}

#[tokio::test]
async fn dropping_the_fault_proxy_ends_its_connections_and_its_listener() {
    let (_redis, proxy, mut old) = linked().await;
    let addr = proxy.addr();
    drop(proxy);
    let ended = read_reply(&mut old, PROMPT).await;
    assert!(
        matches!(&ended, Some(Ok(bytes)) if bytes.is_empty()) || matches!(ended, Some(Err(_))),
        "a connection outlived the proxy: {ended:?}"
    );
    let refused = timeout(PROMPT, TcpStream::connect(addr)).await;
    assert!(
        matches!(refused, Ok(Err(_))),
        "the listener outlived the proxy"
    );
}

// ------------------------------------------------------------- three replicas ----

/// Three replicas' config: one route keyed on the whole query. `{{redis}}`, `{{nats}}` and
/// `{{upstream}}` are filled by [`Stack::start`]. The store's timeout is raised from its 50 ms
/// default: here a store 400 ms slow is slow, not down, and a thousand requests on two loaded
/// cores must not read as an outage.
const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0, token: secret }
namespace: faults
store: { kind: redis, url: "{{redis}}", timeout: 1s }
bus: { kind: nats, url: "{{nats}}" }
defaults: { ttl: 60s, wait_timeout: 5s, lease_ttl: 2s, poll_interval: 500ms, max_body: 1MiB, pass_ttl: 2s, max_fetch: 4s }
routes:
  - name: all
    match: { path_prefix: / }
    upstream: {{upstream}}
    key: { query: all }
"#;

/// `wait_timeout` of [`CONFIG`]: no request may be answered later than this (plus [`SLACK`]).
const WAIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Allowance past a deadline for the answer to travel back over loopback on a loaded machine.
const SLACK: Duration = Duration::from_secs(1);

/// Three replicas whose Redis is reached through a fault proxy (`link`), with NATS as the bus.
struct Stack {
    // Declared first so the replicas stop before the servers they use.
    cluster: ProxyCluster,
    link: FaultProxy,
    _redis: TestRedis,
    _nats: TestNats,
    upstream: Upstream,
}

impl Stack {
    async fn start(upstream: Upstream) -> Stack {
        let (redis, nats) = tokio::join!(TestRedis::start(), TestNats::start());
        let link = FaultProxy::start(redis_addr(&redis)).await;
        let yaml = fill(
            CONFIG,
            &[
                ("redis", &format!("redis://{}/", link.addr())),
                ("nats", &nats.url()),
                ("upstream", &upstream.url()),
            ],
        );
        let cluster = ProxyCluster::start(3, &yaml, None).await;
        Stack {
            cluster,
            link,
            _redis: redis,
            _nats: nats,
            upstream,
        }
    }

    /// One request per replica for a throwaway key, so every replica's store connection is open
    /// and its scripts are loaded before a fault starts.
    async fn warm(&self) {
        for i in 0..self.cluster.len() {
            let reply = self
                .cluster
                .get(i, &format!("/warm?replica={i}"))
                .send()
                .await;
            assert_eq!(reply.status, 200, "warming replica {i}: {:?}", reply.text());
        }
    }
}

/// How many answers carried each (status, `X-Cache`, `Cache-Status` detail).
fn tally(replies: &[Reply]) -> BTreeMap<String, usize> {
    let mut tally = BTreeMap::new();
    for reply in replies {
        let detail = reply
            .cache_status()
            .split(';')
            .find_map(|part| part.trim().strip_prefix("detail="))
            .unwrap_or("-")
            .to_string();
        let what = format!("{} {} {detail}", reply.status.as_u16(), reply.x_cache());
        *tally.entry(what).or_insert(0) += 1;
    }
    tally
}

fn slowest(replies: &[Reply]) -> Duration {
    replies.iter().map(|r| r.took).max().unwrap_or_default()
}

/// A slow store (200 ms added each way to every store call, well inside the call deadline) is
/// slow, not down: the burst still makes one fetch per key across the replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_still_coalesces_a_burst_into_one_fetch_per_key() {
    let upstream = Upstream::start().await.slow("/", 100 * MS);
    let stack = Stack::start(upstream).await;
    stack.warm().await;
    stack.link.set(Fault::Latency(200 * MS));
    let keys = ["/slow?k=1", "/slow?k=2"];
    let replies = send_all(keys.iter().flat_map(|key| stack.cluster.spread(30, key))).await;
    println!(
        "slow store: burst answered {:?}, slowest {:?}",
        tally(&replies),
        slowest(&replies)
    );
    for (i, reply) in replies.iter().enumerate() {
        assert_eq!(reply.status, 200, "request {i}: {:?}", reply.text());
        assert!(
            !reply.cache_status().contains("store-unavailable"),
            "request {i} degraded although the store answers: {:?}",
            reply.cache_status()
        );
        assert!(
            reply.took <= WAIT_TIMEOUT + SLACK,
            "request {i} was answered after {:?}",
            reply.took
        );
    }
    for key in keys {
        assert_eq!(
            stack.upstream.hits(key),
            1,
            "{key}: one fetch across the replicas"
        );
    }
}

/// A gauge without labels from a `/metrics` text, 0 when absent.
fn gauge(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Fault test 1: a thousand concurrent requests for one key over three replicas cost one
/// upstream fetch; how long the requests take to be answered once the fetch returns is printed
/// (a measurement, not an assertion).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests_on_one_key_make_one_upstream_fetch() {
    const REQUESTS: usize = 1000;
    let upstream = Upstream::start().await;
    let stack = Stack::start(upstream).await;
    stack.warm().await;
    let key = "/herd?k=1";
    let hold = stack.upstream.hold("/herd");

    let tasks: Vec<_> = stack
        .cluster
        .spread(REQUESTS, key)
        .into_iter()
        .map(|call| {
            tokio::spawn(async move {
                let reply = call.send().await;
                (reply, Instant::now())
            })
        })
        .collect();
    // Everyone has joined: one flight per replica, and every other request waits on one.
    stack.upstream.wait_for_hits(key, 1).await;
    let joined = (REQUESTS - stack.cluster.len()) as f64;
    eventually("every request has joined a flight", || async {
        let mut waiting = 0.0;
        for i in 0..stack.cluster.len() {
            let text = stack
                .cluster
                .admin(i, Method::GET, "/metrics")
                .send()
                .await
                .text();
            waiting += gauge(&text, "corral_followers_waiting");
        }
        waiting >= joined
    })
    .await;

    let released = Instant::now();
    hold.release();
    let mut after = Vec::with_capacity(REQUESTS);
    let mut replies = Vec::with_capacity(REQUESTS);
    for task in tasks {
        let (reply, done) = task.await.expect("a request task");
        after.push(done - released);
        replies.push(reply);
    }
    println!("herd answered {:?}", tally(&replies));
    for (i, reply) in replies.iter().enumerate() {
        assert_eq!(reply.status, 200, "request {i}: {:?}", reply.text());
    }
    assert_eq!(
        stack.upstream.hits(key),
        1,
        "one upstream fetch for {REQUESTS} requests"
    );

    after.sort();
    let at = |q: f64| after[((after.len() - 1) as f64 * q).round() as usize];
    println!(
        "wake-up after the fetch returned, {REQUESTS} requests over 3 replicas: \
         min {:?}, p50 {:?}, p99 {:?}, max {:?}",
        at(0.0),
        at(0.50),
        at(0.99),
        at(1.0)
    );
}
