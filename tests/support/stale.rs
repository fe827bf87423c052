//! Stale entries at the store level, the same on every store: many callers acquire one stale
//! value at once, and exactly one is told to lead its refresh.

use std::time::Duration;

use bytes::Bytes;
use corral::key::KeyHash;
use corral::store::{Acquired, LeaseRequest, Refresh, Store, Token};

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
                    Refresh::Elsewhere { lease_left } => assert!(lease_left <= leases[i].ttl),
                    Refresh::Idle => panic!("acquire never answers idle"),
                }
            }
            other => panic!("a stale value is served stale, got {other:?}"),
        }
    }
    &leases[leader.expect("one caller leads the refresh")]
}
