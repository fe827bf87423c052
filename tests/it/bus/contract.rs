//! Every bus backend against the same contract, on real servers: events reach every bus of the
//! namespace and no other, junk is counted, and a lost subscription ends in one resync after which
//! events flow again.
//!
//! Waits are bounded by [`support::patience`]; nothing sleeps to prove an absence (an absence is
//! shown by a later event that does arrive first).

use crate::support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use corral::bus::memory::{MemoryBus, MemoryBusHub};
use corral::bus::nats::{NatsBus, NatsBusConfig};
use corral::bus::redis::{RedisBus, RedisBusConfig};
use corral::bus::{
    Bus, BusError, Event, EventKind, EventSink, INLINE_MAX, nats_subject, redis_channel,
};
use corral::key::{KeyBuilder, KeyHash};
use support::{TestNats, TestRedis, eventually, patience};
use tokio::sync::{Notify, mpsc};

fn key(name: &str) -> KeyHash {
    KeyBuilder::new().part(name).finish().hash
}

fn failed(name: &str) -> Event {
    Event::new(
        key(name),
        EventKind::Failed {
            message: format!("{name} failed"),
            response: None,
        },
    )
}

/// Records what a bus hands over: events into a channel, resyncs and junk as counters.
#[derive(Default)]
struct TestSink {
    /// Delivered events, in order, for [`Listener::next`] to await with a deadline.
    events: Mutex<Option<mpsc::UnboundedSender<Event>>>,
    /// How often the bus said events may have been lost.
    resyncs: AtomicUsize,
    /// How many messages were not events.
    undecodable: AtomicUsize,
    /// Woken on every resync or junk, so tests wait for counts instead of sleeping.
    changed: Notify,
}

impl EventSink for TestSink {
    fn deliver(&self, event: Event) {
        if let Some(events) = self.events.lock().unwrap().as_ref() {
            let _ = events.send(event);
        }
    }

    fn resync(&self) {
        self.resyncs.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    fn undecodable(&self) {
        self.undecodable.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }
}

/// One bus and what its sink heard.
struct Listener {
    /// The bus under test (also used to publish).
    bus: Box<dyn Bus>,
    /// Its sink, for the counters.
    sink: Arc<TestSink>,
    /// What the sink was handed.
    events: mpsc::UnboundedReceiver<Event>,
}

impl Listener {
    fn new_sink() -> (Arc<TestSink>, mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let sink = Arc::new(TestSink::default());
        *sink.events.lock().unwrap() = Some(tx);
        (sink, rx)
    }

    async fn next(&mut self) -> Event {
        tokio::time::timeout(patience(), self.events.recv())
            .await
            .unwrap_or_else(|_| panic!("no event within {:?}", patience()))
            .expect("sink is gone")
    }

    /// Nothing was delivered that has not been taken with [`Listener::next`].
    fn assert_drained(&mut self) {
        if let Ok(event) = self.events.try_recv() {
            panic!("unexpected event {event:?}");
        }
    }

    async fn publish(&self, event: &Event) {
        self.bus
            .publish(&event.key, event.encode())
            .await
            .expect("publish");
    }

    fn resyncs(&self) -> usize {
        self.sink.resyncs.load(Ordering::SeqCst)
    }

    fn undecodable(&self) -> usize {
        self.sink.undecodable.load(Ordering::SeqCst)
    }

    /// Waits until `done` holds for the sink (checked after every resync or junk).
    async fn wait_until(&self, what: &str, done: impl Fn(&TestSink) -> bool) {
        let deadline = tokio::time::Instant::now() + patience();
        loop {
            let changed = self.sink.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if done(&self.sink) {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                panic!("timed out after {:?} waiting for {what}", patience());
            }
        }
    }

    async fn wait_resyncs(&self, at_least: usize) {
        self.wait_until(&format!("{at_least} resync(s)"), |sink| {
            sink.resyncs.load(Ordering::SeqCst) >= at_least
        })
        .await;
    }

    async fn wait_undecodable(&self, at_least: usize) {
        self.wait_until(&format!("{at_least} undecodable message(s)"), |sink| {
            sink.undecodable.load(Ordering::SeqCst) >= at_least
        })
        .await;
    }
}

/// A running backend that buses are connected to, by namespace.
enum Backend {
    /// One hub per namespace (a hub is the memory bus's namespace).
    Memory(Mutex<HashMap<String, MemoryBusHub>>),
    /// A redis-server of this test's own.
    Redis(TestRedis),
    /// A nats-server of this test's own (restartable on the same port).
    Nats(TestNats),
}

impl Backend {
    async fn memory() -> Self {
        Backend::Memory(Mutex::default())
    }

