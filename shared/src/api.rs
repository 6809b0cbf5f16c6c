//! The library entry point for programs: load a workflow, run it to completion on the embedded
//! runtime, inspect the result.
//!
//! ```
//! use orchestra_core::Orchestra;
//! use serde_json::json;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! std::fs::write(dir.path().join("greet.json"), r#"{
//!     "id": "greet",
//!     "inputs": {"name": {"type": "string", "required": true}},
//!     "steps": [
//!         {"id": "hello", "type": "transform", "action": "build",
//!          "params": {"value": {"text": "Hello, {{ inputs.name }}!"}}}
//!     ]
//! }"#)?;
//!
//! let orchestra = Orchestra::open(dir.path().join(".orchestra"))?
//!     .with_workflows_dir(dir.path());
//! let workflow = orchestra.load_workflow("greet")?;
//! let result = orchestra
//!     .execute_workflow(&workflow, json!({"name": "Ada"}).as_object().unwrap().clone())
//!     .await?;
//!
//! assert!(result.succeeded());
//! assert_eq!(result.output["hello"]["text"], "Hello, Ada!");
//! # Ok(())
//! # }
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::engine::{HistoryEvent, RunError, RunState, RunStatus};
use crate::ports::RunStore;
use crate::runtime::local::{ExecutorLock, LocalError, LocalRuntime, open_local};
use crate::runtime::{RuntimeConfig, RuntimeError};
use crate::workflow::{LoadError, Plan};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Local(#[from] LocalError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// The outcome of a run.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub run_id: String,
    pub status: RunStatus,
    /// The run's output (`null` unless it succeeded).
    pub output: Value,
    pub error: Option<RunError>,
    pub state: RunState,
}

impl RunResult {
    pub fn succeeded(&self) -> bool {
        self.status == RunStatus::Succeeded
    }
}

/// An embedded AI-Orchestra: a state dir and a directory of workflows.
pub struct Orchestra {
    runtime: LocalRuntime,
    _lock: ExecutorLock,
    workflows_dir: PathBuf,
}

impl Orchestra {
    /// Opens (creating) a state dir; workflows are looked up in `./workflows` by default.
    pub fn open(state_dir: impl AsRef<Path>) -> Result<Orchestra, Error> {
        let (runtime, lock) = open_local(state_dir.as_ref(), RuntimeConfig::default())?;
        Ok(Orchestra {
            runtime,
            _lock: lock,
            workflows_dir: PathBuf::from("workflows"),
        })
    }

    pub fn with_workflows_dir(mut self, dir: impl Into<PathBuf>) -> Orchestra {
        self.workflows_dir = dir.into();
        self
    }

    /// Loads and validates a workflow by file path or by id in the workflows dir.
    pub fn load_workflow(&self, id_or_path: &str) -> Result<Arc<Plan>, LoadError> {
        let path = Path::new(id_or_path);
        let plan = if path.extension().is_some_and(|e| e == "json") || path.is_file() {
            Plan::load_file(path)?
        } else {
            Plan::load_by_id(&self.workflows_dir, id_or_path)?
        };
        Ok(Arc::new(plan))
    }

    /// Runs a workflow to completion with the given variables (inputs).
    pub async fn execute_workflow(
        &self,
        plan: &Arc<Plan>,
        variables: Map<String, Value>,
    ) -> Result<RunResult, Error> {
        let state = self
            .runtime
            .run_to_completion(plan.clone(), variables)
            .await?;
        Ok(RunResult {
            run_id: state.run_id.clone(),
            status: state.status,
            output: state.output.clone().unwrap_or(Value::Null),
            error: state.error.clone(),
            state,
        })
    }

    /// A run's history, oldest first.
    pub async fn history(&self, run_id: &str) -> Result<Vec<HistoryEvent>, Error> {
        Ok(self
            .runtime
            .store()
            .history(run_id, 0, usize::MAX >> 1)
            .await
            .map_err(RuntimeError::from)?)
    }

    pub fn runtime(&self) -> &LocalRuntime {
        &self.runtime
    }
}
