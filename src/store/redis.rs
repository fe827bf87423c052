//! The Redis store: the protocol as one Lua script per operation (docs/design.md, "Store protocol: Redis").
//!
//! Each cache key owns three Redis keys that share the hash tag `{<hex digest>}`, so they live in one
//! Cluster slot and every script can name all of them in KEYS:
//!
//! - `<ns>:{<hex>}:v`: the stored value (PX = the ttl handed to commit),
//! - `<ns>:{<hex>}:l`: the lease, a hash of `token`, `fence`, `node` and `start` (PX = lease ttl),
//! - `<ns>:{<hex>}:p`: the pass marker (PX = pass ttl),
//! - `<ns>:{<hex>}:f`: for a value with a stale window, when its freshness ends (the server's clock
//!   in ms; PX = the value's). A value without it is fresh for as long as it exists.
//!
//! Each route owns, under the hash tag `{route:<name>}`, its generation counter
//! `<ns>:{route:<name>}:g` (no expiry) and its path index: `<ns>:{route:<name>}:pe` (member
//! `<path>\0<hex>`, scored by expiry) and `<ns>:{route:<name>}:px` (the same members scored 0, read
//! by prefix). Each surrogate tag owns `<ns>:t:{<tag>}` (member `<hex>`, scored by expiry). An index
//! write prunes up to 64 lapsed members, forgets the soonest-expiring past its cap, and extends the
//! set's PX to its longest entry; a prefix read is O(log N + M), a tag read O(log N + M). Each
//! index is its own script call (its own slot), never part of a key's scripts.
//!
//! Scripts run by EVALSHA; [`redis::Script`] falls back to SCRIPT LOAD and a second EVALSHA when
//! the server answers NOSCRIPT (after a restart, failover or SCRIPT FLUSH). None of them blocks.
//!
//! With [`RedisStoreConfig::announce`] the fenced writes PUBLISH the caller's event on
//! [`crate::bus::redis_channel`] inside the same script, so an event is published exactly when the
//! write happened. Fences are the server clock in microseconds; see `redis/acquire.lua`.
//!
//! Every call has a deadline: the connection's response timeout answers
//! [`StoreError::Timeout`], and an outer deadline covers a reconnect in progress as well.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::{ErrorKind, ProtocolVersion, RedisError, Script, ServerErrorKind, Value};

use super::{
    Acquired, Fenced, IndexEntry, KeyStatus, LeaseId, LeaseRequest, MAX_INDEXED_PER_ROUTE,
    MAX_INDEXED_PER_TAG, Refresh, Renewed, Revalidation, Selector, Store, StoreError, Token, Touch,
};
use crate::bus::{Event, redis_channel};
use crate::credentials::Credentials;
use crate::key::KeyHash;
use crate::redis_conn::{RedisConn, Settings};

/// How the store reaches Redis and whether its scripts announce events.
#[derive(Clone)]
pub struct RedisStoreConfig {
    /// Any form of Redis URL: `redis://[user:password@]host:port[/db]` (or `redis+unix://`),
    /// `redis+sentinel://...` or `redis+cluster://...`; any password in it is never logged or put
    /// into an error.
    pub url: String,
    /// Prefix of every key and of the event channel, so several deployments can share one server.
    pub namespace: String,
    /// Longest wait for one TCP connect plus handshake, at start and on every reconnect
    /// (default 2 s). An unreachable server fails [`RedisStore::connect`] after about this long.
    pub connect_timeout: Duration,
    /// Longest wait for the answer to one command (default 1 s); past it a call answers
    /// [`StoreError::Timeout`], which the engine retries with the same token.
    pub response_timeout: Duration,
    /// Whether the scripts PUBLISH the event they are handed on
    /// [`crate::bus::redis_channel`]`(namespace)`: true when the bus is Redis pub/sub on this same
    /// server, so that event and write are one atomic step.
    pub announce: bool,
    /// Credentials and TLS beyond what the url carries.
    pub credentials: Credentials,
}

impl RedisStoreConfig {
    /// Default [`RedisStoreConfig::connect_timeout`].
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
    /// Default [`RedisStoreConfig::response_timeout`].
    pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

