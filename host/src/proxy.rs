//! The request path. [`Proxy::handle`] forwards every request to the target: method, path,
//! query, headers (less hop-by-hop ones; `Host` becomes the target's) and body, streamed
//! both ways. A `POST` to a scored endpoint is the one exception to pure streaming: its JSON
//! body is read whole (bounded by `max_body_bytes`) so that `n_probs` can be set, and its
//! response goes through the [`TeeBody`] that captures the main model's tokens.
//! [`serve`] runs the accept loop with graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::Body as _;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Map, Value};
use tokio::net::TcpListener;

use crate::capture::{BodyKind, Capture, TeeBody};
use crate::config::Config;
use crate::inject::{self, ResponseEdit};
use crate::metrics::Metrics;
use crate::queue::ComparisonQueue;
use crate::record::Endpoint;

/// Errors a body may carry on its way through.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of everything the proxy sends, both ways.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// The forwarding proxy: shared by every connection.
pub struct Proxy {
    config: Arc<Config>,
    /// Pooled keep-alive connections to the target.
    client: Client<HttpConnector, ProxyBody>,
    /// `Host` header value for the target.
    target_host_header: HeaderValue,
    /// Where captured responses go (`None`: nothing is compared).
    queue: Option<ComparisonQueue>,
    /// Requests by endpoint and status.
    metrics: Option<Arc<Metrics>>,
}

