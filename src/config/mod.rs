//! Configuration: the YAML file, read in two steps.
//!
//! 1. `schema`: serde types mirroring the file, with `deny_unknown_fields` at every level, read
//!    from a YAML tree whose values have had `${VAR}` and `${VAR:-default}` expanded from the
//!    environment (`interpolate`) and which remembers every value's line and column (`document`).
//! 2. `validate`: the checked, typed [`Config`] below, which is the only thing the server takes, so
//!    an unvalidated config cannot reach it.
//!
//! Every error names the file, line and column of the value at fault ([`ConfigError`]), and every
//! error in the file is reported, not just the first. [`describe`] prints the result as
//! `corral check` shows it.
//!
//! Layout: `schema` (the file's shape), `document` (YAML to schema, with places), `interpolate`
//! (`${VAR}`), `units` (durations and sizes), `validate` (schema to [`Config`]), `describe`.
//!
//! Conventions of the file:
//! - Durations are humantime strings (`10s`, `1m 30s`, `500ms`, `365d`); a bare number is refused.
//! - Sizes are bytes, or a whole number with `KiB`/`MiB`/`GiB`/`TiB` (powers of 1024) or
//!   `KB`/`MB`/`GB`/`TB` (powers of 1000); units are case-insensitive.
//! - A field left empty (`ttl:`) or null (`ttl: ~`) takes its default; an empty `admin.token`
//!   means no token. `methods: []` means every method.
//! - `${NAME}` fails when `NAME` is unset; `${NAME:-default}` falls back when it is unset or
//!   empty; `$${` writes a literal `${`. Only values are expanded, after parsing, so a variable
//!   never changes the file's structure nor any position in it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method, Uri};
use regex::Regex;

use crate::credentials::Credentials;
use crate::credentials::redact;
use crate::engine::{ExpiryMode, OnStoreError};
use crate::http::encoding::Coding;

mod describe;
mod document;
mod interpolate;
mod schema;
mod settings;
mod units;
mod upstream;
mod validate;

pub use describe::{describe, digest};
pub use units::{format_duration, format_size, parse_duration, parse_size};
pub use upstream::{
    Balance, HealthSettings, KeySource, OutlierSettings, PoolSettings, Protocol, RetrySettings,
    UpstreamHeaders, UpstreamSettings, UpstreamTls,
};

/// `admin.listen` when the file leaves it out: loopback only, on the port the shipped configs,
/// the image and the `corral healthcheck` and `corral purge` clients all use.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    8081,
));

/// The admin listener's URL at [`DEFAULT_ADMIN_LISTEN`], where the CLI clients look by default.
pub fn default_admin_url() -> String {
    format!("http://{DEFAULT_ADMIN_LISTEN}")
}

/// A checked configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the file came from (for messages); `None` for built-in configs (the demo).
    pub source: Option<PathBuf>,
    /// The public listener.
    pub listen: SocketAddr,
    pub admin: AdminSettings,
    /// Replicas with the same namespace and store coalesce together.
    pub namespace: String,
    pub store: StoreSettings,
    /// Resolved: when the file names no bus, it follows the store.
    pub bus: BusSettings,
    /// L1 size in bytes; 0 turns it off.
    pub l1_max_bytes: u64,
    /// First match wins.
    pub routes: Vec<Route>,
    /// What one client connection may ask of the listeners, and how long shutdown drains.
    pub limits: Limits,
    /// How long store calls may take, and the store's circuit breaker.
    pub store_limits: StoreLimits,
    /// The store's credentials and TLS beyond what its url carries.
    pub store_credentials: Credentials,
    /// The bus's: the store's own when the bus shares the store's url.
    pub bus_credentials: Credentials,
    /// `require_auth` was set (anywhere), and validation found every backend it covers proving
    /// an identity.
    pub require_auth: bool,
    /// What the file allows but should think twice about, each at its place: `corral check`
    /// prints them and the server logs them at start.
    pub warnings: Vec<Problem>,
    /// Where spans go (`tracing:`); `None`: no spans are made at all. Read at start only.
    pub tracing: Option<TracingSettings>,
}

