//! The response builder: the one place an answer, a refusal or an error becomes a status, headers,
//! `Age`, `X-Cache` and `Cache-Status` (RFC 9211), together with the [`Outcome`] the metrics and
//! the access log count it under.

use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, header};
use http_body_util::BodyExt;

use super::ids::FETCH_ID;
use super::upstream::Overflow;
use crate::engine::{
    Answer, AnswerSource, Attachment, EngineError, FailureCause, OnStoreError, Source,
};
use crate::envelope::Entry;
use crate::http::conditional::{self, Precondition};
use crate::http::verdict::first_age;
use crate::key::KeyHash;

/// How a request was answered: what `X-Cache` says, and the metrics label.
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
    /// The `X-Cache` word.
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

    /// The metrics label and the access log's `outcome`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Coalesced => "coalesced",
            Outcome::Stale => "stale",
            Outcome::Pass => "pass",
            Outcome::Bypass => "bypass",
        }
    }
}

/// A response for the client, with how it was answered.
pub(super) struct Answered {
    pub response: Response<Body>,
    pub outcome: Outcome,
    /// The key the request was answered under, when it was keyed (for the access log).
    pub key: Option<KeyHash>,
    /// The id of the upstream fetch whose answer this is, when it came from one (for the access
    /// log; see [`FETCH_ID`]).
    pub fetch_id: Option<HeaderValue>,
    /// How long this request's own upstream request took to its response head (for the access
    /// log).
    pub upstream: Option<Duration>,
}

impl Answered {
    /// What the request metrics count it under: `error` for a 5xx answer, whatever its outcome
    /// (an upstream error shared with every waiter is still an error to its clients).
    pub fn label(&self) -> &'static str {
        if self.response.status().is_server_error() {
            "error"
        } else {
            self.outcome.as_str()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// From the engine's answers and errors

/// The response for an answer the engine gave to a request with this method and these headers.
pub(super) fn answer(answer: Answer, method: &Method, request: &HeaderMap) -> Answered {
    let head = method == Method::HEAD;
    let Answer {
        entry,
        source,
        attachment,
    } = answer;
    match source {
        AnswerSource::Shared(source) => {
            let (outcome, stored, age) = match source {
                Source::L1 | Source::Store => (Outcome::Hit, false, Some(age(&entry))),
                Source::Built => (Outcome::Miss, true, Some(age(&entry))),
                Source::Coalesced => (Outcome::Coalesced, false, Some(age(&entry))),
                Source::Degraded => (Outcome::Miss, false, None),
                Source::StaleRevalidating | Source::StaleOnError => {
                    (Outcome::Stale, false, Some(age(&entry)))
                }
            };
            let detail = match source {
                Source::Degraded => Some("store-unavailable"),
                Source::StaleRevalidating => Some("stale-while-revalidate"),
                Source::StaleOnError => Some("stale-if-error"),
                _ => None,
            };
            let answered = from_entry(&entry, outcome, stored, detail, age, head);
            preconditioned(answered, method, request)
        }
        AnswerSource::Own { reason } => match attachment.and_then(Attachment::take::<Overflow>) {
            Some(overflow) => streamed(overflow, reason, head),
            None => from_entry(&entry, Outcome::Pass, false, reason, None, head),
        },
    }
}

/// The response for a request the engine gave no answer, but for a wait timeout on a route that
/// then goes to the upstream itself (the handler's to do).
pub(super) fn failure(
    error: EngineError,
    on_store_error: OnStoreError,
    method: &Method,
    request: &HeaderMap,
) -> Answered {
    let head = method == Method::HEAD;
    match error {
        EngineError::Build(failure) => match &failure.response {
            Some(entry) => from_entry(
                entry,
                Outcome::Miss,
                false,
                Some(super::upstream::failure_detail(&failure.message)),
                None,
                head,
            ),
            None if failure.cause == FailureCause::Overran => plain(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "corral: the upstream did not answer in time: {}\n",
                    failure.message
                ),
                Outcome::Miss,
                "max-fetch",
            ),
            None => plain(
                StatusCode::BAD_GATEWAY,
                format!("corral: {}\n", failure.message),
                Outcome::Miss,
                "upstream-error",
            ),
        },
        EngineError::Timeout(waited) => plain(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "corral: no answer from the upstream within the wait timeout ({})\n",
                humantime::format_duration(waited)
            ),
            Outcome::Coalesced,
            "wait-timeout",
        ),
        EngineError::Closed => plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "corral: shutting down\n".into(),
            Outcome::Bypass,
            "shutting-down",
        ),
        EngineError::TooManyFollowers { stale } => match stale {
            Some(entry) => {
                let answered = from_entry(
                    &entry,
                    Outcome::Stale,
                    false,
                    Some("max-followers"),
                    Some(age(&entry)),
                    head,
                );
                preconditioned(answered, method, request)
            }
            None => busy(
                "corral: too many requests are waiting for this answer\n",
                "max-followers",
            ),
        },
        // `on_store_error: closed`: the route will not fetch without the store; the client may
        // try again shortly (the store's breaker probes it at least once a second).
        EngineError::Store(error) if on_store_error == OnStoreError::Closed => {
            let mut answered = plain(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "corral: the cache store is unavailable, and this route does not fetch \
                     without it: {error}\n"
                ),
                Outcome::Miss,
                "store-unavailable-closed",
            );
            retry_after(&mut answered);
            answered
        }
        error => plain(
            StatusCode::BAD_GATEWAY,
            format!("corral: {error}\n"),
            Outcome::Miss,
            "store-error",
        ),
    }
}

