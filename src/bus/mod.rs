//! The event bus: one subscription per process, dispatched by key digest.
//!
//! Events are small: a key digest, an outcome, and the value inline only below
//! [`INLINE_MAX`] (docs/design.md, I7). A bus delivers what it receives to its [`EventSink`] and tells the
//! sink to [`EventSink::resync`] whenever it (re)connects after a disconnection, because events may
//! have been lost while it was away: every live flight then re-checks the store at once.
//!
//! The subscription is made before the bus is handed to the engine, so no flight can ACQUIRE before
//! its process listens.
//!
//! A NATS KV store brings its own bus, [`crate::store::nats_kv::NatsKvEvents`]: a consumer of the
//! bucket's stream, where every write of the store is its own event.

pub mod memory;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "redis")]
pub mod redis;
pub(crate) mod tasks;

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};

use crate::key::KeyHash;
use crate::lease::LeaseId;

/// Values at or above this many bytes never ride inside an event.
pub const INLINE_MAX: usize = 16 * 1024;

/// How a flight ended, as other processes learn it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A value was committed; small values ride along as their stored envelope.
    Ready { inline: Option<Bytes> },
    /// The build failed; everyone waiting gets this message at once, and the error response
    /// (an envelope, as stored) when the build had one and it is small enough to ride along.
    Failed {
        message: String,
        response: Option<Bytes>,
    },
    /// The answer may not be shared; waiters go to the source on their own.
    Uncacheable,
    /// The leader gave up its lease without an answer; waiters re-elect now.
    Abandoned,
    /// The key was deleted or purged; L1 copies are dropped and waiters re-elect.
    Deleted,
    /// A whole route was purged: its generation (part of every key of the route) is now
    /// `generation`. The event's key is the route's [`crate::key::generation_key`].
    Generation { generation: u64 },
}

/// One event about one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub key: KeyHash,
    pub kind: EventKind,
    /// The lease this event ends, as its leader names it (READY, FAILED, UNCACHEABLE, ABANDONED
    /// from a leader); `None` for every other event. Anyone who can publish on the bus can claim
    /// any id, but only the store and the lease's holder know the id of a live lease, and a
    /// follower trusts a payload only from an event whose id is the one its WAIT reported.
    pub lease: Option<LeaseId>,
}

/// Why received bytes were not an event.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    #[error("event is truncated")]
    Truncated,
    #[error("event version or kind {0} is unknown")]
    Unknown(u8),
    #[error("event message is not UTF-8")]
    BadMessage,
}

/// Events without a lease id (and GENERATION, whose head a Lua script appends digits to).
const EVENT_VERSION: u8 = 1;
/// Events bound to the lease they end: the 16-byte lease id follows the key.
const EVENT_VERSION_LEASE: u8 = 2;
const READY: u8 = 1;
const READY_INLINE: u8 = 2;
const FAILED: u8 = 3;
const UNCACHEABLE: u8 = 4;
const ABANDONED: u8 = 5;
const DELETED: u8 = 6;
/// Payload: the generation in ASCII decimal digits, so a Lua script can append it.
const GENERATION: u8 = 7;

/// Failure messages are cut to this many bytes so events stay small.
const MESSAGE_MAX: usize = 1024;

impl Event {
    pub fn new(key: KeyHash, kind: EventKind) -> Self {
        Self {
            key,
            kind,
            lease: None,
        }
    }

    /// An event that ends the lease named `lease` (sent by its holder).
    pub fn ending(key: KeyHash, lease: LeaseId, kind: EventKind) -> Self {
        Self {
            key,
            kind,
            lease: Some(lease),
        }
    }

