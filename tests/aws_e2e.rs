//! End to end on a local AWS emulator: moto, started by this test binary on 127.0.0.1 and stopped
//! when it exits (`python3 -m pip install 'moto[server]'` provides it). Tables, queues and secrets
//! are created through the real SDK; runs start through the `api` handler with real API Gateway v2
//! events; the test plays Lambda's SQS event source (receive a batch, call the `step-worker` handler
//! with a real `SqsEvent`, delete what succeeded, leave failures to the visibility timeout).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_lambda_events::event::sqs::SqsEvent;
use aws_sdk_dynamodb::config::Credentials;
use aws_sdk_sqs::types::MessageSystemAttributeName;
use orchestra_core::aws::lambda::{handle_schedule, handle_sqs_event};
use orchestra_core::aws::{AwsConfig, AwsRuntime, provision};
use orchestra_core::engine::{HistoryKind, RunState, RunStatus};
use orchestra_core::http_api::router;
use orchestra_core::ports::{RunStore, WorkflowCatalog};
use orchestra_core::workflow::parse;
use serde_json::{Value, json};
use tower::ServiceExt;
use wiremock::matchers::path_regex;
use wiremock::{Mock, MockServer, ResponseTemplate};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

/// The emulator, shared by the tests of this binary; it stops when our end of its stdin closes,
/// which the OS does when this process exits.
struct Moto {
    url: String,
    _child: Child,
    _stdin: Mutex<ChildStdin>,
}

const MOTO_SCRIPT: &str = r#"
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
server.stop()
"#;

fn moto() -> &'static str {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    &MOTO
        .get_or_init(|| {
            let mut child = Command::new("python3")
                .args(["-c", MOTO_SCRIPT])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("python3 starts");
            let stdout = child.stdout.take().expect("stdout");
            let mut line = String::new();
            BufReader::new(stdout)
                .read_line(&mut line)
                .expect("moto prints its port");
            let port: u16 = line.trim().parse().unwrap_or_else(|_| {
                panic!("moto did not start ({line:?}): python3 -m pip install 'moto[server]'")
            });
            let stdin = child.stdin.take().expect("stdin");
            Moto {
                url: format!("http://127.0.0.1:{port}"),
                _child: child,
                _stdin: Mutex::new(stdin),
            }
        })
        .url
}

struct Aws {
    sdk: SdkConfig,
    config: AwsConfig,
    rt: AwsRuntime,
    dlq_url: String,
}

fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{name}-{nanos}")
}

async fn setup(name: &str, visibility_s: u32, max_receives: u32) -> Aws {
    let sdk = aws_config::defaults(BehaviorVersion::v2026_01_12())
        .endpoint_url(moto())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .load()
        .await;
    let table = unique(name);
    provision::create_table(&aws_sdk_dynamodb::Client::new(&sdk), &table)
        .await
        .expect("table");
    let (queue_url, dlq_url) = provision::create_queues(
        &aws_sdk_sqs::Client::new(&sdk),
        &unique(name),
        visibility_s,
        max_receives,
    )
    .await
    .expect("queues");

    let env: HashMap<&str, String> = HashMap::from([
        ("ORCHESTRA_TABLE", table),
        ("ORCHESTRA_QUEUE_URL", queue_url),
        ("ORCHESTRA_SECRET_PREFIX", format!("{name}/")),
        ("ORCHESTRA_MAX_RECEIVES", max_receives.to_string()),
        ("ORCHESTRA_LEASE_MARGIN_S", "0".into()),
        ("ORCHESTRA_VISIBILITY_TIMEOUT_S", visibility_s.to_string()),
    ]);
    let config = AwsConfig::from_lookup(|k| env.get(k).cloned()).expect("config");
    let rt = config.runtime_with(&sdk);
    Aws {
        sdk,
        config,
        rt,
        dlq_url,
    }
}

