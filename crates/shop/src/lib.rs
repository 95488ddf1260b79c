//! # shop
//!
//! The switchyard reference order system: the classic order flow (Order, Inventory,
//! Payment, Shipping, Notification, Analytics) implemented in every communication
//! pattern, with a lab that measures them and a dashboard that shows each order's flow.
//!
//! This library holds what the patterns and the `shop` binary are built from: the
//! shared domain model, the five backing services (each a real server with its own
//! store, a typed client and router handlers), fault injection, the Order service's
//! public API (REST and gRPC over an [`order::OrderDesk`]) and the `shop` command line.
//!
//! # Layout
//!
//! | module | what |
//! | --- | --- |
//! | [`model`] | items, ids, amounts, the catalog, the events and their topics, the payment request/reply messages |
//! | [`order`] | the Order service's core: orders, status and timeline, the order book, the `Flow` every pattern implements |
//! | [`services`] | inventory (REST), payment (gRPC + bus responder), shipping (REST + label writer), notification (REST + e-mail on events), analytics (REST + counters on events) |
//! | [`faults`] | latency, error rate and downtime injected into any service at run time (`/admin/fault`) |
//! | [`api`] | the Order service's public API over an `OrderDesk`: REST + gRPC (`shop.order.v1.Orders`), operator endpoints behind the `Admin` trait |
//! | [`cli`] | the `shop` command line (clap): `order`, `status`, `orders`, `fault`, `sagas`, `dlq`, `check`, `up`, `serve` |
//! | [`patterns`] | the five flows (sync, choreography with its declared spec and monitor, request-reply, orchestration, hybrid) |
//! | [`app`] | the whole shop in one process: stores, bus, servers, routers, relays, orchestrator, the order desk |
//! | `wiring` | (crate-private) the pieces `app` and `serve` are both assembled from: stores, backing services, the Order service, background tasks |
//! | [`launch`] | `shop up` and `shop serve`: the app behind the Order API, the operator endpoints, the demo orders |
//! | [`serve`] | `shop serve <service>`: one service in its own process, the others found through a static registry |
//! | [`check`] | global invariants (stock, money, shipments, orders in flight) over a running shop |
//!
//! Every service starts the same way — its store, a `TcpListener`, a shutdown future —
//! and registers nothing; the caller puts the URL in its registry:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use shop::services::inventory::{self, InventoryClient};
//! use switchyard_rpc::{CallOptions, HttpClient, registry::InProcessRegistry};
//!
//! let store: Arc<dyn switchyard::store::Store> = Arc::new(switchyard::store::MemoryStore::new());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let running = inventory::start(store, listener, std::future::pending()).await?;
//! let registry = InProcessRegistry::new();
//! let _registration = registry.register(inventory::SERVICE, &running.url);
//! let client = InventoryClient::new(&HttpClient::new(registry));
//! let reservation = client
//!     .reserve("o-1", &[shop::model::Item::new("sku-001", 2)], &CallOptions::new())
//!     .await?;
//! # Ok(()) }
//! ```

pub mod api;
pub mod app;
pub mod check;
pub mod cli;
pub mod faults;
pub mod lab;
pub mod launch;
pub mod model;
pub mod order;
pub mod patterns;
pub mod processes;
pub mod serve;
pub mod services;
mod wiring;
