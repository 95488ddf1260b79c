//! A group's delivery sources (pull requests on its durable consumer), settler (acks,
//! naks, dead letters) and keep-alive task, plus reading the dead-letter stream.
//!
//! Every message fetched goes through the group's [`Sequencer`] (`order.rs`), shared by
//! the group's subscribers in this bus: a message waits there while an earlier message of
//! its subject is unsettled. The server's `ack_wait` is at most [`LIVENESS`]; a live bus
//! sends in-progress acks (`+WPI`) for what it holds (waiting messages, and deliveries
//! until their own `ack_wait`), so what a dead process held comes back within
//! [`LIVENESS`] at the latest, and at once when a new process joins the group
//! ([`take_over`]).
//!
//! The group's pull requests in this bus are answered on one inbox, so the messages reach
//! the sequencer in the order the server sent them however many requests are open. A
//! request is only made from a subscriber's `next_batch`: when nothing is ready, and when
//! at most half of what the caller asked for is still to come (so the next messages are
//! on their way while the caller handles these, as `consumer.stream()` does): a whole
//! `max` each time, so what is asked for and not yet here never exceeds 1.5 × the
//! caller's `max`. A partition lane asks only while its lease is fresh, and its requests
//! end by the lease's fence (decision 0013).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::AckKind;
use async_nats::{StatusCode, Subject};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use switchyard::bus::{
    DeliveryInfo, DeliverySource, REPLAY_GROUP_EXTENSION, Settle, Settler, dlq_topic,
};
use switchyard::{DeadLetter, Delivery, Envelope, Error, RedeliveryPolicy, Result, Timestamp};
use tokio::sync::{Notify, watch};

use crate::ledger::Uncounted;
use crate::order::{Arrival, Sequencer};
use crate::{Inner, NatsError, lock};

/// How long one pull request waits on the server before it is renewed. Not a multiple of
/// [`LIVENESS`]: a redelivery that reaches a pull request just as it expires is lost for
/// another server `ack_wait` (and counts a delivery), and a request made when a member
/// died would otherwise expire exactly when the dead member's message comes back.
const PULL_EXPIRES: Duration = Duration::from_secs(27);

/// The longest a pull request of a partition lane waits on the server. A request also
/// never outlives the lane's fence (see [`GroupState::pull_expires`]): when a stalled
/// holder's lease is taken (unrenewed for the TTL), none of the pull requests it made is
/// still open on the server, so no message of the partition can be delivered to the
/// stalled process instead of the new holder (decision 0013, *A stalled holder*).
const PARTITION_PULL_EXPIRES: Duration = Duration::from_secs(7);

/// A partition lane whose fence is nearer than this makes no pull request (one this
/// short would mostly come back empty).
const MIN_PULL_EXPIRES: Duration = Duration::from_millis(500);

/// How long before its lease could be taken (its last renewal, plus the TTL) a partition
/// lane stops handing messages out: a process that stalls past the TTL hands nothing
/// more out once it runs again, before it has even learnt that the lease is gone.
const LEASE_FENCE_MARGIN: Duration = Duration::from_secs(2);

/// How long after a pull request expires its end notice (`408`) is waited for before the
/// messages it asked for are taken as not coming.
const PULL_GRACE: Duration = Duration::from_secs(5);

/// The longest `ack_wait` the server gets: a message held by a process that died comes
/// back after this at the latest (a live process keeps what it holds with `+WPI`).
pub(crate) const LIVENESS: Duration = Duration::from_secs(5);

/// How long a message that left this bus unsettled (nacked, or its settle failed) keeps
/// its subject blocked beyond its expected return, in case another member got it.
const AWAY_GRACE: Duration = Duration::from_secs(12);

/// How long a released message waits at the server before it is redelivered (see
/// [`GroupState::release_all`]).
const RELEASE_DELAY: Duration = Duration::from_millis(200);

/// The server's window (`max_ack_pending`) is this many times `max_pending`: messages
/// parked behind their subject occupy it, and the other subjects need room to flow.
pub(crate) const PARK_ROOM: usize = 4;

const H_TOPIC: &str = "Sy-Topic";
const H_GROUP: &str = "Sy-Group";
const H_REASON: &str = "Sy-Reason";
const H_ATTEMPTS: &str = "Sy-Attempts";
const H_FIRST: &str = "Sy-First-Failure";
const H_LAST: &str = "Sy-Last-Failure";

/// A message held by this bus: the ack subject of its delivery (to settle it), its
/// envelope, and its stream sequence and delivery count.
pub(crate) struct Held {
    reply: Subject,
    envelope: Arc<Envelope>,
    seq: u64,
    delivered: u64,
}

/// A message handed back to the group: the ack subject, sequence and delivery count of
/// its delivery here, and whether that delivery only waited here (no attempt).
struct Handback {
    reply: Subject,
    seq: u64,
    delivered: u64,
    waiting: bool,
}

impl Handback {
    fn of(h: Held, waiting: bool) -> Self {
        Handback {
            reply: h.reply,
            seq: h.seq,
            delivered: h.delivered,
            waiting,
        }
    }

    /// A delivery read from a pull inbox that no subscriber will see.
    fn unread(m: async_nats::Message) -> Option<Self> {
        if m.status.is_some_and(|s| s != StatusCode::OK) {
            return None;
        }
        let reply = m.reply?;
        let (seq, delivered) = ack_info(reply.as_str())?;
        Some(Handback {
            reply,
            seq,
            delivered: delivered.max(1),
            waiting: true,
        })
    }
}

/// Sends `kind` to the ack subject `reply` of a delivery (what
/// `jetstream::Message::ack_with` sends, without keeping the whole message).
async fn send_ack(
    client: &async_nats::Client,
    reply: &Subject,
    kind: AckKind,
) -> std::result::Result<(), async_nats::PublishError> {
    let payload = match kind {
        // An empty ack, as `jetstream::Message::ack` sends.
        AckKind::Ack => Bytes::new(),
        other => other.into(),
    };
    client.publish(reply.clone(), payload).await
}

/// The stream sequence and delivery count of a delivery, from its ack subject:
/// `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>`,
/// or the same with `<domain>.<account hash>.` before the stream and a token at the end.
fn ack_info(reply: &str) -> Option<(u64, u64)> {
    // One pass over the bytes for the token boundaries (this runs for every delivery).
    let rest = reply.strip_prefix("$JS.ACK.")?.as_bytes();
    let mut dots = [0usize; 11];
    let mut n = 0;
    for (i, b) in rest.iter().enumerate() {
        if *b == b'.' {
            *dots.get_mut(n)? = i;
            n += 1;
        }
    }
    // `n` dots: `n + 1` tokens; token `k` runs from after dot `k - 1` to dot `k`.
    let at = match n + 1 {
        7 => 2,
        9..=12 => 4,
        _ => return None,
    };
    let token = |k: usize| -> Option<u64> {
        let start = if k == 0 { 0 } else { dots[k - 1] + 1 };
        let end = if k < n { dots[k] } else { rest.len() };
        parse_u64(rest.get(start..end)?)
    };
    Some((token(at + 1)?, token(at)?))
}

/// A decimal `u64` (digits only, no sign, no overflow).
fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |v, d| {
        let d = d.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        v.checked_mul(10)?.checked_add(u64::from(d))
    })
}

/// The settings the latest subscriber gave the group.
#[derive(Clone)]
struct GroupSettings {
    policy: RedeliveryPolicy,
    /// The contract's lease length.
    ack_wait: Duration,
}

impl GroupSettings {
    /// The server's `ack_wait`: the lease, at most [`LIVENESS`].
    fn server_ack_wait(&self) -> Duration {
        server_ack_wait(self.ack_wait)
    }
}

