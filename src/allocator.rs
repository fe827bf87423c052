//! The `corral` binary's global allocator, chosen on measurement (docs/performance.md, "L1
//! memory"): mimalloc holds the L1 closest to its `max_bytes` and gives freed memory back to the
//! system. `--features jemalloc` takes jemalloc instead; with neither feature, the system's.
//!
//! Only the binary (and `benches/l1_memory.rs`, which measures it) includes this file; the library
//! sets no allocator for its users.

#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[cfg(all(feature = "mimalloc", not(feature = "jemalloc")))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The allocator in use, by name.
#[allow(dead_code)] // read by the benchmark only
pub const NAME: &str = if cfg!(feature = "jemalloc") {
    "jemalloc"
} else if cfg!(feature = "mimalloc") {
    "mimalloc"
} else {
    "system"
};
