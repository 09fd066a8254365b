//! Bad input: request bodies the proxy cannot read or should not compare, answers of odd
//! shapes, token texts that are partial UTF-8, and a config with every key wrong in turn.
//! Every client request gets the target's answer or a clean OpenAI-shaped error; nothing
//! unusable is offered for comparison.

mod common;
mod fault_kit;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{free_port, model, LlamaServer};
use fault_kit::{corpus, Reply};
use kl_proxy::capture::{parse_json_response, parse_token_entry, Capture};
use kl_proxy::config::Config;
use kl_proxy::record::Endpoint;
use kl_proxy::Service;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;

async fn start_proxy(target: &str, candidate: Option<&str>, extra: &str) -> Service {
    let candidate = candidate
        .map(str::to_owned)
        .unwrap_or_else(|| format!("http://127.0.0.1:{}", free_port()));
    let yaml = format!(
        "target_host: {target}\ncandidate_host: {candidate}\ncandidate_timeout: 10s\n\
         admin: {{listen: \"\"}}\nstore: {{path: \"\"}}\n{extra}"
    );
    Service::start(
        Config::from_yaml(&yaml, None).expect("config"),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await
    .expect("service starts")
}

fn offered(s: &Service) -> u64 {
    s.stats().unwrap().offered.load(Ordering::Acquire)
}

/// Bodies the proxy cannot use (not JSON, invalid UTF-8, wrong shapes, `n` > 1, a huge body
/// with and without a declared length) each get the target's own answer or a clean error,
/// quickly; none is offered for comparison. A valid request after them still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_request_bodies_are_answered_and_not_compared() {
    let main = LlamaServer::start(model("q4_1"));
    let proxy = start_proxy(&main.url(), None, "max_body_bytes: 64KiB\n").await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let via = format!("http://{}/v1/chat/completions", proxy.addr);
    let direct = format!("{}/v1/chat/completions", main.url());
    let msg = |content: &str| json!([{"role": "user", "content": content}]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not JSON", b"not json {".to_vec()),
        ("empty body", Vec::new()),
        ("a JSON array", b"[1, 2, 3]".to_vec()),
        (
            "invalid UTF-8 in a string",
            b"{\"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\xc3\"}], \"max_tokens\": 4}"
                .to_vec(),
        ),
        ("messages not a list", serde_json::to_vec(&json!({"messages": "hello", "max_tokens": 4})).unwrap()),
        ("messages missing", serde_json::to_vec(&json!({"max_tokens": 4})).unwrap()),
        ("a message without content", serde_json::to_vec(&json!({"messages": [{"role": "user"}], "max_tokens": 4})).unwrap()),
        ("max_tokens a string", serde_json::to_vec(&json!({"messages": msg("Hi."), "max_tokens": "four"})).unwrap()),
        ("n = 2", serde_json::to_vec(&json!({"messages": msg("Hi."), "max_tokens": 4, "n": 2})).unwrap()),
    ];
    for (what, body) in &cases {
        let d = http
            .post(&direct)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let d_status = d.status();
        let v = http
            .post(&via)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let v_status = v.status();
        let v_body = v.bytes().await.unwrap();
        eprintln!(
            "{what}: direct {d_status}, via the proxy {v_status}: {}",
            String::from_utf8_lossy(&v_body[..v_body.len().min(160)])
        );
        assert_eq!(
            v_status, d_status,
            "{what}: the client gets the target's status"
        );
        if v_status.is_success() {
            // Answered (llama-server accepts some of these): the answer is a chat answer.
            let _: Value = serde_json::from_slice(&v_body).expect("a JSON answer");
        }
    }
    assert_eq!(
        offered(&proxy),
        0,
        "nothing unusable offered for comparison"
    );

    // `n_probs` of the wrong type: the proxy's own value replaces it, the answer is compared.
    let r = http
        .post(&via)
        .json(&json!({"messages": msg("Say hi."), "max_tokens": 4, "n_probs": "five"}))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let answer: Value = r.json().await.unwrap();
    eprintln!("n_probs a string: via the proxy {status}");
    assert!(status.is_success(), "{answer}");
    assert!(
        answer["choices"][0]["logprobs"].is_null(),
        "stripped: {answer}"
    );

    // Too large: 413 with a declared length, and without one (chunked upload).
    let huge = vec![b'x'; 200 << 10];
    let r = http.post(&via).body(huge.clone()).send().await.unwrap();
    assert_eq!(r.status(), 413);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "body_too_large");
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        huge.chunks(8192).map(|c| Ok(c.to_vec())).collect();
    let r = http
        .post(&via)
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413, "a chunked body past the limit");
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["type"],
        "invalid_request_error"
    );

    // The proxy still serves, and compares, a valid request.
    let r = http
        .post(&via)
        .json(&json!({"messages": msg("Say hi."), "max_tokens": 4, "temperature": 0.0}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let _ = r.bytes().await.unwrap();
    assert_eq!(
        offered(&proxy),
        2,
        "the n_probs-string request and the valid one"
    );
    proxy.shutdown().await.unwrap();
}

/// A request with tools is forwarded as it is; its comparison (against a real candidate)
/// ends in a record or a clean failure reason, never silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_tools_is_forwarded_and_compared_or_cleanly_failed() {
    let main = LlamaServer::start_with(model("q4_1"), &["--jinja"]);
    let cand = LlamaServer::start_with(model("q8_0"), &["--jinja"]);
    let proxy = start_proxy(&main.url(), Some(&cand.url()), "").await;
    let mut outcomes = proxy.subscribe().unwrap();
    let body = json!({
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                "required": ["city"]}}}],
        "tool_choice": "auto",
        "max_tokens": 24,
        "temperature": 0.0
    });
    let http = reqwest::Client::new();
    let direct: Value = http
        .post(format!("{}/v1/chat/completions", main.url()))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r = http
        .post(format!("http://{}/v1/chat/completions", proxy.addr))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let via: Value = r.json().await.unwrap();
    assert_eq!(
        via["choices"][0]["message"], direct["choices"][0]["message"],
        "the same (greedy) answer as direct"
    );
    let o = tokio::time::timeout(Duration::from_secs(60), outcomes.recv())
        .await
        .expect("an outcome")
        .unwrap();
    match &o.record {
        Ok(r) => eprintln!(
            "tools: compared, {} positions, {} aligned",
            r.positions.len(),
            r.aligned().count()
        ),
        Err(f) => {
            eprintln!(
                "tools: comparison failed cleanly: {} ({})",
                f.reason, f.message
            );
            assert!(["prompt_mismatch", "unsupported", "bad_answer"].contains(&f.reason));
        }
    }
    proxy.shutdown().await.unwrap();
}

