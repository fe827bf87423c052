//! Redis pub/sub bus: one channel per namespace ([`redis_channel`]), one RESP3 connection per process
//! for the subscription, and a separate connection for publishing.
//!
//! # Subscription and recovery
//!
//! The subscription lives on a [`ConnectionManager`] speaking RESP3, so messages arrive as push
//! frames on a channel read by one task, and the manager re-sends `SUBSCRIBE` on every connection it
//! makes ([automatic resubscription](ConnectionManagerConfig::set_automatic_resubscription)).
//!
//! The manager reconnects on its own after a disconnection, but only with a bounded number of
//! retries; after that it waits for the next command. So a disconnection (a
//! [`PushKind::Disconnection`] frame) marks the bus disconnected and wakes a second task that drives
//! recovery itself: with backoff, until it succeeds or the bus closes, it sends `PING` through the
//! manager (which makes it reconnect and resubscribe), reads the new connection's `CLIENT ID` (for
//! `Bus::sever`), and subscribes once more explicitly, so that the server's confirmation comes
//! from the connection the manager uses now (subscribing twice is harmless). Only then is the bus
//! connected again, and [`EventSink::resync`] is called once for that recovery: events published
//! while the subscription was gone are covered by every live flight re-checking the store.
//!
//! Subscribe confirmations arriving as push frames are deliberately not taken as the sign of
//! recovery: one may come from a connection that is being replaced and dies right after.
//!
//! Should the manager fail in a way it does not recover from by itself (an error other than I/O or
//! a timeout), the task replaces it with a fresh one.
//!
//! # Sentinel and Cluster
//!
//! The URL may be any form of Redis URL. With Sentinel, the subscription is made on the primary
//! the sentinels name at the time, and a new manager (so a new lookup) replaces one that lost its
//! connection; when the publishing connection follows a failover (`+switch-master` or a lost
//! primary), the subscription moves too, followed by a resync.
//!
//! With Cluster, events stay on classic pub/sub (`PUBLISH`, `SUBSCRIBE`), not sharded pub/sub:
//! a classic message reaches every node over the cluster bus, so one subscription on any node
//! hears every event, whichever slot the scripts that published it ran on. Sharded pub/sub keeps
//! a message inside its channel's shard, and a script may only `SPUBLISH` to a channel of its own
//! slot; with no pattern subscriptions for shard channels, one subscription per process could
//! then not hear every key. Classic pub/sub costs each event one trip to every node, which the
//! events' size (ids and outcome, values inline only below 16 KiB) keeps cheap. The subscription
//! goes to the seed nodes in turn, moving to the next when its node is lost.
//!
//! [`redis_channel`]: super::redis_channel

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ProtocolVersion, PushInfo, PushKind, RedisError, Value};
use tokio::sync::{Notify, mpsc, watch};

use super::tasks::{Shutdown, Tasks, lock};
use super::{Bus, BusError, Event, EventSink, redis_channel};
use crate::credentials::Credentials;
use crate::key::KeyHash;
use crate::redis_conn::{RedisConn, Settings, SubscriptionSource};

/// First pause between two recovery attempts; doubled after each failure up to
/// [`RETRY_MAX_DELAY`].
const RETRY_MIN_DELAY: Duration = Duration::from_millis(50);
/// Longest pause between two recovery attempts (and between the manager's own reconnect attempts).
const RETRY_MAX_DELAY: Duration = Duration::from_secs(1);
/// Reconnect attempts the publishing connection makes on its own before a publish gives up.
const MANAGER_RETRIES: usize = 6;

/// How to reach Redis and which namespace's events to carry.
#[derive(Clone)]
pub struct RedisBusConfig {
    /// Any form of Redis URL (`redis://`, `redis+sentinel://`, `redis+cluster://`). Both
    /// connections speak RESP3 whatever it says: the
    /// subscription needs push frames, and the publishing connection then notices a disconnection
    /// at once and reconnects before the next publish needs it.
    pub url: String,
    /// Events travel on [`redis_channel`]`(namespace)`.
    pub namespace: String,
    /// Bound on establishing one connection.
    pub connect_timeout: Duration,
    /// Bound on one command's answer.
    pub response_timeout: Duration,
    /// Credentials and TLS beyond what the url carries.
    pub credentials: Credentials,
}

impl RedisBusConfig {
    /// A config with the default timeouts (connect 2 s, response 1 s).
    pub fn new(url: impl Into<String>, namespace: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            namespace: namespace.into(),
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(1),
            credentials: Credentials::default(),
        }
    }
}

// Written by hand so that a password in the url never reaches a log line.
impl std::fmt::Debug for RedisBusConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBusConfig")
            .field("url", &crate::credentials::redact(&self.url))
            .field("namespace", &self.namespace)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("credentials", &self.credentials)
            .finish()
    }
}

