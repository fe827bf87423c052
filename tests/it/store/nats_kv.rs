//! The NATS JetStream KV store against a real nats-server (2.11 or newer) started by each test:
//! what only this store has (server-side TTL and delete markers, revisions, events from the
//! stream, the payload limit). The engine suite runs on it too, through `on_every_backend!`.

// The harness re-exports helpers (TestRedis) this file does not use.
#[allow(unused_imports)]
use crate::on_every_backend;
use crate::support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use corral::bus::{Event, EventKind, EventSink};
use corral::engine::{
    AnswerSource, Backend, Builder, Built, BusConfig, ConnectError, Dictionary, DictionaryConfig,
    Expiry, Policy, StoreConfig,
};
use corral::envelope::Entry;
use corral::key::{KeyBuilder, KeyHash};
use corral::store::nats_kv::{NatsKvConfig, NatsKvEvents, NatsKvStore};
use corral::store::{
    Acquired, Fenced, KeyStatus, LeaseRequest, Refresh, Renewed, Store, StoreError, Token,
};
use support::TestNats;
use support::cluster::{Cluster, Kind};
use tokio::time::{Instant, sleep};

const NS: &str = "kvtest";

fn key(name: &str) -> KeyHash {
    KeyBuilder::new().part(name).finish().hash
}

