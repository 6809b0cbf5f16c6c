//! [`RunStore`] on DynamoDB, one table, event-sourced.
//!
//! | item | `pk` | `sk` | attributes |
//! |---|---|---|---|
//! | run | `RUN#<id>` | `META` | `status`, `workflow_id`, `created_at`, `updated_at`, `status_seq`, `expires_at` |
//! | workflow snapshot | `RUN#<id>` | `WF` | `workflow` (JSON) |
//! | history batch | `RUN#<id>` | `H#<first seq, 12 digits>` | `events` (JSON list), `next_seq`, `expires_at` |
//! | workflow definition | `WORKFLOW#<id>` | `DEF` | `workflow` (JSON) |
//!
//! GSI `by_status` (`status`, `created_at`) lists runs and finds unfinished ones.
//!
//! A transition is one conditional `PutItem` of a history batch keyed by the run version it was
//! decided on: `attribute_not_exists(sk)` is the compare-and-set. Two workers deciding from the same
//! version race for the same key and exactly one wins, so a duplicate or late delivery can never
//! record a step twice or move a run backwards; no transaction (which would double the write cost)
//! is needed. A run's state is the fold of its history batches, read with one query. Creating a run
//! is one transaction (run, workflow snapshot, first batch); the run item's status is updated after
//! commits that change it (it only serves listing and recovery). Every item carries `expires_at`
//! (the table's TTL attribute): items expire `retention_days` after they were written.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::DisplayErrorContext;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{AttributeValue, Put, TransactWriteItem};
use serde::{Deserialize, Serialize};

use crate::engine::{HistoryEvent, HistoryKind, RunState, RunStatus};
use crate::ports::{Commit, RunStore, RunSummary, StoreError, StoredRun, WorkflowCatalog};
use crate::workflow::Workflow;

pub const STATUS_INDEX: &str = "by_status";
const STATUSES: [RunStatus; 5] = [
    RunStatus::Pending,
    RunStatus::Running,
    RunStatus::Succeeded,
    RunStatus::Failed,
    RunStatus::Cancelled,
];

