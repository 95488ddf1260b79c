//! Deliveries that were not attempts, kept in a JetStream key-value bucket.
//!
//! The contract's attempt number is JetStream's delivery count, except that a delivery
//! during which the message only waited behind its subject (*parked*) and then went back
//! to the server — its bus closed, its last subscriber left, or its process died — is no
//! attempt. Such deliveries are counted here, per message, so the count survives the
//! process: `attempt = delivered - uncounted`. Entries exist only for messages that went
//! through such a hand-back (rare: restarts), and are deleted once the message is settled.

use std::time::Duration;

use async_nats::jetstream::kv;
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

/// The bucket of one bus (its namespace), opened on first use.
pub(crate) struct Ledger {
    bucket: String,
    store: OnceCell<kv::Store>,
}

impl Ledger {
    pub(crate) fn new(bucket: String) -> Self {
        Ledger {
            bucket,
            store: OnceCell::new(),
        }
    }

    async fn store(&self, inner: &Inner) -> Result<&kv::Store> {
        self.store
            .get_or_try_init(|| async {
                let (_, js) = inner.conn().await?;
                if let Ok(s) = js.get_key_value(&self.bucket).await {
                    return Ok(s);
                }
                js.create_key_value(kv::Config {
                    bucket: self.bucket.clone(),
                    history: 1,
                    max_age: MAX_AGE,
                    storage: async_nats::jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| NatsError::stream(&self.bucket, e))
            })
            .await
    }

    /// The entry of `key` (none: every delivery so far was an attempt, or unknown).
    pub(crate) async fn get(&self, inner: &Inner, key: &str) -> Result<Uncounted> {
        let store = self.store(inner).await?;
        let value = store
            .get(key)
            .await
            .map_err(|e| NatsError::consume(format!("reading `{key}` of {}", self.bucket), e))?;
        Ok(value
            .and_then(|v| Uncounted::decode(&v))
            .unwrap_or_default())
    }

    /// Stores the entry of `key`.
    pub(crate) async fn put(&self, inner: &Inner, key: &str, value: Uncounted) -> Result<()> {
        let store = self.store(inner).await?;
        store
            .put(key, value.encode())
            .await
            .map_err(|e| NatsError::consume(format!("writing `{key}` of {}", self.bucket), e))?;
        Ok(())
    }

    /// Drops the entry of `key` (its message is settled).
    pub(crate) async fn delete(&self, inner: &Inner, key: &str) -> Result<()> {
        let store = self.store(inner).await?;
        store
            .purge(key)
            .await
            .map_err(|e| NatsError::consume(format!("deleting `{key}` of {}", self.bucket), e))?;
        Ok(())
    }
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
