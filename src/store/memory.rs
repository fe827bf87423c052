//! The embedded store: the whole protocol in one process, shareable by several engines.
//!
//! Several engines handed clones of one [`MemoryStore`] coalesce with each other exactly as replicas
//! sharing a Redis do, so the demo and the tests run multi-replica scenarios without servers. Expiry
//! follows tokio's clock. It never announces: the engine publishes events on its bus.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::Instant;

use super::{
    Acquired, Fenced, IndexEntry, KeyStatus, LeaseRequest, MAX_INDEXED_PER_ROUTE,
    MAX_INDEXED_PER_TAG, Refresh, Renewed, Selector, Store, StoreError, Token, Touch,
};
use crate::key::KeyHash;

/// Expired slots are swept after this many writes, so a long-lived store does not grow without bound.
const SWEEP_EVERY: u64 = 1024;

#[derive(Default)]
struct Slot {
    value: Option<Value>,
    lease: Option<Lease>,
    pass: Option<Instant>,
}

struct Value {
    bytes: Bytes,
    /// Fresh until then; stale from then until `expires_at`.
    fresh_until: Instant,
    expires_at: Instant,
}

impl Value {
    fn new(bytes: Bytes, now: Instant, fresh: Duration, ttl: Duration) -> Self {
        Self {
            bytes,
            fresh_until: now + fresh.min(ttl),
            expires_at: now + ttl,
        }
    }
}

struct Lease {
    token: Token,
    fence: u64,
    expires_at: Instant,
}

impl Slot {
    /// Drops whatever has expired by `now`.
    fn expire(&mut self, now: Instant) {
        if self.value.as_ref().is_some_and(|v| v.expires_at <= now) {
            self.value = None;
        }
        if self.lease.as_ref().is_some_and(|l| l.expires_at <= now) {
            self.lease = None;
        }
        if self.pass.is_some_and(|at| at <= now) {
            self.pass = None;
        }
    }

    fn is_empty(&self) -> bool {
        self.value.is_none() && self.lease.is_none() && self.pass.is_none()
    }

    fn holds(&self, token: Token) -> bool {
        self.lease.as_ref().is_some_and(|l| l.token == token)
    }

    /// Who refreshes the value: the caller's own lease, another's, or (with `lease` given and none
    /// held) a lease created now for the caller.
    fn refresh(&mut self, now: Instant, lease: Option<(&LeaseRequest, u64)>) -> Refresh {
        match (&self.lease, lease) {
            (Some(held), Some((lease, _))) if held.token == lease.token => {
                Refresh::Lead { fence: held.fence }
            }
            (Some(held), _) => Refresh::Elsewhere {
                lease_left: held.expires_at - now,
                lease: Some(held.token.lease_id()),
            },
            (None, Some((lease, fence))) => {
                self.lease = Some(Lease {
                    token: lease.token,
                    fence,
                    expires_at: now + lease.ttl,
                });
                Refresh::Lead { fence }
            }
            (None, None) => Refresh::Idle,
        }
    }
}

#[derive(Default)]
struct State {
    slots: HashMap<KeyHash, Slot>,
    /// Source of fences; only grows.
    fence: u64,
    /// Writes since the last sweep.
    writes: u64,
    /// Route generations; absent is 0.
    generations: HashMap<String, u64>,
    /// Per route: (path, key) → when the entry expires.
    paths: HashMap<String, BTreeMap<(String, KeyHash), Instant>>,
    /// Per tag: key → when the entry expires.
    tags: HashMap<String, BTreeMap<KeyHash, Instant>>,
}

impl State {
    /// The live slot for `key`, with expired parts dropped.
    fn slot(&mut self, key: &KeyHash, now: Instant) -> &mut Slot {
        let slot = self.slots.entry(*key).or_default();
        slot.expire(now);
        slot
    }

    fn wrote(&mut self, now: Instant) {
        self.writes += 1;
        if self.writes.is_multiple_of(SWEEP_EVERY) {
            self.slots.retain(|_, slot| {
                slot.expire(now);
                !slot.is_empty()
            });
        }
    }
}

