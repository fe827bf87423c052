//! What `corral serve` writes to its log, read the way a log pipeline or a person reads it: JSON
//! lines with their fields at the top level, the lifecycle lines (starting, ready, reload applied
//! or refused, draining, stopped), one audit line per admin call that never holds the token,
//! refused configs reported in the chosen format, and colour only for a terminal without
//! `NO_COLOR`.

use crate::support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;

use regex::Regex;
use serde_json::Value;
use support::http::Http;
use support::process::{ConfigFrom, CorralServe, corral_bin};
use support::proxy::fill;
use support::servers::free_port;
use support::upstream::Upstream;
use support::{eventually, patience};

/// The admin token of these tests; no log line may contain it.
const TOKEN: &str = "never-logged-7f3a";
/// `printf %s never-logged-7f3a | sha256sum | cut -c1-8`.
const TOKEN_FINGERPRINT: &str = "sha256:3d2d1fe7";

const CONFIG: &str = r#"
listen: {{listen}}
admin: { listen: {{admin}}, token: never-logged-7f3a }
namespace: logs
store: { kind: memory }
defaults: { ttl: {{ttl}}, wait_timeout: 5s }
routes:
  - name: reports
    match: { path_prefix: /reports }
    upstream: {{upstream}}
"#;

/// Every line of `output` as JSON; panics naming a line that is not a JSON object with a
/// top-level `timestamp`, `level`, `target` and `message` (and no nested `fields`).
fn json_lines(output: &str) -> Vec<Value> {
    output
        .lines()
        .filter(|line| !line.is_empty())
        .map(|line| {
            let value: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
            for field in ["timestamp", "level", "target", "message"] {
                assert!(value[field].is_string(), "no top-level {field}: {line}");
            }
            assert!(value.get("fields").is_none(), "nested fields: {line}");
            value
        })
        .collect()
}

/// The lines whose `field` is `value`.
fn with<'a>(lines: &'a [Value], field: &str, value: &str) -> Vec<&'a Value> {
    lines.iter().filter(|line| line[field] == value).collect()
}

fn write_config(
    path: &Path,
    public: SocketAddr,
    admin: SocketAddr,
    upstream: &Upstream,
    ttl: &str,
) {
    let yaml = fill(
        CONFIG,
        &[
            ("listen", &public.to_string()),
            ("admin", &admin.to_string()),
            ("ttl", ttl),
            ("upstream", &upstream.url()),
        ],
    );
    std::fs::write(path, yaml).expect("write the config");
}

/// `corral check`'s digest of the config at `path`.
async fn checked_digest(path: &Path) -> String {
    let output = tokio::process::Command::new(corral_bin())
        .arg("check")
        .arg("--config")
        .arg(path)
        .env_remove("CORRAL_CONFIG")
        .output()
        .await
        .expect("run corral check");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let digest = Regex::new(r"ok \(digest ([0-9a-f]{12})\)").expect("a valid pattern");
    digest
        .captures(&stdout)
        .unwrap_or_else(|| panic!("no digest in corral check's output:\n{stdout}"))[1]
        .to_owned()
}

