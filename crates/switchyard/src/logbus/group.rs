//! The state of one consumer group over a log, as a state machine with no I/O.
//!
//! [`GroupCore`] decides which message is handed out next, tracks leases, attempts,
//! backoff and per-subject ordering, and says what must be persisted
//! ([`GroupChange`]) and what must be dead-lettered ([`DeadLetterOrder`]). The driver in
//! [`super`] does the reading, writing and waiting. Time is passed in, so tests feed
//! sequences of events and instants without sleeping.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bus::{REPLAY_GROUP_EXTENSION, RedeliveryPolicy};
use crate::envelope::{Envelope, Timestamp};

/// Failure history of one message in one group (persisted, shown in the DLQ).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureInfo {
    /// Deliveries made so far.
    pub attempts: u32,
    /// First failure.
    pub first_failure: Timestamp,
    /// Latest failure.
    pub last_failure: Timestamp,
    /// Latest reason.
    pub last_error: String,
}

/// A change of a group's durable state, for the backend to persist (in order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupChange {
    /// Every offset below this is settled (acked or dead-lettered).
    Floor(u64),
    /// This offset (at or above the floor) is settled.
    Done(u64),
    /// This offset failed; its history so far.
    Failed(u64, FailureInfo),
}

/// A group's durable state as loaded by a backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupSnapshot {
    /// Every offset below is settled.
    pub floor: u64,
    /// Settled offsets at or above the floor.
    pub done: BTreeSet<u64>,
    /// Failure history of unsettled offsets.
    pub failures: BTreeMap<u64, FailureInfo>,
}

impl GroupSnapshot {
    /// Applies one persisted change (backends replay their change log through this).
    pub fn apply(&mut self, change: GroupChange) {
        match change {
            GroupChange::Floor(f) => {
                if f > self.floor {
                    self.floor = f;
                    self.done = self.done.split_off(&f);
                    self.failures = self.failures.split_off(&f);
                }
            }
            GroupChange::Done(o) => {
                if o >= self.floor {
                    self.done.insert(o);
                    self.failures.remove(&o);
                }
            }
            GroupChange::Failed(o, info) => {
                if o >= self.floor && !self.done.contains(&o) {
                    self.failures.insert(o, info);
                }
            }
        }
    }

    /// The changes that recreate this snapshot (for compaction).
    pub fn to_changes(&self) -> Vec<GroupChange> {
        let mut v = vec![GroupChange::Floor(self.floor)];
        v.extend(self.done.iter().map(|o| GroupChange::Done(*o)));
        v.extend(
            self.failures
                .iter()
                .map(|(o, i)| GroupChange::Failed(*o, i.clone())),
        );
        v
    }
}

/// A message the driver must move to the DLQ, then report with [`GroupCore::dead_lettered`].
#[derive(Debug, Clone)]
pub struct DeadLetterOrder {
    /// Position in the topic.
    pub offset: u64,
    /// The message.
    pub envelope: Arc<Envelope>,
    /// Its failure history.
    pub failure: FailureInfo,
}

/// A message handed out.
#[derive(Debug, Clone)]
pub struct Lease {
    /// Position in the topic.
    pub offset: u64,
    /// Identifies this hand-out.
    pub lease: u64,
    /// 1-based delivery count.
    pub attempt: u32,
    /// The message.
    pub envelope: Arc<Envelope>,
}

/// Why a settle was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaleLease;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waits behind an earlier message of its subject.
    Blocked,
    Ready,
    Delayed(Instant),
    InFlight {
        lease: u64,
        deadline: Instant,
    },
    /// Being moved to the DLQ; keeps its subject blocked until done.
    Dying,
}

#[derive(Debug)]
struct Entry {
    envelope: Arc<Envelope>,
    subject: Option<Arc<str>>,
    state: State,
    attempts: u32,
    failure: Option<FailureInfo>,
}

