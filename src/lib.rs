//! corral: build once, read many, across every replica.
//!
//! corral puts an end to cache stampedes in front of slow, expensive work. Identical requests map to
//! one key; for each key exactly one process in the whole deployment does the work under a lease in
//! the shared store, and every other caller, on any process, waits for an event and is answered from
//! the store or a local in-memory L1.
//!
//! # Layout
//!
//! - [`key`]: canonical key bytes and their BLAKE3 digest, the only identity that leaves a process.
//! - [`envelope`]: the versioned binary format of a stored entry.
//! - [`store`]: the [`store::Store`] trait (acquire, renew, commit, release, give up, purge, status)
//!   and its backends: in-process memory, Redis with Lua scripts, and NATS JetStream KV (leases and
//!   values by revision, with its own events from the bucket's stream).
//! - [`bus`]: the [`bus::Bus`] trait for outcome events and its backends: memory, Redis pub/sub and
//!   core NATS.
//! - [`l1`]: the per-process, byte-weighted in-memory cache in front of the store.
//! - [`engine`]: flights (one per key per process), the leader/follower state machine, the spawned
//!   build task, and the typed dictionary API built on them.
//! - [`metrics`]: every metric the engine exports, registered once.

pub mod bus;
pub mod engine;
pub mod envelope;
pub mod key;
pub mod l1;
pub mod metrics;
pub mod store;
