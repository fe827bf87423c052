//! Background tasks of one bus: a shutdown signal they all watch, and their handles so that
//! [`Bus::close`](super::Bus::close) can wait for them and `Drop` can abort them.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long `close` waits for a bus's tasks to notice the shutdown before aborting them.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// The tasks of one bus and the signal that stops them.
pub(crate) struct Tasks {
    /// Flipped to `true` once by `close`; every task selects on it, so none outlives the bus.
    shutdown: watch::Sender<bool>,
    /// Handles of the spawned tasks: awaited by `close`, aborted on `Drop` (a bus dropped without
    /// `close` must not leave a task delivering to a sink nobody expects to hear from).
    handles: Mutex<Vec<JoinHandle<()>>>,
}

/// A task's view of the shutdown signal.
#[derive(Clone)]
pub(crate) struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Resolves once the bus is closing (or its `Tasks` is gone).
    pub(crate) async fn wait(&mut self) {
        let _ = self.0.wait_for(|closing| *closing).await;
    }
}

impl Tasks {
    pub(crate) fn new() -> Self {
        Self {
            shutdown: watch::channel(false).0,
            handles: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn shutdown(&self) -> Shutdown {
        Shutdown(self.shutdown.subscribe())
    }

    pub(crate) fn is_closed(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Spawns `task` on the current runtime; it must end soon after [`Shutdown::wait`] resolves.
    pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task);
        lock(&self.handles).push(handle);
    }

    /// Signals shutdown and waits up to [`CLOSE_GRACE`] for every task, aborting the late ones.
    /// Returns whether this call was the one that closed (so `close` stays idempotent).
    pub(crate) async fn close(&self) -> bool {
        let first = !self.shutdown.send_replace(true);
        let handles = std::mem::take(&mut *lock(&self.handles));
        let deadline = tokio::time::Instant::now() + CLOSE_GRACE;
        for mut handle in handles {
            if tokio::time::timeout_at(deadline, &mut handle)
                .await
                .is_err()
            {
                tracing::warn!("bus task did not stop within {CLOSE_GRACE:?}; aborting it");
                handle.abort();
            }
        }
        first
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
        let handles = self
            .handles
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for handle in handles.drain(..) {
            handle.abort();
        }
    }
}

/// Locks a mutex whose data stays valid even if a holder panicked (a list of handles, an id).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
