//! Fuzzing on stable Rust (proptest; cargo-fuzz needs nightly): byte streams and chunkings
//! through the response tee, arbitrary JSON into the capture, arbitrary candidate answers into
//! the scorer, arbitrary series into the report statistics. No panic, no unbounded buffering,
//! and for the recorded real answers the same client bytes and the same capture whatever the
//! chunking.
//!
//! `make test` runs the default (small) case count; `make fuzz` sets `PROPTEST_CASES` and a
//! time bound. Failing inputs are persisted to `tests/fuzz-corpus/fuzz.proptest-regressions`
//! (replayed first on every run); the recorded llama-server answers in `tests/fuzz-corpus/`
//! are the seed corpus.

mod fault_kit;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fault_kit::{corpus, Reply};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use kl_proxy::candidate::CandidateScorer;
use kl_proxy::capture::{parse_token_entry, BodyKind, Capture, TeeBody};
use kl_proxy::config::Config;
use kl_proxy::inject::ResponseEdit;
use kl_proxy::queue::{ActivePlugins, ComparisonOutcome, ComparisonWorkers, OutcomeSinks};
use kl_proxy::record::{Endpoint, MainResponse};
use proptest::prelude::*;
use proptest::test_runner::{Config as PropConfig, FileFailurePersistence};
use serde_json::{json, Map, Value};
use tokio::sync::broadcast;

const REGRESSIONS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fuzz-corpus/fuzz.proptest-regressions"
);

/// `PROPTEST_CASES` when set (make fuzz), else a small count (make test).
fn prop_config(default_cases: u32) -> PropConfig {
    let mut c = PropConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = default_cases;
    }
    c.failure_persistence = Some(Box::new(FileFailurePersistence::Direct(REGRESSIONS)));
    c.max_shrink_time = 30_000;
    c
}

/// The recorded llama-server answers (the seed corpus), with the endpoint and body kind.
const FIXTURES: &[(&str, Endpoint, BodyKind)] = &[
    ("chat-stream.sse", Endpoint::ChatCompletions, BodyKind::Sse),
    ("completion-stream.sse", Endpoint::Completion, BodyKind::Sse),
    (
        "completions-stream.sse",
        Endpoint::Completions,
        BodyKind::Sse,
    ),
    ("chat.json", Endpoint::ChatCompletions, BodyKind::Json),
];

const EDITS: &[ResponseEdit] = &[
    ResponseEdit::None,
    ResponseEdit::Strip,
    ResponseEdit::TrimTop(3),
];

/// A comparison queue whose captures can be read back: workers scoring against a candidate
/// that is down (a refused port), so each offered capture comes back at once as an outcome.
struct Harness {
    rt: tokio::runtime::Runtime,
    workers: ComparisonWorkers,
    outcomes: broadcast::Receiver<Arc<ComparisonOutcome>>,
}

impl Harness {
    fn new() -> Harness {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let refused = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let config = Config::from_yaml(
            &format!(
                "target_host: http://127.0.0.1:1\ncandidate_host: http://{refused}\n\
                 candidate_timeout: 1s\n"
            ),
            None,
        )
        .unwrap();
        let _guard = rt.enter();
        let workers = ComparisonWorkers::start(
            1 << 20,
            1,
            Arc::new(CandidateScorer::new(&config)),
            Arc::new(ActivePlugins::new(None)),
            OutcomeSinks::default(),
        );
        let outcomes = workers.subscribe();
        drop(_guard);
        Harness {
            rt,
            workers,
            outcomes,
        }
    }

    /// Sends `chunks` through a `TeeBody` as the target's frames; returns what the client
    /// received and the capture that was offered for comparison, if any.
    fn run(
        &mut self,
        chunks: Vec<Bytes>,
        kind: BodyKind,
        endpoint: Endpoint,
        edit: ResponseEdit,
        max_tokens: usize,
    ) -> (Vec<u8>, Option<Arc<MainResponse>>) {
        let queue = self.workers.queue();
        let outcomes = &mut self.outcomes;
        self.rt.block_on(async move {
            let offered = queue
                .stats()
                .offered
                .load(std::sync::atomic::Ordering::Acquire);
            let frames = chunks
                .into_iter()
                .map(|c| Ok::<_, Infallible>(Frame::data(c)));
            let body = StreamBody::new(futures_util::stream::iter(frames));
            let capture = Capture::new(endpoint, json!({}), kind == BodyKind::Sse, max_tokens);
            let tee = TeeBody::new(body, kind, endpoint, edit, Some((capture, queue.clone())));
            let client = tee.collect().await.unwrap().to_bytes().to_vec();
            let now = queue
                .stats()
                .offered
                .load(std::sync::atomic::Ordering::Acquire);
            assert!(now <= offered + 1, "one body offered more than one capture");
            let main = if now > offered {
                let o = tokio::time::timeout(Duration::from_secs(20), outcomes.recv())
                    .await
                    .expect("the offered capture comes back as an outcome")
                    .expect("outcome channel");
                Some(o.main.clone())
            } else {
                None
            };
            (client, main)
        })
    }
}

