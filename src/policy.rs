//! What may be cached, for how long, and what may be shared (DESIGN.md, "HTTP caching rules").
//!
//! Safe by default: privacy outranks speed. A response with `Set-Cookie`, `Cache-Control: private`
//! or `no-store` is never stored and never shared; a request carrying `Authorization` or `Cookie`
//! that the route does not key on is never answered from, or into, the cache.

use std::time::Duration;

use http::header::{self, HeaderName};
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

// ---------------------------------------------------------------------------------------------
// Hop-by-hop headers

/// The hop-by-hop headers every proxy removes (RFC 9110 §7.6.1, plus the `Keep-Alive` and
/// `Proxy-Connection` of old clients).
pub const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers: the fixed list (RFC 9110 §7.6.1) and every header named in
/// `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named = connection_named(headers);
    for name in HOP_BY_HOP.iter().chain(&named) {
        headers.remove(name);
    }
}

/// The header names listed in every `Connection` header (comma-separated, any case); names that
/// are not valid header names are skipped.
pub fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    comma_list(headers, &header::CONNECTION)
        .filter_map(|name| HeaderName::from_bytes(&name).ok())
        .collect()
}

/// Whether `name` is hop-by-hop, given the names from [`connection_named`].
pub fn is_hop_by_hop(name: &HeaderName, connection_named: &[HeaderName]) -> bool {
    HOP_BY_HOP.contains(name) || connection_named.contains(name)
}

/// The trimmed, non-empty, lowercased elements of every `name` header's comma-separated list.
fn comma_list<'h>(headers: &'h HeaderMap, name: &HeaderName) -> impl Iterator<Item = Vec<u8>> + 'h {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|item| item.trim_ascii().to_ascii_lowercase())
        .filter(|item| !item.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::testing::headers;

    #[test]
    fn hop_by_hop_headers_are_stripped() {
        let mut h = headers(&[
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authenticate", "Basic"),
            ("proxy-authorization", "Basic x"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("accept", "text/html"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h, headers(&[("accept", "text/html")]));
    }

    #[test]
    fn headers_named_in_connection_are_stripped() {
        let mut h = headers(&[
            ("connection", "X-Secret, close"),
            ("connection", " x-other ,,"),
            ("x-secret", "1"),
            ("x-other", "2"),
            ("x-kept", "3"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h, headers(&[("x-kept", "3")]));
    }
}
