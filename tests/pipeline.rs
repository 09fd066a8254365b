//! The background pipeline as a whole: a full queue drops and counts without slowing the
//! client, and editing the config file swaps the plugins without a restart.

mod common;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{model, LlamaServer};
use kl_proxy::config::Config;
use kl_proxy::Service;
use serde_json::{json, Value};
use tokio::net::TcpListener;

fn dist(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../plugins/dist/{name}.wasm"));
    assert!(p.exists(), "{} missing: run `make plugins`", p.display());
    p
}

async fn chat(http: &reqwest::Client, addr: std::net::SocketAddr, text: &str) -> Value {
    let r = http
        .post(format!("http://{addr}/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": text}], "max_tokens": 6, "temperature": 0.0}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    r.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_drops_and_counts_and_the_client_never_waits() {
    let main = LlamaServer::start(model("q4_1"));
    // A candidate that accepts connections and never answers: the one worker is stuck on
    // its first job, so the queue (capacity 1) fills.
    let hanging = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let yaml = format!(
        "target_host: {}\ncandidate_host: http://{}\ncandidate_timeout: 30s\nqueue_capacity: 1\n\
         shutdown_timeout: 1s\nadmin: {{listen: \"\"}}\nstore: {{path: \"\"}}\n",
        main.url(),
        hanging.local_addr().unwrap()
    );
    let service = Service::start(
        Config::from_yaml(&yaml, None).unwrap(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await
    .unwrap();
    let http = reqwest::Client::new();
    // Direct latency for reference, then through the proxy with the queue full.
    let direct_start = Instant::now();
    for i in 0..3 {
        chat(&http, main.addr, &format!("Say {i}.")).await;
    }
    let direct = direct_start.elapsed();
    let via_start = Instant::now();
    for i in 0..6 {
        chat(&http, service.addr, &format!("Say {i}.")).await;
    }
    let via = via_start.elapsed() / 2;
    let stats = service.stats().unwrap();
    assert_eq!(stats.offered.load(Ordering::Acquire), 6);
    // One in flight (stuck), one queued, the rest dropped.
    assert!(
        stats.dropped.load(Ordering::Acquire) >= 4,
        "dropped {:?}",
        stats.dropped
    );
    eprintln!("3 requests direct {direct:?}, through the proxy with a full queue {via:?} (per 3)");
    assert!(
        via < direct * 3 + Duration::from_secs(1),
        "the client waited for the queue"
    );
    // Shutdown gives up on the stuck job after shutdown_timeout and counts it.
    let t = Instant::now();
    let stats = service.stats().unwrap();
    service.shutdown().await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(stats.pending(), 0, "every job accounted for");
    assert_eq!(
        stats.ok.load(Ordering::Acquire)
            + stats.failed.load(Ordering::Acquire)
            + stats.dropped.load(Ordering::Acquire),
        6
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_the_config_swaps_plugins_without_a_restart() {
    let main = LlamaServer::start(model("q4_1"));
    let cand = LlamaServer::start(model("q8_0"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    let write = |plugin: &str, wasm: &str| {
        std::fs::write(
            &file,
            format!(
                "target_host: {}\ncandidate_host: {}\nadmin: {{listen: \"\"}}\nstore: {{path: \"\"}}\n\
                 plugins:\n  - name: {plugin}\n    path: {}\n",
                main.url(),
                cand.url(),
                dist(wasm).display()
            ),
        )
        .unwrap()
    };
    write("kl", "kl-divergence");
    let service = Arc::new(
        Service::start(
            Config::load(&file).unwrap(),
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
        )
        .await
        .unwrap(),
    );
    let watcher = tokio::spawn(kl_proxy::service::watch_config(
        service.clone(),
        file.clone(),
    ));
    let mut outcomes = service.subscribe().unwrap();
    let http = reqwest::Client::new();
    let mut plugins_of_next = async |text: &str| -> Vec<String> {
        chat(&http, service.addr, text).await;
        let o = tokio::time::timeout(Duration::from_secs(60), outcomes.recv())
            .await
            .unwrap()
            .unwrap();
        o.plugins.iter().map(|p| p.plugin.clone()).collect()
    };
    assert_eq!(plugins_of_next("One.").await, ["kl"]);

    write("overlap", "top-overlap");
    tokio::time::sleep(Duration::from_secs(4)).await; // polled every second; Python compiles slowly
    let mut seen = plugins_of_next("Two.").await;
    for _ in 0..10 {
        if seen == ["overlap"] {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        seen = plugins_of_next("Again.").await;
    }
    assert_eq!(seen, ["overlap"], "the new plugin list is in use");

    // A broken edit leaves the running set in place.
    std::fs::write(&file, "target_host: http://127.0.0.1:1\nplugins:\n  - name: broken\n    path: /nonexistent.wasm\n").unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(plugins_of_next("Three.").await, ["overlap"]);
    watcher.abort();
    let _ = watcher.await;
    Arc::try_unwrap(service)
        .ok()
        .expect("sole owner")
        .shutdown()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_merged_inside_a_utf8_character_end_the_compared_span() {
    // llama-server lists tokens that end inside a UTF-8 character merged into the next entry
    // (ids missing). This request makes SmolLM2 Q4_1 generate an emoji as three tokens.
    let main = LlamaServer::start(model("q4_1"));
    let cand = LlamaServer::start(model("q8_0"));
    let yaml = format!(
        "target_host: {}\ncandidate_host: {}\nadmin: {{listen: \"\"}}\nstore: {{path: \"\"}}\n",
        main.url(),
        cand.url()
    );
    let service = Service::start(
        Config::from_yaml(&yaml, None).unwrap(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await
    .unwrap();
    let mut outcomes = service.subscribe().unwrap();
    let answer: Value = reqwest::Client::new()
        .post(format!("http://{}/v1/chat/completions", service.addr))
        .json(
            &json!({"messages": [{"role": "user", "content": "Say hello in French."}],
            "max_tokens": 24, "temperature": 0.8, "seed": 5}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let o = tokio::time::timeout(Duration::from_secs(60), outcomes.recv())
        .await
        .unwrap()
        .unwrap();
    let listed = o.main.tokens.len();
    let generated = o.main.generated_tokens.unwrap() as usize;
    assert_eq!(
        generated,
        answer["usage"]["completion_tokens"].as_u64().unwrap() as usize
    );
    assert!(
        generated > listed,
        "premise: this answer has merged entries ({generated} generated, {listed} listed)"
    );
    let record = o.record.as_ref().expect("scored");
    let first_bad = record
        .positions
        .iter()
        .position(|p| p.status != kl_proxy::record::PositionStatus::Aligned)
        .expect("the merged entry and what follows are not compared");
    assert!(first_bad > 0, "what precedes it is compared");
    let merged = &o.main.tokens[first_bad];
    assert!(
        !merged.bytes.as_ref().unwrap().is_ascii(),
        "the cut is at a multi-byte entry"
    );
    assert!(record.positions[first_bad..]
        .iter()
        .all(|p| p.status == kl_proxy::record::PositionStatus::Unaligned));
    assert_eq!(
        record.candidate_requests, 1,
        "forcing the exact prefix works in one request"
    );
    service.shutdown().await.unwrap();
}
