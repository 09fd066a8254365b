//! The KL numbers against the exact value. llama-server answers `n_probs` up to the vocabulary
//! size (49152 for SmolLM2), so at sampled positions of a real main response the test gets
//! both full distributions, computes KL(P‖Q) exactly, and checks what the `kl-divergence`
//! plugin reports from top-10 lists of the same distributions: the lower bound never exceeds
//! the exact value. It also checks, through the whole proxy, that the close candidate (Q8_0)
//! is far closer than the far one (Q2_K).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{model, LlamaServer};
use kl_proxy::config::{Config, PluginSpec};
use kl_proxy::plugins::{MetricValue, PluginHost, PluginLimits, PluginSet};
use kl_proxy::record::{
    AlignedPosition, AlignedRecord, Endpoint, PositionStatus, Strategy, TopLogprob,
};
use kl_proxy::Service;
use serde_json::{json, Value};
use tokio::net::TcpListener;

const VOCAB: usize = 49152;

fn kl_plugin() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugins/dist/kl-divergence.wasm");
    assert!(p.exists(), "{} missing: run `make plugins`", p.display());
    p
}

async fn post(http: &reqwest::Client, url: String, body: Value) -> Value {
    let r = http.post(&url).json(&body).send().await.unwrap();
    assert!(r.status().is_success(), "{url}: {}", r.status());
    r.json().await.unwrap()
}

/// The full next-token distribution at `context` (token ids), as (id, logprob) by id.
async fn full_distribution(
    http: &reqwest::Client,
    server: &LlamaServer,
    context: &[i64],
) -> Vec<f64> {
    let answer = post(
        http,
        format!("{}/completion", server.url()),
        json!({"prompt": context, "n_predict": 1, "n_probs": VOCAB, "temperature": 0.0, "cache_prompt": true}),
    )
    .await;
    let top = answer["completion_probabilities"][0]["top_logprobs"]
        .as_array()
        .unwrap();
    assert_eq!(top.len(), VOCAB, "the whole vocabulary");
    let mut lp = vec![f64::NEG_INFINITY; VOCAB];
    for t in top {
        lp[t["id"].as_u64().unwrap() as usize] = t["logprob"].as_f64().unwrap();
    }
    lp
}

fn top_n(lp: &[f64], n: usize) -> Vec<TopLogprob> {
    let mut idx: Vec<usize> = (0..lp.len()).collect();
    idx.sort_by(|a, b| lp[*b].total_cmp(&lp[*a]));
    idx.into_iter()
        .take(n)
        .map(|i| TopLogprob {
            id: i as i32,
            logprob: lp[i] as f32,
        })
        .collect()
}

