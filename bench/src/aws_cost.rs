//! AWS API calls per executed step, counted on the emulator (moto, started here on 127.0.0.1) for
//! 10-step workflows run through the real `step-worker` handler, turned into dollars per million
//! steps at published on-demand prices; and the stripped size of each release Lambda binary.
//!
//! ```sh
//! python3 -m pip install 'moto[server]'
//! cargo build --profile lambda -p api -p step-worker -p scheduler   # for the sizes
//! cargo run --release -p orchestra-bench --bin aws-cost -- [--out target/aws-cost.json]
//! ```

use std::collections::BTreeMap;
use std::error::Error;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_lambda_events::event::sqs::SqsEvent;
use aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_dynamodb::config::{ConfigBag, Credentials, Intercept, RuntimeComponents};
use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, MessageSystemAttributeName};
use orchestra_core::aws::lambda::handle_sqs_event;
use orchestra_core::aws::{AwsConfig, DynamoStore, provision};
use orchestra_core::ports::RunStore;
use orchestra_core::workflow::Plan;
use serde_json::{Value, json};

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

const RUNS: usize = 20;
const STEPS: usize = 10;

/// Published on-demand prices, us-east-1, November 2026.
const DYNAMODB_PER_MILLION_WRU: f64 = 0.625;
const DYNAMODB_PER_MILLION_RRU: f64 = 0.125;
const SQS_PER_MILLION_REQUESTS: f64 = 0.40;
const LAMBDA_PER_MILLION_REQUESTS: f64 = 0.20;
const STEP_FUNCTIONS_STANDARD_PER_MILLION: f64 = 25.0;

/// Counts API calls by service and operation.
#[derive(Debug, Clone, Default)]
struct Counter(Arc<Mutex<BTreeMap<String, u64>>>);

