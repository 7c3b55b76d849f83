//! plugin/config.schema.json: generated from the configuration types, kept up to date, valid
//! for every example configuration, and in agreement with the filter's parser on invalid ones.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mandate_core::config;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn committed() -> Value {
    let text = std::fs::read_to_string(repo().join("plugin/config.schema.json")).expect("plugin/config.schema.json");
    serde_json::from_str(&text).unwrap()
}

fn validator() -> jsonschema::Validator {
    jsonschema::validator_for(&committed()).expect("the committed schema compiles")
}

fn schema_errors(v: &jsonschema::Validator, instance: &Value) -> Vec<String> {
    v.iter_errors(instance).map(|e| format!("{} at {}", e, e.instance_path())).collect()
}

/// Regenerate with `mandate config schema > plugin/config.schema.json` (or run this test with
/// MANDATE_BLESS=1).
#[test]
fn committed_schema_is_what_the_types_generate() {
    let fresh = mandate_host_test::schema::plugin_config_schema_text();
    let path = repo().join("plugin/config.schema.json");
    if std::env::var_os("MANDATE_BLESS").is_some() {
        std::fs::write(&path, &fresh).unwrap();
    }
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        old == fresh,
        "plugin/config.schema.json is stale: run `cargo run -p mandate-host-test --bin mandate -- config schema > plugin/config.schema.json`"
    );
}

#[test]
fn schema_is_strict_about_unknown_fields() {
    let s = committed();
    assert_eq!(s["additionalProperties"], json!(false), "the root refuses unknown fields");
    for (name, def) in s["$defs"].as_object().unwrap() {
        if def.get("type") == Some(&json!("object")) {
            assert_eq!(def["additionalProperties"], json!(false), "$defs/{name} refuses unknown fields");
        }
    }
}

/// Every plugin configuration the repository ships: the policy library (each wrapped as the
/// `policy` of a configuration, as the filter gets it), the test fixtures and the Istio manifest.
fn examples() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for dir in ["policies", "host-test/tests/fixtures"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join(dir)).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        for f in files {
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".policy.json") || name == "policy.json" {
                let policy: Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
                let mut cfg = json!({ "policy": policy });
                // Forwarded Txn-Tokens need the delegation section (policies/README.md).
                if name == "delegation.policy.json" {
                    cfg["delegation"] = json!({"issuer": "https://minter.acme.example", "audience": "acme.example", "keys": {"inline": serde_json::from_str::<Value>(BUNDLE).unwrap()}});
                }
                out.push((format!("{dir}/{name}"), cfg));
            }
        }
    }
    let manifest = std::fs::read_to_string(repo().join("envoy/istio/wasmplugin.yaml")).unwrap();
    let doc: Value = serde_norway::from_str(&manifest).unwrap();
    out.push(("envoy/istio/wasmplugin.yaml spec.pluginConfig".into(), doc["spec"]["pluginConfig"].clone()));
    out.push(("{}".into(), json!({})));
    out.push(("$schema".into(), json!({"$schema": "../plugin/config.schema.json"})));
    out
}

#[test]
fn every_example_configuration_validates_against_the_schema_and_parses() {
    let v = validator();
    let examples = examples();
    assert!(examples.len() >= 9, "found only {} examples", examples.len());
    for (name, cfg) in &examples {
        assert!(cfg.is_object(), "{name}: not an object");
        let errors = schema_errors(&v, cfg);
        assert!(errors.is_empty(), "{name}: the schema refuses it: {errors:#?}");
        if let Err(e) = config::parse(cfg.to_string().as_bytes()) {
            panic!("{name}: the filter refuses it: {e}");
        }
    }
}

const BUNDLE: &str = r#"{"keys": [{"kty": "EC", "crv": "P-256", "kid": "k", "use": "jwt-svid", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;

/// Invalid configurations: each is refused by the filter's parser (naming `field`), and by the
/// schema unless `schema` says why it cannot be (cross-field and cross-reference rules); those
/// differences are listed in docs/configuration.md.
struct Case {
    raw: String,
    field: &'static str,
    /// `None`: the schema refuses it too. `Some(why)`: the schema accepts it (a listed difference).
    schema_accepts: Option<&'static str>,
}

fn case(raw: &str, field: &'static str) -> Case {
    Case { raw: raw.to_string(), field, schema_accepts: None }
}

fn differs(raw: &str, field: &'static str, why: &'static str) -> Case {
    Case { raw: raw.to_string(), field, schema_accepts: Some(why) }
}

