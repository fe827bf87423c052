//! What a shared fetch tells the upstream: nothing the key does not hold, and no client's request
//! id (an upstream that echoes it into a shared answer would show it to every client), yet the
//! access log ties every request a fetch answered, on every replica, to that fetch.

use crate::support;

use std::collections::HashSet;
use std::net::SocketAddr;

use support::process::{ConfigFrom, CorralServe};
use support::proxy::{ProxyCluster, fill};
use support::raw::{RawRequest, RawUpstream, Scripted};
use support::servers::free_port;
use support::upstream::Upstream;
use support::{TestRedis, eventually};

/// One route keyed on the path, its query and one header; nothing else is in its key.
const CONFIG: &str = r#"
listen: {{listen}}
admin: { listen: {{admin}} }
namespace: ids
{{backing}}
defaults: { ttl: 60s, wait_timeout: 5s, lease_ttl: 5s, poll_interval: 1s }
routes:
  - name: api
    match: { path_prefix: / }
    upstream: {{upstream}}
    key: { query: all, headers: [accept-language] }
"#;

async fn on_memory(replicas: usize, upstream: &str) -> ProxyCluster {
    let yaml = fill(
        CONFIG,
        &[
            ("listen", "127.0.0.1:0"),
            ("admin", "127.0.0.1:0"),
            ("backing", "store: { kind: memory }"),
            ("upstream", upstream),
        ],
    );
    ProxyCluster::on_memory(replicas, &yaml).await
}

/// Headers a browser, a CDN or an attacker may send, none of them in the route's key.
const UNKEYED: &[(&str, &str)] = &[
    ("x-request-id", "attacker-chosen-id"),
    ("x-forwarded-host", "evil.example"),
    ("x-forwarded-for", "10.9.8.7"),
    ("x-forwarded-proto", "gopher"),
    ("x-forwarded-prefix", "/evil"),
    ("x-forwarded-port", "666"),
    ("forwarded", "for=10.9.8.7;host=evil.example;proto=https"),
    ("x-original-url", "/admin"),
    ("x-rewrite-url", "/admin"),
    ("x-http-method-override", "DELETE"),
    ("x-host", "evil.example"),
    ("x-real-ip", "10.9.8.7"),
    ("true-client-ip", "10.9.8.7"),
    ("via", "1.1 evil"),
    ("user-agent", "Mozilla/5.0 (poisoner)"),
    ("referer", "https://evil.example/"),
    ("origin", "https://evil.example"),
    ("accept", "text/html,application/xhtml+xml"),
    ("accept-encoding", "gzip, deflate, br"),
    ("cache-control", "max-age=0"),
    ("pragma", "no-cache"),
    ("if-none-match", "\"v1\""),
    ("if-modified-since", "Mon, 01 Jan 2024 00:00:00 GMT"),
    ("dnt", "1"),
    ("upgrade-insecure-requests", "1"),
    ("sec-fetch-mode", "navigate"),
    ("sec-fetch-site", "cross-site"),
    ("sec-ch-ua", "\"Chromium\";v=\"120\""),
    ("x-foo", "bar"),
    ("x-custom-debug", "1"),
];

