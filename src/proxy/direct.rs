//! The direct pass-through: a request that may not use the cache, sent straight to the upstream
//! and streamed both ways; nothing is stored.

use std::net::IpAddr;

use axum::body::Body;
use http::{HeaderMap, Method, StatusCode, Uri};

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Frame;
use prometheus::IntCounter;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::Proxy;
use super::respond::{self, Answered, Outcome, body_too_large, broken_body, busy, plain};
use super::slots::Budget;
use super::upstream::{self, RequestBody, UpstreamError, target};
use crate::config::Route;
use crate::http::forward::forward_headers;

/// A request sent straight to the upstream. Borrowed: most requests never go straight through,
/// and copying the headers is not free.
pub(super) struct Direct<'a> {
    pub proxy: &'a Proxy,
    pub route: &'a Route,
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    pub client: Option<IpAddr>,
}

impl Direct<'_> {
    /// Sends the request with `body`; `reason` is why it went straight through, for
    /// `Cache-Status`.
    pub async fn send(self, body: Body, reason: &str) -> Answered {
        let Ok(uri) = target(&self.route.upstream, self.uri) else {
            return plain(
                StatusCode::BAD_REQUEST,
                "corral: the request URI cannot be forwarded\n".into(),
                Outcome::Bypass,
                "bad-uri",
            );
        };
        let mut headers = forward_headers(self.route, self.headers, false, self.client, "http");
        // A streamed body is sent once; none (a GET's) may be sent again.
        let body = RequestBody::from_body(forwarded_body(self.method, &mut headers, body));
        let policy = &self.route.policy;
        let metrics = self.proxy.engine.metrics();
        let until = tokio::time::Instant::now() + policy.wait_timeout;
        let Some(slot) = (self.proxy.slots)
            .take(
                &self.route.name,
                Budget::Pass,
                policy.max_upstream_fetches,
                until,
            )
            .await
        else {
            metrics.limit_rejected(Budget::Pass.limit());
            return busy(
                "corral: too many requests to this upstream at once\n",
                "max-upstream-fetches",
            );
        };
        // The response head must come within max_fetch; the body then streams for as long as it
        // takes, as it would without a proxy.
        let asked = tokio::time::Instant::now();
        let sent = tokio::time::timeout(
            policy.max_fetch,
            self.proxy
                .upstream
                .send(self.route, self.method.clone(), uri, headers, body, None),
        )
        .await;
        // A request the client broke never reached the upstream as a whole: not the upstream's
        // error, so not counted against it.
        match &sent {
            Ok(Err(error)) if error.is_client_fault() => {}
            Ok(Ok(response)) => {
                upstream::observe(metrics, &self.route.name, Some(response.status()), asked)
            }
            _ => upstream::observe(metrics, &self.route.name, None, asked),
        }
        match sent {
            Err(_elapsed) => plain(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "corral: the upstream did not answer within max_fetch ({})\n",
                    humantime::format_duration(policy.max_fetch)
                ),
                Outcome::Bypass,
                "max-fetch",
            ),
            Ok(sent) => self.answered(sent, slot, asked.elapsed(), reason),
        }
    }

    /// How long this pass-through's read-ahead may wait on its client.
    fn stall(&self) -> Stall {
        let metrics = self.proxy.engine.metrics();
        Stall {
            timeout: self.proxy.snapshot().config.limits.send_timeout * 2,
            cut: metrics
                .limit_rejections
                .with_label_values(&["send_timeout"]),
        }
    }

    /// The client's answer to what the upstream said within `max_fetch`, `took` after it was
    /// asked; the answer's body keeps `slot` while it is read ([`read_ahead`]).
    fn answered(
        &self,
        sent: Result<upstream::UpstreamResponse, UpstreamError>,
        slot: OwnedSemaphorePermit,
        took: Duration,
        reason: &str,
    ) -> Answered {
        match sent {
            Ok(response) => {
                let (parts, body) = response.into_parts();
                let mut answered = respond::finish(
                    parts.status,
                    parts.headers,
                    read_ahead(body, slot, self.stall()),
                    Outcome::Bypass,
                    false,
                    Some(reason),
                );
                answered.upstream = Some(took);
                answered
            }
            Err(UpstreamError::RequestBodyTooLarge) => body_too_large(),
            Err(UpstreamError::RequestBodyBroken) => {
                self.proxy.engine.metrics().client_error("request_body");
                broken_body()
            }
            Err(error) => plain(
                error.status(),
                format!("corral: {error}\n"),
                Outcome::Bypass,
                match upstream::failure_detail(&error.to_string()) {
                    "upstream-error" => "upstream-unreachable",
                    detail => detail,
                },
            ),
        }
    }
}

