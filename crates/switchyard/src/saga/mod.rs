//! Saga orchestration: a named list of steps, each an action and an optional
//! compensation, driven durably by an [`Orchestrator`] over the service's own store.
//!
//! # What is guaranteed
//!
//! - **Every transition is committed before the next action starts**: started, step done
//!   (with its output), step failed, compensating, step compensated, completed,
//!   compensated, needs attention. A crash at any point resumes from the last committed
//!   transition when the orchestrator runs again ([`Orchestrator::run`] resumes every
//!   unfinished saga first).
//! - **Idempotency keys.** Each action and compensation gets a key that is the same on
//!   every attempt and after a crash: `<saga id>/<step>/<phase>`
//!   ([`StepContext::idempotency_key`]). Pass it to the callee (an `Idempotency-Key`
//!   header, a request/reply idempotency key, an inbox id) so that a repeated action is
//!   applied once at its target. Resuming after a crash repeats the action that was in
//!   flight; only the key makes that safe.
//! - **Retries and timeouts per step** ([`StepPolicy`]): each attempt runs under the
//!   step's timeout; retryable failures are retried with backoff and jitter; a
//!   [`StepError::Failed`] (a business "no") is final at once.
//! - **Compensation in exact reverse order.** When a step fails for good, the
//!   compensations of the steps that completed run last-to-first (steps without a
//!   compensation are passed over). A compensation is retried with backoff; past its
//!   limit the saga is parked in [`SagaState::NeedsAttention`] with the error, stays
//!   visible, and an operator can [`retry`](Orchestrator::retry) it. Nothing is
//!   dropped silently.
//! - **Bounded memory.** At most `max_active` sagas are driven at once; the rest wait as
//!   ids, their state in the store.
//! - **Visibility.** [`Orchestrator::get`] (one saga with its full history: timings,
//!   attempts, errors), [`Orchestrator::list`] (by state), [`Orchestrator::counts`].
//!
//! An action must leave no effect when it fails for good (the target applies it
//! atomically, keyed by the idempotency key); the compensation of a step that completed
//! gets that step's output.
//!
//! ```
//! use std::sync::Arc;
//! use switchyard::saga::{Orchestrator, Saga, SagaState, Step, StepContext, StepError};
//! use switchyard::store::{MemoryStore, Store};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Order { id: String, cents: u64 }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> switchyard::Result<()> {
//! let place_order = Saga::<Order>::new("place_order")
//!     .step(
//!         Step::new("reserve", |cx: StepContext<Order>| async move {
//!             // call the inventory service with cx.idempotency_key() ...
//!             Ok::<_, StepError>(format!("res-{}", cx.input().id))
//!         })
//!         .compensate(|_cx, reservation: String| async move {
//!             let _ = reservation; // release it
//!             Ok(())
//!         }),
//!     )
//!     .step(Step::new("charge", |cx: StepContext<Order>| async move {
//!         Ok::<_, StepError>(cx.input().cents)
//!     }));
//! let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
//! let orchestrator = Orchestrator::builder("order", store).saga(place_order).build()?;
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let running = tokio::spawn(orchestrator.clone().run(async move { let _ = stopped.await; }));
//!
//! let id = orchestrator.start("place_order", &Order { id: "o-1".into(), cents: 990 }).await?;
//! let done = orchestrator.wait(&id).await?;
//! assert_eq!(done.state, SagaState::Completed);
//! let charged: u64 = done.steps[1].output.as_ref().expect("charged").decode().expect("a number");
//! assert_eq!(charged, 990);
//! let _ = stop.send(());
//! running.await.expect("orchestrator task")?;
//! # Ok(()) }
//! ```

mod def;
mod machine;
mod orchestrator;

pub use def::{Phase, Saga, Step, StepContext, StepError, StepPolicy};
pub use orchestrator::{Orchestrator, OrchestratorBuilder, Started};

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::envelope::Timestamp;

/// A JSON document kept as its text: saga inputs and step outputs are opaque to the
/// orchestrator, and a saga in flight should cost little memory.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Json(Box<serde_json::value::RawValue>);

impl Json {
    /// `value` as JSON.
    pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Json, serde_json::Error> {
        serde_json::value::to_raw_value(value).map(Json)
    }

