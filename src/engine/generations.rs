//! Route generations: a per-route number that is part of every key of the route, so purging a
//! whole route is one increment in the store instead of a walk over its keys.
//!
//! The store holds each route's generation; this process keeps a copy of the generations of the
//! routes it serves, and that copy only ever comes from the store. It reads every generation when
//! it starts and whenever the bus tells it that events may have been lost, and re-reads one route
//! when a GENERATION event names it: the event is a prompt, never a number to adopt, so a forged
//! event (anyone who can publish on the bus can send one) costs one store read and cannot move a
//! route to a generation the store does not hold.
//!
//! A read *sets* the copy, so every process keys a route by what the store says even if the store
//! went back (a flushed store). Reads may overlap; each one takes a ticket before it asks the
//! store, and an answer only replaces one from a read that started earlier.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::key::{KeyHash, generation_key};

/// What this process knows of one route.
#[derive(Default)]
struct Tracked {
    /// The generation the store answered.
    generation: u64,
    /// Ticket of the read that answered it; an answer with an older ticket is dropped.
    ticket: u64,
}

#[derive(Default)]
struct Known {
    /// By route name.
    by_route: HashMap<Arc<str>, Tracked>,
    /// Route name by [`generation_key`], to map an event back to its route.
    by_key: HashMap<KeyHash, Arc<str>>,
    /// Routes a GENERATION event named since the tracking task last read them.
    prompted: HashSet<Arc<str>>,
    /// Last ticket handed out.
    tickets: u64,
}

/// The generations this process keys its routes with.
pub(crate) struct Generations {
    known: Mutex<Known>,
    /// Bumped on each bus resync (re-read everything) and each prompt (re-read
    /// [`Known::prompted`]); the tracking task wakes on it.
    wake: watch::Sender<Wake>,
}

/// What the tracking task is woken for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Wake {
    /// Resyncs so far; a change means re-read every route.
    pub resyncs: u64,
    /// Prompts so far; a change means re-read the prompted routes.
    pub prompts: u64,
}

/// A reservation of the right to set a generation, taken before the store is asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ticket(u64);

impl Generations {
    pub fn new() -> Self {
        Self {
            known: Mutex::new(Known::default()),
            wake: watch::channel(Wake::default()).0,
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The generation of `route`; 0 for a route that was never bumped or is not tracked.
    pub fn get(&self, route: &str) -> u64 {
        self.known()
            .by_route
            .get(route)
            .map_or(0, |tracked| tracked.generation)
    }

    /// Starts tracking `route` (at generation 0 until the store says otherwise).
    pub fn track(&self, route: &str) {
        let mut known = self.known();
        if !known.by_route.contains_key(route) {
            let name: Arc<str> = route.into();
            known.by_key.insert(generation_key(route), name.clone());
            known.by_route.insert(name, Tracked::default());
        }
    }

    /// Every tracked route.
    pub fn routes(&self) -> Vec<Arc<str>> {
        self.known().by_route.keys().cloned().collect()
    }

    /// Takes a ticket for a store read (or bump) about to start.
    pub fn ticket(&self) -> Ticket {
        let mut known = self.known();
        known.tickets += 1;
        Ticket(known.tickets)
    }

    /// Sets `route`'s generation to what the store answered a read that took `ticket`, unless a
    /// read that started later already answered. Answers whether it was set.
    pub fn set(&self, route: &str, generation: u64, ticket: Ticket) -> bool {
        let mut known = self.known();
        match known.by_route.get_mut(route) {
            Some(tracked) if tracked.ticket < ticket.0 => {
                *tracked = Tracked {
                    generation,
                    ticket: ticket.0,
                };
                true
            }
            _ => false,
        }
    }

    /// A GENERATION event about `key`: if it names a tracked route, the tracking task re-reads
    /// that route from the store. The number the event carries is not used.
    pub fn heard(&self, key: &KeyHash) {
        let mut known = self.known();
        let Some(route) = known.by_key.get(key).cloned() else {
            return;
        };
        if known.prompted.insert(route) {
            self.wake
                .send_modify(|wake| wake.prompts = wake.prompts.wrapping_add(1));
        }
    }

    /// The routes prompted since the last call, to re-read now.
    pub fn take_prompted(&self) -> Vec<Arc<str>> {
        self.known().prompted.drain().collect()
    }

    /// The bus may have lost events: the tracking task re-reads every generation.
    pub fn resynced(&self) {
        self.wake
            .send_modify(|wake| wake.resyncs = wake.resyncs.wrapping_add(1));
    }

    pub fn subscribe(&self) -> watch::Receiver<Wake> {
        self.wake.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_read_sets_the_generation_even_downwards() {
        let generations = Generations::new();
        generations.track("reports");
        assert_eq!(generations.get("reports"), 0);
        let (early, late) = (generations.ticket(), generations.ticket());
        assert!(generations.set("reports", 3, late));
        assert!(
            !generations.set("reports", 2, early),
            "an answer to an older read"
        );
        assert_eq!(generations.get("reports"), 3);
        assert!(generations.set("reports", 1, generations.ticket()));
        assert_eq!(generations.get("reports"), 1, "the store went back");
        assert!(!generations.set("other", 9, generations.ticket()));
        assert_eq!(generations.get("other"), 0, "an untracked route");
    }

    #[test]
    fn an_event_prompts_a_read_of_its_route_once_and_carries_no_number() {
        let generations = Generations::new();
        generations.track("reports");
        let wake = generations.subscribe();
        for _ in 0..3 {
            generations.heard(&generation_key("reports"));
        }
        generations.heard(&generation_key("other"));
        assert_eq!(generations.get("reports"), 0, "the event moved nothing");
        assert_eq!(wake.borrow().prompts, 1, "one prompt until it is read");
        assert_eq!(
            generations.take_prompted(),
            vec![Arc::<str>::from("reports")]
        );
        assert!(generations.take_prompted().is_empty());
        assert_ne!(generation_key("reports"), generation_key("other"));
    }
}
