//! In-process bus: every [`MemoryBus`] connected to one [`MemoryBusHub`] hears every event published
//! on that hub, including its own (as with Redis and NATS, a publisher also receives what it sends).
//!
//! It stands in for a shared bus when several engines run in one process (tests, demos, a single
//! replica). A hub is one namespace: buses on different hubs never hear each other.
//!
//! Delivery goes through a bounded [`broadcast`] channel. A bus whose delivery task falls more than
//! the hub's capacity behind loses the oldest events and calls [`EventSink::resync`], exactly as a
//! networked bus does after a disconnection.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{broadcast, mpsc, oneshot};

use super::tasks::{Shutdown, Tasks};
use super::{Bus, BusError, Event, EventSink};
use crate::key::KeyHash;

/// Events a receiver may fall behind by before it lags (and resyncs).
pub const DEFAULT_CAPACITY: usize = 4096;

/// The shared medium of in-process buses; cheap to clone (clones are the same hub).
#[derive(Clone)]
pub struct MemoryBusHub {
    /// Sending half of the broadcast; every connected bus holds a receiver made from it.
    tx: broadcast::Sender<Bytes>,
}

impl MemoryBusHub {
    pub fn new() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }

    /// A hub whose receivers lag (and resync) once `capacity` events are waiting for them.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            tx: broadcast::channel(capacity.max(1)).0,
        }
    }

    /// Number of buses currently listening on this hub.
    pub fn listeners(&self) -> usize {
        self.tx.receiver_count()
    }
}

impl Default for MemoryBusHub {
    fn default() -> Self {
        Self::new()
    }
}

/// One process's connection to a [`MemoryBusHub`].
pub struct MemoryBus {
    /// The hub published to, and resubscribed to by [`Bus::sever`].
    hub: MemoryBusHub,
    /// Asks the delivery task to drop its receiver and take a fresh one (fault injection); the
    /// reply says the fresh receiver is in place.
    #[cfg_attr(not(any(test, feature = "test-util")), allow(dead_code))]
    sever_tx: mpsc::Sender<oneshot::Sender<()>>,
    /// Told about a sever after the fresh receiver is in place.
    #[cfg_attr(not(any(test, feature = "test-util")), allow(dead_code))]
    sink: Arc<dyn EventSink>,
    /// The delivery task and its shutdown signal.
    tasks: Tasks,
}

impl MemoryBus {
    /// Subscribes to `hub` at once (before returning) and starts delivering to `sink`.
    pub fn connect(hub: &MemoryBusHub, sink: Arc<dyn EventSink>) -> MemoryBus {
        let rx = hub.tx.subscribe();
        let (sever_tx, sever_rx) = mpsc::channel(1);
        let tasks = Tasks::new();
        tasks.spawn(deliver(
            hub.clone(),
            rx,
            sever_rx,
            sink.clone(),
            tasks.shutdown(),
        ));
        MemoryBus {
            hub: hub.clone(),
            sever_tx,
            sink,
            tasks,
        }
    }
}

/// Hands everything the receiver gets to the sink until shutdown.
async fn deliver(
    hub: MemoryBusHub,
    mut rx: broadcast::Receiver<Bytes>,
    mut sever_rx: mpsc::Receiver<oneshot::Sender<()>>,
    sink: Arc<dyn EventSink>,
    mut shutdown: Shutdown,
) {
    loop {
        tokio::select! {
            biased;
            () = shutdown.wait() => return,
            Some(done) = sever_rx.recv() => {
                // Whatever was queued for the old receiver is lost, as on a real disconnection.
                rx = hub.tx.subscribe();
                let _ = done.send(());
            }
            received = rx.recv() => match received {
                Ok(bytes) => match Event::decode(bytes) {
                    Ok(event) => sink.deliver(event),
                    Err(_) => sink.undecodable(),
                },
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "memory bus receiver lagged; resyncing");
                    sink.resync();
                }
                // Unreachable while `hub` (a sender) lives here; stop rather than spin.
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

#[async_trait]
impl Bus for MemoryBus {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn publish(&self, _key: &KeyHash, encoded: Bytes) -> Result<(), BusError> {
        if self.tasks.is_closed() {
            return Err(BusError::Unavailable("memory bus is closed".into()));
        }
        // An error only means nobody listens right now, which is not a failure to publish.
        let _ = self.hub.tx.send(encoded);
        Ok(())
    }

    fn connected(&self) -> bool {
        !self.tasks.is_closed()
    }

    async fn close(&self) {
        self.tasks.close().await;
    }

    /// Drops the delivery task's receiver (events queued for it are lost), subscribes afresh, then
    /// resyncs: the same sequence as a networked bus losing and regaining its subscription.
    #[cfg(any(test, feature = "test-util"))]
    async fn sever(&self) {
        let (done_tx, done_rx) = oneshot::channel();
        if self.sever_tx.send(done_tx).await.is_err() {
            return; // closed
        }
        if tokio::time::timeout(super::tasks::CLOSE_GRACE, done_rx)
            .await
            .is_ok_and(|answered| answered.is_ok())
        {
            self.sink.resync();
        }
    }
}
