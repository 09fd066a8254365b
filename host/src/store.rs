//! The record store: every comparison outcome kept in an embedded SQLite database, one row
//! per comparison and one per position with what the plugins returned for it. A single
//! writer thread ([`StoreWriter`]) batches inserts; everything handed to it is written before
//! it stops. Reads (`report`, `export`, the admin API) open their own connection.
//!
//! The schema is versioned in `meta.schema_version`; [`Store::open`] creates or migrates it,
//! and refuses a database written by a newer kl-proxy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::config::StoreConfig;
use crate::export::PositionRow;
use crate::plugins::MetricValue;
use crate::queue::ComparisonOutcome;
use crate::record::{AlignedRecord, PositionStatus};
use crate::stats::ReportInput;

/// The schema this build writes.
pub const SCHEMA_VERSION: i64 = 1;

const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS comparisons (
    id TEXT PRIMARY KEY,
    time_ms INTEGER NOT NULL,
    endpoint TEXT NOT NULL,
    main_model TEXT,
    candidate_model TEXT,
    strategy TEXT,
    status TEXT NOT NULL,          -- ok | failed
    reason TEXT,                   -- failure reason label
    message TEXT,                  -- failure message
    prompt_tokens INTEGER,
    positions INTEGER NOT NULL DEFAULT 0,
    aligned INTEGER NOT NULL DEFAULT 0,
    candidate_requests INTEGER NOT NULL DEFAULT 0,
    candidate_tokens INTEGER NOT NULL DEFAULT 0,
    finish_reason TEXT,
    scalars TEXT NOT NULL DEFAULT '{}',          -- {\"plugin.metric\": value}
    plugin_failures TEXT NOT NULL DEFAULT '{}',  -- {\"plugin\": \"reason\"}
    request TEXT,                  -- the client's request JSON (keep_text only)
    record TEXT                    -- the AlignedRecord JSON (texts only with keep_text)
);
CREATE INDEX IF NOT EXISTS comparisons_time ON comparisons(time_ms);
CREATE TABLE IF NOT EXISTS positions (
    comparison_id TEXT NOT NULL REFERENCES comparisons(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    main_token INTEGER NOT NULL,
    main_text TEXT,
    main_logprob REAL,
    candidate_logprob REAL,
    candidate_pick INTEGER,
    status TEXT NOT NULL,
    request INTEGER,
    metric_values TEXT NOT NULL DEFAULT '{}',   -- {\"plugin.metric\": value}
    PRIMARY KEY (comparison_id, idx)
) WITHOUT ROWID;
";

/// A store that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("store {path} was written by a newer kl-proxy (schema {found}, this build reads up to {SCHEMA_VERSION}); use a newer kl-proxy or another store.path")]
    TooNew { path: PathBuf, found: i64 },
}

/// A connection to the store.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    config: StoreConfig,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn status_name(s: PositionStatus) -> &'static str {
    match s {
        PositionStatus::Aligned => "aligned",
        PositionStatus::Unaligned => "unaligned",
        PositionStatus::Speculative => "speculative",
        PositionStatus::Uncovered => "uncovered",
    }
}

impl Store {
    /// Opens (creating or migrating) the store at `path`.
    pub fn open(path: &Path, config: StoreConfig) -> Result<Store, StoreError> {
        let err = |source| StoreError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA foreign_keys=ON; PRAGMA synchronous=NORMAL;",
        )
        .map_err(err)?;
        let has_meta: bool = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type='table' AND name='meta'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(err)?
            > 0;
        let version: i64 = if has_meta {
            conn.query_row(
                "SELECT value FROM meta WHERE key='schema_version'",
                [],
                |r| r.get::<_, String>(0),
            )
            .optional()
            .map_err(err)?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
        } else {
            0
        };
        if version > SCHEMA_VERSION {
            return Err(StoreError::TooNew {
                path: path.to_owned(),
                found: version,
            });
        }
        if version < SCHEMA_VERSION {
            // Version 0 is an empty file; later versions add their migrations here in order.
            conn.execute_batch(SCHEMA_V1).map_err(err)?;
            conn.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?1)",
                params![SCHEMA_VERSION.to_string()],
            )
            .map_err(err)?;
        }
        Ok(Store {
            conn,
            path: path.to_owned(),
            config,
        })
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Writes a batch of outcomes in one transaction, then applies retention.
    pub fn insert(&mut self, outcomes: &[Arc<ComparisonOutcome>]) -> Result<(), StoreError> {
        let keep_text = self.config.keep_text;
        let tx = self.conn.transaction().map_err(|e| StoreError::Sqlite {
            path: self.path.clone(),
            source: e,
        })?;
        for o in outcomes {
            insert_one(&tx, o, keep_text)?;
        }
        tx.commit().map_err(|e| self.err(e))?;
        self.apply_retention()
    }

    /// Deletes what is older than `max_age` or beyond `max_rows`.
    pub fn apply_retention(&mut self) -> Result<(), StoreError> {
        if let Some(age) = self.config.max_age {
            let cutoff = now_ms().saturating_sub(age.as_millis() as u64);
            self.conn
                .execute(
                    "DELETE FROM comparisons WHERE time_ms < ?1",
                    params![cutoff as i64],
                )
                .map_err(|e| self.err(e))?;
        }
        if let Some(max) = self.config.max_rows {
            self.conn
                .execute(
                    "DELETE FROM comparisons WHERE id IN (SELECT id FROM comparisons
                     ORDER BY time_ms DESC, rowid DESC LIMIT -1 OFFSET ?1)",
                    params![max as i64],
                )
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Comparisons kept, by status.
    pub fn counts(&self, since_ms: u64) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT CASE WHEN status='ok' THEN 'ok' ELSE 'failed:' || coalesce(reason, '?') END,
                 count(*) FROM comparisons WHERE time_ms >= ?1 GROUP BY 1",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![since_ms as i64], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// The inputs of `report` for comparisons since `since_ms`.
    pub fn report_input(&self, since_ms: u64) -> Result<ReportInput, StoreError> {
        let mut input = ReportInput::default();
        for (k, n) in self.counts(since_ms)? {
            match k.strip_prefix("failed:") {
                Some(reason) => {
                    input.comparisons_failed.insert(reason.to_owned(), n);
                }
                None => input.comparisons_ok += n,
            }
        }
        let mut stmt = self
            .conn
            .prepare(
                "SELECT p.status, p.metric_values FROM positions p JOIN comparisons c
                 ON c.id = p.comparison_id WHERE c.time_ms >= ?1 ORDER BY c.time_ms, c.id, p.idx",
            )
            .map_err(|e| self.err(e))?;
        let mut rows = stmt
            .query(params![since_ms as i64])
            .map_err(|e| self.err(e))?;
        let mut aligned_rows: Vec<BTreeMap<String, f64>> = Vec::new();
        while let Some(r) = rows.next().map_err(|e| self.err(e))? {
            input.positions += 1;
            let status: String = r.get(0).map_err(|e| self.err(e))?;
            if status != "aligned" {
                continue;
            }
            input.aligned_positions += 1;
            let values: String = r.get(1).map_err(|e| self.err(e))?;
            aligned_rows.push(serde_json::from_str(&values).unwrap_or_default());
        }
        // Every series has one entry per aligned position (NaN where a plugin gave none), so
        // that paired series (nll_main, nll_candidate) stay paired.
        let names: std::collections::BTreeSet<&String> =
            aligned_rows.iter().flat_map(|m| m.keys()).collect();
        for name in names {
            let series = aligned_rows
                .iter()
                .map(|m| m.get(name).copied().unwrap_or(f64::NAN))
                .collect();
            input.series.insert(name.clone(), series);
        }
        Ok(input)
    }

    /// Recent comparisons, newest first.
    pub fn list(&self, limit: u32, offset: u32) -> Result<Vec<Value>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, time_ms, endpoint, main_model, candidate_model, strategy, status, reason,
                 prompt_tokens, positions, aligned, candidate_requests, candidate_tokens, scalars
                 FROM comparisons ORDER BY time_ms DESC, rowid DESC LIMIT ?1 OFFSET ?2",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![limit, offset], |r| {
                Ok(json!({
                    "id": r.get::<_, String>(0)?,
                    "time_ms": r.get::<_, i64>(1)?,
                    "endpoint": r.get::<_, String>(2)?,
                    "main_model": r.get::<_, Option<String>>(3)?,
                    "candidate_model": r.get::<_, Option<String>>(4)?,
                    "strategy": r.get::<_, Option<String>>(5)?,
                    "status": r.get::<_, String>(6)?,
                    "reason": r.get::<_, Option<String>>(7)?,
                    "prompt_tokens": r.get::<_, Option<i64>>(8)?,
                    "positions": r.get::<_, i64>(9)?,
                    "aligned": r.get::<_, i64>(10)?,
                    "candidate_requests": r.get::<_, i64>(11)?,
                    "candidate_tokens": r.get::<_, i64>(12)?,
                    "scalars": serde_json::from_str::<Value>(&r.get::<_, String>(13)?).unwrap_or(Value::Null),
                }))
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// One comparison: its summary row, the whole aligned record and each position's plugin values.
    pub fn get(&self, id: &str) -> Result<Option<Value>, StoreError> {
        let row = self
            .conn
            .query_row(
                "SELECT status, reason, message, scalars, plugin_failures, request, record, time_ms
                 FROM comparisons WHERE id = ?1",
                params![id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, Option<String>>(1)?,
                        r.get::<_, Option<String>>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, Option<String>>(5)?,
                        r.get::<_, Option<String>>(6)?,
                        r.get::<_, i64>(7)?,
                    ))
                },
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let Some((status, reason, message, scalars, failures, request, record, time_ms)) = row
        else {
            return Ok(None);
        };
        let mut stmt = self
            .conn
            .prepare("SELECT metric_values FROM positions WHERE comparison_id = ?1 ORDER BY idx")
            .map_err(|e| self.err(e))?;
        let values: Vec<Value> = stmt
            .query_map(params![id], |r| r.get::<_, String>(0))
            .map_err(|e| self.err(e))?
            .filter_map(Result::ok)
            .map(|v| serde_json::from_str(&v).unwrap_or(Value::Null))
            .collect();
        let parse = |s: Option<String>| s.and_then(|s| serde_json::from_str::<Value>(&s).ok());
        Ok(Some(json!({
            "id": id,
            "time_ms": time_ms,
            "status": status,
            "reason": reason,
            "message": message,
            "scalars": parse(Some(scalars)),
            "plugin_failures": parse(Some(failures)),
            "request": parse(request),
            "record": parse(record),
            "position_values": values,
        })))
    }

    /// Every position since `since_ms`, for `export`.
    pub fn position_rows(&self, since_ms: u64) -> Result<Vec<PositionRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT c.id, c.time_ms, coalesce(c.prompt_tokens, 0), p.idx, p.main_token, p.main_text,
                 p.main_logprob, p.candidate_logprob, p.candidate_pick, p.status, p.metric_values
                 FROM positions p JOIN comparisons c ON c.id = p.comparison_id
                 WHERE c.time_ms >= ?1 ORDER BY c.time_ms, c.id, p.idx",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![since_ms as i64], |r| {
                let prompt: i64 = r.get(2)?;
                let idx: i64 = r.get(3)?;
                let values: String = r.get(10)?;
                Ok(PositionRow {
                    comparison_id: r.get(0)?,
                    time_ms: r.get::<_, i64>(1)? as u64,
                    position: idx as u32,
                    context_len: (prompt + idx) as u32,
                    main_token: r.get::<_, i64>(4)? as i32,
                    main_text: r.get(5)?,
                    main_logprob: r.get::<_, Option<f64>>(6)?.unwrap_or(f64::NAN) as f32,
                    candidate_logprob: r.get::<_, Option<f64>>(7)?.map(|v| v as f32),
                    candidate_pick: r.get::<_, Option<i64>>(8)?.map(|v| v as i32),
                    status: r.get(9)?,
                    values: serde_json::from_str(&values).unwrap_or_default(),
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }
}

fn insert_one(
    tx: &rusqlite::Transaction<'_>,
    o: &ComparisonOutcome,
    keep_text: bool,
) -> Result<(), StoreError> {
    let err = |source| StoreError::Sqlite {
        path: PathBuf::from("<transaction>"),
        source,
    };
    let main = &o.main;
    let request = keep_text.then(|| main.request.to_string());
    match &o.record {
        Err(f) => {
            let id = format!("failed-{}-{:08x}", f.time_ms, rand::random::<u32>());
            tx.execute(
                "INSERT INTO comparisons(id, time_ms, endpoint, main_model, status, reason, message,
                 prompt_tokens, positions, request) VALUES (?1, ?2, ?3, ?4, 'failed', ?5, ?6, ?7, ?8, ?9)",
                params![
                    id,
                    f.time_ms as i64,
                    main.endpoint.as_str(),
                    main.model,
                    f.reason,
                    f.message,
                    main.prompt_tokens,
                    main.tokens.len() as i64,
                    request
                ],
            )
            .map_err(err)?;
        }
        Ok(record) => {
            let mut scalars = serde_json::Map::new();
            let mut failures = serde_json::Map::new();
            let mut series: Vec<(String, &Vec<f64>)> = Vec::new();
            for p in &o.plugins {
                match &p.result {
                    Err(f) => {
                        failures.insert(p.plugin.clone(), Value::from(f.reason()));
                    }
                    Ok(metrics) => {
                        for m in metrics {
                            let key = format!("{}.{}", p.plugin, m.name);
                            match &m.value {
                                MetricValue::Scalar(v) => {
                                    scalars.insert(key, json_number(*v));
                                }
                                MetricValue::PerPosition(values) => series.push((key, values)),
                            }
                        }
                    }
                }
            }
            let stored = stored_record(record, keep_text);
            tx.execute(
                "INSERT OR REPLACE INTO comparisons(id, time_ms, endpoint, main_model, candidate_model,
                 strategy, status, prompt_tokens, positions, aligned, candidate_requests,
                 candidate_tokens, finish_reason, scalars, plugin_failures, request, record)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'ok', ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
                params![
                    record.id,
                    record.time_ms as i64,
                    record.endpoint.as_str(),
                    record.main_model,
                    record.candidate_model,
                    record.strategy.as_str(),
                    record.prompt_tokens,
                    record.positions.len() as i64,
                    record.aligned().count() as i64,
                    record.candidate_requests,
                    record.candidate_tokens_decoded,
                    record.finish_reason,
                    Value::Object(scalars).to_string(),
                    Value::Object(failures).to_string(),
                    request,
                    serde_json::to_string(&stored).unwrap_or_default(),
                ],
            )
            .map_err(err)?;
            let mut stmt = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO positions(comparison_id, idx, main_token, main_text,
                     main_logprob, candidate_logprob, candidate_pick, status, request, metric_values)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )
                .map_err(err)?;
            let texts: std::collections::HashMap<i32, &str> = record
                .texts
                .iter()
                .map(|t| (t.id, t.text.as_str()))
                .collect();
            for (i, p) in record.positions.iter().enumerate() {
                let mut values = serde_json::Map::new();
                for (name, s) in &series {
                    if let Some(v) = s.get(i).filter(|v| v.is_finite()) {
                        values.insert(name.clone(), json_number(*v));
                    }
                }
                let text = keep_text.then(|| texts.get(&p.main.id).copied()).flatten();
                stmt.execute(params![
                    record.id,
                    p.index,
                    p.main.id,
                    text,
                    p.main.logprob as f64,
                    p.candidate.map(f64::from),
                    p.candidate_pick,
                    status_name(p.status),
                    p.request,
                    Value::Object(values).to_string(),
                ])
                .map_err(err)?;
            }
        }
    }
    Ok(())
}

