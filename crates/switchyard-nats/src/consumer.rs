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

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::AckKind;
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

/// A message held by this bus: the JetStream message (to settle it), its envelope, and
/// its stream sequence and delivery count.
pub(crate) struct Held {
    message: jetstream::Message,
    envelope: Arc<Envelope>,
    seq: u64,
    delivered: u64,
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
    /// `<stream>.<consumer>`: the prefix of this group's keys in the ledger.
    key_prefix: String,
    /// What the ledger knows of messages this bus holds (read or written here).
    uncounted: Mutex<HashMap<u64, Uncounted>>,
    settings: Mutex<GroupSettings>,
    order: Mutex<Sequencer<Held>>,
    /// Woken when a parked message becomes ready.
    ready: Notify,
    first_failure: Mutex<HashMap<u64, Timestamp>>,
    sources: AtomicUsize,
    /// Waiting messages the last subscriber left behind, handed back by the keep-alive
    /// task (or by `close`, in one ordered pass with the rest).
    leaving: Mutex<Vec<Held>>,
    /// The group's one pull request in this bus: every fetched message enters the
    /// sequencer in the order the server delivered it.
    puller: tokio::sync::Mutex<Puller>,
    /// The handle of the group's durable consumer (the latest subscriber's).
    consumer: Mutex<Option<jetstream::consumer::Consumer<jetstream::consumer::pull::Config>>>,
}

/// The open pull request of a group in this bus.
#[derive(Default)]
struct Puller {
    /// Kept across cancelled calls so nothing it brought is lost.
    current: Option<jetstream::consumer::pull::Batch>,
}

impl GroupState {
    pub(crate) fn new(topic: &str, group: &str, key_prefix: String) -> Self {
        GroupState {
            topic: topic.into(),
            group: group.into(),
            key_prefix,
            uncounted: Default::default(),
            settings: Mutex::new(GroupSettings {
                policy: RedeliveryPolicy::default(),
                ack_wait: Duration::from_secs(30),
            }),
            order: Mutex::new(Sequencer::default()),
            ready: Notify::new(),
            first_failure: Default::default(),
            sources: AtomicUsize::new(0),
            leaving: Mutex::new(Vec::new()),
            puller: Default::default(),
            consumer: Mutex::new(None),
        }
    }

    /// `unsettled` messages were taken over from other processes: messages with a
    /// subject wait until all are back (they return in the order they went back to the
    /// server, not in stream order), for twice [`LIVENESS`] at most (one of them may be
    /// lost in flight once).
    pub(crate) fn set_inherited(&self, unsettled: usize) {
        lock(&self.order).hold_inherited(unsettled, Instant::now() + 2 * LIVENESS);
    }

    /// The latest subscriber sets the policy and the lease of the group.
    pub(crate) fn set_settings(&self, policy: RedeliveryPolicy, ack_wait: Duration) {
        *lock(&self.settings) = GroupSettings { policy, ack_wait };
    }

    /// Hands every held message back to the group, in stream order, redelivered after
    /// [`RELEASE_DELAY`]; later settles of them fail as stale.
    pub(crate) async fn release_all(&self, inner: &Inner) {
        // The open pull request goes first (its unsubscribe precedes the naks on the
        // connection), or the server could hand a released message to it, to be lost.
        self.puller.lock().await.current = None;
        let mut held = lock(&self.order).drain_all();
        held.extend(
            std::mem::take(&mut *lock(&self.leaving))
                .into_iter()
                .map(|h| (h, true)),
        );
        // In stream order: the server redelivers them in the order they come back.
        held.sort_by_key(|(h, _)| h.seq);
        self.release(inner, held).await;
    }

    /// Hands `held` back to the group; the delivery of a waiting one (`true`) was no
    /// attempt, and the ledger says so before the `-NAK`.
    async fn release(&self, inner: &Inner, held: Vec<(Held, bool)>) {
        for (h, waiting) in held {
            if waiting {
                let mut u = lock(&self.uncounted).remove(&h.seq).unwrap_or_default();
                if u.upto < h.delivered {
                    u.n += h.delivered - u.upto.max(h.delivered - 1);
                    u.upto = h.delivered;
                    self.record(inner, h.seq, u).await;
                }
            }
            // After a short delay: the server would hand a message released at once to
            // this bus's pull request, whose unsubscribe async-nats sends from a spawned
            // task (possibly after the nak); that delivery would be lost and counted.
            if let Err(e) = h.message.ack_with(AckKind::Nak(Some(RELEASE_DELAY))).await {
                tracing::warn!(topic = %self.topic, group = %self.group, error = %e,
                    "handing a held message back failed; it returns after the server's ack_wait");
            }
        }
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
        let n = lock(&self.uncounted).get(&seq).map_or(0, |u| u.n);
        delivered.saturating_sub(n).max(1)
    }

