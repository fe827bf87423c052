//! The lease protocol over the bucket's revisions: how long a lease or a value has left, and the
//! compare-and-set writes (take, refresh, renew, release, a fenced commit) that every store
//! operation is made of.

use std::time::Duration;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;

use super::entry::{Record, Slot};
use super::*;

impl NatsKvStore {
    /// How long a lease has left before the server surely removed it; `None` once it is stuck
    /// (see [`STUCK_LEASE`]), i.e. lapsed by [`lapse`]'s rule.
    pub(super) fn lease_left(slot: &Slot, ttl: Duration, now_ns: i128) -> Option<Duration> {
        if now_ns >= plain_lapse(ttl, slot.written_ns) {
            return None;
        }
        let age = slot.age(now_ns);
        let server = entry::server_ttl(ttl);
        Some(
            (server + EXPIRY_SLACK)
                .checked_sub(age)
                .unwrap_or(EXPIRY_SLACK),
        )
    }

    /// The time a value has left; for a sliding value, counted from its last touch, and touched
    /// (a touch record written, never the value) when `touch` asks and it has fallen below
    /// `ttl - slack`. Zero means stale.
    pub(super) async fn value_left(
        &self,
        op: &'static str,
        key: &KeyHash,
        slot: &Slot,
        ttl: Duration,
        sliding: bool,
        touch: Option<Touch>,
    ) -> Result<Duration, StoreError> {
        let now = entry::now_ns();
        let own = entry::left(ttl, slot.written_ns, now);
        if !sliding || ttl.is_zero() {
            return Ok(own);
        }
        // Written less than a slack ago: no touch is due, and its own age is a lower bound.
        if let Some(touch) = touch
            && ttl - own < touch.slack
        {
            return Ok(own);
        }
        let since = match self.last(op, self.touch_subject(key)).await? {
            Some(message) => match entry::parse_touch(&message) {
                Some(touched) if touched.revision == slot.revision => {
                    touched.written_ns.max(slot.written_ns)
                }
                _ => slot.written_ns,
            },
            None => slot.written_ns,
        };
        let left = entry::left(ttl, since, now);
        match touch {
            Some(touch) if !left.is_zero() && left < ttl.saturating_sub(touch.slack) => {
                if let Err(error) = self.touch(key, slot.revision, ttl).await {
                    tracing::warn!(%key, %error, "could not touch a sliding value");
                    return Ok(left);
                }
                Ok(ttl)
            }
            _ => Ok(left),
        }
    }

    /// Writes a sliding value's touch record: a headers-only message that says the value at
    /// `revision` was read now, and lapses with the value's window.
    pub(super) async fn touch(
        &self,
        key: &KeyHash,
        revision: u64,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let message = PublishMessage::build()
            .header(entry::STATE, "touch")
            .header(entry::REVISION, revision.to_string())
            .header(entry::NATS_TTL, entry::ttl_header(ttl));
        self.publish("touch", self.touch_subject(key), message)
            .await?
            .map(|_| ())
            .map_err(|Conflict| StoreError::Protocol("touch: unexpected conflict".into()))
    }

    /// What `slot` holds for readers (read-only, never a touch): a value, pass marker or lease
    /// whose lifetime is over is nothing, whether or not the server has removed it yet. Status
    /// answers it; purge and discard go by it too, so no answer counts what status calls gone.
    pub(super) async fn status_of(
        &self,
        op: &'static str,
        key: &KeyHash,
        slot: &Slot,
    ) -> Result<KeyStatus, StoreError> {
        let now = entry::now_ns();
        Ok(match &slot.record {
            Record::Value {
                ttl,
                sliding,
                since_ns,
                ..
            } => {
                let ttl_left = match since_ns {
                    // Published again (under or after a refresh): counts from its first write.
                    Some(since) => entry::left(*ttl, *since, now),
                    None => self.value_left(op, key, slot, *ttl, *sliding, None).await?,
                };
                if ttl_left.is_zero() {
                    KeyStatus::Empty
                } else {
                    KeyStatus::Exists { ttl_left }
                }
            }
            Record::Pass { ttl, .. } => match entry::left(*ttl, slot.written_ns, now) {
                ttl_left if ttl_left.is_zero() => KeyStatus::Empty,
                ttl_left => KeyStatus::Pass { ttl_left },
            },
            Record::Lease { ttl, .. } => match Self::lease_left(slot, *ttl, now) {
                Some(lease_left) => KeyStatus::Pending { lease_left },
                None => KeyStatus::Empty,
            },
            Record::Vacant | Record::Released { .. } => KeyStatus::Empty,
        })
    }

