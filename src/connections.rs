//! Client connections: the accept loop of a listener and what one connection may ask of it.
//!
//! `axum::serve` cannot bound a connection, so both listeners are served here with hyper-util's
//! connection builder (HTTP/1.1, and HTTP/2 with prior knowledge, h2c), each connection on its own
//! task, under the [`Limits`] of the config:
//!
//! - `max_connections`: a connection beyond it is answered 503 (best effort, never waited for)
//!   and closed at once; nothing is queued.
//! - `header_read_timeout` and `idle_timeout`: a watchdog per connection follows its [`Activity`]
//!   (idle, reading a request head, busy with requests) and drops a client that trickles its head
//!   (slowloris), or closes a keep-alive connection that sent nothing for too long.
//! - `max_header_count`: the parser's header slots; `max_header_bytes` and `max_uri_length`: 431
//!   and 414 from [`check_head`], with the parser's buffer just large enough for both, so a head
//!   beyond even that is refused by the parser itself (431).
//! - `max_request_body`: a declared length over it is 413 at once; a streamed body is counted as it
//!   arrives ([`CappedBody`]) and fails with [`BodyTooLarge`], which the proxy answers 413. A body
//!   that breaks off fails with [`RequestBodyBroken`], which the proxy answers 400.
//! - `send_timeout` and `min_send_rate`: hyper has no write timeout, so the socket itself holds
//!   each write to the client's pace ([`SendClock`]); a client that stops reading is cut (reset),
//!   and what its answer held (an upstream slot, buffers) is freed with it.
//! - `max_connections_per_client`: a client address's connection beyond it is refused like one
//!   beyond `max_connections`.
//!
//! At shutdown a listener stops accepting (its socket is closed, so new connections are refused),
//! every connection is told to finish its requests in flight and close, and [`Open`] is what is
//! left, for the server to wait on within a bound and then drop.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::Limits;
use crate::metrics::Metrics;

/// Room in the parser's buffer for the request line's method and version and the head's line
/// ends, beyond the URI and header limits.
const HEAD_SLACK: usize = 1024;
/// hyper refuses a read buffer smaller than this.
const MIN_BUF_SIZE: usize = 8192;
/// Pause after a failed accept (out of file descriptors, say), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A request body grew past `limits.max_request_body`.
#[derive(Debug, thiserror::Error)]
#[error("the request body is larger than {limit} bytes")]
pub struct BodyTooLarge {
    pub limit: u64,
}

/// A request body the client broke: bad chunked framing, fewer bytes than its length, a
/// connection closed mid-body. The client's fault, so it is answered 400 and never counted
/// against the upstream.
#[derive(Debug, thiserror::Error)]
#[error("the request body broke off: {0}")]
pub struct RequestBodyBroken(#[source] Box<dyn std::error::Error + Send + Sync>);

/// Whether `error`, or an error it was caused by, is [`BodyTooLarge`].
pub fn body_too_large(error: &(dyn std::error::Error + 'static)) -> bool {
    caused_by::<BodyTooLarge>(error)
}

/// Whether `error`, or an error it was caused by, is [`RequestBodyBroken`].
pub fn request_body_broken(error: &(dyn std::error::Error + 'static)) -> bool {
    caused_by::<RequestBodyBroken>(error)
}

fn caused_by<T: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    // Error chains are short; the count only guards against a chain that loops.
    for _ in 0..16 {
        let Some(error) = cause else { return false };
        if error.is::<T>() {
            return true;
        }
        cause = error.source();
    }
    false
}

/// One listener, ready to accept.
pub struct Listener {
    /// Already bound (tests bind port 0).
    listener: TcpListener,
    /// What every request that passes the limits is handed to.
    app: Router,
    limits: Limits,
    /// Where refusals and open connections are counted.
    metrics: Metrics,
}

impl Listener {
    pub fn new(listener: TcpListener, app: Router, limits: Limits, metrics: Metrics) -> Self {
        Self {
            listener,
            app,
            limits,
            metrics,
        }
    }

    /// Accepts connections until `stop` turns true; then closes the listening socket and tells
    /// every open connection to finish what it is doing and close.
    pub async fn serve(self, mut stop: watch::Receiver<bool>) -> Open {
        let Listener {
            listener,
            app,
            limits,
            metrics,
        } = self;
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        let clients = Arc::new(Clients::default());
        let (drain, draining) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let shared = Arc::new(Shared {
            app,
            limits,
            metrics,
        });
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.wait_for(|stop| *stop) => break,
            };
            // Reap finished connections so the set holds only live ones.
            while tasks.try_join_next().is_some() {}
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "could not accept a connection");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                shared.metrics.limit_rejected("connections");
                refuse(&stream);
                continue;
            };
            let per_client = shared.limits.max_connections_per_client;
            let client = match per_client {
                0 => None,
                limit => match clients.enter(peer.ip(), limit) {
                    Some(client) => Some(client),
                    None => {
                        shared.metrics.limit_rejected("connections_per_client");
                        refuse(&stream);
                        continue;
                    }
                },
            };
            tasks.spawn(connection(
                stream,
                peer,
                shared.clone(),
                draining.clone(),
                (slot, client),
            ));
        }
        drop(listener);
        drain.send_replace(true);
        Open {
            tasks,
            _drain: drain,
        }
    }
}

