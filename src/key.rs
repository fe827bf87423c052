//! Request or dictionary key → canonical bytes → BLAKE3 digest.
//!
//! The canonical form is a tuple of length-prefixed parts, so `("ab", "c")` and `("a", "bc")` can
//! never collide. Only the digest ([`KeyHash`]) reaches the store and the bus; the canonical bytes stay
//! in the process, and the digest is also written into every stored envelope so that a foreign value
//! under our name is detected on read.

use std::borrow::Cow;
use std::fmt;

use http::header::{self, HeaderName};

use crate::config::QueryRule;

/// The BLAKE3 digest of a canonical key: the identity of a key everywhere outside the process.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyHash([u8; 32]);

impl KeyHash {
    /// Length of [`KeyHash::to_hex`]'s output.
    pub const HEX_LEN: usize = 64;

    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, as used in store keys and bus subjects.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses [`KeyHash::to_hex`]'s output; anything else is `None`.
    pub fn from_hex(text: &str) -> Option<Self> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(Self(bytes))
    }

    /// Which of `n` shards this key belongs to (the digest is uniform, so its first bytes will do).
    pub fn shard(&self, n: usize) -> usize {
        let head = u64::from_le_bytes(self.0[..8].try_into().expect("8 bytes"));
        (head % n as u64) as usize
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Builds a canonical key from parts; every part is length-prefixed.
#[derive(Default, Clone)]
pub struct KeyBuilder {
    canonical: Vec<u8>,
}

impl KeyBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one part.
    pub fn part(mut self, bytes: impl AsRef<[u8]>) -> Self {
        self.push(bytes.as_ref());
        self
    }

    /// Appends one part in place.
    pub fn push(&mut self, bytes: &[u8]) {
        self.canonical
            .extend_from_slice(&(bytes.len() as u64).to_be_bytes());
        self.canonical.extend_from_slice(bytes);
    }

    /// Appends what `push(&frame(items))` would, without building the framed list first.
    fn push_framed(&mut self, items: &[&[u8]]) {
        let framed: usize = items.iter().map(|item| 8 + item.len()).sum();
        self.canonical
            .extend_from_slice(&(framed as u64).to_be_bytes());
        for item in items {
            self.canonical
                .extend_from_slice(&(item.len() as u64).to_be_bytes());
            self.canonical.extend_from_slice(item);
        }
    }

    /// Appends what `push(&presence(values))` would, without building the part first.
    fn push_presence(&mut self, values: &[&[u8]]) {
        if values.is_empty() {
            self.push(&[0]);
            return;
        }
        let framed: usize = values.iter().map(|value| 8 + value.len()).sum();
        self.canonical
            .extend_from_slice(&(1 + framed as u64).to_be_bytes());
        self.canonical.push(1);
        for value in values {
            self.canonical
                .extend_from_slice(&(value.len() as u64).to_be_bytes());
            self.canonical.extend_from_slice(value);
        }
    }

    pub fn finish(self) -> Key {
        let hash = KeyHash(*blake3::hash(&self.canonical).as_bytes());
        Key {
            canonical: self.canonical,
            hash,
        }
    }
}

/// A canonical key and its digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    /// The length-prefixed tuple; kept for `explain` and debugging, never sent anywhere.
    pub canonical: Vec<u8>,
    /// The digest of `canonical`.
    pub hash: KeyHash,
}

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

/// [`with_generation`] for a key without its parts.
pub fn key_with_generation(key: Key, generation: u64) -> Key {
    if generation == 0 {
        return key;
    }
    let mut builder = KeyBuilder {
        canonical: key.canonical,
    };
    builder.push(b"generation");
    builder.push(generation.to_string().as_bytes());
    builder.finish()
}

/// What `explain` shows for an absent header, cookie or body.
const ABSENT: &str = "<absent>";

