//! The embedded durable store: one SQLite file in the state dir, in WAL mode.
//!
//! All writes go through one writer thread that takes every commit waiting at that moment into one
//! transaction (group commit): concurrent runs share one fsync instead of paying one each. Each
//! commit in the group is checked against its expected version on its own, so a conflict rejects
//! that commit only. Claims ([`Durability::Lazy`]) are written with `synchronous=NORMAL`; the next
//! synced commit makes them durable too.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

use crate::engine::{HistoryEvent, RunState, RunStatus, StepState};
use crate::ports::{Commit, Durability, RunStore, RunSummary, StoreError, StoredRun};
use crate::workflow::Workflow;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    workflow_id TEXT NOT NULL,
    status      TEXT NOT NULL,
    version     INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    record      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status, created_at);
CREATE TABLE IF NOT EXISTS run_workflows (
    run_id   TEXT PRIMARY KEY,
    workflow TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS steps (
    run_id  TEXT NOT NULL,
    step_id TEXT NOT NULL,
    state   TEXT NOT NULL,
    PRIMARY KEY (run_id, step_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS history (
    run_id TEXT NOT NULL,
    seq    INTEGER NOT NULL,
    event  TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
";

/// Most commits taken into one transaction.
const MAX_GROUP: usize = 512;

enum Write {
    Create {
        commit: Commit,
        workflow: String,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Commit {
        commit: Commit,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

impl Write {
    fn durable(&self) -> bool {
        match self {
            Write::Create { .. } => true,
            Write::Commit { commit, .. } => commit.durability == Durability::Sync,
        }
    }
}

/// The SQLite-backed [`RunStore`].
#[derive(Clone)]
pub struct SqliteStore {
    writer: mpsc::Sender<Write>,
    reader: Arc<Mutex<Connection>>,
    path: PathBuf,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn open(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(backend)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(backend)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(backend)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(backend)?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating if needed) the store file `dir/state.db`.
    pub fn open_dir(dir: &Path) -> Result<SqliteStore, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| backend(format!("cannot create state dir {}: {e}", dir.display())))?;
        SqliteStore::open(&dir.join("state.db"))
    }

    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let writer_conn = open(path)?;
        writer_conn.execute_batch(SCHEMA).map_err(backend)?;
        let reader = open(path)?;
        let (tx, rx) = mpsc::channel::<Write>();
        std::thread::Builder::new()
            .name("orchestra-store-writer".into())
            .spawn(move || writer_loop(writer_conn, rx))
            .map_err(backend)?;
        Ok(SqliteStore {
            writer: tx,
            reader: Arc::new(Mutex::new(reader)),
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn write(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), StoreError>>) -> Write,
    ) -> Result<(), StoreError> {
        let (reply, done) = oneshot::channel();
        self.writer
            .send(make(reply))
            .map_err(|_| backend("the store writer has stopped"))?;
        done.await
            .map_err(|_| backend("the store writer dropped a commit"))?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().map_err(|_| backend("reader lock poisoned"))?;
            f(&conn)
        })
        .await
        .map_err(backend)?
    }
}

fn writer_loop(mut conn: Connection, rx: mpsc::Receiver<Write>) {
    let mut synchronous_full = true;
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(w) => group.push(w),
                Err(_) => break,
            }
        }
        let durable = group.iter().any(Write::durable);
        if durable != synchronous_full {
            let mode = if durable { "FULL" } else { "NORMAL" };
            if conn.pragma_update(None, "synchronous", mode).is_ok() {
                synchronous_full = durable;
            }
        }
        let results = write_group(&mut conn, &group);
        for (write, result) in group.into_iter().zip(results) {
            let reply = match write {
                Write::Create { reply, .. } | Write::Commit { reply, .. } => reply,
            };
            let _ = reply.send(result);
        }
    }
}

/// Writes a group in one transaction; each write's outcome is reported on its own.
fn write_group(conn: &mut Connection, group: &[Write]) -> Vec<Result<(), StoreError>> {
    let tx = match conn.transaction() {
        Ok(tx) => tx,
        Err(e) => return group.iter().map(|_| Err(backend(&e))).collect(),
    };
    let mut results = Vec::with_capacity(group.len());
    for write in group {
        let result = (|| -> Result<(), StoreError> {
            // A savepoint per commit, so a conflict undoes that commit only.
            tx.execute_batch("SAVEPOINT one").map_err(backend)?;
            let outcome = match write {
                Write::Create {
                    commit, workflow, ..
                } => create(&tx, commit, workflow),
                Write::Commit { commit, .. } => apply_commit(&tx, commit),
            };
            match outcome {
                Ok(()) => tx.execute_batch("RELEASE one").map_err(backend),
                Err(e) => {
                    tx.execute_batch("ROLLBACK TO one; RELEASE one")
                        .map_err(backend)?;
                    Err(e)
                }
            }
        })();
        results.push(result);
    }
    if let Err(e) = tx.commit() {
        let msg = e.to_string();
        return group.iter().map(|_| Err(backend(&msg))).collect();
    }
    results
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(backend)
}

fn create(
    tx: &rusqlite::Transaction<'_>,
    commit: &Commit,
    workflow: &str,
) -> Result<(), StoreError> {
    let s = &commit.state;
    let inserted = tx
        .execute(
            "INSERT OR IGNORE INTO runs (run_id, workflow_id, status, version, created_at, updated_at, record)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                s.run_id,
                s.workflow_id,
                s.status.name(),
                s.seq as i64,
                s.created_at_ms as i64,
                s.updated_at_ms as i64,
                to_json(s)?
            ],
        )
        .map_err(backend)?;
    if inserted == 0 {
        return Err(StoreError::AlreadyExists(s.run_id.clone()));
    }
    tx.execute(
        "INSERT INTO run_workflows (run_id, workflow) VALUES (?1, ?2)",
        params![s.run_id, workflow],
    )
    .map_err(backend)?;
    write_parts(tx, commit)
}

