//! [`PgStore`]: the store contract on PostgreSQL.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, Row};
use switchyard::store::{OutboxEntry, RawRow, Store, Write, WriteBatch};
use switchyard::{Envelope, Error, MessageId, Result, Timestamp};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::config::{PgStoreConfig, validate_schema};
use crate::error::{PgError, sql};
use crate::schema::Migrations;

/// A service's store in its PostgreSQL schema. Cheap to clone (clones share one pool).
///
/// See the [crate docs](crate) for the layout and the guarantees.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    schema: String,
    /// This instance's id: the owner of its outbox claims.
    instance: Uuid,
    claim_lease_ms: i64,
    notify: Arc<Notify>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("schema", &self.inner.schema)
            .field("instance", &self.inner.instance)
            .finish()
    }
}

/// A pooled connection idle for this long is pinged before it is handed out.
const PING_WHEN_IDLE_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// SQLSTATEs of "already exists" races when two instances create the schema at once.
const UNIQUE_VIOLATION: &str = "23505";
const DUPLICATE_SCHEMA: &str = "42P06";

impl PgStore {
    /// Connects, creates the schema if missing and applies its migrations.
    pub async fn connect(config: PgStoreConfig) -> std::result::Result<PgStore, PgError> {
        validate_schema(&config.schema).map_err(PgError::Config)?;
        let options = PgConnectOptions::from_str(&config.url)
            .map_err(|e| PgError::Config(format!("invalid PostgreSQL URL: {e}")))?
            .application_name(&application_name(&config.schema))
            .options([("search_path", config.schema.as_str())]);
        let mut conn = sqlx::PgConnection::connect_with(&options)
            .await
            .map_err(|e| PgError::sql(format!("connecting to {}", redact(&config.url)), e))?;
        let create = format!("CREATE SCHEMA IF NOT EXISTS \"{}\"", config.schema);
        if let Err(e) = sqlx::query(&create).execute(&mut conn).await {
            let raced = e
                .as_database_error()
                .and_then(|d| d.code())
                .is_some_and(|c| c == UNIQUE_VIOLATION || c == DUPLICATE_SCHEMA);
            if !raced {
                return Err(PgError::sql(
                    format!("creating schema `{}`", config.schema),
                    e,
                ));
            }
        }
        let _ = conn.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections.max(1))
            .acquire_timeout(config.acquire_timeout)
            // sqlx pings every connection it hands out by default: a round trip before
            // every statement. Only a connection idle for a while is checked (the server
            // may have dropped it meanwhile); a busy one fails its statement instead, with
            // `Unavailable` (retryable), and is discarded.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_WHEN_IDLE_FOR {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(options)
            .await
            .map_err(|e| PgError::sql(format!("connecting to {}", redact(&config.url)), e))?;
        let migrator = sqlx::migrate::Migrator::new(Migrations)
            .await
            .map_err(|source| PgError::Migrate {
                schema: config.schema.clone(),
                source,
            })?;
        migrator
            .run(&pool)
            .await
            .map_err(|source| PgError::Migrate {
                schema: config.schema.clone(),
                source,
            })?;
        Ok(PgStore {
            inner: Arc::new(Inner {
                pool,
                schema: config.schema,
                instance: Uuid::now_v7(),
                claim_lease_ms: i64::try_from(config.claim_lease.as_millis()).unwrap_or(i64::MAX),
                notify: Arc::new(Notify::new()),
            }),
        })
    }

    /// The service's schema.
    pub fn schema(&self) -> &str {
        &self.inner.schema
    }

    /// The connection pool (for the service's own queries in the same database).
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Releases this instance's outbox claims (so another instance's relay publishes
    /// them at once instead of after the lease), then closes the pool: waits for the
    /// connections in use to come back and closes them all.
    pub async fn close(&self) {
        let released = sqlx::query(
            "UPDATE sy_outbox SET claimed_by = NULL, claimed_until = NULL WHERE claimed_by = $1",
        )
        .bind(self.inner.instance)
        .execute(&self.inner.pool)
        .await;
        if let Err(e) = released {
            tracing::warn!(schema = %self.inner.schema, error = %e,
                "releasing the outbox claims failed; other instances publish them after the lease");
        }
        self.inner.pool.close().await;
    }

    /// The advisory lock key of row `key` of `table` in this schema: FNV-1a over
    /// schema, table and key (stable across builds and processes, so every instance of
    /// the service locks the same number; a collision only makes two keys take turns).
    fn lock_key(&self, table: &str, key: &str) -> i64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for part in [
            self.inner.schema.as_bytes(),
            table.as_bytes(),
            key.as_bytes(),
        ] {
            for b in part.iter().chain(std::iter::once(&0x1f)) {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        i64::from_ne_bytes(h.to_ne_bytes())
    }
}

