//! Which store and bus an engine talks to, and connecting to them: both are up before the engine
//! exists, so no flight can ACQUIRE before its process listens. An error names the part that is
//! down (store or bus) and its server. [`super::Engine::start`] starts an engine without them and
//! connects in the background instead.
//!
//! A NATS KV store carries its own events (the bucket's stream), so its bus is the store's
//! consumer; a bus setting that says otherwise is refused rather than half-used.

use std::sync::Arc;
use std::time::Duration;

use crate::bus::memory::{MemoryBus, MemoryBusHub};
use crate::bus::{Bus, EventSink};
use crate::credentials::{Credentials, redact};
use crate::store::Store;
use crate::store::breaker::BreakerSettings;
use crate::store::memory::MemoryStore;
#[cfg(feature = "nats")]
use crate::store::nats_kv::NatsKvError;

/// Where values and leases live.
#[derive(Clone)]
pub enum StoreConfig {
    /// In this process; engines handed clones of one `MemoryStore` coalesce with each other.
    Memory(MemoryStore),
    Redis {
        url: String,
    },
    /// NATS JetStream KV (nats-server 2.11 or newer); its events come from the bucket's stream,
    /// so the bus is [`BusConfig::Store`] (or core NATS on this same URL, which means the same).
    Nats {
        url: String,
    },
}

/// Where events travel.
#[derive(Clone)]
pub enum BusConfig {
    /// In this process; engines handed clones of one hub hear each other.
    Memory(MemoryBusHub),
    /// Redis pub/sub. On the same server as a Redis store, the store's scripts publish the events
    /// themselves, in the same atomic step as the write.
    Redis { url: String },
    /// Core NATS, one wildcard subscription per process.
    Nats { url: String },
    /// The store's own events: with a NATS KV store, one consumer of the bucket's stream per
    /// process. Only a store that carries its events can be asked for this.
    Store,
}

/// A store and a bus, with the limits of the store's calls.
#[derive(Clone)]
pub struct Backend {
    pub store: StoreConfig,
    pub bus: BusConfig,
    /// How long connecting to the store may take before it is an error (at start, and for each
    /// reconnect). The bus keeps its own, longer defaults: it holds one subscription, not calls
    /// that requests wait on.
    pub connect_timeout: Duration,
    /// How long one store command may take before it is a timeout.
    pub response_timeout: Duration,
    /// When the store's circuit breaker opens, and for how long.
    pub breaker: BreakerSettings,
    /// The store's credentials and TLS beyond its URL (none by default).
    pub store_credentials: Credentials,
    /// The bus's credentials and TLS beyond its URL (none by default).
    pub bus_credentials: Credentials,
}

/// Default [`Backend::response_timeout`]: a store on the same network answers in well under a
/// millisecond, so a command that has had no answer in 50 ms is waiting on a store that is stopped,
/// cut off or stalled, and every request behind it would wait too. Deployments whose store is
/// farther away (or forks a very large dataset for snapshots) raise it with `store.timeout`.
pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_millis(50);

/// Default [`Backend::connect_timeout`]: a TCP connect and handshake on the same network take a
/// few milliseconds; a reconnect runs in the background, and calls meanwhile fail at once.
pub const DEFAULT_STORE_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Why an engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(
        "namespace {0:?} is invalid: use 1 to 64 letters, digits, '-' or '_' (it names Redis keys and NATS subjects)"
    )]
    InvalidNamespace(String),
    /// Two settings that cannot both hold; the message names both.
    #[error("{0}")]
    Contradiction(String),
    #[error("lease_ttl {lease_ttl:?} is below {min:?}, the shortest lease the {store} store keeps")]
    LeaseTtlTooShort {
        lease_ttl: Duration,
        min: Duration,
        store: &'static str,
    },
    /// `backend` names the store's kind and redacted URL, so an outage says which server is down.
    #[error("could not connect the store ({backend}): {error}")]
    Store {
        backend: String,
        error: crate::store::StoreError,
    },
    #[error("could not connect the bus ({backend}): {error}")]
    Bus {
        backend: String,
        error: crate::bus::BusError,
    },
    #[cfg(feature = "nats")]
    #[error("could not connect the store ({backend}): {error}")]
    NatsKv { backend: String, error: NatsKvError },
    /// The backend's feature (`redis`, `nats`) was left out of this build.
    #[error("this build of corral has no {0} backend (its cargo feature `{0}` is off)")]
    NotBuilt(&'static str),
}