fn split_at(data: &[u8], cuts: &[usize]) -> Vec<Bytes> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut out = Vec::new();
    let mut last = 0;
    for c in cuts.into_iter().chain([data.len()]) {
        if c > last {
            out.push(Bytes::copy_from_slice(&data[last..c]));
            last = c;
        }
    }
    out
}

fn capture_json(m: &Option<Arc<MainResponse>>) -> Option<String> {
    m.as_ref().map(|m| serde_json::to_string(&**m).unwrap())
}

/// Every byte boundary of every recorded answer, under every edit: the client bytes and the
/// capture are the same as when the answer arrives in one piece.
#[test]
fn recorded_answers_split_at_every_byte_give_identical_bytes_and_capture() {
    let mut h = Harness::new();
    let mut splits = 0usize;
    for &(name, endpoint, kind) in FIXTURES {
        let data = corpus(name);
        for &edit in EDITS {
            let (ref_bytes, ref_main) =
                h.run(vec![Bytes::from(data.clone())], kind, endpoint, edit, 8192);
            let ref_capture = capture_json(&ref_main);
            let main = ref_main
                .as_ref()
                .unwrap_or_else(|| panic!("{name} {edit:?} is captured"));
            assert!(!main.tokens.is_empty());
            assert!(main.tokens.iter().all(|t| t.top.len() == 10), "{name}");
            match edit {
                ResponseEdit::None => {
                    assert_eq!(ref_bytes, data, "{name}: passed through untouched")
                }
                ResponseEdit::Strip => {
                    let s = String::from_utf8_lossy(&ref_bytes);
                    assert!(
                        !s.contains("top_logprobs") && !s.contains("top_probs"),
                        "{name}: {s}"
                    )
                }
                ResponseEdit::TrimTop(_) => assert_ne!(ref_bytes, data),
            }
            for i in 1..data.len() {
                let (b, m) = h.run(split_at(&data, &[i]), kind, endpoint, edit, 8192);
                assert!(
                    b == ref_bytes,
                    "{name} {edit:?} split at byte {i}: client bytes differ"
                );
                assert_eq!(
                    capture_json(&m),
                    ref_capture,
                    "{name} {edit:?} split at {i}"
                );
                splits += 1;
            }
            // And one byte per frame.
            let bytewise = data.iter().map(|b| Bytes::copy_from_slice(&[*b])).collect();
            let (b, m) = h.run(bytewise, kind, endpoint, edit, 8192);
            assert!(b == ref_bytes, "{name} {edit:?} one byte per frame");
            assert_eq!(capture_json(&m), ref_capture);
        }
    }
    eprintln!(
        "{splits} single splits + {} byte-per-frame runs, all identical",
        FIXTURES.len() * EDITS.len()
    );
}

/// A capture past `max_capture_tokens` is abandoned: nothing is offered, the client still gets
/// every byte.
#[test]
fn a_capture_past_max_capture_tokens_is_abandoned() {
    let mut h = Harness::new();
    for &(name, endpoint, kind) in FIXTURES {
        let data = corpus(name);
        let (b, m) = h.run(
            vec![Bytes::from(data.clone())],
            kind,
            endpoint,
            ResponseEdit::None,
            1,
        );
        assert_eq!(b, data);
        assert!(
            m.is_none(),
            "{name}: a capture longer than 1 token is not offered"
        );
    }
}

fn mutate(data: &[u8], ops: &[(u8, usize, u8)]) -> Vec<u8> {
    let mut d = data.to_vec();
    for &(op, at, byte) in ops {
        let at = if d.is_empty() { 0 } else { at % d.len() };
        match op % 5 {
            0 if !d.is_empty() => d[at] = byte,
            1 => d.insert(at, byte),
            2 if !d.is_empty() => {
                d.remove(at);
            }
            3 => d.truncate(at),
            _ => {
                // Duplicate a span (repeated events, repeated keys).
                let end = (at + byte as usize).min(d.len());
                let span = d[at..end].to_vec();
                d.splice(at..at, span);
            }
        }
    }
    d
}

