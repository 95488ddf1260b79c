//! The durable, append-only, checksummed log of one topic.
//!
//! A [`TopicLog`] is a directory of segment files. One writer thread appends
//! batches of opaque records ([`TopicLog::append_batch`]) and makes them
//! durable with one `fdatasync` per batch ([`TopicLog::sync`], group commit);
//! any number of [`LogReader`]s read concurrently from other threads and only
//! ever see records up to the durable end.
//!
//! # On disk
//!
//! ```text
//! <dir>/LOCK                       advisory lock: one open TopicLog per directory
//! <dir>/00000000000000000000.log   segment: frames (see `segment.rs`) back to back
//! <dir>/00000000000000052817.log   the 20-digit name is the segment's base offset
//! ```
//!
//! The last segment is the active one; appends go to its end. When it has
//! reached [`SegmentConfig::segment_bytes`], the next batch first rolls to a
//! new segment named after the next offset. A batch is never split, so a
//! segment may end up somewhat larger than the limit.
//!
//! # Durability and recovery
//!
//! * [`TopicLog::sync`] `fdatasync`s the active segment (and the directory if
//!   a segment file was created since the last sync), then advances the
//!   durable end that readers see.
//! * A roll first `fdatasync`s the segment being closed (if it holds unsynced
//!   writes; after a normal `sync` it does not, so this costs nothing). So a
//!   newer segment never exists on disk next to an older one with a torn tail:
//!   every segment but the last is complete, and recovery only has to check
//!   the last one.
//! * [`TopicLog::open`] validates the last segment record by record (length,
//!   CRC-32C, consecutive offsets), truncates a torn, zero-filled or corrupt
//!   tail back to the last good record, and reports it ([`RecoveryReport`] and
//!   `tracing::warn!`). A checksum-valid record with an unexpected offset is
//!   *not* truncated (that is not a torn write but a foreign or damaged file):
//!   open fails with [`LogError::Corrupt`] so nobody loses data silently.
//! * After a write or sync failure the writer stops
//!   ([`LogError::WriterFailed`]): after a failed `fdatasync` the kernel may
//!   have dropped the dirty pages, so retrying could report durability that
//!   does not exist. Reopening the log recovers from what is on disk.
//!
//! # Offsets and the sparse index (why no index files)
//!
//! Closed segments are trusted. The record range of a closed segment comes
//! for free from the file names: `[base, base of the next segment)`. So open
//! reads only the last segment, and needs no index files that could
//! themselves be torn or stale.
//!
//! To position a reader inside a segment without scanning it from the start,
//! each segment has an in-memory sparse index: one `(offset, byte position)`
//! entry every 64 KiB of frames (about 1,000 entries, 16 KiB, per 64 MiB
//! segment). The writer adds entries as it appends and open fills them for the
//! last segment while validating it. For the older segments found on open,
//! the index is built lazily, by one scan the first time a reader seeks into
//! the middle of that segment. A seek then reads at most 64 KiB of records it
//! skips.
//!
//! # Readers
//!
//! A [`LogReader`] reads with positional reads (`pread`) in 256 KiB chunks
//! through the segment's shared file handle: `pread` has no file cursor, so
//! readers never contend on it, and an unlinked segment stays readable while
//! a reader still holds it. Payloads are [`Bytes`] slices of the chunk, so
//! reading costs one allocation per chunk, not per record; memory stays
//! bounded by the chunk size however large the backlog is. A caller that keeps
//! a few records for a long time should copy them, since each keeps its whole
//! chunk alive.
//!
//! Readers check every record's CRC. Publication is ordered: the writer stores
//! the new durable byte length of each written segment before it stores the
//! new durable end offset, and a reader loads them in the opposite order, so
//! it never reads bytes that are still being written.
//!
//! # Retention
//!
//! [`TopicLog::remove_before`] deletes whole closed segments. A reader whose
//! segment was removed jumps forward to [`TopicLog::start_offset`] on its next
//! read (the caller only removes records every consumer has finished with).

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::{Bytes, BytesMut};

use crate::segment::{self, Decoded};

/// Largest record payload [`TopicLog::append_batch`] accepts (64 MiB); larger
/// ones are [`LogError::RecordTooLarge`]. Bounds what a corrupt length field
/// can make a reader allocate.
pub const MAX_RECORD_BYTES: usize = segment::MAX_PAYLOAD;

/// Size of a reader's (and the recovery scan's) positional read.
const CHUNK: usize = 256 * 1024;
/// Bytes of frames between two sparse index entries.
const INDEX_INTERVAL: u64 = 64 * 1024;
/// The writer's encode buffer is released after a batch larger than this.
const MAX_KEPT_WRITE_BUFFER: usize = 16 * 1024 * 1024;
/// Digits of the base offset in a segment file name.
const NAME_DIGITS: usize = 20;
const SEGMENT_SUFFIX: &str = ".log";
const LOCK_FILE: &str = "LOCK";

/// Tuning of a topic log's segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentConfig {
    /// Size at which the active segment is closed and a new one started, so
    /// retention can reclaim space in whole files. Default 64 MiB.
    pub segment_bytes: u64,
}

impl Default for SegmentConfig {
    fn default() -> Self {
        SegmentConfig {
            segment_bytes: 64 * 1024 * 1024,
        }
    }
}

/// What [`TopicLog::open`] found and repaired, for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RecoveryReport {
    /// Segment files in the log after open.
    pub segments: usize,
    /// Records retained in the log (from start offset to end) after open.
    pub records: u64,
    /// Bytes cut from the tail of the last segment (torn or corrupt write).
    pub truncated_bytes: u64,
    /// File and byte position where the cut tail began, if anything was cut.
    pub corrupt_at: Option<(PathBuf, u64)>,
}

/// Errors of the topic log. Each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A file system operation failed.
    #[error(
        "I/O error on {}: {source}; check that the disk has free space and the data directory is writable",
        path.display()
    )]
    Io {
        /// File or directory the operation was on.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A record inside the log (not a torn tail, which open repairs) is
    /// damaged.
    #[error(
        "corrupt record in {} at byte {position}: {reason}; the log is damaged before its tail: restore the topic directory from a backup, or move this segment and all later ones out of the directory to keep the records before it",
        path.display()
    )]
    Corrupt {
        /// Segment file holding the bad record.
        path: PathBuf,
        /// Byte position of the bad record in that file.
        position: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A record of the batch is larger than a frame may be.
    #[error(
        "record {index} of the batch is {len} bytes, over the {max}-byte limit of a log record; split it, or store it elsewhere and publish a reference"
    )]
    RecordTooLarge {
        /// Index of the record in the batch.
        index: usize,
        /// Its size in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An earlier write or sync failed; the writer refuses further work.
    #[error(
        "the writer of topic log {} stopped after an earlier failure ({reason}); records not yet synced may be lost: drop this TopicLog and open it again to recover from what is on disk",
        path.display()
    )]
    WriterFailed {
        /// The log directory.
        path: PathBuf,
        /// The first failure.
        reason: String,
    },
    /// Another open [`TopicLog`] holds the directory.
    #[error(
        "topic log {} is already open (in this or another process); close that TopicLog first: two writers would corrupt the log",
        path.display()
    )]
    Locked {
        /// The log directory.
        path: PathBuf,
    },
}

