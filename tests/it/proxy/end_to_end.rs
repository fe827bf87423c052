//! The proxy, end to end: a real upstream, three replicas on a real Redis store and NATS bus
//! (unless a test says otherwise), requests over real sockets.
//!
//! Time bounds are generous against what correct behaviour needs, and tight against what the
//! failure they guard against would cost (a serialised retry, a timer-woken follower); each says
//! which in its message.

use crate::support;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use http::Method;
use serde_json::json;
use support::http::{Http, Reply, send_all};
use support::process::{ConfigFrom, CorralServe};
use support::proxy::{ProxyCluster, fill};
use support::servers::free_port;
use support::upstream::{BodySpec, Upstream, pattern};
use support::{TestNats, TestRedis, eventually};
use tokio::time::Instant;

const MS: Duration = Duration::from_millis(1);

/// The admin token of [`CONFIG`].
const TOKEN: &str = "secret";

/// The contract's example config, plus a route keyed on one query parameter. `{{upstream}}`,
/// `{{defaults}}` and `{{backing}}` are filled by [`config`]; `{{redis}}` and `{{nats}}` by the
/// cluster that starts those servers.
const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0, token: secret }
namespace: t1
{{backing}}
defaults: { {{defaults}} }
routes:
  - name: reports
    match: { path_prefix: /reports }
    upstream: {{upstream}}
    key: { query: all }
  - name: filtered
    match: { path_prefix: /filtered }
    upstream: {{upstream}}
    key: { query: { include: [a] } }
  - name: search
    match: { path: /search, methods: [POST] }
    upstream: {{upstream}}
    key: { body: true }
  - name: rest
    match: { path_prefix: / }
    upstream: {{upstream}}
"#;

/// The contract's example defaults.
const DEFAULTS: &str =
    "ttl: 60s, wait_timeout: 5s, lease_ttl: 5s, poll_interval: 1s, max_body: 1MiB, pass_ttl: 2s";

const REDIS_NATS: &str = r#"store: { kind: redis, url: "{{redis}}" }
bus: { kind: nats, url: "{{nats}}" }"#;

const MEMORY: &str = "store: { kind: memory }";

/// [`CONFIG`] in front of `upstream` with these defaults, on Redis + NATS.
fn config(upstream: &str, defaults: &str) -> String {
    fill(
        CONFIG,
        &[
            ("backing", REDIS_NATS),
            ("defaults", defaults),
            ("upstream", upstream),
        ],
    )
}

/// Replaces `from` (which must be there) with `to`.
fn edited(yaml: &str, from: &str, to: &str) -> String {
    assert!(yaml.contains(from), "{from:?} is not in the config");
    yaml.replace(from, to)
}

/// Three replicas in front of `upstream` on a fresh Redis and NATS, with the example defaults.
async fn three_replicas(upstream: &Upstream) -> ProxyCluster {
    three_replicas_with(upstream, DEFAULTS).await
}

async fn three_replicas_with(upstream: &Upstream, defaults: &str) -> ProxyCluster {
    ProxyCluster::with_redis_nats(3, &config(&upstream.url(), defaults)).await
}

/// How many answers carried each `X-Cache` value.
fn tally(replies: &[Reply]) -> BTreeMap<String, usize> {
    let mut tally = BTreeMap::new();
    for reply in replies {
        *tally.entry(reply.x_cache().to_string()).or_insert(0) += 1;
    }
    tally
}

/// An answer that came out of the cache or another request's fetch: `HIT`, or `COALESCED` when
/// it arrived before the first fetch's commit was visible. Upstream counts pin the rest.
fn assert_shared(reply: &Reply, what: &str) {
    assert!(
        matches!(reply.x_cache(), "HIT" | "COALESCED"),
        "{what}: expected HIT or COALESCED, got X-Cache {:?} ({} {:?})",
        reply.x_cache(),
        reply.status,
        reply.text()
    );
}

fn assert_all_status(replies: &[Reply], status: u16) {
    for (i, reply) in replies.iter().enumerate() {
        assert_eq!(
            reply.status,
            status,
            "request {i}: {:?} (X-Cache {})",
            reply.text(),
            reply.x_cache()
        );
    }
}

fn slowest(replies: &[Reply]) -> Duration {
    replies.iter().map(|r| r.took).max().unwrap_or_default()
}

/// The `status` of `GET /admin/status` for a URL on replica `i`.
async fn status_of(proxy: &ProxyCluster, i: usize, url: &str) -> String {
    let reply = proxy.status(i, TOKEN, url).await;
    assert_eq!(reply.status, 200, "status of {url}: {:?}", reply.text());
    reply.json()["status"]
        .as_str()
        .unwrap_or_else(|| panic!("no \"status\" string in {:?}", reply.text()))
        .to_string()
}

/// Compares bodies without printing megabytes when they differ.
fn assert_same_bytes(actual: &[u8], expected: &[u8], what: &str) {
    if actual != expected {
        let first_difference = actual
            .iter()
            .zip(expected)
            .position(|(a, b)| a != b)
            .unwrap_or(actual.len().min(expected.len()));
        panic!(
            "{what}: {} bytes where {} were expected, first difference at byte {first_difference}",
            actual.len(),
            expected.len()
        );
    }
}