    fn settings(&self) -> GroupSettings {
        lock(&self.settings).clone()
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
            tokio::select! {
                r = closed.wait_for(|c| *c) => {
                    let _ = r;
                    return;
                }
                _ = tokio::time::sleep(tick) => {}
            }
            let now = Instant::now();
            let mut replies = Vec::new();
            let woke = {
                let mut order = lock(&state.order);
                order.keep_alive(now, server_wait / 3, |h| {
                    if let Some(r) = &h.message.reply {
                        replies.push(r.clone());
                    }
                });
                let expired = order.expire_away(now);
                order.lift_if_due(now) || expired
            };
            if woke {
                state.ready.notify_waiters();
            }
            let leaving: Vec<_> = std::mem::take(&mut *lock(&state.leaving))
                .into_iter()
                .map(|h| (h, true))
                .collect();
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
    /// Not an envelope written by switchyard: terminated.
    Undecodable(jetstream::Message),
    /// A replay meant for another group: acknowledged.
    OtherGroup(jetstream::Message),
    /// The extra delivery after an ack timeout on the last attempt: dead-lettered.
    Exhausted { seq: u64, attempts: u64, held: Held },
}

/// The [`DeliverySource`] of one subscriber. The subscribers of a group in one bus share
/// one pull request (made only while one of them asks for messages and none is ready),
/// so the sequencer sees the messages in the server's order.
pub(crate) struct Source {
    inner: Arc<Inner>,
    settler: Arc<GroupSettler>,
    closed: watch::Receiver<bool>,
}

impl Source {
    pub(crate) fn new(
        inner: Arc<Inner>,
        consumer: jetstream::consumer::Consumer<jetstream::consumer::pull::Config>,
        state: Arc<GroupState>,
    ) -> Self {
        let closed = inner.closed.subscribe();
        state.sources.fetch_add(1, Ordering::SeqCst);
        *lock(&state.consumer) = Some(consumer);
        Source {
            settler: Arc::new(GroupSettler {
                inner: inner.clone(),
                state,
            }),
            inner,
            closed,
        }
    }

    /// Up to `max` of the group's ready messages, handed out.
    fn take_ready(&self, max: usize) -> Vec<Delivery> {
        let state = &self.settler.state;
        let ack_wait = state.settings().ack_wait;
        let now = Instant::now();
        let mut out = Vec::new();
        let mut order = lock(&state.order);
        while out.len() < max {
            let Some((seq, lease, held)) = order.take_ready(now, ack_wait) else {
                break;
            };
            let envelope = held.envelope.clone();
            out.push(state.delivery(&self.settler, seq, lease, envelope));
        }
        out
    }

    /// Reads the ledger entries of fetched redeliveries that this bus sees for the first
    /// time.
    async fn read_ledger(&self, fetched: &[jetstream::Message]) {
        let state = &self.settler.state;
        for m in fetched {
            let Ok(i) = m.info() else { continue };
            let seq = i.stream_sequence;
            if i.delivered <= 1
                || lock(&state.uncounted).contains_key(&seq)
                || lock(&state.order).contains(seq)
            {
                continue;
            }
            let u = match self.inner.ledger.get(&self.inner, &state.key(seq)).await {
                Ok(u) => u,
                Err(e) => {
                    tracing::warn!(at = %self.where_(), seq, error = %e,
                        "reading the ledger failed; every delivery counts as an attempt");
                    Uncounted::default()
                }
            };
            lock(&state.uncounted).insert(seq, u);
        }
    }