/// One record read from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// The record's offset: its position in the topic, from 0, consecutive.
    pub offset: u64,
    /// Milliseconds since the Unix epoch given to [`TopicLog::append_batch`].
    pub append_time_ms: u64,
    /// The opaque payload (a slice of the reader's chunk, no copy).
    pub payload: Bytes,
}

/// The durable log of one topic: segment files in one directory.
///
/// Cheap to clone (an `Arc` inside); `Send + Sync`. Appending and syncing are
/// meant for one writer thread at a time; a mutex serialises them anyway, so
/// concurrent calls are safe, only not useful. Reading goes through
/// [`LogReader`]s, which never take that mutex.
#[derive(Clone)]
pub struct TopicLog {
    shared: Arc<Shared>,
}

struct Shared {
    dir: PathBuf,
    cfg: SegmentConfig,
    /// Ordered by base offset; never empty; the last one is active.
    segments: RwLock<Vec<Arc<Segment>>>,
    /// One past the last offset readers may see.
    durable_end: AtomicU64,
    writer: Mutex<Writer>,
    /// Open handle on the directory, to fsync it after creating or removing
    /// segment files.
    dir_file: File,
    /// Holds the advisory lock on `<dir>/LOCK` while the log is open.
    _lock: File,
}

struct Segment {
    base: u64,
    path: PathBuf,
    file: File,
    /// Bytes written (updated by the writer only).
    size: AtomicU64,
    /// Bytes readers may read: whole records, all below the durable end.
    durable_len: AtomicU64,
    /// Set when retention deleted the file; readers then move on.
    removed: AtomicBool,
    index: RwLock<SparseIndex>,
}

/// `(offset, byte position)` pairs, ascending. `(base, 0)` is implicit.
struct SparseIndex {
    entries: Vec<(u64, u64)>,
    /// Whether the entries cover the whole segment (false only for closed
    /// segments found on open and not yet scanned).
    complete: bool,
}

struct Writer {
    active: Arc<Segment>,
    next_offset: u64,
    /// Encode buffer, reused across batches: one write() per batch.
    buf: Vec<u8>,
    /// Byte position of the active segment's newest index entry.
    last_index_pos: u64,
    active_unsynced: bool,
    dir_unsynced: bool,
    /// Segments written since the last publication of the durable end.
    unpublished: Vec<Arc<Segment>>,
    /// Set by a failed write or sync; the writer then refuses work.
    failed: Option<String>,
}