/// A whole life in JSON: started, ready (with the digest `corral check` gives the same file), a
/// request, admin calls, a reload applied and one refused, then SIGTERM: draining and stopped.
/// Every line parses; the admin calls leave audit lines with the token's fingerprint only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_life_in_json_lines_with_lifecycle_and_audit_lines() {
    let upstream = Upstream::start().await;
    let dir = tempfile::Builder::new()
        .prefix("corral-logs-")
        .tempdir()
        .expect("a temporary directory");
    let public = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let path = dir.path().join("corral.yaml");
    write_config(&path, public, admin, &upstream, "60s");
    let digest = checked_digest(&path).await;
    let env = [("CORRAL_LOG_FORMAT", "json"), ("RUST_LOG", "corral=info")];
    let mut proxy = CorralServe::start_with_env(&path, public, admin, ConfigFrom::Flag, &env).await;
    let http = Http::new();

    assert_eq!(
        http.get(format!("{}/reports?a=1", proxy.url()))
            .send()
            .await
            .status,
        200
    );
    let purged = http
        .call(
            http::Method::POST,
            format!("{}/admin/purge", proxy.admin_url()),
        )
        .bearer(TOKEN)
        .json(&serde_json::json!({"route": "reports", "prefix": "/reports/2024/"}))
        .send()
        .await;
    assert_eq!(purged.status, 200, "{}", purged.text());
    let unauthorized = http
        .get(format!("{}/admin/status?url=%2Freports", proxy.admin_url()))
        .send()
        .await;
    assert_eq!(unauthorized.status, 401);

    // A reload that applies (a new ttl), then one refused (a bad duration on line 6).
    write_config(&path, public, admin, &upstream, "30s");
    assert!(proxy.signal(libc::SIGHUP), "SIGHUP");
    eventually("the reload is applied", || async {
        !with(&json_lines(&proxy.output()), "reload", "applied").is_empty()
    })
    .await;
    write_config(&path, public, admin, &upstream, "5 parsecs");
    assert!(proxy.signal(libc::SIGHUP), "SIGHUP");
    eventually("the reload is refused", || async {
        !with(&json_lines(&proxy.output()), "reload", "refused").is_empty()
    })
    .await;

    assert!(proxy.signal(libc::SIGTERM), "SIGTERM");
    let exit = proxy.wait_exit(patience()).await;
    assert!(exit.is_some_and(|s| s.success()), "exit: {exit:?}");
    let output = proxy.output();
    let lines = json_lines(&output);

    let phases: Vec<&str> = lines
        .iter()
        .filter_map(|line| line["phase"].as_str())
        .collect();
    assert_eq!(
        phases,
        ["starting", "ready", "draining", "stopped"],
        "{output}"
    );
    let starting = with(&lines, "phase", "starting")[0];
    assert_eq!(starting["version"], env!("CARGO_PKG_VERSION"));
    let ready = with(&lines, "phase", "ready")[0];
    assert_eq!(ready["config_digest"], digest.as_str(), "{ready}");
    assert_eq!(ready["public"], public.to_string());

    let applied = with(&lines, "reload", "applied")[0];
    let new_digest = applied["config_digest"].as_str().expect("a digest");
    assert_eq!(new_digest, checked_digest_of_text(&path, "30s").await);
    assert_ne!(new_digest, digest, "a new ttl, a new digest");
    let refused = with(&lines, "reload", "refused")[0];
    let place = format!("{}:6:", path.display());
    assert!(
        refused["reason"]
            .as_str()
            .is_some_and(|r| r.contains(&place)),
        "the reason names {place}: {refused}"
    );
    assert_eq!(refused["running_digest"], new_digest);

    let audit = with(&lines, "target", "corral::audit");
    assert_eq!(audit.len(), 2, "one line per admin call: {audit:#?}");
    assert_eq!(audit[0]["method"], "POST");
    assert_eq!(audit[0]["path"], "/admin/purge");
    assert_eq!(audit[0]["purge"], "route reports prefix /reports/2024/");
    assert_eq!(audit[0]["status"], 200);
    assert_eq!(audit[0]["token"], TOKEN_FINGERPRINT);
    assert!(
        audit[0]["client"]
            .as_str()
            .is_some_and(|c| c.starts_with("127.0.0.1:"))
    );
    assert_eq!(audit[1]["path"], "/admin/status");
    assert_eq!(audit[1]["query"], "url=%2Freports");
    assert_eq!(audit[1]["status"], 401);
    assert_eq!(audit[1]["token"], "none");
    assert!(!output.contains(TOKEN), "the token was logged:\n{output}");
    assert_eq!(
        with(&lines, "target", "corral::access").len(),
        1,
        "one access line"
    );
}

/// `corral check`'s digest of the config at `path` rewritten with `ttl` (the file the reload read).
async fn checked_digest_of_text(path: &Path, ttl: &str) -> String {
    let text = std::fs::read_to_string(path).expect("read the config");
    let copy = path.with_file_name("copy.yaml");
    std::fs::write(&copy, text.replace("5 parsecs", ttl)).expect("write the copy");
    checked_digest(&copy).await
}

