//! `make bench` helpers that need Rust (driven by bench/run.py; not part of `make test`):
//!
//! - `upstream --port P`: a stand-in for llama-server's `/v1/chat/completions` that answers at
//!   once with a fixed, realistic body (64 tokens). When the request carries `n_probs` (as the
//!   proxy's injection adds), the body carries logprobs with a top-10 list per token, as
//!   llama-server does. `"stream": true` gets an SSE stream: `chunks` chunks (default 64) `gap_ms`
//!   apart (default 20), both settable in the query string.
//! - `stream --url U`: sequential SSE requests (a few at once): time to first byte and the gaps
//!   between chunks, as seen by the client.
//! - `hold --url U --pid PID`: opens N concurrent SSE streams through a proxy and reads the
//!   proxy's RSS while they are all open.
//! - `plugin --wasm F`: positions/s through the Wasm KL plugin (kl_proxy::plugins) vs the same
//!   computation in native Rust, and the per-call overhead.
//!
//! Every loop is bounded in count and time; everything binds or connects to 127.0.0.1 only.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn arg_or<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    arg(args, name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let cmd = args.get(1).map(String::as_str).unwrap_or("");
    match cmd {
        "upstream" => {
            let threads = arg_or(&args, "--threads", 1usize);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .enable_all()
                .build()?;
            rt.block_on(upstream(arg_or(&args, "--port", 0u16)))
        }
        "stream" => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(stream_client(&args))
        }
        "hold" => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(hold(&args))
        }
        "plugin" => plugin_bench(&args),
        _ => anyhow::bail!("usage: bench upstream|stream|hold|plugin [options]"),
    }
}

// ------------------------------------------------------------------------------------------
// The stand-in upstream
// ------------------------------------------------------------------------------------------

const WORDS: &[&str] = &[
    " The", " capital", " of", " France", " is", " Paris", ",", " a", " city", " known", " for",
    " its", " art", ",", " food", " and", " the", " Eiffel", " Tower", ".", " It", " lies", " on",
    " the", " Seine", " river", " in", " the", " north", " of", " the", " country",
];
const N_TOKENS: usize = 64;
const N_PROBS: usize = 10;

fn token(i: usize) -> (&'static str, i64) {
    let w = WORDS[i % WORDS.len()];
    (w, 1000 + (i % WORDS.len()) as i64 * 17)
}

/// One llama-server token entry with its top-N list.
fn token_entry(i: usize) -> Value {
    let (w, id) = token(i);
    let top: Vec<Value> = (0..N_PROBS)
        .map(|k| {
            let (tw, tid) = if k == 0 { (w, id) } else { token(i + k * 3) };
            json!({"id": tid + if k == 0 { 0 } else { k as i64 }, "token": tw,
                   "bytes": tw.as_bytes(), "logprob": -0.05 - 0.7 * k as f64})
        })
        .collect();
    json!({"id": id, "token": w, "bytes": w.as_bytes(), "logprob": -0.05, "top_logprobs": top})
}

fn timings() -> Value {
    json!({"prompt_n": 18, "prompt_ms": 12.5, "predicted_n": N_TOKENS, "predicted_ms": 640.0,
           "predicted_per_second": 100.0, "cache_n": 0})
}

fn json_body(logprobs: bool) -> Bytes {
    let text: String = (0..N_TOKENS).map(|i| token(i).0).collect();
    let mut choice = json!({"finish_reason": "length", "index": 0,
        "message": {"role": "assistant", "content": text}});
    if logprobs {
        choice["logprobs"] = json!({"content": (0..N_TOKENS).map(token_entry).collect::<Vec<_>>()});
    }
    let body = json!({"choices": [choice], "created": 1733300000, "model": "bench",
        "system_fingerprint": "b0000-bench", "object": "chat.completion",
        "usage": {"completion_tokens": N_TOKENS, "prompt_tokens": 18, "total_tokens": N_TOKENS + 18},
        "id": "chatcmpl-bench", "timings": timings()});
    Bytes::from(serde_json::to_vec(&body).unwrap())
}

