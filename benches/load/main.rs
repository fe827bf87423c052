//! The load harness: corral side by side with a minimal hyper server, nginx and Varnish, all in
//! front of one upstream, measured in one run so that ratios hold on a busy machine.
//!
//! Run with: `scripts/bench-load` (installs nginx, Varnish and wrk if missing, builds, runs), or by
//! hand: `cargo build --release --bin corral && cargo bench --bench load -- run`.
//!
//! What it measures:
//! - hit throughput with `wrk`: the hyper baseline, corral answering from its L1, corral with the
//!   L1 off (every hit a Redis read), nginx, Varnish; rounds interleaved, the median kept;
//! - the miss path: sequential requests, each a new key, to an upstream with a fixed latency,
//!   directly and through each system; overhead = p50 through it − p50 direct;
//! - a burst on one new key over three corral replicas (Redis store, NATS bus), three independent
//!   nginx instances and one Varnish: upstream fetches, and each follower's wake-up (the time from
//!   the upstream's answer, stamped in a header, to the client's receipt, on one clock);
//! - memory under many followers on one key in one instance (VmRSS from /proc, the peak while they
//!   wait, over the idle figure).
//!
//! Settings (environment): CORRAL_LOAD_SECONDS (each wrk run, 3), CORRAL_LOAD_ROUNDS (5),
//! CORRAL_LOAD_CONNECTIONS (wrk's, 64), CORRAL_LOAD_MISSES (100), CORRAL_LOAD_BURST (500),
//! CORRAL_LOAD_FOLLOWERS (10000), CORRAL_LOAD_OUT (where the table and chart go, benches/results);
//! programs: CORRAL_BIN, CORRAL_REDIS_SERVER, CORRAL_NATS_SERVER, CORRAL_NGINX, CORRAL_VARNISHD.

// The harness measures real time across processes and waits on processes outside any runtime:
// neither paused time nor tokio's clock means anything here.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

mod client;
mod procs;
mod report;
mod servers;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use procs::{CorralSetup, Service};
use report::{BurstResult, HitResult, MemoryResult, MissResult, Report};

/// The upstream's latency for the miss-path test, in milliseconds.
const MISS_DELAY_MS: u64 = 20;
/// The upstream's latency for the burst test, in milliseconds.
const BURST_DELAY_MS: u64 = 100;
/// The upstream's latency while followers pile up for the memory test, in milliseconds.
const FOLLOWERS_DELAY_MS: u64 = 5000;
/// How often the memory test reads VmRSS.
const RSS_EVERY: Duration = Duration::from_millis(50);

