//! The responder path of the router: requests from a transient subscription; per
//! request the deadline check, the stored-reply lookup, the handler with in-place
//! retries, one commit of effects + inbox mark + stored reply when there are effects,
//! then the reply on the transient channel. See [`crate::reply`] for the decisions.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{
    CONFLICT_RETRIES, CommitObserver, Context, Handler, HandlerError, RouterStats, run_handler,
};
use crate::bus::{Bus, RedeliveryPolicy, TransientSubscription};
use crate::envelope::{Envelope, Timestamp};
use crate::error::{Error, ErrorKind, Result};
use crate::reply::{REPLIES, REPLIES_BY_TIME, RemoteErrorKind, StoredReply, reply_key, time_key};
use crate::store::{Store, Txn};

/// Stored replies removed per commit while expiring.
const EXPIRE_BATCH: usize = 512;

/// The responders of one (topic, group), over one transient subscription.
pub(super) struct RespondWorker {
    /// `topic/group`: the inbox consumer name and the prefix of reply keys.
    pub(super) consumer: Arc<str>,
    pub(super) handlers: Arc<HashMap<&'static str, Handler>>,
    pub(super) store: Arc<dyn Store>,
    pub(super) bus: Arc<dyn Bus>,
    pub(super) service: Arc<str>,
    pub(super) stats: Arc<RouterStats>,
    pub(super) concurrency: usize,
    pub(super) observer: Option<CommitObserver>,
    /// In-place retries of retryable failures (bounded by each request's deadline).
    pub(super) policy: RedeliveryPolicy,
    /// The router's gate (see [`Router::gate`](super::Router::gate)).
    pub(super) gate: Option<super::Gate>,
}

/// How a reply came about.
#[derive(Clone, Copy)]
enum Sent {
    /// Produced now (by the handler, or an error reply).
    First,
    /// Read from the store: the request was answered before.
    Again,
}

/// The outcome of one attempt at a request.
enum Step {
    /// Send this reply.
    Reply(StoredReply, Sent),
    /// A commit conflicted: run the attempt again.
    Conflict,
    /// A retryable failure (handler, store): retry after a backoff, or give up.
    Failed(String),
    /// Already processed and its reply is no longer stored: nothing to send.
    Forgotten,
}

