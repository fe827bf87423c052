//! A store behind its circuit breaker ([`super::breaker`]): one per process, in front of every
//! call the process makes (flights, builds, purges, status, readiness probes).
//!
//! While the breaker is open a call answers [`StoreError::CircuitOpen`] at once, so an outage costs
//! each request nothing beyond the calls that opened the breaker; the first call after `open_for`
//! is the probe, and its answer closes the breaker again.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::Instant;

use super::breaker::{Breaker, BreakerSettings, Pass, Phase, Transition};
use super::{
    Acquired, Fenced, IndexEntry, KeyStatus, LeaseRequest, Refresh, Renewed, Revalidation,
    Selector, Store, StoreError, Token, Touch,
};
use crate::key::KeyHash;
use crate::metrics::Metrics;

/// A store whose calls go through one breaker.
pub struct GuardedStore {
    inner: Arc<dyn Store>,
    breaker: Breaker,
    /// Where the breaker's gauge, transitions and refusals are counted.
    metrics: Metrics,
}

impl GuardedStore {
    pub fn new(inner: Arc<dyn Store>, settings: BreakerSettings, metrics: Metrics) -> Self {
        metrics.breaker_state(Phase::Closed.name());
        // Every transition's series exists from the start, so a dashboard's rate() sees zero.
        for phase in Phase::ALL {
            metrics
                .store_breaker_transitions
                .with_label_values(&[phase.name()]);
        }
        Self {
            inner,
            breaker: Breaker::new(settings),
            metrics,
        }
    }

    /// Where the breaker is now.
    pub fn phase(&self) -> Phase {
        self.breaker.state().phase()
    }

    fn note(&self, change: Option<Transition>) {
        let Some(Transition { from, to }) = change else {
            return;
        };
        self.metrics.breaker_state(to.name());
        self.metrics
            .store_breaker_transitions
            .with_label_values(&[to.name()])
            .inc();
        match to {
            Phase::Open if from == Phase::Closed => tracing::warn!(
                store = self.inner.kind(),
                failures = self.breaker.settings().failures,
                open_for = ?self.breaker.settings().open_for,
                "store calls keep failing; circuit breaker open, calls fail fast until a probe answers"
            ),
            Phase::Closed => tracing::info!(
                store = self.inner.kind(),
                "store answered the probe; circuit breaker closed"
            ),
            _ => tracing::debug!(from = from.name(), to = to.name(), "store circuit breaker"),
        }
    }

    /// Runs `call` if the breaker lets it through, and tells the breaker how it went.
    async fn guard<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let (pass, change) = self.breaker.admit(Instant::now());
        self.note(change);
        let Ok(pass) = pass else {
            self.metrics.store_short_circuits.inc();
            return Err(StoreError::CircuitOpen { op });
        };
        let mut probe = ProbeOut {
            store: self,
            out: pass == Pass::Probe,
        };
        let result = call.await;
        probe.out = false;
        // Only silence counts against the store: any answer, even an unexpected one, means it is
        // there.
        let answered = !matches!(
            result,
            Err(StoreError::Timeout { .. } | StoreError::Unavailable(_))
        );
        if pass == Pass::Probe {
            let error = result.as_ref().err();
            tracing::debug!(op, answered, ?error, "store circuit breaker probe");
        }
        self.note(self.breaker.record(pass, answered, Instant::now()));
        result
    }
}

/// Ends a probe whose call was dropped before it answered, so the breaker does not wait for it
/// forever.
struct ProbeOut<'a> {
    store: &'a GuardedStore,
    out: bool,
}

impl Drop for ProbeOut<'_> {
    fn drop(&mut self) {
        if self.out {
            let change = self.store.breaker.probe_dropped(Instant::now());
            self.store.note(change);
        }
    }
}

#[async_trait]
impl Store for GuardedStore {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn announces(&self) -> bool {
        self.inner.announces()
    }

