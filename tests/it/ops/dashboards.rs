//! The shipped Grafana dashboard and Prometheus files, proven on a real Prometheus.
//!
//! - Every query of every panel of `dashboards/corral.json` returns data from a Prometheus that
//!   scraped three replicas during a short run (`support::workload`), with the shipped
//!   `deploy/prometheus/prometheus.yml` (its targets and intervals changed for the test).
//! - `promtool check rules`, `check config` and `test rules` pass on the shipped files, and the
//!   real Prometheus loads and evaluates every alert.

use crate::support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;
use support::eventually;
use support::prometheus::{TestPrometheus, promtool, sample_value};
use support::workload::Workload;

/// What the test puts for Grafana's variables: every route and replica, and the range a
/// dashboard uses at the default 15s scrape interval (widened to cover the whole run).
const VARIABLES: [(&str, &str); 10] = [
    ("${datasource}", "prometheus"),
    ("$__rate_interval", "2m"),
    ("${__rate_interval}", "2m"),
    ("$__interval", "15s"),
    ("${__interval}", "15s"),
    ("$__range", "5m"),
    ("${route}", ".*"),
    ("$route", ".*"),
    ("${instance}", ".*"),
    ("$instance", ".*"),
];

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// Replaces `from` (which must be there) with `to`.
fn edited(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from:?} is not in:\n{text}");
    text.replace(from, to)
}

/// The shipped Prometheus config, pointed at the test's replicas, scraping and evaluating every
/// second, with the rules file beside it.
fn prometheus_config(targets: &[String]) -> String {
    let shipped = read("deploy/prometheus/prometheus.yml");
    let quoted: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
    let config = edited(
        &shipped,
        r#"targets: ["corral-1:8081", "corral-2:8081", "corral-3:8081"]"#,
        &format!("targets: [{}]", quoted.join(", ")),
    );
    let config = edited(&config, "scrape_interval: 15s", "scrape_interval: 1s");
    let config = edited(
        &config,
        "evaluation_interval: 15s",
        "evaluation_interval: 1s",
    );
    edited(&config, "/etc/prometheus/alerts.yaml", "alerts.yaml")
}

/// Every panel's queries, as (panel title, expression), rows' nested panels included.
fn panel_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut queries = Vec::new();
    let mut panels: Vec<&Value> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .collect();
    let mut seen = 0;
    while let Some(panel) = panels.pop() {
        seen += 1;
        assert!(seen < 1000, "more panels than a dashboard should have");
        if let Some(nested) = panel["panels"].as_array() {
            panels.extend(nested);
        }
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().expect("every panel has a title");
        let targets = panel["targets"].as_array();
        assert!(
            targets.is_some_and(|t| !t.is_empty()),
            "panel {title:?} has no query"
        );
        for target in targets.into_iter().flatten() {
            assert_eq!(
                target["datasource"]["uid"], "${datasource}",
                "panel {title:?}: every query uses the datasource variable"
            );
            let expr = target["expr"].as_str().expect("every target has an expr");
            queries.push((title.to_owned(), expr.to_owned()));
        }
    }
    queries
}

/// `expr` with the dashboard's variables replaced as Grafana would for "All".
fn substituted(expr: &str) -> String {
    let mut text = expr.to_owned();
    for (name, value) in VARIABLES {
        text = text.replace(name, value);
    }
    assert!(!text.contains('$'), "an unknown variable is left in {text}");
    text
}

/// Waits (bounded) until Prometheus has what `expr` asks for: a non-empty result whose every
/// value passes `ok`.
async fn wait_until(prometheus: &TestPrometheus, what: &str, expr: &str, ok: fn(f64) -> bool) {
    eventually(what, || async {
        let values = prometheus.values(expr).await;
        !values.is_empty() && values.iter().all(|v| ok(*v))
    })
    .await;
}

/// Seconds since the Unix epoch, by the wall clock (Prometheus's timestamps).
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}

