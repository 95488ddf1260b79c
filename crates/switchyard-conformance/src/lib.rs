//! # switchyard-conformance
//!
//! The one conformance suite of the bus and store contracts, written once and run by
//! every backend. A backend's `tests/` file is a constructor and nothing else:
//!
//! ```ignore
//! struct Factory;
//! impl switchyard_conformance::BusFactory for Factory { /* open(dir, settings) */ }
//! switchyard_conformance::bus_suite!(Factory);
//!
//! struct Stores;
//! impl switchyard_conformance::StoreFactory for Stores { /* open, capabilities, close */ }
//! switchyard_conformance::store_suite!(Stores);
//!
//! // The router and the outbox relay over both: the bus under `<dir>/bus`, the store
//! // under `<dir>/store`.
//! switchyard_conformance::router_suite!(Factory, Stores);
//!
//! // Request/reply (a Requester against a responder, on the transient channel) over both.
//! switchyard_conformance::reply_suite!(Factory, Stores);
//!
//! // Saga orchestration over the store (the orchestrator's and its target's).
//! switchyard_conformance::saga_suite!(Stores);
//! ```
//!
//! Each case becomes its own `#[test]`. A case needs a [`Capability`] the backend
//! declares missing prints `NOT SUPPORTED by this backend: <reason>` and passes; the
//! `declared_gaps` (bus), `store_declared_gaps` (store) and `router_declared_gaps`
//! (router) tests print every gap with its reason, so nothing is skipped silently. Crash
//! cases re-run the test binary as a child process (the `conformance_child`,
//! `store_conformance_child` and `router_conformance_child` tests) and kill it with
//! SIGKILL by pid.
//!
//! | module | what |
//! | --- | --- |
//! | `cases` | the bus cases ([`CASES`], run by [`run`]) |
//! | `child` | the child process of the bus crash cases ([`child_entry`]) |
//! | `store_cases` | the store cases ([`STORE_CASES`], run by [`run_store`]) |
//! | `store_child` | the child process of the store crash case ([`store_child_entry`]) |
//! | `router_cases` | the router and relay cases over a bus and a store ([`ROUTER_CASES`], run by [`run_router`]) |
//! | `router_child` | the child process of the router crash cases ([`router_child_entry`]) |
//! | `saga_cases` | the saga cases over a store ([`SAGA_CASES`], run by [`run_saga`]) |
//! | `saga_child` | the child process of the saga crash case ([`saga_child_entry`]) |
//! | `reply_cases` | the request/reply cases over a bus and a store ([`REPLY_CASES`], run by [`run_reply`]) |

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cases;
mod child;
pub mod memory;
mod reply_cases;
mod router_cases;
mod router_child;
mod saga_cases;
mod saga_child;
mod store_cases;
mod store_child;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use switchyard::{Bus, Capabilities, Capability};

pub use child::child_entry;
pub use router_child::router_child_entry;
pub use saga_child::saga_child_entry;
pub use store_child::store_child_entry;

/// Settings a case asks the backend for.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Publisher-dedup window.
    pub dedup_window: Duration,
    /// Largest message accepted.
    pub max_message_bytes: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            dedup_window: Duration::from_secs(120),
            max_message_bytes: switchyard::bus::DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// Opens the backend under test.
pub trait BusFactory: Send + Sync + 'static {
    /// The backend's bus.
    type Bus: Bus + Clone;
    /// Opens a bus storing under `dir` (a fresh directory per case; the same one to
    /// reopen). Called inside a Tokio runtime.
    fn open(&self, dir: &Path, settings: &Settings) -> switchyard::Result<Self::Bus>;
}

