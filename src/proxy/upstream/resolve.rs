//! Names and addresses: a pool server written as a host name stands for every address the name
//! resolves to, each a server of its own (with its own connections, health and metrics), while
//! `Host` and SNI keep the name. Names are resolved again every `resolve_every` (the system
//! resolver does not tell a record's TTL, so the setting stands for it); a name keeps at most
//! [`MAX_ADDRESSES`] addresses, and a failed lookup keeps the last ones found.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use tower_service::Service;

/// The most addresses one name stands for: a name with more is served by the first ones (in
/// address order, so every replica picks the same).
pub(super) const MAX_ADDRESSES: usize = 16;

/// How a server's connections find its address.
#[derive(Clone)]
pub(super) enum Resolver {
    /// The system's resolver, at each connect: a name not resolved yet, or an IP literal.
    System(GaiResolver),
    /// The one address this server is.
    Pinned(SocketAddr),
}

impl Resolver {
    pub fn system() -> Self {
        Resolver::System(GaiResolver::new())
    }
}

type Resolving = Pin<Box<dyn Future<Output = io::Result<std::vec::IntoIter<SocketAddr>>> + Send>>;

impl Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = Resolving;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        match self {
            Resolver::System(system) => {
                let resolving = system.call(name);
                Box::pin(async move { Ok(resolving.await?.collect::<Vec<_>>().into_iter()) })
            }
            // The connector sets the URI's port on it.
            Resolver::Pinned(addr) => {
                let addr = *addr;
                Box::pin(async move { Ok(vec![addr].into_iter()) })
            }
        }
    }
}

/// The host name of a server's URL, or `None` for an IP literal (nothing to resolve).
pub(super) fn host_name(url: &Uri) -> Option<&str> {
    let host = url.host()?;
    let literal = host.trim_matches(['[', ']']);
    literal.parse::<IpAddr>().is_err().then_some(host)
}

/// The port a URL connects to.
pub(super) fn port(url: &Uri) -> u16 {
    url.port_u16()
        .unwrap_or(if url.scheme_str() == Some("https") {
            443
        } else {
            80
        })
}

/// Every address of `host` (at most [`MAX_ADDRESSES`]), sorted, with `port`.
pub(super) async fn resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    let mut found: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    found.sort();
    found.dedup();
    found.truncate(MAX_ADDRESSES);
    if found.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{host} has no address"),
        ));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_name_is_resolved() {
        let name: Uri = "https://api.example.com/v1".parse().unwrap();
        assert_eq!(host_name(&name), Some("api.example.com"));
        assert_eq!(port(&name), 443);
        let v4: Uri = "http://10.0.0.1:8080".parse().unwrap();
        assert_eq!(host_name(&v4), None);
        assert_eq!(port(&v4), 8080);
        let v6: Uri = "http://[::1]:9000".parse().unwrap();
        assert_eq!(host_name(&v6), None);
    }

    #[tokio::test]
    async fn a_name_stands_for_its_addresses_in_order() {
        let found = resolve("localhost", 8080)
            .await
            .expect("localhost resolves");
        assert!(!found.is_empty() && found.len() <= MAX_ADDRESSES);
        assert!(
            found
                .iter()
                .all(|a| a.port() == 8080 && a.ip().is_loopback())
        );
        assert!(found.windows(2).all(|w| w[0] < w[1]), "{found:?}");
    }
}
