//! # Summary statistics over the per-position series
//!
//! Owns the numbers a run reports at the end: for every series a comparator returned
//! (`"plugin.metric"` → one value per aligned position) its mean ± uncertainty and
//! percentiles, and the sections `llama-perplexity --kl-divergence` prints (KL divergence,
//! Δp, RMS Δp, "Same top p", ln(PPL(Q)/PPL(base))), computed with llama.cpp's own formulas so
//! the two tools' numbers can be put side by side.
//!
//! The formulas are copied from llama.cpp, `tools/perplexity/perplexity.cpp`, function
//! `kl_divergence` (ggml-org/llama.cpp, commit 050fc7f3):
//!
//! ```text
//! auto mean_and_uncertainty = [] (double sum, double sum2, size_t count) {
//!     if (count < 1) { return std::make_pair(0., 0.); }
//!     double f = sum/count;
//!     double df = sum2/count - f*f;
//!     df = df > 0 && count > 10 ? sqrt(df/(count-1)) : 0.;
//!     return std::make_pair(f, df);
//! };
//! auto covariance = [] (double suma, double sumb, double sumab, size_t count) {
//!     if (count < 10) { return 0.0; }
//!     double var = sumab/count - (suma/count)*(sumb/count);
//!     var /= count - 1;
//!     return var;
//! };
//! auto percentile = [] (std::vector<float> values, float fraction) {
//!     if (fraction <= 0) return values.front();
//!     if (fraction >= 1) return values.back();
//!     float p = fraction*(values.size() - 1);
//!     size_t ip = size_t(p); p -= ip;
//!     return (1 - p)*values[ip] + p*values[std::min(ip+1, values.size()-1)];
//! };
//! // median: mean of the two middle values when the count is even, else the middle one
//! const double log_ppl_ratio_val = log_ppl.first - log_ppl_base.first;
//! const double log_ppl_ratio_unc = sqrt(log_ppl.second*log_ppl.second
//!         + log_ppl_base.second*log_ppl_base.second - 2.0*log_ppl_cov);
//! const double ppl_ratio_val = exp(log_ppl_ratio_val);
//! const double ppl_ratio_unc = ppl_ratio_val * log_ppl_ratio_unc;
//! auto p_diff_mse = mean_and_uncertainty(kld.sum_p_diff2, kld.sum_p_diff4, kld.count);
//! const double p_diff_rms_val = sqrt(p_diff_mse.first);
//! const double p_diff_rms_unc = 0.5/p_diff_rms_val * p_diff_mse.second;
//! const double same_top_p = 1.0*kld.n_same_top/kld.count;
//! ... sqrt(same_top_p*(1.0 - same_top_p)/(kld.count - 1))
//! ```
//!
//! Differences from llama.cpp, all deliberate:
//! - everything is `f64` (llama.cpp keeps the sorted values and the percentile position in
//!   `float`);
//! - llama.cpp prints nothing below 100 positions; here every count is reported (the error
//!   is still 0 at 10 positions or fewer, as in `mean_and_uncertainty`);
//! - where llama.cpp's expression would give NaN (RMS error when the RMS is 0, "Same top p"
//!   error with one position, a negative variance under the square root of the ln PPL ratio
//!   error when only the covariance term is non-zero) the error is 0;
//! - NaN and ±inf values are skipped (per series; the ln PPL ratio skips a position unless
//!   both of its NLLs are finite).
//!
//! In llama.cpp's names, "Q" is the candidate and "base" is the main (production) model;
//! Δp = p_candidate(token) − p_main(token) of the token the main model produced.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

/// Metric names the `llama-perplexity` sections are built from (the part after the dot).
const KLD: &str = "kld";
const DELTA_P: &str = "delta_p";
const SAME_TOP: &str = "same_top";
const NLL_MAIN: &str = "nll_main";
const NLL_CANDIDATE: &str = "nll_candidate";