/// Most loaded messages one subject may hold while they wait behind its head (and at most
/// a quarter of `max_pending`). Later ones are only remembered by offset and read again
/// when the subject drains, so a parked subject with a long backlog never fills the
/// group's window and stalls the others.
pub const MAX_LOADED_PER_SUBJECT: usize = 256;

/// Settings the core needs.
#[derive(Debug, Clone)]
pub struct GroupSettings {
    /// Lease length.
    pub ack_wait: Duration,
    /// Retry policy.
    pub policy: RedeliveryPolicy,
    /// Most loaded, unsettled messages.
    pub max_pending: usize,
}

/// One group's in-memory state. See the module docs.
#[derive(Debug)]
pub struct GroupCore {
    group: Arc<str>,
    settings: GroupSettings,
    next_load: u64,
    entries: BTreeMap<u64, Entry>,
    ready: BTreeSet<u64>,
    delayed: BinaryHeap<Reverse<(Instant, u64)>>,
    inflight: BinaryHeap<Reverse<(Instant, u64, u64)>>,
    subjects: HashMap<Arc<str>, VecDeque<u64>>,
    /// Offsets read but not kept in memory because their subject already has
    /// [`MAX_LOADED_PER_SUBJECT`] loaded messages waiting: re-read when the subject drains.
    deferred: BTreeMap<u64, Arc<str>>,
    /// Deferred offsets per subject not yet asked to be re-read, oldest first.
    deferred_queue: HashMap<Arc<str>, VecDeque<u64>>,
    /// Deferred offsets per subject, asked for or not (while > 0, newer messages of the
    /// subject are deferred too, so order holds).
    deferred_count: HashMap<Arc<str>, usize>,
    reloads: Vec<u64>,
    restored_done: BTreeSet<u64>,
    restored_failures: BTreeMap<u64, FailureInfo>,
    next_lease: u64,
    persisted_floor: u64,
    changes: Vec<GroupChange>,
}

impl GroupCore {
    /// A group resuming from `snapshot`.
    pub fn new(group: Arc<str>, settings: GroupSettings, snapshot: GroupSnapshot) -> Self {
        GroupCore {
            group,
            settings,
            next_load: snapshot.floor,
            entries: BTreeMap::new(),
            ready: BTreeSet::new(),
            delayed: BinaryHeap::new(),
            inflight: BinaryHeap::new(),
            subjects: HashMap::new(),
            deferred: BTreeMap::new(),
            deferred_queue: HashMap::new(),
            deferred_count: HashMap::new(),
            reloads: Vec::new(),
            restored_done: snapshot.done,
            restored_failures: snapshot.failures,
            next_lease: 1,
            persisted_floor: snapshot.floor,
            changes: Vec::new(),
        }
    }

    /// Replaces the settings (a new subscriber's options).
    pub fn set_settings(&mut self, settings: GroupSettings) {
        self.settings = settings;
    }

    /// The group's name.
    pub fn group(&self) -> &Arc<str> {
        &self.group
    }

    fn subject_limit(&self) -> usize {
        MAX_LOADED_PER_SUBJECT
            .min(self.settings.max_pending / 4)
            .max(1)
    }

    /// Next offset to load from the log.
    pub fn next_load(&self) -> u64 {
        self.next_load
    }

    /// How many more messages the group may load now.
    pub fn room(&self) -> usize {
        self.settings.max_pending.saturating_sub(self.entries.len())
    }

    /// Loaded, unsettled messages.
    pub fn pending(&self) -> usize {
        self.entries.len()
    }

    /// Every offset below this is settled.
    pub fn floor(&self) -> u64 {
        let loaded = self
            .entries
            .first_key_value()
            .map_or(self.next_load, |(o, _)| *o);
        let deferred = self
            .deferred
            .first_key_value()
            .map_or(self.next_load, |(o, _)| *o);
        loaded.min(deferred)
    }

