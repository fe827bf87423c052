//! The clients: a raw HTTP/1.1 request that stamps the moment its response is complete, a burst of
//! them released together, and `wrk` for throughput.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Barrier, Semaphore};

use crate::servers::{ANSWERED, unix_nanos};

/// Longest time one response may take, for any system.
const RESPONSE_DEADLINE: Duration = Duration::from_secs(60);
/// Largest response the client reads.
const MAX_RESPONSE: usize = 64 * 1024;
/// Connections being opened at once (more overflows the servers' accept backlogs).
const CONNECTING: usize = 200;

/// One response as the client saw it.
#[derive(Clone, Debug)]
pub struct Received {
    pub status: u16,
    /// When the whole response had arrived, nanoseconds since the Unix epoch.
    pub at: u128,
    /// When the upstream answered, from its [`ANSWERED`] header (copied into cached answers).
    pub answered: Option<u128>,
}

impl Received {
    /// Time from the upstream's answer to this client's receipt, in milliseconds.
    pub fn wake_up_ms(&self) -> Option<f64> {
        self.answered
            .map(|answered| self.at.saturating_sub(answered) as f64 / 1e6)
    }
}

/// Opens a connection (not yet sending anything).
pub async fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = tokio::time::timeout(RESPONSE_DEADLINE, TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Sends `GET path` on `stream` and reads the whole response.
pub async fn exchange(mut stream: TcpStream, path: &str) -> anyhow::Result<Received> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: load\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    tokio::time::timeout(RESPONSE_DEADLINE, read_response(&mut stream))
        .await
        .context("no response within the deadline")?
}

async fn read_response(stream: &mut TcpStream) -> anyhow::Result<Received> {
    let mut buffer = Vec::with_capacity(4096);
    let mut chunk = [0u8; 8192];
    loop {
        let read = stream.read(&mut chunk).await?;
        let done = read == 0;
        buffer.extend_from_slice(&chunk[..read]);
        if buffer.len() > MAX_RESPONSE {
            bail!("response over {MAX_RESPONSE} bytes");
        }
        let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") else {
            if done {
                bail!("connection closed before the response head");
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
        let length = header(&head, "content-length").and_then(|v| v.parse::<usize>().ok());
        let complete = match length {
            Some(length) => buffer.len() >= end + 4 + length,
            None => done,
        };
        if complete || done {
            let at = unix_nanos();
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .context("no status line")?;
            let answered = header(&head, ANSWERED).and_then(|v| v.parse().ok());
            return Ok(Received {
                status,
                at,
                answered,
            });
        }
    }
}

/// Sends `GET path` on `stream` and returns the body, read to the end of the connection.
pub async fn exchange_body(mut stream: TcpStream, path: &str) -> anyhow::Result<String> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: load\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut buffer = Vec::new();
    tokio::time::timeout(
        RESPONSE_DEADLINE,
        (&mut stream)
            .take(MAX_RESPONSE as u64)
            .read_to_end(&mut buffer),
    )
    .await
    .context("no response within the deadline")??;
    let text = String::from_utf8_lossy(&buffer);
    let (_, body) = text.split_once("\r\n\r\n").context("no response head")?;
    Ok(body.to_owned())
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        (n.trim() == name).then(|| v.trim())
    })
}

/// One request on a new connection, and how long it took from connecting to the whole response.
pub async fn timed_get(addr: SocketAddr, path: &str) -> anyhow::Result<(Received, Duration)> {
    let started = Instant::now();
    let stream = connect(addr).await?;
    let received = exchange(stream, path).await?;
    Ok((received, started.elapsed()))
}

/// `count` requests for `path`, spread round-robin over `targets`: every connection is opened
/// first, then every request is sent at once.
pub async fn burst(
    targets: &[SocketAddr],
    path: &str,
    count: usize,
) -> anyhow::Result<Vec<Received>> {
    let barrier = Arc::new(Barrier::new(count + 1));
    let connecting = Arc::new(Semaphore::new(CONNECTING));
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let addr = targets[i % targets.len()];
        let (barrier, connecting, path) = (barrier.clone(), connecting.clone(), path.to_owned());
        tasks.push(tokio::spawn(async move {
            let stream = {
                let _permit = connecting.acquire().await.expect("never closed");
                connect(addr).await
            };
            // Every task reaches the barrier, connected or not, so none waits forever.
            barrier.wait().await;
            exchange(stream?, &path).await
        }));
    }
    barrier.wait().await;
    let mut received = Vec::with_capacity(count);
    for task in tasks {
        received.push(task.await??);
    }
    Ok(received)
}

/// Requests per second `wrk` reached against `url` with `connections` over `seconds`.
pub fn wrk(url: &str, connections: usize, seconds: u64) -> anyhow::Result<f64> {
    let output = Command::new("wrk")
        .args(["-t1", "-c", &connections.to_string(), "-d"])
        .arg(format!("{seconds}s"))
        .arg(url)
        .output()
        .context("cannot run wrk")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    if let Some(line) = text
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
    {
        bail!("wrk saw errors against {url}: {line}");
    }
    text.lines()
        .find_map(|line| line.strip_prefix("Requests/sec:"))
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output: {text}"))
}
