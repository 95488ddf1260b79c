//! The store cases. Each opens the backend in a fresh directory and asserts one part of
//! the store contract (see `switchyard::store`); none asserts on speed.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use switchyard::store::{
    Expectation, OutboxEntry, RawRow, Store, Table, Txn, Write, WriteBatch, transact,
};
use switchyard::{Envelope, Error, ErrorKind, MessageId, Timestamp};
use switchyard_testkit::{Child, Ledger};

use crate::StoreFactory;
use crate::child::DIR_VAR;
use crate::store_child::{
    COMMITTERS, CRASH_CONSUMER, CRASH_ROWS, CRASH_TOPIC, CrashRow, STORE_FACTORY_VAR,
    STORE_MODE_VAR, crash_envelope, crash_inbox_id, crash_key, crash_outbox_id,
};

/// How long to wait for the outbox notification after a commit that appended.
const NOTIFY_WAIT: Duration = Duration::from_secs(15);
/// "Everything" for scans and peeks in cases that hold far fewer entries.
const ALL: usize = 1_000_000;

pub(crate) async fn dispatch<F: StoreFactory>(f: &F, name: &str, dir: &Path) {
    match name {
        "typed_rows_roundtrip_with_versions" => typed_rows(f, dir).await,
        "commit_is_atomic" => commit_is_atomic(f, dir).await,
        "concurrent_read_modify_write_loses_no_update" => read_modify_write(f, dir).await,
        "blind_writes_are_last_writer_wins" => blind_writes(f, dir).await,
        "inbox_marks_apply_an_effect_once" => inbox_once(f, dir).await,
        "outbox_keeps_commit_order" => outbox_order(f, dir).await,
        "state_survives_reopen" => survive_reopen(f, dir).await,
        "commits_survive_sigkill" => commits_survive_sigkill(f, dir).await,
        other => panic!("no store conformance case `{other}`"),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Item {
    name: String,
    qty: u32,
    tags: Vec<String>,
    note: Option<String>,
}

const ITEMS: Table<Item> = Table::new("items");
const COUNTERS: Table<u64> = Table::new("counters");

fn item(name: &str, qty: u32) -> Item {
    Item {
        name: name.to_string(),
        qty,
        tags: vec!["grüße ✓".to_string(), format!("q{qty}")],
        note: qty.is_multiple_of(2).then(|| format!("even \"{qty}\"\n")),
    }
}

fn encoded<T: Serialize>(value: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(value).unwrap())
}

fn event(i: u64) -> Envelope {
    Envelope::new(
        "store.test.v1",
        "/conformance/store",
        "application/json",
        format!("{{\"i\":{i}}}"),
    )
    .with_subject(format!("s{}", i % 3))
    .with_correlation(format!("flow-{i}"))
    .with_extension("probe", format!("x{i}"))
}

fn open<F: StoreFactory>(f: &F, dir: &Path) -> Arc<F::Store> {
    f.open(dir).expect("open the store")
}

fn as_dyn<S: Store>(store: &Arc<S>) -> Arc<dyn Store> {
    store.clone()
}

/// Closes the store through the factory and drops the last reference to it.
async fn close<F: StoreFactory>(f: &F, store: Arc<F::Store>) {
    f.close(&store).await.expect("close the store");
    assert_eq!(
        Arc::strong_count(&store),
        1,
        "the case should hold the last reference to the store when closing it (a Txn left alive?)"
    );
    drop(store);
}

async fn version<S: Store + ?Sized>(store: &S, table: &str, key: &str) -> u64 {
    store
        .get_raw(table, key)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("row {table}/{key} should exist"))
        .version
}

fn keys(rows: &[(String, Item)]) -> Vec<&str> {
    rows.iter().map(|(k, _)| k.as_str()).collect()
}

/// Commits one typed write (unconditional).
async fn put_one<T: Serialize>(store: &Arc<dyn Store>, table: &Table<T>, key: &str, value: &T) {
    let txn = Txn::new(store.clone());
    txn.put(table, key, value).unwrap();
    txn.commit()
        .await
        .unwrap_or_else(|e| panic!("committing {}/{key}: {e}", table.name()));
}

async fn delete_one<T>(store: &Arc<dyn Store>, table: &Table<T>, key: &str) {
    let txn = Txn::new(store.clone());
    txn.delete(table, key);
    txn.commit()
        .await
        .unwrap_or_else(|e| panic!("deleting {}/{key}: {e}", table.name()));
}