/// The server-side `ack_wait` for a lease of `ack_wait`.
pub(crate) fn server_ack_wait(ack_wait: Duration) -> Duration {
    ack_wait.min(LIVENESS).max(Duration::from_millis(50))
}

/// What this bus knows about a group: its settings, the messages it holds in order (the
/// leases that make a settle of a redelivered message fail as stale), its subscribers.
pub(crate) struct GroupState {
    topic: Arc<str>,
    group: Arc<str>,
    /// The partition this lane pulls (none: the group's own consumer).
    pub(crate) partition: Option<u32>,
    /// `<stream>.<consumer>`: the prefix of this group's keys in the ledger.
    key_prefix: String,
    /// What the ledger knows of messages this bus holds (read or written here).
    uncounted: Mutex<foldhash::HashMap<u64, Uncounted>>,
    settings: Mutex<GroupSettings>,
    order: Mutex<Sequencer<Held>>,
    /// Woken when a parked message becomes ready (shared by the group's lanes).
    ready: Arc<Notify>,
    first_failure: Mutex<foldhash::HashMap<u64, Timestamp>>,
    /// Set once the lane's partition is released: its keep-alive task ends.
    retired: AtomicBool,
    /// Settles between taking a message out of the sequencer and sending it.
    settling: AtomicUsize,
    /// Waiting messages the last subscriber left behind, handed back by the keep-alive
    /// task (or by `close`, in one ordered pass with the rest).
    leaving: Mutex<Vec<Handback>>,
    /// The group's pull requests in this bus, answered on one inbox: every fetched
    /// message enters the sequencer in the order the server delivered it.
    puller: tokio::sync::Mutex<Puller>,
    /// Where pull requests for the group go (`$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`).
    next_subject: Subject,
    /// Messages read from the pull inbox whose ledger lookups were under way when the
    /// reading subscriber's call was dropped (a timeout): they enter the sequencer
    /// first, on the next read of this lane, so none is lost until its `ack_wait`.
    stash: Mutex<Vec<Fetched>>,
    /// Until when this partition lane may hand messages out (its lease's last renewal,
    /// plus the TTL, less a margin); `None` for the group's own lane, which has no lease.
    lease_until: Mutex<Option<Instant>>,
    /// `$JS.ACK.<stream>.<consumer>.`: how the ack subject of this lane's deliveries
    /// starts (in the form without a domain), read past without splitting it.
    ack_prefix: String,
}

/// A group used through this bus: the lane of its own consumer (messages without a
/// subject, and topics without partitions) and one lane per partition this bus owns
/// (decision 0013). Each lane has its consumer, pull inbox and sequencer; one
/// subscriber at a time reads the inboxes, and every subscriber takes ready messages
/// from every lane.
pub(crate) struct Group {
    pub(crate) topic: Arc<str>,
    pub(crate) group: Arc<str>,
    /// The lane of the group's own consumer.
    pub(crate) base: Arc<GroupState>,
    /// The lanes of the partitions this bus owns.
    parts: Mutex<Vec<Arc<GroupState>>>,
    /// Woken when a message becomes ready in any lane, or the lanes change.
    pub(crate) ready: Arc<Notify>,
    /// Held by the subscriber reading the lanes' inboxes.
    reader: tokio::sync::Mutex<()>,
    /// Subscribers of the group in this bus.
    pub(crate) sources: AtomicUsize,
    /// The topic's partitions (0: none).
    pub(crate) partitions: u32,
    /// The partition leases this bus holds (`lease.rs`).
    pub(crate) owned: Mutex<std::collections::BTreeMap<u32, crate::lease::Owned>>,
}

impl Group {
    pub(crate) fn new(
        topic: &str,
        group: &str,
        base_key: String,
        base_next: String,
        partitions: u32,
    ) -> Self {
        let ready = Arc::new(Notify::new());
        Group {
            topic: topic.into(),
            group: group.into(),
            base: Arc::new(GroupState::new(
                topic,
                group,
                None,
                base_key,
                base_next,
                ready.clone(),
            )),
            parts: Mutex::new(Vec::new()),
            ready,
            reader: tokio::sync::Mutex::new(()),
            sources: AtomicUsize::new(0),
            partitions,
            owned: Default::default(),
        }
    }

    /// Every lane: the group's own first, then the owned partitions'.
    pub(crate) fn lanes(&self) -> Vec<Arc<GroupState>> {
        let parts = lock(&self.parts);
        let mut out = Vec::with_capacity(parts.len() + 1);
        out.push(self.base.clone());
        out.extend(parts.iter().cloned());
        out
    }

    /// A new lane for partition `state.partition`, with the group's settings.
    pub(crate) fn new_lane(&self, p: u32, key: String, next: String) -> Arc<GroupState> {
        let lane = Arc::new(GroupState::new(
            &self.topic,
            &self.group,
            Some(p),
            key,
            next,
            self.ready.clone(),
        ));
        let settings = self.base.settings();
        lane.set_settings(settings.policy, settings.ack_wait);
        lane
    }

    /// Starts pulling `lane` (its partition's lease is held, its take-over done).
    pub(crate) fn add_lane(&self, lane: Arc<GroupState>) {
        lock(&self.parts).push(lane);
        self.ready.notify_waiters();
    }

    /// Stops pulling partition `p`'s lane and returns it.
    pub(crate) fn remove_lane(&self, p: u32) -> Option<Arc<GroupState>> {
        let lane = {
            let mut parts = lock(&self.parts);
            let at = parts.iter().position(|l| l.partition == Some(p))?;
            parts.remove(at)
        };
        // A reader waiting on the lane's inbox lets go of it.
        self.ready.notify_waiters();
        Some(lane)
    }

    /// The latest subscriber sets the policy and the lease of every lane.
    pub(crate) fn set_settings(&self, policy: RedeliveryPolicy, ack_wait: Duration) {
        for lane in self.lanes() {
            lane.set_settings(policy.clone(), ack_wait);
        }
    }

    /// Hands every held message of every lane back (the bus closes).
    pub(crate) async fn release_all(&self, inner: &Inner) {
        for lane in self.lanes() {
            lane.release_all(inner).await;
        }
    }
}

/// The pull requests of a group in this bus: one inbox subscription that every request
/// is answered on, and how many messages are asked for and not yet read from it.
#[derive(Default)]
struct Puller {
    /// The inbox and its subscription; kept across cancelled calls so nothing it brought
    /// is lost.
    inbox: Option<(Subject, async_nats::Subscriber)>,
    /// Messages asked for and neither read from the inbox nor given up by the server.
    pending: usize,
    /// When the latest request has surely ended (it expired, plus [`PULL_GRACE`]).
    ends: Option<Instant>,
}

impl Puller {
    /// Subscribes to a fresh inbox unless one is open.
    async fn open(&mut self, client: &async_nats::Client) -> Result<()> {
        if self.inbox.is_none() {
            let inbox = Subject::from(client.new_inbox());
            let sub = client
                .subscribe(inbox.clone())
                .await
                .map_err(|e| NatsError::consume("subscribing to a pull inbox".into(), e))?;
            self.inbox = Some((inbox, sub));
            self.pending = 0;
            self.ends = None;
        }
        Ok(())
    }

