//! Workflows: the language ([`model`]), what each step type accepts ([`catalog`]), the flow graph
//! ([`graph`]), static validation ([`validate`]) and loading from files. A workflow that loads and
//! validates becomes a [`Plan`], the only form the engine runs.

pub mod catalog;
pub mod graph;
pub mod model;
pub mod validate;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use graph::Graph;
pub use model::*;
pub use validate::{Issue, ValidationError, validate};

use crate::template;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read workflow file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no workflow with id '{id}' in {dir} (looked for {dir}/{id}.json and every *.json there)"
    )]
    NotFound { id: String, dir: PathBuf },
    #[error(transparent)]
    Invalid(#[from] ValidationError),
}

/// Parses workflow JSON, turning syntax and shape errors into issues with a JSON pointer.
pub fn parse(text: &str, source_name: &str) -> Result<Workflow, ValidationError> {
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize::<_, Workflow>(&mut de).map_err(|err| {
        let pointer = pointer_of(err.path());
        let inner = err.into_inner();
        let help = if inner.is_syntax() || inner.is_eof() {
            "fix the JSON syntax at that line and column".to_owned()
        } else if inner.to_string().contains("unknown field") {
            "remove the field or fix its spelling; workflows/schema.json lists every field"
                .to_owned()
        } else if inner.to_string().contains("unknown variant") {
            "use one of the values listed; workflows/schema.json lists them".to_owned()
        } else {
            "see workflows/schema.json for the expected shape".to_owned()
        };
        ValidationError {
            source_name: source_name.to_owned(),
            issues: vec![Issue {
                pointer,
                message: inner.to_string(),
                help,
            }],
        }
    })
}

fn pointer_of(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("/{index}")),
            Segment::Map { key } => {
                out.push('/');
                out.push_str(&key.replace('~', "~0").replace('/', "~1"));
            }
            Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    out
}

/// A validated workflow with its flow graph and what each step's templates refer to, shared by
/// every run of it.
#[derive(Debug, Clone)]
pub struct Plan {
    pub workflow: Arc<Workflow>,
    pub graph: Graph,
    refs: Vec<StepRefs>,
}

/// What one step's templates read, so a render context holds only that.
#[derive(Debug, Clone, Default)]
pub struct StepRefs {
    /// Steps whose outputs are read.
    pub steps: BTreeSet<usize>,
    /// A template reads `steps` as a whole, so every output must be present.
    pub all_steps: bool,
    /// Secret names read as `secrets.NAME`.
    pub secrets: BTreeSet<String>,
}

impl Plan {
    /// Validates and compiles a parsed workflow.
    pub fn compile(workflow: Workflow, source_name: &str) -> Result<Plan, ValidationError> {
        validate(&workflow, source_name)?;
        let graph = Graph::build(&workflow).map_err(|e| ValidationError {
            source_name: source_name.to_owned(),
            issues: vec![Issue {
                pointer: "/steps".into(),
                message: format!("{e:?}"),
                help: "validation should have caught this; please report it".into(),
            }],
        })?;
        let refs = workflow
            .steps
            .iter()
            .map(|s| step_refs(s, &graph))
            .collect();
        Ok(Plan {
            workflow: Arc::new(workflow),
            graph,
            refs,
        })
    }

    /// Parses, validates and compiles workflow JSON.
    pub fn from_json(text: &str, source_name: &str) -> Result<Plan, ValidationError> {
        Plan::compile(parse(text, source_name)?, source_name)
    }

    /// Loads a workflow file.
    pub fn load_file(path: &Path) -> Result<Plan, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
            path: path.to_owned(),
            source,
        })?;
        Ok(Plan::from_json(&text, &path.display().to_string())?)
    }

    /// Finds a workflow by id in a directory: `DIR/ID.json`, else any `*.json` whose `id` is ID.
    pub fn load_by_id(dir: &Path, id: &str) -> Result<Plan, LoadError> {
        let direct = dir.join(format!("{id}.json"));
        if direct.is_file() {
            return Plan::load_file(&direct);
        }
        let entries = std::fs::read_dir(dir).map_err(|source| LoadError::Io {
            path: dir.to_owned(),
            source,
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json")
                && let Ok(text) = std::fs::read_to_string(&path)
                && let Ok(value) = serde_json::from_str::<serde_json::Value>(&text)
                && value.get("id").and_then(|v| v.as_str()) == Some(id)
            {
                return Ok(Plan::from_json(&text, &path.display().to_string())?);
            }
        }
        Err(LoadError::NotFound {
            id: id.to_owned(),
            dir: dir.to_owned(),
        })
    }

    pub fn step_index(&self, id: &str) -> Option<usize> {
        self.graph.index.get(id).copied()
    }

    pub fn step(&self, i: usize) -> &Step {
        &self.workflow.steps[i]
    }

    pub fn refs(&self, i: usize) -> &StepRefs {
        &self.refs[i]
    }
}

fn step_refs(step: &Step, graph: &Graph) -> StepRefs {
    let mut texts: Vec<String> = Vec::new();
    let mut strings = Vec::new();
    let params = serde_json::Value::Object(step.params.clone());
    template::strings_in(&params, "", &mut strings);
    texts.extend(strings.into_iter().map(|(_, s)| s.to_owned()));
    if let Some(serde_json::Value::String(s)) = &step.for_each {
        texts.push(s.clone());
    }
    let mut refs = StepRefs::default();
    let mut add = |names: BTreeSet<String>| {
        for name in names {
            let mut parts = name.split('.');
            match (parts.next(), parts.next()) {
                (Some("steps"), Some(id)) => refs.steps.extend(graph.index.get(id)),
                (Some("steps"), None) => refs.all_steps = true,
                (Some("secrets"), Some(secret)) => {
                    refs.secrets.insert(secret.to_owned());
                }
                (Some(other), _) => {
                    if let Some(id) = other.strip_suffix("_output") {
                        refs.steps.extend(graph.index.get(id));
                    }
                }
                _ => {}
            }
        }
    };
    for text in &texts {
        if let Ok(names) = template::references(text) {
            add(names);
        }
    }
    for cond in step
        .when
        .iter()
        .chain(step.choices.iter().flatten().map(|r| &r.when))
    {
        if let Ok(names) = template::condition_references(cond) {
            add(names);
        }
    }
    // The legacy `transform.extract` names its source without template braces.
    if step.kind == StepKind::Transform
        && let Some(serde_json::Value::String(source)) = step.params.get("source")
        && let Some(id) = source.strip_suffix("_output")
    {
        refs.steps.extend(graph.index.get(id));
    }
    // `transform.format` uses `{name}` placeholders, which may name any step output.
    if step.kind == StepKind::Transform && step.action.as_deref() == Some("format") {
        refs.all_steps = true;
    }
    refs
}
