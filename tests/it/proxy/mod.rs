//! The proxy end to end: routing and sharing, variants, freshness, invalidation, limits;
//! upstreams over TLS, their timeouts and the headers sent to them.

mod end_to_end;
mod freshness;
mod limits;
mod purge;
mod timeouts;
mod tls;
mod upstream_headers;
mod variants;
