//! Degrade modes: three replicas on a real Redis store and NATS bus while the store misbehaves
//! (frozen, held by `CLIENT PAUSE`, black-holed, resetting, killed and restarted empty).
//!
//! What these hold the code to, with the default store limits (50 ms command timeout, a breaker
//! that opens after 5 failures for 500 ms):
//! - no request waits past its deadline, however the store fails;
//! - each replica's breaker opens, so later requests do not wait on the store at all;
//! - with `on_store_error: open`, a key costs at most one upstream fetch per replica over the
//!   whole outage (wave after wave), answered from each replica's L1 after the first;
//! - with `on_store_error: closed`, cacheable requests are answered 503 with `Retry-After` at once;
//! - the service uses the store again within about a second of its recovery, with no restart;
//! - a lease that a held ACQUIRE created after its client gave up is released, so nobody waits a
//!   lease_ttl for it.
//!
//! Timings are printed (a measurement); the assertions are bounds and counts.

use crate::support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use http::Method;
use support::fault::{Fault, FaultProxy};
use support::http::{Reply, send_all};
use support::proxy::{ProxyCluster, fill};
use support::upstream::Upstream;
use support::{TestNats, TestRedis, eventually};
use tokio::time::Instant;

const MS: Duration = Duration::from_millis(1);

/// Three replicas' config: one route keyed on the whole query; `{{mode}}` is `on_store_error`.
/// The store limits are left at their defaults on purpose: they are what is under test.
const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0, token: secret }
namespace: degrade
store: { kind: redis, url: "{{redis}}" }
bus: { kind: nats, url: "{{nats}}" }
defaults: { ttl: 60s, wait_timeout: 5s, lease_ttl: 10s, poll_interval: 500ms, max_body: 1MiB, pass_ttl: 2s, max_fetch: 4s, on_store_error: {{mode}} }
routes:
  - name: all
    match: { path_prefix: / }
    upstream: {{upstream}}
    key: { query: all }
"#;

/// `wait_timeout` of [`CONFIG`]: no request may be answered later than this (plus [`SLACK`]).
const WAIT_TIMEOUT: Duration = Duration::from_secs(5);

/// `lease_ttl` of [`CONFIG`]: long, so that waiting on an orphaned lease would show.
const LEASE_TTL: Duration = Duration::from_secs(10);

/// Allowance past a deadline for the answer to travel back over loopback on a loaded machine.
const SLACK: Duration = Duration::from_secs(1);

/// How soon after the store is back every replica must use it again: the promise is about a
/// second (open_for plus one probe); the rest absorbs a loaded machine.
const RECOVERY_BOUND: Duration = Duration::from_secs(3);

/// Pause between two waves of requests during an outage: longer than the breaker's open_for, so
/// that waves meet it open, half-open and open again.
const WAVE_EVERY: Duration = Duration::from_millis(600);

fn redis_addr(redis: &TestRedis) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], redis.port()))
}

/// Three replicas whose Redis is reached through a fault proxy (`link`), with NATS as the bus.
struct Stack {
    // Declared first so the replicas stop before the servers they use.
    cluster: ProxyCluster,
    link: FaultProxy,
    redis: TestRedis,
    nats: TestNats,
    upstream: Upstream,
}

