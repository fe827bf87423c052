//! A herd of 10,000 requests for one key over three `corral serve` processes on a real Redis store
//! and NATS bus, the upstream holding the one fetch until every request has joined a flight.
//!
//! What this holds the code to: one upstream fetch however many wait; store calls and bus
//! subscriptions grow with the replicas, not with the requests; memory per waiting request is
//! small (the processes' resident sets are printed before, at the peak and after).

use crate::support;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::process::{ServeReplicas, metric_sum};
use support::proxy::fill;
use support::upstream::pattern;
use support::{Deadline, TestNats, TestRedis};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

/// Requests in the herd.
const HERD: usize = 10_000;

/// Larger than an event carries inline (16 KiB), so every replica but the leader's reads the body
/// from the store.
const BODY: usize = 32 * 1024;

/// Longest any single step of the herd may take; generous, for two loaded cores.
const STEP: Duration = Duration::from_secs(60);

/// Leases and polls far longer than the test, so that every store call counted is one the protocol
/// makes for an event or a lead, not a timer.
const CONFIG: &str = r#"
listen: {{listen}}
admin: { listen: {{admin}}, token: secret }
namespace: herd
store: { kind: redis, url: "{{redis}}" }
bus: { kind: nats, url: "{{nats}}" }
defaults: { ttl: 60s, wait_timeout: 60s, lease_ttl: 60s, poll_interval: 60s, max_body: 1MiB, pass_ttl: 2s, max_fetch: 60s }
routes:
  - name: all
    match: { path_prefix: / }
    upstream: {{upstream}}
    key: { query: all }
"#;

