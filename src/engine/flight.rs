//! Flights: one per key per process, shared by every caller of that key on this process.
//!
//! A flight is created by its first caller and driven by a spawned task (`drive`), never by a caller,
//! so a caller that leaves early cancels nothing. Its conclusion goes to every caller that joined
//! before it ended: the flight is removed from the table *before* the conclusion is published, so a
//! caller either joined in time (and sees it) or finds no flight and starts a new one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{Notify, watch};

use crate::bus::EventKind;
use crate::envelope::Entry;
use crate::key::KeyHash;
use crate::lease::LeaseId;

/// Shards of the flight table; a power of two well above the core count keeps lock contention low.
const SHARDS: usize = 64;

/// What a flight is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// May take the lease and build.
    Build,
    /// Only reads: peeks, and waits for someone else's build.
    Read,
}

/// Where a value came from, as a caller sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// This process's L1.
    L1,
    /// The store answered with a value on the first look.
    Store,
    /// This caller's flight built it (the caller started the flight).
    Built,
    /// Someone else's build answered: another process's, or this process's flight that the caller
    /// joined.
    Coalesced,
    /// The store could not be reached; this process built it for its own callers only.
    Degraded,
    /// A stored copy past its freshness, served at once while one refresh runs in the background
    /// (stale-while-revalidate).
    StaleRevalidating,
    /// A stored copy past its freshness, served because its refresh failed (stale-if-error).
    StaleOnError,
}

/// How a flight ended.
#[derive(Debug)]
pub(crate) enum Conclusion {
    /// A value for everyone.
    Value { entry: Arc<Entry>, source: Source },
    /// The build failed; everyone gets this failure.
    Failed(super::Failure),
    /// The answer may not be shared. `entry` is the build's own result, for the caller `owner` only,
    /// with the build's `reason` when it gave one. Its attachment goes to the owner alone, before
    /// the conclusion is published (see `drive::drive`).
    Uncacheable {
        owner: u64,
        entry: Option<Arc<Entry>>,
        reason: Option<&'static str>,
        attachment: Option<super::Attachment>,
    },
    /// A hit-for-pass marker: every caller goes to the source on its own.
    Pass,
    /// Nothing stored and nothing pending (read flights only).
    Empty,
    /// The store did not answer and the flight could not build (read flights only).
    StoreDown(crate::store::StoreError),
    /// Every caller left while the flight was only waiting, so it stopped.
    Unattended,
    /// The engine closed while the flight was waiting.
    Closed,
}

impl Conclusion {
    /// The conclusion of a build whose answer is `private` to the flight's `owner`.
    pub fn private(owner: u64, private: super::Private) -> Self {
        Conclusion::Uncacheable {
            owner,
            entry: Some(Arc::new(private.entry)),
            reason: Some(private.reason),
            attachment: private.attachment,
        }
    }
}

/// What the bus (or a local delete) told a flight since it last looked.
#[derive(Default)]
pub(crate) struct Mailbox {
    /// The latest outcome event for this key, and the lease it says it ends (if any).
    pub event: Option<(EventKind, Option<LeaseId>)>,
    /// The bus reconnected: re-check even without an event.
    pub resync: bool,
}

pub(crate) struct Flight {
    pub key: KeyHash,
    pub mode: Mode,
    /// The caller that created the flight: the only one that may receive a private build result.
    pub owner: u64,
    /// `None` until concluded; every joined caller holds a receiver.
    pub conclusion: watch::Sender<Option<Arc<Conclusion>>>,
    /// Events for this key, posted by the dispatcher.
    pub mailbox: Mutex<Mailbox>,
    /// Wakes the driver when the mailbox changes.
    pub wake: Notify,
    /// Set when a delete or purge of this key was seen during the flight: what it read before that
    /// must not enter the L1.
    pub invalidated: AtomicBool,
    /// A stored copy past its freshness that the flight found (inside its stale-if-error window),
    /// for callers refused by `max_followers`.
    pub stale: Mutex<Option<Arc<Entry>>>,
}

