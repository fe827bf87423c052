//! Every metric corral exports, registered once.
//!
//! Each [`Metrics`] owns its own registry, so several engines in one process (tests, the demo) keep
//! separate counts. Labels are bounded: operation names and fixed outcome words, never keys.
//!
//! Series whose label values are a fixed list are created at zero for every value (per route, once
//! the proxy names its routes with [`Metrics::add_route`]): a rare event then shows as a series at
//! 0 from the first scrape, so dashboards and alerts see "none yet" rather than "no data".

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// How a proxy request ended, the `outcome` label of `corral_requests_total`.
pub const OUTCOMES: [&str; 7] = [
    "hit",
    "miss",
    "coalesced",
    "stale",
    "pass",
    "bypass",
    "error",
];

/// The `event` label of `corral_lease_events_total`.
pub const LEASE_EVENTS: [&str; 6] = [
    "acquired",
    "renewed",
    "lost",
    "taken_over",
    "abandoned",
    "commit_rejected",
];

/// The `status_class` label of `corral_upstream_requests_total` (`error`: no answer came back).
pub const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];

/// The `reason` label of `corral_upstream_errors_total`: why an upstream request gave no whole
/// answer.
pub const UPSTREAM_ERROR_REASONS: [&str; 7] = [
    "connect",
    "connect_timeout",
    "tls",
    "response_header_timeout",
    "read_timeout",
    "body",
    "framing",
];
/// The `status_class` label of `corral_responses_total`: every answer has a status.
pub const RESPONSE_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The `kind` label of `corral_bus_events_total`.
pub const BUS_EVENT_KINDS: [&str; 6] = [
    "ready",
    "failed",
    "uncacheable",
    "abandoned",
    "deleted",
    "undecodable",
];

/// The `result` label of `corral_config_reloads_total`: `applied` (new requests use the new file)
/// or `refused` (the file had a problem and the running config stays).
pub const RELOAD_RESULTS: [&str; 2] = ["applied", "refused"];

/// The `state` label of `corral_store_breaker_state`, the store breaker's phases.
pub const BREAKER_STATES: [&str; 3] = ["closed", "open", "half_open"];

/// The upper bounds of every latency histogram, in seconds. They reach past the longest wait the
/// defaults allow (`max_fetch` 30 s) to 120 s, so a fetch cut off at its `max_fetch` lands in a
/// bucket of its own rather than only in `+Inf`.
pub const LATENCY_BUCKETS: [f64; 18] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0,
    30.0, 60.0, 120.0,
];

/// The `commit` label of `corral_build_info`: the commit the build names in `CORRAL_COMMIT` (the
/// image build sets it), else `unknown`.
pub const COMMIT: &str = match option_env!("CORRAL_COMMIT") {
    Some(commit) => commit,
    None => "unknown",
};

/// The `form` label of `corral_purges_total` and `corral_purged_keys_total`.
pub const PURGE_FORMS: [&str; 5] = ["url", "prefix", "route", "tag", "unsafe_method"];

/// The `reason` label of `corral_background_refreshes_total`.
pub const REFRESH_REASONS: [&str; 2] = ["stale", "early"];

/// The `result` label of `corral_background_refreshes_total`.
pub const REFRESH_RESULTS: [&str; 4] = ["stored", "failed", "uncacheable", "abandoned"];

/// The `result` label of `corral_revalidations_total`: the source confirmed the stored entry
/// (`304`), sent a new answer in its place (`200`, whatever its status), or failed (`error`).
pub const REVALIDATION_RESULTS: [&str; 3] = ["304", "200", "error"];

/// The `limit` label of `corral_limit_rejections_total`: which limit refused a connection or a
/// request.
pub const LIMITS: [&str; 11] = [
    "connections",
    "header_read_timeout",
    "uri_length",
    "headers",
    "request_body",
    "followers",
    "upstream_fetches",
    "upstream_passes",
    "send_timeout",
    "send_rate",
    "connections_per_client",
];
/// The `reason` label of `corral_invalidations_failed_total`.
pub const INVALIDATION_FAILURES: [&str; 6] = [
    "timeout",
    "unavailable",
    "protocol",
    "circuit_open",
    "shutdown",
    "overflow",
];

