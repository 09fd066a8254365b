//! Parsing of llama-server answers the strategies read: the native `/completion` answer
//! (`completion_probabilities`, `tokens_evaluated`, ...) and the per-token entries that
//! `/completion` and the OpenAI `logprobs.content` share. Anything malformed is an error
//! string (the caller turns it into `ScoreError::BadAnswer`), never a panic.

use serde_json::Value;

/// One entry of a top-N list as the candidate reported it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TopEntry {
    /// Token id, when the server gives it (llama-server always does).
    pub id: Option<i32>,
    /// Token text (llama-server cuts an incomplete UTF-8 sequence off).
    pub text: String,
    /// Raw bytes of the token, when given.
    pub bytes: Option<Vec<u8>>,
    pub logprob: f32,
}

/// One generated token with its distribution.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Step {
    pub token: TopEntry,
    pub top: Vec<TopEntry>,
}

/// A token-id [`Step`] (native `/completion`, where ids are always present).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct IdStep {
    pub id: i32,
    pub text: String,
    pub bytes: Option<Vec<u8>>,
    pub logprob: f32,
    pub top: Vec<IdTop>,
}

/// A top entry with its id.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct IdTop {
    pub id: i32,
    pub text: String,
    pub logprob: f32,
}

/// A `/completion` answer, reduced to what scoring needs.
#[derive(Debug, Clone)]
pub(crate) struct Completion {
    /// Prompt tokens the server took in (its whole prompt, cached or not).
    pub tokens_evaluated: u64,
    /// Tokens it decoded.
    pub tokens_predicted: u64,
    /// One entry per generated token.
    pub steps: Vec<IdStep>,
}

fn describe(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 {
        let mut cut = 80;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}...", &s[..cut])
    } else {
        s
    }
}

/// Parses one token entry: `{id?, token, bytes?, logprob, top_logprobs?}`.
pub(crate) fn parse_entry(v: &Value) -> Result<TopEntry, String> {
    if v.get("prob").is_some() && v.get("logprob").is_none() {
        return Err("probabilities are post-sampling (`prob`), not raw `logprob`".into());
    }
    let logprob = v
        .get("logprob")
        .and_then(Value::as_f64)
        .ok_or_else(|| format!("token entry without a numeric `logprob`: {}", describe(v)))?;
    let id = match v.get("id") {
        None | Some(Value::Null) => None,
        Some(x) => Some(
            x.as_i64()
                .and_then(|i| i32::try_from(i).ok())
                .ok_or_else(|| format!("token id is not an integer: {}", describe(v)))?,
        ),
    };
    let text = v
        .get("token")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("token entry without `token` text: {}", describe(v)))?
        .to_owned();
    let bytes = match v.get("bytes") {
        Some(Value::Array(a)) => {
            let mut out = Vec::with_capacity(a.len());
            for b in a {
                out.push(
                    b.as_u64()
                        .and_then(|b| u8::try_from(b).ok())
                        .ok_or_else(|| format!("`bytes` holds a non-byte: {}", describe(v)))?,
                );
            }
            Some(out)
        }
        _ => None,
    };
    Ok(TopEntry {
        id,
        text,
        bytes,
        logprob: logprob as f32,
    })
}

/// Parses a generated-token entry with its `top_logprobs` list.
pub(crate) fn parse_step(v: &Value) -> Result<Step, String> {
    let token = parse_entry(v)?;
    let top = match v.get("top_logprobs") {
        Some(Value::Array(a)) => a.iter().map(parse_entry).collect::<Result<Vec<_>, _>>()?,
        None | Some(Value::Null) => Vec::new(),
        Some(other) => return Err(format!("`top_logprobs` is not a list: {}", describe(other))),
    };
    Ok(Step { token, top })
}

