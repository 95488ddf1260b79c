//! The bus contract: durable topics, consumer groups, acks, redelivery and dead letters.
//!
//! # Semantics every backend provides
//!
//! - **Durable publish.** [`Bus::publish`] returns only once the message is stored as
//!   durably as the backend's durability setting says (its docs state which).
//! - **Publisher dedup.** A message whose `id` was already stored within the backend's
//!   dedup window is not stored again; [`Published::duplicate`] tells. An id counts as
//!   seen only once its message is durable, so a failed publish can be retried with the
//!   same id.
//! - **Groups.** Every consumer group receives every message of a topic; consumers that
//!   subscribe with the same group compete for its messages. A group's position is durable.
//! - **Ordering.** Within a group, a message with subject `S` is not handed out while an
//!   earlier message with subject `S` is unsettled. Messages without a subject have no
//!   ordering constraint.
//! - **Settling.** Each [`Delivery`] is settled once: [`Delivery::ack`],
//!   [`Delivery::nack`] (retry, optionally after a delay) or [`Delivery::dead_letter`].
//!   A delivery not settled within `ack_wait` is redelivered (a dropped delivery counts
//!   as a failure). A settle from a delivery whose lease passed and that was handed out
//!   again fails with [`Error::StaleDelivery`](crate::Error::StaleDelivery) and changes nothing.
//! - **Redelivery policy.** Failures are retried with exponential backoff and jitter
//!   ([`RedeliveryPolicy`]); after the last attempt the message moves to `<topic>.dlq`
//!   with its reason, attempt count and first/last failure time.
//! - **Dead letters** can be listed ([`Bus::dead_letters`]) and replayed to the group
//!   that failed them ([`Bus::replay_dead_letters`]).
//! - **At least once.** A message may be delivered more than once (crash before the ack
//!   was stored); exactly-once *effects* come from the store's inbox.
//!
//! # The transient channel
//!
//! Besides its durable topics, every bus has a **transient** channel for conversations
//! with a waiting party (request/reply, [`crate::reply`]): [`Bus::publish_transient`] and
//! [`Bus::subscribe_transient`]. Its topics are separate from the durable ones even when
//! the names match. Semantics:
//!
//! - **Not persisted.** Nothing is written; a message reaches the members subscribed at
//!   the moment of the publish, or nobody. A restart loses what was queued.
//! - **At most once, one member per group.** Each message goes to one current member of
//!   each group subscribed to the topic (round robin within the group). There is no ack,
//!   no redelivery, no dead-letter queue, no dedup and no ordering promise across members.
//! - **No subscriber is an error.** Publishing to a topic with no member fails at once
//!   with [`Error::NoSubscribers`](crate::Error::NoSubscribers), so a requester learns
//!   "no responders" without waiting for its timeout.
//! - **The publisher never waits for a consumer.** A member's queue is bounded; a full
//!   member is skipped for another member of its group, a group whose every member is
//!   full misses the message, and a publish no group could take fails with
//!   [`Error::SubscribersFull`](crate::Error::SubscribersFull) (see [`transient`]).
//! - **Membership ends with the subscription**: dropping a [`TransientSubscription`]
//!   unsubscribes it; closing the bus ends every subscription with `Closed`.
//!
//! Why a second channel: a request whose caller timed out or died is useless, and a retry
//! with the same idempotency key recovers whatever was lost in transit, so persisting
//! requests and replies buys nothing and costs a durable write each. The effect's
//! exactly-once comes from the responder's store commit. Core NATS pub/sub with queue
//! groups has exactly these semantics (NATS maps request/reply onto it, not onto
//! JetStream), so a NATS backend maps the channel one to one; the log backends share the
//! in-process [`TransientHub`].

mod policy;
pub mod transient;

pub use policy::RedeliveryPolicy;
pub use transient::{DEFAULT_TRANSIENT_QUEUE, TransientHub, TransientStats, TransientSubscription};

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::envelope::{Envelope, MessageId, Timestamp};
use crate::error::Result;

/// Default largest message a bus accepts: 1 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// Suffix of the dead-letter topic of a topic.
pub const DLQ_SUFFIX: &str = ".dlq";

/// Extension attribute that restricts a replayed message to the group that dead-lettered it.
pub const REPLAY_GROUP_EXTENSION: &str = "replaygroup";

/// The dead-letter topic of `topic`.
pub fn dlq_topic(topic: &str) -> String {
    format!("{topic}{DLQ_SUFFIX}")
}

/// The result of storing one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The message id.
    pub id: MessageId,
    /// The message's position in its topic (for a duplicate: the original's position when known).
    pub offset: u64,
    /// True when the id was already stored within the dedup window and nothing was written.
    pub duplicate: bool,
}

