//! The outbox relay: publishes committed outbox entries to the bus, in commit order,
//! with their original ids, and removes them once the bus has them.
//!
//! A crash between publishing and removing re-publishes the same ids on restart; the bus's
//! publisher dedup absorbs them (within its window), so consumers see each message once
//! per group (and the inbox absorbs anything older).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::bus::Bus;
use crate::error::Result;
use crate::store::{OutboxEntry, Store};

/// Counters of a relay.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Messages handed to the bus (including re-publishes the bus found duplicate).
    pub published: AtomicU64,
    /// Publishes the bus reported as duplicates (re-publishes after a crash).
    pub duplicates: AtomicU64,
    /// Failed attempts (retried with backoff).
    pub errors: AtomicU64,
}

/// Moves a store's outbox to a bus. See the [module docs](self).
pub struct OutboxRelay {
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    batch: usize,
    stats: Arc<RelayStats>,
}

impl OutboxRelay {
    /// A relay from `store` to `bus`, moving up to 1024 entries per round.
    pub fn new(store: Arc<dyn Store>, bus: Arc<dyn Bus>) -> Self {
        OutboxRelay {
            store,
            bus,
            batch: 1024,
            stats: Arc::new(RelayStats::default()),
        }
    }

    /// Entries per round.
    pub fn batch(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }

    /// The relay's counters.
    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// Entries waiting in the outbox (the relay's backlog).
    pub async fn backlog(&self) -> Result<u64> {
        self.store.outbox_len().await
    }

    /// Publishes what is in the outbox now (one round); returns how many entries moved.
    pub async fn relay_once(&self) -> Result<usize> {
        let entries = self.store.outbox_peek(self.batch).await?;
        if entries.is_empty() {
            return Ok(0);
        }
        // Consecutive entries of one topic go out as one batch, runs in commit order.
        let mut start = 0;
        while start < entries.len() {
            let topic = &entries[start].topic;
            let end = entries[start..]
                .iter()
                .position(|e| &e.topic != topic)
                .map_or(entries.len(), |p| start + p);
            let run: Vec<_> = entries[start..end]
                .iter()
                .map(|e: &OutboxEntry| e.envelope.clone())
                .collect();
            let published = self.bus.publish_batch(topic, run).await?;
            let dups = published.iter().filter(|p| p.duplicate).count() as u64;
            self.stats
                .published
                .fetch_add(published.len() as u64, Ordering::Relaxed);
            self.stats.duplicates.fetch_add(dups, Ordering::Relaxed);
            start = end;
        }
        let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
        self.store.outbox_remove(&seqs).await?;
        Ok(entries.len())
    }

    /// Relays until `shutdown` completes, waking on every commit that appends to the
    /// outbox (and every 200 ms). Errors are logged and retried with backoff (up to 5 s).
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let notify = self.store.outbox_notify();
        let mut backoff = Duration::from_millis(50);
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.relay_once().await {
                Ok(n) if n > 0 => {
                    backoff = Duration::from_millis(50);
                    continue;
                }
                Ok(_) => {
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        _ = &mut shutdown => return,
                    }
                }
                Err(e) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, retry_in = ?backoff, "outbox relay failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = &mut shutdown => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
