//! What the micro-benchmarks work on: a route, a request and a response shaped like real traffic,
//! shared so that the criterion benches and the instruction counts (`benches/instructions.rs`)
//! measure the same thing.
//!
//! Each bench uses only some of these, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::time::Duration;

use bytes::Bytes;
use corral::config::Route;
use corral::envelope::Entry;
use corral::key::{KeyBuilder, KeyHash};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};

/// A route keyed the way a public API usually is: some query parameters (tracking ones left out),
/// content negotiation headers and one cookie; `Cache-Control` honoured.
const CONFIG: &str = "\
store: { kind: memory }
routes:
  - name: catalogue
    match: { path_prefix: /catalogue }
    upstream: http://127.0.0.1:9000
    key:
      query: { include: [q, page, per_page, sort, lang] }
      headers: [accept, accept-language]
      cookies: [locale]
";

/// The route of [`CONFIG`], as the proxy would see it after validation.
pub fn route() -> Route {
    let mut config = corral::config::parse(CONFIG, "bench.yaml").expect("a valid config");
    config.routes.remove(0)
}

/// The whole config of [`CONFIG`], its route sending misses to `upstream` (`http://host:port`).
pub fn config(upstream: &str) -> corral::config::Config {
    let text = CONFIG.replace("http://127.0.0.1:9000", upstream);
    corral::config::parse(&text, "bench.yaml").expect("a valid config")
}

pub fn method() -> Method {
    Method::GET
}

/// A search with paging, sorting and two tracking parameters the key leaves out.
pub fn uri() -> Uri {
    Uri::from_static(
        "/catalogue/items?utm_source=newsletter&q=blue%20widgets&sort=-price&page=3&per_page=50\
         &lang=en&utm_campaign=autumn",
    )
}

/// What a browser sends: a dozen headers, only some of them keyed, and a keyed cookie.
pub fn request_headers() -> HeaderMap {
    headers(&[
        ("host", "shop.example.com"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        ),
        ("accept", "application/json, text/plain;q=0.9, */*;q=0.8"),
        ("accept-language", "en-GB,en;q=0.7,fr;q=0.3"),
        ("accept-encoding", "gzip, deflate, br, zstd"),
        ("referer", "https://shop.example.com/catalogue"),
        ("cookie", "locale=en-GB"),
        ("x-forwarded-for", "203.0.113.7"),
        ("x-request-id", "f81d4fae-7dec-11d0-a765-00a0c91e6bf6"),
        ("sec-fetch-mode", "cors"),
        ("connection", "keep-alive"),
    ])
}

/// What an origin answers for [`uri`]: shareable for five minutes, varying only on keyed headers.
pub fn response_headers() -> HeaderMap {
    headers(&[
        ("content-type", "application/json; charset=utf-8"),
        ("content-length", "1024"),
        ("cache-control", "public, max-age=300, s-maxage=600"),
        ("date", "Wed, 25 Nov 2026 12:00:00 GMT"),
        ("age", "12"),
        ("etag", "\"33a64df551425fcc55e4d42a148795d9f25f89d4\""),
        ("last-modified", "Wed, 25 Nov 2026 11:00:00 GMT"),
        ("vary", "Accept, Accept-Language"),
        ("server", "origin/1.0"),
    ])
}

pub fn status() -> StatusCode {
    StatusCode::OK
}

/// A stored 1 KiB answer under `key`, with the headers of [`response_headers`].
pub fn entry(key: KeyHash) -> Entry {
    Entry {
        status: 200,
        headers: response_headers()
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    Bytes::copy_from_slice(value.as_bytes()),
                )
            })
            .collect(),
        body: Bytes::from(vec![0x5a; 1024]),
        stored_at_ms: 1_700_000_000_000,
        ttl: Duration::from_secs(300),
        stale: Duration::ZERO,
        stale_if_error: Duration::ZERO,
        fetch_time: Duration::ZERO,
        key,
        form: corral::envelope::Form::Answer,
    }
}

/// The `n`th of a sequence of distinct keys.
pub fn nth_key(n: u64) -> KeyHash {
    KeyBuilder::new().part(n.to_be_bytes()).finish().hash
}

fn headers(lines: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in lines {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).expect("a header name"),
            HeaderValue::from_str(value).expect("a header value"),
        );
    }
    map
}
