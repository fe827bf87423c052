//! The upstream client: one hyper-util pooled client per route, made from the route's
//! [`UpstreamSettings`] (TLS, timeouts, headers), which forwards exactly what it is given plus
//! the route's own headers (no redirects followed, no decompression).
//!
//! An `https` upstream is reached with rustls (see `config::upstream`): ALPN offers `h2` and
//! `http/1.1`, and the client speaks whichever the server picks. Every failure is classified
//! ([`UpstreamError::reason`]), counted in `corral_upstream_errors_total` and logged with its
//! cause (a TLS failure names what was wrong with the certificate).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prometheus::IntCounterVec;
use rustls::pki_types::ServerName;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::retire::{Retire, RetiringConnector};
use crate::config::{Config, Protocol, Route, UpstreamSettings};
use crate::http::hop_by_hop::strip_hop_by_hop;
use crate::metrics::Metrics;

/// How deep [`classify`] looks into an error's causes (a chain is a handful long).
const MAX_CAUSES: usize = 16;

/// Idle pooled connections are closed after this long.
const POOL_IDLE: Duration = Duration::from_secs(60);

/// The most an HTTP/1.1 upstream connection reads ahead of what was taken from it (hyper grows
/// its buffer up to about 400 KiB by default): a pass-through whose client stopped reading
/// holds this, so it is kept small. It also bounds an upstream's response head.
const READ_BUFFER: usize = 64 << 10;

/// Every route's pooled client, made from its upstream settings.
pub struct Upstream {
    clients: RwLock<HashMap<String, RouteClient>>,
    errors: IntCounterVec,
}

/// One route's client and the settings it was made from.
#[derive(Clone)]
struct RouteClient {
    settings: Arc<UpstreamSettings>,
    client: Client<Timed, Body>,
    /// Which client this is (a kept pool keeps its number), for the debug log and tests.
    id: u64,
}

/// Which timeout of a route fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timeout {
    Connect,
    ResponseHeader,
    Read,
}

impl Timeout {
    /// The setting's name, which is also its metric reason and (dashed) its `Cache-Status`
    /// detail.
    pub fn setting(self) -> &'static str {
        match self {
            Timeout::Connect => "connect_timeout",
            Timeout::ResponseHeader => "response_header_timeout",
            Timeout::Read => "read_timeout",
        }
    }
}

/// Why the upstream gave no response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    #[error("upstream tls failed: {0}")]
    Tls(String),
    #[error("upstream {} ({}) elapsed", .0.setting(), humantime::format_duration(*.1))]
    Timeout(Timeout, Duration),
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

impl UpstreamError {
    /// The `reason` label of `corral_upstream_errors_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            UpstreamError::Unreachable(_) => "connect",
            // Never counted (see `Upstream::send`); named for completeness.
            UpstreamError::RequestBodyTooLarge | UpstreamError::RequestBodyBroken => "request_body",
            UpstreamError::Tls(_) => "tls",
            UpstreamError::Timeout(Timeout::Connect, _) => "connect_timeout",
            UpstreamError::Timeout(which, _) => which.setting(),
            UpstreamError::Body(_) => "body",
            UpstreamError::Framing(_) => "framing",
        }
    }

    /// 504 for a timeout, 502 for any other failure.
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::Timeout(..) => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

/// The `Cache-Status` detail of a failed fetch, from its message ([`UpstreamError`]'s, which is
/// what a failure carries to every waiter, on every replica).
pub fn failure_detail(message: &str) -> &'static str {
    let timeouts = [Timeout::Connect, Timeout::ResponseHeader, Timeout::Read];
    for which in timeouts {
        if message.starts_with(&format!("upstream {} (", which.setting())) {
            return match which {
                Timeout::Connect => "connect-timeout",
                Timeout::ResponseHeader => "response-header-timeout",
                Timeout::Read => "read-timeout",
            };
        }
    }
    if message.starts_with("upstream tls failed") {
        return "upstream-tls";
    }
    "upstream-error"
}

/// A response whose body is read under the route's `read_timeout`.
pub type UpstreamResponse = Response<IdleTimed>;

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
    pub rest: IdleTimed,
}

