//! Content encoding, which corral owns on cached routes (RFC 9110 sections 8.4 and 12.5.3).
//!
//! A cacheable fetch asks the upstream for the codings corral can decode, never for the client's,
//! so one stored answer serves every client whatever its `Accept-Encoding` (which is never part of
//! the key, and never splits an answer into variants). An identity answer worth compressing is
//! compressed once, when it is stored, into each coding the route names; an answer the upstream
//! encoded is stored as it came. Each client then gets the stored representation it accepts most,
//! or a decoded one (see [`crate::proxy`]).
//!
//! This module holds what needs no I/O: the codings, what a client's `Accept-Encoding` accepts,
//! which representation answers it, the entity-tag of a representation whose bytes are not the
//! ones the upstream's tag named, which answers are worth compressing, and the compressors.

use std::io::Write;

use http::header::{self, HeaderMap, HeaderValue};

/// A content coding corral can decode, and make.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Coding {
    Gzip,
    Br,
    Zstd,
    /// HTTP's `deflate`: a zlib stream (RFC 9110 section 8.4.1.2).
    Deflate,
}

impl Coding {
    /// Every coding, in the order of the names [`Coding::parse`] documents.
    pub const ALL: [Coding; 4] = [Coding::Gzip, Coding::Br, Coding::Zstd, Coding::Deflate];

    /// The coding's token, as `Content-Encoding` and `Accept-Encoding` write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Br => "br",
            Coding::Zstd => "zstd",
            Coding::Deflate => "deflate",
        }
    }

    /// A coding token, case-insensitively (`x-gzip` is `gzip`, RFC 9110 section 8.4.1.3).
    pub fn parse(token: &str) -> Option<Coding> {
        let token = token.trim();
        Coding::ALL
            .into_iter()
            .find(|coding| token.eq_ignore_ascii_case(coding.as_str()))
            .or_else(|| token.eq_ignore_ascii_case("x-gzip").then_some(Coding::Gzip))
    }
}

/// What a response's `Content-Encoding` says its bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoded {
    /// No coding (no field, or `identity`).
    Identity,
    /// One coding corral can decode.
    With(Coding),
    /// Several codings, or one corral cannot decode: served only as it is.
    Other,
}

impl Encoded {
    /// How a response with these headers is encoded.
    pub fn of(headers: &HeaderMap) -> Encoded {
        let mut codings = headers
            .get_all(header::CONTENT_ENCODING)
            .iter()
            .flat_map(|value| value.as_bytes().split(|b| *b == b','))
            .filter_map(|token| std::str::from_utf8(token).ok())
            .map(str::trim)
            .filter(|token| !token.is_empty() && !token.eq_ignore_ascii_case("identity"));
        match (codings.next(), codings.next()) {
            (None, _) => Encoded::Identity,
            (Some(token), None) => Coding::parse(token).map_or(Encoded::Other, Encoded::With),
            (Some(_), Some(_)) => Encoded::Other,
        }
    }
}

/// The most a quality value can be: `q=1`, in thousandths.
const FULL: u16 = 1000;

/// What a client's `Accept-Encoding` accepts (RFC 9110 section 12.5.3).
///
/// Without the field, only identity is taken to be acceptable: the RFC lets a server send any
/// coding then, but clients that send no `Accept-Encoding` (scripts, `curl` without
/// `--compressed`) rarely decode one, and nginx and Varnish answer them in identity too.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AcceptEncoding {
    /// Whether the request had the field at all.
    present: bool,
    /// Each element's lowercase coding (or `*`) and its quality in thousandths, as written.
    entries: Vec<(String, u16)>,
}

impl AcceptEncoding {
    /// The request's `Accept-Encoding`, every line of it. An element whose quality does not
    /// parse is left out (as if not written), never a reason to refuse the request.
    pub fn of(headers: &HeaderMap) -> AcceptEncoding {
        let mut accept = AcceptEncoding::default();
        for value in headers.get_all(header::ACCEPT_ENCODING) {
            accept.present = true;
            let Ok(text) = value.to_str() else { continue };
            for element in text.split(',') {
                let mut parts = element.split(';');
                let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
                if coding.is_empty() {
                    continue;
                }
                let mut quality = Some(FULL);
                for parameter in parts {
                    let Some((name, value)) = parameter.split_once('=') else {
                        continue;
                    };
                    if name.trim().eq_ignore_ascii_case("q") {
                        quality = qvalue(value.trim());
                    }
                }
                if let Some(quality) = quality {
                    accept.entries.push((coding, quality));
                }
            }
        }
        accept
    }

