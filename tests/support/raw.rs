//! Hand-written HTTP/1.1 on raw TCP, for the requests and responses a well-behaved library refuses
//! to produce: conflicting framing, smuggled requests, bodies that disagree with their length.
//!
//! - [`exchange`]: write bytes to a server, read everything it sends until it closes.
//! - [`RawUpstream`]: an upstream that answers each request with bytes a test scripts, counting the
//!   connections it accepts (so tests see whether a connection was reused).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use super::patience;

/// Largest request head [`RawUpstream`] reads; a longer one closes the connection.
const HEAD_MAX: usize = 64 * 1024;
/// Requests one [`RawUpstream`] connection serves at most before it closes.
const REQUESTS_PER_CONNECTION: usize = 100;
/// Bytes [`exchange`] reads at most.
const READ_MAX: usize = 1024 * 1024;

/// What came back from [`exchange`].
#[derive(Debug)]
pub struct Exchanged {
    /// Everything the server sent, as (lossy) text.
    pub text: String,
    /// Whether the server closed the connection (rather than our patience running out).
    pub closed: bool,
}

impl Exchanged {
    /// How many responses the server sent: status lines at the start of the text or of a line.
    pub fn responses(&self) -> usize {
        let at_start = usize::from(self.text.starts_with("HTTP/1."));
        at_start + self.text.matches("\r\nHTTP/1.").count()
    }

    /// The status code of the first response, if there is one.
    pub fn status(&self) -> Option<u16> {
        self.text
            .strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
    }
}

/// Writes `request` to `addr` and reads until the server closes the connection, or until the
/// test's patience runs out (then `closed` is false).
pub async fn exchange(addr: SocketAddr, request: &[u8]) -> Exchanged {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write the request");
    let mut read = Vec::new();
    let mut buf = [0u8; 8192];
    let outcome = tokio::time::timeout(patience(), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    read.extend_from_slice(&buf[..n]);
                    assert!(
                        read.len() <= READ_MAX,
                        "more than {READ_MAX} bytes came back"
                    );
                }
            }
        }
    })
    .await;
    Exchanged {
        text: String::from_utf8_lossy(&read).into_owned(),
        closed: outcome.is_ok(),
    }
}

/// One request as [`RawUpstream`] read it.
#[derive(Clone, Debug)]
pub struct RawRequest {
    /// The request line and header lines, as sent, without the final blank line.
    pub head: String,
    /// Which connection it came on (1 for the first accepted).
    pub connection: usize,
}

impl RawRequest {
    /// The request target (path and query) from the request line.
    pub fn target(&self) -> &str {
        self.head.split(' ').nth(1).unwrap_or("")
    }
}

/// What [`RawUpstream`] does with one request.
pub struct Scripted {
    /// Bytes written back, exactly.
    pub bytes: Vec<u8>,
    /// Close the connection after writing them.
    pub close: bool,
}

type Script = dyn Fn(&RawRequest) -> Scripted + Send + Sync;

struct State {
    script: Box<Script>,
    connections: AtomicUsize,
    log: Mutex<Vec<RawRequest>>,
}

/// A scripted upstream on 127.0.0.1 at an ephemeral port; dropping it closes everything.
pub struct RawUpstream {
    addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl RawUpstream {
    /// Answers every request with what `script` returns for it. Request bodies are read by their
    /// `Content-Length` only (the proxy re-frames what it forwards).
    pub async fn start(
        script: impl Fn(&RawRequest) -> Scripted + Send + Sync + 'static,
    ) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the raw upstream");
        let addr = listener.local_addr().expect("raw upstream local_addr");
        let state = Arc::new(State {
            script: Box::new(script),
            connections: AtomicUsize::new(0),
            log: Mutex::new(Vec::new()),
        });
        let accept = tokio::spawn(accept_loop(listener, state.clone()));
        RawUpstream {
            addr,
            state,
            accept,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Every request read so far, in order.
    pub fn requests(&self) -> Vec<RawRequest> {
        self.state.log.lock().unwrap().clone()
    }

    /// Requests read for exactly this target.
    pub fn hits(&self, target: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.target() == target)
            .count()
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let number = state.connections.fetch_add(1, Ordering::SeqCst) + 1;
        connections.spawn(serve(stream, state.clone(), number));
    }
}

async fn serve(mut stream: TcpStream, state: Arc<State>, connection: usize) {
    let mut buffer: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 8192];
    for _ in 0..REQUESTS_PER_CONNECTION {
        let head_end = loop {
            if let Some(end) = find(&buffer, b"\r\n\r\n") {
                break end;
            }
            if buffer.len() > HEAD_MAX {
                return;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
        let length = content_length(&head);
        let whole = head_end + 4 + length;
        while buffer.len() < whole {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
        buffer.drain(..whole);
        let request = RawRequest { head, connection };
        state.log.lock().unwrap().push(request.clone());
        let answer = (state.script)(&request);
        if stream.write_all(&answer.bytes).await.is_err() || answer.close {
            return;
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn content_length(head: &str) -> usize {
    head.lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0)
}
