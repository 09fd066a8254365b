//! Scores a captured main response under the candidate model, position by position, into an
//! [`AlignedRecord`]. [`CandidateScorer`] owns the candidate connection and the strategy chosen
//! by [`CandidateScorer::probe`]; the strategies live in their own files:
//! - [`forced`]: one `/completion` request whose token-id grammar forces the main's tokens
//!   (1 decoded token per main token); falls back to `chunked` where the candidate diverges.
//! - [`chunked`]: the seed's greedy continuations, restarted after each divergence.
//! - [`chat`]: OpenAI chat API only; a partial assistant message continued, aligned by text.
//!
//! Shared here: the prompt (rebuilt with the candidate's `/apply-template` + `/tokenize`,
//! see [`prompt`]), the parsing of `/completion` answers ([`answer`]) and the bookkeeping that
//! turns per-position results into the record ([`Work`]).

mod answer;
mod chat;
mod chunked;
mod forced;
mod merged;
mod prompt;

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;
use tokio::sync::OnceCell;

use crate::config::{Config, StrategyChoice};
use crate::record::{
    AlignedPosition, AlignedRecord, MainResponse, PositionStatus, Strategy, TokenText, TopLogprob,
};
use crate::upstream::{Upstream, UpstreamError};

/// Why a main response could not be scored.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScoreError {
    /// The candidate tokenises the prompt to another length: another tokenizer or template.
    #[error("prompt mismatch: the main counted {main} prompt tokens, the candidate {candidate} (another tokenizer or chat template?)")]
    PromptMismatch { main: u32, candidate: u32 },
    /// The candidate could not be reached (or answered 502/503/504).
    #[error("candidate down: {0}")]
    CandidateDown(String),
    /// A candidate request took longer than `candidate_timeout`.
    #[error("candidate timed out")]
    Timeout,
    /// The candidate answered something that cannot be right.
    #[error("bad candidate answer: {0}")]
    BadAnswer(String),
    /// This response cannot be scored with what the candidate offers.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

impl ScoreError {
    /// A short stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ScoreError::PromptMismatch { .. } => "prompt_mismatch",
            ScoreError::CandidateDown(_) => "candidate_down",
            ScoreError::Timeout => "timeout",
            ScoreError::BadAnswer(_) => "bad_answer",
            ScoreError::Unsupported(_) => "unsupported",
        }
    }
}

impl From<UpstreamError> for ScoreError {
    fn from(e: UpstreamError) -> Self {
        match &e {
            UpstreamError::Connect { .. } => ScoreError::CandidateDown(e.to_string()),
            UpstreamError::Timeout { .. } => ScoreError::Timeout,
            UpstreamError::Status { code, .. } => match code {
                502..=504 => ScoreError::CandidateDown(e.to_string()),
                404 | 405 | 501 => ScoreError::Unsupported(e.to_string()),
                _ => ScoreError::BadAnswer(e.to_string()),
            },
            UpstreamError::BadJson { .. } => ScoreError::BadAnswer(e.to_string()),
        }
    }
}

/// What [`CandidateScorer::probe`] found out about the candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct StrategyReport {
    /// The candidate's model name (`/v1/models`, else `/props`, else `unknown`).
    pub candidate_model: String,
    /// The strategy every comparison uses.
    pub strategy: Strategy,
    /// `/tokenize`, `/apply-template` and `/completion` with a token-id prompt all work.
    pub token_ids: bool,
    /// A token-id grammar forces a token and leaves the reported distribution raw.
    pub grammar_forcing: bool,
    /// Why this strategy, in words (also logged).
    pub reason: String,
}

/// Longest run of tokens forced in one request by default (longer responses take several).
pub const FORCED_MAX_TOKENS: usize = 1024;

/// Scores main responses under the candidate; shared by the queue workers through an `Arc`.
pub struct CandidateScorer {
    /// The candidate server.
    upstream: Upstream,
    /// Top-N asked of the candidate.
    n_probs: u32,
    /// Tokens per request in the chunked strategy (and in chat).
    max_tokens: u32,
    /// The strategy the config asks for.
    choice: StrategyChoice,
    /// Longest run of tokens forced in one request.
    forced_max_tokens: usize,
    /// The probe's result; empty until a probe succeeds (a failed probe is retried later).
    report: OnceCell<StrategyReport>,
}

impl CandidateScorer {
    /// A scorer for the candidate the config names; does no I/O.
    pub fn new(config: &Config) -> Self {
        CandidateScorer::with_upstream(
            Upstream::candidate(config),
            config.n_probs,
            config.candidate_max_tokens,
            config.strategy,
        )
    }

