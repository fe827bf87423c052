//! Variants: answers that vary on request headers outside the key, on `vary: honor` routes.
//!
//! The fetch that brings such an answer commits it under its variant key
//! ([`crate::http::key::variant_key`]: the request key's digest, the marker's id and the request's
//! values of the named headers) in a flight of its own, under that key's lease, and gives the
//! request key a marker naming the headers. A request that finds a marker resolves its own
//! variant as a second flight: one fetch per variant cluster-wide, and the answer that revealed the
//! variation is never fetched twice.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, StatusCode};

use super::fetch::{Fetch, Forward, Stage, VariantOf, entry};
use crate::engine::Private;
use crate::engine::{Answer, AnswerSource, Builder, Built, EngineError, Policy, Source};
use crate::envelope::{Entry, Form};
use crate::http::hop_by_hop::{connection_named, is_hop_by_hop};
use crate::http::key::variant_key;
use crate::key::KeyHash;
use crate::store::{IndexEntry, Selector};

/// What a vary marker says. Stored as a [`Form::Marker`] entry at the primary key, its body the
/// id, a newline, and the names, comma-separated.
#[derive(Debug, PartialEq)]
struct VaryMarker {
    /// Part of every variant key of this marker.
    id: String,
    /// The request headers the response varies on, outside the route's key.
    names: Vec<HeaderName>,
}

impl VaryMarker {
    /// The marker an entry is, or `None` when it is an answer.
    fn of(entry: &Entry) -> Option<Self> {
        if entry.form != Form::Marker {
            return None;
        }
        let body = std::str::from_utf8(&entry.body).ok()?;
        let (id, names) = body.split_once('\n').unwrap_or((body, ""));
        Some(VaryMarker {
            id: id.to_owned(),
            names: names
                .split(',')
                .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
                .collect(),
        })
    }

    /// The marker as the entry stored at the primary key, fresh for `ttl`.
    fn entry(&self, ttl: Duration) -> Entry {
        let names: Vec<&str> = self.names.iter().map(HeaderName::as_str).collect();
        let body = format!("{}\n{}", self.id, names.join(","));
        Entry {
            form: Form::Marker,
            ..entry(StatusCode::OK, &HeaderMap::new(), Bytes::from(body), ttl)
        }
    }
}

/// How a variant's answer is reported, given how the marker before it came: the request that
/// fetched the marker also stored its own variant (a MISS, not a HIT of what it just stored).
fn variant_source(marker: Source, variant: AnswerSource) -> AnswerSource {
    match (marker, variant) {
        (Source::Built | Source::Coalesced, AnswerSource::Shared(Source::L1 | Source::Store)) => {
            AnswerSource::Shared(marker)
        }
        _ => variant,
    }
}

/// How long a fetch waits for the store to count a marker's variants, or to record one, before
/// it goes on without (a store that hangs must not hold every new variant).
const COUNT_BUDGET: Duration = Duration::from_millis(250);

/// The tag under which a marker's variants are indexed, so that any replica can count them:
/// indexed only by corral, and purged with them.
fn variants_tag(marker: &str) -> String {
    format!("corral-variants-{marker}")
}

/// A request's variant of a marker: the fetch that fills it, its key, and how the marker came.
pub(super) struct VariantFetch {
    pub fetch: Fetch,
    pub key: KeyHash,
    /// How the marker was answered, which says how the variant's answer is reported.
    pub through: Source,
}

impl Fetch {
    /// When `primary` is a vary marker: this request's variant of it, to resolve next.
    pub(super) fn variant_of(&self, primary: &Answer, client: &HeaderMap) -> Option<VariantFetch> {
        let AnswerSource::Shared(through) = primary.source else {
            return None;
        };
        let marker = VaryMarker::of(&primary.entry)?;
        let key = variant_key(&self.key, &marker.id, &marker.names, client).hash;
        let of = VariantOf {
            names: marker.names,
            marker: marker.id,
            key,
        };
        Some(VariantFetch {
            fetch: self.variant(of, client),
            key,
            through,
        })
    }

    /// Resolves the variant `key` with this (variant) fetch as its build, within `left`.
    pub(super) async fn resolve_variant(
        self: &Arc<Self>,
        key: &KeyHash,
        through: Source,
        policy: &Policy,
        left: Duration,
    ) -> Result<Answer, EngineError> {
        let answer = self
            .proxy
            .engine
            .fetch(key, policy, self.builder(), left)
            .await;
        answer.map(|mut answer| {
            answer.source = variant_source(through, answer.source);
            answer
        })
    }