fn sse_chunk(i: usize, last: bool, logprobs: bool) -> Bytes {
    let (w, _) = token(i);
    let mut choice = if last {
        json!({"finish_reason": "length", "index": 0, "delta": {}})
    } else {
        json!({"finish_reason": null, "index": 0, "delta": {"content": w}})
    };
    if logprobs && !last {
        choice["logprobs"] = json!({"content": [token_entry(i)]});
    }
    let mut chunk = json!({"choices": [choice], "created": 1733300000, "id": "chatcmpl-bench",
        "model": "bench", "system_fingerprint": "b0000-bench", "object": "chat.completion.chunk"});
    if last {
        chunk["usage"] =
            json!({"completion_tokens": i, "prompt_tokens": 18, "total_tokens": i + 18});
        chunk["timings"] = timings();
    }
    let mut s = b"data: ".to_vec();
    serde_json::to_writer(&mut s, &chunk).unwrap();
    s.extend_from_slice(b"\n\n");
    Bytes::from(s)
}

struct Bodies {
    plain: Bytes,
    logprobs: Bytes,
}

fn query_param(q: Option<&str>, name: &str) -> Option<u64> {
    q?.split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse().ok())
}

async fn answer(
    req: Request<Incoming>,
    bodies: Arc<Bodies>,
) -> Result<Response<BoxBody>, Infallible> {
    let query = req.uri().query().map(str::to_owned);
    let path = req.uri().path().to_owned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    if !path.ends_with("/chat/completions") {
        let b = Full::new(Bytes::from_static(
            b"{\"status\":\"ok\",\"data\":[{\"id\":\"bench\",\"object\":\"model\"}]}",
        ));
        return Ok(Response::builder()
            .header("content-type", "application/json")
            .body(b.boxed())
            .unwrap());
    }
    let logprobs = memchr::memmem::find(&body, b"\"n_probs\"").is_some();
    let streamed = memchr::memmem::find(&body, b"\"stream\":true").is_some()
        || memchr::memmem::find(&body, b"\"stream\": true").is_some();
    if !streamed {
        let b = if logprobs {
            bodies.logprobs.clone()
        } else {
            bodies.plain.clone()
        };
        return Ok(Response::builder()
            .header("content-type", "application/json; charset=utf-8")
            .body(Full::new(b).boxed())
            .unwrap());
    }
    let chunks = query_param(query.as_deref(), "chunks")
        .unwrap_or(64)
        .min(100_000) as usize;
    let gap = Duration::from_millis(
        query_param(query.as_deref(), "gap_ms")
            .unwrap_or(20)
            .min(10_000),
    );
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        for i in 0..chunks {
            if i > 0 {
                tokio::time::sleep_until(start + gap * i as u32).await;
            }
            if tx
                .send(sse_chunk(i, i + 1 == chunks, logprobs))
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    let stream = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|o| o.map(|b| Ok::<_, Infallible>(Frame::data(b))))
    });
    Ok(Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap())
}

async fn upstream(port: u16) -> anyhow::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening {}", listener.local_addr()?);
    let bodies = Arc::new(Bodies {
        plain: json_body(false),
        logprobs: json_body(true),
    });
    eprintln!(
        "upstream: json body {} bytes plain, {} bytes with logprobs",
        bodies.plain.len(),
        bodies.logprobs.len()
    );
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let bodies = bodies.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| answer(req, bodies.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

// ------------------------------------------------------------------------------------------
// Streaming clients
// ------------------------------------------------------------------------------------------

struct Target {
    addr: SocketAddr,
    path_and_query: String,
}

fn parse_url(url: &str) -> anyhow::Result<Target> {
    let uri: http::Uri = url.parse()?;
    let host = uri.host().unwrap_or("127.0.0.1");
    anyhow::ensure!(
        host == "127.0.0.1" || host == "localhost",
        "the bench only talks to 127.0.0.1"
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], uri.port_u16().unwrap_or(80)));
    let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    Ok(Target {
        addr,
        path_and_query,
    })
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr)).await??;
    tcp.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