    /// How much the client wants `coding` (`None`: identity), in thousandths; 0 is "not
    /// acceptable". The coding's own element wins over `*`. Identity is acceptable unless an
    /// element says `identity;q=0`, or `*;q=0` without naming identity.
    pub fn quality(&self, coding: Option<Coding>) -> u16 {
        let name = coding.map_or("identity", Coding::as_str);
        let own = self.entries.iter().find(|(token, _)| {
            token == name || (coding == Some(Coding::Gzip) && token == "x-gzip")
        });
        if let Some((_, quality)) = own {
            return *quality;
        }
        if let Some((_, quality)) = self.entries.iter().find(|(token, _)| token == "*") {
            return *quality;
        }
        match coding {
            None => FULL,
            Some(_) => 0,
        }
    }

    /// Whether the client takes a response encoded as `encoded`.
    pub fn takes(&self, encoded: Encoded) -> bool {
        match encoded {
            Encoded::Identity => self.quality(None) > 0,
            Encoded::With(coding) => self.present && self.quality(Some(coding)) > 0,
            // What corral cannot decode goes as it is, as it did before corral owned encodings.
            Encoded::Other => true,
        }
    }

    /// Which of the stored representations (`None`: identity) to send: the one the client wants
    /// most; on a tie an encoded one before identity (fewer bytes), then the first listed. `None`
    /// when the client accepts none of them.
    pub fn choose(&self, stored: &[Option<Coding>]) -> Option<usize> {
        stored
            .iter()
            .enumerate()
            .map(|(index, coding)| {
                let quality = match coding {
                    Some(_) if !self.present => 0,
                    _ => self.quality(*coding),
                };
                (index, quality, coding.is_some())
            })
            .filter(|(_, quality, _)| *quality > 0)
            .max_by(|a, b| (a.1, a.2, b.0).cmp(&(b.1, b.2, a.0)))
            .map(|(index, _, _)| index)
    }
}

/// A quality value (`0`, `0.5`, `1.000`) in thousandths, or `None` when it is not one.
fn qvalue(text: &str) -> Option<u16> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if fraction.len() > 3 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits: u16 = format!("{fraction:0<3}").parse().ok()?;
    match whole {
        "0" => Some(digits),
        "1" if digits == 0 => Some(FULL),
        _ => None,
    }
}

/// `Accept-Encoding` for a cacheable fetch: the route's codings in its order of preference, each
/// with a lower quality than the one before (an upstream that weighs them picks the first it
/// has), and identity as the last resort. `None` when the route asks for none: identity only.
pub fn ask_upstream(codings: &[Coding]) -> Option<HeaderValue> {
    if codings.is_empty() {
        return None;
    }
    let elements: Vec<String> = codings
        .iter()
        .enumerate()
        .map(|(rank, coding)| match rank {
            0 => coding.as_str().to_owned(),
            // At most four codings: the quality stays above zero.
            rank => format!("{};q=0.{}", coding.as_str(), 10 - rank.min(9)),
        })
        .collect();
    HeaderValue::from_str(&elements.join(", ")).ok()
}

/// The entity-tag of a representation whose bytes differ from those `etag` named (another
/// coding of them): weak (RFC 9110 section 8.8.3), so it still validates a cached copy with
/// `If-None-Match` but never claims byte-for-byte equality.
pub fn weaken_etag(etag: &HeaderValue) -> HeaderValue {
    if etag.as_bytes().starts_with(b"W/") {
        return etag.clone();
    }
    let mut weak = b"W/".to_vec();
    weak.extend_from_slice(etag.as_bytes());
    HeaderValue::from_bytes(&weak).unwrap_or_else(|_| etag.clone())
}

/// Whether `content_type` (a `Content-Type` value, parameters allowed) is one of `patterns`:
/// media types, lowercase, each holding at most one `*` (`text/*`, `application/*+json`).
pub fn media_type_in(content_type: &[u8], patterns: &[String]) -> bool {
    let Ok(text) = std::str::from_utf8(content_type) else {
        return false;
    };
    let media = text
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    patterns
        .iter()
        .any(|pattern| match pattern.split_once('*') {
            None => *pattern == media,
            Some((prefix, suffix)) => {
                media.len() >= prefix.len() + suffix.len()
                    && media.starts_with(prefix)
                    && media.ends_with(suffix)
            }
        })
}

