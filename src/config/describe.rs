//! The effective configuration in words, as `corral check` prints it.
//!
//! One line per setting, named as in the file and written as the file would write it (durations
//! and sizes in units, lists in brackets), so a reader can hold it against the YAML; every route
//! shows every effective value, inherited or not. Secrets are not shown: the admin token only as
//! set or not, passwords in store and bus urls as `***`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use super::settings::caching_settings;
use super::units::{format_duration, format_size};
use super::{
    Beta, BusSettings, Config, CookieMode, Encoding, KeySource, Limits, OnWaitTimeout, PathMatch,
    QueryRule, Route, RoutePolicy, Semantics, StoreSettings, VaryMode,
};
use crate::credentials::redact;
use crate::engine::{ExpiryMode, OnStoreError};
use crate::http::encoding::Coding;

/// Labels are padded past the longest one, `  honor_client_no_store`, so values line up.
const WIDTH: usize = 24;

/// A short fingerprint of the effective config (the first 12 hex digits of the BLAKE3 digest of
/// its [`describe`] text, so it holds no secret): replicas logging the same digest serve the same
/// settings, and `corral check` prints it for a file before it is rolled out.
pub fn digest(config: &Config) -> String {
    let hex = blake3::hash(describe(config).as_bytes()).to_hex();
    hex[..12].to_owned()
}

/// Describes `config`: the listeners and backends, then one block per route in match order.
pub fn describe(config: &Config) -> String {
    let mut out = String::new();
    for warning in &config.warnings {
        let _ = writeln!(out, "warning: {warning}");
    }
    let line = |out: &mut String, label: &str, value: &dyn std::fmt::Display| {
        let _ = writeln!(out, "{label:<WIDTH$}{value}");
    };
    line(&mut out, "listen", &config.listen);
    line(&mut out, "admin.listen", &config.admin.listen);
    let token = if config.admin.token.is_some() {
        "set"
    } else {
        "unset (/admin/* answers 403)"
    };
    line(&mut out, "admin.token", &token);
    line(&mut out, "namespace", &config.namespace);
    let store = match &config.store {
        StoreSettings::Memory => "memory".to_string(),
        StoreSettings::Redis { url } => format!("redis {}", redact(url)),
        StoreSettings::Nats { url } => format!("nats {}", redact(url)),
    };
    line(&mut out, "store", &store);
    let bus = match &config.bus {
        BusSettings::Memory => "memory".to_string(),
        BusSettings::Redis { url } => format!("redis {}", redact(url)),
        BusSettings::Nats { url } => format!("nats {}", redact(url)),
    };
    line(&mut out, "bus", &bus);
    let shown = [
        ("store.credentials", &config.store_credentials),
        ("bus.credentials", &config.bus_credentials),
    ];
    for (label, credentials) in shown {
        if let Some(shown) = describe_credentials(credentials) {
            line(&mut out, label, &shown);
        }
    }
    if config.require_auth {
        line(
            &mut out,
            "require_auth",
            &"on (each backend it covers proves an identity)",
        );
    }
    let l1 = match config.l1_max_bytes {
        0 => "0B (off)".to_string(),
        bytes => format_size(bytes),
    };
    line(&mut out, "l1.max_bytes", &l1);
    // Limits are shown only where they differ from the defaults, so the common case stays short.
    let (limits, d) = (&config.limits, Limits::default());
    let counts = [
        ("max_connections", limits.max_connections, d.max_connections),
        (
            "max_connections_per_client",
            limits.max_connections_per_client,
            d.max_connections_per_client,
        ),
        (
            "max_header_count",
            limits.max_header_count,
            d.max_header_count,
        ),
    ];
    let sizes = [
        (
            "max_header_bytes",
            limits.max_header_bytes as u64,
            d.max_header_bytes as u64,
        ),
        (
            "max_uri_length",
            limits.max_uri_length as u64,
            d.max_uri_length as u64,
        ),
        (
            "max_request_body",
            limits.max_request_body,
            d.max_request_body,
        ),
        ("min_send_rate", limits.min_send_rate, d.min_send_rate),
    ];
    let durations = [
        (
            "header_read_timeout",
            limits.header_read_timeout,
            d.header_read_timeout,
        ),
        ("idle_timeout", limits.idle_timeout, d.idle_timeout),
        ("shutdown_grace", limits.shutdown_grace, d.shutdown_grace),
        ("send_timeout", limits.send_timeout, d.send_timeout),
    ];
    for (name, value, default) in counts {
        if value != default {
            line(&mut out, &format!("limits.{name}"), &value);
        }
    }
    for (name, value, default) in sizes {
        if value != default {
            line(&mut out, &format!("limits.{name}"), &format_size(value));
        }
    }
    for (name, value, default) in durations {
        if value != default {
            line(&mut out, &format!("limits.{name}"), &format_duration(value));
        }
    }
    for route in &config.routes {
        out.push('\n');
        describe_route(&mut out, route);
    }
    out
}

