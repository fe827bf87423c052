//! Proxy replicas in this process, each with its own public and admin listener on 127.0.0.1:0.
//!
//! ```ignore
//! let upstream = Upstream::start().await.slow("/reports", 500 * MS);
//! let proxy = ProxyCluster::with_redis_nats(3, &fill(CONFIG, &[("upstream", &upstream.url())])).await;
//! let reply = proxy.get(0, "/reports?day=1").send().await;
//! ```
//!
//! Config text is the YAML a user would write; the listen addresses in it are ignored, since the
//! replicas are handed listeners already bound. Placeholders are written `{{name}}` (so they do
//! not clash with the config's own `${VAR}` interpolation) and filled with [`fill`].

use std::net::SocketAddr;

use corral::engine::Backend;
use corral::server::ServeError;
use http::Method;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::http::{Call, Http, Reply};
use super::{Deadline, TestNats, TestRedis, patience};

/// Pause between two readiness probes of a starting replica.
const READY_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// Replaces every `{{name}}` in `template` with its value.
pub fn fill(template: &str, vars: &[(&str, &str)]) -> String {
    let mut text = template.to_string();
    for (name, value) in vars {
        text = text.replace(&format!("{{{{{name}}}}}"), value);
    }
    text
}

struct Replica {
    public: SocketAddr,
    admin: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

/// Replicas of the proxy sharing one store and bus; dropping it shuts them down (and then stops
/// the Redis and NATS servers it started, if any).
pub struct ProxyCluster {
    replicas: Vec<Replica>,
    http: Http,
    /// Declared after `replicas` so the servers outlive the replicas while dropping.
    redis: Option<TestRedis>,
    nats: Option<TestNats>,
}

impl Drop for ProxyCluster {
    fn drop(&mut self) {
        for replica in &mut self.replicas {
            if let Some(shutdown) = replica.shutdown.take() {
                let _ = shutdown.send(());
            }
        }
    }
}

// ------------------------------------------------------------------ starting ----

impl ProxyCluster {
    /// `replicas` replicas of the proxy configured by `yaml`. With a `backend`, every replica runs
    /// on a clone of it (`server::run_on`: replicas on one memory store coalesce with each other);
    /// without one, each replica connects to the store and bus the config names (`server::run`).
    /// Returns once every replica answers `/healthz` and `/readyz` with 200.
    pub async fn start(replicas: usize, yaml: &str, backend: Option<Backend>) -> ProxyCluster {
        init_tracing();
        assert!(
            !yaml.contains("{{"),
            "the config still has unfilled placeholders:\n{yaml}"
        );
        let config = corral::config::parse(yaml, "test-config.yaml")
            .unwrap_or_else(|error| panic!("the test config was refused:\n{error}\n---\n{yaml}"));
        let mut cluster = ProxyCluster {
            replicas: Vec::with_capacity(replicas),
            http: Http::new(),
            redis: None,
            nats: None,
        };
        for _ in 0..replicas {
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind a public listener");
            let admin = TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind an admin listener");
            let (public_addr, admin_addr) = (
                listener.local_addr().expect("public local_addr"),
                admin.local_addr().expect("admin local_addr"),
            );
            let (tx, rx) = oneshot::channel::<()>();
            let shutdown = async move {
                let _ = rx.await;
            };
            let config = config.clone();
            let task = match backend.clone() {
                Some(backend) => tokio::spawn(corral::server::run_on(
                    listener, admin, config, backend, shutdown,
                )),
                None => tokio::spawn(corral::server::run(listener, admin, config, shutdown)),
            };
            cluster.replicas.push(Replica {
                public: public_addr,
                admin: admin_addr,
                shutdown: Some(tx),
                task: Some(task),
            });
        }
        for i in 0..replicas {
            cluster.wait_ready(i).await;
        }
        cluster
    }

    /// Starts a fresh `redis-server` and `nats-server`, fills `{{redis}}` and `{{nats}}` in
    /// `yaml` with their URLs, and starts `replicas` replicas on them (each with its own
    /// connections, as separate processes would have).
    pub async fn with_redis_nats(replicas: usize, yaml: &str) -> ProxyCluster {
        let (redis, nats) = tokio::join!(TestRedis::start(), TestNats::start());
        let yaml = fill(yaml, &[("redis", &redis.url()), ("nats", &nats.url())]);
        let mut cluster = ProxyCluster::start(replicas, &yaml, None).await;
        cluster.redis = Some(redis);
        cluster.nats = Some(nats);
        cluster
    }

    /// `replicas` replicas sharing one fresh in-process store and bus.
    pub async fn on_memory(replicas: usize, yaml: &str) -> ProxyCluster {
        ProxyCluster::start(replicas, yaml, Some(Backend::memory())).await
    }

