//! From the file's shape to a checked [`Config`]: every value parsed, every default applied, every
//! contradiction refused; each problem reported at its place, and all of them, not just the first.

use std::net::SocketAddr;
use std::time::Duration;

use marked_yaml::Spanned;

use super::schema::{BackendFile, BreakerFile, File, LimitsFile, Text};
use super::{
    AdminSettings, BusSettings, Config, Limits, Place, Problems, StoreLimits, StoreSettings,
};
use crate::store::breaker::BreakerSettings;

mod credentials;
mod routes;
mod tracing;
mod upstream;
mod values;

use values::*;

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
    #[error("{0} is named twice")]
    Repeated(String),
    #[error("invalid media type {0:?} (type/subtype, lowercase, at most one *, e.g. text/*)")]
    MediaRange(String),
    #[error("{0} is not a status code (100 to 599)")]
    StatusRange(u16),
    #[error(
        "semantics: rfc9111 takes freshness from the upstream's Cache-Control, which this turns \
         off"
    )]
    Rfc9111IgnoringCacheControl,
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
    #[error("invalid ratio {0:?} (expected a number from 0.0 to 1.0, e.g. 0.1)")]
    Ratio(String),
    #[error("invalid otlp endpoint {text:?}: {reason}")]
    OtlpEndpoint { text: String, reason: &'static str },
    #[error("invalid resource attribute {0:?} (1 to 255 bytes of printable ASCII)")]
    ResourceAttribute(String),
}

/// The most header fields `limits.max_header_count` may allow (each is parsed into a slot
/// allocated up front).
const MAX_HEADER_COUNT: usize = 10_000;
/// The most bytes `limits.max_header_bytes` and `limits.max_uri_length` may allow: a request head
/// is buffered whole in memory before it is parsed.
const MAX_HEAD_BYTES: usize = 1 << 20;

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
        let public = self.or_default(&file.listen, "listen", any(8080), listen);
        let admin = match file.admin.as_deref() {
            None => Some(AdminSettings {
                listen: super::DEFAULT_ADMIN_LISTEN,
                token: None,
            }),
            Some(admin) => self
                .or_default(
                    &admin.listen,
                    "admin.listen",
                    super::DEFAULT_ADMIN_LISTEN,
                    listen,
                )
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
        let tracing = match file.tracing.as_ref() {
            None => Some(None),
            Some(tracing) => self.tracing(tracing).map(Some),
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
            warnings: Vec::new(),
            tracing: tracing?,
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
        let send_timeout = self.or_default(
            &file.send_timeout,
            "limits.send_timeout",
            d.send_timeout,
            positive_duration,
        );
        let min_send_rate = self.or_default(
            &file.min_send_rate,
            "limits.min_send_rate",
            d.min_send_rate,
            size,
        );
        let max_connections_per_client = self.or_default(
            &file.max_connections_per_client,
            "limits.max_connections_per_client",
            d.max_connections_per_client,
            |t| {
                t.trim()
                    .parse::<usize>()
                    .map_err(|_| Invalid::Count(t.to_string()))
            },
        );
        Some(Limits {
            send_timeout: send_timeout?,
            min_send_rate: min_send_rate?,
            max_connections_per_client: max_connections_per_client?,
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
}