    /// The fetch of this request's variant of a marker naming `names`: the same request, with
    /// the client's values of those headers forwarded whatever the route's forwarding rules, since
    /// the variant key holds them.
    fn variant(&self, of: VariantOf, client: &HeaderMap) -> Fetch {
        let hop_by_hop = connection_named(client);
        let forward = self.forward().map(|forward| {
            let mut headers = forward.headers.clone();
            for name in &of.names {
                headers.remove(name);
                if !is_hop_by_hop(name, &hop_by_hop) {
                    for value in client.get_all(name) {
                        headers.append(name.clone(), value.clone());
                    }
                }
            }
            Forward {
                uri: forward.uri.clone(),
                headers,
            }
        });
        Fetch {
            proxy: self.proxy.clone(),
            snapshot: self.snapshot.clone(),
            route: self.route,
            request: self.request.clone(),
            client: self.client,
            kept: self.kept.clone(),
            forward: OnceLock::from(forward),
            body: self.body.clone(),
            key: self.key,
            stage: Stage::Variant(of),
            asked: self.asked,
            upstream: OnceLock::new(),
        }
    }

    /// Commits `entry` under its variant key (the headers this fetch sent, for `names`), in a
    /// flight of its own under that key's lease, and returns the marker the primary key stores.
    /// The client that fetched it then finds its variant already there.
    pub(super) async fn store_variant(&self, entry: Entry, names: Vec<HeaderName>) -> Built {
        let route = &self.snapshot.config.routes[self.route];
        let id = format!("{:032x}", rand::random::<u128>());
        // The headers this fetch sent (it did send: its answer is what is being stored).
        let unsent = HeaderMap::new();
        let sent = self.forward().map_or(&unsent, |forward| &forward.headers);
        let variant = variant_key(&self.key, &id, &names, sent);
        self.count_variant(variant.hash, &id, &entry).await;
        let ttl = entry.ttl;
        let stored: Builder = Arc::new(move |_role| {
            let entry = entry.clone();
            Box::pin(async move { Ok(Built::Shared(entry)) })
        });
        let policy = &self.snapshot.policies[self.route];
        if let Err(error) = (self.proxy.engine)
            .fetch(&variant.hash, policy, stored, route.policy.wait_timeout)
            .await
        {
            // The marker still goes in: each variant's first request then fetches it.
            tracing::debug!(%error, route = %route.name, "a variant could not be stored");
        }
        Built::Shared(VaryMarker { id, names }.entry(ttl))
    }

    /// Whether this variant's answer is stored: only when it varies on nothing but the marker's
    /// headers, and when the marker has fewer than `max_variants` variants, counted cluster-wide
    /// in the store's tag index (this one included if already counted). Fetches of new variants
    /// that run at once may each pass the count, so a marker holds at most `max_variants` plus
    /// the variants being fetched at that moment. A store that does not answer the count in time
    /// does not stop the variant. Only a fetch that `stores` its answer counts it.
    pub(super) async fn admit_variant(
        &self,
        entry: Entry,
        outside: &[HeaderName],
        of: &VariantOf,
        stores: bool,
    ) -> Built {
        if !outside.iter().all(|name| of.names.contains(name)) {
            return Built::Private(Private::new(entry, "vary"));
        }
        let most = self.snapshot.config.routes[self.route].policy.max_variants;
        let tag = Selector::Tag(variants_tag(&of.marker));
        let store = self.proxy.engine.store();
        let counted = tokio::time::timeout(COUNT_BUDGET, store.indexed(&tag, most + 1)).await;
        if let Ok(Ok(known)) = counted
            && known.len() >= most
            && !known.contains(&of.key)
        {
            return Built::Private(Private::new(entry, "max-variants"));
        }
        if stores {
            self.count_variant(of.key, &of.marker, &entry).await;
        }
        Built::Shared(entry)
    }

    /// Records the variant `key` of `marker` in the store's tag index, for as long as `entry` may
    /// be served; a failure only makes the count low, so it is logged, not fatal.
    async fn count_variant(&self, key: KeyHash, marker: &str, entry: &Entry) {
        let route = &self.snapshot.config.routes[self.route];
        let indexed = IndexEntry {
            route: route.name.clone(),
            path: self.request.uri.path().to_owned(),
            key,
            tags: vec![variants_tag(marker)],
            ttl: entry.ttl + entry.stale.max(entry.stale_if_error),
        };
        let engine = &self.proxy.engine;
        match tokio::time::timeout(COUNT_BUDGET, engine.index(&indexed)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::debug!(%error, route = %route.name, "a variant could not be counted");
            }
            Err(_) => tracing::debug!(route = %route.name, "a variant was not counted in time"),
        }
    }
}
