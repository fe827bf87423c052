//! Every store backend against the same lease protocol (docs/design.md, "Store protocol"): the
//! in-process memory store, Redis, a three-primary Redis Cluster and NATS JetStream KV, the servers
//! started by the test on ephemeral loopback ports, and each backend reached through two stores of
//! its own connections, as two replicas would reach it.
//!
//! What it proves, on each of them: a key has one lease at a time, which the first caller takes and
//! every other caller waits on, told its name; a retry with the holder's token finds its own lease;
//! only the holder's token commits, renews, releases or gives up under it, and a commit is read back
//! byte for byte until its TTL; leases, values and pass markers end on their own with their TTL,
//! and a lease that lapsed is its holder's no more, even before anyone took it; a stale value is
//! served while exactly one caller refreshes it; purge and discard remove what they promise and
//! nothing else, and count nothing that has outlived its TTL; route generations count every bump.
//!
//! Where the backends differ by design, the contract asserts what they share, and says so where it
//! does: NATS KV keeps server TTLs in whole seconds and reports a lease until the server has surely
//! removed it ([`Backend::lease_slack`]), and it answers a repeated fenced write by the same token
//! as done (the write it finds is its own earlier one), where the others answer lost.
//!
//! Waits for a TTL to run out poll the store, bounded by [`support::patience`]; nothing sleeps.

use crate::support;

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use corral::bus::{Event, EventKind};
use corral::key::{KeyBuilder, KeyHash, generation_key};
use corral::store::memory::MemoryStore;
use corral::store::nats_kv::{NatsKvConfig, NatsKvStore};
use corral::store::redis::{RedisStore, RedisStoreConfig};
use corral::store::{
    Acquired, Fenced, KeyStatus, LeaseId, LeaseRequest, Refresh, Renewed, Store, StoreError, Touch,
};
use support::topology::TestRedisCluster;
use support::{TestNats, TestRedis, eventually};

const NS: &str = "contract";

/// A lease or value that outlives the test.
const LONG: Duration = Duration::from_secs(30);

/// A TTL that runs out during the test: the shortest every store keeps (NATS KV counts whole
/// seconds, and one is its minimum).
const SHORT: Duration = Duration::from_secs(1);

fn key(name: &str) -> KeyHash {
    KeyBuilder::new().part(name).finish().hash
}

fn lease(ttl: Duration) -> LeaseRequest {
    LeaseRequest {
        token: corral::store::Token::random(),
        node: "node-a".into(),
        ttl,
    }
}

/// Bytes that a text protocol would mangle (NUL, CR LF, bytes that are not UTF-8), then `name`.
fn value(name: &str) -> Bytes {
    Bytes::from([b"\x00\r\n\xff\xfe\x80 ".as_slice(), name.as_bytes()].concat())
}

// The events the engine hands the store with each write: a store that announces publishes them
// (NATS KV turns a release's into its tombstone), the others ignore them.

fn ready(k: &KeyHash, holder: &LeaseRequest) -> Bytes {
    Event::ending(
        *k,
        holder.token.lease_id(),
        EventKind::Ready { inline: None },
    )
    .encode()
}

fn failed(k: &KeyHash, holder: &LeaseRequest) -> Bytes {
    let kind = EventKind::Failed {
        message: "upstream answered 503".into(),
        response: None,
    };
    Event::ending(*k, holder.token.lease_id(), kind).encode()
}

fn abandoned(k: &KeyHash, holder: &LeaseRequest) -> Bytes {
    Event::ending(*k, holder.token.lease_id(), EventKind::Abandoned).encode()
}

fn uncacheable(k: &KeyHash, holder: &LeaseRequest) -> Bytes {
    Event::ending(*k, holder.token.lease_id(), EventKind::Uncacheable).encode()
}

fn deleted(k: &KeyHash) -> Bytes {
    Event::new(*k, EventKind::Deleted).encode()
}

// ---------------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------------

/// A running backend that stores connect to.
enum Backend {
    /// One in-process store; every store of the test is a handle on it.
    Memory(MemoryStore),
    /// A redis-server of this test's own.
    Redis(TestRedis),
    /// Three cluster-enabled redis-servers of this test's own, the slots split between them.
    RedisCluster(TestRedisCluster),
    /// A nats-server (2.11 or newer, with JetStream) of this test's own.
    NatsKv(TestNats),
}

impl Backend {
    async fn memory() -> Self {
        Backend::Memory(MemoryStore::new())
    }

    async fn redis() -> Self {
        Backend::Redis(TestRedis::start().await)
    }

    async fn redis_cluster() -> Self {
        Backend::RedisCluster(TestRedisCluster::start().await)
    }

    async fn nats_kv() -> Self {
        Backend::NatsKv(TestNats::start().await)
    }

    /// A store on this backend with connections of its own, as another replica has (on memory, a
    /// handle on the same data). Redis stores announce, as they do with the bus left out.
    async fn store(&self) -> Box<dyn Store> {
        let store: Box<dyn Store> = match self {
            Backend::Memory(memory) => Box::new(memory.clone()),
            Backend::Redis(redis) => Box::new(redis_store(redis.url()).await),
            Backend::RedisCluster(cluster) => Box::new(redis_store(cluster.url()).await),
            Backend::NatsKv(nats) => Box::new(
                NatsKvStore::connect(NatsKvConfig::new(nats.url(), NS))
                    .await
                    .expect("connect to the test nats"),
            ),
        };
        assert!(
            store.min_lease_ttl() <= SHORT,
            "{} keeps no lease as short as {SHORT:?}",
            store.kind()
        );
        store
    }

    /// Two stores of their own connections on this backend.
    async fn two_stores(&self) -> (Box<dyn Store>, Box<dyn Store>) {
        (self.store().await, self.store().await)
    }