impl Intercept for Counter {
    fn name(&self) -> &'static str {
        "call-counter"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> std::result::Result<(), aws_sdk_dynamodb::error::BoxError> {
        // All three services speak the JSON protocol: the operation is in X-Amz-Target,
        // e.g. `DynamoDB_20120810.PutItem` or `AmazonSQS.SendMessageBatch`.
        let target = context
            .request()
            .headers()
            .get("x-amz-target")
            .unwrap_or("unknown.unknown");
        let (service, op) = target.split_once('.').unwrap_or(("unknown", target));
        let service = match service {
            s if s.starts_with("DynamoDB") => "dynamodb",
            "AmazonSQS" => "sqs",
            s => s,
        };
        if let Ok(mut map) = self.0.lock() {
            *map.entry(format!("{service}.{op}")).or_default() += 1;
        }
        Ok(())
    }
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

fn linear(n: usize) -> Value {
    let steps: Vec<Value> = (0..n)
        .map(|i| {
            let value = if i == 0 {
                json!({"n": 0})
            } else {
                json!({"n": format!("{{{{ steps.s{}.output.n + 1 }}}}", i - 1)})
            };
            json!({"id": format!("s{i}"), "type": "transform", "params": {"value": value}})
        })
        .collect();
    json!({"id": "linear", "steps": steps})
}

/// DynamoDB's item size: attribute names plus values (numbers approximated by their digits).
fn item_size(
    item: &std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue>,
) -> usize {
    use aws_sdk_dynamodb::types::AttributeValue as A;
    item.iter()
        .map(|(k, v)| {
            k.len()
                + match v {
                    A::S(s) => s.len(),
                    A::N(n) => n.len().div_ceil(2) + 1,
                    _ => 8,
                }
        })
        .sum()
}

#[tokio::main]
async fn main() -> Result<()> {
    let out_path = std::env::args()
        .skip_while(|a| a != "--out")
        .nth(1)
        .unwrap_or_else(|| "target/aws-cost.json".into());
    let mut moto = Command::new("python3")
        .args(["-c", MOTO_SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(moto.stdout.take().ok_or("no stdout")?).read_line(&mut line)?;
    let port: u16 = line
        .trim()
        .parse()
        .map_err(|_| "moto did not start: python3 -m pip install 'moto[server]'")?;
    let sdk: SdkConfig = aws_config::defaults(BehaviorVersion::v2026_01_12())
        .endpoint_url(format!("http://127.0.0.1:{port}"))
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .load()
        .await;

    let ddb_plain = aws_sdk_dynamodb::Client::new(&sdk);
    provision::create_table(&ddb_plain, "cost").await?;
    let (queue_url, _) =
        provision::create_queues(&aws_sdk_sqs::Client::new(&sdk), "cost", 30, 5).await?;
    let env = BTreeMap::from([
        ("ORCHESTRA_TABLE", "cost".to_owned()),
        ("ORCHESTRA_QUEUE_URL", queue_url.clone()),
    ]);
    let config = AwsConfig::from_lookup(|k| env.get(k).cloned())?;

    let counter = Counter::default();
    let ddb = aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(&sdk)
            .interceptor(counter.clone())
            .build(),
    );
    let sqs = aws_sdk_sqs::Client::from_conf(
        aws_sdk_sqs::config::Builder::from(&sdk)
            .interceptor(counter.clone())
            .build(),
    );
    let secrets = aws_sdk_secretsmanager::Client::from_conf(
        aws_sdk_secretsmanager::config::Builder::from(&sdk)
            .interceptor(counter.clone())
            .build(),
    );
    let rt = config.runtime_from_clients(ddb, sqs.clone(), secrets);
    let observer = DynamoStore::new(ddb_plain.clone(), "cost", 90);

    let plan = Arc::new(Plan::from_json(&linear(STEPS).to_string(), "linear")?);
    let mut run_ids = Vec::new();
    for _ in 0..RUNS {
        run_ids.push(rt.start_run(plan.clone(), Default::default()).await?);
    }
    // Play Lambda's SQS event source with the counted client: batched receives and deletes.
    let mut invocations = 0u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let mut done = 0;
        for id in &run_ids {
            if observer
                .load_run(id)
                .await?
                .is_some_and(|r| r.state.status.is_terminal())
            {
                done += 1;
            }
        }
        if done == RUNS {
            break;
        }
        if Instant::now() > deadline {
            return Err("runs did not finish in 5 minutes".into());
        }
        let received = sqs
            .receive_message()
            .queue_url(&queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await?;
        if received.messages().is_empty() {
            continue;
        }
        let records: Vec<Value> = received
            .messages()
            .iter()
            .map(|m| json!({"messageId": m.message_id(), "receiptHandle": m.receipt_handle(), "body": m.body(),
                            "attributes": {"ApproximateReceiveCount": "1"}, "messageAttributes": {},
                            "eventSource": "aws:sqs"}))
            .collect();
        let event: SqsEvent = serde_json::from_value(json!({ "Records": records }))?;
        invocations += 1;
        let response = handle_sqs_event(&rt, &config, event).await;
        let failed: Vec<&str> = response
            .batch_item_failures
            .iter()
            .map(|f| f.item_identifier.as_str())
            .collect();
        let entries: Vec<DeleteMessageBatchRequestEntry> = received
            .messages()
            .iter()
            .filter(|m| !failed.contains(&m.message_id().unwrap_or_default()))
            .enumerate()
            .filter_map(|(n, m)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(n.to_string())
                    .receipt_handle(m.receipt_handle().unwrap_or_default())
                    .build()
                    .ok()
            })
            .collect();
        if !entries.is_empty() {
            sqs.delete_message_batch()
                .queue_url(&queue_url)
                .set_entries(Some(entries))
                .send()
                .await?;
        }
    }
    for id in &run_ids {
        let run = observer.load_run(id).await?.ok_or("run vanished")?;
        if run.state.status != orchestra_core::engine::RunStatus::Succeeded {
            return Err(format!("run {id} ended {:?}", run.state.status).into());
        }
    }

    // Write units from the items as stored: each history batch was written once; a run's creation
    // is one transaction of three items (twice the units); each status change updates the run item.
    let scan = ddb_plain.scan().table_name("cost").send().await?;
    let mut wru = 0u64;
    for item in scan.items() {
        let size = item_size(item) as u64;
        let units = size.div_ceil(1024).max(1);
        let sk = item
            .get("sk")
            .and_then(|v| v.as_s().ok())
            .map(String::as_str)
            .unwrap_or_default();
        wru += match sk {
            "H#000000000000" | "WF" => 2 * units,
            "META" => 2 * units + units, // created in the transaction, updated when it finished
            _ => units,
        };
    }
    let calls = counter.0.lock().map(|m| m.clone()).unwrap_or_default();
    let count = |op: &str| calls.get(op).copied().unwrap_or(0);
    let steps = (RUNS * STEPS) as f64;
    let ddb_writes = count("dynamodb.PutItem")
        + count("dynamodb.UpdateItem")
        + count("dynamodb.TransactWriteItems");
    let ddb_reads = count("dynamodb.GetItem") + count("dynamodb.Query");
    let sqs_requests: u64 = calls
        .iter()
        .filter(|(k, _)| k.starts_with("sqs."))
        .map(|(_, v)| v)
        .sum();
    // Reads: strongly consistent, at most a few KB per call here: 1 unit each (4 KB).
    let rru = ddb_reads;
    let per_million = |units: f64, price: f64| units / steps * 1e6 * price / 1e6;
    let cost = json!({
        "dynamodb_writes": per_million(wru as f64, DYNAMODB_PER_MILLION_WRU),
        "dynamodb_reads": per_million(rru as f64, DYNAMODB_PER_MILLION_RRU),
        "sqs": per_million(sqs_requests as f64, SQS_PER_MILLION_REQUESTS),
        "lambda_requests": per_million(invocations as f64, LAMBDA_PER_MILLION_REQUESTS),
    });
    let total: f64 = cost
        .as_object()
        .map(|m| m.values().filter_map(Value::as_f64).sum())
        .unwrap_or(0.0);
    let sizes: BTreeMap<&str, Value> = ["api", "step-worker", "scheduler"]
        .iter()
        .map(|b| {
            let size = std::fs::metadata(format!("target/lambda/{b}"))
                .map(|m| m.len())
                .ok();
            (
                *b,
                size.map_or(
                    Value::Null,
                    |s| json!({"bytes": s, "mib": (s as f64 / 1_048_576.0 * 100.0).round() / 100.0}),
                ),
            )
        })
        .collect();
    let doc = json!({
        "runs": RUNS,
        "steps_per_run": STEPS,
        "executed_steps": steps,
        "calls": calls,
        "per_step": {
            "dynamodb_write_requests": ddb_writes as f64 / steps,
            "dynamodb_read_requests": ddb_reads as f64 / steps,
            "dynamodb_write_units": wru as f64 / steps,
            "sqs_send_requests": (count("sqs.SendMessageBatch") + count("sqs.SendMessage")) as f64 / steps,
            "sqs_requests": sqs_requests as f64 / steps,
            "lambda_invocations": invocations as f64 / steps,
        },
        "dollars_per_million_steps": {"breakdown": cost, "total": (total * 1000.0).round() / 1000.0,
            "step_functions_standard": STEP_FUNCTIONS_STANDARD_PER_MILLION,
            "times_cheaper": (STEP_FUNCTIONS_STANDARD_PER_MILLION / total * 10.0).round() / 10.0},
        "lambda_compute": "not included: it depends on what steps do (a transform step takes milliseconds)",
        "binary_sizes_stripped": sizes,
    });
    std::fs::write(&out_path, serde_json::to_string_pretty(&doc)? + "\n")?;
    println!("{}", serde_json::to_string_pretty(&doc)?);
    println!("written to {out_path}");
    drop(moto.stdin.take());
    let _ = moto.wait();
    Ok(())
}
