//! How corral reaches a route's upstream: [`UpstreamSettings`], one value per route (TLS,
//! timeouts, the headers it adds, the `Host` it sends, and its [`PoolSettings`]: the servers, how
//! one is chosen, health checks, outlier ejection and retries), built and checked at load so that
//! the proxy's client is made from it without anything left to fail. Every server a route sends
//! to shares it.
//!
//! TLS is rustls on ring (the crypto the store and bus clients already build). A route trusts the
//! bundled web roots, the system's store, and its own `tls.ca_file`; it may show a client
//! certificate (`tls.cert_file` with `tls.key_file`, or the key written as `tls.key`, usually
//! `${VAR}`); TLS 1.2 is the oldest version offered, and ALPN offers `h2` then `http/1.1`.
//! There is no switch to turn verification off: a self-signed upstream is trusted by naming its
//! certificate (or its CA) in `tls.ca_file`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};
use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// How a route reaches its upstream servers. Compared on reload: a route whose settings are
/// unchanged keeps its pooled connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamSettings {
    /// HTTP/1.1 (or HTTP/2 when TLS negotiates it), or HTTP/2 with prior knowledge.
    pub protocol: Protocol,
    /// TCP connect and, for https, the TLS handshake. `None` when it is not shorter than
    /// `max_fetch`, which then bounds the connect alone (two timers of one length would race,
    /// and a failed fetch is not the overrun that lets another replica take the key over).
    pub connect_timeout: Option<Duration>,
    /// From sending the request (its connect included) to the response head; `None` likewise.
    pub response_header_timeout: Option<Duration>,
    /// Longest silence between two chunks of the response body.
    pub read_timeout: Duration,
    pub tls: UpstreamTls,
    pub headers: UpstreamHeaders,
    /// `Host` sent instead of the upstream URL's authority (`host:`).
    pub host: Option<HeaderValue>,
    /// The servers and how requests are spread over them and retried.
    pub pool: PoolSettings,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1; over TLS, HTTP/2 when the server picks `h2` by ALPN.
    #[default]
    Negotiated,
    /// `upstream_http2: true`: HTTP/2 from the first byte (h2c on http).
    Http2,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        let policy = super::RoutePolicy::default();
        UpstreamSettings {
            protocol: Protocol::Negotiated,
            connect_timeout: Some(policy.connect_timeout),
            response_header_timeout: None,
            read_timeout: policy.read_timeout,
            tls: UpstreamTls::default(),
            headers: UpstreamHeaders::default(),
            host: None,
            pool: PoolSettings::default(),
        }
    }
}

// ----- pools

/// `upstream: {servers: [...], balance, health, outlier, retries}`; a bare URL is a pool of one
/// server that never retries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolSettings {
    /// Every server's URL: one scheme and one path for all. A host name stands for each of its
    /// addresses. Empty only in a default value (the route's `upstream` is then the one server).
    pub servers: Vec<Uri>,
    pub balance: Balance,
    /// Active health checks; `None`: servers are judged by their answers alone.
    pub health: Option<HealthSettings>,
    pub outlier: OutlierSettings,
    pub retries: RetrySettings,
    /// How long the addresses of a host name are used before it is resolved again.
    pub resolve_every: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            servers: Vec::new(),
            balance: Balance::RoundRobin,
            health: None,
            outlier: OutlierSettings::default(),
            retries: RetrySettings::single(),
            resolve_every: Duration::from_secs(30),
        }
    }
}

impl PoolSettings {
    /// What `corral check` shows of a pool beyond the route's URL, as (name, value) lines; none
    /// for a bare URL.
    pub fn describe(&self) -> Vec<(&'static str, String)> {
        if self.servers.len() <= 1 && self.retries.attempts <= 1 && self.health.is_none() {
            return Vec::new();
        }
        let servers: Vec<String> = self.servers.iter().map(Uri::to_string).collect();
        let mut lines = vec![
            ("upstream.servers", format!("[{}]", servers.join(", "))),
            ("upstream.balance", self.balance.name().to_string()),
        ];
        let time = |d: Duration| humantime::format_duration(d).to_string();
        if let Some(h) = &self.health {
            let statuses: Vec<String> = (h.statuses.iter())
                .map(|(low, high)| match low == high {
                    true => low.to_string(),
                    false => format!("{low}-{high}"),
                })
                .collect();
            let health = format!(
                "GET {} every {}, timeout {}, healthy {}, unhealthy {}, statuses [{}]",
                h.path,
                time(h.interval),
                time(h.timeout),
                h.healthy,
                h.unhealthy,
                statuses.join(", ")
            );
            lines.push(("upstream.health", health));
        }
        let o = &self.outlier;
        let outlier = format!(
            "{} failures in a row eject for {} (doubling, at most {}), at most {}% at once",
            o.failures,
            time(o.ejection),
            time(o.max_ejection),
            o.max_ejected
        );
        lines.push(("upstream.outlier", outlier));
        let r = &self.retries;
        let on: Vec<String> = r.statuses.iter().map(u16::to_string).collect();
        let retries = format!(
            "{} attempts on connect, reset, response_header_timeout, [{}]; budget {}% over {} plus {}/s",
            r.attempts,
            on.join(", "),
            r.budget,
            time(r.budget_window),
            r.min_per_second
        );
        lines.push(("upstream.retries", retries));
        lines.push(("upstream.resolve_every", time(self.resolve_every)));
        lines
    }
}

