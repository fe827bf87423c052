//! What a route adds to its upstream requests: `upstream_headers` set, add and remove, with a
//! secret value from `${VAR}` that never reaches a log or `corral check`; a fixed `Host`; and
//! `forward_headers`, which puts a client header in the key (two `User-Agent`s, two fetches)
//! unless it is marked unkeyed (one fetch, the first requester's value).

use crate::support;

use std::process::Stdio;

use super::tls::serve_routes;
use support::http::Http;
use support::process::corral_bin;
use support::upstream::Upstream;

const SECRET: &str = "k3y-4e1f9b-never-shown";

fn routes(upstream: &str) -> String {
    format!(
        r#"  - name: api
    match: {{ path_prefix: /api }}
    upstream: {upstream}
    cache: false
    host: api.internal:8443
    upstream_headers:
      set:
        X-Api-Key: ${{API_KEY}}
        Accept: application/json
      add: {{ X-Tenant: corral }}
      remove: [X-Debug]
  - name: keyed
    match: {{ path_prefix: /keyed }}
    upstream: {upstream}
    forward_headers: [User-Agent]
  - name: unkeyed
    match: {{ path_prefix: /unkeyed }}
    upstream: {upstream}
    forward_headers: [{{ name: User-Agent, unkeyed: true }}]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_headers_and_host_reach_the_origin_and_the_secret_stays_hidden() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let upstream = Upstream::start().await;
    let env = [("API_KEY", SECRET), ("RUST_LOG", "debug")];
    let proxy = serve_routes(dir.path(), &routes(&upstream.url()), &env).await;

    let reply = Http::new()
        .get(format!("{}/api/items", proxy.url()))
        .header("x-debug", "1")
        .header("accept", "text/html")
        .header("x-tenant", "client")
        .send()
        .await;
    assert_eq!(reply.status, 200, "{}", proxy.output());
    let seen = upstream.requests_for("/api/items");
    assert_eq!(seen.len(), 1);
    let seen = &seen[0];
    assert_eq!(seen.header("x-api-key"), Some(SECRET));
    assert_eq!(seen.header("accept"), Some("application/json"));
    let tenants: Vec<&str> = (seen.headers.get_all("x-tenant").iter())
        .filter_map(|v| v.to_str().ok())
        .collect();
    assert_eq!(tenants, ["client", "corral"]);
    assert_eq!(seen.header("x-debug"), None);
    assert_eq!(seen.header("host"), Some("api.internal:8443"));
    assert!(!proxy.output().contains(SECRET), "{}", proxy.output());

    let check = tokio::process::Command::new(corral_bin())
        .args(["check", "--config"])
        .arg(dir.path().join("corral.yaml"))
        .env("API_KEY", SECRET)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run corral check");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(check.status.success(), "{printed}");
    assert!(printed.contains("x-api-key: ***"), "{printed}");
    assert!(!printed.contains(SECRET), "{printed}");
    assert!(
        printed.contains("warning: "),
        "the unkeyed header is warned about:\n{printed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_header_splits_the_key_unless_unkeyed() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let upstream = Upstream::start().await;
    let proxy = serve_routes(dir.path(), &routes(&upstream.url()), &[("API_KEY", SECRET)]).await;
    let http = Http::new();
    for path in ["/keyed/a", "/unkeyed/a"] {
        for agent in ["agent-one", "agent-two"] {
            let reply = http
                .get(format!("{}{path}", proxy.url()))
                .header("user-agent", agent)
                .send()
                .await;
            assert_eq!(reply.status, 200, "{}", proxy.output());
        }
    }
    let keyed = upstream.requests_for("/keyed/a");
    let agents: Vec<_> = keyed.iter().map(|r| r.header("user-agent")).collect();
    assert_eq!(agents, [Some("agent-one"), Some("agent-two")]);
    let unkeyed = upstream.requests_for("/unkeyed/a");
    let agents: Vec<_> = unkeyed.iter().map(|r| r.header("user-agent")).collect();
    assert_eq!(
        agents,
        [Some("agent-one")],
        "one fetch, with the first requester's value"
    );
}
