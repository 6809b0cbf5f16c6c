//! `{{ templates }}` in step parameters, conditions and outputs, on minijinja with strict undefined
//! errors. A string that is exactly one `{{ expression }}` evaluates to a JSON value of its own type
//! (an object stays an object); any other string renders to a string. Rendering is pure: it never
//! reaches outside the context it is given.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use minijinja::{Environment, UndefinedBehavior, Value as JinjaValue};
use serde_json::Value;

/// Fuel bounds the work one template may do, so a runaway loop in a workflow cannot stall a worker.
const FUEL: u64 = 200_000;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TemplateError {
    #[error("template syntax error in `{source_text}`: {detail}")]
    Syntax { source_text: String, detail: String },
    #[error("cannot evaluate `{source_text}`: {detail}")]
    Render { source_text: String, detail: String },
}

fn env() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_fuel(Some(FUEL));
        env.add_filter("fromjson", fromjson);
        env
    })
}

/// Parses a JSON string, e.g. a model's JSON answer: `{{ steps.ask.output.text | fromjson }}`.
fn fromjson(text: String) -> Result<JinjaValue, minijinja::Error> {
    serde_json::from_str::<Value>(&text)
        .map(|v| JinjaValue::from(minijinja::value::Serde(v)))
        .map_err(|e| {
            minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                format!("fromjson: not JSON: {e}"),
            )
        })
}

fn describe(err: &minijinja::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// Whether a string holds any template syntax at all (plain strings skip the engine).
pub fn is_templated(text: &str) -> bool {
    text.contains("{{") || text.contains("{%") || text.contains("{#")
}

/// The expression inside a string that is exactly `{{ expression }}`.
fn whole_expression(text: &str) -> Option<&str> {
    let inner = text.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    if inner.contains("{{") || inner.contains("}}") || inner.contains("{%") {
        return None;
    }
    Some(inner.trim())
}

/// A condition may be written bare (`x > 1`) or wrapped (`{{ x > 1 }}`).
fn condition_expression(text: &str) -> &str {
    whole_expression(text).unwrap_or(text.trim())
}

/// Renders one string against `ctx`.
pub fn render_str(text: &str, ctx: &JinjaValue) -> Result<Value, TemplateError> {
    if !is_templated(text) {
        return Ok(Value::String(text.to_owned()));
    }
    let env = env();
    if let Some(expr) = whole_expression(text) {
        let compiled = env.compile_expression(expr).map_err(|e| syntax(text, &e))?;
        let value = compiled.eval(ctx.clone()).map_err(|e| render(text, &e))?;
        return serde_json::to_value(&value).map_err(|e| TemplateError::Render {
            source_text: text.to_owned(),
            detail: e.to_string(),
        });
    }
    let template = env.template_from_str(text).map_err(|e| syntax(text, &e))?;
    template
        .render(ctx.clone())
        .map(Value::String)
        .map_err(|e| render(text, &e))
}

/// Renders every string inside a JSON value (object keys are left as written).
pub fn render_value(value: &Value, ctx: &JinjaValue) -> Result<Value, TemplateError> {
    Ok(match value {
        Value::String(s) => render_str(s, ctx)?,
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| render_value(v, ctx))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), render_value(v, ctx)?)))
                .collect::<Result<_, TemplateError>>()?,
        ),
        other => other.clone(),
    })
}

/// Evaluates a `when`-style condition to a truth value (Jinja truthiness).
pub fn eval_condition(text: &str, ctx: &JinjaValue) -> Result<bool, TemplateError> {
    let expr = condition_expression(text);
    let compiled = env()
        .compile_expression(expr)
        .map_err(|e| syntax(text, &e))?;
    compiled
        .eval(ctx.clone())
        .map(|v| v.is_true())
        .map_err(|e| render(text, &e))
}