/// Where a new consumer group starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartPosition {
    /// The oldest retained message (default: a new group sees the backlog).
    #[default]
    Earliest,
    /// Only messages published after the group was created.
    Latest,
}

/// Settings of a subscription; the latest subscriber of a group sets them for the group.
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    /// How long a delivery may stay unsettled before it is redelivered.
    pub ack_wait: Duration,
    /// Retries and backoff before dead-lettering.
    pub redelivery: RedeliveryPolicy,
    /// Where a new group starts.
    pub start: StartPosition,
    /// Most messages the group holds in memory ahead of its acknowledged position
    /// (bounds memory however large the backlog).
    pub max_pending: usize,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            ack_wait: Duration::from_secs(30),
            redelivery: RedeliveryPolicy::default(),
            start: StartPosition::Earliest,
            max_pending: 16_384,
        }
    }
}

/// A bus feature that a backend supports or declares missing (with the reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Capability {
    /// Messages survive a restart of the process that owns the bus.
    Durable,
    /// Every publish that returned `Ok` survives a SIGKILL of the publishing process.
    CrashSafe,
    /// A second process can reopen the same bus after the first died.
    Reopen,
    /// A 1M-message backlog is consumed with bounded memory.
    BoundedBacklogMemory,
}

/// What a backend supports; the conformance suite runs a case only when it is supported
/// and lists it, with the reason, when it is not.
#[derive(Debug, Clone, Default)]
pub struct Capabilities {
    /// Missing capabilities and why.
    pub missing: Vec<(Capability, &'static str)>,
}

impl Capabilities {
    /// Everything supported.
    pub fn all() -> Self {
        Capabilities::default()
    }

    /// Declares a capability missing.
    pub fn without(mut self, c: Capability, reason: &'static str) -> Self {
        self.missing.push((c, reason));
        self
    }

    /// Whether `c` is supported; `Err(reason)` if not.
    pub fn check(&self, c: Capability) -> std::result::Result<(), &'static str> {
        match self.missing.iter().find(|(m, _)| *m == c) {
            Some((_, why)) => Err(why),
            None => Ok(()),
        }
    }
}

/// A message that exhausted its attempts (or was dead-lettered explicitly), as stored in `<topic>.dlq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Position in the DLQ topic (identifies this entry).
    pub dlq_offset: u64,
    /// The topic the message came from.
    pub topic: String,
    /// The group that failed it.
    pub group: String,
    /// Why it failed last.
    pub reason: String,
    /// Deliveries made.
    pub attempts: u32,
    /// When it first failed.
    pub first_failure: Timestamp,
    /// When it last failed.
    pub last_failure: Timestamp,
    /// The original message, unchanged.
    pub envelope: Envelope,
}

/// Which dead letters to replay.
#[derive(Debug, Clone, Default)]
pub struct ReplayFilter {
    /// Only entries dead-lettered by this group (`None`: all groups).
    pub group: Option<String>,
    /// Only these message ids (`None`: all).
    pub ids: Option<Vec<MessageId>>,
}

/// How a delivery was settled.
#[derive(Debug, Clone)]
pub enum Settle {
    /// Done; never deliver again to this group.
    Ack,
    /// Failed; retry after `delay` (or the policy's backoff), or dead-letter if attempts are exhausted.
    Nack {
        /// Explicit delay; `None` uses the redelivery policy.
        delay: Option<Duration>,
        /// Why it failed (kept for the DLQ).
        reason: String,
    },
    /// Give up now: move to the DLQ with this reason.
    DeadLetter {
        /// Why.
        reason: String,
    },
}

/// Where a delivery came from; identifies it when it is settled.
#[derive(Debug, Clone)]
pub struct DeliveryInfo {
    /// Topic.
    pub topic: Arc<str>,
    /// Consumer group.
    pub group: Arc<str>,
    /// Position in the topic.
    pub offset: u64,
    /// 1 for the first delivery to this group, 2 for the first redelivery, …
    pub attempt: u32,
    /// Identifies this hand-out (a redelivery has another), so stale settles are detected.
    pub lease: u64,
}

/// Applies settles for a backend; [`Delivery`] calls it.
#[async_trait]
pub trait Settler: Send + Sync + 'static {
    /// Applies `how` to the delivery `info`, or fails with `StaleDelivery`.
    async fn settle(&self, info: &DeliveryInfo, how: Settle) -> Result<()>;
}

/// One message handed to one consumer; settle it exactly once.
///
/// Dropping it unsettled is allowed: it is redelivered after `ack_wait`.
pub struct Delivery {
    envelope: Arc<Envelope>,
    info: DeliveryInfo,
    settler: Arc<dyn Settler>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("id", &self.envelope.id)
            .field("type", &self.envelope.event_type)
            .field("info", &self.info)
            .finish()
    }
}

