//! Purges beyond one key: a whole route (by generation), a path prefix within a route and a
//! surrogate tag (by the store's indexes), and the index writes that make the last two possible.
//!
//! A prefix or tag purge is a loop of single-key purges ([`Engine::delete`]), each of which steals
//! the key's lease (so a fill still running cannot commit) and drops every process's L1 copy
//! through the bus; it runs [`PURGE_CONCURRENCY`] of them at once.
//!
//! An invalidation after a successful unsafe request ([`Engine::invalidate`]) has nobody to answer
//! a failure to: when the store does not take it, every process's L1 copy is dropped through the
//! bus at once, and the store purge is retried in the background with backoff for up to
//! [`INVALIDATION_RETRY_WINDOW`]; one that still fails is counted in
//! `corral_invalidations_failed_total`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::StreamExt;

use tokio::time::Instant;

use super::{Engine, EngineError, Inner, calls};
use crate::bus::{Event, EventKind};
use crate::key::KeyHash;
use crate::key::generation_key;
use crate::store::{IndexEntry, MAX_INDEXED_PER_ROUTE, MAX_INDEXED_PER_TAG, Selector, StoreError};

/// Single-key purges of one prefix or tag purge in flight at once.
const PURGE_CONCURRENCY: usize = 16;

/// Pause before reading generations again after a read failed (store down at start or after a
/// resync).
const GENERATION_RETRY: Duration = Duration::from_secs(1);

/// How long an invalidation the store did not take keeps being retried.
pub const INVALIDATION_RETRY_WINDOW: Duration = Duration::from_secs(10);
/// First pause before retrying an invalidation; doubled up to [`INVALIDATION_RETRY_MAX_DELAY`].
const INVALIDATION_RETRY_DELAY: Duration = Duration::from_millis(100);
const INVALIDATION_RETRY_MAX_DELAY: Duration = Duration::from_secs(2);
/// Most invalidations retried at once per process; past it (a long outage under many writes) a
/// failed invalidation is counted as lost at once, with reason `overflow`.
pub(crate) const MAX_RETRYING_INVALIDATIONS: usize = 1024;

/// What [`Engine::invalidate`] did before it answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalidation {
    /// The store took the purge; `existed` says whether anything was stored.
    Purged { existed: bool },
    /// The store did not answer: every L1 copy was dropped, and the store purge is being retried
    /// in the background.
    Retrying,
}

/// What a purge of many keys did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Purged {
    /// Keys that had a value, lease or pass marker in the store.
    pub existed: usize,
    /// Keys the index named (all of them were purged, whether or not anything was there).
    pub covered: usize,
}

impl Engine {
    /// The generation `route`'s keys carry now (0 until the route is first purged as a whole).
    pub fn generation(&self, route: &str) -> u64 {
        self.inner.generations.get(route)
    }

