//! Byte ranges (RFC 9110 section 14) cut from an answer corral holds whole, with no I/O.
//!
//! A GET with `Range: bytes=...` on a cached route is keyed, coalesced and fetched like any other
//! GET: the upstream is asked for the whole representation (never for one client's ranges, since
//! the answer is shared), and every client's ranges are cut from the stored bytes. [`answer`]
//! turns a whole `200` into what the client asked for:
//!
//! - one satisfiable range: `206 Partial Content` with `Content-Range: bytes first-last/length`;
//! - several: one `206` of type `multipart/byteranges`, overlapping and adjacent ranges coalesced
//!   into one part, the parts in the order the client first asked for them (section 15.3.7.2);
//! - none satisfiable: `416 Range Not Satisfiable` with `Content-Range: bytes */length`;
//! - a `Range` that does not parse (another unit, a malformed or reversed range, the field sent
//!   twice), more than [`MAX_RANGES`] ranges (section 14.2 lets a server ignore a request for
//!   many small ranges, a known way to make it work hard for little), several ranges of an
//!   encoded representation (whose parts would need an encoding each), an empty representation
//!   (no range of it can be written), or an `If-Range` that does not hold: the whole `200`.
//!
//! The client's preconditions are evaluated before (RFC 9110 section 13.2.2): a `304` or `412`
//! wins over a `206`. Only a GET's `200` is ranged: a HEAD ignores `Range`, and a cached `404` is
//! not a representation to cut.
//!
//! A client's own fetch (a key that may not be shared) asks the upstream for the client's ranges
//! instead ([`forward`]): nothing of it is stored, and a `206` from the upstream goes through as it
//! came.

use std::fmt::Write as _;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, response};

use super::conditional;
use crate::envelope::Entry;

/// The most ranges one request may ask for; more are answered with the whole representation.
pub const MAX_RANGES: usize = 32;

/// One range-spec as the client wrote it (RFC 9110 section 14.1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spec {
    /// `first-last` or `first-` (an int-range): from byte `first` to `last` included, or to the
    /// end.
    From { first: u64, last: Option<u64> },
    /// `-n` (a suffix-range): the last `n` bytes.
    Suffix(u64),
}

/// Bytes `start..end` of a representation (end excluded), never empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub start: u64,
    pub end: u64,
}

/// What a request's ranges select of a representation of a known length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    /// Send the whole representation.
    Whole,
    /// These spans, coalesced, in the order they are sent.
    Parts(Vec<Span>),
    /// No range lies within the representation: `416`.
    Unsatisfiable,
}

// ---------------------------------------------------------------------------------------------
// Parsing

/// The request's byte ranges; `None` when the request has no `Range`, or one corral ignores: a
/// unit other than `bytes`, a value that does not match the grammar of RFC 9110 section 14.1.2
/// (an int-range whose last position is before its first included), or the field sent more than
/// once.
pub fn parse(request: &HeaderMap) -> Option<Vec<Spec>> {
    let mut values = request.get_all(header::RANGE).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return None;
    };
    parse_value(value.as_bytes())
}

/// One `Range` value: `bytes=` and a comma-separated list of range-specs, empty elements and
/// whitespace around the commas allowed (section 5.6.1).
pub fn parse_value(value: &[u8]) -> Option<Vec<Spec>> {
    let equals = value.iter().position(|b| *b == b'=')?;
    let (unit, set) = (&value[..equals], &value[equals + 1..]);
    if !unit.eq_ignore_ascii_case(b"bytes") {
        return None;
    }
    let mut specs = Vec::new();
    for element in set.split(|b| *b == b',') {
        let element = element.trim_ascii();
        if !element.is_empty() {
            specs.push(spec(element)?);
        }
    }
    (!specs.is_empty()).then_some(specs)
}

fn spec(text: &[u8]) -> Option<Spec> {
    if let Some(length) = text.strip_prefix(b"-") {
        return Some(Spec::Suffix(digits(length)?));
    }
    let dash = text.iter().position(|b| *b == b'-')?;
    let first = digits(&text[..dash])?;
    let last = match &text[dash + 1..] {
        [] => None,
        last => Some(digits(last)?),
    };
    // An int-range whose last position comes before its first is invalid (section 14.1.1).
    if last.is_some_and(|last| last < first) {
        return None;
    }
    Some(Spec::From { first, last })
}