async fn typed_rows<F: StoreFactory>(f: &F, dir: &Path) {
    let store = open(f, dir);
    let s = as_dyn(&store);

    // A transaction sees its own writes; nobody else does before the commit.
    let txn = Txn::new(s.clone());
    for (k, q) in [("a/1", 1), ("a/2", 2), ("a/3", 3), ("b/1", 10)] {
        txn.put(&ITEMS, k, &item(k, q)).unwrap();
    }
    assert_eq!(
        txn.get(&ITEMS, "a/2").await.unwrap(),
        Some(item("a/2", 2)),
        "a transaction reads its own uncommitted write"
    );
    assert!(
        store.get_raw("items", "a/2").await.unwrap().is_none(),
        "an uncommitted write is invisible outside its transaction"
    );
    txn.commit().await.expect("commit four new rows");

    let txn = Txn::new(s.clone());
    for (k, q) in [("a/1", 1), ("a/2", 2), ("a/3", 3), ("b/1", 10)] {
        assert_eq!(
            txn.get(&ITEMS, k).await.unwrap(),
            Some(item(k, q)),
            "row {k} reads back exactly as written (serde round trip)"
        );
    }
    assert_eq!(
        txn.get(&ITEMS, "a/9").await.unwrap(),
        None,
        "a row never written reads as None"
    );
    drop(txn);
    let raw = store.get_raw("items", "a/1").await.unwrap().unwrap();
    assert_eq!(raw.key, "a/1", "get_raw returns the row's key");
    assert_eq!(
        raw.value,
        encoded(&item("a/1", 1)),
        "get_raw returns the encoded row unchanged"
    );

    // Every write changes the version, even one that writes the same value again.
    let v1 = version(&*store, "items", "a/1").await;
    put_one(&s, &ITEMS, "a/1", &item("a/1", 5)).await;
    let v2 = version(&*store, "items", "a/1").await;
    assert_ne!(v1, v2, "a write changes the row's version");
    put_one(&s, &ITEMS, "a/1", &item("a/1", 5)).await;
    let v3 = version(&*store, "items", "a/1").await;
    assert!(
        v3 != v2 && v3 != v1,
        "rewriting the same value changes the version again ({v1}, {v2}, {v3})"
    );

    // Delete, then recreate: the new row must not reuse the old version, or a transaction
    // that read the old row would not see the change.
    let old_a2 = version(&*store, "items", "a/2").await;
    delete_one(&s, &ITEMS, "a/2").await;
    assert!(
        store.get_raw("items", "a/2").await.unwrap().is_none(),
        "a deleted row is gone"
    );
    assert_eq!(
        Txn::new(s.clone()).get(&ITEMS, "a/2").await.unwrap(),
        None,
        "a deleted row reads as None"
    );
    delete_one(&s, &ITEMS, "a/2").await; // deleting an absent row is not an error
    put_one(&s, &ITEMS, "a/2", &item("a/2", 2)).await;
    let new_a2 = version(&*store, "items", "a/2").await;
    assert_ne!(
        old_a2, new_a2,
        "a row recreated after a delete gets a new version"
    );

    // Scans by prefix, in key order, honouring the limit.
    let txn = Txn::new(s.clone());
    for (k, q) in [("a/4", 4), ("a/5", 5), ("a", 100), ("ab/1", 101)] {
        txn.put(&ITEMS, k, &item(k, q)).unwrap();
    }
    txn.commit().await.unwrap();
    let txn = Txn::new(s.clone());
    let a = txn.scan(&ITEMS, "a/", 100).await.unwrap();
    assert_eq!(
        keys(&a),
        ["a/1", "a/2", "a/3", "a/4", "a/5"],
        "scan returns exactly the keys with the prefix, in key order"
    );
    assert_eq!(a[0].1, item("a/1", 5), "scan returns the current value");
    assert_eq!(
        keys(&txn.scan(&ITEMS, "a/", 2).await.unwrap()),
        ["a/1", "a/2"],
        "scan honours its limit, keeping the first keys in order"
    );
    assert!(
        txn.scan(&ITEMS, "a/", 0).await.unwrap().is_empty(),
        "a limit of 0 returns nothing"
    );
    assert_eq!(
        keys(&txn.scan(&ITEMS, "", 100).await.unwrap()),
        ["a", "a/1", "a/2", "a/3", "a/4", "a/5", "ab/1", "b/1"],
        "an empty prefix scans the whole table in key order"
    );
    assert!(
        txn.scan(&ITEMS, "zz", 100).await.unwrap().is_empty(),
        "a prefix nothing has scans empty"
    );
    assert!(
        txn.scan(&Table::<Item>::new("other_table"), "", 100)
            .await
            .unwrap()
            .is_empty(),
        "tables are separate namespaces"
    );
    drop(txn);
    let raw = store.scan_raw("items", "a/", 100).await.unwrap();
    assert_eq!(
        raw.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
        ["a/1", "a/2", "a/3", "a/4", "a/5"],
        "scan_raw: the prefix's keys in key order"
    );
    for r in &raw {
        let got = store.get_raw("items", &r.key).await.unwrap().unwrap();
        assert_eq!(
            (r.version, &r.value),
            (got.version, &got.value),
            "scan_raw and get_raw agree on row {}",
            r.key
        );
    }
    assert_eq!(
        store.scan_raw("items", "a/", 3).await.unwrap().len(),
        3,
        "scan_raw honours its limit"
    );

    // A scan inside a transaction merges that transaction's uncommitted writes.
    let txn = Txn::new(s.clone());
    txn.put(&ITEMS, "a/0", &item("a/0", 7)).unwrap(); // new, sorts first
    txn.delete(&ITEMS, "a/1");
    txn.delete(&ITEMS, "a/2");
    txn.put(&ITEMS, "a/3", &item("a/3", 33)).unwrap(); // overwrite
    txn.put(&ITEMS, "a/9", &item("a/9", 9)).unwrap(); // new, sorts last
    txn.put(&ITEMS, "b/0", &item("b/0", 0)).unwrap(); // other prefix
    let merged = txn.scan(&ITEMS, "a/", 100).await.unwrap();
    assert_eq!(
        keys(&merged),
        ["a/0", "a/3", "a/4", "a/5", "a/9"],
        "scan merges the transaction's own puts and deletes, in key order"
    );
    assert_eq!(
        merged[1].1,
        item("a/3", 33),
        "scan returns the transaction's own uncommitted value"
    );
    assert_eq!(
        keys(&txn.scan(&ITEMS, "a/", 3).await.unwrap()),
        ["a/0", "a/3", "a/4"],
        "a limited scan counts after the merge: rows this transaction deleted do not use up the limit"
    );
    assert_eq!(
        keys(&txn.scan(&ITEMS, "b/", 100).await.unwrap()),
        ["b/0", "b/1"],
        "the merge honours the prefix"
    );
    assert_eq!(
        store.scan_raw("items", "a/", 100).await.unwrap().len(),
        5,
        "the uncommitted writes are still invisible outside the transaction"
    );
    txn.commit().await.expect("commit the merged writes");
    assert_eq!(
        store
            .scan_raw("items", "a/", 100)
            .await
            .unwrap()
            .iter()
            .map(|r| r.key.as_str())
            .collect::<Vec<_>>(),
        ["a/0", "a/3", "a/4", "a/5", "a/9"],
        "after the commit everyone sees the merged state"
    );
    drop(s);
    close(f, store).await;
}

