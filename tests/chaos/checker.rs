//! The checker: reads a run's journals and asserts corral's promises against them.
//!
//! Faults make windows of time. A *disturbing* fault is one that may legitimately cost an extra
//! fetch: a replica killed or paused (its lease can expire under it), or the store killed, restarted
//! or paused (leases and values are lost, or replicas fall back to local builds). Its window runs
//! from its start (less a grace) to its healing plus `lease_ttl + poll_interval` plus a grace.
//! Faults of the bus alone (NATS, with the Redis store) are not disturbing: a lost event may cost
//! waiting time, never a fetch.
//!
//! What is checked:
//!
//! - every 200 body belongs to the requested key, is complete (length and checksum), and is the
//!   body of a fetch the origin really made for that key;
//! - no answer (status, transport error or client timeout) comes later than `wait_timeout` plus a
//!   tolerance, and no transport error happens, unless the replica that was asked was killed or
//!   paused meanwhile;
//! - no 200 serves a body past its freshness (its commit, or the fetch's end when no commit was
//!   logged, plus `ttl`, plus the tolerance) unless a store fault happened since that fetch;
//! - per key and replica process: never two fetches in flight at once (one flight per key per
//!   process, store up or down), except across a kill of that replica;
//! - per key, outside disturbing windows: no two fetches in flight at once (one fetch per lease),
//!   no fetch while a committed value of that key is fresh, and every fetch follows a lease its
//!   replica acquired for that key at most `lease_ttl` plus a grace before;
//! - every lease token commits at most once and only after it was acquired, every commit names a
//!   known key, and no key has more commits than fetches.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use serde::Serialize;

use crate::cluster::{Policy, StoreKind};
use crate::journal::{
    ANSWERS, Action, Answer, BodyCheck, FAULTS, FETCHES, Fault, Fetch, LEASES, Lease, LeaseStep,
    SUMMARY, read,
};

/// Slack for two clocks read at slightly different points (the replica's log line and the origin's
/// arrival), and for a loaded machine, ms.
const GRACE_MS: u64 = 1_000;
/// After a replica comes back, a client may still meet a pooled connection to its old process.
const RECONNECT_MS: u64 = 3_000;
/// Violations listed in full in the summary (all are counted).
const LISTED: usize = 30;

/// One fault from its start to its healing.
#[derive(Clone, Debug)]
struct Episode {
    target: String,
    action: Action,
    start: u64,
    /// When it was healed; `u64::MAX` if never.
    end: u64,
}

/// The outcome of a check.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub store: String,
    pub duration_s: u64,
    pub seed: u64,
    pub requests: u64,
    pub statuses: BTreeMap<String, u64>,
    pub x_cache: BTreeMap<String, u64>,
    pub bodies: BTreeMap<String, u64>,
    pub latency_ms_p50: u64,
    pub latency_ms_p99: u64,
    pub latency_ms_max: u64,
    pub fetches: u64,
    /// Fetches that started outside every disturbing window (each one a fill).
    pub fetches_healthy: u64,
    /// Fetches that started inside a disturbing window.
    pub fetches_disturbed: u64,
    pub leases_acquired: u64,
    pub commits: u64,
    pub faults: BTreeMap<String, u64>,
    pub violations: BTreeMap<String, u64>,
    pub first_violations: Vec<String>,
}

impl Summary {
    pub fn violation_count(&self) -> u64 {
        self.violations.values().sum()
    }
}

#[derive(Default)]
struct Violations {
    counts: BTreeMap<String, u64>,
    listed: Vec<String>,
}

impl Violations {
    fn add(&mut self, kind: &str, detail: String) {
        *self.counts.entry(kind.to_string()).or_default() += 1;
        if self.listed.len() < LISTED {
            self.listed.push(format!("{kind}: {detail}"));
        }
    }
}

fn episodes(faults: &[Fault]) -> Vec<Episode> {
    let mut open: HashMap<String, Episode> = HashMap::new();
    let mut out = Vec::new();
    for fault in faults {
        match fault.action {
            Action::Kill | Action::Pause => {
                open.insert(
                    fault.target.clone(),
                    Episode {
                        target: fault.target.clone(),
                        action: fault.action,
                        start: fault.at_ms,
                        end: u64::MAX,
                    },
                );
            }
            Action::Restart | Action::Resume => {
                if let Some(mut episode) = open.remove(&fault.target) {
                    episode.end = fault.at_ms;
                    out.push(episode);
                }
            }
        }
    }
    out.extend(open.into_values());
    out.sort_by_key(|e| e.start);
    out
}