    /// Keys `routes` by their generations: reads each from the store now, again whenever the bus
    /// resyncs (events may have been lost) or a read failed, and one route whenever a GENERATION
    /// event names it (the event's number is never taken: only the store's). A route not tracked here is keyed
    /// at generation 0 whatever the store says. A store that does not answer now is logged and
    /// retried in the background.
    pub async fn track_generations<'a>(&self, routes: impl IntoIterator<Item = &'a str>) {
        for route in routes {
            self.inner.generations.track(route);
            // Every series an alert on lost invalidations may watch exists from the start.
            for reason in crate::metrics::INVALIDATION_FAILURES {
                self.inner
                    .metrics
                    .invalidations_failed
                    .with_label_values(&[route, reason]);
            }
        }
        // Subscribed before the first read, so a prompt or resync that lands during it (or
        // before the task first runs) still wakes the task.
        let mut wake = self.inner.generations.subscribe();
        let seen = *wake.borrow_and_update();
        let complete = load_generations(&self.inner, self.inner.generations.routes()).await;
        if !self.inner.generations_followed.swap(true, Ordering::SeqCst) {
            let follow = Follow {
                inner: Arc::downgrade(&self.inner),
                wake,
                seen,
                shutdown: self.inner.shutdown.subscribe(),
            };
            tokio::spawn(follow_generations(follow, complete));
        }
    }

    /// Purges a whole route in O(1): bumps its generation in the store, so every key of the old
    /// generation is unreachable on every process (those entries expire on their own TTL). This
    /// process keys the route by the new generation before it answers; the others re-read it when
    /// they hear the GENERATION event (or at their next resync, if the event is lost). Answers the
    /// new generation.
    pub async fn purge_route(&self, route: &str) -> Result<u64, EngineError> {
        let inner = &self.inner;
        let key = generation_key(route);
        let ticket = inner.generations.ticket();
        let generation = calls::store_call(inner, "bump_generation", || {
            inner.store.bump_generation(route, &key)
        })
        .await?;
        inner.generations.set(route, generation, ticket);
        if !inner.store.announces() {
            let event = Event::new(key, EventKind::Generation { generation });
            calls::announce(inner, &key, event.encode()).await;
        }
        Ok(generation)
    }

    /// Purges every key `selector` covers in the store's index (each one as [`Engine::delete`]
    /// does); a store error stops it and is answered.
    pub async fn purge_selected(&self, selector: &Selector) -> Result<Purged, EngineError> {
        let inner = &self.inner;
        let limit = match selector {
            Selector::Prefix { .. } => MAX_INDEXED_PER_ROUTE,
            Selector::Tag(_) => MAX_INDEXED_PER_TAG,
        };
        let keys =
            calls::store_call(inner, "indexed", || inner.store.indexed(selector, limit)).await?;
        let covered = keys.len();
        let mut results = futures::stream::iter(keys)
            .map(|key: KeyHash| async move { self.delete(&key).await })
            .buffer_unordered(PURGE_CONCURRENCY);
        let mut existed = 0;
        while let Some(result) = results.next().await {
            existed += usize::from(result?);
        }
        Ok(Purged { existed, covered })
    }

    /// Purges `key` of `route` after a successful unsafe request to it: as [`Engine::delete`]; if
    /// the store does not take it, announces the delete on the bus (so every L1 copy drops now)
    /// and retries the store purge in the background (see the module docs).
    pub async fn invalidate(&self, route: &str, key: &KeyHash) -> Invalidation {
        let error = match self.delete(key).await {
            Ok(existed) => return Invalidation::Purged { existed },
            Err(EngineError::Store(error)) => error,
            Err(other) => StoreError::Unavailable(other.to_string()),
        };
        let inner = &self.inner;
        tracing::warn!(%route, %key, %error, "the store did not take an invalidation; retrying");
        // A store that announces its own writes did not write, so nobody announced the delete.
        calls::announce(inner, key, Event::new(*key, EventKind::Deleted).encode()).await;
        let retrying = inner.retrying_invalidations.fetch_add(1, Ordering::SeqCst);
        if retrying >= MAX_RETRYING_INVALIDATIONS {
            inner.retrying_invalidations.fetch_sub(1, Ordering::SeqCst);
            lost(inner, route, key, "overflow", &error);
            return Invalidation::Retrying;
        }
        let (engine, route, key) = (self.clone(), Arc::<str>::from(route), *key);
        super::refresh::spawn(inner, async move {
            engine.retry_invalidation(&route, &key, error).await;
            engine
                .inner
                .retrying_invalidations
                .fetch_sub(1, Ordering::SeqCst);
        });
        Invalidation::Retrying
    }

    /// Retries [`Engine::delete`] of `key` with backoff until it lands, the window closes or the
    /// engine closes; counts what did not land.
    async fn retry_invalidation(&self, route: &str, key: &KeyHash, mut last: StoreError) {
        let inner = &self.inner;
        let deadline = Instant::now() + INVALIDATION_RETRY_WINDOW;
        let mut shutdown = inner.shutdown.subscribe();
        let mut delay = INVALIDATION_RETRY_DELAY;
        let reason = loop {
            let pause = delay.min(deadline.saturating_duration_since(Instant::now()));
            if pause.is_zero() {
                break failure_reason(&last);
            }
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = shutdown.wait_for(|closing| *closing) => break "shutdown",
            }
            match tokio::time::timeout_at(deadline, self.delete(key)).await {
                Ok(Ok(existed)) => {
                    inner
                        .metrics
                        .purged_keys
                        .with_label_values(&["unsafe_method"])
                        .inc_by(u64::from(existed));
                    tracing::info!(%route, %key, "an invalidation landed on a retry");
                    return;
                }
                Ok(Err(EngineError::Store(error))) => last = error,
                Ok(Err(other)) => last = StoreError::Unavailable(other.to_string()),
                Err(_) => last = StoreError::Timeout { op: "purge" },
            }
            delay = (delay * 2).min(INVALIDATION_RETRY_MAX_DELAY);
        };
        lost(inner, route, key, reason, &last);
    }

    /// Records a key in the purge indexes (its route's paths, its tags).
    pub async fn index(&self, entry: &IndexEntry) -> Result<(), EngineError> {
        let inner = &self.inner;
        Ok(calls::store_call(inner, "index", || inner.store.index(entry)).await?)
    }
}

