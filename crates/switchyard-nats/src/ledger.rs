//! Deliveries that were not attempts, kept in a JetStream stream used as a key-value
//! store (one subject per message, the last value kept).
//!
//! The contract's attempt number is JetStream's delivery count, except that a delivery
//! during which the message only waited behind its subject (*parked*) and then went back
//! to the server — its bus closed, its last subscriber left, or its process died — is no
//! attempt. Such deliveries are counted here, per message, so the count survives the
//! process: `attempt = delivered - uncounted`. Entries exist only for messages that went
//! through such a hand-back (rare: restarts), and are deleted once the message is settled.
//!
//! A plain stream (`max_messages_per_subject` = 1) rather than async-nats' key-value API:
//! its bucket calls fail against nats-server 2.9.10 (the reply does not parse), while
//! streams work.

use std::time::Duration;

use async_nats::jetstream::stream::{self, LastRawMessageErrorKind};
use bytes::Bytes;
use switchyard::Result;
use tokio::sync::OnceCell;

use crate::{Inner, NatsError};

/// Entries older than this are dropped by the server (a message parked that long counts
/// its hand-backs as attempts: the safe direction).
const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// What the ledger knows of one message: `n` deliveries up to delivery `upto` were no
/// attempts (deliveries after `upto` are not classified yet).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Uncounted {
    /// Deliveries that were no attempts.
    pub(crate) n: u64,
    /// The last delivery classified.
    pub(crate) upto: u64,
}

impl Uncounted {
    fn encode(self) -> Bytes {
        Bytes::from(format!("{}:{}", self.n, self.upto))
    }

    fn decode(b: &[u8]) -> Option<Self> {
        let s = std::str::from_utf8(b).ok()?;
        let (n, upto) = s.split_once(':')?;
        Some(Uncounted {
            n: n.parse().ok()?,
            upto: upto.parse().ok()?,
        })
    }
}

/// The ledger stream of one bus (its namespace), created on first use.
pub(crate) struct Ledger {
    stream: String,
    subject_prefix: String,
    handle: OnceCell<stream::Stream>,
}

impl Ledger {
    /// A ledger in stream `stream`, one subject per key under `subject_prefix`.
    pub(crate) fn new(stream: String, subject_prefix: String) -> Self {
        Ledger {
            stream,
            subject_prefix,
            handle: OnceCell::new(),
        }
    }

    fn subject(&self, key: &str) -> String {
        format!("{}.{key}", self.subject_prefix)
    }

    async fn handle(&self, inner: &Inner) -> Result<&stream::Stream> {
        self.handle
            .get_or_try_init(|| async {
                key_value_stream(inner, &self.stream, &self.subject_prefix, MAX_AGE).await
            })
            .await
    }

    /// The entry of `key` (none: every delivery so far was an attempt, or unknown).
    pub(crate) async fn get(&self, inner: &Inner, key: &str) -> Result<Uncounted> {
        let s = self.handle(inner).await?;
        match s.get_last_raw_message_by_subject(&self.subject(key)).await {
            Ok(m) => Ok(Uncounted::decode(&m.payload).unwrap_or_default()),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {
                Ok(Uncounted::default())
            }
            Err(e) => Err(NatsError::consume(
                format!("reading `{key}` of {}", self.stream),
                e,
            )),
        }
    }

    /// Stores the entry of `key`.
    pub(crate) async fn put(&self, inner: &Inner, key: &str, value: Uncounted) -> Result<()> {
        self.handle(inner).await?;
        let (_, js) = inner.conn().await?;
        let fail = |e: async_nats::Error| {
            NatsError::consume(format!("writing `{key}` of {}", self.stream), e)
        };
        js.publish(self.subject(key), value.encode())
            .await
            .map_err(|e| fail(e.into()))?
            .await
            .map_err(|e| fail(e.into()))?;
        Ok(())
    }

    /// Drops the entry of `key` (its message is settled).
    pub(crate) async fn delete(&self, inner: &Inner, key: &str) -> Result<()> {
        let s = self.handle(inner).await?;
        s.purge()
            .filter(self.subject(key))
            .await
            .map_err(|e| NatsError::consume(format!("deleting `{key}` of {}", self.stream), e))?;
        Ok(())
    }
}

/// A stream used as a key-value store (the KV API fails on nats-server 2.9.10): subjects
/// `<prefix>.>`, the last value of each subject kept, values older than `max_age` dropped.
/// The ledger and the partition leases keep their state this way.
pub(crate) async fn key_value_stream(
    inner: &Inner,
    name: &str,
    prefix: &str,
    max_age: Duration,
) -> Result<stream::Stream> {
    let (_, js) = inner.conn().await?;
    js.get_or_create_stream(stream::Config {
        name: name.to_string(),
        subjects: vec![format!("{prefix}.>")],
        max_messages_per_subject: 1,
        max_age,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| NatsError::stream(name, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let u = Uncounted { n: 3, upto: 7 };
        assert_eq!(Uncounted::decode(&u.encode()), Some(u));
        assert_eq!(Uncounted::decode(b"x"), None);
    }
}