    /// Puts fetched messages into the sequencer, in order. Returns those handled here,
    /// and the ledger entries to write: deliveries found to have been no attempts.
    fn arrive(&self, fetched: Vec<jetstream::Message>) -> (Vec<Special>, Vec<(u64, Uncounted)>) {
        let state = &self.settler.state;
        let settings = state.settings();
        let max_attempts = u64::from(settings.policy.max_attempts.max(1));
        let now = Instant::now();
        let mut special = Vec::new();
        let mut records = Vec::new();
        for message in fetched {
            let (seq, delivered) = match message.info() {
                Ok(i) => (i.stream_sequence, i.delivered.max(1) as u64),
                Err(e) => {
                    tracing::warn!(error = %e, "message without JetStream metadata skipped");
                    continue;
                }
            };
            let envelope = match Envelope::from_bytes(&message.payload) {
                Ok(e) => Arc::new(e),
                Err(e) => {
                    tracing::error!(topic = %state.topic, seq, error = %e,
                        "undecodable record terminated (not an envelope written by switchyard)");
                    special.push(Special::Undecodable(message));
                    continue;
                }
            };
            if let Some(target) = envelope.extension(REPLAY_GROUP_EXTENSION)
                && target != &*state.group
            {
                special.push(Special::OtherGroup(message));
                continue;
            }
            let mut order = lock(&state.order);
            let first_here = !order.contains(seq);
            // While taken-over messages come back, every keyed one is one of them.
            let taken_over = order.holding() && delivered > 1;
            let held = Held {
                message,
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
    async fn handle(&self, special: Vec<Special>) -> Result<()> {
        let state = &self.settler.state;
        for s in special {
            match s {
                Special::Undecodable(m) => {
                    let _ = m.ack_with(AckKind::Term).await;
                }
                Special::OtherGroup(m) => {
                    let _ = m.ack().await;
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
                    self.settler
                        .dead_letter(seq, held, reason, attempts, first, now)
                        .await?;
                    state.done(&self.inner, seq);
                }
            }
        }
        Ok(())
    }

    fn where_(&self) -> String {
        format!("{}/{}", self.settler.state.topic, self.settler.state.group)
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        let state = self.settler.state.clone();
        if state.sources.fetch_sub(1, Ordering::SeqCst) != 1 {
            return;
        }
        // The last subscriber of the group in this bus left: its open pull request ends,
        // and what waits here goes back to the group (deliveries in flight stay
        // settleable).
        if let Ok(mut puller) = state.puller.try_lock() {
            puller.current = None;
        }
        let waiting = lock(&state.order).drain_waiting();
        if waiting.is_empty() {
            return;
        }
        lock(&state.leaving).extend(waiting);
    }
}

#[async_trait]
impl DeliverySource for Source {
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>> {
        let max = max.max(1);
        let state = self.settler.state.clone();
        loop {
            self.inner.check_open()?;
            let notified = state.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let ready = self.take_ready(max);
            if !ready.is_empty() {
                return Ok(ready);
            }
            let mut puller = tokio::select! {
                _ = self.closed.wait_for(|c| *c) => return Err(Error::Closed),
                _ = &mut notified => continue,
                p = state.puller.lock() => p,
            };
            if puller.current.is_none() {
                let Some(consumer) = lock(&state.consumer).clone() else {
                    return Err(Error::Closed);
                };
                let batch = consumer
                    .batch()
                    .max_messages(max)
                    .expires(PULL_EXPIRES)
                    .messages()
                    .await
                    .map_err(|e| {
                        NatsError::consume(format!("pulling from {}", self.where_()), e)
                    })?;
                puller.current = Some(batch);
            }
            let Some(batch) = puller.current.as_mut() else {
                continue;
            };
            let item = tokio::select! {
                _ = self.closed.wait_for(|c| *c) => return Err(Error::Closed),
                _ = &mut notified => continue,
                item = batch.next() => item,
            };
            let first = match item {
                None => {
                    puller.current = None;
                    continue;
                }
                Some(Err(e)) => {
                    tracing::warn!(at = %self.where_(), error = %e, "pull request failed; renewing it");
                    puller.current = None;
                    drop(puller);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Some(Ok(m)) => m,
            };
            let mut fetched = vec![first];
            while let Some(batch) = puller.current.as_mut() {
                match batch.next().now_or_never() {
                    Some(Some(Ok(m))) => fetched.push(m),
                    Some(None) => {
                        puller.current = None;
                        break;
                    }
                    _ => break,
                }
            }
            self.read_ledger(&fetched).await;
            let (special, records) = self.arrive(fetched);
            drop(puller);
            for (seq, u) in records {
                state.record(&self.inner, seq, u).await;
            }
            self.handle(special).await?;
            state.ready.notify_waiters();
        }
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
            .publish_all(
                &dlq_topic(&s.topic),
                vec![((*held.envelope).clone(), Some(msg_id), headers)],
            )
            .await?;
        held.message.ack_with(AckKind::Term).await.map_err(|e| {
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
        let Some(held) = lock(&s.order).begin_settle(seq, info.lease, until) else {
            return Err(s.stale(info));
        };
        let fail = |e: async_nats::Error| {
            NatsError::consume(format!("settling {}/{} {seq}", s.topic, s.group), e)
        };
        match how {
            Settle::Ack => {
                lock(&s.first_failure).remove(&seq);
                held.message.ack().await.map_err(fail)?;
                s.done(&self.inner, seq);
                Ok(())
            }
            Settle::Nack { reason, .. } => {
                let ts = Timestamp::now();
                let first = *lock(&s.first_failure).entry(seq).or_insert(ts);
                match nack_delay {
                    None => {
                        lock(&s.first_failure).remove(&seq);
                        self.dead_letter(seq, held, reason, info.attempt, first, ts)
                            .await?;
                        s.done(&self.inner, seq);
                        Ok(())
                    }
                    // Stays away, its subject blocked, until it comes back.
                    Some(delay) => held
                        .message
                        .ack_with(AckKind::Nak(Some(delay)))
                        .await
                        .map_err(fail),
                }
            }
            Settle::DeadLetter { reason } => {
                let ts = Timestamp::now();
                let first = lock(&s.first_failure).remove(&seq).unwrap_or(ts);
                self.dead_letter(seq, held, reason, info.attempt, first, ts)
                    .await?;
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
