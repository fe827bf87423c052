//! The shared store: values, leases and pass markers, behind one trait.
//!
//! Every implementation speaks the same protocol (docs/design.md, "Store protocol"):
//!
//! - [`Store::acquire`] answers HIT / STALE / PASS / LEAD / WAIT, [`Store::peek`] the same without
//!   ever creating a lease (status and only-if-cached reads).
//! - A value committed with a stale window ([`Store::commit_fresh`]) stays stored past its
//!   freshness; once fresh no more, acquire answers [`Acquired::Stale`] with it and, in the same
//!   atomic step, says who refreshes it: "you lead the refresh" ([`Refresh::Lead`]) to exactly one
//!   caller, who now holds the lease, and "someone refreshes" ([`Refresh::Elsewhere`]) to every
//!   other. The lease and its fenced writes are the usual ones: a refresh's commit replaces the
//!   value, a release leaves the stale value in place. Freshness is measured on the store's clock
//!   where it has one.
//! - [`Store::lead_refresh`] takes the lease over a value that is still fresh but close to its
//!   end (early refresh).
//! - [`Store::renew`], [`Store::commit`], [`Store::release`] (FAIL and ABANDON) and
//!   [`Store::give_up`] are fenced by the owner token: with another token (or none) they change
//!   nothing and answer [`Fenced::Lost`].
//! - [`Store::purge`] removes value, lease and marker, so a build still running under the removed
//!   lease gets `Lost` on commit and never overwrites the purge.
//! - [`Store::status`] is read-only and never touches a TTL.
//! - Invalidation beyond one key: [`Store::route_generation`] and [`Store::bump_generation`] (a
//!   per-route number that is part of every key of the route, so bumping it drops the whole route
//!   at once), and [`Store::index`] / [`Store::indexed`] (which keys a route holds under a path,
//!   and which keys carry a surrogate tag), so a purge by prefix or tag can find its keys.
//!
//! Acquire and renew are idempotent for their own token: a caller whose call timed out on the client
//! retries with the same token, and a lease that the timed-out call did create comes back as LEAD (or
//! `Held`) instead of WAIT.
//!
//! Events: a store that [`Store::announces`] publishes the pre-encoded event it is handed in the same
//! atomic step as the write (one Lua script, one JetStream message); otherwise the engine publishes it
//! on the bus after the store answered, and the safety poll covers an event lost in between.
//!
//! Limits: a store may refuse lease TTLs below [`Store::min_lease_ttl`] (NATS KV counts TTLs in whole
//! seconds) and values above [`Store::max_value_len`] (NATS KV: the server's `max_payload`); the
//! engine checks both before it asks, so neither reaches the store as an error.

pub mod breaker;
pub mod guarded;
pub mod memory;
#[cfg(feature = "nats")]
pub mod nats_kv;
#[cfg(feature = "redis")]
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::key::KeyHash;
pub use crate::lease::{LeaseId, Token};

/// What a flight asks for when it may become the leader.
#[derive(Clone, Debug)]
pub struct LeaseRequest {
    pub token: Token,
    /// Which process holds it (for status and debugging; never compared).
    pub node: Arc<str>,
    /// How long the lease lives unless renewed.
    pub ttl: Duration,
}

/// Sliding expiry: on a hit whose remaining TTL has fallen below `ttl - slack`, set it back to `ttl`.
/// The value itself is never rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Touch {
    pub ttl: Duration,
    /// How far the TTL may fall before a read touches it; throttles the writes a hot key causes.
    pub slack: Duration,
}

/// The answer to [`Store::acquire`] or [`Store::peek`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acquired {
    /// A fresh value exists; `ttl_left` is how long it stays fresh (after any touch).
    Hit { value: Bytes, ttl_left: Duration },
    /// A value past its freshness that the store still keeps for its stale window; `ttl_left` is
    /// how long the store keeps it, `refresh` who refreshes it.
    Stale {
        value: Bytes,
        ttl_left: Duration,
        refresh: Refresh,
    },
    /// A hit-for-pass marker: the key is uncacheable for `ttl_left` more.
    Pass { ttl_left: Duration },
    /// This caller now holds the lease (acquire only).
    Lead { fence: u64 },
    /// Another caller holds the lease; it expires in `lease_left` unless renewed. `lease` names it
    /// (`None` for a lease written without a name, such as one left by an older version): only an
    /// event bound to that name may end the wait with the payload it carries.
    Wait {
        lease_left: Duration,
        lease: Option<LeaseId>,
    },
    /// Nothing at all (peek only).
    Empty,
}

