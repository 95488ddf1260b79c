//! The transient channel on core NATS: subject `syt.<topic>`, a queue group per group.
//!
//! "No subscribers" comes from the server: each publish carries a reply subject, and
//! nats-server answers a message nobody is subscribed to with a 503 *no responders*
//! status before it answers the PING of the following flush. A publish therefore costs
//! one round trip. A member's queue is bounded ([`crate::NatsConfig::transient_queue`]);
//! a full member drops the message (logged). Unlike the in-process hub, a publisher in
//! another process cannot learn that every member was full, so `SubscribersFull` is never
//! returned here.

use std::sync::Arc;

use futures_util::{FutureExt, StreamExt};
use switchyard::{Envelope, Error, Result, TransientSubscription};
use tokio::sync::mpsc;

use crate::{Inner, NatsError};

pub(crate) async fn publish(inner: &Inner, topic: &str, envelope: Envelope) -> Result<()> {
    let (client, _) = inner.conn().await?;
    let fail =
        |e: async_nats::Error| NatsError::consume(format!("transient publish to `{topic}`"), e);
    let inbox = client.new_inbox();
    let mut replies = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| fail(e.into()))?;
    client
        .publish_with_reply(inner.names.transient(topic), inbox, envelope.to_bytes())
        .await
        .map_err(|e| fail(e.into()))?;
    client.flush().await.map_err(|e| fail(e.into()))?;
    if let Some(Some(m)) = replies.next().now_or_never()
        && m.status == Some(async_nats::StatusCode::NO_RESPONDERS)
    {
        return Err(Error::NoSubscribers {
            topic: topic.to_string(),
        });
    }
    Ok(())
}

pub(crate) async fn subscribe(
    inner: &Arc<Inner>,
    topic: &str,
    group: &str,
) -> Result<TransientSubscription> {
    let (client, _) = inner.conn().await?;
    let mut sub = client
        .queue_subscribe(inner.names.transient(topic), group.to_string())
        .await
        .map_err(|e| NatsError::consume(format!("transient subscribe to `{topic}`"), e))?;
    // The subscription is registered once the server has seen it.
    client
        .flush()
        .await
        .map_err(|e| NatsError::consume(format!("transient subscribe to `{topic}`"), e))?;
    let (tx, rx) = mpsc::channel(inner.config.transient_queue.max(1));
    let mut closed = inner.closed.subscribe();
    let topic_name = topic.to_string();
    let task = tokio::spawn(async move {
        loop {
            let m = tokio::select! {
                _ = closed.wait_for(|c| *c) => return,
                _ = tx.closed() => return,
                m = sub.next() => m,
            };
            let Some(m) = m else { return };
            match Envelope::from_bytes(&m.payload) {
                Ok(e) => {
                    if tx.try_send(Arc::new(e)).is_err() {
                        tracing::warn!(topic = %topic_name,
                            "transient message dropped: this member's queue is full (slow consumer)");
                    }
                }
                Err(e) => {
                    tracing::warn!(topic = %topic_name, error = %e, "undecodable transient message dropped")
                }
            }
        }
    });
    Ok(TransientSubscription::new(
        rx,
        Membership(task.abort_handle()),
    ))
}

/// Ends the forwarding task (and so the NATS subscription) when the member is dropped.
struct Membership(tokio::task::AbortHandle);

impl Drop for Membership {
    fn drop(&mut self) {
        self.0.abort();
    }
}