fn json_number(v: f64) -> Value {
    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
}

/// The record as kept: without token texts unless `keep_text`.
fn stored_record(record: &AlignedRecord, keep_text: bool) -> AlignedRecord {
    let mut r = record.clone();
    if !keep_text {
        r.texts.clear();
    }
    r
}

/// The writer: a thread that owns the connection and writes what the workers send, in
/// batches. Dropping every sender (or [`StoreWriter::close`]) makes it write what is left
/// and stop.
pub struct StoreWriter {
    tx: Option<mpsc::Sender<Arc<ComparisonOutcome>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Comparisons written so far.
    pub written: Arc<AtomicU64>,
    /// Comparisons that could not be written (logged).
    pub failed: Arc<AtomicU64>,
}

impl StoreWriter {
    /// Opens the store and starts the writer thread.
    pub fn start(path: &Path, config: StoreConfig) -> Result<StoreWriter, StoreError> {
        let mut store = Store::open(path, config)?;
        // Bounded: the workers wait (off the request path) when the disk is slower than they are.
        let (tx, mut rx) = mpsc::channel::<Arc<ComparisonOutcome>>(1024);
        let written = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (w, f) = (written.clone(), failed.clone());
        let thread = std::thread::Builder::new()
            .name("kl-proxy-store".into())
            .spawn(move || {
                while let Some(first) = rx.blocking_recv() {
                    let mut batch = vec![first];
                    while batch.len() < 256 {
                        match rx.try_recv() {
                            Ok(o) => batch.push(o),
                            Err(_) => break,
                        }
                    }
                    match store.insert(&batch) {
                        Ok(()) => {
                            w.fetch_add(batch.len() as u64, Ordering::AcqRel);
                        }
                        Err(e) => {
                            f.fetch_add(batch.len() as u64, Ordering::AcqRel);
                            tracing::error!(error = %e, n = batch.len(), "store write failed");
                        }
                    }
                }
            })
            .map_err(|e| StoreError::Sqlite {
                path: path.to_owned(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        Ok(StoreWriter {
            tx: Some(tx),
            thread: Some(thread),
            written,
            failed,
        })
    }

    /// A sender for the workers.
    pub fn sender(&self) -> Option<mpsc::Sender<Arc<ComparisonOutcome>>> {
        self.tx.clone()
    }

    /// Writes everything sent so far and stops (once every sender clone is dropped).
    pub fn close(mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether `name` can be a `"plugin.metric"` series key in a JSON path (the dashboard's
/// queries put it in one): letters, digits, `_`, `-`, `.` and `:`, at most 128 bytes.
pub fn valid_series_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

/// The smallest "nice" number (1, 2 or 5 × 10^k) at least `x` (at least 1).
fn nice_at_least(x: f64) -> i64 {
    let mut step = 1i64;
    loop {
        for m in [1, 2, 5] {
            if (step * m) as f64 >= x {
                return step * m;
            }
        }
        step = step.saturating_mul(10);
        if step >= i64::MAX / 10 {
            return step;
        }
    }
}

/// Time bucket widths the dashboard uses, in milliseconds.
const TIME_STEPS_MS: &[i64] = &[
    1_000,
    2_000,
    5_000,
    10_000,
    15_000,
    30_000,
    60_000,
    120_000,
    300_000,
    600_000,
    900_000,
    1_800_000,
    3_600_000,
    7_200_000,
    10_800_000,
    21_600_000,
    43_200_000,
    86_400_000,
    172_800_000,
    604_800_000,
];

/// The aligned positions with a finite value of one series, as a CTE: `t` (comparison time),
/// `ctx` (context position: prompt tokens + index), `x` (the value). Parameters: ?1 the JSON
/// path, ?2 `since_ms`.
const SERIES_CTE: &str = "WITH v AS (
    SELECT c.time_ms AS t, coalesce(c.prompt_tokens, 0) + p.idx AS ctx,
           json_extract(p.metric_values, ?1) AS x
    FROM positions p JOIN comparisons c ON c.id = p.comparison_id
    WHERE p.status = 'aligned' AND c.time_ms >= ?2
) ";

impl Store {
    /// Series keys (`"plugin.metric"`) found in the positions of the newest `recent` comparisons.
    pub fn series_names(&self, recent: u32) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT DISTINCT j.key FROM positions p, json_each(p.metric_values) j
                 WHERE p.comparison_id IN
                   (SELECT id FROM comparisons ORDER BY time_ms DESC, rowid DESC LIMIT ?1)
                 ORDER BY 1",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![recent], |r| r.get::<_, String>(0))
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Failed plugin calls kept in the store since `since_ms`: plugin → reason → count.
    pub fn plugin_failures(
        &self,
        since_ms: u64,
    ) -> Result<BTreeMap<String, BTreeMap<String, u64>>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT j.key, CAST(j.value AS TEXT), count(*)
                 FROM comparisons c, json_each(c.plugin_failures) j
                 WHERE c.time_ms >= ?1 GROUP BY 1, 2",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![since_ms as i64], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                    r.get::<_, i64>(2)? as u64,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut out: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for row in rows {
            let (plugin, reason, n) = row.map_err(|e| self.err(e))?;
            *out.entry(plugin).or_default().entry(reason).or_default() += n;
        }
        Ok(out)
    }

    /// Per comparison of `ids`, over its aligned positions: count, mean and max of series
    /// `name`, and the mean of series `same_top` (when given). Comparisons without a value are
    /// left out.
    pub fn comparison_series(
        &self,
        ids: &[String],
        name: &str,
        same_top: Option<&str>,
    ) -> Result<BTreeMap<String, Value>, StoreError> {
        let mut out = BTreeMap::new();
        if !valid_series_name(name) || same_top.is_some_and(|s| !valid_series_name(s)) {
            return Ok(out);
        }
        let path = format!("$.\"{name}\"");
        let same_path = same_top.map(|s| format!("$.\"{s}\""));
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT count(json_extract(metric_values, ?2)),
                        avg(json_extract(metric_values, ?2)),
                        max(json_extract(metric_values, ?2)),
                        avg(json_extract(metric_values, ?3)),
                        count(*)
                 FROM positions WHERE comparison_id = ?1 AND status = 'aligned'",
            )
            .map_err(|e| self.err(e))?;
        for id in ids {
            let row = stmt
                .query_row(params![id, path, same_path], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, Option<f64>>(1)?,
                        r.get::<_, Option<f64>>(2)?,
                        r.get::<_, Option<f64>>(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                })
                .map_err(|e| self.err(e))?;
            let (n, mean, max, same, aligned) = row;
            if aligned == 0 {
                continue;
            }
            out.insert(
                id.clone(),
                json!({"n": n, "mean": mean, "max": max, "same_top": same}),
            );
        }
        Ok(out)
    }

    /// Aggregates of series `name` over the aligned positions of comparisons since `since_ms`,
    /// for the dashboard's charts: a histogram (`scale` `log` when no value is negative: bins of
    /// a quarter decade, values below the first edge counted in `below`; else `linear` with
    /// `bins` bins), the mean by context position (prompt tokens + index) in buckets, and the
    /// mean by comparison time in buckets. Every bucket has its count `n`.
    pub fn series_aggregate(
        &self,
        name: &str,
        since_ms: u64,
        bins: u32,
    ) -> Result<Value, StoreError> {
        if !valid_series_name(name) {
            return Ok(json!({"name": name, "n": 0}));
        }
        let path = format!("$.\"{name}\"");
        let since = since_ms as i64;
        let (n, min, max, min_pos, max_ctx, t_min, t_max) = self
            .conn
            .query_row(
                &format!(
                    "{SERIES_CTE} SELECT count(x), min(x), max(x), min(CASE WHEN x > 0 THEN x END),
                     max(ctx), min(t), max(t) FROM v WHERE x IS NOT NULL"
                ),
                params![path, since],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, Option<f64>>(1)?,
                        r.get::<_, Option<f64>>(2)?,
                        r.get::<_, Option<f64>>(3)?,
                        r.get::<_, Option<i64>>(4)?,
                        r.get::<_, Option<i64>>(5)?,
                        r.get::<_, Option<i64>>(6)?,
                    ))
                },
            )
            .map_err(|e| self.err(e))?;
        let (Some(min), Some(max), Some(max_ctx), Some(t_min), Some(t_max)) =
            (min, max, max_ctx, t_min, t_max)
        else {
            return Ok(json!({"name": name, "n": 0}));
        };

