//! The `chat` strategy, for candidates that speak only the OpenAI chat API: the request's
//! messages plus a partial assistant message holding the main's text so far, continued
//! greedily with `logprobs`. The prefix is re-tokenised from text by the candidate, so token
//! boundaries may shift: generated tokens are lined up with the main's by their bytes (by id
//! too when the server returns ids that agree with the main's), and a request whose
//! `usage.prompt_tokens` is not the first request's plus the prefix length marks its positions
//! `Unaligned`. Without usage the text alignment is all there is. Candidate top entries get the
//! server's ids when those are trusted, else the id of a main token with the same bytes;
//! entries that map to no id are left out (they stay in the unknown remainder).

use std::collections::HashMap;

use serde_json::{json, Value};

use super::answer::{parse_step, TopEntry};
use super::{prompt, CandidateScorer, ScoreError, Slot, StrategyReport, Work};
use crate::record::{Endpoint, TopLogprob};

/// Checks that `/v1/chat/completions` answers with per-token logprobs.
pub(crate) async fn probe(scorer: &CandidateScorer, model: &str) -> Result<(), ScoreError> {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 1,
        "temperature": 0.0,
        "logprobs": true,
        "top_logprobs": 2,
        "stream": false,
    });
    let v = scorer
        .upstream
        .post_json("/v1/chat/completions", &body)
        .await?;
    match v.pointer("/choices/0/logprobs/content") {
        Some(Value::Array(a)) if !a.is_empty() => {
            parse_step(&a[0]).map_err(ScoreError::Unsupported)?;
            Ok(())
        }
        _ => Err(ScoreError::Unsupported(
            "/v1/chat/completions returned no per-token logprobs".into(),
        )),
    }
}

fn entry_bytes(e: &TopEntry) -> Vec<u8> {
    e.bytes
        .clone()
        .unwrap_or_else(|| e.text.as_bytes().to_vec())
}

