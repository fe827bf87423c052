//! Which of a client's headers reach the upstream, and what corral adds to them.
//!
//! # What reaches the upstream
//!
//! A cacheable request is fetched once on behalf of everyone who asks for the same key, so the
//! upstream must see nothing that the key does not: a header outside the key could change the
//! answer (`Accept-Encoding`, `User-Agent`, `X-Forwarded-Host`, a client's IP for geo-location)
//! and that answer would then be shared with clients who sent something else. [`forward_headers`]
//! therefore forwards, for a cacheable request, only:
//!
//! - the headers the route keys on (`forward_headers` names join them);
//! - the headers `forward_headers` marks `unkeyed`: the first requester's value is sent for
//!   everyone who shares the answer, which `corral check` warns about;
//! - the cookies the route keys on, as the key read them, in a rebuilt `Cookie` header;
//! - when the route keys on the body, `Content-Length` and the body-describing headers it keys with
//!   it ([`crate::http::key::BODY_HEADERS`]);
//! - `Accept-Encoding`, corral's own: the codings the route asks for (`encoding.accept`), never the
//!   client's, since the stored answer serves every client whatever it accepts
//!   ([`crate::http::encoding`]); the client's only when the route keys on it;
//! - `X-Forwarded-Proto` (the listener's scheme) and `Via: 1.1 corral`, which are the same for
//!   every client; and, set by the fetch, `X-Request-Id` with the fetch's own id, never a
//!   client's.
//!
//! On a `vary: honor` or `semantics: rfc9111` route, a cacheable request also forwards the
//! client's other end-to-end headers (not `Accept-Encoding`, `Authorization`, `Cookie`,
//! `Forwarded`, `X-Forwarded-*`, `Via`, the body headers nor a client's preconditions, which
//! corral answers itself): an upstream can only vary on what it is sent, and each answer it says
//! varies on a header is stored under a variant key holding that header's value.
//!
//! Its query is cut down the same way, to the parameters the key kept
//! ([`crate::http::key::forwarded_query`]).
//!
//! Client-supplied `Forwarded` and `X-Forwarded-*` are dropped with everything else, so a client
//! cannot poison a shared answer with them, and no `X-Forwarded-For` is added: the fetch is made for
//! every coalesced client, not for the one that happened to arrive first.
//!
//! On a route with `cookies: strip` (or a list of names to strip), the cookies the key does not
//! read are left out of a shared fetch like any other unkeyed header; a request's own fetch
//! past a hit-for-pass marker gets them back ([`restore_cookies`]).
//!
//! A bypassed request is the client's own: everything but the hop-by-hop headers is forwarded,
//! with the client's address appended to `X-Forwarded-For`, and the same `X-Forwarded-Proto` and
//! `Via`.
//!
//! Either way, `Host` reaches the upstream only when the route keys on it (for virtual-hosted
//! upstreams); otherwise the HTTP client sets it from the route's upstream URI. Headers named in
//! `Connection` are hop-by-hop, so they never reach the upstream; the key counts them as absent for
//! the same reason.

use std::net::IpAddr;

use http::HeaderMap;
use http::header::{self, HeaderName, HeaderValue};

use super::encoding::ask_upstream;
use super::hop_by_hop::{connection_named, is_hop_by_hop};
use super::key::{BODY_HEADERS, in_key, keys_header, request_cookies};
use super::verdict::stores_variants;
use crate::config::{CookieMode, Route};

/// A client's preconditions: answered by corral from the stored entry, never sent on a shared
/// fetch, whose answer must be the whole representation for everyone (an upstream `304` to one
/// client's `If-None-Match` fills no entry, and would mark the key as not cacheable).
const CONDITIONAL_HEADERS: [HeaderName; 5] = [
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_MATCH,
    header::IF_UNMODIFIED_SINCE,
    header::IF_RANGE,
];

