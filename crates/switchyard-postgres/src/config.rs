//! Connection and pool settings.

use std::time::Duration;

/// Where a service's store lives and how many connections it may hold.
#[derive(Debug, Clone)]
pub struct PgStoreConfig {
    /// Connection URL, e.g. `postgres://shop@127.0.0.1:5432/shop`.
    pub url: String,
    /// The service's schema (created if missing): lowercase letters, digits and `_`,
    /// starting with a letter, at most 63 characters. Each service owns one; instances of
    /// one service share it.
    pub schema: String,
    /// Connections this instance may hold (sqlx pool `max_connections`). Every commit and
    /// every read holds one for its duration; size it to the handler concurrency, and keep
    /// the sum over all instances below the server's `max_connections` (100 by default:
    /// the six shop services with three replicas of one already hold up to 64).
    pub max_connections: u32,
    /// How long a call waits for a free connection before failing with
    /// [`Error::Unavailable`](switchyard::Error::Unavailable).
    pub acquire_timeout: Duration,
    /// How long a relay's claim on outbox entries lasts: entries a crashed instance
    /// claimed are published by another after this.
    pub claim_lease: Duration,
}

impl PgStoreConfig {
    /// Defaults: 8 connections, 10 s acquire timeout, 10 s outbox claim lease.
    pub fn new(url: impl Into<String>, schema: impl Into<String>) -> Self {
        PgStoreConfig {
            url: url.into(),
            schema: schema.into(),
            max_connections: 8,
            acquire_timeout: Duration::from_secs(10),
            claim_lease: Duration::from_secs(10),
        }
    }
}

/// Checks a schema name (it is put into SQL as an identifier).
pub(crate) fn validate_schema(schema: &str) -> Result<(), String> {
    let mut chars = schema.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    let rest_ok = schema
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !first_ok || !rest_ok || schema.len() > 63 {
        return Err(format!(
            "invalid schema name `{schema}`: use 1–63 lowercase letters, digits and `_`, starting with a letter"
        ));
    }
    if schema.starts_with("pg_") {
        return Err(format!(
            "invalid schema name `{schema}`: names starting with `pg_` are PostgreSQL's"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate_schema;

    #[test]
    fn schema_names() {
        assert!(validate_schema("payment").is_ok());
        assert!(validate_schema("shop_payment_2").is_ok());
        for bad in [
            "",
            "Payment",
            "2pay",
            "pay-ment",
            "pay;drop",
            "pg_catalog",
            &"x".repeat(64),
        ] {
            assert!(validate_schema(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
