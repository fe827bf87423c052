//! Faults of the leader: three replicas on a real Redis store and NATS bus whose leader dies
//! (SIGKILL), freezes (SIGSTOP) past its lease, or has its lease taken from under it, while the
//! upstream holds its fetch.
//!
//! What these hold the code to: coalescing is an efficiency lease, not mutual exclusion. A lost
//! lease costs at most one extra upstream fetch, and another replica takes over within one
//! `lease_ttl` (plus one poll); the old leader's late commit is refused by the store, so what is
//! stored is the new leader's answer; nobody is served a partial or wrong body, and nobody waits
//! past their deadline.

use crate::support;

use std::time::Duration;

use redis::AsyncCommands;
use support::http::{Http, Reply};
use support::process::{ServeReplicas, metric_sum};
use support::proxy::{ProxyCluster, fill};
use support::upstream::Upstream;
use support::{TestNats, TestRedis, eventually, stale};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The admin token of the configs.
const TOKEN: &str = "secret";

/// `lease_ttl` of [`PROCESSES`].
const LEASE_TTL: Duration = Duration::from_secs(2);

/// `poll_interval` of [`PROCESSES`]; a wait re-checks after it, give or take 20%.
const POLL: Duration = Duration::from_millis(500);

/// `wait_timeout` of [`PROCESSES`].
const WAIT_TIMEOUT: Duration = Duration::from_secs(8);

/// Allowance past a bound for scheduling and loopback on a loaded machine.
const SLACK: Duration = Duration::from_secs(1);

/// Three `corral serve` processes' config: `{{listen}}` and `{{admin}}` are each process's own.
const PROCESSES: &str = r#"
listen: {{listen}}
admin: { listen: {{admin}}, token: secret }
namespace: leader
store: { kind: redis, url: "{{redis}}" }
bus: { kind: nats, url: "{{nats}}" }
defaults: { ttl: 60s, wait_timeout: 8s, lease_ttl: 2s, poll_interval: 500ms, max_body: 1MiB, pass_ttl: 2s, max_fetch: 20s }
routes:
  - name: all
    match: { path_prefix: / }
    upstream: {{upstream}}
    key: { query: all }
"#;

/// The longest a takeover may take once the leader stopped renewing: its lease runs out (at most
/// `lease_ttl`), and a follower looks again at the expiry the store told it or at its next poll.
fn takeover_bound() -> Duration {
    LEASE_TTL + POLL.mul_f64(1.2) + SLACK
}

/// Real processes on a fresh Redis and NATS in front of `upstream`.
struct Processes {
    replicas: ServeReplicas,
    _redis: TestRedis,
    _nats: TestNats,
}

async fn processes(upstream: &Upstream) -> Processes {
    let (redis, nats) = tokio::join!(TestRedis::start(), TestNats::start());
    let yaml = fill(
        PROCESSES,
        &[
            ("redis", &redis.url()),
            ("nats", &nats.url()),
            ("upstream", &upstream.url()),
        ],
    );
    let replicas = ServeReplicas::start(3, &yaml).await;
    Processes {
        replicas,
        _redis: redis,
        _nats: nats,
    }
}

/// `n` GETs of `url` sent to the server at `base`, each on its own task: its result and how long
/// it took.
fn send(
    http: &Http,
    base: &str,
    url: &str,
    n: usize,
) -> Vec<JoinHandle<(Result<Reply, String>, Duration)>> {
    (0..n)
        .map(|_| {
            let call = http.get(format!("{base}{url}"));
            tokio::spawn(async move {
                let began = Instant::now();
                let result = call.try_send().await;
                (result, began.elapsed())
            })
        })
        .collect()
}

async fn collect(
    tasks: Vec<JoinHandle<(Result<Reply, String>, Duration)>>,
) -> Vec<(Result<Reply, String>, Duration)> {
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(task.await.expect("a request task"));
    }
    out
}

type Sent = Vec<JoinHandle<(Result<Reply, String>, Duration)>>;

/// Five GETs of `url` to replica 0, which leads the fetch (the upstream holds it), then ten to each
/// of replicas 1 and 2, once all of them wait as followers: the leader's requests and the
/// followers'.
async fn leader_and_followers(
    http: &Http,
    stack: &Processes,
    upstream: &Upstream,
    url: &str,
) -> (Sent, Sent) {
    let leader = send(http, &stack.replicas[0].url(), url, 5);
    upstream.wait_for_hits(url, 1).await;
    let mut followers = Vec::new();
    for i in 1..3 {
        followers.extend(send(http, &stack.replicas[i].url(), url, 10));
        let replica = &stack.replicas[i];
        wait_for_followers(&format!("replica {i}'s requests wait"), 9.0, || {
            replica.metrics()
        })
        .await;
    }
    (leader, followers)
}