/// Who refreshes a stale value (or one refreshed early).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refresh {
    /// "Stale entry; you lead the refresh": this caller now holds the lease.
    Lead { fence: u64 },
    /// "Stale entry; someone refreshes": another caller holds the lease, for `lease_left` more;
    /// `lease` names it, as in [`Acquired::Wait`].
    Elsewhere {
        lease_left: Duration,
        lease: Option<LeaseId>,
    },
    /// Nobody (peek, which never takes a lease; or no value for an early refresh to replace).
    Idle,
}

/// The answer to a fenced write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fenced {
    /// The token matched; the write happened.
    Done,
    /// The token did not match (expired, taken over or purged); nothing was written.
    Lost,
}

/// A revalidated value for [`Store::commit_revalidated`]: the stored value with a new head (its
/// headers and freshness, as the source's confirmation updated them) and the same body.
#[derive(Clone, Debug)]
pub struct Revalidation {
    /// The whole new value, head and body.
    pub value: Bytes,
    /// The head of the value that was revalidated, as it is stored
    /// ([`crate::envelope::encode_head`]): a store that rewrites heads in place checks that the
    /// stored value still starts with it.
    pub old_head: Bytes,
    /// The head of `value` (`value` up to its body).
    pub new_head: Bytes,
}

/// The answer to [`Store::renew`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renewed {
    Held,
    Lost,
}

/// Read-only state of one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyStatus {
    Exists { ttl_left: Duration },
    Pending { lease_left: Duration },
    Pass { ttl_left: Duration },
    Empty,
}

/// A store call that did not get an answer.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error("store timed out during {op}")]
    Timeout { op: &'static str },
    #[error("store is unavailable: {0}")]
    Unavailable(String),
    #[error("store answered something unexpected: {0}")]
    Protocol(String),
    /// Not tried: the store's circuit breaker is open after calls in a row failed (see
    /// [`breaker`]), so the call failed at once instead of waiting on the network.
    #[error("store is unavailable: not called during {op}, its circuit breaker is open")]
    CircuitOpen { op: &'static str },
}

impl StoreError {
    /// A timeout may have happened after the store applied the call.
    pub fn is_timeout(&self) -> bool {
        matches!(self, StoreError::Timeout { .. })
    }
}

/// One stored (or being stored) key, as the purge indexes know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    /// The route whose path index gets the key.
    pub route: String,
    /// The request path (no query), matched by a prefix purge.
    pub path: String,
    pub key: KeyHash,
    /// Surrogate tags of the response (already checked against [`MAX_TAGS`] and [`MAX_TAG_LEN`]).
    pub tags: Vec<String>,
    /// How long the entry may live in the store; each index lives as long as its longest entry.
    pub ttl: Duration,
}

/// Which indexed keys a purge covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// Keys of `route` whose path starts with `prefix`.
    Prefix { route: String, prefix: String },
    /// Keys whose response carried `tag`.
    Tag(String),
}

/// Most keys one route's path index keeps; past it the entries that expire soonest are forgotten
/// (a prefix purge then misses them; they still expire on their own TTL).
pub const MAX_INDEXED_PER_ROUTE: usize = 100_000;
/// Most bytes of a path a route's path index keeps per key (see [`indexed_path`]), so the index
/// is bounded in bytes as well as in keys, whatever the paths clients send.
pub const MAX_INDEXED_PATH_LEN: usize = 256;

/// What a path index keeps of `path`, and what a prefix purge looks up of its prefix: the first
/// [`MAX_INDEXED_PATH_LEN`] bytes, cut back to a character boundary. A prefix that fits is
/// matched exactly; a longer one matches every key whose path shares its first
/// [`MAX_INDEXED_PATH_LEN`] bytes (a purge of those may drop more than it names, never less).
pub fn indexed_path(path: &str) -> &str {
    if path.len() <= MAX_INDEXED_PATH_LEN {
        return path;
    }
    let mut end = MAX_INDEXED_PATH_LEN;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    &path[..end]
}

