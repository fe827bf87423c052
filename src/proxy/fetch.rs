//! The fetch: the leader's upstream call for one key (and each caller's own, for keys that may not
//! be shared), and what becomes of its answer: shared and stored, private to its client, or a
//! failure every waiter gets at once.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};

use super::ids::{FETCH_ID, REQUEST_ID, random_id};
use super::slots::Budget;
use super::upstream::{self, Buffered, Overflow, RequestBody, UpstreamError, target};
use super::{Proxy, Snapshot};
use crate::engine::{Attachment, BuildError, BuildRole, Builder, Built, Private};
use crate::envelope::{Entry, Form};
use crate::http::forward::{forward_headers, restore_cookies};
use crate::http::key::keyed_method;
use crate::http::range;
use crate::http::verdict::{
    ResponseVerdict, correct_age, jittered, response_verdict, shared_failure, stale_windows,
    vary_outside_key,
};
use crate::key::KeyHash;
use crate::store::{IndexEntry, MAX_TAGS, valid_tag};
use crate::telemetry::{FetchSpan, TRACEPARENT};

/// Longest wait for the purge indexes before a fetch goes on without them (a store that hangs
/// must not hold every miss for its whole call deadline).
const INDEX_BUDGET: Duration = Duration::from_millis(250);

/// The part of a request's wait timeout left for answering it once a fetch found no upstream
/// slot: a fifth of it, at most this long.
const SLOT_MARGIN: Duration = Duration::from_secs(1);

/// Which variant a fetch fills: what its marker says, and the variant's own key.
#[derive(Clone, Debug)]
pub(super) struct VariantOf {
    /// The request headers the marker's answers vary on.
    pub names: Vec<HeaderName>,
    /// The marker's id, which names the set of its variants in the store's tag index.
    pub marker: String,
    pub key: KeyHash,
}

/// The upstream fetch of one request's key.
pub(super) struct Fetch {
    pub proxy: Arc<Proxy>,
    /// The config the request started under (a reload does not change a fetch under way).
    pub snapshot: Arc<Snapshot>,
    pub route: usize,
    /// The client's request, shared with its handler.
    pub request: Arc<http::request::Parts>,
    pub client: Option<IpAddr>,
    /// The query the key kept: only it reaches the upstream.
    pub kept: Option<String>,
    /// What goes upstream, worked out on first use (see [`Fetch::forward`]).
    pub forward: OnceLock<Option<Forward>>,
    /// The keyed request body (empty when the route does not key on it).
    pub body: Bytes,
    /// The request's (primary) key, for the purge indexes (with the request's path).
    pub key: KeyHash,
    pub stage: Stage,
    /// When the request that started this fetch arrived: its wait for an upstream slot ends in
    /// time for that request to be answered 503 before its own wait timeout.
    pub asked: tokio::time::Instant,
    /// How long the upstream took to its response head, once this fetch ran (for the access
    /// log of the request that started it).
    pub upstream: OnceLock<Duration>,
}

/// Which key a fetch fills.
#[derive(Clone, Debug)]
pub(super) enum Stage {
    /// The request's own key. On a `vary: honor` route, a response that varies on headers outside
    /// the key is committed under its variant key, and the primary key gets a marker naming them.
    Primary,
    /// One variant of a primary key's marker; a response that varies on anything but the
    /// marker's headers, or would be one variant too many, is not stored.
    Variant(VariantOf),
}

/// What a fetch sends upstream: the upstream URI with only the kept query, and the request's
/// headers as the route forwards them (already filtered for a cacheable request).
pub(super) struct Forward {
    pub uri: Uri,
    pub headers: HeaderMap,
}

impl Fetch {
    /// What this fetch sends upstream, worked out on its first use: most requests are answered
    /// without a fetch, and a hit never pays for forwarding. `None` when the URI cannot be
    /// forwarded.
    pub fn forward(&self) -> Option<&Forward> {
        self.forward
            .get_or_init(|| {
                let route = &self.snapshot.config.routes[self.route];
                let request = &*self.request;
                let keyed = with_query(&request.uri, self.kept.as_deref());
                let uri = target(&route.upstream, &keyed).ok()?;
                let headers = forward_headers(route, &request.headers, true, self.client, "http");
                Some(Forward { uri, headers })
            })
            .as_ref()
    }

