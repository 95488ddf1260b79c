//! The store conformance suite against the in-memory store.

use std::path::Path;
use std::sync::Arc;

use switchyard::store::MemoryStore;
use switchyard::{Capabilities, Capability};
use switchyard_conformance::StoreFactory;

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

switchyard_conformance::store_suite!(MemoryStoreFactory);