/// Open connections per client address, for `max_connections_per_client`: at most one entry
/// per open connection, since an address leaves with its last one.
#[derive(Default)]
struct Clients(Mutex<HashMap<IpAddr, usize>>);

impl Clients {
    /// A place for one more connection from `ip`, unless it has `limit` open already.
    fn enter(self: &Arc<Self>, ip: IpAddr, limit: usize) -> Option<ClientSlot> {
        let mut open = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(ip).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(ClientSlot {
            clients: self.clone(),
            ip,
        })
    }
}

/// One connection's place among its client's; given back when the connection ends.
struct ClientSlot {
    clients: Arc<Clients>,
    ip: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self
            .clients
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Answers a connection over the limit with 503 if its socket takes the bytes at once, never
/// waiting for it; dropping the stream then closes it.
fn refuse(stream: &TcpStream) {
    const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\n\
        retry-after: 1\r\ncontent-length: 0\r\n\r\n";
    let _ = stream.try_write(REFUSAL);
}

/// A listener's connections still open after it stopped accepting; each has been told to close
/// once its requests in flight are answered.
pub struct Open {
    tasks: JoinSet<()>,
    /// Kept so connections do not mistake the end of the channel for a change.
    _drain: watch::Sender<bool>,
}

impl Open {
    /// Waits up to `within` for every connection to close; answers whether they all did.
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        let tasks = &mut self.tasks;
        tokio::time::timeout(
            within,
            async move { while tasks.join_next().await.is_some() {} },
        )
        .await
        .is_ok()
    }

    /// Connections still open.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Closes every connection still open, whatever it is doing.
    pub async fn close(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// What every connection of one listener shares.
struct Shared {
    /// The listener's router, cloned per request (cheap: an `Arc` inside).
    app: Router,
    limits: Limits,
    metrics: Metrics,
}

// ------------------------------------------------------------------ one connection ----

/// Why a connection's watchdog closes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expiry {
    /// A request head started arriving and did not finish within `header_read_timeout`.
    HeadTimeout,
    /// No request for `idle_timeout`.
    Idle,
}

/// Where a connection is, as its watchdog sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Nothing since the last response (or since connecting), from this instant.
    Idle(Instant),
    /// Bytes of a request head arrived, the first at this instant; the head is not complete.
    ReadingHead(Instant),
    /// This many requests are being answered (HTTP/2 answers several at once).
    Busy(usize),
}