impl TopicLog {
    /// Opens (or creates) the log in `dir` and repairs a torn tail.
    ///
    /// Creates `dir` if missing, takes its lock, lists the segment files,
    /// validates the last segment record by record and truncates anything
    /// after the last good record. Everything recovered counts as durable.
    ///
    /// The directory stays locked ([`LogError::Locked`] for a second open)
    /// until this `TopicLog`, its clones and its readers are all dropped.
    /// Each segment file stays open (one descriptor per segment).
    pub fn open(dir: &Path, cfg: SegmentConfig) -> Result<(TopicLog, RecoveryReport), LogError> {
        if !dir.is_dir() {
            fs::create_dir_all(dir).map_err(io_at(dir))?;
            // Make the new directory's own entry durable too.
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                File::open(parent)
                    .and_then(|p| p.sync_all())
                    .map_err(io_at(parent))?;
            }
        }
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_at(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(LogError::Locked {
                    path: dir.to_path_buf(),
                });
            }
            Err(TryLockError::Error(source)) => {
                return Err(LogError::Io {
                    path: lock_path,
                    source,
                });
            }
        }
        let dir_file = File::open(dir).map_err(io_at(dir))?;

        let mut bases = list_segments(dir)?;
        if bases.is_empty() {
            let path = segment_path(dir, 0);
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(io_at(&path))?;
            dir_file.sync_all().map_err(io_at(dir))?;
            bases.push(0);
        }

        let mut report = RecoveryReport::default();
        let mut segments = Vec::with_capacity(bases.len());
        let last = bases.len() - 1;
        for &base in &bases[..last] {
            let path = segment_path(dir, base);
            let file = File::open(&path).map_err(io_at(&path))?;
            let size = file.metadata().map_err(io_at(&path))?.len();
            // Closed: trusted, offsets known from the next name, index lazy.
            segments.push(Arc::new(Segment::new(
                base,
                path,
                file,
                size,
                Vec::new(),
                false,
            )));
        }

        let base = bases[last];
        let path = segment_path(dir, base);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_at(&path))?;
        let file_len = file.metadata().map_err(io_at(&path))?.len();
        let scan = scan_segment(&file, &path, base, file_len)?;
        if let Some(reason) = &scan.stop {
            let truncated = file_len - scan.valid_len;
            tracing::warn!(
                path = %path.display(),
                position = scan.valid_len,
                truncated_bytes = truncated,
                %reason,
                "topic log: cutting back a torn or corrupt tail to the last good record"
            );
            file.set_len(scan.valid_len).map_err(io_at(&path))?;
            file.sync_all().map_err(io_at(&path))?;
            report.truncated_bytes = truncated;
            report.corrupt_at = Some((path.clone(), scan.valid_len));
        }
        let active = Arc::new(Segment::new(
            base,
            path,
            file,
            scan.valid_len,
            scan.entries,
            true,
        ));
        segments.push(active.clone());

        let end = scan.next_offset;
        let start = segments.first().map_or(end, |s| s.base);
        report.segments = segments.len();
        report.records = end - start;
        tracing::debug!(dir = %dir.display(), segments = report.segments, start, end, "topic log opened");

        let writer = Writer {
            active,
            next_offset: end,
            buf: Vec::new(),
            last_index_pos: scan.last_index_pos,
            active_unsynced: false,
            dir_unsynced: false,
            unpublished: Vec::new(),
            failed: None,
        };
        let shared = Shared {
            dir: dir.to_path_buf(),
            cfg,
            segments: RwLock::new(segments),
            durable_end: AtomicU64::new(end),
            writer: Mutex::new(writer),
            dir_file,
            _lock: lock,
        };
        Ok((
            TopicLog {
                shared: Arc::new(shared),
            },
            report,
        ))
    }

    /// Appends `records` with consecutive offsets and returns their range.
    ///
    /// Encodes the whole batch into one buffer and writes it with one
    /// positional write. Rolls to a new segment first if the active one is
    /// full. The records are not durable (nor visible to readers) until
    /// [`sync`](Self::sync) or [`mark_durable_without_sync`](Self::mark_durable_without_sync).
    /// An empty batch returns an empty range at the end.
    pub fn append_batch(
        &self,
        records: &[&[u8]],
        append_time_ms: u64,
    ) -> Result<Range<u64>, LogError> {
        let mut guard = self.writer()?;
        let w = &mut *guard;
        if records.is_empty() {
            return Ok(w.next_offset..w.next_offset);
        }
        if let Some((index, r)) = records
            .iter()
            .enumerate()
            .find(|(_, r)| r.len() > MAX_RECORD_BYTES)
        {
            return Err(LogError::RecordTooLarge {
                index,
                len: r.len(),
                max: MAX_RECORD_BYTES,
            });
        }
        let size = w.active.size.load(Ordering::Relaxed);
        if size > 0 && size >= self.shared.cfg.segment_bytes {
            self.roll(w)?;
        }

        let seg = w.active.clone();
        let start_pos = seg.size.load(Ordering::Relaxed);
        let first = w.next_offset;
        let total: usize = records.iter().map(|r| segment::encoded_len(r.len())).sum();
        w.buf.clear();
        w.buf.reserve(total);
        let last_index_pos = w.last_index_pos;
        let mut new_entries = Vec::new();
        for (offset, record) in (first..).zip(records) {
            let pos = start_pos + w.buf.len() as u64;
            if pos - w.last_index_pos >= INDEX_INTERVAL {
                new_entries.push((offset, pos));
                w.last_index_pos = pos;
            }
            segment::encode_into(&mut w.buf, offset, append_time_ms, record);
        }

        if let Err(source) = seg.file.write_all_at(&w.buf, start_pos) {
            w.last_index_pos = last_index_pos;
            // Cut off whatever part of the batch reached the file; if even
            // that fails, the tail is unknown and the writer stops.
            if let Err(e) = seg.file.set_len(start_pos) {
                w.failed = Some(format!(
                    "write failed ({source}), then truncate failed ({e})"
                ));
            }
            return Err(LogError::Io {
                path: seg.path.clone(),
                source,
            });
        }
        let written = w.buf.len() as u64;
        if w.buf.capacity() > MAX_KEPT_WRITE_BUFFER {
            w.buf = Vec::new();
        }
        seg.size.store(start_pos + written, Ordering::Release);
        if !new_entries.is_empty() {
            write_lock(&seg.index).entries.extend(new_entries);
        }
        let count = records.len() as u64;
        w.next_offset = first + count;
        w.active_unsynced = true;
        if !w.unpublished.last().is_some_and(|s| Arc::ptr_eq(s, &seg)) {
            w.unpublished.push(seg);
        }
        Ok(first..first + count)
    }

    /// Makes everything appended so far durable, then visible to readers.
    ///
    /// One `fdatasync` of the active segment (the segments closed by a roll
    /// were synced at the roll), plus an `fsync` of the directory if a segment
    /// file was created since the last sync. Cheap when nothing was appended.
    pub fn sync(&self) -> Result<(), LogError> {
        let mut guard = self.writer()?;
        let w = &mut *guard;
        if w.active_unsynced {
            if let Err(source) = w.active.file.sync_data() {
                w.failed = Some(format!(
                    "fdatasync of {} failed: {source}",
                    w.active.path.display()
                ));
                return Err(LogError::Io {
                    path: w.active.path.clone(),
                    source,
                });
            }
            w.active_unsynced = false;
        }
        if w.dir_unsynced {
            if let Err(source) = self.shared.dir_file.sync_all() {
                w.failed = Some(format!("fsync of the directory failed: {source}"));
                return Err(LogError::Io {
                    path: self.shared.dir.clone(),
                    source,
                });
            }
            w.dir_unsynced = false;
        }
        self.publish(w);
        Ok(())
    }

    /// Makes everything appended so far visible to readers without syncing.
    ///
    /// For the "buffered" durability mode: the writer calls [`sync`](Self::sync)
    /// later on a timer. Records readers saw can be lost in a power failure
    /// (not in a process crash: they are in the page cache). Does nothing
    /// after a writer failure (the next `sync` reports it).
    pub fn mark_durable_without_sync(&self) {
        let mut guard = self.writer_state();
        if guard.failed.is_none() {
            self.publish(&mut guard);
        }
    }

    /// One past the last offset readers may see.
    pub fn durable_end(&self) -> u64 {
        self.shared.durable_end.load(Ordering::Acquire)
    }

    /// One past the last offset appended, durable or not (the offset the
    /// next appended record gets).
    pub fn written_end(&self) -> u64 {
        self.writer_state().next_offset
    }

    /// First offset still in the log (retention removes older ones).
    pub fn start_offset(&self) -> u64 {
        self.shared.start_offset()
    }

    /// A reader positioned at `max(from, start_offset)`.
    pub fn reader(&self, from: u64) -> LogReader {
        LogReader::new(self.shared.clone(), from.max(self.start_offset()))
    }

    /// Retention: deletes every closed segment whose records are all below
    /// `offset` (and durable), never the active one. Returns how many records
    /// were removed.
    ///
    /// Safe with concurrent readers: one positioned in a removed segment
    /// jumps forward to the new [`start_offset`](Self::start_offset) on its
    /// next read, so pass an offset every consumer has finished with.
    pub fn remove_before(&self, offset: u64) -> Result<u64, LogError> {
        let limit = offset.min(self.durable_end());
        let mut segments = write_lock(&self.shared.segments);
        let mut remove = 0;
        let mut reclaimed = 0;
        let mut result = Ok(());
        while let (Some(seg), Some(next)) = (segments.get(remove), segments.get(remove + 1)) {
            if next.base > limit {
                break;
            }
            if let Err(e) = fs::remove_file(&seg.path) {
                result = Err(LogError::Io {
                    path: seg.path.clone(),
                    source: e,
                });
                break;
            }
            seg.removed.store(true, Ordering::Release);
            reclaimed += next.base - seg.base;
            remove += 1;
        }
        segments.drain(..remove);
        let start = segments.first().map_or(0, |s| s.base);
        drop(segments);
        if remove > 0 {
            tracing::info!(
                dir = %self.shared.dir.display(),
                segments = remove,
                records = reclaimed,
                start,
                "topic log: removed segments below the retention point"
            );
            self.shared
                .dir_file
                .sync_all()
                .map_err(io_at(&self.shared.dir))?;
        }
        result.map(|()| reclaimed)
    }

    /// Bytes of all segment files (including not yet synced appends).
    pub fn disk_bytes(&self) -> u64 {
        read_lock(&self.shared.segments)
            .iter()
            .map(|s| s.size.load(Ordering::Relaxed))
            .sum()
    }

    /// Calls `f(offset, append_time_ms, payload)` for each durable record
    /// appended at or after `since_ms`, in offset order.
    ///
    /// Used to rebuild the publisher dedup window on open. It starts at the
    /// newest segment whose first record is older than `since_ms` (found from
    /// one header read per segment), so it assumes append times that do not
    /// go backwards across segments; records in that segment before
    /// `since_ms` are read and skipped.
    pub fn scan_recent(
        &self,
        since_ms: u64,
        mut f: impl FnMut(u64, u64, &[u8]),
    ) -> Result<(), LogError> {
        let end = self.durable_end();
        let segments: Vec<Arc<Segment>> = read_lock(&self.shared.segments).clone();
        let mut from = segments.first().map_or(0, |s| s.base);
        for seg in segments.iter().rev() {
            if seg.first_append_time()?.is_some_and(|t| t < since_ms) {
                from = seg.base;
                break;
            }
        }
        drop(segments);
        let mut reader = self.reader(from);
        loop {
            let batch = reader.read_until(4096, CHUNK, end)?;
            if batch.is_empty() {
                return Ok(());
            }
            for r in &batch {
                if r.append_time_ms >= since_ms {
                    f(r.offset, r.append_time_ms, &r.payload);
                }
            }
        }
    }

    /// Locks the writer state. A panic while it was held (the tail may be
    /// half-updated) counts as a writer failure.
    fn writer_state(&self) -> MutexGuard<'_, Writer> {
        self.shared.writer.lock().unwrap_or_else(|poisoned| {
            let mut guard = poisoned.into_inner();
            if guard.failed.is_none() {
                guard.failed = Some("a thread panicked while appending or syncing".to_owned());
            }
            guard
        })
    }

    /// Locks the writer state, refusing work after an earlier failure.
    fn writer(&self) -> Result<MutexGuard<'_, Writer>, LogError> {
        let guard = self.writer_state();
        match &guard.failed {
            None => Ok(guard),
            Some(reason) => Err(LogError::WriterFailed {
                path: self.shared.dir.clone(),
                reason: reason.clone(),
            }),
        }
    }

    /// Closes the active segment and starts a new one at `next_offset`.
    fn roll(&self, w: &mut Writer) -> Result<(), LogError> {
        if w.active_unsynced {
            // Keep "every segment but the last is complete on disk" true.
            if let Err(source) = w.active.file.sync_data() {
                w.failed = Some(format!(
                    "fdatasync of {} failed: {source}",
                    w.active.path.display()
                ));
                return Err(LogError::Io {
                    path: w.active.path.clone(),
                    source,
                });
            }
            w.active_unsynced = false;
        }
        let base = w.next_offset;
        let path = segment_path(&self.shared.dir, base);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_at(&path))?;
        let seg = Arc::new(Segment::new(base, path, file, 0, Vec::new(), true));
        write_lock(&self.shared.segments).push(seg.clone());
        tracing::debug!(path = %seg.path.display(), "topic log: rolled to a new segment");
        w.active = seg;
        w.last_index_pos = 0;
        w.dir_unsynced = true;
        Ok(())
    }

    /// Lets readers see everything written: segment byte lengths first,
    /// then the end offset (readers load them in the opposite order).
    fn publish(&self, w: &mut Writer) {
        for seg in w.unpublished.drain(..) {
            seg.durable_len
                .store(seg.size.load(Ordering::Relaxed), Ordering::Release);
        }
        self.shared
            .durable_end
            .store(w.next_offset, Ordering::Release);
    }
}

