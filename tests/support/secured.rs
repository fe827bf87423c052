//! Redis and NATS servers that ask for credentials or speak TLS, and the certificates they use.
//!
//! ```ignore
//! let certs = Certs::generate();
//! let redis = SecuredServer::redis(|port| RedisArgs::tls(port, &certs, false)).await;
//! let nats = SecuredServer::nats(|port| nats_conf(port, "authorization { token: t0ken }")).await;
//! ```
//!
//! Each server is a child of this process on an ephemeral loopback port, stopped by its own
//! handle on drop (its log is printed when the test panicked). Readiness is the server's own
//! "ready" line in its log, as a TLS or password-protected server cannot be probed anonymously.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::servers::{free_port, nats_bin, spawn_child};
use super::{Deadline, patience};

/// Tries to start a server on a free port before giving up (another process may take the port
/// between choosing and binding it).
const START_ATTEMPTS: usize = 5;
/// Pause between two reads of a starting server's log.
const LOG_POLL: Duration = Duration::from_millis(20);

// ------------------------------------------------------------ certificates ----

/// A private CA, a server certificate for 127.0.0.1 signed by it, and a client certificate
/// signed by it (for mutual TLS); EC P-256 keys, made by the `openssl` CLI in well under a
/// second.
pub struct Certs {
    _dir: TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run openssl {args:?}: {e} (install openssl)"));
    assert!(
        output.status.success(),
        "openssl {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Certs {
    pub fn generate() -> Certs {
        let dir = tempfile::Builder::new()
            .prefix("corral-certs-")
            .tempdir()
            .expect("a temporary directory for certificates");
        let d = dir.path();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        let mut ca = vec!["req", "-x509", "-nodes", "-days", "2"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=corral test CA",
        ]);
        ca.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
        ca.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
        openssl(d, &ca);
        for (name, usage, san) in [
            (
                "server",
                "serverAuth",
                "subjectAltName=IP:127.0.0.1,DNS:localhost",
            ),
            ("client", "clientAuth", "subjectAltName=DNS:corral"),
        ] {
            let (key, csr, pem, ext) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
                format!("{name}.ext"),
            );
            let mut req = vec!["req", "-nodes"];
            req.extend(ec);
            let subject = format!("/CN={name}");
            req.extend(["-keyout", &key, "-out", &csr, "-subj", &subject]);
            openssl(d, &req);
            std::fs::write(
                d.join(&ext),
                format!(
                    "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n\
                     extendedKeyUsage={usage}\n{san}\n"
                ),
            )
            .expect("write the extensions file");
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-out",
                    &pem,
                    "-extfile",
                    &ext,
                ],
            );
        }
        Certs {
            ca: d.join("ca.pem"),
            server_cert: d.join("server.pem"),
            server_key: d.join("server.key"),
            client_cert: d.join("client.pem"),
            client_key: d.join("client.key"),
            _dir: dir,
        }
    }
}

// ------------------------------------------------------------------ servers ----

/// Which server, for its binary, its config and its "ready" line.
#[derive(Clone, Copy)]
enum Flavour {
    Redis,
    Nats,
}

/// A `redis-server` or `nats-server` started with the given arguments.
pub struct SecuredServer {
    flavour: Flavour,
    port: u16,
    child: Child,
    dir: TempDir,
}

impl SecuredServer {
    /// A `redis-server` on a free port; `args(port)` gives its arguments beyond the usual ones
    /// (`--port`, or `--port 0 --tls-port`, are the caller's: see [`redis_plain`] and
    /// [`redis_tls`]).
    pub async fn redis(args: impl Fn(u16) -> Vec<String>) -> SecuredServer {
        Self::start(Flavour::Redis, |port, dir| {
            let mut all: Vec<String> = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
                .map(String::from)
                .to_vec();
            all.extend(["--dir".into(), dir.display().to_string()]);
            all.extend([
                "--logfile".into(),
                dir.join("server.log").display().to_string(),
            ]);
            all.extend(args(port));
            all
        })
        .await
    }

