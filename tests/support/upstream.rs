//! A real HTTP/1.1 upstream for the proxy tests, in process, on 127.0.0.1 at an ephemeral port.
//!
//! What it answers is set per path prefix (the longest matching prefix wins), at setup or while a
//! test runs: delay, status, extra headers, body, and a latch that holds responses until the test
//! releases it. Everything it receives is recorded, so tests can count fetches and inspect what the
//! proxy forwarded.
//!
//! ```ignore
//! let upstream = Upstream::start().await
//!     .slow("/reports", 500 * MS)
//!     .header("/private", "set-cookie", "session={n}")
//!     .distinct_bodies("/private");
//! ```
//!
//! In header values and distinct bodies, `{n}` is the request's sequence number (1 for the first
//! request this upstream received), so every fetch is told apart.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::patience;

/// What the upstream sends for the paths under one prefix.
#[derive(Clone, Debug)]
pub struct Behaviour {
    /// How long to wait before answering (after the latch, if any, is released).
    pub delay: Duration,
    pub status: StatusCode,
    /// Extra response headers; `{n}` in a value becomes the request's sequence number.
    pub headers: Vec<(HeaderName, String)>,
    pub body: BodySpec,
    /// Responses wait until this turns `true` (see [`Upstream::hold`]).
    hold: Option<watch::Receiver<bool>>,
    /// Answers a single `Range: bytes=first-last` (or `first-`) with a `206` of those bytes.
    pub ranges: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            status: StatusCode::OK,
            headers: Vec::new(),
            body: BodySpec::Echo,
            hold: None,
            ranges: false,
        }
    }
}

/// The response body.
#[derive(Clone, Debug)]
pub enum BodySpec {
    /// `upstream body for <path?query>`: the same for every request to one URL.
    Echo,
    /// Exactly these bytes.
    Fixed(Bytes),
    /// `n` bytes of a fixed pattern that includes NUL bytes (see [`pattern`]).
    Size(usize),
    /// `response <n> for <path?query>`: different for every request.
    Distinct,
}

/// `len` bytes cycling through 0..=250 (so it has NULs and every small byte value, and a shifted or
/// truncated copy does not compare equal).
pub fn pattern(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// One request as the upstream received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// 1 for the first request this upstream received.
    pub seq: u64,
    pub method: Method,
    /// Path and query, as sent on the request line.
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When it arrived (before any delay or latch).
    pub at: Instant,
}

impl Recorded {
    /// A header's value as text, if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Releases held responses when told to, or when dropped (so a forgotten latch never hangs a test).
pub struct Hold {
    tx: watch::Sender<bool>,
}

impl Hold {
    /// Lets every response waiting on this latch (and every later one) go.
    pub fn release(&self) {
        self.tx.send_replace(true);
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.release();
    }
}

struct State {
    /// `(prefix, behaviour)`; the longest matching prefix wins.
    rules: Mutex<Vec<(String, Behaviour)>>,
    /// Every request received, in arrival order.
    log: Mutex<Vec<Recorded>>,
    /// Sequence number of the last request received (0 before the first).
    seq: AtomicU64,
    /// Bumped on every arrival, so tests can wait for one without polling.
    arrivals: watch::Sender<u64>,
}

impl State {
    fn behaviour(&self, path: &str) -> Behaviour {
        let rules = self.rules.lock().unwrap();
        rules
            .iter()
            .filter(|(prefix, _)| path.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, b)| b.clone())
            .unwrap_or_default()
    }
}

/// A running upstream; dropping it stops it and closes its connections.
pub struct Upstream {
    addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // The accept task owns the connection tasks (a JoinSet), so aborting it closes them too.
        self.accept.abort();
    }
}

// ------------------------------------------------------------------ starting ----

