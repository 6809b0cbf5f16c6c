//! Static validation: everything that can be known wrong about a workflow before it runs, reported
//! with a JSON pointer, what is wrong, and how to fix it. A workflow that passes compiles into a
//! [`Plan`](crate::workflow::Plan), which the engine runs.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;

use serde_json::Value;

use crate::template;
use crate::workflow::graph::{Graph, GraphError};
use crate::workflow::{StepKind, Workflow, catalog};

/// One thing wrong with a workflow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// JSON pointer into the workflow document, e.g. `/steps/2/next_step`.
    pub pointer: String,
    pub message: String,
    pub help: String,
}

/// Everything wrong with one workflow document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationError {
    /// The file or workflow id the issues are in.
    pub source_name: String,
    pub issues: Vec<Issue>,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.issues.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            let pointer = if issue.pointer.is_empty() {
                "/"
            } else {
                &issue.pointer
            };
            write!(
                f,
                "{}:{}: error: {}\n  = help: {}",
                self.source_name, pointer, issue.message, issue.help
            )?;
        }
        Ok(())
    }
}

/// Names a template may use besides inputs, variables and step outputs.
const BUILTIN_FUNCTIONS: &[&str] = &["range", "dict", "namespace", "debug"];

struct Checker<'a> {
    wf: &'a Workflow,
    index: HashMap<&'a str, usize>,
    issues: Vec<Issue>,
}

impl<'a> Checker<'a> {
    fn push(&mut self, pointer: String, message: String, help: impl Into<String>) {
        self.issues.push(Issue {
            pointer,
            message,
            help: help.into(),
        });
    }

    fn known_ids(&self) -> String {
        let ids: Vec<&str> = self.wf.steps.iter().map(|s| s.id.as_str()).collect();
        ids.join(", ")
    }

    /// Reports a reference to a step id that does not exist; returns whether it exists.
    fn target(&mut self, pointer: String, field: &str, target: &str) -> bool {
        if self.index.contains_key(target) {
            return true;
        }
        let known = self.known_ids();
        self.push(
            pointer,
            format!("{field} refers to step '{target}', which does not exist"),
            format!("use one of the step ids: {known}"),
        );
        false
    }
}