    /// This fetch as the engine's builder of its key.
    pub fn builder(self: &Arc<Self>) -> Builder {
        let fetch = self.clone();
        Arc::new(move |role| {
            let fetch = fetch.clone();
            Box::pin(async move { fetch.run(role).await })
        })
    }

    /// Records this fetch's key in the purge indexes, waiting at most [`INDEX_BUDGET`]. A failure
    /// only costs purges by prefix or tag this key, so it is logged, not fatal.
    async fn index(&self, tags: Vec<String>, ttl: Duration) {
        let route = &self.snapshot.config.routes[self.route];
        let entry = IndexEntry {
            route: route.name.clone(),
            path: self.request.uri.path().to_owned(),
            key: self.key,
            tags,
            ttl,
        };
        let indexed = tokio::time::timeout(INDEX_BUDGET, self.proxy.engine.index(&entry)).await;
        let error = match indexed {
            Ok(Ok(())) => return,
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("no answer within {INDEX_BUDGET:?}"),
        };
        tracing::warn!(route = %route.name, key = %self.key, %error,
            "could not index a key for purges by prefix and tag");
    }

    /// Fetches, and says what the answer is to everyone who asked for the key.
    async fn run(&self, role: BuildRole) -> Result<Built, BuildError> {
        let route = &self.snapshot.config.routes[self.route];
        // Indexed before the fetch starts, so that a prefix purge from the moment the upstream
        // could have answered finds the key and steals its lease (one store call per fill); kept
        // as long as the lease can live, or as long as the route keeps a value it stores by its
        // own settings if that is longer, so that most answers need no second index call before
        // their commit. Only a fill under the lease: a request's own fetch (a pass) or a degraded
        // one stores nothing.
        let policy = &route.policy;
        let indexed_for = (policy.max_fetch + policy.lease_ttl)
            .max(policy.ttl + policy.stale_while_revalidate.max(policy.stale_if_error));
        if role.stores() {
            self.index(Vec::new(), indexed_for).await;
        }
        let budget = match role {
            BuildRole::Own => Budget::Pass,
            BuildRole::Leader | BuildRole::Degraded | BuildRole::Revalidate(_) => Budget::Fill,
        };
        // Only the stored entry's validators go upstream, never a client's.
        let stored = role
            .revalidating()
            .filter(|stored| validators(stored).is_some());
        let span = FetchSpan::start(
            &self.request.extensions,
            &route.name,
            &self.key,
            role_name(&role),
        );
        let sent = self
            .send(budget, random_id(), stored.map(|e| &**e), &span)
            .await;
        span.end(match &sent {
            Ok(Buffered::Whole { status, .. }) => Ok(status.as_u16()),
            Ok(Buffered::Overflow(overflow)) => Ok(overflow.status.as_u16()),
            Err(error) => Err(&error.message),
        });
        match sent? {
            Buffered::Whole {
                status,
                headers,
                body,
            } => {
                let indexed = role.stores().then_some(indexed_for);
                match stored {
                    Some(stored) if status == StatusCode::NOT_MODIFIED => {
                        self.not_modified(stored, &headers, indexed).await
                    }
                    _ => {
                        self.judge(status, headers, body, Form::Answer, indexed)
                            .await
                    }
                }
            }
            // Too large to buffer: only this fetch's own client gets it, as it streams; a range
            // request asks the upstream for its ranges rather than stream it all.
            Buffered::Overflow(overflow) => {
                let overflow = match self.ranges_instead(&role, overflow).await? {
                    Buffered::Overflow(overflow) => overflow,
                    Buffered::Whole {
                        status,
                        headers,
                        body,
                    } => {
                        let answer = entry(status, &headers, body, Duration::ZERO);
                        return Ok(Built::Private(Private::new(answer, "too-large")));
                    }
                };
                let marker = entry(
                    overflow.status,
                    &HeaderMap::new(),
                    Bytes::new(),
                    Duration::ZERO,
                );
                Ok(Built::Private(Private {
                    entry: marker,
                    reason: "too-large",
                    attachment: Some(Attachment::new::<Overflow>(overflow)),
                }))
            }
        }
    }

