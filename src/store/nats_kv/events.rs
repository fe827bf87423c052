//! Events from the bucket's stream: one headers-only push consumer per process over every entry,
//! delivering what each write means to the engine's [`EventSink`].
//!
//! | message on `e.<hex>`                           | event                                    |
//! |------------------------------------------------|------------------------------------------|
//! | value put                                      | READY (no inline value; followers read)  |
//! | pass put                                       | UNCACHEABLE                              |
//! | lease put (creation, renewal)                  | none                                     |
//! | tombstone `failed`                             | FAILED, with the message and the error   |
//! |                                                | response (fetched by sequence if any)    |
//! | tombstone `abandoned`, `discarded`, `expired`  | ABANDONED                                |
//! | server marker `MaxAge` (a lease, value or pass | ABANDONED: waiters re-elect at once      |
//! | marker expired on the server)                  |                                          |
//! | `PURGE`, or a delete corral did not write      | DELETED (L1 copies drop)                 |
//!
//! A `MaxAge` marker on a touch record `t.<hex>` sweeps the sliding value it kept alive. A
//! generation record `g.<hex>` is a GENERATION event; purge index records (`ip.`, `it.`) are
//! nothing anyone waits for.
//!
//! # Recovery
//!
//! The consumer is ephemeral and kept in memory on the server, so it is recreated (starting at
//! new messages) and every live flight re-checks the store ([`EventSink::resync`]) whenever events
//! may have been missed: after the connection came back, when a consumer sequence skips (messages
//! dropped), when heartbeats stop (the consumer is gone on the server), when the client reports a
//! slow consumer, or when the subscription ends. The re-check comes only once the new consumer
//! exists, so nothing written after it can be missed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, push};
use async_nats::{HeaderMap, Message, StatusCode, Subscriber};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use super::entry::{self, MARKER_REASON, MSG_SIZE, STATE};
use super::{NatsKvError, NatsKvStore};
use crate::bus::tasks::{CLOSE_GRACE, Shutdown, Tasks};
use crate::bus::{Bus, BusError, Event, EventKind, EventSink};
use crate::key::KeyHash;

/// How often the server sends a heartbeat while it has nothing to deliver.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Silence after which the consumer is taken to be gone on the server.
const SILENCE: Duration = Duration::from_secs(3);
/// How long the server keeps the consumer once nobody listens on its subject (after a crash).
const INACTIVE: Duration = Duration::from_secs(10);
/// First pause between attempts to recreate the consumer; doubled up to [`RETRY_MAX_DELAY`].
const RETRY_MIN_DELAY: Duration = Duration::from_millis(50);
/// Longest pause between attempts to recreate the consumer.
const RETRY_MAX_DELAY: Duration = Duration::from_secs(1);
/// Sweeps of lapsed sliding values running at once; more are left to the next read of the key.
const SWEEPS: usize = 16;
/// Heartbeat header: the last consumer sequence the server delivered.
const LAST_CONSUMER: &str = "Nats-Last-Consumer";
/// Heartbeat header: flow control is stalled until a reply is published to this subject.
const CONSUMER_STALLED: &str = "Nats-Consumer-Stalled";

/// What one message of the stream means here.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Heard {
    Event(Event),
    /// A failed build whose error response is in the tombstone's payload, at this stream
    /// sequence.
    FailedWithResponse {
        key: KeyHash,
        message: String,
        sequence: u64,
    },
    /// A sliding value's touch record lapsed.
    Sweep(KeyHash),
    /// Nothing anyone waits for (lease writes, touches).
    Nothing,
    /// A subject or state corral does not write.
    Junk,
}

