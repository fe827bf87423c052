//! The container deployment, tested without a container engine: the commands the image and the
//! compose file run (`corral healthcheck`, `corral demo-upstream`), and every file the compose
//! file mounts, each loaded by the program that will read it.

use crate::support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use regex::Regex;
use serde_json::Value;
use support::http::{Http, send_all};
use support::process::{ConfigFrom, CorralServe, corral_bin};
use support::proxy::fill;
use support::servers::{free_port, nats_bin, parse_nats_version, read_lossy, spawn_child};
use support::{TestRedis, eventually, patience};
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

/// A running `corral demo-upstream` process (killed when dropped).
struct DemoUpstream {
    addr: SocketAddr,
    _child: tokio::process::Child,
}

impl DemoUpstream {
    /// Runs `corral demo-upstream` on a port of its choosing and reads the address it prints.
    async fn start(delay: &str) -> DemoUpstream {
        let mut cmd = command(&["demo-upstream", "--listen", "127.0.0.1:0", "--delay", delay]);
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
        DemoUpstream {
            addr,
            _child: child,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// `corral demo-upstream` prints where it listens, takes `--delay` per answer, and answers JSON
/// whose `fetch` counts the requests it has answered, so every fetch through corral is visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_upstream_answers_slowly_with_a_fetch_counter() {
    let delay = Duration::from_millis(300);
    let upstream = DemoUpstream::start("300ms").await;
    let http = Http::new();
    for fetch in 1..=2u64 {
        let sent = Instant::now();
        let reply = http
            .get(format!("{}/reports/2024-q1", upstream.url()))
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
}

// ------------------------------------------------------------------ the files compose mounts ----

/// The repository's root.
fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// A YAML file of the repository as JSON values (every scalar a string). Anchors are not
/// supported, which keeps the compose file readable without them.
fn yaml(path: &str) -> Value {
    let node = marked_yaml::parse_yaml(0, read(path))
        .unwrap_or_else(|e| panic!("{path} is not plain YAML: {e}"));
    marked_yaml::from_node(&node).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every bind mount of the compose file, `(service, target) -> source`, after checking that
/// each source exists in the repository and each named volume is declared.
fn bind_mounts(compose: &Value) -> BTreeMap<(String, String), String> {
    let services = compose["services"].as_object().expect("services");
    let mut mounts = BTreeMap::new();
    for (name, service) in services {
        let Some(volumes) = service.get("volumes") else {
            continue;
        };
        for volume in volumes.as_array().expect("volumes is a list") {
            let spec = volume.as_str().expect("volumes in the short syntax");
            let mut parts = spec.split(':');
            let (source, target) = (
                parts.next().expect("a source"),
                parts
                    .next()
                    .unwrap_or_else(|| panic!("{name}: {spec:?} has no target")),
            );
            if source.starts_with("./") {
                assert!(
                    repo().join(source).exists(),
                    "{name} mounts {source}, which is not in the repository"
                );
                mounts.insert((name.clone(), target.to_owned()), source.to_owned());
            } else {
                assert!(
                    compose["volumes"].get(source).is_some(),
                    "{name} mounts the volume {source:?}, which is not declared"
                );
            }
        }
    }
    mounts
}

/// The compose file parses, has every service of the picture, and mounts only files that are
/// in the repository, at the places the programs inside read them.
#[test]
fn the_compose_file_mounts_files_that_exist_where_each_program_reads_them() {
    let compose = yaml("docker-compose.yml");
    let services = compose["services"].as_object().expect("services");
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    let wanted = [
        "corral-1",
        "corral-2",
        "corral-3",
        "lb",
        "upstream",
        "redis",
        "nats",
        "prometheus",
        "grafana",
    ];
    assert_eq!(names, BTreeSet::from(wanted));

    let mounts = bind_mounts(&compose);
    let mount = |service: &str, target: &str| {
        mounts
            .get(&(service.to_owned(), target.to_owned()))
            .map(String::as_str)
            .unwrap_or_else(|| panic!("{service} mounts nothing at {target}"))
    };
    for replica in ["corral-1", "corral-2", "corral-3"] {
        assert_eq!(
            mount(replica, "/etc/corral/corral.yaml"),
            "./deploy/corral/corral.yaml"
        );
    }
    assert_eq!(
        mount("lb", "/usr/local/etc/haproxy/haproxy.cfg"),
        "./deploy/lb/haproxy.cfg"
    );
    assert_eq!(
        mount("nats", "/etc/nats/nats.conf"),
        "./deploy/nats/nats.conf"
    );
    assert_eq!(
        mount("prometheus", "/etc/prometheus/prometheus.yml"),
        "./deploy/prometheus/prometheus.yml"
    );
    assert_eq!(
        mount("prometheus", "/etc/prometheus/alerts.yaml"),
        "./dashboards/alerts.yaml"
    );
    assert_eq!(
        mount("grafana", "/etc/grafana/provisioning/datasources"),
        "./deploy/grafana/provisioning/datasources"
    );
    assert_eq!(
        mount("grafana", "/etc/grafana/provisioning/dashboards"),
        "./deploy/grafana/provisioning/dashboards"
    );
    let dashboard = "/var/lib/grafana/dashboards/corral.json";
    assert_eq!(mount("grafana", dashboard), "./dashboards/corral.json");

    // Grafana loads the dashboard from where it is mounted, with the datasource it names.
    let provider = yaml("deploy/grafana/provisioning/dashboards/corral.yaml");
    assert_eq!(
        provider["providers"][0]["options"]["path"],
        "/var/lib/grafana/dashboards"
    );
    assert_eq!(provider["providers"][0]["type"], "file");
    let datasource =
        &yaml("deploy/grafana/provisioning/datasources/prometheus.yaml")["datasources"][0];
    assert_eq!(datasource["uid"], "prometheus");
    assert_eq!(datasource["type"], "prometheus");
    assert_eq!(datasource["url"], "http://prometheus:9090");

    // The replicas differ only by name, so none drifts from the others.
    assert_eq!(services["corral-2"], services["corral-1"]);
    assert_eq!(services["corral-3"], services["corral-1"]);
    // The load balancer is the one published port of the proxy.
    assert_eq!(services["lb"]["ports"], serde_json::json!(["8080:8080"]));
    assert!(services["corral-1"].get("ports").is_none());
    // The demo upstream runs from the same image, without the image's corral health check.
    assert_eq!(services["upstream"]["command"][0], "demo-upstream");
    assert_eq!(services["upstream"]["healthcheck"]["disable"], "true");
    // NATS keeps JetStream in the declared volume.
    assert_eq!(services["nats"]["environment"]["NATS_STORE_DIR"], "/data");
    assert!(
        services["nats"]["volumes"]
            .as_array()
            .expect("nats volumes")
            .contains(&Value::from("nats-data:/data"))
    );
}

/// Compose gives each replica more time to stop than its drain can take with the deployment's
/// config, so a `docker compose stop` or a rolling update never kills one mid-drain.
#[test]
fn the_compose_stop_grace_period_covers_the_drain() {
    let compose = yaml("docker-compose.yml");
    let config = corral::config::parse(
        &read("deploy/corral/corral.yaml"),
        "deploy/corral/corral.yaml",
    )
    .expect("the deployment's config parses with its defaults");
    let drain = corral::server::drain_bound(&config.limits);
    for replica in ["corral-1", "corral-2", "corral-3"] {
        let period = compose["services"][replica]["stop_grace_period"]
            .as_str()
            .unwrap_or_else(|| panic!("{replica} has no stop_grace_period"));
        let period = corral::config::parse_duration(period)
            .unwrap_or_else(|e| panic!("{replica}: stop_grace_period {period:?}: {e}"));
        assert!(
            period >= drain,
            "{replica}: stop_grace_period {period:?} is shorter than the drain ({drain:?})"
        );
    }
}

/// The load balancer sends to exactly the compose file's replicas, on the port they listen on.
#[test]
fn the_load_balancer_sends_to_every_replica() {
    let compose = yaml("docker-compose.yml");
    let replicas: BTreeSet<String> = compose["services"]
        .as_object()
        .expect("services")
        .keys()
        .filter(|name| name.starts_with("corral-"))
        .cloned()
        .collect();
    let server = Regex::new(r"(?m)^\s*server\s+(\S+)\s+(\S+):(\d+)").expect("a valid pattern");
    let haproxy = read("deploy/lb/haproxy.cfg");
    let mut servers = BTreeSet::new();
    for found in server.captures_iter(&haproxy) {
        assert_eq!(found[1], found[2], "each server is named after its host");
        assert_eq!(&found[3], "8080", "the replicas' public port");
        servers.insert(found[2].to_owned());
    }
    assert_eq!(servers, replicas);
    assert!(
        haproxy.contains("uri /readyz") && haproxy.contains("check port 8081"),
        "health checks ask /readyz on the admin port"
    );
}

/// `haproxy -c` accepts the load balancer config. Outside the compose network the replicas'
/// names do not resolve, which it may only warn about.
#[tokio::test]
async fn haproxy_accepts_the_load_balancer_config() {
    let haproxy = std::env::var("CORRAL_HAPROXY").unwrap_or_else(|_| "haproxy".into());
    let mut cmd = tokio::process::Command::new(&haproxy);
    cmd.arg("-c")
        .arg("-f")
        .arg(repo().join("deploy/lb/haproxy.cfg"))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let checked = run(cmd).await;
    assert_eq!(
        checked.code,
        Some(0),
        "haproxy -c refused the config ({haproxy}; scripts/test installs it):\n{checked:#?}"
    );
    let said = format!("{}{}", checked.stdout, checked.stderr);
    assert!(said.contains("Configuration file is valid"), "{said}");
    for line in said.lines().filter(|line| line.contains("WARNING")) {
        assert!(
            line.contains("could not resolve address"),
            "an unexpected warning: {line}"
        );
    }
}

/// The Dockerfile builds what Cargo.toml declares and runs the image the way the compose file
/// and docs/operations.md say.
#[test]
fn the_dockerfile_matches_the_manifest_and_the_deployment() {
    let dockerfile = read("Dockerfile");
    // The dependency layer: from the build stage's start to its first `cargo build`. It copies
    // only the manifest, the lockfile and scripts/placeholders, and the RUN that holds that
    // `cargo build` runs the script first.
    let stage = dockerfile.find(" AS build").expect("a build stage");
    let first_build = stage
        + dockerfile[stage..]
            .find("cargo build")
            .expect("a cargo build in the build stage");
    let layer = &dockerfile[stage..first_build];
    let mut copied = BTreeSet::new();
    let mut script_at = None;
    for copy in layer.lines().filter_map(|line| line.strip_prefix("COPY ")) {
        let words: Vec<&str> = copy.split_whitespace().collect();
        let (destination, sources) = words.split_last().expect("a COPY with arguments");
        for source in sources {
            copied.insert(*source);
            if *source == "scripts/placeholders" {
                script_at = Some(*destination);
            }
        }
    }
    assert_eq!(
        copied,
        BTreeSet::from(["Cargo.lock", "Cargo.toml", "scripts/placeholders"]),
        "the dependency layer copies the manifest, the lockfile and the placeholder script, nothing else"
    );
    let script_at = script_at.expect("scripts/placeholders copied into the build stage");
    let run = layer
        .rfind("\nRUN ")
        .expect("a RUN before the first cargo build")
        + 1;
    let command = &layer[run..];
    assert!(
        command
            .lines()
            .skip(1)
            .all(|line| line.starts_with(char::is_whitespace)),
        "the first cargo build is in the RUN that runs the placeholder script:\n{command}"
    );
    let runs_script = Regex::new(&format!(r"^RUN (?:sh )?{} \.\s", regex::escape(script_at)))
        .expect("a valid pattern");
    assert!(
        runs_script.is_match(command),
        "the dependency layer's RUN starts with the placeholder script ({script_at}) over the \
         manifest:\n{command}"
    );

    // The script, run on a copy of Cargo.toml alone (all the dependency layer has), leaves a file
    // at every target the manifest declares. cargo metadata names each target's file, but leaves
    // out a target without a `path` whose default file is missing (where `cargo build` refuses
    // the manifest), so the targets are also read from the manifest's tables and compared.
    let placeholder_dir = tempfile::Builder::new()
        .prefix("corral-placeholders-")
        .tempdir()
        .expect("a temporary directory");
    // cargo names the targets' files by the directory's canonical path.
    let dir = placeholder_dir
        .path()
        .canonicalize()
        .expect("the temporary directory's path");
    let dir = dir.as_path();
    std::fs::copy(repo().join("Cargo.toml"), dir.join("Cargo.toml")).expect("copy Cargo.toml");
    let made = std::process::Command::new("sh")
        .arg(repo().join("scripts/placeholders"))
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/placeholders");
    assert!(made.status.success(), "scripts/placeholders: {made:?}");
    let manifest = read("Cargo.toml");
    let declared = declared_targets(&manifest);
    assert!(
        declared.contains(&("bin".to_owned(), "corral".to_owned())),
        "Cargo.toml declares the corral binary the image builds: {declared:?}"
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let metadata = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--no-deps",
            "--offline",
            "--format-version",
            "1",
        ])
        .arg("--manifest-path")
        .arg(dir.join("Cargo.toml"))
        .stdin(Stdio::null())
        .output()
        .expect("run cargo metadata");
    assert!(metadata.status.success(), "cargo metadata: {metadata:?}");
    let metadata: Value = serde_json::from_slice(&metadata.stdout).expect("cargo metadata's JSON");
    let mut found = BTreeSet::new();
    for target in metadata["packages"][0]["targets"]
        .as_array()
        .expect("the targets")
    {
        let kind = target["kind"][0].as_str().expect("a kind").to_owned();
        let name = target["name"].as_str().expect("a name").to_owned();
        let file = PathBuf::from(target["src_path"].as_str().expect("a source path"));
        assert!(
            file.starts_with(dir),
            "{kind} {name} lies outside the build directory: {}",
            file.display()
        );
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| {
            panic!(
                "no placeholder for {kind} {name} at {}: {e}",
                file.display()
            )
        });
        if kind != "lib" {
            assert!(text.contains("fn main() {}"), "{kind} {name}: {text:?}");
        }
        // A [lib] is named after the package unless it says otherwise.
        let name = if kind == "lib" { String::new() } else { name };
        found.insert((kind, name));
    }
    assert_eq!(
        found, declared,
        "the targets cargo sees over the placeholders"
    );

    // Every source the build context must hold (a COPY's words but the last, the destination).
    for copy in dockerfile
        .lines()
        .filter_map(|line| line.strip_prefix("COPY "))
        .filter(|args| !args.starts_with("--from="))
    {
        let words: Vec<&str> = copy.split_whitespace().collect();
        for source in &words[..words.len() - 1] {
            assert!(
                repo().join(source).exists(),
                "the Dockerfile copies {source}, which is not in the repository"
            );
        }
    }
    for line in [
        "ENV CORRAL_CONFIG=/etc/corral/corral.yaml",
        "USER corral",
        "EXPOSE 8080 8081",
        "CMD [\"corral\", \"healthcheck\"]",
        "COPY deploy/corral/corral.yaml /etc/corral/corral.yaml",
    ] {
        assert!(dockerfile.contains(line), "the Dockerfile has {line:?}");
    }
    let ignored = read(".dockerignore");
    assert!(ignored.lines().any(|line| line == "target/"));
}

/// The targets a manifest declares in its tables, `(kind, name)`: `[lib]` (with an empty name)
/// and each `[[bin]]`, `[[bench]]`, `[[example]]` and `[[test]]`.
fn declared_targets(manifest: &str) -> BTreeSet<(String, String)> {
    let name = Regex::new(r#"^name\s*=\s*["']([^"']+)["']"#).expect("a valid pattern");
    let mut targets = BTreeSet::new();
    let mut kind: Option<String> = None;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            let header: String = line
                .split('#')
                .next()
                .unwrap_or_default()
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect();
            kind = match header.as_str() {
                "[lib]" => {
                    targets.insert(("lib".to_owned(), String::new()));
                    None
                }
                "[[bin]]" | "[[bench]]" | "[[example]]" | "[[test]]" => {
                    Some(header.trim_matches(|c| c == '[' || c == ']').to_owned())
                }
                _ => None,
            };
        } else if let (Some(kind), Some(found)) = (&kind, name.captures(line)) {
            targets.insert((kind.clone(), found[1].to_owned()));
        }
    }
    targets
}

// ------------------------------------------------------------------ corral, NATS, together ----

/// The environment the compose file gives `service`.
fn compose_env(service: &str) -> Vec<(String, String)> {
    let compose = yaml("docker-compose.yml");
    compose["services"][service]["environment"]
        .as_object()
        .unwrap_or_else(|| panic!("{service} has an environment mapping"))
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().expect("a string").to_owned()))
        .collect()
}