    /// Sends the request upstream within an upstream slot of its route, as fetch `id`, and reads
    /// the answer up to the route's `max_body`; the answer keeps the id ([`FETCH_ID`]), followed
    /// by `span`'s `traceparent` when it is sampled (which goes upstream either way). With
    /// `validating`, the request is made conditional on that stored entry's validators.
    async fn send(
        &self,
        budget: Budget,
        id: HeaderValue,
        validating: Option<&Entry>,
        span: &FetchSpan,
    ) -> Result<Buffered, BuildError> {
        let route = &self.snapshot.config.routes[self.route];
        let Some(forward) = self.forward() else {
            return Err(BuildError::new("the request URI cannot be forwarded"));
        };
        // Held whole, so a retry can send it again.
        let body = RequestBody::Buffered(self.body.clone());
        let metrics = self.proxy.engine.metrics();
        // Within the wait timeout of the request that started the fetch, leaving it time to be
        // answered 503 rather than reach its own deadline.
        let wait = route.policy.wait_timeout;
        let until = self.asked + wait - (wait / 5).min(SLOT_MARGIN);
        let Some(_slot) = (self.proxy.slots)
            .take(
                &route.name,
                budget,
                route.policy.max_upstream_fetches,
                until,
            )
            .await
        else {
            metrics.limit_rejected(budget.limit());
            return Err(BuildError::with_response(
                "too many requests to this upstream at once",
                busy_entry("corral: too many requests to this upstream at once\n"),
            ));
        };
        let mut headers = forward.headers.clone();
        if matches!(budget, Budget::Pass) {
            restore_cookies(route, &self.request.headers, &mut headers);
        }
        headers.insert(REQUEST_ID, id.clone());
        let request = &*self.request;
        range::forward(
            &request.method,
            &request.headers,
            budget == Budget::Pass,
            &mut headers,
        );
        if let Some((etag, last_modified)) = validating.and_then(validators) {
            conditional(&mut headers, etag, last_modified);
        }
        if let Some(traceparent) = span.traceparent() {
            headers.insert(TRACEPARENT, traceparent);
        }
        let asked = tokio::time::Instant::now();
        let sent = self
            .proxy
            .upstream
            .send(
                route,
                keyed_method(&self.request.method).clone(),
                forward.uri.clone(),
                headers,
                body,
                Some(&self.key),
            )
            .await;
        let delay = asked.elapsed();
        let _ = self.upstream.set(delay);
        let status = sent.as_ref().ok().map(|response| response.status());
        upstream::observe(metrics, &route.name, status, asked);
        let name = span.name_fetch(&id);
        let unreachable = |error: UpstreamError| unreachable_error(&error, &name);
        let mut buffered = upstream::buffer(sent.map_err(unreachable)?, route.policy.max_body)
            .await
            .map_err(unreachable)?;
        let headers = match &mut buffered {
            Buffered::Whole { headers, .. } => headers,
            Buffered::Overflow(overflow) => &mut overflow.headers,
        };
        headers.insert(FETCH_ID, name);
        correct_age(headers, delay);
        Ok(buffered)
    }

    /// An answer over `max_body`, or, for a GET with a `Range` whose shared fetch got it, the
    /// upstream's answer to the client's own ranges instead (a `Budget::Pass` fetch forwards
    /// them): the whole answer is dropped unread, so a range of a large representation does not
    /// stream all of it. Either is private to this fetch's client.
    async fn ranges_instead(
        &self,
        role: &BuildRole,
        overflow: Overflow,
    ) -> Result<Buffered, BuildError> {
        let request = &*self.request;
        if *role == BuildRole::Own || !range::wanted(&request.method, &request.headers) {
            return Ok(Buffered::Overflow(overflow));
        }
        drop(overflow);
        let route = &self.snapshot.config.routes[self.route];
        let span = FetchSpan::start(&request.extensions, &route.name, &self.key, "range");
        let sent = self.send(Budget::Pass, random_id(), None, &span).await;
        span.end(match &sent {
            Ok(Buffered::Whole { status, .. }) => Ok(status.as_u16()),
            Ok(Buffered::Overflow(overflow)) => Ok(overflow.status.as_u16()),
            Err(error) => Err(&error.message),
        });
        sent
    }

