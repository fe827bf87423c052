//! What may be cached, for how long, and what may be shared (DESIGN.md, "HTTP caching rules").
//!
//! Safe by default: privacy outranks speed. A response with `Set-Cookie`, `Cache-Control: private`
//! or `no-store` is never stored and never shared; a request carrying `Authorization` or `Cookie`
//! that the route does not key on is never answered from, or into, the cache.
//!
//! # What reaches the upstream
//!
//! A cacheable request is fetched once on behalf of everyone who asks for the same key, so the
//! upstream must see nothing that the key does not: a header outside the key could change the
//! answer (`Accept-Encoding`, `User-Agent`, `X-Forwarded-Host`, a client's IP for geo-location)
//! and that answer would then be shared with clients who sent something else. [`forward_headers`]
//! therefore forwards, for a cacheable request, only:
//!
//! - the headers the route keys on;
//! - the cookies the route keys on, as the key read them, in a rebuilt `Cookie` header;
//! - when the route keys on the body, `Content-Length` and the body-describing headers it keys with
//!   it ([`crate::key::BODY_HEADERS`]);
//! - `X-Forwarded-Proto` (the listener's scheme) and `Via: 1.1 corral`, which are the same for
//!   every client.
//!
//! On a `vary: honor` route, a cacheable request also forwards the client's other end-to-end
//! headers (not `Authorization`, `Cookie`, `Forwarded`, `X-Forwarded-*`, `Via` nor the body
//! headers): an upstream can only vary on what it is sent, and each answer it says varies on a
//! header is stored under a variant key holding that header's value.
//!
//! Its query is cut down the same way, to the parameters the key kept
//! ([`crate::key::forwarded_query`]).
//!
//! Client-supplied `Forwarded` and `X-Forwarded-*` are dropped with everything else, so a client
//! cannot poison a shared answer with them, and no `X-Forwarded-For` is added: the fetch is made for
//! every coalesced client, not for the one that happened to arrive first.
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
use std::time::{Duration, SystemTime};

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode};

use crate::config::{Route, VaryMode};
use crate::engine::ExpiryMode;
use crate::key::{BODY_HEADERS, request_cookies};

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
///
/// Bypass reasons, checked in this order: `route-not-cached`, `method` (GET and HEAD; POST only
/// when the route keys on the body), `upgrade` (WebSocket and friends), `unkeyed-body` (a body on a
/// route that does not key on it, e.g. a GET with a search body), `authorization`, `cookie`,
/// `client-no-store` and `range` (partial responses are not coalesced).
pub fn request_verdict(route: &Route, method: &Method, headers: &HeaderMap) -> RequestVerdict {
    use RequestVerdict::{Bypass, Cache};

    if !route.cache {
        return Bypass("route-not-cached");
    }
    let method_ok = *method == Method::GET
        || *method == Method::HEAD
        || (*method == Method::POST && route.key.body);
    if !method_ok {
        return Bypass("method");
    }
    if headers.contains_key(header::UPGRADE) {
        return Bypass("upgrade");
    }
    if !route.key.body && carries_body(headers) {
        return Bypass("unkeyed-body");
    }
    if headers.contains_key(header::AUTHORIZATION) && !keys_header(route, &header::AUTHORIZATION) {
        return Bypass("authorization");
    }
    if headers.contains_key(header::COOKIE) && !cookies_keyed(route, headers) {
        return Bypass("cookie");
    }
    if route.policy.honor_client_no_store && CacheControl::from_headers(headers).has("no-store") {
        return Bypass("client-no-store");
    }
    if headers.contains_key(header::RANGE) {
        return Bypass("range");
    }
    Cache
}

/// Whether the request says it has a body (a non-zero or unreadable `Content-Length`, or any
/// `Transfer-Encoding`).
fn carries_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .any(|v| v.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()) != Some(0))
}

/// Whether every cookie the request carries is seen by the key: the whole `Cookie` header is
/// keyed, or every cookie's name is one the route keys on.
fn cookies_keyed(route: &Route, headers: &HeaderMap) -> bool {
    if keys_header(route, &header::COOKIE) {
        return true;
    }
    !route.key.cookies.is_empty()
        && request_cookies(headers)
            .iter()
            .all(|c| route.key.cookies.iter().any(|k| k.as_bytes() == c.name))
}

fn keys_header(route: &Route, name: &HeaderName) -> bool {
    route.key.headers.contains(name)
}

/// Whether the request header `name` is part of the route's key one way or another: keyed by name,
/// `Cookie` when the route keys cookies, the body headers when it keys the body.
fn in_key(route: &Route, name: &HeaderName) -> bool {
    keys_header(route, name)
        || (*name == header::COOKIE && !route.key.cookies.is_empty())
        || (route.key.body && BODY_HEADERS.contains(name))
}

// ---------------------------------------------------------------------------------------------
// Responses

