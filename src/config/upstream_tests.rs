//! The upstream settings of a route: `tls:`, the timeouts, `upstream_headers:`, `host:` and
//! `forward_headers:`, each wrong value at its place, and no secret in any output.

use std::path::Path;
use std::time::Duration;

use super::*;

/// A route `a` to `upstream`, with `lines` inside it (from line 5 on).
fn route(upstream: &str, lines: &str) -> String {
    format!(
        "routes:\n  - name: a\n    match: {{path_prefix: /}}\n    upstream: {upstream}\n{lines}"
    )
}

fn parse_ok(text: &str) -> Config {
    parse_with_env(text, "corral.yaml", &|_| None).unwrap_or_else(|e| panic!("refused:\n{e}"))
}

fn problem(text: &str) -> String {
    match parse_with_env(text, "corral.yaml", &|_| None) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => {
            assert_eq!(e.problems.len(), 1, "{e}");
            e.problems[0].to_string()
        }
    }
}

/// A CA, and a leaf it signed for `localhost`, as PEM files in `dir`; and a second, unrelated key.
fn pki(dir: &Path) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let other = rcgen::KeyPair::generate().unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("leaf.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.join("leaf.key"), leaf_key.serialize_pem()).unwrap();
    std::fs::write(dir.join("other.key"), other.serialize_pem()).unwrap();
    std::fs::write(dir.join("junk.pem"), "not a certificate\n").unwrap();
}

#[test]
fn an_https_upstream_is_taken_with_the_default_roots() {
    let config = parse_ok(&route("https://api.example.com", ""));
    let settings = &config.routes[0].upstream_settings;
    assert!(settings.tls.is_default());
    assert_eq!(settings.connect_timeout, Some(Duration::from_secs(5)));
    // As long as max_fetch: max_fetch alone bounds the wait for the head.
    assert_eq!(settings.response_header_timeout, None);
    assert_eq!(settings.read_timeout, Duration::from_secs(30));
}

#[test]
fn tls_files_are_read_and_each_fault_is_placed() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let d = dir.path().display();
    let good = format!(
        "    tls:\n      ca_file: {d}/ca.pem\n      cert_file: {d}/leaf.pem\n      key_file: {d}/leaf.key\n      server_name: api.internal\n"
    );
    let config = parse_ok(&route("https://127.0.0.1:1", &good));
    let tls = &config.routes[0].upstream_settings.tls;
    assert_eq!(tls.server_name.as_deref(), Some("api.internal"));
    assert!(tls.cert_file.is_some());

    let missing = format!("    tls:\n      ca_file: {d}/nope.pem\n");
    let found = problem(&route("https://127.0.0.1:1", &missing));
    assert!(
        found.starts_with("corral.yaml:6:16: routes[0].tls.ca_file: cannot read"),
        "{found}"
    );

    let junk = format!("    tls:\n      ca_file: {d}/junk.pem\n");
    let found = problem(&route("https://127.0.0.1:1", &junk));
    assert!(
        found.starts_with("corral.yaml:6:16: routes[0].tls.ca_file: "),
        "{found}"
    );
    assert!(found.contains("no PEM certificate"), "{found}");

    let mismatched =
        format!("    tls:\n      cert_file: {d}/leaf.pem\n      key_file: {d}/other.key\n");
    let found = problem(&route("https://127.0.0.1:1", &mismatched));
    assert!(
        found.starts_with("corral.yaml:7:17: routes[0].tls.key_file: the key does not match"),
        "{found}"
    );

    let alone = format!("    tls:\n      cert_file: {d}/leaf.pem\n");
    let found = problem(&route("https://127.0.0.1:1", &alone));
    assert!(
        found.starts_with("corral.yaml:6:18: routes[0].tls.key_file: needs"),
        "{found}"
    );

    let bad_key = format!("    tls:\n      cert_file: {d}/leaf.pem\n      key: not a key at all\n");
    let found = problem(&route("https://127.0.0.1:1", &bad_key));
    assert!(found.contains("routes[0].tls"), "{found}");
    assert!(!found.contains("not a key at all"), "{found}");

    let on_http = format!("    tls:\n      ca_file: {d}/ca.pem\n");
    let found = problem(&route("http://127.0.0.1:1", &on_http));
    assert!(
        found.starts_with("corral.yaml:6:7: routes[0].tls: only for an https upstream"),
        "{found}"
    );

    let name = "    tls:\n      server_name: 'not a name!'\n";
    let found = problem(&route("https://127.0.0.1:1", name));
    assert!(
        found.starts_with("corral.yaml:6:20: routes[0].tls.server_name: invalid"),
        "{found}"
    );
}