/// Mean, uncertainty and percentiles of one series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeriesStats {
    /// Finite values the statistics are over.
    pub n: usize,
    pub mean: f64,
    /// llama.cpp's uncertainty of the mean: sqrt(var/(n−1)) with the population variance; 0 when
    /// n ≤ 10.
    pub mean_err: f64,
    pub max: f64,
    pub p99_9: f64,
    pub p99: f64,
    pub p95: f64,
    pub p90: f64,
    pub p75: f64,
    pub median: f64,
    pub p25: f64,
    pub p10: f64,
    pub p5: f64,
    pub p1: f64,
    pub p0_1: f64,
    pub min: f64,
}

/// llama.cpp's `mean_and_uncertainty(sum, sum2, count)`.
fn mean_and_uncertainty(sum: f64, sum2: f64, count: usize) -> (f64, f64) {
    if count < 1 {
        return (0.0, 0.0);
    }
    let n = count as f64;
    let f = sum / n;
    let df = sum2 / n - f * f;
    let df = if df > 0.0 && count > 10 {
        (df / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (f, df)
}

/// llama.cpp's `covariance(suma, sumb, sumab, count)` (of the two means).
fn covariance(suma: f64, sumb: f64, sumab: f64, count: usize) -> f64 {
    if count < 10 {
        return 0.0;
    }
    let n = count as f64;
    (sumab / n - (suma / n) * (sumb / n)) / (n - 1.0)
}

/// llama.cpp's `percentile(values, fraction)`: linear interpolation between the two sorted
/// values around `fraction * (len - 1)`. `sorted` must be non-empty and sorted ascending.
fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if fraction <= 0.0 {
        return sorted[0];
    }
    if fraction >= 1.0 {
        return sorted[sorted.len() - 1];
    }
    let p = fraction * (sorted.len() - 1) as f64;
    let ip = p as usize;
    let p = p - ip as f64;
    (1.0 - p) * sorted[ip] + p * sorted[(ip + 1).min(sorted.len() - 1)]
}

/// llama.cpp's median: the middle value, or the mean of the two middle values.
fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n.is_multiple_of(2) {
        0.5 * (sorted[n / 2] + sorted[n / 2 - 1])
    } else {
        sorted[n / 2]
    }
}

fn finite(values: &[f64]) -> impl Iterator<Item = f64> + '_ {
    values.iter().copied().filter(|v| v.is_finite())
}

/// Statistics of `values`, NaN and ±inf skipped; `None` when no finite value is left.
pub fn series_stats(values: &[f64]) -> Option<SeriesStats> {
    let mut sorted: Vec<f64> = finite(values).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let (sum, sum2) = sorted
        .iter()
        .fold((0.0, 0.0), |(s, s2), v| (s + v, s2 + v * v));
    let (mean, mean_err) = mean_and_uncertainty(sum, sum2, sorted.len());
    Some(SeriesStats {
        n: sorted.len(),
        mean,
        mean_err,
        max: sorted[sorted.len() - 1],
        p99_9: percentile(&sorted, 0.999),
        p99: percentile(&sorted, 0.99),
        p95: percentile(&sorted, 0.95),
        p90: percentile(&sorted, 0.90),
        p75: percentile(&sorted, 0.75),
        median: median(&sorted),
        p25: percentile(&sorted, 0.25),
        p10: percentile(&sorted, 0.10),
        p5: percentile(&sorted, 0.05),
        p1: percentile(&sorted, 0.01),
        p0_1: percentile(&sorted, 0.001),
        min: sorted[0],
    })
}

/// What a report is built from: the counters of a run and the per-position series.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ReportInput {
    pub comparisons_ok: u64,
    /// Failed comparisons by reason.
    pub comparisons_failed: BTreeMap<String, u64>,
    /// Jobs dropped before being compared (queue full, shutdown).
    pub comparisons_dropped: u64,
    /// Generated positions of the compared responses.
    pub positions: u64,
    /// Positions the candidate could be scored on.
    pub aligned_positions: u64,
    /// `"plugin.metric"` → one value per aligned position; every series holds the same
    /// positions in the same order.
    pub series: BTreeMap<String, Vec<f64>>,
}

/// The perplexity section: ln(PPL(candidate)/PPL(main)) and what it is made of.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PerplexityStats {
    /// Positions where both NLLs are finite.
    pub n: usize,
    /// exp(mean NLL) of the main model ± its uncertainty.
    pub ppl_main: (f64, f64),
    /// exp(mean NLL) of the candidate ± its uncertainty.
    pub ppl_candidate: (f64, f64),
    /// Correlation of the two mean NLLs (llama.cpp's "Cor(ln(PPL(Q)), ln(PPL(base)))").
    pub correlation: f64,
}

