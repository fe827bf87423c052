//! Faults: first the fault proxy itself, in front of a real Redis; then three replicas on a real
//! Redis store and NATS bus while the store misbehaves, and under a thundering herd.
//!
//! What the store-fault tests hold the code to: a store that does not answer costs a request at
//! most the store's call deadline (two attempts of one response timeout) before its flight
//! degrades to a fetch for its own replica's callers (`X-Cache: MISS`, `Cache-Status` detail
//! `store-unavailable`); no request waits past `wait_timeout`; the store's recovery needs no
//! restart.

mod support;

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use support::TestRedis;
use support::fault::{Fault, FaultProxy};
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

// --------------------------------------------------------------- the fault proxy ----

#[tokio::test]
async fn by_default_the_fault_proxy_passes_traffic_both_ways() {
    let redis = TestRedis::start().await;
    let proxy = FaultProxy::start(redis_addr(&redis)).await;
    let mut stream = connect(&proxy).await;
    for _ in 0..3 {
        assert_eq!(ping(&mut stream, PROMPT).await, pong());
    }
    assert_eq!(proxy.fault(), Fault::Pass);
}

#[tokio::test]
async fn latency_delays_every_chunk_in_each_direction() {
    let redis = TestRedis::start().await;
    let proxy = FaultProxy::start(redis_addr(&redis)).await;
    let mut stream = connect(&proxy).await;
    assert_eq!(ping(&mut stream, PROMPT).await, pong());
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
    let redis = TestRedis::start().await;
    let proxy = FaultProxy::start(redis_addr(&redis)).await;
    let mut old = connect(&proxy).await;
    assert_eq!(ping(&mut old, PROMPT).await, pong());

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
    let redis = TestRedis::start().await;
    let proxy = FaultProxy::start(redis_addr(&redis)).await;
    let mut old = connect(&proxy).await;
    assert_eq!(ping(&mut old, PROMPT).await, pong());

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
    let redis = TestRedis::start().await;
    let proxy = FaultProxy::start(redis_addr(&redis)).await;
    let mut old = connect(&proxy).await;
    assert_eq!(ping(&mut old, PROMPT).await, pong());

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
    let redis = TestRedis::start().await;
    let proxy = FaultProxy::start(redis_addr(&redis)).await;
    let addr = proxy.addr();
    let mut old = connect(&proxy).await;
    assert_eq!(ping(&mut old, PROMPT).await, pong());
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
