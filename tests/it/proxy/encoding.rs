//! Content encoding owned by corral, end to end (three replicas on a real Redis store and NATS
//! bus, and once on the NATS key-value store): `Vary: Accept-Encoding` neither passes nor splits
//! an answer, the upstream is asked for corral's codings, one representation set is stored, and
//! every client gets a body it accepts.

use crate::support;

use std::io::Read;
use std::time::Duration;

use http::Method;
use support::http::{Reply, send_all};
use support::process::metric_sum;
use support::proxy::{ProxyCluster, fill};
use support::upstream::Upstream;

const MS: Duration = Duration::from_millis(1);

/// `{{store}}` is the Redis store with the NATS bus, or the NATS key-value store alone.
const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0, token: secret }
namespace: encoding
{{store}}
defaults: { ttl: 60s, wait_timeout: 5s, lease_ttl: 5s, poll_interval: 1s, pass_ttl: 2s }
routes:
  - name: api
    match: { path_prefix: /api }
    upstream: {{upstream}}
  - name: plain
    match: { path_prefix: / }
    upstream: {{upstream}}
    encoding: { accept: [], compress: { with: [] } }
"#;

const REDIS_NATS: &str = r#"store: { kind: redis, url: "{{redis}}" }
bus: { kind: nats, url: "{{nats}}" }"#;
const NATS_KV: &str = r#"store: { kind: nats, url: "{{nats}}" }"#;

async fn three_replicas(upstream: &Upstream, store: &str) -> ProxyCluster {
    let config = fill(CONFIG, &[("store", store), ("upstream", &upstream.url())]);
    ProxyCluster::with_redis_nats(3, &config).await
}

/// What corral asks every upstream for on a cacheable fetch, by default.
const ASKED: &str = "gzip, br;q=0.9, zstd;q=0.8";

/// A JSON document of about `len` bytes that compresses well, as API answers do.
fn json(len: usize) -> String {
    let mut out = String::from("[");
    let mut i = 0;
    while out.len() < len {
        out.push_str(&format!(
            "{{\"id\":{i},\"name\":\"item {i}\",\"tags\":[\"a\",\"b\"]}},"
        ));
        i += 1;
    }
    out.pop();
    out.push(']');
    out
}

fn gzip(body: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut encoder, body).unwrap();
    encoder.finish().unwrap()
}

/// The reply's body decoded by its `Content-Encoding`, as a client would.
fn decoded(reply: &Reply) -> Vec<u8> {
    let mut out = Vec::new();
    match reply.header("content-encoding") {
        None => out.extend_from_slice(&reply.body),
        Some("gzip") => {
            flate2::read::GzDecoder::new(&reply.body[..])
                .read_to_end(&mut out)
                .expect("a gzip body");
        }
        Some("br") => {
            brotli::Decompressor::new(&reply.body[..], 4096)
                .read_to_end(&mut out)
                .expect("a br body");
        }
        Some(other) => panic!("unexpected content-encoding {other}"),
    }
    out
}

fn varies_on_encoding(reply: &Reply) -> bool {
    reply
        .headers
        .get_all("vary")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|name| name.trim().eq_ignore_ascii_case("accept-encoding"))
}

/// The sum of a metric over every replica's `/metrics`.
async fn metric_total(proxy: &ProxyCluster, name: &str, labels: &[&str]) -> f64 {
    let mut total = 0.0;
    for i in 0..proxy.len() {
        let reply = proxy.admin(i, Method::GET, "/metrics").send().await;
        assert_eq!(reply.status, 200, "GET /metrics on replica {i}");
        total += metric_sum(&reply.text(), name, labels);
    }
    total
}

/// Browsers' `Accept-Encoding` strings, and what each must get of a gzip-stored answer.
const CLIENTS: [(Option<&str>, Option<&str>); 6] = [
    (Some("gzip, deflate, br, zstd"), Some("gzip")),
    (Some("gzip, deflate, br"), Some("gzip")),
    (Some("br;q=1.0, gzip;q=0.8, *;q=0.1"), Some("gzip")),
    (Some("identity"), None),
    (Some("gzip;q=1.0, identity;q=0"), Some("gzip")),
    (None, None),
];

