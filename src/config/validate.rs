//! From the file's shape to a checked [`Config`]: every value parsed, every default applied, every
//! contradiction refused; each problem reported at its place, and all of them, not just the first.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderName, Method, Uri};
use marked_yaml::Spanned;
use regex::Regex;

use super::schema::{
    BackendFile, BreakerFile, File, KeyFile, LimitsFile, MatchFile, PolicyFile, QueryFile,
    RouteFile, Text,
};
use super::units::{self, format_duration};
use super::{
    AdminSettings, Beta, BusSettings, Config, KeyRules, Limits, OnWaitTimeout, PathMatch, Place,
    Problems, QueryRule, Route, RouteMatch, RoutePolicy, StoreLimits, StoreSettings, VaryMode,
};
use crate::engine::{ExpiryMode, OnStoreError};
use crate::store::breaker::BreakerSettings;

mod credentials;

/// Every way a value can be wrong. Each reads after the field's path: `routes[1].ttl: ...`.
#[derive(Debug, thiserror::Error)]
enum Invalid {
    #[error("missing ({0})")]
    Missing(&'static str),
    #[error("invalid duration {text:?}: {reason}")]
    Duration { text: String, reason: String },
    #[error("invalid size {text:?}: {reason}")]
    Size { text: String, reason: String },
    #[error("must be above zero")]
    Zero,
    #[error("expected true or false, got {0:?}")]
    Bool(String),
    #[error("unknown value {text:?} (expected {expected})")]
    Word {
        text: String,
        expected: &'static str,
    },
    #[error("invalid address {0:?} (expected ip:port, e.g. 0.0.0.0:8080)")]
    Listen(String),
    #[error("invalid namespace {0:?} (1 to 64 of A-Z, a-z, 0-9, _ and -)")]
    Namespace(String),
    #[error("invalid url {text:?} for the {kind} {role} (expected {schemes})")]
    UrlScheme {
        text: String,
        kind: &'static str,
        role: &'static str,
        schemes: &'static str,
    },
    #[error("invalid redis url {text:?}: {reason}")]
    RedisUrl { text: String, reason: String },
    #[error("the memory {0} takes no url")]
    UrlUnused(&'static str),
    #[error(
        "a {bus} bus contradicts store.kind nats, whose key-value store brings its own events \
         (remove bus)"
    )]
    BusKindContradictsNats { bus: &'static str },
    #[error(
        "a bus on {bus} contradicts the nats store on {store}, whose key-value store brings its \
         own events (remove bus)"
    )]
    BusUrlContradictsNats { bus: String, store: String },
    #[error("{0} is below 1s, the unit of the nats key-value store's ttl (store.kind nats)")]
    LeaseBelowNatsUnit(String),
    #[error("{value} is above {other} {other_value}")]
    MinAboveMax {
        value: String,
        other: String,
        other_value: String,
    },
    #[error("{value} is below {other} {other_value}")]
    MaxBelowMin {
        value: String,
        other: String,
        other_value: String,
    },
    #[error("invalid status {0:?}")]
    Status(String),
    #[error("{0} is not a status code (100 to 599)")]
    StatusRange(u16),
    #[error("{0} is an upstream failure and is never stored (of the 5xx, only 501 may be)")]
    StatusFailure(u16),
    #[error(
        "unknown http method {0:?} (expected GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, \
         TRACE or CONNECT)"
    )]
    Method(String),
    #[error("needs one of path, path_prefix or path_regex")]
    NoPath,
    #[error("takes one of path, path_prefix or path_regex, not both {0} and {1}")]
    SeveralPaths(&'static str, &'static str),
    #[error("{0:?} does not start with /")]
    RelativePath(String),
    #[error("invalid regex: {0}")]
    Regex(String),
    #[error("invalid host {0:?} (a host name, without scheme, port or path)")]
    Host(String),
    #[error("invalid upstream {text:?}: {reason}")]
    Upstream { text: String, reason: &'static str },
    #[error("invalid route name {0:?} (1 to 64 of A-Z, a-z, 0-9, ., _ and -)")]
    RouteName(String),
    #[error("duplicate route name {name:?} (first on line {line})")]
    DuplicateName { name: String, line: usize },
    #[error("invalid header name {0:?}")]
    Header(String),
    #[error("invalid cookie name {0:?}")]
    Cookie(String),
    #[error("invalid query parameter name {0:?}")]
    QueryName(String),
    #[error("at least one route is required")]
    NoRoutes,
    #[error("invalid percentage {0:?} (expected 0% to 100%, e.g. 10%)")]
    Percent(String),
    #[error("invalid early_refresh {0:?} (expected true, false, or a beta above 0, e.g. 1.0)")]
    EarlyRefresh(String),
    #[error("needs expiry: absolute (a sliding entry is never stale, so it has no stale window)")]
    StaleWithSliding,
    #[error("{value} is above {max}, the most it may be")]
    AboveMax { value: String, max: String },
    #[error("invalid count {0:?} (expected a whole number from 1 to {1})")]
    CountUpTo(String, u32),
    #[error("only the store takes {0} (move it under store:)")]
    StoreOnly(&'static str),
    #[error("invalid count {0:?} (expected a whole number above zero)")]
    Count(String),
    #[error("{value} is above the most this limit may be, {most}")]
    AboveMost { value: String, most: String },
}

/// The most header fields `limits.max_header_count` may allow (each is parsed into a slot
/// allocated up front).
const MAX_HEADER_COUNT: usize = 10_000;
/// The most bytes `limits.max_header_bytes` and `limits.max_uri_length` may allow: a request head
/// is buffered whole in memory before it is parsed.
const MAX_HEAD_BYTES: usize = 1 << 20;

/// A whole number above zero.
fn count(text: &str) -> Result<usize, Invalid> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err(Invalid::Zero),
        Ok(n) => Ok(n),
        Err(_) => Err(Invalid::Count(text.to_string())),
    }
}

