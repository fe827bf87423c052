//! The file as serde reads it: its shape, not its meaning.
//!
//! Every level denies unknown fields. Every scalar is kept as its text with its place in the file
//! ([`Spanned<String>`]); `validate` gives it meaning. So serde only fails on the file's shape (an
//! unknown field, a list where a value belongs), and every wrong value is reported, each at its
//! own place, rather than only the first one serde trips over.
//!
//! Absent and empty (`key:`, `key: ~`) are the same: the field's default.

use std::collections::HashMap;
use std::fmt;

use marked_yaml::Spanned;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

pub type Text = Spanned<String>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub listen: Option<Text>,
    pub admin: Option<Spanned<AdminFile>>,
    pub namespace: Option<Text>,
    pub store: Option<Spanned<BackendFile>>,
    pub bus: Option<Spanned<BackendFile>>,
    pub l1: Option<Spanned<L1File>>,
    pub defaults: Option<Spanned<PolicyFile>>,
    pub routes: Option<Spanned<Vec<Spanned<RouteFile>>>>,
    pub limits: Option<Spanned<LimitsFile>>,
    /// Refuse a store or bus that proves no identity (see `validate/credentials.rs`).
    pub require_auth: Option<Text>,
}

/// `limits:`: what one client connection may ask of the listener, and how shutdown drains.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    pub max_connections: Option<Text>,
    pub header_read_timeout: Option<Text>,
    pub idle_timeout: Option<Text>,
    pub max_header_count: Option<Text>,
    pub max_header_bytes: Option<Text>,
    pub max_uri_length: Option<Text>,
    pub max_request_body: Option<Text>,
    pub shutdown_grace: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    pub listen: Option<Text>,
    pub token: Option<Text>,
}

/// `store:` and `bus:` share a shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendFile {
    pub kind: Option<Text>,
    pub url: Option<Text>,
    /// The store's command timeout (the store only).
    pub timeout: Option<Text>,
    /// The store's connect timeout (the store only).
    pub connect_timeout: Option<Text>,
    /// The store's circuit breaker (the store only).
    pub breaker: Option<Spanned<BreakerFile>>,
    // Credentials and TLS; each secret may also come from a file (`*_file`).
    pub username: Option<Text>,
    pub password: Option<Text>,
    pub password_file: Option<Text>,
    pub token: Option<Text>,
    pub token_file: Option<Text>,
    pub nkey_seed: Option<Text>,
    pub nkey_seed_file: Option<Text>,
    pub creds_file: Option<Text>,
    pub sentinel_username: Option<Text>,
    pub sentinel_password: Option<Text>,
    pub sentinel_password_file: Option<Text>,
    pub tls: Option<Spanned<TlsFile>>,
    pub require_auth: Option<Text>,
}

/// `store.breaker: {failures: 5, open_for: 500ms}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerFile {
    pub failures: Option<Text>,
    pub open_for: Option<Text>,
}

/// `tls:` under `store:` or `bus:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    pub ca_file: Option<Text>,
    pub cert_file: Option<Text>,
    pub key_file: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L1File {
    pub max_bytes: Option<Text>,
}

/// The caching settings a route inherits from `defaults:` and may override one by one.
///
/// [`RouteFile`] repeats these fields: serde's `flatten` cannot be combined with
/// `deny_unknown_fields` nor with spans. [`RouteFile::policy`] gathers them back into this type.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    pub ttl: Option<Text>,
    pub expiry: Option<Text>,
    pub honor_cache_control: Option<Text>,
    pub min_ttl: Option<Text>,
    pub max_ttl: Option<Text>,
    pub lease_ttl: Option<Text>,
    pub max_fetch: Option<Text>,
    pub wait_timeout: Option<Text>,
    pub on_wait_timeout: Option<Text>,
    pub poll_interval: Option<Text>,
    pub max_body: Option<Text>,
    pub pass_ttl: Option<Text>,
    pub cache_statuses: Option<Spanned<Vec<Text>>>,
    pub honor_client_no_store: Option<Text>,
    pub ttl_jitter: Option<Text>,
    pub error_ttl: Option<Spanned<HashMap<Text, Text>>>,
    pub vary: Option<Text>,
    pub stale_while_revalidate: Option<Text>,
    pub stale_if_error: Option<Text>,
    pub early_refresh: Option<Text>,
    pub max_followers: Option<Text>,
    pub max_upstream_fetches: Option<Text>,
    pub on_store_error: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    pub name: Option<Text>,
    #[serde(rename = "match")]
    pub matcher: Option<Spanned<MatchFile>>,
    pub upstream: Option<Text>,
    /// HTTP/2 with prior knowledge (h2c) to this upstream.
    pub upstream_http2: Option<Text>,
    pub cache: Option<Text>,
    pub key: Option<Spanned<KeyFile>>,
    // The policy overrides: keep in step with `PolicyFile`.
    pub ttl: Option<Text>,
    pub expiry: Option<Text>,
    pub honor_cache_control: Option<Text>,
    pub min_ttl: Option<Text>,
    pub max_ttl: Option<Text>,
    pub lease_ttl: Option<Text>,
    pub max_fetch: Option<Text>,
    pub wait_timeout: Option<Text>,
    pub on_wait_timeout: Option<Text>,
    pub poll_interval: Option<Text>,
    pub max_body: Option<Text>,
    pub pass_ttl: Option<Text>,
    pub cache_statuses: Option<Spanned<Vec<Text>>>,
    pub honor_client_no_store: Option<Text>,
    pub ttl_jitter: Option<Text>,
    pub error_ttl: Option<Spanned<HashMap<Text, Text>>>,
    pub vary: Option<Text>,
    pub stale_while_revalidate: Option<Text>,
    pub stale_if_error: Option<Text>,
    pub early_refresh: Option<Text>,
    pub max_followers: Option<Text>,
    pub max_upstream_fetches: Option<Text>,
    pub on_store_error: Option<Text>,
}

