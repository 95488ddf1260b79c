//! A group's delivery source (pull requests on its durable consumer) and settler (acks,
//! naks, dead letters), plus reading the dead-letter stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::AckKind;
use async_trait::async_trait;
use futures_util::{FutureExt, StreamExt};
use switchyard::bus::{
    DeliveryInfo, DeliverySource, REPLAY_GROUP_EXTENSION, Settle, Settler, dlq_topic,
};
use switchyard::{DeadLetter, Delivery, Envelope, Error, RedeliveryPolicy, Result, Timestamp};
use tokio::sync::watch;

use crate::{Inner, NatsError, lock};

/// How long one pull request waits on the server before it is renewed.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

const H_TOPIC: &str = "Sy-Topic";
const H_GROUP: &str = "Sy-Group";
const H_REASON: &str = "Sy-Reason";
const H_ATTEMPTS: &str = "Sy-Attempts";
const H_FIRST: &str = "Sy-First-Failure";
const H_LAST: &str = "Sy-Last-Failure";

/// One delivery handed out and not settled yet.
struct InFlight {
    lease: u64,
    message: jetstream::Message,
    envelope: Arc<Envelope>,
}

/// What this bus knows about a group: its policy and its in-flight deliveries (the
/// leases that make a settle of a redelivered message fail as stale).
pub(crate) struct GroupState {
    topic: Arc<str>,
    group: Arc<str>,
    policy: Mutex<RedeliveryPolicy>,
    inflight: Mutex<HashMap<u64, InFlight>>,
    first_failure: Mutex<HashMap<u64, Timestamp>>,
}

impl GroupState {
    pub(crate) fn new(topic: &str, group: &str) -> Self {
        GroupState {
            topic: topic.into(),
            group: group.into(),
            policy: Mutex::new(RedeliveryPolicy::default()),
            inflight: Default::default(),
            first_failure: Default::default(),
        }
    }

    /// The latest subscriber sets the policy of the group.
    pub(crate) fn set_policy(&self, policy: RedeliveryPolicy) {
        *lock(&self.policy) = policy;
    }

    /// Hands every unsettled delivery back to the group at once (a `-NAK` without delay:
    /// it counts as an attempt); later settles of them fail as stale.
    pub(crate) async fn release_all(&self) {
        let entries: Vec<_> = lock(&self.inflight).drain().collect();
        for (seq, f) in entries {
            if let Err(e) = f.message.ack_with(AckKind::Nak(None)).await {
                tracing::warn!(topic = %self.topic, group = %self.group, seq, error = %e,
                    "releasing an unsettled delivery on close failed; it returns after ack_wait");
            }
        }
    }

    fn policy(&self) -> RedeliveryPolicy {
        lock(&self.policy).clone()
    }

    fn stale(&self, info: &DeliveryInfo) -> Error {
        Error::StaleDelivery {
            topic: self.topic.to_string(),
            group: self.group.to_string(),
            offset: info.offset,
        }
    }
}

/// The [`DeliverySource`] of one subscriber: one pull request at a time, made only while
/// the subscriber asks for messages, so an idle member does not hoard redeliveries.
pub(crate) struct Source {
    inner: Arc<Inner>,
    consumer: jetstream::consumer::Consumer<jetstream::consumer::pull::Config>,
    settler: Arc<GroupSettler>,
    /// The open pull request, kept across cancelled calls so nothing it brought is lost.
    current: Option<jetstream::consumer::pull::Batch>,
    closed: watch::Receiver<bool>,
}

impl Source {
    pub(crate) fn new(
        inner: Arc<Inner>,
        consumer: jetstream::consumer::Consumer<jetstream::consumer::pull::Config>,
        state: Arc<GroupState>,
    ) -> Self {
        let closed = inner.closed.subscribe();
        Source {
            settler: Arc::new(GroupSettler {
                inner: inner.clone(),
                state,
            }),
            inner,
            consumer,
            current: None,
            closed,
        }
    }

