//! Integration tests of the embedded backend: the conformance suite (in both durability
//! modes), and what only a disk-backed bus has (torn tails, retention, locking).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod conformance;
mod conformance_buffered;
mod disk;
mod exactly_once;
mod store_conformance;
