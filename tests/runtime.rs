//! The runtime through the library's public API on the embedded store: at-least-once delivery,
//! compare-and-set commits, timers and timeouts. HTTP side effects hit a local fake server that
//! counts them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use orchestra_core::engine::{self, Ctx, Disposition, Event, HistoryKind, RunState, RunStatus};
use orchestra_core::failure::ErrorClass;
use orchestra_core::ports::{Commit, Delivery, Durability, RunStore, StepQueue, StoreError};
use orchestra_core::runtime::RuntimeConfig;
use orchestra_core::runtime::local::{LocalRuntime, open_local};
use orchestra_core::store::SqliteStore;
use orchestra_core::workflow::Plan;
use serde_json::{Map, Value, json};
use wiremock::matchers::path_regex;
use wiremock::{Mock, MockServer, ResponseTemplate};

fn plan(doc: Value) -> Arc<Plan> {
    Arc::new(Plan::from_json(&doc.to_string(), "test").expect("valid workflow"))
}

async fn history_of(rt: &LocalRuntime, run_id: &str) -> Vec<HistoryKind> {
    rt.store()
        .history(run_id, 0, 100_000)
        .await
        .expect("history")
        .into_iter()
        .map(|e| e.kind)
        .collect()
}

async fn status_of(rt: &LocalRuntime, run_id: &str) -> RunStatus {
    rt.store()
        .load_run(run_id)
        .await
        .expect("load")
        .expect("run exists")
        .state
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_and_out_of_order_delivery_runs_each_side_effect_once() {
    let server = MockServer::start().await;
    Mock::given(path_regex(r"^/effect/.+$"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"ok": true})))
        .mount(&server)
        .await;
    let base = server.uri();
    let workflow = plan(json!({
        "id": "effects",
        "steps": [
            {"id": "one", "type": "http", "params": {"method": "POST", "url": format!("{base}/effect/one")}},
            {"id": "many", "type": "http", "for_each": [1, 2, 3], "max_concurrency": 2,
             "params": {"method": "POST", "url": format!("{base}/effect/many-{{{{ item }}}}")}},
            {"id": "two", "type": "http", "params": {"method": "POST", "url": format!("{base}/effect/two")}}
        ]
    }));
    let dir = tempfile::tempdir().expect("tempdir");
    let (rt, _lock) = open_local(dir.path(), RuntimeConfig::default()).expect("open");
    let run_id = rt.start_run(workflow, Map::new()).await.expect("start");

    // Play a hostile queue: every task is processed twice at once and sent again as a copy, and
    // every task ever seen is delivered once more, in reverse order, after the run has finished.
    let mut seen: Vec<Delivery> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while status_of(&rt, &run_id).await == RunStatus::Running {
        assert!(Instant::now() < deadline, "the run did not finish");
        let batch = rt
            .queue()
            .receive(8, Duration::from_millis(50))
            .await
            .expect("receive");
        for delivery in batch {
            if delivery.receive_count == 1 {
                rt.queue()
                    .send(vec![(delivery.task.clone(), Duration::ZERO)])
                    .await
                    .expect("send copy");
            }
            seen.push(delivery.clone());
            tokio::join!(rt.process(delivery.clone()), rt.process(delivery));
        }
    }
    assert_eq!(status_of(&rt, &run_id).await, RunStatus::Succeeded);
    let before = history_of(&rt, &run_id).await;
    assert!(
        seen.len() >= 10,
        "duplicates were delivered: {}",
        seen.len()
    );
    for delivery in seen.into_iter().rev() {
        rt.process(delivery).await;
    }
    assert_eq!(
        history_of(&rt, &run_id).await,
        before,
        "late duplicates changed the run"
    );

    let requests = server.received_requests().await.unwrap_or_default();
    let mut paths: Vec<String> = requests.iter().map(|r| r.url.path().to_owned()).collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "/effect/many-1",
            "/effect/many-2",
            "/effect/many-3",
            "/effect/one",
            "/effect/two"
        ],
        "each side effect exactly once"
    );
    let successes = before
        .iter()
        .filter(|k| matches!(k, HistoryKind::StepSucceeded { index: None, .. }))
        .count();
    assert_eq!(successes, 3);
}

