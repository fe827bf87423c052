//! A route's upstream settings: `tls:`, `upstream_headers:`, `host:` and `forward_headers:`,
//! checked into one [`UpstreamSettings`]. The TLS files are read and parsed here, and a client
//! key is matched against its certificate, so `corral check` finds what a connection would
//! trip on. No message quotes a header value or a key: either may be a secret.

use std::collections::HashMap;
use std::path::PathBuf;

use http::{HeaderName, HeaderValue, Uri};
use marked_yaml::Spanned;

use super::super::Place;
use super::super::schema::{ForwardFile, RouteFile, Text, UpstreamHeadersFile, UpstreamTlsFile};
use super::super::upstream::{KeySource, TlsSources, read_certificates};
use super::super::{Protocol, RoutePolicy, UpstreamHeaders, UpstreamSettings, UpstreamTls};
use super::{Checker, boolean, header_name};
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

    /// The route's upstream settings; `uri` and `http2` as checked (`None` when wrong, and the
    /// settings that depend on them are then not checked further).
    pub(super) fn upstream_settings(
        &mut self,
        route: &RouteFile,
        prefix: &str,
        uri: Option<&Uri>,
        http2: Option<bool>,
        policy: Option<&RoutePolicy>,
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
                let refused = super::Invalid::Header(name);
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
