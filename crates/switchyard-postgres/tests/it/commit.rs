//! The commit path beyond the conformance suites: the outcomes `sy_commit` reports, and a
//! schema created by version 1 of the migrations (one SQL statement per step of a commit)
//! upgrading in place when a store of this version connects.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sqlx::Connection;
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use switchyard::store::{Expectation, Store, Write, WriteBatch};
use switchyard::{Error, Event, MessageId};
use switchyard_postgres::{PgStore, PgStoreConfig};

use crate::factory::Pg;

#[derive(Serialize, Deserialize)]
struct Noted {
    n: u32,
}

impl Event for Noted {
    const TYPE: &'static str = "test.noted.v1";
}

fn put(table: &str, key: &str, value: &[u8]) -> Write {
    Write::Put {
        table: table.into(),
        key: key.into(),
        value: Bytes::copy_from_slice(value),
    }
}

fn expect(table: &str, key: &str, version: Option<u64>) -> Expectation {
    Expectation {
        table: table.into(),
        key: key.into(),
        version,
    }
}

async fn connect(url: &str, schema: &str) -> PgStore {
    PgStore::connect(PgStoreConfig::new(url, schema))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn outcomes_of_a_commit() {
    let Some(pg) = Pg::start() else { return };
    let store = connect(&pg.url().unwrap(), "commit_outcomes").await;
    let batch = |expect: Vec<Expectation>, writes: Vec<Write>| WriteBatch {
        expect,
        writes,
        ..Default::default()
    };

    // An absent row read as absent: the commit creates it.
    store
        .commit(batch(
            vec![expect("t", "a", None)],
            vec![put("t", "a", b"1")],
        ))
        .await
        .unwrap();
    let v1 = store.get_raw("t", "a").await.unwrap().unwrap().version;

    // Read as absent, but it exists now: a conflict naming the row, nothing written.
    let err = store
        .commit(batch(
            vec![expect("t", "b", None), expect("t", "a", None)],
            vec![put("t", "b", b"x"), put("t", "a", b"x")],
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Conflict { table, key } if table == "t" && key == "a"),
        "{err:?}"
    );
    assert!(store.get_raw("t", "b").await.unwrap().is_none());

    // Deleted and created again: a new version, so the old read does not match (no ABA).
    store
        .commit(batch(
            vec![],
            vec![Write::Delete {
                table: "t".into(),
                key: "a".into(),
            }],
        ))
        .await
        .unwrap();
    store
        .commit(batch(vec![], vec![put("t", "a", b"1")]))
        .await
        .unwrap();
    let v2 = store.get_raw("t", "a").await.unwrap().unwrap().version;
    assert!(v2 > v1);
    let err = store
        .commit(batch(
            vec![expect("t", "a", Some(v1))],
            vec![put("t", "a", b"2")],
        ))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err:?}");

    // An expectation alone (nothing written) is checked too.
    store
        .commit(batch(vec![expect("t", "a", Some(v2))], vec![]))
        .await
        .unwrap();
    let err = store
        .commit(batch(vec![expect("t", "a", Some(v1))], vec![]))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err:?}");

    // Inbox: one message marked twice in one commit is one mark; a second commit with it
    // is refused whole, its other (fresh) mark and its writes undone.
    // `fresh` sorts first, so its mark is made (and must be undone) before `seen` is found.
    let mut ids = [MessageId::new(), MessageId::new()];
    ids.sort_by_key(|id| id.0);
    let [fresh, seen] = ids;
    store
        .commit(WriteBatch {
            inbox: vec![("c".into(), seen), ("c".into(), seen)],
            ..Default::default()
        })
        .await
        .unwrap();
    let err = store
        .commit(WriteBatch {
            writes: vec![put("t", "c", b"1")],
            outbox: vec![(
                "topic".into(),
                switchyard::codec::encode(&Noted { n: 1 }, "/t").unwrap(),
            )],
            inbox: vec![("c".into(), fresh), ("c".into(), seen)],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::AlreadyProcessed { consumer, id } if consumer == "c" && *id == seen.to_string()),
        "{err:?}"
    );
    assert!(!store.inbox_contains("c", fresh).await.unwrap());
    assert!(store.inbox_contains("c", seen).await.unwrap());
    assert!(store.get_raw("t", "c").await.unwrap().is_none());
    assert_eq!(store.outbox_len().await.unwrap(), 0);
    store.close().await;
}

