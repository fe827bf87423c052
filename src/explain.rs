//! `corral explain`: which route a request takes, what its key is made of, and whether it would be
//! cached, coalesced or bypassed, and why. Nothing is sent anywhere.

use std::fmt::Write;

use http::{HeaderMap, Method, Uri};

use crate::config::{Config, PathMatch};
use crate::http::key::request_key;
use crate::http::verdict::{RequestVerdict, request_verdict};
use crate::proxy::route_for;

/// The explanation of one request, as printed.
pub fn explain(config: &Config, method: &Method, uri: &Uri, headers: &HeaderMap) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "request:  {method} {uri}");
    let Some(index) = route_for(config, method, uri, headers) else {
        let _ = writeln!(out, "route:    none matches: corral answers 404");
        return out;
    };
    let route = &config.routes[index];
    let matcher = match &route.matcher.path {
        PathMatch::Exact(path) => format!("path {path}"),
        PathMatch::Prefix(prefix) => format!("path_prefix {prefix}"),
        PathMatch::Regex(regex) => format!("path_regex {}", regex.as_str()),
    };
    let _ = writeln!(out, "route:    {} ({matcher})", route.name);
    let _ = writeln!(out, "upstream: {}", route.upstream);
    let verdict = if route.cache {
        request_verdict(route, method, headers)
    } else {
        RequestVerdict::Bypass("route-not-cached")
    };
    if let RequestVerdict::Bypass(reason) = verdict {
        let _ = writeln!(
            out,
            "verdict:  BYPASS ({reason}): sent straight to the upstream, never stored or shared"
        );
        return out;
    }
    let body = route.key.body.then_some(&b""[..]);
    let key = request_key(route, method, uri, headers, body);
    let _ = writeln!(out, "key:");
    for (what, value) in &key.parts {
        let _ = writeln!(out, "  {what:<16} {value}");
    }
    let _ = writeln!(out, "digest:   {}", key.key.hash.to_hex());
    let _ = writeln!(
        out,
        "verdict:  CACHE: one upstream fetch per key across every replica of namespace {:?}; \
         the others wait for it (at most {}), then answer from the store or their L1",
        config.namespace,
        humantime::format_duration(route.policy.wait_timeout)
    );
    if route.key.body {
        let _ = writeln!(
            out,
            "note:     this route keys on the request body; the digest above is for an empty body"
        );
    }
    out
}