/// An upstream that answers every request with [`BODY`] bytes of [`pattern`] once released, and
/// counts what it received. Unlike the shared test upstream, its latch waits as long as the herd
/// may take to gather ([`STEP`]), not the shorter patience of other tests.
struct HeldUpstream {
    addr: std::net::SocketAddr,
    /// Requests received so far.
    hits: Arc<AtomicUsize>,
    /// Lets every held answer go.
    release: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for HeldUpstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl HeldUpstream {
    async fn start() -> HeldUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local_addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let (release, released) = watch::channel(false);
        let counted = hits.clone();
        let accept = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let (counted, released) = (counted.clone(), released.clone());
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<_>| {
                        let mut released = released.clone();
                        let warm = request.uri().path() == "/warm";
                        if !warm {
                            counted.fetch_add(1, Ordering::SeqCst);
                        }
                        async move {
                            if !warm {
                                let _ =
                                    tokio::time::timeout(STEP, released.wait_for(|go| *go)).await;
                            }
                            Ok::<_, Infallible>(Response::new(Full::new(pattern(BODY))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        HeldUpstream {
            addr,
            hits,
            release,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until the first held request has arrived.
    async fn wait_for_first(&self) {
        let deadline = Deadline::after(STEP);
        // One check per 10 ms, bounded by the deadline.
        while self.hits.load(Ordering::SeqCst) == 0 {
            assert!(
                !deadline.expired(),
                "no request reached the upstream in {STEP:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Raises this process's soft limit on open files (inherited by the processes it starts) to at
/// least `need`, within the hard limit; panics with both limits if the hard one is lower.
#[allow(unsafe_code)] // test harness: signals and process limits, see SAFETY below
fn raise_nofile(need: u64) {
    // SAFETY: getrlimit/setrlimit on this process with a valid, initialised struct.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        assert_eq!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit),
            0,
            "getrlimit"
        );
        if limit.rlim_cur >= need {
            return;
        }
        assert!(
            limit.rlim_max >= need,
            "{HERD} connections need {need} open files; the hard limit is {} (soft {})",
            limit.rlim_max,
            limit.rlim_cur
        );
        limit.rlim_cur = need;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0, "setrlimit");
    }
}

/// The sum of one series over every process.
async fn metric(replicas: &ServeReplicas, name: &str, labels: &[&str]) -> f64 {
    let mut sum = 0.0;
    for replica in replicas.all() {
        sum += metric_sum(&replica.metrics().await, name, labels);
    }
    sum
}

/// Store calls so far over every process, by operation.
async fn store_calls(replicas: &ServeReplicas) -> Vec<(&'static str, f64)> {
    let mut calls = Vec::new();
    for op in [
        "acquire",
        "peek",
        "commit",
        "renew",
        "index",
        "route_generation",
        "status",
    ] {
        let label = format!("op=\"{op}\"");
        calls.push((
            op,
            metric(replicas, "corral_store_operations_total", &[&label]).await,
        ));
    }
    calls
}

fn rss(replicas: &ServeReplicas) -> Vec<u64> {
    replicas.all().iter().map(|r| r.rss_kib()).collect()
}

/// Fault test 11.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_followers_on_one_key_make_one_fetch_and_three_store_reads() {
    // Each request holds one client socket here and one server socket in a replica.
    raise_nofile(HERD as u64 + 2048);
    let upstream = HeldUpstream::start().await;
    let (redis, nats) = tokio::join!(TestRedis::start(), TestNats::start_monitored());
    let yaml = fill(
        CONFIG,
        &[
            ("redis", &redis.url()),
            ("nats", &nats.url()),
            ("upstream", &upstream.url()),
        ],
    );
    let replicas = ServeReplicas::start(3, &yaml).await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(5))
        .build_http();
    // Warm each process (connections, scripts) so its resident set is measured in service.
    for replica in replicas.all() {
        let url = format!("{}/warm", replica.url());
        let reply = client.get(url.parse().unwrap()).await.expect("warm");
        assert_eq!(reply.status(), 200);
    }
    let before = rss(&replicas);
    let acquires_before = metric(
        &replicas,
        "corral_store_operations_total",
        &["op=\"acquire\""],
    )
    .await;
    let calls_before = store_calls(&replicas).await;

    let url = "/herd?k=1";
    let expected = pattern(BODY);
    let began = Instant::now();
    let tasks: Vec<_> = (0..HERD)
        .map(|i| {
            let client = client.clone();
            let uri = format!("{}{url}", replicas[i % replicas.len()].url());
            let expected = expected.clone();
            tokio::spawn(async move {
                let exchange = async {
                    let response = client.get(uri.parse().unwrap()).await?;
                    let status = response.status();
                    let body = response.into_body().collect().await?.to_bytes();
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body == expected))
                };
                let answered = tokio::time::timeout(STEP, exchange).await;
                (answered, Instant::now())
            })
        })
        .collect();

    upstream.wait_for_first().await;
    let joined = (HERD - replicas.len()) as f64;
    let deadline = Deadline::after(STEP);
    let mut peak = before.clone();
    // One check per 100 ms, bounded by the deadline.
    for check in 0.. {
        let waiting = metric(&replicas, "corral_followers_waiting", &[]).await;
        for (p, now) in peak.iter_mut().zip(rss(&replicas)) {
            *p = (*p).max(now);
        }
        if waiting >= joined {
            break;
        }
        assert!(
            !deadline.expired(),
            "after {check} checks only {waiting} of {joined} requests joined a flight"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_joined = began.elapsed();
    let released = Instant::now();
    upstream.release.send_replace(true);

    let mut after_release = Vec::with_capacity(HERD);
    for (i, task) in tasks.into_iter().enumerate() {
        let (answered, done) = task.await.expect("a request task");
        let (status, intact) = answered
            .unwrap_or_else(|_| panic!("request {i} had no answer within {STEP:?}"))
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(status, 200, "request {i}");
        assert!(intact, "request {i}: the body is the upstream's, whole");
        after_release.push(done - released);
        if i % 1000 == 0 {
            for (p, now) in peak.iter_mut().zip(rss(&replicas)) {
                *p = (*p).max(now);
            }
        }
    }
    let after = rss(&replicas);
    after_release.sort();

    let fetches = upstream.hits.load(Ordering::SeqCst);
    let acquires = metric(
        &replicas,
        "corral_store_operations_total",
        &["op=\"acquire\""],
    )
    .await
        - acquires_before;
    let by_op: Vec<(&str, f64)> = store_calls(&replicas)
        .await
        .into_iter()
        .zip(&calls_before)
        .map(|((op, now), (_, before))| (op, now - before))
        .collect();
    let bus_subjects = nats.subscriptions().await;
    let bus_subscriptions = bus_subjects
        .iter()
        .filter(|s| s.starts_with("herd."))
        .count();
    println!(
        "{HERD} requests over 3 processes: all joined after {all_joined:?}; answered after the fetch \
         returned: p50 {:?}, p99 {:?}, max {:?}",
        after_release[HERD / 2],
        after_release[HERD * 99 / 100],
        after_release[HERD - 1]
    );
    println!(
        "upstream fetches {fetches}; store acquires {acquires}; \
         bus subscriptions {bus_subscriptions} (all subscriptions: {bus_subjects:?})"
    );
    println!("store calls by operation during the herd, over the processes: {by_op:?}");
    println!("RSS KiB per process: before {before:?}, peak {peak:?}, after {after:?}");

    assert_eq!(fetches, 1, "one upstream fetch for {HERD} requests");
    // Each process looks once (the leader leads, the others are told to wait) and each follower
    // process once more when READY comes: only those second looks can read the body.
    assert!(
        acquires <= 2.0 * replicas.len() as f64 - 1.0,
        "{acquires} store acquires for {HERD} requests over {} processes",
        replicas.len()
    );
    let body_reads = acquires - replicas.len() as f64;
    assert!(body_reads <= 3.0, "{body_reads} store reads of the body");
    assert!(
        bus_subscriptions <= replicas.len(),
        "{bus_subscriptions} bus subscriptions for {} processes: {bus_subjects:?}",
        replicas.len()
    );
}
