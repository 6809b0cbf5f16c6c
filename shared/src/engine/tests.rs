//! Property tests of the pure engine, plus unit tests pinning specific behaviours.
//!
//! The properties run random DAG workflows (1 to 12 `transform` steps, random `depends_on`,
//! retries, `continue_on_error`, literal `for_each` lists, and `when` conditions on a dependency's
//! status) through a simulated fleet of workers
//! driven by proptest's choices: tasks are claimed in random order, fail (transient, permanent,
//! rate limited) or time out, are delivered twice, and their results arrive late, out of order and
//! again. Checked along the way and at the end:
//!
//! 1. every run settles within a bound, and a finished run ignores every event but `Resume`;
//! 2. each step, and each for_each item, succeeds at most once;
//! 3. no step is scheduled or expanded before all its `depends_on` steps have settled;
//! 4. an event fed again right after it was applied is a no-op and leaves the state unchanged, and
//!    a result that was applied once changes nothing whenever it is delivered again;
//! 5. replaying the history rebuilds the live state, at the end and at random midpoints;
//! 6. a run fails exactly when some step failed for good without `continue_on_error`;
//! 7. a failed run that is resumed and then only succeeds finishes as succeeded, without starting
//!    again anything that had succeeded before the resume;
//!
//! and besides: retries follow each step's policy (count and error classes), for_each steps keep to
//! `max_concurrency` and collect their outputs in item order, a succeeded run has settled every
//! step, and every scheduled or running unit has its task or its result on the way (nothing lost).

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{Map, Value, json};

use super::*;
use crate::failure::{ErrorClass, StepError};
use crate::workflow::{Plan, RetryOn, Step};

const RUN_ID: &str = "run-1";
const WORKFLOW_ID: &str = "dag";
/// Events one drive of the simulation may feed before the run must have settled.
const BOUND: usize = 2_000;
/// Choices available to one simulated run; when they run out every choice is the benign one
/// (deliver the first task, succeed), so a run always comes to an end.
const DICE: usize = 4_000;

type Check = Result<(), TestCaseError>;

/// Fails the test case with a message and the simulation's trace.
macro_rules! check {
    ($sim:expr, $cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(TestCaseError::fail(format!(
                "{}\n{}",
                format_args!($($msg)+),
                $sim.report()
            )));
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Generated workflows
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct GenStep {
    /// Indices of earlier steps; empty makes the step a root (`"depends_on": []`).
    deps: Vec<usize>,
    /// `max_attempts`, and whether `retry_on` is `["all"]` (else the default classes).
    retry: Option<(u32, bool)>,
    continue_on_error: bool,
    /// How many literal items, and `max_concurrency`.
    for_each: Option<(usize, u32)>,
    /// A `when` on the last dependency: with `Some(true)` the step runs only if that dependency
    /// succeeded, with `Some(false)` only if it did not (failed with continue_on_error, skipped).
    when: Option<bool>,
}

fn gen_step(i: usize) -> impl Strategy<Value = GenStep> {
    (
        prop::collection::vec(prop::bool::weighted(0.35), i),
        prop::option::weighted(0.85, (1..=3u32, prop::bool::weighted(0.2))),
        prop::bool::weighted(0.3),
        prop::option::weighted(0.35, (0..=3usize, 1..=2u32)),
        prop::option::weighted(0.3, any::<bool>()),
    )
        .prop_map(|(mask, retry, continue_on_error, for_each, when)| GenStep {
            deps: mask
                .iter()
                .enumerate()
                .filter(|(_, on)| **on)
                .map(|(j, _)| j)
                .collect(),
            retry,
            continue_on_error,
            for_each,
            when,
        })
}

fn gen_steps() -> impl Strategy<Value = Vec<GenStep>> {
    (1..=12usize).prop_flat_map(|n| (0..n).map(gen_step).collect::<Vec<_>>())
}

fn workflow_doc(steps: &[GenStep]) -> Value {
    let steps: Vec<Value> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let deps: Vec<String> = s.deps.iter().map(|d| format!("s{d}")).collect();
            let mut step = json!({
                "id": format!("s{i}"),
                "type": "transform",
                "depends_on": deps,
                "params": {"value": format!("value of s{i}")},
            });
            if let Some((max_attempts, all)) = s.retry {
                step["retry"] = json!({
                    "max_attempts": max_attempts,
                    "initial_delay_s": 0,
                    "max_delay_s": 1,
                });
                if all {
                    step["retry"]["retry_on"] = json!(["all"]);
                }
            }
            if s.continue_on_error {
                step["continue_on_error"] = json!(true);
            }
            if let (Some(succeeded), Some(d)) = (s.when, s.deps.last()) {
                let op = if succeeded { "==" } else { "!=" };
                step["when"] = json!(format!("steps.s{d}.status {op} 'succeeded'"));
            }
            if let Some((items, max_concurrency)) = s.for_each {
                let items: Vec<String> = (0..items).map(|k| format!("item{k}")).collect();
                step["for_each"] = json!(items);
                step["max_concurrency"] = json!(max_concurrency);
                step["params"] = json!({"value": "{{ item }}"});
            }
            step
        })
        .collect();
    json!({"id": WORKFLOW_ID, "steps": steps})
}

fn compile(doc: &Value) -> Plan {
    Plan::from_json(&doc.to_string(), "generated")
        .unwrap_or_else(|e| panic!("a generated workflow must be valid:\n{e}\n{doc}"))
}

fn max_attempts(spec: &Step) -> u32 {
    spec.retry.as_ref().map_or(1, |p| p.max_attempts)
}

/// Whether the step's retry policy retries errors of this class.
fn retryable(spec: &Step, class: ErrorClass) -> bool {
    spec.retry.as_ref().is_some_and(|p| {
        p.retry_on.iter().any(|r| match r {
            RetryOn::All => true,
            RetryOn::RateLimited => class == ErrorClass::RateLimited,
            RetryOn::Timeout => class == ErrorClass::Timeout,
            RetryOn::Transient => class == ErrorClass::Transient,
        })
    })
}

fn unit_name(step: &str, index: Option<u32>) -> String {
    match index {
        Some(k) => format!("{step}[{k}]"),
        None => step.to_owned(),
    }
}

/// One line per history event for traces.
fn describe(kind: &HistoryKind) -> String {
    match kind {
        HistoryKind::StepScheduled {
            step,
            index,
            attempt,
            ..
        }
        | HistoryKind::StepStarted {
            step,
            index,
            attempt,
            ..
        }
        | HistoryKind::StepSucceeded {
            step,
            index,
            attempt,
            ..
        }
        | HistoryKind::StepRetryScheduled {
            step,
            index,
            attempt,
            ..
        } => format!("{}({}#{attempt})", kind.name(), unit_name(step, *index)),
        HistoryKind::StepFailed {
            step,
            index,
            attempt,
            error,
            disposition,
        } => format!(
            "StepFailed({}#{attempt} {} {disposition:?})",
            unit_name(step, *index),
            error.class.name()
        ),
        HistoryKind::StepExpanded { step, items } => {
            format!("StepExpanded({step} x{})", items.len())
        }
        other => match other.step() {
            Some(step) => format!("{}({step})", other.name()),
            None => other.name().to_owned(),
        },
    }
}

fn describe_event(event: &Event) -> String {
    match event {
        Event::StepStarted {
            step,
            index,
            attempt,
            lease_until_ms,
            ..
        } => format!(
            "claim {}#{attempt} lease<{lease_until_ms}",
            unit_name(step, *index)
        ),
        Event::StepSucceeded {
            step,
            index,
            attempt,
            ..
        } => format!("succeeded {}#{attempt}", unit_name(step, *index)),
        Event::StepFailed {
            step,
            index,
            attempt,
            error,
        } => format!(
            "failed {}#{attempt} {}",
            unit_name(step, *index),
            error.class.name()
        ),
        Event::StepTimedOut {
            step,
            index,
            attempt,
        } => format!("timed out {}#{attempt}", unit_name(step, *index)),
        other => format!("{other:?}"),
    }
}

