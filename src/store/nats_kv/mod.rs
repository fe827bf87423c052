//! The NATS JetStream KV store (docs/design.md, "Store protocol: NATS JetStream KV"): leases and values
//! by revision compare-and-set, per-key TTL on the server, events from the stream itself.
//!
//! # Layout
//!
//! One bucket per namespace, `corral_<namespace>` (stream `KV_corral_<namespace>`), created
//! idempotently by whichever replica starts first, with per-message TTL allowed, limit markers on,
//! history 1, file storage and no `max_bytes` (a full bucket would refuse every write). Each cache
//! key owns one entry, `e.<hex digest>`, that moves between lease, value, pass and released states
//! (see `entry.rs` for the headers of each); a sliding value also owns a touch record `t.<hex>`.
//!
//! # Protocol
//!
//! Every step is a read of the entry's last message (a direct get) and at most one publish that
//! names the revision it read as `Nats-Expected-Last-Subject-Sequence`, so a stale revision never
//! wins: a commit whose lease was purged, expired or taken over is rejected by the server, not by a
//! check that could race. "Create" is a compare-and-set against revision 0, or against the
//! tombstone or marker left by a delete, purge or expiry.
//!
//! The writer's token rides in every write of a lease holder. A call that timed out on the client
//! may still have been applied, so its retry reads the entry first: a lease (ACQUIRE, RENEW) or a
//! value, pass marker or tombstone (COMMIT, GIVEUP, RELEASE) that already carries its token is its
//! own write, and counts as done. Within one call, a publish that timed out is followed by such a
//! read; across calls, the engine retries ACQUIRE and RENEW with the same token.
//!
//! # Time
//!
//! The server removes leases, values and pass markers on its own through the per-message TTL
//! (`Nats-TTL`, whole seconds, rounded up), and places a delete marker that wakes every process's
//! consumer. Leases live exactly as long as the server keeps them: a follower waits for the marker
//! (or, should it be lost, for the time the server will surely have removed it). Values and pass
//! markers are fresh for their exact lifetime (`Corral-Ttl-Ms`) counted from the server's timestamp
//! of the entry, never from the writer's clock; only the reader's own clock is compared with it, so
//! replicas need clocks that agree with the server's (NTP), as any TTL cache does.
//!
//! A value with a stale window carries its freshness (`Corral-Fresh-Ms`); past it, the lease to
//! refresh it cannot be the entry itself (that would replace the value readers are still served),
//! so it rides on the value: the value is published again with the holder's token and the lease's
//! lifetime, keeping its first timestamp (see `entry.rs`). Renewal publishes it again; a commit
//! replaces it by the same compare-and-set as any commit; a failed or abandoned refresh puts the
//! value back without the lease, marked so that waiters hear how it ended. Such a lease has no
//! server TTL of its own: readers see it lapse by its timestamp. Early refresh takes the same kind
//! of lease over a value that is still fresh.
//!
//! Whether a lease has lapsed is one rule (`lease::lapse`), for readers and for its holder alike: a
//! lease that status and acquire no longer report held is lost to its holder's renew, commit,
//! release and give up, even while its message is still there for a compare-and-set to name (a
//! refresh lease past its lifetime, a stuck lease the server did not remove). Likewise purge and
//! discard count a value or pass marker past its lifetime as absent, as status does.
//!
//! Sliding expiry never rewrites the value: a read that finds less than `ttl - slack` left writes a
//! touch record (a small headers-only message on `t.<hex>`, with the value's revision and a server
//! TTL of the window). A headers-only re-publish of the entry itself is not possible: with history
//! 1, any new message on `e.<hex>` replaces the value. A sliding value has no server TTL of its
//! own; when its touch record lapses, the server's marker makes the consumers sweep the value if it
//! has not been read since (and any read finds it stale anyway).
//!
//! # Events
//!
//! [`NatsKvEvents`] is the companion [`crate::bus::Bus`]: one headers-only consumer per process
//! over the whole bucket. The stream message is the event, so commit and event are one step, and
//! the server's delete marker for an expired lease wakes followers at once. The store therefore
//! [`Store::announces`], and the events never publish.
//!
//! Values larger than the server's `max_payload` cannot be stored: [`Store::max_value_len`] says so
//! and the engine handles them as uncacheable.

mod bucket;
mod entry;
mod events;
mod lease;
mod purge;
mod store;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{DirectGetErrorKind, Stream};
use async_nats::{Client, ConnectOptions};

use crate::credentials::{Credentials, redact};
use bytes::Bytes;
use tokio::sync::mpsc;