impl Backend {
    /// A fresh in-process store and bus; clone the result to give several engines the same ones.
    pub fn memory() -> Self {
        Self::new(
            StoreConfig::Memory(MemoryStore::new()),
            BusConfig::Memory(MemoryBusHub::new()),
        )
    }

    /// Redis for both store and bus: one server, Sentinel or Cluster, by the URL's form
    /// (`redis://`, `redis+sentinel://`, `redis+cluster://`).
    pub fn redis(url: impl Into<String>) -> Self {
        let url = url.into();
        Self::new(
            StoreConfig::Redis { url: url.clone() },
            BusConfig::Redis { url },
        )
    }

    /// NATS JetStream KV for the store, and the bucket's stream for events: a NATS-only
    /// deployment (nats-server 2.11 or newer, with JetStream).
    pub fn nats_kv(url: impl Into<String>) -> Self {
        Self::new(StoreConfig::Nats { url: url.into() }, BusConfig::Store)
    }

    pub fn new(store: StoreConfig, bus: BusConfig) -> Self {
        Self {
            store,
            bus,
            connect_timeout: DEFAULT_STORE_CONNECT_TIMEOUT,
            response_timeout: DEFAULT_STORE_TIMEOUT,
            breaker: BreakerSettings::default(),
            store_credentials: Credentials::default(),
            bus_credentials: Credentials::default(),
        }
    }

    /// Whether the store publishes events itself (a Redis store with a bus on the same Redis).
    #[cfg(feature = "redis")]
    fn store_announces(&self) -> bool {
        matches!(
            (&self.store, &self.bus),
            (StoreConfig::Redis { url: store }, BusConfig::Redis { url: bus })
                if store == bus && self.store_credentials == self.bus_credentials
        )
    }

    /// Refuses a bus setting that contradicts the store: a NATS KV store's events come from its
    /// bucket, and only such a store has events of its own.
    pub fn check(&self) -> Result<(), ConnectError> {
        let bus = match &self.bus {
            BusConfig::Memory(_) => "bus: memory".to_owned(),
            BusConfig::Redis { url } => format!("bus: redis ({})", redact(url)),
            BusConfig::Nats { url } => format!("bus: nats ({})", redact(url)),
            BusConfig::Store => "bus: store".to_owned(),
        };
        match (&self.store, &self.bus) {
            (StoreConfig::Nats { .. }, BusConfig::Store) => Ok(()),
            (StoreConfig::Nats { url: store }, BusConfig::Nats { url: bus }) if store == bus => {
                Ok(())
            }
            (StoreConfig::Nats { url }, _) => Err(ConnectError::Contradiction(format!(
                "store: nats ({}) carries its own events on the bucket's stream, so {bus} \
                 contradicts it: leave the bus unset, or point it at the store's NATS URL",
                redact(url)
            ))),
            (_, BusConfig::Store) => Err(ConnectError::Contradiction(format!(
                "{bus} asks for the store's own events, but only store: nats has them: \
                 choose a bus (memory, redis or nats) or store: nats"
            ))),
            _ => Ok(()),
        }
    }

    /// Connects the store, then subscribes the bus (delivering to `sink`); a NATS KV store is
    /// connected first and then its consumer is made, which is its subscription.
    pub(crate) async fn connect(
        &self,
        namespace: &str,
        sink: Arc<dyn EventSink>,
    ) -> Result<(Arc<dyn Store>, Arc<dyn Bus>), ConnectError> {
        validate_namespace(namespace)?;
        self.check()?;
        if let StoreConfig::Nats { url } = &self.store {
            return self.nats_kv_store(url, namespace, sink).await;
        }
        // The store first, so that an outage of one server holding both is named as the store's;
        // no flight exists before both are up, so the bus subscribing second loses nothing.
        let store = self.connect_store(namespace).await?;
        let bus = self.connect_bus(namespace, sink).await?;
        Ok((store, bus))
    }