impl std::fmt::Debug for TopicLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicLog")
            .field("dir", &self.shared.dir)
            .field("start_offset", &self.start_offset())
            .field("durable_end", &self.durable_end())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for LogReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogReader")
            .field("dir", &self.shared.dir)
            .field("position", &self.position)
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn start_offset(&self) -> u64 {
        read_lock(&self.segments).first().map_or(0, |s| s.base)
    }
}

impl Segment {
    fn new(
        base: u64,
        path: PathBuf,
        file: File,
        size: u64,
        entries: Vec<(u64, u64)>,
        complete: bool,
    ) -> Segment {
        Segment {
            base,
            path,
            file,
            size: AtomicU64::new(size),
            durable_len: AtomicU64::new(size),
            removed: AtomicBool::new(false),
            index: RwLock::new(SparseIndex { entries, complete }),
        }
    }

    /// Byte position of a record at or before `offset`, from which a reader
    /// skips forward to `offset`. Builds the index on first use for a closed
    /// segment found on open.
    fn position_for(&self, offset: u64) -> Result<u64, LogError> {
        if offset <= self.base {
            return Ok(0);
        }
        {
            let index = read_lock(&self.index);
            if index.complete {
                return Ok(index.lookup(offset));
            }
        }
        let mut index = write_lock(&self.index);
        if !index.complete {
            let len = self.durable_len.load(Ordering::Acquire);
            let scan = scan_segment(&self.file, &self.path, self.base, len)?;
            index.entries = scan.entries;
            index.complete = true;
        }
        Ok(index.lookup(offset))
    }

    /// Append time of the first record, read from its header alone.
    fn first_append_time(&self) -> Result<Option<u64>, LogError> {
        if self.durable_len.load(Ordering::Acquire) < segment::HEADER_LEN as u64 {
            return Ok(None);
        }
        let mut header = [0u8; segment::HEADER_LEN];
        self.file
            .read_exact_at(&mut header, 0)
            .map_err(io_at(&self.path))?;
        Ok(segment::peek_append_time(&header))
    }
}

impl SparseIndex {
    fn lookup(&self, offset: u64) -> u64 {
        let i = self.entries.partition_point(|&(o, _)| o <= offset);
        i.checked_sub(1).map_or(0, |i| self.entries[i].1)
    }
}

/// Reads a topic log from a position, in offset order, up to the durable end.
///
/// Each reader has its own position and chunk buffer; `Send`, so it can move
/// into a task or thread. Reads are blocking file reads (from the page cache
/// in the common case); call them from a blocking context in async code if
/// that matters.
pub struct LogReader {
    shared: Arc<Shared>,
    position: u64,
    /// Segment being read; `None` until positioned (after `seek`).
    seg: Option<Arc<Segment>>,
    /// Bytes of `seg` from `chunk_file_pos`.
    chunk: Bytes,
    chunk_file_pos: u64,
    /// Index in `chunk` of the next frame to decode.
    chunk_at: usize,
    /// Allocation for the next chunk, reclaimed when the previous chunk's
    /// payloads have all been dropped.
    spare: BytesMut,
}

impl LogReader {
    fn new(shared: Arc<Shared>, position: u64) -> LogReader {
        LogReader {
            shared,
            position,
            seg: None,
            chunk: Bytes::new(),
            chunk_file_pos: 0,
            chunk_at: 0,
            spare: BytesMut::new(),
        }
    }

    /// Offset of the next record [`read`](Self::read) returns.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Moves to `offset`. An offset before the log's start reads from the
    /// start (the position moves there on the next read); one past the
    /// durable end waits there until records arrive.
    pub fn seek(&mut self, offset: u64) {
        if offset != self.position || self.seg.is_none() {
            self.position = offset;
            self.seg = None;
            self.chunk = Bytes::new();
            self.chunk_at = 0;
        }
    }

