//! The saga cases: an orchestrator over the store under test (`<dir>/orch`) drives a
//! three-step "trip" saga (flight, hotel, car) whose actions and compensations apply
//! their effects at a target — a second store of the same backend (`<dir>/target`) that
//! deduplicates by idempotency key and logs every effect it applied, in order. Every
//! case asserts on the target's state and the orchestrator's records, not on logs.
//! Waits are generous upper bounds; nothing asserts on speed.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchyard::saga::{
    Orchestrator, Phase, Saga, SagaRecord, SagaState, Step, StepContext, StepError, StepPolicy,
    StepStatus, TransitionKind,
};
use switchyard::store::{Store, Table, Txn, transact};
use switchyard_testkit::Child;

use crate::StoreFactory;
use crate::child::DIR_VAR;

/// The trip's steps, in order.
pub(crate) const STEPS: [&str; 3] = ["flight", "hotel", "car"];
/// Upper bound for anything that should happen.
const EVENTUALLY: Duration = Duration::from_secs(60);

/// The child's mode variable and its arguments.
pub(crate) const SAGA_MODE_VAR: &str = "SWITCHYARD_SAGA_CONFORMANCE_CHILD";
pub(crate) const SAGA_FACTORY_VAR: &str = "SWITCHYARD_SAGA_CONFORMANCE_FACTORY";
pub(crate) const SAGA_FAIL_VAR: &str = "SWITCHYARD_SAGA_FAIL_AT";
pub(crate) const SAGA_KILL_VAR: &str = "SWITCHYARD_SAGA_KILL";

/// The saga's input: which step the target declines, if any.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Trip {
    pub(crate) fail_at: Option<usize>,
}

const APPLIED: Table<String> = Table::new("target_applied");
const SEQ: Table<u64> = Table::new("target_seq");
const LOG: Table<String> = Table::new("target_log");

/// The services the saga calls, as one store: applies each effect once per idempotency
/// key (a repeat gets the first result) and logs it in order per saga.
#[derive(Clone)]
pub(crate) struct Target {
    store: Arc<dyn Store>,
    applied: Arc<AtomicU64>,
    kill_after: Option<u64>,
}

impl Target {
    pub(crate) fn new(store: Arc<dyn Store>, kill_after: Option<u64>) -> Self {
        Target {
            store,
            applied: Arc::new(AtomicU64::new(0)),
            kill_after,
        }
    }

    async fn apply(&self, saga: &str, key: &str, what: &str) -> Result<String, StepError> {
        let (result, fresh) = transact(&self.store, |txn| async move {
            if let Some(r) = txn.get(&APPLIED, key).await? {
                return Ok((r, false));
            }
            let seq = txn.get(&SEQ, saga).await?.unwrap_or(0) + 1;
            txn.put(&SEQ, saga, &seq)?;
            txn.put(&LOG, &format!("{saga}/{seq:04}"), &what.to_string())?;
            let r = format!("{what}#{saga}");
            txn.put(&APPLIED, key, &r)?;
            Ok((r, true))
        })
        .await?;
        if fresh {
            let n = self.applied.fetch_add(1, Ordering::SeqCst) + 1;
            if self.kill_after == Some(n) {
                kill_self(&format!("effect {n} ({what}) applied at the target"));
            }
        }
        Ok(result)
    }

    /// The effects applied for `saga`, in order.
    pub(crate) async fn log(&self, saga: &str) -> Vec<String> {
        Txn::new(self.store.clone())
            .scan(&LOG, &format!("{saga}/"), usize::MAX)
            .await
            .unwrap()
            .into_iter()
            .map(|(_, v)| v)
            .collect()
    }

    /// Idempotency keys the target applied, all sagas.
    pub(crate) async fn applied_keys(&self) -> usize {
        Txn::new(self.store.clone())
            .scan(&APPLIED, "", usize::MAX)
            .await
            .unwrap()
            .len()
    }
}

