//! The proxy end to end: routing and sharing, content encoding, variants and `Vary`, freshness,
//! conditional and range requests, cookies,
//! invalidation, limits;
//! upstreams over TLS, their timeouts and the headers sent to them; pools of upstream servers.

mod age;
mod conditional;
mod cookies;
mod encoding;
mod end_to_end;
mod freshness;
mod head;
mod limits;
mod pool_dashboard;
mod pool_faults;
mod pools;
mod purge;
mod range;
mod revalidate;
mod rfc9111;
mod statuses;
mod timeouts;
mod tls;
mod upstream_headers;
mod variants;
mod vary;
