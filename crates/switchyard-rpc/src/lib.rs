//! # switchyard-rpc
//!
//! Sync calls between services **by name**, with the failure handling built in: an HTTP/JSON
//! server kit (axum), a client (hyper) and the same for gRPC (tonic), that applies a deadline, retries with backoff,
//! jitter and a budget, a circuit breaker per instance, load balancing with ejection and a
//! bulkhead to every call; the call context (deadline, `traceparent`, correlation id,
//! idempotency key) travels on every hop.
//!
//! ```no_run
//! use switchyard_rpc::{HttpClient, registry::StaticRegistry, client::CallOptions};
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let registry = StaticRegistry::parse("payment=http://127.0.0.1:7003,http://127.0.0.1:7013")?;
//! let client = HttpClient::new(registry);
//! let receipt: serde_json::Value = client
//!     .service("payment")
//!     .post_json_with("/charge", &serde_json::json!({"order": 7, "amount": 1200}),
//!         &CallOptions::new().idempotency_key("order-7-charge"))
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! A runnable tour: `cargo run --release -p switchyard-rpc --example payment_call`.
//!
//! # Layout
//!
//! | module | what |
//! | --- | --- |
//! | [`context`] | the per-call context and its headers; the "current" context of a handler |
//! | [`http`] | server kit: `router()` (health, readiness, context + deadline middleware, body limit), `serve()`, the `Json` extractor |
//! | [`problem`] | RFC 9457 `application/problem+json` with stable `type` URIs |
//! | [`registry`] | service discovery: static (config / `SWITCHYARD_SERVICES`) and in-process |
//! | [`balance`] | power of two choices with ejection (pure state machine) |
//! | [`breaker`] | the circuit breaker (pure state machine) |
//! | [`client`] | `HttpClient` → `ServiceClient`: typed calls through every layer |
//! | [`idempotency`] | server-side "run once per `Idempotency-Key`", stored in a `switchyard::store::Store` |
//! | [`grpc`] | gRPC (tonic): `GrpcClient` → `GrpcChannel` (same layers, for tonic-generated clients), `GrpcServer` (health, context/deadline layer, graceful shutdown), the test service `Echo` |
//! | [`error`] | the client's `Error` and its `kind()` (HTTP statuses and gRPC codes) |
//!
//! The layers are shared by HTTP and gRPC: the per-service pool (registry, balancer,
//! breakers) lives in the private `pool` module, the retry decision (backoff, jitter,
//! budget, deadline) in `retry`.

pub mod balance;
pub mod breaker;
pub mod client;
mod conn;
pub mod context;
pub mod error;
pub mod grpc;
pub mod http;
pub mod idempotency;
mod pool;
pub mod problem;
pub mod registry;
mod retry;

pub use client::{CallOptions, ClientConfig, HttpClient, ServiceClient};
pub use context::CallContext;
pub use error::{Error, ErrorKind, Result};
pub use problem::Problem;
