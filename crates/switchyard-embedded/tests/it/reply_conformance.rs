//! The request/reply conformance cases over the embedded bus and store.

use crate::conformance::Embedded;
use crate::store_conformance::EmbeddedStoreFactory;

switchyard_conformance::reply_suite!(Embedded, EmbeddedStoreFactory);