/// How a request's server is chosen among those in rotation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Balance {
    /// Each in turn.
    #[default]
    RoundRobin,
    /// The one with the fewest requests under way (ties in turn).
    LeastRequests,
    /// By rendezvous hashing of the cache key (the URL for a pass-through): one key, one server,
    /// and a server leaving moves only its own keys.
    KeyHash,
}

impl Balance {
    pub fn name(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastRequests => "least_requests",
            Balance::KeyHash => "key_hash",
        }
    }
}

/// `health:`: a background `GET path` to every server each `interval`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthSettings {
    /// Path (and query) of the check, appended to the server's own path.
    pub path: String,
    pub interval: Duration,
    /// Longest wait for a check's response head.
    pub timeout: Duration,
    /// Passed checks in a row that bring a down server back.
    pub healthy: u32,
    /// Failed checks in a row that take a server out of rotation.
    pub unhealthy: u32,
    /// Statuses that pass, as inclusive ranges (default 200–399).
    pub statuses: Vec<(u16, u16)>,
}

impl HealthSettings {
    pub fn passes(&self, status: u16) -> bool {
        self.statuses
            .iter()
            .any(|(low, high)| (*low..=*high).contains(&status))
    }
}

/// `outlier:`: passive ejection of a server that keeps failing real requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierSettings {
    /// Connect errors, timeouts or 5xx answers in a row that eject a server.
    pub failures: u32,
    /// The first ejection's length; each further one doubles it, up to `max_ejection`.
    pub ejection: Duration,
    pub max_ejection: Duration,
    /// The largest share of the pool ejected at once, in percent (at least one server may be).
    pub max_ejected: u8,
}

impl Default for OutlierSettings {
    fn default() -> Self {
        OutlierSettings {
            failures: 5,
            ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
            max_ejected: 50,
        }
    }
}

/// `retries:`: which failures of an idempotent request are tried again, on another server, and
/// how many retries the route may send at most.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetrySettings {
    /// The most tries of one request, the first included (1: never retried).
    pub attempts: u32,
    /// Answers that are retried (besides connect errors, resets and `response_header_timeout`).
    pub statuses: Vec<u16>,
    /// Retries allowed, in percent of the requests in the window.
    pub budget: u8,
    pub budget_window: Duration,
    /// Retries allowed per second of the window whatever the traffic, so a quiet route can retry.
    pub min_per_second: u32,
}

impl RetrySettings {
    /// A pool's defaults.
    pub fn pool() -> Self {
        RetrySettings {
            attempts: 2,
            statuses: vec![502, 503, 504],
            budget: 20,
            budget_window: Duration::from_secs(10),
            min_per_second: 3,
        }
    }

    /// A bare URL's: never retried.
    pub fn single() -> Self {
        RetrySettings {
            attempts: 1,
            ..Self::pool()
        }
    }
}

// ----- headers

/// `upstream_headers:`, applied to every request sent upstream, after the client's headers were
/// filtered: `remove` first, then `set` (replacing), then `add` (appending). Values are marked
/// sensitive: `Debug` prints them as `Sensitive`, HTTP/2 never indexes them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpstreamHeaders {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl UpstreamHeaders {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

// ----- TLS

/// A route's TLS: the rustls config its connections use, and what the file said, for
/// `corral check` (never the key).
#[derive(Clone)]
pub struct UpstreamTls {
    pub config: Arc<ClientConfig>,
    /// SNI and the name the certificate must carry, when not the upstream URL's host.
    pub server_name: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key: Option<KeySource>,
    /// A digest of everything the config was built from, for equality (rustls configs have none).
    digest: [u8; 32],
}

