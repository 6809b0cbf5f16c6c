//! The pure engine: `(run state, event) -> (history events, actions)`. It does no I/O, reads no
//! clock and draws no random numbers: time and randomness arrive in [`Ctx`]. Every change it makes is
//! a [`HistoryEvent`] applied through [`RunState::apply`], so a run's history replays to its state.
//! An event that does not fit the state (a duplicate, a late result of an old attempt, anything for
//! a finished run) changes nothing and yields no actions.

pub mod context;
pub mod state;

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::failure::{ErrorClass, StepError};
use crate::template;
use crate::workflow::{Plan, RetryOn, StepKind};
pub use context::Extras;
pub use state::*;

#[cfg(test)]
mod tests;

/// Default for_each concurrency.
pub const DEFAULT_MAX_CONCURRENCY: u32 = 10;

/// Something that happened to a run, fed to [`handle`].
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Start {
        inputs: Map<String, Value>,
    },
    /// A worker claims an attempt. `steal` lets it take over a running attempt whose worker is
    /// known to be dead before its lease runs out.
    StepStarted {
        step: String,
        index: Option<u32>,
        attempt: u32,
        lease_until_ms: u64,
        steal: bool,
    },
    StepSucceeded {
        step: String,
        index: Option<u32>,
        attempt: u32,
        output: Value,
    },
    StepFailed {
        step: String,
        index: Option<u32>,
        attempt: u32,
        error: StepError,
    },
    StepTimedOut {
        step: String,
        index: Option<u32>,
        attempt: u32,
    },
    TimerFired {
        step: String,
        index: Option<u32>,
        attempt: u32,
    },
    Cancel {
        reason: String,
    },
    /// The run cannot go on (e.g. a task failed every delivery): it fails with this reason.
    Abort {
        step: Option<String>,
        reason: String,
    },
    Resume,
}

/// What the engine is given besides state and event.
#[derive(Debug, Clone, Copy)]
pub struct Ctx {
    pub now_ms: u64,
    /// A uniform draw in [0, 1), used for retry jitter.
    pub random: f64,
}

/// The kind of work a queued task asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Execute a step attempt.
    Execute,
    /// A `wait` step's time has come.
    Timer,
}

/// One message on the step queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub run_id: String,
    pub step: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    pub attempt: u32,
    pub kind: TaskKind,
}

/// What the caller must do after a transition.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Dispatch { task: Task, not_before_ms: u64 },
    CompleteRun { output: Value },
    FailRun { error: RunError },
    CancelRun,
}

/// The outcome of one event.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Transition {
    pub history: Vec<HistoryEvent>,
    pub actions: Vec<Action>,
}

impl Transition {
    pub fn is_noop(&self) -> bool {
        self.history.is_empty()
    }
}

/// Applies `event` to `state`, returning what was recorded and what must be done.
pub fn handle(plan: &Plan, state: &mut RunState, event: Event, ctx: Ctx) -> Transition {
    let mut tx = Tx {
        plan,
        state,
        ctx,
        out: Vec::new(),
        work: VecDeque::new(),
    };
    tx.event(event);
    let actions = actions_for(plan, &tx.state.run_id, &tx.out);
    Transition {
        history: tx.out,
        actions,
    }
}

/// The dispatches that bring a run's in-flight units back to a queue, e.g. after a crash lost
/// them. With `include_running`, units that were running are dispatched too (the caller knows
/// their worker is gone).
pub fn pending_dispatches(plan: &Plan, state: &RunState, include_running: bool) -> Vec<Action> {
    let mut out = Vec::new();
    if state.status != RunStatus::Running {
        return out;
    }
    for (id, st) in &state.steps {
        if st.status != StepStatus::Running {
            continue;
        }
        let Some(i) = plan.step_index(id) else {
            continue;
        };
        for (u, unit) in st.units.iter().enumerate() {
            let live = match unit.status {
                UnitStatus::Scheduled => true,
                UnitStatus::Running => include_running,
                _ => false,
            };
            if live {
                let index = st.items.as_ref().map(|_| u as u32);
                out.push(Action::Dispatch {
                    task: task_for(plan, i, &state.run_id, id, index, unit.attempt),
                    not_before_ms: unit.not_before_ms,
                });
            }
        }
    }
    out
}