    /// Next records from the position, at most `max_records` and about
    /// `max_bytes` of payload (always at least one record, however large);
    /// empty when caught up with the durable end.
    ///
    /// A record that fails its checksum is [`LogError::Corrupt`]; records
    /// before it are returned first, and the position stays at the bad one.
    pub fn read(
        &mut self,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<LogRecord>, LogError> {
        self.read_until(max_records, max_bytes, u64::MAX)
    }

    fn read_until(
        &mut self,
        max_records: usize,
        max_bytes: usize,
        limit: u64,
    ) -> Result<Vec<LogRecord>, LogError> {
        let end = self.shared.durable_end.load(Ordering::Acquire).min(limit);
        let mut out = Vec::new();
        if self.position >= end || max_records == 0 {
            return Ok(out);
        }
        // On an error after some records, deliver those; the error recurs
        // on the next call, since the position stays at the failing record.
        match self.read_into(&mut out, max_records, max_bytes, end) {
            Err(e) if out.is_empty() => Err(e),
            _ => Ok(out),
        }
    }

    fn read_into(
        &mut self,
        out: &mut Vec<LogRecord>,
        max_records: usize,
        max_bytes: usize,
        end: u64,
    ) -> Result<(), LogError> {
        if self
            .seg
            .as_ref()
            .is_none_or(|s| s.removed.load(Ordering::Acquire))
        {
            self.locate()?;
        }
        out.reserve(max_records.min(1024));
        let mut bytes = 0usize;
        while out.len() < max_records && self.position < end {
            match segment::decode(&self.chunk[self.chunk_at..]) {
                Decoded::Complete(frame, used) => {
                    let (offset, time, len) =
                        (frame.offset, frame.append_time_ms, frame.payload.len());
                    if offset < self.position {
                        // Skipping from a sparse index entry to the target.
                        self.chunk_at += used;
                        continue;
                    }
                    if offset != self.position {
                        return Err(self.corrupt(format!(
                            "expected offset {} but found {offset}",
                            self.position
                        )));
                    }
                    if !out.is_empty() && bytes + len > max_bytes {
                        break;
                    }
                    let payload_start = self.chunk_at + segment::HEADER_LEN;
                    out.push(LogRecord {
                        offset,
                        append_time_ms: time,
                        payload: self.chunk.slice(payload_start..self.chunk_at + used),
                    });
                    bytes += len;
                    self.position += 1;
                    self.chunk_at += used;
                }
                Decoded::Incomplete => self.refill()?,
                Decoded::Corrupt(kind) => return Err(self.corrupt(kind.to_string())),
            }
        }
        Ok(())
    }

    /// Positions at the segment and index entry for `position`, jumping
    /// forward to the start of the log if the position was removed.
    fn locate(&mut self) -> Result<(), LogError> {
        let seg = {
            let segments = read_lock(&self.shared.segments);
            let start = segments.first().map_or(0, |s| s.base);
            self.position = self.position.max(start);
            let i = segments.partition_point(|s| s.base <= self.position);
            segments.get(i.saturating_sub(1)).cloned()
        };
        let Some(seg) = seg else {
            return Err(LogError::Corrupt {
                path: self.shared.dir.clone(),
                position: 0,
                reason: "the log has no segment files".to_owned(),
            });
        };
        self.chunk_file_pos = seg.position_for(self.position)?;
        self.chunk = Bytes::new();
        self.chunk_at = 0;
        self.seg = Some(seg);
        Ok(())
    }

    /// Reads the next chunk of the current segment from the next frame's
    /// position, or moves to the next segment when this one is exhausted.
    /// Only called while `position` is below the durable end.
    fn refill(&mut self) -> Result<(), LogError> {
        let Some(seg) = self.seg.clone() else {
            return self.locate();
        };
        if seg.removed.load(Ordering::Acquire) {
            return self.locate();
        }
        let file_pos = self.chunk_file_pos + self.chunk_at as u64;
        let durable_len = seg.durable_len.load(Ordering::Acquire);
        if file_pos >= durable_len {
            let next_base = {
                let segments = read_lock(&self.shared.segments);
                segments.iter().find(|s| s.base > seg.base).map(|s| s.base)
            };
            return match next_base {
                Some(next) if next <= self.position => self.locate(),
                Some(next) => Err(self.corrupt(format!(
                    "segment ends before offset {} but the next segment starts at {next}: records are missing",
                    self.position
                ))),
                None => Err(self.corrupt(format!(
                    "segment ends before offset {}, below the durable end",
                    self.position
                ))),
            };
        }
        let leftover = self.chunk.len() - self.chunk_at;
        let need = segment::frame_len(&self.chunk[self.chunk_at..]).unwrap_or(0);
        let want = need.max(CHUNK).min((durable_len - file_pos) as usize);
        if want <= leftover {
            return Err(self.corrupt(format!(
                "record extends past the segment's durable length {durable_len}"
            )));
        }
        self.spare.clear();
        self.spare.reserve(want);
        self.spare.resize(want, 0);
        seg.file
            .read_exact_at(&mut self.spare, file_pos)
            .map_err(io_at(&seg.path))?;
        self.chunk = self.spare.split().freeze();
        self.chunk_file_pos = file_pos;
        self.chunk_at = 0;
        Ok(())
    }

    fn corrupt(&self, reason: String) -> LogError {
        LogError::Corrupt {
            path: self
                .seg
                .as_ref()
                .map_or_else(|| self.shared.dir.clone(), |s| s.path.clone()),
            position: self.chunk_file_pos + self.chunk_at as u64,
            reason,
        }
    }

    #[cfg(test)]
    fn buffered_bytes(&self) -> usize {
        self.chunk.len().max(self.spare.capacity())
    }
}

/// Result of validating a segment from its start.
struct Scan {
    /// Bytes of whole, valid records from the start.
    valid_len: u64,
    /// Offset after the last valid record.
    next_offset: u64,
    /// Why the scan stopped before the end, if it did.
    stop: Option<String>,
    entries: Vec<(u64, u64)>,
    last_index_pos: u64,
}

/// Reads `len` bytes of a segment in chunks, checking every frame and that
/// offsets count up from `base`, and builds the sparse index on the way.
/// A checksum-valid frame with the wrong offset is an error, not a stop.
fn scan_segment(file: &File, path: &Path, base: u64, len: u64) -> Result<Scan, LogError> {
    let mut scan = Scan {
        valid_len: 0,
        next_offset: base,
        stop: None,
        entries: Vec::new(),
        last_index_pos: 0,
    };
    let mut buf = Vec::new();
    let mut want = CHUNK;
    while scan.valid_len < len {
        let buf_pos = scan.valid_len;
        let n = want.min((len - buf_pos) as usize);
        buf.resize(n, 0);
        file.read_exact_at(&mut buf, buf_pos).map_err(io_at(path))?;
        let mut at = 0;
        loop {
            let pos = buf_pos + at as u64;
            match segment::decode(&buf[at..]) {
                Decoded::Complete(frame, used) => {
                    if frame.offset != scan.next_offset {
                        return Err(LogError::Corrupt {
                            path: path.to_path_buf(),
                            position: pos,
                            reason: format!(
                                "checksum-valid record has offset {} where {} was expected (not truncating it)",
                                frame.offset, scan.next_offset
                            ),
                        });
                    }
                    if pos - scan.last_index_pos >= INDEX_INTERVAL {
                        scan.entries.push((frame.offset, pos));
                        scan.last_index_pos = pos;
                    }
                    scan.next_offset += 1;
                    at += used;
                    scan.valid_len = pos + used as u64;
                }
                Decoded::Incomplete => {
                    if pos == len {
                        return Ok(scan);
                    }
                    if buf_pos + buf.len() as u64 >= len {
                        scan.stop = Some(format!(
                            "incomplete record at the end of the file ({} of its bytes present)",
                            len - pos
                        ));
                        return Ok(scan);
                    }
                    want = segment::frame_len(&buf[at..]).unwrap_or(0).max(CHUNK);
                    break;
                }
                Decoded::Corrupt(kind) => {
                    scan.stop = Some(kind.to_string());
                    return Ok(scan);
                }
            }
        }
    }
    Ok(scan)
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:0NAME_DIGITS$}{SEGMENT_SUFFIX}"))
}