/// The `application_name` of a store's connections, `switchyard/<schema>`: operators see
/// in `pg_stat_activity` which service a connection serves (PostgreSQL keeps the first 63
/// bytes).
pub fn application_name(schema: &str) -> String {
    format!("switchyard/{schema}")
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}@{}", &url[..scheme + 3], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// PostgreSQL text cannot hold NUL.
fn check_text(what: &str, value: &str) -> Result<()> {
    if value.as_bytes().contains(&0) {
        return Err(Error::InvalidArgument(format!(
            "{what} {value:?} contains a NUL byte, which PostgreSQL text cannot hold"
        )));
    }
    Ok(())
}

/// The smallest string greater than every string starting with `prefix` (in code point
/// order, which is UTF-8 byte order, which is `COLLATE "C"`), or `None` if there is none.
fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = match last as u32 + 1 {
            0xD800 => Some('\u{E000}'),
            n => char::from_u32(n),
        };
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

fn i64_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn decode_row(row: &sqlx::postgres::PgRow, key: String) -> Result<RawRow> {
    let value: Vec<u8> = row.try_get("value").map_err(sql("reading a row"))?;
    let version: i64 = row.try_get("version").map_err(sql("reading a row"))?;
    Ok(RawRow {
        key,
        value: Bytes::from(value),
        version: version as u64,
    })
}

#[async_trait]
impl Store for PgStore {
    async fn get_raw(&self, table: &str, key: &str) -> Result<Option<RawRow>> {
        check_text("table", table)?;
        check_text("key", key)?;
        let row = sqlx::query("SELECT value, version FROM sy_rows WHERE tbl = $1 AND key = $2")
            .bind(table)
            .bind(key)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(sql(format!("reading row {table}/{key}")))?;
        row.map(|r| decode_row(&r, key.to_string())).transpose()
    }

    async fn scan_raw(&self, table: &str, prefix: &str, limit: usize) -> Result<Vec<RawRow>> {
        check_text("table", table)?;
        check_text("prefix", prefix)?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let query = match prefix_end(prefix) {
            Some(end) => sqlx::query(
                "SELECT key, value, version FROM sy_rows \
                 WHERE tbl = $1 AND key >= $2 AND key < $3 ORDER BY key LIMIT $4",
            )
            .bind(table)
            .bind(prefix)
            .bind(end)
            .bind(limit),
            None => sqlx::query(
                "SELECT key, value, version FROM sy_rows \
                 WHERE tbl = $1 AND key >= $2 ORDER BY key LIMIT $3",
            )
            .bind(table)
            .bind(prefix)
            .bind(limit),
        };
        let rows = query
            .fetch_all(&self.inner.pool)
            .await
            .map_err(sql(format!("scanning table `{table}`")))?;
        rows.iter()
            .map(|r| {
                let key: String = r.try_get("key").map_err(sql("reading a row key"))?;
                decode_row(r, key)
            })
            .collect()
    }