/// Decides what may happen to an upstream response (status below 500) on `route`.
///
/// Pass reasons, checked in this order: `set-cookie`, `private` (with or without field names),
/// `no-store`, `vary-star`, `vary` (names a request header outside the key: every name counts,
/// `Accept-Encoding` included), `status` (not in the route's `cache_statuses`), then, when the
/// route honours `Cache-Control`, `no-cache` (corral does not revalidate), and `zero-ttl`.
///
/// With `vary: honor`, a `Vary` naming readable header names outside the key is not a pass: the
/// caller must then store the response as a variant of [`vary_outside_key`]'s names.
///
/// A status listed in the route's `error_ttl` is stored for exactly that long once the privacy
/// and `Vary` checks pass, whatever `cache_statuses` and the upstream's freshness say.
///
/// Freshness when the route honours `Cache-Control`: `s-maxage`, else `max-age`, else `Expires`
/// minus `Date`; less the upstream's `Age`; clamped to `[min_ttl, max_ttl]` (`max_ttl` wins should
/// they cross). Without any of those, or when the route does not honour them, the route's `ttl`.
pub fn response_verdict(route: &Route, status: StatusCode, headers: &HeaderMap) -> ResponseVerdict {
    use ResponseVerdict::{Pass, Store};

    if headers.contains_key(header::SET_COOKIE) {
        return Pass("set-cookie");
    }
    let cc = CacheControl::from_headers(headers);
    if cc.has("private") {
        return Pass("private");
    }
    if cc.has("no-store") {
        return Pass("no-store");
    }
    match vary(route, headers) {
        Vary::Star => return Pass("vary-star"),
        // With `vary: honor`, the caller stores it as a variant of the names outside the key.
        Vary::OutsideKey
            if route.policy.vary == VaryMode::Honor
                && vary_outside_key(route, headers).is_some() => {}
        Vary::OutsideKey => return Pass("vary"),
        Vary::WithinKey => {}
    }
    if let Some(ttl) = route.policy.error_ttl.get(&status.as_u16()) {
        return Store { ttl: *ttl };
    }
    if !route.policy.cache_statuses.contains(&status.as_u16()) {
        return Pass("status");
    }
    let ttl = if route.policy.honor_cache_control {
        if cc.has("no-cache") {
            return Pass("no-cache");
        }
        match upstream_freshness(&cc, headers) {
            Some(lifetime) => lifetime
                .saturating_sub(age(headers))
                .max(route.policy.min_ttl)
                .min(route.policy.max_ttl),
            None => route.policy.ttl,
        }
    } else {
        route.policy.ttl
    };
    if ttl.is_zero() {
        return Pass("zero-ttl");
    }
    Store { ttl }
}

/// `ttl` cut by a random 0 to `percent` percent (`ttl_jitter`), so entries filled together do not
/// expire together; never below one millisecond, since a store cannot keep an entry for zero.
pub fn jittered(ttl: Duration, percent: u8, rng: &mut impl rand::Rng) -> Duration {
    if percent == 0 || ttl.is_zero() {
        return ttl;
    }
    let cut = rng.random_range(0.0..=f64::from(percent.min(100)) / 100.0);
    ttl.mul_f64(1.0 - cut).max(Duration::from_millis(1))
}

/// The request headers a response's `Vary` names outside the route's key, sorted and without
/// repeats (empty when it names none); `None` for `Vary: *` or a name that is not a header name,
/// which no key can stand for.
pub fn vary_outside_key(route: &Route, headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names = Vec::new();
    for name in comma_list(headers, &header::VARY) {
        let name = HeaderName::from_bytes(&name).ok()?;
        if !in_key(route, &name) {
            names.push(name);
        }
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    Some(names)
}

/// Whether a cacheable request on a `vary: honor` route forwards this header although the key
/// does not name it: an upstream's `Vary` can only name headers it was sent. Never the ones a
/// client could poison a shared answer with (`Forwarded`, `X-Forwarded-*`, `Via`), nor
/// credentials or body framing, which have their own rules.
fn variant_header(name: &HeaderName) -> bool {
    !(*name == header::FORWARDED
        || *name == header::VIA
        || *name == header::AUTHORIZATION
        || *name == header::COOKIE
        || *name == header::CONTENT_LENGTH
        || BODY_HEADERS.contains(name)
        || name.as_str().starts_with("x-forwarded-"))
}

/// How long past freshness a stored answer may be served: at once while it is refreshed
/// (`while_revalidate`), and in place of a failed refresh (`if_error`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StaleWindows {
    pub while_revalidate: Duration,
    pub if_error: Duration,
}

