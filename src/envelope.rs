//! The stored value: a hand-written, versioned, length-prefixed binary envelope.
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! magic "CRL" | version u8 (=3) | form u8 | key digest [32] | status u16 | stored_at_ms u64
//! | ttl_ms u64 | stale_ms u64 | stale_if_error_ms u64 | fetch_ms u64
//! | header count u16 | { name_len u16, name, value_len u32, value }* | body_len u64 | body
//! ```
//!
//! `form` is 0 for an answer, 1 for a marker, 2 for an answer in several representations
//! ([`Form`]). The body of a form 2 entry holds them all ([`pack`], [`unpack`]):
//!
//! ```text
//! count u8 | { coding_len u8, coding, len u64 }* | the bodies, in the same order
//! ```
//!
//! Several representations are a form rather than a new version: an entry of one representation
//! (nearly all of them) is written exactly as before, so the version stays 3, and a replica of an
//! earlier release reads a form 2 entry as [`EnvelopeError::BadForm`], a clean miss, during a
//! rolling upgrade.
//!
//! Older versions still decode, so entries written before an upgrade keep serving. Version 2
//! lacks `form` (every entry is an answer), except that one holding a header in corral's reserved
//! `x-corral-` namespace reads as a miss ([`EnvelopeError::Legacy`]). Version 1 also lacks
//! `stale_if_error_ms` and `fetch_ms`, read as zero (no stale-if-error window, no early refresh).
//!
//! Durations are stored as whole milliseconds (see [`encode`]).
//!
//! The body is the tail, so a decoded [`Entry`] serves it as a `Bytes` slice of the stored bytes
//! without copying. An empty body is a value; "no entry" is the absence of the key in the store.
//! Decoding never panics: bad bytes are an [`EnvelopeError`], which callers treat as a miss.
//! Headers are capped in count and bytes ([`MAX_HEADERS`], [`MAX_HEADER_BYTES`]) both ways, so
//! every entry that decodes can become an HTTP response.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};

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
    /// How long after freshness ends a stale copy may still be served at once while one refresh
    /// runs in the background (stale-while-revalidate).
    pub stale: Duration,
    /// How long after freshness ends a stale copy may stand in for a failed refresh
    /// (stale-if-error). Zero when the response forbade serving it stale.
    pub stale_if_error: Duration,
    /// How long the fetch that produced this entry took: the `delta` of early refresh.
    pub fetch_time: Duration,
    /// Digest of the canonical key this entry answers; compared on read.
    pub key: KeyHash,
    /// Whether the entry is an answer or a marker pointing at answers stored elsewhere.
    pub form: Form,
}

/// What an entry holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Form {
    /// An answer, served as it is.
    #[default]
    Answer,
    /// Not an answer: a pointer to answers stored under other keys, whose body says how to find
    /// them (the proxy's `Vary` marker names the request headers the answers vary on). Never
    /// served itself.
    Marker,
    /// One answer in several representations (its identity bytes and the content codings made
    /// of them when it was stored), packed in the body ([`pack`]); each client is sent one.
    Represented,
}

impl Form {
    fn byte(self) -> u8 {
        match self {
            Form::Answer => 0,
            Form::Marker => 1,
            Form::Represented => 2,
        }
    }

    fn from_byte(byte: u8) -> Result<Self, EnvelopeError> {
        match byte {
            0 => Ok(Form::Answer),
            1 => Ok(Form::Marker),
            2 => Ok(Form::Represented),
            other => Err(EnvelopeError::BadForm(other)),
        }
    }
}

/// Why an entry could not be written, or stored bytes could not be read as an entry.
///
/// [`encode`] only ever returns [`EnvelopeError::TooLarge`]; every other variant comes from
/// [`decode`] or [`decode_for`], whose callers treat it as a miss.
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
    #[error("envelope has an unknown form {0}")]
    BadForm(u8),
    /// A version 2 entry with a header in corral's reserved `x-corral-` namespace: written when
    /// markers were kept in headers. Read as a miss, so the next fetch writes it anew.
    #[error("envelope is a version 2 entry with a reserved header")]
    Legacy,
    /// A header name, header value, header count or body does not fit its length prefix, or the
    /// headers exceed [`MAX_HEADERS`] or [`MAX_HEADER_BYTES`].
    #[error("entry does not fit the envelope's length prefixes or header limits")]
    TooLarge,
    /// More headers than [`MAX_HEADERS`]: no version of corral writes such an entry.
    #[error("envelope has {0} headers, more than the {MAX_HEADERS} an entry may hold")]
    TooManyHeaders(usize),
    /// Header names and values together longer than [`MAX_HEADER_BYTES`].
    #[error("envelope headers exceed the {MAX_HEADER_BYTES} bytes an entry may hold")]
    HeadersTooLarge,
}