/// What credentials a backend uses, by name only: secrets show as `set` (or where they came from
/// would be a path, which is not secret, but one line per backend is enough).
fn describe_credentials(c: &crate::credentials::Credentials) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(user) = &c.username {
        parts.push(format!("username {user}"));
    }
    let secrets = [
        ("password", c.password.is_some()),
        ("token", c.token.is_some()),
        ("nkey_seed", c.nkey_seed.is_some()),
        ("sentinel_password", c.sentinel_password.is_some()),
    ];
    parts.extend((secrets.iter().filter(|(_, set)| *set)).map(|(name, _)| format!("{name} set")));
    if let Some(user) = &c.sentinel_username {
        parts.push(format!("sentinel_username {user}"));
    }
    if let Some(creds) = &c.creds_file {
        parts.push(format!("creds_file {}", creds.display()));
    }
    if let Some(tls) = &c.tls {
        let ca = match &tls.ca_file {
            Some(ca) => format!("ca_file {}", ca.display()),
            None => "system roots".to_string(),
        };
        parts.push(match &tls.cert_file {
            Some(cert) => format!("tls ({ca}, cert_file {})", cert.display()),
            None => format!("tls ({ca})"),
        });
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

fn describe_route(out: &mut String, route: &Route) {
    // A label as long as the padding (`stale_while_revalidate`) still gets one space.
    let line = |out: &mut String, label: &str, value: &dyn std::fmt::Display| {
        let w = (WIDTH - 2).max(label.len() + 1);
        let _ = writeln!(out, "  {label:<w$}{value}");
    };
    let _ = writeln!(out, "route {}", route.name);
    let path = match &route.matcher.path {
        PathMatch::Exact(p) => format!("path {p}"),
        PathMatch::Prefix(p) => format!("path_prefix {p}"),
        PathMatch::Regex(r) => format!("path_regex {}", r.as_str()),
    };
    line(out, "match", &path);
    let methods = match route.matcher.methods.as_slice() {
        [] => "any".to_string(),
        methods => list(methods.iter().map(|m| m.as_str())),
    };
    line(out, "methods", &methods);
    line(out, "host", &route.matcher.host.as_deref().unwrap_or("any"));
    line(out, "upstream", &route.upstream);
    for (name, value) in route.upstream_settings.pool.describe() {
        line(out, name, &value);
    }
    if route.upstream_http2 {
        line(out, "upstream_http2", &true);
    }
    describe_upstream(out, route, &line);
    describe_settings(out, &route.policy, route.cache, Section::Head, &line);
    if !route.cache {
        line(out, "cache", &"false (pass-through)");
        return;
    }
    line(out, "cache", &true);

    let key = &route.key;
    let query = match &key.query {
        QueryRule::All => "all".to_string(),
        QueryRule::None => "none".to_string(),
        QueryRule::Include(names) => format!("include {}", list(names.iter())),
        QueryRule::Exclude(names) => format!("exclude {}", list(names.iter())),
    };
    line(out, "key.query", &query);
    line(
        out,
        "key.headers",
        &list(key.headers.iter().map(|h| h.as_str())),
    );
    line(out, "key.cookies", &list(key.cookies.iter()));
    line(out, "key.body", &key.body);

    describe_settings(out, &route.policy, true, Section::Policy, &line);
}

/// A route's TLS, headers and `Host`, when set: header values and keys only as `***`.
fn describe_upstream(out: &mut String, route: &Route, line: Line<'_>) {
    let settings = &route.upstream_settings;
    let tls = &settings.tls;
    if !tls.is_default() {
        let mut parts = Vec::new();
        if let Some(ca) = &tls.ca_file {
            parts.push(format!("ca_file {}", ca.display()));
        }
        if let Some(cert) = &tls.cert_file {
            parts.push(format!("cert_file {}", cert.display()));
        }
        match &tls.key {
            Some(KeySource::File(path)) => parts.push(format!("key_file {}", path.display())),
            Some(KeySource::Inline) => parts.push("key ***".into()),
            None => {}
        }
        if let Some(name) = &tls.server_name {
            parts.push(format!("server_name {name}"));
        }
        line(out, "tls", &parts.join(", "));
    }
    if let Some(host) = settings.host.as_ref().and_then(|h| h.to_str().ok()) {
        line(out, "host", &format!("{host} (sent upstream)"));
    }
    let headers = &settings.headers;
    let hidden = |list: &[(http::HeaderName, http::HeaderValue)]| {
        list.iter()
            .map(|(name, _)| format!("{name}: ***"))
            .collect::<Vec<_>>()
    };
    if !headers.set.is_empty() {
        line(
            out,
            "upstream_headers.set",
            &hidden(&headers.set).join(", "),
        );
    }
    if !headers.add.is_empty() {
        line(
            out,
            "upstream_headers.add",
            &hidden(&headers.add).join(", "),
        );
    }
    if !headers.remove.is_empty() {
        let names = list(headers.remove.iter().map(|h| h.as_str()));
        line(out, "upstream_headers.remove", &names);
    }
    if !route.forward_unkeyed.is_empty() {
        let names = list(route.forward_unkeyed.iter().map(|h| h.as_str()));
        line(out, "forward_headers", &format!("{names} (unkeyed)"));
    }
}

/// Where in a route's description a setting is shown, and when.
enum Show<T> {
    /// Among the policy, always.
    Always(fn(&T) -> String),
    /// Among the policy, when it differs from the default (so the common case stays short).
    WhenSet(fn(&T) -> String),
    /// Before `cache`, when it differs from the default, for pass-through routes too.
    Head(fn(&T) -> String),
    /// Before `cache`, when it differs from the default, for cached routes only.
    HeadIfCached(fn(&T) -> String),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    Head,
    Policy,
}

type Line<'a> = &'a dyn Fn(&mut String, &str, &dyn std::fmt::Display);

/// One setting's line, if it belongs in `section` and is shown there.
fn show<T: PartialEq>(
    out: &mut String,
    (name, show, value, default): (&str, Show<T>, &T, &T),
    cached: bool,
    section: Section,
    line: Line<'_>,
) {
    let set = value != default;
    let format = match show {
        Show::Always(format) if section == Section::Policy => format,
        Show::WhenSet(format) if section == Section::Policy && set => format,
        Show::Head(format) if section == Section::Head && set => format,
        Show::HeadIfCached(format) if section == Section::Head && set && cached => format,
        _ => return,
    };
    line(out, name, &format(value));
}

/// `corral check`'s side of the caching settings ([`super::settings`]).
macro_rules! describe_settings {
    ($($(#[$doc:meta])* $name:ident: $ty:ty = $default:expr,
        file: $file:ty, check: $check:expr, show: $show:expr;)*) => {
        /// The lines of `policy`'s settings that belong in `section`, in the table's order.
        fn describe_settings(
            out: &mut String,
            policy: &RoutePolicy,
            cached: bool,
            section: Section,
            line: Line<'_>,
        ) {
            use Show::*;
            let default = RoutePolicy::default();
            $(show(
                out,
                (stringify!($name), $show, &policy.$name, &default.$name),
                cached,
                section,
                line,
            );)*
        }
    };
}

caching_settings!(describe_settings);

// ---------------------------------------------------------------------------------------------
// How each type of setting is shown

fn duration(value: &Duration) -> String {
    format_duration(*value)
}

fn expiry(value: &ExpiryMode) -> String {
    match value {
        ExpiryMode::Absolute => "absolute",
        ExpiryMode::Sliding { .. } => "sliding",
    }
    .to_owned()
}

fn yes_no(value: &bool) -> String {
    value.to_string()
}

fn on_wait_timeout(value: &OnWaitTimeout) -> String {
    match value {
        OnWaitTimeout::Error => "error",
        OnWaitTimeout::Bypass => "bypass",
    }
    .to_owned()
}

fn size(value: &u64) -> String {
    format_size(*value)
}

// `fn(&T)` for every setting's `T`: here a `Vec`, not a slice.
#[allow(clippy::ptr_arg)]
fn statuses(value: &Vec<u16>) -> String {
    list(value.iter())
}

fn percent_of(value: &u8) -> String {
    format!("{value}%")
}

fn error_ttl(value: &BTreeMap<u16, Duration>) -> String {
    let pairs = value
        .iter()
        .map(|(status, ttl)| format!("{status}: {}", format_duration(*ttl)));
    format!("{{{}}}", pairs.collect::<Vec<_>>().join(", "))
}

fn encoding(value: &Encoding) -> String {
    let names = |codings: &[Coding]| list(codings.iter().map(|coding| coding.as_str()));
    let compress = &value.compress;
    format!(
        "accept {}, compress {} from {} of {}",
        names(&value.accept),
        names(&compress.with),
        format_size(compress.min_size),
        list(compress.types.iter()),
    )
}

fn vary(value: &VaryMode) -> String {
    match value {
        VaryMode::Key => "key",
        VaryMode::Honor => "honor",
    }
    .to_owned()
}

/// The beta, as the file may write it (`true` is a beta of 1).
fn beta(value: &Option<Beta>) -> String {
    value.map_or_else(|| "off".to_owned(), |Beta(beta)| beta.to_string())
}

fn count(value: &usize) -> String {
    value.to_string()
}

fn on_store_error(value: &OnStoreError) -> String {
    match value {
        OnStoreError::Open => "open",
        OnStoreError::Closed => "closed",
    }
    .to_owned()
}

fn semantics(value: &Semantics) -> String {
    match value {
        Semantics::Coalescing => "coalescing",
        Semantics::Rfc9111 => "rfc9111",
    }
    .to_owned()
}

fn heuristic(value: &u8) -> String {
    match value {
        0 => "off".to_owned(),
        percent => format!("{percent}%"),
    }
}

fn cookie_mode(value: &CookieMode) -> String {
    match value {
        CookieMode::Bypass => "bypass".to_owned(),
        CookieMode::Strip => "strip".to_owned(),
        CookieMode::StripNamed(names) => format!("{{strip: {}}}", list(names.iter())),
    }
}

/// `[a, b]`, as YAML writes a short list.
fn list<T: std::fmt::Display>(items: impl Iterator<Item = T>) -> String {
    let items: Vec<String> = items.map(|i| i.to_string()).collect();
    format!("[{}]", items.join(", "))
}