#[tokio::test]
async fn a_burst_with_every_accept_encoding_costs_one_fetch_of_an_upstream_gzip_answer() {
    let document = json(8 << 10);
    let upstream = Upstream::start()
        .await
        .body("/api/items", gzip(document.as_bytes()))
        .header("/api/items", "content-encoding", "gzip")
        .header("/api/items", "content-type", "application/json")
        .header("/api/items", "vary", "Accept-Encoding")
        .header("/api/items", "etag", "\"items-1\"")
        .slow("/api/items", 200 * MS);
    let proxy = three_replicas(&upstream, REDIS_NATS).await;

    let calls = (0..300).map(|i| {
        let call = proxy.get(i % 3, "/api/items");
        match CLIENTS[i % CLIENTS.len()].0 {
            Some(accept) => call.header("accept-encoding", accept),
            None => call,
        }
    });
    let replies = send_all(calls).await;
    assert_eq!(upstream.hits("/api/items"), 1, "one fetch for the burst");
    let asked = &upstream.requests_for("/api/items")[0];
    assert_eq!(asked.header("accept-encoding"), Some(ASKED), "corral's own");

    for (i, reply) in replies.iter().enumerate() {
        let (accept, encoding) = CLIENTS[i % CLIENTS.len()];
        assert_eq!(
            reply.status,
            200,
            "request {i} ({accept:?}): {}",
            reply.text()
        );
        assert_ne!(reply.x_cache(), "PASS", "{}", reply.cache_status());
        assert_eq!(
            reply.header("content-encoding"),
            encoding,
            "request {i} ({accept:?})"
        );
        assert_eq!(
            decoded(reply),
            document.as_bytes(),
            "request {i} ({accept:?})"
        );
        assert!(
            varies_on_encoding(reply),
            "request {i}: {:?}",
            reply.headers
        );
        // Decoded bytes are not the ones the upstream's tag names: weak.
        let etag = if encoding.is_some() {
            "\"items-1\""
        } else {
            "W/\"items-1\""
        };
        assert_eq!(reply.header("etag"), Some(etag), "request {i} ({accept:?})");
    }

    // A client that refuses identity and every stored coding is told so.
    let refused = proxy
        .get(1, "/api/items")
        .header("accept-encoding", "br, identity;q=0")
        .send()
        .await;
    assert_eq!(refused.status, 406, "{}", refused.text());
    // HEAD for an identity client: no length it could not keep, no body.
    let head = proxy.call(2, Method::HEAD, "/api/items").send().await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-encoding"), None);
    assert!(head.body.is_empty());
    assert_eq!(upstream.hits("/api/items"), 1);
    let decodes = metric_total(
        &proxy,
        "corral_decompressions_total",
        &["encoding=\"gzip\""],
    )
    .await;
    assert_eq!(
        decodes, 100.0,
        "one decode per identity client, none for HEAD"
    );
    proxy.stop().await;
}