    async fn redis() -> Self {
        Backend::Redis(TestRedis::start().await)
    }

    async fn nats() -> Self {
        Backend::Nats(TestNats::start().await)
    }

    fn redis_server(&mut self) -> &mut TestRedis {
        match self {
            Backend::Redis(redis) => redis,
            _ => panic!("not a redis backend"),
        }
    }

    fn nats_server(&mut self) -> &mut TestNats {
        match self {
            Backend::Nats(nats) => nats,
            _ => panic!("not a nats backend"),
        }
    }

    fn hub(&self, namespace: &str) -> MemoryBusHub {
        let Backend::Memory(hubs) = self else {
            panic!("not a memory backend")
        };
        hubs.lock()
            .unwrap()
            .entry(namespace.to_owned())
            .or_default()
            .clone()
    }

    /// A bus on `namespace`, listening when this returns.
    async fn listen(&self, namespace: &str) -> Listener {
        let (sink, events) = Listener::new_sink();
        let dyn_sink: Arc<dyn EventSink> = sink.clone();
        let bus: Box<dyn Bus> = match self {
            Backend::Memory(_) => Box::new(MemoryBus::connect(&self.hub(namespace), dyn_sink)),
            Backend::Redis(redis) => Box::new(
                RedisBus::connect(RedisBusConfig::new(redis.url(), namespace), dyn_sink)
                    .await
                    .expect("redis bus connects"),
            ),
            Backend::Nats(nats) => Box::new(
                NatsBus::connect(NatsBusConfig::new(nats.url(), namespace), dyn_sink)
                    .await
                    .expect("nats bus connects"),
            ),
        };
        assert!(bus.connected(), "a bus is connected once connect returns");
        Listener { bus, sink, events }
    }

    /// Publishes `bytes` as they are, with a plain client, where `key`'s events go.
    async fn publish_raw(&self, namespace: &str, key: &KeyHash, bytes: &'static [u8]) {
        match self {
            Backend::Memory(_) => {
                let (sink, _events) = Listener::new_sink();
                let bus = MemoryBus::connect(&self.hub(namespace), sink);
                bus.publish(key, Bytes::from_static(bytes))
                    .await
                    .expect("publish");
                bus.close().await;
            }
            Backend::Redis(redis) => {
                let mut conn = redis.client().await;
                let _: i64 = ::redis::cmd("PUBLISH")
                    .arg(redis_channel(namespace))
                    .arg(bytes)
                    .query_async(&mut conn)
                    .await
                    .expect("raw PUBLISH");
            }
            Backend::Nats(nats) => {
                let client = async_nats::connect(nats.url()).await.expect("raw client");
                client
                    .publish(nats_subject(namespace, key), Bytes::from_static(bytes))
                    .await
                    .expect("raw publish");
                client.flush().await.expect("raw flush");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The contract, for every backend
// ---------------------------------------------------------------------------------------------

/// Turns each contract test below into one test per backend.
macro_rules! on_every_bus {
    ($($test:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::memory().await).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::redis().await).await;
                }
            )*
        }
        mod nats {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::nats().await).await;
                }
            )*
        }
    };
}

on_every_bus!(
    every_bus_of_the_namespace_hears_every_event,
    another_namespace_hears_nothing,
    ready_with_a_large_inline_value_survives,
    junk_is_counted_and_skipped,
    sever_resyncs_once_and_events_flow_again,
    close_is_idempotent_and_stops_publishing,
);

async fn every_bus_of_the_namespace_hears_every_event(backend: Backend) {
    let mut a = backend.listen("ns").await;
    let mut b = backend.listen("ns").await;
    let events = [
        Event::new(key("ready"), EventKind::Ready { inline: None }),
        Event::new(
            key("inline"),
            EventKind::Ready {
                inline: Some(Bytes::from_static(b"v")),
            },
        ),
        failed("failed"),
        Event::new(key("uncacheable"), EventKind::Uncacheable),
        Event::new(key("abandoned"), EventKind::Abandoned),
        Event::new(key("deleted"), EventKind::Deleted),
    ];
    for event in &events {
        b.publish(event).await;
    }
    // Each listener gets all of them, in order, the publisher included.
    for event in &events {
        assert_eq!(&a.next().await, event);
        assert_eq!(&b.next().await, event);
    }
    a.assert_drained();
    b.assert_drained();
    assert_eq!((a.resyncs(), b.resyncs()), (0, 0));
    assert_eq!((a.undecodable(), b.undecodable()), (0, 0));
}

