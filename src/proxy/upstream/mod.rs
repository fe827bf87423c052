//! The upstream client: a pool per route, made from the route's [`UpstreamSettings`] (TLS,
//! timeouts, headers, servers, balance, health checks, outlier ejection, retries), which forwards
//! exactly what it is given plus the route's own headers (no redirects followed, no
//! decompression).
//!
//! - `pool`: the servers of a route and which one a request goes to;
//! - `outlier`: where one server stands (health, ejection);
//! - `health`: the pool's background task (health checks, names resolved again);
//! - `resolve`: a name stands for each of its addresses;
//! - `retry`: which failures are sent again, and the retry budget;
//! - `client`: one server's hyper client (TLS, connect timeout);
//! - `body`: the response body under `read_timeout`, buffered for a fetch.
//!
//! An `https` upstream is reached with rustls (see `config::upstream`): ALPN offers `h2` and
//! `http/1.1`, and the client speaks whichever the server picks. Every failure is classified
//! ([`UpstreamError::reason`]), counted in `corral_upstream_errors_total` and logged with its
//! cause (a TLS failure names what was wrong with the certificate).

mod body;
mod client;
mod health;
mod outlier;
mod pool;
mod resolve;
mod retry;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use prometheus::IntCounterVec;
use tokio::time::Instant;

pub use body::{Buffered, IdleTimed, Overflow, ReadError, UpstreamResponse, buffer};
pub use retry::idempotent;

use self::body::ReadWatch;
use self::client::ConnectTimedOut;
use self::pool::{Pool, Server};
use self::retry::RetryReason;
use super::retire::Retire;
use crate::config::{Config, Route, UpstreamSettings};
use crate::http::hop_by_hop::strip_hop_by_hop;
use crate::key::KeyHash;
use crate::metrics::{Metrics, UpstreamServerMetrics};

/// How deep [`classify`] looks into an error's causes (a chain is a handful long).
const MAX_CAUSES: usize = 16;

/// Every route's pool, made from its upstream settings.
pub struct Upstream {
    pools: RwLock<HashMap<String, Arc<Pool>>>,
    errors: IntCounterVec,
    servers: UpstreamServerMetrics,
}

/// A request's body as the upstream client takes it: one that is held whole can be sent again.
pub enum RequestBody {
    /// Held whole (a cacheable fetch's, or none): a retry sends it again.
    Buffered(Bytes),
    /// Streamed from the client as it comes: sent once, never retried.
    Streaming(Body),
}

impl RequestBody {
    /// `body` as it came: buffered when it is already known to be empty.
    pub fn from_body(body: Body) -> Self {
        use hyper::body::Body as _;
        match body.is_end_stream() {
            true => RequestBody::Buffered(Bytes::new()),
            false => RequestBody::Streaming(body),
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, RequestBody::Buffered(_))
    }

