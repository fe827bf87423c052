//! A key's identity: canonical bytes → BLAKE3 digest. No HTTP here: turning a request into a key
//! is the HTTP layer's job (`http::key`), a dictionary key the dictionary's.
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

    /// A builder with room for `bytes` of canonical form: growing the buffer part by part costs
    /// more than the hash.
    pub fn with_capacity(bytes: usize) -> Self {
        Self {
            canonical: Vec::with_capacity(bytes),
        }
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

    /// Appends a list as one part: each item length-prefixed, the whole prefixed by its length.
    /// (What pushing the framed list would, without building it first.)
    pub fn push_framed(&mut self, items: &[&[u8]]) {
        let framed: usize = items.iter().map(|item| 8 + item.len()).sum();
        self.canonical
            .extend_from_slice(&(framed as u64).to_be_bytes());
        for item in items {
            self.canonical
                .extend_from_slice(&(item.len() as u64).to_be_bytes());
            self.canonical.extend_from_slice(item);
        }
    }

    /// Appends a list that may be absent as one part: `0` when empty (absent), else `1` and the
    /// framed values, so absent never equals empty.
    pub fn push_presence(&mut self, values: &[&[u8]]) {
        if values.is_empty() {
            self.push(&[0]);
            return;
        }
        let framed: usize = values.iter().map(|value| 8 + value.len()).sum();
        self.canonical
            .extend_from_slice(&(1 + framed as u64).to_be_bytes());
        self.canonical.push(1);
        for value in values {
            self.canonical
                .extend_from_slice(&(value.len() as u64).to_be_bytes());
            self.canonical.extend_from_slice(value);
        }
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

/// `key` as keyed under generation `generation` of its route (see `engine::generations`).
/// Generation 0 is the key itself, so entries stored before a route's first whole-route purge stay
/// readable; any other generation appends itself as one more part and rehashes.
pub fn key_with_generation(key: Key, generation: u64) -> Key {
    if generation == 0 {
        return key;
    }
    let mut builder = KeyBuilder {
        canonical: key.canonical,
    };
    builder.push(b"generation");
    builder.push(generation.to_string().as_bytes());
    builder.finish()
}

/// Tags the digest of a route's generation, so it can never equal a request or dictionary key.
const GENERATION_KEY_VERSION: &str = "corral/route-generation/1";

/// The digest that GENERATION events about `route` carry (and that the NATS KV store names the
/// route's generation record by).
pub fn generation_key(route: &str) -> KeyHash {
    KeyBuilder::new()
        .part(GENERATION_KEY_VERSION)
        .part(route)
        .finish()
        .hash
}
