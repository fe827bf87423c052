//! Traces of real `corral serve` processes, as a collector receives them: an OTLP/HTTP receiver in
//! the test decodes every batch. A burst on three replicas shows one upstream fetch, and every
//! request, on every replica, links to it; a client's `traceparent` is continued; the upstream
//! sees the fetch's `traceparent` (a pass-through's, the request's); with traces off nothing is
//! exported nor added; and a collector that never answers costs neither requests nor shutdown.

use crate::support;

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::net::TcpListener;

use support::http::Http;
use support::process::{ConfigFrom, CorralServe, ServeReplicas};
use support::proxy::fill;
use support::servers::free_port;
use support::upstream::Upstream;
use support::{TestNats, TestRedis, eventually, patience};

/// `{{backing}}` names the store and bus, `{{tracing}}` the `tracing:` section (or nothing).
const CONFIG: &str = r#"
listen: {{listen}}
admin: { listen: {{admin}} }
namespace: traces
{{backing}}
{{tracing}}
defaults: { ttl: 60s, wait_timeout: 20s, lease_ttl: 20s, poll_interval: 5s }
routes:
  - name: reports
    match: { path_prefix: /reports }
    upstream: {{upstream}}
  - name: direct
    match: { path_prefix: /direct }
    upstream: {{upstream}}
    cache: false
"#;

/// The `SpanKind` numbers of the OTLP protocol.
const SERVER: i32 = 2;
const CLIENT: i32 = 3;

/// A client's trace context, from the W3C recommendation's example.
const CLIENT_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_SPAN: &str = "b7ad6b7169203331";

/// One span as the collector received it, with the `service.instance.id` of its batch.
struct Received {
    instance: String,
    span: Span,
}