/// The end-of-run report. `Display` prints it in `llama-perplexity`'s layout.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub comparisons_ok: u64,
    pub comparisons_failed: BTreeMap<String, u64>,
    pub comparisons_dropped: u64,
    pub positions: u64,
    pub aligned_positions: u64,
    /// Every series of the input, by `"plugin.metric"`; series without a finite value are left out.
    pub series: BTreeMap<String, SeriesStats>,
    /// Which series each section below was built from, e.g. `"kld" → "kl.kld"`,
    /// `"nll" → "kl"` (the plugin both NLL series come from).
    pub sources: BTreeMap<String, String>,
    /// From the first series (in key order) whose metric is `kld`.
    pub kld: Option<SeriesStats>,
    /// From the first series whose metric is `delta_p`.
    pub delta_p: Option<SeriesStats>,
    /// RMS of Δp ± its uncertainty.
    pub rms_delta_p: Option<(f64, f64)>,
    /// Fraction of positions where both models have the same top token ± its uncertainty,
    /// from the first series whose metric is `same_top` (0/1 values).
    pub same_top: Option<(f64, f64)>,
    /// Mean of nll_candidate − nll_main ± llama.cpp's uncertainty (with the covariance term),
    /// from the first plugin that has both series.
    pub ln_ppl_ratio: Option<(f64, f64)>,
    /// exp(ln_ppl_ratio); its uncertainty is ratio × the ln ratio's uncertainty.
    pub ppl_ratio: Option<f64>,
    pub perplexity: Option<PerplexityStats>,
}

/// Splits `"plugin.metric"` at the last dot.
fn split_key(key: &str) -> (&str, &str) {
    key.rsplit_once('.').unwrap_or(("", key))
}

fn first_with_metric<'a>(
    series: &'a BTreeMap<String, Vec<f64>>,
    metric: &str,
) -> Option<(&'a String, &'a Vec<f64>)> {
    series.iter().find(|(k, _)| split_key(k).1 == metric)
}

/// RMS Δp ± uncertainty (llama.cpp: MSE from `mean_and_uncertainty(Σp², Σp⁴)`).
fn rms(values: &[f64]) -> Option<(f64, f64)> {
    let (mut n, mut s2, mut s4) = (0usize, 0.0, 0.0);
    for v in finite(values) {
        let v2 = v * v;
        n += 1;
        s2 += v2;
        s4 += v2 * v2;
    }
    if n == 0 {
        return None;
    }
    let (mse, mse_err) = mean_and_uncertainty(s2, s4, n);
    let rms = mse.sqrt();
    let err = if rms > 0.0 { 0.5 / rms * mse_err } else { 0.0 };
    Some((rms, err))
}

/// Same-top fraction ± sqrt(p(1−p)/(n−1)).
fn proportion(values: &[f64]) -> Option<(f64, f64)> {
    let (mut n, mut hits) = (0usize, 0.0);
    for v in finite(values) {
        n += 1;
        hits += v;
    }
    if n == 0 {
        return None;
    }
    let p = hits / n as f64;
    let err = if n > 1 {
        (p * (1.0 - p) / (n - 1) as f64).max(0.0).sqrt()
    } else {
        0.0
    };
    Some((p, err))
}