    /// Asks for `want` more when at most half of `want` is still to come (as async-nats's
    /// pull stream does): whole batches, so at most 1.5 × `want` is asked for and not yet
    /// read. Asking only for the difference made the requests half as large and cost the
    /// server about 4 % more per message (decision 0009, *Consume path*).
    async fn top_up(
        &mut self,
        client: &async_nats::Client,
        next_subject: &Subject,
        want: usize,
        expires: Duration,
    ) -> Result<()> {
        let Some((inbox, _)) = &self.inbox else {
            return Ok(());
        };
        if self.pending > want / 2 {
            return Ok(());
        }
        let n = want;
        let body = format!("{{\"batch\":{n},\"expires\":{}}}", expires.as_nanos());
        client
            .publish_with_reply(next_subject.clone(), inbox.clone(), body.into())
            .await
            .map_err(|e| NatsError::consume("sending a pull request".into(), e))?;
        self.pending += n;
        self.ends = Some(Instant::now() + expires + PULL_GRACE);
        Ok(())
    }

    /// Ends the subscription and returns the deliveries that reached it unread (asked for
    /// ahead, no subscriber saw them), to be handed back. What the server sends after the
    /// unsubscribe is lost and comes back after its `ack_wait`. `unsubscribe` queues the
    /// unsubscribe on the connection before anything sent after it.
    async fn close(&mut self) -> Vec<Handback> {
        let mut unread = Vec::new();
        if let Some((_, mut sub)) = self.inbox.take() {
            if let Err(e) = sub.unsubscribe().await {
                tracing::debug!(error = %e, "unsubscribing a pull inbox");
            }
            while let Some(Some(m)) = sub.next().now_or_never() {
                unread.extend(Handback::unread(m));
            }
        }
        *self = Puller::default();
        unread
    }

    /// [`close`](Self::close) where nothing can be awaited: the subscriber is dropped
    /// (async-nats then unsubscribes from a spawned task).
    fn leave(&mut self) -> Vec<Handback> {
        let mut unread = Vec::new();
        if let Some((_, mut sub)) = self.inbox.take() {
            while let Some(Some(m)) = sub.next().now_or_never() {
                unread.extend(Handback::unread(m));
            }
        }
        *self = Puller::default();
        unread
    }

    /// A status message on the inbox: the end of a request (its undelivered count in
    /// `Nats-Pending-Messages`), a heartbeat, or an error. Returns the error to report.
    fn status(&mut self, m: &async_nats::Message, status: StatusCode) -> Option<String> {
        if status == StatusCode::IDLE_HEARTBEAT {
            return None;
        }
        let left = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Pending-Messages"))
            .and_then(|v| v.as_str().parse::<usize>().ok());
        // Without the count, everything asked for is taken as not coming (at worst the
        // next request asks for more than `max`, once).
        self.pending = left.map_or(0, |n| self.pending.saturating_sub(n));
        if self.pending == 0 {
            self.ends = None;
        }
        match status {
            // The request expired, or (a request without waiting) nothing was there.
            StatusCode::TIMEOUT | StatusCode::NOT_FOUND => None,
            // `409` (consumer deleted, limits exceeded), `503` (no JetStream), …
            _ => Some(format!(
                "pull request failed: {status} {}",
                m.description.as_deref().unwrap_or("")
            )),
        }
    }
}

impl GroupState {
    pub(crate) fn new(
        topic: &str,
        group: &str,
        partition: Option<u32>,
        key_prefix: String,
        next_subject: String,
        ready: Arc<Notify>,
    ) -> Self {
        let ack_prefix = match next_subject.strip_prefix("$JS.API.CONSUMER.MSG.NEXT.") {
            Some(stream_consumer) => format!("$JS.ACK.{stream_consumer}."),
            None => String::new(),
        };
        GroupState {
            ack_prefix,
            next_subject: next_subject.into(),
            topic: topic.into(),
            group: group.into(),
            partition,
            key_prefix,
            uncounted: Default::default(),
            settings: Mutex::new(GroupSettings {
                policy: RedeliveryPolicy::default(),
                ack_wait: Duration::from_secs(30),
            }),
            order: Mutex::new(Sequencer::default()),
            ready,
            first_failure: Default::default(),
            retired: AtomicBool::new(false),
            lease_until: Mutex::new(None),
            stash: Mutex::new(Vec::new()),
            settling: AtomicUsize::new(0),
            leaving: Mutex::new(Vec::new()),
            puller: Default::default(),
        }
    }

    /// `unsettled` messages were taken over from other processes: messages with a
    /// subject wait until all are back (they return in the order they went back to the
    /// server, not in stream order), for twice [`LIVENESS`] at most (one of them may be
    /// lost in flight once).
    pub(crate) fn set_inherited(&self, unsettled: usize) {
        lock(&self.order).hold_inherited(unsettled, Instant::now() + 2 * LIVENESS);
    }

    /// `topic/group` or `topic/group#p`, for logs.
    fn where_(&self) -> String {
        match self.partition {
            Some(p) => format!("{}/{}#{p}", self.topic, self.group),
            None => format!("{}/{}", self.topic, self.group),
        }
    }

    /// Whether a handed-out message is unsettled here (in flight, or its settle is
    /// being sent).
    pub(crate) fn busy(&self) -> bool {
        self.settling.load(Ordering::SeqCst) > 0 || lock(&self.order).in_flight() > 0
    }

    /// How long a pull request made now by this lane may wait on the server; `None`: it
    /// must make none. A partition lane's request ends by its fence, so it is closed
    /// before the lease can be taken even if this process stalls right after sending it
    /// (and however late its lease rounds ran before).
    fn pull_expires(&self, now: Instant) -> Option<Duration> {
        if self.partition.is_none() {
            return Some(PULL_EXPIRES);
        }
        let until = (*lock(&self.lease_until))?;
        Some(
            until
                .saturating_duration_since(now)
                .min(PARTITION_PULL_EXPIRES),
        )
        .filter(|left| *left >= MIN_PULL_EXPIRES)
    }

    /// The lane's lease was written (taken or renewed) by a request sent at `sent`: it
    /// may hand messages out until shortly before the lease could be taken from it.
    pub(crate) fn lease_renewed(&self, sent: Instant) {
        let was_fenced = self.fenced(Instant::now());
        *lock(&self.lease_until) = Some(sent + crate::lease::TTL - LEASE_FENCE_MARGIN);
        if was_fenced {
            // Subscribers waiting meanwhile hand out what is ready and ask for more.
            self.ready.notify_waiters();
        }
    }

    /// Whether this lane must not hand messages out now: it is a partition lane whose
    /// lease was not renewed recently enough (or not yet written).
    fn fenced(&self, now: Instant) -> bool {
        self.partition.is_some() && lock(&self.lease_until).is_none_or(|until| now >= until)
    }

