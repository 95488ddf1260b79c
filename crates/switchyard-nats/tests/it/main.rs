//! Integration tests of the NATS backend against a real nats-server that each test
//! starts itself (testkit, free loopback port): the bus conformance suite, the keep-alive
//! of held messages, attempts across restarts, per-subject ordering across processes
//! (partitions with one owner: two child processes, a kill, a close, a late joiner),
//! the router and request/reply suites over the NATS bus and the embedded store, and the
//! service registry (feature `registry`, enabled for tests through the dev-dependency on
//! this crate).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod attempts;
mod conformance;
mod keep_alive;
mod partitions;
mod publish;
mod registry;
mod reply_conformance;
mod router_conformance;

/// The runtime the cases that drive buses directly run on (two workers, as the machine).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}
