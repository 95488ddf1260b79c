//! The bus conformance cases against `NatsBus`.
//!
//! Each test starts its own nats-server; the factory gives every data directory its own
//! namespace on it (so a reopen of one directory finds the same streams).
//!
//! Every bus case is generated, and none is ignored.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;
use std::sync::Arc;

use switchyard::Capabilities;
use switchyard_conformance::{BusFactory, Settings, StoreFactory};
use switchyard_embedded::{EmbeddedStore, StoreConfig};
use switchyard_nats::{NatsBus, NatsConfig};
use switchyard_testkit::servers::NatsServer;

/// Opens a `NatsBus` per data directory. The test process knows the server URL and
/// writes it into the directory, so a child process of a crash case (which gets only the
/// directory) reaches the same server.
pub(crate) struct Factory {
    url: Option<String>,
}

impl Factory {
    /// The factory of a test process, which started the server at `url`.
    pub(crate) fn new(url: String) -> Self {
        Factory { url: Some(url) }
    }

    /// The factory of a child process: reads the URL from the directory.
    pub(crate) fn child() -> Self {
        Factory { url: None }
    }
}

/// The embedded (fjall) store, paired with the NATS bus in the router and reply suites.
pub(crate) struct EmbeddedStores;

impl StoreFactory for EmbeddedStores {
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

const URL_FILE: &str = "nats-url";

impl BusFactory for Factory {
    type Bus = NatsBus;

    fn open(&self, dir: &Path, settings: &Settings) -> switchyard::Result<NatsBus> {
        let mut h = DefaultHasher::new();
        dir.hash(&mut h);
        let url = match &self.url {
            Some(url) => {
                std::fs::create_dir_all(dir).unwrap();
                std::fs::write(dir.join(URL_FILE), url).unwrap();
                url.clone()
            }
            None => std::fs::read_to_string(dir.join(URL_FILE)).unwrap(),
        };
        let mut config = NatsConfig::new(url);
        config.namespace = Some(format!("c{:016x}", h.finish()));
        config.dedup_window = settings.dedup_window;
        config.max_message_bytes = settings.max_message_bytes;
        Ok(NatsBus::new(config))
    }
}

macro_rules! cases {
    ($($(#[$attr:meta])* $case:ident),* $(,)?) => {
        $(
            #[test]
            $(#[$attr])*
            fn $case() {
                let Some(server) = NatsServer::start().expect("start nats-server") else {
                    println!("nats-server not installed: case skipped");
                    return;
                };
                let factory = Factory::new(server.url());
                switchyard_conformance::run(
                    &factory,
                    stringify!($case),
                    &switchyard_conformance::child_test_name(module_path!()),
                );
            }
        )*

        /// Every case of the suite has a test here (a new case cannot be missed silently).
        #[test]
        fn every_bus_case_is_generated() {
            let mut generated = vec![$(stringify!($case)),*];
            let mut listed: Vec<&str> = switchyard_conformance::CASES.iter().map(|(n, _)| *n).collect();
            generated.sort_unstable();
            listed.sort_unstable();
            assert_eq!(generated, listed, "add the new conformance case to cases! below");
        }
    };
}

/// The child process of the crash cases (does nothing unless started as one).
#[test]
fn conformance_child() {
    switchyard_conformance::child_entry(&Factory::child());
}

cases!(
    publish_and_consume_in_order,
    every_group_gets_every_message,
    competing_consumers_split_a_group,
    ordering_per_subject_with_competing_consumers,
    a_parked_subject_with_a_long_backlog_does_not_stall_others,
    exhausted_attempts_go_to_the_dlq_with_reason,
    nack_with_delay_redelivers_after_the_delay,
    ack_timeout_redelivers_and_stale_ack_is_rejected,
    explicit_dead_letter_is_immediate,
    replay_goes_back_to_the_failing_group_only,
    duplicate_ids_are_stored_once_within_the_window,
    failed_publish_can_be_retried_with_the_same_id,
    oversized_message_is_rejected_with_a_typed_error,
    invalid_names_are_rejected,
    start_latest_skips_the_backlog,
    close_wakes_waiting_consumers,
    positions_and_dead_letters_survive_reopen,
    publish_survives_sigkill,
    consumer_killed_mid_message_is_redelivered,
    backlog_of_1m_with_bounded_memory,
    transient_one_member_of_each_group_gets_each_message,
    transient_unsubscribes_on_drop_and_close,
    transient_messages_are_not_persisted,
);