    /// Default timeouts, announcing off.
    pub fn new(url: impl Into<String>, namespace: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            namespace: namespace.into(),
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            response_timeout: Self::DEFAULT_RESPONSE_TIMEOUT,
            announce: false,
            credentials: Credentials::default(),
        }
    }
}

// Written by hand so that a password in the url never reaches a log line.
impl fmt::Debug for RedisStoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStoreConfig")
            .field("url", &crate::credentials::redact(&self.url))
            .field("namespace", &self.namespace)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("announce", &self.announce)
            .field("credentials", &self.credentials)
            .finish()
    }
}

/// Without a password nothing is sent at connect, and a server that wants one answers every
/// command `NOAUTH`: one PING at start turns that (or an ACL user without rights) into a start
/// error with the server's reason, instead of a store on which every call fails. Other failures
/// of this PING are left to the calls, which retry them.
async fn refuse_unauthenticated(conn: &RedisConn, settings: &Settings) -> Result<(), StoreError> {
    let (mut conn, ping) = (conn.clone(), redis::cmd("PING"));
    let reply = ping.query_async::<Value>(&mut conn);
    match tokio::time::timeout(settings.response_timeout, reply).await {
        Ok(Err(e))
            if e.code()
                .is_some_and(|c| matches!(c, "NOAUTH" | "WRONGPASS" | "NOPERM")) =>
        {
            Err(StoreError::Unavailable(format!(
                "redis refused corral: {e}"
            )))
        }
        _ => Ok(()),
    }
}

/// Reconnect attempts the connection manager makes on its own after one failed. None: a call that
/// finds the connection down fails at once with [`StoreError::Unavailable`] (and starts one new
/// attempt in the background), so callers learn of an outage within one connect timeout instead of
/// sleeping through a backoff schedule; the engine decides what to do about it.
const RECONNECT_RETRIES: usize = 0;

/// A value or pass marker that has no expiry at all (written by something other than corral) is
/// reported with this much time left: a year, i.e. "no expiry", kept small enough that adding it to
/// an `Instant` can never overflow.
pub const NO_EXPIRY: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// The compiled scripts; [`Script`] keeps the source for the NOSCRIPT fallback and its SHA1.
struct Scripts {
    /// ACQUIRE and PEEK: one script, so both read the key in the same precedence.
    acquire: Script,
    /// RENEW, fenced by the token.
    renew: Script,
    /// COMMIT: value, lease end and event in one atomic step.
    commit: Script,
    /// COMMIT of a revalidated value: rewrites the stored value's head, keeps its body.
    revalidate: Script,
    /// RELEASE (failed or abandoned flights).
    release: Script,
    /// GIVEUP (uncacheable answers): lease end plus pass marker.
    give_up: Script,
    /// PURGE: all three keys, always announced.
    purge: Script,
    /// DISCARD: compare-and-delete of the value.
    discard: Script,
    /// STATUS: read-only.
    status: Script,
    /// ROUTE GENERATION: read-only.
    route_generation: Script,
    /// BUMP GENERATION: a whole route's purge, announced.
    bump_generation: Script,
    /// INDEX: one member of a route's path index or a tag's index.
    index: Script,
    /// INDEXED PREFIX: a route's keys under a path prefix.
    indexed_prefix: Script,
    /// INDEXED TAG: a tag's live keys.
    indexed_tag: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            acquire: Script::new(include_str!("redis/acquire.lua")),
            renew: Script::new(include_str!("redis/renew.lua")),
            commit: Script::new(include_str!("redis/commit.lua")),
            revalidate: Script::new(include_str!("redis/revalidate.lua")),
            release: Script::new(include_str!("redis/release.lua")),
            give_up: Script::new(include_str!("redis/give_up.lua")),
            purge: Script::new(include_str!("redis/purge.lua")),
            discard: Script::new(include_str!("redis/discard.lua")),
            status: Script::new(include_str!("redis/status.lua")),
            route_generation: Script::new(include_str!("redis/route_generation.lua")),
            bump_generation: Script::new(include_str!("redis/bump_generation.lua")),
            index: Script::new(include_str!("redis/index.lua")),
            indexed_prefix: Script::new(include_str!("redis/indexed_prefix.lua")),
            indexed_tag: Script::new(include_str!("redis/indexed_tag.lua")),
        }
    }
}

