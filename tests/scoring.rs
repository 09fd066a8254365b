//! Scoring main responses under a candidate, against real llama-servers: the main model is
//! SmolLM2-135M Q4_1 sampled at T=0.8 with fixed seeds; the candidates are its Q8_0 (close) and
//! Q2_K (far) requantisations. Checks that every position is covered, that the candidate's
//! logprob of each main token is what a separate one-token request at that context returns,
//! the cost of each strategy, and the errors a scorer reports.
//!
//! Servers are heavy on a 2-core machine: the tests take a lock so that at most two run at once.

mod common;

use std::time::{Duration, Instant};

use common::LlamaServer;
use kl_proxy::candidate::{CandidateScorer, ScoreError};
use kl_proxy::config::StrategyChoice;
use kl_proxy::record::{AlignedRecord, Endpoint, MainResponse, PositionStatus, Strategy};
use kl_proxy::upstream::Upstream;
use serde_json::{json, Value};

/// Serialises the tests that start servers (a tokio mutex: it is held across awaits, and
/// works across the tests' separate runtimes).
static SERVERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const N_PROBS: u32 = 10;

fn client(server: &LlamaServer) -> Upstream {
    Upstream::new(
        &server.url().parse().unwrap(),
        Duration::from_secs(120),
        &[],
    )
}

fn scorer(server: &LlamaServer, choice: StrategyChoice) -> CandidateScorer {
    CandidateScorer::with_upstream(client(server), N_PROBS, 8, choice)
}

/// The scored requests: chat prompts (one known to end on EOS within 48 tokens with this
/// seed) and one native `/completion`.
fn main_requests() -> Vec<(Endpoint, &'static str, Value)> {
    let chat = |content: &str, seed: u64| {
        json!({
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 48, "temperature": 0.8, "seed": seed, "n_probs": N_PROBS,
        })
    };
    vec![
        (
            Endpoint::ChatCompletions,
            "/v1/chat/completions",
            chat("Reply with the word yes.", 1),
        ),
        (
            Endpoint::ChatCompletions,
            "/v1/chat/completions",
            chat("Write a haiku about the sea.", 42),
        ),
        (
            Endpoint::ChatCompletions,
            "/v1/chat/completions",
            chat("What is the capital of France? One word.", 0),
        ),
        (
            Endpoint::Completion,
            "/completion",
            json!({
                "prompt": "The three primary colours are",
                "n_predict": 40, "temperature": 0.8, "seed": 7, "n_probs": N_PROBS,
            }),
        ),
    ]
}

/// Asks the main server each request and captures its answer as the proxy would.
async fn main_responses(main: &LlamaServer) -> Vec<MainResponse> {
    let up = client(main);
    let mut out = Vec::new();
    for (endpoint, path, request) in main_requests() {
        let answer = up.post_json(path, &request).await.unwrap();
        let body = serde_json::to_vec(&answer).unwrap();
        let resp = kl_proxy::capture::parse_json_response(endpoint, request, &body)
            .unwrap_or_else(|| panic!("cannot capture the {path} answer: {answer}"));
        assert!(!resp.tokens.is_empty());
        out.push(resp);
    }
    assert!(
        out.iter()
            .any(|r| r.finish_reason.as_deref() == Some("stop")),
        "no main response ended on EOS: the EOS case is not exercised"
    );
    out
}

/// The candidate's prompt ids for a main request, the way a test can compute them on its own.
async fn prompt_ids(cand: &Upstream, main: &MainResponse) -> Vec<i32> {
    let content = match main.endpoint {
        Endpoint::ChatCompletions => {
            let v = cand
                .post_json(
                    "/apply-template",
                    &json!({"messages": main.request["messages"]}),
                )
                .await
                .unwrap();
            v["prompt"].clone()
        }
        _ => main.request["prompt"].clone(),
    };
    let v = cand
        .post_json(
            "/tokenize",
            &json!({"content": content, "add_special": true, "parse_special": true}),
        )
        .await
        .unwrap();
    v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_i64().unwrap() as i32)
        .collect()
}

