//! Timestamps: `DateTime<Utc>` in Rust, integer microseconds in the database.

use chrono::{DateTime, SubsecRound, Utc};

pub type Timestamp = DateTime<Utc>;

/// The current time at the database's precision (microseconds), so that a value
/// written and read back compares equal.
pub fn now() -> Timestamp {
    Utc::now().trunc_subsecs(6)
}

pub(crate) fn to_db(t: Timestamp) -> i64 {
    t.timestamp_micros()
}

pub(crate) fn from_db(micros: i64) -> Timestamp {
    // Out-of-range values cannot come from `to_db`; clamp instead of panicking.
    DateTime::from_timestamp_micros(micros).unwrap_or(DateTime::<Utc>::MIN_UTC)
}
