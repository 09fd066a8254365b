//! The forwarding proxy against a real llama-server: plain forwarding, `n_probs` injection,
//! logprob stripping, streaming, the capture of the main response, and its errors.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_port, model, LlamaServer};
use kl_proxy::config::Config;
use kl_proxy::queue::ComparisonOutcome;
use kl_proxy::Service;
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// A proxy in front of `target`, comparing against a candidate that is down (so every
/// outcome carries the capture and a `candidate_down` failure), unless `extra` says otherwise.
async fn start_proxy(target: &str, extra: &str) -> Service {
    let yaml = format!(
        "target_host: {target}\ncandidate_host: http://127.0.0.1:{}\ncandidate_timeout: 2s\n\
         admin: {{listen: \"127.0.0.1:0\"}}\nstore: {{path: \"\"}}\n{extra}",
        free_port()
    );
    let config = Config::from_yaml(&yaml, None).expect("config");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    Service::start(config, listener)
        .await
        .expect("service starts")
}

async fn next_outcome(
    rx: &mut tokio::sync::broadcast::Receiver<Arc<ComparisonOutcome>>,
) -> Arc<ComparisonOutcome> {
    tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("an outcome within 30 s")
        .expect("outcome channel open")
}

fn chat(extra: Value) -> Value {
    let mut body = json!({
        "messages": [{"role": "user", "content": "Name three colours, briefly."}],
        "max_tokens": 24,
        "temperature": 0.0,
        "seed": 7,
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_endpoints_are_forwarded_unchanged() {
    let main = LlamaServer::start(model("q4_1"));
    let proxy = start_proxy(&main.url(), "").await;
    let http = reqwest::Client::new();
    for path in ["/health", "/props", "/v1/models"] {
        let direct = http
            .get(format!("{}{path}", main.url()))
            .send()
            .await
            .unwrap();
        let via = http
            .get(format!("http://{}{path}", proxy.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(direct.status(), via.status(), "{path}");
        assert_eq!(
            direct.headers().get("content-type"),
            via.headers().get("content-type"),
            "{path}"
        );
        let (d, v) = (direct.bytes().await.unwrap(), via.bytes().await.unwrap());
        if path == "/v1/models" {
            // The only field that may differ between two calls is the creation time.
            let strip = |b: &[u8]| {
                let mut v: Value = serde_json::from_slice(b).unwrap();
                for m in v["data"].as_array_mut().into_iter().flatten() {
                    m.as_object_mut().unwrap().remove("created");
                }
                v
            };
            assert_eq!(strip(&d), strip(&v), "{path}");
        } else {
            assert_eq!(d, v, "{path} must be byte-equal");
        }
    }
    // A query string and a 404 come back as the target sends them.
    let via = http
        .get(format!("http://{}/no-such-path?x=1", proxy.addr))
        .send()
        .await
        .unwrap();
    let direct = http
        .get(format!("{}/no-such-path?x=1", main.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(via.status(), direct.status());
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_json_is_captured_and_stripped_for_a_client_that_did_not_ask() {
    let main = LlamaServer::start(model("q4_1"));
    let proxy = start_proxy(&main.url(), "").await;
    let mut outcomes = proxy.subscribe().expect("comparisons on");
    let url = format!("http://{}/v1/chat/completions", proxy.addr);

    // 1. The client does not ask for logprobs: it gets none, the capture has them all.
    let answer: Value = common::post_json(&url, &chat(json!({}))).await;
    assert!(answer["choices"][0]["logprobs"].is_null(), "{answer}");
    let content = answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    let outcome = next_outcome(&mut outcomes).await;
    let captured = &outcome.main;
    assert_eq!(
        captured.tokens.len() as u64,
        answer["usage"]["completion_tokens"].as_u64().unwrap()
            + u64::from(captured.finish_reason.as_deref() == Some("stop")),
        "one entry per generated token (and the EOS entry when the answer stopped)"
    );
    assert_eq!(
        captured.prompt_tokens,
        answer["usage"]["prompt_tokens"].as_u64().map(|n| n as u32)
    );
    assert!(
        captured.tokens.iter().all(|t| t.top.len() == 10),
        "n_probs 10 injected"
    );
    let text: String = captured.tokens.iter().map(|t| t.text.as_str()).collect();
    assert_eq!(text, content);
    assert_eq!(
        outcome.record.as_ref().unwrap_err().reason,
        "candidate_down"
    );

    // 2. The client asks for 3: it gets 3 per token (the same greedy answer), with the ids
    //    the capture holds; the capture still has 10.
    let asked: Value =
        common::post_json(&url, &chat(json!({"logprobs": true, "top_logprobs": 3}))).await;
    let entries = asked["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert!(entries
        .iter()
        .all(|e| e["top_logprobs"].as_array().unwrap().len() == 3));
    let outcome = next_outcome(&mut outcomes).await;
    let ids: Vec<i64> = entries.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    let captured: Vec<i64> = outcome.main.tokens.iter().map(|t| t.id as i64).collect();
    assert_eq!(ids, captured);
    assert!(outcome.main.tokens.iter().all(|t| t.top.len() == 10));
    if outcome.main.finish_reason.as_deref() == Some("stop") {
        let last = outcome.main.tokens.last().unwrap();
        assert_eq!(last.text, "", "the EOS entry ends a stopped answer");
    }
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eos_is_the_last_captured_token_of_a_stopped_answer() {
    let main = LlamaServer::start(model("q4_1"));
    let proxy = start_proxy(&main.url(), "").await;
    let mut outcomes = proxy.subscribe().unwrap();
    let body = json!({"messages": [{"role": "user", "content": "Reply with the single word: yes"}],
        "max_tokens": 64, "temperature": 0.0});
    let answer: Value =
        common::post_json(&format!("http://{}/v1/chat/completions", proxy.addr), &body).await;
    assert_eq!(answer["choices"][0]["finish_reason"], "stop", "{answer}");
    let outcome = next_outcome(&mut outcomes).await;
    let last = outcome.main.tokens.last().unwrap();
    assert_eq!(last.text, "");
    assert_eq!(last.id, 2, "SmolLM2's <|im_end|>");
    assert_eq!(outcome.main.finish_reason.as_deref(), Some("stop"));
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_arrive_chunk_by_chunk_and_are_captured_like_json() {
    let main = LlamaServer::start(model("q4_1"));
    let proxy = start_proxy(&main.url(), "").await;
    let mut outcomes = proxy.subscribe().unwrap();
    let http = reqwest::Client::new();
    let body = chat(json!({"stream": true, "max_tokens": 48}));
    let start = Instant::now();
    let mut resp = http
        .post(format!("http://{}/v1/chat/completions", proxy.addr))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut first = None;
    let mut chunks = 0;
    let mut text = String::new();
    while let Some(c) = resp.chunk().await.unwrap() {
        first.get_or_insert(start.elapsed());
        chunks += 1;
        text.push_str(std::str::from_utf8(&c).unwrap());
    }
    let total = start.elapsed();
    let first = first.unwrap();
    assert!(chunks > 5, "{chunks} chunks: the stream was buffered");
    assert!(
        first < total / 2,
        "first chunk at {first:?} of {total:?}: not streamed as it came"
    );
    assert!(
        !text.contains("top_logprobs"),
        "logprobs stripped from the stream"
    );
    assert!(text.trim_end().ends_with("data: [DONE]"));
    let outcome = next_outcome(&mut outcomes).await;
    assert!(outcome.main.streamed);
    let streamed_text: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    let captured: String = outcome
        .main
        .tokens
        .iter()
        .map(|t| t.text.as_str())
        .collect();
    assert_eq!(captured, streamed_text);
    assert!(outcome.main.tokens.iter().all(|t| t.top.len() == 10));
    assert!(
        outcome.main.prompt_tokens.is_some(),
        "prompt length known from the stream"
    );

    // The same request not streamed gives the same capture.
    let _: Value = common::post_json(
        &format!("http://{}/v1/chat/completions", proxy.addr),
        &chat(json!({"max_tokens": 48})),
    )
    .await;
    let json_outcome = next_outcome(&mut outcomes).await;
    let ids = |o: &ComparisonOutcome| o.main.tokens.iter().map(|t| t.id).collect::<Vec<_>>();
    assert_eq!(ids(&outcome), ids(&json_outcome));
    assert_eq!(outcome.main.prompt_tokens, json_outcome.main.prompt_tokens);
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_completion_endpoint_is_captured() {
    let main = LlamaServer::start(model("q4_1"));
    let proxy = start_proxy(&main.url(), "").await;
    let mut outcomes = proxy.subscribe().unwrap();
    let answer: Value = common::post_json(
        &format!("http://{}/completion", proxy.addr),
        &json!({"prompt": "The capital of France is", "n_predict": 12, "temperature": 0.0}),
    )
    .await;
    assert!(answer.get("completion_probabilities").is_none(), "stripped");
    let outcome = next_outcome(&mut outcomes).await;
    assert_eq!(outcome.main.tokens.len(), 12);
    let text: String = outcome
        .main
        .tokens
        .iter()
        .map(|t| t.text.as_str())
        .collect();
    assert_eq!(text, answer["content"].as_str().unwrap());
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_not_json_is_forwarded_and_not_captured() {
    let main = LlamaServer::start(model("q4_1"));
    let proxy = start_proxy(&main.url(), "max_body_bytes: 1KiB\n").await;
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/chat/completions", proxy.addr);
    let direct = http
        .post(format!("{}/v1/chat/completions", main.url()))
        .body("not json {")
        .send()
        .await
        .unwrap();
    let via = http.post(&url).body("not json {").send().await.unwrap();
    assert_eq!(via.status(), direct.status());
    assert!(via.status().is_client_error());

    let huge = "x".repeat(4096);
    let resp = http
        .post(&url)
        .json(&json!({"messages": [{"role": "user", "content": huge}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "body_too_large");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stats = proxy.stats().unwrap();
    assert_eq!(stats.offered.load(std::sync::atomic::Ordering::Acquire), 0);
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_down_gives_an_openai_shaped_502() {
    let proxy = start_proxy(&format!("http://127.0.0.1:{}", free_port()), "").await;
    let resp = reqwest::Client::new()
        .post(format!("http://{}/v1/chat/completions", proxy.addr))
        .json(&chat(json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "target_unreachable");
    assert_eq!(err["error"]["type"], "proxy_error");
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("could not be reached"));
    proxy.shutdown().await.unwrap();
}

#[test]
fn a_broken_config_is_refused_naming_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("target_host: http://127.0.0.1:1\nn_probz: 5\n", "n_probz"),
        ("target_host: http://127.0.0.1:1\nport: eighty\n", "port"),
        ("target_host: localhost:8080\n", "target_host"),
        ("candidate_host: http://127.0.0.1:1\n", "target_host"),
        (
            "target_host: http://127.0.0.1:1\nqueue_capacity: -1\n",
            "queue_capacity",
        ),
    ];
    for (i, (yaml, key)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("bad{i}.yaml"));
        std::fs::write(&file, yaml).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kl-proxy"))
            .arg("--config")
            .arg(&file)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{yaml} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("bad{i}.yaml")) && err.contains(key),
            "message for {yaml:?} should name the file and `{key}`: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_frees_the_target_and_is_not_compared() {
    let main = LlamaServer::start(model("q4_1"));
    let proxy = start_proxy(&main.url(), "").await;
    let http = reqwest::Client::new();
    let body = json!({"messages": [{"role": "user", "content": "Count from 1 to 1000, one number per line."}],
        "max_tokens": 1500, "stream": true, "temperature": 0.0});
    let mut resp = http
        .post(format!("http://{}/v1/chat/completions", proxy.addr))
        .json(&body)
        .send()
        .await
        .unwrap();
    for _ in 0..3 {
        resp.chunk().await.unwrap().expect("a first chunk");
    }
    let busy = |v: &Value| {
        v.as_array()
            .unwrap()
            .iter()
            .any(|s| s["is_processing"] == true)
    };
    let slots: Value = http
        .get(format!("{}/slots", main.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(busy(&slots), "the target is generating: {slots}");
    drop(resp);
    let hung_up = Instant::now();
    loop {
        let slots: Value = http
            .get(format!("{}/slots", main.url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if !busy(&slots) {
            break;
        }
        assert!(
            hung_up.elapsed() < Duration::from_secs(5),
            "the target kept generating after the client left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "target slot freed {:?} after the client hung up",
        hung_up.elapsed()
    );
    let stats = proxy.stats().unwrap();
    assert_eq!(
        stats.offered.load(std::sync::atomic::Ordering::Acquire),
        0,
        "no comparison of a partial answer"
    );
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_completions_are_captured_and_unsampled_requests_untouched() {
    let main = LlamaServer::start(model("q4_1"));
    let proxy = start_proxy(&main.url(), "").await;
    let mut outcomes = proxy.subscribe().unwrap();
    let answer: Value = common::post_json(
        &format!("http://{}/v1/completions", proxy.addr),
        &json!({"prompt": "Once upon a time", "max_tokens": 10, "temperature": 0.0}),
    )
    .await;
    assert!(
        answer["choices"][0]["logprobs"].is_null(),
        "stripped: {answer}"
    );
    let outcome = next_outcome(&mut outcomes).await;
    assert_eq!(outcome.main.tokens.len(), 10);
    let text: String = outcome
        .main
        .tokens
        .iter()
        .map(|t| t.text.as_str())
        .collect();
    assert_eq!(text, answer["choices"][0]["text"].as_str().unwrap());
    proxy.shutdown().await.unwrap();

    // sample_rate 0: forwarded exactly as sent, no n_probs, nothing captured.
    let proxy = start_proxy(&main.url(), "sample_rate: 0\n").await;
    assert!(proxy.subscribe().is_none());
    let answer: Value = common::post_json(
        &format!("http://{}/v1/completions", proxy.addr),
        &json!({"prompt": "Once upon a time", "max_tokens": 4, "n_probs": 2}),
    )
    .await;
    let entries = answer["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(
        entries[0]["top_logprobs"].as_array().unwrap().len(),
        2,
        "the client's own n_probs kept"
    );
    proxy.shutdown().await.unwrap();
}

/// A fake candidate that records the head of every request it gets and answers 503.
fn recording_candidate() -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(200) {
            let Ok(mut s) = stream else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = vec![0u8; 65536];
            let n = s.read(&mut buf).unwrap_or(0);
            log.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            let body = r#"{"error":{"message":"busy"}}"#;
            let _ = write!(
                s,
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (addr, seen)
}

#[test]
fn client_credentials_reach_the_target_only_and_never_a_log_or_the_store() {
    const TOKEN: &str = "sk-planted-7f3a9c";
    let main = LlamaServer::start_with(model("q4_1"), &["--api-key", TOKEN]);
    let (cand, seen) = recording_candidate();
    let dir = tempfile::tempdir().unwrap();
    let (port, admin_port) = (free_port(), free_port());
    let cfg = dir.path().join("config.yaml");
    std::fs::write(
        &cfg,
        format!(
            "target_host: {}\ncandidate_host: http://{cand}\nport: {port}\ncandidate_api_key: cand-key-1\n\
             store: {{path: {}}}\nadmin: {{listen: \"127.0.0.1:{admin_port}\"}}\n",
            main.url(),
            dir.path().join("kl.db").display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kl-proxy"))
        .arg("--config")
        .arg(&cfg)
        .env("KLPROXY_LOG", "debug")
        .stderr(log)
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let metrics = rt.block_on(async {
        let http = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
        for _ in 0..100 {
            if http
                .get(format!("http://127.0.0.1:{admin_port}/metrics"))
                .send()
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Without the key the target refuses: what the proxy forwards is the client's own.
        let refused = http.post(&url).json(&chat(json!({}))).send().await.unwrap();
        assert_eq!(refused.status(), 401);
        for _ in 0..2 {
            let ok = http
                .post(&url)
                .bearer_auth(TOKEN)
                .json(&chat(json!({})))
                .send()
                .await
                .unwrap();
            assert_eq!(
                ok.status(),
                200,
                "the client's Authorization reached the target"
            );
            ok.bytes().await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        http.get(format!("http://127.0.0.1:{admin_port}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "clean exit on SIGTERM");
    let seen = seen.lock().unwrap().join("\n");
    assert!(!seen.is_empty(), "the candidate was asked");
    assert!(
        !seen.contains(TOKEN),
        "the client's token went to the candidate"
    );
    assert!(
        seen.contains("Bearer cand-key-1"),
        "the candidate gets its own key"
    );
    let logs = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap();
    assert!(
        logs.contains("captured main response"),
        "debug logs were on"
    );
    assert!(!logs.contains(TOKEN), "token in the logs");
    assert!(!logs.contains("cand-key-1"), "candidate key in the logs");
    assert!(!metrics.contains(TOKEN));
    for f in std::fs::read_dir(dir.path()).unwrap() {
        let f = f.unwrap().path();
        if f.to_string_lossy().contains("kl.db") {
            let bytes = std::fs::read(&f).unwrap();
            assert!(
                !String::from_utf8_lossy(&bytes).contains(TOKEN),
                "token in {}",
                f.display()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_a_connection_gets_a_clean_503() {
    let proxy = start_proxy(
        &format!("http://127.0.0.1:{}", free_port()),
        "max_connections: 1\n",
    )
    .await;
    // The first connection holds the only slot while it stays open.
    let held = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let resp = reqwest::Client::new()
        .get(format!("http://{}/health", proxy.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "too_many_connections");
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The slot is free again: the request is forwarded (to a target that is down: 502).
    let resp = reqwest::Client::new()
        .get(format!("http://{}/health", proxy.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_asked_for_logprobs_gets_what_it_asked_for() {
    let main = LlamaServer::start(model("q4_1"));
    let proxy = start_proxy(&main.url(), "").await;
    let mut outcomes = proxy.subscribe().unwrap();
    let http = reqwest::Client::new();
    for (asked, expect) in [(3u64, 3usize), (15, 15)] {
        let body = chat(
            json!({"stream": true, "max_tokens": 12, "logprobs": true, "top_logprobs": asked}),
        );
        let text = http
            .post(format!("http://{}/v1/chat/completions", proxy.addr))
            .json(&body)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let tops: Vec<usize> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v["choices"][0]["logprobs"]["content"].as_array().cloned())
            .flatten()
            .map(|e| e["top_logprobs"].as_array().unwrap().len())
            .collect();
        assert!(!tops.is_empty(), "asked {asked}: {text}");
        assert!(tops.iter().all(|&n| n == expect), "asked {asked}: {tops:?}");
        let outcome = next_outcome(&mut outcomes).await;
        assert!(outcome
            .main
            .tokens
            .iter()
            .all(|t| t.top.len() == expect.max(10)));
    }
    proxy.shutdown().await.unwrap();
}

#[test]
fn plugin_check_names_the_world_or_the_reason() {
    let dist = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugins/dist");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kl-proxy"))
        .args(["plugin", "check"])
        .arg(dist.join("kl-divergence.wasm"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("kl-proxy:comparator/comparator@0.1.0"),
        "{text}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kl-proxy"))
        .args(["plugin", "check"])
        .arg(dist.join("../../config.yaml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("config.yaml"), "{err}");
}
