//! A run's state and its history. The state is a fold over the history: [`RunState::apply`] is the
//! only way it changes, so replaying a run's history rebuilds exactly the state that was stored.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::failure::StepError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Succeeded | RunStatus::Failed | RunStatus::Cancelled
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            RunStatus::Pending => "pending",
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not reached yet (or never).
    #[default]
    Pending,
    /// Scheduled or executing.
    Running,
    Succeeded,
    Failed,
    Skipped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnitStatus {
    /// A for_each item waiting for a concurrency slot.
    #[default]
    Pending,
    Scheduled,
    Running,
    Succeeded,
    Failed,
}

/// One executable unit of a step: the step itself, or one item of a for_each step.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct UnitState {
    pub status: UnitStatus,
    pub attempt: u32,
    /// The attempt at which the current retry budget started (resume starts a new budget).
    pub budget_start: u32,
    pub not_before_ms: u64,
    pub lease_until_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<StepError>,
}

/// What happens after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Disposition {
    /// Another attempt is scheduled.
    Retry,
    /// The step failed for good and the flow carries on (`continue_on_error`).
    Continue,
    /// The step failed for good and the flow goes to its `on_error` step.
    OnError,
    /// The step failed for good and so does the run (or, for one for_each item, the step).
    Fail,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// Its `when` condition did not hold.
    Condition,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StepState {
    pub status: StepStatus,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<UnitState>,
    /// The items of a for_each step, once evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<StepError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disposition: Option<Disposition>,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
}

impl StepState {
    /// Whether the flow may go on past this step (what `depends_on` waits for).
    pub fn settled_ok(&self) -> bool {
        match self.status {
            StepStatus::Succeeded | StepStatus::Skipped => true,
            StepStatus::Failed => self.disposition == Some(Disposition::Continue),
            _ => false,
        }
    }

    pub fn unit(&self, index: Option<u32>) -> Option<&UnitState> {
        self.units.get(index.unwrap_or(0) as usize)
    }

    /// Whether the step failed the run before any attempt of it ran: its `when`, `for_each`, wait
    /// time or choice rules could not be evaluated. Such a failure is recorded with attempt 0
    /// (which for a step without items leaves one unit at attempt 0); real attempts start at 1.
    pub fn failed_before_any_attempt(&self) -> bool {
        self.status == StepStatus::Failed
            && self.disposition == Some(Disposition::Fail)
            && self.units.iter().all(|u| u.attempt == 0)
    }
}

/// Why a run failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunError {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    pub message: String,
}

/// One fact in a run's history. Each carries the time it was recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEvent {
    pub at_ms: u64,
    #[serde(flatten)]
    pub kind: HistoryKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum HistoryKind {
    RunStarted {
        inputs: Map<String, Value>,
    },
    StepExpanded {
        step: String,
        items: Vec<Value>,
    },
    StepScheduled {
        step: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        index: Option<u32>,
        attempt: u32,
        not_before_ms: u64,
    },
    StepStarted {
        step: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        index: Option<u32>,
        attempt: u32,
        lease_until_ms: u64,
    },
    StepSucceeded {
        step: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        index: Option<u32>,
        attempt: u32,
        output: Value,
    },
    StepFailed {
        step: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        index: Option<u32>,
        attempt: u32,
        error: StepError,
        disposition: Disposition,
    },
    StepRetryScheduled {
        step: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        index: Option<u32>,
        attempt: u32,
        delay_ms: u64,
        not_before_ms: u64,
    },
    StepSkipped {
        step: String,
        reason: SkipReason,
    },
    RunSucceeded {
        output: Value,
    },
    RunFailed {
        error: RunError,
    },
    RunCancelled {
        reason: String,
    },
    RunResumed {},
}

