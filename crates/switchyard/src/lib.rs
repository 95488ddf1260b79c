//! # switchyard
//!
//! Microservice communication patterns for Rust with the failure handling built in.
//! This crate is the contract and the machinery; backends live in their own crates
//! (`switchyard-embedded` for the zero-install durable default).
//!
//! ```
//! use switchyard::{Bus, Envelope, MemoryBus, SubscribeOptions};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> switchyard::Result<()> {
//! let bus = MemoryBus::in_memory();
//! let env = Envelope::new("greeting.v1", "/docs", "application/json", r#"{"hi":1}"#);
//! bus.publish("greetings", env).await?;
//! let mut sub = bus.subscribe("greetings", "printer", SubscribeOptions::default()).await?;
//! let delivery = sub.next().await?;
//! assert_eq!(delivery.envelope().event_type, "greeting.v1");
//! delivery.ack().await?;
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! | module | what |
//! | --- | --- |
//! | [`envelope`] | the CloudEvents envelope, ids, timestamps, its stored binary form |
//! | [`codec`] | typed events (`Event`) and the JSON codec; decode errors |
//! | [`bus`] | the `Bus` contract: publish, groups, deliveries, settling, dead letters |
//! | [`logbus`] | the group machinery over any append-only log, shared by log backends |
//! | [`memory`] | the in-memory bus backend |
//! | [`router`] | typed handlers with inbox dedup and one atomic commit per message |
//! | [`relay`] | the outbox relay: committed outbox entries to the bus, in order |
//! | [`reply`] | request/reply over the bus: the per-instance `Requester`, correlation, timeouts, late replies; responders are router handlers |
//! | [`saga`] | saga orchestration: steps with compensations, every transition committed, resume after a crash, visibility |
//! | [`store`] | the store contract: typed tables, optimistic transactions, outbox, inbox; the in-memory store |
//! | [`error`] | the error type and its kinds |

/// The version of this crate.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub mod bus;
pub mod codec;
pub mod envelope;
pub mod error;
pub mod logbus;
pub mod memory;
pub mod relay;
pub mod reply;
pub mod router;
pub mod saga;
pub mod store;

pub use bus::{
    Bus, Capabilities, Capability, DeadLetter, Delivery, Published, RedeliveryPolicy, ReplayFilter,
    StartPosition, SubscribeOptions, Subscription, TransientSubscription,
};
pub use codec::{DecodeError, Event};
pub use envelope::{Envelope, MessageId, Timestamp};
pub use error::{Error, ErrorKind, Result};
pub use memory::MemoryBus;
