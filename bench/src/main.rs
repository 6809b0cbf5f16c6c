//! Throughput and dispatch latency of the embedded runtime, with durability on (every step result
//! is synced to disk before the next step is dispatched). A program, not a timed test:
//!
//! ```sh
//! cargo run --release -p orchestra-bench -- [--quick] [--out target/bench-results.json]
//! ```
//!
//! Scenarios: (a) one run of a long linear chain of `transform` steps, (b) one run of a fan-out to
//! `width` children and a fan-in join, (c) many short linear runs started at once on one runtime.
//!
//! History timestamps are only millisecond-precise, so latency is measured with `Instant`: a
//! dedicated task subscribes to the runtime's update channel before any run starts and stamps each
//! committed update on receipt. A step's dispatch latency runs from its last predecessor's
//! `StepSucceeded` (committed and synced) to the step's own `StepStarted` (its claim committed).
//! Correctness is checked against the store's durable history, not the broadcast, which can lag.

use std::collections::{HashMap, HashSet};
use std::error::Error;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use orchestra_core::engine::{HistoryKind, RunStatus};
use orchestra_core::ports::RunStore;
use orchestra_core::runtime::local::{LocalRuntime, open_local};
use orchestra_core::runtime::{RunUpdate, RuntimeConfig};
use orchestra_core::workflow::Plan;
use serde_json::{Map, Value, json};
use tokio::sync::{broadcast, watch};

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

/// A scenario that has not finished by then is reported as an error, so the program always stops.
const DEADLINE: Duration = Duration::from_secs(600);
/// After the update channel lagged, terminal updates may have been dropped: when the channel has
/// been quiet this long, the store is asked whether every run has finished.
const QUIET: Duration = Duration::from_millis(100);
/// History events read from the store per page when verifying.
const HISTORY_PAGE: usize = 1000;

const TARGET_CONCURRENT_STEPS_PER_SEC: f64 = 5000.0;
const TARGET_LINEAR_P50_MS: f64 = 2.0;

// ---------------------------------------------------------------------------------------------
// Workflows

/// A workflow and, for each step that has predecessors, the steps whose success makes it runnable.
struct Shape {
    doc: Value,
    preds: Vec<(String, Vec<String>)>,
}

impl Shape {
    fn plan(&self, name: &str) -> Result<Arc<Plan>> {
        Ok(Arc::new(Plan::from_json(&self.doc.to_string(), name)?))
    }
}

/// `n` transform steps, each building a small object from the previous step's output, so every
/// step renders a template over its predecessor's committed result.
fn linear(n: usize) -> Shape {
    let mut steps = vec![json!({"id": "s0", "type": "transform", "params": {"value": {"n": 0}}})];
    let mut preds = Vec::with_capacity(n);
    for i in 1..n {
        let prev = format!("s{}", i - 1);
        steps.push(json!({
            "id": format!("s{i}"),
            "type": "transform",
            "params": {"value": {"n": format!("{{{{ steps.{prev}.output.n + 1 }}}}")}}
        }));
        preds.push((format!("s{i}"), vec![prev]));
    }
    Shape {
        doc: json!({"id": format!("linear-{n}"), "steps": steps}),
        preds,
    }
}

/// A root, `width` children that each depend on it, and a join that depends on every child.
fn fanout(width: usize) -> Shape {
    let mut steps = vec![json!({"id": "root", "type": "transform", "params": {"value": {"x": 1}}})];
    let mut preds = Vec::with_capacity(width + 1);
    let children: Vec<String> = (0..width).map(|i| format!("c{i}")).collect();
    for child in &children {
        steps.push(json!({
            "id": child,
            "type": "transform",
            "depends_on": ["root"],
            "params": {"value": {"x": "{{ steps.root.output.x }}"}}
        }));
        preds.push((child.clone(), vec!["root".to_owned()]));
    }
    steps.push(json!({
        "id": "join",
        "type": "transform",
        "depends_on": children,
        "params": {"value": "joined"}
    }));
    preds.push(("join".to_owned(), children));
    Shape {
        doc: json!({"id": format!("fanout-{width}"), "steps": steps}),
        preds,
    }
}

// ---------------------------------------------------------------------------------------------
// Collecting updates

/// One update, stamped the moment it was received.
struct Stamped {
    at: Instant,
    update: RunUpdate,
}

