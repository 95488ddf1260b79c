//! The calling side: one transient reply topic and one consumer per instance, waiters by
//! correlation id.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::wire::{
    ERROR_REPLY_TYPE, ErrorReply, FLOW_EXTENSION, IDEMPOTENCY_KEY_EXTENSION, REPLY_TOPIC_PREFIX,
    REQUESTER_GROUP,
};
use super::{RequestError, RequestOptions};
use crate::bus::{Bus, TransientSubscription};
use crate::codec::{self, Event};
use crate::envelope::{Envelope, MessageId, Timestamp};
use crate::error::{Error, ErrorKind, Result};

/// How long an ended exchange is remembered, so a reply arriving after it is counted as
/// late (or duplicate) rather than unknown.
const REMEMBER_ENDED: Duration = Duration::from_secs(600);
/// Most ended exchanges remembered (bounds memory under a flood of timeouts).
const MAX_ENDED: usize = 100_000;

/// Counters of a [`Requester`] (a snapshot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequesterStats {
    /// Requests published.
    pub requests: u64,
    /// Replies delivered to their waiter.
    pub replies: u64,
    /// Requests that ended in [`RequestError::Timeout`].
    pub timeouts: u64,
    /// Requests that ended in [`RequestError::NoResponders`] (nothing was sent).
    pub no_responders: u64,
    /// Replies that arrived after their request timed out (or its caller gave up): dropped.
    pub late_replies: u64,
    /// Further replies to a request that was already answered (a repeated request): dropped.
    pub duplicate_replies: u64,
    /// Replies whose correlation id this requester never issued (or forgot, after
    /// 10 minutes): dropped.
    pub unknown_replies: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    replies: AtomicU64,
    timeouts: AtomicU64,
    no_responders: AtomicU64,
    late: AtomicU64,
    duplicate: AtomicU64,
    unknown: AtomicU64,
}

#[derive(Clone, Copy)]
enum Ended {
    Answered,
    GaveUp,
}

#[derive(Default)]
struct Waiters {
    open: HashMap<String, oneshot::Sender<Arc<Envelope>>>,
    ended: HashMap<String, Ended>,
    ended_order: VecDeque<(Instant, String)>,
    closed: bool,
}

impl Waiters {
    fn end(&mut self, correlation: String, how: Ended) {
        let now = Instant::now();
        while let Some((at, _)) = self.ended_order.front() {
            if now.duration_since(*at) < REMEMBER_ENDED && self.ended_order.len() < MAX_ENDED {
                break;
            }
            if let Some((_, c)) = self.ended_order.pop_front() {
                self.ended.remove(&c);
            }
        }
        self.ended.insert(correlation.clone(), how);
        self.ended_order.push_back((now, correlation));
    }
}

struct Shared {
    bus: Arc<dyn Bus>,
    source: String,
    reply_topic: String,
    waiters: Mutex<Waiters>,
    counters: Counters,
}

impl Shared {
    fn waiters(&self) -> MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Removes a waiter that did not get its reply (timeout, publish error, caller dropped
/// the future), so a late reply finds no one to deliver to.
struct WaiterGuard<'a> {
    shared: &'a Shared,
    correlation: String,
    armed: bool,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut w = self.shared.waiters();
            if w.open.remove(&self.correlation).is_some() {
                w.end(self.correlation.clone(), Ended::GaveUp);
            }
        }
    }
}

