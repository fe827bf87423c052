//! Faults of the bus: three replicas on a real Redis store whose NATS bus loses the one READY
//! event of a fill (a fault proxy holds every NATS connection silent while it is sent), or is
//! killed outright.
//!
//! What these hold the code to: events make followers prompt, but correctness never rests on them.
//! A lost event costs a follower at most one poll interval after the value is stored; with no bus
//! at all, the store still coalesces (one fetch) and followers finish within the fetch time plus
//! one poll.

use crate::support;

use std::time::Duration;

use support::fault::{Fault, FaultProxy};
use support::http::Reply;
use support::process::metric_sum;
use support::proxy::{ProxyCluster, fill};
use support::upstream::Upstream;
use support::{TestNats, TestRedis, eventually};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// `poll_interval` of [`CONFIG`]; each wait re-checks after it, give or take 20%.
const POLL: Duration = Duration::from_millis(500);

/// Allowance past a bound for scheduling and loopback on a loaded machine; still far below what
/// the failures guarded against cost (a wait until the 10 s lease expires, or until the deadline).
const SLACK: Duration = Duration::from_secs(2);

/// The lease (10 s) is far longer than the poll, so a follower that is not woken by an event is
/// woken by the poll, not by the lease's expiry.
const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0, token: secret }
namespace: busfaults
store: { kind: redis, url: "{{redis}}" }
bus: { kind: nats, url: "{{nats}}" }
defaults: { ttl: 60s, wait_timeout: 10s, lease_ttl: 10s, poll_interval: 500ms, max_body: 1MiB, pass_ttl: 2s, max_fetch: 8s }
routes:
  - name: all
    match: { path_prefix: / }
    upstream: {{upstream}}
    key: { query: all }
"#;

/// The longest a follower may take after the value is stored when no event reaches it.
fn one_poll() -> Duration {
    POLL.mul_f64(1.2) + SLACK
}

/// One series summed over every replica.
async fn metric(cluster: &ProxyCluster, name: &str, labels: &[&str]) -> f64 {
    let mut sum = 0.0;
    for i in 0..cluster.len() {
        let text = cluster
            .admin(i, http::Method::GET, "/metrics")
            .send()
            .await
            .text();
        sum += metric_sum(&text, name, labels);
    }
    sum
}

/// One request per replica for a throwaway key, so every connection is open before a fault.
async fn warm(cluster: &ProxyCluster) {
    for i in 0..cluster.len() {
        let reply = cluster.get(i, &format!("/warm?replica={i}")).send().await;
        assert_eq!(reply.status, 200, "warming replica {i}");
    }
}

/// Spawns the calls; each task answers its reply and the instant it was complete.
fn spawn_all(calls: Vec<support::http::Call>) -> Vec<JoinHandle<(Reply, Instant)>> {
    calls
        .into_iter()
        .map(|call| {
            tokio::spawn(async move {
                let reply = call.send().await;
                (reply, Instant::now())
            })
        })
        .collect()
}

/// Fault test 7: every replica's NATS connection goes through a fault proxy, which holds all
/// traffic silent from just before the upstream answers until every follower is done: the one
/// READY event of the fill reaches nobody. Followers on the other replicas find the value at their
/// next poll: each is answered within one poll interval of the fetch returning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_ready_event_costs_followers_at_most_one_poll() {
    const REQUESTS: usize = 30;
    let upstream = Upstream::start().await;
    let (redis, nats) = tokio::join!(TestRedis::start(), TestNats::start());
    let link = FaultProxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], nats.port()))).await;
    let yaml = fill(
        CONFIG,
        &[
            ("redis", &redis.url()),
            ("nats", &format!("nats://{}", link.addr())),
            ("upstream", &upstream.url()),
        ],
    );
    let cluster = ProxyCluster::start(3, &yaml, None).await;
    warm(&cluster).await;
    let url = "/dropped?k=1";
    let hold = upstream.hold("/dropped");

    let tasks = spawn_all(cluster.spread(REQUESTS, url));
    upstream.wait_for_hits(url, 1).await;
    let joined = (REQUESTS - cluster.len()) as f64;
    eventually("every request has joined a flight", || async {
        metric(&cluster, "corral_followers_waiting", &[]).await >= joined
    })
    .await;
    let rechecks_before = metric(&cluster, "corral_poll_rechecks_total", &["found=\"true\""]).await;

    link.set(Fault::BlackHole);
    let released = Instant::now();
    hold.release();
    let mut after = Vec::with_capacity(REQUESTS);
    for task in tasks {
        let (reply, done) = task.await.expect("a request task");
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.text(), format!("upstream body for {url}"));
        after.push(done - released);
    }
    link.restore();
    after.sort();
    println!(
        "READY dropped, poll {POLL:?}: answered after the fetch returned: min {:?}, median {:?}, max {:?}",
        after[0],
        after[after.len() / 2],
        after[after.len() - 1]
    );
    assert!(
        after[after.len() - 1] <= one_poll(),
        "a follower was answered {:?} after the fetch returned, past one poll",
        after[after.len() - 1]
    );
    assert_eq!(upstream.hits(url), 1, "one fetch");
    let rechecks = metric(&cluster, "corral_poll_rechecks_total", &["found=\"true\""]).await;
    assert!(
        rechecks - rechecks_before >= 1.0,
        "a poll found the value: the followers were not woken by the dropped event"
    );
}

/// Fault test 7: NATS is killed; the store alone still coalesces a burst into one fetch, and every
/// request is answered within the fetch time plus one poll interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_bus_killed_followers_finish_within_the_fetch_plus_one_poll() {
    const REQUESTS: usize = 30;
    const FETCH: Duration = Duration::from_millis(300);
    let upstream = Upstream::start().await.slow("/nobus", FETCH);
    let (redis, mut nats) = tokio::join!(TestRedis::start(), TestNats::start());
    let yaml = fill(
        CONFIG,
        &[
            ("redis", &redis.url()),
            ("nats", &nats.url()),
            ("upstream", &upstream.url()),
        ],
    );
    let cluster = ProxyCluster::start(3, &yaml, None).await;
    warm(&cluster).await;
    nats.kill();
    eventually("every replica sees its bus gone", || async {
        metric(&cluster, "corral_bus_connected", &[]).await == 0.0
    })
    .await;

    let url = "/nobus?k=1";
    let began = Instant::now();
    let tasks = spawn_all(cluster.spread(REQUESTS, url));
    let mut took = Vec::with_capacity(REQUESTS);
    for task in tasks {
        let (reply, done) = task.await.expect("a request task");
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.text(), format!("upstream body for {url}"));
        took.push(done - began);
    }
    took.sort();
    println!(
        "bus killed, fetch {FETCH:?}, poll {POLL:?}: answered after min {:?}, median {:?}, max {:?}",
        took[0],
        took[took.len() / 2],
        took[took.len() - 1]
    );
    assert!(
        took[took.len() - 1] <= FETCH + one_poll(),
        "a request took {:?}, past the fetch plus one poll",
        took[took.len() - 1]
    );
    assert_eq!(upstream.hits(url), 1, "the store alone still coalesces");
}