/// SIGKILLs this process by pid, after saying so on stdout.
pub(crate) fn kill_self(why: &str) {
    println!("KILL {why}");
    let _ = std::process::Command::new("kill")
        .args(["-9", &std::process::id().to_string()])
        .status();
    std::thread::sleep(Duration::from_secs(30));
}

/// How a scripted action or compensation misbehaves.
#[derive(Debug, Clone)]
enum Rule {
    /// The first `n` attempts fail (retryable).
    FailTimes(u32),
    /// The first `n` attempts hang past any timeout.
    HangTimes(u32),
    /// The first `n` attempts panic.
    PanicTimes(u32),
    /// Every attempt fails (retryable).
    Always,
    /// Waits until released (for sagas stopped mid-step).
    Gate(Arc<tokio::sync::Notify>),
}

type ScriptKey = (String, &'static str, &'static str);

/// Per-process misbehaviour by (saga id, step, phase), with attempt counts and a gauge
/// of actions in flight.
#[derive(Clone, Default)]
pub(crate) struct Script {
    rules: Arc<Mutex<HashMap<ScriptKey, Rule>>>,
    calls: Arc<Mutex<HashMap<ScriptKey, u32>>>,
    in_flight: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

fn step_name(k: usize) -> &'static str {
    STEPS[k]
}

impl Script {
    fn set(&self, id: &str, step: usize, phase: Phase, rule: Rule) {
        self.rules
            .lock()
            .unwrap()
            .insert((id.to_string(), step_name(step), phase.as_str()), rule);
    }

    fn heal(&self, id: &str, step: usize, phase: Phase) {
        self.rules
            .lock()
            .unwrap()
            .remove(&(id.to_string(), step_name(step), phase.as_str()));
    }

    fn calls(&self, id: &str, step: usize, phase: Phase) -> u32 {
        let key = (id.to_string(), step_name(step), phase.as_str());
        self.calls.lock().unwrap().get(&key).copied().unwrap_or(0)
    }

