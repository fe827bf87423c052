//! Range requests answered from the cache (RFC 9110 section 14): the whole answer is fetched once,
//! coalesced across replicas like any GET, and every client's ranges are cut from it: a `206`,
//! a `multipart/byteranges` `206`, or a `416`. `If-Range` sends the ranges only while its
//! validator matches strongly; an answer too large to store asks the upstream for the ranges.

use crate::support;

use bytes::Bytes;
use http::Method;
use support::eventually;
use support::http::{Reply, send_all};
use support::proxy::{ProxyCluster, fill};
use support::upstream::{Upstream, pattern};

/// `{{backing}}` and `{{upstream}}` are filled by [`config`].
const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0, token: secret }
namespace: range
{{backing}}
defaults: { ttl: 60s, wait_timeout: 10s, lease_ttl: 5s, poll_interval: 1s, pass_ttl: 60s }
routes:
  - name: big
    match: { path_prefix: /big }
    upstream: {{upstream}}
    max_body: 4KiB
  - name: all
    match: { path_prefix: / }
    upstream: {{upstream}}
"#;

const REDIS_NATS: &str = r#"store: { kind: redis, url: "{{redis}}" }
bus: { kind: nats, url: "{{nats}}" }"#;

/// Long before any `Date` the upstream sends: a strong validator.
const LAST_MODIFIED: &str = "Wed, 01 Jan 2020 10:00:00 GMT";

/// The length of every answer under `/doc`.
const LEN: usize = 1000;

fn config(upstream: &Upstream, backing: &str) -> String {
    fill(
        CONFIG,
        &[("backing", backing), ("upstream", &upstream.url())],
    )
}

/// An upstream whose `/doc` answers are [`LEN`] bytes of [`pattern`] with validators, whose
/// `/missing` is a `404`, and whose `/big` answers are 64 KiB, ranged like a file server's.
async fn upstream() -> Upstream {
    Upstream::start()
        .await
        .body_size("/doc", LEN)
        .header("/doc", "etag", "\"v1\"")
        .header("/doc", "last-modified", LAST_MODIFIED)
        .header("/doc", "content-type", "application/octet-stream")
        .status("/missing", 404)
        .body_size("/big", 64 << 10)
        .serves_ranges("/big")
}

/// Three replicas on a fresh Redis store and NATS bus.
async fn three_replicas(upstream: &Upstream) -> ProxyCluster {
    ProxyCluster::with_redis_nats(3, &config(upstream, REDIS_NATS)).await
}

/// One replica on the in-memory store and bus.
async fn one_replica(upstream: &Upstream) -> ProxyCluster {
    ProxyCluster::on_memory(1, &config(upstream, "store: { kind: memory }")).await
}

/// A GET of `path` with `Range: range` to replica `i`.
async fn ranged(proxy: &ProxyCluster, i: usize, path: &str, range: &str) -> Reply {
    proxy.get(i, path).header("range", range).send().await
}

/// A `206` of bytes `first..=last` of a [`LEN`]-byte [`pattern`].
fn assert_part(reply: &Reply, first: usize, last: usize) {
    assert_eq!(reply.status, 206, "{:?} {:?}", reply.headers, reply.text());
    let content_range = format!("bytes {first}-{last}/{LEN}");
    assert_eq!(reply.header("content-range"), Some(content_range.as_str()));
    assert_eq!(
        reply.header("content-length"),
        Some((last + 1 - first).to_string().as_str())
    );
    assert_eq!(reply.body, pattern(LEN).slice(first..=last));
    assert_eq!(reply.header("accept-ranges"), Some("bytes"));
    assert_eq!(reply.header("etag"), Some("\"v1\""));
}

fn assert_whole(reply: &Reply) {
    assert_eq!(reply.status, 200, "{:?}", reply.headers);
    assert_eq!(reply.body, pattern(LEN));
    assert!(reply.header("content-range").is_none());
}