impl Proxy {
    pub fn new(
        config: Arc<Config>,
        queue: Option<ComparisonQueue>,
        metrics: Option<Arc<Metrics>>,
    ) -> Proxy {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(10)));
        let client = Client::builder(TokioExecutor::new())
            // Below the 5 s keep-alive of llama-server's HTTP library, so that the pool
            // rarely hands out a connection the target is about to close.
            .pool_idle_timeout(Duration::from_secs(4))
            .build(connector);
        let authority = config
            .target_host
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        let target_host_header =
            HeaderValue::from_str(&authority).unwrap_or(HeaderValue::from_static("localhost"));
        Proxy {
            config,
            client,
            target_host_header,
            queue,
            metrics,
        }
    }

    /// Handles one request; never fails (errors become OpenAI-shaped JSON answers).
    pub async fn handle(&self, req: Request<Incoming>) -> Result<Response<ProxyBody>, Infallible> {
        let endpoint = (req.method() == Method::POST)
            .then(|| Endpoint::from_path(req.uri().path()))
            .flatten();
        // Only the scored paths get their own label, so arbitrary paths cannot multiply series.
        let label = endpoint.map_or("other", Endpoint::as_str);
        // Requests not sampled are forwarded as they are, without `n_probs`.
        let sampled = endpoint.is_some()
            && self.queue.is_some()
            && (self.config.sample_rate >= 1.0 || rand::random::<f64>() < self.config.sample_rate);
        let response = match endpoint {
            Some(endpoint) if sampled => self.forward_scored(endpoint, req).await,
            _ => {
                self.forward(req.map(|b| b.map_err(BoxError::from).boxed_unsync()))
                    .await
            }
        };
        let response = response.unwrap_or_else(|e| e.into_response());
        if let Some(m) = &self.metrics {
            m.request(label, response.status().as_u16());
        }
        Ok(response)
    }

    /// Plain forwarding: the body streams through untouched.
    async fn forward(&self, req: Request<ProxyBody>) -> Result<Response<ProxyBody>, ProxyError> {
        let (parts, body) = req.into_parts();
        // A request without a body can be sent again if a pooled connection was closed
        // under it; a streaming body cannot.
        let body = if body.is_end_stream() {
            OutBody::Buffered(Bytes::new())
        } else {
            OutBody::Streaming(body)
        };
        let resp = self.send(parts, body).await?;
        Ok(self.passthrough(resp))
    }

    /// Sends a request to the target, with the target's URI and `Host` and hop-by-hop
    /// headers removed. A buffered request whose pooled connection turns out to have been
    /// closed by the target before any answer (a keep-alive race) is sent once more on a
    /// fresh connection.
    async fn send(
        &self,
        mut parts: http::request::Parts,
        body: OutBody,
    ) -> Result<Response<Incoming>, ProxyError> {
        parts.uri = self.target_uri(&parts.uri)?;
        remove_hop_by_hop(&mut parts.headers);
        parts
            .headers
            .insert(header::HOST, self.target_host_header.clone());
        parts.version = http::Version::HTTP_11;
        let (first, retry) = match body {
            OutBody::Buffered(bytes) => {
                let again = Request::from_parts(parts.clone(), full(bytes.clone()));
                (Request::from_parts(parts, full(bytes)), Some(again))
            }
            OutBody::Streaming(b) => (Request::from_parts(parts, b), None),
        };
        match self.send_once(first).await {
            Err(ProxyError::TargetUnreachable(m)) if retry.is_some() && is_stale(&m) => {
                tracing::debug!(error = %m, "target closed a pooled connection; sending again");
                match retry {
                    Some(req) => self.send_once(req).await,
                    None => Err(ProxyError::TargetUnreachable(m)),
                }
            }
            other => other,
        }
    }

    async fn send_once(&self, req: Request<ProxyBody>) -> Result<Response<Incoming>, ProxyError> {
        let fut = self.client.request(req);
        let result = match self.config.target_timeout {
            Some(t) => tokio::time::timeout(t, fut)
                .await
                .map_err(|_| ProxyError::TargetTimeout(t))?,
            None => fut.await,
        };
        result.map_err(|e| ProxyError::TargetUnreachable(error_chain(&e)))
    }

    /// The target's answer as it is, less hop-by-hop headers, its body bounded by
    /// `target_timeout` between frames.
    fn passthrough(&self, resp: Response<Incoming>) -> Response<ProxyBody> {
        let (mut parts, body) = resp.into_parts();
        remove_hop_by_hop(&mut parts.headers);
        let body = IdleTimeout::new(body, self.config.target_timeout).boxed_unsync();
        Response::from_parts(parts, body)
    }

    fn target_uri(&self, uri: &Uri) -> Result<Uri, ProxyError> {
        let base = &self.config.target_host;
        let pq = uri.path_and_query().map_or("/", |pq| pq.as_str());
        let prefix = base.path().trim_end_matches('/');
        format!(
            "{}://{}{}{}",
            base.scheme_str().unwrap_or("http"),
            base.authority().map_or("", |a| a.as_str()),
            prefix,
            pq
        )
        .parse()
        .map_err(|_| ProxyError::BadRequest("request URI cannot be forwarded".into()))
    }

    /// A `POST` to a scored endpoint: read the JSON body, inject `n_probs`, capture the answer.
    async fn forward_scored(
        &self,
        endpoint: Endpoint,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let limit = self.config.max_body_bytes;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let (mut parts, mut body) = req.into_parts();
        if declared.is_some_and(|n| n > limit) {
            drain(&mut body).await;
            return Err(ProxyError::BodyTooLarge(limit));
        }
        let mut bytes = bytes::BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|e| ProxyError::BadRequest(format!("reading the body: {e}")))?;
            if let Some(data) = frame.data_ref() {
                if (bytes.len() + data.len()) as u64 > limit {
                    drain(&mut body).await;
                    return Err(ProxyError::BodyTooLarge(limit));
                }
                bytes.extend_from_slice(data);
            }
        }
        let bytes = bytes.freeze();
        let Ok(obj) = serde_json::from_slice::<Map<String, Value>>(&bytes) else {
            // Not a JSON object: the target answers it; nothing is captured.
            let resp = self.send(parts, OutBody::Buffered(bytes)).await?;
            return Ok(self.passthrough(resp));
        };
        let client_auth = self
            .config
            .forward_client_auth_to_candidate
            .then(|| parts.headers.get(header::AUTHORIZATION))
            .flatten()
            .and_then(|v| v.to_str().ok())
            .map(|v| crate::record::Secret(v.to_owned()));
        let prepared = inject::prepare(
            endpoint,
            obj,
            self.config.n_probs,
            self.config.strip_logprobs,
        );
        let new_body = serde_json::to_vec(&prepared.body)
            .map_err(|e| ProxyError::BadRequest(e.to_string()))?;
        parts.headers.insert(
            header::CONTENT_LENGTH,
            HeaderValue::from(new_body.len() as u64),
        );
        // The answer is read by the capture, so it must not be compressed.
        parts.headers.remove(header::ACCEPT_ENCODING);
        let (sent_request, edit) = (prepared.body, prepared.edit);
        let resp = self
            .send(parts, OutBody::Buffered(Bytes::from(new_body)))
            .await?;

        let kind = match content_type(resp.headers()) {
            Some(ct) if ct.starts_with("text/event-stream") => Some(BodyKind::Sse),
            Some(ct) if ct.starts_with("application/json") => Some(BodyKind::Json),
            _ => None,
        };
        let Some(kind) = kind.filter(|_| resp.status().is_success()) else {
            return Ok(self.passthrough(resp));
        };
        let capture = self.queue.as_ref().map(|q| {
            let capture = Capture::new(
                endpoint,
                // The candidate rebuilds the prompt from what the target saw.
                Value::Object(sent_request),
                kind == BodyKind::Sse,
                self.config.max_capture_tokens,
            )
            .with_client_authorization(client_auth);
            (capture, q.clone())
        });
        let (mut parts, body) = resp.into_parts();
        remove_hop_by_hop(&mut parts.headers);
        if edit != ResponseEdit::None {
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        let body = IdleTimeout::new(body, self.config.target_timeout);
        let body = TeeBody::new(body, kind, endpoint, edit, capture)
            .with_max_held(self.config.max_capture_bytes)
            .boxed_unsync();
        Ok(Response::from_parts(parts, body))
    }
}

