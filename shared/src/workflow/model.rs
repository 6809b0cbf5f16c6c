//! The workflow language: serde types that are the one source of truth for parsing, the JSON Schema
//! (`workflows/schema.json`) and the engine. Backward compatible with the original format
//! (`id`, `name`, `description`, `steps[{id, type, action, params, next_step}]`, `variables`).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// A workflow definition, as written in a `workflows/*.json` file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Workflow {
    /// Editors use this to find `workflows/schema.json`; ignored by the engine.
    #[serde(rename = "$schema", default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// Stable identifier; `orchestra run ID` finds the workflow by it.
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Declared inputs, available as `{{inputs.NAME}}` (and `{{NAME}}`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inputs: BTreeMap<String, InputSpec>,
    /// Run variables with their defaults (the original format); a caller's variables override them.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub variables: Map<String, Value>,
    /// The steps. Without `next_step` or `depends_on`, each runs after the one before it.
    pub steps: Vec<Step>,
    /// The run's result, as a template over inputs and step outputs. Without it, the run's output is
    /// an object of every succeeded step's output keyed by step id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
}

/// One declared input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    #[serde(rename = "type", default)]
    pub kind: InputType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
    /// A required input without a default must be given by the caller.
    #[serde(default)]
    pub required: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum InputType {
    #[default]
    String,
    Number,
    Integer,
    Boolean,
    Object,
    Array,
    Any,
}

impl InputType {
    /// Whether `value` has this type.
    pub fn accepts(self, value: &Value) -> bool {
        match self {
            InputType::String => value.is_string(),
            InputType::Number => value.is_number(),
            InputType::Integer => value.is_i64() || value.is_u64(),
            InputType::Boolean => value.is_boolean(),
            InputType::Object => value.is_object(),
            InputType::Array => value.is_array(),
            InputType::Any => true,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            InputType::String => "string",
            InputType::Number => "number",
            InputType::Integer => "integer",
            InputType::Boolean => "boolean",
            InputType::Object => "object",
            InputType::Array => "array",
            InputType::Any => "any",
        }
    }
}

/// The kind of a step. `choice` and `wait` are carried out by the engine itself; the others call an
/// action from the registry.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum StepKind {
    Openai,
    Github,
    Notion,
    Gmail,
    Transform,
    Http,
    Wait,
    Log,
    Choice,
}

impl StepKind {
    pub fn name(self) -> &'static str {
        match self {
            StepKind::Openai => "openai",
            StepKind::Github => "github",
            StepKind::Notion => "notion",
            StepKind::Gmail => "gmail",
            StepKind::Transform => "transform",
            StepKind::Http => "http",
            StepKind::Wait => "wait",
            StepKind::Log => "log",
            StepKind::Choice => "choice",
        }
    }
}

/// One step of a workflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Unique within the workflow; outputs are `{{steps.ID.output}}` (or `{{ID_output}}`).
    pub id: String,
    #[serde(rename = "type")]
    pub kind: StepKind,
    /// The action of the step type; optional where the type has a single or default action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Parameters; strings may hold `{{templates}}`. A string that is exactly one `{{expression}}`
    /// keeps the JSON type of what it evaluates to.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub params: Map<String, Value>,
    /// The step to run next: absent means the next step in the list, `null` ends this branch.
    #[serde(
        default,
        deserialize_with = "present_or_null",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub next_step: Option<Option<String>>,
    /// Run this step when all of these have finished (a join); `[]` starts it with the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depends_on: Option<Vec<String>>,
    /// Skip this step unless the expression holds, e.g. `steps.check.output.count > 0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// Run the step once per item of this list (a JSON array or a template evaluating to one);
    /// `{{item}}` and `{{index}}` are available, and the output is the list of item outputs in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_each: Option<Value>,
    /// How many items of `for_each` run at once (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Fail the attempt (class `timeout`) when it takes longer than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
    /// When the step fails for good, go to this step; `{{error}}` holds the failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_error: Option<String>,
    /// When the step fails for good, record it and carry on as if it had succeeded (output `null`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub continue_on_error: bool,
    /// `choice` steps: the first rule whose `when` holds picks the next step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub choices: Option<Vec<ChoiceRule>>,
    /// `choice` steps: where to go when no rule holds (without it, the branch ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
}

impl Step {
    /// The action name, falling back to the step type's default action.
    pub fn action_name(&self) -> Option<&str> {
        self.action
            .as_deref()
            .or_else(|| crate::workflow::catalog::default_action(self.kind))
    }
}

/// A rule of a `choice` step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChoiceRule {
    /// An expression such as `inputs.priority == "high"`.
    pub when: String,
    /// The step to go to when it holds.
    pub next: String,
}

/// Which failures are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RetryOn {
    RateLimited,
    Timeout,
    Transient,
    /// Every failure, permanent ones included.
    All,
}

/// Per-step retries: exponential backoff with full jitter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = no retry).
    pub max_attempts: u32,
    /// The backoff ceiling of the first retry, doubled each retry.
    #[serde(default = "default_initial_delay")]
    pub initial_delay_s: f64,
    #[serde(default = "default_max_delay")]
    pub max_delay_s: f64,
    #[serde(default = "default_retry_on")]
    pub retry_on: Vec<RetryOn>,
}

fn default_initial_delay() -> f64 {
    1.0
}
fn default_max_delay() -> f64 {
    60.0
}
fn default_retry_on() -> Vec<RetryOn> {
    vec![RetryOn::RateLimited, RetryOn::Timeout, RetryOn::Transient]
}

/// Keeps "absent" (None) apart from "null" (Some(None)) for `next_step`.
fn present_or_null<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}
