//! Fault-injection kit shared by `faults.rs`, `bad_input.rs` and `fuzz.rs`: small in-process
//! servers that misbehave on purpose (loopback only), the proxy's process figures read from
//! `/proc`, and the recorded llama-server answers of `tests/fuzz-corpus/`.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// What a scripted server answers to one request.
pub enum Reply {
    /// A status, a content type and a body.
    With(u16, &'static str, Vec<u8>),
    /// Never answers (the connection stays open).
    Hang,
}

impl Reply {
    pub fn json(status: u16, v: serde_json::Value) -> Reply {
        Reply::With(status, "application/json", v.to_string().into_bytes())
    }
}

/// A running in-process server; stopped when dropped.
pub struct Server {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Handler = dyn Fn(Method, String, Bytes) -> Reply + Send + Sync;

/// An HTTP/1.1 server answering each request with `f(method, path, body)`.
pub async fn scripted(
    f: impl Fn(Method, String, Bytes) -> Reply + Send + Sync + 'static,
) -> Server {
    scripted_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), f)
}

pub fn scripted_on(
    listener: TcpListener,
    f: impl Fn(Method, String, Bytes) -> Reply + Send + Sync + 'static,
) -> Server {
    let addr = listener.local_addr().unwrap();
    let f: Arc<Handler> = Arc::new(f);
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let f = f.clone();
            conns.spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let f = f.clone();
                    async move {
                        let method = req.method().clone();
                        let path = req.uri().path().to_owned();
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        match f(method, path, body) {
                            Reply::With(status, ct, body) => Ok::<_, Infallible>(
                                Response::builder()
                                    .status(StatusCode::from_u16(status).unwrap())
                                    .header("content-type", ct)
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap(),
                            ),
                            Reply::Hang => std::future::pending().await,
                        }
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Server { addr, task }
}

/// A raw TCP server: `f` gets each accepted connection (for what a real server cannot be
/// made to do: close mid-stream, answer garbage, answer slowly).
pub async fn raw<F, Fut>(f: F) -> Server
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let f = Arc::new(f);
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            conns.spawn(f(stream));
        }
    });
    Server { addr, task }
}

/// Reads one request head and its `Content-Length` body from `s` (enough for the proxy's
/// requests, which always carry a length on scored endpoints).
pub async fn read_request(s: &mut TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return buf;
            }
        }
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut tmp)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&tmp[..n]),
            _ => return buf,
        }
    }
}

/// A recorded llama-server answer from `tests/fuzz-corpus/`.
pub fn corpus(name: &str) -> Vec<u8> {
    let p = corpus_dir().join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

pub fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fuzz-corpus")
}

/// Resident set size of a process in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}
