//! The coalescing engine: flights, the leader/follower state machine, the build task, and the typed
//! dictionary API on top.
//!
//! - [`flight`]: the per-process table of flights, one per key.
//! - `drive`: what a flight does: ACQUIRE, then answer, wait, or lead.
//! - `build`: the leader's spawned build under a renewed lease, with a guard that abandons it.
//! - `refresh`: background refreshes under the lease (stale-while-revalidate, early refresh).
//! - `dispatch`: the bus's events, delivered to the flights they concern and the L1.
//! - `generations`: per-route generations, the O(1) purge of a whole route.
//! - `invalidate`: purges beyond one key (a route, a path prefix, a surrogate tag).
//! - [`backend`]: which store and bus an engine talks to, and connecting to them.
//! - `connecting`: starting without a store or bus that is down, and connecting it in the
//!   background.
//! - [`dictionary`]: the typed, serde-based "build once, read many" dictionary.
//!
//! The engine speaks bytes ([`Entry`] envelopes); the proxy and the dictionary put their values in
//! them.

mod answer;
pub mod backend;
mod build;
mod calls;
mod connecting;
pub mod dictionary;
mod dispatch;
mod drive;
pub mod flight;
mod generations;
mod invalidate;
mod orphans;
mod refresh;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;

pub use answer::{
    Answer, AnswerSource, Attachment, BuildError, BuildFuture, BuildRole, Builder, Built,
    EngineError, Failure, FailureCause, Private,
};
pub use backend::{
    Backend, BusConfig, ConnectError, DEFAULT_STORE_CONNECT_TIMEOUT, DEFAULT_STORE_TIMEOUT,
    StoreConfig,
};
pub use dictionary::{Dictionary, DictionaryConfig, DictionaryError, Expiry, Status};
pub use flight::Source;
pub use invalidate::{INVALIDATION_RETRY_WINDOW, Invalidation, Purged};

use crate::bus::{Bus, Event, EventKind};
use crate::envelope::Entry;
use crate::key::KeyHash;
use crate::l1::L1;
use crate::metrics::Metrics;
use crate::store::guarded::GuardedStore;
use crate::store::{KeyStatus, Store, Touch};
use flight::{Conclusion, FlightTable, Mode, Ticket};

/// How an entry expires in the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpiryMode {
    /// Gone its TTL after it was stored, however often it is read.
    Absolute,
    /// Gone `window` after it was last read; reads touch the TTL (throttled: only once it has
    /// fallen by a tenth of the window), never rewrite the value. Builders store entries with a TTL
    /// of `window`.
    Sliding { window: Duration },
}

/// How one key is resolved; the proxy derives one per route, the dictionary one per dictionary.
#[derive(Clone, Debug)]
pub struct Policy {
    pub expiry: ExpiryMode,
    /// Lifetime of the store's lease: how long a dead leader can hold up its followers.
    pub lease_ttl: Duration,
    /// The build is abandoned after this long.
    pub max_fetch: Duration,
    /// Followers re-check the store at least this often (jittered ±20%), in case an event was lost.
    pub poll_interval: Duration,
    /// How long an uncacheable answer makes its key pass straight through.
    pub pass_ttl: Duration,
    /// The `route` label of this policy's metrics (a route name, or the dictionary's name).
    pub label: Arc<str>,
    /// Early refresh (probabilistic early expiration, see `refresh`): `Some(beta)` lets a hit
    /// refresh a fresh value in the background, more likely the nearer its expiry; 1.0 is the
    /// usual beta, larger refreshes earlier. `None` waits for expiry.
    pub early_refresh: Option<f64>,
    /// Callers that may wait on one key's flight besides the one that started it; a caller beyond
    /// gets [`EngineError::TooManyFollowers`] at once.
    pub max_followers: usize,
    /// What a build flight does when the store cannot be reached.
    pub on_store_error: OnStoreError,
    /// How long past its freshness the store keeps an entry that can be revalidated (one that
    /// names a validator, `etag` or `last-modified`, or that has no freshness at all), so that
    /// its refresh asks the source whether it changed instead of building it anew (see
    /// [`BuildRole::Revalidate`]). Its stale windows still say when it may be served stale;
    /// zero keeps entries only for those.
    pub revalidate_keep: Duration,
}