/// `tracing:`: OpenTelemetry spans exported over OTLP/HTTP (protobuf).
#[derive(Clone, Debug, PartialEq)]
pub struct TracingSettings {
    /// The collector's traces URL: `otlp_endpoint` with `/v1/traces` appended unless it already
    /// ends so.
    pub endpoint: String,
    /// The share of traces started here that are kept, 0.0 to 1.0; a client's `traceparent`
    /// decides for the traces it continues.
    pub sampling_ratio: f64,
    /// `service.name` of every span.
    pub service_name: String,
    /// More resource attributes, in name order (`service.instance.id` among them overrides the
    /// host and process id corral names itself by).
    pub resource_attributes: Vec<(String, String)>,
    /// The longest one export may take (its retries included), and the longest shutdown waits
    /// for the last spans to leave.
    pub export_timeout: Duration,
    /// Finished spans waiting for export; past it, new spans are dropped (and logged).
    pub max_queue: usize,
}

/// The listeners' limits (`limits:`): every connection and request head is bounded, so a slow or
/// hostile client costs a bounded amount of memory and time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Open client connections per listener; a connection beyond it is answered 503 and closed
    /// at once, never queued.
    pub max_connections: usize,
    /// From a request's first byte to its last header line; a client slower than this (a
    /// slowloris trickle) is disconnected.
    pub header_read_timeout: Duration,
    /// How long a keep-alive connection may sit with no request before it is closed.
    pub idle_timeout: Duration,
    /// Header fields in one request head; beyond: 431.
    pub max_header_count: usize,
    /// Bytes of header fields in one request head (names, values and their separators); beyond: 431.
    pub max_header_bytes: usize,
    /// Bytes of the request target (path and query); beyond: 414.
    pub max_uri_length: usize,
    /// Bytes of a request body on any route, counted as it streams; beyond: 413.
    pub max_request_body: u64,
    /// On SIGTERM or SIGINT: how long requests in flight may take to finish before every lease
    /// still held is abandoned and the remaining connections are closed.
    pub shutdown_grace: Duration,
    /// The longest one write to a client may wait on it (its receive window shut); then the
    /// connection is cut, so a client that stops reading frees what its answer holds.
    pub send_timeout: Duration,
    /// Bytes per second a client must take, over the time writes to it waited, once it has used
    /// up `send_timeout` of waiting on one answer; 0: off. Stops a client that reads a byte now
    /// and then to stay under `send_timeout`.
    pub min_send_rate: u64,
    /// Open connections per client address and listener; beyond, a connection is answered 503
    /// and closed at once. 0: no limit.
    pub max_connections_per_client: usize,
}

impl Default for Limits {
    /// The values `limits:` takes when the file leaves them out.
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_header_count: 100,
            max_header_bytes: 16 << 10,
            max_uri_length: 8 << 10,
            max_request_body: 16 << 20,
            shutdown_grace: Duration::from_secs(10),
            send_timeout: Duration::from_secs(60),
            min_send_rate: 1 << 10,
            max_connections_per_client: 0,
        }
    }
}

/// The limits of store calls (`store.timeout`, `store.connect_timeout`, `store.breaker`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreLimits {
    /// Longest wait for one store command's answer; past it the call is a timeout (and, with
    /// others in a row, opens the breaker).
    pub timeout: Duration,
    /// Longest wait for a connection to the store, at start and for each reconnect.
    pub connect_timeout: Duration,
    pub breaker: crate::store::breaker::BreakerSettings,
}

