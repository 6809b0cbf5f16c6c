//! The JSON Schema of the workflow language, generated from the serde types so it cannot drift.
//! `workflows/schema.json` is this, committed; a test fails when the file is stale.

use crate::workflow::Workflow;

/// The schema as pretty JSON with a trailing newline, as written to `workflows/schema.json`.
pub fn workflow_schema_json() -> String {
    let mut schema = schemars::schema_for!(Workflow);
    schema.insert(
        "title".into(),
        serde_json::Value::String("AI-Orchestra workflow".into()),
    );
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}