/// Everything a failed commit must leave untouched.
#[derive(Debug, PartialEq)]
struct Snapshot {
    rows: Vec<RawRow>,
    outbox: Vec<OutboxEntry>,
    outbox_len: u64,
    marked: bool,
}

async fn snapshot<S: Store + ?Sized>(store: &S, consumer: &str, id: MessageId) -> Snapshot {
    Snapshot {
        rows: store.scan_raw("items", "", ALL).await.unwrap(),
        outbox: store.outbox_peek(ALL).await.unwrap(),
        outbox_len: store.outbox_len().await.unwrap(),
        marked: store.inbox_contains(consumer, id).await.unwrap(),
    }
}

async fn commit_is_atomic<F: StoreFactory>(f: &F, dir: &Path) {
    let store = open(f, dir);
    let s = as_dyn(&store);
    let txn = Txn::new(s.clone());
    txn.put(&ITEMS, "x", &item("x", 1)).unwrap();
    txn.put(&ITEMS, "y", &item("y", 1)).unwrap();
    txn.commit().await.unwrap();
    let id = MessageId::new();

    // 1. Through a transaction: it read x, someone else changed x, then it commits a
    //    batch of puts, outbox entries and an inbox mark.
    let txn = Txn::new(s.clone());
    assert_eq!(txn.get(&ITEMS, "x").await.unwrap(), Some(item("x", 1)));
    for i in 0..5 {
        txn.put(&ITEMS, &format!("new/{i}"), &item("new", i))
            .unwrap();
    }
    txn.put(&ITEMS, "x", &item("x", 100)).unwrap();
    txn.delete(&ITEMS, "y");
    for i in 0..3 {
        txn.publish_envelope("atomic", event(i));
    }
    txn.mark_processed("atomic/g", id);
    put_one(&s, &ITEMS, "x", &item("x", 2)).await;
    let before = snapshot(&*store, "atomic/g", id).await;
    assert!(before.outbox.is_empty() && !before.marked);
    let err = txn
        .commit()
        .await
        .expect_err("a commit whose read went stale must fail");
    assert_eq!(err.kind(), ErrorKind::Conflict, "stale read: {err}");
    assert_eq!(
        snapshot(&*store, "atomic/g", id).await,
        before,
        "a failed commit writes nothing: no row, no version change, no outbox entry, no inbox mark"
    );

    // 2. A raw batch whose last expectation is stale (so a backend that applied writes
    //    while checking would be caught), with a delete of an existing row in it.
    let stale = version(&*store, "items", "x").await;
    put_one(&s, &ITEMS, "x", &item("x", 3)).await; // `stale` is stale from here on
    let fresh_y = version(&*store, "items", "y").await;
    let batch = |x_version: Option<u64>, absent_version: Option<u64>| WriteBatch {
        expect: vec![
            Expectation {
                table: "items".into(),
                key: "y".into(),
                version: Some(fresh_y),
            },
            Expectation {
                table: "items".into(),
                key: "absent".into(),
                version: absent_version,
            },
            Expectation {
                table: "items".into(),
                key: "x".into(),
                version: x_version,
            },
        ],
        writes: vec![
            Write::Put {
                table: "items".into(),
                key: "new/a".into(),
                value: encoded(&item("new/a", 1)),
            },
            Write::Delete {
                table: "items".into(),
                key: "y".into(),
            },
            Write::Put {
                table: "items".into(),
                key: "new/b".into(),
                value: encoded(&item("new/b", 2)),
            },
        ],
        outbox: vec![
            ("atomic".into(), event(10)),
            ("atomic".into(), event(11)),
            ("atomic.other".into(), event(12)),
        ],
        inbox: vec![("atomic/g".into(), id)],
    };
    let before = snapshot(&*store, "atomic/g", id).await;
    let err = store
        .commit(batch(Some(stale), None))
        .await
        .expect_err("a batch with a stale expectation must fail");
    assert_eq!(err.kind(), ErrorKind::Conflict, "stale expectation: {err}");
    assert!(
        matches!(&err, Error::Conflict { table, key } if table == "items" && key == "x"),
        "the conflict names the changed row: {err}"
    );
    assert_eq!(
        snapshot(&*store, "atomic/g", id).await,
        before,
        "a batch failing its last expectation writes nothing"
    );

    // 3. Expecting a row to be absent when it exists is a conflict too.
    put_one(&s, &ITEMS, "absent", &item("absent", 0)).await;
    let current_x = version(&*store, "items", "x").await;
    let before = snapshot(&*store, "atomic/g", id).await;
    let err = store
        .commit(batch(Some(current_x), None))
        .await
        .expect_err("expecting an existing row to be absent must fail");
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    assert_eq!(
        snapshot(&*store, "atomic/g", id).await,
        before,
        "a batch expecting a present row to be absent writes nothing"
    );

    // 4. The same batch with current expectations applies completely.
    let absent = version(&*store, "items", "absent").await;
    store
        .commit(batch(Some(current_x), Some(absent)))
        .await
        .expect("the batch with current expectations commits");
    assert!(store.get_raw("items", "new/a").await.unwrap().is_some());
    assert!(store.get_raw("items", "new/b").await.unwrap().is_some());
    assert!(
        store.get_raw("items", "y").await.unwrap().is_none(),
        "the delete applied"
    );
    let outbox = store.outbox_peek(ALL).await.unwrap();
    assert_eq!(
        outbox
            .iter()
            .map(|e| (e.topic.as_str(), e.envelope.data.clone()))
            .collect::<Vec<_>>(),
        [
            ("atomic", event(10).data),
            ("atomic", event(11).data),
            ("atomic.other", event(12).data)
        ],
        "all three outbox entries were appended, in order"
    );
    assert!(
        store.inbox_contains("atomic/g", id).await.unwrap(),
        "the inbox mark was made"
    );
    assert!(
        store.get_raw("items", "new/0").await.unwrap().is_none(),
        "nothing of the first failed transaction appeared later"
    );
    drop(s);
    close(f, store).await;
}

