//! The router and request/reply suites over the NATS bus with `PgStore`: the distributed
//! mode's pair, both servers real (nats-server started per test, PostgreSQL shared).

use switchyard_testkit::servers::NatsServer;

/// Starts nats-server for one test; `None` (said loudly, a failure under CI) when missing.
fn nats() -> Option<NatsServer> {
    NatsServer::start().expect("start nats-server")
}

pub(crate) mod router {
    use crate::factory::{Nats, Pg, pg_cases};

    pg_cases!(switchyard_conformance::ROUTER_CASES, |pg, name| {
        let Some(server) = super::nats() else { return };
        switchyard_conformance::run_router(
            &Nats::new(server.url()),
            &pg,
            name,
            &switchyard_conformance::router_child_test_name(module_path!()),
        )
    };
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
        switchyard_conformance::router_child_entry(&Nats::child(), &Pg::child());
    }
}

pub(crate) mod reply {
    use crate::factory::{Nats, pg_cases};

    pg_cases!(switchyard_conformance::REPLY_CASES, |pg, name| {
        let Some(server) = super::nats() else { return };
        switchyard_conformance::run_reply(&Nats::new(server.url()), &pg, name)
    };
        a_request_gets_its_typed_reply,
        concurrent_requesters_each_get_their_own_replies,
        a_timeout_is_typed_and_the_late_reply_is_dropped_and_counted,
        a_repeated_request_id_applies_once_and_gets_the_same_reply,
        a_retry_with_the_same_idempotency_key_gets_the_stored_reply,
        an_expired_request_is_not_processed,
        a_responder_error_arrives_as_a_typed_remote_error,
        a_request_without_a_responder_fails_fast_with_no_responders,
        a_restarted_responder_answers_again_and_a_keyed_retry_applies_once,
        a_responder_without_effects_answers_without_a_commit,
        concurrent_requests_with_the_same_key_apply_once,
    );
}
