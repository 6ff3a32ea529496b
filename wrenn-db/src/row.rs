//! Reading columns out of `AnyRow`s the same way on both backends.

use crate::time::{from_db, Timestamp};
use sqlx::any::AnyRow;
use sqlx::Row;

/// Decoding errors mean the schema and the code disagree: a backend failure.
pub(crate) type R<T> = Result<T, sqlx::Error>;

pub(crate) fn text(row: &AnyRow, col: &str) -> R<String> {
    row.try_get(col)
}

pub(crate) fn opt_text(row: &AnyRow, col: &str) -> R<Option<String>> {
    row.try_get(col)
}

pub(crate) fn int(row: &AnyRow, col: &str) -> R<i64> {
    row.try_get(col)
}

pub(crate) fn opt_int(row: &AnyRow, col: &str) -> R<Option<i64>> {
    row.try_get(col)
}

pub(crate) fn u32_col(row: &AnyRow, col: &str) -> R<u32> {
    u32::try_from(int(row, col)?).map_err(|e| decode(col, e))
}

pub(crate) fn opt_u32(row: &AnyRow, col: &str) -> R<Option<u32>> {
    opt_int(row, col)?
        .map(|v| u32::try_from(v).map_err(|e| decode(col, e)))
        .transpose()
}

/// PostgreSQL has real booleans; SQLite columns hold 0/1 (the Any driver cannot read
/// SQLite's BOOLEAN declared type).
pub(crate) fn boolean(row: &AnyRow, col: &str) -> R<bool> {
    match row.try_get::<bool, _>(col) {
        Ok(b) => Ok(b),
        Err(_) => Ok(int(row, col)? != 0),
    }
}

pub(crate) fn ts(row: &AnyRow, col: &str) -> R<Timestamp> {
    Ok(from_db(int(row, col)?))
}

pub(crate) fn opt_ts(row: &AnyRow, col: &str) -> R<Option<Timestamp>> {
    Ok(opt_int(row, col)?.map(from_db))
}

pub(crate) fn json_map(row: &AnyRow, col: &str) -> R<serde_json::Map<String, serde_json::Value>> {
    serde_json::from_str(&text(row, col)?).map_err(|e| decode(col, e))
}

pub(crate) fn decode(
    col: &str,
    e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: col.to_string(),
        source: e.into(),
    }
}