    /// Turns a fetched message into a delivery, or handles it here (`None`): a replay
    /// meant for another group, an extra delivery after the last attempt, a stale copy.
    async fn accept(&self, message: jetstream::Message) -> Result<Option<Delivery>> {
        let state = &self.settler.state;
        let (seq, delivered) = match message.info() {
            Ok(i) => (
                i.stream_sequence,
                u32::try_from(i.delivered).unwrap_or(u32::MAX),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "message without JetStream metadata skipped");
                return Ok(None);
            }
        };
        let envelope = match Envelope::from_bytes(&message.payload) {
            Ok(e) => Arc::new(e),
            Err(e) => {
                tracing::error!(topic = %state.topic, seq, error = %e,
                    "undecodable record terminated (not an envelope written by switchyard)");
                let _ = message.ack_with(AckKind::Term).await;
                return Ok(None);
            }
        };
        if let Some(target) = envelope.extension(REPLAY_GROUP_EXTENSION)
            && target != &*state.group
        {
            let _ = message.ack().await;
            return Ok(None);
        }
        let policy = state.policy();
        if delivered > policy.max_attempts.max(1) {
            let now = Timestamp::now();
            let first = lock(&state.first_failure).remove(&seq).unwrap_or(now);
            let entry = InFlight {
                lease: u64::from(delivered),
                message,
                envelope,
            };
            let reason = "not settled within ack_wait on the last attempt".to_string();
            self.settler
                .dead_letter(seq, entry, reason, delivered - 1, first, now)
                .await?;
            return Ok(None);
        }
        {
            let mut inflight = lock(&state.inflight);
            if inflight
                .get(&seq)
                .is_some_and(|f| f.lease > u64::from(delivered))
            {
                // A newer delivery of this message is out already.
                return Ok(None);
            }
            inflight.insert(
                seq,
                InFlight {
                    lease: u64::from(delivered),
                    message,
                    envelope: envelope.clone(),
                },
            );
        }
        let info = DeliveryInfo {
            topic: state.topic.clone(),
            group: state.group.clone(),
            offset: seq,
            attempt: delivered,
            lease: u64::from(delivered),
        };
        Ok(Some(Delivery::new(envelope, info, self.settler.clone())))
    }

    async fn pull(&mut self, max: usize) -> Result<jetstream::consumer::pull::Batch> {
        self.consumer
            .batch()
            .max_messages(max)
            .expires(PULL_EXPIRES)
            .messages()
            .await
            .map_err(|e| NatsError::consume(format!("pulling from {}", self.where_()), e))
    }

    fn where_(&self) -> String {
        format!("{}/{}", self.settler.state.topic, self.settler.state.group)
    }
}

#[async_trait]
impl DeliverySource for Source {
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>> {
        let max = max.max(1);
        loop {
            self.inner.check_open()?;
            if self.current.is_none() {
                self.current = Some(self.pull(max).await?);
            }
            let Some(batch) = self.current.as_mut() else {
                continue;
            };
            let item = tokio::select! {
                _ = self.closed.wait_for(|c| *c) => return Err(Error::Closed),
                item = batch.next() => item,
            };
            let first = match item {
                None => {
                    self.current = None;
                    continue;
                }
                Some(Err(e)) => {
                    tracing::warn!(at = %self.where_(), error = %e, "pull request failed; renewing it");
                    self.current = None;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Some(Ok(m)) => m,
            };
            let mut ready = vec![first];
            while ready.len() < max {
                let Some(batch) = self.current.as_mut() else {
                    break;
                };
                match batch.next().now_or_never() {
                    Some(Some(Ok(m))) => ready.push(m),
                    Some(None) => {
                        self.current = None;
                        break;
                    }
                    _ => break,
                }
            }
            let mut out = Vec::with_capacity(ready.len());
            for m in ready {
                if let Some(d) = self.accept(m).await? {
                    out.push(d);
                }
            }
            if !out.is_empty() {
                return Ok(out);
            }
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
        entry: InFlight,
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
                vec![((*entry.envelope).clone(), Some(msg_id), headers)],
            )
            .await?;
        entry.message.ack_with(AckKind::Term).await.map_err(|e| {
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
        let entry = {
            let mut inflight = lock(&s.inflight);
            match inflight.get(&info.offset) {
                Some(f) if f.lease == info.lease => inflight.remove(&info.offset),
                _ => None,
            }
        };
        let Some(entry) = entry else {
            return Err(s.stale(info));
        };
        let seq = info.offset;
        let fail = |e: async_nats::Error| {
            NatsError::consume(format!("settling {}/{} {seq}", s.topic, s.group), e)
        };
        match how {
            Settle::Ack => {
                lock(&s.first_failure).remove(&seq);
                entry.message.ack().await.map_err(fail)
            }
            Settle::Nack { delay, reason } => {
                let now = Timestamp::now();
                let first = *lock(&s.first_failure).entry(seq).or_insert(now);
                let policy = s.policy();
                if policy.exhausted(info.attempt) {
                    lock(&s.first_failure).remove(&seq);
                    self.dead_letter(seq, entry, reason, info.attempt, first, now)
                        .await
                } else {
                    let delay = delay.unwrap_or_else(|| policy.backoff(info.attempt));
                    entry
                        .message
                        .ack_with(AckKind::Nak(Some(delay)))
                        .await
                        .map_err(fail)
                }
            }
            Settle::DeadLetter { reason } => {
                let now = Timestamp::now();
                let first = lock(&s.first_failure).remove(&seq).unwrap_or(now);
                self.dead_letter(seq, entry, reason, info.attempt, first, now)
                    .await
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
