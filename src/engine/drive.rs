//! What a flight does, from its creation to its conclusion.
//!
//! ```text
//!            ┌────────────── event / lease expiry / poll / resync ─────────────┐
//!            v                                                                 │
//!   ──> ACQUIRE ── HIT ──> Value        PASS ──> Pass        EMPTY ──> Empty   │
//!            │                                                                 │
//!            ├── STALE, inside stale-while-revalidate ──> Value (stale), and if told
//!            │   "you lead the refresh", a background refresh (see `refresh`)
//!            ├── STALE, inside stale-if-error only ──> as LEAD or WAIT, keeping the stale copy
//!            │   to answer with should the refresh fail
//!            │                                                                 │
//!            ├── WAIT ──> wait ────────────────────────────────────────────────┘
//!            │              └── READY(inline) ──> Value, FAILED ──> Failed, UNCACHEABLE ──> Pass,
//!            │                  each only from an event bound to the lease WAIT named
//!            └── LEAD ──> build (see `build`) ──> Value | Failed | Uncacheable | re-ACQUIRE
//! ```
//!
//! Read flights peek instead of acquiring, so they never lead. A store that cannot be reached
//! degrades: a build flight builds for its own process's callers without storing anything.
//!
//! An event ends a wait with what it carries only when it ends the lease the store named in its
//! WAIT answer (the event's lease id is that lease's), or when the store vouches for every event
//! (its bus is its own stream). Any other event, such as one forged on a bus that others can
//! publish on, is only a hint to look at the store again at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::calls::{keep, retrying, store_call};
use super::flight::{Conclusion, Flight, Mode, Source};
use super::{
    Attachment, Builder, Failure, FailureCause, Inner, OnStoreError, Policy, build, orphans,
    refresh,
};
use crate::bus::EventKind;
use crate::envelope::{self, Entry};
use crate::key::KeyHash;
use crate::lease::{LeaseId, Token};
use crate::store::{Acquired, LeaseRequest, Refresh, StoreError};

/// Corrupt values in a row after which a flight stops discarding and reports a miss.
const CORRUPT_LIMIT: u32 = 3;

/// How long a follower whose re-check failed waits before it looks again.
const RECHECK_AFTER_ERROR: Duration = Duration::from_millis(100);

/// Failed re-checks in a row a follower waits out before it degrades (the breaker usually opens
/// first).
const RECHECK_TRIES: u32 = 5;

/// Margin after a lease's reported expiry before re-checking, so the store has really dropped it.
const EXPIRY_MARGIN: Duration = Duration::from_millis(5);

/// Runs one flight to its conclusion; spawned, owned by no caller.
pub(crate) async fn drive(
    inner: Arc<Inner>,
    flight: Arc<Flight>,
    policy: Policy,
    builder: Option<Builder>,
    handoff: oneshot::Sender<Attachment>,
) {
    let mut conclusion = run(&inner, &flight, &policy, builder.as_ref()).await;
    // Only the owner may have a private answer's attachment (a body still streaming, say): it
    // goes to the owner alone, before the conclusion every caller sees is published.
    if let Conclusion::Uncacheable { attachment, .. } = &mut conclusion
        && let Some(attachment) = attachment.take()
    {
        // The owner may have left; then nobody needs it.
        let _ = handoff.send(attachment);
    }
    let outcome = match &conclusion {
        Conclusion::Value { .. } => "value",
        Conclusion::Failed(_) => "failed",
        Conclusion::Uncacheable { .. } => "uncacheable",
        Conclusion::Pass => "pass",
        Conclusion::Empty => "empty",
        Conclusion::StoreDown(_) => "store_error",
        Conclusion::Unattended => "unattended",
        Conclusion::Closed => "closed",
    };
    inner
        .metrics
        .flight_outcomes
        .with_label_values(&[outcome])
        .inc();
    inner.metrics.flights_inflight.dec();
    if !matches!(conclusion, Conclusion::Unattended) {
        inner.flights.conclude(&flight, conclusion);
    }
}

/// Why a waiting flight looks at the store again.
enum Wake {
    /// An outcome event for this key that ends the lease waited on (or comes from the store).
    Event(EventKind),
    /// An event that may not be taken at its word: unbound, or bound to another lease.
    Hint,
    /// The bus reconnected and may have lost events.
    Resync,
    /// The lease the store reported has expired, or the safety poll came due.
    Timer,
    /// Every caller left; nobody needs the answer.
    Unattended,
    /// The engine is closing.
    Closing,
}

