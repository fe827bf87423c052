//! The admin listener: liveness, readiness, and the bearer-token-protected `/admin/*` API.
//!
//! - `GET /healthz`: 200 while the process runs.
//! - `GET /readyz`: 200 when the store answers and the bus is subscribed, else 503 with the reason.
//! - `POST /admin/purge` `{"url": "/reports?x=1", "method": "GET", "headers": {...}, "body": "..."}`:
//!   the request is keyed by its route's rules and removed everywhere (store, every replica's L1);
//!   answers `{"purged": true, "key": "<digest>"}`.
//! - `GET /admin/status?url=<url-encoded path and query>[&method=GET]`: read-only
//!   `{"status": "EMPTY|PENDING|EXISTS|PASS", "key": "<digest>"}`.
//!
//! `/admin/*` needs `Authorization: Bearer <token>` (401 without or with a wrong one; compared in
//! constant time); with no token configured it answers 403, so an open admin API is never the
//! default.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use serde::Deserialize;
use serde_json::json;

use crate::key::{RequestKey, request_key};
use crate::proxy::Proxy;
use crate::store::KeyStatus;

/// The router of the admin listener.
pub fn app(proxy: Arc<Proxy>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/admin/purge", post(purge))
        .route("/admin/status", get(status))
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

async fn readyz(State(proxy): State<Arc<Proxy>>) -> Response {
    match proxy.engine.ready().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response(),
    }
}

/// A request named by the admin API, keyed as the proxy would key it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Target {
    url: String,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// For routes that key on the request body.
    #[serde(default)]
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
    let target: Target = match serde_json::from_slice(&body) {
        Ok(target) => target,
        Err(error) => {
            return problem(
                StatusCode::BAD_REQUEST,
                format!("bad purge request: {error}"),
            );
        }
    };
    let key = match key_of(&proxy, &target) {
        Ok(key) => key,
        Err(refused) => return refused.into_response(),
    };
    match proxy.engine.delete(&key.key.hash).await {
        Ok(_) => Json(json!({"purged": true, "key": key.key.hash.to_hex()})).into_response(),
        Err(error) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("purge failed: {error}"),
        ),
    }
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
    match proxy.engine.status(&key.key.hash).await {
        Ok(status) => {
            let word = match status {
                KeyStatus::Exists { .. } => "EXISTS",
                KeyStatus::Pending { .. } => "PENDING",
                KeyStatus::Pass { .. } => "PASS",
                KeyStatus::Empty => "EMPTY",
            };
            Json(json!({"status": word, "key": key.key.hash.to_hex()})).into_response()
        }
        Err(error) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("status failed: {error}"),
        ),
    }
}

fn key_of(proxy: &Proxy, target: &Target) -> Result<RequestKey, Refusal> {
    let uri: Uri = target
        .url
        .parse()
        .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, format!("bad url: {e}")))?;
    let method = match &target.method {
        Some(method) => Method::from_bytes(method.to_ascii_uppercase().as_bytes())
            .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, format!("bad method: {e}")))?,
        None => Method::GET,
    };
    let mut headers = HeaderMap::new();
    for (name, value) in &target.headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, format!("bad header name: {e}")))?;
        let value = HeaderValue::from_str(value)
            .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, format!("bad header value: {e}")))?;
        headers.append(name, value);
    }
    let config = proxy.config();
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
    Ok(request_key(route, &method, &uri, &headers, body))
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
    use super::constant_time_eq;

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