        // Histogram edges, decided here; SQLite counts (no math functions needed).
        let log = min >= 0.0 && min_pos.is_some();
        let edges: Vec<f64> = if log {
            let min_pos = min_pos.unwrap_or(max);
            let hi = ((max.log10() * 4.0).ceil() / 4.0)
                .max((min_pos.log10() * 4.0).floor() / 4.0 + 0.25);
            let lo = ((min_pos.log10() * 4.0).floor() / 4.0).max(hi - 8.0);
            let nb = ((hi - lo) * 4.0).round().max(1.0) as i32;
            (0..=nb)
                .map(|i| 10f64.powf(lo + f64::from(i) / 4.0))
                .collect()
        } else {
            let nb = bins.clamp(1, 200);
            let width = if max > min {
                (max - min) / f64::from(nb)
            } else {
                1.0
            };
            (0..=nb).map(|i| min + width * f64::from(i)).collect()
        };
        let nbins = edges.len() - 1;
        let edges_json = Value::from(edges.clone()).to_string();
        let mut counts = vec![0u64; nbins];
        let mut below = 0u64;
        {
            let mut stmt = self
                .conn
                .prepare(&format!(
                    "{SERIES_CTE}, e AS (SELECT CAST(key AS INTEGER) AS i, value AS lo FROM json_each(?3))
                     SELECT (SELECT max(e.i) FROM e WHERE e.lo <= v.x) AS bin, count(*)
                     FROM v WHERE x IS NOT NULL GROUP BY bin"
                ))
                .map_err(|e| self.err(e))?;
            let rows = stmt
                .query_map(params![path, since, edges_json], |r| {
                    Ok((r.get::<_, Option<i64>>(0)?, r.get::<_, i64>(1)? as u64))
                })
                .map_err(|e| self.err(e))?;
            for row in rows {
                match row.map_err(|e| self.err(e))? {
                    (Some(b), c) if b >= 0 => counts[(b as usize).min(nbins - 1)] += c,
                    (_, c) => below += c,
                }
            }
        }
        let histogram: Vec<Value> = (0..nbins)
            .map(|i| json!({"lo": edges[i], "hi": edges[i + 1], "n": counts[i]}))
            .collect();