fn lease(ttl: Duration) -> LeaseRequest {
    LeaseRequest {
        token: Token::random(),
        node: "node-a".into(),
        ttl,
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

async fn store(nats: &TestNats) -> NatsKvStore {
    NatsKvStore::connect(NatsKvConfig::new(nats.url(), NS))
        .await
        .expect("connect to test nats")
}

/// Everything a consumer delivered, in order.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<Event>>,
    resyncs: AtomicUsize,
    junk: AtomicUsize,
}

impl EventSink for Recorder {
    fn deliver(&self, event: Event) {
        self.events.lock().unwrap().push(event);
    }

    fn resync(&self) {
        self.resyncs.fetch_add(1, Ordering::SeqCst);
    }

    fn undecodable(&self) {
        self.junk.fetch_add(1, Ordering::SeqCst);
    }
}

impl Recorder {
    fn of(&self, key: &KeyHash) -> Vec<EventKind> {
        let events = self.events.lock().unwrap();
        events
            .iter()
            .filter(|e| e.key == *key)
            .map(|e| e.kind.clone())
            .collect()
    }

    async fn wait_for(&self, key: &KeyHash, kind: &EventKind) {
        support::eventually(&format!("{kind:?} for {key}"), || async {
            self.of(key).contains(kind)
        })
        .await;
    }
}

/// A store with a consumer of its own, recording what it hears.
async fn listening(nats: &TestNats) -> (NatsKvStore, NatsKvEvents, Arc<Recorder>) {
    let store = store(nats).await;
    let recorder = Arc::new(Recorder::default());
    let events = NatsKvEvents::start(&store, recorder.clone())
        .await
        .expect("consumer starts");
    (store, events, recorder)
}

fn entry(body: Bytes) -> Entry {
    Entry {
        status: 200,
        headers: vec![],
        body,
        stored_at_ms: 0,
        ttl: secs(60),
        stale: Duration::ZERO,
        stale_if_error: Duration::ZERO,
        fetch_time: Duration::ZERO,
        key: KeyHash::from_bytes([0; 32]),
        form: corral::envelope::Form::Answer,
    }
}

// ---------------------------------------------------------------------------------------------
// The server's TTL and its delete marker
// ---------------------------------------------------------------------------------------------

/// The leader's replica dies holding the lease. Nobody releases it: the server removes it after
/// lease_ttl and its delete marker wakes the followers, with a safety poll far too long to be what
/// woke them, and their own fallback timer set later than the marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_leaders_lease_vanishes_on_the_server_and_its_marker_elects_a_new_leader() {
    let cluster = Cluster::start(Kind::NatsKv).await;
    let mut config = DictionaryConfig::new("dead", Expiry::Absolute(secs(60)));
    config.lease_ttl = secs(1);
    config.poll_interval = secs(60);
    let replicas: Vec<Dictionary<String, String>> = cluster.dictionaries(3, &config).await;
    let started: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let build = {
        let started = started.clone();
        move || {
            let n = {
                let mut started = started.lock().unwrap();
                started.push(Instant::now());
                started.len() - 1
            };
            async move {
                if n == 0 {
                    sleep(secs(30)).await;
                }
                Ok::<_, String>(format!("built by build {n}"))
            }
        }
    };
    let build = Arc::new(build);
    let k = "k".to_string();
    let leader = {
        let (replica, build, k) = (replicas[0].clone(), build.clone(), k.clone());
        tokio::spawn(async move {
            replica
                .build_or_retrieve(&k, move || build(), secs(30))
                .await
        })
    };
    support::eventually("the leader holds the lease", || async {
        replicas[1].status(&k).await == Ok(corral::engine::Status::Pending)
    })
    .await;
    let followers: Vec<_> = (0..10)
        .map(|i| {
            let (replica, build, k) = (replicas[1 + i % 2].clone(), build.clone(), k.clone());
            tokio::spawn(async move {
                replica
                    .build_or_retrieve(&k, move || build(), secs(10))
                    .await
            })
        })
        .collect();
    support::eventually("followers wait on both replicas", || async {
        replicas[1..]
            .iter()
            .all(|r| r.engine().metrics().followers_waiting.get() > 0)
    })
    .await;
    // Let a renewal or two happen, so the lease is not simply the first one expiring.
    sleep(Duration::from_millis(700)).await;

    let crashed_at = Instant::now();
    replicas[0].engine().crash().await;
    for follower in followers {
        assert_eq!(follower.await.unwrap(), Ok("built by build 1".to_string()));
    }
    let started = started.lock().unwrap().clone();
    assert_eq!(started.len(), 2, "one build per lease");
    let elected = started[1].saturating_duration_since(crashed_at);
    assert!(
        elected <= config.lease_ttl + Duration::from_millis(300),
        "the new leader started {elected:?} after the crash"
    );
    for replica in &replicas[1..] {
        let metrics = replica.engine().metrics();
        // The marker is the only source of ABANDONED here: the dead leader released nothing.
        assert!(
            metrics.bus_events.with_label_values(&["abandoned"]).get() >= 1,
            "no delete marker reached this replica"
        );
        assert_eq!(
            metrics.poll_rechecks.with_label_values(&["true"]).get(),
            0,
            "a timer, not the marker, found the lease gone"
        );
    }
    leader.abort();
}

/// A lease the server failed to remove (here: one written without a server TTL) is taken to be
/// stuck once it outlives its TTL by 5 s: status then reports the key empty and the next caller
/// may replace it. From that moment its holder's writes under it are lost too, though the
/// message is still there for the compare-and-set to name.
#[tokio::test]
async fn a_stuck_lease_is_lost_to_its_holder_once_status_reports_it_gone() {
    let nats = TestNats::start().await;
    let (holder, other) = (store(&nats).await, store(&nats).await);
    let k = key("stuck");
    let stuck = lease(secs(1));
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Corral-State", "lease");
    headers.insert("Corral-Token", stuck.token.to_hex().as_str());
    headers.insert("Corral-Ttl-Ms", "1000");
    headers.insert("Nats-TTL", "never");
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    js.publish_with_headers(holder.entry_subject(&k), headers, Bytes::new())
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(matches!(
        other.status(&k).await,
        Ok(KeyStatus::Pending { .. })
    ));
    support::eventually("the lease to be taken as stuck", || async {
        other.status(&k).await == Ok(KeyStatus::Empty)
    })
    .await;

    let v = Bytes::from_static(b"late");
    let committed = holder
        .commit(&k, stuck.token, v, secs(60), false, Bytes::new())
        .await;
    let renewed = holder.renew(&k, stuck.token, secs(30)).await;
    let released = holder.release(&k, stuck.token, Bytes::new()).await;
    let gave_up = holder
        .give_up(&k, stuck.token, secs(30), Bytes::new())
        .await;
    assert_eq!(
        (committed, renewed, released, gave_up),
        (
            Ok(Fenced::Lost),
            Ok(Renewed::Lost),
            Ok(Fenced::Lost),
            Ok(Fenced::Lost)
        ),
        "commit, renew, release and give up under a stuck lease"
    );
    assert_eq!(other.raw(&k).await, Ok(None));
    assert!(matches!(
        other.acquire(&k, &lease(secs(30)), None).await,
        Ok(Acquired::Lead { .. })
    ));
}

