//! The leader's build: spawned with its flight, bounded by `max_fetch`, under a lease renewed every
//! `lease_ttl / 3`, ending in exactly one of COMMIT, FAIL, GIVEUP or ABANDON.
//!
//! A [`LeaseGuard`] releases the lease with ABANDONED if the build task dies by panic or
//! cancellation before it ended the lease itself. A build whose lease was lost (expired, taken over,
//! purged) still answers its own process's callers, but never commits and never announces.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use tokio::time::{Instant, MissedTickBehavior};

use super::calls::{announce, keep, retrying, store_call};
use super::flight::{Conclusion, Flight, Source};
use super::{BuildError, BuildRole, Builder, Built, Failure, FailureCause, Inner, Policy, seal};
use crate::bus::{Event, EventKind};
use crate::envelope::{self, Entry, Form};
use crate::key::KeyHash;
use crate::lease::Token;
use crate::store::{Fenced, Renewed, Revalidation};

/// Releases a lease with ABANDONED unless disarmed: a build that panics or is cancelled must not
/// leave its followers waiting for the lease to expire.
struct LeaseGuard {
    inner: Arc<Inner>,
    key: KeyHash,
    token: Token,
    armed: bool,
}

impl LeaseGuard {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        // A crash releases nothing: that is the point of the crash fault.
        if !self.armed || self.inner.crashed.load(Ordering::SeqCst) {
            return;
        }
        let (inner, key, token) = (self.inner.clone(), self.key, self.token);
        inner.metrics.lease("abandoned");
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { release(&inner, &key, token, EventKind::Abandoned).await });
        }
    }
}

/// How the build itself ended.
enum Ending {
    Built(Result<Built, BuildError>),
    Panicked,
    Overran,
    ShuttingDown,
}