/// `1*DIGIT`; a number past `u64` is read as `u64::MAX`, which is past any representation corral
/// holds, so it means what the client meant.
fn digits(text: &[u8]) -> Option<u64> {
    if text.is_empty() || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(text.iter().fold(0u64, |n, digit| {
        n.saturating_mul(10).saturating_add(u64::from(digit - b'0'))
    }))
}

// ---------------------------------------------------------------------------------------------
// Selecting

impl Spec {
    /// The bytes this range-spec names of a representation of `len` bytes; `None` when it is not
    /// satisfiable (it starts at or past the end, or is an empty suffix).
    fn within(self, len: u64) -> Option<Span> {
        let span = match self {
            Spec::From { first, last } => Span {
                start: first,
                end: last.map_or(len, |last| last.saturating_add(1).min(len)),
            },
            Spec::Suffix(n) => Span {
                start: len.saturating_sub(n),
                end: len,
            },
        };
        (span.start < span.end).then_some(span)
    }
}

/// What `specs` select of a representation of `len` bytes. Ranges that overlap or touch are
/// coalesced into one span, sent where the first of them was asked for.
pub fn select(specs: &[Spec], len: u64) -> Selection {
    if specs.len() > MAX_RANGES || len == 0 {
        return Selection::Whole;
    }
    // Each satisfiable span with the position of the range-spec it came from.
    let mut spans: Vec<(Span, usize)> = specs
        .iter()
        .enumerate()
        .filter_map(|(asked, spec)| Some((spec.within(len)?, asked)))
        .collect();
    if spans.is_empty() {
        return Selection::Unsatisfiable;
    }
    spans.sort_unstable_by_key(|(span, _)| span.start);
    let mut merged: Vec<(Span, usize)> = Vec::with_capacity(spans.len());
    for (span, asked) in spans {
        match merged.last_mut() {
            Some((last, first_asked)) if span.start <= last.end => {
                last.end = last.end.max(span.end);
                *first_asked = (*first_asked).min(asked);
            }
            _ => merged.push((span, asked)),
        }
    }
    merged.sort_unstable_by_key(|(_, asked)| *asked);
    Selection::Parts(merged.into_iter().map(|(span, _)| span).collect())
}

// ---------------------------------------------------------------------------------------------
// Answering

/// The body a GET's `Range` makes of a whole `200` answer from an entry, with `parts` (status and
/// headers) rewritten to match; `None` to send the answer as it is.
///
/// `sent_len` is the exact length of the body the answer sends (`None` when it is not known, as
/// for a body decoded as it is sent). The ranges are cut from the stored bytes, so they apply only
/// when the answer sends exactly those: the same `Content-Encoding` as the entry and, for a GET,
/// the entry's length. An answer that transforms the stored bytes on the way is sent whole (RFC
/// 9110 section 14.2 lets a server ignore `Range`), rather than buffered to be cut.
///
/// With `advertise`, an answer that could be ranged says so with `Accept-Ranges: bytes` (answers
/// from the cache; a client's own fetch keeps what its upstream said).
pub fn answer(
    method: &Method,
    request: &HeaderMap,
    parts: &mut response::Parts,
    stored: &Entry,
    sent_len: Option<u64>,
    advertise: bool,
) -> Option<Bytes> {
    let head = *method == Method::HEAD;
    if parts.status != StatusCode::OK || !(head || *method == Method::GET) {
        return None;
    }
    let sends_stored = same_encoding(stored, &parts.headers)
        && (head || sent_len == Some(stored.body.len() as u64));
    if !sends_stored {
        return None;
    }
    if advertise {
        parts
            .headers
            .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    }
    if head {
        return None;
    }
    let specs = parse(request)?;
    if !conditional::if_range(request, &parts.headers) {
        return None;
    }
    let body = &stored.body;
    let len = body.len() as u64;
    match select(&specs, len) {
        Selection::Whole => None,
        Selection::Unsatisfiable => Some(unsatisfiable(parts, len)),
        Selection::Parts(spans) => match spans[..] {
            [span] => Some(single(parts, body, span)),
            _ if encoded(&parts.headers) => None,
            _ => Some(multipart(parts, body, &spans)),
        },
    }
}

