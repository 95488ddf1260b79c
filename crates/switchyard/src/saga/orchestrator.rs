//! The orchestrator: starts sagas, drives them (bounded concurrency), persists every
//! transition, resumes unfinished ones, and answers visibility queries.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::Instrument;

use super::def::{BoxFuture, Phase, Saga, StepContext, StepError, StepPolicy};
use super::machine::{self, Next, Outcome};
use super::{Json, SagaCounts, SagaRecord, SagaState};
use crate::envelope::{MessageId, Timestamp};
use crate::error::{Error, Result};
use crate::store::{Expectation, Store, Write, WriteBatch};

/// Table of saga records, keyed by saga id.
const SAGAS: &str = "sagas";
/// Index of sagas by state: key `<state>/<id>`, value `null`.
const INDEX: &str = "saga_index";

/// Transitions committed at once by one orchestrator: enough to fill the store's group
/// commits, few enough that a burst holds no more than this many encoded batches.
const MAX_COMMITS_IN_FLIGHT: usize = 1024;

type Observer = Arc<dyn Fn(&SagaRecord) + Send + Sync>;

/// Configures and builds an [`Orchestrator`].
pub struct OrchestratorBuilder {
    service: String,
    store: Arc<dyn Store>,
    sagas: Vec<Arc<dyn Driver>>,
    max_active: usize,
    action_policy: StepPolicy,
    compensation_policy: StepPolicy,
    observer: Option<Observer>,
}

impl OrchestratorBuilder {
    /// Registers a saga definition (names must be unique).
    pub fn saga<I>(mut self, saga: Saga<I>) -> Self
    where
        I: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        let names: Arc<[String]> = saga.steps.iter().map(|s| s.name.clone()).collect();
        let compensable = saga
            .steps
            .iter()
            .map(|s| s.compensation.is_some())
            .collect();
        self.sagas.push(Arc::new(Typed {
            name: saga.name.as_str().into(),
            names,
            compensable,
            saga,
        }));
        self
    }

    /// At most `n` sagas are driven at once (default 10,000); the others wait as ids,
    /// their state in the store.
    pub fn max_active(mut self, n: usize) -> Self {
        self.max_active = n.max(1);
        self
    }

    /// The policy of actions that set none (default [`StepPolicy::action`]).
    pub fn action_policy(mut self, policy: StepPolicy) -> Self {
        self.action_policy = policy;
        self
    }

    /// The policy of compensations that set none (default [`StepPolicy::compensation`]).
    pub fn compensation_policy(mut self, policy: StepPolicy) -> Self {
        self.compensation_policy = policy;
        self
    }

    /// Calls `f` after every committed transition (with the saga as committed), before
    /// the next action starts: for metrics, timelines, tests.
    pub fn on_transition(mut self, f: impl Fn(&SagaRecord) + Send + Sync + 'static) -> Self {
        self.observer = Some(Arc::new(f));
        self
    }

    /// The orchestrator; fails on duplicate saga or step names.
    pub fn build(self) -> Result<Orchestrator> {
        let mut defs = HashMap::new();
        for saga in self.sagas {
            let names = saga.step_names();
            for (i, n) in names.iter().enumerate() {
                if n.is_empty() || names[..i].contains(n) {
                    return Err(Error::InvalidArgument(format!(
                        "saga `{}`: step names must be unique and non-empty (`{n}`)",
                        saga.name()
                    )));
                }
            }
            let name = saga.name().to_string();
            if name.is_empty() || defs.insert(name.clone(), saga).is_some() {
                return Err(Error::InvalidArgument(format!(
                    "saga names must be unique and non-empty (`{name}`)"
                )));
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        Ok(Orchestrator {
            inner: Arc::new(Inner {
                service: self.service,
                store: self.store,
                defs,
                max_active: self.max_active,
                action_policy: self.action_policy,
                compensation_policy: self.compensation_policy,
                observer: self.observer,
                queue: tx,
                queue_rx: Mutex::new(Some(rx)),
                active: Mutex::new(HashMap::new()),
                waiters: Mutex::new(HashMap::new()),
                commit_permits: Semaphore::new(MAX_COMMITS_IN_FLIGHT),
            }),
        })
    }
}

/// Starts, drives, resumes and shows sagas of one service. Cheap to clone.
///
/// Build it with [`Orchestrator::builder`], keep [`run`](Self::run) running (it
/// resumes unfinished sagas first), and [`start`](Self::start) sagas from anywhere.
/// See the [module docs](super) for the guarantees.
#[derive(Clone)]
pub struct Orchestrator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator")
            .field("service", &self.inner.service)
            .field("sagas", &self.inner.defs.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The result of [`Orchestrator::start_with_id`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// The saga's id.
    pub id: String,
    /// False when a saga with this id existed already (nothing was started).
    pub created: bool,
}

struct Inner {
    service: String,
    store: Arc<dyn Store>,
    defs: HashMap<String, Arc<dyn Driver>>,
    max_active: usize,
    action_policy: StepPolicy,
    compensation_policy: StepPolicy,
    observer: Option<Observer>,
    queue: mpsc::UnboundedSender<String>,
    queue_rx: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    /// Sagas queued or being driven; `true` asks for another pass when the current one ends.
    active: Mutex<HashMap<String, bool>>,
    waiters: Mutex<HashMap<String, Vec<oneshot::Sender<SagaRecord>>>>,
    /// Transitions being committed at once (see [`Inner::persist`]).
    commit_permits: Semaphore,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn index_key(state: SagaState, id: &str) -> String {
    format!("{}/{id}", state.as_str())
}

fn decode(id: &str, bytes: &[u8]) -> Result<SagaRecord> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::storage(format!("decoding saga {id} (table `{SAGAS}`)"), e))
}

fn encode(rec: &SagaRecord) -> Result<Bytes> {
    serde_json::to_vec(rec)
        .map(Bytes::from)
        .map_err(|e| Error::storage(format!("encoding saga {}", rec.id), e))
}

fn validate_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 200 || id.chars().any(char::is_control) {
        return Err(Error::InvalidArgument(format!(
            "saga id `{id}` must be 1 to 200 characters without control characters"
        )));
    }
    Ok(())
}

