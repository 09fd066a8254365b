//! The comparison queue: a bounded channel between the response path and the background
//! workers that score each captured [`MainResponse`] under the candidate and hand the
//! [`AlignedRecord`] to the plugins. The response path only ever calls
//! [`ComparisonQueue::submit`], which never waits: a full queue drops the job and counts it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::candidate::CandidateScorer;
use crate::plugins::{PluginOutcome, PluginSet};
use crate::record::{AlignedRecord, MainResponse};

/// Counters of what happened to the responses offered for comparison. Every accepted job
/// ends in exactly one of `ok`, `failed` or `dropped`.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Responses offered to the queue (complete, usable captures of sampled requests).
    pub offered: AtomicU64,
    /// Comparisons that produced a record.
    pub ok: AtomicU64,
    /// Comparisons that failed (by reason in `failures`).
    pub failed: AtomicU64,
    /// Jobs dropped: queue full, or still queued when shutdown ran out of time.
    pub dropped: AtomicU64,
    /// Jobs being scored right now.
    pub in_flight: AtomicU64,
    /// Failed comparisons by reason (`prompt_mismatch`, `candidate_down`, ...).
    pub failures: Mutex<BTreeMap<&'static str, u64>>,
    /// Unix seconds of the last "queue full" warning (warned at most once a minute).
    last_full_warning: AtomicU64,
}

impl QueueStats {
    /// Jobs offered but not yet settled (queued or in flight).
    pub fn pending(&self) -> u64 {
        let settled = self.ok.load(Ordering::Acquire)
            + self.failed.load(Ordering::Acquire)
            + self.dropped.load(Ordering::Acquire);
        self.offered.load(Ordering::Acquire).saturating_sub(settled)
    }

    fn fail(&self, reason: &'static str) -> u64 {
        if let Ok(mut f) = self.failures.lock() {
            *f.entry(reason).or_default() += 1;
        }
        self.failed.fetch_add(1, Ordering::AcqRel)
    }
}

/// What one comparison produced, published to whoever listens (eval, tests, the store).
#[derive(Debug)]
pub struct ComparisonOutcome {
    /// The main response as captured on the response path.
    pub main: Arc<MainResponse>,
    /// The record, or why there is none.
    pub record: Result<AlignedRecord, ComparisonFailure>,
    /// What each plugin returned for the record (empty when scoring failed).
    pub plugins: Vec<PluginOutcome>,
}

/// Why a comparison produced no record.
#[derive(Debug, Clone)]
pub struct ComparisonFailure {
    /// Short label: `prompt_mismatch`, `candidate_down`, `timeout`, `bad_answer`, `unsupported`.
    pub reason: &'static str,
    /// What went wrong, for people.
    pub message: String,
    /// When the main response completed, ms since the Unix epoch.
    pub time_ms: u64,
}

/// The plugins in use; replaced as a whole when the config is reloaded.
#[derive(Default)]
pub struct ActivePlugins {
    current: RwLock<Option<Arc<PluginSet>>>,
}

impl ActivePlugins {
    pub fn new(set: Option<PluginSet>) -> ActivePlugins {
        ActivePlugins {
            current: RwLock::new(set.map(Arc::new)),
        }
    }

    /// Swaps in a new set; records already being compared finish with the old one.
    pub fn replace(&self, set: PluginSet) {
        if let Ok(mut cur) = self.current.write() {
            *cur = Some(Arc::new(set));
        }
    }

    pub fn get(&self) -> Option<Arc<PluginSet>> {
        self.current.read().ok().and_then(|c| c.clone())
    }
}

/// The sending side, cloned into every response that may be compared.
#[derive(Clone)]
pub struct ComparisonQueue {
    tx: mpsc::Sender<MainResponse>,
    stats: Arc<QueueStats>,
    closed: Arc<AtomicBool>,
}

impl ComparisonQueue {
    /// Offers a captured response; never waits. A full or closed queue drops it and counts it.
    pub fn submit(&self, main: MainResponse) {
        self.stats.offered.fetch_add(1, Ordering::AcqRel);
        if self.closed.load(Ordering::Acquire) {
            self.stats.dropped.fetch_add(1, Ordering::AcqRel);
            return;
        }
        if self.tx.try_send(main).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::AcqRel);
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let last = self.stats.last_full_warning.load(Ordering::Relaxed);
            if now >= last + 60
                && self
                    .stats
                    .last_full_warning
                    .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                tracing::warn!(
                    capacity = self.tx.max_capacity(),
                    "comparison queue full: dropping jobs (counted in the dropped total)"
                );
            }
        }
    }

    pub fn stats(&self) -> &Arc<QueueStats> {
        &self.stats
    }

    /// Jobs waiting in the queue.
    pub fn depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// The workers' side: owns the receiving end and the tasks.
pub struct ComparisonWorkers {
    queue: ComparisonQueue,
    /// Told to stop when shutdown runs out of time.
    cancel: CancellationToken,
    tracker: TaskTracker,
    outcomes: broadcast::Sender<Arc<ComparisonOutcome>>,
}

