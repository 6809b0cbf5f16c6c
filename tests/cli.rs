//! Black-box tests of the `orchestra` binary: what the README promises a user. Every HTTP server
//! here is a local fake on 127.0.0.1 started by the test.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::process::Command;
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the cli crate sits in the repo")
        .to_owned()
}

fn orchestra(state_dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_orchestra"));
    cmd.current_dir(repo_root())
        .env("NO_COLOR", "1")
        .env_remove("ORCHESTRA_STATE_DIR")
        .arg("--state-dir")
        .arg(state_dir);
    cmd
}

async fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().await.expect("orchestra starts");
    assert!(
        out.status.success(),
        "orchestra failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

async fn show_json(state_dir: &Path, run_id: &str) -> Value {
    let out = run_ok(orchestra(state_dir).args(["runs", "show", run_id, "--json"])).await;
    stdout_json(&out)
}

fn events<'a>(doc: &'a Value, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    doc["history"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(move |e| e["type"] == kind)
}

fn write_workflow(dir: &Path, name: &str, doc: Value) -> PathBuf {
    let file = dir.join(name);
    std::fs::write(&file, serde_json::to_vec_pretty(&doc).expect("json")).expect("write workflow");
    file
}

async fn hits(server: &MockServer, url_path: &str) -> usize {
    server
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .filter(|r| r.url.path() == url_path)
        .count()
}

#[tokio::test]
async fn hello_example_runs_without_credentials() {
    let state = tempfile::tempdir().expect("tempdir");
    let out = run_ok(orchestra(state.path()).args(["run", "hello"])).await;
    let result = stdout_json(&out);
    assert_eq!(result["status"], "succeeded");
    assert_eq!(
        result["output"]["greetings"],
        json!(["Hello, Ada (#1)", "Hello, Grace (#2)", "Hello, Linus (#3)"])
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("succeeded greet[2]"),
        "progress lines:\n{stderr}"
    );
}

#[tokio::test]
async fn http_fanout_example_succeeds_and_records_retries_with_backoff() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/items"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"items": [{"id": 1}, {"id": 2}, {"id": 3}]})),
        )
        .mount(&server)
        .await;
    // Item 2 fails twice with a retryable 503 before it answers.
    Mock::given(method("GET"))
        .and(path("/items/2"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(2)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path_regex(r"^/items/\d+$"))
        .respond_with(|req: &Request| {
            let id: u64 = req
                .url
                .path()
                .rsplit('/')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            ResponseTemplate::new(200)
                .set_body_json(json!({"name": format!("item-{id}"), "price": id * 10}))
        })
        .with_priority(5)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/reports"))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({"ok": true})))
        .mount(&server)
        .await;

    let state = tempfile::tempdir().expect("tempdir");
    let out = run_ok(orchestra(state.path()).args([
        "run",
        "workflows/http_fanout.json",
        "--input",
        &format!("base_url={}", server.uri()),
    ]))
    .await;
    let result = stdout_json(&out);
    assert_eq!(result["status"], "succeeded", "{result}");
    assert_eq!(result["output"]["total"], 60);
    assert_eq!(
        result["output"]["names"],
        json!(["item-1", "item-2", "item-3"])
    );
    assert_eq!(result["output"]["report_status"], 201);

    let reports = server.received_requests().await.unwrap_or_default();
    let posted: Vec<Value> = reports
        .iter()
        .filter(|r| r.url.path() == "/reports")
        .map(|r| serde_json::from_slice(&r.body).expect("report body"))
        .collect();
    assert_eq!(
        posted,
        vec![json!({"total": 60, "names": ["item-1", "item-2", "item-3"]})]
    );
    assert_eq!(
        hits(&server, "/items/2").await,
        3,
        "two failures, then success"
    );

    let run_id = result["run_id"].as_str().expect("run id");
    let doc = show_json(state.path(), run_id).await;
    let retries: Vec<&Value> = events(&doc, "StepRetryScheduled")
        .filter(|e| e["step"] == "fetch_each" && e["index"] == 1)
        .collect();
    assert_eq!(retries.len(), 2, "two retries recorded: {retries:?}");
    for (n, retry) in retries.iter().enumerate() {
        let ceiling_ms = (50.0 * 2f64.powi(n as i32)).min(500.0);
        let delay = retry["delay_ms"].as_f64().expect("delay");
        assert!(
            delay <= ceiling_ms,
            "retry {n} waited {delay} ms, over the backoff ceiling {ceiling_ms}"
        );
        assert_eq!(retry["attempt"], n as u64 + 2);
    }
    let failures: Vec<&Value> = events(&doc, "StepFailed").collect();
    assert_eq!(failures.len(), 2);
    assert!(
        failures
            .iter()
            .all(|f| f["disposition"] == "retry" && f["error"]["class"] == "transient")
    );
    // The run's timeline is readable as text too.
    let text = run_ok(orchestra(state.path()).args(["runs", "show", run_id])).await;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("retrying  fetch_each[1] attempt 2"), "{text}");
    assert!(text.contains("status    succeeded"), "{text}");
}

