//! Faults of the store, the bus, the leader and the upstream, and the degrade modes.

mod bus;
mod degrade;
mod expiry;
mod herd;
mod leader;
mod slow_store;
mod upstream;