/// Headers corral itself sets on a shared fetch, the same for every client but the fetch id.
const GENERATED: &[&str] = &[
    "accept-encoding",
    "host",
    "via",
    "x-forwarded-proto",
    "x-request-id",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_header_a_shared_fetch_sends_is_keyed_or_corrals_own() {
    let upstream = Upstream::start().await;
    let proxy = on_memory(1, &upstream.url()).await;
    let mut call = proxy.get(0, "/page?q=1").header("accept-language", "fr");
    for (name, value) in UNKEYED {
        call = call.header(name, value);
    }
    let reply = call.send().await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.x_cache(), "MISS");
    assert_eq!(reply.header("x-request-id"), Some("attacker-chosen-id"));

    let sent = &upstream.requests_for("/page?q=1")[0];
    // corral's codings, not the client's.
    assert_eq!(
        sent.header("accept-encoding"),
        Some("gzip, br;q=0.9, zstd;q=0.8")
    );
    let keyed: HashSet<&str> = ["accept-language"].into();
    for name in sent.headers.keys() {
        assert!(
            keyed.contains(name.as_str()) || GENERATED.contains(&name.as_str()),
            "the upstream got {name}: {:?}, neither in the key nor corral's own",
            sent.headers.get(name)
        );
    }
    assert_eq!(sent.header("accept-language"), Some("fr"));
    assert_eq!(sent.header("via"), Some("1.1 corral"));
    assert_eq!(sent.header("x-forwarded-proto"), Some("http"));
    // The fetch's own id: 32 hex digits that no client chose.
    let id = sent.header("x-request-id").expect("the fetch's id");
    assert_eq!(id.len(), 32, "{id}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    // And nothing corral keeps for itself reaches a client.
    assert!(reply.header("corral-fetch-id").is_none());
}

/// An error page that says which request it answers: a 404 is stored by default.
fn echoing_404(request: &RawRequest) -> Scripted {
    let id = request
        .head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("x-request-id")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    let body = format!("{{\"error\":\"not found\",\"request_id\":\"{id}\"}}");
    Scripted {
        bytes: format!(
            "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
        close: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_echoing_the_request_id_shows_no_client_another_clients_id() {
    let upstream = RawUpstream::start(echoing_404).await;
    let proxy = on_memory(2, &upstream.url()).await;
    let first = proxy
        .get(0, "/missing")
        .header("x-request-id", "victim-secret-id")
        .send()
        .await;
    assert_eq!(first.status, 404);
    assert_eq!(first.x_cache(), "MISS");
    // The client gets its own id back in the header, never in the shared body.
    assert_eq!(first.header("x-request-id"), Some("victim-secret-id"));
    assert!(
        !first.text().contains("victim-secret-id"),
        "{}",
        first.text()
    );

    let second = proxy
        .get(1, "/missing")
        .header("x-request-id", "another-client")
        .send()
        .await;
    assert_eq!(second.status, 404);
    assert_eq!(second.x_cache(), "HIT", "the 404 is shared");
    assert!(
        !second.text().contains("victim-secret-id"),
        "the first client's id reached another client: {}",
        second.text()
    );
    assert_eq!(second.header("x-request-id"), Some("another-client"));
    assert_eq!(upstream.hits("/missing"), 1);
}

// ------------------------------------------------------------------ the access log ----

/// The access lines a `corral serve` process has printed so far, parsed from its JSON log.
fn access_lines(serve: &CorralServe) -> Vec<serde_json::Value> {
    serve
        .output()
        .lines()
        .filter(|line| line.starts_with('{'))
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        // The event's fields sit at the top level of each line.
        .filter(|line| line["target"] == "corral::access")
        .collect()
}

/// Two `corral serve` processes on one Redis, logging JSON.
async fn serve_two(dir: &std::path::Path, yaml: &str) -> Vec<CorralServe> {
    let mut replicas = Vec::new();
    for i in 0..2 {
        let public = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let text = fill(
            yaml,
            &[
                ("listen", &public.to_string()),
                ("admin", &admin.to_string()),
            ],
        );
        let path = dir.join(format!("replica-{i}.yaml"));
        std::fs::write(&path, text).expect("write the config");
        replicas.push(
            CorralServe::start_with_env(
                &path,
                public,
                admin,
                ConfigFrom::Flag,
                &[("CORRAL_LOG_FORMAT", "json"), ("RUST_LOG", "corral=info")],
            )
            .await,
        );
    }
    replicas
}

/// A fetch's id is in the access line of every request it answered: its leader, a follower on
/// another replica, and a later hit there. Each line also names the client, the bytes sent, the
/// leader's upstream time and the client's (cut, escaped) user agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_ties_every_answer_to_its_fetch_across_replicas() {
    let upstream = Upstream::start().await;
    let hold = upstream.hold("/report");
    let redis = TestRedis::start().await;
    let dir = tempfile::Builder::new()
        .prefix("corral-ids-")
        .tempdir()
        .expect("a temporary directory");
    let yaml = fill(
        CONFIG,
        &[
            (
                "backing",
                &format!("store: {{ kind: redis, url: \"{}\" }}", redis.url()),
            ),
            ("upstream", &upstream.url()),
        ],
    );
    let replicas = serve_two(dir.path(), &yaml).await;
    let http = support::http::Http::new();
    let url = |i: usize| format!("{}/report?d=1", replicas[i].url());

    let agent = format!("agent\t{}", "x".repeat(300));
    let leader = tokio::spawn(http.get(url(0)).header("user-agent", &agent).send());
    upstream.wait_for_hits("/report?d=1", 1).await;
    let follower = tokio::spawn(http.get(url(1)).send());
    // The follower waits on the leader's lease once replica 1 has a flight for the key.
    eventually("replica 1 waits on the fetch", || async {
        let text = replicas[1].metrics().await;
        support::process::metric_sum(&text, "corral_flights_inflight", &[]) >= 1.0
    })
    .await;
    hold.release();
    let leader = leader.await.expect("join");
    let follower = follower.await.expect("join");
    assert_eq!(
        (leader.x_cache(), follower.x_cache()),
        ("MISS", "COALESCED")
    );
    let hit = http.get(url(1)).send().await;
    assert_eq!(hit.x_cache(), "HIT");
    assert_eq!(upstream.hits("/report?d=1"), 1);
    let fetch_id = upstream.requests_for("/report?d=1")[0]
        .header("x-request-id")
        .expect("the fetch's id")
        .to_owned();

    eventually("an access line for each request", || async {
        !access_lines(&replicas[0]).is_empty() && access_lines(&replicas[1]).len() >= 2
    })
    .await;
    let lines: Vec<serde_json::Value> = [
        (&replicas[0], &leader),
        (&replicas[1], &follower),
        (&replicas[1], &hit),
    ]
    .into_iter()
    .map(|(replica, reply)| {
        let id = reply.header("x-request-id").expect("a request id");
        let mut of_request = access_lines(replica)
            .into_iter()
            .filter(|line| line["request_id"] == id);
        let line = of_request
            .next()
            .unwrap_or_else(|| panic!("no access line for {id}"));
        assert!(of_request.next().is_none(), "two access lines for {id}");
        line
    })
    .collect();
    for (line, reply) in lines.iter().zip([&leader, &follower, &hit]) {
        assert_eq!(line["fetch_id"], fetch_id.as_str(), "{line}");
        assert_ne!(line["request_id"], fetch_id.as_str(), "{line}");
        assert_eq!(line["client"], "127.0.0.1", "{line}");
        assert_eq!(line["bytes_sent"], reply.text().len() as u64, "{line}");
    }
    // Only the request that fetched spent time on the upstream.
    let upstream_ms = lines[0]["upstream_ms"]
        .as_f64()
        .expect("the leader's upstream time");
    assert!(upstream_ms > 0.0, "{}", lines[0]);
    assert!(lines[1].get("upstream_ms").is_none(), "{}", lines[1]);
    assert!(lines[2].get("upstream_ms").is_none(), "{}", lines[2]);
    // The user agent is cut to 128 bytes with its control characters escaped.
    let logged = lines[0]["user_agent"].as_str().expect("a user agent");
    assert!(logged.starts_with("agent\\x09xxx"), "{logged}");
    assert_eq!(logged.len(), "agent\\x09".len() + 128 - "agent\t".len());
    assert_eq!(lines[1]["user_agent"], "-", "no user agent was sent");
}
