//! Integration tests of the PostgreSQL store against a real server the tests start
//! (initdb into a temp dir, a free loopback port, stopped by pid): the store and saga
//! conformance suites, and the router and request/reply suites over the embedded bus with
//! this store and over the NATS bus with this store (the crash cases SIGKILL a child
//! process that commits to the same servers); the commit's outcomes and the upgrade of a
//! schema made by an earlier version (`commit`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod commit;
mod factory;
mod nats_conformance;
mod reply_conformance;
mod router_conformance;
mod saga_conformance;
mod store_conformance;
