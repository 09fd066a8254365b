//! `logger`: writes the seed proxy's report of matching tokens to the host log (one `info` line
//! per line of the report) and returns `matched_tokens`.
//!
//! A position *matches* where it is aligned and the candidate's own pick is the main's token.
//! The report, as the seed printed it:
//!
//! ```text
//! ================================================================================
//! KL DIVERGENCE COMPARISON: M/T tokens matched across R requests
//! ================================================================================
//!
//! Request K - Tokens a-b:
//! Main model:
//!   'text' : [(id, 'text', '-0.123'), ...]
//! Candidate model:
//!   'text' : [(id, 'text', '-0.456'), ...]
//!
//! ```
//!
//! T is the number of positions, R the number of distinct candidate requests, `a-b` the 1-based
//! positions of the first and last matching token of request K. Strings are written as Python's
//! `repr` writes them (the seed was Python), so a newline in a token stays on its line.
//!
//! Options (JSON, all optional): `max_tokens_listed` (token lines per request and model,
//! default all), `top_n` (entries per top list, default all), `output` (`"log"`, the default,
//! or `"stdout"`).

use std::cell::RefCell;
use std::collections::HashMap;

use serde::Deserialize;

wit_bindgen::generate!({ world: "comparator", path: "../../wit" });

use kl_proxy::comparator::host::{log, Level};
use kl_proxy::comparator::types::{Position, PositionStatus, TokenLogprob, Value};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    /// Token lines listed per request and model (the rest are summarised in one line).
    max_tokens_listed: Option<usize>,
    /// Entries listed per top list.
    top_n: Option<usize>,
    /// Where the report goes: `log` (host log, info) or `stdout`.
    #[serde(default)]
    output: Output,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Output {
    #[default]
    Log,
    Stdout,
}

thread_local! {
    static OPTIONS: RefCell<Options> = RefCell::new(Options::default());
}

struct Logger;

impl Guest for Logger {
    fn configure(options: String) -> Result<(), String> {
        let opts: Options = match options.trim() {
            "" | "null" => Options::default(),
            text => serde_json::from_str(text).map_err(|e| format!("logger options: {e}"))?,
        };
        OPTIONS.with(|o| *o.borrow_mut() = opts);
        Ok(())
    }

    fn compare(c: Comparison) -> Result<Vec<Metric>, String> {
        let opts = OPTIONS.with(|o| o.borrow().clone());
        let (lines, matched) = report(&c, &opts);
        for line in &lines {
            match opts.output {
                Output::Log => log(Level::Info, line),
                Output::Stdout => println!("{line}"),
            }
        }
        Ok(vec![Metric {
            name: "matched_tokens".into(),
            help: "Aligned positions where the candidate picked the main model's token".into(),
            value: Value::Scalar(matched as f64),
        }])
    }
}

fn matches(p: &Position) -> bool {
    p.status == PositionStatus::Aligned && p.candidate_pick == Some(p.main.id)
}

/// The report's lines and the number of matching tokens.
fn report(c: &Comparison, opts: &Options) -> (Vec<String>, usize) {
    let texts: HashMap<i32, &str> = c.texts.iter().map(|t| (t.id, t.text.as_str())).collect();
    let text = |id: i32| texts.get(&id).copied().unwrap_or("");

    // Requests in order of first appearance, each with its matching positions.
    let mut requests: Vec<u32> = Vec::new();
    let mut by_request: HashMap<u32, Vec<&Position>> = HashMap::new();
    for p in &c.positions {
        if p.request != 0 && !requests.contains(&p.request) {
            requests.push(p.request);
        }
        if matches(p) {
            by_request.entry(p.request).or_default().push(p);
        }
    }
    let matched: usize = by_request.values().map(Vec::len).sum();

    let rule = "=".repeat(80);
    let mut lines = vec![
        rule.clone(),
        format!(
            "KL DIVERGENCE COMPARISON: {matched}/{} tokens matched across {} requests",
            c.positions.len(),
            requests.len()
        ),
        rule,
        String::new(),
    ];
    for k in &requests {
        let Some(ps) = by_request.get(k) else {
            continue;
        };
        let (Some(first), Some(last)) = (ps.first(), ps.last()) else {
            continue;
        };
        lines.push(format!(
            "Request {k} - Tokens {}-{}:",
            first.index + 1,
            last.index + 1
        ));
        for (label, candidate) in [("Main model:", false), ("Candidate model:", true)] {
            lines.push(label.to_string());
            let listed = opts.max_tokens_listed.unwrap_or(usize::MAX).min(ps.len());
            for p in &ps[..listed] {
                let top: &[TokenLogprob] = if candidate {
                    &p.candidate_top
                } else {
                    &p.main_top
                };
                let n = opts.top_n.unwrap_or(usize::MAX).min(top.len());
                let entries: Vec<String> = top[..n]
                    .iter()
                    .map(|t| format!("({}, {}, '{:.3}')", t.id, py_repr(text(t.id)), t.logprob))
                    .collect();
                lines.push(format!(
                    "  {} : [{}]",
                    py_repr(text(p.main.id)),
                    entries.join(", ")
                ));
            }
            if listed < ps.len() {
                lines.push(format!("  ... ({} more)", ps.len() - listed));
            }
        }
        lines.push(String::new());
    }
    (lines, matched)
}

/// A string as Python's `repr` writes it: single quotes unless the text has a single quote and
/// no double quote; backslash, quotes and non-printable characters escaped.
fn py_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for ch in s.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if c.is_control() => {
                let v = c as u32;
                if v <= 0xff {
                    out.push_str(&format!("\\x{v:02x}"));
                } else {
                    out.push_str(&format!("\\u{v:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

export!(Logger);
