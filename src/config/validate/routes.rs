//! The routes: each one's name, match, upstream and key, and its caching settings layered over
//! `defaults:`, refused where they contradict each other or the store.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use marked_yaml::Spanned;
use regex::Regex;

use super::super::schema::{
    CompressFile, CookiesFile, EncodingFile, File, KeyFile, MatchFile, PolicyFile, QueryFile,
    RouteFile, Text,
};
use super::super::settings::caching_settings;
use super::super::units::format_duration;
use super::super::{
    Beta, Compress, CookieMode, Encoding, KeyRules, OnWaitTimeout, PathMatch, Place, QueryRule,
    Route, RouteMatch, RoutePolicy, Semantics, VaryMode,
};
use super::values::*;
use super::{Checker, Invalid, Set};
use crate::engine::{ExpiryMode, OnStoreError};
use crate::http::encoding::Coding;

/// Validation's side of the caching settings ([`super::settings`]): a [`Layer`] of the values
/// one part of the file sets, a layer over another, and a layer's text checked.
macro_rules! layer {
    ($($(#[$doc:meta])* $name:ident: $ty:ty = $default:expr,
        file: $file:ty, check: $check:expr, show: $show:expr;)*) => {
        /// The policy values one layer of the file sets: `defaults:` or a route's overrides.
        #[derive(Clone, Debug, Default)]
        struct Layer {
            $($name: Option<Set<$ty>>,)*
        }

        impl Layer {
            /// This layer where it says something, `base` elsewhere.
            fn over(self, base: &Layer) -> Layer {
                Layer {
                    $($name: self.$name.or_else(|| base.$name.clone()),)*
                }
            }

            /// The policy this layer makes, with the built-in defaults where nothing was written.
            fn policy(&self) -> RoutePolicy {
                let default = RoutePolicy::default();
                let policy = RoutePolicy {
                    $($name: self.$name.as_ref().map_or(default.$name, |set| set.value.clone()),)*
                };
                // A sliding expiry's window is the route's TTL.
                let expiry = match policy.expiry {
                    ExpiryMode::Sliding { .. } => ExpiryMode::Sliding { window: policy.ttl },
                    absolute => absolute,
                };
                RoutePolicy { expiry, ..policy }
            }
        }

        impl Checker<'_> {
            /// The policy values written in one layer, `prefix` naming it (`defaults`,
            /// `routes[2]`).
            fn layer(&mut self, file: &PolicyFile, prefix: &str) -> Layer {
                Layer {
                    $($name: ($check)(self, &file.$name, format!("{prefix}.{}", stringify!($name))),)*
                }
            }
        }
    };
}

caching_settings!(layer);

/// A setting's checker that parses its one text with `parse`.
fn parsed<T>(
    parse: fn(&str) -> Result<T, Invalid>,
) -> impl FnOnce(&mut Checker<'_>, &Option<Text>, String) -> Option<Set<T>> {
    move |checker, text, path| checker.value(text, &path, parse)
}