fn within(t: u64, from: u64, to: u64) -> bool {
    from <= t && t <= to
}

/// Reads the journals in `dir` and checks them; writes `summary.json` beside them.
pub fn check(
    dir: &Path,
    store: StoreKind,
    policy: Policy,
    tolerance_ms: u64,
    duration_s: u64,
    seed: u64,
) -> Summary {
    let fetches: Vec<Fetch> = read(&dir.join(FETCHES));
    let answers: Vec<Answer> = read(&dir.join(ANSWERS));
    let faults: Vec<Fault> = read(&dir.join(FAULTS));
    let leases: Vec<Lease> = read(&dir.join(LEASES));
    let episodes = episodes(&faults);
    let mut v = Violations::default();

    let store_target = match store {
        StoreKind::Redis => "redis",
        StoreKind::NatsKv => "nats",
    };
    let after_healing = policy.lease_ttl_ms + policy.poll_ms + GRACE_MS;
    let disturbing: Vec<(u64, u64)> = episodes
        .iter()
        .filter(|e| e.target == store_target || e.target.starts_with("replica-"))
        .map(|e| {
            (
                e.start.saturating_sub(GRACE_MS),
                e.end.saturating_add(after_healing),
            )
        })
        .collect();
    let disturbed = |t: u64| disturbing.iter().any(|&(from, to)| within(t, from, to));
    let store_fault_between = |from: u64, to: u64| {
        episodes.iter().any(|e| {
            e.target == store_target && e.start <= to && e.end.saturating_add(after_healing) >= from
        })
    };
    let replica_fault_between = |replica: usize, from: u64, to: u64| {
        let name = format!("replica-{replica}");
        episodes.iter().any(|e| {
            e.target == name
                && e.start <= to + GRACE_MS
                && e.end.saturating_add(RECONNECT_MS) >= from
        })
    };
    let replica_killed_between = |replica: usize, from: u64, to: u64| {
        let name = format!("replica-{replica}");
        episodes.iter().any(|e| {
            e.target == name
                && e.action == Action::Kill
                && within(e.start, from.saturating_sub(GRACE_MS), to + GRACE_MS)
        })
    };

    // ---------------------------------------------------------------- answers ----
    let mut commits_by: HashMap<(&str, usize), Vec<u64>> = HashMap::new();
    for l in leases.iter().filter(|l| l.step == LeaseStep::Committed) {
        if let Some(key) = &l.key {
            commits_by
                .entry((key, l.replica))
                .or_default()
                .push(l.at_ms);
        }
    }
    commits_by
        .values_mut()
        .for_each(|times| times.sort_unstable());
    let by_fetch: HashMap<(&str, u64), &Fetch> = fetches
        .iter()
        .map(|f| ((f.key.as_str(), f.fetch), f))
        .collect();
    let mut statuses = BTreeMap::new();
    let mut x_cache = BTreeMap::new();
    let mut bodies = BTreeMap::new();
    let mut latencies = Vec::with_capacity(answers.len());
    for a in &answers {
        let status = a.status.map_or("error".to_string(), |s| s.to_string());
        *statuses.entry(status).or_insert(0u64) += 1;
        if let Some(x) = &a.x_cache {
            *x_cache.entry(x.clone()).or_insert(0u64) += 1;
        }
        let took = a.end_ms.saturating_sub(a.start_ms);
        latencies.push(took);
        let excused = replica_fault_between(a.replica, a.start_ms, a.end_ms);
        let what = format!(
            "{} via replica-{} at {} ({} ms, status {:?}, {:?})",
            a.key, a.replica, a.start_ms, took, a.status, a.error
        );
        if took > a.deadline_ms + tolerance_ms && !excused {
            v.add("late", what.clone());
        }
        if a.error.is_some() && !excused {
            v.add("transport-error", what.clone());
        }
        if a.status == Some(200) {
            *bodies
                .entry(format!("{:?}", a.body).to_lowercase())
                .or_insert(0u64) += 1;
            if a.x_cache.is_none() {
                v.add("no-x-cache", what.clone());
            }
            match a.body {
                BodyCheck::Good => {}
                BodyCheck::WrongKey => v.add("wrong-body", what.clone()),
                BodyCheck::Partial => v.add("partial-body", what.clone()),
                BodyCheck::Unparsable | BodyCheck::NotChecked => {
                    v.add("unparsable-body", what.clone())
                }
            }
            if a.body == BodyCheck::Good {
                let fetch = a.fetch.expect("a good body names its fetch");
                match by_fetch.get(&(a.key.as_str(), fetch)) {
                    None => v.add("body-never-fetched", format!("{what}: fetch {fetch}")),
                    Some(f) => {
                        // The store keeps a value fresh for `ttl` from its commit: the first
                        // commit of this key by the fetching replica once the fetch ended (one
                        // flight per key per process), or the fetch's end if none was logged.
                        let fetched = f.at_ms + f.latency_ms;
                        let committed = commits_by
                            .get(&(f.key.as_str(), f.replica))
                            .and_then(|times| times.iter().copied().find(|&c| c >= fetched))
                            .unwrap_or(fetched);
                        let fresh_until = committed + policy.ttl_ms;
                        if a.start_ms > fresh_until + tolerance_ms
                            && !store_fault_between(f.at_ms, a.start_ms)
                        {
                            v.add(
                                "stale-answer",
                                format!("{what}: fetch {fetch} fresh until {fresh_until}"),
                            );
                        }
                    }
                }
            }
        }
    }
    latencies.sort_unstable();
    let percentile = |p: f64| -> u64 {
        if latencies.is_empty() {
            return 0;
        }
        let i = ((latencies.len() - 1) as f64 * p).round() as usize;
        latencies[i]
    };

    // ---------------------------------------------------------------- fetches ----
    let mut per_key: HashMap<&str, Vec<&Fetch>> = HashMap::new();
    for f in &fetches {
        per_key.entry(f.key.as_str()).or_default().push(f);
    }
    let mut commits_per_key: HashMap<&str, Vec<u64>> = HashMap::new();
    let mut acquired: HashMap<(&str, usize), Vec<u64>> = HashMap::new();
    for l in &leases {
        if let Some(key) = &l.key {
            match l.step {
                LeaseStep::Committed => commits_per_key.entry(key).or_default().push(l.at_ms),
                LeaseStep::Acquired => acquired.entry((key, l.replica)).or_default().push(l.at_ms),
            }
        }
    }
    let mut healthy = 0u64;
    for (key, list) in &mut per_key {
        list.sort_by_key(|f| f.at_ms);
        for (i, g) in list.iter().enumerate() {
            let g_disturbed = disturbed(g.at_ms);
            if !g_disturbed {
                healthy += 1;
            }
            for f in &list[..i] {
                if g.at_ms >= f.at_ms + f.latency_ms {
                    continue;
                }
                let what = format!(
                    "{key}: fetch {} (replica-{}, at {}) overlaps fetch {} (replica-{}, at {})",
                    g.fetch, g.replica, g.at_ms, f.fetch, f.replica, f.at_ms
                );
                if f.replica == g.replica {
                    if !replica_killed_between(g.replica, f.at_ms, g.at_ms) {
                        v.add("two-fetches-one-replica", what);
                    }
                } else if !g_disturbed && !disturbed(f.at_ms) {
                    v.add("overlapping-fetches", what);
                }
            }
            if g_disturbed {
                continue;
            }
            if let Some(commits) = commits_per_key.get(key)
                && let Some(c) = commits
                    .iter()
                    .find(|&&c| c + GRACE_MS < g.at_ms && g.at_ms + GRACE_MS < c + policy.ttl_ms)
            {
                v.add(
                    "fetch-while-fresh",
                    format!(
                        "{key}: fetch {} at {} after a commit at {c}",
                        g.fetch, g.at_ms
                    ),
                );
            }
            let led = acquired.get(&(*key, g.replica)).is_some_and(|times| {
                times.iter().any(|&a| {
                    within(
                        a,
                        g.at_ms.saturating_sub(policy.lease_ttl_ms + GRACE_MS),
                        g.at_ms + GRACE_MS,
                    )
                })
            });
            if !led {
                v.add(
                    "fetch-without-lease",
                    format!(
                        "{key}: fetch {} by replica-{} at {}",
                        g.fetch, g.replica, g.at_ms
                    ),
                );
            }
        }
    }

    // ---------------------------------------------------------------- commits ----
    let mut acquired_tokens: HashSet<(&str, &str)> = HashSet::new();
    for l in leases.iter().filter(|l| l.step == LeaseStep::Acquired) {
        acquired_tokens.insert((l.digest.as_str(), l.token.as_str()));
    }
    let mut committed_tokens: HashSet<(&str, &str)> = HashSet::new();
    for l in leases.iter().filter(|l| l.step == LeaseStep::Committed) {
        let what = format!(
            "{} token {} by replica-{}#{} at {}",
            l.key.as_deref().unwrap_or(&l.digest),
            l.token,
            l.replica,
            l.incarnation,
            l.at_ms
        );
        if l.key.is_none() {
            v.add("unknown-digest", what.clone());
        }
        if !committed_tokens.insert((l.digest.as_str(), l.token.as_str())) {
            v.add("double-commit", what.clone());
        }
        if !acquired_tokens.contains(&(l.digest.as_str(), l.token.as_str())) {
            v.add("commit-without-lease", what);
        }
    }
    for (key, commits) in &commits_per_key {
        let fetched = per_key.get(key).map_or(0, Vec::len);
        if commits.len() > fetched {
            v.add(
                "commit-without-fetch",
                format!("{key}: {} commits, {fetched} fetches", commits.len()),
            );
        }
    }

    let mut fault_counts = BTreeMap::new();
    for e in &episodes {
        let name = match (e.action, e.target.starts_with("replica-")) {
            (Action::Kill, true) => "kill replica".to_string(),
            (Action::Pause, true) => "pause replica".to_string(),
            (Action::Kill, false) => format!("kill {}", e.target),
            (_, false) => format!("pause {}", e.target),
            _ => continue,
        };
        *fault_counts.entry(name).or_insert(0u64) += 1;
    }

    let summary = Summary {
        store: format!("{store:?}"),
        duration_s,
        seed,
        requests: answers.len() as u64,
        statuses,
        x_cache,
        bodies,
        latency_ms_p50: percentile(0.5),
        latency_ms_p99: percentile(0.99),
        latency_ms_max: latencies.last().copied().unwrap_or(0),
        fetches: fetches.len() as u64,
        fetches_healthy: healthy,
        fetches_disturbed: fetches.len() as u64 - healthy,
        leases_acquired: leases
            .iter()
            .filter(|l| l.step == LeaseStep::Acquired)
            .count() as u64,
        commits: leases
            .iter()
            .filter(|l| l.step == LeaseStep::Committed)
            .count() as u64,
        faults: fault_counts,
        violations: v.counts,
        first_violations: v.listed,
    };
    std::fs::write(
        dir.join(SUMMARY),
        serde_json::to_string_pretty(&summary).expect("the summary serialises"),
    )
    .expect("write the summary");
    summary
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::POLICY;
    use crate::journal::Journal;

    const T: u64 = 1_800_000_000_000;

    fn fetch(key: &str, n: u64, replica: usize, at_ms: u64) -> Fetch {
        Fetch {
            at_ms,
            key: key.into(),
            fetch: n,
            replica,
            latency_ms: 500,
            len: 10,
        }
    }

    fn lease(key: &str, step: LeaseStep, token: &str, replica: usize, at_ms: u64) -> Lease {
        Lease {
            at_ms,
            step,
            key: Some(key.into()),
            digest: format!("digest-of-{key}"),
            token: token.into(),
            replica,
            incarnation: 1,
        }
    }

    fn answer(key: &str, fetch: Option<u64>, body: BodyCheck, start_ms: u64, took: u64) -> Answer {
        Answer {
            start_ms,
            end_ms: start_ms + took,
            key: key.into(),
            replica: 0,
            status: Some(200),
            x_cache: Some("HIT".into()),
            body,
            fetch,
            deadline_ms: POLICY.wait_timeout_ms,
            error: None,
        }
    }

    fn write<R: Serialize>(dir: &Path, name: &str, records: &[R]) {
        let journal = Journal::create(&dir.join(name));
        records.iter().for_each(|r| journal.write(r));
        journal.flush();
    }

    fn run(fetches: &[Fetch], leases: &[Lease], answers: &[Answer], faults: &[Fault]) -> Summary {
        let dir = tempfile::tempdir().expect("a temporary directory");
        write(dir.path(), FETCHES, fetches);
        write(dir.path(), LEASES, leases);
        write(dir.path(), ANSWERS, answers);
        write(dir.path(), FAULTS, faults);
        check(dir.path(), StoreKind::Redis, POLICY, 1_000, 1, 1)
    }

    /// One healthy fill of `k`: lease, fetch, commit, and an answer with its body.
    fn healthy_fill() -> (Vec<Fetch>, Vec<Lease>, Vec<Answer>) {
        (
            vec![fetch("k", 1, 0, T)],
            vec![
                lease("k", LeaseStep::Acquired, "t1", 0, T - 5),
                lease("k", LeaseStep::Committed, "t1", 0, T + 510),
            ],
            vec![answer("k", Some(1), BodyCheck::Good, T + 600, 3)],
        )
    }

    #[test]
    fn a_clean_run_has_no_violations() {
        let (fetches, leases, answers) = healthy_fill();
        let summary = run(&fetches, &leases, &answers, &[]);
        assert_eq!(summary.violations, BTreeMap::new(), "{summary:?}");
        assert_eq!((summary.fetches, summary.commits), (1, 1));
    }

    #[test]
    fn every_broken_promise_is_named() {
        let (mut fetches, mut leases, mut answers) = healthy_fill();
        // Another replica fetches while the first fetch runs, without a lease.
        fetches.push(fetch("k", 2, 1, T + 100));
        // A fetch while the committed value is fresh, under a lease of its own.
        fetches.push(fetch("k", 3, 2, T + 2_000));
        leases.push(lease("k", LeaseStep::Acquired, "t3", 2, T + 1_990));
        leases.push(lease("k", LeaseStep::Committed, "t3", 2, T + 2_510));
        // The same token commits twice; a token never acquired commits.
        leases.push(lease("k", LeaseStep::Committed, "t1", 0, T + 520));
        leases.push(lease("k", LeaseStep::Committed, "t9", 1, T + 530));
        answers.push(answer("k", Some(1), BodyCheck::WrongKey, T + 700, 2));
        answers.push(answer("k", Some(1), BodyCheck::Partial, T + 700, 2));
        answers.push(answer("k", Some(7), BodyCheck::Good, T + 700, 2));
        answers.push(answer("k", Some(1), BodyCheck::Good, T + 800, 4_500));
        answers.push(answer("k", Some(1), BodyCheck::Good, T + 9_000, 2));
        let summary = run(&fetches, &leases, &answers, &[]);
        let named: Vec<&str> = summary.violations.keys().map(String::as_str).collect();
        assert_eq!(
            named,
            [
                "body-never-fetched",
                "commit-without-fetch",
                "commit-without-lease",
                "double-commit",
                "fetch-while-fresh",
                "fetch-without-lease",
                "late",
                "overlapping-fetches",
                "partial-body",
                "stale-answer",
                "wrong-body",
            ],
            "{summary:#?}"
        );
    }

    #[test]
    fn a_store_fault_excuses_extra_fetches_but_a_bus_fault_does_not() {
        let (mut fetches, mut leases, answers) = healthy_fill();
        fetches.push(fetch("k", 2, 1, T + 100));
        leases.push(lease("k", LeaseStep::Acquired, "t2", 1, T + 95));
        let fault = |target: &str, action, at_ms| Fault {
            at_ms,
            action,
            target: target.into(),
            pid: 1,
        };
        let redis = [
            fault("redis", Action::Kill, T + 50),
            fault("redis", Action::Restart, T + 80),
        ];
        let summary = run(&fetches, &leases, &answers, &redis);
        assert_eq!(summary.violations, BTreeMap::new(), "{summary:?}");
        assert_eq!(summary.fetches_disturbed, 2);

        let nats = [
            fault("nats", Action::Kill, T + 50),
            fault("nats", Action::Restart, T + 80),
        ];
        let summary = run(&fetches, &leases, &answers, &nats);
        assert_eq!(
            summary.violations.keys().collect::<Vec<_>>(),
            ["overlapping-fetches"],
            "{summary:?}"
        );
    }

    #[test]
    fn one_replica_never_runs_two_fetches_of_a_key_unless_it_was_killed() {
        let (mut fetches, mut leases, answers) = healthy_fill();
        fetches.push(fetch("k", 2, 0, T + 100));
        leases.push(lease("k", LeaseStep::Acquired, "t2", 0, T + 95));
        let redis_down = [
            Fault {
                at_ms: T - 100,
                action: Action::Kill,
                target: "redis".into(),
                pid: 1,
            },
            Fault {
                at_ms: T + 3_000,
                action: Action::Restart,
                target: "redis".into(),
                pid: 2,
            },
        ];
        let summary = run(&fetches, &leases, &answers, &redis_down);
        assert_eq!(
            summary.violations.keys().collect::<Vec<_>>(),
            ["two-fetches-one-replica"],
            "{summary:?}"
        );
        let killed = [
            Fault {
                at_ms: T + 50,
                action: Action::Kill,
                target: "replica-0".into(),
                pid: 1,
            },
            Fault {
                at_ms: T + 90,
                action: Action::Restart,
                target: "replica-0".into(),
                pid: 2,
            },
        ];
        let summary = run(&fetches, &leases, &answers, &killed);
        assert_eq!(summary.violations, BTreeMap::new(), "{summary:?}");
    }
}