/// Calls the `api` router with a sample API Gateway v2 event from `events/`, adjusted.
async fn api_call(aws: &Aws, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let file = if body.is_some() {
        "events/api-start-run.json"
    } else {
        "events/api-get-run.json"
    };
    let mut event: Value =
        serde_json::from_str(&std::fs::read_to_string(repo_root().join(file)).expect("event"))
            .expect("event json");
    event["rawPath"] = json!(path);
    event["requestContext"]["http"]["path"] = json!(path);
    event["requestContext"]["http"]["method"] = json!(method);
    match body {
        Some(body) => event["body"] = json!(body.to_string()),
        None => {
            if let Some(obj) = event.as_object_mut() {
                obj.remove("body");
            }
        }
    }
    let request =
        lambda_http::request::from_str(&event.to_string()).expect("an API Gateway v2 request");
    let response = router(aws.rt.clone())
        .oneshot(request)
        .await
        .expect("response");
    let status = response.status().as_u16();
    let bytes = axum_body(response).await;
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Starts a run of an inline workflow through the API; returns its id.
async fn start_through_api(aws: &Aws, workflow: Value) -> String {
    let (status, body) = api_call(aws, "POST", "/runs", Some(json!({"workflow": workflow}))).await;
    assert_eq!(status, 202, "{body}");
    body["run_id"].as_str().expect("run id").to_owned()
}

/// A service that answers `/slow` after `delay`.
async fn slow_server(delay: Duration) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(path_regex("^/slow$"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"ok": true}))
                .set_delay(delay),
        )
        .mount(&server)
        .await;
    server
}

async fn axum_body(response: axum::response::Response) -> Vec<u8> {
    axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body")
        .to_vec()
}

/// Receives a batch the way Lambda's event source does and shapes it as Lambda's `SqsEvent`.
async fn receive_event(aws: &Aws, queue_url: &str) -> (SqsEvent, HashMap<String, String>) {
    let sqs = aws_sdk_sqs::Client::new(&aws.sdk);
    let out = sqs
        .receive_message()
        .queue_url(queue_url)
        .max_number_of_messages(10)
        .wait_time_seconds(1)
        .message_system_attribute_names(MessageSystemAttributeName::All)
        .send()
        .await
        .expect("receive");
    let mut receipts = HashMap::new();
    let records: Vec<Value> = out
        .messages()
        .iter()
        .map(|m| {
            let id = m.message_id().unwrap_or_default().to_owned();
            receipts.insert(
                id.clone(),
                m.receipt_handle().unwrap_or_default().to_owned(),
            );
            let attributes: HashMap<String, String> = m
                .attributes()
                .map(|a| {
                    a.iter()
                        .map(|(k, v)| (k.as_str().to_owned(), v.clone()))
                        .collect()
                })
                .unwrap_or_default();
            json!({
                "messageId": id,
                "receiptHandle": m.receipt_handle(),
                "body": m.body(),
                "md5OfBody": m.md5_of_body(),
                "attributes": attributes,
                "messageAttributes": {},
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:steps",
                "awsRegion": "us-east-1"
            })
        })
        .collect();
    let event: SqsEvent = serde_json::from_value(json!({ "Records": records })).expect("SqsEvent");
    (event, receipts)
}

/// Deletes what the handler did not report as failed, as the event source does.
async fn delete_succeeded(aws: &Aws, receipts: &HashMap<String, String>, failed: &[String]) {
    let sqs = aws_sdk_sqs::Client::new(&aws.sdk);
    for (id, receipt) in receipts {
        if !failed.contains(id) {
            sqs.delete_message()
                .queue_url(&aws.config.queue_url)
                .receipt_handle(receipt)
                .send()
                .await
                .expect("delete");
        }
    }
}

async fn state(aws: &Aws, run_id: &str) -> RunState {
    aws.rt
        .store()
        .load_run(run_id)
        .await
        .expect("load")
        .expect("run exists")
        .state
}

/// Plays the SQS event source until the run finishes.
async fn pump(aws: &Aws, run_id: &str, limit: Duration) -> RunState {
    let deadline = Instant::now() + limit;
    loop {
        let current = state(aws, run_id).await;
        if current.status.is_terminal() {
            return current;
        }
        assert!(
            Instant::now() < deadline,
            "run {run_id} did not finish: {current:?}"
        );
        let (event, receipts) = receive_event(aws, &aws.config.queue_url).await;
        if event.records.is_empty() {
            continue;
        }
        let response = handle_sqs_event(&aws.rt, &aws.config, event).await;
        let failed: Vec<String> = response
            .batch_item_failures
            .iter()
            .map(|f| f.item_identifier.clone())
            .collect();
        delete_succeeded(aws, &receipts, &failed).await;
    }
}