    /// What a whole answer is: a failure for everyone, shared (and stored), or private to the
    /// client that asked. `indexed` is how long the key was indexed for before the fetch, when
    /// it was (the fetch may store). `form` is the body's: an upstream's answer is one, a
    /// revalidated entry's body may hold the representations made when it was first stored.
    async fn judge(
        &self,
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        form: Form,
        indexed: Option<Duration>,
    ) -> Result<Built, BuildError> {
        let route = &self.snapshot.config.routes[self.route];
        let mut entry = Entry {
            form,
            ..entry(status, &headers, body, route.policy.ttl)
        };
        // A 5xx is a failure for everyone who joined, unless the route stores it.
        if shared_failure(route, status, &headers) {
            return Err(BuildError::with_response(
                format!("upstream answered {status}"),
                entry,
            ));
        }
        let ttl = match response_verdict(route, status, &headers) {
            ResponseVerdict::Store { ttl } => ttl,
            ResponseVerdict::Pass(reason) => {
                return Ok(Built::Private(Private::new(entry, reason)));
            }
        };
        entry.ttl = jittered(ttl, route.policy.ttl_jitter, &mut rand::rng());
        let stale = stale_windows(route, &headers);
        entry.stale = stale.while_revalidate;
        entry.stale_if_error = stale.if_error;
        // Before the commit: a tag purge from now on steals the lease. The index lives as long
        // as the entry may still be served; the first call already covers an untagged answer
        // that the upstream gave no longer life.
        if let Some(indexed_for) = indexed {
            let served_for = entry.ttl + entry.stale.max(entry.stale_if_error);
            let tags = surrogate_tags(&headers);
            if !tags.is_empty() || served_for > indexed_for {
                self.index(tags, served_for).await;
            }
        }
        // Compressed once, for the store: an answer only this client gets is sent as it came.
        if indexed.is_some() {
            entry = super::encoding::compressed(route, entry, self.proxy.engine.metrics()).await;
        }
        // The verdict let through only names the route makes variants of.
        let outside = vary_outside_key(route, &headers).unwrap_or_default();
        Ok(match &self.stage {
            _ if outside.is_empty() => Built::Shared(entry),
            Stage::Primary => self.store_variant(entry, outside).await,
            Stage::Variant(of) => {
                let stores = indexed.is_some();
                self.admit_variant(entry, &outside, of, stores).await
            }
        })
    }
}

impl Fetch {
    /// The upstream's `304` to a revalidation: the stored answer with its headers updated from
    /// the `304` (RFC 9111 section 4.3.4), judged again as a whole answer would be (a `304` that
    /// adds `Set-Cookie` or `private` makes it private, one that changes `Cache-Control` changes its
    /// freshness). Its body is the stored one, untouched.
    async fn not_modified(
        &self,
        stored: &Entry,
        update: &HeaderMap,
        indexed: Option<Duration>,
    ) -> Result<Built, BuildError> {
        let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
        let headers = updated_headers(&stored.headers, update);
        let judged = self
            .judge(status, headers, stored.body.clone(), stored.form, indexed)
            .await?;
        Ok(match judged {
            Built::Shared(entry) => Built::Revalidated(entry),
            // Only the client whose fetch this is gets it, as the upstream sent it.
            Built::Private(mut private) if private.entry.form == Form::Represented => {
                private.entry = super::encoding::as_sent(private.entry);
                Built::Private(private)
            }
            other => other,
        })
    }
}

/// The request headers that make a request conditional: a client's are never sent on a
/// revalidation, which asks about the stored entry alone.
const PRECONDITIONS: [HeaderName; 5] = [
    http::header::IF_MATCH,
    http::header::IF_NONE_MATCH,
    http::header::IF_MODIFIED_SINCE,
    http::header::IF_UNMODIFIED_SINCE,
    http::header::IF_RANGE,
];

/// Stored headers a `304` does not update: they describe the stored body as it is stored (its
/// length and coding), which the `304` does not resend (RFC 9111 section 3.2).
const KEPT_ON_UPDATE: [HeaderName; 4] = [
    http::header::CONTENT_LENGTH,
    http::header::CONTENT_ENCODING,
    http::header::CONTENT_RANGE,
    http::header::TRANSFER_ENCODING,
];

/// A stored entry's validators: its `ETag` and its `Last-Modified`, when it has either.
fn validators(stored: &Entry) -> Option<(Option<&Bytes>, Option<&Bytes>)> {
    let header = |wanted: &str| {
        (stored.headers.iter())
            .find(|(name, _)| name == wanted)
            .map(|(_, value)| value)
    };
    let (etag, last_modified) = (header("etag"), header("last-modified"));
    (etag.is_some() || last_modified.is_some()).then_some((etag, last_modified))
}