/// (client bytes, capture as JSON) of each (fixture, edit) arriving in one piece.
type Reference = (Vec<u8>, Option<String>);

static REFERENCES: LazyLock<Mutex<HashMap<(usize, usize), Reference>>> =
    LazyLock::new(Default::default);

fn edit_strategy() -> impl Strategy<Value = ResponseEdit> {
    prop_oneof![
        Just(ResponseEdit::None),
        Just(ResponseEdit::Strip),
        (0usize..12).prop_map(ResponseEdit::TrimTop),
    ]
}

fn kind_strategy() -> impl Strategy<Value = BodyKind> {
    prop_oneof![Just(BodyKind::Sse), Just(BodyKind::Json)]
}

fn endpoint_strategy() -> impl Strategy<Value = Endpoint> {
    prop_oneof![
        Just(Endpoint::ChatCompletions),
        Just(Endpoint::Completions),
        Just(Endpoint::Completion),
    ]
}

proptest! {
    #![proptest_config(prop_config(64))]

    /// The recorded answers cut into arbitrary frames: same bytes, same capture.
    #[test]
    fn recorded_answers_any_chunking(
        fixture in 0..FIXTURES.len(),
        edit in 0..EDITS.len(),
        cuts in prop::collection::vec(any::<usize>(), 0..64),
    ) {
        thread_local!(static H: std::cell::RefCell<Option<Harness>> = const { std::cell::RefCell::new(None) });
        let (name, endpoint, kind) = FIXTURES[fixture];
        let data = corpus(name);
        H.with(|h| {
            let mut h = h.borrow_mut();
            let h = h.get_or_insert_with(Harness::new);
            let reference = REFERENCES.lock().unwrap().get(&(fixture, edit)).cloned();
            let (ref_bytes, ref_capture) = match reference {
                Some(r) => r,
                None => {
                    let (b, m) = h.run(vec![Bytes::from(data.clone())], kind, endpoint, EDITS[edit], 8192);
                    let r = (b, capture_json(&m));
                    REFERENCES.lock().unwrap().insert((fixture, edit), r.clone());
                    r
                }
            };
            let (b, m) = h.run(split_at(&data, &cuts), kind, endpoint, EDITS[edit], 8192);
            prop_assert!(b == ref_bytes, "{} {:?}: client bytes differ", name, EDITS[edit]);
            prop_assert_eq!(capture_json(&m), ref_capture);
            Ok(())
        })?;
    }

    /// Arbitrary bytes (random, or a recorded answer mutated) in arbitrary frames, read as SSE
    /// or JSON by any endpoint under any edit: no panic; untouched when nothing is edited; a
    /// capture is only ever offered within `max_capture_tokens`.
    #[test]
    fn arbitrary_bytes_any_chunking_any_edit(
        seed in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..2048).prop_map(|b| (None, b)),
            (0..FIXTURES.len(), prop::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 0..16))
                .prop_map(|(f, ops)| (Some(f), ops.into_iter().flat_map(|(a, b, c)| [a, (b % 251) as u8, c]).collect())),
        ],
        cuts in prop::collection::vec(any::<usize>(), 0..32),
        kind in kind_strategy(),
        endpoint in endpoint_strategy(),
        edit in edit_strategy(),
        max_tokens in 0usize..20,
    ) {
        thread_local!(static H: std::cell::RefCell<Option<Harness>> = const { std::cell::RefCell::new(None) });
        let data = match seed {
            (None, bytes) => bytes,
            (Some(f), ops) => {
                let ops: Vec<(u8, usize, u8)> = ops.chunks(3).filter(|c| c.len() == 3)
                    .map(|c| (c[0], c[1] as usize * 37, c[2])).collect();
                mutate(&corpus(FIXTURES[f].0), &ops)
            }
        };
        H.with(|h| {
            let mut h = h.borrow_mut();
            let h = h.get_or_insert_with(Harness::new);
            let (b, m) = h.run(split_at(&data, &cuts), kind, endpoint, edit, max_tokens);
            if edit == ResponseEdit::None {
                prop_assert!(b == data, "not edited: the client gets the bytes as sent");
            }
            if let Some(m) = m {
                prop_assert!(!m.tokens.is_empty() && m.tokens.len() <= max_tokens);
            }
            Ok(())
        })?;
    }

    /// Arbitrary JSON objects (with the keys the capture looks for) into `Capture::observe`:
    /// no panic, and a finished capture is non-empty and within its bound.
    #[test]
    fn arbitrary_json_into_capture(
        objs in prop::collection::vec(answer_object(), 1..6),
        endpoint in endpoint_strategy(),
        max_tokens in 0usize..50,
    ) {
        let mut c = Capture::new(endpoint, json!({}), true, max_tokens);
        for o in &objs {
            c.observe(o);
            for v in o.values() {
                let _ = parse_token_entry(v);
            }
        }
        if let Some(m) = c.finish() {
            prop_assert!(!m.tokens.is_empty() && m.tokens.len() <= max_tokens);
        }
    }

    /// Arbitrary series into the report statistics (NaN, infinities, huge values): no panic.
    #[test]
    fn arbitrary_series_into_report_stats(
        values in prop::collection::vec(prop_oneof![any::<f64>(), -50.0f64..50.0, Just(f64::NAN), Just(f64::INFINITY)], 0..200),
    ) {
        let _ = kl_proxy::stats::series_stats(&values);
        let mut input = kl_proxy::stats::ReportInput {
            comparisons_ok: 1,
            positions: values.len() as u64,
            aligned_positions: values.len() as u64,
            ..Default::default()
        };
        for name in ["kl.kl", "kl.nll_main", "kl.nll_candidate", "kl.top1_agree", "x.y"] {
            input.series.insert(name.to_owned(), values.clone());
        }
        let _ = kl_proxy::stats::build_report(&input);
    }
}