async fn run(
    inner: &Arc<Inner>,
    flight: &Arc<Flight>,
    policy: &Policy,
    builder: Option<&Builder>,
) -> Conclusion {
    let key = flight.key;
    let lease = LeaseRequest {
        token: Token::random(),
        node: inner.config.node.as_str().into(),
        ttl: policy.lease_ttl,
    };
    let mut waited = false;
    let mut timer_woke = false;
    // Whether an ACQUIRE of this flight timed out (it may yet run on the server), and how many
    // failed re-checks in a row a follower has waited out.
    let mut acquire_timed_out = false;
    let mut failed_rechecks = 0;
    let mut corrupt = 0;
    // A stale copy inside its stale-if-error window: the answer should this flight's refresh fail.
    let mut fallback: Option<Arc<Entry>> = None;
    // Whether the lease this flight waited on just ended with a value: the next look only peeks,
    // and a value it finds is that value, served even if it is stale at once (an entry stored
    // to be revalidated on every use), rather than revalidated again by the lease's waiters.
    let mut after_ready = false;
    loop {
        // What arrived before this look is superseded by it.
        flight.take_mail();
        // The store measures a value's remaining ttl somewhere between this instant and its
        // answer; counting it from here keeps the L1's copy within the store's freshness even when
        // the answer is handled late (a process frozen or starved meanwhile).
        let asked_at = Instant::now();
        let peeking = std::mem::take(&mut after_ready);
        let (answer, timed_out) = match (flight.mode, builder) {
            (Mode::Build, Some(_)) if !peeking => acquire(inner, &key, &lease, policy).await,
            _ => (peek(inner, &key, policy).await, false),
        };
        // The stale entry this flight's build revalidates, if it leads one.
        let mut revalidating: Option<Arc<Entry>> = None;
        acquire_timed_out |= timed_out;
        if answer.is_ok() {
            failed_rechecks = 0;
        }
        if timer_woke {
            let found = !matches!(answer, Ok(Acquired::Wait { .. }));
            inner
                .metrics
                .poll_rechecks
                .with_label_values(&[if found { "true" } else { "false" }])
                .inc();
        }
        // A stored value, fresh or stale, is decoded first; one that does not decode is discarded
        // (a bounded number of times) so the next look can lead.
        let mut entry = match &answer {
            Ok(Acquired::Hit { value, .. } | Acquired::Stale { value, .. }) => {
                match decode(inner, &key, value.clone()) {
                    Some(entry) => Some(entry),
                    None if corrupt < CORRUPT_LIMIT => {
                        corrupt += 1;
                        let _ =
                            store_call(inner, "discard", || inner.store.discard(&key, value)).await;
                        timer_woke = false;
                        continue;
                    }
                    None => return Conclusion::Empty,
                }
            }
            _ => None,
        };
        // A stale value is served at once inside its stale-while-revalidate window; past it, the
        // flight leads or waits as usual, keeping the copy for stale-if-error.
        let answer = match answer {
            Ok(Acquired::Stale {
                ttl_left, refresh, ..
            }) => {
                let entry = Arc::new(entry.take().expect("decoded above"));
                // What the lease waited on just stored: this flight's answer, stale or not.
                if peeking {
                    return Conclusion::Value {
                        entry,
                        source: Source::Coalesced,
                    };
                }
                let since = build::kept_stale(&entry, policy).saturating_sub(ttl_left);
                let revalidate = build::revalidatable(&entry).then(|| entry.clone());
                if since < entry.stale {
                    if let (Refresh::Lead { .. }, Some(builder)) = (refresh, builder) {
                        refresh::stale(inner, key, policy, builder, lease.token, revalidate);
                    }
                    return Conclusion::Value {
                        entry,
                        source: Source::StaleRevalidating,
                    };
                }
                revalidating = revalidate;
                fallback = (since < entry.stale_if_error).then_some(entry);
                if let Some(stale) = &fallback {
                    flight.keep_stale(stale.clone());
                }
                Ok(match refresh {
                    Refresh::Lead { fence } => Acquired::Lead { fence },
                    Refresh::Elsewhere { lease_left, lease } => {
                        Acquired::Wait { lease_left, lease }
                    }
                    // Only a peek finds nobody refreshing, and a read never refreshes.
                    Refresh::Idle => Acquired::Empty,
                })
            }
            other => other,
        };
        match answer {
            // A follower whose re-check failed keeps waiting a little and looks again: its leader
            // elsewhere may still be fetching, and a store that blinked (a restart, a failover)
            // should not cost a fetch per replica. Once the breaker says the store is down, or
            // after a few tries, it degrades like anyone.
            Err(error)
                if waited
                    && builder.is_some()
                    && failed_rechecks < RECHECK_TRIES
                    && !matches!(error, StoreError::CircuitOpen { .. }) =>
            {
                failed_rechecks += 1;
                tracing::debug!(%key, %error, "re-check failed; looking again shortly");
                // No lease is known after a failed re-check: any event only sends it back to the store.
                match wait(inner, flight, policy, RECHECK_AFTER_ERROR, None).await {
                    Wake::Unattended => return Conclusion::Unattended,
                    Wake::Closing => return Conclusion::Closed,
                    _ => timer_woke = false,
                }
            }
            Err(error) => {
                if acquire_timed_out {
                    // The ACQUIRE may still run on the server and leave a lease nobody holds.
                    inner.orphans.remember(key, lease.token);
                    orphans::release_in_background(inner);
                }
                return match (builder, policy.on_store_error) {
                    (Some(builder), OnStoreError::Open) => {
                        tracing::warn!(%key, %error, "store unavailable; degrading to a local build");
                        build::degraded(inner, flight, policy, builder).await
                    }
                    _ => Conclusion::StoreDown(error),
                };
            }
            Ok(Acquired::Hit { ttl_left, .. }) => {
                let entry = Arc::new(entry.expect("decoded above"));
                let ttl_left = ttl_left.saturating_sub(asked_at.elapsed());
                let source = if waited {
                    Source::Coalesced
                } else {
                    Source::Store
                };
                refresh::on_hit(inner, &key, &entry, ttl_left, policy, builder);
                return serve(inner, flight, entry, ttl_left, policy, source);
            }
            Ok(Acquired::Stale { .. }) => unreachable!("handled above"),
            Ok(Acquired::Pass { .. }) => return Conclusion::Pass,
            // The value the lease ended with is already gone (purged, expired): look as usual.
            Ok(Acquired::Empty) if peeking && builder.is_some() => {}
            Ok(Acquired::Empty) => return Conclusion::Empty,
            Ok(Acquired::Lead { .. }) => {
                inner.metrics.lease("acquired");
                // One line per lease won, at debug under its own target, so a soak run can pair
                // every upstream fetch with the lease it ran under (see the `corral::lease` target
                // in docs/operations.md).
                tracing::debug!(
                    target: "corral::lease",
                    %key,
                    token = %lease.token.to_hex(),
                    unix_ms = super::unix_ms(),
                    "lease acquired"
                );
                if waited {
                    // The lease this flight waited on ended without a value: its holder died,
                    // overran, was shut down or purged, and this process takes over the fetch.
                    inner.metrics.lease("taken_over");
                }
                let builder = builder.expect("only build flights acquire");
                let built =
                    build::lead(inner, flight, policy, builder, lease.token, revalidating).await;
                return match (built, fallback) {
                    (Conclusion::Failed(_), Some(stale)) => stale_on_error(stale),
                    (built, _) => built,
                };
            }
            Ok(Acquired::Wait { lease_left, lease }) => {
                waited = true;
                timer_woke = false;
                match wait(inner, flight, policy, lease_left, lease).await {
                    Wake::Event(EventKind::Ready { inline: None }) => after_ready = true,
                    Wake::Event(EventKind::Ready {
                        inline: Some(value),
                    }) => {
                        if let Some(entry) = decode(inner, &key, value) {
                            // Fresh for what is left of its ttl, so the L1 keeps no stale copies:
                            // a bus that held the event back (buffered across a reconnect) must
                            // not stretch the value's life by the delay. The age is read from the
                            // writer's clock; a writer clock ahead of ours only gives the L1 the
                            // full ttl it had before, one behind ours only shortens it.
                            let age = super::unix_ms().saturating_sub(entry.stored_at_ms);
                            let ttl = entry.ttl.saturating_sub(Duration::from_millis(age));
                            let entry = Arc::new(entry);
                            return serve(inner, flight, entry, ttl, policy, Source::Coalesced);
                        }
                        after_ready = true;
                    }
                    // The refresh failed, or its leader gave up (overran, shut down): the stale
                    // copy stands in, as it does for the leader's own callers.
                    Wake::Event(EventKind::Failed { .. } | EventKind::Abandoned)
                        if fallback.is_some() =>
                    {
                        return stale_on_error(fallback.take().expect("checked"));
                    }
                    Wake::Event(EventKind::Failed { message, response }) => {
                        let response = response
                            .and_then(|bytes| decode(inner, &key, bytes))
                            .map(Arc::new);
                        return Conclusion::Failed(Failure {
                            message: message.into(),
                            response,
                            cause: FailureCause::Build,
                        });
                    }
                    Wake::Event(EventKind::Uncacheable) => return Conclusion::Pass,
                    Wake::Event(_) | Wake::Hint | Wake::Resync => {}
                    Wake::Timer => timer_woke = true,
                    Wake::Unattended => return Conclusion::Unattended,
                    Wake::Closing => return Conclusion::Closed,
                }
            }
        }
    }
}