impl Upstream {
    pub fn new(config: &Config, metrics: &Metrics) -> Self {
        let upstream = Upstream {
            clients: RwLock::default(),
            errors: metrics.upstream_errors.clone(),
        };
        upstream.prepare(config);
        upstream
    }

    /// Makes the clients of `config`'s routes, keeping those whose settings did not change (and
    /// so their pooled connections).
    pub fn prepare(&self, config: &Config) {
        let mut clients = self.clients.write().unwrap_or_else(PoisonError::into_inner);
        let fresh = config
            .routes
            .iter()
            .map(|route| {
                let client = match clients.get(&route.name) {
                    // The new config's own value, so its requests find it by pointer.
                    Some(known) if known.settings == route.upstream_settings => RouteClient {
                        settings: route.upstream_settings.clone(),
                        ..known.clone()
                    },
                    _ => {
                        let made = RouteClient::new(route);
                        tracing::debug!(route = %route.name, client = made.id,
                            "a new upstream client and pool for the route");
                        made
                    }
                };
                (route.name.clone(), client)
            })
            .collect();
        *clients = fresh;
    }

    /// The client of `route`: the prepared one, or (for a request still under a config a reload
    /// replaced with other settings) one made for it.
    fn client(&self, route: &Route) -> RouteClient {
        let clients = self.clients.read().unwrap_or_else(PoisonError::into_inner);
        match clients.get(&route.name) {
            Some(known)
                if Arc::ptr_eq(&known.settings, &route.upstream_settings)
                    || known.settings == route.upstream_settings =>
            {
                known.clone()
            }
            _ => RouteClient::new(route),
        }
    }

    /// Sends one request with the route's headers, within its timeouts; the response's
    /// hop-by-hop headers are removed. A failure is counted and logged here.
    pub async fn send(
        &self,
        route: &Route,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Body,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let client = self.client(route);
        let settings = &*client.settings;
        let result = self
            .request(&client, method, uri.clone(), headers, body)
            .await;
        let result = result.map(|response| {
            let timeouts = self
                .errors
                .with_label_values(&[&route.name, "read_timeout"]);
            let read = ReadWatch {
                timeout: settings.read_timeout,
                timeouts,
                route: route.name.clone(),
                upstream: uri.clone(),
            };
            response.map(|body| IdleTimed::new(body, read))
        });
        match &result {
            // The client's fault, not the upstream's: answered 4xx, not counted here.
            Err(error) if error.is_client_fault() => {}
            Ok(_) => {}
            Err(error) => self.failed(route, &uri, error),
        }
        result
    }

    /// Counts and logs one failure (a read timeout is counted and logged by the body).
    fn failed(&self, route: &Route, uri: &Uri, error: &UpstreamError) {
        (self.errors)
            .with_label_values(&[&route.name, error.reason()])
            .inc();
        let upstream = uri.authority().map_or("", |a| a.as_str());
        tracing::warn!(route = %route.name, upstream, reason = error.reason(), %error,
            "upstream request failed");
    }

    async fn request(
        &self,
        client: &RouteClient,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Body,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let settings = &*client.settings;
        let mut request = Request::builder()
            .method(method)
            .uri(uri.clone())
            .body(body)
            .map_err(|e| UpstreamError::Unreachable(e.to_string()))?;
        *request.headers_mut() = headers;
        apply_headers(settings, &uri, request.headers_mut());
        let sending = client.client.request(request);
        let sent = match settings.response_header_timeout {
            Some(timeout) => match tokio::time::timeout(timeout, sending).await {
                Ok(sent) => sent,
                Err(_elapsed) => {
                    return Err(UpstreamError::Timeout(Timeout::ResponseHeader, timeout));
                }
            },
            // max_fetch bounds it (the engine's deadline, or the pass-through's own).
            None => sending.await,
        };
        let mut response = sent.map_err(classify)?;
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
        response.headers_mut().remove(super::ids::FETCH_ID);
        Ok(response)
    }
}