/// A saga row as this driver last wrote it, by hash and length: enough to tell whether
/// someone else wrote since, without keeping the bytes of every saga in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint(u64, usize);

impl Fingerprint {
    fn of(bytes: &[u8]) -> Self {
        use std::hash::Hasher;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        h.write(bytes);
        Fingerprint(h.finish(), bytes.len())
    }
}

/// Why a transition could not be committed.
enum PersistError {
    /// Another driver (another instance, an operator) changed the saga: stop driving it.
    Lost(String),
    /// The store failed; try again.
    Storage(Error),
}

impl Inner {
    /// Queues `id` for driving unless it is queued or driven already (then asks the
    /// current pass to look again when it ends).
    fn enqueue(&self, id: &str) {
        let mut active = lock(&self.active);
        match active.entry(id.to_string()) {
            Entry::Occupied(mut e) => {
                e.insert(true);
            }
            Entry::Vacant(e) => {
                e.insert(false);
                let _ = self.queue.send(id.to_string());
            }
        }
    }

    /// The pass over `id` ended: forget it, or queue it again if asked meanwhile.
    fn finished(&self, id: &str) {
        let mut active = lock(&self.active);
        match active.get_mut(id) {
            Some(again) if *again => {
                *again = false;
                let _ = self.queue.send(id.to_string());
            }
            _ => {
                active.remove(id);
            }
        }
    }

    fn observe(&self, rec: &SagaRecord) {
        if let Some(observer) = &self.observer {
            observer(rec);
        }
        if rec.state.is_settled() {
            let waiters = lock(&self.waiters).remove(&rec.id);
            for w in waiters.into_iter().flatten() {
                let _ = w.send(rec.clone());
            }
        }
    }

    async fn load(&self, id: &str) -> Result<Option<(SagaRecord, Fingerprint)>> {
        match self.store.get_raw(SAGAS, id).await? {
            Some(row) => Ok(Some((decode(id, &row.value)?, Fingerprint::of(&row.value)))),
            None => Ok(None),
        }
    }

