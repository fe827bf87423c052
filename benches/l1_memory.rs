//! What the L1 really costs in memory against its `max_bytes`: fills an L1 with small (100 B
//! body, 3 headers), medium (4 KiB, 6 headers) and large (256 KiB, 6 headers) entries, four times
//! its capacity over, each size in its own process, and reports the growth of the process's
//! resident memory against `max_bytes`, then what stays resident once every entry was
//! invalidated, at once and after 11 s of idling (allocators return memory late, if at all). Also
//! timed, roughly: an insert, with the key's digest and the envelope's encoding and decoding. Entries are decoded from their own encoded envelope, as the proxy holds them
//! after a store read (the body and header values are slices of that envelope).
//!
//! Run with: `cargo bench --bench l1_memory --no-default-features -- [max_bytes]`
//! (default 8 MiB) for the system allocator, adding `--features mimalloc` or `--features jemalloc`
//! for the others. `l1_memory fill <size> <count>` only inserts, for `valgrind --tool=callgrind`.

// A plain program with no runtime: wall-clock time and blocking sleeps are what it measures with.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use corral::envelope::{self, Entry, Form};
use corral::key::{KeyBuilder, KeyHash};
use corral::l1::L1;
use corral::metrics::Metrics;

/// The binary's own allocator choice, so that what is measured is what ships.
#[path = "../src/allocator.rs"]
mod allocator;

/// Entry shapes: name, body bytes, headers.
const SIZES: [(&str, usize, usize); 3] = [
    ("small", 100, 3),
    ("medium", 4 << 10, 6),
    ("large", 256 << 10, 6),
];

/// How many times `max_bytes` of bodies are inserted.
const OVERFILL: usize = 4;

/// Long enough that nothing expires while filling; the end invalidates every key instead.
const TTL: Duration = Duration::from_secs(600);

/// Rounds of maintenance waited for the L1 to drop invalidated entries.
const DRAIN_ROUNDS: usize = 100;

/// How long the process idles after the invalidation before its memory is read again: longer than
/// jemalloc's default dirty-page decay (10 s), so memory an allocator returns late is seen returned.
const SETTLE: Duration = Duration::from_secs(11);

/// Allocations per tick while settling: an idle server still allocates a little, and allocators
/// return memory from their own calls, not from a clock.
const TRICKLE: usize = 1000;

/// Response headers of a JSON API, the first `count` of them.
const HEADERS: [(&str, &str); 6] = [
    ("content-type", "application/json; charset=utf-8"),
    ("cache-control", "public, max-age=300"),
    ("etag", "\"5d8c72a5edda8d6a\""),
    ("date", "Wed, 25 Nov 2026 12:00:00 GMT"),
    ("vary", "accept-encoding"),
    ("last-modified", "Tue, 24 Nov 2026 08:00:00 GMT"),
];

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| arg != "--bench")
        .collect();
    match args.as_slice() {
        [one, size, max_bytes] if one == "one" => {
            measure(shape(size), max_bytes.parse().expect("max_bytes in bytes"));
        }
        [fill, size, count] if fill == "fill" => {
            // For an instruction count: inserts only (see docs/performance.md).
            let (_, body_len, header_count) = shape(size);
            let l1 = L1::new(8 << 20, Metrics::new());
            for n in 0..count.parse().expect("a count") {
                let key = nth_key(n);
                l1.insert(key, Arc::new(entry(key, body_len, header_count)), TTL);
            }
            black_box(l1);
        }
        [] | [_] => {
            let max_bytes: u64 = args.first().map_or(8 << 20, |arg| {
                arg.parse().expect("max_bytes in bytes, e.g. 8388608")
            });
            println!(
                "| allocator | entry | max_bytes | entries held | weighed | RSS growth | growth / max_bytes | after invalidation | {} s later | ns per insert |",
                SETTLE.as_secs()
            );
            println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
            let me = std::env::current_exe().expect("the bench's own path");
            for (name, ..) in SIZES {
                let status = std::process::Command::new(&me)
                    .args(["one", name, &max_bytes.to_string()])
                    .status()
                    .expect("run one size");
                assert!(status.success(), "{name} failed");
            }
        }
        _ => panic!("usage: l1_memory [max_bytes] | one <size> <max_bytes> | fill <size> <count>"),
    }
}

fn shape(size: &str) -> (&'static str, usize, usize) {
    *SIZES
        .iter()
        .find(|(name, ..)| *name == size)
        .expect("a known size")
}

/// One size in this process: fill, measure, invalidate, measure.
fn measure((name, body_len, header_count): (&str, usize, usize), max_bytes: u64) {
    let l1 = L1::new(max_bytes, Metrics::new());
    let count = (OVERFILL * max_bytes as usize / body_len).max(1) as u64;
    let before = rss();
    let started = Instant::now();
    for n in 0..count {
        let key = nth_key(n);
        l1.insert(key, Arc::new(entry(key, body_len, header_count)), TTL);
    }
    let per_insert = started.elapsed().as_nanos() / u128::from(count);
    let (held, weighed) = (l1.entry_count(), l1.weighted_size());
    let filled = rss();
    for n in 0..count {
        l1.invalidate(&nth_key(n));
    }
    for _ in 0..DRAIN_ROUNDS {
        if l1.entry_count() == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        l1.entry_count(),
        0,
        "the L1 dropped every invalidated entry"
    );
    let drained = rss();
    let settle_started = Instant::now();
    while settle_started.elapsed() < SETTLE {
        for n in 0..TRICKLE {
            black_box(vec![0u8; 64 + n % 512]);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let settled = rss();
    let growth = filled.saturating_sub(before);
    println!(
        "| {} | {name} | {} | {held} | {} | {} | {:.2} | {} | {} | {per_insert} |",
        allocator::NAME,
        mib(max_bytes),
        mib(weighed),
        mib(growth),
        growth as f64 / max_bytes as f64,
        mib(drained.saturating_sub(before)),
        mib(settled.saturating_sub(before)),
    );
    black_box(l1);
}

fn nth_key(n: u64) -> KeyHash {
    KeyBuilder::new().part(n.to_be_bytes()).finish().hash
}

/// An entry as a store read yields it: decoded from its own envelope.
fn entry(key: KeyHash, body_len: usize, header_count: usize) -> Entry {
    let written = Entry {
        status: 200,
        headers: HEADERS[..header_count]
            .iter()
            .map(|(name, value)| ((*name).to_owned(), Bytes::from_static(value.as_bytes())))
            .collect(),
        body: Bytes::from(vec![b'x'; body_len]),
        stored_at_ms: 1_700_000_000_000,
        ttl: TTL,
        stale: Duration::ZERO,
        stale_if_error: Duration::ZERO,
        fetch_time: Duration::ZERO,
        key,
        form: Form::Answer,
    };
    let stored = envelope::encode(&written).expect("a small entry encodes");
    envelope::decode(stored).expect("it decodes")
}

/// This process's resident memory in bytes (`VmRSS`).
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmRSS line");
    kib << 10
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}