    /// Connects the store alone (not a NATS KV store, whose events come with it: see
    /// [`Backend::connect`]).
    pub(crate) async fn connect_store(
        &self,
        namespace: &str,
    ) -> Result<Arc<dyn Store>, ConnectError> {
        match &self.store {
            StoreConfig::Memory(store) => Ok(Arc::new(store.clone())),
            StoreConfig::Nats { .. } => unreachable!("a NATS KV store connects with its events"),
            StoreConfig::Redis { url } => self.redis_store(url, namespace).await,
        }
    }

    /// Subscribes the bus alone (not a NATS KV store's events).
    pub(crate) async fn connect_bus(
        &self,
        namespace: &str,
        sink: Arc<dyn EventSink>,
    ) -> Result<Arc<dyn Bus>, ConnectError> {
        match &self.bus {
            BusConfig::Memory(hub) => Ok(Arc::new(MemoryBus::connect(hub, sink))),
            BusConfig::Redis { url } => self.redis_bus(url, namespace, sink).await,
            BusConfig::Nats { url } => self.nats_bus(url, namespace, sink).await,
            BusConfig::Store => unreachable!("refused by check()"),
        }
    }

    /// The store as errors and logs name it: its kind and redacted URL.
    pub fn store_name(&self) -> String {
        match &self.store {
            StoreConfig::Memory(_) => "memory".to_owned(),
            StoreConfig::Redis { url } => format!("redis at {}", redact(url)),
            StoreConfig::Nats { url } => format!("nats_kv at {}", redact(url)),
        }
    }

    /// The bus as errors and logs name it.
    pub fn bus_name(&self) -> String {
        match (&self.store, &self.bus) {
            (StoreConfig::Nats { url }, _) => {
                format!("the nats_kv store's stream at {}", redact(url))
            }
            (_, BusConfig::Memory(_)) => "memory".to_owned(),
            (_, BusConfig::Redis { url }) => format!("redis pub/sub at {}", redact(url)),
            (_, BusConfig::Nats { url }) => format!("nats at {}", redact(url)),
            (_, BusConfig::Store) => "the store's events".to_owned(),
        }
    }
}

impl ConnectError {
    /// Whether the store or bus did not answer (down, cut off, not started yet): worth trying
    /// again in the background. A server that answered and refused corral (its credentials, its
    /// certificate, a server too old or without JetStream) is not: that needs an operator, and
    /// a replica that started anyway would look ready while it coalesces nothing. Nor are
    /// settings that can never work (a namespace, a contradiction, a backend left out of the
    /// build).
    pub fn is_unreachable(&self) -> bool {
        use crate::bus::BusError;
        use crate::store::StoreError;
        match self {
            ConnectError::Store { error, .. } => match error {
                StoreError::Unavailable(reason) | StoreError::Protocol(reason) => {
                    !refused_corral(reason)
                }
                StoreError::Timeout { .. } | StoreError::CircuitOpen { .. } => true,
            },
            ConnectError::Bus { error, .. } => match error {
                BusError::Unavailable(reason) => !refused_corral(reason),
                BusError::Timeout { .. } => true,
                BusError::InvalidNamespace(_) => false,
            },
            #[cfg(feature = "nats")]
            ConnectError::NatsKv { error, .. } => match error {
                NatsKvError::Connect { reason, .. }
                | NatsKvError::Bucket { reason, .. }
                | NatsKvError::Consumer { reason, .. } => !refused_corral(reason),
                NatsKvError::InvalidNamespace(_)
                | NatsKvError::ServerTooOld { .. }
                | NatsKvError::NoJetStream { .. } => false,
            },
            ConnectError::InvalidNamespace(_)
            | ConnectError::Contradiction(_)
            | ConnectError::LeaseTtlTooShort { .. }
            | ConnectError::NotBuilt(_) => false,
        }
    }
}

