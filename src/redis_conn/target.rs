//! The three URL forms of a Redis deployment, parsed into a [`Target`].
//!
//! - one server: `redis://[user:password@]host[:port][/db]`, `redis+unix:///path` or `unix:///path`
//!   (whatever the redis crate's own parser takes);
//! - Sentinel: `redis+sentinel://[user:password@]host[:port][,host[:port]...]/<master>[/db]`
//!   `[?sentinel_username=...&sentinel_password=...]`: the hosts are sentinels (port 26379 by
//!   default); the user and password in front are the data nodes', and the query gives the
//!   sentinels' own, which a deployment often sets apart (`requirepass` in `sentinel.conf`);
//! - Cluster: `redis+cluster://[user:password@]host[:port][,host[:port]...]`: seed nodes (port
//!   6379 by default); the client learns the rest of the cluster from them.
//!
//! User names and passwords may be percent-encoded (`%40` for `@`). TLS is built for one server
//! (`rediss://host[:port][/db]`, checked against the system's roots or the CA of the config's
//! `tls:` section, see [`crate::credentials::redis`]); `rediss+sentinel://` and
//! `rediss+cluster://` are refused, as a connection that silently went out in clear text would be
//! worse than none.

use std::fmt;

use redis::{ConnectionInfo, IntoConnectionInfo};

/// Default port of a sentinel.
pub const SENTINEL_PORT: u16 = 26379;
/// Default port of a Redis server (and of a cluster node).
pub const REDIS_PORT: u16 = 6379;

/// Where a Redis store or bus connects.
#[derive(Clone)]
pub enum Target {
    /// One server, as the redis crate parsed it.
    Single(ConnectionInfo),
    /// A primary found through Sentinel, followed across failovers.
    Sentinel(SentinelTarget),
    /// A Redis Cluster, reached through its seed nodes.
    Cluster(ClusterTarget),
}

/// A user name and password; either may be absent.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Auth {
    pub username: Option<String>,
    pub password: Option<String>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

/// A `host:port` pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// `redis+sentinel://...`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentinelTarget {
    /// Asked in this order for the primary's address.
    pub sentinels: Vec<Node>,
    /// The name the sentinels monitor the primary under (`sentinel monitor <name> ...`).
    pub master: String,
    /// Database on the data nodes.
    pub db: i64,
    /// Credentials of the data nodes (primary and replicas).
    pub node_auth: Auth,
    /// Credentials of the sentinels.
    pub sentinel_auth: Auth,
}

/// `redis+cluster://...`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterTarget {
    /// Nodes to learn the cluster's layout from; one reachable seed is enough.
    pub seeds: Vec<Node>,
    /// Credentials of every node.
    pub auth: Auth,
}

/// Why a Redis URL cannot be used; reads after `invalid redis url: `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error(
        "{0}:// asks for TLS, which corral supports for one server (rediss://) only; use {1}:// \
         on a trusted network, or a local TLS tunnel (stunnel, spiped) to the servers"
    )]
    Tls(String, &'static str),
    #[error(
        "unknown scheme {0:?} (expected redis, rediss, redis+unix, unix, redis+sentinel or \
         redis+cluster)"
    )]
    Scheme(String),
    #[error("no host")]
    NoHost,
    #[error("invalid host {0:?} (expected host or host:port)")]
    Host(String),
    #[error("invalid port in {0:?}")]
    Port(String),
    #[error("no master name (expected redis+sentinel://host:26379,.../<master name>)")]
    NoMaster,
    #[error("invalid database {0:?} (expected a number)")]
    Db(String),
    #[error("a cluster has only database 0, got {0:?}")]
    ClusterDb(String),
    #[error("unknown query parameter {0:?} (expected {1})")]
    Query(String, &'static str),
    #[error("invalid percent-encoding in {0}")]
    Encoding(&'static str),
    #[error("{0}")]
    Single(String),
}

impl Target {
    /// Parses any of the forms in the module docs.
    pub fn parse(url: &str) -> Result<Target, TargetError> {
        let url = url.trim();
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(TargetError::Scheme(url.to_string()));
        };
        match scheme {
            "rediss+sentinel" => Err(TargetError::Tls(scheme.into(), "redis+sentinel")),
            "rediss+cluster" => Err(TargetError::Tls(scheme.into(), "redis+cluster")),
            "redis+sentinel" => parse_sentinel(rest).map(Target::Sentinel),
            "redis+cluster" => parse_cluster(rest).map(Target::Cluster),
            "redis" | "rediss" | "redis+unix" | "unix" => {
                if rest.is_empty() {
                    return Err(TargetError::NoHost);
                }
                url.into_connection_info()
                    .map(Target::Single)
                    .map_err(|e| TargetError::Single(e.to_string()))
            }
            other => Err(TargetError::Scheme(other.to_string())),
        }
    }

    /// Short name of the form, for logs and messages.
    pub fn form(&self) -> &'static str {
        match self {
            Target::Single(_) => "redis",
            Target::Sentinel(_) => "sentinel",
            Target::Cluster(_) => "cluster",
        }
    }

    /// Where it points, without credentials: for messages.
    pub fn describe(&self) -> String {
        let list = |nodes: &[Node]| {
            nodes
                .iter()
                .map(Node::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        match self {
            Target::Single(info) => info.addr().to_string(),
            Target::Sentinel(s) => {
                format!("master {:?} via sentinels {}", s.master, list(&s.sentinels))
            }
            Target::Cluster(c) => format!("cluster seeds {}", list(&c.seeds)),
        }
    }
}

/// `[userinfo@]hosts[/path][?query]`, split in its parts.
struct Parts<'a> {
    auth: Auth,
    hosts: &'a str,
    path: &'a str,
    query: &'a str,
}

