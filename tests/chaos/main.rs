//! Chaos soak: three `corral serve` replicas over one Redis store and one NATS bus (or the NATS
//! key-value store), a checking origin and steady load, while replicas, Redis and NATS are killed,
//! restarted, paused and resumed at random by their own PIDs. Every fetch, answer, fault, lease and
//! commit is written as a JSON line; a checker then holds the run to corral's promises (see
//! `checker.rs` for the exact bounds).
//!
//! Run with:
//!
//! ```text
//! scripts/chaos 1800 /tmp/chaos-30m          # 30 minutes, journals and summary kept there
//! cargo nextest run --test chaos             # the 2-minute run of the suite
//! ```
//!
//! Knobs (environment): `CORRAL_CHAOS_SECS` (default 120), `CORRAL_CHAOS_OUT` (keep the journals
//! there; default a temporary directory, kept only when the check fails), `CORRAL_CHAOS_CLIENTS`
//! (default 8), `CORRAL_CHAOS_STORE` (`redis` or `nats`, default `redis`), `CORRAL_CHAOS_SEED`,
//! `CORRAL_CHAOS_TOLERANCE_MS` (past a deadline, default 1000).

#[path = "../support/mod.rs"]
mod support;

mod checker;
mod cluster;
mod journal;
mod leases;
mod load;
mod origin;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use cluster::{Cluster, POLICY, StoreKind, replica_log};
use journal::{ANSWERS, FAULTS, FETCHES, Journal, LEASES, now_ms};
use origin::Origin;

/// Replicas in the run.
const REPLICAS: usize = 3;
/// Keys in the load's set, and how many of them are hot.
const KEYS: usize = 40;
const HOT: usize = 6;
/// Share of requests that go to a hot key.
const HOT_SHARE: f64 = 0.7;
/// No fault starts in the run's last stretch, so the last one heals while the load still runs.
const QUIET_TAIL: Duration = Duration::from_secs(8);
/// Healthy time between two faults, ms (a random point of this range): long enough that a good
/// part of the run is outside every fault's window, where the strict bounds apply.
const GAP_MS: std::ops::Range<u64> = 3_000..9_000;
/// How long a fault lasts before it is healed, ms; pauses past `lease_ttl` (2 s) lose leases.
const HOLD_MS: std::ops::Range<u64> = 300..4_500;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soak_under_random_faults_keeps_every_promise() {
    let secs = env_u64("CORRAL_CHAOS_SECS", 120);
    let clients = env_u64("CORRAL_CHAOS_CLIENTS", 8) as usize;
    let tolerance_ms = env_u64("CORRAL_CHAOS_TOLERANCE_MS", 1_000);
    let seed = env_u64("CORRAL_CHAOS_SEED", now_ms());
    let store = match std::env::var("CORRAL_CHAOS_STORE").as_deref() {
        Ok("nats") => StoreKind::NatsKv,
        Ok("redis") | Err(_) => StoreKind::Redis,
        Ok(other) => panic!("CORRAL_CHAOS_STORE={other:?}: expected redis or nats"),
    };
    let temp = tempfile::tempdir().expect("a temporary directory");
    let dir: PathBuf = match std::env::var("CORRAL_CHAOS_OUT") {
        Ok(out) if !out.is_empty() => {
            std::fs::create_dir_all(&out).unwrap_or_else(|e| panic!("create {out}: {e}"));
            PathBuf::from(out)
        }
        _ => temp.path().to_path_buf(),
    };
    println!(
        "chaos: {secs} s, {clients} clients, store {store:?}, seed {seed}, journals in {}",
        dir.display()
    );

    let fetches = Arc::new(Journal::create(&dir.join(FETCHES)));
    let answers = Arc::new(Journal::create(&dir.join(ANSWERS)));
    let faults = Arc::new(Journal::create(&dir.join(FAULTS)));
    let origin = Origin::start(REPLICAS, fetches.clone()).await;
    let mut cluster = Cluster::start(&dir, store, REPLICAS, &origin, faults.clone()).await;

    let duration = Duration::from_secs(secs);
    let load = load::Load {
        clients,
        pace: Duration::from_millis(50),
        keys: KEYS,
        hot: HOT,
        hot_share: HOT_SHARE,
        deadline_ms: POLICY.wait_timeout_ms,
        client_slack: Duration::from_secs(5),
    };
    let urls = cluster.replicas.iter().map(|r| r.url()).collect();
    let running = tokio::spawn(load::run(load, urls, duration, seed, answers.clone()));
    let until_ms = now_ms() + duration.saturating_sub(QUIET_TAIL).as_millis() as u64;
    let injected = inject(
        &mut cluster,
        store,
        &mut StdRng::seed_from_u64(seed),
        until_ms,
    )
    .await;
    let sent = running.await.expect("the load ran");
    println!("chaos: {sent} requests sent, {injected} faults injected");

    // Stopped replicas have written their last lines.
    cluster.stop_replicas();
    fetches.flush();
    let digests = leases::digests(&cluster.first_config(0), KEYS);
    let lease_journal = Journal::create(&dir.join(LEASES));
    for replica in &cluster.replicas {
        for incarnation in 1..=replica.incarnation {
            let log = replica_log(&dir, replica.slot, incarnation);
            for line in leases::read(&log, replica.slot, incarnation, &digests) {
                lease_journal.write(&line);
            }
        }
    }
    lease_journal.flush();

    let summary = checker::check(&dir, store, POLICY, tolerance_ms, secs, seed);
    let text = serde_json::to_string_pretty(&summary).expect("the summary serialises");
    println!("chaos summary:\n{text}");
    if summary.violation_count() > 0 && std::env::var("CORRAL_CHAOS_OUT").is_err() {
        let kept = temp.keep();
        println!("chaos: journals kept in {}", kept.display());
    }
    assert_eq!(
        summary.violation_count(),
        0,
        "the soak broke corral's promises:\n{text}"
    );
    // A run that did nothing proves nothing.
    assert!(
        summary.statuses.get("200").copied().unwrap_or(0) > 0,
        "no request succeeded"
    );
    assert!(
        summary.fetches > 0 && summary.commits > 0,
        "nothing was fetched and committed"
    );
    assert!(injected > 0, "no fault was injected");
}

