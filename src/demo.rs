//! `corral demo`: the first thing to run. A slow upstream, several replicas, a burst of identical
//! requests spread over them, and what happened: how many reached the upstream, how each was
//! answered, and how long followers waited once the upstream had answered.
//!
//! Embedded by default (the memory store, no servers needed); `--redis URL [--nats URL]` runs the
//! same replicas against real servers.
//!
//! `corral demo-upstream` serves the same slow upstream on its own ([`serve_upstream`]), for a
//! deployment (the compose file) to put corral in front of.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::body::Body;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::engine::Backend;
use crate::server;

/// What the demo does.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Requests in the burst.
    pub requests: usize,
    /// How long the upstream takes to answer.
    pub delay: Duration,
    pub replicas: usize,
    /// Run against a real Redis store instead of the memory store.
    pub redis: Option<String>,
    /// With `redis`: carry events on NATS instead of Redis pub/sub.
    pub nats: Option<String>,
    /// Keep running after the burst and print URLs to try.
    pub serve: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            requests: 300,
            delay: Duration::from_millis(500),
            replicas: 3,
            redis: None,
            nats: None,
            serve: false,
        }
    }
}

/// What the burst showed.
#[derive(Clone, Debug, Default)]
pub struct DemoReport {
    pub requests: usize,
    pub upstream_fetches: u64,
    pub miss: usize,
    pub coalesced: usize,
    pub hit: usize,
    pub other: usize,
    pub p50: Duration,
    pub p99: Duration,
    /// How long coalesced requests were answered after the upstream answered (p50, p99).
    pub follower_after_upstream: (Duration, Duration),
}

/// The slow upstream: counts requests and remembers when it last answered.
struct SlowUpstream {
    addr: SocketAddr,
    fetches: Arc<AtomicU64>,
    /// Milliseconds after the demo started at which the upstream last answered.
    answered_at_ms: Arc<AtomicU64>,
}

/// The slow upstream's app: every request waits `delay`, then answers JSON naming its path and
/// carrying its fetch number (1 for the first request this upstream answered), so each fetch that
/// reached it is visible to whoever reads the answer.
fn slow_upstream(
    delay: Duration,
    started: Instant,
    fetches: Arc<AtomicU64>,
    answered_at_ms: Arc<AtomicU64>,
) -> Router {
    Router::new().fallback(move |uri: http::Uri| {
        let (fetches, answered) = (fetches.clone(), answered_at_ms.clone());
        async move {
            let fetch = fetches.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(delay).await;
            answered.store(started.elapsed().as_millis() as u64, Ordering::SeqCst);
            tracing::info!(fetch, path = uri.path(), "the demo upstream answered");
            let body = serde_json::json!({"report": uri.path(), "fetch": fetch, "rows": [1, 2, 3]});
            (
                [(http::header::CONTENT_TYPE, "application/json")],
                format!("{body}\n"),
            )
        }
    })
}

async fn start_upstream(delay: Duration, started: Instant) -> anyhow::Result<SlowUpstream> {
    let fetches = Arc::new(AtomicU64::new(0));
    let answered_at_ms = Arc::new(AtomicU64::new(0));
    let app = slow_upstream(delay, started, fetches.clone(), answered_at_ms.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(SlowUpstream {
        addr,
        fetches,
        answered_at_ms,
    })
}

/// `corral demo-upstream`: the demo's slow upstream on its own, for a deployment to sit in front
/// of (the compose file runs it). Serves on `listener` until `shutdown` completes.
pub async fn serve_upstream(
    listener: TcpListener,
    delay: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = slow_upstream(
        delay,
        Instant::now(),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

fn config_text(options: &DemoOptions, upstream: SocketAddr) -> String {
    let namespace = format!("demo-{:08x}", rand::random::<u32>());
    // Every replica, the upstream and the clients share this one process: on a busy machine a
    // store call can outlast the 50 ms default, and the demo would show the degrade path (a
    // fetch per replica) instead of coalescing. A second is still far inside every deadline.
    let store = match (&options.redis, &options.nats) {
        (None, _) => "store: { kind: memory }\n".to_owned(),
        (Some(redis), None) => {
            format!("store: {{ kind: redis, url: \"{redis}\", timeout: 1s }}\n")
        }
        (Some(redis), Some(nats)) => format!(
            "store: {{ kind: redis, url: \"{redis}\", timeout: 1s }}\n\
             bus: {{ kind: nats, url: \"{nats}\" }}\n"
        ),
    };
    format!(
        "listen: 127.0.0.1:0\n\
         admin: {{ listen: 127.0.0.1:0 }}\n\
         namespace: {namespace}\n\
         {store}\
         routes:\n  \
           - name: reports\n    \
             match: {{ path_prefix: /reports }}\n    \
             upstream: http://{upstream}\n    \
             ttl: 60s\n"
    )
}

/// A running replica.
struct Replica {
    public: SocketAddr,
    admin: SocketAddr,
}

/// Runs the demo, printing as it goes; answers what it measured.
pub async fn run(options: DemoOptions) -> anyhow::Result<DemoReport> {
    let started = Instant::now();
    let upstream = start_upstream(options.delay, started).await?;
    let text = config_text(&options, upstream.addr);
    let config = crate::config::parse(&text, "demo").map_err(|e| anyhow::anyhow!("{e}"))?;
    let shared = Backend::memory();
    let (stop, stopped) = watch::channel(false);
    let mut replicas = Vec::new();
    for _ in 0..options.replicas.max(1) {
        let public = TcpListener::bind("127.0.0.1:0").await?;
        let admin = TcpListener::bind("127.0.0.1:0").await?;
        let replica = Replica {
            public: public.local_addr()?,
            admin: admin.local_addr()?,
        };
        let backend = if options.redis.is_some() {
            server::backend_for(&config)
        } else {
            shared.clone()
        };
        let mut stopped = stopped.clone();
        let config = config.clone();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            };
            if let Err(error) = server::run_on(public, admin, config, backend, shutdown).await {
                eprintln!("corral demo: a replica failed: {error}");
            }
        });
        replicas.push(replica);
    }
    let client: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new()).build_http();
    for replica in &replicas {
        wait_ready(&client, replica.admin).await?;
    }

    let backend_name = match (&options.redis, &options.nats) {
        (None, _) => "the memory store".to_owned(),
        (Some(_), None) => "Redis".to_owned(),
        (Some(_), Some(_)) => "Redis with NATS events".to_owned(),
    };
    println!(
        "corral demo: {} replicas on {backend_name}, an upstream that takes {} per answer",
        replicas.len(),
        humantime::format_duration(options.delay)
    );
    println!(
        "sending {} requests for /reports/2024-q1, spread over the replicas...",
        options.requests
    );
    let report = burst(&client, &replicas, &options, &upstream, started).await?;
    print_report(&report, &options);

    if options.serve {
        println!("\nStill running; try (Ctrl-C to stop):");
        for replica in &replicas {
            println!(
                "  curl -si http://{}/reports/2024-q2 | grep -i -e x-cache -e cache-status",
                replica.public
            );
        }
        tokio::signal::ctrl_c().await?;
    }
    stop.send_replace(true);
    Ok(report)
}