    /// A scorer over an existing client (tests, or a caller that builds its own).
    pub fn with_upstream(
        upstream: Upstream,
        n_probs: u32,
        max_tokens: u32,
        choice: StrategyChoice,
    ) -> Self {
        CandidateScorer {
            upstream,
            n_probs: n_probs.max(1),
            max_tokens: max_tokens.max(1),
            choice,
            forced_max_tokens: FORCED_MAX_TOKENS,
            report: OnceCell::new(),
        }
    }

    /// Forces at most `n` tokens per request (default [`FORCED_MAX_TOKENS`]); a longer
    /// response takes several requests, each continuing from the cached prefix.
    pub fn with_forced_max_tokens(mut self, n: usize) -> Self {
        self.forced_max_tokens = n.max(1);
        self
    }

    /// The probe's result if one has succeeded.
    pub fn report(&self) -> Option<&StrategyReport> {
        self.report.get()
    }

    /// Finds out what the candidate supports and picks the strategy (once: later calls return
    /// the first successful result; a failed probe is retried on the next call).
    pub async fn probe(&self) -> Result<StrategyReport, ScoreError> {
        self.report
            .get_or_try_init(|| self.probe_now())
            .await
            .cloned()
    }

    /// Scores one main response under the candidate.
    pub async fn score(&self, main: &MainResponse) -> Result<AlignedRecord, ScoreError> {
        if let Some(auth) = &main.client_authorization {
            // The client's credential goes with this comparison's requests only.
            let scorer = CandidateScorer {
                upstream: self.upstream.with_authorization(&auth.0),
                n_probs: self.n_probs,
                max_tokens: self.max_tokens,
                choice: self.choice,
                forced_max_tokens: self.forced_max_tokens,
                report: OnceCell::new_with(self.report.get().cloned()),
            };
            return scorer.score_as_configured(main).await;
        }
        self.score_as_configured(main).await
    }

    async fn score_as_configured(&self, main: &MainResponse) -> Result<AlignedRecord, ScoreError> {
        let report = self.probe().await?;
        let started = SystemTime::now();
        let mut work = Work::new(main);
        let prompt_tokens = match report.strategy {
            Strategy::Chat => chat::run(self, &report, &mut work).await?,
            Strategy::Forced | Strategy::Chunked => {
                let prompt = prompt::prompt_ids(&self.upstream, main).await?;
                let count = u32::try_from(prompt.len()).unwrap_or(u32::MAX);
                if let Some(m) = main.prompt_tokens {
                    if m != count {
                        return Err(ScoreError::PromptMismatch {
                            main: m,
                            candidate: count,
                        });
                    }
                }
                if let Some(k) = merged::first_merged(&self.upstream, main).await? {
                    tracing::debug!(
                        position = k,
                        of = main.tokens.len(),
                        "the main's token list skips ids inside a UTF-8 character here; \
                         positions from it on are not compared"
                    );
                    work.cut_at(k);
                }
                if work.len() == 0 {
                    // Nothing left that can be compared.
                } else if report.strategy == Strategy::Forced {
                    forced::run(self, &mut work, &prompt).await?;
                } else {
                    chunked::run(self, &mut work, &prompt, 0).await?;
                }
                count
            }
        };
        let strategy = match report.strategy {
            Strategy::Forced if work.by_chunked > work.by_forced => Strategy::Chunked,
            s => s,
        };
        let time_ms = started
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Ok(work.into_record(
            report.candidate_model.clone(),
            prompt_tokens,
            strategy,
            time_ms,
        ))
    }

