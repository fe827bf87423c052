//! The proxy: route match, key, policy, then the engine; or straight through.
//!
//! - `authority`: one canonical `Host` per request, before the route match reads it.
//! - `upstream`: the pooled client and reading a response up to `max_body`.
//! - `retire`: upstream connections that can be taken out of the pool after a bad answer.
//! - `respond`: client responses with `Age`, `X-Cache` and `Cache-Status`.
//! - `variant`: answers that vary outside the key, stored as variants on `vary: honor` routes.
//!
//! A cacheable request becomes a flight in the engine. The leader's upstream fetch is the flight's
//! build: a storable answer is committed and shared; a private one (Set-Cookie, `private`,
//! `no-store`, a `Vary` outside the key, a body over `max_body`) goes back to its own client only,
//! and every other waiting request fetches for itself; a 5xx or an unreachable upstream fails the
//! flight, and everyone who joined gets the same answer at once.
//!
//! Keys carry their route's generation (bumped by a whole-route purge), and the leader records
//! each key in the store's purge indexes (its route's path index when the fetch starts, so a
//! prefix purge during the fetch steals its lease; its surrogate tags once the answer is known).
//! A successful unsafe request (POST, PUT, PATCH, DELETE) that passed through a cached route
//! purges the GET and HEAD keys of its URL (RFC 9111 section 4.4).
//!
//! On a `vary: honor` route, an answer that varies on request headers outside the key is stored
//! as a variant, and a request that finds a marker at its key resolves its own variant next.
//! Purge indexes name the request key (the variant marker's): purging it orphans its variants,
//! since every variant key holds the marker's id.

mod authority;
mod respond;
mod retire;
mod slots;
mod upstream;
mod variant;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::config::{Config, OnWaitTimeout, PathMatch, Route};
use crate::engine::{
    AnswerSource, BuildError, Builder, Built, Engine, EngineError, FailureCause, OnStoreError,
    Policy, Source,
};
use crate::envelope::Entry;
use crate::http::forward::forward_headers;
use crate::http::key::{request_digest, request_digest_and_query};
use crate::http::verdict::{
    RequestVerdict, ResponseVerdict, jittered, request_verdict, response_verdict, stale_windows,
    vary_outside_key,
};
use crate::key::{Key, KeyHash, key_with_generation};
use crate::store::{IndexEntry, MAX_TAGS, valid_tag};
pub use respond::Outcome;
use respond::{DETAIL, OVERFLOW, from_entry, internal, plain};
use slots::UpstreamSlots;
use upstream::{Buffered, Upstream, target};
use variant::Stage;

/// How long connecting to an upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest wait for the purge indexes before a fetch goes on without them (a store that hangs
/// must not hold every miss for its whole call deadline).
const INDEX_BUDGET: Duration = Duration::from_millis(250);

/// Everything a request needs; shared by every request of one replica.
pub struct Proxy {
    pub engine: Engine,
    upstream: Upstream,
    /// The config requests start under. A reload swaps in a whole new snapshot at once; a request
    /// holds the one it started with until it ends, so it never sees half of each.
    ///
    /// A lock around an `Arc` rather than a lock-free swap: readers hold it only to clone the
    /// `Arc` (one uncontended read lock per request), and writers come once per reload.
    live: RwLock<Arc<Snapshot>>,
    /// Whether the server serves its config yet (or is shutting down), for `/readyz`.
    pub lifecycle: crate::lifecycle::Lifecycle,
    /// Each route's upstream requests in flight on this replica (`max_upstream_fetches`).
    slots: UpstreamSlots,
}

/// Exports every route's series at zero from the start, so dashboards and rates see a route's
/// first requests (a route a reload adds included).
fn add_routes(engine: &Engine, config: &Config) {
    for route in &config.routes {
        engine.metrics().add_route(route.name.as_str());
    }
}

/// One config as requests use it: the routes, and each route's engine policy.
pub struct Snapshot {
    pub config: Arc<Config>,
    /// The engine policy of each route, in route order.
    policies: Vec<Policy>,
}

impl Snapshot {
    fn new(config: Arc<Config>) -> Self {
        let policies = config
            .routes
            .iter()
            .map(|route| Policy {
                expiry: route.policy.expiry,
                lease_ttl: route.policy.lease_ttl,
                max_fetch: route.policy.max_fetch,
                poll_interval: route.policy.poll_interval,
                pass_ttl: route.policy.pass_ttl,
                label: route.name.as_str().into(),
                early_refresh: route.policy.early_refresh.map(|beta| beta.0),
                max_followers: route.policy.max_followers,
                on_store_error: route.policy.on_store_error,
            })
            .collect();
        Self { config, policies }
    }
}