/// Where a client key came from, for display.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    File(PathBuf),
    /// Written in the file (usually `${VAR}`): shown as `***`.
    Inline,
}

impl Default for UpstreamTls {
    /// Verification against the bundled and system roots; no client certificate.
    fn default() -> Self {
        static DEFAULT: OnceLock<Arc<ClientConfig>> = OnceLock::new();
        let config = DEFAULT.get_or_init(|| {
            // Built from no file and no key, with versions ring supports: it cannot fail.
            Arc::new(client_config(&[], None).expect("the default upstream TLS config"))
        });
        UpstreamTls {
            config: config.clone(),
            server_name: None,
            ca_file: None,
            cert_file: None,
            key: None,
            digest: [0; 32],
        }
    }
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest && self.server_name == other.server_name
    }
}

impl Eq for UpstreamTls {}

impl fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// Why a route's TLS cannot be built; never quotes a key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path:?}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{0:?} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate(PathBuf),
    #[error("{0:?} holds a certificate that is not valid: {1}")]
    BadCertificate(PathBuf, String),
    #[error("holds no PEM private key (-----BEGIN PRIVATE KEY----- or RSA/EC)")]
    NoKey,
    #[error("the key does not match tls.cert_file's certificate, or is not usable: {0}")]
    KeyMismatch(String),
}

/// The PEM certificates of `path`, at least one.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| TlsError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let certificates = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate(path.to_path_buf(), e.to_string()))?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(certificates)
}

/// A PEM private key (PKCS#8, PKCS#1 or SEC1). The parser's own error is not passed on: it may
/// quote what it could not read.
pub fn parse_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|_| TlsError::NoKey)
}

/// A client certificate chain and its key.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// The bundled web roots, the system's, and `extra`.
fn roots(extra: &[CertificateDer<'static>]) -> rustls::RootCertStore {
    static SYSTEM: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    let system = SYSTEM.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for error in &found.errors {
            tracing::debug!(%error, "a system root certificate could not be loaded");
        }
        found.certs
    });
    let mut store = rustls::RootCertStore::empty();
    store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // A system root rustls cannot use is skipped, as every TLS client does.
    let _ = store.add_parsable_certificates(system.iter().cloned());
    let _ = store.add_parsable_certificates(extra.iter().cloned());
    store
}

/// A verifying client config: TLS 1.2 and 1.3, the roots and `extra` CAs, and `identity` for
/// servers that ask for a certificate. ALPN is set by the connector.
pub fn client_config(
    extra: &[CertificateDer<'static>],
    identity: Option<Identity>,
) -> Result<ClientConfig, TlsError> {
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::KeyMismatch(e.to_string()))?
            .with_root_certificates(roots(extra));
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some(Identity { chain, key }) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::KeyMismatch(e.to_string())),
    }
}

/// What a route's `tls:` section names, read.
pub struct TlsSources {
    pub ca_file: Option<(PathBuf, Vec<CertificateDer<'static>>)>,
    pub cert_file: Option<(PathBuf, Vec<CertificateDer<'static>>)>,
    /// The key's PEM bytes and where they came from.
    pub key: Option<(KeySource, Vec<u8>)>,
    pub server_name: Option<String>,
}

impl UpstreamTls {
    /// The TLS of a route from what its `tls:` section named (already read and parsed).
    pub fn build(sources: TlsSources) -> Result<UpstreamTls, TlsError> {
        let mut digest = blake3::Hasher::new();
        let extra = match &sources.ca_file {
            Some((_, certificates)) => certificates.clone(),
            None => Vec::new(),
        };
        for certificate in &extra {
            digest.update(b"ca").update(certificate);
        }
        let identity = match (&sources.cert_file, &sources.key) {
            (Some((_, chain)), Some((_, pem))) => {
                for certificate in chain {
                    digest.update(b"cert").update(certificate);
                }
                digest.update(b"key").update(pem);
                Some(Identity {
                    chain: chain.clone(),
                    key: parse_key(pem)?,
                })
            }
            _ => None,
        };
        let config = client_config(&extra, identity)?;
        Ok(UpstreamTls {
            config: Arc::new(config),
            server_name: sources.server_name,
            ca_file: sources.ca_file.map(|(path, _)| path),
            cert_file: sources.cert_file.map(|(path, _)| path),
            key: sources.key.map(|(source, _)| source),
            digest: *digest.finalize().as_bytes(),
        })
    }

    /// Whether the file wrote a `tls:` section that changes anything (for `corral check`).
    pub fn is_default(&self) -> bool {
        self.ca_file.is_none() && self.cert_file.is_none() && self.server_name.is_none()
    }
}