    /// The body for one try (a buffered body stays for the next).
    fn take(&mut self) -> Body {
        match self {
            RequestBody::Buffered(bytes) if bytes.is_empty() => Body::empty(),
            RequestBody::Buffered(bytes) => Body::from(bytes.clone()),
            RequestBody::Streaming(body) => std::mem::replace(body, Body::empty()),
        }
    }
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
    /// The connection broke after the request went out, before the response head.
    #[error("upstream connection reset before the response head: {0}")]
    Reset(String),
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
            UpstreamError::Reset(_) => "reset",
            // Never counted (see `Upstream::send`); named for completeness.
            UpstreamError::RequestBodyTooLarge | UpstreamError::RequestBodyBroken => "request_body",
            UpstreamError::Tls(_) => "tls",
            UpstreamError::Timeout(Timeout::Connect, _) => "connect_timeout",
            UpstreamError::Timeout(which, _) => which.setting(),
            UpstreamError::Body(_) => "body",
            UpstreamError::Framing(_) => "framing",
        }
    }

    /// Why a try that failed so may be sent again (see `retry`); `None`: it may not.
    fn retry_reason(&self) -> Option<RetryReason> {
        match self {
            UpstreamError::Unreachable(_)
            | UpstreamError::Tls(_)
            | UpstreamError::Timeout(Timeout::Connect, _) => Some(RetryReason::Connect),
            UpstreamError::Reset(_) => Some(RetryReason::Reset),
            UpstreamError::Timeout(Timeout::ResponseHeader, _) => {
                Some(RetryReason::ResponseHeaderTimeout)
            }
            _ => None,
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

impl Upstream {
    pub fn new(config: &Config, metrics: &Metrics) -> Self {
        let upstream = Upstream {
            pools: RwLock::default(),
            errors: metrics.upstream_errors.clone(),
            servers: metrics.upstream_servers.clone(),
        };
        upstream.prepare(config);
        upstream
    }

    /// Makes the pools of `config`'s routes, keeping those whose settings did not change (and
    /// so their connections, health, ejections and retry budget); the series of servers no pool
    /// has any more are removed.
    pub fn prepare(&self, config: &Config) {
        let mut pools = self.pools.write().unwrap_or_else(PoisonError::into_inner);
        let fresh: HashMap<String, Arc<Pool>> = config
            .routes
            .iter()
            .map(|route| {
                let pool = match pools.get(&route.name) {
                    Some(known) if known.settings == route.upstream_settings => known.clone(),
                    _ => {
                        let made = Pool::new(route, &self.servers);
                        if made.wants_watching()
                            && let Ok(runtime) = tokio::runtime::Handle::try_current()
                        {
                            let task = runtime.spawn(health::watch(Arc::downgrade(&made)));
                            made.watched_by(task.abort_handle());
                        }
                        tracing::debug!(route = %route.name, pool = made.id,
                            "a new upstream pool for the route");
                        made
                    }
                };
                (route.name.clone(), pool)
            })
            .collect();
        let labels = |pools: &HashMap<String, Arc<Pool>>| -> HashSet<(String, String)> {
            let each = pools.iter().flat_map(|(route, pool)| {
                pool.labels()
                    .into_iter()
                    .map(|label| (route.clone(), label))
            });
            each.collect()
        };
        let kept = labels(&fresh);
        for (route, server) in labels(&pools).difference(&kept) {
            self.servers.forget(route, server);
        }
        *pools = fresh;
    }

    /// The pool of `route`: the prepared one, or (for a request still under a config a reload
    /// replaced with other settings) one made for it, without health checks.
    fn pool(&self, route: &Route) -> Arc<Pool> {
        let pools = self.pools.read().unwrap_or_else(PoisonError::into_inner);
        match pools.get(&route.name) {
            Some(known)
                if Arc::ptr_eq(&known.settings, &route.upstream_settings)
                    || known.settings == route.upstream_settings =>
            {
                known.clone()
            }
            _ => Pool::new(route, &UpstreamServerMetrics::detached()),
        }
    }

    /// Sends one request with the route's headers, within its timeouts, to a server of its pool;
    /// the response's hop-by-hop headers are removed. `key` is the cache key, which `key_hash`
    /// maps to a server (without one, the URL is hashed). An idempotent request with a buffered
    /// body is retried on another server as the route's `retries` allow (see `retry`). A failure
    /// is counted and logged here.
    pub async fn send(
        &self,
        route: &Route,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        mut body: RequestBody,
        key: Option<&KeyHash>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let pool = self.pool(route);
        let retries = &pool.settings.pool.retries;
        let attempts = match idempotent(&method) && body.replayable() {
            true => retries.attempts.max(1),
            false => 1,
        };
        let affinity = match key {
            Some(key) => key.as_bytes().as_slice(),
            None => uri
                .path_and_query()
                .map_or(b"/".as_slice(), |pq| pq.as_str().as_bytes()),
        };
        // Only a request that may be retried earns the budget retries.
        if attempts > 1 {
            pool.budget.deposit();
        }
        let mut tried: Vec<Arc<Server>> = Vec::new();
        let mut headers = Some(headers);
        for attempt in 1..=attempts {
            let server = pool.pick(affinity, &tried);
            let last = attempt == attempts;
            // The last try takes the headers; the others send copies.
            let headers = match last {
                true => headers.take(),
                false => headers.clone(),
            };
            let headers = headers.unwrap_or_default();
            let sent = self.try_once(route, &pool, &server, &method, &uri, headers, body.take());
            let result = sent.await;
            let reason = match &result {
                Ok(response) if retries.statuses.contains(&response.status().as_u16()) => {
                    Some(RetryReason::Status)
                }
                Ok(_) => None,
                Err(error) => error.retry_reason(),
            };
            let Some(reason) = reason.filter(|_| !last) else {
                return result;
            };
            if !pool.budget.withdraw() {
                (self.servers.retry_budget_exhausted)
                    .with_label_values(&[&route.name])
                    .inc();
                tracing::debug!(route = %route.name, server = %server.label,
                    "the retry budget is spent: the try's outcome is the answer");
                return result;
            }
            (self.servers.retries)
                .with_label_values(&[&route.name, reason.label()])
                .inc();
            tracing::debug!(route = %route.name, server = %server.label,
                reason = reason.label(), attempt, "retrying on another server");
            tried.push(server);
        }
        unreachable!("the last attempt returns")
    }

    /// One try on `server`: counted, and its outcome recorded for outlier ejection.
    #[allow(clippy::too_many_arguments)]
    async fn try_once(
        &self,
        route: &Route,
        pool: &Pool,
        server: &Arc<Server>,
        method: &Method,
        uri: &Uri,
        headers: HeaderMap,
        body: Body,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let in_flight = server.begin();
        let target = server.target(uri);
        let asked = Instant::now();
        let result = self
            .request(
                server,
                &pool.settings,
                method.clone(),
                target.clone(),
                headers,
                body,
            )
            .await;
        match &result {
            // The client's fault, not the upstream's: answered 4xx, not counted here.
            Err(error) if error.is_client_fault() => {}
            Ok(response) => {
                server.observe(Some(response.status()), asked);
                pool.outcome(server, response.status().is_server_error());
            }
            Err(error) => {
                server.observe(None, asked);
                pool.outcome(server, true);
                self.failed(route, &target, error);
            }
        }
        result.map(|response| {
            let timeouts = self
                .errors
                .with_label_values(&[&route.name, "read_timeout"]);
            let read = ReadWatch {
                timeout: pool.settings.read_timeout,
                timeouts,
                route: route.name.clone(),
                upstream: target,
            };
            response.map(|body| IdleTimed::new(body, read, in_flight))
        })
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
        server: &Server,
        settings: &UpstreamSettings,
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
        apply_headers(settings, &uri, request.headers_mut());
        let sending = server.client.request(request);
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
    match error.is_connect() {
        true => UpstreamError::Unreachable(crate::errors::chain(&error)),
        false => UpstreamError::Reset(crate::errors::chain(&error)),
    }
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
        let before = upstream.pool(&first.routes[0]).id;
        // Equal settings, another value: the pool is kept, and found by the new config.
        let same = config("    connect_timeout: 2s\n    ttl: 5m\n");
        upstream.prepare(&same);
        assert_eq!(upstream.pool(&same.routes[0]).id, before);
        assert_eq!(upstream.pool(&first.routes[0]).id, before);
        let other = config("    connect_timeout: 3s\n");
        upstream.prepare(&other);
        let after = upstream.pool(&other.routes[0]).id;
        assert_ne!(after, before);
        assert_eq!(upstream.pool(&other.routes[0]).id, after);
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
