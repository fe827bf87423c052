//! The admin listener: liveness, readiness, and the bearer-token-protected `/admin/*` API.
//!
//! - `GET /healthz`: 200 while the process runs.
//! - `GET /readyz`: 200 once the server is serving its loaded config, the store answers (within a
//!   bounded probe) and the bus is subscribed; else 503 with the reason. It turns 503 again as soon
//!   as shutdown begins, so a load balancer stops sending before the listeners close.
//! - `POST /admin/purge`, in one of the forms of [`crate::purge::Purge`]; each removes its keys
//!   everywhere (store, in-flight leases, every replica's L1). `"purged"` says whether the
//!   store changed: false when none of the keys had anything stored.
//!   - `{"url": "/reports?x=1", "method": "GET", "headers": {...}, "body": "..."}`: the request is
//!     keyed by its route's rules; answers `{"purged": <count is 1>, "key": "<digest>", "count":
//!     0|1}`.
//!   - `{"route": "reports", "prefix": "/reports/2024/"}` and `{"tag": "user-42"}`: the keys the
//!     store's indexes name; answers `{"purged": <count above 0>, "count": <keys that existed>,
//!     "covered": <keys indexed>}`.
//!   - `{"route": "reports"}`: bumps the route's generation in the store (O(1), so no count);
//!     answers `{"purged": true, "route": "reports", "generation": <new>, "previous": <new - 1>}`.
//!
//!   An unknown route is 404; a body that is none of the forms, or a route that does not cache,
//!   is 400; a store that did not answer is 503 (nothing is known to be purged).
//! - `GET /admin/status?url=<url-encoded path and query>[&method=GET]`: read-only
//!   `{"status": "EMPTY|PENDING|EXISTS|PASS", "key": "<digest>"}`.
//!
//! [`healthcheck`] is the client side of `/healthz`, for `corral healthcheck` (container images
//! have no curl).
//!
//! `/admin/*` needs `Authorization: Bearer <token>` (401 without or with a wrong one; compared in
//! constant time); with no token configured it answers 403, so an open admin API is never the
//! default. Every `/admin/*` call, refused or not, leaves one audit line (target `corral::audit`)
//! from one layer around the router, so no handler can forget it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::json;

use crate::key::Key;
use crate::lifecycle::Phase;
use crate::proxy::Proxy;
use crate::purge::Purge;
use crate::store::{KeyStatus, Selector, valid_tag};

