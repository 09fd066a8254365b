//! STUB (helper-3 replaces this file): export writers.
use std::collections::BTreeMap;
#[derive(Debug, Clone, serde::Serialize)]
pub struct PositionRow {
    pub comparison_id: String,
    pub time_ms: u64,
    pub position: u32,
    pub context_len: u32,
    pub main_token: i32,
    pub main_text: Option<String>,
    pub main_logprob: f32,
    pub candidate_logprob: Option<f32>,
    pub candidate_pick: Option<i32>,
    pub status: String,
    pub values: BTreeMap<String, f64>,
}
pub enum ExportFormat {
    Jsonl,
}
impl std::str::FromStr for ExportFormat {
    type Err = anyhow::Error;
    fn from_str(_: &str) -> anyhow::Result<Self> {
        Ok(ExportFormat::Jsonl)
    }
}
pub fn write_rows(
    _f: ExportFormat,
    _rows: &[PositionRow],
    _out: &std::path::Path,
) -> anyhow::Result<usize> {
    anyhow::bail!("stub")
}
