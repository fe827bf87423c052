//! Where one server stands: up or down by its health checks, and ejected for a while by its own
//! failures (outlier ejection).
//!
//! A server that fails `outlier.failures` requests in a row (a connect error, a reset or timeout
//! before the response head, or a 5xx) is ejected for `outlier.ejection`; each ejection that
//! follows before it has served well for as long again doubles the time, up to
//! `outlier.max_ejection`. At most `outlier.max_ejected` of the pool is ejected at once (at least
//! one server may be): past that, a failing server stays in rotation, since ejecting it would
//! pile its share onto servers that may be failing too. A passed health check ends an ejection
//! at once.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::{HealthSettings, OutlierSettings};

/// What the active health checks last concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Health {
    /// In rotation (every server starts so).
    Up,
    /// Failed `health.unhealthy` checks in a row: out until it passes `health.healthy`.
    Down,
}

/// One server's standing.
#[derive(Debug)]
pub(super) struct Standing {
    pub health: Health,
    /// Checks in a row that disagree with `health` (passes while down, failures while up).
    against: u32,
    /// Requests failed in a row.
    failures: u32,
    /// Out of rotation until then.
    ejected_until: Option<Instant>,
    /// Ejections in a row, each twice as long as the one before.
    streak: u32,
    /// When the last request or check failed, to pick among servers that are all out.
    pub last_failure: Option<Instant>,
}

/// What one outcome changed, for the log and metrics.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Change {
    None,
    Ejected(Duration),
    Down,
    Up,
}

impl Default for Standing {
    fn default() -> Self {
        Standing {
            health: Health::Up,
            against: 0,
            failures: 0,
            ejected_until: None,
            streak: 0,
            last_failure: None,
        }
    }
}

impl Standing {
    /// Whether requests may go to the server now.
    pub fn available(&self, now: Instant) -> bool {
        self.health == Health::Up && !self.ejected(now)
    }

    pub fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }

    /// A request answered well: its failures in a row end, and once it has been back for as long
    /// as its last ejection, its streak too.
    pub fn succeeded(&mut self, now: Instant, settings: &OutlierSettings) {
        self.failures = 0;
        if let Some(until) = self.ejected_until
            && now >= until + ejection(settings, self.streak.saturating_sub(1))
        {
            self.streak = 0;
            self.ejected_until = None;
        }
    }

    /// A request failed; `may_eject` is whether the pool has room for one more ejection.
    pub fn failed(&mut self, now: Instant, settings: &OutlierSettings, may_eject: bool) -> Change {
        self.last_failure = Some(now);
        self.failures = self.failures.saturating_add(1);
        if self.failures < settings.failures || self.ejected(now) || !may_eject {
            return Change::None;
        }
        let length = ejection(settings, self.streak);
        self.ejected_until = Some(now + length);
        self.streak = self.streak.saturating_add(1);
        self.failures = 0;
        Change::Ejected(length)
    }

    /// One health check's verdict.
    pub fn checked(&mut self, passed: bool, now: Instant, settings: &HealthSettings) -> Change {
        if passed {
            // A live server is not kept out by its past failures (its streak is kept).
            if self.ejected(now) {
                self.ejected_until = Some(now);
            }
            self.failures = 0;
        } else {
            self.last_failure = Some(now);
        }
        let agrees = (self.health == Health::Up) == passed;
        if agrees {
            self.against = 0;
            return Change::None;
        }
        self.against += 1;
        match self.health {
            Health::Up if self.against >= settings.unhealthy => {
                self.health = Health::Down;
                self.against = 0;
                Change::Down
            }
            Health::Down if self.against >= settings.healthy => {
                self.health = Health::Up;
                self.against = 0;
                Change::Up
            }
            _ => Change::None,
        }
    }
}

/// The length of ejection number `streak` (0 for the first): the base, doubled for each one
/// before it, at most the max.
pub(super) fn ejection(settings: &OutlierSettings, streak: u32) -> Duration {
    let doubled = settings
        .ejection
        .saturating_mul(1u32.checked_shl(streak.min(31)).unwrap_or(u32::MAX));
    doubled.min(settings.max_ejection)
}

