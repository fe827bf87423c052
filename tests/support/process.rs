//! `corral serve` as a real process: the binary cargo built for these tests, a config file on
//! disk, and the ports written in that file.
//!
//! The child is stopped by its own PID when dropped (and, on Linux, killed by the kernel if the
//! test process dies first). Its stdout and stderr go to a file beside the config, printed when a
//! test panics.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::http::Http;
use super::servers::{continue_child, free_port, last_lines, read_lossy, spawn_child, stop_child};
use super::{Deadline, patience};

/// Lines of a process's output printed when a test panics.
const OUTPUT_TAIL_LINES: usize = 80;
/// Pause between two readiness probes.
const READY_POLL: Duration = Duration::from_millis(20);

/// The `corral` binary under test.
pub fn corral_bin() -> &'static str {
    env!("CARGO_BIN_EXE_corral")
}

/// How `corral serve` is told where its config is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigFrom {
    /// `corral serve --config FILE`
    Flag,
    /// `CORRAL_CONFIG=FILE corral serve`
    Env,
}

/// A running `corral serve`.
pub struct CorralServe {
    child: Option<Child>,
    pid: u32,
    public: SocketAddr,
    admin: SocketAddr,
    output: PathBuf,
}

impl CorralServe {
    /// Runs `corral serve` on `config` (whose `listen` and `admin.listen` must be `public` and
    /// `admin`) and waits until `/healthz` and `/readyz` answer 200; panics with the process's
    /// output if it exits first or the test's patience runs out.
    pub async fn start(
        config: &Path,
        public: SocketAddr,
        admin: SocketAddr,
        from: ConfigFrom,
    ) -> CorralServe {
        Self::start_with_env(config, public, admin, from, &[]).await
    }

    /// Like [`start`](Self::start), with these environment variables set for the process (e.g.
    /// `CORRAL_LOG_FORMAT=json`).
    pub async fn start_with_env(
        config: &Path,
        public: SocketAddr,
        admin: SocketAddr,
        from: ConfigFrom,
        env: &[(&str, &str)],
    ) -> CorralServe {
        let mut this = Self::spawn(config, public, admin, from, env);
        this.wait_answering(&["/healthz", "/readyz"]).await;
        this
    }

    /// Like [`start_with_env`](Self::start_with_env), but waits only for `/healthz`: for a
    /// process that is expected not to be ready (a route that answers 503 without its store).
    pub async fn start_live(
        config: &Path,
        public: SocketAddr,
        admin: SocketAddr,
        env: &[(&str, &str)],
    ) -> CorralServe {
        let mut this = Self::spawn(config, public, admin, ConfigFrom::Flag, env);
        this.wait_answering(&["/healthz"]).await;
        this
    }

    fn spawn(
        config: &Path,
        public: SocketAddr,
        admin: SocketAddr,
        from: ConfigFrom,
        env: &[(&str, &str)],
    ) -> CorralServe {
        let output = config.with_extension("output.log");
        let out = std::fs::File::create(&output).expect("create the process output file");
        let err = out.try_clone().expect("clone the output file handle");
        let mut cmd = Command::new(corral_bin());
        cmd.arg("serve");
        match from {
            ConfigFrom::Flag => {
                cmd.arg("--config").arg(config).env_remove("CORRAL_CONFIG");
            }
            ConfigFrom::Env => {
                cmd.env("CORRAL_CONFIG", config);
            }
        }
        cmd.envs(env.iter().copied());
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = spawn_child(cmd).unwrap_or_else(|e| panic!("run {}: {e}", corral_bin()));
        CorralServe {
            pid: child.id(),
            child: Some(child),
            public,
            admin,
            output,
        }
    }

    async fn wait_answering(&mut self, paths: &[&str]) {
        let http = Http::new();
        let patience = patience();
        let deadline = Deadline::after(patience);
        let max_probes = patience.as_millis() / READY_POLL.as_millis() + 1;
        for path in paths {
            let url = format!("{}{path}", self.admin_url());
            let mut last: String;
            let mut probes = 0u128;
            loop {
                probes += 1;
                let child = self.child.as_mut().expect("child");
                if let Some(status) = child.try_wait().expect("try_wait") {
                    panic!(
                        "corral serve (pid {}) exited with {status} before it was ready; its output:\n{}",
                        self.pid,
                        self.output()
                    );
                }
                match http.get(&url).try_send().await {
                    Ok(reply) if reply.status == 200 => break,
                    Ok(reply) => last = format!("{} {:?}", reply.status, reply.text()),
                    Err(error) => last = error,
                }
                assert!(
                    !deadline.expired() && probes < max_probes,
                    "corral serve (pid {}): {path} did not answer 200 within {patience:?}; last: {last}; its output:\n{}",
                    self.pid,
                    self.output()
                );
                tokio::time::sleep(READY_POLL).await;
            }
        }
    }

    /// `http://127.0.0.1:PORT` of the public listener.
    pub fn url(&self) -> String {
        format!("http://{}", self.public)
    }