/// Every case of the suite with the capability it needs.
pub const CASES: &[(&str, Option<Capability>)] = &[
    ("publish_and_consume_in_order", None),
    ("every_group_gets_every_message", None),
    ("competing_consumers_split_a_group", None),
    ("ordering_per_subject_with_competing_consumers", None),
    (
        "a_parked_subject_with_a_long_backlog_does_not_stall_others",
        None,
    ),
    ("nack_with_delay_redelivers_after_the_delay", None),
    ("ack_timeout_redelivers_and_stale_ack_is_rejected", None),
    ("exhausted_attempts_go_to_the_dlq_with_reason", None),
    ("explicit_dead_letter_is_immediate", None),
    ("replay_goes_back_to_the_failing_group_only", None),
    ("duplicate_ids_are_stored_once_within_the_window", None),
    ("failed_publish_can_be_retried_with_the_same_id", None),
    ("oversized_message_is_rejected_with_a_typed_error", None),
    ("invalid_names_are_rejected", None),
    ("start_latest_skips_the_backlog", None),
    ("close_wakes_waiting_consumers", None),
    (
        "positions_and_dead_letters_survive_reopen",
        Some(Capability::Reopen),
    ),
    ("publish_survives_sigkill", Some(Capability::CrashSafe)),
    (
        "consumer_killed_mid_message_is_redelivered",
        Some(Capability::Reopen),
    ),
    (
        "backlog_of_1m_with_bounded_memory",
        Some(Capability::BoundedBacklogMemory),
    ),
    ("transient_one_member_of_each_group_gets_each_message", None),
    ("transient_unsubscribes_on_drop_and_close", None),
    (
        "transient_messages_are_not_persisted",
        Some(Capability::Reopen),
    ),
];

/// Runs the case `name` against `factory` (on its own Tokio runtime, in a fresh temp dir).
pub fn run<F: BusFactory>(factory: &F, name: &str, child_entry: &str) {
    let (_, needs) = CASES
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no conformance case `{name}`"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        if let Some(cap) = needs {
            let bus = factory.open(dir.path(), &Settings::default()).unwrap();
            let caps = bus.capabilities();
            bus.close().await.unwrap();
            drop(bus);
            if let Err(reason) = caps.check(*cap) {
                println!("case `{name}`: NOT SUPPORTED by this backend ({cap:?}): {reason}");
                return;
            }
        }
        let limit = Duration::from_secs(300);
        tokio::time::timeout(
            limit,
            cases::dispatch(factory, name, dir.path(), child_entry),
        )
        .await
        .unwrap_or_else(|_| panic!("case `{name}` did not finish within {limit:?}"));
    });
}

/// The libtest name of the `conformance_child` test generated in the module `module`
/// (a `module_path!()`, whose first segment is the test crate and not part of test names).
pub fn child_test_name(module: &str) -> String {
    entry_test_name(module, "conformance_child")
}

/// The libtest name of the test `entry` generated in the module `module` (a
/// `module_path!()`).
fn entry_test_name(module: &str, entry: &str) -> String {
    match module.split_once("::") {
        Some((_, path)) => format!("{path}::{entry}"),
        None => entry.to_string(),
    }
}

/// Prints the backend's declared gaps (capability and reason), one per line.
pub fn print_gaps<F: BusFactory>(factory: &F) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let bus = factory.open(dir.path(), &Settings::default()).unwrap();
        let caps = bus.capabilities();
        if caps.missing.is_empty() {
            println!("this backend declares no gaps: every conformance case runs");
        }
        for (cap, reason) in &caps.missing {
            let cases: Vec<_> = CASES
                .iter()
                .filter(|(_, c)| *c == Some(*cap))
                .map(|(n, _)| *n)
                .collect();
            println!(
                "gap {cap:?}: {reason} (cases not run: {})",
                cases.join(", ")
            );
        }
        bus.close().await.unwrap();
    });
}