/// State shared by the bus and its two tasks.
struct Shared {
    /// Where events, resyncs and junk are reported.
    sink: Arc<dyn EventSink>,
    /// The one channel subscribed to and published on.
    channel: String,
    /// Whether the subscription is in place; read by [`Bus::connected`].
    connected: AtomicBool,
    /// `CLIENT ID` of the subscription connection (0: unknown), so that `Bus::sever` kills exactly
    /// our connection and not another process's.
    client_id: AtomicI64,
    /// The server the subscription connection was made to (the ids above are per server).
    subscribed_on: Mutex<Option<redis::Client>>,
    /// Wakes the recovery task after a disconnection (a stored permit is never lost).
    reconnect: Notify,
    /// See [`RedisBusConfig::connect_timeout`].
    connect_timeout: Duration,
    /// See [`RedisBusConfig::response_timeout`].
    response_timeout: Duration,
}

/// A Redis pub/sub bus for one namespace.
pub struct RedisBus {
    /// Channel, state flags and timeouts shared with the tasks.
    shared: Arc<Shared>,
    /// The publishing connection, separate from the subscription so a publish never queues behind
    /// (or is lost with) the subscription's reconnection; taken out on close.
    publisher: Mutex<Option<RedisConn>>,
    /// The push reader and the recovery task.
    tasks: Tasks,
}

impl RedisBus {
    /// Connects, subscribes to the namespace's channel and returns only once the server has
    /// confirmed the subscription, so nothing this process publishes or waits for can precede it.
    pub async fn connect(
        config: RedisBusConfig,
        sink: Arc<dyn EventSink>,
    ) -> Result<RedisBus, BusError> {
        let target = crate::credentials::redis::target(&config.url, &config.credentials)
            .map_err(|e| BusError::Unavailable(format!("redis: {e}")))?;
        let settings = Settings {
            connect_timeout: config.connect_timeout,
            response_timeout: config.response_timeout,
            protocol: ProtocolVersion::RESP3,
            retries: MANAGER_RETRIES,
            max_retry_delay: RETRY_MAX_DELAY,
        };
        let source = SubscriptionSource::new(&target, &settings)
            .map_err(|e| BusError::Unavailable(e.to_string()))?;

        let shared = Arc::new(Shared {
            sink,
            channel: redis_channel(&config.namespace),
            connected: AtomicBool::new(false),
            client_id: AtomicI64::new(0),
            subscribed_on: Mutex::new(None),
            reconnect: Notify::new(),
            connect_timeout: config.connect_timeout,
            response_timeout: config.response_timeout,
        });

        // A manager retries its first connect, even one the server refused (a wrong password, an
        // unknown certificate), until the connect timeout, which would hide the reason behind "timed
        // out"; one connection that does not retry answers with the server's own reason first.
        let probe = Settings {
            retries: 0,
            ..settings.clone()
        };
        drop(
            RedisConn::connect(&target, &probe)
                .await
                .map_err(|e| BusError::Unavailable(e.to_string()))?,
        );

        // Unbounded: a bound would have to drop frames, a Disconnection among them; the reader
        // only hands each frame to the sink, which must not block.
        let (push_tx, push_rx) = mpsc::unbounded_channel();
        let mut subscriber = Subscriber {
            source,
            settings: settings.clone(),
            push_tx,
            manager: None,
        };
        subscriber.establish(&shared).await?;
        shared.connected.store(true, Ordering::SeqCst);

        let publisher = RedisConn::connect(&target, &settings)
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        // With Sentinel, a failover the publishing connection followed moves the subscription too.
        let moves = publisher.primary_changes();

        let tasks = Tasks::new();
        tasks.spawn(read_pushes(shared.clone(), push_rx, tasks.shutdown()));
        tasks.spawn(keep_subscribed(
            shared.clone(),
            subscriber,
            moves,
            tasks.shutdown(),
        ));
        Ok(RedisBus {
            shared,
            publisher: Mutex::new(Some(publisher)),
            tasks,
        })
    }

    fn publisher(&self) -> Result<RedisConn, BusError> {
        lock(&self.publisher)
            .clone()
            .ok_or_else(|| BusError::Unavailable("redis bus is closed".into()))
    }
}

impl Shared {
    /// Handles one push frame of the subscription connection.
    fn on_push(&self, push: PushInfo) {
        let mut data = push.data.into_iter();
        match push.kind {
            PushKind::Message => {
                let (Some(channel), payload) = (data.next(), data.next()) else {
                    return self.sink.undecodable();
                };
                if !is_bulk(&channel, self.channel.as_bytes()) {
                    return; // not ours (we subscribe to nothing else)
                }
                match payload {
                    Some(Value::BulkString(bytes)) => match Event::decode(Bytes::from(bytes)) {
                        Ok(event) => self.sink.deliver(event),
                        Err(_) => self.sink.undecodable(),
                    },
                    _ => self.sink.undecodable(),
                }
            }
            PushKind::Disconnection => {
                tracing::warn!(channel = %self.channel, "redis bus subscription disconnected");
                self.connected.store(false, Ordering::SeqCst);
                self.reconnect.notify_one();
            }
            _ => {}
        }
    }
}