impl Proxy {
    pub fn new(config: Arc<Config>, engine: Engine) -> Self {
        add_routes(&engine, &config);
        Self {
            engine,
            upstream: Upstream::new(CONNECT_TIMEOUT),
            live: RwLock::new(Arc::new(Snapshot::new(config))),
            lifecycle: crate::lifecycle::Lifecycle::new(),
            slots: UpstreamSlots::default(),
        }
    }

    /// The config new requests start under.
    pub fn config(&self) -> Arc<Config> {
        self.snapshot().config.clone()
    }

    /// The snapshot new requests start under.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        // A poisoned lock still holds a whole snapshot: the swap is one assignment.
        self.live
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Switches new requests to `config`; requests in flight finish under the one they started
    /// with. The caller has decided what of `config` may change without a restart.
    pub fn replace(&self, config: Config) {
        add_routes(&self.engine, &config);
        let snapshot = Arc::new(Snapshot::new(Arc::new(config)));
        *self.live.write().unwrap_or_else(PoisonError::into_inner) = snapshot;
    }

    /// The key of a request on `route`, under the route's current generation.
    pub fn key(
        &self,
        route: &Route,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: Option<&[u8]>,
    ) -> Key {
        let key = request_digest(route, method, uri, headers, body);
        key_with_generation(key, self.engine.generation(&route.name))
    }

    /// [`Proxy::key`], and the query to forward ([`crate::http::key::forwarded_query`]) from the same
    /// parsing of the request's query.
    fn key_and_query(
        &self,
        route: &Route,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: Option<&[u8]>,
    ) -> (Key, Option<String>) {
        let (key, query) = request_digest_and_query(route, method, uri, headers, body);
        let key = key_with_generation(key, self.engine.generation(&route.name));
        (key, query)
    }

    /// Purges the GET and HEAD keys of `uri` (as this client would key them) on every replica,
    /// after a successful unsafe request to it. Only what the URL and these headers determine is
    /// purged: variants keyed on other header or cookie values stay until they expire.
    async fn invalidate_url(&self, uri: &Uri, headers: &HeaderMap) {
        let config = self.config();
        for method in [Method::GET, Method::HEAD] {
            let Some(index) = route_for(&config, &method, uri, headers) else {
                continue;
            };
            let route = &config.routes[index];
            if !route.cache {
                continue;
            }
            let body = route.key.body.then_some(&[][..]);
            let key = self.key(route, &method, uri, headers, body);
            let metrics = self.engine.metrics();
            metrics.purges.with_label_values(&["unsafe_method"]).inc();
            match self.engine.delete(&key.hash).await {
                Ok(existed) => metrics
                    .purged_keys
                    .with_label_values(&["unsafe_method"])
                    .inc_by(u64::from(existed)),
                Err(error) => tracing::warn!(route = %route.name, path = uri.path(), %error,
                    "could not purge a URL after an unsafe request to it"),
            }
        }
    }
}

/// Methods whose success makes the stored answers of their URL stale (RFC 9111 section 4.4).
fn is_unsafe(method: &Method) -> bool {
    [Method::POST, Method::PUT, Method::PATCH, Method::DELETE].contains(method)
}

/// The first route of `config` that matches a request, by index.
pub fn route_for(
    config: &Config,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Option<usize> {
    // Worked out only for the first route that matches on the host: most match on paths alone.
    let host = std::cell::OnceCell::new();
    let host = || host.get_or_init(|| request_host(uri, headers)).as_deref();
    config
        .routes
        .iter()
        .position(|route| route_matches(route, method, uri.path(), &host))
}

/// The methods the routes matching a request's path and host take, when none takes its method:
/// what a `405`'s `Allow` lists. Empty when no route matches the path at all (a `404`).
fn methods_allowed(config: &Config, uri: &Uri, headers: &HeaderMap) -> Vec<Method> {
    let host = std::cell::OnceCell::new();
    let host = || host.get_or_init(|| request_host(uri, headers)).as_deref();
    let mut allowed: Vec<Method> = Vec::new();
    for route in &config.routes {
        let methods = &route.matcher.methods;
        if let Some(first) = methods.first()
            && route_matches(route, first, uri.path(), &host)
        {
            for method in methods {
                if !allowed.contains(method) {
                    allowed.push(method.clone());
                }
            }
        }
    }
    allowed
}

/// The router of the public listener: every path goes to [`handle`].
pub fn app(proxy: Arc<Proxy>) -> Router {
    Router::new().fallback(handle).with_state(proxy)
}

fn route_matches<'h>(
    route: &Route,
    method: &Method,
    path: &str,
    host: &impl Fn() -> Option<&'h str>,
) -> bool {
    let matcher = &route.matcher;
    if !matcher.methods.is_empty() && !matcher.methods.contains(method) {
        return false;
    }
    if let Some(wanted) = &matcher.host
        && host() != Some(wanted.as_str())
    {
        return false;
    }
    match &matcher.path {
        PathMatch::Exact(exact) => path == exact,
        PathMatch::Prefix(prefix) => path.starts_with(prefix.as_str()),
        PathMatch::Regex(regex) => regex.is_match(path),
    }
}