    /// The lane's partition was released: its keep-alive task ends.
    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
    }

    /// The latest subscriber sets the policy and the lease of the group.
    pub(crate) fn set_settings(&self, policy: RedeliveryPolicy, ack_wait: Duration) {
        *lock(&self.settings) = GroupSettings { policy, ack_wait };
    }

    /// The lane's lease was lost (this bus stalled past the TTL and another member took
    /// the partition): stops pulling and forgets everything held, sending nothing about
    /// it. The new holder's take-over already made the server hand those messages out
    /// again; a `-NAK`, `+WPI` or `+ACK` sent now would act on *its* deliveries
    /// (nats-server 2.9 matches them by stream sequence only): redeliver what it holds,
    /// out of turn, or settle what it has not handled.
    pub(crate) async fn forget_all(&self) {
        self.retire();
        let _ = self.puller.lock().await.close().await;
        lock(&self.order).drain_all();
        lock(&self.stash).clear();
        lock(&self.leaving).clear();
        lock(&self.uncounted).clear();
        lock(&self.first_failure).clear();
    }

    /// What a dropped call read from the inbox and did not put into the sequencer, as
    /// hand-backs: those messages only waited here.
    fn take_stash(&self) -> Vec<Handback> {
        lock(&self.stash)
            .drain(..)
            .map(|m| Handback {
                reply: m.reply,
                seq: m.seq,
                delivered: m.delivered,
                waiting: true,
            })
            .collect()
    }

    /// Hands every held message back to the group, in stream order, redelivered after
    /// [`RELEASE_DELAY`]; later settles of them fail as stale.
    pub(crate) async fn release_all(&self, inner: &Inner) {
        // The pull inbox goes first (its unsubscribe precedes the naks on the
        // connection), or the server could hand a released message to it, to be lost.
        let mut back = self.puller.lock().await.close().await;
        back.extend(self.take_stash());
        back.extend(
            lock(&self.order)
                .drain_all()
                .into_iter()
                .map(|(h, waiting)| Handback::of(h, waiting)),
        );
        back.append(&mut lock(&self.leaving));
        self.release(inner, back).await;
    }

    /// Hands `back` back to the group, in stream order (the server redelivers them in
    /// the order they come back); a delivery that only waited here was no attempt, and
    /// the ledger says so before the `-NAK`.
    async fn release(&self, inner: &Inner, mut back: Vec<Handback>) {
        let Ok(client) = inner.client() else {
            return;
        };
        // The latest delivery of each message (an unread redelivery of one in flight).
        back.sort_by_key(|h| (h.seq, std::cmp::Reverse(h.delivered)));
        back.dedup_by_key(|h| h.seq);
        for h in back {
            if h.waiting {
                let known = lock(&self.uncounted).remove(&h.seq);
                let mut u = match known {
                    Some(u) => u,
                    None if h.delivered > 1 => inner
                        .ledger
                        .get(inner, &self.key(h.seq))
                        .await
                        .unwrap_or_default(),
                    None => Uncounted::default(),
                };
                if u.upto < h.delivered {
                    u.n += h.delivered - u.upto.max(h.delivered - 1);
                    u.upto = h.delivered;
                    self.record(inner, h.seq, u).await;
                }
            }
            // After a short delay: the server would hand a message released at once to
            // this bus's pull request, whose unsubscribe async-nats sends from a spawned
            // task (possibly after the nak); that delivery would be lost and counted.
            if let Err(e) = send_ack(client, &h.reply, AckKind::Nak(Some(RELEASE_DELAY))).await {
                tracing::warn!(topic = %self.topic, group = %self.group, error = %e,
                    "handing a held message back failed; it returns after the server's ack_wait");
            }
        }
    }

    /// The stream sequence and delivery count of a delivery to this lane, from its ack
    /// subject. This runs for every delivery: when the subject starts with the lane's
    /// own `$JS.ACK.<stream>.<consumer>.`, only the two numbers after it are read (a
    /// subject with a domain starts with the domain and an account hash instead, which
    /// are not this stream's and consumer's names); otherwise [`ack_info`] splits it.
    fn ack_info(&self, reply: &str) -> Option<(u64, u64)> {
        let Some(rest) = reply
            .strip_prefix(self.ack_prefix.as_str())
            .filter(|_| !self.ack_prefix.is_empty())
        else {
            return ack_info(reply);
        };
        let rest = rest.as_bytes();
        let first_dot = rest.iter().position(|b| *b == b'.')?;
        let delivered = parse_u64(&rest[..first_dot])?;
        let tail = &rest[first_dot + 1..];
        let second_dot = tail.iter().position(|b| *b == b'.')?;
        let seq = parse_u64(&tail[..second_dot])?;
        Some((seq, delivered))
    }

    fn key(&self, seq: u64) -> String {
        format!("{}.{seq}", self.key_prefix)
    }

    /// Writes the ledger entry of `seq` (a failure only costs an attempt too many).
    async fn record(&self, inner: &Inner, seq: u64, u: Uncounted) {
        if let Err(e) = inner.ledger.put(inner, &self.key(seq), u).await {
            tracing::warn!(topic = %self.topic, group = %self.group, seq, error = %e,
                "recording a delivery that was no attempt failed; it counts as one");
        }
    }

    /// The attempt number of delivery `delivered` of `seq`.
    fn attempt(&self, seq: u64, delivered: u64) -> u64 {
        if delivered <= 1 {
            return 1;
        }
        let n = lock(&self.uncounted).get(&seq).map_or(0, |u| u.n);
        delivered.saturating_sub(n).max(1)
    }

    fn settings(&self) -> GroupSettings {
        lock(&self.settings).clone()
    }

    /// The lease (`ack_wait`) the group's latest subscriber gave.
    pub(crate) fn settings_ack_wait(&self) -> Duration {
        lock(&self.settings).ack_wait
    }

    fn stale(&self, info: &DeliveryInfo) -> Error {
        Error::StaleDelivery {
            topic: self.topic.to_string(),
            group: self.group.to_string(),
            offset: info.offset,
        }
    }

    /// Marks `seq` settled for good, wakes a subscriber if the next of its subject is
    /// ready, and drops its ledger entry.
    fn done(&self, inner: &Arc<Inner>, seq: u64) {
        if lock(&self.order).done(seq) {
            self.ready.notify_waiters();
        }
        let entry = lock(&self.uncounted).remove(&seq);
        if entry.is_some_and(|u| u.n > 0) {
            let inner = inner.clone();
            let key = self.key(seq);
            tokio::spawn(async move {
                if let Err(e) = inner.ledger.delete(&inner, &key).await {
                    tracing::debug!(key, error = %e, "dropping a ledger entry failed (it expires)");
                }
            });
        }
    }

    fn delivery(
        self: &Arc<Self>,
        settler: &Arc<GroupSettler>,
        seq: u64,
        lease: u64,
        envelope: Arc<Envelope>,
    ) -> Delivery {
        let info = DeliveryInfo {
            topic: self.topic.clone(),
            group: self.group.clone(),
            offset: seq,
            attempt: u32::try_from(self.attempt(seq, lease)).unwrap_or(u32::MAX),
            lease,
        };
        Delivery::new(envelope, info, settler.clone())
    }
}

/// Keeps what the group holds in this bus alive at the server (`+WPI`), and forgets
/// away messages that did not come back; runs until the bus closes or is dropped.
pub(crate) fn spawn_keep_alive(
    state: Arc<GroupState>,
    inner: std::sync::Weak<Inner>,
    client: async_nats::Client,
    mut closed: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        loop {
            let server_wait = state.settings().server_ack_wait();
            let tick = (server_wait / 6).clamp(Duration::from_millis(20), Duration::from_secs(1));
            if state.retired.load(Ordering::SeqCst) {
                return;
            }
            tokio::select! {
                r = closed.wait_for(|c| *c) => {
                    let _ = r;
                    return;
                }
                _ = tokio::time::sleep(tick) => {}
            }
            let now = Instant::now();
            if state.fenced(now) {
                // Its lease may be another member's by now: nothing is sent for it
                // until the lease is renewed (or, lost, the lane is forgotten).
                continue;
            }
            let mut replies = Vec::new();
            let woke = {
                let mut order = lock(&state.order);
                order.keep_alive(now, server_wait / 3, |h| replies.push(h.reply.clone()));
                let expired = order.expire_away(now);
                order.lift_if_due(now) || expired
            };
            if woke {
                state.ready.notify_waiters();
            }
            let leaving = std::mem::take(&mut *lock(&state.leaving));
            if !leaving.is_empty()
                && let Some(inner) = inner.upgrade()
            {
                state.release(&inner, leaving).await;
            }
            for r in replies {
                if let Err(e) = client.publish(r, Bytes::from_static(b"+WPI")).await {
                    tracing::debug!(topic = %state.topic, group = %state.group, error = %e,
                        "keep-alive of a held message failed");
                }
            }
        }
    });
}

