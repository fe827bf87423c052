//! A connection to the primary that a set of sentinels names, kept on the primary across
//! failovers.
//!
//! The primary is looked up at connect (the sentinels are asked in order; the one they name must
//! confirm with `ROLE` that it is a primary), and again:
//!
//! - when a call meets a lost or refused connection, a timeout, or a server that is no longer a
//!   primary (`READONLY`, `MASTERDOWN`): the call waits, up to one connect and three response timeouts, for the sentinels
//!   to name a primary that answers, then runs once more on it; the same address answering again
//!   means the connection only blinked, and the call's error stands;
//! - when a sentinel announces `+switch-master` for our master (one task per connection keeps a
//!   subscription on one sentinel, moving to the next when that one is lost), so that a failover
//!   in which the old primary stays reachable is followed too.
//!
//! Every lookup and connect is bounded by one connect and one response timeout. Calls on different clones share
//! one connection and one lookup at a time: a failover costs one lookup, not one per call.
//!
//! What a failover costs: writes the old primary acknowledged but had not yet sent to the replica
//! are lost with it. For corral that is a lease (another replica then leads: one extra upstream
//! fetch for that key) or a value (fetched again on the next miss); a commit whose lease is gone
//! is refused by its script, so nothing wrong is ever stored.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::StreamExt;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use redis::{
    Client, Cmd, ConnectionInfo, ErrorKind, Pipeline, ProtocolVersion, RedisError, RedisFuture,
    RedisResult, ServerErrorKind, Value,
};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::{
    ConnectError, SentinelTarget, Settings, bounded, manager, node_info, redis_settings, tcp,
};

/// The channel on which sentinels announce a new primary:
/// `<master name> <old ip> <old port> <new ip> <new port>`.
const SWITCH_MASTER: &str = "+switch-master";

/// First pause between two lookups while following a failover; doubled up to
/// [`FOLLOW_MAX_DELAY`].
const FOLLOW_MIN_DELAY: Duration = Duration::from_millis(50);
const FOLLOW_MAX_DELAY: Duration = Duration::from_millis(500);

/// Longest pause between two attempts to subscribe to a sentinel's announcements.
const WATCH_MAX_DELAY: Duration = Duration::from_secs(2);

/// How long a call that lost the primary waits for the sentinels to name a new one: one connect
/// and three answers, as long as one store call may take.
pub(crate) fn follow_window(settings: &Settings) -> Duration {
    settings.connect_timeout + 3 * settings.response_timeout
}

/// Asks the sentinels for the primary.
pub(crate) struct Resolver {
    /// The redis crate's sentinel client (it caches one connection per sentinel); one lookup at a
    /// time.
    sentinel: tokio::sync::Mutex<Sentinel>,
    /// The name the sentinels know the primary by.
    master: String,
    /// Credentials, database, protocol and TCP settings of the data nodes.
    node: SentinelNodeConnectionInfo,
    /// The sentinels' connection infos (with the sentinels' credentials), for the watcher.
    sentinels: Vec<ConnectionInfo>,
    /// For messages: master and sentinels, no credentials.
    describe: String,
}

impl Resolver {
    pub(crate) fn new(
        target: &SentinelTarget,
        settings: &Settings,
    ) -> Result<Resolver, ConnectError> {
        let sentinels: Vec<ConnectionInfo> = (target.sentinels.iter())
            .map(|node| node_info(node, &target.sentinel_auth, 0, ProtocolVersion::RESP2))
            .collect();
        let describe = super::Target::Sentinel(target.clone()).describe();
        let sentinel = Sentinel::build(sentinels.clone())
            .map_err(|e| ConnectError(format!("redis {describe}: {e}")))?;
        let node = SentinelNodeConnectionInfo::default()
            .set_redis_connection_info(redis_settings(
                &target.node_auth,
                target.db,
                settings.protocol,
            ))
            .set_tcp_settings(tcp());
        Ok(Resolver {
            sentinel: tokio::sync::Mutex::new(sentinel),
            master: target.master.clone(),
            node,
            sentinels,
            describe,
        })
    }

    /// A client for the primary the sentinels name now, which has confirmed it is one; bounded
    /// by one connect and one answer.
    pub(crate) async fn primary(&self, settings: &Settings) -> Result<Client, ConnectError> {
        let limit = settings.connect_timeout + settings.response_timeout;
        bounded(limit, &format!("redis {}", self.describe), async {
            let mut sentinel = self.sentinel.lock().await;
            sentinel
                .async_master_for(&self.master, Some(&self.node))
                .await
        })
        .await
    }
}

/// The connection in use and which one it is.
#[derive(Clone)]
struct Primary {
    /// Incremented each time the connection moves to another primary.
    generation: u64,
    /// `host:port` of the primary, to tell a move from a blink.
    addr: String,
    manager: ConnectionManager,
}

struct Shared {
    resolver: Resolver,
    settings: Settings,
    current: Mutex<Primary>,
    /// One lookup at a time; the others wait for its result.
    following: tokio::sync::Mutex<()>,
    /// Publishes [`Primary::generation`], so the bus can move its subscription as well.
    changes: watch::Sender<u64>,
    /// The `+switch-master` watcher, stopped with the last clone.
    watcher: Mutex<Option<AbortHandle>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(watcher) = lock(&self.watcher).take() {
            watcher.abort();
        }
    }
}

/// A connection to the current primary; clones share it (see the module docs).
#[derive(Clone)]
pub struct SentinelConn {
    shared: Arc<Shared>,
    db: i64,
}

