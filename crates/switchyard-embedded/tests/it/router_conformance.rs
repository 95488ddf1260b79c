//! The router and outbox-relay conformance cases over the embedded bus and store,
//! including exactly-once effects across real crashes: the relay and the router in a
//! child process killed with SIGKILL (by pid).

use crate::conformance::Embedded;
use crate::store_conformance::EmbeddedStoreFactory;

switchyard_conformance::router_suite!(Embedded, EmbeddedStoreFactory);