/// The request's host, lowercase and without a port.
fn request_host(uri: &Uri, headers: &HeaderMap) -> Option<String> {
    let raw = uri.host().map(str::to_owned).or_else(|| {
        headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            // As an authority, so an IPv6 literal's colons are not taken for a port's.
            .and_then(|h| h.parse::<http::uri::Authority>().ok())
            .map(|authority| authority.host().to_owned())
    })?;
    Some(raw.to_ascii_lowercase())
}

/// One request through the proxy.
pub async fn handle(State(proxy): State<Arc<Proxy>>, mut request: Request) -> Response<Body> {
    let started = tokio::time::Instant::now();
    let id = request_id(request.headers());
    request.headers_mut().insert(REQUEST_ID, id.clone());
    // Routing, the key and the upstream all read the authority after this, so they read one.
    let canonical = authority::canonicalise(&mut request);
    let snapshot = proxy.snapshot();
    let route = match canonical {
        Ok(()) => route_for(
            &snapshot.config,
            request.method(),
            request.uri(),
            request.headers(),
        ),
        Err(_) => None,
    };
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let mut response = match (canonical, route) {
        (Err(error), _) => plain(
            StatusCode::BAD_REQUEST,
            format!("corral: {error}\n"),
            Outcome::Bypass,
            "bad-host",
        ),
        (Ok(()), Some(index)) => answer(&proxy, &snapshot, index, request).await,
        (Ok(()), None) => {
            let allowed = methods_allowed(&snapshot.config, request.uri(), request.headers());
            if allowed.is_empty() {
                plain(
                    StatusCode::NOT_FOUND,
                    "corral: no route matches this request\n".into(),
                    Outcome::Bypass,
                    "no-route",
                )
            } else {
                // A route serves this path, not with this method (a PURGE, or an admin call
                // sent to the public listener): say which methods it takes.
                let allow = allowed
                    .iter()
                    .map(Method::as_str)
                    .collect::<Vec<_>>()
                    .join(", ");
                let mut response = plain(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!("corral: this path takes {allow}\n"),
                    Outcome::Bypass,
                    "method-not-allowed",
                );
                if let Ok(allow) = HeaderValue::from_str(&allow) {
                    response.headers_mut().insert(http::header::ALLOW, allow);
                }
                response
            }
        }
    };
    response.headers_mut().insert(REQUEST_ID, id.clone());
    let label = route.map_or("none", |i| snapshot.config.routes[i].name.as_str());
    let outcome = if response.status().is_server_error() {
        "error"
    } else {
        match response
            .headers()
            .get("x-cache")
            .and_then(|v| v.to_str().ok())
        {
            Some("HIT") => "hit",
            Some("MISS") => "miss",
            Some("COALESCED") => "coalesced",
            Some("STALE") => "stale",
            Some("PASS") => "pass",
            _ => "bypass",
        }
    };
    let metrics = proxy.engine.metrics();
    metrics.requests.with_label_values(&[label, outcome]).inc();
    metrics
        .request_duration
        .with_label_values(&[label, outcome])
        .observe(started.elapsed().as_secs_f64());
    let key = response
        .extensions()
        .get::<KeyPrefix>()
        .map_or("-", |k| k.0.as_str());
    tracing::info!(
        target: "corral::access",
        request_id = id.to_str().unwrap_or("-"),
        %method,
        path,
        route = label,
        outcome,
        status = response.status().as_u16(),
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        key,
        "request"
    );
    response
}

/// The request id header: accepted from the client when sane, else generated; sent upstream and
/// back to the client.
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The first 16 hex digits of a request's key digest, for the access log.
#[derive(Clone)]
struct KeyPrefix(String);

/// The client's request id if it is short visible ASCII, else a fresh random one.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(REQUEST_ID)
        .filter(|v| {
            let bytes = v.as_bytes();
            !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(u8::is_ascii_graphic)
        })
        .cloned()
        .unwrap_or_else(|| {
            // 32 hex digits written in place: this runs for most requests.
            let mut hex = [0u8; 32];
            hex::encode_to_slice(rand::random::<u128>().to_be_bytes(), &mut hex)
                .expect("16 bytes are 32 hex digits");
            HeaderValue::from_bytes(&hex).expect("hex is a valid header value")
        })
}