/// The shared store on Redis; clones share one multiplexed connection.
#[derive(Clone)]
pub struct RedisStore {
    /// One multiplexed connection of the URL's form (one server, Sentinel or Cluster) that
    /// reconnects by itself; cloned per call, which is cheap.
    conn: RedisConn,
    /// Scripts shared by clones (their SHA1s are computed once).
    scripts: Arc<Scripts>,
    /// Key prefix, from the config.
    namespace: Arc<str>,
    /// [`redis_channel`] of the namespace, passed to the scripts when announcing.
    channel: Arc<str>,
    /// Whether the scripts publish events, from the config.
    announce: bool,
    /// Outer bound of one call ([`Settings::call_deadline`]).
    call_deadline: Duration,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("namespace", &self.namespace)
            .field("announce", &self.announce)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects (one attempt, bounded by `connect_timeout`); any failure is
    /// [`StoreError::Unavailable`].
    pub async fn connect(config: RedisStoreConfig) -> Result<RedisStore, StoreError> {
        let target = crate::credentials::redis::target(&config.url, &config.credentials)
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let settings = Settings {
            connect_timeout: config.connect_timeout,
            response_timeout: config.response_timeout,
            protocol: ProtocolVersion::RESP2,
            retries: RECONNECT_RETRIES,
            max_retry_delay: config.connect_timeout,
        };
        let conn = RedisConn::connect(&target, &settings)
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        refuse_unauthenticated(&conn, &settings).await?;
        Ok(RedisStore {
            conn,
            scripts: Arc::new(Scripts::new()),
            channel: redis_channel(&config.namespace).into(),
            namespace: config.namespace.into(),
            announce: config.announce,
            call_deadline: settings.call_deadline(&target),
        })
    }

    /// The Redis names of `key`'s value, lease and pass marker, in that order.
    pub fn key_names(&self, key: &KeyHash) -> [String; 3] {
        let base = format!("{}:{{{}}}", self.namespace, key.to_hex());
        [
            format!("{base}:v"),
            format!("{base}:l"),
            format!("{base}:p"),
        ]
    }

    /// The Redis name of one of a route's keys (`g`, `pe` or `px`); all share the route's hash tag.
    pub fn route_key_name(&self, route: &str, suffix: &str) -> String {
        format!("{}:{{route:{route}}}:{suffix}", self.namespace)
    }

    /// The Redis name of a surrogate tag's index.
    pub fn tag_key_name(&self, tag: &str) -> String {
        format!("{}:t:{{{tag}}}", self.namespace)
    }

    /// The Redis name of `key`'s fresh-until marker (beside its value, same hash tag).
    pub fn fresh_key_name(&self, key: &KeyHash) -> String {
        format!("{}:{{{}}}:f", self.namespace, key.to_hex())
    }

    /// Runs one prepared script invocation under the call deadline.
    async fn run(
        &self,
        op: &'static str,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<Value, StoreError> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.call_deadline, invocation.invoke_async(&mut conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(map_error(op, e)),
            Err(_) => Err(StoreError::Timeout { op }),
        }
    }

    /// Announce flag, channel and event as the scripts take them; nothing is sent when not
    /// announcing.
    fn announce_args<'a>(&'a self, event: &'a Bytes) -> (&'static str, &'a str, &'a [u8]) {
        if self.announce {
            ("1", &self.channel, event)
        } else {
            ("0", "", &[])
        }
    }

    async fn acquire_or_peek(
        &self,
        op: &'static str,
        key: &KeyHash,
        lease: Option<&LeaseRequest>,
        touch: Option<Touch>,
    ) -> Result<Acquired, StoreError> {
        let [v, l, p] = self.key_names(key);
        let f = self.fresh_key_name(key);
        let (token, node, lease_ms, mode) = match lease {
            Some(lease) => (
                lease.token.to_hex(),
                &*lease.node,
                millis(lease.ttl),
                if op == "early" { "early" } else { "acquire" },
            ),
            None => (String::new(), "", 0, "peek"),
        };
        let lease_id = lease
            .map(|lease| lease.token.lease_id().to_hex())
            .unwrap_or_default();
        // A zero sliding ttl would mean "expire now"; treat it as absolute expiry instead. Early
        // mode reads the slack alone: how near the end of its freshness a value must be.
        let (touch_ms, slack_ms) = match touch {
            Some(t) if !t.ttl.is_zero() || op == "early" => (
                if t.ttl.is_zero() { 0 } else { millis(t.ttl) },
                u64::try_from(t.slack.as_millis()).unwrap_or(u64::MAX),
            ),
            _ => (0, 0),
        };
        let mut invocation = self.scripts.acquire.prepare_invoke();
        invocation
            .key(&v)
            .key(&l)
            .key(&p)
            .key(&f)
            .arg(&token)
            .arg(node)
            .arg(lease_ms)
            .arg(touch_ms)
            .arg(slack_ms)
            .arg(mode)
            .arg(lease_id);
        let reply = self.run(op, &invocation).await?;
        parse_acquired(op, reply)
    }

    async fn fenced(
        &self,
        op: &'static str,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<bool, StoreError> {
        let reply = self.run(op, invocation).await?;
        flag(op, reply)
    }
}

