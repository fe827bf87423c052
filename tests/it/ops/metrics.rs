//! `/metrics` after a short run over three replicas on a real Redis store and NATS bus: every
//! metric corral documents is there, and the counts are what the run did (see
//! `support::workload` for the run and its expected counts).

use crate::support;

use std::collections::BTreeSet;

use http::Method;

use support::proxy::{ProxyCluster, fill};
use support::upstream::Upstream;
use support::workload::{BURST, ROUTES, Sample, Workload, parse};

/// Every metric family corral documents (histograms by their base name).
const FAMILIES: [&str; 30] = [
    "corral_requests_total",
    "corral_request_duration_seconds",
    "corral_upstream_requests_total",
    "corral_upstream_duration_seconds",
    "corral_follower_wait_seconds",
    "corral_flights_inflight",
    "corral_followers_waiting",
    "corral_lease_events_total",
    "corral_store_operations_total",
    "corral_store_duration_seconds",
    "corral_bus_events_total",
    "corral_bus_reconnects_total",
    "corral_bus_publish_duration_seconds",
    "corral_bus_connected",
    "corral_store_connected",
    "corral_l1_hits_total",
    "corral_l1_misses_total",
    "corral_l1_bytes",
    "corral_l1_entries",
    "corral_poll_rechecks_total",
    "corral_wait_timeouts_total",
    "corral_config_reloads_total",
    "corral_build_info",
    "process_cpu_seconds_total",
    "corral_responses_total",
    "corral_request_body_bytes_total",
    "corral_response_body_bytes_total",
    "corral_config_last_reload_success_timestamp_seconds",
    "corral_store_breaker_state",
    "corral_invalidations_failed_total",
];

const HISTOGRAMS: [&str; 5] = [
    "corral_request_duration_seconds",
    "corral_upstream_duration_seconds",
    "corral_follower_wait_seconds",
    "corral_store_duration_seconds",
    "corral_bus_publish_duration_seconds",
];

/// The three replicas' scrapes, parsed.
struct Scrapes {
    replicas: Vec<Vec<Sample>>,
    texts: Vec<String>,
}

impl Scrapes {
    async fn of(work: &Workload) -> Scrapes {
        let mut texts = Vec::new();
        for i in 0..work.proxy.len() {
            texts.push(work.scrape(i).await);
        }
        Scrapes {
            replicas: texts.iter().map(|t| parse(t)).collect(),
            texts,
        }
    }

    /// The sum of `name` over the samples of replica `i` whose labels include `labels`; `None`
    /// when no sample matches.
    fn on(&self, i: usize, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self.replicas[i]
            .iter()
            .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(v)))
            .map(|s| s.value)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }

    /// The sum over every replica; panics (with the scrapes) when no replica has the series.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<f64> = (0..self.replicas.len())
            .filter_map(|i| self.on(i, name, labels))
            .collect();
        assert!(
            !found.is_empty(),
            "no replica exports {name}{labels:?}:\n{}",
            self.texts.join("\n")
        );
        found.iter().sum()
    }

    fn requests(&self, route: &str, outcome: &str) -> f64 {
        self.sum(
            "corral_requests_total",
            &[("route", route), ("outcome", outcome)],
        )
    }

    fn upstream(&self, route: &str, class: &str) -> f64 {
        self.sum(
            "corral_upstream_requests_total",
            &[("route", route), ("status_class", class)],
        )
    }

    fn lease(&self, event: &str) -> f64 {
        self.sum("corral_lease_events_total", &[("event", event)])
    }

    fn lease_on(&self, i: usize, event: &str) -> f64 {
        self.on(i, "corral_lease_events_total", &[("event", event)])
            .unwrap_or_else(|| panic!("replica {i} does not export lease event {event}"))
    }

    fn store(&self, op: &str) -> f64 {
        self.sum(
            "corral_store_operations_total",
            &[("op", op), ("result", "ok")],
        )
    }
}

