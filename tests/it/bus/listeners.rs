//! Start-up and recovery of a bus do not depend on who else listens on it: a client that
//! subscribes to everything (`>` on NATS) and never answers must not keep a replica from
//! becoming ready, nor a lost subscription from being remade.

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use corral::bus::nats::{NatsBus, NatsBusConfig};
use corral::bus::{Bus, Event, EventKind, EventSink};
use corral::key::KeyBuilder;
use futures::StreamExt;
use support::proxy::{ProxyCluster, fill};
use support::upstream::Upstream;
use support::{TestNats, TestRedis, eventually};
use tokio::sync::mpsc;

/// Counts resyncs and hands events over.
struct Sink {
    events: mpsc::UnboundedSender<Event>,
    resyncs: AtomicUsize,
}

impl EventSink for Sink {
    fn deliver(&self, event: Event) {
        let _ = self.events.send(event);
    }
    fn resync(&self) {
        self.resyncs.fetch_add(1, Ordering::SeqCst);
    }
    fn undecodable(&self) {}
}

/// A raw client subscribed to every subject, which reads nothing and answers nothing.
async fn silent_wildcard_reader(nats: &TestNats) -> (async_nats::Client, async_nats::Subscriber) {
    let client = async_nats::connect(nats.url())
        .await
        .expect("connect to NATS");
    let everything = client.subscribe(">").await.expect("subscribe to >");
    client.flush().await.expect("flush");
    (client, everything)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_wildcard_reader_does_not_stop_the_nats_bus_from_connecting_or_resubscribing() {
    let nats = TestNats::start().await;
    let (_reader, mut everything) = silent_wildcard_reader(&nats).await;
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let sink = Arc::new(Sink {
        events: events_tx,
        resyncs: AtomicUsize::new(0),
    });
    let bus = NatsBus::connect(NatsBusConfig::new(nats.url(), "listeners"), sink.clone())
        .await
        .expect("the bus connects while a `>` reader is open");
    assert!(bus.connected());

    // Remaking the subscription takes the same round trip.
    bus.sever().await;
    assert_eq!(sink.resyncs.load(Ordering::SeqCst), 1, "one resync");
    let key = KeyBuilder::new().part("after").finish().hash;
    let event = Event::new(key, EventKind::Deleted);
    bus.publish(&key, event.encode()).await.expect("publish");
    let heard = tokio::time::timeout(support::patience(), events.recv())
        .await
        .expect("the event arrives in time");
    assert_eq!(heard, Some(event));
    // The reader did see the traffic: it listened all along, it just never answered.
    let seen = tokio::time::timeout(support::patience(), everything.next())
        .await
        .expect("the reader hears something");
    assert!(seen.is_some());
    bus.close().await;
}

const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0, token: secret }
namespace: listeners
store: { kind: redis, url: "{{redis}}" }
bus: { kind: nats, url: "{{nats}}" }
defaults: { ttl: 60s, wait_timeout: 5s, lease_ttl: 5s }
routes:
  - name: rest
    match: { path_prefix: / }
    upstream: {{upstream}}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_become_ready_and_share_fills_while_a_wildcard_reader_listens() {
    let (redis, nats) = tokio::join!(TestRedis::start(), TestNats::start());
    let (_reader, _everything) = silent_wildcard_reader(&nats).await;
    let upstream = Upstream::start().await;
    let yaml = fill(
        CONFIG,
        &[
            ("redis", &redis.url()),
            ("nats", &nats.url()),
            ("upstream", &upstream.url()),
        ],
    );
    // Panics unless both replicas answer /readyz with 200 within the test's patience.
    let proxy = ProxyCluster::start(2, &yaml, None).await;
    let first = proxy.get(0, "/shared").send().await;
    assert_eq!(first.status, 200);
    eventually("replica 1 answers from the store", || async {
        let reply = proxy.get(1, "/shared").send().await;
        reply.status == 200 && upstream.hits("/shared") == 1
    })
    .await;
}