impl HistoryKind {
    pub fn name(&self) -> &'static str {
        match self {
            HistoryKind::RunStarted { .. } => "RunStarted",
            HistoryKind::StepExpanded { .. } => "StepExpanded",
            HistoryKind::StepScheduled { .. } => "StepScheduled",
            HistoryKind::StepStarted { .. } => "StepStarted",
            HistoryKind::StepSucceeded { .. } => "StepSucceeded",
            HistoryKind::StepFailed { .. } => "StepFailed",
            HistoryKind::StepRetryScheduled { .. } => "StepRetryScheduled",
            HistoryKind::StepSkipped { .. } => "StepSkipped",
            HistoryKind::RunSucceeded { .. } => "RunSucceeded",
            HistoryKind::RunFailed { .. } => "RunFailed",
            HistoryKind::RunCancelled { .. } => "RunCancelled",
            HistoryKind::RunResumed {} => "RunResumed",
        }
    }

    /// The step an event is about, if any.
    pub fn step(&self) -> Option<&str> {
        match self {
            HistoryKind::StepExpanded { step, .. }
            | HistoryKind::StepScheduled { step, .. }
            | HistoryKind::StepStarted { step, .. }
            | HistoryKind::StepSucceeded { step, .. }
            | HistoryKind::StepFailed { step, .. }
            | HistoryKind::StepRetryScheduled { step, .. }
            | HistoryKind::StepSkipped { step, .. } => Some(step),
            _ => None,
        }
    }
}

/// Everything known about one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    pub run_id: String,
    pub workflow_id: String,
    pub status: RunStatus,
    pub inputs: Map<String, Value>,
    /// Kept apart from the run record by stores, one record per step.
    #[serde(skip)]
    pub steps: BTreeMap<String, StepState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RunError>,
    /// The latest final step failure, shown to on_error steps as `{{error}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<Value>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// How many history events have been applied; the next event's sequence number.
    pub seq: u64,
}

impl RunState {
    pub fn new(run_id: impl Into<String>, workflow_id: impl Into<String>) -> RunState {
        RunState {
            run_id: run_id.into(),
            workflow_id: workflow_id.into(),
            status: RunStatus::Pending,
            inputs: Map::new(),
            steps: BTreeMap::new(),
            output: None,
            error: None,
            last_error: None,
            created_at_ms: 0,
            updated_at_ms: 0,
            seq: 0,
        }
    }

