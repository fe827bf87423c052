//! Revalidation in the engine, on paused time with three engines sharing one in-process store and
//! bus: a stale entry that names a validator is handed to exactly one build as
//! `BuildRole::Revalidate`, and a confirmation (`Built::Revalidated`) is stored and served to
//! every waiter, with the stored body.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use corral::engine::{
    Answer, Backend, BuildRole, Builder, Built, Engine, EngineConfig, EngineError, Policy, Source,
};
use corral::envelope::{Entry, Form};
use corral::key::{KeyBuilder, KeyHash};
use tokio::sync::Semaphore;

const SECOND: Duration = Duration::from_secs(1);
const WAIT: Duration = Duration::from_secs(30);

fn key() -> KeyHash {
    KeyBuilder::new().part("revalidated").finish().hash
}

/// Fresh for `ttl`, with an `ETag` and `version`.
fn entry(ttl: Duration, version: &str) -> Entry {
    Entry {
        status: 200,
        headers: vec![
            ("etag".into(), Bytes::from_static(b"\"e\"")),
            ("x-version".into(), Bytes::from(version.to_owned())),
        ],
        body: Bytes::from_static(b"the stored body"),
        stored_at_ms: 0,
        ttl,
        stale: Duration::ZERO,
        stale_if_error: Duration::ZERO,
        fetch_time: Duration::ZERO,
        key: KeyHash::from_bytes([0; 32]),
        form: Form::Answer,
    }
}

/// The value of the header `name` in `entry`.
fn header<'e>(entry: &'e Entry, name: &str) -> Option<&'e [u8]> {
    (entry.headers.iter())
        .find(|(n, _)| n == name)
        .map(|(_, value)| &value[..])
}

async fn engines(n: usize) -> Vec<Engine> {
    let backend = Backend::memory();
    let mut engines = Vec::new();
    for _ in 0..n {
        let engine = Engine::connect(EngineConfig::new("revalidate"), &backend)
            .await
            .expect("memory engine");
        engines.push(engine);
    }
    engines
}

/// A builder that records the role of every build; a revalidation waits for a permit from `gate`
/// and confirms the stored entry with `x-version: 2`.
fn builder(roles: &Arc<Mutex<Vec<BuildRole>>>, gate: &Arc<Semaphore>) -> Builder {
    let (roles, gate) = (roles.clone(), gate.clone());
    Arc::new(move |role: BuildRole| {
        roles.lock().unwrap().push(role.clone());
        let gate = gate.clone();
        Box::pin(async move {
            match role.revalidating() {
                Some(stored) => {
                    gate.acquire().await.expect("gate open").forget();
                    let mut confirmed = (**stored).clone();
                    confirmed.headers[1].1 = Bytes::from_static(b"2");
                    confirmed.ttl = 60 * SECOND;
                    Ok(Built::Revalidated(confirmed))
                }
                None => Ok(Built::Shared(entry(SECOND, "1"))),
            }
        })
    })
}

fn spawn_fetches(
    engines: &[Engine],
    n: usize,
    make: impl Fn() -> Builder,
) -> Vec<tokio::task::JoinHandle<Result<Answer, EngineError>>> {
    (0..n)
        .map(|i| {
            let engine = engines[i % engines.len()].clone();
            let builder = make();
            tokio::spawn(async move {
                let policy = Policy::default();
                engine.fetch(&key(), &policy, builder, WAIT).await
            })
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn one_build_revalidates_a_stale_entry_for_every_engine() {
    let engines = engines(3).await;
    let (roles, gate) = (
        Arc::new(Mutex::new(Vec::new())),
        Arc::new(Semaphore::new(0)),
    );
    let policy = Policy::default();
    let first = engines[0]
        .fetch(&key(), &policy, builder(&roles, &gate), WAIT)
        .await
        .unwrap();
    assert_eq!(header(&first.entry, "x-version"), Some(&b"1"[..]));
    // Past its freshness, with no stale window: kept for revalidation, not served stale.
    tokio::time::advance(2 * SECOND).await;

    let tasks = spawn_fetches(&engines, 30, || builder(&roles, &gate));
    // The one revalidation is let go once every other fetch waits on a flight (one per engine).
    let waiting = || {
        let each = engines.iter().map(|e| e.metrics().followers_waiting.get());
        each.sum::<i64>()
    };
    for _ in 0..10_000 {
        if waiting() == 27 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(waiting(), 27, "every fetch joined a flight");
    gate.add_permits(1);
    for task in tasks {
        let answer = task.await.unwrap().expect("an answer");
        assert_eq!(answer.entry.body, Bytes::from_static(b"the stored body"));
        assert_eq!(header(&answer.entry, "x-version"), Some(&b"2"[..]));
    }
    let roles = roles.lock().unwrap().clone();
    assert_eq!(roles.len(), 2, "the fill and one revalidation: {roles:?}");
    let Some(BuildRole::Revalidate(stale)) = roles.last() else {
        panic!("the second build revalidates: {roles:?}");
    };
    assert_eq!(header(stale, "x-version"), Some(&b"1"[..]));
    let counted = engines
        .iter()
        .map(|engine| {
            let metrics = engine.metrics();
            metrics
                .revalidations
                .with_label_values(&["default", "304"])
                .get()
        })
        .sum::<u64>();
    assert_eq!(counted, 1);

    // Fresh again: a later fetch is a hit, with no build.
    let later = engines[2]
        .fetch(&key(), &policy, builder(&Arc::default(), &gate), WAIT)
        .await
        .unwrap();
    assert!(matches!(
        later.source,
        corral::engine::AnswerSource::Shared(Source::Store | Source::L1)
    ));
    assert_eq!(header(&later.entry, "x-version"), Some(&b"2"[..]));
}