/// Makes the server hand out again, at once, every message of the group that another
/// process holds unsettled (a process that died, or a live member: it then sees its
/// settle succeed while this bus redelivers; effects stay once through the inbox). Called
/// when a group is first used through this bus, so what a killed process held is
/// redelivered before any later message, and in order.
///
/// JetStream has no call for this; a `-NAK` sent to the message's ack subject
/// (`$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>`)
/// is what the holder would send. The server ignores it for messages already acked. The
/// last one is sent as a request: its answer says that the server processed all of them.
pub(crate) async fn take_over(
    client: &async_nats::Client,
    stream: &str,
    consumer: &str,
    info: &jetstream::consumer::Info,
) -> Result<()> {
    if info.num_ack_pending == 0 {
        return Ok(());
    }
    let first = info.ack_floor.stream_sequence + 1;
    let last = info.delivered.stream_sequence;
    let dseq = info.delivered.consumer_sequence;
    if last < first {
        return Ok(());
    }
    let subject = |seq: u64| format!("$JS.ACK.{stream}.{consumer}.1.{seq}.{dseq}.0.0");
    let fail = |e: async_nats::Error| {
        NatsError::consume(
            format!("taking over the unsettled messages of {stream}/{consumer}"),
            e,
        )
    };
    for seq in first..last {
        client
            .publish(subject(seq), Bytes::from_static(b"-NAK"))
            .await
            .map_err(|e| fail(e.into()))?;
    }
    match tokio::time::timeout(
        LIVENESS,
        client.request(subject(last), Bytes::from_static(b"-NAK")),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(fail(e.into())),
        Err(_) => return Err(fail("nats-server did not answer within 5 s".into())),
    }
    tracing::info!(
        stream,
        consumer,
        pending = info.num_ack_pending,
        first,
        last,
        "took over the unsettled messages of the group"
    );
    Ok(())
}

/// A fetched message this bus handles itself instead of handing it out.
enum Special {
    /// Not an envelope written by switchyard: terminated (its ack subject).
    Undecodable(Subject),
    /// A replay meant for another group: acknowledged (its ack subject).
    OtherGroup(Subject),
    /// The extra delivery after an ack timeout on the last attempt: dead-lettered.
    Exhausted { seq: u64, attempts: u64, held: Held },
}

/// A delivery read from the pull inbox.
struct Fetched {
    reply: Subject,
    payload: Bytes,
    seq: u64,
    delivered: u64,
}

/// The [`DeliverySource`] of one subscriber. The subscribers of a group in one bus share
/// its lanes' pull inboxes (requests are made only from `next_batch`: when none is
/// ready, and to keep what the caller asked for coming; one subscriber at a time reads
/// them), so each lane's sequencer sees its messages in the server's order.
pub(crate) struct Source {
    inner: Arc<Inner>,
    group: Arc<Group>,
    /// The settler of the group's own lane (partition lanes get one per batch).
    base: Arc<GroupSettler>,
    /// Where the next `take_ready` starts, so no lane starves the others.
    turn: usize,
    closed: watch::Receiver<bool>,
}

impl Source {
    pub(crate) fn new(inner: Arc<Inner>, group: Arc<Group>) -> Self {
        let closed = inner.closed.subscribe();
        group.sources.fetch_add(1, Ordering::SeqCst);
        Source {
            base: Arc::new(GroupSettler {
                inner: inner.clone(),
                state: group.base.clone(),
            }),
            group,
            inner,
            turn: 0,
            closed,
        }
    }

    fn settler_of(&self, lane: &Arc<GroupState>) -> Arc<GroupSettler> {
        if Arc::ptr_eq(lane, &self.base.state) {
            return self.base.clone();
        }
        Arc::new(GroupSettler {
            inner: self.inner.clone(),
            state: lane.clone(),
        })
    }

    /// Whether a lane that may hand messages out has one ready.
    fn any_ready(lanes: &[Arc<GroupState>]) -> bool {
        let now = Instant::now();
        lanes
            .iter()
            .any(|l| !l.fenced(now) && lock(&l.order).has_ready())
    }

    /// Up to `max` of the group's ready messages, handed out, taken lane by lane.
    fn take_ready(&mut self, lanes: &[Arc<GroupState>], max: usize) -> Vec<Delivery> {
        let now = Instant::now();
        let mut out = Vec::new();
        let n = lanes.len();
        self.turn = self.turn.wrapping_add(1);
        for k in 0..n {
            if out.len() >= max {
                break;
            }
            let Some(lane) = lanes.get((self.turn + k) % n) else {
                continue;
            };
            if lane.fenced(now) {
                continue;
            }
            let ack_wait = lane.settings().ack_wait;
            let mut order = lock(&lane.order);
            if !order.has_ready() {
                continue;
            }
            let settler = self.settler_of(lane);
            while out.len() < max {
                let Some((seq, lease, held)) = order.take_ready(now, ack_wait) else {
                    break;
                };
                let envelope = held.envelope.clone();
                out.push(lane.delivery(&settler, seq, lease, envelope));
            }
        }
        out
    }

    /// Reads the ledger entries of fetched redeliveries that this bus sees for the first
    /// time.
    async fn read_ledger(&self, state: &GroupState, fetched: &[(u64, u64)]) {
        for &(seq, delivered) in fetched {
            if delivered <= 1
                || lock(&state.uncounted).contains_key(&seq)
                || lock(&state.order).contains(seq)
            {
                continue;
            }
            let u = match self.inner.ledger.get(&self.inner, &state.key(seq)).await {
                Ok(u) => u,
                Err(e) => {
                    tracing::warn!(at = %state.where_(), seq, error = %e,
                        "reading the ledger failed; every delivery counts as an attempt");
                    Uncounted::default()
                }
            };
            lock(&state.uncounted).insert(seq, u);
        }
    }

    /// Puts fetched messages into the lane's sequencer, in order. Returns those handled
    /// here, and the ledger entries to write: deliveries found to have been no attempts.
    fn arrive(
        &self,
        state: &GroupState,
        fetched: Vec<Fetched>,
    ) -> (Vec<Special>, Vec<(u64, Uncounted)>) {
        let settings = state.settings();
        let max_attempts = u64::from(settings.policy.max_attempts.max(1));
        let now = Instant::now();
        let mut special = Vec::new();
        let mut records = Vec::new();
        // Decoded before the sequencer is locked, which is then locked once for all.
        let mut decoded = Vec::with_capacity(fetched.len());
        for m in fetched {
            let envelope = match Envelope::from_bytes(&m.payload) {
                Ok(e) => Arc::new(e),
                Err(e) => {
                    tracing::error!(topic = %state.topic, seq = m.seq, error = %e,
                        "undecodable record terminated (not an envelope written by switchyard)");
                    special.push(Special::Undecodable(m.reply));
                    continue;
                }
            };
            if let Some(target) = envelope.extension(REPLAY_GROUP_EXTENSION)
                && target != &*state.group
            {
                special.push(Special::OtherGroup(m.reply));
                continue;
            }
            decoded.push((m, envelope));
        }
        let mut order = lock(&state.order);
        for (m, envelope) in decoded {
            let (seq, delivered) = (m.seq, m.delivered);
            let first_here = !order.contains(seq);
            // While taken-over messages come back, every keyed one is one of them.
            let taken_over = order.holding() && delivered > 1;
            let held = Held {
                reply: m.reply,
                envelope: envelope.clone(),
                seq,
                delivered,
            };
            let arrival = order.arrive(seq, delivered, envelope.subject.as_deref(), held, now);
            // Deliveries that were no attempts: the previous one of a waiting message
            // redelivered here, or of one a dead process held while an earlier message of
            // its subject, also inherited, was unsettled there (so it waited there too).
            let not_attempts = match arrival {
                Arrival::Replaced { .. } => Some(1),
                Arrival::Parked if first_here && taken_over && order.blocker(seq).is_some() => {
                    Some(1)
                }
                _ => None,
            };
            if let Some(k) = not_attempts {
                let mut uncounted = lock(&state.uncounted);
                let u = uncounted.entry(seq).or_default();
                let upto = delivered - 1;
                if u.upto < upto {
                    u.n += k.min(upto - u.upto);
                    u.upto = upto;
                    records.push((seq, *u));
                }
            }
            let attempt = state.attempt(seq, delivered);
            if attempt > max_attempts
                && arrival != Arrival::Stale
                && let Some(held) = order.take(seq, now + AWAY_GRACE)
            {
                special.push(Special::Exhausted {
                    seq,
                    attempts: attempt - 1,
                    held,
                });
            }
        }
        (special, records)
    }