impl SentinelConn {
    /// Looks the primary up and connects to it; fails when no sentinel names a primary that
    /// answers within the connect timeout.
    pub async fn connect(
        target: &SentinelTarget,
        settings: &Settings,
    ) -> Result<SentinelConn, ConnectError> {
        let resolver = Resolver::new(target, settings)?;
        let client = resolver.primary(settings).await?;
        let addr = client.get_connection_info().addr().to_string();
        let manager = manager(client, settings.manager_config(), settings).await?;
        let sentinels = resolver.sentinels.clone();
        let shared = Arc::new(Shared {
            resolver,
            settings: settings.clone(),
            current: Mutex::new(Primary {
                generation: 0,
                addr,
                manager,
            }),
            following: tokio::sync::Mutex::new(()),
            changes: watch::channel(0).0,
            watcher: Mutex::new(None),
        });
        let watcher = tokio::spawn(watch_switches(
            Arc::downgrade(&shared),
            sentinels,
            target.master.clone(),
        ));
        *lock(&shared.watcher) = Some(watcher.abort_handle());
        Ok(SentinelConn {
            shared,
            db: target.db,
        })
    }

    /// Changes each time the connection moves to another primary.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    async fn request(&self, cmd: &Cmd) -> RedisResult<Value> {
        let primary = self.shared.current();
        let mut manager = primary.manager;
        match manager.req_packed_command(cmd).await {
            Err(error) if lost_primary(&error) => {
                if !follow(&self.shared, primary.generation).await {
                    return Err(error);
                }
                self.shared.current().manager.req_packed_command(cmd).await
            }
            other => other,
        }
    }

    async fn request_pipeline(
        &self,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let primary = self.shared.current();
        let mut manager = primary.manager;
        match manager.req_packed_commands(pipeline, offset, count).await {
            Err(error) if lost_primary(&error) => {
                if !follow(&self.shared, primary.generation).await {
                    return Err(error);
                }
                let mut manager = self.shared.current().manager;
                manager.req_packed_commands(pipeline, offset, count).await
            }
            other => other,
        }
    }
}

impl Shared {
    fn current(&self) -> Primary {
        lock(&self.current).clone()
    }
}

/// Whether an error may mean that the connection no longer leads to the primary.
fn lost_primary(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || matches!(
            error.kind(),
            ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
        )
}

/// Moves the connection to the primary the sentinels name, unless it already moved past
/// `seen`; true when the connection now leads somewhere else than at generation `seen`. Waits at
/// most [`follow_window`] for a primary that answers.
async fn follow(shared: &Shared, seen: u64) -> bool {
    let _one_at_a_time = shared.following.lock().await;
    let current = shared.current();
    if current.generation != seen {
        return true;
    }
    let settings = &shared.settings;
    let deadline = Instant::now() + follow_window(settings);
    let mut delay = FOLLOW_MIN_DELAY;
    loop {
        match shared.resolver.primary(settings).await {
            Ok(client) => {
                let addr = client.get_connection_info().addr().to_string();
                if addr == current.addr {
                    // The same primary answers: the connection blinked, the manager reconnects.
                    return false;
                }
                match manager(client, settings.manager_config(), settings).await {
                    Ok(manager) => {
                        let generation = seen + 1;
                        tracing::warn!(from = %current.addr, to = %addr, "redis: following the sentinels to a new primary");
                        *lock(&shared.current) = Primary {
                            generation,
                            addr,
                            manager,
                        };
                        shared.changes.send_replace(generation);
                        return true;
                    }
                    Err(error) => {
                        tracing::debug!(%error, "redis: the new primary did not answer yet")
                    }
                }
            }
            Err(error) => tracing::debug!(%error, "redis: no primary named yet"),
        }
        if Instant::now() + delay >= deadline {
            return false;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(FOLLOW_MAX_DELAY);
    }
}

/// Keeps a subscription to `+switch-master` on one sentinel after another, and follows each
/// announcement for `master`. Runs until the connection is dropped (which aborts it).
async fn watch_switches(shared: Weak<Shared>, sentinels: Vec<ConnectionInfo>, master: String) {
    let mut delay = FOLLOW_MIN_DELAY;
    let mut next = 0;
    loop {
        let Some(settings) = shared.upgrade().map(|s| s.settings.clone()) else {
            return;
        };
        let info = sentinels[next % sentinels.len()].clone();
        next += 1;
        let addr = info.addr().to_string();
        let subscribed = bounded(
            settings.connect_timeout + settings.response_timeout,
            &format!("sentinel at {addr}"),
            async {
                let mut pubsub = Client::open(info)?.get_async_pubsub().await?;
                pubsub.subscribe(SWITCH_MASTER).await?;
                Ok::<_, RedisError>(pubsub)
            },
        )
        .await;
        match subscribed {
            Ok(pubsub) => {
                delay = FOLLOW_MIN_DELAY;
                let mut messages = pubsub.into_on_message();
                while let Some(message) = messages.next().await {
                    let payload: String = message.get_payload().unwrap_or_default();
                    if payload.split(' ').next() != Some(master.as_str()) {
                        continue;
                    }
                    let Some(shared) = shared.upgrade() else {
                        return;
                    };
                    tracing::info!(%payload, "redis: a sentinel announced a new primary");
                    let seen = shared.current().generation;
                    follow(&shared, seen).await;
                }
                tracing::debug!(%addr, "redis: lost the sentinel's announcements; trying the next sentinel");
            }
            Err(error) => tracing::debug!(%error, "redis: could not subscribe to a sentinel"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(WATCH_MAX_DELAY);
    }
}

impl ConnectionLike for SentinelConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(self.request(cmd))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(self.request_pipeline(pipeline, offset, count))
    }

    fn get_db(&self) -> i64 {
        self.db
    }
}

/// Locks a mutex whose data stays valid even if a holder panicked.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
