//! `orchestra validate` on the shipped invalid fixtures, the examples and the schema file.
//! Each `tests/fixtures/invalid/NAME.json` has exactly one mistake; `NAME.expected` lists lines
//! that must all appear in what `validate` prints for it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the cli crate sits in the repo")
        .to_owned()
}

fn validate(files: &[PathBuf]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_orchestra"))
        .current_dir(repo_root())
        .arg("validate")
        .args(files)
        .output()
        .expect("orchestra starts");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("fixture dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_invalid_fixture_fails_with_its_expected_message() {
    let fixtures = json_files(&repo_root().join("tests/fixtures/invalid"));
    assert!(fixtures.len() >= 12, "only {} fixtures", fixtures.len());
    let mut problems = Vec::new();
    for file in &fixtures {
        let expected_file = file.with_extension("expected");
        let Ok(expected) = std::fs::read_to_string(&expected_file) else {
            problems.push(format!("{} has no .expected file", file.display()));
            continue;
        };
        let (ok, _, stderr) = validate(std::slice::from_ref(file));
        if ok {
            problems.push(format!("{} validated, but it is invalid", file.display()));
            continue;
        }
        for line in expected.lines().filter(|l| !l.trim().is_empty()) {
            if !stderr.contains(line) {
                problems.push(format!(
                    "{}: expected `{line}` in:\n{stderr}",
                    file.display()
                ));
            }
        }
        // One mistake, one error: a fixture that trips several checks is testing the wrong thing.
        let errors = stderr.matches(": error: ").count();
        if errors != 1 {
            problems.push(format!("{}: {errors} errors:\n{stderr}", file.display()));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

#[test]
fn example_workflows_all_validate() {
    let (ok, stdout, stderr) = validate(&json_files(&repo_root().join("workflows")));
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("schema.json: skipped"), "{stdout}");
}

#[test]
fn every_example_references_the_schema() {
    for file in json_files(&repo_root().join("workflows")) {
        if file.ends_with("schema.json") {
            continue;
        }
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).expect("read")).expect("json");
        assert_eq!(doc["$schema"], "./schema.json", "{}", file.display());
    }
}

#[test]
fn schema_file_is_up_to_date() {
    let committed = std::fs::read_to_string(repo_root().join("workflows/schema.json"))
        .expect("workflows/schema.json exists");
    assert!(
        committed == orchestra_core::schema::workflow_schema_json(),
        "workflows/schema.json is stale: regenerate it with \
         `cargo run -p orchestra-cli -- schema > workflows/schema.json`"
    );
}

#[test]
fn validate_reports_every_error_in_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("two.json");
    std::fs::write(
        &file,
        r#"{"id": "two", "steps": [
            {"id": "a", "type": "github", "action": "create_issue", "params": {"repo_name": "o/r"}, "next_step": "nowhere"}
        ]}"#,
    )
    .expect("write");
    let (ok, _, stderr) = validate(&[file]);
    assert!(!ok);
    assert!(
        stderr.contains("missing required param 'title'"),
        "{stderr}"
    );
    assert!(
        stderr.contains("next_step refers to step 'nowhere'"),
        "{stderr}"
    );
}
