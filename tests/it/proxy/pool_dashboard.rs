//! The dashboard's upstream server panels, read from a real Prometheus scraping a proxy whose
//! route is a pool: each server shows under its own label, the failing one ejected and retried.

use crate::support;

use std::collections::BTreeSet;

use serde_json::Value;

use super::tls::serve_routes;
use support::eventually;
use support::http::Http;
use support::prometheus::TestPrometheus;
use support::upstream::Upstream;

/// The panels of the upstreams row that speak of servers, retries and ejections.
const PANELS: [&str; 4] = [
    "Upstream requests by server",
    "Upstream server latency p50 / p99",
    "Upstream servers in rotation",
    "Ejections, retries and the retry budget",
];

/// Each query of the panel titled `title`, as Grafana sends it with "All" selected.
fn queries(dashboard: &Value, title: &str) -> Vec<String> {
    let panel = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .find(|p| p["title"] == title)
        .unwrap_or_else(|| panic!("no panel {title:?}"));
    panel["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .map(|t| {
            let expr = t["expr"].as_str().expect("an expr");
            let text = expr
                .replace("$__rate_interval", "1m")
                .replace("$route", ".*")
                .replace("$instance", ".*");
            assert!(!text.contains('$'), "{text}");
            text
        })
        .collect()
}

/// The values of `label` in a query's result.
fn labels(result: &[Value], label: &str) -> BTreeSet<String> {
    result
        .iter()
        .filter_map(|s| s["metric"][label].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstreams_row_shows_each_server_from_a_real_prometheus() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (a, b, c) = tokio::join!(Upstream::start(), Upstream::start(), Upstream::start());
    let c = c.status("/", 503);
    let servers = [a.url(), b.url(), c.url()].join(", ");
    let route = format!(
        "  - name: pool\n    match: {{ path_prefix: / }}\n    cache: false\n    upstream:\n      servers: [{servers}]\n      outlier: {{ failures: 2, ejection: 5m }}\n      retries: {{ attempts: 2 }}\n"
    );
    let proxy = serve_routes(dir.path(), &route, &[]).await;
    let admin = proxy.admin_url().trim_start_matches("http://").to_owned();
    let config = format!(
        "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nscrape_configs:\n  - job_name: corral\n    static_configs: [{{ targets: [\"{admin}\"] }}]\n"
    );
    let prometheus = TestPrometheus::start(&config, &[]).await;
    eventually("Prometheus scrapes the proxy", || async {
        prometheus.values("up{job=\"corral\"} == 1").await.len() == 1
    })
    .await;

    let http = Http::new();
    for i in 0..60 {
        let reply = http.get(format!("{}/d/{i}", proxy.url())).send().await;
        assert_eq!(
            reply.status, 200,
            "the failing server's answers are retried"
        );
    }

    let dashboard: Value =
        serde_json::from_str(include_str!("../../../dashboards/corral.json")).expect("JSON");
    let every: BTreeSet<String> = [&a, &b, &c].iter().map(|o| o.addr().to_string()).collect();
    let failing = c.addr().to_string();
    for title in PANELS {
        for query in queries(&dashboard, title) {
            eventually(&format!("{title:?} shows {query}"), || async {
                let Ok(result) = prometheus.query(&query).await else {
                    return false;
                };
                let servers = labels(&result, "server");
                if query.contains("corral_upstream_ejections_total") {
                    // The failing server was ejected; the rest never were.
                    return result.iter().any(|s| {
                        s["metric"]["server"] == failing.as_str()
                            && support::prometheus::sample_value(s) > 0.0
                    });
                }
                if query.contains("corral_upstream_retries_total") {
                    return labels(&result, "reason").contains("status");
                }
                if query.contains("retry_budget_exhausted") {
                    return !result.is_empty();
                }
                servers == every
            })
            .await;
        }
    }
    let rotation = queries(&dashboard, "Upstream servers in rotation").remove(0);
    let result = prometheus
        .query(&rotation)
        .await
        .expect("the rotation query");
    for sample in &result {
        let expected = if sample["metric"]["server"] == failing.as_str() {
            0.0
        } else {
            1.0
        };
        assert_eq!(
            support::prometheus::sample_value(sample),
            expected,
            "{sample}"
        );
    }
}
