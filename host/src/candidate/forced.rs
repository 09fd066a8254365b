//! The `forced` strategy: the main's tokens are forced on the candidate with a GBNF grammar of
//! token ids (`root ::= <[id]> <[id]> ...`) in one `/completion` request per run of at most
//! [`FORCED_MAX_TOKENS`](super::FORCED_MAX_TOKENS) tokens (by default), so every position is
//! decoded exactly once, in the main's context. llama-server reports the raw (pre-grammar) distribution and the forced token's own
//! logprob over the full vocabulary. Should the candidate ever emit something else, the
//! positions before that are kept and [`chunked`](super::chunked) takes over from there.
//!
//! End-of-generation tokens cannot be named in the grammar (llama-server fails the request:
//! "Unexpected empty grammar stack after accepting piece"), so a final EOS (the last token,
//! empty text) is left out of it: once the grammar is complete only end-of-generation tokens
//! are allowed, and the candidate decodes the EOS position like any other.

use super::{answer::Completion, chunked, CandidateScorer, ScoreError, Work};

/// A grammar that accepts exactly `ids`, in order.
pub(crate) fn grammar(ids: &[i32]) -> String {
    let mut g = String::with_capacity(10 + ids.len() * 10);
    g.push_str("root ::=");
    for id in ids {
        g.push_str(&format!(" <[{id}]>"));
    }
    g
}

/// Scores every position of `work`, starting with forced requests.
pub(crate) async fn run(
    scorer: &CandidateScorer,
    work: &mut Work<'_>,
    prompt: &[i32],
) -> Result<(), ScoreError> {
    let n = work.len();
    let mut start = 0;
    while start < n {
        let end = n.min(start + scorer.forced_max_tokens);
        let mut context = Vec::with_capacity(prompt.len() + start);
        context.extend_from_slice(prompt);
        context.extend_from_slice(&work.ids[..start]);
        let grammar_end = if end == n && ends_with_eog(work) {
            end - 1
        } else {
            end
        };
        if grammar_end == start {
            // Only the EOS is left: nothing to force.
            return chunked::run(scorer, work, prompt, start).await;
        }
        let g = grammar(&work.ids[start..grammar_end]);
        let answer = match scorer
            .complete(&context, end - start, scorer.n_probs, Some(&g))
            .await
        {
            Ok(a) => a,
            Err(e @ (ScoreError::BadAnswer(_) | ScoreError::Unsupported(_))) => {
                tracing::warn!(
                    position = start,
                    error = %e,
                    "forced request refused; continuing chunked"
                );
                return chunked::run(scorer, work, prompt, start).await;
            }
            Err(e) => return Err(e),
        };
        let request = work.count_request(answer.tokens_predicted);
        if answer.tokens_evaluated != context.len() as u64 {
            return work.stop_or_fail(
                ScoreError::BadAnswer(format!(
                    "the candidate evaluated {} prompt tokens where {} were sent (context too small?)",
                    answer.tokens_evaluated,
                    context.len()
                )),
                start,
            );
        }
        let matched = take_forced(work, &answer, start, end, request)?;
        if start + matched < end {
            tracing::debug!(
                position = start + matched,
                "forced decoding diverged from the main's tokens; continuing chunked"
            );
            return chunked::run(scorer, work, prompt, start + matched).await;
        }
        start = end;
    }
    Ok(())
}

/// Whether the main response ends on an end-of-generation token: its last token has no text
/// (llama-server renders EOS/EOT as "") and generation stopped.
fn ends_with_eog(work: &Work<'_>) -> bool {
    if work.cut.is_some() {
        return false;
    }
    let Some(last) = work.main.tokens.last() else {
        return false;
    };
    let empty = last.text.is_empty() && last.bytes.as_ref().is_none_or(|b| b.is_empty());
    let stopped = !matches!(
        work.main.finish_reason.as_deref(),
        Some("length") | Some("limit")
    );
    empty && stopped
}

/// Records the leading positions of `answer` whose token is the main's; returns how many.
fn take_forced(
    work: &mut Work<'_>,
    answer: &Completion,
    start: usize,
    end: usize,
    request: u32,
) -> Result<usize, ScoreError> {
    let mut matched = 0;
    for (k, step) in answer.steps.iter().take(end - start).enumerate() {
        let pos = start + k;
        if step.id != work.ids[pos] {
            break;
        }
        work.check_same_token(pos, step)?;
        // The grammar made it emit the main's token: what it would have picked is its argmax.
        let pick = step.top.first().map(|t| t.id);
        work.fill(pos, step, Some(step.logprob), pick, request);
        work.by_forced += 1;
        matched += 1;
    }
    Ok(matched)
}

#[cfg(test)]
mod tests {
    #[test]
    fn grammar_lists_the_ids() {
        assert_eq!(super::grammar(&[788, 253]), "root ::= <[788]> <[253]>");
    }
}
