//! Which route a request takes: the first whose method, host and path match.

use http::{HeaderMap, Method, Uri};

use crate::config::{Config, PathMatch, Route};

/// The first route of `config` that matches a request, by index.
pub fn route_for(
    config: &Config,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Option<usize> {
    // Worked out only for the first route that matches on the host: most match on paths alone.
    let host = std::cell::OnceCell::new();
    let host = || host.get_or_init(|| request_host(uri, headers)).as_deref();
    config
        .routes
        .iter()
        .position(|route| route_matches(route, method, uri.path(), &host))
}

/// The methods the routes matching a request's path and host take, when none takes its method:
/// what a `405`'s `Allow` lists. Empty when no route matches the path at all (a `404`).
pub(super) fn methods_allowed(config: &Config, uri: &Uri, headers: &HeaderMap) -> Vec<Method> {
    let host = std::cell::OnceCell::new();
    let host = || host.get_or_init(|| request_host(uri, headers)).as_deref();
    let mut allowed: Vec<Method> = Vec::new();
    for route in &config.routes {
        let methods = &route.matcher.methods;
        if let Some(first) = methods.first()
            && route_matches(route, first, uri.path(), &host)
        {
            for method in methods {
                if !allowed.contains(method) {
                    allowed.push(method.clone());
                }
            }
        }
    }
    allowed
}

fn route_matches<'h>(
    route: &Route,
    method: &Method,
    path: &str,
    host: &impl Fn() -> Option<&'h str>,
) -> bool {
    let matcher = &route.matcher;
    if !matcher.methods.is_empty() && !matcher.methods.contains(method) {
        return false;
    }
    if let Some(wanted) = &matcher.host
        && host() != Some(wanted.as_str())
    {
        return false;
    }
    match &matcher.path {
        PathMatch::Exact(exact) => path == exact,
        PathMatch::Prefix(prefix) => path.starts_with(prefix.as_str()),
        PathMatch::Regex(regex) => regex.is_match(path),
    }
}

/// The request's host, lowercase and without a port.
fn request_host(uri: &Uri, headers: &HeaderMap) -> Option<String> {
    let raw = uri.host().map(str::to_owned).or_else(|| {
        headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            // As an authority, so an IPv6 literal's colons are not taken for a port's.
            .and_then(|h| h.parse::<http::uri::Authority>().ok())
            .map(|authority| authority.host().to_owned())
    })?;
    Some(raw.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_a_route_matches_has_no_port() {
        let host = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(http::header::HOST, value.parse().unwrap());
            request_host(&Uri::from_static("/"), &headers)
        };
        assert_eq!(host("Example.com:8080").as_deref(), Some("example.com"));
        assert_eq!(host("example.com").as_deref(), Some("example.com"));
        assert_eq!(host("[::1]").as_deref(), Some("[::1]"));
        assert_eq!(host("[::1]:8080").as_deref(), Some("[::1]"));
    }
}