    /// How much longer than its TTL a WAIT or PENDING may say a lease has left. NATS KV reports a
    /// lease until the server has surely removed it: its TTL rounded up to whole seconds, plus
    /// half a second for the server's expiry tick (docs/design.md, "Time"). The others report the
    /// TTL itself.
    fn lease_slack(&self) -> Duration {
        match self {
            Backend::NatsKv(_) => Duration::from_millis(1500),
            _ => Duration::ZERO,
        }
    }
}

async fn redis_store(url: String) -> RedisStore {
    let mut config = RedisStoreConfig::new(url, NS);
    config.announce = true;
    RedisStore::connect(config)
        .await
        .expect("connect to the test redis")
}

// ---------------------------------------------------------------------------------------------
// Steps and checks shared by the contract
// ---------------------------------------------------------------------------------------------

/// Acquires `k` for `caller`, which must lead; answers the fence.
async fn leads(store: &dyn Store, k: &KeyHash, caller: &LeaseRequest) -> u64 {
    match store.acquire(k, caller, None).await {
        Ok(Acquired::Lead { fence }) => fence,
        other => panic!("{}: the caller should lead, got {other:?}", store.kind()),
    }
}

/// `answer` is a WAIT on `holder`'s lease, named by its lease id, with at most `at_most` left.
fn assert_waits_on(answer: Result<Acquired, StoreError>, holder: &LeaseRequest, at_most: Duration) {
    match answer {
        Ok(Acquired::Wait { lease_left, lease }) => {
            assert_eq!(
                lease,
                Some(LeaseId::of(holder.token)),
                "the wait names the holder's lease"
            );
            assert!(
                lease_left > Duration::ZERO && lease_left <= at_most,
                "{lease_left:?} left of a lease that has at most {at_most:?}"
            );
        }
        other => panic!("expected a wait on the holder's lease, got {other:?}"),
    }
}

/// The key is PENDING, with at most `at_most` left; answers how long.
async fn pending(store: &dyn Store, k: &KeyHash, at_most: Duration) -> Duration {
    match store.status(k).await {
        Ok(KeyStatus::Pending { lease_left })
            if lease_left > Duration::ZERO && lease_left <= at_most =>
        {
            lease_left
        }
        other => panic!("expected a pending key with at most {at_most:?} left, got {other:?}"),
    }
}

/// A caller with a token of its own gets a HIT on `k` with exactly `expected`, fresh for at most
/// `ttl`.
async fn assert_hit(store: &dyn Store, k: &KeyHash, expected: &Bytes, ttl: Duration) {
    match store.acquire(k, &lease(LONG), None).await {
        Ok(Acquired::Hit { value, ttl_left }) => {
            assert_eq!(&value, expected, "the bytes that were committed");
            assert!(
                ttl_left > Duration::ZERO && ttl_left <= ttl,
                "{ttl_left:?} left of a value stored for {ttl:?}"
            );
        }
        other => panic!("expected a hit, got {other:?}"),
    }
}

async fn commit(
    store: &dyn Store,
    k: &KeyHash,
    holder: &LeaseRequest,
    value: Bytes,
    ttl: Duration,
) -> Result<Fenced, StoreError> {
    store
        .commit(k, holder.token, value, ttl, false, ready(k, holder))
        .await
}

/// Commits `value` for `ttl` under a lease taken for it, fresh for `fresh` of it.
async fn fill(store: &dyn Store, k: &KeyHash, value: &Bytes, fresh: Duration, ttl: Duration) {
    let holder = lease(LONG);
    leads(store, k, &holder).await;
    let done = store
        .commit_fresh(
            k,
            holder.token,
            value.clone(),
            fresh,
            ttl,
            false,
            ready(k, &holder),
        )
        .await;
    assert_eq!(done, Ok(Fenced::Done));
}

/// How long a value with a stale window is kept in all.
const KEPT: Duration = Duration::from_secs(60);

/// Fills `k` with `value`, fresh for [`SHORT`] and kept for [`KEPT`], and waits until it is stale.
async fn stale_value(store: &dyn Store, k: &KeyHash, value: &Bytes) {
    fill(store, k, value, SHORT, KEPT).await;
    assert_hit(store, k, value, SHORT).await;
    eventually("the value to go stale", || async {
        matches!(
            store.peek(k, None).await,
            Ok(Acquired::Stale {
                refresh: Refresh::Idle,
                ..
            })
        )
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// The contract, for every backend
// ---------------------------------------------------------------------------------------------

/// Turns each contract test below into one test per backend.
macro_rules! on_every_store {
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
        mod redis_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::redis_cluster().await).await;
                }
            )*
        }
        mod nats_kv {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::nats_kv().await).await;
                }
            )*
        }
    };
}

on_every_store!(
    the_first_acquire_leads_and_every_other_caller_waits_on_its_named_lease,
    of_many_callers_at_once_exactly_one_leads,
    a_retried_acquire_by_the_leader_leads_again_on_the_same_lease,
    a_commit_by_the_holder_is_read_back_byte_for_byte_and_ends_the_lease,
    a_commit_without_the_lease_is_refused_and_stores_nothing,
    only_the_holder_releases_or_gives_up_its_lease,
    a_lease_nobody_renews_ends_with_its_ttl_and_another_caller_leads,
    renew_extends_the_holders_lease_and_nobody_elses,
    a_value_is_gone_after_its_ttl,
    purge_removes_value_lease_and_pass_marker_and_says_whether_any_was_there,
    give_up_leaves_a_pass_marker_that_answers_pass_until_its_ttl,
    a_stale_value_is_served_while_exactly_one_caller_refreshes_it,
    a_refresh_lease_is_renewed_by_its_holder_and_lapses_without_it,
    a_lapsed_refresh_lease_is_lost_to_its_holder_before_anyone_takes_it,
    an_uncacheable_refresh_takes_the_stale_value_with_it,
    an_early_refresh_takes_the_lease_over_a_value_near_its_end_once,
    a_sliding_read_below_the_slack_restores_the_whole_ttl_and_status_touches_nothing,
    discard_removes_only_the_exact_bytes_it_is_given,
    an_expired_value_or_pass_marker_is_nothing_to_purge_or_discard,
    route_generations_start_at_zero_and_count_every_bump,
);

