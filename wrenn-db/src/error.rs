//! The one error type of this crate: the kinds callers branch on.

use std::error::Error as StdError;

/// What a repository function can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    /// The row does not exist, or belongs to another team.
    #[error("{what} not found")]
    NotFound { what: &'static str },
    /// A unique constraint refused the write; `what` names it ("email", "template name").
    #[error("{what} already exists")]
    Conflict { what: &'static str },
    /// The caller passed a value that can never be stored.
    #[error("Invalid {field}: {reason}")]
    InvalidInput { field: &'static str, reason: String },
    /// The database, the migrations or a blocking task failed during `op`.
    #[error("Database failure during {op}")]
    Backend {
        op: &'static str,
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
}

impl DbError {
    pub(crate) fn backend(op: &'static str, e: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        DbError::Backend {
            op,
            source: e.into(),
        }
    }

    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        DbError::InvalidInput {
            field,
            reason: reason.into(),
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, DbError::NotFound { .. })
    }

    pub fn is_conflict(&self) -> bool {
        matches!(self, DbError::Conflict { .. })
    }
}

/// How a failed statement maps to [`DbError`]: `op` names the statement for the log,
/// `unique` what a unique violation means, `missing` what a foreign-key violation means.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ctx {
    pub op: &'static str,
    pub unique: &'static str,
    pub missing: &'static str,
}

impl Ctx {
    pub(crate) const fn op(op: &'static str) -> Ctx {
        Ctx {
            op,
            unique: "row",
            missing: "referenced row",
        }
    }

    pub(crate) const fn unique(self, what: &'static str) -> Ctx {
        Ctx {
            unique: what,
            ..self
        }
    }

    pub(crate) const fn missing(self, what: &'static str) -> Ctx {
        Ctx {
            missing: what,
            ..self
        }
    }

    pub(crate) fn err(self, e: sqlx::Error) -> DbError {
        if let sqlx::Error::Database(db) = &e {
            match db.kind() {
                sqlx::error::ErrorKind::UniqueViolation => {
                    return DbError::Conflict { what: self.unique }
                }
                sqlx::error::ErrorKind::ForeignKeyViolation => {
                    return DbError::NotFound { what: self.missing }
                }
                _ => {}
            }
        }
        DbError::backend(self.op, e)
    }
}
