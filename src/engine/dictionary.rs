//! The typed "build once, read many" dictionary: the Rust face of the library corral grew from.
//!
//! Keys and values go through serde (values as JSON in the entry body). Every operation is
//! coalesced across all dictionaries of the same name on the same store: one build per key in the
//! whole deployment, everyone else waits for its event.
//!
//! ```
//! use std::time::Duration;
//! use corral::engine::{Backend, Dictionary, DictionaryConfig, Expiry, Status};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> anyhow::Result<()> {
//! let backend = Backend::memory();
//! let config = DictionaryConfig::new("reports", Expiry::Absolute(Duration::from_secs(60)));
//! let reports: Dictionary<String, u64> = Dictionary::open(config, &backend).await?;
//!
//! let key = "2024-q1".to_string();
//! let total = reports
//!     .build_or_retrieve(&key, || async { Ok::<_, String>(42) }, Duration::from_secs(2))
//!     .await?;
//! assert_eq!(total, 42);
//! assert_eq!(reports.status(&key).await?, Status::Exists);
//! reports.close().await;
//! # Ok(())
//! # }
//! ```

use std::fmt::Display;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{
    Backend, BuildError, Built, ConnectError, Engine, EngineConfig, EngineError, ExpiryMode, Policy,
};
use crate::envelope::{Entry, Form};
use crate::key::{KeyBuilder, KeyHash};
use crate::store::{KeyStatus, StoreError};

/// How long a built value lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// Gone this long after it was built, however often it is read.
    Absolute(Duration),
    /// Gone this long after it was last read.
    Sliding(Duration),
}

impl Expiry {
    fn duration(self) -> Duration {
        match self {
            Expiry::Absolute(d) | Expiry::Sliding(d) => d,
        }
    }
}

/// Settings of one dictionary.
#[derive(Clone, Debug)]
pub struct DictionaryConfig {
    /// The dictionary's name: dictionaries with the same name on the same store share their values.
    pub name: String,
    pub expiry: Expiry,
    /// L1 size in bytes; 0 turns it off.
    pub l1_max_bytes: u64,
    /// How long a dead builder can hold up everyone else.
    pub lease_ttl: Duration,
    /// A build running longer than this is abandoned and another caller builds.
    pub max_fetch: Duration,
    /// Waiters re-check the store at least this often, in case an event was lost.
    pub poll_interval: Duration,
}

impl DictionaryConfig {
    pub fn new(name: impl Into<String>, expiry: Expiry) -> Self {
        let defaults = Policy::default();
        Self {
            name: name.into(),
            expiry,
            l1_max_bytes: 64 * 1024 * 1024,
            lease_ttl: defaults.lease_ttl,
            max_fetch: defaults.max_fetch,
            poll_interval: defaults.poll_interval,
        }
    }
}

/// What is known of a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Empty,
    /// Someone is building it.
    Pending,
    Exists,
}

/// Why a dictionary call gave no value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DictionaryError {
    #[error("key {key} does not exist in cache {cache}")]
    DoesNotExist { key: String, cache: String },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The build failed; the message is the build's own error, exactly.
    #[error("{0}")]
    Build(String),
    #[error("could not encode or decode a value or key: {0}")]
    Codec(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the dictionary is closed")]
    Closed,
}

/// A typed dictionary over an engine.
pub struct Dictionary<K, V> {
    engine: Engine,
    config: DictionaryConfig,
    policy: Policy,
    _types: PhantomData<fn(&K) -> V>,
}

impl<K, V> Clone for Dictionary<K, V> {
    fn clone(&self) -> Self {
        Self {
            engine: self.engine.clone(),
            config: self.config.clone(),
            policy: self.policy.clone(),
            _types: PhantomData,
        }
    }
}