    fn events_are_writes(&self) -> bool {
        self.inner.events_are_writes()
    }

    fn min_lease_ttl(&self) -> Duration {
        self.inner.min_lease_ttl()
    }

    fn max_value_len(&self) -> Option<usize> {
        self.inner.max_value_len()
    }

    async fn acquire(
        &self,
        key: &KeyHash,
        lease: &LeaseRequest,
        touch: Option<Touch>,
    ) -> Result<Acquired, StoreError> {
        self.guard("acquire", self.inner.acquire(key, lease, touch))
            .await
    }

    async fn peek(&self, key: &KeyHash, touch: Option<Touch>) -> Result<Acquired, StoreError> {
        self.guard("peek", self.inner.peek(key, touch)).await
    }

    async fn renew(
        &self,
        key: &KeyHash,
        token: Token,
        ttl: Duration,
    ) -> Result<Renewed, StoreError> {
        self.guard("renew", self.inner.renew(key, token, ttl)).await
    }

    async fn commit_fresh(
        &self,
        key: &KeyHash,
        token: Token,
        value: Bytes,
        fresh: Duration,
        ttl: Duration,
        sliding: bool,
        event: Bytes,
    ) -> Result<Fenced, StoreError> {
        let call = self
            .inner
            .commit_fresh(key, token, value, fresh, ttl, sliding, event);
        self.guard("commit", call).await
    }

    async fn commit_revalidated(
        &self,
        key: &KeyHash,
        token: Token,
        update: &Revalidation,
        fresh: Duration,
        ttl: Duration,
        sliding: bool,
        event: Bytes,
    ) -> Result<Fenced, StoreError> {
        let call = self
            .inner
            .commit_revalidated(key, token, update, fresh, ttl, sliding, event);
        self.guard("commit", call).await
    }

    async fn lead_refresh(
        &self,
        key: &KeyHash,
        lease: &LeaseRequest,
        within: Duration,
    ) -> Result<Refresh, StoreError> {
        self.guard("early", self.inner.lead_refresh(key, lease, within))
            .await
    }

    async fn release(
        &self,
        key: &KeyHash,
        token: Token,
        event: Bytes,
    ) -> Result<Fenced, StoreError> {
        self.guard("release", self.inner.release(key, token, event))
            .await
    }

    async fn give_up(
        &self,
        key: &KeyHash,
        token: Token,
        pass_ttl: Duration,
        event: Bytes,
    ) -> Result<Fenced, StoreError> {
        self.guard("give_up", self.inner.give_up(key, token, pass_ttl, event))
            .await
    }

    async fn purge(&self, key: &KeyHash, event: Bytes) -> Result<bool, StoreError> {
        self.guard("purge", self.inner.purge(key, event)).await
    }

    async fn discard(&self, key: &KeyHash, value: &Bytes) -> Result<bool, StoreError> {
        self.guard("discard", self.inner.discard(key, value)).await
    }

    async fn status(&self, key: &KeyHash) -> Result<KeyStatus, StoreError> {
        self.guard("status", self.inner.status(key)).await
    }

    async fn route_generation(&self, route: &str) -> Result<u64, StoreError> {
        self.guard("route_generation", self.inner.route_generation(route))
            .await
    }

    async fn bump_generation(&self, route: &str, key: &KeyHash) -> Result<u64, StoreError> {
        self.guard("bump_generation", self.inner.bump_generation(route, key))
            .await
    }

    async fn index(&self, entry: &IndexEntry) -> Result<(), StoreError> {
        self.guard("index", self.inner.index(entry)).await
    }

