//! A hot key crossing its expiry under steady load: three replicas on a real Redis store and NATS
//! bus, requests on every replica every 50 ms for a few expiries, on a route without freshness
//! features (each expiry is one MISS fill), with stale-while-revalidate, and with early refresh.
//!
//! What this holds the code to: one upstream fetch per expiry across every replica, never two for
//! one expiry, and no fetch whose answer nobody was served.

use crate::support;

use std::collections::HashSet;
use std::time::Duration;

use support::http::send_all;
use support::proxy::{ProxyCluster, fill};
use support::upstream::Upstream;
use tokio::time::Instant;

/// `ttl` of every route of [`CONFIG`].
const TTL: Duration = Duration::from_secs(1);

/// How long each upstream fetch takes.
const FETCH: Duration = Duration::from_millis(100);

const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0, token: secret }
namespace: expiry
store: { kind: redis, url: "{{redis}}" }
bus: { kind: nats, url: "{{nats}}" }
defaults: { ttl: 1s, wait_timeout: 10s, lease_ttl: 5s, poll_interval: 1s, honor_cache_control: false }
routes:
  - name: plain
    match: { path_prefix: /plain }
    upstream: {{upstream}}
  - name: swr
    match: { path_prefix: /swr }
    upstream: {{upstream}}
    stale_while_revalidate: 1h
  - name: early
    match: { path_prefix: /early }
    upstream: {{upstream}}
    early_refresh: 1
    stale_while_revalidate: 1h
"#;

/// One hot key per route, how its answers may be marked once it was first filled, and the least
/// time between two of its fetches that still means "one per expiry".
struct Hot {
    url: &'static str,
    marks: &'static [&'static str],
    min_gap: Duration,
}

const HOT: [Hot; 3] = [
    // Each expiry: the value leaves the store, one replica fills it (MISS), the rest wait for it.
    Hot {
        url: "/plain/hot",
        marks: &["HIT", "MISS", "COALESCED"],
        // Fetched no sooner than TTL after the previous value was stored.
        min_gap: Duration::from_millis(900),
    },
    // Each expiry: the stored copy is served while one refresh runs; nobody waits.
    Hot {
        url: "/swr/hot",
        marks: &["HIT", "STALE"],
        min_gap: Duration::from_millis(900),
    },
    // Early refresh starts a refresh shortly before the expiry (by chance, weighted by how long a
    // fetch takes), so two refreshes may come a little less than one TTL apart, never close
    // together.
    Hot {
        url: "/early/hot",
        marks: &["HIT", "STALE"],
        min_gap: Duration::from_millis(250),
    },
];

/// Fault test 10: for 3.5 s (three and a half expiries), every 50 ms, one request per replica for
/// each hot key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_crossing_expiry_under_load_is_fetched_once_per_expiry() {
    const ROUNDS: usize = 70;
    const PACE: Duration = Duration::from_millis(50);
    let upstream = Upstream::start()
        .await
        .distinct_bodies("/")
        .slow("/", FETCH);
    let cluster =
        ProxyCluster::with_redis_nats(3, &fill(CONFIG, &[("upstream", &upstream.url())])).await;
    let mut served: Vec<HashSet<String>> = vec![HashSet::new(); HOT.len()];
    for (hot, served) in HOT.iter().zip(&mut served) {
        let first = cluster.get(0, hot.url).send().await;
        assert_eq!(first.x_cache(), "MISS", "{}", hot.url);
        served.insert(first.text());
    }

    let began = Instant::now();
    for round in 0..ROUNDS {
        let calls = HOT
            .iter()
            .flat_map(|hot| (0..cluster.len()).map(|i| cluster.get(i, hot.url)));
        let replies = send_all(calls).await;
        for (n, reply) in replies.iter().enumerate() {
            let (hot, replica) = (&HOT[n / cluster.len()], n % cluster.len());
            assert_eq!(
                reply.status, 200,
                "{} round {round} replica {replica}",
                hot.url
            );
            assert!(
                hot.marks.contains(&reply.x_cache()),
                "{} round {round} replica {replica}: {}",
                hot.url,
                reply.x_cache()
            );
            served[n / cluster.len()].insert(reply.text());
        }
        tokio::time::sleep(PACE).await;
    }
    let elapsed = began.elapsed();

    for (hot, served) in HOT.iter().zip(&served) {
        let fetches = upstream.requests_for(hot.url);
        let gaps: Vec<Duration> = fetches.windows(2).map(|w| w[1].at - w[0].at).collect();
        println!(
            "{}: {} fetches in {elapsed:?} of load (ttl {TTL:?}), {} answers told apart; gaps {gaps:?}",
            hot.url,
            fetches.len(),
            served.len()
        );
        // At least two expiries crossed; no more fetches than expiries fit in the run.
        assert!(
            fetches.len() >= 3,
            "{}: {} fetches in {elapsed:?}: the value was not refetched across its expiries",
            hot.url,
            fetches.len()
        );
        let most = (elapsed.as_secs_f64() / hot.min_gap.as_secs_f64()).ceil() as usize + 1;
        assert!(
            fetches.len() <= most,
            "{}: {} fetches",
            hot.url,
            fetches.len()
        );
        for (pair, gap) in fetches.windows(2).zip(&gaps) {
            assert!(
                *gap >= hot.min_gap,
                "{}: fetches {} and {} came {gap:?} apart: two fetches for one expiry",
                hot.url,
                pair[0].seq,
                pair[1].seq
            );
        }
        // Every fetch but possibly the last (still running, or stored after the last round) was
        // served to someone.
        let wasted: Vec<u64> = fetches[..fetches.len() - 1]
            .iter()
            .filter(|fetch| !served.contains(&format!("response {} for {}", fetch.seq, hot.url)))
            .map(|fetch| fetch.seq)
            .collect();
        assert!(
            wasted.is_empty(),
            "{}: fetches {wasted:?} were answered to nobody",
            hot.url
        );
    }
    assert!(elapsed >= ROUNDS as u32 * PACE, "{elapsed:?}");
}
