//! The [`Store`] protocol on NATS JetStream KV: each operation as the lease writes of
//! [`super::lease`] and reads of the bucket.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::entry::Record;
use super::*;

#[async_trait]
impl Store for NatsKvStore {
    fn kind(&self) -> &'static str {
        "nats_kv"
    }

    /// Every write is a message on the bucket's stream, which the consumers of every process
    /// receive: the write is the event.
    fn announces(&self) -> bool {
        true
    }

    /// The bus of this store is the bucket's own stream: every event is a write of the store.
    fn events_are_writes(&self) -> bool {
        true
    }

    fn min_lease_ttl(&self) -> Duration {
        MIN_LEASE_TTL
    }

    fn max_value_len(&self) -> Option<usize> {
        Some(self.shared.max_value_len)
    }

    async fn acquire(
        &self,
        key: &KeyHash,
        lease: &LeaseRequest,
        touch: Option<Touch>,
    ) -> Result<Acquired, StoreError> {
        self.bounded(
            "acquire",
            self.acquire_or_peek("acquire", key, Some(lease), touch),
        )
        .await
    }

    async fn peek(&self, key: &KeyHash, touch: Option<Touch>) -> Result<Acquired, StoreError> {
        self.bounded("peek", self.acquire_or_peek("peek", key, None, touch))
            .await
    }

    async fn renew(
        &self,
        key: &KeyHash,
        token: Token,
        ttl: Duration,
    ) -> Result<Renewed, StoreError> {
        self.bounded("renew", async {
            let known = self.held(key, token);
            if known.as_ref().is_some_and(|held| held.over_value) {
                return self.renew_over_value(key, token, ttl).await;
            }
            let node = known.as_ref().and_then(|held| held.node.clone());
            // A remembered revision is written to without a read only while the lease surely
            // has not lapsed; past that, the read below decides.
            let mut known = known.filter(Held::live);
            for _ in 0..CAS_ROUNDS {
                let held = match known.take() {
                    Some(held) => held,
                    None => {
                        // Not remembered, or the remembered revision was stale (a renewal whose
                        // answer was lost may have moved it): find the lease as it is.
                        let slot = self.read("renew", key).await?;
                        if !lease::holds(&slot, token, entry::now_ns()) {
                            self.forget(key);
                            return Ok(Renewed::Lost);
                        }
                        match slot.record {
                            Record::Lease {
                                fence, ttl: lasts, ..
                            } => Held {
                                token,
                                revision: slot.revision,
                                fence,
                                node: node.clone(),
                                over_value: false,
                                lapses_ns: lease::plain_lapse(lasts, slot.written_ns),
                            },
                            // The only other lease there is: one riding on a value.
                            _ => return self.renew_over_value(key, token, ttl).await,
                        }
                    }
                };
                let message = Self::lease_message(
                    token,
                    held.node.as_deref(),
                    ttl,
                    Some(held.fence),
                    held.revision,
                );
                let sent = entry::now_ns();
                let written = self.publish("renew", self.entry_subject(key), message);
                // On a conflict the lease moved (a renewal whose answer was lost, or another
                // holder): the next round looks.
                if let Ok(revision) = written.await? {
                    let lapses_ns = lease::plain_lapse(ttl, sent);
                    self.remember(
                        key,
                        Held {
                            revision,
                            lapses_ns,
                            ..held
                        },
                    );
                    return Ok(Renewed::Held);
                }
            }
            Err(StoreError::Timeout { op: "renew" })
        })
        .await
    }

    async fn commit_fresh(
        &self,
        key: &KeyHash,
        token: Token,
        value: Bytes,
        fresh: Duration,
        ttl: Duration,
        sliding: bool,
        _event: Bytes,
    ) -> Result<Fenced, StoreError> {
        if value.len() > self.shared.max_value_len {
            return Err(StoreError::Protocol(format!(
                "commit: a value of {} bytes is over the server's limit of {}",
                value.len(),
                self.shared.max_value_len
            )));
        }
        self.bounded("commit", async {
            let message = |expected: u64| {
                let message = PublishMessage::build()
                    .header(entry::STATE, "value")
                    .header(entry::TOKEN, token.to_hex())
                    .header(entry::TTL_MS, millis(ttl).to_string())
                    .expected_last_subject_sequence(expected)
                    .payload(value.clone());
                let message = if fresh < ttl {
                    message.header(entry::FRESH_MS, millis(fresh).to_string())
                } else {
                    message
                };
                if sliding {
                    // Kept until its touch record lapses; see the module docs.
                    message
                        .header(entry::SLIDING, "1")
                        .header(entry::NATS_TTL, "never")
                } else {
                    message.header(entry::NATS_TTL, entry::ttl_header(ttl))
                }
            };
            let landed = |record: &Record| {
                matches!(record, Record::Value { token: Some(writer), .. } if *writer == token)
            };
            match self.fenced("commit", key, token, message, landed).await? {
                Outcome::Done(revision) => {
                    if sliding && let Err(error) = self.touch(key, revision, ttl).await {
                        // Without it the value is only swept when some read finds it stale.
                        tracing::warn!(%key, %error, "could not write a sliding value's first touch");
                    }
                    Ok(Fenced::Done)
                }
                Outcome::Lost => Ok(Fenced::Lost),
            }
        })
        .await
    }

    /// The lease rides on the value, as for a stale one (see `entry`); sliding values are not
    /// refreshed early.
    async fn lead_refresh(
        &self,
        key: &KeyHash,
        lease: &LeaseRequest,
        within: Duration,
    ) -> Result<Refresh, StoreError> {
        self.bounded("lead_refresh", async {
            for _ in 0..CAS_ROUNDS {
                let slot = self.read("lead_refresh", key).await?;
                let Record::Value {
                    ttl,
                    fresh,
                    sliding: false,
                    since_ns,
                    ..
                } = &slot.record
                else {
                    return Ok(Refresh::Idle);
                };
                let since = since_ns.unwrap_or(slot.written_ns);
                let left = entry::left(fresh.unwrap_or(*ttl), since, entry::now_ns());
                if left > within {
                    return Ok(Refresh::Idle);
                }
                if let Some(refresh) = self
                    .refresh_over("lead_refresh", key, &slot, Some(lease))
                    .await?
                {
                    return Ok(refresh);
                }
            }
            Err(StoreError::Timeout { op: "lead_refresh" })
        })
        .await
    }

    async fn release(
        &self,
        key: &KeyHash,
        token: Token,
        event: Bytes,
    ) -> Result<Fenced, StoreError> {
        // The engine hands the event it would have published; here it becomes the tombstone.
        let (state, message, response) = match Event::decode(event).map(|event| event.kind) {
            Ok(EventKind::Failed { message, response }) => ("failed", Some(message), response),
            _ => ("abandoned", None, None),
        };
        // An error response rides in the tombstone's payload when it fits; followers fetch it.
        let response = response.filter(|bytes| bytes.len() <= self.shared.max_value_len);
        self.bounded("release", async {
            // A refresh of a stale value ends by putting the value back without its lease.
            if self.held(key, token).is_none_or(|held| held.over_value)
                && let Some(done) = self
                    .release_over_value(key, token, (state, message.as_deref()))
                    .await?
            {
                return Ok(done);
            }
            let publish = |expected: u64| {
                let mut publish = tombstone(state)
                    .header(entry::TOKEN, token.to_hex())
                    .expected_last_subject_sequence(expected);
                if let Some(message) = &message {
                    publish = publish.header(entry::MESSAGE, entry::escape(message));
                }
                if let Some(response) = &response {
                    publish = publish.payload(response.clone());
                }
                publish
            };
            let landed = |record: &Record| {
                matches!(record, Record::Released { token: writer } if *writer == token)
            };
            Ok(
                match self.fenced("release", key, token, publish, landed).await? {
                    Outcome::Done(_) => Fenced::Done,
                    Outcome::Lost => Fenced::Lost,
                },
            )
        })
        .await
    }

    async fn give_up(
        &self,
        key: &KeyHash,
        token: Token,
        pass_ttl: Duration,
        _event: Bytes,
    ) -> Result<Fenced, StoreError> {
        self.bounded("give_up", async {
            let message = |expected: u64| {
                PublishMessage::build()
                    .header(entry::STATE, "pass")
                    .header(entry::TOKEN, token.to_hex())
                    .header(entry::TTL_MS, millis(pass_ttl).to_string())
                    .header(entry::NATS_TTL, entry::ttl_header(pass_ttl))
                    .expected_last_subject_sequence(expected)
            };
            let landed = |record: &Record| {
                matches!(record, Record::Pass { token: Some(writer), .. } if *writer == token)
            };
            Ok(
                match self.fenced("give_up", key, token, message, landed).await? {
                    Outcome::Done(_) => Fenced::Done,
                    Outcome::Lost => Fenced::Lost,
                },
            )
        })
        .await
    }

    async fn purge(&self, key: &KeyHash, _event: Bytes) -> Result<bool, StoreError> {
        self.bounded("purge", async {
            let slot = self.read("purge", key).await?;
            // Written even when nothing was there: other processes' L1 copies must go.
            let message = PublishMessage::build()
                .header(entry::KV_OPERATION, "PURGE")
                .header(entry::ROLLUP, "sub")
                .header(entry::STATE, "purged")
                .header(entry::NATS_TTL, entry::ttl_header(TOMBSTONE_TTL));
            self.forget(key);
            self.publish("purge", self.entry_subject(key), message)
                .await?
                .map_err(|Conflict| StoreError::Protocol("purge: unexpected conflict".into()))?;
            // What status calls gone (past its lifetime, not yet removed by the server) was not
            // there. Counted after the purge, so that a failed count (a sliding value's touch
            // record is one more read) never keeps the purge from happening; the answer then
            // falls back to what the entry held.
            let existed = match self.status_of("purge", key, &slot).await {
                Ok(status) => status != KeyStatus::Empty,
                Err(_) => !matches!(slot.record, Record::Vacant | Record::Released { .. }),
            };
            Ok(existed)
        })
        .await
    }

    async fn discard(&self, key: &KeyHash, value: &Bytes) -> Result<bool, StoreError> {
        self.bounded("discard", async {
            let slot = self.read("discard", key).await?;
            let same =
                matches!(&slot.record, Record::Value { value: stored, .. } if stored == value);
            // A value past its lifetime is no longer there to discard: the next acquire leads
            // over it anyway.
            if !same
                || !matches!(
                    self.status_of("discard", key, &slot).await?,
                    KeyStatus::Exists { .. }
                )
            {
                return Ok(false);
            }
            let message = tombstone("discarded").expected_last_subject_sequence(slot.revision);
            Ok(self
                .publish("discard", self.entry_subject(key), message)
                .await?
                .is_ok())
        })
        .await
    }

    /// The route's record is named by its generation key; see `purge.rs`.
    async fn route_generation(&self, route: &str) -> Result<u64, StoreError> {
        self.read_generation(&crate::key::generation_key(route))
            .await
    }

    /// The write is the announcement: every process's events consumer hears the record.
    async fn bump_generation(&self, _route: &str, key: &KeyHash) -> Result<u64, StoreError> {
        self.raise_generation(key).await
    }

    async fn index(&self, entry: &IndexEntry) -> Result<(), StoreError> {
        self.write_index(entry).await
    }

    async fn indexed(&self, selector: &Selector, limit: usize) -> Result<Vec<KeyHash>, StoreError> {
        self.read_index(selector, limit).await
    }

    async fn status(&self, key: &KeyHash) -> Result<KeyStatus, StoreError> {
        self.bounded("status", async {
            let slot = self.read("status", key).await?;
            self.status_of("status", key, &slot).await
        })
        .await
    }
}