    async fn probe_now(&self) -> Result<StrategyReport, ScoreError> {
        let model = self.model_name().await?;
        let mut report = StrategyReport {
            candidate_model: model,
            strategy: Strategy::Chat,
            token_ids: false,
            grammar_forcing: false,
            reason: String::new(),
        };
        if self.choice == StrategyChoice::Chat {
            chat::probe(self, &report.candidate_model).await?;
            report.reason = "strategy `chat` asked for in the config".into();
        } else {
            match self.probe_token_ids().await? {
                Err(why) => {
                    chat::probe(self, &report.candidate_model)
                        .await
                        .map_err(|e| {
                            ScoreError::Unsupported(format!(
                                "token-id scoring unavailable ({why}) and the chat API too ({e})"
                            ))
                        })?;
                    report.reason = format!("token-id scoring unavailable: {why}; using chat");
                }
                Ok(forcing) => {
                    report.token_ids = true;
                    report.grammar_forcing = forcing.is_ok();
                    match (self.choice, forcing) {
                        (StrategyChoice::Forced, Ok(())) => {
                            report.strategy = Strategy::Forced;
                            report.reason =
                                "token-id grammar forcing works and leaves the distribution raw"
                                    .into();
                        }
                        (StrategyChoice::Forced, Err(why)) => {
                            report.strategy = Strategy::Chunked;
                            report.reason =
                                format!("grammar forcing unusable ({why}); using chunked");
                        }
                        _ => {
                            report.strategy = Strategy::Chunked;
                            report.reason = "strategy `chunked` asked for in the config".into();
                        }
                    }
                }
            }
        }
        tracing::info!(
            candidate = %self.upstream.base(),
            model = %report.candidate_model,
            strategy = report.strategy.as_str(),
            reason = %report.reason,
            "candidate probed"
        );
        Ok(report)
    }

    /// The candidate's model name: `/v1/models` (`data[0].id`), else `/props`.
    async fn model_name(&self) -> Result<String, ScoreError> {
        match self.upstream.get_json("/v1/models").await {
            Ok(v) => {
                if let Some(id) = v.pointer("/data/0/id").and_then(|x| x.as_str()) {
                    return Ok(id.to_owned());
                }
            }
            Err(
                e @ (UpstreamError::Connect { .. }
                | UpstreamError::Timeout { .. }
                | UpstreamError::Status {
                    code: 502..=504, ..
                }),
            ) => return Err(e.into()),
            Err(_) => {}
        }
        if let Ok(v) = self.upstream.get_json("/props").await {
            for key in ["/model_alias", "/model_path"] {
                if let Some(p) = v.pointer(key).and_then(|x| x.as_str()) {
                    if !p.is_empty() {
                        let name = p.rsplit('/').next().unwrap_or(p);
                        return Ok(name.to_owned());
                    }
                }
            }
        }
        Ok("unknown".to_owned())
    }

    /// Checks the token-id path. Outer `Err`: the candidate is unreachable (retry later).
    /// `Ok(Err(why))`: no token-id scoring. `Ok(Ok(forcing))`: token ids work; `forcing` says
    /// whether a token-id grammar forces a token with the raw distribution reported.
    async fn probe_token_ids(&self) -> Result<Result<Result<(), String>, String>, ScoreError> {
        let soft = |e: UpstreamError| -> Result<String, ScoreError> {
            match e {
                UpstreamError::Connect { .. } | UpstreamError::Timeout { .. } => Err(e.into()),
                // 502-504: down or still loading its model ("Loading model"): retry later.
                UpstreamError::Status {
                    code: 502..=504, ..
                } => Err(e.into()),
                other => Ok(other.to_string()),
            }
        };
        let probe_request = json!({
            "messages": [{"role": "user", "content": "Name a colour."}]
        });
        let prompt = match self
            .upstream
            .post_json("/apply-template", &probe_request)
            .await
        {
            Ok(v) => match v.get("prompt").and_then(|p| p.as_str()) {
                Some(p) => p.to_owned(),
                None => return Ok(Err("/apply-template answered without `prompt`".into())),
            },
            Err(e) => return Ok(Err(soft(e)?)),
        };
        let ids = match prompt::tokenize(&self.upstream, &json!(prompt)).await {
            Ok(ids) if !ids.is_empty() => ids,
            Ok(_) => return Ok(Err("/tokenize returned no tokens".into())),
            Err(ScoreError::CandidateDown(m)) => return Err(ScoreError::CandidateDown(m)),
            Err(ScoreError::Timeout) => return Err(ScoreError::Timeout),
            Err(e) => return Ok(Err(e.to_string())),
        };
        let n_probs = self.n_probs.max(2);
        let free = match self.complete(&ids, 1, n_probs, None).await {
            Ok(a) => a,
            Err(ScoreError::CandidateDown(m)) => return Err(ScoreError::CandidateDown(m)),
            Err(ScoreError::Timeout) => return Err(ScoreError::Timeout),
            Err(e) => return Ok(Err(format!("/completion with a token-id prompt: {e}"))),
        };
        if free.tokens_evaluated != ids.len() as u64 || free.steps.len() != 1 {
            return Ok(Err(format!(
                "/completion with a token-id prompt of {} tokens evaluated {} and returned {} tokens",
                ids.len(),
                free.tokens_evaluated,
                free.steps.len()
            )));
        }
        let top = &free.steps[0].top;
        // Force a token the candidate would not pick (never an end-of-generation token: those
        // have no text and cannot be named in a grammar).
        let Some(second) = top.iter().skip(1).find(|t| !t.text.is_empty()) else {
            return Ok(Ok(Err("the top list has no second token with text".into())));
        };
        let grammar = forced::grammar(&[second.id]);
        let forced = match self.complete(&ids, 1, n_probs, Some(&grammar)).await {
            Ok(a) => a,
            Err(ScoreError::CandidateDown(m)) => return Err(ScoreError::CandidateDown(m)),
            Err(ScoreError::Timeout) => return Err(ScoreError::Timeout),
            Err(e) => return Ok(Ok(Err(format!("a token-id grammar was refused: {e}")))),
        };
        let Some(step) = forced.steps.first() else {
            return Ok(Ok(Err("the forced request returned no token".into())));
        };
        if step.id != second.id {
            return Ok(Ok(Err(format!(
                "the grammar did not force token {} (got {})",
                second.id, step.id
            ))));
        }
        if (step.logprob - second.logprob).abs() > 0.05
            || step.top.first().map(|t| t.id) != top.first().map(|t| t.id)
        {
            return Ok(Ok(Err(format!(
                "the forced token's distribution is not the raw one (logprob {} vs {})",
                step.logprob, second.logprob
            ))));
        }
        Ok(Ok(Ok(())))
    }