/// Waits for the second fetch of `url` and asserts it came within lease_ttl + one poll of the
/// leader's fault (`what` happened to it at `since`).
async fn assert_taken_over(upstream: &Upstream, url: &str, since: Instant, what: &str) {
    upstream.wait_for_hits(url, 2).await;
    let takeover = since.elapsed();
    println!(
        "leader {what}: another replica fetched {takeover:?} later (lease_ttl {LEASE_TTL:?}, poll {POLL:?})"
    );
    assert!(
        takeover <= takeover_bound(),
        "the takeover came {takeover:?} after the leader was {what}, past lease_ttl + one poll"
    );
}

/// Waits until `n` callers wait on a flight they did not start on the process whose metrics
/// `metrics` reads.
async fn wait_for_followers<F, Fut>(what: &str, n: f64, metrics: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = String>,
{
    eventually(what, || async {
        metric_sum(&metrics().await, "corral_followers_waiting", &[]) >= n
    })
    .await;
}

/// Asserts that every reply is a 200 with exactly `body`.
fn assert_all_served(replies: &[(Result<Reply, String>, Duration)], body: &str, who: &str) {
    for (i, (reply, took)) in replies.iter().enumerate() {
        let reply = reply
            .as_ref()
            .unwrap_or_else(|e| panic!("{who} {i}: no answer after {took:?}: {e}"));
        assert_eq!(reply.status, 200, "{who} {i}: {}", reply.text());
        assert_eq!(
            reply.text(),
            body,
            "{who} {i}: the whole body of the new leader's fetch"
        );
    }
}

// ------------------------------------------------------------------------- leader killed ----

/// Fault test 2: the leader process is SIGKILLed while the upstream holds its fetch. Another
/// replica takes over within one lease_ttl plus one poll; there are exactly two fetches; the dead
/// leader's clients get a closed connection, never a partial answer, and everyone else the new
/// fetch's whole body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_mid_fetch_is_replaced_within_one_lease_and_nothing_partial_is_served() {
    let upstream = Upstream::start().await.distinct_bodies("/held");
    let hold = upstream.hold("/held");
    let mut stack = processes(&upstream).await;
    let http = Http::new();
    let url = "/held?k=kill";

    let (doomed, followers) = leader_and_followers(&http, &stack, &upstream, url).await;

    stack.replicas[0].kill();
    let killed = Instant::now();
    assert_taken_over(&upstream, url, killed, "killed").await;
    hold.release();

    for (i, (reply, took)) in collect(doomed).await.into_iter().enumerate() {
        match reply {
            Err(error) => assert!(
                error.contains("request failed") || error.contains("reading the body failed"),
                "the killed leader's client {i}: {error} after {took:?}"
            ),
            Ok(reply) => panic!(
                "the killed leader's client {i} was answered {} {:?}",
                reply.status,
                reply.text()
            ),
        }
    }
    let followers = collect(followers).await;
    assert_all_served(&followers, &format!("response 2 for {url}"), "follower");
    assert_eq!(upstream.hits(url), 2, "one fetch per lease");

    let later = http
        .get(format!("{}{url}", stack.replicas[1].url()))
        .send()
        .await;
    assert_eq!(later.x_cache(), "HIT");
    assert_eq!(later.text(), format!("response 2 for {url}"));
    assert_eq!(upstream.hits(url), 2);
}

// ------------------------------------------------------------------------- leader paused ----

/// Fault test 3: the leader process is frozen (SIGSTOP) for two lease_ttls while the upstream
/// holds its fetch, then thawed. Another replica took over and stored its answer; the thawed
/// leader finds its lease gone (counted as lost or as a rejected commit) and stores nothing; its
/// own clients get an answer (their own fetch's whole body) or their deadline error, never a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_past_its_lease_is_replaced_and_its_late_commit_is_rejected() {
    let upstream = Upstream::start().await.distinct_bodies("/held");
    let hold = upstream.hold("/held");
    let mut stack = processes(&upstream).await;
    let http = Http::new();
    let url = "/held?k=pause";

    let (frozen, followers) = leader_and_followers(&http, &stack, &upstream, url).await;

    stack.replicas[0].pause();
    let paused = Instant::now();
    assert_taken_over(&upstream, url, paused, "paused").await;
    // Both fetches answer now: the frozen leader's answer waits in its socket until it thaws.
    hold.release();
    let followers = collect(followers).await;
    assert_all_served(&followers, &format!("response 2 for {url}"), "follower");

    // The fault's length is the point here, not a synchronisation: two lease_ttls frozen.
    tokio::time::sleep_until(paused + 2 * LEASE_TTL).await;
    stack.replicas[0].resume();

    for (i, (reply, took)) in collect(frozen).await.into_iter().enumerate() {
        let reply = reply.unwrap_or_else(|e| panic!("the thawed leader's client {i}: {e}"));
        assert!(
            took <= WAIT_TIMEOUT + 2 * SLACK,
            "the thawed leader's client {i} was answered after {took:?}, past wait_timeout"
        );
        match reply.status.as_u16() {
            // Its own fetch, whole: a lost lease still answers the process's own callers.
            200 => assert_eq!(reply.text(), format!("response 1 for {url}"), "client {i}"),
            504 => {}
            other => panic!("the thawed leader's client {i}: {other} {:?}", reply.text()),
        }
    }
    let leader = &stack.replicas[0];
    eventually("the thawed leader counts its lease as lost", || async {
        let text = leader.metrics().await;
        metric_sum(&text, "corral_lease_events_total", &["event=\"lost\""])
            + metric_sum(
                &text,
                "corral_lease_events_total",
                &["event=\"commit_rejected\""],
            )
            >= 1.0
    })
    .await;

    // What is stored is the new leader's answer, on every replica, the thawed one included.
    for i in 0..3 {
        let reply = http
            .get(format!("{}{url}", stack.replicas[i].url()))
            .send()
            .await;
        assert_eq!(reply.x_cache(), "HIT", "replica {i}");
        assert_eq!(reply.text(), format!("response 2 for {url}"), "replica {i}");
    }
    assert_eq!(upstream.hits(url), 2, "one fetch per lease");
}