impl Checker<'_> {
    // ----- routes

    pub(super) fn routes(&mut self, file: &Spanned<File>, nats_store: bool) -> Option<Vec<Route>> {
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
        let pool = self.upstream_pool(route.upstream.as_ref(), &format!("{prefix}.upstream"), at);
        let upstream = pool.as_ref().map(|(first, _)| first.clone());
        let cache = self.or_default(&route.cache, &format!("{prefix}.cache"), true, boolean);
        let upstream_http2 = self.or_default(
            &route.upstream_http2,
            &format!("{prefix}.upstream_http2"),
            false,
            boolean,
        );
        let mut key = match route.key.as_deref() {
            None => Some(KeyRules::default()),
            Some(key) => self.key(key, &format!("{prefix}.key")),
        };
        let forward = self.forward_headers(
            route.forward_headers.as_ref(),
            &format!("{prefix}.forward_headers"),
        );
        // A keyed forwarded header is a key header: the key holds it, so the fetch may send it.
        if let (Some(key), Some((keyed, _))) = (&mut key, &forward) {
            key.headers.extend(keyed.iter().cloned());
            key.headers.sort_by(|a, b| a.as_str().cmp(b.as_str()));
            key.headers.dedup();
        }
        let layer = self.layer(&route.policy(), &prefix).over(defaults);
        let policy = self.policy(&layer, &prefix, nats_store);
        let settings = self.upstream_settings(
            route,
            &prefix,
            upstream.as_ref(),
            upstream_http2,
            policy.as_ref(),
            pool.map(|(_, pool)| pool),
        );
        Some(Route {
            name: name?,
            matcher: matcher?,
            upstream: upstream?,
            cache: cache?,
            upstream_http2: upstream_http2?,
            key: key?,
            policy: policy?,
            upstream_settings: Arc::new(settings?),
            forward_unkeyed: forward?.1,
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

    /// `cache_statuses: [200, 404, 503]`: statuses corral may store, sorted (a 5xx only when the
    /// upstream gives it explicit freshness, see `verdict::shared_failure`).
    fn statuses(
        &mut self,
        list: &Option<Spanned<Vec<Text>>>,
        path: String,
    ) -> Option<Set<Vec<u16>>> {
        let list = list.as_ref()?;
        let value = sorted(self.list(list, &path, any_status)?);
        Some(Set {
            value,
            place: Place::of(list),
            path,
        })
    }

    /// `cookies: bypass | strip | {strip: [_ga*, _gid]}`.
    fn cookie_mode(
        &mut self,
        cookies: &Option<Spanned<CookiesFile>>,
        path: String,
    ) -> Option<Set<CookieMode>> {
        let cookies = cookies.as_ref()?;
        let value = match &**cookies {
            CookiesFile::Word(word) if word == "bypass" => CookieMode::Bypass,
            CookiesFile::Word(word) if word == "strip" => CookieMode::Strip,
            CookiesFile::Word(other) => {
                let invalid = word(other, "bypass, strip or {strip: [names]}");
                self.report(Place::of(cookies), &path, invalid);
                return None;
            }
            CookiesFile::Strip(names) => CookieMode::StripNamed(sorted(self.list(
                names,
                &format!("{path}.strip"),
                cookie_pattern,
            )?)),
        };
        Some(Set {
            value,
            place: Place::of(cookies),
            path,
        })
    }

    /// `error_ttl: {404: 30s, 503: 2s}`, in place.
    fn error_ttl(
        &mut self,
        map: &Option<Spanned<HashMap<Text, Text>>>,
        path: String,
    ) -> Option<Set<BTreeMap<u16, Duration>>> {
        let map = map.as_ref()?;
        let value = self.error_ttl_map(map, &path)?;
        Some(Set {
            value,
            place: Place::of(map),
            path,
        })
    }

    /// `error_ttl: {404: 30s, 503: 2s}`: any status (a 5xx too), each with a TTL above zero.
    fn error_ttl_map(
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

    /// `encoding: {accept: [...], compress: {types: [...], min_size: 1KiB, with: [...]}}`: what
    /// the file leaves out of it takes the built-in default (a route's `encoding` replaces the
    /// one in `defaults` whole).
    fn encoding(
        &mut self,
        file: &Option<Spanned<EncodingFile>>,
        path: String,
    ) -> Option<Set<Encoding>> {
        let file = file.as_ref()?;
        let default = Encoding::default();
        let accept = match &file.accept {
            None => Some(default.accept),
            Some(list) => self.codings(list, &format!("{path}.accept")),
        };
        let compress = match file.compress.as_deref() {
            None => Some(default.compress),
            Some(compress) => self.compress(compress, &format!("{path}.compress")),
        };
        Some(Set {
            value: Encoding {
                accept: accept?,
                compress: compress?,
            },
            place: Place::of(file),
            path,
        })
    }

    fn compress(&mut self, file: &CompressFile, path: &str) -> Option<Compress> {
        let default = Compress::default();
        let types = match &file.types {
            None => Some(default.types),
            Some(list) => self.list(list, &format!("{path}.types"), media_range),
        };
        let min_size = self.or_default(
            &file.min_size,
            &format!("{path}.min_size"),
            default.min_size,
            size,
        );
        let with = match &file.with {
            None => Some(default.with),
            Some(list) => self.codings(list, &format!("{path}.with")),
        };
        Some(Compress {
            types: types?,
            min_size: min_size?,
            with: with?,
        })
    }

    /// A list of content codings, each named once.
    fn codings(&mut self, list: &Spanned<Vec<Text>>, path: &str) -> Option<Vec<Coding>> {
        let codings = self.list(list, path, coding)?;
        let mut ok = true;
        for (i, coding) in codings.iter().enumerate() {
            if codings[..i].contains(coding) {
                let invalid = Invalid::Repeated(coding.as_str().to_owned());
                self.report(Place::of(&list[i]), &format!("{path}[{i}]"), invalid);
                ok = false;
            }
        }
        ok.then_some(codings)
    }

    /// A route's effective policy, refusing values that contradict each other or the store.
    fn policy(&mut self, layer: &Layer, prefix: &str, nats_store: bool) -> Option<RoutePolicy> {
        let mut policy = layer.policy();
        let mut ok = true;
        // Each upstream timeout bounds one part of a fetch that max_fetch bounds whole: one
        // written longer is refused, a default longer is cut to it.
        let max_fetch = policy.max_fetch;
        for timeout in [
            &layer.connect_timeout,
            &layer.response_header_timeout,
            &layer.read_timeout,
        ]
        .into_iter()
        .flatten()
        .filter(|timeout| timeout.value > max_fetch)
        {
            let invalid = Invalid::MinAboveMax {
                value: format_duration(timeout.value),
                other: layer
                    .max_fetch
                    .as_ref()
                    .map_or("max_fetch (default)".to_string(), |set| set.path.clone()),
                other_value: format_duration(max_fetch),
            };
            self.report(timeout.place, &timeout.path, invalid);
            ok = false;
        }
        policy.connect_timeout = policy.connect_timeout.min(max_fetch);
        policy.response_header_timeout = policy.response_header_timeout.min(max_fetch);
        policy.read_timeout = policy.read_timeout.min(max_fetch);
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
        if policy.semantics == Semantics::Rfc9111
            && !policy.honor_cache_control
            && let Some(honor) = &layer.honor_cache_control
        {
            self.report(
                honor.place,
                &honor.path,
                Invalid::Rfc9111IgnoringCacheControl,
            );
            ok = false;
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
