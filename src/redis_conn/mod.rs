//! How corral reaches Redis, shared by the Redis store and the Redis bus: one server, a primary
//! found through Sentinel and followed across failovers, or a Redis Cluster.
//!
//! [`Target`] is the parsed URL (see [`target`] for the three forms). [`RedisConn`] is one
//! multiplexed connection of any form; it implements [`redis::aio::ConnectionLike`], so the store's
//! scripts (EVALSHA with the NOSCRIPT fallback of [`redis::Script`]) and the bus's commands run
//! through it unchanged. Every form keeps the same properties: a bounded connect (TCP connect plus
//! handshake), a bounded response, TCP_NODELAY (each call is one small request waiting for one
//! small reply; Nagle's algorithm would hold it back waiting for an ACK), and credentials.
//!
//! - **Single**: a [`ConnectionManager`] that reconnects by itself.
//! - **Sentinel**: [`SentinelConn`]: a connection manager on the current primary, replaced when a
//!   call meets a lost connection or a read-only replica, and when a sentinel announces
//!   `+switch-master`; writes and lease scripts only ever go to the primary.
//! - **Cluster**: the redis crate's cluster connection. Every script names only keys of one cache
//!   key, which share a hash tag (docs/design.md), so each runs on the one node owning that slot; the
//!   client follows MOVED and ASK redirections, and SCRIPT LOAD (the NOSCRIPT fallback) goes to
//!   every primary.
//!
//! [`SubscriptionSource`] says where the bus's subscription connection goes: that one server, the
//! current primary, or the next cluster node in turn (classic pub/sub reaches every node of a
//! cluster, so any node will do; see `bus/redis.rs`).

pub mod sentinel;
pub mod target;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::io::tcp::TcpSettings;
use redis::{
    Client, Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Pipeline, ProtocolVersion,
    RedisConnectionInfo, RedisFuture, Value,
};

pub use sentinel::SentinelConn;
pub use target::{Auth, ClusterTarget, Node, SentinelTarget, Target, TargetError};

/// How connections of any form are made.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Longest wait for one TCP connect plus handshake (and, with Sentinel, one lookup of the
    /// primary).
    pub connect_timeout: Duration,
    /// Longest wait for the answer to one command.
    pub response_timeout: Duration,
    /// RESP2 or RESP3 (the bus needs RESP3's push frames).
    pub protocol: ProtocolVersion,
    /// Reconnect attempts a connection manager makes on its own after one failed; 0 makes a call
    /// that finds the connection down fail at once (and start one new attempt in the background).
    pub retries: usize,
    /// Longest pause between a manager's own reconnect attempts, when it makes any.
    pub max_retry_delay: Duration,
}

impl Settings {
    /// Outer bound of one script call: a reconnect plus EVALSHA, SCRIPT LOAD and EVALSHA again;
    /// with Sentinel, also the wait for a new primary ([`sentinel`] module docs). The inner
    /// timeouts normally fire first; this one guards against any wait that has none of its own.
    pub fn call_deadline(&self, target: &Target) -> Duration {
        let call = self.connect_timeout + 3 * self.response_timeout;
        match target {
            Target::Sentinel(_) => call + sentinel::follow_window(self),
            _ => call,
        }
    }

    /// A connection manager's settings; a push sender and resubscription are the caller's to add.
    pub fn manager_config(&self) -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.response_timeout))
            .set_number_of_retries(self.retries)
            .set_max_delay(self.max_retry_delay)
    }
}

/// Why a connection could not be made; the message never carries a password.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct ConnectError(pub String);

/// TCP settings of every connection: TCP_NODELAY on (see the module docs).
pub(crate) fn tcp() -> TcpSettings {
    TcpSettings::default().set_nodelay(true)
}

/// The connection info of one node with the given credentials, database and protocol.
pub(crate) fn node_info(
    node: &Node,
    auth: &Auth,
    db: i64,
    protocol: ProtocolVersion,
) -> ConnectionInfo {
    let addr = ConnectionAddr::Tcp(node.host.clone(), node.port);
    let info = addr
        .into_connection_info()
        .expect("a tcp address is always a valid connection info");
    info.set_redis_settings(redis_settings(auth, db, protocol))
        .set_tcp_settings(tcp())
}

/// Credentials, database and protocol, as the redis crate takes them.
pub(crate) fn redis_settings(
    auth: &Auth,
    db: i64,
    protocol: ProtocolVersion,
) -> RedisConnectionInfo {
    let mut settings = RedisConnectionInfo::default()
        .set_db(db)
        .set_protocol(protocol);
    if let Some(username) = &auth.username {
        settings = settings.set_username(username);
    }
    if let Some(password) = &auth.password {
        settings = settings.set_password(password);
    }
    settings
}

/// A single server's connection info with TCP_NODELAY and the protocol asked for.
fn single_info(info: &ConnectionInfo, protocol: ProtocolVersion) -> ConnectionInfo {
    let tcp = info.tcp_settings().clone().set_nodelay(true);
    let redis = info.redis_settings().clone().set_protocol(protocol);
    info.clone().set_tcp_settings(tcp).set_redis_settings(redis)
}

/// Runs `connect` under `limit`, naming `what` in the error.
pub(crate) async fn bounded<T, E: std::fmt::Display>(
    limit: Duration,
    what: &str,
    connect: impl Future<Output = Result<T, E>>,
) -> Result<T, ConnectError> {
    match tokio::time::timeout(limit, connect).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(ConnectError(format!("{what}: {e}"))),
        Err(_) => Err(ConnectError(format!(
            "{what}: no connection within {limit:?}"
        ))),
    }
}

