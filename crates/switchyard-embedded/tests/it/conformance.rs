//! The bus conformance suite against the embedded backend.

use std::path::Path;

use switchyard_conformance::{BusFactory, Settings};
use switchyard_embedded::{EmbeddedBus, EmbeddedConfig};

pub(crate) struct Embedded;

impl BusFactory for Embedded {
    type Bus = EmbeddedBus;
    fn open(&self, dir: &Path, settings: &Settings) -> switchyard::Result<EmbeddedBus> {
        EmbeddedBus::open_with(
            dir,
            EmbeddedConfig {
                dedup_window: settings.dedup_window,
                max_message_bytes: settings.max_message_bytes,
                // Small segments so retention and segment rolls are exercised.
                segment_bytes: 4 * 1024 * 1024,
                ..Default::default()
            },
        )
    }
}

switchyard_conformance::bus_suite!(Embedded);