/// Milliseconds for PX / PEXPIRE, at least 1 (Redis rejects 0 and would delete on PEXPIRE 0).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Timeouts may have been applied on the server, so they are told apart: the engine retries them
/// with the same token. Lost or refused connections and a server that cannot serve right now are
/// unavailability; anything else means the reply was not what the scripts return.
fn map_error(op: &'static str, e: RedisError) -> StoreError {
    if e.is_timeout() {
        return StoreError::Timeout { op };
    }
    let unavailable = e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ReadOnly
            ) | ErrorKind::AuthenticationFailed
        )
        // Another script is running past lua-time-limit.
        || e.code() == Some("BUSY");
    if unavailable {
        StoreError::Unavailable(format!("{op}: {e}"))
    } else {
        StoreError::Protocol(format!("{op}: {e}"))
    }
}

fn protocol(op: &'static str, what: impl fmt::Display) -> StoreError {
    StoreError::Protocol(format!("{op}: {what}"))
}

/// A script's 0/1 answer.
fn flag(op: &'static str, reply: Value) -> Result<bool, StoreError> {
    match reply {
        Value::Int(0) => Ok(false),
        Value::Int(1) => Ok(true),
        other => Err(protocol(op, format_args!("expected 0 or 1, got {other:?}"))),
    }
}

/// A `{TAG, ...}` reply, split into its tag and the rest.
fn tagged(
    op: &'static str,
    reply: Value,
) -> Result<(Vec<u8>, std::vec::IntoIter<Value>), StoreError> {
    let Value::Array(items) = reply else {
        return Err(protocol(
            op,
            format_args!("expected an array, got {reply:?}"),
        ));
    };
    let mut items = items.into_iter();
    let tag = match items.next() {
        Some(Value::BulkString(tag)) => tag,
        Some(Value::SimpleString(tag)) => tag.into_bytes(),
        other => return Err(protocol(op, format_args!("expected a tag, got {other:?}"))),
    };
    Ok((tag, items))
}

/// A PTTL in milliseconds; -1 (no expiry) is [`NO_EXPIRY`].
fn ttl(op: &'static str, item: Option<Value>) -> Result<Duration, StoreError> {
    match item {
        Some(Value::Int(-1)) => Ok(NO_EXPIRY),
        Some(Value::Int(ms)) if ms >= 0 => Ok(Duration::from_millis(ms as u64)),
        other => Err(protocol(op, format_args!("expected a ttl, got {other:?}"))),
    }
}

/// A stored value in a reply.
fn value(op: &'static str, item: Option<Value>) -> Result<Bytes, StoreError> {
    match item {
        Some(Value::BulkString(bytes)) => Ok(Bytes::from(bytes)),
        other => Err(protocol(
            op,
            format_args!("expected a value, got {other:?}"),
        )),
    }
}

/// A lease's fence: digits in a string (the server clock in µs), or an integer.
fn fence(op: &'static str, item: Option<Value>) -> Result<u64, StoreError> {
    let fence = match item {
        Some(Value::BulkString(digits)) => std::str::from_utf8(&digits)
            .ok()
            .and_then(|s| s.parse::<u64>().ok()),
        Some(Value::Int(n)) => u64::try_from(n).ok(),
        _ => None,
    };
    fence.ok_or_else(|| protocol(op, "lease has no valid fence"))
}

