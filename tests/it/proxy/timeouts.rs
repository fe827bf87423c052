//! A route's upstream timeouts: a TLS handshake that never completes meets `connect_timeout`, an
//! origin that accepts and never answers meets `response_header_timeout`, one that stalls in the
//! middle of a body meets `read_timeout`. Each is
//! a 504 naming the timeout in `Cache-Status`, counted in `corral_upstream_errors_total` and
//! logged.

use crate::support;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::tls::serve;
use support::http::Http;
use support::process::metric_sum;

/// An origin that accepts connections and writes `head` on each (nothing, or a response head with
/// the first bytes of a longer body), then holds the connection open, silent, until dropped.
struct Stalling {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Stalling {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Stalling {
    async fn start(head: &'static [u8]) -> Stalling {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            // Each connection is kept (not read, not closed) until the origin is dropped.
            while let Ok((mut tcp, _)) = listener.accept().await {
                // The request head first: an answer before it is one hyper refuses.
                let mut read = Vec::new();
                let mut buffer = [0u8; 1024];
                for _ in 0..64 {
                    match tcp.read(&mut buffer).await {
                        Ok(n) if n > 0 => read.extend_from_slice(&buffer[..n]),
                        _ => break,
                    }
                    if read.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let _ = tcp.write_all(head).await;
                held.push(tcp);
            }
        });
        Stalling { port, task }
    }
}

async fn stalled(head: &'static [u8], route: &str, timeout: &str, detail: &str) {
    stalled_on("http", head, route, timeout, detail).await;
}

/// A request through a route to a [`Stalling`] origin on `scheme`: answered 504 naming
/// `timeout`, counted once and logged.
async fn stalled_on(scheme: &str, head: &'static [u8], route: &str, timeout: &str, detail: &str) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let origin = Stalling::start(head).await;
    let upstream = format!("{scheme}://127.0.0.1:{}", origin.port);
    let proxy = serve(dir.path(), &upstream, route, &[]).await;

    let (done, finished) = oneshot::channel();
    let url = format!("{}/slow", proxy.url());
    tokio::spawn(async move {
        let _ = done.send(Http::new().get(url).send().await);
    });
    // The test client's patience bounds the wait; max_fetch (30s) would answer with another detail.
    let reply = finished.await.expect("an answer");
    assert_eq!(reply.status, 504, "{}", proxy.output());
    let wanted = format!("detail={detail}");
    assert!(
        reply.cache_status().contains(&wanted),
        "{}",
        reply.cache_status()
    );
    assert!(reply.text().contains(timeout), "{}", reply.text());
    let metrics = proxy.metrics().await;
    let reason = format!("reason=\"{timeout}\"");
    let counted = metric_sum(
        &metrics,
        "corral_upstream_errors_total",
        &["route=\"origin\"", &reason],
    );
    assert_eq!(counted, 1.0, "{metrics}");
    let log = proxy.output();
    assert!(
        log.lines()
            .any(|l| l.contains("upstream request failed") && l.contains(timeout)),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_that_never_answers_meets_the_response_header_timeout() {
    stalled(
        b"",
        "    max_fetch: 20s\n    response_header_timeout: 300ms\n",
        "response_header_timeout",
        "response-header-timeout",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_that_stalls_mid_body_meets_the_read_timeout() {
    stalled(
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nthe first few bytes",
        "    max_fetch: 20s\n    read_timeout: 300ms\n",
        "read_timeout",
        "read-timeout",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_handshake_that_never_completes_meets_the_connect_timeout() {
    // The origin takes the TCP connection and never answers the ClientHello.
    stalled_on(
        "https",
        b"",
        "    max_fetch: 20s\n    connect_timeout: 300ms\n    response_header_timeout: 10s\n",
        "connect_timeout",
        "connect-timeout",
    )
    .await;
}