impl RouteFile {
    /// This route's overrides of `defaults:`.
    pub fn policy(&self) -> PolicyFile {
        PolicyFile {
            ttl: self.ttl.clone(),
            expiry: self.expiry.clone(),
            honor_cache_control: self.honor_cache_control.clone(),
            min_ttl: self.min_ttl.clone(),
            max_ttl: self.max_ttl.clone(),
            lease_ttl: self.lease_ttl.clone(),
            max_fetch: self.max_fetch.clone(),
            wait_timeout: self.wait_timeout.clone(),
            on_wait_timeout: self.on_wait_timeout.clone(),
            poll_interval: self.poll_interval.clone(),
            max_body: self.max_body.clone(),
            pass_ttl: self.pass_ttl.clone(),
            cache_statuses: self.cache_statuses.clone(),
            honor_client_no_store: self.honor_client_no_store.clone(),
            ttl_jitter: self.ttl_jitter.clone(),
            error_ttl: self.error_ttl.clone(),
            vary: self.vary.clone(),
            stale_while_revalidate: self.stale_while_revalidate.clone(),
            stale_if_error: self.stale_if_error.clone(),
            early_refresh: self.early_refresh.clone(),
            max_followers: self.max_followers.clone(),
            max_upstream_fetches: self.max_upstream_fetches.clone(),
            on_store_error: self.on_store_error.clone(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchFile {
    pub path: Option<Text>,
    pub path_prefix: Option<Text>,
    pub path_regex: Option<Text>,
    pub methods: Option<Spanned<Vec<Text>>>,
    pub host: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    pub query: Option<Spanned<QueryFile>>,
    pub headers: Option<Vec<Text>>,
    pub cookies: Option<Vec<Text>>,
    pub body: Option<Text>,
}

/// `query: all | none | {include: [...]} | {exclude: [...]}`.
#[derive(Debug)]
pub enum QueryFile {
    /// A bare word; `validate` knows which words mean something.
    Word(String),
    Include(Vec<Text>),
    Exclude(Vec<Text>),
}

// Written by hand: serde's untagged enums buffer their input, which loses the spans.
impl<'de> Deserialize<'de> for QueryFile {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct QueryVisitor;

        impl<'de> Visitor<'de> for QueryVisitor {
            type Value = QueryFile;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("all, none, {include: [...]} or {exclude: [...]}")
            }

            fn visit_str<E: de::Error>(self, word: &str) -> Result<QueryFile, E> {
                Ok(QueryFile::Word(word.to_string()))
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<QueryFile, M::Error> {
                const FIELDS: &[&str] = &["include", "exclude"];
                let Some(field) = map.next_key::<String>()? else {
                    return Err(de::Error::invalid_length(0, &self));
                };
                let rule = match field.as_str() {
                    "include" => QueryFile::Include(map.next_value()?),
                    "exclude" => QueryFile::Exclude(map.next_value()?),
                    other => return Err(de::Error::unknown_field(other, FIELDS)),
                };
                if let Some(extra) = map.next_key::<String>()? {
                    return Err(de::Error::custom(format_args!(
                        "takes one of include or exclude, not also {extra}"
                    )));
                }
                Ok(rule)
            }
        }

        deserializer.deserialize_any(QueryVisitor)
    }
}