/// Whether `sent` carries the entry's own `Content-Encoding` (or, like it, none).
fn same_encoding(stored: &Entry, sent: &HeaderMap) -> bool {
    let stored = stored
        .headers
        .iter()
        .filter(|(name, _)| name == "content-encoding")
        .map(|(_, value)| value.as_ref());
    let sent = sent
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .map(HeaderValue::as_bytes);
    stored.eq(sent)
}

/// Whether the representation has a content coding other than `identity`.
fn encoded(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|coding| {
            !coding
                .as_bytes()
                .trim_ascii()
                .eq_ignore_ascii_case(b"identity")
        })
}

/// One range: `206` with its `Content-Range` and length.
fn single(parts: &mut response::Parts, body: &Bytes, span: Span) -> Bytes {
    let len = body.len() as u64;
    parts.status = StatusCode::PARTIAL_CONTENT;
    set(
        &mut parts.headers,
        header::CONTENT_RANGE,
        &content_range(span, len),
    );
    let slice = body.slice(span.start as usize..span.end as usize);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(slice.len()));
    slice
}

/// Several ranges: `206` with a `multipart/byteranges` body, each part with the representation's
/// `Content-Type` and its own `Content-Range` (RFC 9110 section 14.6).
fn multipart(parts: &mut response::Parts, body: &Bytes, spans: &[Span]) -> Bytes {
    let len = body.len() as u64;
    let boundary = format!("corral-{:032x}", rand::random::<u128>());
    let content_type = parts.headers.remove(header::CONTENT_TYPE);
    let mut head = String::new();
    let mut out = BytesMut::new();
    for span in spans {
        head.clear();
        let _ = write!(head, "--{boundary}\r\n");
        if let Some(content_type) = content_type.as_ref().and_then(|v| v.to_str().ok()) {
            let _ = write!(head, "content-type: {content_type}\r\n");
        }
        let _ = write!(head, "content-range: {}\r\n\r\n", content_range(*span, len));
        out.extend_from_slice(head.as_bytes());
        out.extend_from_slice(&body[span.start as usize..span.end as usize]);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    parts.status = StatusCode::PARTIAL_CONTENT;
    set(
        &mut parts.headers,
        header::CONTENT_TYPE,
        &format!("multipart/byteranges; boundary={boundary}"),
    );
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(out.len()));
    out.freeze()
}

/// The headers a `416` keeps of the `200` it refuses to cut: when it was made and corral's own
/// (`X-Request-Id` is added after). The rest describes a representation the `416` does not carry.
const UNSATISFIABLE_KEEPS: [HeaderName; 5] = [
    header::DATE,
    header::AGE,
    header::ACCEPT_RANGES,
    HeaderName::from_static("x-cache"),
    HeaderName::from_static("cache-status"),
];

/// No range within the representation: a bodiless `416` saying how long it is.
fn unsatisfiable(parts: &mut response::Parts, len: u64) -> Bytes {
    let mut headers = HeaderMap::new();
    for name in &UNSATISFIABLE_KEEPS {
        for value in parts.headers.get_all(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    set(
        &mut headers,
        header::CONTENT_RANGE,
        &format!("bytes */{len}"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    parts.status = StatusCode::RANGE_NOT_SATISFIABLE;
    parts.headers = headers;
    Bytes::new()
}

fn content_range(span: Span, len: u64) -> String {
    format!("bytes {}-{}/{len}", span.start, span.end - 1)
}

/// Sets a header from text corral wrote (always a valid value).
fn set(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

// ---------------------------------------------------------------------------------------------
// Towards the upstream

/// Whether a request asks for ranges corral would cut: a GET with a `Range` it reads.
pub fn wanted(method: &Method, request: &HeaderMap) -> bool {
    *method == Method::GET && parse(request).is_some()
}

/// The range headers of a request to the upstream. A shared fetch asks for the whole
/// representation, whatever the route forwards: every client's ranges are cut from it. A client's
/// own fetch (`own`: nothing of it is stored) of a GET asks for the client's `Range`, with its
/// `If-Range`, and the upstream answers them.
pub fn forward(method: &Method, request: &HeaderMap, own: bool, upstream: &mut HeaderMap) {
    upstream.remove(header::RANGE);
    upstream.remove(header::IF_RANGE);
    if !own || *method != Method::GET || !request.contains_key(header::RANGE) {
        return;
    }
    for name in [header::RANGE, header::IF_RANGE] {
        for value in request.get_all(&name) {
            upstream.append(name.clone(), value.clone());
        }
    }
}

#[cfg(test)]
mod tests;