#[test]
fn an_inline_key_never_prints() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let d = dir.path().display();
    let key = std::fs::read_to_string(dir.path().join("leaf.key")).unwrap();
    let text = format!("    tls:\n      cert_file: {d}/leaf.pem\n      key: ${{CLIENT_KEY}}\n");
    let text = route("https://127.0.0.1:1", &text);
    let env = |name: &str| (name == "CLIENT_KEY").then(|| key.clone());
    let config = parse_with_env(&text, "corral.yaml", &env).unwrap();
    let body: String = key.lines().nth(1).unwrap().to_string();
    for shown in [format!("{config:?}"), describe(&config)] {
        assert!(!shown.contains(&body), "{shown}");
    }
    assert!(describe(&config).contains("key ***"));
}

#[test]
fn timeouts_are_bounded_by_max_fetch() {
    let config = parse_ok(&route(
        "http://127.0.0.1:1",
        "    max_fetch: 10s\n    connect_timeout: 2s\n",
    ));
    let settings = &config.routes[0].upstream_settings;
    assert_eq!(settings.connect_timeout, Some(Duration::from_secs(2)));
    // Left out, a default longer than max_fetch follows it, and max_fetch's own timer bounds it.
    assert_eq!(
        config.routes[0].policy.response_header_timeout,
        Duration::from_secs(10)
    );
    assert_eq!(settings.response_header_timeout, None);
    assert_eq!(settings.read_timeout, Duration::from_secs(10));
    let config = parse_ok(&route(
        "http://127.0.0.1:1",
        "    response_header_timeout: 3s\n",
    ));
    let settings = &config.routes[0].upstream_settings;
    assert_eq!(
        settings.response_header_timeout,
        Some(Duration::from_secs(3))
    );

    let found = problem(&route(
        "http://127.0.0.1:1",
        "    max_fetch: 10s\n    read_timeout: 20s\n",
    ));
    assert_eq!(
        found,
        "corral.yaml:6:19: routes[0].read_timeout: 20s is above routes[0].max_fetch 10s"
    );
    let found = problem(&format!(
        "defaults:\n  response_header_timeout: 1m\n{}",
        route("http://127.0.0.1:1", "")
    ));
    assert!(found.starts_with("corral.yaml:2:28: defaults.response_header_timeout: 1m is above max_fetch (default) 30s"), "{found}");
    let found = problem(&route("http://127.0.0.1:1", "    connect_timeout: 0s\n"));
    assert!(
        found.starts_with("corral.yaml:5:22: routes[0].connect_timeout: must be above zero"),
        "{found}"
    );
}

