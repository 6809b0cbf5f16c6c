//! `orchestra`: validate workflows and run them on the embedded runtime.

mod commands;
mod progress;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "orchestra",
    version,
    about = "Run declarative AI and work-tool workflows, durably"
)]
struct Cli {
    /// Where runs are stored (an embedded SQLite file is kept there).
    #[arg(
        long,
        global = true,
        env = "ORCHESTRA_STATE_DIR",
        default_value = ".orchestra"
    )]
    state_dir: PathBuf,
    /// Where `run ID` looks for workflows.
    #[arg(
        long,
        global = true,
        env = "ORCHESTRA_WORKFLOWS_DIR",
        default_value = "workflows"
    )]
    workflows_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check workflow files without running them; exits non-zero on any error.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Run a workflow (a file, or an id in the workflows dir) to completion.
    Run {
        workflow: String,
        /// An input as NAME=VALUE (repeatable); typed inputs parse VALUE as JSON.
        #[arg(long = "input", short = 'i', value_name = "NAME=VALUE")]
        inputs: Vec<String>,
        /// A JSON object of inputs; --input values override it.
        #[arg(long, value_name = "FILE")]
        inputs_file: Option<PathBuf>,
    },
    /// List and inspect runs.
    Runs {
        #[command(subcommand)]
        command: RunsCommand,
    },
    /// Continue a failed or cancelled run from the step that stopped it, keeping earlier outputs.
    Resume { run_id: String },
    /// Cancel a run.
    Cancel {
        run_id: String,
        #[arg(long, default_value = "cancelled from the command line")]
        reason: String,
    },
    /// Finish unfinished runs (e.g. after a crash) and keep draining queued work.
    Worker {
        /// Stop once no run is left unfinished.
        #[arg(long)]
        exit_when_done: bool,
    },
    /// Serve queued work; the HTTP API arrives with the API work, until then this is `worker`.
    Serve {
        #[arg(long)]
        exit_when_done: bool,
    },
    /// Print the workflow JSON Schema (what workflows/schema.json holds).
    Schema,
}

#[derive(Subcommand)]
enum RunsCommand {
    /// Runs, newest first.
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// A run's status, steps and timeline.
    Show {
        run_id: String,
        /// Print the state and history as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ORCHESTRA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(70);
        }
    };
    let ctx = commands::Context {
        state_dir: cli.state_dir,
        workflows_dir: cli.workflows_dir,
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Validate { files } => commands::validate(&files),
            Command::Run {
                workflow,
                inputs,
                inputs_file,
            } => commands::run(&ctx, &workflow, &inputs, inputs_file.as_deref()).await,
            Command::Runs {
                command: RunsCommand::List { status, limit },
            } => commands::list(&ctx, status.as_deref(), limit).await,
            Command::Runs {
                command: RunsCommand::Show { run_id, json },
            } => commands::show(&ctx, &run_id, json).await,
            Command::Resume { run_id } => commands::resume(&ctx, &run_id).await,
            Command::Cancel { run_id, reason } => commands::cancel(&ctx, &run_id, &reason).await,
            Command::Worker { exit_when_done } | Command::Serve { exit_when_done } => {
                commands::worker(&ctx, exit_when_done).await
            }
            Command::Schema => {
                print!("{}", orchestra_core::schema::workflow_schema_json());
                Ok(ExitCode::SUCCESS)
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
