//! The Kubernetes manifests of `deploy/kubernetes/`, tested without a cluster:
//!
//! - every manifest passes the Kubernetes API schemas, strictly (unknown fields refused), with the
//!   offline validator `kubernetes-validate` (`scripts/install-kubernetes-validate` pins it; the
//!   test finds it at `CORRAL_KUBERNETES_VALIDATE` or in `.tools/`);
//! - the pieces agree with each other and with the code: probes on the admin port the config
//!   listens on, a termination grace longer than the drain, a Secret with every key the pods read,
//!   selectors that select the pods;
//! - the ConfigMap's embedded config passes `corral check`.

use crate::support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use support::process::corral_bin;

const DIR: &str = "deploy/kubernetes";

/// Where the pods find the Secret's files; the `corral check` test puts them elsewhere.
const SECRETS_DIR: &str = "/run/secrets/corral/";

/// Kinds the Kubernetes schemas do not cover, and why each is checked another way.
const NOT_IN_THE_SCHEMAS: [(&str, &str); 2] = [
    (
        "Kustomization",
        "kustomize's own file, not an API object; its resources are checked to exist",
    ),
    (
        "ServiceMonitor",
        "a Prometheus Operator CRD, whose schema the validator does not ship; checked against the Service below",
    ),
];

/// Seconds a drain takes after `limits.shutdown_grace` at most: closing connections and the last
/// answers (docs/operations.md, "Shutdown": "at most shutdown_grace plus about 7 s").
const DRAIN_AFTER_GRACE_SECS: u64 = 7;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// A YAML text as JSON values (every scalar a string).
fn parse(name: &str, text: &str) -> Value {
    let node = marked_yaml::parse_yaml(0, text)
        .unwrap_or_else(|e| panic!("{name} is not plain YAML: {e}"));
    marked_yaml::from_node(&node).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn manifest(file: &str) -> Value {
    let path = format!("{DIR}/{file}");
    parse(&path, &read(&path))
}

/// Every `.yaml` file of the directory, by name.
fn manifest_files() -> BTreeSet<String> {
    std::fs::read_dir(repo().join(DIR))
        .expect("deploy/kubernetes exists")
        .map(|entry| entry.expect("a directory entry").file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml"))
        .collect()
}

fn validator() -> PathBuf {
    std::env::var_os("CORRAL_KUBERNETES_VALIDATE")
        .filter(|v| !v.is_empty())
        .map_or_else(
            || repo().join(".tools/kubernetes-validate/bin/kubernetes-validate"),
            PathBuf::from,
        )
}

/// Runs the validator, strictly, on `files`.
fn validate(files: &[PathBuf]) -> Output {
    let bin = validator();
    Command::new(&bin)
        .arg("--strict")
        .args(files)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "could not run {}: {e} (run scripts/install-kubernetes-validate or scripts/test, \
                 or set CORRAL_KUBERNETES_VALIDATE)",
                bin.display()
            )
        })
}

fn printed(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn str_of<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {value}"))
}

fn number(value: &Value, what: &str) -> u64 {
    str_of(value, what)
        .parse()
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Every manifest but those [`NOT_IN_THE_SCHEMAS`] passes the Kubernetes 1.37 schemas, unknown
/// fields refused; together they hold what a deployment needs.
#[test]
fn every_manifest_passes_the_kubernetes_schemas() {
    let skipped: BTreeSet<&str> = NOT_IN_THE_SCHEMAS.iter().map(|(kind, _)| *kind).collect();
    let mut kinds = BTreeSet::new();
    let mut files = Vec::new();
    for file in manifest_files() {
        let kind = str_of(&manifest(&file)["kind"], &file).to_owned();
        if !skipped.contains(kind.as_str()) {
            files.push(repo().join(DIR).join(&file));
        }
        kinds.insert(kind);
    }
    for needed in [
        "ConfigMap",
        "Deployment",
        "Kustomization",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "ServiceMonitor",
    ] {
        assert!(kinds.contains(needed), "no {needed} in {kinds:?}");
    }
    let output = validate(&files);
    let text = printed(&output);
    assert!(output.status.success(), "kubernetes-validate:\n{text}");
    let passed = text
        .lines()
        .filter(|line| line.contains(" passed "))
        .count();
    assert_eq!(passed, files.len(), "one pass per manifest:\n{text}");
}

/// The validator is no rubber stamp: it refuses a Deployment with a wrong type or an unknown
/// field.
#[test]
fn the_validator_refuses_a_broken_deployment() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let shipped = read(&format!("{DIR}/deployment.yaml"));
    let broken = [
        (
            "a wrong type",
            shipped.replace("replicas: 3", "replicas: three"),
        ),
        (
            "an unknown field",
            shipped.replace("  replicas: 3", "  replicas: 3\n  replica: 3"),
        ),
    ];
    for (what, text) in broken {
        assert_ne!(text, shipped, "{what}: the edit applied");
        let path = dir.path().join("deployment.yaml");
        std::fs::write(&path, text).expect("write the broken copy");
        let output = validate(&[path]);
        assert!(
            !output.status.success(),
            "{what} passed:\n{}",
            printed(&output)
        );
    }
}