    /// `version u8 | kind u8 | key [32] | lease id [16], version 2 only | payload`: the inline
    /// envelope for READY; for FAILED a u16 message length, the UTF-8 message, then the error
    /// response's envelope if any; for GENERATION the number in decimal digits. Version 1 has no
    /// lease id; version 2 does (GENERATION and DELETED never carry one).
    pub fn encode(&self) -> Bytes {
        let ends_lease = !matches!(self.kind, EventKind::Deleted | EventKind::Generation { .. });
        let (version, lease): (u8, &[u8]) = match &self.lease {
            Some(lease) if ends_lease => (EVENT_VERSION_LEASE, &lease.0),
            _ => (EVENT_VERSION, &[]),
        };
        if let EventKind::Generation { generation } = &self.kind {
            let mut out = Self::generation_head(&self.key).to_vec();
            out.extend_from_slice(generation.to_string().as_bytes());
            return out.into();
        }
        if let EventKind::Failed { message, response } = &self.kind {
            let message = truncate_utf8(message, MESSAGE_MAX);
            let response = response.as_deref().unwrap_or_default();
            let mut out =
                BytesMut::with_capacity(36 + lease.len() + message.len() + response.len());
            out.put_u8(version);
            out.put_u8(FAILED);
            out.put_slice(self.key.as_bytes());
            out.put_slice(lease);
            out.put_u16(message.len() as u16);
            out.put_slice(message);
            out.put_slice(response);
            return out.freeze();
        }
        let (tag, payload): (u8, &[u8]) = match &self.kind {
            EventKind::Ready { inline: None } => (READY, &[]),
            EventKind::Ready {
                inline: Some(value),
            } => (READY_INLINE, value),
            EventKind::Failed { .. } | EventKind::Generation { .. } => {
                unreachable!("encoded above")
            }
            EventKind::Uncacheable => (UNCACHEABLE, &[]),
            EventKind::Abandoned => (ABANDONED, &[]),
            EventKind::Deleted => (DELETED, &[]),
        };
        let mut out = BytesMut::with_capacity(34 + lease.len() + payload.len());
        out.put_u8(version);
        out.put_u8(tag);
        out.put_slice(self.key.as_bytes());
        out.put_slice(lease);
        out.put_slice(payload);
        out.freeze()
    }

    /// The first bytes of a GENERATION event about `key`; the decimal generation follows them.
    pub fn generation_head(key: &KeyHash) -> [u8; 34] {
        let mut head = [0; 34];
        head[0] = EVENT_VERSION;
        head[1] = GENERATION;
        head[2..].copy_from_slice(key.as_bytes());
        head
    }

    pub fn decode(bytes: Bytes) -> Result<Self, EventError> {
        if bytes.len() < 34 {
            return Err(EventError::Truncated);
        }
        let (lease, payload) = match bytes[0] {
            EVENT_VERSION => (None, bytes.slice(34..)),
            EVENT_VERSION_LEASE => {
                if bytes.len() < 50 {
                    return Err(EventError::Truncated);
                }
                let lease = LeaseId(bytes[34..50].try_into().expect("16 bytes"));
                (Some(lease), bytes.slice(50..))
            }
            other => return Err(EventError::Unknown(other)),
        };
        let key = KeyHash::from_bytes(bytes[2..34].try_into().expect("32 bytes"));
        let kind = match bytes[1] {
            READY if payload.is_empty() => EventKind::Ready { inline: None },
            READY_INLINE => EventKind::Ready {
                inline: Some(payload),
            },
            FAILED => {
                if payload.len() < 2 {
                    return Err(EventError::Truncated);
                }
                let len = u16::from_be_bytes([payload[0], payload[1]]) as usize;
                if payload.len() < 2 + len {
                    return Err(EventError::Truncated);
                }
                let message = String::from_utf8(payload[2..2 + len].to_vec())
                    .map_err(|_| EventError::BadMessage)?;
                let rest = payload.slice(2 + len..);
                EventKind::Failed {
                    message,
                    response: (!rest.is_empty()).then_some(rest),
                }
            }
            UNCACHEABLE if payload.is_empty() => EventKind::Uncacheable,
            ABANDONED if payload.is_empty() => EventKind::Abandoned,
            DELETED if payload.is_empty() => EventKind::Deleted,
            GENERATION => EventKind::Generation {
                generation: std::str::from_utf8(&payload)
                    .ok()
                    .and_then(|digits| digits.parse().ok())
                    .ok_or(EventError::Truncated)?,
            },
            other => return Err(EventError::Unknown(other)),
        };
        // Only the events that end a lease may name one.
        if lease.is_some() && matches!(kind, EventKind::Deleted | EventKind::Generation { .. }) {
            return Err(EventError::Unknown(bytes[1]));
        }
        Ok(Self { key, kind, lease })
    }
}

fn truncate_utf8(text: &str, max: usize) -> &[u8] {
    if text.len() <= max {
        return text.as_bytes();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text.as_bytes()[..end]
}

/// Where a bus delivers what it hears. Implemented by the engine's dispatcher.
pub trait EventSink: Send + Sync + 'static {
    /// One event, in the order the bus received it.
    fn deliver(&self, event: Event);
    /// The bus reconnected (or lagged) and may have missed events: every live flight re-checks.
    fn resync(&self);
    /// Bytes arrived that were not an event (counted, then ignored).
    fn undecodable(&self);
}