/// Base offsets of the segment files in `dir`, ascending. Other files are
/// ignored.
fn list_segments(dir: &Path) -> Result<Vec<u64>, LogError> {
    let mut bases = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_at(dir))? {
        let entry = entry.map_err(io_at(dir))?;
        let name = entry.file_name();
        let base = name
            .to_str()
            .and_then(|n| n.strip_suffix(SEGMENT_SUFFIX))
            .filter(|digits| {
                digits.len() == NAME_DIGITS && digits.bytes().all(|b| b.is_ascii_digit())
            })
            .and_then(|digits| digits.parse::<u64>().ok());
        match base {
            Some(base) => bases.push(base),
            None => {
                tracing::debug!(file = ?name, "topic log: ignoring a file that is not a segment")
            }
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

// A panic while holding one of these locks leaves consistent data (every
// update under them is a single push, drain or assignment), so poisoning is
// ignored. The writer mutex is different: see `TopicLog::writer_state`.
fn read_lock<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write_lock<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    const FRAME_100: u64 = (segment::HEADER_LEN + 100) as u64;

    fn payload(i: u64, len: usize) -> Vec<u8> {
        (0..len).map(|j| (i as usize * 31 + j * 7) as u8).collect()
    }

    fn open(dir: &Path, segment_bytes: u64) -> (TopicLog, RecoveryReport) {
        TopicLog::open(dir, SegmentConfig { segment_bytes }).unwrap()
    }

    /// Appends records `from..from + n` (payload `payload(i, len)`) in
    /// batches of `batch`, syncing each batch; batch `b` gets time `b`.
    fn append(log: &TopicLog, from: u64, n: u64, batch: u64, len: usize) {
        let mut i = from;
        while i < from + n {
            let end = (i + batch).min(from + n);
            let payloads: Vec<Vec<u8>> = (i..end).map(|k| payload(k, len)).collect();
            let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            let range = log.append_batch(&refs, i / batch).unwrap();
            assert_eq!(range, i..end);
            log.sync().unwrap();
            i = end;
        }
    }

    fn read_all(log: &TopicLog, from: u64) -> Vec<LogRecord> {
        let mut reader = log.reader(from);
        let mut out = Vec::new();
        loop {
            let batch = reader.read(500, 1 << 20).unwrap();
            if batch.is_empty() {
                return out;
            }
            out.extend(batch);
        }
    }

    fn check(records: &[LogRecord], offsets: Range<u64>, len: usize) {
        assert_eq!(records.len() as u64, offsets.end - offsets.start);
        for (r, i) in records.iter().zip(offsets) {
            assert_eq!(r.offset, i);
            assert_eq!(r.payload.as_ref(), payload(i, len).as_slice(), "offset {i}");
        }
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        files.sort();
        files
    }

    fn base_of(path: &Path) -> u64 {
        path.file_stem().unwrap().to_str().unwrap().parse().unwrap()
    }

    #[test]
    fn handles_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<TopicLog>();
        send::<LogReader>();
        send_sync::<LogError>();
    }

    #[test]
    fn open_creates_missing_directories() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b/topic");
        let (log, report) = open(&nested, 1 << 20);
        assert_eq!(report.segments, 1);
        append(&log, 0, 3, 3, 10);
        assert!(format!("{log:?}").contains("durable_end: 3"));
        assert_eq!(segment_files(&nested).len(), 1);
    }

    #[test]
    fn roundtrip_across_segment_rolls() {
        let dir = tempfile::tempdir().unwrap();
        let (log, report) = open(dir.path(), 8 * 1024);
        assert_eq!(
            report,
            RecoveryReport {
                segments: 1,
                ..Default::default()
            }
        );
        append(&log, 0, 2000, 37, 100);
        assert_eq!(log.durable_end(), 2000);
        assert_eq!(log.written_end(), 2000);
        assert_eq!(log.start_offset(), 0);

        let records = read_all(&log, 0);
        check(&records, 0..2000, 100);
        assert!(records.iter().all(|r| r.append_time_ms == r.offset / 37));

        let files = segment_files(dir.path());
        assert!(files.len() > 10, "{} segments", files.len());
        let on_disk: u64 = files.iter().map(|f| fs::metadata(f).unwrap().len()).sum();
        assert_eq!(log.disk_bytes(), on_disk);
        assert_eq!(on_disk, 2000 * FRAME_100);
        // A batch is never split, and a segment is only rolled once full.
        for pair in files.windows(2) {
            let (first, next) = (base_of(&pair[0]), base_of(&pair[1]));
            assert_eq!(first % 37, 0);
            assert!(fs::metadata(&pair[0]).unwrap().len() >= 8 * 1024);
            assert_eq!(
                fs::metadata(&pair[0]).unwrap().len(),
                (next - first) * FRAME_100
            );
        }
    }

    #[test]
    fn empty_batch_and_oversized_record() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = open(dir.path(), 1 << 20);
        assert_eq!(log.append_batch(&[], 1).unwrap(), 0..0);
        append(&log, 0, 3, 3, 10);
        assert_eq!(log.append_batch(&[], 1).unwrap(), 3..3);
        let big = vec![0u8; MAX_RECORD_BYTES + 1];
        let err = log.append_batch(&[b"ok", &big], 1).unwrap_err();
        assert!(
            matches!(err, LogError::RecordTooLarge { index: 1, .. }),
            "{err}"
        );
        // Nothing of the rejected batch was written.
        assert_eq!(log.append_batch(&[b"next"], 1).unwrap(), 3..4);
    }

    #[test]
    fn records_larger_than_the_read_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let sizes = [10, CHUNK - 30, CHUNK, 3 * CHUNK + 5, 0, 1 << 20, 7];
        {
            let (log, _) = open(dir.path(), 1 << 20);
            for (i, &len) in sizes.iter().enumerate() {
                log.append_batch(&[&payload(i as u64, len)], 0).unwrap();
            }
            log.sync().unwrap();
            let mut reader = log.reader(0);
            for (i, &len) in sizes.iter().enumerate() {
                let got = reader.read(1, 1).unwrap();
                check(&got, i as u64..i as u64 + 1, len);
            }
            assert!(reader.read(10, 10).unwrap().is_empty());
        }
        let (log, report) = open(dir.path(), 1 << 20);
        assert_eq!(report.records, sizes.len() as u64);
        assert_eq!(report.truncated_bytes, 0);
        let records = read_all(&log, 0);
        for (r, &len) in records.iter().zip(&sizes) {
            assert_eq!(r.payload.as_ref(), payload(r.offset, len).as_slice());
        }
    }

    #[test]
    fn reopen_preserves_offsets_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (log, _) = open(dir.path(), 4 * 1024);
            append(&log, 0, 500, 20, 100);
        }
        fs::write(dir.path().join("notes.txt"), b"not a segment").unwrap();
        let segments = segment_files(dir.path()).len();
        let (log, report) = open(dir.path(), 4 * 1024);
        assert_eq!(
            report,
            RecoveryReport {
                segments,
                records: 500,
                truncated_bytes: 0,
                corrupt_at: None
            }
        );
        assert_eq!(log.durable_end(), 500);
        assert_eq!(log.written_end(), 500);
        append(&log, 500, 10, 10, 100);
        check(&read_all(&log, 0), 0..510, 100);
    }

    #[test]
    fn second_open_is_refused_while_the_first_is_alive() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = open(dir.path(), 1 << 20);
        let reader = log.reader(0);
        let err = TopicLog::open(dir.path(), SegmentConfig::default())
            .err()
            .unwrap();
        assert!(matches!(err, LogError::Locked { .. }), "{err}");
        drop(log);
        drop(reader);
        open(dir.path(), 1 << 20);
    }

    /// Writes 3 segments of 40 records each (100-byte payloads), damages the
    /// last segment file, reopens, and checks the earlier records survived.
    fn damaged_tail(damage: impl FnOnce(&Path)) -> (tempfile::TempDir, TopicLog, RecoveryReport) {
        let dir = tempfile::tempdir().unwrap();
        let segment_bytes = 40 * FRAME_100;
        {
            let (log, _) = open(dir.path(), segment_bytes);
            append(&log, 0, 120, 40, 100);
        }
        let files = segment_files(dir.path());
        assert_eq!(files.len(), 3);
        damage(&files[2]);
        let (log, report) = open(dir.path(), segment_bytes);
        assert_eq!(report.segments, 3);
        (dir, log, report)
    }

    fn assert_cut_at(dir: &Path, report: &RecoveryReport, records: u64) {
        let last = segment_files(dir)[2].clone();
        assert_eq!(report.records, records);
        assert_eq!(
            report.corrupt_at,
            Some((last.clone(), (records - 80) * FRAME_100))
        );
        assert_eq!(
            fs::metadata(&last).unwrap().len(),
            (records - 80) * FRAME_100
        );
    }

    #[test]
    fn torn_tail_truncated_mid_record_is_cut_back() {
        let (dir, log, report) = damaged_tail(|last| {
            let file = OpenOptions::new().write(true).open(last).unwrap();
            file.set_len(40 * FRAME_100 - 50).unwrap();
        });
        assert_cut_at(dir.path(), &report, 119);
        assert_eq!(report.truncated_bytes, FRAME_100 - 50);
        assert_eq!(log.durable_end(), 119);
        check(&read_all(&log, 0), 0..119, 100);

        // Appends continue at the right offset, and the next open is clean.
        append(&log, 119, 30, 10, 100);
        check(&read_all(&log, 0), 0..149, 100);
        drop(log);
        let (log, report) = open(dir.path(), 40 * FRAME_100);
        assert_eq!(report.truncated_bytes, 0);
        assert_eq!(report.records, 149);
        check(&read_all(&log, 0), 0..149, 100);
    }

    #[test]
    fn garbage_after_the_last_record_is_cut_back() {
        let (dir, log, report) = damaged_tail(|last| {
            let mut bytes = fs::read(last).unwrap();
            bytes.extend((0..1000u32).map(|i| (i % 251) as u8 | 1));
            fs::write(last, bytes).unwrap();
        });
        assert_cut_at(dir.path(), &report, 120);
        assert_eq!(report.truncated_bytes, 1000);
        check(&read_all(&log, 0), 0..120, 100);
        append(&log, 120, 5, 5, 100);
        check(&read_all(&log, 100), 100..125, 100);
    }

    #[test]
    fn zero_filled_tail_is_cut_back() {
        let (dir, log, report) = damaged_tail(|last| {
            let file = OpenOptions::new().write(true).open(last).unwrap();
            file.set_len(40 * FRAME_100 + 4096).unwrap();
        });
        assert_cut_at(dir.path(), &report, 120);
        assert_eq!(report.truncated_bytes, 4096);
        check(&read_all(&log, 0), 0..120, 100);
    }

    #[test]
    fn flipped_byte_in_the_last_record_is_cut_back() {
        let (dir, log, report) = damaged_tail(|last| {
            let mut bytes = fs::read(last).unwrap();
            let at = bytes.len() - 30;
            bytes[at] ^= 0x40;
            fs::write(last, bytes).unwrap();
        });
        assert_cut_at(dir.path(), &report, 119);
        assert_eq!(report.truncated_bytes, FRAME_100);
        check(&read_all(&log, 0), 0..119, 100);
        append(&log, 119, 1, 1, 100);
        check(&read_all(&log, 0), 0..120, 100);
    }

    #[test]
    fn a_whole_torn_last_segment_leaves_the_earlier_ones() {
        let (dir, log, report) = damaged_tail(|last| {
            let file = OpenOptions::new().write(true).open(last).unwrap();
            file.set_len(10).unwrap();
        });
        assert_cut_at(dir.path(), &report, 80);
        check(&read_all(&log, 0), 0..80, 100);
        append(&log, 80, 50, 50, 100);
        check(&read_all(&log, 0), 0..130, 100);
    }

    #[test]
    fn a_valid_record_with_a_wrong_offset_is_refused_not_truncated() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (log, _) = open(dir.path(), 1 << 20);
            append(&log, 0, 10, 10, 100);
        }
        let from = segment_files(dir.path())[0].clone();
        let to = segment_path(dir.path(), 5);
        fs::rename(&from, &to).unwrap();
        let err = TopicLog::open(dir.path(), SegmentConfig::default())
            .err()
            .unwrap();
        assert!(
            matches!(&err, LogError::Corrupt { position: 0, .. }),
            "{err}"
        );
        assert_eq!(fs::metadata(&to).unwrap().len(), 10 * FRAME_100);
    }

    #[test]
    fn corrupt_record_mid_log_is_reported_by_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let segment_bytes = 40 * FRAME_100;
        {
            let (log, _) = open(dir.path(), segment_bytes);
            append(&log, 0, 120, 40, 100);
        }
        let first = segment_files(dir.path())[0].clone();
        let mut bytes = fs::read(&first).unwrap();
        bytes[(4 * FRAME_100 + 50) as usize] ^= 1;
        fs::write(&first, bytes).unwrap();

        // Closed segments are trusted on open...
        let (log, report) = open(dir.path(), segment_bytes);
        assert_eq!(report.truncated_bytes, 0);
        // ...and the reader catches the bad record, after delivering the
        // good ones before it.
        let mut reader = log.reader(0);
        check(&reader.read(100, 1 << 20).unwrap(), 0..4, 100);
        let err = reader.read(100, 1 << 20).unwrap_err();
        match &err {
            LogError::Corrupt { path, position, .. } => {
                assert_eq!(path, &first);
                assert_eq!(*position, 4 * FRAME_100);
            }
            other => panic!("{other}"),
        }
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        assert_eq!(reader.position(), 4);
        // Later segments remain readable by seeking past the damaged one
        // (inside it, frame boundaries after the bad record are unknown).
        reader.seek(5);
        assert!(matches!(reader.read(1, 1), Err(LogError::Corrupt { .. })));
        reader.seek(40);
        check(&reader.read(1000, 1 << 20).unwrap(), 40..120, 100);
    }

    #[test]
    fn reader_never_sees_unsynced_records() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = open(dir.path(), 2 * 1024);
        let mut reader = log.reader(0);
        assert!(reader.read(100, 1 << 20).unwrap().is_empty());

        let payloads: Vec<Vec<u8>> = (0..30).map(|i| payload(i, 100)).collect();
        let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        assert_eq!(log.append_batch(&refs[..10], 1).unwrap(), 0..10);
        assert!(reader.read(100, 1 << 20).unwrap().is_empty());
        assert_eq!(log.durable_end(), 0);
        assert_eq!(log.written_end(), 10);
        log.sync().unwrap();
        check(&reader.read(100, 1 << 20).unwrap(), 0..10, 100);

        // Several batches and a roll, not synced: still invisible.
        assert_eq!(log.append_batch(&refs[10..20], 2).unwrap(), 10..20);
        assert_eq!(log.append_batch(&refs[20..30], 3).unwrap(), 20..30);
        assert!(segment_files(dir.path()).len() >= 2);
        assert!(reader.read(100, 1 << 20).unwrap().is_empty());
        assert_eq!(log.durable_end(), 10);

        // Buffered mode: visible without fsync, across the rolled segments.
        log.mark_durable_without_sync();
        assert_eq!(log.durable_end(), 30);
        check(&reader.read(100, 1 << 20).unwrap(), 10..30, 100);
        log.sync().unwrap();
        assert!(reader.read(100, 1 << 20).unwrap().is_empty());
    }

    #[test]
    fn concurrent_reader_sees_only_durable_records_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = open(dir.path(), 16 * 1024);
        let total = 20_000u64;
        let done = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let log = log.clone();
                let done = done.clone();
                std::thread::spawn(move || {
                    let mut reader = log.reader(0);
                    let mut next = 0;
                    loop {
                        let finished = done.load(Ordering::Acquire);
                        let batch = reader.read(333, 16 * 1024).unwrap();
                        if let Some(last) = batch.last() {
                            assert!(last.offset < log.durable_end());
                        }
                        for r in batch {
                            assert_eq!(r.offset, next);
                            assert_eq!(r.payload.as_ref(), payload(next, 64).as_slice());
                            next += 1;
                        }
                        if finished && next == total {
                            return;
                        }
                        assert!(!finished || next < total);
                    }
                })
            })
            .collect();
        let mut i = 0;
        while i < total {
            let n = (i % 97 + 1).min(total - i);
            let payloads: Vec<Vec<u8>> = (i..i + n).map(|k| payload(k, 64)).collect();
            let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            log.append_batch(&refs, 0).unwrap();
            if i % 3 == 0 {
                log.mark_durable_without_sync();
            } else {
                log.sync().unwrap();
            }
            i += n;
        }
        log.sync().unwrap();
        done.store(true, Ordering::Release);
        for r in readers {
            r.join().unwrap();
        }
    }

    #[test]
    fn reader_reads_100k_records_in_bounded_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = open(dir.path(), 4 << 20);
        let total = 100_000u64;
        let mut i = 0;
        while i < total {
            let payloads: Vec<Vec<u8>> = (i..i + 1000).map(|k| payload(k, 256)).collect();
            let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            log.append_batch(&refs, i).unwrap();
            i += 1000;
        }
        log.sync().unwrap();
        assert!(segment_files(dir.path()).len() >= 6);

        let mut reader = log.reader(0);
        let mut next = 0;
        let mut max_buffered = 0;
        loop {
            let batch = reader.read(1000, 64 * 1024).unwrap();
            if batch.is_empty() {
                break;
            }
            assert!(batch.len() <= 1000);
            assert!(batch.iter().map(|r| r.payload.len()).sum::<usize>() <= 64 * 1024);
            max_buffered = max_buffered.max(reader.buffered_bytes());
            for r in &batch {
                assert_eq!(r.offset, next);
                assert_eq!(r.payload.as_ref(), payload(next, 256).as_slice());
                next += 1;
            }
        }
        assert_eq!(next, total);
        assert_eq!(reader.position(), total);
        assert!(
            max_buffered <= 2 * CHUNK,
            "reader buffered {max_buffered} bytes"
        );
    }

    #[test]
    fn seek_lands_on_the_exact_record_live_and_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let segment_bytes = 256 * 1024;
        let total = 6000;
        let targets = [0, 1, 529, 2113, 2114, 2115, 3000, 4999, 5998, 5999];
        let check_seeks = |log: &TopicLog| {
            let mut reader = log.reader(0);
            for &t in targets.iter().rev().chain(&targets) {
                reader.seek(t);
                assert_eq!(reader.position(), t);
                check(
                    &reader.read(2, 1 << 20).unwrap(),
                    t..(t + 2).min(total),
                    100,
                );
            }
            reader.seek(total + 10);
            assert!(reader.read(10, 1 << 20).unwrap().is_empty());
            assert_eq!(reader.position(), total + 10);
        };
        {
            let (log, _) = open(dir.path(), segment_bytes);
            append(&log, 0, total, 113, 100);
            assert!(segment_files(dir.path()).len() >= 3);
            check_seeks(&log);
        }
        let (log, _) = open(dir.path(), segment_bytes);
        check_seeks(&log);
    }

    #[test]
    fn remove_before_deletes_only_fully_covered_closed_segments() {
        let dir = tempfile::tempdir().unwrap();
        let segment_bytes = 40 * FRAME_100;
        let (log, _) = open(dir.path(), segment_bytes);
        append(&log, 0, 400, 40, 100);
        let bases: Vec<u64> = segment_files(dir.path())
            .iter()
            .map(|p| base_of(p))
            .collect();
        assert_eq!(bases, (0..10).map(|i| i * 40).collect::<Vec<_>>());

        let mut early = log.reader(0);
        check(&early.read(10, 1 << 20).unwrap(), 0..10, 100);
        let mut middle = log.reader(125);

        // Offset 125 covers segments 0, 40, 80 entirely; 120 only partly.
        assert_eq!(log.remove_before(125).unwrap(), 120);
        assert_eq!(log.start_offset(), 120);
        let left: Vec<u64> = segment_files(dir.path())
            .iter()
            .map(|p| base_of(p))
            .collect();
        assert_eq!(left, (3..10).map(|i| i * 40).collect::<Vec<_>>());
        assert_eq!(log.disk_bytes(), 280 * FRAME_100);
        assert_eq!(log.remove_before(125).unwrap(), 0);

        // A reader in a removed segment jumps forward to the start; others
        // are unaffected; new readers start at the start.
        check(&early.read(5, 1 << 20).unwrap(), 120..125, 100);
        check(&middle.read(5, 1 << 20).unwrap(), 125..130, 100);
        assert_eq!(log.reader(0).position(), 120);
        check(&read_all(&log, 0), 120..400, 100);

        // Never the active segment, never records that are not durable.
        let payloads: Vec<Vec<u8>> = (400..480).map(|k| payload(k, 100)).collect();
        let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        log.append_batch(&refs[..40], 0).unwrap();
        log.append_batch(&refs[40..], 0).unwrap();
        assert_eq!(log.remove_before(u64::MAX).unwrap(), 280);
        assert_eq!(log.start_offset(), 400);
        log.sync().unwrap();
        check(&read_all(&log, 0), 400..480, 100);
        assert_eq!(log.remove_before(u64::MAX).unwrap(), 40);
        assert_eq!(log.start_offset(), 440);
        assert_eq!(segment_files(dir.path()).len(), 1);
        drop((log, early, middle));

        let (log, report) = open(dir.path(), segment_bytes);
        assert_eq!(report.records, 40);
        assert_eq!(log.start_offset(), 440);
        check(&read_all(&log, 0), 440..480, 100);
    }

    #[test]
    fn scan_recent_visits_records_from_a_time_on() {
        let dir = tempfile::tempdir().unwrap();
        let segment_bytes = 30 * FRAME_100;
        {
            let (log, _) = open(dir.path(), segment_bytes);
            for b in 0..50u64 {
                let payloads: Vec<Vec<u8>> =
                    (b * 10..b * 10 + 10).map(|k| payload(k, 100)).collect();
                let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
                log.append_batch(&refs, 1000 * (b + 1)).unwrap();
            }
            log.sync().unwrap();
        }
        let (log, _) = open(dir.path(), segment_bytes);
        let scan = |since| {
            let mut seen = Vec::new();
            log.scan_recent(since, |offset, time, bytes| {
                assert_eq!(time, 1000 * (offset / 10 + 1));
                assert_eq!(bytes, payload(offset, 100).as_slice());
                seen.push(offset);
            })
            .unwrap();
            seen
        };
        assert_eq!(scan(25_500), (250..500).collect::<Vec<_>>());
        assert_eq!(scan(26_000), (250..500).collect::<Vec<_>>());
        assert_eq!(scan(0), (0..500).collect::<Vec<_>>());
        assert_eq!(scan(50_000), (490..500).collect::<Vec<_>>());
        assert!(scan(u64::MAX).is_empty());

        // Unsynced records are not visited.
        log.append_batch(&[b"later"], 99_000).unwrap();
        assert!(scan(60_000).is_empty());
    }
}
