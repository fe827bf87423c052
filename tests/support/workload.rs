//! A short run that makes every outcome and every engine event a dashboard shows happen, on three
//! replicas over a real Redis store and NATS bus, checking each answer as it goes.
//!
//! ```ignore
//! let work = Workload::start().await;
//! work.run().await;      // a few seconds
//! let text = work.scrape(1).await;
//! ```
//!
//! What [`Workload::run`] does, route by route (the counts are what `/metrics` must show, summed
//! over the replicas):
//!
//! | route | requests | outcome | upstream fetches |
//! |---|---|---|---|
//! | `reports` | 300 at once for one key, spread over the replicas | 1 miss, 299 coalesced or hit | 1 (2xx) |
//! | `reports` | 3 more, one per replica | 3 hits (each from the replica's L1) | 0 |
//! | `reports` | 1 with `Authorization` | 1 bypass | 1 (2xx) |
//! | `private` | 2, answered with `Set-Cookie` | 2 pass (the second by the hit-for-pass marker) | 2 (2xx) |
//! | `broken` | 1, answered 500 | 1 error | 1 (5xx) |
//! | `live` | 2 on a route with `cache: false` | 2 bypass | 2 (2xx) |
//! | `slow` | 2 at once, past a 300ms wait timeout | 2 error (504), 2 wait timeouts | 1 (2xx), finishing after the callers left |
//! | `takeover` | 1 whose fetch overruns `max_fetch` on replica 0, 1 waiting on replica 1 | 1 error (504), 1 miss | 1 (2xx) counted: the overrun one is cancelled before its answer |
//! | `purged` | 1 whose key is purged while it is fetched | 1 miss | 1 (2xx) |
//! | `stale` | 1 on replica 0, then 3 (one per replica) once it is stale, while its refresh is held | 1 miss, 3 stale | 2 (2xx): the fill and 1 background refresh, stored |
//!
//! and on the leases: 9 acquired (the refresh's included), 1 taken over (replica 1), 1 abandoned
//! (replica 0), 1 commit rejected (replica 2), at least 1 renewed (replica 0, during the
//! overrun), none lost.

use std::time::Duration;

use http::Method;

use super::eventually;
use super::http::send_all;
use super::proxy::{ProxyCluster, fill};
use super::stale::wait_until_stale;
use super::upstream::Upstream;

const MS: Duration = Duration::from_millis(1);

/// The admin token of the workload's config.
pub const TOKEN: &str = "secret";

/// The namespace of the workload's config, which prefixes every Redis key.
const NS: &str = "observed";

/// Requests in the burst for one key.
pub const BURST: usize = 300;

/// The routes of the workload's config, in order.
pub const ROUTES: [&str; 8] = [
    "reports", "private", "broken", "live", "slow", "takeover", "purged", "stale",
];

/// Every route in front of `{{upstream}}`, each tuned to produce one outcome. The store's timeout
/// is raised from its 50 ms default: the run asserts that no store call timed out, and on two
/// loaded cores a 50 ms stall is not an outage.
const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0, token: secret }
namespace: observed
store: { kind: redis, url: "{{redis}}", timeout: 1s }
bus: { kind: nats, url: "{{nats}}" }
defaults: { ttl: 60s, wait_timeout: 5s, lease_ttl: 5s, poll_interval: 1s, pass_ttl: 30s }
routes:
  - name: reports
    match: { path_prefix: /reports }
    upstream: {{upstream}}
  - name: private
    match: { path_prefix: /private }
    upstream: {{upstream}}
  - name: broken
    match: { path_prefix: /broken }
    upstream: {{upstream}}
  - name: live
    match: { path_prefix: /live }
    upstream: {{upstream}}
    cache: false
  - name: slow
    match: { path_prefix: /slow }
    upstream: {{upstream}}
    wait_timeout: 300ms
  - name: takeover
    match: { path_prefix: /takeover }
    upstream: {{upstream}}
    max_fetch: 3s
    lease_ttl: 3s
    poll_interval: 200ms
  - name: purged
    match: { path_prefix: /purged }
    upstream: {{upstream}}
    lease_ttl: 10s
  - name: stale
    match: { path_prefix: /stale }
    upstream: {{upstream}}
    ttl: 1s
    honor_cache_control: false
    stale_while_revalidate: 1h
"#;

/// An upstream and three replicas in front of it, ready to run the workload.
pub struct Workload {
    pub upstream: Upstream,
    pub proxy: ProxyCluster,
}

