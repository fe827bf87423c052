//! Traces: OpenTelemetry spans that show coalescing, exported over OTLP/HTTP (protobuf).
//!
//! Off unless the config has a `tracing:` section; then each request is a span (its route,
//! outcome, status and key prefix as attributes), continuing the client's W3C `traceparent`, and
//! each upstream fetch is a span of its own, a child of the request that started it. The fetch's
//! span context travels with its answer: fetch → entry (after the fetch id, in the header that
//! already carries it to the access log) → the store, the READY event's inline value, the FAILED
//! event's error response, and every replica's L1. So every request that answer reaches, on any
//! replica, links to the one fetch that made it, and one trace view shows a burst of requests on
//! many replicas answered by a single fetch.
//!
//! Off, the cost on the hot path is one load of `TRACER` per request and per fetch: no span, no
//! header parsed, added or looked up, no allocation.
//!
//! Spans are batched on the SDK's own thread and posted through a hyper client on the server's
//! runtime (no gRPC stack, no second HTTP client). The queue is bounded (`tracing.max_queue`);
//! spans past it are dropped, and the SDK logs the drop. Shutdown flushes within
//! `tracing.export_timeout` and never waits longer, whether or not the collector answers.

use std::fmt;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, Span,
};

use crate::config::TracingSettings;

/// The tracer, once `tracing:` turned traces on; unset, nothing here does any work.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// The W3C trace context header (<https://www.w3.org/TR/trace-context/>).
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The most bytes of a collector's answer read (it is only looked at for errors).
const ANSWER_MAX: usize = 64 * 1024;

/// Why traces could not be turned on.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot make the OTLP exporter: {0}")]
    Exporter(String),
    #[error("traces were already turned on in this process")]
    AlreadyOn,
}

/// Turns traces on for this process, exporting to `settings.endpoint`. Must be called on the
/// runtime the exports should run on. The [`Exporting`] it returns flushes at shutdown.
pub fn start(settings: &TracingSettings) -> Result<Exporting, TelemetryError> {
    let client = ExportClient::new(settings.export_timeout)?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(settings.endpoint.clone())
        .with_timeout(settings.export_timeout)
        .build()
        .map_err(|error| TelemetryError::Exporter(error.to_string()))?;
    let batches = BatchConfigBuilder::default()
        .with_max_queue_size(settings.max_queue)
        .with_max_export_batch_size(settings.max_queue.min(512))
        .build();
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(batches)
        .build();
    let mut attributes = vec![KeyValue::new("service.instance.id", instance_id())];
    attributes.extend(
        settings
            .resource_attributes
            .iter()
            .map(|(name, value)| KeyValue::new(name.clone(), value.clone())),
    );
    let resource = Resource::builder()
        .with_service_name(settings.service_name.clone())
        .with_attributes(attributes)
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            settings.sampling_ratio,
        ))))
        .with_resource(resource)
        .build();
    TRACER
        .set(provider.tracer("corral"))
        .map_err(|_| TelemetryError::AlreadyOn)?;
    Ok(Exporting {
        provider,
        deadline: settings.export_timeout,
    })
}

/// Whether traces are on in this process.
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

/// This process among its replicas: the host's name and the process id (two replicas on one host
/// differ by the second).
fn instance_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|name| !name.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|name| name.trim().to_owned())
        })
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}:{}", std::process::id())
}

/// The exporter of a process whose traces are on; [`Exporting::shutdown`] flushes it.
pub struct Exporting {
    provider: SdkTracerProvider,
    /// The longest the last flush may take.
    deadline: Duration,
}

impl Exporting {
    /// Exports the spans still queued and stops, waiting at most the export timeout (plus a
    /// second for the SDK's thread to stop): a collector that is down costs that, never more.
    pub async fn shutdown(self) {
        let deadline = self.deadline;
        let provider = self.provider;
        // The SDK blocks its caller while its thread exports; that thread's exports run on this
        // runtime, so the blocking wait must not hold one of its workers.
        let flushed = tokio::time::timeout(
            deadline + Duration::from_secs(1),
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(deadline)),
        )
        .await;
        match flushed {
            Ok(Ok(Ok(()))) => tracing::debug!("traces flushed"),
            Ok(Ok(Err(error))) => {
                tracing::warn!(%error, "traces were not all exported at shutdown");
            }
            Ok(Err(error)) => tracing::warn!(%error, "the trace flush failed"),
            Err(_) => tracing::warn!(
                within = ?deadline,
                "the trace flush did not end in time; the spans still queued are dropped"
            ),
        }
    }
}

// ---------------------------------------------------------------------- spans ----

/// A request's span, when traces are on (else nothing at all). Boxed: a span is a few hundred
/// bytes, which every request's future would otherwise carry and move, traced or not.
pub struct RequestSpan(Option<Box<Span>>);

/// The span context of the request a fetch runs for, kept in the request's extensions so the
/// fetch (in the flight's own task) is its child.
#[derive(Clone, Debug)]
pub struct RequestTrace(pub SpanContext);

