//! The Lambda handlers' logic, on real Lambda event types, so tests drive exactly what runs in AWS.
//! The function crates only read configuration, build the runtime and hand events here.

use std::sync::Arc;

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent, SqsMessage};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::aws::{AwsConfig, AwsRuntime};
use crate::ports::{RunStore, StepQueue, StoreError, WorkflowCatalog};
use crate::runtime::RuntimeError;
use crate::workflow::Plan;

/// Executes every record of an SQS batch concurrently and reports the ones to deliver again
/// (`ReportBatchItemFailures`), so one bad record never fails its neighbours.
pub async fn handle_sqs_event(
    rt: &AwsRuntime,
    config: &AwsConfig,
    event: SqsEvent,
) -> SqsBatchResponse {
    // A JoinSet aborts its tasks when dropped, so a handler that dies takes its records with it,
    // as a Lambda that crashes does.
    let mut tasks = tokio::task::JoinSet::new();
    let mut ids = std::collections::HashMap::new();
    for message in event.records {
        let rt = rt.clone();
        let (max_receives, visibility) = (config.max_receives, config.visibility_timeout);
        let id = message.message_id.clone().unwrap_or_default();
        let handle =
            tasks.spawn(async move { handle_record(&rt, max_receives, visibility, message).await });
        ids.insert(handle.id(), id);
    }
    let mut response = SqsBatchResponse::default();
    while let Some(joined) = tasks.join_next_with_id().await {
        let (task_id, done) = match joined {
            Ok((task_id, done)) => (task_id, done),
            Err(e) => {
                tracing::error!(error = %e, "a record handler panicked");
                (e.id(), false)
            }
        };
        if !done {
            let mut failure = BatchItemFailure::default();
            failure.item_identifier = ids.get(&task_id).cloned().unwrap_or_default();
            response.batch_item_failures.push(failure);
        }
    }
    response
}

/// Returns whether the record is done with.
async fn handle_record(
    rt: &AwsRuntime,
    max_receives: u32,
    visibility: std::time::Duration,
    message: SqsMessage,
) -> bool {
    let message_id = message.message_id.as_deref().unwrap_or_default();
    let Some(task) = message
        .body
        .as_deref()
        .and_then(crate::aws::sqs::parse_task)
    else {
        // It can never succeed: acknowledge it rather than retry it forever.
        tracing::warn!(message_id, "dropping a message that is not a step task");
        return true;
    };
    let receive_count: u32 = message
        .attributes
        .get("ApproximateReceiveCount")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let outcome = {
        // A long step keeps its message invisible: extend it every half visibility timeout, so
        // the queue does not hand the task to another worker while this one is still at it.
        let work = rt.execute_task(&task);
        tokio::pin!(work);
        let every = visibility / 2;
        loop {
            tokio::select! {
                result = &mut work => break result,
                _ = tokio::time::sleep(every) => {
                    if let Some(receipt) = message.receipt_handle.as_deref()
                        && let Err(e) = rt.queue().extend(receipt, visibility).await
                    {
                        tracing::warn!(message_id, error = %e, "could not extend the message's visibility");
                    }
                }
            }
        }
    };
    match outcome {
        Ok(()) => true,
        Err(RuntimeError::RunNotFound(_)) => {
            tracing::warn!(message_id, run_id = %task.run_id, step_id = %task.step, "dropping a task for an unknown run");
            true
        }
        Err(e @ RuntimeError::LeaseHeld { .. }) => {
            // Not a poison message: the attempt is running elsewhere, or its worker died and the
            // lease has yet to run out.
            tracing::info!(message_id, run_id = %task.run_id, step_id = %task.step, error = %e, "attempt claimed elsewhere; retry later");
            false
        }
        Err(e) => {
            tracing::warn!(message_id, run_id = %task.run_id, step_id = %task.step, attempt = task.attempt, receive_count, error = %e, "task failed; it will be delivered again");
            if receive_count >= max_receives {
                // This was the last delivery before the dead-letter queue: say why in the run.
                let reason = format!(
                    "step '{}' could not be processed in {receive_count} deliveries and went to the dead-letter queue: {e}",
                    task.step
                );
                if let Err(abort) = rt.abort(&task, &reason).await {
                    tracing::error!(run_id = %task.run_id, error = %abort, "could not mark the run failed");
                }
            }
            false
        }
    }
}