async fn the_first_acquire_leads_and_every_other_caller_waits_on_its_named_lease(backend: Backend) {
    let (a, b) = backend.two_stores().await;
    let k = key("lead");
    // Reads take nothing: the key is still empty after a peek and a status.
    assert_eq!(a.peek(&k, None).await, Ok(Acquired::Empty));
    assert_eq!(a.status(&k).await, Ok(KeyStatus::Empty));
    assert_eq!(b.peek(&k, None).await, Ok(Acquired::Empty));

    let leader = lease(LONG);
    leads(&*a, &k, &leader).await;
    // Every other caller, on either connection, waits and is told the name of the leader's lease
    // (never its token); a peek says the same and takes nothing.
    let at_most = LONG + backend.lease_slack();
    for store in [&a, &b] {
        assert_waits_on(
            store.acquire(&k, &lease(LONG), None).await,
            &leader,
            at_most,
        );
        assert_waits_on(store.peek(&k, None).await, &leader, at_most);
    }
    pending(&*b, &k, at_most).await;
    // A lease is one key's: another key is free.
    leads(&*b, &key("another key"), &lease(LONG)).await;
}

async fn of_many_callers_at_once_exactly_one_leads(backend: Backend) {
    let (a, b) = backend.two_stores().await;
    let k = key("herd");
    let callers: Vec<LeaseRequest> = (0..10).map(|_| lease(LONG)).collect();
    let answers = futures::future::join_all(callers.iter().enumerate().map(|(i, caller)| {
        let store = if i % 2 == 0 { &a } else { &b };
        store.acquire(&k, caller, None)
    }))
    .await;
    let leaders: Vec<&LeaseRequest> = callers
        .iter()
        .zip(&answers)
        .filter(|(_, answer)| matches!(answer, Ok(Acquired::Lead { .. })))
        .map(|(caller, _)| caller)
        .collect();
    assert_eq!(leaders.len(), 1, "exactly one leads: {answers:?}");
    // Every other caller waits on that one's lease.
    let at_most = LONG + backend.lease_slack();
    for (caller, answer) in callers.iter().zip(answers) {
        if caller.token != leaders[0].token {
            assert_waits_on(answer, leaders[0], at_most);
        }
    }
}

async fn a_retried_acquire_by_the_leader_leads_again_on_the_same_lease(backend: Backend) {
    let (a, b) = backend.two_stores().await;
    let k = key("retry");
    let leader = lease(LONG);
    let fence = leads(&*a, &k, &leader).await;
    // A retry after a client-side timeout carries the same token, on the same connection or
    // another: it leads on the lease its first try made, and waits on nobody.
    assert_eq!(
        a.acquire(&k, &leader, None).await,
        Ok(Acquired::Lead { fence })
    );
    assert_eq!(
        b.acquire(&k, &leader, None).await,
        Ok(Acquired::Lead { fence })
    );
    // Still one lease, the leader's: others wait on it, and a renewal keeps its fence.
    let at_most = LONG + backend.lease_slack();
    assert_waits_on(b.acquire(&k, &lease(LONG), None).await, &leader, at_most);
    assert_eq!(a.renew(&k, leader.token, LONG).await, Ok(Renewed::Held));
    assert_eq!(
        b.acquire(&k, &leader, None).await,
        Ok(Acquired::Lead { fence })
    );
    // And it commits.
    let v = value("retried");
    assert_eq!(
        commit(&*a, &k, &leader, v.clone(), LONG).await,
        Ok(Fenced::Done)
    );
    assert_hit(&*b, &k, &v, LONG).await;
}

async fn a_commit_by_the_holder_is_read_back_byte_for_byte_and_ends_the_lease(backend: Backend) {
    let (a, b) = backend.two_stores().await;
    let k = key("commit");
    let holder = lease(LONG);
    leads(&*a, &k, &holder).await;
    let v = value("committed");
    let ttl = Duration::from_secs(60);
    assert_eq!(
        commit(&*a, &k, &holder, v.clone(), ttl).await,
        Ok(Fenced::Done)
    );

    // A hit for every other caller, on either connection, with the same bytes; a peek sees the
    // same, and status says it exists, none for longer than the ttl.
    assert_hit(&*b, &k, &v, ttl).await;
    assert_hit(&*a, &k, &v, ttl).await;
    match b.peek(&k, None).await {
        Ok(Acquired::Hit { value, ttl_left }) => {
            assert_eq!(value, v);
            assert!(ttl_left > Duration::ZERO && ttl_left <= ttl, "{ttl_left:?}");
        }
        other => panic!("a peek of a committed value is a hit, got {other:?}"),
    }
    match b.status(&k).await {
        Ok(KeyStatus::Exists { ttl_left }) => {
            assert!(ttl_left > Duration::ZERO && ttl_left <= ttl, "{ttl_left:?}")
        }
        other => panic!("status of a committed value is exists, got {other:?}"),
    }

    // The commit ended the lease: its holder renews, releases and gives up nothing more.
    assert_eq!(a.renew(&k, holder.token, LONG).await, Ok(Renewed::Lost));
    assert_eq!(
        a.release(&k, holder.token, abandoned(&k, &holder)).await,
        Ok(Fenced::Lost)
    );
    assert_eq!(
        a.give_up(&k, holder.token, LONG, uncacheable(&k, &holder))
            .await,
        Ok(Fenced::Lost)
    );
    // A repeated commit (a retry) writes nothing more. What it answers differs by design: NATS KV
    // finds its own earlier write and answers done, the others find no lease and answer lost.
    let again = commit(&*a, &k, &holder, value("written again"), ttl).await;
    assert!(again.is_ok(), "{again:?}");
    assert_hit(&*b, &k, &v, ttl).await;
}

