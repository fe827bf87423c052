use std::collections::HashMap;
use std::time::Duration;

use http::Method;

use super::*;

/// The example from the file format's documentation, word for word.
const EXAMPLE: &str = r#"listen: 0.0.0.0:8080              # public listener
admin:
  listen: 127.0.0.1:8081          # /healthz /readyz /admin/* (and /metrics later)
  token: ${CORRAL_ADMIN_TOKEN}    # bearer token for /admin/*
namespace: corral                 # replicas with the same namespace and store coalesce together
store:
  kind: redis                     # memory (default) | redis | nats
  url: redis://127.0.0.1:6379
bus:
  kind: nats                      # memory | redis | nats; default: follows the store
  url: nats://127.0.0.1:4222
l1:
  max_bytes: 256MiB               # 0 turns the L1 off
defaults:                         # every route inherits these and may override any of them
  ttl: 60s
  expiry: absolute                # absolute | sliding
  honor_cache_control: true
  lease_ttl: 10s
  max_fetch: 30s                  # the upstream fetch is abandoned after this
  wait_timeout: 10s               # the longest any request waits (leader's client included)
  on_wait_timeout: error          # error (504) | bypass (fetch directly, do not store)
  poll_interval: 1s
  max_body: 8MiB                  # larger responses stream through and are not stored
  pass_ttl: 120s                  # hit-for-pass memory for uncacheable keys
  cache_statuses: [200, 203, 204, 300, 301, 404, 405, 410, 414, 501]
routes:                           # first match wins
  - name: reports
    match:
      path_prefix: /reports       # one of: path (exact) | path_prefix | path_regex
      methods: [GET, HEAD]
      host: api.example.com       # optional
    upstream: http://127.0.0.1:9000
    key:
      query: all                  # all (sorted) | none | {include: [a, b]} | {exclude: [utm_source]}
      headers: [accept]
      cookies: []
      body: false                 # true: the request body's digest is part of the key (POST routes)
    ttl: 300s
  - name: everything-else
    match: { path_prefix: / }
    upstream: http://127.0.0.1:9000
    cache: false                  # plain pass-through
"#;

const MINIMAL: &str =
    r#"routes: [{name: a, match: {path_prefix: /}, upstream: "http://127.0.0.1:1"}]"#;

fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let vars: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name| vars.get(name).cloned()
}

fn parse_ok(text: &str) -> Config {
    parse_with_env(text, "corral.yaml", &env_of(&[]))
        .unwrap_or_else(|e| panic!("config refused:\n{e}"))
}

/// Every problem with `text`, as `file:line:column: message`.
fn problems(text: &str) -> Vec<String> {
    match parse_with_env(text, "corral.yaml", &env_of(&[])) {
        Ok(_) => panic!("config accepted:\n{text}"),
        Err(e) => e.problems.iter().map(ToString::to_string).collect(),
    }
}

/// The one problem with `text`.
fn problem(text: &str) -> String {
    let all = problems(text);
    assert_eq!(all.len(), 1, "expected one problem, got {all:#?}");
    all.into_iter().next().unwrap_or_default()
}

/// A file with one valid route, the given top-level lines before it and route lines inside it.
/// The route's lines start on line `top.lines().count() + 5`.
fn with_route(top: &str, route: &str) -> String {
    format!(
        "{top}routes:\n  - name: a\n    match: {{path_prefix: /}}\n    upstream: http://127.0.0.1:1\n{route}"
    )
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

// ----- what a good file becomes

#[test]
fn the_documented_example_parses_to_what_it_says() {
    let env = env_of(&[("CORRAL_ADMIN_TOKEN", "s3cret")]);
    let config = parse_with_env(EXAMPLE, "corral.yaml", &env).unwrap();

    assert_eq!(config.source, None);
    assert_eq!(config.listen, "0.0.0.0:8080".parse().unwrap());
    assert_eq!(config.admin.listen, "127.0.0.1:8081".parse().unwrap());
    assert_eq!(config.admin.token.as_deref(), Some("s3cret"));
    assert_eq!(config.namespace, "corral");
    assert_eq!(
        config.store,
        StoreSettings::Redis {
            url: "redis://127.0.0.1:6379".into()
        }
    );
    assert_eq!(
        config.bus,
        BusSettings::Nats {
            url: "nats://127.0.0.1:4222".into()
        }
    );
    assert_eq!(config.l1_max_bytes, 256 << 20);
    assert_eq!(config.routes.len(), 2);

    let reports = &config.routes[0];
    assert_eq!(reports.name, "reports");
    assert!(matches!(&reports.matcher.path, PathMatch::Prefix(p) if p == "/reports"));
    assert_eq!(reports.matcher.methods, [Method::GET, Method::HEAD]);
    assert_eq!(reports.matcher.host.as_deref(), Some("api.example.com"));
    assert_eq!(reports.upstream, "http://127.0.0.1:9000/");
    assert!(reports.cache);
    assert_eq!(reports.key.query, QueryRule::All);
    assert_eq!(reports.key.headers, ["accept"]);
    assert!(reports.key.cookies.is_empty());
    assert!(!reports.key.body);
    // The route's own ttl wins; everything else comes from `defaults:`.
    assert_eq!(reports.policy.ttl, secs(300));
    assert_eq!(
        reports.policy,
        RoutePolicy {
            ttl: secs(300),
            ..RoutePolicy::default()
        }
    );

    let rest = &config.routes[1];
    assert_eq!(rest.name, "everything-else");
    assert!(matches!(&rest.matcher.path, PathMatch::Prefix(p) if p == "/"));
    assert_eq!(rest.matcher.host, None);
    assert!(!rest.cache);
    assert_eq!(rest.policy.ttl, secs(60));
}

#[test]
fn a_minimal_file_gets_every_default() {
    let config = parse_ok(MINIMAL);
    assert_eq!(config.listen, "0.0.0.0:8080".parse().unwrap());
    assert_eq!(config.admin.listen, "127.0.0.1:8081".parse().unwrap());
    assert_eq!(config.admin.token, None);
    assert_eq!(config.namespace, "corral");
    assert_eq!(config.store, StoreSettings::Memory);
    assert_eq!(config.bus, BusSettings::Memory);
    assert_eq!(config.l1_max_bytes, 256 << 20);

    let route = &config.routes[0];
    assert_eq!(route.upstream, "http://127.0.0.1:1/");
    assert_eq!(route.matcher.methods, [Method::GET, Method::HEAD]);
    assert_eq!(route.matcher.host, None);
    assert!(route.cache);
    assert_eq!(route.key, KeyRules::default());
    assert_eq!(route.key.query, QueryRule::All);
    let policy = &route.policy;
    assert_eq!(policy.ttl, secs(60));
    assert_eq!(policy.expiry, ExpiryMode::Absolute);
    assert!(policy.honor_cache_control);
    assert_eq!(policy.min_ttl, Duration::ZERO);
    assert_eq!(policy.max_ttl, secs(365 * 86_400));
    assert_eq!(policy.lease_ttl, secs(10));
    assert_eq!(policy.max_fetch, secs(30));
    assert_eq!(policy.wait_timeout, secs(10));
    assert_eq!(policy.on_wait_timeout, OnWaitTimeout::Error);
    assert_eq!(policy.poll_interval, secs(1));
    assert_eq!(policy.max_body, 8 << 20);
    assert_eq!(policy.pass_ttl, secs(120));
    assert_eq!(
        policy.cache_statuses,
        [200, 203, 204, 300, 301, 404, 405, 410, 414, 501]
    );
    assert!(policy.honor_client_no_store);
}

#[test]
fn routes_inherit_defaults_and_override_them_one_by_one() {
    let config = parse_ok(
        "defaults:\n  ttl: 5m\n  expiry: sliding\n  on_wait_timeout: bypass\n  max_body: 1MB\n\
         routes:\n\
         \x20 - {name: a, match: {path: /a}, upstream: 'http://u', expiry: absolute}\n\
         \x20 - {name: b, match: {path: /b}, upstream: 'http://u', min_ttl: 1s, max_ttl: 1h}\n",
    );
    let (a, b) = (&config.routes[0].policy, &config.routes[1].policy);
    assert_eq!(a.ttl, secs(300));
    assert_eq!(a.expiry, ExpiryMode::Absolute);
    assert_eq!(a.on_wait_timeout, OnWaitTimeout::Bypass);
    assert_eq!(a.max_body, 1_000_000);
    assert_eq!(b.expiry, ExpiryMode::Sliding { window: secs(300) });
    assert_eq!((b.min_ttl, b.max_ttl), (secs(1), secs(3600)));
    assert_eq!(b.lease_ttl, secs(10));
}

#[test]
fn key_rules_and_methods_are_normalised() {
    let config = parse_ok(&with_route(
        "",
        "    key:\n      query: {exclude: [utm_source, fbclid, utm_source]}\n      headers: [X-Tenant, Accept]\n      cookies: [sid, lang]\n      body: true\n",
    ));
    let key = &config.routes[0].key;
    assert_eq!(
        key.query,
        QueryRule::Exclude(vec!["fbclid".into(), "utm_source".into()])
    );
    assert_eq!(key.headers, ["accept", "x-tenant"]);
    assert_eq!(key.cookies, ["lang", "sid"]);
    assert!(key.body);

    let config = parse_ok(
        "routes: [{name: q, match: {path_regex: '^/q$', methods: [post, Get, POST], host: API.Example.com}, upstream: 'http://u/base', key: {query: {include: [b, a]}}}]",
    );
    let route = &config.routes[0];
    assert_eq!(route.matcher.methods, [Method::POST, Method::GET]);
    assert_eq!(route.matcher.host.as_deref(), Some("api.example.com"));
    assert!(matches!(&route.matcher.path, PathMatch::Regex(r) if r.is_match("/q")));
    assert_eq!(route.upstream, "http://u/base");
    assert_eq!(
        route.key.query,
        QueryRule::Include(vec!["a".into(), "b".into()])
    );

    let config = parse_ok(
        "routes: [{name: q, match: {path: /x, methods: []}, upstream: 'http://u', key: {query: none}}]",
    );
    assert!(
        config.routes[0].matcher.methods.is_empty(),
        "[] means every method"
    );
    assert_eq!(config.routes[0].key.query, QueryRule::None);
}

#[test]
fn empty_and_null_values_mean_the_default() {
    let config = parse_ok(&with_route(
        "listen:\nnamespace: ~\nadmin: {token: ''}\nstore: {kind: null}\n",
        "    ttl:\n",
    ));
    assert_eq!(config.listen, "0.0.0.0:8080".parse().unwrap());
    assert_eq!(config.namespace, "corral");
    assert_eq!(config.admin.token, None);
    assert_eq!(config.store, StoreSettings::Memory);
    assert_eq!(config.routes[0].policy.ttl, secs(60));
}

#[test]
fn the_bus_follows_the_store_unless_told() {
    let bus = |top: &str| parse_ok(&with_route(top, "")).bus;
    let redis = || "redis://r:6379".to_string();
    assert_eq!(
        bus("store: {kind: redis, url: 'redis://r:6379'}\n"),
        BusSettings::Redis { url: redis() }
    );
    assert_eq!(
        bus("store: {kind: nats, url: 'nats://n:4222'}\n"),
        BusSettings::Nats {
            url: "nats://n:4222".into()
        }
    );
    assert_eq!(
        bus("store: {kind: nats, url: 'nats://n:4222'}\nbus: {kind: nats}\n"),
        BusSettings::Nats {
            url: "nats://n:4222".into()
        }
    );
    assert_eq!(
        bus("store: {kind: redis, url: 'redis://r:6379'}\nbus: {kind: memory}\n"),
        BusSettings::Memory
    );
    assert_eq!(
        bus("store: {kind: redis, url: 'redis://r:6379'}\nbus: {url: 'redis://other:6379'}\n"),
        BusSettings::Redis {
            url: "redis://other:6379".into()
        }
    );
}

// ----- environment variables

#[test]
fn variables_expand_from_the_given_environment() {
    let env = env_of(&[
        ("CORRAL_T_NS", "team-a"),
        ("CORRAL_T_TTL", "90s"),
        ("CORRAL_T_UP", "http://up:9000: # not yaml"),
    ]);
    let text = with_route(
        "namespace: ${CORRAL_T_NS}\nadmin:\n  token: ${CORRAL_T_TOKEN:-dev-token}\n  listen: '127.0.0.1:${CORRAL_T_PORT:-9191}'\n",
        "    ttl: ${CORRAL_T_TTL}\n    max_body: ${CORRAL_T_MAX:-}\n",
    );
    let config = parse_with_env(&text, "corral.yaml", &env).unwrap();
    assert_eq!(config.namespace, "team-a");
    assert_eq!(config.admin.token.as_deref(), Some("dev-token"));
    assert_eq!(config.admin.listen, "127.0.0.1:9191".parse().unwrap());
    assert_eq!(config.routes[0].policy.ttl, secs(90));
    assert_eq!(
        config.routes[0].policy.max_body,
        8 << 20,
        "empty: the default"
    );

    // A value never becomes YAML: the variable's text stays one string, and errors keep their
    // place in the file.
    let text = with_route("", "    cache: ${CORRAL_T_UP}\n");
    let err = parse_with_env(&text, "corral.yaml", &env).unwrap_err();
    assert_eq!(
        err.to_string(),
        "corral.yaml:5:12: routes[0].cache: expected true or false, got \"http://up:9000: # not yaml\""
    );
}

#[test]
fn parse_reads_the_process_environment() {
    // No variable is set here (edition 2024 makes `set_var` unsafe): the default proves the
    // lookup ran, and PATH, which every process has, proves it finds variables.
    let config = parse(
        &with_route(
            "admin: {token: '${CORRAL_SURELY_UNSET_7F3A:-fallback}'}\n",
            "",
        ),
        "corral.yaml",
    )
    .unwrap();
    assert_eq!(config.admin.token.as_deref(), Some("fallback"));
    let config = parse(
        &with_route("admin: {token: '${PATH}'}\n", ""),
        "corral.yaml",
    )
    .unwrap();
    assert!(config.admin.token.is_some_and(|t| !t.is_empty()));
}

// ----- loading a file

#[test]
fn load_names_the_file_as_given_and_keeps_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corral.yaml");
    std::fs::write(&path, MINIMAL).unwrap();
    let config = load(&path).unwrap();
    assert_eq!(config.source.as_deref(), Some(path.as_path()));

    std::fs::write(&path, "listen: nope\nroutes: []\n").unwrap();
    let err = load(&path).unwrap_err();
    let shown = path.display().to_string();
    assert_eq!(
        err.to_string(),
        format!(
            "{shown}:1:9: listen: invalid address \"nope\" (expected ip:port, e.g. 0.0.0.0:8080)\n\
             {shown}:2:9: routes: at least one route is required"
        )
    );
}

