//! Integration tests of the NATS bus: the bus conformance suite, the keep-alive of held
//! messages, attempts across restarts, and the router and request/reply suites over the NATS bus and the embedded
//! store, against a real nats-server that each test starts itself (testkit, free
//! loopback port).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod attempts;
mod conformance;
mod keep_alive;
mod reply_conformance;
mod router_conformance;