    /// The document decoded as `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.0.get())
    }

    /// `null`.
    pub fn null() -> Json {
        Json(serde_json::value::RawValue::NULL.to_owned())
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for Json {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl fmt::Debug for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a saga is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaState {
    /// Running its actions forward.
    Running,
    /// A step failed for good; compensating the completed steps in reverse order.
    Compensating,
    /// Every step completed. Terminal.
    Completed,
    /// Every completed step was compensated. Terminal.
    Compensated,
    /// Stopped with an error an operator must look at (a compensation that kept
    /// failing, an input that no longer decodes, a saga this service no longer knows);
    /// [`Orchestrator::retry`] continues it.
    NeedsAttention,
}

impl SagaState {
    /// Every state, in lifecycle order.
    pub const ALL: [SagaState; 5] = [
        SagaState::Running,
        SagaState::Compensating,
        SagaState::Completed,
        SagaState::Compensated,
        SagaState::NeedsAttention,
    ];

    /// The state's name as stored and shown (`running`, `needs_attention`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            SagaState::Running => "running",
            SagaState::Compensating => "compensating",
            SagaState::Completed => "completed",
            SagaState::Compensated => "compensated",
            SagaState::NeedsAttention => "needs_attention",
        }
    }

    /// True for `completed` and `compensated`: nothing more will happen.
    pub fn is_terminal(self) -> bool {
        matches!(self, SagaState::Completed | SagaState::Compensated)
    }

    /// True when the orchestrator has nothing to do until someone acts: terminal, or
    /// waiting for an operator.
    pub fn is_settled(self) -> bool {
        self.is_terminal() || self == SagaState::NeedsAttention
    }
}

impl fmt::Display for SagaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a step has been through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not run yet (or in flight).
    Pending,
    /// The action completed; its output is recorded.
    Done,
    /// The action failed for good.
    Failed,
    /// The action completed and was compensated.
    Compensated,
}

/// One step of one saga as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The step's name in the definition.
    pub name: String,
    /// Where the step is.
    pub status: StepStatus,
    /// The action's output (JSON), once done.
    pub output: Option<Json>,
    /// Attempts the action took (the last run, after a crash the count restarts).
    pub attempts: u32,
    /// Attempts the compensation took so far.
    pub compensation_attempts: u32,
}

/// What happened at one transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransitionKind {
    /// The saga was started with its input.
    Started,
    /// A step's action completed; its output was recorded.
    StepDone,
    /// A step's action failed for good.
    StepFailed,
    /// Compensation of a step is next.
    Compensating,
    /// A step's compensation completed.
    StepCompensated,
    /// Every step completed.
    Completed,
    /// Every completed step was compensated.
    Compensated,
    /// The saga stopped for an operator.
    NeedsAttention,
    /// An operator retried a saga that needed attention.
    Retried,
}

/// One committed transition of a saga's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    /// Wall-clock time of the commit.
    pub at: Timestamp,
    /// What happened.
    pub kind: TransitionKind,
    /// The step it concerns (index into [`SagaRecord::steps`]).
    pub step: Option<usize>,
    /// Attempts the action or compensation took.
    pub attempts: u32,
    /// Time the action or compensation took, all attempts and backoffs included (µs).
    pub took_us: u64,
    /// The error, for failures.
    pub error: Option<String>,
}

/// A saga as stored: its definition name, input, per-step outputs, state and full
/// history. What [`Orchestrator::get`] and [`Orchestrator::list`] return.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaRecord {
    /// The saga's id (unique in the orchestrating service's store).
    pub id: String,
    /// The definition's name.
    pub saga: String,
    /// Where it is.
    pub state: SagaState,
    /// The input (JSON).
    pub input: Json,
    /// One entry per step of the definition, in order.
    pub steps: Vec<StepRecord>,
    /// While running: the next step to run. While compensating: one past the step being
    /// compensated (so `0` means nothing is left to compensate).
    pub cursor: usize,
    /// The state to continue in when an operator retries a saga that needs attention.
    pub resume: Option<SagaState>,
    /// The latest failure (the step failure that started compensation, or why it needs
    /// attention).
    pub error: Option<String>,
    /// Every committed transition, oldest first.
    pub history: Vec<Transition>,
    /// When it was started.
    pub created_at: Timestamp,
    /// When its last transition was committed.
    pub updated_at: Timestamp,
}

/// How many sagas are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaCounts {
    /// Running forward.
    pub running: u64,
    /// Compensating.
    pub compensating: u64,
    /// Completed.
    pub completed: u64,
    /// Compensated.
    pub compensated: u64,
    /// Waiting for an operator.
    pub needs_attention: u64,
}

impl SagaCounts {
    /// The count for `state`.
    pub fn get(&self, state: SagaState) -> u64 {
        match state {
            SagaState::Running => self.running,
            SagaState::Compensating => self.compensating,
            SagaState::Completed => self.completed,
            SagaState::Compensated => self.compensated,
            SagaState::NeedsAttention => self.needs_attention,
        }
    }

    fn slot(&mut self, state: SagaState) -> &mut u64 {
        match state {
            SagaState::Running => &mut self.running,
            SagaState::Compensating => &mut self.compensating,
            SagaState::Completed => &mut self.completed,
            SagaState::Compensated => &mut self.compensated,
            SagaState::NeedsAttention => &mut self.needs_attention,
        }
    }

    /// Sagas not yet settled (running or compensating).
    pub fn in_flight(&self) -> u64 {
        self.running + self.compensating
    }
}
