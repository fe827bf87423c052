//! One key's KV entry as corral writes and reads it: the state in headers, the envelope in the
//! payload, and the server's timestamp as the only clock that says how old it is.
//!
//! Every write to `e.<hex>` carries [`STATE`]; the other headers depend on the state:
//!
//! | state       | operation    | headers                                   | payload            |
//! |-------------|--------------|-------------------------------------------|--------------------|
//! | `lease`     | put          | token, fence (after a renewal), node, ttl | empty              |
//! | `value`     | put          | token, ttl, fresh, sliding (when it slides) | the envelope     |
//! | `value`     | put          | as above, since, lease token + ttl          | the envelope     |
//! | `value`     | put          | as above, since, released (+ message)       | the envelope     |
//! | `pass`      | put          | token, ttl                                | empty              |
//! | `failed`    | `DEL`        | token, message                            | the error response |
//! | `abandoned` | `DEL`        | token                                     | empty              |
//! | `discarded` | `DEL`        |                                           | empty              |
//! | `purged`    | `PURGE`      |                                           | empty              |
//!
//! A value past its freshness (or near its end, for an early refresh) is refreshed under a lease
//! that rides on the value itself: the value is published again with the holder's token and lease
//! lifetime, and `since` (the server timestamp of its first write, from which its freshness and
//! lifetime still count), because a separate lease message would replace it (history 1). A refresh
//! that fails publishes the value once more without the lease, saying `released` so that waiters
//! hear it; one that succeeds replaces it with the new value, by the same compare-and-set.
//!
//! `Nats-TTL` (whole seconds) makes the server remove leases, values and pass markers on its own;
//! tombstones (`DEL`, `PURGE`) carry a short one so that they do not pile up. A sliding value has no
//! server TTL: its touch record `t.<hex>` (state `touch`, the value's revision, `Nats-TTL` = the
//! window) says when it was last read, and the value is removed once that record lapses.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use async_nats::jetstream::message::StreamMessage;
use bytes::Bytes;

use crate::lease::Token;

/// `lease`, `value`, `pass`, `failed`, `abandoned`, `discarded`, `purged` or `touch`.
pub(crate) const STATE: &str = "Corral-State";
/// The writer's lease token (32 hex digits): how a retry after a client-side timeout recognises its
/// own write.
pub(crate) const TOKEN: &str = "Corral-Token";
/// The fence a lease was created with (its first revision), kept across renewals.
pub(crate) const FENCE: &str = "Corral-Fence";
/// Which process holds a lease (for status and debugging; never compared).
pub(crate) const NODE: &str = "Corral-Node";
/// The lifetime the writer asked for, in milliseconds (the server's TTL is whole seconds).
pub(crate) const TTL_MS: &str = "Corral-Ttl-Ms";
/// On a value with a stale window: how long it is fresh, in milliseconds, from the server's
/// timestamp of the value (its `Corral-Ttl-Ms` is freshness plus the stale window).
pub(crate) const FRESH_MS: &str = "Corral-Fresh-Ms";
/// On a value published again: the server timestamp (ns since the Unix epoch) of its first write.
pub(crate) const SINCE_NS: &str = "Corral-Since-Ns";
/// On a value carrying a refresh lease: the holder's token (32 hex digits).
pub(crate) const LEASE_TOKEN: &str = "Corral-Lease-Token";
/// On a value carrying a refresh lease: the lease's lifetime in ms from this message's timestamp.
pub(crate) const LEASE_TTL_MS: &str = "Corral-Lease-Ttl-Ms";
/// On a value whose refresh ended without a new value: `failed` or `abandoned`.
pub(crate) const RELEASED: &str = "Corral-Released";
/// `1` on a value whose expiry slides with reads.
pub(crate) const SLIDING: &str = "Corral-Sliding";
/// A failed build's message, percent-escaped (header values are one line of visible ASCII).
pub(crate) const MESSAGE: &str = "Corral-Message";
/// On a touch record: the revision of the value it extends.
pub(crate) const REVISION: &str = "Corral-Revision";

/// KV operation header (ADR-8); absent on a put.
pub(crate) const KV_OPERATION: &str = "KV-Operation";
/// Per-message TTL (ADR-43), in whole seconds or `never`.
pub(crate) const NATS_TTL: &str = "Nats-TTL";
/// Set by the server on the delete markers it places (ADR-43): `MaxAge`, `Remove` or `Purge`.
pub(crate) const MARKER_REASON: &str = "Nats-Marker-Reason";
/// Rollup: a `PURGE` replaces every earlier message of its subject.
pub(crate) const ROLLUP: &str = "Nats-Rollup";
/// In a headers-only delivery: the size of the payload that was left out.
pub(crate) const MSG_SIZE: &str = "Nats-Msg-Size";