/// Answers one request on the route it matched (everything but its metrics and access log).
async fn answer(
    proxy: &Arc<Proxy>,
    snapshot: &Arc<Snapshot>,
    index: usize,
    request: Request,
) -> Response<Body> {
    let client = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip());
    let (parts, body) = request.into_parts();
    // Shared with the fetch, which forwards from it only if it runs.
    let parts = Arc::new(parts);
    let route = &snapshot.config.routes[index];
    let verdict = if route.cache {
        request_verdict(route, &parts.method, &parts.headers)
    } else {
        RequestVerdict::Bypass("route-not-cached")
    };
    // Borrowed: most requests never go straight through, and copying the headers is not free.
    let direct = Direct {
        proxy,
        route,
        method: &parts.method,
        uri: &parts.uri,
        headers: &parts.headers,
        client,
    };
    if let RequestVerdict::Bypass(reason) = verdict {
        let invalidates = route.cache && is_unsafe(&parts.method);
        let response = direct.send(body, reason).await;
        // Only the upstream's own success counts: corral's answers (bad URI, timeouts) are errors.
        let status = response.status();
        if invalidates && (status.is_success() || status.is_redirection()) {
            proxy.invalidate_url(&parts.uri, &parts.headers).await;
        }
        return response;
    }

    // The body is part of the key only on body-keyed routes; a GET's body is never forwarded.
    let keyed_body = if route.key.body {
        // A client that sends its body slower than the wait timeout allows is not waited for.
        let read = tokio::time::timeout(
            route.policy.wait_timeout,
            read_limited(body, route.policy.max_body),
        )
        .await;
        match read {
            Err(_elapsed) => {
                return plain(
                    StatusCode::REQUEST_TIMEOUT,
                    "corral: the request body did not arrive within the wait timeout\n".into(),
                    Outcome::Bypass,
                    "request-timeout",
                );
            }
            Ok(Err(BodyRead::TooLarge)) => return body_too_large(),
            Ok(Err(BodyRead::Broken)) => {
                return plain(
                    StatusCode::BAD_REQUEST,
                    "corral: the request body broke off\n".into(),
                    Outcome::Bypass,
                    "request-body",
                );
            }
            Ok(Ok(bytes)) => Some(bytes),
            Ok(Err(BodyRead::Oversized { prefix, rest })) => {
                let stream = futures::stream::once(async move { Ok::<_, axum::Error>(prefix) })
                    .chain(rest.into_data_stream());
                return direct
                    .send(Body::from_stream(stream), "request-too-large")
                    .await;
            }
        }
    } else {
        None
    };
    // Only the query parameters the key kept reach the upstream: an ignored one could otherwise
    // shape an answer shared with clients who sent another value.
    let (key, kept) = proxy.key_and_query(
        route,
        &parts.method,
        &parts.uri,
        &parts.headers,
        keyed_body.as_deref(),
    );
    let fetch = Arc::new(Fetch {
        proxy: proxy.clone(),
        snapshot: snapshot.clone(),
        route: index,
        request: parts.clone(),
        client,
        kept,
        forward: OnceLock::new(),
        body: keyed_body.unwrap_or_default(),
        overflow: Mutex::new(None),
        key: key.hash,
        stage: Stage::Primary,
        asked: tokio::time::Instant::now(),
    });
    let head = parts.method == Method::HEAD;
    let asked = tokio::time::Instant::now();
    let policy = &snapshot.policies[index];
    let mut answer = proxy
        .engine
        .fetch(
            &key.hash,
            policy,
            fetch.builder(),
            route.policy.wait_timeout,
        )
        .await;
    // The primary key holds a vary marker: this request's answer is its own variant, one more
    // flight (one fetch per variant cluster-wide), within what is left of the wait.
    let mut fetch = fetch;
    if let Ok(primary) = &answer
        && let Some(variant) = fetch.variant_of(primary, &parts.headers)
    {
        let left = route.policy.wait_timeout.saturating_sub(asked.elapsed());
        fetch = Arc::new(variant.fetch);
        answer = (fetch.resolve_variant(&variant.key, variant.through, policy, left)).await;
    }
    let mut response = match answer {
        Ok(answer) => match answer.source {
            AnswerSource::Shared(source) => {
                let (outcome, stored, age) = match source {
                    Source::L1 | Source::Store => (Outcome::Hit, false, Some(age(&answer.entry))),
                    Source::Built => (Outcome::Miss, true, Some(0)),
                    Source::Coalesced => (Outcome::Coalesced, false, Some(age(&answer.entry))),
                    Source::Degraded => (Outcome::Miss, false, None),
                    Source::StaleRevalidating | Source::StaleOnError => {
                        (Outcome::Stale, false, Some(age(&answer.entry)))
                    }
                };
                let detail = match source {
                    Source::Degraded => Some("store-unavailable"),
                    Source::StaleRevalidating => Some("stale-while-revalidate"),
                    Source::StaleOnError => Some("stale-if-error"),
                    _ => None,
                };
                from_entry(&answer.entry, outcome, stored, detail, age, head)
            }
            AnswerSource::Own => {
                let detail = internal(&answer.entry, DETAIL);
                if internal(&answer.entry, OVERFLOW).is_some()
                    && let Some(overflow) = fetch.take_overflow()
                {
                    return overflow.into_response(detail.as_deref(), head);
                }
                from_entry(
                    &answer.entry,
                    Outcome::Pass,
                    false,
                    detail.as_deref(),
                    None,
                    head,
                )
            }
        },
        Err(EngineError::Build(failure)) => match &failure.response {
            Some(entry) => from_entry(
                entry,
                Outcome::Miss,
                false,
                Some("upstream-error"),
                None,
                head,
            ),
            None if failure.cause == FailureCause::Overran => plain(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "corral: the upstream did not answer in time: {}\n",
                    failure.message
                ),
                Outcome::Miss,
                "max-fetch",
            ),
            None => plain(
                StatusCode::BAD_GATEWAY,
                format!("corral: {}\n", failure.message),
                Outcome::Miss,
                "upstream-error",
            ),
        },
        Err(EngineError::Timeout(waited)) => match route.policy.on_wait_timeout {
            OnWaitTimeout::Bypass => {
                let body = Body::from(fetch.body.clone());
                direct.send(body, "wait-timeout").await
            }
            OnWaitTimeout::Error => plain(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "corral: no answer from the upstream within the wait timeout ({})\n",
                    humantime::format_duration(waited)
                ),
                Outcome::Coalesced,
                "wait-timeout",
            ),
        },
        Err(EngineError::Closed) => plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "corral: shutting down\n".into(),
            Outcome::Bypass,
            "shutting-down",
        ),
        Err(EngineError::TooManyFollowers { stale }) => {
            proxy.engine.metrics().limit_rejected("followers");
            match stale {
                Some(entry) => from_entry(
                    &entry,
                    Outcome::Stale,
                    false,
                    Some("max-followers"),
                    Some(age(&entry)),
                    head,
                ),
                None => busy(
                    "corral: too many requests are waiting for this answer\n",
                    "max-followers",
                ),
            }
        }
        // `on_store_error: closed`: the route will not fetch without the store; the client may
        // try again shortly (the store's breaker probes it at least once a second).
        Err(EngineError::Store(error)) if route.policy.on_store_error == OnStoreError::Closed => {
            let mut response = plain(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "corral: the cache store is unavailable, and this route does not fetch \
                     without it: {error}\n"
                ),
                Outcome::Miss,
                "store-unavailable-closed",
            );
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
        Err(error) => plain(
            StatusCode::BAD_GATEWAY,
            format!("corral: {error}\n"),
            Outcome::Miss,
            "store-error",
        ),
    };
    response
        .extensions_mut()
        .insert(KeyPrefix(hex::encode(&key.hash.as_bytes()[..8])));
    response
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