/// Answers a flight with a stale copy because its refresh failed; the L1 keeps no stale copies.
fn stale_on_error(entry: Arc<Entry>) -> Conclusion {
    Conclusion::Value {
        entry,
        source: Source::StaleOnError,
    }
}

/// Answers a flight with a stored value and keeps a copy in the L1 (unless a delete was seen).
fn serve(
    inner: &Inner,
    flight: &Flight,
    entry: Arc<Entry>,
    ttl_left: Duration,
    policy: &Policy,
    source: Source,
) -> Conclusion {
    let l1_ttl = match policy.touch() {
        // Sliding: come back to the store once per slack so reads keep touching its TTL.
        Some(touch) => ttl_left.min(touch.slack),
        None => ttl_left,
    };
    keep(inner, flight, entry.clone(), l1_ttl);
    Conclusion::Value { entry, source }
}

fn decode(inner: &Inner, key: &KeyHash, value: Bytes) -> Option<Entry> {
    match envelope::decode_for(value, key) {
        Ok(entry) => Some(entry),
        Err(error) => {
            tracing::warn!(%key, %error, "stored value is unreadable; treating it as a miss");
            inner.metrics.corrupt_entries.inc();
            None
        }
    }
}

/// Waits for whichever comes first: an event, the lease's expiry, the safety poll, a resync, or
/// the last caller leaving. `lease` is the name of the lease waited on, as the store told it.
async fn wait(
    inner: &Inner,
    flight: &Arc<Flight>,
    policy: &Policy,
    lease_left: Duration,
    lease: Option<LeaseId>,
) -> Wake {
    let now = Instant::now();
    let expiry = now + lease_left + EXPIRY_MARGIN;
    let poll = now + jitter(policy.poll_interval);
    let until = expiry.min(poll);
    let mut shutdown = inner.shutdown.subscribe();
    loop {
        if *shutdown.borrow_and_update() {
            return Wake::Closing;
        }
        let mail = flight.take_mail();
        if let Some((event, bound)) = mail.event {
            if inner.store.events_are_writes() || (bound.is_some() && bound == lease) {
                return Wake::Event(event);
            }
            tracing::debug!(key = %flight.key, ?event, "event not bound to the lease waited on; re-checking the store");
            return Wake::Hint;
        }
        if mail.resync {
            return Wake::Resync;
        }
        tokio::select! {
            _ = flight.wake.notified() => {}
            _ = shutdown.changed() => {}
            _ = tokio::time::sleep_until(until) => return Wake::Timer,
            _ = flight.conclusion.closed() => {
                if inner.flights.remove_if_unattended(flight) {
                    return Wake::Unattended;
                }
                // Someone joined in the meantime; `closed` would fire at once again, so wait
                // without it until the next wake.
                tokio::select! {
                    _ = flight.wake.notified() => {}
                    _ = tokio::time::sleep_until(until) => return Wake::Timer,
                }
            }
        }
    }
}

/// The poll interval, ±20%, so that followers of many keys do not poll in step.
fn jitter(interval: Duration) -> Duration {
    let factor = rand::rng().random_range(0.8..1.2);
    interval.mul_f64(factor)
}

/// ACQUIRE, and whether any of its attempts timed out (and so may still run on the server).
async fn acquire(
    inner: &Inner,
    key: &KeyHash,
    lease: &LeaseRequest,
    policy: &Policy,
) -> (Result<Acquired, StoreError>, bool) {
    let touch = policy.touch();
    let timed_out = AtomicBool::new(false);
    let answer = retrying(inner, "acquire", || async {
        let answer = inner.store.acquire(key, lease, touch).await;
        if matches!(&answer, Err(error) if error.is_timeout()) {
            timed_out.store(true, Ordering::Relaxed);
        }
        answer
    })
    .await;
    (answer, timed_out.load(Ordering::Relaxed))
}

async fn peek(inner: &Inner, key: &KeyHash, policy: &Policy) -> Result<Acquired, StoreError> {
    let touch = policy.touch();
    retrying(inner, "peek", || inner.store.peek(key, touch)).await
}
