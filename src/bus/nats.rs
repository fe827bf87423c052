//! Core NATS bus: each key's events go to [`nats_subject`]; a process holds one subscription to
//! [`nats_wildcard`] of its namespace.
//!
//! # Recovery
//!
//! The client reconnects by itself (forever, with its own backoff) and re-sends its subscriptions on
//! every new connection. Its connection events reach a task of ours: `Disconnected` marks the bus
//! disconnected; the next `Connected` is followed by a round trip to the server (a request nobody
//! answers, which the server rejects with "no responders" only after it has processed everything
//! the client sent before, including the re-sent subscription), and then by one
//! [`EventSink::resync`]: events published while the connection was down are lost, and every live
//! flight re-checks the store instead.
//!
//! A `SlowConsumer` event (the subscription's buffer overflowed and messages were dropped) also
//! resyncs. If the subscription itself ends, it is made again (with backoff) and resynced.
//!
//! The same round trip ends [`NatsBus::connect`], so the server has the subscription before the
//! engine is handed the bus. It depends on nobody else on the server: a request "nobody answers"
//! would hang on any other client that listens on `>` and stays silent.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::{Client, ConnectOptions, Message, Subscriber};
use async_trait::async_trait;

use crate::credentials::Credentials;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};

use super::tasks::{CLOSE_GRACE, Shutdown, Tasks};
use super::{Bus, BusError, Event, EventSink, nats_subject, nats_wildcard};
use crate::key::KeyHash;

/// Bound on handing one event to the client (it only queues; this bites when its queue is full,
/// e.g. during a long disconnection).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(1);
/// First pause between attempts to remake a lost subscription; doubled up to
/// [`RETRY_MAX_DELAY`].
const RETRY_MIN_DELAY: Duration = Duration::from_millis(50);
/// Longest pause between attempts to remake a lost subscription.
const RETRY_MAX_DELAY: Duration = Duration::from_secs(1);

/// How to reach NATS and which namespace's events to carry.
#[derive(Clone)]
pub struct NatsBusConfig {
    /// `nats://host:port` (or several, comma-separated).
    pub url: String,
    /// One subject token: ASCII letters, digits, `-` and `_`.
    pub namespace: String,
    /// Bound on connecting at start (a dead server is an error, not a wait), and on each round trip
    /// that confirms a subscription.
    pub connect_timeout: Duration,
    /// Credentials and TLS beyond what the url carries.
    pub credentials: Credentials,
}

impl NatsBusConfig {
    /// A config with the default connect timeout (2 s).
    pub fn new(url: impl Into<String>, namespace: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            namespace: namespace.into(),
            connect_timeout: Duration::from_secs(2),
            credentials: Credentials::default(),
        }
    }
}

// Written by hand so that a password in the url never reaches a log line.
impl std::fmt::Debug for NatsBusConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBusConfig")
            .field("url", &crate::credentials::redact(&self.url))
            .field("namespace", &self.namespace)
            .field("connect_timeout", &self.connect_timeout)
            .field("credentials", &self.credentials)
            .finish()
    }
}

