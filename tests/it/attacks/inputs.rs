//! Hostile inputs, each answered the safe way: cache poisoning through unkeyed headers, cache
//! deception, parameter cloaking, request smuggling, lying upstreams, forged store values and bus
//! events, and the admin API from the wrong side.
//!
//! Each test asserts what an attacker must not get (someone else's body, a poisoned entry, a
//! smuggled request reaching the upstream), not merely that nothing crashed.
//!
//! Covered elsewhere and not repeated here: answers with `Set-Cookie`, `private` or `no-store`
//! shared with nobody, 20 concurrent clients each getting their own body
//! (`proxy::answers_with_set_cookie_go_to_their_own_clients` and its siblings); `Authorization`
//! bypassing both ways (`proxy::a_request_with_authorization_bypasses_the_cache_both_ways`); a HEAD
//! fill never storing an empty body for GET (`proxy::a_get_after_a_head_gets_the_whole_body`);
//! headers named in `Connection` neither forwarded nor stored
//! (`proxy::hop_by_hop_headers_are_neither_forwarded_nor_stored`); admin token checks
//! (`proxy::admin_needs_the_bearer_token`).

use crate::support;

use std::collections::HashSet;
use std::net::SocketAddr;

use corral::bus::{Event, EventKind, nats_subject};
use corral::key::KeyHash;
use futures::StreamExt;
use http::Method;
use support::http::Reply;
use support::proxy::{ProxyCluster, fill};
use support::raw::{RawUpstream, Scripted, exchange};
use support::upstream::Upstream;
use support::{TestNats, TestRedis, eventually};

/// The admin token of [`CONFIG`].
const TOKEN: &str = "secret";

/// Routes for the attacks: static assets (the usual target of cache deception), one route keeping
/// a single query parameter, one matching and keying on the host, one keying a forwarding header,
/// and everything else keyed on the whole query.
const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0, token: secret }
namespace: atk
{{backing}}
defaults: { ttl: 60s, wait_timeout: 5s, lease_ttl: 5s, poll_interval: 1s, max_body: 1MiB, pass_ttl: 2s }
routes:
  - name: assets
    match: { path_regex: '\.(css|js)$' }
    upstream: {{upstream}}
  - name: filtered
    match: { path_prefix: /filtered }
    upstream: {{upstream}}
    key: { query: { include: [a] } }
  - name: hosted
    match: { host: example.com, path_prefix: /hosted }
    upstream: {{upstream}}
    key: { headers: [host] }
  - name: forwarded
    match: { path_prefix: /forwarded }
    upstream: {{upstream}}
    key: { headers: [x-forwarded-host] }
  - name: rest
    match: { path_prefix: / }
    upstream: {{upstream}}
    key: { query: all }
"#;

const REDIS_NATS: &str = r#"store: { kind: redis, url: "{{redis}}" }
bus: { kind: nats, url: "{{nats}}" }"#;

/// Two replicas on one in-process store: enough for everything that is not about Redis or NATS.
async fn on_memory(upstream: &str) -> ProxyCluster {
    let yaml = fill(
        CONFIG,
        &[
            ("backing", "store: { kind: memory }"),
            ("upstream", upstream),
        ],
    );
    ProxyCluster::on_memory(2, &yaml).await
}

/// Two replicas on a fresh Redis store and NATS bus.
async fn on_redis_nats(upstream: &str, redis: &TestRedis, nats: &TestNats) -> ProxyCluster {
    let yaml = fill(
        CONFIG,
        &[
            ("backing", REDIS_NATS),
            ("upstream", upstream),
            ("redis", &redis.url()),
            ("nats", &nats.url()),
        ],
    );
    ProxyCluster::start(2, &yaml, None).await
}

fn public_addr(proxy: &ProxyCluster, i: usize) -> SocketAddr {
    proxy
        .url(i)
        .trim_start_matches("http://")
        .parse()
        .expect("a socket address")
}

fn assert_not_shared(reply: &Reply, what: &str) {
    assert!(
        !matches!(reply.x_cache(), "HIT" | "COALESCED"),
        "{what}: got a shared answer (X-Cache {}): {:?}",
        reply.x_cache(),
        reply.text()
    );
}

/// The key digest `GET /admin/status` reports for a URL.
async fn key_of(proxy: &ProxyCluster, url: &str) -> KeyHash {
    let reply = proxy.status(0, TOKEN, url).await;
    assert_eq!(reply.status, 200, "status of {url}: {:?}", reply.text());
    let hex = reply.json()["key"].as_str().expect("a key").to_string();
    KeyHash::from_hex(&hex).expect("a hex digest")
}

