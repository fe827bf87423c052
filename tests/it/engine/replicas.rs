//! The byte-level engine across replicas, on every backend: what the proxy will rely on beyond the
//! dictionary (private answers, panics, callers that leave).

use crate::on_every_backend;
use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use corral::engine::{
    AnswerSource, Attachment, BuildError, BuildRole, Builder, Built, EngineError, FailureCause,
    Policy, Private,
};
use corral::envelope::Entry;
use corral::key::{KeyBuilder, KeyHash};
use corral::store::KeyStatus;
use tokio::time::sleep;

fn entry(body: String) -> Entry {
    Entry {
        status: 200,
        headers: vec![("x-who".into(), Bytes::from(body.clone()))],
        body: Bytes::from(body),
        stored_at_ms: 0,
        ttl: Duration::from_secs(60),
        stale: Duration::ZERO,
        stale_if_error: Duration::ZERO,
        fetch_time: Duration::ZERO,
        key: KeyHash::from_bytes([0; 32]),
        form: corral::envelope::Form::Answer,
    }
}

fn key(text: &str) -> KeyHash {
    KeyBuilder::new().part(text).finish().hash
}

/// Each call answers a body no other call answers, after `took`, with its number attached.
fn private_builder(calls: &Arc<AtomicUsize>, took: Duration) -> Builder {
    let calls = calls.clone();
    Arc::new(move |_role| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            sleep(took).await;
            Ok(Built::Private(Private {
                entry: entry(format!("private {n}")),
                reason: "test",
                attachment: Some(Attachment::new(n)),
            }))
        })
    })
}

