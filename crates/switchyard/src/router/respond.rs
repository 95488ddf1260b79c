//! The responder path of the router: deadline check, stored-reply lookup, the handler,
//! and one commit of effects + inbox mark + stored reply + the reply in the outbox.
//! See [`crate::reply`] for the decisions.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{CONFLICT_RETRIES, Context, Handler, HandlerError, RouteWorker, run_handler};
use crate::bus::Delivery;
use crate::envelope::{Envelope, Timestamp};
use crate::error::{Error, Result};
use crate::reply::{REPLIES, REPLIES_BY_TIME, RemoteErrorKind, StoredReply, reply_key, time_key};
use crate::store::{Store, Txn};

/// Stored replies removed per commit while expiring.
const EXPIRE_BATCH: usize = 512;

impl RouteWorker {
    /// Handles one request for a responder handler.
    pub(super) async fn respond(&self, delivery: Delivery, handler: Handler) {
        let env = delivery.envelope_arc();
        if let Some(deadline) = env.deadline
            && deadline <= Timestamp::now()
        {
            self.stats.expired.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(consumer = %self.consumer, id = %env.id, %deadline, "request expired before processing; dropped");
            self.settle(delivery.ack().await);
            return;
        }
        let Some(replyto) = env.replyto.clone() else {
            let reason = format!(
                "request `{}` on {} has no `replyto`: there is nowhere to send the reply (send requests with a Requester)",
                env.event_type, self.consumer
            );
            self.dead_letter(delivery, reason).await;
            return;
        };
        let key = reply_key(&self.consumer, &env);
        let mut conflicts = 0;
        let mut rechecked = false;
        loop {
            let txn = Txn::new(self.store.clone());
            // Read in the transaction: a concurrent duplicate that stores its reply first
            // makes this commit conflict, and the next round finds that reply.
            match txn.get(&REPLIES, &key) {
                Ok(Some(stored)) => {
                    self.resend(delivery, &env, &stored, &replyto).await;
                    return;
                }
                Ok(None) => {}
                Err(e) => {
                    self.retry(delivery, format!("reading stored replies failed: {e}"))
                        .await;
                    return;
                }
            }
            match self.store.inbox_contains(&self.consumer, env.id) {
                Ok(true) if !rechecked => {
                    // A concurrent duplicate may have committed between the read of the
                    // stored reply above and this check: look for its reply once more.
                    rechecked = true;
                    continue;
                }
                Ok(true) => {
                    // Processed, but its reply is no longer stored (expired): nothing to
                    // repeat.
                    self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    self.settle(delivery.ack().await);
                    return;
                }
                Ok(false) => {}
                Err(e) => {
                    self.retry(delivery, format!("inbox check failed: {e}"))
                        .await;
                    return;
                }
            }
            let ctx = Context {
                txn: txn.clone(),
                envelope: env.clone(),
                attempt: delivery.attempt(),
                service: self.service.clone(),
            };
            let (txn, stored) = match run_handler(&handler, ctx, env.clone()).await {
                Ok(Some(body)) => (txn, StoredReply::new(body.event_type, body.data, env.id)),
                Ok(None) => (
                    txn,
                    StoredReply::error(
                        RemoteErrorKind::Terminal,
                        "the responder produced no reply",
                        env.id,
                    ),
                ),
                Err(HandlerError::Terminal(reason)) => {
                    // The caller gets the refusal; the handler's effects are discarded.
                    let fresh = Txn::new(self.store.clone());
                    if let Err(e) = fresh.get(&REPLIES, &key) {
                        self.retry(delivery, format!("reading stored replies failed: {e}"))
                            .await;
                        return;
                    }
                    (
                        fresh,
                        StoredReply::error(RemoteErrorKind::Terminal, &reason, env.id),
                    )
                }
                Err(HandlerError::Retryable(reason)) => {
                    if delivery.attempt() >= self.max_attempts {
                        self.reply_last_failure(&env, &replyto, &reason).await;
                    }
                    self.retry(delivery, reason).await;
                    return;
                }
            };
            if let Err(e) = stage_reply(&txn, &key, &stored, &env, &replyto, &self.service) {
                self.retry(delivery, format!("storing the reply failed: {e}"))
                    .await;
                return;
            }
            txn.mark_processed(&self.consumer, env.id);
            match txn.commit().await {
                Ok(()) => {
                    self.stats.processed.fetch_add(1, Ordering::Relaxed);
                    self.stats.replies.fetch_add(1, Ordering::Relaxed);
                    if let Some(observe) = &self.observer {
                        observe(&self.consumer, &env);
                    }
                    self.settle(delivery.ack().await);
                }
                Err(Error::Conflict { .. }) if conflicts < CONFLICT_RETRIES => {
                    conflicts += 1;
                    continue;
                }
                Err(Error::AlreadyProcessed { .. }) => {
                    // A duplicate committed first; the next round sends its stored reply.
                    if conflicts < CONFLICT_RETRIES {
                        conflicts += 1;
                        continue;
                    }
                    self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    self.settle(delivery.ack().await);
                }
                Err(e) => self.retry(delivery, format!("commit failed: {e}")).await,
            }
            return;
        }
    }