/// The longest server TTL written, in seconds (a hundred years): longer lifetimes are clamped so
/// that the server's nanosecond arithmetic cannot overflow.
const MAX_SERVER_TTL_SECS: u64 = 100 * 365 * 24 * 60 * 60;

/// The lifetime of a value some other writer put there without a TTL: a year, i.e. "no expiry",
/// small enough that adding it to an instant never overflows.
const NO_EXPIRY: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// What one key's entry holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Record {
    /// No entry, a tombstone or a server marker: a lease may be created over it.
    Vacant,
    Lease {
        token: Token,
        /// The revision the lease was created with; stays the same across renewals.
        fence: u64,
        /// The lifetime asked for; the server removes it after [`server_ttl`] of that.
        ttl: Duration,
    },
    Value {
        /// The committing lease's token; `None` for a value some other writer put there.
        token: Option<Token>,
        /// Freshness plus stale window.
        ttl: Duration,
        /// Freshness, when it is shorter than `ttl` (the value has a stale window).
        fresh: Option<Duration>,
        /// When the value was first written (server ns), if this message published it again.
        since_ns: Option<i128>,
        /// A refresh lease riding on the value: the holder's token and the lease's lifetime from
        /// this message's timestamp.
        lease: Option<(Token, Duration)>,
        /// Whether reads extend the TTL (through the touch record).
        sliding: bool,
        value: Bytes,
    },
    Pass {
        token: Option<Token>,
        ttl: Duration,
    },
    /// A tombstone that a lease holder wrote when it ended (failed or abandoned): vacant, but
    /// recognisable by a retry of the same write.
    Released {
        token: Token,
    },
}

/// An entry as read, with the server's revision and timestamp.
#[derive(Clone, Debug)]
pub(crate) struct Slot {
    /// The stream sequence of the entry's last message; 0 when the key never had one (or every
    /// message of it is gone). A compare-and-set names it as the expected last subject sequence.
    pub revision: u64,
    /// When the server stored the last message, in nanoseconds since the Unix epoch.
    pub written_ns: i128,
    pub record: Record,
}

impl Slot {
    /// A key with no message at all.
    pub fn empty() -> Self {
        Self {
            revision: 0,
            written_ns: 0,
            record: Record::Vacant,
        }
    }

    /// How long ago the server stored the entry, by this process's clock (never negative).
    pub fn age(&self, now_ns: i128) -> Duration {
        duration_ns(now_ns - self.written_ns)
    }
}

/// Why a message could not be read as an entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum EntryError {
    #[error("entry has an unknown state {0:?}")]
    UnknownState(String),
    #[error("entry header {0} is missing or malformed")]
    BadHeader(&'static str),
}

/// The current time in nanoseconds since the Unix epoch, to compare with server timestamps.
pub(crate) fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

fn duration_ns(ns: i128) -> Duration {
    Duration::from_nanos(u64::try_from(ns.max(0)).unwrap_or(u64::MAX))
}

/// The server TTL for a lifetime: whole seconds, rounded up, at least one (the server's unit and
/// minimum).
pub(crate) fn server_ttl(ttl: Duration) -> Duration {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    Duration::from_secs(secs.clamp(1, MAX_SERVER_TTL_SECS))
}

/// The `Nats-TTL` header value for a lifetime.
pub(crate) fn ttl_header(ttl: Duration) -> String {
    server_ttl(ttl).as_secs().to_string()
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.as_str())
}

fn token(headers: &HeaderMap) -> Option<Token> {
    header(headers, TOKEN)
        .filter(|hex| hex.len() == 32)
        .and_then(|hex| u128::from_str_radix(hex, 16).ok())
        .map(Token)
}

fn lease_token(headers: &HeaderMap) -> Option<Token> {
    header(headers, LEASE_TOKEN)
        .filter(|hex| hex.len() == 32)
        .and_then(|hex| u128::from_str_radix(hex, 16).ok())
        .map(Token)
}

fn millis(headers: &HeaderMap, name: &'static str) -> Result<Duration, EntryError> {
    header(headers, name)
        .and_then(|ms| ms.parse::<u64>().ok())
        .map(Duration::from_millis)
        .ok_or(EntryError::BadHeader(name))
}

/// The lifetime a foreign value's `Nats-TTL` gives it (corral's own values carry [`TTL_MS`]).
fn foreign_ttl(headers: &HeaderMap) -> Duration {
    header(headers, NATS_TTL)
        .and_then(|ttl| ttl.trim_end_matches('s').parse::<u64>().ok())
        .map_or(NO_EXPIRY, Duration::from_secs)
}

/// Whether a message removes its subject's value: a KV delete or purge, or a server marker.
pub(crate) fn is_removal(headers: &HeaderMap) -> bool {
    header(headers, MARKER_REASON).is_some()
        || matches!(header(headers, KV_OPERATION), Some("DEL" | "PURGE"))
}

