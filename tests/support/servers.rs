//! Real server processes for integration tests.
//!
//! Each [`TestRedis`] / [`TestNats`] owns one child process listening on
//! 127.0.0.1 at an ephemeral port, with its own temporary directory for logs,
//! pid file and (for NATS) JetStream storage. Nothing here touches the
//! machine's standard ports (6379, 4222) or any process other than the
//! child it spawned itself.
//!
//! Binaries: `CORRAL_REDIS_SERVER` (default `redis-server` on `PATH`) and
//! `CORRAL_NATS_SERVER` (default: the `.tools/nats` install made by
//! `scripts/test` if present, else `nats-server` on `PATH`).

use std::fs::{File, OpenOptions};
use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{OnceLock, mpsc};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use tempfile::TempDir;

use super::Deadline;
use tokio::io::{AsyncBufReadExt, BufReader};

/// How many times a fresh start is attempted (a new port each time).
const START_ATTEMPTS: usize = 5;
/// Poll interval while waiting for a server to become ready.
const READY_POLL: Duration = Duration::from_millis(10);
/// Lines of a server's log printed when a test panics.
const LOG_TAIL_LINES: usize = 50;
/// Minimum nats-server version the tests need.
const MIN_NATS: (u64, u64) = (2, 11);

/// Deadline for one server start: 5 s, or more when the machine is slow and
/// `CORRAL_TEST_PATIENCE_SECS` says so.
fn ready_deadline() -> Duration {
    Duration::from_secs(5).max(super::patience() / 2)
}

/// A port that was free a moment ago on 127.0.0.1. Another process may take it
/// before the server binds it; callers retry with a new port on failure.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
    listener
        .local_addr()
        .expect("local_addr of probe listener")
        .port()
}