/// Counts and logs an invalidation given up.
fn lost(inner: &Inner, route: &str, key: &KeyHash, reason: &str, error: &StoreError) {
    inner
        .metrics
        .invalidations_failed
        .with_label_values(&[route, reason])
        .inc();
    tracing::error!(%route, %key, %reason, %error,
        "an invalidation was lost: the store did not take it; stored copies stay until they expire");
}

/// The `reason` label of `corral_invalidations_failed_total` for the last error.
fn failure_reason(error: &StoreError) -> &'static str {
    match error {
        StoreError::Timeout { .. } => "timeout",
        StoreError::Unavailable(_) => "unavailable",
        StoreError::Protocol(_) => "protocol",
        StoreError::CircuitOpen { .. } => "circuit_open",
    }
}

/// Reads `routes`' generations from the store and sets them; false when some read failed.
async fn load_generations(inner: &Inner, routes: Vec<Arc<str>>) -> bool {
    let mut complete = true;
    for route in routes {
        let ticket = inner.generations.ticket();
        match calls::store_call(inner, "route_generation", || {
            inner.store.route_generation(&route)
        })
        .await
        {
            Ok(generation) => {
                inner.generations.set(&route, generation, ticket);
            }
            Err(error) => {
                complete = false;
                tracing::warn!(%route, %error, "could not read the route's generation; retrying");
            }
        }
    }
    complete
}

/// What the tracking task follows, taken before the first read of the generations.
struct Follow {
    inner: Weak<Inner>,
    /// Prompts and resyncs, subscribed before the first read.
    wake: tokio::sync::watch::Receiver<super::generations::Wake>,
    /// The prompts and resyncs the first read covered.
    seen: super::generations::Wake,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

/// Re-reads every generation after each bus resync and after a failed read, and the routes
/// GENERATION events named after each prompt; ends with the engine.
async fn follow_generations(follow: Follow, mut complete: bool) {
    let Follow {
        inner,
        mut wake,
        mut seen,
        mut shutdown,
    } = follow;
    if *shutdown.borrow_and_update() {
        return;
    }
    loop {
        tokio::select! {
            changed = wake.changed() => if changed.is_err() { return },
            changed = shutdown.changed() => if changed.is_err() || *shutdown.borrow() { return },
            () = tokio::time::sleep(GENERATION_RETRY), if !complete => {}
        }
        let now = *wake.borrow_and_update();
        let Some(inner) = inner.upgrade() else { return };
        // Taken before the reads, so a prompt that lands during them is read again next time.
        let prompted = inner.generations.take_prompted();
        let everything = !complete || now.resyncs != seen.resyncs;
        seen = now;
        let routes = if everything {
            inner.generations.routes()
        } else {
            prompted
        };
        // A failed read (of one route or of all) is retried as a read of all.
        complete = load_generations(&inner, routes).await;
    }
}