    /// One `/completion` request: greedy, top-`n_probs`, raw probabilities, token ids back.
    async fn complete(
        &self,
        prompt: &[i32],
        n_predict: usize,
        n_probs: u32,
        grammar: Option<&str>,
    ) -> Result<answer::Completion, ScoreError> {
        let mut body = json!({
            "prompt": prompt,
            "n_predict": n_predict,
            "n_probs": n_probs,
            "temperature": 0.0,
            "post_sampling_probs": false,
            "return_tokens": true,
            "cache_prompt": true,
            "stream": false,
        });
        if let Some(g) = grammar {
            body["grammar"] = json!(g);
        }
        let v = self.upstream.post_json("/completion", &body).await?;
        answer::parse_completion(&v).map_err(ScoreError::BadAnswer)
    }
}

/// What one candidate request said about one position.
#[derive(Debug, Clone)]
struct Slot {
    candidate: Option<f32>,
    top: Vec<TopLogprob>,
    pick: Option<i32>,
    request: u32,
    aligned: bool,
}

/// The comparison being built: one slot per main token, plus the costs.
struct Work<'a> {
    main: &'a MainResponse,
    /// The main's token ids, in order.
    ids: Vec<i32>,
    slots: Vec<Option<Slot>>,
    requests: u32,
    decoded: u32,
    /// Positions filled by forced and by chunked requests (which strategy "produced most").
    by_forced: usize,
    by_chunked: usize,
    /// Candidate token texts seen (main texts take precedence in the record).
    texts: BTreeMap<i32, String>,
    /// Where the main's reported tokens stop being the tokens it generated (see
    /// [`merged`]): only positions before it are scored; the rest are `Unaligned`.
    cut: Option<usize>,
}

impl<'a> Work<'a> {
    fn new(main: &'a MainResponse) -> Self {
        Work {
            main,
            ids: main.tokens.iter().map(|t| t.id).collect(),
            slots: vec![None; main.tokens.len()],
            requests: 0,
            decoded: 0,
            by_forced: 0,
            by_chunked: 0,
            texts: BTreeMap::new(),
            cut: None,
        }
    }

    /// Scores only the first `k` positions; the rest are marked `Unaligned`.
    fn cut_at(&mut self, k: usize) {
        self.ids.truncate(k);
        self.slots.truncate(k);
        self.cut = Some(k);
    }

    fn len(&self) -> usize {
        self.ids.len()
    }

    /// Counts a request and returns its 1-based number.
    fn count_request(&mut self, decoded: u64) -> u32 {
        self.requests += 1;
        self.decoded = self
            .decoded
            .saturating_add(u32::try_from(decoded).unwrap_or(u32::MAX));
        self.requests
    }

    fn note_text(&mut self, id: i32, text: &str) {
        self.texts.entry(id).or_insert_with(|| text.to_owned());
    }