/// The variables a template string refers to, as dotted paths (`steps.fetch.output`, `inputs.x`).
/// Fails on a syntax error, which is how validation finds them.
pub fn references(text: &str) -> Result<BTreeSet<String>, TemplateError> {
    if !is_templated(text) {
        return Ok(BTreeSet::new());
    }
    let env = env();
    let names = if let Some(expr) = whole_expression(text) {
        env.compile_expression(expr)
            .map_err(|e| syntax(text, &e))?
            .undeclared_variables(true)
    } else {
        env.template_from_str(text)
            .map_err(|e| syntax(text, &e))?
            .undeclared_variables(true)
    };
    Ok(names.into_iter().collect())
}

/// The references of a condition (`when`, choice rules).
pub fn condition_references(text: &str) -> Result<BTreeSet<String>, TemplateError> {
    let expr = condition_expression(text);
    let compiled = env()
        .compile_expression(expr)
        .map_err(|e| syntax(text, &e))?;
    Ok(compiled.undeclared_variables(true).into_iter().collect())
}

/// Every template string inside a JSON value, with its JSON pointer below `base`.
pub fn strings_in<'a>(value: &'a Value, base: &str, out: &mut Vec<(String, &'a str)>) {
    match value {
        Value::String(s) => out.push((base.to_owned(), s)),
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                strings_in(v, &format!("{base}/{i}"), out);
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                let key = k.replace('~', "~0").replace('/', "~1");
                strings_in(v, &format!("{base}/{key}"), out);
            }
        }
        _ => {}
    }
}

fn syntax(text: &str, err: &minijinja::Error) -> TemplateError {
    TemplateError::Syntax {
        source_text: text.to_owned(),
        detail: describe(err),
    }
}

fn render(text: &str, err: &minijinja::Error) -> TemplateError {
    TemplateError::Render {
        source_text: text.to_owned(),
        detail: describe(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx(v: Value) -> JinjaValue {
        JinjaValue::from(minijinja::value::Serde(v))
    }

    #[test]
    fn whole_value_substitution_keeps_json_types() {
        let c = ctx(json!({"steps": {"fetch": {"output": {"n": 3, "list": [1, 2]}}}}));
        assert_eq!(
            render_str("{{ steps.fetch.output }}", &c).unwrap(),
            json!({"n": 3, "list": [1, 2]})
        );
        assert_eq!(
            render_str("{{steps.fetch.output.n}}", &c).unwrap(),
            json!(3)
        );
    }

    #[test]
    fn templates_inside_longer_strings_render_to_text() {
        let c = ctx(json!({"task_description": "deploy"}));
        assert_eq!(
            render_str("Add SOP: {{task_description}}", &c).unwrap(),
            json!("Add SOP: deploy")
        );
    }

    #[test]
    fn indexed_paths_and_filters_work() {
        let c = ctx(json!({"steps": {"f": {"output": {"messages": [{"subject": "hi"}]}}}}));
        assert_eq!(
            render_str("{{ steps.f.output.messages[0].subject | upper }}", &c).unwrap(),
            json!("HI")
        );
        assert_eq!(
            render_str("{{ '{\"a\": 1}' | fromjson }}", &c).unwrap(),
            json!({"a": 1})
        );
    }

    #[test]
    fn undefined_names_are_errors_not_empty_strings() {
        let c = ctx(json!({"inputs": {}}));
        let err = render_str("hello {{ inputs.missing }}", &c).unwrap_err();
        assert!(matches!(err, TemplateError::Render { .. }), "{err}");
    }

    #[test]
    fn references_lists_dotted_paths() {
        let refs = references("{{ steps.a.output.x }} and {{ inputs.y }}").unwrap();
        assert!(refs.contains("steps.a.output.x"), "{refs:?}");
        assert!(refs.contains("inputs.y"), "{refs:?}");
        assert!(references("{{ oops(").is_err());
    }

    #[test]
    fn conditions_accept_bare_and_wrapped_forms() {
        let c = ctx(json!({"n": 2}));
        assert!(eval_condition("n > 1", &c).unwrap());
        assert!(!eval_condition("{{ n > 5 }}", &c).unwrap());
    }
}