/// Reads one message of the bucket's stream (see the module docs for the table).
pub(crate) fn hear(prefix: &str, subject: &str, headers: &HeaderMap, sequence: u64) -> Heard {
    let Some(name) = subject.strip_prefix(prefix) else {
        return Heard::Junk;
    };
    let header = |name: &str| headers.get(name).map(|value| value.as_str());
    let (kind, hex) = match name.split_once('.') {
        Some(parts) => parts,
        None => return Heard::Junk,
    };
    if matches!(kind, "ip" | "it") {
        return Heard::Nothing;
    }
    let Some(key) = KeyHash::from_hex(hex) else {
        return Heard::Junk;
    };
    let event = |kind| Heard::Event(Event::new(key, kind));
    match kind {
        "e" => {
            if let Some(reason) = header(MARKER_REASON) {
                return match reason {
                    "MaxAge" => event(EventKind::Abandoned),
                    _ => event(EventKind::Deleted),
                };
            }
            match (header(entry::KV_OPERATION), header(STATE)) {
                (Some("PURGE"), _) => event(EventKind::Deleted),
                (Some("DEL"), Some("failed")) => {
                    let message = header(entry::MESSAGE)
                        .map(entry::unescape)
                        .unwrap_or_default();
                    let size = header(MSG_SIZE).and_then(|size| size.parse::<u64>().ok());
                    if size.unwrap_or(0) > 0 {
                        Heard::FailedWithResponse {
                            key,
                            message,
                            sequence,
                        }
                    } else {
                        event(EventKind::Failed {
                            message,
                            response: None,
                        })
                    }
                }
                (Some("DEL"), Some("abandoned" | "discarded" | "expired")) => {
                    event(EventKind::Abandoned)
                }
                (Some("DEL"), _) => event(EventKind::Deleted),
                (Some(_), _) => Heard::Junk,
                (None, Some("lease")) => Heard::Nothing,
                // A stale value published again: under a refresh lease (nothing anyone waits
                // for), or after its refresh ended without a new value.
                (None, Some("value")) if header(entry::LEASE_TOKEN).is_some() => Heard::Nothing,
                (None, Some("value")) if header(entry::RELEASED) == Some("failed") => {
                    event(EventKind::Failed {
                        message: header(entry::MESSAGE)
                            .map(entry::unescape)
                            .unwrap_or_default(),
                        response: None,
                    })
                }
                (None, Some("value")) if header(entry::RELEASED).is_some() => {
                    event(EventKind::Abandoned)
                }
                // A foreign put is read (and found unreadable) like any value.
                (None, Some("value") | None) => event(EventKind::Ready { inline: None }),
                (None, Some("pass")) => event(EventKind::Uncacheable),
                (None, Some(_)) => Heard::Junk,
            }
        }
        "g" => match header(super::purge::GENERATION).and_then(|n| n.parse::<u64>().ok()) {
            Some(generation) => event(EventKind::Generation { generation }),
            None => Heard::Junk,
        },
        "t" if header(MARKER_REASON) == Some("MaxAge") => Heard::Sweep(key),
        "t" => Heard::Nothing,
        _ => Heard::Junk,
    }
}

/// State shared by the events handle and its task.
struct Shared {
    /// The store whose bucket is consumed; its client is the connection.
    store: NatsKvStore,
    /// Where events, resyncs and junk go.
    sink: Arc<dyn EventSink>,
    /// Whether the client's connection is up (from its events).
    link_up: AtomicBool,
    /// Whether a consumer exists right now (false between losing one and making the next).
    consuming: AtomicBool,
    /// Bounds the sweeps running at once.
    sweeps: Arc<Semaphore>,
}

/// One consumer on the server and the subscription it delivers to.
struct Consumer {
    /// Receives the deliveries, heartbeats and flow control requests.
    subscriber: Subscriber,
    /// The name the server gave it, to delete it when it is replaced.
    name: String,
    /// The consumer sequence of the last delivery; the next must be one more.
    delivered: u64,
    /// When the server was last heard from on this subscription.
    heard_at: Instant,
}

/// Why the current consumer is given up.
enum Reset {
    Gap,
    Silent,
    Ended,
    Reconnected,
    SlowConsumer,
    Refused(String),
}

impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reset::Gap => f.write_str("deliveries skipped a sequence"),
            Reset::Silent => f.write_str("no heartbeat"),
            Reset::Ended => f.write_str("subscription ended"),
            Reset::Reconnected => f.write_str("connection came back"),
            Reset::SlowConsumer => f.write_str("client dropped messages"),
            Reset::Refused(status) => write!(f, "server sent {status}"),
        }
    }
}

/// The companion bus of a [`NatsKvStore`]: events come from the bucket's stream.
pub struct NatsKvEvents {
    /// Store, sink and state flags shared with the task.
    shared: Arc<Shared>,
    /// Asks the task to drop and recreate the consumer (fault injection); answered once the new
    /// one exists and the sink was told to resync.
    #[cfg_attr(not(any(test, feature = "test-util")), allow(dead_code))]
    sever_tx: mpsc::Sender<oneshot::Sender<()>>,
    /// The delivery task.
    tasks: Tasks,
}

