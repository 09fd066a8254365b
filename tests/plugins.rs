//! The comparator plugins in the wasmtime host: the components `make -C plugins` builds into
//! `plugins/dist/`, loaded through `kl_proxy::plugins` and fed hand-made records whose expected
//! results are worked out here by hand.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kl_proxy::config::PluginSpec;
use kl_proxy::plugins::{
    check, Metric, MetricValue, PluginFailure, PluginHost, PluginLimits, PluginOutcome, PluginSet,
};
use kl_proxy::record::{
    AlignedPosition, AlignedRecord, Endpoint, PositionStatus, Strategy, TokenText, TopLogprob,
};
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// Fixtures

/// A built component from `plugins/dist/`.
fn dist(file: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/dist")
        .join(file);
    assert!(
        p.exists(),
        "{} is missing: run `make -C plugins` first",
        p.display()
    );
    p
}

fn spec(name: &str, file: &str, options: serde_json::Value) -> PluginSpec {
    PluginSpec {
        name: name.into(),
        path: dist(file),
        options,
    }
}

/// A host with the config's default limits and a compile cache shared by the test runs.
fn host_with(timeout: Duration, memory_limit: u64) -> PluginHost {
    PluginHost::new(PluginLimits {
        timeout,
        memory_limit,
        cache_dir: Some(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("plugin-cache")),
    })
    .expect("plugin host")
}

fn host() -> PluginHost {
    host_with(Duration::from_millis(200), 64 << 20)
}

fn tl(id: i32, prob: f64) -> TopLogprob {
    TopLogprob {
        id,
        logprob: prob.ln() as f32,
    }
}

fn lp(id: i32, logprob: f32) -> TopLogprob {
    TopLogprob { id, logprob }
}

/// An aligned position: the main's token `main` with probability `p_main` (its logprob as the
/// main server reports it), both top lists, the candidate's probability of the main token.
fn aligned(
    index: u32,
    main: TopLogprob,
    main_top: Vec<TopLogprob>,
    candidate: Option<f32>,
    candidate_top: Vec<TopLogprob>,
    pick: Option<i32>,
    request: u32,
) -> AlignedPosition {
    AlignedPosition {
        index,
        main,
        main_top,
        candidate,
        candidate_top,
        candidate_pick: pick,
        request,
        status: PositionStatus::Aligned,
    }
}

fn record(id: &str, positions: Vec<AlignedPosition>, texts: &[(i32, &str)]) -> AlignedRecord {
    AlignedRecord {
        id: id.into(),
        time_ms: 1_700_000_000_000,
        endpoint: Endpoint::ChatCompletions,
        main_model: "main-q4_1".into(),
        candidate_model: "cand-q8_0".into(),
        prompt_tokens: 12,
        strategy: Strategy::Chunked,
        candidate_requests: 2,
        candidate_tokens_decoded: positions.len() as u32,
        finish_reason: Some("stop".into()),
        positions,
        texts: texts
            .iter()
            .map(|&(id, text)| TokenText {
                id,
                text: text.into(),
            })
            .collect(),
    }
}

fn ok(outcome: &PluginOutcome) -> &[Metric] {
    match &outcome.result {
        Ok(m) => m,
        Err(e) => panic!("plugin {} failed: {e}", outcome.plugin),
    }
}

fn metric<'a>(metrics: &'a [Metric], name: &str) -> &'a MetricValue {
    &metrics
        .iter()
        .find(|m| m.name == name)
        .unwrap_or_else(|| panic!("no metric `{name}` in {metrics:?}"))
        .value
}

fn series<'a>(metrics: &'a [Metric], name: &str) -> &'a [f64] {
    match metric(metrics, name) {
        MetricValue::PerPosition(v) => v,
        other => panic!("`{name}` is not per position: {other:?}"),
    }
}

fn scalar(metrics: &[Metric], name: &str) -> f64 {
    match metric(metrics, name) {
        MetricValue::Scalar(v) => *v,
        other => panic!("`{name}` is not a scalar: {other:?}"),
    }
}

fn close(actual: f64, expected: f64, what: &str) {
    assert!(
        (actual - expected).abs() < 1e-5,
        "{what}: got {actual}, expected {expected}"
    );
}