    /// Commits `rec` (whose state was `before`) over the version this driver wrote last.
    async fn try_persist(
        &self,
        rec: &SagaRecord,
        before: SagaState,
        bytes: &Bytes,
        last: Fingerprint,
    ) -> std::result::Result<(), PersistError> {
        let row = self
            .store
            .get_raw(SAGAS, &rec.id)
            .await
            .map_err(PersistError::Storage)?;
        let version = match row {
            Some(row) if Fingerprint::of(&row.value) == last => row.version,
            // A previous attempt of this very commit landed after reporting an error.
            Some(row) if row.value == *bytes => return Ok(()),
            Some(_) => {
                return Err(PersistError::Lost(
                    "the saga was changed by someone else".into(),
                ));
            }
            None => return Err(PersistError::Lost("the saga was removed".into())),
        };
        let mut batch = WriteBatch {
            expect: vec![Expectation {
                table: SAGAS.into(),
                key: rec.id.clone(),
                version: Some(version),
            }],
            ..Default::default()
        };
        batch.writes.push(Write::Put {
            table: SAGAS.into(),
            key: rec.id.clone(),
            value: bytes.clone(),
        });
        if before != rec.state {
            batch.writes.push(Write::Delete {
                table: INDEX.into(),
                key: index_key(before, &rec.id),
            });
            batch.writes.push(Write::Put {
                table: INDEX.into(),
                key: index_key(rec.state, &rec.id),
                value: Bytes::from_static(b"null"),
            });
        }
        match self.store.commit(batch).await {
            Ok(()) => Ok(()),
            Err(Error::Conflict { .. }) => Err(PersistError::Lost(
                "the saga was changed by someone else while committing".into(),
            )),
            Err(e) => Err(PersistError::Storage(e)),
        }
    }