/// Everything the bucket's stream carries reaches the consumer as the event a follower waits for,
/// the error response of a failure included; lease writes and touches announce nothing.
#[tokio::test]
async fn every_outcome_reaches_the_consumer_as_its_event() {
    let nats = TestNats::start().await;
    let (store, _events, heard) = listening(&nats).await;

    let ready = key("ready");
    let held = lease(secs(5));
    store.acquire(&ready, &held, None).await.unwrap();
    store.renew(&ready, held.token, secs(5)).await.unwrap();
    let value = Bytes::from_static(b"value");
    let done = store
        .commit(&ready, held.token, value, secs(60), false, Bytes::new())
        .await;
    assert_eq!(done, Ok(Fenced::Done));
    heard
        .wait_for(&ready, &EventKind::Ready { inline: None })
        .await;

    let failed = key("failed");
    let held = lease(secs(5));
    store.acquire(&failed, &held, None).await.unwrap();
    let response = Bytes::from(vec![7u8; 2000]);
    let event = Event::new(
        failed,
        EventKind::Failed {
            message: "upstream said 503: é".into(),
            response: Some(response.clone()),
        },
    );
    let done = store.release(&failed, held.token, event.encode()).await;
    assert_eq!(done, Ok(Fenced::Done));
    heard
        .wait_for(
            &failed,
            &EventKind::Failed {
                message: "upstream said 503: é".into(),
                response: Some(response),
            },
        )
        .await;

    let private = key("private");
    let held = lease(secs(5));
    store.acquire(&private, &held, None).await.unwrap();
    let done = store
        .give_up(&private, held.token, secs(60), Bytes::new())
        .await;
    assert_eq!(done, Ok(Fenced::Done));
    heard.wait_for(&private, &EventKind::Uncacheable).await;

    let abandoned = key("abandoned");
    let held = lease(secs(5));
    store.acquire(&abandoned, &held, None).await.unwrap();
    let event = Event::new(abandoned, EventKind::Abandoned).encode();
    assert_eq!(
        store.release(&abandoned, held.token, event).await,
        Ok(Fenced::Done)
    );
    heard.wait_for(&abandoned, &EventKind::Abandoned).await;

    assert_eq!(store.purge(&ready, Bytes::new()).await, Ok(true));
    heard.wait_for(&ready, &EventKind::Deleted).await;

    // A lease nobody renews: the server's marker is the event.
    let expired = key("expired");
    store
        .acquire(&expired, &lease(secs(1)), None)
        .await
        .unwrap();
    heard.wait_for(&expired, &EventKind::Abandoned).await;
    assert_eq!(store.status(&expired).await, Ok(KeyStatus::Empty));

    // Lease writes (creation, renewal) were heard but announce nothing.
    assert_eq!(
        heard.of(&ready),
        vec![EventKind::Ready { inline: None }, EventKind::Deleted]
    );
    assert_eq!(heard.junk.load(Ordering::SeqCst), 0);
    assert_eq!(heard.resyncs.load(Ordering::SeqCst), 0);
}

