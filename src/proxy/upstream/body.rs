//! An upstream response body: read under the route's `read_timeout`, and buffered up to a limit
//! for a fetch that may be stored.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

use super::pool::InFlight;
use super::{Timeout, UpstreamError};

/// A response whose body is read under the route's `read_timeout`.
pub type UpstreamResponse = Response<IdleTimed>;

/// Why an upstream body stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Body(#[from] hyper::Error),
    #[error("upstream read_timeout ({}) elapsed", humantime::format_duration(*.0))]
    Idle(Duration),
}

/// An upstream body that fails when no chunk comes for the route's `read_timeout`; the request
/// counts as under way on its server until the body is dropped.
pub struct IdleTimed {
    inner: Incoming,
    sleep: Pin<Box<Sleep>>,
    read: ReadWatch,
    _in_flight: InFlight,
}

/// What a body's read timeout needs: its length, and what to count and log when it fires.
pub(super) struct ReadWatch {
    pub timeout: Duration,
    /// `corral_upstream_errors_total{reason="read_timeout"}` of the route.
    pub timeouts: prometheus::IntCounter,
    pub route: String,
    pub upstream: Uri,
}

impl IdleTimed {
    pub(super) fn new(inner: Incoming, read: ReadWatch, in_flight: InFlight) -> Self {
        IdleTimed {
            inner,
            sleep: Box::pin(tokio::time::sleep(read.timeout)),
            read,
            _in_flight: in_flight,
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