async fn a_commit_without_the_lease_is_refused_and_stores_nothing(backend: Backend) {
    let (a, b) = backend.two_stores().await;
    let at_most = LONG + backend.lease_slack();
    let stranger = lease(LONG);

    // No lease at all: an empty key takes no commit.
    let empty = key("nobody's");
    assert_eq!(
        commit(&*a, &empty, &stranger, value("x"), LONG).await,
        Ok(Fenced::Lost)
    );
    assert_eq!(a.status(&empty).await, Ok(KeyStatus::Empty));

    // Someone else's lease: a foreign token is refused, nothing is stored, the lease stays.
    let k = key("fenced");
    let holder = lease(LONG);
    let fence = leads(&*a, &k, &holder).await;
    assert_eq!(
        commit(&*b, &k, &stranger, value("foreign"), LONG).await,
        Ok(Fenced::Lost)
    );
    assert_waits_on(b.peek(&k, None).await, &holder, at_most);
    pending(&*b, &k, at_most).await;
    assert_eq!(
        a.acquire(&k, &holder, None).await,
        Ok(Acquired::Lead { fence }),
        "the holder's lease is untouched"
    );

    // A stale token: its lease ended and another caller took the key.
    assert_eq!(
        a.release(&k, holder.token, abandoned(&k, &holder)).await,
        Ok(Fenced::Done)
    );
    let next = lease(LONG);
    leads(&*b, &k, &next).await;
    assert_eq!(
        commit(&*a, &k, &holder, value("stale"), LONG).await,
        Ok(Fenced::Lost)
    );
    assert_waits_on(a.peek(&k, None).await, &next, at_most);
    let v = value("the new holder's");
    assert_eq!(
        commit(&*b, &k, &next, v.clone(), LONG).await,
        Ok(Fenced::Done)
    );
    assert_hit(&*a, &k, &v, LONG).await;
}

async fn only_the_holder_releases_or_gives_up_its_lease(backend: Backend) {
    let (a, b) = backend.two_stores().await;
    let at_most = LONG + backend.lease_slack();
    let k = key("release");
    let first = lease(LONG);
    let first_fence = leads(&*a, &k, &first).await;

    // A foreign token ends nothing and leaves no pass marker.
    let stranger = lease(LONG);
    assert_eq!(
        b.release(&k, stranger.token, abandoned(&k, &stranger))
            .await,
        Ok(Fenced::Lost)
    );
    assert_eq!(
        b.give_up(&k, stranger.token, LONG, uncacheable(&k, &stranger))
            .await,
        Ok(Fenced::Lost)
    );
    assert_waits_on(b.acquire(&k, &lease(LONG), None).await, &first, at_most);
    pending(&*b, &k, at_most).await;

    // The holder's release frees the key: the next caller leads, under a larger fence (fences of
    // a key grow: a counter, a revision, or the Redis server's clock).
    assert_eq!(
        a.release(&k, first.token, failed(&k, &first)).await,
        Ok(Fenced::Done)
    );
    let second = lease(LONG);
    let second_fence = leads(&*b, &k, &second).await;
    assert!(
        second_fence > first_fence,
        "fence {second_fence} after {first_fence}"
    );

    // The first holder's token ends nothing of the second lease.
    assert_eq!(
        a.release(&k, first.token, abandoned(&k, &first)).await,
        Ok(Fenced::Lost)
    );
    assert_eq!(
        a.give_up(&k, first.token, LONG, uncacheable(&k, &first))
            .await,
        Ok(Fenced::Lost)
    );
    assert_waits_on(a.acquire(&k, &lease(LONG), None).await, &second, at_most);

    // A released lease leaves nothing behind.
    assert_eq!(
        b.release(&k, second.token, abandoned(&k, &second)).await,
        Ok(Fenced::Done)
    );
    assert_eq!(a.status(&k).await, Ok(KeyStatus::Empty));
    assert_eq!(a.peek(&k, None).await, Ok(Acquired::Empty));
}

async fn a_lease_nobody_renews_ends_with_its_ttl_and_another_caller_leads(backend: Backend) {
    let (a, b) = backend.two_stores().await;
    let k = key("expiring");
    let gone = lease(SHORT);
    leads(&*a, &k, &gone).await;
    eventually("the lease nobody renews to end", || async {
        b.status(&k).await == Ok(KeyStatus::Empty)
    })
    .await;

    // Its holder lost it: nothing it writes under it lands.
    assert_eq!(a.renew(&k, gone.token, LONG).await, Ok(Renewed::Lost));
    assert_eq!(
        commit(&*a, &k, &gone, value("late"), LONG).await,
        Ok(Fenced::Lost)
    );
    assert_eq!(b.peek(&k, None).await, Ok(Acquired::Empty));

    // Another caller leads, and the old token still writes nothing.
    let next = lease(LONG);
    leads(&*b, &k, &next).await;
    assert_eq!(a.renew(&k, gone.token, LONG).await, Ok(Renewed::Lost));
    assert_eq!(
        commit(&*a, &k, &gone, value("later"), LONG).await,
        Ok(Fenced::Lost)
    );
    assert_waits_on(
        a.acquire(&k, &lease(LONG), None).await,
        &next,
        LONG + backend.lease_slack(),
    );
}