/// Everything the collector saw of one scenario.
struct Received {
    updates: Vec<Stamped>,
    /// Updates dropped because the collector fell behind the broadcast channel.
    lagged: u64,
    /// When the last run finished (or, after a lag, when the store confirmed it).
    end: Instant,
}

/// Receives updates until `runs` runs have finished. The loop only stamps and stores, so it keeps
/// up with the channel (capacity 4096); the analysis happens after the runs are done.
async fn collect(
    rt: LocalRuntime,
    mut updates: broadcast::Receiver<RunUpdate>,
    runs: usize,
) -> Result<Received> {
    let mut received = Vec::new();
    let mut finished = HashSet::new();
    let mut lagged = 0;
    let mut end = Instant::now();
    while finished.len() < runs {
        match tokio::time::timeout(QUIET, updates.recv()).await {
            Ok(Ok(update)) => {
                let at = Instant::now();
                if update.status.is_terminal() {
                    finished.insert(update.run_id.clone());
                    end = at;
                }
                received.push(Stamped { at, update });
            }
            Ok(Err(broadcast::error::RecvError::Lagged(n))) => lagged += n,
            Ok(Err(broadcast::error::RecvError::Closed)) => {
                return Err("the runtime's update channel closed".into());
            }
            Err(_quiet) if lagged > 0 && all_finished(&rt, runs).await? => {
                end = Instant::now();
                break;
            }
            Err(_quiet) => {}
        }
    }
    Ok(Received {
        updates: received,
        lagged,
        end,
    })
}

/// Whether the store holds `runs` runs and none is unfinished (each scenario has its own store).
async fn all_finished(rt: &LocalRuntime, runs: usize) -> Result<bool> {
    let store = rt.store();
    Ok(store.unfinished_runs().await?.is_empty()
        && store.list_runs(None, runs).await?.len() == runs)
}

// ---------------------------------------------------------------------------------------------
// Running a scenario

#[derive(Debug)]
struct Measured {
    name: &'static str,
    runs: usize,
    steps: usize,
    seconds: f64,
    /// Sorted dispatch latencies, in milliseconds.
    latencies_ms: Vec<f64>,
    lagged: u64,
}

/// Runs `runs` runs of `shape` at once on a fresh state dir and measures them.
async fn scenario(name: &'static str, shape: &Shape, runs: usize) -> Result<Measured> {
    eprintln!("running {name}: {runs} run(s) of {}", shape.doc["id"]);
    let dir = tempfile::tempdir()?;
    let (rt, _lock) = open_local(dir.path(), RuntimeConfig::default())?;
    let plan = shape.plan(name)?;
    // Subscribed before any run starts, so every committed event is seen.
    let collector = tokio::spawn(collect(rt.clone(), rt.subscribe(), runs));
    let (stop, shutdown) = watch::channel(false);
    let worker = {
        let rt = rt.clone();
        tokio::spawn(async move { rt.work(shutdown, false).await })
    };

    let started = Instant::now();
    let outcome = start_and_wait(&rt, &plan, runs, collector).await;
    // Stop the worker whatever happened, so a failed scenario does not leave it running.
    let _ = stop.send(true);
    worker.await??;
    let (run_ids, received) = outcome?;

    let steps = verify(&rt, name, &plan, &run_ids).await?;
    let latencies_ms = dispatch_latencies(shape, &run_ids, &received)?;
    Ok(Measured {
        name,
        runs,
        steps,
        seconds: received
            .end
            .saturating_duration_since(started)
            .as_secs_f64(),
        latencies_ms,
        lagged: received.lagged,
    })
}

/// Starts the runs and waits (at most [`DEADLINE`]) until the collector has seen them all finish.
async fn start_and_wait(
    rt: &LocalRuntime,
    plan: &Arc<Plan>,
    runs: usize,
    collector: tokio::task::JoinHandle<Result<Received>>,
) -> Result<(Vec<String>, Received)> {
    let run_ids = start_all(rt, plan, runs).await?;
    let received = tokio::time::timeout(DEADLINE, collector)
        .await
        .map_err(|_| format!("runs not finished after {DEADLINE:?}"))???;
    Ok((run_ids, received))
}