#[test]
fn an_unreadable_file_is_one_problem_without_a_place() {
    let err = load(Path::new("no/such/corral.yaml")).unwrap_err();
    assert_eq!(err.problems.len(), 1);
    let p = &err.problems[0];
    assert_eq!(
        (p.file.as_str(), p.line, p.column),
        ("no/such/corral.yaml", 0, 0)
    );
    assert!(
        p.to_string()
            .starts_with("no/such/corral.yaml: cannot read the config file: "),
        "{p}"
    );
}

// ----- one test per way a file can be wrong

#[test]
fn yaml_syntax() {
    assert_eq!(
        problem("routes: [\n"),
        "corral.yaml:2:1: invalid yaml: while parsing a node, did not find expected node content"
    );
    assert_eq!(
        problem("- a\n"),
        "corral.yaml:1:1: the file must be a mapping of settings"
    );
    assert_eq!(
        problem("listen: &x 1\n"),
        "corral.yaml:1:12: yaml anchors and aliases are not supported"
    );
    assert_eq!(
        problem("namespace: a\nnamespace: b\n"),
        "corral.yaml:2:1: duplicate key \"namespace\" (first on line 1)"
    );
}

#[test]
fn unknown_fields_are_all_reported_at_their_keys() {
    let text = "lisen: 1\n\
                store: {knd: redis}\n\
                routes:\n\
                \x20 - name: a\n\
                \x20   upstream: http://u\n\
                \x20   ttll: 5s\n\
                \x20   match: {path_prefx: /x}\n\
                \x20   key: {query: {inclde: [a]}}\n";
    assert_eq!(
        problems(text),
        [
            "corral.yaml:1:1: lisen: unknown field (expected one of: listen, admin, namespace, store, bus, l1, defaults, routes, limits, require_auth, tracing)",
            "corral.yaml:2:9: store.knd: unknown field (expected one of: kind, url, timeout, connect_timeout, breaker, username, password, password_file, token, token_file, nkey_seed, nkey_seed_file, creds_file, sentinel_username, sentinel_password, sentinel_password_file, tls, require_auth)",
            "corral.yaml:6:5: routes[0].ttll: unknown field (expected one of: name, match, upstream, upstream_http2, cache, key, tls, upstream_headers, host, forward_headers, ttl, expiry, honor_cache_control, min_ttl, max_ttl, lease_ttl, max_fetch, wait_timeout, on_wait_timeout, poll_interval, max_body, pass_ttl, cache_statuses, honor_client_no_store, ttl_jitter, error_ttl, vary, max_variants, encoding, stale_while_revalidate, stale_if_error, early_refresh, max_followers, max_upstream_fetches, connect_timeout, response_header_timeout, read_timeout, on_store_error, semantics, heuristic, heuristic_max, cookies)",
            "corral.yaml:7:13: routes[0].match.path_prefx: unknown field (expected one of: path, path_prefix, path_regex, methods, host)",
            "corral.yaml:8:19: routes[0].key.query.inclde: unknown field (expected one of: include, exclude)",
        ]
    );
}

