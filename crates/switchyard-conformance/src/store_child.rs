//! The child side of the store crash case: the test binary re-run with an environment
//! variable naming what to do, so the parent can SIGKILL it at any moment.
//!
//! What the child commits is a pure function of `(task, n)` (row key, outbox id and
//! payload, inbox id), so the parent can check every commit after the crash knowing only
//! the `COMMIT <task> <n>` lines it read.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use switchyard::store::{Store, Table, Txn};
use switchyard::{Envelope, MessageId};
use uuid::Uuid;

use crate::StoreFactory;
use crate::child::DIR_VAR;

/// The child's mode (its own variable, so a bus child entry in the same binary ignores it).
pub(crate) const STORE_MODE_VAR: &str = "SWITCHYARD_STORE_CONFORMANCE_CHILD";
/// The factory type the child must use: when one test binary runs the store suite for
/// several backends, every `store_conformance_child` test matches the name filter, and
/// only the one of the parent's factory acts.
pub(crate) const STORE_FACTORY_VAR: &str = "SWITCHYARD_STORE_CONFORMANCE_FACTORY";

/// Concurrent committers in the crash case.
pub(crate) const COMMITTERS: u64 = 16;

/// A row the crash case commits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CrashRow {
    pub(crate) task: u64,
    pub(crate) n: u64,
}

pub(crate) const CRASH_ROWS: Table<CrashRow> = Table::new("crash_rows");
pub(crate) const CRASH_TOPIC: &str = "crash.events";
pub(crate) const CRASH_CONSUMER: &str = "crash/consumer";

/// The row key of commit `n` of `task`.
pub(crate) fn crash_key(task: u64, n: u64) -> String {
    format!("c{task}-{n}")
}

fn crash_id(kind: u8, task: u64, n: u64) -> MessageId {
    MessageId(Uuid::from_u128(
        (u128::from(kind) << 120) | (u128::from(task) << 64) | u128::from(n),
    ))
}

/// The id of the outbox entry of commit `n` of `task`.
pub(crate) fn crash_outbox_id(task: u64, n: u64) -> MessageId {
    crash_id(0x0b, task, n)
}

/// The id commit `n` of `task` marks in the inbox.
pub(crate) fn crash_inbox_id(task: u64, n: u64) -> MessageId {
    crash_id(0x1b, task, n)
}

/// The outbox entry of commit `n` of `task`.
pub(crate) fn crash_envelope(task: u64, n: u64) -> Envelope {
    Envelope::new(
        "crash.committed.v1",
        "/conformance/store",
        "application/json",
        format!("{{\"task\":{task},\"n\":{n}}}"),
    )
    .with_subject(format!("c{task}"))
    .with_id(crash_outbox_id(task, n))
}

/// Entry point of the `store_conformance_child` test: does nothing unless the parent set
/// the mode variable (and named this factory), otherwise runs that mode and exits the
/// process.
pub fn store_child_entry<F: StoreFactory>(factory: &F) {
    let Ok(mode) = std::env::var(STORE_MODE_VAR) else {
        return;
    };
    if std::env::var(STORE_FACTORY_VAR).ok().as_deref() != Some(std::any::type_name::<F>()) {
        return;
    }
    // The harness printed a status line without a newline; start markers on a fresh line.
    println!();
    let dir = PathBuf::from(std::env::var(DIR_VAR).expect("child needs a directory"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = factory.open(&dir).expect("the child opens the store");
        match mode.as_str() {
            "commit-loop" => commit_loop(store).await,
            other => panic!("unknown store child mode {other}"),
        }
    });
    std::process::exit(0);
}

/// `COMMITTERS` tasks, each committing `(row, outbox entry, inbox mark)` for n = 1, 2, …
/// and printing `COMMIT <task> <n>` after each `Ok`, until the parent kills the process.
async fn commit_loop<S: Store>(store: Arc<S>) {
    let store: Arc<dyn Store> = store;
    let mut tasks = Vec::new();
    for task in 0..COMMITTERS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for n in 1.. {
                let txn = Txn::new(store.clone());
                txn.put(&CRASH_ROWS, &crash_key(task, n), &CrashRow { task, n })
                    .unwrap();
                txn.publish_envelope(CRASH_TOPIC, crash_envelope(task, n));
                txn.mark_processed(CRASH_CONSUMER, crash_inbox_id(task, n));
                if let Err(e) = txn.commit().await {
                    panic!("commit {n} of task {task} failed: {e}");
                }
                println!("COMMIT {task} {n}");
            }
        }));
    }
    // The committers run until the parent kills this process.
    for t in tasks {
        if let Err(e) = t.await {
            panic!("committer task failed: {e}");
        }
    }
}
