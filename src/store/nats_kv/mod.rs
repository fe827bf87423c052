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
mod purge;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{DirectGetErrorKind, Stream};
use async_nats::{Client, ConnectOptions};
use async_trait::async_trait;

use crate::credentials::{Credentials, redact};
use bytes::Bytes;
use tokio::sync::mpsc;

pub use self::bucket::{MIN_SERVER_VERSION, bucket_name, check_server_version};
use self::entry::{Record, Slot};
pub use self::events::NatsKvEvents;
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
impl std::fmt::Debug for NatsKvConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
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

    /// How long a lease has left before the server surely removed it; `None` once it is stuck
    /// (see [`STUCK_LEASE`]).
    fn lease_left(slot: &Slot, ttl: Duration, now_ns: i128) -> Option<Duration> {
        let age = slot.age(now_ns);
        let server = entry::server_ttl(ttl);
        if age >= server + STUCK_LEASE {
            return None;
        }
        Some(
            (server + EXPIRY_SLACK)
                .checked_sub(age)
                .unwrap_or(EXPIRY_SLACK),
        )
    }

    /// The time a value has left; for a sliding value, counted from its last touch, and touched
    /// (a touch record written, never the value) when `touch` asks and it has fallen below
    /// `ttl - slack`. Zero means stale.
    async fn value_left(
        &self,
        op: &'static str,
        key: &KeyHash,
        slot: &Slot,
        ttl: Duration,
        sliding: bool,
        touch: Option<Touch>,
    ) -> Result<Duration, StoreError> {
        let now = entry::now_ns();
        let own = entry::left(ttl, slot.written_ns, now);
        if !sliding || ttl.is_zero() {
            return Ok(own);
        }
        // Written less than a slack ago: no touch is due, and its own age is a lower bound.
        if let Some(touch) = touch
            && ttl - own < touch.slack
        {
            return Ok(own);
        }
        let since = match self.last(op, self.touch_subject(key)).await? {
            Some(message) => match entry::parse_touch(&message) {
                Some(touched) if touched.revision == slot.revision => {
                    touched.written_ns.max(slot.written_ns)
                }
                _ => slot.written_ns,
            },
            None => slot.written_ns,
        };
        let left = entry::left(ttl, since, now);
        match touch {
            Some(touch) if !left.is_zero() && left < ttl.saturating_sub(touch.slack) => {
                if let Err(error) = self.touch(key, slot.revision, ttl).await {
                    tracing::warn!(%key, %error, "could not touch a sliding value");
                    return Ok(left);
                }
                Ok(ttl)
            }
            _ => Ok(left),
        }
    }

    /// Writes a sliding value's touch record: a headers-only message that says the value at
    /// `revision` was read now, and lapses with the value's window.
    async fn touch(&self, key: &KeyHash, revision: u64, ttl: Duration) -> Result<(), StoreError> {
        let message = PublishMessage::build()
            .header(entry::STATE, "touch")
            .header(entry::REVISION, revision.to_string())
            .header(entry::NATS_TTL, entry::ttl_header(ttl));
        self.publish("touch", self.touch_subject(key), message)
            .await?
            .map(|_| ())
            .map_err(|Conflict| StoreError::Protocol("touch: unexpected conflict".into()))
    }

    /// A lease message, expecting `expected` as the entry's last revision.
    fn lease_message(
        token: Token,
        node: Option<&str>,
        ttl: Duration,
        fence: Option<u64>,
        expected: u64,
    ) -> PublishMessage {
        let mut message = PublishMessage::build()
            .header(entry::STATE, "lease")
            .header(entry::TOKEN, token.to_hex())
            .header(entry::TTL_MS, millis(ttl).to_string())
            .header(entry::NATS_TTL, entry::ttl_header(ttl))
            .expected_last_subject_sequence(expected);
        if let Some(node) = node {
            message = message.header(entry::NODE, entry::escape(node));
        }
        if let Some(fence) = fence {
            message = message.header(entry::FENCE, fence.to_string());
        }
        message
    }

    async fn acquire_or_peek(
        &self,
        op: &'static str,
        key: &KeyHash,
        lease: Option<&LeaseRequest>,
        touch: Option<Touch>,
    ) -> Result<Acquired, StoreError> {
        for _ in 0..CAS_ROUNDS {
            let slot = self.read(op, key).await?;
            match &slot.record {
                Record::Value {
                    ttl,
                    fresh,
                    sliding,
                    value,
                    since_ns,
                    ..
                } => {
                    let now = entry::now_ns();
                    let since = since_ns.unwrap_or(slot.written_ns);
                    let ttl_left = if *sliding {
                        self.value_left(op, key, &slot, *ttl, true, touch).await?
                    } else {
                        entry::left(*ttl, since, now)
                    };
                    let fresh_left = fresh.map(|fresh| entry::left(fresh, since, now));
                    match fresh_left {
                        _ if ttl_left.is_zero() => {}
                        Some(left) if left.is_zero() => {
                            // Stale: the lease to refresh it rides on the value (see `entry`).
                            let Some(refresh) = self.refresh_over(op, key, &slot, lease).await?
                            else {
                                continue;
                            };
                            return Ok(Acquired::Stale {
                                value: value.clone(),
                                ttl_left,
                                refresh,
                            });
                        }
                        fresh_left => {
                            return Ok(Acquired::Hit {
                                value: value.clone(),
                                ttl_left: fresh_left.unwrap_or(ttl_left),
                            });
                        }
                    }
                }
                Record::Pass { ttl, .. } => {
                    let ttl_left = entry::left(*ttl, slot.written_ns, entry::now_ns());
                    if !ttl_left.is_zero() {
                        return Ok(Acquired::Pass { ttl_left });
                    }
                }
                Record::Lease { token, fence, ttl } => {
                    if let Some(lease_left) = Self::lease_left(&slot, *ttl, entry::now_ns()) {
                        return Ok(match lease {
                            // Its own lease: a create whose answer was lost to a client-side
                            // timeout made it, and the retry must lead, not wait on itself.
                            Some(lease) if lease.token == *token => {
                                self.remember(
                                    key,
                                    Held {
                                        token: *token,
                                        revision: slot.revision,
                                        fence: *fence,
                                        node: Some(lease.node.clone()),
                                        over_value: false,
                                    },
                                );
                                Acquired::Lead { fence: *fence }
                            }
                            _ => Acquired::Wait {
                                lease_left,
                                lease: Some(token.lease_id()),
                            },
                        });
                    }
                }
                Record::Vacant | Record::Released { .. } => {}
            }
            // Nothing live: stale values, lapsed pass markers and stuck leases are replaced by the
            // lease like a tombstone is.
            let Some(lease) = lease else {
                return Ok(Acquired::Empty);
            };
            let message = Self::lease_message(
                lease.token,
                Some(&lease.node),
                lease.ttl,
                None,
                slot.revision,
            );
            match self.publish(op, self.entry_subject(key), message).await? {
                Ok(revision) => {
                    self.remember(
                        key,
                        Held {
                            token: lease.token,
                            revision,
                            fence: revision,
                            node: Some(lease.node.clone()),
                            over_value: false,
                        },
                    );
                    return Ok(Acquired::Lead { fence: revision });
                }
                // Another writer got there first; look again.
                Err(Conflict) => continue,
            }
        }
        Err(StoreError::Timeout { op })
    }

    /// Who refreshes the value in `slot`: a live refresh lease on it (the caller's own, or
    /// another's), or, when `lease` is given and there is none, a lease taken now by publishing
    /// the value again with it. `None`: another writer got there first; look again.
    async fn refresh_over(
        &self,
        op: &'static str,
        key: &KeyHash,
        slot: &Slot,
        lease: Option<&LeaseRequest>,
    ) -> Result<Option<Refresh>, StoreError> {
        let Record::Value { lease: held, .. } = &slot.record else {
            return Ok(Some(Refresh::Idle));
        };
        let live = held
            .map(|(holder, ttl)| (holder, entry::left(ttl, slot.written_ns, entry::now_ns())))
            .filter(|(_, left)| !left.is_zero());
        match (live, lease) {
            (Some((holder, _)), Some(lease)) if holder == lease.token => {
                self.remember(key, Self::held_over(lease, slot.revision, slot.revision));
                Ok(Some(Refresh::Lead {
                    fence: slot.revision,
                }))
            }
            (Some((holder, lease_left)), _) => Ok(Some(Refresh::Elsewhere {
                lease_left,
                lease: Some(holder.lease_id()),
            })),
            (None, None) => Ok(Some(Refresh::Idle)),
            (None, Some(lease)) => {
                let Some(message) =
                    republish(slot, Some((lease.token, lease.ttl)), None, slot.revision)
                else {
                    return Ok(Some(Refresh::Idle));
                };
                match self.publish(op, self.entry_subject(key), message).await? {
                    Ok(revision) => {
                        self.remember(key, Self::held_over(lease, revision, revision));
                        Ok(Some(Refresh::Lead { fence: revision }))
                    }
                    Err(Conflict) => Ok(None),
                }
            }
        }
    }

    /// A refresh lease this process holds on a value.
    fn held_over(lease: &LeaseRequest, revision: u64, fence: u64) -> Held {
        Held {
            token: lease.token,
            revision,
            fence,
            node: Some(lease.node.clone()),
            over_value: true,
        }
    }

    /// Renews a refresh lease riding on a value: the value is published again with the lease's
    /// new lifetime, if the token still holds it.
    async fn renew_over_value(
        &self,
        key: &KeyHash,
        token: Token,
        ttl: Duration,
    ) -> Result<Renewed, StoreError> {
        for _ in 0..CAS_ROUNDS {
            let slot = self.read("renew", key).await?;
            let held = matches!(
                &slot.record,
                Record::Value { lease: Some((holder, _)), .. } if *holder == token
            );
            let message = republish(&slot, Some((token, ttl)), None, slot.revision);
            let (true, Some(message)) = (held, message) else {
                self.forget(key);
                return Ok(Renewed::Lost);
            };
            if let Ok(revision) = self
                .publish("renew", self.entry_subject(key), message)
                .await?
            {
                let fence = self.held(key, token).map_or(revision, |held| held.fence);
                self.remember(
                    key,
                    Held {
                        token,
                        revision,
                        fence,
                        node: None,
                        over_value: true,
                    },
                );
                return Ok(Renewed::Held);
            }
        }
        Err(StoreError::Timeout { op: "renew" })
    }

    /// Ends a refresh lease riding on a value without a new value: the value is published again
    /// without it, saying why, so waiters hear the outcome and the stale value stays. `None` when
    /// the entry holds no such lease of `token` (the caller goes the usual way).
    async fn release_over_value(
        &self,
        key: &KeyHash,
        token: Token,
        released: (&'static str, Option<&str>),
    ) -> Result<Option<Fenced>, StoreError> {
        for _ in 0..CAS_ROUNDS {
            let slot = self.read("release", key).await?;
            let held = matches!(
                &slot.record,
                Record::Value { lease: Some((holder, _)), .. } if *holder == token
            );
            if !held {
                return Ok(None);
            }
            self.forget(key);
            let Some(message) = republish(&slot, None, Some(released), slot.revision) else {
                return Ok(Some(Fenced::Lost));
            };
            if self
                .publish("release", self.entry_subject(key), message)
                .await?
                .is_ok()
            {
                return Ok(Some(Fenced::Done));
            }
        }
        Err(StoreError::Timeout { op: "release" })
    }

    /// A write that only the lease holder may make: it names the lease's revision (remembered, or
    /// read), so the server rejects it once the lease is gone. `landed` recognises the write itself
    /// (by its token), which a try whose answer was lost may have made.
    async fn fenced(
        &self,
        op: &'static str,
        key: &KeyHash,
        token: Token,
        message: impl Fn(u64) -> PublishMessage,
        landed: impl Fn(&Record) -> bool,
    ) -> Result<Outcome, StoreError> {
        let mut expected = self.held(key, token).map(|held| held.revision);
        let mut timed_out = None;
        for _ in 0..CAS_ROUNDS {
            let revision = match expected.take() {
                Some(revision) => revision,
                None => {
                    let slot = match self.read(op, key).await {
                        Ok(slot) => slot,
                        Err(error) => return Err(timed_out.unwrap_or(error)),
                    };
                    if landed(&slot.record) {
                        self.forget(key);
                        return Ok(Outcome::Done(slot.revision));
                    }
                    match slot.record {
                        Record::Lease { token: holder, .. } if holder == token => slot.revision,
                        Record::Value {
                            lease: Some((holder, _)),
                            ..
                        } if holder == token => slot.revision,
                        _ => {
                            self.forget(key);
                            return Ok(Outcome::Lost);
                        }
                    }
                }
            };
            match self
                .publish(op, self.entry_subject(key), message(revision))
                .await
            {
                Ok(Ok(revision)) => {
                    self.forget(key);
                    return Ok(Outcome::Done(revision));
                }
                // The lease moved on (or an earlier try of this very write landed): look.
                Ok(Err(Conflict)) => {}
                // It may have been applied; the next look tells.
                Err(error) if error.is_timeout() => timed_out = Some(error),
                Err(error) => return Err(error),
            }
        }
        Err(timed_out.unwrap_or(StoreError::Timeout { op }))
    }

    /// Removes a sliding value that was not read within its window (its touch record lapsed).
    /// Several processes may try; the compare-and-set lets one win.
    pub(crate) async fn sweep(&self, key: &KeyHash) -> Result<bool, StoreError> {
        self.bounded("sweep", async {
            let slot = self.read("sweep", key).await?;
            let Record::Value {
                ttl, sliding: true, ..
            } = &slot.record
            else {
                return Ok(false);
            };
            let left = self
                .value_left("sweep", key, &slot, *ttl, true, None)
                .await?;
            if !left.is_zero() {
                return Ok(false);
            }
            let message = tombstone("expired").expected_last_subject_sequence(slot.revision);
            Ok(self
                .publish("sweep", self.entry_subject(key), message)
                .await?
                .is_ok())
        })
        .await
    }
}