impl NatsKvEvents {
    /// Creates this process's consumer and returns once the server has it, so no flight can
    /// ACQUIRE before its process hears the bucket. Closing the events closes the connection they
    /// share with `store`.
    pub async fn start(
        store: &NatsKvStore,
        sink: Arc<dyn EventSink>,
    ) -> Result<NatsKvEvents, NatsKvError> {
        let error = |reason: String| NatsKvError::Consumer {
            bucket: store.bucket().to_owned(),
            reason,
        };
        let connection = store
            .take_connection_events()
            .ok_or_else(|| error("this store already has its consumer".into()))?;
        let shared = Arc::new(Shared {
            store: store.clone(),
            sink,
            link_up: AtomicBool::new(true),
            consuming: AtomicBool::new(false),
            sweeps: Arc::new(Semaphore::new(SWEEPS)),
        });
        let consumer = shared.consume().await.map_err(error)?;
        let (sever_tx, sever_rx) = mpsc::channel(1);
        let tasks = Tasks::new();
        tasks.spawn(deliver(
            shared.clone(),
            consumer,
            connection,
            sever_rx,
            tasks.shutdown(),
        ));
        Ok(NatsKvEvents {
            shared,
            sever_tx,
            tasks,
        })
    }
}

impl Shared {
    /// A new consumer that the server has, delivering from the next message on.
    async fn consume(&self) -> Result<Consumer, String> {
        let store = &self.store.shared;
        let inbox = store.client.new_inbox();
        let subscriber =
            tokio::time::timeout(store.connect_timeout, store.client.subscribe(inbox.clone()))
                .await
                .map_err(|_| "subscribe timed out".to_owned())?
                .map_err(|e| format!("subscribe: {e}"))?;
        let config = push::Config {
            deliver_subject: inbox,
            description: Some("corral events".into()),
            deliver_policy: DeliverPolicy::New,
            ack_policy: AckPolicy::None,
            max_deliver: 1,
            filter_subject: format!("{}>", store.prefix),
            headers_only: true,
            flow_control: true,
            idle_heartbeat: HEARTBEAT,
            inactive_threshold: INACTIVE,
            memory_storage: true,
            num_replicas: 1,
            ..Default::default()
        };
        let created = tokio::time::timeout(
            store.connect_timeout,
            store
                .js
                .create_consumer_on_stream(config, &store.stream_name),
        )
        .await
        .map_err(|_| "consumer creation timed out".to_owned())?
        .map_err(|e| format!("create consumer: {e}"))?;
        self.consuming.store(true, Ordering::SeqCst);
        Ok(Consumer {
            subscriber,
            name: created.cached_info().name.clone(),
            delivered: 0,
            heard_at: Instant::now(),
        })
    }