    async fn commit(&self, batch: WriteBatch) -> Result<()> {
        if batch.is_empty() && batch.expect.is_empty() {
            return Ok(());
        }
        // The final state of every written row (a later write of a key wins).
        let mut rows: BTreeMap<(String, String), Option<Bytes>> = BTreeMap::new();
        for w in batch.writes {
            match w {
                Write::Put { table, key, value } => {
                    check_text("table", &table)?;
                    check_text("key", &key)?;
                    rows.insert((table, key), Some(value));
                }
                Write::Delete { table, key } => {
                    check_text("table", &table)?;
                    check_text("key", &key)?;
                    rows.insert((table, key), None);
                }
            }
        }
        for e in &batch.expect {
            check_text("table", &e.table)?;
            check_text("key", &e.key)?;
        }
        for (topic, _) in &batch.outbox {
            check_text("topic", topic)?;
        }
        for (consumer, _) in &batch.inbox {
            check_text("consumer", consumer)?;
        }
        let locks: Vec<i64> = batch
            .expect
            .iter()
            .map(|e| self.lock_key(&e.table, &e.key))
            .chain(rows.keys().map(|(t, k)| self.lock_key(t, k)))
            .collect::<BTreeSet<i64>>()
            .into_iter()
            .collect();
        let exp_tables: Vec<&str> = batch.expect.iter().map(|e| e.table.as_str()).collect();
        let exp_keys: Vec<&str> = batch.expect.iter().map(|e| e.key.as_str()).collect();
        let exp_versions: Vec<Option<i64>> =
            batch.expect.iter().map(|e| e.version.map(i64_of)).collect();
        // Sorted and without duplicates: marking one message twice in one commit is one mark.
        let marks: BTreeSet<(&str, Uuid)> = batch
            .inbox
            .iter()
            .map(|(c, id)| (c.as_str(), id.0))
            .collect();
        let (inbox_consumers, inbox_ids): (Vec<&str>, Vec<Uuid>) = marks.into_iter().unzip();
        let mut put_tables = Vec::new();
        let mut put_keys = Vec::new();
        let mut put_values = Vec::new();
        let mut del_tables = Vec::new();
        let mut del_keys = Vec::new();
        for ((table, key), value) in rows {
            match value {
                Some(v) => {
                    put_tables.push(table);
                    put_keys.push(key);
                    put_values.push(v.to_vec());
                }
                None => {
                    del_tables.push(table);
                    del_keys.push(key);
                }
            }
        }
        let (out_topics, out_envelopes): (Vec<&str>, Vec<Vec<u8>>) = batch
            .outbox
            .iter()
            .map(|(t, e)| (t.as_str(), e.to_bytes().to_vec()))
            .unzip();

        // One statement, so one round trip and its own transaction: locks, checks and
        // writes in `sy_commit` (migration 2, `schema.rs`).
        let row = sqlx::query(
            "SELECT outcome, ref_a, ref_b \
             FROM sy_commit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        )
        .bind(&locks)
        .bind(&exp_tables)
        .bind(&exp_keys)
        .bind(&exp_versions)
        .bind(&inbox_consumers)
        .bind(&inbox_ids)
        .bind(i64_of(Timestamp::now().unix_micros()))
        .bind(&put_tables)
        .bind(&put_keys)
        .bind(&put_values)
        .bind(&del_tables)
        .bind(&del_keys)
        .bind(&out_topics)
        .bind(&out_envelopes)
        .fetch_one(&self.inner.pool)
        .await
        .map_err(sql("committing"))?;
        let outcome: &str = row
            .try_get(0)
            .map_err(sql("reading the commit's outcome"))?;
        let ref_a: Option<String> = row
            .try_get(1)
            .map_err(sql("reading the commit's outcome"))?;
        let ref_b: Option<String> = row
            .try_get(2)
            .map_err(sql("reading the commit's outcome"))?;
        match outcome {
            "ok" => {}
            "conflict" => {
                return Err(Error::Conflict {
                    table: ref_a.unwrap_or_default(),
                    key: ref_b.unwrap_or_default(),
                });
            }
            "already_processed" => {
                let id = ref_b.unwrap_or_default();
                return Err(Error::AlreadyProcessed {
                    consumer: ref_a.unwrap_or_default(),
                    id: Uuid::parse_str(&id).map_or(id, |u| MessageId(u).to_string()),
                });
            }
            other => {
                return Err(Error::storage(
                    "committing",
                    format!("sy_commit returned the unknown outcome {other:?}"),
                ));
            }
        }
        if !batch.outbox.is_empty() {
            self.inner.notify.notify_waiters();
        }
        Ok(())
    }

    async fn inbox_contains(&self, consumer: &str, id: MessageId) -> Result<bool> {
        check_text("consumer", consumer)?;
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM sy_inbox WHERE consumer = $1 AND id = $2)")
            .bind(consumer)
            .bind(id.0)
            .fetch_one(&self.inner.pool)
            .await
            .map_err(sql(format!("reading the inbox of `{consumer}`")))
    }

