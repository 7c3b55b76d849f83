//! `mandate config check|schema` and `mandate token inspect` end to end: the binary, real
//! files, exit codes, --json.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mandate_core::testkit::{spiffe_bundle, svid_claims, TestKey};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Command;

fn mandate(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mandate")).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn write(dir: &std::path::Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

fn tmp(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mandate-cli-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn config_check_names_the_field_and_exits_2_as_the_filter_refuses() {
    let dir = tmp("check");
    let bad = write(&dir, "bad.json", r#"{"policy": {"classes": [{"name": "a", "principals": ["spiffe://td/agent-[a-z"]}]}}"#);
    let (code, out) = mandate(&["config", "check", bad.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("invalid configuration at `policy.classes[0].principals[0]`"), "{out}");
    assert!(out.contains("not a glob"), "{out}");

    let (code, out) = mandate(&["config", "check", "--json", bad.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["valid"], json!(false));
    assert_eq!(v["error"]["field"], json!("policy.classes[0].principals[0]"));

    let root = write(&dir, "array.json", "[]");
    let (code, out) = mandate(&["config", "check", "--json", root.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["error"]["field"], json!("."), "{out}");
}

#[test]
fn config_check_accepts_a_valid_file_and_reports_warnings() {
    let dir = tmp("ok");
    let empty = write(&dir, "empty.json", "{}");
    let (code, out) = mandate(&["config", "check", "--json", empty.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["valid"], json!(true));
    assert!(v["warnings"][0].as_str().unwrap().contains("every request is denied"), "{out}");
    let (code, _) = mandate(&["config", "check", "--deny-warnings", empty.to_str().unwrap()]);
    assert_eq!(code, 2);
    let (code, out) = mandate(&["config", "check", dir.join("missing.json").to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
}

#[test]
fn config_schema_prints_the_committed_schema() {
    let (code, out) = mandate(&["config", "schema"]);
    assert_eq!(code, 0);
    let committed = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugin/config.schema.json")).unwrap();
    assert_eq!(out, committed);
}

#[test]
fn token_inspect_decodes_without_the_signature_and_says_why_it_is_refused() {
    let dir = tmp("token");
    let key = TestKey::es256("k1");
    let now = 1_750_000_000u64;
    let token = key.sign(&svid_claims("spiffe://example.org/agent/a1", "api", now - 10, now + 300));
    let signature = token.rsplit('.').next().unwrap().to_string();
    let cfg = json!({"identity": {"audiences": ["api"], "trust_domains": [{"name": "example.org", "bundle": {"inline": spiffe_bundle(&[&key], None)}}]}});
    let cfg = write(&dir, "cfg.json", &cfg.to_string());

    let (code, out) = mandate(&["token", "inspect", "--json", &token]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains(&signature) && !out.contains(&token), "never the signature or the token: {out}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["claims"]["sub"], json!("spiffe://example.org/agent/a1"));
    assert!(v["token"].as_str().unwrap().starts_with("sha256:"));

    let now_s = now.to_string();
    let (code, out) = mandate(&["token", "inspect", "--json", "--config", cfg.to_str().unwrap(), "--now", &now_s, &token]);
    assert_eq!(code, 0, "{out}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["verification"]["accepted"], json!(true), "{out}");
    assert_eq!(v["verification"]["principal"], json!("spiffe://example.org/agent/a1"));

    let later = (now + 3600).to_string();
    let (code, out) = mandate(&["token", "inspect", "--json", "--config", cfg.to_str().unwrap(), "--now", &later, &token]);
    assert_eq!(code, 2, "{out}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["verification"]["accepted"], json!(false));
    assert_eq!(v["verification"]["reason"], json!("token_expired"), "{out}");

    let other = TestKey::es256("k1");
    let forged = other.sign(&svid_claims("spiffe://example.org/agent/a1", "api", now - 10, now + 300));
    let (code, out) = mandate(&["token", "inspect", "--config", cfg.to_str().unwrap(), "--now", &now_s, &forged]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("refused: signature_invalid (401)"), "{out}");

    let (code, out) = mandate(&["token", "inspect", "not-a-token"]);
    assert_eq!(code, 1, "{out}");
}