pub use self::bucket::{MIN_SERVER_VERSION, bucket_name, check_server_version};
use self::entry::{Record, Slot};
pub use self::events::NatsKvEvents;
use self::lease::{millis, publish_error, tombstone};
use super::{
    Acquired, Fenced, IndexEntry, KeyStatus, LeaseRequest, Refresh, Renewed, Selector, Store,
    StoreError, Token, Touch,
};
use crate::bus::{Event, EventKind};
use crate::key::KeyHash;

/// The shortest lease TTL: the server counts TTLs in whole seconds, and one is its minimum.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(1);

/// How long delete markers (the server's, for an expired entry) and tombstones (ours, for a
/// release, discard or purge) stay in the bucket: long enough for every consumer to see them, short
/// enough that a bucket of churning keys does not fill with them.
const TOMBSTONE_TTL: Duration = Duration::from_secs(5);

/// The server expires TTLs on a 250 ms tick, so a lease is gone up to that long after its TTL,
/// and the marker wakes followers then; a follower that heard no marker re-checks on its own this
/// long after the TTL (twice the tick, so that the marker normally comes first).
const EXPIRY_SLACK: Duration = Duration::from_millis(500);

/// A lease still present this long past its server TTL is taken to be stuck (the server did not
/// expire it) and may be replaced by compare-and-set. Large, so that a reader's clock running ahead
/// of the server's never takes a live lease.
const STUCK_LEASE: Duration = Duration::from_secs(5);

/// Room left in `max_payload` for the headers of a value message.
const HEADER_ROOM: usize = 1024;

/// Read-then-publish rounds one call makes before giving up on a key that keeps changing under it
/// (each lost round means another writer won, so this is only reached under pathological churn).
const CAS_ROUNDS: usize = 4;

/// Leases this process remembers the revision of; past this the memory starts over (a forgotten
/// revision costs one read on the next renewal or commit, nothing else).
const HELD_CAPACITY: usize = 65_536;

/// Longest pause between the client's attempts to reconnect.
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);

/// How the store reaches NATS and which namespace it keeps.
#[derive(Clone)]
pub struct NatsKvConfig {
    /// `nats://[user:password@]host:port` (or several, comma-separated); credentials in it are
    /// never logged or put into an error.
    pub url: String,
    /// Names the bucket, `corral_<namespace>`: letters, digits, `-` and `_`.
    pub namespace: String,
    /// Longest wait for connecting and for creating the bucket at start (default 2 s).
    pub connect_timeout: Duration,
    /// Longest wait for one request's answer (default 1 s); past it a call answers
    /// [`StoreError::Timeout`].
    pub response_timeout: Duration,
    /// Credentials and TLS beyond what the url carries.
    pub credentials: Credentials,
}

impl NatsKvConfig {
    /// Default [`NatsKvConfig::connect_timeout`].
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
    /// Default [`NatsKvConfig::response_timeout`].
    pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

    pub fn new(url: impl Into<String>, namespace: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            namespace: namespace.into(),
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            response_timeout: Self::DEFAULT_RESPONSE_TIMEOUT,
            credentials: Credentials::default(),
        }
    }
}

// Written by hand so that a password in the url never reaches a log line.
impl fmt::Debug for NatsKvConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsKvConfig")
            .field("url", &redact(&self.url))
            .field("namespace", &self.namespace)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("credentials", &self.credentials)
            .finish()
    }
}

/// Why the store (or its events) could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NatsKvError {
    #[error(
        "namespace {0:?} cannot name a NATS KV bucket: use 1 to 64 letters, digits, '-' or '_'"
    )]
    InvalidNamespace(String),
    #[error(
        "nats-server {found} at {url} is too old for the NATS KV store: it needs nats-server {}.{}.{} or newer (per-message TTL and delete markers)",
        MIN_SERVER_VERSION.0, MIN_SERVER_VERSION.1, MIN_SERVER_VERSION.2
    )]
    ServerTooOld { found: String, url: String },
    #[error("nats-server at {url} runs without JetStream, which the NATS KV store needs")]
    NoJetStream { url: String },
    #[error("could not connect to nats at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("NATS KV bucket {bucket}: {reason}")]
    Bucket { bucket: String, reason: String },
    #[error("could not start the event consumer on NATS KV bucket {bucket}: {reason}")]
    Consumer { bucket: String, reason: String },
}

/// A lease this process holds: the revision its next write must name.
#[derive(Clone, Debug)]
struct Held {
    token: Token,
    /// Revision of the lease's last write (creation or renewal).
    revision: u64,
    /// The revision it was created with.
    fence: u64,
    /// This process's node name, written again with each renewal.
    node: Option<Arc<str>>,
    /// Whether the lease rides on a value (a refresh), rather than being the entry itself.
    over_value: bool,
    /// When the lease lapses by the rule reads follow (see `lease::lapse`), in server ns: for a
    /// lease this process wrote, counted from before its publish, so never later than the truth.
    /// Past it the revision above is not used: the next write reads the entry and applies the rule
    /// itself, as the server does not reject a write to a lease that lapsed but is still there.
    lapses_ns: i128,
}

