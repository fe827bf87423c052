//! Stale entries at the store level, the same on every store: many callers acquire one stale
//! value at once, and exactly one is told to lead its refresh. And, for replicas on Redis, a wait
//! until a stored answer is past its freshness by the store's own clock.

use std::time::Duration;

use bytes::Bytes;
use corral::key::KeyHash;
use corral::store::{Acquired, LeaseRequest, Refresh, Store, Token};
use redis::AsyncCommands;

use super::eventually;
use super::proxy::ProxyCluster;

/// `n` leases of `ttl`, each with its own token.
pub fn leases(n: usize, ttl: Duration) -> Vec<LeaseRequest> {
    (0..n)
        .map(|_| LeaseRequest {
            token: Token::random(),
            node: "node-a".into(),
            ttl,
        })
        .collect()
}

/// Acquires `key` with every lease at once, alternating between `a` and `b` (two connections, as
/// two processes would have), asserts that each got the stale `value` and that exactly one was
/// told to lead the refresh, and returns that one.
pub async fn exactly_one_refresh_leader<'l, S: Store>(
    a: &S,
    b: &S,
    key: &KeyHash,
    leases: &'l [LeaseRequest],
    value: &'static [u8],
) -> &'l LeaseRequest {
    let answers = futures::future::join_all(leases.iter().enumerate().map(|(i, l)| async move {
        let store = if i % 2 == 0 { a } else { b };
        store.acquire(key, l, None).await
    }))
    .await;
    let mut leader = None;
    for (i, answer) in answers.into_iter().enumerate() {
        match answer {
            Ok(Acquired::Stale {
                value: stale,
                refresh,
                ..
            }) => {
                assert_eq!(stale, Bytes::from_static(value));
                match refresh {
                    Refresh::Lead { .. } => {
                        assert!(leader.is_none(), "two callers were told to lead");
                        leader = Some(i);
                    }
                    Refresh::Elsewhere { lease_left, .. } => assert!(lease_left <= leases[i].ttl),
                    Refresh::Idle => panic!("acquire never answers idle"),
                }
            }
            other => panic!("a stale value is served stale, got {other:?}"),
        }
    }
    &leases[leader.expect("one caller leads the refresh")]
}

/// The Redis name of the key of a GET of `path` on a cluster whose config has namespace `ns` and
/// admin token `token`, as the admin status reports it.
pub async fn value_key(cluster: &ProxyCluster, ns: &str, token: &str, path: &str) -> String {
    let status = cluster.status(0, token, path).await;
    assert_eq!(status.status, 200, "status: {}", status.text());
    let hex = status.json()["key"]
        .as_str()
        .expect("status names the key")
        .to_owned();
    format!("{ns}:{{{hex}}}")
}

/// The Redis server's clock, in milliseconds.
pub async fn server_ms(cluster: &ProxyCluster) -> u64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME")
        .query_async(&mut cluster.redis().client().await)
        .await
        .expect("TIME");
    secs * 1000 + micros / 1000
}

/// Waits until the stored answer to a GET of `path` is past its freshness by the store's clock
/// (plus a margin for the L1 copy, inserted just after the commit); see [`value_key`] for `ns`
/// and `token`.
pub async fn wait_until_stale(cluster: &ProxyCluster, ns: &str, token: &str, path: &str) {
    let fresh = format!("{}:f", value_key(cluster, ns, token, path).await);
    let until: u64 = cluster
        .redis()
        .client()
        .await
        .get::<_, Option<u64>>(&fresh)
        .await
        .expect("GET")
        .unwrap_or_else(|| panic!("{path} was stored without a stale window"));
    eventually(&format!("{path} goes stale"), || async {
        server_ms(cluster).await >= until + 100
    })
    .await;
}