impl Workload {
    /// Starts the upstream, a fresh Redis and NATS, and three replicas on them.
    pub async fn start() -> Workload {
        let upstream = Upstream::start()
            .await
            .slow("/reports", 300 * MS)
            .header("/private", "set-cookie", "session={n}")
            .status("/broken", 500)
            .slow("/slow", 1500 * MS)
            .distinct_bodies("/stale");
        let yaml = fill(CONFIG, &[("upstream", &upstream.url())]);
        let proxy = ProxyCluster::with_redis_nats(3, &yaml).await;
        Workload { upstream, proxy }
    }

    /// Replica `i`'s `/metrics`, as text.
    pub async fn scrape(&self, i: usize) -> String {
        let reply = self.proxy.admin(i, Method::GET, "/metrics").send().await;
        assert_eq!(reply.status, 200, "GET /metrics on replica {i}");
        reply.text()
    }

    /// Runs every scenario in turn (a few seconds), then waits until no flight is left running.
    pub async fn run(&self) {
        self.burst().await;
        self.private_and_bypassed().await;
        self.wait_timeouts().await;
        self.takeover().await;
        self.rejected_commit().await;
        self.stale_while_revalidate().await;
        self.settle().await;
    }

    /// 300 requests for one key over three replicas: one fetch; then one hit per replica.
    async fn burst(&self) {
        let (proxy, upstream) = (&self.proxy, &self.upstream);
        let replies = send_all(proxy.spread(BURST, "/reports/q1")).await;
        let count = |x_cache: &str| replies.iter().filter(|r| r.x_cache() == x_cache).count();
        assert!(
            replies.iter().all(|r| r.status == 200),
            "every burst answer is 200"
        );
        assert_eq!(count("MISS"), 1, "one request fetched");
        assert_eq!(count("COALESCED") + count("HIT"), BURST - 1);
        assert_eq!(upstream.hits("/reports/q1"), 1, "one upstream fetch");
        for i in 0..proxy.len() {
            let reply = proxy.get(i, "/reports/q1").send().await;
            assert_eq!(reply.x_cache(), "HIT", "replica {i} answers from its L1");
        }
        let bypassed = proxy
            .get(0, "/reports/q1")
            .header("authorization", "Bearer someone")
            .send()
            .await;
        assert_eq!(bypassed.x_cache(), "BYPASS");
        assert_eq!(upstream.hits("/reports/q1"), 2);
    }

    /// Answers that may not be shared (PASS), an upstream 500 (error), an uncached route (BYPASS).
    async fn private_and_bypassed(&self) {
        let proxy = &self.proxy;
        for i in [1, 2] {
            let reply = proxy.get(i, "/private/a").send().await;
            assert_eq!(reply.x_cache(), "PASS", "Set-Cookie is never shared");
        }
        let broken = proxy.get(0, "/broken/a").send().await;
        assert_eq!(broken.status, 500);
        for i in [1, 2] {
            let reply = proxy.get(i, "/live/a").send().await;
            assert_eq!(reply.x_cache(), "BYPASS");
        }
    }

    /// Two requests on two replicas give up waiting for a 1.5s fetch after 300ms; the fetch goes
    /// on and fills the cache.
    async fn wait_timeouts(&self) {
        let proxy = &self.proxy;
        let replies = send_all([proxy.get(0, "/slow/a"), proxy.get(1, "/slow/a")]).await;
        for reply in &replies {
            assert_eq!(reply.status, 504, "{:?}", reply.text());
            assert!(reply.cache_status().contains("detail=wait-timeout"));
        }
    }

    /// Replica 0's fetch overruns `max_fetch` while replica 1 waits on its lease; replica 1 takes
    /// the lease over and fetches.
    async fn takeover(&self) {
        let (proxy, upstream) = (&self.proxy, &self.upstream);
        let hold = upstream.hold("/takeover");
        let first = tokio::spawn(proxy.get(0, "/takeover/a").send());
        upstream.wait_for_hits("/takeover/a", 1).await;
        let second = tokio::spawn(proxy.get(1, "/takeover/a").send());
        // A timer re-check that found the lease still held proves replica 1 is waiting on it.
        eventually("replica 1 waits on replica 0's lease", || async {
            sample(
                &self.scrape(1).await,
                "corral_poll_rechecks_total",
                &[("found", "false")],
            ) >= 1.0
        })
        .await;
        upstream.wait_for_hits("/takeover/a", 2).await;
        hold.release();
        let (first, second) = (joined(first).await, joined(second).await);
        assert_eq!(first.status, 504, "the overrun fetch: {:?}", first.text());
        assert!(first.cache_status().contains("detail=max-fetch"));
        assert_eq!((second.status.as_u16(), second.x_cache()), (200, "MISS"));
    }