impl Default for StoreLimits {
    fn default() -> Self {
        Self {
            timeout: crate::engine::DEFAULT_STORE_TIMEOUT,
            connect_timeout: crate::engine::DEFAULT_STORE_CONNECT_TIMEOUT,
            breaker: crate::store::breaker::BreakerSettings::default(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct AdminSettings {
    /// Listener for /healthz, /readyz and /admin/*.
    pub listen: SocketAddr,
    /// Bearer token for /admin/*; `None` means /admin/* answers 403.
    pub token: Option<String>,
}

#[derive(Clone, PartialEq, Eq)]
pub enum StoreSettings {
    Memory,
    Redis { url: String },
    Nats { url: String },
}

#[derive(Clone, PartialEq, Eq)]
pub enum BusSettings {
    Memory,
    Redis { url: String },
    Nats { url: String },
}

// Written by hand so that a password in a url never reaches a log line.
impl std::fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreSettings::Memory => f.write_str("Memory"),
            StoreSettings::Redis { url } => write!(f, "Redis {{ url: {:?} }}", redact(url)),
            StoreSettings::Nats { url } => write!(f, "Nats {{ url: {:?} }}", redact(url)),
        }
    }
}

impl std::fmt::Debug for BusSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BusSettings::Memory => f.write_str("Memory"),
            BusSettings::Redis { url } => write!(f, "Redis {{ url: {:?} }}", redact(url)),
            BusSettings::Nats { url } => write!(f, "Nats {{ url: {:?} }}", redact(url)),
        }
    }
}

/// One route: which requests it takes, where they go, and how they are cached.
#[derive(Clone, Debug)]
pub struct Route {
    /// Unique among routes; used in metrics labels and purge requests.
    pub name: String,
    pub matcher: RouteMatch,
    /// Scheme, authority and optional path prefix the request path is appended to.
    pub upstream: Uri,
    /// Speak HTTP/2 with prior knowledge (h2c) to the upstream instead of HTTP/1.1.
    pub upstream_http2: bool,
    /// `false`: plain pass-through (`cache: false`), nothing below applies.
    pub cache: bool,
    pub key: KeyRules,
    pub policy: RoutePolicy,
    /// TLS, timeouts and headers of the upstream requests: one value shared by every server
    /// the route sends to.
    pub upstream_settings: Arc<UpstreamSettings>,
    /// Client headers a cacheable fetch forwards although the key does not hold them
    /// (`forward_headers` marked `unkeyed`): the first requester's value is sent for everyone.
    /// Those the key holds are in [`KeyRules::headers`].
    pub forward_unkeyed: Vec<HeaderName>,
}

#[derive(Clone, Debug)]
pub struct RouteMatch {
    pub path: PathMatch,
    /// Empty means every method.
    pub methods: Vec<Method>,
    /// Exact host (without port), lowercase; `None` matches any host.
    pub host: Option<String>,
}

#[derive(Clone, Debug)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

