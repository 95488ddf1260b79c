//! The request/reply conformance suite over the embedded bus with the responders'
//! effects and stored replies in `PgStore`.

use crate::factory::{Embedded, pg_cases};

pg_cases!(switchyard_conformance::REPLY_CASES, |pg, name| switchyard_conformance::run_reply(&Embedded, &pg, name);
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