/// A connection's phase, updated by its reads and its requests, watched by its watchdog.
struct Activity {
    /// Where the connection is now, with the instant its idle or head-reading time started.
    phase: Mutex<Phase>,
    /// Wakes the watchdog when the phase changes.
    changed: Notify,
    /// Requests begun on the connection: a new one starts a new answer for the send rate.
    begun: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            phase: Mutex::new(Phase::Idle(Instant::now())),
            changed: Notify::new(),
            begun: AtomicU64::new(0),
        }
    }

    fn update(&self, change: impl FnOnce(Phase) -> Phase) {
        let mut phase = self.phase.lock().unwrap_or_else(PoisonError::into_inner);
        let next = change(*phase);
        if next != *phase {
            *phase = next;
            self.changed.notify_one();
        }
    }

    /// Bytes arrived from the client.
    fn read(&self) {
        self.update(|phase| match phase {
            Phase::Idle(_) => Phase::ReadingHead(Instant::now()),
            other => other,
        });
    }

    /// A request head is complete; the request is being answered.
    fn begin(self: &Arc<Self>) -> RequestGuard {
        self.begun.fetch_add(1, Ordering::Relaxed);
        self.update(|phase| match phase {
            Phase::Busy(n) => Phase::Busy(n + 1),
            _ => Phase::Busy(1),
        });
        RequestGuard(self.clone())
    }

    /// When and why the watchdog should close the connection, if nothing changes.
    fn deadline(&self, limits: &Limits) -> Option<(Instant, Expiry)> {
        match *self.phase.lock().unwrap_or_else(PoisonError::into_inner) {
            Phase::Idle(since) => Some((since + limits.idle_timeout, Expiry::Idle)),
            Phase::ReadingHead(since) => {
                Some((since + limits.header_read_timeout, Expiry::HeadTimeout))
            }
            Phase::Busy(_) => None,
        }
    }

    /// Completes when the connection has been idle, or reading one head, for too long.
    async fn expired(&self, limits: &Limits) -> Expiry {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.deadline(limits) {
                None => changed.await,
                Some((at, why)) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {
                            if self.deadline(limits) == Some((at, why)) {
                                return why;
                            }
                        }
                        _ = changed => {}
                    }
                }
            }
        }
    }
}

/// One request being answered; dropped when its response body is done (or dropped).
struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.update(|phase| match phase {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            _ => Phase::Idle(Instant::now()),
        });
    }
}