/// Starts the runs concurrently, so their first commits are grouped like their later ones.
async fn start_all(rt: &LocalRuntime, plan: &Arc<Plan>, runs: usize) -> Result<Vec<String>> {
    let handles: Vec<_> = (0..runs)
        .map(|_| {
            let rt = rt.clone();
            let plan = plan.clone();
            tokio::spawn(async move { rt.start_run(plan, Map::new()).await })
        })
        .collect();
    let mut ids = Vec::with_capacity(runs);
    for handle in handles {
        ids.push(handle.await??);
    }
    Ok(ids)
}

// ---------------------------------------------------------------------------------------------
// Verifying and measuring

/// Checks, against the store's durable history, that every run succeeded and every step succeeded
/// exactly once; otherwise the figures mean nothing. Returns the number of steps executed.
async fn verify(rt: &LocalRuntime, name: &str, plan: &Plan, run_ids: &[String]) -> Result<usize> {
    let mut executed = 0;
    for run_id in run_ids {
        let run = rt
            .store()
            .load_run(run_id)
            .await?
            .ok_or_else(|| format!("{name}: run {run_id} is not in the store"))?;
        if run.state.status != RunStatus::Succeeded {
            return Err(format!("{name}: run {run_id} ended {}", run.state.status.name()).into());
        }
        let successes = successes(rt, run_id).await?;
        for step in &plan.workflow.steps {
            let count = successes.get(step.id.as_str()).copied().unwrap_or(0);
            if count != 1 {
                return Err(format!(
                    "{name}: step {} of run {run_id} succeeded {count} times",
                    step.id
                )
                .into());
            }
        }
        executed += successes.values().sum::<usize>();
    }
    Ok(executed)
}

/// How many times each step of a run succeeded (whole steps only: `index` is for for_each items).
async fn successes(rt: &LocalRuntime, run_id: &str) -> Result<HashMap<String, usize>> {
    let mut counts = HashMap::new();
    let mut seq = 0;
    loop {
        let page = rt.store().history(run_id, seq, HISTORY_PAGE).await?;
        for event in &page {
            if let HistoryKind::StepSucceeded {
                step, index: None, ..
            } = &event.kind
            {
                *counts.entry(step.clone()).or_default() += 1;
            }
        }
        if page.len() < HISTORY_PAGE {
            return Ok(counts);
        }
        seq += page.len() as u64;
    }
}

type Key<'a> = (&'a str, &'a str);

/// When each (run, step) was first claimed and when it succeeded, as received.
fn stamps(received: &Received) -> (HashMap<Key<'_>, Instant>, HashMap<Key<'_>, Instant>) {
    let mut started = HashMap::new();
    let mut succeeded = HashMap::new();
    for Stamped { at, update } in &received.updates {
        for event in update.events.iter() {
            match &event.kind {
                HistoryKind::StepStarted {
                    step, index: None, ..
                } => {
                    started
                        .entry((update.run_id.as_str(), step.as_str()))
                        .or_insert(*at);
                }
                HistoryKind::StepSucceeded {
                    step, index: None, ..
                } => {
                    succeeded.insert((update.run_id.as_str(), step.as_str()), *at);
                }
                _ => {}
            }
        }
    }
    (started, succeeded)
}

