//! The upstream client: hyper-util's pooled client (plain HTTP: HTTP/1.1, or HTTP/2 with prior
//! knowledge per route), which forwards exactly what it is given (no
//! redirects followed, no decompression, no headers added behind our back).

use std::time::Duration;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use super::retire::{Retire, RetiringConnector};
use crate::http::hop_by_hop::strip_hop_by_hop;
use crate::metrics::Metrics;

/// Idle pooled connections are closed after this long.
const POOL_IDLE: Duration = Duration::from_secs(60);

/// The most an HTTP/1.1 upstream connection reads ahead of what was taken from it (hyper grows
/// its buffer up to about 400 KiB by default): a pass-through whose client stopped reading
/// holds this, so it is kept small. It also bounds an upstream's response head.
const READ_BUFFER: usize = 64 << 10;

/// Pooled clients for every upstream: HTTP/1.1, and HTTP/2 with prior knowledge for routes that
/// ask for it (`upstream_http2: true`).
#[derive(Clone)]
pub struct Upstream {
    http1: Client<RetiringConnector, Body>,
    http2: Client<RetiringConnector, Body>,
}

/// Why the upstream gave no response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    #[error("upstream response body failed: {0}")]
    Body(String),
    #[error("upstream response framing is ambiguous: {0}")]
    Framing(&'static str),
    /// The client's request body grew past the listener's `max_request_body` while it was being
    /// sent on.
    #[error("the request body is too large")]
    RequestBodyTooLarge,
    /// The client's request body broke off while it was being sent on (bad chunked framing, a
    /// short body): the client's fault, not the upstream's.
    #[error("the request body broke off")]
    RequestBodyBroken,
}

impl UpstreamError {
    /// Whether the client, not the upstream, made the request fail.
    pub fn is_client_fault(&self) -> bool {
        matches!(
            self,
            UpstreamError::RequestBodyTooLarge | UpstreamError::RequestBodyBroken
        )
    }
}

/// A response read up to a limit.
pub enum Buffered {
    /// The whole body fitted.
    Whole {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
    /// The body is larger than the limit.
    Overflow(Overflow),
}

/// A response whose body is larger than the limit: its head, what was read, and the rest still
/// to stream.
pub struct Overflow {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub prefix: Bytes,
    pub rest: Incoming,
}

impl Upstream {
    pub fn new(connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.enforce_http(true);
        let connector = RetiringConnector::new(connector);
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .http1_max_buf_size(READ_BUFFER)
            .build(connector.clone());
        let http2 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .http2_only(true)
            .build(connector);
        Self { http1, http2 }
    }

    /// Sends one request; the response's hop-by-hop headers are removed.
    pub async fn send(
        &self,
        http2: bool,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Body,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut request = Request::builder()
            .method(method)
            .uri(uri.clone())
            .body(body)
            .map_err(|e| UpstreamError::Unreachable(e.to_string()))?;
        *request.headers_mut() = headers;
        // The upstream's own Host, unless the route keys on the client's (then it was forwarded).
        if !request.headers().contains_key(http::header::HOST)
            && let Some(authority) = uri.authority()
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            request.headers_mut().insert(http::header::HOST, host);
        }
        let client = if http2 { &self.http2 } else { &self.http1 };
        let mut response = client.request(request).await.map_err(|e| {
            if crate::connections::body_too_large(&e) {
                UpstreamError::RequestBodyTooLarge
            } else if crate::connections::request_body_broken(&e) {
                UpstreamError::RequestBodyBroken
            } else {
                UpstreamError::Unreachable(crate::errors::chain(&e))
            }
        })?;
        // Two lengths let two parsers read two different bodies (RFC 9112 section 6.1 calls it a
        // likely smuggling attempt): the answer is refused, and its connection carries nothing
        // more (hyper would pool it: the chunked body it read was complete).
        if response
            .headers()
            .contains_key(http::header::TRANSFER_ENCODING)
            && response
                .headers()
                .contains_key(http::header::CONTENT_LENGTH)
        {
            if let Some(retire) = response.extensions().get::<Retire>() {
                retire.retire();
            }
            return Err(UpstreamError::Framing(
                "both Transfer-Encoding and Content-Length",
            ));
        }
        strip_hop_by_hop(response.headers_mut());
        // Only corral names a fetch: an upstream's header of that name would be logged as one.
        response.headers_mut().remove(super::fetch::FETCH_ID);
        Ok(response)
    }
}

/// Reads a response body up to `limit` bytes.
pub async fn buffer(response: Response<Incoming>, limit: u64) -> Result<Buffered, UpstreamError> {
    let (parts, mut body) = response.into_parts();
    let mut read = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| UpstreamError::Body(crate::errors::chain(&e)))?;
        if let Ok(data) = frame.into_data() {
            read.extend_from_slice(&data);
            if read.len() as u64 > limit {
                return Ok(Buffered::Overflow(Overflow {
                    status: parts.status,
                    headers: parts.headers,
                    prefix: read.freeze(),
                    rest: body,
                }));
            }
        }
    }
    Ok(Buffered::Whole {
        status: parts.status,
        headers: parts.headers,
        body: read.freeze(),
    })
}

/// Counts one upstream request by route and status class (`error` when nothing came back).
pub fn observe(metrics: &Metrics, route: &str, status: Option<StatusCode>, asked: Instant) {
    let class = match status.map(|s| s.as_u16() / 100) {
        Some(1) => "1xx",
        Some(2) => "2xx",
        Some(3) => "3xx",
        Some(4) => "4xx",
        Some(5) => "5xx",
        _ => "error",
    };
    metrics
        .upstream_requests
        .with_label_values(&[route, class])
        .inc();
    metrics
        .upstream_duration
        .with_label_values(&[route])
        .observe(asked.elapsed().as_secs_f64());
}

/// The upstream URI for a request: the route's upstream, with the request's path and query
/// appended to the upstream's own path.
pub fn target(upstream: &Uri, request: &Uri) -> Result<Uri, http::Error> {
    let base = upstream.path().trim_end_matches('/');
    let path_and_query = request.path_and_query().map_or("/", |pq| pq.as_str());
    Uri::builder()
        .scheme(upstream.scheme_str().unwrap_or("http"))
        .authority(upstream.authority().map_or("", |a| a.as_str()))
        .path_and_query(format!("{base}{path_and_query}"))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_appends_path_and_query_to_the_upstream_path() {
        let upstream: Uri = "http://127.0.0.1:9000/api/".parse().unwrap();
        let request: Uri = "/reports/1?x=2".parse().unwrap();
        assert_eq!(
            target(&upstream, &request).unwrap(),
            "http://127.0.0.1:9000/api/reports/1?x=2"
        );
        let bare: Uri = "http://up:80".parse().unwrap();
        assert_eq!(
            target(&bare, &request).unwrap(),
            "http://up:80/reports/1?x=2"
        );
    }
}
