//! Typed tables and the optimistic transaction over a [`Store`].

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Expectation, RawRow, Store, Write, WriteBatch};
use crate::codec::{self, Event};
use crate::envelope::{Envelope, MessageId};
use crate::error::{Error, Result};

/// A typed table: a name and the row type stored in it (as JSON).
///
/// ```
/// use switchyard::store::Table;
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Stock { sku: String, available: u32 }
/// const STOCK: Table<Stock> = Table::new("stock");
/// assert_eq!(STOCK.name(), "stock");
/// ```
pub struct Table<T> {
    name: &'static str,
    _row: PhantomData<fn() -> T>,
}

impl<T> Table<T> {
    /// A table named `name` (ASCII, no NUL).
    pub const fn new(name: &'static str) -> Self {
        Table {
            name,
            _row: PhantomData,
        }
    }

    /// The table's name.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

impl<T> Clone for Table<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Table<T> {}

impl<T> fmt::Debug for Table<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Table({})", self.name)
    }
}

/// A row with its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    /// The row.
    pub value: T,
    /// Its version (changes on every write).
    pub version: u64,
}

type Key = (String, String);

#[derive(Default)]
struct State {
    reads: BTreeMap<Key, Option<u64>>,
    local: BTreeMap<Key, Option<Bytes>>,
    batch: WriteBatch,
    finished: bool,
}

/// A transaction: reads see committed state plus this transaction's own writes; writes,
/// outbox messages and inbox marks are buffered and applied by one atomic [`Txn::commit`].
///
/// Cheap to clone (clones share one transaction), so a handler can own it across awaits.
#[derive(Clone)]
pub struct Txn {
    store: Arc<dyn Store>,
    state: Arc<Mutex<State>>,
}

impl fmt::Debug for Txn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.lock();
        f.debug_struct("Txn")
            .field("reads", &s.reads.len())
            .field("writes", &s.batch.writes.len())
            .field("outbox", &s.batch.outbox.len())
            .finish()
    }
}

fn json_err(table: &str, key: &str, e: serde_json::Error) -> Error {
    Error::storage(format!("decoding row {table}/{key}"), e)
}

impl Txn {
    /// A new transaction on `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Txn {
            store,
            state: Arc::new(Mutex::new(State::default())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn read_raw(&self, table: &str, key: &str) -> Result<Option<Bytes>> {
        let k = (table.to_string(), key.to_string());
        if let Some(local) = self.lock().local.get(&k) {
            return Ok(local.clone());
        }
        let row = self.store.get_raw(table, key).await?;
        let mut s = self.lock();
        s.reads.entry(k).or_insert(row.as_ref().map(|r| r.version));
        Ok(row.map(|r| r.value))
    }

    /// Reads a row (recording its version for the commit's conflict check).
    pub async fn get<T: DeserializeOwned>(&self, table: &Table<T>, key: &str) -> Result<Option<T>> {
        match self.read_raw(table.name, key).await? {
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| json_err(table.name, key, e)),
            None => Ok(None),
        }
    }

    /// Rows whose key starts with `prefix`, in key order, at most `limit` (committed rows
    /// merged with this transaction's writes; each returned row is conflict-checked).
    pub async fn scan<T: DeserializeOwned>(
        &self,
        table: &Table<T>,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, T)>> {
        // Rows this transaction deleted may be among the first `limit` committed ones:
        // read that many more, so the merged result still holds the first `limit` keys.
        let deleted = self
            .lock()
            .local
            .iter()
            .filter(|((t, k), v)| t == table.name && k.starts_with(prefix) && v.is_none())
            .count();
        let committed = self
            .store
            .scan_raw(table.name, prefix, limit.saturating_add(deleted))
            .await?;
        let mut merged: BTreeMap<String, Bytes> = BTreeMap::new();
        {
            let mut s = self.lock();
            for RawRow {
                key,
                value,
                version,
            } in committed
            {
                s.reads
                    .entry((table.name.to_string(), key.clone()))
                    .or_insert(Some(version));
                merged.insert(key, value);
            }
            for ((t, k), v) in &s.local {
                if t == table.name && k.starts_with(prefix) {
                    match v {
                        Some(b) => {
                            merged.insert(k.clone(), b.clone());
                        }
                        None => {
                            merged.remove(k);
                        }
                    }
                }
            }
        }
        merged
            .into_iter()
            .take(limit)
            .map(|(k, b)| {
                serde_json::from_slice(&b)
                    .map(|v| (k.clone(), v))
                    .map_err(|e| json_err(table.name, &k, e))
            })
            .collect()
    }