/// A name unique within this machine (process id + counter), used to make sure
/// a ready check talks to our own server and not to another one that won a
/// port race.
fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The tail of a server's captured stdout/stderr followed by the tail of its
/// log file, skipping whichever is empty.
fn output_tail(stdio: &Path, log: &Path, n: usize) -> String {
    [read_lossy(stdio), read_lossy(log)]
        .iter()
        .filter(|t| !t.trim().is_empty())
        .map(|t| last_lines(t, n))
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

pub fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Spawning
// ---------------------------------------------------------------------------

type SpawnJob = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` from one long-lived helper thread.
///
/// On Linux the child gets `PR_SET_PDEATHSIG = SIGKILL`, so a test process that
/// dies without running destructors (killed by a timeout, `abort`) does not
/// leave servers behind. The death signal fires when the *thread* that forked
/// the child exits, which is why all children are forked from a thread that
/// lives as long as the process.
#[allow(unsafe_code)] // test harness: signals and process limits, see SAFETY below
pub fn spawn_child(mut cmd: Command) -> io::Result<Child> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: getpid is async-signal-safe; the closure below calls only
        // async-signal-safe functions (prctl, getppid, _exit) between fork
        // and exec, and allocates nothing.
        let parent = unsafe { libc::getpid() };
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent died between fork and prctl: do not outlive it.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }

    static SPAWNER: OnceLock<mpsc::Sender<SpawnJob>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("test-server-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("start the test server spawner thread");
        tx
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("test server spawner thread is gone"))?;
    reply_rx
        .recv_timeout(Duration::from_secs(30))
        .map_err(|_| io::Error::other("test server spawner thread did not answer"))?
}

/// Opens `<dir>/<name>` for appending, for the child's stdout and stderr
/// (messages printed before a server opens its own log file end up there).
fn stdio_file(dir: &Path, name: &str) -> anyhow::Result<(File, File)> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))
        .with_context(|| format!("open {}", dir.join(name).display()))?;
    let g = f.try_clone()?;
    Ok((f, g))
}

/// Sends `sig` to the child if it has not been reaped yet. A child that has
/// exited but was not reaped is a zombie whose pid cannot be reused, so this
/// never signals an unrelated process.
#[allow(unsafe_code)] // test harness: signals and process limits, see SAFETY below
fn signal_child(child: &mut Child, sig: libc::c_int) -> bool {
    match child.try_wait() {
        Ok(None) => {
            let pid = child.id() as libc::pid_t;
            // SAFETY: plain kill(2) on our own unreaped child.
            unsafe { libc::kill(pid, sig) == 0 }
        }
        _ => false,
    }
}

/// Whether the (unreaped) child is currently in a group stop. Uses
/// `WNOWAIT`, so the state change is only looked at, not consumed, and the
/// child is never reaped behind `std::process::Child`'s back.
#[allow(unsafe_code)] // test harness: signals and process limits, see SAFETY below
fn child_is_stopped(pid: u32) -> bool {
    // SAFETY: waitid on our own child with WNOHANG|WNOWAIT only reads state
    // into a zeroed siginfo_t.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let rc = libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WSTOPPED | libc::WNOHANG | libc::WNOWAIT,
        );
        rc == 0 && info.si_pid() == pid as libc::pid_t
    }
}

/// SIGSTOPs the child and waits (5 s deadline) until every one of its threads
/// has stopped: kill(2) returns before a multi-threaded process (nats-server)
/// is fully stopped, and a thread still running could answer a client.
pub fn stop_child(child: &mut Child, what: &str) {
    assert!(
        signal_child(child, libc::SIGSTOP),
        "pause: SIGSTOP to {what} failed (is it still running?)"
    );
    let deadline = Deadline::after(Duration::from_secs(5));
    while !child_is_stopped(child.id()) {
        assert!(
            !deadline.expired(),
            "pause: {what} (pid {}) did not stop within 5 s",
            child.id()
        );
        // The stop completes within microseconds; yield rather than sleep
        // so as not to park a runtime thread.
        std::thread::yield_now();
    }
}

/// SIGCONTs the child. The kernel clears the stopped state while delivering
/// SIGCONT, so there is nothing to wait for.
pub fn continue_child(child: &mut Child, what: &str) {
    assert!(
        signal_child(child, libc::SIGCONT),
        "resume: SIGCONT to {what} failed (is it still running?)"
    );
}

/// SIGKILLs the child (if still running) and reaps it.
fn kill_and_reap(child: &mut Child) -> Option<ExitStatus> {
    let _ = child.kill(); // SIGKILL; a no-op if it was already reaped
    child.wait().ok()
}

/// Runs `attempt` up to `tries` times; each failed attempt's error is kept for
/// the panic message.
async fn with_retries<T, F, Fut>(what: &str, tries: usize, mut attempt: F) -> T
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut errors = Vec::new();
    for i in 0..tries {
        match attempt(i).await {
            Ok(v) => return v,
            Err(e) => {
                errors.push(format!("attempt {}: {e:#}", i + 1));
                if i + 1 < tries {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    panic!("{what} failed {tries} times:\n{}", errors.join("\n"));
}

// ---------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------

/// A real `redis-server` child on 127.0.0.1 at an ephemeral port.
pub struct TestRedis {
    bin: PathBuf,
    port: u16,
    pid: u32,
    child: Option<Child>,
    dir: TempDir,
}

fn redis_bin() -> PathBuf {
    std::env::var_os("CORRAL_REDIS_SERVER")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("redis-server"))
}

/// An admin connection with generous timeouts (the crate's default response
/// timeout is 500 ms, which is tight on a loaded CI machine).
async fn redis_admin_connection(
    url: &str,
    connect_timeout: Duration,
    response_timeout: Duration,
) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url)?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(Some(response_timeout));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// Value of `field:` in an INFO section, if present.
fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        line.trim_end()
            .strip_prefix(field)
            .and_then(|rest| rest.strip_prefix(':'))
    })
}

impl TestRedis {
    /// Starts a fresh `redis-server`; panics with the reason (and its log) if
    /// it cannot be brought up.
    pub async fn start() -> TestRedis {
        let bin = redis_bin();
        let dir = tempfile::Builder::new()
            .prefix("corral-redis-")
            .tempdir()
            .expect("create a temporary directory for redis-server");
        let mut this = TestRedis {
            bin,
            port: 0,
            pid: 0,
            child: None,
            dir,
        };
        let what = format!("starting {} on a free port", this.bin.display());
        let (port, child) = with_retries(&what, START_ATTEMPTS, |_| {
            let port = free_port();
            let attempt = this.spawn_and_wait(port);
            async move { attempt.await.map(|child| (port, child)) }
        })
        .await;
        this.port = port;
        this.pid = child.id();
        this.child = Some(child);
        this
    }

    fn spawn_and_wait(&self, port: u16) -> impl Future<Output = anyhow::Result<Child>> + 'static {
        let bin = self.bin.clone();
        let dir = self.dir.path().to_path_buf();
        async move {
            let log_path = dir.join("redis.log");
            let (out, err) = stdio_file(&dir, "redis.stdio")?;
            let mut cmd = Command::new(&bin);
            cmd.arg("--port")
                .arg(port.to_string())
                .args(["--bind", "127.0.0.1"])
                .args(["--save", ""])
                .args(["--appendonly", "no"])
                .arg("--dir")
                .arg(&dir)
                .arg("--pidfile")
                .arg(dir.join("redis.pid"))
                .arg("--logfile")
                .arg(&log_path)
                .args(["--daemonize", "no"])
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err);
            let mut child = spawn_child(cmd).map_err(|e| {
                anyhow!(
                    "could not run {}: {e} (install redis-server, run scripts/test, \
                     or set CORRAL_REDIS_SERVER)",
                    bin.display()
                )
            })?;
            match wait_redis_ready(port, &mut child).await {
                Ok(()) => Ok(child),
                Err(e) => {
                    kill_and_reap(&mut child);
                    Err(e.context(format!(
                        "redis-server on port {port}; its output:\n{}",
                        output_tail(&dir.join("redis.stdio"), &log_path, 20)
                    )))
                }
            }
        }
    }

    /// `redis://127.0.0.1:PORT/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// PID of the current (or, after [`kill`](Self::kill), the last) child.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The server's own temporary directory (logs, pid file).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the child is still running (paused counts as running).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// A fresh admin connection (for PTTL, INFO, ...), with a 5 s response
    /// timeout.
    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        redis_admin_connection(&self.url(), Duration::from_secs(5), Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("admin connection to {}: {e}", self.url()))
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&mut self) {
        let child = self
            .child
            .as_mut()
            .expect("pause: redis-server is not running");
        stop_child(child, "redis-server");
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&mut self) {
        let child = self
            .child
            .as_mut()
            .expect("resume: redis-server is not running");
        continue_child(child, "redis-server");
    }

    /// SIGKILLs the server and reaps it. All data is lost (nothing is saved).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }

    /// Kills the server if it is running, then starts a new one on the same
    /// port and directory and waits until it answers.
    pub async fn restart(&mut self) {
        self.kill();
        let port = self.port;
        let what = format!("restarting {} on port {port}", self.bin.display());
        let child = with_retries(&what, START_ATTEMPTS, |_| self.spawn_and_wait(port)).await;
        self.pid = child.id();
        self.child = Some(child);
    }

    /// `CLIENT KILL TYPE pubsub`; returns how many connections were closed.
    pub async fn kill_pubsub_clients(&self) -> u64 {
        let mut conn = self.client().await;
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut conn)
            .await
            .expect("CLIENT KILL TYPE pubsub")
    }

    /// Number of calls of command `name` (e.g. `get`, `evalsha`) since start
    /// or the last [`reset_stats`](Self::reset_stats), from
    /// `INFO commandstats`; 0 if it was never called.
    pub async fn command_calls(&self, name: &str) -> u64 {
        let mut conn = self.client().await;
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .expect("INFO commandstats");
        let key = format!("cmdstat_{}", name.to_ascii_lowercase());
        info_field(&info, &key)
            .and_then(|stats| {
                stats
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("calls="))
                    .and_then(|n| n.parse().ok())
            })
            .unwrap_or(0)
    }

    /// `CONFIG RESETSTAT`.
    pub async fn reset_stats(&self) {
        let mut conn = self.client().await;
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut conn)
            .await
            .expect("CONFIG RESETSTAT");
    }

    /// The server's log file, as far as it has been written.
    pub fn log(&self) -> String {
        read_lossy(&self.dir.path().join("redis.log"))
    }
}

