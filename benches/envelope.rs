//! Envelope encode/decode cost across body sizes, with the headers a typical response carries.
//!
//! Encoding copies the body once, so it should scale with size; decoding slices the body out of the
//! input, so its time should stay flat however large the body is.

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use corral::envelope::{Entry, decode, encode};
use corral::key::KeyHash;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const SIZES: [(&str, usize); 4] = [
    ("0B", 0),
    ("1KiB", 1 << 10),
    ("64KiB", 64 << 10),
    ("1MiB", 1 << 20),
];

fn entry(body_len: usize) -> Entry {
    let headers = [
        ("content-type", "application/json; charset=utf-8"),
        (
            "cache-control",
            "public, max-age=60, stale-while-revalidate=30",
        ),
        ("etag", "\"33a64df551425fcc55e4d42a148795d9f25f89d4\""),
        ("last-modified", "Wed, 21 Oct 2015 07:28:00 GMT"),
        ("vary", "accept-encoding"),
        ("content-encoding", "gzip"),
        ("x-request-id", "f81d4fae-7dec-11d0-a765-00a0c91e6bf6"),
        ("server", "origin/1.0"),
    ];
    Entry {
        status: 200,
        headers: headers
            .iter()
            .map(|(name, value)| ((*name).to_owned(), Bytes::from_static(value.as_bytes())))
            .collect(),
        body: Bytes::from(vec![0x5a; body_len]),
        stored_at_ms: 1_700_000_000_000,
        ttl: Duration::from_secs(60),
        stale: Duration::from_secs(30),
        stale_if_error: Duration::ZERO,
        fetch_time: Duration::ZERO,
        key: KeyHash::from_bytes([7; 32]),
        form: corral::envelope::Form::Answer,
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("envelope");
    for (label, size) in SIZES {
        let entry = entry(size);
        let encoded = encode(&entry).expect("typical entry fits");
        group.throughput(Throughput::Bytes(encoded.len() as u64));
        group.bench_with_input(BenchmarkId::new("encode", label), &entry, |b, entry| {
            b.iter(|| encode(black_box(entry)))
        });
        group.bench_with_input(BenchmarkId::new("decode", label), &encoded, |b, bytes| {
            b.iter(|| decode(black_box(bytes.clone())))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