#[test]
fn a_value_of_the_wrong_shape() {
    assert_eq!(
        problem("routes: foo\n"),
        "corral.yaml:1:9: routes: invalid type: string \"foo\", expected a sequence"
    );
    assert_eq!(
        problem(&with_route("", "    ttl: [5s]\n")),
        "corral.yaml:5:10: routes[0].ttl: invalid type: sequence, expected a string"
    );
}

#[test]
fn bad_duration() {
    assert_eq!(
        problem(&with_route("", "    ttl: 5 parsecs\n")),
        "corral.yaml:5:10: routes[0].ttl: invalid duration \"5 parsecs\": unknown time unit \
         \"parsecs\", supported units: ns, us/µs, ms, sec, min, hours, days, weeks, months, years \
         (and few variations)"
    );
    assert_eq!(
        problem(
            "defaults:\n  pass_ttl: 60\nroutes: [{name: a, match: {path: /}, upstream: 'http://u'}]"
        ),
        "corral.yaml:2:13: defaults.pass_ttl: invalid duration \"60\": time unit needed, for example 60sec or 60ms"
    );
}

#[test]
fn bad_size() {
    assert_eq!(
        problem(&with_route("l1: {max_bytes: 1.5GiB}\n", "")),
        "corral.yaml:1:17: l1.max_bytes: invalid size \"1.5GiB\": unknown unit \".5gib\", expected B, KiB, MiB, GiB, TiB, KB, MB, GB or TB"
    );
    assert_eq!(
        problem(&with_route("", "    max_body: lots\n")),
        "corral.yaml:5:15: routes[0].max_body: invalid size \"lots\": expected a whole number with an optional unit (KiB, MiB, GiB, KB, MB, GB)"
    );
}

#[test]
fn bad_regex() {
    assert_eq!(
        problem("routes:\n  - name: a\n    match: {path_regex: '^/(a'}\n    upstream: http://u\n"),
        "corral.yaml:3:25: routes[0].match.path_regex: invalid regex: unclosed group"
    );
}

#[test]
fn duplicate_route_name() {
    assert_eq!(
        problem(&with_route(
            "",
            "  - {name: a, match: {path: /b}, upstream: 'http://u'}\n"
        )),
        "corral.yaml:5:12: routes[1].name: duplicate route name \"a\" (first on line 2)"
    );
}

#[test]
fn bad_route_name() {
    assert_eq!(
        problem("routes: [{name: 'a b', match: {path: /}, upstream: 'http://u'}]"),
        "corral.yaml:1:17: routes[0].name: invalid route name \"a b\" (1 to 64 of A-Z, a-z, 0-9, ., _ and -)"
    );
    assert_eq!(
        problem("routes: [{match: {path: /}, upstream: 'http://u'}]"),
        "corral.yaml:1:11: routes[0].name: missing (a route name)"
    );
}

#[test]
fn missing_upstream() {
    assert_eq!(
        problem("routes:\n  - name: a\n    match: {path: /}\n"),
        "corral.yaml:2:5: routes[0].upstream: missing (an absolute http or https url)"
    );
}

#[test]
fn upstream_that_is_not_an_absolute_http_url() {
    let upstream = |u: &str| {
        problem(&format!(
            "routes: [{{name: a, match: {{path: /}}, upstream: '{u}'}}]"
        ))
    };
    assert_eq!(
        upstream("127.0.0.1:9000"),
        "corral.yaml:1:48: routes[0].upstream: invalid upstream \"127.0.0.1:9000\": must be an absolute http or https url"
    );
    assert_eq!(
        upstream("ftp://files"),
        "corral.yaml:1:48: routes[0].upstream: invalid upstream \"ftp://files\": must be an absolute http or https url"
    );
    assert_eq!(
        upstream("/relative"),
        "corral.yaml:1:48: routes[0].upstream: invalid upstream \"/relative\": must be an absolute http or https url"
    );
    assert_eq!(
        upstream("http://u/?a=1"),
        "corral.yaml:1:48: routes[0].upstream: invalid upstream \"http://u/?a=1\": must not carry a query"
    );
    assert_eq!(
        upstream("http://exa mple"),
        "corral.yaml:1:48: routes[0].upstream: invalid upstream \"http://exa mple\": not a url"
    );
}

#[test]
fn bad_listen_address() {
    assert_eq!(
        problem(&with_route("listen: localhost:8080\n", "")),
        "corral.yaml:1:9: listen: invalid address \"localhost:8080\" (expected ip:port, e.g. 0.0.0.0:8080)"
    );
    assert_eq!(
        problem(&with_route("admin:\n  listen: 9090\n", "")),
        "corral.yaml:2:11: admin.listen: invalid address \"9090\" (expected ip:port, e.g. 0.0.0.0:8080)"
    );
}

#[test]
fn unknown_words() {
    assert_eq!(
        problem(&with_route("store: {kind: postgres}\n", "")),
        "corral.yaml:1:15: store.kind: unknown value \"postgres\" (expected memory, redis or nats)"
    );
    assert_eq!(
        problem(&with_route("bus: {kind: kafka}\n", "")),
        "corral.yaml:1:13: bus.kind: unknown value \"kafka\" (expected memory, redis or nats)"
    );
    assert_eq!(
        problem(&with_route("", "    expiry: eventually\n")),
        "corral.yaml:5:13: routes[0].expiry: unknown value \"eventually\" (expected absolute or sliding)"
    );
    assert_eq!(
        problem(&with_route("defaults: {on_wait_timeout: retry}\n", "")),
        "corral.yaml:1:29: defaults.on_wait_timeout: unknown value \"retry\" (expected error or bypass)"
    );
    assert_eq!(
        problem(&with_route("", "    key: {query: some}\n")),
        "corral.yaml:5:18: routes[0].key.query: unknown value \"some\" (expected all, none, {include: [...]} or {exclude: [...]})"
    );
}

#[test]
fn bad_boolean() {
    assert_eq!(
        problem(&with_route("", "    cache: yes\n")),
        "corral.yaml:5:12: routes[0].cache: expected true or false, got \"yes\""
    );
}

#[test]
fn unknown_http_method() {
    assert_eq!(
        problem(
            "routes: [{name: a, match: {path: /, methods: [GET, FETCH]}, upstream: 'http://u'}]"
        ),
        "corral.yaml:1:52: routes[0].match.methods[1]: unknown http method \"FETCH\" (expected GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE or CONNECT)"
    );
}

#[test]
fn zero_or_several_paths() {
    assert_eq!(
        problem("routes:\n  - name: a\n    match: {methods: [GET]}\n    upstream: http://u\n"),
        "corral.yaml:3:13: routes[0].match: needs one of path, path_prefix or path_regex"
    );
    assert_eq!(
        problem("routes:\n  - name: a\n    upstream: http://u\n"),
        "corral.yaml:2:5: routes[0].match: needs one of path, path_prefix or path_regex"
    );
    assert_eq!(
        problem(
            "routes:\n  - name: a\n    match:\n      path_prefix: /a\n      path: /b\n    upstream: http://u\n"
        ),
        "corral.yaml:5:13: routes[0].match: takes one of path, path_prefix or path_regex, not both path_prefix and path"
    );
}

#[test]
fn paths_must_be_absolute() {
    assert_eq!(
        problem("routes: [{name: a, match: {path_prefix: api}, upstream: 'http://u'}]"),
        "corral.yaml:1:41: routes[0].match.path_prefix: \"api\" does not start with /"
    );
}

#[test]
fn bad_host() {
    assert_eq!(
        problem(
            "routes: [{name: a, match: {path: /, host: 'api.example.com:443'}, upstream: 'http://u'}]"
        ),
        "corral.yaml:1:43: routes[0].match.host: invalid host \"api.example.com:443\" (a host name, without scheme, port or path)"
    );
}

#[test]
fn bad_key_names() {
    assert_eq!(
        problems(&with_route(
            "",
            "    key:\n      headers: [accept, 'x tenant']\n      cookies: ['a;b']\n      query: {include: ['a=b']}\n"
        )),
        [
            "corral.yaml:6:25: routes[0].key.headers[1]: invalid header name \"x tenant\"",
            "corral.yaml:7:17: routes[0].key.cookies[0]: invalid cookie name \"a;b\"",
            "corral.yaml:8:25: routes[0].key.query.include[0]: invalid query parameter name \"a=b\"",
        ]
    );
}

#[test]
fn a_store_or_bus_that_needs_a_url() {
    assert_eq!(
        problem(&with_route("store:\n  kind: redis\n", "")),
        "corral.yaml:2:3: store.url: missing (a redis url, e.g. redis://127.0.0.1:6379)"
    );
    assert_eq!(
        problem(&with_route(
            "store: {kind: redis, url: 'redis://r'}\nbus: {kind: nats}\n",
            ""
        )),
        "corral.yaml:2:7: bus.url: missing (a nats url, e.g. nats://127.0.0.1:4222)"
    );
    assert_eq!(
        problem(&with_route("store: {kind: redis, url: 'nats://r'}\n", "")),
        "corral.yaml:1:27: store.url: invalid url \"nats://r\" for the redis store (expected redis://, rediss://, redis+unix://, unix://, redis+sentinel:// or redis+cluster://)"
    );
    assert_eq!(
        problem(&with_route("store: {url: 'redis://r'}\n", "")),
        "corral.yaml:1:14: store.url: the memory store takes no url"
    );
}

