//! EventBridge-triggered Lambda: starts a run of the workflow a schedule names.

use lambda_runtime::{Error, LambdaEvent, run, service_fn};
use orchestra_core::aws::{AwsConfig, lambda::handle_schedule};
use serde_json::{Value, json};

#[tokio::main]
async fn main() -> Result<(), Error> {
    orchestra_core::aws::init_logging();
    let config = AwsConfig::from_env()?;
    let runtime = config.runtime().await;
    run(service_fn(|event: LambdaEvent<Value>| {
        let runtime = &runtime;
        async move {
            let run_id = handle_schedule(runtime, event.payload).await?;
            Ok::<Value, Error>(json!({ "run_id": run_id }))
        }
    }))
    .await
}