/// A whole number above zero and at most `most`.
fn bounded_count(text: &str, most: usize) -> Result<usize, Invalid> {
    match count(text)? {
        n if n > most => Err(Invalid::AboveMost {
            value: n.to_string(),
            most: most.to_string(),
        }),
        n => Ok(n),
    }
}

/// A size above zero and at most `most` bytes.
fn bounded_size(text: &str, most: usize) -> Result<usize, Invalid> {
    match size(text)? {
        0 => Err(Invalid::Zero),
        n if n > most as u64 => Err(Invalid::AboveMost {
            value: units::format_size(n),
            most: units::format_size(most as u64),
        }),
        n => Ok(n as usize),
    }
}

/// Bounds of the store's limits: long enough for any store worth waiting on, short enough that a
/// typo (`5m` for `5ms`) cannot make every request wait minutes on a store that is down.
const MAX_STORE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_STORE_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_BREAKER_OPEN_FOR: Duration = Duration::from_secs(60);
const MAX_BREAKER_FAILURES: u32 = 1000;

/// Checks `file` into a [`Config`]; `None` when anything is wrong (every reason is in `problems`).
pub fn validate(file: Spanned<File>, problems: &mut Problems) -> Option<Config> {
    Checker { problems }.config(&file)
}

/// A parsed value and where the file wrote it.
#[derive(Clone, Debug)]
struct Set<T> {
    value: T,
    place: Place,
    path: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Memory,
    Redis,
    Nats,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Memory => "memory",
            Kind::Redis => "redis",
            Kind::Nats => "nats",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expiry {
    Absolute,
    Sliding,
}

/// The policy values one layer of the file sets: `defaults:` or a route's overrides.
#[derive(Clone, Debug, Default)]
struct Layer {
    ttl: Option<Set<Duration>>,
    expiry: Option<Set<Expiry>>,
    honor_cache_control: Option<Set<bool>>,
    min_ttl: Option<Set<Duration>>,
    max_ttl: Option<Set<Duration>>,
    lease_ttl: Option<Set<Duration>>,
    max_fetch: Option<Set<Duration>>,
    wait_timeout: Option<Set<Duration>>,
    on_wait_timeout: Option<Set<OnWaitTimeout>>,
    poll_interval: Option<Set<Duration>>,
    max_body: Option<Set<u64>>,
    pass_ttl: Option<Set<Duration>>,
    cache_statuses: Option<Set<Vec<u16>>>,
    honor_client_no_store: Option<Set<bool>>,
    ttl_jitter: Option<Set<u8>>,
    error_ttl: Option<Set<BTreeMap<u16, Duration>>>,
    vary: Option<Set<VaryMode>>,
    stale_while_revalidate: Option<Set<Duration>>,
    stale_if_error: Option<Set<Duration>>,
    early_refresh: Option<Set<Option<Beta>>>,
    max_followers: Option<Set<usize>>,
    max_upstream_fetches: Option<Set<usize>>,
    on_store_error: Option<Set<OnStoreError>>,
}

impl Layer {
    /// This layer where it says something, `base` elsewhere.
    fn over(self, base: &Layer) -> Layer {
        fn or<T: Clone>(mine: Option<Set<T>>, base: &Option<Set<T>>) -> Option<Set<T>> {
            mine.or_else(|| base.clone())
        }
        Layer {
            ttl: or(self.ttl, &base.ttl),
            expiry: or(self.expiry, &base.expiry),
            honor_cache_control: or(self.honor_cache_control, &base.honor_cache_control),
            min_ttl: or(self.min_ttl, &base.min_ttl),
            max_ttl: or(self.max_ttl, &base.max_ttl),
            lease_ttl: or(self.lease_ttl, &base.lease_ttl),
            max_fetch: or(self.max_fetch, &base.max_fetch),
            wait_timeout: or(self.wait_timeout, &base.wait_timeout),
            on_wait_timeout: or(self.on_wait_timeout, &base.on_wait_timeout),
            poll_interval: or(self.poll_interval, &base.poll_interval),
            max_body: or(self.max_body, &base.max_body),
            pass_ttl: or(self.pass_ttl, &base.pass_ttl),
            cache_statuses: or(self.cache_statuses, &base.cache_statuses),
            honor_client_no_store: or(self.honor_client_no_store, &base.honor_client_no_store),
            ttl_jitter: or(self.ttl_jitter, &base.ttl_jitter),
            error_ttl: or(self.error_ttl, &base.error_ttl),
            vary: or(self.vary, &base.vary),
            stale_while_revalidate: or(self.stale_while_revalidate, &base.stale_while_revalidate),
            stale_if_error: or(self.stale_if_error, &base.stale_if_error),
            early_refresh: or(self.early_refresh, &base.early_refresh),
            max_followers: or(self.max_followers, &base.max_followers),
            max_upstream_fetches: or(self.max_upstream_fetches, &base.max_upstream_fetches),
            on_store_error: or(self.on_store_error, &base.on_store_error),
        }
    }

