//! Leases that a timed-out ACQUIRE may have left behind.
//!
//! An ACQUIRE that timed out on the client may still run on the server later: Redis holds it under
//! `CLIENT PAUSE`, a frozen server reads it from its socket once it resumes. It then creates a
//! lease that no build holds and nobody renews, and every other replica's followers of that key
//! would wait a whole `lease_ttl` for it. So a flight whose ACQUIRE timed out, and that gave up on
//! the store, leaves its token here; once the store answers again this process releases each of
//! those leases with ABANDONED. The release is fenced by the token, so a lease the ACQUIRE never
//! created, or that is someone else's, is left alone; waiters on a released one re-elect at once.
//!
//! The release goes out after the store answered a later call on the same connection, so it
//! reaches the server after the held ACQUIRE it undoes.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use super::Inner;
use super::drive::{announce, store_call};
use crate::bus::{Event, EventKind};
use crate::key::KeyHash;
use crate::store::{Fenced, Token};

/// Most tokens remembered; past it new ones are not (their leases expire on their own TTL).
const CAPACITY: usize = 4096;

/// The tokens of ACQUIREs that timed out, by key.
#[derive(Default)]
pub(crate) struct Orphans {
    /// Key → the token its timed-out ACQUIRE sent (the latest, if several flights timed out).
    pending: Mutex<HashMap<KeyHash, Token>>,
    /// Whether a release task is running (one at a time).
    releasing: AtomicBool,
}

impl Orphans {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<KeyHash, Token>> {
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Remembers that `token`'s ACQUIRE of `key` timed out and its flight went on without it.
    pub(crate) fn remember(&self, key: KeyHash, token: Token) {
        let mut pending = self.lock();
        if pending.len() < CAPACITY || pending.contains_key(&key) {
            pending.insert(key, token);
        }
    }

    /// Whether none is waiting to be released.
    pub(crate) fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

/// The store answered: releases what timed-out ACQUIREs may have left, in the background (one
/// task at a time; a failure puts the rest back for the next answer).
pub(crate) fn release_after_answer(inner: &Arc<Inner>) {
    if inner.orphans.is_empty() || inner.orphans.releasing.swap(true, Ordering::SeqCst) {
        return;
    }
    let inner = inner.clone();
    tokio::spawn(async move {
        let taken: Vec<(KeyHash, Token)> = inner.orphans.lock().drain().collect();
        for (i, (key, token)) in taken.iter().enumerate() {
            let event = Event::new(*key, EventKind::Abandoned).encode();
            let released = store_call(&inner, "release", || {
                inner.store.release(key, *token, event.clone())
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
                        announce(&inner, key, event).await;
                    }
                }
                Ok(Fenced::Lost) => inner
                    .metrics
                    .orphan_leases
                    .with_label_values(&["absent"])
                    .inc(),
                Err(_) => {
                    let mut pending = inner.orphans.lock();
                    for (key, token) in &taken[i..] {
                        pending.entry(*key).or_insert(*token);
                    }
                    break;
                }
            }
        }
        inner.orphans.releasing.store(false, Ordering::SeqCst);
    });
}