impl ComparisonWorkers {
    /// Starts `concurrency` workers on a queue of `capacity`.
    pub fn start(
        capacity: usize,
        concurrency: usize,
        scorer: Arc<CandidateScorer>,
        plugins: Arc<ActivePlugins>,
        sinks: OutcomeSinks,
    ) -> ComparisonWorkers {
        let (tx, rx) = mpsc::channel(capacity);
        let stats = Arc::new(QueueStats::default());
        let queue = ComparisonQueue {
            tx,
            stats: stats.clone(),
            closed: Arc::new(AtomicBool::new(false)),
        };
        // Slow listeners miss outcomes rather than hold the workers up.
        let (outcomes, _) = broadcast::channel(1024);
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..concurrency {
            let worker = Worker {
                rx: rx.clone(),
                stats: stats.clone(),
                scorer: scorer.clone(),
                plugins: plugins.clone(),
                outcomes: outcomes.clone(),
                cancel: cancel.clone(),
                sinks: sinks.clone(),
            };
            tracker.spawn(worker.run());
        }
        tracker.close();
        ComparisonWorkers {
            queue,
            cancel,
            tracker,
            outcomes,
        }
    }

    pub fn queue(&self) -> ComparisonQueue {
        self.queue.clone()
    }

    /// A receiver of every outcome from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<ComparisonOutcome>> {
        self.outcomes.subscribe()
    }

    /// Stops taking new jobs, lets queued and in-flight ones finish within `grace`, then
    /// cancels the rest and counts them as dropped.
    pub async fn shutdown(&self, grace: Duration) {
        self.queue.closed.store(true, Ordering::Release);
        let deadline = Instant::now() + grace;
        while self.queue.stats.pending() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.cancel.cancel();
        self.tracker.wait().await;
    }
}

/// Where every outcome goes besides the broadcast: the live metrics and the store.
#[derive(Clone, Default)]
pub struct OutcomeSinks {
    /// Live counters (Prometheus).
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    /// The store's writer; the worker waits for room here (never the request path).
    pub store: Option<mpsc::Sender<Arc<ComparisonOutcome>>>,
}

struct Worker {
    sinks: OutcomeSinks,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<MainResponse>>>,
    stats: Arc<QueueStats>,
    scorer: Arc<CandidateScorer>,
    plugins: Arc<ActivePlugins>,
    outcomes: broadcast::Sender<Arc<ComparisonOutcome>>,
    cancel: CancellationToken,
}

impl Worker {
    async fn run(self) {
        loop {
            let job = tokio::select! {
                _ = self.cancel.cancelled() => break,
                job = async { self.rx.lock().await.recv().await } => job,
            };
            let Some(main) = job else { break };
            self.stats.in_flight.fetch_add(1, Ordering::AcqRel);
            let started = Instant::now();
            let outcome = tokio::select! {
                _ = self.cancel.cancelled() => None,
                o = self.compare(main) => Some(o),
            };
            self.stats.in_flight.fetch_sub(1, Ordering::AcqRel);
            match outcome {
                Some(o) => {
                    let o = Arc::new(o);
                    if let Some(m) = &self.sinks.metrics {
                        m.outcome(&o, started.elapsed());
                    }
                    if let Some(store) = &self.sinks.store {
                        if store.send(o.clone()).await.is_err() {
                            tracing::error!("store writer gone: comparison not stored");
                        }
                    }
                    // Counted last, so that a listener that sees nothing pending has seen
                    // every outcome.
                    match &o.record {
                        Ok(_) => self.stats.ok.fetch_add(1, Ordering::AcqRel),
                        Err(f) => self.stats.fail(f.reason),
                    };
                    let _ = self.outcomes.send(o);
                }
                None => {
                    self.stats.dropped.fetch_add(1, Ordering::AcqRel);
                    break;
                }
            }
        }
        // Whatever is still queued at cancellation is dropped, and counted.
        let mut rx = self.rx.lock().await;
        rx.close();
        while rx.try_recv().is_ok() {
            self.stats.dropped.fetch_add(1, Ordering::AcqRel);
        }
    }

    async fn compare(&self, main: MainResponse) -> ComparisonOutcome {
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let main = Arc::new(main);
        let record = match self.scorer.score(&main).await {
            Ok(r) => r,
            Err(e) => {
                let reason = e.reason();
                tracing::warn!(reason, error = %e, "comparison failed");
                return ComparisonOutcome {
                    main,
                    record: Err(ComparisonFailure {
                        reason,
                        message: e.to_string(),
                        time_ms,
                    }),
                    plugins: Vec::new(),
                };
            }
        };
        let plugins = match self.plugins.get() {
            Some(set) => {
                let (set, rec) = (set.clone(), record.clone());
                tokio::task::spawn_blocking(move || set.compare(&rec))
                    .await
                    .unwrap_or_default()
            }
            None => Vec::new(),
        };
        tracing::debug!(
            id = %record.id,
            positions = record.positions.len(),
            candidate_requests = record.candidate_requests,
            "comparison done"
        );
        ComparisonOutcome {
            main,
            record: Ok(record),
            plugins,
        }
    }
}