/// Bytes of a pass-through's answer read from the upstream ahead of its client, at most: an answer
/// this small (plus what the sockets' own buffers hold) frees its upstream slot and connection as
/// soon as the upstream sent it, however slowly its client reads. Small, since every stuck
/// client may hold this much until it is cut.
const READ_AHEAD: usize = 64 << 10;

/// A frame read ahead, with its share of the [`READ_AHEAD`] budget (given back when taken), or
/// [`Stalled`] when the client stopped taking frames.
type Ahead<E> = Result<(Frame<Bytes>, Result<OwnedSemaphorePermit, Stalled>), E>;

/// The client took no part of its answer for twice `limits.send_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the client took no part of its answer for twice limits.send_timeout")]
struct Stalled;

/// How long a pass-through's read-ahead may stay full before its client is given up on, and what
/// counts that.
pub(super) struct Stall {
    /// Twice `limits.send_timeout`: an HTTP/1 client that stops reading fills its read-ahead
    /// moments after its socket, so its connection is cut (and counted) by the send limits first;
    /// this bound is for what they cannot see.
    pub timeout: Duration,
    /// `corral_limit_rejections_total{limit="send_timeout"}`.
    pub cut: IntCounter,
}

/// The answer's body as its client reads it, read from the upstream by a task of its own up to
/// [`READ_AHEAD`] bytes ahead. The task holds the upstream slot until the upstream's answer is
/// all read, or until the client is gone (its connection closed or cut by `limits.send_timeout`
/// or `limits.min_send_rate`), or until the read-ahead has stayed full for `stall.timeout`: an
/// HTTP/2 client can stop taking one stream's data while its connection stays busy with others,
/// which no connection-level limit sees; that stream is then ended with an error (reset), so a
/// client that stops reading pins a slot only as long as the send limits allow, and only past
/// [`READ_AHEAD`] bytes.
fn read_ahead<B>(mut upstream: B, slot: OwnedSemaphorePermit, stall: Stall) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<axum::BoxError> + Send + 'static,
{
    let budget = Arc::new(Semaphore::new(READ_AHEAD));
    let (ahead, taken) = mpsc::unbounded_channel::<Ahead<B::Error>>();
    tokio::spawn(async move {
        let _slot = slot;
        loop {
            let frame = tokio::select! {
                frame = upstream.frame() => frame,
                () = ahead.closed() => return,
            };
            let frame = match frame {
                None => return,
                Some(Err(error)) => {
                    let _ = ahead.send(Err(error));
                    return;
                }
                Some(Ok(frame)) => frame,
            };
            // A frame larger than the whole budget takes all of it.
            let size = frame.data_ref().map_or(0, Bytes::len).min(READ_AHEAD);
            let share = tokio::select! {
                share = budget.clone().acquire_many_owned(size as u32) => share,
                () = ahead.closed() => return,
                () = tokio::time::sleep(stall.timeout) => {
                    // The client took nothing for twice the send timeout: end its answer here.
                    stall.cut.inc();
                    let _ = ahead.send(Ok((Frame::data(Bytes::new()), Err(Stalled))));
                    return;
                }
            };
            let Ok(share) = share else { return };
            let share = Ok(share);
            if ahead.send(Ok((frame, share))).is_err() {
                return;
            }
        }
    });
    let frames = futures::stream::unfold(taken, |mut taken| async move {
        let frame = match taken.recv().await? {
            Ok((frame, Ok(_share))) => Ok(frame),
            Ok((_, Err(stalled))) => Err(axum::BoxError::from(stalled)),
            Err(error) => Err(error.into()),
        };
        Some((frame, taken))
    });
    Body::new(http_body_util::StreamBody::new(frames))
}