/// Headers that say how to read a request body. They change what the upstream makes of the same
/// bytes, so a route that keys on the body keys on them too (and they are the only unkeyed headers
/// forwarded with a cacheable request: see [`crate::policy::forward_headers`]).
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
    route: &crate::config::Route,
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
    route: &crate::config::Route,
    method: &http::Method,
    uri: &http::Uri,
    headers: &http::HeaderMap,
    body: Option<&[u8]>,
) -> Key {
    request_digest_and_query(route, method, uri, headers, body).0
}

/// [`request_digest`] and, from the same parsing of the query, [`forwarded_query`].
pub fn request_digest_and_query(
    route: &crate::config::Route,
    method: &http::Method,
    uri: &http::Uri,
    headers: &http::HeaderMap,
    body: Option<&[u8]>,
) -> (Key, Option<String>) {
    let kept = query_segments(&route.key.query, uri.query().unwrap_or(""));
    let key = build_request_key(route, method, uri, &kept, headers, body, None);
    (key, (!kept.is_empty()).then(|| kept.join("&")))
}

/// [`request_key`]'s work on the query segments the route keeps (`kept`, from
/// [`query_segments`]); `parts`, when given, receives what `explain` shows.
fn build_request_key(
    route: &crate::config::Route,
    method: &http::Method,
    uri: &http::Uri,
    kept: &[&str],
    headers: &http::HeaderMap,
    body: Option<&[u8]>,
    mut parts: Option<&mut Vec<(Cow<'static, str>, String)>>,
) -> Key {
    // Room for a typical key up front: growing the buffer part by part costs more than the hash.
    let mut builder = KeyBuilder {
        canonical: Vec::with_capacity(512),
    };
    let hop_by_hop = crate::policy::connection_named(headers);
    let visible = |name: &HeaderName| !crate::policy::is_hop_by_hop(name, &hop_by_hop);
    // Only `explain` reads the parts, so they are made only when asked for.
    let mut show_part = |what: Cow<'static, str>, value: &dyn Fn() -> String| {
        if let Some(parts) = parts.as_deref_mut() {
            parts.push((what, value()));
        }
    };

    builder.push(REQUEST_KEY_VERSION.as_bytes());
    builder.push(route.name.as_bytes());
    show_part("route".into(), &|| route.name.clone());
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
const VARIANT_KEY_VERSION: &str = "corral/variant/1";

/// The key of one variant of a response that varies on request headers outside its route's key
/// (`vary: honor`): the primary key's digest, the id of the marker stored there, then each of
/// `names` (lowercase, sorted) with the request's values for it.
///
/// The marker's id makes the variants belong to one marker: when the marker goes (purged, or
/// expired), its variants can no longer be reached and the next marker starts afresh, so no old
/// variant outlives the entry it hangs from.
///
/// Values are normalised only in ways that cannot change their meaning (RFC 9111 §4.1): every
/// line of the header is split on commas, whitespace around each element is trimmed, and empty
/// elements are dropped, so `a, b`, `a,b` and two lines `a` and `b` are one variant. An absent
/// header differs from an empty one. A header named in `Connection` counts as absent, as it is
/// never forwarded.
pub fn variant_key(
    primary: &KeyHash,
    marker: &str,
    names: &[HeaderName],
    headers: &http::HeaderMap,
) -> Key {
    let hop_by_hop = crate::policy::connection_named(headers);
    let mut builder = KeyBuilder::new();
    builder.push(VARIANT_KEY_VERSION.as_bytes());
    builder.push(primary.as_bytes());
    builder.push(marker.as_bytes());
    for name in names {
        builder.push(name.as_str().as_bytes());
        let present =
            headers.contains_key(name) && !crate::policy::is_hop_by_hop(name, &hop_by_hop);
        let elements: Vec<&[u8]> = headers
            .get_all(name)
            .iter()
            .filter(|_| present)
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|e| !e.is_empty())
            .collect();
        let mut part = vec![u8::from(present)];
        part.extend(frame(elements));
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

/// Routes for unit tests, built directly (the config module's parser is not needed to test keys).
#[cfg(test)]
pub(crate) mod testing {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_place_parts_are_the_bytes_of_the_built_ones() {
        let lists: [&[&[u8]]; 4] = [&[], &[b""], &[b"a=1"], &[b"a=1", b"", b"b=xyz"]];
        for list in lists {
            let mut built = KeyBuilder::new();
            built.push(&presence(list));
            built.push(&frame(list.iter().copied()));
            let mut in_place = KeyBuilder::new();
            in_place.push_presence(list);
            in_place.push_framed(list);
            assert_eq!(in_place.canonical, built.canonical, "{list:?}");
        }
    }

    #[test]
    fn the_digest_alone_is_the_digest_of_the_key_explain_shows() {
        use testing::headers;
        let route = testing::route_with(|r| {
            r.key.query = QueryRule::Include(testing::names(&["q", "page"]));
            r.key.headers = vec![header::ACCEPT];
            r.key.cookies = testing::names(&["locale"]);
            r.key.body = true;
        });
        let uri: http::Uri = "/s?page=2&utm=x&%71=a+b&Q=1".parse().unwrap();
        let request = headers(&[("accept", "a/b"), ("cookie", "locale=en; other=1")]);
        for body in [None, Some(&b"{}"[..])] {
            assert_eq!(
                request_digest(&route, &http::Method::GET, &uri, &request, body),
                request_key(&route, &http::Method::GET, &uri, &request, body).key
            );
        }
    }

    #[test]
    fn variant_keys_normalise_only_what_cannot_change_the_meaning() {
        use testing::headers;
        let primary = KeyBuilder::new().part("p").finish().hash;
        let lang = [HeaderName::from_static("accept-language")];
        let of = |lines: &[(&str, &str)]| variant_key(&primary, "m1", &lang, &headers(lines)).hash;
        let en = of(&[("accept-language", "en, fr")]);
        assert_eq!(en, of(&[("accept-language", "en,fr ")]));
        assert_eq!(
            en,
            of(&[("accept-language", "en"), ("accept-language", "fr")])
        );
        assert_ne!(en, of(&[("accept-language", "fr, en")]), "order is meaning");
        assert_ne!(en, of(&[("accept-language", "EN, fr")]), "so is case");
        assert_ne!(
            of(&[]),
            of(&[("accept-language", "")]),
            "absent is not empty"
        );
        assert_eq!(
            of(&[]),
            of(&[("accept-language", "en"), ("connection", "accept-language")]),
            "a hop-by-hop header is absent"
        );
        let other = KeyBuilder::new().part("q").finish().hash;
        let en_fr = headers(&[("accept-language", "en, fr")]);
        assert_ne!(
            en,
            variant_key(&other, "m1", &lang, &en_fr).hash,
            "variants of two keys never meet"
        );
        assert_ne!(
            en,
            variant_key(&primary, "m2", &lang, &en_fr).hash,
            "nor do those of two markers"
        );
    }

    #[test]
    fn parts_are_length_prefixed_so_shifted_boundaries_differ() {
        let a = KeyBuilder::new().part("ab").part("c").finish();
        let b = KeyBuilder::new().part("a").part("bc").finish();
        assert_ne!(a.hash, b.hash);
    }

    #[test]
    fn hex_round_trips_and_rejects_junk() {
        let k = KeyBuilder::new().part("x").finish();
        assert_eq!(KeyHash::from_hex(&k.hash.to_hex()), Some(k.hash));
        assert_eq!(k.hash.to_hex().len(), KeyHash::HEX_LEN);
        assert_eq!(KeyHash::from_hex("zz"), None);
        assert_eq!(KeyHash::from_hex(&"0".repeat(63)), None);
    }

    // -----------------------------------------------------------------------------------------
    // Request keys

    use http::{HeaderMap, HeaderName, Method, Uri};
    use proptest::prelude::*;

    use super::testing::{headers, names, route, route_with};
    use crate::config::{QueryRule, Route};

    fn key_of(route: &Route, method: Method, uri: &str, lines: &[(&str, &str)]) -> KeyHash {
        key_with_body(route, method, uri, lines, None)
    }

    fn key_with_body(
        route: &Route,
        method: Method,
        uri: &str,
        lines: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> KeyHash {
        let uri: Uri = uri.parse().expect("uri");
        request_key(route, &method, &uri, &headers(lines), body)
            .key
            .hash
    }

    fn get(route: &Route, uri: &str) -> KeyHash {
        key_of(route, Method::GET, uri, &[])
    }

    fn include(list: &[&str]) -> Route {
        route_with(|r| r.key.query = QueryRule::Include(names(list)))
    }

    fn exclude(list: &[&str]) -> Route {
        route_with(|r| r.key.query = QueryRule::Exclude(names(list)))
    }

    fn keyed_headers(list: &[&'static str]) -> Route {
        route_with(|r| r.key.headers = list.iter().map(|n| HeaderName::from_static(n)).collect())
    }

    fn keyed_cookies(list: &[&str]) -> Route {
        route_with(|r| r.key.cookies = names(list))
    }

    fn body_keyed() -> Route {
        route_with(|r| r.key.body = true)
    }

    #[test]
    fn no_part_of_a_request_can_shift_into_the_next() {
        let r = route();
        assert_ne!(get(&r, "/a?b=c"), get(&r, "/ab?=c"));
        assert_ne!(get(&r, "/a?b=c"), get(&r, "/a?bc"));
        assert_ne!(get(&r, "/a?b=c"), get(&r, "/a%3Fb=c"));
        assert_ne!(get(&r, "/a?b=1;c=2"), get(&r, "/a?b=1&;c=2"));
        assert_ne!(get(&r, "/a?b=1&c=2"), get(&r, "/a?b=1%26c=2"));

        // Header values holding what looks like the next header, a separator or a length.
        let two = keyed_headers(&["x-a", "x-b"]);
        let k = |lines: &[(&str, &str)]| key_of(&two, Method::GET, "/r", lines);
        assert_ne!(k(&[("x-a", "1"), ("x-b", "2")]), k(&[("x-a", "1, x-b: 2")]));
        assert_ne!(k(&[("x-a", "1x-b2")]), k(&[("x-a", "1"), ("x-b", "2")]));
        assert_ne!(k(&[("x-b", "1")]), k(&[("x-a", "1")]));
        assert_ne!(
            k(&[("x-a", "\t2"), ("x-b", "")]),
            k(&[("x-a", ""), ("x-b", "\t2")])
        );

        // Cookies: a value cannot carry another cookie's name into the key.
        let cookies = keyed_cookies(&["a", "b"]);
        let c = |cookie: &str| key_of(&cookies, Method::GET, "/r", &[("cookie", cookie)]);
        assert_ne!(c("a=1; b=2"), c("a=1 b=2"));
        assert_ne!(c("a=1; b=2"), c("a=1=b=2"));
    }

    #[test]
    fn the_same_request_gets_the_same_key() {
        let r = route();
        assert_eq!(get(&r, "/reports/1?a=1"), get(&r, "/reports/1?a=1"));
    }

    #[test]
    fn route_method_and_path_are_in_the_key() {
        let r = route();
        let other = route_with(|r| r.name = "other".into());
        assert_ne!(get(&r, "/x"), get(&other, "/x"));
        assert_ne!(
            key_of(&r, Method::GET, "/x", &[]),
            key_of(&r, Method::HEAD, "/x", &[])
        );
        assert_ne!(get(&r, "/x"), get(&r, "/y"));
    }

    #[test]
    fn the_path_is_keyed_raw_so_distinct_resources_never_merge() {
        let r = route();
        assert_ne!(get(&r, "/a%2Fb"), get(&r, "/a/b"));
        assert_ne!(get(&r, "/a%62"), get(&r, "/ab"));
        assert_ne!(get(&r, "/A"), get(&r, "/a"));
        assert_ne!(get(&r, "/a/"), get(&r, "/a"));
        assert_ne!(get(&r, "/a//b"), get(&r, "/a/b"));
    }

    #[test]
    fn query_all_ignores_the_order_of_different_names() {
        let r = route();
        assert_eq!(get(&r, "/r?a=1&b=2"), get(&r, "/r?b=2&a=1"));
        assert_eq!(get(&r, "/r?c=3&a=1&b=2"), get(&r, "/r?b=2&c=3&a=1"));
    }

    #[test]
    fn query_all_keeps_every_value() {
        let r = route();
        assert_ne!(get(&r, "/r?a=1"), get(&r, "/r?a=2"));
        assert_ne!(get(&r, "/r?a=1"), get(&r, "/r?a=1&b=2"));
        assert_ne!(
            get(&r, "/r?a=1"),
            get(&r, "/r?a=1&a=1"),
            "duplicates are kept"
        );
        assert_ne!(get(&r, "/r?a=1"), get(&r, "/r?A=1"));
    }

    #[test]
    fn repeated_names_keep_their_order() {
        // "first wins", "last wins" and ordered lists all read these differently.
        let r = route();
        assert_ne!(get(&r, "/r?a=1&a=2"), get(&r, "/r?a=2&a=1"));
        assert_eq!(get(&r, "/r?a=1&b=0&a=2"), get(&r, "/r?b=0&a=1&a=2"));
    }

    #[test]
    fn reordering_spellings_of_one_name_changes_the_key() {
        // To an upstream that decodes names or ignores their case these are one repeated name.
        let r = route();
        assert_ne!(get(&r, "/r?a=1&%61=2"), get(&r, "/r?%61=2&a=1"));
        assert_ne!(get(&r, "/r?a=1&A=2"), get(&r, "/r?A=2&a=1"));
    }

    #[test]
    fn a_name_without_equals_differs_from_an_empty_value() {
        let r = route();
        assert_ne!(get(&r, "/r?a"), get(&r, "/r?a="));
        assert_ne!(get(&r, "/r?a="), get(&r, "/r"));
        assert_ne!(get(&r, "/r?a"), get(&r, "/r"));
    }

    #[test]
    fn query_values_are_not_decoded() {
        let r = route();
        assert_ne!(get(&r, "/r?q=a+b"), get(&r, "/r?q=a%20b"));
        assert_ne!(get(&r, "/r?q=%41"), get(&r, "/r?q=A"));
    }

    #[test]
    fn empty_query_segments_are_skipped() {
        let r = route();
        assert_eq!(get(&r, "/r?a=1&&b=2&"), get(&r, "/r?a=1&b=2"));
        assert_eq!(get(&r, "/r?"), get(&r, "/r"));
    }

    #[test]
    fn query_include_keeps_only_the_named_parameters() {
        let r = include(&["a"]);
        assert_eq!(get(&r, "/r?a=1&utm=x"), get(&r, "/r?utm=y&a=1"));
        assert_eq!(get(&r, "/r?a=1&utm=x"), get(&r, "/r?a=1"));
        assert_ne!(get(&r, "/r?a=1"), get(&r, "/r?a=2"));
        assert_ne!(get(&r, "/r?a=1"), get(&r, "/r"));
    }

    #[test]
    fn query_include_cannot_be_dodged_by_spelling_the_name_differently() {
        let r = include(&["a"]);
        assert_ne!(get(&r, "/r?%61=evil"), get(&r, "/r"));
        assert_ne!(get(&r, "/r?A=evil"), get(&r, "/r"));
        // Upstreams that also split on ';' would see a=evil.
        assert_ne!(get(&r, "/r?utm=x;a=evil"), get(&r, "/r"));
    }

    #[test]
    fn query_exclude_drops_only_the_named_parameters() {
        let r = exclude(&["utm"]);
        assert_eq!(get(&r, "/r?a=1&utm=x"), get(&r, "/r?utm=y&a=1"));
        assert_eq!(get(&r, "/r?a=1&utm=x"), get(&r, "/r?a=1"));
        assert_ne!(get(&r, "/r?a=1"), get(&r, "/r?a=2"));
        assert_ne!(get(&r, "/r?a=1&b=2"), get(&r, "/r?a=1"));
    }

    #[test]
    fn query_exclude_keeps_anything_it_cannot_be_sure_of() {
        let r = exclude(&["utm"]);
        assert_ne!(get(&r, "/r?%75tm=x"), get(&r, "/r"));
        assert_ne!(get(&r, "/r?UTM=x"), get(&r, "/r"));
        assert_ne!(get(&r, "/r?utm=x;a=1"), get(&r, "/r"));
    }

    #[test]
    fn query_none_ignores_the_query() {
        let r = route_with(|r| r.key.query = QueryRule::None);
        assert_eq!(get(&r, "/r?a=1"), get(&r, "/r?a=2"));
        assert_eq!(get(&r, "/r?a=1"), get(&r, "/r"));
    }

    #[test]
    fn unkeyed_headers_are_ignored() {
        let r = keyed_headers(&["accept"]);
        assert_eq!(
            key_of(
                &r,
                Method::GET,
                "/r",
                &[("accept", "a/b"), ("user-agent", "x")]
            ),
            key_of(
                &r,
                Method::GET,
                "/r",
                &[("accept", "a/b"), ("user-agent", "y")]
            ),
        );
        let plain = route();
        assert_eq!(
            key_of(&plain, Method::GET, "/r", &[("accept", "a/b")]),
            key_of(&plain, Method::GET, "/r", &[]),
        );
    }

    #[test]
    fn keyed_headers_change_the_key() {
        let r = keyed_headers(&["accept"]);
        assert_ne!(
            key_of(&r, Method::GET, "/r", &[("accept", "application/json")]),
            key_of(&r, Method::GET, "/r", &[("accept", "text/html")]),
        );
    }

    #[test]
    fn an_absent_header_differs_from_an_empty_one() {
        let r = keyed_headers(&["accept"]);
        assert_ne!(
            key_of(&r, Method::GET, "/r", &[]),
            key_of(&r, Method::GET, "/r", &[("accept", "")]),
        );
    }

    #[test]
    fn every_value_of_a_keyed_header_counts_in_order() {
        let r = keyed_headers(&["accept"]);
        let k = |lines: &[(&str, &str)]| key_of(&r, Method::GET, "/r", lines);
        assert_ne!(
            k(&[("accept", "a"), ("accept", "b")]),
            k(&[("accept", "b"), ("accept", "a")])
        );
        assert_ne!(
            k(&[("accept", "a"), ("accept", "b")]),
            k(&[("accept", "a")])
        );
        assert_ne!(
            k(&[("accept", "a"), ("accept", "b")]),
            k(&[("accept", "a, b")])
        );
    }

    #[test]
    fn a_keyed_header_named_in_connection_counts_as_absent() {
        // It is stripped before the upstream sees it, so the answer is the "absent" one.
        let r = keyed_headers(&["accept"]);
        assert_eq!(
            key_of(
                &r,
                Method::GET,
                "/r",
                &[("accept", "application/json"), ("connection", "Accept")]
            ),
            key_of(&r, Method::GET, "/r", &[]),
        );
    }

    #[test]
    fn keyed_cookies_change_the_key_and_others_do_not() {
        let r = keyed_cookies(&["lang"]);
        let k = |cookie: &str| key_of(&r, Method::GET, "/r", &[("cookie", cookie)]);
        assert_ne!(k("lang=en"), k("lang=fr"));
        assert_eq!(k("lang=en; theme=dark"), k("theme=light; lang=en"));
        assert_eq!(k("lang=en"), k(" lang = en ;"));
        assert_ne!(k("lang=en"), k("lang=\"en\""));
    }

    #[test]
    fn an_absent_cookie_differs_from_an_empty_one() {
        let r = keyed_cookies(&["lang"]);
        assert_ne!(
            key_of(&r, Method::GET, "/r", &[]),
            key_of(&r, Method::GET, "/r", &[("cookie", "lang=")]),
        );
        assert_eq!(
            key_of(&r, Method::GET, "/r", &[]),
            key_of(&r, Method::GET, "/r", &[("cookie", "other=1")]),
        );
        // A pair without '=' is a nameless cookie, not "lang".
        assert_eq!(
            key_of(&r, Method::GET, "/r", &[("cookie", "lang")]),
            key_of(&r, Method::GET, "/r", &[]),
        );
    }

    #[test]
    fn cookies_are_read_from_every_cookie_header_in_order() {
        let r = keyed_cookies(&["a", "b"]);
        let k = |lines: &[(&str, &str)]| key_of(&r, Method::GET, "/r", lines);
        assert_eq!(
            k(&[("cookie", "a=1"), ("cookie", "b=2")]),
            k(&[("cookie", "a=1; b=2")])
        );
        assert_ne!(k(&[("cookie", "a=1; a=2")]), k(&[("cookie", "a=2; a=1")]));
    }

    #[test]
    fn the_body_digest_is_keyed_only_when_asked() {
        let r = body_keyed();
        let k = |body: Option<&[u8]>| key_with_body(&r, Method::POST, "/q", &[], body);
        assert_eq!(k(Some(b"{\"q\":1}")), k(Some(b"{\"q\":1}")));
        assert_ne!(k(Some(b"{\"q\":1}")), k(Some(b"{\"q\":2}")));
        assert_ne!(k(None), k(Some(b"")), "no body differs from an empty body");

        let plain = route();
        assert_eq!(
            key_with_body(&plain, Method::GET, "/q", &[], Some(b"1")),
            key_with_body(&plain, Method::GET, "/q", &[], Some(b"2")),
        );
    }

    #[test]
    fn a_body_key_includes_how_to_read_the_body() {
        let r = body_keyed();
        let k = |lines: &[(&str, &str)]| key_with_body(&r, Method::POST, "/q", lines, Some(b"x"));
        assert_ne!(
            k(&[("content-type", "application/json")]),
            k(&[("content-type", "application/x-www-form-urlencoded")])
        );
        assert_ne!(k(&[("content-encoding", "gzip")]), k(&[]));
        assert_eq!(k(&[("content-length", "1")]), k(&[]));
    }

    #[test]
    fn parts_explain_the_key_in_order() {
        let r = route_with(|r| {
            r.key.query = QueryRule::Include(names(&["a", "b"]));
            r.key.headers = vec![http::header::ACCEPT];
            r.key.cookies = names(&["session"]);
            r.key.body = true;
        });
        let uri: Uri = "/reports/1?b=2&utm=x&a=1".parse().unwrap();
        let key = request_key(
            &r,
            &Method::POST,
            &uri,
            &headers(&[("accept", "application/json"), ("accept", "text/plain")]),
            Some(b"hello"),
        );
        let parts: Vec<(&str, &str)> = key
            .parts
            .iter()
            .map(|(what, value)| (what.as_ref(), value.as_str()))
            .collect();
        let body = format!("blake3:{}", blake3::hash(b"hello").to_hex());
        assert_eq!(
            parts,
            [
                ("route", "reports"),
                ("method", "POST"),
                ("path", "/reports/1"),
                ("query", "a=1&b=2"),
                ("header accept", "application/json, text/plain"),
                ("header content-type", "<absent>"),
                ("header content-encoding", "<absent>"),
                ("cookie session", "<absent>"),
                ("body", body.as_str()),
            ]
        );
    }

    #[test]
    fn a_request_key_never_equals_a_dictionary_key_of_the_same_words() {
        let r = route_with(|r| r.key.query = QueryRule::None);
        let uri: Uri = "/x".parse().unwrap();
        let request = request_key(&r, &Method::GET, &uri, &HeaderMap::new(), None);
        let dictionary = KeyBuilder::new()
            .part("dictionary")
            .part("reports")
            .part("GET")
            .finish();
        assert_ne!(request.key.hash, dictionary.hash);
    }

    #[test]
    fn the_upstream_gets_only_the_query_the_key_kept() {
        let fwd = |rule: QueryRule, uri: &str| {
            let uri: http::Uri = uri.parse().unwrap();
            let route = testing::route_with(|r| r.key.query = rule.clone());
            let (_, with_key) =
                request_digest_and_query(&route, &http::Method::GET, &uri, &HeaderMap::new(), None);
            let alone = forwarded_query(&rule, &uri);
            assert_eq!(with_key, alone, "one parsing of the query, or two, agree");
            alone
        };
        assert_eq!(
            fwd(QueryRule::Include(names(&["a"])), "/r?utm=x&a=1&debug=1"),
            Some("a=1".into())
        );
        assert_eq!(
            fwd(QueryRule::Exclude(names(&["utm"])), "/r?utm=x&b=2&a"),
            Some("a&b=2".into())
        );
        assert_eq!(
            fwd(QueryRule::All, "/r?b=2&a=1&a=0"),
            Some("a=1&a=0&b=2".into())
        );
        assert_eq!(fwd(QueryRule::None, "/r?a=1"), None);
        assert_eq!(fwd(QueryRule::Include(names(&["a"])), "/r?b=1"), None);
        assert_eq!(fwd(QueryRule::All, "/r"), None);
    }

    // -----------------------------------------------------------------------------------------
    // Properties

    /// Up to six parameters with distinct names, some without '='.
    fn distinct_params() -> impl Strategy<Value = Vec<(String, Option<String>)>> {
        prop::collection::btree_map("[a-z]{1,3}", prop::option::of("[a-z0-9%+]{0,4}"), 1..6)
            .prop_map(|m| m.into_iter().collect())
    }

    fn query(params: &[(String, Option<String>)]) -> String {
        let segments: Vec<String> = params
            .iter()
            .map(|(n, v)| match v {
                Some(v) => format!("{n}={v}"),
                None => n.clone(),
            })
            .collect();
        format!("/r?{}", segments.join("&"))
    }

    proptest! {
        #[test]
        fn parameter_order_never_changes_an_all_key(
            (params, shuffled) in distinct_params()
                .prop_flat_map(|p| (Just(p.clone()), Just(p).prop_shuffle()))
        ) {
            let r = route();
            prop_assert_eq!(get(&r, &query(&params)), get(&r, &query(&shuffled)));
        }

        #[test]
        fn parameter_order_never_changes_an_include_key(
            (params, shuffled) in distinct_params()
                .prop_flat_map(|p| (Just(p.clone()), Just(p).prop_shuffle())),
            included in prop::collection::vec("[a-z]{1,3}", 0..4),
        ) {
            let included: Vec<&str> = included.iter().map(String::as_str).collect();
            let r = include(&included);
            prop_assert_eq!(get(&r, &query(&params)), get(&r, &query(&shuffled)));
        }

        #[test]
        fn changing_an_included_value_changes_the_key(
            params in distinct_params(),
            pick in any::<prop::sample::Index>(),
            new_value in prop::option::of("[a-z0-9%+]{0,4}"),
            include_all in any::<bool>(),
        ) {
            let i = pick.index(params.len());
            prop_assume!(params[i].1 != new_value);
            let mut changed = params.clone();
            changed[i].1 = new_value;
            let r = if include_all { route() } else { include(&[params[i].0.as_str()]) };
            prop_assert_ne!(get(&r, &query(&params)), get(&r, &query(&changed)));
        }

        #[test]
        fn changing_a_parameter_outside_include_keeps_the_key(
            params in distinct_params(),
            pick in any::<prop::sample::Index>(),
            new_value in prop::option::of("[a-z0-9]{0,4}"),
        ) {
            let i = pick.index(params.len());
            let mut changed = params.clone();
            changed[i].1 = new_value;
            let kept: Vec<&str> = params
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, (n, _))| n.as_str())
                .collect();
            let r = include(&kept);
            prop_assert_eq!(get(&r, &query(&params)), get(&r, &query(&changed)));
        }
    }
}