impl Stack {
    async fn start(upstream: Upstream, mode: &str) -> Stack {
        let (redis, nats) = tokio::join!(TestRedis::start(), TestNats::start());
        let link = FaultProxy::start(redis_addr(&redis)).await;
        let yaml = fill(
            CONFIG,
            &[
                ("redis", &format!("redis://{}/", link.addr())),
                ("nats", &nats.url()),
                ("upstream", &upstream.url()),
                ("mode", mode),
            ],
        );
        let cluster = ProxyCluster::start(3, &yaml, None).await;
        let stack = Stack {
            cluster,
            link,
            redis,
            nats,
            upstream,
        };
        stack.warm().await;
        stack
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

    /// The value of a counter or gauge (summed over its series matching `labels`) on replica `i`.
    async fn metric(&self, i: usize, name: &str, labels: &str) -> f64 {
        let text = self
            .cluster
            .admin(i, Method::GET, "/metrics")
            .send()
            .await
            .text();
        sample(&text, name, labels)
    }
}

/// The sum of the samples of `name` whose labels contain `labels` (empty: every sample).
fn sample(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (series, value) = rest.rsplit_once(' ')?;
            let ok = (series.is_empty() || series.starts_with('{')) && series.contains(labels);
            ok.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// How many answers carried each (status, `X-Cache`, `Cache-Status` detail).
fn tally(replies: &[Reply]) -> BTreeMap<String, usize> {
    let mut tally = BTreeMap::new();
    for reply in replies {
        let what = format!(
            "{} {} {}",
            reply.status.as_u16(),
            reply.x_cache(),
            detail(reply)
        );
        *tally.entry(what).or_insert(0) += 1;
    }
    tally
}

fn detail(reply: &Reply) -> String {
    reply
        .cache_status()
        .split(';')
        .find_map(|part| part.trim().strip_prefix("detail="))
        .unwrap_or("-")
        .to_string()
}

/// The latencies' p50, p99 and max.
fn percentiles(replies: &[Reply]) -> (Duration, Duration, Duration) {
    let mut took: Vec<Duration> = replies.iter().map(|r| r.took).collect();
    took.sort();
    let at = |q: f64| took[((took.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), at(1.0))
}

/// How the store fails in [`open_outage`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outage {
    /// redis-server is frozen (SIGSTOP) for 5 s: connections stay open, nothing answers.
    Pause,
    /// Redis holds every client's commands for 3 s (`CLIENT PAUSE 3000 ALL`), running them after.
    ClientPause,
    /// The link to Redis swallows everything for 2 s (a partition that drops packets).
    BlackHole,
    /// The link to Redis resets every connection for 2 s (a partition that refuses).
    Reset,
}

impl Outage {
    fn lasts(self) -> Duration {
        match self {
            Outage::Pause => Duration::from_secs(5),
            Outage::ClientPause => Duration::from_secs(3),
            Outage::BlackHole | Outage::Reset => Duration::from_secs(2),
        }
    }

    /// Whether commands sent during the outage still run on the server afterwards.
    fn held(self) -> bool {
        self != Outage::Reset
    }
}

/// Every answer during an outage in open mode: within the deadline, and a degraded fetch or this
/// replica's L1 copy of one.
fn assert_degraded(replies: &[Reply], what: &str) {
    for (i, reply) in replies.iter().enumerate() {
        assert!(
            reply.took <= WAIT_TIMEOUT + SLACK,
            "{what}: request {i} was answered after {:?}, past wait_timeout",
            reply.took
        );
        assert_eq!(
            reply.status,
            200,
            "{what}: request {i} while the store is down: {:?}",
            reply.text()
        );
        let degraded = reply.cache_status().contains("store-unavailable");
        let from_l1 = reply.x_cache() == "HIT";
        assert!(
            degraded || from_l1,
            "{what}: request {i} must be a degraded fetch or its L1 copy: {} {:?}",
            reply.x_cache(),
            reply.cache_status()
        );
    }
}

/// Sends requests for new keys to replica `i` until one is answered through the store (stored or
/// a hit, not degraded); returns how long after `since` that was.
async fn until_recovered(stack: &Stack, i: usize, since: Instant) -> Duration {
    // 25 ms apart, bounded by a count well past the bound asserted below.
    for n in 0..400 {
        let reply = stack
            .cluster
            .get(i, &format!("/after?replica={i}&n={n}"))
            .send()
            .await;
        if reply.status == 200 && !reply.cache_status().contains("store-unavailable") {
            return since.elapsed();
        }
        tokio::time::sleep(25 * MS).await;
    }
    panic!("replica {i} never used the store again after the outage");
}

/// Fault tests 5 and 8 in open mode: waves of requests for the same keys through an outage, then
/// recovery and the leases the held commands left.
async fn open_outage(outage: Outage) {
    let upstream = Upstream::start().await.slow("/", 100 * MS);
    let mut stack = Stack::start(upstream, "open").await;
    let keys = ["/burst?k=1", "/burst?k=2", "/burst?k=3"];
    let orphan = "/orphan?k=1";

    let began = Instant::now();
    match outage {
        Outage::Pause => stack.redis.pause(),
        Outage::ClientPause => {
            let mut admin = stack.redis.client().await;
            // Redis lifts it by itself: an UNPAUSE would be held too.
            let millis = outage.lasts().as_millis().to_string();
            let paused: String = redis::cmd("CLIENT")
                .arg(&["PAUSE", &millis, "ALL"])
                .query_async(&mut admin)
                .await
                .expect("CLIENT PAUSE");
            assert_eq!(paused, "OK");
        }
        Outage::BlackHole => stack.link.set(Fault::BlackHole),
        Outage::Reset => stack.link.set(Fault::Reset),
    }

    // A key asked of replica 0 alone: its ACQUIRE times out, and (if held) runs later.
    let reply = stack.cluster.get(0, orphan).send().await;
    assert_degraded(std::slice::from_ref(&reply), "the orphan key");

    // Waves of new requests for the same keys for as long as the outage lasts.
    let mut during = Vec::new();
    let mut waves = 0;
    // Bounded by the outage's length (at most 5 s / 600 ms waves) and this count.
    for wave in 0..20 {
        if began.elapsed() + WAVE_EVERY >= outage.lasts() {
            break;
        }
        // The same keys each time, and two new ones, so the store keeps being asked.
        let new: Vec<String> = (0..2).map(|j| format!("/wave?n={wave}&j={j}")).collect();
        let calls = keys
            .iter()
            .copied()
            .chain(new.iter().map(String::as_str))
            .flat_map(|key| stack.cluster.spread(12, key));
        let replies = send_all(calls).await;
        assert_degraded(&replies, &format!("{outage:?} wave {wave}"));
        println!("{outage:?} wave {wave}: {:?}", tally(&replies));
        during.extend(replies);
        waves += 1;
        tokio::time::sleep(WAVE_EVERY).await;
    }
    assert!(waves >= 2, "only {waves} waves fitted in the outage");
    let (p50, p99, max) = percentiles(&during);
    println!(
        "{outage:?}: {} requests in {waves} waves during the outage: p50 {p50:?}, p99 {p99:?}, max {max:?}",
        during.len()
    );
    for key in keys {
        let fetched = stack.upstream.hits(key);
        assert!(
            (1..=stack.cluster.len()).contains(&fetched),
            "{key}: {fetched} upstream fetches over {waves} waves; at most one per replica"
        );
    }
    for i in 0..stack.cluster.len() {
        let opened = stack
            .metric(i, "corral_store_breaker_transitions_total", "to=\"open\"")
            .await;
        assert!(opened >= 1.0, "replica {i}: the breaker never opened");
    }
    let short_circuited: f64 = {
        let mut sum = 0.0;
        for i in 0..stack.cluster.len() {
            sum += stack
                .metric(i, "corral_store_short_circuits_total", "")
                .await;
        }
        sum
    };
    println!("{outage:?}: {short_circuited} store calls failed fast by the open breakers");

    // The end of the outage, and every replica back on the store.
    tokio::time::sleep_until(began + outage.lasts()).await;
    match outage {
        Outage::Pause => stack.redis.resume(),
        Outage::ClientPause => {}
        Outage::BlackHole | Outage::Reset => stack.link.restore(),
    }
    let resumed = Instant::now();
    let recovered: Vec<Duration> = futures::future::join_all(
        (0..stack.cluster.len()).map(|i| until_recovered(&stack, i, resumed)),
    )
    .await;
    println!("{outage:?}: each replica used the store again after {recovered:?}");
    for (i, took) in recovered.iter().enumerate() {
        assert!(
            *took <= RECOVERY_BOUND,
            "replica {i} used the store again only {took:?} after it was back"
        );
    }

    // A new key now: one fetch, shared by every replica.
    let fresh = "/fresh?k=1";
    let replies = send_all(stack.cluster.spread(30, fresh)).await;
    for (i, reply) in replies.iter().enumerate() {
        assert_eq!(reply.status, 200, "request {i}: {:?}", reply.text());
        assert!(
            !reply.cache_status().contains("store-unavailable"),
            "request {i} after recovery was degraded: {:?}",
            reply.cache_status()
        );
    }
    assert_eq!(stack.upstream.hits(fresh), 1, "{fresh}: one fetch");

    // The key only replica 0 asked for: replica 1 has no copy and goes to the store, where the
    // held ACQUIRE may have left a lease. Released by replica 0, it costs nobody a lease_ttl.
    let reply = stack.cluster.get(1, orphan).send().await;
    assert_eq!(reply.status, 200, "{:?}", reply.text());
    assert!(
        reply.took <= SLACK + SLACK,
        "the orphan key took {:?} on another replica (lease_ttl {LEASE_TTL:?})",
        reply.took
    );
    assert!(
        stack.upstream.hits(orphan) <= 2,
        "{orphan}: one degraded fetch and one after recovery at most"
    );
    if outage.held() {
        eventually(
            "replica 0 released the lease its held ACQUIRE left",
            || async {
                stack
                    .metric(0, "corral_orphan_leases_total", "result=\"released\"")
                    .await
                    >= 1.0
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_frozen_for_5s_no_request_hangs_fetches_stay_per_replica_and_it_recovers() {
    open_outage(Outage::Pause).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_client_paused_for_3s_no_request_hangs_and_its_held_acquires_leave_no_lease() {
    open_outage(Outage::ClientPause).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_black_holed_latency_stays_bounded_and_the_breaker_opens() {
    open_outage(Outage::BlackHole).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_resetting_latency_stays_bounded_and_the_breaker_opens() {
    open_outage(Outage::Reset).await;
}

/// `on_store_error: closed`: while the store is frozen every cacheable request is answered 503
/// with `Retry-After` at once, nothing is fetched, `/readyz` says 503 naming the route; after the
/// store thaws, requests are served and stored again, and `/readyz` is 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_mode_answers_503_at_once_while_the_store_is_down_and_recovers() {
    let upstream = Upstream::start().await;
    let mut stack = Stack::start(upstream, "closed").await;
    let key = "/closed?k=1";

    stack.redis.pause();
    let resumed_at = Instant::now() + Duration::from_secs(2);
    let mut during = Vec::new();
    // Three waves, bounded by this count.
    for _ in 0..3 {
        during.extend(send_all(stack.cluster.spread(12, key)).await);
        tokio::time::sleep(WAVE_EVERY).await;
    }
    println!("closed mode during the outage: {:?}", tally(&during));
    for (i, reply) in during.iter().enumerate() {
        assert_eq!(reply.status, 503, "request {i}: {:?}", reply.text());
        assert_eq!(reply.header("retry-after"), Some("1"), "request {i}");
        assert_eq!(detail(reply), "store-unavailable-closed", "request {i}");
        // Two attempts of one 50 ms timeout, or nothing at all once the breaker is open.
        assert!(
            reply.took <= SLACK,
            "request {i} took {:?} to be refused",
            reply.took
        );
    }
    let (p50, p99, max) = percentiles(&during);
    println!("closed mode 503s: p50 {p50:?}, p99 {p99:?}, max {max:?}");
    assert_eq!(
        stack.upstream.hits(key),
        0,
        "nothing fetched without the store"
    );
    let readyz = stack.cluster.admin(0, Method::GET, "/readyz").send().await;
    assert_eq!(readyz.status, 503, "{:?}", readyz.text());
    assert!(
        readyz.text().contains("route all") && readyz.text().contains("not answering"),
        "{:?}",
        readyz.text()
    );

    tokio::time::sleep_until(resumed_at).await;
    stack.redis.resume();
    let resumed = Instant::now();
    eventually("every replica answers from the store again", || async {
        let replies = send_all(stack.cluster.spread(3, key)).await;
        println!("closed mode after resume: {:?}", tally(&replies));
        replies.iter().all(|reply| reply.status == 200)
    })
    .await;
    println!(
        "closed mode: serving again {:?} after resume",
        resumed.elapsed()
    );
    assert_eq!(stack.upstream.hits(key), 1, "one fetch across the replicas");
    eventually("/readyz is 200 again", || async {
        let reply = stack.cluster.admin(0, Method::GET, "/readyz").send().await;
        reply.status == 200 && reply.text().contains("breaker closed")
    })
    .await;
}

/// Open mode: `/readyz` stays 200 through a store outage, saying it is degraded and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_mode_readyz_stays_200_and_reports_the_degraded_store() {
    let upstream = Upstream::start().await;
    let stack = Stack::start(upstream, "open").await;
    stack.link.set(Fault::BlackHole);
    let reply = stack.cluster.admin(0, Method::GET, "/readyz").send().await;
    assert_eq!(reply.status, 200, "{:?}", reply.text());
    assert!(
        reply.text().contains("degraded") && reply.text().contains("redis store"),
        "{:?}",
        reply.text()
    );
    assert!(
        reply.text().contains("bus: nats connected"),
        "{:?}",
        reply.text()
    );
    stack.link.restore();
    eventually("/readyz says the store answers again", || async {
        let reply = stack.cluster.admin(0, Method::GET, "/readyz").send().await;
        reply.status == 200 && reply.text().starts_with("ready\n")
    })
    .await;
}

/// Fault test 6: Redis killed (SIGKILL) with fetches in flight and restarted empty on the same
/// port: the leases are gone, so each in-flight key is fetched at most once more (by whichever
/// replica takes the lease on the new server), and every client gets its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_empty_costs_at_most_one_more_fetch_per_key_in_flight() {
    let upstream = Upstream::start().await;
    let mut stack = Stack::start(upstream, "open").await;
    let keys = ["/inflight?k=1", "/inflight?k=2", "/inflight?k=3"];
    let hold = stack.upstream.hold("/inflight");
    let tasks: Vec<_> = keys
        .iter()
        .flat_map(|key| stack.cluster.spread(12, key))
        .map(|call| tokio::spawn(call.send()))
        .collect();
    for key in keys {
        stack.upstream.wait_for_hits(key, 1).await;
    }
    // Every replica's flight of every key has been told to wait (a warm-up acquire, and one
    // per key), and every request has joined one (each flight's own first caller is no follower).
    let replicas = stack.cluster.len();
    eventually(
        "every replica's flights wait on the leaders' leases",
        || async {
            let mut ready = true;
            for i in 0..replicas {
                let acquired = stack
                    .metric(
                        i,
                        "corral_store_operations_total",
                        "op=\"acquire\",result=\"ok\"",
                    )
                    .await;
                ready &= acquired >= 1.0 + keys.len() as f64;
            }
            ready
        },
    )
    .await;
    let joined = (keys.len() * (12 - replicas)) as f64;
    eventually("every request has joined a flight", || async {
        let mut waiting = 0.0;
        for i in 0..replicas {
            waiting += stack.metric(i, "corral_followers_waiting", "").await;
        }
        waiting >= joined
    })
    .await;

    stack.redis.restart().await;
    hold.release();
    let mut replies = Vec::new();
    for task in tasks {
        replies.push(task.await.expect("a request task"));
    }
    println!("killed and restarted: {:?}", tally(&replies));
    for (i, reply) in replies.iter().enumerate() {
        assert_eq!(reply.status, 200, "request {i}: {:?}", reply.text());
        assert!(
            reply.took <= WAIT_TIMEOUT + SLACK,
            "request {i}: {:?}",
            reply.took
        );
    }
    for key in keys {
        let fetched = stack.upstream.hits(key);
        assert!(
            fetched <= 2,
            "{key}: {fetched} fetches; one in flight at the kill and at most one more"
        );
    }
    // The new server is used at once.
    let fresh = "/fresh?k=1";
    let replies = send_all(stack.cluster.spread(9, fresh)).await;
    assert!(replies.iter().all(|reply| reply.status == 200));
    assert_eq!(stack.upstream.hits(fresh), 1, "{fresh}: one fetch");
}

/// The bus down (NATS killed): followers on other replicas still get the leader's answer, by their
/// safety poll, and `/readyz` stays 200 reporting the bus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_bus_down_followers_are_answered_by_their_poll_and_readyz_reports_it() {
    let upstream = Upstream::start().await.slow("/", 300 * MS);
    let mut stack = Stack::start(upstream, "open").await;
    stack.nats.kill();
    eventually("/readyz reports the bus down", || async {
        let reply = stack.cluster.admin(1, Method::GET, "/readyz").send().await;
        reply.status == 200 && reply.text().contains("bus: nats disconnected")
    })
    .await;
    let key = "/nobus?k=1";
    let replies = send_all(stack.cluster.spread(12, key)).await;
    println!("bus down: {:?}", tally(&replies));
    for (i, reply) in replies.iter().enumerate() {
        assert_eq!(reply.status, 200, "request {i}: {:?}", reply.text());
        assert!(
            !reply.cache_status().contains("store-unavailable"),
            "request {i}: {:?}",
            reply.cache_status()
        );
        // A fetch, then at most one jittered poll (500 ms + 20%) for the followers.
        assert!(reply.took <= WAIT_TIMEOUT, "request {i}: {:?}", reply.took);
    }
    assert_eq!(
        stack.upstream.hits(key),
        1,
        "{key}: one fetch without the bus"
    );
    let mut rechecks = 0.0;
    for i in 0..stack.cluster.len() {
        rechecks += stack
            .metric(i, "corral_poll_rechecks_total", "found=\"true\"")
            .await;
    }
    assert!(rechecks >= 1.0, "the followers were answered by their poll");
}