/// What goes into a request's key besides route, method and path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRules {
    pub query: QueryRule,
    /// Request headers in the key, lowercase, in a fixed (sorted) order.
    pub headers: Vec<HeaderName>,
    /// Cookie names in the key, sorted. A request carrying other cookies is bypassed.
    pub cookies: Vec<String>,
    /// The request body's digest is part of the key (makes POST cacheable on this route).
    pub body: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueryRule {
    /// Every parameter, sorted by name then value.
    All,
    None,
    /// Only these names (sorted).
    Include(Vec<String>),
    /// Every parameter except these names.
    Exclude(Vec<String>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnWaitTimeout {
    /// 504 with a reason.
    Error,
    /// Fetch directly, do not store.
    Bypass,
}

/// The effective side of the caching settings ([`settings`]).
macro_rules! route_policy {
    ($($(#[$doc:meta])* $name:ident: $ty:ty = $default:expr,
        file: $file:ty, check: $check:expr, show: $show:expr;)*) => {
        /// A route's caching settings (the file's `defaults`, overridden per route).
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub struct RoutePolicy {
            $($(#[$doc])* pub $name: $ty,)*
        }

        impl Default for RoutePolicy {
            /// The values a route gets when neither it nor `defaults:` says otherwise.
            fn default() -> Self {
                RoutePolicy {
                    $($name: $default,)*
                }
            }
        }
    };
}

settings::caching_settings!(route_policy);

impl RoutePolicy {
    /// What the engine needs of this policy, for the route `label`: the one place a caching
    /// setting reaches the engine.
    pub fn engine(&self, label: &str) -> crate::engine::Policy {
        crate::engine::Policy {
            expiry: self.expiry,
            lease_ttl: self.lease_ttl,
            max_fetch: self.max_fetch,
            poll_interval: self.poll_interval,
            pass_ttl: self.pass_ttl,
            label: label.into(),
            early_refresh: self.early_refresh.map(|beta| beta.0),
            max_followers: self.max_followers,
            on_store_error: self.on_store_error,
            revalidate_keep: crate::engine::DEFAULT_REVALIDATE_KEEP,
        }
    }
}

/// How a route treats a response whose `Vary` names request headers outside its key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VaryMode {
    /// Not stored (hit-for-pass): the key cannot tell the variants apart.
    #[default]
    Key,
    /// Stored as a variant: the primary key holds a marker naming the headers, and each variant
    /// is its own key (the primary digest plus those headers' values).
    Honor,
}

/// Which rules a route follows where corral's defaults and a standard shared cache differ.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Semantics {
    /// corral's defaults: an answer without freshness is stored for the route's `ttl`.
    #[default]
    Coalescing,
    /// A standard RFC 9111 shared cache: freshness only from the upstream (or the route's
    /// heuristic), no `ttl` fallback nor `min_ttl` floor, `Vary` honoured with variants, and the
    /// client's end-to-end headers forwarded on cacheable fetches.
    Rfc9111,
}

/// What a cacheable route does with a request's cookies that its key does not read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum CookieMode {
    /// The request bypasses the cache: its cookies could make its answer private.
    #[default]
    Bypass,
    /// Every unkeyed cookie is left out of the shared fetch, and the request is answered from
    /// the shared entry.
    Strip,
    /// Cookies whose names match one of these patterns (`*` for any run of characters) are left
    /// out; any other unkeyed cookie still bypasses.
    StripNamed(Vec<String>),
}

/// A route's content encoding (`encoding:`): what a cacheable fetch asks of the upstream, and
/// which identity answers are compressed once when stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoding {
    /// The codings a cacheable fetch asks for, most wanted first; empty: identity only.
    pub accept: Vec<Coding>,
    /// Which identity answers are compressed when stored, and into what.
    pub compress: Compress,
}

impl Default for Encoding {
    fn default() -> Self {
        Encoding {
            // gzip first: every client takes it, so an answer stored as the upstream sent it
            // rarely has to be decoded for a client.
            accept: vec![Coding::Gzip, Coding::Br, Coding::Zstd],
            compress: Compress::default(),
        }
    }
}

/// `encoding.compress`: identity answers compressed once, when stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compress {
    /// Media types worth compressing, lowercase, each with at most one `*`.
    pub types: Vec<String>,
    /// Bodies shorter than this many bytes are stored as they are.
    pub min_size: u64,
    /// The codings made of each such answer; empty: none.
    pub with: Vec<Coding>,
}

/// The media types compressed by default: text, and the structured formats APIs answer with.
pub const COMPRESSIBLE_TYPES: [&str; 9] = [
    "text/*",
    "application/json",
    "application/*+json",
    "application/javascript",
    "application/xml",
    "application/*+xml",
    "application/x-ndjson",
    "application/wasm",
    "image/svg+xml",
];

impl Default for Compress {
    fn default() -> Self {
        Compress {
            types: COMPRESSIBLE_TYPES.map(str::to_owned).to_vec(),
            min_size: 1024,
            with: vec![Coding::Br, Coding::Gzip],
        }
    }
}