// ---------------------------------------------------------------------------------------------
// Revisions
// ---------------------------------------------------------------------------------------------

/// A commit that names a revision which is no longer the entry's (the lease was purged and taken,
/// or expired on the server and taken) is rejected by the server; nothing is stored and nothing
/// announced.
#[tokio::test]
async fn a_commit_with_a_stale_revision_is_rejected_and_nothing_is_announced() {
    let nats = TestNats::start().await;
    let (_listener, _events, heard) = listening(&nats).await;
    let (old, new) = (store(&nats).await, store(&nats).await);

    // Purged during the build, then taken by another process.
    let purged = key("purged");
    let stale = lease(secs(30));
    assert!(matches!(
        old.acquire(&purged, &stale, None).await,
        Ok(Acquired::Lead { .. })
    ));
    assert_eq!(new.purge(&purged, Bytes::new()).await, Ok(true));
    let taker = lease(secs(30));
    assert!(matches!(
        new.acquire(&purged, &taker, None).await,
        Ok(Acquired::Lead { .. })
    ));
    let committed = old
        .commit(
            &purged,
            stale.token,
            Bytes::from_static(b"stale"),
            secs(60),
            false,
            Bytes::new(),
        )
        .await;
    assert_eq!(committed, Ok(Fenced::Lost));
    assert!(matches!(
        new.status(&purged).await,
        Ok(KeyStatus::Pending { .. })
    ));
    assert_eq!(new.raw(&purged).await, Ok(None));

    // Expired on the server (nobody renewed it), then taken.
    let expired = key("expired");
    let stale = lease(secs(1));
    old.acquire(&expired, &stale, None).await.unwrap();
    support::eventually("the server removed the lease", || async {
        new.status(&expired).await == Ok(KeyStatus::Empty)
    })
    .await;
    let taker = lease(secs(30));
    assert!(matches!(
        new.acquire(&expired, &taker, None).await,
        Ok(Acquired::Lead { .. })
    ));
    assert_eq!(
        old.renew(&expired, stale.token, secs(1)).await,
        Ok(Renewed::Lost)
    );
    let committed = old
        .commit(
            &expired,
            stale.token,
            Bytes::from_static(b"stale"),
            secs(60),
            false,
            Bytes::new(),
        )
        .await;
    assert_eq!(committed, Ok(Fenced::Lost));
    assert_eq!(new.raw(&expired).await, Ok(None));

    // The stream is ordered: once a later write is heard, a READY for either key would have been.
    let sentinel = key("sentinel");
    let held = lease(secs(5));
    new.acquire(&sentinel, &held, None).await.unwrap();
    new.commit(
        &sentinel,
        held.token,
        Bytes::new(),
        secs(60),
        false,
        Bytes::new(),
    )
    .await
    .unwrap();
    heard
        .wait_for(&sentinel, &EventKind::Ready { inline: None })
        .await;
    let ready = EventKind::Ready { inline: None };
    assert!(
        !heard.of(&purged).contains(&ready),
        "{:?}",
        heard.of(&purged)
    );
    assert!(
        !heard.of(&expired).contains(&ready),
        "{:?}",
        heard.of(&expired)
    );
}

