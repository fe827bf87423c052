//! A client's broken request framing is the client's fault: answered 400, and never counted
//! against the upstream (whose error counter feeds the upstream-errors alert).

use crate::support;

use std::net::SocketAddr;

use http::Method;
use support::proxy::{ProxyCluster, fill};
use support::raw::exchange;
use support::upstream::Upstream;

const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0 }
namespace: framing
store: { kind: memory }
routes:
  - name: upload
    match: { path_prefix: /upload, methods: [POST] }
    upstream: {{upstream}}
    cache: false
  - name: search
    match: { path: /search, methods: [POST] }
    upstream: {{upstream}}
    key: { body: true }
"#;

/// One sample from replica 0's `/metrics` (0 when absent).
async fn metric(proxy: &ProxyCluster, series: &str) -> f64 {
    let text = proxy.admin(0, Method::GET, "/metrics").send().await.text();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |value| value.trim().parse().expect("a number"))
}

/// A chunked body whose second chunk size is not hexadecimal.
fn broken_chunked(path: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nhost: test\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n\
         5\r\nhello\r\nzz\r\nworld\r\n0\r\n\r\n"
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_chunked_framing_is_a_400_and_not_an_upstream_error() {
    let upstream = Upstream::start().await;
    let proxy = ProxyCluster::on_memory(1, &fill(CONFIG, &[("upstream", &upstream.url())])).await;
    let addr: SocketAddr = proxy.url(0)["http://".len()..].parse().expect("ip:port");
    let upstream_errors = |route: &'static str| {
        format!("corral_upstream_requests_total{{route=\"{route}\",status_class=\"error\"}}")
    };

    // On a pass-through, the body streams to the upstream as it arrives: the break is found
    // mid-way, after the request went out.
    let answer = exchange(addr, &broken_chunked("/upload/a")).await;
    assert_eq!(answer.status(), Some(400), "{}", answer.text);
    assert!(
        answer.text.contains("request body broke off"),
        "{}",
        answer.text
    );
    assert_eq!(metric(&proxy, &upstream_errors("upload")).await, 0.0);

    // On a body-keyed route the body is read whole before anything is sent.
    let answer = exchange(addr, &broken_chunked("/search")).await;
    assert_eq!(answer.status(), Some(400), "{}", answer.text);
    assert_eq!(metric(&proxy, &upstream_errors("search")).await, 0.0);
    assert_eq!(upstream.hits("/search"), 0);

    assert_eq!(
        metric(
            &proxy,
            "corral_client_errors_total{reason=\"request_body\"}"
        )
        .await,
        2.0
    );
    // A whole body still goes through.
    let reply = proxy
        .call(0, Method::POST, "/upload/b")
        .body("hello world")
        .send()
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(upstream.requests_for("/upload/b")[0].body, "hello world");
}
