//! A route's upstream settings: its `upstream:` (a URL or a pool), `tls:`, `upstream_headers:`,
//! `host:` and `forward_headers:`, checked into one [`UpstreamSettings`]. The TLS files are read and parsed here, and a client
//! key is matched against its certificate, so `corral check` finds what a connection would
//! trip on. No message quotes a header value or a key: either may be a secret.

use std::collections::HashMap;
use std::path::PathBuf;

use http::{HeaderName, HeaderValue, Uri};
use marked_yaml::Spanned;

use super::super::Place;
use super::super::schema::{
    ForwardFile, HealthFile, OutlierFile, PoolFile, RetriesFile, RouteFile, Text, UpstreamFile,
    UpstreamHeadersFile, UpstreamTlsFile,
};
use super::super::upstream::{KeySource, TlsSources, read_certificates};
use super::super::{
    Balance, HealthSettings, OutlierSettings, PoolSettings, Protocol, RetrySettings, RoutePolicy,
    UpstreamHeaders, UpstreamSettings, UpstreamTls,
};
use super::{
    Checker, Invalid, absolute_path, boolean, header_name, percent, positive_duration, upstream,
    word,
};
use crate::credentials::read_secret_file;

/// Every way an upstream setting can be wrong; each reads after the field's path.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("{0}")]
    Tls(String),
    #[error("needs {0}")]
    Needs(&'static str),
    #[error("set either {0} or {0}_file, not both")]
    Twice(&'static str),
    #[error("only for an https upstream (this route's is http)")]
    NotHttps,
    #[error("invalid server name {0:?} (a DNS name or an IP address)")]
    ServerName(String),
    #[error("invalid header value (not shown: it may be a secret)")]
    Value,
    #[error("{0} is corral's to set{1}")]
    Reserved(&'static str, &'static str),
    #[error("invalid host {0:?} (a host name, with an optional port)")]
    Host(String),
    #[error("{0} is private to each client and is never shared: it cannot be unkeyed")]
    Private(String),
    #[error("{0} is listed twice")]
    Duplicate(String),
    #[error("needs at least one server")]
    NoServers,
    #[error("at most {MAX_SERVERS} servers")]
    TooManyServers,
    #[error("{0} differs from the first server's {1} (every server of a pool shares one)")]
    Mixed(&'static str, String),
    #[error("{0} is longer than {1}")]
    Longer(String, &'static str),
    #[error("{value} is below {other}, {other_value}")]
    Below {
        value: String,
        other: &'static str,
        other_value: String,
    },
    #[error("invalid status {0:?} (a 4xx or 5xx code)")]
    RetryStatus(String),
    #[error("invalid statuses {0:?} (a code like 200, a class like 2xx, or a range like 200-299)")]
    HealthStatus(String),
}

/// The most servers one pool may list (each has its own metrics).
const MAX_SERVERS: usize = 64;
/// The most tries of one request.
const MAX_ATTEMPTS: u32 = 5;
/// The most checks in a row a health threshold may ask for.
const MAX_THRESHOLD: u32 = 100;
/// The most consecutive failures outlier ejection may wait for.
const MAX_FAILURES: u32 = 1000;
/// The shortest re-resolution interval of a host name.
const MIN_RESOLVE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A whole number from 1 to `most`.
fn bounded(text: &str, most: u32) -> Result<u32, Invalid> {
    match text.trim().parse::<u32>() {
        Ok(n) if (1..=most).contains(&n) => Ok(n),
        _ => Err(Invalid::CountUpTo(text.to_string(), most)),
    }
}

fn retry_status(text: &str) -> Result<u16, Refused> {
    match text.trim().parse::<u16>() {
        Ok(code) if (400..=599).contains(&code) => Ok(code),
        _ => Err(Refused::RetryStatus(text.to_string())),
    }
}

/// `200`, `2xx` or `200-299`: an inclusive range of statuses.
fn status_range(text: &str) -> Result<(u16, u16), Refused> {
    let bad = || Refused::HealthStatus(text.to_string());
    let code = |t: &str| {
        t.trim()
            .parse::<u16>()
            .ok()
            .filter(|c| (100..=599).contains(c))
    };
    let t = text.trim();
    let range = if let Some(class) = t.strip_suffix("xx") {
        code(&format!("{class}00")).map(|low| (low, low + 99))
    } else if let Some((low, high)) = t.split_once('-') {
        code(low).zip(code(high)).filter(|(l, h)| l <= h)
    } else {
        code(t).map(|c| (c, c))
    };
    range.ok_or_else(bad)
}

fn format_duration(d: std::time::Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Headers `upstream_headers` and `forward_headers` may not name: hop-by-hop and framing headers
/// belong to each connection, and `Host` has its own setting.
fn reserved(name: &HeaderName) -> Option<(&'static str, &'static str)> {
    let hop_by_hop = crate::http::hop_by_hop::is_hop_by_hop(name, &[]);
    if *name == http::header::HOST {
        Some(("host", " (use the route's host: to send a fixed Host)"))
    } else if hop_by_hop || *name == http::header::CONTENT_LENGTH {
        Some(("this header", " (it describes one connection or one body)"))
    } else {
        None
    }
}

impl Checker<'_> {
    fn refuse_upstream(&mut self, place: Place, path: &str, refused: Refused) {
        self.problems.add(place, path, refused);
    }

    /// Like `check`, for a value this file refuses in its own words.
    fn refusable<T>(
        &mut self,
        text: &Text,
        path: &str,
        parse: impl FnOnce(&str) -> Result<T, Refused>,
    ) -> Option<T> {
        parse(text)
            .map_err(|refused| self.refuse_upstream(Place::of(text), path, refused))
            .ok()
    }

    /// The route's upstream settings; `uri` and `http2` as checked (`None` when wrong, and the
    /// settings that depend on them are then not checked further).
    pub(super) fn upstream_settings(
        &mut self,
        route: &RouteFile,
        prefix: &str,
        uri: Option<&Uri>,
        http2: Option<bool>,
        policy: Option<&RoutePolicy>,
        pool: Option<PoolSettings>,
    ) -> Option<UpstreamSettings> {
        let host = match route.host.as_ref().filter(|t| !t.is_empty()) {
            None => Some(None),
            Some(text) => {
                let valid = text.parse::<http::uri::Authority>().is_ok_and(|a| {
                    !a.host().is_empty() && !a.as_str().contains('@') && a.as_str() == text.as_str()
                });
                match HeaderValue::from_str(text).ok().filter(|_| valid) {
                    Some(value) => Some(Some(value)),
                    None => {
                        let refused = Refused::Host(text.to_string());
                        self.refuse_upstream(Place::of(text), &format!("{prefix}.host"), refused);
                        None
                    }
                }
            }
        };
        let https = uri.is_some_and(|u| u.scheme_str() == Some("https"));
        let tls = match &route.tls {
            None => Some(UpstreamTls::default()),
            Some(tls) if uri.is_some() && !https => {
                self.refuse_upstream(Place::of(tls), &format!("{prefix}.tls"), Refused::NotHttps);
                None
            }
            Some(tls) => self.upstream_tls(tls, &format!("{prefix}.tls")),
        };
        let headers = match &route.upstream_headers {
            None => Some(UpstreamHeaders::default()),
            Some(file) => self.upstream_headers(file, &format!("{prefix}.upstream_headers")),
        };
        let policy = policy?;
        let armed = |timeout: std::time::Duration| (timeout < policy.max_fetch).then_some(timeout);
        Some(UpstreamSettings {
            protocol: match http2? {
                true => Protocol::Http2,
                false => Protocol::Negotiated,
            },
            connect_timeout: armed(policy.connect_timeout),
            response_header_timeout: armed(policy.response_header_timeout),
            read_timeout: policy.read_timeout,
            tls: tls?,
            headers: headers?,
            host: host?,
            pool: pool?,
        })
    }

    // ----- the pool

    /// `upstream:`: a URL (a pool of one that never retries) or a pool; the first server's URL
    /// and the pool, or `None` when wrong (reported).
    pub(super) fn upstream_pool(
        &mut self,
        file: Option<&Spanned<UpstreamFile>>,
        path: &str,
        missing_at: Place,
    ) -> Option<(Uri, PoolSettings)> {
        const EXPECTED: &str = "an absolute http or https url";
        let Some(file) = file else {
            self.problems
                .add(missing_at, path, Invalid::Missing(EXPECTED));
            return None;
        };
        match &**file {
            UpstreamFile::Url(text) => {
                let text = Text::new(*file.span(), text.clone());
                let uri = self.required(&Some(text), path, missing_at, EXPECTED, upstream)?;
                let pool = PoolSettings {
                    servers: vec![uri.clone()],
                    ..PoolSettings::default()
                };
                Some((uri, pool))
            }
            UpstreamFile::Pool(pool) => self.pool(pool, Place::of(file), path),
        }
    }

    fn pool(&mut self, file: &PoolFile, at: Place, path: &str) -> Option<(Uri, PoolSettings)> {
        let servers = self.servers(file, at, path);
        let balance = self.or_default(
            &file.balance,
            &format!("{path}.balance"),
            Balance::RoundRobin,
            |t| match t.trim() {
                "round_robin" => Ok(Balance::RoundRobin),
                "least_requests" => Ok(Balance::LeastRequests),
                "key_hash" => Ok(Balance::KeyHash),
                _ => Err(word(t, "round_robin, least_requests or key_hash")),
            },
        );
        let health = match &file.health {
            None => Some(None),
            Some(health) => self.health(health, &format!("{path}.health")).map(Some),
        };
        let outlier = match &file.outlier {
            None => Some(OutlierSettings::default()),
            Some(outlier) => self.outlier(outlier, &format!("{path}.outlier")),
        };
        let retries = match &file.retries {
            None => Some(RetrySettings::pool()),
            Some(retries) => self.retries(retries, &format!("{path}.retries")),
        };
        let resolve_every = self.or_default(
            &file.resolve_every,
            &format!("{path}.resolve_every"),
            PoolSettings::default().resolve_every,
            |t| match positive_duration(t)? {
                d if d < MIN_RESOLVE_EVERY => Err(Invalid::Zero),
                d => Ok(d),
            },
        );
        let servers = servers?;
        Some((
            servers[0].clone(),
            PoolSettings {
                servers,
                balance: balance?,
                health: health?,
                outlier: outlier?,
                retries: retries?,
                resolve_every: resolve_every?,
            },
        ))
    }

    /// `servers:`: at least one URL, at most [`MAX_SERVERS`], one scheme and one path for all.
    fn servers(&mut self, file: &PoolFile, at: Place, path: &str) -> Option<Vec<Uri>> {
        let path = format!("{path}.servers");
        let Some(list) = file.servers.as_ref().filter(|l| !l.is_empty()) else {
            let place = file.servers.as_ref().map_or(at, Place::of);
            self.refuse_upstream(place, &path, Refused::NoServers);
            return None;
        };
        if list.len() > MAX_SERVERS {
            self.refuse_upstream(Place::of(list), &path, Refused::TooManyServers);
            return None;
        }
        let mut servers: Vec<Uri> = Vec::new();
        let mut ok = true;
        for (i, text) in list.iter().enumerate() {
            let at = format!("{path}[{i}]");
            let Some(uri) = self.check(text, &at, upstream) else {
                ok = false;
                continue;
            };
            let refused = match servers.first() {
                _ if servers.contains(&uri) => Some(Refused::Duplicate(uri.to_string())),
                Some(first) if first.scheme_str() != uri.scheme_str() => Some(Refused::Mixed(
                    "its scheme",
                    first.scheme_str().unwrap_or_default().to_string(),
                )),
                Some(first) if first.path() != uri.path() => {
                    Some(Refused::Mixed("its path", first.path().to_string()))
                }
                _ => None,
            };
            match refused {
                Some(refused) => {
                    self.refuse_upstream(Place::of(text), &at, refused);
                    ok = false;
                }
                None => servers.push(uri),
            }
        }
        ok.then_some(servers)
    }

    fn health(&mut self, file: &Spanned<HealthFile>, path: &str) -> Option<HealthSettings> {
        let pass = self.or_default(&file.path, &format!("{path}.path"), "/".into(), |t| {
            absolute_path(t.trim())
        });
        let second = std::time::Duration::from_secs(1);
        let interval = self.or_default(
            &file.interval,
            &format!("{path}.interval"),
            5 * second,
            positive_duration,
        );
        let timeout = self.or_default(
            &file.timeout,
            &format!("{path}.timeout"),
            second,
            positive_duration,
        );
        let healthy = self.threshold(&file.healthy, &format!("{path}.healthy"), 2);
        let unhealthy = self.threshold(&file.unhealthy, &format!("{path}.unhealthy"), 3);
        let statuses = match &file.statuses {
            None => Some(vec![(200, 399)]),
            Some(list) => {
                let at = format!("{path}.statuses");
                let checked: Vec<_> = (list.iter().enumerate())
                    .map(|(i, t)| self.refusable(t, &format!("{at}[{i}]"), status_range))
                    .collect();
                checked.into_iter().collect()
            }
        };
        let (interval, timeout) = (interval?, timeout?);
        if timeout > interval {
            let text = file.timeout.as_ref()?;
            let refused = Refused::Longer(format_duration(timeout), "health.interval");
            self.refuse_upstream(Place::of(text), &format!("{path}.timeout"), refused);
            return None;
        }
        Some(HealthSettings {
            path: pass?,
            interval,
            timeout,
            healthy: healthy?,
            unhealthy: unhealthy?,
            statuses: statuses?,
        })
    }

    /// A count of checks or failures in a row, from 1 to [`MAX_THRESHOLD`].
    fn threshold(&mut self, text: &Option<Text>, path: &str, default: u32) -> Option<u32> {
        self.or_default(text, path, default, |t| bounded(t, MAX_THRESHOLD))
    }

    fn outlier(&mut self, file: &Spanned<OutlierFile>, path: &str) -> Option<OutlierSettings> {
        let d = OutlierSettings::default();
        let failures = self.or_default(
            &file.failures,
            &format!("{path}.failures"),
            d.failures,
            |t| bounded(t, MAX_FAILURES),
        );
        let ejection = self.or_default(
            &file.ejection,
            &format!("{path}.ejection"),
            d.ejection,
            positive_duration,
        );
        let max_ejection = self.or_default(
            &file.max_ejection,
            &format!("{path}.max_ejection"),
            d.max_ejection,
            positive_duration,
        );
        let max_ejected = self.or_default(
            &file.max_ejected,
            &format!("{path}.max_ejected"),
            d.max_ejected,
            percent,
        );
        let (ejection, max_ejection) = (ejection?, max_ejection?);
        if max_ejection < ejection {
            let place = file.max_ejection.as_ref().or(file.ejection.as_ref())?;
            let refused = Refused::Below {
                value: format_duration(max_ejection),
                other: "outlier.ejection",
                other_value: format_duration(ejection),
            };
            self.refuse_upstream(Place::of(place), &format!("{path}.max_ejection"), refused);
            return None;
        }
        Some(OutlierSettings {
            failures: failures?,
            ejection,
            max_ejection,
            max_ejected: max_ejected?,
        })
    }

    fn retries(&mut self, file: &Spanned<RetriesFile>, path: &str) -> Option<RetrySettings> {
        let d = RetrySettings::pool();
        let attempts = self.or_default(
            &file.attempts,
            &format!("{path}.attempts"),
            d.attempts,
            |t| bounded(t, MAX_ATTEMPTS),
        );
        let statuses = match &file.on {
            None => Some(d.statuses.clone()),
            Some(list) => {
                let at = format!("{path}.on");
                let checked: Vec<_> = (list.iter().enumerate())
                    .map(|(i, t)| self.refusable(t, &format!("{at}[{i}]"), retry_status))
                    .collect();
                checked.into_iter().collect::<Option<Vec<u16>>>()
            }
        };
        let budget = self.or_default(&file.budget, &format!("{path}.budget"), d.budget, percent);
        let budget_window = self.or_default(
            &file.budget_window,
            &format!("{path}.budget_window"),
            d.budget_window,
            |t| match positive_duration(t)? {
                w if w < std::time::Duration::from_secs(1) => Err(Invalid::Zero),
                w => Ok(w),
            },
        );
        let min_per_second = self.or_default(
            &file.min_per_second,
            &format!("{path}.min_per_second"),
            d.min_per_second,
            |t| match t.trim().parse::<u32>() {
                Ok(n) if n <= 1000 => Ok(n),
                _ => Err(Invalid::CountUpTo(t.to_string(), 1000)),
            },
        );
        Some(RetrySettings {
            attempts: attempts?,
            statuses: statuses?,
            budget: budget?,
            budget_window: budget_window?,
            min_per_second: min_per_second?,
        })
    }

    fn upstream_tls(&mut self, file: &Spanned<UpstreamTlsFile>, path: &str) -> Option<UpstreamTls> {
        let given = |t: &Option<Text>| t.as_ref().filter(|t| !t.is_empty()).cloned();
        let mut ok = true;
        let mut certificates = |checker: &mut Self, text: Option<Text>, name: &str| {
            let text = text?;
            let file = PathBuf::from(text.as_str());
            match read_certificates(&file) {
                Ok(certificates) => Some((file, certificates)),
                Err(e) => {
                    let refused = Refused::Tls(e.to_string());
                    checker.refuse_upstream(Place::of(&text), &format!("{path}.{name}"), refused);
                    ok = false;
                    None
                }
            }
        };
        let ca_file = certificates(self, given(&file.ca_file), "ca_file");
        let cert_file = certificates(self, given(&file.cert_file), "cert_file");
        let key = self.client_key(file, path);
        let key_place = given(&file.key_file)
            .or(given(&file.key))
            .map(|t| Place::of(&t));
        match (given(&file.cert_file), key_place) {
            (Some(cert), None) => {
                let refused = Refused::Needs("tls.key_file or tls.key");
                self.refuse_upstream(Place::of(&cert), &format!("{path}.key_file"), refused);
                return None;
            }
            (None, Some(place)) => {
                let refused = Refused::Needs("tls.cert_file");
                self.refuse_upstream(place, &format!("{path}.cert_file"), refused);
                return None;
            }
            _ => {}
        }
        let server_name = match given(&file.server_name) {
            None => Some(None),
            Some(text) => match rustls::pki_types::ServerName::try_from(text.as_str()) {
                Ok(_) => Some(Some(text.to_string())),
                Err(_) => {
                    let refused = Refused::ServerName(text.to_string());
                    let at = format!("{path}.server_name");
                    self.refuse_upstream(Place::of(&text), &at, refused);
                    None
                }
            },
        };
        let (key, server_name) = (key?, server_name?);
        if !ok {
            return None;
        }
        let sources = TlsSources {
            ca_file,
            cert_file,
            key,
            server_name,
        };
        UpstreamTls::build(sources)
            .map_err(|e| {
                let place = key_place.unwrap_or(Place::of(file));
                let at = format!("{path}.key_file");
                self.refuse_upstream(place, &at, Refused::Tls(e.to_string()));
            })
            .ok()
    }

    /// `tls.key` or `tls.key_file`: `Some(None)` when neither, `None` when wrong (reported).
    fn client_key(
        &mut self,
        file: &UpstreamTlsFile,
        path: &str,
    ) -> Option<Option<(KeySource, Vec<u8>)>> {
        let inline = file.key.as_ref().filter(|t| !t.is_empty());
        let from_file = file.key_file.as_ref().filter(|t| !t.is_empty());
        let (source, pem, place, at) = match (inline, from_file) {
            (None, None) => return Some(None),
            (Some(_), Some(file)) => {
                let at = format!("{path}.key");
                self.refuse_upstream(Place::of(file), &at, Refused::Twice("key"));
                return None;
            }
            (Some(text), None) => (
                KeySource::Inline,
                text.as_bytes().to_vec(),
                Place::of(text),
                format!("{path}.key"),
            ),
            (None, Some(text)) => {
                let at = format!("{path}.key_file");
                match read_secret_file(std::path::Path::new(text.as_str())) {
                    Ok(secret) => (
                        KeySource::File(PathBuf::from(text.as_str())),
                        secret.expose().as_bytes().to_vec(),
                        Place::of(text),
                        at,
                    ),
                    Err(e) => {
                        self.refuse_upstream(Place::of(text), &at, Refused::Tls(e));
                        return None;
                    }
                }
            }
        };
        match super::super::upstream::parse_key(&pem) {
            Ok(_) => Some(Some((source, pem))),
            Err(e) => {
                self.refuse_upstream(place, &at, Refused::Tls(e.to_string()));
                None
            }
        }
    }

    fn upstream_headers(
        &mut self,
        file: &Spanned<UpstreamHeadersFile>,
        path: &str,
    ) -> Option<UpstreamHeaders> {
        let set = self.header_values(&file.set, &file.set_file, &format!("{path}.set"));
        let add = self.header_values(&file.add, &file.add_file, &format!("{path}.add"));
        let remove = match &file.remove {
            None => Some(Vec::new()),
            Some(list) => {
                let mut names = Vec::new();
                let mut ok = true;
                for (i, text) in list.iter().enumerate() {
                    match self.reserved_name(text, &format!("{path}.remove[{i}]")) {
                        Some(name) => names.push(name),
                        None => ok = false,
                    }
                }
                ok.then_some(names)
            }
        };
        Some(UpstreamHeaders {
            set: set?,
            add: add?,
            remove: remove?,
        })
    }

    /// A header name that `upstream_headers` may name.
    fn reserved_name(&mut self, text: &Text, path: &str) -> Option<HeaderName> {
        let name = self.check(text, path, header_name)?;
        match reserved(&name) {
            Some((what, why)) => {
                self.refuse_upstream(Place::of(text), path, Refused::Reserved(what, why));
                None
            }
            None => Some(name),
        }
    }

    /// `set: {Name: value}` and `set_file: {Name: /path}` together, in file order; each value
    /// marked sensitive.
    fn header_values(
        &mut self,
        inline: &Option<Spanned<HashMap<Text, Text>>>,
        from_files: &Option<Spanned<HashMap<Text, Text>>>,
        path: &str,
    ) -> Option<Vec<(HeaderName, HeaderValue)>> {
        let mut entries: Vec<(&Text, &Text, bool)> = Vec::new();
        for (map, from_file) in [(inline, false), (from_files, true)] {
            if let Some(map) = map {
                entries.extend(map.iter().map(|(name, value)| (name, value, from_file)));
            }
        }
        entries.sort_by_key(|(name, _, _)| Place::of(*name));
        let mut checked = Vec::new();
        let mut ok = true;
        for (name_text, value, from_file) in entries {
            let at = format!("{path}.{}", name_text.as_str());
            let Some(name) = self.reserved_name(name_text, &at) else {
                ok = false;
                continue;
            };
            if checked.iter().any(|(seen, _)| *seen == name) {
                let refused = Refused::Duplicate(name.to_string());
                self.refuse_upstream(Place::of(name_text), &at, refused);
                ok = false;
                continue;
            }
            let bytes = match from_file {
                false => value.as_bytes().to_vec(),
                true => match read_secret_file(std::path::Path::new(value.as_str())) {
                    Ok(secret) => secret.expose().as_bytes().to_vec(),
                    Err(e) => {
                        self.refuse_upstream(Place::of(value), &at, Refused::Tls(e));
                        ok = false;
                        continue;
                    }
                },
            };
            match HeaderValue::from_bytes(&bytes) {
                Ok(mut value) => {
                    value.set_sensitive(true);
                    checked.push((name, value));
                }
                Err(_) => {
                    self.refuse_upstream(Place::of(value), &at, Refused::Value);
                    ok = false;
                }
            }
        }
        ok.then_some(checked)
    }

    /// `forward_headers: [User-Agent, {name: X-Device, unkeyed: true}]`: the keyed names (which
    /// join the key's headers) and the unkeyed ones (each warned about).
    pub(super) fn forward_headers(
        &mut self,
        list: Option<&Spanned<Vec<Spanned<ForwardFile>>>>,
        path: &str,
    ) -> Option<(Vec<HeaderName>, Vec<HeaderName>)> {
        let (mut keyed, mut unkeyed) = (Vec::new(), Vec::new());
        let mut ok = true;
        for (i, item) in list.into_iter().flat_map(|l| l.iter()).enumerate() {
            let at = format!("{path}[{i}]");
            let (name, is_unkeyed, place) = match &**item {
                ForwardFile::Name(name) => (name.clone(), false, Place::of(item)),
                ForwardFile::Entry(entry) => {
                    let Some(name) = entry.name.as_ref().filter(|t| !t.is_empty()) else {
                        let refused = Refused::Needs("name");
                        self.refuse_upstream(Place::of(item), &format!("{at}.name"), refused);
                        ok = false;
                        continue;
                    };
                    let unkeyed = match &entry.unkeyed {
                        None => Some(false),
                        Some(text) => self.check(text, &format!("{at}.unkeyed"), boolean),
                    };
                    let Some(unkeyed) = unkeyed else {
                        ok = false;
                        continue;
                    };
                    (name.to_string(), unkeyed, Place::of(name))
                }
            };
            let Ok(header) = header_name(&name) else {
                let refused = Invalid::Header(name);
                self.problems.add(place, &at, refused);
                ok = false;
                continue;
            };
            if let Some((what, why)) = reserved(&header) {
                self.refuse_upstream(place, &at, Refused::Reserved(what, why));
                ok = false;
                continue;
            }
            let private = header == http::header::AUTHORIZATION || header == http::header::COOKIE;
            if is_unkeyed && private {
                self.refuse_upstream(place, &at, Refused::Private(header.to_string()));
                ok = false;
                continue;
            }
            if keyed.contains(&header) || unkeyed.contains(&header) {
                self.refuse_upstream(place, &at, Refused::Duplicate(header.to_string()));
                ok = false;
                continue;
            }
            if is_unkeyed {
                self.problems.warn(
                    place,
                    &at,
                    format_args!(
                        "{header} is forwarded unkeyed: the first requester's value reaches the \
                         upstream for everyone who shares the answer"
                    ),
                );
                unkeyed.push(header);
            } else {
                keyed.push(header);
            }
        }
        ok.then_some((keyed, unkeyed))
    }
}