// ------------------------------------------------------------------------- lease stolen ----

/// In-process replicas whose lease is long (renewals every 10 s never come during the test), so
/// that the old leader learns of its stolen lease from its commit.
const STOLEN: &str = r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0, token: secret }
namespace: stolen
store: { kind: redis, url: "{{redis}}" }
bus: { kind: nats, url: "{{nats}}" }
defaults: { ttl: 60s, wait_timeout: 8s, lease_ttl: 30s, poll_interval: 300ms, max_body: 1MiB, pass_ttl: 2s, max_fetch: 20s }
routes:
  - name: all
    match: { path_prefix: / }
    upstream: {{upstream}}
    key: { query: all }
"#;

/// The sum of one metric series over every replica of an in-process cluster.
async fn cluster_metric(cluster: &ProxyCluster, i: usize, name: &str, labels: &[&str]) -> f64 {
    let text = cluster
        .admin(i, http::Method::GET, "/metrics")
        .send()
        .await
        .text();
    metric_sum(&text, name, labels)
}

/// Fault test 4: the lease key is deleted from Redis while the upstream holds the leader's fetch
/// (as an expiry the leader did not notice would). A follower takes over at its next poll; the
/// old leader's commit is rejected by the store and counted; its own clients still get its answer;
/// what is stored is the new leader's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_stolen_mid_fetch_is_taken_over_and_the_old_commit_is_rejected() {
    let upstream = Upstream::start().await.distinct_bodies("/held");
    let hold = upstream.hold("/held");
    let cluster =
        ProxyCluster::with_redis_nats(3, &fill(STOLEN, &[("upstream", &upstream.url())])).await;
    let url = "/held?k=stolen";

    let own: Vec<_> = (0..3)
        .map(|_| tokio::spawn(cluster.get(0, url).send()))
        .collect();
    upstream.wait_for_hits(url, 1).await;
    let followers: Vec<_> = (0..10)
        .map(|n| tokio::spawn(cluster.get(1 + n % 2, url).send()))
        .collect();
    eventually("the followers wait", || async {
        cluster_metric(&cluster, 1, "corral_followers_waiting", &[]).await
            + cluster_metric(&cluster, 2, "corral_followers_waiting", &[]).await
            >= 8.0
    })
    .await;

    let lease = format!(
        "{}:l",
        stale::value_key(&cluster, "stolen", TOKEN, url).await
    );
    let deleted: u64 = cluster
        .redis()
        .client()
        .await
        .del(&lease)
        .await
        .expect("DEL");
    assert_eq!(deleted, 1, "the leader's lease was in the store");
    let stolen = Instant::now();
    upstream.wait_for_hits(url, 2).await;
    let takeover = stolen.elapsed();
    println!("lease stolen: another replica fetched {takeover:?} later (poll 300ms)");
    // One poll (300 ms, give or take 20%) with room for a loaded machine, far below the 30 s
    // lease a follower would otherwise wait out.
    assert!(
        takeover <= Duration::from_millis(360) + 3 * SLACK,
        "the takeover came {takeover:?} after the lease was gone, past one poll"
    );
    hold.release();

    for (i, task) in followers.into_iter().enumerate() {
        let reply = task.await.expect("a follower");
        assert_eq!(reply.status, 200, "follower {i}");
        assert_eq!(
            reply.text(),
            format!("response 2 for {url}"),
            "follower {i}"
        );
    }
    for (i, task) in own.into_iter().enumerate() {
        let reply = task.await.expect("an old leader's client");
        assert_eq!(reply.status, 200, "the old leader's client {i}");
        assert_eq!(
            reply.text(),
            format!("response 1 for {url}"),
            "the old leader's client {i} gets its own fetch, whole"
        );
    }
    assert_eq!(
        cluster_metric(
            &cluster,
            0,
            "corral_lease_events_total",
            &["event=\"commit_rejected\""]
        )
        .await,
        1.0,
        "the old leader's commit was rejected and counted"
    );
    for i in [0, 2] {
        let reply = cluster.get(i, url).send().await;
        assert_eq!(reply.x_cache(), "HIT", "replica {i}");
        assert_eq!(reply.text(), format!("response 2 for {url}"), "replica {i}");
    }
    assert_eq!(upstream.hits(url), 2, "one fetch per lease");
}