/// The name of the lease waited on; none for a lease written without one (or a malformed one,
/// which then binds no event).
fn lease_id(item: Option<Value>) -> Option<LeaseId> {
    match item {
        Some(Value::BulkString(hex)) => LeaseId::from_hex(&hex),
        _ => None,
    }
}

fn parse_acquired(op: &'static str, reply: Value) -> Result<Acquired, StoreError> {
    let (tag, mut items) = tagged(op, reply)?;
    Ok(match tag.as_slice() {
        b"HIT" => Acquired::Hit {
            value: value(op, items.next())?,
            ttl_left: ttl(op, items.next())?,
        },
        b"STALE" => {
            let value = value(op, items.next())?;
            let ttl_left = ttl(op, items.next())?;
            let refresh = match items.next() {
                Some(Value::BulkString(who)) if who == b"LEAD" => Refresh::Lead {
                    fence: fence(op, items.next())?,
                },
                Some(Value::BulkString(who)) if who == b"WAIT" => Refresh::Elsewhere {
                    lease_left: ttl(op, items.next())?,
                    lease: lease_id(items.next()),
                },
                Some(Value::BulkString(who)) if who == b"IDLE" => Refresh::Idle,
                other => {
                    return Err(protocol(
                        op,
                        format_args!("expected who refreshes, got {other:?}"),
                    ));
                }
            };
            Acquired::Stale {
                value,
                ttl_left,
                refresh,
            }
        }
        b"PASS" => Acquired::Pass {
            ttl_left: ttl(op, items.next())?,
        },
        b"WAIT" => Acquired::Wait {
            lease_left: ttl(op, items.next())?,
            lease: lease_id(items.next()),
        },
        b"LEAD" => Acquired::Lead {
            fence: fence(op, items.next())?,
        },
        b"EMPTY" => Acquired::Empty,
        other => {
            return Err(protocol(
                op,
                format_args!("unknown answer {:?}", String::from_utf8_lossy(other)),
            ));
        }
    })
}

fn parse_status(op: &'static str, reply: Value) -> Result<KeyStatus, StoreError> {
    let (tag, mut items) = tagged(op, reply)?;
    Ok(match tag.as_slice() {
        b"EXISTS" => KeyStatus::Exists {
            ttl_left: ttl(op, items.next())?,
        },
        b"PENDING" => KeyStatus::Pending {
            lease_left: ttl(op, items.next())?,
        },
        b"PASS" => KeyStatus::Pass {
            ttl_left: ttl(op, items.next())?,
        },
        b"EMPTY" => KeyStatus::Empty,
        other => {
            return Err(protocol(
                op,
                format_args!("unknown answer {:?}", String::from_utf8_lossy(other)),
            ));
        }
    })
}

/// A script's non-negative integer answer.
fn count(op: &'static str, reply: Value) -> Result<u64, StoreError> {
    match reply {
        Value::Int(n) if n >= 0 => Ok(n as u64),
        other => Err(protocol(
            op,
            format_args!("expected a count, got {other:?}"),
        )),
    }
}

fn fenced(done: bool) -> Fenced {
    if done { Fenced::Done } else { Fenced::Lost }
}

