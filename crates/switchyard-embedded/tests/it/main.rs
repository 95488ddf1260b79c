//! Integration tests of the embedded backend: the conformance suite (in both durability
//! modes), and what only a disk-backed bus has (torn tails, retention, locking).

mod conformance;
mod conformance_buffered;
mod disk;
