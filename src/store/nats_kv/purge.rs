//! Route generations and purge indexes in the bucket, beside the entries.
//!
//! | subject                        | what                                                       |
//! |--------------------------------|------------------------------------------------------------|
//! | `g.<generation key hex>`       | a route's generation in `Corral-Generation`; never expires |
//! | `ip.<route hex>.<key hex>`     | a key in its route's path index; the path in `Corral-Path` |
//! | `it.<tag hex>.<key hex>`       | a key in a surrogate tag's index                           |
//!
//! Route names and tags are hex-encoded so any character is a valid subject token. Index records
//! carry `Nats-TTL` (the entry's ttl, rewritten by each fill) so they expire with their entries;
//! the server's delete marker on expiry is skipped when reading. Reading an index is one ordered,
//! headers-only consumer over its subjects (last message per subject), so a prefix read costs
//! O(keys of the route) messages and a tag read O(keys of the tag), both bounded by the caller's
//! limit; the server removes that consumer 30 s after the read (the client's inactive threshold). A generation bump is a compare-and-set on its record, so two concurrent bumps both
//! count; every process's events consumer hears it.

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::message::PublishMessage;
use futures::StreamExt;

use super::entry;
use super::{CAS_ROUNDS, Conflict, NatsKvStore};
use crate::key::KeyHash;
use crate::store::{IndexEntry, Selector, StoreError, indexed_path};

/// Header of a generation record: the generation in decimal.
pub(crate) const GENERATION: &str = "Corral-Generation";
/// Header of a path index record: the request path, escaped as failure messages are.
const PATH: &str = "Corral-Path";

impl NatsKvStore {
    fn generation_subject(&self, key: &KeyHash) -> String {
        format!("{}g.{}", self.shared.prefix, key.to_hex())
    }

    /// The generation record's revision and number (0, 0 when there is none).
    async fn generation_record(
        &self,
        op: &'static str,
        key: &KeyHash,
    ) -> Result<(u64, u64), StoreError> {
        let Some(message) = self.last(op, self.generation_subject(key)).await? else {
            return Ok((0, 0));
        };
        let generation = message
            .headers
            .get(GENERATION)
            .and_then(|value| value.as_str().parse::<u64>().ok())
            .ok_or_else(|| StoreError::Protocol(format!("{op}: generation record is malformed")))?;
        Ok((message.sequence, generation))
    }

    pub(crate) async fn read_generation(&self, key: &KeyHash) -> Result<u64, StoreError> {
        self.bounded("route_generation", async {
            Ok(self.generation_record("route_generation", key).await?.1)
        })
        .await
    }

    pub(crate) async fn raise_generation(&self, key: &KeyHash) -> Result<u64, StoreError> {
        self.bounded("bump_generation", async {
            for _ in 0..CAS_ROUNDS {
                let (revision, generation) = self.generation_record("bump_generation", key).await?;
                // Only a writer of the store could have put the record this high; refuse rather
                // than wrap to a generation that was used before.
                let next = generation.checked_add(1).ok_or_else(|| {
                    StoreError::Protocol("bump_generation: the generation is at its maximum".into())
                })?;
                let message = PublishMessage::build()
                    .header(GENERATION, next.to_string())
                    .expected_last_subject_sequence(revision);
                // A conflict means another bump landed in between: count on top of it.
                let written = self
                    .publish("bump_generation", self.generation_subject(key), message)
                    .await?;
                if written.is_ok() {
                    return Ok(next);
                }
            }
            Err(StoreError::Timeout {
                op: "bump_generation",
            })
        })
        .await
    }

    pub(crate) async fn write_index(&self, entry: &IndexEntry) -> Result<(), StoreError> {
        self.bounded("index", async {
            let key = entry.key.to_hex();
            let ttl = entry::ttl_header(entry.ttl);
            let path = PublishMessage::build()
                .header(PATH, entry::escape(indexed_path(&entry.path)))
                .header(entry::NATS_TTL, ttl.clone());
            let subject = format!(
                "{}ip.{}.{key}",
                self.shared.prefix,
                hex::encode(&entry.route)
            );
            self.publish("index", subject, path)
                .await?
                .map_err(|Conflict| StoreError::Protocol("index: unexpected conflict".into()))?;
            for tag in &entry.tags {
                let subject = format!("{}it.{}.{key}", self.shared.prefix, hex::encode(tag));
                let message = PublishMessage::build().header(entry::NATS_TTL, ttl.clone());
                self.publish("index", subject, message)
                    .await?
                    .map_err(|Conflict| {
                        StoreError::Protocol("index: unexpected conflict".into())
                    })?;
            }
            Ok(())
        })
        .await
    }

    pub(crate) async fn read_index(
        &self,
        selector: &Selector,
        limit: usize,
    ) -> Result<Vec<KeyHash>, StoreError> {
        let (filter, prefix) = match selector {
            Selector::Prefix { route, prefix } => (
                format!("{}ip.{}.*", self.shared.prefix, hex::encode(route)),
                Some(indexed_path(prefix)),
            ),
            Selector::Tag(tag) => (
                format!("{}it.{}.*", self.shared.prefix, hex::encode(tag)),
                None,
            ),
        };
        let unavailable =
            |e: &dyn std::fmt::Display| StoreError::Unavailable(format!("indexed: {e}"));
        // Reading a large index takes one round trip per batch, so it gets the connect timeout
        // on top of the usual bound.
        let deadline = self.shared.connect_timeout + self.shared.response_timeout * 4;
        let read = async {
            let config = pull::OrderedConfig {
                filter_subject: filter,
                deliver_policy: DeliverPolicy::LastPerSubject,
                headers_only: true,
                ..Default::default()
            };
            let mut consumer = self
                .shared
                .stream
                .create_consumer(config)
                .await
                .map_err(|e| unavailable(&e))?;
            let pending = consumer
                .info()
                .await
                .map_err(|e| unavailable(&e))?
                .num_pending;
            let mut keys = Vec::new();
            if pending == 0 {
                return Ok(keys);
            }
            let mut messages = consumer.messages().await.map_err(|e| unavailable(&e))?;
            // At most every message the consumer had pending when it was made.
            for _ in 0..pending {
                let Some(message) = messages.next().await else {
                    break;
                };
                let message = message.map_err(|e| unavailable(&e))?;
                let left = message.info().map(|info| info.pending).unwrap_or(0);
                let headers = message.headers.clone().unwrap_or_default();
                let path_matches = match prefix {
                    None => true,
                    Some(prefix) => headers
                        .get(PATH)
                        .is_some_and(|path| entry::unescape(path.as_str()).starts_with(prefix)),
                };
                let key = message
                    .subject
                    .as_str()
                    .rsplit_once('.')
                    .and_then(|(_, hex)| KeyHash::from_hex(hex));
                if let Some(key) = key
                    && path_matches
                    && !entry::is_removal(&headers)
                {
                    keys.push(key);
                    if keys.len() >= limit {
                        break;
                    }
                }
                if left == 0 {
                    break;
                }
            }
            Ok(keys)
        };
        tokio::time::timeout(deadline, read)
            .await
            .unwrap_or(Err(StoreError::Timeout { op: "indexed" }))
    }
}
