//! The proxy end to end: routing and sharing, variants, freshness, conditional requests,
//! invalidation, limits;
//! upstreams over TLS, their timeouts and the headers sent to them; pools of upstream servers.

mod age;
mod conditional;
mod end_to_end;
mod freshness;
mod head;
mod limits;
mod pool_dashboard;
mod pool_faults;
mod pools;
mod purge;
mod timeouts;
mod tls;
mod upstream_headers;
mod variants;