/// Waits until the server on `port` answers and reports our child's pid (so a
/// server of someone else that won the port race is not mistaken for ours).
async fn wait_redis_ready(port: u16, child: &mut Child) -> anyhow::Result<()> {
    let patience = ready_deadline();
    let deadline = Deadline::after(patience);
    let url = format!("redis://127.0.0.1:{port}/");
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("redis-server exited before it was ready ({status})");
        }
        let last_err = match redis_ping_info(&url).await {
            Ok(info) => {
                let pid =
                    info_field(&info, "process_id").and_then(|p| p.trim().parse::<u32>().ok());
                if pid == Some(child.id()) {
                    return Ok(());
                }
                format!("port {port} is served by another process (pid {pid:?})")
            }
            Err(e) => e.to_string(),
        };
        if deadline.expired() {
            bail!("redis-server not ready after {patience:?}: {last_err}");
        }
        tokio::time::sleep(READY_POLL).await;
    }
}

async fn redis_ping_info(url: &str) -> redis::RedisResult<String> {
    let mut conn =
        redis_admin_connection(url, Duration::from_millis(500), Duration::from_secs(1)).await?;
    let _: String = redis::cmd("PING").query_async(&mut conn).await?;
    redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- last {LOG_TAIL_LINES} lines of redis-server log (port {}, pid {}) ----\n{}\n---- end of redis-server log ----",
                self.port,
                self.pid,
                output_tail(
                    &self.dir.path().join("redis.stdio"),
                    &self.dir.path().join("redis.log"),
                    LOG_TAIL_LINES
                )
            );
        }
        self.kill();
    }
}

