//! The HTTP caching layer: what a request and a response mean to a shared cache, with no I/O.
//!
//! Safe by default: privacy outranks speed. A response with `Set-Cookie`, `Cache-Control: private`
//! or `no-store` is never stored and never shared; a request carrying `Authorization` or `Cookie`
//! that the route does not key on is never answered from, or into, the cache.
//!
//! - [`key`]: a request → its key under its route's rules (path, kept query, named headers and
//!   cookies, body digest), and the key of one variant of a `Vary` answer.
//! - [`verdict`]: whether a request may use the cache, whether a response may be stored, for how
//!   long, and how long past that it may be served stale.
//! - [`conditional`]: a client's preconditions (`If-None-Match`, `If-Modified-Since`, `If-Match`,
//!   `If-Unmodified-Since`) against a stored answer: send it, `304`, or `412`; and `If-Range`.
//! - [`range`]: a GET's byte ranges cut from a whole stored answer: `206`, `multipart/byteranges`
//!   or `416`.
//! - [`cache_control`]: `Cache-Control` and the other comma-separated lists, read leniently.
//! - [`encoding`]: content codings: what a client's `Accept-Encoding` takes, which stored
//!   representation answers it, which answers are compressed when stored, and the compressors.
//! - [`forward`]: which of a client's headers reach the upstream (what a cacheable fetch may carry).
//! - [`hop_by_hop`]: the headers that never leave one connection.
//!
//! Above it, [`crate::proxy`] does the I/O; below it, [`crate::key`] holds the identity every
//! layer shares.

pub mod cache_control;
pub mod conditional;
pub mod encoding;
pub mod forward;
pub mod hop_by_hop;
pub mod key;
pub mod range;
pub mod verdict;

#[cfg(test)]
pub(crate) mod testing;