impl Upstream {
    /// Starts an upstream that answers 200 `upstream body for <path?query>` to everything.
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the test upstream on 127.0.0.1:0");
        let addr = listener.local_addr().expect("upstream local_addr");
        let state = Arc::new(State {
            rules: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
            seq: AtomicU64::new(0),
            arrivals: watch::Sender::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, state.clone()));
        Upstream {
            addr,
            state,
            accept,
        }
    }

    /// A URL on 127.0.0.1 where nothing listens: a listener is bound to learn a free port, then
    /// closed, so connecting is refused.
    pub fn refusing() -> String {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind a probe listener on port 0");
        let port = listener.local_addr().expect("probe local_addr").port();
        drop(listener);
        format!("http://127.0.0.1:{port}")
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

// ------------------------------------------------------------- knobs (setup) ----

impl Upstream {
    /// Answers under `prefix` after `delay`.
    pub fn slow(self, prefix: &str, delay: Duration) -> Self {
        self.set(prefix, |b| b.delay = delay);
        self
    }

    /// Answers under `prefix` with `status`.
    pub fn status(self, prefix: &str, status: u16) -> Self {
        self.set_status(prefix, status);
        self
    }

    /// Adds a response header under `prefix` (`{n}` in the value becomes the request's number).
    pub fn header(self, prefix: &str, name: &str, value: &str) -> Self {
        let name = HeaderName::from_bytes(name.as_bytes()).expect("valid header name");
        let value = value.to_string();
        self.set(prefix, move |b| b.headers.push((name, value)));
        self
    }

    /// Answers under `prefix` with exactly these bytes.
    pub fn body(self, prefix: &str, body: impl Into<Bytes>) -> Self {
        let body = body.into();
        self.set(prefix, move |b| b.body = BodySpec::Fixed(body));
        self
    }

    /// Answers under `prefix` with `len` bytes of [`pattern`].
    pub fn body_size(self, prefix: &str, len: usize) -> Self {
        self.set(prefix, move |b| b.body = BodySpec::Size(len));
        self
    }

    /// Answers a single byte range under `prefix` with a `206` of those bytes, as a file server
    /// would.
    pub fn serves_ranges(self, prefix: &str) -> Self {
        self.set(prefix, |b| b.ranges = true);
        self
    }

    /// Answers under `prefix` with a body unique to each request: `response <n> for <path?query>`.
    pub fn distinct_bodies(self, prefix: &str) -> Self {
        self.set(prefix, |b| b.body = BodySpec::Distinct);
        self
    }
}

// ----------------------------------------------------------- knobs (runtime) ----

impl Upstream {
    /// Changes what is answered under `prefix` (created with the defaults if new).
    pub fn set(&self, prefix: &str, change: impl FnOnce(&mut Behaviour)) {
        let mut rules = self.state.rules.lock().unwrap();
        match rules.iter_mut().find(|(p, _)| p == prefix) {
            Some((_, behaviour)) => change(behaviour),
            None => {
                let mut behaviour = Behaviour::default();
                change(&mut behaviour);
                rules.push((prefix.to_string(), behaviour));
            }
        }
    }

    pub fn set_status(&self, prefix: &str, status: u16) {
        let status = StatusCode::from_u16(status).expect("valid status");
        self.set(prefix, move |b| b.status = status);
    }

    /// Holds every response under `prefix` until the returned latch is released (or dropped).
    /// A held response that is never released is answered `500 held too long` once the test's
    /// patience runs out, so nothing waits forever.
    pub fn hold(&self, prefix: &str) -> Hold {
        let (tx, rx) = watch::channel(false);
        self.set(prefix, move |b| b.hold = Some(rx));
        Hold { tx }
    }
}

// -------------------------------------------------------------- observations ----

impl Upstream {
    /// Requests received for exactly this path and query.
    pub fn hits(&self, path_and_query: &str) -> usize {
        let log = self.state.log.lock().unwrap();
        log.iter().filter(|r| r.uri == path_and_query).count()
    }

    /// Requests received for any path under `prefix`.
    pub fn hits_under(&self, prefix: &str) -> usize {
        let log = self.state.log.lock().unwrap();
        log.iter().filter(|r| r.uri.starts_with(prefix)).count()
    }

    /// Every request received, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.log.lock().unwrap().clone()
    }

    /// The requests received for exactly this path and query.
    pub fn requests_for(&self, path_and_query: &str) -> Vec<Recorded> {
        let log = self.state.log.lock().unwrap();
        log.iter()
            .filter(|r| r.uri == path_and_query)
            .cloned()
            .collect()
    }

    /// Waits until `n` requests for `path_and_query` have arrived (woken by each arrival, not by
    /// a timer); panics once the test's patience runs out.
    pub async fn wait_for_hits(&self, path_and_query: &str, n: usize) {
        let mut arrivals = self.state.arrivals.subscribe();
        let waited = tokio::time::timeout(
            patience(),
            arrivals.wait_for(|_| self.hits(path_and_query) >= n),
        )
        .await;
        match waited {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => unreachable!("the upstream owns the sender"),
            Err(_) => panic!(
                "the upstream received {} of {n} requests for {path_and_query} within {:?}",
                self.hits(path_and_query),
                patience()
            ),
        }
    }
}

