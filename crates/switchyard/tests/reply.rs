//! The request/reply conformance cases over the in-memory bus and store: typed replies,
//! no cross-talk, timeouts and late replies, repeated requests, expired requests,
//! responder errors.

use switchyard_conformance::memory::{MemoryBusFactory, MemoryStoreFactory};

switchyard_conformance::reply_suite!(MemoryBusFactory, MemoryStoreFactory);