/// A config with a bad duration on line 6, column 10.
const BROKEN: &str = "listen: 127.0.0.1:1
routes:
  - name: r
    match: { path_prefix: / }
    upstream: http://127.0.0.1:9
    ttl: 5 parsecs
";

/// `corral serve` on [`BROKEN`] with these arguments before `serve` and this environment; its
/// exit code and stderr.
async fn serve_broken(dir: &Path, global: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let path = dir.join("broken.yaml");
    std::fs::write(&path, BROKEN).expect("write the config");
    let mut cmd = tokio::process::Command::new(corral_bin());
    cmd.args(global)
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .env_remove("CORRAL_CONFIG")
        .env_remove("CORRAL_LOG_FORMAT")
        .env_remove("NO_COLOR")
        .env("RUST_LOG", "corral=info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(patience(), cmd.output())
        .await
        .expect("corral serve exits on a refused config")
        .expect("run corral serve");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// In JSON mode a refused config is JSON `ERROR` lines, one per problem at its place, even with
/// every log level filtered out (why the process stopped is never filtered).
#[tokio::test]
async fn a_refused_config_in_json_mode_is_json_error_lines_naming_the_place() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let json = ["--log-format", "json"];
    let (code, stderr) = serve_broken(dir.path(), &json, &[("RUST_LOG", "off")]).await;
    assert_eq!(code, Some(2), "{stderr}");
    let lines = json_lines(&stderr);
    let errors = with(&lines, "level", "ERROR");
    let file = dir.path().join("broken.yaml");
    let place = format!("{}:6:10: ", file.display());
    let problem = errors
        .iter()
        .find(|line| {
            line["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(&place))
        })
        .unwrap_or_else(|| panic!("no error line starting {place}:\n{stderr}"));
    assert_eq!(
        (problem["line"].as_u64(), problem["column"].as_u64()),
        (Some(6), Some(10))
    );
    assert!(
        problem["message"].as_str().unwrap().contains("ttl"),
        "{problem}"
    );
}

/// Text logs to a pipe (here, and in every container runtime that collects stderr) carry no
/// escape codes; the refused config is still reported at its place, on a line of its own.
#[tokio::test]
async fn text_logs_to_a_pipe_have_no_colour() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (code, stderr) = serve_broken(dir.path(), &[], &[]).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("starting corral"), "{stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "an escape code on a pipe:\n{stderr:?}"
    );
    let place = format!("{}:6:10: ", dir.path().join("broken.yaml").display());
    assert!(
        stderr.lines().any(|line| line.starts_with(&place)),
        "{stderr}"
    );
}

/// On a terminal (a pseudo-terminal from `script`), text logs are coloured, unless `NO_COLOR`
/// is set.
#[tokio::test]
async fn text_logs_on_a_terminal_are_coloured_unless_no_color_is_set() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("broken.yaml");
    std::fs::write(&path, BROKEN).expect("write the config");
    let line = format!("{} serve --config {}", corral_bin(), path.display());
    let on_a_terminal = |no_color: Option<&str>| {
        let mut cmd = tokio::process::Command::new("script");
        // -q: no banner; -e: its exit code is the command's; the typescript goes nowhere.
        cmd.args(["-q", "-e", "-c", &line, "/dev/null"])
            .env_remove("CORRAL_LOG_FORMAT")
            .env_remove("NO_COLOR")
            .env("RUST_LOG", "corral=info")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(value) = no_color {
            cmd.env("NO_COLOR", value);
        }
        async move {
            let output = tokio::time::timeout(patience(), cmd.output())
                .await
                .expect("script exits")
                .expect("run script (util-linux) for a pseudo-terminal");
            String::from_utf8_lossy(&output.stdout).into_owned()
        }
    };
    let coloured = on_a_terminal(None).await;
    assert!(coloured.contains("starting corral"), "{coloured:?}");
    assert!(
        coloured.contains('\u{1b}'),
        "no colour on a terminal:\n{coloured:?}"
    );
    let plain = on_a_terminal(Some("1")).await;
    assert!(plain.contains("starting corral"), "{plain:?}");
    assert!(
        !plain.contains('\u{1b}'),
        "colour despite NO_COLOR:\n{plain:?}"
    );
}
