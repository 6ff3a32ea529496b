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
    /// The database cannot be reached (connection refused or lost, pool exhausted,
    /// server shutting down) during `op`: worth retrying.
    #[error("Database unavailable during {op}")]
    Unavailable {
        op: &'static str,
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
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
        let source = e.into();
        if source
            .downcast_ref::<sqlx::Error>()
            .is_some_and(unreachable_database)
        {
            return DbError::Unavailable { op, source };
        }
        DbError::Backend { op, source }
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

    pub fn is_unavailable(&self) -> bool {
        matches!(self, DbError::Unavailable { .. })
    }
}

/// Whether `e` says the database could not be reached, rather than that a statement
/// failed: connection errors, an exhausted or closed pool, and PostgreSQL's
/// connection-exception (08xxx) and operator-intervention (57P01-57P03) codes.
fn unreachable_database(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03")),
        _ => false,
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
