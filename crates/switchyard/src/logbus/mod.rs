//! A [`Bus`] over any append-only log: the consumer-group machinery shared by the
//! in-memory and the embedded backends.
//!
//! A backend provides storage ([`LogStorage`]: topic logs that append durably and read
//! by offset, and per-group change logs); [`LogBus`] adds everything else — consumer
//! groups with leases, per-subject ordering, redelivery with backoff, the DLQ and its
//! replay, size limits and retention — so every log backend behaves the same way. The
//! transient channel ([`Bus::publish_transient`]) is the shared in-process
//! [`TransientHub`]: nothing of it reaches the storage.

mod dedup;
mod group;

pub use dedup::{DEFAULT_MAX_DEDUP_IDS, DedupWindow, IdHasher, IdMap};
pub use group::{
    DeadLetterOrder, FailureInfo, GroupChange, GroupCore, GroupSettings, GroupSnapshot, Lease,
    StaleLease,
};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{Notify, watch};

use crate::bus::{
    Bus, Capabilities, DeadLetter, Delivery, DeliveryInfo, DeliverySource, Published,
    REPLAY_GROUP_EXTENSION, ReplayFilter, Settle, Settler, StartPosition, SubscribeOptions,
    Subscription, TransientHub, TransientSubscription, dlq_topic,
};
use crate::envelope::{Envelope, Timestamp};
use crate::error::{Error, Result, validate_name};

/// Name of the internal group that tracks which dead letters are still open.
const DLQ_GROUP: &str = "$dlq";

/// Extension attributes a dead letter carries.
mod dlq_attr {
    pub const TOPIC: &str = "dlqtopic";
    pub const GROUP: &str = "dlqgroup";
    pub const REASON: &str = "dlqreason";
    pub const ATTEMPTS: &str = "dlqattempts";
    pub const FIRST: &str = "dlqfirstfailure";
    pub const LAST: &str = "dlqlastfailure";
    pub const ALL: [&str; 6] = [TOPIC, GROUP, REASON, ATTEMPTS, FIRST, LAST];
}

/// One topic's log in a backend.
#[async_trait]
pub trait TopicLog: Send + Sync + 'static {
    /// Appends in order and returns once durable (per the backend's durability setting).
    /// With `dedup`, an id already stored within the window is not stored again.
    async fn append(&self, envelopes: Vec<Envelope>, dedup: bool) -> Result<Vec<Published>>;
    /// Up to `max` durable messages at offsets `>= from`, in offset order.
    fn read(&self, from: u64, max: usize) -> Result<Vec<(u64, Arc<Envelope>)>>;
    /// The durable end (one past the last readable offset), updated as publishes land.
    fn watch_end(&self) -> watch::Receiver<u64>;
    /// The first retained offset.
    fn start(&self) -> u64;
    /// Opens the durable state of `group`; `None` when the group is new.
    fn open_group(&self, group: &str) -> Result<(Box<dyn GroupLog>, Option<GroupSnapshot>)>;
    /// Names of the groups that have durable state.
    fn groups(&self) -> Result<Vec<String>>;
    /// Frees storage of messages below `before` (all groups are past them).
    fn reclaim(&self, before: u64) -> Result<()>;
}

/// The change log of one group's durable state.
pub trait GroupLog: Send + 'static {
    /// Records changes (may buffer; `flush` makes them survive a process crash).
    fn append(&mut self, changes: &[GroupChange]) -> Result<()>;
    /// Hands buffered changes to the OS (and to disk, where `sync` is set).
    fn flush(&mut self, sync: bool) -> Result<()>;
}

/// Storage for a [`LogBus`]: a set of named topic logs.
#[async_trait]
pub trait LogStorage: Send + Sync + 'static {
    /// The backend's topic type.
    type Topic: TopicLog;
    /// Opens (or creates) a topic.
    fn topic(&self, name: &str) -> Result<Arc<Self::Topic>>;
    /// What the backend supports.
    fn capabilities(&self) -> Capabilities;
    /// Makes everything durable and stops background work.
    async fn close(&self) -> Result<()>;
}