fn is_hex_digest(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

// ------------------------------------------------------------- coalescing ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_hundred_requests_over_three_replicas_reach_the_upstream_once() {
    let upstream = Upstream::start().await.slow("/reports", 500 * MS);
    let proxy = three_replicas(&upstream).await;

    let replies = send_all(proxy.spread(300, "/reports?day=1")).await;

    assert_eq!(upstream.hits("/reports?day=1"), 1);
    assert_all_status(&replies, 200);
    for reply in &replies {
        assert_eq!(reply.text(), "upstream body for /reports?day=1");
    }
    let tally = tally(&replies);
    assert_eq!(tally.get("MISS"), Some(&1), "exactly one MISS: {tally:?}");
    let shared = tally.get("COALESCED").unwrap_or(&0) + tally.get("HIT").unwrap_or(&0);
    assert_eq!(shared, 299, "the rest COALESCED or HIT: {tally:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_nats_alone_three_replicas_also_fetch_once() {
    let upstream = Upstream::start().await.slow("/reports", 300 * MS);
    let nats = TestNats::start().await;
    // Lease TTLs on the NATS KV store are whole seconds; the defaults here already are.
    let yaml = fill(
        CONFIG,
        &[
            (
                "backing",
                &format!("store: {{ kind: nats, url: \"{}\" }}", nats.url()),
            ),
            ("defaults", DEFAULTS),
            ("upstream", &upstream.url()),
        ],
    );
    let proxy = ProxyCluster::start(3, &yaml, None).await;

    let replies = send_all(proxy.spread(90, "/reports?day=3")).await;

    assert_eq!(upstream.hits("/reports?day=3"), 1);
    assert_all_status(&replies, 200);
    let tally = tally(&replies);
    assert_eq!(tally.get("MISS"), Some(&1), "exactly one MISS: {tally:?}");
    drop(proxy);
    drop(nats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_one_memory_store_three_replicas_also_fetch_once() {
    let upstream = Upstream::start().await.slow("/reports", 300 * MS);
    let yaml = fill(
        CONFIG,
        &[
            ("backing", MEMORY),
            ("defaults", DEFAULTS),
            ("upstream", &upstream.url()),
        ],
    );
    let proxy = ProxyCluster::on_memory(3, &yaml).await;

    let replies = send_all(proxy.spread(90, "/reports?day=2")).await;

    assert_eq!(upstream.hits("/reports?day=2"), 1);
    assert_all_status(&replies, 200);
    assert_eq!(
        tally(&replies).get("MISS"),
        Some(&1),
        "{:?}",
        tally(&replies)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn followers_are_woken_by_the_event_not_by_the_poll() {
    // With a 5 s poll and a 5 s lease, a follower that missed the event would answer after
    // about 5 s (or time out); woken by the event it answers right after the fetch.
    let upstream = Upstream::start().await.slow("/reports", 300 * MS);
    let proxy = three_replicas_with(
        &upstream,
        "ttl: 60s, wait_timeout: 8s, lease_ttl: 5s, poll_interval: 5s, max_body: 1MiB, pass_ttl: 2s",
    )
    .await;

    let replies = send_all(proxy.spread(30, "/reports?wake=1")).await;

    assert_eq!(upstream.hits("/reports?wake=1"), 1);
    assert_all_status(&replies, 200);
    let slowest = slowest(&replies);
    assert!(
        slowest < 1000 * MS,
        "the slowest of 30 answers took {slowest:?}; a 300 ms fetch plus an event takes far less, \
         a timer-woken follower about 5 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cache_status_names_corral_and_says_what_happened() {
    let upstream = Upstream::start().await.slow("/reports", 300 * MS);
    let proxy = three_replicas(&upstream).await;

    let replies = send_all(proxy.spread(3, "/reports?cs=1")).await;
    for reply in &replies {
        let cache_status = reply.cache_status();
        assert!(
            cache_status.starts_with("corral"),
            "Cache-Status names corral: {cache_status:?}"
        );
        match reply.x_cache() {
            "MISS" => {
                assert!(cache_status.contains("fwd=miss"), "{cache_status:?}");
                assert!(cache_status.contains("stored"), "{cache_status:?}");
            }
            "COALESCED" => assert!(cache_status.contains("collapsed"), "{cache_status:?}"),
            "HIT" => assert!(cache_status.contains("hit"), "{cache_status:?}"),
            other => panic!("unexpected X-Cache {other:?}"),
        }
    }

    let hit = proxy.get(1, "/reports?cs=1").send().await;
    assert_eq!(hit.x_cache(), "HIT");
    assert!(
        hit.cache_status().starts_with("corral"),
        "{:?}",
        hit.cache_status()
    );
    assert!(
        hit.cache_status().contains("hit"),
        "{:?}",
        hit.cache_status()
    );
    assert!(
        !hit.cache_status().contains("fwd="),
        "{:?}",
        hit.cache_status()
    );
    let age: u64 = hit
        .header("age")
        .expect("a cached answer carries Age")
        .parse()
        .expect("Age is whole seconds");
    assert!(age <= 60, "Age {age} within the 60 s ttl");
    assert_eq!(upstream.hits("/reports?cs=1"), 1);
}

// ----------------------------------------------------------------- keys ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn query_rules_decide_which_urls_share_a_key() {
    let upstream = Upstream::start().await;
    let proxy = three_replicas(&upstream).await;

    // `include: [a]`: only `a` counts, wherever it is and whatever else comes along.
    let first = proxy.get(0, "/filtered?a=1&utm=x").send().await;
    assert_eq!(first.x_cache(), "MISS");
    let same = proxy.get(1, "/filtered?utm=y&a=1").send().await;
    assert_shared(&same, "?utm=y&a=1 after ?a=1&utm=x");
    assert_eq!(same.body, first.body);
    assert_eq!(upstream.hits_under("/filtered"), 1);
    let other = proxy.get(2, "/filtered?a=2&utm=x").send().await;
    assert_eq!(other.x_cache(), "MISS", "a=2 is another key");
    assert_eq!(upstream.hits_under("/filtered"), 2);

    // `query: all`: every parameter counts, in any order.
    let first = proxy.get(0, "/reports?a=1&b=2").send().await;
    assert_eq!(first.x_cache(), "MISS");
    let same = proxy.get(1, "/reports?b=2&a=1").send().await;
    assert_shared(&same, "?b=2&a=1 after ?a=1&b=2");
    assert_eq!(same.body, first.body);
    assert_eq!(upstream.hits_under("/reports"), 1);
    let other_value = proxy.get(2, "/reports?a=1&b=3").send().await;
    assert_eq!(other_value.x_cache(), "MISS", "b=3 is another key");
    let fewer = proxy.get(0, "/reports?a=1").send().await;
    assert_eq!(fewer.x_cache(), "MISS", "without b is another key");
    assert_eq!(upstream.hits_under("/reports"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn post_bodies_are_the_key_on_a_search_route() {
    let upstream = Upstream::start()
        .await
        .slow("/search", 300 * MS)
        .distinct_bodies("/search");
    let proxy = three_replicas(&upstream).await;
    let query = json!({ "q": "corral", "page": 1 });

    let replies =
        send_all((0..30).map(|i| proxy.call(i % 3, Method::POST, "/search").json(&query))).await;

    assert_all_status(&replies, 200);
    assert_eq!(upstream.hits("/search"), 1, "one fetch for one body");
    let bodies: HashSet<_> = replies.iter().map(Reply::text).collect();
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    assert_eq!(
        tally(&replies).get("MISS"),
        Some(&1),
        "{:?}",
        tally(&replies)
    );
    let sent = upstream.requests_for("/search");
    assert_eq!(sent[0].method, Method::POST);
    assert_eq!(sent[0].body, serde_json::to_vec(&query).unwrap());

    let other_query = json!({ "q": "other", "page": 1 });
    let other = proxy
        .call(1, Method::POST, "/search")
        .json(&other_query)
        .send()
        .await;
    assert_eq!(other.x_cache(), "MISS", "another body is another key");
    assert_ne!(other.body, replies[0].body);
    assert_eq!(upstream.hits("/search"), 2);
    assert_eq!(
        upstream.requests_for("/search")[1].body,
        serde_json::to_vec(&other_query).unwrap()
    );

    let again = proxy
        .call(2, Method::POST, "/search")
        .json(&query)
        .send()
        .await;
    assert_shared(&again, "the first body again");
    assert_eq!(again.body, replies[0].body);
    assert_eq!(upstream.hits("/search"), 2);
}

// -------------------------------------------------------------- privacy ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_with_authorization_bypasses_the_cache_both_ways() {
    let upstream = Upstream::start().await.distinct_bodies("/reports");
    let proxy = three_replicas(&upstream).await;
    let url = "/reports?who=1";

    let alice = proxy.get(0, url).bearer("alice").send().await;
    assert_eq!(alice.status, 200);
    assert_eq!(alice.x_cache(), "BYPASS");
    assert!(
        alice.cache_status().contains("fwd=bypass"),
        "{:?}",
        alice.cache_status()
    );

    let plain = proxy.get(1, url).send().await;
    assert_eq!(plain.x_cache(), "MISS", "alice's answer was not stored");
    assert_ne!(plain.body, alice.body);
    assert_eq!(upstream.hits(url), 2);

    let bob = proxy.get(2, url).bearer("bob").send().await;
    assert_eq!(
        bob.x_cache(),
        "BYPASS",
        "a stored answer is not given to a request with credentials"
    );
    assert_ne!(bob.body, plain.body);
    assert_eq!(upstream.hits(url), 3);

    let sent = upstream.requests_for(url);
    assert_eq!(sent[0].header("authorization"), Some("Bearer alice"));
    assert_eq!(sent[1].header("authorization"), None);
    assert_eq!(sent[2].header("authorization"), Some("Bearer bob"));
}

/// 20 concurrent requests for an answer private to each client: every client gets its own fetch,
/// released together (one fetch for the leader, then the rest in parallel), never one after
/// another; while the pass marker lives, later requests go straight to the upstream.
async fn private_answers_go_to_their_own_clients(header: &str, value: &str) {
    const LATENCY: Duration = Duration::from_millis(500);
    let url = "/private/me";
    let upstream = Upstream::start()
        .await
        .slow("/private", LATENCY)
        .distinct_bodies("/private")
        .header("/private", header, value);
    let proxy = three_replicas_with(
        &upstream,
        "ttl: 60s, wait_timeout: 5s, lease_ttl: 5s, poll_interval: 1s, max_body: 1MiB, pass_ttl: 4s",
    )
    .await;

    let start = Instant::now();
    let replies = send_all(proxy.spread(20, url)).await;
    let took = start.elapsed();

    assert_all_status(&replies, 200);
    assert_eq!(
        tally(&replies).get("PASS"),
        Some(&20),
        "{:?}",
        tally(&replies)
    );
    let bodies: HashSet<_> = replies.iter().map(Reply::text).collect();
    assert_eq!(bodies.len(), 20, "each client its own body: {bodies:?}");
    assert_eq!(upstream.hits(url), 20);
    assert!(
        took < 1800 * MS,
        "20 private answers took {took:?}: about 2 x {LATENCY:?} when released together, 20 x when serialised"
    );
    if header.eq_ignore_ascii_case("set-cookie") {
        for reply in &replies {
            let n = reply
                .text()
                .strip_prefix("response ")
                .and_then(|rest| rest.split(' ').next().map(str::to_string))
                .expect("a numbered body");
            assert_eq!(
                reply.header("set-cookie"),
                Some(format!("session={n}; Path=/").as_str()),
                "the cookie comes with its own body, never another client's"
            );
        }
    }

    assert_eq!(status_of(&proxy, 1, url).await, "PASS");
    let later = send_all(proxy.spread(6, url)).await;
    assert_all_status(&later, 200);
    assert_eq!(tally(&later).get("PASS"), Some(&6), "{:?}", tally(&later));
    assert_eq!(upstream.hits(url), 26);
    let slowest = slowest(&later);
    assert!(
        slowest < LATENCY + 250 * MS,
        "under the pass marker requests go straight to the upstream: slowest took {slowest:?}, \
         a leader's fetch first would take 2 x {LATENCY:?}"
    );

    eventually("the pass marker expires after pass_ttl", || async {
        status_of(&proxy, 2, url).await == "EMPTY"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answers_with_set_cookie_go_to_their_own_clients() {
    private_answers_go_to_their_own_clients("set-cookie", "session={n}; Path=/").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answers_marked_private_go_to_their_own_clients() {
    // max-age does not make a private answer shareable.
    private_answers_go_to_their_own_clients("cache-control", "private, max-age=60").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answers_marked_no_store_go_to_their_own_clients() {
    private_answers_go_to_their_own_clients("cache-control", "no-store").await;
}

// --------------------------------------------------------------- errors ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_error_reaches_every_waiter_at_once_and_is_not_stored() {
    let upstream = Upstream::start()
        .await
        .slow("/reports", 500 * MS)
        .status("/reports", 500)
        .body("/reports", "upstream exploded");
    let proxy = three_replicas(&upstream).await;
    let url = "/reports?fail=1";

    let start = Instant::now();
    let replies = send_all(proxy.spread(50, url)).await;
    let took = start.elapsed();

    assert_all_status(&replies, 500);
    for reply in &replies {
        assert_eq!(reply.text(), "upstream exploded");
    }
    assert_eq!(upstream.hits(url), 1, "one fetch, its error shared");
    assert!(
        took < 1500 * MS,
        "50 answers took {took:?}: one 500 ms fetch shared, not retried by each waiter in turn"
    );

    upstream.set_status("/reports", 200);
    upstream.set("/reports", |b| b.body = BodySpec::Echo);
    let next = proxy.get(1, url).send().await;
    assert_eq!(next.status, 200);
    assert_eq!(next.x_cache(), "MISS", "the error was not stored");
    assert_eq!(upstream.hits(url), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_upstream_is_a_502_for_everyone() {
    let proxy = ProxyCluster::with_redis_nats(3, &config(&Upstream::refusing(), DEFAULTS)).await;

    let replies = send_all(proxy.spread(20, "/reports?down=1")).await;

    assert_all_status(&replies, 502);
    let slowest = slowest(&replies);
    assert!(
        slowest < 3000 * MS,
        "a refused connection is quick to report: {slowest:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_wait_timeout_a_request_gets_a_504_and_the_fetch_still_lands() {
    // The upstream is held (a latch rather than a 2 s delay, so the test decides when the fetch
    // ends); every request, the leader's client included, gives up at wait_timeout, but the fetch
    // is not theirs to cancel.
    let upstream = Upstream::start().await;
    let hold = upstream.hold("/reports/slow");
    let proxy = three_replicas_with(
        &upstream,
        "ttl: 60s, wait_timeout: 500ms, lease_ttl: 5s, poll_interval: 1s, max_body: 1MiB, pass_ttl: 2s, max_fetch: 10s",
    )
    .await;
    let url = "/reports/slow";

    let replies = send_all(proxy.spread(9, url)).await;

    assert_all_status(&replies, 504);
    for reply in &replies {
        assert!(
            reply.took >= 450 * MS && reply.took < 1500 * MS,
            "a 504 at about wait_timeout (500 ms), got one after {:?}",
            reply.took
        );
        let reason = reply.text().to_lowercase();
        assert!(
            reason.contains("wait") || reason.contains("time"),
            "the 504 says why: {reason:?}"
        );
    }
    assert_eq!(upstream.hits(url), 1);

    hold.release();
    eventually("the held fetch is stored", || async {
        status_of(&proxy, 0, url).await == "EXISTS"
    })
    .await;
    let later = proxy.get(1, url).send().await;
    assert_eq!(later.status, 200);
    assert_eq!(later.x_cache(), "HIT");
    assert_eq!(later.text(), "upstream body for /reports/slow");
    assert_eq!(upstream.hits(url), 1, "the first fetch was the only one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_on_wait_timeout_bypass_a_request_fetches_for_itself_and_stores_nothing() {
    let upstream = Upstream::start()
        .await
        .slow("/reports/slow", 2000 * MS)
        .distinct_bodies("/reports/slow");
    let proxy = three_replicas_with(
        &upstream,
        "ttl: 60s, wait_timeout: 500ms, on_wait_timeout: bypass, lease_ttl: 5s, poll_interval: 1s, max_body: 1MiB, pass_ttl: 2s, max_fetch: 10s",
    )
    .await;
    let url = "/reports/slow";

    let replies = send_all(proxy.spread(9, url)).await;

    // The first fetch (response 1) is the flight's; every request gave up on it at 500 ms and
    // fetched its own answer, which took another 2 s.
    assert_all_status(&replies, 200);
    let bodies: HashSet<_> = replies.iter().map(Reply::text).collect();
    assert_eq!(bodies.len(), 9, "nine direct fetches: {bodies:?}");
    assert!(
        !bodies.contains("response 1 for /reports/slow"),
        "{bodies:?}"
    );
    for reply in &replies {
        assert!(
            reply.took >= 2400 * MS && reply.took < 4000 * MS,
            "500 ms of waiting then a 2 s direct fetch, got {:?}",
            reply.took
        );
    }
    assert_eq!(upstream.hits(url), 10);

    eventually("the flight's own fetch is stored", || async {
        status_of(&proxy, 0, url).await == "EXISTS"
    })
    .await;
    let later = proxy.get(2, url).send().await;
    assert_eq!(later.x_cache(), "HIT");
    assert_eq!(
        later.text(),
        "response 1 for /reports/slow",
        "what is stored is the flight's fetch, not a direct one"
    );
    assert_eq!(upstream.hits(url), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fetch_past_max_fetch_is_a_504_for_the_requests_that_joined_it() {
    let upstream = Upstream::start().await;
    let hold = upstream.hold("/reports/stuck");
    let proxy = three_replicas_with(
        &upstream,
        "ttl: 60s, wait_timeout: 5s, lease_ttl: 5s, poll_interval: 1s, max_body: 1MiB, pass_ttl: 2s, max_fetch: 500ms",
    )
    .await;
    let url = "/reports/stuck";

    // All on one replica: they join one flight, whose fetch is abandoned at max_fetch.
    let replies = send_all((0..6).map(|_| proxy.get(0, url))).await;

    assert_all_status(&replies, 504);
    for reply in &replies {
        assert!(
            reply.took >= 450 * MS && reply.took < 2000 * MS,
            "a 504 at about max_fetch (500 ms), got one after {:?}",
            reply.took
        );
    }
    assert_eq!(upstream.hits(url), 1);
    eventually("the abandoned fetch drops its lease", || async {
        status_of(&proxy, 1, url).await == "EMPTY"
    })
    .await;

    hold.release();
    let next = proxy.get(1, url).send().await;
    assert_eq!(next.status, 200);
    assert_eq!(next.x_cache(), "MISS");
    assert_eq!(upstream.hits(url), 2);
}

// --------------------------------------------------------------- bodies ----

/// MISS on replica 0, then shared answers from the store on replica 1 and from the L1 on
/// replica 0; every answer carries exactly the upstream's bytes and status.
async fn round_trips_intact(
    proxy: &ProxyCluster,
    upstream: &Upstream,
    url: &str,
    status: u16,
    body: &[u8],
) {
    let miss = proxy.get(0, url).send().await;
    assert_eq!(miss.status, status, "{url}");
    assert_eq!(miss.x_cache(), "MISS", "{url}");
    assert_same_bytes(&miss.body, body, &format!("{url}: the leader's client"));
    for (i, via) in [(1, "store"), (0, "L1")] {
        let hit = proxy.get(i, url).send().await;
        assert_eq!(hit.status, status, "{url} via the {via}");
        assert_shared(&hit, &format!("{url} via the {via}"));
        assert_same_bytes(&hit.body, body, &format!("{url} via the {via}"));
    }
    assert_eq!(upstream.hits(url), 1, "{url}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bodies_of_every_shape_come_back_byte_for_byte() {
    let binary: &[u8] = b"\0\x01\xff\0corral\0\r\n\0";
    let max_body = 1024 * 1024;
    let upstream = Upstream::start()
        .await
        .body("/reports/binary", binary)
        .body_size("/reports/large", 100 * 1024)
        .body("/reports/empty", "")
        .body("/reports/one", "x")
        .body_size("/reports/max", max_body);
    let proxy = three_replicas(&upstream).await;

    round_trips_intact(&proxy, &upstream, "/reports/binary", 200, binary).await;
    // Larger than an event carries inline.
    round_trips_intact(
        &proxy,
        &upstream,
        "/reports/large",
        200,
        &pattern(100 * 1024),
    )
    .await;
    round_trips_intact(&proxy, &upstream, "/reports/empty", 200, b"").await;
    round_trips_intact(&proxy, &upstream, "/reports/one", 200, b"x").await;
    round_trips_intact(&proxy, &upstream, "/reports/max", 200, &pattern(max_body)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_204_is_stored_and_served_without_a_body() {
    let upstream = Upstream::start().await.status("/reports/nothing", 204);
    let proxy = three_replicas(&upstream).await;

    round_trips_intact(&proxy, &upstream, "/reports/nothing", 204, b"").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_over_max_body_streams_through_and_is_not_stored() {
    let over = 1024 * 1024 + 1;
    let upstream = Upstream::start()
        .await
        .slow("/reports/huge", 300 * MS)
        .body_size("/reports/huge", over);
    let proxy = three_replicas(&upstream).await;
    let url = "/reports/huge";

    let replies = send_all(proxy.spread(6, url)).await;

    assert_all_status(&replies, 200);
    for (i, reply) in replies.iter().enumerate() {
        assert_same_bytes(&reply.body, &pattern(over), &format!("request {i}"));
    }
    assert_eq!(
        upstream.hits(url),
        6,
        "the leader's client got its fetch, the others their own"
    );
    let later = proxy.get(1, url).send().await;
    assert_eq!(later.x_cache(), "PASS", "nothing was stored");
    assert_eq!(later.body.len(), over);
    assert_eq!(upstream.hits(url), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_get_after_a_head_gets_the_whole_body() {
    let upstream = Upstream::start().await;
    let proxy = three_replicas(&upstream).await;
    let url = "/reports/head";

    let head = proxy.call(0, Method::HEAD, url).send().await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());

    for i in [1, 2, 0] {
        let get = proxy.get(i, url).send().await;
        assert_eq!(get.status, 200);
        assert_eq!(
            get.text(),
            "upstream body for /reports/head",
            "GET on replica {i}"
        );
    }
}

// -------------------------------------------------------------- headers ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hop_by_hop_headers_are_neither_forwarded_nor_stored() {
    let url = "/reports/hop";
    let upstream = Upstream::start()
        .await
        .header(url, "connection", "x-hop-secret")
        .header(url, "x-hop-secret", "s3cret")
        .header(url, "keep-alive", "timeout=5")
        .header(url, "proxy-connection", "keep-alive")
        .header(url, "x-end-to-end", "kept");
    let proxy = three_replicas(&upstream).await;

    let send = |i: usize| {
        proxy
            .get(i, url)
            .header("connection", "x-client-hop")
            .header("x-client-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
    };
    let miss = send(0).send().await;
    let from_store = send(1).send().await;
    let from_l1 = send(0).send().await;
    assert_eq!(miss.x_cache(), "MISS");
    assert_shared(&from_store, "the second request, on another replica");
    assert_shared(&from_l1, "the third request, on the first replica");

    // Not forwarded to the upstream (the first request is the only one it saw).
    assert_eq!(upstream.hits(url), 1);
    let sent = &upstream.requests_for(url)[0];
    for name in ["x-client-hop", "keep-alive", "proxy-connection"] {
        assert_eq!(sent.header(name), None, "{name} reached the upstream");
    }
    for value in sent.headers.get_all("connection") {
        let value = value.to_str().unwrap_or_default().to_lowercase();
        assert!(!value.contains("x-client-hop"), "Connection: {value}");
    }

    // Not forwarded to the client, whether fresh, from the store or from the L1.
    for (reply, what) in [
        (&miss, "MISS"),
        (&from_store, "store HIT"),
        (&from_l1, "L1 HIT"),
    ] {
        assert_eq!(reply.header("x-end-to-end"), Some("kept"), "{what}");
        for name in ["x-hop-secret", "keep-alive", "proxy-connection"] {
            assert_eq!(
                reply.header(name),
                None,
                "{what}: {name} reached the client"
            );
        }
        for value in reply.headers.get_all("connection") {
            let value = value.to_str().unwrap_or_default().to_lowercase();
            assert!(
                !value.contains("x-hop-secret"),
                "{what}: Connection: {value}"
            );
        }
    }

    // Not stored: the entry's bytes in Redis do not mention them.
    let key = proxy.status(0, TOKEN, url).await.json()["key"]
        .as_str()
        .expect("status names the key")
        .to_string();
    let mut redis = proxy.redis().client().await;
    let stored: Option<Vec<u8>> = redis::cmd("GET")
        .arg(format!("t1:{{{key}}}:v"))
        .query_async(&mut redis)
        .await
        .expect("GET the entry");
    let stored = String::from_utf8_lossy(&stored.expect("the entry is in Redis")).to_lowercase();
    assert!(
        stored.contains("x-end-to-end"),
        "the entry holds the end-to-end header"
    );
    for secret in ["x-hop-secret", "s3cret", "keep-alive", "proxy-connection"] {
        assert!(!stored.contains(secret), "{secret} was stored");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_upstream_learns_who_asked_and_through_what_but_not_a_get_body() {
    let upstream = Upstream::start().await;
    let proxy = three_replicas(&upstream).await;
    let url = "/reports/forwarded";

    // A cacheable request: the shared answer must not depend on anything outside the key.
    let reply = proxy
        .get(0, url)
        .header("x-forwarded-host", "evil.example")
        .send()
        .await;
    assert_eq!(reply.status, 200);
    let sent = &upstream.requests_for(url)[0];
    assert!(
        sent.header("via").is_some_and(|via| !via.trim().is_empty()),
        "Via is set"
    );
    assert_eq!(sent.header("x-forwarded-proto"), Some("http"));
    // Not in the key, so the upstream must not see it (it might echo it into a shared answer);
    // for the same reason one client's address is not sent with a request whose answer is shared.
    assert_ne!(sent.header("x-forwarded-host"), Some("evil.example"));
    assert_eq!(sent.header("x-forwarded-for"), None);

    // A GET with a body is not cacheable here; it goes through on its own, without the body,
    // and the upstream learns who asked.
    let with_body = "/reports/forwarded-with-body";
    let reply = proxy
        .get(0, with_body)
        .body("a GET body is not forwarded")
        .send()
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.x_cache(), "BYPASS");
    let sent = &upstream.requests_for(with_body)[0];
    let forwarded_for = sent.header("x-forwarded-for").expect("X-Forwarded-For");
    assert!(
        forwarded_for.contains("127.0.0.1"),
        "X-Forwarded-For: {forwarded_for}"
    );
    assert!(sent.body.is_empty(), "GET body forwarded: {:?}", sent.body);
}

// ---------------------------------------------------------------- admin ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_purge_makes_the_next_get_a_miss_on_every_replica() {
    let upstream = Upstream::start().await.distinct_bodies("/reports");
    let proxy = three_replicas(&upstream).await;
    let url = "/reports?purge=1";
    let mut keys = HashSet::new();

    // Each replica in turn purges, after every replica has the answer in its L1.
    for purger in 0..3 {
        let current = proxy.get(purger, url).send().await;
        for i in 0..3 {
            let warm = proxy.get(i, url).send().await;
            assert_eq!(warm.body, current.body, "replica {i} before purge {purger}");
        }

        let purged = proxy.purge(purger, TOKEN, url).await;
        assert_eq!(purged.status, 200, "{:?}", purged.text());
        let purged = purged.json();
        assert_eq!(purged["purged"], json!(true), "{purged}");
        let key = purged["key"].as_str().expect("the purge names the key");
        assert!(is_hex_digest(key), "{key:?}");
        keys.insert(key.to_string());

        let next = proxy.get(purger, url).send().await;
        assert_eq!(
            next.x_cache(),
            "MISS",
            "the next GET on replica {purger} after its purge"
        );
        assert_ne!(next.body, current.body);
        for i in (0..3).filter(|i| *i != purger) {
            let other = proxy.get(i, url).send().await;
            assert_eq!(
                other.body, next.body,
                "replica {i} still answers the purged body (from its L1?)"
            );
        }
    }
    assert_eq!(
        upstream.hits(url),
        4,
        "one fetch, then one after each purge"
    );
    assert_eq!(keys.len(), 1, "one URL, one key: {keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_is_empty_then_pending_then_exists() {
    let upstream = Upstream::start().await;
    let hold = upstream.hold("/reports/status");
    let proxy = three_replicas(&upstream).await;
    let url = "/reports/status?x=1";

    let empty = proxy.status(0, TOKEN, url).await;
    assert_eq!(empty.status, 200);
    let empty = empty.json();
    assert_eq!(empty["status"], json!("EMPTY"), "{empty}");
    let key = empty["key"]
        .as_str()
        .expect("status names the key")
        .to_string();
    assert!(is_hex_digest(&key), "{key:?}");

    let fetch = tokio::spawn(proxy.get(0, url).send());
    upstream.wait_for_hits(url, 1).await;
    for i in 0..3 {
        let pending = proxy.status(i, TOKEN, url).await.json();
        assert_eq!(
            pending["status"],
            json!("PENDING"),
            "replica {i}: {pending}"
        );
        assert_eq!(pending["key"], json!(key));
    }

    hold.release();
    let fetched = fetch.await.expect("the request task");
    assert_eq!(fetched.x_cache(), "MISS");
    for i in 0..3 {
        let exists = proxy.status(i, TOKEN, url).await.json();
        assert_eq!(exists["status"], json!("EXISTS"), "replica {i}: {exists}");
        assert_eq!(exists["key"], json!(key));
    }
    assert_eq!(upstream.hits(url), 1, "status never fetches");

    let purged = proxy.purge(2, TOKEN, url).await.json();
    assert_eq!(
        purged["key"],
        json!(key),
        "purge and status name the same key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_needs_the_bearer_token() {
    let upstream = Upstream::start().await;
    let proxy = three_replicas(&upstream).await;
    let status = "/admin/status?url=%2Freports%3Fx%3D1";
    let purge = json!({ "url": "/reports?x=1", "method": "GET" });

    let health = proxy.admin(0, Method::GET, "/healthz").send().await;
    assert_eq!(health.status, 200, "health needs no token");

    let none = proxy.admin(0, Method::GET, status).send().await;
    assert_eq!(none.status, 401, "no token");
    let wrong = proxy
        .admin(1, Method::GET, status)
        .bearer("not-the-secret")
        .send()
        .await;
    assert_eq!(wrong.status, 401, "wrong token");
    let not_bearer = proxy
        .admin(2, Method::GET, status)
        .header("authorization", TOKEN)
        .send()
        .await;
    assert_eq!(
        not_bearer.status, 401,
        "the token without the Bearer scheme"
    );
    let right = proxy
        .admin(0, Method::GET, status)
        .bearer(TOKEN)
        .send()
        .await;
    assert_eq!(right.status, 200);

    let none = proxy
        .admin(0, Method::POST, "/admin/purge")
        .json(&purge)
        .send()
        .await;
    assert_eq!(none.status, 401, "purge without a token");
    let wrong = proxy
        .admin(1, Method::POST, "/admin/purge")
        .bearer("not-the-secret")
        .json(&purge)
        .send()
        .await;
    assert_eq!(wrong.status, 401, "purge with a wrong token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_without_a_configured_token_is_forbidden() {
    let upstream = Upstream::start().await;
    let yaml = edited(
        &fill(
            CONFIG,
            &[
                ("backing", MEMORY),
                ("defaults", DEFAULTS),
                ("upstream", &upstream.url()),
            ],
        ),
        "admin: { listen: 127.0.0.1:0, token: secret }",
        "admin: { listen: 127.0.0.1:0 }",
    );
    let proxy = ProxyCluster::on_memory(1, &yaml).await;
    let status = "/admin/status?url=%2Freports";

    assert_eq!(
        proxy.admin(0, Method::GET, "/healthz").send().await.status,
        200
    );
    assert_eq!(proxy.admin(0, Method::GET, status).send().await.status, 403);
    assert_eq!(
        proxy
            .admin(0, Method::GET, status)
            .bearer(TOKEN)
            .send()
            .await
            .status,
        403,
        "no token is configured, so none is right"
    );
    let purge = proxy
        .admin(0, Method::POST, "/admin/purge")
        .bearer(TOKEN)
        .json(&json!({ "url": "/reports", "method": "GET" }))
        .send()
        .await;
    assert_eq!(purge.status, 403);
}

// ------------------------------------------------------------ processes ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_corral_serve_processes_reach_the_upstream_once() {
    let (redis, nats) = tokio::join!(TestRedis::start(), TestNats::start());
    let upstream = Upstream::start().await.slow("/reports", 500 * MS);
    let dir = tempfile::Builder::new()
        .prefix("corral-serve-")
        .tempdir()
        .expect("a temporary directory for the configs");

    let mut replicas = Vec::new();
    for i in 0..3 {
        let public = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let yaml = fill(
            &edited(
                &edited(
                    &config(&upstream.url(), DEFAULTS),
                    "listen: 127.0.0.1:0\n",
                    &format!("listen: {public}\n"),
                ),
                "admin: { listen: 127.0.0.1:0,",
                &format!("admin: {{ listen: {admin},"),
            ),
            &[("redis", &redis.url()), ("nats", &nats.url())],
        );
        let path = dir.path().join(format!("replica-{i}.yaml"));
        std::fs::write(&path, yaml).expect("write the config");
        // The last one finds its config through the environment.
        let from = if i == 2 {
            ConfigFrom::Env
        } else {
            ConfigFrom::Flag
        };
        replicas.push(CorralServe::start(&path, public, admin, from).await);
    }

    let http = Http::new();
    let replies =
        send_all((0..90).map(|i| http.get(format!("{}/reports?day=1", replicas[i % 3].url()))))
            .await;

    assert_eq!(upstream.hits("/reports?day=1"), 1);
    assert_all_status(&replies, 200);
    for reply in &replies {
        assert_eq!(reply.text(), "upstream body for /reports?day=1");
    }
    assert_eq!(
        tally(&replies).get("MISS"),
        Some(&1),
        "{:?}",
        tally(&replies)
    );
}

// ---------------------------------------------------------------- http/2 ----

/// With `upstream_http2: true` the upstream is spoken to over HTTP/2 with prior knowledge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_can_speak_http2_to_its_upstream() {
    use std::sync::{Arc, Mutex};

    let versions: Arc<Mutex<Vec<http::Version>>> = Arc::default();
    let seen = versions.clone();
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().push(request.version());
            "over h2"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0 }}\nnamespace: h2\n\
         routes:\n  - name: h2\n    match: {{ path_prefix: / }}\n    upstream: http://{addr}\n    upstream_http2: true\n"
    );
    let proxy = ProxyCluster::on_memory(1, &yaml).await;
    let reply = proxy.get(0, "/anything").send().await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "over h2");
    assert_eq!(*versions.lock().unwrap(), vec![http::Version::HTTP_2]);
    server.abort();
}

// ------------------------------------------------------- statuses, host ----

/// 501 is in the default `cache_statuses`: an answer to store, not a failure to pass around.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_501_listed_in_cache_statuses_is_stored_like_any_answer() {
    let upstream = Upstream::start()
        .await
        .status("/reports/unimplemented", 501);
    let yaml = fill(
        CONFIG,
        &[
            ("backing", MEMORY),
            ("defaults", DEFAULTS),
            ("upstream", &upstream.url()),
        ],
    );
    let proxy = ProxyCluster::on_memory(1, &yaml).await;
    let first = proxy.get(0, "/reports/unimplemented").send().await;
    let second = proxy.get(0, "/reports/unimplemented").send().await;
    assert_eq!((first.status.as_u16(), first.x_cache()), (501, "MISS"));
    assert_eq!((second.status.as_u16(), second.x_cache()), (501, "HIT"));
    assert_eq!(upstream.hits("/reports/unimplemented"), 1);
}

/// A route that keys on Host forwards the client's; any other sends the upstream's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_host_reaches_the_upstream_only_when_it_is_in_the_key() {
    let upstream = Upstream::start().await;
    let yaml = fill(
        "listen: 127.0.0.1:0\nadmin: { listen: 127.0.0.1:0 }\nnamespace: host\n\
         routes:\n  - name: by-host\n    match: { path_prefix: /tenant }\n    upstream: {{upstream}}\n    key: { headers: [host] }\n\
         \x20 - name: plain\n    match: { path_prefix: / }\n    upstream: {{upstream}}\n",
        &[("upstream", &upstream.url())],
    );
    let proxy = ProxyCluster::on_memory(1, &yaml).await;
    proxy
        .get(0, "/tenant/a")
        .header("host", "a.example")
        .send()
        .await;
    proxy
        .get(0, "/plain")
        .header("host", "b.example")
        .send()
        .await;
    let upstream_host = upstream.url().trim_start_matches("http://").to_owned();
    assert_eq!(
        upstream.requests_for("/tenant/a")[0].header("host"),
        Some("a.example")
    );
    assert_eq!(
        upstream.requests_for("/plain")[0].header("host"),
        Some(upstream_host.as_str())
    );
}

/// A bypassed request waits for the upstream's answer no longer than max_fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bypassed_request_gets_a_504_when_the_upstream_does_not_answer_within_max_fetch() {
    let upstream = Upstream::start().await;
    let hold = upstream.hold("/stuck");
    let yaml = fill(
        "listen: 127.0.0.1:0\nadmin: { listen: 127.0.0.1:0 }\nnamespace: stuck\n\
         defaults: { max_fetch: 300ms }\n\
         routes:\n  - name: plain\n    match: { path_prefix: / }\n    upstream: {{upstream}}\n    cache: false\n",
        &[("upstream", &upstream.url())],
    );
    let proxy = ProxyCluster::on_memory(1, &yaml).await;
    let reply = proxy.get(0, "/stuck").send().await;
    assert_eq!(reply.status.as_u16(), 504);
    assert_eq!(reply.x_cache(), "BYPASS");
    assert!(
        reply.took >= 250 * MS && reply.took < 2000 * MS,
        "answered after {:?}, not at about max_fetch",
        reply.took
    );
    hold.release();
}

// --------------------------------------------------------------- metrics ----

/// The value of the first sample of `name` whose labels include every one of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find(|line| {
            let (series, _) = line.rsplit_once(' ').unwrap_or((line, ""));
            let bare = series.split('{').next() == Some(name);
            bare && labels.iter().all(|label| series.contains(label))
        })
        .and_then(|line| line.rsplit_once(' '))
        .and_then(|(_, value)| value.parse().ok())
}

/// `/metrics` on the admin listener counts requests by route and outcome and upstream fetches by
/// status class, and reports health, the L1 and the build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_by_outcome_and_upstream_fetches_by_class() {
    let upstream = Upstream::start().await.slow("/reports", 200 * MS);
    let yaml = fill(
        CONFIG,
        &[
            ("backing", MEMORY),
            ("defaults", DEFAULTS),
            ("upstream", &upstream.url()),
        ],
    );
    let proxy = ProxyCluster::on_memory(1, &yaml).await;
    let replies = send_all((0..5).map(|_| proxy.get(0, "/reports?m=1"))).await;
    assert_all_status(&replies, 200);
    proxy.get(0, "/reports?m=1").send().await;
    proxy
        .get(0, "/reports?m=2")
        .header("authorization", "Bearer x")
        .send()
        .await;

    let scraped = proxy.admin(0, Method::GET, "/metrics").send().await;
    assert_eq!(scraped.status, 200);
    let text = scraped.text();
    let count = |outcome: &str| {
        sample(
            &text,
            "corral_requests_total",
            &[&format!("outcome=\"{outcome}\""), "route=\"reports\""],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(count("miss"), 1.0, "{text}");
    assert_eq!(count("coalesced") + count("hit"), 5.0, "{text}");
    assert_eq!(count("bypass"), 1.0, "{text}");
    let fetched = sample(
        &text,
        "corral_upstream_requests_total",
        &["route=\"reports\"", "status_class=\"2xx\""],
    );
    assert_eq!(
        fetched,
        Some(2.0),
        "one fetch for the key, one bypass: {text}"
    );
    assert_eq!(sample(&text, "corral_bus_connected", &[]), Some(1.0));
    assert_eq!(sample(&text, "corral_store_connected", &[]), Some(1.0));
    assert_eq!(sample(&text, "corral_l1_entries", &[]), Some(1.0));
    assert_eq!(
        sample(&text, "corral_build_info", &["version=\"0.1.0\""]),
        Some(1.0)
    );
    assert!(
        sample(
            &text,
            "corral_request_duration_seconds_count",
            &["outcome=\"miss\"", "route=\"reports\""]
        ) == Some(1.0),
        "{text}"
    );
    assert!(
        text.contains("process_cpu_seconds_total"),
        "process metrics"
    );
}

/// A client's `X-Request-Id` comes back; without one, corral makes one. A shared fetch sends the
/// upstream an id of its own, never a client's (see `attacks::request_ids`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_is_returned_and_a_shared_fetch_sends_its_own() {
    let upstream = Upstream::start().await;
    let yaml = fill(
        CONFIG,
        &[
            ("backing", MEMORY),
            ("defaults", DEFAULTS),
            ("upstream", &upstream.url()),
        ],
    );
    let proxy = ProxyCluster::on_memory(1, &yaml).await;
    let first = proxy
        .get(0, "/reports?id=1")
        .header("x-request-id", "abc-123")
        .send()
        .await;
    assert_eq!(first.header("x-request-id"), Some("abc-123"));
    let sent = upstream.requests_for("/reports?id=1")[0].clone();
    let fetch_id = sent.header("x-request-id").expect("the fetch's id");
    assert_eq!(fetch_id.len(), 32);
    assert_ne!(fetch_id, "abc-123");
    // A hit answers with its own request's id, never the one that filled the cache.
    let second = proxy.get(0, "/reports?id=1").send().await;
    assert_eq!(second.x_cache(), "HIT");
    let generated = second.header("x-request-id").expect("an id is generated");
    assert_eq!(generated.len(), 32);
    assert_ne!(generated, "abc-123");
}