/// A write whose answer never came (the server froze after receiving it) may still have been
/// applied; its retry finds its own token in the entry and counts it as done, for a commit and for
/// a renewal, and an acquire retried with its token leads again instead of waiting on itself.
#[tokio::test]
async fn a_write_that_timed_out_on_the_client_is_recognised_by_its_retry() {
    let mut nats = TestNats::start().await;
    let mut config = NatsKvConfig::new(nats.url(), NS);
    config.response_timeout = Duration::from_millis(300);
    let store = NatsKvStore::connect(config).await.expect("connect");

    let k = key("acquired");
    let held = lease(secs(30));
    let Ok(Acquired::Lead { fence }) = store.acquire(&k, &held, None).await else {
        panic!("the first acquire leads")
    };
    assert_eq!(
        store.acquire(&k, &held, None).await,
        Ok(Acquired::Lead { fence })
    );
    assert!(matches!(
        store.acquire(&k, &lease(secs(30)), None).await,
        Ok(Acquired::Wait { .. })
    ));

    // A renewal that the server applies only after the client gave up on it.
    nats.pause();
    let renewed = store.renew(&k, held.token, secs(30)).await;
    nats.resume();
    assert!(
        matches!(renewed, Err(StoreError::Timeout { .. })),
        "{renewed:?}"
    );
    assert_eq!(
        store.renew(&k, held.token, secs(30)).await,
        Ok(Renewed::Held)
    );

    // The same for the commit.
    nats.pause();
    let value = Bytes::from_static(b"value");
    let committed = store
        .commit(&k, held.token, value.clone(), secs(60), false, Bytes::new())
        .await;
    nats.resume();
    assert!(
        matches!(committed, Err(StoreError::Timeout { .. })),
        "{committed:?}"
    );
    support::eventually("the frozen commit landed", || async {
        store.raw(&k).await == Ok(Some(value.clone()))
    })
    .await;
    assert_eq!(
        store
            .commit(&k, held.token, value.clone(), secs(60), false, Bytes::new())
            .await,
        Ok(Fenced::Done)
    );
    // Another token's commit is not mistaken for it.
    assert_eq!(
        store
            .commit(&k, Token::random(), value, secs(60), false, Bytes::new())
            .await,
        Ok(Fenced::Lost)
    );
}

// ---------------------------------------------------------------------------------------------
// Restarts, bucket, server requirements
// ---------------------------------------------------------------------------------------------

/// With file storage, a restart of the server keeps what was committed, and the lease of a build
/// in progress. Followers that waited through the restart lost their consumer with it; once it is
/// back, every replica re-checks, and the followers finish (by that re-check, or by the commit's
/// event if it came later), without their safety poll and with one build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_keeps_committed_values_and_followers_finish_by_recheck() {
    let mut cluster = Cluster::start(Kind::NatsKv).await;
    let mut config = DictionaryConfig::new("restart", Expiry::Absolute(secs(120)));
    config.lease_ttl = secs(10);
    config.poll_interval = secs(60);
    config.l1_max_bytes = 0;
    let replicas: Vec<Dictionary<String, String>> = cluster.dictionaries(3, &config).await;
    let builds = Arc::new(AtomicUsize::new(0));
    let count = |value: &'static str| {
        let builds = builds.clone();
        move || {
            builds.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, String>(value.to_string()) }
        }
    };
    let before = "before".to_string();
    assert_eq!(
        replicas[0]
            .build_or_retrieve(&before, count("kept"), secs(5))
            .await,
        Ok("kept".to_string())
    );

    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let during = "during".to_string();
    let leader = {
        let (replica, gate, builds, during) = (
            replicas[0].clone(),
            gate.clone(),
            builds.clone(),
            during.clone(),
        );
        tokio::spawn(async move {
            let build = move || {
                builds.fetch_add(1, Ordering::SeqCst);
                let gate = gate.clone();
                async move {
                    let _open = gate.acquire().await.expect("gate");
                    Ok::<_, String>("built across a restart".to_string())
                }
            };
            replica.build_or_retrieve(&during, build, secs(60)).await
        })
    };
    support::eventually("the leader holds the lease", || async {
        replicas[1].status(&during).await == Ok(corral::engine::Status::Pending)
    })
    .await;
    let followers: Vec<_> = (0..10)
        .map(|i| {
            let (replica, during) = (replicas[1 + i % 2].clone(), during.clone());
            let build = count("never");
            tokio::spawn(async move { replica.build_or_retrieve(&during, build, secs(60)).await })
        })
        .collect();
    support::eventually("followers wait on both replicas", || async {
        replicas[1..]
            .iter()
            .all(|r| r.engine().metrics().followers_waiting.get() > 0)
    })
    .await;

    cluster.nats.as_mut().expect("nats").restart().await;
    // The leader's connection must be back before it can commit.
    support::eventually("the leader's replica reconnected", || async {
        replicas[0].engine().metrics().bus_resyncs.get() >= 1
    })
    .await;
    gate.add_permits(1);
    assert_eq!(
        leader.await.unwrap(),
        Ok("built across a restart".to_string())
    );
    for follower in followers {
        assert_eq!(
            follower.await.unwrap(),
            Ok("built across a restart".to_string())
        );
    }
    for replica in &replicas {
        let metrics = replica.engine().metrics();
        assert!(metrics.bus_resyncs.get() >= 1, "a replica never re-checked");
        assert_eq!(metrics.poll_rechecks.with_label_values(&["true"]).get(), 0);
        assert_eq!(metrics.build_count("degraded"), 0);
    }
    // A replica that never saw it reads the value committed before the restart.
    let fresh: Vec<Dictionary<String, String>> = cluster.dictionaries(1, &config).await;
    assert_eq!(
        fresh[0]
            .build_or_retrieve(&before, count("lost"), secs(5))
            .await,
        Ok("kept".to_string())
    );
    assert_eq!(builds.load(Ordering::SeqCst), 2);
}

