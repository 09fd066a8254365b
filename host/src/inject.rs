//! Rewrites a scored request before it goes to the target: asks for the top-N
//! log-probabilities the comparison needs (`n_probs`), and works out what the client itself
//! asked for, so that the response can be given back to it as if the proxy were not there
//! ([`ResponseEdit`]).

use serde_json::{Map, Value};

use crate::record::Endpoint;

/// What to change in the response before the client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseEdit {
    /// The client asked for at least what was injected: pass the bytes through untouched.
    None,
    /// The client asked for no logprobs: remove them.
    Strip,
    /// The client asked for a shorter top list than was injected: cut each list to this length.
    TrimTop(usize),
}

/// A scored request after rewriting.
#[derive(Debug)]
pub struct PreparedRequest {
    /// The body to send to the target.
    pub body: Map<String, Value>,
    /// Whether the client asked for a streamed (SSE) answer.
    pub stream: bool,
    /// What to do to the response on its way back.
    pub edit: ResponseEdit,
}

/// How many top log-probabilities the client asked for, if it asked at all.
pub fn client_top_n(endpoint: Endpoint, body: &Map<String, Value>) -> Option<usize> {
    let n_probs = body
        .get("n_probs")
        .and_then(Value::as_u64)
        .filter(|&n| n > 0);
    let openai = match endpoint {
        Endpoint::ChatCompletions => match body.get("logprobs") {
            Some(Value::Bool(true)) => Some(
                body.get("top_logprobs")
                    .and_then(Value::as_u64)
                    .unwrap_or(0),
            ),
            _ => None,
        },
        // The legacy completions API takes `logprobs: <int>`.
        Endpoint::Completions => body.get("logprobs").and_then(Value::as_u64),
        Endpoint::Completion => None,
    };
    match (n_probs, openai) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0).max(b.unwrap_or(0)) as usize),
    }
}

/// Sets `n_probs` (and, where the client's own OpenAI fields would override it in
/// llama-server, those too) so that the target reports at least `n_probs` alternatives, and
/// decides how to edit the response for the client.
pub fn prepare(
    endpoint: Endpoint,
    mut body: Map<String, Value>,
    n_probs: u32,
    strip_logprobs: bool,
) -> PreparedRequest {
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let asked = client_top_n(endpoint, &body);
    let n = n_probs as usize;
    let effective = asked.unwrap_or(0).max(n);
    body.insert("n_probs".into(), Value::from(effective));
    // llama-server maps OpenAI `logprobs: true, top_logprobs: k` onto n_probs and lets it win
    // over a body `n_probs`: raise it too so that the injected value holds.
    if endpoint == Endpoint::ChatCompletions && body.get("logprobs") == Some(&Value::Bool(true)) {
        body.insert("top_logprobs".into(), Value::from(effective));
    }
    if endpoint == Endpoint::Completions && body.get("logprobs").is_some_and(Value::is_u64) {
        body.insert("logprobs".into(), Value::from(effective));
    }
    let edit = match asked {
        None if strip_logprobs => ResponseEdit::Strip,
        None => ResponseEdit::None,
        Some(k) if k < n => ResponseEdit::TrimTop(k),
        Some(_) => ResponseEdit::None,
    };
    PreparedRequest { body, stream, edit }
}

/// Applies `edit` to one response object (a whole JSON answer or one SSE chunk).
/// Returns whether anything changed.
pub fn edit_response(endpoint: Endpoint, edit: ResponseEdit, obj: &mut Map<String, Value>) -> bool {
    match edit {
        ResponseEdit::None => false,
        ResponseEdit::Strip => match endpoint {
            Endpoint::Completion => obj.remove("completion_probabilities").is_some(),
            Endpoint::ChatCompletions | Endpoint::Completions => {
                let mut changed = false;
                if let Some(Value::Array(choices)) = obj.get_mut("choices") {
                    for c in choices.iter_mut().filter_map(Value::as_object_mut) {
                        if let Some(lp) = c.get_mut("logprobs") {
                            if !lp.is_null() {
                                *lp = Value::Null;
                                changed = true;
                            }
                        }
                    }
                }
                changed
            }
        },
        ResponseEdit::TrimTop(k) => {
            let mut changed = false;
            let mut trim = |entries: &mut Vec<Value>| {
                for e in entries.iter_mut().filter_map(Value::as_object_mut) {
                    for key in ["top_logprobs", "top_probs"] {
                        if let Some(Value::Array(top)) = e.get_mut(key) {
                            if top.len() > k {
                                top.truncate(k);
                                changed = true;
                            }
                        }
                    }
                }
            };
            match endpoint {
                Endpoint::Completion => {
                    if let Some(Value::Array(entries)) = obj.get_mut("completion_probabilities") {
                        trim(entries);
                    }
                }
                Endpoint::ChatCompletions | Endpoint::Completions => {
                    if let Some(Value::Array(choices)) = obj.get_mut("choices") {
                        for c in choices.iter_mut() {
                            if let Some(Value::Array(entries)) = c.pointer_mut("/logprobs/content")
                            {
                                trim(entries);
                            }
                        }
                    }
                }
            }
            changed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn injects_n_probs_and_strips_for_a_client_that_did_not_ask() {
        let p = prepare(
            Endpoint::ChatCompletions,
            obj(json!({"messages": []})),
            10,
            true,
        );
        assert_eq!(p.body["n_probs"], 10);
        assert_eq!(p.edit, ResponseEdit::Strip);
        assert!(!p.stream);
        let p = prepare(
            Endpoint::ChatCompletions,
            obj(json!({"messages": []})),
            10,
            false,
        );
        assert_eq!(p.edit, ResponseEdit::None);
    }

    #[test]
    fn keeps_a_larger_client_request_and_trims_a_smaller_one() {
        let p = prepare(
            Endpoint::Completion,
            obj(json!({"n_probs": 20, "stream": true})),
            10,
            true,
        );
        assert_eq!(p.body["n_probs"], 20);
        assert_eq!(p.edit, ResponseEdit::None);
        assert!(p.stream);
        let p = prepare(
            Endpoint::ChatCompletions,
            obj(json!({"logprobs": true, "top_logprobs": 3})),
            10,
            true,
        );
        assert_eq!(p.body["n_probs"], 10);
        assert_eq!(p.body["top_logprobs"], 10);
        assert_eq!(p.edit, ResponseEdit::TrimTop(3));
    }

    #[test]
    fn edits_chat_and_completion_answers() {
        let mut chat = obj(json!({"choices": [{"index": 0, "logprobs": {"content": [
            {"id": 1, "logprob": -0.1, "top_logprobs": [{"id": 1}, {"id": 2}, {"id": 3}]}]}}]}));
        let mut trimmed = chat.clone();
        assert!(edit_response(
            Endpoint::ChatCompletions,
            ResponseEdit::TrimTop(2),
            &mut trimmed
        ));
        assert_eq!(
            trimmed["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        assert!(edit_response(
            Endpoint::ChatCompletions,
            ResponseEdit::Strip,
            &mut chat
        ));
        assert!(chat["choices"][0]["logprobs"].is_null());
        let mut native = obj(json!({"content": "x", "completion_probabilities": []}));
        assert!(edit_response(
            Endpoint::Completion,
            ResponseEdit::Strip,
            &mut native
        ));
        assert!(!native.contains_key("completion_probabilities"));
    }
}