    /// A lease message, expecting `expected` as the entry's last revision.
    pub(super) fn lease_message(
        token: Token,
        node: Option<&str>,
        ttl: Duration,
        fence: Option<u64>,
        expected: u64,
    ) -> PublishMessage {
        let mut message = PublishMessage::build()
            .header(entry::STATE, "lease")
            .header(entry::TOKEN, token.to_hex())
            .header(entry::TTL_MS, millis(ttl).to_string())
            .header(entry::NATS_TTL, entry::ttl_header(ttl))
            .expected_last_subject_sequence(expected);
        if let Some(node) = node {
            message = message.header(entry::NODE, entry::escape(node));
        }
        if let Some(fence) = fence {
            message = message.header(entry::FENCE, fence.to_string());
        }
        message
    }

    pub(super) async fn acquire_or_peek(
        &self,
        op: &'static str,
        key: &KeyHash,
        lease: Option<&LeaseRequest>,
        touch: Option<Touch>,
    ) -> Result<Acquired, StoreError> {
        for _ in 0..CAS_ROUNDS {
            let slot = self.read(op, key).await?;
            match &slot.record {
                Record::Value {
                    ttl,
                    fresh,
                    sliding,
                    value,
                    since_ns,
                    ..
                } => {
                    let now = entry::now_ns();
                    let since = since_ns.unwrap_or(slot.written_ns);
                    let ttl_left = if *sliding {
                        self.value_left(op, key, &slot, *ttl, true, touch).await?
                    } else {
                        entry::left(*ttl, since, now)
                    };
                    let fresh_left = fresh.map(|fresh| entry::left(fresh, since, now));
                    match fresh_left {
                        _ if ttl_left.is_zero() => {}
                        Some(left) if left.is_zero() => {
                            // Stale: the lease to refresh it rides on the value (see `entry`).
                            let Some(refresh) = self.refresh_over(op, key, &slot, lease).await?
                            else {
                                continue;
                            };
                            return Ok(Acquired::Stale {
                                value: value.clone(),
                                ttl_left,
                                refresh,
                            });
                        }
                        fresh_left => {
                            return Ok(Acquired::Hit {
                                value: value.clone(),
                                ttl_left: fresh_left.unwrap_or(ttl_left),
                            });
                        }
                    }
                }
                Record::Pass { ttl, .. } => {
                    let ttl_left = entry::left(*ttl, slot.written_ns, entry::now_ns());
                    if !ttl_left.is_zero() {
                        return Ok(Acquired::Pass { ttl_left });
                    }
                }
                Record::Lease { token, fence, ttl } => {
                    if let Some(lease_left) = Self::lease_left(&slot, *ttl, entry::now_ns()) {
                        return Ok(match lease {
                            // Its own lease: a create whose answer was lost to a client-side
                            // timeout made it, and the retry must lead, not wait on itself.
                            Some(lease) if lease.token == *token => {
                                self.remember(
                                    key,
                                    Held {
                                        token: *token,
                                        revision: slot.revision,
                                        fence: *fence,
                                        node: Some(lease.node.clone()),
                                        over_value: false,
                                        lapses_ns: plain_lapse(*ttl, slot.written_ns),
                                    },
                                );
                                Acquired::Lead { fence: *fence }
                            }
                            _ => Acquired::Wait {
                                lease_left,
                                lease: Some(token.lease_id()),
                            },
                        });
                    }
                }
                Record::Vacant | Record::Released { .. } => {}
            }
            // Nothing live: stale values, lapsed pass markers and stuck leases are replaced by the
            // lease like a tombstone is.
            let Some(lease) = lease else {
                return Ok(Acquired::Empty);
            };
            let message = Self::lease_message(
                lease.token,
                Some(&lease.node),
                lease.ttl,
                None,
                slot.revision,
            );
            let sent = entry::now_ns();
            match self.publish(op, self.entry_subject(key), message).await? {
                Ok(revision) => {
                    self.remember(
                        key,
                        Held {
                            token: lease.token,
                            revision,
                            fence: revision,
                            node: Some(lease.node.clone()),
                            over_value: false,
                            lapses_ns: plain_lapse(lease.ttl, sent),
                        },
                    );
                    return Ok(Acquired::Lead { fence: revision });
                }
                // Another writer got there first; look again.
                Err(Conflict) => continue,
            }
        }
        Err(StoreError::Timeout { op })
    }

