//! An HTTP request → its key, under its route's rules; the parts of a request that key reads.

use std::borrow::Cow;

use http::header::{self, HeaderName};

use super::hop_by_hop::{connection_named, is_hop_by_hop};
use crate::config::{CookieMode, QueryRule, Route};
use crate::key::{Key, KeyBuilder, KeyHash, key_with_generation};

/// The key of one HTTP request under its route's rules, with the parts that went into it (for
/// `explain`, in order).
#[derive(Clone, Debug)]
pub struct RequestKey {
    pub key: Key,
    /// `(what, value)` pairs, e.g. `("route", "reports")`, `("query", "a=1&b=2")`,
    /// `("header accept", "application/json")`, `("cookie session", "<absent>")`. Owned where the
    /// label names a header or cookie from the config.
    pub parts: Vec<(Cow<'static, str>, String)>,
}

/// Tags the canonical form of request keys, so a change to it never reads old entries, and so a
/// request key can never equal a dictionary key (whose first part is "dictionary").
const REQUEST_KEY_VERSION: &str = "corral/request/1";

/// `key` as keyed under generation `generation` of its route (see `engine::generations`).
/// Generation 0 is the key itself, so entries stored before a route's first whole-route purge stay
/// readable; any other generation appends itself as one more part and rehashes.
pub fn with_generation(key: RequestKey, generation: u64) -> RequestKey {
    if generation == 0 {
        return key;
    }
    let RequestKey { key, mut parts } = key;
    parts.push(("generation".into(), generation.to_string()));
    RequestKey {
        key: key_with_generation(key, generation),
        parts,
    }
}

/// What `explain` shows for an absent header, cookie or body.
const ABSENT: &str = "<absent>";

/// Headers that say how to read a request body. They change what the upstream makes of the same
/// bytes, so a route that keys on the body keys on them too (and they are the only unkeyed headers
/// forwarded with a cacheable request: see [`super::forward::forward_headers`]).
pub const BODY_HEADERS: [HeaderName; 2] = [header::CONTENT_TYPE, header::CONTENT_ENCODING];

/// Builds the canonical key of a request: route name, method, path, the query parameters the route
/// keeps (sorted), the headers and cookies it names (absent ones included as absent, so "missing"
/// and "empty" differ), and the body's BLAKE3 digest when the route keys on the body.
///
/// The key is made of what the upstream will see. Nothing is decoded or normalised in a way that
/// could make two distinct resources one:
///
/// - The path is the raw path as received: `/a%2Fb` and `/a/b` differ, so do `/A` and `/a`.
/// - The query is split on `&` into raw segments (`name`, `name=`, `name=value`), never decoded;
///   empty segments are skipped. `a` (no `=`) and `a=` differ. The segments the rule keeps are
///   stably sorted by name, so parameters with different names may come in any order, while the
///   values of one repeated name keep the order they came in: `a=1&a=2` and `a=2&a=1` differ,
///   because upstreams read repeated parameters as "first wins", "last wins" or an ordered list.
///   Names are compared after percent-decoding and ASCII lowercasing for sorting and for the
///   include/exclude lists, so that `%61=1` or `A=1` cannot sneak a value past `include: [a]` to
///   an upstream that decodes names or ignores their case. A segment containing `;` is always kept
///   and then nothing is reordered (some upstreams also split on `;`).
/// - Each named header contributes all its values, each length-prefixed, in order; an absent header
///   differs from an empty one, and one line `a, b` differs from two lines `a` and `b`.
/// - Each named cookie contributes every value it has in the `Cookie` headers, in order; an absent
///   cookie differs from an empty one.
/// - Headers named in `Connection` are removed before forwarding, so they count as absent here.
/// - With a body key, [`BODY_HEADERS`] are keyed too, then the body's digest, or a distinct
///   "no body" marker when there is none (`None` differs from an empty body).
pub fn request_key(
    route: &Route,
    method: &http::Method,
    uri: &http::Uri,
    headers: &http::HeaderMap,
    body: Option<&[u8]>,
) -> RequestKey {
    let mut parts = Vec::new();
    let kept = query_segments(&route.key.query, uri.query().unwrap_or(""));
    let key = build_request_key(route, method, uri, &kept, headers, body, Some(&mut parts));
    RequestKey { key, parts }
}

/// The key of [`request_key`] without the parts `explain` shows: the request path needs only the
/// digest, and a readable copy of every part costs more than hashing them.
pub fn request_digest(
    route: &Route,
    method: &http::Method,
    uri: &http::Uri,
    headers: &http::HeaderMap,
    body: Option<&[u8]>,
) -> Key {
    request_digest_and_query(route, method, uri, headers, body).0
}

/// [`request_digest`] and, from the same parsing of the query, [`forwarded_query`].
pub fn request_digest_and_query(
    route: &Route,
    method: &http::Method,
    uri: &http::Uri,
    headers: &http::HeaderMap,
    body: Option<&[u8]>,
) -> (Key, Option<String>) {
    let kept = query_segments(&route.key.query, uri.query().unwrap_or(""));
    let key = build_request_key(route, method, uri, &kept, headers, body, None);
    (key, (!kept.is_empty()).then(|| kept.join("&")))
}

/// The method a request is keyed and fetched as: a HEAD as a GET, so that it is answered from the
/// GET's entry (the same header fields, RFC 9110 section 9.3.2) and a HEAD on a miss fills the
/// entry both use, coalesced with the GETs of the same key.
pub fn keyed_method(method: &http::Method) -> &http::Method {
    if *method == http::Method::HEAD {
        &http::Method::GET
    } else {
        method
    }
}

/// [`request_key`]'s work on the query segments the route keeps (`kept`, from
/// [`query_segments`]); `parts`, when given, receives what `explain` shows.
fn build_request_key(
    route: &Route,
    method: &http::Method,
    uri: &http::Uri,
    kept: &[&str],
    headers: &http::HeaderMap,
    body: Option<&[u8]>,
    mut parts: Option<&mut Vec<(Cow<'static, str>, String)>>,
) -> Key {
    // Room for a typical key up front.
    let mut builder = KeyBuilder::with_capacity(512);
    let hop_by_hop = connection_named(headers);
    let visible = |name: &HeaderName| !is_hop_by_hop(name, &hop_by_hop);
    // Only `explain` reads the parts, so they are made only when asked for.
    let mut show_part = |what: Cow<'static, str>, value: &dyn Fn() -> String| {
        if let Some(parts) = parts.as_deref_mut() {
            parts.push((what, value()));
        }
    };

    builder.push(REQUEST_KEY_VERSION.as_bytes());
    builder.push(route.name.as_bytes());
    show_part("route".into(), &|| route.name.clone());
    let method = keyed_method(method);
    builder.push(method.as_str().as_bytes());
    show_part("method".into(), &|| method.as_str().to_owned());
    builder.push(uri.path().as_bytes());
    show_part("path".into(), &|| uri.path().to_owned());

    let kept_bytes: Vec<&[u8]> = kept.iter().map(|s| s.as_bytes()).collect();
    builder.push_framed(&kept_bytes);
    show_part("query".into(), &|| match route.key.query {
        QueryRule::None => "<not keyed>".to_owned(),
        _ => kept.join("&"),
    });

    let mut key_header = |builder: &mut KeyBuilder, name: &HeaderName| {
        let values: Vec<&[u8]> = if visible(name) {
            headers.get_all(name).iter().map(|v| v.as_bytes()).collect()
        } else {
            Vec::new()
        };
        builder.push(name.as_str().as_bytes());
        builder.push_presence(&values);
        show_part(format!("header {name}").into(), &|| show(&values));
    };
    for name in &route.key.headers {
        key_header(&mut builder, name);
    }
    if route.key.body {
        for name in BODY_HEADERS
            .iter()
            .filter(|n| !route.key.headers.contains(n))
        {
            key_header(&mut builder, name);
        }
    }

    let cookies = if visible(&header::COOKIE) {
        request_cookies(headers)
    } else {
        Vec::new()
    };
    for name in &route.key.cookies {
        let values: Vec<&[u8]> = cookies
            .iter()
            .filter(|c| c.name == name.as_bytes())
            .map(|c| c.value)
            .collect();
        builder.push(name.as_bytes());
        builder.push_presence(&values);
        show_part(format!("cookie {name}").into(), &|| show(&values));
    }

    if route.key.body {
        match body {
            Some(body) => {
                let digest = blake3::hash(body);
                let mut part = vec![1u8];
                part.extend_from_slice(digest.as_bytes());
                builder.push(&part);
                show_part("body".into(), &|| format!("blake3:{}", digest.to_hex()));
            }
            None => {
                builder.push(&[0u8]);
                show_part("body".into(), &|| ABSENT.to_owned());
            }
        }
    }

    builder.finish()
}

/// Tags the canonical form of variant keys (see [`variant_key`]).
const VARIANT_KEY_VERSION: &str = "corral/variant/2";

/// Request headers whose values are case-insensitive (media ranges, charsets and language tags,
/// with their parameter names and quality values): their variants are keyed lowercase.
const CASELESS_VALUES: [HeaderName; 3] = [
    header::ACCEPT,
    header::ACCEPT_CHARSET,
    header::ACCEPT_LANGUAGE,
];

/// Request headers whose list order means nothing (preference is the quality value's): their
/// variants are keyed with the elements sorted. Not `Accept-Language`, whose order some servers
/// read as a preference among equal qualities (RFC 9110 section 12.5.4).
const UNORDERED_VALUES: [HeaderName; 2] = [header::ACCEPT, header::ACCEPT_CHARSET];

/// One element of a list header as its variant is keyed: whitespace around it and around its
/// `;` parameters and their `=` removed, lowercase where the header is case-insensitive.
fn variant_element(name: &HeaderName, element: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(element.len());
    for (i, parameter) in element.split(|b| *b == b';').enumerate() {
        if i > 0 {
            out.push(b';');
        }
        match parameter.iter().position(|b| *b == b'=') {
            Some(at) => {
                out.extend_from_slice(parameter[..at].trim_ascii());
                out.push(b'=');
                out.extend_from_slice(parameter[at + 1..].trim_ascii());
            }
            None => out.extend_from_slice(parameter.trim_ascii()),
        }
    }
    if CASELESS_VALUES.contains(name) {
        out.make_ascii_lowercase();
    }
    out
}

/// The key of one variant of a response that varies on request headers outside its route's key
/// (`vary: honor`): the primary key's digest, the id of the marker stored there, then each of
/// `names` (lowercase, sorted) with the request's values for it.
///
/// The marker's id makes the variants belong to one marker: when the marker goes (purged, or
/// expired), its variants can no longer be reached and the next marker starts afresh, so no old
/// variant outlives the entry it hangs from.
///
/// Values are normalised only in ways that cannot change their meaning (RFC 9111 §4.1): every
/// line of the header is split on commas, whitespace around each element and its `;` parameters
/// is trimmed, and empty elements are dropped, so `a, b`, `a,b` and two lines `a` and `b` are one
/// variant. `Accept`, `Accept-Charset` and `Accept-Language` are compared lowercase, and the
/// elements of `Accept` and `Accept-Charset` in sorted order, as their order means nothing. An
/// absent header differs from an empty one. A header named in `Connection` counts as absent, as
/// it is never forwarded.
pub fn variant_key(
    primary: &KeyHash,
    marker: &str,
    names: &[HeaderName],
    headers: &http::HeaderMap,
) -> Key {
    let hop_by_hop = connection_named(headers);
    let mut builder = KeyBuilder::new();
    builder.push(VARIANT_KEY_VERSION.as_bytes());
    builder.push(primary.as_bytes());
    builder.push(marker.as_bytes());
    for name in names {
        builder.push(name.as_str().as_bytes());
        let present = headers.contains_key(name) && !is_hop_by_hop(name, &hop_by_hop);
        let mut elements: Vec<Vec<u8>> = headers
            .get_all(name)
            .iter()
            .filter(|_| present)
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|e| !e.is_empty())
            .map(|element| variant_element(name, element))
            .collect();
        if UNORDERED_VALUES.contains(name) {
            elements.sort_unstable();
        }
        let mut part = vec![u8::from(present)];
        part.extend(frame(elements.iter().map(Vec::as_slice)));
        builder.push(&part);
    }
    builder.finish()
}