fn task_for(
    plan: &Plan,
    i: usize,
    run_id: &str,
    step: &str,
    index: Option<u32>,
    attempt: u32,
) -> Task {
    Task {
        run_id: run_id.to_owned(),
        step: step.to_owned(),
        index,
        attempt,
        kind: if plan.step(i).kind == StepKind::Wait {
            TaskKind::Timer
        } else {
            TaskKind::Execute
        },
    }
}

fn actions_for(plan: &Plan, run_id: &str, history: &[HistoryEvent]) -> Vec<Action> {
    let mut actions = Vec::new();
    for ev in history {
        match &ev.kind {
            HistoryKind::StepScheduled {
                step,
                index,
                attempt,
                not_before_ms,
            }
            | HistoryKind::StepRetryScheduled {
                step,
                index,
                attempt,
                not_before_ms,
                ..
            } => {
                if let Some(i) = plan.step_index(step) {
                    actions.push(Action::Dispatch {
                        task: task_for(plan, i, run_id, step, *index, *attempt),
                        not_before_ms: *not_before_ms,
                    });
                }
            }
            HistoryKind::RunSucceeded { output } => actions.push(Action::CompleteRun {
                output: output.clone(),
            }),
            HistoryKind::RunFailed { error } => actions.push(Action::FailRun {
                error: error.clone(),
            }),
            HistoryKind::RunCancelled { .. } => actions.push(Action::CancelRun),
            _ => {}
        }
    }
    actions
}

/// Work queued inside one transition, so long chains of skips need no recursion.
enum Work {
    Activate(usize),
    Settled(usize),
}

struct Tx<'a> {
    plan: &'a Plan,
    state: &'a mut RunState,
    ctx: Ctx,
    out: Vec<HistoryEvent>,
    work: VecDeque<Work>,
}