#[test]
fn upstream_headers_are_checked_and_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "t0ps3cret\n").unwrap();
    let d = dir.path().display();
    let text = route(
        "http://127.0.0.1:1",
        &format!(
            "    upstream_headers:\n      set:\n        X-Api-Key: ${{API_KEY}}\n      add_file: {{X-Token: {d}/token}}\n      remove: [X-Debug]\n    host: api.example.com\n"
        ),
    );
    let env = |name: &str| (name == "API_KEY").then(|| "hunter2".to_string());
    let config = parse_with_env(&text, "corral.yaml", &env).unwrap();
    let settings = &config.routes[0].upstream_settings;
    assert_eq!(settings.headers.set[0].1, "hunter2");
    assert_eq!(settings.headers.add[0].1, "t0ps3cret");
    assert_eq!(settings.host.as_ref().unwrap(), "api.example.com");
    for shown in [format!("{config:?}"), describe(&config)] {
        assert!(
            !shown.contains("hunter2") && !shown.contains("t0ps3cret"),
            "{shown}"
        );
    }
    assert!(describe(&config).contains("x-api-key: ***"));

    let found = problem(&route(
        "http://127.0.0.1:1",
        "    upstream_headers:\n      set: {Host: x}\n",
    ));
    assert!(
        found.starts_with(
            "corral.yaml:6:13: routes[0].upstream_headers.set.Host: host is corral's to set"
        ),
        "{found}"
    );
    let found = problem(&route(
        "http://127.0.0.1:1",
        "    upstream_headers:\n      remove: [Transfer-Encoding]\n",
    ));
    assert!(
        found.starts_with("corral.yaml:6:16: routes[0].upstream_headers.remove[0]:"),
        "{found}"
    );
    let found = problem(&route(
        "http://127.0.0.1:1",
        "    upstream_headers:\n      set: {X-Key: \"a\\nb\"}\n",
    ));
    assert!(found.starts_with("corral.yaml:6:20: routes[0].upstream_headers.set.X-Key: invalid header value (not shown"), "{found}");
    let found = problem(&route("http://127.0.0.1:1", "    host: 'a b'\n"));
    assert!(
        found.starts_with("corral.yaml:5:11: routes[0].host: invalid host"),
        "{found}"
    );
}

#[test]
fn forward_headers_join_the_key_unless_unkeyed_which_warns() {
    let text = route(
        "http://127.0.0.1:1",
        "    key: {headers: [Accept]}\n    forward_headers: [User-Agent, {name: X-Device, unkeyed: true}]\n",
    );
    let config = parse_ok(&text);
    let route0 = &config.routes[0];
    let keyed: Vec<&str> = route0.key.headers.iter().map(|h| h.as_str()).collect();
    assert_eq!(keyed, ["accept", "user-agent"]);
    assert_eq!(route0.forward_unkeyed, ["x-device"]);
    assert_eq!(config.warnings.len(), 1);
    let warning = config.warnings[0].to_string();
    assert!(
        warning.starts_with(
            "corral.yaml:6:42: routes[0].forward_headers[1]: x-device is forwarded unkeyed"
        ),
        "{warning}"
    );
    assert!(describe(&config).starts_with("warning: corral.yaml:6:42:"));

    let found = problem(&route(
        "http://127.0.0.1:1",
        "    forward_headers: [{name: Cookie, unkeyed: true}]\n",
    ));
    assert!(
        found.starts_with("corral.yaml:5:30: routes[0].forward_headers[0]: cookie is private"),
        "{found}"
    );
    let found = problem(&route(
        "http://127.0.0.1:1",
        "    forward_headers: [Connection]\n",
    ));
    assert!(
        found.starts_with("corral.yaml:5:23: routes[0].forward_headers[0]:"),
        "{found}"
    );
    let found = problem(&route(
        "http://127.0.0.1:1",
        "    forward_headers: [{unkeyed: true}]\n",
    ));
    assert!(
        found.starts_with("corral.yaml:5:24: routes[0].forward_headers[0].name: needs name"),
        "{found}"
    );
}

