//! The names a template sees while a run is underway: inputs (also at top level, as the original
//! format's variables), `steps.ID.output`, the original `ID_output`, `run`, `error`, `item`/`index`
//! inside for_each, and `secrets`. Only the step outputs a template refers to are copied in.

use minijinja::Value as JinjaValue;
use serde_json::{Map, Value, json};

use crate::engine::state::{RunState, StepStatus};
use crate::workflow::Plan;

/// Per-render extras.
#[derive(Debug, Default, Clone)]
pub struct Extras {
    /// `(item, index)` of a for_each unit.
    pub item: Option<(Value, u32)>,
    pub secrets: Option<Map<String, Value>>,
}

/// The JSON context for step `step` (or for the workflow output when `None`).
pub fn context_json(
    plan: &Plan,
    state: &RunState,
    step: Option<usize>,
    extras: &Extras,
) -> Map<String, Value> {
    let mut ctx = state.inputs.clone();
    ctx.insert("inputs".into(), Value::Object(state.inputs.clone()));
    let wanted: Box<dyn Iterator<Item = usize>> = match step.map(|i| plan.refs(i)) {
        Some(refs) if !refs.all_steps => Box::new(refs.steps.clone().into_iter()),
        _ => Box::new(0..plan.workflow.steps.len()),
    };
    let mut steps = Map::new();
    for j in wanted {
        let id = &plan.step(j).id;
        let Some(st) = state.step(id) else { continue };
        let output = match st.status {
            StepStatus::Succeeded => st.output.clone().unwrap_or(Value::Null),
            StepStatus::Failed if st.output.is_some() => Value::Null,
            StepStatus::Skipped => Value::Null,
            _ => continue,
        };
        ctx.insert(format!("{id}_output"), output.clone());
        let status = serde_json::to_value(st.status).unwrap_or(Value::Null);
        steps.insert(id.clone(), json!({"output": output, "status": status}));
    }
    ctx.insert("steps".into(), Value::Object(steps));
    ctx.insert(
        "run".into(),
        json!({"id": state.run_id, "workflow_id": state.workflow_id}),
    );
    if let Some(error) = &state.last_error {
        ctx.insert("error".into(), error.clone());
    }
    if let Some((item, index)) = &extras.item {
        ctx.insert("item".into(), item.clone());
        ctx.insert("index".into(), json!(index));
    }
    if let Some(secrets) = &extras.secrets {
        ctx.insert("secrets".into(), Value::Object(secrets.clone()));
    }
    ctx
}

pub fn context(plan: &Plan, state: &RunState, step: Option<usize>, extras: &Extras) -> JinjaValue {
    JinjaValue::from(minijinja::value::Serde(context_json(
        plan, state, step, extras,
    )))
}
