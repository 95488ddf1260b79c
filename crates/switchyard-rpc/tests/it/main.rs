//! Integration tests: real servers on 127.0.0.1 port 0.
#![allow(clippy::unwrap_used)]

mod client;
mod grpc;
mod grpc_codegen;
mod idempotency;
mod server;
mod support;