#[test]
fn every_other_upstream_mistake_is_placed() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let d = dir.path().display();
    let https = "https://127.0.0.1:1";
    let cases = [
        (
            format!(
                "    tls:\n      cert_file: {d}/leaf.pem\n      key: x\n      key_file: {d}/leaf.key\n"
            ),
            "corral.yaml:8:17: routes[0].tls.key: set either key or key_file, not both",
        ),
        (
            format!("    tls:\n      key_file: {d}/leaf.key\n"),
            "corral.yaml:6:17: routes[0].tls.cert_file: needs tls.cert_file",
        ),
        (
            format!("    upstream_headers:\n      set_file: {{X-Key: {d}/missing}}\n"),
            "corral.yaml:6:25: routes[0].upstream_headers.set.X-Key: cannot read",
        ),
        (
            "    upstream_headers:\n      set: {X-Key: a}\n      set_file: {x-key: /dev/null}\n"
                .to_string(),
            "corral.yaml:7:18: routes[0].upstream_headers.set.x-key: x-key is listed twice",
        ),
        (
            "    forward_headers: [{name: X-A, unkeyed: maybe}]\n".to_string(),
            "corral.yaml:5:44: routes[0].forward_headers[0].unkeyed: expected true or false",
        ),
        (
            "    forward_headers: [X-A, x-a]\n".to_string(),
            "corral.yaml:5:28: routes[0].forward_headers[1]: x-a is listed twice",
        ),
        (
            "    forward_headers: [Host]\n".to_string(),
            "corral.yaml:5:23: routes[0].forward_headers[0]: host is corral's to set",
        ),
    ];
    for (lines, wanted) in cases {
        let found = problem(&route(https, &lines));
        assert!(found.starts_with(wanted), "{found}\nwanted: {wanted}");
    }
}

// ----- pools

/// A route `a` whose upstream is a pool: `servers` (one a line, from line 6 on) then `lines`
/// inside `upstream:`.
fn pool(servers: &[&str], lines: &str) -> String {
    let listed: String = servers.iter().map(|s| format!("        - {s}\n")).collect();
    format!(
        "routes:\n  - name: a\n    match: {{path_prefix: /}}\n    upstream:\n      servers:\n{listed}{lines}"
    )
}

#[test]
fn a_bare_url_is_a_pool_of_one_that_never_retries() {
    let config = parse_ok(&route("http://127.0.0.1:1/base", ""));
    let pool = &config.routes[0].upstream_settings.pool;
    assert_eq!(pool.servers, ["http://127.0.0.1:1/base"]);
    assert_eq!(pool.retries.attempts, 1);
    assert_eq!(pool.health, None);
}

#[test]
fn a_pool_takes_its_defaults_and_its_first_server_is_the_routes_url() {
    let config = parse_ok(&pool(
        &["https://a.example:8443/v1", "https://b.example/v1"],
        "",
    ));
    let route = &config.routes[0];
    assert_eq!(route.upstream, "https://a.example:8443/v1");
    let pool = &route.upstream_settings.pool;
    assert_eq!(pool.servers.len(), 2);
    assert_eq!(pool.balance, Balance::RoundRobin);
    assert_eq!(pool.health, None);
    assert_eq!(pool.outlier, OutlierSettings::default());
    assert_eq!(pool.retries, RetrySettings::pool());
    assert_eq!(pool.retries.attempts, 2);
    assert_eq!(pool.retries.statuses, [502, 503, 504]);
    assert_eq!(pool.resolve_every, Duration::from_secs(30));
}

#[test]
fn a_pool_says_how_it_balances_checks_ejects_and_retries() {
    let lines = "      balance: key_hash
      health: {path: /healthz, interval: 2s, timeout: 500ms, healthy: 1, unhealthy: 2, statuses: [200, 3xx, 418-420]}
      outlier: {failures: 3, ejection: 5s, max_ejection: 1m, max_ejected: 34%}
      retries: {attempts: 3, on: [503, 429], budget: 10%, budget_window: 30s, min_per_second: 0}
      resolve_every: 5s
";
    let config = parse_ok(&pool(&["http://10.0.0.1:80", "http://10.0.0.2:80"], lines));
    let pool = &config.routes[0].upstream_settings.pool;
    assert_eq!(pool.balance, Balance::KeyHash);
    let health = pool.health.as_ref().expect("health checks");
    assert_eq!(health.path, "/healthz");
    assert_eq!(health.interval, Duration::from_secs(2));
    assert_eq!(health.timeout, Duration::from_millis(500));
    assert_eq!((health.healthy, health.unhealthy), (1, 2));
    assert_eq!(health.statuses, [(200, 200), (300, 399), (418, 420)]);
    assert!(health.passes(302) && health.passes(419) && !health.passes(204));
    assert_eq!(
        pool.outlier,
        OutlierSettings {
            failures: 3,
            ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(60),
            max_ejected: 34,
        }
    );
    assert_eq!(
        pool.retries,
        RetrySettings {
            attempts: 3,
            statuses: vec![503, 429],
            budget: 10,
            budget_window: Duration::from_secs(30),
            min_per_second: 0,
        }
    );
    assert_eq!(pool.resolve_every, Duration::from_secs(5));
}

