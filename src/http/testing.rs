//! Routes for unit tests, built directly (the config module's parser is not needed to test keys).

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Uri};

use crate::config::{
    KeyRules, OnWaitTimeout, PathMatch, QueryRule, Route, RouteMatch, RoutePolicy,
};
use crate::engine::ExpiryMode;

/// A cached route named "reports" that keys on the whole query and nothing else, honouring
/// `Cache-Control` with a 60 s default, clamped to [0 s, 1 day].
pub fn route() -> Route {
    Route {
        name: "reports".into(),
        matcher: RouteMatch {
            path: PathMatch::Prefix("/".into()),
            methods: Vec::new(),
            host: None,
        },
        upstream: Uri::from_static("http://upstream.test"),
        upstream_http2: false,
        cache: true,
        key: KeyRules {
            query: QueryRule::All,
            headers: Vec::new(),
            cookies: Vec::new(),
            body: false,
        },
        policy: RoutePolicy {
            ttl: Duration::from_secs(60),
            expiry: ExpiryMode::Absolute,
            honor_cache_control: true,
            min_ttl: Duration::ZERO,
            max_ttl: Duration::from_secs(86_400),
            lease_ttl: Duration::from_secs(10),
            max_fetch: Duration::from_secs(30),
            wait_timeout: Duration::from_secs(30),
            on_wait_timeout: OnWaitTimeout::Error,
            poll_interval: Duration::from_secs(1),
            max_body: 1 << 20,
            pass_ttl: Duration::from_secs(30),
            cache_statuses: vec![200, 203, 204, 300, 301, 404, 410],
            honor_client_no_store: true,
            ..RoutePolicy::default()
        },
        upstream_settings: Default::default(),
        forward_unkeyed: Vec::new(),
    }
}

/// [`route`], changed by `change`.
pub fn route_with(change: impl FnOnce(&mut Route)) -> Route {
    let mut route = route();
    change(&mut route);
    route
}

/// A header map from `(name, value)` lines, repeated names appended in order.
pub fn headers(lines: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in lines {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            HeaderValue::from_str(value).expect("header value"),
        );
    }
    map
}

pub fn names(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}