/// Replicas that start together all create the namespace's bucket; the server keeps one, made
/// with what the store needs.
#[tokio::test]
async fn replicas_starting_at_once_share_one_bucket_made_for_leases() {
    let nats = TestNats::start().await;
    let starts: Vec<_> = (0..8)
        .map(|_| {
            let url = nats.url();
            tokio::spawn(
                async move { NatsKvStore::connect(NatsKvConfig::new(url, "together")).await },
            )
        })
        .collect();
    for start in starts {
        let store = start.await.unwrap().expect("every replica connects");
        assert_eq!(store.bucket(), "corral_together");
    }
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream("KV_corral_together").await.unwrap();
    let config = &stream.cached_info().config;
    assert_eq!(config.max_messages_per_subject, 1, "history 1");
    assert!(config.allow_message_ttl, "per-message TTL");
    assert!(config.subject_delete_marker_ttl.is_some(), "limit markers");
    assert!(config.max_bytes <= 0, "no max_bytes: {}", config.max_bytes);
    assert_eq!(
        config.storage,
        async_nats::jetstream::stream::StorageType::File
    );

    let invalid = NatsKvStore::connect(NatsKvConfig::new(nats.url(), "a.b")).await;
    assert!(invalid.is_err(), "a namespace with a dot names no bucket");
}

/// A bucket's TTLs are whole seconds, so a shorter lease is refused when the dictionary opens, and
/// a bus that would contradict the store's own events is refused before anything connects.
#[tokio::test]
async fn settings_the_nats_kv_store_cannot_honour_are_refused_with_a_clear_message() {
    let nats = TestNats::start().await;
    let mut config = DictionaryConfig::new("short", Expiry::Absolute(secs(60)));
    config.lease_ttl = Duration::from_millis(500);
    let short = Dictionary::<String, String>::open(config.clone(), &Backend::nats_kv(nats.url()))
        .await
        .err()
        .expect("refused");
    assert!(matches!(short, ConnectError::LeaseTtlTooShort { .. }));
    assert_eq!(
        short.to_string(),
        "lease_ttl 500ms is below 1s, the shortest lease the nats_kv store keeps"
    );

    config.lease_ttl = secs(1);
    let contradicting = Backend::new(
        StoreConfig::Nats { url: nats.url() },
        BusConfig::Redis {
            url: "redis://127.0.0.1:1/".into(),
        },
    );
    let error = Dictionary::<String, String>::open(config, &contradicting)
        .await
        .err()
        .expect("refused");
    assert!(matches!(error, ConnectError::Contradiction(_)), "{error}");
    let message = error.to_string();
    assert!(
        message.contains("store: nats") && message.contains("bus: redis"),
        "{message}"
    );
}

