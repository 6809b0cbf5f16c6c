//! `log`: writes a message to the run's log (and its output), at `level` info, warn or error.

use serde_json::json;

use crate::steps::{StepAction, StepCall, StepFuture};

pub struct Log;

impl StepAction for Log {
    fn execute<'a>(&'a self, call: StepCall<'a>) -> StepFuture<'a> {
        Box::pin(async move {
            let message = match call.param("message") {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => String::new(),
            };
            let message = call.redactor.redact_str(&message);
            let level = call.str_param("level")?.unwrap_or("info");
            let (run_id, step_id) = (call.run_id, call.step_id);
            match level {
                "error" => tracing::error!(run_id, step_id, message = %message, "workflow log"),
                "warn" => tracing::warn!(run_id, step_id, message = %message, "workflow log"),
                _ => tracing::info!(run_id, step_id, message = %message, "workflow log"),
            }
            Ok(json!({ "message": message, "level": level }))
        })
    }
}