/// The router of the admin listener.
pub fn app(proxy: Arc<Proxy>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/admin/purge", post(purge))
        .route("/admin/status", get(status))
        // Around every route and the fallback, so an `/admin/*` call that no handler took (or
        // that was refused) is audited too.
        .layer(axum::middleware::from_fn(audit))
        .with_state(proxy)
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Prometheus scrapes this; it needs no token (keep the admin listener off the public network).
async fn metrics(State(proxy): State<Arc<Proxy>>) -> Response {
    let text = proxy.engine.render_metrics().await;
    (
        [(
            http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Ready when this replica serves its config as configured. A store or bus outage alone does
/// not make it unready when every cached route degrades (`on_store_error: open`): every replica
/// would see the same outage, and taking them all out of the load balancer at once would turn it
/// into a total one. It does when a route answers 503 without the store (`closed`).
async fn readyz(State(proxy): State<Arc<Proxy>>) -> Response {
    let not_ready = |reason: String| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response()
    };
    match proxy.lifecycle.phase() {
        Phase::Starting => {
            return not_ready("starting: the configuration is not in service yet".to_owned());
        }
        Phase::Stopping => return not_ready("shutting down".to_owned()),
        Phase::Serving => {}
    }
    let readiness = proxy.engine.readiness().await;
    let report = readiness.describe();
    let config = proxy.config();
    let closed = config.routes.iter().find(|route| {
        route.cache && route.policy.on_store_error == crate::engine::OnStoreError::Closed
    });
    match (&readiness.store, closed) {
        (Err(reason), Some(route)) => not_ready(format!(
            "{reason}, and route {} answers 503 without it (on_store_error: closed)\n{report}",
            route.name
        )),
        (Err(reason), None) => (
            StatusCode::OK,
            format!(
                "ready, degraded: {reason}; each replica fetches for its own requests \
                 (on_store_error: open)\n{report}"
            ),
        )
            .into_response(),
        (Ok(()), _) if !readiness.bus_connected => (
            StatusCode::OK,
            format!("ready, degraded: the bus is disconnected; followers poll\n{report}"),
        )
            .into_response(),
        (Ok(()), _) => (StatusCode::OK, format!("ready\n{report}")).into_response(),
    }
}

// ------------------------------------------------------------------ audit ----

/// The largest admin request body read (a purge is a few hundred bytes; this is axum's own
/// default limit for a body extractor, which the purge handler would apply anyway).
const ADMIN_BODY_LIMIT: usize = 2 << 20;

/// One audit line (target `corral::audit`) per call of the admin API: who called (the client's
/// address and a fingerprint of the token it presented, never the token), what it asked (method,
/// path, query, and for a purge its form and target, never a body-keyed purge's headers or
/// body), and the status it was answered.
async fn audit(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if !request.uri().path().starts_with("/admin/") {
        return next.run(request).await;
    }
    let client = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map_or_else(|| "unknown".to_owned(), |info| info.0.to_string());
    let token = token_fingerprint(request.headers());
    let (method, uri) = (request.method().clone(), request.uri().clone());
    let (request, purge) = match read_purge(request).await {
        Ok(read) => read,
        Err(refused) => {
            let response = refused.into_response();
            audited(&client, &token, &method, &uri, "", response.status());
            return response;
        }
    };
    let response = next.run(request).await;
    audited(&client, &token, &method, &uri, &purge, response.status());
    response
}

fn audited(client: &str, token: &str, method: &Method, uri: &Uri, purge: &str, status: StatusCode) {
    tracing::info!(
        target: "corral::audit",
        client,
        token,
        method = %method,
        path = uri.path(),
        query = uri.query().unwrap_or(""),
        purge,
        status = status.as_u16(),
        "admin call"
    );
}

/// A purge's body, read (bounded) and put back for the handler, with what it names; other
/// requests pass untouched.
async fn read_purge(
    request: axum::extract::Request,
) -> Result<(axum::extract::Request, String), Refusal> {
    if request.method() != Method::POST || request.uri().path() != "/admin/purge" {
        return Ok((request, String::new()));
    }
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, ADMIN_BODY_LIMIT)
        .await
        .map_err(|e| Refusal::new(StatusCode::PAYLOAD_TOO_LARGE, format!("bad body: {e}")))?;
    let purge = match Purge::parse(&bytes) {
        Ok(Purge::Url { url, method, .. }) => {
            format!("url {} {url}", method.as_deref().unwrap_or("GET"))
        }
        Ok(Purge::Prefix { route, prefix }) => format!("route {route} prefix {prefix}"),
        Ok(Purge::Route { route }) => format!("route {route}"),
        Ok(Purge::Tag { tag }) => format!("tag {tag}"),
        Err(_) => "malformed".to_owned(),
    };
    let request = axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes));
    Ok((request, purge))
}

/// `sha256:` and the first 8 hex digits of the SHA-256 of the bearer token presented (`none`
/// without one): enough to tell callers apart and to match a token an operator holds
/// (`printf %s "$TOKEN" | sha256sum`), too little to recover or replay it.
fn token_fingerprint(headers: &HeaderMap) -> String {
    use sha2::Digest;
    let presented = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        None => "none".to_owned(),
        Some(token) => {
            let digest = sha2::Sha256::digest(token.as_bytes());
            format!("sha256:{}", &hex::encode(digest)[..8])
        }
    }
}

// ------------------------------------------------------------------ health check client ----

/// Why [`healthcheck`] found the process unhealthy.
#[derive(Debug, thiserror::Error)]
pub enum HealthcheckError {
    #[error("bad url {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("{url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{url} answered {status}")]
    Status { url: String, status: StatusCode },
    #[error("{url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
}

/// GETs `url` (an admin listener's `/healthz`, plain HTTP) and answers whether it said 200 within
/// `timeout`, connecting included.
pub async fn healthcheck(url: &str, timeout: Duration) -> Result<(), HealthcheckError> {
    let uri: Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| HealthcheckError::Url {
            url: url.to_owned(),
            reason: e.to_string(),
        })?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(HealthcheckError::Url {
            url: url.to_owned(),
            reason: "expected an absolute http:// url".into(),
        });
    }
    let client: Client<HttpConnector, axum::body::Body> =
        Client::builder(TokioExecutor::new()).build_http();
    let request = http::Request::get(uri)
        .body(axum::body::Body::empty())
        .map_err(|e| HealthcheckError::Url {
            url: url.to_owned(),
            reason: e.to_string(),
        })?;
    match tokio::time::timeout(timeout, client.request(request)).await {
        Err(_elapsed) => Err(HealthcheckError::Timeout {
            url: url.to_owned(),
            timeout,
        }),
        Ok(Err(error)) => Err(HealthcheckError::Unreachable {
            url: url.to_owned(),
            reason: crate::errors::chain(&error),
        }),
        Ok(Ok(response)) if response.status() == StatusCode::OK => Ok(()),
        Ok(Ok(response)) => Err(HealthcheckError::Status {
            url: url.to_owned(),
            status: response.status(),
        }),
    }
}

// ------------------------------------------------------------------ admin API ----