    /// Settles what [`arrive`](Self::arrive) set aside.
    async fn handle(&self, settler: &GroupSettler, special: Vec<Special>) -> Result<()> {
        let state = &settler.state;
        for s in special {
            match s {
                Special::Undecodable(reply) => {
                    if let Ok(client) = self.inner.client() {
                        let _ = send_ack(client, &reply, AckKind::Term).await;
                    }
                }
                Special::OtherGroup(reply) => {
                    if let Ok(client) = self.inner.client() {
                        let _ = send_ack(client, &reply, AckKind::Ack).await;
                    }
                }
                Special::Exhausted {
                    seq,
                    attempts,
                    held,
                } => {
                    let now = Timestamp::now();
                    let first = lock(&state.first_failure).remove(&seq).unwrap_or(now);
                    let reason = "not settled within ack_wait on the last attempt".to_string();
                    let attempts = u32::try_from(attempts).unwrap_or(u32::MAX);
                    settler
                        .dead_letter(seq, held, reason, attempts, first, now)
                        .await?;
                    state.done(&self.inner, seq);
                }
            }
        }
        Ok(())
    }

    /// Reads what `first` started on `lane`'s inbox (and whatever else is already there)
    /// into the lane's sequencer. Returns a failure the server reported, if any.
    async fn ingest(
        &self,
        lane: &Arc<GroupState>,
        puller: &mut tokio::sync::MutexGuard<'_, Puller>,
        first: Option<async_nats::Message>,
    ) -> Option<(Vec<Special>, Vec<(u64, Uncounted)>, Option<String>)> {
        // What a dropped call left read but not yet in the sequencer goes first.
        let mut fetched = std::mem::take(&mut *lock(&lane.stash));
        let mut failure = None;
        let mut next = first;
        while let Some(m) = next {
            match m.status {
                Some(status) if status != StatusCode::OK => {
                    failure = failure.or(puller.status(&m, status));
                }
                _ => {
                    puller.pending = puller.pending.saturating_sub(1);
                    let info = m.reply.as_ref().and_then(|r| lane.ack_info(r.as_str()));
                    match (m.reply, info) {
                        (Some(reply), Some((seq, delivered))) => fetched.push(Fetched {
                            reply,
                            payload: m.payload,
                            seq,
                            delivered: delivered.max(1),
                        }),
                        (reply, _) => tracing::warn!(at = %lane.where_(), subject = ?reply,
                            "message without JetStream metadata skipped"),
                    }
                }
            }
            next = match puller.inbox.as_mut() {
                Some((_, inbox)) => inbox.next().now_or_never().flatten(),
                None => None,
            };
        }
        if fetched.is_empty() {
            return failure.map(|f| (Vec::new(), Vec::new(), Some(f)));
        }
        // The ledger lookups await: the messages wait in the lane's stash meanwhile, so
        // a caller that drops this future (a timeout) loses none of them. A message
        // lost here would come back only after its `ack_wait`, behind later messages of
        // its subject.
        let keys: Vec<(u64, u64)> = fetched.iter().map(|m| (m.seq, m.delivered)).collect();
        *lock(&lane.stash) = fetched;
        self.read_ledger(lane, &keys).await;
        let fetched = std::mem::take(&mut *lock(&lane.stash));
        let (special, records) = self.arrive(lane, fetched);
        Some((special, records, failure))
    }
}

impl Source {
    /// Reads what already arrived on the inbox of every lane with nothing ready, without
    /// waiting (unless another subscriber is reading them): a lane's read-ahead must not
    /// age unread, past the server's `ack_wait`, while other lanes keep the subscribers
    /// busy (it would then be delivered twice).
    async fn read_arrived(&self, lanes: &[Arc<GroupState>]) -> Result<()> {
        let Ok(_reader) = self.group.reader.try_lock() else {
            return Ok(());
        };
        for lane in lanes {
            // A lane with messages ready is read when they are gone (as a single lane
            // was): reading ahead of its subscribers would only fill memory.
            if lock(&lane.order).has_ready() {
                continue;
            }
            let Ok(mut puller) = lane.puller.try_lock() else {
                continue;
            };
            let first = match puller.inbox.as_mut() {
                Some((_, inbox)) => inbox.next().now_or_never().flatten(),
                None => None,
            };
            if first.is_none() && lock(&lane.stash).is_empty() {
                continue;
            }
            let out = self.ingest(lane, &mut puller, first).await;
            drop(puller);
            if let Some((special, records, failure)) = out {
                if let Some(e) = failure {
                    tracing::warn!(at = %lane.where_(), error = %e, "pull request failed; renewing it");
                }
                for (seq, u) in records {
                    lane.record(&self.inner, seq, u).await;
                }
                let settler = self.settler_of(lane);
                self.handle(&settler, special).await?;
            }
        }
        Ok(())
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        let group = self.group.clone();
        if group.sources.fetch_sub(1, Ordering::SeqCst) != 1 {
            return;
        }
        // The last subscriber of the group in this bus left: its pull inboxes end, and
        // what waits here goes back to the group (deliveries in flight stay settleable).
        // The lease task then releases the partitions this bus owns.
        for state in group.lanes() {
            let mut back = match state.puller.try_lock() {
                Ok(mut puller) => puller.leave(),
                Err(_) => Vec::new(),
            };
            back.extend(state.take_stash());
            back.extend(
                lock(&state.order)
                    .drain_waiting()
                    .into_iter()
                    .map(|h| Handback::of(h, true)),
            );
            if !back.is_empty() {
                lock(&state.leaving).extend(back);
            }
        }
        group.ready.notify_waiters();
    }
}