    /// Unsubscribes and deletes a consumer that is being replaced, in the background (the server
    /// would drop it after [`INACTIVE`] anyway).
    fn retire(&self, mut consumer: Consumer) {
        self.consuming.store(false, Ordering::SeqCst);
        let store = self.store.shared.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CLOSE_GRACE, async {
                let _ = consumer.subscriber.unsubscribe().await;
                let _ = store
                    .js
                    .delete_consumer_from_stream(&consumer.name, &store.stream_name)
                    .await;
            })
            .await;
        });
    }

    /// Handles one message of the subscription; `Err` when the consumer must be replaced.
    async fn on_message(&self, consumer: &mut Consumer, message: Message) -> Result<(), Reset> {
        consumer.heard_at = Instant::now();
        let client = &self.store.shared.client;
        match message.status {
            Some(StatusCode::IDLE_HEARTBEAT) => {
                // A flow control request carries a reply subject; a heartbeat may carry one in a
                // header when flow control stalled.
                let reply = message.reply.map(|reply| reply.to_string()).or_else(|| {
                    message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(CONSUMER_STALLED))
                        .map(|v| v.as_str().to_owned())
                });
                if let Some(reply) = reply {
                    let _ = client.publish(reply, Bytes::new()).await;
                }
                let last = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(LAST_CONSUMER))
                    .and_then(|v| v.as_str().parse::<u64>().ok());
                match last {
                    Some(last) if last != consumer.delivered => Err(Reset::Gap),
                    _ => Ok(()),
                }
            }
            Some(status) => Err(Reset::Refused(format!(
                "{status} {}",
                message.description.unwrap_or_default()
            ))),
            None => {
                let Some((stream_sequence, consumer_sequence)) =
                    message.reply.as_deref().and_then(sequences)
                else {
                    self.sink.undecodable();
                    return Ok(());
                };
                if consumer_sequence != consumer.delivered + 1 {
                    return Err(Reset::Gap);
                }
                consumer.delivered = consumer_sequence;
                let headers = message.headers.unwrap_or_default();
                let heard = hear(
                    &self.store.shared.prefix,
                    message.subject.as_str(),
                    &headers,
                    stream_sequence,
                );
                self.dispatch(heard).await;
                Ok(())
            }
        }
    }

    async fn dispatch(&self, heard: Heard) {
        match heard {
            Heard::Event(event) => self.sink.deliver(event),
            Heard::FailedWithResponse {
                key,
                message,
                sequence,
            } => {
                // Fetched in line, so that events keep their order; bounded by the response
                // timeout, after which the failure goes out without its response.
                let store = &self.store.shared;
                let response =
                    tokio::time::timeout(store.response_timeout, store.stream.direct_get(sequence))
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .map(|stored| stored.payload)
                        .filter(|payload| !payload.is_empty());
                self.sink
                    .deliver(Event::new(key, EventKind::Failed { message, response }));
            }
            Heard::Sweep(key) => {
                let Ok(permit) = self.sweeps.clone().try_acquire_owned() else {
                    return;
                };
                let store = self.store.clone();
                tokio::spawn(async move {
                    if let Err(error) = store.sweep(&key).await {
                        tracing::debug!(%key, %error, "could not sweep a lapsed sliding value");
                    }
                    drop(permit);
                });
            }
            Heard::Nothing => {}
            Heard::Junk => self.sink.undecodable(),
        }
    }
}

/// The stream and consumer sequences of a delivery, from its `$JS.ACK.` reply subject:
/// `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>`, or the
/// longer form with domain and account hash in front (ADR-15).
fn sequences(reply: &str) -> Option<(u64, u64)> {
    let tokens: Vec<&str> = reply.strip_prefix("$JS.ACK.")?.split('.').collect();
    let (stream, consumer) = match tokens.len() {
        7 => (tokens[3], tokens[4]),
        n if n >= 9 => (tokens[5], tokens[6]),
        _ => return None,
    };
    Some((stream.parse().ok()?, consumer.parse().ok()?))
}

