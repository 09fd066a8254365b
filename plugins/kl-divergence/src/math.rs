//! The arithmetic of the `kl-divergence` plugin, free of the WIT types: the plugin runs it on
//! its records, and the host's benchmark (`host/examples/bench.rs`, which includes this file
//! with `#[path]`) runs the very same code natively to compare the two.

/// Smallest probability used in a ratio: keeps a zero (logprob -inf) from producing infinity.
const Q_FLOOR: f64 = 1e-30;

/// The six per-position series (`kld`, `kld_estimate`, `same_top`, `delta_p`, `nll_main`,
/// `nll_candidate`; NaN where a position is `None`, i.e. not aligned) and the three scalars
/// (`kld_mean`, `same_top_rate`, `positions_compared`).
pub fn summarise<'a, E: Entry + 'a>(
    positions: impl ExactSizeIterator<Item = Option<PositionView<'a, E>>>,
) -> ([Vec<f64>; 6], [f64; 3]) {
    let n = positions.len();
    let mut series: [Vec<f64>; 6] = std::array::from_fn(|_| Vec::with_capacity(n));
    let mut scratch = Scratch::default();
    let (mut compared, mut kld_sum, mut kld_n, mut same_sum, mut same_n) =
        (0u32, 0.0, 0u32, 0.0, 0u32);
    for p in positions {
        let row = match p {
            Some(view) => {
                compared += 1;
                position_values(&view, &mut scratch)
            }
            None => [f64::NAN; 6],
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
    (
        series,
        [
            mean(kld_sum, kld_n),
            mean(same_sum, same_n),
            f64::from(compared),
        ],
    )
}

/// Buffers reused from position to position.
#[derive(Default)]
pub struct Scratch {
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
    pub fn new(lp: f64, lq: f64) -> Pair {
        Pair {
            p: lp.exp(),
            lp,
            q: lq.exp(),
            lq,
        }
    }

    /// `p ln(p/q)`, q floored so a zero (logprob -inf) does not give infinity.
    pub fn term(&self) -> f64 {
        if self.p <= 0.0 {
            0.0
        } else {
            self.p * (self.lp - self.lq.max(LN_Q_FLOOR))
        }
    }
}

/// `ln(Q_FLOOR)`.
const LN_Q_FLOOR: f64 = -69.07755278982137;

/// One entry of a top list, as the plugin (WIT) and the host (native) each represent it.
pub trait Entry {
    fn id(&self) -> i32;
    fn logprob(&self) -> f32;
}

/// What the arithmetic reads of one position.
pub struct PositionView<'a, E> {
    /// The main's token and its logprob under the main model.
    pub main_id: i32,
    pub main_logprob: f32,
    /// The main's top-N, most probable first.
    pub main_top: &'a [E],
    /// The candidate's logprob of the main's token, when reported.
    pub candidate: Option<f32>,
    /// The candidate's top-N, most probable first.
    pub candidate_top: &'a [E],
}

/// `[kld, kld_estimate, same_top, delta_p, nll_main, nll_candidate]` at an aligned position.
pub fn position_values<E: Entry>(p: &PositionView<'_, E>, scratch: &mut Scratch) -> [f64; 6] {
    let main_lp = f64::from(p.main_logprob);
    // The candidate's logprob of the main's token: reported directly, or found in its top list.
    let cand_lp = p
        .candidate
        .or_else(|| find(p.candidate_top, p.main_id))
        .map(f64::from);

    scratch.q_top.clear();
    scratch
        .q_top
        .extend(p.candidate_top.iter().map(|t| prob(t.logprob())));

    // S: tokens known under both. The top lists hold distinct ids and N is small (10-100),
    // so a nested scan beats hashing.
    scratch.both.clear();
    scratch.p_unknown.clear();
    let mut main_in_s = false;
    for t in p.main_top {
        let lp = f64::from(t.logprob());
        match p.candidate_top.iter().position(|c| c.id() == t.id()) {
            Some(j) => {
                let lq = f64::from(p.candidate_top[j].logprob());
                scratch.both.push(Pair {
                    p: lp.exp(),
                    lp,
                    q: scratch.q_top[j],
                    lq,
                });
                main_in_s |= t.id() == p.main_id;
            }
            None if t.id() == p.main_id && cand_lp.is_some() => {}
            None => scratch.p_unknown.push((lp.exp(), lp)),
        }
    }
    if !main_in_s {
        if let Some(lq) = cand_lp {
            // P's probability of its own token is always known (main.logprob).
            let lp = find(p.main_top, p.main_id).map_or(main_lp, f64::from);
            scratch.both.push(Pair::new(lp, lq));
        }
    }
    let kld = kl_lower_bound(&scratch.both);
    let kld_estimate = kl_estimate(p, cand_lp, scratch);

    let same_top = match (p.main_top.first(), p.candidate_top.first()) {
        (Some(a), Some(b)) => f64::from(u8::from(a.id() == b.id())),
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

fn find<E: Entry>(list: &[E], id: i32) -> Option<f32> {
    list.iter().find(|t| t.id() == id).map(Entry::logprob)
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
fn kl_estimate<E: Entry>(p: &PositionView<'_, E>, cand_lp: Option<f64>, s: &Scratch) -> f64 {
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
            if find(p.candidate_top, p.main_id).is_none() {
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