#[async_trait]
impl DeliverySource for Source {
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>> {
        let max = max.max(1);
        let group = self.group.clone();
        loop {
            self.inner.check_open()?;
            let notified = group.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let lanes = group.lanes();
            if lanes.len() > 1 || lanes.iter().any(|l| !lock(&l.stash).is_empty()) {
                self.read_arrived(&lanes).await?;
            }
            if Self::any_ready(&lanes) {
                // Keeps the next messages coming while the caller handles these (unless
                // another subscriber of the group is reading the inboxes: it asks itself).
                // Asked for before anything is handed out: a caller that drops this
                // future at an await (a timeout) loses no message taken out for it.
                if let Ok(client) = self.inner.client() {
                    let now = Instant::now();
                    for lane in &lanes {
                        let Some(expires) = lane.pull_expires(now) else {
                            continue;
                        };
                        if let Ok(mut puller) = lane.puller.try_lock()
                            && let Err(e) = puller
                                .top_up(client, &lane.next_subject, max, expires)
                                .await
                        {
                            tracing::debug!(at = %lane.where_(), error = %e, "asking for more failed");
                        }
                    }
                }
                // No await from here to the return.
                let ready = self.take_ready(&lanes, max);
                if !ready.is_empty() {
                    return Ok(ready);
                }
            }
            let _reader = tokio::select! {
                _ = self.closed.wait_for(|c| *c) => return Err(Error::Closed),
                _ = &mut notified => continue,
                r = group.reader.lock() => r,
            };
            let (client, _) = self.inner.conn().await?;
            let mut pullers = Vec::with_capacity(lanes.len());
            let now = Instant::now();
            for lane in &lanes {
                let mut puller = lane.puller.lock().await;
                puller.open(client).await?;
                // A lane whose lease is not fresh asks for nothing: what the server sent
                // it could not be handed out, nor given back without acting on the new
                // holder's deliveries. It asks again once the lease is renewed.
                if let Some(expires) = lane.pull_expires(now) {
                    puller
                        .top_up(client, &lane.next_subject, max, expires)
                        .await?;
                }
                pullers.push(puller);
            }
            let ends = pullers.iter().filter_map(|p| p.ends).min();
            let item = {
                let nexts: Vec<_> = pullers
                    .iter_mut()
                    .enumerate()
                    .filter_map(|(i, p)| {
                        p.inbox
                            .as_mut()
                            .map(|(_, inbox)| Box::pin(async move { (i, inbox.next().await) }))
                    })
                    .collect();
                if nexts.is_empty() {
                    continue;
                }
                tokio::select! {
                    _ = self.closed.wait_for(|c| *c) => return Err(Error::Closed),
                    _ = &mut notified => continue,
                    // The requests' end notices were lost: what they asked for is not coming.
                    _ = sleep_until(ends) => None,
                    (item, _, _) = futures_util::future::select_all(nexts) => Some(item),
                }
            };
            let Some((i, item)) = item else {
                let now = Instant::now();
                for p in &mut pullers {
                    if p.ends.is_some_and(|e| e <= now) {
                        p.pending = 0;
                        p.ends = None;
                    }
                }
                continue;
            };
            let (Some(lane), Some(puller)) = (lanes.get(i), pullers.get_mut(i)) else {
                continue;
            };
            let Some(first) = item else {
                // The subscription ended (the connection closed it): a fresh one next time.
                **puller = Puller::default();
                continue;
            };
            let Some((special, records, failure)) = self.ingest(lane, puller, Some(first)).await
            else {
                continue;
            };
            drop(pullers);
            drop(_reader);
            if let Some(e) = failure {
                tracing::warn!(at = %lane.where_(), error = %e, "pull request failed; renewing it");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            for (seq, u) in records {
                lane.record(&self.inner, seq, u).await;
            }
            let settler = self.settler_of(lane);
            self.handle(&settler, special).await?;
            group.ready.notify_waiters();
        }
    }
}

/// Sleeps until `at`, or forever when there is no `at`.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Counts a settle in progress on a lane until dropped.
struct Settling<'a>(&'a GroupState);

