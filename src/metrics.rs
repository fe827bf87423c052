//! Every metric corral exports, registered once.
//!
//! Each [`Metrics`] owns its own registry, so several engines in one process (tests, the demo) keep
//! separate counts. Labels are bounded: operation names and fixed outcome words, never keys.
//!
//! Series whose label values are a fixed list are created at zero for every value (per route, once
//! the proxy names its routes with [`Metrics::add_route`]): a rare event then shows as a series at
//! 0 from the first scrape, so dashboards and alerts see "none yet" rather than "no data".

use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
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

/// The `kind` label of `corral_bus_events_total`.
pub const BUS_EVENT_KINDS: [&str; 6] = [
    "ready",
    "failed",
    "uncacheable",
    "abandoned",
    "deleted",
    "undecodable",
];

/// The `result` label of `corral_config_reloads_total`.
pub const RELOAD_RESULTS: [&str; 2] = ["ok", "error"];

/// The `form` label of `corral_purges_total` and `corral_purged_keys_total`.
pub const PURGE_FORMS: [&str; 5] = ["url", "prefix", "route", "tag", "unsafe_method"];

/// The `reason` label of `corral_background_refreshes_total`.
pub const REFRESH_REASONS: [&str; 2] = ["stale", "early"];

/// The `result` label of `corral_background_refreshes_total`.
pub const REFRESH_RESULTS: [&str; 4] = ["stored", "failed", "uncacheable", "abandoned"];

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
    /// Config reloads, by result.
    pub config_reloads: IntCounterVec,
    /// Purges done, by form: url, prefix, route, tag, unsafe_method.
    pub purges: IntCounterVec,
    /// Keys a purge found stored (a value, lease or pass marker), by form (a route purge counts
    /// none: it is one generation bump).
    pub purged_keys: IntCounterVec,
    /// Refreshes run in the background under the lease while callers were answered from the
    /// stored copy, by route, why (`stale`: stale-while-revalidate; `early`: early refresh) and
    /// result (`stored`, `failed`, `uncacheable`, `abandoned`).
    pub background_refreshes: IntCounterVec,
    /// Connections and requests refused by a limit, by limit (see [`LIMITS`]).
    pub limit_rejections: IntCounterVec,
    /// Client connections open right now, both listeners together.
    pub connections_open: IntGauge,
    /// The store's circuit breaker: 0 closed, 1 open, 2 half-open (its probe is out).
    pub store_breaker_state: IntGauge,
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
}

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
        let latency_buckets = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
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
        let build_info = IntGaugeVec::new(
            Opts::new(
                "corral_build_info",
                "The version of corral that is running.",
            ),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        registry
            .register(Box::new(build_info))
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
                "Configuration reloads, by result (ok, error).",
                &["result"],
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
            limit_rejections: counter_vec(
                "corral_limit_rejections_total",
                "Connections and requests refused by a limit, by limit.",
                &["limit"],
            ),
            connections_open: gauge(
                "corral_connections_open",
                "Client connections open right now on the public and admin listeners.",
            ),
            store_breaker_state: gauge(
                "corral_store_breaker_state",
                "The store's circuit breaker: 0 closed, 1 open, 2 half-open (one probe call out).",
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
        metrics
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
        self.upstream_duration.with_label_values(&[route]);
        self.follower_wait.with_label_values(&[route]);
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
