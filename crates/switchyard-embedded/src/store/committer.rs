//! The committer: the one thread that writes the store.
//!
//! Callers send their [`WriteBatch`] over a channel and wait on a oneshot. The committer
//! takes everything that queued while the previous group was being written (up to
//! `max_group`), checks each batch in arrival order against the committed state plus the
//! writes of the batches before it in the same group (a small overlay), and writes all
//! batches that passed as ONE fjall write batch with one journal sync. Only then does it
//! answer, failures included, so a caller that lost a conflict re-reads a state that
//! already holds the winner's write. Because it is the only writer, read-check-write
//! needs no engine transaction.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fjall::PersistMode;
use switchyard::envelope::Timestamp;
use switchyard::store::{Write, WriteBatch};
use switchyard::{Error, Result};
use tokio::sync::{Notify, oneshot};

use super::{
    CommitStats, Keyspaces, META_NEXT_SEQ, META_NEXT_VERSION, encode_outbox, encode_row, inbox_key,
    outbox_key, row_key, row_version,
};
use crate::Durability;
use crate::group_commit::Linger;

/// What the committer thread receives.
pub(super) enum Request {
    /// Check and apply a transaction's batch.
    Commit {
        batch: WriteBatch,
        reply: oneshot::Sender<Result<()>>,
    },
    /// Delete published outbox entries.
    RemoveOutbox {
        seqs: Vec<u64>,
        reply: oneshot::Sender<Result<()>>,
    },
    /// Delete these (expired) inbox keys; answers how many were deleted.
    ExpireInbox {
        keys: Vec<Vec<u8>>,
        reply: oneshot::Sender<Result<u64>>,
    },
    /// Write what is queued, sync, and stop.
    Shutdown(oneshot::Sender<Result<()>>),
    /// Tests: block until the sender sends (or is dropped), so that requests queued
    /// meanwhile form one group.
    #[cfg(test)]
    Pause(mpsc::Receiver<()>),
}

/// One commit waiting in a group.
struct Pending {
    batch: WriteBatch,
    reply: oneshot::Sender<Result<()>>,
}

/// The committer's state: the keyspaces, the counters it alone advances, and what it
/// shares with readers (outbox length, notify, stats).
pub(super) struct Committer {
    pub ks: Keyspaces,
    pub next_version: u64,
    pub next_seq: u64,
    pub outbox_len: Arc<AtomicU64>,
    pub notify: Arc<Notify>,
    pub stats: Arc<CommitStats>,
    /// Sync every write batch (`Durability::Fsync`) or leave it to the timer.
    pub sync_each: bool,
    /// Written since the last sync (buffered mode).
    pub unsynced: bool,
}

/// Runs the committer until `Shutdown` or until every sender is gone.
pub(super) fn run(
    rx: mpsc::Receiver<Request>,
    mut c: Committer,
    durability: Durability,
    max_group: usize,
) {
    let interval = match durability {
        Durability::Fsync => None,
        Durability::Buffered { interval } => Some(interval.max(Duration::from_millis(1))),
    };
    let max_group = max_group.max(1);
    let mut last_sync = Instant::now();
    let mut linger = Linger::default();
    loop {
        // Let the committers just answered run and queue their next batches, so they
        // share the next sync instead of trickling into a small one (cheap when idle).
        std::thread::yield_now();
        let first = match interval {
            None => match rx.recv() {
                Ok(r) => Some(r),
                Err(_) => break,
            },
            Some(iv) => match rx.recv_timeout(iv.saturating_sub(last_sync.elapsed())) {
                Ok(r) => Some(r),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            },
        };
        let mut shutdown = None;
        if let Some(first) = first {
            linger.start_group();
            let mut group = Vec::new();
            let mut next = Some(first);
            while let Some(req) = next.take() {
                match req {
                    Request::Commit { batch, reply } => group.push(Pending { batch, reply }),
                    // Deletions keep their place in the order: write the commits gathered
                    // so far, then the deletion as its own write batch.
                    Request::RemoveOutbox { seqs, reply } => {
                        c.commit_group(std::mem::take(&mut group));
                        let _ = reply.send(c.remove_outbox(seqs));
                    }
                    Request::ExpireInbox { keys, reply } => {
                        c.commit_group(std::mem::take(&mut group));
                        let _ = reply.send(c.expire_inbox(keys));
                    }
                    Request::Shutdown(done) => {
                        shutdown = Some(done);
                        break;
                    }
                    #[cfg(test)]
                    Request::Pause(resume) => {
                        let _ = resume.recv();
                    }
                }
                if group.len() < max_group {
                    next = rx.try_recv().ok();
                    // Linger: after a large group (many committers waiting on each other),
                    // wait briefly for those just answered to queue again, so one sync
                    // serves all of them rather than half in each of two.
                    if next.is_none() && linger.should_wait(group.len()) {
                        std::thread::sleep(linger.budget);
                        next = rx.try_recv().ok();
                    }
                }
            }
            if !group.is_empty() {
                linger.last_requests = group.len();
                let started = Instant::now();
                c.commit_group(group);
                linger.observe(started.elapsed());
            }
        }
        if let Some(done) = shutdown {
            let _ = done.send(c.sync(PersistMode::SyncAll));
            return;
        }
        if let Some(iv) = interval
            && last_sync.elapsed() >= iv
        {
            if c.unsynced
                && let Err(e) = c.sync(PersistMode::SyncData)
            {
                tracing::error!(error = %e, "background sync of the store journal failed");
            }
            last_sync = Instant::now();
        }
    }
    if let Err(e) = c.sync(PersistMode::SyncAll) {
        tracing::error!(error = %e, "final sync of the store journal failed");
    }
}