/// How many of `servers` may be ejected at once: `max_ejected` percent, at least one.
pub(super) fn max_ejected(settings: &OutlierSettings, servers: usize) -> usize {
    (servers * usize::from(settings.max_ejected) / 100).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> OutlierSettings {
        OutlierSettings {
            failures: 3,
            ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(60),
            max_ejected: 50,
        }
    }

    fn health() -> HealthSettings {
        HealthSettings {
            path: "/health".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy: 2,
            unhealthy: 3,
            statuses: vec![(200, 399)],
        }
    }

    /// Fails `standing` until it is ejected; returns the ejection's length.
    fn fail_until_ejected(standing: &mut Standing, now: Instant) -> Duration {
        let settings = settings();
        for _ in 1..settings.failures {
            assert_eq!(standing.failed(now, &settings, true), Change::None);
            assert!(standing.available(now));
        }
        match standing.failed(now, &settings, true) {
            Change::Ejected(length) => length,
            other => panic!("not ejected: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn each_ejection_in_a_row_is_twice_as_long_up_to_the_max() {
        let mut standing = Standing::default();
        let mut lengths = Vec::new();
        for _ in 0..5 {
            let length = fail_until_ejected(&mut standing, Instant::now());
            assert!(!standing.available(Instant::now()));
            tokio::time::advance(length).await;
            assert!(
                standing.available(Instant::now()),
                "still out after {length:?}"
            );
            lengths.push(length.as_secs());
        }
        assert_eq!(lengths, [10, 20, 40, 60, 60]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_that_served_well_long_enough_starts_its_streak_again() {
        let settings = settings();
        let mut standing = Standing::default();
        let first = fail_until_ejected(&mut standing, Instant::now());
        tokio::time::advance(first).await;
        // Back, and answering well for as long as it was out.
        standing.succeeded(Instant::now(), &settings);
        tokio::time::advance(first).await;
        standing.succeeded(Instant::now(), &settings);
        assert_eq!(fail_until_ejected(&mut standing, Instant::now()), first);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_between_failures_starts_the_count_again() {
        let settings = settings();
        let mut standing = Standing::default();
        let now = Instant::now();
        for _ in 0..10 {
            standing.failed(now, &settings, true);
            standing.failed(now, &settings, true);
            standing.succeeded(now, &settings);
        }
        assert!(standing.available(now));
    }

    #[tokio::test(start_paused = true)]
    async fn no_room_in_the_pool_keeps_a_failing_server_in() {
        let settings = settings();
        let mut standing = Standing::default();
        let now = Instant::now();
        for _ in 0..10 {
            assert_eq!(standing.failed(now, &settings, false), Change::None);
        }
        assert!(standing.available(now));
    }

    #[test]
    fn at_most_the_share_is_ejected_and_at_least_one() {
        let half = settings();
        assert_eq!(max_ejected(&half, 3), 1);
        assert_eq!(max_ejected(&half, 4), 2);
        assert_eq!(max_ejected(&half, 10), 5);
        assert_eq!(max_ejected(&half, 1), 1);
        let tenth = OutlierSettings {
            max_ejected: 10,
            ..settings()
        };
        assert_eq!(max_ejected(&tenth, 5), 1);
        assert_eq!(max_ejected(&tenth, 30), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn health_checks_take_a_server_down_and_bring_it_back_by_their_thresholds() {
        let health = health();
        let mut standing = Standing::default();
        let now = Instant::now();
        assert_eq!(standing.checked(false, now, &health), Change::None);
        assert_eq!(standing.checked(false, now, &health), Change::None);
        assert_eq!(standing.checked(false, now, &health), Change::Down);
        assert!(!standing.available(now));
        assert_eq!(standing.checked(true, now, &health), Change::None);
        assert_eq!(standing.checked(true, now, &health), Change::Up);
        assert!(standing.available(now));
    }

    #[tokio::test(start_paused = true)]
    async fn a_passed_check_ends_an_ejection() {
        let mut standing = Standing::default();
        fail_until_ejected(&mut standing, Instant::now());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!standing.available(Instant::now()));
        standing.checked(true, Instant::now(), &health());
        assert!(standing.available(Instant::now()));
    }
}
