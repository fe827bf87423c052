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

use super::fetch::{Fetch, Forward, Stage, entry};
use crate::engine::{Answer, AnswerSource, Builder, Built, EngineError, Policy, Source};
use crate::envelope::{Entry, Form};
use crate::http::hop_by_hop::{connection_named, is_hop_by_hop};
use crate::http::key::variant_key;
use crate::key::KeyHash;

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
        Some(VariantFetch {
            fetch: self.variant(marker.names, client),
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
    fn variant(&self, names: Vec<HeaderName>, client: &HeaderMap) -> Fetch {
        let hop_by_hop = connection_named(client);
        let forward = self.forward().map(|forward| {
            let mut headers = forward.headers.clone();
            for name in &names {
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
            stage: Stage::Variant(names),
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
}