    /// Commits the transition, retrying store failures with backoff; false when this
    /// driver lost the saga and must stop. Callers hold one of `commit_permits`.
    async fn persist(&self, rec: &SagaRecord, before: SagaState, last: &mut Fingerprint) -> bool {
        let bytes = match encode(rec) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(saga = %rec.id, error = %e, "cannot encode the saga; it stays at its last transition");
                return false;
            }
        };
        let mut delay = Duration::from_millis(10);
        loop {
            match self.try_persist(rec, before, &bytes, *last).await {
                Ok(()) => {
                    *last = Fingerprint::of(&bytes);
                    self.observe(rec);
                    return true;
                }
                Err(PersistError::Lost(why)) => {
                    tracing::warn!(saga = %rec.id, "{why}; this orchestrator stops driving it");
                    return false;
                }
                Err(PersistError::Storage(e)) => {
                    tracing::warn!(saga = %rec.id, error = %e, retry_in = ?delay, "committing a saga transition failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// One pass over saga `id`: drive it until it settles (or this driver loses it).
    async fn drive(self: Arc<Self>, id: String) {
        match self.load(&id).await {
            Ok(Some((rec, bytes))) if !rec.state.is_settled() => {
                match self.defs.get(&rec.saga).cloned() {
                    Some(def) => def.drive(self.clone(), rec, bytes).await,
                    None => {
                        let why = format!(
                            "no saga named `{}` is registered in service `{}`; register it and retry",
                            rec.saga, self.service
                        );
                        Box::pin(self.park(rec, bytes, why)).await;
                    }
                }
            }
            Ok(Some((rec, _))) => self.observe_settled(&rec),
            Ok(None) => tracing::warn!(saga = %id, "queued saga not found in the store"),
            Err(e) => {
                tracing::error!(saga = %id, error = %e, "cannot load the saga; it resumes on the next start")
            }
        }
        self.finished(&id);
    }

    /// Reads saga `id` back after an action, if it is still as this driver left it;
    /// `None` when someone else changed it (this driver stops).
    async fn reload(&self, id: &str, last: Fingerprint) -> Option<SagaRecord> {
        let mut delay = Duration::from_millis(10);
        loop {
            match self.store.get_raw(SAGAS, id).await {
                Ok(Some(row)) if Fingerprint::of(&row.value) == last => {
                    return match decode(id, &row.value) {
                        Ok(rec) => Some(rec),
                        Err(e) => {
                            tracing::error!(saga = %id, error = %e, "cannot decode the saga; it resumes on the next start");
                            None
                        }
                    };
                }
                Ok(_) => {
                    tracing::warn!(saga = %id, "the saga was changed by someone else; this orchestrator stops driving it");
                    return None;
                }
                Err(e) => {
                    tracing::warn!(saga = %id, error = %e, retry_in = ?delay, "reading the saga failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    fn observe_settled(&self, rec: &SagaRecord) {
        let waiters = lock(&self.waiters).remove(&rec.id);
        for w in waiters.into_iter().flatten() {
            let _ = w.send(rec.clone());
        }
    }

    /// Parks a saga for an operator.
    async fn park(&self, mut rec: SagaRecord, mut last: Fingerprint, why: String) {
        tracing::error!(saga = %rec.id, name = %rec.saga, "{why}; the saga needs attention");
        let Ok(_permit) = self.commit_permits.acquire().await else {
            return;
        };
        let before = rec.state;
        machine::needs_attention(&mut rec, why, Timestamp::now());
        self.persist(&rec, before, &mut last).await;
    }
}

/// A registered saga, its input type erased.
trait Driver: Send + Sync {
    fn name(&self) -> &str;
    fn step_names(&self) -> &[String];
    fn drive(
        self: Arc<Self>,
        inner: Arc<Inner>,
        rec: SagaRecord,
        last: Fingerprint,
    ) -> BoxFuture<()>;
}

struct Typed<I> {
    name: Arc<str>,
    names: Arc<[String]>,
    /// Whether each step has a compensation.
    compensable: Vec<bool>,
    saga: Saga<I>,
}

impl<I> Driver for Typed<I>
where
    I: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn step_names(&self) -> &[String] {
        &self.names
    }

    fn drive(
        self: Arc<Self>,
        inner: Arc<Inner>,
        rec: SagaRecord,
        last: Fingerprint,
    ) -> BoxFuture<()> {
        let span =
            tracing::info_span!("saga", service = %inner.service, saga = %self.name, id = %rec.id);
        Box::pin(drive_typed(self, inner, rec, last).instrument(span))
    }
}

async fn drive_typed<I>(
    def: Arc<Typed<I>>,
    inner: Arc<Inner>,
    mut rec: SagaRecord,
    mut last: Fingerprint,
) where
    I: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    let recorded: Vec<&str> = rec.steps.iter().map(|s| s.name.as_str()).collect();
    if recorded != def.names.iter().map(String::as_str).collect::<Vec<_>>() {
        let why = format!(
            "the saga was started with steps {recorded:?} but `{}` now has {:?}; \
             finish it with a build that has the old definition",
            def.name, def.names
        );
        Box::pin(inner.park(rec, last, why)).await;
        return;
    }
    let input: Arc<I> = match rec.input.decode::<I>() {
        Ok(i) => Arc::new(i),
        Err(e) => {
            let why = format!("the saga's input does not decode: {e}");
            Box::pin(inner.park(rec, last, why)).await;
            return;
        }
    };
    let compensable = &def.compensable;
    let saga_id: Arc<str> = rec.id.as_str().into();
    loop {
        let next = machine::next(&rec);
        let (k, phase) = match next {
            Next::Settled => return,
            Next::Action(k) => (k, Phase::Action),
            Next::Compensate(k) => (k, Phase::Compensation),
        };
        let step = &def.saga.steps[k];
        let outputs: Arc<[Option<Json>]> = rec.steps.iter().map(|s| s.output.clone()).collect();
        let context = |attempt: u32, deadline: Instant| StepContext {
            saga_id: saga_id.clone(),
            saga: def.name.clone(),
            step: k,
            step_names: def.names.clone(),
            phase,
            attempt,
            deadline,
            input: input.clone(),
            outputs: outputs.clone(),
        };
        tracing::debug!(step = %step.name, phase = phase.as_str(), "running");
        // While the action runs, the saga's record is not held in memory (a saga in
        // flight costs its futures only); it is read back, and checked to be unchanged,
        // when the outcome is recorded.
        let compensated_output = match phase {
            Phase::Compensation => Some(rec.steps[k].output.clone().unwrap_or_else(Json::null)),
            Phase::Action => None,
        };
        drop(rec);
        let outcome = match compensated_output {
            None => {
                let policy = step.policy.as_ref().unwrap_or(&inner.action_policy);
                let action = step.action.clone();
                let (result, outcome) = attempts(policy, |a, d| (action)(context(a, d))).await;
                StepOutcome::Action(result, outcome)
            }
            Some(output) => {
                let policy = step
                    .compensation_policy
                    .as_ref()
                    .unwrap_or(&inner.compensation_policy);
                let (result, outcome) = match step.compensation.clone() {
                    Some(compensation) => {
                        attempts(policy, |a, d| (compensation)(context(a, d), output.clone())).await
                    }
                    None => (
                        Ok(()),
                        Outcome {
                            attempts: 0,
                            took_us: 0,
                        },
                    ),
                };
                StepOutcome::Compensation(result, outcome)
            }
        };
        drop(outputs);
        // Transitions being recorded are bounded: a burst of sagas finishing their actions
        // at once waits here as small futures, not as records and encoded batches.
        let Ok(_permit) = inner.commit_permits.acquire().await else {
            return;
        };
        rec = match Box::pin(inner.reload(&saga_id, last)).await {
            Some(rec) => rec,
            None => return,
        };
        let before = rec.state;
        let now = Timestamp::now();
        match outcome {
            StepOutcome::Action(Ok(output), outcome) => {
                machine::step_done(&mut rec, k, output, &outcome, now)
            }
            StepOutcome::Action(Err(e), outcome) => {
                tracing::info!(step = %step.name, error = %e, "step failed; compensating");
                machine::step_failed(&mut rec, k, e, &outcome, compensable, now)
            }
            StepOutcome::Compensation(Ok(()), outcome) => {
                machine::compensated(&mut rec, k, &outcome, compensable, now)
            }
            StepOutcome::Compensation(Err(e), outcome) => {
                tracing::error!(step = %step.name, error = %e, "compensation keeps failing; the saga needs attention");
                machine::compensation_exhausted(&mut rec, k, e, &outcome, now)
            }
        }
        if !Box::pin(inner.persist(&rec, before, &mut last)).await {
            return;
        }
    }
}

/// What an action or compensation came to.
enum StepOutcome {
    Action(std::result::Result<Json, String>, Outcome),
    Compensation(std::result::Result<(), String>, Outcome),
}

/// Runs `run` per `policy`: each attempt under the timeout, a panic counted as a failed
/// attempt; retryable failures are retried after a backoff.
async fn attempts<T, F>(policy: &StepPolicy, run: F) -> (std::result::Result<T, String>, Outcome)
where
    F: Fn(u32, Instant) -> BoxFuture<std::result::Result<T, StepError>>,
{
    let started = Instant::now();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let deadline = Instant::now() + policy.timeout;
        let result =
            match tokio::time::timeout(policy.timeout, catch_panic(run(attempt, deadline))).await {
                Ok(Ok(r)) => r,
                Ok(Err(panic)) => Err(StepError::Retryable(format!("panicked: {panic}"))),
                Err(_) => Err(StepError::Retryable(format!(
                    "timed out after {:?}",
                    policy.timeout
                ))),
            };
        let outcome = || Outcome {
            attempts: attempt,
            took_us: started.elapsed().as_micros() as u64,
        };
        match result {
            Ok(v) => return (Ok(v), outcome()),
            Err(StepError::Failed(r)) => return (Err(r), outcome()),
            Err(StepError::Retryable(r)) => {
                if policy.retry.exhausted(attempt) {
                    return (Err(format!("{r} (after {attempt} attempts)")), outcome());
                }
                tracing::debug!(attempt, error = %r, "attempt failed; retrying");
                tokio::time::sleep(policy.retry.backoff(attempt)).await;
            }
        }
    }
}

/// Polls `fut` to completion, turning a panic inside it into an error (no task per
/// attempt: a saga held in a long action costs one task, not two).
async fn catch_panic<T>(fut: BoxFuture<T>) -> std::result::Result<T, String> {
    let mut fut = fut;
    std::future::poll_fn(move |cx| {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Ok(v)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(panic) => std::task::Poll::Ready(Err(crate::error::panic_text(panic))),
        }
    })
    .await
}

impl Orchestrator {
    /// A builder for the orchestrator of `service`, keeping its sagas in `store`.
    pub fn builder(service: &str, store: Arc<dyn Store>) -> OrchestratorBuilder {
        OrchestratorBuilder {
            service: service.to_string(),
            store,
            sagas: Vec::new(),
            max_active: 10_000,
            action_policy: StepPolicy::action(),
            compensation_policy: StepPolicy::compensation(),
            observer: None,
        }
    }

    /// Starts saga `saga` with `input` under a fresh id (time-ordered); returns the id once
    /// the start is committed. It runs while [`run`](Self::run) runs.
    pub async fn start<I: Serialize>(&self, saga: &str, input: &I) -> Result<String> {
        let id = MessageId::new().to_string();
        Ok(self.start_with_id(saga, &id, input).await?.id)
    }

    /// Starts saga `saga` under `id` (e.g. the order id) unless a saga with that id
    /// exists: starting twice with one id starts once.
    pub async fn start_with_id<I: Serialize>(
        &self,
        saga: &str,
        id: &str,
        input: &I,
    ) -> Result<Started> {
        validate_id(id)?;
        let def = self.inner.defs.get(saga).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "no saga named `{saga}` is registered in service `{}`",
                self.inner.service
            ))
        })?;
        let input = Json::encode(input).map_err(|e| {
            Error::InvalidArgument(format!("the input of saga `{saga}` does not encode: {e}"))
        })?;
        let names: Vec<&str> = def.step_names().iter().map(String::as_str).collect();
        let rec = machine::start(id.to_string(), saga, input, &names, Timestamp::now());
        let bytes = encode(&rec)?;
        let batch = WriteBatch {
            expect: vec![Expectation {
                table: SAGAS.into(),
                key: id.to_string(),
                version: None,
            }],
            writes: vec![
                Write::Put {
                    table: SAGAS.into(),
                    key: id.to_string(),
                    value: bytes,
                },
                Write::Put {
                    table: INDEX.into(),
                    key: index_key(rec.state, id),
                    value: Bytes::from_static(b"null"),
                },
            ],
            ..Default::default()
        };
        match self.inner.store.commit(batch).await {
            Ok(()) => {}
            Err(Error::Conflict { .. }) => {
                return Ok(Started {
                    id: id.to_string(),
                    created: false,
                });
            }
            Err(e) => return Err(e),
        }
        self.inner.observe(&rec);
        if !rec.state.is_settled() {
            self.inner.enqueue(id);
        }
        Ok(Started {
            id: id.to_string(),
            created: true,
        })
    }

    /// Drives sagas until `shutdown` completes: first queues every unfinished saga found
    /// in the store (resume after a crash or a restart), then everything started. At most
    /// `max_active` are driven at once. On shutdown the sagas in flight stop where they
    /// are; each resumes from its last committed transition on the next run.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let mut rx = lock(&self.inner.queue_rx)
            .take()
            .ok_or_else(|| Error::InvalidArgument("this orchestrator is already running".into()))?;
        let resumed = self.resume_unfinished();
        let permits = Arc::new(Semaphore::new(self.inner.max_active));
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);
        let result = match resumed.await {
            Err(e) => Err(e),
            Ok(n) => {
                if n > 0 {
                    tracing::info!(service = %self.inner.service, sagas = n, "resuming unfinished sagas");
                }
                loop {
                    let id = tokio::select! {
                        _ = &mut shutdown => break,
                        id = rx.recv() => match id {
                            Some(id) => id,
                            None => break,
                        },
                    };
                    let permit = tokio::select! {
                        _ = &mut shutdown => break,
                        p = permits.clone().acquire_owned() => match p {
                            Ok(p) => p,
                            Err(_) => break,
                        },
                    };
                    while tasks.try_join_next().is_some() {}
                    let inner = self.inner.clone();
                    tasks.spawn(async move {
                        inner.drive(id).await;
                        drop(permit);
                    });
                }
                Ok(())
            }
        };
        tasks.shutdown().await;
        while rx.try_recv().is_ok() {}
        lock(&self.inner.active).clear();
        lock(&self.inner.waiters).clear();
        *lock(&self.inner.queue_rx) = Some(rx);
        result
    }

    async fn resume_unfinished(&self) -> Result<usize> {
        let mut n = 0;
        for state in [SagaState::Running, SagaState::Compensating] {
            let prefix = format!("{}/", state.as_str());
            for row in self
                .inner
                .store
                .scan_raw(INDEX, &prefix, usize::MAX)
                .await?
            {
                if let Some(id) = row.key.strip_prefix(&prefix) {
                    self.inner.enqueue(id);
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Waits until saga `id` settles (completed, compensated, or needs attention) and
    /// returns it. Fails with `NotFound` for an unknown id and `Closed` if the
    /// orchestrator stops first.
    pub async fn wait(&self, id: &str) -> Result<SagaRecord> {
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.waiters)
            .entry(id.to_string())
            .or_default()
            .push(tx);
        let current = self.get(id).await;
        let settled = match &current {
            Ok(Some(rec)) => rec.state.is_settled(),
            _ => true,
        };
        if settled {
            drop(rx);
            let mut waiters = lock(&self.inner.waiters);
            if let Some(list) = waiters.get_mut(id) {
                list.retain(|w| !w.is_closed());
                if list.is_empty() {
                    waiters.remove(id);
                }
            }
            return current?.ok_or_else(|| Error::NotFound(format!("saga {id}")));
        }
        rx.await.map_err(|_| Error::Closed)
    }

    /// Saga `id` with its full history, if it exists.
    pub async fn get(&self, id: &str) -> Result<Option<SagaRecord>> {
        Ok(self.inner.load(id).await?.map(|(rec, _)| rec))
    }

    /// Up to `limit` sagas in `state`, oldest first (for generated ids).
    pub async fn list(&self, state: SagaState, limit: usize) -> Result<Vec<SagaRecord>> {
        let prefix = format!("{}/", state.as_str());
        let mut out = Vec::new();
        for row in self.inner.store.scan_raw(INDEX, &prefix, limit).await? {
            if let Some(id) = row.key.strip_prefix(&prefix)
                && let Some(rec) = self.get(id).await?
            {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// How many sagas are in each state.
    pub async fn counts(&self) -> Result<SagaCounts> {
        let mut counts = SagaCounts::default();
        for state in SagaState::ALL {
            let prefix = format!("{}/", state.as_str());
            *counts.slot(state) = self
                .inner
                .store
                .scan_raw(INDEX, &prefix, usize::MAX)
                .await?
                .len() as u64;
        }
        Ok(counts)
    }

    /// Continues a saga that needs attention from where it stopped (e.g. after the
    /// operator fixed what its compensation kept failing on). Fails for a saga in any
    /// other state.
    pub async fn retry(&self, id: &str) -> Result<()> {
        for _ in 0..16 {
            let Some((mut rec, bytes)) = self.inner.load(id).await? else {
                return Err(Error::NotFound(format!("saga {id}")));
            };
            let before = rec.state;
            if !machine::retry(&mut rec, Timestamp::now()) {
                return Err(Error::InvalidArgument(format!(
                    "saga {id} is {before}; only a saga that needs attention can be retried"
                )));
            }
            match self
                .inner
                .try_persist(&rec, before, &encode(&rec)?, bytes)
                .await
            {
                Ok(()) => {
                    self.inner.observe(&rec);
                    self.inner.enqueue(id);
                    return Ok(());
                }
                Err(PersistError::Lost(_)) => continue,
                Err(PersistError::Storage(e)) => return Err(e),
            }
        }
        Err(Error::Conflict {
            table: SAGAS.into(),
            key: id.into(),
        })
    }
}
