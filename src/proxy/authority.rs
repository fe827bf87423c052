//! One authority per request: the host a request is routed on, keyed with and forwarded with.
//!
//! A request names its authority in its `Host` line, or in an absolute-form target
//! (`GET http://example.com/x HTTP/1.1`, or HTTP/2's `:authority`), which then wins over any `Host`
//! line (RFC 9112 section 3.2.2). Before anything reads it, the request is rewritten to the origin
//! form with one canonical `Host`: lowercase, without the trailing dot of a fully qualified name,
//! without the listener's default port (80) or an empty one. So `EXAMPLE.com.`, `example.com:80`
//! and `http://example.com/` are one authority to the route match, to a key that names `host`,
//! and to the upstream; `example.com:8080` stays another one.
//!
//! A request whose authority is ambiguous is refused: two `Host` lines (upstreams disagree on
//! which one counts), a user-info part (`evil@example.com`), or anything that does not parse as
//! an authority.

use http::uri::{Authority, Uri};
use http::{HeaderMap, HeaderValue, Request, header};

/// The port a plain-HTTP listener's clients leave out.
const DEFAULT_PORT: u16 = 80;

/// Why a request's authority was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthorityError {
    #[error("more than one Host header")]
    Repeated,
    #[error("the Host header is not text")]
    NotText,
    #[error("the host {0:?} is not a valid authority")]
    Invalid(String),
    #[error("the host {0:?} carries user information")]
    UserInfo(String),
}

/// Rewrites `request` to the origin form with its canonical `Host` (see the module docs); a
/// request that names no authority at all is left as it is.
pub fn canonicalise<B>(request: &mut Request<B>) -> Result<(), AuthorityError> {
    let named = named_authority(request.uri(), request.headers())?;
    let Some(named) = named else {
        return Ok(());
    };
    let canonical = canonical(&named)?;
    let value = HeaderValue::from_str(&canonical).map_err(|_| AuthorityError::Invalid(named))?;
    request.headers_mut().insert(header::HOST, value);
    if request.uri().authority().is_some() {
        let origin = request
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned();
        // An origin-form path always parses: it came from a parsed URI.
        if let Ok(uri) = origin.parse::<Uri>() {
            *request.uri_mut() = uri;
        }
    }
    Ok(())
}

/// The authority as the request names it: the target's, else the one `Host` line's.
fn named_authority(uri: &Uri, headers: &HeaderMap) -> Result<Option<String>, AuthorityError> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(AuthorityError::Repeated);
    }
    if let Some(authority) = uri.authority() {
        return Ok(Some(authority.as_str().to_owned()));
    }
    match host {
        Some(value) => value
            .to_str()
            .map(|text| Some(text.to_owned()))
            .map_err(|_| AuthorityError::NotText),
        None => Ok(None),
    }
}

/// `host[:port]`, lowercase, without a trailing dot or the default port.
fn canonical(named: &str) -> Result<String, AuthorityError> {
    let invalid = || AuthorityError::Invalid(named.to_owned());
    if named.contains('@') {
        return Err(AuthorityError::UserInfo(named.to_owned()));
    }
    let authority: Authority = named.parse().map_err(|_| invalid())?;
    let host = authority.host().to_ascii_lowercase();
    let is_ip_literal = host.starts_with('[');
    let host = match host.strip_suffix('.') {
        Some(stripped) if !is_ip_literal && !stripped.is_empty() && !stripped.ends_with('.') => {
            stripped.to_owned()
        }
        Some(_) => return Err(invalid()),
        None => host,
    };
    if host.is_empty() {
        return Err(invalid());
    }
    // Whatever follows the last colon after the host is the port: digits, or nothing at all.
    let text = authority.as_str();
    let after_host = text.rfind(']').map_or(text, |i| &text[i + 1..]);
    let port = match after_host.rsplit_once(':').map(|(_, port)| port) {
        None | Some("") => None,
        Some(port) if port.bytes().all(|b| b.is_ascii_digit()) => {
            Some(port.parse::<u16>().map_err(|_| invalid())?)
        }
        Some(_) => return Err(invalid()),
    };
    Ok(match port {
        Some(port) if port != DEFAULT_PORT => format!("{host}:{port}"),
        _ => host,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(target: &str, hosts: &[&str]) -> Request<()> {
        let mut builder = Request::builder().uri(target);
        for host in hosts {
            builder = builder.header(header::HOST, *host);
        }
        builder.body(()).unwrap()
    }

    fn host_of(target: &str, hosts: &[&str]) -> Result<(String, String), AuthorityError> {
        let mut request = request(target, hosts);
        canonicalise(&mut request)?;
        let host = request
            .headers()
            .get(header::HOST)
            .map_or("-", |v| v.to_str().unwrap())
            .to_owned();
        Ok((host, request.uri().to_string()))
    }

    #[test]
    fn every_spelling_of_one_host_is_one_authority() {
        for host in [
            "example.com",
            "EXAMPLE.com",
            "example.com.",
            "Example.Com.:80",
            "example.com:",
            "example.com:080",
        ] {
            assert_eq!(
                host_of("/a?b", &[host]),
                Ok(("example.com".into(), "/a?b".into())),
                "{host}"
            );
        }
        assert_eq!(
            host_of("/", &["example.com:8080"]).unwrap().0,
            "example.com:8080"
        );
        assert_eq!(host_of("/", &["[::1]:80"]).unwrap().0, "[::1]");
        assert_eq!(host_of("/", &["127.0.0.1:81"]).unwrap().0, "127.0.0.1:81");
    }

    #[test]
    fn an_absolute_target_names_the_authority_and_becomes_origin_form() {
        assert_eq!(
            host_of("http://Other.example./x?y=1", &["example.com"]),
            Ok(("other.example".into(), "/x?y=1".into()))
        );
        assert_eq!(
            host_of("http://other.example", &[]),
            Ok(("other.example".into(), "/".into()))
        );
    }

    #[test]
    fn no_authority_is_left_alone() {
        assert_eq!(host_of("/x", &[]), Ok(("-".into(), "/x".into())));
    }

    #[test]
    fn ambiguous_authorities_are_refused() {
        assert_eq!(
            host_of("/", &["a.example", "b.example"]),
            Err(AuthorityError::Repeated)
        );
        assert_eq!(
            host_of("/", &["a.example", "a.example"]),
            Err(AuthorityError::Repeated)
        );
        assert!(matches!(
            host_of("/", &["evil.example@example.com"]),
            Err(AuthorityError::UserInfo(_))
        ));
        for bad in [
            "example.com/x",
            "",
            ".",
            "example.com..",
            "a b",
            "example.com:x",
        ] {
            assert!(
                matches!(host_of("/", &[bad]), Err(AuthorityError::Invalid(_))),
                "{bad:?}: {:?}",
                host_of("/", &[bad])
            );
        }
    }
}