async fn read_modify_write<F: StoreFactory>(f: &F, dir: &Path) {
    const TASKS: u64 = 32;
    const INCREMENTS: u64 = 30;
    let store = open(f, dir);
    let s = as_dyn(&store);
    let attempts = Arc::new(AtomicU64::new(0));
    let gave_up = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let s = s.clone();
        let attempts = attempts.clone();
        let gave_up = gave_up.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..INCREMENTS {
                loop {
                    let r = transact(&s, |txn| {
                        let attempts = attempts.clone();
                        async move {
                            attempts.fetch_add(1, Ordering::Relaxed);
                            let n = txn.get(&COUNTERS, "hits").await?.unwrap_or(0);
                            // Let the other tasks read the same version meanwhile.
                            tokio::task::yield_now().await;
                            txn.put(&COUNTERS, "hits", &(n + 1))?;
                            Ok(())
                        }
                    })
                    .await;
                    match r {
                        Ok(()) => break,
                        // `transact` gives up after 16 conflicts in a row, which 32-way
                        // contention can legitimately cause: run it again.
                        Err(e) if e.kind() == ErrorKind::Conflict => {
                            gave_up.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            panic!("an increment failed with something other than a conflict: {e}")
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("an incrementing task panicked");
    }
    let total = Txn::new(s.clone()).get(&COUNTERS, "hits").await.unwrap();
    println!(
        "{} increments took {} transaction attempts ({} transact calls ran out of retries)",
        TASKS * INCREMENTS,
        attempts.load(Ordering::Relaxed),
        gave_up.load(Ordering::Relaxed)
    );
    assert_eq!(
        total,
        Some(TASKS * INCREMENTS),
        "every committed increment of {TASKS} tasks x {INCREMENTS} is counted: no lost update"
    );

    // Directly: two transactions read the same row; the second commit conflicts.
    let t1 = Txn::new(s.clone());
    let t2 = Txn::new(s.clone());
    assert_eq!(t1.get(&COUNTERS, "hits").await.unwrap(), Some(960));
    assert_eq!(t2.get(&COUNTERS, "hits").await.unwrap(), Some(960));
    t1.put(&COUNTERS, "hits", &961).unwrap();
    t2.put(&COUNTERS, "hits", &1000).unwrap();
    t1.commit().await.expect("the first commit wins");
    let err = t2
        .commit()
        .await
        .expect_err("the second of two read-modify-writes of one row must fail");
    assert_eq!(
        err.kind(),
        ErrorKind::Conflict,
        "the loser gets Conflict: {err}"
    );
    assert!(
        matches!(&err, Error::Conflict { table, key } if table == "counters" && key == "hits"),
        "the conflict names the row: {err}"
    );
    assert_eq!(
        Txn::new(s.clone()).get(&COUNTERS, "hits").await.unwrap(),
        Some(961),
        "the losing commit wrote nothing"
    );

    // The same when both read the row as absent (two inserts race).
    let t1 = Txn::new(s.clone());
    let t2 = Txn::new(s.clone());
    assert_eq!(t1.get(&COUNTERS, "fresh").await.unwrap(), None);
    assert_eq!(t2.get(&COUNTERS, "fresh").await.unwrap(), None);
    t1.put(&COUNTERS, "fresh", &1).unwrap();
    t2.put(&COUNTERS, "fresh", &2).unwrap();
    t1.commit().await.expect("the first insert wins");
    let err = t2
        .commit()
        .await
        .expect_err("a commit that read a row as absent must fail once it exists");
    assert_eq!(err.kind(), ErrorKind::Conflict, "insert race: {err}");
    assert_eq!(
        Txn::new(s.clone()).get(&COUNTERS, "fresh").await.unwrap(),
        Some(1)
    );

    // Rows returned by a scan are conflict-checked like rows read by `get`.
    let t1 = Txn::new(s.clone());
    assert_eq!(t1.scan(&COUNTERS, "hi", 10).await.unwrap().len(), 1);
    t1.put(&COUNTERS, "derived", &1).unwrap();
    put_one(&s, &COUNTERS, "hits", &962).await;
    let err = t1
        .commit()
        .await
        .expect_err("a commit must fail when a row its scan returned changed");
    assert_eq!(err.kind(), ErrorKind::Conflict, "scanned row: {err}");
    assert_eq!(
        Txn::new(s.clone()).get(&COUNTERS, "derived").await.unwrap(),
        None,
        "the commit that failed on the scanned row wrote nothing"
    );
    drop(s);
    close(f, store).await;
}

async fn blind_writes<F: StoreFactory>(f: &F, dir: &Path) {
    let store = open(f, dir);
    let s = as_dyn(&store);
    let read = |key: &'static str| {
        let s = s.clone();
        async move { Txn::new(s).get(&ITEMS, key).await.unwrap() }
    };

    // Two writers that did not read: both commit, the later commit's value stays.
    let t1 = Txn::new(s.clone());
    let t2 = Txn::new(s.clone());
    t1.put(&ITEMS, "k", &item("first", 1)).unwrap();
    t2.put(&ITEMS, "k", &item("second", 2)).unwrap();
    t2.commit().await.expect("a blind write commits");
    t1.commit()
        .await
        .expect("a blind write commits even though the row changed since the transaction began");
    assert_eq!(
        read("k").await,
        Some(item("first", 1)),
        "last writer wins: the transaction that committed last decides the value"
    );

    // A blind delete is unconditional too.
    let t = Txn::new(s.clone());
    t.delete(&ITEMS, "k");
    put_one(&s, &ITEMS, "k", &item("third", 3)).await;
    t.commit().await.expect("a blind delete commits");
    assert_eq!(read("k").await, None, "the later blind delete wins");

    // Only rows that were read are checked.
    put_one(&s, &ITEMS, "guard", &item("guard", 0)).await;
    put_one(&s, &ITEMS, "target", &item("target", 0)).await;
    let t = Txn::new(s.clone());
    assert!(t.get(&ITEMS, "guard").await.unwrap().is_some());
    t.put(&ITEMS, "target", &item("mine", 1)).unwrap();
    put_one(&s, &ITEMS, "target", &item("theirs", 2)).await;
    t.commit()
        .await
        .expect("a row written but not read is not conflict-checked");
    assert_eq!(read("target").await, Some(item("mine", 1)));
    let t = Txn::new(s.clone());
    assert!(t.get(&ITEMS, "guard").await.unwrap().is_some());
    t.put(&ITEMS, "target", &item("mine again", 3)).unwrap();
    put_one(&s, &ITEMS, "guard", &item("guard", 1)).await;
    let err = t
        .commit()
        .await
        .expect_err("a row that was read is conflict-checked");
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    assert_eq!(
        read("target").await,
        Some(item("mine", 1)),
        "the conflicting commit did not write its blind part either"
    );

    // Concurrent blind writers all succeed; one of their values is left.
    let mut tasks = Vec::new();
    for i in 0..8u32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            put_one(&s, &ITEMS, "race", &item("racer", i)).await;
        }));
    }
    for t in tasks {
        t.await.expect("every concurrent blind write commits");
    }
    let last = read("race").await.expect("the raced row exists");
    assert!(
        last.name == "racer" && last.qty < 8,
        "the row holds one writer's whole value: {last:?}"
    );
    drop(s);
    close(f, store).await;
}

