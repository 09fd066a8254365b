//! A small JSON-over-HTTP client for an upstream model server (the candidate): hyper-util's
//! pooled legacy client, a fixed base URL, a bound on every request, extra headers (API key,
//! configured headers), and errors that say whether the server is down, slow, refusing, or
//! talking nonsense ([`UpstreamError`]).

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::Config;

/// Largest answer body accepted (a long response scored with a large `n_probs` is big:
/// about 1 KB per token at `n_probs` = 10, 10 KB at 100).
pub const DEFAULT_MAX_BODY: usize = 256 << 20;

/// Characters of an error body kept in [`UpstreamError::Status`].
const EXCERPT_CHARS: usize = 300;

/// Why a request to the upstream failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// The server could not be reached, or the connection broke before a full answer.
    #[error("cannot reach {url}: {message}")]
    Connect { url: String, message: String },
    /// No complete answer within the configured timeout.
    #[error("{url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    /// The server answered with a non-2xx status; `body` is an excerpt of what it said.
    #[error("{url}: HTTP {code}: {body}")]
    Status {
        url: String,
        code: u16,
        body: String,
    },
    /// The answer was not JSON (or too large to accept).
    #[error("{url}: bad answer: {message}")]
    BadJson { url: String, message: String },
}

impl UpstreamError {
    /// The HTTP status, for [`UpstreamError::Status`].
    pub fn status(&self) -> Option<u16> {
        match self {
            UpstreamError::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A JSON client bound to one base URL. Cheap to clone; safe to share between tasks.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    timeout: Duration,
    headers: Vec<(HeaderName, HeaderValue)>,
    max_body: usize,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Headers may hold secrets: name them only.
        f.debug_struct("Upstream")
            .field("base", &self.base)
            .field("timeout", &self.timeout)
            .field(
                "headers",
                &self
                    .headers
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Upstream {
    /// A client for `base` (e.g. `http://127.0.0.1:8081`; a trailing `/` is ignored) that
    /// bounds each request by `timeout` and sends `headers` with each. Invalid header names
    /// or values are skipped (the config validates them before).
    pub fn new(base: &Uri, timeout: Duration, headers: &[(String, String)]) -> Upstream {
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build_http();
        let headers = headers
            .iter()
            .filter_map(|(k, v)| {
                Some((
                    HeaderName::from_bytes(k.as_bytes()).ok()?,
                    HeaderValue::from_str(v).ok()?,
                ))
            })
            .collect();
        Upstream {
            client,
            base: base.to_string().trim_end_matches('/').to_owned(),
            timeout,
            headers,
            max_body: DEFAULT_MAX_BODY,
        }
    }

    /// The candidate client the config describes: `candidate_host`, `candidate_timeout`,
    /// `candidate_api_key` as `Authorization: Bearer` (unless `candidate_headers` sets
    /// `Authorization` itself), then `candidate_headers`.
    pub fn candidate(config: &Config) -> Upstream {
        let mut headers = Vec::new();
        let explicit_auth = config
            .candidate_headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case(AUTHORIZATION.as_str()));
        if let (Some(key), false) = (&config.candidate_api_key, explicit_auth) {
            headers.push((AUTHORIZATION.as_str().to_owned(), format!("Bearer {key}")));
        }
        headers.extend(config.candidate_headers.iter().cloned());
        Upstream::new(&config.candidate_host, config.candidate_timeout, &headers)
    }

    /// The same client sending `value` as `Authorization` (the client's own credential, when
    /// `forward_client_auth_to_candidate` is on).
    pub fn with_authorization(&self, value: &str) -> Upstream {
        let mut up = self.clone();
        up.headers.retain(|(k, _)| k != AUTHORIZATION);
        if let Ok(v) = HeaderValue::from_str(value) {
            up.headers.push((AUTHORIZATION, v));
        }
        up
    }

    /// The base URL requests go to.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `POST base+path` with a JSON body; the JSON answer.
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, UpstreamError> {
        let bytes = serde_json::to_vec(body).map_err(|e| UpstreamError::BadJson {
            url: self.url(path),
            message: format!("cannot encode the request: {e}"),
        })?;
        self.send(Method::POST, path, Some(Bytes::from(bytes)))
            .await
    }

    /// `GET base+path`; the JSON answer.
    pub async fn get_json(&self, path: &str) -> Result<serde_json::Value, UpstreamError> {
        self.send(Method::GET, path, None).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<serde_json::Value, UpstreamError> {
        let url = self.url(path);
        match tokio::time::timeout(self.timeout, self.send_inner(method, &url, body)).await {
            Ok(r) => r,
            Err(_) => Err(UpstreamError::Timeout {
                url,
                timeout: self.timeout,
            }),
        }
    }

    async fn send_inner(
        &self,
        method: Method,
        url: &str,
        body: Option<Bytes>,
    ) -> Result<serde_json::Value, UpstreamError> {
        let connect = |message: String| UpstreamError::Connect {
            url: url.to_owned(),
            message,
        };
        let bad = |message: String| UpstreamError::BadJson {
            url: url.to_owned(),
            message,
        };
        let uri: Uri = url
            .parse()
            .map_err(|e| connect(format!("invalid URL: {e}")))?;
        let mut req = Request::builder().method(method).uri(uri);
        req = req.header(ACCEPT, "application/json");
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        for (k, v) in &self.headers {
            req = req.header(k, v.clone());
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| connect(format!("cannot build the request: {e}")))?;

        let resp = self.client.request(req).await.map_err(|e| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg = format!("{msg}: {s}");
                src = s.source();
            }
            connect(msg)
        })?;
        let status = resp.status();
        let collected = Limited::new(resp.into_body(), self.max_body)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    bad(format!("answer larger than {} bytes", self.max_body))
                } else {
                    connect(format!("connection broke while reading the answer: {e}"))
                }
            })?
            .to_bytes();
        if !status.is_success() {
            let text = String::from_utf8_lossy(&collected);
            let excerpt: String = text.chars().take(EXCERPT_CHARS).collect();
            return Err(UpstreamError::Status {
                url: url.to_owned(),
                code: status.as_u16(),
                body: excerpt,
            });
        }
        serde_json::from_slice(&collected).map_err(|e| {
            let text = String::from_utf8_lossy(&collected);
            let excerpt: String = text.chars().take(80).collect();
            bad(format!("not JSON ({e}): {excerpt:?}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refused_connection_is_connect() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let base: Uri = format!("http://127.0.0.1:{port}").parse().unwrap();
        let up = Upstream::new(&base, Duration::from_secs(2), &[]);
        let e = up.get_json("/v1/models").await.unwrap_err();
        assert!(matches!(e, UpstreamError::Connect { .. }), "{e}");
    }

    #[tokio::test]
    async fn silent_server_is_timeout_and_status_is_reported() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            // First connection: never answers. Second: a 404 with a body.
            let (_silent, _) = listener.accept().await.unwrap();
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let body = "{\"error\":\"File Not Found\"}";
            let _ = s
                .write_all(
                    format!(
                        "HTTP/1.1 404 Not Found\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let base: Uri = format!("http://{addr}").parse().unwrap();
        let up = Upstream::new(
            &base,
            Duration::from_millis(300),
            &[("x-test".into(), "1".into())],
        );
        let e = up.get_json("/props").await.unwrap_err();
        assert!(matches!(e, UpstreamError::Timeout { .. }), "{e}");
        let e = up
            .post_json("/apply-template", &serde_json::json!({}))
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(404), "{e}");
        assert!(e.to_string().contains("File Not Found"), "{e}");
    }
}
