//! A real Prometheus server for the dashboard tests, and `promtool`.
//!
//! [`TestPrometheus`] runs one `prometheus` child on 127.0.0.1 at an ephemeral port, with its own
//! temporary directory for the config, the rule files and the TSDB, and stops it by its PID when
//! dropped. Queries go through the HTTP API, as Grafana's would.
//!
//! Binaries: `CORRAL_PROMETHEUS` (default `prometheus` on `PATH`) and `CORRAL_PROMTOOL` (default
//! `promtool` on `PATH`); `scripts/test` installs both (Debian package `prometheus`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use super::http::Http;
use super::proxy::percent_encode;
use super::servers::{free_port, last_lines, read_lossy, spawn_child};
use super::{Deadline, patience};

/// How many times a start is attempted (a new port each time).
const START_ATTEMPTS: usize = 5;
/// Pause between two readiness probes.
const READY_POLL: Duration = Duration::from_millis(50);
/// Lines of Prometheus's log printed when a test panics.
const LOG_TAIL_LINES: usize = 40;

fn binary(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(default), PathBuf::from)
}

/// Runs `promtool` with `args` and returns its output; panics when it cannot be run at all.
pub fn promtool(args: &[&str]) -> Output {
    let bin = binary("CORRAL_PROMTOOL", "promtool");
    Command::new(&bin).args(args).output().unwrap_or_else(|e| {
        panic!(
            "could not run {}: {e} (install the prometheus package, run scripts/test, or set \
             CORRAL_PROMTOOL)",
            bin.display()
        )
    })
}

/// Runs `promtool` with `args` and `input` on its standard input, and returns its output.
pub fn promtool_with_input(args: &[&str], input: &str) -> Output {
    use std::io::Write;
    let bin = binary("CORRAL_PROMTOOL", "promtool");
    let mut child = Command::new(&bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("could not run {}: {e}", bin.display()));
    let mut stdin = child.stdin.take().expect("a piped stdin");
    stdin
        .write_all(input.as_bytes())
        .expect("write promtool's input");
    drop(stdin);
    child.wait_with_output().expect("promtool's output")
}

/// A running `prometheus`; dropping it kills it (by its own PID) and removes its directory.
pub struct TestPrometheus {
    port: u16,
    child: Child,
    dir: TempDir,
    http: Http,
}

impl TestPrometheus {
    /// Starts Prometheus on `config` (the text of its `prometheus.yml`), after writing `files`
    /// (name, text) beside it, so the config can name them relative to itself. Returns once it
    /// answers `/-/ready`.
    pub async fn start(config: &str, files: &[(&str, &str)]) -> TestPrometheus {
        let dir = tempfile::Builder::new()
            .prefix("corral-prometheus-")
            .tempdir()
            .expect("create a temporary directory for prometheus");
        std::fs::write(dir.path().join("prometheus.yml"), config).expect("write prometheus.yml");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write a file beside the config");
        }
        let http = Http::new();
        let mut errors = Vec::new();
        for attempt in 1..=START_ATTEMPTS {
            let port = free_port();
            let mut child = spawn(dir.path(), port);
            match wait_ready(&http, dir.path(), port, &mut child).await {
                Ok(()) => {
                    return TestPrometheus {
                        port,
                        child,
                        dir,
                        http,
                    };
                }
                Err(error) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    errors.push(format!(
                        "attempt {attempt} (port {port}): {error}\n{}",
                        last_lines(&read_lossy(&dir.path().join("prometheus.log")), 10)
                    ));
                }
            }
        }
        panic!(
            "prometheus did not start in {START_ATTEMPTS} attempts:\n{}",
            errors.join("\n")
        );
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// An instant query through `/api/v1/query`: the `data.result` array, or Prometheus's error.
    pub async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let url = format!("{}/api/v1/query?query={}", self.url(), percent_encode(expr));
        let reply = self.http.get(url).try_send().await?;
        let body: Value = serde_json::from_slice(&reply.body)
            .map_err(|e| format!("{} with a body that is not JSON ({e})", reply.status))?;
        if body["status"] != "success" {
            return Err(format!("{}: {}", body["errorType"], body["error"]));
        }
        match &body["data"]["result"] {
            Value::Array(result) => Ok(result.clone()),
            other => Err(format!("a result that is not a vector: {other}")),
        }
    }

    /// The numbers of an instant query's vector result (NaN included); panics on an error.
    pub async fn values(&self, expr: &str) -> Vec<f64> {
        let result = self
            .query(expr)
            .await
            .unwrap_or_else(|e| panic!("query {expr}: {e}"));
        result.iter().map(sample_value).collect()
    }

    /// `GET <path>` on the HTTP API, as JSON (`/api/v1/rules`, `/api/v1/alerts`, ...).
    pub async fn api(&self, path: &str) -> Value {
        let reply = self.http.get(format!("{}{path}", self.url())).send().await;
        assert_eq!(reply.status, 200, "GET {path}: {}", reply.text());
        reply.json()
    }
}

