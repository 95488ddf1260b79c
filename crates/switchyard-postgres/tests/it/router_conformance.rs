//! The router and outbox-relay conformance suite over the embedded bus and `PgStore`,
//! with the crash cases (relay and router in a child process killed by pid).

use crate::factory::{Embedded, Pg, pg_cases};

pg_cases!(switchyard_conformance::ROUTER_CASES, |pg, name| switchyard_conformance::run_router(
        &Embedded,
        &pg,
        name,
        &switchyard_conformance::router_child_test_name(module_path!()),
    );
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

/// The child process of the crash cases (does nothing unless started as one).
#[test]
fn router_conformance_child() {
    switchyard_conformance::router_child_entry(&Embedded, &Pg::child());
}
