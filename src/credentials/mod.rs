//! Credentials and TLS for the connections to the store and the bus.
//!
//! A store or bus proves who corral is with what its URL carries (`redis://user:pass@host`,
//! `nats://token@host`) or with the fields of its config section (`username`, `password`,
//! `token`, `nkey_seed`, `creds_file`, each secret also as `*_file` for a mounted secret), and
//! checks the server with TLS (`rediss://`, `tls://`, or a `tls:` section with a private CA and,
//! for mutual TLS, a client certificate). [`Credentials`] is that section, checked; [`redis`]
//! applies it to a Redis target and [`nats`] to a NATS client's options.
//!
//! Secrets never reach a log line, an error or `corral check`: [`Secret`] prints as `***`, and
//! URLs are shown through [`redact`].

#[cfg(feature = "nats")]
pub mod nats;
mod redact;
#[cfg(feature = "redis")]
pub mod redis;

pub use redact::redact;

use std::fmt;
use std::path::{Path, PathBuf};

/// A password, token or seed: kept apart from what may be printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for the one place that sends it to the server.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// How the server's certificate is checked and, for mutual TLS, which certificate corral shows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tls {
    /// PEM file of the certificate authorities to trust instead of the system's roots (a private
    /// CA); `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM file of corral's own certificate chain, for servers that ask for one (mutual TLS);
    /// always set together with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM file of the private key of `cert_file`.
    pub key_file: Option<PathBuf>,
}

impl Tls {
    /// Whether corral shows a certificate of its own (which proves who it is).
    pub fn has_client_certificate(&self) -> bool {
        self.cert_file.is_some() && self.key_file.is_some()
    }
}

/// A store's or bus's credentials and TLS, beyond what its URL carries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Credentials {
    /// Redis ACL user, or NATS user (with `password`).
    pub username: Option<String>,
    /// Redis password (`requirepass` or the ACL user's), or NATS user's password.
    pub password: Option<Secret>,
    /// NATS token (`authorization { token: ... }`).
    pub token: Option<Secret>,
    /// NATS nkey seed (`SU...`), whose public key the server lists.
    pub nkey_seed: Option<Secret>,
    /// NATS credentials file (user JWT and seed), for servers run in operator mode.
    pub creds_file: Option<PathBuf>,
    /// Redis Sentinel: the sentinels' own user, when they differ from the data nodes.
    pub sentinel_username: Option<String>,
    /// Redis Sentinel: the sentinels' own password (`requirepass` in `sentinel.conf`).
    pub sentinel_password: Option<Secret>,
    /// TLS settings; `None` unless the section has a `tls:` (the URL's scheme may still ask for
    /// TLS: `rediss://`, `tls://`).
    pub tls: Option<Tls>,
}

impl Credentials {
    /// Whether these fields prove who corral is (a password, token, seed, creds file or client
    /// certificate). A CA alone does not: it proves who the server is.
    pub fn authenticate(&self) -> bool {
        self.password.is_some()
            || self.token.is_some()
            || self.nkey_seed.is_some()
            || self.creds_file.is_some()
            || self.tls.as_ref().is_some_and(Tls::has_client_certificate)
    }
}

/// Whether a URL carries a secret in its user part: `user:password@`, `:password@`, or (for
/// NATS) a lone token `token@`. Any of the comma-separated servers counts.
pub fn url_has_secret(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else {
        return false;
    };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    match authority.rsplit_once('@') {
        Some((userinfo, _)) => match userinfo.split_once(':') {
            Some((_, password)) => !password.is_empty(),
            None => !userinfo.is_empty(),
        },
        None => false,
    }
}

/// Reads a secret from a file, as Kubernetes and Docker mount them: the whole file, less one
/// trailing line break (which editors and `echo` add, and no server expects).
pub fn read_secret_file(path: &Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path:?}: {e}"))?;
    let text = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    if text.is_empty() {
        return Err(format!("{path:?} is empty"));
    }
    Ok(Secret::new(text))
}

/// Reads a PEM file whole; it must hold at least one PEM block.
pub fn read_pem(path: &Path) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {path:?}: {e}"))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(format!("{path:?} holds no PEM block (-----BEGIN ...)"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let credentials = Credentials {
            username: Some("app".into()),
            password: Some(Secret::new("hunter2")),
            token: Some(Secret::new("t0ken")),
            nkey_seed: Some(Secret::new("SUACSSL3")),
            sentinel_password: Some(Secret::new("watchword")),
            ..Credentials::default()
        };
        let printed = format!("{credentials:?}");
        for secret in ["hunter2", "t0ken", "SUACSSL3", "watchword"] {
            assert!(!printed.contains(secret), "{printed}");
        }
        assert!(printed.contains("app"), "{printed}");
    }

    #[test]
    fn urls_with_a_secret_are_told_apart() {
        assert!(url_has_secret("redis://:pw@h:6379/0"));
        assert!(url_has_secret("redis://user:pw@h"));
        assert!(url_has_secret("nats://t0ken@h:4222"));
        assert!(url_has_secret("redis+sentinel://:pw@s1,s2/m"));
        assert!(!url_has_secret("redis://h:6379/0"));
        assert!(!url_has_secret("redis://user:@h"));
        assert!(!url_has_secret("nats://h:4222"));
        assert!(!url_has_secret("redis://h/0?x=a@b"));
    }

    #[test]
    fn a_secret_file_loses_one_trailing_line_break() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("password");
        std::fs::write(&path, "s3cret\n").unwrap();
        assert_eq!(read_secret_file(&path).unwrap().expose(), "s3cret");
        std::fs::write(&path, "s3cret \r\n").unwrap();
        assert_eq!(read_secret_file(&path).unwrap().expose(), "s3cret ");
        std::fs::write(&path, "\n").unwrap();
        assert!(read_secret_file(&path).unwrap_err().contains("is empty"));
        let missing = read_secret_file(&dir.path().join("nope")).unwrap_err();
        assert!(missing.contains("cannot read"), "{missing}");
    }
}