/// Whether a connect error's text is a server refusing corral's credentials or certificate: the
/// Redis replies (`WRONGPASS`, `NOAUTH`, `NOPERM`, and the store's own "redis refused corral"),
/// NATS's `authorization violation` and `authentication` errors, and TLS certificate failures.
/// The clients hand these over as text, so the words are what there is to go by.
fn refused_corral(reason: &str) -> bool {
    let reason = reason.to_ascii_lowercase();
    [
        "wrongpass",
        "noauth",
        "noperm",
        "refused corral",
        "authorization violation",
        "authentication",
        "certificate",
        "unknownissuer",
    ]
    .iter()
    .any(|word| reason.contains(word))
}

// ---------------------------------------------------------------------------------------------
// Each backend, or the error that says it was left out of this build

impl Backend {
    #[cfg_attr(not(any(feature = "redis", feature = "nats")), allow(dead_code))]
    fn bus_error(&self, error: crate::bus::BusError) -> ConnectError {
        ConnectError::Bus {
            backend: self.bus_name(),
            error,
        }
    }
}

#[cfg(feature = "redis")]
impl Backend {
    async fn redis_bus(
        &self,
        url: &str,
        namespace: &str,
        sink: Arc<dyn EventSink>,
    ) -> Result<Arc<dyn Bus>, ConnectError> {
        use crate::bus::redis::{RedisBus, RedisBusConfig};
        let mut config = RedisBusConfig::new(url, namespace);
        config.credentials = self.bus_credentials.clone();
        match RedisBus::connect(config, sink).await {
            Ok(bus) => Ok(Arc::new(bus)),
            Err(error) => Err(self.bus_error(error)),
        }
    }

    async fn redis_store(
        &self,
        url: &str,
        namespace: &str,
    ) -> Result<Arc<dyn Store>, ConnectError> {
        use crate::store::redis::{RedisStore, RedisStoreConfig};
        let mut config = RedisStoreConfig::new(url, namespace);
        config.connect_timeout = self.connect_timeout;
        config.response_timeout = self.response_timeout;
        config.announce = self.store_announces();
        config.credentials = self.store_credentials.clone();
        match RedisStore::connect(config).await {
            Ok(store) => Ok(Arc::new(store)),
            Err(error) => Err(ConnectError::Store {
                backend: self.store_name(),
                error,
            }),
        }
    }
}

#[cfg(not(feature = "redis"))]
impl Backend {
    async fn redis_bus(
        &self,
        _url: &str,
        _namespace: &str,
        _sink: Arc<dyn EventSink>,
    ) -> Result<Arc<dyn Bus>, ConnectError> {
        Err(ConnectError::NotBuilt("redis"))
    }

    async fn redis_store(
        &self,
        _url: &str,
        _namespace: &str,
    ) -> Result<Arc<dyn Store>, ConnectError> {
        Err(ConnectError::NotBuilt("redis"))
    }
}

#[cfg(feature = "nats")]
impl Backend {
    async fn nats_bus(
        &self,
        url: &str,
        namespace: &str,
        sink: Arc<dyn EventSink>,
    ) -> Result<Arc<dyn Bus>, ConnectError> {
        use crate::bus::nats::{NatsBus, NatsBusConfig};
        let mut config = NatsBusConfig::new(url, namespace);
        config.credentials = self.bus_credentials.clone();
        match NatsBus::connect(config, sink).await {
            Ok(bus) => Ok(Arc::new(bus)),
            Err(error) => Err(self.bus_error(error)),
        }
    }

    /// A NATS KV store, connected first; its consumer of the bucket's stream is its bus.
    async fn nats_kv_store(
        &self,
        url: &str,
        namespace: &str,
        sink: Arc<dyn EventSink>,
    ) -> Result<(Arc<dyn Store>, Arc<dyn Bus>), ConnectError> {
        use crate::store::nats_kv::{NatsKvConfig, NatsKvEvents, NatsKvStore};
        let mut config = NatsKvConfig::new(url, namespace);
        config.connect_timeout = self.connect_timeout;
        config.response_timeout = self.response_timeout;
        config.credentials = self.store_credentials.clone();
        let named = |error| ConnectError::NatsKv {
            backend: self.store_name(),
            error,
        };
        let store = NatsKvStore::connect(config).await.map_err(named)?;
        let events = NatsKvEvents::start(&store, sink).await.map_err(named)?;
        Ok((Arc::new(store), Arc::new(events)))
    }
}

