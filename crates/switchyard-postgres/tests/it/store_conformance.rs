//! The store conformance suite against `PgStore`.

use crate::factory::{Pg, pg_cases};

pg_cases!(switchyard_conformance::STORE_CASES, |pg, name| switchyard_conformance::run_store(&pg, name);
    typed_rows_roundtrip_with_versions,
    commit_is_atomic,
    concurrent_read_modify_write_loses_no_update,
    blind_writes_are_last_writer_wins,
    inbox_marks_apply_an_effect_once,
    outbox_keeps_commit_order,
    state_survives_reopen,
    commits_survive_sigkill,
);

/// The child process of the crash case (does nothing unless started as one).
#[test]
fn store_conformance_child() {
    switchyard_conformance::store_child_entry(&Pg::child());
}