/// A bus call that did not succeed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus timed out during {op}")]
    Timeout { op: &'static str },
    #[error("bus is unavailable: {0}")]
    Unavailable(String),
    /// The namespace cannot be used by this bus (NATS: it must be one subject token of letters,
    /// digits, `-` and `_`).
    #[error("invalid bus namespace {0:?}")]
    InvalidNamespace(String),
}

/// Publishing side of a bus; the subscribing side was set up when it connected.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Short name for logs and metrics (`memory`, `redis`, `nats`).
    fn kind(&self) -> &'static str;

    /// Publishes one encoded event (from [`Event::encode`]).
    async fn publish(&self, key: &KeyHash, encoded: Bytes) -> Result<(), BusError>;

    /// Whether the subscription is connected right now.
    fn connected(&self) -> bool;

    /// Stops listening and publishing; idempotent.
    async fn close(&self);

    /// Fault injection for tests: drop the current subscription connection (or stop delivering) as a
    /// network fault would, and recover the way the bus recovers from one.
    #[cfg(any(test, feature = "test-util"))]
    async fn sever(&self);
}

/// Redis channel (one per namespace) that carries every event.
pub fn redis_channel(namespace: &str) -> String {
    format!("{namespace}:events")
}

/// NATS subject of one key's events; a process subscribes to [`nats_wildcard`].
pub fn nats_subject(namespace: &str, key: &KeyHash) -> String {
    format!("{namespace}.events.{}", key.to_hex())
}

pub fn nats_wildcard(namespace: &str) -> String {
    format!("{namespace}.events.*")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyBuilder;

    fn key() -> KeyHash {
        KeyBuilder::new().part("k").finish().hash
    }

    #[test]
    fn every_kind_round_trips() {
        let kinds = [
            EventKind::Ready { inline: None },
            EventKind::Ready {
                inline: Some(Bytes::from_static(b"v")),
            },
            EventKind::Ready {
                inline: Some(Bytes::new()),
            },
            EventKind::Failed {
                message: "failure".into(),
                response: None,
            },
            EventKind::Failed {
                message: String::new(),
                response: Some(Bytes::from_static(b"envelope")),
            },
            EventKind::Uncacheable,
            EventKind::Abandoned,
            EventKind::Deleted,
            EventKind::Generation { generation: 0 },
            EventKind::Generation {
                generation: u64::MAX,
            },
        ];
        for kind in kinds {
            let event = Event::new(key(), kind.clone());
            assert_eq!(Event::decode(event.encode()), Ok(event));
            if matches!(kind, EventKind::Deleted | EventKind::Generation { .. }) {
                continue;
            }
            let lease = crate::lease::Token(7).lease_id();
            let bound = Event::ending(key(), lease, kind);
            assert_eq!(Event::decode(bound.encode()), Ok(bound));
        }
    }

    #[test]
    fn a_bound_event_cut_inside_its_lease_id_is_truncated() {
        let lease = crate::lease::Token(7).lease_id();
        let bytes = Event::ending(key(), lease, EventKind::Abandoned).encode();
        for len in 34..50 {
            assert_eq!(
                Event::decode(bytes.slice(..len)),
                Err(EventError::Truncated),
                "cut at {len}"
            );
        }
        assert_eq!(Event::decode(bytes).unwrap().lease, Some(lease));
    }

    #[test]
    fn junk_is_an_error_not_a_panic() {
        assert_eq!(Event::decode(Bytes::new()), Err(EventError::Truncated));
        let mut bytes = Event::new(key(), EventKind::Deleted).encode().to_vec();
        bytes[1] = 99;
        assert_eq!(Event::decode(bytes.into()), Err(EventError::Unknown(99)));
    }

    #[test]
    fn long_failure_messages_are_cut_on_a_char_boundary() {
        let event = Event::new(
            key(),
            EventKind::Failed {
                message: "é".repeat(MESSAGE_MAX),
                response: None,
            },
        );
        let back = Event::decode(event.encode()).unwrap();
        let EventKind::Failed { message, .. } = back.kind else {
            panic!("kind changed")
        };
        assert!(message.len() <= MESSAGE_MAX && message.chars().all(|c| c == 'é'));
    }
}