    /// Offsets to read again (their subject has room now); the driver reads each and
    /// hands it to [`GroupCore::load_deferred`].
    pub fn take_reloads(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.reloads)
    }

    /// Offsets remembered but not loaded (waiting behind a long subject).
    pub fn deferred(&self) -> usize {
        self.deferred.len()
    }

    /// Takes the changes to persist, in order.
    pub fn take_changes(&mut self) -> Vec<GroupChange> {
        std::mem::take(&mut self.changes)
    }

    /// True when there are changes to persist.
    pub fn has_changes(&self) -> bool {
        !self.changes.is_empty()
    }

    /// The log's start moved past `start` (retention): skip what is gone.
    pub fn skip_to(&mut self, start: u64) {
        if start > self.next_load && self.entries.is_empty() && self.deferred.is_empty() {
            self.next_load = start;
            self.note_floor();
        }
    }

    /// Adds the next message from the log at `offset` (must be >= `next_load`).
    pub fn load(&mut self, offset: u64, envelope: Arc<Envelope>) {
        if offset < self.next_load {
            return;
        }
        self.next_load = offset + 1;
        if self.restored_done.remove(&offset) {
            self.note_floor();
            return;
        }
        if let Some(target) = envelope.extension(REPLAY_GROUP_EXTENSION)
            && target != &*self.group
        {
            self.note_floor();
            return;
        }
        let subject: Option<Arc<str>> = envelope.subject.as_deref().map(Arc::from);
        if let Some(s) = &subject {
            let loaded = self.subjects.get(s).map_or(0, VecDeque::len);
            let behind = self.deferred_count.get(s).is_some_and(|n| *n > 0);
            if behind || loaded >= self.subject_limit() {
                self.deferred.insert(offset, s.clone());
                self.deferred_queue
                    .entry(s.clone())
                    .or_default()
                    .push_back(offset);
                *self.deferred_count.entry(s.clone()).or_default() += 1;
                return;
            }
        }
        self.insert_loaded(offset, envelope, subject);
    }

    /// Adds a deferred message read again (see [`GroupCore::take_reloads`]); `None` when
    /// the log no longer has it, which settles it.
    pub fn load_deferred(&mut self, offset: u64, envelope: Option<Arc<Envelope>>) {
        let Some(subject) = self.deferred.remove(&offset) else {
            return;
        };
        if let Some(n) = self.deferred_count.get_mut(&subject) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.deferred_count.remove(&subject);
                self.deferred_queue.remove(&subject);
            }
        }
        match envelope {
            Some(env) => self.insert_loaded(offset, env, Some(subject)),
            None => self.note_floor(),
        }
    }

    fn insert_loaded(&mut self, offset: u64, envelope: Arc<Envelope>, subject: Option<Arc<str>>) {
        let state = match &subject {
            Some(s) => {
                let q = self.subjects.entry(s.clone()).or_default();
                q.push_back(offset);
                if q.len() == 1 {
                    State::Ready
                } else {
                    State::Blocked
                }
            }
            None => State::Ready,
        };
        if state == State::Ready {
            self.ready.insert(offset);
        }
        let failure = self.restored_failures.remove(&offset);
        let attempts = failure.as_ref().map_or(0, |f| f.attempts);
        self.entries.insert(
            offset,
            Entry {
                envelope,
                subject,
                state,
                attempts,
                failure,
            },
        );
    }

    /// Processes expired leases and due backoffs, then hands out the oldest ready message.
    ///
    /// Expired leases that exhausted their attempts are returned in `dead` for the driver
    /// to move to the DLQ.
    pub fn poll(&mut self, now: Instant, dead: &mut Vec<DeadLetterOrder>) -> Option<Lease> {
        self.expire(now, dead);
        let offset = self.ready.pop_first()?;
        let lease = self.next_lease;
        self.next_lease += 1;
        let deadline = now + self.settings.ack_wait;
        let entry = self.entries.get_mut(&offset)?;
        entry.state = State::InFlight { lease, deadline };
        entry.attempts += 1;
        self.inflight.push(Reverse((deadline, offset, lease)));
        Some(Lease {
            offset,
            lease,
            attempt: entry.attempts,
            envelope: entry.envelope.clone(),
        })
    }

    /// The earliest instant at which `poll` may have something new (a lease expiring or a
    /// backoff ending), if any.
    pub fn next_wakeup(&self) -> Option<Instant> {
        let a = self.delayed.peek().map(|Reverse((t, _))| *t);
        let b = self.inflight.peek().map(|Reverse((t, _, _))| *t);
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// True when a message is ready to hand out now.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Settles `offset` whatever its state (an operator resolved it, e.g. a replayed dead letter).
    pub fn force_done(&mut self, offset: u64) {
        self.settle_done(offset);
    }

    /// Up to `limit` loaded, unsettled messages, oldest first (for listings).
    pub fn pending_entries(&self, limit: usize) -> Vec<(u64, Arc<Envelope>)> {
        self.entries
            .iter()
            .take(limit)
            .map(|(o, e)| (*o, e.envelope.clone()))
            .collect()
    }

    /// Moves expired leases to backoff (or the DLQ) and due backoffs to ready.
    pub fn expire(&mut self, now: Instant, dead: &mut Vec<DeadLetterOrder>) {
        while let Some(Reverse((deadline, offset, lease))) = self.inflight.peek().copied() {
            if deadline > now {
                break;
            }
            self.inflight.pop();
            let current = self.entries.get(&offset).map(|e| e.state);
            if current == Some(State::InFlight { lease, deadline }) {
                let reason = format!(
                    "not acknowledged within the ack wait of {:?}",
                    self.settings.ack_wait
                );
                if let Some(order) = self.fail(offset, now, None, reason) {
                    dead.push(order);
                }
            }
        }
        while let Some(Reverse((due, offset))) = self.delayed.peek().copied() {
            if due > now {
                break;
            }
            self.delayed.pop();
            if let Some(e) = self.entries.get_mut(&offset)
                && e.state == State::Delayed(due)
            {
                e.state = State::Ready;
                self.ready.insert(offset);
            }
        }
    }

    fn check(&self, offset: u64, lease: u64) -> Result<(), StaleLease> {
        match self.entries.get(&offset).map(|e| e.state) {
            Some(State::InFlight { lease: l, .. }) if l == lease => Ok(()),
            _ => Err(StaleLease),
        }
    }

    /// Acknowledges a lease.
    pub fn ack(&mut self, offset: u64, lease: u64) -> Result<(), StaleLease> {
        self.check(offset, lease)?;
        self.settle_done(offset);
        Ok(())
    }

    /// Reports a failed lease: schedules a retry, or returns a DLQ order when attempts are exhausted.
    pub fn nack(
        &mut self,
        offset: u64,
        lease: u64,
        now: Instant,
        delay: Option<Duration>,
        reason: String,
    ) -> Result<Option<DeadLetterOrder>, StaleLease> {
        self.check(offset, lease)?;
        Ok(self.fail(offset, now, delay, reason))
    }

    /// Dead-letters a lease now (terminal failure); returns the DLQ order.
    pub fn dead_letter(
        &mut self,
        offset: u64,
        lease: u64,
        reason: String,
    ) -> Result<DeadLetterOrder, StaleLease> {
        self.check(offset, lease)?;
        let entry = self.entries.get_mut(&offset).ok_or(StaleLease)?;
        let now = Timestamp::now();
        let info = record_failure(entry, now, reason);
        entry.state = State::Dying;
        self.changes.push(GroupChange::Failed(offset, info.clone()));
        Ok(DeadLetterOrder {
            offset,
            envelope: entry.envelope.clone(),
            failure: info,
        })
    }

    /// The DLQ has the message: settle it and release its subject.
    pub fn dead_lettered(&mut self, offset: u64) {
        if matches!(
            self.entries.get(&offset).map(|e| e.state),
            Some(State::Dying)
        ) {
            self.settle_done(offset);
        }
    }

    /// Moving to the DLQ failed (storage error): keep the message and retry the move later.
    pub fn dead_letter_failed(&mut self, offset: u64, now: Instant) {
        if let Some(e) = self.entries.get_mut(&offset)
            && e.state == State::Dying
        {
            // Back to a lease that expires at once, so the next poll re-issues the order.
            let lease = self.next_lease;
            self.next_lease += 1;
            let deadline = now + Duration::from_millis(500);
            e.state = State::InFlight { lease, deadline };
            e.attempts = e.attempts.max(self.settings.policy.max_attempts.max(1));
            self.inflight.push(Reverse((deadline, offset, lease)));
        }
    }

    fn fail(
        &mut self,
        offset: u64,
        now: Instant,
        delay: Option<Duration>,
        reason: String,
    ) -> Option<DeadLetterOrder> {
        let policy = self.settings.policy.clone();
        let entry = self.entries.get_mut(&offset)?;
        let info = record_failure(entry, Timestamp::now(), reason);
        self.changes.push(GroupChange::Failed(offset, info.clone()));
        if policy.exhausted(entry.attempts) {
            entry.state = State::Dying;
            return Some(DeadLetterOrder {
                offset,
                envelope: entry.envelope.clone(),
                failure: info,
            });
        }
        let due = now + delay.unwrap_or_else(|| policy.backoff(entry.attempts));
        entry.state = State::Delayed(due);
        self.delayed.push(Reverse((due, offset)));
        None
    }

    fn settle_done(&mut self, offset: u64) {
        let Some(entry) = self.entries.remove(&offset) else {
            return;
        };
        self.ready.remove(&offset);
        if let Some(s) = entry.subject
            && let Some(q) = self.subjects.get_mut(&s)
        {
            if q.front() == Some(&offset) {
                q.pop_front();
            } else {
                q.retain(|o| *o != offset);
            }
            match q.front().copied() {
                Some(next) => {
                    if let Some(e) = self.entries.get_mut(&next)
                        && e.state == State::Blocked
                    {
                        e.state = State::Ready;
                        self.ready.insert(next);
                    }
                }
                None => {
                    self.subjects.remove(&s);
                }
            }
            // Room again for this subject: re-read what was deferred behind it, in order.
            let loaded = self.subjects.get(&s).map_or(0, VecDeque::len);
            let asked = self.deferred_count.get(&s).copied().unwrap_or(0)
                - self.deferred_queue.get(&s).map_or(0, VecDeque::len);
            let limit = self.subject_limit();
            if let Some(q) = self.deferred_queue.get_mut(&s) {
                let want = limit.saturating_sub(loaded + asked);
                for _ in 0..want {
                    match q.pop_front() {
                        Some(o) => self.reloads.push(o),
                        None => break,
                    }
                }
            }
        }
        let floor = self.floor();
        if offset >= floor {
            self.changes.push(GroupChange::Done(offset));
        }
        self.note_floor();
    }

    fn note_floor(&mut self) {
        let floor = self.floor();
        if floor > self.persisted_floor {
            self.persisted_floor = floor;
            self.changes.push(GroupChange::Floor(floor));
        }
    }
}