// ------------------------------------------------------------------- serving ----

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of descriptors or similar: stop rather than spin; the tests then fail loudly.
                eprintln!(
                    "test upstream {:?}: accept failed, stopping: {error}",
                    listener.local_addr()
                );
                return;
            }
        };
        let state = state.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&state, request).await) }
            });
            // A connection the proxy drops mid-response is not the upstream's problem.
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let at = Instant::now();
    let (parts, body) = request.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) => return plain(StatusCode::BAD_REQUEST, format!("unreadable body: {error}")),
    };
    let uri = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| parts.uri.path().to_string());
    let range = parts.headers.get(http::header::RANGE).cloned();
    let seq = state.seq.fetch_add(1, Ordering::SeqCst) + 1;
    state.log.lock().unwrap().push(Recorded {
        seq,
        method: parts.method.clone(),
        uri: uri.clone(),
        headers: parts.headers,
        body,
        at,
    });
    state.arrivals.send_modify(|n| *n += 1);

    let behaviour = state.behaviour(parts.uri.path());
    if let Some(mut hold) = behaviour.hold.clone() {
        let released = tokio::time::timeout(patience(), hold.wait_for(|released| *released)).await;
        if !matches!(released, Ok(Ok(_))) {
            return plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("held too long: {uri} was never released"),
            );
        }
    }
    if !behaviour.delay.is_zero() {
        tokio::time::sleep(behaviour.delay).await;
    }

    let body = match &behaviour.body {
        _ if behaviour.status == StatusCode::NO_CONTENT
            || behaviour.status == StatusCode::NOT_MODIFIED =>
        {
            Bytes::new()
        }
        BodySpec::Echo => Bytes::from(format!("upstream body for {uri}")),
        BodySpec::Fixed(bytes) => bytes.clone(),
        BodySpec::Size(len) => pattern(*len),
        BodySpec::Distinct => Bytes::from(format!("response {seq} for {uri}")),
    };
    let ranged = range
        .filter(|_| behaviour.ranges && behaviour.status == StatusCode::OK)
        .and_then(|range| one_range(&range, body.len()));
    let mut response = match ranged {
        Some((first, end)) => {
            let content_range = format!("bytes {first}-{}/{}", end - 1, body.len());
            let mut response = Response::new(Full::new(body.slice(first..end)));
            *response.status_mut() = StatusCode::PARTIAL_CONTENT;
            response.headers_mut().insert(
                http::header::CONTENT_RANGE,
                HeaderValue::from_str(&content_range).expect("a valid content-range"),
            );
            response
        }
        None => {
            let mut response = Response::new(Full::new(body));
            *response.status_mut() = behaviour.status;
            response
        }
    };
    for (name, value) in &behaviour.headers {
        let value = value.replace("{n}", &seq.to_string());
        response.headers_mut().append(
            name.clone(),
            HeaderValue::from_str(&value).expect("valid header value"),
        );
    }
    response
}

/// `bytes=first-last` or `bytes=first-` within `len` bytes, as `first..end`.
fn one_range(range: &HeaderValue, len: usize) -> Option<(usize, usize)> {
    let (first, last) = range
        .to_str()
        .ok()?
        .strip_prefix("bytes=")?
        .split_once('-')?;
    let first: usize = first.parse().ok()?;
    let end = match last {
        "" => len,
        last => last.parse::<usize>().ok()?.saturating_add(1).min(len),
    };
    (first < end).then_some((first, end))
}

fn plain(status: StatusCode, text: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response
}