fn chain_workflow(base_url: &str, steps: usize) -> Value {
    let steps: Vec<Value> = (1..=steps)
        .map(|n| {
            json!({
                "id": format!("step{n}"),
                "type": "http",
                "params": {"method": "POST", "url": format!("{base_url}/step/{n}"), "json": {"n": n}}
            })
        })
        .collect();
    json!({"id": "chain", "steps": steps})
}

#[tokio::test]
async fn resume_continues_a_failed_run_without_rerunning_completed_steps() {
    let server = MockServer::start().await;
    // Step 3 fails permanently (a 400) the first time only.
    Mock::given(path("/step/3"))
        .respond_with(ResponseTemplate::new(400).set_body_string("bad day"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(path_regex(r"^/step/\d+$"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"ok": true})))
        .with_priority(5)
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write_workflow(dir.path(), "chain.json", chain_workflow(&server.uri(), 4));
    let state = dir.path().join("state");

    let out = orchestra(&state)
        .arg("run")
        .arg(&file)
        .output()
        .await
        .expect("runs");
    assert_eq!(out.status.code(), Some(1), "a failed run exits 1");
    let result = stdout_json(&out);
    assert_eq!(result["status"], "failed");
    assert_eq!(result["error"]["step"], "step3");
    assert!(
        result["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("400")
    );
    let run_id = result["run_id"].as_str().expect("run id").to_owned();
    assert_eq!(hits(&server, "/step/4").await, 0);

    let out = run_ok(orchestra(&state).args(["resume", &run_id])).await;
    let result = stdout_json(&out);
    assert_eq!(result["status"], "succeeded", "{result}");
    for (step, expected) in [
        ("/step/1", 1),
        ("/step/2", 1),
        ("/step/3", 2),
        ("/step/4", 1),
    ] {
        assert_eq!(hits(&server, step).await, expected, "calls to {step}");
    }
    let doc = show_json(&state, &run_id).await;
    assert_eq!(events(&doc, "RunResumed").count(), 1);
    let started_step1 = events(&doc, "StepStarted")
        .filter(|e| e["step"] == "step1")
        .count();
    assert_eq!(started_step1, 1, "completed steps are not started again");

    // A finished run cannot be resumed again.
    let again = orchestra(&state)
        .args(["resume", &run_id])
        .output()
        .await
        .expect("runs");
    assert_eq!(again.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&again.stderr)
            .contains("only failed or cancelled runs can be resumed")
    );
}

/// Answers slowly, so a run is reliably in the middle of a step when it is killed.
struct Slow;
impl Respond for Slow {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        ResponseTemplate::new(200)
            .set_body_json(json!({"ok": true}))
            .set_delay(Duration::from_millis(250))
    }
}

#[tokio::test]
async fn a_killed_run_is_finished_by_a_restarted_worker_with_each_step_succeeding_once() {
    let server = MockServer::start().await;
    Mock::given(path_regex(r"^/step/\d+$"))
        .respond_with(Slow)
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let steps = 8;
    let file = write_workflow(
        dir.path(),
        "chain.json",
        chain_workflow(&server.uri(), steps),
    );
    let state = dir.path().join("state");

    let mut child = orchestra(&state)
        .arg("run")
        .arg(&file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("orchestra starts");
    // Wait until the run is a few steps in, then SIGKILL it mid-step.
    let deadline = Instant::now() + Duration::from_secs(30);
    while hits(&server, "/step/3").await == 0 {
        assert!(Instant::now() < deadline, "the run never reached step 3");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.start_kill().expect("SIGKILL");
    child.wait().await.expect("killed");

    let list = run_ok(orchestra(&state).args(["runs", "list", "--status", "running"])).await;
    let list = String::from_utf8_lossy(&list.stdout);
    let run_id = list
        .split_whitespace()
        .next()
        .expect("the killed run is still running")
        .to_owned();

    let out = orchestra(&state)
        .args(["worker", "--exit-when-done"])
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("the worker finishes")
        .expect("worker runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let doc = show_json(&state, &run_id).await;
    assert_eq!(doc["run"]["status"], "succeeded");
    for n in 1..=steps {
        let id = format!("step{n}");
        let succeeded = events(&doc, "StepSucceeded")
            .filter(|e| e["step"] == id.as_str())
            .count();
        assert_eq!(succeeded, 1, "{id} succeeded {succeeded} times");
        // At-least-once: the step in flight at the kill may have been sent twice, no other.
        let calls = hits(&server, &format!("/step/{n}")).await;
        assert!((1..=2).contains(&calls), "{id} was called {calls} times");
    }
    let mut twice = 0;
    for n in 1..=steps {
        if hits(&server, &format!("/step/{n}")).await == 2 {
            twice += 1;
        }
    }
    assert!(twice <= 1, "only the interrupted step may run twice");
    assert_eq!(
        hits(&server, "/step/1").await,
        1,
        "steps finished before the kill are not redone"
    );
}

/// Echoes the request's headers back as JSON, as a careless API might.
struct EchoHeaders;
impl Respond for EchoHeaders {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let headers: serde_json::Map<String, Value> = req
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    Value::String(v.to_str().unwrap_or_default().to_owned()),
                )
            })
            .collect();
        ResponseTemplate::new(200).set_body_json(Value::Object(headers))
    }
}

