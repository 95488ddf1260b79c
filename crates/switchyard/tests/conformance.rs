//! The bus conformance suite against the in-memory backend.

use switchyard_conformance::memory::MemoryBusFactory;

switchyard_conformance::bus_suite!(MemoryBusFactory);
