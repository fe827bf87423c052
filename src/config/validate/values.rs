//! One parser per kind of value: each takes the text the file wrote and gives the value, or the
//! way it is wrong.

use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderName, Method, Uri};

use super::super::units::{self, format_duration};
use super::super::{Beta, OnWaitTimeout, Semantics, VaryMode};
use super::{Invalid, Kind};
use crate::engine::{ExpiryMode, OnStoreError};
use crate::http::encoding::Coding;

/// A whole number above zero.
pub(super) fn count(text: &str) -> Result<usize, Invalid> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err(Invalid::Zero),
        Ok(n) => Ok(n),
        Err(_) => Err(Invalid::Count(text.to_string())),
    }
}

/// A whole number above zero and at most `most`.
pub(super) fn bounded_count(text: &str, most: usize) -> Result<usize, Invalid> {
    match count(text)? {
        n if n > most => Err(Invalid::AboveMost {
            value: n.to_string(),
            most: most.to_string(),
        }),
        n => Ok(n),
    }
}

/// A size above zero and at most `most` bytes.
pub(super) fn bounded_size(text: &str, most: usize) -> Result<usize, Invalid> {
    match size(text)? {
        0 => Err(Invalid::Zero),
        n if n > most as u64 => Err(Invalid::AboveMost {
            value: units::format_size(n),
            most: units::format_size(most as u64),
        }),
        n => Ok(n as usize),
    }
}

/// Sorted and deduplicated: a key's parts, and the statuses, have one order.
pub(super) fn sorted<T: Ord>(mut items: Vec<T>) -> Vec<T> {
    items.sort();
    items.dedup();
    items
}

pub(super) fn expiry(text: &str) -> Result<ExpiryMode, Invalid> {
    match text {
        "absolute" => Ok(ExpiryMode::Absolute),
        // The window is the route's TTL, known once the layers are merged (see `Layer::policy`).
        "sliding" => Ok(ExpiryMode::Sliding {
            window: Duration::ZERO,
        }),
        _ => Err(word(text, "absolute or sliding")),
    }
}

pub(super) fn on_wait_timeout(text: &str) -> Result<OnWaitTimeout, Invalid> {
    match text {
        "error" => Ok(OnWaitTimeout::Error),
        "bypass" => Ok(OnWaitTimeout::Bypass),
        _ => Err(word(text, "error or bypass")),
    }
}

pub(super) fn vary(text: &str) -> Result<VaryMode, Invalid> {
    match text {
        "key" => Ok(VaryMode::Key),
        "honor" => Ok(VaryMode::Honor),
        _ => Err(word(text, "key or honor")),
    }
}

pub(super) fn on_store_error(text: &str) -> Result<OnStoreError, Invalid> {
    match text {
        "open" => Ok(OnStoreError::Open),
        "closed" => Ok(OnStoreError::Closed),
        _ => Err(word(text, "open or closed")),
    }
}

pub(super) fn semantics(text: &str) -> Result<Semantics, Invalid> {
    match text {
        "coalescing" => Ok(Semantics::Coalescing),
        "rfc9111" => Ok(Semantics::Rfc9111),
        _ => Err(word(text, "coalescing or rfc9111")),
    }
}

/// `heuristic: 10%`, or `off` (0%).
pub(super) fn heuristic(text: &str) -> Result<u8, Invalid> {
    match text.trim() {
        "off" => Ok(0),
        _ => percent(text),
    }
}

/// A cookie name a route strips, where `*` stands for any run of characters (`_ga*`).
pub(super) fn cookie_pattern(text: &str) -> Result<String, Invalid> {
    cookie_name(&text.replace('*', "x")).map(|_| text.to_string())
}

pub(super) fn word(text: &str, expected: &'static str) -> Invalid {
    Invalid::Word {
        text: text.to_string(),
        expected,
    }
}

pub(super) fn duration(text: &str) -> Result<Duration, Invalid> {
    units::parse_duration(text).map_err(|reason| Invalid::Duration {
        text: text.to_string(),
        reason,
    })
}

