//! The fetch: the leader's upstream call for one key (and each caller's own, for keys that may not
//! be shared), and what becomes of its answer: shared and stored, private to its client, or a
//! failure every waiter gets at once.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};

use super::ids::{FETCH_ID, REQUEST_ID, random_id};
use super::slots::Budget;
use super::upstream::{self, Buffered, Overflow, UpstreamError, target};
use super::{Proxy, Snapshot};
use crate::engine::{Attachment, BuildError, BuildRole, Builder, Built, Private};
use crate::envelope::{Entry, Form};
use crate::http::forward::forward_headers;
use crate::http::key::keyed_method;
use crate::http::verdict::{
    ResponseVerdict, correct_age, jittered, response_verdict, stale_windows, vary_outside_key,
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
    /// One variant of a primary key whose marker names these headers; a response that varies on
    /// anything else is not stored.
    Variant(Vec<HeaderName>),
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
            BuildRole::Leader | BuildRole::Degraded => Budget::Fill,
        };
        let span = FetchSpan::start(
            &self.request.extensions,
            &route.name,
            &self.key,
            role_name(role),
        );
        let sent = self.send(budget, random_id(), &span).await;
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
                self.judge(status, headers, body, indexed).await
            }
            // Too large to buffer: only this fetch's own client gets it, as it streams.
            Buffered::Overflow(overflow) => {
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
    /// by `span`'s `traceparent` when it is sampled (which goes upstream either way).
    async fn send(
        &self,
        budget: Budget,
        id: HeaderValue,
        span: &FetchSpan,
    ) -> Result<Buffered, BuildError> {
        let route = &self.snapshot.config.routes[self.route];
        let Some(forward) = self.forward() else {
            return Err(BuildError::new("the request URI cannot be forwarded"));
        };
        let body = if self.body.is_empty() {
            Body::empty()
        } else {
            Body::from(self.body.clone())
        };
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
        headers.insert(REQUEST_ID, id.clone());
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

    /// What a whole answer is: a failure for everyone, shared (and stored), or private to the
    /// client that asked. `indexed` is how long the key was indexed for before the fetch, when
    /// it was (the fetch may store).
    async fn judge(
        &self,
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        indexed: Option<Duration>,
    ) -> Result<Built, BuildError> {
        let route = &self.snapshot.config.routes[self.route];
        let mut entry = entry(status, &headers, body, route.policy.ttl);
        // A 5xx is a failure for everyone who joined, unless the route lists it as a storable
        // answer (501 Not Implemented, by default) or gives it an error TTL.
        let code = status.as_u16();
        if status.is_server_error()
            && !route.policy.cache_statuses.contains(&code)
            && !route.policy.error_ttl.contains_key(&code)
        {
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
        // Only a `vary: honor` route stores a response that varies outside its key.
        let outside = vary_outside_key(route, &headers).unwrap_or_default();
        Ok(match &self.stage {
            _ if outside.is_empty() => Built::Shared(entry),
            Stage::Primary => self.store_variant(entry, outside).await,
            Stage::Variant(names) if outside.iter().all(|n| names.contains(n)) => {
                Built::Shared(entry)
            }
            Stage::Variant(_) => Built::Private(Private::new(entry, "vary")),
        })
    }
}

/// Why a fetch runs, as its span says.
fn role_name(role: BuildRole) -> &'static str {
    match role {
        BuildRole::Leader => "leader",
        BuildRole::Own => "own",
        BuildRole::Degraded => "degraded",
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
