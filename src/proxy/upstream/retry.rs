//! Retries: which requests may be sent again, for which failures, and the budget that keeps a
//! struggling upstream from being stormed by them.
//!
//! A request is retried only when sending it twice means the same as sending it once (the
//! idempotent methods of RFC 9110 section 9.2.2; a POST never) and its body can be sent again
//! (buffered), and only before any byte of the answer reached the client: on a connect error, a
//! reset before the response head, `response_header_timeout`, or a status in `retries.on`. Each
//! retry goes to another server when the pool has one in rotation.
//!
//! The budget, as Finagle's and Envoy's: within a sliding `budget_window`, retries may be at most
//! `budget` percent of the requests, plus `min_per_second` for each second of the window so a
//! quiet route can still retry. When every server fails, the upstream sees at most that many
//! requests more than it would have without retries.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use http::Method;
use tokio::time::Instant;

use crate::config::RetrySettings;

/// Why a try is retried: the `reason` label of `corral_upstream_retries_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryReason {
    Connect,
    Reset,
    ResponseHeaderTimeout,
    Status,
}

impl RetryReason {
    pub fn label(self) -> &'static str {
        match self {
            RetryReason::Connect => "connect",
            RetryReason::Reset => "reset",
            RetryReason::ResponseHeaderTimeout => "response_header_timeout",
            RetryReason::Status => "status",
        }
    }
}

/// Whether a request with this method may be sent twice (RFC 9110 section 9.2.2).
pub fn idempotent(method: &Method) -> bool {
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(method)
}

/// A route's retry budget over a sliding window of one-second buckets.
pub(super) struct Budget {
    settings: RetrySettings,
    start: Instant,
    buckets: Mutex<VecDeque<Bucket>>,
}

/// One second's requests and retries.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    second: u64,
    requests: u64,
    retries: u64,
}

impl Budget {
    pub fn new(settings: &RetrySettings) -> Self {
        Budget {
            settings: settings.clone(),
            start: Instant::now(),
            buckets: Mutex::new(VecDeque::new()),
        }
    }

    /// Counts one request (its first try), which earns the budget its share.
    pub fn deposit(&self) {
        self.with_current(|bucket| bucket.requests += 1);
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub fn withdraw(&self) -> bool {
        let window_seconds = self.window_seconds();
        let floor = u64::from(self.settings.min_per_second) * window_seconds;
        let percent = u64::from(self.settings.budget);
        let mut allowed = false;
        self.with_current_and_window(|bucket, requests, retries| {
            // retries + 1 <= floor + requests * percent / 100, in whole numbers.
            if (retries + 1) * 100 <= floor * 100 + requests * percent {
                bucket.retries += 1;
                allowed = true;
            }
        });
        allowed
    }

    fn window_seconds(&self) -> u64 {
        self.settings.budget_window.as_secs().max(1)
    }

    fn with_current(&self, change: impl FnOnce(&mut Bucket)) {
        self.with_current_and_window(|bucket, _, _| change(bucket));
    }

    /// Calls `change` with this second's bucket and the window's totals of requests and retries,
    /// after dropping the buckets that left the window.
    fn with_current_and_window(&self, change: impl FnOnce(&mut Bucket, u64, u64)) {
        let second = self.start.elapsed().as_secs();
        let window = self.window_seconds();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        while buckets.front().is_some_and(|b| b.second + window <= second) {
            buckets.pop_front();
        }
        if buckets.back().is_none_or(|b| b.second != second) {
            buckets.push_back(Bucket {
                second,
                requests: 0,
                retries: 0,
            });
        }
        let (requests, retries) = buckets
            .iter()
            .fold((0, 0), |(q, r), b| (q + b.requests, r + b.retries));
        let current = buckets.back_mut().expect("pushed above");
        change(current, requests, retries);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn budget(percent: u8, min_per_second: u32) -> Budget {
        Budget::new(&RetrySettings {
            budget: percent,
            min_per_second,
            budget_window: Duration::from_secs(10),
            ..RetrySettings::pool()
        })
    }

    fn retries_allowed(budget: &Budget) -> usize {
        (0..100_000).take_while(|_| budget.withdraw()).count()
    }

    #[test]
    fn idempotent_methods_are_those_of_rfc_9110() {
        for method in [Method::GET, Method::HEAD, Method::PUT, Method::DELETE] {
            assert!(idempotent(&method), "{method}");
        }
        for method in [Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(!idempotent(&method), "{method}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_a_share_of_the_requests_plus_a_floor_per_second() {
        let budget = budget(20, 3);
        for _ in 0..100 {
            budget.deposit();
        }
        // 20% of 100, plus 3 a second over 10 seconds.
        assert_eq!(retries_allowed(&budget), 20 + 30);
        budget.deposit();
        budget.deposit();
        budget.deposit();
        budget.deposit();
        budget.deposit();
        assert_eq!(retries_allowed(&budget), 1, "105 requests earn one more");
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_route_can_still_retry() {
        let budget = budget(20, 1);
        assert_eq!(retries_allowed(&budget), 10);
        let none = self::budget(20, 0);
        assert_eq!(retries_allowed(&none), 0);
        none.deposit();
        none.deposit();
        none.deposit();
        none.deposit();
        assert_eq!(retries_allowed(&none), 0, "4 requests earn 0.8 of a retry");
        none.deposit();
        assert_eq!(retries_allowed(&none), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn what_left_the_window_no_longer_counts() {
        let budget = budget(50, 0);
        for _ in 0..10 {
            budget.deposit();
        }
        assert_eq!(retries_allowed(&budget), 5);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(retries_allowed(&budget), 0, "the window still holds them");
        for _ in 0..4 {
            budget.deposit();
        }
        assert_eq!(retries_allowed(&budget), 2, "(10 + 4) / 2 - 5");
        // The first second's requests and retries leave together.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(retries_allowed(&budget), 0, "4 / 2 - 2");
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(retries_allowed(&budget), 0);
        budget.deposit();
        budget.deposit();
        assert_eq!(retries_allowed(&budget), 1);
    }
}
