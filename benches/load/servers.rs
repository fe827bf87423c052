//! The two HTTP servers the harness runs as its own child processes: the upstream every system
//! sits in front of, and the minimal hyper server that is the throughput baseline.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Bytes in every answer, the baseline's and the upstream's: a typical small API response.
pub const BODY_SIZE: usize = 1024;

/// The header in which the upstream stamps when it answered (nanoseconds since the Unix epoch),
/// so a client on the same machine reads a follower's wake-up on one clock.
pub const ANSWERED: &str = "x-upstream-answered";

/// Nanoseconds since the Unix epoch, by the wall clock every process on the machine shares.
pub fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn body() -> Bytes {
    Bytes::from(vec![b'x'; BODY_SIZE])
}

/// Serves `answer` on `listener` over HTTP/1.1 with keep-alive, one task per connection.
async fn serve<F>(listener: TcpListener, answer: F) -> !
where
    F: Fn(Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let answer = Arc::new(answer);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let answer = answer.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let answer = answer.clone();
                async move { Ok::<_, Infallible>(answer(request)) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The baseline: every request answered at once with the same body, nothing else.
pub async fn baseline(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("{}", listener.local_addr()?);
    let body = body();
    serve(listener, move |_| Response::new(Full::new(body.clone()))).await
}

/// The upstream. `GET /d/<ms>/<name>` answers after `<ms>` milliseconds, cacheable for 60 s, with
/// the moment it answered in [`ANSWERED`]; `GET /count/d/<ms>/<name>` says how many times that
/// path was fetched (the count itself is not counted).
pub async fn upstream(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("{}", listener.local_addr()?);
    let body = body();
    let fetches: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let listener_fetches = fetches.clone();
    let answer = move |request: Request<Incoming>| -> (Option<Duration>, Response<Full<Bytes>>) {
        let path = request.uri().path();
        if let Some(counted) = path.strip_prefix("/count") {
            let fetched = listener_fetches
                .lock()
                .expect("fetch counts")
                .get(counted)
                .copied()
                .unwrap_or(0);
            return (
                None,
                Response::new(Full::new(Bytes::from(fetched.to_string()))),
            );
        }
        let delay = path
            .strip_prefix("/d/")
            .and_then(|rest| rest.split('/').next())
            .and_then(|ms| ms.parse::<u64>().ok());
        let Some(delay) = delay else {
            let mut response = Response::new(Full::new(Bytes::from_static(b"no such path\n")));
            *response.status_mut() = StatusCode::NOT_FOUND;
            return (None, response);
        };
        *listener_fetches
            .lock()
            .expect("fetch counts")
            .entry(path.to_owned())
            .or_default() += 1;
        let mut response = Response::new(Full::new(body.clone()));
        let headers = response.headers_mut();
        headers.insert(
            "cache-control",
            "public, max-age=60".parse().expect("valid"),
        );
        headers.insert(
            "content-type",
            "application/octet-stream".parse().expect("valid"),
        );
        (Some(Duration::from_millis(delay)), response)
    };
    let answer = Arc::new(answer);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let answer = answer.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let answer = answer.clone();
                async move {
                    let (delay, mut response) = answer(request);
                    if let Some(delay) = delay {
                        tokio::time::sleep(delay).await;
                        // Stamped after the delay: the moment the answer leaves the upstream.
                        let stamp = unix_nanos().to_string();
                        response
                            .headers_mut()
                            .insert(ANSWERED, stamp.parse().expect("digits"));
                    }
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