/// Makes `headers` a revalidation of a stored entry (RFC 9111 section 4.3.1): `If-None-Match`
/// with its entity tag, `If-Modified-Since` with its `Last-Modified`, and no other precondition.
fn conditional(headers: &mut HeaderMap, etag: Option<&Bytes>, last_modified: Option<&Bytes>) {
    for name in &PRECONDITIONS {
        headers.remove(name);
    }
    let value = |bytes: &Bytes| HeaderValue::from_maybe_shared(bytes.clone()).ok();
    if let Some(etag) = etag.and_then(value) {
        headers.insert(http::header::IF_NONE_MATCH, etag);
    }
    if let Some(date) = last_modified.and_then(value) {
        headers.insert(http::header::IF_MODIFIED_SINCE, date);
    }
}

/// The stored headers updated from a `304` (RFC 9111 section 3.2): each field the `304` sends
/// replaces the stored field of that name, except those that describe the stored body
/// ([`KEPT_ON_UPDATE`]); the stored `Age` goes whatever the `304` says, since the answer's age is
/// now the `304`'s.
fn updated_headers(stored: &[(String, Bytes)], update: &HeaderMap) -> HeaderMap {
    let updates = |name: &HeaderName| update.contains_key(name) && !KEPT_ON_UPDATE.contains(name);
    let mut headers = HeaderMap::new();
    for (name, value) in stored {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_maybe_shared(value.clone()),
        ) else {
            continue;
        };
        if name != http::header::AGE && !updates(&name) {
            headers.append(name, value);
        }
    }
    for (name, value) in update {
        if !KEPT_ON_UPDATE.contains(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    headers
}

/// Why a fetch runs, as its span says.
fn role_name(role: &BuildRole) -> &'static str {
    match role {
        BuildRole::Leader => "leader",
        BuildRole::Own => "own",
        BuildRole::Degraded => "degraded",
        BuildRole::Revalidate(_) => "revalidate",
    }
}

/// `uri` with its query replaced.
fn with_query(uri: &Uri, query: Option<&str>) -> Uri {
    // Most requests keep their query as it came (or have none): nothing to rebuild.
    if uri.query() == query {
        return uri.clone();
    }
    let path_and_query = match query {
        Some(query) => format!("{}?{query}", uri.path()),
        None => uri.path().to_owned(),
    };
    path_and_query.parse().unwrap_or_else(|_| uri.clone())
}

/// The surrogate tags of a response: `Surrogate-Key` and `Cache-Tag`, space- or comma-separated,
/// without duplicates; at most [`MAX_TAGS`], and tags that [`valid_tag`] refuses are skipped.
fn surrogate_tags(headers: &HeaderMap) -> Vec<String> {
    let mut tags: Vec<String> = Vec::new();
    let values = headers
        .get_all("surrogate-key")
        .iter()
        .chain(headers.get_all("cache-tag").iter());
    for value in values {
        let Ok(text) = value.to_str() else { continue };
        for tag in text.split([' ', ',', '\t']).filter(|t| valid_tag(t)) {
            if tags.len() >= MAX_TAGS {
                return tags;
            }
            if !tags.iter().any(|known| known == tag) {
                tags.push(tag.to_owned());
            }
        }
    }
    tags
}

/// The failure every waiter gets when the upstream cannot be reached by fetch `id` (504 when it
/// timed out); `name` is its [`FETCH_ID`] value.
fn unreachable_error(error: &UpstreamError, name: &HeaderValue) -> BuildError {
    let message = error.to_string();
    let mut response = entry(
        error.status(),
        &HeaderMap::from_iter([(FETCH_ID, name.clone())]),
        Bytes::from(format!("corral: {message}\n")),
        Duration::ZERO,
    );
    response.headers.push((
        "content-type".to_owned(),
        Bytes::from_static(b"text/plain; charset=utf-8"),
    ));
    BuildError::with_response(message, response)
}

/// A busy answer (503 with `Retry-After`) as the failure every caller of a flight gets.
fn busy_entry(text: &'static str) -> Entry {
    let mut entry = entry(
        StatusCode::SERVICE_UNAVAILABLE,
        &HeaderMap::new(),
        Bytes::from_static(text.as_bytes()),
        Duration::ZERO,
    );
    entry.headers.push((
        "content-type".to_owned(),
        Bytes::from_static(b"text/plain; charset=utf-8"),
    ));
    entry
        .headers
        .push(("retry-after".to_owned(), Bytes::from_static(b"1")));
    entry
}