#[test]
fn bad_namespace() {
    assert_eq!(
        problem(&with_route("namespace: 'team a'\n", "")),
        "corral.yaml:1:12: namespace: invalid namespace \"team a\" (1 to 64 of A-Z, a-z, 0-9, _ and -)"
    );
    let long = "n".repeat(65);
    assert_eq!(
        problem(&with_route(&format!("namespace: {long}\n"), "")),
        format!(
            "corral.yaml:1:12: namespace: invalid namespace \"{long}\" (1 to 64 of A-Z, a-z, 0-9, _ and -)"
        )
    );
}

#[test]
fn lease_below_a_second_on_nats() {
    let nats = "store: {kind: nats, url: 'nats://n:4222'}\n";
    assert_eq!(
        problem(&with_route(
            &format!("{nats}defaults:\n  lease_ttl: 500ms\n"),
            ""
        )),
        "corral.yaml:3:14: defaults.lease_ttl: 500ms is below 1s, the unit of the nats key-value store's ttl (store.kind nats)"
    );
    assert_eq!(
        problem(&with_route(nats, "    lease_ttl: 999ms\n")),
        "corral.yaml:6:16: routes[0].lease_ttl: 999ms is below 1s, the unit of the nats key-value store's ttl (store.kind nats)"
    );
    // Elsewhere a short lease is only unusual.
    parse_ok(&with_route("", "    lease_ttl: 500ms\n"));
}

#[test]
fn a_bus_that_contradicts_a_nats_store() {
    let nats = "store: {kind: nats, url: 'nats://n:4222'}\n";
    assert_eq!(
        problem(&with_route(
            &format!("{nats}bus: {{kind: redis, url: 'redis://r'}}\n"),
            ""
        )),
        "corral.yaml:2:13: bus.kind: a redis bus contradicts store.kind nats, whose key-value store brings its own events (remove bus)"
    );
    assert_eq!(
        problem(&with_route(
            &format!("{nats}bus: {{kind: nats, url: 'nats://other:4222'}}\n"),
            ""
        )),
        "corral.yaml:2:24: bus.url: a bus on nats://other:4222 contradicts the nats store on nats://n:4222, whose key-value store brings its own events (remove bus)"
    );
}

#[test]
fn min_ttl_above_max_ttl() {
    assert_eq!(
        problem(&with_route(
            "defaults: {min_ttl: 10m}\n",
            "    max_ttl: 1m\n"
        )),
        "corral.yaml:6:14: routes[0].max_ttl: 1m is below defaults.min_ttl 10m"
    );
    assert_eq!(
        problem(&with_route("", "    min_ttl: 400d\n")),
        "corral.yaml:5:14: routes[0].min_ttl: 400d is above max_ttl (default) 365d"
    );
}

#[test]
fn zero_where_a_wait_needs_time() {
    for field in ["poll_interval", "lease_ttl", "wait_timeout", "max_fetch"] {
        let column = field.len() + 7;
        assert_eq!(
            problem(&with_route("", &format!("    {field}: 0s\n"))),
            format!("corral.yaml:5:{column}: routes[0].{field}: must be above zero")
        );
    }
}

#[test]
fn cache_statuses_outside_what_may_be_stored() {
    assert_eq!(
        problems(&with_route(
            "defaults:\n  cache_statuses: [200, 99, 600, ok]\n",
            ""
        )),
        [
            "corral.yaml:2:25: defaults.cache_statuses[1]: 99 is not a status code (100 to 599)",
            "corral.yaml:2:29: defaults.cache_statuses[2]: 600 is not a status code (100 to 599)",
            "corral.yaml:2:34: defaults.cache_statuses[3]: invalid status \"ok\"",
        ]
    );
    // A 5xx may be listed: it is stored only when the upstream gives it explicit freshness.
    let config = parse_ok(&with_route(
        "",
        "    cache_statuses: [404, 200, 503, 501, 200]\n",
    ));
    assert_eq!(config.routes[0].policy.cache_statuses, [200, 404, 501, 503]);
}

#[test]
fn unset_variable_without_default() {
    assert_eq!(
        problem(&with_route("admin:\n  token: ${CORRAL_ADMIN_TOKEN}\n", "")),
        "corral.yaml:2:10: admin.token: environment variable CORRAL_ADMIN_TOKEN is not set (write ${CORRAL_ADMIN_TOKEN:-default} to give a default)"
    );
    assert_eq!(
        problem(&with_route("", "    ttl: '${CORRAL_TTL'\n")),
        "corral.yaml:5:10: routes[0].ttl: unterminated ${ (no closing })"
    );
}

#[test]
fn no_routes() {
    assert_eq!(
        problem(""),
        "corral.yaml:1:1: routes: at least one route is required"
    );
    assert_eq!(
        problem("listen: 0.0.0.0:1\nroutes: []\n"),
        "corral.yaml:2:9: routes: at least one route is required"
    );
}

#[test]
fn every_problem_is_reported_in_file_order() {
    let text = "listen: nope\n\
                defaults:\n  ttl: soon\n\
                routes:\n\
                \x20 - name: a\n    match: {path: /, methods: [GETT]}\n\
                \x20 - name: a\n    match: {path_regex: '('}\n    upstream: ftp://u\n";
    assert_eq!(
        problems(text),
        [
            "corral.yaml:1:9: listen: invalid address \"nope\" (expected ip:port, e.g. 0.0.0.0:8080)",
            "corral.yaml:3:8: defaults.ttl: invalid duration \"soon\": expected number at 0",
            "corral.yaml:5:5: routes[0].upstream: missing (an absolute http or https url)",
            "corral.yaml:6:32: routes[0].match.methods[0]: unknown http method \"GETT\" (expected GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE or CONNECT)",
            "corral.yaml:7:11: routes[1].name: duplicate route name \"a\" (first on line 5)",
            "corral.yaml:8:25: routes[1].match.path_regex: invalid regex: unclosed group",
            "corral.yaml:9:15: routes[1].upstream: invalid upstream \"ftp://u\": must be an absolute http or https url",
        ]
    );
}

// ----- describe

#[test]
fn describe_shows_every_effective_value() {
    let env = env_of(&[("CORRAL_ADMIN_TOKEN", "s3cret")]);
    let text = EXAMPLE.replace(
        "redis://127.0.0.1:6379",
        "redis://default:hunter2@127.0.0.1:6379",
    );
    let config = parse_with_env(&text, "corral.yaml", &env).unwrap();
    let expected = "\
listen                  0.0.0.0:8080
admin.listen            127.0.0.1:8081
admin.token             set
namespace               corral
store                   redis redis://default:***@127.0.0.1:6379
bus                     nats nats://127.0.0.1:4222
l1.max_bytes            256MiB

route reports
  match                 path_prefix /reports
  methods               [GET, HEAD]
  host                  api.example.com
  upstream              http://127.0.0.1:9000/
  cache                 true
  key.query             all
  key.headers           [accept]
  key.cookies           []
  key.body              false
  ttl                   5m
  expiry                absolute
  honor_cache_control   true
  min_ttl               0s
  max_ttl               365d
  lease_ttl             10s
  max_fetch             30s
  wait_timeout          10s
  on_wait_timeout       error
  poll_interval         1s
  max_body              8MiB
  pass_ttl              2m
  cache_statuses        [200, 203, 204, 300, 301, 404, 405, 410, 414, 501]
  honor_client_no_store true

route everything-else
  match                 path_prefix /
  methods               [GET, HEAD]
  host                  any
  upstream              http://127.0.0.1:9000/
  cache                 false (pass-through)
";
    assert_eq!(describe(&config), expected);
}

#[test]
fn upstream_http2_is_off_unless_asked_for() {
    let off = parse_ok(&with_route("", ""));
    assert!(!off.routes[0].upstream_http2);
    let on = parse_ok(&with_route("", "    upstream_http2: true\n"));
    assert!(on.routes[0].upstream_http2);
}

// ----- redis topologies

#[test]
fn sentinel_and_cluster_urls_are_store_and_bus_urls() {
    let sentinel = "redis+sentinel://app:pw@s1:26379,s2:26380/main/1?sentinel_password=watch";
    let config = parse_ok(&with_route(
        &format!("store: {{kind: redis, url: '{sentinel}'}}\n"),
        "",
    ));
    assert_eq!(
        config.store,
        StoreSettings::Redis {
            url: sentinel.into()
        }
    );
    assert_eq!(
        config.bus,
        BusSettings::Redis {
            url: sentinel.into()
        }
    );
    let described = describe(&config);
    assert!(
        described.contains(
            "redis redis+sentinel://app:***@s1:26379,s2:26380/main/1?sentinel_password=***"
        ),
        "{described}"
    );

    let cluster = "redis+cluster://10.0.0.1:7000,10.0.0.2:7000";
    let config = parse_ok(&with_route(
        &format!(
            "store: {{kind: redis, url: '{sentinel}'}}\nbus: {{kind: redis, url: '{cluster}'}}\n"
        ),
        "",
    ));
    assert_eq!(
        config.bus,
        BusSettings::Redis {
            url: cluster.into()
        }
    );
}

