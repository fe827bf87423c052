//! The micro-benchmarks' core operations, one at a time and a given number of times, for counting
//! instructions under callgrind: unlike wall time, the count barely moves between runs or machines
//! of one architecture, so it compares two versions of the code reliably.
//! `scripts/bench-instructions` runs each operation for N and for 2N iterations and reports
//! (instructions(2N) - instructions(N)) / N, so setup and process start-up cancel out.
//!
//! Run with: `scripts/bench-instructions`, or by hand:
//! `cargo bench --bench instructions -- key 1000` (`-- list` names the operations).

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use corral::engine::{Backend, Built, Engine, EngineConfig, Policy};
use corral::envelope::{decode, encode};
use corral::http::key::request_key;
use corral::http::verdict::{RequestVerdict, ResponseVerdict, request_verdict, response_verdict};
use corral::l1::L1;
use corral::metrics::Metrics;

/// The operations, by the name the script passes, each with the micro-benchmark it mirrors.
const OPERATIONS: [(&str, &str); 10] = [
    ("key", "key: request_key/catalogue"),
    ("request_verdict", "policy: policy/request_verdict"),
    ("response_verdict", "policy: policy/response_verdict"),
    ("envelope_encode", "envelope: envelope/encode/1KiB"),
    ("envelope_decode", "envelope: envelope/decode/1KiB"),
    ("l1_hit", "l1: l1/hit"),
    ("l1_miss", "l1: l1/miss"),
    ("flight_1", "flight: flight_join/1 (one flight)"),
    ("flight_10", "flight: flight_join/10 (one flight)"),
    (
        "request_l1_hit",
        "the proxy's handler answering from the L1 (request built, response dropped)",
    ),
];

fn main() {
    // `cargo bench` adds `--bench` to what it is given.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with("--"))
        .collect();
    let (operation, iterations) = match args.as_slice() {
        [operation, iterations] => (
            operation.as_str(),
            iterations.parse::<u64>().expect("a number of iterations"),
        ),
        // `list`, or nothing (as when `cargo bench` runs every bench).
        _ => {
            for (name, mirrors) in OPERATIONS {
                println!("{name}\t{mirrors}");
            }
            return;
        }
    };
    match operation {
        "key" => key(iterations),
        "request_verdict" | "response_verdict" => policy(operation, iterations),
        "envelope_encode" | "envelope_decode" => envelope(operation, iterations),
        "l1_hit" | "l1_miss" => l1(operation, iterations),
        "flight_1" => flight(1, iterations),
        "flight_10" => flight(10, iterations),
        "request_l1_hit" => request_l1_hit(iterations),
        other => panic!("no operation {other:?}; `list` names them"),
    }
}

fn key(iterations: u64) {
    let (route, method, uri, headers) = (
        common::route(),
        common::method(),
        common::uri(),
        common::request_headers(),
    );
    for _ in 0..iterations {
        black_box(request_key(
            black_box(&route),
            black_box(&method),
            black_box(&uri),
            black_box(&headers),
            None,
        ));
    }
}

fn policy(operation: &str, iterations: u64) {
    let (route, method, status) = (common::route(), common::method(), common::status());
    let (request, response) = (common::request_headers(), common::response_headers());
    for _ in 0..iterations {
        if operation == "request_verdict" {
            let verdict = request_verdict(black_box(&route), &method, black_box(&request));
            assert_eq!(verdict, RequestVerdict::Cache);
        } else {
            let verdict = response_verdict(black_box(&route), status, black_box(&response));
            assert!(
                matches!(verdict, ResponseVerdict::Store { .. }),
                "{verdict:?}"
            );
        }
    }
}

fn envelope(operation: &str, iterations: u64) {
    let entry = common::entry(common::nth_key(0));
    let encoded = encode(&entry).expect("a typical entry fits");
    for _ in 0..iterations {
        if operation == "envelope_encode" {
            black_box(encode(black_box(&entry)).expect("a typical entry fits"));
        } else {
            black_box(decode(black_box(encoded.clone())).expect("what encode wrote"));
        }
    }
}

/// Entries held while looking up, as in the `l1` bench.
const L1_ENTRIES: u64 = 10_000;

