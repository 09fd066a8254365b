//! # Per-position export
//!
//! Owns writing per-position rows (one generated token of one compared response, with every
//! comparator's value at that position) to files that pandas, DuckDB and Polars read directly:
//!
//! - **JSONL**: one flat JSON object per line; the fixed columns first, then one key per
//!   `"plugin.metric"` value. NaN and ±inf are `null` (JSON has no other spelling for them);
//!   a row without a value for a column has no key for it.
//! - **CSV**: a header with the fixed columns and then the union of every row's value
//!   columns, sorted; missing values and NaN are empty fields, ±inf is `inf` / `-inf`;
//!   fields are quoted when needed (texts may hold commas, quotes, newlines).
//! - **Parquet**: one file, uncompressed, row groups of [`PARQUET_ROW_GROUP`] rows; the
//!   fixed columns typed (`time_ms` UINT64, `position`/`context_len` UINT32, `main_token`
//!   INT32, texts UTF8 strings, log-probs FLOAT) and one OPTIONAL DOUBLE column per value
//!   column; NaN and absent values are null.
//!
//! Value columns are named by their `"plugin.metric"` key; the dot keeps them apart from the
//! fixed columns, and a key equal to a fixed column's name is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

/// One generated position of one compared response.
#[derive(Debug, Clone, Serialize)]
pub struct PositionRow {
    pub comparison_id: String,
    /// When the comparison was made, ms since the Unix epoch.
    pub time_ms: u64,
    /// Index of the generated token in the response.
    pub position: u32,
    /// Prompt tokens + position: the context the token was predicted from.
    pub context_len: u32,
    pub main_token: i32,
    pub main_text: Option<String>,
    pub main_logprob: f32,
    /// The candidate's log-prob of the main token; `None` where not aligned.
    pub candidate_logprob: Option<f32>,
    /// The candidate's top token at this position, when known.
    pub candidate_pick: Option<i32>,
    pub status: String,
    /// `"plugin.metric"` → value at this position; NaN is written as null.
    pub values: BTreeMap<String, f64>,
}

/// The fixed columns, in file order; the value columns follow.
pub const FIXED_COLUMNS: [&str; 10] = [
    "comparison_id",
    "time_ms",
    "position",
    "context_len",
    "main_token",
    "main_text",
    "main_logprob",
    "candidate_logprob",
    "candidate_pick",
    "status",
];

/// Rows per Parquet row group.
pub const PARQUET_ROW_GROUP: usize = 65_536;

/// A file format [`write_rows`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    Jsonl,
    Csv,
    Parquet,
}

impl ExportFormat {
    pub const ALL: [ExportFormat; 3] = [Self::Jsonl, Self::Csv, Self::Parquet];

    pub fn name(self) -> &'static str {
        match self {
            Self::Jsonl => "jsonl",
            Self::Csv => "csv",
            Self::Parquet => "parquet",
        }
    }

    /// The format a file name's extension names (`.jsonl`/`.ndjson`, `.csv`, `.parquet`/`.pq`).
    pub fn from_path(path: &Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "jsonl" | "ndjson" => Some(Self::Jsonl),
            "csv" => Some(Self::Csv),
            "parquet" | "pq" => Some(Self::Parquet),
            _ => None,
        }
    }
}

impl fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ExportFormat {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|f| f.name() == lower)
            .or(match lower.as_str() {
                "ndjson" => Some(Self::Jsonl),
                _ => None,
            })
            .with_context(|| {
                format!("unknown export format {s:?}: expected one of jsonl, csv, parquet")
            })
    }
}

/// Writes `rows` to `out` (created or truncated) in `format`; returns the number of rows written.
pub fn write_rows(format: ExportFormat, rows: &[PositionRow], out: &Path) -> Result<usize> {
    let columns = value_columns(rows)?;
    let file = File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let result = match format {
        ExportFormat::Jsonl => write_jsonl(rows, BufWriter::new(file)),
        ExportFormat::Csv => write_csv(rows, &columns, BufWriter::new(file)),
        ExportFormat::Parquet => write_parquet(rows, &columns, file),
    };
    result.with_context(|| format!("writing {format} to {}", out.display()))?;
    Ok(rows.len())
}

