//! The effective configuration in words, as `corral check` prints it.
//!
//! One line per setting, named as in the file and written as the file would write it (durations
//! and sizes in units, lists in brackets), so a reader can hold it against the YAML; every route
//! shows every effective value, inherited or not. Secrets are not shown: the admin token only as
//! set or not, passwords in store and bus urls as `***`.

use std::fmt::Write;

use super::units::{format_duration, format_size};
use super::{
    Beta, BusSettings, Config, Limits, OnWaitTimeout, PathMatch, QueryRule, Route, StoreSettings,
    VaryMode,
};
use crate::credentials::redact;
use crate::engine::ExpiryMode;

/// Labels are padded past the longest one, `  honor_client_no_store`, so values line up.
const WIDTH: usize = 24;

/// Describes `config`: the listeners and backends, then one block per route in match order.
pub fn describe(config: &Config) -> String {
    let mut out = String::new();
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
    ];
    let durations = [
        (
            "header_read_timeout",
            limits.header_read_timeout,
            d.header_read_timeout,
        ),
        ("idle_timeout", limits.idle_timeout, d.idle_timeout),
        ("shutdown_grace", limits.shutdown_grace, d.shutdown_grace),
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
    if route.upstream_http2 {
        line(out, "upstream_http2", &true);
    }
    // Shown only when set, like the limits; they apply to pass-through routes too.
    let defaults = super::RoutePolicy::default();
    if route.policy.max_upstream_fetches != defaults.max_upstream_fetches {
        line(
            out,
            "max_upstream_fetches",
            &route.policy.max_upstream_fetches,
        );
    }
    if route.cache && route.policy.max_followers != defaults.max_followers {
        line(out, "max_followers", &route.policy.max_followers);
    }
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

    let p = &route.policy;
    line(out, "ttl", &format_duration(p.ttl));
    let expiry = match p.expiry {
        ExpiryMode::Absolute => "absolute",
        ExpiryMode::Sliding { .. } => "sliding",
    };
    line(out, "expiry", &expiry);
    line(out, "honor_cache_control", &p.honor_cache_control);
    line(out, "min_ttl", &format_duration(p.min_ttl));
    line(out, "max_ttl", &format_duration(p.max_ttl));
    line(out, "lease_ttl", &format_duration(p.lease_ttl));
    line(out, "max_fetch", &format_duration(p.max_fetch));
    line(out, "wait_timeout", &format_duration(p.wait_timeout));
    let on_wait_timeout = match p.on_wait_timeout {
        OnWaitTimeout::Error => "error",
        OnWaitTimeout::Bypass => "bypass",
    };
    line(out, "on_wait_timeout", &on_wait_timeout);
    line(out, "poll_interval", &format_duration(p.poll_interval));
    line(out, "max_body", &format_size(p.max_body));
    line(out, "pass_ttl", &format_duration(p.pass_ttl));
    line(out, "cache_statuses", &list(p.cache_statuses.iter()));
    line(out, "honor_client_no_store", &p.honor_client_no_store);
    // Shown only when set, so the common case stays short.
    if p.ttl_jitter > 0 {
        line(out, "ttl_jitter", &format!("{}%", p.ttl_jitter));
    }
    if !p.error_ttl.is_empty() {
        let pairs = p
            .error_ttl
            .iter()
            .map(|(status, ttl)| format!("{status}: {}", format_duration(*ttl)));
        line(
            out,
            "error_ttl",
            &format!("{{{}}}", pairs.collect::<Vec<_>>().join(", ")),
        );
    }
    if p.vary == VaryMode::Honor {
        line(out, "vary", &"honor");
    }
    if !p.stale_while_revalidate.is_zero() {
        let window = format_duration(p.stale_while_revalidate);
        line(out, "stale_while_revalidate", &window);
    }
    if !p.stale_if_error.is_zero() {
        line(out, "stale_if_error", &format_duration(p.stale_if_error));
    }
    // The beta, as the file may write it (`true` is a beta of 1).
    if let Some(Beta(beta)) = p.early_refresh {
        line(out, "early_refresh", &beta);
    }
}

/// `[a, b]`, as YAML writes a short list.
fn list<T: std::fmt::Display>(items: impl Iterator<Item = T>) -> String {
    let items: Vec<String> = items.map(|i| i.to_string()).collect();
    format!("[{}]", items.join(", "))
}