        let bucket_rows = |key: &str, origin: i64, width: i64| -> Result<Vec<Value>, StoreError> {
            let mut stmt = self
                .conn
                .prepare(&format!(
                    "{SERIES_CTE} SELECT ({key} - ?3) / ?4 AS b, count(*), avg(x), avg(x * x)
                     FROM v WHERE x IS NOT NULL GROUP BY b ORDER BY b"
                ))
                .map_err(|e| self.err(e))?;
            let rows = stmt
                .query_map(params![path, since, origin, width], |r| {
                    let b: i64 = r.get(0)?;
                    let n: i64 = r.get(1)?;
                    let mean: f64 = r.get(2)?;
                    let mean2: f64 = r.get(3)?;
                    let err = if n > 1 {
                        ((mean2 - mean * mean).max(0.0) / (n - 1) as f64).sqrt()
                    } else {
                        0.0
                    };
                    let start = origin + b * width;
                    Ok(json!({"lo": start, "hi": start + width, "n": n, "mean": mean, "err": err}))
                })
                .map_err(|e| self.err(e))?;
            rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
        };
        let ctx_width = nice_at_least((max_ctx + 1) as f64 / 32.0);
        let by_context = bucket_rows("ctx", 0, ctx_width)?;
        let span = (t_max - t_min + 1) as f64 / 40.0;
        let t_width = TIME_STEPS_MS
            .iter()
            .copied()
            .find(|w| *w as f64 >= span)
            .unwrap_or(604_800_000 * ((span / 604_800_000.0).ceil() as i64).max(1));
        let t_origin = t_min - t_min.rem_euclid(t_width);
        let by_time = bucket_rows("t", t_origin, t_width)?;
        Ok(json!({
            "name": name,
            "n": n,
            "min": min,
            "max": max,
            "scale": if log { "log" } else { "linear" },
            "histogram": {"bins": histogram, "below": below},
            "by_context": {"width": ctx_width, "buckets": by_context},
            "by_time": {"width_ms": t_width, "buckets": by_time},
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> StoreConfig {
        StoreConfig {
            path: None,
            keep_text: true,
            max_age: None,
            max_rows: None,
        }
    }

    #[test]
    fn a_store_from_a_newer_version_is_refused_and_an_empty_file_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kl.db");
        let store = Store::open(&path, config()).unwrap();
        assert!(store.list(10, 0).unwrap().is_empty());
        drop(store);
        // Reopening the same version works.
        Store::open(&path, config()).unwrap();
        let conn = Connection::open(&path).unwrap();
        conn.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'schema_version'",
            params![(SCHEMA_VERSION + 1).to_string()],
        )
        .unwrap();
        drop(conn);
        let err = Store::open(&path, config()).err().expect("refused");
        let msg = err.to_string();
        assert!(
            msg.contains("newer kl-proxy") && msg.contains("kl.db"),
            "{msg}"
        );
    }
}