/// Serves one connection until the client closes it, a limit closes it, or shutdown drains it.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut draining: watch::Receiver<bool>,
    _slots: (OwnedSemaphorePermit, Option<ClientSlot>),
) {
    let metrics = shared.metrics.clone();
    metrics.connections_open.inc();
    let _open = scopeguard(|| metrics.connections_open.dec());
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity::new());
    let limits = &shared.limits;
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: activity.clone(),
        send: SendClock::new(limits, metrics.clone(), peer),
    });
    let service = {
        let shared = shared.clone();
        let activity = activity.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let shared = shared.clone();
            let guard = activity.begin();
            async move { Ok::<_, Infallible>(answer(&shared, peer, request, guard).await) }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_headers(limits.max_header_count)
        .max_buf_size(
            (limits.max_uri_length + limits.max_header_bytes + HEAD_SLACK).max(MIN_BUF_SIZE),
        );
    builder.http2().max_header_list_size(
        u32::try_from(limits.max_uri_length + limits.max_header_bytes + HEAD_SLACK)
            .unwrap_or(u32::MAX),
    );
    let served = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(served);
    let mut closing = false;
    loop {
        tokio::select! {
            result = served.as_mut() => {
                if let Err(error) = result {
                    note_error(&metrics, &*error);
                }
                return;
            }
            why = activity.expired(limits), if !closing => match why {
                Expiry::HeadTimeout => {
                    metrics.limit_rejected("header_read_timeout");
                    tracing::debug!(%peer, "dropped a connection that did not send its request head in time");
                    return;
                }
                Expiry::Idle => {
                    served.as_mut().graceful_shutdown();
                    closing = true;
                }
            },
            _ = draining.wait_for(|drain| *drain), if !closing => {
                served.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

/// Counts a connection the parser refused for its head's size or header count (it answered 431).
fn note_error(metrics: &Metrics, error: &(dyn std::error::Error + 'static)) {
    if let Some(error) = error.downcast_ref::<hyper::Error>()
        && error.is_parse_too_large()
    {
        metrics.limit_rejected("headers");
    }
}

/// Runs `f` when dropped.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// One request: its head checked against the limits, then the app, its body counted.
async fn answer(
    shared: &Shared,
    peer: SocketAddr,
    request: Request<Incoming>,
    guard: RequestGuard,
) -> Response<Guarded<Body, RequestGuard>> {
    let limits = &shared.limits;
    let response = match check_head(&request, limits) {
        Err(refusal) => {
            shared.metrics.limit_rejected(refusal.limit);
            refusal.response()
        }
        Ok(()) => {
            let (mut parts, body) = request.into_parts();
            parts.extensions.insert(ConnectInfo(peer));
            let body = CappedBody {
                inner: body,
                read: 0,
                limit: limits.max_request_body,
                metrics: Some(shared.metrics.clone()),
            };
            let request = Request::from_parts(parts, Body::new(body));
            let app = TowerToHyperService::new(shared.app.clone());
            match hyper::service::Service::call(&app, request).await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        }
    };
    response.map(|body| Guarded {
        body,
        _guard: guard,
    })
}

/// A request refused by a limit before it reaches the app.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    /// The `limit` label it is counted under.
    pub limit: &'static str,
    pub message: &'static str,
}

impl Refusal {
    fn response(&self) -> Response<Body> {
        let mut response = Response::new(Body::from(self.message));
        *response.status_mut() = self.status;
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        // The client may still be sending what was refused; it is not read.
        response
            .headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        response
    }
}

/// Checks a request head against the limits: 414 for a long URI, 431 for too many or too large
/// header fields, 413 for a declared body over the limit.
pub fn check_head<B>(request: &Request<B>, limits: &Limits) -> Result<(), Refusal> {
    let target = request
        .uri()
        .path_and_query()
        .map_or(0, |target| target.as_str().len());
    if target > limits.max_uri_length {
        return Err(Refusal {
            status: StatusCode::URI_TOO_LONG,
            limit: "uri_length",
            message: "corral: the request URI is too long\n",
        });
    }
    let headers = request.headers();
    // Each field as it travels in HTTP/1.1: name, ": ", value, CRLF.
    let bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if headers.len() > limits.max_header_count || bytes > limits.max_header_bytes {
        return Err(Refusal {
            status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            limit: "headers",
            message: "corral: the request header fields are too large\n",
        });
    }
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|length| length > limits.max_request_body) {
        return Err(Refusal {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            limit: "request_body",
            message: "corral: the request body is too large\n",
        });
    }
    Ok(())
}

// ------------------------------------------------------------------ bodies and io ----

/// A request body that fails with [`BodyTooLarge`] once more than `limit` bytes arrived; what
/// arrived before is passed on as it comes, never buffered here.
pub struct CappedBody<B> {
    pub inner: B,
    /// Bytes passed on so far.
    pub read: u64,
    pub limit: u64,
    /// Counts the refusal once (taken when it is counted).
    pub metrics: Option<Metrics>,
}

impl<B> hyper::body::Body for CappedBody<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.read > this.limit {
            return Poll::Ready(Some(Err(Box::new(BodyTooLarge { limit: this.limit }))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.read += data.len() as u64;
                    if this.read > this.limit {
                        if let Some(metrics) = this.metrics.take() {
                            metrics.limit_rejected("request_body");
                        }
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge {
                            limit: this.limit,
                        }))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                Poll::Ready(Some(Err(Box::new(RequestBodyBroken(error.into())))))
            }
            other => other.map(|_| None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A body that keeps `guard` alive until it is done or dropped (a request's place on its
/// connection, an upstream slot).
pub struct Guarded<B, G> {
    pub body: B,
    /// Never read: it is released when the body is dropped.
    pub _guard: G,
}

impl<B, G> hyper::body::Body for Guarded<B, G>
where
    B: hyper::body::Body + Unpin,
    G: Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A client socket that tells its connection's [`Activity`] when bytes arrive, and cuts the
/// connection when a write waits on the client too long ([`SendClock`]): hyper has no write
/// timeout of its own.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
    send: SendClock,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read();
        }
        polled
    }
}

impl Watched {
    /// A connection given up on a slow client is reset, not closed: what its socket still holds
    /// for the client is dropped with it, rather than sent to a client that does not read.
    fn cut_if_expired(&self, written: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Err(error)) = &written
            && error.kind() == io::ErrorKind::TimedOut
        {
            let _ = self.inner.set_zero_linger();
        }
        written
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.inner).poll_write(cx, buf);
        let paced = this.send.paced(cx, &this.activity, written);
        this.cut_if_expired(paced)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        let paced = this.send.paced(cx, &this.activity, written);
        this.cut_if_expired(paced)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Why writes to a client were given up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SendExpiry {
    /// One write waited `send_timeout` for the client to take a byte.
    Stalled,
    /// The client took less than `min_send_rate` over the time writes waited on it.
    TooSlow,
}

impl SendExpiry {
    /// The `limit` label it is counted under.
    fn limit(self) -> &'static str {
        match self {
            SendExpiry::Stalled => "send_timeout",
            SendExpiry::TooSlow => "send_rate",
        }
    }
}

/// How long writes to one client may wait on it: one write at most `send_timeout`, and all the
/// writes of one answer no longer than `send_timeout` plus one second per `min_send_rate` bytes
/// the client took. Only time a write waited counts, so a slow upstream never counts against its
/// client.
struct SendClock {
    send_timeout: Duration,
    /// Bytes per second; 0: no rate.
    min_rate: u64,
    /// The write waiting on the client now: since when, and the timer of its deadline.
    stall: Option<(Instant, Pin<Box<tokio::time::Sleep>>, SendExpiry)>,
    /// Of the answer being sent: bytes the client took, and time writes waited on it.
    taken: u64,
    waited: Duration,
    /// Which request of the connection the counts are for ([`Activity::begun`]).
    answer: u64,
    metrics: Metrics,
    peer: SocketAddr,
}

impl SendClock {
    fn new(limits: &Limits, metrics: Metrics, peer: SocketAddr) -> Self {
        Self {
            send_timeout: limits.send_timeout,
            min_rate: limits.min_send_rate,
            stall: None,
            taken: 0,
            waited: Duration::ZERO,
            answer: 0,
            metrics,
            peer,
        }
    }

    /// What a write to the client returned, held to the client's pace: a write that waited too
    /// long fails, which closes the connection.
    fn paced(
        &mut self,
        cx: &mut Context<'_>,
        activity: &Activity,
        written: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        let answer = activity.begun.load(Ordering::Relaxed);
        if answer != self.answer {
            (self.answer, self.taken, self.waited) = (answer, 0, Duration::ZERO);
        }
        match written {
            Poll::Ready(Ok(n)) => {
                if let Some((since, _, _)) = self.stall.take() {
                    self.waited += since.elapsed();
                }
                self.taken += n as u64;
                Poll::Ready(Ok(n))
            }
            Poll::Pending => {
                if self.stall.is_none() {
                    self.stall = Some(self.deadline());
                }
                let Some((_, timer, why)) = &mut self.stall else {
                    return Poll::Pending;
                };
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let why = *why;
                Poll::Ready(Err(self.expired(why)))
            }
            failed => failed,
        }
    }

    /// The deadline of a write that starts waiting now, and what it means when it passes.
    fn deadline(&self) -> (Instant, Pin<Box<tokio::time::Sleep>>, SendExpiry) {
        let now = Instant::now();
        let mut wait = (self.send_timeout, SendExpiry::Stalled);
        if self.min_rate > 0 {
            let earned = Duration::from_secs_f64(self.taken as f64 / self.min_rate as f64);
            let left = (self.send_timeout + earned).saturating_sub(self.waited);
            if left < wait.0 {
                wait = (left, SendExpiry::TooSlow);
            }
        }
        (
            now,
            Box::pin(tokio::time::sleep_until(now + wait.0)),
            wait.1,
        )
    }

    fn expired(&self, why: SendExpiry) -> io::Error {
        self.metrics.limit_rejected(why.limit());
        tracing::debug!(peer = %self.peer, ?why, taken = self.taken,
            "cut a connection whose client stopped taking its answer");
        io::Error::new(
            io::ErrorKind::TimedOut,
            "the client stopped taking its answer",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    fn small() -> Limits {
        Limits {
            max_header_count: 3,
            max_header_bytes: 64,
            max_uri_length: 16,
            max_request_body: 10,
            ..Limits::default()
        }
    }

    #[test]
    fn a_head_within_every_limit_passes() {
        let ok = request("/a?b=c", &[("host", "x"), ("content-length", "10")]);
        assert_eq!(check_head(&ok, &small()), Ok(()));
    }

    #[test]
    fn each_limit_refuses_with_its_own_status() {
        let status = |r: &Request<()>| check_head(r, &small()).unwrap_err().status;
        assert_eq!(
            status(&request("/0123456789abcdef", &[])),
            StatusCode::URI_TOO_LONG
        );
        let four = [("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")];
        assert_eq!(
            status(&request("/", &four)),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        let long = "v".repeat(64);
        assert_eq!(
            status(&request("/", &[("x", &long)])),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        assert_eq!(
            status(&request("/", &[("content-length", "11")])),
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_tells_a_slow_head_from_an_idle_connection() {
        let limits = Limits {
            header_read_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(5),
            ..Limits::default()
        };
        let activity = Arc::new(Activity::new());
        let started = Instant::now();
        assert_eq!(activity.expired(&limits).await, Expiry::Idle);
        assert_eq!(started.elapsed(), Duration::from_secs(5));

        let activity = Arc::new(Activity::new());
        tokio::time::advance(Duration::from_secs(1)).await;
        activity.read();
        let started = Instant::now();
        assert_eq!(activity.expired(&limits).await, Expiry::HeadTimeout);
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_connection_never_expires_and_idles_again_after_its_answer() {
        let limits = Limits {
            idle_timeout: Duration::from_secs(5),
            ..Limits::default()
        };
        let activity = Arc::new(Activity::new());
        activity.read();
        let guard = activity.begin();
        let expired = tokio::time::timeout(Duration::from_secs(60), activity.expired(&limits));
        assert!(expired.await.is_err(), "a busy connection expired");
        drop(guard);
        let started = Instant::now();
        assert_eq!(activity.expired(&limits).await, Expiry::Idle);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    /// Writes to a client that waits `stall` each time before taking `chunk` bytes, until the
    /// clock gives up on it (its reason and when) or `rounds` writes went through.
    async fn pace(
        limits: &Limits,
        stall: Duration,
        chunk: usize,
        rounds: usize,
    ) -> Option<(SendExpiry, Duration)> {
        let metrics = Metrics::new();
        let peer = SocketAddr::from(([127, 0, 0, 1], 9));
        let mut clock = SendClock::new(limits, metrics.clone(), peer);
        let activity = Activity::new();
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let started = Instant::now();
        let cut = |metrics: &Metrics| {
            [SendExpiry::Stalled, SendExpiry::TooSlow]
                .into_iter()
                .find(|why| {
                    let counted = metrics.limit_rejections.with_label_values(&[why.limit()]);
                    counted.get() == 1
                })
                .expect("a cut is counted")
        };
        for _ in 0..rounds {
            for wait in [Duration::ZERO, stall] {
                tokio::time::advance(wait).await;
                if clock.paced(&mut cx, &activity, Poll::Pending).is_ready() {
                    return Some((cut(&metrics), started.elapsed()));
                }
            }
            let _ = clock.paced(&mut cx, &activity, Poll::Ready(Ok(chunk)));
        }
        None
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_waits_past_the_send_timeout_is_cut() {
        let limits = Limits {
            send_timeout: Duration::from_secs(2),
            min_send_rate: 0,
            ..Limits::default()
        };
        // A client that takes something every second keeps up.
        let steady = pace(&limits, Duration::from_secs(1), 1, 100).await;
        assert_eq!(steady, None);
        // One that stops is cut once a write waited 2 s.
        let stopped = pace(&limits, Duration::from_secs(3), 1, 100).await;
        assert_eq!(stopped, Some((SendExpiry::Stalled, Duration::from_secs(3))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_below_the_minimum_rate_is_cut_once_its_allowance_is_spent() {
        let limits = Limits {
            send_timeout: Duration::from_secs(2),
            min_send_rate: 1000,
            ..Limits::default()
        };
        // 100 bytes every 500 ms: 200 B/s. Each write waits less than the send timeout, but
        // the waits add up: 2 s, plus a tenth of a second per write, is spent after 5 writes.
        let (why, after) = pace(&limits, Duration::from_millis(500), 100, 100)
            .await
            .expect("cut");
        assert_eq!(why, SendExpiry::TooSlow);
        assert!(
            after >= Duration::from_millis(2500) && after <= Duration::from_secs(3),
            "{after:?}"
        );
        // 1000 bytes every 500 ms is above the rate: never cut.
        let fast = pace(&limits, Duration::from_millis(500), 1000, 100).await;
        assert_eq!(fast, None);
    }

    #[tokio::test]
    async fn a_streamed_body_fails_past_its_limit() {
        use http_body_util::BodyExt;
        let chunks = futures::stream::iter(
            ["0123", "4567", "89ab"]
                .into_iter()
                .map(|c| Ok::<_, io::Error>(Frame::data(Bytes::from(c)))),
        );
        let body = CappedBody {
            inner: http_body_util::StreamBody::new(chunks),
            read: 0,
            limit: 10,
            metrics: None,
        };
        let Err(error) = body.collect().await else {
            panic!("a body over the limit was read whole")
        };
        assert!(body_too_large(&*error));
    }
}
