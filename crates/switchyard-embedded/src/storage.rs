//! [`LogStorage`] over segment-log topics and group position files in a data directory.
//!
//! ```text
//! <data dir>/LOCK                       held while a bus has the directory open
//! <data dir>/topics/<topic>/log/        the topic's segment files (see `log`)
//! <data dir>/topics/<topic>/groups/     one `<group>.pos` change log per consumer group
//! ```

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;

use async_trait::async_trait;
use bytes::Bytes;
use switchyard::envelope::id_from_bytes;
use switchyard::logbus::{DedupWindow, GroupLog, GroupSnapshot, LogStorage, TopicLog, now_ms};
use switchyard::{Capabilities, Envelope, Error, Published, Result};
use tokio::sync::{oneshot, watch};

use crate::EmbeddedConfig;
use crate::group_file::GroupFile;
use crate::log::{LogReader, RecoveryReport, SegmentConfig, TopicLog as SegmentLog};
use crate::writer::{self, AppendRequest, WriterMsg, WriterStats};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The embedded backend's storage: topics under a data directory and the writer thread.
pub struct EmbeddedStorage {
    dir: PathBuf,
    config: EmbeddedConfig,
    topics: Mutex<HashMap<String, Arc<EmbeddedTopic>>>,
    writer_tx: Mutex<Option<mpsc::Sender<WriterMsg>>>,
    writer_thread: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<WriterStats>,
    recoveries: Mutex<Vec<(String, RecoveryReport)>>,
    lock_file: File,
}

impl EmbeddedStorage {
    /// Opens (creating) the data directory, takes its lock and starts the writer thread.
    pub fn open(dir: &Path, config: EmbeddedConfig) -> Result<Self> {
        fs::create_dir_all(dir.join("topics"))
            .map_err(|e| Error::storage(format!("creating data directory {}", dir.display()), e))?;
        let lock_file = crate::group_commit::lock_dir(dir)?;
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(WriterStats::default());
        let thread_stats = stats.clone();
        let durability = config.durability;
        let max_batch = config.max_batch_bytes;
        let handle = std::thread::Builder::new()
            .name("switchyard-writer".into())
            .spawn(move || writer::run(rx, durability, max_batch, thread_stats))
            .map_err(|e| Error::storage("starting the writer thread", e))?;
        Ok(EmbeddedStorage {
            dir: dir.to_path_buf(),
            config,
            topics: Mutex::new(HashMap::new()),
            writer_tx: Mutex::new(Some(tx)),
            writer_thread: Mutex::new(Some(handle)),
            stats,
            recoveries: Mutex::new(Vec::new()),
            lock_file,
        })
    }

    /// The writer's counters (messages, fsyncs, batches).
    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    /// What opening each topic found and repaired (torn tails cut), by topic.
    pub fn recoveries(&self) -> Vec<(String, RecoveryReport)> {
        lock(&self.recoveries).clone()
    }

    /// Bytes on disk of a topic's log.
    pub fn disk_bytes(&self, topic: &str) -> Option<u64> {
        lock(&self.topics)
            .get(topic)
            .map(|t| t.shared.log.disk_bytes())
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn sender(&self) -> Result<mpsc::Sender<WriterMsg>> {
        lock(&self.writer_tx).clone().ok_or(Error::Closed)
    }
}

/// Per-topic state shared by the bus and the writer thread.
pub(crate) struct TopicShared {
    pub name: String,
    pub log: SegmentLog,
    dedup: Mutex<DedupWindow>,
    dedup_loaded: AtomicBool,
    end_tx: watch::Sender<u64>,
}

impl TopicShared {
    /// Loads the ids of recently stored messages into the dedup window (once, lazily, so
    /// that consumers of a large backlog never pay for it).
    pub(crate) fn ensure_dedup_loaded(&self) -> Result<()> {
        if self.dedup_loaded.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut w = lock(&self.dedup);
        if w.enabled() {
            let since = w.horizon(now_ms());
            self.log
                .scan_recent(since, |offset, t, payload| {
                    if t >= since
                        && let Some(id) = id_from_bytes(payload)
                    {
                        w.insert(id.as_u128(), offset, t);
                    }
                })
                .map_err(|e| Error::storage(format!("scanning topic `{}`", self.name), e))?;
        }
        self.dedup_loaded.store(true, Ordering::Release);
        Ok(())
    }

    pub(crate) fn dedup_snapshot_guard(&self) -> MutexGuard<'_, DedupWindow> {
        lock(&self.dedup)
    }

    pub(crate) fn remember_ids(&self, ids: &[(u128, u64)], now: u64) {
        let mut w = lock(&self.dedup);
        w.expire(now);
        for (id, offset) in ids {
            w.insert(*id, *offset, now);
        }
    }

    pub(crate) fn publish_end(&self) {
        self.end_tx.send_replace(self.log.durable_end());
    }
}

/// One topic of the embedded backend.
pub struct EmbeddedTopic {
    shared: Arc<TopicShared>,
    writer: mpsc::Sender<WriterMsg>,
    groups_dir: PathBuf,
    readers: Mutex<Vec<LogReader>>,
}

#[async_trait]
impl LogStorage for EmbeddedStorage {
    type Topic = EmbeddedTopic;