async fn renew_extends_the_holders_lease_and_nobody_elses(backend: Backend) {
    let (a, b) = backend.two_stores().await;
    let slack = backend.lease_slack();

    // Two leases of the same short TTL, taken in this order: one renewed by its holder ...
    let kept = key("renewed");
    let holder = lease(SHORT);
    leads(&*a, &kept, &holder).await;
    assert_eq!(a.renew(&kept, holder.token, LONG).await, Ok(Renewed::Held));
    let left = pending(&*b, &kept, LONG + slack).await;
    assert!(left > SHORT + slack, "renewed for {LONG:?}, {left:?} left");
    // (a retry of the renewal, on another connection, holds it too)
    assert_eq!(b.renew(&kept, holder.token, LONG).await, Ok(Renewed::Held));

    // ... and one "renewed" by a stranger, which neither holds nor extends it.
    let lapsing = key("not renewed");
    let unrenewed = lease(SHORT);
    leads(&*a, &lapsing, &unrenewed).await;
    assert_eq!(
        b.renew(&lapsing, lease(LONG).token, LONG).await,
        Ok(Renewed::Lost)
    );
    pending(&*b, &lapsing, SHORT + slack).await;

    // Once the lease that was not renewed has ended, the renewed one, older, still stands.
    eventually("the lease that was not renewed to end", || async {
        b.status(&lapsing).await == Ok(KeyStatus::Empty)
    })
    .await;
    assert_eq!(
        a.renew(&lapsing, unrenewed.token, LONG).await,
        Ok(Renewed::Lost),
        "a renewal after the end is lost"
    );
    assert_waits_on(
        b.acquire(&kept, &lease(LONG), None).await,
        &holder,
        LONG + slack,
    );
    assert_eq!(a.renew(&kept, holder.token, LONG).await, Ok(Renewed::Held));
}

async fn a_value_is_gone_after_its_ttl(backend: Backend) {
    let (a, b) = backend.two_stores().await;
    let k = key("short-lived");
    let v = value("brief");
    fill(&*a, &k, &v, SHORT, SHORT).await;
    assert_hit(&*b, &k, &v, SHORT).await;
    eventually("the value to expire", || async {
        b.status(&k).await == Ok(KeyStatus::Empty)
    })
    .await;
    assert_eq!(b.peek(&k, None).await, Ok(Acquired::Empty));
    leads(&*b, &k, &lease(LONG)).await;
}

async fn purge_removes_value_lease_and_pass_marker_and_says_whether_any_was_there(
    backend: Backend,
) {
    let (a, b) = backend.two_stores().await;
    let k = key("purged");
    assert_eq!(a.purge(&k, deleted(&k)).await, Ok(false), "nothing there");

    // A value.
    fill(&*a, &k, &value("v"), LONG, LONG).await;
    assert_eq!(b.purge(&k, deleted(&k)).await, Ok(true));
    assert_eq!(a.peek(&k, None).await, Ok(Acquired::Empty));
    assert_eq!(a.status(&k).await, Ok(KeyStatus::Empty));
    assert_eq!(b.purge(&k, deleted(&k)).await, Ok(false), "purged already");

    // A lease: the build running under it can no longer commit over the purge (I11), and the
    // next caller leads.
    let building = lease(LONG);
    leads(&*a, &k, &building).await;
    assert_eq!(b.purge(&k, deleted(&k)).await, Ok(true));
    assert_eq!(
        commit(&*a, &k, &building, value("over the purge"), LONG).await,
        Ok(Fenced::Lost)
    );
    assert_eq!(a.renew(&k, building.token, LONG).await, Ok(Renewed::Lost));
    assert_eq!(b.status(&k).await, Ok(KeyStatus::Empty));
    let next = lease(LONG);
    leads(&*b, &k, &next).await;

    // A pass marker.
    assert_eq!(
        b.give_up(&k, next.token, LONG, uncacheable(&k, &next))
            .await,
        Ok(Fenced::Done)
    );
    assert!(matches!(a.peek(&k, None).await, Ok(Acquired::Pass { .. })));
    assert_eq!(a.purge(&k, deleted(&k)).await, Ok(true));
    let last = lease(LONG);
    leads(&*a, &k, &last).await;

    // A lease that was released leaves nothing to purge.
    assert_eq!(
        a.release(&k, last.token, abandoned(&k, &last)).await,
        Ok(Fenced::Done)
    );
    assert_eq!(b.purge(&k, deleted(&k)).await, Ok(false));
}

async fn give_up_leaves_a_pass_marker_that_answers_pass_until_its_ttl(backend: Backend) {
    let (a, b) = backend.two_stores().await;
    let k = key("uncacheable");
    let holder = lease(LONG);
    leads(&*a, &k, &holder).await;
    // Two seconds: long enough that the reads below surely see it, short enough to wait out.
    let pass_ttl = 2 * SHORT;
    assert_eq!(
        a.give_up(&k, holder.token, pass_ttl, uncacheable(&k, &holder))
            .await,
        Ok(Fenced::Done)
    );

    // Every caller hears PASS, for at most the marker's TTL, and nobody leads.
    let passes = |answer: &Result<Acquired, StoreError>| {
        matches!(answer, Ok(Acquired::Pass { ttl_left })
            if *ttl_left > Duration::ZERO && *ttl_left <= pass_ttl)
    };
    for store in [&a, &b] {
        let answer = store.acquire(&k, &lease(LONG), None).await;
        assert!(passes(&answer), "{answer:?}");
        let answer = store.peek(&k, None).await;
        assert!(passes(&answer), "{answer:?}");
    }
    match b.status(&k).await {
        Ok(KeyStatus::Pass { ttl_left }) => assert!(
            ttl_left > Duration::ZERO && ttl_left <= pass_ttl,
            "{ttl_left:?}"
        ),
        other => panic!("status of a pass marker is pass, got {other:?}"),
    }
    // Giving up ended the lease.
    assert_eq!(
        commit(&*a, &k, &holder, value("after all"), LONG).await,
        Ok(Fenced::Lost)
    );
    assert_eq!(a.renew(&k, holder.token, LONG).await, Ok(Renewed::Lost));

    // Then the marker lapses and the next caller leads.
    eventually("the pass marker to lapse", || async {
        b.status(&k).await == Ok(KeyStatus::Empty)
    })
    .await;
    leads(&*b, &k, &lease(LONG)).await;
}

