//! The data the pipeline hands from stage to stage: the main model's captured answer
//! ([`MainResponse`], built by `capture`) and the comparison of it with the candidate
//! ([`AlignedRecord`], built by `candidate`, consumed by `plugins`).
//!
//! Token ids are `i32` as llama.cpp reports them; log-probabilities are natural-log `f32`.

use serde::{Deserialize, Serialize};

/// Which scored endpoint a request went to; each has its own request and response shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Endpoint {
    /// OpenAI `POST /v1/chat/completions` (also `/chat/completions`).
    ChatCompletions,
    /// OpenAI `POST /v1/completions` (also `/completions`).
    Completions,
    /// llama.cpp's native `POST /completion`.
    Completion,
}

impl Endpoint {
    /// The path as users know it, used in logs, metrics and records.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Completion => "/completion",
        }
    }

    /// The scored endpoint a request path names, if any (query string excluded).
    pub fn from_path(path: &str) -> Option<Endpoint> {
        match path.trim_end_matches('/') {
            "/v1/chat/completions" | "/chat/completions" => Some(Endpoint::ChatCompletions),
            "/v1/completions" | "/completions" => Some(Endpoint::Completions),
            "/completion" => Some(Endpoint::Completion),
            _ => None,
        }
    }
}

/// One entry of a top-N list: a token and its log-probability under the model that listed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    /// Token id in the model's vocabulary.
    pub id: i32,
    /// Natural-log probability, from the raw distribution (before sampling settings).
    pub logprob: f32,
}

/// One token the main model generated, with everything its server reported about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MainToken {
    /// Token id (llama.cpp reports it; OpenAI-compatible servers that do not are not scorable by id).
    pub id: i32,
    /// Token text as the server decoded it (may be a partial UTF-8 sequence rendered lossily).
    pub text: String,
    /// Raw bytes of the token when the server gives them (exact even for partial UTF-8).
    pub bytes: Option<Vec<u8>>,
    /// Log-probability of this token under the main model.
    pub logprob: f32,
    /// The main model's top-N at this position, most probable first.
    pub top: Vec<TopLogprob>,
}

impl MainToken {
    /// llama.cpp reports tokens accepted from a speculative draft with logprob 0 and no top list:
    /// such rows carry no distribution and must never be averaged in.
    pub fn is_speculative(&self) -> bool {
        self.logprob == 0.0 && self.top.is_empty()
    }
}

/// The main model's answer to one scored request, captured by the tee on the response path.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MainResponse {
    /// Which endpoint answered.
    pub endpoint: Endpoint,
    /// The client's request body as sent to the target (after `n_probs` injection): the
    /// candidate rebuilds the same prompt from it (messages, tools, template options).
    pub request: serde_json::Value,
    /// `model` as the target reported it.
    pub model: String,
    /// Prompt length in tokens as the target counted it (`usage.prompt_tokens` or
    /// `tokens_evaluated`); `None` when the server did not say.
    pub prompt_tokens: Option<u32>,
    /// Every generated token in order, including the final EOS token when the server reports it.
    pub tokens: Vec<MainToken>,
    /// `finish_reason` (`stop`, `length`, ...) or llama.cpp's `stop_type`.
    pub finish_reason: Option<String>,
    /// Whether the response came as an SSE stream.
    pub streamed: bool,
    /// Tokens the target says it generated (`usage.completion_tokens`, `timings.predicted_n`,
    /// `tokens_predicted`). More than `tokens.len()` means llama-server merged the entries of
    /// tokens that end inside a UTF-8 character into the next one: ids are missing there.
    #[serde(default)]
    pub generated_tokens: Option<u32>,
    /// The client's `Authorization`, kept only with `forward_client_auth_to_candidate: true`
    /// (never serialised, never printed).
    #[serde(skip)]
    pub client_authorization: Option<Secret>,
}

/// A credential: its `Debug` never shows the value, so it cannot reach a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// How the candidate was made to score the main response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// One `/completion` request with a token-id grammar forcing the main's tokens.
    Forced,
    /// Greedy continuations of at most `candidate_max_tokens`, restarted after each divergence.
    Chunked,
    /// OpenAI chat API only: a partial assistant message continued, aligned by token text.
    Chat,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Forced => "forced",
            Strategy::Chunked => "chunked",
            Strategy::Chat => "chat",
        }
    }
}

/// Whether a position's two distributions can be compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PositionStatus {
    /// Both distributions are conditioned on exactly the same tokens.
    Aligned,
    /// The candidate's context could not be lined up with the main's here: never compared.
    Unaligned,
    /// The main row came from speculative decoding (logprob 0, no top list): no distribution.
    Speculative,
    /// No candidate request covered this position (the comparison stopped early).
    Uncovered,
}

/// One position of the main response, with both models' view of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlignedPosition {
    /// 0-based position in the main response.
    pub index: u32,
    /// The token the main model emitted here.
    pub main: TopLogprob,
    /// The main model's top-N here, most probable first.
    pub main_top: Vec<TopLogprob>,
    /// The candidate's log-probability of the main's token here, when it reported it.
    pub candidate: Option<f32>,
    /// The candidate's top-N here, most probable first (empty when not aligned).
    pub candidate_top: Vec<TopLogprob>,
    /// The token the candidate itself chose here: its generated token (chunked / chat) or its
    /// argmax (forced, where the grammar makes it emit the main's token).
    pub candidate_pick: Option<i32>,
    /// 1-based number of the candidate request that covered this position (0: none).
    pub request: u32,
    /// Whether the two distributions here may be compared.
    pub status: PositionStatus,
}

/// A main response scored under the candidate, position by position: what the comparators get.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlignedRecord {
    /// Unique id of this comparison.
    pub id: String,
    /// When the main response completed, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The endpoint the client called.
    pub endpoint: Endpoint,
    /// The main model's name as its server reported it.
    pub main_model: String,
    /// The candidate model's name as its server reported it.
    pub candidate_model: String,
    /// Prompt length in tokens (the same for both models, or the comparison fails).
    pub prompt_tokens: u32,
    /// The strategy that produced most positions (forced falls back to chunked on a mismatch).
    pub strategy: Strategy,
    /// Candidate requests the comparison took.
    pub candidate_requests: u32,
    /// Tokens the candidate decoded in all (the measure of its cost).
    pub candidate_tokens_decoded: u32,
    /// `finish_reason` of the main response.
    pub finish_reason: Option<String>,
    /// One entry per main token, in order.
    pub positions: Vec<AlignedPosition>,
    /// Text of each distinct token id that appears in the record, once.
    pub texts: Vec<TokenText>,
}

/// The text of one token id (a table, so per-position data stays numeric).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenText {
    pub id: i32,
    pub text: String,
}

impl AlignedRecord {
    /// Positions whose two distributions may be compared.
    pub fn aligned(&self) -> impl Iterator<Item = &AlignedPosition> {
        self.positions
            .iter()
            .filter(|p| p.status == PositionStatus::Aligned)
    }

    /// Fraction of positions that are aligned (1.0 for an empty response).
    pub fn coverage(&self) -> f64 {
        if self.positions.is_empty() {
            return 1.0;
        }
        self.aligned().count() as f64 / self.positions.len() as f64
    }

    /// Fraction of aligned positions where the candidate's pick is the main's token.
    pub fn top1_agreement(&self) -> Option<f64> {
        let (mut n, mut same) = (0usize, 0usize);
        for p in self.aligned() {
            n += 1;
            if p.candidate_pick == Some(p.main.id) {
                same += 1;
            }
        }
        (n > 0).then(|| same as f64 / n as f64)
    }
}
