//! minter/config.schema.json: generated from the configuration types, kept up to date, valid
//! for the example configuration, and refusing what the minter refuses by type.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mandate_minter::config::{schema_text, MinterConfig};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Regenerate with `mandate-minter config-schema > minter/config.schema.json` (or run this test
/// with MANDATE_BLESS=1).
#[test]
fn committed_schema_is_what_the_types_generate() {
    let path = repo().join("minter/config.schema.json");
    if std::env::var_os("MANDATE_BLESS").is_some() {
        std::fs::write(&path, schema_text()).unwrap();
    }
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(old == schema_text(), "minter/config.schema.json is stale: run `cargo run -p mandate-minter --bin mandate-minter -- config-schema > minter/config.schema.json`");
}

fn validator() -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(repo().join("minter/config.schema.json")).unwrap()).unwrap();
    jsonschema::validator_for(&schema).unwrap()
}

#[test]
fn the_example_configurations_validate() {
    let example: Value = serde_json::from_str(&std::fs::read_to_string(repo().join("minter/minter.example.json")).unwrap()).unwrap();
    // The Kubernetes ConfigMap's minter.json (envoy/istio/minter/config.yaml).
    let manifest: Value = serde_norway::from_str(&std::fs::read_to_string(repo().join("envoy/istio/minter/config.yaml")).unwrap()).unwrap();
    let mounted: Value = serde_json::from_str(manifest["data"]["minter.json"].as_str().expect("data.minter.json")).unwrap();
    let v = validator();
    for (name, cfg) in [("minter/minter.example.json", example), ("envoy/istio/minter/config.yaml data.minter.json", mounted)] {
        let errors: Vec<String> = v.iter_errors(&cfg).map(|e| format!("{e} at {}", e.instance_path())).collect();
        assert!(errors.is_empty(), "{name}: {errors:#?}");
    }
}

#[test]
fn schema_and_minter_refuse_the_same_malformed_configurations() {
    let base = json!({"issuer": "https://minter.example", "state_dir": "/tmp/x", "identity": {}});
    let with = |k: &str, v: Value| {
        let mut c = base.clone();
        c[k] = v;
        c
    };
    let cases = vec![
        json!([]),
        json!({"state_dir": "/tmp/x", "identity": {}}),
        json!({"issuer": "i", "identity": {}}),
        with("surprise", json!(1)),
        with("workers", json!("two")),
        with("identity", json!([])),
        with("log_level", json!("loud")),
        with("ttl", json!({"default_s": 60, "bogus": 1})),
        with("client_auth", json!({"mode": "password"})),
        with("dev", json!("yes")),
        with("audiences", json!({"example.org": "payments"})),
        with("tasks", json!({"default_ttl_s": -1})),
    ];
    let v = validator();
    for c in cases {
        assert!(MinterConfig::from_json(c.clone()).is_err(), "the minter accepts {c}");
        assert!(!v.is_valid(&c), "the schema accepts {c}");
    }
}