fn is_bulk(value: &Value, expected: &[u8]) -> bool {
    matches!(value, Value::BulkString(bytes) if bytes == expected)
}

/// The subscription connection, owned by the recovery task.
struct Subscriber {
    /// Names the server for a new manager: the one server, the primary the sentinels name now,
    /// or the next cluster node.
    source: SubscriptionSource,
    /// Timeouts and protocol of every manager built here.
    settings: Settings,
    /// Where every manager built here sends its push frames; this clone also keeps the reader's
    /// channel open while a manager is being replaced.
    push_tx: mpsc::UnboundedSender<PushInfo>,
    /// The current manager; `None` while a replacement is due.
    manager: Option<ConnectionManager>,
}

impl Subscriber {
    /// Makes sure a connection is up, subscribed to our channel, and its id known, each step under
    /// a deadline. An error other than I/O or a timeout (the manager reconnects after those by
    /// itself) drops the manager, so that the next attempt builds a new one.
    async fn establish(&mut self, shared: &Shared) -> Result<(), BusError> {
        match self.try_establish(shared).await {
            Ok(()) => Ok(()),
            // A manager reconnects by itself only to the address it was made for; with Sentinel
            // or Cluster that server may be gone for good, so the next attempt asks again.
            Err(Failure::Transient(error)) if self.source.is_fixed() => Err(error),
            Err(Failure::Transient(error) | Failure::Broken(error)) => {
                tracing::debug!(%error, "redis bus: replacing the subscription connection");
                self.manager = None;
                Err(error)
            }
        }
    }

    async fn try_establish(&mut self, shared: &Shared) -> Result<(), Failure> {
        let manager = match &mut self.manager {
            Some(manager) => manager,
            None => {
                let client = (self.source.client(&self.settings).await)
                    .map_err(|e| Failure::Transient(BusError::Unavailable(e.to_string())))?;
                let config = manager_config(&self.settings)
                    .set_push_sender(self.push_tx.clone())
                    .set_automatic_resubscription();
                let manager = within(
                    shared.connect_timeout,
                    "connect",
                    ConnectionManager::new_with_config(client.clone(), config),
                )
                .await
                .map_err(Failure::Transient)?;
                *lock(&shared.subscribed_on) = Some(client);
                self.manager.insert(manager)
            }
        };
        // PING first: it waits for (or triggers) the manager's reconnection, whose own attempts may
        // take longer than one response.
        let _: String = attempt(
            shared.connect_timeout + shared.response_timeout,
            "ping",
            redis::cmd("PING").query_async(manager),
        )
        .await?;
        let id: i64 = attempt(
            shared.response_timeout,
            "client id",
            redis::cmd("CLIENT").arg("ID").query_async(manager),
        )
        .await?;
        shared.client_id.store(id, Ordering::SeqCst);
        // Confirmed on the connection the manager uses now (the automatic resubscription may have
        // done it already; subscribing twice is harmless).
        attempt(
            shared.response_timeout,
            "subscribe",
            manager.subscribe(&shared.channel),
        )
        .await
    }
}

/// The subscription manager's settings: it keeps reconnecting on its own, with backoff, until the
/// recovery task replaces it.
fn manager_config(settings: &Settings) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(settings.connect_timeout))
        .set_response_timeout(Some(settings.response_timeout))
        .set_max_delay(RETRY_MAX_DELAY)
}

/// Why an attempt to bring the subscription back failed.
enum Failure {
    /// The manager is reconnecting, or will on the next command: try it again.
    Transient(BusError),
    /// The manager will not recover by itself: replace it.
    Broken(BusError),
}

/// [`within`], telling apart the failures a manager recovers from by itself.
async fn attempt<T>(
    limit: Duration,
    op: &'static str,
    call: impl Future<Output = Result<T, RedisError>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) if e.is_timeout() => Err(Failure::Transient(BusError::Timeout { op })),
        Ok(Err(e)) if e.is_io_error() => Err(Failure::Transient(BusError::Unavailable(format!(
            "redis {op}: {e}"
        )))),
        Ok(Err(e)) => Err(Failure::Broken(BusError::Unavailable(format!(
            "redis {op}: {e}"
        )))),
        Err(_) => Err(Failure::Transient(BusError::Timeout { op })),
    }
}

