//! Leases that a timed-out ACQUIRE may have left behind.
//!
//! An ACQUIRE that timed out on the client may still run on the server later: Redis holds it under
//! `CLIENT PAUSE`, a frozen server reads it from its socket once it resumes. It then creates a
//! lease that no build holds and nobody renews, and every other replica's followers of that key
//! would wait a whole `lease_ttl` for it. So a flight whose ACQUIRE timed out, and that gave up on
//! the store, leaves its token here; once the store answers again this process releases each of
//! those leases with ABANDONED (see [`release_in_background`]). The release is fenced by the token, so a lease the ACQUIRE never
//! created, or that is someone else's, is left alone; waiters on a released one re-elect at once.
//!

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::Inner;
use super::calls::{announce, store_call};
use crate::bus::{Event, EventKind};
use crate::key::KeyHash;
use crate::lease::Token;
use crate::store::Fenced;

/// Most tokens remembered; past it new ones are not (their leases expire on their own TTL).
const CAPACITY: usize = 4096;

/// Pause between two rounds of releases while any is pending.
const RETRY_EVERY: Duration = Duration::from_millis(200);

/// The tokens of ACQUIREs that timed out, with their keys.
#[derive(Default)]
pub(crate) struct Orphans {
    /// Every (key, token) whose ACQUIRE timed out: several flights of one key may have timed out
    /// in turn, and it is the first of them to reach the server that leaves the lease.
    pending: Mutex<Vec<(KeyHash, Token)>>,
    /// Whether a release task is running (one at a time).
    releasing: AtomicBool,
}

impl Orphans {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(KeyHash, Token)>> {
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Remembers that `token`'s ACQUIRE of `key` timed out and its flight went on without it.
    pub(crate) fn remember(&self, key: KeyHash, token: Token) {
        let mut pending = self.lock();
        if pending.len() < CAPACITY {
            pending.push((key, token));
        }
    }

    /// Whether none is waiting to be released.
    pub(crate) fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

/// Releases what timed-out ACQUIREs may have left, in the background: one task per process,
/// running while any is pending, one round every [`RETRY_EVERY`]. Each release goes through the
/// store's breaker like any call (failing fast while it is open, and serving as its probe when it
/// is due), and reaches the server after the ACQUIRE it undoes: both go out on the same connection,
/// in that order. A release that gets no answer is tried again next round (a second one that finds
/// the lease gone changes nothing).
pub(crate) fn release_in_background(inner: &Arc<Inner>) {
    if inner.orphans.is_empty() || inner.orphans.releasing.swap(true, Ordering::SeqCst) {
        return;
    }
    let inner = inner.clone();
    tokio::spawn(async move {
        // Bounded by the engine's life: it stops when the engine closes.
        while !inner.closing.load(Ordering::SeqCst) {
            tokio::time::sleep(RETRY_EVERY).await;
            release_pending(&inner).await;
            let mut pending = inner.orphans.lock();
            if pending.is_empty() {
                // Cleared under the lock, so a token remembered now starts a new task.
                inner.orphans.releasing.store(false, Ordering::SeqCst);
                drop(pending);
                return;
            }
            pending.shrink_to_fit();
        }
        inner.orphans.releasing.store(false, Ordering::SeqCst);
    });
}

/// One round: tries to release every pending lease; puts back those that got no answer.
async fn release_pending(inner: &Arc<Inner>) {
    let taken: Vec<(KeyHash, Token)> = std::mem::take(&mut *inner.orphans.lock());
    for (key, token) in taken {
        let event = Event::new(key, EventKind::Abandoned).encode();
        let released = store_call(inner, "release", || {
            inner.store.release(&key, token, event.clone())
        })
        .await;
        match released {
            Ok(Fenced::Done) => {
                tracing::info!(%key, "released the lease a timed-out acquire left behind");
                inner
                    .metrics
                    .orphan_leases
                    .with_label_values(&["released"])
                    .inc();
                if !inner.store.announces() {
                    announce(inner, &key, event).await;
                }
            }
            Ok(Fenced::Lost) => inner
                .metrics
                .orphan_leases
                .with_label_values(&["absent"])
                .inc(),
            Err(_) => inner.orphans.lock().push((key, token)),
        }
    }
}
