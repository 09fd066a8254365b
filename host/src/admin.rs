//! The admin listener, apart from the proxy port (which forwards everything to the target):
//! `GET /metrics` (Prometheus), `GET /api/summary` (the `report` numbers as JSON),
//! `GET /api/comparisons?limit=&offset=`, `GET /api/comparisons/{id}`. With `admin.token`
//! set, every request needs `Authorization: Bearer <token>`.

use std::convert::Infallible;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::config::StoreConfig;
use crate::metrics::Metrics;
use crate::proxy::{json_error, ProxyBody};
use crate::queue::ComparisonQueue;
use crate::store::Store;

/// What the admin endpoints read.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub queue: Option<ComparisonQueue>,
    /// The store file and its settings (`None`: no store, the API answers 404).
    pub store: Option<(PathBuf, StoreConfig)>,
    pub token: Option<String>,
    /// Names of the loaded plugins, for the summary.
    pub plugins: Arc<dyn Fn() -> Vec<String> + Send + Sync>,
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<ProxyBody> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

fn json_ok(v: &Value) -> Response<ProxyBody> {
    respond(StatusCode::OK, "application/json", v.to_string())
}

fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timings.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl AdminState {
    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let bearer = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let query = query_param(req.uri().query(), "token");
        bearer
            .or(query)
            .is_some_and(|t| same(t.as_bytes(), token.as_bytes()))
    }

    async fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, crate::store::StoreError> + Send + 'static,
    ) -> Result<T, Response<ProxyBody>> {
        let Some((path, config)) = self.store.clone() else {
            return Err(json_error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no_store",
                "no store is configured (store.path)",
            ));
        };
        tokio::task::spawn_blocking(move || Store::open(&path, config).and_then(|s| f(&s)))
            .await
            .map_err(|e| {
                json_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "store",
                    &e.to_string(),
                )
            })?
            .map_err(|e| {
                json_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "store",
                    &e.to_string(),
                )
            })
    }

    /// Answers one admin request.
    pub async fn handle(&self, req: Request<Incoming>) -> Result<Response<ProxyBody>, Infallible> {
        if !self.authorized(&req) {
            let mut r = json_error(
                StatusCode::UNAUTHORIZED,
                "auth_error",
                "unauthorized",
                "admin token required",
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return Ok(r);
        }
        if req.method() != Method::GET {
            return Ok(json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "method",
                "only GET",
            ));
        }
        let path = req.uri().path().to_owned();
        let query = req.uri().query().map(str::to_owned);
        let resp = match path.as_str() {
            "/metrics" => {
                let queue = self.queue.as_ref().map(|q| (q.stats().as_ref(), q.depth()));
                respond(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    self.metrics.render(queue),
                )
            }
            "/api/summary" => {
                let since = query_param(query.as_deref(), "since_ms")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                match self
                    .with_store(move |s| {
                        s.report_input(since)
                            .map(|i| crate::stats::build_report(&i))
                    })
                    .await
                {
                    Ok(report) => {
                        let mut v = serde_json::to_value(&report).unwrap_or(Value::Null);
                        if let (Some(o), Some(q)) = (v.as_object_mut(), &self.queue) {
                            let st = q.stats();
                            o.insert("live".into(), json!({
                                "offered": st.offered.load(std::sync::atomic::Ordering::Acquire),
                                "dropped": st.dropped.load(std::sync::atomic::Ordering::Acquire),
                                "queue_depth": q.depth(),
                            }));
                        }
                        if let Some(o) = v.as_object_mut() {
                            o.insert("plugins".into(), json!((self.plugins)()));
                        }
                        json_ok(&v)
                    }
                    Err(r) => r,
                }
            }
            "/api/comparisons" => {
                let limit = query_param(query.as_deref(), "limit")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(50u32)
                    .min(1000);
                let offset = query_param(query.as_deref(), "offset")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0u32);
                match self.with_store(move |s| s.list(limit, offset)).await {
                    Ok(list) => {
                        json_ok(&json!({"comparisons": list, "limit": limit, "offset": offset}))
                    }
                    Err(r) => r,
                }
            }
            p if p.starts_with("/api/comparisons/") => {
                let id = p.trim_start_matches("/api/comparisons/").to_owned();
                match self.with_store(move |s| s.get(&id)).await {
                    Ok(Some(v)) => json_ok(&v),
                    Ok(None) => json_error(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        "no_such_comparison",
                        "no comparison with that id",
                    ),
                    Err(r) => r,
                }
            }
            _ => json_error(
                StatusCode::NOT_FOUND,
                "not_found",
                "not_found",
                "no such admin endpoint",
            ),
        };
        Ok(resp)
    }
}

/// Serves the admin endpoints on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
            _ = &mut shutdown => break,
        };
        let state = state.clone();
        let service = hyper::service::service_fn(move |req| {
            let state = state.clone();
            async move { state.handle(req).await }
        });
        let conn = graceful.watch(
            builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned(),
        );
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    graceful.shutdown().await;
    Ok(())
}
