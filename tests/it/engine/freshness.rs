//! Stale answers in the engine: on paused time, three engines sharing one in-process store and
//! bus, builders gated by the test, freshness ended by advancing the clock; then the same on the
//! real stores (Redis, NATS JetStream KV), freshness ended by the servers' clocks.

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use corral::engine::EngineError;
use corral::engine::{
    AnswerSource, Backend, BuildError, Builder, Built, Engine, EngineConfig, Policy, Source,
};
use corral::envelope::Entry;
use corral::key::{KeyBuilder, KeyHash};
use support::cluster::{Cluster, Kind};
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
        form: corral::envelope::Form::Answer,
    }
}

/// Starts `n` fetches of the key at once, spread over `engines`, each with a builder from `make`.
fn spawn_fetches(
    engines: &[Engine],
    n: usize,
    make: impl Fn() -> Builder,
) -> Vec<tokio::task::JoinHandle<Result<corral::engine::Answer, EngineError>>> {
    (0..n)
        .map(|i| {
            let engine = engines[i % engines.len()].clone();
            let builder = make();
            tokio::spawn(async move {
                engine
                    .fetch(&key(), &Policy::default(), builder, WAIT)
                    .await
            })
        })
        .collect()
}

/// Awaits every fetch and asserts each was answered from `source` with `body`.
async fn expect_all(
    tasks: Vec<tokio::task::JoinHandle<Result<corral::engine::Answer, EngineError>>>,
    source: Source,
    body: &str,
    what: &str,
) {
    for task in tasks {
        let answer = task
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(answer.source, AnswerSource::Shared(source), "{what}");
        assert_eq!(answer.entry.body, body.as_bytes(), "{what}");
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
    Arc::new(move |_| {
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
    let tasks = spawn_fetches(&engines, 30, || builder(&calls, &gate, false));
    expect_all(tasks, Source::StaleRevalidating, "value 1", "an answer").await;
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
    let tasks = spawn_fetches(&engines, 30, || builder(&calls, &gate, true));
    // Callers wait on the refresh this time: once it is held at the gate, let it fail.
    for _ in 0..10_000 {
        if calls.load(Ordering::SeqCst) >= 2 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2, "the refresh started");
    gate.add_permits(1);
    expect_all(
        tasks,
        Source::StaleOnError,
        "value 1",
        "the stale copy, not the error",
    )
    .await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "one refresh; every caller waited on it"
    );
}

// ------------------------------------------------------------------ real stores ----

/// Fresh for 300 ms, then kept stale: `swr` while revalidating, a minute on error.
fn short_entry(body: String, swr: Duration) -> Entry {
    Entry {
        ttl: Duration::from_millis(300),
        stale: swr,
        ..entry(body)
    }
}

/// A builder whose calls are counted; the first answers, the later ones fail (or answer, with
/// `heal`), the second only once `gate` lets it. A fetch the scheduler starts only after that
/// refresh ended is a later request, which tries again: it must not wait on a gate nobody opens.
fn short_builder(
    calls: &Arc<AtomicUsize>,
    gate: &Arc<Semaphore>,
    swr: Duration,
    heal: bool,
) -> Builder {
    let (calls, gate) = (calls.clone(), gate.clone());
    Arc::new(move |_| {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        let gate = gate.clone();
        Box::pin(async move {
            if n == 2 {
                gate.acquire().await.expect("gate open").forget();
            }
            if n > 1 && !heal {
                return Err(BuildError::new("upstream answered 500"));
            }
            Ok(Built::Shared(short_entry(format!("value {n}"), swr)))
        })
    })
}

/// Waits (on the store's clock) until the value is past its freshness: reads on every engine stop
/// finding it fresh, in the store or in their L1.
async fn wait_until_stale(engines: &[Engine], policy: &Policy) {
    support::eventually("the value goes stale", || async {
        for engine in engines {
            let fresh = match engine.read(&key(), policy, SECOND).await {
                Ok(answer) => matches!(
                    answer.source,
                    AnswerSource::Shared(Source::Store | Source::L1)
                ),
                Err(EngineError::NotFound) => false,
                Err(_) => true,
            };
            if fresh {
                return false;
            }
        }
        true
    })
    .await;
}

async fn stale_on_a_real_store(kind: Kind) {
    let cluster = Cluster::start(kind).await;
    let engines = cluster.engines(3, "stale").await;
    let policy = Policy::default();

    // Inside stale-while-revalidate: answered at once while the one refresh is held.
    let (calls, gate) = (Arc::new(AtomicUsize::new(0)), Arc::new(Semaphore::new(0)));
    let swr = 60 * SECOND;
    let built = short_builder(&calls, &gate, swr, true);
    engines[0]
        .fetch(&key(), &policy, built, WAIT)
        .await
        .unwrap();
    wait_until_stale(&engines, &policy).await;
    let tasks = spawn_fetches(&engines, 30, || short_builder(&calls, &gate, swr, true));
    expect_all(
        tasks,
        Source::StaleRevalidating,
        "value 1",
        &format!("{kind:?}"),
    )
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 2, "{kind:?}: one refresh");
    gate.add_permits(1);
    support::eventually("the refresh replaces the stale value", || async {
        let answer = engines[2].read(&key(), &policy, SECOND).await;
        answer.is_ok_and(|answer| answer.entry.body == "value 2")
    })
    .await;
    engines[0].delete(&key()).await.unwrap();

    // Past revalidation (none here), inside stale-if-error: a failed refresh answers everyone
    // with the stale copy.
    let (calls, gate) = (Arc::new(AtomicUsize::new(0)), Arc::new(Semaphore::new(0)));
    let built = short_builder(&calls, &gate, Duration::ZERO, false);
    engines[0]
        .fetch(&key(), &policy, built, WAIT)
        .await
        .unwrap();
    wait_until_stale(&engines, &policy).await;
    let tasks = spawn_fetches(&engines, 30, || {
        short_builder(&calls, &gate, Duration::ZERO, false)
    });
    support::eventually("the refresh starts", || async {
        calls.load(Ordering::SeqCst) >= 2
    })
    .await;
    gate.add_permits(1);
    expect_all(tasks, Source::StaleOnError, "value 1", &format!("{kind:?}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_answers_on_redis() {
    stale_on_a_real_store(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_answers_on_nats_kv() {
    stale_on_a_real_store(Kind::NatsKv).await;
}
