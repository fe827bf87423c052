//! What may be cached, for how long, and what may be shared (docs/design.md, "HTTP caching rules").
//!
//! Safe by default: privacy outranks speed. A response with `Set-Cookie`, `Cache-Control: private`
//! or `no-store` (unless `must-understand` stands beside it for a status the route caches, RFC
//! 9111 section 5.2.2.3) is never stored and never shared; a request carrying `Authorization`, or
//! a `Cookie` the route neither keys on nor strips, is never answered from, or into, the cache.
//!
//! A route's `semantics` picks corral's defaults (`coalescing`) or a standard RFC 9111 shared
//! cache (`rfc9111`); docs/caching.md has the rules side by side.

use std::time::{Duration, SystemTime};

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode};

use super::cache_control::{
    CDN_CACHE_CONTROL, CORRAL_CACHE_CONTROL, CacheControl, comma_list, delta_seconds,
};
use super::key::{cookies_shareable, in_key, keys_header};
use crate::config::{Route, Semantics, VaryMode};
use crate::engine::ExpiryMode;

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
    /// Store it and share it, fresh for `ttl` (zero: revalidated on every use).
    Store { ttl: Duration },
    /// Never store, never share (GIVEUP + hit-for-pass); the reason goes into `detail=`.
    Pass(&'static str),
}

/// Decides whether a request may use the cache on `route`.
///
/// Bypass reasons, checked in this order: `route-not-cached`, `method` (GET and HEAD; POST only
/// when the route keys on the body), `upgrade` (WebSocket and friends), `unkeyed-body` (a body on a
/// route that does not key on it, e.g. a GET with a search body), `authorization`, `cookie`,
/// `client-no-store` (always on a `semantics: rfc9111` route) and `client-no-cache` (a
/// `semantics: rfc9111` route only: `Cache-Control: no-cache` or `Pragma: no-cache`, RFC 9111
/// sections 5.2.1.4 and 5.4). A `Range` is no reason: its ranges are cut from the whole stored
/// answer (see [`super::range`]).
///
/// The `cookie` check passes when every cookie is keyed or stripped by the route's `cookies:`.
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
    if headers.contains_key(header::COOKIE) && !cookies_shareable(route, headers) {
        return Bypass("cookie");
    }
    let standard = route.policy.semantics == Semantics::Rfc9111;
    let asked = CacheControl::from_headers(headers);
    if (route.policy.honor_client_no_store || standard) && asked.has("no-store") {
        return Bypass("client-no-store");
    }
    if standard && (asked.has("no-cache") || pragma_no_cache(&asked, headers)) {
        return Bypass("client-no-cache");
    }
    Cache
}