/// ln(PPL(candidate)/PPL(main)) ± uncertainty, and the perplexities it comes from.
fn perplexity(nll_main: &[f64], nll_candidate: &[f64]) -> Option<((f64, f64), PerplexityStats)> {
    // "base" is main, "Q" is the candidate.
    let (mut n, mut sb, mut sb2, mut sq, mut sq2, mut sqb) = (0usize, 0.0, 0.0, 0.0, 0.0, 0.0);
    for (&b, &q) in nll_main.iter().zip(nll_candidate) {
        if !(b.is_finite() && q.is_finite()) {
            continue;
        }
        n += 1;
        sb += b;
        sb2 += b * b;
        sq += q;
        sq2 += q * q;
        sqb += q * b;
    }
    if n == 0 {
        return None;
    }
    let log_ppl = mean_and_uncertainty(sq, sq2, n);
    let log_ppl_base = mean_and_uncertainty(sb, sb2, n);
    let cov = covariance(sq, sb, sqb, n);
    let ratio = log_ppl.0 - log_ppl_base.0;
    let ratio_err = (log_ppl.1 * log_ppl.1 + log_ppl_base.1 * log_ppl_base.1 - 2.0 * cov)
        .max(0.0)
        .sqrt();
    let correlation = if log_ppl.1 > 0.0 && log_ppl_base.1 > 0.0 {
        cov / (log_ppl.1 * log_ppl_base.1)
    } else {
        0.0
    };
    let ppl = |(m, e): (f64, f64)| (m.exp(), m.exp() * e);
    Some((
        (ratio, ratio_err),
        PerplexityStats {
            n,
            ppl_main: ppl(log_ppl_base),
            ppl_candidate: ppl(log_ppl),
            correlation,
        },
    ))
}

/// Builds the report; sections whose series are missing are `None`.
pub fn build_report(input: &ReportInput) -> Report {
    let mut sources = BTreeMap::new();
    let series: BTreeMap<String, SeriesStats> = input
        .series
        .iter()
        .filter_map(|(k, v)| series_stats(v).map(|s| (k.clone(), s)))
        .collect();

    let mut section = |metric: &str| {
        let (key, values) = first_with_metric(&input.series, metric)?;
        sources.insert(metric.to_string(), key.clone());
        Some(values)
    };
    let kld = section(KLD).and_then(|v| series_stats(v));
    let delta_p_values = section(DELTA_P);
    let delta_p = delta_p_values.and_then(|v| series_stats(v));
    let rms_delta_p = delta_p_values.and_then(|v| rms(v));
    let same_top = section(SAME_TOP).and_then(|v| proportion(v));

    let nll = input.series.iter().find_map(|(key, main)| {
        let (plugin, metric) = split_key(key);
        if metric != NLL_MAIN {
            return None;
        }
        let candidate = input.series.get(&format!("{plugin}.{NLL_CANDIDATE}"))?;
        Some((plugin, main, candidate))
    });
    let (ln_ppl_ratio, perplexity) = match nll.and_then(|(plugin, main, candidate)| {
        sources.insert("nll".to_string(), plugin.to_string());
        perplexity(main, candidate)
    }) {
        Some((ratio, stats)) => (Some(ratio), Some(stats)),
        None => (None, None),
    };

    Report {
        comparisons_ok: input.comparisons_ok,
        comparisons_failed: input.comparisons_failed.clone(),
        comparisons_dropped: input.comparisons_dropped,
        positions: input.positions,
        aligned_positions: input.aligned_positions,
        series,
        sources,
        kld,
        delta_p,
        rms_delta_p,
        same_top,
        ppl_ratio: ln_ppl_ratio.map(|(r, _)| r.exp()),
        ln_ppl_ratio,
        perplexity,
    }
}