    /// Sends a stored reply again, addressed to this request.
    async fn resend(
        &self,
        delivery: Delivery,
        request: &Envelope,
        stored: &StoredReply,
        replyto: &str,
    ) {
        let txn = Txn::new(self.store.clone());
        txn.publish_envelope(replyto, stored.envelope(request, &self.source()));
        match txn.commit().await {
            Ok(()) => {
                self.stats.replies_resent.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(consumer = %self.consumer, id = %request.id, "repeated request answered with its stored reply");
                self.settle(delivery.ack().await);
            }
            Err(e) => {
                self.retry(delivery, format!("re-sending the stored reply failed: {e}"))
                    .await
            }
        }
    }

    /// Tells the caller that the last attempt failed (not stored: a later request may
    /// succeed). The request itself goes on to the DLQ.
    async fn reply_last_failure(&self, request: &Envelope, replyto: &str, reason: &str) {
        let stored = StoredReply::error(RemoteErrorKind::Retryable, reason, request.id);
        let txn = Txn::new(self.store.clone());
        txn.publish_envelope(replyto, stored.envelope(request, &self.source()));
        match txn.commit().await {
            Ok(()) => {
                self.stats.replies.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(consumer = %self.consumer, id = %request.id, error = %e, "replying the last failure failed; the caller will time out")
            }
        }
    }

    fn source(&self) -> String {
        format!("/{}", self.service)
    }
}

/// Adds the stored reply, its time index and the reply envelope to `txn`.
fn stage_reply(
    txn: &Txn,
    key: &str,
    stored: &StoredReply,
    request: &Envelope,
    replyto: &str,
    service: &str,
) -> Result<()> {
    txn.put(&REPLIES, key, stored)?;
    txn.put(
        &REPLIES_BY_TIME,
        &time_key(stored.at, key),
        &key.to_string(),
    )?;
    txn.publish_envelope(replyto, stored.envelope(request, &format!("/{service}")));
    Ok(())
}

/// Forgets replies stored before `before` (with their index rows); returns how many.
pub(super) async fn expire_replies(store: &Arc<dyn Store>, before: Timestamp) -> Result<u64> {
    let mut total = 0;
    loop {
        let rows = store.scan_raw(REPLIES_BY_TIME.name(), "", EXPIRE_BATCH)?;
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
        assert!(check.get(&REPLIES, "old").unwrap().is_none());
        assert!(check.get(&REPLIES, "new").unwrap().is_some());
        assert_eq!(
            check.scan(&REPLIES_BY_TIME, "", 10).unwrap().len(),
            1,
            "the index row went with it"
        );
    }
}
