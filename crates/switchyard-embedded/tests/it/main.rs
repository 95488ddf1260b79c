//! Integration tests of the embedded backend: the conformance suite, and what only a
//! disk-backed bus has (torn tails, retention).

mod conformance;
mod disk;
