//! The cost of the cache decisions: whether a browser's request may use the cache (every check
//! passes, so every check runs), and whether an origin's shareable answer may be stored and for
//! how long (`Cache-Control`, `Vary` within the key, `Age`).
//!
//! Run with: `cargo bench --bench policy -- --warm-up-time 1 --measurement-time 2`

mod common;

use std::hint::black_box;
use std::time::Duration;

use corral::http::verdict::{RequestVerdict, ResponseVerdict, request_verdict, response_verdict};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let (route, method, status) = (common::route(), common::method(), common::status());
    let (request, response) = (common::request_headers(), common::response_headers());
    assert_eq!(
        request_verdict(&route, &method, &request),
        RequestVerdict::Cache
    );
    assert_eq!(
        response_verdict(&route, status, &response),
        ResponseVerdict::Store {
            ttl: Duration::from_secs(600 - 12)
        }
    );

    let mut group = c.benchmark_group("policy");
    group.throughput(Throughput::Elements(1));
    group.bench_function("request_verdict", |b| {
        b.iter(|| request_verdict(black_box(&route), black_box(&method), black_box(&request)))
    });
    group.bench_function("response_verdict", |b| {
        b.iter(|| response_verdict(black_box(&route), black_box(status), black_box(&response)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