async fn inbox_once<F: StoreFactory>(f: &F, dir: &Path) {
    let store = open(f, dir);
    let s = as_dyn(&store);
    let id = MessageId::new();
    let never = MessageId::new();

    let apply = |consumer: &'static str, id: MessageId, key: &'static str, qty: u32| {
        let s = s.clone();
        async move {
            let txn = Txn::new(s);
            txn.put(&ITEMS, key, &item(key, qty)).unwrap();
            txn.publish_envelope("effects", event(u64::from(qty)));
            txn.mark_processed(consumer, id);
            txn.commit().await
        }
    };

    apply("payments/g", id, "charge", 1)
        .await
        .expect("the first mark commits");
    assert!(store.inbox_contains("payments/g", id).await.unwrap());
    assert!(
        !store.inbox_contains("payments/g", never).await.unwrap(),
        "an id never marked is not in the inbox"
    );
    assert!(
        !store.inbox_contains("shipping/g", id).await.unwrap(),
        "a mark belongs to its consumer only"
    );

    let before = snapshot(&*store, "payments/g", id).await;
    let err = apply("payments/g", id, "charge", 2)
        .await
        .expect_err("marking the same (consumer, id) again must fail");
    assert_eq!(
        err.kind(),
        ErrorKind::AlreadyProcessed,
        "second mark: {err}"
    );
    assert!(
        err.to_string().contains(&id.to_string()),
        "the error names the message: {err}"
    );
    assert_eq!(
        snapshot(&*store, "payments/g", id).await,
        before,
        "a commit refused by the inbox writes nothing: the effect is applied once"
    );

    apply("shipping/g", id, "shipment", 3)
        .await
        .expect("another consumer marks the same id independently");
    assert!(store.inbox_contains("shipping/g", id).await.unwrap());

    // The same message delivered to several handlers at once: exactly one effect.
    let racing = MessageId::new();
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = s.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let txn = Txn::new(s);
            txn.put(&ITEMS, &format!("effect/{i}"), &item("effect", i))
                .unwrap();
            txn.mark_processed("race/g", racing);
            barrier.wait().await;
            txn.commit().await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => ok += 1,
            Err(e) if e.kind() == ErrorKind::AlreadyProcessed => {}
            Err(e) => {
                panic!("a racing duplicate failed with something other than AlreadyProcessed: {e}")
            }
        }
    }
    assert_eq!(
        ok, 1,
        "of 8 simultaneous commits marking one message, exactly one succeeds"
    );
    assert_eq!(
        store.scan_raw("items", "effect/", ALL).await.unwrap().len(),
        1,
        "exactly one racing commit's effect was written"
    );

    // Expiry forgets marks made before the cut, keeps later ones.
    assert_eq!(
        store
            .expire_inbox(Timestamp::from_unix_micros(0))
            .await
            .unwrap(),
        0,
        "no mark was made before 1970"
    );
    assert!(store.inbox_contains("payments/g", id).await.unwrap());
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cut = Timestamp::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let late = MessageId::new();
    apply("payments/g", late, "late", 4).await.unwrap();
    let expired = store.expire_inbox(cut).await.unwrap();
    assert_eq!(
        expired, 3,
        "expire_inbox returns how many marks it forgot (payments, shipping, race)"
    );
    assert!(!store.inbox_contains("payments/g", id).await.unwrap());
    assert!(!store.inbox_contains("shipping/g", id).await.unwrap());
    assert!(!store.inbox_contains("race/g", racing).await.unwrap());
    assert!(
        store.inbox_contains("payments/g", late).await.unwrap(),
        "a mark made after the cut is kept"
    );
    apply("payments/g", id, "charge", 5)
        .await
        .expect("after expiry the same mark can be made again");
    assert!(store.inbox_contains("payments/g", id).await.unwrap());
    drop(s);
    close(f, store).await;
}