/// The value in `slot` published again, expecting `expected`: with a refresh lease, or saying its
/// refresh was `released` (and why); its first timestamp kept, so its freshness and lifetime still
/// count from then. `None` when `slot` holds no value, or one whose lifetime is over.
fn republish(
    slot: &Slot,
    lease: Option<(Token, Duration)>,
    released: Option<(&'static str, Option<&str>)>,
    expected: u64,
) -> Option<PublishMessage> {
    let Record::Value {
        token,
        ttl,
        fresh,
        sliding: false,
        value,
        since_ns,
        ..
    } = &slot.record
    else {
        return None;
    };
    let since = since_ns.unwrap_or(slot.written_ns);
    let left = entry::left(*ttl, since, entry::now_ns());
    if left.is_zero() {
        return None;
    }
    let mut message = PublishMessage::build()
        .header(entry::STATE, "value")
        .header(entry::TTL_MS, millis(*ttl).to_string())
        .header(entry::SINCE_NS, since.to_string())
        .header(entry::NATS_TTL, entry::ttl_header(left))
        .expected_last_subject_sequence(expected)
        .payload(value.clone());
    if let Some(token) = token {
        message = message.header(entry::TOKEN, token.to_hex());
    }
    if let Some(fresh) = fresh {
        message = message.header(entry::FRESH_MS, millis(*fresh).to_string());
    }
    if let Some((holder, lease_ttl)) = lease {
        message = message
            .header(entry::LEASE_TOKEN, holder.to_hex())
            .header(entry::LEASE_TTL_MS, millis(lease_ttl).to_string());
    }
    if let Some((state, why)) = released {
        message = message.header(entry::RELEASED, state);
        if let Some(why) = why {
            message = message.header(entry::MESSAGE, entry::escape(why));
        }
    }
    Some(message)
}

/// A delete that leaves a tombstone of `state`, which itself lapses after [`TOMBSTONE_TTL`].
fn tombstone(state: &'static str) -> PublishMessage {
    PublishMessage::build()
        .header(entry::KV_OPERATION, "DEL")
        .header(entry::STATE, state)
        .header(entry::NATS_TTL, entry::ttl_header(TOMBSTONE_TTL))
}

/// Milliseconds, saturating.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Timeouts may have been applied on the server, so they are told apart; a message over the
/// server's limit is a protocol error (the engine checks the limit first); the rest means the
/// server or the bucket cannot be reached or used right now.
fn publish_error(op: &'static str, e: &PublishError) -> StoreError {
    match e.kind() {
        PublishErrorKind::TimedOut => StoreError::Timeout { op },
        PublishErrorKind::MaxPayloadExceeded => StoreError::Protocol(format!("{op}: {e}")),
        _ => StoreError::Unavailable(format!("{op}: {e}")),
    }
}

// ---------------------------------------------------------------------------------------------
// The protocol
// ---------------------------------------------------------------------------------------------

#[async_trait]
impl Store for NatsKvStore {
    fn kind(&self) -> &'static str {
        "nats_kv"
    }

    /// Every write is a message on the bucket's stream, which the consumers of every process
    /// receive: the write is the event.
    fn announces(&self) -> bool {
        true
    }

    /// The bus of this store is the bucket's own stream: every event is a write of the store.
    fn events_are_writes(&self) -> bool {
        true
    }

    fn min_lease_ttl(&self) -> Duration {
        MIN_LEASE_TTL
    }

    fn max_value_len(&self) -> Option<usize> {
        Some(self.shared.max_value_len)
    }

    async fn acquire(
        &self,
        key: &KeyHash,
        lease: &LeaseRequest,
        touch: Option<Touch>,
    ) -> Result<Acquired, StoreError> {
        self.bounded(
            "acquire",
            self.acquire_or_peek("acquire", key, Some(lease), touch),
        )
        .await
    }

    async fn peek(&self, key: &KeyHash, touch: Option<Touch>) -> Result<Acquired, StoreError> {
        self.bounded("peek", self.acquire_or_peek("peek", key, None, touch))
            .await
    }

    async fn renew(
        &self,
        key: &KeyHash,
        token: Token,
        ttl: Duration,
    ) -> Result<Renewed, StoreError> {
        self.bounded("renew", async {
            let mut known = self.held(key, token);
            if known.as_ref().is_some_and(|held| held.over_value) {
                return self.renew_over_value(key, token, ttl).await;
            }
            let node = known.as_ref().and_then(|held| held.node.clone());
            for _ in 0..CAS_ROUNDS {
                let held = match known.take() {
                    Some(held) => held,
                    None => {
                        // Not remembered, or the remembered revision was stale (a renewal whose
                        // answer was lost may have moved it): find the lease as it is.
                        let slot = self.read("renew", key).await?;
                        if matches!(
                            &slot.record,
                            Record::Value { lease: Some((holder, _)), .. } if *holder == token
                        ) {
                            return self.renew_over_value(key, token, ttl).await;
                        }
                        match slot.record {
                            Record::Lease {
                                token: holder,
                                fence,
                                ..
                            } if holder == token => Held {
                                token,
                                revision: slot.revision,
                                fence,
                                node: node.clone(),
                                over_value: false,
                            },
                            _ => {
                                self.forget(key);
                                return Ok(Renewed::Lost);
                            }
                        }
                    }
                };
                let message = Self::lease_message(
                    token,
                    held.node.as_deref(),
                    ttl,
                    Some(held.fence),
                    held.revision,
                );
                let written = self.publish("renew", self.entry_subject(key), message);
                // On a conflict the lease moved (a renewal whose answer was lost, or another
                // holder): the next round looks.
                if let Ok(revision) = written.await? {
                    self.remember(key, Held { revision, ..held });
                    return Ok(Renewed::Held);
                }
            }
            Err(StoreError::Timeout { op: "renew" })
        })
        .await
    }

    async fn commit_fresh(
        &self,
        key: &KeyHash,
        token: Token,
        value: Bytes,
        fresh: Duration,
        ttl: Duration,
        sliding: bool,
        _event: Bytes,
    ) -> Result<Fenced, StoreError> {
        if value.len() > self.shared.max_value_len {
            return Err(StoreError::Protocol(format!(
                "commit: a value of {} bytes is over the server's limit of {}",
                value.len(),
                self.shared.max_value_len
            )));
        }
        self.bounded("commit", async {
            let message = |expected: u64| {
                let message = PublishMessage::build()
                    .header(entry::STATE, "value")
                    .header(entry::TOKEN, token.to_hex())
                    .header(entry::TTL_MS, millis(ttl).to_string())
                    .expected_last_subject_sequence(expected)
                    .payload(value.clone());
                let message = if fresh < ttl {
                    message.header(entry::FRESH_MS, millis(fresh).to_string())
                } else {
                    message
                };
                if sliding {
                    // Kept until its touch record lapses; see the module docs.
                    message
                        .header(entry::SLIDING, "1")
                        .header(entry::NATS_TTL, "never")
                } else {
                    message.header(entry::NATS_TTL, entry::ttl_header(ttl))
                }
            };
            let landed = |record: &Record| {
                matches!(record, Record::Value { token: Some(writer), .. } if *writer == token)
            };
            match self.fenced("commit", key, token, message, landed).await? {
                Outcome::Done(revision) => {
                    if sliding && let Err(error) = self.touch(key, revision, ttl).await {
                        // Without it the value is only swept when some read finds it stale.
                        tracing::warn!(%key, %error, "could not write a sliding value's first touch");
                    }
                    Ok(Fenced::Done)
                }
                Outcome::Lost => Ok(Fenced::Lost),
            }
        })
        .await
    }

    /// The lease rides on the value, as for a stale one (see `entry`); sliding values are not
    /// refreshed early.
    async fn lead_refresh(
        &self,
        key: &KeyHash,
        lease: &LeaseRequest,
        within: Duration,
    ) -> Result<Refresh, StoreError> {
        self.bounded("lead_refresh", async {
            for _ in 0..CAS_ROUNDS {
                let slot = self.read("lead_refresh", key).await?;
                let Record::Value {
                    ttl,
                    fresh,
                    sliding: false,
                    since_ns,
                    ..
                } = &slot.record
                else {
                    return Ok(Refresh::Idle);
                };
                let since = since_ns.unwrap_or(slot.written_ns);
                let left = entry::left(fresh.unwrap_or(*ttl), since, entry::now_ns());
                if left > within {
                    return Ok(Refresh::Idle);
                }
                if let Some(refresh) = self
                    .refresh_over("lead_refresh", key, &slot, Some(lease))
                    .await?
                {
                    return Ok(refresh);
                }
            }
            Err(StoreError::Timeout { op: "lead_refresh" })
        })
        .await
    }

    async fn release(
        &self,
        key: &KeyHash,
        token: Token,
        event: Bytes,
    ) -> Result<Fenced, StoreError> {
        // The engine hands the event it would have published; here it becomes the tombstone.
        let (state, message, response) = match Event::decode(event).map(|event| event.kind) {
            Ok(EventKind::Failed { message, response }) => ("failed", Some(message), response),
            _ => ("abandoned", None, None),
        };
        // An error response rides in the tombstone's payload when it fits; followers fetch it.
        let response = response.filter(|bytes| bytes.len() <= self.shared.max_value_len);
        self.bounded("release", async {
            // A refresh of a stale value ends by putting the value back without its lease.
            if self.held(key, token).is_none_or(|held| held.over_value)
                && let Some(done) = self
                    .release_over_value(key, token, (state, message.as_deref()))
                    .await?
            {
                return Ok(done);
            }
            let publish = |expected: u64| {
                let mut publish = tombstone(state)
                    .header(entry::TOKEN, token.to_hex())
                    .expected_last_subject_sequence(expected);
                if let Some(message) = &message {
                    publish = publish.header(entry::MESSAGE, entry::escape(message));
                }
                if let Some(response) = &response {
                    publish = publish.payload(response.clone());
                }
                publish
            };
            let landed = |record: &Record| {
                matches!(record, Record::Released { token: writer } if *writer == token)
            };
            Ok(
                match self.fenced("release", key, token, publish, landed).await? {
                    Outcome::Done(_) => Fenced::Done,
                    Outcome::Lost => Fenced::Lost,
                },
            )
        })
        .await
    }

    async fn give_up(
        &self,
        key: &KeyHash,
        token: Token,
        pass_ttl: Duration,
        _event: Bytes,
    ) -> Result<Fenced, StoreError> {
        self.bounded("give_up", async {
            let message = |expected: u64| {
                PublishMessage::build()
                    .header(entry::STATE, "pass")
                    .header(entry::TOKEN, token.to_hex())
                    .header(entry::TTL_MS, millis(pass_ttl).to_string())
                    .header(entry::NATS_TTL, entry::ttl_header(pass_ttl))
                    .expected_last_subject_sequence(expected)
            };
            let landed = |record: &Record| {
                matches!(record, Record::Pass { token: Some(writer), .. } if *writer == token)
            };
            Ok(
                match self.fenced("give_up", key, token, message, landed).await? {
                    Outcome::Done(_) => Fenced::Done,
                    Outcome::Lost => Fenced::Lost,
                },
            )
        })
        .await
    }

    async fn purge(&self, key: &KeyHash, _event: Bytes) -> Result<bool, StoreError> {
        self.bounded("purge", async {
            let slot = self.read("purge", key).await?;
            let existed = !matches!(slot.record, Record::Vacant | Record::Released { .. });
            // Written even when nothing was there: other processes' L1 copies must go.
            let message = PublishMessage::build()
                .header(entry::KV_OPERATION, "PURGE")
                .header(entry::ROLLUP, "sub")
                .header(entry::STATE, "purged")
                .header(entry::NATS_TTL, entry::ttl_header(TOMBSTONE_TTL));
            self.forget(key);
            self.publish("purge", self.entry_subject(key), message)
                .await?
                .map_err(|Conflict| StoreError::Protocol("purge: unexpected conflict".into()))?;
            Ok(existed)
        })
        .await
    }

    async fn discard(&self, key: &KeyHash, value: &Bytes) -> Result<bool, StoreError> {
        self.bounded("discard", async {
            let slot = self.read("discard", key).await?;
            match &slot.record {
                Record::Value { value: stored, .. } if stored == value => {
                    let message =
                        tombstone("discarded").expected_last_subject_sequence(slot.revision);
                    Ok(self
                        .publish("discard", self.entry_subject(key), message)
                        .await?
                        .is_ok())
                }
                _ => Ok(false),
            }
        })
        .await
    }

    /// The route's record is named by its generation key; see `purge.rs`.
    async fn route_generation(&self, route: &str) -> Result<u64, StoreError> {
        self.read_generation(&crate::key::generation_key(route))
            .await
    }

    /// The write is the announcement: every process's events consumer hears the record.
    async fn bump_generation(&self, _route: &str, key: &KeyHash) -> Result<u64, StoreError> {
        self.raise_generation(key).await
    }

    async fn index(&self, entry: &IndexEntry) -> Result<(), StoreError> {
        self.write_index(entry).await
    }

    async fn indexed(&self, selector: &Selector, limit: usize) -> Result<Vec<KeyHash>, StoreError> {
        self.read_index(selector, limit).await
    }

    async fn status(&self, key: &KeyHash) -> Result<KeyStatus, StoreError> {
        self.bounded("status", async {
            let slot = self.read("status", key).await?;
            let now = entry::now_ns();
            Ok(match &slot.record {
                Record::Value {
                    ttl,
                    sliding,
                    since_ns,
                    ..
                } => {
                    let ttl_left = match since_ns {
                        // Published again (under or after a refresh): counts from its first write.
                        Some(since) => entry::left(*ttl, *since, now),
                        None => {
                            self.value_left("status", key, &slot, *ttl, *sliding, None)
                                .await?
                        }
                    };
                    if ttl_left.is_zero() {
                        KeyStatus::Empty
                    } else {
                        KeyStatus::Exists { ttl_left }
                    }
                }
                Record::Pass { ttl, .. } => match entry::left(*ttl, slot.written_ns, now) {
                    ttl_left if ttl_left.is_zero() => KeyStatus::Empty,
                    ttl_left => KeyStatus::Pass { ttl_left },
                },
                Record::Lease { ttl, .. } => match Self::lease_left(&slot, *ttl, now) {
                    Some(lease_left) => KeyStatus::Pending { lease_left },
                    None => KeyStatus::Empty,
                },
                Record::Vacant | Record::Released { .. } => KeyStatus::Empty,
            })
        })
        .await
    }
}