/// Leads: runs the build under the lease. A build past `max_fetch` is abandoned: its lease is
/// released with ABANDONED so that other processes' waiters re-elect at once, and this flight's
/// callers get an overrun failure.
///
/// With `revalidating`, the stale entry stored under the key, the build is told to revalidate it
/// ([`BuildRole::Revalidate`]); a confirmation ([`Built::Revalidated`]) is committed as a new head
/// over the stored body.
pub(crate) async fn lead(
    inner: &Arc<Inner>,
    flight: &Arc<Flight>,
    policy: &Policy,
    builder: &Builder,
    token: Token,
    revalidating: Option<Arc<Entry>>,
) -> Conclusion {
    let key = flight.key;
    let role = match &revalidating {
        Some(stale) => BuildRole::Revalidate(stale.clone()),
        None => BuildRole::Leader,
    };
    let guard = LeaseGuard {
        inner: inner.clone(),
        key,
        token,
        armed: true,
    };
    let mut lost = false;
    let started = Instant::now();
    let ending = {
        let build = AssertUnwindSafe(builder(role)).catch_unwind();
        tokio::pin!(build);
        let deadline = Instant::now() + policy.max_fetch;
        let every = (policy.lease_ttl / 3).max(Duration::from_millis(1));
        let mut renewals = tokio::time::interval_at(Instant::now() + every, every);
        renewals.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut shutdown = inner.shutdown.subscribe();
        let closing = async move {
            let _ = shutdown.wait_for(|closing| *closing).await;
        };
        tokio::pin!(closing);
        loop {
            tokio::select! {
                result = &mut build => break match result {
                    Ok(built) => Ending::Built(built),
                    Err(_panic) => Ending::Panicked,
                },
                _ = tokio::time::sleep_until(deadline) => break Ending::Overran,
                _ = &mut closing => break Ending::ShuttingDown,
                _ = renewals.tick(), if !lost => {
                    let renewed = retrying(inner, "renew", || {
                        inner.store.renew(&key, token, policy.lease_ttl)
                    })
                    .await;
                    match renewed {
                        Ok(Renewed::Held) => inner.metrics.lease("renewed"),
                        Ok(Renewed::Lost) => {
                            tracing::warn!(%key, "lease lost during the build; its result will not be stored");
                            inner.metrics.lease("lost");
                            lost = true;
                        }
                        // The next tick tries again; if the lease expires meanwhile, commit says so.
                        Err(error) => tracing::warn!(%key, %error, "could not renew the lease"),
                    }
                }
            }
        }
    };
    guard.disarm();
    if revalidating.is_some() {
        let result = match &ending {
            Ending::Built(Ok(Built::Revalidated(_))) => "304",
            Ending::Built(Ok(_)) => "200",
            _ => "error",
        };
        inner
            .metrics
            .revalidations
            .with_label_values(&[&policy.label, result])
            .inc();
    }
    // A confirmation is stored like any shared answer, as a new head over the stored body.
    let (ending, old_head) = match ending {
        Ending::Built(Ok(Built::Revalidated(entry))) => {
            let old_head = revalidating.and_then(|stale| envelope::encode_head(&stale).ok());
            (Ending::Built(Ok(Built::Shared(entry))), old_head)
        }
        other => (other, None),
    };

    match ending {
        Ending::Built(Ok(Built::Shared(mut entry) | Built::Revalidated(mut entry))) => {
            // The `delta` of early refresh: how long this value takes to make.
            entry.fetch_time = started.elapsed();
            match seal(&key, entry) {
                (entry, Some(bytes)) if fits_the_store(inner, &key, &bytes) => {
                    inner.metrics.build("shared");
                    let life = Life {
                        fresh: entry.ttl,
                        ttl: entry.ttl + kept_stale(&entry, policy),
                    };
                    let sliding = policy.touch().is_some();
                    let committing = Instant::now();
                    let write = match old_head {
                        Some(old_head) => Write::Head(Revalidation {
                            new_head: bytes.slice(..bytes.len() - entry.body.len()),
                            value: bytes,
                            old_head,
                        }),
                        None => Write::Whole(bytes),
                    };
                    let committed = match lost {
                        true => Committed::Rejected,
                        false => commit(inner, &key, token, write, life, sliding).await,
                    };
                    // A value the store did not take for want of an answer is still this
                    // process's to serve: kept, later callers here do not fetch it again while the
                    // store is down. A rejected one (the lease was lost, purged) is not kept.
                    if committed != Committed::Rejected {
                        // The L1 keeps a copy only while it is fresh, counted from before the
                        // commit, so it never outlives the store's copy however late the commit's
                        // answer is handled.
                        let fresh = life.fresh.saturating_sub(committing.elapsed());
                        keep(inner, flight, entry.clone(), fresh);
                    }
                    Conclusion::Value {
                        entry,
                        source: Source::Built,
                    }
                }
                // Too large to encode or to store: nobody else may get it, so it is handled as
                // uncacheable, and every other caller builds its own.
                (entry, _) => {
                    inner.metrics.build("private");
                    if !lost {
                        give_up(inner, &key, token, policy).await;
                    }
                    Conclusion::Uncacheable {
                        owner: flight.owner,
                        entry: Some(entry),
                        reason: None,
                        attachment: None,
                    }
                }
            }
        }
        Ending::Built(Ok(Built::Private(private))) => {
            inner.metrics.build("private");
            if !lost {
                give_up(inner, &key, token, policy).await;
            }
            Conclusion::private(flight.owner, private)
        }
        Ending::Built(Err(BuildError { message, response })) => {
            inner.metrics.build("failed");
            let (response, inline) = match response.map(|entry| seal(&key, entry)) {
                Some((entry, bytes)) => (
                    Some(entry),
                    bytes.filter(|bytes| bytes.len() < inner.config.inline_max),
                ),
                None => (None, None),
            };
            if !lost {
                let event = EventKind::Failed {
                    message: message.clone(),
                    response: inline,
                };
                release(inner, &key, token, event).await;
            }
            Conclusion::Failed(Failure {
                message: message.into(),
                response,
                cause: FailureCause::Build,
            })
        }
        Ending::Panicked => {
            inner.metrics.build("panicked");
            inner.metrics.lease("abandoned");
            if !lost {
                release(inner, &key, token, EventKind::Abandoned).await;
            }
            Conclusion::Failed(Failure::because(
                FailureCause::Panicked,
                "the build panicked",
            ))
        }
        Ending::Overran => {
            inner.metrics.build("overrun");
            inner.metrics.lease("abandoned");
            tracing::warn!(%key, max_fetch = ?policy.max_fetch, "build overran; abandoning its lease");
            if !lost {
                release(inner, &key, token, EventKind::Abandoned).await;
            }
            Conclusion::Failed(overran(policy))
        }
        Ending::ShuttingDown => {
            inner.metrics.lease("abandoned");
            if !lost {
                release(inner, &key, token, EventKind::Abandoned).await;
            }
            Conclusion::Closed
        }
    }
}