/// Parses a native `/completion` answer requested with `n_probs` and `post_sampling_probs: false`.
pub(crate) fn parse_completion(v: &Value) -> Result<Completion, String> {
    if !v.is_object() {
        return Err(format!("/completion answered {}", describe(v)));
    }
    let tokens_evaluated = v
        .get("tokens_evaluated")
        .and_then(Value::as_u64)
        .ok_or("/completion answer without `tokens_evaluated`")?;
    let tokens_predicted = v
        .get("tokens_predicted")
        .and_then(Value::as_u64)
        .ok_or("/completion answer without `tokens_predicted`")?;
    let probs = match v.get("completion_probabilities") {
        Some(Value::Array(a)) => a.as_slice(),
        None if tokens_predicted == 0 => &[],
        _ => return Err("/completion answer without `completion_probabilities`".into()),
    };
    let mut steps = Vec::with_capacity(probs.len());
    for p in probs {
        let s = parse_step(p)?;
        let id = s
            .token
            .id
            .ok_or_else(|| format!("generated token without an id: {}", describe(p)))?;
        let mut top = Vec::with_capacity(s.top.len());
        for t in s.top {
            let tid =
                t.id.ok_or_else(|| format!("top entry without an id: {}", describe(p)))?;
            top.push(IdTop {
                id: tid,
                text: t.text,
                logprob: t.logprob,
            });
        }
        steps.push(IdStep {
            id,
            text: s.token.text,
            bytes: s.token.bytes,
            logprob: s.token.logprob,
            top,
        });
    }
    // `tokens` (return_tokens) must agree with the probabilities when both are there.
    if let Some(Value::Array(tokens)) = v.get("tokens") {
        let ids: Vec<Option<i64>> = tokens.iter().map(Value::as_i64).collect();
        // llama-server may list one more id than probabilities when generation ends on an
        // end-of-generation token (seen with a Q2_K candidate stopping mid-chunk): the steps
        // with probabilities are what is scored, so they must agree on the common prefix.
        let same = ids.len().abs_diff(steps.len()) <= 1
            && ids
                .iter()
                .zip(&steps)
                .all(|(a, s)| *a == Some(i64::from(s.id)));
        if !same && !tokens.is_empty() {
            return Err(format!(
                "`tokens` ({} ids) disagrees with `completion_probabilities` ({} entries)",
                tokens.len(),
                steps.len()
            ));
        }
    }
    Ok(Completion {
        tokens_evaluated,
        tokens_predicted,
        steps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_a_completion_answer() {
        let v = json!({
            "tokens": [42, 2], "tokens_evaluated": 7, "tokens_predicted": 2, "stop_type": "eos",
            "completion_probabilities": [
                {"id": 42, "token": "Hi", "bytes": [72, 105], "logprob": -0.5,
                 "top_logprobs": [{"id": 42, "token": "Hi", "bytes": [72, 105], "logprob": -0.5},
                                  {"id": 7, "token": "Yo", "bytes": [89, 111], "logprob": -1.5}]},
                {"id": 2, "token": "", "bytes": [], "logprob": -0.1, "top_logprobs": []}
            ]
        });
        let c = parse_completion(&v).unwrap();
        assert_eq!(c.tokens_evaluated, 7);
        assert_eq!(c.steps.len(), 2);
        assert_eq!(c.steps[0].top[1].id, 7);
        assert_eq!(c.steps[1].bytes, Some(vec![]));
    }

    #[test]
    fn refuses_nonsense() {
        assert!(parse_completion(&json!([1, 2])).is_err());
        assert!(parse_completion(&json!({"tokens_evaluated": 3})).is_err());
        let post = json!({"tokens_evaluated": 3, "tokens_predicted": 1,
            "completion_probabilities": [{"id": 1, "token": "a", "prob": 0.5, "top_probs": []}]});
        let e = parse_completion(&post).unwrap_err();
        assert!(e.contains("post-sampling"), "{e}");
        let disagree = json!({"tokens": [5], "tokens_evaluated": 3, "tokens_predicted": 1,
            "completion_probabilities": [{"id": 1, "token": "a", "logprob": -1.0, "top_logprobs": []}]});
        assert!(parse_completion(&disagree).is_err());
    }
}