async fn another_namespace_hears_nothing(backend: Backend) {
    let mut here = backend.listen("here").await;
    let mut there = backend.listen("there").await;
    here.publish(&failed("for here")).await;
    // Once `here` heard it, the backend has routed it; anything `there` receives afterwards was
    // published later, so the first thing `there` hears must be its own event.
    assert_eq!(here.next().await, failed("for here"));
    there.publish(&failed("for there")).await;
    assert_eq!(there.next().await, failed("for there"));
    there.assert_drained();
    // Likewise `here`: what it hears next is a probe of its own, published after `there`'s event
    // was routed.
    here.publish(&failed("probe")).await;
    assert_eq!(here.next().await, failed("probe"));
    here.assert_drained();
}

async fn ready_with_a_large_inline_value_survives(backend: Backend) {
    let mut a = backend.listen("ns").await;
    let b = backend.listen("ns").await;
    // Every byte value, NULs and newlines included, up to just below the inline limit.
    let value: Vec<u8> = (0..INLINE_MAX - 1).map(|i| (i * 7 % 256) as u8).collect();
    let event = Event::new(
        key("big"),
        EventKind::Ready {
            inline: Some(Bytes::from(value)),
        },
    );
    b.publish(&event).await;
    assert_eq!(a.next().await, event);
}

async fn junk_is_counted_and_skipped(backend: Backend) {
    let mut a = backend.listen("ns").await;
    let k = key("junk");
    backend.publish_raw("ns", &k, b"junk").await;
    backend.publish_raw("ns", &k, b"").await;
    // Right length, unknown version.
    backend.publish_raw("ns", &k, &[9u8; 34]).await;
    a.wait_undecodable(3).await;
    // The bus still delivers what follows.
    let event = failed("after junk");
    a.publish(&event).await;
    assert_eq!(a.next().await, event);
    a.assert_drained();
    assert_eq!(a.undecodable(), 3);
}

async fn sever_resyncs_once_and_events_flow_again(backend: Backend) {
    let mut a = backend.listen("ns").await;
    let mut b = backend.listen("ns").await;
    a.bus.sever().await;
    a.wait_resyncs(1).await;
    eventually("the severed bus is connected again", || async {
        a.bus.connected()
    })
    .await;
    let event = failed("after sever");
    b.publish(&event).await;
    assert_eq!(a.next().await, event);
    assert_eq!(b.next().await, event);
    // One resync for one sever, and only on the bus that was severed.
    assert_eq!(a.resyncs(), 1);
    assert_eq!(b.resyncs(), 0);
    assert!(b.bus.connected());
}

async fn close_is_idempotent_and_stops_publishing(backend: Backend) {
    let a = backend.listen("ns").await;
    let mut b = backend.listen("ns").await;
    a.bus.close().await;
    a.bus.close().await;
    assert!(!a.bus.connected());
    let event = failed("after close");
    assert!(a.bus.publish(&event.key, event.encode()).await.is_err());
    // Others on the namespace are unaffected.
    b.publish(&event).await;
    assert_eq!(b.next().await, event);
}

// ---------------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------------

/// On one thread the delivery task cannot run while the test publishes, so a small hub overflows:
/// the listener loses the oldest events, resyncs, and gets the rest.
#[tokio::test(flavor = "current_thread")]
async fn memory_lagging_listener_resyncs() {
    let hub = MemoryBusHub::with_capacity(4);
    let (sink, events) = Listener::new_sink();
    let mut a = Listener {
        bus: Box::new(MemoryBus::connect(&hub, sink.clone())),
        sink,
        events,
    };
    for i in 0..32 {
        a.publish(&failed(&format!("e{i}"))).await;
    }
    a.wait_resyncs(1).await;
    // What survived is the newest, in order.
    for i in 28..32 {
        assert_eq!(a.next().await, failed(&format!("e{i}")));
    }
    a.assert_drained();
}

// ---------------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------------