fn split(rest: &str) -> Result<Parts<'_>, TargetError> {
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, ""),
    };
    let (auth, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (userinfo_auth(userinfo)?, hosts),
        None => (Auth::default(), authority),
    };
    Ok(Parts {
        auth,
        hosts,
        path,
        query,
    })
}

/// `user:password`, `:password` or `user`, percent-decoded.
fn userinfo_auth(userinfo: &str) -> Result<Auth, TargetError> {
    let (user, password) = match userinfo.split_once(':') {
        Some((user, password)) => (user, Some(password)),
        None => (userinfo, None),
    };
    let user = decode(user, "the user name")?;
    let password = password.map(|p| decode(p, "the password")).transpose()?;
    Ok(Auth {
        username: Some(user).filter(|u| !u.is_empty()),
        password: password.filter(|p| !p.is_empty()),
    })
}

fn nodes(hosts: &str, default_port: u16) -> Result<Vec<Node>, TargetError> {
    if hosts.trim().is_empty() {
        return Err(TargetError::NoHost);
    }
    hosts
        .split(',')
        .map(|h| node(h.trim(), default_port))
        .collect()
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn node(text: &str, default_port: u16) -> Result<Node, TargetError> {
    let bad = || TargetError::Host(text.to_string());
    let (host, port) = if let Some(v6) = text.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(bad)?;
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':').ok_or_else(bad)?)),
        }
    } else {
        match text.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    let valid = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b));
    if !valid {
        return Err(bad());
    }
    let port = match port {
        None => default_port,
        Some(port) => match port.parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => return Err(TargetError::Port(text.to_string())),
        },
    };
    Ok(Node {
        host: host.to_string(),
        port,
    })
}

fn parse_sentinel(rest: &str) -> Result<SentinelTarget, TargetError> {
    const KNOWN: &str = "sentinel_username or sentinel_password";
    let parts = split(rest)?;
    let sentinels = nodes(parts.hosts, SENTINEL_PORT)?;
    let mut segments = parts.path.trim_start_matches('/').splitn(2, '/');
    let master = decode(segments.next().unwrap_or_default(), "the master name")?;
    if master.is_empty() {
        return Err(TargetError::NoMaster);
    }
    let db = match segments.next().filter(|d| !d.is_empty()) {
        None => 0,
        Some(db) => db
            .parse::<i64>()
            .ok()
            .filter(|d| *d >= 0)
            .ok_or_else(|| TargetError::Db(db.to_string()))?,
    };
    let mut sentinel_auth = Auth::default();
    for pair in parts.query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "sentinel_username" => {
                sentinel_auth.username =
                    Some(decode(value, "sentinel_username")?).filter(|v| !v.is_empty());
            }
            "sentinel_password" => {
                sentinel_auth.password =
                    Some(decode(value, "sentinel_password")?).filter(|v| !v.is_empty());
            }
            other => return Err(TargetError::Query(other.to_string(), KNOWN)),
        }
    }
    Ok(SentinelTarget {
        sentinels,
        master,
        db,
        node_auth: parts.auth,
        sentinel_auth,
    })
}

