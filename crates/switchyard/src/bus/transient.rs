//! The transient channel: in-process fan-out to the current members of each group, with
//! nothing stored.
//!
//! [`TransientHub`] is the one implementation every log backend (in-memory, embedded)
//! shares; a networked backend maps the same contract onto its broker's plain pub/sub
//! (core NATS subjects with queue groups).
//!
//! # Backpressure
//!
//! Each member has a bounded queue ([`DEFAULT_TRANSIENT_QUEUE`] messages unless
//! configured). A publisher never waits for a consumer: it hands the message to the next
//! member of the group (round robin) whose queue has room. When every member of a group
//! is full, that group misses the message (counted in [`TransientStats::dropped`] and
//! logged), like a slow consumer on core NATS; when no group could take it, the publish
//! fails with [`Error::SubscribersFull`] so a requester fails fast instead of waiting for
//! a reply that cannot come. Waiting for room instead would let one stuck consumer stall
//! every publisher (and every request's timeout would then measure the queue, not the
//! responder); an unbounded queue would turn a stuck consumer into unbounded memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::envelope::Envelope;
use crate::error::{Error, Result, validate_name};

/// Default capacity of one member's queue on a [`TransientHub`].
pub const DEFAULT_TRANSIENT_QUEUE: usize = 4096;

/// A member's queue of messages, as a backend hands it to [`TransientSubscription::new`].
pub type TransientReceiver = mpsc::Receiver<Arc<Envelope>>;

/// One member of a group on a transient topic (see [`Bus::subscribe_transient`](crate::Bus::subscribe_transient)).
///
/// Dropping it leaves the group at once: messages published afterwards go to the other
/// members, or fail with [`Error::NoSubscribers`] when none is left. Messages still in
/// its queue are lost (at most once).
pub struct TransientSubscription {
    rx: TransientReceiver,
    _membership: Box<dyn Send + Sync>,
}

impl std::fmt::Debug for TransientSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransientSubscription")
            .field("queued", &self.rx.len())
            .finish()
    }
}

impl TransientSubscription {
    /// Wraps a backend's queue; `membership` is dropped with the subscription and must
    /// end the membership then (for a backend: unsubscribe).
    pub fn new(rx: TransientReceiver, membership: impl Send + Sync + 'static) -> Self {
        TransientSubscription {
            rx,
            _membership: Box::new(membership),
        }
    }

    /// Waits for the next message. Fails with [`Error::Closed`] once the bus is closed.
    /// Cancel-safe: dropping the future loses nothing.
    pub async fn next(&mut self) -> Result<Arc<Envelope>> {
        self.rx.recv().await.ok_or(Error::Closed)
    }

    /// Waits for at least one message and returns up to `max` (fewer wake-ups under load).
    /// Fails with [`Error::Closed`] once the bus is closed. Cancel-safe.
    pub async fn next_batch(&mut self, max: usize) -> Result<Vec<Arc<Envelope>>> {
        let mut out = Vec::new();
        if self.rx.recv_many(&mut out, max.max(1)).await == 0 {
            return Err(Error::Closed);
        }
        Ok(out)
    }
}

/// Counters of a [`TransientHub`] (a snapshot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransientStats {
    /// Messages accepted by [`TransientHub::publish`] (handed to at least one group).
    pub published: u64,
    /// Hand-outs to a group that missed the message because every member's queue was full.
    pub dropped: u64,
    /// Publishes refused because no member was subscribed to the topic.
    pub no_subscribers: u64,
}

struct Member {
    id: u64,
    tx: mpsc::Sender<Arc<Envelope>>,
}

#[derive(Default)]
struct Group {
    members: Vec<Member>,
    next: usize,
}

#[derive(Default)]
struct State {
    closed: bool,
    next_id: u64,
    /// topic → group → members.
    topics: HashMap<String, HashMap<String, Group>>,
}