/// The `reason` label of `corral_client_errors_total`: what a client got wrong.
pub const CLIENT_ERRORS: [&str; 1] = ["request_body"];
/// The `result` label of `corral_orphan_leases_total`.
pub const ORPHAN_RESULTS: [&str; 2] = ["released", "absent"];

/// The engine's metrics; cheap to clone (every field is an `Arc` inside).
#[derive(Clone)]
pub struct Metrics {
    /// The registry that `/metrics` renders.
    pub registry: Registry,
    /// Store calls by operation and result (`ok`, `timeout`, `unavailable`, `protocol`).
    pub store_operations: IntCounterVec,
    /// Store call latency by operation, in seconds.
    pub store_duration: HistogramVec,
    /// Lease lifecycle: acquired, renewed, lost, taken_over (acquired after waiting on another
    /// holder's lease that ended without a value), abandoned, commit_rejected.
    pub lease_events: IntCounterVec,
    /// Events received from the bus, by kind (and `undecodable`).
    pub bus_events: IntCounterVec,
    /// Times the bus reconnected (or lagged) and every live flight re-checked.
    pub bus_resyncs: IntCounter,
    /// How long publishing one event on the bus took, in seconds (only for stores that do not
    /// carry their own events).
    pub bus_publish_duration: Histogram,
    /// Builds run, by result: shared, private, failed, overrun, panicked, degraded, own.
    pub builds: IntCounterVec,
    /// How flights ended: value, failed, pass, empty, unattended, store_error.
    pub flight_outcomes: IntCounterVec,
    /// Flights alive in this process right now.
    pub flights_inflight: IntGauge,
    /// Callers waiting on a flight they did not start.
    pub followers_waiting: IntGauge,
    /// How long callers waited for someone else's build after joining its flight, in seconds, by
    /// route.
    pub follower_wait: HistogramVec,
    /// Re-checks made by a timer (safety poll or lease expiry), by whether they found a change: a
    /// `found="true"` count is an event that was lost or a holder that died.
    pub poll_rechecks: IntCounterVec,
    /// Stored bytes that did not decode or answered another key: a miss, never a panic.
    pub corrupt_entries: IntCounter,
    /// Built values larger than the store takes (NATS KV: its `max_payload`); each was handled as
    /// uncacheable, so every caller built its own.
    pub values_too_large: IntCounter,
    /// Answers served from the L1.
    pub l1_hits: IntCounter,
    /// Lookups the L1 could not answer.
    pub l1_misses: IntCounter,
    /// Callers that reached their deadline before an answer, by route.
    pub wait_timeouts: IntCounterVec,
    /// Proxy requests answered, by route and outcome (see [`OUTCOMES`]).
    pub requests: IntCounterVec,
    /// Proxy request latency, by route and outcome, in seconds.
    pub request_duration: HistogramVec,
    /// Upstream fetches, by route and status class (2xx .. 5xx, or `error` without an answer).
    pub upstream_requests: IntCounterVec,
    /// Upstream latency to the response head, by route, in seconds.
    pub upstream_duration: HistogramVec,
    /// Upstream requests that failed, by route and reason ([`UPSTREAM_ERROR_REASONS`]).
    pub upstream_errors: IntCounterVec,
    /// 1 while the bus subscription is connected (refreshed at scrape).
    pub bus_connected: IntGauge,
    /// 1 while the store answered its last probe (refreshed at scrape).
    pub store_connected: IntGauge,
    /// Bytes held in the L1 (refreshed at scrape).
    pub l1_bytes: IntGauge,
    /// Entries held in the L1 (refreshed at scrape).
    pub l1_entries: IntGauge,
    /// Config reloads, by result (see [`RELOAD_RESULTS`]).
    pub config_reloads: IntCounterVec,
    /// When the config was last reloaded with success, in seconds since the Unix epoch (0: not
    /// since the process started).
    pub config_last_reload: Gauge,
    /// Answers sent to clients, by route and status class (see [`RESPONSE_CLASSES`]).
    pub responses: IntCounterVec,
    /// Request body bytes read from clients, by route.
    pub request_bytes: IntCounterVec,
    /// Response body bytes sent to clients, by route.
    pub response_bytes: IntCounterVec,
    /// Purges done, by form: url, prefix, route, tag, unsafe_method.
    pub purges: IntCounterVec,
    /// Keys a purge found stored (a value, lease or pass marker), by form (a route purge counts
    /// none: it is one generation bump).
    pub purged_keys: IntCounterVec,
    /// Refreshes run in the background under the lease while callers were answered from the
    /// stored copy, by route, why (`stale`: stale-while-revalidate; `early`: early refresh) and
    /// result (`stored`, `failed`, `uncacheable`, `abandoned`).
    pub background_refreshes: IntCounterVec,
    /// Refreshes of a stored entry that asked the source whether it changed (one per key for the
    /// whole deployment, under the lease), by route and result (see [`REVALIDATION_RESULTS`]).
    pub revalidations: IntCounterVec,
    /// Connections and requests refused by a limit, by limit (see [`LIMITS`]).
    pub limit_rejections: IntCounterVec,
    /// Client connections open right now, both listeners together.
    pub connections_open: IntGauge,
    /// The store's circuit breaker: 1 for the phase it is in, 0 for the others (see
    /// [`BREAKER_STATES`]; `half_open`: its probe is out).
    pub store_breaker_state: IntGaugeVec,
    /// Changes of the store's circuit breaker, by the phase entered (closed, open, half_open).
    pub store_breaker_transitions: IntCounterVec,
    /// Store calls the open circuit breaker failed at once, without calling the store.
    pub store_short_circuits: IntCounter,
    /// Leases a timed-out ACQUIRE may have left behind, released (or found gone) once the store
    /// answered again, by result (`released`: it was there; `absent`: it was not).
    pub orphan_leases: IntCounterVec,
    /// Invalidations after a successful unsafe request that the store never took, even after
    /// retrying for the whole retry window, by route and reason (the last error: `timeout`,
    /// `unavailable`, `protocol`, `circuit_open`; or `shutdown`, or `overflow` when too many were
    /// being retried already). Stored copies of their keys stay until they expire.
    pub invalidations_failed: IntCounterVec,
    /// Requests the client broke (see [`CLIENT_ERRORS`]), answered 4xx and never counted against
    /// the upstream.
    pub client_errors: IntCounterVec,
    /// Answers compressed when stored, by route and coding (see [`CODINGS`]): compression is paid
    /// once per stored answer, never per hit.
    pub compressions: IntCounterVec,
    /// Answers decoded while sent to a client that does not accept their stored coding, by route
    /// and coding.
    pub decompressions: IntCounterVec,
    /// Each upstream server's requests, latency, health and ejections, and each route's retries.
    pub upstream_servers: UpstreamServerMetrics,
}

