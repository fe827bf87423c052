//! A small HTTP/1.1 client for the tests, over hyper-util's pooled client: build a [`Call`], send
//! it, get a [`Reply`] with the whole body read. Every call is bounded by the test's patience.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use super::patience;

/// A cloneable client; clones share one connection pool.
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Http {
    fn default() -> Self {
        Self::new()
    }
}

impl Http {
    pub fn new() -> Self {
        let client = Client::builder(TokioExecutor::new())
            // Idle connections closed by a server that stops between tests are not reused.
            .pool_idle_timeout(Duration::from_secs(5))
            .build_http();
        Self { client }
    }

    /// A request to `url` (absolute: `http://host:port/path?query`).
    pub fn call(&self, method: Method, url: impl Into<String>) -> Call {
        Call {
            http: self.clone(),
            method,
            url: url.into(),
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    pub fn get(&self, url: impl Into<String>) -> Call {
        self.call(Method::GET, url)
    }
}

/// One request being built; `send` it (it is `Send + 'static`, so it can be spawned).
#[derive(Clone)]
pub struct Call {
    http: Http,
    method: Method,
    url: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
}

impl Call {
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((
            HeaderName::from_bytes(name.as_bytes()).expect("valid header name"),
            HeaderValue::from_str(value).expect("valid header value"),
        ));
        self
    }

    /// `Authorization: Bearer <token>`.
    pub fn bearer(self, token: &str) -> Self {
        self.header("authorization", &format!("Bearer {token}"))
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// A JSON body with `Content-Type: application/json`.
    pub fn json(self, value: &serde_json::Value) -> Self {
        self.header("content-type", "application/json")
            .body(serde_json::to_vec(value).expect("serialisable JSON"))
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Sends the request and reads the whole answer; panics (naming the request) on a transport
    /// error or when it takes longer than the test's patience.
    pub async fn send(self) -> Reply {
        let what = format!("{} {}", self.method, self.url);
        match self.try_send().await {
            Ok(reply) => reply,
            Err(error) => panic!("{what}: {error}"),
        }
    }

    /// Like [`send`](Self::send), returning transport errors and timeouts instead of panicking.
    pub async fn try_send(self) -> Result<Reply, String> {
        let mut request = Request::builder()
            .method(self.method.clone())
            .uri(&self.url)
            .body(Full::new(self.body))
            .map_err(|e| format!("bad request: {e}"))?;
        for (name, value) in self.headers {
            request.headers_mut().append(name, value);
        }
        let started = Instant::now();
        let patience = patience();
        let exchange = async {
            let response = self
                .http
                .client
                .request(request)
                .await
                .map_err(|e| format!("request failed: {e:?}"))?;
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| format!("reading the body failed: {e}"))?
                .to_bytes();
            Ok::<_, String>(Reply {
                status: parts.status,
                headers: parts.headers,
                body,
                took: started.elapsed(),
            })
        };
        tokio::time::timeout(patience, exchange)
            .await
            .map_err(|_| format!("no complete answer within {patience:?}"))?
    }
}

/// A whole answer.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// From just before sending to the last byte of the body.
    pub took: Duration,
}

impl Reply {
    /// A header's value as text (`None` if absent or not UTF-8).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `X-Cache`, or `"(none)"` when the answer has none.
    pub fn x_cache(&self) -> &str {
        self.header("x-cache").unwrap_or("(none)")
    }

    /// `Cache-Status`, or `""` when the answer has none.
    pub fn cache_status(&self) -> &str {
        self.header("cache-status").unwrap_or("")
    }

    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the body when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "expected a JSON body ({e}), got {} {:?}",
                self.status,
                self.text()
            )
        })
    }
}

/// Sends every call at once (each on its own task) and returns the replies in the calls' order.
pub async fn send_all(calls: impl IntoIterator<Item = Call>) -> Vec<Reply> {
    let tasks: Vec<_> = calls.into_iter().map(|c| tokio::spawn(c.send())).collect();
    let mut replies = Vec::with_capacity(tasks.len());
    for task in tasks {
        match task.await {
            Ok(reply) => replies.push(reply),
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(error) => panic!("a request task was cancelled: {error}"),
        }
    }
    replies
}