/// Seconds since the entry was stored, by the wall clock.
fn age(entry: &Entry) -> u64 {
    crate::engine::unix_ms().saturating_sub(entry.stored_at_ms) / 1000
}

/// Why a request body was not read whole.
enum BodyRead {
    /// Larger than allowed: what was read, and the rest.
    Oversized { prefix: Bytes, rest: Body },
    /// The client's body failed mid-way; a partial body must never become a key.
    Broken,
    /// The body grew past the listener's `max_request_body`.
    TooLarge,
}

async fn read_limited(mut body: Body, limit: u64) -> Result<Bytes, BodyRead> {
    let mut read = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| {
            if crate::connections::body_too_large(&error) {
                BodyRead::TooLarge
            } else {
                BodyRead::Broken
            }
        })?;
        if let Ok(data) = frame.into_data() {
            read.extend_from_slice(&data);
            if read.len() as u64 > limit {
                return Err(BodyRead::Oversized {
                    prefix: read.freeze(),
                    rest: body,
                });
            }
        }
    }
    Ok(read.freeze())
}

/// A request sent straight to the upstream and streamed both ways; nothing is stored.
struct Direct<'a> {
    proxy: &'a Proxy,
    route: &'a Route,
    method: &'a Method,
    uri: &'a Uri,
    headers: &'a HeaderMap,
    client: Option<std::net::IpAddr>,
}

