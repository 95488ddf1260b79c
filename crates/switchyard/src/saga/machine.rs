//! The saga state machine: what comes next for a record, and how each outcome changes
//! it. Pure (no I/O, no clock): the driver passes the time in and persists the result.

use super::{Json, SagaRecord, SagaState, StepRecord, StepStatus, Transition, TransitionKind};
use crate::envelope::Timestamp;

/// What the driver does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Run the action of step `k`.
    Action(usize),
    /// Run the compensation of step `k`.
    Compensate(usize),
    /// Nothing: the saga is terminal or waits for an operator.
    Settled,
}

/// An action's or compensation's outcome, as the driver measured it.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    pub attempts: u32,
    pub took_us: u64,
}

fn push(rec: &mut SagaRecord, now: Timestamp, kind: TransitionKind, step: Option<usize>) {
    rec.history.push(Transition {
        at: now,
        kind,
        step,
        attempts: 0,
        took_us: 0,
        error: None,
    });
    rec.updated_at = now;
}

fn push_outcome(
    rec: &mut SagaRecord,
    now: Timestamp,
    kind: TransitionKind,
    step: usize,
    outcome: &Outcome,
    error: Option<String>,
) {
    rec.history.push(Transition {
        at: now,
        kind,
        step: Some(step),
        attempts: outcome.attempts,
        took_us: outcome.took_us,
        error,
    });
    rec.updated_at = now;
}

/// A new record for a saga with these step names; `Completed` at once if it has none.
pub(crate) fn start(
    id: String,
    saga: &str,
    input: Json,
    steps: &[&str],
    now: Timestamp,
) -> SagaRecord {
    let mut rec = SagaRecord {
        id,
        saga: saga.to_string(),
        state: SagaState::Running,
        input,
        steps: steps
            .iter()
            .map(|name| StepRecord {
                name: (*name).to_string(),
                status: StepStatus::Pending,
                output: None,
                attempts: 0,
                compensation_attempts: 0,
            })
            .collect(),
        cursor: 0,
        resume: None,
        error: None,
        history: Vec::new(),
        created_at: now,
        updated_at: now,
    };
    push(&mut rec, now, TransitionKind::Started, None);
    if steps.is_empty() {
        rec.state = SagaState::Completed;
        push(&mut rec, now, TransitionKind::Completed, None);
    }
    rec
}

/// What the driver does next for `rec`.
pub(crate) fn next(rec: &SagaRecord) -> Next {
    match rec.state {
        SagaState::Running if rec.cursor < rec.steps.len() => Next::Action(rec.cursor),
        SagaState::Compensating if rec.cursor > 0 => Next::Compensate(rec.cursor - 1),
        _ => Next::Settled,
    }
}

/// Step `k`'s action completed with `output`; completes the saga after the last step.
pub(crate) fn step_done(
    rec: &mut SagaRecord,
    k: usize,
    output: Json,
    outcome: &Outcome,
    now: Timestamp,
) {
    let step = &mut rec.steps[k];
    step.status = StepStatus::Done;
    step.output = Some(output);
    step.attempts = outcome.attempts;
    rec.cursor = k + 1;
    push_outcome(rec, now, TransitionKind::StepDone, k, outcome, None);
    if rec.cursor == rec.steps.len() {
        rec.state = SagaState::Completed;
        push(rec, now, TransitionKind::Completed, None);
    }
}

/// Moves the compensation cursor past steps that need no compensation; settles as
/// `Compensated` when none is left, else records which step is compensated next.
fn advance_compensation(rec: &mut SagaRecord, compensable: &[bool], now: Timestamp) {
    while rec.cursor > 0 && !compensable.get(rec.cursor - 1).copied().unwrap_or(false) {
        rec.cursor -= 1;
    }
    if rec.cursor == 0 {
        rec.state = SagaState::Compensated;
        push(rec, now, TransitionKind::Compensated, None);
    } else {
        rec.state = SagaState::Compensating;
        push(rec, now, TransitionKind::Compensating, Some(rec.cursor - 1));
    }
}

/// Step `k`'s action failed for good: compensate the steps before it, last first.
/// `compensable[i]` says whether step `i` has a compensation.
pub(crate) fn step_failed(
    rec: &mut SagaRecord,
    k: usize,
    error: String,
    outcome: &Outcome,
    compensable: &[bool],
    now: Timestamp,
) {
    let step = &mut rec.steps[k];
    step.status = StepStatus::Failed;
    step.attempts = outcome.attempts;
    rec.cursor = k;
    rec.error = Some(error.clone());
    push_outcome(
        rec,
        now,
        TransitionKind::StepFailed,
        k,
        outcome,
        Some(error),
    );
    advance_compensation(rec, compensable, now);
}

/// Step `k`'s compensation completed; on to the step before it.
pub(crate) fn compensated(
    rec: &mut SagaRecord,
    k: usize,
    outcome: &Outcome,
    compensable: &[bool],
    now: Timestamp,
) {
    let step = &mut rec.steps[k];
    step.status = StepStatus::Compensated;
    step.compensation_attempts += outcome.attempts;
    rec.cursor = k;
    push_outcome(rec, now, TransitionKind::StepCompensated, k, outcome, None);
    advance_compensation(rec, compensable, now);
}

/// Step `k`'s compensation failed past its limit: park the saga for an operator.
pub(crate) fn compensation_exhausted(
    rec: &mut SagaRecord,
    k: usize,
    error: String,
    outcome: &Outcome,
    now: Timestamp,
) {
    rec.steps[k].compensation_attempts += outcome.attempts;
    needs_attention_at(rec, Some(k), error, outcome, now);
}