/// An OTLP/HTTP receiver: `POST /v1/traces` with a protobuf body, answered 200.
struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Received>>>,
    posts: Arc<Mutex<usize>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local_addr");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let posts = Arc::new(Mutex::new(0));
        let (kept, counted) = (spans.clone(), posts.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (spans, posts) = (kept.clone(), counted.clone());
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let (spans, posts) = (spans.clone(), posts.clone());
                    async move {
                        let path = request.uri().path().to_owned();
                        let body = request.into_body().collect().await.map(|b| b.to_bytes());
                        *posts.lock().unwrap() += 1;
                        let status = match body {
                            Ok(body) if path == "/v1/traces" => {
                                let export = ExportTraceServiceRequest::decode(body)
                                    .expect("an OTLP protobuf body");
                                spans.lock().unwrap().extend(received(export));
                                200
                            }
                            _ => 404,
                        };
                        let mut response = Response::new(Full::new(Bytes::new()));
                        *response.status_mut() = status.try_into().expect("a status");
                        response.headers_mut().insert(
                            "content-type",
                            "application/x-protobuf".parse().expect("a value"),
                        );
                        Ok::<_, Infallible>(response)
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Collector {
            addr,
            spans,
            posts,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The spans received so far whose kind is `kind`.
    fn take(&self, kind: i32) -> Vec<Received> {
        let mut spans = self.spans.lock().unwrap();
        let (taken, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut *spans)
            .into_iter()
            .partition(|r| r.span.kind == kind);
        *spans = kept;
        taken
    }

    fn posts(&self) -> usize {
        *self.posts.lock().unwrap()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Every span of an export, each with its resource's `service.instance.id`.
fn received(export: ExportTraceServiceRequest) -> Vec<Received> {
    let mut out = Vec::new();
    for resource_spans in export.resource_spans {
        let instance = resource_spans
            .resource
            .iter()
            .flat_map(|resource| &resource.attributes)
            .find(|kv| kv.key == "service.instance.id")
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                any_value::Value::StringValue(text) => Some(text.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                out.push(Received {
                    instance: instance.clone(),
                    span,
                });
            }
        }
    }
    out
}

/// A span attribute's value as text.
fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span
        .attributes
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?;
    match value.value.as_ref()? {
        any_value::Value::StringValue(text) => Some(text.clone()),
        any_value::Value::IntValue(n) => Some(n.to_string()),
        _ => None,
    }
}

/// `tracing:` sending every trace to `collector`, exporting within `timeout`.
fn tracing_to(url: &str, timeout: &str) -> String {
    sampled(url, timeout, "1.0")
}

/// `tracing:` keeping `ratio` of the traces that start at corral.
fn sampled(url: &str, timeout: &str, ratio: &str) -> String {
    format!(
        "tracing: {{ otlp_endpoint: \"{url}\", sampling_ratio: {ratio}, service_name: corral-test, \
         export_timeout: {timeout}, resource_attributes: {{ deployment.environment: test }} }}"
    )
}

fn config(backing: &str, tracing: &str, upstream: &Upstream) -> String {
    CONFIG
        .replace("{{backing}}", backing)
        .replace("{{tracing}}", tracing)
        .replace("{{upstream}}", &upstream.url())
}

/// One `corral serve` on the memory store in `dir`.
async fn serve_one(dir: &std::path::Path, yaml: &str, env: &[(&str, &str)]) -> CorralServe {
    let public = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let text = fill(
        yaml,
        &[
            ("listen", &public.to_string()),
            ("admin", &admin.to_string()),
        ],
    );
    let path = dir.join("corral.yaml");
    std::fs::write(&path, text).expect("write the config");
    CorralServe::start_with_env(&path, public, admin, ConfigFrom::Flag, env).await
}

/// SIGTERM, then waits for a clean exit (which flushes the spans still queued).
async fn stop(replica: &mut CorralServe) {
    assert!(replica.signal(libc::SIGTERM), "SIGTERM sent");
    let status = replica.wait_exit(patience()).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "corral serve exits 0 after SIGTERM: {status:?}\n{}",
        replica.output()
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// 60 requests for one key on three replicas (Redis store, NATS bus) are answered by one upstream
/// fetch: the collector gets exactly one fetch span, the upstream got that span's `traceparent`,
/// and all 60 request spans, from all three replicas, link to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_on_three_replicas_links_every_request_to_the_one_fetch() {
    let redis = TestRedis::start().await;
    let nats = TestNats::start().await;
    let collector = Collector::start().await;
    let upstream = Upstream::start().await;
    let backing = format!(
        "store: {{ kind: redis, url: \"{}\" }}\nbus: {{ kind: nats, url: \"{}\" }}",
        redis.url(),
        nats.url()
    );
    let mut replicas = ServeReplicas::start(
        3,
        &config(&backing, &tracing_to(&collector.url(), "5s"), &upstream),
    )
    .await;
    let http = Http::new();

    let hold = upstream.hold("/reports/burst");
    let mut calls = Vec::new();
    for i in 0..60 {
        let url = format!("{}/reports/burst", replicas[i % 3].url());
        calls.push(tokio::spawn(http.get(url).send()));
    }
    upstream.wait_for_hits("/reports/burst", 1).await;
    for replica in replicas.all() {
        eventually("each replica has a flight for the key", || async {
            support::process::metric_sum(&replica.metrics().await, "corral_flights_inflight", &[])
                == 1.0
        })
        .await;
    }
    hold.release();
    let mut outcomes = BTreeSet::new();
    for call in calls {
        let reply = call.await.expect("join");
        assert_eq!(reply.status, 200, "{}", reply.text());
        outcomes.insert(reply.x_cache().to_owned());
    }
    assert_eq!(upstream.hits("/reports/burst"), 1, "fetched once for all");
    assert!(outcomes.contains("COALESCED"), "{outcomes:?}");
    for i in 0..3 {
        stop(&mut replicas[i]).await;
    }

    let fetches = collector.take(CLIENT);
    assert_eq!(fetches.len(), 1, "exactly one upstream fetch span");
    let fetch = &fetches[0].span;
    assert_eq!(fetch.name, "upstream fetch");
    assert_eq!(
        attribute(fetch, "corral.fetch.role").as_deref(),
        Some("leader")
    );
    let (trace_id, span_id) = (hex(&fetch.trace_id), hex(&fetch.span_id));
    let sent = upstream.requests_for("/reports/burst");
    assert_eq!(
        sent[0].header("traceparent"),
        Some(format!("00-{trace_id}-{span_id}-01").as_str()),
        "the upstream got the fetch span's traceparent"
    );

    let requests = collector.take(SERVER);
    assert_eq!(requests.len(), 60, "one span per request");
    let mut instances = BTreeSet::new();
    for request in &requests {
        let span = &request.span;
        assert_eq!(span.name, "GET reports");
        assert_eq!(
            attribute(span, "http.response.status_code").as_deref(),
            Some("200")
        );
        assert!(attribute(span, "corral.key").is_some_and(|key| key.len() == 16));
        assert!(
            span.links
                .iter()
                .any(|link| link.trace_id == fetch.trace_id && link.span_id == fetch.span_id),
            "a request span ({:?}, outcome {:?}) links to the fetch",
            request.instance,
            attribute(span, "corral.outcome")
        );
        instances.insert(request.instance.clone());
    }
    assert_eq!(
        instances.len(),
        3,
        "spans from three replicas: {instances:?}"
    );
    // The fetch is the child of the request that led it.
    let leader = requests
        .iter()
        .filter(|r| r.span.span_id == fetch.parent_span_id)
        .collect::<Vec<_>>();
    assert_eq!(leader.len(), 1, "the fetch's parent is one request span");
    assert_eq!(leader[0].span.trace_id, fetch.trace_id);
    assert_eq!(
        attribute(&leader[0].span, "corral.outcome").as_deref(),
        Some("miss")
    );
}

/// A client's `traceparent` is continued: the request span is its child, in its trace; the fetch
/// is the request's child; a pass-through sends the request span's `traceparent` upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_traceparent_is_continued_and_propagated() {
    let collector = Collector::start().await;
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let yaml = config(
        "store: { kind: memory }",
        &tracing_to(&collector.url(), "5s"),
        &upstream,
    );
    let mut replica = serve_one(dir.path(), &yaml, &[("CORRAL_LOG_FORMAT", "json")]).await;
    let http = Http::new();
    let client = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");

    for path in ["/reports/traced", "/direct/traced"] {
        let reply = http
            .get(format!("{}{path}", replica.url()))
            .header("traceparent", &client)
            .send()
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert!(reply.header("corral-fetch-id").is_none(), "never sent");
    }
    stop(&mut replica).await;

    let requests = collector.take(SERVER);
    assert_eq!(requests.len(), 2);
    for request in &requests {
        assert_eq!(
            hex(&request.span.trace_id),
            CLIENT_TRACE,
            "the client's trace"
        );
        assert_eq!(
            hex(&request.span.parent_span_id),
            CLIENT_SPAN,
            "the client's span is the parent"
        );
    }
    let cached = requests
        .iter()
        .find(|r| attribute(&r.span, "http.route").as_deref() == Some("reports"))
        .expect("the cached request's span");
    let fetches = collector.take(CLIENT);
    assert_eq!(fetches.len(), 1);
    assert_eq!(fetches[0].span.parent_span_id, cached.span.span_id);
    assert_eq!(hex(&fetches[0].span.trace_id), CLIENT_TRACE);

    // The access log names the fetch by its id alone, as the upstream got it.
    let fetch_id = upstream.requests_for("/reports/traced")[0]
        .header("x-request-id")
        .expect("the fetch's id")
        .to_owned();
    let logged: Vec<String> = replica
        .output()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["target"] == "corral::access" && line["route"] == "reports")
        .map(|line| line["fetch_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(logged, [fetch_id]);

    let direct = requests
        .iter()
        .find(|r| attribute(&r.span, "http.route").as_deref() == Some("direct"))
        .expect("the pass-through's span");
    assert_eq!(
        upstream.requests_for("/direct/traced")[0].header("traceparent"),
        Some(format!("00-{CLIENT_TRACE}-{}-01", hex(&direct.span.span_id)).as_str()),
        "a pass-through sends its request span's traceparent"
    );
}

/// With `sampling_ratio: 0`, traces that start at corral are not kept, but a client that asks for
/// its trace to be sampled gets it (parent-based sampling). Unsampled, the upstream still gets a
/// `traceparent` (flags 00), and the answer links to no span that was never exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_ratio_keeps_only_the_traces_a_client_samples() {
    let collector = Collector::start().await;
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let yaml = config(
        "store: { kind: memory }",
        &sampled(&collector.url(), "5s", "0"),
        &upstream,
    );
    let mut replica = serve_one(dir.path(), &yaml, &[]).await;
    let http = Http::new();
    let unsampled = http
        .get(format!("{}/reports/unsampled", replica.url()))
        .send()
        .await;
    assert_eq!(unsampled.status, 200, "{}", unsampled.text());
    // A hit on the unsampled fetch's answer, from a sampled client: it links to nothing.
    let client = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    for path in ["/reports/unsampled", "/reports/sampled"] {
        let reply = http
            .get(format!("{}{path}", replica.url()))
            .header("traceparent", &client)
            .send()
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    stop(&mut replica).await;

    let sent = upstream.requests_for("/reports/unsampled");
    let traceparent = sent[0]
        .header("traceparent")
        .expect("a traceparent upstream");
    assert!(traceparent.ends_with("-00"), "not sampled: {traceparent}");
    let requests = collector.take(SERVER);
    assert_eq!(requests.len(), 2, "only the client's sampled requests");
    for request in &requests {
        assert_eq!(hex(&request.span.trace_id), CLIENT_TRACE);
    }
    let hit = requests
        .iter()
        .find(|r| attribute(&r.span, "url.path").as_deref() == Some("/reports/unsampled"))
        .expect("the hit's span");
    assert_eq!(
        attribute(&hit.span, "corral.outcome").as_deref(),
        Some("hit")
    );
    assert!(hit.span.links.is_empty(), "no link to an unsampled fetch");
    let fetches = collector.take(CLIENT);
    assert_eq!(fetches.len(), 1, "only the sampled request's fetch");
    assert_eq!(hex(&fetches[0].span.trace_id), CLIENT_TRACE);
}

/// With no `tracing:` section, nothing is exported, even with the standard OTLP environment
/// variable pointing at a live collector, and the upstream sees what it saw before traces existed:
/// a fetch carries no `traceparent`, a pass-through the client's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_traces_off_nothing_is_exported_nor_added() {
    let collector = Collector::start().await;
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let yaml = config("store: { kind: memory }", "", &upstream);
    let endpoint = collector.url();
    let mut replica = serve_one(
        dir.path(),
        &yaml,
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())],
    )
    .await;
    let http = Http::new();
    let client = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    for path in ["/reports/untraced", "/direct/untraced"] {
        let reply = http
            .get(format!("{}{path}", replica.url()))
            .header("traceparent", &client)
            .send()
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    stop(&mut replica).await;

    assert_eq!(collector.posts(), 0, "no export attempted");
    assert_eq!(
        upstream.requests_for("/reports/untraced")[0].header("traceparent"),
        None,
        "a cacheable fetch forwards only what the key holds"
    );
    assert_eq!(
        upstream.requests_for("/direct/untraced")[0].header("traceparent"),
        Some(client.as_str()),
        "a pass-through forwards the client's, untouched"
    );
}

/// A collector that accepts connections and never answers: requests are served as ever, and
/// shutdown gives up on the flush after the export timeout instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_costs_neither_requests_nor_shutdown() {
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", silent.local_addr().expect("local_addr"));
    // Accepts and holds every connection, reading nothing and answering nothing.
    let held = Arc::new(Mutex::new(Vec::new()));
    let holding = held.clone();
    let accepting = tokio::spawn(async move {
        while let Ok((stream, _)) = silent.accept().await {
            holding.lock().unwrap().push(stream);
        }
    });
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let yaml = config(
        "store: { kind: memory }",
        &tracing_to(&url, "1s"),
        &upstream,
    );
    let mut replica = serve_one(dir.path(), &yaml, &[]).await;
    let http = Http::new();
    for i in 0..20 {
        let reply = http
            .get(format!("{}/reports/dark-{}", replica.url(), i % 4))
            .send()
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert!(replica.signal(libc::SIGTERM), "SIGTERM sent");
    // The flush waits for the export timeout (1s) and a second more at most; well within this.
    let status = replica.wait_exit(Duration::from_secs(15)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "corral serve exits 0 with its collector silent: {status:?}\n{}",
        replica.output()
    );
    accepting.abort();
}