/// The parts of a `multipart/byteranges` body: each part's headers (lowercased names) and bytes.
fn parts(reply: &Reply) -> Vec<(Vec<(String, String)>, Bytes)> {
    let content_type = reply.header("content-type").expect("a content type");
    let boundary = content_type
        .strip_prefix("multipart/byteranges; boundary=")
        .unwrap_or_else(|| panic!("not multipart/byteranges: {content_type}"));
    let delimiter = format!("--{boundary}");
    let body = &reply.body[..];
    let close = format!("{delimiter}--\r\n");
    assert!(body.ends_with(close.as_bytes()), "no closing delimiter");
    let mut parts = Vec::new();
    let mut rest = body
        .strip_prefix(delimiter.as_bytes())
        .expect("a first delimiter");
    while let Some(after) = rest.strip_prefix(b"\r\n") {
        let end_of_head = find(after, b"\r\n\r\n").expect("part headers end");
        let head = std::str::from_utf8(&after[..end_of_head]).expect("UTF-8 part headers");
        let headers = head
            .split("\r\n")
            .map(|line| {
                let (name, value) = line.split_once(':').expect("name: value");
                (name.to_ascii_lowercase(), value.trim().to_owned())
            })
            .collect();
        let data = &after[end_of_head + 4..];
        let next = format!("\r\n{delimiter}");
        let end_of_data = find(data, next.as_bytes()).expect("a delimiter after the data");
        parts.push((headers, Bytes::copy_from_slice(&data[..end_of_data])));
        rest = &data[end_of_data + next.len()..];
    }
    assert_eq!(rest, b"--\r\n", "the close delimiter ends the body");
    parts
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

async fn metric(proxy: &ProxyCluster, i: usize, series: &str) -> f64 {
    let text = proxy.admin(i, Method::GET, "/metrics").send().await.text();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |value| value.trim().parse().expect("a number"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_range_is_cut_from_one_whole_fetch_on_a_miss_and_from_the_entry_on_hits() {
    let upstream = upstream().await;
    let proxy = three_replicas(&upstream).await;
    let path = "/doc/one";

    let miss = ranged(&proxy, 0, path, "bytes=100-199").await;
    assert_part(&miss, 100, 199);
    assert_eq!(miss.x_cache(), "MISS");
    assert_eq!(
        miss.header("content-type"),
        Some("application/octet-stream")
    );

    let suffix = ranged(&proxy, 1, path, "bytes=-10").await;
    assert_part(&suffix, 990, 999);
    assert_eq!(suffix.x_cache(), "HIT");
    let open = ranged(&proxy, 2, path, "bytes=900-").await;
    assert_part(&open, 900, 999);
    assert_eq!(open.x_cache(), "HIT");
    let clamped = ranged(&proxy, 2, path, "bytes=995-5000").await;
    assert_part(&clamped, 995, 999);
    let whole = proxy.get(1, path).send().await;
    assert_whole(&whole);
    assert_eq!(whole.header("accept-ranges"), Some("bytes"));

    let fetches = upstream.requests_for(path);
    assert_eq!(fetches.len(), 1, "one whole fetch for every range");
    assert_eq!(
        fetches[0].header("range"),
        None,
        "the shared fetch asked a range"
    );
    assert_eq!(fetches[0].header("if-range"), None);
    // A ranged hit is a hit to the metrics too.
    let hits = metric(
        &proxy,
        1,
        "corral_requests_total{outcome=\"hit\",route=\"all\"}",
    )
    .await;
    assert_eq!(hits, 2.0, "replica 1 answered two hits, one of them ranged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_different_ranges_over_three_replicas_is_one_upstream_fetch() {
    let upstream = upstream().await;
    let hold = upstream.hold("/doc");
    let proxy = three_replicas(&upstream).await;
    let path = "/doc/burst";
    let n = 30;

    let calls: Vec<_> = (0..n)
        .map(|i| {
            let range = format!("bytes={}-{}", i * 10, i * 10 + 4 + i);
            proxy.get(i % 3, path).header("range", &range)
        })
        .collect();
    let burst = tokio::spawn(send_all(calls));
    upstream.wait_for_hits(path, 1).await;
    // Everyone but the first request on each replica follows a flight it did not start.
    eventually("the whole burst waits on the one fetch", || async {
        let mut waiting = 0.0;
        for i in 0..3 {
            waiting += metric(&proxy, i, "corral_followers_waiting").await;
        }
        waiting == (n - 3) as f64
    })
    .await;
    hold.release();

    let replies = burst.await.expect("the burst");
    for (i, reply) in replies.iter().enumerate() {
        assert_part(reply, i * 10, i * 10 + 4 + i);
        assert!(
            matches!(reply.x_cache(), "MISS" | "COALESCED"),
            "request {i}: {}",
            reply.x_cache()
        );
    }
    assert_eq!(upstream.hits(path), 1, "one fetch for the whole burst");
    assert_eq!(upstream.requests_for(path)[0].header("range"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_ranges_out_of_order_are_one_multipart_answer_with_the_parts_as_asked() {
    let upstream = upstream().await;
    let proxy = one_replica(&upstream).await;
    let path = "/doc/multi";

    // 20-29 and 25-39 overlap, 40-49 touches them: one part, where 20-29 was asked.
    let reply = ranged(&proxy, 0, path, "bytes=900-909, 20-29,-5, 25-39,40-49").await;
    assert_eq!(reply.status, 206, "{:?}", reply.headers);
    assert_eq!(reply.x_cache(), "MISS");
    assert!(reply.header("content-range").is_none());
    assert_eq!(
        reply.header("content-length"),
        Some(reply.body.len().to_string().as_str())
    );
    let parts = parts(&reply);
    let whole = pattern(LEN);
    let expected = [(900, 909), (20, 49), (995, 999)];
    assert_eq!(parts.len(), expected.len(), "{parts:?}");
    for ((headers, data), (first, last)) in parts.iter().zip(expected) {
        let content_range = format!("bytes {first}-{last}/{LEN}");
        assert_eq!(
            headers,
            &[
                ("content-type".into(), "application/octet-stream".into()),
                ("content-range".into(), content_range),
            ]
        );
        assert_eq!(data, &whole.slice(first..=last));
    }
    // From the entry, the same.
    let hit = ranged(&proxy, 0, path, "bytes=0-0,2-2").await;
    assert_eq!(hit.x_cache(), "HIT");
    let parts = self::parts(&hit);
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[1].1, whole.slice(2..3));
    assert_eq!(upstream.hits(path), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_range_within_the_answer_is_416_and_a_range_corral_cannot_read_is_ignored() {
    let upstream = upstream().await;
    let proxy = one_replica(&upstream).await;
    let path = "/doc/edges";

    for range in ["bytes=1000-", "bytes=5000-6000", "bytes=-0"] {
        let reply = ranged(&proxy, 0, path, range).await;
        assert_eq!(reply.status, 416, "{range}: {:?}", reply.headers);
        assert_eq!(
            reply.header("content-range"),
            Some("bytes */1000"),
            "{range}"
        );
        assert!(reply.body.is_empty());
        assert!(matches!(reply.x_cache(), "MISS" | "HIT"), "{range}");
    }
    let many: Vec<String> = (0..40).map(|i| format!("{}-{}", i * 3, i * 3)).collect();
    let too_many = format!("bytes={}", many.join(","));
    for range in ["bytes=10-5", "lines=1-2", "bytes=a-", too_many.as_str()] {
        let reply = ranged(&proxy, 0, path, range).await;
        assert_whole(&reply);
        assert_eq!(reply.x_cache(), "HIT", "{range}");
    }
    assert_eq!(upstream.hits(path), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_range_sends_the_range_only_while_its_validator_matches_strongly() {
    let upstream = upstream().await;
    let proxy = one_replica(&upstream).await;
    let path = "/doc/if-range";
    assert_whole(&proxy.get(0, path).send().await);

    let with = |if_range: &str| {
        proxy
            .get(0, path)
            .header("range", "bytes=0-9")
            .header("if-range", if_range)
            .send()
    };
    assert_part(&with("\"v1\"").await, 0, 9);
    assert_part(&with(LAST_MODIFIED).await, 0, 9);
    for changed in [
        "\"v2\"",
        "W/\"v1\"",
        "Thu, 02 Jan 2020 10:00:00 GMT",
        "not a validator",
    ] {
        let reply = with(changed).await;
        assert_whole(&reply);
        assert_eq!(reply.x_cache(), "HIT", "{changed}");
    }
    assert_eq!(upstream.hits(path), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preconditions_win_over_ranges_and_head_and_a_cached_404_ignore_them() {
    let upstream = upstream().await;
    let proxy = one_replica(&upstream).await;
    let path = "/doc/order";
    assert_whole(&proxy.get(0, path).send().await);

    let call = |name: &str, value: &str| {
        proxy
            .get(0, path)
            .header("range", "bytes=0-9")
            .header(name, value)
    };
    let not_modified = call("if-none-match", "\"v1\"").send().await;
    assert_eq!(not_modified.status, 304);
    assert!(not_modified.header("content-range").is_none());
    let failed = call("if-match", "\"v2\"").send().await;
    assert_eq!(failed.status, 412);
    assert_part(&call("if-match", "\"v1\"").send().await, 0, 9);

    let head = proxy
        .call(0, Method::HEAD, path)
        .header("range", "bytes=0-9")
        .send()
        .await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("1000"));
    assert_eq!(head.header("accept-ranges"), Some("bytes"));
    assert!(head.body.is_empty());

    let missing = ranged(&proxy, 0, "/missing/page", "bytes=0-3").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.text(), "upstream body for /missing/page");
    let again = ranged(&proxy, 0, "/missing/page", "bytes=0-3").await;
    assert_eq!((again.status.as_u16(), again.x_cache()), (404, "HIT"));
    assert!(again.header("accept-ranges").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_of_an_answer_over_max_body_is_asked_of_the_upstream_and_its_206_goes_through() {
    let upstream = upstream().await;
    let proxy = one_replica(&upstream).await;
    let path = "/big/file";
    let whole = pattern(64 << 10);

    // The shared fetch finds it too large to store; the range is then asked of the upstream.
    let first = ranged(&proxy, 0, path, "bytes=100-199").await;
    assert_eq!(first.status, 206, "{:?}", first.headers);
    assert_eq!(first.header("content-range"), Some("bytes 100-199/65536"));
    assert_eq!(first.body, whole.slice(100..200));
    assert_eq!(first.x_cache(), "PASS");
    assert!(
        first.cache_status().ends_with("detail=too-large"),
        "{}",
        first.cache_status()
    );

    // Past the pass marker, a client's own fetch carries its range, and the upstream's 206 (over
    // max_body itself here) streams through.
    let rest = ranged(&proxy, 0, path, "bytes=1000-").await;
    assert_eq!(rest.status, 206);
    assert_eq!(rest.header("content-range"), Some("bytes 1000-65535/65536"));
    assert_eq!(rest.body, whole.slice(1000..));
    assert_eq!(rest.x_cache(), "PASS");

    let asked: Vec<Option<String>> = upstream
        .requests_for(path)
        .iter()
        .map(|r| r.header("range").map(str::to_owned))
        .collect();
    assert_eq!(
        asked,
        [
            None,
            Some("bytes=100-199".to_owned()),
            Some("bytes=1000-".to_owned())
        ],
        "the whole answer once, then each client's range"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bypassed_range_request_carries_its_range_and_gets_the_upstreams_206() {
    let upstream = upstream().await;
    let proxy = one_replica(&upstream).await;
    let path = "/big/private";

    let reply = proxy
        .get(0, path)
        .header("authorization", "Bearer token")
        .header("range", "bytes=10-19")
        .send()
        .await;
    assert_eq!(reply.status, 206, "{:?}", reply.headers);
    assert_eq!(reply.x_cache(), "BYPASS");
    assert_eq!(reply.header("content-range"), Some("bytes 10-19/65536"));
    assert_eq!(reply.body, pattern(64 << 10).slice(10..20));
    let sent = upstream.requests_for(path);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].header("range"), Some("bytes=10-19"));
}
