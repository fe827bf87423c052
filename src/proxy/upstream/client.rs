//! One server's hyper client: pooled connections made by a connector that resolves the server's
//! name (or keeps to the one address it was resolved to), speaks TLS for an `https` pool with
//! the route's name for SNI, and gives up on a connect after the route's `connect_timeout`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use http::Uri;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::ServerName;
use tower_service::Service;

use super::resolve::Resolver;
use crate::config::{Protocol, UpstreamSettings};
use crate::proxy::retire::RetiringConnector;

/// Idle pooled connections are closed after this long.
const POOL_IDLE: Duration = Duration::from_secs(60);

/// The most an HTTP/1.1 upstream connection reads ahead of what was taken from it (hyper grows
/// its buffer up to about 400 KiB by default): a pass-through whose client stopped reading
/// holds this, so it is kept small. It also bounds an upstream's response head.
const READ_BUFFER: usize = 64 << 10;

/// A server's pooled client.
pub(super) type ServerClient = Client<Timed, Body>;

/// A client for one server of a route: to `addr` when the server is one address of a resolved
/// name (the request's URI, and so `Host` and SNI, keep the name), else to whatever the URI
/// names.
pub(super) fn client(settings: &UpstreamSettings, addr: Option<SocketAddr>) -> ServerClient {
    let resolver = match addr {
        Some(addr) => Resolver::Pinned(addr),
        None => Resolver::system(),
    };
    let mut http = HttpConnector::new_with_resolver(resolver);
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
    builder.build(connector)
}

// ----- the connect timeout

/// A connect (TCP and TLS handshake) that took longer than the route's `connect_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("connect_timeout ({}) elapsed", humantime::format_duration(*.0))]
pub(super) struct ConnectTimedOut(pub Duration);

/// The route's connector, bounded by its `connect_timeout` when it has one of its own.
#[derive(Clone)]
pub(super) struct Timed {
    inner: HttpsConnector<RetiringConnector<Resolver>>,
    timeout: Option<Duration>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Connecting = <HttpsConnector<RetiringConnector<Resolver>> as Service<Uri>>::Response;

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