/// Sorted dispatch latencies (ms) of every step with predecessors: from the last predecessor's
/// success to the step's claim. Without a lag every sample must be there; after one, missing
/// samples are skipped (and the lag is reported).
fn dispatch_latencies(shape: &Shape, run_ids: &[String], received: &Received) -> Result<Vec<f64>> {
    let (started, succeeded) = stamps(received);
    let mut latencies = Vec::with_capacity(run_ids.len() * shape.preds.len());
    for run_id in run_ids {
        for (step, preds) in &shape.preds {
            let ready: Option<Vec<Instant>> = preds
                .iter()
                .map(|p| succeeded.get(&(run_id.as_str(), p.as_str())).copied())
                .collect();
            let ready = ready.and_then(|r| r.into_iter().max());
            let claimed = started.get(&(run_id.as_str(), step.as_str()));
            match (ready, claimed) {
                (Some(ready), Some(claimed)) => {
                    latencies.push(claimed.saturating_duration_since(ready).as_secs_f64() * 1000.0)
                }
                _ if received.lagged > 0 => {}
                _ => {
                    return Err(format!("no stamps for step {step} of run {run_id}").into());
                }
            }
        }
    }
    latencies.sort_by(f64::total_cmp);
    Ok(latencies)
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Rounds to `places` decimals, for the JSON document.
fn round(x: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (x * scale).round() / scale
}

impl Measured {
    fn steps_per_sec(&self) -> f64 {
        self.steps as f64 / self.seconds
    }

    fn p(&self, q: f64) -> f64 {
        percentile(&self.latencies_ms, q)
    }

    fn json(&self) -> Value {
        json!({
            "runs": self.runs,
            "steps": self.steps,
            "seconds": round(self.seconds, 6),
            "steps_per_sec": round(self.steps_per_sec(), 1),
            "p50_ms": round(self.p(50.0), 3),
            "p90_ms": round(self.p(90.0), 3),
            "p99_ms": round(self.p(99.0), 3),
            "samples": self.latencies_ms.len(),
            "lagged": self.lagged,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Reporting

fn print_table(results: &[Measured]) {
    println!(
        "{:<11} {:>5} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>6}",
        "scenario",
        "runs",
        "steps",
        "seconds",
        "steps/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "samples",
        "lagged"
    );
    for m in results {
        println!(
            "{:<11} {:>5} {:>6} {:>9.4} {:>9.0} {:>9.3} {:>9.3} {:>9.3} {:>7} {:>6}",
            m.name,
            m.runs,
            m.steps,
            m.seconds,
            m.steps_per_sec(),
            m.p(50.0),
            m.p(90.0),
            m.p(99.0),
            m.latencies_ms.len(),
            m.lagged
        );
    }
    if results.iter().any(|m| m.lagged > 0) {
        println!("warning: the collector lagged: some latency samples are missing and stamps late");
    }
}

/// The targets with what was measured against them.
fn targets(results: &[Measured]) -> Value {
    let by_name = |n: &str| results.iter().find(|m| m.name == n);
    let rate = by_name("concurrent").map_or(0.0, Measured::steps_per_sec);
    let p50 = by_name("linear").map_or(f64::NAN, |m| m.p(50.0));
    json!({
        "concurrent_steps_per_sec": {
            "target": format!(">= {TARGET_CONCURRENT_STEPS_PER_SEC}"),
            "measured": round(rate, 1),
            "met": rate >= TARGET_CONCURRENT_STEPS_PER_SEC,
        },
        "linear_p50_ms": {
            "target": format!("<= {TARGET_LINEAR_P50_MS}"),
            "measured": round(p50, 3),
            "met": p50 <= TARGET_LINEAR_P50_MS,
        },
    })
}

/// The JSON document: one entry per scenario, beside the machine and the targets.
fn report(results: &[Measured], quick: bool) -> Value {
    let mut doc = json!({
        "quick": quick,
        "machine": {
            "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "os": std::env::consts::OS,
            "arch": std::env::consts::ARCH,
        },
        "durability": "each step result synced (SQLite WAL, synchronous=FULL) before the next dispatch",
        "targets": targets(results),
    });
    for m in results {
        doc[m.name] = m.json();
    }
    doc
}

// ---------------------------------------------------------------------------------------------
// Entry point

struct Args {
    quick: bool,
    out: PathBuf,
}

fn args() -> Result<Args> {
    let mut args = Args {
        quick: false,
        out: PathBuf::from("target/bench-results.json"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => args.quick = true,
            "--out" => args.out = it.next().ok_or("--out needs a file")?.into(),
            other => {
                return Err(format!("unknown argument {other}; use --quick, --out FILE").into());
            }
        }
    }
    Ok(args)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let args = args()?;
    let (linear_n, width, runs, run_len) = if args.quick {
        (100, 20, 10, 10)
    } else {
        (1000, 200, 100, 10)
    };
    // Warm-up, not reported: page cache, allocator, the template environment.
    scenario("warmup", &linear(20), 5).await?;

    let results = vec![
        scenario("linear", &linear(linear_n), 1).await?,
        scenario("fanout", &fanout(width), 1).await?,
        scenario("concurrent", &linear(run_len), runs).await?,
    ];

    let doc = report(&results, args.quick);
    print_table(&results);
    println!("\ncores: {}", doc["machine"]["cores"]);
    for (name, target) in doc["targets"].as_object().into_iter().flatten() {
        let met = if target["met"] == true {
            "met"
        } else {
            "MISSED"
        };
        println!(
            "target {name} {}: measured {} ({met})",
            target["target"].as_str().unwrap_or_default(),
            target["measured"]
        );
    }
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&doc)? + "\n")?;
    println!("written to {}", args.out.display());
    Ok(())
}