#[tokio::test]
async fn a_stale_commit_is_rejected_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open_dir(dir.path()).expect("store");
    let workflow = plan(json!({
        "id": "w",
        "steps": [{"id": "a", "type": "log", "params": {"message": "hi"}}]
    }));
    let ctx = Ctx {
        now_ms: 1_000,
        random: 0.5,
    };
    let mut state = RunState::new("run-1", "w");
    let start = Event::Start { inputs: Map::new() };
    let tr = engine::handle(&workflow, &mut state, start, ctx);
    let create = Commit::of(&state, &tr.history, Durability::Sync);
    store
        .create_run(create.clone(), &workflow.workflow)
        .await
        .expect("create");
    let err = store
        .create_run(create, &workflow.workflow)
        .await
        .expect_err("ids are unique");
    assert!(matches!(err, StoreError::AlreadyExists(_)), "{err}");

    // Two workers read the same version and both try to claim the attempt.
    let mut first = state.clone();
    let mut second = state.clone();
    let claim = Event::StepStarted {
        step: "a".into(),
        index: None,
        attempt: 1,
        lease_until_ms: 60_000,
        steal: false,
    };
    let t1 = engine::handle(&workflow, &mut first, claim.clone(), ctx);
    let t2 = engine::handle(&workflow, &mut second, claim, ctx);
    store
        .commit(Commit::of(&first, &t1.history, Durability::Sync))
        .await
        .expect("first claim wins");
    let err = store
        .commit(Commit::of(&second, &t2.history, Durability::Sync))
        .await
        .expect_err("second claim loses");
    assert!(
        matches!(err, StoreError::Conflict { expected, found, .. } if found == Some(expected + 1)),
        "{err}"
    );
    let stored = store
        .load_run("run-1")
        .await
        .expect("load")
        .expect("exists");
    assert_eq!(stored.state.seq, first.seq);
    assert_eq!(stored.state.steps, first.steps);
    let history = store.history("run-1", 0, 100).await.expect("history");
    let claims = history
        .iter()
        .filter(|e| matches!(e.kind, HistoryKind::StepStarted { .. }))
        .count();
    assert_eq!(claims, 1);
    // The stored history replays to the stored state.
    let replayed = RunState::replay("run-1", "w", &history);
    assert_eq!(replayed.steps, stored.state.steps);
    assert_eq!(replayed.seq, stored.state.seq);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_of_many_runs_all_land() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open_dir(dir.path()).expect("store");
    let workflow = plan(json!({
        "id": "w",
        "steps": [{"id": "a", "type": "log", "params": {"message": "hi"}}]
    }));
    let mut tasks = Vec::new();
    for n in 0..100 {
        let store = store.clone();
        let workflow = workflow.clone();
        tasks.push(tokio::spawn(async move {
            let ctx = Ctx {
                now_ms: 1_000 + n,
                random: 0.5,
            };
            let mut state = RunState::new(format!("run-{n}"), "w");
            let start = Event::Start { inputs: Map::new() };
            let tr = engine::handle(&workflow, &mut state, start, ctx);
            let commit = Commit::of(&state, &tr.history, Durability::Sync);
            store.create_run(commit, &workflow.workflow).await
        }));
    }
    for task in tasks {
        task.await.expect("task").expect("commit");
    }
    assert_eq!(store.unfinished_runs().await.expect("list").len(), 100);
}

#[tokio::test]
async fn wait_steps_hold_the_run_for_their_duration() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (rt, _lock) = open_local(dir.path(), RuntimeConfig::default()).expect("open");
    let workflow = plan(json!({
        "id": "pause",
        "inputs": {"pause": {"type": "number", "default": 0.3}},
        "steps": [
            {"id": "hold", "type": "wait", "params": {"seconds": "{{ inputs.pause }}"}},
            {"id": "after", "type": "transform", "params": {"value": "{{ steps.hold.output.waited_until }}"}}
        ]
    }));
    let started = Instant::now();
    let state = rt
        .run_to_completion(workflow, Map::new())
        .await
        .expect("run");
    assert_eq!(state.status, RunStatus::Succeeded);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    let output = state.output.expect("output");
    assert!(
        output["after"].as_str().unwrap_or_default().ends_with('Z'),
        "{output}"
    );
}

#[tokio::test]
async fn attempts_over_their_timeout_fail_as_timeouts_and_are_retried() {
    let server = MockServer::start().await;
    Mock::given(path_regex("^/slow$"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(5)))
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (rt, _lock) = open_local(dir.path(), RuntimeConfig::default()).expect("open");
    let workflow = plan(json!({
        "id": "slow",
        "steps": [
            {"id": "call", "type": "http", "timeout_s": 0.2,
             "retry": {"max_attempts": 2, "initial_delay_s": 0, "retry_on": ["timeout"]},
             "params": {"url": format!("{}/slow", server.uri())}}
        ]
    }));
    let state = rt
        .run_to_completion(workflow, Map::new())
        .await
        .expect("run");
    assert_eq!(state.status, RunStatus::Failed);
    let history = history_of(&rt, &state.run_id).await;
    let failures: Vec<_> = history
        .iter()
        .filter_map(|k| match k {
            HistoryKind::StepFailed {
                error, disposition, ..
            } => Some((error.class, *disposition)),
            _ => None,
        })
        .collect();
    assert_eq!(
        failures,
        [
            (ErrorClass::Timeout, Disposition::Retry),
            (ErrorClass::Timeout, Disposition::Fail)
        ]
    );
    assert!(state.error.expect("error").message.contains("timeout_s"));
}

#[tokio::test]
async fn outputs_over_the_size_limit_fail_the_step_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = RuntimeConfig {
        max_output_bytes: Some(100),
        ..RuntimeConfig::default()
    };
    let (rt, _lock) = open_local(dir.path(), config).expect("open");
    let workflow = plan(json!({
        "id": "big",
        "steps": [{"id": "blob", "type": "transform", "params": {"value": "{{ 'x' * 500 }}"}}]
    }));
    let state = rt
        .run_to_completion(workflow, Map::new())
        .await
        .expect("run");
    assert_eq!(state.status, RunStatus::Failed);
    let message = state.error.expect("error").message;
    assert!(
        message.contains("502 bytes, over this runtime's limit of 100 bytes"),
        "{message}"
    );
}