/// Brotli's quality when storing: compression is paid once per stored answer, so well above the
/// fastest, and below 10 and 11, which cost tens of times more for a few percent.
const BROTLI_QUALITY: u32 = 9;
/// Brotli's window, as a power of two (4 MiB).
const BROTLI_WINDOW: u32 = 22;
/// gzip and deflate's level: zlib's default.
const DEFLATE_LEVEL: u32 = 6;
/// zstd's level: more than its default of 3, paid once.
const ZSTD_LEVEL: i32 = 9;

/// `body` compressed with `coding`, in one go (CPU bound: run it where blocking is fine).
pub fn compress(coding: Coding, body: &[u8]) -> std::io::Result<Vec<u8>> {
    let out = Vec::with_capacity(body.len() / 4 + 64);
    match coding {
        Coding::Gzip => {
            let level = flate2::Compression::new(DEFLATE_LEVEL);
            let mut encoder = flate2::write::GzEncoder::new(out, level);
            encoder.write_all(body)?;
            encoder.finish()
        }
        Coding::Deflate => {
            let level = flate2::Compression::new(DEFLATE_LEVEL);
            let mut encoder = flate2::write::ZlibEncoder::new(out, level);
            encoder.write_all(body)?;
            encoder.finish()
        }
        Coding::Br => {
            let mut encoder =
                brotli::CompressorWriter::new(out, 32 << 10, BROTLI_QUALITY, BROTLI_WINDOW);
            encoder.write_all(body)?;
            encoder.flush()?;
            Ok(encoder.into_inner())
        }
        Coding::Zstd => zstd::bulk::compress(body, ZSTD_LEVEL),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn accept(value: &'static str) -> AcceptEncoding {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static(value));
        AcceptEncoding::of(&headers)
    }

    const GZIP: Option<Coding> = Some(Coding::Gzip);
    const BR: Option<Coding> = Some(Coding::Br);
    const ZSTD: Option<Coding> = Some(Coding::Zstd);

    #[test]
    fn qualities_come_from_the_coding_then_the_star_then_the_defaults() {
        let browser = accept("gzip, deflate, br;q=0.8, zstd;q=0");
        assert_eq!(browser.quality(GZIP), 1000);
        assert_eq!(browser.quality(BR), 800);
        assert_eq!(browser.quality(ZSTD), 0);
        assert_eq!(
            browser.quality(None),
            1000,
            "identity is acceptable by default"
        );

        let star = accept("br;q=0.5, *;q=0.1");
        assert_eq!(star.quality(BR), 500);
        assert_eq!(star.quality(GZIP), 100);
        assert_eq!(star.quality(None), 100, "a star covers identity too");

        let no_identity = accept("gzip, identity;q=0");
        assert_eq!(no_identity.quality(None), 0);
        let star_zero = accept("*;q=0");
        assert_eq!(star_zero.quality(None), 0);
        assert_eq!(star_zero.quality(GZIP), 0);
        let star_zero_but_identity = accept("*;q=0, identity");
        assert_eq!(star_zero_but_identity.quality(None), 1000);

        assert_eq!(accept("X-GZIP").quality(GZIP), 1000);
        assert_eq!(accept("GZip ; Q=0.25").quality(GZIP), 250);
    }

    #[test]
    fn qvalues_that_do_not_parse_leave_their_element_out() {
        for bad in [
            "gzip;q=2",
            "gzip;q=1.5",
            "gzip;q=0.1234",
            "gzip;q=x",
            "gzip;q=-0",
        ] {
            assert_eq!(accept(bad).quality(GZIP), 0, "{bad}");
        }
        assert_eq!(accept("gzip;q=1.000").quality(GZIP), 1000);
        assert_eq!(accept("gzip;q=0.05").quality(GZIP), 50);
        assert_eq!(accept("gzip;q=0.").quality(GZIP), 0);
    }

    #[test]
    fn no_header_takes_identity_only_and_an_empty_one_too() {
        let none = AcceptEncoding::of(&HeaderMap::new());
        assert!(none.takes(Encoded::Identity));
        assert!(!none.takes(Encoded::With(Coding::Gzip)));
        assert_eq!(none.choose(&[GZIP, BR, None]), Some(2));
        assert_eq!(none.choose(&[GZIP]), None);
        let empty = accept("");
        assert!(!empty.takes(Encoded::With(Coding::Gzip)));
        assert_eq!(empty.choose(&[BR, None]), Some(1));
        // Codings corral cannot decode go as they are.
        assert!(none.takes(Encoded::Other));
    }

    #[test]
    fn the_choice_is_the_most_wanted_then_encoded_then_first() {
        let stored = [BR, GZIP, None];
        assert_eq!(accept("gzip, deflate, br, zstd").choose(&stored), Some(0));
        assert_eq!(accept("gzip, deflate").choose(&stored), Some(1));
        assert_eq!(accept("br;q=0.5, gzip").choose(&stored), Some(1));
        assert_eq!(accept("identity").choose(&stored), Some(2));
        assert_eq!(accept("gzip;q=0.5, identity").choose(&stored), Some(2));
        assert_eq!(accept("*").choose(&stored), Some(0));
        assert_eq!(accept("zstd, identity;q=0").choose(&stored), None);
        assert_eq!(accept("zstd").choose(&stored), Some(2));
        assert_eq!(accept("gzip, identity;q=0").choose(&[None]), None);
    }

    #[test]
    fn content_encoding_is_one_coding_identity_or_other() {
        let of = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static(value));
            Encoded::of(&headers)
        };
        assert_eq!(Encoded::of(&HeaderMap::new()), Encoded::Identity);
        assert_eq!(of("identity"), Encoded::Identity);
        assert_eq!(of("GZIP"), Encoded::With(Coding::Gzip));
        assert_eq!(of("x-gzip"), Encoded::With(Coding::Gzip));
        assert_eq!(of(" br "), Encoded::With(Coding::Br));
        assert_eq!(of("gzip, br"), Encoded::Other);
        assert_eq!(of("compress"), Encoded::Other);
    }

    #[test]
    fn an_etag_is_weakened_once() {
        let strong = HeaderValue::from_static("\"v1\"");
        assert_eq!(weaken_etag(&strong), "W/\"v1\"");
        assert_eq!(weaken_etag(&weaken_etag(&strong)), "W/\"v1\"");
    }

    #[test]
    fn the_upstream_is_asked_for_the_routes_codings_in_order() {
        let asked = ask_upstream(&[Coding::Gzip, Coding::Br, Coding::Zstd]).unwrap();
        assert_eq!(asked, "gzip, br;q=0.9, zstd;q=0.8");
        assert_eq!(ask_upstream(&[]), None);
        let asked = AcceptEncoding::of(&HeaderMap::from_iter([(header::ACCEPT_ENCODING, asked)]));
        assert_eq!(asked.choose(&[Some(Coding::Zstd), GZIP, BR]), Some(1));
    }

    #[test]
    fn media_types_match_exactly_or_around_a_star() {
        let patterns = [
            "text/*".to_owned(),
            "application/json".to_owned(),
            "application/*+json".to_owned(),
        ];
        assert!(media_type_in(b"text/html; charset=utf-8", &patterns));
        assert!(media_type_in(b"Application/JSON", &patterns));
        assert!(media_type_in(b"application/problem+json", &patterns));
        assert!(!media_type_in(b"application/jsonx", &patterns));
        assert!(!media_type_in(b"image/png", &patterns));
        assert!(!media_type_in(b"application/+jso", &patterns));
    }

    #[test]
    fn every_compressor_round_trips() {
        let body = "{\"hello\": \"world\"} ".repeat(500);
        for coding in Coding::ALL {
            let packed = compress(coding, body.as_bytes()).unwrap();
            assert!(
                packed.len() < body.len() / 4,
                "{coding:?} compressed to {}",
                packed.len()
            );
            let mut back = Vec::new();
            match coding {
                Coding::Gzip => flate2::read::GzDecoder::new(&packed[..]).read_to_end(&mut back),
                Coding::Deflate => {
                    flate2::read::ZlibDecoder::new(&packed[..]).read_to_end(&mut back)
                }
                Coding::Br => brotli::Decompressor::new(&packed[..], 4096).read_to_end(&mut back),
                Coding::Zstd => zstd::stream::read::Decoder::new(&packed[..])
                    .unwrap()
                    .read_to_end(&mut back),
            }
            .unwrap();
            assert_eq!(back, body.as_bytes(), "{coding:?}");
        }
    }
}
