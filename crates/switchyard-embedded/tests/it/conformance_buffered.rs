//! The bus conformance suite against the embedded backend in `buffered` mode (fsync on a
//! timer): a process crash (SIGKILL) must lose nothing here either, because writes reach
//! the OS before `publish` returns; only a power loss may cost the last interval.

use std::path::Path;
use std::time::Duration;

use switchyard_conformance::{BusFactory, Settings};
use switchyard_embedded::{Durability, EmbeddedBus, EmbeddedConfig};

struct EmbeddedBuffered;

impl BusFactory for EmbeddedBuffered {
    type Bus = EmbeddedBus;
    fn open(&self, dir: &Path, settings: &Settings) -> switchyard::Result<EmbeddedBus> {
        EmbeddedBus::open_with(
            dir,
            EmbeddedConfig {
                durability: Durability::Buffered {
                    interval: Duration::from_millis(20),
                },
                dedup_window: settings.dedup_window,
                max_message_bytes: settings.max_message_bytes,
                segment_bytes: 4 * 1024 * 1024,
                ..Default::default()
            },
        )
    }
}

switchyard_conformance::bus_suite!(EmbeddedBuffered);