    /// Rebuilds a state from its history.
    pub fn replay<'a>(
        run_id: &str,
        workflow_id: &str,
        history: impl IntoIterator<Item = &'a HistoryEvent>,
    ) -> RunState {
        let mut state = RunState::new(run_id, workflow_id);
        for event in history {
            state.apply(event);
        }
        state
    }

    /// A copy of the run-level record without the step records.
    pub fn clone_record(&self) -> RunState {
        RunState {
            run_id: self.run_id.clone(),
            workflow_id: self.workflow_id.clone(),
            status: self.status,
            inputs: self.inputs.clone(),
            steps: BTreeMap::new(),
            output: self.output.clone(),
            error: self.error.clone(),
            last_error: self.last_error.clone(),
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
            seq: self.seq,
        }
    }

    pub fn step(&self, id: &str) -> Option<&StepState> {
        self.steps.get(id)
    }

    pub fn step_status(&self, id: &str) -> StepStatus {
        self.steps.get(id).map(|s| s.status).unwrap_or_default()
    }

    fn unit_mut(&mut self, step: &str, index: Option<u32>) -> &mut UnitState {
        let st = self.steps.entry(step.to_owned()).or_default();
        let i = index.unwrap_or(0) as usize;
        if st.units.len() <= i {
            st.units.resize_with(i + 1, UnitState::default);
        }
        &mut st.units[i]
    }

    /// Applies one history event. Never fails: the engine only records events that apply.
    pub fn apply(&mut self, event: &HistoryEvent) {
        let at = event.at_ms;
        self.seq += 1;
        self.updated_at_ms = at;
        match &event.kind {
            HistoryKind::RunStarted { inputs } => {
                self.status = RunStatus::Running;
                self.inputs = inputs.clone();
                self.created_at_ms = at;
            }
            HistoryKind::StepExpanded { step, items } => {
                let st = self.steps.entry(step.clone()).or_default();
                st.status = StepStatus::Running;
                st.started_at_ms = at;
                st.units = vec![UnitState::default(); items.len()];
                st.items = Some(items.clone());
            }
            HistoryKind::StepScheduled {
                step,
                index,
                attempt,
                not_before_ms,
            } => {
                let st = self.steps.entry(step.clone()).or_default();
                if st.status != StepStatus::Running {
                    st.status = StepStatus::Running;
                    st.started_at_ms = at;
                    st.error = None;
                    st.disposition = None;
                }
                let unit = self.unit_mut(step, *index);
                unit.status = UnitStatus::Scheduled;
                unit.attempt = *attempt;
                unit.budget_start = *attempt;
                unit.not_before_ms = *not_before_ms;
                unit.error = None;
            }
            HistoryKind::StepStarted {
                step,
                index,
                lease_until_ms,
                ..
            } => {
                let unit = self.unit_mut(step, *index);
                unit.status = UnitStatus::Running;
                unit.lease_until_ms = *lease_until_ms;
            }
            HistoryKind::StepSucceeded {
                step,
                index,
                output,
                ..
            } => {
                let for_each = self.steps.get(step).is_some_and(|s| s.items.is_some());
                if index.is_some() || !for_each {
                    let unit = self.unit_mut(step, *index);
                    unit.status = UnitStatus::Succeeded;
                    unit.error = None;
                    if index.is_some() {
                        unit.output = Some(output.clone());
                    }
                }
                if index.is_none() {
                    let st = self.steps.entry(step.clone()).or_default();
                    st.status = StepStatus::Succeeded;
                    st.output = Some(output.clone());
                    st.finished_at_ms = at;
                    if st.started_at_ms == 0 {
                        st.started_at_ms = at;
                    }
                    // The collected output holds the items' outputs; keep them once.
                    for unit in &mut st.units {
                        unit.output = None;
                    }
                }
            }
            HistoryKind::StepFailed {
                step,
                index,
                error,
                disposition,
                ..
            } => {
                let for_each = self.steps.get(step).is_some_and(|s| s.items.is_some());
                if index.is_some() || !for_each {
                    let unit = self.unit_mut(step, *index);
                    unit.status = UnitStatus::Failed;
                    unit.error = Some(error.clone());
                }
                if index.is_none() && *disposition != Disposition::Retry {
                    let st = self.steps.entry(step.clone()).or_default();
                    st.status = StepStatus::Failed;
                    st.error = Some(error.clone());
                    st.disposition = Some(*disposition);
                    st.finished_at_ms = at;
                    if st.started_at_ms == 0 {
                        st.started_at_ms = at;
                    }
                    if *disposition == Disposition::Continue {
                        st.output = Some(Value::Null);
                    }
                    self.last_error = Some(serde_json::json!({
                        "step": step,
                        "class": error.class.name(),
                        "message": error.message,
                        "details": error.details,
                    }));
                }
            }
            HistoryKind::StepRetryScheduled {
                step,
                index,
                attempt,
                not_before_ms,
                ..
            } => {
                let unit = self.unit_mut(step, *index);
                unit.status = UnitStatus::Scheduled;
                unit.attempt = *attempt;
                unit.not_before_ms = *not_before_ms;
            }
            HistoryKind::StepSkipped { step, .. } => {
                let st = self.steps.entry(step.clone()).or_default();
                st.status = StepStatus::Skipped;
                st.started_at_ms = at;
                st.finished_at_ms = at;
            }
            HistoryKind::RunSucceeded { output } => {
                self.status = RunStatus::Succeeded;
                self.output = Some(output.clone());
            }
            HistoryKind::RunFailed { error } => {
                self.status = RunStatus::Failed;
                self.error = Some(error.clone());
            }
            HistoryKind::RunCancelled { reason } => {
                self.status = RunStatus::Cancelled;
                self.error = Some(RunError {
                    step: None,
                    message: format!("cancelled: {reason}"),
                });
            }
            HistoryKind::RunResumed {} => {
                self.status = RunStatus::Running;
                self.error = None;
                // A step that failed the run before any attempt (its `when` or `for_each` could
                // not be evaluated) is forgotten, so resuming evaluates it again.
                self.steps.retain(|_, s| !s.failed_before_any_attempt());
            }
        }
    }
}
