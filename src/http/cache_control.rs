//! `Cache-Control` and the other comma-separated header lists, read leniently as caches must.

use std::time::Duration;

use http::HeaderMap;
use http::header::{self, HeaderName};

/// RFC 9111 delta-seconds: ASCII digits only; too large saturates rather than failing.
pub(crate) fn delta_seconds(text: &str) -> Option<Duration> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(Duration::from_secs(text.parse().unwrap_or(u64::MAX)))
}

/// The trimmed, non-empty, lowercased elements of every `name` header's comma-separated list.
pub(crate) fn comma_list<'h>(
    headers: &'h HeaderMap,
    name: &HeaderName,
) -> impl Iterator<Item = Vec<u8>> + 'h {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|item| item.trim_ascii().to_ascii_lowercase())
        .filter(|item| !item.is_empty())
}

// ---------------------------------------------------------------------------------------------
// Cache-Control

/// The targeted field for CDNs (RFC 9213), which corral, a shared cache in front of an origin,
/// reads: it is kept on answers to clients, as RFC 9213 asks of a field that targets more than
/// one cache.
pub const CDN_CACHE_CONTROL: HeaderName = HeaderName::from_static("cdn-cache-control");

/// The targeted field for corral alone (RFC 9213 section 2.1's pattern), read before
/// `CDN-Cache-Control`, and removed from every answer to a client.
pub const CORRAL_CACHE_CONTROL: HeaderName = HeaderName::from_static("corral-cache-control");

/// The directives of every `Cache-Control` header of a message, in order.
///
/// Lenient, as caches must be: names are case-insensitive; directives are comma-separated, each a
/// token with an optional `=value`, the value a token or a quoted string (which may hold commas and
/// backslash escapes); empty list elements and stray whitespace are skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheControl {
    /// Lowercase names with their unquoted values.
    directives: Vec<(String, Option<String>)>,
}

impl CacheControl {
    /// Combines every `Cache-Control` header in `headers`.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        Self::from_field(headers, &header::CACHE_CONTROL)
    }

    /// Combines every `name` header in `headers`: `Cache-Control`, or a targeted field with
    /// its syntax ([`CDN_CACHE_CONTROL`], [`CORRAL_CACHE_CONTROL`]).
    pub fn from_field(headers: &HeaderMap, name: &HeaderName) -> Self {
        let mut cc = Self::default();
        for value in headers.get_all(name) {
            cc.add(&String::from_utf8_lossy(value.as_bytes()));
        }
        cc
    }

    /// Whether no directive was read.
    pub fn is_empty(&self) -> bool {
        self.directives.is_empty()
    }

    /// Parses one header value.
    pub fn parse(text: &str) -> Self {
        let mut cc = Self::default();
        cc.add(text);
        cc
    }

    /// Whether the directive is present, with or without a value.
    pub fn has(&self, name: &str) -> bool {
        self.directives.iter().any(|(n, _)| n == name)
    }

    /// The value of the first occurrence of `name` that has one.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.directives
            .iter()
            .filter(|(n, _)| n == name)
            .find_map(|(_, v)| v.as_deref())
    }

    /// A delta-seconds directive (`max-age`, `s-maxage`). Invalid values are ignored; when the
    /// message repeats it, the smallest valid value wins (the cautious reading of a contradiction).
    pub fn seconds(&self, name: &str) -> Option<Duration> {
        self.directives
            .iter()
            .filter(|(n, _)| n == name)
            .filter_map(|(_, v)| delta_seconds(v.as_deref()?))
            .min()
    }

    fn add(&mut self, text: &str) {
        let mut chars = text.chars().peekable();
        loop {
            while chars.next_if(|c| *c == ',' || c.is_whitespace()).is_some() {}
            if chars.peek().is_none() {
                break;
            }
            let mut name = String::new();
            while let Some(c) = chars.next_if(|c| *c != '=' && *c != ',') {
                name.push(c);
            }
            let mut value = None;
            if chars.next_if_eq(&'=').is_some() {
                while chars.next_if(|c| *c == ' ' || *c == '\t').is_some() {}
                let mut text = String::new();
                if chars.next_if_eq(&'"').is_some() {
                    while let Some(c) = chars.next() {
                        match c {
                            '"' => break,
                            '\\' => text.extend(chars.next()),
                            c => text.push(c),
                        }
                    }
                    // Anything between the closing quote and the next comma is junk.
                    while chars.next_if(|c| *c != ',').is_some() {}
                } else {
                    while let Some(c) = chars.next_if(|c| *c != ',') {
                        text.push(c);
                    }
                    text = text.trim().to_owned();
                }
                value = Some(text);
            }
            let name = name.trim().to_ascii_lowercase();
            if !name.is_empty() {
                self.directives.push((name, value));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::testing::headers;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn cache_control_parses_tokens_and_values() {
        let cc = CacheControl::parse("Public, MAX-AGE=60,, s-maxage = 30 ,no-transform");
        assert!(cc.has("public"));
        assert!(cc.has("no-transform"));
        assert_eq!(cc.value("max-age"), Some("60"));
        assert_eq!(cc.seconds("s-maxage"), Some(secs(30)));
        assert!(!cc.has("private"));
    }

    #[test]
    fn cache_control_quoted_values_may_hold_commas_and_escapes() {
        let cc = CacheControl::parse(r#"private="set-cookie, x-a", no-cache="a\"b", max-age=5"#);
        assert_eq!(cc.value("private"), Some("set-cookie, x-a"));
        assert_eq!(cc.value("no-cache"), Some("a\"b"));
        assert_eq!(cc.seconds("max-age"), Some(secs(5)));
        assert!(!cc.has("x-a"), "a quoted comma does not start a directive");
    }

    #[test]
    fn cache_control_survives_junk() {
        for junk in [
            "",
            ",",
            " , ,",
            "=",
            "=5",
            "max-age=\"",
            "\"",
            "a=\"b",
            "\u{1F600}",
        ] {
            let cc = CacheControl::parse(junk);
            assert_eq!(cc.seconds("max-age"), None, "{junk:?}");
        }
        let cc = CacheControl::parse("max-age=\"60\"junk, private");
        assert_eq!(cc.seconds("max-age"), Some(secs(60)));
        assert!(cc.has("private"));
    }

    #[test]
    fn cache_control_combines_headers() {
        let cc = CacheControl::from_headers(&headers(&[
            ("cache-control", "public"),
            ("cache-control", "max-age=9"),
        ]));
        assert!(cc.has("public"));
        assert_eq!(cc.seconds("max-age"), Some(secs(9)));
    }

    #[test]
    fn delta_seconds_is_strict_digits_and_saturates() {
        assert_eq!(delta_seconds("0"), Some(Duration::ZERO));
        assert_eq!(delta_seconds("120"), Some(secs(120)));
        assert_eq!(
            delta_seconds("99999999999999999999999"),
            Some(secs(u64::MAX))
        );
        for bad in ["", "+5", "-5", "5s", "1.5", " 5"] {
            assert_eq!(delta_seconds(bad), None, "{bad:?}");
        }
    }

    // -----------------------------------------------------------------------------------------
    // Hop-by-hop
}
