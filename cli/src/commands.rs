//! The subcommands. Errors that a user can fix print a specific message and exit 2; a run's
//! outcome sets the exit code (0 succeeded, 1 failed, 3 cancelled, 130 interrupted).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use orchestra_core::engine::{HistoryKind, RunState, RunStatus};
use orchestra_core::ports::RunStore;
use orchestra_core::queue::MemoryQueue;
use orchestra_core::runtime::local::{open_local, open_store};
use orchestra_core::runtime::{Runtime, RuntimeConfig, RuntimeError, coerce_input, now_ms};
use orchestra_core::secrets::EnvSecrets;
use orchestra_core::steps::ActionRegistry;
use orchestra_core::workflow::{LoadError, Plan};
use serde_json::{Map, Value, json};
use tokio::sync::watch;

use crate::progress::{Printer, summary};

pub struct Context {
    pub state_dir: PathBuf,
    pub workflows_dir: PathBuf,
}

const EXIT_INVALID: u8 = 2;

pub fn validate(files: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let mut failed = 0;
    for file in files {
        if is_json_schema(file) {
            println!(
                "{}: skipped (a JSON Schema, not a workflow)",
                file.display()
            );
            continue;
        }
        match Plan::load_file(file) {
            Ok(plan) => println!(
                "{}: ok ({} steps)",
                file.display(),
                plan.workflow.steps.len()
            ),
            Err(e) => {
                failed += 1;
                eprintln!("{e}");
            }
        }
    }
    if failed > 0 {
        eprintln!("{failed} of {} workflow files are invalid", files.len());
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// `workflows/schema.json` sits beside the workflows, so `validate workflows/*.json` meets it.
fn is_json_schema(file: &Path) -> bool {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        .and_then(|doc| {
            doc.get("$schema")?
                .as_str()
                .map(|s| s.contains("json-schema.org"))
        })
        .unwrap_or(false)
}

fn load(ctx: &Context, workflow: &str) -> Result<Plan, LoadError> {
    let path = Path::new(workflow);
    if path.extension().is_some_and(|e| e == "json") || path.is_file() {
        Plan::load_file(path)
    } else {
        Plan::load_by_id(&ctx.workflows_dir, workflow)
    }
}

fn gather_inputs(
    plan: &Plan,
    inputs: &[String],
    file: Option<&Path>,
) -> anyhow::Result<Map<String, Value>> {
    let mut given = Map::new();
    if let Some(file) = file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read inputs file {}", file.display()))?;
        match serde_json::from_str::<Value>(&text)
            .with_context(|| format!("inputs file {} is not JSON", file.display()))?
        {
            Value::Object(map) => given = map,
            _ => bail!("inputs file {} must hold a JSON object", file.display()),
        }
    }
    for pair in inputs {
        let Some((name, value)) = pair.split_once('=') else {
            bail!("--input {pair}: expected NAME=VALUE");
        };
        given.insert(name.to_owned(), coerce_input(&plan.workflow, name, value));
    }
    Ok(given)
}

fn exit_for(status: RunStatus) -> ExitCode {
    match status {
        RunStatus::Succeeded => ExitCode::SUCCESS,
        RunStatus::Cancelled => ExitCode::from(3),
        _ => ExitCode::from(1),
    }
}

fn print_result(state: &RunState) {
    let result = json!({
        "run_id": state.run_id,
        "status": state.status,
        "output": state.output,
        "error": state.error,
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&result).unwrap_or_default()
    );
}

async fn shutdown_signal() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

pub async fn run(
    ctx: &Context,
    workflow: &str,
    inputs: &[String],
    inputs_file: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let plan = match load(ctx, workflow) {
        Ok(plan) => Arc::new(plan),
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(EXIT_INVALID));
        }
    };
    let given = gather_inputs(&plan, inputs, inputs_file)?;
    let (rt, _lock) = open_local(&ctx.state_dir, RuntimeConfig::default())?;
    let mut updates = rt.subscribe();
    let progress = rt.subscribe();
    let start = now_ms();
    let run_id = match rt.start_run(plan.clone(), given).await {
        Ok(id) => id,
        Err(RuntimeError::Inputs(e)) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_INVALID));
        }
        Err(e) => return Err(e.into()),
    };
    eprintln!("run {run_id} of workflow '{}'", plan.workflow.id);
    let printer = tokio::spawn({
        let run_id = run_id.clone();
        async move { Printer::stderr().follow(&run_id, start, progress).await }
    });
    let state = tokio::select! {
        state = rt.drive_until_finished(&run_id, &mut updates) => state?,
        _ = shutdown_signal() => {
            eprintln!("interrupted: run {run_id} is unfinished; `orchestra worker` will finish it");
            return Ok(ExitCode::from(130));
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), printer).await;
    eprintln!("{}", summary(&state));
    print_result(&state);
    Ok(exit_for(state.status))
}

