//! Upstream pools: how a route spreads its requests over several servers (round robin, least
//! requests, key hash), what a reload that removes a server moves, and which requests are never
//! sent twice.

use crate::support;

use std::path::Path;

use futures::StreamExt;
use http::Method;

use super::tls::serve_routes;
use support::eventually;
use support::http::Http;
use support::process::{CorralServe, metric_sum};
use support::upstream::Upstream;

/// Three origins answering 200 to everything.
async fn three_origins() -> [Upstream; 3] {
    let (a, b, c) = tokio::join!(Upstream::start(), Upstream::start(), Upstream::start());
    [a, b, c]
}

/// A route `pool` sending everything to `servers`, with `lines` under `upstream:` and `route`
/// lines beside it (no caching unless they say otherwise).
fn pool_route(servers: &[&Upstream], lines: &str, route: &str) -> String {
    let listed: Vec<String> = servers.iter().map(|s| s.url()).collect();
    format!(
        "  - name: pool\n    match: {{ path_prefix: /, methods: [GET, HEAD, POST] }}\n    upstream:\n      servers: [{}]\n{lines}{route}",
        listed.join(", ")
    )
}

async fn serve_pool(dir: &Path, servers: &[&Upstream], lines: &str, route: &str) -> CorralServe {
    let route = match route.is_empty() {
        true => "    cache: false\n",
        false => route,
    };
    serve_routes(dir, &pool_route(servers, lines, route), &[]).await
}