/// Settings of a [`LogBus`] that do not depend on the backend.
#[derive(Debug, Clone)]
pub struct LogBusConfig {
    /// Largest accepted message (envelope plus payload), in bytes.
    pub max_message_bytes: usize,
    /// How often group positions are handed to storage.
    pub group_flush_interval: Duration,
    /// Capacity of one transient member's queue (see [`crate::bus::transient`]).
    pub transient_queue: usize,
}

impl Default for LogBusConfig {
    fn default() -> Self {
        LogBusConfig {
            max_message_bytes: crate::bus::DEFAULT_MAX_MESSAGE_BYTES,
            group_flush_interval: Duration::from_millis(100),
            transient_queue: crate::bus::DEFAULT_TRANSIENT_QUEUE,
        }
    }
}

/// A bus over a [`LogStorage`]. See the [module docs](self).
pub struct LogBus<S: LogStorage> {
    inner: Arc<Inner<S>>,
}

impl<S: LogStorage> Clone for LogBus<S> {
    fn clone(&self) -> Self {
        LogBus {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<S: LogStorage> {
    storage: S,
    config: LogBusConfig,
    topics: Mutex<HashMap<String, Arc<TopicState<S::Topic>>>>,
    closed: AtomicBool,
    shutdown: Notify,
    transient: TransientHub,
}

struct TopicState<T: TopicLog> {
    name: Arc<str>,
    log: Arc<T>,
    groups: Mutex<HashMap<String, Arc<GroupShared<T>>>>,
    last_reclaim: Mutex<Instant>,
    replay_lock: tokio::sync::Mutex<()>,
}

struct GroupShared<T: TopicLog> {
    topic: Weak<TopicState<T>>,
    topic_name: Arc<str>,
    name: Arc<str>,
    core: Mutex<GroupCore>,
    store: Mutex<Box<dyn GroupLog>>,
    notify: Notify,
    floor: AtomicU64,
    dead_letters: Arc<dyn DeadLetterSink>,
}

/// Where a group sends messages that exhausted their attempts.
#[async_trait]
trait DeadLetterSink: Send + Sync + 'static {
    async fn store(&self, topic: &str, group: &str, order: &DeadLetterOrder) -> Result<()>;
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<S: LogStorage> LogBus<S> {
    /// A bus over `storage`. Starts a background task (needs a Tokio runtime).
    pub fn new(storage: S, config: LogBusConfig) -> Self {
        let inner = Arc::new(Inner {
            storage,
            transient: TransientHub::new(config.transient_queue),
            config,
            topics: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            shutdown: Notify::new(),
        });
        let weak = Arc::downgrade(&inner);
        let interval = inner.config.group_flush_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(inner) = weak.upgrade() else { return };
                if inner.closed.load(Ordering::Acquire) {
                    return;
                }
                inner.flush_groups(false);
            }
        });
        LogBus { inner }
    }

    /// The storage backend.
    pub fn storage(&self) -> &S {
        &self.inner.storage
    }

    /// The bus settings.
    pub fn config(&self) -> &LogBusConfig {
        &self.inner.config
    }
}

impl<S: LogStorage> Inner<S> {
    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }

    fn topic(self: &Arc<Self>, name: &str) -> Result<Arc<TopicState<S::Topic>>> {
        self.check_open()?;
        if let Some(t) = lock(&self.topics).get(name) {
            return Ok(t.clone());
        }
        validate_name("topic", name)?;
        let log = self.storage.topic(name)?;
        let mut topics = lock(&self.topics);
        if let Some(t) = topics.get(name) {
            return Ok(t.clone());
        }
        let state = Arc::new(TopicState {
            name: Arc::from(name),
            log,
            groups: Mutex::new(HashMap::new()),
            last_reclaim: Mutex::new(Instant::now()),
            replay_lock: tokio::sync::Mutex::new(()),
        });
        let sink: Arc<dyn DeadLetterSink> = Arc::new(DlqWriter {
            inner: Arc::downgrade(self),
        });
        for g in state.log.groups()? {
            state.group(&g, SubscribeOptions::default(), &sink)?;
        }
        topics.insert(name.to_string(), state.clone());
        Ok(state)
    }

    fn flush_groups(&self, sync: bool) {
        let topics: Vec<_> = lock(&self.topics).values().cloned().collect();
        for t in topics {
            let groups: Vec<_> = lock(&t.groups).values().cloned().collect();
            for g in groups {
                if let Err(e) = lock(&g.store).flush(sync) {
                    tracing::warn!(topic = %t.name, group = %g.name, error = %e, "flushing group position failed; will retry");
                }
            }
        }
    }

    fn check_size(&self, env: &Envelope) -> Result<()> {
        let size = env.encoded_len();
        if size > self.config.max_message_bytes {
            return Err(Error::PayloadTooLarge {
                size,
                limit: self.config.max_message_bytes,
            });
        }
        Ok(())
    }
}