async fn a_stale_value_is_served_while_exactly_one_caller_refreshes_it(backend: Backend) {
    let (a, b) = backend.two_stores().await;
    let slack = backend.lease_slack();
    let k = key("stale");
    let old = value("old");
    stale_value(&*a, &k, &old).await;

    // Many callers at once, on two connections: each is served the stale value, exactly one is
    // told to lead its refresh, and every other is told whose lease that is.
    let callers: Vec<LeaseRequest> = (0..10).map(|_| lease(LONG)).collect();
    let answers = futures::future::join_all(callers.iter().enumerate().map(|(i, caller)| {
        let store = if i % 2 == 0 { &a } else { &b };
        store.acquire(&k, caller, None)
    }))
    .await;
    let mut leaders = Vec::new();
    let mut elsewhere = Vec::new();
    for (caller, answer) in callers.iter().zip(answers) {
        match answer {
            Ok(Acquired::Stale {
                value,
                ttl_left,
                refresh,
            }) => {
                assert_eq!(value, old, "the stale value is served");
                assert!(
                    ttl_left > Duration::ZERO && ttl_left <= KEPT,
                    "{ttl_left:?}"
                );
                match refresh {
                    Refresh::Lead { fence } => leaders.push((caller, fence)),
                    Refresh::Elsewhere { lease_left, lease } => elsewhere.push((lease_left, lease)),
                    Refresh::Idle => panic!("an acquire always says who refreshes"),
                }
            }
            other => panic!("a stale value is served stale, got {other:?}"),
        }
    }
    assert_eq!(leaders.len(), 1, "exactly one caller leads the refresh");
    let (leader, fence) = leaders[0];
    for (lease_left, lease) in elsewhere {
        assert_eq!(lease, Some(LeaseId::of(leader.token)));
        assert!(lease_left > Duration::ZERO && lease_left <= LONG + slack);
    }

    // The leader's retry leads again; a peek sees someone refreshing and takes nothing.
    assert!(matches!(
        a.acquire(&k, leader, None).await,
        Ok(Acquired::Stale { refresh: Refresh::Lead { fence: again }, .. }) if again == fence
    ));
    assert!(matches!(
        b.peek(&k, None).await,
        Ok(Acquired::Stale { refresh: Refresh::Elsewhere { lease, .. }, .. })
            if lease == Some(LeaseId::of(leader.token))
    ));

    // A failed refresh leaves the stale value, and the next caller may lead.
    assert_eq!(
        a.release(&k, leader.token, failed(&k, leader)).await,
        Ok(Fenced::Done)
    );
    assert!(matches!(
        b.peek(&k, None).await,
        Ok(Acquired::Stale { value, refresh: Refresh::Idle, .. }) if value == old
    ));
    let next = lease(LONG);
    assert!(matches!(
        b.acquire(&k, &next, None).await,
        Ok(Acquired::Stale {
            refresh: Refresh::Lead { .. },
            ..
        })
    ));
    // Its commit replaces the value, fresh again.
    let new = value("new");
    assert_eq!(
        commit(&*b, &k, &next, new.clone(), KEPT).await,
        Ok(Fenced::Done)
    );
    assert_hit(&*a, &k, &new, KEPT).await;
}

async fn a_refresh_lease_is_renewed_by_its_holder_and_lapses_without_it(backend: Backend) {
    let (a, b) = backend.two_stores().await;
    let slack = backend.lease_slack();
    let (kept, lapsing) = (key("refresh renewed"), key("refresh not renewed"));
    let old = value("old");
    for k in [&kept, &lapsing] {
        stale_value(&*a, k, &old).await;
    }
    // Two refresh leases of the same short TTL, taken in this order: one renewed by its holder ...
    let holder = lease(SHORT);
    assert!(matches!(
        a.acquire(&kept, &holder, None).await,
        Ok(Acquired::Stale {
            refresh: Refresh::Lead { .. },
            ..
        })
    ));
    assert_eq!(a.renew(&kept, holder.token, LONG).await, Ok(Renewed::Held));
    match b.acquire(&kept, &lease(LONG), None).await {
        Ok(Acquired::Stale {
            refresh: Refresh::Elsewhere { lease_left, lease },
            ..
        }) => {
            assert_eq!(lease, Some(LeaseId::of(holder.token)));
            assert!(
                lease_left > SHORT + slack && lease_left <= LONG + slack,
                "{lease_left:?}"
            );
        }
        other => panic!("a renewed refresh lease is someone else's, got {other:?}"),
    }
    // ... and one that nobody renews (a stranger's renewal is lost and changes nothing).
    let gone = lease(SHORT);
    assert!(matches!(
        a.acquire(&lapsing, &gone, None).await,
        Ok(Acquired::Stale {
            refresh: Refresh::Lead { .. },
            ..
        })
    ));
    assert_eq!(
        b.renew(&lapsing, lease(LONG).token, LONG).await,
        Ok(Renewed::Lost)
    );
    eventually("the refresh lease nobody renews to lapse", || async {
        matches!(
            b.peek(&lapsing, None).await,
            Ok(Acquired::Stale {
                refresh: Refresh::Idle,
                ..
            })
        )
    })
    .await;
    // Another caller leads the refresh; the old holder's token writes nothing more.
    let next = lease(LONG);
    assert!(matches!(
        b.acquire(&lapsing, &next, None).await,
        Ok(Acquired::Stale { value, refresh: Refresh::Lead { .. }, .. }) if value == old
    ));
    assert_eq!(a.renew(&lapsing, gone.token, LONG).await, Ok(Renewed::Lost));
    assert_eq!(
        commit(&*a, &lapsing, &gone, value("late"), KEPT).await,
        Ok(Fenced::Lost)
    );
    let new = value("new");
    assert_eq!(
        commit(&*b, &lapsing, &next, new.clone(), KEPT).await,
        Ok(Fenced::Done)
    );
    assert_hit(&*a, &lapsing, &new, KEPT).await;
    // The renewed one, older, still stands.
    assert!(matches!(
        b.peek(&kept, None).await,
        Ok(Acquired::Stale { refresh: Refresh::Elsewhere { lease, .. }, .. })
            if lease == Some(LeaseId::of(holder.token))
    ));
}

