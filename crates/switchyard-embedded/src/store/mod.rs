//! The durable embedded service store: the [`Store`] contract over fjall, an LSM-tree
//! key-value engine (see `docs/decisions/0002-embedded-store-engine.md` for the choice).
//!
//! ```no_run
//! use std::sync::Arc;
//! use switchyard::store::{Store, Table, transact};
//! use switchyard_embedded::{EmbeddedStore, StoreConfig};
//!
//! const COUNTERS: Table<u64> = Table::new("counters");
//!
//! # #[tokio::main] async fn main() -> switchyard::Result<()> {
//! let store = EmbeddedStore::open("./data/billing", StoreConfig::default())?;
//! let db: Arc<dyn Store> = Arc::new(store.clone());
//! transact(&db, |txn| async move {
//!     let n = txn.get(&COUNTERS, "invoices").await?.unwrap_or(0);
//!     txn.put(&COUNTERS, "invoices", &(n + 1))
//! })
//! .await?;
//! store.close().await?;
//! # Ok(()) }
//! ```
//!
//! # How a commit works
//!
//! One committer thread does every write. [`Store::commit`] hands the batch to it and
//! waits. The committer takes everything that queued meanwhile (up to
//! [`StoreConfig::max_group`]), checks each batch in arrival order — the version of every
//! row it read, and that none of its inbox ids is marked — against the committed state
//! plus the batches before it in the same group, and writes all batches that passed as
//! one atomic fjall write batch with one journal sync. A batch that fails its check gets
//! [`Error::Conflict`] or [`Error::AlreadyProcessed`] and writes nothing. Everyone is
//! answered after the write. Reads go straight to fjall from the calling thread.
//!
//! Row versions come from one store-wide counter (+1 per put), so a version is never
//! reused, not even across restarts.
//!
//! A commit whose caller stops waiting (a dropped future) still completes or fails on
//! its own: it was already handed to the committer.
//!
//! # Durability
//!
//! fjall writes every batch to its journal (a write-ahead log) before applying it; on
//! open it replays the journal and cuts a torn tail back to the last whole batch, so a
//! group commit is all or nothing after any crash.
//!
//! | mode | `commit` returns when | a power loss can lose |
//! | --- | --- | --- |
//! | [`Durability::Fsync`] (default) | the group's batch is in the journal and `fdatasync`ed (one sync shared by every commit of the group) | nothing that was acknowledged |
//! | [`Durability::Buffered`] | the batch is written to the OS page cache; a timer syncs the journal every `interval` | up to `interval` of acknowledged commits (a process crash loses nothing) |
//!
//! Outbox removals and inbox expiry go through the committer as well, with the same
//! durability. [`EmbeddedStore::close`] writes what is queued and syncs.
//!
//! A failed journal write or sync fails every commit of its group with
//! [`Error::Storage`], and fjall then refuses all further writes until the store is
//! reopened (it cannot know what reached the disk); reopening replays the journal.
//!
//! # On disk
//!
//! ```text
//! <dir>/LOCK    held while a store has the directory open
//! <dir>/db/     the fjall database (journal, one LSM tree per keyspace)
//! ```
//!
//! | keyspace | key | value |
//! | --- | --- | --- |
//! | `rows` | table, `0x00`, row key | version (u64 LE), then the row's JSON |
//! | `outbox` | seq (u64 BE, so keys sort in commit order) | topic length (u32 LE), topic, envelope ([`Envelope::to_bytes`]) |
//! | `inbox` | consumer, `0x00`, message id (16 bytes BE) | when it was marked (µs since the epoch, u64 LE) |
//! | `meta` | `next_version`, `next_seq` | u64 LE; written by every group that advances them |
//!
//! Table and consumer names must not contain NUL (the separator); such names are
//! refused with [`Error::InvalidArgument`].

mod committer;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, mpsc};
use std::thread::JoinHandle;

use async_trait::async_trait;
use bytes::{BufMut, Bytes};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, Readable};
use switchyard::envelope::{Envelope, MessageId, Timestamp};
use switchyard::store::{OutboxEntry, RawRow, Store, Write, WriteBatch};
use switchyard::{Error, Result};
use tokio::sync::{Notify, oneshot};

use crate::Durability;
use committer::{Committer, Request};

/// Settings of an embedded store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// When a commit counts as durable (see the [module docs](self#durability)).
    pub durability: Durability,
    /// Most commits written as one group (one fjall batch, one sync); bounds the latency
    /// one group adds to the commits queued behind it.
    pub max_group: usize,
    /// Largest in-memory write buffer (memtable) of each of the store's four keyspaces
    /// before it is flushed to disk: the main part of the store's memory. 16 MiB by
    /// default (fjall's own default, 64 MiB, made 100,000 sagas in flight cost ~120 MB
    /// more with no gain in commit throughput; see docs/decisions/0007).
    pub max_memtable_bytes: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            durability: Durability::Fsync,
            max_group: 1024,
            max_memtable_bytes: 16 * 1024 * 1024,
        }
    }
}

/// Counters of the committer, for benchmarks and metrics.
#[derive(Debug, Default)]
pub struct CommitStats {
    /// Commits applied.
    pub commits: AtomicU64,
    /// Groups of commits written to fjall (each one journal write and, in `Fsync` mode,
    /// one sync). Outbox removals and inbox expiries are written without a sync of their
    /// own and not counted.
    pub groups: AtomicU64,
    /// Commits refused with [`Error::Conflict`].
    pub conflicts: AtomicU64,
    /// Commits refused with [`Error::AlreadyProcessed`].
    pub already_processed: AtomicU64,
}

impl CommitStats {
    /// Average applied commits per write batch so far.
    pub fn commits_per_group(&self) -> f64 {
        let g = self.groups.load(Ordering::Relaxed);
        if g == 0 {
            return 0.0;
        }
        self.commits.load(Ordering::Relaxed) as f64 / g as f64
    }
}

