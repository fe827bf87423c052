//! Credentials and TLS applied to a Redis target (one server, Sentinel or Cluster).
//!
//! The config's fields and the URL's user part are the same credentials written two ways; the
//! config refuses a file that writes both, so here the fields simply take their place. TLS is
//! built for one server (`rediss://`): the redis crate's Sentinel client reaches the sentinels
//! and the data nodes with separate TLS settings and its cluster client needs every node's
//! certificate to name the address the cluster announces, and neither is tested here, so
//! `rediss+sentinel://` and `rediss+cluster://` are refused when the URL is parsed.

use redis::{Client, ClientTlsConfig, ConnectionAddr, TlsCertificates};

use super::{Credentials, Tls, read_pem};
use crate::redis_conn::{Auth, Target};

/// Why a Redis target cannot be made from a URL and credentials; never carries a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedisAccessError {
    #[error("invalid redis url: {0}")]
    Url(#[from] crate::redis_conn::TargetError),
    #[error("tls is set but the url is not rediss:// (redis:// would send everything in clear)")]
    TlsWithoutRediss,
    #[error("tls: {0}")]
    Tls(String),
}

/// The target `url` names, with `credentials` applied.
pub fn target(url: &str, credentials: &Credentials) -> Result<Target, RedisAccessError> {
    let target = Target::parse(url)?;
    apply(target, credentials)
}

fn apply(target: Target, credentials: &Credentials) -> Result<Target, RedisAccessError> {
    let merge = |auth: &Auth, username: &Option<String>, password: &Option<super::Secret>| Auth {
        username: username.clone().or_else(|| auth.username.clone()),
        password: (password.as_ref())
            .map(|p| p.expose().to_string())
            .or_else(|| auth.password.clone()),
    };
    match target {
        Target::Single(info) => {
            let mut settings = info.redis_settings().clone();
            if let Some(username) = &credentials.username {
                settings = settings.set_username(username);
            }
            if let Some(password) = &credentials.password {
                settings = settings.set_password(password.expose());
            }
            let info = info.clone().set_redis_settings(settings);
            let is_tls = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
            match &credentials.tls {
                None => Ok(Target::Single(info)),
                Some(_) if !is_tls => Err(RedisAccessError::TlsWithoutRediss),
                Some(tls) => {
                    let certificates = certificates(tls).map_err(RedisAccessError::Tls)?;
                    let client = Client::build_with_tls(info, certificates)
                        .map_err(|e| RedisAccessError::Tls(e.to_string()))?;
                    Ok(Target::Single(client.get_connection_info().clone()))
                }
            }
        }
        Target::Sentinel(mut sentinel) => {
            if credentials.tls.is_some() {
                return Err(RedisAccessError::TlsWithoutRediss);
            }
            sentinel.node_auth = merge(
                &sentinel.node_auth,
                &credentials.username,
                &credentials.password,
            );
            sentinel.sentinel_auth = merge(
                &sentinel.sentinel_auth,
                &credentials.sentinel_username,
                &credentials.sentinel_password,
            );
            Ok(Target::Sentinel(sentinel))
        }
        Target::Cluster(mut cluster) => {
            if credentials.tls.is_some() {
                return Err(RedisAccessError::TlsWithoutRediss);
            }
            cluster.auth = merge(&cluster.auth, &credentials.username, &credentials.password);
            Ok(Target::Cluster(cluster))
        }
    }
}

/// The CA and client certificate files, read.
fn certificates(tls: &Tls) -> Result<TlsCertificates, String> {
    let root_cert = tls.ca_file.as_deref().map(read_pem).transpose()?;
    let client_tls = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => Some(ClientTlsConfig {
            client_cert: read_pem(cert)?,
            client_key: read_pem(key)?,
        }),
        _ => None,
    };
    Ok(TlsCertificates {
        client_tls,
        root_cert,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::Secret;

    #[test]
    fn fields_fill_the_credentials_of_every_form() {
        let credentials = Credentials {
            username: Some("app".into()),
            password: Some(Secret::new("pw")),
            sentinel_password: Some(Secret::new("watch")),
            ..Credentials::default()
        };
        let Target::Single(info) = target("redis://h:1/2", &credentials).unwrap() else {
            panic!("not single");
        };
        assert_eq!(info.redis_settings().username(), Some("app"));
        assert_eq!(info.redis_settings().password(), Some("pw"));
        assert_eq!(info.redis_settings().db(), 2);
        let Target::Sentinel(sentinel) = target("redis+sentinel://s/m", &credentials).unwrap()
        else {
            panic!("not sentinel");
        };
        assert_eq!(sentinel.node_auth.password.as_deref(), Some("pw"));
        assert_eq!(sentinel.sentinel_auth.password.as_deref(), Some("watch"));
        let Target::Cluster(cluster) = target("redis+cluster://a,b", &credentials).unwrap() else {
            panic!("not cluster");
        };
        assert_eq!(cluster.auth.username.as_deref(), Some("app"));
    }

    #[test]
    fn tls_settings_need_a_tls_url() {
        let credentials = Credentials {
            tls: Some(Tls::default()),
            ..Credentials::default()
        };
        assert_eq!(
            target("redis://h:1", &credentials).err(),
            Some(RedisAccessError::TlsWithoutRediss)
        );
        assert!(target("rediss://h:1", &credentials).is_ok());
    }
}