fn apply_commit(tx: &rusqlite::Transaction<'_>, commit: &Commit) -> Result<(), StoreError> {
    let s = &commit.state;
    let updated = tx
        .prepare_cached(
            "UPDATE runs SET status = ?1, version = ?2, updated_at = ?3, record = ?4
             WHERE run_id = ?5 AND version = ?6",
        )
        .and_then(|mut st| {
            st.execute(params![
                s.status.name(),
                s.seq as i64,
                s.updated_at_ms as i64,
                to_json(s).unwrap_or_default(),
                s.run_id,
                commit.expected_version as i64
            ])
        })
        .map_err(backend)?;
    if updated == 0 {
        let found: Option<i64> = tx
            .query_row(
                "SELECT version FROM runs WHERE run_id = ?1",
                params![s.run_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(backend)?;
        return Err(match found {
            None => StoreError::Backend(format!("run {} does not exist", s.run_id)),
            Some(found) => StoreError::Conflict {
                run_id: s.run_id.clone(),
                expected: commit.expected_version,
                found: Some(found as u64),
            },
        });
    }
    write_parts(tx, commit)
}

fn write_parts(tx: &rusqlite::Transaction<'_>, commit: &Commit) -> Result<(), StoreError> {
    let run_id = &commit.state.run_id;
    let mut step_stmt = tx
        .prepare_cached("INSERT OR REPLACE INTO steps (run_id, step_id, state) VALUES (?1, ?2, ?3)")
        .map_err(backend)?;
    for (step_id, state) in &commit.changed_steps {
        step_stmt
            .execute(params![run_id, step_id, to_json(state)?])
            .map_err(backend)?;
    }
    let mut hist_stmt = tx
        .prepare_cached("INSERT INTO history (run_id, seq, event) VALUES (?1, ?2, ?3)")
        .map_err(backend)?;
    for (n, event) in commit.history.iter().enumerate() {
        let seq = commit.expected_version + n as u64;
        hist_stmt
            .execute(params![run_id, seq as i64, to_json(event)?])
            .map_err(backend)?;
    }
    Ok(())
}

fn parse<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn status_of(text: &str) -> Result<RunStatus, StoreError> {
    parse(&format!("\"{text}\""), "run status")
}

impl RunStore for SqliteStore {
    async fn create_run(&self, commit: Commit, workflow: &Workflow) -> Result<(), StoreError> {
        let workflow = to_json(workflow)?;
        self.write(|reply| Write::Create {
            commit,
            workflow,
            reply,
        })
        .await
    }

    async fn commit(&self, commit: Commit) -> Result<(), StoreError> {
        self.write(|reply| Write::Commit { commit, reply }).await
    }

    async fn load_run(&self, run_id: &str) -> Result<Option<StoredRun>, StoreError> {
        let run_id = run_id.to_owned();
        self.read(move |conn| {
            let row: Option<(String, String)> = conn
                .query_row(
                    "SELECT r.record, w.workflow FROM runs r JOIN run_workflows w USING (run_id)
                     WHERE r.run_id = ?1",
                    params![run_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(backend)?;
            let Some((record, workflow)) = row else {
                return Ok(None);
            };
            let mut state: RunState = parse(&record, "run record")?;
            let workflow: Workflow = parse(&workflow, "run workflow")?;
            let mut stmt = conn
                .prepare_cached("SELECT step_id, state FROM steps WHERE run_id = ?1")
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![run_id], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                })
                .map_err(backend)?;
            for row in rows {
                let (step_id, text) = row.map_err(backend)?;
                let step: StepState = parse(&text, "step record")?;
                state.steps.insert(step_id, step);
            }
            Ok(Some(StoredRun { state, workflow }))
        })
        .await
    }

    async fn history(
        &self,
        run_id: &str,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<HistoryEvent>, StoreError> {
        let run_id = run_id.to_owned();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT event FROM history WHERE run_id = ?1 AND seq >= ?2 ORDER BY seq LIMIT ?3",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![run_id, from_seq as i64, limit as i64], |r| {
                    r.get::<_, String>(0)
                })
                .map_err(backend)?;
            rows.map(|r| parse(&r.map_err(backend)?, "history event"))
                .collect()
        })
        .await
    }

    async fn list_runs(
        &self,
        status: Option<RunStatus>,
        limit: usize,
    ) -> Result<Vec<RunSummary>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT run_id, workflow_id, status, created_at, updated_at FROM runs
                     WHERE (?1 IS NULL OR status = ?1) ORDER BY created_at DESC, run_id DESC LIMIT ?2",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![status.map(|s| s.name()), limit as i64], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                })
                .map_err(backend)?;
            rows.map(|row| {
                let (run_id, workflow_id, status, created, updated) = row.map_err(backend)?;
                Ok(RunSummary {
                    run_id,
                    workflow_id,
                    status: status_of(&status)?,
                    created_at_ms: created as u64,
                    updated_at_ms: updated as u64,
                })
            })
            .collect()
        })
        .await
    }

    async fn unfinished_runs(&self) -> Result<Vec<String>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT run_id FROM runs WHERE status IN ('pending', 'running') ORDER BY created_at",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(backend)?;
            rows.map(|r| r.map_err(backend)).collect()
        })
        .await
    }
}
