//! The bus conformance suite against the in-memory backend.

use std::path::Path;

use switchyard::MemoryBus;
use switchyard::logbus::{LogBus, LogBusConfig};
use switchyard::memory::MemoryStorage;
use switchyard_conformance::{BusFactory, Settings};

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

switchyard_conformance::bus_suite!(Memory);