/// The value of one sample (`name` with its labels, as exported) in a metrics text.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

/// One sample from replica `i`'s `/metrics` (0 when absent).
async fn metric(proxy: &ProxyCluster, i: usize, name: &str) -> f64 {
    let text = proxy.admin(i, Method::GET, "/metrics").send().await.text();
    sample(&text, name)
}

// ------------------------------------------------------------ unkeyed headers ----

/// Headers that make some upstreams build links, pick a scheme, rewrite the path or change the
/// method. None is in the `rest` route's key, so none may reach the upstream of a cached request.
const POISONS: [(&str, &str); 8] = [
    ("x-forwarded-host", "evil.example"),
    ("x-forwarded-proto", "javascript"),
    ("x-forwarded-port", "1337"),
    ("x-original-url", "/admin"),
    ("x-rewrite-url", "/admin"),
    ("x-http-method-override", "DELETE"),
    ("x-host", "evil.example"),
    ("forwarded", "host=evil.example;proto=https"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unkeyed_poisoning_headers_never_reach_the_upstream_nor_a_later_client() {
    let upstream = Upstream::start().await.distinct_bodies("/");
    let proxy = on_memory(&upstream.url()).await;
    let url = "/page?id=1";

    let mut poisoned = proxy.get(0, url);
    for (name, value) in POISONS {
        poisoned = poisoned.header(name, value);
    }
    let poisoned = poisoned.send().await;
    assert_eq!(poisoned.status, 200);
    let sent = upstream.requests_for(url);
    assert_eq!(sent.len(), 1);
    for (name, value) in POISONS {
        let seen: Vec<_> = sent[0].headers.get_all(name).iter().collect();
        assert!(
            seen.iter().all(|v| v.as_bytes() != value.as_bytes()),
            "{name}: {value} reached the upstream: {seen:?}"
        );
    }
    assert_eq!(
        sent[0].header("x-forwarded-proto"),
        Some("http"),
        "the scheme the upstream learns is the listener's, not the client's claim"
    );
    assert_eq!(sent[0].method, Method::GET);

    // The stored answer was made without the headers, so a plain client may have it.
    let plain = proxy.get(1, url).send().await;
    assert_eq!(plain.x_cache(), "HIT");
    assert_eq!(plain.body, poisoned.body);
    assert_eq!(upstream.hits(url), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarding_header_in_the_key_reaches_the_upstream_and_splits_the_key() {
    let upstream = Upstream::start().await.distinct_bodies("/");
    let proxy = on_memory(&upstream.url()).await;
    let url = "/forwarded/links";

    let poisoned = proxy
        .get(0, url)
        .header("x-forwarded-host", "evil.example")
        .send()
        .await;
    let plain = proxy.get(1, url).send().await;
    assert_eq!(plain.x_cache(), "MISS", "a plain request has its own key");
    assert_ne!(plain.body, poisoned.body);
    let sent = upstream.requests_for(url);
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].header("x-forwarded-host"), Some("evil.example"));
    assert_eq!(sent[1].header("x-forwarded-host"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_rejecting_an_oversized_header_is_not_stored_for_others() {
    // An upstream that refuses request heads over 4 KiB, like many do with 400 or 431.
    let upstream = RawUpstream::start(|request| {
        let body = format!("fine: {}", request.target());
        let bytes = if request.head.len() > 4096 {
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 8\r\n\r\ntoo big!"
                .to_vec()
        } else {
            format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        };
        Scripted {
            bytes,
            close: false,
        }
    })
    .await;
    let proxy = on_memory(&upstream.url()).await;
    let big = "x".repeat(6000);

    // Unkeyed: not forwarded on a cached route, so the upstream answers normally.
    let url = "/big?unkeyed";
    let reply = proxy.get(0, url).header("x-junk", &big).send().await;
    assert_eq!(reply.status, 200, "{:?}", reply.text());
    assert!(upstream.requests()[0].head.len() < 4096);

    // Keyed (x-forwarded-host on the `forwarded` route): forwarded, refused, and never stored.
    let url = "/forwarded/big";
    for i in 0..2 {
        let refused = proxy
            .get(i, url)
            .header("x-forwarded-host", &big)
            .send()
            .await;
        assert_eq!(refused.status, 431);
        assert_not_shared(&refused, "a refused request");
    }
    assert_eq!(upstream.hits(url), 2, "the 431 was not stored");
    let plain = proxy.get(0, url).send().await;
    assert_eq!(plain.status, 200);
    assert_eq!(plain.text(), format!("fine: {url}"));

    // Bypassed (a cookie): everything is forwarded, nothing is stored.
    let url = "/big?bypassed";
    let refused = proxy
        .get(1, url)
        .header("cookie", "s=1")
        .header("x-junk", &big)
        .send()
        .await;
    assert_eq!(refused.status, 431);
    let plain = proxy.get(0, url).send().await;
    assert_eq!(plain.status, 200);
    assert_eq!(plain.x_cache(), "MISS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_body_is_neither_forwarded_nor_stored() {
    let upstream = Upstream::start().await.distinct_bodies("/");
    let proxy = on_memory(&upstream.url()).await;
    let url = "/fat?q=1";

    let fat = proxy.get(0, url).body("q=2&poison=1").send().await;
    assert_eq!(fat.status, 200);
    assert_eq!(fat.x_cache(), "BYPASS");
    let sent = upstream.requests_for(url);
    assert!(sent[0].body.is_empty(), "the body reached the upstream");
    assert_eq!(sent[0].header("content-length"), None);
    assert_eq!(sent[0].header("transfer-encoding"), None);

    let plain = proxy.get(1, url).send().await;
    assert_eq!(plain.x_cache(), "MISS", "the fat GET stored nothing");
    assert_ne!(plain.body, fat.body);
}

// ------------------------------------------------------------------- queries ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_gets_exactly_the_query_the_key_kept() {
    let upstream = Upstream::start().await.distinct_bodies("/");
    let proxy = on_memory(&upstream.url()).await;

    // `filtered` keeps only `a`: the rest never reaches the upstream.
    let reply = proxy.get(0, "/filtered?utm=x&a=1&b=2").send().await;
    assert_eq!(reply.status, 200);
    assert_eq!(upstream.hits("/filtered?a=1"), 1);
    let same = proxy.get(1, "/filtered?a=1&utm=y").send().await;
    assert_eq!(same.x_cache(), "HIT");

    // Cloaking with `;` (some upstreams split on it too): a segment holding `;` is kept whole and
    // forwarded as it came, so what the upstream reads is what the key holds.
    for cloaked in [
        "/filtered?a=1;a=2",
        "/filtered?utm=x;a=2",
        "/filtered?a=1&utm=x;a=2",
    ] {
        let reply = proxy.get(0, cloaked).send().await;
        assert_eq!(reply.x_cache(), "MISS", "{cloaked} has a key of its own");
        assert_ne!(reply.body, same.body, "{cloaked} got the plain a=1 answer");
    }
    let seen: Vec<String> = upstream.requests().iter().map(|r| r.uri.clone()).collect();
    assert_eq!(
        seen,
        [
            "/filtered?a=1",
            "/filtered?a=1;a=2",
            "/filtered?utm=x;a=2",
            "/filtered?a=1&utm=x;a=2"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_parameters_keep_their_order_while_distinct_names_may_move() {
    let upstream = Upstream::start().await.distinct_bodies("/");
    let proxy = on_memory(&upstream.url()).await;

    let first = proxy.get(0, "/list?a=1&a=2&b=3").send().await;
    let reordered = proxy.get(1, "/list?b=3&a=1&a=2").send().await;
    assert_eq!(reordered.x_cache(), "HIT", "only distinct names moved");
    assert_eq!(reordered.body, first.body);

    let swapped = proxy.get(0, "/list?a=2&a=1&b=3").send().await;
    assert_eq!(swapped.x_cache(), "MISS", "a=2&a=1 may mean something else");
    assert_ne!(swapped.body, first.body);
    // The upstream reads them in the key's order: names sorted, values of one name as sent.
    let seen: Vec<String> = upstream.requests().iter().map(|r| r.uri.clone()).collect();
    assert_eq!(seen, ["/list?a=1&a=2&b=3", "/list?a=2&a=1&b=3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_parts_cannot_run_into_each_other() {
    let upstream = Upstream::start().await;
    let proxy = on_memory(&upstream.url()).await;
    let urls = ["/a?b=c", "/ab?=c", "/a?bc", "/a%3Fb=c"];
    for round in 0..2 {
        for (i, url) in urls.iter().enumerate() {
            let reply = proxy.get(i % 2, url).send().await;
            assert_eq!(
                reply.text(),
                format!("upstream body for {url}"),
                "round {round}"
            );
        }
    }
    for url in urls {
        assert_eq!(upstream.hits(url), 1, "{url} was fetched once and then hit");
    }
}

// ------------------------------------------------------------ cache deception ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deceptive_paths_with_a_cookie_store_nothing_private() {
    let upstream = Upstream::start().await.distinct_bodies("/");
    let proxy = on_memory(&upstream.url()).await;
    let paths = [
        "/account/x.css",
        "/account;.css",
        "/account%23.css",
        "/account%3F.css",
        "/static/..%2faccount",
        "/static/..%2Faccount.js",
        "/static/../account.css",
    ];
    for path in paths {
        let private = proxy
            .get(0, path)
            .header("cookie", "session=alice")
            .send()
            .await;
        assert_eq!(private.status, 200, "{path}");
        assert_eq!(private.x_cache(), "BYPASS", "{path}");
        let anonymous = proxy.get(1, path).send().await;
        assert_not_shared(&anonymous, path);
        assert_ne!(
            anonymous.body, private.body,
            "{path}: alice's answer leaked"
        );
        // What the route matched on is exactly what the upstream was asked for.
        let sent = upstream.requests_for(path);
        assert_eq!(sent.len(), 2, "{path}: both went to the upstream as sent");
        assert_eq!(sent[0].header("cookie"), Some("session=alice"));
        assert_eq!(sent[1].header("cookie"), None);
    }
}

// --------------------------------------------------------------------- hosts ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_a_host_is_one_authority_for_route_key_and_upstream() {
    let upstream = Upstream::start().await.distinct_bodies("/");
    let proxy = on_memory(&upstream.url()).await;
    let addr = public_addr(&proxy, 0);
    let path = "/hosted/page";

    let first = proxy
        .get(0, path)
        .header("host", "example.com")
        .send()
        .await;
    assert_eq!(first.status, 200);
    assert_eq!(first.x_cache(), "MISS");
    for host in [
        "EXAMPLE.com",
        "example.com.",
        "Example.COM.:80",
        "example.com:80",
    ] {
        let reply = proxy.get(1, path).header("host", host).send().await;
        assert_eq!(reply.x_cache(), "HIT", "Host: {host}");
        assert_eq!(reply.body, first.body, "Host: {host}");
    }
    // Absolute form: the target's authority wins over the Host line (RFC 9112 section 3.2.2).
    let absolute = exchange(
        addr,
        b"GET http://EXAMPLE.com./hosted/page HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(absolute.status(), Some(200), "{}", absolute.text);
    assert!(absolute.text.contains("x-cache: HIT"), "{}", absolute.text);
    assert!(
        absolute
            .text
            .ends_with(&String::from_utf8_lossy(&first.body).into_owned())
    );

    // Another port is another authority: its own key, never the first one's answer.
    let other_port = proxy
        .get(0, path)
        .header("host", "example.com:8080")
        .send()
        .await;
    assert_eq!(other_port.x_cache(), "MISS");
    // Another host in the target does not reach the host-matched route at all.
    let other = exchange(
        addr,
        b"GET http://other.example/hosted/page HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        !other
            .text
            .ends_with(&String::from_utf8_lossy(&first.body).into_owned())
    );

    let hosts: Vec<String> = upstream
        .requests_for(path)
        .iter()
        .map(|r| r.header("host").unwrap_or("-").to_string())
        .collect();
    assert_eq!(hosts[..2], ["example.com", "example.com:8080"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ambiguous_host_is_refused() {
    let upstream = Upstream::start().await;
    let proxy = on_memory(&upstream.url()).await;
    let addr = public_addr(&proxy, 0);
    for request in [
        &b"GET /hosted/x HTTP/1.1\r\nHost: example.com\r\nHost: evil.example\r\nConnection: close\r\n\r\n"[..],
        b"GET /hosted/x HTTP/1.1\r\nHost: evil.example@example.com\r\nConnection: close\r\n\r\n",
        b"GET /hosted/x HTTP/1.1\r\nHost: example.com/x\r\nConnection: close\r\n\r\n",
    ] {
        let reply = exchange(addr, request).await;
        assert_eq!(reply.status(), Some(400), "{}", reply.text);
    }
    assert!(upstream.requests().is_empty());
}

// ------------------------------------------------------- partial and bodiless ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_answer_is_never_stored_as_the_whole() {
    let upstream = Upstream::start()
        .await
        .status("/range", 206)
        .header("/range", "content-range", "bytes 0-3/20")
        .body("/range", "part");
    let proxy = on_memory(&upstream.url()).await;

    let ranged = proxy
        .get(0, "/range/a")
        .header("range", "bytes=0-3")
        .send()
        .await;
    // The shared fetch asked for the whole answer; a 206 to it is passed on, never stored.
    assert_eq!(ranged.status, 206);
    assert_eq!(ranged.x_cache(), "PASS");
    // An upstream that answers 206 to a request without Range is not believed either.
    let unasked = proxy.get(1, "/range/b").send().await;
    assert_eq!(unasked.status, 206);
    assert_not_shared(&unasked, "a 206 to a plain GET");

    upstream.set("/range", |b| {
        b.status = http::StatusCode::OK;
        b.headers.clear();
        b.body = support::upstream::BodySpec::Fixed("the whole twenty byte".into());
    });
    for url in ["/range/a", "/range/b"] {
        let whole = proxy.get(0, url).send().await;
        assert_eq!(whole.status, 200, "{url}");
        assert_eq!(whole.text(), "the whole twenty byte", "{url}");
        assert_eq!(upstream.hits(url), 2, "{url}: the 206 was not stored");
    }
}

// ------------------------------------------------------------------ smuggling ----

/// Requests whose framing two parsers could read differently, each followed by a smuggled
/// request in the same bytes.
const AMBIGUOUS: [&str; 4] = [
    "GET /smuggle HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET /smuggle HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET /smuggle HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 44\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET /smuggle HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smuggled_request_never_reaches_the_upstream() {
    let upstream = Upstream::start().await;
    let proxy = on_memory(&upstream.url()).await;
    let addr = public_addr(&proxy, 0);
    for (i, request) in AMBIGUOUS.iter().enumerate() {
        let reply = exchange(addr, request.as_bytes()).await;
        assert!(reply.closed, "case {i}: the connection stayed open");
        assert!(
            reply.responses() <= 1,
            "case {i}: the smuggled request was answered:\n{}",
            reply.text
        );
        // Both lengths: read as chunked (an empty body), answered, then the connection closes.
        // Two lengths, or a last coding other than chunked: refused.
        let expected = if i < 2 { 200 } else { 400 };
        assert_eq!(reply.status(), Some(expected), "case {i}: {}", reply.text);
    }
    assert_eq!(upstream.hits_under("/smuggled"), 0);
    for sent in upstream.requests() {
        assert!(
            sent.body.is_empty(),
            "a smuggled body was forwarded: {sent:?}"
        );
    }
}

/// A response whose length and body disagree, or whose framing is ambiguous, and a second path
/// answered normally.
fn lying_upstream(lie: &'static [u8]) -> impl Fn(&support::raw::RawRequest) -> Scripted {
    move |request| {
        if request.target().starts_with("/lie") {
            Scripted {
                bytes: lie.to_vec(),
                // A body shorter than its length ends with the connection.
                close: lie.ends_with(b"short"),
            }
        } else {
            let body = format!("honest {}", request.target());
            Scripted {
                bytes: format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )
                .into_bytes(),
                close: false,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_answer_with_lying_framing_is_not_stored_nor_its_connection_reused() {
    let lies: [&'static [u8]; 3] = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort",
    ];
    for (i, lie) in lies.into_iter().enumerate() {
        let upstream = RawUpstream::start(lying_upstream(lie)).await;
        let proxy = on_memory(&upstream.url()).await;
        for round in 0..2 {
            // A cacheable request's answer is read whole first: the lie is a 502.
            let reply = proxy.get(0, "/lie").send().await;
            assert_eq!(
                reply.status,
                502,
                "case {i} round {round}: {:?}",
                reply.text()
            );
            assert_not_shared(&reply, "a lying answer");
            // A bypassed request streams: the client sees the body break, never a whole one.
            let streamed = proxy
                .get(1, "/lie")
                .header("cookie", "a=1")
                .try_send()
                .await;
            if let Ok(streamed) = &streamed {
                assert_eq!(streamed.status, 502, "case {i}: {:?}", streamed.text());
            }
        }
        assert_eq!(upstream.hits("/lie"), 4, "case {i}: nothing was stored");
        let honest = proxy.get(0, "/honest").send().await;
        assert_eq!(honest.text(), "honest /honest", "case {i}");
        let requests = upstream.requests();
        let honest_connection = requests.last().expect("the honest request").connection;
        let reused: HashSet<usize> = requests
            .iter()
            .filter(|r| r.target() == "/lie")
            .map(|r| r.connection)
            .collect();
        assert!(
            !reused.contains(&honest_connection),
            "case {i}: a connection that carried a lie was reused"
        );
        assert_eq!(reused.len(), 4, "case {i}: each lie on its own connection");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_after_an_upstream_body_never_answer_another_request() {
    let upstream = RawUpstream::start(lying_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\npoisoned",
    ))
    .await;
    let proxy = on_memory(&upstream.url()).await;
    let first = proxy.get(0, "/lie").send().await;
    assert_eq!(first.text(), "hello");
    for i in 0..3 {
        let next = proxy.get(0, &format!("/next/{i}")).send().await;
        assert_eq!(next.text(), format!("honest /next/{i}"));
    }
    let lie_connection = upstream.requests()[0].connection;
    assert!(
        upstream.requests()[1..]
            .iter()
            .all(|r| r.connection != lie_connection),
        "the connection with bytes left over was reused"
    );
}

// ----------------------------------------------------------- store and bus ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_subjects_are_hex_whatever_the_path_and_nothing_is_injected() {
    let (redis, nats) = tokio::join!(TestRedis::start(), TestNats::start());
    let upstream = Upstream::start().await;
    let proxy = on_redis_nats(&upstream.url(), &redis, &nats).await;
    let watcher = async_nats::connect(nats.url())
        .await
        .expect("connect to NATS");
    let mut subjects = watcher
        .subscribe(">")
        .await
        .expect("subscribe to everything");
    watcher.flush().await.expect("flush");

    let paths = [
        "/p/a.b",
        "/p/*",
        "/p/%3e",
        "/p/a%20b",
        "/p/x%0d%0aX-Injected:%20yes",
        "/p/%2e%2e/%00",
        "/p?q=a.b*%3E&r=%0d%0aX-Injected:%20yes",
    ];
    for path in paths {
        let reply = proxy.get(0, path).send().await;
        assert_eq!(reply.status, 200, "{path}");
        assert_eq!(reply.text(), format!("upstream body for {path}"));
    }
    for sent in upstream.requests() {
        assert!(
            sent.headers.get("x-injected").is_none(),
            "a header was injected: {sent:?}"
        );
    }

    let mut conn = redis.client().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .expect("KEYS");
    assert!(!keys.is_empty());
    let hex_key = regex::Regex::new(r"^atk:\{[0-9a-f]{64}\}:[a-z]$").unwrap();
    let route_key = regex::Regex::new(r"^atk:\{route:rest\}:[a-z:]+$").unwrap();
    for key in &keys {
        assert!(
            hex_key.is_match(key) || route_key.is_match(key),
            "a store key made of request bytes: {key:?}"
        );
    }

    let hex_subject = regex::Regex::new(r"^atk\.[a-z]+\.[0-9a-f]{64}$").unwrap();
    let mut seen = 0;
    // Every fill emitted one READY; reading exactly that many events bounds the loop.
    while seen < paths.len() {
        let message = tokio::time::timeout(support::patience(), subjects.next())
            .await
            .expect("an event within patience")
            .expect("the subscription is open");
        let subject = message.subject.as_str();
        if subject.starts_with("_INBOX")
            || subject.starts_with("$")
            || subject.starts_with("atk.bus.sync.")
        {
            continue;
        }
        assert!(
            hex_subject.is_match(subject),
            "a subject made of request bytes: {subject:?}"
        );
        seen += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_keys_value_under_this_key_is_a_miss_and_counted() {
    let (redis, nats) = tokio::join!(TestRedis::start(), TestNats::start());
    let upstream = Upstream::start().await.distinct_bodies("/");
    let proxy = on_redis_nats(&upstream.url(), &redis, &nats).await;
    let (victim, forged) = ("/collide/victim", "/collide/forged");

    let stored = proxy.get(0, forged).send().await;
    assert_eq!(stored.x_cache(), "MISS");
    // As a digest collision would: the other key's envelope, byte for byte, under this key.
    let (from, to) = (key_of(&proxy, forged).await, key_of(&proxy, victim).await);
    let mut conn = redis.client().await;
    let value: Vec<u8> = redis::cmd("GET")
        .arg(format!("atk:{{{from}}}:v"))
        .query_async(&mut conn)
        .await
        .expect("GET the stored value");
    let _: () = redis::cmd("SET")
        .arg(format!("atk:{{{to}}}:v"))
        .arg(value)
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .expect("SET the forged value");

    let reply = proxy.get(1, victim).send().await;
    assert_eq!(reply.status, 200);
    assert_ne!(reply.body, stored.body, "another key's answer was served");
    assert_eq!(reply.text(), format!("response 2 for {victim}"));
    assert_eq!(upstream.hits(victim), 1);
    let metrics = proxy.admin(1, Method::GET, "/metrics").send().await.text();
    let corrupt = sample(&metrics, "corral_corrupt_entries_total");
    assert!(
        corrupt >= 1.0,
        "the foreign value was not counted: {corrupt}"
    );
    // And it was replaced: the next read is the victim's own answer.
    let again = proxy.get(0, victim).send().await;
    assert_eq!(again.x_cache(), "HIT");
    assert_eq!(again.body, reply.body);
}

/// A fresh envelope answering `key` with `count` distinct one-byte headers, written by hand as
/// a foreign writer would (corral's own encoder refuses that many).
fn envelope_with_headers(key: &KeyHash, count: u16) -> Vec<u8> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after the epoch")
        .as_millis() as u64;
    let mut out = b"CRL".to_vec();
    out.extend_from_slice(&[corral::envelope::VERSION, 0]);
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(&200u16.to_be_bytes());
    // stored_at, ttl, stale, stale_if_error, fetch time
    for field in [now_ms, 60_000, 0, 0, 0] {
        out.extend_from_slice(&field.to_be_bytes());
    }
    out.extend_from_slice(&count.to_be_bytes());
    for i in 0..count {
        let name = format!("x-h-{i}");
        out.extend_from_slice(&(name.len() as u16).to_be_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&1u32.to_be_bytes());
        out.push(b'v');
    }
    out.extend_from_slice(&6u64.to_be_bytes());
    out.extend_from_slice(b"forged");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_value_with_more_headers_than_a_response_holds_is_a_miss_and_counted() {
    let (redis, nats) = tokio::join!(TestRedis::start(), TestNats::start());
    let upstream = Upstream::start().await.distinct_bodies("/");
    let proxy = on_redis_nats(&upstream.url(), &redis, &nats).await;
    let url = "/crowded";
    let key = key_of(&proxy, url).await;
    let mut conn = redis.client().await;
    let _: () = redis::cmd("SET")
        .arg(format!("atk:{{{key}}}:v"))
        .arg(envelope_with_headers(&key, 40_000))
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .expect("SET the crowded value");

    let reply = proxy.get(0, url).send().await;
    assert_eq!(reply.status, 200, "{:?}", reply.text());
    assert_eq!(reply.x_cache(), "MISS");
    assert_eq!(reply.text(), format!("response 1 for {url}"));
    assert_eq!(upstream.hits(url), 1);
    let corrupt = metric(&proxy, 0, "corral_corrupt_entries_total").await;
    assert!(
        corrupt >= 1.0,
        "the crowded value was not counted: {corrupt}"
    );
    // And it was replaced: the other replica reads the upstream's own answer.
    let again = proxy.get(1, url).send().await;
    assert_eq!(again.x_cache(), "HIT");
    assert_eq!(again.body, reply.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_events_without_a_value_never_end_a_wait_with_a_wrong_answer() {
    let (redis, nats) = tokio::join!(TestRedis::start(), TestNats::start());
    let upstream = Upstream::start().await.distinct_bodies("/forge");
    let hold = upstream.hold("/forge");
    let proxy = on_redis_nats(&upstream.url(), &redis, &nats).await;
    let url = "/forge/me";
    let key = key_of(&proxy, url).await;

    let leader = tokio::spawn(proxy.get(0, url).send());
    upstream.wait_for_hits(url, 1).await;
    let follower = tokio::spawn(proxy.get(1, url).send());
    eventually(
        "the request on replica 1 waits for the fetch on replica 0",
        || async { metric(&proxy, 1, "corral_flights_inflight").await >= 1.0 },
    )
    .await;
    let forger = async_nats::connect(nats.url())
        .await
        .expect("connect to NATS");
    // Every outcome that carries no value: each sends a follower back to the store, which still
    // holds the lease, so it waits on (a forged ABANDONED may even make it race for the lease,
    // which it cannot win while the holder lives).
    let forged = [
        ("ready", EventKind::Ready { inline: None }),
        ("abandoned", EventKind::Abandoned),
        ("deleted", EventKind::Deleted),
    ];
    for (kind, event) in forged {
        let sample = format!("corral_bus_events_total{{kind=\"{kind}\"}}");
        let before = metric(&proxy, 1, &sample).await;
        let bytes = Event::new(key, event).encode();
        for _ in 0..3 {
            forger
                .publish(nats_subject("atk", &key), bytes.clone())
                .await
                .expect("publish");
        }
        forger.flush().await.expect("flush");
        eventually(
            &format!("replica 1 receives the forged {kind} events"),
            || async { metric(&proxy, 1, &sample).await >= before + 3.0 },
        )
        .await;
        assert!(metric(&proxy, 1, "corral_flights_inflight").await >= 1.0);
        assert!(!follower.is_finished(), "a forged {kind} ended the wait");
    }
    assert_eq!(
        upstream.hits(url),
        1,
        "no forged event started a second fetch"
    );
    hold.release();
    let replies = [leader.await.unwrap(), follower.await.unwrap()];
    for reply in &replies {
        assert_eq!(reply.status, 200);
        assert_eq!(reply.text(), format!("response 1 for {url}"));
    }
    assert_eq!(
        upstream.hits(url),
        1,
        "the forged event started no second fetch"
    );
}

// -------------------------------------------------------------------- admin ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_naming_more_headers_than_a_request_carries_is_refused() {
    let upstream = Upstream::start().await;
    let proxy = on_memory(&upstream.url()).await;
    let purge = |headers: serde_json::Map<String, serde_json::Value>| {
        proxy
            .admin(0, Method::POST, "/admin/purge")
            .bearer(TOKEN)
            .json(&serde_json::json!({ "url": "/crowded", "method": "GET", "headers": headers }))
            .send()
    };
    let named = |count: usize, value: &str| {
        (0..count)
            .map(|i| (format!("x-h-{i}"), serde_json::Value::from(value)))
            .collect::<serde_json::Map<_, _>>()
    };

    let crowded = purge(named(40_000, "v")).await;
    assert_eq!(crowded.status, 400, "{:?}", crowded.text());
    assert!(
        crowded.text().contains("max_header_count"),
        "{:?}",
        crowded.text()
    );
    // The default limits: 100 headers, 16 KiB of them.
    let long = purge(named(2, &"v".repeat(10 << 10))).await;
    assert_eq!(long.status, 400, "{:?}", long.text());
    assert!(
        long.text().contains("max_header_bytes"),
        "{:?}",
        long.text()
    );
    let within = purge(named(100, "v")).await;
    assert_eq!(within.status, 200, "{:?}", within.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purging_from_the_public_listener_purges_nothing() {
    let upstream = Upstream::start().await;
    let proxy = on_memory(&upstream.url()).await;
    let url = "/kept?x=1";
    assert_eq!(proxy.get(0, url).send().await.x_cache(), "MISS");

    // The public listener has no admin API and no PURGE of its own: both are requests like any
    // other, and no route here takes those methods (routes take GET and HEAD by default), so both
    // are a 405 naming the methods the path takes.
    let purge = proxy
        .call(0, Method::from_bytes(b"PURGE").unwrap(), url)
        .send()
        .await;
    assert_eq!(purge.status, 405, "{:?}", purge.text());
    assert_eq!(purge.header("allow"), Some("GET, HEAD"));
    let api = proxy
        .call(1, Method::POST, "/admin/purge")
        .bearer(TOKEN)
        .json(&serde_json::json!({ "url": url, "method": "GET" }))
        .send()
        .await;
    assert_eq!(api.status, 405, "{:?}", api.text());
    let api_get = proxy
        .get(1, "/admin/status?url=%2Fkept%3Fx%3D1")
        .bearer(TOKEN)
        .send()
        .await;
    assert_eq!(
        api_get.text(),
        "upstream body for /admin/status?url=%2Fkept%3Fx%3D1",
        "a GET of an admin path is the upstream's"
    );

    assert_eq!(upstream.hits_under("/kept"), 1, "PURGE was not forwarded");
    for i in 0..2 {
        assert_eq!(
            proxy.get(i, url).send().await.x_cache(),
            "HIT",
            "replica {i}"
        );
    }
    // The admin listener still purges, with the token.
    let unauthorised = proxy
        .admin(0, Method::POST, "/admin/purge")
        .json(&serde_json::json!({ "url": url, "method": "GET" }))
        .send()
        .await;
    assert_eq!(unauthorised.status, 401);
    let wrong = proxy.purge(0, "not-the-secret", url).await;
    assert_eq!(wrong.status, 401);
    assert_eq!(proxy.get(1, url).send().await.x_cache(), "HIT");
    let right = proxy.purge(0, TOKEN, url).await;
    assert_eq!(right.status, 200, "{:?}", right.text());
    eventually("the purge reaches both replicas", || async {
        proxy.get(1, url).send().await.x_cache() == "MISS"
    })
    .await;
}
