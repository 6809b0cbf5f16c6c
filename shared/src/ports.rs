//! The ports the runtime talks to. Each has a local adapter here (embedded SQLite store, in-process
//! queue, environment secrets) and gets an AWS adapter (DynamoDB, SQS, Secrets Manager) later; the
//! runtime never knows which it has.

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::{HistoryEvent, RunState, RunStatus, StepState, Task};
use crate::workflow::Workflow;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Someone else changed the run since it was read: reload and decide again.
    #[error("run {run_id} changed concurrently (expected version {expected}, found {})", found.map_or("a newer one".to_owned(), |f| f.to_string()))]
    Conflict {
        run_id: String,
        expected: u64,
        /// The version found, where the store can tell it cheaply.
        found: Option<u64>,
    },
    #[error("run {0} already exists")]
    AlreadyExists(String),
    #[error("state store error: {0}")]
    Backend(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// How soon a commit must be on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Synced before the call returns: step results, run creation.
    Sync,
    /// May be lost in a crash, which only costs redoing the work: claims.
    Lazy,
}

/// The changes of one transition of one run, written atomically and only if the run's version (its
/// history length) is still `expected_version`.
#[derive(Debug, Clone)]
pub struct Commit {
    /// The run after the transition; `state.seq` is the new version.
    pub state: RunState,
    pub expected_version: u64,
    pub changed_steps: Vec<(String, StepState)>,
    pub history: Vec<HistoryEvent>,
    pub durability: Durability,
}

impl Commit {
    /// Builds the commit for `history`, just applied to `state`.
    pub fn of(state: &RunState, history: &[HistoryEvent], durability: Durability) -> Commit {
        let mut changed: Vec<&str> = history.iter().filter_map(|e| e.kind.step()).collect();
        changed.sort_unstable();
        changed.dedup();
        let run = state.clone_record();
        Commit {
            expected_version: state.seq - history.len() as u64,
            changed_steps: changed
                .into_iter()
                .filter_map(|id| state.steps.get(id).map(|s| (id.to_owned(), s.clone())))
                .collect(),
            history: history.to_vec(),
            state: run,
            durability,
        }
    }
}

/// A run as stored: its state and the workflow it runs (a snapshot taken at start).
#[derive(Debug, Clone)]
pub struct StoredRun {
    pub state: RunState,
    pub workflow: Workflow,
}

/// One line of `runs list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub run_id: String,
    pub workflow_id: String,
    pub status: RunStatus,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

/// Durable run state: runs, step records and history.
pub trait RunStore: Send + Sync + 'static {
    /// Creates a run with its first history events; fails if the id exists.
    fn create_run(
        &self,
        commit: Commit,
        workflow: &Workflow,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Writes a transition if the run is still at `expected_version` (compare-and-set).
    fn commit(&self, commit: Commit) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn load_run(
        &self,
        run_id: &str,
    ) -> impl Future<Output = Result<Option<StoredRun>, StoreError>> + Send;
    /// History events with sequence number >= `from_seq`, at most `limit`.
    fn history(
        &self,
        run_id: &str,
        from_seq: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<HistoryEvent>, StoreError>> + Send;
    /// Newest first.
    fn list_runs(
        &self,
        status: Option<RunStatus>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<RunSummary>, StoreError>> + Send;
    /// Runs that are neither finished nor failed: what a restarted worker must pick up.
    fn unfinished_runs(&self) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;
}

/// Named workflow definitions (what a schedule or an API call starts by id).
pub trait WorkflowCatalog: Send + Sync + 'static {
    fn get_workflow(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<Workflow>, StoreError>> + Send;
    fn put_workflow(
        &self,
        workflow: &Workflow,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("step queue error: {0}")]
    Backend(String),
}

/// A received task; `receipt` acknowledges or extends it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub task: Task,
    pub receipt: String,
    pub receive_count: u32,
}

/// At-least-once delivery of step tasks, with delays.
pub trait StepQueue: Send + Sync + 'static {
    fn send(
        &self,
        batch: Vec<(Task, Duration)>,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;
    /// Waits up to `wait` for up to `max` due tasks. Unacknowledged tasks come back after the
    /// visibility timeout.
    fn receive(
        &self,
        max: usize,
        wait: Duration,
    ) -> impl Future<Output = Result<Vec<Delivery>, QueueError>> + Send;
    fn ack(&self, receipt: &str) -> impl Future<Output = Result<(), QueueError>> + Send;
    /// Keeps a long-running task invisible for `visibility` more.
    fn extend(
        &self,
        receipt: &str,
        visibility: Duration,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret source error: {0}")]
    Backend(String),
}

/// Credentials by name. Values must never reach logs, outputs or history.
pub trait SecretSource: Send + Sync + 'static {
    fn get(&self, name: &str) -> impl Future<Output = Result<Option<String>, SecretError>> + Send;
}