fn main() -> anyhow::Result<()> {
    // `cargo bench` adds `--bench` to what it is given.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with("--"))
        .collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["upstream", addr] => runtime()?.block_on(servers::upstream(addr.parse()?)),
        ["baseline", addr] => runtime()?.block_on(servers::baseline(addr.parse()?)),
        ["run"] => run(),
        // Nothing, as when `cargo bench` runs every bench: this one starts servers, so only on ask.
        _ => {
            println!("load: run with `cargo bench --bench load -- run` or scripts/bench-load");
            Ok(())
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

fn setting(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .with_context(|| format!("{name} must be a whole number, not {value:?}")),
        Err(_) => Ok(default),
    }
}

fn required(env: &str, name: &str) -> anyhow::Result<PathBuf> {
    procs::program(env, name).with_context(|| format!("{name} is not installed (or set {env})"))
}

/// What one run does.
struct Plan {
    seconds: u64,
    rounds: u64,
    connections: usize,
    misses: u64,
    burst: usize,
    followers: usize,
}

fn run() -> anyhow::Result<()> {
    let plan = Plan {
        seconds: setting("CORRAL_LOAD_SECONDS", 3)?,
        rounds: setting("CORRAL_LOAD_ROUNDS", 5)?.max(1),
        connections: setting("CORRAL_LOAD_CONNECTIONS", 64)? as usize,
        misses: setting("CORRAL_LOAD_MISSES", 100)?.max(1),
        burst: setting("CORRAL_LOAD_BURST", 500)? as usize,
        followers: setting("CORRAL_LOAD_FOLLOWERS", 10_000)? as usize,
    };
    let corral_bin = match std::env::var_os("CORRAL_BIN") {
        Some(path) => PathBuf::from(path),
        // The harness lives in target/release/deps; the release binary beside that.
        None => std::env::current_exe()?
            .parent()
            .and_then(|deps| deps.parent())
            .context("no target directory")?
            .join("corral"),
    };
    if !corral_bin.is_file() {
        bail!(
            "no corral binary at {} (cargo build --release --bin corral)",
            corral_bin.display()
        );
    }
    let redis_bin = required("CORRAL_REDIS_SERVER", "redis-server")?;
    let nats_bin = required("CORRAL_NATS_SERVER", "nats-server")?;
    let nginx_bin = required("CORRAL_NGINX", "nginx")?;
    let varnish_bin = required("CORRAL_VARNISHD", "varnishd")?;
    required("CORRAL_WRK", "wrk")?;

    eprintln!("load: starting the upstream, the baseline, Redis, NATS, corral, nginx and Varnish");
    let upstream = procs::start_self("upstream")?;
    let baseline = procs::start_self("baseline")?;
    let redis = procs::redis(&redis_bin)?;
    let nats = procs::nats(&nats_bin)?;
    let corral = |name: &str, l1_bytes: u64| {
        procs::corral(
            &corral_bin,
            &CorralSetup {
                name,
                redis: &redis,
                nats: &nats,
                upstream: &upstream,
                l1_bytes,
            },
        )
    };
    let corral_l1 = corral("corral", 64 << 20)?;
    let corral_store = corral("corral-store", 0)?;
    let replicas = [
        corral("corral-r1", 64 << 20)?,
        corral("corral-r2", 64 << 20)?,
        corral("corral-r3", 64 << 20)?,
    ];
    let nginxes = [
        procs::nginx(&nginx_bin, "nginx-1", &upstream)?,
        procs::nginx(&nginx_bin, "nginx-2", &upstream)?,
        procs::nginx(&nginx_bin, "nginx-3", &upstream)?,
    ];
    let varnish = procs::varnish(&varnish_bin, "varnish", &upstream)?;

    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let started = Instant::now();
    let report = client.block_on(async {
        let hits = hits(
            &plan,
            &[
                ("hyper baseline", &baseline),
                ("corral (L1)", &corral_l1),
                ("corral (Redis, L1 off)", &corral_store),
                ("nginx", &nginxes[0]),
                ("varnish", &varnish),
            ],
        )
        .await?;
        let misses = misses(
            &plan,
            &upstream,
            &[
                ("corral", &corral_l1),
                ("nginx", &nginxes[0]),
                ("varnish", &varnish),
            ],
        )
        .await?;
        let bursts = bursts(
            &plan,
            &upstream,
            &[
                ("corral", &replicas.iter().collect::<Vec<_>>()),
                ("nginx", &nginxes.iter().collect::<Vec<_>>()),
                ("varnish", &[&varnish]),
            ],
        )
        .await?;
        let memory = memory(
            &plan,
            &[
                ("corral", &replicas[0]),
                ("nginx", &nginxes[1]),
                ("varnish", &varnish),
            ],
        )
        .await;
        anyhow::Ok(Report {
            hits,
            misses,
            bursts,
            memory,
            seconds: plan.seconds,
            rounds: plan.rounds,
            connections: plan.connections,
            burst: plan.burst,
            followers: plan.followers,
            miss_count: plan.misses,
            miss_delay_ms: MISS_DELAY_MS,
            burst_delay_ms: BURST_DELAY_MS,
            load: std::fs::read_to_string("/proc/loadavg").unwrap_or_default(),
        })
    })?;
    eprintln!("load: measured in {:.0?}", started.elapsed());
    let text = report.text();
    println!("{text}");
    let out = match std::env::var_os("CORRAL_LOAD_OUT") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/results"),
    };
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("load.md"), &text)?;
    std::fs::write(out.join("load.svg"), report.svg())?;
    eprintln!("load: wrote {} and load.svg", out.join("load.md").display());
    Ok(())
}

/// The path of a cacheable answer the upstream gives after `delay_ms`.
fn path(delay_ms: u64, name: &str) -> String {
    format!("/d/{delay_ms}/{name}")
}

async fn hits(plan: &Plan, systems: &[(&str, &Service)]) -> anyhow::Result<Vec<HitResult>> {
    let path = path(0, "hit");
    for (name, service) in systems {
        // Twice: the first fills the cache.
        for _ in 0..2 {
            let (received, _) = client::timed_get(service.addr, &path).await?;
            if received.status != 200 {
                bail!("{name} answered {} to the warm-up", received.status);
            }
        }
    }
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
    for round in 0..plan.rounds {
        for (i, (name, service)) in systems.iter().enumerate() {
            let url = format!("{}{path}", service.url());
            let (seconds, connections) = (plan.seconds, plan.connections);
            let rate = tokio::task::spawn_blocking(move || client::wrk(&url, connections, seconds))
                .await??;
            eprintln!("load: hit round {} {name}: {rate:.0} req/s", round + 1);
            rates[i].push(rate);
        }
    }
    Ok(systems
        .iter()
        .zip(rates)
        .map(|((name, _), rates)| HitResult {
            system: (*name).to_owned(),
            rates,
        })
        .collect())
}