impl Direct<'_> {
    async fn send(self, body: Body, reason: &str) -> Response<Body> {
        let Ok(uri) = target(&self.route.upstream, self.uri) else {
            return plain(
                StatusCode::BAD_REQUEST,
                "corral: the request URI cannot be forwarded\n".into(),
                Outcome::Bypass,
                "bad-uri",
            );
        };
        let mut headers = forward_headers(self.route, self.headers, false, self.client, "http");
        // A GET's or HEAD's body is never forwarded, so neither is its framing.
        let body = if *self.method == Method::GET || *self.method == Method::HEAD {
            headers.remove(http::header::CONTENT_LENGTH);
            headers.remove(http::header::TRANSFER_ENCODING);
            Body::empty()
        } else {
            body
        };
        let policy = &self.route.policy;
        let until = tokio::time::Instant::now() + policy.wait_timeout;
        let Some(slot) = (self.proxy.slots)
            .take(&self.route.name, policy.max_upstream_fetches, until)
            .await
        else {
            self.proxy
                .engine
                .metrics()
                .limit_rejected("upstream_fetches");
            return busy(
                "corral: too many requests to this upstream at once\n",
                "max-upstream-fetches",
            );
        };
        // The response head must come within max_fetch; the body then streams for as long as it
        // takes, as it would without a proxy.
        let asked = tokio::time::Instant::now();
        let sent = tokio::time::timeout(
            self.route.policy.max_fetch,
            self.proxy.upstream.send(
                self.route.upstream_http2,
                self.method.clone(),
                uri,
                headers,
                body,
            ),
        )
        .await;
        let status = match &sent {
            Ok(Ok(response)) => Some(response.status()),
            _ => None,
        };
        observe_upstream(self.proxy, &self.route.name, status, asked);
        let Ok(sent) = sent else {
            return plain(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "corral: the upstream did not answer within max_fetch ({})\n",
                    humantime::format_duration(self.route.policy.max_fetch)
                ),
                Outcome::Bypass,
                "max-fetch",
            );
        };
        match sent {
            Ok(response) => {
                let (parts, body) = response.into_parts();
                // The slot is held until the answer has streamed through.
                let body = crate::connections::Guarded { body, guard: slot };
                respond::finish(
                    parts.status,
                    parts.headers,
                    Body::new(body),
                    Outcome::Bypass,
                    false,
                    Some(reason),
                )
            }
            Err(upstream::UpstreamError::RequestBodyTooLarge) => body_too_large(),
            Err(error) => plain(
                StatusCode::BAD_GATEWAY,
                format!("corral: {error}\n"),
                Outcome::Bypass,
                "upstream-unreachable",
            ),
        }
    }
}

/// The leader's upstream fetch for one key (and each caller's own, for keys that may not be shared).
struct Fetch {
    proxy: Arc<Proxy>,
    /// The config the request started under (a reload does not change a fetch under way).
    snapshot: Arc<Snapshot>,
    route: usize,
    /// The client's request, shared with its handler.
    request: Arc<http::request::Parts>,
    client: Option<IpAddr>,
    /// The query the key kept: only it reaches the upstream.
    kept: Option<String>,
    /// What goes upstream, worked out on first use (see [`Fetch::forward`]).
    forward: OnceLock<Option<Forward>>,
    /// The keyed request body (empty when the route does not key on it).
    body: Bytes,
    /// A response too large to buffer, handed to this fetch's own client to stream.
    overflow: Mutex<Option<Overflow>>,
    /// The request's (primary) key, for the purge indexes (with the request's path).
    key: KeyHash,
    stage: Stage,
    /// When the request that started this fetch arrived: its wait for an upstream slot ends in
    /// time for that request to be answered 503 before its own wait timeout.
    asked: tokio::time::Instant,
}

/// What a fetch sends upstream: the upstream URI with only the kept query, and the request's
/// headers as the route forwards them (already filtered for a cacheable request).
struct Forward {
    uri: Uri,
    headers: HeaderMap,
}

/// The part of a request's wait timeout left for answering it once a fetch found no upstream
/// slot: a fifth of it, at most this long.
const SLOT_MARGIN: Duration = Duration::from_secs(1);

/// A response over `max_body`: its head, what was read, and the rest still coming.
struct Overflow {
    status: StatusCode,
    headers: HeaderMap,
    prefix: Bytes,
    rest: Incoming,
}

impl Overflow {
    fn into_response(self, detail: Option<&str>, head: bool) -> Response<Body> {
        let body = if head {
            Body::empty()
        } else {
            let prefix = self.prefix;
            let stream = futures::stream::once(async move { Ok::<_, hyper::Error>(prefix) })
                .chain(self.rest.into_data_stream());
            Body::from_stream(stream)
        };
        respond::finish(
            self.status,
            self.headers,
            body,
            Outcome::Pass,
            false,
            detail,
        )
    }
}

impl Fetch {
    /// What this fetch sends upstream, worked out on its first use: most requests are answered
    /// without a fetch, and a hit never pays for forwarding. `None` when the URI cannot be
    /// forwarded.
    fn forward(&self) -> Option<&Forward> {
        self.forward
            .get_or_init(|| {
                let route = &self.snapshot.config.routes[self.route];
                let request = &*self.request;
                let keyed = with_query(&request.uri, self.kept.as_deref());
                let uri = target(&route.upstream, &keyed).ok()?;
                let mut headers =
                    forward_headers(route, &request.headers, true, self.client, "http");
                if let Some(id) = request.headers.get(REQUEST_ID) {
                    headers.insert(REQUEST_ID, id.clone());
                }
                Some(Forward { uri, headers })
            })
            .as_ref()
    }

