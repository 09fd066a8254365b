//! The tee on the response path. [`TeeBody`] wraps the target's response body: it passes
//! every frame to the client as it arrives, while a [`Capture`] reads the same bytes (JSON or
//! SSE) into a [`MainResponse`]. When the client did not ask for logprobs, the SSE events
//! (or the JSON answer) are edited on the way through ([`crate::inject::edit_response`]).
//! A complete, clean response is handed to the comparison queue; a failed or abandoned one
//! never is.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use serde_json::{Map, Value};

use crate::inject::{edit_response, ResponseEdit};
use crate::queue::ComparisonQueue;
use crate::record::{Endpoint, MainResponse, MainToken, TopLogprob};

/// Reads one token entry as llama-server reports it (`{id, token, bytes, logprob,
/// top_logprobs: [...]}`), in chat, legacy completions and native `/completion` answers.
pub fn parse_token_entry(v: &Value) -> Option<MainToken> {
    let o = v.as_object()?;
    let id = o.get("id")?.as_i64()? as i32;
    let logprob = o
        .get("logprob")
        .and_then(Value::as_f64)
        .or_else(|| o.get("prob").and_then(Value::as_f64).map(f64::ln))? as f32;
    let text = o
        .get("token")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let bytes = o.get("bytes").and_then(Value::as_array).map(|b| {
        b.iter()
            .filter_map(Value::as_u64)
            .map(|x| x as u8)
            .collect::<Vec<u8>>()
    });
    let top = o
        .get("top_logprobs")
        .or_else(|| o.get("top_probs"))
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(|t| {
                    let t = t.as_object()?;
                    let id = t.get("id")?.as_i64()? as i32;
                    let logprob = t
                        .get("logprob")
                        .and_then(Value::as_f64)
                        .or_else(|| t.get("prob").and_then(Value::as_f64).map(f64::ln))?;
                    Some(TopLogprob {
                        id,
                        logprob: logprob as f32,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Some(MainToken {
        id,
        text,
        bytes,
        logprob,
        top,
    })
}

/// Builds a [`MainResponse`] from the objects of one answer: the whole JSON answer, or each
/// SSE chunk in turn.
#[derive(Debug)]
pub struct Capture {
    response: MainResponse,
    /// Longest response captured; past it the capture is abandoned (the client is unaffected).
    max_tokens: usize,
    /// Something in the answer makes it unusable for comparison (too long, several choices).
    abandoned: bool,
    /// llama-server's final `/completion` chunk and the chat `finish_reason` both mark a
    /// complete answer; without one the response was cut short.
    finished: bool,
}

impl Capture {
    pub fn new(endpoint: Endpoint, request: Value, streamed: bool, max_tokens: usize) -> Capture {
        Capture {
            response: MainResponse {
                endpoint,
                request,
                model: String::new(),
                prompt_tokens: None,
                tokens: Vec::new(),
                finish_reason: None,
                streamed,
                generated_tokens: None,
                client_authorization: None,
            },
            max_tokens,
            abandoned: false,
            finished: false,
        }
    }

    /// Keeps the client's credential for the candidate (`forward_client_auth_to_candidate`).
    pub fn with_client_authorization(mut self, auth: Option<crate::record::Secret>) -> Capture {
        self.response.client_authorization = auth;
        self
    }

    /// Takes in one answer object (a JSON answer or one SSE chunk).
    pub fn observe(&mut self, obj: &Map<String, Value>) {
        if self.abandoned {
            return;
        }
        if let Some(m) = obj.get("model").and_then(Value::as_str) {
            if self.response.model.is_empty() {
                self.response.model = m.to_owned();
            }
        }
        if let Some(n) = obj
            .get("usage")
            .and_then(|u| u.get("prompt_tokens"))
            .and_then(Value::as_u64)
        {
            self.response.prompt_tokens = Some(n as u32);
        } else if let Some(t) = obj
            .get("timings")
            .filter(|_| self.response.prompt_tokens.is_none())
        {
            // A llama-server stream without `usage`: the prompt is what was evaluated now
            // plus what came from the cache.
            let n = |k: &str| t.get(k).and_then(Value::as_u64);
            if let Some(evaluated) = n("prompt_n") {
                self.response.prompt_tokens = Some((evaluated + n("cache_n").unwrap_or(0)) as u32);
            }
        }
        let generated = obj
            .get("usage")
            .and_then(|u| u.get("completion_tokens"))
            .or_else(|| obj.get("timings").and_then(|t| t.get("predicted_n")))
            .or_else(|| obj.get("tokens_predicted"))
            .and_then(Value::as_u64);
        if let Some(n) = generated {
            self.response.generated_tokens = Some(n as u32);
        }
        match self.response.endpoint {
            Endpoint::Completion => {
                if let Some(Value::Array(entries)) = obj.get("completion_probabilities") {
                    self.push_entries(entries);
                }
                if let Some(n) = obj.get("tokens_evaluated").and_then(Value::as_u64) {
                    self.response.prompt_tokens = Some(n as u32);
                }
                if obj.get("stop").and_then(Value::as_bool) == Some(true) {
                    self.finished = true;
                    self.response.finish_reason =
                        obj.get("stop_type")
                            .and_then(Value::as_str)
                            .map(|s| match s {
                                "eos" | "word" => "stop".to_owned(),
                                "limit" => "length".to_owned(),
                                other => other.to_owned(),
                            });
                }
            }
            Endpoint::ChatCompletions | Endpoint::Completions => {
                let Some(Value::Array(choices)) = obj.get("choices") else {
                    return;
                };
                for c in choices {
                    let index = c.get("index").and_then(Value::as_u64).unwrap_or(0);
                    if index != 0 {
                        // n > 1: several answers to one prompt; comparing one would be
                        // arbitrary and the token budget is shared, so leave it out.
                        self.abandoned = true;
                        return;
                    }
                    if let Some(Value::Array(entries)) = c.pointer("/logprobs/content") {
                        self.push_entries(entries);
                    }
                    if let Some(r) = c.get("finish_reason").and_then(Value::as_str) {
                        self.response.finish_reason = Some(r.to_owned());
                        self.finished = true;
                    }
                }
            }
        }
    }

    fn push_entries(&mut self, entries: &[Value]) {
        for e in entries {
            match parse_token_entry(e) {
                Some(t) => self.response.tokens.push(t),
                None => {
                    self.abandoned = true;
                    return;
                }
            }
        }
        if self.response.tokens.len() > self.max_tokens {
            self.abandoned = true;
        }
    }

    /// The captured response, when the answer was complete and usable.
    pub fn finish(self) -> Option<MainResponse> {
        (!self.abandoned && self.finished && !self.response.tokens.is_empty())
            .then_some(self.response)
    }
}

/// Parses a whole (non-streamed) answer; `None` when it has no usable logprobs.
pub fn parse_json_response(
    endpoint: Endpoint,
    request: Value,
    body: &[u8],
) -> Option<MainResponse> {
    let obj: Map<String, Value> = serde_json::from_slice(body).ok()?;
    let mut c = Capture::new(endpoint, request, false, usize::MAX);
    c.observe(&obj);
    c.finish()
}

/// Where a finished capture goes.
pub type CaptureSink = ComparisonQueue;

/// How the response body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// `text/event-stream`: processed line by line as frames arrive.
    Sse,
    /// One JSON document: copied aside (or held, when it must be edited) until complete.
    Json,
}

/// A response body that passes frames through while capturing them.
pub struct TeeBody<B> {
    inner: B,
    kind: BodyKind,
    endpoint: Endpoint,
    edit: ResponseEdit,
    /// `None` once handed over, or when nothing is captured.
    capture: Option<(Capture, CaptureSink)>,
    /// SSE: the bytes of a line not yet complete. JSON: the whole body so far.
    pending: BytesMut,
    /// JSON without edit: the frames as they passed (cheap `Bytes` clones, no copy).
    seen: Vec<Bytes>,
    /// Bytes held in `pending` or `seen`.
    held: usize,
    /// Most bytes held for one response; past it the capture is given up and the rest of
    /// the body passes through as it comes.
    max_held: usize,
    /// Past `max_held`: frames pass through untouched, nothing more is read.
    passthrough: bool,
    done: bool,
}

/// Default bound on the bytes the tee holds for one response (an SSE line, or a JSON answer).
pub const DEFAULT_MAX_HELD: usize = 16 << 20;

impl<B> TeeBody<B> {
    pub fn new(
        inner: B,
        kind: BodyKind,
        endpoint: Endpoint,
        edit: ResponseEdit,
        capture: Option<(Capture, CaptureSink)>,
    ) -> TeeBody<B> {
        TeeBody {
            inner,
            kind,
            endpoint,
            edit,
            capture,
            pending: BytesMut::new(),
            seen: Vec::new(),
            held: 0,
            max_held: DEFAULT_MAX_HELD,
            passthrough: false,
            done: false,
        }
    }

    /// Bounds the bytes held for this response (`max_capture_bytes`).
    pub fn with_max_held(mut self, bytes: usize) -> TeeBody<B> {
        self.max_held = bytes.max(1);
        self
    }

    /// Holding `more` bytes would pass the bound: give up the capture, and return what is
    /// held but not yet sent (an unedited flush) so that the body goes on as it came.
    fn overflow(&mut self, more: usize) -> Option<Bytes> {
        if self.held + more <= self.max_held {
            self.held += more;
            return None;
        }
        tracing::warn!(
            limit = self.max_held,
            "response larger than the capture bound: passed through, not compared"
        );
        self.capture = None;
        self.passthrough = true;
        self.seen.clear();
        self.held = 0;
        let unsent = (self.edit != ResponseEdit::None || self.kind == BodyKind::Sse)
            .then(|| self.pending.split().freeze());
        // Not editing, an SSE partial line was already sent as it came: only drop it.
        if self.edit == ResponseEdit::None {
            return None;
        }
        unsent.filter(|b| !b.is_empty())
    }

    /// SSE: consumes complete lines from `pending`; returns what to send on (edited lines, or
    /// `None` to send the original frame unchanged).
    fn process_sse(&mut self, data: &Bytes) -> Option<Bytes> {
        let editing = self.edit != ResponseEdit::None;
        self.pending.extend_from_slice(data);
        let mut out = editing.then(BytesMut::new);
        while let Some(nl) = memchr::memchr(b'\n', &self.pending) {
            let line = self.pending.split_to(nl + 1).freeze();
            let replaced = self.sse_line(&line, editing);
            if let Some(out) = out.as_mut() {
                out.extend_from_slice(replaced.as_ref().unwrap_or(&line));
            }
        }
        out.map(BytesMut::freeze)
    }

    /// Reads one SSE line; returns its replacement when it was edited.
    fn sse_line(&mut self, line: &[u8], editing: bool) -> Option<Bytes> {
        let payload = line.strip_prefix(b"data:")?;
        let payload = payload.trim_ascii();
        if payload.first() != Some(&b'{') {
            return None;
        }
        let mut obj: Map<String, Value> = serde_json::from_slice(payload).ok()?;
        if let Some((c, _)) = self.capture.as_mut() {
            c.observe(&obj);
        }
        if editing && edit_response(self.endpoint, self.edit, &mut obj) {
            let mut s = b"data: ".to_vec();
            serde_json::to_writer(&mut s, &obj).ok()?;
            // Keep the line ending the target used.
            let ending: &[u8] = if line.ends_with(b"\r\n") {
                b"\r\n"
            } else {
                b"\n"
            };
            s.extend_from_slice(ending);
            return Some(Bytes::from(s));
        }
        None
    }

    /// End of a clean body: finish the capture, and for an edited JSON answer produce the body.
    fn finish(&mut self) -> Option<Bytes> {
        self.done = true;
        if self.passthrough {
            return None;
        }
        let mut tail = None;
        match self.kind {
            BodyKind::Sse => {
                if !self.pending.is_empty() {
                    let line = self.pending.split().freeze();
                    let editing = self.edit != ResponseEdit::None;
                    let replaced = self.sse_line(&line, editing);
                    if editing {
                        tail = Some(replaced.unwrap_or(line));
                    }
                }
            }
            BodyKind::Json => {
                let whole: Bytes = if self.edit != ResponseEdit::None {
                    self.pending.split().freeze()
                } else {
                    let mut b = BytesMut::with_capacity(self.seen.iter().map(Bytes::len).sum());
                    for s in self.seen.drain(..) {
                        b.extend_from_slice(&s);
                    }
                    b.freeze()
                };
                match serde_json::from_slice::<Map<String, Value>>(&whole) {
                    Ok(mut obj) => {
                        if let Some((c, _)) = self.capture.as_mut() {
                            c.observe(&obj);
                        }
                        if self.edit != ResponseEdit::None {
                            let edited = edit_response(self.endpoint, self.edit, &mut obj)
                                .then(|| serde_json::to_vec(&obj).ok())
                                .flatten();
                            tail = Some(edited.map(Bytes::from).unwrap_or(whole));
                        }
                    }
                    Err(_) => {
                        self.capture = None;
                        if self.edit != ResponseEdit::None {
                            tail = Some(whole);
                        }
                    }
                }
            }
        }
        if let Some((c, sink)) = self.capture.take() {
            match c.finish() {
                Some(main) => {
                    tracing::debug!(
                        endpoint = main.endpoint.as_str(),
                        model = %main.model,
                        prompt_tokens = ?main.prompt_tokens,
                        tokens = main.tokens.len(),
                        finish_reason = ?main.finish_reason,
                        streamed = main.streamed,
                        "captured main response"
                    );
                    sink.submit(main)
                }
                None => tracing::debug!("response not usable for comparison"),
            }
        }
        tail.filter(|b| !b.is_empty())
    }
}

impl<B> Body for TeeBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let frame = match frame.into_data() {
                        Ok(data) => data,
                        Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                    };
                    if this.passthrough {
                        return Poll::Ready(Some(Ok(Frame::data(frame))));
                    }
                    let holds = match this.kind {
                        // Only the unfinished line stays; complete lines go at once.
                        BodyKind::Sse => {
                            frame.len()
                                - frame.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)
                        }
                        BodyKind::Json => frame.len(),
                    };
                    let holds = if this.kind == BodyKind::Sse && holds < frame.len() {
                        // A newline arrives: what was pending is released.
                        this.held = 0;
                        holds
                    } else {
                        holds
                    };
                    if let Some(unsent) = this.overflow(holds) {
                        let mut out = BytesMut::from(&unsent[..]);
                        out.extend_from_slice(&frame);
                        return Poll::Ready(Some(Ok(Frame::data(out.freeze()))));
                    }
                    if this.passthrough {
                        return Poll::Ready(Some(Ok(Frame::data(frame))));
                    }
                    match this.kind {
                        BodyKind::Sse => match this.process_sse(&frame) {
                            None => return Poll::Ready(Some(Ok(Frame::data(frame)))),
                            Some(edited) if edited.is_empty() => continue,
                            Some(edited) => return Poll::Ready(Some(Ok(Frame::data(edited)))),
                        },
                        BodyKind::Json if this.edit != ResponseEdit::None => {
                            // The answer must be edited as a whole: hold it.
                            this.pending.extend_from_slice(&frame);
                            continue;
                        }
                        BodyKind::Json => {
                            if this.capture.is_some() {
                                this.seen.push(frame.clone());
                            }
                            return Poll::Ready(Some(Ok(Frame::data(frame))));
                        }
                    }
                }
                Some(Err(e)) => {
                    // Cut short: nothing is compared from a partial response.
                    this.capture = None;
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    return Poll::Ready(this.finish().map(|b| Ok(Frame::data(b))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        if self.edit == ResponseEdit::None {
            self.inner.size_hint()
        } else {
            SizeHint::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_a_token_entry_with_bytes_and_top_list() {
        let t = parse_token_entry(&json!({"id": 42, "token": "Hi", "bytes": [72, 105],
            "logprob": -0.5, "top_logprobs": [{"id": 42, "token": "Hi", "logprob": -0.5},
            {"id": 7, "token": "Yo", "logprob": -1.5}]}))
        .unwrap();
        assert_eq!(t.id, 42);
        assert_eq!(t.bytes.as_deref(), Some(&b"Hi"[..]));
        assert_eq!(t.top.len(), 2);
        assert_eq!(t.top[1].id, 7);
        assert!(!t.is_speculative());
        assert!(parse_token_entry(&json!({"token": "no id"})).is_none());
    }

    #[test]
    fn an_unfinished_answer_is_not_captured() {
        let mut c = Capture::new(Endpoint::ChatCompletions, json!({}), true, 100);
        let chunk = json!({"choices": [{"index": 0, "delta": {"content": "a"},
            "logprobs": {"content": [{"id": 1, "token": "a", "logprob": -0.1, "top_logprobs": []}]}}]});
        c.observe(chunk.as_object().unwrap());
        assert!(c.finish().is_none());
    }

    #[test]
    fn several_choices_are_not_captured() {
        let body = json!({"choices": [
            {"index": 0, "finish_reason": "stop", "logprobs": {"content": [{"id": 1, "logprob": -0.1}]}},
            {"index": 1, "finish_reason": "stop", "logprobs": {"content": [{"id": 2, "logprob": -0.1}]}}]});
        let bytes = serde_json::to_vec(&body).unwrap();
        assert!(parse_json_response(Endpoint::ChatCompletions, json!({}), &bytes).is_none());
    }
}
