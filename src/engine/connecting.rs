//! Starting without the store or the bus: an engine whose store or bus cannot be reached at start
//! runs on stand-ins and connects in the background, so replicas do not crash-loop through an
//! outage that, had it begun a minute later, they would have served through.
//!
//! A stand-in store answers every call [`StoreError::Unavailable`] ("not connected yet", with the
//! last connect error) until it is connected, which is what a store that went down at run time
//! answers: flights take their route's `on_store_error` path, the circuit breaker opens, and
//! readiness reports the store down. A stand-in bus is disconnected until it is connected, so
//! followers poll, as after a lost subscription. Each part that failed is retried on its own, with
//! a backoff from [`FIRST_RETRY`] doubling up to [`LAST_RETRY`] (each attempt bounded by the
//! backend's connect timeout), until it connects or the engine closes. Once a part is connected,
//! every live flight re-checks the store and the route generations are read again, as after a
//! bus resync: whatever happened while it was away is caught up.
//!
//! A NATS KV store and its events are one part (the events are the bucket's stream). Settings
//! that can never work (a bad namespace, a bus that contradicts the store) are still refused.

use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;

use super::backend::{Backend, ConnectError, StoreConfig, validate_namespace};
use crate::bus::{Bus, BusError, EventSink};
use crate::key::KeyHash;
use crate::store::{
    Acquired, Fenced, IndexEntry, KeyStatus, LeaseRequest, Refresh, Renewed, Revalidation,
    Selector, Store, StoreError, Token, Touch,
};

/// First pause before trying a part again.
const FIRST_RETRY: Duration = Duration::from_millis(250);
/// Longest pause between two tries: an outage that ends is noticed within this (plus a connect).
const LAST_RETRY: Duration = Duration::from_secs(5);