/// Collects the messages that plugins log (target `kl_proxy::plugin`) on this thread.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Captured {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if event.metadata().target() != "kl_proxy::plugin" {
            return;
        }
        struct Message(Option<String>);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = Some(format!("{value:?}"));
                }
            }
        }
        let mut m = Message(None);
        event.record(&mut m);
        if let Some(text) = m.0 {
            self.0.lock().unwrap().push(text);
        }
    }
}

fn capture_logs<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
    use tracing_subscriber::layer::SubscriberExt;
    let captured = Captured::default();
    let subscriber = tracing_subscriber::registry().with(captured.clone());
    let out = tracing::subscriber::with_default(subscriber, f);
    let lines = captured.0.lock().unwrap().clone();
    (out, lines)
}

// ---------------------------------------------------------------------------------------------
// logger

/// Six positions over two candidate requests: three match (aligned and the candidate picked the
/// main's token), one is a mismatch, one unaligned, one uncovered.
fn logger_record() -> AlignedRecord {
    let mut unaligned = aligned(4, lp(42, -1.0), vec![], None, vec![], Some(42), 2);
    unaligned.status = PositionStatus::Unaligned;
    let mut uncovered = aligned(5, lp(374, -0.3), vec![lp(374, -0.3)], None, vec![], None, 0);
    uncovered.status = PositionStatus::Uncovered;
    record(
        "log-1",
        vec![
            aligned(
                0,
                lp(785, -0.123),
                vec![lp(785, -0.123), lp(220, -2.5)],
                Some(-0.2),
                vec![lp(785, -0.2), lp(220, -1.9)],
                Some(785),
                1,
            ),
            aligned(
                1,
                lp(3344, -0.5),
                vec![lp(3344, -0.5), lp(220, -1.0)],
                Some(-1.4),
                vec![lp(220, -0.3), lp(3344, -1.4)],
                Some(220),
                1,
            ),
            aligned(
                2,
                lp(374, -0.045),
                vec![lp(374, -0.045)],
                Some(-0.01),
                vec![lp(374, -0.01), lp(42, -4.75)],
                Some(374),
                2,
            ),
            aligned(
                3,
                lp(42, -1.0),
                vec![lp(42, -1.0), lp(374, -1.2)],
                Some(-0.9),
                vec![lp(42, -0.9)],
                Some(42),
                2,
            ),
            unaligned,
            uncovered,
        ],
        &[
            (785, "The"),
            (220, " "),
            (3344, " answer"),
            (374, " is"),
            (42, "it's\n"),
        ],
    )
}

#[test]
fn logger_prints_the_seed_format() {
    let host = host();
    let set = PluginSet::load(&host, &[spec("logger", "logger.wasm", json!(null))]).unwrap();
    let (outcomes, lines) = capture_logs(|| set.compare(&logger_record()));
    let metrics = ok(&outcomes[0]);
    assert_eq!(scalar(metrics, "matched_tokens"), 3.0);
    let rule = "=".repeat(80);
    let expected = vec![
        rule.as_str(),
        "KL DIVERGENCE COMPARISON: 3/6 tokens matched across 2 requests",
        rule.as_str(),
        "",
        "Request 1 - Tokens 1-1:",
        "Main model:",
        "  'The' : [(785, 'The', '-0.123'), (220, ' ', '-2.500')]",
        "Candidate model:",
        "  'The' : [(785, 'The', '-0.200'), (220, ' ', '-1.900')]",
        "",
        "Request 2 - Tokens 3-4:",
        "Main model:",
        "  ' is' : [(374, ' is', '-0.045')]",
        r#"  "it's\n" : [(42, "it's\n", '-1.000'), (374, ' is', '-1.200')]"#,
        "Candidate model:",
        r#"  ' is' : [(374, ' is', '-0.010'), (42, "it's\n", '-4.750')]"#,
        r#"  "it's\n" : [(42, "it's\n", '-0.900')]"#,
        "",
    ];
    assert_eq!(lines, expected);
}