    fn topic(&self, name: &str) -> Result<Arc<EmbeddedTopic>> {
        // Held across the open: two opens of one topic would collide on its lock.
        let mut topics = lock(&self.topics);
        if let Some(t) = topics.get(name) {
            return Ok(t.clone());
        }
        let base = self.dir.join("topics").join(name);
        let groups_dir = base.join("groups");
        fs::create_dir_all(&groups_dir)
            .map_err(|e| Error::storage(format!("creating {}", groups_dir.display()), e))?;
        let (log, report) = SegmentLog::open(
            &base.join("log"),
            SegmentConfig {
                segment_bytes: self.config.segment_bytes,
            },
        )
        .map_err(|e| Error::storage(format!("opening topic `{name}`"), e))?;
        if report.truncated_bytes > 0 {
            tracing::warn!(topic = name, cut_bytes = report.truncated_bytes, at = ?report.corrupt_at,
                "recovered topic log: cut a torn or corrupt tail back to the last good record");
        }
        lock(&self.recoveries).push((name.to_string(), report));
        let end = log.durable_end();
        let topic = Arc::new(EmbeddedTopic {
            shared: Arc::new(TopicShared {
                name: name.to_string(),
                log,
                dedup: Mutex::new(DedupWindow::with_capacity_limit(
                    self.config.dedup_window,
                    self.config.max_dedup_ids,
                )),
                dedup_loaded: AtomicBool::new(false),
                end_tx: watch::channel(end).0,
            }),
            writer: self.sender()?,
            groups_dir,
            readers: Mutex::new(Vec::new()),
        });
        topics.insert(name.to_string(), topic.clone());
        Ok(topic)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::all()
    }

    async fn close(&self) -> Result<()> {
        let tx = lock(&self.writer_tx).take();
        if let Some(tx) = tx {
            let (done, wait) = oneshot::channel();
            if tx.send(WriterMsg::Shutdown(done)).is_ok() {
                let _ = wait.await;
            }
        }
        let handle = lock(&self.writer_thread).take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        lock(&self.topics).clear();
        let _ = self.lock_file.unlock();
        Ok(())
    }
}

#[async_trait]
impl TopicLog for EmbeddedTopic {
    async fn append(&self, envelopes: Vec<Envelope>, dedup: bool) -> Result<Vec<Published>> {
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(WriterMsg::Append(AppendRequest {
                topic: self.shared.clone(),
                envelopes,
                dedup,
                reply,
            }))
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    fn read(&self, from: u64, max: usize) -> Result<Vec<(u64, Arc<Envelope>)>> {
        let mut reader = {
            let mut pool = lock(&self.readers);
            match pool.iter().position(|r| r.position() == from) {
                Some(i) => pool.swap_remove(i),
                None => self.shared.log.reader(from),
            }
        };
        let records = reader
            .read(max, 4 * 1024 * 1024)
            .map_err(|e| Error::storage(format!("reading topic `{}`", self.shared.name), e));
        {
            let mut pool = lock(&self.readers);
            if pool.len() >= 8 {
                pool.remove(0);
            }
            pool.push(reader);
        }
        let mut out = Vec::new();
        for r in records? {
            // Copy out of the shared read chunk so a message kept long (a poison message
            // waiting for retries) does not pin the whole chunk in memory.
            let own = Bytes::copy_from_slice(&r.payload);
            let env = Envelope::from_bytes(&own).map_err(|e| {
                Error::storage(
                    format!(
                        "decoding offset {} of topic `{}`",
                        r.offset, self.shared.name
                    ),
                    e,
                )
            })?;
            out.push((r.offset, Arc::new(env)));
        }
        Ok(out)
    }

    fn watch_end(&self) -> watch::Receiver<u64> {
        self.shared.end_tx.subscribe()
    }

    fn start(&self) -> u64 {
        self.shared.log.start_offset()
    }

    fn open_group(&self, group: &str) -> Result<(Box<dyn GroupLog>, Option<GroupSnapshot>)> {
        let (file, snapshot) = GroupFile::open(self.groups_dir.join(format!("{group}.pos")))?;
        // In buffered mode a power loss can cut the log below a stored position; offsets
        // past the durable end will be reused, so the position must not skip them.
        let end = self.shared.log.durable_end();
        let snapshot = snapshot.map(|mut s| {
            if s.floor > end {
                s.floor = end;
            }
            s.done = s
                .done
                .split_off(&0)
                .into_iter()
                .filter(|o| *o < end)
                .collect();
            s.failures.retain(|o, _| *o < end);
            s
        });
        Ok((Box::new(file), snapshot))
    }

    fn groups(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        let entries = fs::read_dir(&self.groups_dir)
            .map_err(|e| Error::storage(format!("listing {}", self.groups_dir.display()), e))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(g) = name.strip_suffix(".pos") {
                names.push(g.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    fn reclaim(&self, before: u64) -> Result<()> {
        let removed =
            self.shared.log.remove_before(before).map_err(|e| {
                Error::storage(format!("reclaiming topic `{}`", self.shared.name), e)
            })?;
        if removed > 0 {
            tracing::debug!(topic = %self.shared.name, removed, "reclaimed consumed messages");
        }
        Ok(())
    }
}
