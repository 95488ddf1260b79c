//! A consumer group's durable position: an append-only file of checksummed change
//! records, compacted into a fresh file when it grows.
//!
//! Writes are buffered and handed to the OS by the bus's periodic flush (every 100 ms
//! by default) and fsynced on close and compaction. Losing the last unflushed changes
//! in a crash only means redelivery of messages that were already acknowledged, which
//! at-least-once delivery allows; it never loses a message.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use switchyard::logbus::{FailureInfo, GroupChange, GroupLog, GroupSnapshot};
use switchyard::{Error, Result, Timestamp};

const FLOOR: u8 = 1;
const DONE: u8 = 2;
const FAILED: u8 = 3;
/// Compact when the file holds this many bytes of change records.
const COMPACT_BYTES: u64 = 4 * 1024 * 1024;
/// Hand the buffer to the OS when it holds this much.
const MAX_BUFFER: usize = 256 * 1024;

/// The change log of one group, as a file `<name>.pos`.
pub(crate) struct GroupFile {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
    snapshot: GroupSnapshot,
    file_bytes: u64,
}

fn io(path: &Path, what: &str) -> impl FnOnce(std::io::Error) -> Error {
    let context = format!("{what} {}", path.display());
    move |e| Error::storage(context, e)
}

impl GroupFile {
    /// Opens `path`, replaying its records; `None` snapshot when the file is new.
    /// A torn or corrupt tail is cut off (the group then redelivers a little).
    pub(crate) fn open(path: PathBuf) -> Result<(GroupFile, Option<GroupSnapshot>)> {
        let existed = path.exists();
        let mut bytes = Vec::new();
        if existed {
            File::open(&path)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .map_err(io(&path, "reading group position"))?;
        }
        let mut snapshot = GroupSnapshot::default();
        let mut pos = 0;
        while let Some((change, used)) = decode(&bytes[pos..]) {
            snapshot.apply(change);
            pos += used;
        }
        if pos < bytes.len() {
            tracing::warn!(path = %path.display(), kept = pos, cut = bytes.len() - pos,
                "group position file has a torn or corrupt tail; cutting it (some messages may be redelivered)");
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path, "opening group position"))?;
        if pos < bytes.len() {
            file.set_len(pos as u64)
                .map_err(io(&path, "truncating group position"))?;
        }
        let mut g = GroupFile {
            path,
            file,
            buf: Vec::new(),
            snapshot: snapshot.clone(),
            file_bytes: pos as u64,
        };
        if existed && g.file_bytes > COMPACT_BYTES / 4 {
            g.compact()?;
        }
        Ok((g, existed.then_some(snapshot)))
    }

    fn write_out(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.file
            .write_all(&self.buf)
            .map_err(io(&self.path, "writing group position"))?;
        self.file_bytes += self.buf.len() as u64;
        self.buf.clear();
        if self.file_bytes > COMPACT_BYTES {
            self.compact()?;
        }
        Ok(())
    }

    /// Rewrites the file as the current snapshot (atomically: temp file, fsync, rename).
    fn compact(&mut self) -> Result<()> {
        let tmp = self.path.with_extension("pos.tmp");
        let mut out = Vec::new();
        for c in self.snapshot.to_changes() {
            encode(&mut out, &c);
        }
        let mut f = File::create(&tmp).map_err(io(&tmp, "creating"))?;
        f.write_all(&out).map_err(io(&tmp, "writing"))?;
        f.sync_data().map_err(io(&tmp, "syncing"))?;
        fs::rename(&tmp, &self.path).map_err(io(&self.path, "replacing"))?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io(dir, "syncing directory"))?;
        }
        self.file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(io(&self.path, "reopening group position"))?;
        self.file_bytes = out.len() as u64;
        Ok(())
    }
}

impl GroupLog for GroupFile {
    fn append(&mut self, changes: &[GroupChange]) -> Result<()> {
        for c in changes {
            encode(&mut self.buf, c);
            self.snapshot.apply(c.clone());
        }
        if self.buf.len() >= MAX_BUFFER {
            self.write_out()?;
        }
        Ok(())
    }