impl Flight {
    pub fn post(&self, event: EventKind, lease: Option<LeaseId>) {
        if event == EventKind::Deleted {
            self.invalidated.store(true, Ordering::SeqCst);
        }
        self.mailbox.lock().expect("mailbox lock").event = Some((event, lease));
        self.wake.notify_one();
    }

    pub fn post_resync(&self) {
        self.mailbox.lock().expect("mailbox lock").resync = true;
        self.wake.notify_one();
    }

    /// Empties the mailbox (before a fresh look at the store, which supersedes it).
    pub fn take_mail(&self) -> Mailbox {
        std::mem::take(&mut *self.mailbox.lock().expect("mailbox lock"))
    }

    pub fn is_invalidated(&self) -> bool {
        self.invalidated.load(Ordering::SeqCst)
    }

    /// Keeps the stale copy the flight found.
    pub fn keep_stale(&self, entry: Arc<Entry>) {
        *self.stale.lock().expect("stale lock") = Some(entry);
    }

    /// The stale copy the flight found, if any.
    pub fn stale(&self) -> Option<Arc<Entry>> {
        self.stale.lock().expect("stale lock").clone()
    }
}

impl Flight {
    fn detached(key: KeyHash) -> Arc<Self> {
        Arc::new(Flight {
            key,
            mode: Mode::Build,
            owner: 0,
            conclusion: watch::channel(None).0,
            mailbox: Mutex::new(Mailbox::default()),
            wake: Notify::new(),
            invalidated: AtomicBool::new(false),
            stale: Mutex::new(None),
        })
    }
}

/// A caller's membership of a flight.
pub(crate) struct Ticket {
    pub flight: Arc<Flight>,
    pub receiver: watch::Receiver<Option<Arc<Conclusion>>>,
    /// Whether this caller created the flight (and must spawn its driver).
    pub created: bool,
}

/// The sharded map from key digest to live flight.
pub(crate) struct FlightTable {
    shards: Vec<Mutex<HashMap<KeyHash, Arc<Flight>>>>,
    /// Background refreshes' flights: outside the table, so no caller joins them, but listed so
    /// that a delete of their key reaches them too.
    detached: Mutex<HashMap<KeyHash, Vec<Weak<Flight>>>>,
}

/// A background refresh's flight, listed in the table's detached flights while it lives.
pub(crate) struct Detached<'a> {
    table: &'a FlightTable,
    pub flight: Arc<Flight>,
}

impl Drop for Detached<'_> {
    fn drop(&mut self) {
        let mut detached = self.table.detached.lock().expect("detached flights lock");
        if let Some(list) = detached.get_mut(&self.flight.key) {
            list.retain(|other| {
                !std::ptr::eq(other.as_ptr(), Arc::as_ptr(&self.flight)) && other.strong_count() > 0
            });
            if list.is_empty() {
                detached.remove(&self.flight.key);
            }
        }
    }
}