    async fn check(&self, cx: &StepContext<Trip>) -> Result<(), StepError> {
        let key = (
            cx.saga_id().to_string(),
            step_name(cx.step_index()),
            cx.phase().as_str(),
        );
        let call = {
            let mut calls = self.calls.lock().unwrap();
            let c = calls.entry(key.clone()).or_default();
            *c += 1;
            *c
        };
        let rule = self.rules.lock().unwrap().get(&key).cloned();
        match rule {
            Some(Rule::FailTimes(n)) if call <= n => Err(StepError::retryable(format!(
                "scripted failure {call} of {n}"
            ))),
            Some(Rule::HangTimes(n)) if call <= n => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(())
            }
            Some(Rule::PanicTimes(n)) if call <= n => panic!("scripted panic {call} of {n}"),
            Some(Rule::Always) => Err(StepError::retryable("the target keeps failing")),
            Some(Rule::Gate(gate)) => {
                gate.notified().await;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn enter(&self) {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
    }

    fn leave(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The trip saga: each action applies `<step>` at the target (the hotel and the car
/// carry the previous step's output in theirs), each compensation `undo-<step>`; the
/// step `fail_at` of the input is declined (a final failure, no effect).
pub(crate) fn trip(target: Target, script: Script) -> Saga<Trip> {
    let mut saga = Saga::new("trip");
    for (k, name) in STEPS.iter().enumerate() {
        let (t, s) = (target.clone(), script.clone());
        let (tc, sc) = (target.clone(), script.clone());
        saga = saga.step(
            Step::new(name, move |cx: StepContext<Trip>| {
                let (t, s) = (t.clone(), s.clone());
                async move {
                    s.enter();
                    let r = async {
                        s.check(&cx).await?;
                        if cx.input().fail_at == Some(cx.step_index()) {
                            return Err(StepError::failed("declined by the target"));
                        }
                        let previous = match k {
                            0 => String::new(),
                            _ => format!(" after {}", cx.output::<String>(STEPS[k - 1])?),
                        };
                        let r = t
                            .apply(cx.saga_id(), &cx.idempotency_key(), cx.step_name())
                            .await?;
                        Ok(format!("{r}{previous}"))
                    }
                    .await;
                    s.leave();
                    r
                }
            })
            .compensate(move |cx: StepContext<Trip>, output: String| {
                let (t, s) = (tc.clone(), sc.clone());
                async move {
                    s.check(&cx).await?;
                    if !output.starts_with(cx.step_name()) {
                        return Err(StepError::failed(format!(
                            "compensation of {} got the output `{output}`",
                            cx.step_name()
                        )));
                    }
                    let what = format!("undo-{}", cx.step_name());
                    t.apply(cx.saga_id(), &cx.idempotency_key(), &what).await?;
                    Ok(())
                }
            }),
        );
    }
    saga
}

/// Policies short enough for tests.
pub(crate) fn fast(
    orch: switchyard::saga::OrchestratorBuilder,
) -> switchyard::saga::OrchestratorBuilder {
    orch.action_policy(
        StepPolicy::action()
            .timeout(Duration::from_secs(20))
            .backoff(Duration::from_millis(5), Duration::from_millis(20)),
    )
    .compensation_policy(
        StepPolicy::compensation()
            .attempts(6)
            .timeout(Duration::from_secs(20))
            .backoff(Duration::from_millis(5), Duration::from_millis(20)),
    )
}

/// The effects at the target of a trip that fails at `fail_at` (or completes).
pub(crate) fn expected_log(fail_at: Option<usize>) -> Vec<String> {
    let done = fail_at.unwrap_or(STEPS.len());
    let mut log: Vec<String> = STEPS[..done].iter().map(|s| s.to_string()).collect();
    if fail_at.is_some() {
        log.extend(STEPS[..done].iter().rev().map(|s| format!("undo-{s}")));
    }
    log
}

/// An orchestrator and a target over fresh stores of the backend, with its run task.
struct Rig<'a, S: StoreFactory> {
    factory: &'a S,
    orch_store: Arc<S::Store>,
    target_store: Arc<S::Store>,
    target: Target,
    script: Script,
    orchestrator: Orchestrator,
    stop: tokio::sync::watch::Sender<bool>,
    run: tokio::task::JoinHandle<switchyard::Result<()>>,
}

impl<'a, S: StoreFactory> Rig<'a, S> {
    fn start(
        factory: &'a S,
        dir: &Path,
        configure: impl FnOnce(
            switchyard::saga::OrchestratorBuilder,
        ) -> switchyard::saga::OrchestratorBuilder,
    ) -> Self {
        let orch_store = factory.open(&dir.join("orch")).unwrap();
        let target_store = factory.open(&dir.join("target")).unwrap();
        let target = Target::new(target_store.clone(), None);
        let script = Script::default();
        let builder = Orchestrator::builder("travel", orch_store.clone())
            .saga(trip(target.clone(), script.clone()));
        let orchestrator = configure(fast(builder)).build().unwrap();
        let (stop, mut rx) = tokio::sync::watch::channel(false);
        let run = tokio::spawn(orchestrator.clone().run(async move {
            let _ = rx.changed().await;
        }));
        Rig {
            factory,
            orch_store,
            target_store,
            target,
            script,
            orchestrator,
            stop,
            run,
        }
    }

    async fn settle(&self, id: &str) -> SagaRecord {
        tokio::time::timeout(EVENTUALLY, self.orchestrator.wait(id))
            .await
            .unwrap_or_else(|_| panic!("saga {id} did not settle within {EVENTUALLY:?}"))
            .unwrap()
    }

    async fn shutdown(self) {
        self.stop.send(true).unwrap();
        self.run.await.unwrap().unwrap();
        drop(self.orchestrator);
        self.factory.close(&self.orch_store).await.unwrap();
        self.factory.close(&self.target_store).await.unwrap();
    }
}

fn kinds(rec: &SagaRecord) -> Vec<(TransitionKind, Option<usize>)> {
    rec.history.iter().map(|t| (t.kind, t.step)).collect()
}

pub(crate) async fn dispatch<S: StoreFactory>(sf: &S, name: &str, dir: &Path, entry: &str) {
    match name {
        "a_saga_runs_every_step_in_order_and_completes" => happy_path(sf, dir).await,
        "a_failure_at_each_step_compensates_exactly_the_completed_steps_in_reverse" => {
            failure_at_each_step(sf, dir).await
        }
        "retries_timeouts_and_panics_follow_the_step_policy" => retries(sf, dir).await,
        "a_compensation_that_fails_three_times_then_succeeds" => {
            compensation_retried(sf, dir).await
        }
        "a_compensation_that_never_succeeds_needs_attention_until_an_operator_retries_it" => {
            needs_attention(sf, dir).await
        }
        "starting_twice_with_one_id_starts_once_and_bad_starts_are_refused" => {
            idempotent_start(sf, dir).await
        }
        "thousands_of_sagas_run_concurrently_within_max_active" => many(sf, dir).await,
        "unfinished_sagas_resume_after_a_restart" => resume(sf, dir).await,
        "a_crash_at_every_transition_point_ends_each_saga_once" => crashes(sf, dir, entry).await,
        other => panic!("no saga conformance case `{other}`"),
    }
}

async fn happy_path<S: StoreFactory>(sf: &S, dir: &Path) {
    let rig = Rig::start(sf, dir, |b| b);
    let id = rig
        .orchestrator
        .start("trip", &Trip { fail_at: None })
        .await
        .unwrap();
    let rec = rig.settle(&id).await;
    assert_eq!(rec.state, SagaState::Completed);
    use TransitionKind::*;
    assert_eq!(
        kinds(&rec),
        vec![
            (Started, None),
            (StepDone, Some(0)),
            (StepDone, Some(1)),
            (StepDone, Some(2)),
            (Completed, None)
        ]
    );
    let outputs: Vec<_> = rec
        .steps
        .iter()
        .map(|s| s.output.as_ref().unwrap().decode::<String>().unwrap())
        .collect();
    assert_eq!(
        outputs,
        vec![
            format!("flight#{id}"),
            format!("hotel#{id} after flight#{id}"),
            format!("car#{id} after hotel#{id} after flight#{id}"),
        ],
        "each step's output is recorded and the next step reads it"
    );
    assert!(
        rec.steps
            .iter()
            .all(|s| s.status == StepStatus::Done && s.attempts == 1)
    );
    assert_eq!(rig.target.log(&id).await, expected_log(None));
    assert_eq!(
        rig.target.applied_keys().await,
        3,
        "three distinct idempotency keys"
    );
    // Visible: by id (equal to what wait returned), by state, counted.
    assert_eq!(rig.orchestrator.get(&id).await.unwrap().unwrap(), rec);
    let listed = rig
        .orchestrator
        .list(SagaState::Completed, 10)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, id);
    let counts = rig.orchestrator.counts().await.unwrap();
    assert_eq!((counts.completed, counts.in_flight()), (1, 0));
    assert!(
        rig.orchestrator
            .get("no-such-saga")
            .await
            .unwrap()
            .is_none()
    );
    rig.shutdown().await;
}

async fn failure_at_each_step<S: StoreFactory>(sf: &S, dir: &Path) {
    let rig = Rig::start(sf, dir, |b| b);
    let mut ids = Vec::new();
    for fail_at in 0..STEPS.len() {
        let id = rig
            .orchestrator
            .start(
                "trip",
                &Trip {
                    fail_at: Some(fail_at),
                },
            )
            .await
            .unwrap();
        ids.push((fail_at, id));
    }
    for (fail_at, id) in &ids {
        let rec = rig.settle(id).await;
        assert_eq!(
            rec.state,
            SagaState::Compensated,
            "failure at step {fail_at}"
        );
        assert_eq!(
            rig.target.log(id).await,
            expected_log(Some(*fail_at)),
            "failure at step {fail_at}: the target saw exactly the completed steps, then \
             their compensations in reverse order"
        );
        let compensated: Vec<usize> = rec
            .history
            .iter()
            .filter(|t| t.kind == TransitionKind::StepCompensated)
            .filter_map(|t| t.step)
            .collect();
        assert_eq!(
            compensated,
            (0..*fail_at).rev().collect::<Vec<_>>(),
            "failure at step {fail_at}"
        );
        let failed = rec
            .history
            .iter()
            .find(|t| t.kind == TransitionKind::StepFailed)
            .unwrap();
        assert_eq!(failed.step, Some(*fail_at));
        assert_eq!(failed.attempts, 1, "a declined action is not retried");
        assert!(failed.error.as_deref().unwrap().contains("declined"));
        assert_eq!(rec.steps[*fail_at].status, StepStatus::Failed);
        assert!(rec.error.as_deref().unwrap().contains("declined"));
    }
    assert_eq!(rig.orchestrator.counts().await.unwrap().compensated, 3);
    rig.shutdown().await;
}

async fn retries<S: StoreFactory>(sf: &S, dir: &Path) {
    let timeout = Duration::from_millis(500);
    let rig = Rig::start(sf, dir, |b| {
        b.action_policy(
            StepPolicy::action()
                .attempts(3)
                .timeout(timeout)
                .backoff(Duration::from_millis(5), Duration::from_millis(20)),
        )
    });
    // Each saga is started under a known id so its script is in place first.
    let script = &rig.script;
    script.set("fails-twice", 1, Phase::Action, Rule::FailTimes(2));
    script.set("hangs-once", 0, Phase::Action, Rule::HangTimes(1));
    script.set("panics-once", 2, Phase::Action, Rule::PanicTimes(1));
    script.set("always-fails", 1, Phase::Action, Rule::Always);
    for id in ["fails-twice", "hangs-once", "panics-once", "always-fails"] {
        rig.orchestrator
            .start_with_id("trip", id, &Trip { fail_at: None })
            .await
            .unwrap();
    }
    let rec = rig.settle("fails-twice").await;
    assert_eq!(rec.state, SagaState::Completed);
    assert_eq!(rec.steps[1].attempts, 3);
    assert_eq!(script.calls("fails-twice", 1, Phase::Action), 3);

    let rec = rig.settle("hangs-once").await;
    assert_eq!(rec.state, SagaState::Completed);
    assert_eq!(
        rec.steps[0].attempts, 2,
        "the hung attempt timed out and was retried"
    );
    let took = rec.history[1].took_us;
    assert!(took >= timeout.as_micros() as u64, "took {took} µs");

    let rec = rig.settle("panics-once").await;
    assert_eq!(
        rec.state,
        SagaState::Completed,
        "a panic is a failed attempt"
    );
    assert_eq!(rec.steps[2].attempts, 2);

    let rec = rig.settle("always-fails").await;
    assert_eq!(rec.state, SagaState::Compensated);
    assert_eq!(
        script.calls("always-fails", 1, Phase::Action),
        3,
        "3 attempts, no more"
    );
    let failed = rec
        .history
        .iter()
        .find(|t| t.kind == TransitionKind::StepFailed)
        .unwrap();
    assert_eq!(failed.attempts, 3);
    assert!(failed.error.as_deref().unwrap().contains("keeps failing"));
    assert_eq!(rig.target.log("always-fails").await, expected_log(Some(1)));
    for id in ["fails-twice", "hangs-once", "panics-once"] {
        assert_eq!(
            rig.target.log(id).await,
            expected_log(None),
            "{id}: each effect once"
        );
    }
    rig.shutdown().await;
}

async fn compensation_retried<S: StoreFactory>(sf: &S, dir: &Path) {
    let rig = Rig::start(sf, dir, |b| b);
    rig.script
        .set("flaky-undo", 0, Phase::Compensation, Rule::FailTimes(3));
    rig.orchestrator
        .start_with_id("trip", "flaky-undo", &Trip { fail_at: Some(2) })
        .await
        .unwrap();
    let rec = rig.settle("flaky-undo").await;
    assert_eq!(rec.state, SagaState::Compensated);
    assert_eq!(rec.steps[0].compensation_attempts, 4);
    assert_eq!(rec.steps[1].compensation_attempts, 1);
    assert_eq!(
        rig.script.calls("flaky-undo", 0, Phase::Compensation),
        4,
        "failed 3 times, then succeeded"
    );
    assert_eq!(rig.target.log("flaky-undo").await, expected_log(Some(2)));
    rig.shutdown().await;
}

async fn needs_attention<S: StoreFactory>(sf: &S, dir: &Path) {
    let rig = Rig::start(sf, dir, |b| b);
    rig.script
        .set("stuck", 0, Phase::Compensation, Rule::Always);
    rig.orchestrator
        .start_with_id("trip", "stuck", &Trip { fail_at: Some(1) })
        .await
        .unwrap();
    let rec = rig.settle("stuck").await;
    assert_eq!(rec.state, SagaState::NeedsAttention);
    assert!(rec.error.as_deref().unwrap().contains("keeps failing"));
    assert_eq!(
        rec.steps[0].compensation_attempts, 6,
        "the configured limit"
    );
    let last = rec.history.last().unwrap();
    assert_eq!(
        (last.kind, last.step),
        (TransitionKind::NeedsAttention, Some(0))
    );
    // Visible, counted, not dropped; nothing was compensated at the target.
    let parked = rig
        .orchestrator
        .list(SagaState::NeedsAttention, 10)
        .await
        .unwrap();
    assert_eq!(
        parked.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["stuck"]
    );
    assert_eq!(rig.orchestrator.counts().await.unwrap().needs_attention, 1);
    assert_eq!(rig.target.log("stuck").await, ["flight"]);
    // Only a parked saga can be retried.
    let err = rig.orchestrator.retry("nope").await.unwrap_err();
    assert_eq!(err.kind(), switchyard::ErrorKind::NotFound);
    // The operator fixes the target and retries.
    rig.script.heal("stuck", 0, Phase::Compensation);
    rig.orchestrator.retry("stuck").await.unwrap();
    let rec = rig.settle("stuck").await;
    assert_eq!(rec.state, SagaState::Compensated);
    assert_eq!(rig.target.log("stuck").await, expected_log(Some(1)));
    assert!(
        rec.history
            .iter()
            .any(|t| t.kind == TransitionKind::Retried),
        "the operator's retry is in the history"
    );
    let err = rig.orchestrator.retry("stuck").await.unwrap_err();
    assert_eq!(err.kind(), switchyard::ErrorKind::InvalidInput, "{err}");
    let counts = rig.orchestrator.counts().await.unwrap();
    assert_eq!((counts.needs_attention, counts.compensated), (0, 1));
    rig.shutdown().await;
}

async fn idempotent_start<S: StoreFactory>(sf: &S, dir: &Path) {
    let rig = Rig::start(sf, dir, |b| b);
    let first = rig
        .orchestrator
        .start_with_id("trip", "order-42", &Trip { fail_at: None })
        .await
        .unwrap();
    let second = rig
        .orchestrator
        .start_with_id("trip", "order-42", &Trip { fail_at: Some(0) })
        .await
        .unwrap();
    assert!(first.created);
    assert!(!second.created, "the second start found the first");
    let rec = rig.settle("order-42").await;
    assert_eq!(rec.state, SagaState::Completed, "the first input won");
    assert_eq!(rig.target.log("order-42").await, expected_log(None));
    let err = rig
        .orchestrator
        .start("no-such-saga", &Trip { fail_at: None })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), switchyard::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("no-such-saga"), "{err}");
    for bad in ["", "bad\nid"] {
        let err = rig
            .orchestrator
            .start_with_id("trip", bad, &Trip { fail_at: None })
            .await
            .unwrap_err();
        assert_eq!(err.kind(), switchyard::ErrorKind::InvalidInput, "{bad:?}");
    }
    let err = rig.orchestrator.wait("never-started").await.unwrap_err();
    assert_eq!(err.kind(), switchyard::ErrorKind::NotFound);
    assert_eq!(rig.orchestrator.counts().await.unwrap().completed, 1);
    rig.shutdown().await;
}

async fn many<S: StoreFactory>(sf: &S, dir: &Path) {
    const N: usize = 2_000;
    const MAX_ACTIVE: usize = 50;
    let rig = Rig::start(sf, dir, |b| b.max_active(MAX_ACTIVE));
    let mut ids = Vec::with_capacity(N);
    for i in 0..N {
        let fail_at = (i % 4 == 3).then_some(i % 3);
        ids.push((
            fail_at,
            rig.orchestrator
                .start("trip", &Trip { fail_at })
                .await
                .unwrap(),
        ));
    }
    for (fail_at, id) in &ids {
        let rec = rig.settle(id).await;
        let want = if fail_at.is_some() {
            SagaState::Compensated
        } else {
            SagaState::Completed
        };
        assert_eq!(rec.state, want);
    }
    let peak = rig.script.peak.load(Ordering::SeqCst);
    assert!(
        peak <= MAX_ACTIVE,
        "{peak} actions ran at once; max_active is {MAX_ACTIVE}"
    );
    let counts = rig.orchestrator.counts().await.unwrap();
    let failing = ids.iter().filter(|(f, _)| f.is_some()).count() as u64;
    assert_eq!(counts.compensated, failing);
    assert_eq!(counts.completed, N as u64 - failing);
    assert_eq!(counts.in_flight(), 0);
    let effects: usize = ids.iter().map(|(f, _)| expected_log(*f).len()).sum();
    assert_eq!(
        rig.target.applied_keys().await,
        effects,
        "every effect applied once"
    );
    rig.shutdown().await;
}

async fn resume<S: StoreFactory>(sf: &S, dir: &Path) {
    const N: usize = 20;
    let gate = Arc::new(tokio::sync::Notify::new());
    let rig = Rig::start(sf, dir, |b| b);
    let mut ids = Vec::new();
    for i in 0..N {
        let id = format!("r{i}");
        let fail_at = (i % 2 == 1).then_some(2);
        // Even sagas stop in the hotel action, odd ones in the flight compensation.
        match fail_at {
            None => rig
                .script
                .set(&id, 1, Phase::Action, Rule::Gate(gate.clone())),
            Some(_) => rig
                .script
                .set(&id, 0, Phase::Compensation, Rule::Gate(gate.clone())),
        }
        rig.orchestrator
            .start_with_id("trip", &id, &Trip { fail_at })
            .await
            .unwrap();
        ids.push((id, fail_at));
    }
    // Wait until every saga is inside its gated step, then stop everything.
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    loop {
        let waiting: u32 = ids
            .iter()
            .map(|(id, f)| match f {
                None => rig.script.calls(id, 1, Phase::Action),
                Some(_) => rig.script.calls(id, 0, Phase::Compensation),
            })
            .sum();
        if waiting as usize == N {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "sagas never reached their gate"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let counts = rig.orchestrator.counts().await.unwrap();
    assert_eq!(counts.in_flight(), N as u64);
    rig.shutdown().await;

    // A new orchestrator over the reopened stores finishes every saga.
    let rig = Rig::start(sf, dir, |b| b);
    for (id, fail_at) in &ids {
        let rec = rig.settle(id).await;
        let want = if fail_at.is_some() {
            SagaState::Compensated
        } else {
            SagaState::Completed
        };
        assert_eq!(rec.state, want, "{id}");
        assert_eq!(
            rig.target.log(id).await,
            expected_log(*fail_at),
            "{id}: each effect once"
        );
    }
    rig.shutdown().await;
}

/// Where the child is killed: after the n-th committed transition, or right after the
/// n-th effect was applied at the target (before the orchestrator recorded it).
#[derive(Debug, Clone, Copy)]
pub(crate) enum KillPoint {
    Transition(u64),
    Effect(u64),
}

impl KillPoint {
    pub(crate) fn encode(self) -> String {
        match self {
            KillPoint::Transition(n) => format!("transition:{n}"),
            KillPoint::Effect(n) => format!("effect:{n}"),
        }
    }

    pub(crate) fn decode(s: &str) -> Option<KillPoint> {
        let (kind, n) = s.split_once(':')?;
        let n = n.parse().ok()?;
        match kind {
            "transition" => Some(KillPoint::Transition(n)),
            "effect" => Some(KillPoint::Effect(n)),
            _ => None,
        }
    }
}

/// The id of the saga the crash child runs.
pub(crate) const CRASH_SAGA: &str = "trip-under-fire";

async fn crashes<S: StoreFactory>(sf: &S, dir: &Path, entry: &str) {
    let mut runs = 0;
    for fail_at in [None, Some(2)] {
        // Committed transitions: started, one per step done, (failed + compensating),
        // one per compensation; the last also settles the saga.
        let transitions: u64 = match fail_at {
            None => 4,
            Some(_) => 6,
        };
        let effects = expected_log(fail_at).len() as u64;
        let points = (1..=transitions)
            .map(KillPoint::Transition)
            .chain((1..=effects).map(KillPoint::Effect));
        for point in points {
            runs += 1;
            let case_dir = dir.join(format!("run{runs}"));
            std::fs::create_dir_all(&case_dir).unwrap();
            let mut child = Child::spawn_test_entry(
                entry,
                &[
                    (SAGA_MODE_VAR, "run".to_string()),
                    (SAGA_FACTORY_VAR, std::any::type_name::<S>().to_string()),
                    (DIR_VAR, case_dir.display().to_string()),
                    (
                        SAGA_FAIL_VAR,
                        fail_at.map(|f| f.to_string()).unwrap_or_default(),
                    ),
                    (SAGA_KILL_VAR, point.encode()),
                ],
            )
            .unwrap();
            // The history the child saw committed last, before its death.
            let mut committed: Vec<String> = Vec::new();
            let mut killed = None;
            let deadline = std::time::Instant::now() + EVENTUALLY;
            while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
                let Some(line) = child.next_line(left) else {
                    break;
                };
                if let Some(at) = line.find("TRANSITION ") {
                    let kinds = line[at..].rsplit(' ').next().unwrap_or_default();
                    committed = kinds.split(',').map(str::to_string).collect();
                } else if line.contains("KILL") {
                    killed = Some(line);
                    break;
                }
            }
            let status = child.wait().unwrap();
            assert!(
                killed.is_some(),
                "{point:?} (fail_at {fail_at:?}): the child never reached its kill point ({status}): {:?}",
                child.drain(Duration::from_secs(1))
            );
            assert!(!status.success(), "{point:?}: the child was not killed");

            // Restart: a fresh orchestrator over the same stores finishes the saga.
            let rig = Rig::start(sf, &case_dir, |b| b);
            let rec = rig.settle(CRASH_SAGA).await;
            let want = match fail_at {
                None => SagaState::Completed,
                Some(_) => SagaState::Compensated,
            };
            assert_eq!(rec.state, want, "{point:?} (fail_at {fail_at:?})");
            assert_eq!(
                rig.target.log(CRASH_SAGA).await,
                expected_log(fail_at),
                "{point:?} (fail_at {fail_at:?}): each action and compensation applied once, in order"
            );
            assert_eq!(rig.target.applied_keys().await as u64, effects);
            // Every transition the child saw committed survived its death.
            let history: Vec<String> = rec
                .history
                .iter()
                .map(|t| format!("{:?}", t.kind))
                .collect();
            assert!(
                history.starts_with(&committed),
                "{point:?}: committed before the kill {committed:?}, history after {history:?}"
            );
            assert!(!committed.is_empty() || matches!(point, KillPoint::Effect(_)));
            rig.shutdown().await;
        }
    }
    println!("{runs} kill points, each resumed to a terminal state with every effect once");
}
