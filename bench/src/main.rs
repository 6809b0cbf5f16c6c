//! Throughput and dispatch latency of the embedded runtime, with durability on (every step result
//! is synced to disk before the next step is dispatched). A program, not a timed test:
//!
//! ```sh
//! cargo run --release -p orchestra-bench -- [--quick] [--out target/bench-results.json]
//! ```
//!
//! Latency is stamped with `Instant` as committed history arrives on the runtime's update channel:
//! dispatch latency is from a step's predecessor's `StepSucceeded` (committed and synced) to the
//! step's `StepStarted` (its claim committed); the step interval is from that predecessor's
//! `StepSucceeded` to the step's own.

use std::collections::HashMap;
use std::error::Error;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use orchestra_core::engine::{HistoryKind, RunStatus};
use orchestra_core::runtime::local::{LocalRuntime, open_local};
use orchestra_core::runtime::{RunUpdate, RuntimeConfig};
use orchestra_core::workflow::Plan;
use serde_json::{Map, Value, json};
use tokio::sync::{broadcast, watch};

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

/// A workflow and, for each step, the steps whose success makes it runnable.
struct Shape {
    doc: Value,
    preds: HashMap<String, Vec<String>>,
}

fn linear(n: usize) -> Shape {
    let mut steps = vec![json!({"id": "s0", "type": "transform", "params": {"value": {"n": 0}}})];
    let mut preds = HashMap::new();
    for i in 1..n {
        let prev = format!("s{}", i - 1);
        steps.push(json!({
            "id": format!("s{i}"),
            "type": "transform",
            "params": {"value": {"n": format!("{{{{ steps.{prev}.output.n + 1 }}}}")}}
        }));
        preds.insert(format!("s{i}"), vec![prev]);
    }
    Shape {
        doc: json!({"id": format!("linear-{n}"), "steps": steps}),
        preds,
    }
}

fn fanout(width: usize) -> Shape {
    let mut steps = vec![json!({"id": "root", "type": "transform", "params": {"value": {"x": 1}}})];
    let mut preds = HashMap::new();
    let children: Vec<String> = (0..width).map(|i| format!("c{i}")).collect();
    for child in &children {
        steps.push(json!({
            "id": child, "type": "transform", "depends_on": ["root"],
            "params": {"value": "{{ steps.root.output.x }}"}
        }));
        preds.insert(child.clone(), vec!["root".to_owned()]);
    }
    steps.push(json!({
        "id": "join", "type": "transform", "depends_on": children,
        "params": {"value": "joined"}
    }));
    preds.insert("join".to_owned(), children);
    Shape {
        doc: json!({"id": format!("fanout-{width}"), "steps": steps}),
        preds,
    }
}

/// When each (run, step) claim and success was seen.
#[derive(Default)]
struct Stamps {
    started: HashMap<(String, String), Instant>,
    succeeded: HashMap<(String, String), Instant>,
    successes: HashMap<(String, String), usize>,
    finished: HashMap<String, RunStatus>,
    lagged: u64,
}

