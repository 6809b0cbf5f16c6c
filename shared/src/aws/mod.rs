//! The AWS adapters of the ports: DynamoDB ([`dynamo`]), SQS ([`sqs`]) and Secrets Manager
//! ([`secrets`]), and the configuration the Lambda functions read from their environment.
//! Nothing here special-cases an emulator: the SDK's own `AWS_ENDPOINT_URL` points it elsewhere.

pub mod dynamo;
pub mod lambda;
pub mod provision;
pub mod secrets;
pub mod sqs;

use std::time::Duration;

use aws_config::BehaviorVersion;

pub use dynamo::DynamoStore;
pub use secrets::SecretsManagerSource;
pub use sqs::SqsQueue;

use crate::runtime::{Runtime, RuntimeConfig};
use crate::steps::ActionRegistry;

/// The runtime of the Lambda functions.
pub type AwsRuntime = Runtime<DynamoStore, SqsQueue, SecretsManagerSource>;

/// Logs to stdout the way Lambda's advanced logging controls ask: JSON when
/// `AWS_LAMBDA_LOG_FORMAT=JSON`, at `AWS_LAMBDA_LOG_LEVEL` (or `RUST_LOG`, default INFO). Fields such
/// as `run_id`, `step_id` and `attempt` stay structured.
pub fn init_logging() {
    use std::str::FromStr;
    let level = std::env::var("AWS_LAMBDA_LOG_LEVEL")
        .or_else(|_| std::env::var("RUST_LOG"))
        .ok()
        .and_then(|l| tracing_subscriber::filter::LevelFilter::from_str(&l).ok())
        .unwrap_or(tracing_subscriber::filter::LevelFilter::INFO);
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_target(false)
        .without_time();
    let json = std::env::var("AWS_LAMBDA_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("missing environment variable {name} ({what})")]
    Missing {
        name: &'static str,
        what: &'static str,
    },
    #[error("environment variable {name}={value:?} is invalid: {expected}")]
    Invalid {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
}

/// Everything the functions read from their environment, validated once at start.
#[derive(Debug, Clone, PartialEq)]
pub struct AwsConfig {
    /// `ORCHESTRA_TABLE`: the single DynamoDB table.
    pub table: String,
    /// `ORCHESTRA_QUEUE_URL`: the step queue.
    pub queue_url: String,
    /// `ORCHESTRA_SECRET_PREFIX` (default `orchestra/`): `{{ secrets.X }}` reads secret PREFIX + X.
    pub secret_prefix: String,
    /// `ORCHESTRA_SECRET_TTL_S` (default 300): how long a container caches a secret.
    pub secret_ttl: Duration,
    /// `ORCHESTRA_MAX_RECEIVES` (default 5): the queue's redrive `maxReceiveCount`; the delivery
    /// that reaches it marks the run failed before the message goes to the dead-letter queue.
    pub max_receives: u32,
    /// `ORCHESTRA_VISIBILITY_TIMEOUT_S` (default 360): the step queue's visibility timeout; a step
    /// running longer has its message's visibility extended every half of it.
    pub visibility_timeout: Duration,
    /// `ORCHESTRA_RETENTION_DAYS` (default 90): items expire (DynamoDB TTL) this long after written.
    pub retention_days: u64,
    /// `ORCHESTRA_MAX_OUTPUT_BYTES` (default 262144): larger step outputs fail the step, keeping
    /// history items under DynamoDB's 400 KB item limit.
    pub max_output_bytes: usize,
    /// `ORCHESTRA_LEASE_MARGIN_S` (default 10): a claimed attempt may be taken over this long after
    /// its timeout, when the queue delivers its task again because its worker died.
    pub lease_margin: Duration,
}

fn number<T: std::str::FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: T,
    expected: &'static str,
) -> Result<T, ConfigError> {
    match get(name) {
        None => Ok(default),
        Some(value) => value.trim().parse().map_err(|_| ConfigError::Invalid {
            name,
            value,
            expected,
        }),
    }
}

impl AwsConfig {
    pub fn from_env() -> Result<AwsConfig, ConfigError> {
        AwsConfig::from_lookup(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    /// Reads the configuration through `get` (the environment, or a map in tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<AwsConfig, ConfigError> {
        let required = |name: &'static str, what: &'static str| {
            get(name).ok_or(ConfigError::Missing { name, what })
        };
        Ok(AwsConfig {
            table: required("ORCHESTRA_TABLE", "the DynamoDB table name")?,
            queue_url: required("ORCHESTRA_QUEUE_URL", "the SQS step queue URL")?,
            secret_prefix: get("ORCHESTRA_SECRET_PREFIX").unwrap_or_else(|| "orchestra/".into()),
            secret_ttl: Duration::from_secs(number(
                &get,
                "ORCHESTRA_SECRET_TTL_S",
                300,
                "seconds",
            )?),
            max_receives: number(&get, "ORCHESTRA_MAX_RECEIVES", 5, "a positive integer")?,
            retention_days: number(&get, "ORCHESTRA_RETENTION_DAYS", 90, "days")?,
            visibility_timeout: Duration::from_secs(number(
                &get,
                "ORCHESTRA_VISIBILITY_TIMEOUT_S",
                360,
                "seconds",
            )?),
            max_output_bytes: number(&get, "ORCHESTRA_MAX_OUTPUT_BYTES", 262_144, "bytes")?,
            lease_margin: Duration::from_secs(number(
                &get,
                "ORCHESTRA_LEASE_MARGIN_S",
                10,
                "seconds",
            )?),
        })
    }

    /// Builds the runtime: SDK clients from the default chain, pinned behaviour version.
    pub async fn runtime(&self) -> AwsRuntime {
        let sdk = aws_config::defaults(BehaviorVersion::v2026_01_12())
            .load()
            .await;
        self.runtime_with(&sdk)
    }

    /// Builds the runtime on a given SDK configuration.
    pub fn runtime_with(&self, sdk: &aws_config::SdkConfig) -> AwsRuntime {
        self.runtime_from_clients(
            aws_sdk_dynamodb::Client::new(sdk),
            aws_sdk_sqs::Client::new(sdk),
            aws_sdk_secretsmanager::Client::new(sdk),
        )
    }

    /// Builds the runtime on given clients (e.g. with interceptors that count calls).
    pub fn runtime_from_clients(
        &self,
        dynamodb: aws_sdk_dynamodb::Client,
        sqs: aws_sdk_sqs::Client,
        secrets: aws_sdk_secretsmanager::Client,
    ) -> AwsRuntime {
        let store = DynamoStore::new(dynamodb, &self.table, self.retention_days);
        let queue = SqsQueue::new(sqs, &self.queue_url);
        let secrets = SecretsManagerSource::new(secrets, &self.secret_prefix, self.secret_ttl);
        let config = RuntimeConfig {
            max_output_bytes: Some(self.max_output_bytes),
            lease_margin: self.lease_margin,
            ..RuntimeConfig::default()
        };
        Runtime::new(store, queue, secrets, ActionRegistry::local(), config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn missing_variables_are_named() {
        let err = AwsConfig::from_lookup(lookup(&[("ORCHESTRA_TABLE", "t")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "missing environment variable ORCHESTRA_QUEUE_URL (the SQS step queue URL)"
        );
        let err = AwsConfig::from_lookup(lookup(&[
            ("ORCHESTRA_TABLE", "t"),
            ("ORCHESTRA_QUEUE_URL", "q"),
            ("ORCHESTRA_MAX_RECEIVES", "many"),
        ]))
        .unwrap_err();
        assert!(
            err.to_string().contains("ORCHESTRA_MAX_RECEIVES=\"many\""),
            "{err}"
        );
    }

    #[test]
    fn defaults_apply() {
        let c = AwsConfig::from_lookup(lookup(&[
            ("ORCHESTRA_TABLE", "t"),
            ("ORCHESTRA_QUEUE_URL", "q"),
        ]))
        .unwrap();
        assert_eq!(
            (c.max_receives, c.secret_prefix.as_str()),
            (5, "orchestra/")
        );
    }
}
