//! The in-memory backend: the full bus contract, nothing on disk.
//!
//! For unit tests and examples: it passes the conformance suite except the cases that
//! need durability across processes (declared in [`MemoryStorage::capabilities`]).
//! Group positions survive re-subscribing within the same [`MemoryBus`].

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::bus::{Capabilities, Capability, Published};
use crate::envelope::Envelope;
use crate::error::Result;
use crate::logbus::{
    DedupWindow, GroupChange, GroupLog, GroupSnapshot, LogBus, LogBusConfig, LogStorage, TopicLog,
    now_ms,
};

/// A bus that keeps everything in memory.
pub type MemoryBus = LogBus<MemoryStorage>;

impl MemoryBus {
    /// A new, empty in-memory bus with default settings (2-minute dedup window).
    pub fn in_memory() -> Self {
        LogBus::new(
            MemoryStorage::new(Duration::from_secs(120)),
            LogBusConfig::default(),
        )
    }
}

/// Topics held in memory.
pub struct MemoryStorage {
    dedup_window: Duration,
    topics: Mutex<HashMap<String, Arc<MemoryTopic>>>,
}

impl MemoryStorage {
    /// Empty storage with the given publisher-dedup window.
    pub fn new(dedup_window: Duration) -> Self {
        MemoryStorage {
            dedup_window,
            topics: Mutex::new(HashMap::new()),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[async_trait]
impl LogStorage for MemoryStorage {
    type Topic = MemoryTopic;

    fn topic(&self, name: &str) -> Result<Arc<MemoryTopic>> {
        let mut topics = lock(&self.topics);
        Ok(topics
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(MemoryTopic {
                    log: Mutex::new(Log {
                        base: 0,
                        messages: VecDeque::new(),
                        dedup: DedupWindow::new(self.dedup_window),
                    }),
                    end: watch::channel(0).0,
                    groups: Arc::new(Mutex::new(HashMap::new())),
                })
            })
            .clone())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::all()
            .without(
                Capability::Durable,
                "in-memory: messages live as long as the MemoryBus",
            )
            .without(
                Capability::CrashSafe,
                "in-memory: a killed process takes its messages with it",
            )
            .without(
                Capability::Reopen,
                "in-memory: another process cannot see this process's memory",
            )
            .without(
                Capability::BoundedBacklogMemory,
                "in-memory: the backlog itself is held in memory",
            )
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

struct Log {
    base: u64,
    messages: VecDeque<Arc<Envelope>>,
    dedup: DedupWindow,
}

/// One in-memory topic.
pub struct MemoryTopic {
    log: Mutex<Log>,
    end: watch::Sender<u64>,
    groups: Arc<Mutex<HashMap<String, GroupSnapshot>>>,
}

#[async_trait]
impl TopicLog for MemoryTopic {
    async fn append(&self, envelopes: Vec<Envelope>, dedup: bool) -> Result<Vec<Published>> {
        let now = now_ms();
        let mut log = lock(&self.log);
        log.dedup.expire(now);
        let mut out = Vec::with_capacity(envelopes.len());
        for env in envelopes {
            let id = env.id;
            if dedup && let Some(offset) = log.dedup.get(id.as_u128()) {
                out.push(Published {
                    id,
                    offset,
                    duplicate: true,
                });
                continue;
            }
            let offset = log.base + log.messages.len() as u64;
            log.messages.push_back(Arc::new(env));
            log.dedup.insert(id.as_u128(), offset, now);
            out.push(Published {
                id,
                offset,
                duplicate: false,
            });
        }
        let end = log.base + log.messages.len() as u64;
        drop(log);
        self.end.send_replace(end);
        Ok(out)
    }

    fn read(&self, from: u64, max: usize) -> Result<Vec<(u64, Arc<Envelope>)>> {
        let log = lock(&self.log);
        let start = from.max(log.base);
        let skip = (start - log.base) as usize;
        Ok(log
            .messages
            .iter()
            .skip(skip)
            .take(max)
            .enumerate()
            .map(|(i, e)| (start + i as u64, e.clone()))
            .collect())
    }

    fn watch_end(&self) -> watch::Receiver<u64> {
        self.end.subscribe()
    }

    fn start(&self) -> u64 {
        lock(&self.log).base
    }

    fn open_group(&self, group: &str) -> Result<(Box<dyn GroupLog>, Option<GroupSnapshot>)> {
        let snapshot = lock(&self.groups).get(group).cloned();
        Ok((
            Box::new(MemoryGroupLog {
                name: group.to_string(),
                groups: self.groups.clone(),
            }),
            snapshot,
        ))
    }

    fn groups(&self) -> Result<Vec<String>> {
        Ok(lock(&self.groups).keys().cloned().collect())
    }

    fn reclaim(&self, before: u64) -> Result<()> {
        let mut log = lock(&self.log);
        while log.base < before && !log.messages.is_empty() {
            log.messages.pop_front();
            log.base += 1;
        }
        Ok(())
    }
}

struct MemoryGroupLog {
    name: String,
    groups: Arc<Mutex<HashMap<String, GroupSnapshot>>>,
}

impl GroupLog for MemoryGroupLog {
    fn append(&mut self, changes: &[GroupChange]) -> Result<()> {
        let mut groups = lock(&self.groups);
        let snap = groups.entry(self.name.clone()).or_default();
        for c in changes {
            snap.apply(c.clone());
        }
        Ok(())
    }

    fn flush(&mut self, _sync: bool) -> Result<()> {
        Ok(())
    }
}