#[derive(Clone)]
pub struct DynamoStore {
    client: Client,
    table: String,
    retention_s: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct MetaItem {
    pk: String,
    sk: String,
    status: String,
    workflow_id: String,
    created_at: u64,
    updated_at: u64,
    status_seq: u64,
    expires_at: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct HistoryItem {
    pk: String,
    sk: String,
    /// The events of one transition, as JSON text: step outputs keep their exact JSON.
    events: String,
    next_seq: u64,
    expires_at: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct WorkflowItem {
    pk: String,
    sk: String,
    workflow: String,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn run_pk(run_id: &str) -> String {
    format!("RUN#{run_id}")
}

fn history_sk(seq: u64) -> String {
    format!("H#{seq:012}")
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn to_item<T: Serialize>(value: &T) -> Result<HashMap<String, AttributeValue>, StoreError> {
    serde_dynamo::to_item(value).map_err(backend)
}

fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

fn n(value: u64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

/// Whether a transition changes the run's status (and so its run item).
fn changes_status(history: &[HistoryEvent]) -> bool {
    history.iter().any(|e| {
        matches!(
            e.kind,
            HistoryKind::RunStarted { .. }
                | HistoryKind::RunSucceeded { .. }
                | HistoryKind::RunFailed { .. }
                | HistoryKind::RunCancelled { .. }
                | HistoryKind::RunResumed {}
        )
    })
}

impl DynamoStore {
    pub fn new(client: Client, table: &str, retention_days: u64) -> DynamoStore {
        DynamoStore {
            client,
            table: table.to_owned(),
            retention_s: retention_days * 86_400,
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    fn history_item(&self, commit: &Commit) -> Result<HashMap<String, AttributeValue>, StoreError> {
        to_item(&HistoryItem {
            pk: run_pk(&commit.state.run_id),
            sk: history_sk(commit.expected_version),
            events: serde_json::to_string(&commit.history).map_err(backend)?,
            next_seq: commit.state.seq,
            expires_at: now_s() + self.retention_s,
        })
    }

    fn meta_item(&self, state: &RunState) -> Result<HashMap<String, AttributeValue>, StoreError> {
        to_item(&MetaItem {
            pk: run_pk(&state.run_id),
            sk: "META".into(),
            status: state.status.name().into(),
            workflow_id: state.workflow_id.clone(),
            created_at: state.created_at_ms,
            updated_at: state.updated_at_ms,
            status_seq: state.seq,
            expires_at: now_s() + self.retention_s,
        })
    }

    /// Records the run's new status unless a later commit already did.
    async fn update_status(&self, state: &RunState) -> Result<(), StoreError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(run_pk(&state.run_id)))
            .key("sk", s("META"))
            .update_expression("SET #status = :status, updated_at = :updated, status_seq = :seq")
            .condition_expression("attribute_exists(pk) AND status_seq < :seq")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":status", s(state.status.name()))
            .expression_attribute_values(":updated", n(state.updated_at_ms))
            .expression_attribute_values(":seq", n(state.seq))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) => match e.into_service_error() {
                aws_sdk_dynamodb::operation::update_item::UpdateItemError::ConditionalCheckFailedException(_) => Ok(()),
                other => Err(backend(DisplayErrorContext(other))),
            },
        }
    }

    async fn query_status(
        &self,
        status: RunStatus,
        limit: usize,
    ) -> Result<Vec<RunSummary>, StoreError> {
        let mut out = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(STATUS_INDEX)
                .key_condition_expression("#status = :status")
                .expression_attribute_names("#status", "status")
                .expression_attribute_values(":status", s(status.name()))
                .scan_index_forward(false)
                .limit(limit.min(1000) as i32)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| backend(DisplayErrorContext(e)))?;
            for item in page.items() {
                let meta: MetaItem = serde_dynamo::from_item(item.clone())
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                out.push(RunSummary {
                    run_id: meta.pk.trim_start_matches("RUN#").to_owned(),
                    workflow_id: meta.workflow_id,
                    status,
                    created_at_ms: meta.created_at,
                    updated_at_ms: meta.updated_at,
                });
            }
            match page.last_evaluated_key() {
                Some(key) if out.len() < limit => start = Some(key.clone()),
                _ => break,
            }
        }
        out.truncate(limit);
        Ok(out)
    }

    /// Every history batch of a run, oldest first (paged).
    async fn history_items(&self, run_id: &str) -> Result<Vec<HistoryItem>, StoreError> {
        let mut items = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .consistent_read(true)
                .key_condition_expression("pk = :pk AND begins_with(sk, :h)")
                .expression_attribute_values(":pk", s(run_pk(run_id)))
                .expression_attribute_values(":h", s("H#"))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| backend(DisplayErrorContext(e)))?;
            for item in page.items() {
                items.push(
                    serde_dynamo::from_item::<_, HistoryItem>(item.clone())
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                );
            }
            match page.last_evaluated_key() {
                Some(key) => start = Some(key.clone()),
                None => break,
            }
        }
        Ok(items)
    }

    async fn workflow_item(&self, pk: String, sk: &str) -> Result<Option<Workflow>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", s(pk))
            .key("sk", s(sk))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| backend(DisplayErrorContext(e)))?;
        let Some(item) = out.item() else {
            return Ok(None);
        };
        let item: WorkflowItem = serde_dynamo::from_item(item.clone())
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        serde_json::from_str(&item.workflow)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("stored workflow: {e}")))
    }
}

fn put(
    table: &str,
    item: HashMap<String, AttributeValue>,
    condition: Option<&str>,
) -> Result<TransactWriteItem, StoreError> {
    let put = Put::builder()
        .table_name(table)
        .set_item(Some(item))
        .set_condition_expression(condition.map(str::to_owned))
        .build()
        .map_err(backend)?;
    Ok(TransactWriteItem::builder().put(put).build())
}

