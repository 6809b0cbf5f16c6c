//! The runtime carries out what the engine decides: it starts runs, takes tasks off the step queue,
//! claims each attempt with a compare-and-set commit, renders parameters (secrets included),
//! executes the action, commits the result and only then dispatches what comes next. It is generic
//! over the ports, so the same code runs on the embedded store and on AWS.

pub mod inputs;
#[cfg(feature = "local")]
pub mod local;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};
use tokio::sync::{Semaphore, broadcast, watch};

use crate::engine::{
    self, Action, Ctx, Event, Extras, HistoryEvent, RunState, RunStatus, Task, TaskKind,
    Transition, UnitStatus, context,
};
use crate::failure::StepError;
use crate::ports::{
    Commit, Delivery, Durability, QueueError, RunStore, SecretError, SecretSource, StepQueue,
    StoreError,
};
use crate::secrets::Redactor;
use crate::steps::{ActionRegistry, StepCall};
use crate::template;
use crate::workflow::{Plan, ValidationError};
pub use inputs::{InputError, coerce_input, resolve_inputs};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(transparent)]
    Inputs(#[from] InputError),
    #[error("no run with id '{0}'")]
    RunNotFound(String),
    #[error("the workflow stored with run {run_id} no longer validates: {source}")]
    StoredWorkflow {
        run_id: String,
        #[source]
        source: ValidationError,
    },
    #[error("run {run_id} is {status}; only failed or cancelled runs can be resumed")]
    NotResumable {
        run_id: String,
        status: &'static str,
    },
    #[error("run {run_id} is already {status}")]
    AlreadyFinished {
        run_id: String,
        status: &'static str,
    },
    /// Another worker holds the attempt's claim; deliver the task again after the lease, when a
    /// dead worker's attempt can be taken over.
    #[error(
        "step {step} attempt {attempt} of run {run_id} is claimed by another worker until {until_ms}"
    )]
    LeaseHeld {
        run_id: String,
        step: String,
        attempt: u32,
        until_ms: u64,
    },
}

/// Tuning of a runtime.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Step attempts executing at once.
    pub concurrency: usize,
    /// Timeout of steps that set no `timeout_s`.
    pub default_timeout: Duration,
    /// How long past its timeout an attempt's claim lasts before another worker may take it over.
    pub lease_margin: Duration,
    pub receive_batch: usize,
    /// Step outputs larger than this (as JSON) fail the step: stores have item limits.
    pub max_output_bytes: Option<usize>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            concurrency: 64,
            default_timeout: Duration::from_secs(300),
            lease_margin: Duration::from_secs(30),
            receive_batch: 64,
            max_output_bytes: None,
        }
    }
}

/// New history of a run, broadcast after it is committed (progress displays listen to this).
#[derive(Debug, Clone)]
pub struct RunUpdate {
    pub run_id: String,
    pub status: RunStatus,
    pub events: Arc<Vec<HistoryEvent>>,
}

struct Cached {
    plan: Arc<Plan>,
    state: RunState,
}

type Slot = Arc<tokio::sync::Mutex<Option<Cached>>>;
type UnitKey = (String, String, Option<u32>, u32);

struct Inner<S, Q, K> {
    store: S,
    queue: Q,
    secrets: K,
    registry: ActionRegistry,
    config: RuntimeConfig,
    /// One lock per run: transitions of a run are applied one at a time, while its steps execute
    /// concurrently. The store's compare-and-set still guards against other processes.
    runs: Mutex<HashMap<String, Slot>>,
    updates: broadcast::Sender<RunUpdate>,
    /// Running attempts whose worker is known dead (found by `recover`), which may be taken over
    /// before their lease ends.
    orphans: Mutex<HashSet<UnitKey>>,
    active: AtomicUsize,
}

/// The runtime, generic over its store, queue and secret source. Cheap to clone.
pub struct Runtime<S, Q, K> {
    inner: Arc<Inner<S, Q, K>>,
}

