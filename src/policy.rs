//! What may be cached, for how long, and what may be shared (DESIGN.md, "HTTP caching rules").
//!
//! Safe by default: privacy outranks speed. A response with `Set-Cookie`, `Cache-Control: private`
//! or `no-store` is never stored and never shared; a request carrying `Authorization` or `Cookie`
//! that the route does not key on is never answered from, or into, the cache.

use std::time::Duration;

use http::{HeaderMap, Method, StatusCode};

use crate::config::Route;

/// Whether a request may use the cache at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestVerdict {
    /// Key it, coalesce it, answer it from the cache.
    Cache,
    /// Straight to the upstream; the reason goes into `Cache-Status: ...; detail=`.
    Bypass(&'static str),
}

/// What may happen to an upstream response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseVerdict {
    /// Store it and share it, fresh for `ttl`.
    Store { ttl: Duration },
    /// Never store, never share (GIVEUP + hit-for-pass); the reason goes into `detail=`.
    Pass(&'static str),
}

/// Decides whether a request may use the cache on `route`.
pub fn request_verdict(route: &Route, method: &Method, headers: &HeaderMap) -> RequestVerdict {
    todo!("{route:?}{method}{headers:?}")
}

/// Decides what may happen to an upstream response (status below 500) on `route`.
pub fn response_verdict(route: &Route, status: StatusCode, headers: &HeaderMap) -> ResponseVerdict {
    todo!("{route:?}{status}{headers:?}")
}

/// Removes hop-by-hop headers: the fixed list (RFC 9110 §7.6.1) and every header named in
/// `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    todo!("{headers:?}")
}

/// The request headers the upstream sees.
pub fn forward_headers(
    route: &Route,
    incoming: &HeaderMap,
    cacheable: bool,
    client: Option<std::net::IpAddr>,
    scheme: &str,
) -> HeaderMap {
    todo!("{route:?}{incoming:?}{cacheable}{client:?}{scheme}")
}
