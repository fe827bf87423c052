//! The store backends: what each one has of its own, purges beyond one key, and the Redis
//! topologies.

mod contract;
mod nats_kv;
mod purge;
mod redis;
mod revalidate;
mod topology;
