//! What every path of a flight (a lead, a wait, a refresh, an orphan's release, a purge) does the
//! same way: store calls counted, timed and retried; events published; copies kept in the L1.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::Inner;
use super::flight::Flight;
use crate::envelope::Entry;
use crate::key::KeyHash;
use crate::store::StoreError;

/// Keeps a copy of what `flight` read or built in the L1 for `ttl`, unless a delete of its key
/// was seen. Checked before the insert and again after it: a delete marks the flight before it
/// empties the L1, so one that lands in between never leaves the copy behind.
pub(crate) fn keep(inner: &Inner, flight: &Flight, entry: Arc<Entry>, ttl: Duration) {
    if flight.is_invalidated() {
        return;
    }
    inner.l1.insert(flight.key, entry, ttl);
    if flight.is_invalidated() {
        inner.l1.invalidate(&flight.key);
    }
}

/// A store call, counted and timed; a client-side timeout is retried (the protocol makes that safe
/// for acquire, peek and renew: the retry finds its own token).
pub(crate) async fn retrying<T, F, Fut>(
    inner: &Inner,
    op: &'static str,
    call: F,
) -> Result<T, StoreError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut attempt = 1;
    loop {
        match store_call(inner, op, &call).await {
            Err(error) if error.is_timeout() && attempt < inner.config.store_attempts => {
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// One store call, counted and timed.
pub(crate) async fn store_call<T, F, Fut>(
    inner: &Inner,
    op: &'static str,
    call: F,
) -> Result<T, StoreError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let started = Instant::now();
    let result = call().await;
    let label = match &result {
        Ok(_) => "ok",
        Err(StoreError::Timeout { .. }) => "timeout",
        Err(StoreError::Unavailable(_)) => "unavailable",
        Err(StoreError::Protocol(_)) => "protocol",
        Err(StoreError::CircuitOpen { .. }) => "circuit_open",
    };
    inner.metrics.store_call(op, label, started.elapsed());
    result
}

/// Publishes an event on the bus (for stores that do not announce themselves). A lost event costs
/// followers at most one poll interval, so a failure is logged, not retried.
pub(crate) async fn announce(inner: &Inner, key: &KeyHash, encoded: Bytes) {
    let started = Instant::now();
    let published = inner.bus.publish(key, encoded).await;
    inner
        .metrics
        .bus_publish_duration
        .observe(started.elapsed().as_secs_f64());
    if let Err(error) = published {
        tracing::warn!(%key, %error, "could not publish an event; followers will poll");
    }
}