/// Reads and discards what is left of a refused request body (bounded in bytes and time), so
/// that the client, still sending, gets to read the answer instead of a broken pipe.
async fn drain(body: &mut Incoming) {
    const MAX_DRAIN: usize = 64 << 20;
    let discard = async {
        let mut seen = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, Bytes::len);
            if seen > MAX_DRAIN {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), discard).await;
}

/// A request body on its way to the target.
enum OutBody {
    /// Held in memory (a scored request, or none at all): can be sent again.
    Buffered(Bytes),
    /// Streamed from the client as it arrives: sent once.
    Streaming(ProxyBody),
}

fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|e| match e {}).boxed_unsync()
}

/// hyper's words for a pooled connection the peer closed before answering.
fn is_stale(message: &str) -> bool {
    message.contains("connection closed before message completed")
        || message.contains("connection reset")
}

fn content_type(h: &HeaderMap) -> Option<&str> {
    h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok())
}

/// A response body that fails when no frame arrives within `limit` of the previous one
/// (`target_timeout`), so that a target stalling mid-body cannot hold the client forever.
pub struct IdleTimeout<B> {
    inner: B,
    limit: Option<Duration>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> IdleTimeout<B> {
    pub fn new(inner: B, limit: Option<Duration>) -> IdleTimeout<B> {
        IdleTimeout {
            inner,
            limit,
            timer: limit.map(|l| Box::pin(tokio::time::sleep(l))),
        }
    }
}

impl<B> http_body::Body for IdleTimeout<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                if let (Some(timer), Some(limit)) = (this.timer.as_mut(), this.limit) {
                    timer.as_mut().reset(tokio::time::Instant::now() + limit);
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let expired = this
                    .timer
                    .as_mut()
                    .is_some_and(|t| t.as_mut().poll(cx).is_ready());
                if !expired {
                    return Poll::Pending;
                }
                let limit = this.limit.unwrap_or_default();
                tracing::warn!(
                    ?limit,
                    "target stalled mid-response: cut after target_timeout"
                );
                this.timer = None;
                Poll::Ready(Some(Err(BoxError::from(format!(
                    "the target sent nothing for {limit:?} (target_timeout)"
                )))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Removes the headers that belong to one connection, not to the message (RFC 9110 7.6.1).
fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Why the proxy answered instead of the target.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("the target model server could not be reached: {0}")]
    TargetUnreachable(String),
    #[error("the target model server did not answer within {0:?}")]
    TargetTimeout(Duration),
    #[error("request body larger than the proxy's limit of {0} bytes")]
    BodyTooLarge(u64),
    #[error("bad request: {0}")]
    BadRequest(String),
}

impl ProxyError {
    /// The error as an OpenAI-shaped JSON answer.
    pub fn into_response(self) -> Response<ProxyBody> {
        let (status, kind, code) = match &self {
            ProxyError::TargetUnreachable(_) => {
                (StatusCode::BAD_GATEWAY, "proxy_error", "target_unreachable")
            }
            ProxyError::TargetTimeout(_) => {
                (StatusCode::GATEWAY_TIMEOUT, "proxy_error", "target_timeout")
            }
            ProxyError::BodyTooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "body_too_large",
            ),
            ProxyError::BadRequest(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "bad_request",
            ),
        };
        tracing::warn!(code, "{self}");
        json_error(status, kind, code, &self.to_string())
    }
}

/// An OpenAI-shaped error answer: `{"error": {"message", "type", "code"}}`.
pub fn json_error(
    status: StatusCode,
    kind: &str,
    code: &str,
    message: &str,
) -> Response<ProxyBody> {
    let body = serde_json::json!({"error": {"message": message, "type": kind, "code": code}});
    let mut resp = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Accepts connections on `listener` and serves them with `proxy` until `shutdown`
/// completes; then stops accepting and waits for open connections to finish their
/// requests.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    // Bounds open client connections; past it a connection gets one clean 503 and is closed.
    let slots = Arc::new(tokio::sync::Semaphore::new(proxy.config.max_connections));
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                limit = proxy.config.max_connections,
                "connection limit reached: answering 503"
            );
            let service = hyper::service::service_fn(|_req| async {
                let mut r = json_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "proxy_error",
                    "too_many_connections",
                    "the proxy's connection limit (max_connections) is reached; retry shortly",
                );
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                Ok::<_, Infallible>(r)
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
            });
            continue;
        };
        let proxy = proxy.clone();
        let service = hyper::service::service_fn(move |req| {
            let proxy = proxy.clone();
            async move { proxy.handle(req).await }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
