//! The bus conformance cases against `NatsBus`.
//!
//! Each test starts its own nats-server; the factory gives every data directory its own
//! namespace on it (so a reopen of one directory finds the same streams).
//!
//! Not run here, with why:
//! - `ordering_per_subject_with_competing_consumers`,
//!   `a_parked_subject_with_a_long_backlog_does_not_stall_others`,
//!   `exhausted_attempts_go_to_the_dlq_with_reason` (it asserts that the next message
//!   of the subject waits): per-subject ordering is not implemented (decision 0009).
//! - `publish_survives_sigkill` (CrashSafe declared missing), and
//!   `consumer_killed_mid_message_is_redelivered`, `backlog_of_1m_with_bounded_memory`:
//!   their child process would need the parent's server URL; not wired yet.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;

use switchyard_conformance::{BusFactory, Settings};
use switchyard_nats::{NatsBus, NatsConfig};
use switchyard_testkit::servers::NatsServer;

struct Factory {
    url: String,
}

impl BusFactory for Factory {
    type Bus = NatsBus;

    fn open(&self, dir: &Path, settings: &Settings) -> switchyard::Result<NatsBus> {
        let mut h = DefaultHasher::new();
        dir.hash(&mut h);
        let mut config = NatsConfig::new(self.url.clone());
        config.namespace = Some(format!("c{:016x}", h.finish()));
        config.dedup_window = settings.dedup_window;
        config.max_message_bytes = settings.max_message_bytes;
        Ok(NatsBus::new(config))
    }
}

macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                let Some(server) = NatsServer::start().expect("start nats-server") else {
                    println!("nats-server not installed: case skipped");
                    return;
                };
                let factory = Factory { url: server.url() };
                switchyard_conformance::run(&factory, stringify!($case), "conformance_child_not_wired");
            }
        )*
    };
}

cases!(
    publish_and_consume_in_order,
    every_group_gets_every_message,
    competing_consumers_split_a_group,
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
    transient_one_member_of_each_group_gets_each_message,
    transient_unsubscribes_on_drop_and_close,
    transient_messages_are_not_persisted,
);
