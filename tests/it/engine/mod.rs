//! The engine and the dictionary across replicas, on every backend.

mod dictionary;
mod freshness;
mod replicas;
mod revalidate;
