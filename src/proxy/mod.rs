//! The proxy: route match, key, policy, then the engine; or straight through.
//!
//! - `upstream`: the pooled client and reading a response up to `max_body`.
//! - `respond`: client responses with `Age`, `X-Cache` and `Cache-Status`.
//!
//! A cacheable request becomes a flight in the engine. The leader's upstream fetch is the flight's
//! build: a storable answer is committed and shared; a private one (Set-Cookie, `private`,
//! `no-store`, a `Vary` outside the key, a body over `max_body`) goes back to its own client only,
//! and every other waiting request fetches for itself; a 5xx or an unreachable upstream fails the
//! flight, and everyone who joined gets the same answer at once.

mod respond;
mod upstream;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
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
    AnswerSource, BuildError, Builder, Built, Engine, EngineError, FailureCause, Policy, Source,
};
use crate::envelope::Entry;
use crate::key::{KeyHash, request_key};
use crate::policy::{
    RequestVerdict, ResponseVerdict, forward_headers, request_verdict, response_verdict,
    stale_windows,
};
pub use respond::Outcome;
use respond::{DETAIL, OVERFLOW, from_entry, internal, plain};
use upstream::{Buffered, Upstream, target};

/// How long connecting to an upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything a request needs; shared by every request of one replica.
pub struct Proxy {
    pub config: Arc<Config>,
    pub engine: Engine,
    upstream: Upstream,
    /// The engine policy of each route, in route order.
    policies: Vec<Policy>,
}

impl Proxy {
    pub fn new(config: Arc<Config>, engine: Engine) -> Self {
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
            })
            .collect();
        Self {
            config,
            engine,
            upstream: Upstream::new(CONNECT_TIMEOUT),
            policies,
        }
    }

    /// The first route that matches, by index.
    pub fn route_for(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Option<usize> {
        route_for(&self.config, method, uri, headers)
    }
}

/// The first route of `config` that matches a request, by index.
pub fn route_for(
    config: &Config,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Option<usize> {
    let host = request_host(uri, headers);
    config
        .routes
        .iter()
        .position(|route| route_matches(route, method, uri.path(), host.as_deref()))
}

/// The router of the public listener: every path goes to [`handle`].
pub fn app(proxy: Arc<Proxy>) -> Router {
    Router::new().fallback(handle).with_state(proxy)
}

fn route_matches(route: &Route, method: &Method, path: &str, host: Option<&str>) -> bool {
    let matcher = &route.matcher;
    if !matcher.methods.is_empty() && !matcher.methods.contains(method) {
        return false;
    }
    if let Some(wanted) = &matcher.host
        && host != Some(wanted.as_str())
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
            .map(|h| h.rsplit_once(':').map_or(h, |(host, _)| host).to_owned())
    })?;
    Some(raw.to_ascii_lowercase())
}

/// One request through the proxy.
pub async fn handle(State(proxy): State<Arc<Proxy>>, mut request: Request) -> Response<Body> {
    let started = tokio::time::Instant::now();
    let id = request_id(request.headers());
    request.headers_mut().insert(REQUEST_ID, id.clone());
    let route = proxy.route_for(request.method(), request.uri(), request.headers());
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let mut response = match route {
        Some(index) => answer(&proxy, index, request).await,
        None => plain(
            StatusCode::NOT_FOUND,
            "corral: no route matches this request\n".into(),
            Outcome::Bypass,
            "no-route",
        ),
    };
    response.headers_mut().insert(REQUEST_ID, id.clone());
    let label = route.map_or("none", |i| proxy.config.routes[i].name.as_str());
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
            HeaderValue::from_str(&format!("{:032x}", rand::random::<u128>()))
                .expect("hex is a valid header value")
        })
}

