//! `kl-proxy eval`: runs the proxy in-process, sends each chat request of a JSONL prompt set
//! through it (the same path an app's requests take), waits until every comparison has
//! settled, and summarises what was found.

use std::collections::BTreeMap;
use std::fmt;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::plugins::MetricValue;
use crate::queue::ComparisonOutcome;
use crate::record::PositionStatus;
use crate::service::Service;
use crate::upstream::Upstream;

/// Reads a JSONL prompt set: each line a chat request (`{"messages": [...], ...}`) or
/// `{"prompt": "text"}` (sent as one user message). Blank lines and `#` comments are skipped.
pub fn load_prompts(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read prompts file {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))?;
        let req = match (v.get("messages"), v.get("prompt").and_then(Value::as_str)) {
            (Some(Value::Array(_)), _) => v,
            (_, Some(p)) => json!({"messages": [{"role": "user", "content": p}]}),
            _ => anyhow::bail!(
                "{} line {}: needs `messages` (a list) or `prompt` (a string)",
                path.display(),
                i + 1
            ),
        };
        out.push(req);
    }
    anyhow::ensure!(!out.is_empty(), "{} holds no prompts", path.display());
    Ok(out)
}

/// What an eval run found.
#[derive(Debug, Default, serde::Serialize)]
pub struct EvalSummary {
    /// Requests sent.
    pub requests: usize,
    /// Requests the target answered with a 2xx.
    pub answered: usize,
    /// Comparisons that produced a record / failed / were dropped.
    pub compared: usize,
    pub failed: usize,
    pub dropped: u64,
    /// Failures by reason.
    pub failures: BTreeMap<String, usize>,
    /// Positions in all records, and how many of them were aligned.
    pub positions: usize,
    pub aligned: usize,
    /// Candidate requests and tokens decoded, over all records.
    pub candidate_requests: u64,
    pub candidate_tokens: u64,
    /// Positions where the candidate's pick was the main's token, over aligned positions.
    pub same_pick: usize,
    /// Mean of each per-position plugin series over all aligned positions, `plugin.metric`.
    pub plugin_means: BTreeMap<String, f64>,
    /// Failed plugin calls by plugin.
    pub plugin_failures: BTreeMap<String, usize>,
    /// Wall time of the run.
    pub seconds: f64,
}