// ---------------------------------------------------------------------------------------------
// Sizes and sliding expiry
// ---------------------------------------------------------------------------------------------

/// Values over the server's max_payload (1 MiB by default) cannot be stored: each is handled as
/// uncacheable, so every caller, on the leader's replica as on another, gets its own build, and
/// the bucket holds a pass marker but no value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_over_the_payload_limit_are_each_callers_own_and_nothing_is_stored() {
    let cluster = Cluster::start(Kind::NatsKv).await;
    let replicas = cluster.engines(2, "large").await;
    let builds = Arc::new(AtomicUsize::new(0));
    let builder: Builder = {
        let builds = builds.clone();
        Arc::new(move |_| {
            let n = builds.fetch_add(1, Ordering::SeqCst) as u8;
            Box::pin(async move {
                sleep(Duration::from_millis(300)).await;
                Ok(Built::Shared(entry(Bytes::from(vec![n; 1536 * 1024]))))
            })
        })
    };
    let policy = Policy::default();
    let k = key("large");
    let calls: Vec<_> = (0..4)
        .map(|i| {
            let (engine, policy, builder) =
                (replicas[i % 2].clone(), policy.clone(), builder.clone());
            tokio::spawn(async move { engine.fetch(&k, &policy, builder, secs(10)).await })
        })
        .collect();
    let mut bodies = std::collections::HashSet::new();
    for call in calls {
        let answer = call.await.unwrap().expect("an answer");
        assert_eq!(answer.source, AnswerSource::Own { reason: None });
        assert_eq!(answer.entry.body.len(), 1536 * 1024);
        bodies.insert(answer.entry.body[0]);
    }
    assert_eq!(bodies.len(), 4, "a caller got someone else's value");
    assert_eq!(builds.load(Ordering::SeqCst), 4);
    let too_large: u64 = replicas
        .iter()
        .map(|r| r.metrics().values_too_large.get())
        .sum();
    assert_eq!(too_large, 1, "one leader tried to store one value");
    let kv = cluster.kv("large").await.expect("kv");
    assert_eq!(kv.raw(&k).await, Ok(None));
    assert!(matches!(kv.status(&k).await, Ok(KeyStatus::Pass { .. })));
}

/// A sliding value lives on while it is read, and once nobody reads it for its window, its touch
/// record lapses and the consumers remove it from the bucket.
#[tokio::test]
async fn a_sliding_value_that_nobody_reads_is_swept_from_the_bucket() {
    let nats = TestNats::start().await;
    let (store, _events, _heard) = listening(&nats).await;
    let k = key("sliding");
    let held = lease(secs(5));
    store.acquire(&k, &held, None).await.unwrap();
    let value = Bytes::from_static(b"sliding");
    store
        .commit(&k, held.token, value.clone(), secs(2), true, Bytes::new())
        .await
        .unwrap();
    let touch = Some(corral::store::Touch {
        ttl: secs(2),
        slack: Duration::from_millis(200),
    });
    // Read past the first window: each read keeps it.
    for _ in 0..6 {
        sleep(Duration::from_millis(500)).await;
        let hit = store.peek(&k, touch).await.unwrap();
        assert!(matches!(hit, Acquired::Hit { .. }), "{hit:?}");
    }
    assert_eq!(store.raw(&k).await, Ok(Some(value)), "never rewritten");
    // Then nobody reads it.
    support::eventually("the unread value is swept", || async {
        store.raw(&k).await == Ok(None)
    })
    .await;
    assert_eq!(store.status(&k).await, Ok(KeyStatus::Empty));
}

// ------------------------------------------------------------- stale entries ----