/// Whether a cacheable request on a `vary: honor` route forwards this header although the key
/// does not name it: an upstream's `Vary` can only name headers it was sent. Never the ones a
/// client could poison a shared answer with (`Forwarded`, `X-Forwarded-*`, `Via`), nor
/// credentials, body framing or preconditions, which have their own rules.
pub(crate) fn variant_header(name: &HeaderName) -> bool {
    !(*name == header::FORWARDED
        || *name == header::ACCEPT_ENCODING
        || CONDITIONAL_HEADERS.contains(name)
        || *name == header::VIA
        || *name == header::AUTHORIZATION
        || *name == header::COOKIE
        || *name == header::CONTENT_LENGTH
        || BODY_HEADERS.contains(name)
        || name.as_str().starts_with("x-forwarded-"))
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const VIA_CORRAL: &str = "1.1 corral";

/// Builds the request headers for the upstream (see the module docs for why each is there).
///
/// `cacheable` is whether [`request_verdict`](super::verdict::request_verdict) said `Cache`; `client` is the peer's address (used for
/// `X-Forwarded-For` on bypassed requests only); `scheme` is the listener's (`http` or `https`).
pub fn forward_headers(
    route: &Route,
    incoming: &HeaderMap,
    cacheable: bool,
    client: Option<IpAddr>,
    scheme: &str,
) -> HeaderMap {
    let hop_by_hop = connection_named(incoming);
    let rebuild_cookies = cacheable && !keys_header(route, &header::COOKIE);
    let mut out = HeaderMap::new();
    for (name, value) in incoming {
        if is_hop_by_hop(name, &hop_by_hop) {
            continue;
        }
        if rebuild_cookies && *name == header::COOKIE {
            continue;
        }
        let keep = if *name == header::HOST {
            keys_header(route, name)
        } else if cacheable && *name == header::ACCEPT_ENCODING {
            in_key(route, name)
        } else if cacheable {
            in_key(route, name)
                || route.forward_unkeyed.contains(name)
                || (route.key.body && *name == header::CONTENT_LENGTH)
                || (stores_variants(route) && variant_header(name))
        } else {
            true
        };
        if keep {
            out.append(name.clone(), value.clone());
        }
    }

    if rebuild_cookies && !route.key.cookies.is_empty() && !hop_by_hop.contains(&header::COOKIE) {
        // Exactly the name=value pairs the key saw, so the upstream cannot read anything else.
        let keyed: Vec<Vec<u8>> = request_cookies(incoming)
            .into_iter()
            .filter(|c| route.key.cookies.iter().any(|k| k.as_bytes() == c.name))
            .map(|c| [c.name, b"=", c.value].concat())
            .collect();
        if !keyed.is_empty()
            && let Ok(value) = HeaderValue::from_bytes(&keyed.join(&b"; "[..]))
        {
            out.insert(header::COOKIE, value);
        }
    }

    if cacheable
        && !in_key(route, &header::ACCEPT_ENCODING)
        && let Some(asked) = ask_upstream(&route.policy.encoding.accept)
    {
        out.insert(header::ACCEPT_ENCODING, asked);
    }
    if !cacheable && let Some(ip) = client {
        append_to_list(&mut out, X_FORWARDED_FOR, &ip.to_string());
    }
    if let Ok(scheme) = HeaderValue::from_str(scheme) {
        out.insert(X_FORWARDED_PROTO, scheme);
    }
    append_to_list(&mut out, header::VIA, VIA_CORRAL);
    out
}

/// Gives a request's own fetch (past a hit-for-pass marker: its answer is not shared) the
/// client's `Cookie` lines unchanged, on a route whose `cookies:` setting strips cookies from
/// shared fetches: like a bypass, a pass-through is the client's own request.
pub fn restore_cookies(route: &Route, incoming: &HeaderMap, out: &mut HeaderMap) {
    if route.policy.cookies == CookieMode::Bypass
        || keys_header(route, &header::COOKIE)
        || connection_named(incoming).contains(&header::COOKIE)
    {
        return;
    }
    out.remove(header::COOKIE);
    for value in incoming.get_all(header::COOKIE) {
        out.append(header::COOKIE, value.clone());
    }
}

/// Appends `item` to a comma-separated list header, folding earlier lines into one (many
/// upstreams read only the first line of `X-Forwarded-For`).
fn append_to_list(headers: &mut HeaderMap, name: HeaderName, item: &str) {
    let mut list: Vec<u8> = Vec::new();
    for value in headers.get_all(&name) {
        list.extend_from_slice(value.as_bytes());
        list.extend_from_slice(b", ");
    }
    list.extend_from_slice(item.as_bytes());
    if let Ok(value) = HeaderValue::from_bytes(&list) {
        headers.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use http::header::ACCEPT;

    use super::*;
    use crate::http::testing::{headers, names, route, route_with};

    // Forwarding

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));

    fn forward(route: &Route, cacheable: bool, lines: &[(&str, &str)]) -> HeaderMap {
        forward_headers(route, &headers(lines), cacheable, Some(CLIENT), "https")
    }

    fn names_of(map: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<&str> = map.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        names
    }

    const CLIENT_HEADERS: &[(&str, &str)] = &[
        ("host", "public.example"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip"),
        ("user-agent", "curl/8"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-for", "10.0.0.1"),
        ("x-forwarded-proto", "http"),
        ("forwarded", "for=10.0.0.1;host=evil.example"),
        ("via", "1.1 edge"),
        ("if-none-match", "\"v1\""),
        ("connection", "keep-alive, x-hop"),
        ("x-hop", "1"),
        ("te", "trailers"),
    ];

    #[test]
    fn a_cacheable_request_forwards_only_what_the_key_sees() {
        let r = route_with(|r| r.key.headers = vec![ACCEPT]);
        let out = forward(&r, true, CLIENT_HEADERS);
        assert_eq!(
            names_of(&out),
            ["accept", "accept-encoding", "via", "x-forwarded-proto"],
            "{out:?}"
        );
        assert_eq!(out["accept"], "application/json");
        assert_eq!(out["x-forwarded-proto"], "https");
        assert_eq!(out["via"], "1.1 corral");
    }

    #[test]
    fn an_unkeyed_forwarded_header_reaches_the_upstream_outside_the_key() {
        let r = route_with(|r| r.forward_unkeyed = vec![header::USER_AGENT]);
        let out = forward(&r, true, CLIENT_HEADERS);
        assert_eq!(
            names_of(&out),
            ["accept-encoding", "user-agent", "via", "x-forwarded-proto"],
            "{out:?}"
        );
        assert_eq!(out["user-agent"], "curl/8");
    }

    #[test]
    fn a_cacheable_request_forwards_client_forwarding_headers_only_when_keyed() {
        let r = route_with(|r| {
            r.key.headers = vec![HeaderName::from_static("x-forwarded-host"), header::HOST]
        });
        let out = forward(&r, true, CLIENT_HEADERS);
        assert_eq!(out["x-forwarded-host"], "evil.example");
        assert_eq!(out["host"], "public.example");
        assert!(!out.contains_key("x-forwarded-for"));
        assert!(!out.contains_key("forwarded"));
    }

    #[test]
    fn stripped_cookies_stay_off_a_shared_fetch_and_go_back_on_a_requests_own() {
        use crate::config::CookieMode;
        let r = route_with(|r| {
            r.policy.cookies = CookieMode::Strip;
            r.key.cookies = names(&["lang"]);
        });
        let lines = [("cookie", "lang=en; _ga=1"), ("cookie", "sid=2")];
        let mut out = forward(&r, true, &lines);
        assert_eq!(out["cookie"], "lang=en");
        restore_cookies(&r, &headers(&lines), &mut out);
        let restored: Vec<_> = out.get_all("cookie").iter().collect();
        assert_eq!(restored, ["lang=en; _ga=1", "sid=2"]);
        // Bypassing routes never strip, so there is nothing to put back.
        let bypass = route_with(|r| r.key.cookies = names(&["lang"]));
        let mut out = forward(&bypass, true, &lines);
        restore_cookies(&bypass, &headers(&lines), &mut out);
        assert_eq!(out["cookie"], "lang=en");
        // A bypassed request keeps them all, unchanged.
        let out = forward(&r, false, &lines);
        assert_eq!(out.get_all("cookie").iter().count(), 2);
    }

    #[test]
    fn an_rfc9111_route_forwards_end_to_end_headers_on_a_shared_fetch() {
        use crate::config::Semantics;
        let r = route_with(|r| r.policy.semantics = Semantics::Rfc9111);
        let out = forward(&r, true, CLIENT_HEADERS);
        assert_eq!(out["accept"], "application/json");
        assert_eq!(out["user-agent"], "curl/8");
        assert!(!out.contains_key("x-forwarded-for"));
        assert!(!out.contains_key("forwarded"));
    }

    #[test]
    fn a_cacheable_request_forwards_only_keyed_cookies() {
        let r = route_with(|r| r.key.cookies = names(&["lang", "theme"]));
        let out = forward(
            &r,
            true,
            &[("cookie", " lang = en ; sid=1"), ("cookie", "theme=dark")],
        );
        assert_eq!(out["cookie"], "lang=en; theme=dark");
        assert_eq!(out.get_all("cookie").iter().count(), 1);

        let none = forward(&r, true, &[("cookie", "sid=1")]);
        assert!(!none.contains_key("cookie"));

        let whole = route_with(|r| r.key.headers = vec![header::COOKIE]);
        let out = forward(&whole, true, &[("cookie", "sid=1; lang=en")]);
        assert_eq!(out["cookie"], "sid=1; lang=en");
    }

    #[test]
    fn a_cacheable_body_request_forwards_how_to_read_the_body() {
        let r = route_with(|r| r.key.body = true);
        let out = forward(
            &r,
            true,
            &[
                ("content-type", "application/json"),
                ("content-length", "12"),
                ("content-encoding", "gzip"),
                ("transfer-encoding", "chunked"),
                ("accept", "*/*"),
            ],
        );
        assert_eq!(
            names_of(&out),
            [
                "accept-encoding",
                "content-encoding",
                "content-length",
                "content-type",
                "via",
                "x-forwarded-proto"
            ]
        );
        let plain = forward(&route(), true, &[("content-type", "application/json")]);
        assert!(!plain.contains_key("content-type"));
    }

    #[test]
    fn a_keyed_header_named_in_connection_is_not_forwarded() {
        let r = route_with(|r| r.key.headers = vec![ACCEPT]);
        let out = forward(&r, true, &[("accept", "a/b"), ("connection", "accept")]);
        assert!(!out.contains_key("accept"));
    }

    #[test]
    fn a_bypassed_request_forwards_everything_but_hop_by_hop_and_an_unkeyed_host() {
        let out = forward(&route(), false, CLIENT_HEADERS);
        assert_eq!(
            names_of(&out),
            [
                "accept",
                "accept-encoding",
                "forwarded",
                "if-none-match",
                "user-agent",
                "via",
                "x-forwarded-for",
                "x-forwarded-host",
                "x-forwarded-proto",
            ]
        );
        assert_eq!(out["x-forwarded-for"], "10.0.0.1, 203.0.113.7");
        assert_eq!(out["x-forwarded-proto"], "https");
        assert_eq!(out["via"], "1.1 edge, 1.1 corral");
    }

    #[test]
    fn a_bypassed_request_keeps_repeated_headers_and_adds_the_client() {
        let out = forward_headers(
            &route(),
            &headers(&[("accept", "a"), ("accept", "b")]),
            false,
            Some(CLIENT),
            "http",
        );
        assert_eq!(out.get_all("accept").iter().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(out["x-forwarded-for"], "203.0.113.7");
        assert_eq!(out["x-forwarded-proto"], "http");

        let anonymous = forward_headers(&route(), &HeaderMap::new(), false, None, "http");
        assert!(!anonymous.contains_key("x-forwarded-for"));
    }

    #[test]
    fn vary_honor_forwards_what_an_upstream_may_vary_on_but_nothing_that_poisons() {
        use crate::config::VaryMode;
        let r = route_with(|r| r.policy.vary = VaryMode::Honor);
        let out = forward(&r, true, CLIENT_HEADERS);
        assert_eq!(
            names_of(&out),
            [
                "accept",
                "accept-encoding",
                "user-agent",
                "via",
                "x-forwarded-proto"
            ]
        );
        assert_eq!(out["x-forwarded-proto"], "https");
        assert_eq!(out["via"], "1.1 corral");
        // Even then, the upstream is asked for corral's codings, not the client's.
        assert_eq!(out["accept-encoding"], "gzip, br;q=0.9, zstd;q=0.8");
    }

    #[test]
    fn a_cacheable_fetch_asks_for_the_routes_codings_never_the_clients() {
        use crate::http::encoding::Coding;
        let out = forward(&route(), true, CLIENT_HEADERS);
        assert_eq!(out["accept-encoding"], "gzip, br;q=0.9, zstd;q=0.8");
        assert_eq!(out.get_all("accept-encoding").iter().count(), 1);
        let without = forward(&route(), true, &[]);
        assert_eq!(without["accept-encoding"], "gzip, br;q=0.9, zstd;q=0.8");
        let zstd_only = route_with(|r| r.policy.encoding.accept = vec![Coding::Zstd]);
        assert_eq!(
            forward(&zstd_only, true, CLIENT_HEADERS)["accept-encoding"],
            "zstd"
        );
        let identity = route_with(|r| r.policy.encoding.accept = Vec::new());
        assert!(!forward(&identity, true, CLIENT_HEADERS).contains_key("accept-encoding"));
        // A route that keys on it sends the client's, as the key holds it.
        let keyed = route_with(|r| r.key.headers = vec![header::ACCEPT_ENCODING]);
        assert_eq!(
            forward(&keyed, true, CLIENT_HEADERS)["accept-encoding"],
            "gzip"
        );
        // A bypassed request is the client's own.
        assert_eq!(
            forward(&route(), false, CLIENT_HEADERS)["accept-encoding"],
            "gzip"
        );
    }
}
