//! Saga definitions: typed input, typed step outputs, actions and compensations.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Json;
use crate::bus::RedeliveryPolicy;

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
pub(crate) type ActionFn<I> =
    Arc<dyn Fn(StepContext<I>) -> BoxFuture<Result<Json, StepError>> + Send + Sync>;
pub(crate) type CompensationFn<I> =
    Arc<dyn Fn(StepContext<I>, Json) -> BoxFuture<Result<(), StepError>> + Send + Sync>;

/// Why an action or compensation did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// Worth another attempt (a timeout, an unavailable callee); retried per the step's
    /// policy.
    #[error("retryable: {0}")]
    Retryable(String),
    /// Final: retrying cannot help (a declined payment, an invalid input). An action
    /// failing this way fails its step at once; a compensation failing this way parks
    /// the saga for an operator.
    #[error("failed: {0}")]
    Failed(String),
}

impl StepError {
    /// A failure worth retrying.
    pub fn retryable(reason: impl fmt::Display) -> Self {
        StepError::Retryable(reason.to_string())
    }

    /// A final failure.
    pub fn failed(reason: impl fmt::Display) -> Self {
        StepError::Failed(reason.to_string())
    }

    /// The reason, without the kind.
    pub fn reason(&self) -> &str {
        match self {
            StepError::Retryable(r) | StepError::Failed(r) => r,
        }
    }
}

impl From<crate::Error> for StepError {
    /// Store and bus errors are worth retrying, except invalid input.
    fn from(e: crate::Error) -> Self {
        match e.kind() {
            crate::ErrorKind::InvalidInput => StepError::Failed(e.to_string()),
            _ => StepError::Retryable(e.to_string()),
        }
    }
}

/// Which half of a step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The forward action.
    Action,
    /// The compensation (undo).
    Compensation,
}

impl Phase {
    /// `action` or `compensation`, as in idempotency keys.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Action => "action",
            Phase::Compensation => "compensation",
        }
    }
}

/// How one action or compensation is attempted: a timeout per attempt, and how often
/// and how far apart it is retried.
#[derive(Debug, Clone, PartialEq)]
pub struct StepPolicy {
    /// Longest one attempt may take; past it the attempt counts as a retryable failure.
    pub timeout: Duration,
    /// Attempts and backoff between them (`max_attempts` includes the first).
    pub retry: RedeliveryPolicy,
}

impl StepPolicy {
    /// The default for actions: 10 s per attempt, 3 attempts, 100 ms backoff doubling
    /// to 2 s.
    pub fn action() -> Self {
        StepPolicy {
            timeout: Duration::from_secs(10),
            retry: RedeliveryPolicy {
                max_attempts: 3,
                initial_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(2),
                multiplier: 2.0,
                jitter: 0.2,
            },
        }
    }

    /// The default for compensations: 10 s per attempt, 10 attempts, 200 ms backoff
    /// doubling to 30 s (about two and a half minutes in all) before the saga needs
    /// attention.
    pub fn compensation() -> Self {
        StepPolicy {
            timeout: Duration::from_secs(10),
            retry: RedeliveryPolicy {
                max_attempts: 10,
                initial_backoff: Duration::from_millis(200),
                max_backoff: Duration::from_secs(30),
                multiplier: 2.0,
                jitter: 0.2,
            },
        }
    }

    /// This policy with `n` attempts.
    pub fn attempts(mut self, n: u32) -> Self {
        self.retry.max_attempts = n.max(1);
        self
    }

    /// This policy with `timeout` per attempt.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// This policy with backoff from `initial` up to `max`.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.retry.initial_backoff = initial;
        self.retry.max_backoff = max.max(initial);
        self
    }
}

/// What an action or compensation knows about its saga.
pub struct StepContext<I> {
    pub(crate) saga_id: Arc<str>,
    pub(crate) saga: Arc<str>,
    pub(crate) step: usize,
    pub(crate) step_names: Arc<[String]>,
    pub(crate) phase: Phase,
    pub(crate) attempt: u32,
    pub(crate) deadline: Instant,
    pub(crate) input: Arc<I>,
    pub(crate) outputs: Arc<[Option<Json>]>,
}

impl<I> Clone for StepContext<I> {
    fn clone(&self) -> Self {
        StepContext {
            saga_id: self.saga_id.clone(),
            saga: self.saga.clone(),
            step: self.step,
            step_names: self.step_names.clone(),
            phase: self.phase,
            attempt: self.attempt,
            deadline: self.deadline,
            input: self.input.clone(),
            outputs: self.outputs.clone(),
        }
    }
}

impl<I> fmt::Debug for StepContext<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepContext")
            .field("saga_id", &self.saga_id)
            .field("step", &self.step_name())
            .field("phase", &self.phase)
            .field("attempt", &self.attempt)
            .finish()
    }
}

impl<I> StepContext<I> {
    /// The saga's id.
    pub fn saga_id(&self) -> &str {
        &self.saga_id
    }

    /// The saga definition's name.
    pub fn saga(&self) -> &str {
        &self.saga
    }

    /// This step's name.
    pub fn step_name(&self) -> &str {
        self.step_names
            .get(self.step)
            .map(String::as_str)
            .unwrap_or("")
    }