#[tokio::test]
async fn secret_values_never_reach_outputs_history_or_the_state_file() {
    let secret = "sk-test-5f2c9a7e1b3d4c6e";
    let server = MockServer::start().await;
    Mock::given(path("/echo"))
        .respond_with(EchoHeaders)
        .mount(&server)
        .await;
    Mock::given(path("/fail"))
        .respond_with(
            ResponseTemplate::new(403).set_body_string(format!("token {secret} is not allowed")),
        )
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write_workflow(
        dir.path(),
        "secret.json",
        json!({
            "id": "secret",
            "steps": [
                {"id": "call", "type": "http",
                 "params": {"url": format!("{}/echo", server.uri()),
                            "headers": {"authorization": "Bearer {{ secrets.ORCH_TEST_API_TOKEN }}"}}},
                {"id": "say", "type": "log", "params": {"message": "token is {{ secrets.ORCH_TEST_API_TOKEN }}"}},
                {"id": "denied", "type": "http", "continue_on_error": true,
                 "params": {"url": format!("{}/fail", server.uri()),
                            "headers": {"x-token": "{{ secrets.ORCH_TEST_API_TOKEN }}"}}}
            ]
        }),
    );
    let state = dir.path().join("state");
    let out = run_ok(
        orchestra(&state)
            .env("ORCH_TEST_API_TOKEN", secret)
            .env("ORCHESTRA_LOG", "info")
            .arg("run")
            .arg(&file),
    )
    .await;
    let requests = server.received_requests().await.unwrap_or_default();
    assert_eq!(
        requests[0]
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
        Some(format!("Bearer {secret}").as_str()),
        "the secret is sent to the service"
    );
    let result = stdout_json(&out);
    assert_eq!(
        result["output"]["call"]["body"]["authorization"],
        "Bearer [REDACTED]"
    );
    assert_eq!(result["output"]["say"]["message"], "token is [REDACTED]");
    for (what, text) in [
        ("stdout", String::from_utf8_lossy(&out.stdout).into_owned()),
        (
            "stderr (logs and progress)",
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ),
    ] {
        assert!(
            !text.contains(secret),
            "the secret leaked into {what}:\n{text}"
        );
    }
    let run_id = result["run_id"].as_str().expect("run id");
    let doc = show_json(&state, run_id).await.to_string();
    assert!(!doc.contains(secret), "the secret leaked into the history");
    assert!(
        doc.contains("token [REDACTED] is not allowed"),
        "error details are redacted, not dropped"
    );
    for entry in std::fs::read_dir(&state).expect("state dir") {
        let bytes = std::fs::read(entry.expect("entry").path()).unwrap_or_default();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the secret is stored on disk"
        );
    }
}

#[tokio::test]
async fn invalid_inputs_are_rejected_before_anything_runs() {
    let state = tempfile::tempdir().expect("tempdir");
    let out = orchestra(state.path())
        .args(["run", "http_fanout", "--input", "min_items=3"])
        .output()
        .await
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("'base_url' is required"), "{stderr}");
    let out = orchestra(state.path())
        .args(["run", "hello", "--input", "nmaes=[]"])
        .output()
        .await
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("'nmaes' is not an input"));
    let list = run_ok(orchestra(state.path()).args(["runs", "list"])).await;
    assert!(list.stdout.is_empty(), "no run was created");
}

#[tokio::test]
async fn a_missing_workflow_id_names_where_it_looked() {
    let state = tempfile::tempdir().expect("tempdir");
    let out = orchestra(state.path())
        .args(["run", "no_such_flow"])
        .output()
        .await
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no workflow with id 'no_such_flow' in workflows"),
        "{stderr}"
    );
}