struct Shared {
    state: Mutex<State>,
    capacity: usize,
    published: AtomicU64,
    dropped: AtomicU64,
    no_subscribers: AtomicU64,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // Plain data behind the lock: a panic elsewhere leaves it consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An in-process transient channel: see the [module docs](self). Cheap to clone; clones
/// share one hub.
#[derive(Clone)]
pub struct TransientHub {
    shared: Arc<Shared>,
}

impl Default for TransientHub {
    fn default() -> Self {
        TransientHub::new(DEFAULT_TRANSIENT_QUEUE)
    }
}

impl std::fmt::Debug for TransientHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransientHub")
            .field("capacity", &self.shared.capacity)
            .field("stats", &self.stats())
            .finish()
    }
}

impl TransientHub {
    /// A hub whose members each queue up to `capacity` messages (at least 1).
    pub fn new(capacity: usize) -> Self {
        TransientHub {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                capacity: capacity.max(1),
                published: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
                no_subscribers: AtomicU64::new(0),
            }),
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> TransientStats {
        let s = &self.shared;
        TransientStats {
            published: s.published.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            no_subscribers: s.no_subscribers.load(Ordering::Relaxed),
        }
    }

    /// Hands `envelope` to one member of each group subscribed to `topic`, without
    /// waiting (see the [module docs](self) for a full queue). Fails with
    /// [`Error::NoSubscribers`] when no member is subscribed, [`Error::SubscribersFull`]
    /// when no group had room, [`Error::Closed`] after [`close`](Self::close).
    pub fn publish(&self, topic: &str, envelope: Envelope) -> Result<()> {
        let shared = &*self.shared;
        let mut state = shared.state();
        if state.closed {
            return Err(Error::Closed);
        }
        let Some(groups) = state.topics.get_mut(topic) else {
            drop(state);
            validate_name("topic", topic)?;
            shared.no_subscribers.fetch_add(1, Ordering::Relaxed);
            return Err(Error::NoSubscribers {
                topic: topic.to_string(),
            });
        };
        let envelope = Arc::new(envelope);
        let mut accepted = 0;
        let mut full = Vec::new();
        for (name, group) in groups.iter_mut() {
            if deliver(group, &envelope) {
                accepted += 1;
            } else if !group.members.is_empty() {
                full.push(name.clone());
            }
        }
        groups.retain(|_, g| !g.members.is_empty());
        let nobody = groups.is_empty();
        if nobody {
            state.topics.remove(topic);
        }
        drop(state);
        if !full.is_empty() {
            shared
                .dropped
                .fetch_add(full.len() as u64, Ordering::Relaxed);
            tracing::warn!(topic, groups = ?full, capacity = shared.capacity, id = %envelope.id,
                "transient message dropped for groups whose every member's queue is full (slow consumers)");
        }
        if accepted > 0 {
            shared.published.fetch_add(1, Ordering::Relaxed);
            Ok(())
        } else if full.is_empty() {
            // Every member had gone (dropped without unsubscribing first).
            shared.no_subscribers.fetch_add(1, Ordering::Relaxed);
            Err(Error::NoSubscribers {
                topic: topic.to_string(),
            })
        } else {
            Err(Error::SubscribersFull {
                topic: topic.to_string(),
                capacity: shared.capacity,
            })
        }
    }

    /// Joins group `group` of `topic` as a new member.
    pub fn subscribe(&self, topic: &str, group: &str) -> Result<TransientSubscription> {
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        let shared = &self.shared;
        let (tx, rx) = mpsc::channel(shared.capacity);
        let id = {
            let mut state = shared.state();
            if state.closed {
                return Err(Error::Closed);
            }
            state.next_id += 1;
            let id = state.next_id;
            state
                .topics
                .entry(topic.to_string())
                .or_default()
                .entry(group.to_string())
                .or_default()
                .members
                .push(Member { id, tx });
            id
        };
        let membership = Membership {
            hub: Arc::downgrade(shared),
            topic: topic.to_string(),
            group: group.to_string(),
            id,
        };
        Ok(TransientSubscription::new(rx, membership))
    }

    /// Ends every membership (their subscriptions then fail with [`Error::Closed`]) and
    /// refuses later publishes and subscriptions.
    pub fn close(&self) {
        let mut state = self.shared.state();
        state.closed = true;
        state.topics.clear();
    }
}