/// Answers of odd shapes from the target: missing logprobs, extra fields, a missing
/// finish_reason, several choices, an error status with JSON. The client gets exactly what
/// the target sent (less logprobs it did not ask for); only a complete single-choice answer
/// with logprobs is offered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_with_missing_or_extra_fields() {
    let entry = json!({"id": 5, "token": "a", "bytes": [97], "logprob": -0.1,
        "top_logprobs": [{"id": 5, "token": "a", "bytes": [97], "logprob": -0.1}]});
    let answers: Vec<(&str, u16, Value, bool)> = vec![
        (
            "no logprobs",
            200,
            json!({"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "a"}}]}),
            false,
        ),
        (
            "logprobs null",
            200,
            json!({"choices": [{"index": 0, "finish_reason": "stop", "logprobs": null, "message": {"content": "a"}}]}),
            false,
        ),
        (
            "no finish_reason",
            200,
            json!({"choices": [{"index": 0, "logprobs": {"content": [entry]}, "message": {"content": "a"}}]}),
            false,
        ),
        (
            "two choices",
            200,
            json!({"choices": [
            {"index": 0, "finish_reason": "stop", "logprobs": {"content": [entry]}},
            {"index": 1, "finish_reason": "stop", "logprobs": {"content": [entry]}}]}),
            false,
        ),
        (
            "entry without id",
            200,
            json!({"choices": [{"index": 0, "finish_reason": "stop", "logprobs": {"content": [{"token": "a", "logprob": -0.1}]}}]}),
            false,
        ),
        (
            "choices not a list",
            200,
            json!({"choices": {"index": 0}}),
            false,
        ),
        (
            "an error status",
            500,
            json!({"error": {"message": "boom"}}),
            false,
        ),
        (
            "extra fields everywhere",
            200,
            json!({"x_vendor": {"a": [1, 2]}, "choices": [{"index": 0, "finish_reason": "stop", "extra": true,
            "logprobs": {"content": [entry], "refusal": null}, "message": {"content": "a", "reasoning_content": "hmm"}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "weird": "yes"}}),
            true,
        ),
    ];
    let answers = std::sync::Arc::new(answers);
    let served = answers.clone();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n = next.clone();
    let target = fault_kit::scripted(move |_m, _p, _b| {
        let (_, status, v, _) = &served[n.load(Ordering::Acquire)];
        Reply::json(*status, v.clone())
    })
    .await;
    let proxy = start_proxy(&target.url(), None, "").await;
    let http = reqwest::Client::new();
    let mut expected_offers = 0;
    for (i, (what, status, sent, captured)) in answers.iter().enumerate() {
        next.store(i, Ordering::Release);
        let r = http
            .post(format!("http://{}/v1/chat/completions", proxy.addr))
            .json(&json!({"messages": [{"role": "user", "content": "x"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), *status, "{what}");
        let got: Value = r.json().await.unwrap();
        let mut want = sent.clone();
        kl_proxy::inject::edit_response(
            Endpoint::ChatCompletions,
            kl_proxy::inject::ResponseEdit::Strip,
            want.as_object_mut().unwrap(),
        );
        if *status == 200 {
            assert_eq!(got, want, "{what}: the target's answer, logprobs stripped");
        } else {
            assert_eq!(&got, sent, "{what}: an error passes through untouched");
        }
        expected_offers += u64::from(*captured);
        assert_eq!(offered(&proxy), expected_offers, "{what}");
    }
    proxy.shutdown().await.unwrap();
}

/// llama-server reports each token's raw bytes; a token that is part of a multi-byte UTF-8
/// character has a lossy text but exact bytes, and the capture keeps them exact.
#[test]
fn partial_utf8_token_bytes_are_kept_exact() {
    let t = parse_token_entry(&json!({"id": 227, "token": "\u{fffd}", "bytes": [240, 159],
        "logprob": -0.5, "top_logprobs": [{"id": 227, "token": "\u{fffd}", "bytes": [240, 159], "logprob": -0.5}]}))
    .unwrap();
    assert_eq!(t.bytes.as_deref(), Some(&[240u8, 159][..]));
    assert_eq!(t.text, "\u{fffd}");
    // The recorded native stream: every captured token's bytes are the bytes the server sent.
    let body = corpus("completion-stream.sse");
    let mut c = Capture::new(Endpoint::Completion, json!({}), true, 8192);
    let mut sent: Vec<Vec<u8>> = Vec::new();
    for line in body.split(|b| *b == b'\n') {
        let Some(p) = line.strip_prefix(b"data: ") else {
            continue;
        };
        let o: Map<String, Value> = serde_json::from_slice(p).unwrap();
        for e in o
            .get("completion_probabilities")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            sent.push(
                e["bytes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b.as_u64().unwrap() as u8)
                    .collect(),
            );
        }
        c.observe(&o);
    }
    let main = c.finish().expect("captured");
    let got: Vec<Vec<u8>> = main
        .tokens
        .iter()
        .map(|t| t.bytes.clone().unwrap())
        .collect();
    assert_eq!(got, sent);
    assert!(got
        .iter()
        .any(|b| std::str::from_utf8(b).is_err() || b.len() > 1 && b[0] >= 0xf0));
}

/// llama-server reports one logprobs entry per complete UTF-8 character, not per token: ten
/// generated tokens that spell three emoji come back as three entries, each with the id of the
/// character's last token. The capture keeps the target's own count beside the entries, so
/// that scoring can tell (and compare only the exact prefix) instead of forcing wrong ids.
#[test]
fn an_answer_with_merged_multi_token_characters_carries_the_generated_count() {
    let body = corpus("chat.json");
    let v: Value = serde_json::from_slice(&body).unwrap();
    let generated = v["usage"]["completion_tokens"].as_u64().unwrap();
    let entries = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .len() as u64;
    assert_eq!((generated, entries), (10, 3), "the recorded evidence");
    let main = parse_json_response(Endpoint::ChatCompletions, json!({}), &body).unwrap();
    assert_eq!(main.tokens.len(), 3);
    assert_eq!(main.generated_tokens, Some(10), "the merge is detectable");
}

/// Every key of config.yaml (and the `store`, `admin` and plugin keys), in turn given a value
/// of the wrong type: refused, and the message names the key.
#[test]
fn a_config_with_each_key_wrong_names_the_key() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../config.yaml")).unwrap();
    let mut keys: Vec<String> = text
        .lines()
        .filter_map(|l| {
            let l = l.strip_prefix("# ").unwrap_or(l);
            let (k, _) = l.split_once(':')?;
            (!k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
                .then(|| k.to_owned())
        })
        .collect();
    keys.dedup();
    assert!(keys.len() >= 20, "{keys:?}");
    for k in [
        "store.path",
        "store.keep_text",
        "store.max_age",
        "store.max_rows",
        "admin.listen",
        "admin.token",
        "histogram_buckets",
        "plugins.name",
        "plugins.path",
    ] {
        keys.push(k.to_owned());
    }
    let wrong_values = ["[[1]]", "{bad: {nested: [1]}}"];
    let mut checked = 0;
    for key in &keys {
        for wrong in wrong_values {
            let base = if key == "target_host" {
                ""
            } else {
                "target_host: http://127.0.0.1:1\n"
            };
            let yaml = match key.split_once('.') {
                Some(("plugins", leaf)) => {
                    let (name, path) = if leaf == "name" {
                        (wrong, "x.wasm")
                    } else {
                        ("p", wrong)
                    };
                    format!("{base}plugins:\n  - name: {name}\n    path: {path}\n")
                }
                Some((parent, leaf)) => format!("{base}{parent}:\n  {leaf}: {wrong}\n"),
                None => format!("{base}{key}: {wrong}\n"),
            };
            let err = match Config::from_yaml(&yaml, Some(std::path::Path::new("wrong.yaml"))) {
                Ok(_) => panic!("{key}: {wrong} was accepted:\n{yaml}"),
                Err(e) => e.to_string(),
            };
            let leaf = key.rsplit('.').next().unwrap();
            assert!(err.contains("wrong.yaml"), "{key}: {err}");
            assert!(
                err.contains(leaf),
                "the error for `{key}: {wrong}` names the key: {err}"
            );
            checked += 1;
        }
    }
    eprintln!(
        "{checked} wrong configs refused, each naming its key ({} keys)",
        keys.len()
    );
}