/// A private answer too large to buffer: its head, what was read, and the rest as it streams.
fn streamed(overflow: Overflow, detail: Option<&str>, head: bool) -> Answered {
    let body = if head {
        Body::empty()
    } else {
        let prefix = overflow.prefix;
        let stream =
            futures::stream::once(async move { Ok::<_, super::upstream::ReadError>(prefix) })
                .chain(overflow.rest.into_data_stream());
        Body::from_stream(stream)
    };
    finish(
        overflow.status,
        overflow.headers,
        body,
        Outcome::Pass,
        false,
        detail,
    )
}

/// The headers a `304` keeps of the `200` it stands for (RFC 9110 section 15.4.5), and corral's
/// own; `X-Request-Id` is added after. The rest is representation metadata, which a `304` should
/// not carry and the client already has.
const NOT_MODIFIED_KEEPS: [HeaderName; 9] = [
    header::CACHE_CONTROL,
    header::CONTENT_LOCATION,
    header::DATE,
    header::ETAG,
    header::EXPIRES,
    header::VARY,
    header::AGE,
    HeaderName::from_static("x-cache"),
    HeaderName::from_static("cache-status"),
];

/// A shared answer as the client's preconditions make it (RFC 9110 section 13): itself, or a
/// bodiless `304` or `412` with its validators and corral's headers. Only a `200` is evaluated: a
/// cached `404` is not the representation an entity-tag names. Its outcome stays what it was, so
/// the metrics and `Cache-Status` say how the answer was found; the status says what was sent.
fn preconditioned(answered: Answered, method: &Method, request: &HeaderMap) -> Answered {
    if answered.response.status() != StatusCode::OK {
        return answered;
    }
    let status = match conditional::evaluate(method, request, answered.response.headers()) {
        Precondition::Proceed => return answered,
        Precondition::NotModified => StatusCode::NOT_MODIFIED,
        Precondition::Failed => StatusCode::PRECONDITION_FAILED,
    };
    let (parts, _body) = answered.response.into_parts();
    let mut headers = HeaderMap::new();
    for name in &NOT_MODIFIED_KEEPS {
        for value in parts.headers.get_all(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    // Without an entity-tag, the date is what a client's cache revalidates with next time.
    if !headers.contains_key(header::ETAG)
        && let Some(modified) = parts.headers.get(header::LAST_MODIFIED)
    {
        headers.insert(header::LAST_MODIFIED, modified.clone());
    }
    let mut response = Response::new(Body::empty());
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Answered {
        response,
        ..answered
    }
}

/// The entry's age (RFC 9111 section 4.2.3): its age when stored, plus the seconds since, by the
/// wall clock.
pub(super) fn age(entry: &Entry) -> u64 {
    // The age it had when stored (the upstream's, corrected at the fetch), plus its time here.
    let initial = first_age(
        entry
            .headers
            .iter()
            .filter(|(name, _)| name == "age")
            .map(|(_, value)| value.as_ref()),
    )
    .map_or(0, |age| age.as_secs());
    let resident = crate::engine::unix_ms().saturating_sub(entry.stored_at_ms) / 1000;
    initial.saturating_add(resident)
}

// ---------------------------------------------------------------------------------------------
// Building responses

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

/// The entry's headers as a map.
/// The entry's headers as a response's. Never panics: a decoded entry holds at most
/// [`MAX_HEADERS`](crate::envelope::MAX_HEADERS), far below what a `HeaderMap` takes, and an entry
/// built another way that passes the map's limit keeps the headers that fit.
pub fn header_map(entry: &Entry) -> HeaderMap {
    let capacity = entry.headers.len().min(crate::envelope::MAX_HEADERS);
    let mut headers = HeaderMap::try_with_capacity(capacity).unwrap_or_default();
    for (name, value) in &entry.headers {
        // The value shares the entry's bytes rather than copying them.
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_maybe_shared(value.clone()),
        ) && headers.try_append(name, value).is_err()
        {
            tracing::warn!(
                count = entry.headers.len(),
                "an entry has more headers than a response can hold; the rest are dropped"
            );
            break;
        }
    }
    headers
}

/// A response from an entry.
pub(super) fn from_entry(
    entry: &Entry,
    outcome: Outcome,
    stored: bool,
    detail: Option<&str>,
    age_secs: Option<u64>,
    head: bool,
) -> Answered {
    let body = if head {
        Body::empty()
    } else {
        Body::from(entry.body.clone())
    };
    let status = StatusCode::from_u16(entry.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut headers = header_map(entry);
    // A HEAD gets the length the GET's body has (RFC 9110 section 8.6), not the empty body's.
    if head && !status.is_informational() && status != StatusCode::NO_CONTENT {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(entry.body.len()));
    }
    if let Some(age) = age_secs {
        headers.insert(header::AGE, HeaderValue::from(age));
    }
    finish(status, headers, body, outcome, stored, detail)
}

/// A response with corral's headers added.
pub(super) fn finish(
    status: StatusCode,
    mut headers: HeaderMap,
    body: Body,
    outcome: Outcome,
    stored: bool,
    detail: Option<&str>,
) -> Answered {
    // Kept with the answer for the log, never sent: every response leaves through here.
    let fetch_id = headers.remove(FETCH_ID);
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
    Answered {
        response,
        outcome,
        key: None,
        fetch_id,
        upstream: None,
    }
}

/// A short plain-text answer of corral's own (errors).
pub(super) fn plain(status: StatusCode, text: String, outcome: Outcome, detail: &str) -> Answered {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
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

/// 503 with `Retry-After`: a limit of this replica refused the request; another try, here or on
/// another replica, may succeed.
pub(super) fn busy(text: &'static str, detail: &str) -> Answered {
    let mut answered = plain(
        StatusCode::SERVICE_UNAVAILABLE,
        text.into(),
        Outcome::Bypass,
        detail,
    );
    retry_after(&mut answered);
    answered
}

/// 413: the request body grew past the listener's `max_request_body` while it streamed.
pub(super) fn body_too_large() -> Answered {
    plain(
        StatusCode::PAYLOAD_TOO_LARGE,
        "corral: the request body is too large\n".into(),
        Outcome::Bypass,
        "request-too-large",
    )
}

/// 400: the client's request body broke off (bad chunked framing, fewer bytes than declared).
pub(super) fn broken_body() -> Answered {
    plain(
        StatusCode::BAD_REQUEST,
        "corral: the request body broke off\n".into(),
        Outcome::Bypass,
        "request-body",
    )
}

fn retry_after(answered: &mut Answered) {
    answered
        .response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
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
            let answered = finish(
                StatusCode::OK,
                HeaderMap::new(),
                Body::empty(),
                outcome,
                stored,
                None,
            );
            assert_eq!(
                answered.response.headers()["cache-status"],
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

    fn stored_answer(status: StatusCode, pairs: &[(&'static str, &'static str)]) -> Answered {
        let mut headers = request(pairs);
        headers.insert(header::AGE, HeaderValue::from(7));
        let body = Body::from("the representation");
        finish(status, headers, body, Outcome::Hit, false, None)
    }

    /// Headers from static pairs (a request's, or a stored answer's).
    fn request(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        headers
    }

    #[tokio::test]
    async fn a_304_keeps_the_validators_and_corrals_headers_and_drops_the_representation() {
        let answer = stored_answer(
            StatusCode::OK,
            &[
                ("etag", "\"v1\""),
                ("last-modified", "Tue, 01 Dec 2026 10:00:00 GMT"),
                ("cache-control", "max-age=60"),
                ("vary", "accept"),
                ("content-type", "text/plain"),
                ("content-length", "18"),
                ("x-upstream", "kept out"),
            ],
        );
        let conditional = request(&[("if-none-match", "W/\"v1\"")]);
        let answered = preconditioned(answer, &Method::GET, &conditional);
        assert_eq!(answered.response.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(answered.outcome, Outcome::Hit);
        let mut names: Vec<&str> = answered
            .response
            .headers()
            .keys()
            .map(HeaderName::as_str)
            .collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "age",
                "cache-control",
                "cache-status",
                "etag",
                "vary",
                "x-cache"
            ]
        );
        let body = answered.response.into_body().collect().await.unwrap();
        assert!(body.to_bytes().is_empty());
    }

    #[test]
    fn a_304_without_an_etag_keeps_last_modified_and_only_a_200_is_evaluated() {
        let since = request(&[("if-modified-since", "Tue, 01 Dec 2026 10:00:00 GMT")]);
        let dated = [("last-modified", "Tue, 01 Dec 2026 10:00:00 GMT")];
        let answered = preconditioned(stored_answer(StatusCode::OK, &dated), &Method::GET, &since);
        assert_eq!(answered.response.status(), StatusCode::NOT_MODIFIED);
        assert!(answered.response.headers().contains_key("last-modified"));

        let missing = stored_answer(StatusCode::NOT_FOUND, &dated);
        let answered = preconditioned(missing, &Method::GET, &since);
        assert_eq!(answered.response.status(), StatusCode::NOT_FOUND);
        let failed = request(&[("if-match", "\"other\"")]);
        let answered = preconditioned(stored_answer(StatusCode::OK, &[]), &Method::GET, &failed);
        assert_eq!(answered.response.status(), StatusCode::PRECONDITION_FAILED);
    }

    #[test]
    fn a_5xx_answer_counts_as_an_error_whatever_its_outcome() {
        let shared_error = plain(
            StatusCode::BAD_GATEWAY,
            String::new(),
            Outcome::Miss,
            "upstream-error",
        );
        assert_eq!(shared_error.label(), "error");
        let refused = plain(StatusCode::NOT_FOUND, String::new(), Outcome::Bypass, "x");
        assert_eq!(refused.label(), "bypass");
    }
}