impl Held {
    /// Whether the remembered revision may be written to without a read.
    fn live(&self) -> bool {
        entry::now_ns() < self.lapses_ns
    }
}

/// State shared by clones of the store and by its events.
struct Shared {
    /// The one connection of this store and its events.
    client: Client,
    /// JetStream with every request bounded by the response timeout.
    js: jetstream::Context,
    /// The bucket's stream, for direct gets.
    stream: Stream,
    /// `KV_<bucket>`, the stream's name, for consumers.
    stream_name: String,
    /// `corral_<namespace>`.
    bucket: String,
    /// `$KV.<bucket>.`: every entry's subject starts with it.
    prefix: String,
    /// The URL with credentials removed, for logs.
    url: String,
    /// See [`NatsKvConfig::connect_timeout`]; also bounds consumer (re)creation.
    connect_timeout: Duration,
    /// See [`NatsKvConfig::response_timeout`].
    response_timeout: Duration,
    /// Bytes of envelope a value message can carry: the server's `max_payload` less
    /// [`HEADER_ROOM`].
    max_value_len: usize,
    /// Revisions of the leases this process holds, by key, so a renewal or commit is one publish.
    held: Mutex<HashMap<KeyHash, Held>>,
    /// The client's connection events, until [`NatsKvEvents`] takes them to follow reconnects.
    connection_events: Mutex<Option<mpsc::UnboundedReceiver<async_nats::Event>>>,
}

/// The shared store on NATS JetStream KV; clones share one connection.
#[derive(Clone)]
pub struct NatsKvStore {
    shared: Arc<Shared>,
}

impl fmt::Debug for NatsKvStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsKvStore")
            .field("url", &self.shared.url)
            .field("bucket", &self.shared.bucket)
            .finish_non_exhaustive()
    }
}

/// A publish that lost its compare-and-set: the entry is no longer at the revision it named.
struct Conflict;

