//! # switchyard-postgres
//!
//! The PostgreSQL backend of the [`switchyard::store::Store`] contract, for the
//! distributed mode: a service's state tables, outbox, inbox and saga log live in its own
//! schema of a PostgreSQL database, and several instances of the service share them.
//!
//! ```no_run
//! # async fn demo() -> switchyard::Result<()> {
//! use std::sync::Arc;
//! use switchyard::store::{Store, Table, Txn};
//! use switchyard_postgres::{PgStore, PgStoreConfig};
//!
//! const STOCK: Table<u32> = Table::new("stock");
//! let store: Arc<dyn Store> = Arc::new(
//!     PgStore::connect(PgStoreConfig::new("postgres://shop@127.0.0.1/shop", "inventory")).await?,
//! );
//! let txn = Txn::new(store.clone());
//! let left = txn.get(&STOCK, "sku-1").await?.unwrap_or(10);
//! txn.put(&STOCK, "sku-1", &(left - 1))?;
//! txn.commit().await?; // one SQL statement: one round trip, one transaction
//! # Ok(()) }
//! ```
//!
//! # Layout (decision 0011)
//!
//! | contract | PostgreSQL, in the service's schema |
//! | --- | --- |
//! | typed tables | `sy_rows (tbl, key, value bytea, version)`, keys in byte order (`COLLATE "C"`) |
//! | row version | `nextval('sy_versions')`: never repeats, so a deleted and re-created row never matches an old read |
//! | atomic commit | one statement, so one round trip and one transaction: a call of `sy_commit` (PL/pgSQL, installed by migration 2) that takes advisory locks on every key the commit read or writes (sorted, so no deadlock), checks the versions, marks the inbox, writes the rows and the outbox entries |
//! | inbox | `sy_inbox (consumer, id, marked_at_us)`, primary key (consumer, id) |
//! | outbox | `sy_outbox (seq bigserial, topic, envelope, claimed_by, claimed_until)`; [`Store::outbox_peek`] *claims* entries for this instance (`FOR UPDATE SKIP LOCKED`, a lease) so the relays of several instances share the work |
//! | saga log | rows of the saga tables, like any state |
//! | migrations | [`sqlx::migrate`], recorded in the schema's `_sqlx_migrations` |
//!
//! A commit is durable when it returns as far as the server's `synchronous_commit` says
//! (on by default: the WAL is flushed).
//!
//! | module | what |
//! | --- | --- |
//! | `config` | connection and pool settings |
//! | `schema` | the schema's migrations |
//! | `store` | [`PgStore`] |
//! | `error` | this crate's error type |

mod config;
mod error;
mod schema;
mod store;

pub use config::PgStoreConfig;
pub use error::PgError;
pub use store::{PgStore, application_name};
