//! A pool under faults: an origin killed under load is ejected, checked and taken back once it
//! restarts, while retries keep clients from seeing its failures; an origin that accepts and
//! never answers meets `response_header_timeout` and the retry goes elsewhere, within
//! `max_fetch`; and with every server failing, retries stay within the retry budget.

use crate::support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::net::TcpListener;
use tokio::time::Instant;

use super::tls::serve_routes;
use support::eventually;
use support::http::Http;
use support::patience;
use support::process::{corral_bin, metric_sum};
use support::upstream::Upstream;

// ------------------------------------------------------------------ origins ----

/// `corral demo-upstream` answering at once: a real process, killed with SIGKILL and started
/// again on its port.
struct Origin {
    addr: SocketAddr,
    child: Option<tokio::process::Child>,
}

impl Origin {
    async fn start() -> Origin {
        Self::on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    async fn on(listen: SocketAddr) -> Origin {
        let listen = listen.to_string();
        let mut cmd = tokio::process::Command::new(corral_bin());
        cmd.args(["demo-upstream", "--delay", "0s", "--listen", &listen])
            .env_remove("CORRAL_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("run corral demo-upstream");
        let stdout = child.stdout.take().expect("its stdout");
        let mut first = String::new();
        let mut stdout = tokio::io::BufReader::new(stdout);
        tokio::time::timeout(patience(), stdout.read_line(&mut first))
            .await
            .expect("corral demo-upstream prints its address in time")
            .expect("read its stdout");
        let addr = first
            .split_whitespace()
            .find_map(|word| word.trim_end_matches(',').parse::<SocketAddr>().ok())
            .unwrap_or_else(|| panic!("no address in {first:?}"));
        Origin {
            addr,
            child: Some(child),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// SIGKILL, and waits for the process to be gone.
    async fn kill(&mut self) {
        let mut child = self.child.take().expect("a running origin");
        child.kill().await.expect("SIGKILL the origin");
    }

    async fn restart(&mut self) {
        *self = Origin::on(self.addr).await;
    }
}

/// An origin that accepts connections and reads each request head, then never answers; counts
/// the requests it got.
struct Hanging {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Hanging {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Hanging {
    async fn start() -> Hanging {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = requests.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut tcp, _)) = listener.accept().await {
                let mut head = Vec::new();
                let mut buffer = [0u8; 1024];
                for _ in 0..64 {
                    match tcp.read(&mut buffer).await {
                        Ok(n) if n > 0 => head.extend_from_slice(&buffer[..n]),
                        _ => break,
                    }
                    if head.windows(4).any(|w| w == b"\r\n\r\n") {
                        counted.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                }
                held.push(tcp);
            }
        });
        Hanging {
            addr,
            requests,
            task,
        }
    }
}

fn pool_route(servers: &[String], lines: &str, route: &str) -> String {
    format!(
        "  - name: pool\n    match: {{ path_prefix: / }}\n    upstream:\n      servers: [{}]\n{lines}{route}",
        servers.join(", ")
    )
}

fn server_metric(metrics: &str, name: &str, server: SocketAddr) -> f64 {
    let server = format!("server=\"{server}\"");
    metric_sum(metrics, name, &["route=\"pool\"", &server])
}

// -------------------------------------------------------------------- tests ----

/// What the clients of [`load`] saw.
#[derive(Default)]
struct Seen {
    answered: AtomicUsize,
    server_errors: AtomicUsize,
    broken: AtomicUsize,
}

/// GETs through `proxy`, four at a time, until `stop` (at most 20,000).
async fn load(proxy: String, seen: Arc<Seen>, stop: Arc<AtomicBool>) {
    let http = Http::new();
    let calls = (0..20_000)
        .take_while(|_| !stop.load(Ordering::SeqCst))
        .map(|i| http.get(format!("{proxy}/load/{i}")).try_send());
    let mut replies = futures::stream::iter(calls).buffer_unordered(4);
    while let Some(reply) = replies.next().await {
        match reply {
            Ok(reply) if reply.status.is_server_error() => {
                seen.server_errors.fetch_add(1, Ordering::SeqCst);
            }
            Ok(_) => {}
            Err(_) => {
                seen.broken.fetch_add(1, Ordering::SeqCst);
            }
        }
        seen.answered.fetch_add(1, Ordering::SeqCst);
        if stop.load(Ordering::SeqCst) {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_origin_is_ejected_checked_and_back_once_it_restarts_and_clients_see_no_5xx() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (a, b, c) = tokio::join!(Origin::start(), Origin::start(), Origin::start());
    let mut origins = [a, b, c];
    let servers: Vec<String> = origins.iter().map(Origin::url).collect();
    let lines =
        "      health: { path: /health, interval: 300ms, timeout: 300ms, healthy: 2, unhealthy: 2 }
      outlier: { failures: 3, ejection: 1s }
      retries: { attempts: 3 }
";
    let route = pool_route(&servers, lines, "    cache: false\n");
    let proxy = serve_routes(dir.path(), &route, &[]).await;

    let (seen, stop) = (Arc::new(Seen::default()), Arc::new(AtomicBool::new(false)));
    let running = tokio::spawn(load(proxy.url(), seen.clone(), stop.clone()));
    let answered = |n: usize| {
        let seen = seen.clone();
        async move { seen.answered.load(Ordering::SeqCst) >= n }
    };
    eventually("the load is under way", || answered(60)).await;
    let killed = origins[1].addr;
    origins[1].kill().await;
    let at_kill = seen.answered.load(Ordering::SeqCst);
    eventually("the killed origin is out of rotation", || async {
        let metrics = proxy.metrics().await;
        server_metric(&metrics, "corral_upstream_server_healthy", killed) == 0.0
    })
    .await;
    eventually("the load goes on without it", || answered(at_kill + 100)).await;

    origins[1].restart().await;
    let before = server_metric(
        &proxy.metrics().await,
        "corral_upstream_server_requests_total",
        killed,
    );
    eventually("the restarted origin is back and answering", || async {
        let metrics = proxy.metrics().await;
        server_metric(&metrics, "corral_upstream_server_healthy", killed) == 1.0
            && server_metric(&metrics, "corral_upstream_server_requests_total", killed)
                > before + 10.0
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    tokio::time::timeout(patience(), running)
        .await
        .expect("the load stops")
        .expect("the load task");

    // Every request to the killed origin was retried on a live one.
    assert_eq!(
        seen.server_errors.load(Ordering::SeqCst),
        0,
        "{}",
        proxy.output()
    );
    // At most the requests under way when it died may have had their answers cut.
    assert!(
        seen.broken.load(Ordering::SeqCst) <= 4,
        "{}",
        proxy.output()
    );
    let metrics = proxy.metrics().await;
    let retried = metric_sum(
        &metrics,
        "corral_upstream_retries_total",
        &["route=\"pool\""],
    );
    assert!(retried >= 1.0, "{metrics}");
    let log = proxy.output();
    assert!(
        log.contains("failed its health checks") || log.contains("is ejected"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_origin_meets_the_response_header_timeout_and_the_retry_goes_elsewhere() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let hanging = Hanging::start().await;
    let good = Upstream::start().await;
    let servers = [format!("http://{}", hanging.addr), good.url()];
    let route = pool_route(
        &servers,
        "      retries: { attempts: 2 }\n",
        "    max_fetch: 10s\n    response_header_timeout: 300ms\n",
    );
    let proxy = serve_routes(dir.path(), &route, &[]).await;
    let http = Http::new();
    // Cacheable misses: each is the lease holder's fetch, taken in turn by the two servers.
    for i in 0..4 {
        let reply = http.get(format!("{}/hang/{i}", proxy.url())).send().await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.text(), format!("upstream body for /hang/{i}"));
    }
    assert!(
        hanging.requests.load(Ordering::SeqCst) >= 1,
        "round robin skipped it"
    );
    assert_eq!(good.hits_under("/hang/"), 4);
    let metrics = proxy.metrics().await;
    let retried = metric_sum(
        &metrics,
        "corral_upstream_retries_total",
        &["route=\"pool\"", "reason=\"response_header_timeout\""],
    );
    assert_eq!(
        retried,
        hanging.requests.load(Ordering::SeqCst) as f64,
        "{metrics}"
    );
    let timeouts = metric_sum(
        &metrics,
        "corral_upstream_errors_total",
        &["route=\"pool\"", "reason=\"response_header_timeout\""],
    );
    assert_eq!(timeouts, retried, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_server_failing_retries_stay_within_the_budget() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (a, b, c) = tokio::join!(Upstream::start(), Upstream::start(), Upstream::start());
    let origins = [a.status("/", 503), b.status("/", 503), c.status("/", 503)];
    let servers: Vec<String> = origins.iter().map(Upstream::url).collect();
    let lines = "      outlier: { failures: 1000 }
      retries: { attempts: 3, budget: 20%, budget_window: 10s, min_per_second: 1 }
";
    let proxy = serve_routes(
        dir.path(),
        &pool_route(&servers, lines, "    cache: false\n"),
        &[],
    )
    .await;
    let http = Http::new();
    let requests = 200;
    let started = Instant::now();
    let calls = (0..requests).map(|i| http.get(format!("{}/storm/{i}", proxy.url())).send());
    let replies: Vec<_> = futures::stream::iter(calls)
        .buffer_unordered(8)
        .collect()
        .await;
    let took = started.elapsed();
    assert!(replies.iter().all(|r| r.status == 503));
    let reached: usize = origins.iter().map(|o| o.hits_under("/storm/")).sum();
    // 20% of the requests, plus one a second for each window the storm spanned.
    let windows = took.as_secs() / 10 + 2;
    let bound = requests / 5 + windows as usize * 10;
    let retries = reached - requests;
    assert!(
        retries <= bound,
        "{retries} retries, more than the budget's {bound} (without it: {})",
        2 * requests
    );
    assert!(retries >= requests / 5, "only {retries} retries");
    let metrics = proxy.metrics().await;
    let counted = metric_sum(
        &metrics,
        "corral_upstream_retries_total",
        &["route=\"pool\""],
    );
    assert_eq!(counted, retries as f64, "{metrics}");
    let exhausted = metric_sum(
        &metrics,
        "corral_upstream_retry_budget_exhausted_total",
        &["route=\"pool\""],
    );
    assert!(exhausted >= 1.0, "{metrics}");
}
