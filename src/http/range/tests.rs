use super::*;

use http::Response;

use crate::envelope::Form;
use crate::key::KeyHash;

fn from(first: u64, last: u64) -> Spec {
    Spec::From {
        first,
        last: Some(last),
    }
}

fn open(first: u64) -> Spec {
    Spec::From { first, last: None }
}

fn span(start: u64, end: u64) -> Span {
    Span { start, end }
}

fn parsed(value: &str) -> Option<Vec<Spec>> {
    parse_value(value.as_bytes())
}

// ----- parsing

#[test]
fn the_three_forms_of_a_byte_range_parse() {
    assert_eq!(parsed("bytes=0-499"), Some(vec![from(0, 499)]));
    assert_eq!(parsed("bytes=9500-"), Some(vec![open(9500)]));
    assert_eq!(parsed("bytes=-500"), Some(vec![Spec::Suffix(500)]));
    assert_eq!(
        parsed("bytes=0-0,-1"),
        Some(vec![from(0, 0), Spec::Suffix(1)])
    );
    assert_eq!(parsed("bytes=-0"), Some(vec![Spec::Suffix(0)]));
}

#[test]
fn the_unit_is_case_insensitive_and_the_list_takes_whitespace_and_empty_elements() {
    assert_eq!(parsed("Bytes=1-2"), Some(vec![from(1, 2)]));
    assert_eq!(parsed("BYTES=1-2"), Some(vec![from(1, 2)]));
    assert_eq!(
        parsed("bytes=500-600 , 601-999,\t-5"),
        Some(vec![from(500, 600), from(601, 999), Spec::Suffix(5)])
    );
    assert_eq!(
        parsed("bytes=,1-2,,3-4,"),
        Some(vec![from(1, 2), from(3, 4)])
    );
}

#[test]
fn a_range_that_does_not_match_the_grammar_makes_the_whole_field_ignored() {
    for bad in [
        "",
        "bytes",
        "bytes=",
        "bytes=,",
        "bytes=-",
        "bytes=a-b",
        "bytes=1-b",
        "bytes=+1-2",
        "bytes=1 - 2",
        "bytes=1-2-3",
        "bytes=0x10-0x20",
        "bytes=5-4",
        "bytes=0-1,5-4",
        "bytes=--1",
        "bytes =0-1",
        "items=0-1",
        "pages=1-2",
        "0-499",
    ] {
        assert_eq!(parsed(bad), None, "{bad:?}");
    }
}

#[test]
fn numbers_past_u64_saturate_rather_than_fail() {
    assert_eq!(
        parsed("bytes=99999999999999999999999-"),
        Some(vec![open(u64::MAX)])
    );
    assert_eq!(
        parsed("bytes=0-99999999999999999999999"),
        Some(vec![from(0, u64::MAX)])
    );
    assert_eq!(
        select(&[from(0, u64::MAX)], 10),
        Selection::Parts(vec![span(0, 10)])
    );
}

#[test]
fn a_range_field_sent_twice_is_ignored() {
    let mut headers = HeaderMap::new();
    headers.append(header::RANGE, HeaderValue::from_static("bytes=0-1"));
    assert_eq!(parse(&headers), Some(vec![from(0, 1)]));
    headers.append(header::RANGE, HeaderValue::from_static("bytes=2-3"));
    assert_eq!(parse(&headers), None);
    assert_eq!(parse(&HeaderMap::new()), None);
}

// ----- selecting

#[test]
fn ranges_are_clamped_to_the_representation_and_suffixes_count_from_its_end() {
    let len = 10;
    assert_eq!(
        select(&[from(2, 4)], len),
        Selection::Parts(vec![span(2, 5)])
    );
    assert_eq!(
        select(&[from(8, 100)], len),
        Selection::Parts(vec![span(8, 10)])
    );
    assert_eq!(select(&[open(7)], len), Selection::Parts(vec![span(7, 10)]));
    assert_eq!(
        select(&[Spec::Suffix(3)], len),
        Selection::Parts(vec![span(7, 10)])
    );
    assert_eq!(
        select(&[Spec::Suffix(50)], len),
        Selection::Parts(vec![span(0, 10)]),
        "a suffix longer than the representation is all of it"
    );
}

#[test]
fn nothing_within_the_representation_is_unsatisfiable_but_one_range_within_is_enough() {
    assert_eq!(select(&[from(10, 20)], 10), Selection::Unsatisfiable);
    assert_eq!(select(&[open(10)], 10), Selection::Unsatisfiable);
    assert_eq!(select(&[Spec::Suffix(0)], 10), Selection::Unsatisfiable);
    assert_eq!(
        select(&[from(10, 20), from(0, 0)], 10),
        Selection::Parts(vec![span(0, 1)])
    );
}

