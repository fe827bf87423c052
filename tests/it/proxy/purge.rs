//! Invalidation end to end: purges by path prefix, whole route and surrogate tag, purges during a
//! fill, unsafe methods, and `corral purge`. Three replicas on a real Redis store and NATS bus,
//! a real upstream, requests over real sockets.
//!
//! Every replica is warmed first, so each holds the answers in its L1: a purge must reach every
//! replica's L1, not only the store.

use crate::support;

use std::process::Stdio;
use std::sync::Mutex;

use http::Method;
use serde_json::{Value, json};
use support::fault::{Fault, FaultProxy};
use support::http::Reply;
use support::proxy::{ProxyCluster, fill};
use support::servers::free_port;
use support::upstream::Upstream;
use support::{TestNats, TestRedis, eventually, patience};

/// The admin token of [`CONFIG`].
const TOKEN: &str = "secret";

const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0, token: secret }
namespace: purge
store: { kind: redis, url: "{{redis}}" }
bus: { kind: nats, url: "{{nats}}" }
defaults: { ttl: 60s, wait_timeout: 5s, lease_ttl: 5s, poll_interval: 1s, pass_ttl: 2s }
routes:
  - name: reports
    match: { path_prefix: /reports, methods: [] }
    upstream: {{upstream}}
    key: { query: all }
  - name: other
    match: { path_prefix: /other }
    upstream: {{upstream}}
  - name: live
    match: { path_prefix: /live }
    upstream: {{upstream}}
    cache: false
"#;

/// Three replicas in front of an upstream whose every fetch answers a body of its own, so a
/// refetch is visible.
async fn three_replicas(upstream: &Upstream) -> ProxyCluster {
    ProxyCluster::with_redis_nats(3, &fill(CONFIG, &[("upstream", &upstream.url())])).await
}

/// Fetches `url` on replica 0 (a MISS), then on every replica (so each has it in its L1); answers
/// the body they all share.
async fn warm(proxy: &ProxyCluster, url: &str) -> String {
    let first = proxy.get(0, url).send().await;
    assert_eq!(first.status, 200, "{url}: {}", first.text());
    for i in 0..proxy.len() {
        let again = proxy.get(i, url).send().await;
        assert_eq!(again.x_cache(), "HIT", "replica {i} warming {url}");
        assert_eq!(again.text(), first.text(), "replica {i} warming {url}");
    }
    first.text()
}

/// `POST /admin/purge` with `body` on replica `i`.
async fn purge(proxy: &ProxyCluster, i: usize, body: Value) -> Reply {
    proxy
        .admin(i, Method::POST, "/admin/purge")
        .bearer(TOKEN)
        .json(&body)
        .send()
        .await
}

/// A purge that succeeded; its answer.
async fn purged(proxy: &ProxyCluster, i: usize, body: Value) -> Value {
    let reply = purge(proxy, i, body.clone()).await;
    assert_eq!(reply.status, 200, "{body}: {}", reply.text());
    reply.json()
}

/// After a purge of `url` whose old answer was `old`: replica 0 fetches anew (once it heard the
/// purge: other replicas learn of it through the bus, a moment after the purge answered), and
/// every other replica answers the new body, not its L1's old one. Answers the new body.
async fn assert_purged(proxy: &ProxyCluster, url: &str, old: &str) -> String {
    let new = Mutex::new(None);
    eventually(
        &format!("replica 0 to stop answering the purged {url}"),
        || async {
            let reply = proxy.get(0, url).send().await;
            if reply.text() == old {
                return false;
            }
            assert_eq!(
                reply.x_cache(),
                "MISS",
                "{url}: the first answer after the purge"
            );
            *new.lock().unwrap() = Some(reply.text());
            true
        },
    )
    .await;
    let new = new.into_inner().unwrap().expect("a new answer");
    for i in 1..proxy.len() {
        eventually(
            &format!("replica {i} to drop the purged {url} from its L1"),
            || async {
                let reply = proxy.get(i, url).send().await;
                assert!(
                    reply.text() == old || reply.text() == new,
                    "{url}: {}",
                    reply.text()
                );
                reply.text() == new
            },
        )
        .await;
    }
    new
}