/// Generates one `#[test]` per conformance case for a backend factory expression,
/// plus `declared_gaps` and the `conformance_child` entry used by crash cases.
#[macro_export]
macro_rules! bus_suite {
    ($factory:expr) => {
        $crate::bus_suite!(@cases $factory;
            publish_and_consume_in_order,
            every_group_gets_every_message,
            competing_consumers_split_a_group,
            ordering_per_subject_with_competing_consumers,
            a_parked_subject_with_a_long_backlog_does_not_stall_others,
            nack_with_delay_redelivers_after_the_delay,
            ack_timeout_redelivers_and_stale_ack_is_rejected,
            exhausted_attempts_go_to_the_dlq_with_reason,
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
            transient_messages_are_not_persisted
        );
        #[test]
        fn declared_gaps() {
            $crate::print_gaps(&$factory);
        }
        #[test]
        fn conformance_child() {
            $crate::child_entry(&$factory);
        }
    };
    (@cases $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::run(&$factory, stringify!($case), &$crate::child_test_name(module_path!()));
            }
        )*
    };
}

/// Opens the store backend under test.
///
/// The store suite reuses the bus's [`Capability`] names with these meanings:
/// [`Durable`](Capability::Durable) (committed state survives closing and reopening),
/// [`CrashSafe`](Capability::CrashSafe) (every commit that returned `Ok` survives a
/// SIGKILL of the committing process, and no commit is half-applied) and
/// [`Reopen`](Capability::Reopen) (a store can be reopened on the same directory, by
/// this or another process, once the previous one is closed or dead).
pub trait StoreFactory: Send + Sync + 'static {
    /// The backend's store.
    type Store: switchyard::store::Store;

    /// Opens a store under `dir` (a fresh directory per case; the same one to reopen).
    /// Called inside a Tokio runtime.
    fn open(&self, dir: &Path) -> switchyard::Result<Arc<Self::Store>>;

    /// What the backend supports; cases needing a missing capability are not run (and
    /// say so).
    fn capabilities(&self) -> Capabilities;

    /// Closes `store` before the case drops its last `Arc` to it (and, in reopen cases,
    /// opens the directory again). When this returns `Ok`, the store must have released
    /// the directory — its lock, its files, its background tasks — so that a new
    /// [`open`](Self::open) of the same directory succeeds right after the drop. A
    /// backend with nothing to release returns `Ok(())`.
    fn close(&self, store: &Self::Store) -> impl Future<Output = switchyard::Result<()>> + Send;
}

/// Every case of the store suite with the capability it needs.
pub const STORE_CASES: &[(&str, Option<Capability>)] = &[
    ("typed_rows_roundtrip_with_versions", None),
    ("commit_is_atomic", None),
    ("concurrent_read_modify_write_loses_no_update", None),
    ("blind_writes_are_last_writer_wins", None),
    ("inbox_marks_apply_an_effect_once", None),
    ("outbox_keeps_commit_order", None),
    ("state_survives_reopen", Some(Capability::Reopen)),
    ("commits_survive_sigkill", Some(Capability::CrashSafe)),
];

/// Runs the store case `name` against `factory` (on its own Tokio runtime, in a fresh
/// temp dir).
pub fn run_store<F: StoreFactory>(factory: &F, name: &str) {
    run_on_store(STORE_CASES, "store", factory, name, |dir| async move {
        store_cases::dispatch(factory, name, &dir).await
    });
}

/// Runs case `name` of a suite over a store alone: skipped (and said so) when the store
/// lacks the capability the case needs, else on its own Tokio runtime in a fresh temp
/// dir, within a generous time limit.
fn run_on_store<F, C, Fut>(
    cases: &[(&str, Option<Capability>)],
    suite: &str,
    factory: &F,
    name: &str,
    case: C,
) where
    F: StoreFactory,
    C: FnOnce(std::path::PathBuf) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (_, needs) = cases
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no {suite} conformance case `{name}`"));
    if let Some(cap) = needs
        && let Err(reason) = factory.capabilities().check(*cap)
    {
        println!("case `{name}`: NOT SUPPORTED by this backend ({cap:?}): {reason}");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let limit = Duration::from_secs(300);
        tokio::time::timeout(limit, case(dir.path().to_path_buf()))
            .await
            .unwrap_or_else(|_| panic!("{suite} case `{name}` did not finish within {limit:?}"));
    });
}