    fn builder(self: &Arc<Self>) -> Builder {
        let fetch = self.clone();
        Arc::new(move || {
            let fetch = fetch.clone();
            Box::pin(async move { fetch.run().await })
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

    fn take_overflow(&self) -> Option<Overflow> {
        self.overflow.lock().expect("overflow lock").take()
    }

    async fn run(&self) -> Result<Built, BuildError> {
        let route = &self.snapshot.config.routes[self.route];
        let Some(forward) = self.forward() else {
            return Err(BuildError::new("the request URI cannot be forwarded"));
        };
        let body = if self.body.is_empty() {
            Body::empty()
        } else {
            Body::from(self.body.clone())
        };
        // Indexed before the fetch starts, so that a prefix purge from the moment the upstream
        // could have answered finds the key and steals its lease (one store call per fill); kept
        // as long as the lease can live, or as long as the route keeps a value it stores by its
        // own settings if that is longer, so that most answers need no second index call before
        // their commit. Only a fill under the lease: a request's own fetch (a pass) or a degraded
        // one stores nothing.
        let may_be_stored = crate::engine::build_may_be_stored();
        let policy = &route.policy;
        let indexed_for = (policy.max_fetch + policy.lease_ttl)
            .max(policy.ttl + policy.stale_while_revalidate.max(policy.stale_if_error));
        if may_be_stored {
            self.index(Vec::new(), indexed_for).await;
        }
        // Within the wait timeout of the request that started the fetch, leaving it time to be
        // answered 503 rather than reach its own deadline.
        let wait = route.policy.wait_timeout;
        let until = self.asked + wait - (wait / 5).min(SLOT_MARGIN);
        let Some(_slot) = (self.proxy.slots)
            .take(&route.name, route.policy.max_upstream_fetches, until)
            .await
        else {
            self.proxy
                .engine
                .metrics()
                .limit_rejected("upstream_fetches");
            return Err(BuildError::with_response(
                "too many requests to this upstream at once",
                busy_entry("corral: too many requests to this upstream at once\n"),
            ));
        };
        let asked = tokio::time::Instant::now();
        let sent = self
            .proxy
            .upstream
            .send(
                route.upstream_http2,
                self.request.method.clone(),
                forward.uri.clone(),
                forward.headers.clone(),
                body,
            )
            .await;
        let status = sent.as_ref().ok().map(|response| response.status());
        observe_upstream(&self.proxy, &route.name, status, asked);
        let response = sent.map_err(|error| unreachable_error(error.to_string()))?;
        let buffered = upstream::buffer(response, route.policy.max_body)
            .await
            .map_err(|error| unreachable_error(error.to_string()))?;
        match buffered {
            Buffered::Whole {
                status,
                headers,
                body,
            } => {
                let mut entry = entry(status, &headers, body, route.policy.ttl);
                // A 5xx is a failure for everyone who joined, unless the route lists it as a
                // storable answer (501 Not Implemented, by default) or gives it an error TTL.
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
                match response_verdict(route, status, &headers) {
                    ResponseVerdict::Store { ttl } => {
                        entry.ttl = jittered(ttl, route.policy.ttl_jitter, &mut rand::rng());
                        let stale = stale_windows(route, &headers);
                        entry.stale = stale.while_revalidate;
                        entry.stale_if_error = stale.if_error;
                        // Before the commit: a tag purge from now on steals the lease. The index
                        // lives as long as the entry may still be served; the first call already
                        // covers an untagged answer that the upstream gave no longer life.
                        let served_for = entry.ttl + entry.stale.max(entry.stale_if_error);
                        let tags = surrogate_tags(&headers);
                        if may_be_stored && (!tags.is_empty() || served_for > indexed_for) {
                            self.index(tags, served_for).await;
                        }
                        // Only a `vary: honor` route stores a response that varies outside its key.
                        let outside = vary_outside_key(route, &headers).unwrap_or_default();
                        match &self.stage {
                            _ if outside.is_empty() => Ok(Built::Shared(entry)),
                            Stage::Primary => Ok(self.store_variant(entry, outside).await),
                            Stage::Variant(names) if outside.iter().all(|n| names.contains(n)) => {
                                Ok(Built::Shared(entry))
                            }
                            Stage::Variant(_) => {
                                entry
                                    .headers
                                    .push((DETAIL.into(), Bytes::from_static(b"vary")));
                                Ok(Built::Private(entry))
                            }
                        }
                    }
                    ResponseVerdict::Pass(reason) => {
                        entry
                            .headers
                            .push((DETAIL.into(), Bytes::from_static(reason.as_bytes())));
                        Ok(Built::Private(entry))
                    }
                }
            }
            Buffered::Overflow {
                status,
                headers,
                prefix,
                rest,
            } => {
                let mut marker = entry(status, &HeaderMap::new(), Bytes::new(), Duration::ZERO);
                marker
                    .headers
                    .push((DETAIL.into(), Bytes::from_static(b"too-large")));
                marker
                    .headers
                    .push((OVERFLOW.into(), Bytes::from_static(b"1")));
                *self.overflow.lock().expect("overflow lock") = Some(Overflow {
                    status,
                    headers,
                    prefix,
                    rest,
                });
                Ok(Built::Private(marker))
            }
        }
    }
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

/// Counts one upstream request by route and status class (`error` when nothing came back).
fn observe_upstream(
    proxy: &Proxy,
    route: &str,
    status: Option<StatusCode>,
    asked: tokio::time::Instant,
) {
    let class = match status.map(|s| s.as_u16() / 100) {
        Some(1) => "1xx",
        Some(2) => "2xx",
        Some(3) => "3xx",
        Some(4) => "4xx",
        Some(5) => "5xx",
        _ => "error",
    };
    let metrics = proxy.engine.metrics();
    metrics
        .upstream_requests
        .with_label_values(&[route, class])
        .inc();
    metrics
        .upstream_duration
        .with_label_values(&[route])
        .observe(asked.elapsed().as_secs_f64());
}

/// The failure every waiter gets when the upstream cannot be reached.
fn unreachable_error(message: String) -> BuildError {
    let body = Bytes::from(format!("corral: {message}\n"));
    let headers = vec![(
        "content-type".to_owned(),
        Bytes::from_static(b"text/plain; charset=utf-8"),
    )];
    BuildError::with_response(
        message,
        Entry {
            status: StatusCode::BAD_GATEWAY.as_u16(),
            headers,
            body,
            stored_at_ms: 0,
            ttl: Duration::ZERO,
            stale: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            fetch_time: Duration::ZERO,
            key: KeyHash::from_bytes([0; 32]),
        },
    )
}

/// 503 with `Retry-After`: a limit of this replica refused the request; another try, here or on
/// another replica, may succeed.
fn busy(text: &'static str, detail: &str) -> Response<Body> {
    let mut response = plain(
        StatusCode::SERVICE_UNAVAILABLE,
        text.into(),
        Outcome::Bypass,
        detail,
    );
    response
        .headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// [`busy`] as the failure every caller of a flight gets.
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

/// 413: the request body grew past the listener's `max_request_body` while it streamed.
fn body_too_large() -> Response<Body> {
    plain(
        StatusCode::PAYLOAD_TOO_LARGE,
        "corral: the request body is too large\n".into(),
        Outcome::Bypass,
        "request-too-large",
    )
}

/// An entry from an upstream response (headers already free of hop-by-hop ones).
fn entry(status: StatusCode, headers: &HeaderMap, body: Bytes, ttl: Duration) -> Entry {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(chunks: Vec<Result<&'static [u8], std::io::Error>>) -> Body {
        Body::from_stream(futures::stream::iter(
            chunks.into_iter().map(|c| c.map(Bytes::from_static)),
        ))
    }

    #[test]
    fn the_host_a_route_matches_has_no_port() {
        let host = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(http::header::HOST, value.parse().unwrap());
            request_host(&Uri::from_static("/"), &headers)
        };
        assert_eq!(host("Example.com:8080").as_deref(), Some("example.com"));
        assert_eq!(host("example.com").as_deref(), Some("example.com"));
        assert_eq!(host("[::1]").as_deref(), Some("[::1]"));
        assert_eq!(host("[::1]:8080").as_deref(), Some("[::1]"));
    }

    #[tokio::test]
    async fn a_body_that_breaks_off_is_never_a_key() {
        let broken = body(vec![Ok(b"{\"q\":"), Err(std::io::Error::other("reset"))]);
        assert!(matches!(
            read_limited(broken, 1024).await,
            Err(BodyRead::Broken)
        ));
    }

    #[tokio::test]
    async fn a_body_over_the_limit_keeps_what_was_read_and_the_rest() {
        let big = body(vec![Ok(b"abc"), Ok(b"def"), Ok(b"ghi")]);
        let Err(BodyRead::Oversized { prefix, rest }) = read_limited(big, 4).await else {
            panic!("not oversized")
        };
        assert_eq!(prefix, Bytes::from_static(b"abcdef"));
        let rest = rest.collect().await.unwrap().to_bytes();
        assert_eq!(rest, Bytes::from_static(b"ghi"));
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

    #[tokio::test]
    async fn a_whole_body_is_read_whole() {
        let whole = body(vec![Ok(b"ab"), Ok(b"cd")]);
        assert_eq!(
            read_limited(whole, 4).await.ok(),
            Some(Bytes::from_static(b"abcd"))
        );
    }
}
