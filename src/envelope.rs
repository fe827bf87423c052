//! The stored value: a hand-written, versioned, length-prefixed binary envelope.
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! magic "CRL" | version u8 (=1) | key digest [32] | status u16 | stored_at_ms u64 | ttl_ms u64
//! | stale_ms u64 | header count u16 | { name_len u16, name, value_len u32, value }* | body_len u64 | body
//! ```
//!
//! The body is the tail, so a decoded [`Entry`] serves it as a `Bytes` slice of the stored bytes
//! without copying. An empty body is a value; "no entry" is the absence of the key in the store.
//! Decoding never panics: bad bytes are an [`EnvelopeError`], which callers treat as a miss.

use std::time::Duration;

use bytes::Bytes;

use crate::key::KeyHash;

/// One stored answer, as the proxy and the dictionary see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// HTTP status for the proxy; the dictionary stores 0.
    pub status: u16,
    /// Response headers (lowercase names, hop-by-hop removed by the writer), in order.
    pub headers: Vec<(String, Bytes)>,
    /// The body; a slice of the stored bytes after decoding.
    pub body: Bytes,
    /// When the writer stored it, in milliseconds since the Unix epoch (used for `Age`).
    pub stored_at_ms: u64,
    /// How long the entry is fresh after `stored_at_ms`.
    pub ttl: Duration,
    /// How long after freshness ends a stale copy may still be served.
    pub stale: Duration,
    /// Digest of the canonical key this entry answers; compared on read.
    pub key: KeyHash,
}

/// Why stored bytes could not be read as an entry.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("envelope is truncated")]
    Truncated,
    #[error("envelope has a bad magic")]
    BadMagic,
    #[error("envelope version {0} is not supported")]
    UnsupportedVersion(u8),
    #[error("envelope header name is not UTF-8")]
    BadHeaderName,
    #[error("envelope has {0} trailing bytes")]
    Trailing(usize),
    #[error("envelope belongs to another key")]
    ForeignKey,
}

pub const MAGIC: &[u8; 3] = b"CRL";
pub const VERSION: u8 = 1;

/// Encodes an entry into its stored form.
pub fn encode(entry: &Entry) -> Bytes {
    todo!("{entry:?}")
}

/// Decodes stored bytes; the body of the result shares `bytes`' allocation.
pub fn decode(bytes: Bytes) -> Result<Entry, EnvelopeError> {
    todo!("{bytes:?}")
}

/// Decodes stored bytes and checks that they answer `key`.
pub fn decode_for(bytes: Bytes, key: &KeyHash) -> Result<Entry, EnvelopeError> {
    let entry = decode(bytes)?;
    if entry.key != *key {
        return Err(EnvelopeError::ForeignKey);
    }
    Ok(entry)
}