fn settings(options: &SubscribeOptions) -> GroupSettings {
    GroupSettings {
        ack_wait: options.ack_wait,
        policy: options.redelivery.clone(),
        max_pending: options.max_pending.max(1),
    }
}

impl<T: TopicLog> TopicState<T> {
    fn group(
        self: &Arc<Self>,
        name: &str,
        options: SubscribeOptions,
        sink: &Arc<dyn DeadLetterSink>,
    ) -> Result<Arc<GroupShared<T>>> {
        let mut groups = lock(&self.groups);
        if let Some(g) = groups.get(name) {
            lock(&g.core).set_settings(settings(&options));
            return Ok(g.clone());
        }
        let (mut store, snapshot) = self.log.open_group(name)?;
        let snapshot = match snapshot {
            Some(s) => s,
            None => {
                let floor = match options.start {
                    StartPosition::Earliest => self.log.start(),
                    StartPosition::Latest => *self.log.watch_end().borrow(),
                };
                store.append(&[GroupChange::Floor(floor)])?;
                store.flush(true)?;
                GroupSnapshot {
                    floor,
                    ..Default::default()
                }
            }
        };
        let floor = snapshot.floor;
        let shared = Arc::new(GroupShared {
            topic: Arc::downgrade(self),
            topic_name: self.name.clone(),
            name: Arc::from(name),
            core: Mutex::new(GroupCore::new(
                Arc::from(name),
                settings(&options),
                snapshot,
            )),
            store: Mutex::new(store),
            notify: Notify::new(),
            floor: AtomicU64::new(floor),
            dead_letters: sink.clone(),
        });
        groups.insert(name.to_string(), shared.clone());
        Ok(shared)
    }

    fn maybe_reclaim(&self) {
        {
            let mut last = lock(&self.last_reclaim);
            if last.elapsed() < Duration::from_millis(500) {
                return;
            }
            *last = Instant::now();
        }
        let min = lock(&self.groups)
            .values()
            .map(|g| g.floor.load(Ordering::Acquire))
            .min();
        if let Some(min) = min
            && let Err(e) = self.log.reclaim(min)
        {
            tracing::warn!(topic = %self.name, error = %e, "reclaiming consumed messages failed; will retry");
        }
    }
}

impl<T: TopicLog> GroupShared<T> {
    /// Loads messages from the log while there is room. Caller holds the core lock.
    fn fill(&self, core: &mut GroupCore, log: &T, end: u64) -> Result<()> {
        for offset in core.take_reloads() {
            let env = log
                .read(offset, 1)?
                .into_iter()
                .find(|(o, _)| *o == offset)
                .map(|(_, e)| e);
            core.load_deferred(offset, env);
        }
        core.skip_to(log.start());
        while core.room() > 0 && core.next_load() < end {
            let batch = log.read(core.next_load(), core.room().min(1024))?;
            if batch.is_empty() {
                break;
            }
            for (offset, env) in batch {
                core.load(offset, env);
            }
        }
        Ok(())
    }

    /// Persists the core's changes. Caller holds the core lock.
    fn persist(&self, core: &mut GroupCore) -> Result<bool> {
        if !core.has_changes() {
            return Ok(false);
        }
        let changes = core.take_changes();
        let floor_moved = changes.iter().any(|c| matches!(c, GroupChange::Floor(_)));
        if floor_moved {
            self.floor.store(core.floor(), Ordering::Release);
        }
        lock(&self.store).append(&changes)?;
        Ok(floor_moved)
    }

