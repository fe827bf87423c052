//! The proxy end to end: routing and sharing, variants, freshness, conditional and range requests,
//! invalidation, limits;
//! upstreams over TLS, their timeouts and the headers sent to them.

mod age;
mod conditional;
mod cookies;
mod end_to_end;
mod freshness;
mod head;
mod limits;
mod purge;
mod range;
mod rfc9111;
mod statuses;
mod revalidate;
mod timeouts;
mod tls;
mod upstream_headers;
mod variants;