/// The config the ConfigMap carries, as the pods read it.
fn embedded_config() -> String {
    let configmap = manifest("configmap.yaml");
    str_of(&configmap["data"]["corral.yaml"], "data.corral.yaml").to_owned()
}

/// A duration of the config in whole seconds (`10s`).
fn seconds(text: &str) -> u64 {
    let digits = text
        .strip_suffix('s')
        .unwrap_or_else(|| panic!("{text} is not in seconds"));
    digits.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
}

/// The corral container of the Deployment.
fn container(deployment: &Value) -> &Value {
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(containers.len(), 1, "one container");
    &containers[0]
}

/// The Deployment agrees with the code and the config it runs: three replicas, readiness on
/// `/readyz` and liveness on `/healthz` at the admin port the config listens on, a termination
/// grace longer than the preStop pause and the whole drain, a memory request that holds the L1,
/// non-root with a read-only root filesystem.
#[test]
fn the_deployment_agrees_with_the_config_and_the_drain() {
    let deployment = manifest("deployment.yaml");
    let config = parse("corral.yaml", &embedded_config());
    assert_eq!(deployment["spec"]["replicas"], "3");
    let corral = container(&deployment);

    let admin = str_of(&config["admin"]["listen"], "admin.listen");
    assert_eq!(
        admin, "0.0.0.0:8081",
        "the admin listener, reachable by the kubelet"
    );
    let ports: Vec<(&str, &str)> = corral["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| {
            (
                str_of(&p["name"], "port name"),
                str_of(&p["containerPort"], "port"),
            )
        })
        .collect();
    assert_eq!(ports, [("http", "8080"), ("admin", "8081")]);
    let listen = str_of(&config["listen"], "listen");
    assert!(listen.ends_with(":8080"), "{listen}");
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &corral[probe]["httpGet"];
        assert_eq!(
            (&get["path"], &get["port"]),
            (&Value::from(path), &Value::from("admin"))
        );
    }

    let pod = &deployment["spec"]["template"]["spec"];
    let grace = number(
        &pod["terminationGracePeriodSeconds"],
        "the termination grace",
    );
    let pause = corral["lifecycle"]["preStop"]["exec"]["command"]
        .as_array()
        .expect("a preStop command");
    assert_eq!(pause[0], "sleep", "{pause:?}");
    let pause = number(&pause[1], "the preStop pause");
    let shutdown_grace = config["limits"]["shutdown_grace"]
        .as_str()
        .map_or(10, seconds);
    let drain = pause + shutdown_grace + DRAIN_AFTER_GRACE_SECS;
    assert!(grace > drain, "grace {grace}s, drain up to {drain}s");

    let l1 = str_of(&config["l1"]["max_bytes"], "l1.max_bytes");
    let requested = str_of(&corral["resources"]["requests"]["memory"], "memory request");
    let mib = |text: &str, suffix: &str| -> u64 {
        text.strip_suffix(suffix)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{text} is not in {suffix}"))
    };
    assert!(
        mib(requested, "Mi") > mib(l1, "MiB"),
        "{requested} for an L1 of {l1}"
    );
    let limit = str_of(&corral["resources"]["limits"]["memory"], "memory limit");
    assert!(mib(limit, "Mi") > mib(requested, "Mi"));

    assert_eq!(pod["securityContext"]["runAsNonRoot"], "true");
    let security = &corral["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], "true");
    assert_eq!(security["allowPrivilegeEscalation"], "false");
}