impl<K, V> Dictionary<K, V>
where
    K: Serialize,
    V: Serialize + DeserializeOwned + Send + 'static,
{
    /// Opens the dictionary `config.name` on `backend` (its own engine and connections). A
    /// `lease_ttl` below what the store can keep ([`crate::store::Store::min_lease_ttl`]) is
    /// refused.
    pub async fn open(config: DictionaryConfig, backend: &Backend) -> Result<Self, ConnectError> {
        let mut engine_config = EngineConfig::new(config.name.clone());
        engine_config.l1_max_bytes = config.l1_max_bytes;
        let engine = Engine::connect(engine_config, backend).await?;
        let min = engine.store().min_lease_ttl();
        if config.lease_ttl < min {
            let store = engine.store().kind();
            engine.close(Duration::ZERO).await;
            return Err(ConnectError::LeaseTtlTooShort {
                lease_ttl: config.lease_ttl,
                min,
                store,
            });
        }
        let policy = Policy {
            expiry: match config.expiry {
                Expiry::Absolute(_) => ExpiryMode::Absolute,
                Expiry::Sliding(window) => ExpiryMode::Sliding { window },
            },
            lease_ttl: config.lease_ttl,
            max_fetch: config.max_fetch,
            poll_interval: config.poll_interval,
            label: config.name.as_str().into(),
            // A dictionary's builders cannot ask whether a value changed: nothing to keep for.
            revalidate_keep: Duration::ZERO,
            ..Policy::default()
        };
        Ok(Self {
            engine,
            config,
            policy,
            _types: PhantomData,
        })
    }

    /// The engine underneath (metrics, fault injection).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The digest a key is stored under.
    pub fn key_hash(&self, key: &K) -> Result<KeyHash, DictionaryError> {
        let json = serde_json::to_vec(key).map_err(|e| DictionaryError::Codec(e.to_string()))?;
        Ok(KeyBuilder::new()
            .part("dictionary")
            .part(&self.config.name)
            .part(json)
            .finish()
            .hash)
    }

    /// The value of `key`: stored, being built somewhere (waits for it), or built by `build` here,
    /// by exactly one caller across every process sharing the store. Waits at most `timeout`; the
    /// build itself goes on (and is stored) when a caller stops waiting.
    pub async fn build_or_retrieve<F, Fut, E>(
        &self,
        key: &K,
        build: F,
        timeout: Duration,
    ) -> Result<V, DictionaryError>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
        E: Display,
    {
        let hash = self.key_hash(key)?;
        let ttl = self.config.expiry.duration();
        let build = Arc::new(build);
        let builder: super::Builder = Arc::new(move |_role| {
            let run = build();
            Box::pin(async move {
                let value = run.await.map_err(|e| BuildError::new(e.to_string()))?;
                let body =
                    serde_json::to_vec(&value).map_err(|e| BuildError::new(e.to_string()))?;
                Ok(Built::Shared(Entry {
                    status: 0,
                    headers: Vec::new(),
                    body: Bytes::from(body),
                    stored_at_ms: 0,
                    ttl,
                    stale: Duration::ZERO,
                    stale_if_error: Duration::ZERO,
                    fetch_time: Duration::ZERO,
                    key: KeyHash::from_bytes([0; 32]),
                    form: Form::Answer,
                }))
            })
        });
        let answer = self
            .engine
            .fetch(&hash, &self.policy, builder, timeout)
            .await
            .map_err(|e| self.error(key, e))?;
        decode_value(&answer.entry.body)
    }

    /// Like [`Dictionary::build_or_retrieve`], spawned: `callback` gets the result.
    pub fn build_or_retrieve_then<F, Fut, E, C>(
        &self,
        key: K,
        build: F,
        timeout: Duration,
        callback: C,
    ) -> tokio::task::JoinHandle<()>
    where
        K: Send + Sync + 'static,
        V: Sync,
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
        E: Display,
        C: FnOnce(Result<V, DictionaryError>) + Send + 'static,
    {
        let this = self.clone();
        tokio::spawn(async move {
            let result = this.build_or_retrieve(&key, build, timeout).await;
            callback(result);
        })
    }

    /// The stored value of `key`, waiting (at most `timeout`) for a build in progress; an error at
    /// once when nothing is stored or pending.
    pub async fn get(&self, key: &K, timeout: Duration) -> Result<V, DictionaryError> {
        let hash = self.key_hash(key)?;
        let answer = self
            .engine
            .read(&hash, &self.policy, timeout)
            .await
            .map_err(|e| self.error(key, e))?;
        decode_value(&answer.entry.body)
    }

    /// Empty, Pending or Exists; never builds, never waits, never changes a TTL.
    pub async fn status(&self, key: &K) -> Result<Status, DictionaryError> {
        let hash = self.key_hash(key)?;
        let status = self
            .engine
            .status(&hash)
            .await
            .map_err(|e| self.error(key, e))?;
        Ok(match status {
            KeyStatus::Exists { .. } => Status::Exists,
            KeyStatus::Pending { .. } => Status::Pending,
            KeyStatus::Pass { .. } | KeyStatus::Empty => Status::Empty,
        })
    }

    /// Removes `key` on every process; a build in progress will not store its result.
    pub async fn delete(&self, key: &K) -> Result<(), DictionaryError> {
        let hash = self.key_hash(key)?;
        self.engine
            .delete(&hash)
            .await
            .map_err(|e| self.error(key, e))?;
        Ok(())
    }

    /// Stops: running builds abandon their leases, the bus is closed.
    pub async fn close(&self) {
        self.engine.close(Duration::from_secs(5)).await;
    }

    fn error(&self, key: &K, error: EngineError) -> DictionaryError {
        match error {
            EngineError::Timeout(after) => DictionaryError::Timeout(after),
            EngineError::Build(failure) => DictionaryError::Build(failure.message.to_string()),
            EngineError::NotFound => DictionaryError::DoesNotExist {
                key: display_key(key),
                cache: self.config.name.clone(),
            },
            EngineError::Store(error) => DictionaryError::Store(error),
            EngineError::Closed => DictionaryError::Closed,
            // A dictionary sets no follower limit, so this does not happen; if it did, the caller
            // got no value in the time it had.
            EngineError::TooManyFollowers { .. } => DictionaryError::Timeout(Duration::ZERO),
        }
    }
}

fn decode_value<V: DeserializeOwned>(body: &[u8]) -> Result<V, DictionaryError> {
    serde_json::from_slice(body).map_err(|e| DictionaryError::Codec(e.to_string()))
}

/// A string key shows as itself, anything else as its JSON.
fn display_key<K: Serialize>(key: &K) -> String {
    match serde_json::to_value(key) {
        Ok(serde_json::Value::String(text)) => text,
        Ok(other) => other.to_string(),
        Err(_) => "<unserializable>".to_owned(),
    }
}