/// Records updates until `runs` runs have finished.
async fn collect(mut updates: broadcast::Receiver<RunUpdate>, runs: usize) -> Stamps {
    let mut stamps = Stamps::default();
    while stamps.finished.len() < runs {
        match updates.recv().await {
            Ok(update) => {
                let now = Instant::now();
                for event in update.events.iter() {
                    match &event.kind {
                        HistoryKind::StepStarted {
                            step, index: None, ..
                        } => {
                            stamps
                                .started
                                .insert((update.run_id.clone(), step.clone()), now);
                        }
                        HistoryKind::StepSucceeded {
                            step, index: None, ..
                        } => {
                            let key = (update.run_id.clone(), step.clone());
                            stamps.succeeded.insert(key.clone(), now);
                            *stamps.successes.entry(key).or_default() += 1;
                        }
                        _ => {}
                    }
                }
                if update.status.is_terminal() {
                    stamps.finished.insert(update.run_id.clone(), update.status);
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => stamps.lagged += n,
            Err(broadcast::error::RecvError::Closed) => break,
        }
    }
    stamps
}

#[derive(Debug)]
struct Measured {
    name: &'static str,
    runs: usize,
    steps: usize,
    seconds: f64,
    dispatch_ms: Vec<f64>,
    interval_ms: Vec<f64>,
    lagged: u64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

impl Measured {
    fn steps_per_sec(&self) -> f64 {
        self.steps as f64 / self.seconds
    }

    fn json(&self) -> Value {
        let p = |v: &[f64], q| (percentile(v, q) * 1000.0).round() / 1000.0;
        json!({
            "runs": self.runs,
            "steps": self.steps,
            "seconds": (self.seconds * 1000.0).round() / 1000.0,
            "steps_per_sec": self.steps_per_sec().round(),
            "dispatch_p50_ms": p(&self.dispatch_ms, 50.0),
            "dispatch_p90_ms": p(&self.dispatch_ms, 90.0),
            "dispatch_p99_ms": p(&self.dispatch_ms, 99.0),
            "step_interval_p50_ms": p(&self.interval_ms, 50.0),
            "step_interval_p99_ms": p(&self.interval_ms, 99.0),
            "lagged_updates": self.lagged,
        })
    }
}

/// Runs `runs` runs of `shape` at once on a fresh state dir and measures them.
async fn scenario(name: &'static str, shape: &Shape, runs: usize) -> Result<Measured> {
    let dir = tempfile::tempdir()?;
    let (rt, _lock) = open_local(dir.path(), RuntimeConfig::default())?;
    let plan = Arc::new(Plan::from_json(&shape.doc.to_string(), name)?);
    let collector = tokio::spawn(collect(rt.subscribe(), runs));
    let (stop, shutdown) = watch::channel(false);
    let worker = {
        let rt = rt.clone();
        tokio::spawn(async move { rt.work(shutdown, false).await })
    };
    let started = Instant::now();
    let run_ids = start_all(&rt, &plan, runs).await?;
    let stamps = tokio::time::timeout(Duration::from_secs(600), collector).await??;
    let seconds = started.elapsed().as_secs_f64();
    let _ = stop.send(true);
    worker.await??;
    verify(name, &plan, &run_ids, &stamps)?;

    let mut dispatch_ms = Vec::new();
    let mut interval_ms = Vec::new();
    for run_id in &run_ids {
        for (step, preds) in &shape.preds {
            let key = (run_id.clone(), step.clone());
            let ready = preds
                .iter()
                .filter_map(|p| stamps.succeeded.get(&(run_id.clone(), p.clone())))
                .max();
            if let (Some(ready), Some(claimed), Some(done)) =
                (ready, stamps.started.get(&key), stamps.succeeded.get(&key))
            {
                dispatch_ms.push(claimed.saturating_duration_since(*ready).as_secs_f64() * 1e3);
                interval_ms.push(done.saturating_duration_since(*ready).as_secs_f64() * 1e3);
            }
        }
    }
    dispatch_ms.sort_by(f64::total_cmp);
    interval_ms.sort_by(f64::total_cmp);
    Ok(Measured {
        name,
        runs,
        steps: runs * plan.workflow.steps.len(),
        seconds,
        dispatch_ms,
        interval_ms,
        lagged: stamps.lagged,
    })
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

/// Every run succeeded and every step succeeded exactly once, or the figures mean nothing.
fn verify(name: &str, plan: &Plan, run_ids: &[String], stamps: &Stamps) -> Result<()> {
    for run_id in run_ids {
        let status = stamps.finished.get(run_id);
        if status != Some(&RunStatus::Succeeded) {
            return Err(format!("{name}: run {run_id} ended {status:?}").into());
        }
        for step in &plan.workflow.steps {
            let count = stamps
                .successes
                .get(&(run_id.clone(), step.id.clone()))
                .copied()
                .unwrap_or(0);
            if count != 1 && stamps.lagged == 0 {
                return Err(format!("{name}: step {} succeeded {count} times", step.id).into());
            }
        }
    }
    Ok(())
}

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

#[tokio::main]
async fn main() -> Result<()> {
    let args = args()?;
    let (linear_n, width, runs, run_len) = if args.quick {
        (100, 20, 10, 10)
    } else {
        (1000, 200, 100, 10)
    };
    // Warm-up: page cache, allocator, template environment.
    scenario("warmup", &linear(20), 5).await?;

    let results = vec![
        scenario("linear", &linear(linear_n), 1).await?,
        scenario("fanout", &fanout(width), 1).await?,
        scenario("concurrent", &linear(run_len), runs).await?,
    ];

    println!(
        "{:<11} {:>5} {:>6} {:>8} {:>10} {:>9} {:>9} {:>9} {:>12}",
        "scenario",
        "runs",
        "steps",
        "seconds",
        "steps/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "interval p50"
    );
    for m in &results {
        println!(
            "{:<11} {:>5} {:>6} {:>8.3} {:>10.0} {:>9.3} {:>9.3} {:>9.3} {:>12.3}",
            m.name,
            m.runs,
            m.steps,
            m.seconds,
            m.steps_per_sec(),
            percentile(&m.dispatch_ms, 50.0),
            percentile(&m.dispatch_ms, 90.0),
            percentile(&m.dispatch_ms, 99.0),
            percentile(&m.interval_ms, 50.0),
        );
    }
    let by_name = |n: &str| results.iter().find(|m| m.name == n);
    let concurrent_rate = by_name("concurrent").map_or(0.0, Measured::steps_per_sec);
    let linear_p50 = by_name("linear").map_or(f64::NAN, |m| percentile(&m.dispatch_ms, 50.0));
    let mut doc = json!({
        "quick": args.quick,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "durability": "each step result synced (SQLite WAL, synchronous=FULL) before the next dispatch",
        "targets": {
            "concurrent_steps_per_sec": {"target": 5000, "measured": concurrent_rate.round(), "met": concurrent_rate >= 5000.0},
            "linear_dispatch_p50_ms": {"target": 2.0, "measured": (linear_p50 * 1000.0).round() / 1000.0, "met": linear_p50 <= 2.0},
        },
    });
    for m in &results {
        doc[m.name] = m.json();
    }
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&doc)? + "\n")?;
    println!("\nwritten to {}", args.out.display());
    println!("{}", serde_json::to_string_pretty(&doc["targets"])?);
    Ok(())
}