impl Delivery {
    /// Creates a delivery (for backends).
    pub fn new(envelope: Arc<Envelope>, info: DeliveryInfo, settler: Arc<dyn Settler>) -> Self {
        Delivery {
            envelope,
            info,
            settler,
        }
    }

    /// The message.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// A shared handle to the message.
    pub fn envelope_arc(&self) -> Arc<Envelope> {
        self.envelope.clone()
    }

    /// Where it came from and which attempt this is.
    pub fn info(&self) -> &DeliveryInfo {
        &self.info
    }

    /// 1 for the first delivery, 2 for the first redelivery, …
    pub fn attempt(&self) -> u32 {
        self.info.attempt
    }

    /// Acknowledges: the group is done with this message.
    pub async fn ack(self) -> Result<()> {
        self.settler.settle(&self.info, Settle::Ack).await
    }

    /// Reports a failure: retried after `delay` (or the policy's backoff), or dead-lettered
    /// once attempts are exhausted.
    pub async fn nack(self, delay: Option<Duration>, reason: impl Into<String>) -> Result<()> {
        self.settler
            .settle(
                &self.info,
                Settle::Nack {
                    delay,
                    reason: reason.into(),
                },
            )
            .await
    }

    /// Moves the message to the DLQ now, with a reason (a terminal failure).
    pub async fn dead_letter(self, reason: impl Into<String>) -> Result<()> {
        self.settler
            .settle(
                &self.info,
                Settle::DeadLetter {
                    reason: reason.into(),
                },
            )
            .await
    }
}

/// A backend's source of deliveries for one subscriber.
#[async_trait]
pub trait DeliverySource: Send + 'static {
    /// Waits for up to `max` deliveries (at least one).
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>>;
}

/// One consumer of a group: competes with the group's other subscribers for messages.
pub struct Subscription {
    source: Box<dyn DeliverySource>,
    buffered: std::collections::VecDeque<Delivery>,
}

impl Subscription {
    /// Wraps a backend's source.
    pub fn new(source: Box<dyn DeliverySource>) -> Self {
        Subscription {
            source,
            buffered: Default::default(),
        }
    }

    /// Waits for the next delivery. Cancel-safe: dropping the future loses nothing.
    pub async fn next(&mut self) -> Result<Delivery> {
        if let Some(d) = self.buffered.pop_front() {
            return Ok(d);
        }
        let mut batch = self.source.next_batch(1).await?;
        let first = batch.remove(0);
        self.buffered.extend(batch);
        Ok(first)
    }

    /// Waits for at least one delivery and returns up to `max` (fewer calls, higher throughput).
    pub async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>> {
        if !self.buffered.is_empty() {
            let n = self.buffered.len().min(max.max(1));
            return Ok(self.buffered.drain(..n).collect());
        }
        self.source.next_batch(max.max(1)).await
    }
}

/// A durable message bus. See the [module docs](self) for the semantics.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// What this backend supports.
    fn capabilities(&self) -> Capabilities;

    /// Stores one message durably; returns once it is durable (or a duplicate).
    async fn publish(&self, topic: &str, envelope: Envelope) -> Result<Published>;

    /// Stores many messages durably, in order, sharing the cost of one durable write.
    async fn publish_batch(&self, topic: &str, envelopes: Vec<Envelope>) -> Result<Vec<Published>>;

    /// Joins consumer group `group` of `topic` (created on first use).
    async fn subscribe(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription>;

    /// Lists up to `limit` unreplayed dead letters of `topic`, oldest first.
    async fn dead_letters(&self, topic: &str, limit: usize) -> Result<Vec<DeadLetter>>;

    /// Re-publishes matching dead letters to `topic` for the group that failed them;
    /// returns how many were replayed. Replayed entries leave the DLQ listing.
    async fn replay_dead_letters(&self, topic: &str, filter: ReplayFilter) -> Result<usize>;

    /// Hands `envelope` to one current member of each group subscribed to `topic` on the
    /// transient channel, storing nothing (see [the transient channel](self#the-transient-channel)).
    /// Returns once handed over, never waiting for a consumer. Fails with
    /// [`Error::NoSubscribers`](crate::Error::NoSubscribers) when no member is subscribed,
    /// [`Error::SubscribersFull`](crate::Error::SubscribersFull) when no group had room, and
    /// with a size error like [`publish`](Self::publish).
    async fn publish_transient(&self, topic: &str, envelope: Envelope) -> Result<()>;

    /// Joins group `group` of the transient topic `topic` as a new member, until the
    /// returned subscription is dropped. Messages published before this returns are not
    /// seen.
    async fn subscribe_transient(&self, topic: &str, group: &str) -> Result<TransientSubscription>;

    /// Flushes state and stops background work; later calls fail with `Closed`.
    async fn close(&self) -> Result<()>;
}
