//! This crate's error type and its mapping onto the contract's errors.

use switchyard::Error;

/// What went wrong talking to PostgreSQL, with what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    /// The configuration is invalid.
    #[error("{0}")]
    Config(String),
    /// The server could not be reached or no connection was free in time.
    #[error(
        "PostgreSQL is unavailable while {context}: {source}; check that the server runs and accepts connections, or raise `max_connections` / `acquire_timeout`"
    )]
    Unavailable {
        /// What was being done.
        context: String,
        /// The driver's error.
        source: sqlx::Error,
    },
    /// A statement failed.
    #[error("PostgreSQL failed while {context}: {source}")]
    Query {
        /// What was being done.
        context: String,
        /// The driver's error.
        source: sqlx::Error,
    },
    /// The schema's migrations failed.
    #[error("migrating schema `{schema}` failed: {source}")]
    Migrate {
        /// The schema.
        schema: String,
        /// The migrator's error.
        source: sqlx::migrate::MigrateError,
    },
}

impl PgError {
    /// Wraps a driver error with what was being done: connection trouble becomes
    /// [`PgError::Unavailable`], the rest [`PgError::Query`].
    pub(crate) fn sql(context: impl Into<String>, source: sqlx::Error) -> Self {
        let context = context.into();
        match source {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Tls(_) => PgError::Unavailable { context, source },
            source => PgError::Query { context, source },
        }
    }
}

impl From<PgError> for Error {
    fn from(e: PgError) -> Self {
        match e {
            PgError::Config(msg) => Error::InvalidArgument(msg),
            e @ PgError::Unavailable { .. } => Error::Unavailable(e.to_string()),
            e => Error::storage("using the PostgreSQL store", e),
        }
    }
}

/// Maps a driver error straight onto the contract's error.
pub(crate) fn sql(context: impl Into<String>) -> impl FnOnce(sqlx::Error) -> Error {
    let context = context.into();
    move |e| PgError::sql(context, e).into()
}