/// Most keys one tag's index keeps; past it the entries that expire soonest are forgotten.
pub const MAX_INDEXED_PER_TAG: usize = 10_000;
/// Most surrogate tags indexed per response; the rest are ignored.
pub const MAX_TAGS: usize = 16;
/// Longest surrogate tag, in bytes; longer ones are ignored.
pub const MAX_TAG_LEN: usize = 128;

/// Whether a surrogate tag can be indexed: 1 to [`MAX_TAG_LEN`] visible ASCII characters other
/// than `{`, `}` and `,` (braces would break a Redis hash tag; commas separate tags).
pub fn valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= MAX_TAG_LEN
        && tag
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'{' | b'}' | b','))
}

/// The store protocol; see the module docs.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Short name for logs and metrics (`memory`, `redis`, `nats_kv`).
    fn kind(&self) -> &'static str;

    /// Whether this store publishes the event it is handed as part of the write itself.
    fn announces(&self) -> bool;

    /// Whether the events a process hears with this store are the store's own writes (its bus is
    /// the store), so that forging one takes write access to the store itself: such events are
    /// trusted without a lease id. False for a store beside a separate bus, whose events end a
    /// wait with their payload only when bound to the lease waited on. Required, not defaulted:
    /// a wrapper that forgot to pass it on would turn every trusted event into a hint.
    fn events_are_writes(&self) -> bool;

    /// The shortest lease TTL this store can keep; a dictionary asking for less is refused when it
    /// is opened. Zero for stores that count in milliseconds.
    fn min_lease_ttl(&self) -> Duration {
        Duration::ZERO
    }

    /// The largest value (encoded envelope, in bytes) [`Store::commit`] can store, if there is a
    /// limit. The engine treats a larger value as uncacheable instead of committing it.
    fn max_value_len(&self) -> Option<usize> {
        None
    }

    async fn acquire(
        &self,
        key: &KeyHash,
        lease: &LeaseRequest,
        touch: Option<Touch>,
    ) -> Result<Acquired, StoreError>;

    /// Like acquire, but never creates a lease: answers HIT, PASS, WAIT or EMPTY.
    async fn peek(&self, key: &KeyHash, touch: Option<Touch>) -> Result<Acquired, StoreError>;

    async fn renew(
        &self,
        key: &KeyHash,
        token: Token,
        ttl: Duration,
    ) -> Result<Renewed, StoreError>;

    /// Stores `value` for `ttl`, fresh for all of it, releases the lease and announces `event`, if
    /// the token still holds the lease. `sliding` says that reads will touch the TTL (a store that
    /// cannot extend a TTL in place must keep such a value past `ttl`).
    async fn commit(
        &self,
        key: &KeyHash,
        token: Token,
        value: Bytes,
        ttl: Duration,
        sliding: bool,
        event: Bytes,
    ) -> Result<Fenced, StoreError> {
        self.commit_fresh(key, token, value, ttl, ttl, sliding, event)
            .await
    }

    /// [`Store::commit`] of a value that is fresh for `fresh` and then kept, stale, until `ttl`
    /// (freshness plus the longest stale window). A `fresh` of `ttl` or more means no stale window.
    #[allow(clippy::too_many_arguments)]
    async fn commit_fresh(
        &self,
        key: &KeyHash,
        token: Token,
        value: Bytes,
        fresh: Duration,
        ttl: Duration,
        sliding: bool,
        event: Bytes,
    ) -> Result<Fenced, StoreError>;

    /// [`Store::commit_fresh`] of a revalidated value: the same body under a new head. A store
    /// that can rewrite the head of the value it holds in place (Redis) sends only the heads, so
    /// the body does not cross the network again, and commits the whole value when the stored
    /// one is no longer the revalidated one (it expired meanwhile); the default commits the whole
    /// value. Fenced by the token like every commit.
    #[allow(clippy::too_many_arguments)]
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
        self.commit_fresh(key, token, update.value.clone(), fresh, ttl, sliding, event)
            .await
    }

    /// Takes the lease to refresh a value before it goes stale (early refresh), in one atomic
    /// step: [`Refresh::Lead`] if a value is stored whose freshness ends `within` from now (by the
    /// store's clock) and nobody holds the lease, [`Refresh::Elsewhere`] if someone does,
    /// [`Refresh::Idle`] if there is no value (the next acquire fills it the usual way) or the
    /// stored one is fresher than that (someone refreshed it since the caller looked).
    async fn lead_refresh(
        &self,
        key: &KeyHash,
        lease: &LeaseRequest,
        within: Duration,
    ) -> Result<Refresh, StoreError>;

    /// Releases the lease and announces `event` (FAILED or ABANDONED), if the token holds it.
    async fn release(
        &self,
        key: &KeyHash,
        token: Token,
        event: Bytes,
    ) -> Result<Fenced, StoreError>;

    /// Releases the lease, sets a pass marker for `pass_ttl` and announces `event` (UNCACHEABLE).
    async fn give_up(
        &self,
        key: &KeyHash,
        token: Token,
        pass_ttl: Duration,
        event: Bytes,
    ) -> Result<Fenced, StoreError>;

    /// Removes value, lease and pass marker and announces `event` (DELETED). Answers whether
    /// anything was there.
    async fn purge(&self, key: &KeyHash, event: Bytes) -> Result<bool, StoreError>;

    /// Removes the value only if it is still exactly `value` (a corrupt or foreign entry that a reader
    /// found), so that the next acquire can lead. Answers whether it was removed.
    async fn discard(&self, key: &KeyHash, value: &Bytes) -> Result<bool, StoreError>;

    /// Read-only state; never changes a TTL.
    async fn status(&self, key: &KeyHash) -> Result<KeyStatus, StoreError>;

    /// The current generation of `route` (0 until it was first bumped).
    async fn route_generation(&self, route: &str) -> Result<u64, StoreError>;

    /// Adds one to the generation of `route` and answers the new one. A store that
    /// [`Store::announces`] also announces it (a [`crate::bus::EventKind::Generation`] event about
    /// `key`, the route's [`crate::key::generation_key`]).
    async fn bump_generation(&self, route: &str, key: &KeyHash) -> Result<u64, StoreError>;

    /// Records `entry` in its route's path index (under [`indexed_path`] of its path) and in the
    /// index of each of its tags, each extended to live at least `entry.ttl`.
    async fn index(&self, entry: &IndexEntry) -> Result<(), StoreError>;

    /// The keys `selector` covers, at most `limit` of them (entries already gone may be among
    /// them: purging those is a no-op). A prefix is looked up as [`indexed_path`] of it.
    async fn indexed(&self, selector: &Selector, limit: usize) -> Result<Vec<KeyHash>, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_indexed_path_is_bounded_and_keeps_every_prefix_that_fits() {
        let long = format!("/{}", "é".repeat(MAX_INDEXED_PATH_LEN));
        let kept = indexed_path(&long);
        assert!(kept.len() <= MAX_INDEXED_PATH_LEN && long.starts_with(kept));
        assert!(kept.len() > MAX_INDEXED_PATH_LEN - 2, "cut on a boundary");
        assert_eq!(indexed_path("/short"), "/short");
        // Whatever a prefix is, the kept prefix is a prefix of the kept path.
        for cut in [1, 10, 255, 256, 257, 300, long.len()] {
            let mut cut = cut.min(long.len());
            while !long.is_char_boundary(cut) {
                cut -= 1;
            }
            assert!(indexed_path(&long).starts_with(indexed_path(&long[..cut])));
        }
    }

    #[test]
    fn a_lease_id_names_its_token_without_revealing_it() {
        let token = Token(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        let id = token.lease_id();
        assert_eq!(id, LeaseId::of(token), "the same token, the same name");
        assert_ne!(id, Token(token.0 + 1).lease_id());
        assert_ne!(id.0, token.0.to_be_bytes(), "the name is not the token");
        assert_eq!(LeaseId::from_hex(id.to_hex().as_bytes()), Some(id));
        assert_eq!(LeaseId::from_hex(b""), None);
        assert_eq!(LeaseId::from_hex(&[b'z'; 32]), None);
        assert_eq!(LeaseId::from_hex(&id.to_hex().as_bytes()[..30]), None);
    }
}
