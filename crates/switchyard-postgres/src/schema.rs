//! The schema's migrations, applied by sqlx's migrator when a store connects (the
//! migrator takes a lock, so instances starting together apply each migration once).
//! A migration, once released, never changes: its checksum is recorded in the schema.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;

use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType};

/// Every migration, in order: (version, description, SQL).
pub(crate) const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "switchyard store: rows, inbox, outbox", V1_TABLES),
    (2, "switchyard store: one call per commit", V2_COMMIT),
];

/// The tables, the version sequence.
const V1_TABLES: &str = r#"
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
"#;

/// `sy_commit`: a whole commit in one call, so one round trip. Called as a statement of
/// its own (its own transaction): either everything lands or nothing does.
///
/// Outcomes: `ok`; `conflict` with the table and key of the first expectation that no
/// longer holds (nothing written); `already_processed` with the consumer and message id
/// of the first inbox mark made before (nothing written).
const V2_COMMIT: &str = r#"
CREATE FUNCTION sy_commit(
    locks           bigint[],  -- advisory lock keys of every key read or written, sorted
    exp_tables      text[],    -- the rows the commit read ...
    exp_keys        text[],
    exp_versions    bigint[],  -- ... and the versions read (NULL: the row was absent)
    inbox_consumers text[],    -- the inbox marks, sorted, no duplicates
    inbox_ids       uuid[],
    marked_at       bigint,    -- when (µs since the Unix epoch)
    put_tables      text[],    -- the rows to insert or replace, in write order
    put_keys        text[],
    put_values      bytea[],
    del_tables      text[],    -- the rows to delete
    del_keys        text[],
    out_topics      text[],    -- the outbox entries, in order
    out_envelopes   bytea[],
    OUT outcome     text,      -- 'ok' | 'conflict' | 'already_processed'
    OUT ref_a       text,      -- conflict: the table; already_processed: the consumer
    OUT ref_b       text       -- conflict: the key; already_processed: the message id
) LANGUAGE plpgsql AS $fn$
DECLARE
    lock_key bigint;
BEGIN
    -- Every key read or written, in one order for all commits (no deadlock): commits
    -- touching a key take turns, and each sees the one before it committed (READ
    -- COMMITTED: each statement sees what committed before it started).
    FOREACH lock_key IN ARRAY locks LOOP
        PERFORM pg_advisory_xact_lock(lock_key);
    END LOOP;

    -- The first row read whose version changed since (a row that was absent must still
    -- be; versions never repeat, so a deleted and re-created row does not match).
    IF cardinality(exp_keys) > 0 THEN
        SELECT u.t, u.k INTO ref_a, ref_b
        FROM unnest(exp_tables, exp_keys, exp_versions) WITH ORDINALITY AS u(t, k, v, i)
        LEFT JOIN sy_rows r ON r.tbl = u.t AND r.key = u.k
        WHERE r.version IS DISTINCT FROM u.v
        ORDER BY u.i
        LIMIT 1;
        IF FOUND THEN
            outcome := 'conflict';
            RETURN;
        END IF;
    END IF;

    -- The inbox marks; one made before (by a commit that committed, or that commits
    -- while this one waits on its row) fails the commit, undoing this one's own marks.
    FOR n IN 1 .. coalesce(cardinality(inbox_ids), 0) LOOP
        INSERT INTO sy_inbox (consumer, id, marked_at_us)
        VALUES (inbox_consumers[n], inbox_ids[n], marked_at)
        ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            DELETE FROM sy_inbox s
            USING unnest(inbox_consumers[1:n - 1], inbox_ids[1:n - 1]) AS u(c, i)
            WHERE s.consumer = u.c AND s.id = u.i;
            outcome := 'already_processed';
            ref_a := inbox_consumers[n];
            ref_b := inbox_ids[n]::text;
            RETURN;
        END IF;
    END LOOP;

    IF cardinality(put_keys) > 0 THEN
        INSERT INTO sy_rows (tbl, key, value, version)
        SELECT u.t, u.k, u.v, nextval('sy_versions')
        FROM unnest(put_tables, put_keys, put_values) WITH ORDINALITY AS u(t, k, v, i)
        ORDER BY u.i
        ON CONFLICT (tbl, key) DO UPDATE
            SET value = EXCLUDED.value, version = EXCLUDED.version;
    END IF;

    IF cardinality(del_keys) > 0 THEN
        DELETE FROM sy_rows r
        USING unnest(del_tables, del_keys) AS u(t, k)
        WHERE r.tbl = u.t AND r.key = u.k;
    END IF;

    IF cardinality(out_topics) > 0 THEN
        INSERT INTO sy_outbox (topic, envelope)
        SELECT u.t, u.e
        FROM unnest(out_topics, out_envelopes) WITH ORDINALITY AS u(t, e, i)
        ORDER BY u.i;
    END IF;

    outcome := 'ok';
END
$fn$;
"#;

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