    /// Waits until replica `i` answers `/healthz` and then `/readyz` with 200; panics with the
    /// replica's error if it stops first, or when the test's patience runs out.
    async fn wait_ready(&mut self, i: usize) {
        let patience = patience();
        let deadline = Deadline::after(patience);
        let max_probes = patience.as_millis() / READY_POLL.as_millis() + 1;
        for path in ["/healthz", "/readyz"] {
            let url = format!("{}{path}", self.admin_url(i));
            let mut last: String;
            let mut probes = 0u128;
            loop {
                probes += 1;
                if self.replicas[i]
                    .task
                    .as_ref()
                    .is_some_and(|t| t.is_finished())
                {
                    let task = self.replicas[i].task.take().expect("task");
                    match task.await {
                        Ok(Ok(())) => panic!("replica {i} stopped before it was ready"),
                        Ok(Err(error)) => panic!("replica {i} failed to start: {error}"),
                        Err(error) => match error.try_into_panic() {
                            Ok(panic) => std::panic::resume_unwind(panic),
                            Err(error) => panic!("replica {i} was cancelled: {error}"),
                        },
                    }
                }
                match self.http.get(&url).try_send().await {
                    Ok(reply) if reply.status == 200 => break,
                    Ok(reply) => last = format!("{} {:?}", reply.status, reply.text()),
                    Err(error) => last = error,
                }
                assert!(
                    !deadline.expired() && probes < max_probes,
                    "replica {i}: {path} did not answer 200 within {patience:?} ({probes} probes); last: {last}"
                );
                tokio::time::sleep(READY_POLL).await;
            }
        }
    }

    /// Shuts every replica down and waits (bounded) for each to return; panics if one returns an
    /// error or does not stop in time.
    pub async fn stop(mut self) {
        let patience = patience();
        for (i, replica) in self.replicas.iter_mut().enumerate() {
            if let Some(shutdown) = replica.shutdown.take() {
                let _ = shutdown.send(());
            }
            if let Some(task) = replica.task.take() {
                match tokio::time::timeout(patience, task).await {
                    Ok(Ok(Ok(()))) => {}
                    Ok(Ok(Err(error))) => panic!("replica {i} stopped with an error: {error}"),
                    Ok(Err(error)) => panic!("replica {i} panicked or was cancelled: {error}"),
                    Err(_) => panic!("replica {i} did not stop within {patience:?}"),
                }
            }
        }
    }
}

/// Sends the replicas' logs to the test output (shown for failing tests); `RUST_LOG` filters them
/// (default: warnings and errors).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

// ------------------------------------------------------------------ requests ----

impl ProxyCluster {
    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    /// `http://127.0.0.1:PORT` of replica `i`'s public listener.
    pub fn url(&self, i: usize) -> String {
        format!("http://{}", self.replicas[i].public)
    }

    /// `http://127.0.0.1:PORT` of replica `i`'s admin listener.
    pub fn admin_url(&self, i: usize) -> String {
        format!("http://{}", self.replicas[i].admin)
    }

    pub fn http(&self) -> &Http {
        &self.http
    }

    /// The Redis server started by [`with_redis_nats`](Self::with_redis_nats).
    pub fn redis(&self) -> &TestRedis {
        self.redis.as_ref().expect("this cluster runs on Redis")
    }

    /// A request for `path_and_query` to replica `i`.
    pub fn call(&self, i: usize, method: Method, path_and_query: &str) -> Call {
        self.http
            .call(method, format!("{}{path_and_query}", self.url(i)))
    }

    /// A GET for `path_and_query` to replica `i`.
    pub fn get(&self, i: usize, path_and_query: &str) -> Call {
        self.call(i, Method::GET, path_and_query)
    }

    /// `n` GETs for one URL, spread round-robin over the replicas.
    pub fn spread(&self, n: usize, path_and_query: &str) -> Vec<Call> {
        (0..n)
            .map(|i| self.get(i % self.len(), path_and_query))
            .collect()
    }

    /// A request to replica `i`'s admin listener.
    pub fn admin(&self, i: usize, method: Method, path_and_query: &str) -> Call {
        self.http
            .call(method, format!("{}{path_and_query}", self.admin_url(i)))
    }

    /// `POST /admin/purge {"url": ..., "method": "GET"}` on replica `i` with a bearer token.
    pub async fn purge(&self, i: usize, token: &str, path_and_query: &str) -> Reply {
        self.admin(i, Method::POST, "/admin/purge")
            .bearer(token)
            .json(&serde_json::json!({ "url": path_and_query, "method": "GET" }))
            .send()
            .await
    }

    /// `GET /admin/status?url=<path_and_query, percent-encoded>` on replica `i` with a bearer
    /// token.
    pub async fn status(&self, i: usize, token: &str, path_and_query: &str) -> Reply {
        self.admin(
            i,
            Method::GET,
            &format!("/admin/status?url={}", percent_encode(path_and_query)),
        )
        .bearer(token)
        .send()
        .await
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