/// Reads the subscription's push frames until shutdown.
async fn read_pushes(
    shared: Arc<Shared>,
    mut pushes: mpsc::UnboundedReceiver<PushInfo>,
    mut shutdown: Shutdown,
) {
    loop {
        tokio::select! {
            biased;
            () = shutdown.wait() => return,
            push = pushes.recv() => match push {
                Some(push) => shared.on_push(push),
                None => return,
            },
        }
    }
}

/// After each disconnection, brings the subscription back (see the module docs). With Sentinel,
/// `moves` changes when the publishing connection followed a failover: the subscription is then
/// moved to the new primary the same way, even if its old connection still stands.
async fn keep_subscribed(
    shared: Arc<Shared>,
    mut subscriber: Subscriber,
    mut moves: Option<watch::Receiver<u64>>,
    mut shutdown: Shutdown,
) {
    let moved = async |moves: &mut Option<watch::Receiver<u64>>| match moves {
        Some(moves) => {
            if moves.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    };
    loop {
        tokio::select! {
            () = shutdown.wait() => return,
            () = shared.reconnect.notified() => {}
            () = moved(&mut moves) => {
                tracing::info!(channel = %shared.channel, "redis bus: the primary moved; moving the subscription");
                shared.connected.store(false, Ordering::SeqCst);
                subscriber.manager = None;
            }
        }
        let mut delay = RETRY_MIN_DELAY;
        loop {
            match subscriber.establish(&shared).await {
                Ok(()) => {
                    shared.connected.store(true, Ordering::SeqCst);
                    tracing::info!(channel = %shared.channel, "redis bus resubscribed; resyncing");
                    shared.sink.resync();
                    break;
                }
                Err(error) => tracing::debug!(%error, "redis bus: resubscription attempt failed"),
            }
            tokio::select! {
                () = shutdown.wait() => return,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(RETRY_MAX_DELAY);
        }
    }
}

/// Runs a Redis call under a deadline, mapping both kinds of failure to [`BusError`].
async fn within<T>(
    limit: Duration,
    op: &'static str,
    call: impl Future<Output = Result<T, RedisError>>,
) -> Result<T, BusError> {
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) if e.is_timeout() => Err(BusError::Timeout { op }),
        Ok(Err(e)) => Err(BusError::Unavailable(format!("redis {op}: {e}"))),
        Err(_) => Err(BusError::Timeout { op }),
    }
}

#[async_trait]
impl Bus for RedisBus {
    fn kind(&self) -> &'static str {
        "redis"
    }

    /// `PUBLISH channel bytes`. A publish that finds its connection dropped is tried once more on
    /// the reconnected one (a duplicate event is harmless; a lost one costs a poll interval).
    async fn publish(&self, _key: &KeyHash, encoded: Bytes) -> Result<(), BusError> {
        let mut publisher = self.publisher()?;
        let mut command = redis::cmd("PUBLISH");
        command.arg(&self.shared.channel).arg(encoded.as_ref());
        let first = tokio::time::timeout(
            self.shared.response_timeout,
            command.query_async::<i64>(&mut publisher),
        )
        .await;
        match first {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) if e.is_unrecoverable_error() => {}
            Ok(Err(e)) if e.is_timeout() => return Err(BusError::Timeout { op: "publish" }),
            Ok(Err(e)) => return Err(BusError::Unavailable(format!("redis publish: {e}"))),
            Err(_) => return Err(BusError::Timeout { op: "publish" }),
        }
        within(
            self.shared.connect_timeout + self.shared.response_timeout,
            "publish",
            command.query_async::<i64>(&mut publisher),
        )
        .await
        .map(drop)
    }

    fn connected(&self) -> bool {
        self.shared.connected.load(Ordering::SeqCst)
    }

    async fn close(&self) {
        self.tasks.close().await;
        lock(&self.publisher).take();
        self.shared.connected.store(false, Ordering::SeqCst);
    }

    /// Kills our subscription connection (by its `CLIENT ID`, on the server it is connected to);
    /// recovery then runs as after any disconnection, ending with one resync.
    #[cfg(any(test, feature = "test-util"))]
    async fn sever(&self) {
        let id = self.shared.client_id.load(Ordering::SeqCst);
        let server = lock(&self.shared.subscribed_on).clone();
        let (Some(server), true) = (server, id != 0) else {
            return;
        };
        let limit = self.shared.connect_timeout + self.shared.response_timeout;
        let killed: Result<(), BusError> = within(limit, "client kill", async {
            let mut conn = server.get_multiplexed_async_connection().await?;
            redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(id)
                .query_async(&mut conn)
                .await
        })
        .await;
        if let Err(error) = killed {
            tracing::warn!(%error, id, "redis bus: could not sever the subscription");
        }
    }
}