    /// The policy this layer makes, with the built-in defaults where nothing was written.
    fn policy(&self) -> RoutePolicy {
        fn get<T: Clone>(set: &Option<Set<T>>, default: T) -> T {
            set.as_ref().map_or(default, |s| s.value.clone())
        }
        let d = RoutePolicy::default();
        let ttl = get(&self.ttl, d.ttl);
        RoutePolicy {
            ttl,
            expiry: match get(&self.expiry, Expiry::Absolute) {
                Expiry::Absolute => ExpiryMode::Absolute,
                Expiry::Sliding => ExpiryMode::Sliding { window: ttl },
            },
            honor_cache_control: get(&self.honor_cache_control, d.honor_cache_control),
            min_ttl: get(&self.min_ttl, d.min_ttl),
            max_ttl: get(&self.max_ttl, d.max_ttl),
            lease_ttl: get(&self.lease_ttl, d.lease_ttl),
            max_fetch: get(&self.max_fetch, d.max_fetch),
            wait_timeout: get(&self.wait_timeout, d.wait_timeout),
            on_wait_timeout: get(&self.on_wait_timeout, d.on_wait_timeout),
            poll_interval: get(&self.poll_interval, d.poll_interval),
            max_body: get(&self.max_body, d.max_body),
            pass_ttl: get(&self.pass_ttl, d.pass_ttl),
            cache_statuses: get(&self.cache_statuses, d.cache_statuses),
            honor_client_no_store: get(&self.honor_client_no_store, d.honor_client_no_store),
            ttl_jitter: get(&self.ttl_jitter, d.ttl_jitter),
            error_ttl: get(&self.error_ttl, d.error_ttl),
            vary: get(&self.vary, d.vary),
            stale_while_revalidate: get(&self.stale_while_revalidate, d.stale_while_revalidate),
            stale_if_error: get(&self.stale_if_error, d.stale_if_error),
            early_refresh: get(&self.early_refresh, d.early_refresh),
            max_followers: get(&self.max_followers, d.max_followers),
            max_upstream_fetches: get(&self.max_upstream_fetches, d.max_upstream_fetches),
            on_store_error: get(&self.on_store_error, d.on_store_error),
        }
    }
}

struct Checker<'p> {
    problems: &'p mut Problems,
}