    /// A `nats-server` with JetStream on a free port, run with the config `conf(port, dir)`
    /// (see [`nats_conf`]).
    pub async fn nats(conf: impl Fn(u16, &Path) -> String) -> SecuredServer {
        Self::start(Flavour::Nats, |port, dir| {
            let path = dir.join("nats.conf");
            std::fs::write(&path, conf(port, dir)).expect("write nats.conf");
            vec![
                "-c".into(),
                path.display().to_string(),
                "-l".into(),
                dir.join("server.log").display().to_string(),
            ]
        })
        .await
    }

    async fn start(flavour: Flavour, args: impl Fn(u16, &Path) -> Vec<String>) -> SecuredServer {
        let bin = match flavour {
            Flavour::Redis => std::env::var_os("CORRAL_REDIS_SERVER")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("redis-server")),
            Flavour::Nats => nats_bin(),
        };
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("corral-secured-")
                .tempdir()
                .expect("a temporary directory for the server");
            let port = free_port();
            let stdio = std::fs::File::create(dir.path().join("server.stdio")).expect("stdio");
            let mut cmd = Command::new(&bin);
            cmd.args(args(port, dir.path()))
                .stdin(Stdio::null())
                .stdout(stdio.try_clone().expect("clone stdio"))
                .stderr(stdio);
            let child =
                spawn_child(cmd).unwrap_or_else(|e| panic!("could not run {}: {e}", bin.display()));
            let mut server = SecuredServer {
                flavour,
                port,
                child,
                dir,
            };
            match server.wait_ready().await {
                Ok(()) => return server,
                Err(reason) => failures.push(format!("port {port}: {reason}\n{}", server.log())),
            }
        }
        panic!(
            "{} did not start in {START_ATTEMPTS} attempts:\n{}",
            bin.display(),
            failures.join("\n")
        );
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let ready = match self.flavour {
            Flavour::Redis => "Ready to accept connections",
            Flavour::Nats => "Server is ready",
        };
        let deadline = Deadline::after(patience());
        let max_polls = patience().as_millis() / LOG_POLL.as_millis() + 1;
        for _ in 0..max_polls {
            if self.log().contains(ready) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited with {status}"));
            }
            if deadline.expired() {
                break;
            }
            tokio::time::sleep(LOG_POLL).await;
        }
        Err(format!("no {ready:?} in its log within {:?}", patience()))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's own directory (config, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log and its standard output and error.
    pub fn log(&self) -> String {
        let read =
            |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!("{}{}", read("server.log"), read("server.stdio"))
    }
}

impl Drop for SecuredServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- log of the server on port {} ----\n{}",
                self.port,
                self.log()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Redis arguments for a plain TCP port.
pub fn redis_plain(port: u16, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["--port".to_string(), port.to_string()];
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// Redis arguments for TLS only (`--port 0`), with client certificates required or not.
pub fn redis_tls(port: u16, certs: &Certs, client_certificates: bool) -> Vec<String> {
    let path = |p: &Path| p.display().to_string();
    let auth_clients = if client_certificates { "yes" } else { "no" };
    vec![
        "--port".into(),
        "0".into(),
        "--tls-port".into(),
        port.to_string(),
        "--tls-cert-file".into(),
        path(&certs.server_cert),
        "--tls-key-file".into(),
        path(&certs.server_key),
        "--tls-ca-cert-file".into(),
        path(&certs.ca),
        "--tls-auth-clients".into(),
        auth_clients.into(),
    ]
}

/// A nats-server config on `port` with JetStream in `dir`, plus `extra` blocks (`authorization
/// {...}`, `tls {...}`).
pub fn nats_conf(port: u16, dir: &Path, extra: &str) -> String {
    format!(
        "listen: \"127.0.0.1:{port}\"\nserver_name: \"secured-{port}\"\n\
         jetstream {{ store_dir: \"{}\" }}\n{extra}\n",
        dir.join("js").display()
    )
}
