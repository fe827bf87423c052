//! corral: build once, read many, across every replica.
//!
//! corral puts an end to cache stampedes in front of slow, expensive work. Identical requests map to
//! one key; for each key exactly one process in the whole deployment does the work under a lease in
//! the shared store, and every other caller, on any process, waits for an event and is answered from
//! the store or a local in-memory L1.
//!
//! # Layout
//!
//! From the bottom up; a module imports only from those above it in this list, never from one
//! below.
//!
//! The engine, always built (the library):
//!
//! - [`key`]: a key's identity: canonical length-prefixed bytes → BLAKE3 digest ([`KeyHash`]),
//!   the only identity that leaves a process; the route generation key. No HTTP.
//! - [`lease`]: a lease's two names, the owner's secret [`lease::Token`] and its public
//!   [`lease::LeaseId`], which the store and the bus both speak of.
//! - [`envelope`]: the versioned binary format of a stored entry.
//! - [`metrics`]: every metric, registered once.
//! - [`l1`]: the per-process, byte-weighted in-memory cache in front of the store.
//! - `redis_conn` (feature `redis`): how the Redis store and bus reach Redis: one server, a primary
//!   followed through Sentinel, or a Redis Cluster.
//! - [`credentials`]: passwords, tokens, nkeys, creds files and TLS for the store's and the bus's
//!   connections; secrets that never print.
//! - [`bus`]: the [`bus::Bus`] trait for outcome events and its backends: memory, Redis pub/sub,
//!   core NATS.
//! - [`store`]: the [`store::Store`] trait (acquire, renew, commit, release, give up, purge,
//!   status) and its backends: in-process memory, Redis with Lua scripts (feature `redis`), NATS
//!   JetStream KV (feature `nats`, whose events come from the bucket's stream); the circuit
//!   breaker every call goes through.
//! - [`engine`]: flights (one per key per process), the leader/follower state machine, the
//!   spawned build task, the typed outcomes a build returns and a caller gets, the [`Backend`]
//!   (connected at start, or started without its store and bus and connected in the background),
//!   route generations read from the store, invalidations retried when the store does not answer,
//!   and the typed [`Dictionary`] built on them.
//!
//! The proxy and the binary's commands (feature `server`, on by default):
//!
//! - [`config`]: the YAML file, checked into a typed [`config::Config`] (errors name
//!   file:line:column); every caching setting defined once.
//! - [`telemetry`]: OpenTelemetry traces over OTLP/HTTP, off unless configured: a span per
//!   request and per upstream fetch, each request linked to the fetch whose answer it got.
//! - [`http`]: what a request and a response mean to a shared cache, with no I/O: a request's
//!   key, the request and response verdicts, `Cache-Control`, preconditions (`If-None-Match` and
//!   the other conditional headers), byte ranges cut from a stored answer, hop-by-hop and
//!   forwarded headers.
//! - `lifecycle`: where a server is in its life (starting, serving, stopping).
//! - `connections`: each listener's accept loop and the limits of one client connection (its
//!   send timeout and rate, the per-client cap).
//! - [`proxy`]: one phase a file: route, handler, fetch, variant, direct pass-through, the
//!   response builder (`X-Cache`, `Cache-Status`, `304`/`412`, `206`/`416`) and the access line;
//!   the upstream client, a pool per route (servers, balance, health checks, outlier ejection,
//!   retries; TLS, timeouts, upstream headers).
//! - [`purge`]: the forms of a purge, and the client `corral purge` sends them with.
//! - [`admin`]: health, readiness, metrics, purge and status, each call audited; the health
//!   check client.
//! - [`reload`]: SIGHUP and `--watch` re-read the config and switch new requests to it at once.
//! - [`server`]: `run(listener, admin_listener, config, shutdown)`: the two listeners over one
//!   engine.
//! - [`explain`] and [`demo`]: the `corral explain`, `corral demo` and `corral demo-upstream`
//!   commands.
//!
//! # Features
//!
//! - `server` (default): the proxy and everything the `corral` binary needs; implies `redis` and
//!   `nats`.
//! - `redis`, `nats`: the backends. Without them, [`Backend::redis`] and the NATS backends
//!   connect to an error that says the feature is off.
//! - `mimalloc` (default), `jemalloc`: the `corral` binary's global allocator (the library never
//!   sets one); see the L1 memory numbers in `docs/performance.md`.
//! - `test-util`: fault hooks for tests (an engine that crashes, a bus that loses its
//!   subscription).
//!
//! With `default-features = false`, the dictionary and the engine build on the memory backend
//! alone, without an HTTP server, a CLI or log formatting.

#![forbid(unsafe_code)]

// The engine, its stores and buses, and the typed dictionary: always built.
pub mod bus;
pub mod credentials;
pub mod engine;
pub mod envelope;
pub mod key;
pub mod l1;
pub mod lease;
pub mod metrics;
pub mod store;

#[cfg(feature = "redis")]
pub(crate) mod redis_conn;

// The proxy and the binary's commands (feature `server`).
#[cfg(feature = "server")]
pub mod admin;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub(crate) mod connections;
#[cfg(feature = "server")]
pub mod demo;
#[cfg(feature = "server")]
mod errors;
#[cfg(feature = "server")]
pub mod explain;
#[cfg(feature = "server")]
pub mod http;
#[cfg(feature = "server")]
pub(crate) mod lifecycle;
#[cfg(feature = "server")]
pub mod proxy;
#[cfg(feature = "server")]
pub mod purge;
#[cfg(feature = "server")]
pub mod reload;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod telemetry;

// The library's API at the root: what a user of the dictionary or the engine names.
pub use engine::{
    Backend, BusConfig, Dictionary, DictionaryConfig, DictionaryError, Engine, EngineConfig,
    EngineError, Expiry, Policy, Status, StoreConfig,
};
pub use key::{Key, KeyBuilder, KeyHash};