/// Answers one request on the route it matched (everything but its metrics and access log).
async fn answer(proxy: &Arc<Proxy>, index: usize, request: Request) -> Response<Body> {
    let client = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip());
    let (parts, body) = request.into_parts();
    let route = &proxy.config.routes[index];
    let verdict = if route.cache {
        request_verdict(route, &parts.method, &parts.headers)
    } else {
        RequestVerdict::Bypass("route-not-cached")
    };
    let direct = Direct {
        proxy,
        route,
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        headers: parts.headers.clone(),
        client,
    };
    if let RequestVerdict::Bypass(reason) = verdict {
        return direct.send(body, reason).await;
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
    let key = request_key(
        route,
        &parts.method,
        &parts.uri,
        &parts.headers,
        keyed_body.as_deref(),
    );
    // Only the query parameters the key kept reach the upstream: an ignored one could otherwise
    // shape an answer shared with clients who sent another value.
    let kept = crate::key::forwarded_query(&route.key.query, &parts.uri);
    let keyed_uri = with_query(&parts.uri, kept.as_deref());
    let Ok(upstream_uri) = target(&route.upstream, &keyed_uri) else {
        return plain(
            StatusCode::BAD_REQUEST,
            "corral: the request URI cannot be forwarded\n".into(),
            Outcome::Bypass,
            "bad-uri",
        );
    };
    let fetch = Arc::new(Fetch {
        proxy: proxy.clone(),
        route: index,
        method: parts.method.clone(),
        uri: upstream_uri,
        headers: {
            let mut headers = forward_headers(route, &parts.headers, true, client, "http");
            if let Some(id) = parts.headers.get(REQUEST_ID) {
                headers.insert(REQUEST_ID, id.clone());
            }
            headers
        },
        body: keyed_body.unwrap_or_default(),
        overflow: Mutex::new(None),
    });
    let head = parts.method == Method::HEAD;
    let answer = proxy
        .engine
        .fetch(
            &key.key.hash,
            &proxy.policies[index],
            fetch.builder(),
            route.policy.wait_timeout,
        )
        .await;
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
        Err(error) => plain(
            StatusCode::BAD_GATEWAY,
            format!("corral: {error}\n"),
            Outcome::Miss,
            "store-error",
        ),
    };
    let digest = key.key.hash.to_hex();
    response
        .extensions_mut()
        .insert(KeyPrefix(digest[..16].to_owned()));
    response
}

/// `uri` with its query replaced.
fn with_query(uri: &Uri, query: Option<&str>) -> Uri {
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
}

async fn read_limited(mut body: Body, limit: u64) -> Result<Bytes, BodyRead> {
    let mut read = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| BodyRead::Broken)?;
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
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    client: Option<std::net::IpAddr>,
}

impl Direct<'_> {
    async fn send(self, body: Body, reason: &str) -> Response<Body> {
        let Ok(uri) = target(&self.route.upstream, &self.uri) else {
            return plain(
                StatusCode::BAD_REQUEST,
                "corral: the request URI cannot be forwarded\n".into(),
                Outcome::Bypass,
                "bad-uri",
            );
        };
        let mut headers = forward_headers(self.route, &self.headers, false, self.client, "http");
        // A GET's or HEAD's body is never forwarded, so neither is its framing.
        let body = if self.method == Method::GET || self.method == Method::HEAD {
            headers.remove(http::header::CONTENT_LENGTH);
            headers.remove(http::header::TRANSFER_ENCODING);
            Body::empty()
        } else {
            body
        };
        // The response head must come within max_fetch; the body then streams for as long as it
        // takes, as it would without a proxy.
        let asked = tokio::time::Instant::now();
        let sent = tokio::time::timeout(
            self.route.policy.max_fetch,
            self.proxy
                .upstream
                .send(self.route.upstream_http2, self.method, uri, headers, body),
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
                respond::finish(
                    parts.status,
                    parts.headers,
                    Body::new(body),
                    Outcome::Bypass,
                    false,
                    Some(reason),
                )
            }
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
    route: usize,
    method: Method,
    uri: Uri,
    /// Already filtered for a cacheable request.
    headers: HeaderMap,
    /// The keyed request body (empty when the route does not key on it).
    body: Bytes,
    /// A response too large to buffer, handed to this fetch's own client to stream.
    overflow: Mutex<Option<Overflow>>,
}

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
    fn builder(self: &Arc<Self>) -> Builder {
        let fetch = self.clone();
        Arc::new(move || {
            let fetch = fetch.clone();
            Box::pin(async move { fetch.run().await })
        })
    }

    fn take_overflow(&self) -> Option<Overflow> {
        self.overflow.lock().expect("overflow lock").take()
    }

    async fn run(&self) -> Result<Built, BuildError> {
        let route = &self.proxy.config.routes[self.route];
        let body = if self.body.is_empty() {
            Body::empty()
        } else {
            Body::from(self.body.clone())
        };
        let asked = tokio::time::Instant::now();
        let sent = self
            .proxy
            .upstream
            .send(
                route.upstream_http2,
                self.method.clone(),
                self.uri.clone(),
                self.headers.clone(),
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
                // storable answer (501 Not Implemented, by default).
                if status.is_server_error()
                    && !route.policy.cache_statuses.contains(&status.as_u16())
                {
                    return Err(BuildError::with_response(
                        format!("upstream answered {status}"),
                        entry,
                    ));
                }
                match response_verdict(route, status, &headers) {
                    ResponseVerdict::Store { ttl } => {
                        entry.ttl = ttl;
                        let stale = stale_windows(route, &headers);
                        entry.stale = stale.while_revalidate;
                        entry.stale_if_error = stale.if_error;
                        Ok(Built::Shared(entry))
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

    #[tokio::test]
    async fn a_whole_body_is_read_whole() {
        let whole = body(vec![Ok(b"ab"), Ok(b"cd")]);
        assert_eq!(
            read_limited(whole, 4).await.ok(),
            Some(Bytes::from_static(b"abcd"))
        );
    }
}
