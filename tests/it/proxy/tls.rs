//! `https` upstreams: an origin in the test serves a certificate from a CA made at test time, and
//! a real `corral serve` reaches it, verified and cached; a wrong CA, an expired certificate and a
//! wrong name each fail with a 502 naming the TLS failure and a log line saying why; a client
//! certificate reaches an origin that requires one; ALPN brings HTTP/2 to an origin that offers it.

use crate::support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use http::{Request, Response, Version};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use support::http::Http;
use support::process::{ConfigFrom, CorralServe};
use support::servers::free_port;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};

// ------------------------------------------------------------------ the PKI ----

/// A certificate authority made for one test, and the files it writes.
pub(super) struct Pki {
    dir: tempfile::TempDir,
    key: KeyPair,
    ca: rcgen::Certificate,
}

/// A certificate and its key, as PEM.
pub(super) struct Issued {
    pub cert: String,
    pub key: String,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("corral-tls-")
            .tempdir()
            .expect("a temporary directory");
        let key = KeyPair::generate().expect("a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        // A name of its own, so two test CAs are two issuers (not one name, two keys).
        static CAS: AtomicU64 = AtomicU64::new(0);
        let name = format!("corral test CA {}", CAS.fetch_add(1, Ordering::Relaxed));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).expect("a self-signed CA");
        Pki { dir, key, ca }
    }

    /// A certificate for `names`, signed by this CA; `expired` makes one that ran out in 2021.
    pub fn issue(&self, names: &[&str], expired: bool) -> Issued {
        let key = KeyPair::generate().expect("a leaf key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params
            .signed_by(&key, &self.ca, &self.key)
            .expect("a signed leaf");
        Issued {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write a test file");
        path
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

// --------------------------------------------------------------- the origin ----

/// What the origin saw of one request.
#[derive(Clone, Debug)]
pub(super) struct Seen {
    pub version: Version,
    pub path: String,
    /// The peer showed a client certificate.
    pub client_certificate: bool,
}

/// An https origin on 127.0.0.1: answers 200 with `max-age=60` to everything, over HTTP/1.1 or
/// HTTP/2 (whatever ALPN settles), and records each request.
pub(super) struct TlsOrigin {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    accept: JoinHandle<()>,
}

impl Drop for TlsOrigin {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// How the origin's TLS is set up.
pub(super) struct OriginTls<'a> {
    pub issued: &'a Issued,
    /// ALPN protocols offered, in preference order.
    pub alpn: &'a [&'a [u8]],
    /// Client certificates are required, and must be signed by this CA (PEM).
    pub client_ca: Option<String>,
}

impl<'a> OriginTls<'a> {
    /// `issued`, offering `alpn`, asking no client certificate.
    pub fn offering(issued: &'a Issued, alpn: &'a [&'a [u8]]) -> Self {
        OriginTls {
            issued,
            alpn,
            client_ca: None,
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_config(tls: &OriginTls<'_>) -> ServerConfig {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(tls.issued.cert.as_bytes())
            .collect::<Result<_, _>>()
            .expect("the origin's certificate");
    let key = PrivateKeyDer::from_pem_slice(tls.issued.key.as_bytes()).expect("the origin's key");
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions");
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
                roots
                    .add(cert.expect("the client CA"))
                    .expect("add the client CA");
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.into(),
                provider(),
            )
            .build()
            .expect("a client verifier");
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .expect("the origin's certified key");
    config.alpn_protocols = tls.alpn.iter().map(|p| p.to_vec()).collect();
    config
}

impl TlsOrigin {
    pub async fn start(tls: OriginTls<'_>) -> TlsOrigin {
        let acceptor = TlsAcceptor::from(Arc::new(server_config(&tls)));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the origin");
        let addr = listener.local_addr().expect("the origin's address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let accept = tokio::spawn(accept_loop(listener, acceptor, seen.clone()));
        TlsOrigin { addr, seen, accept }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("the origin's log").clone()
    }
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, seen: Arc<Mutex<Vec<Seen>>>) {
    let mut connections = tokio::task::JoinSet::new();
    while let Ok((tcp, _)) = listener.accept().await {
        let (acceptor, seen) = (acceptor.clone(), seen.clone());
        connections.spawn(async move {
            // A handshake the client refused ends here: that is what some tests are about.
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            let client_certificate = stream.get_ref().1.peer_certificates().is_some();
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                seen.lock().expect("the origin's log").push(Seen {
                    version: request.version(),
                    path: request.uri().path().to_string(),
                    client_certificate,
                });
                let body = format!("tls origin {}", request.uri().path());
                let response = Response::builder()
                    .header("cache-control", "max-age=60")
                    .body(Full::new(Bytes::from(body)))
                    .expect("a response");
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

// ---------------------------------------------------------------- the proxy ----

/// `corral serve` with one cached route to `upstream`, `route` lines inside it, and `env`.
pub(super) async fn serve(
    dir: &Path,
    upstream: &str,
    route: &str,
    env: &[(&str, &str)],
) -> CorralServe {
    let routes = format!(
        "  - name: origin\n    match: {{ path_prefix: / }}\n    upstream: {upstream}\n{route}"
    );
    serve_routes(dir, &routes, env).await
}

/// `corral serve` with these `routes:` entries, and `env`.
pub(super) async fn serve_routes(dir: &Path, routes: &str, env: &[(&str, &str)]) -> CorralServe {
    let public = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let yaml = format!(
        "listen: {public}\nadmin: {{ listen: {admin} }}\nnamespace: upstreams\nstore: {{ kind: memory }}\nroutes:\n{routes}"
    );
    let path = dir.join("corral.yaml");
    std::fs::write(&path, yaml).expect("write the config");
    CorralServe::start_with_env(&path, public, admin, ConfigFrom::Flag, env).await
}

// -------------------------------------------------------------------- tests ----

/// An origin set up by `tls`, behind a proxy whose route trusts `pki`'s CA, with `extra` lines
/// under the route's `tls:`, and `env`.
async fn behind_proxy(
    pki: &Pki,
    tls: OriginTls<'_>,
    extra: &str,
    env: &[(&str, &str)],
) -> (TlsOrigin, CorralServe) {
    let origin = TlsOrigin::start(tls).await;
    let ca = pki.write("ca.pem", &pki.ca_pem());
    let route = format!("    tls:\n      ca_file: {}\n{extra}", ca.display());
    let upstream = format!("https://localhost:{}", origin.port());
    let proxy = serve(pki.dir(), &upstream, &route, env).await;
    (origin, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_https_upstream_is_fetched_once_and_cached() {
    let pki = Pki::new();
    let issued = pki.issue(&["localhost"], false);
    let tls = OriginTls::offering(&issued, &[b"http/1.1"]);
    let (origin, proxy) = behind_proxy(&pki, tls, "", &[]).await;

    let http = Http::new();
    let first = http.get(format!("{}/report", proxy.url())).send().await;
    assert_eq!(first.status, 200, "{}", proxy.output());
    assert_eq!(first.text(), "tls origin /report");
    assert_eq!(first.x_cache(), "MISS");
    let second = http.get(format!("{}/report", proxy.url())).send().await;
    assert_eq!(second.x_cache(), "HIT");
    let seen = origin.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].version, Version::HTTP_11);
}

/// A route whose origin presents `issued`, trusting `ca` (PEM) and checking `server_name` when
/// given: what the proxy answers, and what it logged.
async fn fetch_through(
    pki: &Pki,
    issued: &Issued,
    ca: &str,
    server_name: Option<&str>,
) -> (support::http::Reply, String) {
    let origin = TlsOrigin::start(OriginTls::offering(issued, &[b"http/1.1"])).await;
    let ca = pki.write("trusted.pem", ca);
    let mut route = format!("    tls:\n      ca_file: {}\n", ca.display());
    if let Some(name) = server_name {
        route.push_str(&format!("      server_name: {name}\n"));
    }
    let upstream = format!("https://localhost:{}", origin.port());
    let proxy = serve(pki.dir(), &upstream, &route, &[]).await;
    let reply = Http::new()
        .get(format!("{}/report", proxy.url()))
        .send()
        .await;
    assert!(origin.seen().is_empty(), "no request passed the handshake");
    (reply, proxy.output())
}

/// A failed handshake: 502, `Cache-Status` naming TLS, and the reason in the body and the log.
fn assert_tls_failure(reply: &support::http::Reply, log: &str, reason: &str) {
    assert_eq!(reply.status, 502, "{log}");
    assert!(
        reply.cache_status().contains("detail=upstream-tls"),
        "{}: {}\n{log}",
        reply.cache_status(),
        reply.text()
    );
    assert!(reply.text().contains(reason), "{}", reply.text());
    let logged = log
        .lines()
        .any(|line| line.contains("upstream request failed") && line.contains(reason));
    assert!(logged, "no log line names {reason:?}:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused() {
    let pki = Pki::new();
    let issued = pki.issue(&["localhost"], false);
    let stranger = Pki::new();
    let (reply, log) = fetch_through(&pki, &issued, &stranger.ca_pem(), None).await;
    assert_tls_failure(&reply, &log, "UnknownIssuer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_refused() {
    let pki = Pki::new();
    let issued = pki.issue(&["localhost"], true);
    let (reply, log) = fetch_through(&pki, &issued, &pki.ca_pem(), None).await;
    assert_tls_failure(&reply, &log, "certificate expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_name_is_refused() {
    let pki = Pki::new();
    let issued = pki.issue(&["localhost"], false);
    let (reply, log) = fetch_through(&pki, &issued, &pki.ca_pem(), Some("api.example.com")).await;
    assert_tls_failure(&reply, &log, "certificate not valid for name");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_reaches_an_origin_that_requires_one() {
    let pki = Pki::new();
    let issued = pki.issue(&["localhost"], false);
    let client = pki.issue(&["corral.client"], false);
    let tls = OriginTls {
        issued: &issued,
        alpn: &[b"http/1.1"],
        client_ca: Some(pki.ca_pem()),
    };
    let cert = pki.write("client.pem", &client.cert);
    let extra = format!(
        "      cert_file: {}\n      key: ${{CLIENT_KEY}}\n",
        cert.display()
    );
    let env = [("CLIENT_KEY", client.key.as_str())];
    let (origin, proxy) = behind_proxy(&pki, tls, &extra, &env).await;

    let reply = Http::new()
        .get(format!("{}/mtls", proxy.url()))
        .send()
        .await;
    assert_eq!(reply.status, 200, "{}", proxy.output());
    let seen = origin.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].client_certificate, "{seen:?}");
    // The key never reaches the log.
    let key_line = client.key.lines().nth(1).expect("a PEM body line");
    assert!(!proxy.output().contains(key_line));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_brings_http2_to_an_origin_that_offers_it() {
    let pki = Pki::new();
    let issued = pki.issue(&["localhost"], false);
    let tls = OriginTls::offering(&issued, &[b"h2", b"http/1.1"]);
    let (origin, proxy) = behind_proxy(&pki, tls, "", &[]).await;

    let reply = Http::new().get(format!("{}/h2", proxy.url())).send().await;
    assert_eq!(reply.status, 200, "{}", proxy.output());
    let seen = origin.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].version, Version::HTTP_2, "{seen:?}");
    assert_eq!(seen[0].path, "/h2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_route_host_is_the_name_sni_sends_and_the_certificate_must_carry() {
    let pki = Pki::new();
    let issued = pki.issue(&["api.internal"], false);
    let origin = TlsOrigin::start(OriginTls::offering(&issued, &[b"http/1.1"])).await;
    let ca = pki.write("ca.pem", &pki.ca_pem());
    // Reached by address; named by `host:`, which the certificate carries.
    let route = format!(
        "    host: api.internal\n    tls: {{ ca_file: {} }}\n",
        ca.display()
    );
    let upstream = format!("https://127.0.0.1:{}", origin.port());
    let proxy = serve(pki.dir(), &upstream, &route, &[]).await;
    let reply = Http::new()
        .get(format!("{}/named", proxy.url()))
        .send()
        .await;
    assert_eq!(reply.status, 200, "{}", proxy.output());
    assert_eq!(origin.seen().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_http2_over_tls_offers_only_h2() {
    let pki = Pki::new();
    let issued = pki.issue(&["localhost"], false);
    let tls = OriginTls::offering(&issued, &[b"h2", b"http/1.1"]);
    let (origin, proxy) = behind_proxy(&pki, tls, "    upstream_http2: true\n", &[]).await;
    let reply = Http::new()
        .get(format!("{}/only-h2", proxy.url()))
        .send()
        .await;
    assert_eq!(reply.status, 200, "{}", proxy.output());
    assert_eq!(origin.seen()[0].version, Version::HTTP_2);

    // An origin that speaks only HTTP/1.1 is refused at the handshake, not misread.
    let pki = Pki::new();
    let issued = pki.issue(&["localhost"], false);
    let tls = OriginTls::offering(&issued, &[b"http/1.1"]);
    let (origin, proxy) = behind_proxy(&pki, tls, "    upstream_http2: true\n", &[]).await;
    let reply = Http::new()
        .get(format!("{}/only-h2", proxy.url()))
        .send()
        .await;
    assert_eq!(reply.status, 502, "{}", proxy.output());
    assert!(origin.seen().is_empty());
}
