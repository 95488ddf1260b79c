//! The router and outbox-relay conformance cases over the in-memory bus and store:
//! exactly-once effects, the DLQ paths, ordering with a poison message, replay after a
//! fix. The crash cases (SIGKILL) need `CrashSafe`, which neither declares; they print
//! why and pass.

use switchyard_conformance::memory::{MemoryBusFactory, MemoryStoreFactory};

switchyard_conformance::router_suite!(MemoryBusFactory, MemoryStoreFactory);