pub const MAGIC: &[u8; 3] = b"CRL";
pub const VERSION: u8 = 3;
/// The first version, without `stale_if_error` and `fetch_time`; still read.
const VERSION_1: u8 = 1;
/// The second version, without the form (every entry an answer); still read.
const VERSION_2: u8 = 2;
/// The most headers an entry holds. Far above what an upstream sends through the proxy (its HTTP/1
/// client takes 100), and far below the 24,576 an `http::HeaderMap` can be built with: a stored
/// entry must always become a response, and stored bytes are untrusted.
pub const MAX_HEADERS: usize = 1024;
/// The most bytes an entry's header names and values take together: the most a request head may
/// carry (`limits.max_header_bytes`), and more than the proxy's HTTP/1 client reads (about 400 KiB).
pub const MAX_HEADER_BYTES: usize = 1 << 20;

/// Headers no version 3 entry holds on corral's account (see [`EnvelopeError::Legacy`]).
const RESERVED_PREFIX: &str = "x-corral-";

/// Bytes before the first header: magic, version, form, key, status, stored_at, ttl, stale,
/// stale_if_error, fetch time, count.
const FIXED_LEN: usize = MAGIC.len() + 1 + 1 + 32 + 2 + 8 + 8 + 8 + 8 + 8 + 2;
/// The least a header can take: its two length prefixes.
const HEADER_MIN_LEN: usize = 2 + 4;
/// The body's length prefix.
const BODY_LEN_LEN: usize = 8;

/// Encodes an entry into its stored form, in one allocation of exactly the encoded size.
///
/// Durations are stored in whole milliseconds: sub-millisecond parts are dropped and anything
/// beyond `u64::MAX` ms saturates, so `ttl` and `stale` round-trip exactly only when they are whole
/// milliseconds (the only precision HTTP caching needs).
///
/// Returns [`EnvelopeError::TooLarge`] rather than truncating when a header name exceeds
/// `u16::MAX` bytes, or the headers exceed [`MAX_HEADERS`] or [`MAX_HEADER_BYTES`] (which
/// [`decode`] refuses): HTTP servers reject such responses long before, and a silently cut header
/// would be a wrong answer served from the cache, whereas an error only makes that one response
/// uncacheable.
pub fn encode(entry: &Entry) -> Result<Bytes, EnvelopeError> {
    if entry.headers.len() > MAX_HEADERS {
        return Err(EnvelopeError::TooLarge);
    }
    // Within MAX_HEADERS, so it fits.
    let count = entry.headers.len() as u16;
    let mut len = FIXED_LEN;
    let mut header_bytes = 0usize;
    for (name, value) in &entry.headers {
        u16::try_from(name.len()).map_err(|_| EnvelopeError::TooLarge)?;
        header_bytes = header_bytes.saturating_add(name.len() + value.len());
        if header_bytes > MAX_HEADER_BYTES {
            return Err(EnvelopeError::TooLarge);
        }
        len = len
            .checked_add(HEADER_MIN_LEN + name.len())
            .and_then(|len| len.checked_add(value.len()))
            .ok_or(EnvelopeError::TooLarge)?;
    }
    let body_len = u64::try_from(entry.body.len()).map_err(|_| EnvelopeError::TooLarge)?;
    len = len
        .checked_add(BODY_LEN_LEN)
        .and_then(|len| len.checked_add(entry.body.len()))
        .ok_or(EnvelopeError::TooLarge)?;

    let mut out = BytesMut::with_capacity(len);
    out.put_slice(MAGIC);
    out.put_u8(VERSION);
    out.put_u8(entry.form.byte());
    out.put_slice(entry.key.as_bytes());
    out.put_u16(entry.status);
    out.put_u64(entry.stored_at_ms);
    out.put_u64(millis(entry.ttl));
    out.put_u64(millis(entry.stale));
    out.put_u64(millis(entry.stale_if_error));
    out.put_u64(millis(entry.fetch_time));
    out.put_u16(count);
    for (name, value) in &entry.headers {
        // Both lengths were checked above; the casts cannot truncate.
        out.put_u16(name.len() as u16);
        out.put_slice(name.as_bytes());
        out.put_u32(value.len() as u32);
        out.put_slice(value);
    }
    out.put_u64(body_len);
    out.put_slice(&entry.body);
    debug_assert_eq!(out.len(), len, "size computed before writing must match");
    Ok(out.freeze())
}