impl<S, Q, K> Clone for Runtime<S, Q, K> {
    fn clone(&self) -> Self {
        Runtime {
            inner: self.inner.clone(),
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn ctx() -> Ctx {
    Ctx {
        now_ms: now_ms(),
        random: fastrand::f64(),
    }
}

/// What phase one of a task hands to execution.
struct Prepared {
    plan: Arc<Plan>,
    step_index: usize,
    params: Map<String, Value>,
    scope: Map<String, Value>,
    redactor: Redactor,
    timeout: Duration,
}

impl<S: RunStore, Q: StepQueue, K: SecretSource> Runtime<S, Q, K> {
    pub fn new(
        store: S,
        queue: Q,
        secrets: K,
        registry: ActionRegistry,
        config: RuntimeConfig,
    ) -> Self {
        let (updates, _) = broadcast::channel(4096);
        Runtime {
            inner: Arc::new(Inner {
                store,
                queue,
                secrets,
                registry,
                config,
                runs: Mutex::new(HashMap::new()),
                updates,
                orphans: Mutex::new(HashSet::new()),
                active: AtomicUsize::new(0),
            }),
        }
    }

    pub fn store(&self) -> &S {
        &self.inner.store
    }

    pub fn queue(&self) -> &Q {
        &self.inner.queue
    }

    pub fn subscribe(&self) -> broadcast::Receiver<RunUpdate> {
        self.inner.updates.subscribe()
    }

    fn slot(&self, run_id: &str) -> Slot {
        let mut runs = self.inner.runs.lock().unwrap_or_else(|p| p.into_inner());
        runs.entry(run_id.to_owned()).or_default().clone()
    }

    fn evict(&self, run_id: &str) {
        let mut runs = self.inner.runs.lock().unwrap_or_else(|p| p.into_inner());
        runs.remove(run_id);
    }

    /// Loads a run into its slot if it is not cached. `None`: no such run.
    async fn ensure_loaded<'g>(
        &self,
        guard: &'g mut Option<Cached>,
        run_id: &str,
    ) -> Result<Option<&'g mut Cached>, RuntimeError> {
        if guard.is_none() {
            let Some(stored) = self.inner.store.load_run(run_id).await? else {
                return Ok(None);
            };
            let plan =
                Plan::compile(stored.workflow, &format!("run {run_id}")).map_err(|source| {
                    RuntimeError::StoredWorkflow {
                        run_id: run_id.to_owned(),
                        source,
                    }
                })?;
            *guard = Some(Cached {
                plan: Arc::new(plan),
                state: stored.state,
            });
        }
        Ok(guard.as_mut())
    }

    /// Applies an event and commits it (reloading and deciding again on a conflict), then carries
    /// out the actions. The commit happens before any dispatch.
    async fn transition(
        &self,
        guard: &mut Option<Cached>,
        run_id: &str,
        event: Event,
        durability: Durability,
    ) -> Result<Transition, RuntimeError> {
        for _ in 0..8 {
            let Some(cached) = self.ensure_loaded(guard, run_id).await? else {
                return Err(RuntimeError::RunNotFound(run_id.to_owned()));
            };
            let tr = engine::handle(&cached.plan, &mut cached.state, event.clone(), ctx());
            if tr.is_noop() {
                return Ok(tr);
            }
            let commit = Commit::of(&cached.state, &tr.history, durability);
            match self.inner.store.commit(commit).await {
                Ok(()) => {
                    let status = cached.state.status;
                    self.after(run_id, status, &tr).await?;
                    return Ok(tr);
                }
                Err(StoreError::Conflict { .. }) => {
                    *guard = None;
                }
                Err(e) => {
                    // The cached state is ahead of the store now; forget it.
                    *guard = None;
                    return Err(e.into());
                }
            }
        }
        Err(StoreError::Backend(format!("run {run_id}: too many concurrent updates")).into())
    }

    /// Dispatches the tasks a committed transition asks for and tells listeners.
    async fn after(
        &self,
        run_id: &str,
        status: RunStatus,
        tr: &Transition,
    ) -> Result<(), RuntimeError> {
        self.dispatch(&tr.actions).await?;
        let _ = self.inner.updates.send(RunUpdate {
            run_id: run_id.to_owned(),
            status,
            events: Arc::new(tr.history.clone()),
        });
        if status.is_terminal() {
            self.evict(run_id);
        }
        Ok(())
    }

    async fn dispatch(&self, actions: &[Action]) -> Result<(), RuntimeError> {
        let now = now_ms();
        let batch: Vec<(Task, Duration)> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Dispatch {
                    task,
                    not_before_ms,
                } => Some((
                    task.clone(),
                    Duration::from_millis(not_before_ms.saturating_sub(now)),
                )),
                _ => None,
            })
            .collect();
        if !batch.is_empty() {
            self.inner.queue.send(batch).await?;
        }
        Ok(())
    }

    /// Starts a run of `plan` and returns its id; its steps run as workers take them.
    pub async fn start_run(
        &self,
        plan: Arc<Plan>,
        given: Map<String, Value>,
    ) -> Result<String, RuntimeError> {
        self.start_run_with_id(plan, given, ulid::Ulid::new().to_string())
            .await
    }

    /// Starts a run with a caller-chosen id. Starting the same id again is refused by the store
    /// (`StoreError::AlreadyExists`), which makes a redelivered trigger harmless.
    pub async fn start_run_with_id(
        &self,
        plan: Arc<Plan>,
        given: Map<String, Value>,
        run_id: String,
    ) -> Result<String, RuntimeError> {
        let inputs = resolve_inputs(&plan.workflow, given)?;
        let mut state = RunState::new(&run_id, &plan.workflow.id);
        let tr = engine::handle(&plan, &mut state, Event::Start { inputs }, ctx());
        let commit = Commit::of(&state, &tr.history, Durability::Sync);
        self.inner.store.create_run(commit, &plan.workflow).await?;
        let status = state.status;
        *self.slot(&run_id).lock().await = Some(Cached { plan, state });
        self.after(&run_id, status, &tr).await?;
        tracing::info!(run_id = %run_id, "run started");
        Ok(run_id)
    }

    /// Cancels a run; its in-flight attempts finish but their results are not used.
    pub async fn cancel(&self, run_id: &str, reason: &str) -> Result<(), RuntimeError> {
        let slot = self.slot(run_id);
        let mut guard = slot.lock().await;
        let tr = self
            .transition(
                &mut guard,
                run_id,
                Event::Cancel {
                    reason: reason.to_owned(),
                },
                Durability::Sync,
            )
            .await?;
        if tr.is_noop() {
            let status = guard
                .as_ref()
                .map(|c| c.state.status.name())
                .unwrap_or("finished");
            return Err(RuntimeError::AlreadyFinished {
                run_id: run_id.to_owned(),
                status,
            });
        }
        Ok(())
    }

    /// Continues a failed or cancelled run from where it stopped; completed steps are kept.
    pub async fn resume(&self, run_id: &str) -> Result<(), RuntimeError> {
        let slot = self.slot(run_id);
        let mut guard = slot.lock().await;
        let tr = self
            .transition(&mut guard, run_id, Event::Resume, Durability::Sync)
            .await?;
        if tr.is_noop() {
            let status = guard
                .as_ref()
                .map(|c| c.state.status.name())
                .unwrap_or("unknown");
            return Err(RuntimeError::NotResumable {
                run_id: run_id.to_owned(),
                status,
            });
        }
        Ok(())
    }

    /// Re-queues the work of every unfinished run, e.g. after a crash emptied the in-process queue.
    /// Attempts that were running are taken over: the caller vouches that their worker is gone.
    pub async fn recover(&self) -> Result<usize, RuntimeError> {
        let mut count = 0;
        for run_id in self.inner.store.unfinished_runs().await? {
            let slot = self.slot(&run_id);
            let mut guard = slot.lock().await;
            let Some(cached) = self.ensure_loaded(&mut guard, &run_id).await? else {
                continue;
            };
            let actions = engine::pending_dispatches(&cached.plan, &cached.state, true);
            {
                let mut orphans = self.inner.orphans.lock().unwrap_or_else(|p| p.into_inner());
                for action in &actions {
                    if let Action::Dispatch { task, .. } = action {
                        orphans.insert(unit_key(task));
                    }
                }
            }
            count += actions.len();
            self.dispatch(&actions).await?;
            if !actions.is_empty() {
                tracing::info!(run_id = %run_id, tasks = actions.len(), "recovered unfinished run");
            }
        }
        Ok(count)
    }

    /// Handles one delivery and acknowledges it unless it must be retried.
    pub async fn process(&self, delivery: Delivery) {
        let task = &delivery.task;
        match self.process_task(task).await {
            Ok(()) => {
                if let Err(e) = self.inner.queue.ack(&delivery.receipt).await {
                    tracing::warn!(run_id = %task.run_id, step_id = %task.step, error = %e, "ack failed; the task will come back and be ignored");
                }
            }
            Err(RuntimeError::RunNotFound(_)) => {
                tracing::warn!(run_id = %task.run_id, step_id = %task.step, "task for an unknown run dropped");
                let _ = self.inner.queue.ack(&delivery.receipt).await;
            }
            Err(e @ RuntimeError::LeaseHeld { .. }) => {
                tracing::debug!(run_id = %task.run_id, step_id = %task.step, error = %e, "duplicate of a running attempt kept for later");
            }
            Err(e) => {
                tracing::warn!(run_id = %task.run_id, step_id = %task.step, attempt = task.attempt, error = %e, "task failed; it will be delivered again");
            }
        }
    }

    /// Carries out one task: claim, execute, record. `Ok` means the task is done with (including
    /// a duplicate that needed nothing); an error means it should be delivered again.
    pub async fn execute_task(&self, task: &Task) -> Result<(), RuntimeError> {
        self.process_task(task).await
    }

    /// Marks a run failed because one of its tasks cannot be processed (a poison message).
    pub async fn abort(&self, task: &Task, reason: &str) -> Result<(), RuntimeError> {
        let slot = self.slot(&task.run_id);
        let mut guard = slot.lock().await;
        let event = Event::Abort {
            step: Some(task.step.clone()),
            reason: reason.to_owned(),
        };
        match self
            .transition(&mut guard, &task.run_id, event, Durability::Sync)
            .await
        {
            Err(RuntimeError::StoredWorkflow { .. }) => {
                // The engine needs a valid workflow; failing a run does not: record it directly.
                let Some(stored) = self.inner.store.load_run(&task.run_id).await? else {
                    return Err(RuntimeError::RunNotFound(task.run_id.clone()));
                };
                let mut state = stored.state;
                if state.status.is_terminal() {
                    return Ok(());
                }
                let failed = HistoryEvent {
                    at_ms: now_ms(),
                    kind: crate::engine::HistoryKind::RunFailed {
                        error: crate::engine::RunError {
                            step: Some(task.step.clone()),
                            message: reason.to_owned(),
                        },
                    },
                };
                state.apply(&failed);
                let history = [failed];
                self.inner
                    .store
                    .commit(Commit::of(&state, &history, Durability::Sync))
                    .await?;
                Ok(())
            }
            other => other.map(|_| ()),
        }
    }

    async fn process_task(&self, task: &Task) -> Result<(), RuntimeError> {
        let slot = self.slot(&task.run_id);
        let prepared = {
            let mut guard = slot.lock().await;
            if self
                .ensure_loaded(&mut guard, &task.run_id)
                .await?
                .is_none()
            {
                return Err(RuntimeError::RunNotFound(task.run_id.clone()));
            }
            if self.requeue_if_early(&guard, task).await? {
                return Ok(());
            }
            if task.kind == TaskKind::Timer {
                return self.fire_timer(&mut guard, task).await;
            }
            let timeout = guard
                .as_ref()
                .and_then(|c| c.plan.step_index(&task.step).map(|i| (c, i)))
                .and_then(|(c, i)| c.plan.step(i).timeout_s)
                .map(Duration::from_secs_f64)
                .unwrap_or(self.inner.config.default_timeout);
            let steal = self
                .inner
                .orphans
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&unit_key(task));
            let lease = now_ms() + (timeout + self.inner.config.lease_margin).as_millis() as u64;
            let claim = Event::StepStarted {
                step: task.step.clone(),
                index: task.index,
                attempt: task.attempt,
                lease_until_ms: lease,
                steal,
            };
            let tr = self
                .transition(&mut guard, &task.run_id, claim, Durability::Lazy)
                .await?;
            if tr.is_noop() {
                // Claimed by a worker that may yet die: keep the task until the lease runs out.
                // Anything else (a duplicate of a finished attempt, a stale attempt, a finished
                // run) needs nothing.
                let held = guard
                    .as_ref()
                    .filter(|c| c.state.status == RunStatus::Running)
                    .and_then(|c| c.state.step(&task.step))
                    .and_then(|s| s.unit(task.index))
                    .filter(|u| u.attempt == task.attempt && u.status == UnitStatus::Running)
                    .map(|u| u.lease_until_ms);
                if let Some(until_ms) = held {
                    return Err(RuntimeError::LeaseHeld {
                        run_id: task.run_id.clone(),
                        step: task.step.clone(),
                        attempt: task.attempt,
                        until_ms,
                    });
                }
                return Ok(());
            }
            let Some(cached) = guard.as_ref() else {
                return Ok(());
            };
            match self.prepare(cached, task, timeout).await? {
                Ok(p) => p,
                Err(error) => {
                    let event = Event::StepFailed {
                        step: task.step.clone(),
                        index: task.index,
                        attempt: task.attempt,
                        error,
                    };
                    self.transition(&mut guard, &task.run_id, event, Durability::Sync)
                        .await?;
                    return Ok(());
                }
            }
        };
        let event = self.execute(task, &prepared).await;
        let mut guard = slot.lock().await;
        self.transition(&mut guard, &task.run_id, event, Durability::Sync)
            .await?;
        Ok(())
    }

    /// A task that arrives before its time (SQS caps delays at 15 minutes) is sent again for the
    /// rest of the wait, which chains long backoffs and waits.
    async fn requeue_if_early(
        &self,
        guard: &Option<Cached>,
        task: &Task,
    ) -> Result<bool, RuntimeError> {
        let due = guard
            .as_ref()
            .and_then(|c| c.state.step(&task.step))
            .and_then(|s| s.unit(task.index))
            .filter(|u| u.attempt == task.attempt && u.status == UnitStatus::Scheduled)
            .map_or(0, |u| u.not_before_ms);
        let now = now_ms();
        if due <= now {
            return Ok(false);
        }
        self.inner
            .queue
            .send(vec![(task.clone(), Duration::from_millis(due - now))])
            .await?;
        Ok(true)
    }

    async fn fire_timer(
        &self,
        guard: &mut Option<Cached>,
        task: &Task,
    ) -> Result<(), RuntimeError> {
        let event = Event::TimerFired {
            step: task.step.clone(),
            index: task.index,
            attempt: task.attempt,
        };
        self.transition(guard, &task.run_id, event, Durability::Sync)
            .await?;
        Ok(())
    }

    /// Renders the attempt's parameters. The inner error fails the attempt (a template or a secret
    /// problem); the outer one is an infrastructure error.
    async fn prepare(
        &self,
        cached: &Cached,
        task: &Task,
        timeout: Duration,
    ) -> Result<Result<Prepared, StepError>, RuntimeError> {
        let plan = cached.plan.clone();
        let Some(i) = plan.step_index(&task.step) else {
            return Ok(Err(StepError::permanent(format!(
                "step '{}' is not in the workflow",
                task.step
            ))));
        };
        let mut secrets = Map::new();
        let mut values = Vec::new();
        for name in &plan.refs(i).secrets {
            let value = match self.inner.secrets.get(name).await {
                Ok(v) => v,
                // Recorded as a failed attempt (retryable), not left as a claimed one.
                Err(e) => return Ok(Err(StepError::transient(e.to_string()))),
            };
            match value {
                Some(v) => {
                    values.push(v.clone());
                    secrets.insert(name.clone(), Value::String(v));
                }
                None => {
                    return Ok(Err(StepError::permanent(format!(
                        "secret '{name}' is not set: export {name}=... or add it to the .env file"
                    ))));
                }
            }
        }
        let redactor = Redactor::new(values);
        let item = task.index.and_then(|n| {
            cached
                .state
                .step(&task.step)
                .and_then(|s| s.items.as_ref())
                .and_then(|items| items.get(n as usize).cloned())
                .map(|item| (item, n))
        });
        let scope = context::context_json(
            &plan,
            &cached.state,
            Some(i),
            &Extras {
                item: item.clone(),
                secrets: None,
            },
        );
        let mut full = scope.clone();
        full.insert("secrets".into(), Value::Object(secrets));
        let jinja = minijinja::Value::from(minijinja::value::Serde(&full));
        let params = Value::Object(plan.step(i).params.clone());
        let params = match template::render_value(&params, &jinja) {
            Ok(Value::Object(p)) => p,
            Ok(_) => Map::new(),
            Err(e) => {
                return Ok(Err(StepError::permanent(
                    redactor.redact_str(&format!("params: {e}")),
                )));
            }
        };
        Ok(Ok(Prepared {
            plan,
            step_index: i,
            params,
            scope,
            redactor,
            timeout,
        }))
    }

    /// Runs the action; never fails, the outcome is an event.
    async fn execute(&self, task: &Task, p: &Prepared) -> Event {
        let spec = p.plan.step(p.step_index);
        let action_name = spec.action_name().unwrap_or_default();
        let result = match self.inner.registry.get(spec.kind) {
            None => Err(StepError::permanent(format!(
                "no executor for '{}' steps is registered in this runtime",
                spec.kind.name()
            ))),
            Some(action) => {
                let call = StepCall {
                    run_id: &task.run_id,
                    step_id: &task.step,
                    action: action_name,
                    params: p.params.clone(),
                    scope: &p.scope,
                    attempt: task.attempt,
                    index: task.index,
                    redactor: &p.redactor,
                };
                self.inner.active.fetch_add(1, Ordering::SeqCst);
                let outcome = tokio::time::timeout(p.timeout, action.execute(call)).await;
                self.inner.active.fetch_sub(1, Ordering::SeqCst);
                match outcome {
                    Err(_) => {
                        tracing::info!(run_id = %task.run_id, step_id = %task.step, attempt = task.attempt, "step timed out");
                        return Event::StepTimedOut {
                            step: task.step.clone(),
                            index: task.index,
                            attempt: task.attempt,
                        };
                    }
                    Ok(r) => r,
                }
            }
        };
        match result {
            Ok(mut output) => {
                p.redactor.redact_value(&mut output);
                let size = serde_json::to_vec(&output).map_or(0, |v| v.len());
                if let Some(limit) = self.inner.config.max_output_bytes
                    && size > limit
                {
                    return Event::StepFailed {
                        step: task.step.clone(),
                        index: task.index,
                        attempt: task.attempt,
                        error: StepError::permanent(format!(
                            "the step's output is {size} bytes, over this runtime's limit of {limit} bytes; \
                             return less (e.g. pick fields with a transform) or store it elsewhere and pass a reference"
                        )),
                    };
                }
                Event::StepSucceeded {
                    step: task.step.clone(),
                    index: task.index,
                    attempt: task.attempt,
                    output,
                }
            }
            Err(mut error) => {
                error.message = p.redactor.redact_str(&error.message);
                if let Some(details) = error.details.as_mut() {
                    p.redactor.redact_value(details);
                }
                tracing::info!(run_id = %task.run_id, step_id = %task.step, attempt = task.attempt, class = error.class.name(), error = %error.message, "step attempt failed");
                Event::StepFailed {
                    step: task.step.clone(),
                    index: task.index,
                    attempt: task.attempt,
                    error,
                }
            }
        }
    }

    /// Takes tasks off the queue and processes them, `config.concurrency` at a time, until
    /// `shutdown` turns true, or (with `exit_when_done`) no run is left unfinished.
    pub async fn work(
        &self,
        mut shutdown: watch::Receiver<bool>,
        exit_when_done: bool,
    ) -> Result<(), RuntimeError> {
        let limit = self.inner.config.concurrency;
        let permits = Arc::new(Semaphore::new(limit));
        loop {
            if *shutdown.borrow() {
                break;
            }
            let free = permits
                .available_permits()
                .clamp(1, self.inner.config.receive_batch);
            let batch = tokio::select! {
                r = self.inner.queue.receive(free, Duration::from_millis(200)) => r?,
                _ = shutdown.changed() => break,
            };
            if batch.is_empty() {
                if exit_when_done
                    && permits.available_permits() == limit
                    && self.inner.store.unfinished_runs().await?.is_empty()
                {
                    break;
                }
                continue;
            }
            for delivery in batch {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                let rt = self.clone();
                tokio::spawn(async move {
                    rt.process(delivery).await;
                    drop(permit);
                });
            }
        }
        // Let the attempts underway finish and record their results.
        let _ = permits.acquire_many(limit as u32).await;
        Ok(())
    }

    /// Starts a run and works until it finishes; returns its final state.
    pub async fn run_to_completion(
        &self,
        plan: Arc<Plan>,
        inputs: Map<String, Value>,
    ) -> Result<RunState, RuntimeError> {
        let mut updates = self.subscribe();
        let run_id = self.start_run(plan, inputs).await?;
        self.drive_until_finished(&run_id, &mut updates).await
    }

    /// Works until `run_id` is finished (with `updates` subscribed before the run could change).
    pub async fn drive_until_finished(
        &self,
        run_id: &str,
        updates: &mut broadcast::Receiver<RunUpdate>,
    ) -> Result<RunState, RuntimeError> {
        let (stop, shutdown) = watch::channel(false);
        let worker = {
            let rt = self.clone();
            tokio::spawn(async move { rt.work(shutdown, false).await })
        };
        loop {
            let finished = match updates.recv().await {
                Ok(u) => u.run_id == run_id && u.status.is_terminal(),
                Err(broadcast::error::RecvError::Lagged(_)) => self
                    .inner
                    .store
                    .load_run(run_id)
                    .await?
                    .is_some_and(|r| r.state.status.is_terminal()),
                Err(broadcast::error::RecvError::Closed) => true,
            };
            if finished {
                break;
            }
        }
        let _ = stop.send(true);
        if let Ok(result) = worker.await {
            result?;
        }
        let stored = self
            .inner
            .store
            .load_run(run_id)
            .await?
            .ok_or_else(|| RuntimeError::RunNotFound(run_id.to_owned()))?;
        Ok(stored.state)
    }
}

fn unit_key(task: &Task) -> UnitKey {
    (
        task.run_id.clone(),
        task.step.clone(),
        task.index,
        task.attempt,
    )
}
