//! corral: build once, read many, across every replica.
//!
//! corral puts an end to cache stampedes in front of slow, expensive work. Identical requests map to
//! one key; for each key exactly one process in the whole deployment does the work under a lease in
//! the shared store, and every other caller, on any process, waits for an event and is answered from
//! the store or a local in-memory L1.
//!
//! # Layout
//!
//! The request path, in the order a request meets it:
//!
//! - [`config`]: the YAML file, checked into a typed [`config::Config`] (errors name file:line:column).
//! - [`server`]: `run(listener, admin_listener, config, shutdown)`: the two listeners over one engine
//!   (or `Server::connect`, then `serve`, with a [`reload::Reloader`] taken in between).
//! - [`connections`]: each listener's accept loop and the limits of one client connection
//!   (connection count, slow or idle clients, head and body sizes); draining them at shutdown.
//! - [`proxy`]: route match, key, policy, then the engine; the upstream client; responses with
//!   `X-Cache` and `Cache-Status`.
//! - [`key`]: request (or dictionary key) → canonical length-prefixed bytes → BLAKE3 digest, the only
//!   identity that leaves a process.
//! - [`policy`]: what may be cached, for how long, and what may be shared; which headers reach the
//!   upstream.
//! - [`admin`]: health, readiness, purge and status; the health check client behind
//!   `corral healthcheck`.
//! - [`purge`]: the forms of a purge (URL, path prefix, route, surrogate tag) and the client
//!   `corral purge` sends them with.
//! - [`reload`]: SIGHUP and `--watch` re-read the config and switch new requests to it at once.
//!
//! The engine underneath, which the typed dictionary uses too:
//!
//! - [`engine`]: flights (one per key per process), the leader/follower state machine, the spawned
//!   build task, and the typed dictionary API built on them.
//! - [`store`]: the [`store::Store`] trait (acquire, renew, commit, release, give up, purge, status)
//!   and its backends: in-process memory, Redis with Lua scripts, and NATS JetStream KV (leases and
//!   values by revision, with its own events from the bucket's stream). Every call a process makes
//!   goes through one circuit breaker (`store::breaker`, `store::guarded`), which fails calls fast
//!   while the store does not answer and probes it once at a time.
//! - [`bus`]: the [`bus::Bus`] trait for outcome events and its backends: memory, Redis pub/sub and
//!   core NATS.
//! - [`redis_conn`]: how the Redis store and bus reach Redis: one server, a primary found through
//!   Sentinel and followed across failovers, or a Redis Cluster (the three URL forms).
//! - [`credentials`]: passwords, tokens, nkeys, creds files and TLS for the store's and the bus's
//!   connections, applied to a Redis target or a NATS client; secrets that never print.
//! - [`envelope`]: the versioned binary format of a stored entry.
//! - [`l1`]: the per-process, byte-weighted in-memory cache in front of the store.
//! - [`metrics`]: every metric, registered once.
//!
//! Around them: [`explain`] and [`demo`], the `corral explain`, `corral demo` and
//! `corral demo-upstream` commands.

pub mod admin;
pub mod bus;
pub mod config;
pub mod connections;
pub mod credentials;
pub mod demo;
pub mod engine;
pub mod envelope;
mod errors;
pub mod explain;
pub mod http;
pub mod key;
pub mod l1;
pub mod lease;
pub mod lifecycle;
pub mod metrics;
pub mod proxy;
pub mod purge;
pub mod redis_conn;
pub mod reload;
pub mod server;
pub mod store;