/// Offers `envelope` to the group's members in round-robin order, starting after the
/// last one served; drops members whose subscription is gone. True when one took it.
fn deliver(group: &mut Group, envelope: &Arc<Envelope>) -> bool {
    let mut tries = group.members.len();
    while tries > 0 && !group.members.is_empty() {
        tries -= 1;
        let i = group.next % group.members.len();
        match group.members[i].tx.try_send(envelope.clone()) {
            Ok(()) => {
                group.next = i + 1;
                return true;
            }
            Err(TrySendError::Full(_)) => group.next = i + 1,
            Err(TrySendError::Closed(_)) => {
                group.members.swap_remove(i);
            }
        }
    }
    false
}

/// Removes a member from its group when its subscription is dropped.
struct Membership {
    hub: Weak<Shared>,
    topic: String,
    group: String,
    id: u64,
}

impl Drop for Membership {
    fn drop(&mut self) {
        let Some(shared) = self.hub.upgrade() else {
            return;
        };
        let mut state = shared.state();
        let Some(groups) = state.topics.get_mut(&self.topic) else {
            return;
        };
        if let Some(g) = groups.get_mut(&self.group) {
            g.members.retain(|m| m.id != self.id);
            if g.members.is_empty() {
                groups.remove(&self.group);
            }
        }
        if groups.is_empty() {
            state.topics.remove(&self.topic);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::error::ErrorKind;

    fn msg(i: u32) -> Envelope {
        Envelope::new(
            "t.v1",
            "/test",
            "application/json",
            format!("{{\"i\":{i}}}"),
        )
    }

    #[tokio::test]
    async fn round_robin_within_a_group_and_every_group_gets_a_copy() {
        let hub = TransientHub::default();
        let mut a1 = hub.subscribe("t", "a").unwrap();
        let mut a2 = hub.subscribe("t", "a").unwrap();
        let mut b = hub.subscribe("t", "b").unwrap();
        for i in 0..10 {
            hub.publish("t", msg(i)).unwrap();
        }
        assert_eq!(a1.next_batch(100).await.unwrap().len(), 5);
        assert_eq!(a2.next_batch(100).await.unwrap().len(), 5);
        assert_eq!(b.next_batch(100).await.unwrap().len(), 10);
        assert_eq!(hub.stats().published, 10);
    }

    #[tokio::test]
    async fn a_full_member_is_skipped_and_a_full_group_fails_fast() {
        let hub = TransientHub::new(2);
        let mut slow = hub.subscribe("t", "g").unwrap();
        let mut fast = hub.subscribe("t", "g").unwrap();
        for i in 0..4 {
            hub.publish("t", msg(i)).unwrap();
        }
        // Both queues are full now: the publisher is refused, not blocked.
        let err = hub.publish("t", msg(9)).unwrap_err();
        assert!(
            matches!(err, Error::SubscribersFull { capacity: 2, .. }),
            "{err}"
        );
        assert_eq!(err.kind(), ErrorKind::Unavailable);
        assert_eq!(hub.stats().dropped, 1);
        assert_eq!(fast.next_batch(10).await.unwrap().len(), 2);
        // Room in one member: the next messages go there, past the full one.
        hub.publish("t", msg(5)).unwrap();
        hub.publish("t", msg(6)).unwrap();
        assert_eq!(fast.next_batch(10).await.unwrap().len(), 2);
        assert_eq!(slow.next_batch(10).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn dropping_the_last_member_means_no_subscribers_and_close_ends_members() {
        let hub = TransientHub::default();
        let err = hub.publish("t", msg(0)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NoSubscribers);
        let sub = hub.subscribe("t", "g").unwrap();
        hub.publish("t", msg(1)).unwrap();
        drop(sub);
        assert_eq!(
            hub.publish("t", msg(2)).unwrap_err().kind(),
            ErrorKind::NoSubscribers
        );
        assert_eq!(hub.stats().no_subscribers, 2);
        let mut sub = hub.subscribe("t", "g").unwrap();
        hub.close();
        assert_eq!(sub.next().await.unwrap_err().kind(), ErrorKind::Closed);
        assert_eq!(
            hub.publish("t", msg(3)).unwrap_err().kind(),
            ErrorKind::Closed
        );
        assert!(hub.subscribe("t", "g").is_err());
    }
}
