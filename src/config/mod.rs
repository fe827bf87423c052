//! Configuration: the YAML file, read in two steps.
//!
//! 1. `schema`: serde types mirroring the file, with `deny_unknown_fields`, after `${VAR}` and
//!    `${VAR:-default}` interpolation from the environment.
//! 2. `validate`: the checked, typed [`Config`] below, which is the only thing the server takes, so
//!    an unvalidated config cannot reach it.
//!
//! Every error names the file, line and column of the value at fault ([`ConfigError`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, Method, Uri};
use regex::Regex;

use crate::engine::ExpiryMode;

mod units;

pub use units::{format_duration, format_size, parse_duration, parse_size};

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
}

#[derive(Clone, Debug)]
pub struct AdminSettings {
    /// Listener for /healthz, /readyz and /admin/*.
    pub listen: SocketAddr,
    /// Bearer token for /admin/*; `None` means /admin/* answers 403.
    pub token: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSettings {
    Memory,
    Redis { url: String },
    Nats { url: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BusSettings {
    Memory,
    Redis { url: String },
    Nats { url: String },
}

/// One route: which requests it takes, where they go, and how they are cached.
#[derive(Clone, Debug)]
pub struct Route {
    /// Unique among routes; used in metrics labels and purge requests.
    pub name: String,
    pub matcher: RouteMatch,
    /// Scheme, authority and optional path prefix the request path is appended to.
    pub upstream: Uri,
    /// `false`: plain pass-through (`cache: false`), nothing below applies.
    pub cache: bool,
    pub key: KeyRules,
    pub policy: RoutePolicy,
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

/// A route's caching settings (the file's `defaults`, overridden per route).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutePolicy {
    /// Freshness when the upstream says nothing (or is not honoured).
    pub ttl: Duration,
    /// `Sliding` carries `ttl` as its window.
    pub expiry: ExpiryMode,
    /// The upstream's `s-maxage` / `max-age` set freshness (clamped by min_ttl/max_ttl); privacy
    /// directives are obeyed whatever this says.
    pub honor_cache_control: bool,
    /// Lower bound of freshness taken from upstream headers.
    pub min_ttl: Duration,
    /// Upper bound of freshness taken from upstream headers.
    pub max_ttl: Duration,
    pub lease_ttl: Duration,
    pub max_fetch: Duration,
    /// The longest any request waits, the leader's client included.
    pub wait_timeout: Duration,
    pub on_wait_timeout: OnWaitTimeout,
    pub poll_interval: Duration,
    /// Larger responses stream through and are not stored; also the largest request body read
    /// for a body key.
    pub max_body: u64,
    pub pass_ttl: Duration,
    /// Upstream statuses that may be stored.
    pub cache_statuses: Vec<u16>,
    /// A client's `Cache-Control: no-store` sends its request straight through.
    pub honor_client_no_store: bool,
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
    /// A short lowercase phrase naming the field, e.g. "routes[1].ttl: invalid duration \"5 parsecs\"".
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

/// Reads, interpolates, parses and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    todo!("{path:?}")
}

/// Parses and validates config text; `origin` names it in messages.
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    todo!("{text}{origin}")
}
