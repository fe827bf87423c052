//! Hop-by-hop headers: the fixed list (RFC 9110 §7.6.1) and every header named in `Connection`.
//! They describe one connection, so they never reach the next hop, and a key counts them as absent.

use http::HeaderMap;
use http::header::{self, HeaderName};

use super::cache_control::comma_list;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::testing::headers;

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