impl Tx<'_> {
    fn record(&mut self, kind: HistoryKind) {
        let event = HistoryEvent {
            at_ms: self.ctx.now_ms,
            kind,
        };
        self.state.apply(&event);
        self.out.push(event);
    }

    fn running(&self) -> bool {
        self.state.status == RunStatus::Running
    }

    /// The unit an attempt event is about, if it is the one the event names.
    fn live_unit(&self, step: &str, index: Option<u32>, attempt: u32) -> Option<&UnitState> {
        if !self.running() {
            return None;
        }
        let st = self.state.step(step)?;
        if st.status != StepStatus::Running || st.items.is_some() != index.is_some() {
            return None;
        }
        st.unit(index).filter(|u| u.attempt == attempt)
    }

    fn event(&mut self, event: Event) {
        match event {
            Event::Start { inputs } => {
                if self.state.seq == 0 {
                    self.record(HistoryKind::RunStarted { inputs });
                    for &i in &self.plan.graph.entries {
                        self.work.push_back(Work::Activate(i));
                    }
                    self.drain();
                }
            }
            Event::StepStarted {
                step,
                index,
                attempt,
                lease_until_ms,
                steal,
            } => {
                let now = self.ctx.now_ms;
                let grant = self
                    .live_unit(&step, index, attempt)
                    .is_some_and(|u| match u.status {
                        UnitStatus::Scheduled => true,
                        UnitStatus::Running => steal || now >= u.lease_until_ms,
                        _ => false,
                    });
                if grant {
                    self.record(HistoryKind::StepStarted {
                        step,
                        index,
                        attempt,
                        lease_until_ms,
                    });
                }
            }
            Event::StepSucceeded {
                step,
                index,
                attempt,
                output,
            } => {
                let claimed = self
                    .live_unit(&step, index, attempt)
                    .is_some_and(|u| u.status == UnitStatus::Running);
                let Some(i) = self.plan.step_index(&step) else {
                    return;
                };
                if claimed {
                    self.unit_succeeded(i, index, attempt, output);
                    self.drain();
                }
            }
            Event::StepFailed {
                step,
                index,
                attempt,
                error,
            } => self.failed(&step, index, attempt, error),
            Event::StepTimedOut {
                step,
                index,
                attempt,
            } => {
                let limit = self
                    .plan
                    .step_index(&step)
                    .and_then(|i| self.plan.step(i).timeout_s)
                    .unwrap_or_default();
                let error = StepError::new(
                    ErrorClass::Timeout,
                    format!("attempt {attempt} took longer than timeout_s = {limit}"),
                );
                self.failed(&step, index, attempt, error);
            }
            Event::TimerFired {
                step,
                index,
                attempt,
            } => {
                let due = self
                    .live_unit(&step, index, attempt)
                    .filter(|u| u.status == UnitStatus::Scheduled)
                    .map(|u| u.not_before_ms);
                let Some(i) = self.plan.step_index(&step) else {
                    return;
                };
                if let Some(due) = due
                    && self.plan.step(i).kind == StepKind::Wait
                {
                    self.record(HistoryKind::StepStarted {
                        step: step.clone(),
                        index,
                        attempt,
                        lease_until_ms: due,
                    });
                    let output = json!({ "waited_until": humantime::format_rfc3339_millis(
                        std::time::UNIX_EPOCH + std::time::Duration::from_millis(due)
                    ).to_string() });
                    self.unit_succeeded(i, index, attempt, output);
                    self.drain();
                }
            }
            Event::Cancel { reason } => {
                if !self.state.status.is_terminal() {
                    self.record(HistoryKind::RunCancelled { reason });
                }
            }
            Event::Abort { step, reason } => {
                if !self.state.status.is_terminal() {
                    self.record(HistoryKind::RunFailed {
                        error: RunError {
                            step,
                            message: reason,
                        },
                    });
                }
            }
            Event::Resume => self.resume(),
        }
    }

    fn failed(&mut self, step: &str, index: Option<u32>, attempt: u32, error: StepError) {
        let unit = self
            .live_unit(step, index, attempt)
            .filter(|u| u.status == UnitStatus::Running)
            .cloned();
        let (Some(unit), Some(i)) = (unit, self.plan.step_index(step)) else {
            return;
        };
        let spec = self.plan.step(i);
        if let Some(policy) = &spec.retry {
            let used = attempt.saturating_sub(unit.budget_start) + 1;
            let class_ok = policy.retry_on.iter().any(|r| match r {
                RetryOn::All => true,
                RetryOn::RateLimited => error.class == ErrorClass::RateLimited,
                RetryOn::Timeout => error.class == ErrorClass::Timeout,
                RetryOn::Transient => error.class == ErrorClass::Transient,
            });
            if class_ok && used < policy.max_attempts {
                // Full jitter: uniform in [0, min(max, initial * 2^(n-1))].
                let ceiling =
                    (policy.initial_delay_s * 2f64.powi(used as i32 - 1)).min(policy.max_delay_s);
                let mut delay_ms = (ceiling * 1000.0 * self.ctx.random) as u64;
                if let Some(after) = error.retry_after_ms {
                    delay_ms = delay_ms.max(after);
                }
                self.record(HistoryKind::StepFailed {
                    step: step.to_owned(),
                    index,
                    attempt,
                    error,
                    disposition: Disposition::Retry,
                });
                self.record(HistoryKind::StepRetryScheduled {
                    step: step.to_owned(),
                    index,
                    attempt: attempt + 1,
                    delay_ms,
                    not_before_ms: self.ctx.now_ms + delay_ms,
                });
                return;
            }
        }
        if index.is_some() {
            // One item failed for good: the for_each step fails with it.
            self.record(HistoryKind::StepFailed {
                step: step.to_owned(),
                index,
                attempt,
                error: error.clone(),
                disposition: Disposition::Fail,
            });
        }
        self.step_failed(i, attempt, error);
        self.drain();
    }

    /// Records the final failure of step `i` and routes by its error handling.
    fn step_failed(&mut self, i: usize, attempt: u32, error: StepError) {
        let spec = self.plan.step(i);
        let disposition = if spec.continue_on_error {
            Disposition::Continue
        } else if spec.on_error.is_some() {
            Disposition::OnError
        } else {
            Disposition::Fail
        };
        self.record(HistoryKind::StepFailed {
            step: spec.id.clone(),
            index: None,
            attempt,
            error: error.clone(),
            disposition,
        });
        match disposition {
            Disposition::Continue => self.work.push_back(Work::Settled(i)),
            Disposition::OnError => {
                if let Some(target) = self.plan.graph.on_error[i] {
                    self.work.push_back(Work::Activate(target));
                }
            }
            _ => {
                if self.running() {
                    self.record(HistoryKind::RunFailed {
                        error: RunError {
                            step: Some(spec.id.clone()),
                            message: error.to_string(),
                        },
                    });
                }
            }
        }
    }

    fn unit_succeeded(&mut self, i: usize, index: Option<u32>, attempt: u32, output: Value) {
        let id = self.plan.step(i).id.clone();
        self.record(HistoryKind::StepSucceeded {
            step: id.clone(),
            index,
            attempt,
            output,
        });
        if index.is_none() {
            self.work.push_back(Work::Settled(i));
            return;
        }
        let st = &self.state.steps[&id];
        if st.units.iter().all(|u| u.status == UnitStatus::Succeeded) {
            let collected: Vec<Value> = st
                .units
                .iter()
                .map(|u| u.output.clone().unwrap_or(Value::Null))
                .collect();
            self.record(HistoryKind::StepSucceeded {
                step: id,
                index: None,
                attempt: 0,
                output: Value::Array(collected),
            });
            self.work.push_back(Work::Settled(i));
        } else {
            self.fill_slots(i);
        }
    }

    /// Schedules pending for_each items up to the step's concurrency.
    fn fill_slots(&mut self, i: usize) {
        let spec = self.plan.step(i);
        let limit = spec.max_concurrency.unwrap_or(DEFAULT_MAX_CONCURRENCY) as usize;
        let id = spec.id.clone();
        let st = &self.state.steps[&id];
        let busy = st
            .units
            .iter()
            .filter(|u| matches!(u.status, UnitStatus::Scheduled | UnitStatus::Running))
            .count();
        let pending: Vec<u32> = st
            .units
            .iter()
            .enumerate()
            .filter(|(_, u)| u.status == UnitStatus::Pending)
            .map(|(n, _)| n as u32)
            .take(limit.saturating_sub(busy))
            .collect();
        for n in pending {
            self.record(HistoryKind::StepScheduled {
                step: id.clone(),
                index: Some(n),
                attempt: 1,
                not_before_ms: self.ctx.now_ms,
            });
        }
    }

    fn drain(&mut self) {
        while let Some(work) = self.work.pop_front() {
            if !self.running() {
                self.work.clear();
                return;
            }
            match work {
                Work::Activate(i) => self.activate(i),
                Work::Settled(i) => self.settled(i),
            }
        }
        self.finish_if_quiet();
    }

    fn ctx_for(&self, i: usize) -> minijinja::Value {
        context::context(self.plan, self.state, Some(i), &Extras::default())
    }

    /// Step `i` has been reached: skip it, route it, or schedule it.
    fn activate(&mut self, i: usize) {
        let spec = self.plan.step(i);
        if self.state.step_status(&spec.id) != StepStatus::Pending {
            return;
        }
        let id = spec.id.clone();
        if let Some(when) = &spec.when {
            match template::eval_condition(when, &self.ctx_for(i)) {
                Ok(true) => {}
                Ok(false) => {
                    self.record(HistoryKind::StepSkipped {
                        step: id,
                        reason: SkipReason::Condition,
                    });
                    self.work.push_back(Work::Settled(i));
                    return;
                }
                Err(e) => {
                    return self.step_failed(i, 0, StepError::permanent(format!("when: {e}")));
                }
            }
        }
        match spec.kind {
            StepKind::Choice => self.choose(i),
            StepKind::Wait => match wait_until(spec, &self.ctx_for(i), self.ctx.now_ms) {
                Ok(due) => self.record(HistoryKind::StepScheduled {
                    step: id,
                    index: None,
                    attempt: 1,
                    not_before_ms: due,
                }),
                Err(e) => self.step_failed(i, 0, e),
            },
            _ if spec.for_each.is_some() => self.expand(i),
            _ => self.record(HistoryKind::StepScheduled {
                step: id,
                index: None,
                attempt: 1,
                not_before_ms: self.ctx.now_ms,
            }),
        }
    }

    fn expand(&mut self, i: usize) {
        let spec = self.plan.step(i);
        let id = spec.id.clone();
        let items = match spec.for_each.as_ref() {
            Some(Value::Array(items)) => Ok(items.clone()),
            Some(Value::String(text)) => match template::render_str(text, &self.ctx_for(i)) {
                Ok(Value::Array(items)) => Ok(items),
                Ok(other) => Err(StepError::permanent(format!(
                    "for_each must evaluate to a list, got {}",
                    json_type(&other)
                ))),
                Err(e) => Err(StepError::permanent(format!("for_each: {e}"))),
            },
            _ => Err(StepError::permanent("for_each must be a list")),
        };
        match items {
            Err(e) => self.step_failed(i, 0, e),
            Ok(items) => {
                let empty = items.is_empty();
                self.record(HistoryKind::StepExpanded {
                    step: id.clone(),
                    items,
                });
                if empty {
                    self.record(HistoryKind::StepSucceeded {
                        step: id,
                        index: None,
                        attempt: 0,
                        output: Value::Array(Vec::new()),
                    });
                    self.work.push_back(Work::Settled(i));
                } else {
                    self.fill_slots(i);
                }
            }
        }
    }

    fn choose(&mut self, i: usize) {
        let spec = self.plan.step(i);
        let ctx = self.ctx_for(i);
        let mut target = None;
        for (r, rule) in spec.choices.iter().flatten().enumerate() {
            match template::eval_condition(&rule.when, &ctx) {
                Ok(true) => {
                    target = Some(self.plan.graph.choices[i][r]);
                    break;
                }
                Ok(false) => {}
                Err(e) => {
                    return self.step_failed(
                        i,
                        0,
                        StepError::permanent(format!("choice rule {r}: {e}")),
                    );
                }
            }
        }
        let target = target.or(self.plan.graph.choice_default[i]);
        let next = target.map(|t| self.plan.step(t).id.clone());
        self.record(HistoryKind::StepSucceeded {
            step: spec.id.clone(),
            index: None,
            attempt: 1,
            output: json!({ "next": next }),
        });
        if let Some(t) = target {
            self.work.push_back(Work::Activate(t));
        }
        // Dependents of a choice step still wait for it like any other.
        self.dependents_ready(i);
    }

    /// Step `i` finished in a way that lets the flow go on.
    fn settled(&mut self, i: usize) {
        if let Some(next) = self.plan.graph.next[i] {
            self.work.push_back(Work::Activate(next));
        }
        self.dependents_ready(i);
    }

    fn dependents_ready(&mut self, i: usize) {
        for &d in &self.plan.graph.dependents[i] {
            let ready = self.plan.graph.depends_on[d].iter().all(|&dep| {
                self.state
                    .step(&self.plan.step(dep).id)
                    .is_some_and(StepState::settled_ok)
            });
            if ready {
                self.work.push_back(Work::Activate(d));
            }
        }
    }

    /// With nothing in flight, the run is over: it succeeded (failures end it earlier).
    fn finish_if_quiet(&mut self) {
        if !self.running()
            || self
                .state
                .steps
                .values()
                .any(|s| s.status == StepStatus::Running)
        {
            return;
        }
        match run_output(self.plan, self.state) {
            Ok(output) => self.record(HistoryKind::RunSucceeded { output }),
            Err(message) => self.record(HistoryKind::RunFailed {
                error: RunError {
                    step: None,
                    message,
                },
            }),
        }
    }

    fn resume(&mut self) {
        if !matches!(self.state.status, RunStatus::Failed | RunStatus::Cancelled) {
            return;
        }
        // Everything that was in flight, and every step that failed the run, gets a fresh attempt
        // with a fresh retry budget; completed steps keep their outputs. A unit keeps the time it
        // was due at when that is still ahead (a pending `wait`, a backoff), else it runs now.
        let mut restart: Vec<(String, Option<u32>, u32, u64)> = Vec::new();
        let mut reactivate: Vec<usize> = Vec::new();
        for (id, st) in &self.state.steps {
            let for_each = st.items.is_some();
            let failed_run =
                st.status == StepStatus::Failed && st.disposition == Some(Disposition::Fail);
            if st.status != StepStatus::Running && !failed_run {
                continue;
            }
            if st.failed_before_any_attempt() {
                // Failed before any attempt (a `when` or for_each error): RunResumed forgets it
                // and it is evaluated again.
                reactivate.extend(self.plan.step_index(id));
                continue;
            }
            for (u, unit) in st.units.iter().enumerate() {
                let redo = matches!(
                    unit.status,
                    UnitStatus::Scheduled | UnitStatus::Running | UnitStatus::Failed
                );
                if redo {
                    let index = for_each.then_some(u as u32);
                    restart.push((id.clone(), index, unit.attempt + 1, unit.not_before_ms));
                }
            }
        }
        self.record(HistoryKind::RunResumed {});
        for (step, index, attempt, due) in restart {
            self.record(HistoryKind::StepScheduled {
                step,
                index,
                attempt,
                not_before_ms: due.max(self.ctx.now_ms),
            });
        }
        for i in reactivate {
            self.work.push_back(Work::Activate(i));
        }
        self.drain();
    }
}