    /// Writes a row.
    pub fn put<T: Serialize>(&self, table: &Table<T>, key: &str, value: &T) -> Result<()> {
        let bytes = Bytes::from(
            serde_json::to_vec(value)
                .map_err(|e| Error::storage(format!("encoding row {}/{key}", table.name), e))?,
        );
        let mut s = self.lock();
        s.local.insert(
            (table.name.to_string(), key.to_string()),
            Some(bytes.clone()),
        );
        s.batch.writes.push(Write::Put {
            table: table.name.to_string(),
            key: key.to_string(),
            value: bytes,
        });
        Ok(())
    }

    /// Deletes a row.
    pub fn delete<T>(&self, table: &Table<T>, key: &str) {
        let mut s = self.lock();
        s.local
            .insert((table.name.to_string(), key.to_string()), None);
        s.batch.writes.push(Write::Delete {
            table: table.name.to_string(),
            key: key.to_string(),
        });
    }

    /// Appends a message to the outbox: it is published (with this id) after the commit,
    /// and only if the commit succeeds.
    pub fn publish_envelope(&self, topic: &str, envelope: Envelope) -> MessageId {
        let id = envelope.id;
        self.lock().batch.outbox.push((topic.to_string(), envelope));
        id
    }

    /// Encodes a typed event and appends it to the outbox.
    pub fn publish<E: Event>(&self, topic: &str, event: &E, source: &str) -> Result<MessageId> {
        let env =
            codec::encode(event, source).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        Ok(self.publish_envelope(topic, env))
    }

    /// Marks message `id` as processed by `consumer` in this commit (the inbox).
    pub fn mark_processed(&self, consumer: &str, id: MessageId) {
        self.lock().batch.inbox.push((consumer.to_string(), id));
    }

    /// True when the transaction changed something (rows or outbox); a handler that only
    /// read commits nothing, and needs no inbox mark.
    pub fn has_effects(&self) -> bool {
        let s = self.lock();
        !s.batch.writes.is_empty() || !s.batch.outbox.is_empty()
    }

    /// Messages appended to the outbox so far.
    pub fn outbox_len(&self) -> usize {
        self.lock().batch.outbox.len()
    }

    /// The batch this transaction would commit (reads become expectations). Ends the
    /// transaction: later calls see an empty batch.
    pub fn take_batch(&self) -> WriteBatch {
        let mut s = self.lock();
        s.finished = true;
        let mut batch = std::mem::take(&mut s.batch);
        batch.expect = std::mem::take(&mut s.reads)
            .into_iter()
            .map(|((table, key), version)| Expectation {
                table,
                key,
                version,
            })
            .collect();
        s.local.clear();
        batch
    }

    /// Commits atomically: fails with `Conflict` if a row read here changed meanwhile,
    /// or `AlreadyProcessed` if an inbox mark exists; then nothing is written.
    pub async fn commit(self) -> Result<()> {
        let batch = self.take_batch();
        if batch.is_empty() {
            return Ok(());
        }
        self.store.commit(batch).await
    }
}

/// Runs `f` in a fresh transaction and commits it, retrying from scratch on `Conflict`
/// (up to 16 times).
pub async fn transact<F, Fut, R>(store: &Arc<dyn Store>, f: F) -> Result<R>
where
    F: Fn(Txn) -> Fut,
    Fut: std::future::Future<Output = Result<R>>,
{
    let mut attempt = 0;
    loop {
        let txn = Txn::new(store.clone());
        let out = f(txn.clone()).await?;
        match txn.commit().await {
            Ok(()) => return Ok(out),
            Err(Error::Conflict { .. }) if attempt < 16 => {
                attempt += 1;
                tokio::task::yield_now().await;
            }
            Err(e) => return Err(e),
        }
    }
}
