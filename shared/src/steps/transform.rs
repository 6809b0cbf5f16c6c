//! `transform`: build JSON from templates (`build`), and the original format's `extract` (a field of
//! a named value) and `format` (Python-style `{name}` placeholders).

use serde_json::Value;

use crate::failure::StepError;
use crate::steps::{StepAction, StepCall, StepFuture};

pub struct Transform;

impl StepAction for Transform {
    fn execute<'a>(&'a self, call: StepCall<'a>) -> StepFuture<'a> {
        Box::pin(async move {
            match call.action {
                "build" => Ok(call.param("value").cloned().unwrap_or(Value::Null)),
                "extract" => extract(&call),
                "format" => format(&call),
                other => Err(StepError::permanent(format!(
                    "transform has no action '{other}'"
                ))),
            }
        })
    }
}

/// `source` names a variable or `<step>_output`; the output is its field `key`.
fn extract(call: &StepCall<'_>) -> Result<Value, StepError> {
    let source = call.required_str("source")?;
    let key = call.required_str("key")?;
    let value = call.scope.get(source).ok_or_else(|| {
        StepError::permanent(format!(
            "transform.extract: source '{source}' is not a variable or a finished step's output"
        ))
    })?;
    let value = match value {
        // The original engine accepted JSON text as a source.
        Value::String(text) => serde_json::from_str::<Value>(text).unwrap_or(Value::Null),
        other => other.clone(),
    };
    value.get(key).cloned().ok_or_else(|| {
        StepError::permanent(format!(
            "transform.extract: '{source}' has no field '{key}'"
        ))
    })
}

/// Replaces `{name}` with the named variable or output; `{{` and `}}` are literal braces.
fn format(call: &StepCall<'_>) -> Result<Value, StepError> {
    let template = call.required_str("template")?;
    let mut out = String::with_capacity(template.len());
    let mut chars = template.chars().peekable();
    while let Some(ch) = chars.next() {
        match ch {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                out.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                out.push('}');
            }
            '{' => {
                let name: String = chars.by_ref().take_while(|c| *c != '}').collect();
                let value = call.scope.get(name.trim()).ok_or_else(|| {
                    StepError::permanent(format!(
                        "transform.format: '{{{name}}}' is not a variable or a finished step's output"
                    ))
                })?;
                match value {
                    Value::String(s) => out.push_str(s),
                    other => out.push_str(&other.to_string()),
                }
            }
            other => out.push(other),
        }
    }
    Ok(Value::String(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::Redactor;
    use serde_json::{Map, json};

    fn call<'a>(
        action: &'a str,
        params: Value,
        scope: &'a Map<String, Value>,
        r: &'a Redactor,
    ) -> StepCall<'a> {
        StepCall {
            run_id: "r",
            step_id: "s",
            action,
            params: params.as_object().cloned().unwrap_or_default(),
            scope,
            attempt: 1,
            index: None,
            redactor: r,
        }
    }

    #[tokio::test]
    async fn extract_reads_a_field_of_a_step_output() {
        let scope = json!({"fetch_output": {"subject": "Hi"}})
            .as_object()
            .cloned()
            .unwrap();
        let r = Redactor::default();
        let out = Transform
            .execute(call(
                "extract",
                json!({"source": "fetch_output", "key": "subject"}),
                &scope,
                &r,
            ))
            .await
            .unwrap();
        assert_eq!(out, json!("Hi"));
    }

    #[tokio::test]
    async fn format_fills_python_style_placeholders() {
        let scope = json!({"name": "Ada", "n": 2}).as_object().cloned().unwrap();
        let r = Redactor::default();
        let out = Transform
            .execute(call(
                "format",
                json!({"template": "{name} has {n} {{braces}}"}),
                &scope,
                &r,
            ))
            .await
            .unwrap();
        assert_eq!(out, json!("Ada has 2 {braces}"));
        let err = Transform
            .execute(call("format", json!({"template": "{nope}"}), &scope, &r))
            .await
            .unwrap_err();
        assert!(err.message.contains("nope"), "{err}");
    }
}