impl Report {
    /// Keys of the series a `llama-perplexity` section was built from.
    fn section_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = [KLD, DELTA_P, SAME_TOP]
            .iter()
            .filter_map(|m| self.sources.get(*m).cloned())
            .collect();
        if let Some(plugin) = self.sources.get("nll") {
            keys.push(format!("{plugin}.{NLL_MAIN}"));
            keys.push(format!("{plugin}.{NLL_CANDIDATE}"));
        }
        keys
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "====== Comparisons ======")?;
        writeln!(f, "Compared                      : {}", self.comparisons_ok)?;
        let failed: u64 = self.comparisons_failed.values().sum();
        write!(f, "Failed                        : {failed}")?;
        if !self.comparisons_failed.is_empty() {
            let reasons: Vec<String> = self
                .comparisons_failed
                .iter()
                .map(|(reason, n)| format!("{reason}: {n}"))
                .collect();
            write!(f, " ({})", reasons.join(", "))?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "Dropped                       : {}",
            self.comparisons_dropped
        )?;
        writeln!(f, "Positions                     : {}", self.positions)?;
        writeln!(
            f,
            "Aligned positions             : {}",
            self.aligned_positions
        )?;

        if let (Some((lr, lr_err)), Some(p)) = (self.ln_ppl_ratio, &self.perplexity) {
            let src = self.sources.get("nll").map(String::as_str).unwrap_or("");
            writeln!(f)?;
            writeln!(
                f,
                "====== Perplexity statistics ({src}, n = {}) ======",
                p.n
            )?;
            let (q, q_err) = p.ppl_candidate;
            let (b, b_err) = p.ppl_main;
            writeln!(f, "{:<33}: {q:10.6} ± {q_err:10.6}", "Mean PPL(candidate)")?;
            writeln!(f, "{:<33}: {b:10.6} ± {b_err:10.6}", "Mean PPL(main)")?;
            writeln!(
                f,
                "Cor(ln(PPL(cand)), ln(PPL(main))): {:6.2}%",
                100.0 * p.correlation
            )?;
            writeln!(
                f,
                "Mean ln(PPL(candidate)/PPL(main)): {lr:10.6} ± {lr_err:10.6}"
            )?;
            let ratio = lr.exp();
            writeln!(
                f,
                "Mean PPL(candidate)/PPL(main)    : {ratio:10.6} ± {:10.6}",
                ratio * lr_err
            )?;
        }

        if let Some(k) = &self.kld {
            let src = self.sources.get(KLD).map(String::as_str).unwrap_or("");
            writeln!(f)?;
            writeln!(
                f,
                "====== KL divergence statistics ({src}, n = {}) ======",
                k.n
            )?;
            writeln!(f, "Mean    KLD: {:10.6} ± {:10.6}", k.mean, k.mean_err)?;
            for (label, v) in [
                ("Maximum", k.max),
                ("99.9%  ", k.p99_9),
                ("99.0%  ", k.p99),
                ("95.0%  ", k.p95),
                ("90.0%  ", k.p90),
                ("Median ", k.median),
                ("10.0%  ", k.p10),
                (" 5.0%  ", k.p5),
                (" 1.0%  ", k.p1),
                (" 0.1%  ", k.p0_1),
                ("Minimum", k.min),
            ] {
                writeln!(f, "{label} KLD: {v:10.6}")?;
            }
        }

        if self.delta_p.is_some() || self.same_top.is_some() {
            writeln!(f)?;
            writeln!(f, "====== Token probability statistics ======")?;
        }
        if let Some(d) = &self.delta_p {
            writeln!(
                f,
                "Mean    Δp: {:6.3} ± {:5.3} %",
                100.0 * d.mean,
                100.0 * d.mean_err
            )?;
            for (label, v) in [
                ("Maximum", d.max),
                ("99.9%  ", d.p99_9),
                ("99.0%  ", d.p99),
                ("95.0%  ", d.p95),
                ("90.0%  ", d.p90),
                ("75.0%  ", d.p75),
                ("Median ", d.median),
                ("25.0%  ", d.p25),
                ("10.0%  ", d.p10),
                (" 5.0%  ", d.p5),
                (" 1.0%  ", d.p1),
                (" 0.1%  ", d.p0_1),
                ("Minimum", d.min),
            ] {
                writeln!(f, "{label} Δp: {:6.3}%", 100.0 * v)?;
            }
        }
        if let Some((rms, err)) = self.rms_delta_p {
            writeln!(f, "RMS Δp    : {:6.3} ± {:5.3} %", 100.0 * rms, 100.0 * err)?;
        }
        if let Some((p, err)) = self.same_top {
            writeln!(f, "Same top p: {:6.3} ± {:5.3} %", 100.0 * p, 100.0 * err)?;
        }

        let shown = self.section_keys();
        let others: Vec<(&String, &SeriesStats)> = self
            .series
            .iter()
            .filter(|(k, _)| !shown.contains(k))
            .collect();
        if !others.is_empty() {
            writeln!(f)?;
            writeln!(f, "====== Other series ======")?;
            let width = others.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
            for (key, s) in others {
                writeln!(
                    f,
                    "{key:<width$}: mean {:10.6} ± {:10.6}, median {:10.6}, min {:10.6}, max {:10.6} (n = {})",
                    s.mean, s.mean_err, s.median, s.min, s.max, s.n
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * (1.0 + b.abs())
    }

    macro_rules! assert_close {
        ($a:expr, $b:expr) => {{
            let (a, b): (f64, f64) = ($a, $b);
            assert!(close(a, b), "{} = {a}, expected {b}", stringify!($a));
        }};
    }

    /// i² for i = 0..=10, shuffled: 0, 1, 4, 9, ..., 100 once sorted.
    fn squares() -> Vec<f64> {
        [5, 1, 9, 3, 7, 2, 8, 4, 10, 6, 0]
            .iter()
            .map(|&i: &i32| f64::from(i * i))
            .collect()
    }

    #[test]
    fn series_stats_worked_by_hand() {
        let s = series_stats(&squares()).unwrap();
        assert_eq!(s.n, 11);
        // Σi² = 385 → mean 35. Σi⁴ = 25333 → Σv²/n = 2303; variance 2303 − 35² = 1078;
        // error sqrt(1078 / (11 − 1)) = sqrt(107.8).
        assert_close!(s.mean, 35.0);
        assert_close!(s.mean_err, 107.8f64.sqrt());
        assert_close!(s.mean_err, 10.382677881933928);
        // Percentile at fraction f: position f·(11 − 1) = 10f, interpolated between (⌊10f⌋)² and (⌊10f⌋+1)².
        assert_close!(s.max, 100.0);
        assert_close!(s.p99_9, 0.01 * 81.0 + 0.99 * 100.0); // 9.99 → 99.81
        assert_close!(s.p99, 0.1 * 81.0 + 0.9 * 100.0); // 9.9 → 98.1
        assert_close!(s.p95, 0.5 * 81.0 + 0.5 * 100.0); // 9.5 → 90.5
        assert_close!(s.p90, 81.0); // 9.0
        assert_close!(s.p75, 0.5 * 49.0 + 0.5 * 64.0); // 7.5 → 56.5
        assert_close!(s.median, 25.0); // the 6th of 11
        assert_close!(s.p25, 0.5 * 4.0 + 0.5 * 9.0); // 2.5 → 6.5
        assert_close!(s.p10, 1.0); // 1.0
        assert_close!(s.p5, 0.5); // 0.5 → between 0 and 1
        assert_close!(s.p1, 0.1); // 0.1
        assert_close!(s.p0_1, 0.01); // 0.01
        assert_close!(s.min, 0.0);
    }

    #[test]
    fn even_count_median_and_no_error_at_ten_or_fewer() {
        let s = series_stats(&[10.0, 1.0, 3.0, 2.0]).unwrap();
        assert_close!(s.median, 2.5); // (2 + 3) / 2
        assert_close!(s.mean, 4.0);
        // llama.cpp reports no uncertainty until there are more than 10 values.
        assert_eq!(s.mean_err, 0.0);
        let ten: Vec<f64> = (0..10).map(f64::from).collect();
        assert_eq!(series_stats(&ten).unwrap().mean_err, 0.0);
        // A constant series has zero variance and so zero error.
        let s = series_stats(&[0.25; 20]).unwrap();
        assert_eq!((s.mean, s.mean_err, s.min, s.max), (0.25, 0.0, 0.25, 0.25));
    }

    #[test]
    fn non_finite_values_are_skipped() {
        let mut v = squares();
        v.insert(3, f64::NAN);
        v.push(f64::INFINITY);
        v.insert(0, f64::NEG_INFINITY);
        let s = series_stats(&v).unwrap();
        assert_eq!(s.n, 11);
        assert_close!(s.mean, 35.0);
        assert_close!(s.max, 100.0);
        assert_close!(s.min, 0.0);
        assert_close!(s.median, 25.0);
        assert!(series_stats(&[]).is_none());
        assert!(series_stats(&[f64::NAN, f64::INFINITY]).is_none());
    }

    #[test]
    fn same_top_proportion_and_error() {
        // 8 of 11 positions agree: p = 8/11; error sqrt(p(1 − p)/(n − 1)) = sqrt((8/11)(3/11)/10) = sqrt(24/1210).
        let v = [1., 1., 0., 1., 1., 1., 0., 1., 1., 0., 1.];
        let (p, err) = proportion(&v).unwrap();
        assert_close!(p, 8.0 / 11.0);
        assert_close!(err, (24.0f64 / 1210.0).sqrt());
        assert_close!(err, 0.14083575804390647);
        // One position: no error rather than a division by zero.
        assert_eq!(proportion(&[1.0]), Some((1.0, 0.0)));
        assert_eq!(proportion(&[]), None);
    }

    #[test]
    fn rms_delta_p_and_mean_delta_p() {
        // Six ±0.1, four ±0.2, one 0.
        let v = [0.1, -0.1, 0.2, -0.2, 0.1, -0.1, 0.2, -0.2, 0.1, -0.1, 0.0];
        // Σp² = 6·0.01 + 4·0.04 = 0.22 → MSE 0.02, RMS sqrt(0.02).
        // Σp⁴ = 6·1e-4 + 4·16e-4 = 0.007 → var(p²) = 0.007/11 − 0.02² = 0.0026/11;
        // MSE error sqrt(0.0026/11/10); RMS error = 0.5/RMS · MSE error.
        let (rms_v, rms_err) = rms(&v).unwrap();
        assert_close!(rms_v, 0.02f64.sqrt());
        let mse_err = (0.0026f64 / 110.0).sqrt();
        assert_close!(rms_err, 0.5 / 0.02f64.sqrt() * mse_err);
        assert_close!(rms_err, 0.017188791273808214);
        // Mean Δp = 0, error sqrt((0.02 − 0)/10).
        let s = series_stats(&v).unwrap();
        assert!(s.mean.abs() < 1e-15);
        assert_close!(s.mean_err, 0.002f64.sqrt());
        // All zero: RMS 0 ± 0 instead of 0.5/0 · 0.
        assert_eq!(rms(&[0.0; 12]), Some((0.0, 0.0)));
    }

    #[test]
    fn ln_ppl_ratio_with_covariance() {
        // nll_main = i, nll_candidate = i + 1 for even i, i for odd i (i = 0..=10).
        let main: Vec<f64> = (0..=10).map(f64::from).collect();
        let cand: Vec<f64> = (0..=10)
            .map(|i| f64::from(i) + if i % 2 == 0 { 1.0 } else { 0.0 })
            .collect();
        let ((ratio, err), p) = perplexity(&main, &cand).unwrap();
        // The difference is 1 at the six even positions: mean 6/11.
        assert_close!(ratio, 6.0 / 11.0);
        // err_q² + err_b² − 2·cov is the variance of the mean difference:
        // var(d) = 6/11 − (6/11)² = 30/121, over n − 1 = 10 → sqrt(3/121) = sqrt(3)/11.
        assert_close!(err, 3f64.sqrt() / 11.0);
        // PPL(main) = e^mean(i) = e^5, error e^5 · sqrt((385/11 − 25)/10) = e^5 · 1.
        assert_close!(p.ppl_main.0, 5f64.exp());
        assert_close!(p.ppl_main.1, 5f64.exp());
        assert_close!(p.ppl_candidate.0, (5.0 + 6.0 / 11.0f64).exp());
        assert_eq!(p.n, 11);
        // Hand-computed correlation: Σq = 61, Σq² = 451, Σqb = 415, Σb = 55, Σb² = 385.
        // cov = (415/11 − 5·61/11)/10 = 1; err_q² = (451/11 − (61/11)²)/10 = 1240/1210; err_b² = 1.
        assert_close!(p.correlation, 1.0 / (1240.0f64 / 1210.0).sqrt());
        // A pair with a non-finite member is skipped.
        let mut main2 = main.clone();
        let mut cand2 = cand.clone();
        main2.push(f64::NAN);
        cand2.push(3.0);
        let ((r2, e2), _) = perplexity(&main2, &cand2).unwrap();
        assert_close!(r2, 6.0 / 11.0);
        assert_close!(e2, 3f64.sqrt() / 11.0);
    }

    fn input() -> ReportInput {
        let main: Vec<f64> = (0..=10).map(f64::from).collect();
        let cand: Vec<f64> = (0..=10)
            .map(|i| f64::from(i) + if i % 2 == 0 { 1.0 } else { 0.0 })
            .collect();
        let mut series = BTreeMap::new();
        series.insert("kl.kld".to_string(), squares());
        series.insert(
            "kl.delta_p".to_string(),
            vec![0.1, -0.1, 0.2, -0.2, 0.1, -0.1, 0.2, -0.2, 0.1, -0.1, 0.0],
        );
        series.insert(
            "kl.same_top".to_string(),
            vec![1., 1., 0., 1., 1., 1., 0., 1., 1., 0., 1.],
        );
        series.insert("kl.nll_main".to_string(), main);
        series.insert("kl.nll_candidate".to_string(), cand);
        series.insert("top.top_overlap".to_string(), vec![0.5; 11]);
        ReportInput {
            comparisons_ok: 3,
            comparisons_failed: BTreeMap::from([("timeout".to_string(), 2)]),
            comparisons_dropped: 1,
            positions: 12,
            aligned_positions: 11,
            series,
        }
    }

    #[test]
    fn report_sections() {
        let r = build_report(&input());
        assert_eq!(r.series.len(), 6);
        assert_close!(r.kld.as_ref().unwrap().mean, 35.0);
        assert_close!(r.kld.as_ref().unwrap().p99, 98.1);
        assert!(r.delta_p.as_ref().unwrap().mean.abs() < 1e-15);
        assert_close!(r.rms_delta_p.unwrap().0, 0.02f64.sqrt());
        assert_close!(r.same_top.unwrap().0, 8.0 / 11.0);
        assert_close!(r.same_top.unwrap().1, (24.0f64 / 1210.0).sqrt());
        assert_close!(r.ln_ppl_ratio.unwrap().0, 6.0 / 11.0);
        assert_close!(r.ln_ppl_ratio.unwrap().1, 3f64.sqrt() / 11.0);
        assert_close!(r.ppl_ratio.unwrap(), (6.0f64 / 11.0).exp());
        assert_eq!(r.sources["kld"], "kl.kld");
        assert_eq!(r.sources["nll"], "kl");

        let text = r.to_string();
        for line in [
            "Compared                      : 3",
            "Failed                        : 2 (timeout: 2)",
            "Dropped                       : 1",
            "Aligned positions             : 11",
            "====== KL divergence statistics (kl.kld, n = 11) ======",
            "Mean    KLD:  35.000000 ±  10.382678",
            "Maximum KLD: 100.000000",
            "99.9%   KLD:  99.810000",
            "Median  KLD:  25.000000",
            " 0.1%   KLD:   0.010000",
            "Minimum KLD:   0.000000",
            "====== Token probability statistics ======",
            "Mean    Δp:  0.000 ± 4.472 %",
            "Maximum Δp: 20.000%",
            "Minimum Δp: -20.000%",
            "RMS Δp    : 14.142 ± 1.719 %",
            "Same top p: 72.727 ± 14.084 %",
            "Mean ln(PPL(candidate)/PPL(main)):   0.545455 ±   0.157459",
            "Mean PPL(candidate)/PPL(main)    :   1.725392 ±   0.271679",
            "Mean PPL(main)                   : 148.413159 ± 148.413159",
            "Cor(ln(PPL(cand)), ln(PPL(main))):  98.78%",
            "top.top_overlap: mean   0.500000 ±   0.000000, median   0.500000, min   0.500000, max   0.500000 (n = 11)",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        // Series used by a section are not repeated among the others.
        assert!(!text.contains("kl.kld:"), "{text}");
    }

    #[test]
    fn empty_report() {
        let r = build_report(&ReportInput::default());
        assert!(r.series.is_empty());
        assert!(r.kld.is_none() && r.delta_p.is_none() && r.rms_delta_p.is_none());
        assert!(r.same_top.is_none() && r.ln_ppl_ratio.is_none() && r.ppl_ratio.is_none());
        assert!(r.perplexity.is_none());
        let text = r.to_string();
        assert!(text.contains("Compared                      : 0"), "{text}");
        assert!(!text.contains("KLD"), "{text}");
        // Series with only NaN produce no section either.
        let mut input = ReportInput::default();
        input.series.insert("kl.kld".into(), vec![f64::NAN; 3]);
        let r = build_report(&input);
        assert!(r.kld.is_none() && r.series.is_empty());
    }
}