impl RequestSpan {
    /// Starts the span of a request, continuing the client's `traceparent` and `tracestate` when
    /// they are valid; then puts this span's own `traceparent` in `headers` (what a pass-through
    /// forwards) and its context in `extensions` (what a fetch is the child of). Does nothing
    /// when traces are off.
    #[inline]
    pub fn start<B>(request: &mut http::Request<B>) -> RequestSpan {
        match TRACER.get() {
            None => RequestSpan(None),
            Some(tracer) => RequestSpan(Some(Box::new(Self::started(tracer, request)))),
        }
    }

    fn started<B>(tracer: &SdkTracer, request: &mut http::Request<B>) -> Span {
        let method = request.method();
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(request.headers()));
        let span = tracer
            .span_builder(method.to_string())
            .with_kind(SpanKind::Server)
            .with_attributes([KeyValue::new("http.request.method", method.to_string())])
            .start_with_context(tracer, &parent);
        let context = span.span_context().clone();
        if let Some(value) = traceparent(&context) {
            request.headers_mut().insert(TRACEPARENT, value);
        }
        request.extensions_mut().insert(RequestTrace(context));
        span
    }

    /// Ends the span with how the request was answered: its route (also the span's name), the
    /// outcome, the status, the first bytes of its key, and a link to the fetch whose answer it
    /// got (`fetch`, its fetch id header: the id, then the span), on whichever replica it ran.
    #[inline]
    pub fn end(self, answer: Ended<'_>) {
        if let Some(span) = self.0 {
            Self::ended(*span, answer);
        }
    }

    fn ended(mut span: Span, answer: Ended<'_>) {
        span.update_name(format!("{} {}", answer.method, answer.route));
        span.set_attribute(KeyValue::new("http.route", answer.route.to_owned()));
        span.set_attribute(KeyValue::new("url.path", answer.path.to_owned()));
        span.set_attribute(KeyValue::new("corral.outcome", answer.outcome));
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(answer.status),
        ));
        if let Some(key) = answer.key {
            span.set_attribute(KeyValue::new("corral.key", key_prefix(key)));
        }
        if let Some(fetch) = answer.fetch.and_then(fetch_span) {
            span.add_link(
                fetch,
                vec![KeyValue::new("corral.link", "answered-by-fetch")],
            );
        }
        if answer.status >= 500 {
            span.set_status(opentelemetry::trace::Status::error(""));
        }
        span.end();
    }
}

/// What a request's span records when it ends.
pub struct Ended<'a> {
    pub method: &'a http::Method,
    pub route: &'a str,
    pub path: &'a str,
    pub outcome: &'static str,
    pub status: u16,
    /// The key it was answered under, when it was keyed (its first 8 bytes in hex, as the access
    /// log shows it).
    pub key: Option<&'a crate::key::KeyHash>,
    /// The fetch id of the answer (the id, and the fetch's `traceparent` after a space when it
    /// was traced).
    pub fetch: Option<&'a HeaderValue>,
}

/// An upstream fetch's span (nothing when traces are off or the request is not traced).
pub struct FetchSpan(Option<Box<Span>>);

impl FetchSpan {
    /// Starts the span of a fetch for `route` and `key`, a child of the request in whose
    /// extensions [`RequestSpan::start`] left its context; `role` is why it fetches (`leader`,
    /// `own`, `degraded`).
    pub fn start(
        extensions: &http::Extensions,
        route: &str,
        key: &crate::key::KeyHash,
        role: &'static str,
    ) -> FetchSpan {
        let Some(tracer) = TRACER.get() else {
            return FetchSpan(None);
        };
        let parent = match extensions.get::<RequestTrace>() {
            Some(RequestTrace(context)) => Context::new().with_remote_span_context(context.clone()),
            None => Context::new(),
        };
        let span = tracer
            .span_builder("upstream fetch")
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("http.route", route.to_owned()),
                KeyValue::new("corral.key", key_prefix(key)),
                KeyValue::new("corral.fetch.role", role),
            ])
            .start_with_context(tracer, &parent);
        FetchSpan(Some(Box::new(span)))
    }

    /// This fetch's `traceparent`, sent upstream (sampled or not, so the upstream follows the
    /// decision).
    pub fn traceparent(&self) -> Option<HeaderValue> {
        traceparent(self.0.as_ref()?.span_context())
    }

    /// The fetch id its answer keeps, for the requests it reaches to link to this span: `id`,
    /// then this span's `traceparent` after a space when it is sampled (a span that is not
    /// exported is nothing to link to).
    pub fn name_fetch(&self, id: &HeaderValue) -> HeaderValue {
        let Some(span) = &self.0 else {
            return id.clone();
        };
        let context = span.span_context();
        let Some(traceparent) = context.is_sampled().then(|| traceparent(context)).flatten() else {
            return id.clone();
        };
        let mut name = Vec::with_capacity(id.len() + 1 + traceparent.len());
        name.extend_from_slice(id.as_bytes());
        name.push(b' ');
        name.extend_from_slice(traceparent.as_bytes());
        HeaderValue::from_bytes(&name).unwrap_or_else(|_| id.clone())
    }

    /// Ends the span with the upstream's status, or the error that kept it from answering.
    pub fn end(self, answer: Result<u16, &str>) {
        let Some(mut span) = self.0 else { return };
        match answer {
            Ok(status) => {
                span.set_attribute(KeyValue::new(
                    "http.response.status_code",
                    i64::from(status),
                ));
                if status >= 500 {
                    span.set_status(opentelemetry::trace::Status::error(""));
                }
            }
            Err(error) => span.set_status(opentelemetry::trace::Status::error(error.to_owned())),
        }
        span.end();
    }
}