    /// Who refreshes the value in `slot`: a live refresh lease on it (the caller's own, or
    /// another's), or, when `lease` is given and there is none, a lease taken now by publishing
    /// the value again with it. `None`: another writer got there first; look again.
    pub(super) async fn refresh_over(
        &self,
        op: &'static str,
        key: &KeyHash,
        slot: &Slot,
        lease: Option<&LeaseRequest>,
    ) -> Result<Option<Refresh>, StoreError> {
        if !matches!(slot.record, Record::Value { .. }) {
            return Ok(Some(Refresh::Idle));
        }
        let now = entry::now_ns();
        let live = lapse(slot).filter(|&(_, at)| now < at);
        match (live, lease) {
            (Some((holder, at)), Some(lease)) if holder == lease.token => {
                self.remember(
                    key,
                    Self::held_over(lease, slot.revision, slot.revision, at),
                );
                Ok(Some(Refresh::Lead {
                    fence: slot.revision,
                }))
            }
            (Some((holder, at)), _) => Ok(Some(Refresh::Elsewhere {
                lease_left: Duration::from_nanos(u64::try_from(at - now).unwrap_or(u64::MAX)),
                lease: Some(holder.lease_id()),
            })),
            (None, None) => Ok(Some(Refresh::Idle)),
            (None, Some(lease)) => {
                let Some(message) =
                    republish(slot, Some((lease.token, lease.ttl)), None, slot.revision)
                else {
                    return Ok(Some(Refresh::Idle));
                };
                let sent = entry::now_ns();
                match self.publish(op, self.entry_subject(key), message).await? {
                    Ok(revision) => {
                        let lapses_ns = riding_lapse(slot, lease.ttl, sent);
                        self.remember(key, Self::held_over(lease, revision, revision, lapses_ns));
                        Ok(Some(Refresh::Lead { fence: revision }))
                    }
                    Err(Conflict) => Ok(None),
                }
            }
        }
    }

    /// A refresh lease this process holds on a value, lapsing at `lapses_ns`.
    pub(super) fn held_over(
        lease: &LeaseRequest,
        revision: u64,
        fence: u64,
        lapses_ns: i128,
    ) -> Held {
        Held {
            token: lease.token,
            revision,
            fence,
            node: Some(lease.node.clone()),
            over_value: true,
            lapses_ns,
        }
    }

    /// Renews a refresh lease riding on a value: the value is published again with the lease's
    /// new lifetime, if the token still holds it and it has not lapsed (a lapsed one is free for
    /// the next caller to take, so it is not its old holder's to extend).
    pub(super) async fn renew_over_value(
        &self,
        key: &KeyHash,
        token: Token,
        ttl: Duration,
    ) -> Result<Renewed, StoreError> {
        for _ in 0..CAS_ROUNDS {
            let slot = self.read("renew", key).await?;
            let riding = matches!(
                &slot.record,
                Record::Value { lease: Some((holder, _)), .. } if *holder == token
            );
            let held = riding && holds(&slot, token, entry::now_ns());
            let message = republish(&slot, Some((token, ttl)), None, slot.revision);
            let (true, Some(message)) = (held, message) else {
                self.forget(key);
                return Ok(Renewed::Lost);
            };
            let sent = entry::now_ns();
            if let Ok(revision) = self
                .publish("renew", self.entry_subject(key), message)
                .await?
            {
                let fence = self.held(key, token).map_or(revision, |held| held.fence);
                self.remember(
                    key,
                    Held {
                        token,
                        revision,
                        fence,
                        node: None,
                        over_value: true,
                        lapses_ns: riding_lapse(&slot, ttl, sent),
                    },
                );
                return Ok(Renewed::Held);
            }
        }
        Err(StoreError::Timeout { op: "renew" })
    }