/// The `encoding` label of `corral_compressions_total` and `corral_decompressions_total`.
pub const CODINGS: [&str; 4] = ["gzip", "br", "zstd", "deflate"];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("registered once");
            metric
        };
        let counter = |name: &str, help: &str| {
            let metric = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("registered once");
            metric
        };
        let gauge = |name: &str, help: &str| {
            let metric = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("registered once");
            metric
        };
        let latency_buckets = LATENCY_BUCKETS.to_vec();
        let store_duration = HistogramVec::new(
            HistogramOpts::new(
                "corral_store_duration_seconds",
                "How long store calls took, by operation.",
            )
            .buckets(latency_buckets.clone()),
            &["op"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(store_duration.clone()))
            .expect("registered once");
        let histogram_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(latency_buckets.clone()),
                labels,
            )
            .expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("registered once");
            metric
        };
        let follower_wait = histogram_vec(
            "corral_follower_wait_seconds",
            "How long requests waited for another request's fetch after joining its flight.",
            &["route"],
        );
        let request_duration = histogram_vec(
            "corral_request_duration_seconds",
            "How long requests took to answer, by route and outcome.",
            &["route", "outcome"],
        );
        let upstream_duration = histogram_vec(
            "corral_upstream_duration_seconds",
            "How long the upstream took to send its response head, by route.",
            &["route"],
        );
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("registered once");
            metric
        };
        gauge_vec(
            "corral_build_info",
            "The version of corral that is running, and the commit it was built from.",
            &["version", "commit"],
        )
        .with_label_values(&[env!("CARGO_PKG_VERSION"), COMMIT])
        .set(1);
        let config_last_reload = Gauge::new(
            "corral_config_last_reload_success_timestamp_seconds",
            "When the config was last reloaded with success, in seconds since the Unix epoch (0: not since start).",
        )
        .expect("valid metric");
        registry
            .register(Box::new(config_last_reload.clone()))
            .expect("registered once");
        let bus_publish_duration = Histogram::with_opts(
            HistogramOpts::new(
                "corral_bus_publish_duration_seconds",
                "How long publishing one event on the bus took.",
            )
            .buckets(latency_buckets.clone()),
        )
        .expect("valid metric");
        registry
            .register(Box::new(bus_publish_duration.clone()))
            .expect("registered once");
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("registered once");

        let metrics = Self {
            store_operations: counter_vec(
                "corral_store_operations_total",
                "Store calls made, by operation and result (ok, timeout, unavailable, protocol).",
                &["op", "result"],
            ),
            store_duration,
            lease_events: counter_vec(
                "corral_lease_events_total",
                "Lease events: acquired, renewed, lost, taken_over (acquired after another holder's lease ended without a value), abandoned, commit_rejected.",
                &["event"],
            ),
            bus_events: counter_vec(
                "corral_bus_events_total",
                "Outcome events received from the bus, by kind.",
                &["kind"],
            ),
            bus_publish_duration,
            bus_resyncs: counter(
                "corral_bus_reconnects_total",
                "Times the bus reconnected and every live flight re-checked the store.",
            ),
            builds: counter_vec(
                "corral_builds_total",
                "Builds (upstream fetches for the cache) this process ran, by result.",
                &["result"],
            ),
            flight_outcomes: counter_vec(
                "corral_flight_outcomes_total",
                "Flights (one per key per process) that ended, by outcome.",
                &["outcome"],
            ),
            flights_inflight: gauge(
                "corral_flights_inflight",
                "Flights (one per key being resolved) alive in this process right now.",
            ),
            followers_waiting: gauge(
                "corral_followers_waiting",
                "Requests waiting right now on a flight they did not start.",
            ),
            follower_wait,
            poll_rechecks: counter_vec(
                "corral_poll_rechecks_total",
                "Store re-checks made by a timer rather than an event, by whether they found a change (found=\"true\" is an event that was lost or a holder that died).",
                &["found"],
            ),
            corrupt_entries: counter(
                "corral_corrupt_entries_total",
                "Stored values that did not decode or belonged to another key; each was a miss.",
            ),
            values_too_large: counter(
                "corral_values_too_large_total",
                "Built values larger than the store takes; each was not stored and every caller built its own.",
            ),
            l1_hits: counter(
                "corral_l1_hits_total",
                "Answers served from this process's in-memory L1.",
            ),
            l1_misses: counter(
                "corral_l1_misses_total",
                "Lookups that the in-memory L1 could not answer.",
            ),
            wait_timeouts: counter_vec(
                "corral_wait_timeouts_total",
                "Requests that reached their wait timeout before an answer, by route.",
                &["route"],
            ),
            requests: counter_vec(
                "corral_requests_total",
                "Requests answered, by route and outcome (hit, miss, coalesced, stale, pass, bypass, error).",
                &["route", "outcome"],
            ),
            request_duration,
            upstream_requests: counter_vec(
                "corral_upstream_requests_total",
                "Requests sent to the upstream, by route and status class of the answer.",
                &["route", "status_class"],
            ),
            upstream_duration,
            compressions: counter_vec(
                "corral_compressions_total",
                "Answers compressed once when stored, by route and encoding.",
                &["route", "encoding"],
            ),
            decompressions: counter_vec(
                "corral_decompressions_total",
                "Answers decoded on the way to a client that does not accept their stored encoding, by route and encoding.",
                &["route", "encoding"],
            ),
            upstream_errors: counter_vec(
                "corral_upstream_errors_total",
                "Upstream requests that gave no whole answer, by route and reason (connect, connect_timeout, tls, response_header_timeout, read_timeout, body, framing).",
                &["route", "reason"],
            ),
            bus_connected: gauge(
                "corral_bus_connected",
                "Whether the bus subscription is connected (1) or not (0), as of this scrape.",
            ),
            store_connected: gauge(
                "corral_store_connected",
                "Whether the store answered a probe at this scrape (1) or not (0).",
            ),
            l1_bytes: gauge(
                "corral_l1_bytes",
                "Bytes held in this process's in-memory L1.",
            ),
            l1_entries: gauge(
                "corral_l1_entries",
                "Entries held in this process's in-memory L1.",
            ),
            config_reloads: counter_vec(
                "corral_config_reloads_total",
                "Configuration reloads, by result (applied, refused).",
                &["result"],
            ),
            config_last_reload,
            responses: counter_vec(
                "corral_responses_total",
                "Answers sent to clients, by route and status class.",
                &["route", "status_class"],
            ),
            request_bytes: counter_vec(
                "corral_request_body_bytes_total",
                "Request body bytes read from clients, by route.",
                &["route"],
            ),
            response_bytes: counter_vec(
                "corral_response_body_bytes_total",
                "Response body bytes sent to clients, by route.",
                &["route"],
            ),
            purges: counter_vec(
                "corral_purges_total",
                "Purges done, by form (url, prefix, route, tag, unsafe_method).",
                &["form"],
            ),
            purged_keys: counter_vec(
                "corral_purged_keys_total",
                "Keys purges found stored, by form.",
                &["form"],
            ),
            background_refreshes: counter_vec(
                "corral_background_refreshes_total",
                "Refreshes run in the background under the lease, by route, reason and result.",
                &["route", "reason", "result"],
            ),
            revalidations: counter_vec(
                "corral_revalidations_total",
                "Refreshes of a stored entry that asked the source whether it changed, by route and result.",
                &["route", "result"],
            ),
            limit_rejections: counter_vec(
                "corral_limit_rejections_total",
                "Connections and requests refused by a limit, by limit.",
                &["limit"],
            ),
            connections_open: gauge(
                "corral_connections_open",
                "Client connections open right now on the public and admin listeners.",
            ),
            store_breaker_state: gauge_vec(
                "corral_store_breaker_state",
                "The store's circuit breaker: 1 for the state it is in (closed, open, half_open: one probe call out), 0 for the others.",
                &["state"],
            ),
            store_breaker_transitions: counter_vec(
                "corral_store_breaker_transitions_total",
                "Changes of the store's circuit breaker, by the phase entered (closed, open, half_open).",
                &["to"],
            ),
            store_short_circuits: counter(
                "corral_store_short_circuits_total",
                "Store calls failed at once by the open circuit breaker, without calling the store.",
            ),
            orphan_leases: counter_vec(
                "corral_orphan_leases_total",
                "Leases a timed-out ACQUIRE may have created, released once the store answered again, by result (released, absent).",
                &["result"],
            ),
            invalidations_failed: counter_vec(
                "corral_invalidations_failed_total",
                "Invalidations after unsafe requests the store never took, even after retrying, by route and reason.",
                &["route", "reason"],
            ),
            client_errors: counter_vec(
                "corral_client_errors_total",
                "Requests the client broke (request_body: a body that broke off or had bad chunked framing), answered 400, not counted against the upstream.",
                &["reason"],
            ),
            upstream_servers: UpstreamServerMetrics::register(&registry),
            registry,
        };
        for reason in CLIENT_ERRORS {
            metrics.client_errors.with_label_values(&[reason]);
        }
        for result in ORPHAN_RESULTS {
            metrics.orphan_leases.with_label_values(&[result]);
        }
        for event in LEASE_EVENTS {
            metrics.lease_events.with_label_values(&[event]);
        }
        for kind in BUS_EVENT_KINDS {
            metrics.bus_events.with_label_values(&[kind]);
        }
        for found in ["true", "false"] {
            metrics.poll_rechecks.with_label_values(&[found]);
        }
        for result in RELOAD_RESULTS {
            metrics.config_reloads.with_label_values(&[result]);
        }
        for form in PURGE_FORMS {
            metrics.purges.with_label_values(&[form]);
            metrics.purged_keys.with_label_values(&[form]);
        }
        for limit in LIMITS {
            metrics.limit_rejections.with_label_values(&[limit]);
        }
        metrics.breaker_state("closed");
        metrics
    }

    /// Sets the breaker's gauge to `state` (one of [`BREAKER_STATES`]): 1 for it, 0 for the others.
    pub fn breaker_state(&self, state: &str) {
        for each in BREAKER_STATES {
            self.store_breaker_state
                .with_label_values(&[each])
                .set(i64::from(each == state));
        }
    }

    /// Counts a reload that switched new requests to the new file, and notes when.
    pub fn reload_applied(&self) {
        self.config_reloads.with_label_values(&["applied"]).inc();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.config_last_reload.set(now.as_secs_f64());
    }

    /// Counts a reload refused for a problem in the file.
    pub fn reload_refused(&self) {
        self.config_reloads.with_label_values(&["refused"]).inc();
    }

    /// Counts one connection or request refused by `limit` (one of [`LIMITS`]).
    pub fn limit_rejected(&self, limit: &str) {
        self.limit_rejections.with_label_values(&[limit]).inc();
    }

    /// Counts one request the client broke (`reason` one of [`CLIENT_ERRORS`]).
    pub fn client_error(&self, reason: &str) {
        self.client_errors.with_label_values(&[reason]).inc();
    }

    /// Creates a route's series at zero: every outcome and status class, its wait timeouts, its
    /// background refreshes and its latencies. A rare outcome is then a series at 0 from the first scrape, and a rate sees
    /// a route's first requests (Prometheus cannot tell how a series that appears mid-burst
    /// started).
    pub fn add_route(&self, route: &str) {
        for outcome in OUTCOMES {
            self.requests.with_label_values(&[route, outcome]);
            self.request_duration.with_label_values(&[route, outcome]);
        }
        for class in STATUS_CLASSES {
            self.upstream_requests.with_label_values(&[route, class]);
        }
        for class in RESPONSE_CLASSES {
            self.responses.with_label_values(&[route, class]);
        }
        self.request_bytes.with_label_values(&[route]);
        self.response_bytes.with_label_values(&[route]);
        self.wait_timeouts.with_label_values(&[route]);
        for reason in UPSTREAM_ERROR_REASONS {
            self.upstream_errors.with_label_values(&[route, reason]);
        }
        for reason in REFRESH_REASONS {
            for result in REFRESH_RESULTS {
                self.background_refreshes
                    .with_label_values(&[route, reason, result]);
            }
        }
        for result in REVALIDATION_RESULTS {
            self.revalidations.with_label_values(&[route, result]);
        }
        self.upstream_duration.with_label_values(&[route]);
        self.follower_wait.with_label_values(&[route]);
        for coding in CODINGS {
            self.compressions.with_label_values(&[route, coding]);
            self.decompressions.with_label_values(&[route, coding]);
        }
        self.upstream_servers.add_route(route);
    }

    /// Counts one store call.
    pub fn store_call(&self, op: &str, result: &str, took: Duration) {
        self.store_operations.with_label_values(&[op, result]).inc();
        self.store_duration
            .with_label_values(&[op])
            .observe(took.as_secs_f64());
    }

    /// Store calls of one operation so far, whatever their result.
    pub fn store_calls(&self, op: &str) -> u64 {
        ["ok", "timeout", "unavailable", "protocol", "circuit_open"]
            .iter()
            .map(|result| self.store_operations.with_label_values(&[op, result]).get())
            .sum()
    }

    /// Everything registered, in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let families = self.registry.gather();
        if TextEncoder::new().encode(&families, &mut out).is_err() {
            return String::new();
        }
        String::from_utf8(out).unwrap_or_default()
    }

    pub fn lease(&self, event: &str) {
        self.lease_events.with_label_values(&[event]).inc();
    }

    pub fn lease_count(&self, event: &str) -> u64 {
        self.lease_events.with_label_values(&[event]).get()
    }

    pub fn build(&self, result: &str) {
        self.builds.with_label_values(&[result]).inc();
    }

    pub fn build_count(&self, result: &str) -> u64 {
        self.builds.with_label_values(&[result]).get()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------------------------
// Bodies counted as they pass

#[cfg(feature = "server")]
pub use counted::{CountedBody, OnSent};

#[cfg(feature = "server")]
mod counted {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use axum::body::Body;
    use bytes::Bytes;
    use hyper::body::{Body as HttpBody, Frame, SizeHint};
    use prometheus::IntCounter;

    use super::{Metrics, RESPONSE_CLASSES};

    /// Told the body bytes sent, once, when a counted body is done or dropped (the access log).
    pub type OnSent = Box<dyn FnOnce(u64) + Send>;

    /// A body that adds the length of every data frame to a counter as the frame passes, and
    /// otherwise is the body it wraps (its size hint too, so a `Content-Length` stays one).
    pub struct CountedBody {
        inner: Body,
        bytes: IntCounter,
        /// Data bytes passed so far.
        sent: u64,
        on_sent: Option<OnSent>,
    }

    impl CountedBody {
        fn new(inner: Body, bytes: IntCounter, on_sent: Option<OnSent>) -> Self {
            CountedBody {
                inner,
                bytes,
                sent: 0,
                on_sent,
            }
        }
    }

    impl Drop for CountedBody {
        fn drop(&mut self) {
            if let Some(on_sent) = self.on_sent.take() {
                on_sent(self.sent);
            }
        }
    }

    impl HttpBody for CountedBody {
        type Data = Bytes;
        type Error = axum::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
            let polled = Pin::new(&mut self.inner).poll_frame(cx);
            if let Poll::Ready(Some(Ok(frame))) = &polled
                && let Some(data) = frame.data_ref()
            {
                self.bytes.inc_by(data.len() as u64);
                self.sent += data.len() as u64;
            }
            polled
        }

        fn is_end_stream(&self) -> bool {
            self.inner.is_end_stream()
        }

        fn size_hint(&self) -> SizeHint {
            self.inner.size_hint()
        }
    }

    impl Metrics {
        /// The request, its body counted in `corral_request_body_bytes_total{route}` as the proxy
        /// reads it. A body that is already over (most GETs) is left as it is.
        pub fn count_request(
            &self,
            route: &str,
            request: http::Request<Body>,
        ) -> http::Request<Body> {
            if request.body().is_end_stream() {
                return request;
            }
            let bytes = self.request_bytes.with_label_values(&[route]);
            request.map(|inner| Body::new(CountedBody::new(inner, bytes, None)))
        }

        /// The response, counted in `corral_responses_total{route,status_class}`, its body in
        /// `corral_response_body_bytes_total{route}` as it is sent; `on_sent` is told the body
        /// bytes sent once the body is done or dropped.
        pub fn count_response(
            &self,
            route: &str,
            response: http::Response<Body>,
            on_sent: Option<OnSent>,
        ) -> http::Response<Body> {
            let class = usize::from(response.status().as_u16() / 100).saturating_sub(1);
            let class = RESPONSE_CLASSES[class.min(RESPONSE_CLASSES.len() - 1)];
            self.responses.with_label_values(&[route, class]).inc();
            if response.body().is_end_stream() && on_sent.is_none() {
                return response;
            }
            let bytes = self.response_bytes.with_label_values(&[route]);
            response.map(|inner| Body::new(CountedBody::new(inner, bytes, on_sent)))
        }
    }

    #[cfg(test)]
    mod tests {
        use http_body_util::BodyExt;

        use super::*;

        #[tokio::test]
        async fn a_counted_response_keeps_its_length_and_counts_its_class_and_bytes() {
            let metrics = Metrics::new();
            metrics.add_route("r");
            let response = http::Response::builder()
                .status(503)
                .body(Body::from("twelve bytes"))
                .expect("a response");
            let counted = metrics.count_response("r", response, None);
            assert_eq!(counted.body().size_hint().exact(), Some(12));
            let body = counted.into_body().collect().await.expect("the body");
            assert_eq!(body.to_bytes().len(), 12);
            assert_eq!(metrics.responses.with_label_values(&["r", "5xx"]).get(), 1);
            assert_eq!(metrics.responses.with_label_values(&["r", "2xx"]).get(), 0);
            assert_eq!(metrics.response_bytes.with_label_values(&["r"]).get(), 12);
        }

        #[tokio::test]
        async fn a_streamed_request_body_is_counted_as_it_is_read() {
            let metrics = Metrics::new();
            let chunks = ["abc", "de"].map(|c| Ok::<_, std::io::Error>(Bytes::from(c)));
            let request = http::Request::new(Body::from_stream(futures::stream::iter(chunks)));
            let counted = metrics.count_request("r", request);
            assert_eq!(metrics.request_bytes.with_label_values(&["r"]).get(), 0);
            counted.into_body().collect().await.expect("the body");
            assert_eq!(metrics.request_bytes.with_label_values(&["r"]).get(), 5);
        }

        #[test]
        fn the_breaker_gauge_is_one_for_its_state_only() {
            let metrics = Metrics::new();
            metrics.breaker_state("half_open");
            let states: Vec<i64> = super::super::BREAKER_STATES
                .iter()
                .map(|s| metrics.store_breaker_state.with_label_values(&[s]).get())
                .collect();
            assert_eq!(states, [0, 0, 1]);
        }
    }
}

