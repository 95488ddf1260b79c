//! Integration tests of the NATS bus: the bus conformance suite against a real
//! nats-server that each test starts itself (testkit, free loopback port).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod conformance;