/// The query string to send upstream with a cacheable request: exactly the segments the key kept,
/// in key order, or `None` when it kept none. A parameter the key ignores must not reach the
/// upstream, or it could shape an answer shared with clients who sent another value (or none);
/// and sending the key's own order makes the upstream's answer a function of the key alone.
pub fn forwarded_query(rule: &QueryRule, uri: &http::Uri) -> Option<String> {
    let kept = query_segments(rule, uri.query()?);
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// One `name=value` pair of a `Cookie` header, as raw bytes (names are case-sensitive).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CookiePair<'a> {
    /// Trimmed; empty for a pair without `=` (browsers read `foo` as a nameless cookie).
    pub name: &'a [u8],
    /// Trimmed, quotes kept.
    pub value: &'a [u8],
}

/// Every cookie in the request's `Cookie` headers, in order (`;`-separated, empty pairs skipped).
pub fn request_cookies(headers: &http::HeaderMap) -> Vec<CookiePair<'_>> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .map(<[u8]>::trim_ascii)
        .filter(|raw| !raw.is_empty())
        .map(|raw| match raw.iter().position(|b| *b == b'=') {
            Some(eq) => CookiePair {
                name: raw[..eq].trim_ascii(),
                value: raw[eq + 1..].trim_ascii(),
            },
            None => CookiePair {
                name: b"",
                value: raw,
            },
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Query parameters

/// The raw `&`-separated segments of `query` that `rule` keeps, in key order.
fn query_segments<'q>(rule: &QueryRule, query: &'q str) -> Vec<&'q str> {
    let mut kept: Vec<&str> = query
        .split('&')
        .filter(|s| !s.is_empty())
        .filter(|s| keeps(rule, s))
        .collect();
    if kept.len() > 1 && !kept.iter().any(|s| s.contains(';')) {
        // Stable: the values of one name keep their order.
        kept.sort_by_cached_key(|s| sort_name(s));
    }
    kept
}