/// The fjall database and its keyspaces (cheap to clone: handles).
#[derive(Clone)]
struct Keyspaces {
    db: Database,
    rows: Keyspace,
    outbox: Keyspace,
    inbox: Keyspace,
    meta: Keyspace,
}

/// What exists while the store is open.
struct Engine {
    ks: Keyspaces,
    tx: mpsc::Sender<Request>,
}

struct Inner {
    dir: PathBuf,
    /// `None` once closed. Readers hold the read lock only for the duration of a read,
    /// so `close` (the write lock) knows no read still uses the database.
    engine: RwLock<Option<Engine>>,
    committer: Mutex<Option<JoinHandle<()>>>,
    outbox_len: Arc<AtomicU64>,
    /// No outbox entry below this seq exists (a hint that lets `outbox_peek` skip the
    /// deleted head of the queue instead of scanning its tombstones).
    outbox_head: AtomicU64,
    notify: Arc<Notify>,
    stats: Arc<CommitStats>,
    /// One `expire_inbox` at a time, so two never count the same mark.
    expire: tokio::sync::Mutex<()>,
    closed: AtomicBool,
    lock_file: File,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Disconnect the committer and wait for it, so the database is closed before
        // the directory lock is released (when `lock_file` drops after this).
        let engine = self
            .engine
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(engine);
        let handle = self
            .committer
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

/// The durable embedded store. Cheap to clone; clones share one store.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("dir", &self.inner.dir)
            .field("outbox_len", &self.inner.outbox_len.load(Ordering::Relaxed))
            .finish()
    }
}

/// Longest fjall key.
const MAX_KEY: usize = u16::MAX as usize;
/// Inbox marks deleted per write batch by `expire_inbox` (keeps each batch short, so
/// commits queued behind it wait little).
const EXPIRE_CHUNK: usize = 4096;
const META_NEXT_VERSION: &str = "next_version";
const META_NEXT_SEQ: &str = "next_seq";