on_every_backend! {
    async fn a_private_answer_is_never_handed_to_another_caller(cluster) {
        let replicas = cluster.engines(3, "private").await;
        let calls = Arc::new(AtomicUsize::new(0));
        let policy = Policy::default();
        let tasks: Vec<_> = (0..30)
            .map(|i| {
                let (engine, policy) = (replicas[i % 3].clone(), policy.clone());
                let builder = private_builder(&calls, Duration::from_millis(200));
                tokio::spawn(async move {
                    engine.fetch(&key("k"), &policy, builder, Duration::from_secs(5)).await
                })
            })
            .collect();
        let mut bodies = Vec::new();
        for task in tasks {
            let answer = task.await.unwrap().expect("an answer");
            assert_eq!(answer.source, AnswerSource::Own { reason: Some("test") });
            // What the build attached comes with its own answer, and with no other.
            let n = answer.attachment.and_then(Attachment::take::<usize>).expect("attached");
            assert_eq!(answer.entry.body, Bytes::from(format!("private {n}")));
            bodies.push(answer.entry.body.clone());
        }
        let distinct: std::collections::HashSet<_> = bodies.iter().collect();
        assert_eq!(distinct.len(), bodies.len(), "two callers got the same private answer");
        assert_eq!(calls.load(Ordering::SeqCst), 30, "every caller built for itself");
        // The pass marker lets later callers straight through, still privately.
        assert!(matches!(replicas[1].status(&key("k")).await, Ok(KeyStatus::Pass { .. })));
        let later = replicas[2]
            .fetch(&key("k"), &policy, private_builder(&calls, Duration::ZERO), Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(later.source, AnswerSource::Own { reason: Some("test") });
        assert_eq!(later.entry.body, Bytes::from("private 30"));
    }

    async fn only_a_build_under_the_lease_is_told_its_value_may_be_stored(cluster) {
        let replicas = cluster.engines(2, "may-be-stored").await;
        let policy = Policy::default();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let builder = |private: bool| -> Builder {
            let seen = seen.clone();
            Arc::new(move |role: BuildRole| {
                seen.lock().unwrap().push(role);
                Box::pin(async move {
                    let answer = entry("x".into());
                    Ok(if private {
                        Built::Private(Private::new(answer, "test"))
                    } else {
                        Built::Shared(answer)
                    })
                })
            })
        };
        let wait = Duration::from_secs(5);
        // Leads: a private answer leaves a pass marker behind.
        let first = replicas[0].fetch(&key("p"), &policy, builder(true), wait).await.unwrap();
        assert_eq!(first.source, AnswerSource::Own { reason: Some("test") });
        // Past the marker, a caller builds for itself: nothing of it is stored.
        let own = replicas[1].fetch(&key("p"), &policy, builder(true), wait).await.unwrap();
        assert_eq!(own.source, AnswerSource::Own { reason: Some("test") });
        // A shareable answer, built under the lease.
        replicas[1].fetch(&key("s"), &policy, builder(false), wait).await.unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            [BuildRole::Leader, BuildRole::Own, BuildRole::Leader]
        );
        assert!(BuildRole::Leader.stores());
        assert!(!BuildRole::Own.stores() && !BuildRole::Degraded.stores());
    }

    async fn a_panicking_build_fails_its_callers_and_releases_the_lease_at_once(cluster) {
        let replicas = cluster.engines(2, "panics").await;
        let policy = Policy { lease_ttl: Duration::from_secs(30), ..Policy::default() };
        let builder: Builder = Arc::new(|_| {
            Box::pin(async {
                sleep(Duration::from_millis(100)).await;
                panic!("the build blew up")
            })
        });
        let k = key("k");
        let (a, b) = tokio::join!(
            replicas[0].fetch(&k, &policy, builder.clone(), Duration::from_secs(5)),
            async {
                sleep(Duration::from_millis(30)).await;
                replicas[1].fetch(&k, &policy, builder.clone(), Duration::from_secs(5)).await
            },
        );
        let EngineError::Build(failure) = a.unwrap_err() else {
            panic!("not a build failure")
        };
        assert_eq!(failure.cause, FailureCause::Panicked);
        assert_eq!(&*failure.message, "the build panicked");
        // The other replica either saw the abandonment and led (and panicked) itself, or joined late.
        assert!(b.is_err());
        assert_eq!(replicas[0].status(&key("k")).await, Ok(KeyStatus::Empty), "no lease left behind");
    }

    async fn a_caller_that_stops_waiting_does_not_cancel_the_build(cluster) {
        let replicas = cluster.engines(2, "leaving").await;
        let policy = Policy::default();
        let builder: Builder = Arc::new(|_| {
            Box::pin(async {
                sleep(Duration::from_millis(400)).await;
                Ok(Built::Shared(entry("kept".into())))
            })
        });
        let gave_up = replicas[0]
            .fetch(&key("k"), &policy, builder, Duration::from_millis(100))
            .await;
        assert!(matches!(gave_up, Err(EngineError::Timeout(_))), "{gave_up:?}");
        let read = replicas[1].read(&key("k"), &policy, Duration::from_secs(5)).await.unwrap();
        assert_eq!(read.entry.body, Bytes::from("kept"));
    }

    async fn a_failed_build_is_not_stored(cluster) {
        let replicas = cluster.engines(1, "failed").await;
        let policy = Policy::default();
        let builder: Builder = Arc::new(|_| Box::pin(async { Err(BuildError::new("upstream said 503")) }));
        let failed = replicas[0].fetch(&key("k"), &policy, builder, Duration::from_secs(1)).await;
        assert_eq!(failed.unwrap_err(), EngineError::Build("upstream said 503".into()));
        assert_eq!(replicas[0].status(&key("k")).await, Ok(KeyStatus::Empty));
    }

    async fn closing_a_leader_abandons_its_lease_so_another_replica_takes_over_at_once(cluster) {
        let replicas = cluster.engines(2, "closing").await;
        let policy = Policy { lease_ttl: Duration::from_secs(30), ..Policy::default() };
        let calls = Arc::new(AtomicUsize::new(0));
        let builder: Builder = {
            let calls = calls.clone();
            Arc::new(move |_| {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                Box::pin(async move {
                    if n == 0 {
                        sleep(Duration::from_secs(60)).await;
                    }
                    Ok(Built::Shared(entry(format!("build {n}"))))
                })
            })
        };
        let leader = {
            let (engine, policy, builder) = (replicas[0].clone(), policy.clone(), builder.clone());
            tokio::spawn(async move { engine.fetch(&key("k"), &policy, builder, Duration::from_secs(60)).await })
        };
        support::eventually("the lease is held", || async {
            matches!(replicas[1].status(&key("k")).await, Ok(KeyStatus::Pending { .. }))
        })
        .await;
        let follower = {
            let (engine, policy, builder) = (replicas[1].clone(), policy.clone(), builder.clone());
            tokio::spawn(async move { engine.fetch(&key("k"), &policy, builder, Duration::from_secs(20)).await })
        };
        support::eventually("the follower waits", || async {
            replicas[1].metrics().flights_inflight.get() == 1
        })
        .await;
        let closed_at = tokio::time::Instant::now();
        replicas[0].close(Duration::from_secs(5)).await;
        assert_eq!(leader.await.unwrap().unwrap_err(), EngineError::Closed);
        let answer = follower.await.unwrap().expect("the follower's replica built it");
        assert_eq!(answer.entry.body, Bytes::from("build 1"));
        let took = closed_at.elapsed();
        assert!(took < Duration::from_secs(5), "took over {took:?} after the close, not at the lease expiry");
    }

    async fn a_failure_with_a_response_reaches_followers_on_every_replica_with_that_response(cluster) {
        let replicas = cluster.engines(3, "failing").await;
        let policy = Policy::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let builder: Builder = {
            let calls = calls.clone();
            Arc::new(move |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                Box::pin(async {
                    sleep(Duration::from_millis(300)).await;
                    Err(BuildError::with_response("upstream answered 503", entry("overloaded".into())))
                })
            })
        };
        let tasks: Vec<_> = (0..30)
            .map(|i| {
                let (engine, policy, builder) = (replicas[i % 3].clone(), policy.clone(), builder.clone());
                tokio::spawn(async move { engine.fetch(&key("k"), &policy, builder, Duration::from_secs(5)).await })
            })
            .collect();
        for task in tasks {
            let EngineError::Build(failure) = task.await.unwrap().unwrap_err() else {
                panic!("not a build failure")
            };
            assert_eq!(&*failure.message, "upstream answered 503");
            let response = failure.response.expect("the error response came along");
            assert_eq!(response.body, Bytes::from("overloaded"));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one fetch, and no serial retries");
    }
}

