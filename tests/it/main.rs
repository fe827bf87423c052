//! The integration suite, one binary: real `redis-server` and `nats-server` processes on ephemeral
//! loopback ports, real sockets, and `corral serve` processes where a test needs the binary.
//!
//! - [`proxy`]: the proxy end to end.
//! - [`engine`]: the engine and the dictionary across replicas, on every backend.
//! - [`store`]: each store backend, and the Redis topologies.
//! - [`bus`]: every bus backend against one contract.
//! - [`faults`]: faults of the store, bus, leader and upstream; the degrade modes.
//! - [`attacks`]: hostile input.
//! - [`ops`]: the CLI, credentials, metrics, dashboards, deployment files, reload and shutdown.
//! - [`harness`]: the test support itself.
//!
//! The chaos soak is a binary of its own (`tests/chaos`): it runs for minutes.

#[path = "../support/mod.rs"]
mod support;

mod attacks;
mod bus;
mod engine;
mod faults;
mod harness;
mod ops;
mod proxy;
mod store;