/// The bytes of [`encode`]`(entry)` before the body: everything but the body, its length
/// prefix included. A store that can rewrite a value's head in place takes this instead of the
/// whole value when only the head changed (a revalidated entry).
pub fn encode_head(entry: &Entry) -> Result<Bytes, EnvelopeError> {
    let headless = Entry {
        body: Bytes::new(),
        ..entry.clone()
    };
    let mut head = BytesMut::from(&encode(&headless)?[..]);
    let body_len = u64::try_from(entry.body.len()).map_err(|_| EnvelopeError::TooLarge)?;
    let at = head.len() - BODY_LEN_LEN;
    head[at..].copy_from_slice(&body_len.to_be_bytes());
    Ok(head.freeze())
}

/// Whole milliseconds, saturating: a TTL of centuries is as good as forever.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Decodes stored bytes; the body and header values of the result share `bytes`' allocation.
///
/// Stored bytes are untrusted (another writer, another version, a corrupted store), so every length
/// is checked against what remains before it is used to slice or allocate, and any mismatch is an
/// error, never a panic. Bytes after the body are [`EnvelopeError::Trailing`] rather than ignored,
/// so that a value written by a later format cannot be half-read as this one.
pub fn decode(bytes: Bytes) -> Result<Entry, EnvelopeError> {
    let mut reader = Reader {
        bytes: &bytes,
        pos: 0,
    };
    if reader.array::<3>()? != *MAGIC {
        return Err(EnvelopeError::BadMagic);
    }
    let version = reader.u8()?;
    if ![VERSION, VERSION_2, VERSION_1].contains(&version) {
        return Err(EnvelopeError::UnsupportedVersion(version));
    }
    let form = if version == VERSION {
        Form::from_byte(reader.u8()?)?
    } else {
        Form::Answer
    };
    let key = KeyHash::from_bytes(reader.array::<32>()?);
    let status = reader.u16()?;
    let stored_at_ms = reader.u64()?;
    let ttl = Duration::from_millis(reader.u64()?);
    let stale = Duration::from_millis(reader.u64()?);
    let (stale_if_error, fetch_time) = if version == VERSION_1 {
        (Duration::ZERO, Duration::ZERO)
    } else {
        (
            Duration::from_millis(reader.u64()?),
            Duration::from_millis(reader.u64()?),
        )
    };
    let count = usize::from(reader.u16()?);
    if count > MAX_HEADERS {
        return Err(EnvelopeError::TooManyHeaders(count));
    }
    // Reject an impossible count before allocating for it: every header needs its two prefixes,
    // and the body needs its own.
    let least = count * HEADER_MIN_LEN + BODY_LEN_LEN;
    if least > reader.remaining() {
        return Err(EnvelopeError::Truncated);
    }
    let mut headers = Vec::with_capacity(count);
    let mut header_bytes = 0usize;
    for _ in 0..count {
        let name_len = usize::from(reader.u16()?);
        let name = reader.take(name_len)?;
        let value_len = reader.u32()?;
        // Checked before the name is copied: the copies are what the limit bounds.
        header_bytes = header_bytes.saturating_add(name_len + value_len as usize);
        if header_bytes > MAX_HEADER_BYTES {
            return Err(EnvelopeError::HeadersTooLarge);
        }
        let name = std::str::from_utf8(name)
            .map_err(|_| EnvelopeError::BadHeaderName)?
            .to_owned();
        let value = reader.slice(value_len.into())?;
        if version == VERSION_2 && name.starts_with(RESERVED_PREFIX) {
            return Err(EnvelopeError::Legacy);
        }
        headers.push((name, value));
    }
    let body_len = reader.u64()?;
    let body = reader.slice(body_len)?;
    // Checked here, once, so that every entry that decodes can be served.
    if form == Form::Represented {
        unpack(&body)?;
    }
    match reader.remaining() {
        0 => Ok(Entry {
            status,
            headers,
            body,
            stored_at_ms,
            ttl,
            stale,
            stale_if_error,
            fetch_time,
            key,
            form,
        }),
        extra => Err(EnvelopeError::Trailing(extra)),
    }
}