/// An entry from an upstream response (headers already free of hop-by-hop ones).
pub(super) fn entry(status: StatusCode, headers: &HeaderMap, body: Bytes, ttl: Duration) -> Entry {
    let headers = headers
        .iter()
        .filter(|(name, _)| *name != http::header::CONTENT_LENGTH)
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                Bytes::copy_from_slice(value.as_bytes()),
            )
        })
        .collect();
    Entry {
        status: status.as_u16(),
        headers,
        body,
        stored_at_ms: 0,
        ttl,
        stale: Duration::ZERO,
        stale_if_error: Duration::ZERO,
        fetch_time: Duration::ZERO,
        key: KeyHash::from_bytes([0; 32]),
        form: Form::Answer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(headers: &[(&str, &str)]) -> Entry {
        let mut entry = entry(
            StatusCode::OK,
            &HeaderMap::new(),
            Bytes::from_static(b"body"),
            Duration::from_secs(60),
        );
        entry.headers = headers
            .iter()
            .map(|(name, value)| ((*name).to_owned(), Bytes::copy_from_slice(value.as_bytes())))
            .collect();
        entry
    }

    fn header_map(headers: &[(&'static str, &'static str)]) -> HeaderMap {
        headers
            .iter()
            .map(|(name, value)| {
                (
                    HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                )
            })
            .collect()
    }

    #[test]
    fn a_304_updates_the_stored_headers_but_not_those_describing_the_stored_body() {
        let entry = stored(&[
            ("content-type", "text/plain"),
            ("content-encoding", "gzip"),
            ("etag", "\"a\""),
            ("age", "30"),
            ("x-kept", "1"),
            ("x-version", "1"),
        ]);
        let update = header_map(&[
            ("x-version", "2"),
            ("content-encoding", "br"),
            ("cache-control", "max-age=60"),
        ]);
        let merged = updated_headers(&entry.headers, &update);
        let get = |name: &str| merged.get(name).map(|v| v.to_str().unwrap());
        assert_eq!(get("x-version"), Some("2"));
        assert_eq!(merged.get_all("x-version").iter().count(), 1);
        assert_eq!(get("cache-control"), Some("max-age=60"));
        assert_eq!(
            get("content-encoding"),
            Some("gzip"),
            "the stored body's coding"
        );
        assert_eq!(get("etag"), Some("\"a\""));
        assert_eq!(get("x-kept"), Some("1"));
        assert_eq!(get("age"), None, "the stored age is the old answer's");
    }

    #[test]
    fn a_revalidation_sends_the_stored_validators_and_no_client_precondition() {
        let entry = stored(&[
            ("etag", "\"a\""),
            ("last-modified", "Wed, 21 Oct 2015 07:28:00 GMT"),
        ]);
        let mut headers = header_map(&[("if-none-match", "\"client\""), ("if-match", "*")]);
        let (etag, last_modified) = validators(&entry).expect("validators");
        conditional(&mut headers, etag, last_modified);
        assert_eq!(headers.get("if-none-match").unwrap(), "\"a\"");
        assert_eq!(
            headers.get("if-modified-since").unwrap(),
            "Wed, 21 Oct 2015 07:28:00 GMT"
        );
        assert!(headers.get("if-match").is_none());
        assert!(validators(&stored(&[("content-type", "text/plain")])).is_none());
    }

    #[test]
    fn surrogate_tags_split_on_spaces_and_commas_and_are_bounded() {
        let mut headers = HeaderMap::new();
        headers.append("surrogate-key", "user-42  reports,day-1".parse().unwrap());
        headers.append("cache-tag", "user-42,{bad},ok".parse().unwrap());
        assert_eq!(
            surrogate_tags(&headers),
            ["user-42", "reports", "day-1", "ok"]
        );
        let many: Vec<String> = (0..40).map(|i| format!("t{i}")).collect();
        let mut headers = HeaderMap::new();
        headers.insert("surrogate-key", many.join(" ").parse().unwrap());
        headers.append(
            "cache-tag",
            "x".repeat(crate::store::MAX_TAG_LEN + 1).parse().unwrap(),
        );
        assert_eq!(surrogate_tags(&headers), many[..MAX_TAGS]);
    }
}
