//! The test bed: real llama-servers on ephemeral ports, started from the models that
//! `make setup` put in the cache (`KLPROXY_CACHE`, default `~/.cache/kl-proxy`), and stopped
//! when the guard drops (also when a test fails).
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The cache directory `make setup` fills.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("KLPROXY_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/kl-proxy")
        })
}

/// A model file from the cache: `q4_1` (main), `q8_0` (close candidate), `q2_k` (far candidate).
pub fn model(quant: &str) -> PathBuf {
    let p = cache_dir().join(format!("models/smollm2-135m-{quant}.gguf"));
    assert!(p.exists(), "{} is missing: run `make setup`", p.display());
    p
}

/// A free loopback port (bound then released; the server binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running llama-server, killed on drop.
pub struct LlamaServer {
    child: Child,
    pub addr: SocketAddr,
    pub model: PathBuf,
}

impl LlamaServer {
    /// Starts `llama-server` on `model` and waits until `/health` answers ok.
    pub fn start(model: PathBuf) -> LlamaServer {
        LlamaServer::start_with(model, &[])
    }

    pub fn start_with(model: PathBuf, extra: &[&str]) -> LlamaServer {
        let bin = cache_dir().join("bin/llama-server");
        assert!(
            bin.exists(),
            "{} is missing: run `make setup`",
            bin.display()
        );
        for _attempt in 0..3 {
            let port = free_port();
            let log = std::fs::File::create(
                std::env::temp_dir().join(format!("llama-server-{port}.log")),
            )
            .unwrap();
            let child = Command::new(&bin)
                .arg("-m")
                .arg(&model)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["-c", "4096", "-t", "1", "--no-webui", "-np", "1"])
                .args(extra)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("spawn llama-server");
            let mut server = LlamaServer {
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                model: model.clone(),
            };
            if server.wait_healthy(Duration::from_secs(60)) {
                return server;
            }
        }
        panic!("llama-server on {} did not become healthy", model.display());
    }

    fn wait_healthy(&mut self, limit: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if let Ok((200, body)) = http_get(self.addr, "/health") {
                if body.contains("ok") {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tiny blocking HTTP/1.1 GET for readiness checks (no keep-alive).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Ok((status, body))
}

/// `POST url` with a JSON body; the JSON answer (any status).
pub async fn post_json(url: &str, body: &serde_json::Value) -> serde_json::Value {
    reqwest::Client::new()
        .post(url)
        .json(body)
        .send()
        .await
        .expect("request sent")
        .json()
        .await
        .expect("a JSON answer")
}