// ---------------------------------------------------------------------------
// NATS
// ---------------------------------------------------------------------------

/// A real `nats-server` child with JetStream on 127.0.0.1 at an ephemeral
/// port.
pub struct TestNats {
    bin: PathBuf,
    name: String,
    port: u16,
    pid: u32,
    child: Option<Child>,
    dir: TempDir,
    /// Port of the HTTP monitoring endpoint (`-m`), when started with one.
    monitor: Option<u16>,
}

pub fn nats_bin() -> PathBuf {
    if let Some(v) = std::env::var_os("CORRAL_NATS_SERVER").filter(|v| !v.is_empty()) {
        return PathBuf::from(v);
    }
    // Installed by scripts/test; lets a plain `cargo test` find it too.
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/nats/bin/nats-server");
    if tools.is_file() {
        return tools;
    }
    PathBuf::from("nats-server")
}

/// Parses `nats-server: v2.12.8` (or `v2.12.8`) into (2, 12, 8).
pub fn parse_nats_version(text: &str) -> Option<(u64, u64, u64)> {
    let word = text.split_whitespace().find(|w| {
        w.trim_start_matches('v')
            .starts_with(|c: char| c.is_ascii_digit())
    })?;
    let mut parts = word
        .trim_start_matches('v')
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u64>().ok());
    Some((
        parts.next()??,
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
    ))
}

