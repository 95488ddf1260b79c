//! The saga conformance suite against the in-memory store.

use switchyard_conformance::memory::MemoryStoreFactory;

switchyard_conformance::saga_suite!(MemoryStoreFactory);
