//! Factories for the in-memory bus and store, so every suite runs against them with one
//! line (`bus_suite!(MemoryBusFactory)`), and their declared gaps are stated once.

use std::path::Path;
use std::sync::Arc;

use switchyard::logbus::{LogBus, LogBusConfig};
use switchyard::memory::MemoryStorage;
use switchyard::store::MemoryStore;
use switchyard::{Capabilities, Capability, MemoryBus};

use crate::{BusFactory, Settings, StoreFactory};

/// Opens a fresh [`MemoryBus`] (the directory is ignored; its gaps come from the bus).
pub struct MemoryBusFactory;

impl BusFactory for MemoryBusFactory {
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

/// Opens a fresh [`MemoryStore`] (the directory is ignored).
pub struct MemoryStoreFactory;

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
