//! Conditional requests evaluated against a cached answer (RFC 9110 section 13), with no I/O.
//!
//! A cache that holds the selected representation may answer a client's preconditions itself:
//! [`evaluate`] takes the request's method and headers and the stored answer's headers, and says
//! whether the full answer is sent, a `304 Not Modified`, or a `412 Precondition Failed`.
//!
//! The preconditions are evaluated in the order of RFC 9110 section 13.2.2:
//!
//! 1. `If-Match` (strong comparison, `*` matches): false → 412.
//! 2. Without `If-Match`, `If-Unmodified-Since` against the answer's `Last-Modified`: modified
//!    since → 412.
//! 3. `If-None-Match` (weak comparison, `*` matches): a match → 304.
//! 4. Without `If-None-Match`, `If-Modified-Since` against `Last-Modified`: not modified since →
//!    304.
//!
//! Then, for a GET with `Range`, [`if_range`] says whether its ranges may be sent (section
//! 13.1.5) or the whole answer ([`crate::http::range`] cuts the ranges).
//!
//! Read leniently, as the RFC asks of a recipient: a malformed entity-tag list, a date that is not
//! an HTTP-date, or a date header sent more than once makes that one condition absent, never a
//! `400`. A date condition is not evaluated when the answer has no valid `Last-Modified` (the
//! store's own time is not the origin's modification time). Only GET and HEAD are evaluated: the
//! answer to a body-keyed POST is not a representation of its target resource.

use std::time::{Duration, SystemTime};

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method};

/// What a request's preconditions say about a stored answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precondition {
    /// No condition applies, or every condition holds: send the answer.
    Proceed,
    /// The client's copy is current: `304 Not Modified`.
    NotModified,
    /// A state the client required does not hold: `412 Precondition Failed`.
    Failed,
}

/// The request's preconditions against the stored answer's headers (RFC 9110 section 13.2.2).
pub fn evaluate(method: &Method, request: &HeaderMap, stored: &HeaderMap) -> Precondition {
    if method != Method::GET && method != Method::HEAD {
        return Precondition::Proceed;
    }
    let etag = stored
        .get(header::ETAG)
        .and_then(|v| EntityTag::parse(v.as_bytes()));
    let last_modified = single_date(stored, &header::LAST_MODIFIED);
    let if_match = tags(request, &header::IF_MATCH);
    match &if_match {
        Some(tags) if !tags.matches(etag.as_ref(), EntityTag::strong_eq) => {
            return Precondition::Failed;
        }
        Some(_) => {}
        None => {
            if let (Some(since), Some(modified)) = (
                single_date(request, &header::IF_UNMODIFIED_SINCE),
                last_modified,
            ) && modified > since
            {
                return Precondition::Failed;
            }
        }
    }
    match tags(request, &header::IF_NONE_MATCH) {
        Some(tags) if tags.matches(etag.as_ref(), EntityTag::weak_eq) => Precondition::NotModified,
        Some(_) => Precondition::Proceed,
        None => match (
            single_date(request, &header::IF_MODIFIED_SINCE),
            last_modified,
        ) {
            (Some(since), Some(modified)) if modified <= since => Precondition::NotModified,
            _ => Precondition::Proceed,
        },
    }
}

/// How long before its `Date` a stored answer's `Last-Modified` must lie for a cache to take it
/// as a strong validator (RFC 9110 section 8.8.2.2): an answer changed twice within one second
/// could otherwise carry the same date for different bytes.
const STRONG_DATE_MARGIN: Duration = Duration::from_secs(60);

/// Whether a range request's `If-Range` lets its ranges be sent (RFC 9110 section 13.1.5): always
/// without one. An entity-tag must match the stored `ETag` by strong comparison (a weak tag never
/// does); an HTTP-date must equal the stored `Last-Modified` exactly, and that date must be a
/// strong validator: at least a minute before the stored `Date`. Anything else, a malformed or
/// repeated field included, means the representation may have changed: the whole answer is sent.
pub fn if_range(request: &HeaderMap, stored: &HeaderMap) -> bool {
    let mut values = request.get_all(header::IF_RANGE).iter();
    let value = match (values.next(), values.next()) {
        (None, _) => return true,
        (Some(value), None) => value.as_bytes().trim_ascii(),
        (Some(_), Some(_)) => return false,
    };
    if value.starts_with(b"\"") || value.starts_with(b"W/") {
        let etag = stored
            .get(header::ETAG)
            .and_then(|v| EntityTag::parse(v.as_bytes()));
        return match (EntityTag::parse(value), etag) {
            (Some(asked), Some(etag)) => asked.strong_eq(&etag),
            _ => false,
        };
    }
    let date = std::str::from_utf8(value)
        .ok()
        .and_then(|text| httpdate::parse_http_date(text).ok());
    match (
        date,
        single_date(stored, &header::LAST_MODIFIED),
        single_date(stored, &header::DATE),
    ) {
        (Some(date), Some(modified), Some(sent)) => {
            date == modified
                && sent
                    .duration_since(modified)
                    .is_ok_and(|before| before >= STRONG_DATE_MARGIN)
        }
        _ => false,
    }
}