fn l1(operation: &str, iterations: u64) {
    let l1 = L1::new(64 << 20, Metrics::new());
    for n in 0..L1_ENTRIES {
        let key = common::nth_key(n);
        l1.insert(key, Arc::new(common::entry(key)), Duration::from_secs(3600));
    }
    let (key, hits) = if operation == "l1_hit" {
        (common::nth_key(L1_ENTRIES / 2), true)
    } else {
        (common::nth_key(L1_ENTRIES), false)
    };
    for _ in 0..iterations {
        assert_eq!(l1.get(black_box(&key)).is_some(), hits);
    }
}

/// One flight per iteration on a fresh key: `callers` callers of it, the build held until all but
/// the leader wait as followers, as in the `flight` bench. One thread, so the count is stable.
fn flight(callers: u64, iterations: u64) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let mut config = EngineConfig::new("bench");
    // The L1 would answer every caller after the first build; this measures flights.
    config.l1_max_bytes = 0;
    let engine = runtime
        .block_on(Engine::connect(config, &Backend::memory()))
        .expect("the memory backend connects");
    let policy = Policy::default();
    let value = common::entry(common::nth_key(0));
    for round in 0..iterations {
        let key = common::nth_key(u64::MAX - round);
        runtime.block_on(async {
            let release = Arc::new(tokio::sync::Semaphore::new(0));
            let held = release.clone();
            let value = value.clone();
            let builder: corral::engine::Builder = Arc::new(move |_| {
                let (held, value) = (held.clone(), value.clone());
                Box::pin(async move {
                    let _permit = held.acquire().await.expect("open");
                    Ok(Built::Shared(value))
                })
            });
            let calls: Vec<_> = (0..callers)
                .map(|_| {
                    let (engine, policy, builder) =
                        (engine.clone(), policy.clone(), builder.clone());
                    tokio::spawn(async move {
                        engine
                            .fetch(&key, &policy, builder, Duration::from_secs(5))
                            .await
                    })
                })
                .collect();
            let followers = engine.metrics().followers_waiting.clone();
            for _ in 0..1_000_000 {
                if followers.get() >= callers as i64 - 1 {
                    break;
                }
                tokio::task::yield_now().await;
            }
            release.add_permits(1);
            for call in calls {
                let answer = call.await.expect("the task").expect("the value");
                black_box(answer);
            }
        });
    }
}

/// One request through the proxy's handler, answered from the L1: route match, key, policy, the
/// engine's L1 look-up and the response with corral's headers (no sockets: hyper's parsing and
/// writing are not counted). An origin in the same runtime fills the L1 first.
fn request_l1_hit(iterations: u64) {
    use axum::extract::State;
    use corral::proxy::{Proxy, handle};

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let origin = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let addr = origin.local_addr().expect("bound");
        tokio::spawn(serve_origin(origin));
        let config = common::config(&format!("http://{addr}"));
        let mut engine_config = EngineConfig::new("bench");
        engine_config.l1_max_bytes = 64 << 20;
        let engine = Engine::connect(engine_config, &Backend::memory())
            .await
            .expect("the memory backend connects");
        let proxy = Arc::new(Proxy::new(Arc::new(config), engine));
        let (uri, headers) = (common::uri(), common::request_headers());
        let request = || {
            let mut request = http::Request::new(axum::body::Body::empty());
            *request.uri_mut() = uri.clone();
            *request.headers_mut() = headers.clone();
            request
        };
        let first = handle(State(proxy.clone()), request()).await;
        assert_eq!(first.status(), 200, "the origin fills the L1");
        for _ in 0..iterations {
            let response = handle(State(proxy.clone()), black_box(request())).await;
            assert_eq!(response.headers()["x-cache"], "HIT");
            black_box(response);
        }
    });
}

/// An origin answering every request with [`common::response_headers`] and a 1 KiB body.
async fn serve_origin(listener: tokio::net::TcpListener) {
    use hyper::service::service_fn;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let service = service_fn(|_request| async {
                let mut response =
                    http::Response::new(http_body_util::Full::new(bytes::Bytes::from(vec![
                        0x5a;
                        1024
                    ])));
                *response.headers_mut() = common::response_headers();
                Ok::<_, std::convert::Infallible>(response)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}