/// `corral check` accepts the replicas' config with the environment the compose file sets.
#[tokio::test]
async fn the_deploy_config_passes_corral_check_with_the_compose_environment() {
    let mut cmd = command(&["check", "--config"]);
    cmd.arg(repo().join("deploy/corral/corral.yaml"));
    for name in ["REDIS_URL", "NATS_URL", "UPSTREAM_URL", "CORRAL_NAMESPACE"] {
        cmd.env_remove(name);
    }
    cmd.envs(compose_env("corral-1"));
    let checked = run(cmd).await;
    assert_eq!(checked.code, Some(0), "{checked:#?}");
    for expected in [
        "redis://redis:6379/",
        "nats://nats:4222",
        "http://upstream:9000",
    ] {
        assert!(
            checked.stdout.contains(expected),
            "{expected} in:\n{}",
            checked.stdout
        );
    }
}

/// A `nats-server` running `deploy/nats/nats.conf` as it is, on ports of the test's choosing
/// (flags override the file's ports); stopped by its own PID when dropped.
struct DeployNats {
    child: std::process::Child,
    client: u16,
    monitor: u16,
    dir: tempfile::TempDir,
}

impl DeployNats {
    async fn start() -> DeployNats {
        let dir = tempfile::Builder::new()
            .prefix("corral-deploy-nats-")
            .tempdir()
            .expect("a temporary directory");
        let (client, monitor) = (free_port(), free_port());
        let log = std::fs::File::create(dir.path().join("nats.log")).expect("a log file");
        let mut cmd = std::process::Command::new(nats_bin());
        cmd.arg("-c")
            .arg(repo().join("deploy/nats/nats.conf"))
            .args(["-a", "127.0.0.1", "-p", &client.to_string()])
            .args(["-m", &monitor.to_string()])
            .env("NATS_STORE_DIR", dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log);
        let child = spawn_child(cmd).expect("run nats-server");
        let nats = DeployNats {
            child,
            client,
            monitor,
            dir,
        };
        eventually("nats-server answers /varz", || async {
            nats.varz().await.is_some()
        })
        .await;
        nats
    }

