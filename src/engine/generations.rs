//! Route generations: a per-route number that is part of every key of the route, so purging a
//! whole route is one increment in the store instead of a walk over its keys.
//!
//! Each process keeps the generations of the routes it serves. It learns a bump from the bus at
//! once (a GENERATION event about the route's [`generation_key`]), and reads every generation
//! from the store when it starts and whenever the bus tells it that events may have been lost,
//! so no process keeps keying a purged route by its old generation. Generations only grow: an
//! older number arriving late never replaces a newer one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::key::{KeyHash, generation_key};

#[derive(Default)]
struct Known {
    /// Generation by route name.
    by_route: HashMap<Arc<str>, u64>,
    /// Route name by [`generation_key`], to map an event back to its route.
    by_key: HashMap<KeyHash, Arc<str>>,
}

/// The generations this process keys its routes with.
pub(crate) struct Generations {
    known: Mutex<Known>,
    /// Counts the bus's resyncs; the tracking task re-reads every generation on each.
    resyncs: watch::Sender<u64>,
}

impl Generations {
    pub fn new() -> Self {
        Self {
            known: Mutex::new(Known::default()),
            resyncs: watch::channel(0).0,
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The generation of `route`; 0 for a route that was never bumped or is not tracked.
    pub fn get(&self, route: &str) -> u64 {
        self.known().by_route.get(route).copied().unwrap_or(0)
    }

    /// Starts tracking `route` (at generation 0 until the store says otherwise).
    pub fn track(&self, route: &str) {
        let mut known = self.known();
        if !known.by_route.contains_key(route) {
            let name: Arc<str> = route.into();
            known.by_key.insert(generation_key(route), name.clone());
            known.by_route.insert(name, 0);
        }
    }

    /// Every tracked route.
    pub fn routes(&self) -> Vec<Arc<str>> {
        self.known().by_route.keys().cloned().collect()
    }

    /// Raises `route`'s generation to `generation` (never lowers it).
    pub fn raise(&self, route: &str, generation: u64) {
        if let Some(current) = self.known().by_route.get_mut(route) {
            *current = (*current).max(generation);
        }
    }

    /// A GENERATION event: raises the route it names, if this process tracks it.
    pub fn heard(&self, key: &KeyHash, generation: u64) {
        let mut known = self.known();
        if let Some(route) = known.by_key.get(key).cloned()
            && let Some(current) = known.by_route.get_mut(&route)
        {
            *current = (*current).max(generation);
        }
    }

    /// The bus may have lost events: the tracking task re-reads every generation.
    pub fn resynced(&self) {
        self.resyncs.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.resyncs.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_only_grow_and_events_find_their_route() {
        let generations = Generations::new();
        generations.track("reports");
        assert_eq!(generations.get("reports"), 0);
        generations.heard(&generation_key("reports"), 3);
        assert_eq!(generations.get("reports"), 3);
        generations.heard(&generation_key("reports"), 2);
        generations.raise("reports", 1);
        assert_eq!(generations.get("reports"), 3, "a late, older number");
        generations.heard(&generation_key("other"), 9);
        assert_eq!(generations.get("other"), 0, "an untracked route");
        assert_ne!(generation_key("reports"), generation_key("other"));
    }
}