/// Publishes until the publishing connection (which may itself be reconnecting) accepts it.
async fn publish_until_accepted(bus: &dyn Bus, event: &Event) {
    let deadline = tokio::time::Instant::now() + patience();
    loop {
        match bus.publish(&event.key, event.encode()).await {
            Ok(()) => return,
            Err(error) if tokio::time::Instant::now() < deadline => {
                eprintln!("publish failed ({error}); retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("publish failed until the deadline: {error}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_pubsub_connections_resync_then_deliver() {
    let mut backend = Backend::redis().await;
    let mut a = backend.listen("ns").await;
    let mut b = backend.listen("ns").await;
    let killed = backend.redis_server().kill_pubsub_clients().await;
    assert_eq!(
        killed, 2,
        "both subscription connections were pub/sub clients"
    );
    a.wait_resyncs(1).await;
    b.wait_resyncs(1).await;
    // The resync comes only once the subscription is back: an event published now arrives.
    let event = failed("after kill");
    b.publish(&event).await;
    assert_eq!(a.next().await, event);
    assert_eq!(b.next().await, event);
    assert!(a.bus.connected() && b.bus.connected());
    assert_eq!((a.resyncs(), b.resyncs()), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_resyncs_then_delivers() {
    let mut backend = Backend::redis().await;
    let mut a = backend.listen("ns").await;
    let b = backend.listen("ns").await;
    backend.redis_server().kill();
    eventually("the bus notices the server is gone", || async {
        !a.bus.connected()
    })
    .await;
    backend.redis_server().restart().await;
    a.wait_resyncs(1).await;
    b.wait_resyncs(1).await;
    assert!(a.bus.connected());
    let event = failed("after restart");
    publish_until_accepted(b.bus.as_ref(), &event).await;
    assert_eq!(a.next().await, event);
}

/// The client library gives up reconnecting after a few seconds of retries; the bus must not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_long_outage_still_ends_in_resync() {
    let mut backend = Backend::redis().await;
    let mut a = backend.listen("ns").await;
    let b = backend.listen("ns").await;
    backend.redis_server().kill();
    eventually("the bus notices the server is gone", || async {
        !a.bus.connected()
    })
    .await;
    // Not waiting for something to happen: the outage has to outlast the library's own
    // reconnection attempts (6 retries, at most 1 s apart).
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(a.resyncs(), 0);
    backend.redis_server().restart().await;
    a.wait_resyncs(1).await;
    let event = failed("after outage");
    publish_until_accepted(b.bus.as_ref(), &event).await;
    assert_eq!(a.next().await, event);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dead_server_is_an_error_within_the_deadline() {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let (sink, _events) = Listener::new_sink();
    let config = RedisBusConfig::new(format!("redis://127.0.0.1:{port}/"), "ns");
    let result = tokio::time::timeout(Duration::from_secs(10), RedisBus::connect(config, sink))
        .await
        .expect("connect gives up within 10 s");
    assert!(result.is_err());
}

// ---------------------------------------------------------------------------------------------
// NATS
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_on_the_same_port_resyncs_then_delivers() {
    let mut backend = Backend::nats().await;
    let mut a = backend.listen("ns").await;
    let b = backend.listen("ns").await;
    backend.nats_server().kill();
    eventually("the bus notices the server is gone", || async {
        !a.bus.connected()
    })
    .await;
    backend.nats_server().restart().await;
    a.wait_resyncs(1).await;
    b.wait_resyncs(1).await;
    assert!(a.bus.connected());
    let event = failed("after restart");
    publish_until_accepted(b.bus.as_ref(), &event).await;
    assert_eq!(a.next().await, event);
    assert_eq!(a.resyncs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_dead_server_is_an_error_within_the_deadline() {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let (sink, _events) = Listener::new_sink();
    let config = NatsBusConfig::new(format!("nats://127.0.0.1:{port}"), "ns");
    let result = tokio::time::timeout(Duration::from_secs(10), NatsBus::connect(config, sink))
        .await
        .expect("connect gives up within 10 s");
    assert!(
        matches!(result, Err(BusError::Unavailable(_))),
        "{:?}",
        result.err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_namespace_must_be_one_subject_token() {
    for namespace in ["", "a.b", "a*", ">", "a b"] {
        let (sink, _events) = Listener::new_sink();
        // Rejected before any connection is tried, so no server is needed.
        let config = NatsBusConfig::new("nats://127.0.0.1:1", namespace);
        match NatsBus::connect(config, sink).await {
            Err(BusError::InvalidNamespace(got)) => assert_eq!(got, namespace),
            other => panic!("{namespace:?}: {:?}", other.err()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_event_under_another_keys_subject_is_junk() {
    let backend = Backend::nats().await;
    let mut a = backend.listen("ns").await;
    let Backend::Nats(nats) = &backend else {
        unreachable!()
    };
    let client = async_nats::connect(nats.url()).await.expect("raw client");
    client
        .publish(nats_subject("ns", &key("other")), failed("mine").encode())
        .await
        .unwrap();
    client.flush().await.unwrap();
    a.wait_undecodable(1).await;
    a.publish(&failed("mine")).await;
    assert_eq!(a.next().await, failed("mine"));
    a.assert_drained();
}