// ----- upstream servers

/// The `reason` label of `corral_upstream_retries_total`: what failed in the try that was sent
/// again.
pub const RETRY_REASONS: [&str; 4] = ["connect", "reset", "response_header_timeout", "status"];

/// Per upstream server (`server`: the URL's authority, or the address a name resolved to; at
/// most 64 servers a route, 16 addresses a name) and per route for retries. A server's series
/// are removed when a reload or a new resolution drops it.
#[derive(Clone)]
pub struct UpstreamServerMetrics {
    /// Requests by route, server and status class ([`STATUS_CLASSES`]; `error`: no answer).
    pub requests: IntCounterVec,
    /// Time to the response head, by route and server, in seconds.
    pub duration: HistogramVec,
    /// 1 while the server is in rotation, 0 while its health checks fail or it is ejected.
    pub healthy: IntGaugeVec,
    /// Times the server was ejected for failing requests in a row.
    pub ejections: IntCounterVec,
    /// Tries sent again, by route and reason ([`RETRY_REASONS`]).
    pub retries: IntCounterVec,
    /// Retries not sent because the route's retry budget was spent, by route.
    pub retry_budget_exhausted: IntCounterVec,
}

impl UpstreamServerMetrics {
    fn register(registry: &Registry) -> Self {
        fn registered<M: prometheus::core::Collector + Clone + 'static>(
            registry: &Registry,
            metric: M,
        ) -> M {
            registry
                .register(Box::new(metric.clone()))
                .expect("registered once");
            metric
        }
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registered(registry, metric)
        };
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "corral_upstream_server_duration_seconds",
                "How long each upstream server took to send its response head, by route and server.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route", "server"],
        )
        .expect("valid metric");
        let healthy = IntGaugeVec::new(
            Opts::new(
                "corral_upstream_server_healthy",
                "Whether each upstream server is in rotation (1) or out, failing its health checks or ejected (0).",
            ),
            &["route", "server"],
        )
        .expect("valid metric");
        UpstreamServerMetrics {
            requests: counter(
                "corral_upstream_server_requests_total",
                "Requests sent to each upstream server, by route, server and status class of the answer.",
                &["route", "server", "status_class"],
            ),
            duration: registered(registry, duration),
            healthy: registered(registry, healthy),
            ejections: counter(
                "corral_upstream_ejections_total",
                "Times an upstream server was ejected for failing requests in a row, by route and server.",
                &["route", "server"],
            ),
            retries: counter(
                "corral_upstream_retries_total",
                "Upstream tries sent again, by route and reason (connect, reset, response_header_timeout, status).",
                &["route", "reason"],
            ),
            retry_budget_exhausted: counter(
                "corral_upstream_retry_budget_exhausted_total",
                "Retries not sent because the route's retry budget was spent, by route.",
                &["route"],
            ),
        }
    }

    /// Series that no registry exports: for a pool made for a request still under a replaced
    /// config, whose servers must not show (nor reset) the live pool's.
    pub fn detached() -> Self {
        Self::register(&Registry::new())
    }

    /// A route's retry series at zero.
    fn add_route(&self, route: &str) {
        for reason in RETRY_REASONS {
            self.retries.with_label_values(&[route, reason]);
        }
        self.retry_budget_exhausted.with_label_values(&[route]);
    }

    /// Removes the series of a server that is gone.
    pub fn forget(&self, route: &str, server: &str) {
        for class in STATUS_CLASSES {
            let _ = self.requests.remove_label_values(&[route, server, class]);
        }
        let _ = self.duration.remove_label_values(&[route, server]);
        let _ = self.healthy.remove_label_values(&[route, server]);
        let _ = self.ejections.remove_label_values(&[route, server]);
    }
}
