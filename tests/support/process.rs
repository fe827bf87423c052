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
use super::servers::{last_lines, read_lossy, spawn_child};
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
        let mut this = CorralServe {
            pid: child.id(),
            child: Some(child),
            public,
            admin,
            output,
        };
        this.wait_ready().await;
        this
    }

    async fn wait_ready(&mut self) {
        let http = Http::new();
        let patience = patience();
        let deadline = Deadline::after(patience);
        let max_probes = patience.as_millis() / READY_POLL.as_millis() + 1;
        for path in ["/healthz", "/readyz"] {
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

    /// Freezes the process (SIGSTOP to its own PID) until [`resume`](Self::resume): connections stay
    /// open, nothing answers, its leases go unrenewed.
    pub fn pause(&mut self) {
        let child = self
            .child
            .as_mut()
            .expect("pause: corral serve is not running");
        super::servers::stop_child(child, "corral serve");
    }

    /// Thaws a paused process (SIGCONT).
    pub fn resume(&mut self) {
        let child = self
            .child
            .as_mut()
            .expect("resume: corral serve is not running");
        super::servers::continue_child(child, "corral serve");
    }

    /// What the process has printed so far (stdout and stderr, interleaved).
    pub fn output(&self) -> String {
        read_lossy(&self.output)
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