/// Adds `member` to an index until `expires` (never shortening it), drops what lapsed, and forgets
/// the members that expire soonest while it holds more than `cap` (a linear scan: the memory store
/// serves the demo and tests, not large indexes).
fn index_into<K: Ord + Clone>(
    index: &mut BTreeMap<K, Instant>,
    member: K,
    expires: Instant,
    now: Instant,
    cap: usize,
) {
    index.retain(|_, at| *at > now);
    let at = index.entry(member).or_insert(expires);
    *at = (*at).max(expires);
    while index.len() > cap {
        let soonest = index
            .iter()
            .min_by_key(|(_, at)| **at)
            .map(|(k, _)| k.clone());
        match soonest {
            Some(soonest) => index.remove(&soonest),
            None => break,
        };
    }
}

/// An in-process store; clones share the same data.
#[derive(Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<R>(&self, f: impl FnOnce(&mut State, Instant) -> R) -> R {
        let mut state = self.state.lock().expect("memory store lock");
        f(&mut state, Instant::now())
    }

    /// Applies `write` and drops the lease, only if `token` holds it (COMMIT, RELEASE, GIVEUP).
    fn fenced(
        &self,
        key: &KeyHash,
        token: Token,
        write: impl FnOnce(&mut Slot, Instant),
    ) -> Fenced {
        self.with(|state, now| {
            let slot = state.slot(key, now);
            if !slot.holds(token) {
                return Fenced::Lost;
            }
            write(slot, now);
            slot.lease = None;
            state.wrote(now);
            Fenced::Done
        })
    }

    /// The remaining TTL of a stored value, if any (for tests and status pages).
    pub fn value_ttl(&self, key: &KeyHash) -> Option<Duration> {
        self.with(|state, now| {
            let slot = state.slot(key, now);
            slot.value.as_ref().map(|v| v.expires_at - now)
        })
    }

    /// Stores raw bytes under a key's name, as a foreign writer could (for tests of corrupt entries).
    pub fn put_raw(&self, key: &KeyHash, value: Bytes, ttl: Duration) {
        self.with(|state, now| state.slot(key, now).value = Some(Value::new(value, now, ttl, ttl)));
    }

    /// The stored bytes under a key's name, if any.
    pub fn raw(&self, key: &KeyHash) -> Option<Bytes> {
        self.with(|state, now| state.slot(key, now).value.as_ref().map(|v| v.bytes.clone()))
    }
}

/// A value or pass marker, if there is one; a stale value with who refreshes it (`lease` asks to
/// take the lease when nobody holds it).
fn read(
    slot: &mut Slot,
    now: Instant,
    touch: Option<Touch>,
    lease: Option<(&LeaseRequest, u64)>,
) -> Option<Acquired> {
    if let Some(value) = &mut slot.value {
        if value.fresh_until > now {
            if let Some(touch) = touch
                && value.expires_at - now < touch.ttl.saturating_sub(touch.slack)
            {
                // Sliding values have no stale window: freshness slides with the TTL.
                value.expires_at = now + touch.ttl;
                value.fresh_until = value.expires_at;
            }
            return Some(Acquired::Hit {
                value: value.bytes.clone(),
                ttl_left: value.fresh_until - now,
            });
        }
        let (bytes, ttl_left) = (value.bytes.clone(), value.expires_at - now);
        return Some(Acquired::Stale {
            value: bytes,
            ttl_left,
            refresh: slot.refresh(now, lease),
        });
    }
    if let Some(at) = slot.pass {
        return Some(Acquired::Pass { ttl_left: at - now });
    }
    None
}