impl FlightTable {
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            detached: Mutex::new(HashMap::new()),
        }
    }

    /// A flight for a background refresh: no caller joins it, so no request ever waits on it, but
    /// [`FlightTable::post`] still tells it of a delete of its key while the guard lives.
    pub fn detached(&self, key: KeyHash) -> Detached<'_> {
        let flight = Flight::detached(key);
        self.detached
            .lock()
            .expect("detached flights lock")
            .entry(key)
            .or_default()
            .push(Arc::downgrade(&flight));
        Detached {
            table: self,
            flight,
        }
    }

    /// Posts an event to the live flight of its key; a delete also reaches the key's detached
    /// flights, so what any of them read before it stays out of the L1.
    pub fn post(&self, key: &KeyHash, event: EventKind, lease: Option<LeaseId>) {
        if event == EventKind::Deleted {
            let detached = self.detached.lock().expect("detached flights lock");
            for flight in detached.get(key).into_iter().flatten() {
                if let Some(flight) = flight.upgrade() {
                    flight.post(EventKind::Deleted, None);
                }
            }
        }
        if let Some(flight) = self.get(key) {
            flight.post(event, lease);
        }
    }

    fn shard(&self, key: &KeyHash) -> std::sync::MutexGuard<'_, HashMap<KeyHash, Arc<Flight>>> {
        self.shards[key.shard(SHARDS)]
            .lock()
            .expect("flight table lock")
    }

    /// Joins the live flight for `key`, or creates one of `mode` owned by `caller`; `None` when
    /// the live flight already has `max_followers` callers waiting besides its first.
    pub fn join(
        &self,
        key: KeyHash,
        mode: Mode,
        caller: u64,
        max_followers: usize,
    ) -> Option<Ticket> {
        let mut shard = self.shard(&key);
        if let Some(flight) = shard.get(&key) {
            // Every waiting caller holds one receiver; the first caller's is not a follower's.
            if flight.conclusion.receiver_count() > max_followers {
                return None;
            }
            return Some(Ticket {
                flight: flight.clone(),
                receiver: flight.conclusion.subscribe(),
                created: false,
            });
        }
        let (conclusion, receiver) = watch::channel(None);
        let flight = Arc::new(Flight {
            key,
            mode,
            owner: caller,
            conclusion,
            mailbox: Mutex::new(Mailbox::default()),
            wake: Notify::new(),
            invalidated: AtomicBool::new(false),
            stale: Mutex::new(None),
        });
        shard.insert(key, flight.clone());
        Some(Ticket {
            flight,
            receiver,
            created: true,
        })
    }

    pub fn get(&self, key: &KeyHash) -> Option<Arc<Flight>> {
        self.shard(key).get(key).cloned()
    }

    /// Removes `flight` (if it is still the live one) and then publishes its conclusion.
    pub fn conclude(&self, flight: &Arc<Flight>, conclusion: Conclusion) {
        {
            let mut shard = self.shard(&flight.key);
            if shard
                .get(&flight.key)
                .is_some_and(|live| Arc::ptr_eq(live, flight))
            {
                shard.remove(&flight.key);
            }
        }
        flight.conclusion.send_replace(Some(Arc::new(conclusion)));
    }

    /// Removes `flight` only if no caller is attached to it; answers whether it did.
    pub fn remove_if_unattended(&self, flight: &Arc<Flight>) -> bool {
        let mut shard = self.shard(&flight.key);
        if flight.conclusion.receiver_count() > 0 {
            return false;
        }
        if shard
            .get(&flight.key)
            .is_some_and(|live| Arc::ptr_eq(live, flight))
        {
            shard.remove(&flight.key);
        }
        true
    }

    /// Every live flight (for a resync after the bus reconnected, and for shutdown).
    pub fn all(&self) -> Vec<Arc<Flight>> {
        self.shards
            .iter()
            .flat_map(|shard| {
                shard
                    .lock()
                    .expect("flight table lock")
                    .values()
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.lock().expect("flight table lock").len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> KeyHash {
        KeyHash::from_bytes([n; 32])
    }

    #[test]
    fn a_delete_reaches_a_background_refresh_of_its_key_and_no_other() {
        let table = FlightTable::new();
        let refresh = table.detached(key(1));
        let other = table.detached(key(2));
        table.post(&key(1), EventKind::Abandoned, None);
        assert!(!refresh.flight.is_invalidated(), "only a delete marks it");
        table.post(&key(1), EventKind::Deleted, None);
        assert!(refresh.flight.is_invalidated());
        assert!(!other.flight.is_invalidated());
    }

    #[test]
    fn a_finished_refresh_leaves_nothing_listed() {
        let table = FlightTable::new();
        let first = table.detached(key(1));
        let second = table.detached(key(1));
        drop(first);
        table.post(&key(1), EventKind::Deleted, None);
        assert!(
            second.flight.is_invalidated(),
            "the one still running is told"
        );
        drop(second);
        assert!(table.detached.lock().unwrap().is_empty());
    }
}