impl EvalSummary {
    fn add(&mut self, o: &ComparisonOutcome, sums: &mut BTreeMap<String, (f64, usize)>) {
        match &o.record {
            Err(f) => {
                self.failed += 1;
                *self.failures.entry(f.reason.to_owned()).or_default() += 1;
            }
            Ok(r) => {
                self.compared += 1;
                self.positions += r.positions.len();
                self.candidate_requests += u64::from(r.candidate_requests);
                self.candidate_tokens += u64::from(r.candidate_tokens_decoded);
                for p in r.aligned() {
                    self.aligned += 1;
                    if p.candidate_pick == Some(p.main.id) {
                        self.same_pick += 1;
                    }
                }
                for po in &o.plugins {
                    match &po.result {
                        Err(_) => *self.plugin_failures.entry(po.plugin.clone()).or_default() += 1,
                        Ok(metrics) => {
                            for m in metrics {
                                if let MetricValue::PerPosition(values) = &m.value {
                                    let e = sums
                                        .entry(format!("{}.{}", po.plugin, m.name))
                                        .or_default();
                                    for (v, p) in values.iter().zip(&r.positions) {
                                        if p.status == PositionStatus::Aligned && v.is_finite() {
                                            e.0 += v;
                                            e.1 += 1;
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

impl fmt::Display for EvalSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        writeln!(
            f,
            "requests            {} sent, {} answered",
            self.requests, self.answered
        )?;
        writeln!(
            f,
            "comparisons         {} ok, {} failed, {} dropped",
            self.compared, self.failed, self.dropped
        )?;
        for (reason, n) in &self.failures {
            writeln!(f, "  failed: {reason:<16} {n}")?;
        }
        writeln!(
            f,
            "positions           {} ({} aligned, coverage {:.1}%)",
            self.positions,
            self.aligned,
            100.0 * ratio(self.aligned as f64, self.positions as f64)
        )?;
        writeln!(
            f,
            "candidate requests  {:.2} per response, {:.2} tokens decoded per main token",
            ratio(self.candidate_requests as f64, self.compared as f64),
            ratio(self.candidate_tokens as f64, self.positions as f64)
        )?;
        writeln!(
            f,
            "top-1 agreement     {:.1}%",
            100.0 * ratio(self.same_pick as f64, self.aligned as f64)
        )?;
        for (name, mean) in &self.plugin_means {
            writeln!(f, "mean {name:<26} {mean:.6}")?;
        }
        for (name, n) in &self.plugin_failures {
            writeln!(f, "plugin {name}: {n} failed calls")?;
        }
        write!(f, "time                {:.1} s", self.seconds)
    }
}

/// Runs the prompt set through an in-process proxy built from `config`.
pub async fn run(
    config: Config,
    prompts: &Path,
    concurrency: usize,
) -> anyhow::Result<EvalSummary> {
    let prompts = load_prompts(prompts)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let service = Service::start(config, listener).await?;
    let mut outcomes = service
        .subscribe()
        .context("eval needs comparisons: sample_rate is 0")?;
    let stats = service.stats().context("comparisons are off")?;
    let base: http::Uri = format!("http://{}", service.addr).parse()?;
    let client = Upstream::new(&base, Duration::from_secs(600), &[]);
    let start = Instant::now();
    let progress = Progress::new(prompts.len());

    let mut summary = EvalSummary {
        requests: prompts.len(),
        ..EvalSummary::default()
    };
    let mut sums = BTreeMap::new();
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut sends = tokio::task::JoinSet::new();
    for p in prompts {
        let (client, sem) = (client.clone(), sem.clone());
        sends.spawn(async move {
            let _permit = sem.acquire_owned().await;
            client.post_json("/v1/chat/completions", &p).await
        });
    }
    let mut sent = 0;
    while sent < summary.requests {
        tokio::select! {
            done = sends.join_next() => {
                let Some(done) = done else { break };
                sent += 1;
                match done {
                    Ok(Ok(_)) => summary.answered += 1,
                    Ok(Err(e)) => progress.note(&format!("request failed: {e}")),
                    Err(e) => progress.note(&format!("request task failed: {e}")),
                }
                progress.update(sent, summary.compared + summary.failed);
            }
            Ok(o) = outcomes.recv() => {
                summary.add(&o, &mut sums);
                progress.update(sent, summary.compared + summary.failed);
            }
        }
    }
    // Every answer is sent; wait until every comparison has settled.
    while stats.pending() > 0 {
        match tokio::time::timeout(Duration::from_millis(200), outcomes.recv()).await {
            Ok(Ok(o)) => {
                summary.add(&o, &mut sums);
                progress.update(sent, summary.compared + summary.failed);
            }
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(n))) => {
                progress.note(&format!("{n} outcomes missed by the summary"));
            }
            Ok(Err(_)) => break,
            Err(_) => {}
        }
    }
    while let Ok(o) = outcomes.try_recv() {
        summary.add(&o, &mut sums);
    }
    progress.finish();
    summary.dropped = stats.dropped.load(Ordering::Acquire);
    summary.plugin_means = sums
        .into_iter()
        .filter(|(_, (_, n))| *n > 0)
        .map(|(k, (s, n))| (k, s / n as f64))
        .collect();
    summary.seconds = start.elapsed().as_secs_f64();
    service.shutdown().await?;
    Ok(summary)
}

/// A progress bar on a terminal, plain lines otherwise.
struct Progress {
    total: usize,
    tty: bool,
}

impl Progress {
    fn new(total: usize) -> Progress {
        Progress {
            total,
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn update(&self, sent: usize, compared: usize) {
        if self.tty {
            let width = 30;
            let filled = width * compared.min(self.total) / self.total.max(1);
            eprint!(
                "\r[{}{}] {sent}/{} answered, {compared} compared ",
                "#".repeat(filled),
                ".".repeat(width - filled),
                self.total
            );
        } else {
            eprintln!("eval: {sent}/{} answered, {compared} compared", self.total);
        }
    }

    fn note(&self, msg: &str) {
        if self.tty {
            eprintln!();
        }
        eprintln!("eval: {msg}");
    }

    fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}
