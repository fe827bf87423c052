//! The dictionary's behaviour across replicas, on every backend: the original "build once, read
//! many" suite, plus what it lacked (dead leaders, lost events, renewals, store-call counts, expiry,
//! corrupt values).

use crate::on_every_backend;
use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use corral::engine::{Dictionary, DictionaryConfig, DictionaryError, Expiry, Status};
use tokio::time::{Instant, sleep, sleep_until};

const MS: Duration = Duration::from_millis(1);

fn config(name: &str) -> DictionaryConfig {
    DictionaryConfig::new(name, Expiry::Absolute(Duration::from_secs(60)))
}

/// A build function that counts its calls, sleeps `took`, and answers `value`.
fn counted(
    builds: &Arc<AtomicUsize>,
    took: Duration,
    value: &'static str,
) -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = Result<String, String>> + Send>>
+ Send
+ Sync
+ 'static {
    let builds = builds.clone();
    move || {
        builds.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            sleep(took).await;
            Ok(value.to_string())
        })
    }
}

type Dict = Dictionary<String, String>;

fn key(text: &str) -> String {
    text.to_string()
}

on_every_backend! {
    async fn a_stampede_over_three_replicas_builds_once(cluster) {
        let replicas: Vec<Dict> = cluster.dictionaries(3, &config("stampede")).await;
        let builds = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let mut calls = Vec::new();
        for i in 0..100 {
            let replica = replicas[i % 3].clone();
            let build = counted(&builds, Duration::from_secs(1), "value");
            calls.push(tokio::spawn(async move {
                replica.build_or_retrieve(&key("k"), build, Duration::from_secs(2)).await
            }));
        }
        sleep_until(start + 850 * MS).await;
        for i in 0..200 {
            let replica = replicas[i % 3].clone();
            let build = counted(&builds, Duration::from_secs(1), "value");
            calls.push(tokio::spawn(async move {
                replica.build_or_retrieve(&key("k"), build, Duration::from_millis(500)).await
            }));
            sleep(MS).await;
        }
        for call in calls {
            assert_eq!(call.await.unwrap(), Ok("value".to_string()));
        }
        assert_eq!(builds.load(Ordering::SeqCst), 1);
    }

    async fn a_built_value_is_never_built_again(cluster) {
        let replicas: Vec<Dict> = cluster.dictionaries(3, &config("built")).await;
        let first = Arc::new(AtomicUsize::new(0));
        let value = replicas[0]
            .build_or_retrieve(&key("k"), counted(&first, MS, "first"), Duration::from_secs(2))
            .await;
        assert_eq!(value, Ok("first".to_string()));
        let second = Arc::new(AtomicUsize::new(0));
        let calls: Vec<_> = (0..100)
            .map(|i| {
                let replica = replicas[i % 3].clone();
                let build = counted(&second, MS, "second");
                tokio::spawn(async move {
                    replica.build_or_retrieve(&key("k"), build, Duration::from_secs(2)).await
                })
            })
            .collect();
        for call in calls {
            assert_eq!(call.await.unwrap(), Ok("first".to_string()));
        }
        assert_eq!(second.load(Ordering::SeqCst), 0);
    }

    async fn a_failure_reaches_its_waiters_and_later_callers_succeed(cluster) {
        let replicas: Vec<Dict> = cluster.dictionaries(3, &config("failing")).await;
        let start = Instant::now();
        let mut calls = Vec::new();
        for i in 0..100 {
            let replica = replicas[i % 3].clone();
            let build = move || async move {
                sleep(10 * MS).await;
                if start.elapsed() < Duration::from_millis(50) {
                    Err("failure".to_string())
                } else {
                    Ok("success".to_string())
                }
            };
            calls.push(tokio::spawn(async move {
                replica.build_or_retrieve(&key("k"), build, Duration::from_secs(2)).await
            }));
            sleep(MS).await;
        }
        let (mut failures, mut successes) = (0, 0);
        for call in calls {
            match call.await.unwrap() {
                Err(DictionaryError::Build(message)) => {
                    assert_eq!(message, "failure");
                    failures += 1;
                }
                Ok(value) => {
                    assert_eq!(value, "success");
                    successes += 1;
                }
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
        assert!(failures > 1, "{failures} failures");
        assert!(successes > 1, "{successes} successes");
    }

    async fn a_caller_gives_up_at_its_timeout_but_a_patient_one_gets_the_value(cluster) {
        let replicas: Vec<Dict> = cluster.dictionaries(2, &config("slow")).await;
        let builds = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let (a, b) = (key("a"), key("b"));
        let impatient = async {
            let got = replicas[0]
                .build_or_retrieve(&a, counted(&builds, Duration::from_secs(3), "a"), Duration::from_secs(2))
                .await;
            (got, start.elapsed())
        };
        let patient = replicas[1].build_or_retrieve(&b, counted(&builds, Duration::from_secs(3), "b"), Duration::from_secs(4));
        let ((impatient, gave_up_after), patient) = tokio::join!(impatient, patient);
        assert!(matches!(impatient, Err(DictionaryError::Timeout(_))), "{impatient:?}");
        assert!(
            gave_up_after >= Duration::from_millis(1900) && gave_up_after < Duration::from_millis(2900),
            "the impatient caller gave up at {gave_up_after:?}, not at its 2 s timeout"
        );
        assert_eq!(patient, Ok("b".to_string()));
        let took = start.elapsed();
        assert!(took >= Duration::from_secs(3), "the patient caller waited for the build: {took:?}");
    }

    async fn a_build_over_max_fetch_is_abandoned_and_built_again_once(cluster) {
        let mut config = config("overrun");
        config.max_fetch = Duration::from_millis(500);
        let replicas: Vec<Dict> = cluster.dictionaries(3, &config).await;
        let builds = Arc::new(AtomicUsize::new(0));
        let build = {
            let builds = builds.clone();
            move || {
                let n = builds.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n == 0 {
                        sleep(Duration::from_secs(5)).await;
                        Ok::<_, String>("first".to_string())
                    } else {
                        sleep(100 * MS).await;
                        Ok("second".to_string())
                    }
                }
            }
        };
        let build = Arc::new(build);
        let first = {
            let (replica, build) = (replicas[0].clone(), build.clone());
            tokio::spawn(async move {
                replica.build_or_retrieve(&key("k"), move || build(), Duration::from_secs(3)).await
            })
        };
        sleep(600 * MS).await;
        let later: Vec<_> = (0..30)
            .map(|i| {
                let (replica, build) = (replicas[i % 3].clone(), build.clone());
                tokio::spawn(async move {
                    replica.build_or_retrieve(&key("k"), move || build(), Duration::from_secs(2)).await
                })
            })
            .collect();
        // The abandoned build's own caller learns it overran; everyone after re-elects.
        let first = first.await.unwrap();
        assert!(
            matches!(&first, Err(DictionaryError::Build(message)) if message.contains("max_fetch")),
            "{first:?}"
        );
        for call in later {
            assert_eq!(call.await.unwrap(), Ok("second".to_string()));
        }
        assert_eq!(builds.load(Ordering::SeqCst), 2);
    }

    async fn get_waits_for_a_pending_build_and_errors_at_once_on_an_empty_key(cluster) {
        let replicas: Vec<Dict> = cluster.dictionaries(3, &config("get")).await;
        let builds = Arc::new(AtomicUsize::new(0));
        for (name, patience, expect_value) in [("patient", 3000, true), ("impatient", 500, false)] {
            let leader = {
                let replica = replicas[0].clone();
                let build = counted(&builds, Duration::from_secs(1), "value");
                tokio::spawn(async move {
                    replica.build_or_retrieve(&key(name), build, Duration::from_secs(3)).await
                })
            };
            support::eventually("the build is pending", || async {
                replicas[1].status(&key(name)).await == Ok(Status::Pending)
            })
            .await;
            let gets: Vec<_> = (0..30)
                .map(|i| {
                    let replica = replicas[i % 3].clone();
                    tokio::spawn(async move {
                        replica.get(&key(name), Duration::from_millis(patience)).await
                    })
                })
                .collect();
            for get in gets {
                let got = get.await.unwrap();
                if expect_value {
                    assert_eq!(got, Ok("value".to_string()));
                } else {
                    assert!(matches!(got, Err(DictionaryError::Timeout(_))), "{got:?}");
                }
            }
            assert_eq!(leader.await.unwrap(), Ok("value".to_string()));
        }
        let started = Instant::now();
        let missing = replicas[2].get(&key("missing"), Duration::from_secs(5)).await;
        assert_eq!(
            missing.unwrap_err().to_string(),
            "key missing does not exist in cache get"
        );
        assert!(started.elapsed() < Duration::from_secs(1), "answered at once, not at the timeout");
    }

    async fn status_moves_from_empty_to_pending_to_exists_and_back_and_never_touches_the_ttl(cluster) {
        let replicas: Vec<Dict> = cluster.dictionaries(2, &config("status")).await;
        let k = key("k");
        let hash = replicas[0].key_hash(&k).unwrap();
        assert_eq!(replicas[1].status(&k).await, Ok(Status::Empty));
        let builds = Arc::new(AtomicUsize::new(0));
        let build = {
            let replica = replicas[0].clone();
            let build = counted(&builds, Duration::from_millis(700), "value");
            let k = k.clone();
            tokio::spawn(async move { replica.build_or_retrieve(&k, build, Duration::from_secs(3)).await })
        };
        support::eventually("pending during the build", || async {
            replicas[1].status(&k).await == Ok(Status::Pending)
        })
        .await;
        assert_eq!(build.await.unwrap(), Ok("value".to_string()));
        assert_eq!(replicas[1].status(&k).await, Ok(Status::Exists));
        let before = cluster.value_ttl("status", &hash).await.expect("stored");
        for _ in 0..20 {
            replicas[1].status(&k).await.unwrap();
        }
        let after = cluster.value_ttl("status", &hash).await.expect("stored");
        assert!(after <= before, "status changed the TTL: {before:?} -> {after:?}");
        replicas[1].delete(&k).await.unwrap();
        assert_eq!(replicas[0].status(&k).await, Ok(Status::Empty));
    }

    async fn delete_while_callers_race_a_rebuild_builds_exactly_twice(cluster) {
        let replicas: Vec<Dict> = cluster.dictionaries(3, &config("race")).await;
        let builds = Arc::new(AtomicUsize::new(0));
        let first = replicas[0]
            .build_or_retrieve(&key("k"), counted(&builds, 50 * MS, "value"), Duration::from_secs(2))
            .await;
        assert_eq!(first, Ok("value".to_string()));
        replicas[1].delete(&key("k")).await.unwrap();
        let calls: Vec<_> = (0..100)
            .map(|i| {
                let replica = replicas[i % 3].clone();
                let build = counted(&builds, 200 * MS, "value");
                tokio::spawn(async move {
                    replica.build_or_retrieve(&key("k"), build, Duration::from_secs(3)).await
                })
            })
            .collect();
        for call in calls {
            assert_eq!(call.await.unwrap(), Ok("value".to_string()));
        }
        assert_eq!(builds.load(Ordering::SeqCst), 2);
    }

    async fn delete_during_a_build_keeps_its_result_out_of_the_store(cluster) {
        let replicas: Vec<Dict> = cluster.dictionaries(2, &config("purged")).await;
        let builds = Arc::new(AtomicUsize::new(0));
        let build = {
            let replica = replicas[0].clone();
            let build = counted(&builds, Duration::from_millis(800), "old");
            tokio::spawn(async move { replica.build_or_retrieve(&key("k"), build, Duration::from_secs(3)).await })
        };
        support::eventually("pending", || async {
            replicas[1].status(&key("k")).await == Ok(Status::Pending)
        })
        .await;
        replicas[1].delete(&key("k")).await.unwrap();
        assert_eq!(build.await.unwrap(), Ok("old".to_string()), "its own caller still gets it");
        assert_eq!(replicas[1].status(&key("k")).await, Ok(Status::Empty));
        let rejected = replicas[0].engine().metrics().lease_count("commit_rejected");
        assert_eq!(rejected, 1);
    }

    async fn the_l1_fills_is_dropped_everywhere_on_delete_and_expires(cluster) {
        let mut config = config("l1");
        // Long enough that on a loaded machine the copies are dropped by the delete's event, not by
        // their own expiry (which would let a late event drop the rebuilt copy below).
        config.expiry = Expiry::Absolute(Duration::from_millis(3000));
        let replicas: Vec<Dict> = cluster.dictionaries(3, &config).await;
        let builds = Arc::new(AtomicUsize::new(0));
        let hash = replicas[0].key_hash(&key("k")).unwrap();
        for replica in &replicas {
            let got = replica
                .build_or_retrieve(&key("k"), counted(&builds, MS, "value"), Duration::from_secs(2))
                .await;
            assert_eq!(got, Ok("value".to_string()));
            assert!(replica.engine().l1().contains(&hash));
        }
        replicas[0].delete(&key("k")).await.unwrap();
        support::eventually("every replica dropped its L1 copy", || async {
            replicas.iter().all(|r| !r.engine().l1().contains(&hash))
        })
        .await;
        let got = replicas[1]
            .build_or_retrieve(&key("k"), counted(&builds, MS, "value"), Duration::from_secs(2))
            .await;
        assert_eq!(got, Ok("value".to_string()));
        assert!(replicas[1].engine().l1().contains(&hash));
        sleep(Duration::from_millis(3100)).await;
        assert!(!replicas[1].engine().l1().contains(&hash), "expired with the store's copy");
        assert_eq!(builds.load(Ordering::SeqCst), 2);
    }

    async fn a_crashed_leader_is_replaced_within_a_lease_ttl_and_a_poll(cluster) {
        let mut config = config("crash");
        config.lease_ttl = Duration::from_secs(1);
        config.poll_interval = Duration::from_secs(1);
        let replicas: Vec<Dict> = cluster.dictionaries(3, &config).await;
        let builds = Arc::new(AtomicUsize::new(0));
        let build = {
            let builds = builds.clone();
            move || {
                let n = builds.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n == 0 {
                        sleep(Duration::from_secs(30)).await;
                    }
                    Ok::<_, String>(format!("built by build {n}"))
                }
            }
        };
        let build = Arc::new(build);
        let leader = {
            let (replica, build) = (replicas[0].clone(), build.clone());
            tokio::spawn(async move { replica.build_or_retrieve(&key("k"), move || build(), Duration::from_secs(30)).await })
        };
        support::eventually("the leader holds the lease", || async {
            replicas[1].status(&key("k")).await == Ok(Status::Pending)
        })
        .await;
        let followers: Vec<_> = (0..20)
            .map(|i| {
                let (replica, build) = (replicas[1 + i % 2].clone(), build.clone());
                tokio::spawn(async move {
                    replica.build_or_retrieve(&key("k"), move || build(), Duration::from_secs(10)).await
                })
            })
            .collect();
        support::eventually("followers are waiting", || async {
            replicas[1].engine().metrics().followers_waiting.get() > 0
                && replicas[2].engine().metrics().followers_waiting.get() > 0
        })
        .await;
        let crashed_at = Instant::now();
        replicas[0].engine().crash().await;
        for follower in followers {
            assert_eq!(follower.await.unwrap(), Ok("built by build 1".to_string()));
        }
        let took = crashed_at.elapsed();
        assert!(took < Duration::from_millis(2500), "served {took:?} after the crash");
        assert_eq!(builds.load(Ordering::SeqCst), 2);
        leader.abort();
    }

    async fn a_lost_event_costs_followers_at_most_a_poll(cluster) {
        let mut config = config("lost");
        config.poll_interval = Duration::from_millis(500);
        let replicas: Vec<Dict> = cluster.dictionaries(3, &config).await;
        let builds = Arc::new(AtomicUsize::new(0));
        let leader = {
            let replica = replicas[0].clone();
            let build = counted(&builds, Duration::from_secs(1), "value");
            tokio::spawn(async move {
                let got = replica.build_or_retrieve(&key("k"), build, Duration::from_secs(5)).await;
                (got, Instant::now())
            })
        };
        support::eventually("pending", || async {
            replicas[1].status(&key("k")).await == Ok(Status::Pending)
        })
        .await;
        let followers: Vec<_> = (0..20)
            .map(|i| {
                let replica = replicas[1 + i % 2].clone();
                let build = counted(&builds, MS, "never");
                tokio::spawn(async move {
                    let got = replica.build_or_retrieve(&key("k"), build, Duration::from_secs(5)).await;
                    (got, Instant::now())
                })
            })
            .collect();
        // Drop the subscriptions mid-build, the way a network fault would.
        if let Some(redis) = &cluster.redis
            && cluster.nats.is_none()
        {
            assert!(redis.kill_pubsub_clients().await >= 2);
        } else {
            replicas[1].engine().sever_bus().await;
            replicas[2].engine().sever_bus().await;
        }
        let (got, committed_at) = leader.await.unwrap();
        assert_eq!(got, Ok("value".to_string()));
        for follower in followers {
            let (got, at) = follower.await.unwrap();
            assert_eq!(got, Ok("value".to_string()));
            let late = at.saturating_duration_since(committed_at);
            assert!(late < Duration::from_millis(700), "follower answered {late:?} after the commit");
        }
        assert_eq!(builds.load(Ordering::SeqCst), 1);
    }

    async fn a_build_three_lease_ttls_long_is_renewed_and_runs_once(cluster) {
        let mut config = config("renewed");
        // As short as the store keeps (NATS KV counts whole seconds).
        let lease_ttl = Duration::from_millis(500).max(cluster.min_lease_ttl());
        config.lease_ttl = lease_ttl;
        let replicas: Vec<Dict> = cluster.dictionaries(3, &config).await;
        let builds = Arc::new(AtomicUsize::new(0));
        let calls: Vec<_> = (0..30)
            .map(|i| {
                let replica = replicas[i % 3].clone();
                let build = counted(&builds, lease_ttl * 3, "value");
                tokio::spawn(async move {
                    replica.build_or_retrieve(&key("k"), build, lease_ttl * 10).await
                })
            })
            .collect();
        for call in calls {
            assert_eq!(call.await.unwrap(), Ok("value".to_string()));
        }
        assert_eq!(builds.load(Ordering::SeqCst), 1);
        let renewals: u64 = replicas.iter().map(|r| r.engine().metrics().lease_count("renewed")).sum();
        assert!(renewals >= 2, "{renewals} renewals");
    }

    async fn store_calls_grow_with_replicas_not_callers(cluster) {
        let replicas: Vec<Dict> = cluster.dictionaries(3, &config("calls")).await;
        let builds = Arc::new(AtomicUsize::new(0));
        // Warm up scripts and connections on another key.
        replicas[0].build_or_retrieve(&key("warm"), counted(&builds, MS, "w"), Duration::from_secs(2)).await.unwrap();
        if let Some(redis) = &cluster.redis {
            redis.reset_stats().await;
        }
        let acquires_before = replicas[0].engine().metrics().store_calls("acquire");
        let calls: Vec<_> = (0..1000)
            .map(|_| {
                let replica = replicas[0].clone();
                let build = counted(&builds, 100 * MS, "one");
                tokio::spawn(async move { replica.build_or_retrieve(&key("one"), build, Duration::from_secs(5)).await })
            })
            .collect();
        for call in calls {
            assert_eq!(call.await.unwrap(), Ok("one".to_string()));
        }
        assert_eq!(replicas[0].engine().metrics().store_calls("acquire") - acquires_before, 1);
        if let Some(redis) = &cluster.redis {
            // One ACQUIRE and one COMMIT script.
            let scripts = redis.command_calls("evalsha").await + redis.command_calls("eval").await;
            assert_eq!(scripts, 2);
        }

        let before: Vec<u64> = replicas.iter().map(total_store_calls).collect();
        let calls: Vec<_> = (0..300)
            .map(|i| {
                let replica = replicas[i % 3].clone();
                let build = counted(&builds, 300 * MS, "many");
                tokio::spawn(async move { replica.build_or_retrieve(&key("many"), build, Duration::from_secs(5)).await })
            })
            .collect();
        for call in calls {
            assert_eq!(call.await.unwrap(), Ok("many".to_string()));
        }
        for (replica, before) in replicas.iter().zip(before) {
            let made = total_store_calls(replica) - before;
            assert!(made <= 4, "{made} store calls for 100 callers on one replica");
        }
        assert_eq!(builds.load(Ordering::SeqCst), 3);
    }

    async fn absolute_expiry_is_not_extended_by_reads_and_sliding_expiry_is_without_a_rewrite(cluster) {
        let absolute: Vec<Dict> = cluster
            .dictionaries(1, &DictionaryConfig::new("absolute", Expiry::Absolute(Duration::from_secs(2))))
            .await;
        let mut sliding_config = DictionaryConfig::new("sliding", Expiry::Sliding(Duration::from_secs(2)));
        sliding_config.l1_max_bytes = 0;
        let sliding: Vec<Dict> = cluster.dictionaries(1, &sliding_config).await;
        let builds = Arc::new(AtomicUsize::new(0));
        let (a, s) = (&absolute[0], &sliding[0]);
        a.build_or_retrieve(&key("k"), counted(&builds, MS, "a"), Duration::from_secs(2)).await.unwrap();
        s.build_or_retrieve(&key("k"), counted(&builds, MS, "s"), Duration::from_secs(2)).await.unwrap();
        let (ah, sh) = (a.key_hash(&key("k")).unwrap(), s.key_hash(&key("k")).unwrap());
        let stored = cluster.raw_value("sliding", &sh).await.expect("stored");
        sleep(Duration::from_millis(600)).await;
        for _ in 0..5 {
            assert_eq!(a.build_or_retrieve(&key("k"), counted(&builds, MS, "x"), Duration::from_secs(2)).await, Ok("a".into()));
            assert_eq!(s.get(&key("k"), Duration::from_secs(2)).await, Ok("s".into()));
        }
        let a_ttl = cluster.value_ttl("absolute", &ah).await.expect("absolute still stored");
        let s_ttl = cluster.value_ttl("sliding", &sh).await.expect("sliding still stored");
        assert!(a_ttl <= Duration::from_millis(1400), "absolute TTL was extended: {a_ttl:?}");
        assert!(s_ttl > Duration::from_millis(1800), "sliding TTL was not extended: {s_ttl:?}");
        assert_eq!(cluster.raw_value("sliding", &sh).await, Some(stored), "the value was rewritten");
        assert_eq!(builds.load(Ordering::SeqCst), 2);
    }

    async fn a_corrupt_or_foreign_value_is_a_miss_and_is_rebuilt(cluster) {
        let mut config = config("corrupt");
        config.l1_max_bytes = 0;
        let replicas: Vec<Dict> = cluster.dictionaries(2, &config).await;
        let builds = Arc::new(AtomicUsize::new(0));
        let (bad, other) = (key("bad"), key("other"));
        let bad_hash = replicas[0].key_hash(&bad).unwrap();
        let other_hash = replicas[0].key_hash(&other).unwrap();
        cluster.put_raw_value("corrupt", &bad_hash, bytes::Bytes::from_static(b"\x00garbage")).await;
        let got = replicas[0].build_or_retrieve(&bad, counted(&builds, MS, "rebuilt"), Duration::from_secs(2)).await;
        assert_eq!(got, Ok("rebuilt".to_string()));
        // A valid envelope of another key, copied under this key's name.
        replicas[0].build_or_retrieve(&other, counted(&builds, MS, "other"), Duration::from_secs(2)).await.unwrap();
        let foreign = cluster.raw_value("corrupt", &other_hash).await.unwrap();
        replicas[0].delete(&bad).await.unwrap();
        cluster.put_raw_value("corrupt", &bad_hash, foreign).await;
        let got = replicas[1].build_or_retrieve(&bad, counted(&builds, MS, "again"), Duration::from_secs(2)).await;
        assert_eq!(got, Ok("again".to_string()));
        assert_eq!(builds.load(Ordering::SeqCst), 3);
        let corrupt: u64 = replicas.iter().map(|r| r.engine().metrics().corrupt_entries.get()).sum();
        assert_eq!(corrupt, 2);
    }
}