/// The stale windows of a response the route stores: the route's `stale_while_revalidate` and
/// `stale_if_error`, or the upstream's directives of the same names when the route honours
/// `Cache-Control` (RFC 5861).
///
/// RFC 9111 §4.2.4: a cache never serves a response stale against `must-revalidate`,
/// `proxy-revalidate` or `no-cache` (which a route that ignores `Cache-Control` may still have
/// stored), so those close both windows, whatever the route or the upstream says; `s-maxage`
/// implies `proxy-revalidate` for a shared cache, so it closes stale-if-error too. A
/// `stale-while-revalidate` directive sent beside `s-maxage` is the upstream's explicit leave to
/// serve stale while refreshing, so that one is kept.
///
/// A route with sliding expiry has no stale windows: its entries never go stale.
pub fn stale_windows(route: &Route, headers: &HeaderMap) -> StaleWindows {
    if matches!(route.policy.expiry, ExpiryMode::Sliding { .. }) {
        return StaleWindows::default();
    }
    let cc = CacheControl::from_headers(headers);
    if cc.has("must-revalidate") || cc.has("proxy-revalidate") || cc.has("no-cache") {
        return StaleWindows::default();
    }
    let policy = &route.policy;
    let (mut while_revalidate, mut if_error) =
        (policy.stale_while_revalidate, policy.stale_if_error);
    if policy.honor_cache_control {
        if let Some(window) = cc.seconds("stale-while-revalidate") {
            while_revalidate = window;
        }
        if let Some(window) = cc.seconds("stale-if-error") {
            if_error = window;
        }
    }
    if cc.has("s-maxage") {
        if_error = Duration::ZERO;
    }
    StaleWindows {
        while_revalidate,
        if_error,
    }
}

enum Vary {
    WithinKey,
    OutsideKey,
    Star,
}

fn vary(route: &Route, headers: &HeaderMap) -> Vary {
    let mut verdict = Vary::WithinKey;
    for name in comma_list(headers, &header::VARY) {
        if name == b"*" {
            return Vary::Star;
        }
        match HeaderName::from_bytes(&name) {
            Ok(name) if in_key(route, &name) => {}
            _ => verdict = Vary::OutsideKey,
        }
    }
    verdict
}

/// What the upstream says the response's freshness lifetime is, before `Age`: `s-maxage` (corral
/// is a shared cache), else `max-age`, else `Expires` minus `Date` (an unreadable `Expires` means
/// "already expired", RFC 9111 §5.3).
fn upstream_freshness(cc: &CacheControl, headers: &HeaderMap) -> Option<Duration> {
    if let Some(lifetime) = cc.seconds("s-maxage").or_else(|| cc.seconds("max-age")) {
        return Some(lifetime);
    }
    let expires = headers.get(header::EXPIRES)?;
    let Some(expires) = http_date(expires) else {
        return Some(Duration::ZERO);
    };
    let date = headers
        .get(header::DATE)
        .and_then(http_date)
        .unwrap_or_else(SystemTime::now);
    Some(expires.duration_since(date).unwrap_or(Duration::ZERO))
}

fn http_date(value: &HeaderValue) -> Option<SystemTime> {
    httpdate::parse_http_date(value.to_str().ok()?.trim()).ok()
}

/// The upstream's `Age`: the largest valid value when it sends several (the more cautious reading),
/// zero when it sends none.
fn age(headers: &HeaderMap) -> Duration {
    headers
        .get_all(header::AGE)
        .iter()
        .filter_map(|v| delta_seconds(v.to_str().ok()?.trim()))
        .max()
        .unwrap_or(Duration::ZERO)
}

/// RFC 9111 delta-seconds: ASCII digits only; too large saturates rather than failing.
fn delta_seconds(text: &str) -> Option<Duration> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(Duration::from_secs(text.parse().unwrap_or(u64::MAX)))
}

// ---------------------------------------------------------------------------------------------
// Cache-Control

/// The directives of every `Cache-Control` header of a message, in order.
///
/// Lenient, as caches must be: names are case-insensitive; directives are comma-separated, each a
/// token with an optional `=value`, the value a token or a quoted string (which may hold commas and
/// backslash escapes); empty list elements and stray whitespace are skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheControl {
    /// Lowercase names with their unquoted values.
    directives: Vec<(String, Option<String>)>,
}

impl CacheControl {
    /// Combines every `Cache-Control` header in `headers`.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let mut cc = Self::default();
        for value in headers.get_all(header::CACHE_CONTROL) {
            cc.add(&String::from_utf8_lossy(value.as_bytes()));
        }
        cc
    }

    /// Parses one header value.
    pub fn parse(text: &str) -> Self {
        let mut cc = Self::default();
        cc.add(text);
        cc
    }

    /// Whether the directive is present, with or without a value.
    pub fn has(&self, name: &str) -> bool {
        self.directives.iter().any(|(n, _)| n == name)
    }

    /// The value of the first occurrence of `name` that has one.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.directives
            .iter()
            .filter(|(n, _)| n == name)
            .find_map(|(_, v)| v.as_deref())
    }

    /// A delta-seconds directive (`max-age`, `s-maxage`). Invalid values are ignored; when the
    /// message repeats it, the smallest valid value wins (the cautious reading of a contradiction).
    pub fn seconds(&self, name: &str) -> Option<Duration> {
        self.directives
            .iter()
            .filter(|(n, _)| n == name)
            .filter_map(|(_, v)| delta_seconds(v.as_deref()?))
            .min()
    }

    fn add(&mut self, text: &str) {
        let mut chars = text.chars().peekable();
        loop {
            while chars.next_if(|c| *c == ',' || c.is_whitespace()).is_some() {}
            if chars.peek().is_none() {
                break;
            }
            let mut name = String::new();
            while let Some(c) = chars.next_if(|c| *c != '=' && *c != ',') {
                name.push(c);
            }
            let mut value = None;
            if chars.next_if_eq(&'=').is_some() {
                while chars.next_if(|c| *c == ' ' || *c == '\t').is_some() {}
                let mut text = String::new();
                if chars.next_if_eq(&'"').is_some() {
                    while let Some(c) = chars.next() {
                        match c {
                            '"' => break,
                            '\\' => text.extend(chars.next()),
                            c => text.push(c),
                        }
                    }
                    // Anything between the closing quote and the next comma is junk.
                    while chars.next_if(|c| *c != ',').is_some() {}
                } else {
                    while let Some(c) = chars.next_if(|c| *c != ',') {
                        text.push(c);
                    }
                    text = text.trim().to_owned();
                }
                value = Some(text);
            }
            let name = name.trim().to_ascii_lowercase();
            if !name.is_empty() {
                self.directives.push((name, value));
            }
        }
    }
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

