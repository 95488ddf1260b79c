//! The in-memory store: the full store contract, nothing on disk (for unit tests).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Notify;

use super::{OutboxEntry, RawRow, Store, Write, WriteBatch};
use crate::envelope::{Envelope, MessageId, Timestamp};
use crate::error::{Error, Result};

#[derive(Default)]
struct Inner {
    rows: BTreeMap<(String, String), (Bytes, u64)>,
    next_version: u64,
    outbox: BTreeMap<u64, (String, Envelope)>,
    next_seq: u64,
    inbox: HashMap<(String, u128), Timestamp>,
}

/// A store that keeps everything in memory.
#[derive(Default, Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
    notify: Arc<Notify>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Checks a batch against current state and applies it; shared by backends that hold
/// their state in maps (and by the embedded store's committer for its checks).
fn apply(inner: &mut Inner, batch: WriteBatch) -> Result<bool> {
    for e in &batch.expect {
        let current = inner
            .rows
            .get(&(e.table.clone(), e.key.clone()))
            .map(|(_, v)| *v);
        if current != e.version {
            return Err(Error::Conflict {
                table: e.table.clone(),
                key: e.key.clone(),
            });
        }
    }
    for (consumer, id) in &batch.inbox {
        if inner.inbox.contains_key(&(consumer.clone(), id.as_u128())) {
            return Err(Error::AlreadyProcessed {
                consumer: consumer.clone(),
                id: id.to_string(),
            });
        }
    }
    for w in batch.writes {
        match w {
            Write::Put { table, key, value } => {
                inner.next_version += 1;
                let v = inner.next_version;
                inner.rows.insert((table, key), (value, v));
            }
            Write::Delete { table, key } => {
                inner.rows.remove(&(table, key));
            }
        }
    }
    let now = Timestamp::now();
    for (consumer, id) in batch.inbox {
        inner.inbox.insert((consumer, id.as_u128()), now);
    }
    let appended = !batch.outbox.is_empty();
    for (topic, env) in batch.outbox {
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner.outbox.insert(seq, (topic, env));
    }
    Ok(appended)
}

#[async_trait]
impl Store for MemoryStore {
    async fn get_raw(&self, table: &str, key: &str) -> Result<Option<RawRow>> {
        Ok(self
            .lock()
            .rows
            .get(&(table.to_string(), key.to_string()))
            .map(|(v, ver)| RawRow {
                key: key.to_string(),
                value: v.clone(),
                version: *ver,
            }))
    }

    async fn scan_raw(&self, table: &str, prefix: &str, limit: usize) -> Result<Vec<RawRow>> {
        let inner = self.lock();
        let start = (table.to_string(), prefix.to_string());
        Ok(inner
            .rows
            .range(start..)
            .take_while(|((t, k), _)| t == table && k.starts_with(prefix))
            .take(limit)
            .map(|((_, k), (v, ver))| RawRow {
                key: k.clone(),
                value: v.clone(),
                version: *ver,
            })
            .collect())
    }

    async fn commit(&self, batch: WriteBatch) -> Result<()> {
        let appended = apply(&mut self.lock(), batch)?;
        if appended {
            self.notify.notify_waiters();
        }
        Ok(())
    }

    async fn inbox_contains(&self, consumer: &str, id: MessageId) -> Result<bool> {
        Ok(self
            .lock()
            .inbox
            .contains_key(&(consumer.to_string(), id.as_u128())))
    }

    async fn expire_inbox(&self, before: Timestamp) -> Result<u64> {
        let mut inner = self.lock();
        let n = inner.inbox.len();
        inner.inbox.retain(|_, t| *t >= before);
        Ok((n - inner.inbox.len()) as u64)
    }

    async fn outbox_peek(&self, limit: usize) -> Result<Vec<OutboxEntry>> {
        Ok(self
            .lock()
            .outbox
            .iter()
            .take(limit)
            .map(|(seq, (topic, env))| OutboxEntry {
                seq: *seq,
                topic: topic.clone(),
                envelope: env.clone(),
            })
            .collect())
    }

    async fn outbox_remove(&self, seqs: &[u64]) -> Result<()> {
        let mut inner = self.lock();
        for s in seqs {
            inner.outbox.remove(s);
        }
        Ok(())
    }

    async fn outbox_len(&self) -> Result<u64> {
        Ok(self.lock().outbox.len() as u64)
    }

    fn outbox_notify(&self) -> Arc<Notify> {
        self.notify.clone()
    }
}