async fn counting_server() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(path_regex(r"^/effect/.+$"))
        .respond_with(|req: &wiremock::Request| {
            ResponseTemplate::new(200).set_body_json(json!({"path": req.url.path()}))
        })
        .mount(&server)
        .await;
    server
}

async fn hits(server: &MockServer) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for r in server.received_requests().await.unwrap_or_default() {
        *out.entry(r.url.path().to_owned()).or_default() += 1;
    }
    out
}

fn effects_workflow(base: &str) -> Value {
    json!({
        "id": "effects",
        "inputs": {"who": {"type": "string", "default": "world"}},
        "steps": [
            {"id": "first", "type": "http", "params": {"method": "POST", "url": format!("{base}/effect/first")}},
            {"id": "each", "type": "http", "for_each": ["a", "b", "c"], "max_concurrency": 2,
             "params": {"method": "POST", "url": format!("{base}/effect/each-{{{{ item }}}}")}},
            {"id": "greet", "type": "transform", "params": {"value": "hello {{ inputs.who }}, {{ steps.each.output | length }} items"}},
            {"id": "last", "type": "http", "params": {"method": "POST", "url": format!("{base}/effect/last"), "json": {"greeting": "{{ steps.greet.output }}"}}}
        ]
    })
}

fn expected_effects() -> HashMap<String, usize> {
    ["first", "each-a", "each-b", "each-c", "last"]
        .iter()
        .map(|s| (format!("/effect/{s}"), 1))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_started_through_the_api_finishes_through_the_step_worker() {
    let server = counting_server().await;
    let aws = setup("e2e", 5, 5).await;
    let (status, body) = api_call(
        &aws,
        "POST",
        "/runs",
        Some(json!({"workflow": effects_workflow(&server.uri()), "inputs": {"who": "Ada"}})),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let run_id = body["run_id"].as_str().expect("run id").to_owned();

    let finished = pump(&aws, &run_id, Duration::from_secs(60)).await;
    assert_eq!(finished.status, RunStatus::Succeeded, "{finished:?}");
    assert_eq!(hits(&server).await, expected_effects());

    // Read back through the API and straight from DynamoDB.
    let (status, body) = api_call(&aws, "GET", &format!("/runs/{run_id}"), None).await;
    assert_eq!(status, 200);
    assert_eq!(body["run"]["status"], "succeeded");
    assert_eq!(body["run"]["output"]["greet"], "hello Ada, 3 items");
    let (status, body) = api_call(&aws, "GET", &format!("/runs/{run_id}/history"), None).await;
    assert_eq!(status, 200);
    let kinds: Vec<&str> = body["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["type"].as_str())
        .collect();
    assert_eq!(kinds.first(), Some(&"RunStarted"));
    assert_eq!(kinds.last(), Some(&"RunSucceeded"));
    let history = aws
        .rt
        .store()
        .history(&run_id, 0, 1000)
        .await
        .expect("history");
    let replayed = RunState::replay(&run_id, "effects", &history);
    assert_eq!(replayed, finished);
    let listed = aws
        .rt
        .store()
        .list_runs(Some(RunStatus::Succeeded), 10)
        .await
        .expect("list");
    assert!(listed.iter().any(|r| r.run_id == run_id), "{listed:?}");
    assert!(
        aws.rt
            .store()
            .unfinished_runs()
            .await
            .expect("unfinished")
            .is_empty()
    );

    let (status, body) = api_call(&aws, "GET", "/runs/does-not-exist", None).await;
    assert_eq!((status, body["error"].as_str().is_some()), (404, true));
    let (status, body) = api_call(
        &aws,
        "POST",
        "/runs",
        Some(
            json!({"workflow": {"id": "bad", "steps": [{"id": "a", "type": "log", "params": {}}]}}),
        ),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["issues"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("missing required param 'message'"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_delivered_twice_and_out_of_order_runs_each_side_effect_once() {
    let server = counting_server().await;
    let aws = setup("dup", 2, 10).await;
    let sqs = aws_sdk_sqs::Client::new(&aws.sdk);
    let plan = parse(&effects_workflow(&server.uri()).to_string(), "effects").expect("workflow");
    let run_id = aws
        .rt
        .start_run(
            std::sync::Arc::new(
                orchestra_core::workflow::Plan::compile(plan, "effects").expect("valid"),
            ),
            Default::default(),
        )
        .await
        .expect("start");
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut held_back: Option<String> = None;
    let mut copies = 0;
    while !state(&aws, &run_id).await.status.is_terminal() {
        assert!(Instant::now() < deadline, "run did not finish");
        let (mut event, receipts) = receive_event(&aws, &aws.config.queue_url).await;
        if event.records.is_empty() {
            continue;
        }
        // Every first delivery is sent again as a copy.
        for record in &event.records {
            if record
                .attributes
                .get("ApproximateReceiveCount")
                .map(String::as_str)
                == Some("1")
            {
                sqs.send_message()
                    .queue_url(&aws.config.queue_url)
                    .message_body(record.body.clone().unwrap_or_default())
                    .send()
                    .await
                    .expect("copy");
                copies += 1;
            }
        }
        // Out of order: reverse the batch, and hold one message back for a later batch.
        event.records.reverse();
        if held_back.is_none() && event.records.len() > 1 {
            let record = event.records.remove(0);
            held_back = record.message_id.clone();
        } else if held_back.is_some() {
            held_back = None;
        }
        let response = handle_sqs_event(&aws.rt, &aws.config, event).await;
        let mut failed: Vec<String> = response
            .batch_item_failures
            .iter()
            .map(|f| f.item_identifier.clone())
            .collect();
        failed.extend(held_back.clone());
        delete_succeeded(&aws, &receipts, &failed).await;
    }
    assert_eq!(state(&aws, &run_id).await.status, RunStatus::Succeeded);
    assert!(copies >= 6, "only {copies} duplicates were delivered");
    assert_eq!(hits(&server).await, expected_effects());
    let history = aws
        .rt
        .store()
        .history(&run_id, 0, 1000)
        .await
        .expect("history");
    let successes = history
        .iter()
        .filter(|e| matches!(e.kind, HistoryKind::StepSucceeded { index: None, .. }))
        .count();
    assert_eq!(successes, 4, "each step recorded once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_between_claim_and_commit_is_recovered_after_the_visibility_timeout() {
    let server = slow_server(Duration::from_millis(1500)).await;
    let aws = setup("kill", 3, 10).await;
    let workflow = json!({"id": "slow", "steps": [
        {"id": "call", "type": "http", "timeout_s": 2, "params": {"url": format!("{}/slow", server.uri())}}
    ]});
    let run_id = start_through_api(&aws, workflow).await;

    // The first worker claims the attempt, calls the service, and dies before recording anything.
    let (event, _receipts) = receive_event(&aws, &aws.config.queue_url).await;
    assert_eq!(event.records.len(), 1);
    let doomed = {
        let (rt, config) = (aws.rt.clone(), aws.config.clone());
        tokio::spawn(async move { handle_sqs_event(&rt, &config, event).await })
    };
    let until = Instant::now() + Duration::from_secs(10);
    while server
        .received_requests()
        .await
        .unwrap_or_default()
        .is_empty()
    {
        assert!(Instant::now() < until, "the step never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    doomed.abort();
    let _ = doomed.await;
    let claimed = state(&aws, &run_id).await;
    assert_eq!(claimed.status, RunStatus::Running);
    // A fresh runtime, as in a new Lambda container: nothing cached from the dead one.
    let fresh = Aws {
        rt: aws.config.runtime_with(&aws.sdk),
        sdk: aws.sdk.clone(),
        config: aws.config.clone(),
        dlq_url: aws.dlq_url.clone(),
    };
    let finished = pump(&fresh, &run_id, Duration::from_secs(60)).await;
    assert_eq!(finished.status, RunStatus::Succeeded);
    let history = fresh
        .rt
        .store()
        .history(&run_id, 0, 1000)
        .await
        .expect("history");
    let started = history
        .iter()
        .filter(|e| matches!(e.kind, HistoryKind::StepStarted { .. }))
        .count();
    let succeeded = history
        .iter()
        .filter(|e| matches!(e.kind, HistoryKind::StepSucceeded { .. }))
        .count();
    assert_eq!(
        (started, succeeded),
        (2, 1),
        "claimed twice (once taken over), recorded once"
    );
    assert_eq!(
        server.received_requests().await.unwrap_or_default().len(),
        2,
        "at least once: the dead worker's call and the retry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_lands_in_the_dead_letter_queue_and_fails_the_run() {
    let aws = setup("poison", 1, 3).await;
    let workflow = json!({"id": "poison", "steps": [
        {"id": "call", "type": "log", "params": {"message": "never"}}
    ]});
    let run_id = start_through_api(&aws, workflow).await;
    // The workflow stored with the run stops validating (say, after an upgrade tightened a rule):
    // every delivery of its task now fails the same way.
    aws_sdk_dynamodb::Client::new(&aws.sdk)
        .put_item()
        .table_name(&aws.config.table)
        .item(
            "pk",
            aws_sdk_dynamodb::types::AttributeValue::S(format!("RUN#{run_id}")),
        )
        .item(
            "sk",
            aws_sdk_dynamodb::types::AttributeValue::S("WF".into()),
        )
        .item(
            "workflow",
            aws_sdk_dynamodb::types::AttributeValue::S(
                json!({"id": "poison", "steps": []}).to_string(),
            ),
        )
        .send()
        .await
        .expect("overwrite");
    let fresh = Aws {
        rt: aws.config.runtime_with(&aws.sdk),
        sdk: aws.sdk.clone(),
        config: aws.config.clone(),
        dlq_url: aws.dlq_url.clone(),
    };
    let finished = pump(&fresh, &run_id, Duration::from_secs(60)).await;
    assert_eq!(finished.status, RunStatus::Failed);
    let error = finished.error.expect("error");
    assert_eq!(error.step.as_deref(), Some("call"));
    assert!(
        error.message.contains("3 deliveries") && error.message.contains("dead-letter"),
        "{}",
        error.message
    );
    assert!(
        error.message.contains("no longer validates"),
        "{}",
        error.message
    );
    // One more receive lets SQS move it past maxReceiveCount into the DLQ.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (event, _) = receive_event(&aws, &aws.config.queue_url).await;
        assert!(
            event.records.is_empty(),
            "the poison message came back after failing the run"
        );
        let (dead, _) = receive_event(&aws, &aws.dlq_url).await;
        if let Some(record) = dead.records.first() {
            let task: Value =
                serde_json::from_str(record.body.as_deref().unwrap_or("{}")).expect("task");
            assert_eq!(task["run_id"], run_id);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nothing reached the dead-letter queue"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_start_a_stored_workflow_once_per_execution() {
    let aws = setup("sched", 5, 5).await;
    let hello: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("workflows/hello.json")).expect("hello"),
    )
    .expect("json");
    let (status, _) = api_call(&aws, "PUT", "/workflows/hello", Some(hello)).await;
    assert_eq!(status, 200);
    assert!(
        aws.rt
            .store()
            .get_workflow("hello")
            .await
            .expect("get")
            .is_some()
    );

    let mut input: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("events/scheduler-input.json")).expect("event"),
    )
    .expect("json");
    input["execution_id"] = json!("exec-42");
    let first = handle_schedule(&aws.rt, input.clone())
        .await
        .expect("start");
    let again = handle_schedule(&aws.rt, input)
        .await
        .expect("duplicate delivery");
    assert_eq!(first, again, "a redelivered schedule starts no second run");
    let finished = pump(&aws, &first, Duration::from_secs(60)).await;
    assert_eq!(finished.status, RunStatus::Succeeded);
    assert_eq!(
        finished.output.expect("output")["greetings"][0],
        "Hello, Ada (#1)"
    );

    let rule: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("events/eventbridge-scheduled-event.json"))
            .expect("event"),
    )
    .expect("json");
    let from_rule = handle_schedule(&aws.rt, rule).await.expect("rule event");
    assert_eq!(state(&aws, &from_rule).await.workflow_id, "hello");
    let err = handle_schedule(&aws.rt, json!({"workflow_id": "nope"}))
        .await
        .expect_err("unknown");
    assert!(
        err.to_string().contains("PUT it to /workflows/nope"),
        "{err}"
    );
}

/// The `step-worker` binary itself, built and run by `cargo lambda watch` (Lambda's runtime API,
/// emulated), invoked with an SQS event made from `events/sqs-step-batch.json`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_step_worker_binary_runs_under_cargo_lambda_watch() {
    let aws = setup("watch", 5, 5).await;
    let workflow = json!({"id": "w", "steps": [
        {"id": "hello", "type": "transform", "params": {"value": "hi"}},
        {"id": "bye", "type": "transform", "params": {"value": "bye"}}
    ]});
    let run_id = start_through_api(&aws, workflow).await;
    // The sample batch, with its first record pointed at this run's first task.
    let (received, _) = receive_event(&aws, &aws.config.queue_url).await;
    let task_body = received.records[0].body.clone().expect("task");
    let mut event: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("events/sqs-step-batch.json")).expect("event"),
    )
    .expect("json");
    event["Records"][0]["body"] = json!(task_body);
    let event_file = std::env::temp_dir().join(format!("{}.json", unique("sqs-event")));
    std::fs::write(&event_file, event.to_string()).expect("write event");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let env = [
        ("ORCHESTRA_TABLE", aws.config.table.clone()),
        ("ORCHESTRA_QUEUE_URL", aws.config.queue_url.clone()),
        ("AWS_ENDPOINT_URL", moto().to_owned()),
        ("AWS_ACCESS_KEY_ID", "test".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "test".to_owned()),
        ("AWS_REGION", "us-east-1".to_owned()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
    ];
    let mut watch = Command::new("cargo");
    watch
        .current_dir(repo_root())
        .args([
            "lambda",
            "watch",
            "--ignore-changes",
            "-A",
            "127.0.0.1",
            "-P",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in &env {
        watch.env(k, v).arg("--env-var").arg(format!("{k}={v}"));
    }
    let mut watch = watch
        .spawn()
        .expect("cargo lambda (python3 -m pip install cargo-lambda)");

    // The first invocation waits for cargo lambda to build the function.
    let deadline = Instant::now() + Duration::from_secs(300);
    let output = loop {
        let out = Command::new("cargo")
            .current_dir(repo_root())
            .args([
                "lambda",
                "invoke",
                "step-worker",
                "--invoke-address",
                "127.0.0.1",
                "--invoke-port",
            ])
            .arg(port.to_string())
            .arg("--data-file")
            .arg(&event_file)
            .output()
            .expect("cargo lambda invoke");
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        if Instant::now() > deadline {
            let _ = watch.kill();
            panic!(
                "invoke kept failing: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    let _ = watch.kill();
    let _ = watch.wait();
    let response: Value = serde_json::from_str(output.trim()).expect("a batch response");
    // The real task ran; the sample's second record names a run that does not exist and is
    // acknowledged, not retried: no failures are reported.
    assert_eq!(response["batchItemFailures"], json!([]), "{output}");
    let after = state(&aws, &run_id).await;
    assert_eq!(
        after.step_status("hello"),
        orchestra_core::engine::StepStatus::Succeeded
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_longer_than_the_visibility_timeout_keeps_its_message_invisible() {
    let server = slow_server(Duration::from_millis(3500)).await;
    let aws = setup("heartbeat", 2, 5).await;
    let workflow = json!({"id": "slow", "steps": [
        {"id": "call", "type": "http", "timeout_s": 10, "params": {"url": format!("{}/slow", server.uri())}}
    ]});
    let run_id = start_through_api(&aws, workflow).await;
    let (event, receipts) = receive_event(&aws, &aws.config.queue_url).await;
    assert_eq!(event.records.len(), 1);
    let worker = {
        let (rt, config) = (aws.rt.clone(), aws.config.clone());
        tokio::spawn(async move { handle_sqs_event(&rt, &config, event).await })
    };
    // For the whole 3.5 s step (the visibility timeout is 2 s) nobody else gets the message.
    let started = Instant::now();
    while !worker.is_finished() {
        let (other, _) = receive_event(&aws, &aws.config.queue_url).await;
        assert!(
            other.records.is_empty(),
            "redelivered after {:?} while still running",
            started.elapsed()
        );
    }
    let response = worker.await.expect("handler");
    assert!(response.batch_item_failures.is_empty());
    delete_succeeded(&aws, &receipts, &[]).await;
    assert!(started.elapsed() >= Duration::from_secs(3));
    let finished = pump(&aws, &run_id, Duration::from_secs(30)).await;
    assert_eq!(finished.status, RunStatus::Succeeded);
    assert_eq!(
        server.received_requests().await.unwrap_or_default().len(),
        1
    );
}