/// The unit and attempt a result event is about.
fn result_unit(event: &Event) -> Option<(&str, Option<u32>, u32)> {
    match event {
        Event::StepSucceeded {
            step,
            index,
            attempt,
            ..
        }
        | Event::StepFailed {
            step,
            index,
            attempt,
            ..
        }
        | Event::StepTimedOut {
            step,
            index,
            attempt,
        } => Some((step, *index, *attempt)),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// The simulation
// ---------------------------------------------------------------------------------------------

/// proptest's choices, consumed one at a time.
struct Dice {
    values: Vec<u32>,
    next: usize,
}

impl Dice {
    /// A choice in `0..sides`; 0 once the choices run out.
    fn roll(&mut self, sides: usize) -> usize {
        let v = self.values.get(self.next).copied().unwrap_or(0);
        self.next += 1;
        v as usize % sides.max(1)
    }
}

/// A queue and a fleet of workers around one run. A worker that receives a task claims it; if the
/// claim is refused because another worker holds the lease, the task goes back to the queue until
/// the lease ends, else it is dropped. A worker that got the claim may die (its task comes back
/// when the lease ends), report at once, or report late.
struct Sim<'a> {
    plan: &'a Plan,
    doc: &'a Value,
    state: RunState,
    history: Vec<HistoryEvent>,
    /// Dispatched tasks not delivered yet, with their `not_before_ms`; a task may be here twice.
    bag: Vec<(Task, u64)>,
    /// Results of claimed attempts, held back to be delivered later in random order.
    late: Vec<Event>,
    /// Result events that were applied; redelivering one must change nothing.
    applied: Vec<Event>,
    /// Every event fed, in order.
    fed: Vec<Event>,
    /// States at random points, with the history length then.
    snapshots: Vec<(usize, RunState)>,
    trace: Vec<String>,
    now: u64,
    dice: Dice,
    /// When false, every attempt succeeds.
    failures: bool,
    /// Feed a Cancel once this many events have been fed.
    cancel_at: Option<usize>,
    stats: Stats,
}

/// How often the simulation met the situations the properties are about.
#[derive(Debug, Default)]
struct Stats {
    late_applied: usize,
    results_refused: usize,
    claims_refused: usize,
    redelivered: usize,
    requeued: usize,
    crashed: usize,
}

impl<'a> Sim<'a> {
    fn new(plan: &'a Plan, doc: &'a Value, dice: Vec<u32>) -> Sim<'a> {
        Sim {
            plan,
            doc,
            state: RunState::new(RUN_ID, WORKFLOW_ID),
            history: Vec::new(),
            bag: Vec::new(),
            late: Vec::new(),
            applied: Vec::new(),
            fed: Vec::new(),
            snapshots: Vec::new(),
            trace: Vec::new(),
            now: 1_000_000,
            dice: Dice {
                values: dice,
                next: 0,
            },
            failures: true,
            cancel_at: None,
            stats: Stats::default(),
        }
    }

    /// The workflow and the last events fed, for failure messages.
    fn report(&self) -> String {
        const TAIL: usize = 150;
        let skip = self.trace.len().saturating_sub(TAIL);
        let mut out = format!(
            "workflow: {}\nrun status: {:?}\nevents fed ({} in all{}):\n",
            self.doc,
            self.state.status,
            self.trace.len(),
            if skip > 0 { ", the last ones" } else { "" },
        );
        for line in &self.trace[skip..] {
            out.push_str(line);
            out.push('\n');
        }
        out
    }

    fn failure(&self, message: String) -> TestCaseError {
        TestCaseError::fail(format!("{message}\n{}", self.report()))
    }

    /// Feeds one event and checks what must hold of every transition.
    fn feed(&mut self, event: Event) -> Result<Transition, TestCaseError> {
        self.now += 1 + self.dice.roll(200) as u64;
        let ctx = Ctx {
            now_ms: self.now,
            random: self.dice.roll(1_000_000) as f64 / 1_000_000.0,
        };
        let before = self.state.clone();
        let tr = handle(self.plan, &mut self.state, event.clone(), ctx);
        let effects: Vec<String> = tr.history.iter().map(|h| describe(&h.kind)).collect();
        self.trace.push(format!(
            "#{} t={} {} -> [{}]",
            self.fed.len(),
            self.now,
            describe_event(&event),
            effects.join(", ")
        ));
        self.history.extend(tr.history.iter().cloned());
        self.fed.push(event.clone());

        check!(
            self,
            !tr.is_noop() || self.state == before,
            "a transition that recorded nothing changed the state"
        );
        // 1. A finished run ignores everything but Resume.
        check!(
            self,
            !before.status.is_terminal() || matches!(event, Event::Resume) || tr.is_noop(),
            "an event changed the {:?} run: {:?}",
            before.status,
            tr.history
        );
        // 4. The same event again, right away, changes nothing.
        let after = self.state.clone();
        let again = handle(self.plan, &mut self.state, event.clone(), ctx);
        check!(
            self,
            again.is_noop(),
            "feeding {} twice in a row acted twice: {:?}",
            describe_event(&event),
            again.history
        );
        check!(
            self,
            self.state == after,
            "feeding {} twice in a row changed the state",
            describe_event(&event)
        );

        for action in &tr.actions {
            if let Action::Dispatch {
                task,
                not_before_ms,
            } = action
            {
                check!(
                    self,
                    task.run_id == RUN_ID && task.kind == TaskKind::Execute,
                    "unexpected task {task:?}"
                );
                self.bag.push((task.clone(), *not_before_ms));
            }
        }
        self.check_concurrency()?;
        // 5. Replay at random midpoints (and again, from the prefix, at the end).
        if self.dice.roll(16) == 15 {
            let replayed = RunState::replay(RUN_ID, WORKFLOW_ID, &self.history);
            check!(
                self,
                replayed == self.state,
                "replaying the history mid-run gives a different state:\nreplayed: {replayed:?}\nlive: {:?}",
                self.state
            );
            self.snapshots
                .push((self.history.len(), self.state.clone()));
        }
        Ok(tr)
    }

    /// A for_each step never has more items in flight than its `max_concurrency`.
    fn check_concurrency(&self) -> Check {
        for (id, st) in &self.state.steps {
            if st.status != StepStatus::Running || st.items.is_none() {
                continue;
            }
            let Some(i) = self.plan.step_index(id) else {
                continue;
            };
            let limit = self
                .plan
                .step(i)
                .max_concurrency
                .unwrap_or(DEFAULT_MAX_CONCURRENCY);
            let busy = st
                .units
                .iter()
                .filter(|u| matches!(u.status, UnitStatus::Scheduled | UnitStatus::Running))
                .count();
            check!(
                self,
                busy <= limit as usize,
                "{id} has {busy} items in flight, max_concurrency is {limit}"
            );
        }
        Ok(())
    }

    /// While the run goes on, every scheduled unit has a task in the queue and every running unit
    /// a result on its way, so nothing can stall; `pending_dispatches` lists exactly those units.
    fn check_nothing_lost(&self) -> Check {
        if self.state.status != RunStatus::Running {
            return Ok(());
        }
        let pending = pending_dispatches(self.plan, &self.state, true);
        for action in &pending {
            let Action::Dispatch {
                task,
                not_before_ms,
            } = action
            else {
                continue;
            };
            let name = unit_name(&task.step, task.index);
            let status = self
                .state
                .step(&task.step)
                .and_then(|s| s.unit(task.index))
                .map(|u| u.status);
            match status {
                Some(UnitStatus::Scheduled) => check!(
                    self,
                    self.bag.contains(&(task.clone(), *not_before_ms)),
                    "{name}#{} is scheduled but no task for it is queued",
                    task.attempt
                ),
                Some(UnitStatus::Running) => {
                    check!(
                        self,
                        self.late.iter().any(|e| result_unit(e)
                            == Some((task.step.as_str(), task.index, task.attempt)))
                            || self.bag.iter().any(|(t, _)| t == task),
                        "{name}#{} is running but neither its result nor its task is on its way",
                        task.attempt
                    )
                }
                other => {
                    return Err(self.failure(format!(
                        "pending_dispatches lists {name} whose unit is {other:?}"
                    )));
                }
            }
        }
        let scheduled_only = pending_dispatches(self.plan, &self.state, false);
        let scheduled = self
            .state
            .steps
            .values()
            .filter(|s| s.status == StepStatus::Running)
            .flat_map(|s| &s.units)
            .filter(|u| u.status == UnitStatus::Scheduled)
            .count();
        check!(
            self,
            scheduled_only.len() == scheduled,
            "pending_dispatches(false) lists {} units, {scheduled} are scheduled",
            scheduled_only.len()
        );
        Ok(())
    }

    fn start(&mut self) -> Check {
        let tr = self.feed(Event::Start { inputs: Map::new() })?;
        check!(self, !tr.is_noop(), "Start did nothing");
        Ok(())
    }

    /// What the worker reports for an attempt.
    fn result_for(&mut self, task: &Task) -> Event {
        let (step, index, attempt) = (task.step.clone(), task.index, task.attempt);
        let roll = if self.failures { self.dice.roll(20) } else { 0 };
        let failed = |error| Event::StepFailed {
            step: step.clone(),
            index,
            attempt,
            error,
        };
        match roll {
            0..=12 => Event::StepSucceeded {
                step: step.clone(),
                index,
                attempt,
                output: json!({"step": step, "index": index, "attempt": attempt}),
            },
            13..=15 => failed(StepError::transient("flaky")),
            16 | 17 => failed(StepError::permanent("broken")),
            18 => {
                let mut error = StepError::new(ErrorClass::RateLimited, "slow down");
                error.retry_after_ms = Some(self.dice.roll(500) as u64);
                failed(error)
            }
            _ => Event::StepTimedOut {
                step: step.clone(),
                index,
                attempt,
            },
        }
    }

    fn deliver_result(&mut self, event: Event, late: bool) -> Check {
        if !self.feed(event.clone())?.is_noop() {
            self.applied.push(event);
            self.stats.late_applied += usize::from(late);
        } else {
            self.stats.results_refused += 1;
        }
        Ok(())
    }

    /// Delivers tasks and results until nothing is left to deliver.
    fn drive(&mut self) -> Check {
        let start = self.fed.len();
        loop {
            self.check_nothing_lost()?;
            if self.bag.is_empty() && self.late.is_empty() {
                return Ok(());
            }
            check!(
                self,
                self.fed.len() - start < BOUND,
                "the run did not settle within {BOUND} events"
            );
            if self.cancel_at.is_some_and(|at| self.fed.len() >= at) {
                self.cancel_at = None;
                self.feed(Event::Cancel {
                    reason: "test".into(),
                })?;
                continue;
            }
            // 4. A result applied before arrives again, late: it must change nothing.
            if !self.applied.is_empty() && self.dice.roll(12) == 11 {
                let k = self.dice.roll(self.applied.len());
                let event = self.applied[k].clone();
                let tr = self.feed(event.clone())?;
                check!(
                    self,
                    tr.is_noop(),
                    "{} was applied before and acted again when redelivered",
                    describe_event(&event)
                );
                self.stats.redelivered += 1;
                continue;
            }
            // A held-back result arrives, out of order.
            if !self.late.is_empty() && (self.bag.is_empty() || self.dice.roll(3) == 2) {
                let k = self.dice.roll(self.late.len());
                let event = self.late.swap_remove(k);
                self.deliver_result(event, true)?;
                continue;
            }
            // A worker receives a task; now and then the queue delivers it again later.
            let k = self.dice.roll(self.bag.len());
            let (task, not_before) = if self.dice.roll(6) == 5 {
                self.bag[k].clone()
            } else {
                self.bag.swap_remove(k)
            };
            self.now = self.now.max(not_before);
            // Leases are long enough to outlast the duplicate check but can expire while a result
            // is held back, so a redelivered task may be claimed again.
            let lease_ms = if self.dice.roll(3) == 2 {
                self.dice.roll(300)
            } else {
                self.dice.roll(3_000)
            };
            // feed advances the clock by at most 200 ms before the claim is applied.
            let lease_until_ms = self.now + 201 + lease_ms as u64;
            let claim = Event::StepStarted {
                step: task.step.clone(),
                index: task.index,
                attempt: task.attempt,
                lease_until_ms,
                steal: false,
            };
            if self.feed(claim)?.is_noop() {
                let live = pending_dispatches(self.plan, &self.state, true)
                    .iter()
                    .any(|a| matches!(a, Action::Dispatch { task: t, .. } if *t == task));
                if live {
                    // Another worker holds the lease: the queue delivers the task again once the
                    // lease has run out.
                    let lease = self
                        .state
                        .step(&task.step)
                        .and_then(|s| s.unit(task.index))
                        .map_or(self.now, |u| u.lease_until_ms);
                    self.bag.push((task, lease));
                    self.stats.requeued += 1;
                } else {
                    // Not claimable (a duplicate, a stale attempt, a finished run): dropped.
                    self.stats.claims_refused += 1;
                }
                continue;
            }
            if self.failures && self.dice.roll(25) == 24 {
                // The worker dies holding the claim; the queue delivers the task again later.
                self.bag.push((task, lease_until_ms));
                self.stats.crashed += 1;
                continue;
            }
            let result = self.result_for(&task);
            if self.dice.roll(4) == 3 {
                self.late.push(result);
            } else {
                self.deliver_result(result, false)?;
            }
        }
    }

    /// The checks on a run with nothing left to deliver.
    fn check_settled(&mut self) -> Check {
        let status = self.state.status;
        check!(
            self,
            status.is_terminal(),
            "nothing is left to deliver but the run is {status:?}"
        );
        // 5. Replay, from the whole history and from every snapshot's prefix.
        let replayed = RunState::replay(RUN_ID, WORKFLOW_ID, &self.history);
        check!(
            self,
            replayed == self.state,
            "replaying the history gives a different state:\nreplayed: {replayed:?}\nlive: {:?}",
            self.state
        );
        for (len, snapshot) in &self.snapshots {
            let replayed = RunState::replay(RUN_ID, WORKFLOW_ID, &self.history[..*len]);
            check!(
                self,
                replayed == *snapshot,
                "replaying the first {len} history events gives a different state than the live one then"
            );
        }
        self.check_history()?;

        // 6. Within the latest segment (since the last resume), the run failed exactly when a
        // step failed for good without continue_on_error, and it names that step.
        let segment = self
            .history
            .iter()
            .rposition(|e| matches!(e.kind, HistoryKind::RunResumed {}))
            .map_or(0, |p| p + 1);
        let fatal: Vec<&str> = self.history[segment..]
            .iter()
            .filter_map(|e| match &e.kind {
                HistoryKind::StepFailed {
                    step,
                    index: None,
                    disposition: Disposition::Fail,
                    ..
                } => Some(step.as_str()),
                _ => None,
            })
            .collect();
        match status {
            RunStatus::Succeeded => {
                check!(
                    self,
                    fatal.is_empty(),
                    "the run succeeded although {fatal:?} failed for good"
                );
                // Every step was reached and settled: nothing was left behind.
                for step in &self.plan.workflow.steps {
                    let settled = self.state.step(&step.id).is_some_and(StepState::settled_ok);
                    check!(
                        self,
                        settled,
                        "the run succeeded but {} is {:?}",
                        step.id,
                        self.state.step_status(&step.id)
                    );
                }
                let succeeded: BTreeSet<&str> = self
                    .state
                    .steps
                    .iter()
                    .filter(|(_, s)| s.status == StepStatus::Succeeded)
                    .map(|(id, _)| id.as_str())
                    .collect();
                let keys: BTreeSet<&str> = match &self.state.output {
                    Some(Value::Object(map)) => map.keys().map(String::as_str).collect(),
                    _ => BTreeSet::new(),
                };
                check!(
                    self,
                    keys == succeeded,
                    "the run's output has {keys:?}, the succeeded steps are {succeeded:?}"
                );
            }
            RunStatus::Failed => {
                check!(
                    self,
                    fatal.len() == 1,
                    "the run failed; steps that failed it: {fatal:?}"
                );
                let named = self.state.error.as_ref().and_then(|e| e.step.as_deref());
                check!(
                    self,
                    named == fatal.first().copied(),
                    "the run failed on {fatal:?} but its error names {named:?}"
                );
            }
            _ => {}
        }

        // 1. Everything fed so far, fed again now, changes nothing; nor do these.
        let mut replays: Vec<Event> = self
            .fed
            .iter()
            .filter(|e| !matches!(e, Event::Resume))
            .cloned()
            .collect();
        replays.extend([
            Event::Start { inputs: Map::new() },
            Event::Cancel {
                reason: "late".into(),
            },
            Event::Abort {
                step: None,
                reason: "late".into(),
            },
        ]);
        for event in replays {
            let before = self.state.clone();
            let tr = handle(
                self.plan,
                &mut self.state,
                event.clone(),
                Ctx {
                    now_ms: self.now + 1_000_000,
                    random: 0.5,
                },
            );
            check!(
                self,
                tr.is_noop() && self.state == before,
                "the finished run took {} again: {:?}",
                describe_event(&event),
                tr.history
            );
        }
        Ok(())
    }

    /// What the generated `when` of step `i` says, from its dependency's final status (which does
    /// not change once settled); None without a `when`.
    fn condition_holds(&self, i: usize) -> Option<bool> {
        let when = self.plan.step(i).when.as_ref()?;
        let d = *self.plan.graph.depends_on[i].last()?;
        let succeeded = self.state.step_status(&self.plan.step(d).id) == StepStatus::Succeeded;
        Some(succeeded == when.contains("=="))
    }

    /// 2, 3, and retries by policy, over the whole history.
    fn check_history(&self) -> Check {
        let plan = self.plan;
        let mut successes: BTreeMap<(String, Option<u32>), usize> = BTreeMap::new();
        let mut settled: BTreeSet<&str> = BTreeSet::new();
        // Retries since the unit's current budget started (with its last StepScheduled).
        let mut retries: BTreeMap<(String, Option<u32>), u32> = BTreeMap::new();
        let mut item_outputs: BTreeMap<(&str, u32), &Value> = BTreeMap::new();
        for (pos, event) in self.history.iter().enumerate() {
            let Some(step) = event.kind.step() else {
                continue;
            };
            let i = plan.step_index(step);
            check!(self, i.is_some(), "history names an unknown step {step}");
            let spec = plan.step(i.unwrap_or_default());
            let max = max_attempts(spec);
            match &event.kind {
                HistoryKind::StepSkipped { .. } => {
                    check!(
                        self,
                        self.condition_holds(i.unwrap_or_default()) == Some(false),
                        "{step} was skipped although its condition held"
                    );
                    settled.insert(step);
                }
                HistoryKind::StepExpanded { .. } | HistoryKind::StepScheduled { .. } => {
                    check!(
                        self,
                        self.condition_holds(i.unwrap_or_default()) != Some(false),
                        "{} although its condition does not hold",
                        describe(&event.kind)
                    );
                    for &d in &plan.graph.depends_on[i.unwrap_or_default()] {
                        let dep = plan.step(d).id.as_str();
                        check!(
                            self,
                            settled.contains(dep),
                            "history event {pos} {} comes before its dependency {dep} settled",
                            describe(&event.kind)
                        );
                    }
                    if let HistoryKind::StepScheduled { index, .. } = &event.kind {
                        retries.insert((step.to_owned(), *index), 0);
                    }
                }
                HistoryKind::StepSucceeded { index, output, .. } => {
                    let n = successes.entry((step.to_owned(), *index)).or_default();
                    *n += 1;
                    check!(
                        self,
                        *n == 1,
                        "{} succeeded {n} times (history event {pos})",
                        unit_name(step, *index)
                    );
                    match index {
                        Some(k) => {
                            item_outputs.insert((step, *k), output);
                        }
                        None => {
                            settled.insert(step);
                            if let Some(Value::Array(items)) = &spec.for_each {
                                let collected: Vec<Value> = (0..items.len() as u32)
                                    .map(|k| {
                                        item_outputs
                                            .get(&(step, k))
                                            .map_or(Value::Null, |v| (*v).clone())
                                    })
                                    .collect();
                                check!(
                                    self,
                                    (0..items.len() as u32)
                                        .all(|k| item_outputs.contains_key(&(step, k))),
                                    "{step} succeeded before all its items did"
                                );
                                check!(
                                    self,
                                    *output == Value::Array(collected.clone()),
                                    "{step}'s output {output} is not its items' outputs in item order {}",
                                    Value::Array(collected)
                                );
                            }
                        }
                    }
                }
                HistoryKind::StepRetryScheduled { index, .. } => {
                    let n = retries.entry((step.to_owned(), *index)).or_default();
                    *n += 1;
                    check!(
                        self,
                        *n < max,
                        "{} retried {n} times with max_attempts {max}",
                        unit_name(step, *index)
                    );
                }
                HistoryKind::StepFailed {
                    index,
                    error,
                    disposition,
                    ..
                } => {
                    let name = unit_name(step, *index);
                    let class_retried = retryable(spec, error.class);
                    let for_each = spec.for_each.is_some();
                    if *disposition == Disposition::Retry {
                        check!(
                            self,
                            class_retried,
                            "{name} was retried after a {} error its policy does not retry",
                            error.class.name()
                        );
                    } else if index.is_some() || !for_each {
                        // The unit's final failure: its budget is spent or the class not retried.
                        let used = retries
                            .get(&(step.to_owned(), *index))
                            .copied()
                            .unwrap_or(0)
                            + 1;
                        check!(
                            self,
                            !class_retried || used >= max,
                            "{name} failed for good after {used} of {max} attempts on a retryable {} error",
                            error.class.name()
                        );
                    }
                    if index.is_some() && *disposition != Disposition::Retry {
                        check!(
                            self,
                            *disposition == Disposition::Fail,
                            "item {name} failed for good with {disposition:?}"
                        );
                    }
                    if index.is_none() && for_each && *disposition != Disposition::Retry {
                        // A for_each step fails for good only through one of its items doing so.
                        let item_failed = pos > 0
                            && matches!(
                                &self.history[pos - 1].kind,
                                HistoryKind::StepFailed {
                                    step: s,
                                    index: Some(_),
                                    disposition: Disposition::Fail,
                                    error: e,
                                    ..
                                } if s == step && e == error
                            );
                        check!(
                            self,
                            item_failed,
                            "{step} failed for good (history event {pos}) without an item failing just before"
                        );
                    }
                    if index.is_none() {
                        let expected = if spec.continue_on_error {
                            Disposition::Continue
                        } else {
                            Disposition::Fail
                        };
                        check!(
                            self,
                            matches!(disposition, Disposition::Retry) || *disposition == expected,
                            "{name} failed for good with {disposition:?}, expected {expected:?}"
                        );
                        if *disposition == Disposition::Continue {
                            settled.insert(step);
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Property 7: resumes the failed (or cancelled) run and drives it to the end; nothing that
    /// had succeeded before is scheduled or started again.
    fn resume(&mut self, failures: bool) -> Check {
        let done: BTreeSet<(String, Option<u32>)> = self
            .history
            .iter()
            .filter_map(|e| match &e.kind {
                HistoryKind::StepSucceeded { step, index, .. } => Some((step.clone(), *index)),
                HistoryKind::StepSkipped { step, .. } => Some((step.clone(), None)),
                _ => None,
            })
            .collect();
        let mark = self.history.len();
        self.failures = failures;
        self.cancel_at = None;
        let was = self.state.status;
        let due: BTreeMap<(String, Option<u32>), u64> = self
            .state
            .steps
            .iter()
            .flat_map(|(id, st)| {
                let for_each = st.items.is_some();
                st.units.iter().enumerate().map(move |(k, u)| {
                    ((id.clone(), for_each.then_some(k as u32)), u.not_before_ms)
                })
            })
            .collect();
        let tr = self.feed(Event::Resume)?;
        check!(self, !tr.is_noop(), "Resume of the {was:?} run did nothing");
        // A restarted unit runs now, or when it was due if that is later.
        for event in &tr.history {
            if let HistoryKind::StepScheduled {
                step,
                index,
                not_before_ms,
                ..
            } = &event.kind
            {
                let was_due = due.get(&(step.clone(), *index)).copied().unwrap_or(0);
                check!(
                    self,
                    *not_before_ms == was_due.max(event.at_ms),
                    "{} restarted for {not_before_ms}, it was due at {was_due} (resumed at {})",
                    unit_name(step, *index),
                    event.at_ms
                );
            }
        }
        self.drive()?;
        for event in &self.history[mark..] {
            if let HistoryKind::StepScheduled { step, index, .. }
            | HistoryKind::StepStarted { step, index, .. } = &event.kind
            {
                let again =
                    done.contains(&(step.clone(), None)) || done.contains(&(step.clone(), *index));
                check!(
                    self,
                    !again,
                    "{} had succeeded before the resume and was {} again",
                    unit_name(step, *index),
                    event.kind.name()
                );
            }
            if let HistoryKind::StepExpanded { step, .. } = &event.kind {
                check!(
                    self,
                    !done.contains(&(step.clone(), None)),
                    "{step} had succeeded before the resume and was expanded again"
                );
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Properties 1 to 7 over random DAGs and random deliveries.
    #[test]
    fn random_dag_runs_settle_replay_and_resume(
        steps in gen_steps(),
        dice in prop::collection::vec(any::<u32>(), DICE),
        resumes_with_failures in 0..=2usize,
    ) {
        let doc = workflow_doc(&steps);
        let plan = compile(&doc);
        let mut sim = Sim::new(&plan, &doc, dice);
        sim.start()?;
        sim.drive()?;
        sim.check_settled()?;
        let status = sim.state.status;
        prop_assert!(
            matches!(status, RunStatus::Succeeded | RunStatus::Failed),
            "the run ended {:?}", status
        );
        // Resumes that may fail again, then one where every attempt succeeds.
        for _ in 0..resumes_with_failures {
            if sim.state.status != RunStatus::Failed {
                break;
            }
            sim.resume(true)?;
            sim.check_settled()?;
        }
        if sim.state.status == RunStatus::Failed {
            sim.resume(false)?;
            sim.check_settled()?;
            let status = sim.state.status;
            prop_assert!(
                status == RunStatus::Succeeded,
                "resumed with only successes, the run ended {:?}\n{}", status, sim.report()
            );
        }
    }

    /// A Cancel at a random point: everything after it is a no-op, and a resume with only
    /// successes finishes the run.
    #[test]
    fn cancelled_runs_ignore_everything_and_resume(
        steps in gen_steps(),
        dice in prop::collection::vec(any::<u32>(), DICE),
        cancel_at in 1..60usize,
    ) {
        let doc = workflow_doc(&steps);
        let plan = compile(&doc);
        let mut sim = Sim::new(&plan, &doc, dice);
        sim.cancel_at = Some(cancel_at);
        sim.start()?;
        sim.drive()?;
        sim.check_settled()?;
        if sim.state.status != RunStatus::Succeeded {
            sim.resume(false)?;
            sim.check_settled()?;
            let status = sim.state.status;
            prop_assert!(
                status == RunStatus::Succeeded,
                "resumed with only successes, the run ended {:?}\n{}", status, sim.report()
            );
        }
    }

    /// Retry delays are full jitter: uniform in [0, min(max, initial * 2^(n-1))], and a 429's
    /// `retry_after_ms` is a floor.
    #[test]
    fn retry_delays_are_full_jitter_under_the_exponential_ceiling(
        initial in 0.0..10.0f64,
        spread in 0.0..40.0f64,
        draws in prop::collection::vec(0.0..1.0f64, 1..=6),
        retry_after in prop::option::of(0..20_000u64),
    ) {
        let max = initial + spread;
        let failures = draws.len() as u32;
        let plan = plan(json!({"id": "w", "steps": [{"id": "a", "type": "transform",
            "params": {"value": 1},
            "retry": {"max_attempts": failures + 1, "initial_delay_s": initial, "max_delay_s": max}}]}));
        let (mut state, _) = started(&plan, json!({}));
        let mut now = 1_000;
        for (n, random) in (1..=failures).zip(draws) {
            now += 1_000;
            claim(&plan, &mut state, "a", None, n, now);
            let mut error = StepError::new(ErrorClass::RateLimited, "429");
            error.retry_after_ms = retry_after;
            let tr = handle(&plan, &mut state, Event::StepFailed {
                step: "a".into(), index: None, attempt: n, error,
            }, Ctx { now_ms: now, random });
            let (delay, not_before) = tr.history.iter().find_map(|e| match &e.kind {
                HistoryKind::StepRetryScheduled { delay_ms, not_before_ms, attempt, .. } => {
                    assert_eq!(*attempt, n + 1);
                    Some((*delay_ms, *not_before_ms))
                }
                _ => None,
            }).expect("a retry");
            let ceiling_s = (initial * 2f64.powi(n as i32 - 1)).min(max);
            let jitter = (ceiling_s * 1000.0 * random) as u64;
            prop_assert!(jitter as f64 <= ceiling_s * 1000.0);
            prop_assert_eq!(delay, jitter.max(retry_after.unwrap_or(0)), "retry {}", n);
            prop_assert_eq!(not_before, now + delay);
            prop_assert_eq!(&tasks(&tr), &vec![("a".to_owned(), None, n + 1, now + delay)]);
        }
    }
}

/// Guards the properties against vacuity: over fixed seeds, the simulation must meet every
/// situation they are about often enough.
#[test]
fn the_simulation_meets_every_situation_the_properties_are_about() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let mut runner = TestRunner::deterministic();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    let mut count = |what: &'static str, n: usize| *seen.entry(what).or_default() += n;
    for _ in 0..300 {
        let steps = gen_steps().new_tree(&mut runner).expect("steps").current();
        let dice = prop::collection::vec(any::<u32>(), DICE)
            .new_tree(&mut runner)
            .expect("dice")
            .current();
        let doc = workflow_doc(&steps);
        let plan = compile(&doc);
        let mut sim = Sim::new(&plan, &doc, dice);
        sim.start().expect("start");
        sim.drive().expect("drive");
        sim.check_settled().expect("settled");
        count("steps >= 8", usize::from(steps.len() >= 8));
        count("joins", steps.iter().filter(|s| s.deps.len() >= 2).count());
        let history = &sim.history;
        let kinds =
            |f: &dyn Fn(&HistoryKind) -> bool| history.iter().filter(|e| f(&e.kind)).count();
        count(
            "retries",
            kinds(&|k| matches!(k, HistoryKind::StepRetryScheduled { .. })),
        );
        count(
            "items succeeded",
            kinds(&|k| matches!(k, HistoryKind::StepSucceeded { index: Some(_), .. })),
        );
        count(
            "continued",
            kinds(&|k| {
                matches!(
                    k,
                    HistoryKind::StepFailed {
                        index: None,
                        disposition: Disposition::Continue,
                        ..
                    }
                )
            }),
        );
        count(
            "skipped",
            kinds(&|k| matches!(k, HistoryKind::StepSkipped { .. })),
        );
        count(
            "timeouts",
            kinds(
                &|k| matches!(k, HistoryKind::StepFailed { error, .. } if error.class == ErrorClass::Timeout),
            ),
        );
        let mut claims: BTreeMap<(String, Option<u32>, u32), usize> = BTreeMap::new();
        for e in history {
            if let HistoryKind::StepStarted {
                step,
                index,
                attempt,
                ..
            } = &e.kind
            {
                *claims.entry((step.clone(), *index, *attempt)).or_default() += 1;
            }
        }
        count(
            "claims taken over after a lease",
            claims.values().filter(|n| **n > 1).count(),
        );
        count("late results applied", sim.stats.late_applied);
        count("results refused", sim.stats.results_refused);
        count("claims refused", sim.stats.claims_refused);
        count("results redelivered", sim.stats.redelivered);
        count("tasks requeued behind a lease", sim.stats.requeued);
        count("workers crashed", sim.stats.crashed);
        match sim.state.status {
            RunStatus::Succeeded => count("succeeded", 1),
            _ => {
                count("failed", 1);
                sim.resume(false).expect("resume");
                sim.check_settled().expect("settled after resume");
                assert_eq!(sim.state.status, RunStatus::Succeeded);
                count("resumed", 1);
            }
        }
    }
    for (what, at_least) in [
        ("steps >= 8", 60),
        ("joins", 200),
        ("retries", 150),
        ("items succeeded", 200),
        ("continued", 30),
        ("skipped", 30),
        ("timeouts", 30),
        ("claims taken over after a lease", 10),
        ("late results applied", 200),
        ("results refused", 30),
        ("claims refused", 200),
        ("results redelivered", 100),
        ("tasks requeued behind a lease", 30),
        ("workers crashed", 30),
        ("succeeded", 50),
        ("failed", 50),
        ("resumed", 50),
    ] {
        let n = seen.get(what).copied().unwrap_or(0);
        assert!(n >= at_least, "{what}: {n} < {at_least}; all: {seen:?}");
    }
    eprintln!("{seen:?}");
}

// ---------------------------------------------------------------------------------------------
// Unit tests
// ---------------------------------------------------------------------------------------------

fn plan(doc: Value) -> Plan {
    Plan::from_json(&doc.to_string(), "unit").unwrap_or_else(|e| panic!("{e}"))
}

fn at(now_ms: u64) -> Ctx {
    Ctx {
        now_ms,
        random: 0.5,
    }
}

fn started(plan: &Plan, inputs: Value) -> (RunState, Transition) {
    let mut state = RunState::new("r", "w");
    let inputs = inputs.as_object().cloned().unwrap_or_default();
    let tr = handle(plan, &mut state, Event::Start { inputs }, at(1_000));
    (state, tr)
}

/// The dispatched tasks: (step, index, attempt, not_before_ms).
fn tasks(tr: &Transition) -> Vec<(String, Option<u32>, u32, u64)> {
    tr.actions
        .iter()
        .filter_map(|a| match a {
            Action::Dispatch {
                task,
                not_before_ms,
            } => Some((task.step.clone(), task.index, task.attempt, *not_before_ms)),
            _ => None,
        })
        .collect()
}

/// The dispatched units: (step, index, attempt).
fn units(tr: &Transition) -> Vec<(String, Option<u32>, u32)> {
    tasks(tr)
        .into_iter()
        .map(|(s, i, a, _)| (s, i, a))
        .collect()
}

fn claim(
    plan: &Plan,
    state: &mut RunState,
    step: &str,
    index: Option<u32>,
    attempt: u32,
    now: u64,
) {
    let tr = handle(
        plan,
        state,
        Event::StepStarted {
            step: step.into(),
            index,
            attempt,
            lease_until_ms: now + 60_000,
            steal: false,
        },
        at(now),
    );
    assert!(
        !tr.is_noop(),
        "claim of {step}[{index:?}]#{attempt} refused"
    );
}

fn succeed(
    plan: &Plan,
    state: &mut RunState,
    step: &str,
    index: Option<u32>,
    attempt: u32,
    output: Value,
    now: u64,
) -> Transition {
    claim(plan, state, step, index, attempt, now);
    handle(
        plan,
        state,
        Event::StepSucceeded {
            step: step.into(),
            index,
            attempt,
            output,
        },
        at(now + 1),
    )
}

fn fail(
    plan: &Plan,
    state: &mut RunState,
    step: &str,
    index: Option<u32>,
    attempt: u32,
    error: StepError,
    now: u64,
) -> Transition {
    claim(plan, state, step, index, attempt, now);
    handle(
        plan,
        state,
        Event::StepFailed {
            step: step.into(),
            index,
            attempt,
            error,
        },
        at(now + 1),
    )
}

fn retry_delay(tr: &Transition) -> Option<u64> {
    tr.history.iter().find_map(|e| match &e.kind {
        HistoryKind::StepRetryScheduled { delay_ms, .. } => Some(*delay_ms),
        _ => None,
    })
}

#[test]
fn retry_delay_follows_full_jitter_bounds() {
    let plan = plan(json!({"id": "w", "steps": [{"id": "a", "type": "transform",
        "params": {"value": 1},
        "retry": {"max_attempts": 6, "initial_delay_s": 1, "max_delay_s": 5}}]}));
    let (mut state, _) = started(&plan, json!({}));
    let mut now = 10_000;
    // Ceilings: 1 s, 2 s, 4 s, then capped at 5 s.
    for (n, ceiling_ms, random) in [
        (1u32, 1_000u64, 0.999),
        (2, 2_000, 0.25),
        (3, 4_000, 0.0),
        (4, 5_000, 0.999),
        (5, 5_000, 0.5),
    ] {
        claim(&plan, &mut state, "a", None, n, now);
        let tr = handle(
            &plan,
            &mut state,
            Event::StepFailed {
                step: "a".into(),
                index: None,
                attempt: n,
                error: StepError::transient("503"),
            },
            Ctx {
                now_ms: now,
                random,
            },
        );
        let delay = retry_delay(&tr).expect("retried");
        assert!(delay <= ceiling_ms, "retry {n}: {delay} > {ceiling_ms}");
        assert_eq!(delay, (ceiling_ms as f64 * random) as u64, "retry {n}");
        assert_eq!(tasks(&tr), vec![("a".into(), None, n + 1, now + delay)]);
        now += 10_000;
    }
    // The sixth attempt is the last.
    let tr = fail(
        &plan,
        &mut state,
        "a",
        None,
        6,
        StepError::transient("503"),
        now,
    );
    assert!(retry_delay(&tr).is_none());
    assert_eq!(state.status, RunStatus::Failed);
}

#[test]
fn rate_limited_retry_after_is_honoured() {
    let plan = plan(json!({"id": "w", "steps": [{"id": "a", "type": "transform",
        "params": {"value": 1},
        "retry": {"max_attempts": 4, "initial_delay_s": 1, "max_delay_s": 60}}]}));
    let (mut state, _) = started(&plan, json!({}));
    let limited = |after: u64| {
        let mut e = StepError::new(ErrorClass::RateLimited, "429 Too Many Requests");
        e.retry_after_ms = Some(after);
        e
    };
    // Longer than the jittered delay (at most 1 s): the service's word wins.
    let tr = fail(&plan, &mut state, "a", None, 1, limited(7_000), 2_000);
    assert_eq!(retry_delay(&tr), Some(7_000));
    assert_eq!(tasks(&tr), vec![("a".into(), None, 2, 2_001 + 7_000)]);
    // Shorter than the jittered delay: the backoff still applies (ceiling 2 s, random 0.5).
    let tr = fail(&plan, &mut state, "a", None, 2, limited(10), 20_000);
    assert_eq!(retry_delay(&tr), Some(1_000));
}

#[test]
fn errors_outside_retry_on_are_not_retried() {
    let plan = plan(json!({"id": "w", "steps": [{"id": "a", "type": "transform",
        "params": {"value": 1},
        "retry": {"max_attempts": 5, "retry_on": ["transient"]}}]}));
    let (mut state, _) = started(&plan, json!({}));
    let mut limited = StepError::new(ErrorClass::RateLimited, "429");
    limited.retry_after_ms = Some(5);
    let tr = fail(&plan, &mut state, "a", None, 1, limited, 2_000);
    assert!(retry_delay(&tr).is_none());
    assert_eq!(state.status, RunStatus::Failed);
    assert_eq!(
        state.error.as_ref().and_then(|e| e.step.as_deref()),
        Some("a")
    );
}

#[test]
fn a_false_when_skips_the_step_and_goes_to_its_next_step() {
    let doc = json!({"id": "w", "inputs": {"n": {"type": "integer"}}, "steps": [
        {"id": "a", "type": "transform", "params": {"value": 1},
         "when": "inputs.n > 5", "next_step": "c", "on_error": "b"},
        {"id": "b", "type": "transform", "params": {"value": "handled"}},
        {"id": "c", "type": "transform", "params": {"value": "{{ steps.a.output }}"}}
    ]});
    let plan = plan(doc);
    let (mut state, tr) = started(&plan, json!({"n": 3}));
    assert_eq!(state.step_status("a"), StepStatus::Skipped);
    assert!(tr.history.iter().any(|e| matches!(
        &e.kind,
        HistoryKind::StepSkipped { step, reason: SkipReason::Condition } if step == "a"
    )));
    // The flow goes to a's next_step (c), not to the step below it (b).
    assert_eq!(units(&tr), vec![("c".into(), None, 1)]);
    let ctx = context::context_json(&plan, &state, plan.step_index("c"), &Extras::default());
    assert_eq!(
        ctx["steps"]["a"],
        json!({"output": null, "status": "skipped"})
    );
    succeed(&plan, &mut state, "c", None, 1, json!(null), 2_000);
    assert_eq!(state.status, RunStatus::Succeeded);
    assert_eq!(state.step_status("b"), StepStatus::Pending);

    // When it holds, the step runs.
    let (state, tr) = started(&plan, json!({"n": 9}));
    assert_eq!(state.step_status("a"), StepStatus::Running);
    assert_eq!(units(&tr), vec![("a".into(), None, 1)]);
}

#[test]
fn a_choice_routes_to_the_first_matching_rule_else_the_default() {
    let plan = plan(
        json!({"id": "w", "inputs": {"n": {"type": "integer"}}, "steps": [
            {"id": "pick", "type": "choice", "choices": [
                {"when": "inputs.n > 10", "next": "big"},
                {"when": "inputs.n > 1", "next": "mid"},
                {"when": "inputs.n > 0", "next": "big"}
            ], "default": "small"},
            {"id": "big", "type": "transform", "params": {"value": "big"}, "next_step": null},
            {"id": "mid", "type": "transform", "params": {"value": "mid"}, "next_step": null},
            {"id": "small", "type": "transform", "params": {"value": "small"}}
        ]}),
    );
    // 20 matches rules 1 and 2 (the first wins); 3 matches rule 2 and 3; 0 matches none.
    for (n, target) in [(20, "big"), (3, "mid"), (1, "big"), (0, "small")] {
        let (mut state, tr) = started(&plan, json!({"n": n}));
        assert_eq!(units(&tr), vec![(target.to_owned(), None, 1)], "n = {n}");
        assert_eq!(
            state.step("pick").and_then(|s| s.output.clone()),
            Some(json!({"next": target}))
        );
        let tr = succeed(&plan, &mut state, target, None, 1, json!(target), 2_000);
        assert!(units(&tr).is_empty(), "n = {n}: the branch ends");
        assert_eq!(state.status, RunStatus::Succeeded);
        // The choice itself is not part of the run's output.
        let mut expected = Map::new();
        expected.insert(target.to_owned(), json!(target));
        assert_eq!(state.output, Some(Value::Object(expected)));
    }
}

#[test]
fn for_each_collects_outputs_in_item_order_when_items_finish_out_of_order() {
    let plan = plan(json!({"id": "w", "steps": [
        {"id": "each", "type": "transform", "for_each": ["a", "b", "c", "d"],
         "max_concurrency": 2, "params": {"value": "{{ item }}"},
         "retry": {"max_attempts": 2, "initial_delay_s": 0}}
    ]}));
    let (mut state, tr) = started(&plan, json!({}));
    assert_eq!(
        units(&tr),
        vec![("each".into(), Some(0), 1), ("each".into(), Some(1), 1)]
    );
    // Item 1 finishes first and frees a slot for item 2.
    let tr = succeed(&plan, &mut state, "each", Some(1), 1, json!("B"), 2_000);
    assert_eq!(units(&tr), vec![("each".into(), Some(2), 1)]);
    // Item 2 fails once and is retried in its own slot.
    let tr = fail(
        &plan,
        &mut state,
        "each",
        Some(2),
        1,
        StepError::transient("x"),
        3_000,
    );
    assert_eq!(units(&tr), vec![("each".into(), Some(2), 2)]);
    let tr = succeed(&plan, &mut state, "each", Some(2), 2, json!("C"), 4_000);
    assert_eq!(units(&tr), vec![("each".into(), Some(3), 1)]);
    succeed(&plan, &mut state, "each", Some(3), 1, json!("D"), 5_000);
    assert_eq!(state.status, RunStatus::Running);
    succeed(&plan, &mut state, "each", Some(0), 1, json!("A"), 6_000);
    assert_eq!(state.status, RunStatus::Succeeded);
    assert_eq!(
        state.step("each").and_then(|s| s.output.clone()),
        Some(json!(["A", "B", "C", "D"]))
    );
    assert_eq!(state.output, Some(json!({"each": ["A", "B", "C", "D"]})));
}

#[test]
fn an_empty_for_each_succeeds_at_once_with_an_empty_list() {
    let plan = plan(json!({"id": "w", "steps": [
        {"id": "each", "type": "transform", "for_each": [], "params": {"value": "{{ item }}"}},
        {"id": "after", "type": "transform", "params": {"value": "{{ steps.each.output | length }}"}}
    ]}));
    let (state, tr) = started(&plan, json!({}));
    assert_eq!(
        state.step("each").and_then(|s| s.output.clone()),
        Some(json!([]))
    );
    assert_eq!(units(&tr), vec![("after".into(), None, 1)]);
}

#[test]
fn on_error_routes_to_the_handler_with_the_error_in_scope() {
    let plan = plan(json!({"id": "w", "steps": [
        {"id": "risky", "type": "transform", "params": {"value": 1},
         "on_error": "handler", "next_step": "after"},
        {"id": "handler", "type": "transform", "params": {"value": "{{ error.message }}"}},
        {"id": "after", "type": "transform", "params": {"value": "done"}}
    ]}));
    let (mut state, _) = started(&plan, json!({}));
    let tr = fail(
        &plan,
        &mut state,
        "risky",
        None,
        1,
        StepError::permanent("boom"),
        2_000,
    );
    assert_eq!(units(&tr), vec![("handler".into(), None, 1)]);
    assert_eq!(state.status, RunStatus::Running);
    assert_eq!(
        state.step("risky").and_then(|s| s.disposition),
        Some(Disposition::OnError)
    );
    // The handler's params render with `{{error}}`, as a worker would render them.
    let handler = plan.step_index("handler").expect("handler");
    let ctx = context::context(&plan, &state, Some(handler), &Extras::default());
    let params = Value::Object(plan.step(handler).params.clone());
    let rendered = template::render_value(&params, &ctx).expect("renders");
    assert_eq!(rendered, json!({"value": "boom"}));
    let error = &context::context_json(&plan, &state, Some(handler), &Extras::default())["error"];
    assert_eq!(error["step"], json!("risky"));
    assert_eq!(error["class"], json!("permanent"));
    // The run carries on after the handler.
    let tr = succeed(
        &plan,
        &mut state,
        "handler",
        None,
        1,
        rendered["value"].clone(),
        3_000,
    );
    assert_eq!(units(&tr), vec![("after".into(), None, 1)]);
    succeed(&plan, &mut state, "after", None, 1, json!("done"), 4_000);
    assert_eq!(state.status, RunStatus::Succeeded);
    assert_eq!(
        state.output,
        Some(json!({"handler": "boom", "after": "done"}))
    );
}

#[test]
fn continue_on_error_gives_a_null_output_and_the_flow_continues() {
    let plan = plan(json!({"id": "w", "steps": [
        {"id": "a", "type": "transform", "params": {"value": 1}, "continue_on_error": true,
         "retry": {"max_attempts": 2, "initial_delay_s": 0}},
        {"id": "b", "type": "transform", "params": {"value": "{{ steps.a.output }}"}},
        {"id": "c", "type": "transform", "depends_on": ["a", "b"], "params": {"value": 3}}
    ]}));
    let (mut state, _) = started(&plan, json!({}));
    let tr = fail(
        &plan,
        &mut state,
        "a",
        None,
        1,
        StepError::transient("x"),
        2_000,
    );
    assert_eq!(units(&tr), vec![("a".into(), None, 2)]);
    let tr = fail(
        &plan,
        &mut state,
        "a",
        None,
        2,
        StepError::transient("x"),
        3_000,
    );
    assert_eq!(units(&tr), vec![("b".into(), None, 1)]);
    let a = state.step("a").expect("a");
    assert_eq!(a.status, StepStatus::Failed);
    assert_eq!(a.disposition, Some(Disposition::Continue));
    assert_eq!(a.output, Some(Value::Null));
    let ctx = context::context_json(&plan, &state, plan.step_index("b"), &Extras::default());
    assert_eq!(ctx["steps"]["a"]["output"], Value::Null);
    // The join counts a's failure as settled.
    let tr = succeed(&plan, &mut state, "b", None, 1, json!(null), 4_000);
    assert_eq!(units(&tr), vec![("c".into(), None, 1)]);
    succeed(&plan, &mut state, "c", None, 1, json!(3), 5_000);
    assert_eq!(state.status, RunStatus::Succeeded);
    assert_eq!(state.output, Some(json!({"b": null, "c": 3})));
}

#[test]
fn after_a_cancel_every_later_result_is_a_noop() {
    let plan = plan(json!({"id": "w", "steps": [
        {"id": "a", "type": "transform", "params": {"value": 1}, "depends_on": []},
        {"id": "b", "type": "transform", "params": {"value": 1}, "depends_on": []},
        {"id": "c", "type": "transform", "params": {"value": 1}, "depends_on": ["a", "b"]}
    ]}));
    let (mut state, _) = started(&plan, json!({}));
    claim(&plan, &mut state, "a", None, 1, 2_000);
    let tr = handle(
        &plan,
        &mut state,
        Event::Cancel {
            reason: "user".into(),
        },
        at(3_000),
    );
    assert_eq!(tr.actions, vec![Action::CancelRun]);
    assert_eq!(state.status, RunStatus::Cancelled);
    assert!(pending_dispatches(&plan, &state, true).is_empty());
    let before = state.clone();
    let late = [
        Event::StepSucceeded {
            step: "a".into(),
            index: None,
            attempt: 1,
            output: json!(1),
        },
        Event::StepFailed {
            step: "a".into(),
            index: None,
            attempt: 1,
            error: StepError::permanent("x"),
        },
        Event::StepTimedOut {
            step: "a".into(),
            index: None,
            attempt: 1,
        },
        Event::StepStarted {
            step: "b".into(),
            index: None,
            attempt: 1,
            lease_until_ms: 99_999,
            steal: true,
        },
        Event::TimerFired {
            step: "b".into(),
            index: None,
            attempt: 1,
        },
        Event::Cancel {
            reason: "again".into(),
        },
        Event::Abort {
            step: None,
            reason: "x".into(),
        },
        Event::Start { inputs: Map::new() },
    ];
    for event in late {
        let tr = handle(&plan, &mut state, event.clone(), at(4_000));
        assert!(tr.is_noop(), "{event:?} acted after the cancel: {tr:?}");
        assert_eq!(state, before, "{event:?} changed the cancelled run");
    }
}

#[test]
fn a_wait_step_schedules_a_timer_and_timer_fired_completes_it() {
    let plan = plan(json!({"id": "w", "steps": [
        {"id": "pause", "type": "wait", "params": {"seconds": 1.5}},
        {"id": "after", "type": "transform", "params": {"value": "{{ steps.pause.output.waited_until }}"}}
    ]}));
    let mut state = RunState::new("r", "w");
    let tr = handle(
        &plan,
        &mut state,
        Event::Start { inputs: Map::new() },
        at(10_000),
    );
    let timer: Vec<(TaskKind, u64)> = tr
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Dispatch {
                task,
                not_before_ms,
            } => Some((task.kind, *not_before_ms)),
            _ => None,
        })
        .collect();
    assert_eq!(timer, vec![(TaskKind::Timer, 11_500)]);
    assert_eq!(state.step_status("pause"), StepStatus::Running);
    let fired = Event::TimerFired {
        step: "pause".into(),
        index: None,
        attempt: 1,
    };
    let tr = handle(&plan, &mut state, fired.clone(), at(11_500));
    assert_eq!(units(&tr), vec![("after".into(), None, 1)]);
    assert_eq!(state.step_status("pause"), StepStatus::Succeeded);
    assert_eq!(
        state.step("pause").and_then(|s| s.output.clone()),
        Some(json!({"waited_until": "1970-01-01T00:00:11.500Z"}))
    );
    // The timer firing twice completes it once.
    assert!(handle(&plan, &mut state, fired, at(11_600)).is_noop());
    // A TimerFired for a step that is not a wait does nothing.
    let not_a_timer = Event::TimerFired {
        step: "after".into(),
        index: None,
        attempt: 1,
    };
    assert!(handle(&plan, &mut state, not_a_timer, at(11_700)).is_noop());
}

#[test]
fn a_lease_keeps_others_out_until_it_ends_or_the_owner_is_known_dead() {
    let plan = plan(
        json!({"id": "w", "steps": [{"id": "a", "type": "transform", "params": {"value": 1}}]}),
    );
    let (mut state, _) = started(&plan, json!({}));
    let claim = |lease: u64, steal: bool| Event::StepStarted {
        step: "a".into(),
        index: None,
        attempt: 1,
        lease_until_ms: lease,
        steal,
    };
    assert!(!handle(&plan, &mut state, claim(5_000, false), at(2_000)).is_noop());
    assert!(handle(&plan, &mut state, claim(6_000, false), at(4_999)).is_noop());
    assert!(!handle(&plan, &mut state, claim(9_000, false), at(5_000)).is_noop());
    assert!(!handle(&plan, &mut state, claim(12_000, true), at(6_000)).is_noop());
    // A stale attempt number is never claimable.
    let stale = Event::StepStarted {
        step: "a".into(),
        index: None,
        attempt: 2,
        lease_until_ms: 20_000,
        steal: true,
    };
    assert!(handle(&plan, &mut state, stale, at(7_000)).is_noop());
}

#[test]
fn resume_restarts_failed_work_with_a_fresh_retry_budget_and_keeps_what_succeeded() {
    let plan = plan(json!({"id": "w", "steps": [
        {"id": "ok", "type": "transform", "params": {"value": 1}, "depends_on": []},
        {"id": "flaky", "type": "transform", "params": {"value": 2}, "depends_on": [],
         "retry": {"max_attempts": 2, "initial_delay_s": 0}},
        {"id": "join", "type": "transform", "params": {"value": 3}, "depends_on": ["ok", "flaky"]}
    ]}));
    let (mut state, _) = started(&plan, json!({}));
    succeed(&plan, &mut state, "ok", None, 1, json!("kept"), 2_000);
    fail(
        &plan,
        &mut state,
        "flaky",
        None,
        1,
        StepError::transient("x"),
        3_000,
    );
    fail(
        &plan,
        &mut state,
        "flaky",
        None,
        2,
        StepError::transient("x"),
        4_000,
    );
    assert_eq!(state.status, RunStatus::Failed);
    // Late news for the failed run changes nothing.
    assert!(
        handle(
            &plan,
            &mut state,
            Event::StepSucceeded {
                step: "flaky".into(),
                index: None,
                attempt: 2,
                output: json!(0)
            },
            at(4_500)
        )
        .is_noop()
    );
    let tr = handle(&plan, &mut state, Event::Resume, at(5_000));
    assert_eq!(units(&tr), vec![("flaky".into(), None, 3)]);
    assert_eq!(state.status, RunStatus::Running);
    assert!(state.error.is_none());
    assert!(handle(&plan, &mut state, Event::Resume, at(5_001)).is_noop());
    // Attempt 3 starts a new budget of 2: it is retried once more.
    let tr = fail(
        &plan,
        &mut state,
        "flaky",
        None,
        3,
        StepError::transient("x"),
        6_000,
    );
    assert_eq!(units(&tr), vec![("flaky".into(), None, 4)]);
    let tr = succeed(&plan, &mut state, "flaky", None, 4, json!(2), 7_000);
    assert_eq!(units(&tr), vec![("join".into(), None, 1)]);
    succeed(&plan, &mut state, "join", None, 1, json!(3), 8_000);
    assert_eq!(state.status, RunStatus::Succeeded);
    assert_eq!(
        state.output,
        Some(json!({"ok": "kept", "flaky": 2, "join": 3}))
    );
}

#[test]
fn pending_dispatches_bring_back_queued_and_optionally_running_units() {
    let plan = plan(json!({"id": "w", "steps": [
        {"id": "a", "type": "transform", "params": {"value": 1}, "depends_on": []},
        {"id": "each", "type": "transform", "for_each": [1, 2, 3], "max_concurrency": 2,
         "params": {"value": "{{ item }}"}, "depends_on": []}
    ]}));
    let (mut state, tr) = started(&plan, json!({}));
    let listed = |state: &RunState, running: bool| {
        let mut out: Vec<(String, Option<u32>, u32)> = pending_dispatches(&plan, state, running)
            .iter()
            .filter_map(|a| match a {
                Action::Dispatch { task, .. } => {
                    Some((task.step.clone(), task.index, task.attempt))
                }
                _ => None,
            })
            .collect();
        out.sort();
        out
    };
    let mut first = units(&tr);
    first.sort();
    assert_eq!(listed(&state, false), first);
    claim(&plan, &mut state, "each", Some(0), 1, 2_000);
    assert_eq!(
        listed(&state, false),
        vec![("a".into(), None, 1), ("each".into(), Some(1), 1)]
    );
    assert_eq!(listed(&state, true), first);
}

#[test]
fn duplicate_start_and_unknown_steps_are_noops() {
    let plan = plan(
        json!({"id": "w", "steps": [{"id": "a", "type": "transform", "params": {"value": 1}}]}),
    );
    let (mut state, _) = started(&plan, json!({}));
    let before = state.clone();
    for event in [
        Event::Start { inputs: Map::new() },
        Event::StepStarted {
            step: "nope".into(),
            index: None,
            attempt: 1,
            lease_until_ms: 9_999,
            steal: false,
        },
        // An index on a step without for_each.
        Event::StepStarted {
            step: "a".into(),
            index: Some(0),
            attempt: 1,
            lease_until_ms: 9_999,
            steal: false,
        },
        // A result without a claim.
        Event::StepSucceeded {
            step: "a".into(),
            index: None,
            attempt: 1,
            output: json!(1),
        },
    ] {
        assert!(
            handle(&plan, &mut state, event.clone(), at(2_000)).is_noop(),
            "{event:?}"
        );
        assert_eq!(state, before);
    }
}

#[test]
fn resume_keeps_a_pending_wait_due_when_it_was() {
    let plan = plan(json!({"id": "w", "steps": [
        {"id": "pause", "type": "wait", "params": {"seconds": 3600}, "depends_on": []},
        {"id": "boom", "type": "transform", "params": {"value": 1}, "depends_on": []},
        {"id": "after", "type": "transform", "params": {"value": 2}, "depends_on": ["pause", "boom"]}
    ]}));
    let due = 1_000 + 3_600_000;
    let timer_due = |state: &RunState, tr: &Transition| {
        let dispatched = tasks(tr)
            .into_iter()
            .find(|(step, ..)| step == "pause")
            .map(|(.., not_before)| not_before);
        let stored = state
            .step("pause")
            .and_then(|s| s.unit(None))
            .map(|u| u.not_before_ms);
        (dispatched, stored)
    };
    // A failed run, resumed ten seconds later.
    let (mut state, tr) = started(&plan, json!({}));
    assert_eq!(timer_due(&state, &tr), (Some(due), Some(due)));
    fail(
        &plan,
        &mut state,
        "boom",
        None,
        1,
        StepError::permanent("x"),
        2_000,
    );
    assert_eq!(state.status, RunStatus::Failed);
    let tr = handle(&plan, &mut state, Event::Resume, at(12_000));
    assert_eq!(timer_due(&state, &tr), (Some(due), Some(due)));
    // A cancelled run, resumed a minute later.
    let (mut state, _) = started(&plan, json!({}));
    let cancel = Event::Cancel {
        reason: "pause".into(),
    };
    handle(&plan, &mut state, cancel, at(2_000));
    let tr = handle(&plan, &mut state, Event::Resume, at(62_000));
    assert_eq!(timer_due(&state, &tr), (Some(due), Some(due)));
    // Work that was due in the past restarts now.
    assert_eq!(
        tasks(&tr).into_iter().find(|(step, ..)| step == "boom"),
        Some(("boom".into(), None, 2, 62_000))
    );
}

/// A step that failed the run before any attempt (its `when`, its `for_each` list or its choice
/// rules could not be evaluated) is evaluated again on resume, never run as it stands.
#[test]
fn resume_evaluates_again_a_step_that_failed_before_any_attempt() {
    let doc = |step: Value| {
        json!({"id": "w", "inputs": {"obj": {"type": "object"}}, "steps": [
            {"id": "first", "type": "transform", "params": {"value": 1}},
            step,
            {"id": "last", "type": "transform", "params": {"value": 2}}
        ]})
    };
    let cases = [
        json!({"id": "s", "type": "transform", "params": {"value": 1}, "when": "inputs.obj.x > 1"}),
        json!({"id": "s", "type": "transform", "params": {"value": "{{ item }}"}, "for_each": "{{ inputs.obj }}"}),
        json!({"id": "s", "type": "choice", "choices": [{"when": "inputs.obj.x > 1", "next": "last"}]}),
    ];
    for step in cases {
        let plan = plan(doc(step.clone()));
        let (mut state, _) = started(&plan, json!({"obj": {}}));
        succeed(&plan, &mut state, "first", None, 1, json!(1), 2_000);
        assert_eq!(state.status, RunStatus::Failed, "{step}");
        let failed_before = state.step("s").and_then(|s| s.error.clone());
        let tr = handle(&plan, &mut state, Event::Resume, at(3_000));
        // The step is evaluated again (and, its inputs unchanged, fails the run again): it is not
        // dispatched as a task.
        assert!(tasks(&tr).is_empty(), "{step}: {:?}", tr.history);
        let kinds: Vec<&str> = tr.history.iter().map(|e| e.kind.name()).collect();
        assert_eq!(kinds, ["RunResumed", "StepFailed", "RunFailed"], "{step}");
        assert_eq!(state.step("s").and_then(|s| s.error.clone()), failed_before);
    }
}