proptest! {
    #![proptest_config(prop_config(16))]

    /// A candidate answering arbitrary JSON (or statuses) on every endpoint the scorer uses:
    /// scoring a real captured response ends in a record or one of the known failure reasons,
    /// never a panic or a hang.
    #[test]
    fn arbitrary_candidate_answers_into_the_scorer(
        answers in prop::collection::vec((prop_oneof![Just(200u16), Just(200), Just(200), Just(404), Just(500), Just(503)], json_value()), 1..8),
        strategy in prop::sample::select(vec!["forced", "chunked", "chat"]),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let main = captured_chat();
        let outcome = rt.block_on(async move {
            let answers = Arc::new(answers);
            let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let server = fault_kit::scripted(move |_m, path, _b| {
                let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let (status, v) = &answers[(i + path.len()) % answers.len()];
                Reply::json(*status, v.clone())
            }).await;
            let config = Config::from_yaml(&format!(
                "target_host: http://127.0.0.1:1\ncandidate_host: {}\ncandidate_timeout: 2s\nstrategy: {strategy}\n",
                server.url()), None).unwrap();
            let scorer = CandidateScorer::new(&config);
            tokio::time::timeout(Duration::from_secs(20), scorer.score(&main)).await
        });
        let outcome = outcome.expect("scoring ends within 20 s");
        if let Err(e) = outcome {
            prop_assert!(["prompt_mismatch", "candidate_down", "timeout", "bad_answer", "unsupported"].contains(&e.reason()));
        }
    }
}

/// The capture of the recorded chat answer (a real `MainResponse`).
fn captured_chat() -> MainResponse {
    static MAIN: LazyLock<MainResponse> = LazyLock::new(|| {
        let body = corpus("completions-stream.sse");
        let mut c = Capture::new(
            Endpoint::Completions,
            json!({"prompt": "Once upon a time", "max_tokens": 6, "n_probs": 10}),
            true,
            8192,
        );
        for line in body.split(|b| *b == b'\n') {
            if let Some(p) = line.strip_prefix(b"data: ") {
                if let Ok(o) = serde_json::from_slice::<Map<String, Value>>(p) {
                    c.observe(&o);
                }
            }
        }
        c.finish().expect("the recorded answer is complete")
    });
    MAIN.clone()
}

fn key() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "choices",
        "index",
        "logprobs",
        "content",
        "id",
        "token",
        "bytes",
        "logprob",
        "prob",
        "top_logprobs",
        "top_probs",
        "finish_reason",
        "usage",
        "prompt_tokens",
        "timings",
        "prompt_n",
        "cache_n",
        "completion_probabilities",
        "stop",
        "stop_type",
        "tokens_evaluated",
        "model",
        "delta",
        "data",
        "prompt",
        "tokens",
        "x",
    ])
    .prop_map(str::to_owned)
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (0u64..300).prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-30.0f64..1.0).prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,8}".prop_map(Value::from),
        prop::sample::select(vec!["stop", "length", "eos", "limit", "word", ""])
            .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// An answer object: mostly the shapes llama-server sends, with arbitrary values in them.
