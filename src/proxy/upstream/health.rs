//! A pool's background task: active health checks, and resolving its names again.
//!
//! Every `health.interval`, each server gets `GET health.path` (with the route's upstream headers
//! and `Host`), answered within `health.timeout` by a status in `health.statuses`; `unhealthy`
//! failed checks in a row take it out of rotation, `healthy` passed ones bring it back, and a
//! passed check ends an ejection. The task holds the pool weakly and is aborted when the pool is
//! dropped (a reload that changed the route's upstream settings), so it never outlives it.

use std::sync::{Arc, Weak};

use axum::body::Body;
use http::{Request, StatusCode, Uri};
use http_body_util::BodyExt;
use tokio::time::Instant;

use super::outlier::Change;
use super::pool::{Pool, Server};
use super::resolve;
use crate::config::HealthSettings;

/// Runs until the pool is gone.
pub(super) async fn watch(pool: Weak<Pool>) {
    let mut resolve_at = Instant::now();
    loop {
        let Some(pool) = pool.upgrade() else { return };
        let settings = &pool.settings.pool;
        if pool.has_names() && Instant::now() >= resolve_at {
            resolve_all(&pool).await;
            resolve_at = Instant::now() + settings.resolve_every;
        }
        if let Some(health) = &settings.health {
            check_all(&pool, health).await;
        }
        let pause = match (&settings.health, pool.has_names()) {
            (Some(health), true) => health.interval.min(settings.resolve_every),
            (Some(health), false) => health.interval,
            (None, _) => settings.resolve_every,
        };
        drop(pool);
        tokio::time::sleep(pause).await;
    }
}

/// Resolves every member written as a name; one that fails keeps its servers.
async fn resolve_all(pool: &Pool) {
    for (i, member) in pool.members().iter().enumerate() {
        let Some(name) = &member.name else { continue };
        match resolve::resolve(name, resolve::port(&member.url)).await {
            Ok(addrs) => pool.resolved(i, &addrs),
            Err(error) => tracing::warn!(route = %pool.route, name, %error,
                "an upstream name did not resolve; its last addresses are kept"),
        }
    }
}

/// Checks every server at once, and records each verdict.
async fn check_all(pool: &Pool, health: &HealthSettings) {
    let servers = pool.servers();
    let checks = servers.iter().map(|server| check(pool, server, health));
    let verdicts = futures::future::join_all(checks).await;
    let now = Instant::now();
    for (server, verdict) in servers.iter().zip(verdicts) {
        let passed = verdict
            .as_ref()
            .is_ok_and(|status| health.passes(status.as_u16()));
        let change = server.standing().checked(passed, now, health);
        let why = match &verdict {
            Ok(status) => status.to_string(),
            Err(error) => error.clone(),
        };
        match change {
            Change::Down => tracing::warn!(route = %pool.route, server = %server.label,
                last = %why, "an upstream server failed its health checks and is out of rotation"),
            Change::Up => tracing::info!(route = %pool.route, server = %server.label,
                "an upstream server passed its health checks and is back in rotation"),
            Change::None | Change::Ejected(_) => {}
        }
        server.show(now);
    }
}

/// One check: the status, or why there was none within the timeout.
async fn check(
    pool: &Pool,
    server: &Arc<Server>,
    health: &HealthSettings,
) -> Result<StatusCode, String> {
    let uri = check_uri(&server.url, &health.path).map_err(|e| e.to_string())?;
    let mut request = Request::get(uri.clone())
        .body(Body::empty())
        .map_err(|e| e.to_string())?;
    super::apply_headers(&pool.settings, &uri, request.headers_mut());
    let checking = async {
        let response = server
            .client
            .request(request)
            .await
            .map_err(|e| crate::errors::chain(&e))?;
        let status = response.status();
        // Read to the end, so the connection goes back to the pool.
        response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok(status)
    };
    match tokio::time::timeout(health.timeout, checking).await {
        Ok(checked) => checked,
        Err(_) => Err(format!(
            "no answer within {}",
            humantime::format_duration(health.timeout)
        )),
    }
}

/// The check's URI: the server's URL with the check's path appended to its own.
fn check_uri(url: &Uri, path: &str) -> Result<Uri, http::Error> {
    let base = url.path().trim_end_matches('/');
    Uri::builder()
        .scheme(url.scheme_str().unwrap_or("http"))
        .authority(url.authority().map_or("", |a| a.as_str()))
        .path_and_query(format!("{base}{path}"))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_path_is_appended_to_the_servers_own() {
        let url: Uri = "https://api.example.com/v1/".parse().unwrap();
        assert_eq!(
            check_uri(&url, "/healthz").unwrap(),
            "https://api.example.com/v1/healthz"
        );
    }
}