/// A request named by the admin API, keyed as the proxy would key it.
struct Target {
    url: String,
    method: Option<String>,
    headers: BTreeMap<String, String>,
    /// For routes that key on the request body.
    body: Option<String>,
}

async fn purge(
    State(proxy): State<Arc<Proxy>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(refused) = authorize(&proxy, &headers) {
        return refused.into_response();
    }
    let purge = match Purge::parse(&body) {
        Ok(purge) => purge,
        Err(message) => return problem(StatusCode::BAD_REQUEST, message),
    };
    let failed = |error: crate::engine::EngineError| {
        problem(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("purge failed: {error}"),
        )
    };
    let form = purge.form();
    let purged = match purge {
        Purge::Url {
            url,
            method,
            headers,
            body,
        } => {
            let target = Target {
                url,
                method,
                headers,
                body,
            };
            let key = match key_of(&proxy, &target) {
                Ok(key) => key,
                Err(refused) => return refused.into_response(),
            };
            match proxy.engine.delete(&key.hash).await {
                Ok(existed) => json!({
                    "purged": existed,
                    "key": key.hash.to_hex(),
                    "count": usize::from(existed),
                }),
                Err(error) => return failed(error),
            }
        }
        Purge::Route { route } => {
            if let Err(refused) = cached_route(&proxy, &route) {
                return refused.into_response();
            }
            match proxy.engine.purge_route(&route).await {
                // The store's count went up by one: every key of the previous generation is gone.
                Ok(generation) => json!({
                    "purged": true,
                    "route": route,
                    "generation": generation,
                    "previous": generation.saturating_sub(1),
                }),
                Err(error) => return failed(error),
            }
        }
        Purge::Prefix { route, prefix } => {
            if let Err(refused) = cached_route(&proxy, &route) {
                return refused.into_response();
            }
            let selector = Selector::Prefix {
                route: route.clone(),
                prefix: prefix.clone(),
            };
            match proxy.engine.purge_selected(&selector).await {
                Ok(done) => json!({
                    "purged": done.existed > 0,
                    "route": route,
                    "prefix": prefix,
                    "count": done.existed,
                    "covered": done.covered,
                }),
                Err(error) => return failed(error),
            }
        }
        Purge::Tag { tag } => {
            if !valid_tag(&tag) {
                return problem(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "bad tag {tag:?}: 1 to {} visible ASCII characters, no braces or commas",
                        crate::store::MAX_TAG_LEN
                    ),
                );
            }
            match proxy
                .engine
                .purge_selected(&Selector::Tag(tag.clone()))
                .await
            {
                Ok(done) => json!({
                    "purged": done.existed > 0,
                    "tag": tag,
                    "count": done.existed,
                    "covered": done.covered,
                }),
                Err(error) => return failed(error),
            }
        }
    };
    let metrics = proxy.engine.metrics();
    metrics.purges.with_label_values(&[form]).inc();
    if let Some(count) = purged.get("count").and_then(|count| count.as_u64()) {
        metrics.purged_keys.with_label_values(&[form]).inc_by(count);
    }
    Json(purged).into_response()
}

/// Whether a route named `name` exists (else 404) and caches (else 400).
fn cached_route(proxy: &Proxy, name: &str) -> Result<(), Refusal> {
    let config = proxy.config();
    let Some(route) = config.routes.iter().find(|r| r.name == name) else {
        return Err(Refusal::new(
            StatusCode::NOT_FOUND,
            format!("no route is named {name:?}"),
        ));
    };
    if !route.cache {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("route {name} does not cache"),
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
struct StatusQuery {
    url: String,
    method: Option<String>,
}

async fn status(
    State(proxy): State<Arc<Proxy>>,
    headers: HeaderMap,
    Query(query): Query<StatusQuery>,
) -> Response {
    if let Err(refused) = authorize(&proxy, &headers) {
        return refused.into_response();
    }
    let target = Target {
        url: query.url,
        method: query.method,
        headers: BTreeMap::new(),
        body: None,
    };
    let key = match key_of(&proxy, &target) {
        Ok(key) => key,
        Err(refused) => return refused.into_response(),
    };
    match proxy.engine.status(&key.hash).await {
        Ok(status) => {
            let word = match status {
                KeyStatus::Exists { .. } => "EXISTS",
                KeyStatus::Pending { .. } => "PENDING",
                KeyStatus::Pass { .. } => "PASS",
                KeyStatus::Empty => "EMPTY",
            };
            Json(json!({"status": word, "key": key.hash.to_hex()})).into_response()
        }
        Err(error) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("status failed: {error}"),
        ),
    }
}

fn key_of(proxy: &Proxy, target: &Target) -> Result<Key, Refusal> {
    let uri: Uri = target
        .url
        .parse()
        .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, format!("bad url: {e}")))?;
    let method = match &target.method {
        Some(method) => Method::from_bytes(method.to_ascii_uppercase().as_bytes())
            .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, format!("bad method: {e}")))?,
        None => Method::GET,
    };
    let config = proxy.config();
    check_header_limits(&config.limits, &target.headers)?;
    let mut headers = HeaderMap::new();
    for (name, value) in &target.headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, format!("bad header name: {e}")))?;
        let value = HeaderValue::from_str(value)
            .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, format!("bad header value: {e}")))?;
        headers
            .try_append(name, value)
            .map_err(|_| Refusal::new(StatusCode::BAD_REQUEST, "too many headers".into()))?;
    }
    let Some(index) = crate::proxy::route_for(&config, &method, &uri, &headers) else {
        return Err(Refusal::new(
            StatusCode::NOT_FOUND,
            "no route matches this url".into(),
        ));
    };
    let route = &config.routes[index];
    if !route.cache {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("route {} does not cache", route.name),
        ));
    }
    // A body-keyed route keys a request without a body as an empty one, exactly as the proxy does.
    let body = route
        .key
        .body
        .then(|| target.body.as_deref().unwrap_or("").as_bytes());
    Ok(proxy.key(route, &method, &uri, &headers, body))
}

