//! Live counters for Prometheus: requests proxied, comparisons and their cost, plugin calls,
//! and every plugin metric (scalars as gauges, per-position series as histograms with the
//! configured buckets). [`Metrics::render`] writes the text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::plugins::MetricValue;
use crate::queue::{ComparisonOutcome, QueueStats};
use crate::record::PositionStatus;

/// A cumulative histogram.
#[derive(Debug, Clone)]
struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &[f64]) -> Histogram {
        Histogram {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        if !v.is_finite() {
            return;
        }
        for (b, c) in self.bounds.iter().zip(self.counts.iter_mut()) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Debug, Default)]
struct PluginCounters {
    calls: u64,
    failures: BTreeMap<&'static str, u64>,
    seconds: f64,
}

/// The live counters, shared by the proxy and the workers.
#[derive(Debug)]
pub struct Metrics {
    /// Requests by (endpoint label, status code).
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// Candidate time per comparison, seconds.
    candidate_seconds: Mutex<Histogram>,
    candidate_requests: AtomicU64,
    candidate_tokens: AtomicU64,
    positions_scored: AtomicU64,
    positions_aligned: AtomicU64,
    plugins: Mutex<BTreeMap<String, PluginCounters>>,
    /// Per-position plugin series, by (plugin, metric).
    series: Mutex<BTreeMap<(String, String), Histogram>>,
    /// Last value of each scalar plugin metric, by (plugin, metric).
    scalars: Mutex<BTreeMap<(String, String), f64>>,
    buckets: Vec<f64>,
}