#[test]
fn overlapping_and_adjacent_ranges_coalesce_and_parts_keep_the_order_asked() {
    // Out of order: the parts come as asked.
    assert_eq!(
        select(&[from(50, 59), from(0, 9)], 100),
        Selection::Parts(vec![span(50, 60), span(0, 10)])
    );
    // 0-9 and 10-19 touch; 5-12 overlaps both: one part, where the first of them was asked.
    assert_eq!(
        select(&[from(40, 49), from(10, 19), from(0, 9), from(5, 12)], 100),
        Selection::Parts(vec![span(40, 50), span(0, 20)])
    );
    // A suffix that covers an earlier range swallows it.
    assert_eq!(
        select(&[from(95, 96), Spec::Suffix(10)], 100),
        Selection::Parts(vec![span(90, 100)])
    );
    // A gap of one byte keeps two parts.
    assert_eq!(
        select(&[from(0, 9), from(11, 19)], 100),
        Selection::Parts(vec![span(0, 10), span(11, 20)])
    );
}

#[test]
fn too_many_ranges_or_an_empty_representation_are_sent_whole() {
    let many: Vec<Spec> = (0..=MAX_RANGES as u64)
        .map(|i| from(i * 2, i * 2))
        .collect();
    assert_eq!(select(&many, 1000), Selection::Whole);
    assert!(matches!(
        select(&many[..MAX_RANGES], 1000),
        Selection::Parts(parts) if parts.len() == MAX_RANGES
    ));
    assert_eq!(select(&[Spec::Suffix(5)], 0), Selection::Whole);
    assert_eq!(select(&[from(0, 0)], 0), Selection::Whole);
}

// ----- answering

const BODY: &[u8] = b"0123456789abcdefghij";

fn entry(headers: &[(&str, &str)]) -> Entry {
    Entry {
        status: 200,
        headers: headers
            .iter()
            .map(|(n, v)| (n.to_string(), Bytes::copy_from_slice(v.as_bytes())))
            .collect(),
        body: Bytes::from_static(BODY),
        stored_at_ms: 0,
        ttl: std::time::Duration::from_secs(60),
        stale: std::time::Duration::ZERO,
        stale_if_error: std::time::Duration::ZERO,
        fetch_time: std::time::Duration::ZERO,
        key: KeyHash::from_bytes([0; 32]),
        form: Form::Answer,
    }
}

/// The parts of a `200` carrying `stored`'s headers.
fn parts_of(stored: &Entry) -> response::Parts {
    let mut response = Response::new(());
    for (name, value) in &stored.headers {
        response.headers_mut().append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_maybe_shared(value.clone()).unwrap(),
        );
    }
    response.into_parts().0
}

fn request(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in pairs {
        headers.append(*name, HeaderValue::from_static(value));
    }
    headers
}

/// What a GET with these request headers gets from `stored`, sending its bytes as they are.
fn get(stored: &Entry, pairs: &[(&'static str, &'static str)]) -> (response::Parts, Option<Bytes>) {
    let mut parts = parts_of(stored);
    let len = Some(stored.body.len() as u64);
    let body = answer(&Method::GET, &request(pairs), &mut parts, stored, len, true);
    (parts, body)
}