    fn after_change(&self, floor_moved: bool) {
        if floor_moved && let Some(t) = self.topic.upgrade() {
            t.maybe_reclaim();
        }
    }

    async fn bury(&self, orders: Vec<DeadLetterOrder>) -> Result<()> {
        // Orders not carried out when this future is dropped (a `next_batch` or a settle
        // cancelled by its caller) or when it returns early go back to be issued again,
        // as after a failed move; else they would stay `Dying` for good.
        let mut unfinished = UnfinishedBurials {
            group: self,
            offsets: orders.iter().rev().map(|o| o.offset).collect(),
        };
        for order in orders {
            let stored = self
                .dead_letters
                .store(&self.topic_name, &self.name, &order)
                .await;
            unfinished.offsets.pop();
            let floor_moved = {
                let mut core = lock(&self.core);
                match &stored {
                    Ok(()) => core.dead_lettered(order.offset),
                    Err(_) => core.dead_letter_failed(order.offset, Instant::now()),
                }
                self.persist(&mut core)?
            };
            self.notify.notify_waiters();
            self.after_change(floor_moved);
            match stored {
                Ok(()) => tracing::warn!(
                    topic = %self.topic_name, group = %self.name, offset = order.offset,
                    id = %order.envelope.id, attempts = order.failure.attempts,
                    reason = %order.failure.last_error, "message moved to the dead-letter queue"
                ),
                Err(e) => {
                    tracing::error!(topic = %self.topic_name, group = %self.name, error = %e, "moving a message to the DLQ failed; will retry");
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

/// The offsets (last first) of a burial's orders not yet carried out; on drop they are
/// handed back to be issued again.
struct UnfinishedBurials<'a, T: TopicLog> {
    group: &'a GroupShared<T>,
    offsets: Vec<u64>,
}

impl<T: TopicLog> Drop for UnfinishedBurials<'_, T> {
    fn drop(&mut self) {
        if self.offsets.is_empty() {
            return;
        }
        let now = Instant::now();
        {
            let mut core = lock(&self.group.core);
            for &offset in &self.offsets {
                core.dead_letter_failed(offset, now);
            }
        }
        // Waiting consumers learn of the new deadline.
        self.group.notify.notify_waiters();
    }
}

#[async_trait]
impl<T: TopicLog> Settler for GroupShared<T> {
    async fn settle(&self, info: &DeliveryInfo, how: Settle) -> Result<()> {
        let stale = || Error::StaleDelivery {
            topic: info.topic.to_string(),
            group: info.group.to_string(),
            offset: info.offset,
        };
        let (order, floor_moved) = {
            let mut core = lock(&self.core);
            let order = match how {
                Settle::Ack => {
                    core.ack(info.offset, info.lease).map_err(|_| stale())?;
                    None
                }
                Settle::Nack { delay, reason } => core
                    .nack(info.offset, info.lease, Instant::now(), delay, reason)
                    .map_err(|_| stale())?,
                Settle::DeadLetter { reason } => Some(
                    core.dead_letter(info.offset, info.lease, reason)
                        .map_err(|_| stale())?,
                ),
            };
            (order, self.persist(&mut core)?)
        };
        self.notify.notify_waiters();
        self.after_change(floor_moved);
        if let Some(order) = order {
            self.bury(vec![order]).await?;
        }
        Ok(())
    }
}

struct DlqWriter<S: LogStorage> {
    inner: Weak<Inner<S>>,
}

#[async_trait]
impl<S: LogStorage> DeadLetterSink for DlqWriter<S> {
    async fn store(&self, topic: &str, group: &str, order: &DeadLetterOrder) -> Result<()> {
        let inner = self.inner.upgrade().ok_or(Error::Closed)?;
        let dlq = inner.topic(&dlq_topic(topic))?;
        // The DLQ's own bookkeeping group exists before its first entry, so retention never
        // reclaims an entry that has not been listed and replayed (other groups reading
        // the DLQ, e.g. for alerts, don't count as resolving it).
        let sink: Arc<dyn DeadLetterSink> = Arc::new(DlqWriter {
            inner: self.inner.clone(),
        });
        dlq.group(DLQ_GROUP, SubscribeOptions::default(), &sink)?;
        let f = &order.failure;
        let env = (*order.envelope)
            .clone()
            .with_extension(dlq_attr::TOPIC, topic)
            .with_extension(dlq_attr::GROUP, group)
            .with_extension(dlq_attr::REASON, f.last_error.clone())
            .with_extension(dlq_attr::ATTEMPTS, f.attempts.to_string())
            .with_extension(dlq_attr::FIRST, f.first_failure.to_string())
            .with_extension(dlq_attr::LAST, f.last_failure.to_string());
        // No dedup: the same message may fail again after a replay.
        dlq.log.append(vec![env], false).await?;
        Ok(())
    }
}

fn parse_dead_letter(offset: u64, env: &Envelope) -> DeadLetter {
    let attr = |k| env.extension(k).unwrap_or_default().to_string();
    let time = |k| {
        env.extension(k)
            .and_then(|v| v.parse().ok())
            .unwrap_or_default()
    };
    let mut original = env.clone();
    for k in dlq_attr::ALL {
        original.extensions.remove(k);
    }
    DeadLetter {
        dlq_offset: offset,
        topic: attr(dlq_attr::TOPIC),
        group: attr(dlq_attr::GROUP),
        reason: attr(dlq_attr::REASON),
        attempts: env
            .extension(dlq_attr::ATTEMPTS)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        first_failure: time(dlq_attr::FIRST),
        last_failure: time(dlq_attr::LAST),
        envelope: original,
    }
}

struct Consumer<S: LogStorage> {
    bus: Arc<Inner<S>>,
    topic: Arc<TopicState<S::Topic>>,
    group: Arc<GroupShared<S::Topic>>,
    end: watch::Receiver<u64>,
}

#[async_trait]
impl<S: LogStorage> DeliverySource for Consumer<S> {
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>> {
        loop {
            let notified = self.group.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.bus.check_open()?;
            let end = *self.end.borrow_and_update();
            let now = Instant::now();
            let mut dead = Vec::new();
            let (leases, wake, floor_moved) = {
                let mut core = lock(&self.group.core);
                core.expire(now, &mut dead);
                let mut leases = Vec::new();
                if dead.is_empty() {
                    self.group.fill(&mut core, &self.topic.log, end)?;
                    while leases.len() < max {
                        match core.poll(now, &mut dead) {
                            Some(l) => leases.push(l),
                            None => break,
                        }
                    }
                }
                let moved = self.group.persist(&mut core)?;
                (leases, core.next_wakeup(), moved)
            };
            if !dead.is_empty() {
                self.group.after_change(floor_moved);
                self.group.bury(dead).await?;
                continue;
            }
            self.group.after_change(floor_moved);
            if !leases.is_empty() {
                let settler: Arc<dyn Settler> = self.group.clone();
                return Ok(leases
                    .into_iter()
                    .map(|l| {
                        Delivery::new(
                            l.envelope,
                            DeliveryInfo {
                                topic: self.topic.name.clone(),
                                group: self.group.name.clone(),
                                offset: l.offset,
                                attempt: l.attempt,
                                lease: l.lease,
                            },
                            settler.clone(),
                        )
                    })
                    .collect());
            }
            let sleep = async {
                match wake {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut notified => {}
                r = self.end.changed() => if r.is_err() { return Err(Error::Closed) },
                _ = sleep => {}
                _ = self.bus.shutdown.notified() => return Err(Error::Closed),
            }
        }
    }
}

#[async_trait]
impl<S: LogStorage> Bus for LogBus<S> {
    fn capabilities(&self) -> Capabilities {
        self.inner.storage.capabilities()
    }

    async fn publish(&self, topic: &str, envelope: Envelope) -> Result<Published> {
        self.inner.check_size(&envelope)?;
        let t = self.inner.topic(topic)?;
        let mut out = t.log.append(vec![envelope], true).await?;
        out.pop()
            .ok_or_else(|| Error::storage("publishing", "backend returned no result"))
    }

    async fn publish_batch(&self, topic: &str, envelopes: Vec<Envelope>) -> Result<Vec<Published>> {
        for e in &envelopes {
            self.inner.check_size(e)?;
        }
        if envelopes.is_empty() {
            return Ok(Vec::new());
        }
        let t = self.inner.topic(topic)?;
        t.log.append(envelopes, true).await
    }

    async fn subscribe(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription> {
        validate_name("group", group)?;
        if group.starts_with('$') {
            return Err(Error::InvalidName {
                what: "group",
                name: group.to_string(),
                reason: "names starting with `$` are reserved for the bus",
            });
        }
        let t = self.inner.topic(topic)?;
        let sink: Arc<dyn DeadLetterSink> = Arc::new(DlqWriter {
            inner: Arc::downgrade(&self.inner),
        });
        let g = t.group(group, options, &sink)?;
        Ok(Subscription::new(Box::new(Consumer {
            bus: self.inner.clone(),
            end: t.log.watch_end(),
            topic: t,
            group: g,
        })))
    }

    async fn dead_letters(&self, topic: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        validate_name("topic", topic)?;
        let dlq = self.inner.topic(&dlq_topic(topic))?;
        let sink: Arc<dyn DeadLetterSink> = Arc::new(DlqWriter {
            inner: Arc::downgrade(&self.inner),
        });
        let g = dlq.group(DLQ_GROUP, SubscribeOptions::default(), &sink)?;
        let end = *dlq.log.watch_end().borrow();
        let mut core = lock(&g.core);
        g.fill(&mut core, &dlq.log, end)?;
        Ok(core
            .pending_entries(limit)
            .iter()
            .map(|(o, e)| parse_dead_letter(*o, e))
            .collect())
    }

    async fn replay_dead_letters(&self, topic: &str, filter: ReplayFilter) -> Result<usize> {
        validate_name("topic", topic)?;
        let target = self.inner.topic(topic)?;
        let dlq = self.inner.topic(&dlq_topic(topic))?;
        let _serial = dlq.replay_lock.lock().await;
        let sink: Arc<dyn DeadLetterSink> = Arc::new(DlqWriter {
            inner: Arc::downgrade(&self.inner),
        });
        let g = dlq.group(DLQ_GROUP, SubscribeOptions::default(), &sink)?;
        let mut replayed = 0;
        let mut after = None::<u64>;
        loop {
            let batch: Vec<(u64, Arc<Envelope>)> = {
                let end = *dlq.log.watch_end().borrow();
                let mut core = lock(&g.core);
                g.fill(&mut core, &dlq.log, end)?;
                core.pending_entries(usize::MAX)
                    .into_iter()
                    .filter(|(o, _)| after.is_none_or(|a| *o > a))
                    .take(1024)
                    .collect()
            };
            let Some(last) = batch.last().map(|(o, _)| *o) else {
                break;
            };
            after = Some(last);
            let mut chosen = Vec::new();
            let mut envelopes = Vec::new();
            for (offset, env) in batch {
                let dl = parse_dead_letter(offset, &env);
                let group_ok = filter.group.as_deref().is_none_or(|g| g == dl.group);
                let id_ok = filter
                    .ids
                    .as_ref()
                    .is_none_or(|ids| ids.contains(&dl.envelope.id));
                if group_ok && id_ok && dl.topic == topic {
                    let mut e = dl.envelope;
                    e.extensions
                        .insert(REPLAY_GROUP_EXTENSION.to_string(), dl.group.clone());
                    envelopes.push(e);
                    chosen.push(offset);
                }
            }
            if chosen.is_empty() {
                continue;
            }
            // Durable in the topic first, then resolved in the DLQ: a crash between the two
            // replays twice (at least once), never zero times.
            target.log.append(envelopes, false).await?;
            let floor_moved = {
                let mut core = lock(&g.core);
                for o in &chosen {
                    core.force_done(*o);
                }
                g.persist(&mut core)?
            };
            lock(&g.store).flush(false)?;
            g.after_change(floor_moved);
            replayed += chosen.len();
        }
        if replayed > 0 {
            tracing::info!(topic, replayed, group = ?filter.group, "replayed dead letters");
        }
        Ok(replayed)
    }

    async fn publish_transient(&self, topic: &str, envelope: Envelope) -> Result<()> {
        self.inner.check_open()?;
        self.inner.check_size(&envelope)?;
        self.inner.transient.publish(topic, envelope)
    }

    async fn subscribe_transient(&self, topic: &str, group: &str) -> Result<TransientSubscription> {
        self.inner.check_open()?;
        self.inner.transient.subscribe(topic, group)
    }

    async fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.inner.transient.close();
        self.inner.flush_groups(true);
        self.inner.shutdown.notify_waiters();
        let topics: Vec<_> = lock(&self.inner.topics).values().cloned().collect();
        for t in topics {
            for g in lock(&t.groups).values() {
                g.notify.notify_waiters();
            }
        }
        self.inner.storage.close().await
    }
}

impl<S: LogStorage> LogBus<S> {
    /// The acknowledged position (floor) of every known group of `topic`: all messages
    /// below it are settled.
    pub fn group_positions(&self, topic: &str) -> Result<Vec<(String, u64)>> {
        let t = self.inner.topic(topic)?;
        let mut v: Vec<_> = lock(&t.groups)
            .iter()
            .filter(|(n, _)| !n.starts_with('$'))
            .map(|(n, g)| (n.clone(), g.floor.load(Ordering::Acquire)))
            .collect();
        v.sort();
        Ok(v)
    }

    /// The counters of the transient channel.
    pub fn transient_stats(&self) -> crate::bus::TransientStats {
        self.inner.transient.stats()
    }

    /// How many dead letters of `topic` are open (not replayed).
    pub async fn dead_letter_count(&self, topic: &str) -> Result<usize> {
        Ok(self.dead_letters(topic, usize::MAX).await?.len())
    }
}

/// The current wall-clock time in milliseconds since the epoch (for storage timestamps).
pub fn now_ms() -> u64 {
    Timestamp::now().unix_micros() / 1000
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryStorage;

    /// A dead-letter queue that never answers, so a move can be caught midway.
    struct StuckSink;

    #[async_trait]
    impl DeadLetterSink for StuckSink {
        async fn store(&self, _: &str, _: &str, _: &DeadLetterOrder) -> Result<()> {
            std::future::pending().await
        }
    }

    /// A settle that moves a message to the DLQ, dropped while the move waits (its caller
    /// gave up), leaves the message to be moved again — not stuck half-way for good.
    #[tokio::test]
    async fn a_move_to_the_dlq_dropped_midway_is_issued_again() {
        let bus = LogBus::new(
            MemoryStorage::new(Duration::from_secs(60)),
            LogBusConfig::default(),
        );
        let env = Envelope::new("t.v1", "/test", crate::envelope::JSON_CONTENT_TYPE, "{}");
        bus.publish("t", env).await.unwrap();
        let topic = bus.inner.topic("t").unwrap();
        let sink: Arc<dyn DeadLetterSink> = Arc::new(StuckSink);
        let group = topic
            .group("g", SubscribeOptions::default(), &sink)
            .unwrap();
        let mut consumer = Consumer {
            bus: bus.inner.clone(),
            end: topic.log.watch_end(),
            topic: topic.clone(),
            group: group.clone(),
        };
        let mut batch = consumer.next_batch(1).await.unwrap();
        let delivery = batch.pop().unwrap();
        let settle =
            tokio::time::timeout(Duration::from_millis(50), delivery.dead_letter("poison"));
        assert!(settle.await.is_err(), "the stuck move cannot finish");
        // Issued again once its short lease runs out: the next poll orders the move anew.
        let mut dead = Vec::new();
        lock(&group.core).expire(Instant::now() + Duration::from_secs(1), &mut dead);
        assert_eq!(dead.len(), 1, "the message is stuck half-way to the DLQ");
        assert_eq!(dead[0].offset, 0);
    }
}