/// Injects faults one at a time until `until_ms`: a healthy gap, then one fault held for a while
/// and healed. Returns how many were injected.
async fn inject(cluster: &mut Cluster, store: StoreKind, rng: &mut StdRng, until_ms: u64) -> u64 {
    let most = (until_ms.saturating_sub(now_ms())) / GAP_MS.start + 1;
    let mut injected = 0;
    while injected < most {
        tokio::time::sleep(Duration::from_millis(rng.random_range(GAP_MS))).await;
        if now_ms() >= until_ms {
            break;
        }
        let hold = Duration::from_millis(rng.random_range(HOLD_MS));
        let slot = rng.random_range(0..REPLICAS);
        // Over the NATS key-value store Redis is not used: its faults would test nothing.
        let fault = match store {
            StoreKind::Redis => rng.random_range(0..6),
            StoreKind::NatsKv => [0, 1, 4, 5][rng.random_range(0..4)],
        };
        match fault {
            0 => {
                cluster.kill_replica(slot);
                tokio::time::sleep(hold).await;
                cluster.restart_replica(slot).await;
            }
            1 => {
                cluster.pause_replica(slot);
                tokio::time::sleep(hold).await;
                cluster.resume_replica(slot);
            }
            2 => {
                cluster.kill_redis();
                tokio::time::sleep(hold).await;
                cluster.restart_redis().await;
            }
            3 => {
                cluster.pause_redis();
                tokio::time::sleep(hold).await;
                cluster.resume_redis();
            }
            4 => {
                cluster.kill_nats();
                tokio::time::sleep(hold).await;
                cluster.restart_nats().await;
            }
            _ => {
                cluster.pause_nats();
                tokio::time::sleep(hold).await;
                cluster.resume_nats();
            }
        }
        injected += 1;
    }
    injected
}
