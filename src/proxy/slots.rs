//! Upstream slots: how many upstream requests one route may have in flight at once on this
//! replica (`max_upstream_fetches`), fetches under the lease, a request's own fetches and
//! pass-throughs alike.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// One semaphore per route name; a reload that changes a route's limit starts a new one (requests
/// holding a slot of the old one finish on it).
#[derive(Default)]
pub(super) struct UpstreamSlots {
    /// Route name → (its `max_upstream_fetches`, its slots).
    routes: Mutex<HashMap<String, (usize, Arc<Semaphore>)>>,
}

impl UpstreamSlots {
    /// A slot for one upstream request of `route`, waiting until `deadline` at most; `None` when
    /// none came free in time.
    pub(super) async fn take(
        &self,
        route: &str,
        limit: usize,
        deadline: Instant,
    ) -> Option<OwnedSemaphorePermit> {
        let semaphore = {
            let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
            match routes.get(route) {
                Some((known, semaphore)) if *known == limit => semaphore.clone(),
                _ => {
                    let semaphore = Arc::new(Semaphore::new(limit));
                    routes.insert(route.to_owned(), (limit, semaphore.clone()));
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
        let first = slots.take("r", 1, soon()).await.expect("a free slot");
        assert!(slots.take("r", 1, soon()).await.is_none(), "over the limit");
        // Another route has its own slots.
        assert!(slots.take("other", 1, soon()).await.is_some());
        let waiting = tokio::spawn(async move {
            let slots = slots;
            slots
                .take("r", 1, Instant::now() + Duration::from_secs(5))
                .await
                .is_some()
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        drop(first);
        assert!(waiting.await.unwrap(), "the freed slot went to the waiter");
    }
}
