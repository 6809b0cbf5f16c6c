//! EventBridge-triggered Lambda: starts a run of the workflow a schedule names.

use lambda_runtime::{Error, LambdaEvent, run, service_fn, tracing};
use orchestra_core::aws::{AwsConfig, lambda::handle_schedule};
use serde_json::{Value, json};

#[tokio::main]
async fn main() -> Result<(), Error> {
    tracing::init_default_subscriber();
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
