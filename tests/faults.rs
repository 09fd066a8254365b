//! Injected faults, with real processes on loopback, each bounded in time: a candidate that is
//! down, killed, hanging, answering garbage or 5xx (the client never notices; comparisons fail
//! with the right reason and resume when it is back); a target that is down, refuses, closes
//! mid-stream or answers slowly (a clean OpenAI-shaped error or the truncated stream, never a
//! comparison of a partial answer); a burst past the queue; SIGTERM and SIGKILL of the real
//! binary under load; and a short soak with RSS and open fds watched.

mod common;
mod fault_kit;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cache_dir, free_port, http_get, model, LlamaServer};
use fault_kit::{read_request, Reply};
use kl_proxy::config::Config;
use kl_proxy::queue::ComparisonOutcome;
use kl_proxy::Service;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

async fn start_proxy(target: &str, candidate: &str, extra: &str) -> Service {
    // Defaults for the keys `extra` does not set (YAML refuses a key given twice).
    let mut yaml = format!(
        "target_host: {target}\ncandidate_host: {candidate}\nadmin: {{listen: \"\"}}\n\
         store: {{path: \"\"}}\n{extra}"
    );
    for (k, v) in [("candidate_timeout", "2s"), ("shutdown_timeout", "2s")] {
        if !extra.contains(k) {
            yaml.push_str(&format!("{k}: {v}\n"));
        }
    }
    Service::start(
        Config::from_yaml(&yaml, None).expect("config"),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await
    .expect("service starts")
}

fn chat_body(text: &str, max_tokens: u32, stream: bool) -> Value {
    json!({"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
        "temperature": 0.0, "stream": stream})
}

/// The answer's text, from a JSON answer or an SSE stream.
fn answer_text(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        return v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
    }
    String::from_utf8_lossy(body)
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

async fn post(
    http: &reqwest::Client,
    addr: impl std::fmt::Display,
    body: &Value,
) -> (u16, Vec<u8>) {
    let r = http
        .post(format!("http://{addr}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .expect("request sent");
    let status = r.status().as_u16();
    (status, r.bytes().await.expect("whole body").to_vec())
}

async fn next_outcome(
    rx: &mut tokio::sync::broadcast::Receiver<Arc<ComparisonOutcome>>,
    within: Duration,
) -> Arc<ComparisonOutcome> {
    tokio::time::timeout(within, rx.recv())
        .await
        .expect("an outcome in time")
        .expect("outcome channel open")
}

fn reason(o: &ComparisonOutcome) -> &'static str {
    match &o.record {
        Ok(_) => "ok",
        Err(f) => f.reason,
    }
}

/// Every kind of broken candidate: the client gets the target's answer, as fast as without the
/// proxy's comparisons, and the comparison fails with the reason that names the fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_candidate_never_reaches_the_client() {
    let main = LlamaServer::start(model("q4_1"));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let (_, direct) = post(&http, main.addr, &chat_body("Name a fruit.", 8, false)).await;
    let direct_text = answer_text(&direct);

    let hanging = fault_kit::scripted(|_, _, _| Reply::Hang).await;
    let garbage = fault_kit::raw(|mut s| async move {
        let _ = read_request(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 9\r\n\r\n{not json")
            .await;
    })
    .await;
    let not_http = fault_kit::raw(|mut s| async move {
        let _ = read_request(&mut s).await;
        let _ = s.write_all(b"\x00\x01garbage garbage\r\n\r\n").await;
    })
    .await;
    let e500 =
        fault_kit::scripted(|_, _, _| Reply::json(500, json!({"error": {"message": "boom"}})))
            .await;
    let e503 = fault_kit::scripted(|_, _, _| {
        Reply::json(503, json!({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}))
    })
    .await;
    let refused = format!("http://127.0.0.1:{}", free_port());
    let cases: Vec<(&str, String, &[&str])> = vec![
        ("down", refused, &["candidate_down"]),
        ("hanging", hanging.url(), &["timeout"]),
        (
            "answering invalid JSON",
            garbage.url(),
            &["bad_answer", "unsupported"],
        ),
        (
            "answering bytes that are not HTTP",
            not_http.url(),
            &["bad_answer", "candidate_down", "unsupported"],
        ),
        ("answering 500", e500.url(), &["bad_answer", "unsupported"]),
        (
            "answering 503 (llama-server while it loads)",
            e503.url(),
            &["candidate_down", "unsupported"],
        ),
    ];
    let mut requests = 0;
    for (what, candidate, reasons) in cases {
        let proxy = start_proxy(&main.url(), &candidate, "candidate_timeout: 1s\n").await;
        let mut outcomes = proxy.subscribe().unwrap();
        for stream in [false, true] {
            let t = Instant::now();
            let (status, body) =
                post(&http, proxy.addr, &chat_body("Name a fruit.", 8, stream)).await;
            let client = t.elapsed();
            requests += 1;
            assert_eq!(status, 200, "candidate {what}");
            assert_eq!(
                answer_text(&body),
                direct_text,
                "candidate {what}: the target's answer"
            );
            assert!(
                client < Duration::from_secs(10),
                "candidate {what}: the client waited"
            );
            let o = next_outcome(&mut outcomes, Duration::from_secs(20)).await;
            eprintln!(
                "candidate {what}: client {client:?}, comparison failed: {}",
                reason(&o)
            );
            assert!(
                reasons.contains(&reason(&o)),
                "candidate {what}: reason {}",
                reason(&o)
            );
        }
        let stats = proxy.stats().unwrap();
        proxy.shutdown().await.unwrap();
        assert_eq!(stats.failed.load(Ordering::Acquire), 2, "candidate {what}");
    }
    eprintln!("{requests} requests, 6 candidate faults, every comparison failed with its reason");
}

/// llama-server answers 503 while it loads its model; a comparison then is `candidate_down`
/// (it will work once the model is loaded), not `unsupported`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loading_candidate_is_candidate_down() {
    let e503 = fault_kit::scripted(|_, _, _| {
        Reply::json(503, json!({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}))
    })
    .await;
    let config = Config::from_yaml(
        &format!(
            "target_host: http://127.0.0.1:1\ncandidate_host: {}\n",
            e503.url()
        ),
        None,
    )
    .unwrap();
    let scorer = kl_proxy::candidate::CandidateScorer::new(&config);
    let e = scorer.probe().await.unwrap_err();
    assert_eq!(e.reason(), "candidate_down", "{e}");
}

/// A llama-server candidate on a fixed port (to bring it back on the same address).
struct Candidate(Child);

impl Candidate {
    fn start(port: u16) -> Candidate {
        let log =
            std::fs::File::create(std::env::temp_dir().join(format!("kl-faults-cand-{port}.log")))
                .unwrap();
        let candidate = Candidate(
            Command::new(cache_dir().join("bin/llama-server"))
                .arg("-m")
                .arg(model("q8_0"))
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["-c", "4096", "-t", "1", "--no-webui", "-np", "1"])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(60) {
            if matches!(http_get(addr, "/health"), Ok((200, _))) {
                return candidate;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("candidate on {port} not healthy");
    }
}

impl Drop for Candidate {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Down at start, then started, then killed mid-comparison, then back on the same port: the
/// client never notices, comparisons fail as `candidate_down` while it is away and succeed
/// again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_that_comes_and_goes_is_compared_again_when_back() {
    let main = LlamaServer::start(model("q4_1"));
    let port = free_port();
    let proxy = start_proxy(
        &main.url(),
        &format!("http://127.0.0.1:{port}"),
        "candidate_timeout: 20s\n",
    )
    .await;
    let mut outcomes = proxy.subscribe().unwrap();
    let http = reqwest::Client::new();
    let mut seq = Vec::new();

    // 1. Down at start.
    let (s, _) = post(&http, proxy.addr, &chat_body("Name a fruit.", 8, false)).await;
    assert_eq!(s, 200);
    seq.push(reason(
        &*next_outcome(&mut outcomes, Duration::from_secs(20)).await,
    ));
    // 2. Started: compared.
    let cand = Candidate::start(port);
    let (s, _) = post(&http, proxy.addr, &chat_body("Name a fruit.", 8, false)).await;
    assert_eq!(s, 200);
    seq.push(reason(
        &*next_outcome(&mut outcomes, Duration::from_secs(60)).await,
    ));
    // 3. Killed while a long comparison is in flight.
    let (s, _) = post(
        &http,
        proxy.addr,
        &chat_body("Write a long story about a dragon.", 200, false),
    )
    .await;
    assert_eq!(s, 200);
    let stats = proxy.stats().unwrap();
    let t = Instant::now();
    while stats.in_flight.load(Ordering::Acquire) == 0
        && stats.pending() > 0
        && t.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(cand);
    seq.push(reason(
        &*next_outcome(&mut outcomes, Duration::from_secs(30)).await,
    ));
    // 4. Still down.
    let (s, _) = post(&http, proxy.addr, &chat_body("Name a fruit.", 8, true)).await;
    assert_eq!(s, 200);
    seq.push(reason(
        &*next_outcome(&mut outcomes, Duration::from_secs(20)).await,
    ));
    // 5. Back on the same port: compared again.
    let _cand = Candidate::start(port);
    let (s, _) = post(&http, proxy.addr, &chat_body("Name a fruit.", 8, true)).await;
    assert_eq!(s, 200);
    seq.push(reason(
        &*next_outcome(&mut outcomes, Duration::from_secs(60)).await,
    ));
    eprintln!("down, up, killed mid-comparison, down, back: {seq:?}");
    assert_eq!(seq[0], "candidate_down");
    assert_eq!(seq[1], "ok");
    assert!(
        ["candidate_down", "ok"].contains(&seq[2]),
        "killed mid-comparison: {}",
        seq[2]
    );
    assert_eq!(seq[3], "candidate_down");
    assert_eq!(seq[4], "ok", "resumed on the same port");
    proxy.shutdown().await.unwrap();
}

/// Every kind of broken target, from small hand-made servers: the client gets a clean
/// OpenAI-shaped 502/504 or the truncated stream the target sent, within bounds; nothing
/// partial is offered for comparison.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_target_gives_clean_errors_and_no_comparison() {
    let refusing = fault_kit::raw(|s| async move { drop(s) }).await;
    let not_http = fault_kit::raw(|mut s| async move {
        let _ = read_request(&mut s).await;
        let _ = s.write_all(b"SSH-2.0-OpenSSH\r\n").await;
    })
    .await;
    let slow_head = fault_kit::raw(|mut s| async move {
        let _ = read_request(&mut s).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
            .await;
    })
    .await;
    let sse_head =
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
    let event = |text: &str| {
        let e = format!(
            "data: {}\n\n",
            json!({"choices": [{"index": 0, "delta": {"content": text},
            "logprobs": {"content": [{"id": 1, "token": text, "logprob": -0.1, "top_logprobs": [{"id": 1, "logprob": -0.1}]}]}}]})
        );
        format!("{:x}\r\n{e}\r\n", e.len())
    };
    let (e1, e2) = (event("Hel"), event("lo"));
    let cut_sse = fault_kit::raw(move |mut s| {
        let (e1, e2) = (e1.clone(), e2.clone());
        async move {
            let _ = read_request(&mut s).await;
            let _ = s.write_all(sse_head.as_bytes()).await;
            let _ = s.write_all(e1.as_bytes()).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = s.write_all(e2.as_bytes()).await;
            // Closed before the finish_reason and the terminating chunk.
        }
    })
    .await;
    let cut_json = fault_kit::raw(|mut s| async move {
        let _ = read_request(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{\"choices\": [{\"index\": 0, \"logprobs\"")
            .await;
    })
    .await;
    let stalled_body = fault_kit::raw(|mut s| async move {
        let _ = read_request(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{\"choices\"")
            .await;
        tokio::time::sleep(Duration::from_secs(60)).await;
    })
    .await;

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let refused = format!("http://127.0.0.1:{}", free_port());
    // (what, target, expected status or None for a truncated 200, expected code)
    let cases: Vec<(&str, String, Option<u16>, &str)> = vec![
        ("down", refused, Some(502), "target_unreachable"),
        (
            "refusing (accepts and closes)",
            refusing.url(),
            Some(502),
            "target_unreachable",
        ),
        (
            "answering bytes that are not HTTP",
            not_http.url(),
            Some(502),
            "target_unreachable",
        ),
        (
            "answering slowly (target_timeout 1s)",
            slow_head.url(),
            Some(504),
            "target_timeout",
        ),
        ("closing mid-stream (SSE)", cut_sse.url(), None, ""),
        ("closing mid-body (JSON)", cut_json.url(), None, ""),
    ];
    let mut faults = 0;
    for (what, target, status, code) in &cases {
        let proxy = start_proxy(
            target,
            &format!("http://127.0.0.1:{}", free_port()),
            "target_timeout: 1s\n",
        )
        .await;
        for stream in [false, true] {
            let t = Instant::now();
            let r = http
                .post(format!("http://{}/v1/chat/completions", proxy.addr))
                .json(&chat_body("Hi.", 8, stream))
                .send()
                .await;
            faults += 1;
            match status {
                Some(want) => {
                    let r = r.expect("an answer");
                    assert_eq!(r.status().as_u16(), *want, "target {what}");
                    let e: Value = r.json().await.expect("JSON error");
                    assert_eq!(e["error"]["code"], *code, "target {what}: {e}");
                    assert!(e["error"]["message"].is_string() && e["error"]["type"].is_string());
                    assert!(
                        t.elapsed() < Duration::from_secs(5),
                        "target {what}: {:?}",
                        t.elapsed()
                    );
                }
                None => {
                    // The truncated answer as the target sent it: a 200 whose body ends in an error.
                    let r = r.expect("the head arrives");
                    assert_eq!(r.status(), 200, "target {what}");
                    let body = r.bytes().await;
                    eprintln!(
                        "target {what}: body {:?}",
                        body.as_ref().map(|b| b.len()).map_err(|e| e.to_string())
                    );
                    if let Ok(b) = &body {
                        assert!(!String::from_utf8_lossy(b).contains("finish_reason\":\"stop"));
                    }
                }
            }
            eprintln!("target {what}: client answered in {:?}", t.elapsed());
        }
        assert_eq!(
            proxy.stats().unwrap().offered.load(Ordering::Acquire),
            0,
            "target {what}: nothing offered"
        );
        proxy.shutdown().await.unwrap();
    }
    let _ = stalled_body;
    eprintln!("{faults} requests against 6 broken targets, 0 comparisons offered");
}

/// A target that sends its head and then stalls the body: with `target_timeout` set, the
/// client is not left waiting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_stalls_mid_body_is_cut_after_target_timeout() {
    let stalled = fault_kit::raw(|mut s| async move {
        let _ = read_request(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{\"choices\"")
            .await;
        tokio::time::sleep(Duration::from_secs(120)).await;
    })
    .await;
    let proxy = start_proxy(
        &stalled.url(),
        &format!("http://127.0.0.1:{}", free_port()),
        "target_timeout: 1s\n",
    )
    .await;
    let t = Instant::now();
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/chat/completions", proxy.addr))
        .json(&chat_body("Hi.", 8, false))
        .send()
        .await
        .unwrap();
    let body = tokio::time::timeout(Duration::from_secs(10), r.bytes()).await;
    assert!(
        body.is_ok(),
        "the client still waits {:?} after the target stalled",
        t.elapsed()
    );
}

/// A burst of concurrent requests past a queue of 2 with a stuck candidate: every request
/// succeeds, the excess jobs are dropped and counted, every job is accounted for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_the_queue_drops_and_counts() {
    let main = LlamaServer::start_with(model("q4_1"), &["-np", "4"]);
    let hanging = fault_kit::scripted(|_, _, _| Reply::Hang).await;
    let proxy = start_proxy(
        &main.url(),
        &hanging.url(),
        "queue_capacity: 2\ncandidate_timeout: 30s\nshutdown_timeout: 1s\n",
    )
    .await;
    let http = reqwest::Client::new();
    let n = 32;
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let http = http.clone();
        let addr = proxy.addr;
        tasks.spawn(async move {
            post(&http, addr, &chat_body(&format!("Say {i}."), 4, i % 2 == 0))
                .await
                .0
        });
    }
    let mut ok = 0;
    while let Some(s) = tasks.join_next().await {
        ok += u32::from(s.unwrap() == 200);
    }
    let took = t.elapsed();
    let stats = proxy.stats().unwrap();
    assert_eq!(ok, n, "every request answered");
    assert_eq!(stats.offered.load(Ordering::Acquire), n as u64);
    let dropped = stats.dropped.load(Ordering::Acquire);
    assert!(dropped >= n as u64 - 3, "dropped {dropped}");
    proxy.shutdown().await.unwrap();
    let settled = stats.ok.load(Ordering::Acquire)
        + stats.failed.load(Ordering::Acquire)
        + stats.dropped.load(Ordering::Acquire);
    eprintln!("burst of {n} in {took:?}: dropped {dropped} at once, {settled} accounted for after shutdown");
    assert_eq!(settled, n as u64);
}

// ---- The real binary ----------------------------------------------------------------------

struct Proxy {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
}

impl Proxy {
    fn start(dir: &Path, main: &str, cand: &str, extra: &str) -> Proxy {
        let (port, admin_port) = (free_port(), free_port());
        let config = dir.join("config.yaml");
        std::fs::write(
            &config,
            format!(
                "target_host: {main}\ncandidate_host: {cand}\nport: {port}\ncandidate_timeout: 30s\n\
                 shutdown_timeout: 30s\nstore: {{path: {}}}\nadmin: {{listen: \"127.0.0.1:{admin_port}\"}}\n\
                 plugins:\n  - name: kl\n    path: {}\n{extra}",
                dir.join("store.db").display(),
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugins/dist/kl-divergence.wasm").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("proxy.log")).unwrap();
        // Other builds on the machine may be relinking the binary this very moment: retry.
        let mut tries = 0;
        let child = loop {
            match Command::new(env!("CARGO_BIN_EXE_kl-proxy"))
                .arg("--config")
                .arg(&config)
                .env("KLPROXY_LOG", "info")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log.try_clone().unwrap())
                .spawn()
            {
                Ok(c) => break c,
                Err(e) if tries < 100 => {
                    tries += 1;
                    eprintln!("spawning kl-proxy: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(300));
                }
                Err(e) => panic!("spawning kl-proxy: {e}"),
            }
        };
        let p = Proxy {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
        };
        let t = Instant::now();
        while std::net::TcpStream::connect(p.admin).is_err()
            || std::net::TcpStream::connect(p.addr).is_err()
        {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "the proxy did not start: {}",
                std::fs::read_to_string(dir.join("proxy.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        p
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for the process to exit (bounded); its exit code.
    fn wait(&mut self, limit: Duration) -> Option<i32> {
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            assert!(
                t.elapsed() < limit,
                "the proxy did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `klproxy_comparisons_total` by status (`ok`, `failed`, `dropped`).
    fn comparisons(&self) -> (u64, u64, u64) {
        let (_, body) = http_get(self.admin, "/metrics").unwrap();
        let mut c = (0, 0, 0);
        for l in body
            .lines()
            .filter(|l| l.starts_with("klproxy_comparisons_total{"))
        {
            let n: u64 = l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64;
            if l.contains("status=\"ok\"") {
                c.0 += n
            } else if l.contains("status=\"failed\"") {
                c.1 += n
            } else if l.contains("status=\"dropped\"") {
                c.2 += n
            }
        }
        c
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn store_counts(path: &Path) -> std::collections::BTreeMap<String, u64> {
    let config = Config::from_yaml("target_host: http://127.0.0.1:1\n", None)
        .unwrap()
        .store;
    let store = kl_proxy::store::Store::open(path, config).expect("the store opens");
    store.counts(0).expect("counts")
}

fn total(c: &std::collections::BTreeMap<String, u64>) -> u64 {
    c.values().sum()
}

/// SIGTERM while requests are in flight: each finishes with its whole answer, the process
/// exits 0, and the store holds every comparison (none was dropped: the grace is long enough).
/// Then SIGKILL mid-load: on restart the store opens with consistent counts and keeps
/// growing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_sigkill_leaves_a_usable_store() {
    let main = LlamaServer::start_with(model("q4_1"), &["-np", "4"]);
    let cand = LlamaServer::start(model("q8_0"));
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = Proxy::start(dir.path(), &main.url(), &cand.url(), "");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let n = 8;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (http, addr) = (http.clone(), proxy.addr);
        tasks.spawn(async move {
            post(
                &http,
                addr,
                &chat_body(&format!("Count to {}.", i + 5), 24, i % 2 == 0),
            )
            .await
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    proxy.signal("-TERM");
    let mut complete = 0;
    while let Some(r) = tasks.join_next().await {
        let (status, body) = r.unwrap();
        assert_eq!(status, 200);
        assert!(!answer_text(&body).is_empty(), "a whole answer");
        complete += 1;
    }
    let code = tokio::task::block_in_place(|| proxy.wait(Duration::from_secs(60)));
    eprintln!(
        "SIGTERM with {n} requests in flight: {complete} completed, exit {code:?} after {:?}",
        t.elapsed()
    );
    assert_eq!(code, Some(0));
    let counts = store_counts(&dir.path().join("store.db"));
    eprintln!("store after SIGTERM: {counts:?}");
    assert_eq!(total(&counts), n, "every comparison stored");

    // SIGKILL in the middle of a load.
    let mut proxy = Proxy::start(dir.path(), &main.url(), &cand.url(), "");
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..12 {
        let (http, addr) = (http.clone(), proxy.addr);
        // Requests cut by the kill fail on the client side: that is expected here.
        tasks.spawn(async move {
            let r = http
                .post(format!("http://{addr}/v1/chat/completions"))
                .json(&chat_body(&format!("Name {i} animals."), 16, false))
                .send()
                .await;
            if let Ok(r) = r {
                let _ = r.bytes().await;
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.signal("-KILL");
    while tasks.join_next().await.is_some() {}
    let code = tokio::task::block_in_place(|| proxy.wait(Duration::from_secs(10)));
    assert_eq!(code, None, "killed by the signal");
    let after_kill = store_counts(&dir.path().join("store.db"));
    eprintln!("store after SIGKILL: {after_kill:?}");
    assert!(total(&after_kill) >= n, "what was stored stays");
    // Every position row belongs to a stored comparison.
    let conn = rusqlite_check(&dir.path().join("store.db"));
    assert_eq!(conn, 0, "positions without a comparison");
    // And the proxy starts again on it and keeps storing.
    let mut proxy = Proxy::start(dir.path(), &main.url(), &cand.url(), "");
    let (s, _) = post(&http, proxy.addr, &chat_body("Name a fruit.", 4, false)).await;
    assert_eq!(s, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.signal("-TERM");
    assert_eq!(
        tokio::task::block_in_place(|| proxy.wait(Duration::from_secs(60))),
        Some(0)
    );
    let restarted = store_counts(&dir.path().join("store.db"));
    assert_eq!(total(&restarted), total(&after_kill) + 1);
}

/// Positions whose comparison is missing (0 in a consistent store), read through the store's
/// own JSON API: every listed comparison's `positions` count matches its stored rows.
fn rusqlite_check(path: &Path) -> u64 {
    let config = Config::from_yaml("target_host: http://127.0.0.1:1\n", None)
        .unwrap()
        .store;
    let store = kl_proxy::store::Store::open(path, config).unwrap();
    let mut bad = 0;
    for c in store.list(10_000, 0).unwrap() {
        let id = c["id"].as_str().unwrap();
        let full = store
            .get(id)
            .unwrap()
            .expect("a listed comparison can be read");
        let stored = full["position_values"]
            .as_array()
            .map_or(0, |p| p.len() as i64);
        if c["status"] == "ok" && stored != c["positions"].as_i64().unwrap() {
            bad += 1;
        }
    }
    bad
}

/// A short soak through the real binary and real llama-servers: a few hundred requests, tiny
/// answers, 4 at a time. RSS and open fds stay flat between the two halves; every comparison is
/// accounted for (ok + failed + dropped = requests), and the store holds the ok and failed ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_keeps_memory_and_fds_flat_and_accounts_for_every_comparison() {
    let main = LlamaServer::start_with(model("q4_1"), &["-np", "4"]);
    let cand = LlamaServer::start(model("q8_0"));
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = Proxy::start(dir.path(), &main.url(), &cand.url(), "queue_capacity: 64\n");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let total_requests: usize = std::env::var("KLPROXY_SOAK_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let soak_start = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(150);
    let pid = proxy.pid();
    let mut samples = Vec::new();
    let mut sent = 0usize;
    let batch = 4;
    while sent < total_requests && Instant::now() < deadline {
        let mut tasks = tokio::task::JoinSet::new();
        for j in 0..batch {
            let (http, addr) = (http.clone(), proxy.addr);
            let i = sent + j;
            tasks.spawn(async move {
                post(
                    &http,
                    addr,
                    &chat_body(&format!("Say {}.", i % 37), 3, i.is_multiple_of(3)),
                )
                .await
                .0
            });
        }
        while let Some(s) = tasks.join_next().await {
            assert_eq!(s.unwrap(), 200);
        }
        sent += batch;
        if sent.is_multiple_of(20) {
            samples.push((sent, fault_kit::rss_kib(pid), fault_kit::fd_count(pid)));
        }
    }
    // Let the comparisons settle.
    let t = Instant::now();
    let mut c = proxy.comparisons();
    while c.0 + c.1 + c.2 < sent as u64 && t.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        c = proxy.comparisons();
    }
    samples.push((sent, fault_kit::rss_kib(pid), fault_kit::fd_count(pid)));
    proxy.signal("-TERM");
    assert_eq!(
        tokio::task::block_in_place(|| proxy.wait(Duration::from_secs(60))),
        Some(0)
    );
    let stored = store_counts(&dir.path().join("store.db"));
    let half = samples.len() / 2;
    let first: Vec<_> = samples[1..half.max(2)].to_vec();
    let second: Vec<_> = samples[half..].to_vec();
    let max_of = |s: &[(usize, u64, usize)], f: fn(&(usize, u64, usize)) -> u64| {
        s.iter().map(f).max().unwrap_or(0)
    };
    let (rss1, rss2) = (max_of(&first, |s| s.1), max_of(&second, |s| s.1));
    let (fd1, fd2) = (
        max_of(&first, |s| s.2 as u64),
        max_of(&second, |s| s.2 as u64),
    );
    eprintln!(
        "soak: {sent} requests in {:?}; comparisons ok {} failed {} dropped {}; stored {stored:?}; \
         RSS {} -> {} KiB (peak first half {rss1}, second half {rss2}); fds {} -> {} (peak {fd1}, {fd2})",
        soak_start.elapsed(),
        c.0, c.1, c.2, samples[0].1, samples.last().unwrap().1, samples[0].2, samples.last().unwrap().2
    );
    assert!(
        sent >= 100,
        "at least 100 requests in the time bound ({sent})"
    );
    assert_eq!(
        c.0 + c.1 + c.2,
        sent as u64,
        "ok + failed + dropped = requests"
    );
    assert_eq!(
        total(&stored),
        c.0 + c.1,
        "the store holds every settled comparison"
    );
    assert!(
        rss2 <= rss1 + rss1 / 5 + 8 * 1024,
        "RSS grew: {rss1} -> {rss2} KiB"
    );
    assert!(fd2 <= fd1 + 8, "fds grew: {fd1} -> {fd2}");
}
