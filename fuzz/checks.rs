//! The properties the fuzz targets check, as plain functions: the cargo-fuzz targets call them
//! under libFuzzer, and `tests/it/attacks/fuzz_corpus.rs` replays the committed corpus through them on stable
//! Rust. Each panics when a property breaks.
//!
//! Inputs are raw bytes, read by hand (no `arbitrary`), so the same files drive both.

// Each target uses one of these; the replay test uses them all.
#![allow(dead_code)]

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use corral::envelope::{self, Entry};
use corral::key::{KeyBuilder, KeyHash};

/// The origin config problems are reported against.
pub const CONFIG_ORIGIN: &str = "fuzz.yaml";

/// A little reader over fuzz input that yields zeros once the input runs out.
struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn u64(&mut self) -> u64 {
        (0..8).fold(0u64, |n, _| (n << 8) | u64::from(self.byte()))
    }

    /// Up to `max` bytes, the length taken from the next byte.
    fn chunk(&mut self, max: usize) -> &'a [u8] {
        let len = usize::from(self.byte()).min(max).min(self.data.len());
        let (chunk, rest) = self.data.split_at(len);
        self.data = rest;
        chunk
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

// ---------------------------------------------------------------- envelope ----

/// Decoding arbitrary bytes never panics; what decodes becomes a response's header map without a
/// panic, keeping every header that is valid HTTP, and re-encodes to an envelope that decodes to
/// the same entry, byte for byte the input when it was written by this version; and an entry
/// built from arbitrary fields round-trips through encode and decode.
pub fn envelope(data: &[u8]) {
    let bytes = Bytes::copy_from_slice(data);
    if let Ok(entry) = envelope::decode(bytes.clone()) {
        let valid = entry
            .headers
            .iter()
            .filter(|(name, value)| {
                http::HeaderName::from_bytes(name.as_bytes()).is_ok()
                    && http::HeaderValue::from_bytes(value).is_ok()
            })
            .count();
        assert_eq!(
            corral::proxy::header_map(&entry).len(),
            valid,
            "the response lost or invented headers"
        );
        let again = envelope::encode(&entry).expect("a decoded entry encodes");
        assert_eq!(
            envelope::decode(again.clone()).as_ref(),
            Ok(&entry),
            "re-encoded entry decodes differently"
        );
        if data.get(3) == Some(&envelope::VERSION) {
            assert_eq!(
                again, bytes,
                "re-encoding a current envelope changed its bytes"
            );
        }
        assert_eq!(
            envelope::decode_for(bytes, &entry.key).as_ref(),
            Ok(&entry),
            "decode_for refused the entry's own key"
        );
    }

    let mut input = Input { data };
    let mut key = [0u8; 32];
    key.iter_mut().for_each(|b| *b = input.byte());
    let status = u16::from_be_bytes([input.byte(), input.byte()]);
    let stored_at_ms = input.u64();
    let mut duration = || Duration::from_millis(input.u64());
    let (ttl, stale, stale_if_error, fetch_time) = (duration(), duration(), duration(), duration());
    let mut headers = Vec::new();
    for _ in 0..input.byte() % 8 {
        let name = String::from_utf8_lossy(input.chunk(64)).into_owned();
        headers.push((name, Bytes::copy_from_slice(input.chunk(255))));
    }
    let entry = Entry {
        status,
        headers,
        body: Bytes::copy_from_slice(input.data),
        stored_at_ms,
        ttl,
        stale,
        stale_if_error,
        fetch_time,
        key: KeyHash::from_bytes(key),
        form: envelope::Form::Answer,
    };
    let encoded = envelope::encode(&entry).expect("a small entry encodes");
    assert_eq!(
        envelope::decode_for(encoded, &entry.key),
        Ok(entry),
        "an entry did not survive encode and decode"
    );
}

// ---------------------------------------------------------------- keys ----