    async fn expire_inbox(&self, before: Timestamp) -> Result<u64> {
        // In chunks, so a large expiry never holds many row locks for long.
        let mut removed = 0;
        loop {
            let n = sqlx::query(
                "DELETE FROM sy_inbox WHERE ctid IN \
                 (SELECT ctid FROM sy_inbox WHERE marked_at_us < $1 LIMIT 10000)",
            )
            .bind(i64_of(before.unix_micros()))
            .execute(&self.inner.pool)
            .await
            .map_err(sql("expiring inbox marks"))?
            .rows_affected();
            removed += n;
            if n < 10_000 {
                return Ok(removed);
            }
        }
    }

    async fn outbox_peek(&self, limit: usize) -> Result<Vec<OutboxEntry>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // Claims the oldest entries no other live instance holds: several instances'
        // relays share the outbox, and a crashed instance's claims lapse after the lease.
        let rows = sqlx::query(
            "UPDATE sy_outbox SET claimed_by = $1, \
                 claimed_until = now() + $2 * interval '1 millisecond' \
             WHERE seq IN ( \
                 SELECT seq FROM sy_outbox \
                 WHERE claimed_by IS NULL OR claimed_by = $1 OR claimed_until < now() \
                 ORDER BY seq LIMIT $3 FOR UPDATE SKIP LOCKED) \
             RETURNING seq, topic, envelope",
        )
        .bind(self.inner.instance)
        .bind(self.inner.claim_lease_ms)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.inner.pool)
        .await
        .map_err(sql("claiming outbox entries"))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let seq: i64 = r.try_get(0).map_err(sql("reading the outbox"))?;
            let topic: String = r.try_get(1).map_err(sql("reading the outbox"))?;
            let env: Vec<u8> = r.try_get(2).map_err(sql("reading the outbox"))?;
            let envelope = Envelope::from_bytes(&Bytes::from(env))
                .map_err(|e| Error::storage(format!("decoding outbox entry {seq}"), e))?;
            out.push(OutboxEntry {
                seq: seq as u64,
                topic,
                envelope,
            });
        }
        out.sort_by_key(|e| e.seq);
        Ok(out)
    }

    async fn outbox_remove(&self, seqs: &[u64]) -> Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        let seqs: Vec<i64> = seqs.iter().map(|s| i64_of(*s)).collect();
        sqlx::query("DELETE FROM sy_outbox WHERE seq = ANY($1)")
            .bind(&seqs)
            .execute(&self.inner.pool)
            .await
            .map_err(sql("removing published outbox entries"))?;
        Ok(())
    }

    async fn outbox_len(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM sy_outbox")
            .fetch_one(&self.inner.pool)
            .await
            .map_err(sql("counting the outbox"))?;
        Ok(n as u64)
    }

    fn outbox_notify(&self) -> Arc<Notify> {
        self.inner.notify.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::{prefix_end, redact};

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end("a/"), Some("a0".to_string()));
        assert_eq!(prefix_end(""), None);
        assert_eq!(prefix_end("x\u{D7FF}"), Some("x\u{E000}".to_string()));
        assert_eq!(prefix_end("y\u{10FFFF}"), Some("z".to_string()));
        assert_eq!(prefix_end("\u{10FFFF}"), None);
        for (prefix, inside, outside) in [("a/", "a/zzz", "a0"), ("é", "é\u{10FFFF}", "ê")] {
            let end = prefix_end(prefix).unwrap();
            assert!(inside.as_bytes() < end.as_bytes(), "{inside} < {end}");
            assert!(outside.as_bytes() >= end.as_bytes(), "{outside} >= {end}");
        }
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact("postgres://shop:secret@db:5432/shop"),
            "postgres://shop@db:5432/shop"
        );
        assert_eq!(redact("postgres://db/shop"), "postgres://db/shop");
    }
}