/// The saga cannot go on without an operator (e.g. its input no longer decodes).
pub(crate) fn needs_attention(rec: &mut SagaRecord, error: String, now: Timestamp) {
    let none = Outcome {
        attempts: 0,
        took_us: 0,
    };
    needs_attention_at(rec, None, error, &none, now);
}

fn needs_attention_at(
    rec: &mut SagaRecord,
    step: Option<usize>,
    error: String,
    outcome: &Outcome,
    now: Timestamp,
) {
    if rec.state != SagaState::NeedsAttention {
        rec.resume = Some(rec.state);
    }
    rec.state = SagaState::NeedsAttention;
    rec.error = Some(error.clone());
    rec.history.push(Transition {
        at: now,
        kind: TransitionKind::NeedsAttention,
        step,
        attempts: outcome.attempts,
        took_us: outcome.took_us,
        error: Some(error),
    });
    rec.updated_at = now;
}

/// An operator retries a saga that needs attention: it continues where it stopped.
/// Returns false (and changes nothing) for a saga in any other state.
pub(crate) fn retry(rec: &mut SagaRecord, now: Timestamp) -> bool {
    if rec.state != SagaState::NeedsAttention {
        return false;
    }
    rec.state = rec.resume.take().unwrap_or(SagaState::Compensating);
    // The error is again what made the saga compensate (if anything), not why it parked.
    rec.error = rec
        .history
        .iter()
        .rev()
        .find(|t| t.kind == TransitionKind::StepFailed)
        .and_then(|t| t.error.clone());
    push(rec, now, TransitionKind::Retried, None);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(attempts: u32) -> Outcome {
        Outcome {
            attempts,
            took_us: 10,
        }
    }

    fn kinds(rec: &SagaRecord) -> Vec<(TransitionKind, Option<usize>)> {
        rec.history.iter().map(|t| (t.kind, t.step)).collect()
    }

    fn new(n: usize) -> SagaRecord {
        let names: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        start(
            "id".into(),
            "t",
            Json::encode(&()).unwrap(),
            &names,
            Timestamp::now(),
        )
    }

    #[test]
    fn happy_path_runs_each_step_then_completes() {
        let now = Timestamp::now();
        let mut rec = new(3);
        for k in 0..3 {
            assert_eq!(next(&rec), Next::Action(k));
            step_done(&mut rec, k, Json::encode(&k).unwrap(), &out(1), now);
        }
        assert_eq!(next(&rec), Next::Settled);
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
        assert_eq!(rec.steps[2].output, Some(Json::encode(&2).unwrap()));
    }

    #[test]
    fn a_saga_without_steps_is_completed_at_start() {
        let rec = new(0);
        assert_eq!(rec.state, SagaState::Completed);
        assert_eq!(next(&rec), Next::Settled);
    }

    #[test]
    fn failure_at_each_step_compensates_exactly_the_completed_ones_in_reverse() {
        let now = Timestamp::now();
        for fail_at in 0..4 {
            let mut rec = new(4);
            let compensable = [true, false, true, true];
            for k in 0..fail_at {
                step_done(&mut rec, k, Json::encode(&k).unwrap(), &out(1), now);
            }
            assert_eq!(next(&rec), Next::Action(fail_at));
            step_failed(&mut rec, fail_at, "no".into(), &out(3), &compensable, now);
            let mut compensations = Vec::new();
            while let Next::Compensate(k) = next(&rec) {
                compensations.push(k);
                compensated(&mut rec, k, &out(1), &compensable, now);
            }
            let expected: Vec<usize> = (0..fail_at).rev().filter(|k| compensable[*k]).collect();
            assert_eq!(compensations, expected, "failure at step {fail_at}");
            assert_eq!(rec.state, SagaState::Compensated);
            assert_eq!(rec.steps[fail_at].status, StepStatus::Failed);
            assert_eq!(rec.steps[fail_at].attempts, 3);
            assert_eq!(rec.error.as_deref(), Some("no"));
        }
    }

    #[test]
    fn an_exhausted_compensation_parks_the_saga_and_a_retry_resumes_it() {
        let now = Timestamp::now();
        let mut rec = new(2);
        let compensable = [true, true];
        step_done(&mut rec, 0, Json::encode(&0).unwrap(), &out(1), now);
        step_failed(&mut rec, 1, "declined".into(), &out(1), &compensable, now);
        assert_eq!(next(&rec), Next::Compensate(0));
        compensation_exhausted(&mut rec, 0, "still down".into(), &out(5), now);
        assert_eq!(rec.state, SagaState::NeedsAttention);
        assert_eq!(next(&rec), Next::Settled);
        assert_eq!(rec.error.as_deref(), Some("still down"));
        assert!(retry(&mut rec, now));
        assert_eq!(rec.state, SagaState::Compensating);
        assert_eq!(rec.error.as_deref(), Some("declined"), "the cause again");
        assert_eq!(next(&rec), Next::Compensate(0));
        compensated(&mut rec, 0, &out(1), &compensable, now);
        assert_eq!(rec.state, SagaState::Compensated);
        assert_eq!(rec.steps[0].compensation_attempts, 6);
        assert!(!retry(&mut rec, now), "only a parked saga can be retried");
    }

    #[test]
    fn a_parked_running_saga_resumes_running() {
        let now = Timestamp::now();
        let mut rec = new(2);
        needs_attention(&mut rec, "input does not decode".into(), now);
        assert_eq!(rec.resume, Some(SagaState::Running));
        assert!(retry(&mut rec, now));
        assert_eq!(next(&rec), Next::Action(0));
    }
}