fn exact_kl(p: &[f64], q: &[f64]) -> f64 {
    p.iter()
        .zip(q)
        .filter(|(lp, _)| lp.is_finite() && **lp > -80.0)
        .map(|(lp, lq)| lp.exp() * (lp - lq.max(-1e30)))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lower_bound_never_exceeds_the_exact_kl() {
    let main = LlamaServer::start(model("q4_1"));
    let http = reqwest::Client::new();
    let messages = json!([{"role": "user", "content": "Write one sentence about the sea."}]);
    let prompt = post(
        &http,
        format!("{}/apply-template", main.url()),
        json!({"messages": messages}),
    )
    .await;
    let tokens = post(
        &http,
        format!("{}/tokenize", main.url()),
        json!({"content": prompt["prompt"], "add_special": true, "parse_special": true}),
    )
    .await;
    let prompt_ids: Vec<i64> = tokens["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_i64().unwrap())
        .collect();
    let answer = post(
        &http,
        format!("{}/completion", main.url()),
        json!({"prompt": prompt_ids, "n_predict": 24, "temperature": 0.8, "seed": 11, "n_probs": 1, "return_tokens": true}),
    )
    .await;
    let generated: Vec<i64> = answer["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_i64().unwrap())
        .collect();
    assert!(generated.len() >= 8);

    let host = PluginHost::new(PluginLimits {
        timeout: Duration::from_secs(2),
        memory_limit: 64 << 20,
        cache_dir: None,
    })
    .unwrap();
    let set = PluginSet::load(
        &host,
        &[PluginSpec {
            name: "kl".into(),
            path: kl_plugin(),
            options: json!({}),
        }],
    )
    .unwrap();

    for quant in ["q8_0", "q2_k"] {
        let cand = LlamaServer::start(model(quant));
        let mut positions = Vec::new();
        let mut exact = Vec::new();
        for i in (0..generated.len()).step_by(3).take(6) {
            let mut context = prompt_ids.clone();
            context.extend_from_slice(&generated[..i]);
            let p = full_distribution(&http, &main, &context).await;
            let q = full_distribution(&http, &cand, &context).await;
            let tok = generated[i] as usize;
            exact.push(exact_kl(&p, &q));
            let cand_top = top_n(&q, 10);
            positions.push(AlignedPosition {
                index: positions.len() as u32,
                main: TopLogprob {
                    id: tok as i32,
                    logprob: p[tok] as f32,
                },
                main_top: top_n(&p, 10),
                candidate: Some(q[tok] as f32),
                candidate_pick: Some(cand_top[0].id),
                candidate_top: cand_top,
                request: 1,
                status: PositionStatus::Aligned,
            });
        }
        let record = AlignedRecord {
            id: format!("exact-{quant}"),
            time_ms: 0,
            endpoint: Endpoint::Completion,
            main_model: "q4_1".into(),
            candidate_model: quant.into(),
            prompt_tokens: prompt_ids.len() as u32,
            strategy: Strategy::Forced,
            candidate_requests: 1,
            candidate_tokens_decoded: positions.len() as u32,
            finish_reason: None,
            positions,
            texts: Vec::new(),
        };
        let outcome = set.compare(&record).remove(0);
        let metrics = outcome.result.expect("kl plugin answers");
        let series = |name: &str| match &metrics.iter().find(|m| m.name == name).unwrap().value {
            MetricValue::PerPosition(v) => v.clone(),
            MetricValue::Scalar(_) => panic!("{name} is a series"),
        };
        let (lb, est) = (series("kld"), series("kld_estimate"));
        for (i, e) in exact.iter().enumerate() {
            eprintln!(
                "{quant} position {i}: exact KL {e:.6}  lower bound {:.6} ({:.0}% of it)  estimate {:.6}",
                lb[i],
                100.0 * lb[i] / e.max(1e-12),
                est[i]
            );
            assert!(lb[i] >= -1e-6, "never negative");
            assert!(
                lb[i] <= e + 1e-4,
                "{quant} position {i}: lower bound {} above exact {e}",
                lb[i]
            );
        }
        let (m_lb, m_ex) = (
            lb.iter().sum::<f64>() / lb.len() as f64,
            exact.iter().sum::<f64>() / exact.len() as f64,
        );
        eprintln!(
            "{quant}: mean exact KL {m_ex:.6}, mean lower bound {m_lb:.6} ({:.0}%)",
            100.0 * m_lb / m_ex
        );
        assert!(
            m_lb > 0.3 * m_ex,
            "{quant}: top-10 captures most of the divergence"
        );
    }
}

async fn mean_kld_through_the_proxy(main: &LlamaServer, quant: &str) -> (f64, f64) {
    let cand = LlamaServer::start(model(quant));
    let yaml = format!(
        "target_host: {}\ncandidate_host: {}\nadmin: {{listen: \"\"}}\nstore: {{path: \"\"}}\n\
         plugins:\n  - name: kl\n    path: {}\n",
        main.url(),
        cand.url(),
        kl_plugin().display()
    );
    let service = Service::start(
        Config::from_yaml(&yaml, None).unwrap(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await
    .unwrap();
    let mut outcomes = service.subscribe().unwrap();
    let http = reqwest::Client::new();
    let prompts = [
        "Describe a sunset.",
        "Give two tips for sleeping well.",
        "What is a verb?",
        "Name three planets.",
    ];
    for p in prompts {
        post(
            &http,
            format!("http://{}/v1/chat/completions", service.addr),
            json!({"messages": [{"role": "user", "content": p}], "max_tokens": 40, "temperature": 0.8, "seed": 5}),
        )
        .await;
    }
    let (mut kld, mut same, mut n) = (0.0, 0.0, 0usize);
    for _ in prompts {
        let o = tokio::time::timeout(Duration::from_secs(60), outcomes.recv())
            .await
            .unwrap()
            .unwrap();
        let record = o.record.as_ref().expect("comparison ok");
        let metrics = o.plugins[0].result.as_ref().expect("plugin ok");
        let get = |name: &str| match &metrics.iter().find(|m| m.name == name).unwrap().value {
            MetricValue::PerPosition(v) => v.clone(),
            MetricValue::Scalar(_) => unreachable!(),
        };
        for ((k, s), p) in get("kld")
            .iter()
            .zip(get("same_top"))
            .zip(&record.positions)
        {
            if p.status == PositionStatus::Aligned {
                kld += k;
                same += s;
                n += 1;
            }
        }
    }
    service.shutdown().await.unwrap();
    (kld / n as f64, same / n as f64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_close_candidate_is_far_closer_than_the_far_one() {
    let main = LlamaServer::start(model("q4_1"));
    let (kld_q8, same_q8) = mean_kld_through_the_proxy(&main, "q8_0").await;
    let (kld_q2, same_q2) = mean_kld_through_the_proxy(&main, "q2_k").await;
    eprintln!("Q8_0: mean KLD {kld_q8:.5}, same top {same_q8:.3}; Q2_K: mean KLD {kld_q2:.5}, same top {same_q2:.3}");
    assert!(
        kld_q8 * 5.0 < kld_q2,
        "Q8_0 {kld_q8} should be far below Q2_K {kld_q2}"
    );
    assert!(same_q8 > same_q2);
}