fn stream_request(t: &Target) -> Request<Full<Bytes>> {
    let body = json!({"model": "bench", "stream": true, "max_tokens": 64,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]});
    Request::post(t.path_and_query.as_str())
        .header("host", t.addr.to_string())
        .header("content-type", "application/json")
        .header(
            "authorization",
            "Bearer sk-bench-7f3a9c2e51d84b6f0a1e9d3c7b5f2a48",
        )
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// One SSE request: (ttfb, arrival time of every frame that carried data, events seen).
async fn one_stream(
    sender: &mut Sender,
    t: &Target,
) -> anyhow::Result<(Duration, Vec<Duration>, usize)> {
    sender.ready().await?;
    let start = Instant::now();
    let resp = sender.send_request(stream_request(t)).await?;
    anyhow::ensure!(resp.status().is_success(), "status {}", resp.status());
    let mut body = resp.into_body();
    let mut arrivals = Vec::with_capacity(80);
    let mut events = 0;
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(30), body.frame()).await? {
        let frame = frame?;
        if let Some(d) = frame.data_ref() {
            if !d.is_empty() {
                arrivals.push(start.elapsed());
                events += memchr::memmem::find_iter(d, b"data:").count();
            }
        }
    }
    let ttfb = *arrivals
        .first()
        .ok_or_else(|| anyhow::anyhow!("empty stream"))?;
    Ok((ttfb, arrivals, events))
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn stream_client(args: &[String]) -> anyhow::Result<()> {
    let t = Arc::new(parse_url(&arg(args, "--url").unwrap_or_default())?);
    let n: usize = arg_or(args, "--n", 24);
    let conc: usize = arg_or(args, "--conc", 4).max(1);
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..conc {
        let t = t.clone();
        let count = n / conc + usize::from(w < n % conc);
        tasks.spawn(async move {
            let mut sender = connect(t.addr).await?;
            let mut out = Vec::new();
            for _ in 0..count {
                out.push(one_stream(&mut sender, &t).await?);
            }
            anyhow::Ok(out)
        });
    }
    let (mut ttfb, mut gaps, mut events, mut frames, mut streams, mut errors) =
        (Vec::new(), Vec::new(), 0usize, 0usize, 0usize, Vec::new());
    while let Some(r) = tasks.join_next().await {
        match r? {
            Ok(list) => {
                for (t0, arr, ev) in list {
                    streams += 1;
                    ttfb.push(t0.as_secs_f64() * 1e3);
                    frames += arr.len();
                    events += ev;
                    gaps.extend(arr.windows(2).map(|w| (w[1] - w[0]).as_secs_f64() * 1e3));
                }
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    ttfb.sort_by(f64::total_cmp);
    gaps.sort_by(f64::total_cmp);
    let out = json!({"streams": streams, "errors": errors, "frames": frames, "events": events,
        "ttfb_p50_ms": pct(&ttfb, 50.0), "ttfb_p99_ms": pct(&ttfb, 99.0),
        "gap_p50_ms": pct(&gaps, 50.0), "gap_p99_ms": pct(&gaps, 99.0),
        "gap_max_ms": gaps.last().copied().unwrap_or(f64::NAN), "gaps": gaps.len()});
    println!("{out}");
    Ok(())
}

fn rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

async fn hold(args: &[String]) -> anyhow::Result<()> {
    let t = Arc::new(parse_url(&arg(args, "--url").unwrap_or_default())?);
    let n: usize = arg_or(args, "--n", 1000).min(5000);
    let pid: u32 = arg_or(args, "--pid", 0);
    let idle = rss_kb(pid);
    let (opened_tx, mut opened_rx) = tokio::sync::mpsc::channel::<()>(n);
    let release = Arc::new(tokio::sync::Notify::new());
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (t, opened_tx) = (t.clone(), opened_tx.clone());
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tasks.spawn(async move {
            let mut sender = connect(t.addr).await?;
            sender.ready().await?;
            let resp = sender.send_request(stream_request(&t)).await?;
            anyhow::ensure!(resp.status().is_success(), "status {}", resp.status());
            let mut body = resp.into_body();
            let mut first = true;
            let deadline = Instant::now() + Duration::from_secs(60);
            while let Some(f) = tokio::time::timeout_at(deadline.into(), body.frame()).await? {
                f?;
                if first {
                    first = false;
                    let _ = opened_tx.send(()).await;
                }
            }
            anyhow::Ok(())
        });
    }
    drop(opened_tx);
    let start = Instant::now();
    let mut open = 0;
    while open < n {
        match tokio::time::timeout(Duration::from_secs(30), opened_rx.recv()).await {
            Ok(Some(())) => open += 1,
            _ => break,
        }
    }
    let all_open_after = start.elapsed();
    // Sample the RSS while the streams run (they last chunks * gap), keep the largest.
    let mut peak = 0;
    for _ in 0..10 {
        if let Some(r) = rss_kb(pid) {
            peak = peak.max(r);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    release.notify_waiters();
    let (mut ok, mut errors) = (0, Vec::<String>::new());
    let drain = tokio::time::timeout(Duration::from_secs(90), async {
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(Ok(())) => ok += 1,
                Ok(Err(e)) => errors.push(e.to_string()),
                Err(e) => errors.push(e.to_string()),
            }
        }
    })
    .await;
    if drain.is_err() {
        tasks.abort_all();
    }
    errors.sort();
    errors.dedup();
    errors.truncate(5);
    let after = rss_kb(pid);
    println!(
        "{}",
        json!({"streams": n, "open": open, "completed": ok, "errors": errors,
            "all_open_s": all_open_after.as_secs_f64(), "rss_idle_kb": idle,
            "rss_open_kb": peak, "rss_after_kb": after})
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Plugin path
// ------------------------------------------------------------------------------------------

use kl_proxy::record::{
    AlignedPosition, AlignedRecord, Endpoint, PositionStatus, Strategy, TokenText, TopLogprob,
};

/// Deterministic pseudo-random numbers (no dependency, same records every run).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A top-N list: N distinct ids, logprobs of a normalised-looking distribution, descending.
fn top_list(rng: &mut Lcg, base: i32, n: usize, shift: i32) -> Vec<TopLogprob> {
    let mut w: Vec<f64> = (0..n)
        .map(|k| (-(k as f64) * 0.8 - rng.next()).exp())
        .collect();
    let total: f64 = w.iter().sum::<f64>() / 0.9;
    w.iter_mut().for_each(|x| *x /= total);
    (0..n)
        .map(|k| TopLogprob {
            // `shift` moves some ids out so the two lists only partly overlap.
            id: base
                + if k >= n - shift as usize {
                    100 + k as i32
                } else {
                    k as i32
                },
            logprob: w[k].ln() as f32,
        })
        .collect()
}

fn make_record(rng: &mut Lcg, positions: usize, n: usize) -> AlignedRecord {
    let ps = (0..positions)
        .map(|i| {
            let base = (i as i32 % 500) * 37;
            let main_top = top_list(rng, base, n, 0);
            let cand_top = top_list(rng, base, n, 3);
            let pick = if rng.next() < 0.2 { 1 } else { 0 };
            let main = main_top[pick].clone();
            let candidate = cand_top.iter().find(|t| t.id == main.id).map(|t| t.logprob);
            AlignedPosition {
                index: i as u32,
                candidate_pick: Some(cand_top[0].id),
                main,
                main_top,
                candidate,
                candidate_top: cand_top,
                request: 1,
                status: if i % 97 == 96 {
                    PositionStatus::Speculative
                } else {
                    PositionStatus::Aligned
                },
            }
        })
        .collect();
    AlignedRecord {
        id: "bench".into(),
        time_ms: 0,
        endpoint: Endpoint::ChatCompletions,
        main_model: "main".into(),
        candidate_model: "cand".into(),
        prompt_tokens: 18,
        strategy: Strategy::Forced,
        candidate_requests: 1,
        candidate_tokens_decoded: positions as u32,
        finish_reason: Some("stop".into()),
        positions: ps,
        texts: (0..positions.min(64))
            .map(|i| TokenText {
                id: i as i32,
                text: format!("t{i}"),
            })
            .collect(),
    }
}

/// The plugin's own arithmetic (plugins/kl-divergence/src/math.rs, included as is), run
/// natively on the host's record type.
#[path = "../../plugins/kl-divergence/src/math.rs"]
mod kl_math;

/// The native side of the plugin comparison: the same arithmetic, no Wasm boundary.
mod native {
    use super::kl_math::{summarise, Entry, PositionView};
    use kl_proxy::record::{AlignedPosition, AlignedRecord, PositionStatus, TopLogprob};

    impl Entry for TopLogprob {
        fn id(&self) -> i32 {
            self.id
        }
        fn logprob(&self) -> f32 {
            self.logprob
        }
    }

    fn view(p: &AlignedPosition) -> PositionView<'_, TopLogprob> {
        PositionView {
            main_id: p.main.id,
            main_logprob: p.main.logprob,
            main_top: &p.main_top,
            candidate: p.candidate,
            candidate_top: &p.candidate_top,
        }
    }

    pub enum Value {
        PerPosition(Vec<f64>),
        Scalar(f64),
    }
    #[allow(dead_code)] // built for the same cost as the plugin's metrics, never read
    pub struct Metric {
        pub name: String,
        pub help: String,
        pub value: Value,
    }

    const NAMES: [&str; 9] = [
        "kld",
        "kld_estimate",
        "same_top",
        "delta_p",
        "nll_main",
        "nll_candidate",
        "kld_mean",
        "same_top_rate",
        "positions_compared",
    ];

    pub fn compare(c: &AlignedRecord) -> Vec<Metric> {
        let (series, scalars) = summarise(
            c.positions
                .iter()
                .map(|p| (p.status == PositionStatus::Aligned).then(|| view(p))),
        );
        let mut out = Vec::new();
        let mut series = series.into_iter();
        for (i, name) in NAMES.iter().enumerate() {
            let value = match series.next() {
                Some(s) => Value::PerPosition(s),
                None => Value::Scalar(scalars[i - 6]),
            };
            out.push(Metric {
                name: (*name).into(),
                help: String::from("help"),
                value,
            });
        }
        out
    }
}

fn plugin_bench(args: &[String]) -> anyhow::Result<()> {
    use kl_proxy::plugins::{MetricValue, PluginHost, PluginLimits, PluginSet};
    let wasm = std::path::PathBuf::from(arg(args, "--wasm").unwrap_or_default());
    let positions: usize = arg_or(args, "--positions", 256);
    let records: usize = arg_or(args, "--records", 64);
    let seconds: f64 = arg_or(args, "--seconds", 2.0);
    let host = PluginHost::new(PluginLimits {
        timeout: Duration::from_secs(10),
        memory_limit: 64 << 20,
        cache_dir: None,
    })?;
    let spec = kl_proxy::config::PluginSpec {
        name: "kl".into(),
        path: wasm.clone(),
        options: Value::Null,
    };
    let t_load = Instant::now();
    let set = PluginSet::load(&host, &[spec])?;
    let load_ms = t_load.elapsed().as_secs_f64() * 1e3;
    let mut rng = Lcg(42);
    let recs: Vec<AlignedRecord> = (0..records)
        .map(|_| make_record(&mut rng, positions, 10))
        .collect();
    let tiny: Vec<AlignedRecord> = (0..records).map(|_| make_record(&mut rng, 1, 10)).collect();

    // The two must agree before their speeds are compared.
    let wasm_out = set.compare(&recs[0]);
    let wasm_metrics = wasm_out[0]
        .result
        .as_ref()
        .map_err(|e| anyhow::anyhow!("plugin failed: {e}"))?;
    let native_out = native::compare(&recs[0]);
    let mut max_diff: f64 = 0.0;
    for (w, n) in wasm_metrics.iter().zip(&native_out) {
        anyhow::ensure!(
            w.name == n.name,
            "metric order differs: {} vs {}",
            w.name,
            n.name
        );
        match (&w.value, &n.value) {
            (MetricValue::PerPosition(a), native::Value::PerPosition(b)) => {
                for (x, y) in a.iter().zip(b) {
                    if x.is_finite() || y.is_finite() {
                        max_diff = max_diff.max((x - y).abs());
                    }
                }
            }
            (MetricValue::Scalar(a), native::Value::Scalar(b)) => {
                if a.is_finite() || b.is_finite() {
                    max_diff = max_diff.max((a - b).abs());
                }
            }
            _ => anyhow::bail!("metric {} has another shape", w.name),
        }
    }
    anyhow::ensure!(
        max_diff < 1e-9,
        "native and Wasm results differ by {max_diff}"
    );

    // Time-bounded loops over the same records, alternating so both see the same machine.
    let run = |f: &dyn Fn(&AlignedRecord), recs: &[AlignedRecord]| -> (f64, usize) {
        let start = Instant::now();
        let mut calls = 0;
        while start.elapsed().as_secs_f64() < seconds / 2.0 && calls < 1_000_000 {
            f(&recs[calls % recs.len()]);
            calls += 1;
        }
        (start.elapsed().as_secs_f64(), calls)
    };
    let wasm_call = |r: &AlignedRecord| {
        let o = set.compare(r);
        assert!(o[0].result.is_ok());
        std::hint::black_box(o);
    };
    let native_call = |r: &AlignedRecord| {
        std::hint::black_box(native::compare(std::hint::black_box(r)));
    };
    let (mut wt, mut wc, mut nt, mut nc) = (0.0, 0, 0.0, 0);
    let (mut wt1, mut wc1, mut nt1, mut nc1) = (0.0, 0, 0.0, 0);
    for _ in 0..2 {
        let (t, c) = run(&wasm_call, &recs);
        wt += t;
        wc += c;
        let (t, c) = run(&native_call, &recs);
        nt += t;
        nc += c;
        let (t, c) = run(&wasm_call, &tiny);
        wt1 += t;
        wc1 += c;
        let (t, c) = run(&native_call, &tiny);
        nt1 += t;
        nc1 += c;
    }
    // The same records through a plugin that returns only one scalar: what is left of the
    // Wasm time is the record's way in (conversion, copying into the guest) and the arithmetic.
    let scalar_set = PluginSet::load(
        &host,
        &[kl_proxy::config::PluginSpec {
            name: "kl-scalar".into(),
            path: wasm.clone(),
            options: json!({"emit": ["kld_mean"]}),
        }],
    )?;
    let scalar_call = |r: &AlignedRecord| {
        std::hint::black_box(scalar_set.compare(r));
    };
    let (st, sc) = run(&scalar_call, &recs);
    let wasm_pps = (wc * positions) as f64 / wt;
    let native_pps = (nc * positions) as f64 / nt;
    let out = json!({
        "positions_per_record": positions, "n_probs": 10, "load_ms": load_ms,
        "max_abs_diff": max_diff,
        "wasm_positions_per_s": wasm_pps, "native_positions_per_s": native_pps,
        "ratio": wasm_pps / native_pps,
        "wasm_us_per_record": wt / wc as f64 * 1e6, "native_us_per_record": nt / nc as f64 * 1e6,
        "wasm_us_per_1pos_call": wt1 / wc1 as f64 * 1e6, "native_us_per_1pos_call": nt1 / nc1 as f64 * 1e6,
        "call_overhead_us": (wt1 / wc1 as f64 - nt1 / nc1 as f64) * 1e6,
        "wasm_scalar_only_us_per_record": st / sc as f64 * 1e6,
    });
    println!("{out}");
    Ok(())
}