async fn misses(
    plan: &Plan,
    upstream: &Service,
    systems: &[(&str, &Service)],
) -> anyhow::Result<Vec<MissResult>> {
    let mut all: Vec<(&str, SocketAddr)> = vec![("upstream (direct)", upstream.addr)];
    all.extend(systems.iter().map(|(name, service)| (*name, service.addr)));
    let mut latencies: Vec<Vec<f64>> = vec![Vec::new(); all.len()];
    // Interleaved request by request, so that load from elsewhere falls on every system alike.
    for i in 0..plan.misses {
        for (s, (name, addr)) in all.iter().enumerate() {
            let path = path(MISS_DELAY_MS, &format!("miss-{s}-{i}"));
            let (received, took) = client::timed_get(*addr, &path).await?;
            if received.status != 200 {
                bail!("{name} answered {} to a miss", received.status);
            }
            latencies[s].push(took.as_secs_f64() * 1000.0);
        }
    }
    eprintln!("load: {} misses per system done", plan.misses);
    Ok(all
        .iter()
        .zip(latencies)
        .map(|((name, _), latencies_ms)| MissResult {
            system: (*name).to_owned(),
            latencies_ms,
        })
        .collect())
}

async fn bursts(
    plan: &Plan,
    upstream: &Service,
    groups: &[(&str, &[&Service])],
) -> anyhow::Result<Vec<BurstResult>> {
    let mut results: Vec<BurstResult> = groups
        .iter()
        .map(|(name, instances)| BurstResult {
            system: (*name).to_owned(),
            instances: instances.len(),
            fetches: Vec::new(),
            wake_ups_ms: Vec::new(),
            failed: 0,
        })
        .collect();
    for round in 0..plan.rounds {
        for (g, (name, instances)) in groups.iter().enumerate() {
            let path = path(BURST_DELAY_MS, &format!("burst-{g}-{round}"));
            let targets: Vec<SocketAddr> = instances.iter().map(|s| s.addr).collect();
            let received = client::burst(&targets, &path, plan.burst).await?;
            let fetches = fetch_count(upstream, &path).await?;
            let result = &mut results[g];
            result.fetches.push(fetches);
            for response in &received {
                match (response.status, response.wake_up_ms()) {
                    (200, Some(ms)) => result.wake_ups_ms.push(ms),
                    _ => result.failed += 1,
                }
            }
            eprintln!(
                "load: burst round {} {name}: {fetches} upstream fetches",
                round + 1
            );
        }
    }
    Ok(results)
}

/// How many times the upstream was asked for `path`.
async fn fetch_count(upstream: &Service, path: &str) -> anyhow::Result<u64> {
    let stream = client::connect(upstream.addr).await?;
    let stream = client::exchange_body(stream, &format!("/count{path}")).await?;
    stream.trim().parse().context("the upstream's count")
}

/// Peak extra memory while `plan.followers` requests wait on one key in each system; a system
/// that cannot hold them is reported, not fatal.
async fn memory(plan: &Plan, systems: &[(&str, &Service)]) -> Vec<MemoryResult> {
    let mut results = Vec::new();
    for (s, (name, service)) in systems.iter().enumerate() {
        let before = procs::rss_tree(service.pid());
        let path = path(FOLLOWERS_DELAY_MS, &format!("followers-{s}"));
        let (addr, count) = (service.addr, plan.followers);
        let mut waiting = tokio::spawn(async move { client::burst(&[addr], &path, count).await });
        let mut peak = before;
        let mut ticker = tokio::time::interval(RSS_EVERY);
        let outcome = loop {
            tokio::select! {
                done = &mut waiting => break done,
                _ = ticker.tick() => peak = peak.max(procs::rss_tree(service.pid())),
            }
        };
        let error = match outcome {
            Ok(Ok(received)) => {
                let failed = received.iter().filter(|r| r.status != 200).count();
                (failed > 0).then(|| format!("{failed} of {count} not answered 200"))
            }
            Ok(Err(error)) => Some(error.to_string()),
            Err(error) => Some(error.to_string()),
        };
        eprintln!(
            "load: {count} followers on {name}: +{:.1} MiB{}",
            peak.saturating_sub(before) as f64 / (1 << 20) as f64,
            error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        );
        results.push(MemoryResult {
            system: (*name).to_owned(),
            before,
            peak,
            error,
        });
    }
    results
}
