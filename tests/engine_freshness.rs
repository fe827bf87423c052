//! Stale answers in the engine, on paused time: three engines sharing one in-process store and
//! bus, builders gated by the test, freshness ended by advancing the clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use corral::engine::{
    AnswerSource, Backend, BuildError, Builder, Built, Engine, EngineConfig, Policy, Source,
};
use corral::envelope::Entry;
use corral::key::{KeyBuilder, KeyHash};
use tokio::sync::Semaphore;

const SECOND: Duration = Duration::from_secs(1);
const WAIT: Duration = Duration::from_secs(30);

fn key() -> KeyHash {
    KeyBuilder::new().part("k").finish().hash
}

/// Fresh for a second, then kept stale for ten (while revalidating) or a minute (on error).
fn entry(body: String) -> Entry {
    Entry {
        status: 200,
        headers: Vec::new(),
        body: Bytes::from(body),
        stored_at_ms: 0,
        ttl: SECOND,
        stale: 10 * SECOND,
        stale_if_error: 60 * SECOND,
        fetch_time: Duration::ZERO,
        key: KeyHash::from_bytes([0; 32]),
    }
}

async fn engines(n: usize) -> Vec<Engine> {
    let backend = Backend::memory();
    let mut engines = Vec::new();
    for _ in 0..n {
        let engine = Engine::connect(EngineConfig::new("fresh"), &backend)
            .await
            .expect("memory engine");
        engines.push(engine);
    }
    engines
}

/// A builder whose calls are counted, and from the second on wait for a permit from `gate`;
/// `fail` makes them answer an error.
fn builder(calls: &Arc<AtomicUsize>, gate: &Arc<Semaphore>, fail: bool) -> Builder {
    let (calls, gate) = (calls.clone(), gate.clone());
    Arc::new(move || {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        let gate = gate.clone();
        Box::pin(async move {
            if n > 1 {
                gate.acquire().await.expect("gate open").forget();
            }
            if fail && n > 1 {
                return Err(BuildError::new("upstream answered 500"));
            }
            Ok(Built::Shared(entry(format!("value {n}"))))
        })
    })
}

#[tokio::test(start_paused = true)]
async fn stale_answers_come_at_once_while_one_refresh_runs_behind_them() {
    let engines = engines(3).await;
    let (calls, gate) = (Arc::new(AtomicUsize::new(0)), Arc::new(Semaphore::new(0)));
    let policy = Policy::default();
    let first = engines[0]
        .fetch(&key(), &policy, builder(&calls, &gate, false), WAIT)
        .await
        .unwrap();
    assert_eq!(first.entry.body, Bytes::from("value 1"));
    tokio::time::advance(SECOND + SECOND / 2).await;

    // The refresh is held at the gate; every caller is answered anyway.
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let (engine, policy) = (engines[i % 3].clone(), policy.clone());
            let builder = builder(&calls, &gate, false);
            tokio::spawn(async move { engine.fetch(&key(), &policy, builder, WAIT).await })
        })
        .collect();
    for task in tasks {
        let answer = task.await.unwrap().expect("an answer");
        assert_eq!(
            answer.source,
            AnswerSource::Shared(Source::StaleRevalidating)
        );
        assert_eq!(answer.entry.body, Bytes::from("value 1"));
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "one refresh across three engines"
    );

    gate.add_permits(1);
    let mut refreshed = None;
    for _ in 0..100 {
        let answer = engines[1]
            .fetch(&key(), &policy, builder(&calls, &gate, false), WAIT)
            .await
            .unwrap();
        if answer.entry.body == "value 2" {
            refreshed = Some(answer.source);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(refreshed, Some(AnswerSource::Shared(Source::Store)));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_failed_refresh_leaves_the_stale_answer_for_the_next_caller_to_retry() {
    let engines = engines(2).await;
    let (calls, gate) = (Arc::new(AtomicUsize::new(0)), Arc::new(Semaphore::new(10)));
    let policy = Policy::default();
    engines[0]
        .fetch(&key(), &policy, builder(&calls, &gate, true), WAIT)
        .await
        .unwrap();
    tokio::time::advance(2 * SECOND).await;
    let stale = engines[1]
        .fetch(&key(), &policy, builder(&calls, &gate, true), WAIT)
        .await
        .unwrap();
    assert_eq!(
        stale.source,
        AnswerSource::Shared(Source::StaleRevalidating)
    );
    // The refresh fails behind it; the lease is released and the stale value stays, so a later
    // caller is answered stale again and starts the next try.
    let mut retried = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let again = engines[0]
            .fetch(&key(), &policy, builder(&calls, &gate, true), WAIT)
            .await
            .unwrap();
        assert_eq!(again.entry.body, Bytes::from("value 1"));
        if calls.load(Ordering::SeqCst) >= 3 {
            retried = true;
            break;
        }
    }
    assert!(retried, "a later caller led the next refresh");
}

#[tokio::test(start_paused = true)]
async fn past_revalidation_a_failed_refresh_answers_every_caller_with_the_stale_copy() {
    let engines = engines(3).await;
    let (calls, gate) = (Arc::new(AtomicUsize::new(0)), Arc::new(Semaphore::new(0)));
    let policy = Policy::default();
    engines[0]
        .fetch(&key(), &policy, builder(&calls, &gate, true), WAIT)
        .await
        .unwrap();
    // Past the ten seconds of stale-while-revalidate, inside the minute of stale-if-error.
    tokio::time::advance(20 * SECOND).await;
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let (engine, policy) = (engines[i % 3].clone(), policy.clone());
            let builder = builder(&calls, &gate, true);
            tokio::spawn(async move { engine.fetch(&key(), &policy, builder, WAIT).await })
        })
        .collect();
    // Callers wait on the refresh this time: once it is held at the gate, let it fail.
    for _ in 0..10_000 {
        if calls.load(Ordering::SeqCst) >= 2 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2, "the refresh started");
    gate.add_permits(1);
    for task in tasks {
        let answer = task.await.unwrap().expect("the stale copy, not the error");
        assert_eq!(answer.source, AnswerSource::Shared(Source::StaleOnError));
        assert_eq!(answer.entry.body, Bytes::from("value 1"));
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "one refresh; every caller waited on it"
    );
}
