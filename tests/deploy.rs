//! The container deployment, tested without a container engine: the commands the image and the
//! compose file run (`corral healthcheck`, `corral demo-upstream`), and every file the compose
//! file mounts, each loaded by the program that will read it.

mod support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use support::http::Http;
use support::patience;
use support::process::{ConfigFrom, CorralServe, corral_bin};
use support::proxy::fill;
use support::servers::free_port;
use tokio::io::AsyncBufReadExt;
use tokio::time::Instant;

/// A finished `corral` run: exit code (`None` when killed by a signal) and what it printed.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn command(args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(corral_bin());
    cmd.args(args)
        .env_remove("CORRAL_CONFIG")
        .env_remove("CORRAL_HEALTHCHECK_URL")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Runs `cmd` to completion within the test's patience (killed and a panic otherwise).
async fn run(mut cmd: tokio::process::Command) -> Run {
    let limit = patience();
    let output = tokio::time::timeout(limit, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{cmd:?} did not finish within {limit:?}"))
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

// ------------------------------------------------------------------ healthcheck ----

const SERVE: &str = r#"
listen: {{listen}}
admin: { listen: {{admin}} }
store: { kind: memory }
routes:
  - name: reports
    match: { path_prefix: /reports }
    upstream: http://127.0.0.1:9
"#;

/// `corral healthcheck` exits 0 when `/healthz` answers 200 (at `--url`, or at the URL in
/// `CORRAL_HEALTHCHECK_URL`), and 1 with a reason for another status, a refused connection, or a
/// server that never answers (within `--timeout`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_exits_0_only_when_healthz_answers_200() {
    let dir = tempfile::Builder::new()
        .prefix("corral-deploy-")
        .tempdir()
        .expect("a temporary directory");
    let (public, admin) = (loopback(free_port()), loopback(free_port()));
    let yaml = fill(
        SERVE,
        &[
            ("listen", &public.to_string()),
            ("admin", &admin.to_string()),
        ],
    );
    let path = dir.path().join("corral.yaml");
    std::fs::write(&path, yaml).expect("write the config");
    let proxy = CorralServe::start(&path, public, admin, ConfigFrom::Flag).await;
    let healthz = format!("{}/healthz", proxy.admin_url());

    let healthy = run(command(&["healthcheck", "--url", &healthz])).await;
    assert_eq!(healthy.code, Some(0), "{healthy:#?}");
    // Quiet when healthy: a container runtime runs it every few seconds.
    assert_eq!((healthy.stdout.as_str(), healthy.stderr.as_str()), ("", ""));

    let mut from_env = command(&["healthcheck"]);
    from_env.env("CORRAL_HEALTHCHECK_URL", &healthz);
    let healthy = run(from_env).await;
    assert_eq!(healthy.code, Some(0), "{healthy:#?}");

    // The public listener answers 404 for a path no route takes.
    let not_found = format!("{}/healthz", proxy.url());
    let wrong_status = run(command(&["healthcheck", "--url", &not_found])).await;
    assert_eq!(wrong_status.code, Some(1), "{wrong_status:#?}");
    assert!(
        wrong_status.stderr.contains("404"),
        "{}",
        wrong_status.stderr
    );

    let closed = format!("http://{}/healthz", loopback(free_port()));
    let refused = run(command(&["healthcheck", "--url", &closed])).await;
    assert_eq!(refused.code, Some(1), "{refused:#?}");
    assert!(
        refused.stderr.starts_with("corral healthcheck: "),
        "{}",
        refused.stderr
    );

    // Accepts connections (the kernel does, from the backlog) and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a silent listener");
    let silent_url = format!(
        "http://{}/healthz",
        silent.local_addr().expect("its address")
    );
    let hung = run(command(&[
        "healthcheck",
        "--url",
        &silent_url,
        "--timeout",
        "300ms",
    ]))
    .await;
    assert_eq!(hung.code, Some(1), "{hung:#?}");
    assert!(
        hung.stderr.contains("no answer within 300ms"),
        "{}",
        hung.stderr
    );

    let bad = run(command(&["healthcheck", "--url", "ftp://x/healthz"])).await;
    assert_eq!(bad.code, Some(1), "{bad:#?}");
    assert!(bad.stderr.contains("bad url"), "{}", bad.stderr);
}

// ------------------------------------------------------------------ demo upstream ----

/// `corral demo-upstream` prints where it listens, takes `--delay` per answer, and answers JSON
/// whose `fetch` counts the requests it has answered, so every fetch through corral is visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_upstream_answers_slowly_with_a_fetch_counter() {
    let delay = Duration::from_millis(300);
    let mut cmd = command(&[
        "demo-upstream",
        "--listen",
        "127.0.0.1:0",
        "--delay",
        "300ms",
    ]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = cmd.spawn().expect("run corral demo-upstream");
    let stdout = child.stdout.take().expect("its stdout");
    let mut first = String::new();
    tokio::time::timeout(
        patience(),
        tokio::io::BufReader::new(stdout).read_line(&mut first),
    )
    .await
    .expect("corral demo-upstream prints its address in time")
    .expect("read its stdout");
    let addr = first
        .split_whitespace()
        .find_map(|word| word.trim_end_matches(',').parse::<SocketAddr>().ok())
        .unwrap_or_else(|| panic!("no address in {first:?}"));

    let http = Http::new();
    for fetch in 1..=2u64 {
        let sent = Instant::now();
        let reply = http
            .get(format!("http://{addr}/reports/2024-q1"))
            .send()
            .await;
        assert!(
            sent.elapsed() >= delay,
            "answered after {:?}, before its delay of {delay:?}",
            sent.elapsed()
        );
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("content-type"), Some("application/json"));
        let body = reply.json();
        assert_eq!(body["fetch"], fetch, "{body}");
        assert_eq!(body["report"], "/reports/2024-q1", "{body}");
    }
    child.kill().await.expect("stop corral demo-upstream");
}
