//! `kl-divergence`: per-position divergence of the candidate (Q) from the main model (P), from
//! the two top-N lists and both models' logprob of the main's token, as design.md describes.
//!
//! Per-position series (one value per position, NaN where the position is not aligned or the
//! value is not defined there):
//! - `kld`: the exact lower bound of KL(P‖Q). S = the tokens whose probability is known under
//!   both models (in both top lists, or the main's token when the candidate's logprob of it is
//!   known); everything else is lumped into one "rest" outcome:
//!   `KL_lb = Σ_S p ln(p/q) + p_r ln(p_r/q_r)`, `p_r = 1 - Σ_S p`, `q_r = 1 - Σ_S q`.
//!   Merging outcomes never increases KL (data-processing inequality), so `KL_lb ≤ KL(P‖Q)`,
//!   with equality when the lists cover both distributions. NaN when S is empty.
//! - `kld_estimate`: see `math::kl_estimate` for its assumption.
//! - `same_top`: 1.0 when both models' most probable token (the first of each top list) is the
//!   same, else 0.0.
//! - `delta_p`: q(main token) - p(main token), in probability.
//! - `nll_main`, `nll_candidate`: -ln p and -ln q of the main's token (their mean difference is
//!   ln(PPL(Q)/PPL(P)) over the main's tokens).
//!
//! Scalars: `kld_mean` (mean of `kld` over the positions where it is defined; NaN when none),
//! `same_top_rate` (likewise for `same_top`), `positions_compared` (aligned positions).
//!
//! Options (JSON): `{"emit": ["kld", "kld_mean", ...]}` chooses the metrics returned
//! (default: all).

use std::cell::RefCell;

use serde::Deserialize;

wit_bindgen::generate!({ world: "comparator", path: "../../wit" });

use kl_proxy::comparator::types::{Position, PositionStatus, TokenLogprob, Value};

/// Every metric this plugin can return, with its help text.
const METRICS: &[(&str, &str)] = &[
    ("kld", "Lower bound of KL(main||candidate) per position, from the top-N lists (nats)"),
    ("kld_estimate", "Estimate of KL(main||candidate) per position, unlisted candidate probabilities at the top-N cut-off (nats)"),
    ("same_top", "1 where both models' most probable token is the same, else 0"),
    ("delta_p", "Candidate minus main probability of the main model's token"),
    ("nll_main", "Negative log-probability of the main model's token under the main model"),
    ("nll_candidate", "Negative log-probability of the main model's token under the candidate"),
    ("kld_mean", "Mean of kld over the positions where it is defined"),
    ("same_top_rate", "Fraction of compared positions where both models' top token is the same"),
    ("positions_compared", "Aligned positions compared"),
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    emit: Option<Vec<String>>,
}

thread_local! {
    /// Which of [`METRICS`] to return (indices), set by `configure`.
    static EMIT: RefCell<Vec<bool>> = RefCell::new(vec![true; METRICS.len()]);
}

struct KlDivergence;

impl Guest for KlDivergence {
    fn configure(options: String) -> Result<(), String> {
        let opts: Options = match options.trim() {
            "" | "null" => Options { emit: None },
            text => {
                serde_json::from_str(text).map_err(|e| format!("kl-divergence options: {e}"))?
            }
        };
        let mut emit = vec![opts.emit.is_none(); METRICS.len()];
        for name in opts.emit.iter().flatten() {
            let i = METRICS.iter().position(|(m, _)| m == name).ok_or_else(|| {
                let known: Vec<&str> = METRICS.iter().map(|(m, _)| *m).collect();
                format!(
                    "kl-divergence options: emit: unknown metric `{name}` (known: {})",
                    known.join(", ")
                )
            })?;
            emit[i] = true;
        }
        EMIT.with(|e| *e.borrow_mut() = emit);
        Ok(())
    }

    fn compare(c: Comparison) -> Result<Vec<Metric>, String> {
        let emit = EMIT.with(|e| e.borrow().clone());
        let (series, scalars) = summarise(
            c.positions
                .iter()
                .map(|p| (p.status == PositionStatus::Aligned).then(|| view(p))),
        );

        let mut out = Vec::new();
        let mut series = series.into_iter();
        for (i, (name, help)) in METRICS.iter().enumerate() {
            let value = match series.next() {
                Some(s) => Value::PerPosition(s),
                None => Value::Scalar(scalars[i - 6]),
            };
            if emit[i] {
                out.push(Metric {
                    name: (*name).into(),
                    help: (*help).into(),
                    value,
                });
            }
        }
        Ok(out)
    }
}

mod math;

use math::{summarise, Entry, PositionView};

impl Entry for TokenLogprob {
    fn id(&self) -> i32 {
        self.id
    }
    fn logprob(&self) -> f32 {
        self.logprob
    }
}

fn view(p: &Position) -> PositionView<'_, TokenLogprob> {
    PositionView {
        main_id: p.main.id,
        main_logprob: p.main.logprob,
        main_top: &p.main_top,
        candidate: p.candidate,
        candidate_top: &p.candidate_top,
    }
}

export!(KlDivergence);