pub(super) fn positive_duration(text: &str) -> Result<Duration, Invalid> {
    match duration(text)? {
        Duration::ZERO => Err(Invalid::Zero),
        d => Ok(d),
    }
}

/// A duration above zero and at most `max`.
pub(super) fn bounded_duration(text: &str, max: Duration) -> Result<Duration, Invalid> {
    match positive_duration(text)? {
        d if d > max => Err(Invalid::AboveMax {
            value: format_duration(d),
            max: format_duration(max),
        }),
        d => Ok(d),
    }
}

pub(super) fn size(text: &str) -> Result<u64, Invalid> {
    units::parse_size(text).map_err(|reason| Invalid::Size {
        text: text.to_string(),
        reason,
    })
}

/// `true` (beta 1), `false` (off), or a beta: a finite number above zero.
pub(super) fn early_refresh(text: &str) -> Result<Option<Beta>, Invalid> {
    if let Ok(on) = boolean(text) {
        return Ok(on.then_some(Beta(1.0)));
    }
    match text.trim().parse::<f64>() {
        Ok(beta) if beta.is_finite() && beta > 0.0 => Ok(Some(Beta(beta))),
        _ => Err(Invalid::EarlyRefresh(text.to_string())),
    }
}

pub(super) fn boolean(text: &str) -> Result<bool, Invalid> {
    match text {
        "true" | "True" | "TRUE" => Ok(true),
        "false" | "False" | "FALSE" => Ok(false),
        _ => Err(Invalid::Bool(text.to_string())),
    }
}

pub(super) fn listen(text: &str) -> Result<SocketAddr, Invalid> {
    text.trim()
        .parse()
        .map_err(|_| Invalid::Listen(text.to_string()))
}

pub(super) fn namespace(text: &str) -> Result<String, Invalid> {
    let ok = (1..=64).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    ok.then(|| text.to_string())
        .ok_or_else(|| Invalid::Namespace(text.to_string()))
}

pub(super) fn backend_kind(text: &str) -> Result<Kind, Invalid> {
    match text {
        "memory" => Ok(Kind::Memory),
        "redis" => Ok(Kind::Redis),
        "nats" => Ok(Kind::Nats),
        _ => Err(word(text, "memory, redis or nats")),
    }
}

/// A store or bus url: the schemes this build's redis and nats clients can connect to (Redis TLS
/// only to one server, and no NATS websockets, so `rediss+sentinel://`, `rediss+cluster://`,
/// `ws://` and `wss://` are refused here rather than failing at start). A Redis url is parsed whole, in the same way
/// the store will read it, so a bad Sentinel or Cluster url is refused here too.
pub(super) fn backend_url(text: &str, kind: Kind, role: &'static str) -> Result<String, Invalid> {
    let (schemes, accepted): (&[&str], _) = match kind {
        Kind::Redis => (
            &[
                "redis",
                "redis+unix",
                "unix",
                "redis+sentinel",
                "redis+cluster",
                "rediss",
                "rediss+sentinel",
                "rediss+cluster",
            ],
            "redis://, rediss://, redis+unix://, unix://, redis+sentinel:// or redis+cluster://",
        ),
        _ => (&["nats", "tls"], "nats:// or tls://"),
    };
    if let (Kind::Redis, Some((scheme, _))) = (kind, text.split_once("://"))
        && schemes.contains(&scheme)
    {
        return crate::redis_conn::Target::parse(text)
            .map(|_| text.to_string())
            .map_err(|e| Invalid::RedisUrl {
                text: crate::credentials::redact(text),
                reason: e.to_string(),
            });
    }
    match text.split_once("://") {
        Some((scheme, rest)) if schemes.contains(&scheme) && !rest.is_empty() => {
            Ok(text.to_string())
        }
        _ => Err(Invalid::UrlScheme {
            text: crate::credentials::redact(text),
            kind: kind.name(),
            role,
            schemes: accepted,
        }),
    }
}

pub(super) fn absolute_path(text: &str) -> Result<String, Invalid> {
    if text.starts_with('/') {
        Ok(text.to_string())
    } else {
        Err(Invalid::RelativePath(text.to_string()))
    }
}