#[test]
fn one_range_is_a_206_with_its_content_range_and_length() {
    let stored = entry(&[("content-type", "text/plain"), ("etag", "\"v1\"")]);
    let (parts, body) = get(&stored, &[("range", "bytes=2-5")]);
    assert_eq!(parts.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(body.as_deref(), Some(&b"2345"[..]));
    assert_eq!(parts.headers["content-range"], "bytes 2-5/20");
    assert_eq!(parts.headers["content-length"], "4");
    assert_eq!(parts.headers["content-type"], "text/plain");
    assert_eq!(parts.headers["etag"], "\"v1\"");
    assert_eq!(parts.headers["accept-ranges"], "bytes");

    let (parts, body) = get(&stored, &[("range", "bytes=-3")]);
    assert_eq!(body.as_deref(), Some(&b"hij"[..]));
    assert_eq!(parts.headers["content-range"], "bytes 17-19/20");
}

#[test]
fn several_ranges_are_one_multipart_answer_with_a_part_each() {
    let stored = entry(&[("content-type", "text/plain")]);
    let (parts, body) = get(&stored, &[("range", "bytes=10-11, 0-1")]);
    assert_eq!(parts.status, StatusCode::PARTIAL_CONTENT);
    let content_type = parts.headers["content-type"].to_str().unwrap();
    let boundary = content_type
        .strip_prefix("multipart/byteranges; boundary=")
        .expect(content_type);
    let body = body.unwrap();
    let expected = format!(
        "--{boundary}\r\ncontent-type: text/plain\r\ncontent-range: bytes 10-11/20\r\n\r\nab\r\n\
         --{boundary}\r\ncontent-type: text/plain\r\ncontent-range: bytes 0-1/20\r\n\r\n01\r\n\
         --{boundary}--\r\n"
    );
    assert_eq!(String::from_utf8_lossy(&body), expected);
    assert_eq!(parts.headers["content-length"], body.len().to_string());
    assert!(parts.headers.get("content-range").is_none());
}

#[test]
fn no_range_within_it_is_a_bodiless_416_with_the_length() {
    let stored = entry(&[("content-type", "text/plain"), ("etag", "\"v1\"")]);
    let (parts, body) = get(&stored, &[("range", "bytes=20-")]);
    assert_eq!(parts.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(body.as_deref(), Some(&b""[..]));
    assert_eq!(parts.headers["content-range"], "bytes */20");
    assert_eq!(parts.headers["content-length"], "0");
    assert!(parts.headers.get("content-type").is_none());
}

#[test]
fn if_range_that_does_not_hold_or_a_range_ignored_sends_the_whole_answer() {
    let stored = entry(&[("etag", "\"v1\"")]);
    for pairs in [
        &[("range", "bytes=0-1"), ("if-range", "\"v2\"")][..],
        &[("range", "bytes=0-1"), ("if-range", "W/\"v1\"")],
        &[("range", "bytes=1-0")],
        &[("range", "lines=1-2")],
        &[],
    ] {
        let (parts, body) = get(&stored, pairs);
        assert_eq!(parts.status, StatusCode::OK, "{pairs:?}");
        assert_eq!(body, None, "{pairs:?}");
        assert_eq!(parts.headers["accept-ranges"], "bytes");
    }
    let (parts, _) = get(&stored, &[("range", "bytes=0-1"), ("if-range", "\"v1\"")]);
    assert_eq!(parts.status, StatusCode::PARTIAL_CONTENT);
}

#[test]
fn only_a_get_of_a_200_sending_the_stored_bytes_is_ranged() {
    let stored = entry(&[("content-encoding", "gzip")]);
    let ranged = request(&[("range", "bytes=0-1")]);
    let len = Some(BODY.len() as u64);

    // A HEAD learns that it could range, and gets no range.
    let mut parts = parts_of(&stored);
    assert_eq!(
        answer(&Method::HEAD, &ranged, &mut parts, &stored, None, true),
        None
    );
    assert_eq!(parts.headers["accept-ranges"], "bytes");
    // A POST's answer is not a representation of its target.
    let mut parts = parts_of(&stored);
    assert_eq!(
        answer(&Method::POST, &ranged, &mut parts, &stored, len, true),
        None
    );
    assert!(parts.headers.get("accept-ranges").is_none());
    // A cached 404 is sent as it is.
    let mut parts = parts_of(&stored);
    parts.status = StatusCode::NOT_FOUND;
    assert_eq!(
        answer(&Method::GET, &ranged, &mut parts, &stored, len, true),
        None
    );
    // Decoded on the way out: another encoding, and a length not known in advance.
    let mut parts = parts_of(&stored);
    parts.headers.remove(header::CONTENT_ENCODING);
    assert_eq!(
        answer(&Method::GET, &ranged, &mut parts, &stored, None, true),
        None
    );
    assert!(parts.headers.get("accept-ranges").is_none());
    let mut parts = parts_of(&stored);
    assert_eq!(
        answer(&Method::GET, &ranged, &mut parts, &stored, Some(3), true),
        None
    );
    // The stored gzip bytes, as they are: one range of them; several are sent whole.
    let mut parts = parts_of(&stored);
    let body = answer(&Method::GET, &ranged, &mut parts, &stored, len, true);
    assert_eq!(body.as_deref(), Some(&b"01"[..]));
    assert_eq!(parts.headers["content-encoding"], "gzip");
    let several = request(&[("range", "bytes=0-1,5-6")]);
    let mut parts = parts_of(&stored);
    assert_eq!(
        answer(&Method::GET, &several, &mut parts, &stored, len, true),
        None
    );
    // A client's own answer is cut but not advertised.
    let mut parts = parts_of(&stored);
    assert!(answer(&Method::GET, &ranged, &mut parts, &stored, len, false).is_some());
    assert!(parts.headers.get("accept-ranges").is_none());
}

// ----- towards the upstream

#[test]
fn only_a_clients_own_fetch_of_a_get_carries_its_range_upstream() {
    let client = request(&[("range", "bytes=0-1"), ("if-range", "\"v1\"")]);
    let forwarded = || {
        request(&[
            ("range", "bytes=5-"),
            ("if-range", "\"x\""),
            ("via", "1.1 corral"),
        ])
    };

    let mut shared = forwarded();
    forward(&Method::GET, &client, false, &mut shared);
    assert!(shared.get("range").is_none() && shared.get("if-range").is_none());
    assert!(shared.contains_key("via"));

    let mut own = forwarded();
    forward(&Method::GET, &client, true, &mut own);
    assert_eq!(own["range"], "bytes=0-1");
    assert_eq!(own["if-range"], "\"v1\"");

    let mut head = forwarded();
    forward(&Method::HEAD, &client, true, &mut head);
    assert!(head.get("range").is_none());
    assert!(wanted(&Method::GET, &client));
    assert!(!wanted(&Method::HEAD, &client));
    assert!(!wanted(&Method::GET, &request(&[("range", "bytes=x")])));
}