/// Whether `rule` keeps `segment` in the key. When in doubt, keep it: a needless key part costs a
/// cache hit, a missing one can hand one request's answer to another.
fn keeps(rule: &QueryRule, segment: &str) -> bool {
    let raw = raw_name(segment);
    match rule {
        QueryRule::All => true,
        QueryRule::None => false,
        QueryRule::Include(names) => {
            let decoded = form_decode(raw);
            segment.contains(';')
                || names
                    .iter()
                    .any(|n| n.eq_ignore_ascii_case(raw) || n.eq_ignore_ascii_case(&decoded))
        }
        QueryRule::Exclude(names) => {
            let decoded = form_decode(raw);
            segment.contains(';')
                || !names.iter().any(|n| n == raw)
                || !names.iter().any(|n| *n == *decoded)
        }
    }
}

/// The name of a query segment, undecoded: everything before the first `=`.
fn raw_name(segment: &str) -> &str {
    segment.split_once('=').map_or(segment, |(name, _)| name)
}

/// The name a segment sorts by: decoded and lowercased, so that reordering `a` and `%61` or `a`
/// and `A` (the same name to some upstreams) changes the key.
fn sort_name(segment: &str) -> Cow<'_, str> {
    match form_decode(raw_name(segment)) {
        Cow::Borrowed(name) if !name.bytes().any(|b| b.is_ascii_uppercase()) => Cow::Borrowed(name),
        name => Cow::Owned(name.to_ascii_lowercase()),
    }
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte; a malformed `%`
/// stays as it is, and bytes that are not UTF-8 become U+FFFD. Text with neither `+` nor `%`
/// (nearly every parameter name) is its own decoding, and is not copied.
fn form_decode(text: &str) -> Cow<'_, str> {
    if !text.bytes().any(|b| b == b'+' || b == b'%') {
        return Cow::Borrowed(text);
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => match (hex_digit(bytes.get(i + 1)), hex_digit(bytes.get(i + 2))) {
                (Some(high), Some(low)) => {
                    out.push(high << 4 | low);
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            },
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn hex_digit(byte: Option<&u8>) -> Option<u8> {
    byte.and_then(|b| (*b as char).to_digit(16))
        .map(|d| d as u8)
}

// ---------------------------------------------------------------------------------------------
// Canonical encoding helpers

/// Length-prefixes each item (as [`KeyBuilder::push`] does), so a list is one unambiguous part.
fn frame<'a>(items: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for item in items {
        out.extend_from_slice(&(item.len() as u64).to_be_bytes());
        out.extend_from_slice(item);
    }
    out
}