fn record_failure(entry: &mut Entry, now: Timestamp, reason: String) -> FailureInfo {
    let info = match entry.failure.take() {
        Some(mut f) => {
            f.attempts = entry.attempts;
            f.last_failure = now;
            f.last_error = reason;
            f
        }
        None => FailureInfo {
            attempts: entry.attempts,
            first_failure: now,
            last_failure: now,
            last_error: reason,
        },
    };
    entry.failure = Some(info.clone());
    info
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::JSON_CONTENT_TYPE;

    fn env(subject: Option<&str>) -> Arc<Envelope> {
        let mut e = Envelope::new("t.v1", "/test", JSON_CONTENT_TYPE, "{}");
        e.subject = subject.map(String::from);
        Arc::new(e)
    }

    fn core(max_attempts: u32) -> GroupCore {
        GroupCore::new(
            "g".into(),
            GroupSettings {
                ack_wait: Duration::from_secs(10),
                policy: RedeliveryPolicy {
                    max_attempts,
                    initial_backoff: Duration::from_secs(1),
                    max_backoff: Duration::from_secs(8),
                    multiplier: 2.0,
                    jitter: 0.0,
                },
                max_pending: 100,
            },
            GroupSnapshot::default(),
        )
    }

    fn poll(c: &mut GroupCore, now: Instant) -> Option<Lease> {
        let mut dead = vec![];
        let l = c.poll(now, &mut dead);
        assert!(dead.is_empty());
        l
    }

    #[test]
    fn same_subject_waits_for_the_earlier_message() {
        let mut c = core(5);
        let t = Instant::now();
        c.load(0, env(Some("a")));
        c.load(1, env(Some("a")));
        c.load(2, env(Some("b")));
        let l0 = poll(&mut c, t).unwrap();
        assert_eq!(l0.offset, 0);
        let l2 = poll(&mut c, t).unwrap();
        assert_eq!(l2.offset, 2, "subject b flows while a is in flight");
        assert!(poll(&mut c, t).is_none(), "offset 1 waits behind 0");
        c.ack(0, l0.lease).unwrap();
        assert_eq!(poll(&mut c, t).unwrap().offset, 1);
    }

    #[test]
    fn nack_backs_off_exponentially_then_dead_letters() {
        let mut c = core(3);
        let t = Instant::now();
        c.load(0, env(Some("a")));
        c.load(1, env(Some("a")));
        let l = poll(&mut c, t).unwrap();
        assert_eq!(l.attempt, 1);
        assert!(
            c.nack(0, l.lease, t, None, "boom".into())
                .unwrap()
                .is_none()
        );
        assert!(poll(&mut c, t + Duration::from_millis(999)).is_none());
        let l = poll(&mut c, t + Duration::from_secs(1)).unwrap();
        assert_eq!((l.offset, l.attempt), (0, 2));
        let t2 = t + Duration::from_secs(1);
        assert!(
            c.nack(0, l.lease, t2, None, "boom2".into())
                .unwrap()
                .is_none()
        );
        assert!(poll(&mut c, t2 + Duration::from_millis(1999)).is_none());
        let l = poll(&mut c, t2 + Duration::from_secs(2)).unwrap();
        assert_eq!(l.attempt, 3);
        let order = c
            .nack(0, l.lease, t2, None, "boom3".into())
            .unwrap()
            .expect("exhausted");
        assert_eq!(order.failure.attempts, 3);
        assert_eq!(order.failure.last_error, "boom3");
        assert!(order.failure.first_failure <= order.failure.last_failure);
        assert!(
            poll(&mut c, t2 + Duration::from_secs(60)).is_none(),
            "1 waits until 0 is in the DLQ"
        );
        c.dead_lettered(0);
        assert_eq!(poll(&mut c, t2).unwrap().offset, 1);
    }

    #[test]
    fn lease_expiry_redelivers_and_stale_ack_is_refused() {
        let mut c = core(5);
        let t = Instant::now();
        c.load(0, env(None));
        let first = poll(&mut c, t).unwrap();
        let later = t + Duration::from_secs(11);
        let mut dead = vec![];
        assert!(c.poll(later, &mut dead).is_none(), "backoff after timeout");
        let second = poll(&mut c, later + Duration::from_secs(2)).unwrap();
        assert_eq!(second.attempt, 2);
        assert_eq!(c.ack(0, first.lease), Err(StaleLease));
        assert_eq!(c.ack(0, second.lease), Ok(()));
        assert_eq!(c.ack(0, second.lease), Err(StaleLease), "double ack");
    }

    #[test]
    fn floor_advances_over_contiguous_acks_and_changes_persist_it() {
        let mut c = core(5);
        let t = Instant::now();
        for o in 0..3 {
            c.load(o, env(None));
        }
        let l: Vec<_> = (0..3).map(|_| poll(&mut c, t).unwrap()).collect();
        c.ack(2, l[2].lease).unwrap();
        c.ack(1, l[1].lease).unwrap();
        assert_eq!(c.floor(), 0);
        c.ack(0, l[0].lease).unwrap();
        assert_eq!(c.floor(), 3);
        let mut snap = GroupSnapshot::default();
        for ch in c.take_changes() {
            snap.apply(ch);
        }
        assert_eq!(snap.floor, 3);
        assert!(snap.done.is_empty());
    }

    #[test]
    fn restores_done_and_attempts_from_a_snapshot() {
        let mut snap = GroupSnapshot::default();
        snap.apply(GroupChange::Floor(1));
        snap.apply(GroupChange::Done(2));
        let info = FailureInfo {
            attempts: 2,
            first_failure: Timestamp::now(),
            last_failure: Timestamp::now(),
            last_error: "x".into(),
        };
        snap.apply(GroupChange::Failed(3, info));
        let mut c = GroupCore::new("g".into(), core(5).settings.clone(), snap);
        assert_eq!(c.next_load(), 1);
        let t = Instant::now();
        for o in 1..4 {
            c.load(o, env(None));
        }
        let a = poll(&mut c, t).unwrap();
        let b = poll(&mut c, t).unwrap();
        assert_eq!(
            (a.offset, b.offset),
            (1, 3),
            "2 was done before the restart"
        );
        assert_eq!(b.attempt, 3, "attempts continue across restarts");
    }

    #[test]
    fn replayed_message_for_another_group_is_skipped() {
        let mut c = core(5);
        let mut e = (*env(None)).clone();
        e.extensions
            .insert(REPLAY_GROUP_EXTENSION.into(), "other".into());
        c.load(0, Arc::new(e.clone()));
        assert!(poll(&mut c, Instant::now()).is_none());
        assert_eq!(c.floor(), 1);
        e.extensions
            .insert(REPLAY_GROUP_EXTENSION.into(), "g".into());
        c.load(1, Arc::new(e));
        assert_eq!(poll(&mut c, Instant::now()).unwrap().offset, 1);
    }

    #[test]
    fn a_parked_subject_with_a_long_backlog_does_not_stall_the_others() {
        let mut c = core(5);
        let t = Instant::now();
        let limit = c.subject_limit();
        let n = (limit * 3) as u64;
        for o in 0..n {
            c.load(o, env(Some("hot")));
        }
        c.load(n, env(Some("other")));
        assert_eq!(
            c.pending(),
            limit + 1,
            "only a bounded part of `hot` is held"
        );
        assert_eq!(c.deferred(), 2 * limit);
        let head = poll(&mut c, t).unwrap();
        assert_eq!(head.offset, 0);
        let other = poll(&mut c, t).unwrap();
        assert_eq!(
            other.offset, n,
            "another subject flows while `hot` is parked"
        );
        c.ack(other.offset, other.lease).unwrap();
        assert_eq!(c.floor(), 0);
        // Draining `hot` in order re-reads the deferred offsets in order.
        c.ack(0, head.lease).unwrap();
        let mut expected = 1;
        while expected < n {
            for o in c.take_reloads() {
                c.load_deferred(o, Some(env(Some("hot"))));
            }
            let l = poll(&mut c, t).unwrap();
            assert_eq!(l.offset, expected, "order kept across deferral");
            c.ack(l.offset, l.lease).unwrap();
            expected += 1;
        }
        assert_eq!(c.floor(), n + 1);
        assert_eq!(c.deferred(), 0);
    }

    #[test]
    fn room_bounds_what_is_loaded() {
        let mut c = core(5);
        for o in 0..100 {
            c.load(o, env(Some(&format!("s{o}"))));
        }
        assert_eq!(c.room(), 0);
    }
}
