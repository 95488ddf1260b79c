//! The store conformance suite against the embedded (fjall) store.

use std::path::Path;
use std::sync::Arc;

use switchyard::Capabilities;
use switchyard_conformance::StoreFactory;
use switchyard_embedded::{EmbeddedStore, StoreConfig};

pub(crate) struct EmbeddedStoreFactory;

impl StoreFactory for EmbeddedStoreFactory {
    type Store = EmbeddedStore;
    fn open(&self, dir: &Path) -> switchyard::Result<Arc<EmbeddedStore>> {
        EmbeddedStore::open(dir, StoreConfig::default()).map(Arc::new)
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::all()
    }
    async fn close(&self, store: &EmbeddedStore) -> switchyard::Result<()> {
        store.close().await
    }
}

switchyard_conformance::store_suite!(EmbeddedStoreFactory);