/// Canonical keys from arbitrary parts: never a panic; equal parts give equal keys; different
/// parts give different canonical bytes (the length prefixes make the encoding injective), and so
/// different digests.
pub fn key_parts(data: &[u8]) {
    let mut input = Input { data };
    let split = usize::from(input.byte() % 8);
    let mut parts: Vec<&[u8]> = Vec::new();
    while !input.is_empty() && parts.len() < 64 {
        parts.push(input.chunk(255));
    }
    let split = split.min(parts.len());
    let (a, b) = parts.split_at(split);
    let build = |parts: &[&[u8]]| {
        parts
            .iter()
            .fold(KeyBuilder::new(), |builder, part| builder.part(part))
            .finish()
    };
    let (key_a, key_b) = (build(a), build(b));
    assert_eq!(build(a), key_a, "the same parts built two keys");
    assert_eq!(
        a == b,
        key_a.canonical == key_b.canonical,
        "parts {a:?} and {b:?}: equality of parts and of canonical keys disagree"
    );
    assert_eq!(
        key_a.canonical == key_b.canonical,
        key_a.hash == key_b.hash,
        "canonical keys and digests disagree"
    );
}

/// A config whose routes key on every kind of request part.
fn key_config() -> &'static corral::config::Config {
    static CONFIG: OnceLock<corral::config::Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let text = "\
listen: 127.0.0.1:8080
admin: { listen: 127.0.0.1:8081 }
routes:
  - name: search
    match: { path: /search, methods: [POST] }
    upstream: http://127.0.0.1:9000
    key: { body: true, headers: [accept, x-tenant], cookies: [session] }
  - name: filtered
    match: { path_prefix: /filtered }
    upstream: http://127.0.0.1:9000
    key: { query: { include: [a, b] }, headers: [accept-language] }
  - name: rest
    match: { path_prefix: / }
    upstream: http://127.0.0.1:9000
    key: { query: all, cookies: [session, theme] }
";
        corral::config::parse_with_env(text, "key-fuzz.yaml", &|_| None)
            .expect("the key fuzz config is valid")
    })
}

/// A request made from arbitrary parts (method, target, headers, body): choosing its route,
/// building its key and explaining it never panic, and the same request always gets the same key.
pub fn request_key(data: &[u8]) {
    let mut input = Input { data };
    let method = match input.byte() % 4 {
        0 => http::Method::GET,
        1 => http::Method::HEAD,
        2 => http::Method::POST,
        _ => match http::Method::from_bytes(input.chunk(16)) {
            Ok(method) => method,
            Err(_) => return,
        },
    };
    let Ok(uri) = http::Uri::try_from(input.chunk(255)) else {
        return;
    };
    let mut headers = http::HeaderMap::new();
    for _ in 0..input.byte() % 8 {
        let name = input.chunk(32);
        let value = input.chunk(128);
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name),
            http::HeaderValue::from_bytes(value),
        ) {
            headers.append(name, value);
        }
    }
    let body = (input.byte() % 2 == 1).then_some(input.data);
    let config = key_config();
    let _ = corral::explain::explain(config, &method, &uri, &headers);
    let Some(index) = corral::proxy::route_for(config, &method, &uri, &headers) else {
        return;
    };
    let route = &config.routes[index];
    let first = corral::http::key::request_key(route, &method, &uri, &headers, body);
    let second = corral::http::key::request_key(route, &method, &uri, &headers, body);
    assert_eq!(first.key, second.key, "one request, two keys");
}

// ---------------------------------------------------------------- config ----

/// Config text of any shape: parsing never panics, and a refusal names at least one problem,
/// each placed in the file (line and column within the text), the way users see them.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let lines = yaml_lines(&text);
    match corral::config::parse_with_env(&text, CONFIG_ORIGIN, &|_| None) {
        Ok(_) => {}
        Err(error) => {
            assert!(!error.problems.is_empty(), "a refusal without a problem");
            for problem in &error.problems {
                assert_eq!(problem.file, CONFIG_ORIGIN, "{problem}");
                assert!(
                    problem.line >= 1 && problem.column >= 1,
                    "a problem without a place: {problem}"
                );
                assert!(
                    problem.line <= lines + 1,
                    "a problem placed past the end of the text ({lines} lines): {problem}"
                );
            }
        }
    }
}

/// Lines as YAML counts them: `\n`, `\r\n` and a lone `\r` each end one (editors agree).
fn yaml_lines(text: &str) -> usize {
    text.replace("\r\n", "\n").split(['\n', '\r']).count()
}