    /// This step's index (0-based).
    pub fn step_index(&self) -> usize {
        self.step
    }

    /// Action or compensation.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The attempt, from 1 (restarts at 1 after a crash).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// When this attempt times out; pass it on to callees as their deadline.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// `<saga id>/<step>/<phase>`: the same on every attempt and after a crash. Pass it
    /// to the callee so it applies the effect once.
    pub fn idempotency_key(&self) -> String {
        format!(
            "{}/{}/{}",
            self.saga_id,
            self.step_name(),
            self.phase.as_str()
        )
    }

    /// The saga's input.
    pub fn input(&self) -> &I {
        &self.input
    }

    /// The output of the earlier step `step` (completed steps only), decoded as `T`.
    pub fn output<T: DeserializeOwned>(&self, step: &str) -> Result<T, StepError> {
        let index = self
            .step_names
            .iter()
            .position(|n| n == step)
            .ok_or_else(|| StepError::failed(format!("this saga has no step `{step}`")))?;
        let value = self
            .outputs
            .get(index)
            .and_then(Option::as_ref)
            .ok_or_else(|| StepError::failed(format!("step `{step}` has no output yet")))?;
        value.decode().map_err(|e| {
            StepError::failed(format!(
                "the output of step `{step}` does not decode as {}: {e}",
                std::any::type_name::<T>()
            ))
        })
    }
}

/// One step: a named action with an optional compensation, over input `I` and output `O`.
pub struct Step<I, O> {
    pub(crate) name: String,
    pub(crate) action: ActionFn<I>,
    pub(crate) compensation: Option<CompensationFn<I>>,
    pub(crate) policy: Option<StepPolicy>,
    pub(crate) compensation_policy: Option<StepPolicy>,
    _output: std::marker::PhantomData<fn() -> O>,
}

impl<I, O> Step<I, O>
where
    I: Send + Sync + 'static,
    O: Serialize + DeserializeOwned + Send + 'static,
{
    /// A step named `name` (unique within its saga) whose action returns `O`.
    pub fn new<F, Fut>(name: &str, action: F) -> Self
    where
        F: Fn(StepContext<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, StepError>> + Send + 'static,
    {
        let action: ActionFn<I> = Arc::new(move |cx| {
            let fut = action(cx);
            Box::pin(async move {
                let out = fut.await?;
                Json::encode(&out).map_err(|e| {
                    StepError::failed(format!(
                        "the step's output does not encode as JSON: {e}; the action's effect \
                         must be undone by hand"
                    ))
                })
            })
        });
        Step {
            name: name.to_string(),
            action,
            compensation: None,
            policy: None,
            compensation_policy: None,
            _output: std::marker::PhantomData,
        }
    }

    /// Undoes the action, given its output; run (in reverse order) when a later step
    /// fails for good.
    pub fn compensate<F, Fut>(mut self, compensation: F) -> Self
    where
        F: Fn(StepContext<I>, O) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), StepError>> + Send + 'static,
    {
        let compensation = Arc::new(compensation);
        self.compensation = Some(Arc::new(move |cx, value| {
            let compensation = compensation.clone();
            Box::pin(async move {
                let output: O = value.decode().map_err(|e| {
                    StepError::failed(format!("the recorded output does not decode: {e}"))
                })?;
                compensation(cx, output).await
            })
        }));
        self
    }

    /// The action's timeout and retries (default: the orchestrator's action policy).
    pub fn policy(mut self, policy: StepPolicy) -> Self {
        self.policy = Some(policy);
        self
    }

    /// The compensation's timeout and retries (default: the orchestrator's compensation
    /// policy).
    pub fn compensation_policy(mut self, policy: StepPolicy) -> Self {
        self.compensation_policy = Some(policy);
        self
    }
}

/// A step with its output type erased.
pub(crate) struct StepDef<I> {
    pub(crate) name: String,
    pub(crate) action: ActionFn<I>,
    pub(crate) compensation: Option<CompensationFn<I>>,
    pub(crate) policy: Option<StepPolicy>,
    pub(crate) compensation_policy: Option<StepPolicy>,
}

/// A saga definition: a name and its steps in order, over input `I`.
pub struct Saga<I> {
    pub(crate) name: String,
    pub(crate) steps: Vec<StepDef<I>>,
}

impl<I> fmt::Debug for Saga<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Saga")
            .field("name", &self.name)
            .field(
                "steps",
                &self.steps.iter().map(|s| &s.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl<I> Saga<I>
where
    I: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// An empty saga named `name` (unique within the orchestrator).
    pub fn new(name: &str) -> Self {
        Saga {
            name: name.to_string(),
            steps: Vec::new(),
        }
    }

    /// Appends a step.
    #[allow(clippy::should_implement_trait)]
    pub fn step<O>(mut self, step: Step<I, O>) -> Self
    where
        O: Serialize + DeserializeOwned + Send + 'static,
    {
        self.steps.push(StepDef {
            name: step.name,
            action: step.action,
            compensation: step.compensation,
            policy: step.policy,
            compensation_policy: step.compensation_policy,
        });
        self
    }

    /// The saga's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}