/// `0` for absent, or `1` followed by the framed values: absent never equals empty.
/// ([`KeyBuilder::push_presence`] writes the same bytes in place; this is what it is checked
/// against.)
#[cfg(test)]
fn presence(values: &[&[u8]]) -> Vec<u8> {
    if values.is_empty() {
        vec![0]
    } else {
        let mut out = vec![1];
        out.extend(frame(values.iter().copied()));
        out
    }
}

/// How `explain` shows a header's or cookie's values.
fn show(values: &[&[u8]]) -> String {
    if values.is_empty() {
        return ABSENT.to_owned();
    }
    values
        .iter()
        .map(|v| String::from_utf8_lossy(v))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether a request with these cookies may share the cache: the whole `Cookie` header is
/// keyed, or every cookie is either one the route keys on or one its `cookies:` setting strips
/// from the shared fetch (all of them with `strip`).
pub(crate) fn cookies_shareable(route: &Route, headers: &http::HeaderMap) -> bool {
    if keys_header(route, &header::COOKIE) {
        return true;
    }
    let mode = &route.policy.cookies;
    match mode {
        CookieMode::Strip => true,
        CookieMode::Bypass if route.key.cookies.is_empty() => false,
        CookieMode::Bypass | CookieMode::StripNamed(_) => request_cookies(headers)
            .iter()
            .all(|c| keyed_cookie(route, c.name) || strips(mode, c.name)),
    }
}

/// Whether the route keys on the cookie called `name`.
pub(crate) fn keyed_cookie(route: &Route, name: &[u8]) -> bool {
    route.key.cookies.iter().any(|k| k.as_bytes() == name)
}

/// Whether `mode` strips the cookie called `name` from a shared fetch.
fn strips(mode: &CookieMode, name: &[u8]) -> bool {
    match mode {
        CookieMode::Bypass => false,
        CookieMode::Strip => true,
        CookieMode::StripNamed(patterns) => patterns.iter().any(|p| glob(p.as_bytes(), name)),
    }
}

/// Whether `name` matches `pattern`, where `*` stands for any run of bytes (none included).
/// Iterative with one backtrack point, so a pattern of many stars stays linear in practice.
fn glob(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, n));
            p += 1;
        } else if p < pattern.len() && pattern[p] == name[n] {
            p += 1;
            n += 1;
        } else if let Some((star_p, star_n)) = star {
            p = star_p + 1;
            n = star_n + 1;
            star = Some((star_p, star_n + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|b| *b == b'*')
}

pub(crate) fn keys_header(route: &Route, name: &HeaderName) -> bool {
    route.key.headers.contains(name)
}

/// Whether the request header `name` is part of the route's key one way or another: keyed by name,
/// `Cookie` when the route keys cookies, the body headers when it keys the body.
pub(crate) fn in_key(route: &Route, name: &HeaderName) -> bool {
    keys_header(route, name)
        || (*name == header::COOKIE && !route.key.cookies.is_empty())
        || (route.key.body && BODY_HEADERS.contains(name))
}

#[cfg(test)]
mod tests;