/// Every replica still answers `old` for `url`, from a cache.
async fn assert_kept(proxy: &ProxyCluster, url: &str, old: &str) {
    for i in 0..proxy.len() {
        let reply = proxy.get(i, url).send().await;
        assert_eq!(reply.x_cache(), "HIT", "replica {i}: {url} should be kept");
        assert_eq!(reply.text(), old, "replica {i}: {url} should be kept");
    }
}

// ------------------------------------------------------------------------------ the forms ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prefix_purge_drops_the_routes_keys_under_it_on_every_replica() {
    let upstream = Upstream::start().await.distinct_bodies("/");
    let proxy = three_replicas(&upstream).await;
    let under = [
        "/reports/2024/a",
        "/reports/2024/b?x=1",
        "/reports/2024/b?x=2",
    ];
    let outside = ["/reports/2023/c", "/other/2024/d"];
    let mut old = Vec::new();
    for url in under.iter().chain(&outside) {
        old.push(warm(&proxy, url).await);
    }

    let answer = purged(
        &proxy,
        1,
        json!({"route": "reports", "prefix": "/reports/2024/"}),
    )
    .await;
    assert_eq!(answer["count"], json!(3), "{answer}");

    for (url, old) in under.iter().zip(&old) {
        assert_purged(&proxy, url, old).await;
    }
    for (url, old) in outside.iter().zip(&old[under.len()..]) {
        assert_kept(&proxy, url, old).await;
    }
    for url in under {
        assert_eq!(
            upstream.hits(url),
            2,
            "{url}: once, and once after the purge"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_route_purge_drops_every_key_of_the_route_and_replicas_started_later_know_it() {
    let upstream = Upstream::start().await.distinct_bodies("/");
    let (redis, nats) = tokio::join!(TestRedis::start(), TestNats::start());
    let yaml = fill(
        CONFIG,
        &[
            ("upstream", &upstream.url()),
            ("redis", &redis.url()),
            ("nats", &nats.url()),
        ],
    );
    let proxy = ProxyCluster::start(3, &yaml, None).await;
    let route = ["/reports/1", "/reports/2?day=3", "/reports/deep/4"];
    let mut old = Vec::new();
    for url in route {
        old.push(warm(&proxy, url).await);
    }
    let elsewhere = warm(&proxy, "/other/1").await;

    let answer = purged(&proxy, 2, json!({"route": "reports"})).await;
    assert_eq!(answer["generation"], json!(1), "{answer}");

    let mut new = Vec::new();
    for (url, old) in route.iter().zip(&old) {
        new.push(assert_purged(&proxy, url, old).await);
    }
    assert_kept(&proxy, "/other/1", &elsewhere).await;

    // A replica that starts now reads the generation from the store: it answers the new bodies,
    // never the old ones still stored under the old generation.
    let late = ProxyCluster::start(1, &yaml, None).await;
    for (url, new) in route.iter().zip(&new) {
        let reply = late.get(0, url).send().await;
        assert_eq!(reply.x_cache(), "HIT", "{url} on a late replica");
        assert_eq!(&reply.text(), new, "{url} on a late replica");
    }

    let again = purged(&proxy, 0, json!({"route": "reports"})).await;
    assert_eq!(again["generation"], json!(2), "{again}");
    for (url, new) in route.iter().zip(&new) {
        eventually(
            &format!("the late replica to hear the purge of {url}"),
            || async { &late.get(0, url).send().await.text() != new },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tag_purge_drops_the_keys_whose_answers_carried_the_tag() {
    let upstream = Upstream::start()
        .await
        .distinct_bodies("/")
        .header("/reports/users/42", "surrogate-key", "user-42 users")
        .distinct_bodies("/reports/users/42")
        .header("/other/users/42", "cache-tag", "users,user-42")
        .distinct_bodies("/other/users/42")
        .header("/reports/users/7", "surrogate-key", "user-7 users")
        .distinct_bodies("/reports/users/7");
    let proxy = three_replicas(&upstream).await;
    let tagged = ["/reports/users/42/profile", "/other/users/42/posts"];
    let untagged = "/reports/users/7/profile";
    let mut old = Vec::new();
    for url in tagged {
        old.push(warm(&proxy, url).await);
    }
    let seven = warm(&proxy, untagged).await;

    let answer = purged(&proxy, 0, json!({"tag": "user-42"})).await;
    assert_eq!(answer["count"], json!(2), "{answer}");
    for (url, old) in tagged.iter().zip(&old) {
        assert_purged(&proxy, url, old).await;
    }
    assert_kept(&proxy, untagged, &seven).await;

    // The refetched answers are tagged again; a tag shared by all three covers all three.
    let answer = purged(&proxy, 1, json!({"tag": "users"})).await;
    assert_eq!(answer["count"], json!(3), "{answer}");
    assert_purged(&proxy, untagged, &seven).await;
}

/// Index writes replica `i` made (calls of the store's `index`, whatever their result).
async fn index_calls(proxy: &ProxyCluster, i: usize) -> f64 {
    let text = proxy.admin(i, Method::GET, "/metrics").send().await.text();
    support::workload::sample(&text, "corral_store_operations_total", &[("op", "index")])
}

/// A fill indexes its key before its fetch, for as long as the route keeps a value; only an
/// answer with tags (or a longer life than the route gives) needs a second index write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_untagged_fill_indexes_its_key_once_and_a_tagged_one_again_with_its_tags() {
    let upstream = Upstream::start().await.distinct_bodies("/").header(
        "/reports/tagged",
        "surrogate-key",
        "t-1",
    );
    let proxy = three_replicas(&upstream).await;
    let before = index_calls(&proxy, 0).await;
    let plain = warm(&proxy, "/reports/plain").await;
    assert_eq!(index_calls(&proxy, 0).await - before, 1.0, "untagged fill");
    warm(&proxy, "/reports/tagged").await;
    assert_eq!(index_calls(&proxy, 0).await - before, 3.0, "tagged fill");

    // The one write covers prefix purges, and the tagged key is found by its tag.
    let answer = purged(
        &proxy,
        1,
        json!({"route": "reports", "prefix": "/reports/plain"}),
    )
    .await;
    assert_eq!(answer["count"], json!(1), "{answer}");
    assert_purged(&proxy, "/reports/plain", &plain).await;
    let answer = purged(&proxy, 2, json!({"tag": "t-1"})).await;
    assert_eq!(answer["count"], json!(1), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn purges_that_are_not_a_form_or_name_no_route_are_refused() {
    let upstream = Upstream::start().await;
    let proxy = three_replicas(&upstream).await;
    let unknown = purge(&proxy, 0, json!({"route": "nope"})).await;
    assert_eq!(unknown.status, 404, "{}", unknown.text());
    assert!(
        unknown.text().contains("no route is named"),
        "{}",
        unknown.text()
    );
    let unknown = purge(&proxy, 0, json!({"route": "nope", "prefix": "/x"})).await;
    assert_eq!(unknown.status, 404, "{}", unknown.text());
    let uncached = purge(&proxy, 0, json!({"route": "live"})).await;
    assert_eq!(uncached.status, 400, "{}", uncached.text());
    for body in [
        json!({}),
        json!({"route": "reports", "tag": "t"}),
        json!({"prefix": "/reports/"}),
        json!({"url": "/reports/1", "route": "reports"}),
        json!({"tag": "{braces}"}),
        json!({"tag": "user-42", "extra": true}),
    ] {
        let reply = purge(&proxy, 1, body.clone()).await;
        assert_eq!(reply.status, 400, "{body}: {}", reply.text());
    }
    let no_token = proxy
        .admin(2, Method::POST, "/admin/purge")
        .json(&json!({"tag": "t"}))
        .send()
        .await;
    assert_eq!(no_token.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_form_works_on_the_nats_kv_store() {
    let upstream = Upstream::start()
        .await
        .distinct_bodies("/")
        .header("/reports/tagged", "surrogate-key", "user-42")
        .distinct_bodies("/reports/tagged");
    let nats = TestNats::start().await;
    let backing =
        "store: { kind: redis, url: \"{{redis}}\" }\nbus: { kind: nats, url: \"{{nats}}\" }";
    assert!(CONFIG.contains(backing));
    let nats_kv = format!("store: {{ kind: nats, url: \"{}\" }}", nats.url());
    let yaml = fill(
        &CONFIG.replace(backing, &nats_kv),
        &[("upstream", &upstream.url())],
    );
    let proxy = ProxyCluster::start(3, &yaml, None).await;

    let forms = [
        (
            "/reports/2024/1",
            json!({"route": "reports", "prefix": "/reports/2024/"}),
        ),
        ("/reports/tagged/1", json!({"tag": "user-42"})),
        ("/reports/whole", json!({"route": "reports"})),
    ];
    for (url, body) in forms {
        let old = warm(&proxy, url).await;
        let answer = purged(&proxy, 1, body.clone()).await;
        if let Some(count) = answer.get("count") {
            assert_eq!(count, &json!(1), "{body}: {answer}");
        }
        assert_purged(&proxy, url, &old).await;
    }
}

// ----------------------------------------------------------------------- in-flight fills ----

/// Holds a fill of `url` on replica 0, runs `body` as a purge on replica 2 while it is held, then
/// lets it finish: the fill's answer must not be stored, so the next GET (on replica 1) fetches
/// again.
async fn purge_during_a_fill(body: Value) {
    let upstream = Upstream::start()
        .await
        .distinct_bodies("/")
        .distinct_bodies("/reports/held");
    let hold = upstream.hold("/reports/held");
    let proxy = three_replicas(&upstream).await;
    let url = "/reports/held/1?x=1";

    let fill = tokio::spawn(proxy.get(0, url).send());
    upstream.wait_for_hits(url, 1).await;
    let answer = purged(&proxy, 2, body.clone()).await;
    if let Some(count) = answer.get("count") {
        assert_eq!(
            count,
            &json!(1),
            "the held fill's lease is covered: {answer}"
        );
    }
    hold.release();
    let filled = fill.await.expect("the held request");
    assert_eq!(filled.status, 200, "{body}");
    // A URL or prefix purge deletes the fill's lease, so the store refuses its commit (and the
    // leader counts that); a route purge moves the route to a new generation instead, where the
    // old fill's key is never read again.
    if body.get("url").is_some() || body.get("prefix").is_some() {
        let metrics = proxy.admin(0, Method::GET, "/metrics").send().await.text();
        let rejected = metrics
            .lines()
            .find(|line| {
                line.starts_with("corral_lease_events_total{")
                    && line.contains("event=\"commit_rejected\"")
            })
            .and_then(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok());
        assert_eq!(
            rejected,
            Some(1.0),
            "{body}: the fill's commit was rejected"
        );
    }

    // Replica 1 hears a route purge through the bus a moment after the purge answered: until
    // then it still reads the previous generation, where the fill's answer may be. A URL or
    // prefix purge left nothing to read.
    let route_only = body.get("url").is_none() && body.get("prefix").is_none();
    let next = Mutex::new(None);
    eventually(&format!("{body}: replica 1 to hear the purge"), || async {
        let reply = proxy.get(1, url).send().await;
        if route_only && reply.text() == filled.text() {
            return false;
        }
        *next.lock().unwrap() = Some((reply.x_cache().to_owned(), reply.text()));
        true
    })
    .await;
    let (cached, text) = next.into_inner().unwrap().expect("an answer");
    assert_eq!(
        cached, "MISS",
        "{body}: the fill that began before the purge was stored"
    );
    assert_ne!(text, filled.text(), "{body}");
    assert_eq!(upstream.hits(url), 2, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prefix_purge_during_a_fill_keeps_the_fill_from_being_stored() {
    purge_during_a_fill(json!({"route": "reports", "prefix": "/reports/held/"})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_route_purge_during_a_fill_keeps_the_fill_from_being_stored() {
    purge_during_a_fill(json!({"route": "reports"})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_url_purge_during_a_fill_keeps_the_fill_from_being_stored() {
    purge_during_a_fill(json!({"url": "/reports/held/1?x=1"})).await;
}

// ------------------------------------------------------------------------- unsafe methods ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_successful_post_invalidates_its_url_on_every_replica_and_a_failed_one_does_not() {
    let upstream = Upstream::start().await.distinct_bodies("/");
    let proxy = three_replicas(&upstream).await;
    let url = "/reports/doc?id=1";
    let old = warm(&proxy, url).await;

    let posted = proxy
        .call(1, Method::POST, url)
        .body("new content")
        .send()
        .await;
    assert_eq!(posted.status, 200);
    assert_eq!(posted.x_cache(), "BYPASS");
    let new = assert_purged(&proxy, url, &old).await;

    let mut current = new.clone();
    for method in [Method::PUT, Method::PATCH, Method::DELETE] {
        let sent = proxy.call(2, method.clone(), url).send().await;
        assert_eq!(sent.status, 200, "{method}");
        current = assert_purged(&proxy, url, &current).await;
    }

    // A POST the upstream refuses changes nothing.
    let kept = warm(&proxy, "/reports/broken").await;
    upstream.set_status("/reports/broken", 500);
    let failed = proxy
        .call(0, Method::POST, "/reports/broken")
        .body("x")
        .send()
        .await;
    assert_eq!(failed.status, 500);
    upstream.set_status("/reports/broken", 200);
    assert_kept(&proxy, "/reports/broken", &kept).await;
    assert_ne!(new, old);
    let metrics = proxy.admin(1, Method::GET, "/metrics").send().await.text();
    // One key: a HEAD is keyed as the GET.
    let line = r#"corral_purges_total{form="unsafe_method"} 1"#;
    assert!(
        metrics.lines().any(|l| l == line),
        "the POST purged the GET's key once: {line} in:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn any_unsafe_method_invalidates_and_a_safe_one_does_not() {
    let upstream = Upstream::start().await.distinct_bodies("/");
    let proxy = three_replicas(&upstream).await;
    let url = "/reports/dav?id=1";
    let mut current = warm(&proxy, url).await;

    // WebDAV's and an extension method change resources as POST does (RFC 9110 section 9.2.1).
    for method in ["PROPPATCH", "MKCOL", "FROBNICATE"] {
        let method = Method::from_bytes(method.as_bytes()).expect("a token");
        let sent = proxy.call(1, method.clone(), url).send().await;
        assert_eq!(sent.status, 200, "{method}");
        assert_eq!(sent.x_cache(), "BYPASS", "{method}");
        current = assert_purged(&proxy, url, &current).await;
    }
    // Warm every replica again, then the safe methods: kept.
    for i in 0..proxy.len() {
        assert_eq!(
            proxy.get(i, url).send().await.text(),
            current,
            "replica {i}"
        );
    }
    for method in [Method::OPTIONS, Method::TRACE] {
        let sent = proxy.call(2, method.clone(), url).send().await;
        assert_eq!(sent.status, 200, "{method}");
    }
    assert_kept(&proxy, url, &current).await;
}

// ------------------------------------------------------------------------------ the CLI ----

/// A finished `corral purge`.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `corral purge --admin <admin> args...` with `token` (if any) in `CORRAL_ADMIN_TOKEN`.
async fn corral_purge(admin: &str, token: Option<&str>, args: &[&str]) -> Run {
    let mut cmd = tokio::process::Command::new(support::process::corral_bin());
    cmd.arg("purge")
        .arg("--admin")
        .arg(admin)
        .args(args)
        .env_remove("CORRAL_ADMIN_TOKEN")
        .env_remove("CORRAL_ADMIN")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(token) = token {
        cmd.env("CORRAL_ADMIN_TOKEN", token);
    }
    let output = tokio::time::timeout(patience(), cmd.output())
        .await
        .expect("corral purge finished in time")
        .expect("run corral purge");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

impl Run {
    /// The JSON answer of a purge that succeeded.
    fn answer(&self) -> Value {
        assert_eq!(self.code, Some(0), "{self:#?}");
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {self:#?}"))
    }

    /// Failed on its own (not 0, not a panic, not a signal) and said `why` on stderr.
    fn assert_refused(&self, why: &str) {
        assert!(
            matches!(self.code, Some(code) if code != 0 && code != 101),
            "{self:#?}"
        );
        assert!(self.stderr.contains(why), "expected {why:?}: {self:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corral_purge_sends_each_form_and_fails_clearly() {
    let upstream = Upstream::start()
        .await
        .distinct_bodies("/")
        .header("/reports/tagged", "surrogate-key", "user-42")
        .distinct_bodies("/reports/tagged");
    let proxy = three_replicas(&upstream).await;
    let admin = proxy.admin_url(1);

    // Each form in turn: the URL it covers, the arguments, and what the answer must say.
    let forms: [(&str, &[&str], &str, Value); 4] = [
        (
            "/reports/one?x=1",
            &["--url", "/reports/one?x=1"],
            "count",
            json!(1),
        ),
        (
            "/reports/2024/1",
            &["--route", "reports", "--prefix", "/reports/2024/"],
            "count",
            json!(1),
        ),
        (
            "/reports/tagged/1",
            &["--tag", "user-42"],
            "count",
            json!(1),
        ),
        (
            "/reports/whole",
            &["--route", "reports"],
            "generation",
            json!(1),
        ),
    ];
    for (url, args, field, expected) in forms {
        let old = warm(&proxy, url).await;
        let answer = corral_purge(&admin, Some(TOKEN), args).await.answer();
        assert_eq!(answer[field], expected, "{args:?}: {answer}");
        assert_purged(&proxy, url, &old).await;
    }

    corral_purge(&admin, Some("wrong"), &["--route", "reports"])
        .await
        .assert_refused("401");
    corral_purge(&admin, None, &["--route", "reports"])
        .await
        .assert_refused("CORRAL_ADMIN_TOKEN");
    corral_purge(&admin, Some(TOKEN), &["--route", "nope"])
        .await
        .assert_refused("no route is named");
    corral_purge(&admin, Some(TOKEN), &[])
        .await
        .assert_refused("--url");
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    corral_purge(&nowhere, Some(TOKEN), &["--tag", "user-42"])
        .await
        .assert_refused("cannot reach the admin API");
}

// ---------------------------------------------------------------------------- generations ----

/// An engine on `store`, with a bus of its own unless `hub` is shared.
async fn engine(
    store: &corral::store::memory::MemoryStore,
    hub: &corral::bus::memory::MemoryBusHub,
) -> corral::engine::Engine {
    use corral::engine::{Backend, BusConfig, Engine, EngineConfig, StoreConfig};
    let backend = Backend::new(
        StoreConfig::Memory(store.clone()),
        BusConfig::Memory(hub.clone()),
    );
    Engine::connect(EngineConfig::new("generations"), &backend)
        .await
        .expect("engine")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_learn_a_generation_from_the_bus_and_after_a_resync_from_the_store() {
    use corral::bus::memory::MemoryBusHub;
    let store = corral::store::memory::MemoryStore::new();
    let hub = MemoryBusHub::new();
    let purger = engine(&store, &hub).await;
    let listening = engine(&store, &hub).await;
    // A bus that never carries the purger's events: as if they were lost while it was away.
    let deaf = engine(&store, &MemoryBusHub::new()).await;
    for replica in [&purger, &listening, &deaf] {
        replica.track_generations(["reports", "other"]).await;
        assert_eq!(replica.generation("reports"), 0);
    }

    assert_eq!(purger.purge_route("reports").await, Ok(1));
    assert_eq!(purger.generation("reports"), 1);
    eventually("the listening replica hears generation 1", || async {
        listening.generation("reports") == 1
    })
    .await;
    assert_eq!(listening.generation("other"), 0, "one route only");
    assert_eq!(deaf.generation("reports"), 0, "its bus never carried it");

    deaf.sever_bus().await;
    eventually(
        "the deaf replica re-reads generations after its resync",
        || async { deaf.generation("reports") == 1 },
    )
    .await;

    let started_later = engine(&store, &MemoryBusHub::new()).await;
    started_later.track_generations(["reports"]).await;
    assert_eq!(
        started_later.generation("reports"),
        1,
        "read from the store at start"
    );
}

// ------------------------------------------------------------------- a store that stalls ----

/// The store a test can cut off: Redis behind a link that resets every connection on demand
/// (a frozen server would still run the commands it had received once it thaws, and so take a
/// purge the replica gave up on), and the NATS bus.
struct Stalling {
    link: FaultProxy,
    _redis: TestRedis,
    _nats: TestNats,
}

/// Two replicas on a [`Stalling`] store.
async fn on_a_store_that_stalls(upstream: &Upstream) -> (ProxyCluster, Stalling) {
    let (redis, nats) = tokio::join!(TestRedis::start(), TestNats::start());
    let link = FaultProxy::start(([127, 0, 0, 1], redis.port()).into()).await;
    let yaml = fill(
        CONFIG,
        &[
            ("upstream", &upstream.url()),
            ("redis", &format!("redis://{}", link.addr())),
            ("nats", &nats.url()),
        ],
    );
    let proxy = ProxyCluster::start(2, &yaml, None).await;
    let servers = Stalling {
        link,
        _redis: redis,
        _nats: nats,
    };
    (proxy, servers)
}

/// Store purges that failed on replica `i`, whatever the error.
async fn failed_purges(proxy: &ProxyCluster, i: usize) -> f64 {
    let text = proxy.admin(i, Method::GET, "/metrics").send().await.text();
    text.lines()
        .filter(|line| {
            line.starts_with("corral_store_operations_total{op=\"purge\"")
                && !line.contains("result=\"ok\"")
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Lost invalidations of route `reports` on replica `i`, whatever the reason.
async fn lost_invalidations(proxy: &ProxyCluster, i: usize) -> f64 {
    let text = proxy.admin(i, Method::GET, "/metrics").send().await.text();
    text.lines()
        .filter(|line| {
            line.starts_with("corral_invalidations_failed_total{")
                && line.contains("route=\"reports\"")
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A PUT answered while the store is stalled: its invalidation fails at first, every replica's
/// L1 copy drops at once (through the bus), and the store purge lands once the store is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalidation_the_stalled_store_missed_lands_once_it_is_back() {
    let upstream = Upstream::start().await.distinct_bodies("/");
    let (proxy, store) = on_a_store_that_stalls(&upstream).await;
    let url = "/reports/doc?id=7";
    let old = warm(&proxy, url).await;
    let before = failed_purges(&proxy, 0).await;

    store.link.set(Fault::Reset);
    let put = proxy.call(0, Method::PUT, url).body("new").send().await;
    assert_eq!(put.status, 200, "{}", put.text());
    assert!(
        failed_purges(&proxy, 0).await > before,
        "the store took the purge while paused"
    );
    // Replica 1's copy dropped although the store never took the purge: with the store down it
    // fetches for itself (the degrade path) instead of answering the copy.
    eventually("replica 1 stops answering its L1 copy", || async {
        let reply = proxy.get(1, url).send().await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        reply.text() != old
    })
    .await;
    store.link.restore();

    // The stored copy is gone: replica 0 (whose own L1 dropped at once) fetches anew.
    eventually("the purge lands in the store", || async {
        let reply = proxy.get(0, url).send().await;
        reply.status == 200 && reply.text() != old
    })
    .await;
    let stored = proxy.get(0, url).send().await;
    assert_eq!(stored.x_cache(), "HIT", "the new answer is stored");
    assert_ne!(stored.text(), old);
    assert_eq!(lost_invalidations(&proxy, 0).await, 0.0);
}

/// A store unreachable for longer than the retry window: the invalidation is counted as lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalidation_still_failing_after_the_retry_window_is_counted() {
    let upstream = Upstream::start().await.distinct_bodies("/");
    let (proxy, store) = on_a_store_that_stalls(&upstream).await;
    let url = "/reports/doc?id=8";
    warm(&proxy, url).await;
    assert_eq!(lost_invalidations(&proxy, 0).await, 0.0);

    store.link.set(Fault::Reset);
    let put = proxy.call(0, Method::PUT, url).body("new").send().await;
    assert_eq!(put.status, 200, "{}", put.text());
    let deadline = support::Deadline::after(corral::engine::INVALIDATION_RETRY_WINDOW + patience());
    let mut checks = 0;
    // A HEAD keys as the GET: one key, one loss.
    while lost_invalidations(&proxy, 0).await < 1.0 {
        checks += 1;
        assert!(
            !deadline.expired() && checks < 10_000,
            "no lost invalidation counted after {checks} checks"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    store.link.restore();
    // Nothing retries any more: the stored copy is what the counter says was lost.
    eventually(
        "the store answers again, still holding the copy",
        || async {
            let status = proxy.status(0, TOKEN, url).await;
            status.status == 200 && status.json()["status"] == json!("EXISTS")
        },
    )
    .await;
    assert_eq!(lost_invalidations(&proxy, 0).await, 1.0);
}

/// An admin purge that could not reach the store answers 503, never a 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_admin_purge_the_store_did_not_take_answers_503() {
    let upstream = Upstream::start().await.distinct_bodies("/");
    let (proxy, store) = on_a_store_that_stalls(&upstream).await;
    warm(&proxy, "/reports/a").await;
    store.link.set(Fault::Reset);
    for body in [
        json!({"url": "/reports/a"}),
        json!({"route": "reports"}),
        json!({"route": "reports", "prefix": "/reports/"}),
        json!({"tag": "t"}),
    ] {
        let reply = purge(&proxy, 0, body.clone()).await;
        assert_eq!(reply.status, 503, "{body}: {}", reply.text());
    }
    store.link.restore();
    // Once the store answers again (the breaker lets a call through), the copy is still there.
    eventually("a purge goes through once the store is back", || async {
        let reply = purge(&proxy, 0, json!({"url": "/reports/a"})).await;
        assert!(
            reply.status == 200 || reply.status == 503,
            "{}",
            reply.text()
        );
        reply.status == 200 && reply.json()["purged"] == json!(true)
    })
    .await;
    let again = purged(&proxy, 0, json!({"url": "/reports/a"})).await;
    assert_eq!(again["purged"], json!(false), "nothing was left: {again}");
}

/// The same on the NATS KV store, whose stream is also the bus: a PUT's invalidation that the
/// unreachable server missed lands once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalidation_the_unreachable_nats_kv_store_missed_lands_once_it_is_back() {
    let upstream = Upstream::start().await.distinct_bodies("/");
    let nats = TestNats::start().await;
    let link = FaultProxy::start(([127, 0, 0, 1], nats.port()).into()).await;
    let on_nats_kv = CONFIG.replace(
        "store: { kind: redis, url: \"{{redis}}\" }\nbus: { kind: nats, url: \"{{nats}}\" }",
        "store: { kind: nats, url: \"{{nats}}\" }",
    );
    assert_ne!(on_nats_kv, CONFIG);
    let yaml = fill(
        &on_nats_kv,
        &[
            ("upstream", &upstream.url()),
            ("nats", &format!("nats://{}", link.addr())),
        ],
    );
    let proxy = ProxyCluster::start(2, &yaml, None).await;
    let url = "/reports/doc?id=9";
    warm(&proxy, url).await;

    link.set(Fault::Reset);
    let put = proxy.call(0, Method::PUT, url).body("new").send().await;
    assert_eq!(put.status, 200, "{}", put.text());
    assert!(
        failed_purges(&proxy, 0).await > 0.0,
        "the store took the purge while unreachable"
    );
    link.restore();

    eventually("the purge lands in the store", || async {
        let status = proxy.status(0, TOKEN, url).await;
        status.status == 200 && status.json()["status"] == json!("EMPTY")
    })
    .await;
    assert_eq!(lost_invalidations(&proxy, 0).await, 0.0);
}
