//! Upstream slots: how many upstream requests one route may have in flight at once on this
//! replica (`max_upstream_fetches`), in two budgets of that size each: fills (fetches under the
//! lease, and degraded builds) and passes (pass-throughs and a request's own fetch of a key that
//! may not be shared). A pass streams to one client, at that client's pace; a fill answers
//! everyone waiting on a key. So passes, however many or slow, never take a fill's slot.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Which of a route's two budgets an upstream request takes its slot from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Budget {
    /// A fetch whose answer may be shared: under the lease, or a degraded build.
    Fill,
    /// An answer for one client: a pass-through, or a request's own fetch.
    Pass,
}

impl Budget {
    /// The `limit` label a refusal is counted under.
    pub(super) fn limit(self) -> &'static str {
        match self {
            Budget::Fill => "upstream_fetches",
            Budget::Pass => "upstream_passes",
        }
    }
}

/// One semaphore per route name and budget; a reload that changes a route's limit starts a new
/// one (requests holding a slot of the old one finish on it).
#[derive(Default)]
pub(super) struct UpstreamSlots {
    /// (Route name, budget) → its slots.
    routes: Mutex<HashMap<(String, Budget), Slots>>,
}

/// A route's `max_upstream_fetches` when its semaphore was made, and the semaphore.
type Slots = (usize, Arc<Semaphore>);

impl UpstreamSlots {
    /// A slot of `budget` for one upstream request of `route`, waiting until `deadline` at most;
    /// `None` when none came free in time.
    pub(super) async fn take(
        &self,
        route: &str,
        budget: Budget,
        limit: usize,
        deadline: Instant,
    ) -> Option<OwnedSemaphorePermit> {
        let semaphore = {
            let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
            let name = (route.to_owned(), budget);
            match routes.get(&name) {
                Some((known, semaphore)) if *known == limit => semaphore.clone(),
                _ => {
                    let semaphore = Arc::new(Semaphore::new(limit));
                    routes.insert(name, (limit, semaphore.clone()));
                    semaphore
                }
            }
        };
        match semaphore.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => tokio::time::timeout_at(deadline, semaphore.acquire_owned())
                .await
                .ok()?
                .ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_request_waits_for_a_slot_within_its_deadline() {
        let slots = UpstreamSlots::default();
        let soon = || Instant::now() + Duration::from_secs(1);
        let first = slots
            .take("r", Budget::Fill, 1, soon())
            .await
            .expect("a free slot");
        assert!(
            slots.take("r", Budget::Fill, 1, soon()).await.is_none(),
            "over the limit"
        );
        // Another route has its own slots, and so do the route's passes.
        assert!(slots.take("other", Budget::Fill, 1, soon()).await.is_some());
        let pass = slots.take("r", Budget::Pass, 1, soon()).await;
        assert!(pass.is_some(), "a pass waited on a fill");
        let waiting = tokio::spawn(async move {
            let slots = slots;
            slots
                .take(
                    "r",
                    Budget::Fill,
                    1,
                    Instant::now() + Duration::from_secs(5),
                )
                .await
                .is_some()
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        drop(first);
        assert!(waiting.await.unwrap(), "the freed slot went to the waiter");
    }
}