#[test]
fn logger_options_limit_the_listing() {
    let host = host();
    let opts = json!({"max_tokens_listed": 1, "top_n": 1});
    let set = PluginSet::load(&host, &[spec("logger", "logger.wasm", opts)]).unwrap();
    let (outcomes, lines) = capture_logs(|| set.compare(&logger_record()));
    ok(&outcomes[0]);
    let req2 = lines
        .iter()
        .position(|l| l == "Request 2 - Tokens 3-4:")
        .expect("request 2");
    assert_eq!(
        lines[req2..req2 + 4],
        [
            "Request 2 - Tokens 3-4:",
            "Main model:",
            "  ' is' : [(374, ' is', '-0.045')]",
            "  ... (1 more)",
        ]
    );

    let bad = PluginSet::load(
        &host,
        &[spec("chatty", "logger.wasm", json!({"colour": "red"}))],
    );
    let err = bad.err().expect("unknown option refused").to_string();
    assert!(err.contains("chatty") && err.contains("colour"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// kl-divergence

/// Four positions whose values are worked out by hand in the test.
fn kl_record() -> AlignedRecord {
    let mut unaligned = aligned(3, tl(1, 0.5), vec![tl(1, 0.5)], None, vec![], None, 2);
    unaligned.status = PositionStatus::Unaligned;
    record(
        "kl-1",
        vec![
            // A: both top lists cover the whole (3-token) vocabulary: the bound is exact.
            aligned(
                0,
                tl(1, 0.7),
                vec![tl(1, 0.7), tl(2, 0.2), tl(3, 0.1)],
                Some(0.5f64.ln() as f32),
                vec![tl(1, 0.5), tl(2, 0.3), tl(3, 0.2)],
                Some(1),
                1,
            ),
            // B: S = {2 (listed by both), 1 (the main token, its q reported)}.
            aligned(
                1,
                tl(1, 0.6),
                vec![tl(1, 0.6), tl(2, 0.3)],
                Some(0.1f64.ln() as f32),
                vec![tl(2, 0.5), tl(4, 0.3)],
                Some(2),
                1,
            ),
            // C: S = {1}; P's token 5 is not in Q's top-3.
            aligned(
                2,
                tl(1, 0.5),
                vec![tl(1, 0.5), tl(5, 0.3)],
                Some(0.4f64.ln() as f32),
                vec![tl(1, 0.4), tl(6, 0.35), tl(7, 0.05)],
                Some(1),
                2,
            ),
            unaligned,
        ],
        &[
            (1, "a"),
            (2, "b"),
            (3, "c"),
            (4, "d"),
            (5, "e"),
            (6, "f"),
            (7, "g"),
        ],
    )
}

#[test]
fn kl_divergence_matches_hand_computed_values() {
    let host = host();
    let set = PluginSet::load(&host, &[spec("kl", "kl-divergence.wasm", json!(null))]).unwrap();
    let outcomes = set.compare(&kl_record());
    let m = ok(&outcomes[0]);
    let ln = f64::ln;

    let kld = series(m, "kld");
    assert_eq!(kld.len(), 4);
    // A: exact KL over the whole vocabulary.
    let kl_a = 0.7 * ln(0.7 / 0.5) + 0.2 * ln(0.2 / 0.3) + 0.1 * ln(0.1 / 0.2);
    close(kld[0], kl_a, "kld A (exact)");
    // B: S = {2, 1}, rest p_r = 0.1, q_r = 0.4.
    let kl_b = 0.3 * ln(0.3 / 0.5) + 0.6 * ln(0.6 / 0.1) + 0.1 * ln(0.1 / 0.4);
    close(kld[1], kl_b, "kld B");
    // C: S = {1}, rest p_r = 0.5, q_r = 0.6.
    let kl_c = 0.5 * ln(0.5 / 0.4) + 0.5 * ln(0.5 / 0.6);
    close(kld[2], kl_c, "kld C");
    assert!(kld[3].is_nan(), "unaligned position: {}", kld[3]);

    // The estimate: token 5 gets Q's cut-off 0.05; the rest p 0.2, q 1 - 0.4 - 0.05.
    let est = series(m, "kld_estimate");
    close(est[0], kl_a, "estimate A");
    close(est[1], kl_b, "estimate B");
    let est_c = 0.5 * ln(0.5 / 0.4) + 0.3 * ln(0.3 / 0.05) + 0.2 * ln(0.2 / 0.55);
    close(est[2], est_c, "estimate C");
    assert!(est[3].is_nan());

    let same = series(m, "same_top");
    assert_eq!(&same[..3], &[1.0, 0.0, 1.0]);
    assert!(same[3].is_nan());
    let dp = series(m, "delta_p");
    close(dp[0], 0.5 - 0.7, "delta_p A");
    close(dp[1], 0.1 - 0.6, "delta_p B");
    close(dp[2], 0.4 - 0.5, "delta_p C");
    let nll_main = series(m, "nll_main");
    close(nll_main[1], -ln(0.6), "nll_main B");
    let nll_cand = series(m, "nll_candidate");
    close(nll_cand[1], -ln(0.1), "nll_candidate B");
    assert!(nll_main[3].is_nan() && nll_cand[3].is_nan());

    close(
        scalar(m, "kld_mean"),
        (kl_a + kl_b + kl_c) / 3.0,
        "kld_mean",
    );
    close(scalar(m, "same_top_rate"), 2.0 / 3.0, "same_top_rate");
    assert_eq!(scalar(m, "positions_compared"), 3.0);
}

#[test]
fn kl_divergence_emits_what_it_is_asked() {
    let host = host();
    let opts = json!({"emit": ["kld", "kld_mean"]});
    let set = PluginSet::load(&host, &[spec("kl", "kl-divergence.wasm", opts)]).unwrap();
    let outcomes = set.compare(&kl_record());
    let names: Vec<&str> = ok(&outcomes[0]).iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["kld", "kld_mean"]);

    let err = PluginSet::load(
        &host,
        &[spec("kl", "kl-divergence.wasm", json!({"emit": ["kdl"]}))],
    )
    .err()
    .expect("unknown metric refused")
    .to_string();
    assert!(err.contains("`kl`") && err.contains("kdl"), "{err}");
}

/// A small deterministic generator (no seed file, no dependency).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64) / ((1u64 << 53) as f64)
    }

    /// A random distribution over `n` tokens, peaked like a language model's.
    fn distribution(&mut self, n: usize) -> Vec<f64> {
        let sharp = 1.0 + 6.0 * self.next();
        let w: Vec<f64> = (0..n)
            .map(|_| (sharp * self.next()).exp().powi(2))
            .collect();
        let s: f64 = w.iter().sum();
        w.into_iter().map(|x| x / s).collect()
    }
}