/// Migration 1 exactly as released (a changed copy fails the migrator's checksum check).
#[derive(Debug)]
struct Version1;

const VERSION_1: &str = r#"
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

impl<'s> MigrationSource<'s> for Version1 {
    fn resolve(
        self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, BoxDynError>> + Send + 's>> {
        Box::pin(async {
            Ok(vec![Migration::new(
                1,
                Cow::Borrowed("switchyard store: rows, inbox, outbox"),
                MigrationType::Simple,
                Cow::Borrowed(VERSION_1),
                false,
            )])
        })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schema_of_version_1_upgrades_in_place() {
    let Some(pg) = Pg::start() else { return };
    let url = pg.url().unwrap();
    let schema = "upgrade_from_v1";

    // What version 1 left behind: its schema, and a row, an inbox mark and an outbox
    // entry written as its commits wrote them.
    let options = PgConnectOptions::from_str(&url)
        .unwrap()
        .options([("search_path", schema)]);
    let mut conn = PgConnection::connect_with(&options).await.unwrap();
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut conn)
        .await
        .unwrap();
    Migrator::new(Version1)
        .await
        .unwrap()
        .run(&mut conn)
        .await
        .unwrap();
    let old_version: i64 = sqlx::query_scalar(
        "INSERT INTO sy_rows (tbl, key, value, version) \
         VALUES ('stock', 'sku-1', '\\x07', nextval('sy_versions')) RETURNING version",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let marked = MessageId::new();
    sqlx::query("INSERT INTO sy_inbox (consumer, id, marked_at_us) VALUES ('c', $1, 1)")
        .bind(marked.0)
        .execute(&mut conn)
        .await
        .unwrap();
    let old_entry = switchyard::codec::encode(&Noted { n: 1 }, "/t").unwrap();
    sqlx::query("INSERT INTO sy_outbox (topic, envelope) VALUES ('noted', $1)")
        .bind(old_entry.to_bytes().to_vec())
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();

    // This version connects: migration 2 applies, and the old data works with the new
    // commit path.
    let store = connect(&url, schema).await;
    let row = store.get_raw("stock", "sku-1").await.unwrap().unwrap();
    assert_eq!(
        (row.version, &row.value[..]),
        (old_version as u64, &[7u8][..])
    );
    let stale = store
        .commit(WriteBatch {
            expect: vec![expect("stock", "sku-1", Some(row.version - 1))],
            writes: vec![put("stock", "sku-1", b"\x06")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(stale, Error::Conflict { .. }), "{stale:?}");
    let new_entry = switchyard::codec::encode(&Noted { n: 2 }, "/t").unwrap();
    store
        .commit(WriteBatch {
            expect: vec![expect("stock", "sku-1", Some(row.version))],
            writes: vec![put("stock", "sku-1", b"\x06")],
            outbox: vec![("noted".into(), new_entry.clone())],
            inbox: vec![("c".into(), MessageId::new())],
        })
        .await
        .unwrap();
    let row2 = store.get_raw("stock", "sku-1").await.unwrap().unwrap();
    assert!(row2.version > row.version);
    let again = store
        .commit(WriteBatch {
            inbox: vec![("c".into(), marked)],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(again, Error::AlreadyProcessed { .. }), "{again:?}");
    let entries = store.outbox_peek(10).await.unwrap();
    let ids: Vec<MessageId> = entries.iter().map(|e| e.envelope.id).collect();
    assert_eq!(ids, vec![old_entry.id, new_entry.id]);
    store.close().await;

    // Connecting again applies nothing more.
    let store = connect(&url, schema).await;
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(applied, vec![1, 2]);
    store.close().await;
}