#[async_trait]
impl Store for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn announces(&self) -> bool {
        self.announce
    }

    // Its events ride a bus beside it (or its own pub/sub), which others could publish on.
    fn events_are_writes(&self) -> bool {
        false
    }

    async fn acquire(
        &self,
        key: &KeyHash,
        lease: &LeaseRequest,
        touch: Option<Touch>,
    ) -> Result<Acquired, StoreError> {
        self.acquire_or_peek("acquire", key, Some(lease), touch)
            .await
    }

    async fn peek(&self, key: &KeyHash, touch: Option<Touch>) -> Result<Acquired, StoreError> {
        self.acquire_or_peek("peek", key, None, touch).await
    }

    async fn renew(
        &self,
        key: &KeyHash,
        token: Token,
        ttl: Duration,
    ) -> Result<Renewed, StoreError> {
        let [_, l, _] = self.key_names(key);
        let mut invocation = self.scripts.renew.prepare_invoke();
        invocation.key(&l).arg(token.to_hex()).arg(millis(ttl));
        Ok(if self.fenced("renew", &invocation).await? {
            Renewed::Held
        } else {
            Renewed::Lost
        })
    }

    async fn commit_fresh(
        &self,
        key: &KeyHash,
        token: Token,
        value: Bytes,
        fresh: Duration,
        ttl: Duration,
        // PEXPIRE extends a TTL in place, so a sliding value needs nothing special here.
        _sliding: bool,
        event: Bytes,
    ) -> Result<Fenced, StoreError> {
        let [v, l, p] = self.key_names(key);
        let f = self.fresh_key_name(key);
        let (announce, channel, event) = self.announce_args(&event);
        let mut invocation = self.scripts.commit.prepare_invoke();
        invocation
            .key(&v)
            .key(&l)
            .key(&p)
            .key(&f)
            .arg(token.to_hex())
            .arg(value.as_ref())
            .arg(millis(ttl))
            .arg(announce)
            .arg(channel)
            .arg(event)
            .arg(millis(fresh));
        self.fenced("commit", &invocation).await.map(fenced)
    }

    /// Sends the two heads, never the body: the script rewrites the head of the value it holds.
    /// When that value is no longer the revalidated one (it expired, or was written by an older
    /// version), the whole value is committed instead.
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
        let [v, l, p] = self.key_names(key);
        let f = self.fresh_key_name(key);
        let (announce, channel, announced) = self.announce_args(&event);
        let mut invocation = self.scripts.revalidate.prepare_invoke();
        invocation
            .key(&v)
            .key(&l)
            .key(&p)
            .key(&f)
            .arg(token.to_hex())
            .arg(update.old_head.as_ref())
            .arg(update.new_head.as_ref())
            .arg(millis(ttl))
            .arg(announce)
            .arg(channel)
            .arg(announced)
            .arg(millis(fresh));
        match self.run("revalidate", &invocation).await? {
            Value::Int(1) => Ok(Fenced::Done),
            Value::Int(0) => Ok(Fenced::Lost),
            Value::Int(2) => {
                self.commit_fresh(key, token, update.value.clone(), fresh, ttl, sliding, event)
                    .await
            }
            other => Err(protocol(
                "revalidate",
                format_args!("expected 0, 1 or 2, got {other:?}"),
            )),
        }
    }

    async fn lead_refresh(
        &self,
        key: &KeyHash,
        lease: &LeaseRequest,
        within: Duration,
    ) -> Result<Refresh, StoreError> {
        // Early mode reads the touch's slack as `within`; it never touches.
        let within = Touch {
            ttl: Duration::ZERO,
            slack: within,
        };
        match self
            .acquire_or_peek("early", key, Some(lease), Some(within))
            .await?
        {
            Acquired::Stale { refresh, .. } => Ok(refresh),
            Acquired::Empty | Acquired::Hit { .. } => Ok(Refresh::Idle),
            other => Err(protocol(
                "early",
                format_args!("unexpected answer {other:?}"),
            )),
        }
    }

    async fn release(
        &self,
        key: &KeyHash,
        token: Token,
        event: Bytes,
    ) -> Result<Fenced, StoreError> {
        let [_, l, _] = self.key_names(key);
        let (announce, channel, event) = self.announce_args(&event);
        let mut invocation = self.scripts.release.prepare_invoke();
        invocation
            .key(&l)
            .arg(token.to_hex())
            .arg(announce)
            .arg(channel)
            .arg(event);
        self.fenced("release", &invocation).await.map(fenced)
    }

    async fn give_up(
        &self,
        key: &KeyHash,
        token: Token,
        pass_ttl: Duration,
        event: Bytes,
    ) -> Result<Fenced, StoreError> {
        let [v, l, p] = self.key_names(key);
        let f = self.fresh_key_name(key);
        let (announce, channel, event) = self.announce_args(&event);
        let mut invocation = self.scripts.give_up.prepare_invoke();
        invocation
            .key(&l)
            .key(&p)
            .key(&v)
            .key(&f)
            .arg(token.to_hex())
            .arg(millis(pass_ttl))
            .arg(announce)
            .arg(channel)
            .arg(event);
        self.fenced("give_up", &invocation).await.map(fenced)
    }

    async fn purge(&self, key: &KeyHash, event: Bytes) -> Result<bool, StoreError> {
        let [v, l, p] = self.key_names(key);
        let (announce, channel, event) = self.announce_args(&event);
        let mut invocation = self.scripts.purge.prepare_invoke();
        invocation
            .key(&v)
            .key(&l)
            .key(&p)
            .arg(announce)
            .arg(channel)
            .arg(event);
        match self.run("purge", &invocation).await? {
            Value::Int(removed) if removed >= 0 => Ok(removed > 0),
            other => Err(protocol(
                "purge",
                format_args!("expected a count, got {other:?}"),
            )),
        }
    }

    async fn discard(&self, key: &KeyHash, value: &Bytes) -> Result<bool, StoreError> {
        let [v, _, _] = self.key_names(key);
        let mut invocation = self.scripts.discard.prepare_invoke();
        invocation.key(&v).arg(value.as_ref());
        self.fenced("discard", &invocation).await
    }

    async fn route_generation(&self, route: &str) -> Result<u64, StoreError> {
        let mut invocation = self.scripts.route_generation.prepare_invoke();
        invocation.key(self.route_key_name(route, "g"));
        let reply = self.run("route_generation", &invocation).await?;
        count("route_generation", reply)
    }

    async fn bump_generation(&self, route: &str, key: &KeyHash) -> Result<u64, StoreError> {
        let head = Bytes::copy_from_slice(&Event::generation_head(key));
        let (announce, channel, head) = self.announce_args(&head);
        let mut invocation = self.scripts.bump_generation.prepare_invoke();
        invocation
            .key(self.route_key_name(route, "g"))
            .arg(announce)
            .arg(channel)
            .arg(head);
        let reply = self.run("bump_generation", &invocation).await?;
        count("bump_generation", reply)
    }

    async fn index(&self, entry: &IndexEntry) -> Result<(), StoreError> {
        let ttl = millis(entry.ttl);
        let mut member = super::indexed_path(&entry.path).as_bytes().to_vec();
        member.push(0);
        member.extend_from_slice(entry.key.to_hex().as_bytes());
        let mut invocation = self.scripts.index.prepare_invoke();
        invocation
            .key(self.route_key_name(&entry.route, "pe"))
            .key(self.route_key_name(&entry.route, "px"))
            .arg(member)
            .arg(ttl)
            .arg(MAX_INDEXED_PER_ROUTE);
        self.run("index", &invocation).await?;
        // One call per tag: each tag's index is in its own slot.
        for tag in &entry.tags {
            let mut invocation = self.scripts.index.prepare_invoke();
            invocation
                .key(self.tag_key_name(tag))
                .arg(entry.key.to_hex())
                .arg(ttl)
                .arg(MAX_INDEXED_PER_TAG);
            self.run("index", &invocation).await?;
        }
        Ok(())
    }

    async fn indexed(&self, selector: &Selector, limit: usize) -> Result<Vec<KeyHash>, StoreError> {
        let mut invocation;
        match selector {
            Selector::Prefix { route, prefix } => {
                invocation = self.scripts.indexed_prefix.prepare_invoke();
                invocation
                    .key(self.route_key_name(route, "px"))
                    .arg(super::indexed_path(prefix))
                    .arg(limit);
            }
            Selector::Tag(tag) => {
                invocation = self.scripts.indexed_tag.prepare_invoke();
                invocation.key(self.tag_key_name(tag)).arg(limit);
            }
        }
        let reply = self.run("indexed", &invocation).await?;
        let Value::Array(members) = reply else {
            return Err(protocol(
                "indexed",
                format_args!("expected an array, got {reply:?}"),
            ));
        };
        // A member that is not ours (written by something else) is skipped, not an error.
        Ok(members
            .into_iter()
            .filter_map(|member| match member {
                Value::BulkString(bytes) => {
                    let hex = match bytes.iter().rposition(|b| *b == 0) {
                        Some(at) => &bytes[at + 1..],
                        None => &bytes[..],
                    };
                    std::str::from_utf8(hex).ok().and_then(KeyHash::from_hex)
                }
                _ => None,
            })
            .collect())
    }

    async fn status(&self, key: &KeyHash) -> Result<KeyStatus, StoreError> {
        let [v, l, p] = self.key_names(key);
        let mut invocation = self.scripts.status.prepare_invoke();
        invocation.key(&v).key(&l).key(&p);
        let reply = self.run("status", &invocation).await?;
        parse_status("status", reply)
    }
}
