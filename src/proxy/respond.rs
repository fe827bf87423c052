//! Building client responses: stored entries and pass-through streams, with `Age`, `X-Cache` and
//! `Cache-Status` (RFC 9211).

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

use crate::envelope::Entry;

/// Internal header a private entry carries to say why it was not shared; never sent to clients.
pub const DETAIL: &str = "x-corral-detail";
/// Internal header marking an answer whose body is too large to buffer and streams instead.
pub const OVERFLOW: &str = "x-corral-overflow";
/// Internal header of a vary marker: the entry at a primary key whose response varies on the
/// request headers it names (comma-separated), each variant stored under its own key. A marker is
/// never served itself.
pub const VARY_MARKER: &str = "x-corral-vary";
/// Internal header of a vary marker: its random id, part of each of its variants' keys.
pub const VARY_MARKER_ID: &str = "x-corral-vary-id";

/// What `X-Cache` says, for humans.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    Coalesced,
    /// A stored answer past its freshness (stale-while-revalidate, stale-if-error).
    Stale,
    Pass,
    Bypass,
}

impl Outcome {
    pub fn word(self) -> &'static str {
        match self {
            Outcome::Hit => "HIT",
            Outcome::Miss => "MISS",
            Outcome::Coalesced => "COALESCED",
            Outcome::Stale => "STALE",
            Outcome::Pass => "PASS",
            Outcome::Bypass => "BYPASS",
        }
    }
}

/// The `Cache-Status` value for an outcome; `stored` says whether the answer is now in the cache.
pub fn cache_status(outcome: Outcome, stored: bool, detail: Option<&str>) -> String {
    let mut value = String::from("corral");
    match outcome {
        Outcome::Hit => value.push_str("; hit"),
        Outcome::Miss => value.push_str("; fwd=miss"),
        Outcome::Coalesced => value.push_str("; fwd=miss; collapsed"),
        Outcome::Stale => value.push_str("; fwd=stale"),
        Outcome::Pass => value.push_str("; fwd=uri-miss"),
        Outcome::Bypass => value.push_str("; fwd=bypass"),
    }
    if stored {
        value.push_str("; stored");
    }
    if let Some(detail) = detail {
        value.push_str("; detail=");
        value.push_str(detail);
    }
    value
}

/// The entry's headers as a map, without corral's internal ones.
pub fn header_map(entry: &Entry) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(entry.headers.len());
    for (name, value) in &entry.headers {
        if [DETAIL, OVERFLOW, VARY_MARKER, VARY_MARKER_ID].contains(&name.as_str()) {
            continue;
        }
        // The value shares the entry's bytes rather than copying them.
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_maybe_shared(value.clone()),
        ) {
            headers.append(name, value);
        }
    }
    headers
}

/// An internal header's value, if the entry carries it.
pub fn internal(entry: &Entry, name: &str) -> Option<String> {
    entry
        .headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
}

/// A response from an entry.
pub fn from_entry(
    entry: &Entry,
    outcome: Outcome,
    stored: bool,
    detail: Option<&str>,
    age_secs: Option<u64>,
    head: bool,
) -> Response<Body> {
    let body = if head {
        Body::empty()
    } else {
        Body::from(entry.body.clone())
    };
    let status = StatusCode::from_u16(entry.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut headers = header_map(entry);
    if let Some(age) = age_secs {
        headers.insert(http::header::AGE, HeaderValue::from(age));
    }
    finish(status, headers, body, outcome, stored, detail)
}

/// A response with corral's headers added.
pub fn finish(
    status: StatusCode,
    mut headers: HeaderMap,
    body: Body,
    outcome: Outcome,
    stored: bool,
    detail: Option<&str>,
) -> Response<Body> {
    headers.insert("x-cache", HeaderValue::from_static(outcome.word()));
    let cache_status_value = match (outcome, stored, detail) {
        // The answers nearly every request gets, without building a string each time.
        (Outcome::Hit, false, None) => Some(HeaderValue::from_static("corral; hit")),
        (Outcome::Coalesced, false, None) => {
            Some(HeaderValue::from_static("corral; fwd=miss; collapsed"))
        }
        (Outcome::Miss, true, None) => Some(HeaderValue::from_static("corral; fwd=miss; stored")),
        _ => HeaderValue::from_str(&cache_status(outcome, stored, detail)).ok(),
    };
    if let Some(value) = cache_status_value {
        headers.insert("cache-status", value);
    }
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// A short plain-text answer of corral's own (errors).
pub fn plain(status: StatusCode, text: String, outcome: Outcome, detail: &str) -> Response<Body> {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    finish(
        status,
        headers,
        Body::from(Bytes::from(text)),
        outcome,
        false,
        Some(detail),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prebuilt_cache_status_values_say_what_cache_status_says() {
        for (outcome, stored) in [
            (Outcome::Hit, false),
            (Outcome::Coalesced, false),
            (Outcome::Miss, true),
        ] {
            let response = finish(
                StatusCode::OK,
                HeaderMap::new(),
                Body::empty(),
                outcome,
                stored,
                None,
            );
            assert_eq!(
                response.headers()["cache-status"],
                cache_status(outcome, stored, None).as_str()
            );
        }
    }

    #[test]
    fn cache_status_names_corral_and_what_happened() {
        assert_eq!(cache_status(Outcome::Hit, false, None), "corral; hit");
        assert_eq!(
            cache_status(Outcome::Miss, true, None),
            "corral; fwd=miss; stored"
        );
        assert_eq!(
            cache_status(Outcome::Coalesced, false, None),
            "corral; fwd=miss; collapsed"
        );
        assert_eq!(
            cache_status(Outcome::Stale, false, Some("stale-if-error")),
            "corral; fwd=stale; detail=stale-if-error"
        );
        assert_eq!(
            cache_status(Outcome::Bypass, false, Some("authorization")),
            "corral; fwd=bypass; detail=authorization"
        );
    }
}