/// When a `wait` step is due, from `seconds` (a number or a template) or `until` (RFC 3339).
fn wait_until(
    spec: &crate::workflow::Step,
    ctx: &minijinja::Value,
    now_ms: u64,
) -> Result<u64, StepError> {
    let render = |name: &str| -> Result<Option<Value>, StepError> {
        spec.params
            .get(name)
            .map(|v| template::render_value(v, ctx))
            .transpose()
            .map_err(|e| StepError::permanent(format!("wait.{name}: {e}")))
    };
    if let Some(seconds) = render("seconds")? {
        let secs = match &seconds {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        }
        .filter(|s| *s >= 0.0 && s.is_finite())
        .ok_or_else(|| {
            StepError::permanent(format!(
                "wait.seconds must be a non-negative number, got {seconds}"
            ))
        })?;
        return Ok(now_ms + (secs * 1000.0) as u64);
    }
    if let Some(until) = render("until")? {
        let text = until.as_str().unwrap_or_default();
        let at = humantime::parse_rfc3339_weak(text).map_err(|e| {
            StepError::permanent(format!(
                "wait.until must be an RFC 3339 time like 2026-01-01T09:00:00Z, got {until}: {e}"
            ))
        })?;
        let ms = at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        return Ok(ms.max(now_ms));
    }
    Err(StepError::permanent("wait needs `seconds` or `until`"))
}

/// The run's output: the workflow's `output` template, or every step output by id.
pub fn run_output(plan: &Plan, state: &RunState) -> Result<Value, String> {
    match &plan.workflow.output {
        Some(template_value) => {
            let ctx = context::context(plan, state, None, &Extras::default());
            template::render_value(template_value, &ctx).map_err(|e| format!("output: {e}"))
        }
        None => {
            let mut out = Map::new();
            for step in &plan.workflow.steps {
                if let Some(st) = state.step(&step.id)
                    && st.status == StepStatus::Succeeded
                    && step.kind != StepKind::Choice
                {
                    out.insert(step.id.clone(), st.output.clone().unwrap_or(Value::Null));
                }
            }
            Ok(Value::Object(out))
        }
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