#[async_trait]
impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn announces(&self) -> bool {
        false
    }

    // Its events ride a separate (memory) bus.
    fn events_are_writes(&self) -> bool {
        false
    }

    async fn acquire(
        &self,
        key: &KeyHash,
        lease: &LeaseRequest,
        touch: Option<Touch>,
    ) -> Result<Acquired, StoreError> {
        Ok(self.with(|state, now| {
            state.fence += 1;
            let fence = state.fence;
            let slot = state.slot(key, now);
            if let Some(found) = read(slot, now, touch, Some((lease, fence))) {
                return found;
            }
            match &slot.lease {
                Some(held) if held.token == lease.token => Acquired::Lead { fence: held.fence },
                Some(held) => Acquired::Wait {
                    lease_left: held.expires_at - now,
                    lease: Some(held.token.lease_id()),
                },
                None => {
                    slot.lease = Some(Lease {
                        token: lease.token,
                        fence,
                        expires_at: now + lease.ttl,
                    });
                    state.wrote(now);
                    Acquired::Lead { fence }
                }
            }
        }))
    }

    async fn peek(&self, key: &KeyHash, touch: Option<Touch>) -> Result<Acquired, StoreError> {
        Ok(self.with(|state, now| {
            let slot = state.slot(key, now);
            read(slot, now, touch, None).unwrap_or_else(|| match &slot.lease {
                Some(held) => Acquired::Wait {
                    lease_left: held.expires_at - now,
                    lease: Some(held.token.lease_id()),
                },
                None => Acquired::Empty,
            })
        }))
    }

    async fn renew(
        &self,
        key: &KeyHash,
        token: Token,
        ttl: Duration,
    ) -> Result<Renewed, StoreError> {
        Ok(
            self.with(|state, now| match &mut state.slot(key, now).lease {
                Some(held) if held.token == token => {
                    held.expires_at = now + ttl;
                    Renewed::Held
                }
                _ => Renewed::Lost,
            }),
        )
    }

    async fn commit_fresh(
        &self,
        key: &KeyHash,
        token: Token,
        value: Bytes,
        fresh: Duration,
        ttl: Duration,
        _sliding: bool,
        _event: Bytes,
    ) -> Result<Fenced, StoreError> {
        Ok(self.fenced(key, token, move |slot, now| {
            slot.pass = None;
            slot.value = Some(Value::new(value, now, fresh, ttl));
        }))
    }

    async fn lead_refresh(
        &self,
        key: &KeyHash,
        lease: &LeaseRequest,
        within: Duration,
    ) -> Result<Refresh, StoreError> {
        Ok(self.with(|state, now| {
            state.fence += 1;
            let fence = state.fence;
            let slot = state.slot(key, now);
            let due = slot
                .value
                .as_ref()
                .is_some_and(|v| v.fresh_until.saturating_duration_since(now) <= within);
            if !due {
                return Refresh::Idle;
            }
            let refresh = slot.refresh(now, Some((lease, fence)));
            state.wrote(now);
            refresh
        }))
    }

    async fn release(
        &self,
        key: &KeyHash,
        token: Token,
        _event: Bytes,
    ) -> Result<Fenced, StoreError> {
        Ok(self.fenced(key, token, |_, _| {}))
    }

    async fn give_up(
        &self,
        key: &KeyHash,
        token: Token,
        pass_ttl: Duration,
        _event: Bytes,
    ) -> Result<Fenced, StoreError> {
        // A refresh that turned out uncacheable takes the stale value with it.
        Ok(self.fenced(key, token, move |slot, now| {
            slot.value = None;
            slot.pass = Some(now + pass_ttl)
        }))
    }

    async fn purge(&self, key: &KeyHash, _event: Bytes) -> Result<bool, StoreError> {
        Ok(self.with(|state, now| {
            let slot = state.slot(key, now);
            let existed = !slot.is_empty();
            *slot = Slot::default();
            existed
        }))
    }

    async fn route_generation(&self, route: &str) -> Result<u64, StoreError> {
        Ok(self.with(|state, _| state.generations.get(route).copied().unwrap_or(0)))
    }

    async fn bump_generation(&self, route: &str, _key: &KeyHash) -> Result<u64, StoreError> {
        self.with(|state, _| {
            let generation = state.generations.entry(route.to_owned()).or_insert(0);
            *generation = generation.checked_add(1).ok_or_else(|| {
                StoreError::Protocol("bump_generation: the generation is at its maximum".into())
            })?;
            Ok(*generation)
        })
    }

    async fn index(&self, entry: &IndexEntry) -> Result<(), StoreError> {
        self.with(|state, now| {
            let expires = now + entry.ttl;
            let paths = state.paths.entry(entry.route.clone()).or_default();
            let member = (super::indexed_path(&entry.path).to_owned(), entry.key);
            index_into(paths, member, expires, now, MAX_INDEXED_PER_ROUTE);
            for tag in &entry.tags {
                let keys = state.tags.entry(tag.clone()).or_default();
                index_into(keys, entry.key, expires, now, MAX_INDEXED_PER_TAG);
            }
            state.paths.retain(|_, paths| !paths.is_empty());
            state.tags.retain(|_, keys| !keys.is_empty());
        });
        Ok(())
    }

    async fn indexed(&self, selector: &Selector, limit: usize) -> Result<Vec<KeyHash>, StoreError> {
        Ok(self.with(|state, now| match selector {
            Selector::Prefix { route, prefix } => {
                let prefix = super::indexed_path(prefix);
                state.paths.get(route).map_or(Vec::new(), |paths| {
                    paths
                        .range((prefix.to_owned(), KeyHash::from_bytes([0; 32]))..)
                        .take_while(|((path, _), _)| path.starts_with(prefix))
                        .filter(|(_, at)| **at > now)
                        .map(|((_, key), _)| *key)
                        .take(limit)
                        .collect()
                })
            }
            Selector::Tag(tag) => state.tags.get(tag).map_or(Vec::new(), |keys| {
                keys.iter()
                    .filter(|(_, at)| **at > now)
                    .map(|(key, _)| *key)
                    .take(limit)
                    .collect()
            }),
        }))
    }

    async fn discard(&self, key: &KeyHash, value: &Bytes) -> Result<bool, StoreError> {
        Ok(self.with(|state, now| {
            let slot = state.slot(key, now);
            if slot.value.as_ref().is_some_and(|v| v.bytes == *value) {
                slot.value = None;
                return true;
            }
            false
        }))
    }

    async fn status(&self, key: &KeyHash) -> Result<KeyStatus, StoreError> {
        Ok(self.with(|state, now| {
            let slot = state.slot(key, now);
            if let Some(value) = &slot.value {
                KeyStatus::Exists {
                    ttl_left: value.expires_at - now,
                }
            } else if let Some(at) = slot.pass {
                KeyStatus::Pass { ttl_left: at - now }
            } else if let Some(held) = &slot.lease {
                KeyStatus::Pending {
                    lease_left: held.expires_at - now,
                }
            } else {
                KeyStatus::Empty
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyBuilder;

    fn key() -> KeyHash {
        KeyBuilder::new().part("k").finish().hash
    }

    fn lease(ttl_ms: u64) -> LeaseRequest {
        LeaseRequest {
            token: Token::random(),
            node: "test".into(),
            ttl: Duration::from_millis(ttl_ms),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lead_wait_commit_hit() {
        let store = MemoryStore::new();
        let first = lease(1000);
        let second = lease(1000);
        assert!(matches!(
            store.acquire(&key(), &first, None).await,
            Ok(Acquired::Lead { .. })
        ));
        assert!(matches!(
            store.acquire(&key(), &first, None).await,
            Ok(Acquired::Lead { .. })
        ));
        assert!(matches!(
            store.acquire(&key(), &second, None).await,
            Ok(Acquired::Wait { .. })
        ));
        let value = Bytes::from_static(b"v");
        assert_eq!(
            store
                .commit(
                    &key(),
                    second.token,
                    value.clone(),
                    Duration::from_secs(9),
                    false,
                    Bytes::new()
                )
                .await,
            Ok(Fenced::Lost)
        );
        assert_eq!(
            store
                .commit(
                    &key(),
                    first.token,
                    value.clone(),
                    Duration::from_secs(9),
                    false,
                    Bytes::new()
                )
                .await,
            Ok(Fenced::Done)
        );
        assert_eq!(
            store.acquire(&key(), &second, None).await,
            Ok(Acquired::Hit {
                value,
                ttl_left: Duration::from_secs(9)
            })
        );
    }

    async fn commit_stale_capable(store: &MemoryStore, value: &'static [u8]) {
        let lease = lease(1000);
        store.acquire(&key(), &lease, None).await.unwrap();
        let done = store
            .commit_fresh(
                &key(),
                lease.token,
                Bytes::from_static(value),
                Duration::from_secs(1),
                Duration::from_secs(11),
                false,
                Bytes::new(),
            )
            .await;
        assert_eq!(done, Ok(Fenced::Done));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_value_has_exactly_one_refresh_leader() {
        let store = MemoryStore::new();
        commit_stale_capable(&store, b"old").await;
        let fresh = store.acquire(&key(), &lease(1000), None).await.unwrap();
        assert!(
            matches!(fresh, Acquired::Hit { ttl_left, .. } if ttl_left == Duration::from_secs(1))
        );
        tokio::time::advance(Duration::from_millis(1500)).await;
        let (first, second) = (lease(1000), lease(1000));
        let stale = |refresh| Acquired::Stale {
            value: Bytes::from_static(b"old"),
            ttl_left: Duration::from_millis(9500),
            refresh,
        };
        let led = store.acquire(&key(), &first, None).await.unwrap();
        assert!(matches!(
            led,
            Acquired::Stale {
                refresh: Refresh::Lead { .. },
                ..
            }
        ));
        // The leader's retry leads again; everyone else hears that someone refreshes.
        assert!(matches!(
            store.acquire(&key(), &first, None).await.unwrap(),
            Acquired::Stale {
                refresh: Refresh::Lead { .. },
                ..
            }
        ));
        assert_eq!(
            store.acquire(&key(), &second, None).await,
            Ok(stale(Refresh::Elsewhere {
                lease_left: Duration::from_secs(1),
                lease: Some(first.token.lease_id()),
            }))
        );
        assert_eq!(
            store.peek(&key(), None).await,
            Ok(stale(Refresh::Elsewhere {
                lease_left: Duration::from_secs(1),
                lease: Some(first.token.lease_id()),
            }))
        );
        // A failed refresh leaves the stale value, and the next caller may lead again.
        store
            .release(&key(), first.token, Bytes::new())
            .await
            .unwrap();
        assert!(matches!(
            store.acquire(&key(), &second, None).await.unwrap(),
            Acquired::Stale {
                refresh: Refresh::Lead { .. },
                ..
            }
        ));
        // The refresh's commit replaces the value, fresh again.
        store
            .commit_fresh(
                &key(),
                second.token,
                Bytes::from_static(b"new"),
                Duration::from_secs(1),
                Duration::from_secs(11),
                false,
                Bytes::new(),
            )
            .await
            .unwrap();
        assert!(matches!(
            store.acquire(&key(), &lease(1000), None).await.unwrap(),
            Acquired::Hit { value, .. } if value == Bytes::from_static(b"new")
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn an_early_refresh_takes_the_lease_over_a_fresh_value_once() {
        let store = MemoryStore::new();
        let soon = Duration::from_millis(500);
        assert_eq!(
            store.lead_refresh(&key(), &lease(1000), soon).await,
            Ok(Refresh::Idle)
        );
        commit_stale_capable(&store, b"v").await;
        // Fresh for a second more: not due yet, so nothing is taken.
        assert_eq!(
            store.lead_refresh(&key(), &lease(1000), soon).await,
            Ok(Refresh::Idle)
        );
        tokio::time::advance(Duration::from_millis(600)).await;
        let first = lease(1000);
        assert!(matches!(
            store.lead_refresh(&key(), &first, soon).await,
            Ok(Refresh::Lead { .. })
        ));
        assert!(matches!(
            store.lead_refresh(&key(), &lease(1000), soon).await,
            Ok(Refresh::Elsewhere { .. })
        ));
        // Readers still get the fresh value while the refresh runs.
        assert!(matches!(
            store.acquire(&key(), &lease(1000), None).await,
            Ok(Acquired::Hit { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_lease_lets_another_lead() {
        let store = MemoryStore::new();
        store.acquire(&key(), &lease(100), None).await.unwrap();
        tokio::time::advance(Duration::from_millis(101)).await;
        assert!(matches!(
            store.acquire(&key(), &lease(100), None).await,
            Ok(Acquired::Lead { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn purge_makes_the_running_commit_lost() {
        let store = MemoryStore::new();
        let held = lease(1000);
        store.acquire(&key(), &held, None).await.unwrap();
        store.purge(&key(), Bytes::new()).await.unwrap();
        let commit = store
            .commit(
                &key(),
                held.token,
                Bytes::new(),
                Duration::from_secs(1),
                false,
                Bytes::new(),
            )
            .await;
        assert_eq!(commit, Ok(Fenced::Lost));
        assert_eq!(store.status(&key()).await, Ok(KeyStatus::Empty));
    }

    #[tokio::test(start_paused = true)]
    async fn sliding_touch_only_below_the_slack_and_status_never_touches() {
        let store = MemoryStore::new();
        store.put_raw(&key(), Bytes::from_static(b"v"), Duration::from_secs(10));
        let touch = Touch {
            ttl: Duration::from_secs(10),
            slack: Duration::from_secs(2),
        };
        tokio::time::advance(Duration::from_secs(1)).await;
        store.peek(&key(), Some(touch)).await.unwrap();
        assert_eq!(store.value_ttl(&key()), Some(Duration::from_secs(9)));
        tokio::time::advance(Duration::from_secs(2)).await;
        store.status(&key()).await.unwrap();
        assert_eq!(store.value_ttl(&key()), Some(Duration::from_secs(7)));
        store.peek(&key(), Some(touch)).await.unwrap();
        assert_eq!(store.value_ttl(&key()), Some(Duration::from_secs(10)));
    }
}
