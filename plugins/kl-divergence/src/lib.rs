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
//! - `kld_estimate`: see [`kl_estimate`] for its assumption.
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

/// Smallest probability used in a ratio: keeps a zero (logprob -inf) from producing infinity.
const Q_FLOOR: f64 = 1e-30;

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
        let n = c.positions.len();
        let mut series: [Vec<f64>; 6] = std::array::from_fn(|_| Vec::with_capacity(n));
        let mut scratch = Scratch::default();
        let (mut compared, mut kld_sum, mut kld_n, mut same_sum, mut same_n) =
            (0u32, 0.0, 0u32, 0.0, 0u32);
        for p in &c.positions {
            let row = if p.status == PositionStatus::Aligned {
                compared += 1;
                position_values(p, &mut scratch)
            } else {
                [f64::NAN; 6]
            };
            if row[0].is_finite() {
                kld_sum += row[0];
                kld_n += 1;
            }
            if row[2].is_finite() {
                same_sum += row[2];
                same_n += 1;
            }
            for (s, v) in series.iter_mut().zip(row) {
                s.push(v);
            }
        }
        let mean = |sum: f64, n: u32| if n == 0 { f64::NAN } else { sum / f64::from(n) };
        let scalars = [
            mean(kld_sum, kld_n),
            mean(same_sum, same_n),
            f64::from(compared),
        ];

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

/// Buffers reused from position to position.
#[derive(Default)]
struct Scratch {
    /// Probabilities of the candidate's top-N entries, in list order.
    q_top: Vec<f64>,
    /// The tokens known under both models.
    both: Vec<Pair>,
    /// `(p, ln p)` of P's listed tokens whose candidate probability is unknown.
    p_unknown: Vec<(f64, f64)>,
}

/// A token known under both models: its probabilities and logprobs (kept, so `ln(p/q)` is a
/// subtraction: transcendental functions are the plugin's main cost).
#[derive(Debug, Clone, Copy)]
pub struct Pair {
    pub p: f64,
    pub lp: f64,
    pub q: f64,
    pub lq: f64,
}

impl Pair {
    fn new(lp: f64, lq: f64) -> Pair {
        Pair {
            p: lp.exp(),
            lp,
            q: lq.exp(),
            lq,
        }
    }

    /// `p ln(p/q)`, q floored so a zero (logprob -inf) does not give infinity.
    fn term(&self) -> f64 {
        if self.p <= 0.0 {
            0.0
        } else {
            self.p * (self.lp - self.lq.max(LN_Q_FLOOR))
        }
    }
}

/// `ln(Q_FLOOR)`.
const LN_Q_FLOOR: f64 = -69.07755278982137;

/// `[kld, kld_estimate, same_top, delta_p, nll_main, nll_candidate]` at an aligned position.
fn position_values(p: &Position, scratch: &mut Scratch) -> [f64; 6] {
    let main_lp = f64::from(p.main.logprob);
    // The candidate's logprob of the main's token: reported directly, or found in its top list.
    let cand_lp = p
        .candidate
        .or_else(|| find(&p.candidate_top, p.main.id))
        .map(f64::from);

    scratch.q_top.clear();
    scratch
        .q_top
        .extend(p.candidate_top.iter().map(|t| prob(t.logprob)));

    // S: tokens known under both. The top lists hold distinct ids and N is small (10-100),
    // so a nested scan beats hashing.
    scratch.both.clear();
    scratch.p_unknown.clear();
    let mut main_in_s = false;
    for t in &p.main_top {
        let lp = f64::from(t.logprob);
        match p.candidate_top.iter().position(|c| c.id == t.id) {
            Some(j) => {
                let lq = f64::from(p.candidate_top[j].logprob);
                scratch.both.push(Pair {
                    p: lp.exp(),
                    lp,
                    q: scratch.q_top[j],
                    lq,
                });
                main_in_s |= t.id == p.main.id;
            }
            None if t.id == p.main.id && cand_lp.is_some() => {}
            None => scratch.p_unknown.push((lp.exp(), lp)),
        }
    }
    if !main_in_s {
        if let Some(lq) = cand_lp {
            // P's probability of its own token is always known (main.logprob).
            let lp = find(&p.main_top, p.main.id).map_or(main_lp, f64::from);
            scratch.both.push(Pair::new(lp, lq));
        }
    }
    let kld = kl_lower_bound(&scratch.both);
    let kld_estimate = kl_estimate(p, cand_lp, scratch);

    let same_top = match (p.main_top.first(), p.candidate_top.first()) {
        (Some(a), Some(b)) => f64::from(u8::from(a.id == b.id)),
        _ => f64::NAN,
    };
    let (delta_p, nll_candidate) = match cand_lp {
        Some(q) => (q.exp() - main_lp.exp(), -q),
        None => (f64::NAN, f64::NAN),
    };
    [
        kld,
        kld_estimate,
        same_top,
        delta_p,
        -main_lp,
        nll_candidate,
    ]
}