impl EmbeddedStore {
    /// Opens (or creates) a store in `dir`: takes `<dir>/LOCK`, opens (recovering) the
    /// fjall database in `<dir>/db` and starts the committer thread. Fails with
    /// [`Error::Locked`] when another store has the directory.
    pub fn open(dir: impl AsRef<Path>, config: StoreConfig) -> Result<Self> {
        let dir = dir.as_ref();
        let lock_file = crate::group_commit::lock_dir(dir)?;
        let db_path = dir.join("db");
        let db = Database::builder(&db_path).open().map_err(|e| match e {
            fjall::Error::Locked => Error::Locked {
                path: dir.to_path_buf(),
            },
            e => Error::storage(
                format!("opening the store database {}", db_path.display()),
                e,
            ),
        })?;
        let max_memtable_bytes = config.max_memtable_bytes.max(1024 * 1024);
        let keyspace = |name: &str| {
            db.keyspace(name, || {
                KeyspaceCreateOptions::default().max_memtable_size(max_memtable_bytes)
            })
            .map_err(|e| Error::storage(format!("opening keyspace `{name}`"), e))
        };
        let ks = Keyspaces {
            rows: keyspace("rows")?,
            outbox: keyspace("outbox")?,
            inbox: keyspace("inbox")?,
            meta: keyspace("meta")?,
            db: db.clone(),
        };
        let next_version = read_meta(&ks.meta, META_NEXT_VERSION)?.unwrap_or(0);
        let (first_seq, last_seq) = outbox_bounds(&ks.outbox)?;
        let next_seq = read_meta(&ks.meta, META_NEXT_SEQ)?
            .unwrap_or(0)
            .max(last_seq.map_or(0, |s| s + 1));
        let count = ks
            .outbox
            .len()
            .map_err(|e| Error::storage("counting the outbox", e))? as u64;

        let outbox_len = Arc::new(AtomicU64::new(count));
        let notify = Arc::new(Notify::new());
        let stats = Arc::new(CommitStats::default());
        let committer = Committer {
            ks: ks.clone(),
            next_version,
            next_seq,
            outbox_len: outbox_len.clone(),
            notify: notify.clone(),
            stats: stats.clone(),
            sync_each: config.durability == Durability::Fsync,
            unsynced: false,
        };
        let (tx, rx) = mpsc::channel();
        let (durability, max_group) = (config.durability, config.max_group);
        let handle = std::thread::Builder::new()
            .name("switchyard-store".into())
            .spawn(move || committer::run(rx, committer, durability, max_group))
            .map_err(|e| Error::storage("starting the store committer thread", e))?;
        Ok(EmbeddedStore {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                engine: RwLock::new(Some(Engine { ks, tx })),
                committer: Mutex::new(Some(handle)),
                outbox_len,
                outbox_head: AtomicU64::new(first_seq.unwrap_or(next_seq)),
                notify,
                stats,
                expire: tokio::sync::Mutex::new(()),
                closed: AtomicBool::new(false),
                lock_file,
            }),
        })
    }

    /// Writes and syncs every commit already queued, stops the committer, closes the
    /// database and releases the directory lock. Later calls fail with [`Error::Closed`];
    /// closing twice is a no-op.
    pub async fn close(&self) -> Result<()> {
        let engine = self
            .inner
            .engine
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(engine) = engine else {
            return Ok(());
        };
        self.inner.closed.store(true, Ordering::Release);
        let (done, wait) = oneshot::channel();
        let result = match engine.tx.send(Request::Shutdown(done)) {
            Ok(()) => wait.await.unwrap_or_else(|_| {
                Err(Error::storage(
                    "closing the store",
                    "the committer thread stopped unexpectedly",
                ))
            }),
            Err(_) => Ok(()),
        };
        let handle = self
            .inner
            .committer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        // Joining and closing the database block (fjall waits for its background
        // threads), so do it off the async workers.
        tokio::task::spawn_blocking(move || {
            drop(engine);
            if let Some(h) = handle {
                let _ = h.join();
            }
        })
        .await
        .map_err(|e| Error::storage("stopping the store committer", e))?;
        let _ = self.inner.lock_file.unlock();
        result
    }

    /// The committer's counters (commits, groups, conflicts).
    pub fn stats(&self) -> &CommitStats {
        &self.inner.stats
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Runs `f` on the open engine (under the read lock, so `close` waits for it).
    fn with_engine<R>(&self, f: impl FnOnce(&Engine) -> Result<R>) -> Result<R> {
        let guard = self.inner.engine.read().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            Some(engine) => f(engine),
            None => Err(Error::Closed),
        }
    }

    fn send(&self, req: Request) -> Result<()> {
        self.with_engine(|e| e.tx.send(req).map_err(|_| Error::Closed))
    }

    /// Hands `batch` to the committer; the receiver gets the outcome once it is durable.
    fn submit(&self, batch: WriteBatch) -> Result<oneshot::Receiver<Result<()>>> {
        validate(&batch)?;
        let (reply, rx) = oneshot::channel();
        self.send(Request::Commit { batch, reply })?;
        Ok(rx)
    }

    /// Inbox keys marked before `before` (a scan of the whole inbox).
    fn expired_inbox_keys(&self, before: Timestamp) -> Result<Vec<Vec<u8>>> {
        self.with_engine(|e| {
            let snapshot = e.ks.db.snapshot();
            let mut keys = Vec::new();
            for item in snapshot.iter(&e.ks.inbox) {
                let (key, value) = item
                    .into_inner()
                    .map_err(|e| Error::storage("scanning the inbox", e))?;
                let marked = value
                    .get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_le_bytes)
                    .ok_or_else(|| {
                        Error::storage("scanning the inbox", "an inbox mark has no timestamp")
                    })?;
                if marked < before.unix_micros() {
                    keys.push(key.to_vec());
                }
            }
            Ok(keys)
        })
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get_raw(&self, table: &str, key: &str) -> Result<Option<RawRow>> {
        check_name("table", table)?;
        let k = row_key(table, key);
        if k.len() > MAX_KEY {
            return Ok(None);
        }
        self.with_engine(|e| {
            let value =
                e.ks.rows
                    .get(&k)
                    .map_err(|e| Error::storage(format!("reading row {table}/{key}"), e))?;
            value
                .map(|v| decode_row(key.to_string(), &v, table))
                .transpose()
        })
    }

    async fn scan_raw(&self, table: &str, prefix: &str, limit: usize) -> Result<Vec<RawRow>> {
        check_name("table", table)?;
        let p = row_key(table, prefix);
        if p.len() > MAX_KEY || limit == 0 {
            return Ok(Vec::new());
        }
        self.with_engine(|e| {
            // A snapshot: the rows of whole groups, never half of one.
            let snapshot = e.ks.db.snapshot();
            let mut out = Vec::new();
            for item in snapshot.prefix(&e.ks.rows, &p).take(limit) {
                let (k, v) = item
                    .into_inner()
                    .map_err(|e| Error::storage(format!("scanning table `{table}`"), e))?;
                let key = std::str::from_utf8(&k[table.len() + 1..]).map_err(|e| {
                    Error::storage(format!("scanning table `{table}`: a row key"), e)
                })?;
                out.push(decode_row(key.to_string(), &v, table)?);
            }
            Ok(out)
        })
    }

    async fn commit(&self, batch: WriteBatch) -> Result<()> {
        if batch.is_empty() && batch.expect.is_empty() {
            return Ok(());
        }
        self.submit(batch)?.await.map_err(|_| Error::Closed)?
    }

    async fn inbox_contains(&self, consumer: &str, id: MessageId) -> Result<bool> {
        check_name("consumer", consumer)?;
        let k = inbox_key(consumer, id);
        if k.len() > MAX_KEY {
            return Ok(false);
        }
        self.with_engine(|e| {
            e.ks.inbox
                .contains_key(&k)
                .map_err(|e| Error::storage(format!("reading the inbox of `{consumer}`"), e))
        })
    }

    async fn expire_inbox(&self, before: Timestamp) -> Result<u64> {
        let _one_at_a_time = self.inner.expire.lock().await;
        // The scan reads the whole inbox: off the async workers, and outside the
        // committer so commits go on meanwhile (a mark found here cannot be marked
        // again before it is deleted: the inbox refuses a second mark).
        let this = self.clone();
        let mut keys = tokio::task::spawn_blocking(move || this.expired_inbox_keys(before))
            .await
            .map_err(|e| Error::storage("scanning the inbox for expired marks", e))??;
        let mut removed = 0;
        while !keys.is_empty() {
            let rest = keys.split_off(keys.len().min(EXPIRE_CHUNK));
            let (reply, rx) = oneshot::channel();
            self.send(Request::ExpireInbox { keys, reply })?;
            removed += rx.await.map_err(|_| Error::Closed)??;
            keys = rest;
        }
        Ok(removed)
    }

    async fn outbox_peek(&self, limit: usize) -> Result<Vec<OutboxEntry>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let head = self.inner.outbox_head.load(Ordering::Acquire);
        let out = self.with_engine(|e| {
            let snapshot = e.ks.db.snapshot();
            let mut out = Vec::new();
            for item in snapshot.range(&e.ks.outbox, outbox_key(head)..).take(limit) {
                let (k, v) = item
                    .into_inner()
                    .map_err(|e| Error::storage("reading the outbox", e))?;
                out.push(decode_outbox(&k, &v)?);
            }
            Ok(out)
        })?;
        // New entries always get higher seqs, so nothing below the first one seen in
        // this snapshot can appear again.
        if let Some(first) = out.first() {
            self.inner
                .outbox_head
                .fetch_max(first.seq, Ordering::AcqRel);
        }
        Ok(out)
    }

    async fn outbox_remove(&self, seqs: &[u64]) -> Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        let (reply, rx) = oneshot::channel();
        self.send(Request::RemoveOutbox {
            seqs: seqs.to_vec(),
            reply,
        })?;
        rx.await.map_err(|_| Error::Closed)?
    }

    async fn outbox_len(&self) -> Result<u64> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        Ok(self.inner.outbox_len.load(Ordering::Acquire))
    }

    fn outbox_notify(&self) -> Arc<Notify> {
        self.inner.notify.clone()
    }
}

