//! Content encoding at the two ends of a cached answer (see [`crate::http::encoding`]).
//!
//! - When stored ([`compressed`]): an identity answer worth compressing (by media type and size)
//!   is compressed once into each of the route's `encoding.compress.with` codings and stored with
//!   its identity bytes, as one [`Form::Represented`] entry. An answer the upstream encoded is
//!   stored as it came.
//! - When sent ([`represent`], from the response builder before preconditions are evaluated):
//!   each client gets the stored representation it accepts most, with `Content-Encoding`,
//!   `Vary: Accept-Encoding` and a weak `ETag` when the bytes are not the ones the upstream's tag
//!   named. Hits pay no compression and no decoding for any client that accepts identity or a
//!   stored coding.
//! - Last ([`deliver`]): an answer still in a coding the client does not accept (the upstream
//!   encoded it, or a pass-through fetched with corral's `Accept-Encoding`) is decoded as it
//!   streams, in bounded memory, and cut off past the route's `max_body` (a decompression bomb
//!   costs neither memory nor more than `max_body` of output).

use std::io;
use std::pin::Pin;
use std::sync::Arc;

use async_compression::tokio::bufread::{BrotliDecoder, GzipDecoder, ZlibDecoder, ZstdDecoder};
use axum::body::Body;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use hyper::body::Body as _;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::io::{ReaderStream, StreamReader};

use crate::config::Route;
use crate::envelope::{self, Entry, Form, Representation};
use crate::http::cache_control::CacheControl;
use crate::http::encoding::{
    AcceptEncoding, Coding, Encoded, compress, media_type_in, weaken_etag,
};
use crate::metrics::Metrics;

/// What each read of a decoder yields at most: the memory a decoding response holds, whatever
/// the ratio of its coding.
const DECODE_CHUNK: usize = 32 << 10;

const IDENTITY: &str = "identity";

// ---------------------------------------------------------------------------------------------
// When stored

/// `entry` as it is stored: with its compressed representations made now, when the route
/// compresses answers like it, or as it is.
pub(super) async fn compressed(route: &Route, entry: Entry, metrics: &Metrics) -> Entry {
    let compress = &route.policy.encoding.compress;
    if !worth_compressing(route, &entry) {
        return entry;
    }
    let codings = compress.with.clone();
    let identity = entry.body.clone();
    // CPU bound, up to `max_body`: off the request threads.
    let made = tokio::task::spawn_blocking(move || {
        codings
            .into_iter()
            .filter_map(|coding| Some((coding, compress_one(coding, &identity)?)))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    let mut representations: Vec<Representation> = Vec::with_capacity(made.len() + 1);
    for (coding, body) in made {
        metrics
            .compressions
            .with_label_values(&[&route.name, coding.as_str()])
            .inc();
        // Only what saves bytes is worth storing.
        if body.len() < entry.body.len() {
            representations.push(Representation {
                coding: coding.as_str().to_owned(),
                body: Bytes::from(body),
            });
        }
    }
    if representations.is_empty() {
        return entry;
    }
    representations.push(Representation {
        coding: IDENTITY.to_owned(),
        body: entry.body.clone(),
    });
    match envelope::pack(&representations) {
        Ok(body) => Entry {
            form: Form::Represented,
            body,
            ..entry
        },
        Err(_) => entry,
    }
}

fn compress_one(coding: Coding, body: &[u8]) -> Option<Vec<u8>> {
    compress(coding, body)
        .inspect_err(|error| tracing::warn!(%error, coding = coding.as_str(), "compression failed"))
        .ok()
}

/// Whether the route compresses `entry` when storing it: an identity answer with a body of at
/// least `min_size`, of a listed media type, that does not forbid transformation
/// (`Cache-Control: no-transform`, RFC 9111 section 5.2.2.6) and is not a partial answer.
/// `entry` with the body the upstream sent, for a client that gets it as it came (an answer
/// private to it): the identity representation of a [`Form::Represented`] entry. An entry whose
/// representations do not unpack stays as it is (its identity cannot be recovered).
pub(super) fn as_sent(entry: Entry) -> Entry {
    if entry.form != Form::Represented {
        return entry;
    }
    let identity = envelope::unpack(&entry.body)
        .ok()
        .and_then(|all| all.into_iter().find(|r| r.coding == IDENTITY));
    match identity {
        Some(identity) => Entry {
            form: Form::Answer,
            body: identity.body,
            ..entry
        },
        None => entry,
    }
}

fn worth_compressing(route: &Route, entry: &Entry) -> bool {
    let compress = &route.policy.encoding.compress;
    let header = |name: &'static str| values(entry, name);
    let mut headers = HeaderMap::new();
    for value in header("cache-control") {
        if let Ok(value) = HeaderValue::from_maybe_shared(value.clone()) {
            headers.append(header::CACHE_CONTROL, value);
        }
    }
    entry.form == Form::Answer
        && !compress.with.is_empty()
        && entry.body.len() as u64 >= compress.min_size.max(1)
        && entry.status != StatusCode::PARTIAL_CONTENT.as_u16()
        && header("content-encoding")
            .all(|value| value.trim_ascii().eq_ignore_ascii_case(b"identity"))
        && header("content-range").next().is_none()
        && header("content-type").any(|value| media_type_in(value, &compress.types))
        && !CacheControl::from_headers(&headers).has("no-transform")
}

/// The values of the entry's header `name`.
fn values<'e>(entry: &'e Entry, name: &'static str) -> impl Iterator<Item = &'e Bytes> {
    entry
        .headers
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, value)| value)
}

