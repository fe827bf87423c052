//! The handler: one request from its arrival to its answer. Route, verdict, key, then the engine
//! (or straight through); the metrics and the access log from how it was answered.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use tokio::time::Instant;

use super::access::{AccessLine, printable};
use super::direct::Direct;
use super::fetch::{Fetch, Stage};
use super::ids::{REQUEST_ID, request_id};
use super::respond::{self, Answered, Outcome, body_too_large, broken_body, plain};
use super::route::{methods_allowed, route_for};
use super::{Proxy, Snapshot, authority};
use crate::config::{Config, OnWaitTimeout, Route};
use crate::engine::EngineError;
use crate::http::cache_control::CORRAL_CACHE_CONTROL;
use crate::http::verdict::{RequestVerdict, request_verdict};
use crate::metrics::OnSent;
use crate::telemetry::{Ended, RequestSpan};

/// One request through the proxy.
pub async fn handle(State(proxy): State<Arc<Proxy>>, mut request: Request) -> Response<Body> {
    let started = Instant::now();
    let id = request_id(request.headers());
    request.headers_mut().insert(REQUEST_ID, id.clone());
    // Nothing at all when traces are off; else the client's trace continues here, and what this
    // request sends upstream names its span.
    let span = RequestSpan::start(&mut request);
    // Taken before the request moves on, only when an access line will be written.
    let logged = AccessLine::enabled().then(|| {
        let client = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|info| info.0.ip());
        let user_agent = printable(request.headers().get(http::header::USER_AGENT));
        (client, user_agent)
    });
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
    let routed = route.map_or("none", |i| snapshot.config.routes[i].name.as_str());
    let request = proxy.engine.metrics().count_request(routed, request);
    let mut answered = match (canonical, route) {
        (Err(error), _) => plain(
            StatusCode::BAD_REQUEST,
            format!("corral: {error}\n"),
            Outcome::Bypass,
            "bad-host",
        ),
        (Ok(()), Some(index)) => answer(&proxy, &snapshot, index, request).await,
        (Ok(()), None) => unrouted(&snapshot.config, request.uri(), request.headers()),
    };
    let headers = answered.response.headers_mut();
    headers.insert(REQUEST_ID, id.clone());
    // Targeted at corral alone (RFC 9213): no client or cache past corral is to read it.
    headers.remove(CORRAL_CACHE_CONTROL);
    let label = route.map_or("none", |i| snapshot.config.routes[i].name.as_str());
    let outcome = answered.label();
    span.end(Ended {
        method: &method,
        route: label,
        path: &path,
        outcome,
        status: answered.response.status().as_u16(),
        key: answered.key.as_ref(),
        fetch: answered.fetch_id.as_ref(),
    });
    let elapsed = started.elapsed();
    let metrics = proxy.engine.metrics();
    metrics.requests.with_label_values(&[label, outcome]).inc();
    metrics
        .request_duration
        .with_label_values(&[label, outcome])
        .observe(elapsed.as_secs_f64());
    let on_sent = logged.map(|(client, user_agent)| {
        let line = AccessLine {
            request_id: id,
            method,
            path,
            route: label.to_owned(),
            outcome,
            status: answered.response.status().as_u16(),
            duration: elapsed,
            key: answered
                .key
                .map(|key| hex::encode(&key.as_bytes()[..8]))
                .unwrap_or_else(|| "-".to_owned()),
            fetch_id: answered.fetch_id,
            client,
            upstream: answered.upstream,
            user_agent,
        };
        Box::new(move |sent| line.write(sent)) as OnSent
    });
    metrics.count_response(label, answered.response, on_sent)
}

/// The answer to a request no route takes: `404`, or `405` with `Allow` when a route serves the
/// path with other methods (a PURGE, or an admin call sent to the public listener).
fn unrouted(config: &Config, uri: &Uri, headers: &HeaderMap) -> Answered {
    let allowed = methods_allowed(config, uri, headers);
    if allowed.is_empty() {
        return plain(
            StatusCode::NOT_FOUND,
            "corral: no route matches this request\n".into(),
            Outcome::Bypass,
            "no-route",
        );
    }
    let allow = allowed
        .iter()
        .map(Method::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    let mut answered = plain(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("corral: this path takes {allow}\n"),
        Outcome::Bypass,
        "method-not-allowed",
    );
    if let Ok(allow) = HeaderValue::from_str(&allow) {
        answered
            .response
            .headers_mut()
            .insert(http::header::ALLOW, allow);
    }
    answered
}

/// Answers one request on the route it matched (everything but its metrics and access log).
async fn answer(
    proxy: &Arc<Proxy>,
    snapshot: &Arc<Snapshot>,
    index: usize,
    request: Request,
) -> Answered {
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
        let answered = direct.send(body, reason).await;
        // Only the upstream's own success counts: corral's answers (bad URI, timeouts) are errors.
        let status = answered.response.status();
        if invalidates && (status.is_success() || status.is_redirection()) {
            proxy.invalidate_url(&parts.uri, &parts.headers).await;
        }
        return answered;
    }
    match keyed_body(route, body, proxy.engine.metrics()).await {
        Ok(keyed) => cached(proxy, snapshot, index, &parts, client, keyed, direct).await,
        Err(Unkeyable::Answered(answered)) => *answered,
        Err(Unkeyable::Oversized(body)) => direct.send(body, "request-too-large").await,
    }
}

