//! SQS-triggered Lambda: executes step attempts and reports partial batch failures.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use lambda_runtime::{Error, LambdaEvent, run, service_fn};
use orchestra_core::aws::{AwsConfig, lambda::handle_sqs_event};

#[tokio::main]
async fn main() -> Result<(), Error> {
    orchestra_core::aws::init_logging();
    let config = AwsConfig::from_env()?;
    let runtime = config.runtime().await;
    run(service_fn(|event: LambdaEvent<SqsEvent>| {
        let (runtime, config) = (&runtime, &config);
        async move {
            Ok::<SqsBatchResponse, Error>(handle_sqs_event(runtime, config, event.payload).await)
        }
    }))
    .await
}
