//! The admin listener, apart from the proxy port (which forwards everything to the target):
//! `GET /metrics` (Prometheus), `GET /api/summary` (the `report` numbers as JSON),
//! `GET /api/comparisons?limit=&offset=&series=`, `GET /api/comparisons/{id}`,
//! `GET /api/series?name=&since_ms=&bins=` (histogram, by-context and by-time aggregates of one
//! per-position series, computed in SQL), `GET /api/info` (plugins, their failures, the series
//! kept, `keep_text`), and the live dashboard at `GET /` (`host/src/dashboard/`: plain HTML,
//! CSS and JS compiled into the binary). With `admin.token` set, every request needs
//! `Authorization: Bearer <token>` (or `?token=`), except the dashboard's static files, which
//! hold no data (the page sends the token it was given as `?token=` to the API).

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
use crate::store::{valid_series_name, Store};

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

/// The dashboard's files, compiled in (no CDN, nothing fetched at run time).
const DASHBOARD_HTML: &str = include_str!("dashboard/index.html");
const DASHBOARD_CSS: &str = include_str!("dashboard/dashboard.css");
const DASHBOARD_JS: &str = include_str!("dashboard/dashboard.js");

/// The dashboard's static files: served without the token (they hold no data).
fn static_file(path: &str) -> Option<Response<ProxyBody>> {
    let (content_type, body) = match path {
        "/" | "/index.html" => ("text/html; charset=utf-8", DASHBOARD_HTML),
        "/dashboard.css" => ("text/css; charset=utf-8", DASHBOARD_CSS),
        "/dashboard.js" => ("text/javascript; charset=utf-8", DASHBOARD_JS),
        _ => return None,
    };
    let mut r = respond(StatusCode::OK, content_type, body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    // The page's URL may carry `?token=`: never send it on.
    h.insert(
        header::REFERRER_POLICY,
        header::HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    Some(r)
}

fn bad_request(message: &str) -> Response<ProxyBody> {
    json_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        "invalid_parameter",
        message,
    )
}

/// The default series of the charts: the first whose metric is `kld`, else the first.
fn default_series(names: &[String]) -> Option<&String> {
    names
        .iter()
        .find(|n| n.rsplit_once('.').is_some_and(|(_, m)| m == "kld"))
        .or_else(|| names.first())
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
        if req.method() == Method::GET {
            if let Some(r) = static_file(req.uri().path()) {
                return Ok(r);
            }
        }
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
                // `series=`: each comparison also gets `series` {n, mean, max} of that series and
                // `same_top` (mean of the first `same_top` series kept).
                let series = query_param(query.as_deref(), "series").map(str::to_owned);
                if series.as_deref().is_some_and(|n| !valid_series_name(n)) {
                    return Ok(bad_request("series: not a series name"));
                }
                match self
                    .with_store(move |s| {
                        let mut list = s.list(limit, offset)?;
                        if let Some(name) = series {
                            let names = s.series_names(200)?;
                            let same_top = names
                                .iter()
                                .find(|n| n.rsplit_once('.').is_some_and(|(_, m)| m == "same_top"));
                            let ids: Vec<String> = list
                                .iter()
                                .filter_map(|c| c["id"].as_str().map(str::to_owned))
                                .collect();
                            let aggregates =
                                s.comparison_series(&ids, &name, same_top.map(String::as_str))?;
                            for c in &mut list {
                                let agg = c["id"].as_str().and_then(|id| aggregates.get(id));
                                if let (Some(o), Some(a)) = (c.as_object_mut(), agg) {
                                    o.insert("series".into(), a.clone());
                                }
                            }
                        }
                        Ok(list)
                    })
                    .await
                {
                    Ok(list) => {
                        json_ok(&json!({"comparisons": list, "limit": limit, "offset": offset}))
                    }
                    Err(r) => r,
                }
            }
            "/api/series" => {
                let q = query.as_deref();
                let since = match query_param(q, "since_ms").map(str::parse::<u64>) {
                    None => 0,
                    Some(Ok(v)) => v,
                    Some(Err(_)) => return Ok(bad_request("since_ms: not a number")),
                };
                let bins = match query_param(q, "bins").map(str::parse::<u32>) {
                    None => 40,
                    Some(Ok(v)) if (1..=200).contains(&v) => v,
                    Some(_) => return Ok(bad_request("bins: a number from 1 to 200")),
                };
                let name = query_param(q, "name").map(str::to_owned);
                if name.as_deref().is_some_and(|n| !valid_series_name(n)) {
                    return Ok(bad_request("name: not a series name"));
                }
                match self
                    .with_store(move |s| {
                        let name = match name {
                            Some(n) => n,
                            None => match default_series(&s.series_names(200)?) {
                                Some(n) => n.clone(),
                                None => return Ok(json!({"name": null, "n": 0})),
                            },
                        };
                        s.series_aggregate(&name, since, bins)
                    })
                    .await
                {
                    Ok(v) => json_ok(&v),
                    Err(r) => r,
                }
            }
            "/api/info" => {
                let loaded = (self.plugins)();
                let keep_text = self.store.as_ref().map(|(_, c)| c.keep_text);
                match self
                    .with_store(move |s| Ok((s.series_names(200)?, s.plugin_failures(0)?)))
                    .await
                {
                    Ok((series, failures)) => json_ok(&json!({
                        "plugins": loaded,
                        "plugin_failures": failures,
                        "default_series": default_series(&series),
                        "series": series,
                        "keep_text": keep_text,
                    })),
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
