//! Steady load: a bounded number of clients, each sending one request at a time to a random
//! replica, over a key set where a few hot keys take most of the traffic; every answer is checked
//! and written to the answer journal.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinSet;

use crate::journal::{Answer, BodyCheck, Journal, now_ms};
use crate::origin::{PREFIX, check, key_name};

/// The shape of the load.
#[derive(Clone, Debug)]
pub struct Load {
    /// Concurrent clients, each with one request in flight at a time.
    pub clients: usize,
    /// Pause between one client's requests.
    pub pace: Duration,
    /// Keys in the set; the first `hot` of them take `hot_share` of the requests.
    pub keys: usize,
    pub hot: usize,
    /// Share of requests that go to a hot key (0 to 1).
    pub hot_share: f64,
    /// corral's `wait_timeout`, ms: recorded with each answer as its deadline.
    pub deadline_ms: u64,
    /// How long past the deadline the client itself gives up.
    pub client_slack: Duration,
}

/// Runs the load against `replica_urls` for `duration`; returns how many requests were sent.
pub async fn run(
    load: Load,
    replica_urls: Vec<String>,
    duration: Duration,
    seed: u64,
    journal: Arc<Journal>,
) -> u64 {
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(2))
        .build_http();
    let stop_at = now_ms() + duration.as_millis() as u64;
    // Every client loop has a count as well as an end time.
    let max_requests = duration.as_millis() as u64 / load.pace.as_millis().max(1) as u64 + 1;
    let urls = Arc::new(replica_urls);
    let mut clients = JoinSet::new();
    for n in 0..load.clients {
        let (client, urls, journal, load) =
            (client.clone(), urls.clone(), journal.clone(), load.clone());
        let mut rng = StdRng::seed_from_u64(seed.wrapping_add(n as u64));
        clients.spawn(async move {
            let mut sent = 0u64;
            while sent < max_requests && now_ms() < stop_at {
                let key = if rng.random_bool(load.hot_share) {
                    rng.random_range(0..load.hot)
                } else {
                    rng.random_range(load.hot..load.keys)
                };
                let replica = rng.random_range(0..urls.len());
                let answer = one(&client, &urls[replica], replica, &key_name(key), &load).await;
                journal.write(&answer);
                sent += 1;
                tokio::time::sleep(load.pace).await;
            }
            sent
        });
    }
    let mut total = 0;
    while let Some(sent) = clients.join_next().await {
        total += sent.expect("a load client panicked");
    }
    journal.flush();
    total
}

async fn one(
    client: &Client<HttpConnector, Full<Bytes>>,
    base: &str,
    replica: usize,
    key: &str,
    load: &Load,
) -> Answer {
    let start_ms = now_ms();
    let request = Request::get(format!("{base}{PREFIX}{key}"))
        .body(Full::new(Bytes::new()))
        .expect("a valid request");
    let give_up = Duration::from_millis(load.deadline_ms) + load.client_slack;
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("body failed: {e}"))?
            .to_bytes();
        Ok::<_, String>((parts, body))
    };
    let result = tokio::time::timeout(give_up, exchange).await;
    let end_ms = now_ms();
    let mut answer = Answer {
        start_ms,
        end_ms,
        key: key.to_string(),
        replica,
        status: None,
        x_cache: None,
        body: BodyCheck::NotChecked,
        fetch: None,
        deadline_ms: load.deadline_ms,
        error: None,
    };
    match result {
        Err(_) => answer.error = Some(format!("no answer within {give_up:?}")),
        Ok(Err(error)) => answer.error = Some(error),
        Ok(Ok((parts, body))) => {
            answer.status = Some(parts.status.as_u16());
            answer.x_cache = parts
                .headers
                .get("x-cache")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            if parts.status == http::StatusCode::OK {
                let (checked, fetch) = check(key, &body);
                answer.body = checked;
                answer.fetch = fetch;
            }
        }
    }
    answer
}
