//! The processes of one run, each started on loopback ports of its own and stopped by its own PID
//! (SIGTERM, then SIGKILL after a grace period) when its handle drops.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long any process may take to start listening.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// How long a process may take to stop after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// One running process and the scratch directory it writes to.
pub struct Service {
    pub addr: SocketAddr,
    child: Child,
    /// Config, logs and cache files; removed after the process stops.
    pub dir: tempfile::TempDir,
}

impl Service {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The last lines of the process's log, for an error message.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Service {
    #[allow(unsafe_code)] // test harness: signals and process limits, see SAFETY below
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: a plain signal to the process this handle started and has not yet reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port free at the time of asking.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts `command` (its output into the scratch directory's `log`) and waits until `addr` accepts.
pub fn start(
    name: &str,
    mut command: Command,
    addr: SocketAddr,
    dir: tempfile::TempDir,
) -> anyhow::Result<Service> {
    let log = std::fs::File::create(dir.path().join("log"))?;
    command
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let child = command
        .spawn()
        .with_context(|| format!("cannot start {name} ({command:?})"))?;
    let mut service = Service { addr, child, dir };
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(service);
        }
        if let Ok(Some(status)) = service.child.try_wait() {
            bail!("{name} exited ({status}):\n{}", service.log_tail());
        }
        if Instant::now() > deadline {
            bail!(
                "{name} did not listen on {addr} within {START_DEADLINE:?}:\n{}",
                service.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts this harness binary in one of its server roles; it prints its address on its first line.
pub fn start_self(role: &str) -> anyhow::Result<Service> {
    let exe = std::env::current_exe()?;
    let dir = tempfile::tempdir()?;
    let mut child = Command::new(&exe)
        .args([role, "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("log"))?)
        .spawn()
        .with_context(|| format!("cannot start the {role}"))?;
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut first)
        .with_context(|| format!("the {role} said nothing"))?;
    let addr = first
        .trim()
        .parse()
        .with_context(|| format!("the {role} printed {first:?}, not an address"))?;
    Ok(Service { addr, child, dir })
}

pub fn redis(server: &Path) -> anyhow::Result<Service> {
    let port = free_port()?;
    let dir = tempfile::tempdir()?;
    let mut command = Command::new(server);
    command.args(["--bind", "127.0.0.1", "--port", &port.to_string()]);
    command.args(["--save", "", "--appendonly", "no", "--dir"]);
    command.arg(dir.path());
    start("redis", command, ([127, 0, 0, 1], port).into(), dir)
}

pub fn nats(server: &Path) -> anyhow::Result<Service> {
    let port = free_port()?;
    let dir = tempfile::tempdir()?;
    let mut command = Command::new(server);
    command.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
    start("nats", command, ([127, 0, 0, 1], port).into(), dir)
}

/// How a corral replica keeps its cache.
pub struct CorralSetup<'a> {
    pub name: &'a str,
    pub redis: &'a Service,
    pub nats: &'a Service,
    pub upstream: &'a Service,
    /// 0 turns the L1 off, so every hit is a store read.
    pub l1_bytes: u64,
}

pub fn corral(binary: &Path, setup: &CorralSetup<'_>) -> anyhow::Result<Service> {
    let (port, admin) = (free_port()?, free_port()?);
    let dir = tempfile::tempdir()?;
    let config = format!(
        "listen: 127.0.0.1:{port}
admin:
  listen: 127.0.0.1:{admin}
namespace: load
store:
  kind: redis
  url: redis://{redis}/
bus:
  kind: nats
  url: nats://{nats}
l1:
  max_bytes: {l1}
defaults:
  ttl: 60s
  wait_timeout: 30s
  lease_ttl: 10s
  max_fetch: 30s
  poll_interval: 1s
routes:
  - name: load
    match: {{ path_prefix: / }}
    upstream: {upstream}
",
        redis = setup.redis.addr,
        nats = setup.nats.addr,
        l1 = setup.l1_bytes,
        upstream = setup.upstream.url(),
    );
    let path = dir.path().join("corral.yaml");
    std::fs::write(&path, config)?;
    let mut command = Command::new(binary);
    command.arg("serve").arg("--config").arg(&path);
    // The access log (one line per request) is off, as it is for nginx and Varnish here.
    command.env("RUST_LOG", "corral=warn,corral::access=off");
    start(setup.name, command, ([127, 0, 0, 1], port).into(), dir)
}

pub fn nginx(binary: &Path, name: &str, upstream: &Service) -> anyhow::Result<Service> {
    let port = free_port()?;
    let dir = tempfile::tempdir()?;
    let root = dir.path().display();
    let config = format!(
        "daemon off;
master_process on;
worker_processes auto;
user root;
pid {root}/nginx.pid;
error_log {root}/log warn;
events {{ worker_connections 16384; }}
worker_rlimit_nofile 20000;
http {{
  access_log off;
  client_body_temp_path {root}/body;
  proxy_temp_path {root}/proxy;
  fastcgi_temp_path {root}/fastcgi;
  uwsgi_temp_path {root}/uwsgi;
  scgi_temp_path {root}/scgi;
  proxy_cache_path {root}/cache keys_zone=load:10m max_size=256m inactive=10m;
  upstream origin {{ server {upstream}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_cache load;
      proxy_cache_key $uri;
      proxy_cache_valid 200 60s;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 30s;
      proxy_cache_lock_age 30s;
    }}
  }}
}}
",
        upstream = upstream.addr,
    );
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, config)?;
    let mut command = Command::new(binary);
    command.arg("-p").arg(dir.path()).arg("-c").arg(&path);
    command.arg("-e").arg(dir.path().join("log"));
    start(name, command, ([127, 0, 0, 1], port).into(), dir)
}

pub fn varnish(binary: &Path, name: &str, upstream: &Service) -> anyhow::Result<Service> {
    let port = free_port()?;
    let dir = tempfile::tempdir()?;
    let vcl = format!(
        "vcl 4.1;
backend origin {{ .host = \"{host}\"; .port = \"{upstream_port}\"; }}
sub vcl_backend_response {{ set beresp.ttl = 60s; }}
",
        host = upstream.addr.ip(),
        upstream_port = upstream.addr.port(),
    );
    let path = dir.path().join("load.vcl");
    std::fs::write(&path, vcl)?;
    let mut command = Command::new(binary);
    command.arg("-F").arg("-n").arg(dir.path().join("work"));
    command.args([
        "-a",
        &format!("127.0.0.1:{port}"),
        "-j",
        "none",
        "-s",
        "malloc,256m",
    ]);
    command.arg("-f").arg(&path);
    start(name, command, ([127, 0, 0, 1], port).into(), dir)
}

/// Resident memory of `pid` and all its descendants, in bytes (VmRSS from /proc).
pub fn rss_tree(pid: u32) -> u64 {
    let mut total = 0;
    let mut pending = vec![pid];
    while let Some(pid) = pending.pop() {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        total += status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024;
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
        {
            let Ok(task) = task else { continue };
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            pending.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    total
}

/// A program on the PATH (or the one named by `env`), if there is one.
pub fn program(env: &str, name: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Some(PathBuf::from(path));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
    })
}