    fn flush(&mut self, sync: bool) -> Result<()> {
        self.write_out()?;
        if sync {
            self.file
                .sync_data()
                .map_err(io(&self.path, "syncing group position"))?;
        }
        Ok(())
    }
}

/// Frame: `[len u32][crc32c u32 of body][body]`, body = kind byte + fields (little endian).
fn encode(out: &mut Vec<u8>, change: &GroupChange) {
    let mut body = Vec::with_capacity(32);
    match change {
        GroupChange::Floor(o) => {
            body.push(FLOOR);
            body.extend_from_slice(&o.to_le_bytes());
        }
        GroupChange::Done(o) => {
            body.push(DONE);
            body.extend_from_slice(&o.to_le_bytes());
        }
        GroupChange::Failed(o, f) => {
            body.push(FAILED);
            body.extend_from_slice(&o.to_le_bytes());
            body.extend_from_slice(&f.attempts.to_le_bytes());
            body.extend_from_slice(&f.first_failure.unix_micros().to_le_bytes());
            body.extend_from_slice(&f.last_failure.unix_micros().to_le_bytes());
            let reason = &f.last_error.as_bytes()[..f.last_error.len().min(4096)];
            body.extend_from_slice(&(reason.len() as u32).to_le_bytes());
            body.extend_from_slice(reason);
        }
    }
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&body);
}

fn decode(b: &[u8]) -> Option<(GroupChange, usize)> {
    let len = u32::from_le_bytes(b.get(0..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(b.get(4..8)?.try_into().ok()?);
    if len == 0 || len > 8192 {
        return None;
    }
    let body = b.get(8..8 + len)?;
    if crc32c::crc32c(body) != crc {
        return None;
    }
    let u64_at = |i: usize| Some(u64::from_le_bytes(body.get(i..i + 8)?.try_into().ok()?));
    let change = match body[0] {
        FLOOR => GroupChange::Floor(u64_at(1)?),
        DONE => GroupChange::Done(u64_at(1)?),
        FAILED => {
            let attempts = u32::from_le_bytes(body.get(9..13)?.try_into().ok()?);
            let first = u64_at(13)?;
            let last = u64_at(21)?;
            let n = u32::from_le_bytes(body.get(29..33)?.try_into().ok()?) as usize;
            let reason = String::from_utf8_lossy(body.get(33..33 + n)?).into_owned();
            GroupChange::Failed(
                u64_at(1)?,
                FailureInfo {
                    attempts,
                    first_failure: Timestamp::from_unix_micros(first),
                    last_failure: Timestamp::from_unix_micros(last),
                    last_error: reason,
                },
            )
        }
        _ => return None,
    };
    Some((change, 8 + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_changes_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.pos");
        let (mut g, snap) = GroupFile::open(path.clone()).unwrap();
        assert!(snap.is_none());
        let info = FailureInfo {
            attempts: 2,
            first_failure: Timestamp::from_unix_micros(5),
            last_failure: Timestamp::from_unix_micros(9),
            last_error: "boom".into(),
        };
        g.append(&[
            GroupChange::Floor(10),
            GroupChange::Done(12),
            GroupChange::Failed(11, info.clone()),
        ])
        .unwrap();
        g.flush(true).unwrap();
        drop(g);
        // A torn record at the end.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[40, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let (_, snap) = GroupFile::open(path.clone()).unwrap();
        let snap = snap.unwrap();
        assert_eq!(snap.floor, 10);
        assert!(snap.done.contains(&12));
        assert_eq!(snap.failures.get(&11), Some(&info));
    }

    #[test]
    fn compaction_keeps_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.pos");
        let (mut g, _) = GroupFile::open(path.clone()).unwrap();
        for i in 0..400_000u64 {
            g.append(&[GroupChange::Floor(i)]).unwrap();
        }
        g.append(&[GroupChange::Done(400_005)]).unwrap();
        g.flush(true).unwrap();
        assert!(fs::metadata(&path).unwrap().len() < COMPACT_BYTES);
        drop(g);
        let (_, snap) = GroupFile::open(path).unwrap();
        let snap = snap.unwrap();
        assert_eq!(snap.floor, 399_999);
        assert!(snap.done.contains(&400_005));
    }
}