/// The union of the rows' value columns, sorted; refuses a name that is a fixed column's.
fn value_columns(rows: &[PositionRow]) -> Result<Vec<String>> {
    let names: BTreeSet<&String> = rows.iter().flat_map(|r| r.values.keys()).collect();
    if let Some(clash) = names.iter().find(|n| FIXED_COLUMNS.contains(&n.as_str())) {
        bail!("value column {clash:?} has the name of a fixed column");
    }
    Ok(names.into_iter().cloned().collect())
}

/// NaN is written as null.
fn not_nan<T: PartialEq + Copy>(v: T) -> Option<T> {
    #[allow(clippy::eq_op)] // NaN is the only value not equal to itself
    (v == v).then_some(v)
}

/// A row as one flat JSON object, in column order.
struct JsonRow<'a>(&'a PositionRow);

impl Serialize for JsonRow<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        // JSON has no NaN or infinity.
        fn num<T: Into<f64>>(v: T) -> Option<f64> {
            Some(v.into()).filter(|v| v.is_finite())
        }
        let r = self.0;
        let mut m = s.serialize_map(Some(FIXED_COLUMNS.len() + r.values.len()))?;
        m.serialize_entry("comparison_id", &r.comparison_id)?;
        m.serialize_entry("time_ms", &r.time_ms)?;
        m.serialize_entry("position", &r.position)?;
        m.serialize_entry("context_len", &r.context_len)?;
        m.serialize_entry("main_token", &r.main_token)?;
        m.serialize_entry("main_text", &r.main_text)?;
        m.serialize_entry("main_logprob", &num(r.main_logprob))?;
        m.serialize_entry("candidate_logprob", &r.candidate_logprob.and_then(num))?;
        m.serialize_entry("candidate_pick", &r.candidate_pick)?;
        m.serialize_entry("status", &r.status)?;
        for (k, v) in &r.values {
            m.serialize_entry(k, &num(*v))?;
        }
        m.end()
    }
}