pub async fn resume(ctx: &Context, run_id: &str) -> anyhow::Result<ExitCode> {
    let (rt, _lock) = open_local(&ctx.state_dir, RuntimeConfig::default())?;
    let mut updates = rt.subscribe();
    let progress = rt.subscribe();
    let start = now_ms();
    if let Err(e) = rt.resume(run_id).await {
        eprintln!("error: {e}");
        if matches!(
            e,
            RuntimeError::NotResumable {
                status: "running",
                ..
            }
        ) {
            eprintln!("  = help: a running run is finished by `orchestra worker`");
        }
        return Ok(ExitCode::from(EXIT_INVALID));
    }
    let printer = tokio::spawn({
        let run_id = run_id.to_owned();
        async move { Printer::stderr().follow(&run_id, start, progress).await }
    });
    let state = rt.drive_until_finished(run_id, &mut updates).await?;
    let _ = tokio::time::timeout(Duration::from_secs(1), printer).await;
    eprintln!("{}", summary(&state));
    print_result(&state);
    Ok(exit_for(state.status))
}

pub async fn cancel(ctx: &Context, run_id: &str, reason: &str) -> anyhow::Result<ExitCode> {
    // Cancelling only writes to the store, so it works while a worker holds the state dir.
    let store = open_store(&ctx.state_dir)?;
    let rt = Runtime::new(
        store,
        MemoryQueue::new(Duration::from_secs(60)),
        EnvSecrets::default(),
        ActionRegistry::empty(),
        RuntimeConfig::default(),
    );
    match rt.cancel(run_id, reason).await {
        Ok(()) => {
            println!("run {run_id} cancelled");
            Ok(ExitCode::SUCCESS)
        }
        Err(e @ (RuntimeError::RunNotFound(_) | RuntimeError::AlreadyFinished { .. })) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(EXIT_INVALID))
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn worker(ctx: &Context, exit_when_done: bool) -> anyhow::Result<ExitCode> {
    let (rt, _lock) = open_local(&ctx.state_dir, RuntimeConfig::default())?;
    let recovered = rt.recover().await?;
    eprintln!(
        "worker on {}: {recovered} unfinished step tasks recovered",
        ctx.state_dir.display()
    );
    let (stop, shutdown) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    rt.work(shutdown, exit_when_done).await?;
    eprintln!("worker stopped");
    Ok(ExitCode::SUCCESS)
}

fn when(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

pub async fn list(ctx: &Context, status: Option<&str>, limit: usize) -> anyhow::Result<ExitCode> {
    let status = match status {
        None => None,
        Some(s) => Some(
            serde_json::from_value::<RunStatus>(Value::String(s.to_owned())).with_context(
                || {
                    format!(
                        "unknown status '{s}': use pending, running, succeeded, failed or cancelled"
                    )
                },
            )?,
        ),
    };
    let store = open_store(&ctx.state_dir)?;
    let runs = store.list_runs(status, limit).await?;
    if runs.is_empty() {
        eprintln!("no runs in {}", ctx.state_dir.display());
    }
    for r in runs {
        println!(
            "{}  {:<10} {:<24} {}",
            r.run_id,
            r.status.name(),
            r.workflow_id,
            when(r.created_at_ms)
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn show(ctx: &Context, run_id: &str, as_json: bool) -> anyhow::Result<ExitCode> {
    let store = open_store(&ctx.state_dir)?;
    let Some(run) = store.load_run(run_id).await? else {
        eprintln!(
            "error: no run with id '{run_id}' in {}",
            ctx.state_dir.display()
        );
        return Ok(ExitCode::from(EXIT_INVALID));
    };
    let history = store.history(run_id, 0, usize::MAX >> 1).await?;
    let state = run.state;
    if as_json {
        let doc = json!({
            "run": state,
            "steps": state.steps,
            "history": history,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("run       {}", state.run_id);
    println!("workflow  {}", state.workflow_id);
    println!("status    {}", state.status.name());
    println!("started   {}", when(state.created_at_ms));
    println!(
        "duration  {:.3}s",
        state.updated_at_ms.saturating_sub(state.created_at_ms) as f64 / 1000.0
    );
    if let Some(error) = &state.error {
        println!("error     {}", error.message);
    }
    println!("\nsteps:");
    for step in &run.workflow.steps {
        let st = state.step(&step.id);
        let status = st
            .map(|s| serde_json::to_value(s.status).unwrap_or_default())
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| "not run".into());
        let attempts = st
            .map(|s| s.units.iter().map(|u| u.attempt).max().unwrap_or(0))
            .unwrap_or(0);
        let took = st
            .filter(|s| s.finished_at_ms > 0)
            .map(|s| format!("{} ms", s.finished_at_ms.saturating_sub(s.started_at_ms)))
            .unwrap_or_default();
        println!(
            "  {:<24} {:<10} attempts {:<3} {}",
            step.id, status, attempts, took
        );
    }
    println!("\ntimeline:");
    let printer = Printer::stderr();
    for event in &history {
        match printer.line(event, state.created_at_ms) {
            Some(line) => println!("  {line}"),
            None => {
                if let HistoryKind::StepScheduled { step, attempt, .. } = &event.kind {
                    println!(
                        "  {:>5}.{:03}s scheduled {step} attempt {attempt}",
                        event.at_ms.saturating_sub(state.created_at_ms) / 1000,
                        event.at_ms.saturating_sub(state.created_at_ms) % 1000
                    );
                }
            }
        }
    }
    if let Some(output) = &state.output {
        println!("\noutput:\n{}", serde_json::to_string_pretty(output)?);
    }
    Ok(ExitCode::SUCCESS)
}