#[test]
fn bad_sentinel_and_cluster_urls_are_refused_at_their_place() {
    assert_eq!(
        problem(&with_route(
            "store:\n  kind: redis\n  url: redis+sentinel://s1:26379,s2:26379\n",
            ""
        )),
        "corral.yaml:3:8: store.url: invalid redis url \"redis+sentinel://s1:26379,s2:26379\": no master name (expected redis+sentinel://host:26379,.../<master name>)"
    );
    assert_eq!(
        problem(&with_route(
            "store: {kind: redis, url: 'redis://r:6379'}\nbus:\n  kind: redis\n  url: redis+cluster://a:7000,b:x\n",
            ""
        )),
        "corral.yaml:4:8: bus.url: invalid redis url \"redis+cluster://a:7000,b:x\": invalid port in \"b:x\""
    );
    assert_eq!(
        problem(&with_route(
            "store: {kind: redis, url: 'redis+sentinel://u:secret@s/m?sentinel_pass=x'}\n",
            ""
        )),
        "corral.yaml:1:27: store.url: invalid redis url \"redis+sentinel://u:***@s/m?sentinel_pass=x\": unknown query parameter \"sentinel_pass\" (expected sentinel_username or sentinel_password)"
    );
}

#[test]
fn tls_forms_of_sentinel_and_cluster_are_refused_with_the_reason() {
    let config = parse_ok(&with_route(
        "store: {kind: redis, url: 'rediss://r:6380'}\n",
        "",
    ));
    assert_eq!(
        config.store,
        StoreSettings::Redis {
            url: "rediss://r:6380".into()
        }
    );
    for (url, plain) in [
        ("rediss+sentinel://s1/main", "redis+sentinel"),
        ("rediss+cluster://a:7000", "redis+cluster"),
    ] {
        let problem = problem(&with_route(
            &format!("store: {{kind: redis, url: '{url}'}}\n"),
            "",
        ));
        assert!(
            problem.starts_with("corral.yaml:1:27: store.url: invalid redis url"),
            "{problem}"
        );
        assert!(
            problem.contains("for one server (rediss://) only")
                && problem.contains(&format!("use {plain}://")),
            "{problem}"
        );
    }
}

// ----- ttl jitter, negative caching, vary

#[test]
fn ttl_jitter_is_a_percentage_from_0_to_100() {
    let config = parse_ok(&with_route(
        "defaults:\n  ttl_jitter: 10%\n",
        "    ttl_jitter: 25\n",
    ));
    assert_eq!(config.routes[0].policy.ttl_jitter, 25);
    let config = parse_ok(&with_route("defaults:\n  ttl_jitter: 10%\n", ""));
    assert_eq!(config.routes[0].policy.ttl_jitter, 10);
    assert_eq!(parse_ok(&with_route("", "")).routes[0].policy.ttl_jitter, 0);
    for (bad, column) in [("101%", 17), ("-5%", 17), ("ten", 17), ("2.5%", 17)] {
        assert_eq!(
            problem(&with_route("", &format!("    ttl_jitter: {bad}\n"))),
            format!(
                "corral.yaml:5:{column}: routes[0].ttl_jitter: invalid percentage {bad:?} \
                 (expected 0% to 100%, e.g. 10%)"
            )
        );
    }
}

#[test]
fn error_ttl_maps_any_status_to_a_ttl() {
    let config = parse_ok(&with_route("", "    error_ttl: {404: 30s, 503: 2s}\n"));
    let error_ttl: Vec<_> = config.routes[0]
        .policy
        .error_ttl
        .clone()
        .into_iter()
        .collect();
    assert_eq!(error_ttl, [(404, secs(30)), (503, secs(2))]);
    assert!(
        parse_ok(&with_route("", "")).routes[0]
            .policy
            .error_ttl
            .is_empty()
    );
    assert_eq!(
        problems(&with_route(
            "",
            "    error_ttl: {404: soon, 99: 2s, 500: 0s}\n"
        )),
        [
            "corral.yaml:5:22: routes[0].error_ttl.404: invalid duration \"soon\": expected number at 0",
            "corral.yaml:5:28: routes[0].error_ttl.99: 99 is not a status code (100 to 599)",
            "corral.yaml:5:41: routes[0].error_ttl.500: must be above zero",
        ]
    );
}

#[test]
fn vary_is_key_or_honor() {
    use super::VaryMode;
    assert_eq!(
        parse_ok(&with_route("", "")).routes[0].policy.vary,
        VaryMode::Key
    );
    let config = parse_ok(&with_route("defaults:\n  vary: honor\n", ""));
    assert_eq!(config.routes[0].policy.vary, VaryMode::Honor);
    assert_eq!(
        problem(&with_route("", "    vary: always\n")),
        "corral.yaml:5:11: routes[0].vary: unknown value \"always\" (expected key or honor)"
    );
}

#[test]
fn cookies_are_bypass_strip_or_named_patterns() {
    use super::CookieMode;
    assert_eq!(
        parse_ok(&with_route("", "")).routes[0].policy.cookies,
        CookieMode::Bypass
    );
    let strip = parse_ok(&with_route("defaults:\n  cookies: strip\n", ""));
    assert_eq!(strip.routes[0].policy.cookies, CookieMode::Strip);
    let named = parse_ok(&with_route("", "    cookies: {strip: [_gid, \"_ga*\"]}\n"));
    assert_eq!(
        named.routes[0].policy.cookies,
        CookieMode::StripNamed(vec!["_ga*".into(), "_gid".into()])
    );
    let shown = describe(&named);
    assert!(shown.contains("{strip: [_ga*, _gid]}"), "{shown}");
    assert_eq!(
        problem(&with_route("", "    cookies: eat\n")),
        "corral.yaml:5:14: routes[0].cookies: unknown value \"eat\" (expected bypass, strip or \
         {strip: [names]})"
    );
    assert_eq!(
        problem(&with_route("", "    cookies: {strip: [ok, \"a;b\"]}\n")),
        "corral.yaml:5:27: routes[0].cookies.strip[1]: invalid cookie name \"a;b\""
    );
    assert!(
        problem(&with_route("", "    cookies: {keep: [a]}\n")).contains("unknown field"),
        "only strip"
    );
}

#[test]
fn semantics_and_heuristic() {
    use super::Semantics;
    let plain = parse_ok(&with_route("", ""));
    assert_eq!(plain.routes[0].policy.semantics, Semantics::Coalescing);
    assert_eq!(plain.routes[0].policy.heuristic, 0);
    let standard = parse_ok(&with_route(
        "",
        "    semantics: rfc9111\n    heuristic: 10%\n    heuristic_max: 2h\n",
    ));
    let policy = &standard.routes[0].policy;
    assert_eq!(policy.semantics, Semantics::Rfc9111);
    assert_eq!(policy.heuristic, 10);
    assert_eq!(policy.heuristic_max, secs(7200));
    let shown = describe(&standard);
    for expected in ["rfc9111", "10%", "2h"] {
        assert!(shown.contains(expected), "{expected} in {shown}");
    }
    let off = parse_ok(&with_route("", "    heuristic: off\n"));
    assert_eq!(off.routes[0].policy.heuristic, 0);
    assert_eq!(
        problem(&with_route("", "    semantics: strict\n")),
        "corral.yaml:5:16: routes[0].semantics: unknown value \"strict\" (expected coalescing or \
         rfc9111)"
    );
    assert_eq!(
        problem(&with_route("", "    heuristic: 120%\n")),
        "corral.yaml:5:16: routes[0].heuristic: invalid percentage \"120%\" (expected 0% to \
         100%, e.g. 10%)"
    );
    assert_eq!(
        problem(&with_route(
            "",
            "    semantics: rfc9111\n    honor_cache_control: false\n"
        )),
        "corral.yaml:6:26: routes[0].honor_cache_control: semantics: rfc9111 takes freshness \
         from the upstream's Cache-Control, which this turns off"
    );
}

#[test]
fn check_shows_jitter_error_ttl_and_vary_only_when_set() {
    let set = parse_ok(&with_route(
        "",
        "    ttl_jitter: 10%\n    error_ttl: {503: 2s, 404: 30s}\n    vary: honor\n",
    ));
    let shown = describe(&set);
    assert!(shown.contains("  ttl_jitter            10%\n"), "{shown}");
    assert!(
        shown.contains("  error_ttl             {404: 30s, 503: 2s}\n"),
        "{shown}"
    );
    assert!(shown.contains("  vary                  honor\n"), "{shown}");
    let unset = describe(&parse_ok(&with_route("", "")));
    for label in ["ttl_jitter", "error_ttl", "vary"] {
        assert!(!unset.contains(label), "{unset}");
    }
}

