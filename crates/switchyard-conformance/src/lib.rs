//! # switchyard-conformance
//!
//! The one conformance suite of the bus contract, written once and run by every backend.
//! A backend's `tests/` file is a constructor and nothing else:
//!
//! ```ignore
//! struct Factory;
//! impl switchyard_conformance::BusFactory for Factory { /* open(dir, settings) */ }
//! switchyard_conformance::bus_suite!(Factory);
//! ```
//!
//! Each case becomes its own `#[test]`. A case needs a [`Capability`] the backend
//! declares missing prints `NOT SUPPORTED by this backend: <reason>` and passes; the
//! `declared_gaps` test prints every gap with its reason, so nothing is skipped silently.
//! Crash cases re-run the test binary as a child process (the `conformance_child`
//! test) and kill it with SIGKILL by pid.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cases;
mod child;

use std::path::Path;
use std::time::Duration;

use switchyard::{Bus, Capability};

pub use child::child_entry;

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
];

/// Runs the case `name` against `factory` (on its own Tokio runtime, in a fresh temp dir).
pub fn run<F: BusFactory>(factory: &F, name: &str) {
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
        tokio::time::timeout(limit, cases::dispatch(factory, name, dir.path()))
            .await
            .unwrap_or_else(|_| panic!("case `{name}` did not finish within {limit:?}"));
    });
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
            backlog_of_1m_with_bounded_memory
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
                $crate::run(&$factory, stringify!($case));
            }
        )*
    };
}