impl Checker<'_> {
    fn report(&mut self, place: Place, path: &str, invalid: Invalid) {
        self.problems.add(place, path, invalid);
    }

    /// Parses a written value; `None` when it is wrong (reported).
    fn check<T>(
        &mut self,
        text: &Text,
        path: &str,
        parse: impl FnOnce(&str) -> Result<T, Invalid>,
    ) -> Option<T> {
        parse(text)
            .map_err(|invalid| self.report(Place::of(text), path, invalid))
            .ok()
    }

    /// Parses an optional value, keeping its place; `None` when unset or wrong (reported).
    fn value<T>(
        &mut self,
        text: &Option<Text>,
        path: &str,
        parse: impl FnOnce(&str) -> Result<T, Invalid>,
    ) -> Option<Set<T>> {
        let text = text.as_ref().filter(|t| !t.is_empty())?;
        let value = self.check(text, path, parse)?;
        Some(Set {
            value,
            place: Place::of(text),
            path: path.to_string(),
        })
    }

    /// Parses a value that has a default: `Some(default)` when unset, `None` when wrong.
    fn or_default<T>(
        &mut self,
        text: &Option<Text>,
        path: &str,
        default: T,
        parse: impl FnOnce(&str) -> Result<T, Invalid>,
    ) -> Option<T> {
        match text.as_ref().filter(|t| !t.is_empty()) {
            None => Some(default),
            Some(text) => self.check(text, path, parse),
        }
    }

    /// Parses a value that cannot be left out; reports it missing at `missing_at`.
    fn required<T>(
        &mut self,
        text: &Option<Text>,
        path: &str,
        missing_at: Place,
        expected: &'static str,
        parse: impl FnOnce(&str) -> Result<T, Invalid>,
    ) -> Option<T> {
        match text {
            Some(text) if !text.is_empty() => self.check(text, path, parse),
            _ => {
                self.report(missing_at, path, Invalid::Missing(expected));
                None
            }
        }
    }

    /// A list of values, each checked.
    fn list<T>(
        &mut self,
        list: &[Text],
        path: &str,
        parse: impl Fn(&str) -> Result<T, Invalid>,
    ) -> Option<Vec<T>> {
        let mut names = Vec::new();
        let mut ok = true;
        for (i, text) in list.iter().enumerate() {
            match self.check(text, &format!("{path}[{i}]"), &parse) {
                Some(name) => names.push(name),
                None => ok = false,
            }
        }
        ok.then_some(names)
    }

    fn config(&mut self, file: &Spanned<File>) -> Option<Config> {
        let any = |port| SocketAddr::from(([0, 0, 0, 0], port));
        let local = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let public = self.or_default(&file.listen, "listen", any(8080), listen);
        let admin = match file.admin.as_deref() {
            None => Some(AdminSettings {
                listen: local(9090),
                token: None,
            }),
            Some(admin) => self
                .or_default(&admin.listen, "admin.listen", local(9090), listen)
                .map(|listen| AdminSettings {
                    listen,
                    token: admin
                        .token
                        .as_ref()
                        .map(|t| t.to_string())
                        .filter(|t| !t.is_empty()),
                }),
        };
        let namespace = self.or_default(&file.namespace, "namespace", "corral".into(), namespace);
        let store = self.store(file.store.as_ref());
        let store_limits = match file.store.as_deref() {
            None => Some(StoreLimits::default()),
            Some(store) => self.store_limits(store),
        };
        let bus = store
            .as_ref()
            .and_then(|store| self.bus(file.bus.as_ref(), store));
        let l1_max_bytes = match file.l1.as_deref() {
            None => Some(256 << 20),
            Some(l1) => self.or_default(&l1.max_bytes, "l1.max_bytes", 256 << 20, size),
        };
        let nats_store = matches!(store, Some(StoreSettings::Nats { .. }));
        let routes = self.routes(file, nats_store);
        let limits = match file.limits.as_deref() {
            None => Some(Limits::default()),
            Some(limits) => self.limits(limits),
        };
        let (store_credentials, bus_credentials, require_auth) = match (&store, &bus) {
            (Some(store), Some(bus)) => {
                let store_credentials = self.store_credentials(file.store.as_ref(), store);
                let bus_credentials =
                    self.bus_credentials(file.bus.as_ref(), bus, store, &store_credentials);
                let require_auth =
                    self.require_auth(file, (store, &store_credentials), (bus, &bus_credentials));
                (store_credentials, bus_credentials, require_auth)
            }
            _ => Default::default(),
        };
        Some(Config {
            source: None,
            listen: public?,
            admin: admin?,
            namespace: namespace?,
            store: store?,
            bus: bus?,
            l1_max_bytes: l1_max_bytes?,
            routes: routes?,
            store_limits: store_limits?,
            limits: limits?,
            store_credentials,
            bus_credentials,
            require_auth,
        })
    }

    // ----- limits

    fn limits(&mut self, file: &LimitsFile) -> Option<Limits> {
        let d = Limits::default();
        let max_connections = self.or_default(
            &file.max_connections,
            "limits.max_connections",
            d.max_connections,
            count,
        );
        let header_read_timeout = self.or_default(
            &file.header_read_timeout,
            "limits.header_read_timeout",
            d.header_read_timeout,
            positive_duration,
        );
        let idle_timeout = self.or_default(
            &file.idle_timeout,
            "limits.idle_timeout",
            d.idle_timeout,
            positive_duration,
        );
        let max_header_count = self.or_default(
            &file.max_header_count,
            "limits.max_header_count",
            d.max_header_count,
            |t| bounded_count(t, MAX_HEADER_COUNT),
        );
        let max_header_bytes = self.or_default(
            &file.max_header_bytes,
            "limits.max_header_bytes",
            d.max_header_bytes,
            |t| bounded_size(t, MAX_HEAD_BYTES),
        );
        let max_uri_length = self.or_default(
            &file.max_uri_length,
            "limits.max_uri_length",
            d.max_uri_length,
            |t| bounded_size(t, MAX_HEAD_BYTES),
        );
        let max_request_body = self.or_default(
            &file.max_request_body,
            "limits.max_request_body",
            d.max_request_body,
            |t| match size(t)? {
                0 => Err(Invalid::Zero),
                n => Ok(n),
            },
        );
        let shutdown_grace = self.or_default(
            &file.shutdown_grace,
            "limits.shutdown_grace",
            d.shutdown_grace,
            positive_duration,
        );
        Some(Limits {
            max_connections: max_connections?,
            header_read_timeout: header_read_timeout?,
            idle_timeout: idle_timeout?,
            max_header_count: max_header_count?,
            max_header_bytes: max_header_bytes?,
            max_uri_length: max_uri_length?,
            max_request_body: max_request_body?,
            shutdown_grace: shutdown_grace?,
        })
    }

    // ----- store and bus

    fn store(&mut self, file: Option<&Spanned<BackendFile>>) -> Option<StoreSettings> {
        let Some(file) = file else {
            return Some(StoreSettings::Memory);
        };
        let kind = self.or_default(&file.kind, "store.kind", Kind::Memory, backend_kind)?;
        let url = self.url(file, "store", kind, None)?;
        Some(match (kind, url) {
            (Kind::Redis, Some(url)) => StoreSettings::Redis { url },
            (Kind::Nats, Some(url)) => StoreSettings::Nats { url },
            _ => StoreSettings::Memory,
        })
    }

    /// `store.timeout`, `store.connect_timeout` and `store.breaker`, each bounded.
    fn store_limits(&mut self, file: &BackendFile) -> Option<StoreLimits> {
        let d = StoreLimits::default();
        let timeout = self.or_default(&file.timeout, "store.timeout", d.timeout, |t| {
            bounded_duration(t, MAX_STORE_TIMEOUT)
        });
        let connect_timeout = self.or_default(
            &file.connect_timeout,
            "store.connect_timeout",
            d.connect_timeout,
            |t| bounded_duration(t, MAX_STORE_CONNECT_TIMEOUT),
        );
        let breaker = match file.breaker.as_deref() {
            None => Some(d.breaker),
            Some(breaker) => self.breaker(breaker),
        };
        Some(StoreLimits {
            timeout: timeout?,
            connect_timeout: connect_timeout?,
            breaker: breaker?,
        })
    }

    fn breaker(&mut self, file: &BreakerFile) -> Option<BreakerSettings> {
        let d = BreakerSettings::default();
        let failures =
            self.or_default(
                &file.failures,
                "store.breaker.failures",
                d.failures,
                |t| match t.trim().parse::<u32>() {
                    Ok(n) if (1..=MAX_BREAKER_FAILURES).contains(&n) => Ok(n),
                    _ => Err(Invalid::CountUpTo(t.to_string(), MAX_BREAKER_FAILURES)),
                },
            );
        let open_for = self.or_default(&file.open_for, "store.breaker.open_for", d.open_for, |t| {
            bounded_duration(t, MAX_BREAKER_OPEN_FOR)
        });
        Some(BreakerSettings {
            failures: failures?,
            open_for: open_for?,
        })
    }

    /// Refuses the store's limits under `bus:`, where they would silently do nothing.
    fn store_only(&mut self, file: &BackendFile) -> bool {
        let mut ok = true;
        for (field, place) in [
            ("timeout", file.timeout.as_ref().map(Place::of)),
            (
                "connect_timeout",
                file.connect_timeout.as_ref().map(Place::of),
            ),
            ("breaker", file.breaker.as_ref().map(Place::of)),
        ] {
            if let Some(place) = place {
                self.report(place, &format!("bus.{field}"), Invalid::StoreOnly(field));
                ok = false;
            }
        }
        ok
    }

    /// The bus: the store's own when the file names none, or names no kind.
    fn bus(
        &mut self,
        file: Option<&Spanned<BackendFile>>,
        store: &StoreSettings,
    ) -> Option<BusSettings> {
        let (store_kind, store_url) = match store {
            StoreSettings::Memory => (Kind::Memory, None),
            StoreSettings::Redis { url } => (Kind::Redis, Some(url.as_str())),
            StoreSettings::Nats { url } => (Kind::Nats, Some(url.as_str())),
        };
        let (kind, url) = match file {
            None => (store_kind, store_url.map(str::to_string)),
            Some(file) => {
                if !self.store_only(file) {
                    return None;
                }
                let kind = self.or_default(&file.kind, "bus.kind", store_kind, backend_kind)?;
                if store_kind == Kind::Nats && kind != Kind::Nats {
                    let place = file.kind.as_ref().map_or(Place::of(file), Place::of);
                    let bus = kind.name();
                    self.report(place, "bus.kind", Invalid::BusKindContradictsNats { bus });
                    return None;
                }
                let inherited = store_url.filter(|_| kind == store_kind);
                let url = self.url(file, "bus", kind, inherited)?;
                if let (Kind::Nats, Some(store), Some(bus), Some(text)) =
                    (store_kind, store_url, &url, &file.url)
                    && bus != store
                {
                    let invalid = Invalid::BusUrlContradictsNats {
                        bus: bus.clone(),
                        store: store.to_string(),
                    };
                    self.report(Place::of(text), "bus.url", invalid);
                    return None;
                }
                (kind, url)
            }
        };
        Some(match (kind, url) {
            (Kind::Redis, Some(url)) => BusSettings::Redis { url },
            (Kind::Nats, Some(url)) => BusSettings::Nats { url },
            _ => BusSettings::Memory,
        })
    }

    /// A store's or bus's url, checked against its kind; `inherited` is the store's url, for a
    /// bus of the store's kind. `Some(None)` for a memory backend.
    fn url(
        &mut self,
        file: &Spanned<BackendFile>,
        role: &'static str,
        kind: Kind,
        inherited: Option<&str>,
    ) -> Option<Option<String>> {
        let path = format!("{role}.url");
        match (kind, file.url.as_ref().filter(|u| !u.is_empty())) {
            (Kind::Memory, None) => Some(None),
            (Kind::Memory, Some(url)) => {
                self.report(Place::of(url), &path, Invalid::UrlUnused(role));
                None
            }
            (_, Some(url)) => self
                .check(url, &path, |t| backend_url(t, kind, role))
                .map(Some),
            (_, None) => match inherited {
                Some(url) => Some(Some(url.to_string())),
                None => {
                    let expected = match kind {
                        Kind::Redis => "a redis url, e.g. redis://127.0.0.1:6379",
                        _ => "a nats url, e.g. nats://127.0.0.1:4222",
                    };
                    self.report(Place::of(file), &path, Invalid::Missing(expected));
                    None
                }
            },
        }
    }

    // ----- routes

    fn routes(&mut self, file: &Spanned<File>, nats_store: bool) -> Option<Vec<Route>> {
        let defaults = match &file.defaults {
            Some(d) => self.layer(d, "defaults"),
            None => Layer::default(),
        };
        let routes = match &file.routes {
            Some(routes) if !routes.is_empty() => routes,
            other => {
                let place = other.as_ref().map_or(Place::of(file), Place::of);
                self.report(place, "routes", Invalid::NoRoutes);
                return None;
            }
        };
        let mut names = HashMap::new();
        let checked: Vec<_> = (routes.iter().enumerate())
            .map(|(i, route)| self.route(i, route, &defaults, nats_store, &mut names))
            .collect();
        checked.into_iter().collect()
    }

    fn route(
        &mut self,
        i: usize,
        route: &Spanned<RouteFile>,
        defaults: &Layer,
        nats_store: bool,
        names: &mut HashMap<String, Place>,
    ) -> Option<Route> {
        let at = Place::of(route);
        let prefix = format!("routes[{i}]");
        let name = self.route_name(route, &prefix, names);
        let matcher = self.matcher(route.matcher.as_ref(), at, &prefix);
        let upstream = self.required(
            &route.upstream,
            &format!("{prefix}.upstream"),
            at,
            "an absolute http or https url",
            upstream,
        );
        let cache = self.or_default(&route.cache, &format!("{prefix}.cache"), true, boolean);
        let upstream_http2 = self.or_default(
            &route.upstream_http2,
            &format!("{prefix}.upstream_http2"),
            false,
            boolean,
        );
        let key = match route.key.as_deref() {
            None => Some(KeyRules::default()),
            Some(key) => self.key(key, &format!("{prefix}.key")),
        };
        let layer = self.layer(&route.policy(), &prefix).over(defaults);
        let policy = self.policy(&layer, &prefix, nats_store);
        Some(Route {
            name: name?,
            matcher: matcher?,
            upstream: upstream?,
            cache: cache?,
            upstream_http2: upstream_http2?,
            key: key?,
            policy: policy?,
        })
    }

    fn route_name(
        &mut self,
        route: &Spanned<RouteFile>,
        prefix: &str,
        names: &mut HashMap<String, Place>,
    ) -> Option<String> {
        let path = format!("{prefix}.name");
        let name = self.required(&route.name, &path, Place::of(route), "a route name", |t| {
            let ok = (1..=64).contains(&t.len())
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            ok.then(|| t.to_string())
                .ok_or_else(|| Invalid::RouteName(t.to_string()))
        })?;
        let place = route.name.as_ref().map_or(Place::default(), Place::of);
        if let Some(first) = names.get(&name) {
            let line = first.line;
            self.report(place, &path, Invalid::DuplicateName { name, line });
            return None;
        }
        names.insert(name.clone(), place);
        Some(name)
    }

    fn matcher(
        &mut self,
        file: Option<&Spanned<MatchFile>>,
        route_at: Place,
        prefix: &str,
    ) -> Option<RouteMatch> {
        let path = format!("{prefix}.match");
        let Some(file) = file else {
            self.report(route_at, &path, Invalid::NoPath);
            return None;
        };
        let mut given: Vec<(&'static str, &Text)> = [
            ("path", &file.path),
            ("path_prefix", &file.path_prefix),
            ("path_regex", &file.path_regex),
        ]
        .into_iter()
        .filter_map(|(field, text)| Some((field, text.as_ref().filter(|t| !t.is_empty())?)))
        .collect();
        given.sort_by_key(|(_, text)| Place::of(*text));
        let path_match = match given.as_slice() {
            [] => {
                self.report(Place::of(file), &path, Invalid::NoPath);
                None
            }
            [(first, _), (second, text), ..] => {
                self.report(
                    Place::of(*text),
                    &path,
                    Invalid::SeveralPaths(first, second),
                );
                None
            }
            [(field, text)] => self.check(text, &format!("{path}.{field}"), |t| match *field {
                "path" => absolute_path(t).map(PathMatch::Exact),
                "path_prefix" => absolute_path(t).map(PathMatch::Prefix),
                _ => Regex::new(t)
                    .map(PathMatch::Regex)
                    .map_err(|e| Invalid::Regex(regex_reason(&e))),
            }),
        };
        let methods = match &file.methods {
            None => Some(vec![Method::GET, Method::HEAD]),
            Some(list) => {
                let mut methods = Vec::new();
                let mut ok = true;
                for (i, text) in list.iter().enumerate() {
                    match self.check(text, &format!("{path}.methods[{i}]"), method) {
                        Some(m) if !methods.contains(&m) => methods.push(m),
                        Some(_) => {}
                        None => ok = false,
                    }
                }
                ok.then_some(methods)
            }
        };
        let host = match &file.host {
            Some(text) if !text.is_empty() => {
                self.check(text, &format!("{path}.host"), host).map(Some)
            }
            _ => Some(None),
        };
        Some(RouteMatch {
            path: path_match?,
            methods: methods?,
            host: host?,
        })
    }

    fn key(&mut self, file: &KeyFile, path: &str) -> Option<KeyRules> {
        let query = match &file.query {
            None => Some(QueryRule::All),
            Some(query) => match &**query {
                QueryFile::Word(w) => match w.as_str() {
                    "" | "all" => Some(QueryRule::All),
                    "none" => Some(QueryRule::None),
                    _ => {
                        let expected = "all, none, {include: [...]} or {exclude: [...]}";
                        let invalid = Invalid::Word {
                            text: w.clone(),
                            expected,
                        };
                        self.report(Place::of(query), &format!("{path}.query"), invalid);
                        None
                    }
                },
                QueryFile::Include(names) => self
                    .list(names, &format!("{path}.query.include"), query_name)
                    .map(|names| QueryRule::Include(sorted(names))),
                QueryFile::Exclude(names) => self
                    .list(names, &format!("{path}.query.exclude"), query_name)
                    .map(|names| QueryRule::Exclude(sorted(names))),
            },
        };
        let headers = match &file.headers {
            None => Some(Vec::new()),
            Some(list) => self
                .list(list, &format!("{path}.headers"), header_name)
                .map(|mut headers| {
                    headers.sort_by(|a, b| a.as_str().cmp(b.as_str()));
                    headers.dedup();
                    headers
                }),
        };
        let cookies = match &file.cookies {
            None => Some(Vec::new()),
            Some(list) => self
                .list(list, &format!("{path}.cookies"), cookie_name)
                .map(sorted),
        };
        let body = self.or_default(&file.body, &format!("{path}.body"), false, boolean);
        Some(KeyRules {
            query: query?,
            headers: headers?,
            cookies: cookies?,
            body: body?,
        })
    }

    // ----- policy

    /// The policy values written in one layer, `prefix` naming it (`defaults`, `routes[2]`).
    fn layer(&mut self, file: &PolicyFile, prefix: &str) -> Layer {
        let p = |field: &str| format!("{prefix}.{field}");
        Layer {
            ttl: self.value(&file.ttl, &p("ttl"), duration),
            expiry: self.value(&file.expiry, &p("expiry"), |t| match t {
                "absolute" => Ok(Expiry::Absolute),
                "sliding" => Ok(Expiry::Sliding),
                _ => Err(word(t, "absolute or sliding")),
            }),
            honor_cache_control: self.value(
                &file.honor_cache_control,
                &p("honor_cache_control"),
                boolean,
            ),
            min_ttl: self.value(&file.min_ttl, &p("min_ttl"), duration),
            max_ttl: self.value(&file.max_ttl, &p("max_ttl"), duration),
            lease_ttl: self.value(&file.lease_ttl, &p("lease_ttl"), positive_duration),
            max_fetch: self.value(&file.max_fetch, &p("max_fetch"), positive_duration),
            wait_timeout: self.value(&file.wait_timeout, &p("wait_timeout"), positive_duration),
            on_wait_timeout: self.value(
                &file.on_wait_timeout,
                &p("on_wait_timeout"),
                |t| match t {
                    "error" => Ok(OnWaitTimeout::Error),
                    "bypass" => Ok(OnWaitTimeout::Bypass),
                    _ => Err(word(t, "error or bypass")),
                },
            ),
            poll_interval: self.value(&file.poll_interval, &p("poll_interval"), positive_duration),
            max_body: self.value(&file.max_body, &p("max_body"), size),
            pass_ttl: self.value(&file.pass_ttl, &p("pass_ttl"), duration),
            cache_statuses: file.cache_statuses.as_ref().and_then(|list| {
                let path = p("cache_statuses");
                let value = sorted(self.list(list, &path, status)?);
                Some(Set {
                    value,
                    place: Place::of(list),
                    path,
                })
            }),
            honor_client_no_store: self.value(
                &file.honor_client_no_store,
                &p("honor_client_no_store"),
                boolean,
            ),
            ttl_jitter: self.value(&file.ttl_jitter, &p("ttl_jitter"), percent),
            error_ttl: file.error_ttl.as_ref().and_then(|map| {
                let path = p("error_ttl");
                let value = self.error_ttl(map, &path)?;
                Some(Set {
                    value,
                    place: Place::of(map),
                    path,
                })
            }),
            vary: self.value(&file.vary, &p("vary"), |t| match t {
                "key" => Ok(VaryMode::Key),
                "honor" => Ok(VaryMode::Honor),
                _ => Err(word(t, "key or honor")),
            }),
            stale_while_revalidate: self.value(
                &file.stale_while_revalidate,
                &p("stale_while_revalidate"),
                duration,
            ),
            stale_if_error: self.value(&file.stale_if_error, &p("stale_if_error"), duration),
            early_refresh: self.value(&file.early_refresh, &p("early_refresh"), early_refresh),
            max_followers: self.value(&file.max_followers, &p("max_followers"), count),
            max_upstream_fetches: self.value(
                &file.max_upstream_fetches,
                &p("max_upstream_fetches"),
                count,
            ),
            on_store_error: self.value(&file.on_store_error, &p("on_store_error"), |t| match t {
                "open" => Ok(OnStoreError::Open),
                "closed" => Ok(OnStoreError::Closed),
                _ => Err(word(t, "open or closed")),
            }),
        }
    }

    /// `error_ttl: {404: 30s, 503: 2s}`: any status (a 5xx too), each with a TTL above zero.
    fn error_ttl(
        &mut self,
        map: &HashMap<Text, Text>,
        path: &str,
    ) -> Option<BTreeMap<u16, Duration>> {
        let mut entries: Vec<_> = map.iter().collect();
        entries.sort_by_key(|(status, _)| Place::of(*status));
        let mut checked = BTreeMap::new();
        let mut ok = true;
        for (status, ttl) in entries {
            let at = format!("{path}.{}", status.as_str());
            let status = self.check(status, &at, any_status);
            let ttl = self.check(ttl, &at, positive_duration);
            match (status, ttl) {
                (Some(status), Some(ttl)) => {
                    checked.insert(status, ttl);
                }
                _ => ok = false,
            }
        }
        ok.then_some(checked)
    }

    /// A route's effective policy, refusing values that contradict each other or the store.
    fn policy(&mut self, layer: &Layer, prefix: &str, nats_store: bool) -> Option<RoutePolicy> {
        let policy = layer.policy();
        let mut ok = true;
        if nats_store
            && let Some(lease) = &layer.lease_ttl
            && lease.value < Duration::from_secs(1)
        {
            let shown = format_duration(lease.value);
            self.report(lease.place, &lease.path, Invalid::LeaseBelowNatsUnit(shown));
            ok = false;
        }
        if policy.min_ttl > policy.max_ttl {
            self.min_above_max(layer, prefix, &policy);
            ok = false;
        }
        if matches!(policy.expiry, ExpiryMode::Sliding { .. }) {
            for window in [&layer.stale_while_revalidate, &layer.stale_if_error]
                .into_iter()
                .flatten()
                .filter(|window| !window.value.is_zero())
            {
                self.report(window.place, &window.path, Invalid::StaleWithSliding);
                ok = false;
            }
        }
        ok.then_some(policy)
    }

    /// Reports `min_ttl > max_ttl` at the one of the two this route wrote itself, if either.
    fn min_above_max(&mut self, layer: &Layer, prefix: &str, policy: &RoutePolicy) {
        let named = |set: &Option<Set<Duration>>, field: &str| match set {
            Some(s) => s.path.clone(),
            None => format!("{field} (default)"),
        };
        let (min, max) = (
            format_duration(policy.min_ttl),
            format_duration(policy.max_ttl),
        );
        let min_path = named(&layer.min_ttl, "min_ttl");
        let max_path = named(&layer.max_ttl, "max_ttl");
        let own_max = layer.max_ttl.as_ref().filter(|s| {
            s.path.starts_with(&format!("{prefix}."))
                && layer
                    .min_ttl
                    .as_ref()
                    .is_none_or(|m| m.path != format!("{prefix}.min_ttl"))
        });
        match own_max {
            Some(max_set) => {
                let invalid = Invalid::MaxBelowMin {
                    value: max,
                    other: min_path,
                    other_value: min,
                };
                self.report(max_set.place, &max_path, invalid);
            }
            None => {
                let place = layer.min_ttl.as_ref().map_or(Place::default(), |s| s.place);
                let invalid = Invalid::MinAboveMax {
                    value: min,
                    other: max_path,
                    other_value: max,
                };
                self.report(place, &min_path, invalid);
            }
        }
    }
}