/// The default [`Policy::revalidate_keep`]: long enough for a key read every few minutes to be
/// revalidated rather than fetched whole, short enough that entries nobody reads leave the store.
pub const DEFAULT_REVALIDATE_KEEP: Duration = Duration::from_secs(600);

/// What a build flight does when the store cannot be reached (a timeout, a lost connection, or
/// the store's circuit breaker open).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnStoreError {
    /// Degrade: build for this process's callers only (still one build per key per process, kept
    /// in the L1 for later callers), store and announce nothing.
    #[default]
    Open,
    /// Fail the flight: its callers get [`EngineError::Store`] at once, and nothing is built.
    Closed,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            label: "default".into(),
            expiry: ExpiryMode::Absolute,
            lease_ttl: Duration::from_secs(10),
            max_fetch: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            pass_ttl: Duration::from_secs(120),
            early_refresh: None,
            max_followers: usize::MAX,
            on_store_error: OnStoreError::Open,
            revalidate_keep: DEFAULT_REVALIDATE_KEEP,
        }
    }
}

impl Policy {
    /// The TTL touch that reads carry, if expiry slides.
    fn touch(&self) -> Option<Touch> {
        match self.expiry {
            ExpiryMode::Absolute => None,
            ExpiryMode::Sliding { window } => Some(Touch {
                ttl: window,
                slack: sliding_slack(window),
            }),
        }
    }
}

/// A sliding TTL is touched once it has fallen by a tenth (at most once a minute for long TTLs).
fn sliding_slack(ttl: Duration) -> Duration {
    (ttl / 10).min(Duration::from_secs(60))
}

/// Settings of one engine (one process's view of one namespace).
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Engines with the same namespace and store coalesce together.
    pub namespace: String,
    /// This process's name in leases (for status and debugging).
    pub node: String,
    /// L1 size in bytes; 0 turns it off.
    pub l1_max_bytes: u64,
    /// Values below this size ride inside READY events.
    pub inline_max: usize,
    /// Tries of an ACQUIRE or RENEW that timed out on the client (each retry checks for its own token).
    pub store_attempts: u32,
}

impl EngineConfig {
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            node: format!("node-{:08x}", rand::random::<u32>()),
            l1_max_bytes: 64 * 1024 * 1024,
            inline_max: crate::bus::INLINE_MAX,
            store_attempts: 2,
        }
    }
}

/// What [`Engine::readiness`] found.
#[derive(Debug, Clone)]
pub struct Readiness {
    /// `Ok` when the store answered its probe; else why not.
    pub store: Result<(), String>,
    pub store_kind: &'static str,
    /// The store's circuit breaker after the probe.
    pub breaker: crate::store::breaker::Phase,
    /// Whether the bus's subscription is up (without it, followers learn of outcomes by their
    /// lease-expiry re-check and safety poll).
    pub bus_connected: bool,
    pub bus_kind: &'static str,
}

impl Readiness {
    /// The report's lines on the store and the bus.
    pub fn describe(&self) -> String {
        let store = match &self.store {
            Ok(()) => "answering".to_owned(),
            Err(reason) => format!("not answering ({reason})"),
        };
        let bus = if self.bus_connected {
            "connected"
        } else {
            "disconnected (followers poll)"
        };
        format!(
            "store: {} {store}, breaker {}\nbus: {} {bus}\n",
            self.store_kind,
            self.breaker.name(),
            self.bus_kind
        )
    }
}

/// Whether an engine needs its store and bus up to start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backends {
    Required,
    /// Connects what is down in the background (see `connecting`).
    InBackground,
}

