//! Step actions: what a step of each type does once its parameters are rendered. One module per
//! step type; adding a type means one module and one line in [`ActionRegistry::local`].
//! `choice` and `wait` are not here: the engine carries them out itself.

pub mod http;
pub mod log;
pub mod transform;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::failure::StepError;
use crate::secrets::Redactor;
use crate::workflow::StepKind;

/// One attempt of one step, with its parameters rendered.
pub struct StepCall<'a> {
    pub run_id: &'a str,
    pub step_id: &'a str,
    pub action: &'a str,
    pub params: Map<String, Value>,
    /// The names templates saw (inputs, step outputs; never secrets), for actions that look
    /// values up by name, like the original `transform.extract`.
    pub scope: &'a Map<String, Value>,
    pub attempt: u32,
    pub index: Option<u32>,
    /// Hides secret values in anything an action logs.
    pub redactor: &'a Redactor,
}

impl StepCall<'_> {
    pub fn param(&self, name: &str) -> Option<&Value> {
        self.params.get(name)
    }

    pub fn str_param(&self, name: &str) -> Result<Option<&str>, StepError> {
        match self.params.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(StepError::permanent(format!(
                "param '{name}' must be a string, got {other}"
            ))),
        }
    }

    pub fn required_str(&self, name: &str) -> Result<&str, StepError> {
        self.str_param(name)?
            .ok_or_else(|| StepError::permanent(format!("param '{name}' is required")))
    }
}

pub type StepFuture<'a> = Pin<Box<dyn Future<Output = Result<Value, StepError>> + Send + 'a>>;

/// What a step type does.
pub trait StepAction: Send + Sync {
    fn execute<'a>(&'a self, call: StepCall<'a>) -> StepFuture<'a>;
}

/// The actions available to a runtime, keyed by step type.
#[derive(Clone, Default)]
pub struct ActionRegistry {
    actions: HashMap<StepKind, Arc<dyn StepAction>>,
}

impl ActionRegistry {
    pub fn empty() -> ActionRegistry {
        ActionRegistry::default()
    }

    /// The step types that need no credentials: transform, http, log.
    pub fn local() -> ActionRegistry {
        let mut r = ActionRegistry::empty();
        r.register(StepKind::Transform, transform::Transform);
        r.register(StepKind::Http, http::Http::new());
        r.register(StepKind::Log, log::Log);
        r
    }

    pub fn register(&mut self, kind: StepKind, action: impl StepAction + 'static) {
        self.actions.insert(kind, Arc::new(action));
    }

    pub fn get(&self, kind: StepKind) -> Option<Arc<dyn StepAction>> {
        self.actions.get(&kind).cloned()
    }
}
