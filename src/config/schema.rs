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

use super::settings::caching_settings;

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
    /// OpenTelemetry traces; off when absent.
    pub tracing: Option<Spanned<TracingFile>>,
}

/// `tracing:`: where spans are exported (OTLP over HTTP) and how many.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingFile {
    pub otlp_endpoint: Option<Text>,
    pub sampling_ratio: Option<Text>,
    pub service_name: Option<Text>,
    pub resource_attributes: Option<Spanned<HashMap<Text, Text>>>,
    pub export_timeout: Option<Text>,
    pub max_queue: Option<Text>,
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
    pub send_timeout: Option<Text>,
    pub min_send_rate: Option<Text>,
    pub max_connections_per_client: Option<Text>,
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

/// A route's `tls:`: what it trusts besides the usual roots, what it shows, the name it checks.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsFile {
    pub ca_file: Option<Text>,
    pub cert_file: Option<Text>,
    pub key_file: Option<Text>,
    /// The key's PEM text itself (usually `${VAR}`).
    pub key: Option<Text>,
    pub server_name: Option<Text>,
}

/// `upstream_headers: {set: {...}, add: {...}, remove: [...]}`; `set_file`/`add_file` read each
/// value from a file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamHeadersFile {
    pub set: Option<Spanned<HashMap<Text, Text>>>,
    pub set_file: Option<Spanned<HashMap<Text, Text>>>,
    pub add: Option<Spanned<HashMap<Text, Text>>>,
    pub add_file: Option<Spanned<HashMap<Text, Text>>>,
    pub remove: Option<Vec<Text>>,
}

/// One of `forward_headers:`: a name (keyed), or `{name: ..., unkeyed: true}`.
#[derive(Debug)]
pub enum ForwardFile {
    Name(String),
    Entry(ForwardEntryFile),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardEntryFile {
    pub name: Option<Text>,
    pub unkeyed: Option<Text>,
}

// Written by hand for the same reason as `QueryFile`'s.
impl<'de> Deserialize<'de> for ForwardFile {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ForwardVisitor;

        impl<'de> Visitor<'de> for ForwardVisitor {
            type Value = ForwardFile;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a header name or {name: ..., unkeyed: true}")
            }

            fn visit_str<E: de::Error>(self, name: &str) -> Result<ForwardFile, E> {
                Ok(ForwardFile::Name(name.to_string()))
            }

            fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<ForwardFile, M::Error> {
                ForwardEntryFile::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(ForwardFile::Entry)
            }
        }

        deserializer.deserialize_any(ForwardVisitor)
    }
}

/// `encoding: {accept: [gzip, br], compress: {types: [...], min_size: 1KiB, with: [br, gzip]}}`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncodingFile {
    pub accept: Option<Spanned<Vec<Text>>>,
    pub compress: Option<Spanned<CompressFile>>,
}

/// `encoding.compress`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressFile {
    pub types: Option<Spanned<Vec<Text>>>,
    pub min_size: Option<Text>,
    pub with: Option<Spanned<Vec<Text>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L1File {
    pub max_bytes: Option<Text>,
}

/// The file's side of the caching settings ([`super::settings`]): `PolicyFile` holds what
/// `defaults:` writes, and `RouteFile` the same fields beside a route's own (serde's `flatten`
/// cannot be combined with `deny_unknown_fields` nor with spans, so the table writes them twice).
macro_rules! policy_file {
    ($($(#[$doc:meta])* $name:ident: $ty:ty = $default:expr,
        file: $file:ty, check: $check:expr, show: $show:expr;)*) => {
        /// The caching settings a route inherits from `defaults:` and may override one by one.
        #[derive(Clone, Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct PolicyFile {
            $(pub $name: Option<$file>,)*
        }

        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct RouteFile {
            pub name: Option<Text>,
            #[serde(rename = "match")]
            pub matcher: Option<Spanned<MatchFile>>,
            /// A URL, or a pool (`{servers: [...], ...}`).
            pub upstream: Option<Spanned<UpstreamFile>>,
            /// HTTP/2 with prior knowledge (h2c) to this upstream.
            pub upstream_http2: Option<Text>,
            pub cache: Option<Text>,
            pub key: Option<Spanned<KeyFile>>,
            /// TLS to an https upstream.
            pub tls: Option<Spanned<UpstreamTlsFile>>,
            /// Headers added to, or removed from, every upstream request.
            pub upstream_headers: Option<Spanned<UpstreamHeadersFile>>,
            /// The `Host` sent upstream instead of the upstream url's.
            pub host: Option<Text>,
            /// Client headers forwarded on cacheable fetches.
            pub forward_headers: Option<Spanned<Vec<Spanned<ForwardFile>>>>,
            $(pub $name: Option<$file>,)*
        }

        impl RouteFile {
            /// This route's overrides of `defaults:`.
            pub fn policy(&self) -> PolicyFile {
                PolicyFile {
                    $($name: self.$name.clone(),)*
                }
            }
        }
    };
}