/// An HTTP-date header sent once; absent when missing, repeated, or not an HTTP-date.
fn single_date(headers: &HeaderMap, name: &HeaderName) -> Option<SystemTime> {
    let mut values = headers.get_all(name).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return None;
    };
    httpdate::parse_http_date(value.to_str().ok()?.trim()).ok()
}

// ---------------------------------------------------------------------------------------------
// Entity-tags

/// One entity-tag (RFC 9110 section 8.8.3): its opaque part without the quotes, and whether it is
/// weak (`W/"..."`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntityTag {
    pub weak: bool,
    pub opaque: Vec<u8>,
}

impl EntityTag {
    /// One whole entity-tag (an `ETag` value), surrounding whitespace allowed; `None` when
    /// malformed.
    pub fn parse(text: &[u8]) -> Option<Self> {
        match Self::parse_prefix(text.trim_ascii())? {
            (tag, []) => Some(tag),
            _ => None,
        }
    }

    /// An entity-tag at the start of `text`, and what follows it.
    fn parse_prefix(text: &[u8]) -> Option<(Self, &[u8])> {
        let (weak, rest) = match text.strip_prefix(b"W/") {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let rest = rest.strip_prefix(b"\"")?;
        let end = rest.iter().position(|b| *b == b'"')?;
        let opaque = &rest[..end];
        // etagc: %x21 / %x23-7E / obs-text; no whitespace, no controls.
        if !opaque
            .iter()
            .all(|b| *b == 0x21 || *b >= 0x23 && *b != 0x7f)
        {
            return None;
        }
        let tag = Self {
            weak,
            opaque: opaque.to_vec(),
        };
        Some((tag, &rest[end + 1..]))
    }

    /// Strong comparison: neither is weak and the opaque parts are equal.
    pub fn strong_eq(&self, other: &Self) -> bool {
        !self.weak && !other.weak && self.opaque == other.opaque
    }

    /// Weak comparison: the opaque parts are equal, whether either is weak or not.
    pub fn weak_eq(&self, other: &Self) -> bool {
        self.opaque == other.opaque
    }
}

/// An `If-Match` or `If-None-Match` value: `*` or a list of entity-tags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tags {
    Any,
    List(Vec<EntityTag>),
}

impl Tags {
    /// Whether the answer, with `etag` if it has one, matches: `*` matches any current answer; a
    /// list matches when one of its tags compares equal to `etag`.
    fn matches(&self, etag: Option<&EntityTag>, eq: fn(&EntityTag, &EntityTag) -> bool) -> bool {
        match (self, etag) {
            (Tags::Any, _) => true,
            (Tags::List(list), Some(etag)) => list.iter().any(|tag| eq(tag, etag)),
            (Tags::List(_), None) => false,
        }
    }

    /// Parses one or more header values as one list (RFC 9110 section 5.3): `*` alone, or
    /// entity-tags separated by commas, with empty elements skipped. `None` when malformed.
    pub fn parse<'v>(values: impl IntoIterator<Item = &'v [u8]>) -> Option<Self> {
        let mut list = Vec::new();
        let mut any = false;
        for value in values {
            if value.trim_ascii() == b"*" {
                any = true;
                continue;
            }
            let mut rest = value.trim_ascii();
            while !rest.is_empty() {
                if let Some(after) = rest.strip_prefix(b",") {
                    rest = after.trim_ascii_start();
                    continue;
                }
                let (tag, after) = EntityTag::parse_prefix(rest)?;
                list.push(tag);
                rest = after.trim_ascii_start();
                // Tags are separated by commas; anything else after one is malformed.
                if !rest.is_empty() && !rest.starts_with(b",") {
                    return None;
                }
            }
        }
        match (any, list.is_empty()) {
            (true, true) => Some(Tags::Any),
            // `*` mixed with tags is neither form.
            (true, false) => None,
            (false, true) => None,
            (false, false) => Some(Tags::List(list)),
        }
    }
}

