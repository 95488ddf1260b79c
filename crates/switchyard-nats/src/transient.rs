//! The transient channel on core NATS: subject `syt.<topic>`, a queue group per group.
//!
//! "No subscribers" comes from the server: a publish carries a reply subject, and
//! nats-server answers a message nobody is subscribed to with a 503 *no responders*
//! status. A probe to a subject nobody listens on follows it; the server answers both in
//! order, so once the probe's 503 is back the publish's answer (or its absence) is known.
//! A publish therefore costs one round trip.
//!
//! A member's queue is bounded ([`crate::NatsConfig::transient_queue`]); a full member
//! drops the message (logged). Unlike the in-process hub, a publisher cannot learn that
//! every member of another process was full, so `SubscribersFull` is never returned here.
//!
//! Leaving is ordered before later publishes of the same bus: dropping a member
//! registers its unsubscribe, and a publish first waits until every pending unsubscribe
//! has been handed to the connection (which sends commands in order).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use switchyard::{Envelope, Error, Result, TransientSubscription};
use tokio::sync::{mpsc, oneshot, watch};

use crate::{Inner, NatsError};

/// How long a publish waits for the server's answers before it gives up.
const ROUND_TRIP: Duration = Duration::from_secs(5);

fn fail(topic: &str, e: impl Into<async_nats::Error>) -> Error {
    NatsError::consume(format!("transient publish to `{topic}`"), e.into())
}

pub(crate) async fn publish(inner: &Inner, topic: &str, envelope: Envelope) -> Result<()> {
    let mut leaving = inner.leaving.subscribe();
    // Bounded: a member whose task died without unsubscribing must not stall publishes.
    let _ = tokio::time::timeout(ROUND_TRIP, leaving.wait_for(|n| *n == 0)).await;
    let (client, _) = inner.conn().await?;
    let nobody = round_trip(client, Some((inner.names.transient(topic), envelope)))
        .await
        .map_err(|e| fail(topic, e))?;
    if nobody {
        return Err(Error::NoSubscribers {
            topic: topic.to_string(),
        });
    }
    Ok(())
}

/// Publishes `message` (if any) with a reply subject, then a probe nobody receives, and
/// waits for the probe's 503. Returns whether `message` got a 503 (nobody subscribed).
/// Also a barrier: everything this client sent before is processed by the server.
pub(crate) async fn round_trip(
    client: &async_nats::Client,
    message: Option<(String, Envelope)>,
) -> std::result::Result<bool, async_nats::Error> {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(format!("{inbox}.*")).await?;
    let real_reply = format!("{inbox}.m");
    let probe_reply = format!("{inbox}.p");
    if let Some((subject, envelope)) = message {
        client
            .publish_with_reply(subject, real_reply.clone(), envelope.to_bytes())
            .await?;
    }
    client
        .publish_with_reply(format!("{inbox}_probe"), probe_reply.clone(), "".into())
        .await?;
    let mut nobody = false;
    let deadline = tokio::time::Instant::now() + ROUND_TRIP;
    loop {
        let m = tokio::time::timeout_at(deadline, replies.next())
            .await
            .map_err(|_| "nats-server did not answer within 5 s")?
            .ok_or("the connection closed")?;
        if m.subject.as_str() == real_reply {
            nobody |= m.status == Some(async_nats::StatusCode::NO_RESPONDERS);
        } else if m.subject.as_str() == probe_reply {
            return Ok(nobody);
        }
    }
}

pub(crate) async fn subscribe(
    inner: &Arc<Inner>,
    topic: &str,
    group: &str,
) -> Result<TransientSubscription> {
    let (client, _) = inner.conn().await?;
    let err =
        |e: async_nats::Error| NatsError::consume(format!("transient subscribe to `{topic}`"), e);
    let mut sub = client
        .queue_subscribe(inner.names.transient(topic), group.to_string())
        .await
        .map_err(|e| err(e.into()))?;
    // Registered at the server before this returns.
    round_trip(client, None).await.map_err(err)?;
    let (tx, rx) = mpsc::channel(inner.config.transient_queue.max(1));
    let (leave_tx, mut leave_rx) = oneshot::channel::<()>();
    let mut closed = inner.closed.subscribe();
    let leaving = inner.leaving.clone();
    let live = inner.live_members.clone();
    live.send_modify(|n| *n += 1);
    let topic_name = topic.to_string();
    tokio::spawn(async move {
        let mut left = false;
        loop {
            let m = tokio::select! {
                _ = closed.wait_for(|c| *c) => break,
                r = &mut leave_rx => {
                    left = r.is_ok();
                    break;
                }
                m = sub.next() => m,
            };
            let Some(m) = m else { break };
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
        // Handed to the connection before any publish that waits on `leaving`.
        let _ = sub.unsubscribe().await;
        drop(tx);
        if !left {
            leave_rx.close();
            left = leave_rx.try_recv().is_ok();
        }
        if left {
            leaving.send_modify(|n| *n = n.saturating_sub(1));
        }
        live.send_modify(|n| *n = n.saturating_sub(1));
    });
    Ok(TransientSubscription::new(
        rx,
        Membership {
            leave: Some(leave_tx),
            leaving: inner.leaving.clone(),
        },
    ))
}

/// Ends the member's NATS subscription when it is dropped.
struct Membership {
    leave: Option<oneshot::Sender<()>>,
    leaving: watch::Sender<usize>,
}

impl Drop for Membership {
    fn drop(&mut self) {
        if let Some(leave) = self.leave.take() {
            self.leaving.send_modify(|n| *n += 1);
            if leave.send(()).is_err() {
                // The member had ended already (bus closed).
                self.leaving.send_modify(|n| *n = n.saturating_sub(1));
            }
        }
    }
}