/// Panics with a clear message unless `bin` is nats-server 2.11 or newer.
fn check_nats_version(bin: &Path) {
    let out = Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "could not run {} --version: {e}; the tests need nats-server 2.11 or newer: \
                 run scripts/test, which installs it, or set CORRAL_NATS_SERVER",
                bin.display()
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match parse_nats_version(&text) {
        Some((major, minor, _)) if (major, minor) >= MIN_NATS => {}
        Some((major, minor, patch)) => panic!(
            "nats-server {major}.{minor}.{patch} found at {}; the tests need {}.{} or newer: \
             run scripts/test, which installs it, or set CORRAL_NATS_SERVER",
            bin.display(),
            MIN_NATS.0,
            MIN_NATS.1
        ),
        None => panic!(
            "could not read a version from `{} --version` (printed {:?}); the tests need \
             nats-server {}.{} or newer: run scripts/test, which installs it, or set \
             CORRAL_NATS_SERVER",
            bin.display(),
            text.trim(),
            MIN_NATS.0,
            MIN_NATS.1
        ),
    }
}

/// Connects to `port` and returns the server's first line (`INFO {...}`),
/// within `timeout`.
pub async fn nats_info_line(port: u16, timeout: Duration) -> anyhow::Result<String> {
    tokio::time::timeout(timeout, async {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).await?;
        anyhow::Ok(line.trim_end().to_string())
    })
    .await
    .map_err(|_| anyhow!("no INFO line from 127.0.0.1:{port} within {timeout:?}"))?
}

impl TestNats {
    /// Starts a fresh `nats-server -js`; panics with the reason (and its log)
    /// if it cannot be brought up or is older than 2.11.
    pub async fn start() -> TestNats {
        let bin = nats_bin();
        check_nats_version(&bin);
        let dir = tempfile::Builder::new()
            .prefix("corral-nats-")
            .tempdir()
            .expect("create a temporary directory for nats-server");
        let mut this = TestNats {
            bin,
            name: unique_name("corral-test-nats"),
            port: 0,
            pid: 0,
            child: None,
            dir,
            monitor: None,
        };
        let what = format!("starting {} on a free port", this.bin.display());
        let (port, child) = with_retries(&what, START_ATTEMPTS, |_| {
            let port = free_port();
            let attempt = this.spawn_and_wait(port);
            async move { attempt.await.map(|child| (port, child)) }
        })
        .await;
        this.port = port;
        this.pid = child.id();
        this.child = Some(child);
        this
    }

    fn spawn_and_wait(&self, port: u16) -> impl Future<Output = anyhow::Result<Child>> + 'static {
        let bin = self.bin.clone();
        let name = self.name.clone();
        let dir = self.dir.path().to_path_buf();
        let monitor = self.monitor;
        async move {
            let log_path = dir.join("nats.log");
            let (out, err) = stdio_file(&dir, "nats.stdio")?;
            let mut cmd = Command::new(&bin);
            cmd.args(["-a", "127.0.0.1"])
                .arg("-p")
                .arg(port.to_string())
                .arg("-n")
                .arg(&name)
                .arg("-js")
                .arg("-sd")
                .arg(dir.join("js"))
                .arg("-l")
                .arg(&log_path)
                .arg("-P")
                .arg(dir.join("nats.pid"))
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err);
            if let Some(monitor) = monitor {
                cmd.arg("-m").arg(monitor.to_string());
            }
            let mut child = spawn_child(cmd).map_err(|e| {
                anyhow!(
                    "could not run {}: {e} (run scripts/test, which installs nats-server, \
                     or set CORRAL_NATS_SERVER)",
                    bin.display()
                )
            })?;
            match wait_nats_ready(port, &name, &mut child).await {
                Ok(()) => Ok(child),
                Err(e) => {
                    kill_and_reap(&mut child);
                    Err(e.context(format!(
                        "nats-server on port {port}; its output:\n{}",
                        output_tail(&dir.join("nats.stdio"), &log_path, 20)
                    )))
                }
            }
        }
    }

    /// `nats://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// PID of the current (or, after [`kill`](Self::kill), the last) child.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The server's own temporary directory (logs, pid file, `js/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The JetStream storage directory (kept across restarts).
    pub fn js_dir(&self) -> PathBuf {
        self.dir.path().join("js")
    }

    /// The server name passed with `-n` (it appears in INFO as `server_name`).
    pub fn server_name(&self) -> &str {
        &self.name
    }

    /// Whether the child is still running (paused counts as running).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Connects and returns the server's `INFO {...}` line (5 s deadline).
    pub async fn info_line(&self) -> String {
        nats_info_line(self.port, Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("INFO from {}: {e:#}", self.url()))
    }

    /// Freezes the server (SIGSTOP).
    pub fn pause(&mut self) {
        let child = self
            .child
            .as_mut()
            .expect("pause: nats-server is not running");
        stop_child(child, "nats-server");
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&mut self) {
        let child = self
            .child
            .as_mut()
            .expect("resume: nats-server is not running");
        continue_child(child, "nats-server");
    }

    /// SIGKILLs the server and reaps it. JetStream data on disk is kept.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }

    /// Kills the server if it is running, then starts a new one on the same
    /// port with the same JetStream directory and waits until it is ready.
    pub async fn restart(&mut self) {
        self.kill();
        let port = self.port;
        let what = format!("restarting {} on port {port}", self.bin.display());
        let child = with_retries(&what, START_ATTEMPTS, |_| self.spawn_and_wait(port)).await;
        self.pid = child.id();
        self.child = Some(child);
    }

    /// The server's log file, as far as it has been written.
    pub fn log(&self) -> String {
        read_lossy(&self.dir.path().join("nats.log"))
    }
}

