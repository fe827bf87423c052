//! The direct pass-through: a request that may not use the cache, sent straight to the upstream
//! and streamed both ways; nothing is stored.

use std::net::IpAddr;

use axum::body::Body;
use http::{HeaderMap, Method, StatusCode, Uri};

use super::Proxy;
use super::respond::{self, Answered, Outcome, body_too_large, broken_body, busy, plain};
use super::upstream::{self, UpstreamError, target};
use crate::config::Route;
use crate::http::forward::forward_headers;

/// A request sent straight to the upstream. Borrowed: most requests never go straight through,
/// and copying the headers is not free.
pub(super) struct Direct<'a> {
    pub proxy: &'a Proxy,
    pub route: &'a Route,
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    pub client: Option<IpAddr>,
}

impl Direct<'_> {
    /// Sends the request with `body`; `reason` is why it went straight through, for
    /// `Cache-Status`.
    pub async fn send(self, body: Body, reason: &str) -> Answered {
        let Ok(uri) = target(&self.route.upstream, self.uri) else {
            return plain(
                StatusCode::BAD_REQUEST,
                "corral: the request URI cannot be forwarded\n".into(),
                Outcome::Bypass,
                "bad-uri",
            );
        };
        let mut headers = forward_headers(self.route, self.headers, false, self.client, "http");
        let body = forwarded_body(self.method, &mut headers, body);
        let policy = &self.route.policy;
        let metrics = self.proxy.engine.metrics();
        let until = tokio::time::Instant::now() + policy.wait_timeout;
        let Some(slot) = (self.proxy.slots)
            .take(&self.route.name, policy.max_upstream_fetches, until)
            .await
        else {
            metrics.limit_rejected("upstream_fetches");
            return busy(
                "corral: too many requests to this upstream at once\n",
                "max-upstream-fetches",
            );
        };
        // The response head must come within max_fetch; the body then streams for as long as it
        // takes, as it would without a proxy.
        let asked = tokio::time::Instant::now();
        let sent = tokio::time::timeout(
            policy.max_fetch,
            self.proxy.upstream.send(
                self.route.upstream_http2,
                self.method.clone(),
                uri,
                headers,
                body,
            ),
        )
        .await;
        // A request the client broke never reached the upstream as a whole: not the upstream's
        // error, so not counted against it.
        match &sent {
            Ok(Err(error)) if error.is_client_fault() => {}
            Ok(Ok(response)) => {
                upstream::observe(metrics, &self.route.name, Some(response.status()), asked)
            }
            _ => upstream::observe(metrics, &self.route.name, None, asked),
        }
        match sent {
            Err(_elapsed) => plain(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "corral: the upstream did not answer within max_fetch ({})\n",
                    humantime::format_duration(policy.max_fetch)
                ),
                Outcome::Bypass,
                "max-fetch",
            ),
            Ok(Ok(response)) => {
                let (parts, body) = response.into_parts();
                // The slot is held until the answer has streamed through.
                let body = crate::connections::Guarded { body, _guard: slot };
                respond::finish(
                    parts.status,
                    parts.headers,
                    Body::new(body),
                    Outcome::Bypass,
                    false,
                    Some(reason),
                )
            }
            Ok(Err(UpstreamError::RequestBodyTooLarge)) => body_too_large(),
            Ok(Err(UpstreamError::RequestBodyBroken)) => {
                metrics.client_error("request_body");
                broken_body()
            }
            Ok(Err(error)) => plain(
                StatusCode::BAD_GATEWAY,
                format!("corral: {error}\n"),
                Outcome::Bypass,
                "upstream-unreachable",
            ),
        }
    }
}

/// The body sent on: none for a GET or HEAD, whose body is never forwarded (nor its framing).
fn forwarded_body(method: &Method, headers: &mut HeaderMap, body: Body) -> Body {
    if *method == Method::GET || *method == Method::HEAD {
        headers.remove(http::header::CONTENT_LENGTH);
        headers.remove(http::header::TRANSFER_ENCODING);
        Body::empty()
    } else {
        body
    }
}