/// Sends requests over the bus and waits for their replies. One per service instance:
/// see the [module docs](crate::reply).
///
/// Dropping it stops its reply consumer; requests still waiting then fail with
/// [`RequestError::Closed`].
pub struct Requester {
    shared: Arc<Shared>,
    consumer: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Requester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Requester")
            .field("reply_topic", &self.shared.reply_topic)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Drop for Requester {
    fn drop(&mut self) {
        self.consumer.abort();
    }
}

impl Requester {
    /// A requester for one instance of `service`: subscribes its transient reply topic
    /// `_reply.<service>.<instance-uuid>` (group `requester`) and starts consuming it.
    /// Fails if `service` makes an invalid topic name, or the bus is closed.
    pub async fn new(service: &str, bus: Arc<dyn Bus>) -> Result<Requester> {
        let reply_topic = format!("{REPLY_TOPIC_PREFIX}.{service}.{}", MessageId::new());
        // Subscribed before the first request goes out: a transient reply published
        // before the subscription exists would reach nobody.
        let sub = bus
            .subscribe_transient(&reply_topic, REQUESTER_GROUP)
            .await?;
        let shared = Arc::new(Shared {
            bus,
            source: format!("/{service}"),
            reply_topic,
            waiters: Mutex::new(Waiters::default()),
            counters: Counters::default(),
        });
        let consumer = tokio::spawn(consume(shared.clone(), sub));
        Ok(Requester { shared, consumer })
    }

