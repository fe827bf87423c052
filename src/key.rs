//! Request or dictionary key → canonical bytes → BLAKE3 digest.
//!
//! The canonical form is a tuple of length-prefixed parts, so `("ab", "c")` and `("a", "bc")` can
//! never collide. Only the digest ([`KeyHash`]) reaches the store and the bus; the canonical bytes stay
//! in the process, and the digest is also written into every stored envelope so that a foreign value
//! under our name is detected on read.

use std::fmt;

/// The BLAKE3 digest of a canonical key: the identity of a key everywhere outside the process.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyHash([u8; 32]);

impl KeyHash {
    /// Length of [`KeyHash::to_hex`]'s output.
    pub const HEX_LEN: usize = 64;

    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, as used in store keys and bus subjects.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses [`KeyHash::to_hex`]'s output; anything else is `None`.
    pub fn from_hex(text: &str) -> Option<Self> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(Self(bytes))
    }

    /// Which of `n` shards this key belongs to (the digest is uniform, so its first bytes will do).
    pub fn shard(&self, n: usize) -> usize {
        let head = u64::from_le_bytes(self.0[..8].try_into().expect("8 bytes"));
        (head % n as u64) as usize
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Builds a canonical key from parts; every part is length-prefixed.
#[derive(Default, Clone)]
pub struct KeyBuilder {
    canonical: Vec<u8>,
}

impl KeyBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one part.
    pub fn part(mut self, bytes: impl AsRef<[u8]>) -> Self {
        self.push(bytes.as_ref());
        self
    }

    /// Appends one part in place.
    pub fn push(&mut self, bytes: &[u8]) {
        self.canonical
            .extend_from_slice(&(bytes.len() as u64).to_be_bytes());
        self.canonical.extend_from_slice(bytes);
    }

    pub fn finish(self) -> Key {
        let hash = KeyHash(*blake3::hash(&self.canonical).as_bytes());
        Key {
            canonical: self.canonical,
            hash,
        }
    }
}

/// A canonical key and its digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    /// The length-prefixed tuple; kept for `explain` and debugging, never sent anywhere.
    pub canonical: Vec<u8>,
    /// The digest of `canonical`.
    pub hash: KeyHash,
}

/// The key of one HTTP request under its route's rules, with the parts that went into it (for
/// `explain`, in order).
#[derive(Clone, Debug)]
pub struct RequestKey {
    pub key: Key,
    /// `(what, value)` pairs, e.g. `("route", "reports")`, `("query", "a=1&b=2")`.
    pub parts: Vec<(&'static str, String)>,
}

/// Builds the canonical key of a request: route name, method, path, the query parameters the route
/// keeps (sorted), the headers and cookies it names (absent ones included as absent, so "missing"
/// and "empty" differ), and the body's BLAKE3 digest when the route keys on the body.
pub fn request_key(
    route: &crate::config::Route,
    method: &http::Method,
    uri: &http::Uri,
    headers: &http::HeaderMap,
    body: Option<&[u8]>,
) -> RequestKey {
    todo!("{route:?}{method}{uri}{headers:?}{body:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_length_prefixed_so_shifted_boundaries_differ() {
        let a = KeyBuilder::new().part("ab").part("c").finish();
        let b = KeyBuilder::new().part("a").part("bc").finish();
        assert_ne!(a.hash, b.hash);
    }

    #[test]
    fn hex_round_trips_and_rejects_junk() {
        let k = KeyBuilder::new().part("x").finish();
        assert_eq!(KeyHash::from_hex(&k.hash.to_hex()), Some(k.hash));
        assert_eq!(k.hash.to_hex().len(), KeyHash::HEX_LEN);
        assert_eq!(KeyHash::from_hex("zz"), None);
        assert_eq!(KeyHash::from_hex(&"0".repeat(63)), None);
    }
}