// ---------------------------------------------------------------------------------------------
// When sent

/// The representation of `entry` the client that sent `request` gets: for an entry stored in
/// several, the one it accepts most; for an answer the upstream encoded, itself, with a weak
/// `ETag` when [`deliver`] will decode it. 406 when the client accepts none of them, identity
/// included.
/// Either way the answer says it varies on `Accept-Encoding`. Other entries are left as they are.
pub(super) fn represent(entry: Arc<Entry>, request: &HeaderMap) -> Arc<Entry> {
    match entry.form {
        Form::Represented => Arc::new(chosen(&entry, request)),
        Form::Answer => {
            let encoded = encoded(&entry);
            if encoded == Encoded::Identity {
                // Nearly every answer: shared as it is, nothing copied.
                return entry;
            }
            let accept = AcceptEncoding::of(request);
            if !accept.takes(encoded) && !accept.takes(Encoded::Identity) {
                return Arc::new(not_acceptable(&entry));
            }
            let mut entry = Entry::clone(&entry);
            if !accept.takes(encoded) {
                weaken(&mut entry);
            }
            vary_on_encoding(&mut entry);
            Arc::new(entry)
        }
        Form::Marker => entry,
    }
}

fn chosen(entry: &Entry, request: &HeaderMap) -> Entry {
    // Checked when the entry was decoded: a body that does not unpack never gets here.
    let representations = envelope::unpack(&entry.body).unwrap_or_default();
    let codings: Vec<Option<Coding>> = representations
        .iter()
        .map(|representation| Coding::parse(&representation.coding))
        .collect();
    let Some(index) = AcceptEncoding::of(request).choose(&codings) else {
        return not_acceptable(entry);
    };
    let mut entry = Entry {
        form: Form::Answer,
        body: representations[index].body.clone(),
        ..entry.clone()
    };
    if let Some(coding) = codings[index] {
        entry.headers.push((
            "content-encoding".to_owned(),
            Bytes::from_static(coding.as_str().as_bytes()),
        ));
        weaken(&mut entry);
    }
    vary_on_encoding(&mut entry);
    entry
}

/// 406: the client refused identity (`identity;q=0`) and every coding the answer is stored in.
fn not_acceptable(entry: &Entry) -> Entry {
    let text = "corral: this answer is not available in an encoding the request accepts\n";
    let keep = ["vary", "cache-control", "date"];
    let mut headers: Vec<(String, Bytes)> = (entry.headers.iter())
        .filter(|(name, _)| keep.contains(&name.as_str()))
        .cloned()
        .collect();
    headers.push((
        "content-type".to_owned(),
        Bytes::from_static(b"text/plain; charset=utf-8"),
    ));
    let mut entry = Entry {
        status: StatusCode::NOT_ACCEPTABLE.as_u16(),
        headers,
        body: Bytes::from_static(text.as_bytes()),
        form: Form::Answer,
        ..entry.clone()
    };
    vary_on_encoding(&mut entry);
    entry
}