// --- encoding -----------------------------------------------------------------------

fn row_key(table: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(table.len() + 1 + key.len());
    k.extend_from_slice(table.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

fn inbox_key(consumer: &str, id: MessageId) -> Vec<u8> {
    let mut k = Vec::with_capacity(consumer.len() + 17);
    k.extend_from_slice(consumer.as_bytes());
    k.push(0);
    k.extend_from_slice(&id.as_u128().to_be_bytes());
    k
}

fn outbox_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn encode_row(version: u64, json: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + json.len());
    v.extend_from_slice(&version.to_le_bytes());
    v.extend_from_slice(json);
    v
}

/// The version of a stored row.
fn row_version(value: &[u8], table: &str, key: &str) -> Result<u64> {
    value
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| {
            Error::storage(
                format!("reading row {table}/{key}"),
                "the stored row is shorter than its version",
            )
        })
}

fn decode_row(key: String, value: &[u8], table: &str) -> Result<RawRow> {
    let version = row_version(value, table, &key)?;
    Ok(RawRow {
        value: Bytes::copy_from_slice(&value[8..]),
        key,
        version,
    })
}

fn encode_outbox(topic: &str, env: &Envelope) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + topic.len() + env.encoded_len() + 32);
    v.put_u32_le(topic.len() as u32);
    v.put_slice(topic.as_bytes());
    env.write_bytes(&mut v);
    v
}

fn decode_outbox(key: &[u8], value: &[u8]) -> Result<OutboxEntry> {
    let seq = key
        .try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| Error::storage("reading the outbox", "an outbox key is not 8 bytes"))?;
    let context = || format!("decoding outbox entry {seq}");
    let topic_len = value
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| Error::storage(context(), "truncated topic length"))?
        as usize;
    let topic = value
        .get(4..4 + topic_len)
        .ok_or_else(|| Error::storage(context(), "truncated topic"))?;
    let topic = std::str::from_utf8(topic).map_err(|e| Error::storage(context(), e))?;
    let env = Bytes::copy_from_slice(&value[4 + topic_len..]);
    let envelope = Envelope::from_bytes(&env).map_err(|e| Error::storage(context(), e))?;
    Ok(OutboxEntry {
        seq,
        topic: topic.to_string(),
        envelope,
    })
}

fn read_meta(meta: &Keyspace, name: &str) -> Result<Option<u64>> {
    let value = meta
        .get(name)
        .map_err(|e| Error::storage(format!("reading store meta `{name}`"), e))?;
    value
        .map(|v| {
            <[u8; 8]>::try_from(&v[..])
                .map(u64::from_le_bytes)
                .map_err(|_| Error::storage(format!("reading store meta `{name}`"), "not 8 bytes"))
        })
        .transpose()
}

/// The first and last seq in the outbox.
fn outbox_bounds(outbox: &Keyspace) -> Result<(Option<u64>, Option<u64>)> {
    let seq = |g: Option<fjall::Guard>| -> Result<Option<u64>> {
        g.map(|g| {
            let k = g
                .key()
                .map_err(|e| Error::storage("reading the outbox bounds", e))?;
            <[u8; 8]>::try_from(&k[..])
                .map(u64::from_be_bytes)
                .map_err(|_| Error::storage("reading the outbox bounds", "a key is not 8 bytes"))
        })
        .transpose()
    };
    Ok((
        seq(outbox.first_key_value())?,
        seq(outbox.last_key_value())?,
    ))
}

// --- validation ---------------------------------------------------------------------

fn check_name(what: &str, name: &str) -> Result<()> {
    if name.as_bytes().contains(&0) {
        return Err(Error::InvalidArgument(format!(
            "{what} name {name:?} contains a NUL byte, which the embedded store uses as a separator"
        )));
    }
    Ok(())
}

fn check_row_key(table: &str, key: &str) -> Result<()> {
    check_name("table", table)?;
    if table.len() + 1 + key.len() > MAX_KEY {
        return Err(Error::InvalidArgument(format!(
            "row key of {} bytes in table `{table}` is too long (the embedded store takes up to {} bytes of table name and key)",
            key.len(),
            MAX_KEY - 1
        )));
    }
    Ok(())
}