/// Connects `backend` like [`Backend::connect`], except that a store or bus that cannot be
/// reached now is replaced by a stand-in and connected in the background.
pub(crate) async fn start(
    backend: &Backend,
    namespace: &str,
    sink: Arc<dyn EventSink>,
) -> Result<(Arc<dyn Store>, Arc<dyn Bus>), ConnectError> {
    validate_namespace(namespace)?;
    backend.check()?;
    let store = Arc::new(PendingStore::new(backend));
    let bus = Arc::new(PendingBus::new(backend));
    let retry = |part, error| {
        let retry = Retry::new(part, backend, namespace, sink.clone(), &store, &bus, error);
        tokio::spawn(retry.run());
    };
    if matches!(backend.store, StoreConfig::Nats { .. }) {
        match backend.connect(namespace, sink.clone()).await {
            Ok(pair) => return Ok(pair),
            Err(error) if error.is_unreachable() => retry(Part::Both, error),
            Err(error) => return Err(error),
        }
        return Ok((store, bus));
    }
    let (connected_store, connected_bus) = tokio::join!(
        backend.connect_store(namespace),
        backend.connect_bus(namespace, sink.clone())
    );
    match (connected_store, connected_bus) {
        (Ok(store), Ok(bus)) => Ok((store, bus)),
        (Err(error), connected_bus) if !error.is_unreachable() => {
            if let Ok(bus) = connected_bus {
                bus.close().await;
            }
            Err(error)
        }
        (_, Err(error)) if !error.is_unreachable() => Err(error),
        (connected_store, connected_bus) => {
            match connected_store {
                Ok(connected) => store.connected(connected),
                Err(error) => retry(Part::Store, error),
            }
            match connected_bus {
                Ok(connected) => bus.connected(connected).await,
                Err(error) => retry(Part::Bus, error),
            }
            Ok((store, bus))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The background retries

/// What a background retry connects.
#[derive(Clone, Copy, Debug)]
enum Part {
    Store,
    Bus,
    /// A NATS KV store and its events.
    Both,
}

impl Part {
    fn name(self) -> &'static str {
        match self {
            Part::Store | Part::Both => "store",
            Part::Bus => "bus",
        }
    }
}

/// One part's retries: what to connect, where to put it, and when to stop.
struct Retry {
    part: Part,
    backend: Backend,
    namespace: String,
    sink: Arc<dyn EventSink>,
    /// Weak: an engine dropped without being closed ends its retries too.
    store: Weak<PendingStore>,
    bus: Weak<PendingBus>,
    /// Turns true when the engine closes its bus.
    closed: watch::Receiver<bool>,
    /// When the part was first found down, for the log line that says it is back.
    since: Instant,
    /// The last error, logged again only when the reason changes.
    last: String,
}

impl Retry {
    fn new(
        part: Part,
        backend: &Backend,
        namespace: &str,
        sink: Arc<dyn EventSink>,
        store: &Arc<PendingStore>,
        bus: &Arc<PendingBus>,
        error: ConnectError,
    ) -> Self {
        tracing::warn!(
            part = part.name(),
            "{error}: starting without it; each route's on_store_error decides meanwhile, and it \
             is connected in the background"
        );
        if !matches!(part, Part::Bus) {
            store.failed(&error);
        }
        Retry {
            part,
            backend: backend.clone(),
            namespace: namespace.to_owned(),
            sink,
            store: Arc::downgrade(store),
            bus: Arc::downgrade(bus),
            closed: bus.closed.subscribe(),
            since: Instant::now(),
            last: error.to_string(),
        }
    }

    /// Tries again after each pause until the part connects, the engine closes or it is gone.
    async fn run(mut self) {
        for attempt in 0u32.. {
            let pause = FIRST_RETRY
                .saturating_mul(2u32.saturating_pow(attempt.min(16)))
                .min(LAST_RETRY);
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = self.closed.wait_for(|closed| *closed) => return,
            }
            let (Some(store), Some(bus)) = (self.store.upgrade(), self.bus.upgrade()) else {
                return;
            };
            match self.connect(&store, &bus).await {
                Ok(()) => return self.back(),
                Err(error) => self.failed(&store, &error),
            }
        }
    }

    /// One try; on success the stand-ins forward to what connected.
    async fn connect(&self, store: &PendingStore, bus: &PendingBus) -> Result<(), ConnectError> {
        let (backend, namespace) = (&self.backend, self.namespace.as_str());
        match self.part {
            Part::Store => store.connected(backend.connect_store(namespace).await?),
            Part::Bus => {
                bus.connected(backend.connect_bus(namespace, self.sink.clone()).await?)
                    .await
            }
            Part::Both => {
                let (connected_store, connected_bus) =
                    backend.connect(namespace, self.sink.clone()).await?;
                store.connected(connected_store);
                bus.connected(connected_bus).await;
            }
        }
        Ok(())
    }

    /// Notes a failed try (logged again only when its reason differs from the last one's).
    fn failed(&mut self, store: &PendingStore, error: &ConnectError) {
        if !matches!(self.part, Part::Bus) {
            store.failed(error);
        }
        let reason = error.to_string();
        if reason != self.last {
            tracing::warn!(
                part = self.part.name(),
                "{error}: still connecting in the background"
            );
            self.last = reason;
        }
    }

    fn back(&self) {
        let (part, name) = match self.part {
            Part::Store | Part::Both => ("store", self.backend.store_name()),
            Part::Bus => ("bus", self.backend.bus_name()),
        };
        tracing::info!(
            part,
            backend = %name,
            down_for = ?self.since.elapsed(),
            "connected the {part} ({name}); every live flight re-checks the store"
        );
        // Whatever was missed while the part was away is caught up, as after a bus resync.
        self.sink.resync();
    }
}

// ---------------------------------------------------------------------------------------------
// The stand-in store

/// A store that answers "not connected yet" until its connection is handed over, then forwards
/// every call to it.
pub(crate) struct PendingStore {
    kind: &'static str,
    store: OnceLock<Arc<dyn Store>>,
    /// Why the last try failed, for the "not connected yet" answers (and so `/readyz`).
    reason: Mutex<String>,
}

impl PendingStore {
    fn new(backend: &Backend) -> Self {
        let kind = match backend.store {
            StoreConfig::Memory(_) => "memory",
            StoreConfig::Redis { .. } => "redis",
            StoreConfig::Nats { .. } => "nats_kv",
        };
        Self {
            kind,
            store: OnceLock::new(),
            reason: Mutex::new(String::new()),
        }
    }

    fn connected(&self, store: Arc<dyn Store>) {
        let _ = self.store.set(store);
    }

    fn failed(&self, error: &ConnectError) {
        *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = error.to_string();
    }

    fn down(&self) -> StoreError {
        let reason = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        StoreError::Unavailable(format!(
            "not connected yet, connecting in the background; the last try: {reason}"
        ))
    }

    fn get(&self) -> Result<&Arc<dyn Store>, StoreError> {
        self.store.get().ok_or_else(|| self.down())
    }
}

#[async_trait]
impl Store for PendingStore {
    fn kind(&self) -> &'static str {
        self.kind
    }

    // Before it is connected no call succeeds, so nothing is written that could need announcing.
    fn announces(&self) -> bool {
        self.store.get().is_some_and(|store| store.announces())
    }

    // Before it is connected, no event is trusted on its own: the safe side.
    fn events_are_writes(&self) -> bool {
        self.store
            .get()
            .is_some_and(|store| store.events_are_writes())
    }

    fn min_lease_ttl(&self) -> Duration {
        self.store
            .get()
            .map_or(Duration::ZERO, |store| store.min_lease_ttl())
    }

    fn max_value_len(&self) -> Option<usize> {
        self.store.get().and_then(|store| store.max_value_len())
    }

    async fn acquire(
        &self,
        key: &KeyHash,
        lease: &LeaseRequest,
        touch: Option<Touch>,
    ) -> Result<Acquired, StoreError> {
        self.get()?.acquire(key, lease, touch).await
    }

    async fn peek(&self, key: &KeyHash, touch: Option<Touch>) -> Result<Acquired, StoreError> {
        self.get()?.peek(key, touch).await
    }

    async fn renew(
        &self,
        key: &KeyHash,
        token: Token,
        ttl: Duration,
    ) -> Result<Renewed, StoreError> {
        self.get()?.renew(key, token, ttl).await
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
        self.get()?
            .commit_fresh(key, token, value, fresh, ttl, sliding, event)
            .await
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
        self.get()?
            .commit_revalidated(key, token, update, fresh, ttl, sliding, event)
            .await
    }

    async fn lead_refresh(
        &self,
        key: &KeyHash,
        lease: &LeaseRequest,
        within: Duration,
    ) -> Result<Refresh, StoreError> {
        self.get()?.lead_refresh(key, lease, within).await
    }

    async fn release(
        &self,
        key: &KeyHash,
        token: Token,
        event: Bytes,
    ) -> Result<Fenced, StoreError> {
        self.get()?.release(key, token, event).await
    }

    async fn give_up(
        &self,
        key: &KeyHash,
        token: Token,
        pass_ttl: Duration,
        event: Bytes,
    ) -> Result<Fenced, StoreError> {
        self.get()?.give_up(key, token, pass_ttl, event).await
    }

    async fn purge(&self, key: &KeyHash, event: Bytes) -> Result<bool, StoreError> {
        self.get()?.purge(key, event).await
    }

    async fn discard(&self, key: &KeyHash, value: &Bytes) -> Result<bool, StoreError> {
        self.get()?.discard(key, value).await
    }

    async fn status(&self, key: &KeyHash) -> Result<KeyStatus, StoreError> {
        self.get()?.status(key).await
    }

    async fn route_generation(&self, route: &str) -> Result<u64, StoreError> {
        self.get()?.route_generation(route).await
    }

    async fn bump_generation(&self, route: &str, key: &KeyHash) -> Result<u64, StoreError> {
        self.get()?.bump_generation(route, key).await
    }

    async fn index(&self, entry: &IndexEntry) -> Result<(), StoreError> {
        self.get()?.index(entry).await
    }

    async fn indexed(&self, selector: &Selector, limit: usize) -> Result<Vec<KeyHash>, StoreError> {
        self.get()?.indexed(selector, limit).await
    }
}

