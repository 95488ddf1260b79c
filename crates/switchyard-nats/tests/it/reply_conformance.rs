//! The request/reply conformance cases over the NATS bus (its transient channel on core
//! NATS) and the embedded store. Each test starts its own nats-server.

use switchyard_testkit::servers::NatsServer;

use crate::conformance::{EmbeddedStores, Factory};

macro_rules! reply_cases {
    ($($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                let Some(server) = NatsServer::start().expect("start nats-server") else {
                    println!("nats-server not installed: case skipped");
                    return;
                };
                switchyard_conformance::run_reply(
                    &Factory::new(server.url()),
                    &EmbeddedStores,
                    stringify!($case),
                );
            }
        )*

        /// Every reply case has a test here.
        #[test]
        fn reply_declared_gaps() {
            switchyard_conformance::assert_reply_cases_generated(&[$(stringify!($case)),*]);
        }
    };
}

reply_cases!(
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