/// Commits `value` fresh for `fresh` and kept a minute, under a lease taken for it.
async fn commit_with_stale_window(
    store: &NatsKvStore,
    k: &KeyHash,
    value: &'static [u8],
    fresh: Duration,
) {
    let held = lease(secs(5));
    store.acquire(k, &held, None).await.unwrap();
    let done = store
        .commit_fresh(
            k,
            held.token,
            Bytes::from_static(value),
            fresh,
            secs(60),
            false,
            Bytes::new(),
        )
        .await;
    assert_eq!(done, Ok(Fenced::Done));
}

/// Lease and value share one entry here, so the refresh lease rides on the stale value, which
/// stays readable; exactly one caller leads, a failed refresh puts the value back, a commit
/// replaces it.
#[tokio::test]
async fn a_stale_value_tells_exactly_one_caller_to_lead_its_refresh() {
    let nats = TestNats::start().await;
    let (a, b) = (store(&nats).await, store(&nats).await);
    let k = key("stale");
    commit_with_stale_window(&a, &k, b"old", Duration::from_millis(300)).await;
    assert!(matches!(a.peek(&k, None).await, Ok(Acquired::Hit { .. })));
    support::eventually("the value goes stale", || async {
        matches!(
            a.peek(&k, None).await,
            Ok(Acquired::Stale {
                refresh: Refresh::Idle,
                ..
            })
        )
    })
    .await;

    let leases = support::stale::leases(10, secs(5));
    let leader = support::stale::exactly_one_refresh_leader(&a, &b, &k, &leases, b"old").await;
    assert_eq!(a.renew(&k, leader.token, secs(5)).await, Ok(Renewed::Held));
    assert!(matches!(
        b.acquire(&k, &lease(secs(5)), None).await,
        Ok(Acquired::Stale {
            refresh: Refresh::Elsewhere { .. },
            ..
        })
    ));

    // A failed refresh puts the stale value back, and a later caller may lead.
    let failed = Event::new(
        k,
        EventKind::Failed {
            message: "upstream answered 500".into(),
            response: None,
        },
    )
    .encode();
    assert_eq!(a.release(&k, leader.token, failed).await, Ok(Fenced::Done));
    let next = lease(secs(5));
    assert!(matches!(
        b.acquire(&k, &next, None).await,
        Ok(Acquired::Stale {
            refresh: Refresh::Lead { .. },
            ..
        })
    ));
    let done = b
        .commit_fresh(
            &k,
            next.token,
            Bytes::from_static(b"new"),
            secs(30),
            secs(60),
            false,
            Bytes::new(),
        )
        .await;
    assert_eq!(done, Ok(Fenced::Done));
    assert!(matches!(
        a.acquire(&k, &lease(secs(5)), None).await,
        Ok(Acquired::Hit { value, .. }) if value == Bytes::from_static(b"new")
    ));
}

#[tokio::test]
async fn an_early_refresh_leases_a_value_near_its_end_once() {
    let nats = TestNats::start().await;
    let store = store(&nats).await;
    let k = key("early");
    assert_eq!(
        store.lead_refresh(&k, &lease(secs(5)), secs(60)).await,
        Ok(Refresh::Idle)
    );
    commit_with_stale_window(&store, &k, b"v", secs(30)).await;
    assert_eq!(
        store.lead_refresh(&k, &lease(secs(5)), secs(5)).await,
        Ok(Refresh::Idle),
        "thirty seconds from its end is not within five"
    );
    let first = lease(secs(5));
    assert!(matches!(
        store.lead_refresh(&k, &first, secs(31)).await,
        Ok(Refresh::Lead { .. })
    ));
    assert!(matches!(
        store.lead_refresh(&k, &lease(secs(5)), secs(31)).await,
        Ok(Refresh::Elsewhere { .. })
    ));
    // Readers keep the fresh value while the refresh runs.
    assert!(matches!(
        store.acquire(&k, &lease(secs(5)), None).await,
        Ok(Acquired::Hit { value, .. }) if value == Bytes::from_static(b"v")
    ));
}
