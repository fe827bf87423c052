//! Leases won and commits accepted, read from the replicas' own logs: each replica runs with
//! `corral::lease=debug`, which logs one JSON line per lease acquired and per commit the store
//! accepted, with the key's digest, the lease token and the time.

use std::collections::HashMap;
use std::path::Path;

use http::{HeaderMap, Method, Uri};

use crate::journal::{Lease, LeaseStep};
use crate::origin::{PREFIX, key_name};

/// Digest (hex) → soak key name, computed with corral's own key rules from a replica's config.
pub fn digests(config: &Path, keys: usize) -> HashMap<String, String> {
    let config =
        corral::config::load(config).unwrap_or_else(|e| panic!("load {}: {e}", config.display()));
    let mut out = HashMap::new();
    for i in 0..keys {
        let name = key_name(i);
        let uri: Uri = format!("{PREFIX}{name}").parse().expect("a valid path");
        let headers = HeaderMap::new();
        let route = corral::proxy::route_for(&config, &Method::GET, &uri, &headers)
            .map(|index| &config.routes[index])
            .expect("every soak key matches the route");
        let key = corral::http::key::request_key(route, &Method::GET, &uri, &headers, None);
        out.insert(key.key.hash.to_hex(), name);
    }
    out
}

/// The lease lines of one replica incarnation's log.
pub fn read(
    log: &Path,
    replica: usize,
    incarnation: u32,
    digests: &HashMap<String, String>,
) -> Vec<Lease> {
    let text = std::fs::read(log)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines() {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if value["target"] != "corral::lease" {
            continue;
        }
        // JSON log lines carry the event's fields at the top level.
        let fields = &value;
        let step = match fields["message"].as_str() {
            Some("lease acquired") => LeaseStep::Acquired,
            Some("committed") => LeaseStep::Committed,
            _ => continue,
        };
        let (Some(digest), Some(token), Some(at_ms)) = (
            fields["key"].as_str(),
            fields["token"].as_str(),
            fields["unix_ms"].as_u64(),
        ) else {
            panic!(
                "{}: a lease line without key, token or time: {line}",
                log.display()
            );
        };
        out.push(Lease {
            at_ms,
            step,
            key: digests.get(digest).cloned(),
            digest: digest.to_string(),
            token: token.to_string(),
            replica,
            incarnation,
        });
    }
    out
}