/// The candidate's logprob of `token` after `context`, from a plain one-token request
/// (no grammar), searching the whole vocabulary if it is not in the top 20.
async fn one_token_logprob(cand: &Upstream, context: &[i32], token: i32) -> f32 {
    for n_probs in [20, 49152] {
        let v = cand
            .post_json(
                "/completion",
                &json!({"prompt": context, "n_predict": 1, "n_probs": n_probs,
                        "temperature": 0.0, "cache_prompt": true}),
            )
            .await
            .unwrap();
        let entry = &v["completion_probabilities"][0];
        if entry["id"].as_i64() == Some(i64::from(token)) {
            return entry["logprob"].as_f64().unwrap() as f32;
        }
        if let Some(t) = entry["top_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"].as_i64() == Some(i64::from(token)))
        {
            return t["logprob"].as_f64().unwrap() as f32;
        }
    }
    panic!("token {token} not in the candidate's vocabulary");
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

/// What one strategy cost and found over the main responses.
#[derive(Debug, Default)]
struct Tally {
    positions: usize,
    requests: u32,
    decoded: u32,
    agreement: Vec<f64>,
    seconds: Vec<f64>,
}

impl Tally {
    fn add(&mut self, r: &AlignedRecord, seconds: f64) {
        self.positions += r.positions.len();
        self.requests += r.candidate_requests;
        self.decoded += r.candidate_tokens_decoded;
        self.agreement.extend(r.top1_agreement());
        self.seconds.push(seconds);
    }
    fn decoded_per_position(&self) -> f64 {
        f64::from(self.decoded) / self.positions as f64
    }
    fn report(&self, name: &str) {
        println!(
            "{name}: {} positions, {} requests, {:.2} tokens decoded per position, top-1 agreement {:.3}, {:.2} s per response",
            self.positions,
            self.requests,
            self.decoded_per_position(),
            mean(&self.agreement),
            mean(&self.seconds)
        );
    }
}

async fn score_all(
    scorer: &CandidateScorer,
    mains: &[MainResponse],
) -> (Vec<AlignedRecord>, Tally) {
    let mut records = Vec::new();
    let mut tally = Tally::default();
    for m in mains {
        let t = Instant::now();
        let r = scorer.score(m).await.unwrap();
        tally.add(&r, t.elapsed().as_secs_f64());
        records.push(r);
    }
    (records, tally)
}