// ----- one parser per kind of value

/// Sorted and deduplicated: a key's parts, and the statuses, have one order.
fn sorted<T: Ord>(mut items: Vec<T>) -> Vec<T> {
    items.sort();
    items.dedup();
    items
}

fn word(text: &str, expected: &'static str) -> Invalid {
    Invalid::Word {
        text: text.to_string(),
        expected,
    }
}

fn duration(text: &str) -> Result<Duration, Invalid> {
    units::parse_duration(text).map_err(|reason| Invalid::Duration {
        text: text.to_string(),
        reason,
    })
}

fn positive_duration(text: &str) -> Result<Duration, Invalid> {
    match duration(text)? {
        Duration::ZERO => Err(Invalid::Zero),
        d => Ok(d),
    }
}

/// A duration above zero and at most `max`.
fn bounded_duration(text: &str, max: Duration) -> Result<Duration, Invalid> {
    match positive_duration(text)? {
        d if d > max => Err(Invalid::AboveMax {
            value: format_duration(d),
            max: format_duration(max),
        }),
        d => Ok(d),
    }
}

fn size(text: &str) -> Result<u64, Invalid> {
    units::parse_size(text).map_err(|reason| Invalid::Size {
        text: text.to_string(),
        reason,
    })
}

/// `true` (beta 1), `false` (off), or a beta: a finite number above zero.
fn early_refresh(text: &str) -> Result<Option<Beta>, Invalid> {
    if let Ok(on) = boolean(text) {
        return Ok(on.then_some(Beta(1.0)));
    }
    match text.trim().parse::<f64>() {
        Ok(beta) if beta.is_finite() && beta > 0.0 => Ok(Some(Beta(beta))),
        _ => Err(Invalid::EarlyRefresh(text.to_string())),
    }
}