async fn outbox_order<F: StoreFactory>(f: &F, dir: &Path) {
    const TASKS: u64 = 6;
    const COMMITS: u64 = 25;
    let store = open(f, dir);
    let s = as_dyn(&store);
    assert_eq!(
        store.outbox_len().await.unwrap(),
        0,
        "a new store's outbox is empty"
    );

    // Each task commits 1–3 entries at a time, numbered by a per-task sequence.
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            let mut seq = 0u64;
            for c in 0..COMMITS {
                let txn = Txn::new(s.clone());
                for _ in 0..1 + (task + c) % 3 {
                    let env = event(task * 1000 + seq)
                        .with_subject(format!("task-{task}"))
                        .with_extension("taskseq", seq.to_string());
                    let topic = format!("orders.t{task}");
                    txn.publish_envelope(&topic, env.clone());
                    sent.push((topic, env));
                    seq += 1;
                }
                txn.commit().await.expect("an outbox commit");
                tokio::task::yield_now().await;
            }
            sent
        }));
    }
    let mut expected: HashMap<MessageId, (u64, u64, String, Envelope)> = HashMap::new();
    for (task, t) in tasks.into_iter().enumerate() {
        for (seq, (topic, env)) in t.await.unwrap().into_iter().enumerate() {
            expected.insert(env.id, (task as u64, seq as u64, topic, env));
        }
    }
    let total = expected.len();
    assert_eq!(
        store.outbox_len().await.unwrap(),
        total as u64,
        "outbox_len counts every appended entry"
    );
    let all = store.outbox_peek(ALL).await.unwrap();
    assert_eq!(all.len(), total, "outbox_peek returns every entry");
    assert!(
        all.windows(2).all(|w| w[0].seq < w[1].seq),
        "outbox_peek returns entries by increasing seq"
    );
    let mut next_per_task: BTreeMap<u64, u64> = BTreeMap::new();
    for e in &all {
        let (task, seq, topic, env) = expected
            .get(&e.envelope.id)
            .unwrap_or_else(|| panic!("outbox entry with unknown id {}", e.envelope.id));
        assert_eq!(&e.topic, topic, "entry {} keeps its topic", e.envelope.id);
        assert_eq!(
            &e.envelope, env,
            "entry {} comes back exactly as appended (id and every attribute)",
            e.envelope.id
        );
        let next = next_per_task.entry(*task).or_default();
        assert_eq!(
            seq, next,
            "task {task}'s entries come out in commit order (expected its #{next}, got #{seq})"
        );
        *next += 1;
    }
    assert_eq!(
        store.outbox_peek(7).await.unwrap(),
        all[..7],
        "outbox_peek(limit) returns the oldest `limit` entries"
    );

    // Remove exactly the given seqs.
    let removed: Vec<u64> = all
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 == 0 || *i == all.len() - 1)
        .map(|(_, e)| e.seq)
        .collect();
    store.outbox_remove(&removed).await.unwrap();
    let left: Vec<OutboxEntry> = all
        .iter()
        .filter(|e| !removed.contains(&e.seq))
        .cloned()
        .collect();
    assert_eq!(
        store.outbox_len().await.unwrap(),
        left.len() as u64,
        "outbox_len after removing {} entries",
        removed.len()
    );
    assert_eq!(
        store.outbox_peek(ALL).await.unwrap(),
        left,
        "outbox_remove removes exactly the given seqs and keeps the order of the rest"
    );
    store.outbox_remove(&removed).await.expect(
        "removing already removed entries (a relay retrying after a crash) is not an error",
    );
    assert_eq!(
        store.outbox_peek(ALL).await.unwrap(),
        left,
        "and changes nothing"
    );
    let rest: Vec<u64> = left.iter().map(|e| e.seq).collect();
    store.outbox_remove(&rest).await.unwrap();
    assert_eq!(store.outbox_len().await.unwrap(), 0, "everything removed");
    assert!(store.outbox_peek(ALL).await.unwrap().is_empty());

    // A commit that appends wakes the relay; seqs are never reused.
    let notify = store.outbox_notify();
    let notified = notify.notified();
    let txn = Txn::new(s.clone());
    let id = txn.publish_envelope("orders.late", event(9999));
    txn.commit().await.unwrap();
    tokio::time::timeout(NOTIFY_WAIT, notified)
        .await
        .expect("outbox_notify fires after a commit that appends to the outbox");
    let after = store.outbox_peek(ALL).await.unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].envelope.id, id);
    let max_old = all.iter().map(|e| e.seq).max().unwrap();
    assert!(
        after[0].seq > max_old,
        "a new entry's seq ({}) is above every earlier one ({max_old}): seqs are not reused, so a late remove cannot hit a new entry",
        after[0].seq
    );
    drop(s);
    close(f, store).await;
}

