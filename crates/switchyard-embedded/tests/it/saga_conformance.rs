//! The saga conformance suite against the embedded store (with the SIGKILL case).

use crate::store_conformance::EmbeddedStoreFactory;

switchyard_conformance::saga_suite!(EmbeddedStoreFactory);