/// How an answer the upstream sent is encoded.
fn encoded(entry: &Entry) -> Encoded {
    let mut headers = HeaderMap::new();
    for (name, value) in &entry.headers {
        if name.eq_ignore_ascii_case("content-encoding")
            && let Ok(value) = HeaderValue::from_maybe_shared(value.clone())
        {
            headers.append(header::CONTENT_ENCODING, value);
        }
    }
    Encoded::of(&headers)
}

/// The entry's `ETag`, weakened: its bytes are another coding of those the tag named.
fn weaken(entry: &mut Entry) {
    for (name, value) in &mut entry.headers {
        if name.eq_ignore_ascii_case("etag")
            && let Ok(etag) = HeaderValue::from_maybe_shared(value.clone())
        {
            *value = Bytes::copy_from_slice(weaken_etag(&etag).as_bytes());
        }
    }
}

/// Adds `Accept-Encoding` to the entry's `Vary`, unless it already names it (or is `*`).
fn vary_on_encoding(entry: &mut Entry) {
    let named = entry
        .headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case("vary"))
        .flat_map(|(_, value)| value.split(|b| *b == b','))
        .any(|name| {
            let name = name.trim_ascii();
            name.eq_ignore_ascii_case(b"accept-encoding") || name == b"*"
        });
    if !named {
        entry
            .headers
            .push(("vary".to_owned(), Bytes::from_static(b"Accept-Encoding")));
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding for clients that do not accept the coding

/// `response`, decoded as it streams when it is in a coding the client does not accept and
/// corral can decode: without `Content-Encoding` and `Content-Length` (the decoded length is not
/// known before the end), with a weak `ETag`. A whole answer's decoded body is cut off past the
/// route's `max_body`, which ends the response in error rather than send a decompression bomb's
/// output; a pass-through streaming an answer too large to buffer is decoded without a cap (its
/// memory is bounded all the same). A partial answer (206) is left as it is.
pub(super) fn deliver(
    mut response: Response<Body>,
    request: &HeaderMap,
    route: &Route,
    metrics: &Metrics,
) -> Response<Body> {
    let headers = response.headers();
    let Encoded::With(coding) = Encoded::of(headers) else {
        return response;
    };
    if response.status() == StatusCode::PARTIAL_CONTENT
        || AcceptEncoding::of(request).takes(Encoded::With(coding))
    {
        return response;
    }
    let headers = response.headers_mut();
    headers.remove(header::CONTENT_ENCODING);
    headers.remove(header::CONTENT_LENGTH);
    if let Some(etag) = headers.get(header::ETAG) {
        let weak = weaken_etag(etag);
        headers.insert(header::ETAG, weak);
    }
    let names_encoding = headers.get_all(header::VARY).iter().any(|value| {
        value
            .as_bytes()
            .split(|b| *b == b',')
            .any(|name| name.trim_ascii().eq_ignore_ascii_case(b"accept-encoding"))
    });
    if !names_encoding {
        headers.append(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    }
    let body = std::mem::take(response.body_mut());
    if body.is_end_stream() {
        return response;
    }
    metrics
        .decompressions
        .with_label_values(&[&route.name, coding.as_str()])
        .inc();
    let cap = body.size_hint().exact().map(|_| route.policy.max_body);
    *response.body_mut() = decoded(body, coding, cap, route.name.clone());
    response
}

/// `body` decoded from `coding` as it streams, in reads of at most [`DECODE_CHUNK`], failing
/// once more than `cap` bytes came out.
pub(super) fn decoded(body: Body, coding: Coding, cap: Option<u64>, route: String) -> Body {
    let input = StreamReader::new(body.into_data_stream().map_err(io::Error::other));
    let decoder: Pin<Box<dyn AsyncRead + Send>> = match coding {
        Coding::Gzip => {
            let mut decoder = GzipDecoder::new(input);
            decoder.multiple_members(true);
            Box::pin(decoder)
        }
        Coding::Br => Box::pin(BrotliDecoder::new(input)),
        Coding::Zstd => Box::pin(ZstdDecoder::new(input)),
        Coding::Deflate => Box::pin(ZlibDecoder::new(input)),
    };
    // One byte past the cap is read, so that reaching it is told from going over it.
    let limited = decoder.take(cap.map_or(u64::MAX, |cap| cap.saturating_add(1)));
    let mut sent = 0u64;
    let stream = ReaderStream::with_capacity(limited, DECODE_CHUNK).map(move |chunk| {
        let chunk: Bytes = chunk.inspect_err(|error| {
            tracing::warn!(%route, %error, coding = coding.as_str(),
                "an answer could not be decoded for a client that does not accept its encoding");
        })?;
        sent += chunk.len() as u64;
        match cap {
            Some(cap) if sent > cap => {
                tracing::warn!(%route, cap, coding = coding.as_str(),
                    "an answer decoded past max_body for a client; cut off");
                Err(io::Error::other("the decoded answer exceeds max_body"))
            }
            _ => Ok(chunk),
        }
    });
    Body::from_stream(stream)
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    fn gzip(body: &[u8]) -> Bytes {
        Bytes::from(compress(Coding::Gzip, body).unwrap())
    }

    #[tokio::test]
    async fn every_coding_decodes_as_it_streams() {
        let text = "{\"n\": 12345, \"text\": \"hello\"} ".repeat(4000);
        for coding in Coding::ALL {
            let packed = Bytes::from(compress(coding, text.as_bytes()).unwrap());
            // Fed in small pieces, as an upstream body arrives.
            let pieces: Vec<Result<Bytes, io::Error>> = packed
                .chunks(100)
                .map(|piece| Ok(Bytes::copy_from_slice(piece)))
                .collect();
            let body = Body::from_stream(futures::stream::iter(pieces));
            let out = decoded(body, coding, None, "r".into()).collect().await;
            assert_eq!(out.unwrap().to_bytes(), text.as_bytes(), "{coding:?}");
        }
    }

    #[tokio::test]
    async fn a_decompression_bomb_is_cut_off_at_the_cap_in_small_reads() {
        let bomb = gzip(&vec![0u8; 8 << 20]);
        assert!(bomb.len() < 64 << 10);
        let mut body = decoded(Body::from(bomb), Coding::Gzip, Some(1 << 20), "r".into());
        let mut taken = 0usize;
        let mut failed = false;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    let data = frame.into_data().unwrap();
                    assert!(data.len() <= DECODE_CHUNK);
                    taken += data.len();
                }
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        assert!(failed, "the stream must end in error");
        assert!(taken <= 1 << 20, "{taken} bytes came out");
        // Exactly at the cap is fine.
        let exact = decoded(
            Body::from(gzip(&[7u8; 1000])),
            Coding::Gzip,
            Some(1000),
            "r".into(),
        );
        assert_eq!(exact.collect().await.unwrap().to_bytes().len(), 1000);
    }

    #[tokio::test]
    async fn bytes_that_are_not_the_coding_end_in_error() {
        let body = decoded(
            Body::from("not gzip at all"),
            Coding::Gzip,
            None,
            "r".into(),
        );
        assert!(body.collect().await.is_err());
    }

    fn stored(headers: &[(&str, &str)], body: Bytes, form: Form) -> Entry {
        Entry {
            status: 200,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), Bytes::copy_from_slice(v.as_bytes())))
                .collect(),
            body,
            stored_at_ms: 0,
            ttl: std::time::Duration::from_secs(60),
            stale: std::time::Duration::ZERO,
            stale_if_error: std::time::Duration::ZERO,
            fetch_time: std::time::Duration::ZERO,
            key: crate::key::KeyHash::from_bytes([1; 32]),
            form,
        }
    }

    fn request(accept: Option<&'static str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(accept) = accept {
            headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static(accept));
        }
        headers
    }

    fn header<'e>(entry: &'e Entry, name: &str) -> Vec<&'e [u8]> {
        entry
            .headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_ref())
            .collect()
    }

    #[tokio::test]
    async fn only_answers_worth_it_are_compressed_when_stored() {
        use crate::http::testing::route;
        let metrics = Metrics::new();
        let json = Bytes::from("{\"a\": [1, 2, 3]} ".repeat(200));
        let answer =
            |headers: &[(&str, &str)], body: &Bytes| stored(headers, body.clone(), Form::Answer);
        let typed = [("content-type", "application/json; charset=utf-8")];

        let made = compressed(&route(), answer(&typed, &json), &metrics).await;
        assert_eq!(made.form, Form::Represented);
        let codings: Vec<String> = envelope::unpack(&made.body)
            .unwrap()
            .into_iter()
            .map(|representation| representation.coding)
            .collect();
        assert_eq!(codings, ["br", "gzip", "identity"]);
        let counted = |coding: &str| {
            metrics
                .compressions
                .with_label_values(&["reports", coding])
                .get()
        };
        assert_eq!((counted("br"), counted("gzip")), (1, 1));

        let kept = [
            answer(&[("content-type", "image/png")], &json),
            answer(&typed, &Bytes::from_static(b"{}")),
            answer(&[typed[0], ("content-encoding", "gzip")], &json),
            answer(
                &[typed[0], ("cache-control", "public, no-transform")],
                &json,
            ),
            answer(&[], &json),
        ];
        for entry in kept {
            let back = compressed(&route(), entry.clone(), &metrics).await;
            assert_eq!(back, entry, "{:?}", entry.headers);
        }
        assert_eq!((counted("br"), counted("gzip")), (1, 1));
    }

    #[test]
    fn each_client_gets_the_stored_representation_it_accepts_most() {
        let representations = [
            Representation {
                coding: "br".into(),
                body: Bytes::from_static(b"BR"),
            },
            Representation {
                coding: "gzip".into(),
                body: Bytes::from_static(b"GZ"),
            },
            Representation {
                coding: IDENTITY.into(),
                body: Bytes::from_static(b"identity"),
            },
        ];
        let entry = stored(
            &[("etag", "\"v1\""), ("content-type", "application/json")],
            envelope::pack(&representations).unwrap(),
            Form::Represented,
        );
        let entry = Arc::new(entry);
        let br = represent(entry.clone(), &request(Some("gzip, deflate, br")));
        assert_eq!(br.body, "BR");
        assert_eq!(header(&br, "content-encoding"), [b"br"]);
        assert_eq!(header(&br, "etag"), [b"W/\"v1\""]);
        assert_eq!(header(&br, "vary"), [b"Accept-Encoding"]);
        assert_eq!(br.form, Form::Answer);

        let gz = represent(entry.clone(), &request(Some("gzip")));
        assert_eq!(gz.body, "GZ");

        for plain in [None, Some("identity"), Some("zstd")] {
            let identity = represent(entry.clone(), &request(plain));
            assert_eq!(identity.body, "identity", "{plain:?}");
            assert!(header(&identity, "content-encoding").is_empty());
            assert_eq!(
                header(&identity, "etag"),
                [b"\"v1\""],
                "the upstream's bytes"
            );
            assert_eq!(header(&identity, "vary"), [b"Accept-Encoding"]);
        }
        let refused = represent(entry, &request(Some("zstd, identity;q=0")));
        assert_eq!(refused.status, 406);
    }

    #[test]
    fn an_upstream_encoded_answer_is_served_as_is_with_a_weak_etag_for_decoding() {
        let entry = stored(
            &[
                ("etag", "\"g1\""),
                ("content-encoding", "gzip"),
                ("vary", "accept-encoding"),
            ],
            gzip(b"hello"),
            Form::Answer,
        );
        let entry = Arc::new(entry);
        let taken = represent(entry.clone(), &request(Some("gzip")));
        assert_eq!(header(&taken, "etag"), [b"\"g1\""]);
        assert_eq!(
            header(&taken, "vary"),
            [b"accept-encoding"],
            "no second Vary"
        );
        let decoded = represent(entry.clone(), &request(None));
        assert_eq!(header(&decoded, "etag"), [b"W/\"g1\""]);
        let refused = represent(entry, &request(Some("br, identity;q=0")));
        assert_eq!(refused.status, 406);
        let plain = Arc::new(stored(
            &[("etag", "\"p\"")],
            Bytes::from_static(b"x"),
            Form::Answer,
        ));
        assert!(Arc::ptr_eq(
            &represent(plain.clone(), &request(None)),
            &plain
        ));
    }
}