/// What a fenced write found.
enum Outcome {
    /// Written (or found already written by an earlier try), at this revision.
    Done(u64),
    Lost,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl NatsKvStore {
    /// Connects (bounded by `connect_timeout`), refuses a server older than
    /// [`MIN_SERVER_VERSION`] or without JetStream, and opens the namespace's bucket, creating it if
    /// no replica has yet.
    pub async fn connect(config: NatsKvConfig) -> Result<NatsKvStore, NatsKvError> {
        let bucket = bucket_name(&config.namespace)?;
        let url = redact(&config.url);
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let options = ConnectOptions::new()
            .connection_timeout(config.connect_timeout)
            .request_timeout(Some(config.response_timeout))
            .reconnect_delay_callback(|attempts| {
                let exponent = u32::try_from(attempts).unwrap_or(u32::MAX).min(16);
                Duration::from_millis(2u64.pow(exponent)).min(RECONNECT_MAX_DELAY)
            })
            .event_callback(move |event| {
                let events_tx = events_tx.clone();
                async move {
                    let _ = events_tx.send(event);
                }
            });
        let connect_error = |reason: String| NatsKvError::Connect {
            url: url.clone(),
            reason,
        };
        let options = crate::credentials::nats::apply(options, &config.credentials)
            .await
            .map_err(connect_error)?;
        let client = tokio::time::timeout(
            config.connect_timeout * 2,
            options.connect(config.url.as_str()),
        )
        .await
        .map_err(|_| connect_error(format!("no connection within {:?}", config.connect_timeout)))?
        .map_err(|e| connect_error(e.to_string()))?;

        let info = client.server_info();
        check_server_version(&info.version, &url)?;
        if !info.jetstream {
            return Err(NatsKvError::NoJetStream { url });
        }
        let max_value_len = info.max_payload.saturating_sub(HEADER_ROOM);

        let js = jetstream::ContextBuilder::new()
            .timeout(config.response_timeout)
            .build(client.clone());
        let stream = bucket::open(&js, &bucket, &config.namespace, config.connect_timeout).await?;
        tracing::debug!(%url, %bucket, version = %info.version, "nats kv store connected");
        Ok(NatsKvStore {
            shared: Arc::new(Shared {
                client,
                js,
                stream,
                prefix: format!("$KV.{bucket}."),
                stream_name: format!("KV_{bucket}"),
                bucket,
                url,
                connect_timeout: config.connect_timeout,
                response_timeout: config.response_timeout,
                max_value_len,
                held: Mutex::new(HashMap::new()),
                connection_events: Mutex::new(Some(events_rx)),
            }),
        })
    }

    /// The bucket's name, `corral_<namespace>`.
    pub fn bucket(&self) -> &str {
        &self.shared.bucket
    }

    /// The subject of a key's entry.
    pub fn entry_subject(&self, key: &KeyHash) -> String {
        format!("{}e.{}", self.shared.prefix, key.to_hex())
    }

    fn touch_subject(&self, key: &KeyHash) -> String {
        format!("{}t.{}", self.shared.prefix, key.to_hex())
    }

    /// The stored value bytes of a key, fresh or not, if its entry holds a value (for tests and
    /// status pages).
    pub async fn raw(&self, key: &KeyHash) -> Result<Option<Bytes>, StoreError> {
        let slot = self.bounded("raw", self.read("raw", key)).await?;
        Ok(match slot.record {
            Record::Value { value, .. } => Some(value),
            _ => None,
        })
    }

    /// The remaining lifetime of a key's value, if it holds a fresh one (for tests and status
    /// pages); never touches it.
    pub async fn value_ttl(&self, key: &KeyHash) -> Result<Option<Duration>, StoreError> {
        Ok(match self.status(key).await? {
            KeyStatus::Exists { ttl_left } => Some(ttl_left),
            _ => None,
        })
    }

    /// Stores raw bytes as a key's value for `ttl`, over whatever is there, as a foreign or broken
    /// writer could (for tests of corrupt entries).
    pub async fn put_raw(
        &self,
        key: &KeyHash,
        value: Bytes,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let message = PublishMessage::build()
            .header(entry::STATE, "value")
            .header(entry::TTL_MS, millis(ttl).to_string())
            .header(entry::NATS_TTL, entry::ttl_header(ttl))
            .payload(value);
        self.bounded(
            "put_raw",
            self.publish("put_raw", self.entry_subject(key), message),
        )
        .await?
        .map(|_| ())
        .map_err(|Conflict| StoreError::Protocol("put_raw: unexpected conflict".into()))
    }

    /// Takes the client's connection events (once), for the consumer that follows reconnects.
    fn take_connection_events(&self) -> Option<mpsc::UnboundedReceiver<async_nats::Event>> {
        lock(&self.shared.connection_events).take()
    }

    /// Bounds one whole call (several requests) so that it never hangs.
    async fn bounded<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let deadline = self.shared.response_timeout * (2 * CAS_ROUNDS as u32 + 1);
        tokio::time::timeout(deadline, call)
            .await
            .unwrap_or(Err(StoreError::Timeout { op }))
    }

    /// The last message of a subject, if any.
    async fn last(
        &self,
        op: &'static str,
        subject: String,
    ) -> Result<Option<jetstream::message::StreamMessage>, StoreError> {
        match self
            .shared
            .stream
            .direct_get_last_for_subject(subject)
            .await
        {
            Ok(message) => Ok(Some(message)),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) if e.kind() == DirectGetErrorKind::TimedOut => Err(StoreError::Timeout { op }),
            Err(e) => Err(StoreError::Unavailable(format!("{op}: {e}"))),
        }
    }

    /// A key's entry as it is now.
    async fn read(&self, op: &'static str, key: &KeyHash) -> Result<Slot, StoreError> {
        match self.last(op, self.entry_subject(key)).await? {
            Some(message) => {
                entry::parse(&message).map_err(|e| StoreError::Protocol(format!("{op}: {e}")))
            }
            None => Ok(Slot::empty()),
        }
    }

    /// Publishes one message and waits for the stream's acknowledgement: its revision, or
    /// [`Conflict`] when the revision it expected was no longer the last.
    async fn publish(
        &self,
        op: &'static str,
        subject: String,
        message: PublishMessage,
    ) -> Result<Result<u64, Conflict>, StoreError> {
        let ack = match self.shared.js.send_publish(subject, message).await {
            Ok(ack) => ack,
            Err(e) => return Err(publish_error(op, &e)),
        };
        match ack.await {
            Ok(ack) => Ok(Ok(ack.sequence)),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(Err(Conflict)),
            Err(e) => Err(publish_error(op, &e)),
        }
    }

    fn held(&self, key: &KeyHash, token: Token) -> Option<Held> {
        lock(&self.shared.held)
            .get(key)
            .filter(|held| held.token == token)
            .cloned()
    }

    fn remember(&self, key: &KeyHash, held: Held) {
        let mut map = lock(&self.shared.held);
        if map.len() >= HELD_CAPACITY && !map.contains_key(key) {
            map.clear();
        }
        map.insert(*key, held);
    }

    fn forget(&self, key: &KeyHash) {
        lock(&self.shared.held).remove(key);
    }
}
