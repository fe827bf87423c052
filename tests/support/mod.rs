//! Shared support for integration tests: real `redis-server` / `nats-server`
//! children on ephemeral loopback ports, plus a bounded polling helper.
//!
//! Include from an integration test with `mod support;`.
#![allow(dead_code)]

pub mod servers;

pub use servers::{TestNats, TestRedis};

use std::future::Future;
use std::time::{Duration, Instant};

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
    let deadline = Instant::now() + patience;
    let mut attempts: u64 = 0;
    loop {
        attempts += 1;
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, f()).await {
            Ok(true) => return,
            Ok(false) => {}
            Err(_) => panic!(
                "timed out after {patience:?} waiting for: {what} \
                 (the last of {attempts} checks did not finish in time)"
            ),
        }
        if Instant::now() >= deadline {
            panic!("timed out after {patience:?} ({attempts} checks) waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
