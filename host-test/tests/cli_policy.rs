//! `mandate policy ...` end to end: the binary, real files, exit codes.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn mandate(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mandate"))
        .args(args)
        .current_dir(fixtures())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn lint_warns_about_ungranted_intent_and_passes() {
    let (code, out) = mandate(&["policy", "lint", "policy.json"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("intent `orphan`: no allow rule grants this intent"),
        "{out}"
    );
    let (code, _) = mandate(&["policy", "lint", "--deny-warnings", "policy.json"]);
    assert_eq!(code, 1);
}

#[test]
fn lint_refuses_invalid_policy_naming_the_field() {
    let dir = std::env::temp_dir().join(format!("mandate-lint-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.json");
    std::fs::write(
        &bad,
        r#"{"rules":[{"id":"r","effect":"allow","intents":["ghost"]}]}"#,
    )
    .unwrap();
    let (code, out) = mandate(&["policy", "lint", bad.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("policy.rules[0].intents[0]") && out.contains("ghost"),
        "{out}"
    );
}

#[test]
fn test_reports_failures_and_counts() {
    let (code, out) = mandate(&["policy", "test", "failing.cases.json"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL wrong expectation: got deny intent_mismatch"),
        "{out}"
    );
    assert!(out.contains("1 passed, 1 failed"), "{out}");
}

#[test]
fn explain_shows_decision_and_each_rule() {
    let (code, out) = mandate(&[
        "policy",
        "explain",
        "--policy",
        "policy.json",
        "--request",
        "explain-request.json",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("decision: Allow"), "{out}");
    assert!(out.contains("MATCH r1"), "{out}");
    assert!(
        out.contains("no-post [deny]: method is not one of"),
        "{out}"
    );
}

#[test]
fn explain_shows_a_delegation_chain_and_the_principal_that_failed() {
    let (code, out) = mandate(&[
        "policy",
        "explain",
        "--policy",
        "../../../policies/delegation.policy.json",
        "--request",
        "explain-delegated.json",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("decision: Deny (delegation_not_allowed)"), "{out}");
    assert!(out.contains("delegation chain (original principal first):"), "{out}");
    assert!(
        out.contains("spiffe://acme.example/agent/triage/t1 [triage]: Allow"),
        "{out}"
    );
    assert!(
        out.contains("edge spiffe://acme.example/agent/billing/b1 -> spiffe://acme.example/contractor/x1: delegation rule billing-hands-contractor"),
        "{out}"
    );
    assert!(
        out.contains("refused: delegation_not_allowed at spiffe://acme.example/contractor/x1 (denied_by_rule)"),
        "{out}"
    );
}
