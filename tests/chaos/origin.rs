//! The upstream of a soak run: every body names its key and fetch number and carries its own
//! length and checksum, so a client can tell a wrong, cut or corrupted body from a good one.
//!
//! Each replica slot reaches the origin on its own port, so every fetch is recorded with the
//! replica that made it. Keys differ in latency and size: small bodies ride inline in events, large
//! ones (above corral's 16 KiB `inline_max`) are read from the store.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use crate::journal::{BodyCheck, Fetch, Journal, now_ms};

/// Where keys live on the origin (and on corral).
pub const PREFIX: &str = "/k/";

/// Latencies the keys cycle through, ms.
const LATENCIES_MS: [u64; 3] = [20, 150, 600];
/// Payload lengths the keys cycle through, bytes (the last is above corral's inline limit).
const LENGTHS: [usize; 3] = [300, 6_000, 40_000];

/// The name of key number `i`.
pub fn key_name(i: usize) -> String {
    format!("k{i:03}")
}

/// How the origin answers key number `i`: (latency, payload length).
fn shape(i: usize) -> (Duration, usize) {
    (
        Duration::from_millis(LATENCIES_MS[i % LATENCIES_MS.len()]),
        LENGTHS[(i / LATENCIES_MS.len()) % LENGTHS.len()],
    )
}

fn key_index(key: &str) -> Option<usize> {
    key.strip_prefix('k')?.parse().ok()
}

/// Payload bytes of fetch `fetch` of `key`: unique to both, so a mixed-up body cannot pass.
fn payload(key: &str, fetch: u64, len: usize) -> Vec<u8> {
    let mut hasher = blake3::Hasher::new();
    hasher.update(format!("{key}/{fetch}").as_bytes());
    let mut out = vec![0u8; len];
    hasher.finalize_xof().fill(&mut out);
    out
}

fn checksum(payload: &[u8]) -> String {
    blake3::hash(payload).to_hex()[..16].to_string()
}

/// The whole body: a header line, then the payload.
pub fn body(key: &str, fetch: u64, len: usize) -> Bytes {
    let payload = payload(key, fetch, len);
    let mut out = format!(
        "chaos key={key} fetch={fetch} len={len} sum={}\n",
        checksum(&payload)
    )
    .into_bytes();
    out.extend_from_slice(&payload);
    out.into()
}

/// Checks a body received for `key`: the check, and the fetch number it names.
pub fn check(key: &str, body: &[u8]) -> (BodyCheck, Option<u64>) {
    let Some(newline) = body.iter().position(|&b| b == b'\n') else {
        return (BodyCheck::Unparsable, None);
    };
    let Ok(head) = std::str::from_utf8(&body[..newline]) else {
        return (BodyCheck::Unparsable, None);
    };
    let mut fields: HashMap<&str, &str> = HashMap::new();
    let mut words = head.split(' ');
    if words.next() != Some("chaos") {
        return (BodyCheck::Unparsable, None);
    }
    for word in words {
        if let Some((name, value)) = word.split_once('=') {
            fields.insert(name, value);
        }
    }
    let fetch = fields.get("fetch").and_then(|f| f.parse::<u64>().ok());
    let len = fields.get("len").and_then(|l| l.parse::<usize>().ok());
    let (Some(named), Some(fetch_no), Some(len), Some(sum)) =
        (fields.get("key"), fetch, len, fields.get("sum"))
    else {
        return (BodyCheck::Unparsable, None);
    };
    if *named != key {
        return (BodyCheck::WrongKey, fetch);
    }
    let got = &body[newline + 1..];
    if got.len() != len || checksum(got) != *sum || got != payload(key, fetch_no, len).as_slice() {
        return (BodyCheck::Partial, fetch);
    }
    (BodyCheck::Good, fetch)
}

/// Fetch counters, per key.
struct State {
    /// Fetches so far, per key (the next fetch gets the count plus one).
    fetches: Mutex<HashMap<String, u64>>,
    journal: Arc<Journal>,
}

/// The running origin: one listener per replica slot.
pub struct Origin {
    addrs: Vec<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Origin {
    pub async fn start(replicas: usize, journal: Arc<Journal>) -> Origin {
        let state = Arc::new(State {
            fetches: Mutex::new(HashMap::new()),
            journal,
        });
        let mut addrs = Vec::new();
        let mut tasks = Vec::new();
        for replica in 0..replicas {
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind the origin on 127.0.0.1:0");
            addrs.push(listener.local_addr().expect("origin local_addr"));
            tasks.push(tokio::spawn(accept(listener, replica, state.clone())));
        }
        Origin { addrs, tasks }
    }

    /// `http://127.0.0.1:PORT` for replica slot `replica`.
    pub fn url_for(&self, replica: usize) -> String {
        format!("http://{}", self.addrs[replica])
    }
}

async fn accept(listener: TcpListener, replica: usize, state: Arc<State>) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let state = state.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let state = state.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(answer(&state, replica, request).await)
                }
            });
            // A replica killed mid-response closes the connection: nothing to do here.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    state: &State,
    replica: usize,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let at_ms = now_ms();
    let path = request.uri().path().to_string();
    let Some(index) = path.strip_prefix(PREFIX).and_then(key_index) else {
        let mut response = Response::new(Full::new(Bytes::from_static(b"no such key")));
        *response.status_mut() = StatusCode::NOT_FOUND;
        return response;
    };
    let key = key_name(index);
    let (latency, len) = shape(index);
    let fetch = {
        let mut fetches = state.fetches.lock().unwrap_or_else(|p| p.into_inner());
        let n = fetches.entry(key.clone()).or_insert(0);
        *n += 1;
        *n
    };
    state.journal.write(&Fetch {
        at_ms,
        key: key.clone(),
        fetch,
        replica,
        latency_ms: latency.as_millis() as u64,
        len,
    });
    tokio::time::sleep(latency).await;
    Response::new(Full::new(body(&key, fetch, len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_checks_good_only_for_its_own_key_and_whole() {
        let good = body("k001", 7, 500);
        assert_eq!(check("k001", &good), (BodyCheck::Good, Some(7)));
        assert_eq!(check("k002", &good), (BodyCheck::WrongKey, Some(7)));
        assert_eq!(
            check("k001", &good[..good.len() - 1]),
            (BodyCheck::Partial, Some(7))
        );
        let mut flipped = good.to_vec();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(check("k001", &flipped), (BodyCheck::Partial, Some(7)));
        assert_eq!(
            check("k001", b"upstream body"),
            (BodyCheck::Unparsable, None)
        );
    }
}