#[test]
fn check_shows_stale_windows_and_early_refresh_only_when_set() {
    let set = parse_ok(&with_route(
        "",
        "    stale_while_revalidate: 30s\n    stale_if_error: 10m\n    early_refresh: 2.5\n",
    ));
    let shown = describe(&set);
    assert!(shown.contains("  stale_while_revalidate 30s\n"), "{shown}");
    assert!(shown.contains("  stale_if_error        10m\n"), "{shown}");
    assert!(shown.contains("  early_refresh         2.5\n"), "{shown}");
    let on = describe(&parse_ok(&with_route("", "    early_refresh: true\n")));
    assert!(on.contains("  early_refresh         1\n"), "{on}");
    let unset = describe(&parse_ok(&with_route("", "")));
    for label in ["stale_while_revalidate", "stale_if_error", "early_refresh"] {
        assert!(!unset.contains(label), "{unset}");
    }
}

// ----- freshness under the lease

#[test]
fn stale_windows_and_early_refresh_inherit_and_override() {
    let config = parse_ok(
        "defaults:\n  stale_while_revalidate: 30s\n  stale_if_error: 10m\n  early_refresh: true\n\
         routes:\n\
         \x20 - {name: a, match: {path: /a}, upstream: 'http://u'}\n\
         \x20 - {name: b, match: {path: /b}, upstream: 'http://u', stale_if_error: 0s, early_refresh: 2.5}\n\
         \x20 - {name: c, match: {path: /c}, upstream: 'http://u', early_refresh: false}\n",
    );
    let [a, b, c] = [0, 1, 2].map(|i| config.routes[i].policy.clone());
    assert_eq!(a.stale_while_revalidate, secs(30));
    assert_eq!(a.stale_if_error, secs(600));
    assert_eq!(a.early_refresh, Some(Beta(1.0)));
    assert_eq!(b.stale_if_error, Duration::ZERO);
    assert_eq!(b.early_refresh, Some(Beta(2.5)));
    assert_eq!(c.early_refresh, None);
    let plain = parse_ok(&with_route("", ""));
    assert_eq!(
        plain.routes[0].policy.stale_while_revalidate,
        Duration::ZERO
    );
    assert_eq!(plain.routes[0].policy.early_refresh, None);
}

#[test]
fn a_bad_early_refresh_is_named_at_its_place() {
    for bad in ["0", "-1", "soon", "inf"] {
        assert_eq!(
            problem(&with_route("", &format!("    early_refresh: {bad}\n"))),
            format!(
                "corral.yaml:5:20: routes[0].early_refresh: invalid early_refresh {bad:?} \
                 (expected true, false, or a beta above 0, e.g. 1.0)"
            )
        );
    }
}

#[test]
fn stale_windows_on_a_sliding_route_are_refused() {
    assert_eq!(
        problem(&with_route(
            "",
            "    expiry: sliding\n    stale_while_revalidate: 5s\n"
        )),
        "corral.yaml:6:29: routes[0].stale_while_revalidate: needs expiry: absolute \
         (a sliding entry is never stale, so it has no stale window)"
    );
    let absolute = parse_ok(&with_route("", "    stale_if_error: 1h\n"));
    assert_eq!(absolute.routes[0].policy.stale_if_error, secs(3600));
}

// ----- limits

#[test]
fn limits_take_production_defaults_and_each_can_be_set() {
    assert_eq!(parse_ok(MINIMAL).limits, Limits::default());
    let config = parse_ok(&with_route(
        "limits:\n  max_connections: 50\n  header_read_timeout: 2s\n  idle_timeout: 30s\n  \
         max_header_count: 20\n  max_header_bytes: 4KiB\n  max_uri_length: 2KiB\n  \
         max_request_body: 1MiB\n  shutdown_grace: 3s\n",
        "    max_followers: 7\n    max_upstream_fetches: 3\n",
    ));
    assert_eq!(
        config.limits,
        Limits {
            max_connections: 50,
            header_read_timeout: secs(2),
            idle_timeout: secs(30),
            max_header_count: 20,
            max_header_bytes: 4096,
            max_uri_length: 2048,
            max_request_body: 1 << 20,
            shutdown_grace: secs(3),
            ..Limits::default()
        }
    );
    assert_eq!(config.routes[0].policy.max_followers, 7);
    assert_eq!(config.routes[0].policy.max_upstream_fetches, 3);
}

#[test]
fn route_limits_inherit_from_defaults() {
    let config = parse_ok(&with_route(
        "defaults: {max_followers: 9, max_upstream_fetches: 4}\n",
        "",
    ));
    assert_eq!(config.routes[0].policy.max_followers, 9);
    assert_eq!(config.routes[0].policy.max_upstream_fetches, 4);
}

#[test]
fn bad_limits_are_reported_at_their_values() {
    let text = with_route(
        "limits:\n  max_connections: 0\n  header_read_timeout: soon\n  max_header_count: 20000\n  \
         max_uri_length: 2GiB\n  max_request_body: 0\n",
        "    max_followers: many\n",
    );
    assert_eq!(
        problems(&text),
        [
            "corral.yaml:2:20: limits.max_connections: must be above zero",
            "corral.yaml:3:24: limits.header_read_timeout: invalid duration \"soon\": expected number at 0",
            "corral.yaml:4:21: limits.max_header_count: 20000 is above the most this limit may be, 10000",
            "corral.yaml:5:19: limits.max_uri_length: 2GiB is above the most this limit may be, 1MiB",
            "corral.yaml:6:21: limits.max_request_body: must be above zero",
            "corral.yaml:11:20: routes[0].max_followers: invalid count \"many\" (expected a whole number above zero)",
        ]
    );
}

#[test]
fn the_send_limits_and_the_per_client_cap_are_read_and_checked() {
    let config = parse_ok(&with_route(
        "limits:\n  send_timeout: 5s\n  min_send_rate: 4KiB\n  max_connections_per_client: 8\n",
        "",
    ));
    assert_eq!(config.limits.send_timeout, secs(5));
    assert_eq!(config.limits.min_send_rate, 4096);
    assert_eq!(config.limits.max_connections_per_client, 8);
    // `corral check` shows each, as it shows every limit that differs from its default.
    let shown = describe(&config);
    for (name, value) in [
        ("limits.send_timeout", "5s"),
        ("limits.min_send_rate", "4KiB"),
        ("limits.max_connections_per_client", "8"),
    ] {
        let line = shown.lines().find(|line| line.starts_with(name));
        assert_eq!(
            line.map(|line| line[name.len()..].trim()),
            Some(value),
            "{shown}"
        );
    }
    let text = with_route(
        "limits:\n  send_timeout: 0s\n  min_send_rate: fast\n  max_connections_per_client: -1\n",
        "",
    );
    let found = problems(&text);
    assert_eq!(found.len(), 3, "{found:#?}");
    assert!(found[0].starts_with("corral.yaml:2:17: limits.send_timeout: must be above zero"));
    assert!(found[1].starts_with("corral.yaml:3:18: limits.min_send_rate: invalid size"));
    assert!(
        found[2].starts_with("corral.yaml:4:31: limits.max_connections_per_client: invalid count")
    );
}

// ----- store limits and degrade modes

#[test]
fn store_limits_default_to_tens_of_milliseconds_and_a_breaker() {
    let config = parse_ok(MINIMAL);
    assert_eq!(config.store_limits, StoreLimits::default());
    assert_eq!(config.store_limits.timeout, Duration::from_millis(50));
    assert_eq!(
        config.store_limits.connect_timeout,
        Duration::from_millis(500)
    );
    assert_eq!(config.store_limits.breaker.failures, 5);
    assert_eq!(
        config.store_limits.breaker.open_for,
        Duration::from_millis(500)
    );
    assert_eq!(config.routes[0].policy.on_store_error, OnStoreError::Open);
}

#[test]
fn store_limits_and_on_store_error_are_read_from_the_file() {
    let config = parse_ok(
        r#"store: { kind: redis, url: "redis://127.0.0.1:6379", timeout: 20ms, connect_timeout: 2s, breaker: { failures: 3, open_for: 250ms } }
defaults: { on_store_error: closed }
routes:
  - { name: a, match: { path_prefix: /a }, upstream: "http://127.0.0.1:1" }
  - { name: b, match: { path_prefix: / }, upstream: "http://127.0.0.1:1", on_store_error: open }
"#,
    );
    let limits = config.store_limits;
    assert_eq!(limits.timeout, Duration::from_millis(20));
    assert_eq!(limits.connect_timeout, secs(2));
    assert_eq!(limits.breaker.failures, 3);
    assert_eq!(limits.breaker.open_for, Duration::from_millis(250));
    use crate::engine::OnStoreError;
    assert_eq!(config.routes[0].policy.on_store_error, OnStoreError::Closed);
    assert_eq!(config.routes[1].policy.on_store_error, OnStoreError::Open);
}