    /// The server's `/varz` (monitoring), or `None` while it does not answer.
    async fn varz(&self) -> Option<Value> {
        let reply = Http::new()
            .get(format!("http://127.0.0.1:{}/varz", self.monitor))
            .try_send()
            .await
            .ok()?;
        (reply.status == 200).then(|| reply.json())
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client)
    }

    fn log(&self) -> String {
        read_lossy(&self.dir.path().join("nats.log"))
    }
}

impl Drop for DeployNats {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- nats-server (deploy/nats/nats.conf) ----\n{}",
                self.log()
            );
        }
        // Child::kill signals this child's own PID, and only while it is unreaped.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nats-server accepts `deploy/nats/nats.conf` (`-t`) and runs it: version 2.11 or newer,
/// JetStream on with every write synced, and the raised `max_payload`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_runs_the_deploy_config_with_jetstream_synced_on_every_write() {
    let mut test = tokio::process::Command::new(nats_bin());
    test.arg("-t")
        .arg("-c")
        .arg(repo().join("deploy/nats/nats.conf"))
        .env("NATS_STORE_DIR", std::env::temp_dir())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let tested = run(test).await;
    assert_eq!(tested.code, Some(0), "{tested:#?}");

    let nats = DeployNats::start().await;
    let varz = nats.varz().await.expect("/varz");
    let version = parse_nats_version(varz["version"].as_str().expect("a version"))
        .expect("a parsable version");
    assert!(version >= (2, 11, 0), "{version:?}");
    let jetstream = &varz["jetstream"]["config"];
    assert_eq!(jetstream["sync_always"], true, "{varz:#}");
    assert!(
        jetstream["store_dir"]
            .as_str()
            .is_some_and(|dir| Path::new(dir).starts_with(nats.dir.path())),
        "JetStream stores under $NATS_STORE_DIR: {jetstream}"
    );
    assert_eq!(varz["max_payload"], 8 * 1024 * 1024);
}

