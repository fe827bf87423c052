//! `tracing:`: the OTLP collector spans go to, the share of traces kept, and what every span says
//! about the process that made it.

use std::time::Duration;

use http::Uri;
use marked_yaml::Spanned;

use super::super::schema::TracingFile;
use super::super::{Place, TracingSettings};
use super::{Checker, Invalid, bounded_count, bounded_duration};

/// Defaults: the SDK's queue, and an export that gives up well before a pod's termination grace.
const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_MAX_QUEUE: usize = 2048;
/// An export slower than this is a collector that is down, not one worth waiting for at shutdown.
const MAX_EXPORT_TIMEOUT: Duration = Duration::from_secs(30);
/// Each queued span holds its attributes and links: a bound on the memory a dead collector costs.
const MAX_QUEUE: usize = 1 << 16;
/// Where OTLP/HTTP takes traces under a collector's base URL.
const TRACES_PATH: &str = "/v1/traces";

impl Checker<'_> {
    pub(super) fn tracing(&mut self, file: &Spanned<TracingFile>) -> Option<TracingSettings> {
        let endpoint = self.required(
            &file.otlp_endpoint,
            "tracing.otlp_endpoint",
            Place::of(file),
            "the collector's OTLP/HTTP url, e.g. http://otel-collector:4318",
            otlp_endpoint,
        );
        let sampling_ratio =
            self.or_default(&file.sampling_ratio, "tracing.sampling_ratio", 1.0, ratio);
        let service_name = self.or_default(
            &file.service_name,
            "tracing.service_name",
            "corral".to_owned(),
            attribute,
        );
        let export_timeout = self.or_default(
            &file.export_timeout,
            "tracing.export_timeout",
            DEFAULT_EXPORT_TIMEOUT,
            |t| bounded_duration(t, MAX_EXPORT_TIMEOUT),
        );
        let max_queue = self.or_default(
            &file.max_queue,
            "tracing.max_queue",
            DEFAULT_MAX_QUEUE,
            |t| bounded_count(t, MAX_QUEUE),
        );
        let mut resource_attributes = Vec::new();
        let mut ok = true;
        for (name, value) in file.resource_attributes.iter().flat_map(|map| map.iter()) {
            let path = format!("tracing.resource_attributes.{}", name.as_str());
            let name = self.check(name, &path, attribute);
            let value = self.check(value, &path, attribute);
            match (name, value) {
                (Some(name), Some(value)) => resource_attributes.push((name, value)),
                _ => ok = false,
            }
        }
        resource_attributes.sort();
        Some(TracingSettings {
            endpoint: endpoint?,
            sampling_ratio: sampling_ratio?,
            service_name: service_name?,
            resource_attributes: ok.then_some(resource_attributes)?,
            export_timeout: export_timeout?,
            max_queue: max_queue?,
        })
    }
}

/// An `http` or `https` URL with a host; `/v1/traces` is appended unless the path already ends
/// with it (so both a collector's base URL and its traces URL work).
fn otlp_endpoint(text: &str) -> Result<String, Invalid> {
    let refused = |reason| Invalid::OtlpEndpoint {
        text: text.to_string(),
        reason,
    };
    let uri: Uri = text.trim().parse().map_err(|_| refused("not a url"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(refused("expected http:// or https://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(refused("no host"));
    }
    if uri.query().is_some() {
        return Err(refused("a query is not allowed"));
    }
    let base = text.trim().trim_end_matches('/');
    Ok(if base.ends_with(TRACES_PATH) {
        base.to_owned()
    } else {
        format!("{base}{TRACES_PATH}")
    })
}

fn ratio(text: &str) -> Result<f64, Invalid> {
    match text.trim().parse::<f64>() {
        Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
        _ => Err(Invalid::Ratio(text.to_string())),
    }
}

/// A resource attribute's name or value: short printable ASCII, so it exports as written.
fn attribute(text: &str) -> Result<String, Invalid> {
    let ok = (1..=255).contains(&text.len()) && text.bytes().all(|b| (b' '..=b'~').contains(&b));
    ok.then(|| text.to_owned())
        .ok_or_else(|| Invalid::ResourceAttribute(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_gets_the_traces_path_once() {
        let cases = [
            ("http://collector:4318", "http://collector:4318/v1/traces"),
            ("http://collector:4318/", "http://collector:4318/v1/traces"),
            ("https://c.example/v1/traces", "https://c.example/v1/traces"),
            ("http://c/otlp", "http://c/otlp/v1/traces"),
        ];
        for (written, meant) in cases {
            assert_eq!(otlp_endpoint(written).unwrap(), meant, "{written}");
        }
        for wrong in [
            "collector:4318",
            "grpc://c:4317",
            "http://",
            "http://c/?a=1",
        ] {
            assert!(otlp_endpoint(wrong).is_err(), "{wrong}");
        }
    }

    #[test]
    fn a_ratio_is_from_zero_to_one() {
        assert_eq!(ratio("0.25").unwrap(), 0.25);
        assert_eq!(ratio("0").unwrap(), 0.0);
        assert_eq!(ratio("1").unwrap(), 1.0);
        for wrong in ["1.5", "-0.1", "NaN", "10%", ""] {
            assert!(ratio(wrong).is_err(), "{wrong}");
        }
    }
}
