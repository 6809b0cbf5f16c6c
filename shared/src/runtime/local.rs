//! The embedded runtime a new user meets first: the SQLite store in a state dir (default
//! `.orchestra/`), the in-process queue and secrets from the environment and `.env`.
//!
//! One process at a time executes steps in a state dir; it holds `worker.lock` for that. Holding it
//! is what lets a restarted worker take over attempts that a killed one left running: nobody else
//! can be executing them. Reading and cancelling runs need no lock.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::queue::MemoryQueue;
use crate::runtime::{Runtime, RuntimeConfig};
use crate::secrets::EnvSecrets;
use crate::steps::ActionRegistry;
use crate::store::SqliteStore;

pub type LocalRuntime = Runtime<SqliteStore, MemoryQueue, EnvSecrets>;

pub const DEFAULT_STATE_DIR: &str = ".orchestra";

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("cannot use state dir {dir}: {detail}")]
    StateDir { dir: PathBuf, detail: String },
    #[error(
        "another orchestra process is executing runs in {dir} (it holds {dir}/worker.lock); \
         wait for it to finish, stop it, or use another --state-dir"
    )]
    Busy { dir: PathBuf },
}

/// Proof that this process is the one executing steps in a state dir; released on drop.
#[derive(Debug)]
pub struct ExecutorLock {
    _file: File,
}

impl ExecutorLock {
    pub fn acquire(dir: &Path) -> Result<ExecutorLock, LocalError> {
        std::fs::create_dir_all(dir).map_err(|e| LocalError::StateDir {
            dir: dir.to_owned(),
            detail: e.to_string(),
        })?;
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("worker.lock"))
            .map_err(|e| LocalError::StateDir {
                dir: dir.to_owned(),
                detail: e.to_string(),
            })?;
        match file.try_lock() {
            Ok(()) => Ok(ExecutorLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(LocalError::Busy {
                dir: dir.to_owned(),
            }),
            Err(std::fs::TryLockError::Error(e)) => Err(LocalError::StateDir {
                dir: dir.to_owned(),
                detail: e.to_string(),
            }),
        }
    }
}

/// Opens the store of a state dir without executing anything (for listing, showing, cancelling).
pub fn open_store(dir: &Path) -> Result<SqliteStore, LocalError> {
    SqliteStore::open_dir(dir).map_err(|e| LocalError::StateDir {
        dir: dir.to_owned(),
        detail: e.to_string(),
    })
}

/// Opens a state dir for executing runs: takes its executor lock and builds the runtime with the
/// step types that need no credentials.
pub fn open_local(
    dir: &Path,
    config: RuntimeConfig,
) -> Result<(LocalRuntime, ExecutorLock), LocalError> {
    let lock = ExecutorLock::acquire(dir)?;
    let store = open_store(dir)?;
    let secrets_dir = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let secrets = EnvSecrets::from_dir(secrets_dir).map_err(|e| LocalError::StateDir {
        dir: dir.to_owned(),
        detail: e.to_string(),
    })?;
    let visibility = config.default_timeout + config.lease_margin + Duration::from_secs(30);
    let runtime = Runtime::new(
        store,
        MemoryQueue::new(visibility),
        secrets,
        ActionRegistry::local(),
        config,
    );
    Ok((runtime, lock))
}
