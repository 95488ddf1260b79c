//! The router and outbox-relay conformance cases over the NATS bus and the embedded
//! store, including the SIGKILL cases (the relay and the router in a child process).
//!
//! Each test starts its own nats-server. A child process gets only the case directory;
//! it finds the server through the URL file the test process wrote into `<dir>/bus` when
//! it opened the bus there (the crash cases need `CrashSafe`, so the suite opens the bus
//! once to read its capabilities before the first child starts).

use switchyard_testkit::servers::NatsServer;

use crate::conformance::{EmbeddedStores, Factory};

macro_rules! router_cases {
    ($($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                let Some(server) = NatsServer::start().expect("start nats-server") else {
                    println!("nats-server not installed: case skipped");
                    return;
                };
                switchyard_conformance::run_router(
                    &Factory::new(server.url()),
                    &EmbeddedStores,
                    stringify!($case),
                    &switchyard_conformance::router_child_test_name(module_path!()),
                );
            }
        )*

        /// Every router case has a test here, and the gaps of the pair are printed.
        #[test]
        fn router_declared_gaps() {
            switchyard_conformance::assert_router_cases_generated(&[$(stringify!($case)),*]);
            // No connection is made: capabilities are known without a server.
            switchyard_conformance::print_router_gaps(
                &Factory::new("nats://127.0.0.1:1".into()),
                &EmbeddedStores,
            );
        }
    };
}

/// The child process of the router crash cases (does nothing unless started as one).
#[test]
fn router_conformance_child() {
    switchyard_conformance::router_child_entry(&Factory::child(), &EmbeddedStores);
}

router_cases!(
    effects_apply_once_even_when_a_message_is_delivered_twice,
    outbox_relay_publishes_with_correlation_and_causation,
    terminal_unknown_and_malformed_messages_go_to_the_dlq_at_once,
    a_poison_message_parks_only_its_subject_and_replay_succeeds_after_the_fix,
    a_lost_ack_after_the_commit_does_not_repeat_the_effect,
    an_inbox_window_shorter_than_the_redelivery_horizon_is_refused,
    what_a_handler_holds_is_dropped_after_its_commit,
    a_closed_gate_defers_messages_until_it_opens,
    outbox_relay_loses_and_duplicates_nothing_across_sigkills,
    router_killed_between_commit_and_ack_applies_the_effect_once,
);
