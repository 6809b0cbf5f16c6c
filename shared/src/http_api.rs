//! The HTTP API as an axum router, hosted by the `api` Lambda (and later by `orchestra serve`).
//! `AppError` is the one place errors become HTTP responses; internal details are logged, not sent.
//!
//! | route | |
//! |---|---|
//! | `GET /health` | liveness |
//! | `PUT /workflows/{id}` | validate and store a workflow definition |
//! | `POST /runs` | `{"workflow_id"` or `"workflow", "inputs"}` -> 202 `{"run_id"}` |
//! | `GET /runs/{id}` | the run's state and steps |
//! | `GET /runs/{id}/history?from=N&limit=M` | history events from sequence N |
//! | `POST /runs/{id}/cancel` | cancel |

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::ports::{RunStore, SecretSource, StepQueue, StoreError, WorkflowCatalog};
use crate::runtime::{Runtime, RuntimeError};
use crate::workflow::{Plan, ValidationError, Workflow};

/// An error as the API returns it.
#[derive(Debug)]
pub enum AppError {
    Invalid(ValidationError),
    BadRequest(String),
    NotFound(String),
    Conflict(String),
    Internal(String),
}

impl From<RuntimeError> for AppError {
    fn from(e: RuntimeError) -> Self {
        match e {
            RuntimeError::Inputs(e) => AppError::BadRequest(e.to_string()),
            RuntimeError::RunNotFound(id) => AppError::NotFound(format!("no run with id '{id}'")),
            e @ (RuntimeError::NotResumable { .. } | RuntimeError::AlreadyFinished { .. }) => {
                AppError::Conflict(e.to_string())
            }
            other => AppError::Internal(other.to_string()),
        }
    }
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        AppError::Internal(e.to_string())
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let (status, body) = match self {
            AppError::Invalid(e) => (
                StatusCode::BAD_REQUEST,
                json!({
                    "error": "invalid workflow",
                    "issues": e.issues.iter().map(|i| json!({"pointer": i.pointer, "message": i.message, "help": i.help})).collect::<Vec<_>>(),
                }),
            ),
            AppError::BadRequest(m) => (StatusCode::BAD_REQUEST, json!({"error": m})),
            AppError::NotFound(m) => (StatusCode::NOT_FOUND, json!({"error": m})),
            AppError::Conflict(m) => (StatusCode::CONFLICT, json!({"error": m})),
            AppError::Internal(m) => {
                tracing::error!(error = %m, "request failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"error": "internal error; see the service logs"}),
                )
            }
        };
        (status, Json(body)).into_response()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartRun {
    workflow_id: Option<String>,
    workflow: Option<Value>,
    #[serde(default)]
    inputs: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
struct HistoryQuery {
    #[serde(default)]
    from: u64,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    100
}

/// The router over any runtime whose store also keeps workflow definitions.
pub fn router<S, Q, K>(runtime: Runtime<S, Q, K>) -> Router
where
    S: RunStore + WorkflowCatalog,
    Q: StepQueue,
    K: SecretSource,
{
    Router::new()
        .route("/health", get(|| async { Json(json!({"ok": true})) }))
        .route("/workflows/{id}", put(put_workflow::<S, Q, K>))
        .route("/runs", post(start_run::<S, Q, K>))
        .route("/runs/{id}", get(get_run::<S, Q, K>))
        .route("/runs/{id}/history", get(get_history::<S, Q, K>))
        .route("/runs/{id}/cancel", post(cancel_run::<S, Q, K>))
        .with_state(runtime)
}

fn parse_workflow(doc: Value, source: &str) -> Result<Plan, AppError> {
    let text = doc.to_string();
    Plan::from_json(&text, source).map_err(AppError::Invalid)
}

async fn put_workflow<S: RunStore + WorkflowCatalog, Q: StepQueue, K: SecretSource>(
    State(rt): State<Runtime<S, Q, K>>,
    Path(id): Path<String>,
    Json(doc): Json<Value>,
) -> Result<Json<Value>, AppError> {
    let plan = parse_workflow(doc, &format!("PUT /workflows/{id}"))?;
    if plan.workflow.id != id {
        return Err(AppError::BadRequest(format!(
            "the workflow's id is '{}' but the URL says '{id}'",
            plan.workflow.id
        )));
    }
    rt.store().put_workflow(&plan.workflow).await?;
    Ok(Json(json!({"id": id, "steps": plan.workflow.steps.len()})))
}

async fn start_run<S: RunStore + WorkflowCatalog, Q: StepQueue, K: SecretSource>(
    State(rt): State<Runtime<S, Q, K>>,
    Json(body): Json<Value>,
) -> Result<(StatusCode, Json<Value>), AppError> {
    let body: StartRun = serde_json::from_value(body)
        .map_err(|e| AppError::BadRequest(format!("request body: {e}")))?;
    let plan = match (body.workflow, body.workflow_id) {
        (Some(doc), None) => parse_workflow(doc, "POST /runs")?,
        (None, Some(id)) => {
            let workflow: Workflow = rt.store().get_workflow(&id).await?.ok_or_else(|| {
                AppError::NotFound(format!(
                    "no workflow '{id}'; store it with PUT /workflows/{id}"
                ))
            })?;
            Plan::compile(workflow, &id).map_err(AppError::Invalid)?
        }
        _ => {
            return Err(AppError::BadRequest(
                "give exactly one of \"workflow_id\" and \"workflow\"".into(),
            ));
        }
    };
    let run_id = rt.start_run(Arc::new(plan), body.inputs).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"run_id": run_id}))))
}

async fn get_run<S: RunStore + WorkflowCatalog, Q: StepQueue, K: SecretSource>(
    State(rt): State<Runtime<S, Q, K>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, AppError> {
    let run = rt
        .store()
        .load_run(&id)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no run with id '{id}'")))?;
    Ok(Json(json!({"run": run.state, "steps": run.state.steps})))
}

async fn get_history<S: RunStore + WorkflowCatalog, Q: StepQueue, K: SecretSource>(
    State(rt): State<Runtime<S, Q, K>>,
    Path(id): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> Result<Json<Value>, AppError> {
    let limit = q.limit.clamp(1, 1000);
    let events = rt.store().history(&id, q.from, limit).await?;
    if events.is_empty() && rt.store().load_run(&id).await?.is_none() {
        return Err(AppError::NotFound(format!("no run with id '{id}'")));
    }
    let next = (events.len() == limit).then(|| q.from + limit as u64);
    Ok(Json(json!({"events": events, "next": next})))
}

async fn cancel_run<S: RunStore + WorkflowCatalog, Q: StepQueue, K: SecretSource>(
    State(rt): State<Runtime<S, Q, K>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, AppError> {
    rt.cancel(&id, "cancelled through the API").await?;
    Ok(Json(json!({"run_id": id, "status": "cancelled"})))
}