/// `Pragma: no-cache` where no `Cache-Control` is sent (RFC 9111 section 5.4).
fn pragma_no_cache(asked: &CacheControl, headers: &HeaderMap) -> bool {
    asked.is_empty() && comma_list(headers, &header::PRAGMA).any(|item| item == b"no-cache")
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

// ---------------------------------------------------------------------------------------------
// Responses

/// Decides what may happen to an upstream response on `route` (a 5xx once
/// [`shared_failure`] said it is not a failure for everyone).
///
/// Pass reasons, checked in this order: `set-cookie`, `private` (with or without field names),
/// `must-understand` (with it, a status outside `cache_statuses`), `no-store` (ignored beside
/// `must-understand` for a status in `cache_statuses`, RFC 9111 section 5.2.2.3, when the route
/// honours `Cache-Control`), `vary-star`, `vary` (names a request header outside the key that the
/// route does not make variants of), `status` (not in the route's `cache_statuses`; a `206`
/// always), then `no-freshness` (a `semantics: rfc9111` route, and the upstream gave none nor a
/// validator).
///
/// When the route honours `Cache-Control`, a `no-cache` answer (with or without field names: the
/// whole answer is revalidated) is stored with no freshness, and so is one whose lifetime is zero
/// (`max-age=0`): each use revalidates it with the upstream, once for the whole deployment.
///
/// Where the directives come from: see `directives`. `private` and `no-store` are obeyed in
/// `Cache-Control` even when a targeted field gives the freshness.
///
/// `Accept-Encoding` in `Vary` never counts: corral owns content encoding on cacheable fetches
/// ([`super::encoding`]). Other names outside the key make variants when the route forwards them
/// (`forward_headers` marked `unkeyed`), or any readable name with `vary: honor` or `semantics:
/// rfc9111` (`stores_variants`): the caller must then store the response as a variant of
/// [`vary_outside_key`]'s names.
///
/// A status listed in the route's `error_ttl` is stored for exactly that long once the privacy
/// and `Vary` checks pass, whatever `cache_statuses` and the upstream's freshness say.
///
/// Freshness when the route honours `Cache-Control`: `s-maxage`, else `max-age`, else `Expires`
/// minus `Date`, else the route's heuristic (`heuristic_freshness`); less the upstream's `Age`;
/// clamped to `[min_ttl, max_ttl]` (`max_ttl` wins should they cross; a `semantics: rfc9111`
/// route has no `min_ttl` floor). Without any of those, or when the route does not honour them,
/// the route's `ttl` (a `semantics: rfc9111` route stores nothing without freshness).
pub fn response_verdict(route: &Route, status: StatusCode, headers: &HeaderMap) -> ResponseVerdict {
    use ResponseVerdict::{Pass, Store};

    if headers.contains_key(header::SET_COOKIE) {
        return Pass("set-cookie");
    }
    let (cc, targeted) = directives(route, headers);
    let cache_control = targeted.then(|| CacheControl::from_headers(headers));
    let said = |name| cc.has(name) || cache_control.as_ref().is_some_and(|c| c.has(name));
    if said("private") {
        return Pass("private");
    }
    let understood = route.policy.cache_statuses.contains(&status.as_u16());
    let must_understand = route.policy.honor_cache_control && said("must-understand");
    if must_understand && !understood {
        return Pass("must-understand");
    }
    if said("no-store") && !must_understand {
        return Pass("no-store");
    }
    match vary(route, headers) {
        Vary::Star => return Pass("vary-star"),
        // The caller stores it as a variant of the names outside the key.
        Vary::OutsideKey if makes_variants(route, headers) => {}
        Vary::OutsideKey => return Pass("vary"),
        Vary::WithinKey => {}
    }
    // A part of a representation is never stored, whatever the route lists: ranges are cut from
    // a whole answer.
    if status == StatusCode::PARTIAL_CONTENT {
        return Pass("status");
    }
    if let Some(ttl) = route.policy.error_ttl.get(&status.as_u16()) {
        return Store { ttl: *ttl };
    }
    if !route.policy.cache_statuses.contains(&status.as_u16()) {
        return Pass("status");
    }
    let ttl = if route.policy.honor_cache_control {
        if cc.has("no-cache") {
            return Store {
                ttl: Duration::ZERO,
            };
        }
        let lifetime = upstream_freshness(&cc, targeted, headers)
            .or_else(|| heuristic_freshness(route, status, &cc, headers));
        let floor = match route.policy.semantics {
            Semantics::Coalescing => route.policy.min_ttl,
            Semantics::Rfc9111 => Duration::ZERO,
        };
        match lifetime {
            Some(lifetime) => lifetime
                .saturating_sub(age(headers))
                .max(floor)
                .min(route.policy.max_ttl),
            // Stale from the start (RFC 9111 section 4.2): worth storing only to revalidate.
            None if route.policy.semantics == Semantics::Rfc9111 => {
                if !headers.contains_key(header::ETAG)
                    && !headers.contains_key(header::LAST_MODIFIED)
                {
                    return Pass("no-freshness");
                }
                Duration::ZERO
            }
            None => route.policy.ttl,
        }
    } else {
        route.policy.ttl
    };
    Store { ttl }
}

/// Whether an upstream 5xx is a failure for every request waiting on its fetch (each gets it,
/// nothing is stored) rather than an answer to judge with [`response_verdict`]: unless the
/// route gives its status an `error_ttl`, or lists it in `cache_statuses` and the upstream gave
/// it explicit freshness above zero (`s-maxage`, `max-age`, `Expires`): a zero one would make
/// it a pass, and a moment's outage would keep the key from the cache for `pass_ttl`. 501,
/// heuristically cacheable (RFC 9110 section 15.1), needs none.
pub fn shared_failure(route: &Route, status: StatusCode, headers: &HeaderMap) -> bool {
    let code = status.as_u16();
    if !status.is_server_error() || route.policy.error_ttl.contains_key(&code) {
        return false;
    }
    if !route.policy.cache_statuses.contains(&code) {
        return true;
    }
    let (cc, targeted) = directives(route, headers);
    code != 501 && upstream_freshness(&cc, targeted, headers).is_none_or(|l| l.is_zero())
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

/// Whether the route stores an answer that varies outside its key as a variant (`vary: honor`,
/// and a `semantics: rfc9111` route, which honours `Vary` as a standard cache does); such a
/// route's shared fetches also carry the client's end-to-end headers, since an upstream can only
/// vary on what it is sent.
pub(crate) fn stores_variants(route: &Route) -> bool {
    route.policy.vary == VaryMode::Honor || route.policy.semantics == Semantics::Rfc9111
}

/// The request headers a response's `Vary` names outside the route's key, sorted and without
/// repeats (empty when it names none); `None` for `Vary: *` or a name that is not a header name,
/// which no key can stand for.
pub fn vary_outside_key(route: &Route, headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names = Vec::new();
    for name in comma_list(headers, &header::VARY) {
        let name = HeaderName::from_bytes(&name).ok()?;
        if !in_key(route, &name) && name != header::ACCEPT_ENCODING {
            names.push(name);
        }
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    Some(names)
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
/// The directives are read where `directives` says.
///
/// A route with sliding expiry has no stale windows: its entries never go stale.
pub fn stale_windows(route: &Route, headers: &HeaderMap) -> StaleWindows {
    if matches!(route.policy.expiry, ExpiryMode::Sliding { .. }) {
        return StaleWindows::default();
    }
    let (cc, _) = directives(route, headers);
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

/// Whether the route stores a response whose `Vary` names these headers outside its key as
/// variants: every name with `vary: honor`, else only names it forwards unkeyed (the upstream saw
/// them; one it was never sent cannot have shaped the answer, but its `Vary` still says so).
fn makes_variants(route: &Route, headers: &HeaderMap) -> bool {
    match vary_outside_key(route, headers) {
        None => false,
        Some(_) if stores_variants(route) => true,
        Some(names) => names
            .iter()
            .all(|name| route.forward_unkeyed.contains(name)),
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
            Ok(name) if in_key(route, &name) || name == header::ACCEPT_ENCODING => {}
            _ => verdict = Vary::OutsideKey,
        }
    }
    verdict
}

/// The directives corral's freshness and storability are read from, and whether they come from
/// a targeted field (RFC 9213): when the route honours `Cache-Control`, the first of
/// `Corral-Cache-Control` (targeted at corral alone) and `CDN-Cache-Control` that holds any
/// directive is used instead of `Cache-Control` (and `Expires`); else `Cache-Control`.
fn directives(route: &Route, headers: &HeaderMap) -> (CacheControl, bool) {
    if route.policy.honor_cache_control {
        for name in [&CORRAL_CACHE_CONTROL, &CDN_CACHE_CONTROL] {
            let cc = CacheControl::from_field(headers, name);
            if !cc.is_empty() {
                return (cc, true);
            }
        }
    }
    (CacheControl::from_headers(headers), false)
}

/// What the upstream says the response's freshness lifetime is, before `Age`: `s-maxage` (corral
/// is a shared cache), else `max-age`, else, unless the directives came from a targeted field
/// (RFC 9213 section 2.1 has `Expires` ignored then), `Expires` minus `Date`: an `Expires` that
/// is not an HTTP-date (`0`, garbage) means "already expired" (RFC 9111 section 5.3), and a
/// missing or unreadable `Date` is the time the answer arrived.
fn upstream_freshness(cc: &CacheControl, targeted: bool, headers: &HeaderMap) -> Option<Duration> {
    if let Some(lifetime) = cc.seconds("s-maxage").or_else(|| cc.seconds("max-age")) {
        return Some(lifetime);
    }
    if targeted {
        return None;
    }
    let expires = headers.get(header::EXPIRES)?;
    let Some(expires) = http_date(expires) else {
        return Some(Duration::ZERO);
    };
    Some(
        expires
            .duration_since(date(headers))
            .unwrap_or(Duration::ZERO),
    )
}

/// Statuses RFC 9110 (section 15.1) makes heuristically cacheable.
const HEURISTIC_STATUSES: [u16; 12] = [200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501];

/// Heuristic freshness (RFC 9111 section 4.2.2) for an answer without explicit freshness: the
/// route's `heuristic` percentage of the time from `Last-Modified` to `Date`, at most
/// `heuristic_max`; only for a heuristically cacheable status or an answer marked `public`, and
/// only with a valid `Last-Modified` not later than `Date`.
fn heuristic_freshness(
    route: &Route,
    status: StatusCode,
    cc: &CacheControl,
    headers: &HeaderMap,
) -> Option<Duration> {
    let percent = route.policy.heuristic;
    if percent == 0 || !(HEURISTIC_STATUSES.contains(&status.as_u16()) || cc.has("public")) {
        return None;
    }
    let modified = http_date(headers.get(header::LAST_MODIFIED)?)?;
    let since = date(headers).duration_since(modified).ok()?;
    Some(
        since
            .mul_f64(f64::from(percent.min(100)) / 100.0)
            .min(route.policy.heuristic_max),
    )
}

/// The answer's `Date`, or now (when it arrived) when it has none or an unreadable one.
fn date(headers: &HeaderMap) -> SystemTime {
    headers
        .get(header::DATE)
        .and_then(http_date)
        .unwrap_or_else(SystemTime::now)
}

fn http_date(value: &HeaderValue) -> Option<SystemTime> {
    httpdate::parse_http_date(value.to_str().ok()?.trim()).ok()
}

/// The upstream's `Age` (RFC 9111 section 5.1): the first member of the field, whether the
/// members come as a list on one line or on several lines; zero when there is none or that
/// member is not delta-seconds (the field is then ignored).
fn age(headers: &HeaderMap) -> Duration {
    first_age(
        headers
            .get_all(header::AGE)
            .iter()
            .map(HeaderValue::as_bytes),
    )
    .unwrap_or(Duration::ZERO)
}

/// The first member of an `Age` field given as its lines, if it is valid delta-seconds.
pub(crate) fn first_age<'v>(mut lines: impl Iterator<Item = &'v [u8]>) -> Option<Duration> {
    let first = lines.next()?;
    let member = first.split(|&b| b == b',').next()?;
    delta_seconds(std::str::from_utf8(member).ok()?.trim())
}

/// Rewrites the upstream's `Age` to the answer's age when it arrived (RFC 9111 section 4.2.3's
/// corrected initial age: the upstream's own `Age` plus the time its answer took): freshness is
/// reckoned from it, and every answer served from the entry adds its time in the cache to it.
/// No `Age` line stays when both are under a second.
pub fn correct_age(headers: &mut HeaderMap, response_delay: Duration) {
    let corrected = age(headers)
        .as_secs()
        .saturating_add(response_delay.as_secs());
    if corrected == 0 {
        headers.remove(header::AGE);
    } else {
        headers.insert(header::AGE, HeaderValue::from(corrected));
    }
}

#[cfg(test)]
mod tests;
