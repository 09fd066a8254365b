//! Results that last, against real llama-servers: the store, the admin endpoints, the
//! Prometheus scrape (parsed with a real exposition-format parser), `report` and `export`.

mod common;

use std::path::PathBuf;
use std::time::Duration;

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

async fn run_some(
    main: &LlamaServer,
    cand: &LlamaServer,
    db: &std::path::Path,
    extra: &str,
    n: usize,
) -> Service {
    let yaml = format!(
        "target_host: {}\ncandidate_host: {}\nadmin: {{listen: \"127.0.0.1:0\"}}\n\
         store: {{path: \"{}\"{extra}}}\nplugins:\n  - name: kl\n    path: {}\n",
        main.url(),
        cand.url(),
        db.display(),
        dist("kl-divergence").display()
    );
    let config = Config::from_yaml(&yaml, None).unwrap();
    let service = Service::start(config, TcpListener::bind("127.0.0.1:0").await.unwrap())
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let prompts = [
        "Name a fruit.",
        "What is two plus two?",
        "Say hello in French.",
        "Name a colour.",
    ];
    for p in prompts.iter().cycle().take(n) {
        let r = http
            .post(format!("http://{}/v1/chat/completions", service.addr))
            .json(&json!({"messages": [{"role": "user", "content": p}], "max_tokens": 16, "temperature": 0.8, "seed": 3}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        // Read it all: a client that hangs up is not compared.
        r.bytes().await.unwrap();
    }
    let stats = service.stats().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while stats.pending() > 0 || stats.ok.load(std::sync::atomic::Ordering::Acquire) < n as u64 {
        assert!(
            std::time::Instant::now() < deadline,
            "comparisons did not settle: ok {:?} failed {:?} dropped {:?} pending {}",
            stats.ok,
            stats.failures,
            stats.dropped,
            stats.pending()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    service
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_metrics_and_store_after_a_real_run() {
    let main = LlamaServer::start(model("q4_1"));
    let cand = LlamaServer::start(model("q8_0"));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kl.db");
    let service = run_some(&main, &cand, &db, "", 3).await;
    let admin = format!("http://{}", service.admin_addr.unwrap());
    let http = reqwest::Client::new();

    // Prometheus: parsed by a real exposition-format parser.
    let text = http
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid exposition format");
    let value = |name: &str, label: Option<(&str, &str)>| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    assert_eq!(
        value(
            "klproxy_requests_total",
            Some(("endpoint", "/v1/chat/completions"))
        ),
        3.0
    );
    assert_eq!(
        value("klproxy_comparisons_total", Some(("status", "ok"))),
        3.0
    );
    assert!(value("klproxy_positions_scored_total", None) >= 3.0);
    assert_eq!(
        value("klproxy_plugin_calls_total", Some(("plugin", "kl"))),
        3.0
    );
    let kld = scrape
        .samples
        .iter()
        .find(|s| s.metric == "klproxy_plugin_kl_kld")
        .expect("the kld series as a histogram");
    assert!(matches!(kld.value, prometheus_parse::Value::Histogram(_)));

    // Shut down: the store holds every comparison.
    service.shutdown().await.unwrap();
    let store = kl_proxy::store::Store::open(
        &db,
        Config::from_yaml("target_host: http://x:1", None)
            .unwrap()
            .store,
    )
    .unwrap();
    let list = store.list(10, 0).unwrap();
    assert_eq!(list.len(), 3);
    let id = list[0]["id"].as_str().unwrap();
    let one = store.get(id).unwrap().unwrap();
    let positions = one["record"]["positions"].as_array().unwrap();
    assert_eq!(
        positions.len() as i64,
        list[0]["positions"].as_i64().unwrap()
    );
    assert_eq!(
        one["position_values"].as_array().unwrap().len(),
        positions.len()
    );
    assert!(one["position_values"][0]["kl.kld"].is_number());
    assert!(
        !one["record"]["texts"].as_array().unwrap().is_empty(),
        "keep_text is on by default"
    );
    let input = store.report_input(0).unwrap();
    assert_eq!(input.comparisons_ok, 3);
    assert_eq!(input.series["kl.kld"].len() as u64, input.aligned_positions);
    let rows = store.position_rows(0).unwrap();
    assert_eq!(rows.len() as u64, input.positions);
    assert!(rows.iter().all(|r| r.context_len >= r.position));

    // `report` and `export` read the same store from the command line.
    let bin = env!("CARGO_BIN_EXE_kl-proxy");
    let out = std::process::Command::new(bin)
        .args(["report", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("KL divergence statistics") && text.contains("Mean    KLD:"),
        "{text}"
    );
    assert!(text.contains("Same top p:"), "{text}");
    let out = std::process::Command::new(bin)
        .args(["report", "--json", "--since", "1h", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).expect("report --json is JSON");
    assert_eq!(report["comparisons_ok"], 3);
    assert!(report["kld"]["mean"].as_f64().unwrap() >= 0.0);
    for format in ["jsonl", "csv", "parquet"] {
        let file = dir.path().join(format!("out.{format}"));
        let out = std::process::Command::new(bin)
            .args(["export", "--format", format, "--out"])
            .arg(&file)
            .arg("--db")
            .arg(&db)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{format}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let read_back = match format {
            "jsonl" => std::fs::read_to_string(&file).unwrap().lines().count(),
            "csv" => csv::Reader::from_path(&file).unwrap().records().count(),
            _ => {
                use parquet::file::reader::FileReader;
                let r = parquet::file::serialized_reader::SerializedFileReader::new(
                    std::fs::File::open(&file).unwrap(),
                )
                .unwrap();
                r.metadata().file_metadata().num_rows() as usize
            }
        };
        assert_eq!(read_back, rows.len(), "{format} rows");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_while_serving_and_keep_text_off_keeps_no_text() {
    let main = LlamaServer::start(model("q4_1"));
    let cand = LlamaServer::start(model("q8_0"));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kl.db");
    let service = run_some(&main, &cand, &db, ", keep_text: false, max_rows: 2", 3).await;
    let admin = format!("http://{}", service.admin_addr.unwrap());
    let http = reqwest::Client::new();
    // The writer batches: give it a moment to write the last one.
    let mut list = Value::Null;
    for _ in 0..50 {
        list = http
            .get(format!("{admin}/api/comparisons?limit=10"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if list["comparisons"].as_array().unwrap().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let items = list["comparisons"].as_array().unwrap();
    assert_eq!(items.len(), 2, "max_rows 2 keeps the newest two: {list}");
    let id = items[0]["id"].as_str().unwrap();
    let one: Value = http
        .get(format!("{admin}/api/comparisons/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(one["request"].is_null(), "no prompt text kept");
    assert!(
        one["record"]["texts"].as_array().unwrap().is_empty(),
        "no token text kept"
    );
    assert!(!one["record"]["positions"].as_array().unwrap().is_empty());
    let missing = http
        .get(format!("{admin}/api/comparisons/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let summary: Value = http
        .get(format!("{admin}/api/summary"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(summary["plugins"], json!(["kl"]));
    service.shutdown().await.unwrap();
    let text = std::fs::read(&db).unwrap_or_default();
    assert!(
        !String::from_utf8_lossy(&text).contains("two plus two"),
        "the prompt is not in the file"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_is_required_when_set() {
    let main = LlamaServer::start(model("q4_1"));
    let yaml = format!(
        "target_host: {}\nadmin: {{listen: \"127.0.0.1:0\", token: s3cret-admin}}\nstore: {{path: \"\"}}\n",
        main.url()
    );
    let service = Service::start(
        Config::from_yaml(&yaml, None).unwrap(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await
    .unwrap();
    let admin = format!("http://{}", service.admin_addr.unwrap());
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(format!("{admin}/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let wrong = http
        .get(format!("{admin}/metrics"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let ok = http
        .get(format!("{admin}/metrics"))
        .bearer_auth("s3cret-admin")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    service.shutdown().await.unwrap();
}
