//! The schema's migrations, applied by sqlx's migrator when a store connects (the
//! migrator takes a lock, so instances starting together apply each migration once).
//! A migration, once released, never changes: its checksum is recorded in the schema.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;

use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType};

/// Every migration, in order: (version, description, SQL).
const MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "switchyard store: rows, inbox, outbox",
    r#"
CREATE SEQUENCE sy_versions;

CREATE TABLE sy_rows (
    tbl     text COLLATE "C" NOT NULL,
    key     text COLLATE "C" NOT NULL,
    value   bytea NOT NULL,
    version bigint NOT NULL,
    PRIMARY KEY (tbl, key)
);

CREATE TABLE sy_inbox (
    consumer     text NOT NULL,
    id           uuid NOT NULL,
    marked_at_us bigint NOT NULL,
    PRIMARY KEY (consumer, id)
);
CREATE INDEX sy_inbox_marked_at ON sy_inbox (marked_at_us);

CREATE TABLE sy_outbox (
    seq           bigserial PRIMARY KEY,
    topic         text NOT NULL,
    envelope      bytea NOT NULL,
    claimed_by    uuid,
    claimed_until timestamptz
);
"#,
)];

/// The migrations as sqlx's migrator takes them.
#[derive(Debug)]
pub(crate) struct Migrations;

impl<'s> MigrationSource<'s> for Migrations {
    fn resolve(
        self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, BoxDynError>> + Send + 's>> {
        Box::pin(async {
            Ok(MIGRATIONS
                .iter()
                .map(|(version, description, sql)| {
                    Migration::new(
                        *version,
                        Cow::Borrowed(*description),
                        MigrationType::Simple,
                        Cow::Borrowed(*sql),
                        false,
                    )
                })
                .collect())
        })
    }
}