/// Fenced writes say "lost" for a lease that "expired" ([`Fenced::Lost`]): once a refresh lease
/// has lapsed (a peek says nobody refreshes the stale value, and the next caller would lead), its
/// old holder neither commits, renews, releases nor gives up under it, even before anyone else took
/// it.
async fn a_lapsed_refresh_lease_is_lost_to_its_holder_before_anyone_takes_it(backend: Backend) {
    let (a, b) = backend.two_stores().await;
    let k = key("lapsed refresh");
    let old = value("old");
    stale_value(&*a, &k, &old).await;
    let gone = lease(SHORT);
    assert!(matches!(
        a.acquire(&k, &gone, None).await,
        Ok(Acquired::Stale {
            refresh: Refresh::Lead { .. },
            ..
        })
    ));
    eventually("the refresh lease nobody renews to lapse", || async {
        matches!(
            b.peek(&k, None).await,
            Ok(Acquired::Stale {
                refresh: Refresh::Idle,
                ..
            })
        )
    })
    .await;
    // Nothing its old holder writes under it lands. The commit goes first, while the holder's
    // process still remembers the lease: on NATS KV, the write that may name the remembered
    // revision instead of reading the entry.
    let committed = commit(&*a, &k, &gone, value("late"), KEPT).await;
    let renewed = a.renew(&k, gone.token, LONG).await;
    let released = a.release(&k, gone.token, failed(&k, &gone)).await;
    let gave_up = a
        .give_up(&k, gone.token, LONG, uncacheable(&k, &gone))
        .await;
    assert_eq!(
        (committed, renewed, released, gave_up),
        (
            Ok(Fenced::Lost),
            Ok(Renewed::Lost),
            Ok(Fenced::Lost),
            Ok(Fenced::Lost)
        ),
        "commit, renew, release and give up under a refresh lease that lapsed"
    );
    // The stale value is untouched, and free for the next caller to refresh.
    assert!(matches!(
        b.peek(&k, None).await,
        Ok(Acquired::Stale { value, refresh: Refresh::Idle, .. }) if value == old
    ));
    assert!(matches!(
        b.acquire(&k, &lease(LONG), None).await,
        Ok(Acquired::Stale { value, refresh: Refresh::Lead { .. }, .. }) if value == old
    ));
}

async fn an_uncacheable_refresh_takes_the_stale_value_with_it(backend: Backend) {
    let (a, b) = backend.two_stores().await;
    let k = key("stale, then uncacheable");
    stale_value(&*a, &k, &value("old")).await;
    let refresher = lease(LONG);
    assert!(matches!(
        b.acquire(&k, &refresher, None).await,
        Ok(Acquired::Stale {
            refresh: Refresh::Lead { .. },
            ..
        })
    ));
    assert_eq!(
        b.give_up(&k, refresher.token, LONG, uncacheable(&k, &refresher))
            .await,
        Ok(Fenced::Done)
    );
    // The pass marker is all that is left: no stale value is served any more.
    assert!(matches!(
        a.acquire(&k, &lease(LONG), None).await,
        Ok(Acquired::Pass { .. })
    ));
    assert!(matches!(a.peek(&k, None).await, Ok(Acquired::Pass { .. })));
    assert!(matches!(a.status(&k).await, Ok(KeyStatus::Pass { .. })));
}

async fn an_early_refresh_takes_the_lease_over_a_value_near_its_end_once(backend: Backend) {
    let (a, b) = backend.two_stores().await;
    let slack = backend.lease_slack();
    let k = key("early");
    // Nothing to refresh: no lease over nothing.
    assert_eq!(
        a.lead_refresh(&k, &lease(LONG), KEPT * 2).await,
        Ok(Refresh::Idle)
    );
    assert_eq!(a.status(&k).await, Ok(KeyStatus::Empty));

    let fresh = Duration::from_secs(30);
    let v = value("v");
    fill(&*a, &k, &v, fresh, KEPT).await;
    // Thirty seconds from the end of its freshness is not within five: nothing is taken ...
    assert_eq!(
        a.lead_refresh(&k, &lease(LONG), Duration::from_secs(5))
            .await,
        Ok(Refresh::Idle)
    );
    // ... so the first caller for whom it is near enough leads, and only it.
    let near = fresh + Duration::from_secs(1);
    let refresher = lease(LONG);
    let Ok(Refresh::Lead { fence }) = b.lead_refresh(&k, &refresher, near).await else {
        panic!("the first early refresh of a value near its end leads")
    };
    match a.lead_refresh(&k, &lease(LONG), near).await {
        Ok(Refresh::Elsewhere { lease_left, lease }) => {
            assert_eq!(lease, Some(LeaseId::of(refresher.token)));
            assert!(lease_left > Duration::ZERO && lease_left <= LONG + slack);
        }
        other => panic!("a second early refresh is told who refreshes, got {other:?}"),
    }
    assert_eq!(
        a.lead_refresh(&k, &refresher, near).await,
        Ok(Refresh::Lead { fence }),
        "the refresher's retry leads again"
    );
    // Readers keep the fresh value while the refresh runs, and get the new one after it.
    assert_hit(&*a, &k, &v, fresh).await;
    let new = value("refreshed");
    assert_eq!(
        commit(&*b, &k, &refresher, new.clone(), KEPT).await,
        Ok(Fenced::Done)
    );
    assert_hit(&*a, &k, &new, KEPT).await;
}