/// A real Prometheus scrapes three replicas during the run; then every query of every panel of
/// the dashboard returns data (at least one number, not NaN), and every template variable lists
/// values. A query that returns nothing fails with its panel's title and the expression.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_dashboard_panel_returns_data_from_a_real_prometheus() {
    let dashboard: Value = serde_json::from_str(&read("dashboards/corral.json"))
        .expect("dashboards/corral.json is JSON");
    let queries = panel_queries(&dashboard);
    assert!(queries.len() >= 20, "{} queries", queries.len());

    let work = Workload::start().await;
    let targets: Vec<String> = (0..work.proxy.len())
        .map(|i| {
            work.proxy
                .admin_url(i)
                .trim_start_matches("http://")
                .to_owned()
        })
        .collect();
    let prometheus = TestPrometheus::start(
        &prometheus_config(&targets),
        &[("alerts.yaml", &read("dashboards/alerts.yaml"))],
    )
    .await;
    wait_until(
        &prometheus,
        "Prometheus scrapes all three replicas",
        r#"count(up{job="corral"} == 1) == 3"#,
        |n| n == 3.0,
    )
    .await;
    // Two scrapes of every replica before the run, so every rate starts from a sample.
    let before = unix_now();
    eventually("every replica is scraped twice before the run", || async {
        let values = prometheus
            .values(r#"min(timestamp(corral_build_info{job="corral"}))"#)
            .await;
        values.first().is_some_and(|t| *t > before + 1.0)
    })
    .await;

    work.run().await;

    // Every replica scraped again after the run ended.
    let ended = unix_now();
    eventually("every replica is scraped after the run", || async {
        let values = prometheus
            .values(r#"min(timestamp(corral_build_info{job="corral"}))"#)
            .await;
        values.first().is_some_and(|t| *t > ended)
    })
    .await;

    let mut empty = Vec::new();
    for (title, expr) in &queries {
        let query = substituted(expr);
        match prometheus.query(&query).await {
            Err(error) => empty.push(format!("panel {title:?}: {error}\n    {query}")),
            Ok(result) if result.is_empty() => {
                empty.push(format!("panel {title:?} returned nothing:\n    {query}"));
            }
            Ok(result) if result.iter().all(|s| sample_value(s).is_nan()) => {
                empty.push(format!("panel {title:?} returned only NaN:\n    {query}"));
            }
            Ok(_) => {}
        }
    }
    assert!(
        empty.is_empty(),
        "{} of {} panel queries show no data:\n{}",
        empty.len(),
        queries.len(),
        empty.join("\n")
    );

    // The annotations' queries run, and the run's purge (by URL) shows as one.
    let annotations = dashboard["annotations"]["list"]
        .as_array()
        .expect("annotations");
    let names: BTreeSet<&str> = annotations
        .iter()
        .filter_map(|a| a["name"].as_str())
        .collect();
    assert_eq!(names, BTreeSet::from(["Config reloads", "Purges"]));
    for annotation in annotations {
        let name = annotation["name"].as_str().expect("an annotation's name");
        assert_eq!(annotation["datasource"]["uid"], "${datasource}", "{name}");
        let query = substituted(annotation["expr"].as_str().expect("an annotation's expr"));
        let result = (prometheus.query(&query).await)
            .unwrap_or_else(|e| panic!("annotation {name:?}: {e}\n    {query}"));
        if name == "Purges" {
            assert!(
                result.iter().any(|s| s["metric"]["form"] == "url"),
                "the purge is not annotated: {result:?}\n    {query}"
            );
        }
    }

    // The template variables list the routes and the replicas.
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        let name = variable["name"].as_str().expect("variable name");
        if variable["type"] == "datasource" {
            assert_eq!(
                variable["query"], "prometheus",
                "${name} picks a Prometheus"
            );
            continue;
        }
        let definition = variable["definition"]
            .as_str()
            .expect("variable definition");
        let (metric, label) = definition
            .strip_prefix("label_values(")
            .and_then(|rest| rest.strip_suffix(')'))
            .and_then(|args| args.split_once(", "))
            .unwrap_or_else(|| panic!("${name}: {definition} is not label_values(metric, label)"));
        let listed = prometheus
            .query(&format!("count by ({label}) ({metric})"))
            .await
            .unwrap_or_else(|e| panic!("${name}: {e}"));
        let values: BTreeSet<&str> = listed
            .iter()
            .filter_map(|s| s["metric"][label].as_str())
            .collect();
        let expected = match name {
            "route" => support::workload::ROUTES.len(),
            "instance" => targets.len(),
            other => panic!("unexpected variable ${other}"),
        };
        assert_eq!(values.len(), expected, "${name} lists {values:?}");
    }

    // The alert rules are loaded and evaluated against these series without error; the run's
    // upstream 500s and rejected commit make their alerts pending (their `for:` keeps them from
    // firing), and nothing says the store or the bus is down.
    let shipped = alert_names(&read("dashboards/alerts.yaml"));
    eventually("every alert rule is evaluated without error", || async {
        let rules = prometheus.api("/api/v1/rules").await;
        let evaluated: BTreeSet<String> = rules["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|group| group["rules"].as_array().into_iter().flatten())
            .filter(|rule| rule["health"] == "ok")
            .filter_map(|rule| rule["name"].as_str().map(str::to_owned))
            .collect();
        evaluated == shipped
    })
    .await;
    let active = || async {
        let alerts = prometheus.api("/api/v1/alerts").await;
        alerts["data"]["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|alert| alert["labels"]["alertname"].as_str().map(str::to_owned))
            .collect::<BTreeSet<String>>()
    };
    eventually(
        "the upstream-error, server-error and rejected-commit alerts are pending",
        || async {
            let active = active().await;
            [
                "CorralUpstreamErrors",
                "CorralServerErrors",
                "CorralCommitsRejected",
            ]
            .iter()
            .all(|alert| active.contains(*alert))
        },
    )
    .await;
    let active = active().await;
    for quiet in [
        "CorralStoreDown",
        "CorralBusDown",
        "CorralTargetDown",
        "CorralStoreBreakerOpen",
        "CorralConfigReloadRefused",
        "CorralInvalidationsFailing",
    ] {
        assert!(!active.contains(quiet), "{quiet} is active: {active:?}");
    }
}

/// The `alert:` names of a rules file.
fn alert_names(rules: &str) -> BTreeSet<String> {
    rules
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert: "))
        .map(|name| name.trim().to_owned())
        .collect()
}

fn assert_success(output: &std::process::Output, what: &str) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{what} failed:\n{text}");
    text
}

/// `promtool check rules` accepts the shipped alerting rules, and they hold the alerts operators
/// need.
#[test]
fn promtool_accepts_the_alerting_rules() {
    let rules = repo("dashboards/alerts.yaml");
    let output = promtool(&["check", "rules", rules.to_str().expect("utf-8 path")]);
    let text = assert_success(&output, "promtool check rules dashboards/alerts.yaml");
    let names = alert_names(&read("dashboards/alerts.yaml"));
    assert!(
        text.contains(&format!("SUCCESS: {} rules found", names.len())),
        "{text}"
    );
    for needed in [
        "CorralTargetDown",
        "CorralStoreDown",
        "CorralBusDown",
        "CorralStoreBreakerOpen",
        "CorralServerErrors",
        "CorralWaitTimeoutsRising",
        "CorralCommitsRejected",
        "CorralUpstreamErrors",
        "CorralCoalescingCollapsed",
        "CorralLimitRejections",
        "CorralConfigReloadRefused",
        "CorralInvalidationsFailing",
    ] {
        assert!(names.contains(needed), "no {needed} alert in {names:?}");
    }
}

/// `promtool check config` accepts the shipped Prometheus config. It names its rules at
/// `/etc/prometheus/alerts.yaml` (where compose mounts them), so the check runs on a copy in a
/// temporary directory whose rule path points at a copy of the rules beside it.
#[test]
fn promtool_accepts_the_prometheus_config() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let shipped = read("deploy/prometheus/prometheus.yml");
    let rule_files: Vec<&str> = shipped
        .lines()
        .skip_while(|line| !line.starts_with("rule_files:"))
        .skip(1)
        .take_while(|line| line.trim_start().starts_with("- "))
        .collect();
    assert_eq!(
        rule_files,
        ["  - /etc/prometheus/alerts.yaml"],
        "one rules file"
    );
    let config = edited(&shipped, "/etc/prometheus/alerts.yaml", "alerts.yaml");
    std::fs::write(dir.path().join("prometheus.yml"), config).expect("write the config");
    std::fs::write(
        dir.path().join("alerts.yaml"),
        read("dashboards/alerts.yaml"),
    )
    .expect("write the rules");
    let path = dir.path().join("prometheus.yml");
    let output = promtool(&["check", "config", path.to_str().expect("utf-8 path")]);
    let text = assert_success(&output, "promtool check config");
    assert!(text.contains("SUCCESS: 1 rule files found"), "{text}");
}