/// Refuses what the engine cannot store (names with NUL, oversized keys or values)
/// before it reaches the committer.
fn validate(batch: &WriteBatch) -> Result<()> {
    const MAX_VALUE: usize = u32::MAX as usize - 64;
    for e in &batch.expect {
        check_row_key(&e.table, &e.key)?;
    }
    for w in &batch.writes {
        match w {
            Write::Put { table, key, value } => {
                check_row_key(table, key)?;
                if value.len() > MAX_VALUE {
                    return Err(Error::InvalidArgument(format!(
                        "row {table}/{key} of {} bytes is too large",
                        value.len()
                    )));
                }
            }
            Write::Delete { table, key } => check_row_key(table, key)?,
        }
    }
    for (consumer, _) in &batch.inbox {
        check_name("consumer", consumer)?;
        if consumer.len() + 17 > MAX_KEY {
            return Err(Error::InvalidArgument(format!(
                "consumer name of {} bytes is too long",
                consumer.len()
            )));
        }
    }
    for (topic, env) in &batch.outbox {
        if topic.len() + env.encoded_len() > MAX_VALUE {
            return Err(Error::InvalidArgument(format!(
                "outbox message for `{topic}` of {} bytes is too large",
                env.encoded_len()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use serde::{Deserialize, Serialize};
    use switchyard::ErrorKind;
    use switchyard::store::{Expectation, Table, Txn, transact};
    use tokio::task::JoinSet;

    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Order {
        item: String,
        qty: u32,
    }

    const ORDERS: Table<Order> = Table::new("orders");
    const ORDER: Table<Order> = Table::new("order");
    const COUNTERS: Table<u64> = Table::new("counters");

    fn open(dir: &Path) -> (EmbeddedStore, Arc<dyn Store>) {
        open_with(dir, StoreConfig::default())
    }

    fn open_with(dir: &Path, config: StoreConfig) -> (EmbeddedStore, Arc<dyn Store>) {
        let store = EmbeddedStore::open(dir, config).unwrap();
        let db: Arc<dyn Store> = Arc::new(store.clone());
        (store, db)
    }

    fn order(item: &str, qty: u32) -> Order {
        Order {
            item: item.into(),
            qty,
        }
    }

    fn event(n: u32) -> Envelope {
        Envelope::new(
            "order.created.v1",
            "/test",
            "application/json",
            format!("{{\"n\":{n}}}"),
        )
        .with_subject(format!("order-{n}"))
    }

    async fn counter(db: &Arc<dyn Store>, key: &str) -> Option<u64> {
        Txn::new(db.clone()).get(&COUNTERS, key).await.unwrap()
    }

    /// Blocks the committer until the returned sender sends: commits submitted meanwhile
    /// are written as one group.
    fn pause(store: &EmbeddedStore) -> std::sync::mpsc::Sender<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        store.send(Request::Pause(rx)).unwrap();
        tx
    }

    fn put(table: &str, key: &str, json: &str) -> Write {
        Write::Put {
            table: table.into(),
            key: key.into(),
            value: Bytes::from(json.to_string()),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn put_get_scan_with_prefixes_and_versions() {
        let dir = tempfile::tempdir().unwrap();
        let (store, db) = open(dir.path());

        let txn = Txn::new(db.clone());
        txn.put(&ORDERS, "a-1", &order("apple", 1)).unwrap();
        txn.put(&ORDERS, "a-2", &order("avocado", 2)).unwrap();
        txn.put(&ORDERS, "b-1", &order("banana", 3)).unwrap();
        txn.put(&ORDER, "a-1", &order("other table", 9)).unwrap();
        txn.put(&COUNTERS, "a-1", &7).unwrap();
        // A transaction reads its own writes.
        assert_eq!(
            txn.get(&ORDERS, "a-2").await.unwrap(),
            Some(order("avocado", 2))
        );
        txn.commit().await.unwrap();

        // One store-wide counter, +1 per put, in write order.
        let mut versions = Vec::new();
        for (t, k) in [("orders", "a-1"), ("orders", "a-2"), ("orders", "b-1")] {
            versions.push(db.get_raw(t, k).await.unwrap().unwrap().version);
        }
        assert_eq!(versions, vec![1, 2, 3]);
        assert_eq!(
            db.get_raw("order", "a-1").await.unwrap().unwrap().version,
            4
        );
        assert_eq!(
            db.get_raw("counters", "a-1")
                .await
                .unwrap()
                .unwrap()
                .version,
            5
        );
        assert_eq!(db.get_raw("orders", "zzz").await.unwrap(), None);
        assert_eq!(db.get_raw("nope", "a-1").await.unwrap(), None);

        let read = Txn::new(db.clone());
        let a: Vec<String> = read
            .scan(&ORDERS, "a-", 10)
            .await
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(a, vec!["a-1", "a-2"]);
        assert_eq!(read.scan(&ORDERS, "a-", 1).await.unwrap().len(), 1);
        assert_eq!(read.scan(&ORDERS, "", 10).await.unwrap().len(), 3);
        assert_eq!(read.scan(&ORDERS, "c", 10).await.unwrap().len(), 0);
        // "order" is a prefix of "orders": the tables stay apart.
        let other = read.scan(&ORDER, "", 10).await.unwrap();
        assert_eq!(other, vec![("a-1".to_string(), order("other table", 9))]);
        let raw = db.scan_raw("orders", "", 10).await.unwrap();
        assert_eq!(
            raw.iter().map(|r| r.version).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(
            raw[0].value,
            Bytes::from(serde_json::to_vec(&order("apple", 1)).unwrap())
        );

        // Rewrite and delete.
        let txn = Txn::new(db.clone());
        txn.put(&ORDERS, "a-1", &order("apple", 10)).unwrap();
        txn.delete(&ORDERS, "b-1");
        txn.commit().await.unwrap();
        let row = db.get_raw("orders", "a-1").await.unwrap().unwrap();
        assert_eq!(row.version, 6);
        assert_eq!(db.get_raw("orders", "b-1").await.unwrap(), None);
        assert_eq!(db.scan_raw("orders", "", 10).await.unwrap().len(), 2);
        assert_eq!(store.stats().commits.load(Ordering::Relaxed), 2);
        store.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conflict_when_a_read_row_changed_first_commit_wins() {
        let dir = tempfile::tempdir().unwrap();
        let (store, db) = open(dir.path());
        let seed = Txn::new(db.clone());
        seed.put(&COUNTERS, "x", &1).unwrap();
        seed.commit().await.unwrap();

        let t1 = Txn::new(db.clone());
        let t2 = Txn::new(db.clone());
        assert_eq!(t1.get(&COUNTERS, "x").await.unwrap(), Some(1));
        assert_eq!(t2.get(&COUNTERS, "x").await.unwrap(), Some(1));
        t1.put(&COUNTERS, "x", &2).unwrap();
        t2.put(&COUNTERS, "x", &3).unwrap();
        t2.put(&COUNTERS, "y", &3).unwrap();
        t2.publish_envelope("orders", event(1));
        let id = MessageId::new();
        t2.mark_processed("orders/billing", id);
        t1.commit().await.unwrap();
        let e = t2.commit().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert!(
            matches!(&e, Error::Conflict { table, key } if table == "counters" && key == "x"),
            "{e:?}"
        );
        assert!(e.to_string().contains("counters/x"), "{e}");
        // Nothing of the loser was written.
        assert_eq!(counter(&db, "x").await, Some(2));
        assert_eq!(counter(&db, "y").await, None);
        assert_eq!(db.outbox_len().await.unwrap(), 0);
        assert!(db.outbox_peek(10).await.unwrap().is_empty());
        assert!(!db.inbox_contains("orders/billing", id).await.unwrap());
        assert_eq!(store.stats().conflicts.load(Ordering::Relaxed), 1);

        // A row read as absent that appears meanwhile conflicts too.
        let t3 = Txn::new(db.clone());
        assert_eq!(t3.get(&COUNTERS, "new").await.unwrap(), None);
        let t4 = Txn::new(db.clone());
        t4.put(&COUNTERS, "new", &1).unwrap();
        t4.commit().await.unwrap();
        t3.put(&COUNTERS, "new", &5).unwrap();
        assert_eq!(t3.commit().await.unwrap_err().kind(), ErrorKind::Conflict);
        assert_eq!(counter(&db, "new").await, Some(1));
        store.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conflict_within_one_group_sees_the_earlier_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _db) = open(dir.path());
        let absent = |key: &str| Expectation {
            table: "counters".into(),
            key: key.into(),
            version: None,
        };
        let groups = store.stats().groups.load(Ordering::Relaxed);
        let resume = pause(&store);
        let first = store
            .submit(WriteBatch {
                expect: vec![absent("k")],
                writes: vec![put("counters", "k", "1")],
                ..Default::default()
            })
            .unwrap();
        let second = store
            .submit(WriteBatch {
                expect: vec![absent("k")],
                writes: vec![put("counters", "k", "2"), put("counters", "j", "2")],
                outbox: vec![("orders".into(), event(2))],
                ..Default::default()
            })
            .unwrap();
        // A blind write after them in the same group: last writer wins.
        let third = store
            .submit(WriteBatch {
                writes: vec![put("counters", "j", "3")],
                ..Default::default()
            })
            .unwrap();
        resume.send(()).unwrap();
        first.await.unwrap().unwrap();
        let e = second.await.unwrap().unwrap_err();
        assert!(
            matches!(&e, Error::Conflict { key, .. } if key == "k"),
            "{e:?}"
        );
        third.await.unwrap().unwrap();
        assert_eq!(store.stats().groups.load(Ordering::Relaxed), groups + 1);
        let k = store.get_raw("counters", "k").await.unwrap().unwrap();
        assert_eq!((k.value, k.version), (Bytes::from("1"), 1));
        let j = store.get_raw("counters", "j").await.unwrap().unwrap();
        assert_eq!((j.value, j.version), (Bytes::from("3"), 2));
        assert_eq!(store.outbox_len().await.unwrap(), 0);
        store.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn inbox_mark_twice_is_already_processed_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, db) = open(dir.path());
        let id = MessageId::new();

        // Across commits.
        let t = Txn::new(db.clone());
        t.put(&COUNTERS, "a", &1).unwrap();
        t.mark_processed("orders/billing", id);
        t.commit().await.unwrap();
        assert!(db.inbox_contains("orders/billing", id).await.unwrap());
        assert!(!db.inbox_contains("orders/shipping", id).await.unwrap());
        assert!(
            !db.inbox_contains("orders/billing", MessageId::new())
                .await
                .unwrap()
        );

        let t = Txn::new(db.clone());
        t.put(&COUNTERS, "a", &2).unwrap();
        t.publish_envelope("orders", event(1));
        t.mark_processed("orders/billing", id);
        let e = t.commit().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyProcessed);
        assert!(e.to_string().contains(&id.to_string()), "{e}");
        assert_eq!(counter(&db, "a").await, Some(1));
        assert_eq!(db.outbox_len().await.unwrap(), 0);

        // Another consumer processes the same message independently.
        let t = Txn::new(db.clone());
        t.mark_processed("orders/shipping", id);
        t.commit().await.unwrap();

        // Within one group: the second batch sees the first one's mark.
        let id2 = MessageId::new();
        let groups = store.stats().groups.load(Ordering::Relaxed);
        let resume = pause(&store);
        let batch = |n: &str| WriteBatch {
            writes: vec![put("counters", &format!("in-group-{n}"), n)],
            outbox: vec![("orders".into(), event(2))],
            inbox: vec![("orders/billing".into(), id2)],
            ..Default::default()
        };
        let first = store.submit(batch("1")).unwrap();
        let second = store.submit(batch("2")).unwrap();
        resume.send(()).unwrap();
        first.await.unwrap().unwrap();
        let e = second.await.unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyProcessed);
        assert_eq!(store.stats().groups.load(Ordering::Relaxed), groups + 1);
        assert_eq!(counter(&db, "in-group-1").await, Some(1));
        assert_eq!(counter(&db, "in-group-2").await, None);
        assert_eq!(db.outbox_len().await.unwrap(), 1);
        assert!(db.inbox_contains("orders/billing", id2).await.unwrap());
        assert_eq!(store.stats().already_processed.load(Ordering::Relaxed), 2);
        store.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_increments_lose_no_update() {
        let dir = tempfile::tempdir().unwrap();
        let (store, db) = open(dir.path());
        let mut tasks = JoinSet::new();
        for _ in 0..64 {
            let db = db.clone();
            tasks.spawn(async move {
                for _ in 0..50 {
                    // `transact` gives up after 16 conflicts; 64 writers of one row
                    // lose more often than that, so keep going until it lands.
                    loop {
                        let r = transact(&db, |txn| async move {
                            let n = txn.get(&COUNTERS, "hot").await?.unwrap_or(0);
                            txn.put(&COUNTERS, "hot", &(n + 1))
                        })
                        .await;
                        match r {
                            Ok(()) => break,
                            Err(Error::Conflict { .. }) => tokio::task::yield_now().await,
                            Err(e) => panic!("increment failed: {e}"),
                        }
                    }
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        assert_eq!(counter(&db, "hot").await, Some(3200));
        let stats = store.stats();
        let commits = stats.commits.load(Ordering::Relaxed);
        let conflicts = stats.conflicts.load(Ordering::Relaxed);
        let groups = stats.groups.load(Ordering::Relaxed);
        assert_eq!(commits, 3200);
        // One row: one winner per group, and the losers of a group share its sync.
        assert!(
            groups * 4 < commits + conflicts,
            "{groups} groups for {} commit attempts",
            commits + conflicts
        );
        store.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_commits_share_groups() {
        let dir = tempfile::tempdir().unwrap();
        let (store, db) = open(dir.path());
        let mut tasks = JoinSet::new();
        for t in 0..64u32 {
            let db = db.clone();
            tasks.spawn(async move {
                let key = format!("c-{t}");
                for i in 0..50 {
                    let id = MessageId::new();
                    let key = key.as_str();
                    transact(&db, |txn| async move {
                        let n = txn.get(&COUNTERS, key).await?.unwrap_or(0);
                        txn.put(&COUNTERS, key, &(n + 1))?;
                        txn.publish_envelope("events", event(t * 100 + i));
                        txn.mark_processed("svc", id);
                        Ok(())
                    })
                    .await
                    .unwrap();
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        for t in 0..64 {
            assert_eq!(counter(&db, &format!("c-{t}")).await, Some(50));
        }
        assert_eq!(db.outbox_len().await.unwrap(), 3200);
        let stats = store.stats();
        let commits = stats.commits.load(Ordering::Relaxed);
        let groups = stats.groups.load(Ordering::Relaxed);
        assert_eq!(commits, 3200);
        assert!(
            groups * 4 < commits,
            "{groups} groups for {commits} commits"
        );
        store.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outbox_keeps_commit_order_removes_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (store, db) = open(dir.path());
        let notify = db.outbox_notify();
        let mut sent = Vec::new();
        for c in 0..3u32 {
            let t = Txn::new(db.clone());
            for m in 0..2 {
                let env = event(c * 10 + m);
                sent.push((format!("topic-{m}"), env.clone()));
                t.publish_envelope(&format!("topic-{m}"), env);
            }
            let notified = notify.notified();
            t.commit().await.unwrap();
            tokio::time::timeout(Duration::from_secs(5), notified)
                .await
                .expect("a commit with outbox entries notifies");
        }
        assert_eq!(db.outbox_len().await.unwrap(), 6);
        let peeked = db.outbox_peek(100).await.unwrap();
        assert_eq!(peeked.len(), 6);
        for (i, (entry, (topic, env))) in peeked.iter().zip(&sent).enumerate() {
            assert_eq!(entry.seq, i as u64);
            assert_eq!(&entry.topic, topic);
            assert_eq!(&entry.envelope, env);
        }
        assert_eq!(db.outbox_peek(2).await.unwrap().len(), 2);
        assert!(db.outbox_peek(0).await.unwrap().is_empty());

        // Remove the first two (and a seq that does not exist).
        db.outbox_remove(&[0, 1, 99]).await.unwrap();
        assert_eq!(db.outbox_len().await.unwrap(), 4);
        let left: Vec<u64> = db
            .outbox_peek(100)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(left, vec![2, 3, 4, 5]);
        db.outbox_remove(&[1, 2]).await.unwrap();
        assert_eq!(db.outbox_len().await.unwrap(), 3);

        store.close().await.unwrap();
        drop(db);
        let (store, db) = open(dir.path());
        assert_eq!(db.outbox_len().await.unwrap(), 3);
        let again = db.outbox_peek(100).await.unwrap();
        assert_eq!(
            again.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(again[0].envelope, sent[3].1);

        // Drain it completely: seqs still continue after a reopen.
        db.outbox_remove(&[3, 4, 5]).await.unwrap();
        assert_eq!(db.outbox_len().await.unwrap(), 0);
        store.close().await.unwrap();
        drop(db);
        let (store, db) = open(dir.path());
        assert_eq!(db.outbox_len().await.unwrap(), 0);
        let t = Txn::new(db.clone());
        t.publish_envelope("topic-0", event(99));
        t.commit().await.unwrap();
        let next = db.outbox_peek(10).await.unwrap();
        assert_eq!(next.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![6]);
        store.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn expire_inbox_forgets_old_marks_only() {
        let dir = tempfile::tempdir().unwrap();
        let (store, db) = open(dir.path());
        let old: Vec<MessageId> = (0..3).map(|_| MessageId::new()).collect();
        let t = Txn::new(db.clone());
        for id in &old {
            t.mark_processed("c", *id);
        }
        t.commit().await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let cut = Timestamp::now();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let new = MessageId::new();
        let t = Txn::new(db.clone());
        t.mark_processed("c", new);
        t.commit().await.unwrap();

        assert_eq!(db.expire_inbox(cut).await.unwrap(), 3);
        for id in &old {
            assert!(!db.inbox_contains("c", *id).await.unwrap());
        }
        assert!(db.inbox_contains("c", new).await.unwrap());
        assert_eq!(db.expire_inbox(cut).await.unwrap(), 0);
        // An expired id can be processed again.
        let t = Txn::new(db.clone());
        t.mark_processed("c", old[0]);
        t.commit().await.unwrap();
        store.close().await.unwrap();
        drop(db);
        let (store, db) = open(dir.path());
        assert!(db.inbox_contains("c", old[0]).await.unwrap());
        assert!(!db.inbox_contains("c", old[1]).await.unwrap());
        assert!(db.inbox_contains("c", new).await.unwrap());
        store.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reopen_after_close_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let id = MessageId::new();
        {
            let (store, db) = open(dir.path());
            let t = Txn::new(db.clone());
            t.put(&ORDERS, "o-1", &order("pear", 4)).unwrap();
            t.put(&ORDERS, "o-2", &order("plum", 5)).unwrap();
            t.publish_envelope("orders", event(1));
            t.mark_processed("orders/billing", id);
            t.commit().await.unwrap();
            let t = Txn::new(db.clone());
            t.delete(&ORDERS, "o-2");
            t.commit().await.unwrap();
            store.close().await.unwrap();
            // Closed: everything refuses, clones included.
            assert_eq!(
                db.get_raw("orders", "o-1").await.unwrap_err().kind(),
                ErrorKind::Closed
            );
            assert_eq!(db.outbox_len().await.unwrap_err().kind(), ErrorKind::Closed);
            let t = Txn::new(db.clone());
            t.put(&ORDERS, "o-3", &order("fig", 1)).unwrap();
            assert_eq!(t.commit().await.unwrap_err().kind(), ErrorKind::Closed);
            store.close().await.unwrap();
        }
        let (store, db) = open(dir.path());
        let t = Txn::new(db.clone());
        assert_eq!(t.get(&ORDERS, "o-1").await.unwrap(), Some(order("pear", 4)));
        assert_eq!(t.get(&ORDERS, "o-2").await.unwrap(), None);
        assert_eq!(t.get(&ORDERS, "o-3").await.unwrap(), None);
        assert!(db.inbox_contains("orders/billing", id).await.unwrap());
        assert_eq!(db.outbox_len().await.unwrap(), 1);
        assert_eq!(
            db.outbox_peek(10).await.unwrap()[0].envelope.data,
            event(1).data
        );
        // Versions keep counting up: a version is never handed out twice.
        t.put(&ORDERS, "o-2", &order("plum", 6)).unwrap();
        t.commit().await.unwrap();
        assert_eq!(
            db.get_raw("orders", "o-1").await.unwrap().unwrap().version,
            1
        );
        assert_eq!(
            db.get_raw("orders", "o-2").await.unwrap().unwrap().version,
            3
        );
        store.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn second_open_of_the_same_dir_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _db) = open(dir.path());
        let e = EmbeddedStore::open(dir.path(), StoreConfig::default()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Locked);
        assert!(matches!(&e, Error::Locked { path } if path == dir.path()));
        store.close().await.unwrap();
        // Released on close, even while clones are still around.
        let again = EmbeddedStore::open(dir.path(), StoreConfig::default()).unwrap();
        again.close().await.unwrap();
        drop(store);
        // And on drop without close.
        let dropped = EmbeddedStore::open(dir.path(), StoreConfig::default()).unwrap();
        drop(dropped);
        let last = EmbeddedStore::open(dir.path(), StoreConfig::default()).unwrap();
        last.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn buffered_mode_commits_and_keeps_them_after_close() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            durability: Durability::Buffered {
                interval: Duration::from_millis(5),
            },
            ..Default::default()
        };
        let (store, db) = open_with(dir.path(), config.clone());
        for i in 0..10u64 {
            let t = Txn::new(db.clone());
            t.put(&COUNTERS, "n", &i).unwrap();
            t.publish_envelope("events", event(i as u32));
            t.commit().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        store.close().await.unwrap();
        drop(db);
        let (store, db) = open_with(dir.path(), config);
        assert_eq!(counter(&db, "n").await, Some(9));
        assert_eq!(db.outbox_len().await.unwrap(), 10);
        store.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn names_with_nul_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (store, db) = open(dir.path());
        let e = db
            .commit(WriteBatch {
                writes: vec![put("a\0b", "k", "1")],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        let e = db
            .commit(WriteBatch {
                inbox: vec![("c\0".into(), MessageId::new())],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert_eq!(
            db.get_raw("a\0b", "k").await.unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        // Keys may hold anything.
        let t = Txn::new(db.clone());
        t.put(&COUNTERS, "k\0ey ü", &1).unwrap();
        t.commit().await.unwrap();
        assert_eq!(counter(&db, "k\0ey ü").await, Some(1));
        assert_eq!(db.scan_raw("counters", "k\0", 10).await.unwrap().len(), 1);
        store.close().await.unwrap();
    }

    /// A quick look at throughput and latency (a figure, not an assertion):
    /// `cargo test --release -p switchyard-embedded --lib store::tests::throughput -- --ignored --nocapture`
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "prints figures; run by hand in release mode"]
    async fn throughput() {
        let dir = tempfile::tempdir().unwrap();
        let (store, db) = open(dir.path());
        let seed = Txn::new(db.clone());
        for k in 0..10_000 {
            seed.put(&ORDERS, &format!("order-{k:05}"), &order("seed", k))
                .unwrap();
        }
        seed.commit().await.unwrap();
        let run_for = Duration::from_secs(3);
        let start = Instant::now();
        let mut tasks = JoinSet::new();
        for t in 0..64u32 {
            let db = db.clone();
            tasks.spawn(async move {
                let mut lat = Vec::new();
                let mut i = 0u32;
                while start.elapsed() < run_for {
                    let key = format!("order-{:05}", (t * 7_919 + i * 104_729) % 10_000);
                    let key = key.as_str();
                    let id = MessageId::new();
                    let began = Instant::now();
                    let r = transact(&db, |txn| async move {
                        let mut o = txn
                            .get(&ORDERS, key)
                            .await?
                            .unwrap_or_else(|| order("new", 0));
                        o.qty += 1;
                        txn.put(&ORDERS, key, &o)?;
                        txn.publish_envelope("orders", event(t * 1_000_000 + i));
                        txn.mark_processed("orders/billing", id);
                        Ok(())
                    })
                    .await;
                    if r.is_ok() {
                        lat.push(began.elapsed());
                    }
                    i += 1;
                }
                lat
            });
        }
        let mut lat = Vec::new();
        while let Some(r) = tasks.join_next().await {
            lat.extend(r.unwrap());
        }
        let secs = start.elapsed().as_secs_f64();
        lat.sort();
        let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
        let s = store.stats();
        println!(
            "{:.0} commits/s, p50 {:?}, p99 {:?}, {:.1} commits/group, {} conflicts",
            lat.len() as f64 / secs,
            p(0.5),
            p(0.99),
            s.commits_per_group(),
            s.conflicts.load(Ordering::Relaxed)
        );
        store.close().await.unwrap();
    }
}