fn total_store_calls(replica: &Dict) -> u64 {
    [
        "acquire", "peek", "renew", "commit", "release", "give_up", "discard", "status", "purge",
    ]
    .iter()
    .map(|op| replica.engine().metrics().store_calls(op))
    .sum()
}

/// The leader publishes on one bus and its followers listen on another, so the READY event is lost
/// by construction: the safety poll alone must answer them, within one poll interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_never_arrives_costs_at_most_one_poll() {
    use corral::bus::memory::MemoryBusHub;
    use corral::engine::{Backend, BusConfig, StoreConfig};
    use corral::store::memory::MemoryStore;

    let store = StoreConfig::Memory(MemoryStore::new());
    let leader_side = Backend::new(store.clone(), BusConfig::Memory(MemoryBusHub::new()));
    let follower_side = Backend::new(store, BusConfig::Memory(MemoryBusHub::new()));
    let mut config = config("deaf");
    config.poll_interval = Duration::from_millis(400);
    let leader: Dict = Dictionary::open(config.clone(), &leader_side)
        .await
        .unwrap();
    let follower: Dict = Dictionary::open(config, &follower_side).await.unwrap();
    let builds = Arc::new(AtomicUsize::new(0));
    let led = {
        let (leader, build) = (
            leader.clone(),
            counted(&builds, Duration::from_millis(700), "value"),
        );
        tokio::spawn(async move {
            let got = leader
                .build_or_retrieve(&key("k"), build, Duration::from_secs(5))
                .await;
            (got, Instant::now())
        })
    };
    support::eventually("pending", || async {
        follower.status(&key("k")).await == Ok(Status::Pending)
    })
    .await;
    let followed = follower
        .build_or_retrieve(
            &key("k"),
            counted(&builds, MS, "never"),
            Duration::from_secs(5),
        )
        .await;
    let answered_at = Instant::now();
    let (got, committed_at) = led.await.unwrap();
    assert_eq!(got, Ok("value".to_string()));
    assert_eq!(followed, Ok("value".to_string()));
    let late = answered_at.saturating_duration_since(committed_at);
    // At most one jittered poll (+20%) after the commit.
    assert!(
        late <= Duration::from_millis(480) + 50 * MS,
        "answered {late:?} after the commit"
    );
    let metrics = follower.engine().metrics();
    assert!(metrics.poll_rechecks.with_label_values(&["true"]).get() >= 1);
    assert_eq!(builds.load(Ordering::SeqCst), 1);
}
