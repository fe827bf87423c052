//! The bucket's lifecycle and what the server must offer: nats-server 2.11 or newer (per-message
//! TTL and delete markers), JetStream, and a bucket per namespace made with both turned on.

use std::time::Duration;

use async_nats::jetstream::context::CreateKeyValueErrorKind;
use async_nats::jetstream::stream::{StorageType, Stream};
use async_nats::jetstream::{self, kv};

use super::{NatsKvError, TOMBSTONE_TTL};

/// The oldest nats-server this store runs on: 2.11 brought per-message TTL and delete markers.
pub const MIN_SERVER_VERSION: (u64, u64, u64) = (2, 11, 0);

/// Refuses a server older than [`MIN_SERVER_VERSION`]; `found` is the version its INFO reports
/// (`2.12.8`, `v2.11.0-RC.1`), `url` only names it in the error.
pub fn check_server_version(found: &str, url: &str) -> Result<(), NatsKvError> {
    let too_old = || NatsKvError::ServerTooOld {
        found: found.to_owned(),
        url: url.to_owned(),
    };
    let mut parts = found.trim().trim_start_matches('v').split('.').map(|part| {
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u64>().ok()
    });
    let major = parts.next().flatten().ok_or_else(too_old)?;
    let minor = parts.next().flatten().ok_or_else(too_old)?;
    let patch = parts.next().flatten().unwrap_or(0);
    if (major, minor, patch) >= MIN_SERVER_VERSION {
        Ok(())
    } else {
        Err(too_old())
    }
}

/// The bucket of a namespace, or why the namespace cannot name one.
pub fn bucket_name(namespace: &str) -> Result<String, NatsKvError> {
    if (1..=64).contains(&namespace.len()) && crate::bus::nats::valid_namespace(namespace) {
        Ok(format!("corral_{namespace}"))
    } else {
        Err(NatsKvError::InvalidNamespace(namespace.to_owned()))
    }
}

/// Creates the namespace's bucket, or opens it when another replica made it (creating a stream
/// with the very same configuration is idempotent on the server; one made with another
/// configuration is checked for what this store needs).
pub(super) async fn open(
    js: &jetstream::Context,
    bucket: &str,
    namespace: &str,
    timeout: Duration,
) -> Result<Stream, NatsKvError> {
    let error = |reason: String| NatsKvError::Bucket {
        bucket: bucket.to_owned(),
        reason,
    };
    let config = kv::Config {
        bucket: bucket.to_owned(),
        description: format!("corral leases and values of namespace {namespace}"),
        history: 1,
        storage: StorageType::File,
        limit_markers: Some(TOMBSTONE_TTL),
        ..Default::default()
    };
    let created = tokio::time::timeout(timeout, js.create_key_value(config))
        .await
        .map_err(|_| error(format!("not created within {timeout:?}")))?;
    let store = match created {
        Ok(store) => store,
        Err(e) if e.kind() == CreateKeyValueErrorKind::BucketCreate => {
            let existing = tokio::time::timeout(timeout, js.get_key_value(bucket))
                .await
                .map_err(|_| error(format!("not opened within {timeout:?}")))?
                .map_err(|_| error(e.to_string()))?;
            check_bucket(&existing.stream, &error)?;
            existing
        }
        Err(e) if e.kind() == CreateKeyValueErrorKind::LimitMarkersNotSupported => {
            return Err(error(
                "the server's JetStream API does not support limit markers (nats-server 2.11+)"
                    .into(),
            ));
        }
        Err(e) => return Err(error(e.to_string())),
    };
    Ok(store.stream)
}

/// An existing bucket made with another configuration: it must allow per-message TTL and place
/// delete markers, or leases of dead holders would never wake anyone.
fn check_bucket(
    stream: &Stream,
    error: &impl Fn(String) -> NatsKvError,
) -> Result<(), NatsKvError> {
    let config = &stream.cached_info().config;
    if !config.allow_message_ttl || config.subject_delete_marker_ttl.is_none() {
        return Err(error(
            "exists without per-message TTL and limit markers; delete it (nats kv del) so that \
             corral creates it again"
                .into(),
        ));
    }
    if config.max_bytes > 0 {
        tracing::warn!(
            stream = %config.name,
            max_bytes = config.max_bytes,
            "the bucket has max_bytes: once full it refuses every write, leases included"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_without_per_message_ttl_is_refused_naming_both_versions() {
        let error = check_server_version("2.9.25", "nats://127.0.0.1:4222").unwrap_err();
        assert_eq!(
            error.to_string(),
            "nats-server 2.9.25 at nats://127.0.0.1:4222 is too old for the NATS KV store: it \
             needs nats-server 2.11.0 or newer (per-message TTL and delete markers)"
        );
        for old in ["2.10.29", "v2.10.0", "1.4.1", "2", "", "unknown"] {
            assert!(check_server_version(old, "x").is_err(), "{old:?} accepted");
        }
        for new in ["2.11.0", "2.11.0-RC.1", "v2.12.8", "2.12.8", "3.0.0"] {
            assert_eq!(check_server_version(new, "x"), Ok(()), "{new:?} refused");
        }
    }

    #[test]
    fn buckets_are_named_after_valid_namespaces_only() {
        assert_eq!(bucket_name("reports").unwrap(), "corral_reports");
        assert_eq!(bucket_name("a-b_c9").unwrap(), "corral_a-b_c9");
        for bad in ["", "a.b", "a*", "a>", "a b", &"x".repeat(65)] {
            assert!(bucket_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