/// The value of one sample of a vector result (`[timestamp, "value"]`), NaN when unreadable.
pub fn sample_value(sample: &Value) -> f64 {
    sample["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

fn spawn(dir: &Path, port: u16) -> Child {
    let bin = binary("CORRAL_PROMETHEUS", "prometheus");
    let log = std::fs::File::create(dir.join("prometheus.log")).expect("create prometheus.log");
    let mut cmd = Command::new(&bin);
    cmd.arg(format!(
        "--config.file={}",
        dir.join("prometheus.yml").display()
    ))
    .arg(format!(
        "--storage.tsdb.path={}",
        dir.join("data").display()
    ))
    .arg(format!("--web.listen-address=127.0.0.1:{port}"))
    .current_dir(dir)
    .stdin(Stdio::null())
    .stdout(log.try_clone().expect("clone the log file"))
    .stderr(log);
    spawn_child(cmd).unwrap_or_else(|e| {
        panic!(
            "could not run {}: {e} (install the prometheus package, run scripts/test, or set \
             CORRAL_PROMETHEUS)",
            bin.display()
        )
    })
}

/// Waits until Prometheus answers `/-/ready` on `port` and reports our own storage path (so a
/// server of someone else that won the port race is not mistaken for ours).
async fn wait_ready(http: &Http, dir: &Path, port: u16, child: &mut Child) -> Result<(), String> {
    let patience = patience();
    let deadline = Deadline::after(patience);
    let max_probes = patience.as_millis() / READY_POLL.as_millis() + 1;
    let ours = dir.join("data").display().to_string();
    let base = format!("http://127.0.0.1:{port}");
    let mut last = String::from("no answer yet");
    for _ in 0..max_probes {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("prometheus exited before it was ready ({status})"));
        }
        if let Ok(reply) = http.get(format!("{base}/-/ready")).try_send().await {
            last = format!("/-/ready answered {}", reply.status);
            if reply.status == 200 {
                let flags = http
                    .get(format!("{base}/api/v1/status/flags"))
                    .send()
                    .await
                    .json();
                if flags["data"]["storage.tsdb.path"] == ours.as_str() {
                    return Ok(());
                }
                return Err(format!("port {port} is served by another Prometheus"));
            }
        }
        if deadline.expired() {
            break;
        }
        tokio::time::sleep(READY_POLL).await;
    }
    Err(format!("not ready within {patience:?}: {last}"))
}

impl Drop for TestPrometheus {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- last {LOG_TAIL_LINES} lines of the prometheus log (port {}, pid {}) ----\n{}\n---- end ----",
                self.port,
                self.child.id(),
                last_lines(
                    &read_lossy(&self.dir.path().join("prometheus.log")),
                    LOG_TAIL_LINES
                )
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