// ---------------------------------------------------------------------------------------------
// The stand-in bus

/// A bus that is disconnected until its subscription is handed over, then forwards to it.
pub(crate) struct PendingBus {
    kind: &'static str,
    name: String,
    bus: OnceLock<Arc<dyn Bus>>,
    /// Set when the engine closes the bus: the retries stop, and a bus connected after is closed.
    closed: watch::Sender<bool>,
}

impl PendingBus {
    fn new(backend: &Backend) -> Self {
        use super::backend::BusConfig;
        let kind = match (&backend.store, &backend.bus) {
            (StoreConfig::Nats { .. }, _) | (_, BusConfig::Store) => "nats_kv",
            (_, BusConfig::Memory(_)) => "memory",
            (_, BusConfig::Redis { .. }) => "redis",
            (_, BusConfig::Nats { .. }) => "nats",
        };
        Self {
            kind,
            name: backend.bus_name(),
            bus: OnceLock::new(),
            closed: watch::channel(false).0,
        }
    }

    async fn connected(&self, bus: Arc<dyn Bus>) {
        let _ = self.bus.set(bus.clone());
        // A close that came first found nothing to close.
        if *self.closed.borrow() {
            bus.close().await;
        }
    }
}

#[async_trait]
impl Bus for PendingBus {
    fn kind(&self) -> &'static str {
        self.kind
    }

    async fn publish(&self, key: &KeyHash, encoded: Bytes) -> Result<(), BusError> {
        match self.bus.get() {
            Some(bus) => bus.publish(key, encoded).await,
            None => Err(BusError::Unavailable(format!(
                "not connected yet, connecting in the background ({})",
                self.name
            ))),
        }
    }

    fn connected(&self) -> bool {
        self.bus.get().is_some_and(|bus| bus.connected())
    }

    async fn close(&self) {
        self.closed.send_replace(true);
        if let Some(bus) = self.bus.get() {
            bus.close().await;
        }
    }

    #[cfg(any(test, feature = "test-util"))]
    async fn sever(&self) {
        if let Some(bus) = self.bus.get() {
            bus.sever().await;
        }
    }
}