fn answer_object() -> impl Strategy<Value = Map<String, Value>> {
    let entry = (
        any::<i64>(),
        ".{0,4}",
        prop::option::of(prop::collection::vec(any::<i64>(), 0..5)),
        prop_oneof![(-30.0f64..0.0).prop_map(Value::from), json_value()],
        prop::collection::vec((any::<i32>(), -30.0f64..0.0), 0..12),
    )
        .prop_map(|(id, token, bytes, logprob, top)| {
            json!({"id": id, "token": token, "bytes": bytes, "logprob": logprob,
                "top_logprobs": top.into_iter().map(|(id, lp)| json!({"id": id, "logprob": lp})).collect::<Vec<_>>()})
        });
    let entries = prop::collection::vec(entry, 0..8);
    let chat = (
        entries.clone(),
        0u64..3,
        prop::option::of(prop::sample::select(vec!["stop", "length", "tool_calls"])),
        prop::option::of(0u64..5000),
    )
        .prop_map(|(e, index, finish, prompt)| {
            json!({"choices": [{"index": index, "delta": {"content": "x"},
                "logprobs": {"content": e}, "finish_reason": finish}],
                "usage": prompt.map(|p| json!({"prompt_tokens": p}))})
        });
    let native = (entries, any::<bool>(), prop::option::of(0u64..5000)).prop_map(|(e, stop, n)| {
        json!({"content": "x", "completion_probabilities": e, "stop": stop,
            "stop_type": "limit", "tokens_evaluated": n})
    });
    let free = prop::collection::btree_map(key(), json_value(), 0..8)
        .prop_map(|m| Value::Object(m.into_iter().collect()));
    prop_oneof![chat, native, free].prop_map(|v| match v {
        Value::Object(m) => m,
        _ => Map::new(),
    })
}

/// Memory held by the tee is bounded: a target that streams an SSE "line" that never ends
/// (48 MiB without a newline) must not make the proxy buffer all of it.
#[test]
fn an_endless_sse_line_is_not_buffered_without_bound() {
    assert!(held_after_streaming(BodyKind::Sse, ResponseEdit::None) < 16 << 20);
}

/// Same for a JSON answer passed through unedited: the capture's copy is bounded.
#[test]
fn a_huge_json_answer_is_not_held_without_bound() {
    assert!(held_after_streaming(BodyKind::Json, ResponseEdit::None) < 16 << 20);
}

/// Streams 48 MiB of fresh 64 KiB frames through a capturing `TeeBody`, dropping each frame as
/// the client would; returns how much this process's RSS grew while the body was alive.
fn held_after_streaming(kind: BodyKind, edit: ResponseEdit) -> u64 {
    let h = Harness::new();
    let queue = h.workers.queue();
    let pid = std::process::id();
    let grown = h.rt.block_on(async move {
        let frames =
            (0..768).map(|_| Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'x'; 64 << 10]))));
        // Lazily: each frame is allocated only when the tee asks for it.
        let first = Ok(Frame::data(Bytes::from_static(b"data: {\"choices\": [")));
        let body = StreamBody::new(futures_util::stream::iter(
            std::iter::once(first).chain(frames),
        ));
        let capture = Capture::new(Endpoint::ChatCompletions, json!({}), true, 8192);
        let mut tee = TeeBody::new(
            body,
            kind,
            Endpoint::ChatCompletions,
            edit,
            Some((capture, queue)),
        )
        // A bound well below the assertion's, so that what the bound itself allows cannot
        // be mistaken for growth (RSS is the whole process's, shared with other tests).
        .with_max_held(1 << 20);
        let before = fault_kit::rss_kib(pid);
        let mut n = 0;
        while n < 769 {
            match tee.frame().await {
                Some(Ok(f)) => drop(f),
                _ => break,
            }
            n += 1;
        }
        let after = fault_kit::rss_kib(pid);
        eprintln!("rss before {before} KiB after {after} KiB, {n} frames");
        drop(tee);
        after.saturating_sub(before) * 1024
    });
    eprintln!(
        "{kind:?}: RSS grew {} MiB while 48 MiB streamed through",
        grown >> 20
    );
    drop(h.outcomes);
    grown
}
