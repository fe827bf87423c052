//! HEAD from the GET's entry (RFC 9110 section 9.3.2): a HEAD is keyed and fetched as a GET, so
//! it is answered from the entry GETs use, with the GET's headers and `Content-Length` and no
//! body, and a HEAD on a miss fills that entry, coalesced with concurrent GETs.

use crate::support;

use http::Method;
use std::time::Duration;
use support::http::{Reply, send_all};
use support::proxy::{ProxyCluster, fill};
use support::upstream::Upstream;

const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0, token: secret }
namespace: head
store: { kind: memory }
defaults: { ttl: 60s, wait_timeout: 10s, lease_ttl: 5s, poll_interval: 1s }
routes:
  - name: all
    match: { path_prefix: / }
    upstream: {{upstream}}
"#;

/// The body the test upstream answers for `path`.
fn body_of(path: &str) -> String {
    format!("upstream body for {path}")
}

async fn start(upstream: &Upstream, replicas: usize) -> ProxyCluster {
    ProxyCluster::on_memory(replicas, &fill(CONFIG, &[("upstream", &upstream.url())])).await
}

/// A bodiless answer whose `Content-Length` is the GET body's.
fn assert_head_of(reply: &Reply, path: &str) {
    assert_eq!(reply.status, 200, "{:?}", reply.headers);
    assert_eq!(reply.text(), "", "a HEAD answer carried a body");
    let length = body_of(path).len().to_string();
    assert_eq!(reply.header("content-length"), Some(length.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_after_a_get_is_answered_from_the_gets_entry() {
    let upstream = Upstream::start().await;
    let proxy = start(&upstream, 1).await;
    let path = "/doc/after-get";

    let get = proxy.get(0, path).send().await;
    assert_eq!(get.x_cache(), "MISS");
    let head = proxy.call(0, Method::HEAD, path).send().await;

    assert_head_of(&head, path);
    assert_eq!(head.x_cache(), "HIT");
    assert_eq!(upstream.hits(path), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_on_a_miss_fetches_with_get_and_fills_the_entry_gets_use() {
    let upstream = Upstream::start().await;
    let proxy = start(&upstream, 1).await;
    let path = "/doc/head-first";

    let head = proxy.call(0, Method::HEAD, path).send().await;
    assert_head_of(&head, path);
    assert_eq!(head.x_cache(), "MISS");
    let get = proxy.get(0, path).send().await;

    assert_eq!(get.x_cache(), "HIT");
    assert_eq!(get.text(), body_of(path));
    let methods: Vec<Method> = upstream
        .requests_for(path)
        .into_iter()
        .map(|r| r.method)
        .collect();
    assert_eq!(methods, [Method::GET], "the upstream saw one GET");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn heads_and_gets_of_one_key_on_three_replicas_share_one_fetch() {
    let upstream = Upstream::start()
        .await
        .slow("/doc", Duration::from_millis(300));
    let proxy = start(&upstream, 3).await;
    let path = "/doc/burst";

    let calls = (0..30).map(|i| {
        let method = if i % 2 == 0 {
            Method::HEAD
        } else {
            Method::GET
        };
        proxy.call(i % 3, method, path)
    });
    let replies = send_all(calls).await;

    assert_eq!(upstream.hits(path), 1);
    for (i, reply) in replies.iter().enumerate() {
        if i % 2 == 0 {
            assert_head_of(reply, path);
        } else {
            assert_eq!(reply.status, 200);
            assert_eq!(reply.text(), body_of(path));
        }
    }
}
