//! The proxy end to end: routing and sharing, variants, freshness, invalidation, limits.

mod end_to_end;
mod freshness;
mod limits;
mod purge;
mod variants;
