//! Credentials and TLS against real servers that ask for them: Redis with `requirepass`, with an
//! ACL user, over TLS (and mutual TLS); NATS with a token, a user and password, an nkey, and TLS.
//! Each time the proxy works end to end with the right secret (a MISS on one replica, then a HIT
//! from the store on another), and the wrong secret fails at once with a clear reason that never
//! quotes the secret. Then `require_auth` and redaction through the `corral` binary.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use corral::bus::nats::{NatsBus, NatsBusConfig};
use corral::bus::{Bus, Event, EventSink};
use corral::credentials::{Credentials, Secret, Tls};
use corral::store::nats_kv::{NatsKvConfig, NatsKvStore};
use corral::store::redis::{RedisStore, RedisStoreConfig};
use support::patience;
use support::process::corral_bin;
use support::proxy::{ProxyCluster, fill};
use support::secured::{Certs, SecuredServer, nats_conf, redis_plain, redis_tls};
use support::upstream::Upstream;

const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0 }
namespace: secured
{{backing}}
routes:
  - name: reports
    match: { path_prefix: /reports }
    upstream: {{upstream}}
"#;

/// The secret every test server is given; no output may ever contain it.
const SECRET: &str = "s3cret-Pa55";

/// Two replicas on `backing` (the YAML of `store:` and `bus:`): the first request is a MISS,
/// the same request on the other replica is a HIT from the shared store, and the upstream saw one
/// fetch.
async fn miss_then_hit_across_replicas(backing: &str) {
    let upstream = Upstream::start().await;
    let yaml = fill(
        CONFIG,
        &[("backing", backing), ("upstream", &upstream.url())],
    );
    let proxy = ProxyCluster::start(2, &yaml, None).await;
    let first = proxy.get(0, "/reports?day=1").send().await;
    assert_eq!((first.status.as_u16(), first.x_cache()), (200, "MISS"));
    let second = proxy.get(1, "/reports?day=1").send().await;
    assert_eq!((second.status.as_u16(), second.x_cache()), (200, "HIT"));
    assert_eq!(upstream.hits("/reports?day=1"), 1);
    proxy.stop().await;
}

/// A Redis store's connect with these credentials: its error, within the test's patience.
async fn redis_store_error(url: &str, credentials: Credentials) -> String {
    let mut config = RedisStoreConfig::new(url, "secured");
    config.credentials = credentials;
    match tokio::time::timeout(patience(), RedisStore::connect(config)).await {
        Ok(Ok(_)) => panic!("connected to {url} with the wrong credentials"),
        Ok(Err(error)) => error.to_string(),
        Err(_) => panic!("connecting to {url} did not end within {:?}", patience()),
    }
}

/// Whether a message gives the server's reason for refusing a client's credentials.
fn refused_for_its_credentials(message: &str) -> bool {
    let message = message.to_lowercase();
    message.contains("wrongpass") || message.contains("authentication failed")
}

/// The error of a connect that had to fail.
fn refused<T, E: std::fmt::Display>(result: Result<T, E>) -> String {
    match result {
        Ok(_) => panic!("connected, but should have been refused"),
        Err(error) => error.to_string(),
    }
}

