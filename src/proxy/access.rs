//! The access log: one line per request (target `corral::access`), written once its response
//! body is done or dropped, so that it can say how many body bytes went out (a client cut off
//! mid-answer shows the bytes it got).

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

use http::{HeaderValue, Method};

/// The most bytes of a `User-Agent` the log keeps: enough to tell clients apart, too few for a
/// client to flood the log with one header.
const USER_AGENT_MAX: usize = 128;

/// What one request's access line says besides the bytes sent.
pub(super) struct AccessLine {
    pub request_id: HeaderValue,
    pub method: Method,
    pub path: String,
    pub route: String,
    pub outcome: &'static str,
    pub status: u16,
    /// Until the response head was ready.
    pub duration: Duration,
    /// The first 16 hex digits of the key's digest, or `-`.
    pub key: String,
    /// The id of the fetch whose answer this is, when one is known (see `fetch::FETCH_ID`).
    pub fetch_id: Option<HeaderValue>,
    pub client: Option<IpAddr>,
    /// How long this request's own upstream request took to its response head, when it made one.
    pub upstream: Option<Duration>,
    /// The client's `User-Agent`, cut and escaped ([`printable`]).
    pub user_agent: String,
}

impl AccessLine {
    /// Whether access lines are written at all: when they are not, nothing is gathered for them.
    pub fn enabled() -> bool {
        tracing::enabled!(target: "corral::access", tracing::Level::INFO)
    }

    /// Writes the line, once the response body is done or dropped with `bytes_sent` of it
    /// sent.
    pub fn write(&self, bytes_sent: u64) {
        tracing::info!(
            target: "corral::access",
            request_id = self.request_id.to_str().unwrap_or("-"),
            method = %self.method,
            path = self.path,
            route = self.route,
            outcome = self.outcome,
            status = self.status,
            duration_ms = self.duration.as_secs_f64() * 1000.0,
            key = self.key,
            // The id alone: a traced fetch's span follows it (see `ids::FETCH_ID`).
            fetch_id = self
                .fetch_id
                .as_ref()
                .and_then(|id| id.to_str().ok())
                .and_then(|id| id.split(' ').next())
                .unwrap_or("-"),
            client = self.client.map(tracing::field::display),
            upstream_ms = self.upstream.map(|took| took.as_secs_f64() * 1000.0),
            bytes_sent,
            user_agent = self.user_agent,
            "request"
        );
    }
}

/// A header value as a log may show it: at most [`USER_AGENT_MAX`] bytes, anything but printable
/// ASCII (and the backslash) as `\xNN`, so a client cannot forge lines or colour a terminal.
pub(super) fn printable(value: Option<&HeaderValue>) -> String {
    let Some(value) = value else {
        return "-".to_owned();
    };
    let bytes = value.as_bytes();
    let mut out = String::with_capacity(bytes.len().min(USER_AGENT_MAX));
    for &byte in bytes.iter().take(USER_AGENT_MAX) {
        if (b' '..=b'~').contains(&byte) && byte != b'\\' {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "\\x{byte:02x}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_agent_is_cut_and_its_control_bytes_escaped() {
        let forged = HeaderValue::from_bytes(b"curl/8\t\\ \xff\"").unwrap();
        assert_eq!(printable(Some(&forged)), "curl/8\\x09\\x5c \\xff\"");
        let long = HeaderValue::from_str(&"a".repeat(1000)).unwrap();
        assert_eq!(printable(Some(&long)).len(), USER_AGENT_MAX);
        assert_eq!(printable(None), "-");
    }
}
