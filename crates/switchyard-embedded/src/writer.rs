//! The group-commit writer: one thread that turns many concurrent publishes into few
//! durable writes.
//!
//! Publishers hand their messages to the writer over a channel and wait. The writer
//! takes everything that queued up while the previous fsync ran, checks publisher dedup,
//! appends each topic's share with one `write`, makes it durable with one `fdatasync`
//! per touched topic (mode `fsync`) or leaves that to a timer (mode `buffered`), and
//! only then answers. The more publishers wait, the more messages share an fsync.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use switchyard::logbus::{IdMap, now_ms};
use switchyard::{Envelope, Error, Published, Result};
use tokio::sync::oneshot;

use crate::Durability;
use crate::group_commit::Linger;
use crate::storage::TopicShared;

/// What the writer thread receives.
pub(crate) enum WriterMsg {
    /// Store these messages.
    Append(AppendRequest),
    /// Sync everything and stop; answered when done.
    Shutdown(oneshot::Sender<()>),
}

/// One publish call waiting for the writer.
pub(crate) struct AppendRequest {
    pub topic: Arc<TopicShared>,
    pub envelopes: Vec<Envelope>,
    pub dedup: bool,
    pub reply: oneshot::Sender<Result<Vec<Published>>>,
}

/// Counters of the writer, for benchmarks and metrics.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Messages written.
    pub messages: AtomicU64,
    /// fdatasync calls made for message data.
    pub fsyncs: AtomicU64,
    /// Write batches (one per wake-up of the writer).
    pub batches: AtomicU64,
}

impl WriterStats {
    /// Average messages per fsync so far.
    pub fn messages_per_fsync(&self) -> f64 {
        let f = self.fsyncs.load(Ordering::Relaxed);
        if f == 0 {
            return 0.0;
        }
        self.messages.load(Ordering::Relaxed) as f64 / f as f64
    }
}

/// Runs the writer loop until every sender is dropped.
pub(crate) fn run(
    rx: mpsc::Receiver<WriterMsg>,
    durability: Durability,
    max_batch_bytes: usize,
    stats: Arc<WriterStats>,
) {
    let mut unsynced: HashMap<*const TopicShared, Arc<TopicShared>> = HashMap::new();
    let mut last_sync = Instant::now();
    let interval = match durability {
        Durability::Fsync => None,
        Durability::Buffered { interval } => Some(interval.max(Duration::from_millis(1))),
    };
    let mut linger = Linger::default();
    loop {
        linger.start_group();
        // Let the publishers just answered run and queue their next messages, so they
        // share the next fsync instead of trickling into a small one (cheap when idle).
        std::thread::yield_now();
        let first = match interval {
            None => match rx.recv() {
                Ok(r) => Some(r),
                Err(_) => break,
            },
            Some(iv) => {
                let wait = iv.saturating_sub(last_sync.elapsed());
                match rx.recv_timeout(wait) {
                    Ok(r) => Some(r),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
        };
        let mut shutdown = None;
        if let Some(first) = first {
            let mut batch = Vec::new();
            let mut bytes = 0;
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    WriterMsg::Append(r) => {
                        bytes += r.envelopes.iter().map(|e| e.encoded_len()).sum::<usize>();
                        batch.push(r);
                    }
                    WriterMsg::Shutdown(done) => {
                        shutdown = Some(done);
                        break;
                    }
                }
                if bytes < max_batch_bytes {
                    next = rx.try_recv().ok();
                    // Linger: when the last group was large (many publishers waiting on each
                    // other), wait briefly for the publishers just answered to queue again,
                    // so one fsync serves all of them rather than half in each of two.
                    // It sleeps rather than waiting on the channel, so the stragglers don't
                    // wake this thread one by one.
                    if next.is_none() && linger.should_wait(batch.len()) {
                        std::thread::sleep(linger.budget);
                        next = rx.try_recv().ok();
                    }
                }
            }
            if !batch.is_empty() {
                linger.last_requests = batch.len();
                let started = Instant::now();
                write_batch(batch, interval.is_none(), &stats, &mut unsynced);
                linger.observe(started.elapsed());
            }
        }
        if let Some(done) = shutdown {
            for (_, t) in unsynced.drain() {
                if let Err(e) = t.log.sync() {
                    tracing::error!(topic = %t.name, error = %e, "final fsync failed");
                }
            }
            let _ = done.send(());
            return;
        }
        if let Some(iv) = interval
            && last_sync.elapsed() >= iv
        {
            for (_, t) in unsynced.drain() {
                if let Err(e) = t.log.sync() {
                    tracing::error!(topic = %t.name, error = %e, "background fsync failed; the topic refuses writes until reopened");
                }
                stats.fsyncs.fetch_add(1, Ordering::Relaxed);
            }
            last_sync = Instant::now();
        }
    }
    for (_, t) in unsynced.drain() {
        let _ = t.log.sync();
    }
}

