//! Upstream connections the proxy can take out of the pool.
//!
//! hyper's pool reuses a connection as soon as a response on it is complete. A response can be
//! complete to hyper and still be one corral refuses (ambiguous framing): whatever made it
//! ambiguous may have left the two ends reading the stream differently, so the connection must
//! carry nothing more. Every connection made here puts a [`Retire`] handle in the extensions of
//! the responses it carries; retiring makes the connection read end-of-file and refuse writes,
//! so hyper closes it and the pool lets it go.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::dns::GaiResolver;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

/// An [`HttpConnector`] whose connections can be retired; `R` resolves the names it connects to.
#[derive(Clone)]
pub struct RetiringConnector<R = GaiResolver> {
    inner: HttpConnector<R>,
}

impl<R> RetiringConnector<R> {
    pub fn new(inner: HttpConnector<R>) -> Self {
        Self { inner }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<R> Service<Uri> for RetiringConnector<R>
where
    HttpConnector<R>: Service<Uri, Response = TokioIo<TcpStream>>,
    <HttpConnector<R> as Service<Uri>>::Error: Into<BoxError>,
    <HttpConnector<R> as Service<Uri>>::Future: Send + 'static,
{
    type Response = Retirable;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Retirable, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            Ok(Retirable {
                io: connecting.await.map_err(Into::into)?,
                state: Arc::default(),
            })
        })
    }
}

/// Whether a connection is retired, and who to wake when it is.
#[derive(Default)]
struct State {
    retired: AtomicBool,
    /// The task reading the connection (hyper's, while the connection idles in the pool).
    reader: AtomicWaker,
}

/// Takes the connection a response came on out of service (found in the response's extensions).
#[derive(Clone)]
pub struct Retire(Arc<State>);

impl Retire {
    pub fn retire(&self) {
        self.0.retired.store(true, Ordering::SeqCst);
        self.0.reader.wake();
    }
}

/// A TCP connection to an upstream that reads end-of-file once retired.
pub struct Retirable {
    io: TokioIo<TcpStream>,
    state: Arc<State>,
}

impl Retirable {
    fn retired(&self) -> bool {
        self.state.retired.load(Ordering::SeqCst)
    }
}

impl Read for Retirable {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.state.reader.register(cx.waker());
        if this.retired() {
            // Nothing read: end-of-file, which hyper answers by closing the connection.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl Write for Retirable {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.retired() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the connection was retired",
            )));
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.retired() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the connection was retired",
            )));
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl Connection for Retirable {
    fn connected(&self) -> Connected {
        self.io.connected().extra(Retire(self.state.clone()))
    }
}
