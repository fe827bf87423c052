//! Where a server is in its life (starting, serving, stopping), shared by its listeners, the
//! readiness check and the shutdown sequence.

use std::sync::atomic::{AtomicU8, Ordering};

/// Where a server is in its life, as `/readyz` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The config is loaded and checked, but the server has not started serving it yet.
    Starting,
    /// Both listeners serve the loaded config.
    Serving,
    /// Shutdown began: requests in flight finish, a load balancer should send no more.
    Stopping,
}

/// A server's [`Phase`], shared by its listeners; one atomic, so `/readyz` stays cheap.
#[derive(Debug)]
pub struct Lifecycle(AtomicU8);

impl Lifecycle {
    /// A lifecycle in [`Phase::Starting`].
    pub fn new() -> Self {
        Self(AtomicU8::new(Phase::Starting as u8))
    }

    pub fn phase(&self) -> Phase {
        match self.0.load(Ordering::SeqCst) {
            0 => Phase::Starting,
            1 => Phase::Serving,
            _ => Phase::Stopping,
        }
    }

    /// Moves to `phase`; a server that began stopping never goes back to serving.
    pub fn enter(&self, phase: Phase) {
        let _ = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| {
                (now != Phase::Stopping as u8).then_some(phase as u8)
            });
    }
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}