#[test]
fn bad_store_limits_are_refused_at_their_place() {
    let top = "store:\n  kind: redis\n  url: redis://127.0.0.1:6379\n  timeout: 0s\n  \
               connect_timeout: 5m\n  breaker: { failures: 0, open_for: soon }\n";
    let all = problems(&with_route(top, ""));
    assert_eq!(
        all,
        vec![
            "corral.yaml:4:12: store.timeout: must be above zero",
            "corral.yaml:5:20: store.connect_timeout: 5m is above 1m, the most it may be",
            "corral.yaml:6:24: store.breaker.failures: invalid count \"0\" (expected a whole number from 1 to 1000)",
            "corral.yaml:6:37: store.breaker.open_for: invalid duration \"soon\": expected number at 0",
        ],
    );
}

#[test]
fn a_store_timeout_above_its_bound_is_refused() {
    let text = with_route(
        "store: { kind: redis, url: \"redis://127.0.0.1:6379\", timeout: 30s }\n",
        "",
    );
    assert_eq!(
        problem(&text),
        "corral.yaml:1:63: store.timeout: 30s is above 10s, the most it may be"
    );
}

// ----- credentials, tls and require_auth

/// A secret file in a fresh directory, kept alive by the returned guard.
fn secret_file(content: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secret");
    std::fs::write(&path, content).unwrap();
    let path = path.display().to_string();
    (dir, path)
}

#[test]
fn redis_credentials_come_from_fields_env_or_files() {
    let (_dir, file) = secret_file("from-file\n");
    let text = with_route(
        &format!(
            "store:\n  kind: redis\n  url: redis://r:6379\n  username: app\n  password_file: {file}\n"
        ),
        "",
    );
    let config = parse_ok(&text);
    assert_eq!(config.store_credentials.username.as_deref(), Some("app"));
    let password = config.store_credentials.password.as_ref().unwrap();
    assert_eq!(password.expose(), "from-file");
    // The bus shares the store's url, and so its credentials.
    assert_eq!(config.bus_credentials, config.store_credentials);

    let env = env_of(&[("REDIS_PASSWORD", "from-env")]);
    let text = with_route(
        "store: {kind: redis, url: 'redis://r', password: '${REDIS_PASSWORD}'}\n",
        "",
    );
    let config = parse_with_env(&text, "corral.yaml", &env).unwrap();
    let password = config.store_credentials.password.as_ref().unwrap();
    assert_eq!(password.expose(), "from-env");
}

#[test]
fn nats_takes_one_way_of_proving_who_it_is() {
    let seed = nkeys::KeyPair::new_user().seed().unwrap();
    let text = with_route(
        &format!("store: {{kind: nats, url: 'tls://n:4222', nkey_seed: '{seed}', tls: {{}}}}\n"),
        "",
    );
    let config = parse_ok(&text);
    assert!(config.store_credentials.nkey_seed.is_some());
    assert_eq!(config.store_credentials.tls, Some(Default::default()));
    assert_eq!(
        problem(&with_route(
            "store: {kind: nats, url: 'nats://n', token: t, username: u, password: p}\n",
            ""
        )),
        "corral.yaml:1:71: store.password: a nats connection proves its identity one way; \
         password is set too"
    );
    assert_eq!(
        problem(&with_route(
            "store: {kind: nats, url: 'nats://n', nkey_seed: SUNOTASEED}\n",
            ""
        )),
        "corral.yaml:1:49: store.nkey_seed: not a valid nkey seed (expected a user seed, SU...)"
    );
}

#[test]
fn check_shows_the_limits_that_differ_from_the_defaults() {
    let unset = describe(&parse_ok(&with_route("", "")));
    assert!(!unset.contains("limits."), "{unset}");
    assert!(!unset.contains("max_followers"), "{unset}");
    let set = describe(&parse_ok(&with_route(
        "limits: {max_connections: 5, max_uri_length: 2KiB, shutdown_grace: 3s}\n",
        "    max_followers: 7\n    max_upstream_fetches: 2\n",
    )));
    for shown in [
        "limits.max_connections  5\n",
        "limits.max_uri_length   2KiB\n",
        "limits.shutdown_grace   3s\n",
        "  max_upstream_fetches  2\n",
        "  max_followers         7\n",
    ] {
        assert!(set.contains(shown), "{shown:?} not in:\n{set}");
    }
}

#[test]
fn credential_mistakes_are_named_at_their_place_without_the_secret() {
    let (_dir, creds) = secret_file("not a creds file\n");
    let cases = [
        (
            "store: {kind: redis, url: 'redis://r', token: hunter2}\n".to_string(),
            "corral.yaml:1:47: store.token: not a redis setting (redis takes username, \
             password, sentinel_username, sentinel_password and tls)",
        ),
        (
            "store: {kind: redis, url: 'redis://:hunter2@r', password: hunter2}\n".into(),
            "corral.yaml:1:59: store.password: the url already carries a user or password; \
             keep one of the two",
        ),
        (
            "store: {kind: redis, url: 'redis://r', password: hunter2, password_file: /x}\n".into(),
            "corral.yaml:1:74: store.password: set either password or password_file, not both",
        ),
        (
            "store: {kind: redis, url: 'redis://r', password_file: /nonexistent/pw}\n".into(),
            "corral.yaml:1:55: store.password_file: cannot read \"/nonexistent/pw\": No such \
             file or directory (os error 2)",
        ),
        (
            "store: {kind: redis, url: 'redis://r', username: app}\n".into(),
            "corral.yaml:1:50: store.password: needs password",
        ),
        (
            "store: {kind: redis, url: 'redis://r', sentinel_password: hunter2}\n".into(),
            "corral.yaml:1:59: store.sentinel_password: only for a redis+sentinel:// url",
        ),
        (
            "store: {kind: redis, url: 'redis://r', tls: {}}\n".into(),
            "corral.yaml:1:45: store.tls: needs a rediss:// url (TLS is built for one redis \
             server; redis:// would send everything in clear)",
        ),
        (
            "store: {kind: memory, password: hunter2}\n".into(),
            "corral.yaml:1:33: store.password: the memory store takes no credentials",
        ),
        (
            format!("store: {{kind: nats, url: 'nats://n', creds_file: '{creds}'}}\n"),
            "corral.yaml:1:50: store.creds_file: not a nats creds file (no -----BEGIN NATS USER \
             JWT----- block)",
        ),
        (
            "store: {kind: redis, url: 'redis://:a@r'}\nbus: {password: hunter2}\n".into(),
            "corral.yaml:2:17: bus.password: the bus shares the store's url and so its \
             credentials; set bus.url to give the bus its own",
        ),
        (
            "store: {kind: nats, url: 'nats://n', tls: {ca_file: /nonexistent/ca.pem}}\n".into(),
            "corral.yaml:1:53: store.tls.ca_file: cannot read \"/nonexistent/ca.pem\": No such \
             file or directory (os error 2)",
        ),
        (
            "store: {kind: nats, url: 'nat://u:hunter2@n'}\n".into(),
            "corral.yaml:1:26: store.url: invalid url \"nat://u:***@n\" for the nats store \
             (expected nats:// or tls://)",
        ),
    ];
    for (top, expected) in cases {
        let found = problem(&with_route(&top, ""));
        assert_eq!(found, expected);
        assert!(!found.contains("hunter2"), "{found}");
    }
}

#[test]
fn store_limits_under_the_bus_are_refused() {
    let text = with_route(
        "store: { kind: redis, url: \"redis://127.0.0.1:6379\" }\nbus: { kind: redis, timeout: 1s }\n",
        "",
    );
    assert_eq!(
        problem(&text),
        "corral.yaml:2:30: bus.timeout: only the store takes timeout (move it under store:)"
    );
}

#[test]
fn on_store_error_takes_open_or_closed() {
    let text = with_route("defaults: { on_store_error: maybe }\n", "");
    assert_eq!(
        problem(&text),
        "corral.yaml:1:29: defaults.on_store_error: unknown value \"maybe\" (expected open or closed)"
    );
}

#[test]
fn require_auth_refuses_a_backend_that_proves_no_identity() {
    assert_eq!(
        problem(&with_route(
            "require_auth: true\nstore: {kind: redis, url: 'redis://r:6379'}\n",
            ""
        )),
        "corral.yaml:2:27: store: require_auth is set but the redis store proves no identity \
         (give a password or token in its url or as store.password / store.token, an \
         nkey_seed, a creds_file or tls.cert_file)"
    );
    // The bus is checked on its own when it has its own url.
    assert_eq!(
        problem(&with_route(
            "store: {kind: redis, url: 'redis://:pw@r'}\n\
             bus: {kind: nats, url: 'nats://n', require_auth: true}\n",
            ""
        )),
        "corral.yaml:2:24: bus: require_auth is set but the nats bus proves no identity (give a \
         password or token in its url or as bus.password / bus.token, an nkey_seed, a \
         creds_file or tls.cert_file)"
    );
    // A CA alone proves the server's identity, not corral's.
    let (_dir, ca) = secret_file("-----BEGIN CERTIFICATE-----\n");
    assert!(
        problem(&with_route(
            &format!(
                "require_auth: true\nstore: {{kind: nats, url: 'tls://n', tls: {{ca_file: {ca}}}}}\n"
            ),
            ""
        ))
        .contains("store: require_auth is set")
    );

    let with_secrets = [
        "require_auth: true\nstore: {kind: redis, url: 'redis://:pw@r'}\n",
        "require_auth: true\nstore: {kind: redis, url: 'redis://r', username: a, password: p}\n",
        "store: {kind: nats, url: 'nats://t0ken@n', require_auth: true}\n",
        "require_auth: true\nstore: {kind: nats, url: 'nats://n', token: t}\n",
        // In-process memory has no connection to protect.
        "require_auth: true\n",
    ];
    for top in with_secrets {
        let config = parse_ok(&with_route(top, ""));
        assert!(config.require_auth, "{top}");
    }
    assert!(!parse_ok(MINIMAL).require_auth);
}