async fn survive_reopen<F: StoreFactory>(f: &F, dir: &Path) {
    let marked = MessageId::new();
    let other = MessageId::new();
    let (rows, outbox) = {
        let store = open(f, dir);
        let s = as_dyn(&store);
        let txn = Txn::new(s.clone());
        for i in 0..20u32 {
            txn.put(&ITEMS, &format!("r/{i:02}"), &item("row", i))
                .unwrap();
        }
        for i in 0..4 {
            txn.publish_envelope("reopen", event(i));
        }
        txn.mark_processed("reopen/g", marked);
        txn.commit().await.unwrap();
        put_one(&s, &ITEMS, "r/03", &item("updated", 3)).await;
        delete_one(&s, &ITEMS, "r/04").await;
        let first = store.outbox_peek(1).await.unwrap();
        store.outbox_remove(&[first[0].seq]).await.unwrap();
        let rows = store.scan_raw("items", "", ALL).await.unwrap();
        let outbox = store.outbox_peek(ALL).await.unwrap();
        assert_eq!((rows.len(), outbox.len()), (19, 3));
        drop(s);
        close(f, store).await;
        (rows, outbox)
    };

    let store = open(f, dir);
    let s = as_dyn(&store);
    assert_eq!(
        store.scan_raw("items", "", ALL).await.unwrap(),
        rows,
        "rows survive a reopen with their values and versions"
    );
    assert!(
        store.get_raw("items", "r/04").await.unwrap().is_none(),
        "a deleted row stays deleted"
    );
    assert_eq!(
        Txn::new(s.clone()).get(&ITEMS, "r/03").await.unwrap(),
        Some(item("updated", 3))
    );
    assert_eq!(
        store.outbox_peek(ALL).await.unwrap(),
        outbox,
        "the outbox survives with its seqs, topics and envelopes, in order"
    );
    assert_eq!(store.outbox_len().await.unwrap(), 3);
    assert!(
        store.inbox_contains("reopen/g", marked).await.unwrap(),
        "inbox marks survive a reopen"
    );
    assert!(!store.inbox_contains("reopen/g", other).await.unwrap());
    let txn = Txn::new(s.clone());
    txn.mark_processed("reopen/g", marked);
    txn.put(&ITEMS, "dup", &item("dup", 0)).unwrap();
    let err = txn
        .commit()
        .await
        .expect_err("a mark made before the reopen still refuses a duplicate");
    assert_eq!(err.kind(), ErrorKind::AlreadyProcessed, "{err}");

    // Versions read before the reopen still hold, and new ones do not repeat old ones.
    let r05 = rows.iter().find(|r| r.key == "r/05").unwrap();
    store
        .commit(WriteBatch {
            expect: vec![Expectation {
                table: "items".into(),
                key: "r/05".into(),
                version: Some(r05.version),
            }],
            writes: vec![Write::Put {
                table: "items".into(),
                key: "r/05".into(),
                value: encoded(&item("after", 5)),
            }],
            ..Default::default()
        })
        .await
        .expect("a version read before the reopen is still current after it");
    let new_version = version(&*store, "items", "r/05").await;
    assert!(
        rows.iter().all(|r| r.version != new_version),
        "a write after the reopen gets a version no row had before it ({new_version})"
    );
    let txn = Txn::new(s.clone());
    txn.publish_envelope("reopen", event(99));
    txn.commit().await.unwrap();
    let last = store.outbox_peek(ALL).await.unwrap();
    assert_eq!(last.len(), 4);
    assert!(
        last[3].seq > outbox[2].seq,
        "outbox seqs continue after the reopen"
    );
    drop(s);
    close(f, store).await;
}

fn parse_commit(line: &str) -> Option<(u64, u64)> {
    let at = line.find("COMMIT ")?;
    let mut it = line[at + "COMMIT ".len()..].split(' ');
    let task = it.next()?.trim().parse().ok()?;
    let n = it.next()?.trim().parse().ok()?;
    Some((task, n))
}

