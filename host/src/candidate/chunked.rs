//! The `chunked` strategy (the seed's): greedy continuations of at most `candidate_max_tokens`
//! from the prompt plus the main's tokens so far (as ids). The run of generated tokens equal to
//! the main's is kept, plus the first divergent position (its distribution is still conditioned
//! on the main's context); the next request starts after it. The candidate's logprob of the
//! main's token is known where the candidate generated it or listed it in its top-N; elsewhere
//! it stays `None`.

use super::{CandidateScorer, ScoreError, Work};

/// Scores positions `from..` of `work` with greedy continuations.
pub(crate) async fn run(
    scorer: &CandidateScorer,
    work: &mut Work<'_>,
    prompt: &[i32],
    from: usize,
) -> Result<(), ScoreError> {
    let n = work.len();
    let mut s = from;
    while s < n {
        let want = n.saturating_sub(s).min(scorer.max_tokens as usize);
        let mut context = Vec::with_capacity(prompt.len() + s);
        context.extend_from_slice(prompt);
        context.extend_from_slice(&work.ids[..s]);
        let answer = match scorer.complete(&context, want, scorer.n_probs, None).await {
            Ok(a) => a,
            Err(e) => return work.stop_or_fail(e, s),
        };
        let request = work.count_request(answer.tokens_predicted);
        if answer.tokens_evaluated != context.len() as u64 {
            return work.stop_or_fail(
                ScoreError::BadAnswer(format!(
                    "the candidate evaluated {} prompt tokens where {} were sent (context too small?)",
                    answer.tokens_evaluated,
                    context.len()
                )),
                s,
            );
        }
        if answer.steps.is_empty() {
            tracing::warn!(
                position = s,
                "the candidate generated nothing; the rest of the response stays uncovered"
            );
            return Ok(());
        }
        let mut advanced = 0;
        for (k, step) in answer.steps.iter().take(want).enumerate() {
            let pos = s + k;
            let main_id = work.ids[pos];
            let same = step.id == main_id;
            if same {
                work.check_same_token(pos, step)?;
            }
            work.note_text(step.id, &step.text);
            let candidate = if same {
                Some(step.logprob)
            } else {
                step.top.iter().find(|t| t.id == main_id).map(|t| t.logprob)
            };
            work.fill(pos, step, candidate, Some(step.id), request);
            work.by_chunked += 1;
            advanced += 1;
            if !same {
                break;
            }
        }
        s += advanced;
    }
    Ok(())
}
