//! The store contract: a service's own database, with the outbox and the inbox in it.
//!
//! # Semantics every backend provides
//!
//! - **Typed tables** over serde ([`Table`]): rows keyed by string, each with a version
//!   that changes on every write.
//! - **One atomic commit** ([`Store::commit`] of a [`WriteBatch`]) holds state changes,
//!   outbox appends (messages to publish) and inbox marks (messages processed): all or
//!   nothing, durable when it returns (per the backend's durability setting).
//! - **Optimistic concurrency.** A transaction ([`Txn`]) records the version of every row
//!   it reads (or that it was absent). The commit fails with
//!   [`Error::Conflict`](crate::Error::Conflict) if any of those rows changed since, so two
//!   concurrent read-modify-write transactions on one key never both succeed; the loser
//!   retries ([`transact`] does that for you). A write of a row that was not read is
//!   unconditional (last writer wins).
//! - **Inbox.** Marking message `id` processed by `consumer` fails the whole commit with
//!   [`Error::AlreadyProcessed`](crate::Error::AlreadyProcessed) if it was marked before:
//!   the effect of a message is applied once even when it is delivered twice at once.
//!   Marks expire after a window ([`Store::expire_inbox`]) longer than the bus's
//!   redelivery horizon.
//! - **Outbox.** Appended messages are read back in commit order ([`Store::outbox_peek`])
//!   by the relay ([`crate::relay`]), published with their original ids, then removed.

mod memory;
mod txn;

pub use memory::MemoryStore;
pub use txn::{Table, Txn, Versioned, transact};

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Notify;

use crate::envelope::{Envelope, MessageId, Timestamp};
use crate::error::Result;

/// What a commit expects of a row it read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expectation {
    /// Table name.
    pub table: String,
    /// Row key.
    pub key: String,
    /// The version read, or `None` if the row was absent.
    pub version: Option<u64>,
}

/// One write of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Insert or replace a row.
    Put {
        /// Table name.
        table: String,
        /// Row key.
        key: String,
        /// Encoded row.
        value: Bytes,
    },
    /// Remove a row (no error if absent).
    Delete {
        /// Table name.
        table: String,
        /// Row key.
        key: String,
    },
}

/// Everything one atomic commit does.
#[derive(Debug, Clone, Default)]
pub struct WriteBatch {
    /// Rows whose versions must be unchanged.
    pub expect: Vec<Expectation>,
    /// State changes, applied in order.
    pub writes: Vec<Write>,
    /// Messages to publish after the commit, in order: (topic, envelope).
    pub outbox: Vec<(String, Envelope)>,
    /// Messages this commit marks as processed: (consumer, message id).
    pub inbox: Vec<(String, MessageId)>,
}

impl WriteBatch {
    /// True when the batch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.outbox.is_empty() && self.inbox.is_empty()
    }
}

/// A committed outbox entry awaiting the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Position in the outbox (commit order).
    pub seq: u64,
    /// Destination topic.
    pub topic: String,
    /// The message, with the id it will be published under.
    pub envelope: Envelope,
}

/// A row as stored: encoded value and version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRow {
    /// Row key.
    pub key: String,
    /// Encoded value.
    pub value: Bytes,
    /// Version (changes on every write of the row).
    pub version: u64,
}

/// A service's database. See the [module docs](self) for the semantics.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The committed row `key` of `table`.
    async fn get_raw(&self, table: &str, key: &str) -> Result<Option<RawRow>>;

    /// Committed rows of `table` whose key starts with `prefix`, in key order, at most `limit`.
    async fn scan_raw(&self, table: &str, prefix: &str, limit: usize) -> Result<Vec<RawRow>>;

    /// Applies `batch` atomically if its expectations hold and none of its inbox ids was
    /// processed before; durable when it returns.
    async fn commit(&self, batch: WriteBatch) -> Result<()>;

    /// Whether `consumer` has processed message `id` (within the inbox window).
    async fn inbox_contains(&self, consumer: &str, id: MessageId) -> Result<bool>;

    /// Forgets inbox marks made before `before`; returns how many.
    async fn expire_inbox(&self, before: Timestamp) -> Result<u64>;

    /// The oldest outbox entries, in commit order, at most `limit`. A backend shared by
    /// several processes (PostgreSQL) hands each entry to one of them at a time — a claim
    /// with a lease, released by a clean close — so their relays share the work and a
    /// crashed instance's entries are published by another once the lease lapses.
    async fn outbox_peek(&self, limit: usize) -> Result<Vec<OutboxEntry>>;

    /// Removes published outbox entries.
    async fn outbox_remove(&self, seqs: &[u64]) -> Result<()>;

    /// Entries waiting in the outbox.
    async fn outbox_len(&self) -> Result<u64>;

    /// Notified after every commit that appended to the outbox (wakes the relay).
    fn outbox_notify(&self) -> Arc<Notify>;
}
