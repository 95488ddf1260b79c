//! Integration tests of the NATS backend against a real nats-server that each test
//! starts itself (testkit, free loopback port): the bus conformance suite, and the
//! service registry (feature `registry`, enabled for tests through the dev-dependency on
//! this crate).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod conformance;
mod registry;