caching_settings!(policy_file);

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

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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

/// A route's `cookies: bypass | strip | {strip: [_ga*, _gid]}`.
#[derive(Clone, Debug)]
pub enum CookiesFile {
    /// A bare word; `validate` knows which words mean something.
    Word(String),
    Strip(Vec<Text>),
}

// Written by hand for the same reason as `QueryFile`'s.
impl<'de> Deserialize<'de> for CookiesFile {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CookiesVisitor;

        impl<'de> Visitor<'de> for CookiesVisitor {
            type Value = CookiesFile;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bypass, strip or {strip: [cookie names]}")
            }

            fn visit_str<E: de::Error>(self, word: &str) -> Result<CookiesFile, E> {
                Ok(CookiesFile::Word(word.to_string()))
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<CookiesFile, M::Error> {
                let Some(field) = map.next_key::<String>()? else {
                    return Err(de::Error::invalid_length(0, &self));
                };
                if field != "strip" {
                    return Err(de::Error::unknown_field(&field, &["strip"]));
                }
                let names = map.next_value()?;
                if let Some(extra) = map.next_key::<String>()? {
                    return Err(de::Error::unknown_field(&extra, &["strip"]));
                }
                Ok(CookiesFile::Strip(names))
            }
        }

        deserializer.deserialize_any(CookiesVisitor)
    }
}

/// A route's `upstream:`: a URL, or `{servers: [...], balance, health, outlier, retries}`.
#[derive(Debug)]
pub enum UpstreamFile {
    /// The URL's text; its place is the enclosing `Spanned`'s.
    Url(String),
    Pool(Box<PoolFile>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolFile {
    pub servers: Option<Spanned<Vec<Text>>>,
    pub balance: Option<Text>,
    pub health: Option<Spanned<HealthFile>>,
    pub outlier: Option<Spanned<OutlierFile>>,
    pub retries: Option<Spanned<RetriesFile>>,
    pub resolve_every: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthFile {
    pub path: Option<Text>,
    pub interval: Option<Text>,
    pub timeout: Option<Text>,
    pub healthy: Option<Text>,
    pub unhealthy: Option<Text>,
    pub statuses: Option<Vec<Text>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierFile {
    pub failures: Option<Text>,
    pub ejection: Option<Text>,
    pub max_ejection: Option<Text>,
    pub max_ejected: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetriesFile {
    pub attempts: Option<Text>,
    pub on: Option<Vec<Text>>,
    pub budget: Option<Text>,
    pub budget_window: Option<Text>,
    pub min_per_second: Option<Text>,
}

// Written by hand for the same reason as `QueryFile`'s.
impl<'de> Deserialize<'de> for UpstreamFile {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct UpstreamVisitor;

        impl<'de> Visitor<'de> for UpstreamVisitor {
            type Value = UpstreamFile;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a url or {servers: [...]}")
            }

            fn visit_str<E: de::Error>(self, url: &str) -> Result<UpstreamFile, E> {
                Ok(UpstreamFile::Url(url.to_string()))
            }

            fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<UpstreamFile, M::Error> {
                PoolFile::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|pool| UpstreamFile::Pool(Box::new(pool)))
            }
        }

        deserializer.deserialize_any(UpstreamVisitor)
    }
}