    /// `http://127.0.0.1:PORT` of the admin listener.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// What the process has printed so far (stdout and stderr, interleaved).
    pub fn output(&self) -> String {
        read_lossy(&self.output)
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to this process, by its own PID, while it is
    /// unreaped; answers whether it was sent.
    #[allow(unsafe_code)] // test harness: signals and process limits, see SAFETY below
    pub fn signal(&mut self, signal: libc::c_int) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        if !matches!(child.try_wait(), Ok(None)) {
            return false;
        }
        let pid = libc::pid_t::try_from(self.pid).expect("a pid fits pid_t");
        // SAFETY: kill(2) on our own unreaped child's PID; no memory is involved.
        unsafe { libc::kill(pid, signal) == 0 }
    }

    /// Waits up to `within` for the process to exit; its status, or `None` if it still runs.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Deadline::after(within);
        let max_probes = within.as_millis() / READY_POLL.as_millis() + 1;
        for _ in 0..max_probes {
            let child = self.child.as_mut()?;
            if let Some(status) = child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if deadline.expired() {
                return None;
            }
            tokio::time::sleep(READY_POLL).await;
        }
        None
    }
}

impl Drop for CorralServe {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- last {OUTPUT_TAIL_LINES} lines of corral serve (pid {}) ----\n{}\n---- end of corral serve output ----",
                self.pid,
                last_lines(&self.output(), OUTPUT_TAIL_LINES)
            );
        }
        if let Some(mut child) = self.child.take() {
            // Child::kill signals this child's own PID, and only while it is unreaped.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ------------------------------------------------------------------- faults ----

impl CorralServe {
    /// SIGKILLs the process and reaps it: it dies wherever it was, releasing nothing (its leases
    /// stay in the store until they expire).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Child::kill signals this child's own PID, and only while it is unreaped.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the process (SIGSTOP) and waits until every thread has stopped.
    pub fn pause(&mut self) {
        let child = self
            .child
            .as_mut()
            .expect("pause: corral serve is not running");
        stop_child(child, "corral serve");
    }

    /// Thaws a paused process (SIGCONT).
    pub fn resume(&mut self) {
        let child = self
            .child
            .as_mut()
            .expect("resume: corral serve is not running");
        continue_child(child, "corral serve");
    }

    /// The process's resident set size (`VmRSS` of `/proc/<pid>/status`), in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .unwrap_or_else(|e| panic!("read /proc/{}/status: {e}", self.pid));
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS in /proc/{}/status", self.pid))
    }

    /// The text of the admin listener's `/metrics`.
    pub async fn metrics(&self) -> String {
        let reply = Http::new()
            .get(format!("{}/metrics", self.admin_url()))
            .send()
            .await;
        assert_eq!(reply.status, 200, "GET /metrics: {}", reply.text());
        reply.text()
    }
}

/// The sum of every sample of metric `name` (any labels) whose labels include each of `labels`
/// (written `key="value"`), in a `/metrics` text; 0 when there is none.
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            let series = line.split(' ').next().unwrap_or("");
            series.split('{').next() == Some(name)
        })
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// `corral serve` processes sharing one store and bus, each with its own config file (the same
/// YAML with its own ports) in a temporary directory.
pub struct ServeReplicas {
    /// Declared first so the processes stop before their directory is removed.
    replicas: Vec<CorralServe>,
    _dir: tempfile::TempDir,
}

impl ServeReplicas {
    /// Starts `n` processes on `yaml`, in which `{{listen}}` and `{{admin}}` are each replica's
    /// own public and admin addresses; returns once every one is ready.
    pub async fn start(n: usize, yaml: &str) -> ServeReplicas {
        let dir = tempfile::Builder::new()
            .prefix("corral-replicas-")
            .tempdir()
            .expect("a temporary directory for the configs");
        let mut replicas = Vec::with_capacity(n);
        for i in 0..n {
            let public = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let text = yaml
                .replace("{{listen}}", &public.to_string())
                .replace("{{admin}}", &admin.to_string());
            assert!(
                !text.contains("{{"),
                "the config still has unfilled placeholders:\n{text}"
            );
            let path = dir.path().join(format!("replica-{i}.yaml"));
            std::fs::write(&path, text).expect("write a replica's config");
            replicas.push(CorralServe::start(&path, public, admin, ConfigFrom::Flag).await);
        }
        ServeReplicas {
            replicas,
            _dir: dir,
        }
    }

    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    pub fn all(&self) -> &[CorralServe] {
        &self.replicas
    }
}

impl std::ops::Index<usize> for ServeReplicas {
    type Output = CorralServe;
    fn index(&self, i: usize) -> &CorralServe {
        &self.replicas[i]
    }
}

impl std::ops::IndexMut<usize> for ServeReplicas {
    fn index_mut(&mut self, i: usize) -> &mut CorralServe {
        &mut self.replicas[i]
    }
}