/// Sends `paths` through `proxy`, 16 at a time; every answer must be 200.
async fn get_all(proxy: &CorralServe, paths: impl IntoIterator<Item = String>) {
    let http = Http::new();
    let calls = paths
        .into_iter()
        .map(|path| http.get(format!("{}{path}", proxy.url())).send());
    let replies: Vec<_> = futures::stream::iter(calls)
        .buffer_unordered(16)
        .collect()
        .await;
    for reply in replies {
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_requests_evenly_over_every_server() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let origins = three_origins().await;
    let proxy = serve_pool(
        dir.path(),
        &origins.each_ref(),
        "      balance: round_robin\n",
        "",
    )
    .await;
    let http = Http::new();
    for i in 0..30 {
        let reply = http.get(format!("{}/rr/{i}", proxy.url())).send().await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let hits = origins.each_ref().map(|o| o.hits_under("/rr/"));
    assert_eq!(hits, [10, 10, 10], "{}", proxy.output());
    // Each server's requests are counted under its own label.
    let metrics = proxy.metrics().await;
    for origin in &origins {
        let server = format!("server=\"{}\"", origin.addr());
        let counted = metric_sum(
            &metrics,
            "corral_upstream_server_requests_total",
            &["route=\"pool\"", &server, "status_class=\"2xx\""],
        );
        assert_eq!(counted, 10.0, "{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_requests_prefers_the_servers_with_nothing_under_way() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let origins = three_origins().await;
    let proxy = serve_pool(
        dir.path(),
        &origins.each_ref(),
        "      balance: least_requests\n",
        "",
    )
    .await;
    // The first origin holds what it gets: requests are sent one at a time until one is stuck
    // there (ties are taken in turn, so one lands on it within three).
    let busy = origins[0].hold("/");
    let http = Http::new();
    let mut stuck = Vec::new();
    for i in 0..6 {
        let path = format!("/warm/{i}");
        let call = http.get(format!("{}{path}", proxy.url()));
        stuck.push(tokio::spawn(call.send()));
        let arrived = |o: &Upstream| o.hits(&path);
        eventually("the request reached an origin", || async {
            origins.iter().map(arrived).sum::<usize>() == 1
        })
        .await;
        if arrived(&origins[0]) == 1 {
            break;
        }
    }
    assert_eq!(
        origins[0].hits_under("/warm/"),
        1,
        "no request landed on the first origin"
    );
    // With one request under way there, the idle two take everything else.
    for i in 0..20 {
        let reply = http.get(format!("{}/idle/{i}", proxy.url())).send().await;
        assert_eq!(reply.status, 200);
    }
    assert_eq!(origins[0].hits_under("/idle/"), 0, "{}", proxy.output());
    let (one, two) = (
        origins[1].hits_under("/idle/"),
        origins[2].hits_under("/idle/"),
    );
    assert_eq!(one + two, 20);
    assert!(
        one >= 5 && two >= 5,
        "the idle servers shared unevenly: {one} and {two}"
    );
    busy.release();
    for task in stuck {
        let _ = task.await;
    }
}

/// Which origin each of `keys` went to, by index, from what each origin received.
fn owners(origins: &[Upstream], keys: &[String]) -> Vec<Vec<usize>> {
    keys.iter()
        .map(|key| {
            let mut seen = Vec::new();
            for (i, origin) in origins.iter().enumerate() {
                seen.extend(std::iter::repeat_n(i, origin.hits(key)));
            }
            seen
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_hash_sends_each_key_to_one_server_and_a_removed_server_moves_only_its_keys() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let origins = three_origins().await;
    // Answers may not be stored: every request is a fetch of its key.
    for origin in &origins {
        origin.set("/", |b| {
            b.headers
                .push((http::header::CACHE_CONTROL, "no-store".to_string()))
        });
    }
    let cached = "    ttl: 60s\n";
    let mut proxy = serve_pool(
        dir.path(),
        &origins.each_ref(),
        "      balance: key_hash\n",
        cached,
    )
    .await;
    let keys: Vec<String> = (0..1000).map(|i| format!("/k/{i}")).collect();
    // Twice each: a key's fetches all reach one server.
    get_all(&proxy, keys.iter().cloned()).await;
    get_all(&proxy, keys.iter().cloned()).await;
    let before = owners(&origins, &keys);
    for (key, seen) in keys.iter().zip(&before) {
        assert!(
            seen.len() == 2 && seen[0] == seen[1],
            "{key} went to {seen:?}"
        );
    }
    let share = |n: usize| before.iter().filter(|s| s[0] == n).count();
    for n in 0..3 {
        assert!(
            (250..=420).contains(&share(n)),
            "origin {n} has {} keys",
            share(n)
        );
    }

    // The third server leaves: a reload with the first two.
    let config = dir.path().join("corral.yaml");
    let text = std::fs::read_to_string(&config).expect("the config");
    let third = format!(", {}", origins[2].url());
    std::fs::write(&config, text.replace(&third, "")).expect("rewrite the config");
    assert!(proxy.signal(libc::SIGHUP), "SIGHUP");
    eventually("the reload is applied", || async {
        let metrics = proxy.metrics().await;
        metric_sum(
            &metrics,
            "corral_config_reloads_total",
            &["result=\"applied\""],
        ) >= 1.0
    })
    .await;
    get_all(&proxy, keys.iter().cloned()).await;
    let after = owners(&origins, &keys);
    let mut moved = 0;
    for ((key, old), all) in keys.iter().zip(&before).zip(&after) {
        assert_eq!(all.len(), 3, "{key} went to {all:?}");
        // The one origin that got one more request for it.
        let now = (0..3).find(|i| {
            let count = |seen: &Vec<usize>| seen.iter().filter(|s| *s == i).count();
            count(all) > count(old)
        });
        if now != Some(old[0]) {
            moved += 1;
            assert_eq!(old[0], 2, "{key} moved from a server that stayed");
        }
    }
    assert_eq!(moved, share(2), "every key of the removed server moved");
    assert!((250..=420).contains(&moved), "{moved} keys moved");
    // The removed server's series are gone.
    let metrics = proxy.metrics().await;
    let gone = format!("server=\"{}\"", origins[2].addr());
    assert!(!metrics.contains(&gone), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_never_retried_and_a_get_is_retried_on_another_server() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (a, b) = tokio::join!(Upstream::start(), Upstream::start());
    let (a, b) = (a.status("/", 503), b.status("/", 503));
    // Never ejected: both stay in rotation, so each retry has another server to go to.
    let lines = "      retries: { attempts: 2 }\n      outlier: { failures: 1000 }\n";
    let proxy = serve_pool(dir.path(), &[&a, &b], lines, "").await;
    let http = Http::new();
    for i in 0..4 {
        let url = format!("{}/post/{i}", proxy.url());
        let reply = http.call(Method::POST, url).body("a body").send().await;
        assert_eq!(reply.status, 503, "{}", reply.text());
    }
    assert_eq!(
        a.hits_under("/post/") + b.hits_under("/post/"),
        4,
        "a POST was sent twice"
    );

    for i in 0..4 {
        let reply = http.get(format!("{}/get/{i}", proxy.url())).send().await;
        assert_eq!(reply.status, 503);
        // The retry went to the other server.
        let path = format!("/get/{i}");
        assert_eq!((a.hits(&path), b.hits(&path)), (1, 1), "{path}");
    }
    let metrics = proxy.metrics().await;
    let retried = metric_sum(
        &metrics,
        "corral_upstream_retries_total",
        &["route=\"pool\"", "reason=\"status\""],
    );
    assert_eq!(retried, 4.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_name_stands_for_its_addresses_and_host_keeps_the_name() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let origin = Upstream::start().await;
    let port = origin.addr().port();
    let named = format!("http://localhost:{port}");
    let route = format!(
        "  - name: pool\n    match: {{ path_prefix: / }}\n    cache: false\n    upstream:\n      servers: [{named}]\n      resolve_every: 1s\n"
    );
    let proxy = serve_routes(dir.path(), &route, &[]).await;
    // Once resolved, the name's IPv4 address is a server of its own (an IPv6 one, where
    // localhost has it, is another, refused by this origin and retried).
    let address = format!("server=\"127.0.0.1:{port}\"");
    let http = Http::new();
    let mut i = 0;
    eventually("the name resolved to its address", || {
        i += 1;
        let call = http.get(format!("{}/named/{i}", proxy.url()));
        let proxy = &proxy;
        let address = address.clone();
        async move {
            assert_eq!(call.send().await.status, 200);
            let metrics = proxy.metrics().await;
            metric_sum(
                &metrics,
                "corral_upstream_server_requests_total",
                &[address.as_str(), "status_class=\"2xx\""],
            ) >= 1.0
        }
    })
    .await;
    let metrics = proxy.metrics().await;
    let unresolved = format!("server=\"localhost:{port}\"");
    assert!(!metrics.contains(&unresolved), "{metrics}");
    // Host (and SNI, on https) keep the name the file wrote.
    let last = origin.requests().pop().expect("a request");
    assert_eq!(
        last.header("host"),
        Some(format!("localhost:{port}").as_str())
    );
}