    /// Ends a refresh lease riding on a value without a new value: the value is published again
    /// without it, saying why, so waiters hear the outcome and the stale value stays. `None` when
    /// the entry holds no such lease of `token` (the caller goes the usual way); lost when it
    /// lapsed (readers already see nobody refreshing, and the value is left as it is).
    pub(super) async fn release_over_value(
        &self,
        key: &KeyHash,
        token: Token,
        released: (&'static str, Option<&str>),
    ) -> Result<Option<Fenced>, StoreError> {
        for _ in 0..CAS_ROUNDS {
            let slot = self.read("release", key).await?;
            let held = matches!(
                &slot.record,
                Record::Value { lease: Some((holder, _)), .. } if *holder == token
            );
            if !held {
                return Ok(None);
            }
            self.forget(key);
            let message = republish(&slot, None, Some(released), slot.revision);
            let (true, Some(message)) = (holds(&slot, token, entry::now_ns()), message) else {
                return Ok(Some(Fenced::Lost));
            };
            if self
                .publish("release", self.entry_subject(key), message)
                .await?
                .is_ok()
            {
                return Ok(Some(Fenced::Done));
            }
        }
        Err(StoreError::Timeout { op: "release" })
    }

    /// A write that only the lease holder may make: it names the lease's revision (remembered while
    /// surely live, or read), so the server rejects it once the lease is gone; a lease still there
    /// but lapsed by [`lapse`]'s rule is lost too, as readers already report it so. `landed`
    /// recognises the write itself (by its token), which a try whose answer was lost may have made.
    pub(super) async fn fenced(
        &self,
        op: &'static str,
        key: &KeyHash,
        token: Token,
        message: impl Fn(u64) -> PublishMessage,
        landed: impl Fn(&Record) -> bool,
    ) -> Result<Outcome, StoreError> {
        let mut expected = self
            .held(key, token)
            .filter(Held::live)
            .map(|held| held.revision);
        let mut timed_out = None;
        for _ in 0..CAS_ROUNDS {
            let revision = match expected.take() {
                Some(revision) => revision,
                None => {
                    let slot = match self.read(op, key).await {
                        Ok(slot) => slot,
                        Err(error) => return Err(timed_out.unwrap_or(error)),
                    };
                    if landed(&slot.record) {
                        self.forget(key);
                        return Ok(Outcome::Done(slot.revision));
                    }
                    if !holds(&slot, token, entry::now_ns()) {
                        self.forget(key);
                        return Ok(Outcome::Lost);
                    }
                    slot.revision
                }
            };
            match self
                .publish(op, self.entry_subject(key), message(revision))
                .await
            {
                Ok(Ok(revision)) => {
                    self.forget(key);
                    return Ok(Outcome::Done(revision));
                }
                // The lease moved on (or an earlier try of this very write landed): look.
                Ok(Err(Conflict)) => {}
                // It may have been applied; the next look tells.
                Err(error) if error.is_timeout() => timed_out = Some(error),
                Err(error) => return Err(error),
            }
        }
        Err(timed_out.unwrap_or(StoreError::Timeout { op }))
    }

    /// Removes a sliding value that was not read within its window (its touch record lapsed).
    /// Several processes may try; the compare-and-set lets one win.
    pub(crate) async fn sweep(&self, key: &KeyHash) -> Result<bool, StoreError> {
        self.bounded("sweep", async {
            let slot = self.read("sweep", key).await?;
            let Record::Value {
                ttl, sliding: true, ..
            } = &slot.record
            else {
                return Ok(false);
            };
            let left = self
                .value_left("sweep", key, &slot, *ttl, true, None)
                .await?;
            if !left.is_zero() {
                return Ok(false);
            }
            let message = tombstone("expired").expected_last_subject_sequence(slot.revision);
            Ok(self
                .publish("sweep", self.entry_subject(key), message)
                .await?
                .is_ok())
        })
        .await
    }
}

/// Who holds the lease in `slot` and when it lapses (server ns, compared with this process's
/// clock), by the one rule that status, peek, acquire and the holder's own writes all follow, so
/// that no write lands under a lease a reader already reports lapsed, and none is refused under
/// one a reader still reports held. `None` when the slot holds no lease.
pub(super) fn lapse(slot: &Slot) -> Option<(Token, i128)> {
    match &slot.record {
        Record::Lease { token, ttl, .. } => Some((*token, plain_lapse(*ttl, slot.written_ns))),
        Record::Value {
            lease: Some((holder, ttl)),
            ..
        } => Some((*holder, riding_lapse(slot, *ttl, slot.written_ns))),
        _ => None,
    }
}

/// Whether `token` holds a lease in `slot` that has not lapsed at `now_ns`.
pub(super) fn holds(slot: &Slot, token: Token, now_ns: i128) -> bool {
    lapse(slot).is_some_and(|(holder, at)| holder == token && now_ns < at)
}

/// A plain lease of `ttl` written at `written_ns` lapses once it is stuck: the server removes it
/// sooner (its delete marker is vacant to every reader), and until then it is held.
pub(super) fn plain_lapse(ttl: Duration, written_ns: i128) -> i128 {
    after(written_ns, entry::server_ttl(ttl) + STUCK_LEASE)
}

/// A refresh lease of `ttl` written at `written_ns` over the value in `slot` has no server TTL of
/// its own: it lapses at the end of its lifetime, or of the value's (which readers then see as
/// nothing at all), whichever comes first.
pub(super) fn riding_lapse(slot: &Slot, ttl: Duration, written_ns: i128) -> i128 {
    let own = after(written_ns, ttl);
    match &slot.record {
        Record::Value {
            ttl: value_ttl,
            since_ns,
            ..
        } => own.min(after(since_ns.unwrap_or(slot.written_ns), *value_ttl)),
        _ => own,
    }
}

/// The instant `d` after `ns`.
fn after(ns: i128, d: Duration) -> i128 {
    ns.saturating_add(i128::try_from(d.as_nanos()).unwrap_or(i128::MAX))
}

/// The value in `slot` published again, expecting `expected`: with a refresh lease, or saying its
/// refresh was `released` (and why); its first timestamp kept, so its freshness and lifetime still
/// count from then. `None` when `slot` holds no value, or one whose lifetime is over.
pub(super) fn republish(
    slot: &Slot,
    lease: Option<(Token, Duration)>,
    released: Option<(&'static str, Option<&str>)>,
    expected: u64,
) -> Option<PublishMessage> {
    let Record::Value {
        token,
        ttl,
        fresh,
        sliding: false,
        value,
        since_ns,
        ..
    } = &slot.record
    else {
        return None;
    };
    let since = since_ns.unwrap_or(slot.written_ns);
    let left = entry::left(*ttl, since, entry::now_ns());
    if left.is_zero() {
        return None;
    }
    let mut message = PublishMessage::build()
        .header(entry::STATE, "value")
        .header(entry::TTL_MS, millis(*ttl).to_string())
        .header(entry::SINCE_NS, since.to_string())
        .header(entry::NATS_TTL, entry::ttl_header(left))
        .expected_last_subject_sequence(expected)
        .payload(value.clone());
    if let Some(token) = token {
        message = message.header(entry::TOKEN, token.to_hex());
    }
    if let Some(fresh) = fresh {
        message = message.header(entry::FRESH_MS, millis(*fresh).to_string());
    }
    if let Some((holder, lease_ttl)) = lease {
        message = message
            .header(entry::LEASE_TOKEN, holder.to_hex())
            .header(entry::LEASE_TTL_MS, millis(lease_ttl).to_string());
    }
    if let Some((state, why)) = released {
        message = message.header(entry::RELEASED, state);
        if let Some(why) = why {
            message = message.header(entry::MESSAGE, entry::escape(why));
        }
    }
    Some(message)
}

/// A delete that leaves a tombstone of `state`, which itself lapses after [`TOMBSTONE_TTL`].
pub(super) fn tombstone(state: &'static str) -> PublishMessage {
    PublishMessage::build()
        .header(entry::KV_OPERATION, "DEL")
        .header(entry::STATE, state)
        .header(entry::NATS_TTL, entry::ttl_header(TOMBSTONE_TTL))
}

/// Milliseconds, saturating.
pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Timeouts may have been applied on the server, so they are told apart; a message over the
/// server's limit is a protocol error (the engine checks the limit first); the rest means the
/// server or the bucket cannot be reached or used right now.
pub(super) fn publish_error(op: &'static str, e: &PublishError) -> StoreError {
    match e.kind() {
        PublishErrorKind::TimedOut => StoreError::Timeout { op },
        PublishErrorKind::MaxPayloadExceeded => StoreError::Protocol(format!("{op}: {e}")),
        _ => StoreError::Unavailable(format!("{op}: {e}")),
    }
}