fn boolean(text: &str) -> Result<bool, Invalid> {
    match text {
        "true" | "True" | "TRUE" => Ok(true),
        "false" | "False" | "FALSE" => Ok(false),
        _ => Err(Invalid::Bool(text.to_string())),
    }
}

fn listen(text: &str) -> Result<SocketAddr, Invalid> {
    text.trim()
        .parse()
        .map_err(|_| Invalid::Listen(text.to_string()))
}

fn namespace(text: &str) -> Result<String, Invalid> {
    let ok = (1..=64).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    ok.then(|| text.to_string())
        .ok_or_else(|| Invalid::Namespace(text.to_string()))
}

fn backend_kind(text: &str) -> Result<Kind, Invalid> {
    match text {
        "memory" => Ok(Kind::Memory),
        "redis" => Ok(Kind::Redis),
        "nats" => Ok(Kind::Nats),
        _ => Err(word(text, "memory, redis or nats")),
    }
}

/// A store or bus url: the schemes this build's redis and nats clients can connect to (Redis TLS
/// only to one server, and no NATS websockets, so `rediss+sentinel://`, `rediss+cluster://`,
/// `ws://` and `wss://` are refused here rather than failing at start). A Redis url is parsed whole, in the same way
/// the store will read it, so a bad Sentinel or Cluster url is refused here too.
fn backend_url(text: &str, kind: Kind, role: &'static str) -> Result<String, Invalid> {
    let (schemes, accepted): (&[&str], _) = match kind {
        Kind::Redis => (
            &[
                "redis",
                "redis+unix",
                "unix",
                "redis+sentinel",
                "redis+cluster",
                "rediss",
                "rediss+sentinel",
                "rediss+cluster",
            ],
            "redis://, rediss://, redis+unix://, unix://, redis+sentinel:// or redis+cluster://",
        ),
        _ => (&["nats", "tls"], "nats:// or tls://"),
    };
    if let (Kind::Redis, Some((scheme, _))) = (kind, text.split_once("://"))
        && schemes.contains(&scheme)
    {
        return crate::redis_conn::Target::parse(text)
            .map(|_| text.to_string())
            .map_err(|e| Invalid::RedisUrl {
                text: crate::credentials::redact(text),
                reason: e.to_string(),
            });
    }
    match text.split_once("://") {
        Some((scheme, rest)) if schemes.contains(&scheme) && !rest.is_empty() => {
            Ok(text.to_string())
        }
        _ => Err(Invalid::UrlScheme {
            text: crate::credentials::redact(text),
            kind: kind.name(),
            role,
            schemes: accepted,
        }),
    }
}

