//! The cost of building a request's key: route, method, path, the kept query parameters (sorted,
//! tracking parameters dropped), two keyed headers and a keyed cookie, out of a browser's dozen
//! headers. Every cacheable request pays it once, before any lookup.
//!
//! Run with: `cargo bench --bench key -- --warm-up-time 1 --measurement-time 2`

mod common;

use std::hint::black_box;

use corral::http::key::request_key;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let (route, method, uri, headers) = (
        common::route(),
        common::method(),
        common::uri(),
        common::request_headers(),
    );
    let key = request_key(&route, &method, &uri, &headers, None);
    let query = key.parts.iter().find(|(what, _)| what == "query");
    assert_eq!(
        query.map(|(_, value)| value.as_str()),
        Some("lang=en&page=3&per_page=50&q=blue%20widgets&sort=-price"),
        "the bench keys what it says it keys"
    );

    let mut group = c.benchmark_group("request_key");
    group.throughput(Throughput::Elements(1));
    group.bench_function("catalogue", |b| {
        b.iter(|| {
            request_key(
                black_box(&route),
                black_box(&method),
                black_box(&uri),
                black_box(&headers),
                None,
            )
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