/// The most representations one entry holds: identity and each content coding.
pub const MAX_REPRESENTATIONS: usize = 8;

/// One representation of a [`Form::Represented`] answer: its content coding (`identity` for the
/// bytes the upstream sent) and its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Representation {
    pub coding: String,
    pub body: Bytes,
}

/// The body of a [`Form::Represented`] entry holding `representations`, in their order.
/// [`EnvelopeError::TooLarge`] for more than [`MAX_REPRESENTATIONS`] or a coding name over 255
/// bytes.
pub fn pack(representations: &[Representation]) -> Result<Bytes, EnvelopeError> {
    if representations.len() > MAX_REPRESENTATIONS {
        return Err(EnvelopeError::TooLarge);
    }
    let mut len = 1usize;
    for representation in representations {
        u8::try_from(representation.coding.len()).map_err(|_| EnvelopeError::TooLarge)?;
        len += 1 + representation.coding.len() + 8 + representation.body.len();
    }
    let mut out = BytesMut::with_capacity(len);
    // Both bounded above.
    out.put_u8(representations.len() as u8);
    for representation in representations {
        out.put_u8(representation.coding.len() as u8);
        out.put_slice(representation.coding.as_bytes());
        out.put_u64(representation.body.len() as u64);
    }
    for representation in representations {
        out.put_slice(&representation.body);
    }
    Ok(out.freeze())
}

/// The representations a [`Form::Represented`] body holds, each body a slice of it. Stored
/// bytes are untrusted: a body that does not parse, or has bytes left over, is an error (a miss).
pub fn unpack(body: &Bytes) -> Result<Vec<Representation>, EnvelopeError> {
    let mut reader = Reader {
        bytes: body,
        pos: 0,
    };
    let count = usize::from(reader.u8()?);
    if count > MAX_REPRESENTATIONS {
        return Err(EnvelopeError::TooLarge);
    }
    let mut heads = Vec::with_capacity(count);
    for _ in 0..count {
        let coding_len = usize::from(reader.u8()?);
        let coding = std::str::from_utf8(reader.take(coding_len)?)
            .map_err(|_| EnvelopeError::BadHeaderName)?
            .to_owned();
        heads.push((coding, reader.u64()?));
    }
    let mut representations = Vec::with_capacity(count);
    for (coding, len) in heads {
        let body = reader.slice(len)?;
        representations.push(Representation { coding, body });
    }
    match reader.remaining() {
        0 => Ok(representations),
        extra => Err(EnvelopeError::Trailing(extra)),
    }
}

/// Decodes stored bytes and checks that they answer `key`.
pub fn decode_for(bytes: Bytes, key: &KeyHash) -> Result<Entry, EnvelopeError> {
    let entry = decode(bytes)?;
    if entry.key != *key {
        return Err(EnvelopeError::ForeignKey);
    }
    Ok(entry)
}

