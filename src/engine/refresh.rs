//! Background refreshes: a value is rebuilt under the lease while callers keep being answered from
//! the stored copy.
//!
//! Two things start one:
//!
//! - stale-while-revalidate: ACQUIRE found the value past its freshness, inside its stale window,
//!   and told this flight "stale entry; you lead the refresh". The flight answers its callers with
//!   the stale copy at once and hands the lease to a refresh.
//! - early refresh (probabilistic early expiration, "XFetch", Vattani et al., "Optimal
//!   Probabilistic Cache Stampede Prevention", VLDB 2015): a hit on a fresh value refreshes it
//!   early when `now - delta * beta * ln(rand()) >= expiry`, i.e. when
//!   `-delta * beta * ln(rand()) >= time left`, where `delta` is how long the value's own fetch
//!   took. The chance rises as expiry nears, and more steeply for values that are slow to build.
//!   The refresh first takes the lease with [`crate::store::Store::lead_refresh`], which applies
//!   the same draw to the value the store holds, on the store's clock: however many hits decide to
//!   refresh, on however many processes, one fetch runs, and an L1 copy older than the stored
//!   value never gets the newer one refreshed again.
//!
//! A value that can be revalidated (it names a validator) is revalidated: the build is handed the
//! stored entry ([`super::BuildRole::Revalidate`]) and asks the source whether it changed. Either
//! way the refresh is the leader's usual build (`build::lead`: lease renewal, `max_fetch`,
//! the guard that abandons on panic or cancellation) on a detached flight that no caller joins, so
//! no request ever waits on it. Its commit replaces the value; a failure releases the lease and
//! leaves the stale copy in place for a later request to try again.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;

use super::flight::Conclusion;
use super::{Builder, Inner, Policy, build};
use crate::envelope::Entry;
use crate::key::KeyHash;
use crate::lease::Token;
use crate::store::{LeaseRequest, Refresh};

/// Why a refresh runs in the background (the `reason` label of its metric).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reason {
    /// The value is stale, inside its stale-while-revalidate window.
    Stale,
    /// The value is fresh, and a hit decided to refresh it early.
    Early,
}

impl Reason {
    fn label(self) -> &'static str {
        match self {
            Reason::Stale => "stale",
            Reason::Early => "early",
        }
    }
}

/// Keys this process is refreshing early: one attempt per key per process at a time, so a hot key
/// near its expiry costs one store call here, not one per hit.
#[derive(Default)]
pub(crate) struct Refreshing {
    keys: Mutex<HashSet<KeyHash>>,
}

impl Refreshing {
    /// Marks `key` as being refreshed; false if it already was.
    fn start(&self, key: KeyHash) -> bool {
        self.keys
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(key)
    }

    fn end(&self, key: &KeyHash) {
        self.keys
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(key);
    }
}

