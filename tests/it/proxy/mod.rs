//! The proxy end to end: routing and sharing, content encoding, variants and `Vary`, freshness, conditional requests,
//! invalidation, limits;
//! upstreams over TLS, their timeouts and the headers sent to them.

mod age;
mod conditional;
mod encoding;
mod end_to_end;
mod freshness;
mod head;
mod limits;
mod purge;
mod timeouts;
mod tls;
mod upstream_headers;
mod variants;
mod vary;