/// Metric names allow `[a-zA-Z0-9_]`; anything else becomes `_`.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Metrics {
    pub fn new(buckets: Vec<f64>) -> Metrics {
        Metrics {
            requests: Mutex::default(),
            candidate_seconds: Mutex::new(Histogram::new(&[
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ])),
            candidate_requests: AtomicU64::new(0),
            candidate_tokens: AtomicU64::new(0),
            positions_scored: AtomicU64::new(0),
            positions_aligned: AtomicU64::new(0),
            plugins: Mutex::default(),
            series: Mutex::default(),
            scalars: Mutex::default(),
            buckets,
        }
    }

    /// One proxied request answered with `status`.
    pub fn request(&self, endpoint: &'static str, status: u16) {
        if let Ok(mut r) = self.requests.lock() {
            *r.entry((endpoint, status)).or_default() += 1;
        }
    }

    /// One comparison settled, its candidate work having taken `elapsed`.
    pub fn outcome(&self, o: &ComparisonOutcome, elapsed: Duration) {
        let Ok(record) = &o.record else { return };
        if let Ok(mut h) = self.candidate_seconds.lock() {
            h.observe(elapsed.as_secs_f64());
        }
        self.candidate_requests
            .fetch_add(u64::from(record.candidate_requests), Ordering::Relaxed);
        self.candidate_tokens.fetch_add(
            u64::from(record.candidate_tokens_decoded),
            Ordering::Relaxed,
        );
        self.positions_scored
            .fetch_add(record.positions.len() as u64, Ordering::Relaxed);
        self.positions_aligned
            .fetch_add(record.aligned().count() as u64, Ordering::Relaxed);
        for p in &o.plugins {
            if let Ok(mut plugins) = self.plugins.lock() {
                let c = plugins.entry(p.plugin.clone()).or_default();
                c.calls += 1;
                c.seconds += p.elapsed.as_secs_f64();
                if let Err(f) = &p.result {
                    *c.failures.entry(f.reason()).or_default() += 1;
                }
            }
            let Ok(metrics) = &p.result else { continue };
            for m in metrics {
                let key = (p.plugin.clone(), m.name.clone());
                match &m.value {
                    MetricValue::Scalar(v) => {
                        if let Ok(mut s) = self.scalars.lock() {
                            s.insert(key, *v);
                        }
                    }
                    MetricValue::PerPosition(values) => {
                        if let Ok(mut s) = self.series.lock() {
                            let h = s
                                .entry(key)
                                .or_insert_with(|| Histogram::new(&self.buckets));
                            for (v, pos) in values.iter().zip(&record.positions) {
                                if pos.status == PositionStatus::Aligned {
                                    h.observe(*v);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// The Prometheus text exposition of everything, with the queue's counters.
    pub fn render(&self, queue: Option<(&QueueStats, usize)>) -> String {
        let mut out = String::with_capacity(4096);
        let o = &mut out;
        let _ = writeln!(
            o,
            "# HELP klproxy_requests_total Requests proxied, by endpoint and status."
        );
        let _ = writeln!(o, "# TYPE klproxy_requests_total counter");
        if let Ok(r) = self.requests.lock() {
            for ((e, s), n) in r.iter() {
                let _ = writeln!(
                    o,
                    "klproxy_requests_total{{endpoint=\"{e}\",status=\"{s}\"}} {n}"
                );
            }
        }
        if let Some((q, depth)) = queue {
            let _ = writeln!(
                o,
                "# HELP klproxy_comparisons_total Comparisons by outcome."
            );
            let _ = writeln!(o, "# TYPE klproxy_comparisons_total counter");
            let _ = writeln!(
                o,
                "klproxy_comparisons_total{{status=\"ok\",reason=\"\"}} {}",
                q.ok.load(Ordering::Acquire)
            );
            if let Ok(f) = q.failures.lock() {
                for (reason, n) in f.iter() {
                    let _ = writeln!(
                        o,
                        "klproxy_comparisons_total{{status=\"failed\",reason=\"{reason}\"}} {n}"
                    );
                }
            }
            let _ = writeln!(
                o,
                "klproxy_comparisons_total{{status=\"dropped\",reason=\"\"}} {}",
                q.dropped.load(Ordering::Acquire)
            );
            let _ = writeln!(o, "# HELP klproxy_queue_depth Comparison jobs waiting.");
            let _ = writeln!(o, "# TYPE klproxy_queue_depth gauge");
            let _ = writeln!(o, "klproxy_queue_depth {depth}");
            let _ = writeln!(
                o,
                "# HELP klproxy_comparisons_in_flight Comparisons being scored."
            );
            let _ = writeln!(o, "# TYPE klproxy_comparisons_in_flight gauge");
            let _ = writeln!(
                o,
                "klproxy_comparisons_in_flight {}",
                q.in_flight.load(Ordering::Acquire)
            );
        }
        for (name, help, v) in [
            (
                "klproxy_candidate_requests_total",
                "Requests sent to the candidate.",
                &self.candidate_requests,
            ),
            (
                "klproxy_candidate_tokens_total",
                "Tokens the candidate decoded.",
                &self.candidate_tokens,
            ),
            (
                "klproxy_positions_scored_total",
                "Main-response positions scored.",
                &self.positions_scored,
            ),
            (
                "klproxy_positions_aligned_total",
                "Positions whose distributions were compared.",
                &self.positions_aligned,
            ),
        ] {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} counter");
            let _ = writeln!(o, "{name} {}", v.load(Ordering::Relaxed));
        }
        let _ = writeln!(
            o,
            "# HELP klproxy_candidate_seconds Candidate time per comparison."
        );
        let _ = writeln!(o, "# TYPE klproxy_candidate_seconds histogram");
        if let Ok(h) = self.candidate_seconds.lock() {
            h.render(o, "klproxy_candidate_seconds", "");
        }
        if let Ok(p) = self.plugins.lock() {
            let _ = writeln!(o, "# HELP klproxy_plugin_calls_total Plugin calls.");
            let _ = writeln!(o, "# TYPE klproxy_plugin_calls_total counter");
            for (name, c) in p.iter() {
                let _ = writeln!(
                    o,
                    "klproxy_plugin_calls_total{{plugin=\"{name}\"}} {}",
                    c.calls
                );
            }
            let _ = writeln!(
                o,
                "# HELP klproxy_plugin_failures_total Failed plugin calls, by reason."
            );
            let _ = writeln!(o, "# TYPE klproxy_plugin_failures_total counter");
            for (name, c) in p.iter() {
                for (reason, n) in &c.failures {
                    let _ = writeln!(o, "klproxy_plugin_failures_total{{plugin=\"{name}\",reason=\"{reason}\"}} {n}");
                }
            }
            let _ = writeln!(
                o,
                "# HELP klproxy_plugin_seconds_total Time spent in plugin calls."
            );
            let _ = writeln!(o, "# TYPE klproxy_plugin_seconds_total counter");
            for (name, c) in p.iter() {
                let _ = writeln!(
                    o,
                    "klproxy_plugin_seconds_total{{plugin=\"{name}\"}} {}",
                    c.seconds
                );
            }
        }
        if let Ok(s) = self.scalars.lock() {
            for ((plugin, metric), v) in s.iter() {
                let name = format!("klproxy_plugin_{}_{}", sanitize(plugin), sanitize(metric));
                let _ = writeln!(
                    o,
                    "# HELP {name} Last value of {plugin}'s scalar `{metric}`."
                );
                let _ = writeln!(o, "# TYPE {name} gauge");
                let _ = writeln!(o, "{name} {v}");
            }
        }
        if let Ok(s) = self.series.lock() {
            for ((plugin, metric), h) in s.iter() {
                let name = format!("klproxy_plugin_{}_{}", sanitize(plugin), sanitize(metric));
                let _ = writeln!(
                    o,
                    "# HELP {name} {plugin}'s per-position `{metric}` over aligned positions."
                );
                let _ = writeln!(o, "# TYPE {name} histogram");
                h.render(o, &name, "");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.5, 5.0, f64::NAN] {
            h.observe(v);
        }
        let mut s = String::new();
        h.render(&mut s, "x", "");
        assert!(s.contains("x_bucket{le=\"0.1\"} 1\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"1\"} 2\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 3\n"), "{s}");
        assert!(s.contains("x_count 3\n"), "{s}");
    }

    #[test]
    fn names_are_sanitized() {
        assert_eq!(sanitize("top-overlap.x"), "top_overlap_x");
    }
}