fn key_prefix(key: &crate::key::KeyHash) -> String {
    hex::encode(&key.as_bytes()[..8])
}

/// `00-<trace id>-<span id>-<flags>` of a valid context.
fn traceparent(context: &SpanContext) -> Option<HeaderValue> {
    if !context.is_valid() {
        return None;
    }
    let text = format!(
        "00-{}-{}-{:02x}",
        context.trace_id(),
        context.span_id(),
        context.trace_flags().to_u8()
    );
    HeaderValue::from_str(&text).ok()
}

/// The sampled span a fetch id names after its id; `None` for an untraced fetch's id, or
/// anything else (a stored entry's bytes are never trusted to be well formed).
fn fetch_span(fetch_id: &HeaderValue) -> Option<SpanContext> {
    let (_, traceparent) = fetch_id.to_str().ok()?.split_once(' ')?;
    parse_traceparent(traceparent).filter(SpanContext::is_sampled)
}

/// A `traceparent` value as a span context.
fn parse_traceparent(text: &str) -> Option<SpanContext> {
    let mut parts = text.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || parts.next().is_some() || trace.len() != 32 || span.len() != 16 {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let context = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    );
    context.is_valid().then_some(context)
}

// ------------------------------------------------------------------- exporter ----

/// How the exporter posts to the collector: a hyper client on the server's runtime, reached from
/// the SDK's export thread through a spawned task (that thread has no runtime of its own).
struct ExportClient {
    runtime: tokio::runtime::Handle,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// One post, connecting and reading the answer included.
    timeout: Duration,
}

impl fmt::Debug for ExportClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExportClient")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl ExportClient {
    fn new(timeout: Duration) -> Result<Self, TelemetryError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|error| TelemetryError::Exporter(error.to_string()))?;
        // The roots an upstream is verified against by default (bundled and the system's).
        let tls = (*crate::config::UpstreamTls::default().config).clone();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(ExportClient {
            runtime,
            client,
            timeout,
        })
    }
}

#[async_trait::async_trait]
impl HttpClient for ExportClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let timeout = self.timeout;
        let post = async move {
            let (parts, body) = request.into_parts();
            let response = client
                .request(http::Request::from_parts(parts, Full::new(body)))
                .await?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, ANSWER_MAX).collect().await?.to_bytes();
            Ok::<_, HttpError>(http::Response::from_parts(parts, body))
        };
        let task = self
            .runtime
            .spawn(async move { tokio::time::timeout(timeout, post).await });
        match task.await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_elapsed)) => {
                Err(format!("the collector did not answer within {timeout:?}").into())
            }
            Err(error) => Err(Box::new(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALUE: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn a_traceparent_round_trips_and_junk_is_none() {
        let context = parse_traceparent(VALUE).expect("valid");
        assert!(context.is_sampled());
        assert_eq!(traceparent(&context), Some(HeaderValue::from_static(VALUE)));
        for junk in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-zzf7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            assert!(parse_traceparent(junk).is_none(), "{junk}");
        }
    }

    #[test]
    fn a_fetch_id_names_its_span_only_when_sampled() {
        let context = parse_traceparent(VALUE).expect("valid");
        let named = HeaderValue::from_str(&format!("0123abcd {VALUE}")).unwrap();
        assert_eq!(fetch_span(&named), Some(context));
        assert_eq!(fetch_span(&HeaderValue::from_static("0123abcd")), None);
        let unsampled = format!("0123abcd {}", VALUE.replace("-01", "-00"));
        assert_eq!(
            fetch_span(&HeaderValue::from_str(&unsampled).unwrap()),
            None
        );
        let junk = HeaderValue::from_static("0123abcd 00-junk");
        assert_eq!(fetch_span(&junk), None);
    }

    #[test]
    fn off_makes_no_span_and_touches_no_header() {
        let mut request = http::Request::new(());
        request
            .headers_mut()
            .insert(TRACEPARENT, HeaderValue::from_static(VALUE));
        let before = request.headers().clone();
        let span = RequestSpan::start(&mut request);
        assert!(span.0.is_none());
        assert_eq!(request.headers(), &before);
        assert!(request.extensions().get::<RequestTrace>().is_none());
        let fetch = FetchSpan::start(
            request.extensions(),
            "r",
            &crate::key::KeyBuilder::new().part("k").finish().hash,
            "leader",
        );
        assert!(fetch.traceparent().is_none());
        let id = HeaderValue::from_static("0123abcd");
        assert_eq!(fetch.name_fetch(&id), id);
    }
}