/// Checks a parsed workflow; `source_name` labels the errors (usually the file path).
pub fn validate(wf: &Workflow, source_name: &str) -> Result<(), ValidationError> {
    let mut c = Checker {
        wf,
        index: HashMap::new(),
        issues: Vec::new(),
    };
    check_structure(&mut c);
    // Graph checks need resolvable ids; templates need the graph.
    if c.issues.is_empty() {
        match Graph::build(wf) {
            Ok(graph) => check_templates(&mut c, &graph),
            Err(GraphError::Cycle(path)) => {
                let first = path.first().map(|s| c.index[s.as_str()]).unwrap_or(0);
                c.push(
                    format!("/steps/{first}"),
                    format!("the steps form a cycle: {}", path.join(" -> ")),
                    "workflows must be acyclic: end the loop with `\"next_step\": null` or point it at a later step",
                );
            }
            Err(GraphError::Unreachable(ids)) => {
                for id in ids {
                    let i = c.index[id.as_str()];
                    c.push(
                        format!("/steps/{i}"),
                        format!("step '{id}' can never run: no step leads to it"),
                        "point a `next_step`, `choice` or `on_error` at it, give it `depends_on`, or remove it",
                    );
                }
            }
        }
    }
    if c.issues.is_empty() {
        Ok(())
    } else {
        Err(ValidationError {
            source_name: source_name.to_owned(),
            issues: c.issues,
        })
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
}

fn check_structure(c: &mut Checker<'_>) {
    let wf = c.wf;
    if wf.steps.is_empty() {
        c.push(
            "/steps".into(),
            "the workflow has no steps".into(),
            "add at least one step",
        );
    }
    for (i, step) in wf.steps.iter().enumerate() {
        let at = format!("/steps/{i}");
        if !valid_id(&step.id) {
            c.push(
                format!("{at}/id"),
                format!("step id '{}' is not a valid identifier", step.id),
                "use letters, digits, '_' and '-' only",
            );
        }
        if let Some(first) = c.index.insert(step.id.as_str(), i) {
            c.push(
                format!("{at}/id"),
                format!(
                    "duplicate step id '{}' (also used by /steps/{first})",
                    step.id
                ),
                "give every step a unique id",
            );
            c.index.insert(wf.steps[first].id.as_str(), first);
        }
    }
    for (name, spec) in &wf.inputs {
        if let Some(default) = &spec.default
            && !spec.kind.accepts(default)
        {
            c.push(
                format!("/inputs/{name}/default"),
                format!(
                    "the default of input '{name}' is not of its type {}",
                    spec.kind.name()
                ),
                "make the default match the declared type",
            );
        }
    }
    for (i, step) in wf.steps.iter().enumerate() {
        check_step(c, i, step);
    }
    check_join_targets(c);
}

/// A step with `depends_on` starts when its dependencies finish; being also the target of a
/// `next_step`, `choice` or `on_error` would give it two meanings.
fn check_join_targets(c: &mut Checker<'_>) {
    let wf = c.wf;
    for (i, step) in wf.steps.iter().enumerate() {
        let at = format!("/steps/{i}");
        let mut targets: Vec<(String, &str)> = Vec::new();
        if let Some(Some(next)) = &step.next_step {
            targets.push((format!("{at}/next_step"), next));
        }
        if let Some(target) = &step.on_error {
            targets.push((format!("{at}/on_error"), target));
        }
        if let Some(default) = &step.default {
            targets.push((format!("{at}/default"), default));
        }
        for (r, rule) in step.choices.iter().flatten().enumerate() {
            targets.push((format!("{at}/choices/{r}/next"), &rule.next));
        }
        for (pointer, target) in targets {
            let joins = c
                .index
                .get(target)
                .is_some_and(|&j| wf.steps[j].depends_on.is_some());
            if joins {
                let field = pointer.rsplit('/').next().unwrap_or_default().to_owned();
                c.push(
                    pointer,
                    format!("{field} points at '{target}', which has depends_on and so starts when its dependencies finish"),
                    format!("remove depends_on from '{target}', or add '{}' to its depends_on instead", step.id),
                );
            }
        }
    }
}

/// `github.create_issue`, or just `wait` where a type has a single action.
fn label(kind: StepKind, action: &str) -> String {
    if catalog::actions(kind).len() == 1 {
        kind.name().to_owned()
    } else {
        format!("{}.{action}", kind.name())
    }
}

fn check_step(c: &mut Checker<'_>, i: usize, step: &crate::workflow::Step) {
    let at = format!("/steps/{i}");
    let kind = step.kind;
    if kind == StepKind::Choice {
        match &step.choices {
            Some(rules) if !rules.is_empty() => {
                for (r, rule) in rules.iter().enumerate() {
                    c.target(format!("{at}/choices/{r}/next"), "choice rule", &rule.next);
                }
            }
            _ => c.push(
                format!("{at}/choices"),
                format!("choice step '{}' has no `choices`", step.id),
                "add rules like [{\"when\": \"inputs.x == 1\", \"next\": \"step_id\"}]",
            ),
        }
        if let Some(default) = &step.default {
            c.target(format!("{at}/default"), "choice default", default);
        }
        for (field, set) in [
            ("next_step", step.next_step.is_some()),
            ("params", !step.params.is_empty()),
            ("for_each", step.for_each.is_some()),
            ("retry", step.retry.is_some()),
            ("action", step.action.is_some()),
        ] {
            if set {
                c.push(
                    format!("{at}/{field}"),
                    format!("a choice step does not take `{field}`"),
                    "route with `choices` and `default`; do work in the steps they lead to",
                );
            }
        }
    } else {
        if step.choices.is_some() || step.default.is_some() {
            c.push(
                format!("{at}/choices"),
                format!(
                    "`choices`/`default` belong to choice steps, and '{}' is a {} step",
                    step.id,
                    kind.name()
                ),
                "use \"type\": \"choice\" or remove them",
            );
        }
        check_action(c, &at, step);
    }
    if let Some(Some(next)) = &step.next_step {
        c.target(format!("{at}/next_step"), "next_step", next);
    }
    if let Some(target) = &step.on_error {
        c.target(format!("{at}/on_error"), "on_error", target);
        if step.continue_on_error {
            c.push(
                format!("{at}/continue_on_error"),
                "`on_error` and `continue_on_error` both say what to do on failure".into(),
                "keep one of them",
            );
        }
    }
    if let Some(deps) = &step.depends_on {
        for (d, dep) in deps.iter().enumerate() {
            if c.target(format!("{at}/depends_on/{d}"), "depends_on", dep) && dep == &step.id {
                c.push(
                    format!("{at}/depends_on/{d}"),
                    format!("step '{}' depends on itself", step.id),
                    "remove it from its own depends_on",
                );
            }
        }
    }
    if let Some(retry) = &step.retry {
        if retry.max_attempts == 0 {
            c.push(
                format!("{at}/retry/max_attempts"),
                "max_attempts must be at least 1 (it counts the first attempt)".into(),
                "use 1 for no retries, 3 for two retries",
            );
        }
        if !(retry.initial_delay_s >= 0.0 && retry.max_delay_s >= retry.initial_delay_s) {
            c.push(
                format!("{at}/retry"),
                "retry delays must satisfy 0 <= initial_delay_s <= max_delay_s".into(),
                "e.g. \"initial_delay_s\": 1, \"max_delay_s\": 60",
            );
        }
    }
    if let Some(t) = step.timeout_s
        && !(t > 0.0 && t.is_finite())
    {
        c.push(
            format!("{at}/timeout_s"),
            format!("timeout_s must be a positive number of seconds, not {t}"),
            "e.g. \"timeout_s\": 30",
        );
    }
    match &step.for_each {
        None | Some(Value::Array(_)) => {}
        Some(Value::String(s)) if template::is_templated(s) => {}
        Some(_) => c.push(
            format!("{at}/for_each"),
            "for_each must be a JSON array or a template that evaluates to one".into(),
            "e.g. \"for_each\": \"{{ steps.list.output.items }}\"",
        ),
    }
    if step.max_concurrency == Some(0) {
        c.push(
            format!("{at}/max_concurrency"),
            "max_concurrency must be at least 1".into(),
            "leave it out for the default of 10",
        );
    }
}

fn check_action(c: &mut Checker<'_>, at: &str, step: &crate::workflow::Step) {
    let kind = step.kind;
    let names: Vec<&str> = catalog::actions(kind).iter().map(|a| a.name).collect();
    let Some(action) = step.action_name() else {
        c.push(
            format!("{at}/action"),
            format!("{} step '{}' needs an `action`", kind.name(), step.id),
            format!("one of: {}", names.join(", ")),
        );
        return;
    };
    let Some(spec) = catalog::find(kind, action) else {
        c.push(
            format!("{at}/action"),
            format!("unknown action '{action}' for step type '{}'", kind.name()),
            format!("one of: {}", names.join(", ")),
        );
        return;
    };
    for required in spec.required {
        if !step.params.contains_key(*required) {
            c.push(
                format!("{at}/params"),
                format!(
                    "{} step '{}' is missing required param '{required}'",
                    label(kind, action),
                    step.id
                ),
                format!("add \"{required}\" to params"),
            );
        }
    }
    if !spec.one_of.is_empty() && !spec.one_of.iter().any(|p| step.params.contains_key(*p)) {
        c.push(
            format!("{at}/params"),
            format!(
                "{} step '{}' needs one of the params: {}",
                label(kind, action),
                step.id,
                spec.one_of.join(", ")
            ),
            format!("add \"{}\" to params", spec.one_of[0]),
        );
    }
    for name in step.params.keys() {
        if !spec.accepts(name) {
            c.push(
                format!("{at}/params/{name}"),
                format!("unknown param '{name}' for {}", label(kind, action)),
                format!("accepted params: {}", spec.all_params().join(", ")),
            );
        }
    }
}

/// The template texts of a step, each with its pointer, and whether `item`/`index` are in scope.
fn step_templates(step: &crate::workflow::Step, at: &str) -> Vec<(String, String, TemplateKind)> {
    let mut out = Vec::new();
    let mut strings = Vec::new();
    let params = Value::Object(step.params.clone());
    template::strings_in(&params, &format!("{at}/params"), &mut strings);
    for (p, s) in strings {
        out.push((p, s.to_owned(), TemplateKind::Param));
    }
    if let Some(when) = &step.when {
        out.push((format!("{at}/when"), when.clone(), TemplateKind::Condition));
    }
    if let Some(Value::String(s)) = &step.for_each {
        out.push((format!("{at}/for_each"), s.clone(), TemplateKind::Outside));
    }
    for (r, rule) in step.choices.iter().flatten().enumerate() {
        out.push((
            format!("{at}/choices/{r}/when"),
            rule.when.clone(),
            TemplateKind::Condition,
        ));
    }
    out
}

#[derive(Clone, Copy, PartialEq)]
enum TemplateKind {
    /// A parameter: `item`/`index` are in scope on for_each steps.
    Param,
    /// A condition: evaluated before any item exists.
    Condition,
    /// `for_each` itself.
    Outside,
}

fn check_templates(c: &mut Checker<'_>, graph: &Graph) {
    let wf = c.wf;
    let declared: HashSet<&str> = wf
        .inputs
        .keys()
        .map(String::as_str)
        .chain(wf.variables.keys().map(String::as_str))
        .collect();
    for (i, step) in wf.steps.iter().enumerate() {
        let at = format!("/steps/{i}");
        let ancestors = graph.ancestors(i);
        let error_in_scope = graph.error_in_scope(i);
        for (pointer, text, kind) in step_templates(step, &at) {
            let refs = match kind {
                TemplateKind::Condition => template::condition_references(&text),
                _ => template::references(&text),
            };
            let refs = match refs {
                Ok(r) => r,
                Err(e) => {
                    c.push(
                        pointer,
                        e.to_string(),
                        "templates use Jinja syntax: {{ inputs.name }}, {{ steps.id.output.field }}",
                    );
                    continue;
                }
            };
            let item_ok = kind == TemplateKind::Param && step.for_each.is_some();
            for r in refs {
                if let Some(problem) = check_reference(
                    c,
                    &r,
                    &declared,
                    &ancestors,
                    item_ok,
                    error_in_scope,
                    &step.id,
                ) {
                    c.push(pointer.clone(), problem.0, problem.1);
                }
            }
        }
    }
    if let Some(output) = &wf.output {
        let mut strings = Vec::new();
        template::strings_in(output, "/output", &mut strings);
        let all: BTreeSet<usize> = (0..wf.steps.len()).collect();
        for (pointer, text) in strings {
            match template::references(text) {
                Err(e) => c.push(
                    pointer,
                    e.to_string(),
                    "templates use Jinja syntax: {{ steps.id.output }}",
                ),
                Ok(refs) => {
                    for r in refs {
                        if let Some(problem) =
                            check_reference(c, &r, &declared, &all, false, false, "output")
                        {
                            c.push(pointer.clone(), problem.0, problem.1);
                        }
                    }
                }
            }
        }
    }
}

/// Returns (message, help) when a reference cannot resolve.
fn check_reference(
    c: &Checker<'_>,
    reference: &str,
    declared: &HashSet<&str>,
    ancestors: &BTreeSet<usize>,
    item_ok: bool,
    error_ok: bool,
    from: &str,
) -> Option<(String, String)> {
    let mut parts = reference.split('.');
    let head = parts.next().unwrap_or_default();
    let second = parts.next();
    let step_ref = |id: &str| -> Option<(String, String)> {
        match c.index.get(id) {
            None => Some((
                format!("'{reference}' refers to step '{id}', which does not exist"),
                format!("use one of the step ids: {}", c.known_ids()),
            )),
            Some(j) if !ancestors.contains(j) => Some((
                format!(
                    "'{reference}' uses the output of step '{id}', which cannot have run before '{from}'"
                ),
                format!(
                    "make '{from}' run after '{id}' (next_step or depends_on), or drop the reference"
                ),
            )),
            Some(_) => None,
        }
    };
    match head {
        "steps" => second.and_then(step_ref),
        "inputs" => match second {
            Some(name) if !declared.contains(name) => Some((
                format!("'{reference}' refers to input '{name}', which is not declared"),
                format!(
                    "declare it under \"inputs\" (or \"variables\"); declared: {}",
                    {
                        let mut d: Vec<&&str> = declared.iter().collect();
                        d.sort();
                        d.iter().map(|s| **s).collect::<Vec<_>>().join(", ")
                    }
                ),
            )),
            _ => None,
        },
        "secrets" | "run" => None,
        "item" | "index" if item_ok => None,
        "item" | "index" => Some((
            format!("'{head}' is only defined in the params of a for_each step"),
            "add \"for_each\" to this step, or use a step output instead".into(),
        )),
        "error" if error_ok => None,
        "error" => Some((
            "'error' is only defined in steps reached through on_error".into(),
            "point another step's \"on_error\" at this one".into(),
        )),
        name if declared.contains(name) || BUILTIN_FUNCTIONS.contains(&name) => None,
        name => match name.strip_suffix("_output") {
            Some(id) if c.index.contains_key(id) => step_ref(id),
            _ => Some((
                format!("'{name}' is not an input, a variable or a step output"),
                "declare it under \"inputs\" or \"variables\", or use steps.ID.output".into(),
            )),
        },
    }
}