impl RespondWorker {
    /// Takes requests until `stop` changes or the bus closes; then waits for the requests
    /// in flight (their replies still go out).
    pub(super) async fn run(
        self,
        mut sub: TransientSubscription,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<()> {
        let limit = Arc::new(Semaphore::new(self.concurrency));
        let me = Arc::new(self);
        let mut inflight = JoinSet::new();
        loop {
            let permit = tokio::select! {
                p = limit.clone().acquire_owned() => p,
                _ = stop.changed() => break,
            };
            let Ok(first_permit) = permit else { break };
            let available = limit.available_permits() + 1;
            let batch = tokio::select! {
                b = sub.next_batch(available) => b,
                _ = stop.changed() => break,
            };
            let batch = match batch {
                Ok(b) => b,
                Err(e) if e.kind() == ErrorKind::Closed => break,
                Err(e) => {
                    tracing::warn!(consumer = %me.consumer, error = %e, "receiving requests failed; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let mut first_permit = Some(first_permit);
            for request in batch {
                let permit = match first_permit.take() {
                    Some(p) => p,
                    None => match limit.clone().acquire_owned().await {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                };
                let me = me.clone();
                inflight.spawn(async move {
                    me.handle(request).await;
                    drop(permit);
                });
            }
            while inflight.try_join_next().is_some() {}
        }
        // Leave the group first, so new requests go to another member (or fail fast).
        drop(sub);
        while inflight.join_next().await.is_some() {}
        Ok(())
    }

    /// Answers one request.
    async fn handle(&self, env: Arc<Envelope>) {
        if let Some(gate) = &self.gate {
            match gate(&env).await {
                super::GateDecision::Pass => {}
                // A paused responder does not answer (the requester times out, as with
                // a stopped process); a failed attempt is answered as a retryable error.
                super::GateDecision::Defer { reason, .. } => {
                    tracing::debug!(consumer = %self.consumer, id = %env.id, %reason, "request not answered: the gate deferred it");
                    return;
                }
                super::GateDecision::Fail(e) => {
                    if let Some(replyto) = env.replyto.clone() {
                        let (kind, reason) = match e {
                            HandlerError::Retryable(r) => (RemoteErrorKind::Retryable, r),
                            HandlerError::Terminal(r) => (RemoteErrorKind::Terminal, r),
                        };
                        let reply = StoredReply::error(kind, &reason, env.id);
                        self.send(&env, &replyto, &reply, Sent::First).await;
                    }
                    return;
                }
            }
        }
        let Some(replyto) = env.replyto.clone() else {
            self.stats
                .requests_without_replyto
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(consumer = %self.consumer, id = %env.id, r#type = %env.event_type,
                "request without `replyto` dropped: there is nowhere to send the reply (send requests with a Requester)");
            return;
        };
        let Some(handler) = self.handlers.get(env.event_type.as_str()).cloned() else {
            let mut known: Vec<_> = self.handlers.keys().copied().collect();
            known.sort();
            let reason = format!(
                "unknown request type `{}` for {} (answers {})",
                env.event_type,
                self.consumer,
                known.join(", ")
            );
            let reply = StoredReply::error(RemoteErrorKind::Terminal, &reason, env.id);
            self.send(&env, &replyto, &reply, Sent::First).await;
            return;
        };
        if expired(&env, std::time::Duration::ZERO) {
            self.stats.expired.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(consumer = %self.consumer, id = %env.id, deadline = ?env.deadline, "request expired before processing; dropped");
            return;
        }
        let key = reply_key(&self.consumer, &env);
        let mut attempt = 1;
        let mut conflicts = 0;
        loop {
            match self.attempt(&handler, &env, &key, attempt).await {
                Step::Reply(reply, how) => {
                    self.send(&env, &replyto, &reply, how).await;
                    return;
                }
                Step::Conflict if conflicts < CONFLICT_RETRIES => conflicts += 1,
                Step::Conflict => {
                    // Counts as a failed attempt: back off, then run it again.
                    conflicts = 0;
                    if !self
                        .retry_or_give_up(&env, &replyto, attempt, "the commit kept conflicting")
                        .await
                    {
                        return;
                    }
                    attempt += 1;
                }
                Step::Failed(reason) => {
                    if !self
                        .retry_or_give_up(&env, &replyto, attempt, &reason)
                        .await
                    {
                        return;
                    }
                    attempt += 1;
                }
                Step::Forgotten => {
                    self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(consumer = %self.consumer, id = %env.id, "request already processed and its reply expired; not answered");
                    return;
                }
            }
        }
    }

    /// After failed attempt `attempt`: waits the policy's backoff and returns true (try
    /// again), or — attempts exhausted, or the backoff would pass the request's deadline
    /// — replies a retryable error and returns false.
    async fn retry_or_give_up(
        &self,
        env: &Envelope,
        replyto: &str,
        attempt: u32,
        reason: &str,
    ) -> bool {
        let delay = self.policy.backoff(attempt);
        if self.policy.exhausted(attempt) || expired(env, delay) {
            // Not stored: a later request may succeed.
            let reply = StoredReply::error(RemoteErrorKind::Retryable, reason, env.id);
            self.send(env, replyto, &reply, Sent::First).await;
            return false;
        }
        self.stats.retried.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(consumer = %self.consumer, id = %env.id, attempt, %reason, ?delay, "responder failed; retrying in place");
        tokio::time::sleep(delay).await;
        true
    }

    /// One attempt: the stored reply if there is one, else the handler and, when it made
    /// effects (or refused), the commit.
    async fn attempt(
        &self,
        handler: &Handler,
        env: &Arc<Envelope>,
        key: &str,
        attempt: u32,
    ) -> Step {
        let txn = Txn::new(self.store.clone());
        // Read in the transaction: a concurrent duplicate (same key) that stores its reply
        // first makes this commit conflict, and the next attempt finds that reply.
        match txn.get(&REPLIES, key).await {
            Ok(Some(stored)) => return Step::Reply(stored, Sent::Again),
            Ok(None) => {}
            Err(e) => return Step::Failed(format!("reading stored replies failed: {e}")),
        }
        // Dropped when this attempt returns: after the commit.
        let held = super::Held::default();
        let ctx = Context {
            txn: txn.clone(),
            envelope: env.clone(),
            attempt,
            service: self.service.clone(),
            held: held.clone(),
        };
        let (txn, reply) = match run_handler(handler, ctx, env.clone()).await {
            Ok(Some(body)) => {
                let reply = StoredReply::new(body.event_type, body.data, env.id);
                if !txn.has_effects() {
                    // Nothing to make exactly-once: a repeat just computes it again.
                    self.stats.processed.fetch_add(1, Ordering::Relaxed);
                    return Step::Reply(reply, Sent::First);
                }
                (txn, reply)
            }
            Ok(None) => (
                txn,
                StoredReply::error(
                    RemoteErrorKind::Terminal,
                    "the responder produced no reply",
                    env.id,
                ),
            ),
            Err(HandlerError::Terminal(reason)) => {
                // The caller gets the refusal, stored so a retry gets it again; the
                // handler's effects are discarded.
                let fresh = Txn::new(self.store.clone());
                if let Err(e) = fresh.get(&REPLIES, key).await {
                    return Step::Failed(format!("reading stored replies failed: {e}"));
                }
                (
                    fresh,
                    StoredReply::error(RemoteErrorKind::Terminal, &reason, env.id),
                )
            }
            Err(HandlerError::Retryable(reason)) => return Step::Failed(reason),
        };
        if let Err(e) = stage_reply(&txn, key, &reply) {
            return Step::Failed(format!("storing the reply failed: {e}"));
        }
        txn.mark_processed(&self.consumer, env.id);
        match txn.commit().await {
            Ok(()) => {
                self.stats.processed.fetch_add(1, Ordering::Relaxed);
                if let Some(observe) = &self.observer {
                    observe(&self.consumer, env);
                }
                Step::Reply(reply, Sent::First)
            }
            Err(Error::Conflict { .. }) => Step::Conflict,
            Err(Error::AlreadyProcessed { .. }) => {
                // A duplicate of this request id committed first: answer with its reply.
                match Txn::new(self.store.clone()).get(&REPLIES, key).await {
                    Ok(Some(stored)) => Step::Reply(stored, Sent::Again),
                    Ok(None) => Step::Forgotten,
                    Err(e) => Step::Failed(format!("reading stored replies failed: {e}")),
                }
            }
            Err(e) => Step::Failed(format!("commit failed: {e}")),
        }
    }

    /// Sends `reply`, addressed to `request`, on the transient channel.
    async fn send(&self, request: &Envelope, replyto: &str, reply: &StoredReply, how: Sent) {
        match how {
            Sent::First => self.stats.replies.fetch_add(1, Ordering::Relaxed),
            Sent::Again => {
                tracing::debug!(consumer = %self.consumer, id = %request.id, "repeated request answered with its stored reply");
                self.stats.replies_resent.fetch_add(1, Ordering::Relaxed)
            }
        };
        let env = reply.envelope(request, &format!("/{}", self.service));
        match self.bus.publish_transient(replyto, env).await {
            Ok(()) => {}
            Err(e) => {
                self.stats
                    .replies_undeliverable
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(consumer = %self.consumer, id = %request.id, %replyto, error = %e,
                    "reply not delivered (the requester stopped?); a retry with the same key gets the stored reply if there is one");
            }
        }
    }
}

/// True when `env` has a deadline that passes within `margin` from now.
fn expired(env: &Envelope, margin: std::time::Duration) -> bool {
    env.deadline
        .is_some_and(|d| d <= Timestamp::now().saturating_add(margin))
}

/// Adds the stored reply and its time index to `txn`.
fn stage_reply(txn: &Txn, key: &str, stored: &StoredReply) -> Result<()> {
    txn.put(&REPLIES, key, stored)?;
    txn.put(
        &REPLIES_BY_TIME,
        &time_key(stored.at, key),
        &key.to_string(),
    )?;
    Ok(())
}

/// Forgets replies stored before `before` (with their index rows); returns how many.
pub(super) async fn expire_replies(store: &Arc<dyn Store>, before: Timestamp) -> Result<u64> {
    let mut total = 0;
    loop {
        let rows = store
            .scan_raw(REPLIES_BY_TIME.name(), "", EXPIRE_BATCH)
            .await?;
        let full = rows.len() == EXPIRE_BATCH;
        let txn = Txn::new(store.clone());
        let mut n = 0;
        for row in rows {
            let at = row
                .key
                .split('|')
                .next()
                .and_then(|m| m.parse::<u64>().ok());
            match at {
                Some(at) if at >= before.unix_micros() => break,
                _ => {}
            }
            let key: String = serde_json::from_slice(&row.value).map_err(|e| {
                Error::storage(format!("decoding stored-reply index {}", row.key), e)
            })?;
            txn.delete(&REPLIES, &key);
            txn.delete(&REPLIES_BY_TIME, &row.key);
            n += 1;
        }
        if n == 0 {
            return Ok(total);
        }
        txn.commit().await?;
        total += n;
        if !full || n < EXPIRE_BATCH as u64 {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::MessageId;
    use crate::store::MemoryStore;

    #[tokio::test]
    async fn expiring_forgets_only_replies_stored_before_the_cutoff() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let txn = Txn::new(store.clone());
        for (key, micros) in [("old", 1_000), ("new", 5_000)] {
            let mut stored = StoredReply::new("t.v1", "{}".into(), MessageId::new());
            stored.at = Timestamp::from_unix_micros(micros);
            txn.put(&REPLIES, key, &stored).unwrap();
            txn.put(
                &REPLIES_BY_TIME,
                &time_key(stored.at, key),
                &key.to_string(),
            )
            .unwrap();
        }
        txn.commit().await.unwrap();
        let n = expire_replies(&store, Timestamp::from_unix_micros(3_000))
            .await
            .unwrap();
        assert_eq!(n, 1);
        let check = Txn::new(store.clone());
        assert!(check.get(&REPLIES, "old").await.unwrap().is_none());
        assert!(check.get(&REPLIES, "new").await.unwrap().is_some());
        assert_eq!(
            check.scan(&REPLIES_BY_TIME, "", 10).await.unwrap().len(),
            1,
            "the index row went with it"
        );
    }
}