fn write_jsonl(rows: &[PositionRow], mut out: impl Write) -> Result<()> {
    for row in rows {
        serde_json::to_writer(&mut out, &JsonRow(row))?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

/// A float as CSV readers parse it back: shortest round-trip digits, exponent for very
/// large or small magnitudes, `inf`/`-inf`, and NaN as an empty field.
fn csv_float<T: fmt::Debug + PartialEq + Copy>(v: Option<T>) -> String {
    v.and_then(not_nan)
        .map(|v| format!("{v:?}"))
        .unwrap_or_default()
}

fn write_csv(rows: &[PositionRow], columns: &[String], out: impl Write) -> Result<()> {
    let mut w = csv::Writer::from_writer(out);
    w.write_record(
        FIXED_COLUMNS
            .iter()
            .copied()
            .chain(columns.iter().map(String::as_str)),
    )?;
    for r in rows {
        let mut record = vec![
            r.comparison_id.clone(),
            r.time_ms.to_string(),
            r.position.to_string(),
            r.context_len.to_string(),
            r.main_token.to_string(),
            r.main_text.clone().unwrap_or_default(),
            csv_float(Some(r.main_logprob)),
            csv_float(r.candidate_logprob),
            r.candidate_pick.map(|p| p.to_string()).unwrap_or_default(),
            r.status.clone(),
        ];
        record.extend(columns.iter().map(|c| csv_float(r.values.get(c).copied())));
        w.write_record(&record)?;
    }
    w.flush()?;
    Ok(())
}

/// One column chunk, ready for a Parquet column writer; `None` is null.
enum ColumnData {
    Utf8(Vec<Option<parquet::data_type::ByteArray>>),
    I64(Vec<Option<i64>>),
    I32(Vec<Option<i32>>),
    F32(Vec<Option<f32>>),
    F64(Vec<Option<f64>>),
}

fn parquet_schema(columns: &[String]) -> Result<parquet::schema::types::Type> {
    use parquet::basic::{LogicalType, Repetition, Type as Physical};
    use parquet::schema::types::Type;

    let field = |name: &str, physical, logical, optional: bool| {
        let repetition = if optional {
            Repetition::OPTIONAL
        } else {
            Repetition::REQUIRED
        };
        Type::primitive_type_builder(name, physical)
            .with_repetition(repetition)
            .with_logical_type(logical)
            .build()
            .map(Arc::new)
    };
    let unsigned = |bit_width| Some(LogicalType::integer(bit_width, false));
    let mut fields = vec![
        field(
            "comparison_id",
            Physical::BYTE_ARRAY,
            Some(LogicalType::String),
            false,
        )?,
        field("time_ms", Physical::INT64, unsigned(64), false)?,
        field("position", Physical::INT32, unsigned(32), false)?,
        field("context_len", Physical::INT32, unsigned(32), false)?,
        field("main_token", Physical::INT32, None, false)?,
        field(
            "main_text",
            Physical::BYTE_ARRAY,
            Some(LogicalType::String),
            true,
        )?,
        field("main_logprob", Physical::FLOAT, None, true)?,
        field("candidate_logprob", Physical::FLOAT, None, true)?,
        field("candidate_pick", Physical::INT32, None, true)?,
        field(
            "status",
            Physical::BYTE_ARRAY,
            Some(LogicalType::String),
            false,
        )?,
    ];
    for c in columns {
        fields.push(field(c, Physical::DOUBLE, None, true)?);
    }
    Ok(Type::group_type_builder("position_rows")
        .with_fields(fields)
        .build()?)
}

/// The column chunks of `rows`, in schema order.
fn parquet_columns(rows: &[PositionRow], columns: &[String]) -> Vec<ColumnData> {
    use parquet::data_type::ByteArray;
    let text = |s: &str| ByteArray::from(s.as_bytes().to_vec());
    let mut data = vec![
        ColumnData::Utf8(rows.iter().map(|r| Some(text(&r.comparison_id))).collect()),
        // Stored as the bit pattern of the unsigned value, as the UINT_64 type says.
        ColumnData::I64(rows.iter().map(|r| Some(r.time_ms as i64)).collect()),
        ColumnData::I32(rows.iter().map(|r| Some(r.position as i32)).collect()),
        ColumnData::I32(rows.iter().map(|r| Some(r.context_len as i32)).collect()),
        ColumnData::I32(rows.iter().map(|r| Some(r.main_token)).collect()),
        ColumnData::Utf8(
            rows.iter()
                .map(|r| r.main_text.as_deref().map(text))
                .collect(),
        ),
        ColumnData::F32(rows.iter().map(|r| not_nan(r.main_logprob)).collect()),
        ColumnData::F32(
            rows.iter()
                .map(|r| r.candidate_logprob.and_then(not_nan))
                .collect(),
        ),
        ColumnData::I32(rows.iter().map(|r| r.candidate_pick).collect()),
        ColumnData::Utf8(rows.iter().map(|r| Some(text(&r.status))).collect()),
    ];
    for c in columns {
        data.push(ColumnData::F64(
            rows.iter()
                .map(|r| r.values.get(c).copied().and_then(not_nan))
                .collect(),
        ));
    }
    data
}

fn write_parquet(rows: &[PositionRow], columns: &[String], out: File) -> Result<()> {
    use parquet::data_type::{
        ByteArrayType, DataType, DoubleType, FloatType, Int32Type, Int64Type,
    };
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::{SerializedColumnWriter, SerializedFileWriter};

    /// Writes the present values, with definition levels when the column is OPTIONAL.
    fn put<T: DataType>(
        col: &mut SerializedColumnWriter<'_>,
        cells: Vec<Option<T::T>>,
    ) -> Result<()> {
        let optional = col.typed::<T>().get_descriptor().max_def_level() > 0;
        let levels: Vec<i16> = cells.iter().map(|c| i16::from(c.is_some())).collect();
        let values: Vec<T::T> = cells.into_iter().flatten().collect();
        col.typed::<T>()
            .write_batch(&values, optional.then_some(&levels[..]), None)?;
        Ok(())
    }

    let schema = Arc::new(parquet_schema(columns)?);
    let props = Arc::new(WriterProperties::builder().build());
    let mut writer = SerializedFileWriter::new(out, schema, props)?;
    for chunk in rows.chunks(PARQUET_ROW_GROUP) {
        let mut group = writer.next_row_group()?;
        let mut data = parquet_columns(chunk, columns).into_iter();
        while let Some(mut col) = group.next_column()? {
            match data
                .next()
                .context("fewer column chunks than schema columns")?
            {
                ColumnData::Utf8(c) => put::<ByteArrayType>(&mut col, c)?,
                ColumnData::I64(c) => put::<Int64Type>(&mut col, c)?,
                ColumnData::I32(c) => put::<Int32Type>(&mut col, c)?,
                ColumnData::F32(c) => put::<FloatType>(&mut col, c)?,
                ColumnData::F64(c) => put::<DoubleType>(&mut col, c)?,
            }
            col.close()?;
        }
        group.close()?;
    }
    writer.close()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Vec<PositionRow> {
        let row = |i: u32, values: &[(&str, f64)]| PositionRow {
            comparison_id: format!("c{}", i / 2),
            time_ms: 1_700_000_000_000 + u64::from(i),
            position: i,
            context_len: 10 + i,
            main_token: 100 + i as i32,
            main_text: Some(if i == 1 {
                "say \"hi\",\nthen".to_string()
            } else {
                format!("t{i}")
            }),
            main_logprob: -0.5,
            candidate_logprob: Some(-0.25),
            candidate_pick: Some(7),
            status: "aligned".to_string(),
            values: values.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        };
        let mut third = row(2, &[("kl.kld", f64::NAN), ("top.overlap", 0.75)]);
        third.main_text = None;
        third.candidate_logprob = None;
        third.candidate_pick = None;
        third.status = "unaligned".to_string();
        vec![
            row(0, &[("kl.kld", 0.125), ("kl.delta_p", -0.5)]),
            row(1, &[("kl.kld", 1e-20), ("kl.delta_p", f64::INFINITY)]),
            third,
        ]
    }

    #[test]
    fn format_names() {
        assert_eq!("CSV".parse::<ExportFormat>().unwrap(), ExportFormat::Csv);
        assert_eq!(
            " jsonl".parse::<ExportFormat>().unwrap(),
            ExportFormat::Jsonl
        );
        assert_eq!(
            "ndjson".parse::<ExportFormat>().unwrap(),
            ExportFormat::Jsonl
        );
        assert_eq!(
            "parquet".parse::<ExportFormat>().unwrap(),
            ExportFormat::Parquet
        );
        let err = "xlsx".parse::<ExportFormat>().unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown export format \"xlsx\": expected one of jsonl, csv, parquet"
        );
        assert_eq!(
            ExportFormat::from_path(Path::new("a/rows.PARQUET")),
            Some(ExportFormat::Parquet)
        );
        assert_eq!(ExportFormat::from_path(Path::new("rows.txt")), None);
    }

    #[test]
    fn jsonl_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("rows.jsonl");
        assert_eq!(write_rows(ExportFormat::Jsonl, &rows(), &out).unwrap(), 3);
        let text = std::fs::read_to_string(&out).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        // Flat, in column order.
        assert!(text.lines().next().unwrap().starts_with(
            r#"{"comparison_id":"c0","time_ms":1700000000000,"position":0,"context_len":10,"main_token":100,"#
        ));
        assert_eq!(lines[0]["kl.kld"], 0.125);
        assert_eq!(lines[0]["kl.delta_p"], -0.5);
        assert_eq!(lines[0]["main_logprob"], -0.5);
        assert_eq!(lines[1]["main_text"], "say \"hi\",\nthen");
        assert_eq!(lines[1]["kl.kld"], 1e-20);
        assert!(lines[1]["kl.delta_p"].is_null()); // infinity
        assert!(lines[2]["kl.kld"].is_null()); // NaN
        assert_eq!(lines[2]["top.overlap"], 0.75);
        assert!(lines[2]["main_text"].is_null());
        assert!(lines[2]["candidate_logprob"].is_null());
        assert!(lines[2]["candidate_pick"].is_null());
        assert_eq!(lines[2]["status"], "unaligned");
        assert!(lines[0].get("top.overlap").is_none());
    }

    #[test]
    fn csv_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("rows.csv");
        assert_eq!(write_rows(ExportFormat::Csv, &rows(), &out).unwrap(), 3);
        let mut r = csv::Reader::from_path(&out).unwrap();
        let header: Vec<String> = r.headers().unwrap().iter().map(String::from).collect();
        let mut expected: Vec<String> = FIXED_COLUMNS.iter().map(|s| s.to_string()).collect();
        expected.extend(["kl.delta_p", "kl.kld", "top.overlap"].map(String::from));
        assert_eq!(header, expected);
        let records: Vec<csv::StringRecord> = r.records().map(|r| r.unwrap()).collect();
        assert_eq!(records.len(), 3);
        let col = |name: &str| header.iter().position(|h| h == name).unwrap();
        assert_eq!(&records[0][col("comparison_id")], "c0");
        assert_eq!(&records[0][col("time_ms")], "1700000000000");
        assert_eq!(&records[0][col("main_logprob")], "-0.5");
        assert_eq!(&records[0][col("kl.kld")], "0.125");
        assert_eq!(&records[0][col("top.overlap")], ""); // absent
        assert_eq!(&records[1][col("main_text")], "say \"hi\",\nthen");
        assert_eq!(&records[1][col("kl.kld")], "1e-20");
        assert_eq!(&records[1][col("kl.delta_p")], "inf");
        assert_eq!(&records[2][col("kl.kld")], ""); // NaN
        assert_eq!(&records[2][col("top.overlap")], "0.75");
        assert_eq!(&records[2][col("main_text")], "");
        assert_eq!(&records[2][col("candidate_pick")], "");
        assert_eq!(records[1][col("kl.kld")].parse::<f64>().unwrap(), 1e-20);
        assert_eq!(
            records[1][col("kl.delta_p")].parse::<f64>().unwrap(),
            f64::INFINITY
        );
    }

    #[test]
    fn parquet_round_trip() {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        use parquet::record::Field;

        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("rows.parquet");
        assert_eq!(write_rows(ExportFormat::Parquet, &rows(), &out).unwrap(), 3);
        let reader = SerializedFileReader::new(File::open(&out).unwrap()).unwrap();
        assert_eq!(reader.metadata().file_metadata().num_rows(), 3);
        let read: Vec<BTreeMap<String, Field>> = reader
            .get_row_iter(None)
            .unwrap()
            .map(|row| {
                row.unwrap()
                    .get_column_iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .collect();
        assert_eq!(read.len(), 3);
        assert_eq!(read[0]["comparison_id"], Field::Str("c0".into()));
        assert_eq!(read[0]["time_ms"], Field::ULong(1_700_000_000_000));
        assert_eq!(read[0]["position"], Field::UInt(0));
        assert_eq!(read[0]["context_len"], Field::UInt(10));
        assert_eq!(read[0]["main_token"], Field::Int(100));
        assert_eq!(read[0]["main_logprob"], Field::Float(-0.5));
        assert_eq!(read[0]["candidate_pick"], Field::Int(7));
        assert_eq!(read[0]["kl.kld"], Field::Double(0.125));
        assert_eq!(read[0]["top.overlap"], Field::Null); // absent
        assert_eq!(read[1]["main_text"], Field::Str("say \"hi\",\nthen".into()));
        assert_eq!(read[1]["kl.kld"], Field::Double(1e-20));
        assert_eq!(read[1]["kl.delta_p"], Field::Double(f64::INFINITY));
        assert_eq!(read[2]["kl.kld"], Field::Null); // NaN
        assert_eq!(read[2]["top.overlap"], Field::Double(0.75));
        assert_eq!(read[2]["main_text"], Field::Null);
        assert_eq!(read[2]["candidate_logprob"], Field::Null);
        assert_eq!(read[2]["status"], Field::Str("unaligned".into()));
    }

    #[test]
    fn empty_and_clashing() {
        let dir = tempfile::tempdir().unwrap();
        for format in ExportFormat::ALL {
            let out = dir.path().join(format!("empty.{format}"));
            assert_eq!(write_rows(format, &[], &out).unwrap(), 0);
            assert!(out.exists());
        }
        let csv_text = std::fs::read_to_string(dir.path().join("empty.csv")).unwrap();
        assert_eq!(csv_text, format!("{}\n", FIXED_COLUMNS.join(",")));

        let mut bad = rows();
        bad[0].values.insert("status".into(), 1.0);
        let err = write_rows(ExportFormat::Csv, &bad, &dir.path().join("bad.csv"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"status\""), "{err}");
    }
}