fn password(secret: &str) -> Credentials {
    Credentials {
        password: Some(Secret::new(secret)),
        ..Credentials::default()
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a test file");
    path
}

// ------------------------------------------------------------------ redis ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_with_requirepass_takes_the_password_from_a_file_and_refuses_a_wrong_one() {
    let redis = SecuredServer::redis(|port| redis_plain(port, &["--requirepass", SECRET])).await;
    let dir = tempfile::tempdir().unwrap();
    // As Kubernetes mounts a secret: the value and a trailing line break.
    let secret_file = write(dir.path(), "redis-password", &format!("{SECRET}\n"));
    let backing = format!(
        "store:\n  kind: redis\n  url: redis://127.0.0.1:{}/\n  password_file: {}\n",
        redis.port(),
        secret_file.display()
    );
    miss_then_hit_across_replicas(&backing).await;

    let url = format!("redis://127.0.0.1:{}/", redis.port());
    let wrong = redis_store_error(&url, password("not-the-password")).await;
    assert!(refused_for_its_credentials(&wrong), "{wrong}");
    assert!(!wrong.contains("not-the-password"), "{wrong}");
    let none = redis_store_error(&url, Credentials::default()).await;
    assert!(none.contains("NOAUTH"), "{none}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_with_an_acl_user_lets_only_that_user_in() {
    // The default user is off: only `corral` gets in.
    let password = format!(">{SECRET}");
    let redis = SecuredServer::redis(|port| {
        let acl = [
            "--user", "default", "off", "--user", "corral", "on", &password,
        ];
        redis_plain(port, &[&acl[..], &["~*", "&*", "+@all"]].concat())
    })
    .await;
    let backing = format!(
        "store: {{ kind: redis, url: 'redis://corral:{SECRET}@127.0.0.1:{}/' }}\n",
        redis.port()
    );
    miss_then_hit_across_replicas(&backing).await;

    let url = format!("redis://127.0.0.1:{}/", redis.port());
    let other_user = Credentials {
        username: Some("intruder".into()),
        password: Some(Secret::new(SECRET)),
        ..Credentials::default()
    };
    let wrong = redis_store_error(&url, other_user).await;
    assert!(refused_for_its_credentials(&wrong), "{wrong}");
    assert!(!wrong.contains(SECRET), "{wrong}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_carries_store_and_bus_and_refuses_an_unknown_ca() {
    let certs = Certs::generate();
    let redis = SecuredServer::redis(|port| redis_tls(port, &certs, false)).await;
    let backing = format!(
        "store:\n  kind: redis\n  url: rediss://127.0.0.1:{}/\n  tls: {{ ca_file: {} }}\n",
        redis.port(),
        certs.ca.display()
    );
    // Both replicas' buses subscribe over TLS before they answer /readyz.
    miss_then_hit_across_replicas(&backing).await;

    // Without the CA, the system's roots do not know the server's issuer.
    let url = format!("rediss://127.0.0.1:{}/", redis.port());
    let untrusted = redis_store_error(&url, Credentials::default()).await;
    assert!(
        untrusted.contains("invalid peer certificate: UnknownIssuer"),
        "{untrusted}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_with_mutual_tls_wants_the_client_certificate() {
    let certs = Certs::generate();
    let redis = SecuredServer::redis(|port| redis_tls(port, &certs, true)).await;
    let backing = format!(
        "store:\n  kind: redis\n  url: rediss://127.0.0.1:{}/\n  require_auth: true\n  \
         tls: {{ ca_file: {}, cert_file: {}, key_file: {} }}\n",
        redis.port(),
        certs.ca.display(),
        certs.client_cert.display(),
        certs.client_key.display()
    );
    miss_then_hit_across_replicas(&backing).await;

    let url = format!("rediss://127.0.0.1:{}/", redis.port());
    let ca_only = Credentials {
        tls: Some(Tls {
            ca_file: Some(certs.ca.clone()),
            ..Tls::default()
        }),
        ..Credentials::default()
    };
    let refused = redis_store_error(&url, ca_only).await;
    assert!(refused.contains("CertificateRequired"), "{refused}");
}

// ------------------------------------------------------------------- nats ----

/// A bus's sink for tests that only ask whether it connects.
struct Ignore;

impl EventSink for Ignore {
    fn deliver(&self, _: Event) {}
    fn resync(&self) {}
    fn undecodable(&self) {}
}

/// NATS KV store and core NATS bus with `right`, then both refused with `wrong`.
async fn nats_accepts_only(
    nats: &SecuredServer,
    url: &str,
    fields: &str,
    right: Credentials,
    wrong: Credentials,
) {
    miss_then_hit_across_replicas(&format!("store:\n  kind: nats\n  url: {url}\n{fields}")).await;

    let bus = |credentials: Credentials| {
        let mut config = NatsBusConfig::new(url, "secured");
        config.credentials = credentials;
        async move {
            let sink: Arc<dyn EventSink> = Arc::new(Ignore);
            tokio::time::timeout(patience(), NatsBus::connect(config, sink))
                .await
                .expect("the bus's connect ended")
        }
    };
    let connected = bus(right)
        .await
        .expect("the bus connects with the right credentials");
    connected.close().await;
    let error = refused(bus(wrong.clone()).await);
    assert!(error.contains("authorization violation"), "{error}");
    assert!(!error.contains(SECRET), "{error}");

    let mut config = NatsKvConfig::new(url, "secured");
    config.credentials = wrong;
    let error = refused(
        tokio::time::timeout(patience(), NatsKvStore::connect(config))
            .await
            .expect("the store's connect ended"),
    );
    assert!(error.contains("authorization violation"), "{error}");
    assert!(!error.contains(SECRET), "{error}");
    let _ = nats.port();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_with_a_token() {
    let nats = SecuredServer::nats(|port, dir| {
        nats_conf(
            port,
            dir,
            &format!("authorization {{ token: \"{SECRET}\" }}"),
        )
    })
    .await;
    let url = format!("nats://127.0.0.1:{}", nats.port());
    let token = |t: &str| Credentials {
        token: Some(Secret::new(t)),
        ..Credentials::default()
    };
    nats_accepts_only(
        &nats,
        &url,
        &format!("  token: {SECRET}\n"),
        token(SECRET),
        token("wrong-token"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_with_a_user_and_password() {
    let nats = SecuredServer::nats(|port, dir| {
        let users =
            format!("authorization {{ users: [{{ user: corral, password: \"{SECRET}\" }}] }}");
        nats_conf(port, dir, &users)
    })
    .await;
    let url = format!("nats://127.0.0.1:{}", nats.port());
    let user = |p: &str| Credentials {
        username: Some("corral".into()),
        password: Some(Secret::new(p)),
        ..Credentials::default()
    };
    nats_accepts_only(
        &nats,
        &url,
        &format!("  username: corral\n  password: {SECRET}\n"),
        user(SECRET),
        user("wrong-password"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_with_an_nkey() {
    let key = nkeys::KeyPair::new_user();
    let other = nkeys::KeyPair::new_user();
    let public = key.public_key();
    let nats = SecuredServer::nats(|port, dir| {
        nats_conf(
            port,
            dir,
            &format!("authorization {{ users: [{{ nkey: {public} }}] }}"),
        )
    })
    .await;
    let url = format!("nats://127.0.0.1:{}", nats.port());
    let seed = |pair: &nkeys::KeyPair| Credentials {
        nkey_seed: Some(Secret::new(pair.seed().unwrap())),
        ..Credentials::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let seed_file = write(dir.path(), "seed", &key.seed().unwrap());
    nats_accepts_only(
        &nats,
        &url,
        &format!("  nkey_seed_file: {}\n", seed_file.display()),
        seed(&key),
        seed(&other),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_over_tls_with_a_private_ca() {
    let certs = Certs::generate();
    let tls = format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\" }}",
        certs.server_cert.display(),
        certs.server_key.display()
    );
    let nats = SecuredServer::nats(|port, dir| nats_conf(port, dir, &tls)).await;
    let url = format!("tls://127.0.0.1:{}", nats.port());
    miss_then_hit_across_replicas(&format!(
        "store:\n  kind: nats\n  url: {url}\n  tls: {{ ca_file: {} }}\n",
        certs.ca.display()
    ))
    .await;

    // The system's roots do not know the private CA.
    let config = NatsKvConfig::new(&url, "secured");
    let error = refused(
        tokio::time::timeout(patience(), NatsKvStore::connect(config))
            .await
            .expect("the store's connect ended"),
    );
    assert!(error.contains("UnknownIssuer"), "{error}");
}

// -------------------------------------------------- the binary: check, serve ----

/// Runs `corral args...` to its end within the test's patience.
async fn corral(args: &[&str]) -> (Option<i32>, String) {
    let output = tokio::time::timeout(
        patience(),
        tokio::process::Command::new(corral_bin())
            .args(args)
            .env_remove("CORRAL_CONFIG")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("corral {args:?} did not end within {:?}", patience()))
    .expect("run corral");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), text)
}

const CHECKED: &str = "listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0 }
require_auth: true
store:
  kind: redis
  url: {{url}}
routes:
  - name: a
    match: { path_prefix: / }
    upstream: http://127.0.0.1:1
";

#[tokio::test]
async fn check_refuses_a_store_without_credentials_when_required_and_never_prints_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let bare = write(
        dir.path(),
        "bare.yaml",
        &fill(CHECKED, &[("url", "redis://127.0.0.1:6390/")]),
    );
    let bare = bare.to_str().unwrap();
    let (code, output) = corral(&["check", "--config", bare]).await;
    // 2: the exit code of a config error.
    assert_eq!(code, Some(2), "{output}");
    assert!(
        output.contains(&format!("{bare}:6:8: store: require_auth is set")),
        "{output}"
    );

    let secured = write(
        dir.path(),
        "secured.yaml",
        &fill(
            CHECKED,
            &[("url", &format!("redis://app:{SECRET}@127.0.0.1:6390/"))],
        ),
    );
    let (code, output) = corral(&["check", "--config", secured.to_str().unwrap()]).await;
    assert_eq!(code, Some(0), "{output}");
    assert!(
        output.contains("redis://app:***@127.0.0.1:6390/"),
        "{output}"
    );
    assert!(output.contains("require_auth"), "{output}");
    assert!(!output.contains(SECRET), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_a_wrong_password_exits_saying_why_without_the_password() {
    let redis =
        SecuredServer::redis(|port| redis_plain(port, &["--requirepass", "the-right-one"])).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "serve.yaml",
        &fill(
            CHECKED,
            &[(
                "url",
                &format!("redis://app:{SECRET}@127.0.0.1:{}/", redis.port()),
            )],
        ),
    );
    let (code, output) = corral(&["serve", "--config", config.to_str().unwrap()]).await;
    assert_ne!(code, Some(0), "{output}");
    assert_ne!(code, Some(101), "{output}");
    assert!(refused_for_its_credentials(&output), "{output}");
    assert!(!output.contains(SECRET), "{output}");
}

// ------------------------------------------------------- nats: creds file ----

/// base64url without padding, as JWTs are written.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// A NATS JWT for `subject`, signed by `issuer`, with these `nats` claims.
fn nats_jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let header = serde_json::json!({"typ": "JWT", "alg": "ed25519-nkey"});
    let issued = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "jti": format!("{subject}{issued}"),
        "iat": issued,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let signed = format!(
        "{}.{}",
        base64url(header.to_string().as_bytes()),
        base64url(claims.to_string().as_bytes())
    );
    let signature = issuer.sign(signed.as_bytes()).expect("sign the JWT");
    format!("{signed}.{}", base64url(&signature))
}

/// A user of `account` (JWT and seed), as `nsc` writes a creds file.
fn creds(account: &nkeys::KeyPair) -> String {
    let user = nkeys::KeyPair::new_user();
    let limits = serde_json::json!({
        "type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1
    });
    let jwt = nats_jwt(account, &user.public_key(), "corral", limits);
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
        user.seed().unwrap()
    )
}

/// A server in operator mode (decentralised JWT auth) trusts users signed by an account its
/// operator signed; only core NATS is tested here, as JetStream in operator mode needs a system
/// account and per-account JetStream limits, which the creds path does not change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_bus_with_a_creds_file_in_operator_mode() {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let stranger = nkeys::KeyPair::new_account();
    let operator_jwt = nats_jwt(
        &operator,
        &operator.public_key(),
        "corral-test",
        serde_json::json!({"type": "operator", "version": 2}),
    );
    let unlimited = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1
    });
    let account_jwt = nats_jwt(
        &operator,
        &account.public_key(),
        "app",
        serde_json::json!({"type": "account", "version": 2, "limits": unlimited}),
    );
    let account_public = account.public_key();
    let nats = SecuredServer::nats(|port, _| {
        format!(
            "listen: \"127.0.0.1:{port}\"\noperator: {operator_jwt}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {account_public}: {account_jwt}\n}}\n"
        )
    })
    .await;
    let url = format!("nats://127.0.0.1:{}", nats.port());
    let dir = tempfile::tempdir().unwrap();
    let with_file = |name: &str, text: String| Credentials {
        creds_file: Some(write(dir.path(), name, &text)),
        ..Credentials::default()
    };
    let connect = |credentials: Credentials| {
        let mut config = NatsBusConfig::new(&url, "secured");
        config.credentials = credentials;
        async move {
            let sink: Arc<dyn EventSink> = Arc::new(Ignore);
            tokio::time::timeout(patience(), NatsBus::connect(config, sink))
                .await
                .expect("the bus's connect ended")
        }
    };
    let bus = connect(with_file("corral.creds", creds(&account)))
        .await
        .expect("the bus connects with the account's user");
    assert!(bus.connected());
    bus.close().await;
    // A user signed by an account the operator never signed is refused.
    let error = refused(connect(with_file("stranger.creds", creds(&stranger))).await);
    assert!(error.contains("authorization violation"), "{error}");
}

// ------------------------------------------------ redis sentinel and cluster ----

/// The same URL without its user part and query: the hosts and path only.
fn without_credentials(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a url");
    let rest = rest.rsplit_once('@').map_or(rest, |(_, hosts)| hosts);
    let rest = rest.split_once('?').map_or(rest, |(path, _)| path);
    format!("{scheme}://{rest}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sentinel_and_cluster_take_their_passwords_from_fields_and_files() {
    let (sentinels, cluster) = tokio::join!(
        support::topology::TestSentinels::with_passwords("data-secret", "watch-secret"),
        support::topology::TestRedisCluster::with_acl_user("corral", "acl-secret"),
    );
    let dir = tempfile::tempdir().unwrap();
    let watch = write(dir.path(), "sentinel-password", "watch-secret\n");
    miss_then_hit_across_replicas(&format!(
        "store:\n  kind: redis\n  url: {}\n  password: data-secret\n  \
         sentinel_password_file: {}\n",
        without_credentials(&sentinels.url()),
        watch.display()
    ))
    .await;
    miss_then_hit_across_replicas(&format!(
        "store:\n  kind: redis\n  url: {}\n  username: corral\n  password: acl-secret\n",
        without_credentials(&cluster.url())
    ))
    .await;
}