/// A connection manager on one server.
pub(crate) async fn manager(
    client: Client,
    config: ConnectionManagerConfig,
    settings: &Settings,
) -> Result<ConnectionManager, ConnectError> {
    let addr = client.get_connection_info().addr().to_string();
    // The manager's connect timeout covers TCP connect and handshake; this outer one also covers
    // DNS and anything else that has none, so connecting never hangs.
    let outer = settings.connect_timeout + settings.response_timeout;
    bounded(
        outer,
        &format!("redis at {addr}"),
        ConnectionManager::new_with_config(client, config),
    )
    .await
}

/// One multiplexed connection of any form; clones share it.
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Sentinel(SentinelConn),
    Cluster(ClusterConnection),
}

impl RedisConn {
    /// Connects (one attempt per node, each bounded by the connect timeout); fails when the
    /// server, the primary or the cluster cannot be reached.
    pub async fn connect(target: &Target, settings: &Settings) -> Result<RedisConn, ConnectError> {
        match target {
            Target::Single(info) => {
                let client = Client::open(single_info(info, settings.protocol))
                    .map_err(|e| ConnectError(format!("redis at {}: {e}", info.addr())))?;
                let conn = manager(client, settings.manager_config(), settings).await?;
                Ok(RedisConn::Single(conn))
            }
            Target::Sentinel(target) => Ok(RedisConn::Sentinel(
                SentinelConn::connect(target, settings).await?,
            )),
            Target::Cluster(target) => Ok(RedisConn::Cluster(cluster(target, settings).await?)),
        }
    }

    /// With Sentinel, a receiver that changes each time the connection moved to a new primary.
    pub fn primary_changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        match self {
            RedisConn::Sentinel(conn) => Some(conn.changes()),
            _ => None,
        }
    }
}

/// Cluster requests are retried this often on the client's own (MOVED, ASK, TRYAGAIN, a node
/// reconnecting); the store's call deadline bounds them all.
const CLUSTER_RETRIES: u32 = 5;

async fn cluster(
    target: &ClusterTarget,
    settings: &Settings,
) -> Result<ClusterConnection, ConnectError> {
    let seeds: Vec<ConnectionInfo> = (target.seeds.iter())
        .map(|node| node_info(node, &target.auth, 0, settings.protocol))
        .collect();
    let mut builder = ClusterClientBuilder::new(seeds)
        .connection_timeout(settings.connect_timeout)
        .response_timeout(settings.response_timeout)
        // Each attempt is bounded by the response timeout; the caller's deadline bounds the
        // whole request with its redirections.
        .overall_response_timeout(None)
        .retries(CLUSTER_RETRIES)
        .use_protocol(settings.protocol)
        .tcp_settings(tcp());
    if let Some(username) = &target.auth.username {
        builder = builder.username(username);
    }
    if let Some(password) = &target.auth.password {
        builder = builder.password(password);
    }
    let seeds = Target::Cluster(target.clone()).describe();
    let client = builder
        .build()
        .map_err(|e| ConnectError(format!("redis {seeds}: {e}")))?;
    let outer = settings.connect_timeout + settings.response_timeout;
    bounded(
        outer,
        &format!("redis {seeds}"),
        client.get_async_connection(),
    )
    .await
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(conn) => conn.req_packed_command(cmd),
            RedisConn::Sentinel(conn) => conn.req_packed_command(cmd),
            RedisConn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            RedisConn::Sentinel(conn) => conn.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(conn) => conn.get_db(),
            RedisConn::Sentinel(conn) => conn.get_db(),
            RedisConn::Cluster(conn) => conn.get_db(),
        }
    }
}

/// Where the bus's subscription connection goes; asked again each time it must be rebuilt.
pub struct SubscriptionSource {
    kind: SourceKind,
}

enum SourceKind {
    /// The one server.
    Single(Client),
    /// The primary, as the sentinels name it at the time.
    Sentinel(sentinel::Resolver),
    /// The cluster's seed nodes, in turn.
    Cluster {
        seeds: Vec<Client>,
        next: AtomicUsize,
    },
}

impl SubscriptionSource {
    pub fn new(target: &Target, settings: &Settings) -> Result<SubscriptionSource, ConnectError> {
        let open = |info: ConnectionInfo| {
            let addr = info.addr().to_string();
            Client::open(info).map_err(|e| ConnectError(format!("redis at {addr}: {e}")))
        };
        let kind = match target {
            Target::Single(info) => SourceKind::Single(open(single_info(info, settings.protocol))?),
            Target::Sentinel(target) => {
                SourceKind::Sentinel(sentinel::Resolver::new(target, settings)?)
            }
            Target::Cluster(target) => SourceKind::Cluster {
                seeds: (target.seeds.iter())
                    .map(|node| open(node_info(node, &target.auth, 0, settings.protocol)))
                    .collect::<Result<_, _>>()?,
                next: AtomicUsize::new(0),
            },
        };
        Ok(SubscriptionSource { kind })
    }

    /// Whether the source is one fixed server, so that a manager that lost its connection may
    /// reconnect to the same address by itself; otherwise a lost connection means asking again.
    pub fn is_fixed(&self) -> bool {
        matches!(self.kind, SourceKind::Single(_))
    }

    /// The server to subscribe on now.
    pub async fn client(&self, settings: &Settings) -> Result<Client, ConnectError> {
        match &self.kind {
            SourceKind::Single(client) => Ok(client.clone()),
            SourceKind::Sentinel(resolver) => resolver.primary(settings).await,
            SourceKind::Cluster { seeds, next } => {
                let i = next.fetch_add(1, Ordering::Relaxed) % seeds.len();
                Ok(seeds[i].clone())
            }
        }
    }
}
