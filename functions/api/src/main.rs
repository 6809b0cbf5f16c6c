//! API Gateway (HTTP API) Lambda hosting the AI-Orchestra HTTP API router.

use lambda_http::{Error, run};
use orchestra_core::aws::AwsConfig;
use orchestra_core::http_api::router;

#[tokio::main]
async fn main() -> Result<(), Error> {
    orchestra_core::aws::init_logging();
    let config = AwsConfig::from_env()?;
    run(router(config.runtime().await)).await
}