/// A READY event that the bus held back (here: NATS frozen while the leader announced) reaches a
/// follower after its value's freshness ended. The follower's callers get the value they waited
/// for, but its L1 must not keep the value for a whole ttl from the late arrival: the next
/// request goes to the store, finds nothing fresh, and builds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_ready_event_does_not_keep_its_value_in_the_l1_past_its_freshness() {
    let mut cluster = support::cluster::Cluster::start(support::cluster::Kind::RedisNats).await;
    let replicas = cluster.engines(2, "late-event").await;
    // Only the event may wake the follower: no lease expiry and no poll within the test.
    let policy = Policy {
        lease_ttl: Duration::from_secs(30),
        poll_interval: Duration::from_secs(30),
        ..Policy::default()
    };
    let fresh_for = Duration::from_secs(1);
    let (release, released) = tokio::sync::watch::channel(false);
    let builds = Arc::new(AtomicUsize::new(0));
    let builder: Builder = {
        let builds = builds.clone();
        Arc::new(move |_| {
            let n = builds.fetch_add(1, Ordering::SeqCst);
            let mut released = released.clone();
            Box::pin(async move {
                if n == 0 {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(20), released.wait_for(|r| *r))
                            .await;
                }
                let mut built = entry(format!("build {n}"));
                built.ttl = fresh_for;
                Ok(Built::Shared(built))
            })
        })
    };
    let leader = {
        let (engine, policy, builder) = (replicas[0].clone(), policy.clone(), builder.clone());
        tokio::spawn(async move {
            engine
                .fetch(&key("k"), &policy, builder, Duration::from_secs(20))
                .await
        })
    };
    support::eventually("the lease is held", || async {
        matches!(
            replicas[1].status(&key("k")).await,
            Ok(KeyStatus::Pending { .. })
        )
    })
    .await;
    let follower = {
        let (engine, policy, builder) = (replicas[1].clone(), policy.clone(), builder.clone());
        tokio::spawn(async move {
            engine
                .fetch(&key("k"), &policy, builder, Duration::from_secs(20))
                .await
        })
    };
    // Its flight asked the store and was told to wait for the held lease.
    support::eventually("the follower waits", || async {
        replicas[1].metrics().flights_inflight.get() == 1
            && replicas[1]
                .metrics()
                .store_operations
                .with_label_values(&["acquire", "ok"])
                .get()
                >= 1
    })
    .await;

    let nats = cluster.nats.as_mut().expect("the NATS bus");
    nats.pause();
    release.send(true).expect("the build is waiting");
    let led = leader.await.unwrap().expect("the leader's answer");
    assert_eq!(led.entry.body, Bytes::from("build 0"));
    // The value's freshness passes while its event is held back.
    sleep(fresh_for + Duration::from_millis(500)).await;
    nats.resume();

    let waited = follower.await.unwrap().expect("the follower's answer");
    assert_eq!(
        waited.entry.body,
        Bytes::from("build 0"),
        "the follower got the value it waited for"
    );
    let next = replicas[1]
        .fetch(&key("k"), &policy, builder.clone(), Duration::from_secs(20))
        .await
        .expect("the next answer");
    assert_eq!(
        next.entry.body,
        Bytes::from("build 1"),
        "the follower's L1 served a value past its freshness ({:?})",
        next.source
    );
    assert_eq!(builds.load(Ordering::SeqCst), 2);
}