/// A row as the group sees it: `None` deleted, else (version, JSON).
type RowState = Option<(u64, Bytes)>;

impl Committer {
    /// Syncs the journal (buffered mode's timer, shutdown).
    fn sync(&mut self, mode: PersistMode) -> Result<()> {
        self.ks
            .db
            .persist(mode)
            .map_err(|e| Error::storage("syncing the store journal", e))?;
        self.unsynced = false;
        Ok(())
    }

    fn persist_mode(&self) -> PersistMode {
        if self.sync_each {
            PersistMode::SyncData
        } else {
            // To the OS at once: a process crash loses nothing, only a power loss can.
            PersistMode::Buffer
        }
    }

    /// Commits one fjall batch with the configured durability.
    fn write(&mut self, batch: fjall::OwnedWriteBatch) -> fjall::Result<()> {
        batch.durability(Some(self.persist_mode())).commit()?;
        self.unsynced = !self.sync_each;
        self.stats.groups.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Commits one fjall batch handed to the OS without a sync of its own: for deletions
    /// whose loss on power failure is harmless (an outbox entry published again, which
    /// consumers' inboxes drop; an inbox mark kept longer). The next group's sync makes
    /// it durable too (one journal, written in order).
    fn write_unsynced(&mut self, batch: fjall::OwnedWriteBatch) -> fjall::Result<()> {
        batch.durability(Some(PersistMode::Buffer)).commit()?;
        self.unsynced = true;
        Ok(())
    }

    /// The committed version of a row, or the one an earlier batch of the group left.
    fn current_version(
        &self,
        rows: &HashMap<Vec<u8>, RowState>,
        key: &[u8],
        table: &str,
        row: &str,
    ) -> Result<Option<u64>> {
        if let Some(state) = rows.get(key) {
            return Ok(state.as_ref().map(|(v, _)| *v));
        }
        match self.ks.rows.get(key) {
            Ok(Some(value)) => row_version(&value, table, row).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(Error::storage(
                format!("reading row {table}/{row} to check a commit"),
                e,
            )),
        }
    }

    /// Checks a batch against committed state plus the group's earlier batches.
    fn check(
        &self,
        batch: &WriteBatch,
        rows: &HashMap<Vec<u8>, RowState>,
        inbox: &HashSet<Vec<u8>>,
    ) -> Result<()> {
        for e in &batch.expect {
            let key = row_key(&e.table, &e.key);
            if self.current_version(rows, &key, &e.table, &e.key)? != e.version {
                return Err(Error::Conflict {
                    table: e.table.clone(),
                    key: e.key.clone(),
                });
            }
        }
        for (consumer, id) in &batch.inbox {
            let key = inbox_key(consumer, *id);
            let marked =
                inbox.contains(&key)
                    || self.ks.inbox.contains_key(&key).map_err(|e| {
                        Error::storage(format!("reading the inbox of `{consumer}`"), e)
                    })?;
            if marked {
                return Err(Error::AlreadyProcessed {
                    consumer: consumer.clone(),
                    id: id.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Checks every batch of the group in order, writes those that passed as one fjall
    /// batch, and then answers every caller.
    fn commit_group(&mut self, group: Vec<Pending>) {
        if group.is_empty() {
            return;
        }
        let mut rows: HashMap<Vec<u8>, RowState> = HashMap::new();
        let mut inbox: HashSet<Vec<u8>> = HashSet::new();
        let mut outbox: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut version = self.next_version;
        let mut seq = self.next_seq;
        let mut answers: Vec<(oneshot::Sender<Result<()>>, Result<()>)> =
            Vec::with_capacity(group.len());
        let mut applied = 0u64;
        for Pending { batch, reply } in group {
            if let Err(e) = self.check(&batch, &rows, &inbox) {
                let counter = match e {
                    Error::Conflict { .. } => Some(&self.stats.conflicts),
                    Error::AlreadyProcessed { .. } => Some(&self.stats.already_processed),
                    _ => None,
                };
                if let Some(c) = counter {
                    c.fetch_add(1, Ordering::Relaxed);
                }
                answers.push((reply, Err(e)));
                continue;
            }
            for w in batch.writes {
                match w {
                    Write::Put { table, key, value } => {
                        version += 1;
                        rows.insert(row_key(&table, &key), Some((version, value)));
                    }
                    Write::Delete { table, key } => {
                        rows.insert(row_key(&table, &key), None);
                    }
                }
            }
            for (consumer, id) in &batch.inbox {
                inbox.insert(inbox_key(consumer, *id));
            }
            for (topic, env) in &batch.outbox {
                outbox.push((seq, encode_outbox(topic, env)));
                seq += 1;
            }
            applied += 1;
            answers.push((reply, Ok(())));
        }
        if applied > 0 {
            // One write per key: the group's last state of each row (a key written twice
            // in one fjall batch would share one sequence number).
            let mut fb = self.ks.db.batch();
            for (key, state) in rows {
                match state {
                    Some((v, json)) => fb.insert(&self.ks.rows, key, encode_row(v, &json)),
                    None => fb.remove(&self.ks.rows, key),
                }
            }
            let now = Timestamp::now().unix_micros().to_le_bytes();
            for key in inbox {
                fb.insert(&self.ks.inbox, key, now);
            }
            let appended = outbox.len() as u64;
            for (s, value) in outbox {
                fb.insert(&self.ks.outbox, outbox_key(s), value);
            }
            if version != self.next_version {
                fb.insert(&self.ks.meta, META_NEXT_VERSION, version.to_le_bytes());
            }
            if seq != self.next_seq {
                fb.insert(&self.ks.meta, META_NEXT_SEQ, seq.to_le_bytes());
            }
            match self.write(fb) {
                Ok(()) => {
                    self.next_version = version;
                    self.next_seq = seq;
                    self.stats.commits.fetch_add(applied, Ordering::Relaxed);
                    if appended > 0 {
                        self.outbox_len.fetch_add(appended, Ordering::Relaxed);
                        self.notify.notify_waiters();
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    tracing::error!(error = %msg, commits = applied, "store group commit failed; the transactions get an error and may be retried");
                    for (_, answer) in answers.iter_mut() {
                        if answer.is_ok() {
                            *answer = Err(Error::storage(
                                format!("committing a group of {applied} transactions"),
                                msg.clone(),
                            ));
                        }
                    }
                }
            }
        }
        for (reply, answer) in answers {
            let _ = reply.send(answer);
        }
    }

    /// Deletes published outbox entries (those that exist) in one write batch, not synced
    /// on its own (see [`write_unsynced`](Self::write_unsynced)).
    fn remove_outbox(&mut self, mut seqs: Vec<u64>) -> Result<()> {
        seqs.sort_unstable();
        seqs.dedup();
        let mut fb = self.ks.db.batch();
        let mut removed = 0u64;
        for s in seqs {
            let key = outbox_key(s);
            let exists = self
                .ks
                .outbox
                .contains_key(key)
                .map_err(|e| Error::storage(format!("reading outbox entry {s}"), e))?;
            if exists {
                fb.remove(&self.ks.outbox, key);
                removed += 1;
            }
        }
        if removed == 0 {
            return Ok(());
        }
        self.write_unsynced(fb)
            .map_err(|e| Error::storage(format!("removing {removed} outbox entries"), e))?;
        self.outbox_len.fetch_sub(removed, Ordering::Relaxed);
        Ok(())
    }

    /// Deletes expired inbox keys in one write batch, not synced on its own.
    fn expire_inbox(&mut self, keys: Vec<Vec<u8>>) -> Result<u64> {
        let n = keys.len() as u64;
        if n == 0 {
            return Ok(0);
        }
        let mut fb = self.ks.db.batch();
        for key in keys {
            fb.remove(&self.ks.inbox, key);
        }
        self.write_unsynced(fb)
            .map_err(|e| Error::storage(format!("removing {n} expired inbox marks"), e))?;
        Ok(n)
    }
}