    /// This instance's reply-to address (topic).
    pub fn reply_topic(&self) -> &str {
        &self.shared.reply_topic
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> RequesterStats {
        let c = &self.shared.counters;
        RequesterStats {
            requests: c.requests.load(Ordering::Relaxed),
            replies: c.replies.load(Ordering::Relaxed),
            timeouts: c.timeouts.load(Ordering::Relaxed),
            no_responders: c.no_responders.load(Ordering::Relaxed),
            late_replies: c.late.load(Ordering::Relaxed),
            duplicate_replies: c.duplicate.load(Ordering::Relaxed),
            unknown_replies: c.unknown.load(Ordering::Relaxed),
        }
    }

    /// Sends `req` to `topic` and waits up to `timeout` (publishing included) for the
    /// typed reply. A responder's error arrives as [`RequestError::Remote`].
    pub async fn request<Req: Event, Resp: Event>(
        &self,
        topic: &str,
        req: &Req,
        timeout: Duration,
    ) -> std::result::Result<Resp, RequestError> {
        self.request_with(topic, req, RequestOptions::new(timeout))
            .await
    }

    /// [`request`](Self::request) with a business flow id, an idempotency key or a
    /// subject (see [`RequestOptions`]).
    pub async fn request_with<Req: Event, Resp: Event>(
        &self,
        topic: &str,
        req: &Req,
        options: RequestOptions,
    ) -> std::result::Result<Resp, RequestError> {
        let mut env = codec::encode(req, &self.shared.source)
            .map_err(|e| RequestError::Encode(e.to_string()))?;
        env.correlationid = options.flow;
        if let Some(key) = options.idempotency_key {
            env.extensions
                .insert(IDEMPOTENCY_KEY_EXTENSION.to_string(), key);
        }
        if options.subject.is_some() {
            env.subject = options.subject;
        }
        let reply = self.request_envelope(topic, env, options.timeout).await?;
        decode_reply(&reply)
    }

    /// Sends a prepared request envelope and returns the reply envelope (an error reply
    /// as [`RequestError::Remote`]). The requester sets `replyto`, a fresh
    /// `correlationid` for the exchange (a correlation id already on `request` — the
    /// business flow — moves to the [`FLOW_EXTENSION`] extension) and `deadline` (now +
    /// `timeout`, or the request's own deadline if that is earlier). The request's `id`
    /// is kept: it is what the responder deduplicates on.
    pub async fn request_envelope(
        &self,
        topic: &str,
        mut request: Envelope,
        timeout: Duration,
    ) -> std::result::Result<Envelope, RequestError> {
        let shared = &*self.shared;
        let started = Instant::now();
        let correlation = MessageId::new().to_string();
        if let Some(flow) = request.correlationid.take()
            && !request.extensions.contains_key(FLOW_EXTENSION)
        {
            request.extensions.insert(FLOW_EXTENSION.to_string(), flow);
        }
        request.correlationid = Some(correlation.clone());
        request.replyto = Some(shared.reply_topic.clone());
        let deadline = Timestamp::now().saturating_add(timeout);
        request.deadline = Some(match request.deadline {
            Some(d) if d < deadline => d,
            _ => deadline,
        });
        let (tx, mut rx) = oneshot::channel();
        {
            let mut w = shared.waiters();
            if w.closed {
                return Err(RequestError::Closed);
            }
            w.open.insert(correlation.clone(), tx);
        }
        let mut guard = WaiterGuard {
            shared,
            correlation: correlation.clone(),
            armed: true,
        };
        let until = started + timeout;
        let published =
            tokio::time::timeout_at(until, shared.bus.publish_transient(topic, request)).await;
        match published {
            Ok(Ok(())) => {
                shared.counters.requests.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(Error::NoSubscribers { .. })) => {
                shared
                    .counters
                    .no_responders
                    .fetch_add(1, Ordering::Relaxed);
                return Err(RequestError::NoResponders {
                    topic: topic.to_string(),
                });
            }
            Ok(Err(e)) => return Err(RequestError::Bus(e)),
            Err(_) => {
                shared.counters.timeouts.fetch_add(1, Ordering::Relaxed);
                return Err(RequestError::Timeout {
                    topic: topic.to_string(),
                    timeout,
                });
            }
        }
        let reply = match tokio::time::timeout_at(until, &mut rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => return Err(RequestError::Closed),
            Err(_) => {
                // The consumer may have taken the waiter just now: then the reply is in
                // the channel, and it was in time.
                let taken = !shared.waiters().open.contains_key(&correlation);
                match rx.try_recv() {
                    Ok(reply) if taken => reply,
                    _ => {
                        shared.counters.timeouts.fetch_add(1, Ordering::Relaxed);
                        return Err(RequestError::Timeout {
                            topic: topic.to_string(),
                            timeout,
                        });
                    }
                }
            }
        };
        guard.armed = false;
        let reply = Arc::unwrap_or_clone(reply);
        if reply.event_type == ERROR_REPLY_TYPE {
            let body: ErrorReply = codec::decode_payload(&reply).map_err(RequestError::Decode)?;
            return Err(RequestError::Remote {
                kind: body.kind,
                reason: body.reason,
            });
        }
        Ok(reply)
    }
}

fn decode_reply<Resp: Event>(reply: &Envelope) -> std::result::Result<Resp, RequestError> {
    codec::decode(reply).map_err(RequestError::Decode)
}

/// The reply consumer: matches each reply to its waiter and counts the rest.
async fn consume(shared: Arc<Shared>, mut sub: TransientSubscription) {
    loop {
        let batch = match sub.next_batch(256).await {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::Closed => break,
            Err(e) => {
                tracing::warn!(topic = %shared.reply_topic, error = %e, "receiving replies failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        for reply in batch {
            deliver(&shared, reply);
        }
    }
    // Nobody will answer the waiters any more: fail them now rather than at their timeout.
    let mut w = shared.waiters();
    w.closed = true;
    w.open.clear();
}

fn deliver(shared: &Shared, env: Arc<Envelope>) {
    let Some(correlation) = env.correlationid.clone() else {
        shared.counters.unknown.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(topic = %shared.reply_topic, id = %env.id, "reply without a correlation id dropped");
        return;
    };
    let mut w = shared.waiters();
    if let Some(tx) = w.open.remove(&correlation) {
        // Sent under the lock: a waiter that timed out and finds itself gone from `open`
        // finds the reply in its channel.
        // Counted before the send, so a caller that reads the stats after its reply
        // sees it counted.
        shared.counters.replies.fetch_add(1, Ordering::Relaxed);
        if tx.send(env).is_ok() {
            w.end(correlation, Ended::Answered);
        } else {
            // The caller went away (its future was dropped) before its guard ran.
            shared.counters.replies.fetch_sub(1, Ordering::Relaxed);
            w.end(correlation, Ended::GaveUp);
            shared.counters.late.fetch_add(1, Ordering::Relaxed);
        }
        return;
    }
    let counter = match w.ended.get(&correlation) {
        Some(Ended::GaveUp) => &shared.counters.late,
        Some(Ended::Answered) => &shared.counters.duplicate,
        None => &shared.counters.unknown,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(topic = %shared.reply_topic, %correlation, id = %env.id, "reply without a waiter dropped");
}