fn absolute_path(text: &str) -> Result<String, Invalid> {
    if text.starts_with('/') {
        Ok(text.to_string())
    } else {
        Err(Invalid::RelativePath(text.to_string()))
    }
}

const METHODS: [Method; 9] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::PATCH,
    Method::OPTIONS,
    Method::TRACE,
    Method::CONNECT,
];

fn method(text: &str) -> Result<Method, Invalid> {
    let upper = text.to_ascii_uppercase();
    METHODS
        .into_iter()
        .find(|m| m.as_str() == upper)
        .ok_or_else(|| Invalid::Method(text.to_string()))
}

/// The last line of regex's report: its first lines draw the pattern with a caret, which does
/// not fit on one line of ours.
fn regex_reason(e: &regex::Error) -> String {
    let text = e.to_string();
    let last = text.lines().last().unwrap_or_default();
    last.strip_prefix("error: ").unwrap_or(last).to_string()
}

fn host(text: &str) -> Result<String, Invalid> {
    let bad = || Invalid::Host(text.to_string());
    let authority: http::uri::Authority = text.parse().map_err(|_| bad())?;
    if authority.port().is_some() || authority.as_str().contains('@') || authority.host().is_empty()
    {
        return Err(bad());
    }
    Ok(authority.host().to_ascii_lowercase())
}