    /// A purge while replica 2 fetches steals its lease: the fetch answers its own client, and its
    /// commit is rejected.
    async fn rejected_commit(&self) {
        let (proxy, upstream) = (&self.proxy, &self.upstream);
        let hold = upstream.hold("/purged");
        let fetching = tokio::spawn(proxy.get(2, "/purged/a").send());
        upstream.wait_for_hits("/purged/a", 1).await;
        let purged = proxy.purge(0, TOKEN, "/purged/a").await;
        assert_eq!(purged.status, 200, "{:?}", purged.text());
        hold.release();
        let reply = joined(fetching).await;
        assert_eq!((reply.status.as_u16(), reply.x_cache()), (200, "MISS"));
    }

    /// Once `/stale/a` is past its 1s freshness, one request per replica is answered from the
    /// stored copy at once while the one background refresh they started is held at the
    /// upstream; released, that refresh is stored.
    async fn stale_while_revalidate(&self) {
        let (proxy, upstream) = (&self.proxy, &self.upstream);
        let first = proxy.get(0, "/stale/a").send().await;
        assert_eq!((first.status.as_u16(), first.x_cache()), (200, "MISS"));
        wait_until_stale(proxy, NS, TOKEN, "/stale/a").await;
        let hold = upstream.hold("/stale");
        let replies = send_all((0..proxy.len()).map(|i| proxy.get(i, "/stale/a"))).await;
        for reply in &replies {
            assert_eq!((reply.status.as_u16(), reply.x_cache()), (200, "STALE"));
            assert_eq!(reply.text(), first.text(), "the stored answer");
        }
        upstream.wait_for_hits("/stale/a", 2).await;
        hold.release();
        eventually("the background refresh is stored", || async {
            let mut stored = 0.0;
            for i in 0..proxy.len() {
                stored += sample(
                    &self.scrape(i).await,
                    "corral_background_refreshes_total",
                    &[("route", "stale"), ("result", "stored")],
                );
            }
            stored == 1.0
        })
        .await;
        assert_eq!(upstream.hits("/stale/a"), 2, "one refresh cluster-wide");
    }

    /// Waits until the slow fetch has finished and no replica has a flight left.
    async fn settle(&self) {
        eventually(
            "every flight has ended and the slow fetch was counted",
            || async {
                let mut fetched = 0.0;
                for i in 0..self.proxy.len() {
                    let text = self.scrape(i).await;
                    if sample(&text, "corral_flights_inflight", &[]) != 0.0 {
                        return false;
                    }
                    fetched += sample(
                        &text,
                        "corral_upstream_requests_total",
                        &[("route", "slow"), ("status_class", "2xx")],
                    );
                }
                fetched == 1.0
            },
        )
        .await;
    }
}

async fn joined<T>(task: tokio::task::JoinHandle<T>) -> T {
    match task.await {
        Ok(value) => value,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(error) => panic!("a request task was cancelled: {error}"),
    }
}

// ------------------------------------------------------------------ the text format ----

/// One sample of the Prometheus text format.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, if the sample has it.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(label, _)| label == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Parses the Prometheus text format (comments skipped); panics, naming the line, on a sample
/// line it cannot read.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.trim().is_empty() && !line.starts_with('#'))
        .map(|line| parse_line(line).unwrap_or_else(|| panic!("unreadable sample line: {line:?}")))
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().ok()?,
    };
    let Some((name, rest)) = series.split_once('{') else {
        return Some(Sample {
            name: series.to_owned(),
            labels: Vec::new(),
            value,
        });
    };
    let mut labels = Vec::new();
    let mut rest = rest.strip_suffix('}')?;
    while !rest.is_empty() {
        let (label, after) = rest.split_once("=\"")?;
        let mut text = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()?.1 {
                    'n' => text.push('\n'),
                    escaped => text.push(escaped),
                },
                (at, '"') => break at,
                (_, c) => text.push(c),
            }
        };
        labels.push((label.to_owned(), text));
        rest = after[end + 1..].trim_start_matches(',');
    }
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// The sum of every sample of `name` whose labels include all of `labels` (0 when none matches).
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    parse(text)
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(v)))
        .map(|s| s.value)
        .sum()
}