#[test]
fn every_pool_mistake_is_placed() {
    let two = ["http://10.0.0.1:80", "http://10.0.0.2:80"];
    let cases: [(String, &str); 12] = [
        (
            "routes:\n  - name: a\n    match: {path_prefix: /}\n    upstream: {servers: []}\n"
                .into(),
            "corral.yaml:4:25: routes[0].upstream.servers: needs at least one server",
        ),
        (
            "routes:\n  - name: a\n    match: {path_prefix: /}\n    upstream: {balance: key_hash}\n"
                .into(),
            "corral.yaml:4:16: routes[0].upstream.servers: needs at least one server",
        ),
        (
            pool(&["http://10.0.0.1:80", "https://10.0.0.2:443"], ""),
            "corral.yaml:7:11: routes[0].upstream.servers[1]: its scheme differs from the first server's http (every server of a pool shares one)",
        ),
        (
            pool(&["http://10.0.0.1:80/a", "http://10.0.0.2:80/b"], ""),
            "corral.yaml:7:11: routes[0].upstream.servers[1]: its path differs from the first server's /a (every server of a pool shares one)",
        ),
        (
            pool(&["http://10.0.0.1:80", "http://10.0.0.1:80"], ""),
            "corral.yaml:7:11: routes[0].upstream.servers[1]: http://10.0.0.1:80/ is listed twice",
        ),
        (
            pool(&["ftp://10.0.0.1"], ""),
            "corral.yaml:6:11: routes[0].upstream.servers[0]: invalid upstream \"ftp://10.0.0.1\": must be an absolute http or https url",
        ),
        (
            pool(&two, "      balance: random\n"),
            "corral.yaml:8:16: routes[0].upstream.balance: unknown value \"random\" (expected round_robin, least_requests or key_hash)",
        ),
        (
            pool(&two, "      health: {healthy: 0}\n"),
            "corral.yaml:8:25: routes[0].upstream.health.healthy: invalid count \"0\" (expected a whole number from 1 to 100)",
        ),
        (
            pool(&two, "      health: {interval: 1s, timeout: 2s}\n"),
            "corral.yaml:8:39: routes[0].upstream.health.timeout: 2s is longer than health.interval",
        ),
        (
            pool(&two, "      retries: {attempts: 6}\n"),
            "corral.yaml:8:27: routes[0].upstream.retries.attempts: invalid count \"6\" (expected a whole number from 1 to 5)",
        ),
        (
            pool(&two, "      retries: {on: [200]}\n"),
            "corral.yaml:8:22: routes[0].upstream.retries.on[0]: invalid status \"200\" (a 4xx or 5xx code)",
        ),
        (
            pool(&two, "      outlier: {ejection: 1m, max_ejection: 10s}\n"),
            "corral.yaml:8:45: routes[0].upstream.outlier.max_ejection: 10s is below outlier.ejection, 1m",
        ),
    ];
    let wrong: Vec<String> = cases
        .iter()
        .map(|(text, expected)| (problem(text), expected))
        .filter(|(found, expected)| found != *expected)
        .map(|(found, expected)| format!("found:    {found}\nexpected: {expected}"))
        .collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