/// The route's `upstream_headers` (remove, set, add) and its `Host`: the route's `host:`, else
/// the client's when the route keys on it (then it was forwarded), else the upstream's own.
fn apply_headers(settings: &UpstreamSettings, uri: &Uri, headers: &mut HeaderMap) {
    let rules = &settings.headers;
    for name in &rules.remove {
        headers.remove(name);
    }
    for (name, value) in &rules.set {
        headers.insert(name.clone(), value.clone());
    }
    for (name, value) in &rules.add {
        headers.append(name.clone(), value.clone());
    }
    if let Some(host) = &settings.host {
        headers.insert(http::header::HOST, host.clone());
    } else if !headers.contains_key(http::header::HOST)
        && let Some(authority) = uri.authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        headers.insert(http::header::HOST, host);
    }
}

/// What a failed request was: a connect timeout, a TLS failure (named by rustls), a request body
/// too large, or an unreachable upstream.
fn classify(error: hyper_util::client::legacy::Error) -> UpstreamError {
    if crate::connections::body_too_large(&error) {
        return UpstreamError::RequestBodyTooLarge;
    }
    if crate::connections::request_body_broken(&error) {
        return UpstreamError::RequestBodyBroken;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    let mut depth = 0;
    while let Some(cause) = source.filter(|_| depth < MAX_CAUSES) {
        if let Some(timed_out) = cause.downcast_ref::<ConnectTimedOut>() {
            return UpstreamError::Timeout(Timeout::Connect, timed_out.0);
        }
        if let Some(tls) = cause.downcast_ref::<rustls::Error>() {
            return UpstreamError::Tls(tls.to_string());
        }
        // An io::Error's `source` skips the error it wraps, which may be rustls's (wrapped twice
        // by the TLS connector): look inside it instead.
        source = match cause
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => cause.source(),
        };
        depth += 1;
    }
    UpstreamError::Unreachable(crate::errors::chain(&error))
}

impl RouteClient {
    fn new(route: &Route) -> Self {
        let settings = route.upstream_settings.clone();
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        let tls = HttpsConnectorBuilder::new()
            .with_tls_config((*settings.tls.config).clone())
            .https_or_http();
        // SNI and verification take the route's name for the server, when it gives one.
        let server_name = settings.tls.server_name.clone().or_else(|| {
            let host = settings.host.as_ref()?.to_str().ok()?;
            let authority: http::uri::Authority = host.parse().ok()?;
            Some(authority.host().trim_matches(['[', ']']).to_string())
        });
        let name = server_name.and_then(|name| ServerName::try_from(name).ok());
        let tls = match name {
            Some(name) => tls.with_server_name_resolver(FixedServerNameResolver::new(name)),
            None => tls,
        };
        // ALPN: h2 then http/1.1, or h2 alone for a route that speaks nothing else.
        let tls = match settings.protocol {
            Protocol::Negotiated => tls.enable_all_versions(),
            Protocol::Http2 => tls.enable_http2(),
        };
        let connector = Timed {
            inner: tls.wrap_connector(RetiringConnector::new(http)),
            timeout: settings.connect_timeout,
        };
        let mut builder = Client::builder(TokioExecutor::new());
        builder.pool_idle_timeout(POOL_IDLE);
        builder.http1_max_buf_size(READ_BUFFER);
        if settings.protocol == Protocol::Http2 {
            builder.http2_only(true);
        }
        static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        RouteClient {
            client: builder.build(connector),
            settings,
            id: MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }
}

// ----- the connect timeout

/// A connect (TCP and TLS handshake) that took longer than the route's `connect_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("connect_timeout ({}) elapsed", humantime::format_duration(*.0))]
struct ConnectTimedOut(Duration);

/// The route's connector, bounded by its `connect_timeout` when it has one of its own.
#[derive(Clone)]
struct Timed {
    inner: HttpsConnector<RetiringConnector>,
    timeout: Option<Duration>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Connecting = <HttpsConnector<RetiringConnector> as Service<Uri>>::Response;

impl Service<Uri> for Timed {
    type Response = Connecting;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Connecting, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let timeout = self.timeout;
        Box::pin(async move {
            let Some(timeout) = timeout else {
                return connecting.await;
            };
            match tokio::time::timeout(timeout, connecting).await {
                Ok(connected) => connected,
                Err(_elapsed) => Err(Box::new(ConnectTimedOut(timeout)) as BoxError),
            }
        })
    }
}

// ----- the read timeout

/// Why an upstream body stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Body(#[from] hyper::Error),
    #[error("upstream read_timeout ({}) elapsed", humantime::format_duration(*.0))]
    Idle(Duration),
}