/// The `name` header's tags; `None` when absent or malformed (the condition is then ignored).
fn tags(headers: &HeaderMap, name: &HeaderName) -> Option<Tags> {
    let values = headers.get_all(name);
    values.iter().next()?;
    Tags::parse(values.iter().map(HeaderValue::as_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(weak: bool, opaque: &str) -> EntityTag {
        EntityTag {
            weak,
            opaque: opaque.as_bytes().to_vec(),
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn parse(values: &[&str]) -> Option<Tags> {
        Tags::parse(values.iter().map(|v| v.as_bytes()))
    }

    #[test]
    fn entity_tags_parse_strong_weak_and_commas_inside_quotes() {
        assert_eq!(EntityTag::parse(b"\"xyzzy\""), Some(tag(false, "xyzzy")));
        assert_eq!(EntityTag::parse(b" W/\"xyzzy\" "), Some(tag(true, "xyzzy")));
        assert_eq!(EntityTag::parse(b"\"\""), Some(tag(false, "")));
        assert_eq!(
            parse(&["\"a,b\", W/\"c\""]),
            Some(Tags::List(vec![tag(false, "a,b"), tag(true, "c")]))
        );
        assert_eq!(
            parse(&["\"a\"", " , \"b\""]),
            Some(Tags::List(vec![tag(false, "a"), tag(false, "b")]))
        );
        assert_eq!(parse(&[" * "]), Some(Tags::Any));
    }

    #[test]
    fn malformed_entity_tags_are_refused() {
        for bad in [
            "xyzzy",
            "\"open",
            "w/\"lowercase-weak\"",
            "\"a\" \"b\"",
            "\"a\"b",
            "\"has space\"",
            "*, \"a\"",
            "",
            ",",
        ] {
            assert_eq!(parse(&[bad]), None, "{bad:?}");
        }
        assert_eq!(parse(&["*", "\"a\""]), None);
        assert_eq!(EntityTag::parse(b"\"a\", \"b\""), None);
    }

    #[test]
    fn strong_comparison_needs_both_strong_and_weak_only_the_opaque_part() {
        // The table of RFC 9110 section 8.8.3.2.
        let cases = [
            (tag(true, "1"), tag(true, "1"), false, true),
            (tag(true, "1"), tag(true, "2"), false, false),
            (tag(true, "1"), tag(false, "1"), false, true),
            (tag(false, "1"), tag(false, "1"), true, true),
        ];
        for (a, b, strong, weak) in cases {
            assert_eq!(a.strong_eq(&b), strong, "{a:?} {b:?}");
            assert_eq!(a.weak_eq(&b), weak, "{a:?} {b:?}");
        }
    }

    const LAST_MODIFIED: &str = "Tue, 01 Dec 2026 10:00:00 GMT";
    const BEFORE: &str = "Tue, 01 Dec 2026 09:59:59 GMT";
    const AFTER: &str = "Tue, 01 Dec 2026 10:00:01 GMT";

    fn stored() -> HeaderMap {
        headers(&[("etag", "\"v1\""), ("last-modified", LAST_MODIFIED)])
    }

    fn on_get(request: &[(&str, &str)]) -> Precondition {
        evaluate(&Method::GET, &headers(request), &stored())
    }

    #[test]
    fn if_none_match_is_a_weak_match_against_the_etag() {
        use Precondition::*;
        assert_eq!(on_get(&[]), Proceed);
        assert_eq!(on_get(&[("if-none-match", "\"v1\"")]), NotModified);
        assert_eq!(on_get(&[("if-none-match", "W/\"v1\"")]), NotModified);
        assert_eq!(on_get(&[("if-none-match", "\"v0\", \"v1\"")]), NotModified);
        assert_eq!(on_get(&[("if-none-match", "*")]), NotModified);
        assert_eq!(on_get(&[("if-none-match", "\"v2\"")]), Proceed);
        assert_eq!(on_get(&[("if-none-match", "v1")]), Proceed, "malformed");
        let no_etag = headers(&[]);
        let request = headers(&[("if-none-match", "\"v1\"")]);
        assert_eq!(evaluate(&Method::GET, &request, &no_etag), Proceed);
        assert_eq!(evaluate(&Method::HEAD, &request, &stored()), NotModified);
        assert_eq!(evaluate(&Method::POST, &request, &stored()), Proceed);
    }

    #[test]
    fn if_modified_since_counts_only_without_if_none_match_and_with_a_last_modified() {
        use Precondition::*;
        assert_eq!(on_get(&[("if-modified-since", LAST_MODIFIED)]), NotModified);
        assert_eq!(on_get(&[("if-modified-since", AFTER)]), NotModified);
        assert_eq!(on_get(&[("if-modified-since", BEFORE)]), Proceed);
        assert_eq!(on_get(&[("if-modified-since", "yesterday")]), Proceed);
        assert_eq!(
            on_get(&[("if-modified-since", AFTER), ("if-modified-since", AFTER)]),
            Proceed,
            "sent twice"
        );
        assert_eq!(
            on_get(&[("if-none-match", "\"v2\""), ("if-modified-since", AFTER)]),
            Proceed
        );
        let undated = headers(&[("etag", "\"v1\"")]);
        let request = headers(&[("if-modified-since", AFTER)]);
        assert_eq!(evaluate(&Method::GET, &request, &undated), Proceed);
    }

    #[test]
    fn if_match_is_a_strong_match_and_fails_with_412() {
        use Precondition::*;
        assert_eq!(on_get(&[("if-match", "\"v1\"")]), Proceed);
        assert_eq!(on_get(&[("if-match", "\"v0\", \"v1\"")]), Proceed);
        assert_eq!(on_get(&[("if-match", "*")]), Proceed);
        assert_eq!(on_get(&[("if-match", "\"v2\"")]), Failed);
        assert_eq!(on_get(&[("if-match", "W/\"v1\"")]), Failed);
        assert_eq!(on_get(&[("if-match", "garbage")]), Proceed, "malformed");
        let weak = headers(&[("etag", "W/\"v1\"")]);
        let request = headers(&[("if-match", "\"v1\"")]);
        assert_eq!(evaluate(&Method::GET, &request, &weak), Failed);
        // If-Match is evaluated before If-None-Match.
        assert_eq!(
            on_get(&[("if-match", "\"v2\""), ("if-none-match", "\"v1\"")]),
            Failed
        );
    }

    #[test]
    fn if_unmodified_since_fails_when_modified_later_unless_if_match_is_sent() {
        use Precondition::*;
        assert_eq!(on_get(&[("if-unmodified-since", BEFORE)]), Failed);
        assert_eq!(on_get(&[("if-unmodified-since", LAST_MODIFIED)]), Proceed);
        assert_eq!(on_get(&[("if-unmodified-since", "soon")]), Proceed);
        assert_eq!(
            on_get(&[("if-match", "\"v1\""), ("if-unmodified-since", BEFORE)]),
            Proceed
        );
    }
    #[test]
    fn if_range_holds_for_a_strong_etag_match_or_the_exact_strong_last_modified() {
        // Stored a week after it was last modified: its date is a strong validator.
        let stored = headers(&[
            ("etag", "\"v1\""),
            ("last-modified", LAST_MODIFIED),
            ("date", "Tue, 08 Dec 2026 10:00:00 GMT"),
        ]);
        let holds = |pairs: &[(&str, &str)]| if_range(&headers(pairs), &stored);
        assert!(holds(&[]), "no If-Range: the ranges are sent");
        assert!(holds(&[("if-range", "\"v1\"")]));
        assert!(holds(&[("if-range", LAST_MODIFIED)]));
        assert!(!holds(&[("if-range", "\"v2\"")]), "changed");
        assert!(
            !holds(&[("if-range", "W/\"v1\"")]),
            "a weak tag never matches"
        );
        assert!(!holds(&[("if-range", AFTER)]), "only the exact date");
        assert!(!holds(&[("if-range", BEFORE)]));
        assert!(!holds(&[("if-range", "v1")]), "malformed");
        assert!(!holds(&[("if-range", "\"v1\""), ("if-range", "\"v1\"")]));

        let weak = headers(&[("etag", "W/\"v1\"")]);
        assert!(!if_range(&headers(&[("if-range", "W/\"v1\"")]), &weak));
        assert!(!if_range(&headers(&[("if-range", "\"v1\"")]), &weak));
    }

    #[test]
    fn a_last_modified_within_a_minute_of_its_date_is_weak_for_if_range() {
        let request = headers(&[("if-range", LAST_MODIFIED)]);
        for (date, strong) in [
            ("Tue, 01 Dec 2026 10:00:59 GMT", false),
            ("Tue, 01 Dec 2026 10:01:00 GMT", true),
        ] {
            let stored = headers(&[("last-modified", LAST_MODIFIED), ("date", date)]);
            assert_eq!(if_range(&request, &stored), strong, "{date}");
        }
        let undated = headers(&[("last-modified", LAST_MODIFIED)]);
        assert!(!if_range(&request, &undated), "no Date: cannot tell");
    }
}