/// An identity JSON answer of 20 KiB is compressed once when stored (br and gzip), and every
/// client on every replica then gets what it accepts from a hit.
async fn an_identity_answer_is_compressed_once_and_served_compressed_from_hits(store: &str) {
    let document = json(20 << 10);
    let upstream = Upstream::start()
        .await
        .body("/api/report", document.clone())
        .header("/api/report", "content-type", "application/json")
        .header("/api/report", "etag", "\"r1\"");
    let proxy = three_replicas(&upstream, store).await;

    let first = proxy
        .get(0, "/api/report")
        .header("accept-encoding", "gzip, deflate, br, zstd")
        .send()
        .await;
    assert_eq!((first.status.as_u16(), first.x_cache()), (200, "MISS"));
    assert_eq!(first.header("content-encoding"), Some("br"));
    assert_eq!(decoded(&first), document.as_bytes());

    for i in 0..3 {
        for (accept, encoding) in [
            (Some("gzip, deflate, br"), Some("br")),
            (Some("gzip"), Some("gzip")),
            (Some("br;q=0.5, gzip"), Some("gzip")),
            (Some("zstd"), None),
            (None, None),
        ] {
            let call = proxy.get(i, "/api/report");
            let call = match accept {
                Some(accept) => call.header("accept-encoding", accept),
                None => call,
            };
            let reply = call.send().await;
            assert_eq!(reply.status, 200);
            assert_eq!(reply.x_cache(), "HIT", "replica {i} ({accept:?})");
            assert_eq!(reply.header("content-encoding"), encoding, "{accept:?}");
            assert_eq!(decoded(&reply), document.as_bytes(), "{accept:?}");
            assert!(varies_on_encoding(&reply));
            let length: usize = reply.header("content-length").unwrap().parse().unwrap();
            assert_eq!(length, reply.body.len());
            match encoding {
                Some(_) => {
                    assert!(
                        reply.body.len() < document.len() / 4,
                        "{accept:?} compressed"
                    );
                    assert_eq!(reply.header("etag"), Some("W/\"r1\""));
                }
                None => assert_eq!(reply.header("etag"), Some("\"r1\""), "the upstream's bytes"),
            }
        }
    }
    assert_eq!(upstream.hits("/api/report"), 1);
    assert_eq!(
        upstream.requests_for("/api/report")[0].header("accept-encoding"),
        Some(ASKED)
    );
    // Compressed once per coding, on the replica that stored it; never on a hit.
    for coding in ["br", "gzip"] {
        let label = format!("encoding=\"{coding}\"");
        let made = metric_total(&proxy, "corral_compressions_total", &[&label]).await;
        assert_eq!(made, 1.0, "{coding} compressions");
    }
    let decodes = metric_total(&proxy, "corral_decompressions_total", &[]).await;
    assert_eq!(decodes, 0.0, "hits decode nothing");

    // A route that compresses nothing and asks for nothing forwards no Accept-Encoding.
    let plain = proxy
        .get(1, "/plain/report")
        .header("accept-encoding", "gzip")
        .send()
        .await;
    assert_eq!(plain.header("content-encoding"), None);
    assert_eq!(
        upstream.requests_for("/plain/report")[0].header("accept-encoding"),
        None
    );
    proxy.stop().await;
}

#[tokio::test]
async fn an_identity_answer_is_compressed_once_on_redis() {
    an_identity_answer_is_compressed_once_and_served_compressed_from_hits(REDIS_NATS).await;
}

#[tokio::test]
async fn an_identity_answer_is_compressed_once_on_the_nats_kv_store() {
    an_identity_answer_is_compressed_once_and_served_compressed_from_hits(NATS_KV).await;
}

#[tokio::test]
async fn small_or_binary_answers_are_stored_as_they_came() {
    let upstream = Upstream::start()
        .await
        .body("/api/tiny", "{\"ok\":true}")
        .header("/api/tiny", "content-type", "application/json")
        .body_size("/api/blob", 64 << 10)
        .header("/api/blob", "content-type", "application/octet-stream");
    let proxy = three_replicas(&upstream, REDIS_NATS).await;
    for path in ["/api/tiny", "/api/blob"] {
        for i in 0..2 {
            let reply = proxy
                .get(i, path)
                .header("accept-encoding", "gzip, br")
                .send()
                .await;
            assert_eq!(reply.status, 200);
            assert_eq!(reply.header("content-encoding"), None, "{path}");
        }
        assert_eq!(upstream.hits(path), 1);
    }
    let made = metric_total(&proxy, "corral_compressions_total", &[]).await;
    assert_eq!(made, 0.0);
    proxy.stop().await;
}