/// A purge or status naming more headers than the proxy takes in one request names no key the
/// proxy could have built: refused before any is parsed, as the listener answers such a request
/// `431`.
fn check_header_limits(
    limits: &crate::config::Limits,
    headers: &BTreeMap<String, String>,
) -> Result<(), Refusal> {
    if headers.len() > limits.max_header_count {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!(
                "too many headers: {}, more than limits.max_header_count ({})",
                headers.len(),
                limits.max_header_count
            ),
        ));
    }
    // Counted as the listener counts a request head: name, ": ", value, CRLF.
    let bytes = headers.iter().fold(0usize, |sum, (name, value)| {
        sum.saturating_add(name.len() + value.len() + 4)
    });
    if bytes > limits.max_header_bytes {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!(
                "headers too large: {bytes} bytes, more than limits.max_header_bytes ({})",
                limits.max_header_bytes
            ),
        ));
    }
    Ok(())
}

/// Checks the bearer token in constant time.
fn authorize(proxy: &Proxy, headers: &HeaderMap) -> Result<(), Refusal> {
    let config = proxy.config();
    let Some(token) = &config.admin.token else {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "the admin API is off: no admin token is configured".into(),
        ));
    };
    let presented = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(presented.as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err(Refusal::new(
            StatusCode::UNAUTHORIZED,
            "a valid bearer token is needed".into(),
        ))
    }
}

/// Compares without an early exit, so timing does not reveal how much of a token matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0);
    }
    diff == 0
}

fn problem(status: StatusCode, message: String) -> Response {
    Refusal::new(status, message).into_response()
}

/// An admin request refused: its status and why, answered as `{"error": "..."}`.
struct Refusal {
    status: StatusCode,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, message: String) -> Self {
        Self { status, message }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(json!({"error": self.message}))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::extract::State;
    use http::StatusCode;

    use super::{constant_time_eq, readyz};
    use crate::engine::{Backend, Engine, EngineConfig};
    use crate::lifecycle::Phase;
    use crate::proxy::Proxy;

    const CONFIG: &str = "store: { kind: memory }\n\
        routes:\n  - name: r\n    match: { path_prefix: / }\n    upstream: http://127.0.0.1:9\n";

    async fn readiness(proxy: &Arc<Proxy>) -> (StatusCode, String) {
        let response = readyz(State(proxy.clone())).await;
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .expect("a short body");
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn readiness_follows_the_lifecycle() {
        let config = crate::config::parse(CONFIG, "test.yaml").expect("a valid config");
        let engine = Engine::connect(EngineConfig::new("t"), &Backend::memory())
            .await
            .expect("the memory backend connects");
        let proxy = Arc::new(Proxy::new(Arc::new(config), engine));

        let (status, body) = readiness(&proxy).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("starting"), "{body}");

        proxy.lifecycle.enter(Phase::Serving);
        assert_eq!(
            readiness(&proxy).await,
            (
                StatusCode::OK,
                "ready\nstore: memory answering, breaker closed\nbus: memory connected\n".into()
            )
        );

        proxy.lifecycle.enter(Phase::Stopping);
        let (status, body) = readiness(&proxy).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("shutting down"), "{body}");

        // Stopping is final.
        proxy.lifecycle.enter(Phase::Serving);
        assert_eq!(proxy.lifecycle.phase(), Phase::Stopping);
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"secret"));
        assert!(!constant_time_eq(b"secret", b""));
        assert!(constant_time_eq(b"", b""));
    }
}