/// Whether `namespace` can be one NATS subject token (and so cannot reach into another namespace's
/// subjects through `.`, `*` or `>`).
pub fn valid_namespace(namespace: &str) -> bool {
    !namespace.is_empty()
        && namespace
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// State shared by the bus and its tasks.
struct Shared {
    /// The client; clones share one connection.
    client: Client,
    /// Where events, resyncs and junk are reported.
    sink: Arc<dyn EventSink>,
    /// Prefix of every key's subject.
    namespace: String,
    /// Prefix of the subjects of the confirming round trips (`<namespace>.bus.sync`); each round
    /// trip adds a unique token, so only its own subscription hears it.
    sync_subject: String,
    /// Whether the client's connection is up (from its events).
    link_up: AtomicBool,
    /// Whether our subscription exists (false between losing and remaking it).
    subscribed: AtomicBool,
    /// See [`NatsBusConfig::connect_timeout`].
    connect_timeout: Duration,
}

/// A core NATS bus for one namespace.
pub struct NatsBus {
    /// Client, namespace and state flags shared with the tasks.
    shared: Arc<Shared>,
    /// Asks the delivery task to drop and remake the subscription (fault injection); the reply
    /// comes once the new one is confirmed and the sink was told to resync.
    #[cfg_attr(not(any(test, feature = "test-util")), allow(dead_code))]
    sever_tx: mpsc::Sender<oneshot::Sender<()>>,
    /// The delivery task and the connection-events task.
    tasks: Tasks,
}

impl NatsBus {
    /// Connects (one attempt, bounded by `connect_timeout`), subscribes to the namespace's wildcard
    /// and returns once the server has the subscription.
    pub async fn connect(
        config: NatsBusConfig,
        sink: Arc<dyn EventSink>,
    ) -> Result<NatsBus, BusError> {
        if !valid_namespace(&config.namespace) {
            return Err(BusError::InvalidNamespace(config.namespace));
        }
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let options = ConnectOptions::new()
            .connection_timeout(config.connect_timeout)
            .event_callback(move |event| {
                let events_tx = events_tx.clone();
                async move {
                    let _ = events_tx.send(event);
                }
            });
        let options = crate::credentials::nats::apply(options, &config.credentials)
            .await
            .map_err(|e| BusError::Unavailable(format!("nats: {e}")))?;
        // The client bounds each socket's attempt; this bounds the whole (a name may resolve to
        // several addresses).
        let client = tokio::time::timeout(
            config.connect_timeout * 2,
            options.connect(config.url.as_str()),
        )
        .await
        .map_err(|_| BusError::Timeout { op: "connect" })?
        .map_err(|e| BusError::Unavailable(format!("nats connect: {e}")))?;

        let shared = Arc::new(Shared {
            client,
            sink,
            sync_subject: format!("{}.bus.sync", config.namespace),
            namespace: config.namespace,
            link_up: AtomicBool::new(true),
            subscribed: AtomicBool::new(false),
            connect_timeout: config.connect_timeout,
        });
        let subscriber = shared.subscribe().await?;

        let (sever_tx, sever_rx) = mpsc::channel(1);
        let tasks = Tasks::new();
        tasks.spawn(deliver(
            shared.clone(),
            subscriber,
            sever_rx,
            tasks.shutdown(),
        ));
        tasks.spawn(follow_connection(
            shared.clone(),
            events_rx,
            tasks.shutdown(),
        ));
        Ok(NatsBus {
            shared,
            sever_tx,
            tasks,
        })
    }
}

impl Shared {
    /// A new wildcard subscription that the server is known to have.
    async fn subscribe(&self) -> Result<Subscriber, BusError> {
        let subscriber = tokio::time::timeout(
            self.connect_timeout,
            self.client.subscribe(nats_wildcard(&self.namespace)),
        )
        .await
        .map_err(|_| BusError::Timeout { op: "subscribe" })?
        .map_err(|e| BusError::Unavailable(format!("nats subscribe: {e}")))?;
        self.sync().await?;
        self.subscribed.store(true, Ordering::SeqCst);
        Ok(subscriber)
    }

    /// A round trip through the server: when it returns, the server has processed everything this
    /// client sent before it (subscriptions included). A message to a subject of its own, heard
    /// back: whoever else listens (a `>` reader) cannot delay or answer it.
    async fn sync(&self) -> Result<(), BusError> {
        let unique = self.client.new_inbox();
        let token = unique.rsplit('.').next().unwrap_or(&unique);
        let subject = format!("{}.{token}", self.sync_subject);
        let round_trip = async {
            let mut probe = self
                .client
                .subscribe(subject.clone())
                .await
                .map_err(|e| BusError::Unavailable(format!("nats sync: {e}")))?;
            self.client
                .publish(subject, Bytes::new())
                .await
                .map_err(|e| BusError::Unavailable(format!("nats sync: {e}")))?;
            let heard = probe.next().await;
            let _ = probe.unsubscribe().await;
            heard
                .map(drop)
                .ok_or_else(|| BusError::Unavailable("nats sync: subscription ended".into()))
        };
        tokio::time::timeout(self.connect_timeout, round_trip)
            .await
            .map_err(|_| BusError::Timeout { op: "sync" })?
    }

    fn on_message(&self, message: Message) {
        let subject_key = message
            .subject
            .as_str()
            .rsplit('.')
            .next()
            .map(str::to_owned);
        match Event::decode(message.payload) {
            // An event under another key's subject is as wrong as junk.
            Ok(event) if subject_key.as_deref() == Some(event.key.to_hex().as_str()) => {
                self.sink.deliver(event)
            }
            _ => self.sink.undecodable(),
        }
    }
}

/// Hands every message of the subscription to the sink; remakes the subscription when it ends or
/// is severed.
async fn deliver(
    shared: Arc<Shared>,
    subscriber: Subscriber,
    mut sever_rx: mpsc::Receiver<oneshot::Sender<()>>,
    mut shutdown: Shutdown,
) {
    let mut subscriber = Some(subscriber);
    let mut severed: Option<oneshot::Sender<()>> = None;
    let mut delay = RETRY_MIN_DELAY;
    loop {
        let Some(current) = subscriber.as_mut() else {
            match shared.subscribe().await {
                Ok(fresh) => {
                    subscriber = Some(fresh);
                    delay = RETRY_MIN_DELAY;
                    tracing::info!(namespace = %shared.namespace, "nats bus resubscribed; resyncing");
                    shared.sink.resync();
                    if let Some(done) = severed.take() {
                        let _ = done.send(());
                    }
                }
                Err(error) => {
                    tracing::debug!(%error, "nats bus: resubscription attempt failed");
                    tokio::select! {
                        () = shutdown.wait() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(RETRY_MAX_DELAY);
                }
            }
            continue;
        };
        tokio::select! {
            biased;
            () = shutdown.wait() => {
                let _ = tokio::time::timeout(CLOSE_GRACE, current.unsubscribe()).await;
                return;
            }
            Some(done) = sever_rx.recv() => {
                // Messages still buffered for the old subscription are lost, as on a real fault.
                let _ = tokio::time::timeout(shared.connect_timeout, current.unsubscribe()).await;
                shared.subscribed.store(false, Ordering::SeqCst);
                subscriber = None;
                severed = Some(done);
            }
            message = current.next() => match message {
                Some(message) => shared.on_message(message),
                None => {
                    tracing::warn!(namespace = %shared.namespace, "nats bus subscription ended");
                    shared.subscribed.store(false, Ordering::SeqCst);
                    subscriber = None;
                }
            },
        }
    }
}

/// Follows the client's connection events (see the module docs).
async fn follow_connection(
    shared: Arc<Shared>,
    mut events: mpsc::UnboundedReceiver<async_nats::Event>,
    mut shutdown: Shutdown,
) {
    let mut lost = false;
    loop {
        let event = tokio::select! {
            biased;
            () = shutdown.wait() => return,
            event = events.recv() => match event {
                Some(event) => event,
                None => return,
            },
        };
        match event {
            async_nats::Event::Disconnected => {
                tracing::warn!(namespace = %shared.namespace, "nats bus disconnected");
                shared.link_up.store(false, Ordering::SeqCst);
                lost = true;
            }
            async_nats::Event::Connected if lost => {
                // The client has queued its subscriptions for the new connection; wait until the
                // server has them, then re-check everything that may have been missed.
                if let Err(error) = shared.sync().await {
                    tracing::warn!(%error, "nats bus: could not confirm the resubscription");
                }
                lost = false;
                shared.link_up.store(true, Ordering::SeqCst);
                tracing::info!(namespace = %shared.namespace, "nats bus reconnected; resyncing");
                shared.sink.resync();
            }
            async_nats::Event::Connected => shared.link_up.store(true, Ordering::SeqCst),
            async_nats::Event::SlowConsumer(_) => {
                tracing::warn!(namespace = %shared.namespace, "nats bus dropped events; resyncing");
                shared.sink.resync();
            }
            async_nats::Event::Closed => shared.link_up.store(false, Ordering::SeqCst),
            other => tracing::debug!(event = %other, "nats bus connection event"),
        }
    }
}

#[async_trait]
impl Bus for NatsBus {
    fn kind(&self) -> &'static str {
        "nats"
    }

    async fn publish(&self, key: &KeyHash, encoded: Bytes) -> Result<(), BusError> {
        if self.tasks.is_closed() {
            return Err(BusError::Unavailable("nats bus is closed".into()));
        }
        let subject = nats_subject(&self.shared.namespace, key);
        tokio::time::timeout(
            PUBLISH_TIMEOUT,
            self.shared.client.publish(subject, encoded),
        )
        .await
        .map_err(|_| BusError::Timeout { op: "publish" })?
        .map_err(|e| BusError::Unavailable(format!("nats publish: {e}")))
    }

    fn connected(&self) -> bool {
        !self.tasks.is_closed()
            && self.shared.link_up.load(Ordering::SeqCst)
            && self.shared.subscribed.load(Ordering::SeqCst)
    }

    async fn close(&self) {
        if self.tasks.close().await {
            let _ = tokio::time::timeout(CLOSE_GRACE, self.shared.client.drain()).await;
        }
    }

    /// Unsubscribes, subscribes afresh, waits until the server has the new subscription, and
    /// resyncs: what a disconnection does, without touching the connection.
    #[cfg(any(test, feature = "test-util"))]
    async fn sever(&self) {
        let (done_tx, done_rx) = oneshot::channel();
        if self.sever_tx.send(done_tx).await.is_err() {
            return; // closed
        }
        let _ = tokio::time::timeout(self.shared.connect_timeout * 2, done_rx).await;
    }
}