/// Everything a record must satisfy whatever the strategy.
fn check_record(r: &AlignedRecord, m: &MainResponse, candidate_model: &str) {
    assert_eq!(r.positions.len(), m.tokens.len());
    assert_eq!(r.endpoint, m.endpoint);
    assert_eq!(r.main_model, m.model);
    assert_eq!(r.candidate_model, candidate_model);
    assert_eq!(Some(r.prompt_tokens), m.prompt_tokens);
    assert_eq!(r.finish_reason, m.finish_reason);
    assert_eq!(r.id.len(), 16);
    assert!(r.time_ms > 1_600_000_000_000);
    for (i, (p, t)) in r.positions.iter().zip(&m.tokens).enumerate() {
        assert_eq!(p.index as usize, i);
        assert_eq!(p.main.id, t.id);
        assert_eq!(p.status, PositionStatus::Aligned, "position {i}: {p:?}");
        assert!(p.request >= 1 && p.request <= r.candidate_requests);
        assert!(!p.candidate_top.is_empty() && p.candidate_top.len() <= N_PROBS as usize);
        assert!(p.candidate_pick.is_some());
        // Each token id of the record has its text, once.
        for id in std::iter::once(p.main.id).chain(p.candidate_top.iter().map(|t| t.id)) {
            assert!(r.texts.iter().any(|t| t.id == id), "no text for {id}");
        }
    }
    let mut ids: Vec<i32> = r.texts.iter().map(|t| t.id).collect();
    ids.dedup();
    assert_eq!(ids.len(), r.texts.len(), "texts repeat an id");
    if m.finish_reason.as_deref() == Some("stop") {
        let last = r.positions.last().unwrap();
        assert_eq!(
            m.tokens.last().unwrap().text,
            "",
            "the stopped response ends on EOS"
        );
        assert!(last.candidate.is_some(), "EOS position scored: {last:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_and_chunked_cover_every_position_and_match_one_token_requests() {
    let _guard = SERVERS.lock().await;
    let main = LlamaServer::start(common::model("q4_1"));
    let mains = main_responses(&main).await;
    drop(main);
    let cand = LlamaServer::start(common::model("q8_0"));
    let up = client(&cand);

    let forced = scorer(&cand, StrategyChoice::Forced);
    let report = forced.probe().await.unwrap();
    assert_eq!(report.strategy, Strategy::Forced, "{report:?}");
    assert!(report.token_ids && report.grammar_forcing);
    assert!(report.candidate_model.contains("q8_0"), "{report:?}");
    let (forced_records, forced_tally) = score_all(&forced, &mains).await;

    let chunked = scorer(&cand, StrategyChoice::Chunked);
    assert_eq!(chunked.probe().await.unwrap().strategy, Strategy::Chunked);
    let (chunked_records, chunked_tally) = score_all(&chunked, &mains).await;
    forced_tally.report("forced  Q8_0");
    chunked_tally.report("chunked Q8_0");

    let mut checked = 0;
    for ((f, c), m) in forced_records.iter().zip(&chunked_records).zip(&mains) {
        check_record(f, m, &report.candidate_model);
        check_record(c, m, &report.candidate_model);
        // Forced: one request, one decoded token per main token, the candidate's logprob of
        // every main token known.
        assert_eq!(f.strategy, Strategy::Forced);
        assert_eq!(
            f.candidate_requests, 1,
            "one request forces the whole response"
        );
        assert_eq!(f.candidate_tokens_decoded as usize, f.positions.len());
        assert!(f.positions.iter().all(|p| p.candidate.is_some()));
        assert_eq!(c.strategy, Strategy::Chunked);
        assert!(c.candidate_requests > 1);

        // Both strategies see the same distribution at each position: where both know the
        // candidate's logprob of the main token, they agree.
        for (pf, pc) in f.positions.iter().zip(&c.positions) {
            if let (Some(a), Some(b)) = (pf.candidate, pc.candidate) {
                assert!(
                    (a - b).abs() < 1e-3,
                    "position {}: forced {a} chunked {b}",
                    pf.index
                );
            }
            assert_eq!(
                pf.candidate_top.first().map(|t| t.id),
                pc.candidate_top.first().map(|t| t.id),
                "same argmax at {}",
                pf.index
            );
        }

        // Against separate one-token requests without grammar, on a sample of positions
        // (always the first and the last, EOS included).
        let prompt = prompt_ids(&up, m).await;
        let n = m.tokens.len();
        let mut sample: Vec<usize> = (0..n).step_by(7).collect();
        sample.push(n - 1);
        for i in sample {
            let mut context = prompt.clone();
            context.extend(m.tokens[..i].iter().map(|t| t.id));
            let want = one_token_logprob(&up, &context, m.tokens[i].id).await;
            let got = f.positions[i].candidate.unwrap();
            assert!(
                (got - want).abs() < 1e-3,
                "position {i} of {n}: forced {got}, one-token request {want}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 10);
    assert!((forced_tally.decoded_per_position() - 1.0).abs() < 1e-9);
    let ratio = chunked_tally.decoded_per_position();
    assert!(
        (1.5..=6.0).contains(&ratio),
        "chunked decodes about 3 tokens per main token, got {ratio:.2}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_close_candidate_agrees_more_than_the_far_one() {
    let _guard = SERVERS.lock().await;
    let main = LlamaServer::start(common::model("q4_1"));
    let mains = main_responses(&main).await;
    drop(main);

    let mut agreement = Vec::new();
    for quant in ["q8_0", "q2_k"] {
        let cand = LlamaServer::start(common::model(quant));
        let forced = scorer(&cand, StrategyChoice::Forced);
        let (records, tally) = score_all(&forced, &mains).await;
        tally.report(&format!("forced  {quant}"));
        for (r, m) in records.iter().zip(&mains) {
            // Even the far candidate is scored at every position, in one request each.
            assert_eq!(r.coverage(), 1.0);
            assert_eq!(r.candidate_requests, 1, "{quant}");
            assert!(r.positions.iter().all(|p| p.candidate.is_some()));
            assert_eq!(r.positions.len(), m.tokens.len());
        }
        let chunked = scorer(&cand, StrategyChoice::Chunked);
        let (records, tally) = score_all(&chunked, &mains).await;
        tally.report(&format!("chunked {quant}"));
        assert!(records.iter().all(|r| r.coverage() == 1.0));
        agreement.push(mean(&tally.agreement));
    }
    assert!(
        agreement[0] > agreement[1],
        "Q8_0 agrees with the main more often than Q2_K: {agreement:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_strategy_lines_up_by_text() {
    let _guard = SERVERS.lock().await;
    let main = LlamaServer::start(common::model("q4_1"));
    let mains: Vec<MainResponse> = main_responses(&main)
        .await
        .into_iter()
        .filter(|m| m.endpoint == Endpoint::ChatCompletions)
        .collect();
    drop(main);
    let cand = LlamaServer::start(common::model("q8_0"));
    let chat = scorer(&cand, StrategyChoice::Chat);
    assert_eq!(chat.probe().await.unwrap().strategy, Strategy::Chat);
    let (chat_records, tally) = score_all(&chat, &mains).await;
    tally.report("chat    Q8_0");
    let forced = scorer(&cand, StrategyChoice::Forced);
    let (forced_records, _) = score_all(&forced, &mains).await;

    let (mut aligned, mut both, mut close, mut total) = (0, 0, 0, 0);
    let mut far: Vec<(u32, f32, f32)> = Vec::new();
    for ((c, f), m) in chat_records.iter().zip(&forced_records).zip(&mains) {
        assert_eq!(c.strategy, Strategy::Chat);
        assert_eq!(c.positions.len(), m.tokens.len());
        assert_eq!(Some(c.prompt_tokens), m.prompt_tokens);
        for (pc, pf) in c.positions.iter().zip(&f.positions) {
            total += 1;
            assert_ne!(pc.status, PositionStatus::Speculative);
            if pc.status == PositionStatus::Aligned {
                aligned += 1;
                if let (Some(a), Some(b)) = (pc.candidate, pf.candidate) {
                    both += 1;
                    if (a - b).abs() < 1e-2 {
                        close += 1;
                    } else {
                        far.push((pc.index, a, b));
                    }
                }
            }
        }
    }
    println!(
        "chat: {aligned}/{total} aligned, candidate logprob known at {both}, {close} of them equal to forced's; others (index, chat, forced): {far:?}"
    );
    assert!(
        aligned * 10 >= total * 8,
        "most positions line up: {aligned}/{total}"
    );
    assert!(
        close * 10 >= aligned * 9,
        "aligned positions see the forced distribution: {close}/{aligned}"
    );

    // The chat API cannot score a raw-prompt completion.
    let raw = MainResponse {
        endpoint: Endpoint::Completion,
        request: json!({"prompt": "Hello"}),
        ..mains[0].clone()
    };
    let e = chat.score(&raw).await.unwrap_err();
    assert_eq!(e.reason(), "unsupported", "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speculative_rows_prompt_mismatch_split_forcing_and_refused_forcing() {
    let _guard = SERVERS.lock().await;
    let main = LlamaServer::start(common::model("q4_1"));
    let mains = main_responses(&main).await;
    drop(main);
    let cand = LlamaServer::start(common::model("q8_0"));
    let forced = scorer(&cand, StrategyChoice::Forced);

    let real = mains[1].prompt_tokens.unwrap();
    let mut off = mains[1].clone();
    off.prompt_tokens = Some(real + 3);
    match forced.score(&off).await {
        Err(ScoreError::PromptMismatch { main, candidate }) => {
            assert_eq!((main, candidate), (real + 3, real));
            let text = ScoreError::PromptMismatch { main, candidate }.to_string();
            assert!(text.contains(&main.to_string()) && text.contains(&candidate.to_string()));
        }
        other => panic!("expected a prompt mismatch, got {other:?}"),
    }
    // Without a count from the main there is nothing to check against: it is scored.
    off.prompt_tokens = None;
    let r = forced.score(&off).await.unwrap();
    assert_eq!(Some(r.prompt_tokens), mains[1].prompt_tokens);

    // A row as speculative decoding reports it (logprob 0, no top list) is never aligned,
    // and the positions around it are scored as usual.
    let mut spec = mains[1].clone();
    spec.tokens[2].logprob = 0.0;
    spec.tokens[2].top.clear();
    let r = forced.score(&spec).await.unwrap();
    assert_eq!(r.positions[2].status, PositionStatus::Speculative);
    assert_eq!(r.aligned().count(), r.positions.len() - 1);
    assert_eq!(r.candidate_requests, 1);
    let whole = forced.score(&mains[1]).await.unwrap();

    // A long response is forced in several requests, each continuing the cached prefix: the
    // numbers are those of the single request.
    let split = CandidateScorer::with_upstream(client(&cand), N_PROBS, 8, StrategyChoice::Forced)
        .with_forced_max_tokens(16);
    let r = split.score(&mains[1]).await.unwrap();
    let n = mains[1].tokens.len();
    assert_eq!(r.candidate_requests as usize, n.div_ceil(16));
    assert_eq!(r.candidate_tokens_decoded as usize, n);
    assert_eq!(r.strategy, Strategy::Forced);
    for (a, b) in r.positions.iter().zip(&whole.positions) {
        assert_eq!(a.status, PositionStatus::Aligned);
        let (x, y) = (a.candidate.unwrap(), b.candidate.unwrap());
        assert!((x - y).abs() < 1e-3, "position {}: {x} vs {y}", a.index);
    }

    // A token the grammar cannot name (an end-of-generation token where generation did not
    // stop) makes llama-server refuse the forced request: the scorer falls back to chunked
    // and still covers every position.
    let mut odd = mains[1].clone();
    odd.finish_reason = Some("length".into());
    let last = odd.tokens.last_mut().unwrap();
    last.id = 2;
    last.text = String::new();
    last.bytes = Some(Vec::new());
    let r = forced.score(&odd).await.unwrap();
    assert_eq!(r.strategy, Strategy::Chunked);
    assert_eq!(r.coverage(), 1.0);
    assert!(r.candidate_requests > 1);
}

#[tokio::test]
async fn a_candidate_that_is_down_is_reported_as_such() {
    let port = common::free_port();
    let up = Upstream::new(
        &format!("http://127.0.0.1:{port}").parse().unwrap(),
        Duration::from_secs(5),
        &[],
    );
    let scorer = CandidateScorer::with_upstream(up, N_PROBS, 8, StrategyChoice::Forced);
    let e = scorer.probe().await.unwrap_err();
    assert!(matches!(e, ScoreError::CandidateDown(_)), "{e:?}");
    assert_eq!(e.reason(), "candidate_down");
    assert!(scorer.report().is_none(), "a failed probe is not kept");
    let main = MainResponse {
        endpoint: Endpoint::ChatCompletions,
        request: json!({"messages": [{"role": "user", "content": "hi"}]}),
        model: "m".into(),
        prompt_tokens: Some(5),
        tokens: Vec::new(),
        finish_reason: Some("stop".into()),
        streamed: false,
        generated_tokens: None,
        client_authorization: None,
    };
    let e = scorer.score(&main).await.unwrap_err();
    assert_eq!(e.reason(), "candidate_down", "{e}");
}
