//! # switchyard-embedded
//!
//! The durable embedded backend: a message bus in a data directory, zero installs.
//! Topics are checksummed segment logs; a writer thread group-commits concurrent
//! publishes (many messages, one `fdatasync`); consumer groups keep durable positions.
//! It implements the whole [`switchyard::Bus`] contract and passes the conformance suite
//! with no declared gaps.
//!
//! ```no_run
//! use switchyard::{Bus, Envelope, SubscribeOptions};
//! use switchyard_embedded::EmbeddedBus;
//!
//! # #[tokio::main] async fn main() -> switchyard::Result<()> {
//! let bus = EmbeddedBus::open("./data/bus")?;
//! bus.publish("orders", Envelope::new("order.created.v1", "/shop", "application/json", "{}")).await?;
//! let mut sub = bus.subscribe("orders", "billing", SubscribeOptions::default()).await?;
//! let d = sub.next().await?;
//! d.ack().await?;
//! bus.close().await?;
//! # Ok(()) }
//! ```
//!
//! # Durability
//!
//! | mode | `publish` returns when | a power loss can lose |
//! | --- | --- | --- |
//! | [`Durability::Fsync`] (default) | the message is written and `fdatasync`ed (shared with every publish queued meanwhile) | nothing that was acknowledged |
//! | [`Durability::Buffered`] | the message is written to the OS page cache; a timer `fdatasync`s every `interval` | up to `interval` of acknowledged messages (a process crash loses nothing) |
//!
//! Consumer-group positions are written every 100 ms and fsynced on close; a crash
//! replays at most the last moments of acknowledgements (redelivery, never loss).
//!
//! The transient channel ([`Bus::publish_transient`], used by request/reply) never
//! touches the disk: it is the in-process hub shared with the in-memory bus.
//!
//! # Layout
//!
//! | module | what |
//! | --- | --- |
//! | [`log`] | one topic's segment files: append, sync, read, recover a torn tail, reclaim |
//! | `segment` | the record frame (length, crc32c, offset, time, payload) |
//! | `writer` | the group-commit writer thread and publisher dedup |
//! | `group_file` | a group's durable position as a checksummed change log |
//! | [`storage`] | the data directory, tying the above to [`switchyard::logbus`] |

mod group_commit;
mod group_file;
pub mod log;
mod segment;
pub mod storage;
pub mod store;
mod writer;

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use switchyard::logbus::{LogBus, LogBusConfig};
use switchyard::{
    Bus, Capabilities, DeadLetter, Envelope, Published, ReplayFilter, Result, SubscribeOptions,
    Subscription, TransientSubscription,
};

pub use storage::EmbeddedStorage;
pub use store::{EmbeddedStore, StoreConfig};
pub use writer::WriterStats;

/// When `publish` returns relative to the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `fdatasync` before acknowledging; concurrent publishes share one (group commit).
    #[default]
    Fsync,
    /// Acknowledge once written to the OS; `fdatasync` every `interval`.
    Buffered {
        /// How often buffered writes are synced.
        interval: Duration,
    },
}

/// Settings of an embedded bus.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// Durability of publishes.
    pub durability: Durability,
    /// Publisher-dedup window (zero disables).
    pub dedup_window: Duration,
    /// Most ids a topic's dedup window remembers (the oldest go first), bounding its
    /// memory (~50 bytes per id) at any publish rate.
    pub max_dedup_ids: usize,
    /// Size at which a topic starts a new segment file (retention frees whole segments).
    pub segment_bytes: u64,
    /// Largest message accepted.
    pub max_message_bytes: usize,
    /// Most bytes the writer gathers into one write and fsync.
    pub max_batch_bytes: usize,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            durability: Durability::Fsync,
            dedup_window: Duration::from_secs(120),
            max_dedup_ids: switchyard::logbus::DEFAULT_MAX_DEDUP_IDS,
            segment_bytes: 64 * 1024 * 1024,
            max_message_bytes: switchyard::bus::DEFAULT_MAX_MESSAGE_BYTES,
            max_batch_bytes: 8 * 1024 * 1024,
        }
    }
}

/// The durable embedded bus. Cheap to clone; clones share one bus.
#[derive(Clone)]
pub struct EmbeddedBus {
    inner: LogBus<EmbeddedStorage>,
}

impl EmbeddedBus {
    /// Opens (or creates) a bus in `dir` with default settings.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(dir, EmbeddedConfig::default())
    }

    /// Opens (or creates) a bus in `dir`. Needs a Tokio runtime. Fails with
    /// [`switchyard::Error::Locked`] when another bus has the directory.
    pub fn open_with(dir: impl AsRef<Path>, config: EmbeddedConfig) -> Result<Self> {
        let bus_config = LogBusConfig {
            max_message_bytes: config.max_message_bytes,
            ..Default::default()
        };
        let storage = EmbeddedStorage::open(dir.as_ref(), config)?;
        Ok(EmbeddedBus {
            inner: LogBus::new(storage, bus_config),
        })
    }

    /// The storage (writer counters, recovery reports, disk use).
    pub fn storage(&self) -> &EmbeddedStorage {
        self.inner.storage()
    }

    /// The acknowledged position of each group of `topic`.
    pub fn group_positions(&self, topic: &str) -> Result<Vec<(String, u64)>> {
        self.inner.group_positions(topic)
    }
}

#[async_trait]
impl Bus for EmbeddedBus {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn publish(&self, topic: &str, envelope: Envelope) -> Result<Published> {
        self.inner.publish(topic, envelope).await
    }
    async fn publish_batch(&self, topic: &str, envelopes: Vec<Envelope>) -> Result<Vec<Published>> {
        self.inner.publish_batch(topic, envelopes).await
    }
    async fn subscribe(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription> {
        self.inner.subscribe(topic, group, options).await
    }
    async fn dead_letters(&self, topic: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        self.inner.dead_letters(topic, limit).await
    }
    async fn replay_dead_letters(&self, topic: &str, filter: ReplayFilter) -> Result<usize> {
        self.inner.replay_dead_letters(topic, filter).await
    }
    async fn publish_transient(&self, topic: &str, envelope: Envelope) -> Result<()> {
        self.inner.publish_transient(topic, envelope).await
    }
    async fn subscribe_transient(&self, topic: &str, group: &str) -> Result<TransientSubscription> {
        self.inner.subscribe_transient(topic, group).await
    }
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}