/// A cursor over untrusted input: every read checks the remaining length first.
struct Reader<'a> {
    bytes: &'a Bytes,
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// The next `len` bytes, borrowed; used for what is copied or checked anyway.
    fn take(&mut self, len: usize) -> Result<&'a [u8], EnvelopeError> {
        if len > self.remaining() {
            return Err(EnvelopeError::Truncated);
        }
        let start = self.pos;
        self.pos += len;
        let bytes: &'a Bytes = self.bytes;
        Ok(&bytes[start..self.pos])
    }

    /// The next `len` bytes as a zero-copy slice of the input; `len` is a wire length, so it is
    /// checked against the input before any conversion can matter.
    fn slice(&mut self, len: u64) -> Result<Bytes, EnvelopeError> {
        let len = usize::try_from(len).map_err(|_| EnvelopeError::Truncated)?;
        if len > self.remaining() {
            return Err(EnvelopeError::Truncated);
        }
        let start = self.pos;
        self.pos += len;
        Ok(self.bytes.slice(start..self.pos))
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], EnvelopeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, EnvelopeError> {
        Ok(u8::from_be_bytes(self.array()?))
    }

    fn u16(&mut self) -> Result<u16, EnvelopeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, EnvelopeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, EnvelopeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn key(byte: u8) -> KeyHash {
        KeyHash::from_bytes([byte; 32])
    }

    fn typical() -> Entry {
        Entry {
            status: 200,
            headers: vec![
                ("content-type".into(), Bytes::from_static(b"text/html")),
                ("etag".into(), Bytes::from_static(b"\"abc\"")),
                ("x-empty".into(), Bytes::new()),
            ],
            body: Bytes::from_static(b"<p>hello</p>"),
            stored_at_ms: 1_700_000_000_000,
            ttl: Duration::from_secs(60),
            stale: Duration::from_millis(1500),
            stale_if_error: Duration::from_secs(300),
            fetch_time: Duration::from_millis(42),
            key: key(7),
            form: Form::Answer,
        }
    }

    fn round_trip(entry: &Entry) -> Entry {
        decode(encode(entry).unwrap()).unwrap()
    }

    /// Whether `part` points into `whole`'s memory, i.e. was sliced rather than copied.
    fn inside(part: &Bytes, whole: &Bytes) -> bool {
        let range = whole.as_ptr_range();
        let start = part.as_ptr();
        range.start <= start && start.wrapping_add(part.len()) <= range.end
    }

    #[test]
    fn the_head_is_the_encoding_up_to_the_body() {
        let entry = typical();
        let whole = encode(&entry).unwrap();
        let head = encode_head(&entry).unwrap();
        assert_eq!(head.len(), whole.len() - entry.body.len());
        assert_eq!(whole.slice(..head.len()), head);
    }

    #[test]
    fn typical_entry_round_trips() {
        let entry = typical();
        assert_eq!(round_trip(&entry), entry);
    }

    #[test]
    fn edge_entries_round_trip() {
        let base = typical();
        let many_headers = (0..1000)
            .map(|i| (format!("x-header-{i}"), Bytes::from(vec![i as u8; i % 40])))
            .collect();
        let cases = [
            Entry {
                body: Bytes::new(),
                ..base.clone()
            },
            Entry {
                headers: Vec::new(),
                ..base.clone()
            },
            Entry {
                headers: Vec::new(),
                body: Bytes::new(),
                status: 0,
                ..base.clone()
            },
            Entry {
                headers: many_headers,
                ..base.clone()
            },
            Entry {
                body: Bytes::from(vec![0xa5; 3 << 20]),
                ..base.clone()
            },
            Entry {
                ttl: Duration::ZERO,
                stale: Duration::ZERO,
                stale_if_error: Duration::ZERO,
                fetch_time: Duration::ZERO,
                stored_at_ms: 0,
                ..base.clone()
            },
            Entry {
                ttl: Duration::from_millis(u64::MAX),
                stale: Duration::from_millis(u64::MAX),
                stale_if_error: Duration::from_millis(u64::MAX),
                fetch_time: Duration::from_millis(u64::MAX),
                stored_at_ms: u64::MAX,
                status: u16::MAX,
                ..base.clone()
            },
            Entry {
                headers: vec![("é-ünïcode".into(), Bytes::from_static(b"\0\xff"))],
                ..base
            },
        ];
        for entry in cases {
            assert_eq!(round_trip(&entry), entry);
        }
    }

    #[test]
    fn encoding_has_exact_length_and_capacity() {
        let entry = typical();
        let bytes = encode(&entry).unwrap();
        let headers: usize = entry
            .headers
            .iter()
            .map(|(n, v)| HEADER_MIN_LEN + n.len() + v.len())
            .sum();
        assert_eq!(
            bytes.len(),
            FIXED_LEN + headers + BODY_LEN_LEN + entry.body.len()
        );
        // Exact capacity: converting back to a unique `BytesMut` exposes it without copying.
        let owned = bytes.try_into_mut().unwrap();
        assert_eq!(owned.capacity(), owned.len());
    }

    #[test]
    fn durations_drop_sub_millisecond_parts_and_saturate() {
        let entry = Entry {
            ttl: Duration::from_micros(1_999),
            stale: Duration::MAX,
            ..typical()
        };
        let back = round_trip(&entry);
        assert_eq!(back.ttl, Duration::from_millis(1));
        assert_eq!(back.stale, Duration::from_millis(u64::MAX));
    }

    #[test]
    fn body_and_values_are_slices_of_the_input() {
        let bytes = encode(&typical()).unwrap();
        let entry = decode(bytes.clone()).unwrap();
        assert!(inside(&entry.body, &bytes));
        for (_, value) in entry.headers.iter().filter(|(_, v)| !v.is_empty()) {
            assert!(inside(value, &bytes));
        }
        // The body is the tail of the input.
        assert_eq!(entry.body.as_ptr_range().end, bytes.as_ptr_range().end);
    }

    #[test]
    fn too_large_fields_are_refused_not_truncated() {
        let long_name = Entry {
            headers: vec![("n".repeat(usize::from(u16::MAX) + 1), Bytes::new())],
            ..typical()
        };
        assert_eq!(encode(&long_name), Err(EnvelopeError::TooLarge));
        let longest_name = Entry {
            headers: vec![("n".repeat(usize::from(u16::MAX)), Bytes::new())],
            ..typical()
        };
        assert_eq!(round_trip(&longest_name), longest_name);
        let too_many = Entry {
            headers: vec![(String::new(), Bytes::new()); usize::from(u16::MAX) + 1],
            ..typical()
        };
        assert_eq!(encode(&too_many), Err(EnvelopeError::TooLarge));
    }

    /// `entry` encoded as if there were no header limits: what another writer could store.
    fn unchecked(entry: &Entry) -> Bytes {
        let first = Entry {
            headers: Vec::new(),
            ..entry.clone()
        };
        let plain = encode(&first).unwrap();
        let mut out = plain[..FIXED_LEN - 2].to_vec();
        out.extend_from_slice(&u16::try_from(entry.headers.len()).unwrap().to_be_bytes());
        for (name, value) in &entry.headers {
            out.extend_from_slice(&u16::try_from(name.len()).unwrap().to_be_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&u32::try_from(value.len()).unwrap().to_be_bytes());
            out.extend_from_slice(value);
        }
        out.extend_from_slice(&plain[FIXED_LEN..]);
        out.into()
    }

    #[test]
    fn headers_are_capped_in_count_and_bytes_both_ways() {
        let with_headers = |count: usize, value_len: usize| Entry {
            headers: (0..count)
                .map(|i| (format!("x-h-{i}"), Bytes::from(vec![b'v'; value_len])))
                .collect(),
            ..typical()
        };
        let most = with_headers(MAX_HEADERS, 0);
        assert_eq!(round_trip(&most), most);
        assert_eq!(decode(unchecked(&most)), Ok(most));

        let too_many = with_headers(MAX_HEADERS + 1, 0);
        assert_eq!(encode(&too_many), Err(EnvelopeError::TooLarge));
        assert_eq!(
            decode(unchecked(&too_many)),
            Err(EnvelopeError::TooManyHeaders(MAX_HEADERS + 1))
        );
        let attack = with_headers(40_000, 0);
        assert_eq!(
            decode(unchecked(&attack)),
            Err(EnvelopeError::TooManyHeaders(40_000))
        );

        // Two headers whose names and values pass the byte limit by one.
        let half = MAX_HEADER_BYTES / 2 - "x-h-0".len();
        let mut too_long = with_headers(2, half);
        assert_eq!(round_trip(&too_long), too_long);
        too_long.headers[1].1 = Bytes::from(vec![b'v'; half + 1]);
        assert_eq!(encode(&too_long), Err(EnvelopeError::TooLarge));
        assert_eq!(
            decode(unchecked(&too_long)),
            Err(EnvelopeError::HeadersTooLarge)
        );
    }

    #[test]
    fn every_error_is_reachable() {
        let good = encode(&typical()).unwrap().to_vec();
        let with = |at: usize, byte: u8| {
            let mut bytes = good.clone();
            bytes[at] = byte;
            decode(bytes.into())
        };
        assert_eq!(decode(Bytes::new()), Err(EnvelopeError::Truncated));
        assert_eq!(
            decode(good[..good.len() - 1].to_vec().into()),
            Err(EnvelopeError::Truncated)
        );
        assert_eq!(with(0, b'X'), Err(EnvelopeError::BadMagic));
        assert_eq!(with(3, 4), Err(EnvelopeError::UnsupportedVersion(4)));
        assert_eq!(with(4, 3), Err(EnvelopeError::BadForm(3)));
        // The first header name starts after the fixed part and its u16 length.
        assert_eq!(with(FIXED_LEN + 2, 0xff), Err(EnvelopeError::BadHeaderName));
        let mut trailing = good.clone();
        trailing.extend_from_slice(b"xyz");
        assert_eq!(decode(trailing.into()), Err(EnvelopeError::Trailing(3)));
        // A header count that cannot fit is refused before anything is allocated for it.
        let count_at = FIXED_LEN - 2;
        let mut huge_count = good.clone();
        let count = u16::try_from(MAX_HEADERS).unwrap();
        huge_count[count_at..FIXED_LEN].copy_from_slice(&count.to_be_bytes());
        assert_eq!(
            decode(huge_count.clone().into()),
            Err(EnvelopeError::Truncated)
        );
        huge_count[count_at..FIXED_LEN].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(
            decode(huge_count.into()),
            Err(EnvelopeError::TooManyHeaders(usize::from(u16::MAX)))
        );
        // A body length beyond the input (and beyond `usize` on 32-bit) is truncation.
        let body_len_at = good.len() - typical().body.len() - BODY_LEN_LEN;
        let mut huge_body = good;
        huge_body[body_len_at..body_len_at + 8].copy_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(decode(huge_body.into()), Err(EnvelopeError::Truncated));
    }

    /// `entry` in version 2: version 3 without the form byte.
    fn version_2(entry: &Entry) -> Vec<u8> {
        let v3 = encode(entry).unwrap();
        let mut v2 = v3[..MAGIC.len()].to_vec();
        v2.push(VERSION_2);
        v2.extend_from_slice(&v3[MAGIC.len() + 2..]);
        v2
    }

    #[test]
    fn markers_round_trip_and_an_unknown_form_is_refused() {
        let marker = Entry {
            form: Form::Marker,
            ..typical()
        };
        let bytes = encode(&marker).unwrap();
        assert_eq!(decode(bytes.clone()), Ok(marker));
        let mut unknown = bytes.to_vec();
        unknown[MAGIC.len() + 1] = 9;
        assert_eq!(decode(unknown.into()), Err(EnvelopeError::BadForm(9)));
    }

    #[test]
    fn representations_round_trip_as_slices_and_bad_ones_are_refused() {
        let representations = vec![
            Representation {
                coding: "identity".into(),
                body: Bytes::from_static(b"{\"a\": 1}"),
            },
            Representation {
                coding: "gzip".into(),
                body: Bytes::from_static(b"\x1f\x8b..."),
            },
            Representation {
                coding: "br".into(),
                body: Bytes::new(),
            },
        ];
        let entry = Entry {
            form: Form::Represented,
            body: pack(&representations).unwrap(),
            ..typical()
        };
        let back = round_trip(&entry);
        assert_eq!(back.form, Form::Represented);
        let unpacked = unpack(&back.body).unwrap();
        assert_eq!(unpacked, representations);
        assert!(inside(&unpacked[1].body, &back.body));

        let packed = pack(&representations).unwrap();
        for len in 0..packed.len() {
            assert!(unpack(&packed.slice(..len)).is_err(), "prefix of {len}");
        }
        let mut longer = packed.to_vec();
        longer.push(0);
        assert_eq!(unpack(&longer.into()), Err(EnvelopeError::Trailing(1)));
        let too_many = vec![representations[2].clone(); MAX_REPRESENTATIONS + 1];
        assert_eq!(pack(&too_many), Err(EnvelopeError::TooLarge));
        assert_eq!(
            unpack(&Bytes::from_static(&[200])),
            Err(EnvelopeError::TooLarge)
        );
    }

    #[test]
    fn version_2_entries_decode_as_answers_unless_they_hold_a_reserved_header() {
        let entry = typical();
        assert_eq!(decode(version_2(&entry).into()), Ok(entry.clone()));
        let mut legacy = entry.clone();
        legacy
            .headers
            .push(("x-corral-vary".into(), Bytes::from_static(b"accept")));
        assert_eq!(
            decode(version_2(&legacy).into()),
            Err(EnvelopeError::Legacy)
        );
        // Version 3 holds no header on corral's account: one there is the upstream's own.
        assert_eq!(decode(encode(&legacy).unwrap()), Ok(legacy));
    }

    #[test]
    fn version_1_entries_still_decode_without_the_new_windows() {
        let entry = typical();
        let v2 = version_2(&entry);
        // Version 1 is version 2 without the two u64s after `stale`.
        let after_stale = MAGIC.len() + 1 + 32 + 2 + 8 + 8 + 8;
        let mut v1 = v2[..after_stale].to_vec();
        v1[3] = VERSION_1;
        v1.extend_from_slice(&v2[after_stale + 16..]);
        let back = decode(v1.into()).unwrap();
        assert_eq!(
            back,
            Entry {
                stale_if_error: Duration::ZERO,
                fetch_time: Duration::ZERO,
                ..entry
            }
        );
    }

    #[test]
    fn decode_for_checks_the_key() {
        let bytes = encode(&typical()).unwrap();
        assert_eq!(decode_for(bytes.clone(), &key(7)), Ok(typical()));
        assert_eq!(decode_for(bytes, &key(8)), Err(EnvelopeError::ForeignKey));
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        let header = (
            any::<String>(),
            prop::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from),
        );
        (
            any::<u16>(),
            prop::collection::vec(header, 0..12),
            prop::collection::vec(any::<u8>(), 0..2048).prop_map(Bytes::from),
            any::<u64>(),
            any::<u64>().prop_map(Duration::from_millis),
            any::<u64>().prop_map(Duration::from_millis),
            any::<[u8; 32]>().prop_map(KeyHash::from_bytes),
            any::<(u64, u64)>(),
        )
            .prop_map(
                |(status, headers, body, stored_at_ms, ttl, stale, key, (sie, fetch))| Entry {
                    status,
                    headers,
                    body,
                    stored_at_ms,
                    ttl,
                    stale,
                    stale_if_error: Duration::from_millis(sie),
                    fetch_time: Duration::from_millis(fetch),
                    key,
                    form: Form::Answer,
                },
            )
    }

    proptest! {
        #[test]
        fn arbitrary_entries_round_trip(entry in arb_entry()) {
            let bytes = encode(&entry).unwrap();
            let back = decode(bytes.clone()).unwrap();
            if !back.body.is_empty() {
                prop_assert!(inside(&back.body, &bytes));
            }
            prop_assert_eq!(back, entry);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(bytes.into());
        }

        #[test]
        fn arbitrary_bytes_after_a_valid_prefix_never_panic(
            tail in prop::collection::vec(any::<u8>(), 0..256),
        ) {
            // Random bytes rarely get past the magic; this exercises the header and body parsing.
            let mut bytes = encode(&typical()).unwrap()[..FIXED_LEN - 2].to_vec();
            bytes.extend_from_slice(&tail);
            let _ = decode(bytes.into());
        }

        #[test]
        fn strict_prefixes_are_errors(entry in arb_entry()) {
            let bytes = encode(&entry).unwrap();
            for len in 0..bytes.len() {
                prop_assert!(decode(bytes.slice(..len)).is_err(), "prefix of {} decoded", len);
            }
        }

        #[test]
        fn a_flipped_fixed_byte_never_decodes_to_the_same_entry(
            entry in arb_entry(),
            at in 0..FIXED_LEN,
            mask in 1..=u8::MAX,
        ) {
            let mut bytes = encode(&entry).unwrap().to_vec();
            bytes[at] ^= mask;
            if let Ok(other) = decode(bytes.into()) {
                prop_assert_ne!(other, entry);
            }
        }
    }
}
