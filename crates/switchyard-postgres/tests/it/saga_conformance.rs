//! The saga conformance suite with `PgStore` holding the saga log.

use crate::factory::{Pg, pg_cases};

pg_cases!(switchyard_conformance::SAGA_CASES, |pg, name| switchyard_conformance::run_saga(
        &pg,
        name,
        &switchyard_conformance::saga_child_test_name(module_path!()),
    );
    a_saga_runs_every_step_in_order_and_completes,
    a_failure_at_each_step_compensates_exactly_the_completed_steps_in_reverse,
    retries_timeouts_and_panics_follow_the_step_policy,
    a_compensation_that_fails_three_times_then_succeeds,
    a_compensation_that_never_succeeds_needs_attention_until_an_operator_retries_it,
    starting_twice_with_one_id_starts_once_and_bad_starts_are_refused,
    thousands_of_sagas_run_concurrently_within_max_active,
    unfinished_sagas_resume_after_a_restart,
    a_crash_at_every_transition_point_ends_each_saga_once,
);

/// The child process of the crash case (does nothing unless started as one).
#[test]
fn saga_conformance_child() {
    switchyard_conformance::saga_child_entry(&Pg::child());
}