/// What a schedule asks for: EventBridge Scheduler delivers the schedule's `Input` as is.
#[derive(Debug, Deserialize)]
pub struct ScheduleInput {
    pub workflow_id: String,
    #[serde(default)]
    pub inputs: Map<String, Value>,
    /// Put `<aws.scheduler.execution-id>` here: a redelivered invocation then starts no second run.
    #[serde(default)]
    pub execution_id: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error(
        "not a schedule input: {0}; expected {{\"workflow_id\": ..., \"inputs\": {{...}}}} or an EventBridge \"Scheduled Event\""
    )]
    BadInput(String),
    #[error("no workflow '{0}' is stored; PUT it to /workflows/{0} first")]
    UnknownWorkflow(String),
    #[error("the stored workflow '{0}' is invalid: {1}")]
    Invalid(String, String),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Rule targets named `orchestra-<workflow id>` start that workflow when no input is configured.
pub const RULE_PREFIX: &str = "orchestra-";

/// Reads either Scheduler's input or a rule's "Scheduled Event" envelope.
pub fn schedule_input(event: &Value) -> Result<ScheduleInput, ScheduleError> {
    if event.get("detail-type").and_then(Value::as_str) == Some("Scheduled Event") {
        let detail = event.get("detail").cloned().unwrap_or(Value::Null);
        if detail.get("workflow_id").is_some() {
            let mut input: ScheduleInput = serde_json::from_value(detail)
                .map_err(|e| ScheduleError::BadInput(e.to_string()))?;
            input.execution_id = input
                .execution_id
                .or_else(|| event.get("id").and_then(Value::as_str).map(str::to_owned));
            return Ok(input);
        }
        let rule = event
            .get("resources")
            .and_then(|r| r.get(0))
            .and_then(Value::as_str)
            .and_then(|arn| arn.rsplit('/').next())
            .unwrap_or_default();
        let workflow_id = rule.strip_prefix(RULE_PREFIX).ok_or_else(|| {
            ScheduleError::BadInput(format!("rule '{rule}' is not named {RULE_PREFIX}<workflow id> and the event has no detail.workflow_id"))
        })?;
        return Ok(ScheduleInput {
            workflow_id: workflow_id.to_owned(),
            inputs: Map::new(),
            execution_id: event.get("id").and_then(Value::as_str).map(str::to_owned),
        });
    }
    serde_json::from_value(event.clone()).map_err(|e| ScheduleError::BadInput(e.to_string()))
}

/// Starts the scheduled run; returns its id. A redelivered event finds its run already started.
pub async fn handle_schedule(rt: &AwsRuntime, event: Value) -> Result<String, ScheduleError> {
    let input = schedule_input(&event)?;
    let workflow = rt
        .store()
        .get_workflow(&input.workflow_id)
        .await?
        .ok_or_else(|| ScheduleError::UnknownWorkflow(input.workflow_id.clone()))?;
    let plan = Plan::compile(workflow, &input.workflow_id)
        .map_err(|e| ScheduleError::Invalid(input.workflow_id.clone(), e.to_string()))?;
    let run_id = match &input.execution_id {
        // Deterministic, so the same scheduled execution maps to the same run.
        Some(execution) => format!(
            "sched-{}",
            execution.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "-")
        ),
        None => ulid::Ulid::new().to_string(),
    };
    match rt
        .start_run_with_id(Arc::new(plan), input.inputs, run_id.clone())
        .await
    {
        Ok(id) => {
            tracing::info!(run_id = %id, workflow_id = %input.workflow_id, "scheduled run started");
            Ok(id)
        }
        Err(RuntimeError::Store(StoreError::AlreadyExists(id))) => {
            tracing::info!(run_id = %id, "scheduled run already started (duplicate delivery)");
            Ok(id)
        }
        Err(e) => Err(e.into()),
    }
}

/// Whether a stored run exists (used by tests and the API).
pub async fn run_exists(rt: &AwsRuntime, run_id: &str) -> Result<bool, StoreError> {
    Ok(rt.store().load_run(run_id).await?.is_some())
}