async fn commits_survive_sigkill<F: StoreFactory>(f: &F, dir: &Path) {
    const WANT: usize = 1000;
    let mut child = Child::spawn_test_entry(
        "store_conformance_child",
        &[
            (STORE_MODE_VAR, "commit-loop".into()),
            (STORE_FACTORY_VAR, std::any::type_name::<F>().to_string()),
            (DIR_VAR, dir.display().to_string()),
        ],
    )
    .unwrap();
    let mut acked: Vec<(u64, u64)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked.len() < WANT && Instant::now() < deadline {
        let Some(line) = child.next_line(Duration::from_secs(30)) else {
            break;
        };
        acked.extend(parse_commit(&line));
    }
    assert!(
        acked.len() >= WANT,
        "the child acknowledged only {} commits before the kill (wanted {WANT}); it should commit until killed — see its stderr",
        acked.len()
    );
    child.kill().unwrap();
    // Lines already written before the kill are acknowledgements too.
    acked.extend(
        child
            .drain(Duration::from_millis(200))
            .iter()
            .filter_map(|l| parse_commit(l)),
    );

    let store = open(f, dir);
    let s = as_dyn(&store);
    let mut ledger = Ledger::new();
    for (task, n) in &acked {
        ledger.acknowledged(&crash_key(*task, *n), &format!("c{task}"), *n);
    }
    let outbox = store.outbox_peek(ALL).await.unwrap();
    let mut in_outbox: HashMap<(u64, u64), usize> = HashMap::new();
    for e in &outbox {
        let v: serde_json::Value = serde_json::from_slice(&e.envelope.data)
            .unwrap_or_else(|err| panic!("outbox entry {} has a corrupt payload: {err}", e.seq));
        let (task, n) = (v["task"].as_u64().unwrap(), v["n"].as_u64().unwrap());
        let sent = crash_envelope(task, n);
        assert_eq!(
            (&e.envelope.id, &e.envelope.subject, &e.envelope.data),
            (&crash_outbox_id(task, n), &sent.subject, &sent.data),
            "outbox entry {} keeps its id, subject and payload",
            e.seq
        );
        assert_eq!(e.topic, CRASH_TOPIC);
        ledger.observed(&crash_key(task, n), &format!("c{task}"), n);
        *in_outbox.entry((task, n)).or_default() += 1;
    }
    let rows: HashMap<(u64, u64), CrashRow> = Txn::new(s.clone())
        .scan(&CRASH_ROWS, "c", ALL)
        .await
        .unwrap()
        .into_iter()
        .map(|(k, r)| {
            assert_eq!(k, crash_key(r.task, r.n), "row {k} holds its own value");
            ((r.task, r.n), r)
        })
        .collect();

    // Every acknowledged commit is complete.
    let mut missing_rows = Vec::new();
    let mut missing_marks = Vec::new();
    for (task, n) in &acked {
        if !rows.contains_key(&(*task, *n)) {
            missing_rows.push(crash_key(*task, *n));
        }
        if !store
            .inbox_contains(CRASH_CONSUMER, crash_inbox_id(*task, *n))
            .await
            .unwrap()
        {
            missing_marks.push(crash_key(*task, *n));
        }
    }
    // Every commit, acknowledged or caught in flight, is all there or not there at all.
    let mut half_applied = Vec::new();
    for task in 0..COMMITTERS {
        let highest = acked
            .iter()
            .chain(rows.keys())
            .chain(in_outbox.keys())
            .filter(|(t, _)| *t == task)
            .map(|(_, n)| *n)
            .max()
            .unwrap_or(0);
        for n in 1..=highest + 2 {
            let parts = (
                rows.contains_key(&(task, n)),
                in_outbox.contains_key(&(task, n)),
                store
                    .inbox_contains(CRASH_CONSUMER, crash_inbox_id(task, n))
                    .await
                    .unwrap(),
            );
            if parts.0 != parts.1 || parts.1 != parts.2 {
                half_applied.push(format!(
                    "{} (row {}, outbox {}, inbox {})",
                    crash_key(task, n),
                    parts.0,
                    parts.1,
                    parts.2
                ));
            }
        }
    }
    let v = ledger.verdict();
    println!(
        "after SIGKILL: {} commits acknowledged; {} rows, {} outbox entries ({} distinct) stored; lost {}, duplicated {}, out of order {}, half-applied {}",
        v.acknowledged,
        rows.len(),
        outbox.len(),
        v.observed,
        v.lost.len(),
        v.duplicated.len(),
        v.out_of_order.len(),
        half_applied.len()
    );
    let first = |v: &[String]| v[..v.len().min(10)].to_vec();
    assert!(
        missing_rows.is_empty(),
        "acknowledged commits whose row is missing: {:?}",
        first(&missing_rows)
    );
    assert!(
        v.lost.is_empty(),
        "acknowledged commits whose outbox entry is missing: {:?}",
        first(&v.lost)
    );
    assert!(
        missing_marks.is_empty(),
        "acknowledged commits whose inbox mark is missing: {:?}",
        first(&missing_marks)
    );
    assert!(
        half_applied.is_empty(),
        "commits applied in part (a commit is all or nothing, even across a crash): {:?}",
        &half_applied[..half_applied.len().min(10)]
    );
    assert!(
        v.duplicated.is_empty(),
        "outbox entries stored twice: {:?}",
        first(&v.duplicated)
    );
    assert!(
        v.out_of_order.is_empty(),
        "outbox entries out of commit order within a committer: {:?}",
        first(&v.out_of_order)
    );

    // The recovered store keeps working: marks refuse duplicates, seqs continue.
    let (task, n) = acked[0];
    let txn = Txn::new(s.clone());
    txn.mark_processed(CRASH_CONSUMER, crash_inbox_id(task, n));
    txn.put(&CRASH_ROWS, "again", &CrashRow { task, n })
        .unwrap();
    let err = txn
        .commit()
        .await
        .expect_err("an inbox mark recovered after the crash refuses a duplicate");
    assert_eq!(err.kind(), ErrorKind::AlreadyProcessed, "{err}");
    let txn = Txn::new(s.clone());
    let id = txn.publish_envelope(CRASH_TOPIC, crash_envelope(999, 1));
    txn.commit().await.expect("the recovered store commits");
    let tail = store.outbox_peek(ALL).await.unwrap();
    let last = tail.last().unwrap();
    assert_eq!(
        last.envelope.id, id,
        "a new entry goes to the end of the outbox"
    );
    assert!(
        outbox.iter().all(|e| e.seq < last.seq),
        "a new entry's seq is above every recovered one"
    );
    drop(s);
    close(f, store).await;
}