/// After a run that produces every outcome, each replica exports every documented metric, and
/// the counts summed over the replicas match what the run did.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_metric_is_exported_with_the_counts_of_a_run() {
    let work = Workload::start().await;
    work.run().await;
    let m = Scrapes::of(&work).await;

    for (i, samples) in m.replicas.iter().enumerate() {
        let names: BTreeSet<&str> = samples.iter().map(|s| s.name.as_str()).collect();
        for family in FAMILIES {
            let present = names.contains(family)
                || (HISTOGRAMS.contains(&family)
                    && ["_bucket", "_sum", "_count"]
                        .iter()
                        .all(|suffix| names.contains(format!("{family}{suffix}").as_str())));
            assert!(
                present,
                "replica {i} does not export {family}:\n{}",
                m.texts[i]
            );
        }
        let text = &m.texts[i];
        for family in FAMILIES {
            let help = text
                .lines()
                .find_map(|line| line.strip_prefix(&format!("# HELP {family} ")))
                .unwrap_or_else(|| panic!("{family} has no help text"));
            assert!(
                help.starts_with(char::is_uppercase) && help.ends_with('.'),
                "{family}'s help is not a sentence: {help:?}"
            );
        }
    }

    // promtool's lint finds nothing to say about any replica's exposition.
    for text in &m.texts {
        let checked = support::prometheus::promtool_with_input(&["check", "metrics"], text);
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&checked.stdout),
            String::from_utf8_lossy(&checked.stderr)
        );
        assert!(
            checked.status.success() && said.trim().is_empty(),
            "promtool check metrics:\n{said}"
        );
    }

    // Every route has every outcome, status class and its wait timeouts, at 0 when none happened.
    for route in ROUTES {
        for outcome in "hit miss coalesced stale pass bypass error".split(' ') {
            m.requests(route, outcome);
        }
        for class in ["1xx", "2xx", "3xx", "4xx", "5xx", "error"] {
            m.upstream(route, class);
        }
    }

    // Requests, by route and outcome.
    assert_eq!(m.requests("reports", "miss"), 1.0, "one request fetched");
    assert_eq!(
        m.requests("reports", "coalesced") + m.requests("reports", "hit"),
        (BURST - 1 + 3) as f64,
        "299 of the burst waited for that fetch or found it stored, and 3 hits followed"
    );
    assert!(m.requests("reports", "hit") >= 3.0, "one hit per replica");
    assert_eq!(
        m.requests("reports", "bypass"),
        1.0,
        "Authorization bypasses"
    );
    assert_eq!(m.requests("private", "pass"), 2.0);
    assert_eq!(m.requests("broken", "error"), 1.0);
    assert_eq!(m.requests("live", "bypass"), 2.0);
    assert_eq!(
        m.requests("slow", "error"),
        2.0,
        "two wait timeouts answered 504"
    );
    assert_eq!(
        m.requests("takeover", "error"),
        1.0,
        "the overrun fetch answered 504"
    );
    assert_eq!(
        m.requests("takeover", "miss"),
        1.0,
        "the replica that took over fetched"
    );
    assert_eq!(m.requests("purged", "miss"), 1.0);
    assert_eq!(m.requests("stale", "miss"), 1.0, "the fill");
    assert_eq!(
        m.requests("stale", "stale"),
        3.0,
        "one per replica, answered while the refresh was held"
    );
    assert_eq!(
        m.sum("corral_requests_total", &[("outcome", "stale")]),
        3.0,
        "no other route served stale"
    );
    let answered = m.sum("corral_requests_total", &[]);
    assert_eq!(answered, (BURST + 3 + 1 + 2 + 1 + 2 + 2 + 2 + 1 + 4) as f64);
    assert_eq!(
        m.sum("corral_request_duration_seconds_count", &[]),
        answered,
        "one latency per request"
    );
    assert_eq!(
        m.sum(
            "corral_request_duration_seconds_count",
            &[("route", "reports"), ("outcome", "miss")]
        ),
        1.0
    );

    // Upstream fetches, by route and status class; one latency each.
    let fetches = [
        ("reports", "2xx", 2.0),
        ("private", "2xx", 2.0),
        ("broken", "5xx", 1.0),
        ("live", "2xx", 2.0),
        ("slow", "2xx", 1.0),
        ("takeover", "2xx", 1.0),
        ("purged", "2xx", 1.0),
        ("stale", "2xx", 2.0),
    ];
    for (route, class, count) in fetches {
        assert_eq!(m.upstream(route, class), count, "{route} {class}");
        assert_eq!(
            m.sum(
                "corral_upstream_duration_seconds_count",
                &[("route", route)]
            ),
            count,
            "{route}: one upstream latency per fetch"
        );
    }
    assert_eq!(
        m.sum("corral_upstream_requests_total", &[]),
        fetches.iter().map(|(_, _, n)| n).sum::<f64>(),
        "no other fetch was counted"
    );
    assert_eq!(
        work.upstream.hits_under("/"),
        13,
        "the upstream saw the counted fetches and the one cancelled by max_fetch"
    );

    // Waiting.
    assert_eq!(
        m.sum("corral_wait_timeouts_total", &[("route", "slow")]),
        2.0
    );
    assert_eq!(m.sum("corral_wait_timeouts_total", &[]), 2.0);
    let followed = m.sum(
        "corral_follower_wait_seconds_count",
        &[("route", "reports")],
    );
    assert!(
        (1.0..=(BURST - 1) as f64).contains(&followed),
        "requests that joined another's flight: {followed}"
    );
    assert!(
        m.on(1, "corral_poll_rechecks_total", &[("found", "false")]) >= Some(1.0),
        "replica 1 re-checked the lease it waited on by timer"
    );
    m.sum("corral_poll_rechecks_total", &[("found", "true")]);

    // Background refreshes: every route has every reason and result, at 0 when none happened;
    // the one refresh ran for `stale`, because it was stale, and was stored.
    for route in ROUTES {
        for reason in ["stale", "early"] {
            for result in ["stored", "failed", "uncacheable", "abandoned"] {
                let count = m.sum(
                    "corral_background_refreshes_total",
                    &[("route", route), ("reason", reason), ("result", result)],
                );
                let expected = (route, reason, result) == ("stale", "stale", "stored");
                assert_eq!(
                    count,
                    f64::from(u8::from(expected)),
                    "{route} {reason} {result}"
                );
            }
        }
    }

    // Purges: every form is exported; the one purge was by URL.
    for form in ["url", "prefix", "route", "tag", "unsafe_method"] {
        let expected = f64::from(u8::from(form == "url"));
        assert_eq!(
            m.sum("corral_purges_total", &[("form", form)]),
            expected,
            "{form}"
        );
        m.sum("corral_purged_keys_total", &[("form", form)]);
    }

    // Leases: reports, private, broken, slow, purged, stale and its refresh, and takeover twice.
    assert_eq!(m.lease("acquired"), 9.0);
    let once = [
        (1, "taken_over", "replica 1 took the lease over"),
        (0, "abandoned", "replica 0 abandoned its overrun"),
        (2, "commit_rejected", "the purge stole replica 2's lease"),
    ];
    for (replica, event, why) in once {
        assert_eq!(m.lease_on(replica, event), 1.0, "{why}");
        assert_eq!(
            m.lease(event),
            1.0,
            "{event} happened on replica {replica} only"
        );
    }
    assert!(
        m.lease_on(0, "renewed") >= 1.0,
        "the overrunning fetch renewed its lease"
    );
    assert_eq!(m.lease("lost"), 0.0);

    // Store calls: commits for reports, slow, takeover, purged (rejected, but answered), stale
    // and its refresh; one give-up (private); releases for the failure and the abandon; one purge.
    assert_eq!(m.store("commit"), 6.0);
    assert_eq!(
        m.sum("corral_store_duration_seconds_count", &[("op", "commit")]),
        6.0
    );
    assert_eq!(m.store("give_up"), 1.0);
    assert_eq!(m.store("release"), 2.0);
    assert_eq!(m.store("purge"), 1.0);
    for i in 0..3 {
        assert!(m.on(i, "corral_store_operations_total", &[("op", "acquire")]) >= Some(1.0));
    }
    for result in ["timeout", "unavailable", "protocol"] {
        assert_eq!(
            m.replicas
                .iter()
                .flatten()
                .filter(|s| s.name == "corral_store_operations_total"
                    && s.label("result") == Some(result))
                .map(|s| s.value)
                .sum::<f64>(),
            0.0,
            "no store call failed ({result})"
        );
    }

    // The bus: every replica heard the commit and the purge; nothing else went wrong.
    for i in 0..3 {
        for kind in ["ready", "deleted"] {
            assert!(
                m.on(i, "corral_bus_events_total", &[("kind", kind)]) >= Some(1.0),
                "replica {i} received a {kind} event"
            );
        }
        assert_eq!(m.on(i, "corral_bus_connected", &[]), Some(1.0));
        assert_eq!(m.on(i, "corral_store_connected", &[]), Some(1.0));
        assert_eq!(m.on(i, "corral_bus_reconnects_total", &[]), Some(0.0));
    }
    for kind in ["failed", "uncacheable", "abandoned"] {
        assert!(
            m.sum("corral_bus_events_total", &[("kind", kind)]) >= 1.0,
            "{kind}"
        );
    }
    assert_eq!(
        m.sum("corral_bus_events_total", &[("kind", "undecodable")]),
        0.0
    );
    assert!(
        m.sum("corral_bus_publish_duration_seconds_count", &[]) >= 4.0,
        "commits, failure, give-up, abandon and purge were published on the bus"
    );

    // Builds: reports, slow, takeover, purged, stale and its refresh shared; private; broken
    // failed; one overrun.
    let builds = |result: &str| m.sum("corral_builds_total", &[("result", result)]);
    assert_eq!(builds("shared"), 6.0);
    assert_eq!(builds("private"), 1.0);
    assert_eq!(builds("failed"), 1.0);
    assert_eq!(builds("overrun"), 1.0);

    // The L1 and the gauges at rest.
    assert!(
        m.sum("corral_l1_hits_total", &[]) >= 3.0,
        "the three follow-up hits"
    );
    for i in 0..3 {
        assert!(
            m.on(i, "corral_l1_entries", &[]) >= Some(1.0),
            "replica {i}"
        );
        assert!(m.on(i, "corral_l1_bytes", &[]) > Some(0.0), "replica {i}");
        assert_eq!(m.on(i, "corral_flights_inflight", &[]), Some(0.0));
        assert_eq!(m.on(i, "corral_followers_waiting", &[]), Some(0.0));
    }

    // What the run cannot change: no reloads, the version, the process.
    for result in ["applied", "refused"] {
        assert_eq!(
            m.sum("corral_config_reloads_total", &[("result", result)]),
            0.0
        );
    }
    assert_eq!(
        m.sum("corral_config_last_reload_success_timestamp_seconds", &[]),
        0.0
    );
    for i in 0..3 {
        assert_eq!(
            m.on(
                i,
                "corral_build_info",
                &[
                    ("version", env!("CARGO_PKG_VERSION")),
                    ("commit", option_env!("CORRAL_COMMIT").unwrap_or("unknown"))
                ]
            ),
            Some(1.0)
        );
        assert!(m.on(i, "process_resident_memory_bytes", &[]) > Some(0.0));
        assert!(m.on(i, "process_start_time_seconds", &[]) > Some(0.0));
    }

    // Answers by status class: one per request, 5xx for every error; their bodies' bytes.
    assert_eq!(m.sum("corral_responses_total", &[]), answered);
    let responses = |route: &str, class: &str| {
        m.sum(
            "corral_responses_total",
            &[("route", route), ("status_class", class)],
        )
    };
    for route in ROUTES {
        for class in ["1xx", "2xx", "3xx", "4xx", "5xx"] {
            let errors = m.requests(route, "error");
            let expected = match class {
                "5xx" => errors,
                "2xx" => m.sum("corral_requests_total", &[("route", route)]) - errors,
                _ => 0.0,
            };
            assert_eq!(responses(route, class), expected, "{route} {class}");
        }
        assert_eq!(
            m.sum("corral_invalidations_failed_total", &[("route", route)]),
            0.0
        );
        let sent = m.sum("corral_response_body_bytes_total", &[("route", route)]);
        let answers = m.sum("corral_requests_total", &[("route", route)]);
        assert!(
            sent >= answers,
            "{route}: {sent} bytes for {answers} bodies"
        );
    }
    assert_eq!(
        m.sum("corral_request_body_bytes_total", &[]),
        0.0,
        "no bodies"
    );

    // The store's breaker stayed closed on every replica.
    for i in 0..3 {
        for (state, expected) in [("closed", 1.0), ("open", 0.0), ("half_open", 0.0)] {
            let value = m.on(i, "corral_store_breaker_state", &[("state", state)]);
            assert_eq!(value, Some(expected), "replica {i} {state}");
        }
    }
}