/// Where a publish call waits for its outcome.
type Reply = oneshot::Sender<Result<Vec<Published>>>;

struct TopicWork {
    topic: Arc<TopicShared>,
    requests: Vec<(Vec<Envelope>, bool, Reply)>,
}

fn write_batch(
    batch: Vec<AppendRequest>,
    sync: bool,
    stats: &WriterStats,
    unsynced: &mut HashMap<*const TopicShared, Arc<TopicShared>>,
) {
    stats.batches.fetch_add(1, Ordering::Relaxed);
    // Group by topic, keeping arrival order within each topic.
    let mut order: Vec<TopicWork> = Vec::new();
    let mut index: HashMap<*const TopicShared, usize> = HashMap::new();
    for r in batch {
        let key = Arc::as_ptr(&r.topic);
        let i = *index.entry(key).or_insert_with(|| {
            order.push(TopicWork {
                topic: r.topic.clone(),
                requests: Vec::new(),
            });
            order.len() - 1
        });
        order[i].requests.push((r.envelopes, r.dedup, r.reply));
    }
    let now = now_ms();
    // Phase 1: append every topic's records (one write each).
    let mut written = Vec::with_capacity(order.len());
    for work in order {
        let result = append_topic(&work, now);
        written.push((work, result));
    }
    // Phase 2: make them durable, then answer.
    for (work, result) in written {
        let topic = &work.topic;
        let result = result.and_then(|(outcomes, new_ids, count)| {
            if count > 0 {
                if sync {
                    topic.log.sync().map_err(|e| {
                        Error::storage(format!("syncing topic `{}`", topic.name), e)
                    })?;
                    stats.fsyncs.fetch_add(1, Ordering::Relaxed);
                } else {
                    topic.log.mark_durable_without_sync();
                    unsynced.insert(Arc::as_ptr(topic), topic.clone());
                }
                stats.messages.fetch_add(count, Ordering::Relaxed);
            }
            Ok((outcomes, new_ids))
        });
        match result {
            Ok((outcomes, new_ids)) => {
                topic.remember_ids(&new_ids, now);
                topic.publish_end();
                for (reply, out) in work.requests.into_iter().map(|r| r.2).zip(outcomes) {
                    let _ = reply.send(Ok(out));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                tracing::error!(topic = %topic.name, error = %msg, "write failed; publishers get an error and may retry with the same ids");
                for (_, _, reply) in work.requests {
                    let _ = reply.send(Err(Error::storage(
                        format!("writing topic `{}`", topic.name),
                        msg.clone(),
                    )));
                }
            }
        }
    }
}

type Appended = (Vec<Vec<Published>>, Vec<(u128, u64)>, u64);

/// Dedups and appends one topic's requests; returns per-request outcomes, the new ids
/// with their offsets (to remember once durable), and how many records were written.
fn append_topic(work: &TopicWork, now: u64) -> Result<Appended> {
    let topic = &work.topic;
    let mut next = topic.log.written_end();
    let mut pending: IdMap<u64> = IdMap::default();
    let mut payloads: Vec<bytes::Bytes> = Vec::new();
    let mut outcomes = Vec::with_capacity(work.requests.len());
    topic.ensure_dedup_loaded()?;
    let mut dedup = topic.dedup_snapshot_guard();
    dedup.expire(now);
    for (envelopes, use_dedup, _) in &work.requests {
        let mut out = Vec::with_capacity(envelopes.len());
        for env in envelopes {
            let id = env.id.as_u128();
            if *use_dedup {
                let seen = dedup.get(id).or_else(|| pending.get(&id).copied());
                if let Some(offset) = seen {
                    out.push(Published {
                        id: env.id,
                        offset,
                        duplicate: true,
                    });
                    continue;
                }
            }
            pending.insert(id, next);
            out.push(Published {
                id: env.id,
                offset: next,
                duplicate: false,
            });
            payloads.push(env.to_bytes());
            next += 1;
        }
        outcomes.push(out);
    }
    drop(dedup);
    let count = payloads.len() as u64;
    if count > 0 {
        let refs: Vec<&[u8]> = payloads.iter().map(|b| &b[..]).collect();
        let range = topic
            .log
            .append_batch(&refs, now)
            .map_err(|e| Error::storage(format!("appending to topic `{}`", topic.name), e))?;
        debug_assert_eq!(range.end, next);
    }
    Ok((outcomes, pending.into_iter().collect(), count))
}