/// Every secret the pods read is a key of the Secret's example (which carries no real value), and
/// every file the config names under the Secret's mount is one the Deployment mounts.
#[test]
fn the_secret_holds_every_key_the_pods_read() {
    let deployment = manifest("deployment.yaml");
    let secret = manifest("secret.example.yaml");
    let keys: BTreeSet<&str> = secret["stringData"]
        .as_object()
        .expect("stringData")
        .iter()
        .map(|(key, value)| {
            assert_eq!(value, "REPLACE-ME", "{key}: no value is committed");
            key.as_str()
        })
        .collect();
    let secret_name = str_of(&secret["metadata"]["name"], "the Secret's name");

    let mut read = BTreeSet::new();
    for env in container(&deployment)["env"].as_array().expect("env") {
        if let Some(reference) = env["valueFrom"].get("secretKeyRef") {
            assert_eq!(reference["name"], secret_name);
            read.insert(str_of(&reference["key"], "secret key"));
        }
    }
    let volumes = deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .expect("volumes");
    let mut mounted = BTreeSet::new();
    for volume in volumes {
        if let Some(from) = volume.get("secret") {
            assert_eq!(from["secretName"], secret_name);
            for item in from["items"].as_array().expect("items") {
                read.insert(str_of(&item["key"], "item key"));
                mounted.insert(format!(
                    "{SECRETS_DIR}{}",
                    str_of(&item["path"], "item path")
                ));
            }
        }
    }
    assert_eq!(read, keys, "the pods read exactly the Secret's keys");

    let config = embedded_config();
    let named: BTreeSet<String> = config
        .split_whitespace()
        .filter(|word| word.starts_with(SECRETS_DIR))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        named, mounted,
        "the config reads the files the Deployment mounts"
    );
}

fn labels(value: &Value) -> Vec<(String, String)> {
    value
        .as_object()
        .unwrap_or_else(|| panic!("labels: {value}"))
        .iter()
        .map(|(k, v)| (k.clone(), str_of(v, k).to_owned()))
        .collect()
}

fn selects(selector: &Value, pod: &[(String, String)]) -> bool {
    labels(selector).iter().all(|label| pod.contains(label))
}

/// The Service, the PodDisruptionBudget and the ServiceMonitor select the Deployment's pods and
/// its admin port; kustomize applies every manifest but the Secret's example.
#[test]
fn the_selectors_and_ports_join_up() {
    let deployment = manifest("deployment.yaml");
    let pod = labels(&deployment["spec"]["template"]["metadata"]["labels"]);
    assert!(selects(
        &deployment["spec"]["selector"]["matchLabels"],
        &pod
    ));

    let service = manifest("service.yaml");
    assert!(selects(&service["spec"]["selector"], &pod), "the Service");
    let budget = manifest("poddisruptionbudget.yaml");
    assert!(
        selects(&budget["spec"]["selector"]["matchLabels"], &pod),
        "the budget"
    );
    assert_eq!(budget["spec"]["maxUnavailable"], "1");

    let monitor = manifest("servicemonitor.yaml");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    let service_labels = labels(&service["metadata"]["labels"]);
    assert!(
        selects(&monitor["spec"]["selector"]["matchLabels"], &service_labels),
        "the ServiceMonitor selects the Service"
    );
    let endpoints = monitor["spec"]["endpoints"].as_array().expect("endpoints");
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0]["path"], "/metrics");
    let port = str_of(&endpoints[0]["port"], "the scraped port");
    let service_port = service["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == port)
        .unwrap_or_else(|| panic!("the Service has no port {port}"));
    assert_eq!(service_port["targetPort"], "admin");

    let kustomization = manifest("kustomization.yaml");
    let resources: BTreeSet<String> = kustomization["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| str_of(r, "resource").to_owned())
        .collect();
    let mut expected = manifest_files();
    expected.remove("kustomization.yaml");
    expected.remove("secret.example.yaml");
    assert_eq!(resources, expected);
}

/// `corral check` accepts the ConfigMap's config with the Secret's files and the admin token
/// the pods get.
#[test]
fn the_configmap_config_passes_corral_check() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let secrets = format!("{}/", dir.path().display());
    for file in ["redis-password", "nats-token"] {
        std::fs::write(dir.path().join(file), "not-a-real-secret").expect("write a secret file");
    }
    let config = embedded_config();
    assert!(config.contains(SECRETS_DIR));
    let path = dir.path().join("corral.yaml");
    std::fs::write(&path, config.replace(SECRETS_DIR, &secrets)).expect("write the config");
    let output = Command::new(corral_bin())
        .args(["check", "--config"])
        .arg(&path)
        .env_remove("CORRAL_CONFIG")
        .env("CORRAL_ADMIN_TOKEN", "a-token")
        .stdin(Stdio::null())
        .output()
        .expect("run corral check");
    let text = printed(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    for expected in [
        "redis://redis:6379/0",
        "nats://nats:4222",
        "http://api:9000",
    ] {
        assert!(text.contains(expected), "{expected} in:\n{text}");
    }
    assert!(
        !text.contains("not-a-real-secret"),
        "a secret printed:\n{text}"
    );
}