impl Drop for Settling<'_> {
    fn drop(&mut self) {
        self.0.settling.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Settles the deliveries of one group.
pub(crate) struct GroupSettler {
    inner: Arc<Inner>,
    state: Arc<GroupState>,
}

impl GroupSettler {
    /// Publishes the message to `<topic>.dlq` with the failure in headers, then
    /// terminates it in the group. The DLQ publish is deduplicated per (group, sequence),
    /// so a crash between the two steps stores it once.
    async fn dead_letter(
        &self,
        seq: u64,
        held: Held,
        reason: String,
        attempts: u32,
        first: Timestamp,
        last: Timestamp,
    ) -> Result<()> {
        let s = &self.state;
        let mut headers = async_nats::HeaderMap::new();
        let clean = |v: &str| v.replace(['\r', '\n'], " ");
        headers.insert(H_TOPIC, clean(&s.topic).as_str());
        headers.insert(H_GROUP, clean(&s.group).as_str());
        headers.insert(H_REASON, clean(&reason).as_str());
        headers.insert(H_ATTEMPTS, attempts.to_string().as_str());
        headers.insert(H_FIRST, first.unix_micros().to_string().as_str());
        headers.insert(H_LAST, last.unix_micros().to_string().as_str());
        let msg_id = format!("dlq.{}.{seq}", s.group);
        self.inner
            .publish_one(
                &dlq_topic(&s.topic),
                &held.envelope,
                false,
                Some(msg_id),
                headers,
            )
            .await?;
        send_ack(self.inner.client()?, &held.reply, AckKind::Term)
            .await
            .map_err(|e| {
                NatsError::consume(format!("terminating {}/{} {seq}", s.topic, s.group), e)
            })?;
        tracing::warn!(topic = %s.topic, group = %s.group, seq, attempts, reason, "dead-lettered");
        Ok(())
    }
}

#[async_trait]
impl Settler for GroupSettler {
    async fn settle(&self, info: &DeliveryInfo, how: Settle) -> Result<()> {
        let s = &self.state;
        let seq = info.offset;
        let settings = s.settings();
        let now = Instant::now();
        // How long the message may stay away before its subject stops waiting for it:
        // a nack's delay, then the server's ack_wait and some slack.
        let nack_delay = match &how {
            Settle::Nack { delay, .. } if !settings.policy.exhausted(info.attempt) => {
                Some(delay.unwrap_or_else(|| settings.policy.backoff(info.attempt)))
            }
            _ => None,
        };
        let until = now + nack_delay.unwrap_or_default() + settings.server_ack_wait() + AWAY_GRACE;
        if s.fenced(now) {
            // The partition's lease may be another member's by now, and what is sent to
            // the ack subject would act on its delivery of the message: the settle is
            // stale, as after a redelivery (the message is or will be handled there).
            return Err(s.stale(info));
        }
        s.settling.fetch_add(1, Ordering::SeqCst);
        let _settling = Settling(s);
        let Some(held) = lock(&s.order).begin_settle(seq, info.lease, until) else {
            return Err(s.stale(info));
        };
        let fail = |e: async_nats::PublishError| {
            NatsError::consume(format!("settling {}/{} {seq}", s.topic, s.group), e)
        };
        let client = self.inner.client()?;
        match how {
            Settle::Ack => {
                lock(&s.first_failure).remove(&seq);
                send_ack(client, &held.reply, AckKind::Ack)
                    .await
                    .map_err(fail)?;
                s.done(&self.inner, seq);
                Ok(())
            }
            Settle::Nack { reason, .. } => {
                let ts = Timestamp::now();
                let first = *lock(&s.first_failure).entry(seq).or_insert(ts);
                match nack_delay {
                    None => {
                        lock(&s.first_failure).remove(&seq);
                        // Boxed: the rare dead-letter path would otherwise make every
                        // settle's future (boxed per call) several times larger.
                        Box::pin(self.dead_letter(seq, held, reason, info.attempt, first, ts))
                            .await?;
                        s.done(&self.inner, seq);
                        Ok(())
                    }
                    // Stays away, its subject blocked, until it comes back.
                    Some(delay) => send_ack(client, &held.reply, AckKind::Nak(Some(delay)))
                        .await
                        .map_err(fail),
                }
            }
            Settle::DeadLetter { reason } => {
                let ts = Timestamp::now();
                let first = lock(&s.first_failure).remove(&seq).unwrap_or(ts);
                Box::pin(self.dead_letter(seq, held, reason, info.attempt, first, ts)).await?;
                s.done(&self.inner, seq);
                Ok(())
            }
        }
    }
}

/// Reads up to `limit` entries of the DLQ stream of `topic`, oldest first, with their
/// DLQ sequences (replayed entries are deleted from the stream, so they are not seen).
pub(crate) async fn read_dead_letters(
    inner: &Inner,
    topic: &str,
    limit: usize,
) -> Result<Vec<(u64, DeadLetter)>> {
    let dlq = dlq_topic(topic);
    let mut stream = inner.stream(&dlq).await?;
    let (first, last) = {
        let info = stream
            .info()
            .await
            .map_err(|e| NatsError::stream(&dlq, e))?;
        (info.state.first_sequence, info.state.last_sequence)
    };
    let subject = inner.names.subject(&dlq);
    let mut out = Vec::new();
    let mut seq = first.max(1);
    while out.len() < limit && last > 0 && seq <= last {
        let m = match stream.get_first_raw_message_by_subject(&subject, seq).await {
            Ok(m) => m,
            // Nothing at or after `seq` (deleted by a replay meanwhile).
            Err(e) => {
                tracing::debug!(topic = %dlq, seq, error = %e, "end of the dead letters");
                break;
            }
        };
        seq = m.sequence + 1;
        let h = |name: &str| {
            m.headers
                .get(name)
                .map(|v| v.as_str().to_string())
                .unwrap_or_default()
        };
        let micros = |name: &str| Timestamp::from_unix_micros(h(name).parse().unwrap_or(0));
        let envelope = match Envelope::from_bytes(&m.payload) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(topic = %dlq, seq = m.sequence, error = %e, "undecodable dead letter skipped");
                continue;
            }
        };
        out.push((
            m.sequence,
            DeadLetter {
                dlq_offset: m.sequence,
                topic: h(H_TOPIC),
                group: h(H_GROUP),
                reason: h(H_REASON),
                attempts: h(H_ATTEMPTS).parse().unwrap_or(0),
                first_failure: micros(H_FIRST),
                last_failure: micros(H_LAST),
                envelope,
            },
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_info_reads_both_ack_subject_forms() {
        // nats-server 2.9: stream, consumer, delivered, stream seq, consumer seq, time, pending.
        assert_eq!(
            ack_info("$JS.ACK.SY_t.C_g.3.42.57.1700000000000000000.9"),
            Some((42, 3))
        );
        // With domain and account hash before the stream, and a token after.
        assert_eq!(
            ack_info("$JS.ACK._.ACCHASH.SY_t.C_g.1.7.7.1700000000000000000.0.tok"),
            Some((7, 1))
        );
        assert_eq!(
            ack_info("$JS.ACK._.ACCHASH.SY_t.C_g.2.8.9.1700000000000000000.0"),
            Some((8, 2))
        );
        assert_eq!(ack_info("_INBOX.abc"), None);
        assert_eq!(ack_info("$JS.ACK.SY_t.C_g.x.42.57.1.9"), None);
        assert_eq!(ack_info("$JS.ACK.SY_t.C_g.3.42"), None);
        assert_eq!(ack_info("$JS.ACK.a.b.c.d.e.f.g.h.i.j.k.l.m"), None);
        assert_eq!(ack_info("$JS.ACK.SY_t.C_g.3..57.1.9"), None);
        assert_eq!(
            ack_info("$JS.ACK.SY_t.C_g.3.99999999999999999999.57.1.9"),
            None
        );
    }

    #[test]
    fn a_lane_reads_its_own_ack_subjects_and_falls_back_for_others() {
        let lane = GroupState::new(
            "t",
            "g",
            None,
            "SY_t.C_g".into(),
            "$JS.API.CONSUMER.MSG.NEXT.SY_t.C_g".into(),
            Arc::new(Notify::new()),
        );
        let own = "$JS.ACK.SY_t.C_g.3.42.57.1700000000000000000.9";
        assert_eq!(lane.ack_info(own), Some((42, 3)));
        assert_eq!(lane.ack_info(own), ack_info(own));
        // Another consumer's, and the form with a domain: read by splitting.
        assert_eq!(
            lane.ack_info("$JS.ACK.SY_t.C_h.2.7.7.1700000000000000000.0"),
            Some((7, 2))
        );
        assert_eq!(
            lane.ack_info("$JS.ACK._.ACCHASH.SY_t.C_g.2.8.9.1700000000000000000.0"),
            Some((8, 2))
        );
        assert_eq!(lane.ack_info("$JS.ACK.SY_t.C_g.x.42.57.1.9"), None);
        assert_eq!(lane.ack_info("$JS.ACK.SY_t.C_g.3"), None);
        assert_eq!(lane.ack_info("$JS.ACK.SY_t.C_g.3."), None);
    }

    #[test]
    fn a_partition_lane_hands_out_only_while_its_lease_is_fresh() {
        let lane = |partition| {
            GroupState::new(
                "t",
                "g",
                partition,
                "SY_t.C_g_p3".into(),
                "$JS.API.CONSUMER.MSG.NEXT.SY_t.C_g_p3".into(),
                Arc::new(Notify::new()),
            )
        };
        let now = Instant::now();
        assert!(!lane(None).fenced(now), "the group's own lane has no lease");
        let p = lane(Some(3));
        assert!(p.fenced(now), "no lease written yet");
        p.lease_renewed(now);
        assert!(!p.fenced(now));
        assert!(!p.fenced(now + crate::lease::TTL - LEASE_FENCE_MARGIN - Duration::from_millis(1)));
        assert!(p.fenced(now + crate::lease::TTL - LEASE_FENCE_MARGIN));
        // A renewal sent long ago (the process stalled before it was answered).
        let stalled = lane(Some(3));
        stalled.lease_renewed(now - crate::lease::TTL);
        assert!(stalled.fenced(now));
        // A pull request ends by the fence: full length while the lease is fresh, shorter
        // near the fence, none within `MIN_PULL_EXPIRES` of it.
        assert_eq!(p.pull_expires(now), Some(PARTITION_PULL_EXPIRES));
        let fence = now + crate::lease::TTL - LEASE_FENCE_MARGIN;
        assert_eq!(
            p.pull_expires(fence - Duration::from_secs(3)),
            Some(Duration::from_secs(3))
        );
        assert_eq!(p.pull_expires(fence - MIN_PULL_EXPIRES / 2), None);
        assert_eq!(stalled.pull_expires(now), None);
        assert_eq!(
            lane(Some(3)).pull_expires(now),
            None,
            "no lease written yet"
        );
        assert_eq!(lane(None).pull_expires(now), Some(PULL_EXPIRES));
    }

    fn status_message(status: u16, pending: Option<&str>) -> async_nats::Message {
        let headers = pending.map(|p| {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Pending-Messages", p);
            h
        });
        async_nats::Message {
            subject: Subject::from_static("_INBOX.x"),
            reply: None,
            payload: Bytes::new(),
            headers,
            status: StatusCode::from_u16(status).ok(),
            description: None,
            length: 0,
        }
    }

    #[test]
    fn a_request_end_subtracts_what_it_did_not_deliver() {
        let mut p = Puller {
            pending: 1_500,
            ..Default::default()
        };
        let m = status_message(408, Some("1000"));
        assert_eq!(p.status(&m, StatusCode::TIMEOUT), None);
        assert_eq!(p.pending, 500);
        // Heartbeats change nothing.
        let m = status_message(100, None);
        assert_eq!(p.status(&m, StatusCode::IDLE_HEARTBEAT), None);
        assert_eq!(p.pending, 500);
        // An end without the count: nothing more is expected.
        let m = status_message(408, None);
        assert_eq!(p.status(&m, StatusCode::TIMEOUT), None);
        assert_eq!(p.pending, 0);
        // Anything else is reported.
        p.pending = 10;
        let m = status_message(409, Some("10"));
        assert!(p.status(&m, StatusCode::REQUEST_TERMINATED).is_some());
        assert_eq!(p.pending, 0);
    }
}