/// Prints the store backend's declared gaps (capability and reason), one per line.
pub fn print_store_gaps<F: StoreFactory>(factory: &F) {
    let caps = factory.capabilities();
    if caps.missing.is_empty() {
        println!("this store backend declares no gaps: every store conformance case runs");
    }
    for (cap, reason) in &caps.missing {
        let cases: Vec<_> = STORE_CASES
            .iter()
            .filter(|(_, c)| *c == Some(*cap))
            .map(|(n, _)| *n)
            .collect();
        let not_run = if cases.is_empty() {
            "no store case needs it".to_string()
        } else {
            format!("cases not run: {}", cases.join(", "))
        };
        println!("gap {cap:?}: {reason} ({not_run})");
    }
}

/// Checks that [`store_suite!`] generated a test for every case of [`STORE_CASES`]
/// (called by the generated `store_declared_gaps` test).
#[doc(hidden)]
pub fn assert_store_cases_generated(generated: &[&str]) {
    let listed: Vec<&str> = STORE_CASES.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        generated, listed,
        "store_suite! must generate one test per entry of STORE_CASES, in the same order"
    );
}

/// Generates one `#[test]` per store conformance case for a [`StoreFactory`]
/// expression, plus `store_declared_gaps` and the `store_conformance_child` entry used
/// by the crash case.
#[macro_export]
macro_rules! store_suite {
    ($factory:expr) => {
        $crate::store_suite!(@cases $factory;
            typed_rows_roundtrip_with_versions,
            commit_is_atomic,
            concurrent_read_modify_write_loses_no_update,
            blind_writes_are_last_writer_wins,
            inbox_marks_apply_an_effect_once,
            outbox_keeps_commit_order,
            state_survives_reopen,
            commits_survive_sigkill
        );
    };
    (@cases $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::run_store(&$factory, stringify!($case));
            }
        )*
        #[test]
        fn store_declared_gaps() {
            $crate::assert_store_cases_generated(&[$(stringify!($case)),*]);
            $crate::print_store_gaps(&$factory);
        }
        #[test]
        fn store_conformance_child() {
            $crate::store_child_entry(&$factory);
        }
    };
}

/// Every case of the router suite with the capability it needs — of both the bus and the
/// store (a crash case needs [`CrashSafe`](Capability::CrashSafe) of each: the relay
/// and the router are killed between a commit and what follows it).
pub const ROUTER_CASES: &[(&str, Option<Capability>)] = &[
    (
        "effects_apply_once_even_when_a_message_is_delivered_twice",
        None,
    ),
    (
        "outbox_relay_publishes_with_correlation_and_causation",
        None,
    ),
    (
        "terminal_unknown_and_malformed_messages_go_to_the_dlq_at_once",
        None,
    ),
    (
        "a_poison_message_parks_only_its_subject_and_replay_succeeds_after_the_fix",
        None,
    ),
    (
        "a_lost_ack_after_the_commit_does_not_repeat_the_effect",
        None,
    ),
    (
        "an_inbox_window_shorter_than_the_redelivery_horizon_is_refused",
        None,
    ),
    ("what_a_handler_holds_is_dropped_after_its_commit", None),
    ("a_closed_gate_defers_messages_until_it_opens", None),
    (
        "outbox_relay_loses_and_duplicates_nothing_across_sigkills",
        Some(Capability::CrashSafe),
    ),
    (
        "router_killed_between_commit_and_ack_applies_the_effect_once",
        Some(Capability::CrashSafe),
    ),
];