// NATS monitoring
impl TestNats {
    /// Like [`start`](Self::start), with the HTTP monitoring endpoint on a free loopback port
    /// (for [`subscriptions`](Self::subscriptions)).
    pub async fn start_monitored() -> TestNats {
        let mut this = TestNats::start().await;
        this.kill();
        this.monitor = Some(free_port());
        this.restart().await;
        this
    }

    /// The subjects of every client subscription the server holds (`/connz?subs=1`); panics
    /// unless started with [`start_monitored`](Self::start_monitored).
    pub async fn subscriptions(&self) -> Vec<String> {
        let port = self
            .monitor
            .expect("nats-server was started without monitoring");
        let reply = super::http::Http::new()
            .get(format!("http://127.0.0.1:{port}/connz?subs=1&limit=1024"))
            .send()
            .await;
        assert_eq!(reply.status, 200, "/connz: {}", reply.text());
        let connz = reply.json();
        connz["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|c| {
                c["subscriptions_list"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    }
}

/// Waits until the server on `port` sends an INFO line naming our server with
/// JetStream enabled (nats-server accepts clients only after JetStream is up).
async fn wait_nats_ready(port: u16, name: &str, child: &mut Child) -> anyhow::Result<()> {
    let patience = ready_deadline();
    let deadline = Deadline::after(patience);
    let want_name = format!("\"server_name\":\"{name}\"");
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("nats-server exited before it was ready ({status})");
        }
        let last_err = match nats_info_line(port, Duration::from_secs(1)).await {
            Ok(line) if line.starts_with("INFO ") && line.contains(&want_name) => {
                if line.contains("\"jetstream\":true") {
                    return Ok(());
                }
                format!("server is up without JetStream: {line}")
            }
            Ok(line) => format!("port {port} answered something else: {line}"),
            Err(e) => format!("{e:#}"),
        };
        if deadline.expired() {
            bail!("nats-server not ready after {patience:?}: {last_err}");
        }
        tokio::time::sleep(READY_POLL).await;
    }
}

impl Drop for TestNats {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- last {LOG_TAIL_LINES} lines of nats-server log (port {}, pid {}) ----\n{}\n---- end of nats-server log ----",
                self.port,
                self.pid,
                output_tail(
                    &self.dir.path().join("nats.stdio"),
                    &self.dir.path().join("nats.log"),
                    LOG_TAIL_LINES
                )
            );
        }
        self.kill();
    }
}
