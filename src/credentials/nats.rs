//! Credentials and TLS applied to a NATS client's options.
//!
//! The server takes one way of proving who the client is: a token, a user and password, an
//! nkey, or a user JWT from a creds file; the config refuses a section that names two. A
//! `tls:` section (or a `tls://` URL, which the client reads itself) makes the client refuse a
//! server that does not speak TLS, checking it against `ca_file` when set.

use async_nats::ConnectOptions;

use super::Credentials;

/// `options` with `credentials` applied. Reads the creds file, so it fails (naming the file, never
/// its content) when that cannot be read or parsed.
pub async fn apply(
    mut options: ConnectOptions,
    credentials: &Credentials,
) -> Result<ConnectOptions, String> {
    if let Some(token) = &credentials.token {
        options = options.token(token.expose().to_string());
    }
    if let (Some(user), Some(password)) = (&credentials.username, &credentials.password) {
        options = options.user_and_password(user.clone(), password.expose().to_string());
    }
    if let Some(seed) = &credentials.nkey_seed {
        options = options.nkey(seed.expose().to_string());
    }
    if let Some(path) = &credentials.creds_file {
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| format!("creds_file {path:?}: {e}"))?;
    }
    if let Some(tls) = &credentials.tls {
        options = options.require_tls(true);
        if let Some(ca) = &tls.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
    }
    Ok(options)
}