/// Hands every delivery to the sink; replaces the consumer (and resyncs) whenever events may have
/// been missed; see the module docs.
async fn deliver(
    shared: Arc<Shared>,
    consumer: Consumer,
    mut connection: mpsc::UnboundedReceiver<async_nats::Event>,
    mut sever_rx: mpsc::Receiver<oneshot::Sender<()>>,
    mut shutdown: Shutdown,
) {
    let bucket = shared.store.bucket().to_owned();
    let mut consumer = Some(consumer);
    let mut resync_due = false;
    let mut severed: Option<oneshot::Sender<()>> = None;
    let mut connection_open = true;
    let mut lost = false;
    let mut delay = RETRY_MIN_DELAY;
    loop {
        let Some(current) = consumer.as_mut() else {
            match shared.consume().await {
                Ok(fresh) => {
                    consumer = Some(fresh);
                    delay = RETRY_MIN_DELAY;
                    if std::mem::take(&mut resync_due) {
                        tracing::info!(%bucket, "nats kv consumer recreated; resyncing");
                        shared.sink.resync();
                    }
                    if let Some(done) = severed.take() {
                        let _ = done.send(());
                    }
                }
                Err(error) => {
                    // Loud once per outage, quiet while it lasts.
                    if delay == RETRY_MIN_DELAY {
                        tracing::warn!(%bucket, %error, "nats kv consumer: recreation failed; retrying");
                    } else {
                        tracing::debug!(%bucket, %error, "nats kv consumer: recreation failed");
                    }
                    tokio::select! {
                        () = shutdown.wait() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(RETRY_MAX_DELAY);
                }
            }
            continue;
        };
        let silent_at = current.heard_at + SILENCE;
        let reset = tokio::select! {
            biased;
            () = shutdown.wait() => {
                if let Some(last) = consumer.take() {
                    shared.retire(last);
                }
                return;
            }
            Some(done) = sever_rx.recv() => {
                severed = Some(done);
                Some(Reset::Ended)
            }
            event = connection.recv(), if connection_open => match event {
                Some(async_nats::Event::Disconnected) => {
                    tracing::warn!(%bucket, "nats kv events disconnected");
                    shared.link_up.store(false, Ordering::SeqCst);
                    lost = true;
                    None
                }
                Some(async_nats::Event::Connected) => {
                    shared.link_up.store(true, Ordering::SeqCst);
                    // The server may have restarted and lost the consumer, and events written
                    // while the link was down never reached this one.
                    std::mem::take(&mut lost).then_some(Reset::Reconnected)
                }
                Some(async_nats::Event::SlowConsumer(_)) => Some(Reset::SlowConsumer),
                Some(async_nats::Event::Closed) => {
                    shared.link_up.store(false, Ordering::SeqCst);
                    None
                }
                Some(other) => {
                    tracing::debug!(%bucket, event = %other, "nats kv connection event");
                    None
                }
                None => {
                    connection_open = false;
                    None
                }
            },
            message = current.subscriber.next() => match message {
                Some(message) => shared.on_message(current, message).await.err(),
                None => Some(Reset::Ended),
            },
            () = tokio::time::sleep_until(silent_at) => Some(Reset::Silent),
        };
        if let Some(reset) = reset {
            if severed.is_none() {
                tracing::warn!(%bucket, %reset, "nats kv consumer replaced; events may be lost");
            }
            if let Some(old) = consumer.take() {
                shared.retire(old);
            }
            resync_due = true;
        }
    }
}

#[async_trait]
impl Bus for NatsKvEvents {
    fn kind(&self) -> &'static str {
        "nats_kv"
    }

    /// Nothing to do: with this store every write is its own event, so the engine never calls
    /// this (it publishes only for stores that do not announce). Publishing here would deliver an
    /// event twice.
    async fn publish(&self, key: &KeyHash, _encoded: Bytes) -> Result<(), BusError> {
        tracing::debug!(%key, "nats kv events do not publish; the store's write was the event");
        Ok(())
    }

    fn connected(&self) -> bool {
        !self.tasks.is_closed()
            && self.shared.link_up.load(Ordering::SeqCst)
            && self.shared.consuming.load(Ordering::SeqCst)
    }

    /// Stops the consumer and closes the connection it shares with the store.
    async fn close(&self) {
        if self.tasks.close().await {
            let _ =
                tokio::time::timeout(CLOSE_GRACE, self.shared.store.shared.client.drain()).await;
        }
    }

    /// Drops the consumer, creates a new one and resyncs: what a lost consumer does.
    #[cfg(any(test, feature = "test-util"))]
    async fn sever(&self) {
        let (done_tx, done_rx) = oneshot::channel();
        if self.sever_tx.send(done_tx).await.is_err() {
            return; // closed
        }
        let _ = tokio::time::timeout(self.shared.store.shared.connect_timeout * 2, done_rx).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyBuilder;

    const PREFIX: &str = "$KV.corral_ns.";

    fn key() -> KeyHash {
        KeyBuilder::new().part("k").finish().hash
    }

    fn heard(name: &str, headers: &[(&str, &str)]) -> Heard {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, *value);
        }
        hear(
            PREFIX,
            &format!("{PREFIX}{name}.{}", key().to_hex()),
            &map,
            7,
        )
    }

    fn event(kind: EventKind) -> Heard {
        Heard::Event(Event::new(key(), kind))
    }

    #[test]
    fn writes_map_to_the_events_followers_wait_for() {
        assert_eq!(
            heard("e", &[(STATE, "value")]),
            event(EventKind::Ready { inline: None })
        );
        assert_eq!(
            heard("e", &[(STATE, "pass")]),
            event(EventKind::Uncacheable)
        );
        assert_eq!(heard("e", &[(STATE, "lease")]), Heard::Nothing);
        assert_eq!(
            heard(
                "e",
                &[
                    ("KV-Operation", "DEL"),
                    (STATE, "failed"),
                    ("Corral-Message", "upstream%20said%20503"),
                    (MSG_SIZE, "0"),
                ]
            ),
            event(EventKind::Failed {
                message: "upstream said 503".into(),
                response: None
            })
        );
        assert_eq!(
            heard(
                "e",
                &[
                    ("KV-Operation", "DEL"),
                    (STATE, "failed"),
                    (MSG_SIZE, "120")
                ]
            ),
            Heard::FailedWithResponse {
                key: key(),
                message: String::new(),
                sequence: 7
            }
        );
        for state in ["abandoned", "discarded", "expired"] {
            assert_eq!(
                heard("e", &[("KV-Operation", "DEL"), (STATE, state)]),
                event(EventKind::Abandoned)
            );
        }
        assert_eq!(
            heard("e", &[("KV-Operation", "PURGE"), (STATE, "purged")]),
            event(EventKind::Deleted)
        );
    }

    #[test]
    fn a_stale_value_published_again_tells_waiters_only_how_its_refresh_ended() {
        let lease = [
            (STATE, "value"),
            (entry::LEASE_TOKEN, "0123456789abcdef0123456789abcdef"),
        ];
        assert_eq!(heard("e", &lease), Heard::Nothing);
        assert_eq!(
            heard(
                "e",
                &[
                    (STATE, "value"),
                    (entry::RELEASED, "failed"),
                    (entry::MESSAGE, "upstream%20answered%20500")
                ]
            ),
            event(EventKind::Failed {
                message: "upstream answered 500".into(),
                response: None
            })
        );
        assert_eq!(
            heard("e", &[(STATE, "value"), (entry::RELEASED, "abandoned")]),
            event(EventKind::Abandoned)
        );
    }

    #[test]
    fn server_markers_wake_waiters_and_foreign_deletes_drop_copies() {
        assert_eq!(
            heard("e", &[(MARKER_REASON, "MaxAge"), ("Nats-Rollup", "sub")]),
            event(EventKind::Abandoned)
        );
        assert_eq!(
            heard("e", &[(MARKER_REASON, "Remove")]),
            event(EventKind::Deleted)
        );
        assert_eq!(
            heard("e", &[("KV-Operation", "DEL")]),
            event(EventKind::Deleted)
        );
        assert_eq!(heard("e", &[]), event(EventKind::Ready { inline: None }));
    }

    #[test]
    fn generation_records_are_events_and_index_records_are_nothing() {
        assert_eq!(
            heard("g", &[("Corral-Generation", "7")]),
            event(EventKind::Generation { generation: 7 })
        );
        assert_eq!(heard("g", &[]), Heard::Junk);
        let empty = HeaderMap::new();
        for index in ["ip", "it"] {
            let subject = format!("{PREFIX}{index}.7265706f727473.{}", key().to_hex());
            assert_eq!(hear(PREFIX, &subject, &empty, 1), Heard::Nothing);
        }
    }

    #[test]
    fn touch_records_only_sweep_when_they_lapse() {
        assert_eq!(heard("t", &[(STATE, "touch")]), Heard::Nothing);
        assert_eq!(
            heard("t", &[(MARKER_REASON, "MaxAge")]),
            Heard::Sweep(key())
        );
    }

    #[test]
    fn foreign_subjects_and_states_are_junk() {
        assert_eq!(heard("e", &[(STATE, "whatever")]), Heard::Junk);
        assert_eq!(heard("x", &[]), Heard::Junk);
        let empty = HeaderMap::new();
        assert_eq!(hear(PREFIX, "$KV.other.e.00", &empty, 1), Heard::Junk);
        assert_eq!(
            hear(PREFIX, &format!("{PREFIX}e.zz"), &empty, 1),
            Heard::Junk
        );
        assert_eq!(hear(PREFIX, &format!("{PREFIX}e"), &empty, 1), Heard::Junk);
    }

    #[test]
    fn ack_subjects_of_both_formats_give_the_sequences() {
        assert_eq!(
            sequences("$JS.ACK.KV_x.Q10GIN8C.1.2.3.1795617123862193809.0"),
            Some((2, 3))
        );
        assert_eq!(
            sequences("$JS.ACK.domain.hash.KV_x.cons.1.20.30.1795617123862193809.0.token"),
            Some((20, 30))
        );
        assert_eq!(sequences("_INBOX.x"), None);
        assert_eq!(sequences("$JS.ACK.a.b"), None);
    }
}