/// What the bus of `factory` declares, read from a bus opened (and closed) under `dir`.
/// Runs a case of a suite that needs a bus and a store: on its own Tokio runtime, in a
/// fresh temp dir (the bus under `bus/`, the store under `store/`), after checking that
/// both sides declare the capability the case needs.
fn run_paired<'a, B, S, C, Fut>(
    cases: &[(&str, Option<Capability>)],
    suite: &str,
    bus: &'a B,
    store: &'a S,
    name: &str,
    case: C,
) where
    B: BusFactory,
    S: StoreFactory,
    C: FnOnce(std::path::PathBuf) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (_, needs) = cases
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no {suite} conformance case `{name}`"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        if let Some(cap) = needs {
            let bus_caps = bus_capabilities(bus, &dir.path().join("bus")).await;
            let gaps: Vec<_> = [("bus", bus_caps), ("store", store.capabilities())]
                .into_iter()
                .filter_map(|(side, caps)| caps.check(*cap).err().map(|why| (side, why)))
                .collect();
            if !gaps.is_empty() {
                for (side, reason) in gaps {
                    println!(
                        "case `{name}`: NOT SUPPORTED by this backend ({cap:?} of the {side}): {reason}"
                    );
                }
                return;
            }
        }
        let limit = Duration::from_secs(300);
        tokio::time::timeout(limit, case(dir.path().to_path_buf()))
            .await
            .unwrap_or_else(|_| panic!("{suite} case `{name}` did not finish within {limit:?}"));
    });
}

async fn bus_capabilities<F: BusFactory>(factory: &F, dir: &Path) -> Capabilities {
    let bus = factory.open(dir, &Settings::default()).unwrap();
    let caps = bus.capabilities();
    bus.close().await.unwrap();
    caps
}

/// Runs the router case `name` against a bus from `bus` and a store from `store` (on its
/// own Tokio runtime, in a fresh temp dir: the bus under `bus/`, the store under
/// `store/`). `child_entry` is the libtest name of the `router_conformance_child` test
/// ([`router_child_test_name`]).
pub fn run_router<B: BusFactory, S: StoreFactory>(
    bus: &B,
    store: &S,
    name: &str,
    child_entry: &str,
) {
    run_paired(ROUTER_CASES, "router", bus, store, name, |dir| async move {
        router_cases::dispatch(bus, store, name, &dir, child_entry).await
    });
}

/// The libtest name of the `router_conformance_child` test generated in the module
/// `module` (a `module_path!()`), which the router crash cases re-run by exact path.
pub fn router_child_test_name(module: &str) -> String {
    entry_test_name(module, "router_conformance_child")
}

/// Prints the gaps of the bus and the store that keep router cases from running
/// (capability and reason), one per line.
pub fn print_router_gaps<B: BusFactory, S: StoreFactory>(bus: &B, store: &S) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bus_caps = rt.block_on(bus_capabilities(bus, &dir.path().join("bus")));
    let mut none = true;
    for (side, caps) in [("bus", bus_caps), ("store", store.capabilities())] {
        for (cap, reason) in &caps.missing {
            let cases: Vec<_> = ROUTER_CASES
                .iter()
                .filter(|(_, c)| *c == Some(*cap))
                .map(|(n, _)| *n)
                .collect();
            if cases.is_empty() {
                continue;
            }
            none = false;
            println!(
                "gap {cap:?} of the {side}: {reason} (router cases not run: {})",
                cases.join(", ")
            );
        }
    }
    if none {
        println!("these backends declare no gap a router case needs: every router case runs");
    }
}

/// Checks that [`router_suite!`] generated a test for every case of [`ROUTER_CASES`]
/// (called by the generated `router_declared_gaps` test).
#[doc(hidden)]
pub fn assert_router_cases_generated(generated: &[&str]) {
    let listed: Vec<&str> = ROUTER_CASES.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        generated, listed,
        "router_suite! must generate one test per entry of ROUTER_CASES, in the same order"
    );
}