/// The compose picture without containers: three `corral serve` processes on the deployment's
/// config and the compose environment (with the servers' addresses swapped for local ones), NATS
/// on the deployment's config, a real Redis, and `corral demo-upstream` behind them. A burst
/// spread over the replicas reaches the upstream once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_compose_picture_runs_without_containers() {
    let (redis, nats) = tokio::join!(TestRedis::start(), DeployNats::start());
    let upstream = DemoUpstream::start("300ms").await;
    let dir = tempfile::Builder::new()
        .prefix("corral-deploy-")
        .tempdir()
        .expect("a temporary directory");

    let mut replicas = Vec::new();
    for name in ["corral-1", "corral-2", "corral-3"] {
        // A byte-for-byte copy: each replica's process output lands beside its config.
        let config: PathBuf = dir.path().join(format!("{name}.yaml"));
        std::fs::copy(repo().join("deploy/corral/corral.yaml"), &config)
            .expect("copy the deploy config");
        let (public, admin) = (loopback(free_port()), loopback(free_port()));
        let mut env = compose_env(name);
        for (key, value) in &mut env {
            match key.as_str() {
                "REDIS_URL" => *value = redis.url(),
                "NATS_URL" => *value = nats.url(),
                "UPSTREAM_URL" => *value = upstream.url(),
                _ => {}
            }
        }
        env.push(("CORRAL_LISTEN".into(), public.to_string()));
        env.push(("CORRAL_ADMIN_LISTEN".into(), admin.to_string()));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        replicas
            .push(CorralServe::start_with_env(&config, public, admin, ConfigFrom::Env, &env).await);
    }

    let http = Http::new();
    let replies =
        send_all((0..60).map(|i| http.get(format!("{}/reports/burst", replicas[i % 3].url()))))
            .await;
    let mut misses = 0;
    for reply in &replies {
        assert_eq!(reply.status, 200, "{:?}", reply.text());
        assert_eq!(
            reply.json()["fetch"],
            1,
            "one upstream fetch for the whole burst"
        );
        misses += usize::from(reply.x_cache() == "MISS");
    }
    assert_eq!(misses, 1, "one replica fetched; the others coalesced");
}