/// Bodies are counted by route as they pass: the request body the proxy forwards, and the
/// response body it sends, on a route that takes every method.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_response_bodies_are_counted_by_route() {
    let upstream = Upstream::start().await;
    let yaml = fill(
        r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0 }
routes:
  - name: forms
    match: { path_prefix: /forms, methods: [] }
    upstream: {{upstream}}
"#,
        &[("upstream", &upstream.url())],
    );
    let proxy = ProxyCluster::on_memory(1, &yaml).await;
    let posted = proxy
        .call(0, Method::POST, "/forms/a")
        .body("five!")
        .send()
        .await;
    assert_eq!(posted.status, 200, "{:?}", posted.text());
    let reply = proxy.admin(0, Method::GET, "/metrics").send().await;
    let samples = parse(&reply.text());
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        samples
            .iter()
            .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(v)))
            .map(|s| s.value)
            .sum()
    };
    let forms = [("route", "forms")];
    assert_eq!(value("corral_request_body_bytes_total", &forms), 5.0);
    assert_eq!(
        value("corral_response_body_bytes_total", &forms),
        posted.text().len() as f64
    );
    assert_eq!(
        value(
            "corral_responses_total",
            &[("route", "forms"), ("status_class", "2xx")]
        ),
        1.0
    );
    proxy.stop().await;
}

/// The text-format reader the test above relies on reads labels, escapes and special values.
#[test]
fn the_text_format_reader_reads_labels_escapes_and_infinities() {
    let text = "# HELP x A thing.\n# TYPE x counter\nx 3\n\
                y_bucket{le=\"+Inf\",route=\"a\\\"b\"} 2\nz{a=\"1\"} +Inf\n";
    let samples = parse(text);
    assert_eq!(samples.len(), 3);
    assert_eq!((samples[0].name.as_str(), samples[0].value), ("x", 3.0));
    assert_eq!(samples[1].label("le"), Some("+Inf"));
    assert_eq!(samples[1].label("route"), Some("a\"b"));
    assert_eq!(samples[2].value, f64::INFINITY);
}