/// Shared state of one engine.
pub(crate) struct Inner {
    pub config: EngineConfig,
    /// The store behind its circuit breaker (`guarded`, as a trait object).
    pub store: Arc<dyn Store>,
    /// The same store, for its breaker's state.
    pub guarded: Arc<GuardedStore>,
    /// Tokens of ACQUIREs that timed out, whose lease may appear once the store answers again.
    pub orphans: orphans::Orphans,
    pub bus: Arc<dyn Bus>,
    pub l1: L1,
    pub flights: Arc<FlightTable>,
    pub metrics: Metrics,
    /// Source of caller ids (a flight's owner is the caller that created it).
    pub next_caller: AtomicU64,
    /// Set by `close`: new calls are refused and leaders abandon.
    pub closing: AtomicBool,
    /// Set by the crash fault: tasks stop without releasing anything, as if the process died.
    pub crashed: AtomicBool,
    /// Wakes running builds when the engine closes.
    pub shutdown: tokio::sync::watch::Sender<bool>,
    /// Driver tasks still running (closing waits for them).
    pub drivers: tokio::sync::Mutex<tokio::task::JoinSet<()>>,
    /// Keys already logged as too large for the store (bounded, see [`TOO_LARGE_LOGGED`]).
    pub too_large_logged: build::LoggedOnce,
    /// Generations of the routes this process keys (see `generations`).
    pub generations: Arc<generations::Generations>,
    /// Whether the task that re-reads generations after a bus resync is running.
    pub generations_followed: AtomicBool,
    /// Background refreshes still running (closing waits for them, like drivers).
    pub background: std::sync::Mutex<tokio::task::JoinSet<()>>,
    /// Keys this process is refreshing early.
    pub refreshing: refresh::Refreshing,
    /// Invalidations being retried in the background right now (at most
    /// [`invalidate::MAX_RETRYING_INVALIDATIONS`]).
    pub retrying_invalidations: std::sync::atomic::AtomicUsize,
}

/// How many keys the "value too large" log remembers, so that it logs once per key without
/// growing with the key space.
const TOO_LARGE_LOGGED: usize = 1024;

/// The longest [`Engine::ready`] waits for the store to answer its probe, so a readiness check
/// stays cheap and bounded when the store hangs (a frozen server answers nothing).
pub const READINESS_PROBE: Duration = Duration::from_secs(2);