/// The XFetch draw: how far ahead of its expiry a hit refreshes a value whose fetch took `delta`,
/// with `beta` (1 is the paper's optimum; above 1 refreshes earlier), for `draw` uniform in
/// (0, 1]: `-delta * beta * ln(draw)`. A hit with that much freshness left or less refreshes.
pub(crate) fn ahead(delta: Duration, beta: f64, draw: f64) -> Duration {
    if beta <= 0.0 || !(draw > 0.0 && draw <= 1.0) {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(-delta.as_secs_f64() * beta * draw.ln()).unwrap_or(Duration::MAX)
}

/// Whether a hit with `left` of freshness refreshes early; see [`ahead`].
pub(crate) fn refresh_early(delta: Duration, beta: f64, left: Duration, draw: f64) -> bool {
    let valid = !delta.is_zero() && beta > 0.0 && draw > 0.0 && draw <= 1.0;
    valid && ahead(delta, beta, draw) >= left
}

/// One uniform draw in (0, 1] for [`refresh_early`].
fn draw() -> f64 {
    1.0 - rand::rng().random::<f64>()
}

/// On a hit of `entry`: refresh early in the background if the policy asks for it and the draw
/// says so. The refresh revalidates `entry` when it can be: a copy older than the stored value
/// only costs the head-only commit (the store finds another head and takes the whole value).
pub(crate) fn on_hit(
    inner: &Arc<Inner>,
    key: &KeyHash,
    entry: &Arc<Entry>,
    left: Duration,
    policy: &Policy,
    builder: Option<&Builder>,
) {
    let (Some(beta), Some(builder)) = (policy.early_refresh, builder) else {
        return;
    };
    let delta = entry.fetch_time;
    let draw = draw();
    if !refresh_early(delta, beta, left, draw) || !inner.refreshing.start(*key) {
        return;
    }
    let ahead = ahead(delta, beta, draw);
    let revalidate = build::revalidatable(entry).then(|| entry.clone());
    let (task_inner, key, policy, builder) = (inner.clone(), *key, policy.clone(), builder.clone());
    spawn(inner, async move {
        let inner = task_inner;
        let lease = LeaseRequest {
            token: Token::random(),
            node: inner.config.node.as_str().into(),
            ttl: policy.lease_ttl,
        };
        // The store applies the same draw to the value it holds now, on its own clock: a copy
        // that someone already refreshed is not refreshed again.
        let taken = super::calls::retrying(&inner, "lead_refresh", || {
            inner.store.lead_refresh(&key, &lease, ahead)
        })
        .await;
        if let Ok(Refresh::Lead { .. }) = taken {
            inner.metrics.lease("acquired");
            let early = Reason::Early;
            run(
                &inner,
                key,
                &policy,
                &builder,
                lease.token,
                early,
                revalidate,
            )
            .await;
        }
        inner.refreshing.end(&key);
    });
}

/// Refreshes a stale value under the lease `token` that ACQUIRE just gave this process,
/// revalidating `revalidate` (the stale entry) when it can be.
pub(crate) fn stale(
    inner: &Arc<Inner>,
    key: KeyHash,
    policy: &Policy,
    builder: &Builder,
    token: Token,
    revalidate: Option<Arc<Entry>>,
) {
    inner.metrics.lease("acquired");
    let (task_inner, policy, builder) = (inner.clone(), policy.clone(), builder.clone());
    spawn(inner, async move {
        let stale = Reason::Stale;
        run(
            &task_inner,
            key,
            &policy,
            &builder,
            token,
            stale,
            revalidate,
        )
        .await;
    });
}

/// Runs the build on a detached flight and counts how it ended.
async fn run(
    inner: &Arc<Inner>,
    key: KeyHash,
    policy: &Policy,
    builder: &Builder,
    token: Token,
    reason: Reason,
    revalidate: Option<Arc<Entry>>,
) {
    let detached = inner.flights.detached(key);
    let flight = &detached.flight;
    let result = match build::lead(inner, flight, policy, builder, token, revalidate).await {
        Conclusion::Value { .. } => "stored",
        Conclusion::Failed(_) => "failed",
        Conclusion::Uncacheable { .. } => "uncacheable",
        _ => "abandoned",
    };
    inner
        .metrics
        .background_refreshes
        .with_label_values(&[&policy.label, reason.label(), result])
        .inc();
}

/// Spawns a refresh (or another task that outlives its caller) among the engine's background
/// tasks, which closing waits for.
pub(super) fn spawn(inner: &Inner, task: impl Future<Output = ()> + Send + 'static) {
    let mut background = inner
        .background
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // Reap finished refreshes so the set holds only live ones.
    while background.try_join_next().is_some() {}
    background.spawn(task);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn early_refresh_grows_likelier_as_expiry_nears() {
        let delta = 100 * MS;
        // ln(0.5) = -0.69: with beta 1, a draw of 0.5 refreshes once 69 ms or less are left.
        assert!(refresh_early(delta, 1.0, 60 * MS, 0.5));
        assert!(!refresh_early(delta, 1.0, 80 * MS, 0.5));
        // A larger beta refreshes earlier.
        assert!(refresh_early(delta, 2.0, 120 * MS, 0.5));
        // At expiry every draw refreshes; far from it a draw of 1 never does.
        assert!(refresh_early(delta, 1.0, Duration::ZERO, 1.0));
        assert!(!refresh_early(delta, 1.0, 10 * MS, 1.0));
    }

    #[test]
    fn without_a_measured_fetch_or_a_valid_draw_nothing_refreshes_early() {
        assert!(!refresh_early(Duration::ZERO, 1.0, Duration::ZERO, 0.5));
        assert!(!refresh_early(100 * MS, 0.0, Duration::ZERO, 0.5));
        assert!(!refresh_early(100 * MS, 1.0, Duration::ZERO, 0.0));
        assert!(!refresh_early(100 * MS, 1.0, Duration::ZERO, f64::NAN));
    }
}