/// Generates one `#[test]` per router conformance case for a [`BusFactory`] expression
/// and a [`StoreFactory`] expression, plus `router_declared_gaps` and the
/// `router_conformance_child` entry used by the crash cases (addressed by its exact test
/// path, so several suites in one test binary each reach their own).
#[macro_export]
macro_rules! router_suite {
    ($bus:expr, $store:expr) => {
        $crate::router_suite!(@cases $bus, $store;
            effects_apply_once_even_when_a_message_is_delivered_twice,
            outbox_relay_publishes_with_correlation_and_causation,
            terminal_unknown_and_malformed_messages_go_to_the_dlq_at_once,
            a_poison_message_parks_only_its_subject_and_replay_succeeds_after_the_fix,
            a_lost_ack_after_the_commit_does_not_repeat_the_effect,
            an_inbox_window_shorter_than_the_redelivery_horizon_is_refused,
            what_a_handler_holds_is_dropped_after_its_commit,
            a_closed_gate_defers_messages_until_it_opens,
            outbox_relay_loses_and_duplicates_nothing_across_sigkills,
            router_killed_between_commit_and_ack_applies_the_effect_once
        );
    };
    (@cases $bus:expr, $store:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::run_router(
                    &$bus,
                    &$store,
                    stringify!($case),
                    &$crate::router_child_test_name(module_path!()),
                );
            }
        )*
        #[test]
        fn router_declared_gaps() {
            $crate::assert_router_cases_generated(&[$(stringify!($case)),*]);
            $crate::print_router_gaps(&$bus, &$store);
        }
        #[test]
        fn router_conformance_child() {
            $crate::router_child_entry(&$bus, &$store);
        }
    };
}

/// Every case of the request/reply suite with the capability it needs (none needs one:
/// they run on every backend pair).
pub const REPLY_CASES: &[(&str, Option<Capability>)] = &[
    ("a_request_gets_its_typed_reply", None),
    ("concurrent_requesters_each_get_their_own_replies", None),
    (
        "a_timeout_is_typed_and_the_late_reply_is_dropped_and_counted",
        None,
    ),
    (
        "a_repeated_request_id_applies_once_and_gets_the_same_reply",
        None,
    ),
    (
        "a_retry_with_the_same_idempotency_key_gets_the_stored_reply",
        None,
    ),
    ("an_expired_request_is_not_processed", None),
    ("a_responder_error_arrives_as_a_typed_remote_error", None),
    (
        "a_request_without_a_responder_fails_fast_with_no_responders",
        None,
    ),
    (
        "a_restarted_responder_answers_again_and_a_keyed_retry_applies_once",
        None,
    ),
    ("a_responder_without_effects_answers_without_a_commit", None),
    ("concurrent_requests_with_the_same_key_apply_once", None),
];

/// Runs the request/reply case `name` against a bus from `bus` and a store from `store`
/// (on its own Tokio runtime, in a fresh temp dir: the bus under `bus/`, the store under
/// `store/`).
pub fn run_reply<B: BusFactory, S: StoreFactory>(bus: &B, store: &S, name: &str) {
    run_paired(REPLY_CASES, "reply", bus, store, name, |dir| async move {
        reply_cases::dispatch(bus, store, name, &dir).await
    });
}

/// Checks that [`reply_suite!`] generated a test for every case of [`REPLY_CASES`] and
/// prints the gaps that keep reply cases from running (called by the generated
/// `reply_declared_gaps` test).
#[doc(hidden)]
pub fn assert_reply_cases_generated(generated: &[&str]) {
    let listed: Vec<&str> = REPLY_CASES.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        generated, listed,
        "reply_suite! must generate one test per entry of REPLY_CASES, in the same order"
    );
    if REPLY_CASES.iter().all(|(_, c)| c.is_none()) {
        println!("no reply case needs a capability: every reply case runs on every backend");
    }
}

/// Generates one `#[test]` per request/reply conformance case for a [`BusFactory`]
/// expression and a [`StoreFactory`] expression, plus `reply_declared_gaps`.
#[macro_export]
macro_rules! reply_suite {
    ($bus:expr, $store:expr) => {
        $crate::reply_suite!(@cases $bus, $store;
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
            concurrent_requests_with_the_same_key_apply_once
        );
    };
    (@cases $bus:expr, $store:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::run_reply(&$bus, &$store, stringify!($case));
            }
        )*
        #[test]
        fn reply_declared_gaps() {
            $crate::assert_reply_cases_generated(&[$(stringify!($case)),*]);
        }
    };
}

