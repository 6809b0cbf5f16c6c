//! A run's inputs: the workflow's variable defaults and input defaults, overridden by the caller's
//! values, checked against the declared types before anything runs.

use serde_json::{Map, Value};

use crate::workflow::{InputType, Workflow};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid inputs for workflow '{workflow}':\n  - {}", problems.join("\n  - "))]
pub struct InputError {
    pub workflow: String,
    pub problems: Vec<String>,
}

/// Merges defaults and given values; fails on missing required, unknown or mistyped inputs.
pub fn resolve_inputs(
    wf: &Workflow,
    given: Map<String, Value>,
) -> Result<Map<String, Value>, InputError> {
    let mut out = wf.variables.clone();
    let mut problems = Vec::new();
    for (name, spec) in &wf.inputs {
        if let Some(default) = &spec.default {
            out.insert(name.clone(), default.clone());
        }
    }
    for (name, value) in given {
        if let Some(spec) = wf.inputs.get(&name) {
            if !spec.kind.accepts(&value) {
                problems.push(format!(
                    "'{name}' must be of type {}, got {value}",
                    spec.kind.name()
                ));
            }
        } else if !wf.variables.contains_key(&name) {
            let mut known: Vec<&str> = wf
                .inputs
                .keys()
                .chain(wf.variables.keys())
                .map(String::as_str)
                .collect();
            known.sort_unstable();
            problems.push(format!(
                "'{name}' is not an input of this workflow (declared: {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ));
        }
        out.insert(name, value);
    }
    for (name, spec) in &wf.inputs {
        if spec.required && !out.contains_key(name) {
            let about = spec
                .description
                .as_deref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default();
            problems.push(format!(
                "'{name}' is required{about}: pass --input {name}=VALUE"
            ));
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(InputError {
            workflow: wf.id.clone(),
            problems,
        })
    }
}

/// Turns a command-line `name=text` into a value of the input's declared type: JSON for numbers,
/// booleans, objects and lists; the text itself for strings.
pub fn coerce_input(wf: &Workflow, name: &str, text: &str) -> Value {
    let kind = wf.inputs.get(name).map(|s| s.kind);
    match kind {
        Some(InputType::String) => Value::String(text.to_owned()),
        Some(_) => serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned())),
        // Original-format variables: strings unless the default says otherwise.
        None => match wf.variables.get(name) {
            Some(Value::String(_)) | None => Value::String(text.to_owned()),
            Some(_) => {
                serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workflow::parse;
    use serde_json::json;

    fn wf() -> Workflow {
        parse(
            r#"{"id":"w","inputs":{"n":{"type":"integer","required":true},"who":{"default":"world"}},
                "variables":{"greeting":"hi"},"steps":[{"id":"a","type":"log","params":{"message":"x"}}]}"#,
            "w",
        )
        .unwrap()
    }

    #[test]
    fn defaults_apply_and_given_values_override() {
        let out = resolve_inputs(
            &wf(),
            json!({"n": 2, "greeting": "yo"})
                .as_object()
                .cloned()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            Value::Object(out),
            json!({"greeting": "yo", "who": "world", "n": 2})
        );
    }

    #[test]
    fn missing_unknown_and_mistyped_inputs_are_all_reported() {
        let err =
            resolve_inputs(&wf(), json!({"nmae": 1}).as_object().cloned().unwrap()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("'nmae' is not an input"), "{text}");
        assert!(text.contains("'n' is required"), "{text}");
        let err =
            resolve_inputs(&wf(), json!({"n": "two"}).as_object().cloned().unwrap()).unwrap_err();
        assert!(
            err.to_string().contains("'n' must be of type integer"),
            "{err}"
        );
    }

    #[test]
    fn command_line_values_take_the_declared_type() {
        assert_eq!(coerce_input(&wf(), "n", "3"), json!(3));
        assert_eq!(coerce_input(&wf(), "who", "3"), json!("3"));
    }
}