fn find(list: &[TokenLogprob], id: i32) -> Option<f32> {
    list.iter().find(|t| t.id == id).map(|t| t.logprob)
}

fn prob(logprob: f32) -> f64 {
    f64::from(logprob).exp()
}

/// `p ln(p/q)` for the lumped rest masses: 0 when p is 0 (its limit), q floored so a 0 does
/// not give infinity.
fn rest_term(p: f64, q: f64) -> f64 {
    if p <= 0.0 {
        0.0
    } else {
        p * (p / q.max(Q_FLOOR)).ln()
    }
}

/// The exact lower bound from the tokens known under both models, the rest lumped into one
/// outcome. NaN when nothing is known under both.
///
/// The reported probabilities come rounded (f32 logprobs), so `Σ p` or `Σ q` may exceed 1 by
/// float noise: the rest masses are clamped to `[0, 1]`, and the result (never negative in exact
/// arithmetic, by the log-sum inequality) is clamped at 0.
pub fn kl_lower_bound(both: &[Pair]) -> f64 {
    if both.is_empty() {
        return f64::NAN;
    }
    let (mut sp, mut sq, mut kl) = (0.0, 0.0, 0.0);
    for pair in both {
        sp += pair.p;
        sq += pair.q;
        kl += pair.term();
    }
    let p_r = (1.0 - sp).clamp(0.0, 1.0);
    let q_r = (1.0 - sq).clamp(0.0, 1.0);
    (kl + rest_term(p_r, q_r)).max(0.0)
}

/// An estimate of KL(P‖Q) that keeps P's listed tokens apart instead of lumping them.
///
/// Assumption: each token of P's top-N whose candidate probability is unknown (not in Q's
/// top-N) has the largest probability it can have while staying unlisted: Q's smallest listed
/// probability (the top-N cut-off), shared down when those tokens together would exceed Q's
/// unlisted mass. Everything P did not list is lumped into one outcome as in the lower bound.
/// Since the true q of those tokens is at most the value assumed, each of their terms
/// `p ln(p/q)` is at most underestimated; the lumping of P's unlisted tail can still only lower
/// the result. It is usually much closer to the full-vocabulary value than `kld` when the two
/// top lists differ, and equals `kld` when every token of P's top-N is known under Q.
/// NaN when Q's top list is empty (no cut-off to assume).
fn kl_estimate(p: &Position, cand_lp: Option<f64>, s: &Scratch) -> f64 {
    let Some(&q_min) = s.q_top.last() else {
        return f64::NAN;
    };
    let (mut sp, mut sq, mut kl) = (0.0, 0.0, 0.0);
    for pair in &s.both {
        sp += pair.p;
        sq += pair.q;
        kl += pair.term();
    }
    if !s.p_unknown.is_empty() {
        // Q's mass outside its listed tokens and the main token: what the unknown tokens share.
        let mut q_listed: f64 = s.q_top.iter().sum();
        if let Some(lq) = cand_lp {
            if find(&p.candidate_top, p.main.id).is_none() {
                q_listed += lq.exp();
            }
        }
        let q_unlisted = (1.0 - q_listed).clamp(0.0, 1.0);
        let q_each = q_min.min(q_unlisted / s.p_unknown.len() as f64);
        let lq_each = q_each.max(Q_FLOOR).ln();
        for &(pp, lp) in &s.p_unknown {
            sp += pp;
            sq += q_each;
            if pp > 0.0 {
                kl += pp * (lp - lq_each);
            }
        }
    }
    let p_r = (1.0 - sp).clamp(0.0, 1.0);
    let q_r = (1.0 - sq).clamp(0.0, 1.0);
    (kl + rest_term(p_r, q_r)).max(0.0)
}

export!(KlDivergence);