/// `promtool test rules` fires every alert on synthetic series (dashboards/alerts.test.yaml), and
/// every shipped alert has such a test.
#[test]
fn every_alert_fires_in_its_promtool_unit_test() {
    let tests = repo("dashboards/alerts.test.yaml");
    let output = promtool(&["test", "rules", tests.to_str().expect("utf-8 path")]);
    assert_success(&output, "promtool test rules dashboards/alerts.test.yaml");
    let text = read("dashboards/alerts.test.yaml");
    let tested: BTreeSet<String> = text
        .lines()
        .filter_map(|line| line.trim().strip_prefix("alertname: "))
        .map(|name| name.trim().to_owned())
        .collect();
    assert_eq!(tested, alert_names(&read("dashboards/alerts.yaml")));
}

/// The dashboard is one Grafana can import as it is: a current schema, distinct panel ids, panels
/// that do not overlap on the 24-column grid, its rows in order, the route table, the breaker's
/// states named, the version shown, a Prometheus datasource variable, and route and replica
/// variables that offer "All".
#[test]
fn the_dashboard_is_laid_out_for_grafana() {
    let dashboard: Value = serde_json::from_str(&read("dashboards/corral.json"))
        .expect("dashboards/corral.json is JSON");
    assert!(dashboard["schemaVersion"].as_u64() >= Some(39));
    assert_eq!(dashboard["uid"], "corral");
    let panels = dashboard["panels"].as_array().expect("panels");
    let ids: BTreeSet<u64> = panels.iter().filter_map(|p| p["id"].as_u64()).collect();
    assert_eq!(ids.len(), panels.len(), "every panel has its own id");
    let boxes: Vec<(&str, [u64; 4])> = panels
        .iter()
        .map(|p| {
            let at = &p["gridPos"];
            let field = |name: &str| at[name].as_u64().expect("gridPos numbers");
            let title = p["title"].as_str().expect("title");
            (title, [field("x"), field("y"), field("w"), field("h")])
        })
        .collect();
    for (i, (title, [x, y, w, h])) in boxes.iter().enumerate() {
        assert!(x + w <= 24, "{title:?} runs off the grid");
        for (other, [ox, oy, ow, oh]) in &boxes[i + 1..] {
            let apart = x + w <= *ox || ox + ow <= *x || y + h <= *oy || oy + oh <= *y;
            assert!(apart, "{title:?} overlaps {other:?}");
        }
    }
    let rows: Vec<&str> = panels
        .iter()
        .filter(|p| p["type"] == "row")
        .filter_map(|p| p["title"].as_str())
        .collect();
    assert_eq!(
        rows,
        [
            "Overview",
            "Coalescing",
            "Store and bus",
            "Upstreams",
            "Limits",
            "Process"
        ]
    );
    let panel = |title: &str| {
        panels
            .iter()
            .find(|p| p["title"] == title)
            .unwrap_or_else(|| panic!("no panel {title:?}"))
    };
    let table = panel("Routes");
    assert_eq!(table["type"], "table");
    assert!(
        table["targets"].as_array().is_some_and(|t| t
            .iter()
            .all(|t| t["format"] == "table" && t["instant"] == true)),
        "the route table's queries are instant tables"
    );
    let breaker = panel("Store circuit breaker");
    let mappings = &breaker["fieldConfig"]["defaults"]["mappings"][0]["options"];
    for (value, text) in [("0", "closed"), ("1", "open"), ("2", "half-open")] {
        assert_eq!(mappings[value]["text"], text, "the breaker's value {value}");
    }
    let version = panel("Version")["targets"][0]["expr"]
        .as_str()
        .unwrap_or_default();
    assert!(version.contains("corral_build_info"), "{version}");
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    let variable = |name: &str| {
        variables
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    assert_eq!(variable("datasource")["type"], "datasource");
    assert_eq!(variable("datasource")["query"], "prometheus");
    for name in ["route", "instance"] {
        let v = variable(name);
        assert_eq!(v["type"], "query", "${name}");
        assert_eq!(v["datasource"]["uid"], "${datasource}", "${name}");
        assert!(
            v["definition"]
                .as_str()
                .is_some_and(|d| d.starts_with("label_values(")),
            "${name}"
        );
        assert_eq!(
            (&v["includeAll"], &v["allValue"]),
            (&Value::Bool(true), &Value::from(".*")),
            "${name}"
        );
    }
}

/// The anchors of a Markdown file's headings, as GitHub makes them.
fn anchors(markdown: &str) -> BTreeSet<String> {
    markdown
        .lines()
        .filter(|line| line.starts_with('#'))
        .filter_map(|line| line.trim_start_matches('#').strip_prefix(' '))
        .map(|title| {
            title
                .to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect()
        })
        .collect()
}

/// Every alert links its runbook: a section of docs/operations.md that exists; and neither the
/// rules nor the dashboard name a scrape job, so they work with any.
#[test]
fn every_alert_links_its_runbook_and_nothing_names_a_job() {
    let rules = read("dashboards/alerts.yaml");
    let sections = anchors(&read("docs/operations.md"));
    let links: Vec<&str> = rules
        .lines()
        .filter_map(|line| line.trim().strip_prefix("runbook_url: "))
        .map(|url| url.trim_matches('"'))
        .collect();
    let names = alert_names(&rules);
    assert_eq!(links.len(), names.len(), "one runbook_url per alert");
    for name in &names {
        let link = format!("docs/operations.md#{}", name.to_lowercase());
        assert!(
            links.contains(&link.as_str()),
            "{name} does not link {link}"
        );
        let anchor = link.split_once('#').map(|(_, a)| a).unwrap_or_default();
        assert!(
            sections.contains(anchor),
            "docs/operations.md has no section #{anchor}"
        );
    }
    let dashboard = read("dashboards/corral.json");
    for (file, text) in [
        ("dashboards/alerts.yaml", &rules),
        ("dashboards/corral.json", &dashboard),
    ] {
        for line in text
            .lines()
            .filter(|line| !line.trim_start().starts_with('#'))
        {
            assert!(!line.contains("job="), "{file} names a job: {line}");
        }
    }
}
