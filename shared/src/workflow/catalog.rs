//! Which actions each step type has and which parameters they take. Validation reads this; the
//! action registry (`steps`) carries the implementations. The original format's actions are listed
//! here so its files stay valid even where the integration lives in a later crate feature.

use crate::workflow::StepKind;

/// What an action accepts.
#[derive(Debug, Clone, Copy)]
pub struct ActionSpec {
    pub name: &'static str,
    pub required: &'static [&'static str],
    pub optional: &'static [&'static str],
    /// At least one of these must be given (e.g. `wait` takes `seconds` or `until`).
    pub one_of: &'static [&'static str],
}

impl ActionSpec {
    pub fn accepts(&self, param: &str) -> bool {
        self.required.contains(&param)
            || self.optional.contains(&param)
            || self.one_of.contains(&param)
    }

    pub fn all_params(&self) -> Vec<&'static str> {
        let mut all: Vec<&'static str> = Vec::new();
        all.extend(self.required);
        all.extend(self.one_of);
        all.extend(self.optional);
        all
    }
}

const fn spec(
    name: &'static str,
    required: &'static [&'static str],
    optional: &'static [&'static str],
) -> ActionSpec {
    ActionSpec {
        name,
        required,
        optional,
        one_of: &[],
    }
}

const OPENAI: &[ActionSpec] = &[
    spec(
        "generate_completion",
        &["prompt"],
        &["model", "temperature", "max_tokens", "system_prompt"],
    ),
    spec("summarize", &["text"], &["model", "max_tokens"]),
    spec("generate_sop", &["task_description"], &["model"]),
];
const GITHUB: &[ActionSpec] = &[
    spec("create_issue", &["repo_name", "title"], &["body", "labels"]),
    spec(
        "commit_file",
        &["repo_name", "file_path", "content", "message"],
        &["branch"],
    ),
    spec("list_repositories", &[], &[]),
];
const NOTION: &[ActionSpec] = &[
    spec("create_page", &["parent_id", "title"], &["content"]),
    spec("append_to_page", &["page_id", "content"], &[]),
    spec("search_pages", &["query"], &[]),
];
const GMAIL: &[ActionSpec] = &[
    spec("list_messages", &[], &["max_results", "query"]),
    spec("get_message", &["message_id"], &[]),
];
const TRANSFORM: &[ActionSpec] = &[
    spec("build", &["value"], &[]),
    spec("extract", &["source", "key"], &[]),
    spec("format", &["template"], &[]),
];
const HTTP: &[ActionSpec] = &[spec(
    "request",
    &["url"],
    &["method", "headers", "query", "json", "body", "timeout_s"],
)];
const WAIT: &[ActionSpec] = &[ActionSpec {
    name: "wait",
    required: &[],
    optional: &[],
    one_of: &["seconds", "until"],
}];
const LOG: &[ActionSpec] = &[spec("log", &["message"], &["level"])];
const CHOICE: &[ActionSpec] = &[];

/// The actions of a step type.
pub fn actions(kind: StepKind) -> &'static [ActionSpec] {
    match kind {
        StepKind::Openai => OPENAI,
        StepKind::Github => GITHUB,
        StepKind::Notion => NOTION,
        StepKind::Gmail => GMAIL,
        StepKind::Transform => TRANSFORM,
        StepKind::Http => HTTP,
        StepKind::Wait => WAIT,
        StepKind::Log => LOG,
        StepKind::Choice => CHOICE,
    }
}

/// The action used when a step names none.
pub fn default_action(kind: StepKind) -> Option<&'static str> {
    match kind {
        StepKind::Transform => Some("build"),
        StepKind::Http => Some("request"),
        StepKind::Wait => Some("wait"),
        StepKind::Log => Some("log"),
        _ => None,
    }
}

pub fn find(kind: StepKind, action: &str) -> Option<&'static ActionSpec> {
    actions(kind).iter().find(|a| a.name == action)
}