/// The body sent on: none for a GET or HEAD, whose body is never forwarded (nor its framing).
fn forwarded_body(method: &Method, headers: &mut HeaderMap, body: Body) -> Body {
    if *method == Method::GET || *method == Method::HEAD {
        headers.remove(http::header::CONTENT_LENGTH);
        headers.remove(http::header::TRANSFER_ENCODING);
        Body::empty()
    } else {
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// An upstream body of `len` bytes in 16 KiB frames.
    fn upstream(
        len: usize,
    ) -> impl hyper::body::Body<Data = Bytes, Error = std::io::Error> + Unpin {
        let frames = (0..len.div_ceil(16 << 10)).map(move |i| {
            let size = (len - i * (16 << 10)).min(16 << 10);
            Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![7u8; size])))
        });
        http_body_util::StreamBody::new(futures::stream::iter(frames))
    }

    /// A stall bound no test reaches.
    fn patient() -> Stall {
        Stall {
            timeout: Duration::from_secs(3600),
            cut: IntCounter::new("cut", "cut").unwrap(),
        }
    }

    async fn slot_back(slots: &Semaphore, within: Duration) -> bool {
        tokio::time::timeout(within, slots.acquire()).await.is_ok()
    }

    #[tokio::test]
    async fn an_answer_within_the_read_ahead_frees_its_slot_before_its_client_reads() {
        let slots = Arc::new(Semaphore::new(1));
        let slot = slots.clone().try_acquire_owned().unwrap();
        let body = read_ahead(upstream(READ_AHEAD), slot, patient());
        assert!(
            slot_back(&slots, Duration::from_secs(10)).await,
            "the slot waited on the client"
        );
        let read = body.collect().await.unwrap().to_bytes();
        assert_eq!(read.len(), READ_AHEAD);
    }

    #[tokio::test]
    async fn a_larger_answer_holds_its_slot_until_its_client_reads_or_leaves() {
        let slots = Arc::new(Semaphore::new(1));
        let slot = slots.clone().try_acquire_owned().unwrap();
        let body = read_ahead(upstream(4 * READ_AHEAD), slot, patient());
        // The read-ahead fills within the second: no client reads, so it never drains.
        let early = slot_back(&slots, Duration::from_secs(1)).await;
        assert!(!early, "freed with most of the answer unread");
        drop(body);
        assert!(
            slot_back(&slots, Duration::from_secs(10)).await,
            "the client left, the slot stayed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_takes_nothing_for_the_send_timeout_is_ended_and_frees_its_slot() {
        let slots = Arc::new(Semaphore::new(1));
        let slot = slots.clone().try_acquire_owned().unwrap();
        let cut = IntCounter::new("cut", "cut").unwrap();
        let stall = Stall {
            timeout: Duration::from_secs(60),
            cut: cut.clone(),
        };
        // The body is kept but never read, as an HTTP/2 stream with no window left would be.
        let mut body = read_ahead(upstream(4 * READ_AHEAD), slot, stall);
        assert!(
            !slot_back(&slots, Duration::from_secs(59)).await,
            "freed early"
        );
        assert!(
            slot_back(&slots, Duration::from_secs(2)).await,
            "the slot outlived the send timeout"
        );
        assert_eq!(cut.get(), 1);
        // What was read ahead is still delivered, then the answer ends in an error.
        let mut delivered = 0;
        let ended = loop {
            match body.frame().await {
                Some(Ok(frame)) => delivered += frame.data_ref().map_or(0, Bytes::len),
                Some(Err(error)) => break error.to_string(),
                None => panic!("the answer ended as if it were whole"),
            }
        };
        assert!(
            delivered <= READ_AHEAD,
            "{delivered} bytes past the read-ahead"
        );
        assert!(ended.contains("send_timeout"), "{ended}");
    }
}