impl RunStore for DynamoStore {
    async fn create_run(&self, commit: Commit, workflow: &Workflow) -> Result<(), StoreError> {
        let run_id = commit.state.run_id.clone();
        let wf = to_item(&WorkflowItem {
            pk: run_pk(&run_id),
            sk: "WF".into(),
            workflow: serde_json::to_string(workflow).map_err(backend)?,
        })?;
        let result = self
            .client
            .transact_write_items()
            .transact_items(put(
                &self.table,
                self.meta_item(&commit.state)?,
                Some("attribute_not_exists(pk)"),
            )?)
            .transact_items(put(&self.table, wf, None)?)
            .transact_items(put(
                &self.table,
                self.history_item(&commit)?,
                Some("attribute_not_exists(sk)"),
            )?)
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) => match e.into_service_error() {
                TransactWriteItemsError::TransactionCanceledException(c)
                    if c.cancellation_reasons()
                        .iter()
                        .any(|r| r.code() == Some("ConditionalCheckFailed")) =>
                {
                    Err(StoreError::AlreadyExists(run_id))
                }
                other => Err(backend(DisplayErrorContext(other))),
            },
        }
    }

    async fn commit(&self, commit: Commit) -> Result<(), StoreError> {
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(self.history_item(&commit)?))
            .condition_expression("attribute_not_exists(sk)")
            .send()
            .await;
        if let Err(e) = result {
            return Err(match e.into_service_error() {
                PutItemError::ConditionalCheckFailedException(_) => StoreError::Conflict {
                    run_id: commit.state.run_id.clone(),
                    expected: commit.expected_version,
                    found: None,
                },
                other => backend(DisplayErrorContext(other)),
            });
        }
        if changes_status(&commit.history) {
            self.update_status(&commit.state).await?;
        }
        Ok(())
    }

    async fn load_run(&self, run_id: &str) -> Result<Option<StoredRun>, StoreError> {
        let Some(workflow) = self.workflow_item(run_pk(run_id), "WF").await? else {
            return Ok(None);
        };
        let mut state = RunState::new(run_id, &workflow.id);
        for item in self.history_items(run_id).await? {
            let events: Vec<HistoryEvent> = serde_json::from_str(&item.events)
                .map_err(|e| StoreError::Corrupt(format!("history of run {run_id}: {e}")))?;
            for event in &events {
                state.apply(event);
            }
        }
        Ok(Some(StoredRun { state, workflow }))
    }

    async fn history(
        &self,
        run_id: &str,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<HistoryEvent>, StoreError> {
        let mut out = Vec::new();
        for item in self.history_items(run_id).await? {
            let first = item.sk.trim_start_matches("H#").parse::<u64>().unwrap_or(0);
            if item.next_seq <= from_seq {
                continue;
            }
            let events: Vec<HistoryEvent> = serde_json::from_str(&item.events)
                .map_err(|e| StoreError::Corrupt(format!("history of run {run_id}: {e}")))?;
            for (i, event) in events.into_iter().enumerate() {
                if first + i as u64 >= from_seq && out.len() < limit {
                    out.push(event);
                }
            }
        }
        Ok(out)
    }

    async fn list_runs(
        &self,
        status: Option<RunStatus>,
        limit: usize,
    ) -> Result<Vec<RunSummary>, StoreError> {
        let statuses: Vec<RunStatus> = status.map_or(STATUSES.to_vec(), |s| vec![s]);
        let mut out = Vec::new();
        for status in statuses {
            out.extend(self.query_status(status, limit).await?);
        }
        out.sort_by(|a, b| {
            b.created_at_ms
                .cmp(&a.created_at_ms)
                .then(b.run_id.cmp(&a.run_id))
        });
        out.truncate(limit);
        Ok(out)
    }

    async fn unfinished_runs(&self) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for status in [RunStatus::Pending, RunStatus::Running] {
            out.extend(
                self.query_status(status, usize::MAX >> 1)
                    .await?
                    .into_iter()
                    .map(|r| r.run_id),
            );
        }
        Ok(out)
    }
}

impl WorkflowCatalog for DynamoStore {
    async fn get_workflow(&self, id: &str) -> Result<Option<Workflow>, StoreError> {
        self.workflow_item(format!("WORKFLOW#{id}"), "DEF").await
    }

    async fn put_workflow(&self, workflow: &Workflow) -> Result<(), StoreError> {
        let item = to_item(&WorkflowItem {
            pk: format!("WORKFLOW#{}", workflow.id),
            sk: "DEF".into(),
            workflow: serde_json::to_string(workflow).map_err(backend)?,
        })?;
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| backend(DisplayErrorContext(e)))?;
        Ok(())
    }
}
