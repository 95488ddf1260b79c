//! The store conformance suite against the in-memory store.

use switchyard_conformance::memory::MemoryStoreFactory;

switchyard_conformance::store_suite!(MemoryStoreFactory);