/// The beta of early refresh: how eagerly hits refresh before expiry (1 is the usual value,
/// larger refreshes earlier). Validated finite and above zero, so equality is total.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Beta(pub f64);

impl Eq for Beta {}

impl Default for KeyRules {
    /// The file's default: every query parameter, no headers, no cookies, no body.
    fn default() -> Self {
        KeyRules {
            query: QueryRule::All,
            headers: Vec::new(),
            cookies: Vec::new(),
            body: false,
        }
    }
}

/// Why a configuration was refused: every problem, each with its place in the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

/// One problem: `file:line:column: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    /// 1-based; 0 when the problem has no place (e.g. the file cannot be read).
    pub line: usize,
    /// 1-based; 0 when the problem has no place.
    pub column: usize,
    /// A short lowercase phrase naming the field, e.g. `routes[1].ttl: invalid duration "5 parsecs": ...`.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )
        }
    }
}

/// Reads, interpolates, parses and validates a config file, with variables from the process
/// environment. The file is named in messages as `path` was given.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        let mut problems = Problems::new(&origin);
        problems.add(
            Place::default(),
            "",
            format!("cannot read the config file: {e}"),
        );
        problems.into_error()
    })?;
    let mut config = parse(&text, &origin)?;
    config.source = Some(path.to_path_buf());
    Ok(config)
}

/// Parses and validates config text; `origin` names it in messages. Variables come from the
/// process environment.
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    parse_with_env(text, origin, &|name| {
        std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())
    })
}

/// Like [`parse`], looking `${VAR}` up with `env` instead of the process environment.
pub fn parse_with_env(
    text: &str,
    origin: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let mut problems = Problems::new(origin);
    let file = document::read(text, env, &mut problems);
    let config = file.and_then(|file| validate::validate(file, &mut problems));
    match config {
        Some(mut config) if problems.is_empty() => {
            config.warnings = std::mem::take(&mut problems.warnings);
            Ok(config)
        }
        _ => Err(problems.into_error()),
    }
}

// ----- collecting problems

/// Where a value sits in the file: 1-based line and column; zero for nowhere.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Place {
    line: usize,
    column: usize,
}

/// Every problem found so far in one file.
struct Problems {
    file: String,
    list: Vec<Problem>,
    /// Warnings: reported, not refused.
    warnings: Vec<Problem>,
    /// Field paths already reported: one problem per field is enough, and a second one is
    /// usually a consequence of the first (a value of the wrong shape is also "missing"; a
    /// mistyped `path_prefx` leaves its `match` with no path).
    reported: Vec<String>,
}

impl Problems {
    fn new(file: &str) -> Self {
        Problems {
            file: file.to_string(),
            list: Vec::new(),
            warnings: Vec::new(),
            reported: Vec::new(),
        }
    }

    /// Records a problem with the field at `path` (empty for the file as a whole), unless that
    /// field, or one inside it, already has one.
    fn add(&mut self, place: Place, path: &str, message: impl std::fmt::Display) {
        if !path.is_empty() {
            let covered = |reported: &String| {
                reported
                    .strip_prefix(path)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
            };
            if self.reported.iter().any(covered) {
                return;
            }
            self.reported.push(path.to_string());
        }
        let message = match path {
            "" => message.to_string(),
            path => format!("{path}: {message}"),
        };
        self.list.push(Problem {
            file: self.file.clone(),
            line: place.line,
            column: place.column,
            message,
        });
    }

    fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Records a warning about the field at `path`.
    fn warn(&mut self, place: Place, path: &str, message: impl std::fmt::Display) {
        self.warnings.push(Problem {
            file: self.file.clone(),
            line: place.line,
            column: place.column,
            message: format!("{path}: {message}"),
        });
    }

    /// The problems in file order.
    fn into_error(mut self) -> ConfigError {
        self.list.sort_by_key(|p| (p.line, p.column));
        ConfigError {
            problems: self.list,
        }
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod upstream_tests;
