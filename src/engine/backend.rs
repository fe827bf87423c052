//! Which store and bus an engine talks to, and connecting to them in the right order: the bus
//! subscription first, so that no flight can ACQUIRE before its process listens.

use std::sync::Arc;
use std::time::Duration;

use crate::bus::memory::{MemoryBus, MemoryBusHub};
use crate::bus::nats::{NatsBus, NatsBusConfig};
use crate::bus::redis::{RedisBus, RedisBusConfig};
use crate::bus::{Bus, EventSink};
use crate::store::Store;
use crate::store::memory::MemoryStore;
use crate::store::redis::{RedisStore, RedisStoreConfig};

/// Where values and leases live.
#[derive(Clone)]
pub enum StoreConfig {
    /// In this process; engines handed clones of one `MemoryStore` coalesce with each other.
    Memory(MemoryStore),
    Redis {
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
}

/// A store and a bus, with the timeouts used to reach them.
#[derive(Clone)]
pub struct Backend {
    pub store: StoreConfig,
    pub bus: BusConfig,
    /// How long connecting may take before it is an error.
    pub connect_timeout: Duration,
    /// How long one store call may take before it is a timeout.
    pub response_timeout: Duration,
}

/// Why an engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(
        "namespace {0:?} is invalid: use 1 to 64 letters, digits, '-' or '_' (it names Redis keys and NATS subjects)"
    )]
    InvalidNamespace(String),
    #[error("could not connect the store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("could not connect the bus: {0}")]
    Bus(#[from] crate::bus::BusError),
}

impl Backend {
    /// A fresh in-process store and bus; clone the result to give several engines the same ones.
    pub fn memory() -> Self {
        Self::new(
            StoreConfig::Memory(MemoryStore::new()),
            BusConfig::Memory(MemoryBusHub::new()),
        )
    }

    /// Redis for both store and bus.
    pub fn redis(url: impl Into<String>) -> Self {
        let url = url.into();
        Self::new(
            StoreConfig::Redis { url: url.clone() },
            BusConfig::Redis { url },
        )
    }

    pub fn new(store: StoreConfig, bus: BusConfig) -> Self {
        Self {
            store,
            bus,
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(1),
        }
    }

    /// Whether the store publishes events itself (a Redis store with a bus on the same Redis).
    fn store_announces(&self) -> bool {
        matches!(
            (&self.store, &self.bus),
            (StoreConfig::Redis { url: store }, BusConfig::Redis { url: bus }) if store == bus
        )
    }

    /// Subscribes the bus (delivering to `sink`), then connects the store.
    pub(crate) async fn connect(
        &self,
        namespace: &str,
        sink: Arc<dyn EventSink>,
    ) -> Result<(Arc<dyn Store>, Arc<dyn Bus>), ConnectError> {
        validate_namespace(namespace)?;
        let bus: Arc<dyn Bus> = match &self.bus {
            BusConfig::Memory(hub) => Arc::new(MemoryBus::connect(hub, sink)),
            BusConfig::Redis { url } => {
                let mut config = RedisBusConfig::new(url, namespace);
                config.connect_timeout = self.connect_timeout;
                config.response_timeout = self.response_timeout;
                Arc::new(RedisBus::connect(config, sink).await?)
            }
            BusConfig::Nats { url } => {
                let mut config = NatsBusConfig::new(url, namespace);
                config.connect_timeout = self.connect_timeout;
                Arc::new(NatsBus::connect(config, sink).await?)
            }
        };
        let store: Arc<dyn Store> = match &self.store {
            StoreConfig::Memory(store) => Arc::new(store.clone()),
            StoreConfig::Redis { url } => {
                let mut config = RedisStoreConfig::new(url, namespace);
                config.connect_timeout = self.connect_timeout;
                config.response_timeout = self.response_timeout;
                config.announce = self.store_announces();
                match RedisStore::connect(config).await {
                    Ok(store) => Arc::new(store),
                    Err(error) => {
                        bus.close().await;
                        return Err(error.into());
                    }
                }
            }
        };
        Ok((store, bus))
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