/// An upstream body that fails when no chunk comes for the route's `read_timeout`.
pub struct IdleTimed {
    inner: Incoming,
    sleep: Pin<Box<Sleep>>,
    read: ReadWatch,
}

/// What a body's read timeout needs: its length, and what to count and log when it fires.
struct ReadWatch {
    timeout: Duration,
    /// `corral_upstream_errors_total{reason="read_timeout"}` of the route.
    timeouts: prometheus::IntCounter,
    route: String,
    upstream: Uri,
}

impl IdleTimed {
    fn new(inner: Incoming, read: ReadWatch) -> Self {
        IdleTimed {
            inner,
            sleep: Box::pin(tokio::time::sleep(read.timeout)),
            read,
        }
    }
}

impl hyper::body::Body for IdleTimed {
    type Data = Bytes;
    type Error = ReadError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ReadError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = Instant::now() + this.read.timeout;
                this.sleep.as_mut().reset(deadline);
                Poll::Ready(frame.map(|f| f.map_err(ReadError::Body)))
            }
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let read = &this.read;
                    read.timeouts.inc();
                    let error = ReadError::Idle(read.timeout);
                    let upstream = read.upstream.authority().map_or("", |a| a.as_str());
                    tracing::warn!(route = %read.route, upstream, reason = "read_timeout",
                        %error, "upstream request failed");
                    Poll::Ready(Some(Err(error)))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Reads a response body up to `limit` bytes.
pub async fn buffer(response: UpstreamResponse, limit: u64) -> Result<Buffered, UpstreamError> {
    let (parts, mut body) = response.into_parts();
    let mut read = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| match e {
            ReadError::Idle(after) => UpstreamError::Timeout(Timeout::Read, after),
            ReadError::Body(e) => UpstreamError::Body(crate::errors::chain(&e)),
        })?;
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

    fn config(route_lines: &str) -> Config {
        let text = format!(
            "routes:\n  - name: a\n    match: {{path_prefix: /}}\n    upstream: http://127.0.0.1:1\n{route_lines}"
        );
        crate::config::parse(&text, "corral.yaml").expect("a valid config")
    }

    #[test]
    fn a_reload_keeps_the_pool_of_a_route_whose_upstream_settings_did_not_change() {
        let first = config("    connect_timeout: 2s\n");
        let upstream = Upstream::new(&first, &Metrics::new());
        let before = upstream.client(&first.routes[0]).id;
        // Equal settings, another value: the pool is kept, and found by the new config.
        let same = config("    connect_timeout: 2s\n    ttl: 5m\n");
        upstream.prepare(&same);
        assert_eq!(upstream.client(&same.routes[0]).id, before);
        assert_eq!(upstream.client(&first.routes[0]).id, before);
        let other = config("    connect_timeout: 3s\n");
        upstream.prepare(&other);
        let after = upstream.client(&other.routes[0]).id;
        assert_ne!(after, before);
        assert_eq!(upstream.client(&other.routes[0]).id, after);
    }

    #[test]
    fn a_failure_message_names_its_detail_on_every_replica() {
        let second = Duration::from_secs(1);
        let cases = [
            (
                UpstreamError::Timeout(Timeout::Connect, second),
                "connect-timeout",
            ),
            (
                UpstreamError::Timeout(Timeout::ResponseHeader, second),
                "response-header-timeout",
            ),
            (
                UpstreamError::Timeout(Timeout::Read, second),
                "read-timeout",
            ),
            (UpstreamError::Tls("UnknownIssuer".into()), "upstream-tls"),
            (
                UpstreamError::Unreachable("refused".into()),
                "upstream-error",
            ),
        ];
        for (error, detail) in cases {
            assert_eq!(failure_detail(&error.to_string()), detail, "{error}");
        }
        assert_eq!(
            UpstreamError::Timeout(Timeout::Read, second).status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(failure_detail("upstream answered 503"), "upstream-error");
    }

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