fn overran(policy: &Policy) -> Failure {
    Failure::because(
        FailureCause::Overran,
        format!(
            "the build ran past max_fetch ({})",
            humantime::format_duration(policy.max_fetch)
        ),
    )
}

/// Whether an encoded value is within the store's size limit. A value over it is counted, and
/// logged the first time its key is seen over it (a key that is always too large would otherwise
/// log on every build).
fn fits_the_store(inner: &Inner, key: &KeyHash, bytes: &Bytes) -> bool {
    let Some(limit) = inner.store.max_value_len() else {
        return true;
    };
    if bytes.len() <= limit {
        return true;
    }
    inner.metrics.values_too_large.inc();
    if inner.too_large_logged.first_time(key) {
        tracing::warn!(
            %key,
            len = bytes.len(),
            limit,
            store = inner.store.kind(),
            "value is larger than the store takes; it is not stored and every caller builds its own"
        );
    }
    false
}

/// Remembers which keys were already logged, up to a bound; once full it starts over, so a key may
/// be logged again much later but memory stays bounded.
pub(crate) struct LoggedOnce {
    /// Keys already logged.
    seen: std::sync::Mutex<std::collections::HashSet<KeyHash>>,
    /// How many keys are remembered before the set starts over.
    capacity: usize,
}

impl LoggedOnce {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            seen: std::sync::Mutex::new(std::collections::HashSet::new()),
            capacity,
        }
    }

    /// True the first time `key` is seen (since the set last started over).
    pub(crate) fn first_time(&self, key: &KeyHash) -> bool {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if seen.contains(key) {
            return false;
        }
        if seen.len() >= self.capacity {
            seen.clear();
        }
        seen.insert(*key)
    }
}

/// How long the store keeps `entry` past its freshness: the longer of its stale windows, or
/// [`Policy::revalidate_keep`] if longer and the entry can be revalidated (it names a validator,
/// or has no freshness at all and so is revalidated on every use). Never for sliding expiry,
/// whose entries are gone a window after their last read and never go stale.
pub(crate) fn kept_stale(entry: &Entry, policy: &Policy) -> Duration {
    let windows = entry.stale.max(entry.stale_if_error);
    match revalidatable(entry) && policy.touch().is_none() {
        true => windows.max(policy.revalidate_keep),
        false => windows,
    }
}

/// Whether a refresh of `entry` may ask its source whether it changed rather than build anew.
pub(crate) fn revalidatable(entry: &Entry) -> bool {
    // An answer, whether stored as one body or as several representations of it.
    entry.form != Form::Marker
        && (entry.ttl.is_zero()
            || entry
                .headers
                .iter()
                .any(|(name, _)| name == "etag" || name == "last-modified"))
}

/// How long a committed value is fresh, and how long the store keeps it (fresh plus stale).
#[derive(Clone, Copy)]
struct Life {
    fresh: Duration,
    ttl: Duration,
}

/// What became of a COMMIT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Committed {
    /// The value is the stored one.
    Stored,
    /// The lease was no longer ours: nothing was written.
    Rejected,
    /// The store did not answer (it may or may not have stored it).
    Unanswered,
}

/// What a COMMIT writes: a whole value, or a revalidated one's new head over the stored body.
enum Write {
    Whole(Bytes),
    Head(Revalidation),
}

