//! The request/reply conformance cases over the in-memory bus and store: typed replies,
//! no cross-talk, timeouts and late replies, repeated requests, expired requests,
//! responder errors.

use std::path::Path;
use std::sync::Arc;

use switchyard::logbus::{LogBus, LogBusConfig};
use switchyard::memory::MemoryStorage;
use switchyard::store::MemoryStore;
use switchyard::{Capabilities, Capability, MemoryBus};
use switchyard_conformance::{BusFactory, Settings, StoreFactory};

struct Memory;

impl BusFactory for Memory {
    type Bus = MemoryBus;
    fn open(&self, _dir: &Path, settings: &Settings) -> switchyard::Result<MemoryBus> {
        Ok(LogBus::new(
            MemoryStorage::new(settings.dedup_window),
            LogBusConfig {
                max_message_bytes: settings.max_message_bytes,
                ..Default::default()
            },
        ))
    }
}

struct MemoryStoreFactory;

impl StoreFactory for MemoryStoreFactory {
    type Store = MemoryStore;

    fn open(&self, _dir: &Path) -> switchyard::Result<Arc<MemoryStore>> {
        Ok(Arc::new(MemoryStore::new()))
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::all()
            .without(
                Capability::Durable,
                "in-memory: state lives as long as the MemoryStore",
            )
            .without(
                Capability::CrashSafe,
                "in-memory: a killed process takes its commits with it",
            )
            .without(
                Capability::Reopen,
                "in-memory: opening again starts an empty store",
            )
    }

    async fn close(&self, _store: &MemoryStore) -> switchyard::Result<()> {
        Ok(())
    }
}

switchyard_conformance::reply_suite!(Memory, MemoryStoreFactory);