/// The `k` most probable tokens, most probable first, as a server would list them.
fn top_k(dist: &[f64], k: usize) -> Vec<TopLogprob> {
    let mut ids: Vec<usize> = (0..dist.len()).collect();
    ids.sort_by(|&a, &b| dist[b].total_cmp(&dist[a]));
    ids.into_iter()
        .take(k)
        .map(|i| tl(i as i32, dist[i]))
        .collect()
}

/// Random positions: the bound is never negative and never above the true KL; with the whole
/// vocabulary listed it is the true KL.
#[test]
fn kl_lower_bound_is_never_negative_nor_above_the_true_kl() {
    const VOCAB: usize = 20;
    let host = host();
    let set = PluginSet::load(&host, &[spec("kl", "kl-divergence.wasm", json!(null))]).unwrap();
    let mut rng = Lcg(7);
    for k in [1, 3, 5, VOCAB] {
        let mut positions = Vec::new();
        let mut true_kl = Vec::new();
        for i in 0..300u32 {
            let p = rng.distribution(VOCAB);
            // Half the positions: Q close to P; the others unrelated.
            let q = if i % 2 == 0 {
                let noise = rng.distribution(VOCAB);
                let mixed: Vec<f64> = p
                    .iter()
                    .zip(&noise)
                    .map(|(a, b)| 0.9 * a + 0.1 * b)
                    .collect();
                mixed
            } else {
                rng.distribution(VOCAB)
            };
            // The main token is sampled from P.
            let (mut u, mut main) = (rng.next(), VOCAB - 1);
            for (t, &pt) in p.iter().enumerate() {
                if u < pt {
                    main = t;
                    break;
                }
                u -= pt;
            }
            true_kl.push(p.iter().zip(&q).map(|(a, b)| a * (a / b).ln()).sum::<f64>());
            positions.push(aligned(
                i,
                tl(main as i32, p[main]),
                top_k(&p, k),
                Some(q[main].ln() as f32),
                top_k(&q, k),
                Some(top_k(&q, 1)[0].id),
                1,
            ));
        }
        let outcomes = set.compare(&record("random", positions, &[]));
        let kld = series(ok(&outcomes[0]), "kld");
        for (i, (&lb, &kl)) in kld.iter().zip(&true_kl).enumerate() {
            assert!(lb >= 0.0, "top-{k}, position {i}: negative bound {lb}");
            assert!(
                lb <= kl + 1e-5,
                "top-{k}, position {i}: bound {lb} above the true KL {kl}"
            );
            if k == VOCAB {
                assert!(
                    (lb - kl).abs() < 1e-4,
                    "full vocabulary, position {i}: {lb} vs {kl}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The Python plugin

#[test]
fn python_plugin_returns_top_overlap() {
    let host = host();
    let set = PluginSet::load(&host, &[spec("overlap", "top-overlap.wasm", json!(null))]).unwrap();
    let mut unaligned = aligned(1, tl(1, 0.5), vec![tl(1, 0.5)], None, vec![], None, 1);
    unaligned.status = PositionStatus::Unaligned;
    let rec = record(
        "py-1",
        vec![
            aligned(
                0,
                tl(1, 0.5),
                vec![tl(1, 0.5), tl(2, 0.25), tl(3, 0.25)],
                Some(0.25f64.ln() as f32),
                vec![tl(2, 0.5), tl(3, 0.25), tl(4, 0.25)],
                Some(2),
                1,
            ),
            unaligned,
        ],
        &[],
    );
    let outcomes = set.compare(&rec);
    let m = ok(&outcomes[0]);
    let overlap = series(m, "top_overlap");
    close(overlap[0], 2.0 / 3.0, "top_overlap");
    assert!(overlap[1].is_nan());
    // Both lists have probabilities {0.5, 0.25, 0.25}: the same entropy.
    close(series(m, "entropy_diff")[0], 0.0, "entropy_diff");
    close(scalar(m, "top_overlap_mean"), 2.0 / 3.0, "top_overlap_mean");
}

// ---------------------------------------------------------------------------------------------
// Misbehaving plugins

#[test]
fn failing_plugins_are_contained_and_replaced() {
    let timeout = Duration::from_millis(200);
    let host = host_with(timeout, 32 << 20);
    let set = PluginSet::load(
        &host,
        &[
            spec("trap", "trap.wasm", json!(null)),
            spec("spin", "spin.wasm", json!(null)),
            spec("hog", "hog.wasm", json!(null)),
            spec("kl", "kl-divergence.wasm", json!(null)),
        ],
    )
    .unwrap();
    assert_eq!(set.names(), ["trap", "spin", "hog", "kl"]);

    let mut rec = kl_record();
    rec.id = "trap-1".into();
    let start = Instant::now();
    let outcomes = set.compare(&rec);
    let took = start.elapsed();
    assert_eq!(outcomes.len(), 4);
    match &outcomes[0].result {
        Err(PluginFailure::Trap(why)) => {
            assert!(
                why.contains("unreachable") || why.contains("panicked"),
                "{why}"
            )
        }
        other => panic!("trap: {other:?}"),
    }
    assert_eq!(outcomes[0].result.as_ref().unwrap_err().reason(), "trap");
    assert_eq!(outcomes[1].result, Err(PluginFailure::Timeout));
    assert!(
        outcomes[1].elapsed >= timeout - Duration::from_millis(20)
            && outcomes[1].elapsed < timeout + Duration::from_secs(1),
        "spin stopped after {:?}",
        outcomes[1].elapsed
    );
    assert_eq!(outcomes[2].result, Err(PluginFailure::OutOfMemory));
    assert_eq!(
        outcomes[2].result.as_ref().unwrap_err().reason(),
        "out_of_memory"
    );
    assert_eq!(series(ok(&outcomes[3]), "kld").len(), 4);
    assert!(took < Duration::from_secs(5), "the set took {took:?}");

    // The next record gets fresh instances: the trap fixture counts its calls from 1 again,
    // then its healthy instance is kept (2).
    rec.id = "fine-2".into();
    let outcomes = set.compare(&rec);
    assert_eq!(scalar(ok(&outcomes[0]), "calls"), 1.0);
    assert_eq!(outcomes[1].result, Err(PluginFailure::Timeout));
    assert_eq!(outcomes[2].result, Err(PluginFailure::OutOfMemory));
    ok(&outcomes[3]);
    rec.id = "fine-3".into();
    let outcomes = set.compare(&rec);
    assert_eq!(scalar(ok(&outcomes[0]), "calls"), 2.0);
    ok(&outcomes[3]);
}

// ---------------------------------------------------------------------------------------------
// Loading and checking

#[test]
fn check_names_the_world_or_why_not() {
    let said = check(&dist("kl-divergence.wasm")).expect("kl-divergence is a comparator");
    println!("{said}");
    assert!(
        said.contains("kl-proxy:comparator/comparator@0.1.0"),
        "{said}"
    );

    let dir = tempfile::tempdir().unwrap();
    let core = dir.path().join("core.wasm");
    // The smallest core module: magic and version 1, no sections.
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let err = check(&core).unwrap_err().to_string();
    assert!(
        err.contains("core.wasm")
            && err.contains("not a WebAssembly component")
            && err.contains("core WebAssembly module"),
        "{err}"
    );

    let text = dir.path().join("notes.wasm");
    std::fs::write(&text, "hello").unwrap();
    let err = check(&text).unwrap_err().to_string();
    assert!(err.contains("not a WebAssembly file"), "{err}");
}

#[test]
fn a_broken_plugin_path_fails_load_naming_the_plugin() {
    let host = host();
    let specs = [
        spec("kl", "kl-divergence.wasm", json!(null)),
        PluginSpec {
            name: "broken".into(),
            path: PathBuf::from("/nonexistent/broken.wasm"),
            options: json!(null),
        },
    ];
    let err = PluginSet::load(&host, &specs)
        .err()
        .expect("load fails")
        .to_string();
    assert!(
        err.contains("`broken`")
            && err.contains("/nonexistent/broken.wasm")
            && err.contains("not found"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Cost

/// 1000 positions with top-10 lists: the kl-divergence plugin's time per call (printed; the
/// bound asserted is loose so a busy machine does not fail it).
#[test]
fn kl_divergence_cost_per_1000_positions() {
    let host = host_with(Duration::from_secs(5), 64 << 20);
    let set = PluginSet::load(&host, &[spec("kl", "kl-divergence.wasm", json!(null))]).unwrap();
    let mut rng = Lcg(11);
    let positions: Vec<AlignedPosition> = (0..1000u32)
        .map(|i| {
            let p = rng.distribution(64);
            let q = rng.distribution(64);
            let main = top_k(&p, 1)[0].clone();
            let cand = Some(q[main.id as usize].ln() as f32);
            aligned(i, main, top_k(&p, 10), cand, top_k(&q, 10), Some(0), 1)
        })
        .collect();
    let texts: Vec<(i32, String)> = (0..64).map(|i| (i, format!("tok{i}"))).collect();
    let texts: Vec<(i32, &str)> = texts.iter().map(|(i, t)| (*i, t.as_str())).collect();
    let rec = record("cost", positions, &texts);
    ok(&set.compare(&rec)[0]); // warm-up
    let runs = 20;
    let mut in_plugin = Duration::ZERO;
    let start = Instant::now();
    for _ in 0..runs {
        let outcomes = set.compare(&rec);
        assert_eq!(series(ok(&outcomes[0]), "kld").len(), 1000);
        in_plugin += outcomes[0].elapsed;
    }
    let per_call = start.elapsed() / runs;
    println!(
        "kl-divergence, 1000 positions, top-10: {per_call:?} per record, {:?} of it in the call \
         (the rest: converting the record)",
        in_plugin / runs
    );
    assert!(
        per_call < Duration::from_millis(200),
        "{per_call:?} per call"
    );
}