/// COMMIT: answers whether the value is now the stored one.
async fn commit(
    inner: &Inner,
    key: &KeyHash,
    token: Token,
    write: Write,
    life: Life,
    sliding: bool,
) -> Committed {
    let bytes = match &write {
        Write::Whole(bytes) => bytes,
        Write::Head(update) => &update.value,
    };
    let inline = (bytes.len() < inner.config.inline_max).then(|| bytes.clone());
    let event = Event::ending(*key, token.lease_id(), EventKind::Ready { inline }).encode();
    let stored = store_call(inner, "commit", || async {
        let (fresh, ttl, event) = (life.fresh, life.ttl, event.clone());
        match &write {
            Write::Whole(bytes) => {
                let bytes = bytes.clone();
                (inner.store)
                    .commit_fresh(key, token, bytes, fresh, ttl, sliding, event)
                    .await
            }
            Write::Head(update) => {
                (inner.store)
                    .commit_revalidated(key, token, update, fresh, ttl, sliding, event)
                    .await
            }
        }
    })
    .await;
    match stored {
        Ok(Fenced::Done) => {
            // The commit as the store accepted it, for a soak run to check one commit per lease.
            tracing::debug!(
                target: "corral::lease",
                %key,
                token = %token.to_hex(),
                unix_ms = super::unix_ms(),
                "committed"
            );
            if !inner.store.announces() {
                announce(inner, key, event).await;
            }
            Committed::Stored
        }
        Ok(Fenced::Lost) => {
            tracing::warn!(%key, "commit rejected: the lease was no longer ours");
            inner.metrics.lease("commit_rejected");
            Committed::Rejected
        }
        Err(error) => {
            tracing::warn!(%key, %error, "commit failed; followers will re-elect when the lease expires");
            Committed::Unanswered
        }
    }
}

/// GIVEUP: releases the lease and sets the pass marker.
async fn give_up(inner: &Inner, key: &KeyHash, token: Token, policy: &Policy) {
    let event = Event::ending(*key, token.lease_id(), EventKind::Uncacheable).encode();
    let done = store_call(inner, "give_up", || {
        inner
            .store
            .give_up(key, token, policy.pass_ttl, event.clone())
    })
    .await;
    after_release(inner, key, done, event).await;
}

/// FAIL or ABANDON: releases the lease and announces why.
async fn release(inner: &Inner, key: &KeyHash, token: Token, kind: EventKind) {
    let event = Event::ending(*key, token.lease_id(), kind).encode();
    let done = store_call(inner, "release", || {
        inner.store.release(key, token, event.clone())
    })
    .await;
    after_release(inner, key, done, event).await;
}

async fn after_release(
    inner: &Inner,
    key: &KeyHash,
    done: Result<Fenced, crate::store::StoreError>,
    event: Bytes,
) {
    match done {
        Ok(Fenced::Done) if !inner.store.announces() => announce(inner, key, event).await,
        Ok(Fenced::Done) => {}
        Ok(Fenced::Lost) => inner.metrics.lease("lost"),
        Err(error) => tracing::warn!(%key, %error, "could not release the lease; it will expire"),
    }
}

/// The store is unreachable: build for this process's callers only, store and announce nothing.
pub(crate) async fn degraded(
    inner: &Arc<Inner>,
    flight: &Arc<Flight>,
    policy: &Policy,
    builder: &Builder,
) -> Conclusion {
    let build = AssertUnwindSafe(builder(BuildRole::Degraded)).catch_unwind();
    match tokio::time::timeout(policy.max_fetch, build).await {
        Ok(Ok(Ok(Built::Shared(mut entry) | Built::Revalidated(mut entry)))) => {
            inner.metrics.build("degraded");
            entry.key = flight.key;
            entry.stored_at_ms = super::unix_ms();
            let entry = Arc::new(entry);
            // This process's later callers are answered from the L1 for the value's freshness,
            // so an outage costs one fetch per key per process, however long it lasts.
            keep(inner, flight, entry.clone(), entry.ttl);
            Conclusion::Value {
                entry,
                source: Source::Degraded,
            }
        }
        Ok(Ok(Ok(Built::Private(private)))) => {
            inner.metrics.build("private");
            Conclusion::private(flight.owner, private)
        }
        Ok(Ok(Err(BuildError { message, response }))) => {
            inner.metrics.build("failed");
            Conclusion::Failed(Failure {
                message: message.into(),
                response: response.map(Arc::new),
                cause: FailureCause::Build,
            })
        }
        Ok(Err(_panic)) => {
            inner.metrics.build("panicked");
            Conclusion::Failed(Failure::because(
                FailureCause::Panicked,
                "the build panicked",
            ))
        }
        Err(_elapsed) => {
            inner.metrics.build("overrun");
            Conclusion::Failed(overran(policy))
        }
    }
}
