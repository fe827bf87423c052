//! Purge requests: the forms `POST /admin/purge` accepts, and the client `corral purge` sends them
//! with.
//!
//! | body                                              | purges                                   |
//! |---------------------------------------------------|------------------------------------------|
//! | `{"url": "/reports?x=1"}` (+ `method`, `headers`, `body`) | one key, as the proxy keys that request |
//! | `{"route": "reports", "prefix": "/reports/2024/"}` | the route's keys whose path starts so   |
//! | `{"route": "reports"}`                             | the whole route (its generation, O(1))  |
//! | `{"tag": "user-42"}`                               | keys whose response carried the tag     |

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};

/// One purge, in one of its forms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Purge {
    /// One request's key.
    Url {
        url: String,
        method: Option<String>,
        headers: BTreeMap<String, String>,
        /// For routes that key on the request body.
        body: Option<String>,
    },
    /// Keys of `route` whose path starts with `prefix`.
    Prefix { route: String, prefix: String },
    /// Every key of `route`.
    Route { route: String },
    /// Keys whose upstream response carried `tag` in `Surrogate-Key` or `Cache-Tag`.
    Tag { tag: String },
}

/// The JSON body, every field optional; [`Purge::parse`] decides which form it is.
#[derive(Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Body {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    method: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    body: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    route: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tag: Option<String>,
}

/// What [`Purge::parse`] says about a body that is not one of the forms.
pub const FORMS: &str = "a purge is one of {\"url\": ...}, {\"route\": ..., \"prefix\": ...}, \
                         {\"route\": ...} or {\"tag\": ...}";

impl Purge {
    /// Reads a request body; the error is a message for a 400 answer.
    pub fn parse(json: &[u8]) -> Result<Purge, String> {
        let body: Body =
            serde_json::from_slice(json).map_err(|e| format!("bad purge request: {e}"))?;
        let url_only = body.method.is_some() || !body.headers.is_empty() || body.body.is_some();
        let purge = match body {
            Body {
                url: Some(url),
                route: None,
                prefix: None,
                tag: None,
                method,
                headers,
                body,
            } => Purge::Url {
                url,
                method,
                headers,
                body,
            },
            _ if url_only => {
                return Err(format!(
                    "bad purge request: method, headers and body go with url; {FORMS}"
                ));
            }
            Body {
                url: None,
                route: Some(route),
                prefix: Some(prefix),
                tag: None,
                ..
            } => {
                if !prefix.starts_with('/') {
                    return Err(format!(
                        "bad purge request: the prefix {prefix:?} is not a path (it must start with /)"
                    ));
                }
                Purge::Prefix { route, prefix }
            }
            Body {
                url: None,
                route: Some(route),
                prefix: None,
                tag: None,
                ..
            } => Purge::Route { route },
            Body {
                url: None,
                route: None,
                prefix: None,
                tag: Some(tag),
                ..
            } => Purge::Tag { tag },
            _ => return Err(format!("bad purge request: {FORMS}")),
        };
        Ok(purge)
    }

    /// The form's name, for metrics and logs.
    pub fn form(&self) -> &'static str {
        match self {
            Purge::Url { .. } => "url",
            Purge::Prefix { .. } => "prefix",
            Purge::Route { .. } => "route",
            Purge::Tag { .. } => "tag",
        }
    }

    /// The JSON body of this purge.
    pub fn to_json(&self) -> String {
        let body = match self.clone() {
            Purge::Url {
                url,
                method,
                headers,
                body,
            } => Body {
                url: Some(url),
                method,
                headers,
                body,
                ..Body::default()
            },
            Purge::Prefix { route, prefix } => Body {
                route: Some(route),
                prefix: Some(prefix),
                ..Body::default()
            },
            Purge::Route { route } => Body {
                route: Some(route),
                ..Body::default()
            },
            Purge::Tag { tag } => Body {
                tag: Some(tag),
                ..Body::default()
            },
        };
        serde_json::to_string(&body).expect("a purge body serializes")
    }
}

// ---------------------------------------------------------------------------------- client ----

/// How long `corral purge` waits for the admin API: connecting, and the whole answer (a prefix
/// or tag purge over many keys takes a while).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// Why `corral purge` did not purge.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad admin url {0:?}: expected http://host:port")]
    BadUrl(String),
    #[error("cannot reach the admin API at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the admin API did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the admin API refused the purge: {status}: {message}")]
    Refused { status: StatusCode, message: String },
}

/// Sends `purge` to the admin API at `admin` (`http://host:port`) with a bearer `token`, and
/// answers the JSON it returned on success.
pub async fn send(
    admin: &str,
    token: &str,
    purge: &Purge,
) -> Result<serde_json::Value, ClientError> {
    let url = format!("{}/admin/purge", admin.trim_end_matches('/'));
    let uri: Uri = url
        .parse()
        .map_err(|_| ClientError::BadUrl(admin.to_owned()))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(ClientError::BadUrl(admin.to_owned()));
    }
    let request = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Full::new(Bytes::from(purge.to_json())))
        .map_err(|_| ClientError::BadUrl(admin.to_owned()))?;
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| ClientError::Unreachable {
                url: admin.to_owned(),
                reason: crate::errors::chain(&e),
            })?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Unreachable {
                url: admin.to_owned(),
                reason: e.to_string(),
            })?
            .to_bytes();
        Ok::<_, ClientError>((status, body))
    };
    let (status, body) = tokio::time::timeout(ANSWER_TIMEOUT, exchange)
        .await
        .map_err(|_| ClientError::Timeout(ANSWER_TIMEOUT))??;
    let json: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    if !status.is_success() {
        let message = json
            .as_ref()
            .and_then(|j| j.get("error"))
            .and_then(|e| e.as_str())
            .map_or_else(
                || String::from_utf8_lossy(&body).trim().to_owned(),
                str::to_owned,
            );
        return Err(ClientError::Refused { status, message });
    }
    json.ok_or_else(|| ClientError::Refused {
        status,
        message: "the answer is not JSON".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_form_parses_and_round_trips() {
        let forms = [
            Purge::Url {
                url: "/reports?x=1".into(),
                method: Some("GET".into()),
                headers: BTreeMap::new(),
                body: None,
            },
            Purge::Prefix {
                route: "reports".into(),
                prefix: "/reports/2024/".into(),
            },
            Purge::Route {
                route: "reports".into(),
            },
            Purge::Tag {
                tag: "user-42".into(),
            },
        ];
        for purge in forms {
            assert_eq!(Purge::parse(purge.to_json().as_bytes()), Ok(purge));
        }
    }

    #[test]
    fn bodies_that_are_no_form_are_refused() {
        for body in [
            r#"{}"#,
            r#"{"prefix": "/x"}"#,
            r#"{"route": "r", "tag": "t"}"#,
            r#"{"url": "/x", "tag": "t"}"#,
            r#"{"route": "r", "method": "GET"}"#,
            r#"{"route": "r", "prefix": "x"}"#,
            r#"{"route": "r", "extra": 1}"#,
            r#"not json"#,
        ] {
            assert!(Purge::parse(body.as_bytes()).is_err(), "{body}");
        }
    }
}
