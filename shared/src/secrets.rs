//! Secrets from the process environment, with an optional `.env` file as a fallback, and the
//! redaction that keeps their values out of outputs, history and logs.

use std::collections::HashMap;
#[cfg(feature = "local")]
use std::path::Path;

use serde_json::Value;

use crate::ports::{SecretError, SecretSource};

/// Environment variables first, then the `.env` file read at start.
#[derive(Debug, Clone, Default)]
pub struct EnvSecrets {
    dotenv: HashMap<String, String>,
}

impl EnvSecrets {
    /// Reads `.env` from `dir` if there is one.
    #[cfg(feature = "local")]
    pub fn from_dir(dir: &Path) -> Result<EnvSecrets, SecretError> {
        let path = dir.join(".env");
        let mut dotenv = HashMap::new();
        if path.is_file() {
            let iter = dotenvy::from_path_iter(&path)
                .map_err(|e| SecretError::Backend(format!("{}: {e}", path.display())))?;
            for item in iter {
                let (k, v) =
                    item.map_err(|e| SecretError::Backend(format!("{}: {e}", path.display())))?;
                dotenv.insert(k, v);
            }
        }
        Ok(EnvSecrets { dotenv })
    }
}

impl SecretSource for EnvSecrets {
    async fn get(&self, name: &str) -> Result<Option<String>, SecretError> {
        Ok(std::env::var(name)
            .ok()
            .or_else(|| self.dotenv.get(name).cloned()))
    }
}

/// Replaces secret values wherever they appear.
#[derive(Debug, Default, Clone)]
pub struct Redactor {
    values: Vec<String>,
}

pub const REDACTED: &str = "[REDACTED]";

impl Redactor {
    pub fn new(values: impl IntoIterator<Item = String>) -> Redactor {
        // Longest first, so a secret that contains another is replaced whole. Very short values
        // would shred ordinary text and are not credentials anyone should use.
        let mut values: Vec<String> = values.into_iter().filter(|v| v.len() >= 4).collect();
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        values.dedup();
        Redactor { values }
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn redact_str(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for v in &self.values {
            if out.contains(v.as_str()) {
                out = out.replace(v.as_str(), REDACTED);
            }
        }
        out
    }

    pub fn redact_value(&self, value: &mut Value) {
        if self.values.is_empty() {
            return;
        }
        match value {
            Value::String(s) => *s = self.redact_str(s),
            Value::Array(items) => items.iter_mut().for_each(|v| self.redact_value(v)),
            Value::Object(map) => map.values_mut().for_each(|v| self.redact_value(v)),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn redaction_replaces_secret_values_everywhere_in_a_value() {
        let r = Redactor::new(["s3cr3t-token".to_string()]);
        let mut v = json!({"a": "Bearer s3cr3t-token", "b": ["x s3cr3t-token y"], "c": 1});
        r.redact_value(&mut v);
        assert_eq!(
            v,
            json!({"a": "Bearer [REDACTED]", "b": ["x [REDACTED] y"], "c": 1})
        );
    }

    #[cfg(feature = "local")]
    #[tokio::test]
    async fn dotenv_file_supplies_secrets_missing_from_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".env"), "ORCH_TEST_DOTENV_ONLY=from-file\n").unwrap();
        let s = EnvSecrets::from_dir(dir.path()).unwrap();
        assert_eq!(
            s.get("ORCH_TEST_DOTENV_ONLY").await.unwrap().as_deref(),
            Some("from-file")
        );
        assert_eq!(s.get("ORCH_TEST_SURELY_UNSET").await.unwrap(), None);
    }
}