fn parse_cluster(rest: &str) -> Result<ClusterTarget, TargetError> {
    let parts = split(rest)?;
    let seeds = nodes(parts.hosts, REDIS_PORT)?;
    match parts.path {
        "" | "/" | "/0" => {}
        other => return Err(TargetError::ClusterDb(other.trim_start_matches('/').into())),
    }
    if let Some(pair) = parts.query.split('&').find(|p| !p.is_empty()) {
        let name = pair.split_once('=').map_or(pair, |(n, _)| n);
        return Err(TargetError::Query(name.to_string(), "none"));
    }
    Ok(ClusterTarget {
        seeds,
        auth: parts.auth,
    })
}

/// Percent-decoding of one URL component, into UTF-8.
fn decode(text: &str, what: &'static str) -> Result<String, TargetError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(TargetError::Encoding(what))?;
            let hex = std::str::from_utf8(hex).map_err(|_| TargetError::Encoding(what))?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| TargetError::Encoding(what))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| TargetError::Encoding(what))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(user: Option<&str>, password: Option<&str>) -> Auth {
        Auth {
            username: user.map(str::to_string),
            password: password.map(str::to_string),
        }
    }

    fn node(host: &str, port: u16) -> Node {
        Node {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn a_sentinel_url_names_sentinels_master_db_and_both_credentials() {
        let url = "redis+sentinel://app:p%40ss@s1:26380,s2,[::1]:26381/my-master/2\
                   ?sentinel_username=watch&sentinel_password=s%26cret";
        let Ok(Target::Sentinel(target)) = Target::parse(url) else {
            panic!("not a sentinel target");
        };
        assert_eq!(
            target,
            SentinelTarget {
                sentinels: vec![node("s1", 26380), node("s2", 26379), node("::1", 26381)],
                master: "my-master".into(),
                db: 2,
                node_auth: auth(Some("app"), Some("p@ss")),
                sentinel_auth: auth(Some("watch"), Some("s&cret")),
            }
        );
        assert_eq!(
            Target::parse(url).unwrap().describe(),
            "master \"my-master\" via sentinels s1:26380,s2:26379,[::1]:26381"
        );
    }

    #[test]
    fn a_cluster_url_names_its_seeds_and_credentials() {
        let Ok(Target::Cluster(target)) = Target::parse("redis+cluster://:pw@a:7000,b") else {
            panic!("not a cluster target");
        };
        assert_eq!(
            target,
            ClusterTarget {
                seeds: vec![node("a", 7000), node("b", 6379)],
                auth: auth(None, Some("pw")),
            }
        );
    }

    #[test]
    fn plain_urls_are_single_servers() {
        for url in [
            "redis://127.0.0.1:6379/",
            "redis://u:p@h/3",
            "rediss://u:p@h:6380/1",
            "unix:///tmp/r.sock",
        ] {
            assert!(matches!(Target::parse(url), Ok(Target::Single(_))), "{url}");
        }
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        let cases = [
            ("rediss+sentinel://h/m", "use redis+sentinel://"),
            ("rediss+cluster://h", "use redis+cluster://"),
            ("redis+sentinel://h1,h2", "no master name"),
            ("redis+sentinel://h1:x/m", "invalid port"),
            ("redis+sentinel:///m", "no host"),
            ("redis+sentinel://h/m/x", "invalid database"),
            (
                "redis+sentinel://h/m?password=x",
                "unknown query parameter \"password\"",
            ),
            ("redis+cluster://h1,,h2", "invalid host"),
            ("redis+cluster://h/3", "only database 0"),
            ("redis+cluster://h?x=1", "unknown query parameter"),
            (
                "redis+cluster://u:%zz@h",
                "percent-encoding in the password",
            ),
            ("http://h", "unknown scheme"),
        ];
        for (url, expected) in cases {
            let error = Target::parse(url).err().map(|e| e.to_string());
            assert!(
                error.as_deref().is_some_and(|e| e.contains(expected)),
                "{url}: {error:?}"
            );
        }
    }
}