const METHODS: [Method; 9] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::PATCH,
    Method::OPTIONS,
    Method::TRACE,
    Method::CONNECT,
];

pub(super) fn method(text: &str) -> Result<Method, Invalid> {
    let upper = text.to_ascii_uppercase();
    METHODS
        .into_iter()
        .find(|m| m.as_str() == upper)
        .ok_or_else(|| Invalid::Method(text.to_string()))
}

/// The last line of regex's report: its first lines draw the pattern with a caret, which does
/// not fit on one line of ours.
pub(super) fn regex_reason(e: &regex::Error) -> String {
    let text = e.to_string();
    let last = text.lines().last().unwrap_or_default();
    last.strip_prefix("error: ").unwrap_or(last).to_string()
}

pub(super) fn host(text: &str) -> Result<String, Invalid> {
    let bad = || Invalid::Host(text.to_string());
    let authority: http::uri::Authority = text.parse().map_err(|_| bad())?;
    if authority.port().is_some() || authority.as_str().contains('@') || authority.host().is_empty()
    {
        return Err(bad());
    }
    Ok(authority.host().to_ascii_lowercase())
}

pub(super) fn upstream(text: &str) -> Result<Uri, Invalid> {
    let bad = |reason| Invalid::Upstream {
        text: text.to_string(),
        reason,
    };
    let uri: Uri = text.parse().map_err(|_| bad("not a url"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none_or(str::is_empty) {
        return Err(bad("must be an absolute http or https url"));
    }
    if uri.query().is_some() {
        return Err(bad("must not carry a query"));
    }
    Ok(uri)
}

pub(super) fn header_name(text: &str) -> Result<HeaderName, Invalid> {
    HeaderName::from_bytes(text.trim().to_ascii_lowercase().as_bytes())
        .map_err(|_| Invalid::Header(text.to_string()))
}

/// A cookie name is an RFC 6265 token: visible ASCII without separators.
pub(super) fn cookie_name(text: &str) -> Result<String, Invalid> {
    let ok = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
    ok.then(|| text.to_string())
        .ok_or_else(|| Invalid::Cookie(text.to_string()))
}

pub(super) fn query_name(text: &str) -> Result<String, Invalid> {
    if text.is_empty() || text.contains(['&', '=']) {
        return Err(Invalid::QueryName(text.to_string()));
    }
    Ok(text.to_string())
}

/// `10%` or `10`: a whole percentage from 0 to 100.
pub(super) fn percent(text: &str) -> Result<u8, Invalid> {
    let digits = text
        .trim()
        .strip_suffix('%')
        .unwrap_or(text.trim())
        .trim_end();
    match digits.parse::<u8>() {
        Ok(p) if p <= 100 && digits.bytes().all(|b| b.is_ascii_digit()) => Ok(p),
        _ => Err(Invalid::Percent(text.to_string())),
    }
}

/// Any status code, 5xx included (for `error_ttl` and `cache_statuses`).
pub(super) fn any_status(text: &str) -> Result<u16, Invalid> {
    let code: u16 = text
        .trim()
        .parse()
        .map_err(|_| Invalid::Status(text.to_string()))?;
    if (100..=599).contains(&code) {
        Ok(code)
    } else {
        Err(Invalid::StatusRange(code))
    }
}

/// A content coding corral can decode and make.
pub(super) fn coding(text: &str) -> Result<Coding, Invalid> {
    match Coding::parse(text) {
        Some(coding) if !text.eq_ignore_ascii_case("x-gzip") => Ok(coding),
        _ => Err(word(text, "gzip, br, zstd or deflate")),
    }
}

/// A media type to compress: `type/subtype`, lowercase, with at most one `*` (`text/*`,
/// `application/*+json`).
pub(super) fn media_range(text: &str) -> Result<String, Invalid> {
    let token = |part: &str| {
        !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$&-^_.+*".contains(&b))
    };
    match text.split_once('/') {
        Some((kind, subtype))
            if token(kind) && token(subtype) && text.matches('*').count() <= 1 =>
        {
            Ok(text.to_owned())
        }
        _ => Err(Invalid::MediaRange(text.to_owned())),
    }
}