#[test]
fn debug_output_never_carries_a_secret() {
    let text = with_route(
        "store: {kind: redis, url: 'redis://app:hunter2@r', sentinel_password: x}\n\
         bus: {kind: nats, url: 'nats://hunter3@n'}\n",
        "",
    );
    let text = text.replace(", sentinel_password: x", "");
    let config = parse_ok(&text);
    let printed = format!("{config:?}");
    assert!(!printed.contains("hunter"), "{printed}");
    assert!(printed.contains("redis://app:***@r"), "{printed}");
    let store = crate::store::redis::RedisStoreConfig::new("redis://:hunter2@r", "ns");
    let bus = crate::bus::nats::NatsBusConfig::new("nats://u:hunter2@n", "ns");
    let printed = format!("{store:?} {bus:?}");
    assert!(!printed.contains("hunter"), "{printed}");
}

#[test]
fn check_shows_which_credentials_are_used_but_no_secret() {
    let text = with_route(
        "require_auth: true\nstore: {kind: redis, url: 'rediss://app:hunter2@r:6380', \
         tls: {}}\nbus: {kind: nats, url: 'nats://n', username: u, password: hunter3}\n",
        "",
    );
    let shown = describe(&parse_ok(&text));
    assert!(!shown.contains("hunter"), "{shown}");
    assert!(shown.contains("rediss://app:***@r:6380"), "{shown}");
    assert!(
        shown.contains("store.credentials       tls (system roots)"),
        "{shown}"
    );
    assert!(
        shown.contains("bus.credentials         username u, password set"),
        "{shown}"
    );
    assert!(shown.contains("require_auth"), "{shown}");
}

#[test]
fn check_shows_every_caching_setting_a_route_sets() {
    let config = parse_ok(&with_route(
        "",
        "    ttl_jitter: 10\n    error_ttl: {404: 5s}\n    vary: honor\n    \
         stale_while_revalidate: 5s\n    stale_if_error: 7s\n    early_refresh: 2\n    \
         max_followers: 3\n    max_upstream_fetches: 4\n    on_store_error: closed\n",
    ));
    let shown = describe(&config);
    let lines: Vec<String> = shown
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    for expected in [
        "ttl_jitter 10%",
        "error_ttl {404: 5s}",
        "vary honor",
        "stale_while_revalidate 5s",
        "stale_if_error 7s",
        "early_refresh 2",
        "max_followers 3",
        "max_upstream_fetches 4",
        "on_store_error closed",
    ] {
        assert!(
            lines.iter().any(|l| l == expected),
            "{expected:?} not in:\n{shown}"
        );
    }
}

#[test]
fn encoding_defaults_on_and_a_route_replaces_it_whole() {
    use crate::http::encoding::Coding;
    let config = parse_ok(&with_route("", ""));
    let encoding = &config.routes[0].policy.encoding;
    assert_eq!(encoding.accept, [Coding::Gzip, Coding::Br, Coding::Zstd]);
    assert_eq!(encoding.compress.with, [Coding::Br, Coding::Gzip]);
    assert_eq!(encoding.compress.min_size, 1024);
    assert!(
        encoding
            .compress
            .types
            .contains(&"application/json".to_owned())
    );
    assert_eq!(config.routes[0].policy.max_variants, 16);

    let config = parse_ok(&with_route(
        "defaults:\n  encoding: {accept: [br]}\n",
        "    max_variants: 4\n    encoding:\n      compress: {min_size: 4KiB, with: [zstd], types: [text/*]}\n",
    ));
    let policy = &config.routes[0].policy;
    assert_eq!(policy.max_variants, 4);
    // The route's `encoding` replaced the defaults' whole: its `accept` is the built-in one.
    assert_eq!(
        policy.encoding.accept,
        [Coding::Gzip, Coding::Br, Coding::Zstd]
    );
    assert_eq!(policy.encoding.compress.with, [Coding::Zstd]);
    assert_eq!(policy.encoding.compress.min_size, 4096);
    assert_eq!(policy.encoding.compress.types, ["text/*"]);
    let shown = describe(&config);
    assert!(shown.contains("  encoding              accept [gzip, br, zstd], compress [zstd] from 4KiB of [text/*]\n"), "{shown}");
    assert!(shown.contains("  max_variants          4\n"), "{shown}");
    let unset = describe(&parse_ok(&with_route("", "")));
    assert!(
        !unset.contains("encoding") && !unset.contains("max_variants"),
        "{unset}"
    );
}

#[test]
fn bad_encoding_settings_are_reported_at_their_place() {
    assert_eq!(
        problems(&with_route(
            "",
            "    encoding:\n      accept: [gzip, lz4, gzip]\n      compress: {types: [JSON, 'text/*/*'], min_size: big, with: [x-gzip]}\n    max_variants: 0\n",
        )),
        [
            "corral.yaml:6:22: routes[0].encoding.accept[1]: unknown value \"lz4\" (expected gzip, br, zstd or deflate)",
            "corral.yaml:7:26: routes[0].encoding.compress.types[0]: invalid media type \"JSON\" (type/subtype, lowercase, at most one *, e.g. text/*)",
            "corral.yaml:7:32: routes[0].encoding.compress.types[1]: invalid media type \"text/*/*\" (type/subtype, lowercase, at most one *, e.g. text/*)",
            "corral.yaml:7:55: routes[0].encoding.compress.min_size: invalid size \"big\": expected a whole number with an optional unit (KiB, MiB, GiB, KB, MB, GB)",
            "corral.yaml:7:67: routes[0].encoding.compress.with[0]: unknown value \"x-gzip\" (expected gzip, br, zstd or deflate)",
            "corral.yaml:8:19: routes[0].max_variants: must be above zero",
        ]
    );
    assert_eq!(
        problem(&with_route(
            "",
            "    encoding: {accept: [gzip, br, gzip]}\n"
        )),
        "corral.yaml:5:35: routes[0].encoding.accept[2]: gzip is named twice"
    );
}

// ----- tracing

#[test]
fn tracing_is_off_unless_configured_and_read_with_its_defaults() {
    assert_eq!(parse_ok(MINIMAL).tracing, None);
    let text = with_route(
        "tracing:\n  otlp_endpoint: http://collector:4318\n  sampling_ratio: 0.1\n  \
         resource_attributes: {deployment.environment: prod, team: edge}\n",
        "",
    );
    let tracing = parse_ok(&text).tracing.expect("tracing is on");
    assert_eq!(
        tracing,
        TracingSettings {
            endpoint: "http://collector:4318/v1/traces".into(),
            sampling_ratio: 0.1,
            service_name: "corral".into(),
            resource_attributes: vec![
                ("deployment.environment".into(), "prod".into()),
                ("team".into(), "edge".into()),
            ],
            export_timeout: secs(5),
            max_queue: 2048,
        }
    );
}

#[test]
fn bad_tracing_settings_are_reported_at_their_values() {
    let text = with_route(
        "tracing:\n  otlp_endpoint: grpc://collector:4317\n  sampling_ratio: 10%\n  \
         export_timeout: 5m\n  max_queue: 0\n  resource_attributes: {team: \"\\u0007\"}\n",
        "",
    );
    assert_eq!(
        problems(&text),
        [
            "corral.yaml:2:18: tracing.otlp_endpoint: invalid otlp endpoint \"grpc://collector:4317\": expected http:// or https://",
            "corral.yaml:3:19: tracing.sampling_ratio: invalid ratio \"10%\" (expected a number from 0.0 to 1.0, e.g. 0.1)",
            "corral.yaml:4:19: tracing.export_timeout: 5m is above 30s, the most it may be",
            "corral.yaml:5:14: tracing.max_queue: must be above zero",
            "corral.yaml:6:31: tracing.resource_attributes.team: invalid resource attribute \"\\u{7}\" (1 to 255 bytes of printable ASCII)",
        ]
    );
    assert_eq!(
        problem(&with_route("tracing:\n  sampling_ratio: 0.5\n", "")),
        "corral.yaml:2:3: tracing.otlp_endpoint: missing (the collector's OTLP/HTTP url, e.g. http://otel-collector:4318)"
    );
}