#[tokio::test]
async fn a_pass_through_answer_is_decoded_for_a_client_that_does_not_take_it() {
    let document = json(4 << 10);
    let upstream = Upstream::start()
        .await
        .body("/api/private", gzip(document.as_bytes()))
        .header("/api/private", "content-encoding", "gzip")
        .header("/api/private", "cache-control", "private");
    let proxy = three_replicas(&upstream, REDIS_NATS).await;
    let identity = proxy.get(0, "/api/private").send().await;
    assert_eq!(identity.x_cache(), "PASS", "{}", identity.cache_status());
    assert_eq!(identity.header("content-encoding"), None);
    assert_eq!(identity.body, document.as_bytes());
    let gzip_client = proxy
        .get(1, "/api/private")
        .header("accept-encoding", "gzip")
        .send()
        .await;
    assert_eq!(gzip_client.header("content-encoding"), Some("gzip"));
    assert_eq!(decoded(&gzip_client), document.as_bytes());
    proxy.stop().await;
}

#[tokio::test]
async fn a_decompression_bomb_is_cut_off_at_max_body() {
    // 4 MiB of zeros packs into a few KiB: past the route's 1 MiB once decoded.
    let bomb = gzip(&vec![0u8; 4 << 20]);
    let upstream = Upstream::start().await.body("/api/bomb", bomb).header(
        "/api/bomb",
        "content-encoding",
        "gzip",
    );
    let config = CONFIG.replace(
        "    match: { path_prefix: /api }\n",
        "    match: { path_prefix: /api }\n    max_body: 1MiB\n",
    );
    let config = fill(
        &config,
        &[("store", REDIS_NATS), ("upstream", &upstream.url())],
    );
    let proxy = ProxyCluster::with_redis_nats(1, &config).await;
    let stored = proxy
        .get(0, "/api/bomb")
        .header("accept-encoding", "gzip")
        .send()
        .await;
    assert_eq!(stored.header("content-encoding"), Some("gzip"));
    let identity = proxy.get(0, "/api/bomb").try_send().await;
    match identity {
        Err(error) => assert!(error.contains("body"), "{error}"),
        Ok(reply) => panic!("a decoded bomb came whole: {} bytes", reply.body.len()),
    }
    // The replica is fine and goes on serving.
    let again = proxy
        .get(0, "/api/bomb")
        .header("accept-encoding", "gzip")
        .send()
        .await;
    assert_eq!(again.x_cache(), "HIT");
    proxy.stop().await;
}

/// A `no-cache` answer compressed when stored is revalidated on every use; a `304` keeps its
/// stored representations: identity and gzip clients still get the document, decoded alike.
async fn a_compressed_entry_keeps_its_representations_through_a_304(store: &str) {
    let document = json(20 << 10);
    let upstream = Upstream::start()
        .await
        .body("/api/checked", document.clone())
        .header("/api/checked", "content-type", "application/json")
        .header("/api/checked", "etag", "\"c1\"")
        .header("/api/checked", "cache-control", "no-cache");
    let proxy = three_replicas(&upstream, store).await;
    let first = proxy.get(0, "/api/checked").send().await;
    assert_eq!((first.status.as_u16(), first.x_cache()), (200, "MISS"));
    assert_eq!(first.body, document.as_bytes());

    upstream.set_status("/api/checked", 304);
    for (i, accept) in [None, Some("gzip"), Some("br"), None]
        .into_iter()
        .enumerate()
    {
        let call = proxy.get(i % 3, "/api/checked");
        let call = match accept {
            Some(accept) => call.header("accept-encoding", accept),
            None => call,
        };
        let reply = call.send().await;
        assert_eq!(reply.status, 200, "{accept:?} {}", reply.cache_status());
        assert_eq!(reply.header("content-encoding"), accept, "{accept:?}");
        assert_eq!(decoded(&reply), document.as_bytes(), "{accept:?}");
    }
    let asked = upstream.requests_for("/api/checked");
    assert_eq!(asked.len(), 5, "one fill, then one revalidation per use");
    assert!(
        asked[1..]
            .iter()
            .all(|r| r.header("if-none-match") == Some("\"c1\""))
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_entry_keeps_its_representations_through_a_304_on_redis() {
    a_compressed_entry_keeps_its_representations_through_a_304(REDIS_NATS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_entry_keeps_its_representations_through_a_304_on_the_nats_kv_store() {
    a_compressed_entry_keeps_its_representations_through_a_304(NATS_KV).await;
}