/// One process's engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Connects to the backend's store and bus (subscribing before anything else happens); a
    /// store or bus that cannot be reached is an error.
    pub async fn connect(config: EngineConfig, backend: &Backend) -> Result<Self, ConnectError> {
        Self::open(config, backend, Backends::Required).await
    }

    /// Like [`Engine::connect`], but a store or bus that cannot be reached now does not stop the
    /// engine: it serves as it would through an outage at run time (each policy's
    /// [`OnStoreError`], followers polling) while the missing part is connected in the
    /// background. Settings that can never work are still an error.
    pub async fn start(config: EngineConfig, backend: &Backend) -> Result<Self, ConnectError> {
        Self::open(config, backend, Backends::InBackground).await
    }

    async fn open(
        config: EngineConfig,
        backend: &Backend,
        backends: Backends,
    ) -> Result<Self, ConnectError> {
        let metrics = Metrics::new();
        let flights = Arc::new(FlightTable::new());
        let l1 = L1::new(config.l1_max_bytes, metrics.clone());
        let generations = Arc::new(generations::Generations::new());
        let sink = Arc::new(dispatch::Dispatcher::new(
            flights.clone(),
            l1.clone(),
            metrics.clone(),
            generations.clone(),
        ));
        let (store, bus) = match backends {
            Backends::Required => backend.connect(&config.namespace, sink).await?,
            Backends::InBackground => connecting::start(backend, &config.namespace, sink).await?,
        };
        let guarded = Arc::new(GuardedStore::new(store, backend.breaker, metrics.clone()));
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                store: guarded.clone(),
                guarded,
                orphans: orphans::Orphans::default(),
                bus,
                l1,
                flights,
                metrics,
                next_caller: AtomicU64::new(1),
                closing: AtomicBool::new(false),
                crashed: AtomicBool::new(false),
                shutdown: tokio::sync::watch::channel(false).0,
                drivers: tokio::sync::Mutex::new(tokio::task::JoinSet::new()),
                too_large_logged: build::LoggedOnce::new(TOO_LARGE_LOGGED),
                generations,
                generations_followed: AtomicBool::new(false),
                background: std::sync::Mutex::new(tokio::task::JoinSet::new()),
                refreshing: refresh::Refreshing::default(),
                retrying_invalidations: std::sync::atomic::AtomicUsize::new(0),
            }),
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    pub fn l1(&self) -> &L1 {
        &self.inner.l1
    }

    /// Flights alive in this process.
    pub fn flights_inflight(&self) -> usize {
        self.inner.flights.len()
    }

    /// The value of `key`: from the L1, the store, another process's build, or `builder` run by
    /// exactly one caller across every engine sharing the store. Waits at most `timeout`.
    pub async fn fetch(
        &self,
        key: &KeyHash,
        policy: &Policy,
        builder: Builder,
        timeout: Duration,
    ) -> Result<Answer, EngineError> {
        self.resolve(key, policy, Some(builder), timeout).await
    }

    /// The value of `key` if one is stored or being built (waiting for that build), without ever
    /// building; [`EngineError::NotFound`] at once when there is neither.
    pub async fn read(
        &self,
        key: &KeyHash,
        policy: &Policy,
        timeout: Duration,
    ) -> Result<Answer, EngineError> {
        self.resolve(key, policy, None, timeout).await
    }

    async fn resolve(
        &self,
        key: &KeyHash,
        policy: &Policy,
        builder: Option<Builder>,
        timeout: Duration,
    ) -> Result<Answer, EngineError> {
        let inner = &self.inner;
        if inner.closing.load(Ordering::SeqCst) {
            return Err(EngineError::Closed);
        }
        if let Some((entry, left)) = inner.l1.get_with_ttl(key) {
            refresh::on_hit(&self.inner, key, &entry, left, policy, builder.as_ref());
            return Ok(Answer::shared(entry, Source::L1));
        }
        let started = Instant::now();
        let deadline = started + timeout;
        let caller = inner.next_caller.fetch_add(1, Ordering::Relaxed);
        let mode = if builder.is_some() {
            Mode::Build
        } else {
            Mode::Read
        };
        // A build caller that joined a read flight retries once that flight ends empty; bounded
        // by the deadline and by this count.
        for _ in 0..8 {
            let Some(ticket) = inner.flights.join(*key, mode, caller, policy.max_followers) else {
                let stale = inner.flights.get(key).and_then(|flight| flight.stale());
                return Err(EngineError::TooManyFollowers { stale });
            };
            // The creator owns the flight: a private answer's attachment comes to it alone.
            let mut handoff = None;
            if ticket.created {
                let (sender, receiver) = oneshot::channel();
                handoff = Some(receiver);
                self.spawn_driver(&ticket, policy.clone(), builder.clone(), sender)
                    .await;
            }
            let owner = ticket.flight.owner;
            let conclusion = self
                .wait(ticket, caller, started, deadline, &policy.label)
                .await?;
            match &*conclusion {
                Conclusion::Value { entry, source } => {
                    // Only the caller that started the flight saw its own build; everyone who
                    // joined it waited for someone else's.
                    let source = match source {
                        Source::Built if owner != caller => Source::Coalesced,
                        other => *other,
                    };
                    return Ok(Answer::shared(entry.clone(), source));
                }
                Conclusion::Failed(failure) => return Err(EngineError::Build(failure.clone())),
                Conclusion::Uncacheable {
                    owner,
                    entry: Some(entry),
                    reason,
                    ..
                } if *owner == caller => {
                    // The driver hands the attachment over before it publishes the conclusion.
                    let attachment = handoff.and_then(|mut receiver| receiver.try_recv().ok());
                    return Ok(Answer {
                        entry: entry.clone(),
                        source: AnswerSource::Own { reason: *reason },
                        attachment,
                    });
                }
                Conclusion::Uncacheable { .. } | Conclusion::Pass => {
                    let Some(builder) = &builder else {
                        return Err(EngineError::NotFound);
                    };
                    return self.build_own(builder, policy, deadline, timeout).await;
                }
                Conclusion::Empty | Conclusion::Unattended if builder.is_some() => continue,
                Conclusion::Empty | Conclusion::Unattended => return Err(EngineError::NotFound),
                Conclusion::StoreDown(error) => return Err(error.clone().into()),
                Conclusion::Closed => return Err(EngineError::Closed),
            }
        }
        Err(EngineError::Timeout(timeout))
    }

    async fn spawn_driver(
        &self,
        ticket: &Ticket,
        policy: Policy,
        builder: Option<Builder>,
        handoff: oneshot::Sender<Attachment>,
    ) {
        let inner = self.inner.clone();
        let flight = ticket.flight.clone();
        inner.metrics.flights_inflight.inc();
        let task = drive::drive(inner.clone(), flight, policy, builder, handoff);
        let mut drivers = self.inner.drivers.lock().await;
        // Reap finished drivers so the set holds only live ones.
        while drivers.try_join_next().is_some() {}
        drivers.spawn(task);
    }

    /// Waits for the flight's conclusion until the caller's deadline.
    async fn wait(
        &self,
        mut ticket: Ticket,
        caller: u64,
        started: Instant,
        deadline: Instant,
        route: &str,
    ) -> Result<Arc<Conclusion>, EngineError> {
        let metrics = &self.inner.metrics;
        let following = ticket.flight.owner != caller;
        if following {
            metrics.followers_waiting.inc();
        }
        let waited = tokio::time::timeout_at(
            deadline,
            ticket.receiver.wait_for(|conclusion| conclusion.is_some()),
        )
        .await;
        if following {
            metrics.followers_waiting.dec();
            metrics
                .follower_wait
                .with_label_values(&[route])
                .observe(started.elapsed().as_secs_f64());
        }
        match waited {
            Ok(Ok(conclusion)) => Ok(conclusion.clone().expect("waited for Some")),
            Ok(Err(_closed)) => Err(EngineError::Closed),
            Err(_elapsed) => {
                metrics.wait_timeouts.with_label_values(&[route]).inc();
                Err(EngineError::Timeout(deadline - started))
            }
        }
    }

    /// Runs the caller's own builder for a key that may not be shared; nothing is stored.
    async fn build_own(
        &self,
        builder: &Builder,
        policy: &Policy,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Answer, EngineError> {
        let limit = deadline.min(Instant::now() + policy.max_fetch);
        match tokio::time::timeout_at(limit, builder(BuildRole::Own)).await {
            Ok(Ok(Built::Shared(entry) | Built::Revalidated(entry))) => {
                self.inner.metrics.build("own");
                Ok(Answer {
                    entry: Arc::new(entry),
                    source: AnswerSource::Own { reason: None },
                    attachment: None,
                })
            }
            Ok(Ok(Built::Private(private))) => {
                self.inner.metrics.build("own");
                Ok(Answer {
                    entry: Arc::new(private.entry),
                    source: AnswerSource::Own {
                        reason: Some(private.reason),
                    },
                    attachment: private.attachment,
                })
            }
            Ok(Err(error)) => Err(EngineError::Build(Failure {
                message: error.message.into(),
                response: error.response.map(Arc::new),
                cause: FailureCause::Build,
            })),
            Err(_elapsed) => Err(EngineError::Timeout(timeout)),
        }
    }

    /// Read-only state of `key`; never takes a lease and never changes a TTL.
    pub async fn status(&self, key: &KeyHash) -> Result<KeyStatus, EngineError> {
        Ok(calls::store_call(&self.inner, "status", || self.inner.store.status(key)).await?)
    }

    /// Removes `key` everywhere: the store (stealing any lease, so a running build cannot commit),
    /// this process's L1 at once, and every other process's L1 through the bus.
    pub async fn delete(&self, key: &KeyHash) -> Result<bool, EngineError> {
        let inner = &self.inner;
        let event = Event::new(*key, EventKind::Deleted);
        // Flights first, then the L1: a flight about to keep a value it read before the delete
        // either sees the mark or puts its copy in before the L1 is emptied (see `calls::keep`).
        inner.flights.post(key, EventKind::Deleted, None);
        inner.l1.invalidate(key);
        let encoded = event.encode();
        let existed =
            calls::store_call(inner, "purge", || inner.store.purge(key, encoded.clone())).await?;
        if !inner.store.announces() {
            calls::announce(inner, key, encoded).await;
        }
        Ok(existed)
    }

    /// Stops taking calls, makes running builds abandon their leases, waits (up to `grace`) for
    /// every flight to end, and closes the bus.
    pub async fn close(&self, grace: Duration) {
        let inner = &self.inner;
        inner.closing.store(true, Ordering::SeqCst);
        inner.shutdown.send_replace(true);
        let mut drivers = std::mem::take(&mut *inner.drivers.lock().await);
        let mut background = std::mem::take(
            &mut *inner
                .background
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        let drained = tokio::time::timeout(grace, async {
            while drivers.join_next().await.is_some() {}
            while background.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            drivers.abort_all();
            background.abort_all();
        }
        inner.bus.close().await;
    }

    /// Refreshes the gauges that are read rather than counted (bus and store health, L1 size) and
    /// renders every metric in the Prometheus text format.
    pub async fn render_metrics(&self) -> String {
        let metrics = &self.inner.metrics;
        metrics
            .bus_connected
            .set(i64::from(self.inner.bus.connected()));
        let probe = KeyHash::from_bytes([0; 32]);
        let store_up = matches!(
            tokio::time::timeout(Duration::from_secs(1), self.inner.store.status(&probe)).await,
            Ok(Ok(_))
        );
        metrics.store_connected.set(i64::from(store_up));
        metrics
            .l1_bytes
            .set(i64::try_from(self.inner.l1.weighted_size()).unwrap_or(i64::MAX));
        metrics
            .l1_entries
            .set(i64::try_from(self.inner.l1.entry_count()).unwrap_or(i64::MAX));
        metrics.render()
    }

    /// The store and the bus as readiness sees them: the store is probed (a read through its
    /// circuit breaker, bounded by [`READINESS_PROBE`]; when the breaker is due a probe, this is
    /// it), the bus's subscription is looked at.
    pub async fn readiness(&self) -> Readiness {
        let probe = KeyHash::from_bytes([0; 32]);
        let store =
            match tokio::time::timeout(READINESS_PROBE, self.inner.store.status(&probe)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(error)) => Err(format!("the {} store: {error}", self.inner.store.kind())),
                Err(_) => Err(format!(
                    "the {} store did not answer",
                    self.inner.store.kind()
                )),
            };
        Readiness {
            store,
            store_kind: self.inner.store.kind(),
            breaker: self.inner.guarded.phase(),
            bus_connected: self.inner.bus.connected(),
            bus_kind: self.inner.bus.kind(),
        }
    }

    /// Whether this engine can serve: the bus is subscribed and the store answers.
    pub async fn ready(&self) -> Result<(), String> {
        if !self.inner.bus.connected() {
            return Err(format!(
                "the {} bus is not connected",
                self.inner.bus.kind()
            ));
        }
        let probe = KeyHash::from_bytes([0; 32]);
        match tokio::time::timeout(READINESS_PROBE, self.inner.store.status(&probe)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(format!("the {} store: {error}", self.inner.store.kind())),
            Err(_) => Err(format!(
                "the {} store did not answer",
                self.inner.store.kind()
            )),
        }
    }

    /// Fault injection (feature `test-util`): stops this engine as a crash would. Running builds
    /// and renewals stop, nothing is released, committed or announced; leases stay in the store
    /// until they expire.
    #[cfg(any(test, feature = "test-util"))]
    pub async fn crash(&self) {
        let inner = &self.inner;
        inner.crashed.store(true, Ordering::SeqCst);
        inner.closing.store(true, Ordering::SeqCst);
        inner.drivers.lock().await.abort_all();
        inner
            .background
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .abort_all();
        inner.bus.close().await;
    }

    /// Fault injection (feature `test-util`): drop the bus subscription as a network fault would.
    #[cfg(any(test, feature = "test-util"))]
    pub async fn sever_bus(&self) {
        self.inner.bus.sever().await;
    }
}

/// Milliseconds since the Unix epoch, by the wall clock (only for `stored_at`, shown as `Age`).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Stamps `entry` as answering `key`, stored now, and encodes it; `None` bytes when it cannot be
/// encoded (too large for the envelope), in which case it must not be shared.
pub(crate) fn seal(key: &KeyHash, mut entry: Entry) -> (Arc<Entry>, Option<Bytes>) {
    entry.key = *key;
    entry.stored_at_ms = unix_ms();
    let bytes = crate::envelope::encode(&entry).ok();
    (Arc::new(entry), bytes)
}