fn upstream(text: &str) -> Result<Uri, Invalid> {
    let bad = |reason| Invalid::Upstream {
        text: text.to_string(),
        reason,
    };
    let uri: Uri = text.parse().map_err(|_| bad("not a url"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none_or(str::is_empty) {
        return Err(bad("must be an absolute http or https url"));
    }
    if uri.scheme_str() == Some("https") {
        // The upstream client speaks plain HTTP only; refusing here beats a 502 on every request.
        return Err(bad("https upstreams are not supported yet: use http"));
    }
    if uri.query().is_some() {
        return Err(bad("must not carry a query"));
    }
    Ok(uri)
}

fn header_name(text: &str) -> Result<HeaderName, Invalid> {
    HeaderName::from_bytes(text.trim().to_ascii_lowercase().as_bytes())
        .map_err(|_| Invalid::Header(text.to_string()))
}

/// A cookie name is an RFC 6265 token: visible ASCII without separators.
fn cookie_name(text: &str) -> Result<String, Invalid> {
    let ok = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
    ok.then(|| text.to_string())
        .ok_or_else(|| Invalid::Cookie(text.to_string()))
}

fn query_name(text: &str) -> Result<String, Invalid> {
    if text.is_empty() || text.contains(['&', '=']) {
        return Err(Invalid::QueryName(text.to_string()));
    }
    Ok(text.to_string())
}

/// `10%` or `10`: a whole percentage from 0 to 100.
fn percent(text: &str) -> Result<u8, Invalid> {
    let digits = text
        .trim()
        .strip_suffix('%')
        .unwrap_or(text.trim())
        .trim_end();
    match digits.parse::<u8>() {
        Ok(p) if p <= 100 && digits.bytes().all(|b| b.is_ascii_digit()) => Ok(p),
        _ => Err(Invalid::Percent(text.to_string())),
    }
}

/// Any status code, 5xx included (for `error_ttl`).
fn any_status(text: &str) -> Result<u16, Invalid> {
    let code: u16 = text
        .trim()
        .parse()
        .map_err(|_| Invalid::Status(text.to_string()))?;
    if (100..=599).contains(&code) {
        Ok(code)
    } else {
        Err(Invalid::StatusRange(code))
    }
}

fn status(text: &str) -> Result<u16, Invalid> {
    let code: u16 = text
        .trim()
        .parse()
        .map_err(|_| Invalid::Status(text.to_string()))?;
    match code {
        100..=499 | 501 => Ok(code),
        500..=599 => Err(Invalid::StatusFailure(code)),
        _ => Err(Invalid::StatusRange(code)),
    }
}