// ---------------------------------------------------------------------------------------------
// Forwarding

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const VIA_CORRAL: &str = "1.1 corral";

/// Builds the request headers for the upstream (see the module docs for why each is there).
///
/// `cacheable` is whether [`request_verdict`] said `Cache`; `client` is the peer's address (used for
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
        } else if cacheable {
            in_key(route, name)
                || (route.key.body && *name == header::CONTENT_LENGTH)
                || (route.policy.vary == VaryMode::Honor && variant_header(name))
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

    if !cacheable && let Some(ip) = client {
        append_to_list(&mut out, X_FORWARDED_FOR, &ip.to_string());
    }
    if let Ok(scheme) = HeaderValue::from_str(scheme) {
        out.insert(X_FORWARDED_PROTO, scheme);
    }
    append_to_list(&mut out, header::VIA, VIA_CORRAL);
    out
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
    use std::collections::HashSet;
    use std::net::{IpAddr, Ipv4Addr};

    use http::header::{ACCEPT, AUTHORIZATION};

    use super::*;
    use crate::key::testing::{headers, names, route, route_with};
    use RequestVerdict::{Bypass, Cache};
    use ResponseVerdict::Pass;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn request(route: &Route, method: Method, lines: &[(&str, &str)]) -> RequestVerdict {
        request_verdict(route, &method, &headers(lines))
    }

    fn get(route: &Route, lines: &[(&str, &str)]) -> RequestVerdict {
        request(route, Method::GET, lines)
    }

    fn response(route: &Route, status: u16, lines: &[(&str, &str)]) -> ResponseVerdict {
        response_verdict(
            route,
            StatusCode::from_u16(status).expect("status"),
            &headers(lines),
        )
    }

    fn ok(lines: &[(&str, &str)]) -> ResponseVerdict {
        response(&route(), 200, lines)
    }

    fn stored(ttl: u64) -> ResponseVerdict {
        ResponseVerdict::Store { ttl: secs(ttl) }
    }

    // -----------------------------------------------------------------------------------------
    // Stale windows

    fn windows(r: &Route, lines: &[(&str, &str)]) -> (u64, u64) {
        let w = stale_windows(r, &headers(lines));
        (w.while_revalidate.as_secs(), w.if_error.as_secs())
    }

    fn stale_route() -> Route {
        route_with(|r| {
            r.policy.stale_while_revalidate = secs(30);
            r.policy.stale_if_error = secs(600);
        })
    }

    #[test]
    fn stale_windows_come_from_the_route_or_the_upstream_when_honoured() {
        assert_eq!(windows(&route(), &[]), (0, 0));
        assert_eq!(windows(&stale_route(), &[]), (30, 600));
        let directives = [(
            "cache-control",
            "max-age=5, stale-while-revalidate=7, stale-if-error=9",
        )];
        assert_eq!(windows(&route(), &directives), (7, 9));
        let ignoring = route_with(|r| {
            r.policy.honor_cache_control = false;
            r.policy.stale_while_revalidate = secs(30);
        });
        assert_eq!(windows(&ignoring, &directives), (30, 0));
    }

    #[test]
    fn revalidation_directives_forbid_serving_stale() {
        for forbids in ["must-revalidate", "proxy-revalidate", "no-cache"] {
            let line = format!("max-age=5, {forbids}, stale-if-error=9");
            assert_eq!(
                windows(&stale_route(), &[("cache-control", &line)]),
                (0, 0),
                "{forbids}"
            );
        }
        // s-maxage implies proxy-revalidate for a shared cache: no stale-if-error, but an explicit
        // stale-while-revalidate beside it stands.
        let shared = [("cache-control", "s-maxage=5, stale-while-revalidate=7")];
        assert_eq!(windows(&stale_route(), &shared), (7, 0));
    }

    #[test]
    fn sliding_routes_have_no_stale_windows() {
        let sliding = route_with(|r| {
            r.policy.expiry = ExpiryMode::Sliding { window: secs(60) };
            r.policy.stale_while_revalidate = secs(30);
        });
        assert_eq!(windows(&sliding, &[]), (0, 0));
    }

    // -----------------------------------------------------------------------------------------
    // Requests

    #[test]
    fn a_plain_get_or_head_is_cached() {
        assert_eq!(get(&route(), &[]), Cache);
        assert_eq!(request(&route(), Method::HEAD, &[]), Cache);
    }

    #[test]
    fn a_route_without_cache_bypasses_everything() {
        let r = route_with(|r| r.cache = false);
        assert_eq!(get(&r, &[]), Bypass("route-not-cached"));
    }

    #[test]
    fn post_is_cached_only_when_the_route_keys_the_body() {
        assert_eq!(request(&route(), Method::POST, &[]), Bypass("method"));
        let r = route_with(|r| r.key.body = true);
        assert_eq!(request(&r, Method::POST, &[("content-length", "5")]), Cache);
        for method in [Method::PUT, Method::DELETE, Method::PATCH, Method::OPTIONS] {
            assert_eq!(request(&r, method, &[]), Bypass("method"));
        }
    }

    #[test]
    fn a_body_the_key_does_not_see_bypasses() {
        let r = route();
        assert_eq!(get(&r, &[("content-length", "12")]), Bypass("unkeyed-body"));
        assert_eq!(
            get(&r, &[("transfer-encoding", "chunked")]),
            Bypass("unkeyed-body")
        );
        assert_eq!(
            get(&r, &[("content-length", "junk")]),
            Bypass("unkeyed-body")
        );
        assert_eq!(get(&r, &[("content-length", "0")]), Cache);
    }

    #[test]
    fn upgrades_bypass() {
        assert_eq!(
            get(
                &route(),
                &[("connection", "upgrade"), ("upgrade", "websocket")]
            ),
            Bypass("upgrade")
        );
    }

    #[test]
    fn authorization_bypasses_unless_keyed() {
        assert_eq!(
            get(&route(), &[("authorization", "Bearer x")]),
            Bypass("authorization")
        );
        let keyed = route_with(|r| r.key.headers = vec![AUTHORIZATION]);
        assert_eq!(get(&keyed, &[("authorization", "Bearer x")]), Cache);
        let other = route_with(|r| r.key.headers = vec![ACCEPT]);
        assert_eq!(
            get(&other, &[("authorization", "Bearer x")]),
            Bypass("authorization")
        );
    }

    #[test]
    fn cookies_bypass_unless_every_one_is_keyed() {
        assert_eq!(get(&route(), &[("cookie", "lang=en")]), Bypass("cookie"));
        assert_eq!(get(&route(), &[("cookie", "")]), Bypass("cookie"));

        let r = route_with(|r| r.key.cookies = names(&["lang"]));
        assert_eq!(get(&r, &[("cookie", "lang=en")]), Cache);
        assert_eq!(
            get(&r, &[("cookie", "lang=en"), ("cookie", "lang=fr")]),
            Cache
        );
        assert_eq!(get(&r, &[("cookie", "")]), Cache);
        assert_eq!(
            get(&r, &[("cookie", "lang=en; session=s3cr3t")]),
            Bypass("cookie")
        );
        assert_eq!(
            get(&r, &[("cookie", "lang=en"), ("cookie", "sid=1")]),
            Bypass("cookie")
        );
        assert_eq!(get(&r, &[("cookie", "LANG=en")]), Bypass("cookie"));
        assert_eq!(
            get(&r, &[("cookie", "lang")]),
            Bypass("cookie"),
            "a nameless cookie"
        );
    }

    #[test]
    fn keying_the_whole_cookie_header_admits_any_cookie() {
        let r = route_with(|r| r.key.headers = vec![header::COOKIE]);
        assert_eq!(get(&r, &[("cookie", "session=s3cr3t; lang=en")]), Cache);
    }

    #[test]
    fn client_no_store_bypasses_when_the_route_honours_it() {
        let lines = [("cache-control", "max-age=0, No-Store")];
        assert_eq!(get(&route(), &lines), Bypass("client-no-store"));
        let r = route_with(|r| r.policy.honor_client_no_store = false);
        assert_eq!(get(&r, &lines), Cache);
        assert_eq!(get(&route(), &[("cache-control", "no-cache")]), Cache);
    }

    #[test]
    fn range_requests_bypass() {
        assert_eq!(get(&route(), &[("range", "bytes=0-99")]), Bypass("range"));
    }

    #[test]
    fn bypass_reasons_fit_in_a_cache_status_detail() {
        let reasons = [
            get(&route_with(|r| r.cache = false), &[]),
            request(&route(), Method::PUT, &[]),
            get(&route(), &[("upgrade", "h2c")]),
            get(&route(), &[("content-length", "1")]),
            get(&route(), &[("authorization", "x")]),
            get(&route(), &[("cookie", "a=1")]),
            get(&route(), &[("cache-control", "no-store")]),
            get(&route(), &[("range", "bytes=0-1")]),
        ];
        for verdict in reasons {
            let Bypass(reason) = verdict else {
                panic!("expected a bypass, got {verdict:?}")
            };
            assert!(
                reason.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'),
                "{reason}"
            );
        }
    }

    // -----------------------------------------------------------------------------------------
    // Responses: privacy

    #[test]
    fn set_cookie_is_never_shared() {
        assert_eq!(ok(&[("set-cookie", "sid=1")]), Pass("set-cookie"));
        let ignoring = route_with(|r| r.policy.honor_cache_control = false);
        assert_eq!(
            response(&ignoring, 200, &[("set-cookie", "sid=1")]),
            Pass("set-cookie")
        );
    }

    #[test]
    fn private_and_no_store_are_never_shared_even_when_cache_control_is_ignored() {
        let ignoring = route_with(|r| r.policy.honor_cache_control = false);
        for r in [route(), ignoring] {
            let v = |cc: &str| response(&r, 200, &[("cache-control", cc)]);
            assert_eq!(v("private"), Pass("private"));
            assert_eq!(v("PRIVATE, max-age=60"), Pass("private"));
            assert_eq!(
                v("private=\"set-cookie, x-user\", max-age=60"),
                Pass("private")
            );
            assert_eq!(v("no-store"), Pass("no-store"));
            assert_eq!(v("public, s-maxage=60, No-Store"), Pass("no-store"));
        }
    }

    #[test]
    fn privacy_directives_count_in_any_cache_control_header() {
        assert_eq!(
            ok(&[
                ("cache-control", "max-age=60"),
                ("cache-control", "private")
            ]),
            Pass("private")
        );
    }

    #[test]
    fn vary_star_is_never_shared() {
        assert_eq!(ok(&[("vary", "*")]), Pass("vary-star"));
        assert_eq!(
            ok(&[("vary", "accept"), ("vary", " * ")]),
            Pass("vary-star")
        );
    }

    #[test]
    fn vary_outside_the_key_is_never_shared() {
        assert_eq!(ok(&[("vary", "Accept")]), Pass("vary"));
        assert_eq!(ok(&[("vary", "accept-encoding")]), Pass("vary"));
        let r = route_with(|r| r.key.headers = vec![ACCEPT]);
        assert_eq!(response(&r, 200, &[("vary", "Accept")]), stored(60));
        assert_eq!(response(&r, 200, &[("vary", "accept, ,")]), stored(60));
        assert_eq!(
            response(&r, 200, &[("vary", "accept, accept-encoding")]),
            Pass("vary")
        );
        assert_eq!(
            response(&r, 200, &[("vary", "accept"), ("vary", "user-agent")]),
            Pass("vary")
        );
    }

    #[test]
    fn vary_on_what_the_key_reads_is_fine() {
        let cookies = route_with(|r| r.key.cookies = names(&["lang"]));
        assert_eq!(response(&cookies, 200, &[("vary", "Cookie")]), stored(60));
        let body = route_with(|r| r.key.body = true);
        assert_eq!(
            response(&body, 200, &[("vary", "content-type")]),
            stored(60)
        );
        assert_eq!(ok(&[("vary", "cookie")]), Pass("vary"));
    }

    // -----------------------------------------------------------------------------------------
    // Responses: status and freshness

    #[test]
    fn only_listed_statuses_are_stored() {
        assert_eq!(response(&route(), 404, &[]), stored(60));
        assert_eq!(response(&route(), 302, &[]), Pass("status"));
        assert_eq!(response(&route(), 206, &[]), Pass("status"));
    }

    #[test]
    fn without_directives_the_route_ttl_applies() {
        assert_eq!(ok(&[]), stored(60));
        assert_eq!(ok(&[("cache-control", "public")]), stored(60));
        assert_eq!(ok(&[("age", "30")]), stored(60));
    }

    #[test]
    fn max_age_sets_freshness() {
        assert_eq!(ok(&[("cache-control", "max-age=300")]), stored(300));
        assert_eq!(ok(&[("cache-control", "MAX-AGE = \"120\"")]), stored(120));
    }

    #[test]
    fn s_maxage_wins_over_max_age() {
        assert_eq!(
            ok(&[("cache-control", "max-age=10, s-maxage=300")]),
            stored(300)
        );
        assert_eq!(
            ok(&[("cache-control", "s-maxage=5, max-age=300")]),
            stored(5)
        );
    }

    #[test]
    fn invalid_ages_are_ignored() {
        assert_eq!(ok(&[("cache-control", "max-age=abc")]), stored(60));
        assert_eq!(ok(&[("cache-control", "max-age=-5")]), stored(60));
        assert_eq!(ok(&[("cache-control", "max-age")]), stored(60));
        assert_eq!(
            ok(&[("cache-control", "s-maxage=x, max-age=30")]),
            stored(30)
        );
        assert_eq!(
            ok(&[("cache-control", "max-age=30"), ("age", "junk")]),
            stored(30)
        );
    }

    #[test]
    fn a_repeated_max_age_takes_the_smaller() {
        assert_eq!(
            ok(&[("cache-control", "max-age=300, max-age=30")]),
            stored(30)
        );
    }

    #[test]
    fn the_upstream_age_is_subtracted() {
        assert_eq!(
            ok(&[("cache-control", "max-age=300"), ("age", "100")]),
            stored(200)
        );
        assert_eq!(
            ok(&[("cache-control", "max-age=300"), ("age", "500")]),
            Pass("zero-ttl")
        );
    }

    #[test]
    fn freshness_is_clamped_by_the_route() {
        let r = route_with(|r| {
            r.policy.min_ttl = secs(10);
            r.policy.max_ttl = secs(600);
        });
        let v = |lines: &[(&str, &str)]| response(&r, 200, lines);
        assert_eq!(v(&[("cache-control", "max-age=86400")]), stored(600));
        assert_eq!(v(&[("cache-control", "max-age=1")]), stored(10));
        assert_eq!(v(&[("cache-control", "max-age=0")]), stored(10));
        assert_eq!(
            v(&[("cache-control", "max-age=99999999999999999999999")]),
            stored(600)
        );
        assert_eq!(
            v(&[("cache-control", "max-age=100"), ("age", "95")]),
            stored(10)
        );
    }

    #[test]
    fn no_cache_passes_when_honoured() {
        assert_eq!(
            ok(&[("cache-control", "no-cache, max-age=60")]),
            Pass("no-cache")
        );
        assert_eq!(
            ok(&[("cache-control", "no-cache=\"x-foo\"")]),
            Pass("no-cache")
        );
    }

    #[test]
    fn expires_sets_freshness_from_the_date_header() {
        let at = |expires: &str| {
            ok(&[
                ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
                ("expires", expires),
            ])
        };
        assert_eq!(at("Sun, 06 Nov 1994 08:51:37 GMT"), stored(120));
        assert_eq!(at("Sunday, 06-Nov-94 08:51:37 GMT"), stored(120));
        assert_eq!(at("Sun, 06 Nov 1994 08:00:00 GMT"), Pass("zero-ttl"));
        assert_eq!(
            at("0"),
            Pass("zero-ttl"),
            "an invalid Expires is in the past"
        );
        assert_eq!(
            ok(&[
                ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
                ("expires", "Sun, 06 Nov 1994 08:51:37 GMT"),
                ("age", "20"),
            ]),
            stored(100)
        );
        assert_eq!(
            ok(&[
                ("cache-control", "max-age=30"),
                ("expires", "Sun, 06 Nov 1994 08:51:37 GMT"),
            ]),
            stored(30),
            "max-age wins over Expires"
        );
    }

    #[test]
    fn not_honouring_cache_control_uses_the_route_ttl() {
        let r = route_with(|r| r.policy.honor_cache_control = false);
        let v = |lines: &[(&str, &str)]| response(&r, 200, lines);
        assert_eq!(v(&[("cache-control", "max-age=5")]), stored(60));
        assert_eq!(v(&[("cache-control", "no-cache")]), stored(60));
        assert_eq!(v(&[("expires", "0")]), stored(60));
        assert_eq!(v(&[("cache-control", "private")]), Pass("private"));
    }

    #[test]
    fn a_zero_ttl_passes() {
        assert_eq!(ok(&[("cache-control", "max-age=0")]), Pass("zero-ttl"));
        let r = route_with(|r| r.policy.ttl = Duration::ZERO);
        assert_eq!(response(&r, 200, &[]), Pass("zero-ttl"));
    }

    #[test]
    fn crossed_clamps_never_panic_and_max_wins() {
        let r = route_with(|r| {
            r.policy.min_ttl = secs(100);
            r.policy.max_ttl = secs(50);
        });
        assert_eq!(
            response(&r, 200, &[("cache-control", "max-age=70")]),
            stored(50)
        );
    }

    #[test]
    fn an_error_ttl_stores_its_status_for_that_long() {
        let r = route_with(|r| {
            r.policy.error_ttl = [(404, secs(30)), (503, secs(2)), (429, secs(5))].into();
        });
        assert_eq!(response(&r, 404, &[]), stored(30));
        assert_eq!(
            response(&r, 404, &[("cache-control", "max-age=600")]),
            stored(30)
        );
        assert_eq!(response(&r, 503, &[]), stored(2));
        assert_eq!(response(&r, 429, &[]), stored(5), "not in cache_statuses");
        assert_eq!(response(&r, 410, &[]), stored(60), "not listed: as before");
        assert_eq!(
            response(&r, 404, &[("set-cookie", "a=1")]),
            Pass("set-cookie")
        );
        assert_eq!(
            response(&r, 503, &[("cache-control", "private")]),
            Pass("private")
        );
        assert_eq!(
            response(&r, 404, &[("cache-control", "no-store")]),
            Pass("no-store")
        );
        assert_eq!(response(&r, 404, &[("vary", "*")]), Pass("vary-star"));
    }

    #[test]
    fn jitter_cuts_the_ttl_by_at_most_its_percentage() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let ttl = secs(100);
        let draws: Vec<Duration> = (0..1000).map(|_| jittered(ttl, 10, &mut rng)).collect();
        for d in &draws {
            assert!(*d <= ttl && *d >= secs(90), "{d:?} outside [90s, 100s]");
        }
        let distinct: HashSet<Duration> = draws.iter().copied().collect();
        assert!(
            distinct.len() > 100,
            "only {} distinct TTLs",
            distinct.len()
        );
        assert!(draws.iter().any(|d| *d < secs(92)), "never near the bottom");
        assert!(draws.iter().any(|d| *d > secs(98)), "never near the top");

        assert_eq!(jittered(ttl, 0, &mut rng), ttl, "0% leaves it alone");
        for _ in 0..100 {
            let d = jittered(secs(1), 100, &mut rng);
            assert!(d >= Duration::from_millis(1) && d <= secs(1), "{d:?}");
        }
    }

    #[test]
    fn vary_honor_stores_what_varies_outside_the_key_as_variants() {
        use crate::config::VaryMode;
        let r = route_with(|r| {
            r.key.headers = vec![ACCEPT];
            r.policy.vary = VaryMode::Honor;
        });
        let lines = [("vary", "Accept, Accept-Language, x-a, accept-language")];
        assert_eq!(response(&r, 200, &lines), stored(60));
        let names = vary_outside_key(&r, &headers(&lines)).expect("readable names");
        assert_eq!(names, ["accept-language", "x-a"]);
        assert_eq!(response(&r, 200, &[("vary", "*")]), Pass("vary-star"));
        assert_eq!(response(&r, 200, &[("vary", "a b")]), Pass("vary"));
        assert_eq!(
            vary_outside_key(&r, &headers(&[("vary", "accept")])),
            Some(vec![])
        );
        assert_eq!(
            response(&r, 200, &[("vary", "x-a"), ("set-cookie", "s=1")]),
            Pass("set-cookie")
        );
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
                "if-none-match",
                "user-agent",
                "via",
                "x-forwarded-proto"
            ]
        );
        assert_eq!(out["x-forwarded-proto"], "https");
        assert_eq!(out["via"], "1.1 corral");
    }

    // -----------------------------------------------------------------------------------------
    // Cache-Control parsing

    #[test]
    fn cache_control_parses_tokens_and_values() {
        let cc = CacheControl::parse("Public, MAX-AGE=60,, s-maxage = 30 ,no-transform");
        assert!(cc.has("public"));
        assert!(cc.has("no-transform"));
        assert_eq!(cc.value("max-age"), Some("60"));
        assert_eq!(cc.seconds("s-maxage"), Some(secs(30)));
        assert!(!cc.has("private"));
    }

    #[test]
    fn cache_control_quoted_values_may_hold_commas_and_escapes() {
        let cc = CacheControl::parse(r#"private="set-cookie, x-a", no-cache="a\"b", max-age=5"#);
        assert_eq!(cc.value("private"), Some("set-cookie, x-a"));
        assert_eq!(cc.value("no-cache"), Some("a\"b"));
        assert_eq!(cc.seconds("max-age"), Some(secs(5)));
        assert!(!cc.has("x-a"), "a quoted comma does not start a directive");
    }

    #[test]
    fn cache_control_survives_junk() {
        for junk in [
            "",
            ",",
            " , ,",
            "=",
            "=5",
            "max-age=\"",
            "\"",
            "a=\"b",
            "\u{1F600}",
        ] {
            let cc = CacheControl::parse(junk);
            assert_eq!(cc.seconds("max-age"), None, "{junk:?}");
        }
        let cc = CacheControl::parse("max-age=\"60\"junk, private");
        assert_eq!(cc.seconds("max-age"), Some(secs(60)));
        assert!(cc.has("private"));
    }

    #[test]
    fn cache_control_combines_headers() {
        let cc = CacheControl::from_headers(&headers(&[
            ("cache-control", "public"),
            ("cache-control", "max-age=9"),
        ]));
        assert!(cc.has("public"));
        assert_eq!(cc.seconds("max-age"), Some(secs(9)));
    }

    #[test]
    fn delta_seconds_is_strict_digits_and_saturates() {
        assert_eq!(delta_seconds("0"), Some(Duration::ZERO));
        assert_eq!(delta_seconds("120"), Some(secs(120)));
        assert_eq!(
            delta_seconds("99999999999999999999999"),
            Some(secs(u64::MAX))
        );
        for bad in ["", "+5", "-5", "5s", "1.5", " 5"] {
            assert_eq!(delta_seconds(bad), None, "{bad:?}");
        }
    }

    // -----------------------------------------------------------------------------------------
    // Hop-by-hop

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

    // -----------------------------------------------------------------------------------------
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
            ["accept", "via", "x-forwarded-proto"],
            "{out:?}"
        );
        assert_eq!(out["accept"], "application/json");
        assert_eq!(out["x-forwarded-proto"], "https");
        assert_eq!(out["via"], "1.1 corral");
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
}
