//! Integration tests of the embedded backend: the conformance suites — bus (in both
//! durability modes), store, and router/relay over both (with the SIGKILL cases), sagas over the store — and
//! what only a disk-backed bus has (torn tails, retention, locking).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod conformance;
mod conformance_buffered;
mod disk;
mod reply_conformance;
mod router_conformance;
mod saga_conformance;
mod store_conformance;
