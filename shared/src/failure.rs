//! How a step attempt fails. Failures are classified where they happen (an HTTP 429 is
//! `rate_limited` at the HTTP client, not guessed from a message later), and the class decides
//! whether a retry policy retries it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// The service asked us to slow down (HTTP 429); `retry_after_ms` may say for how long.
    RateLimited,
    /// The attempt took longer than the step's `timeout_s`.
    Timeout,
    /// Worth retrying: a 5xx, a dropped connection.
    Transient,
    /// Retrying will not help: bad input, a 4xx, a template error.
    Permanent,
}

impl ErrorClass {
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::RateLimited => "rate_limited",
            ErrorClass::Timeout => "timeout",
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
        }
    }
}

/// A failed step attempt, as recorded in the history and shown as `{{error}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{} error: {message}", class.name())]
pub struct StepError {
    pub class: ErrorClass,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// Structured detail, e.g. the HTTP status and body of a failed request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

impl StepError {
    pub fn new(class: ErrorClass, message: impl Into<String>) -> StepError {
        StepError {
            class,
            message: message.into(),
            retry_after_ms: None,
            details: None,
        }
    }

    pub fn permanent(message: impl Into<String>) -> StepError {
        StepError::new(ErrorClass::Permanent, message)
    }

    pub fn transient(message: impl Into<String>) -> StepError {
        StepError::new(ErrorClass::Transient, message)
    }

    pub fn with_details(mut self, details: Value) -> StepError {
        self.details = Some(details);
        self
    }
}