async fn wait_ready(client: &Client<HttpConnector, Body>, admin: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    for _ in 0..500 {
        let request = Request::get(format!("http://{admin}/readyz")).body(Body::empty())?;
        if let Ok(Ok(response)) =
            tokio::time::timeout(Duration::from_secs(1), client.request(request)).await
            && response.status() == StatusCode::OK
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("replica at {admin} did not become ready within 10s")
}

/// One answered request: its `X-Cache`, latency, and when it finished (since the demo started).
struct Answered {
    x_cache: String,
    latency: Duration,
    finished_ms: u64,
}

async fn burst(
    client: &Client<HttpConnector, Body>,
    replicas: &[Replica],
    options: &DemoOptions,
    upstream: &SlowUpstream,
    started: Instant,
) -> anyhow::Result<DemoReport> {
    let mut tasks = Vec::with_capacity(options.requests);
    for i in 0..options.requests {
        let client = client.clone();
        let addr = replicas[i % replicas.len()].public;
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let request =
                Request::get(format!("http://{addr}/reports/2024-q1")).body(Body::empty())?;
            let response = tokio::time::timeout(Duration::from_secs(30), client.request(request))
                .await
                .context("no answer within 30s")??;
            let x_cache = response
                .headers()
                .get("x-cache")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_owned();
            response.into_body().collect().await?;
            anyhow::Ok(Answered {
                x_cache,
                latency: sent.elapsed(),
                finished_ms: started.elapsed().as_millis() as u64,
            })
        }));
    }
    let mut answers = Vec::with_capacity(tasks.len());
    let total = tasks.len();
    for (done, task) in tasks.into_iter().enumerate() {
        answers.push(task.await??);
        progress(done + 1, total);
    }
    eprintln!();
    let answered_ms = upstream.answered_at_ms.load(Ordering::SeqCst);
    let mut latencies: Vec<Duration> = answers.iter().map(|a| a.latency).collect();
    latencies.sort();
    let mut after: Vec<Duration> = answers
        .iter()
        .filter(|a| a.x_cache == "COALESCED")
        .map(|a| Duration::from_millis(a.finished_ms.saturating_sub(answered_ms)))
        .collect();
    after.sort();
    let count = |word: &str| answers.iter().filter(|a| a.x_cache == word).count();
    let (miss, coalesced, hit) = (count("MISS"), count("COALESCED"), count("HIT"));
    Ok(DemoReport {
        requests: answers.len(),
        upstream_fetches: upstream.fetches.load(Ordering::SeqCst),
        miss,
        coalesced,
        hit,
        other: answers.len() - miss - coalesced - hit,
        p50: percentile(&latencies, 50),
        p99: percentile(&latencies, 99),
        follower_after_upstream: (percentile(&after, 50), percentile(&after, 99)),
    })
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (sorted.len() * p).div_ceil(100).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn progress(done: usize, total: usize) {
    let width = 30;
    let filled = done * width / total.max(1);
    let mut err = std::io::stderr();
    let _ = write!(
        err,
        "\r  [{}{}] {done}/{total}",
        "#".repeat(filled),
        ".".repeat(width - filled)
    );
    let _ = err.flush();
}

fn print_report(report: &DemoReport, options: &DemoOptions) {
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    println!("requests:          {}", report.requests);
    println!(
        "upstream fetches:  {} (without coalescing: {})",
        report.upstream_fetches, options.requests
    );
    println!(
        "outcomes:          MISS {}, COALESCED {}, HIT {}{}",
        report.miss,
        report.coalesced,
        report.hit,
        if report.other > 0 {
            format!(", other {}", report.other)
        } else {
            String::new()
        }
    );
    println!(
        "latency:           p50 {}, p99 {}",
        ms(report.p50),
        ms(report.p99)
    );
    println!(
        "followers answered after the upstream did: p50 {}, p99 {}",
        ms(report.follower_after_upstream.0),
        ms(report.follower_after_upstream.1)
    );
}