/// Reads the last message of a key's entry.
pub(crate) fn parse(message: &StreamMessage) -> Result<Slot, EntryError> {
    let headers = &message.headers;
    let record = if is_removal(headers) {
        match (header(headers, STATE), token(headers)) {
            (Some("failed" | "abandoned"), Some(token)) => Record::Released { token },
            _ => Record::Vacant,
        }
    } else {
        match header(headers, STATE) {
            Some("lease") => Record::Lease {
                token: token(headers).ok_or(EntryError::BadHeader(TOKEN))?,
                fence: match header(headers, FENCE) {
                    Some(fence) => fence.parse().map_err(|_| EntryError::BadHeader(FENCE))?,
                    None => message.sequence,
                },
                ttl: millis(headers, TTL_MS)?,
            },
            Some("value") => Record::Value {
                token: token(headers),
                ttl: millis(headers, TTL_MS)?,
                fresh: millis(headers, FRESH_MS).ok(),
                since_ns: header(headers, SINCE_NS).and_then(|ns| ns.parse().ok()),
                lease: lease_token(headers).zip(millis(headers, LEASE_TTL_MS).ok()),
                sliding: header(headers, SLIDING) == Some("1"),
                value: message.payload.clone(),
            },
            Some("pass") => Record::Pass {
                token: token(headers),
                ttl: millis(headers, TTL_MS)?,
            },
            // Written by something other than corral: a value like any other, which the engine
            // will find unreadable and discard.
            None => Record::Value {
                token: None,
                ttl: foreign_ttl(headers),
                fresh: None,
                since_ns: None,
                lease: None,
                sliding: false,
                value: message.payload.clone(),
            },
            Some(other) => return Err(EntryError::UnknownState(other.to_owned())),
        }
    };
    Ok(Slot {
        revision: message.sequence,
        written_ns: message.time.unix_timestamp_nanos(),
        record,
    })
}

/// A touch record: which value revision it extends, and when it was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Touched {
    pub revision: u64,
    pub written_ns: i128,
}

/// Reads a touch record; `None` for a marker or anything that is not one.
pub(crate) fn parse_touch(message: &StreamMessage) -> Option<Touched> {
    let headers = &message.headers;
    if is_removal(headers) || header(headers, STATE) != Some("touch") {
        return None;
    }
    Some(Touched {
        revision: header(headers, REVISION)?.parse().ok()?,
        written_ns: message.time.unix_timestamp_nanos(),
    })
}

/// Time left of a lifetime `ttl` that started `since_ns`, at `now_ns`.
pub(crate) fn left(ttl: Duration, since_ns: i128, now_ns: i128) -> Duration {
    ttl.saturating_sub(duration_ns(now_ns - since_ns))
}

/// Escapes text for a header value: bytes outside visible ASCII, and `%`, become `%XX`.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_graphic() && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Reverses [`escape`]; a malformed escape is kept as it is, and invalid UTF-8 is replaced.
pub(crate) fn unescape(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = (bytes[i] == b'%')
            .then(|| text.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match decoded {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_ttls_are_whole_seconds_rounded_up() {
        assert_eq!(server_ttl(Duration::ZERO), Duration::from_secs(1));
        assert_eq!(server_ttl(Duration::from_millis(1)), Duration::from_secs(1));
        assert_eq!(server_ttl(Duration::from_secs(1)), Duration::from_secs(1));
        assert_eq!(
            server_ttl(Duration::from_millis(1500)),
            Duration::from_secs(2)
        );
        assert_eq!(
            server_ttl(Duration::from_secs(u64::MAX)),
            Duration::from_secs(MAX_SERVER_TTL_SECS)
        );
        assert_eq!(ttl_header(Duration::from_millis(2001)), "3");
    }

    #[test]
    fn messages_survive_escaping() {
        for text in [
            "",
            "plain",
            "upstream said 503",
            "100% é\r\n\tdone",
            "%zz%4",
        ] {
            let escaped = escape(text);
            assert!(escaped.bytes().all(|b| b.is_ascii_graphic()), "{escaped:?}");
            assert_eq!(unescape(&escaped), text);
        }
        assert_eq!(
            unescape("%zz%4"),
            "%zz%4",
            "malformed escapes stay as they are"
        );
    }

    #[test]
    fn time_left_never_goes_negative() {
        let second = 1_000_000_000;
        assert_eq!(
            left(Duration::from_secs(2), 0, second),
            Duration::from_secs(1)
        );
        assert_eq!(left(Duration::from_secs(1), 0, 5 * second), Duration::ZERO);
        // A server clock ahead of ours: the entry is as young as it can be.
        assert_eq!(
            left(Duration::from_secs(1), second, 0),
            Duration::from_secs(1)
        );
    }
}
