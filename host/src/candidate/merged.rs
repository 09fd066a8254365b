//! Finds where a main response's token list stops being the tokens the main generated.
//!
//! llama-server does not report a token that ends inside a UTF-8 character on its own: it
//! merges its bytes into the entry of the token that completes the character, under that
//! token's id (measured here: an emoji generated as three tokens `15107 230 249` came back as
//! one entry, id 249, bytes `" 🌟"`; `usage.completion_tokens` said 24, the list had 22). The
//! hidden ids are not in the answer, so the candidate cannot be given the main's exact
//! context from there on. Such a response says so: it generated more tokens than it listed.
//! The first merged entry is the first whose text is not what its id decodes to alone
//! (`/detokenize`); positions before it are exact and are compared, the rest are not.

use serde_json::{json, Value};

use super::ScoreError;
use crate::record::MainResponse;
use crate::upstream::Upstream;

/// The index of the first merged entry, or `None` when the list is the generated sequence.
pub(crate) async fn first_merged(
    up: &Upstream,
    main: &MainResponse,
) -> Result<Option<usize>, ScoreError> {
    let listed = main.tokens.len();
    match main.generated_tokens {
        Some(g) if g as usize > listed => {}
        _ => return Ok(None),
    }
    let mut first_non_ascii = None;
    for (i, t) in main.tokens.iter().enumerate() {
        let non_ascii = match &t.bytes {
            Some(b) => !b.is_ascii(),
            None => !t.text.is_ascii(),
        };
        if !non_ascii {
            continue;
        }
        first_non_ascii.get_or_insert(i);
        let answer = up
            .post_json("/detokenize", &json!({"tokens": [t.id]}))
            .await?;
        let alone = answer.get("content").and_then(Value::as_str);
        if alone != Some(t.text.as_str()) {
            return Ok(Some(i));
        }
    }
    // More tokens generated than listed, yet every entry decodes alone: do not guess where the
    // hidden ones were; compare only what precedes the first non-ASCII entry.
    Ok(Some(first_non_ascii.unwrap_or(listed)))
}
