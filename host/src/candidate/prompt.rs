//! The main request's prompt as the candidate's token ids: for chat, the candidate's own chat
//! template (`/apply-template` with every request field that shapes it) then `/tokenize`; for
//! `/v1/completions` and `/completion`, the request's `prompt` (text, token ids, or a mix)
//! through `/tokenize`, the way llama-server tokenises prompts (`add_special`, `parse_special`).

use serde_json::{json, Map, Value};

use super::ScoreError;
use crate::record::{Endpoint, MainResponse};
use crate::upstream::Upstream;

/// Request fields that shape the chat template's output (llama-server's
/// `oaicompat_chat_params_parse`), `messages` included.
pub(crate) const TEMPLATE_FIELDS: &[&str] = &[
    "messages",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "add_generation_prompt",
    "continue_final_message",
    "chat_template_kwargs",
    "reasoning_format",
    "reasoning_effort",
    "response_format",
    "json_schema",
    "grammar",
];

/// The template-shaping fields of a chat request, as a new request body.
pub(crate) fn template_request(request: &Value) -> Map<String, Value> {
    let mut out = Map::new();
    if let Some(obj) = request.as_object() {
        for k in TEMPLATE_FIELDS {
            if let Some(v) = obj.get(*k) {
                out.insert((*k).to_owned(), v.clone());
            }
        }
    }
    out
}

/// The candidate's token ids for the main request's prompt.
pub(crate) async fn prompt_ids(up: &Upstream, main: &MainResponse) -> Result<Vec<i32>, ScoreError> {
    match main.endpoint {
        Endpoint::ChatCompletions => {
            let body = template_request(&main.request);
            if !body.contains_key("messages") {
                return Err(ScoreError::Unsupported(
                    "the chat request has no `messages`".into(),
                ));
            }
            let v = up
                .post_json("/apply-template", &Value::Object(body))
                .await?;
            let prompt = v.get("prompt").and_then(Value::as_str).ok_or_else(|| {
                ScoreError::BadAnswer("/apply-template answered without a `prompt` string".into())
            })?;
            tokenize(up, &json!(prompt)).await
        }
        Endpoint::Completions | Endpoint::Completion => {
            let prompt = main.request.get("prompt").ok_or_else(|| {
                ScoreError::Unsupported("the completion request has no `prompt`".into())
            })?;
            let prompt = single_prompt(prompt)?;
            tokenize(up, prompt).await
        }
    }
}

/// The one prompt of a completion request, as llama-server reads `prompt`: a string; a list
/// holding any number is one prompt (ids, or ids mixed with text); any other list is a list
/// of prompts, scorable only when it holds exactly one.
fn single_prompt(prompt: &Value) -> Result<&Value, ScoreError> {
    match prompt {
        Value::String(_) => Ok(prompt),
        Value::Array(a) if a.iter().any(Value::is_number) => {
            if a.iter().all(|x| x.is_string() || x.is_i64()) {
                Ok(prompt)
            } else {
                Err(ScoreError::Unsupported(
                    "the prompt mixes token ids with something other than text".into(),
                ))
            }
        }
        Value::Array(a) if a.len() == 1 => single_prompt(&a[0]),
        Value::Array(a) => Err(ScoreError::Unsupported(format!(
            "a request with {} prompts is not scored",
            a.len()
        ))),
        _ => Err(ScoreError::Unsupported(
            "the prompt is neither text nor token ids (multimodal?)".into(),
        )),
    }
}

/// `/tokenize` with BOS/EOS as the model adds them and special tokens parsed.
pub(crate) async fn tokenize(up: &Upstream, content: &Value) -> Result<Vec<i32>, ScoreError> {
    let v = up
        .post_json(
            "/tokenize",
            &json!({"content": content, "add_special": true, "parse_special": true}),
        )
        .await?;
    let tokens = v
        .get("tokens")
        .and_then(Value::as_array)
        .ok_or_else(|| ScoreError::BadAnswer("/tokenize answered without `tokens`".into()))?;
    tokens
        .iter()
        .map(|t| {
            t.as_i64()
                .and_then(|i| i32::try_from(i).ok())
                .ok_or_else(|| ScoreError::BadAnswer(format!("/tokenize returned {t}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_fields_are_kept_and_the_rest_dropped() {
        let req = json!({"model": "m", "messages": [], "tools": [], "n_probs": 10,
                         "chat_template_kwargs": {"enable_thinking": false}, "temperature": 0.8});
        let t = template_request(&req);
        let mut keys: Vec<_> = t.keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["chat_template_kwargs", "messages", "tools"]);
    }

    #[test]
    fn prompts_are_one_text_or_one_id_list() {
        assert!(single_prompt(&json!("hi")).is_ok());
        assert!(single_prompt(&json!([1, 2, "x"])).is_ok());
        assert_eq!(single_prompt(&json!([[1, 2]])).unwrap(), &json!([1, 2]));
        assert_eq!(single_prompt(&json!(["x"])).unwrap(), &json!("x"));
        assert!(single_prompt(&json!(["a", "b"])).is_err());
        assert!(single_prompt(&json!([[1], [2]])).is_err());
        assert!(single_prompt(&json!({"prompt_string": "x"})).is_err());
    }
}