async fn a_sliding_read_below_the_slack_restores_the_whole_ttl_and_status_touches_nothing(
    backend: Backend,
) {
    let (a, b) = backend.two_stores().await;
    let k = key("sliding");
    let ttl = Duration::from_secs(3);
    let touch = Touch {
        ttl,
        slack: Duration::from_millis(300),
    };
    let holder = lease(LONG);
    leads(&*a, &k, &holder).await;
    let v = value("sliding");
    let done = a
        .commit(&k, holder.token, v.clone(), ttl, true, ready(&k, &holder))
        .await;
    assert_eq!(done, Ok(Fenced::Done));

    let threshold = ttl - touch.slack;
    let below = |status: &Result<KeyStatus, StoreError>| {
        matches!(status, Ok(KeyStatus::Exists { ttl_left })
            if *ttl_left > Duration::ZERO && *ttl_left < threshold)
    };
    // Status reads the TTL as it falls, and never sets it back.
    eventually("the value's TTL to fall below ttl - slack", || async {
        below(&b.status(&k).await)
    })
    .await;
    let status = b.status(&k).await;
    assert!(below(&status), "{status:?}");
    // A read with the touch sets it back to the whole TTL, and serves the same bytes.
    assert_eq!(
        b.peek(&k, Some(touch)).await,
        Ok(Acquired::Hit {
            value: v.clone(),
            ttl_left: ttl
        })
    );
    match a.status(&k).await {
        Ok(KeyStatus::Exists { ttl_left }) => assert!(
            ttl_left >= threshold && ttl_left <= ttl,
            "touched back to {ttl:?}, {ttl_left:?} left"
        ),
        other => panic!("the touched value exists, got {other:?}"),
    }
    assert_hit(&*a, &k, &v, ttl).await;
}

async fn discard_removes_only_the_exact_bytes_it_is_given(backend: Backend) {
    let (a, b) = backend.two_stores().await;
    let at_most = LONG + backend.lease_slack();
    let k = key("discard");
    let v = value("unreadable");
    assert_eq!(a.discard(&k, &v).await, Ok(false), "nothing there");

    fill(&*a, &k, &v, LONG, LONG).await;
    // Not the stored bytes: a prefix, a longer value, one byte changed.
    let mut changed = v.to_vec();
    changed[0] ^= 1;
    for other in [
        v.slice(..v.len() - 1),
        Bytes::from([v.as_ref(), b"!"].concat()),
        Bytes::from(changed),
    ] {
        assert_eq!(b.discard(&k, &other).await, Ok(false), "{other:?}");
    }
    assert_hit(&*b, &k, &v, LONG).await;
    // Exactly the stored bytes: removed, and the next caller leads.
    assert_eq!(b.discard(&k, &v).await, Ok(true));
    assert_eq!(a.peek(&k, None).await, Ok(Acquired::Empty));
    assert_eq!(a.discard(&k, &v).await, Ok(false), "gone already");

    // A lease or a pass marker is not a value: discard leaves both alone.
    let holder = lease(LONG);
    leads(&*a, &k, &holder).await;
    assert_eq!(b.discard(&k, &Bytes::new()).await, Ok(false));
    assert_waits_on(b.acquire(&k, &lease(LONG), None).await, &holder, at_most);
    assert_eq!(
        a.give_up(&k, holder.token, LONG, uncacheable(&k, &holder))
            .await,
        Ok(Fenced::Done)
    );
    assert_eq!(b.discard(&k, &Bytes::new()).await, Ok(false));
    assert!(matches!(b.peek(&k, None).await, Ok(Acquired::Pass { .. })));
}

/// Purge "answers whether anything was there", discard "whether it was removed": a value or pass
/// marker that status already reports gone (past its TTL) is nothing, on every store, whether or
/// not the server has removed it yet.
async fn an_expired_value_or_pass_marker_is_nothing_to_purge_or_discard(backend: Backend) {
    let (a, b) = backend.two_stores().await;
    // Not whole seconds: NATS KV's server removes entries on whole seconds (rounded up), so it
    // keeps these half a second or more past their end.
    let ttl = Duration::from_millis(1500);
    let (purged, discarded, passed) = (
        key("expired, then purged"),
        key("expired, then discarded"),
        key("lapsed pass, then purged"),
    );
    let v = value("v");
    fill(&*a, &purged, &v, ttl, ttl).await;
    fill(&*a, &discarded, &v, ttl, ttl).await;
    let holder = lease(LONG);
    leads(&*a, &passed, &holder).await;
    assert_eq!(
        a.give_up(&passed, holder.token, ttl, uncacheable(&passed, &holder))
            .await,
        Ok(Fenced::Done)
    );
    eventually("the values and the pass marker to end", || async {
        b.status(&purged).await == Ok(KeyStatus::Empty)
            && b.status(&discarded).await == Ok(KeyStatus::Empty)
            && b.status(&passed).await == Ok(KeyStatus::Empty)
    })
    .await;
    let answers = (
        b.purge(&purged, deleted(&purged)).await,
        b.discard(&discarded, &v).await,
        b.purge(&passed, deleted(&passed)).await,
    );
    assert_eq!(
        answers,
        (Ok(false), Ok(false), Ok(false)),
        "purge of an expired value, discard of one, purge of a lapsed pass marker"
    );
}

async fn route_generations_start_at_zero_and_count_every_bump(backend: Backend) {
    let (a, b) = backend.two_stores().await;
    let g = generation_key("reports");
    assert_eq!(a.route_generation("reports").await, Ok(0));
    assert_eq!(a.bump_generation("reports", &g).await, Ok(1));
    assert_eq!(b.bump_generation("reports", &g).await, Ok(2));
    assert_eq!(b.route_generation("reports").await, Ok(2));
    assert_eq!(
        a.route_generation("other").await,
        Ok(0),
        "a generation is per route"
    );

    // Bumps at once, on two connections: every one counts, each answered with its own number.
    let bumps = futures::future::join_all((0..4).map(|i| {
        let store = if i % 2 == 0 { &a } else { &b };
        store.bump_generation("reports", &g)
    }))
    .await;
    let answered: BTreeSet<u64> = bumps.into_iter().map(|bump| bump.expect("bump")).collect();
    assert_eq!(answered, (3..=6).collect::<BTreeSet<u64>>());
    assert_eq!(a.route_generation("reports").await, Ok(6));
    assert_eq!(b.route_generation("reports").await, Ok(6));
}
