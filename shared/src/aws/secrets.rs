//! [`SecretSource`] on AWS Secrets Manager. `{{ secrets.NAME }}` reads the secret `PREFIX + NAME`;
//! a source name `secret#key` picks one key of a JSON secret. Values are cached per container for a
//! TTL and never logged.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aws_sdk_secretsmanager::Client;
use aws_sdk_secretsmanager::operation::get_secret_value::GetSecretValueError;

use crate::ports::{SecretError, SecretSource};

pub struct SecretsManagerSource {
    client: Client,
    prefix: String,
    ttl: Duration,
    cache: Mutex<HashMap<String, (Instant, Option<String>)>>,
}

impl SecretsManagerSource {
    pub fn new(client: Client, prefix: &str, ttl: Duration) -> SecretsManagerSource {
        SecretsManagerSource {
            client,
            prefix: prefix.to_owned(),
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    async fn fetch(&self, id: &str) -> Result<Option<String>, SecretError> {
        match self.client.get_secret_value().secret_id(id).send().await {
            Ok(out) => match out.secret_string() {
                Some(s) => Ok(Some(s.to_owned())),
                None => Err(SecretError::Backend(format!(
                    "secret {id} has no string value (binary secrets are not supported)"
                ))),
            },
            Err(err) => match err.into_service_error() {
                GetSecretValueError::ResourceNotFoundException(_) => Ok(None),
                other => Err(SecretError::Backend(format!(
                    "reading secret {id} failed: {other}"
                ))),
            },
        }
    }
}

impl SecretSource for SecretsManagerSource {
    async fn get(&self, name: &str) -> Result<Option<String>, SecretError> {
        let (secret, key) = match name.split_once('#') {
            Some((s, k)) => (s, Some(k)),
            None => (name, None),
        };
        let id = format!("{}{secret}", self.prefix);
        let cached = self
            .cache
            .lock()
            .ok()
            .and_then(|c| c.get(&id).cloned())
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, v)| v);
        let value = match cached {
            Some(v) => v,
            None => {
                let v = self.fetch(&id).await?;
                if let Ok(mut c) = self.cache.lock() {
                    c.insert(id.clone(), (Instant::now(), v.clone()));
                }
                v
            }
        };
        let Some(key) = key else {
            return Ok(value);
        };
        let Some(value) = value else {
            return Ok(None);
        };
        // A JSON secret: pick one key. The error never includes the value.
        let doc: serde_json::Value = serde_json::from_str(&value).map_err(|_| {
            SecretError::Backend(format!(
                "secret {id} is not a JSON object, so '#{key}' cannot be read"
            ))
        })?;
        Ok(doc.get(key).map(|v| match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        }))
    }
}