#[cfg(not(feature = "nats"))]
impl Backend {
    async fn nats_bus(
        &self,
        _url: &str,
        _namespace: &str,
        _sink: Arc<dyn EventSink>,
    ) -> Result<Arc<dyn Bus>, ConnectError> {
        Err(ConnectError::NotBuilt("nats"))
    }

    async fn nats_kv_store(
        &self,
        _url: &str,
        _namespace: &str,
        _sink: Arc<dyn EventSink>,
    ) -> Result<(Arc<dyn Store>, Arc<dyn Bus>), ConnectError> {
        Err(ConnectError::NotBuilt("nats"))
    }
}

/// Namespaces name Redis keys and NATS subject tokens, so they are kept to a safe alphabet.
pub fn validate_namespace(namespace: &str) -> Result<(), ConnectError> {
    let ok = (1..=64).contains(&namespace.len())
        && namespace
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ConnectError::InvalidNamespace(namespace.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nats() -> StoreConfig {
        StoreConfig::Nats {
            url: "nats://user:secret@kv:4222".into(),
        }
    }

    #[test]
    fn a_nats_kv_store_takes_its_own_events_or_core_nats_on_the_same_url() {
        assert!(Backend::nats_kv("nats://kv:4222").check().is_ok());
        let same = BusConfig::Nats {
            url: "nats://user:secret@kv:4222".into(),
        };
        assert!(Backend::new(nats(), same).check().is_ok());
    }

    #[test]
    fn a_bus_that_contradicts_the_nats_kv_store_is_refused_naming_both() {
        let contradicting = [
            (
                BusConfig::Redis {
                    url: "redis://cache:6379/".into(),
                },
                "bus: redis (redis://cache:6379/)",
            ),
            (
                BusConfig::Nats {
                    url: "nats://other:4222".into(),
                },
                "bus: nats (nats://other:4222)",
            ),
            (BusConfig::Memory(MemoryBusHub::new()), "bus: memory"),
        ];
        for (bus, named) in contradicting {
            let error = Backend::new(nats(), bus).check().unwrap_err().to_string();
            assert!(
                error.contains("store: nats (nats://user:***@kv:4222)"),
                "{error}"
            );
            assert!(error.contains(named), "{error}");
            assert!(!error.contains("secret"), "{error}");
        }
    }

    #[test]
    fn a_server_that_did_not_answer_is_retried_one_that_refused_corral_is_not() {
        use crate::bus::BusError;
        use crate::store::StoreError;
        let store = |reason: &str| ConnectError::Store {
            backend: "redis at redis://r:6379/".into(),
            error: StoreError::Unavailable(reason.into()),
        };
        let bus = |error| ConnectError::Bus {
            backend: "nats at nats://n:4222".into(),
            error,
        };
        assert!(store("redis at 127.0.0.1:1: Connection refused (os error 111)").is_unreachable());
        assert!(bus(BusError::Timeout { op: "connect" }).is_unreachable());
        for refused in [
            "WRONGPASS invalid username-password pair or user is disabled.",
            "redis refused corral: NOAUTH Authentication required.",
            "invalid peer certificate: UnknownIssuer",
        ] {
            assert!(!store(refused).is_unreachable(), "{refused}");
        }
        let violation = BusError::Unavailable("nats connect: authorization violation".into());
        assert!(!bus(violation).is_unreachable());
        assert!(!bus(BusError::InvalidNamespace("a.b".into())).is_unreachable());
        assert!(!ConnectError::Contradiction("x".into()).is_unreachable());
    }

    #[test]
    fn only_a_store_with_its_own_events_can_be_asked_for_them() {
        let memory = StoreConfig::Memory(MemoryStore::new());
        let error = Backend::new(memory, BusConfig::Store)
            .check()
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("bus: store") && error.contains("store: nats"),
            "{error}"
        );
        assert!(Backend::memory().check().is_ok());
        assert!(Backend::redis("redis://r:6379/").check().is_ok());
    }
}