/// Methods whose success makes the stored answers of their URL stale (RFC 9111 section 4.4):
/// every method but the safe ones (GET, HEAD, OPTIONS, TRACE; RFC 9110 section 9.2.1), so
/// WebDAV's and extension methods invalidate too.
fn is_unsafe(method: &Method) -> bool {
    !method.is_safe()
}

/// Why a cacheable request's body cannot be keyed.
enum Unkeyable {
    /// It gets this answer (it came too slowly, broke off, or grew past the listener's limit).
    Answered(Box<Answered>),
    /// It is larger than the route keys: the request goes straight through with this body.
    Oversized(Body),
}

/// The body as the key reads it: on body-keyed routes, read whole up to the route's `max_body`;
/// otherwise none (a GET's body is never forwarded).
async fn keyed_body(
    route: &Route,
    body: Body,
    metrics: &crate::metrics::Metrics,
) -> Result<Option<Bytes>, Unkeyable> {
    if !route.key.body {
        return Ok(None);
    }
    // A client that sends its body slower than the wait timeout allows is not waited for.
    let read = tokio::time::timeout(
        route.policy.wait_timeout,
        read_limited(body, route.policy.max_body),
    )
    .await;
    match read {
        Ok(Ok(bytes)) => Ok(Some(bytes)),
        Err(_elapsed) => Err(Unkeyable::Answered(Box::new(plain(
            StatusCode::REQUEST_TIMEOUT,
            "corral: the request body did not arrive within the wait timeout\n".into(),
            Outcome::Bypass,
            "request-timeout",
        )))),
        Ok(Err(BodyRead::TooLarge)) => Err(Unkeyable::Answered(Box::new(body_too_large()))),
        Ok(Err(BodyRead::Broken)) => {
            metrics.client_error("request_body");
            Err(Unkeyable::Answered(Box::new(broken_body())))
        }
        Ok(Err(BodyRead::Oversized { prefix, rest })) => {
            let stream = futures::stream::once(async move { Ok::<_, axum::Error>(prefix) })
                .chain(rest.into_data_stream());
            Err(Unkeyable::Oversized(Body::from_stream(stream)))
        }
    }
}

/// A cacheable request: its key, its flight in the engine (and its variant's, on a `vary: honor`
/// route), and the response for what the engine said.
async fn cached(
    proxy: &Arc<Proxy>,
    snapshot: &Arc<Snapshot>,
    index: usize,
    parts: &Arc<Parts>,
    client: Option<IpAddr>,
    keyed_body: Option<Bytes>,
    direct: Direct<'_>,
) -> Answered {
    let route = &snapshot.config.routes[index];
    // Only the query parameters the key kept reach the upstream: an ignored one could otherwise
    // shape an answer shared with clients who sent another value.
    let (key, kept) = proxy.key_and_query(
        route,
        &parts.method,
        &parts.uri,
        &parts.headers,
        keyed_body.as_deref(),
    );
    let asked = Instant::now();
    let mut fetch = Arc::new(Fetch {
        proxy: proxy.clone(),
        snapshot: snapshot.clone(),
        route: index,
        request: parts.clone(),
        client,
        kept,
        forward: OnceLock::new(),
        body: keyed_body.unwrap_or_default(),
        key: key.hash,
        stage: Stage::Primary,
        asked,
        upstream: OnceLock::new(),
    });
    let policy = &snapshot.policies[index];
    let wait = route.policy.wait_timeout;
    let mut result = proxy
        .engine
        .fetch(&key.hash, policy, fetch.builder(), wait)
        .await;
    // The primary key holds a vary marker: this request's answer is its own variant, one more
    // flight (one fetch per variant cluster-wide), within what is left of the wait.
    if let Ok(primary) = &result
        && let Some(variant) = fetch.variant_of(primary, &parts.headers)
    {
        let left = wait.saturating_sub(asked.elapsed());
        fetch = Arc::new(variant.fetch);
        result = (fetch.resolve_variant(&variant.key, variant.through, policy, left)).await;
    }
    let mut answered = match result {
        Ok(answer) => respond::answer(answer, &parts.method, &parts.headers),
        Err(EngineError::Timeout(_)) if route.policy.on_wait_timeout == OnWaitTimeout::Bypass => {
            direct
                .send(Body::from(fetch.body.clone()), "wait-timeout")
                .await
        }
        Err(error) => {
            if matches!(error, EngineError::TooManyFollowers { .. }) {
                proxy.engine.metrics().limit_rejected("followers");
            }
            respond::failure(
                error,
                route.policy.on_store_error,
                &parts.method,
                &parts.headers,
            )
        }
    };
    // A coding the client does not take (an answer the upstream encoded) is decoded as it goes.
    let metrics = proxy.engine.metrics();
    answered.response = super::encoding::deliver(answered.response, &parts.headers, route, metrics);
    answered.key = Some(key.hash);
    // This request's own fetch ran (it led, or fetched past a pass marker): its upstream time.
    answered.upstream = answered.upstream.or_else(|| fetch.upstream.get().copied());
    answered
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