/// Scores `work` through the chat API; returns the prompt length to record.
pub(crate) async fn run(
    scorer: &CandidateScorer,
    report: &StrategyReport,
    work: &mut Work<'_>,
) -> Result<u32, ScoreError> {
    let main = work.main;
    if main.endpoint != Endpoint::ChatCompletions {
        return Err(ScoreError::Unsupported(format!(
            "the candidate speaks only the chat API: {} responses cannot be scored",
            main.endpoint.as_str()
        )));
    }
    let base = prompt::template_request(&main.request);
    let messages = match base.get("messages") {
        Some(Value::Array(m)) => m.clone(),
        _ => {
            return Err(ScoreError::Unsupported(
                "the chat request has no `messages`".into(),
            ))
        }
    };
    let main_bytes: Vec<Vec<u8>> = main
        .tokens
        .iter()
        .map(|t| {
            t.bytes
                .clone()
                .unwrap_or_else(|| t.text.as_bytes().to_vec())
        })
        .collect();
    let mut by_text: HashMap<&[u8], i32> = HashMap::new();
    for (t, b) in main.tokens.iter().zip(&main_bytes) {
        if !b.is_empty() {
            by_text.entry(b.as_slice()).or_insert(t.id);
        }
    }
    // Whether the candidate's ids are the main's (same vocabulary): decided by the first
    // text-equal token that carries an id, revoked by any later disagreement.
    let mut ids_trusted: Option<bool> = None;
    let mut base_prompt: Option<u64> = None;
    let mut prompt_tokens = main.prompt_tokens.unwrap_or(0);

    let n = work.len();
    let mut s = 0;
    while s < n {
        let Ok(prefix) = String::from_utf8(main_bytes[..s].concat()) else {
            // The prefix ends inside a UTF-8 sequence: it cannot be sent as text.
            work.slots[s] = Some(Slot {
                candidate: None,
                top: Vec::new(),
                pick: None,
                request: 0,
                aligned: false,
            });
            s += 1;
            continue;
        };
        let want = n.saturating_sub(s).min(scorer.max_tokens as usize);
        let mut body = base.clone();
        let mut msgs = messages.clone();
        if s > 0 {
            msgs.push(json!({"role": "assistant", "content": prefix}));
            body.remove("add_generation_prompt");
            body.remove("continue_final_message");
        }
        body.insert("messages".into(), Value::Array(msgs));
        body.insert("model".into(), json!(report.candidate_model));
        body.insert("max_tokens".into(), json!(want));
        body.insert("temperature".into(), json!(0.0));
        body.insert("logprobs".into(), json!(true));
        body.insert("top_logprobs".into(), json!(scorer.n_probs));
        body.insert("stream".into(), json!(false));
        let v = match scorer
            .upstream
            .post_json("/v1/chat/completions", &Value::Object(body))
            .await
        {
            Ok(v) => v,
            Err(e) => {
                work.stop_or_fail(e.into(), s)?;
                break;
            }
        };
        let steps = match v.pointer("/choices/0/logprobs/content") {
            Some(Value::Array(a)) => a
                .iter()
                .map(parse_step)
                .collect::<Result<Vec<_>, _>>()
                .map_err(ScoreError::BadAnswer),
            _ => Err(ScoreError::BadAnswer(
                "chat answer without `choices[0].logprobs.content`".into(),
            )),
        };
        let steps = match steps {
            Ok(st) => st,
            Err(e) => {
                work.stop_or_fail(e, s)?;
                break;
            }
        };
        let pt = v.pointer("/usage/prompt_tokens").and_then(Value::as_u64);
        let decoded = v
            .pointer("/usage/completion_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(steps.len() as u64);
        let request = work.count_request(decoded);
        let context_ok = if s == 0 {
            if let (Some(m), Some(p)) = (main.prompt_tokens, pt) {
                if u64::from(m) != p {
                    return Err(ScoreError::PromptMismatch {
                        main: m,
                        candidate: u32::try_from(p).unwrap_or(u32::MAX),
                    });
                }
            }
            base_prompt = pt;
            if let Some(p) = pt {
                prompt_tokens = u32::try_from(p).unwrap_or(u32::MAX);
            }
            true
        } else {
            match (base_prompt, pt) {
                (Some(b), Some(p)) => p == b + s as u64,
                _ => true,
            }
        };
        if !context_ok {
            tracing::debug!(
                position = s,
                "the candidate re-tokenised the assistant prefix differently; positions unaligned"
            );
        }
        if steps.is_empty() {
            tracing::warn!(
                position = s,
                "the candidate generated nothing; the rest of the response stays uncovered"
            );
            break;
        }
        let mut advanced = 0;
        for (k, step) in steps.iter().take(want).enumerate() {
            let pos = s + k;
            let main_id = work.ids[pos];
            let text_same = entry_bytes(&step.token) == main_bytes[pos];
            if let (Some(cid), true) = (step.token.id, text_same) {
                if ids_trusted.is_none() || cid != main_id {
                    ids_trusted = Some(cid == main_id);
                }
            }
            let trusted = ids_trusted == Some(true);
            let map_id = |e: &TopEntry| -> Option<i32> {
                if trusted {
                    e.id
                } else {
                    by_text.get(entry_bytes(e).as_slice()).copied()
                }
            };
            let same = text_same && (!trusted || step.token.id == Some(main_id));
            let candidate = if same {
                Some(step.token.logprob)
            } else {
                step.top
                    .iter()
                    .find(|t| map_id(t) == Some(main_id))
                    .map(|t| t.logprob)
            };
            let mut top = Vec::with_capacity(step.top.len());
            for t in &step.top {
                if let Some(id) = map_id(t) {
                    top.push(TopLogprob {
                        id,
                        logprob: t.logprob,
                    });
                    work.note_text(id, &t.text);
                }
            }
            let pick = if same {
                Some(main_id)
            } else {
                map_id(&step.token)
            };
            work.slots[pos] = Some(Slot {
                candidate,
                top,
                pick,
                request,
                aligned: context_ok,
            });
            advanced += 1;
            if !same {
                break;
            }
        }
        s += advanced;
    }
    Ok(prompt_tokens)
}