    /// Records the candidate's answer at aligned position `pos`: its top list (and the texts
    /// of its tokens), its logprob of the main's token, and what it picked.
    fn fill(
        &mut self,
        pos: usize,
        step: &answer::IdStep,
        candidate: Option<f32>,
        pick: Option<i32>,
        request: u32,
    ) {
        for t in &step.top {
            self.note_text(t.id, &t.text);
        }
        self.slots[pos] = Some(Slot {
            candidate,
            top: step
                .top
                .iter()
                .map(|t| TopLogprob {
                    id: t.id,
                    logprob: t.logprob,
                })
                .collect(),
            pick,
            request,
            aligned: true,
        });
    }

    /// A request failed at position `pos`. Before anything was covered the comparison fails;
    /// after, an answer the candidate could not give (context full, a refused request) ends
    /// it early and the rest stays `Uncovered`. An unreachable or slow candidate always fails.
    fn stop_or_fail(&self, e: ScoreError, pos: usize) -> Result<(), ScoreError> {
        let covered = self.slots.iter().any(Option::is_some);
        match e {
            ScoreError::BadAnswer(_) | ScoreError::Unsupported(_) if covered => {
                tracing::warn!(
                    position = pos,
                    of = self.len(),
                    error = %e,
                    "candidate scoring stopped early; the rest stays uncovered"
                );
                Ok(())
            }
            e => Err(e),
        }
    }

    /// Where the candidate emitted the main's token id, its bytes must be the main's: otherwise
    /// the two servers do not share a vocabulary and ids mean different things.
    fn check_same_token(&self, pos: usize, step: &answer::IdStep) -> Result<(), ScoreError> {
        let main = &self.main.tokens[pos];
        let differs = match (&main.bytes, &step.bytes) {
            (Some(a), Some(b)) => !a.is_empty() && !b.is_empty() && a != b,
            _ => {
                !main.text.is_empty()
                    && !step.text.is_empty()
                    && !main.text.contains('\u{FFFD}')
                    && main.text != step.text
            }
        };
        if differs {
            return Err(ScoreError::Unsupported(format!(
                "the candidate's vocabulary differs: token {} is {:?} there and {:?} in the main",
                step.id, step.text, main.text
            )));
        }
        Ok(())
    }

    fn into_record(
        self,
        candidate_model: String,
        prompt_tokens: u32,
        strategy: Strategy,
        time_ms: u64,
    ) -> AlignedRecord {
        let main = self.main;
        let mut texts = self.texts;
        for t in &main.tokens {
            texts.insert(t.id, t.text.clone());
        }
        let mut slots = self.slots.into_iter();
        let cut = self.cut;
        let positions = main
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let slot = slots.next().flatten();
                let status = if t.is_speculative() {
                    PositionStatus::Speculative
                } else if cut.is_some_and(|k| i >= k) {
                    PositionStatus::Unaligned
                } else {
                    match &slot {
                        Some(s) if s.aligned => PositionStatus::Aligned,
                        Some(_) => PositionStatus::Unaligned,
                        None => PositionStatus::Uncovered,
                    }
                };
                let slot = slot.unwrap_or(Slot {
                    candidate: None,
                    top: Vec::new(),
                    pick: None,
                    request: 0,
                    aligned: false,
                });
                AlignedPosition {
                    index: i as u32,
                    main: TopLogprob {
                        id: t.id,
                        logprob: t.logprob,
                    },
                    main_top: t.top.clone(),
                    candidate: slot.candidate,
                    candidate_top: slot.top,
                    candidate_pick: slot.pick,
                    request: slot.request,
                    status,
                }
            })
            .collect();
        AlignedRecord {
            id: format!("{:016x}", rand::random::<u64>()),
            time_ms,
            endpoint: main.endpoint,
            main_model: main.model.clone(),
            candidate_model,
            prompt_tokens,
            strategy,
            candidate_requests: self.requests,
            candidate_tokens_decoded: self.decoded,
            finish_reason: main.finish_reason.clone(),
            positions,
            texts: texts
                .into_iter()
                .map(|(id, text)| TokenText { id, text })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_stable_labels() {
        assert_eq!(
            ScoreError::PromptMismatch {
                main: 1,
                candidate: 2
            }
            .reason(),
            "prompt_mismatch"
        );
        assert_eq!(ScoreError::Timeout.reason(), "timeout");
        let down: ScoreError = UpstreamError::Status {
            url: "u".into(),
            code: 503,
            body: "loading".into(),
        }
        .into();
        assert_eq!(down.reason(), "candidate_down");
        let bad: ScoreError = UpstreamError::Status {
            url: "u".into(),
            code: 400,
            body: "x".into(),
        }
        .into();
        assert_eq!(bad.reason(), "bad_answer");
    }
}