/// Every case of the saga suite with the capability it needs.
pub const SAGA_CASES: &[(&str, Option<Capability>)] = &[
    ("a_saga_runs_every_step_in_order_and_completes", None),
    (
        "a_failure_at_each_step_compensates_exactly_the_completed_steps_in_reverse",
        None,
    ),
    ("retries_timeouts_and_panics_follow_the_step_policy", None),
    ("a_compensation_that_fails_three_times_then_succeeds", None),
    (
        "a_compensation_that_never_succeeds_needs_attention_until_an_operator_retries_it",
        None,
    ),
    (
        "starting_twice_with_one_id_starts_once_and_bad_starts_are_refused",
        None,
    ),
    (
        "thousands_of_sagas_run_concurrently_within_max_active",
        None,
    ),
    (
        "unfinished_sagas_resume_after_a_restart",
        Some(Capability::Reopen),
    ),
    (
        "a_crash_at_every_transition_point_ends_each_saga_once",
        Some(Capability::CrashSafe),
    ),
];

/// Runs the saga case `name` against `factory` (on its own Tokio runtime, in a fresh
/// temp dir); crash cases re-run the test binary as `child_entry`.
pub fn run_saga<F: StoreFactory>(factory: &F, name: &str, child_entry: &str) {
    run_on_store(SAGA_CASES, "saga", factory, name, |dir| async move {
        saga_cases::dispatch(factory, name, &dir, child_entry).await
    });
}

/// The libtest name of the `saga_conformance_child` test generated in `module`.
pub fn saga_child_test_name(module: &str) -> String {
    entry_test_name(module, "saga_conformance_child")
}

/// Checks that [`saga_suite!`] generated a test for every case of [`SAGA_CASES`] and
/// prints the store's gaps that keep saga cases from running.
#[doc(hidden)]
pub fn assert_saga_cases_generated<F: StoreFactory>(factory: &F, generated: &[&str]) {
    let listed: Vec<&str> = SAGA_CASES.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        generated, listed,
        "saga_suite! must generate one test per entry of SAGA_CASES, in the same order"
    );
    let caps = factory.capabilities();
    let mut none = true;
    for (cap, reason) in &caps.missing {
        let cases: Vec<_> = SAGA_CASES
            .iter()
            .filter(|(_, c)| *c == Some(*cap))
            .map(|(n, _)| *n)
            .collect();
        if !cases.is_empty() {
            none = false;
            println!(
                "gap {cap:?}: {reason} (saga cases not run: {})",
                cases.join(", ")
            );
        }
    }
    if none {
        println!("this store declares no gap a saga case needs: every saga case runs");
    }
}

/// Generates one `#[test]` per saga conformance case for a [`StoreFactory`] expression,
/// plus `saga_declared_gaps` and the `saga_conformance_child` entry of the crash case.
#[macro_export]
macro_rules! saga_suite {
    ($store:expr) => {
        $crate::saga_suite!(@cases $store;
            a_saga_runs_every_step_in_order_and_completes,
            a_failure_at_each_step_compensates_exactly_the_completed_steps_in_reverse,
            retries_timeouts_and_panics_follow_the_step_policy,
            a_compensation_that_fails_three_times_then_succeeds,
            a_compensation_that_never_succeeds_needs_attention_until_an_operator_retries_it,
            starting_twice_with_one_id_starts_once_and_bad_starts_are_refused,
            thousands_of_sagas_run_concurrently_within_max_active,
            unfinished_sagas_resume_after_a_restart,
            a_crash_at_every_transition_point_ends_each_saga_once
        );
    };
    (@cases $store:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::run_saga(
                    &$store,
                    stringify!($case),
                    &$crate::saga_child_test_name(module_path!()),
                );
            }
        )*
        #[test]
        fn saga_declared_gaps() {
            $crate::assert_saga_cases_generated(&$store, &[$(stringify!($case)),*]);
        }
        #[test]
        fn saga_conformance_child() {
            $crate::saga_child_entry(&$store);
        }
    };
}