    async fn indexed(&self, selector: &Selector, limit: usize) -> Result<Vec<KeyHash>, StoreError> {
        self.guard("indexed", self.inner.indexed(selector, limit))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    const MS: Duration = Duration::from_millis(1);

    /// A store that never answers: every call times out at once.
    struct Silent;

    #[async_trait]
    impl Store for Silent {
        fn kind(&self) -> &'static str {
            "silent"
        }
        fn announces(&self) -> bool {
            false
        }
        fn events_are_writes(&self) -> bool {
            false
        }
        async fn acquire(
            &self,
            _: &KeyHash,
            _: &LeaseRequest,
            _: Option<Touch>,
        ) -> Result<Acquired, StoreError> {
            Err(StoreError::Timeout { op: "acquire" })
        }
        async fn peek(&self, _: &KeyHash, _: Option<Touch>) -> Result<Acquired, StoreError> {
            Err(StoreError::Timeout { op: "peek" })
        }
        async fn renew(&self, _: &KeyHash, _: Token, _: Duration) -> Result<Renewed, StoreError> {
            unimplemented!()
        }
        async fn commit_fresh(
            &self,
            _: &KeyHash,
            _: Token,
            _: Bytes,
            _: Duration,
            _: Duration,
            _: bool,
            _: Bytes,
        ) -> Result<Fenced, StoreError> {
            unimplemented!()
        }
        async fn lead_refresh(
            &self,
            _: &KeyHash,
            _: &LeaseRequest,
            _: Duration,
        ) -> Result<Refresh, StoreError> {
            unimplemented!()
        }
        async fn release(&self, _: &KeyHash, _: Token, _: Bytes) -> Result<Fenced, StoreError> {
            unimplemented!()
        }
        async fn give_up(
            &self,
            _: &KeyHash,
            _: Token,
            _: Duration,
            _: Bytes,
        ) -> Result<Fenced, StoreError> {
            unimplemented!()
        }
        async fn purge(&self, _: &KeyHash, _: Bytes) -> Result<bool, StoreError> {
            unimplemented!()
        }
        async fn discard(&self, _: &KeyHash, _: &Bytes) -> Result<bool, StoreError> {
            unimplemented!()
        }
        async fn status(&self, _: &KeyHash) -> Result<KeyStatus, StoreError> {
            Err(StoreError::Unavailable("down".into()))
        }
        async fn route_generation(&self, _: &str) -> Result<u64, StoreError> {
            unimplemented!()
        }
        async fn bump_generation(&self, _: &str, _: &KeyHash) -> Result<u64, StoreError> {
            unimplemented!()
        }
        async fn index(&self, _: &IndexEntry) -> Result<(), StoreError> {
            unimplemented!()
        }
        async fn indexed(&self, _: &Selector, _: usize) -> Result<Vec<KeyHash>, StoreError> {
            unimplemented!()
        }
    }

    fn settings() -> BreakerSettings {
        BreakerSettings {
            failures: 2,
            open_for: 100 * MS,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_refuses_without_calling_and_counts_it() {
        let metrics = Metrics::new();
        let store = GuardedStore::new(Arc::new(Silent), settings(), metrics.clone());
        let key = KeyHash::from_bytes([1; 32]);
        for _ in 0..2 {
            assert!(store.peek(&key, None).await.unwrap_err().is_timeout());
        }
        assert_eq!(store.phase(), Phase::Open);
        assert_eq!(
            metrics
                .store_breaker_state
                .with_label_values(&["open"])
                .get(),
            1
        );
        assert_eq!(
            store.peek(&key, None).await,
            Err(StoreError::CircuitOpen { op: "peek" })
        );
        assert_eq!(metrics.store_short_circuits.get(), 1);
        assert_eq!(
            metrics
                .store_breaker_transitions
                .with_label_values(&["open"])
                .get(),
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_that_answers_keeps_it_closed() {
        let metrics = Metrics::new();
        let store = GuardedStore::new(Arc::new(MemoryStore::new()), settings(), metrics);
        let key = KeyHash::from_bytes([1; 32]);
        for _ in 0..10 {
            store.status(&key).await.expect("memory answers");
        }
        assert_eq!(store.phase(), Phase::Closed);
    }
}
