//! The ids a request and a fetch go by: the client's `X-Request-Id` (or one made for it), and the
//! id of the fetch whose answer it got, which the access log names.

use http::{HeaderMap, HeaderName, HeaderValue};

/// The request id header: accepted from the client when sane, else generated; returned to the
/// client, and sent upstream by its pass-throughs. A fetch whose answer may be shared sends its
/// own id instead (see [`FETCH_ID`]).
pub(super) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Where an answer keeps the id of the fetch that produced it, from the fetch to every request it
/// answers (on any replica, from the store or the L1): the access log names it, and the upstream
/// got it as `X-Request-Id`. A fetch answers many clients, so it never sends one client's id: an
/// upstream that echoes it into a shared body (an error page) would show it to everyone.
/// Removed from every response before it is sent ([`super::respond::finish`]), and from every
/// upstream answer as it arrives, so that only corral sets it.
///
/// When traces are on and the fetch's span is sampled, its `traceparent` follows the id after a
/// space (`<id> 00-<trace>-<span>-01`), so every request the answer reaches links to that span:
/// riding in the header that is already kept, read and removed, it costs nothing when traces
/// are off (see [`crate::telemetry`]).
pub(super) const FETCH_ID: HeaderName = HeaderName::from_static("corral-fetch-id");

/// The client's request id if it is short visible ASCII, else a fresh random one.
pub(super) fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(REQUEST_ID)
        .filter(|v| {
            let bytes = v.as_bytes();
            !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(u8::is_ascii_graphic)
        })
        .cloned()
        .unwrap_or_else(random_id)
}

/// 128 random bits as 32 hex digits, written in place: this runs for most requests.
pub(super) fn random_id() -> HeaderValue {
    let mut hex = [0u8; 32];
    hex::encode_to_slice(rand::random::<u128>().to_be_bytes(), &mut hex)
        .expect("16 bytes are 32 hex digits");
    HeaderValue::from_bytes(&hex).expect("hex is a valid header value")
}