fn policy(p: &str) -> String {
    format!(r#"{{"policy": {p}}}"#)
}

fn invalid_cases() -> Vec<Case> {
    let td = |bundle: &str| format!(r#"{{"identity": {{"audiences": ["a"], "trust_domains": [{{"name": "example.org", "bundle": {bundle}}}]}}}}"#);
    vec![
        // The root.
        case("[]", "."),
        case("5", "."),
        case(r#""identity""#, "."),
        case("null", "."),
        case(r#"{"surprise": true}"#, "surprise"),
        case(r#"{"$schema": 1}"#, "$schema"),
        // identity
        case(r#"{"identity": {"header": "Authorization"}}"#, "identity.header"),
        case(r#"{"identity": {"header": ""}}"#, "identity.header"),
        case(r#"{"identity": {"scheme": "Bearer token"}}"#, "identity.scheme"),
        case(r#"{"identity": {"forward_token": "yes"}}"#, "identity.forward_token"),
        case(r#"{"identity": {"clock_skew_s": 601}}"#, "identity.clock_skew_s"),
        case(r#"{"identity": {"clock_skew_s": -1}}"#, "identity.clock_skew_s"),
        case(r#"{"identity": {"max_token_bytes": 63}}"#, "identity.max_token_bytes"),
        case(r#"{"identity": {"cache_size": 1000001}}"#, "identity.cache_size"),
        case(r#"{"identity": {"audiences": [""]}}"#, "identity.audiences[0]"),
        case(r#"{"identity": {"audiences": "a"}}"#, "identity.audiences"),
        case(r#"{"identity": {"bogus": 1}}"#, "identity.bogus"),
        case(r#"{"identity": {"upstream_header": "X-Id"}}"#, "identity.upstream_header"),
        differs(r#"{"identity": {"upstream_header": "authorization"}}"#, "identity.upstream_header", "must differ from identity.header: a cross-field rule"),
        differs(
            r#"{"identity": {"trust_domains": [{"name": "example.org", "bundle": {"cluster": "c"}}]}}"#,
            "identity.audiences",
            "trust domains need an audience: a cross-field rule",
        ),
        case(&td(r#"{"cluster": "c", "inline": {"keys": []}}"#).replace("example.org", "Example.org"), "identity.trust_domains[0].name"),
        case(&td(r#"{"cluster": "c", "inline": {"keys": []}}"#), "identity.trust_domains[0].bundle"),
        case(&td("{}"), "identity.trust_domains[0].bundle"),
        case(&td(r#"{"cluster": ""}"#), "identity.trust_domains[0].bundle.cluster"),
        case(&td(r#"{"cluster": "c", "path": "jwks"}"#), "identity.trust_domains[0].bundle.path"),
        case(&td(r#"{"cluster": "c", "refresh_s": 4}"#), "identity.trust_domains[0].bundle.refresh_s"),
        case(&td(r#"{"cluster": "c", "timeout_ms": 9}"#), "identity.trust_domains[0].bundle.timeout_ms"),
        case(&td(r#"{"cluster": "c", "max_bundle_age_s": 59}"#), "identity.trust_domains[0].bundle.max_bundle_age_s"),
        differs(
            &td(r#"{"cluster": "c", "refresh_s": 600, "retry_s": 601}"#),
            "identity.trust_domains[0].bundle.retry_s",
            "retry_s at most refresh_s: a cross-field rule",
        ),
        differs(
            &td(&format!(r#"{{"inline": {BUNDLE}, "max_bundle_age_s": 600}}"#)),
            "identity.trust_domains[0].bundle.max_bundle_age_s",
            "max_bundle_age_s applies to fetched bundles only: a cross-field rule",
        ),
        differs(&td(r#"{"inline": {"keys": "none"}}"#), "identity.trust_domains[0].bundle.inline", "a bundle's keys are checked by the JWKS parser, not the schema"),
        differs(
            r#"{"identity": {"audiences": ["a"], "trust_domains": [{"name": "a.org", "bundle": {"cluster": "c"}}, {"name": "a.org", "bundle": {"cluster": "c"}}]}}"#,
            "identity.trust_domains[1].name",
            "a trust domain listed twice: uniqueness by key",
        ),
        case(r#"{"identity": {"oidc_issuers": [{"issuer": "", "audiences": ["a"], "jwks": {"cluster": "c"}}]}}"#, "identity.oidc_issuers[0].issuer"),
        case(r#"{"identity": {"oidc_issuers": [{"issuer": "i", "audiences": [], "jwks": {"cluster": "c"}}]}}"#, "identity.oidc_issuers[0].audiences"),
        case(r#"{"identity": {"oidc_issuers": [{"issuer": "i", "audiences": ["a"]}]}}"#, "identity.oidc_issuers[0]"),
        // upstream, records
        case(r#"{"upstream": {"decision_id_header": "X-Decision"}}"#, "upstream.decision_id_header"),
        case(r#"{"upstream": {"rewrite_path": 1}}"#, "upstream.rewrite_path"),
        case(r#"{"records": {"log": false, "filter_state": false}}"#, "records"),
        case(r#"{"records": {"flush_ms": 49}}"#, "records.flush_ms"),
        case(r#"{"records": {"flush_ms": 10001}}"#, "records.flush_ms"),
        // minter
        case(r#"{"minter": {}}"#, "minter"),
        case(r#"{"minter": {"cluster": ""}}"#, "minter.cluster"),
        case(r#"{"minter": {"cluster": "m", "path": "token"}}"#, "minter.path"),
        case(r#"{"minter": {"cluster": "m", "timeout_ms": 60001}}"#, "minter.timeout_ms"),
        case(r#"{"minter": {"cluster": "m", "header": "x-mandate-credential"}}"#, "minter.header"),
        case(r#"{"minter": {"cluster": "m", "refresh_margin_s": 301}}"#, "minter.refresh_margin_s"),
        case(r#"{"minter": {"cluster": "m", "revocations": {"max_stale_s": 4}}}"#, "minter.revocations.max_stale_s"),
        case(r#"{"minter": {"cluster": "m", "revocations": {"path": "/revocations?since=9"}}}"#, "minter.revocations.path"),
        case(r#"{"minter": {"cluster": "m", "revocations": {"max_bytes": 262144}}}"#, "minter.revocations.max_bytes"),
        differs(
            r#"{"minter": {"cluster": "m", "revocations": {"interval_ms": 10001, "max_stale_s": 30}}}"#,
            "minter.revocations.interval_ms",
            "interval_ms at most a third of max_stale_s: a cross-field rule",
        ),
        // delegation
        case(&format!(r#"{{"delegation": {{"issuer": "", "audience": "a", "keys": {{"inline": {BUNDLE}}}}}}}"#), "delegation.issuer"),
        case(&format!(r#"{{"delegation": {{"issuer": "i", "audience": "a", "max_delegations": 9, "keys": {{"inline": {BUNDLE}}}}}}}"#), "delegation.max_delegations"),
        case(r#"{"delegation": {"issuer": "i", "audience": "a"}}"#, "delegation"),
        differs(
            &format!(r#"{{"delegation": {{"header": "authorization", "issuer": "i", "audience": "a", "keys": {{"inline": {BUNDLE}}}}}}}"#),
            "delegation.header",
            "a header the filter already uses: a cross-field rule",
        ),
        // policy
        case(&policy("[]"), "policy"),
        case(&policy(r#"{"tasks": "sometimes"}"#), "policy.tasks"),
        case(&policy(r#"{"sensitivity_levels": []}"#), "policy.sensitivity_levels"),
        case(&policy(r#"{"sensitivity_levels": ["Public"]}"#), "policy.sensitivity_levels[0]"),
        case(&policy(r#"{"decision_cache": {"ttl_s": 3601}}"#), "policy.decision_cache.ttl_s"),
        case(&policy(r#"{"classes": [{"name": "a", "principals": []}]}"#), "policy.classes[0].principals"),
        case(&policy(r#"{"classes": [{"name": "a", "principals": ["spiffe://td/agent-[a-z"]}]}"#), "policy.classes[0].principals[0]"),
        case(&policy(r#"{"classes": [{"name": "a", "principals": ["spiffe://td/agent?"]}]}"#), "policy.classes[0].principals[0]"),
        case(&policy(r#"{"classes": [{"name": "a", "principals": ["spiffe://td/agent*"]}]}"#), "policy.classes[0].principals[0]"),
        case(&policy(r#"{"rules": [{"id": "r", "effect": "allow", "principals": ["spiffe://td/[ab]/x"]}]}"#), "policy.rules[0].principals[0]"),
        differs(
            &policy(r#"{"classes": [{"name": "a", "principals": ["spiffe://td/**/x"]}]}"#),
            "policy.classes[0].principals[0]",
            "`**` only last: kept out of the schema's pattern for readability",
        ),
        case(&policy(r#"{"resources": [{"name": "R", "paths": ["/a"]}]}"#), "policy.resources[0].name"),
        case(&policy(r#"{"resources": [{"name": "r", "paths": ["a"]}]}"#), "policy.resources[0].paths[0]"),
        case(&policy(r#"{"resources": [{"name": "r", "methods": ["get"]}]}"#), "policy.resources[0].methods"),
        case(&policy(r#"{"resources": [{"name": "r", "mcp": {"body": "never"}}]}"#), "policy.resources[0].mcp.body"),
        case(&policy(r#"{"resources": [{"name": "r", "mcp": {"max_body_bytes": 10}}]}"#), "policy.resources[0].mcp.max_body_bytes"),
        case(&policy(r#"{"resources": [{"name": "r", "mcp": {"surprise": 1}}]}"#), "policy.resources[0].mcp.surprise"),
        case(&policy(r#"{"resources": [{"name": "r", "txn_token": "keep"}]}"#), "policy.resources[0].txn_token"),
        case(&policy(r#"{"intents": [{"name": "i", "operations": []}]}"#), "policy.intents[0].operations"),
        case(&policy(r#"{"resources": [{"name": "r"}], "intents": [{"name": "i", "ttl_s": 0, "operations": [{"resource": "r"}]}]}"#), "policy.intents[0].ttl_s"),
        case(&policy(r#"{"rules": [{"id": "", "effect": "allow"}]}"#), "policy.rules[0].id"),
        case(&policy(r#"{"rules": [{"id": "r", "effect": "maybe"}]}"#), "policy.rules[0].effect"),
        case(&policy(r#"{"rules": [{"id": "r", "effect": "allow", "when": {"days": ["monday"]}}]}"#), "policy.rules[0].when"),
        case(&policy(r#"{"max_delegations": 9}"#), "policy.max_delegations"),
        case(&policy(r#"{"delegation_rules": [{"id": "d", "intents": [], "from": ["a"], "to": ["b"]}]}"#), "policy.delegation_rules[0].intents"),
        differs(
            &policy(r#"{"rules": [{"id": "r", "effect": "allow", "classes": ["ghost"]}]}"#),
            "policy.rules[0].classes[0]",
            "a reference to a class that is not defined: cross-reference",
        ),
        differs(
            &policy(r#"{"rules": [{"id": "r", "effect": "allow"}, {"id": "r", "effect": "deny"}]}"#),
            "policy.rules[0].id",
            "a rule id used twice: uniqueness by key",
        ),
        differs(
            &policy(r#"{"rules": [{"id": "r", "effect": "allow", "dry_run": true}]}"#),
            "policy.rules[0].dry_run",
            "only deny rules can be dry-run: a cross-field rule",
        ),
        differs(
            &policy(r#"{"resources": [{"name": "r", "sensitivity": "secret"}]}"#),
            "policy.resources[0].sensitivity",
            "a sensitivity not in sensitivity_levels: cross-reference",
        ),
        differs(
            &policy(r#"{"rules": [{"id": "r", "effect": "allow", "when": {"hours": ["25:00-26:00"]}}]}"#),
            "policy.rules[0].when",
            "hour ranges are read by the window parser",
        ),
    ]
}

#[test]
fn schema_and_parser_agree_on_invalid_configurations() {
    let v = validator();
    let cases = invalid_cases();
    let both = cases.iter().filter(|c| c.schema_accepts.is_none()).count();
    assert!(both >= 30, "only {both} configurations both refuse");
    let mut failures = Vec::new();
    for c in &cases {
        match config::parse(c.raw.as_bytes()) {
            Ok(_) => failures.push(format!("the parser accepts {}", c.raw)),
            Err(e) if e.field != c.field => failures.push(format!("{}: the parser names `{}`, not `{}` ({e})", c.raw, e.field, c.field)),
            Err(_) => {}
        }
        let instance: Value = serde_json::from_str(&c.raw).unwrap();
        let refused = !v.is_valid(&instance);
        match (c.schema_accepts, refused) {
            (None, false) => failures.push(format!("the schema accepts {}", c.raw)),
            (Some(why), true) => failures.push(format!("listed as a difference ({why}) but the schema refuses {}", c.raw)),
            _ => {}
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn documented_differences_are_listed_in_configuration_md() {
    let doc = std::fs::read_to_string(repo().join("docs/configuration.md")).unwrap();
    for c in invalid_cases() {
        if let Some(why) = c.schema_accepts {
            assert!(doc.contains(why), "docs/configuration.md does not list the difference: {why}");
        }
    }
}
