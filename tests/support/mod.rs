//! Shared support for integration tests: real `redis-server` / `nats-server`
//! children on ephemeral loopback ports, plus a bounded polling helper; for
//! the proxy, an in-process HTTP upstream ([`upstream`]), an HTTP client
//! ([`http`]), in-process replicas ([`proxy`]) and `corral serve` processes
//! ([`process`]); for the metrics and dashboards, a run that produces every outcome
//! ([`workload`]) and a real Prometheus ([`prometheus`]); for faults, a TCP proxy that misbehaves on
//! demand ([`fault`]).
//!
//! Declared once by each test binary (`tests/it/main.rs`, `tests/chaos/main.rs`).
#![allow(dead_code)]

pub mod cluster;
pub mod fault;
pub mod http;
pub mod process;
pub mod prometheus;
pub mod proxy;
pub mod raw;
pub mod secured;
pub mod servers;
pub mod stale;
pub mod topology;
pub mod upstream;
pub mod workload;

pub use servers::{TestNats, TestRedis};

use std::future::Future;
use std::time::Duration;

pub use wall_clock::Deadline;

/// Real (wall-clock) deadlines.
///
/// The helpers here wait on real processes, so they measure real time, not
/// tokio's clock (which a test may pause). Do not combine these helpers with
/// `tokio::time::pause` / `start_paused`: the I/O timeouts inside them run on
/// tokio's clock and would fire early when paused time auto-advances.
mod wall_clock {
    #![allow(clippy::disallowed_types)] // std Instant on purpose: see above

    use std::time::{Duration, Instant};

    #[derive(Clone, Copy, Debug)]
    pub struct Deadline(Instant);

    impl Deadline {
        /// A deadline `d` from now.
        pub fn after(d: Duration) -> Self {
            Deadline(Instant::now() + d)
        }

        /// Whether the deadline has passed.
        pub fn expired(&self) -> bool {
            Instant::now() >= self.0
        }

        /// Time left until the deadline (zero once it has passed).
        pub fn remaining(&self) -> Duration {
            self.0.saturating_duration_since(Instant::now())
        }
    }
}

/// Default patience for [`eventually`], in seconds.
const DEFAULT_PATIENCE_SECS: u64 = 10;

/// How long [`eventually`] waits before giving up: 10 s by default, or the
/// number of seconds in `CORRAL_TEST_PATIENCE_SECS` when that is larger
/// (for slow or heavily loaded machines).
pub fn patience() -> Duration {
    let from_env = std::env::var("CORRAL_TEST_PATIENCE_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    Duration::from_secs(from_env.max(DEFAULT_PATIENCE_SECS))
}

/// Polls `f` every 20 ms until it yields `true`; panics mentioning `what` if
/// that does not happen within [`patience`]. A single call of `f` that hangs
/// is also cut off at the deadline.
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let patience = patience();
    let deadline = Deadline::after(patience);
    let mut attempts: u64 = 0;
    loop {
        attempts += 1;
        match tokio::time::timeout(deadline.remaining(), f()).await {
            Ok(true) => return,
            Ok(false) => {}
            Err(_) => panic!(
                "timed out after {patience:?} waiting for: {what} \
                 (the last of {attempts} checks did not finish in time)"
            ),
        }
        if deadline.expired() {
            panic!("timed out after {patience:?} ({attempts} checks) waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
