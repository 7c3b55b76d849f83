//! The WebAssembly component (component/, wit/mandate.wit) on wasmtime: parity with the native
//! engine over every case in policies/, token verification, configuration errors, fail-closed
//! answers. Skipped when the component is not built, unless MANDATE_REQUIRE_ENVOY is set
//! (scripts/test builds it with scripts/build-component first).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::{svid_claims, spiffe_bundle, TestKey};
use mandate_core::decide::DecideRequest;
use mandate_core::policy::cases::{self, CaseFile};
use mandate_core::reason::Reason;
use mandate_host_test::component::{core_reason, default_component_path, effect_code, to_wit, wit, ComponentHost};
use serde_json::{json, Value};

const NOW: u64 = 1_795_564_800 + 10 * 3600;
const AUD: &str = "spiffe://example.org/gw";
const SUB: &str = "spiffe://example.org/agent/a1";

/// One compilation per test binary (the component is ~640 KB).
fn component(test: &str) -> Option<&'static ComponentHost> {
    static HOST: std::sync::OnceLock<ComponentHost> = std::sync::OnceLock::new();
    let path = std::env::var_os("MANDATE_COMPONENT_WASM").map(PathBuf::from).unwrap_or_else(default_component_path);
    if !path.is_file() {
        let why = format!("{} does not exist (run scripts/build-component)", path.display());
        if std::env::var_os("MANDATE_REQUIRE_ENVOY").is_some_and(|v| !v.is_empty()) {
            panic!("{test}: MANDATE_REQUIRE_ENVOY is set but the component is missing: {why}");
        }
        eprintln!("SKIPPED {test}: {why}. Set MANDATE_REQUIRE_ENVOY=1 to make this a failure.");
        return None;
    }
    Some(HOST.get_or_init(|| ComponentHost::from_file(&path).unwrap()))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The same answer as the native engine, field by field, for every case in policies/.
#[test]
fn component_decides_every_policies_case_as_the_native_engine() {
    let Some(host) = component("component_decides_every_policies_case_as_the_native_engine") else { return };
    let mut n = 0;
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("policies")).unwrap().flatten().map(|e| e.path()).collect();
    files.sort();
    for p in files.iter().filter(|p| p.to_string_lossy().ends_with(".cases.json")) {
        let file: CaseFile = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
        let doc_path = p.parent().unwrap().join(&file.policy);
        let doc: Value = serde_json::from_slice(&std::fs::read(&doc_path).unwrap()).unwrap();
        let policy = cases::load_policy(&doc_path).unwrap();
        let mut deciders = [false, true].map(|minter| {
            let mut d = host.instantiate().unwrap();
            d.configure(&cases::case_config(&doc, minter).to_string()).unwrap().unwrap();
            d
        });
        for case in &file.cases {
            let mut r = case.request.clone();
            let minter = r.minter.unwrap_or(file.minter);
            r.minter = Some(minter);
            let native = cases::evaluate_request(&policy, &r).unwrap();
            let out = deciders[usize::from(minter)].decide(&to_wit(&DecideRequest::from_case(&r).unwrap())).unwrap();
            let got = (effect_code(out.effect), core_reason(out.reason), out.rule_id, out.dry_run_rule_id, out.scopes, out.ttl_s);
            let effect = match native.effect {
                mandate_core::decision::Effect::Allow => "allow",
                mandate_core::decision::Effect::Deny => "deny",
                mandate_core::decision::Effect::DryRunDeny => "dry_run_deny",
            };
            let want = (effect, native.reason, native.rule_id, native.dry_run_rule_id, native.scopes, native.ttl_s);
            assert_eq!(got, want, "{}: {}", p.display(), case.name);
            let rec: Value = serde_json::from_str(&out.record).unwrap();
            assert_eq!(rec["decision_id"], json!(out.decision_id), "{}", case.name);
            assert_eq!(rec["reason"], json!(native.reason.code()), "{}", case.name);
            n += 1;
        }
    }
    assert!(n > 50, "only {n} cases");
    eprintln!("{n} cases: component == native");
}

fn token_config(key: &TestKey) -> String {
    json!({
        "identity": {"audiences": [AUD], "trust_domains": [{"name": "example.org", "bundle": {"inline": spiffe_bundle(&[key], None)}}]},
        "policy": {
            "classes": [{"name": "agent", "principals": ["spiffe://example.org/agent/*"], "intent_required": true}],
            "resources": [{"name": "mcp", "hosts": ["mcp.internal"], "paths": ["/mcp"], "mcp": {}}],
            "intents": [{"name": "support.refund", "operations": [{"resource": "mcp", "tools": ["refund"],
                         "arguments": [{"pointer": "/amount", "max": 100}]}], "scopes": ["refunds:write"]}],
            "rules": [{"id": "agents", "effect": "allow", "classes": ["agent"], "intents": ["support.refund"]}]
        }
    })
    .to_string()
}

fn refund(caller: wit::Caller, arguments: &str) -> wit::Request {
    wit::Request {
        caller,
        intent: Some("support.refund".into()),
        task: None,
        intent_proof: None,
        method: "POST".into(),
        authority: "mcp.internal".into(),
        path: "/mcp".into(),
        mcp: Some(wit::McpCall { method: "tools/call".into(), name: Some("refund".into()), uri: None, arguments: Some(arguments.into()) }),
        delegation: None,
        now: NOW,
        environment: None,
        standing_secret: false,
    }
}

#[test]
fn component_verifies_tokens_and_judges_tool_arguments() {
    let Some(host) = component("component_verifies_tokens_and_judges_tool_arguments") else { return };
    let key = TestKey::es256("k1");
    let mut d = host.instantiate().unwrap();
    d.configure(&token_config(&key)).unwrap().unwrap();
    let token = key.sign(&svid_claims(SUB, AUD, NOW - 10, NOW + 300));
    let id = d.verify(&token, NOW).unwrap().unwrap();
    assert_eq!(id.principal, SUB);
    assert_eq!(id.trust_domain.as_deref(), Some("example.org"));
    assert!(!id.token_hash.is_empty() && id.token_hash.len() < 40, "a short hash, never the token");

    let out = d.decide(&refund(wit::Caller::Token(token.clone()), r#"{"amount": 42}"#)).unwrap();
    assert_eq!((out.effect, core_reason(out.reason)), (wit::Effect::Allow, Reason::Allowed));
    assert_eq!(out.scopes, vec!["refunds:write".to_string()]);
    assert!(!out.record.contains(&token), "the record never holds the token");

    let out = d.decide(&refund(wit::Caller::Verified(id), r#"{"amount": 420}"#)).unwrap();
    assert_eq!((out.effect, core_reason(out.reason)), (wit::Effect::Deny, Reason::ArgumentNotAllowed));
}

/// Attack: a token signed by another key under a known kid, and one replayed after expiry.
#[test]
fn component_refuses_forged_and_expired_tokens() {
    let Some(host) = component("component_refuses_forged_and_expired_tokens") else { return };
    let key = TestKey::es256("k1");
    let mut d = host.instantiate().unwrap();
    d.configure(&token_config(&key)).unwrap().unwrap();
    let forged = TestKey::es256("k1").sign(&svid_claims(SUB, AUD, NOW - 10, NOW + 300));
    let refusal = d.verify(&forged, NOW).unwrap().unwrap_err();
    assert_eq!(core_reason(refusal.reason), Reason::SignatureInvalid);
    assert_eq!(refusal.code, "signature_invalid");
    let out = d.decide(&refund(wit::Caller::Token(forged), r#"{"amount": 1}"#)).unwrap();
    assert_eq!((out.effect, core_reason(out.reason)), (wit::Effect::Deny, Reason::SignatureInvalid));
    let token = key.sign(&svid_claims(SUB, AUD, NOW - 10, NOW + 300));
    let refusal = d.verify(&token, NOW + 3600).unwrap().unwrap_err();
    assert_eq!(core_reason(refusal.reason), Reason::TokenExpired);
}

/// Attack: tool arguments that are not JSON must not slip past the argument constraints.
#[test]
fn component_refuses_tool_arguments_that_are_not_json() {
    let Some(host) = component("component_refuses_tool_arguments_that_are_not_json") else { return };
    let key = TestKey::es256("k1");
    let mut d = host.instantiate().unwrap();
    d.configure(&token_config(&key)).unwrap().unwrap();
    let token = key.sign(&svid_claims(SUB, AUD, NOW - 10, NOW + 300));
    let out = d.decide(&refund(wit::Caller::Token(token), r#"{"amount": 42"#)).unwrap();
    assert_eq!((out.effect, core_reason(out.reason)), (wit::Effect::Deny, Reason::McpMalformed));
}

/// Attack: a duplicate argument (plainly or escaped) that a lenient parser would merge (last
/// wins) must be refused as the filter refuses it, never judged on one of the two values.
#[test]
fn component_refuses_duplicate_argument_smuggling() {
    let Some(host) = component("component_refuses_duplicate_argument_smuggling") else { return };
    let key = TestKey::es256("k1");
    let mut d = host.instantiate().unwrap();
    d.configure(&token_config(&key)).unwrap().unwrap();
    let token = key.sign(&svid_claims(SUB, AUD, NOW - 10, NOW + 300));
    for args in [r#"{"amount": 42, "amount": 5000}"#, r#"{"amount": 5000, "\u0061mount": 42}"#, r#"{"amount": 1e400}"#] {
        let out = d.decide(&refund(wit::Caller::Token(token.clone()), args)).unwrap();
        assert_eq!((out.effect, core_reason(out.reason)), (wit::Effect::Deny, Reason::McpMalformed), "{args}");
    }
    // The same call with one amount within the limit is allowed: the refusal is the duplicate's.
    let out = d.decide(&refund(wit::Caller::Token(token), r#"{"amount": 42}"#)).unwrap();
    assert_eq!(out.effect, wit::Effect::Allow);
}

#[test]
fn component_fails_closed_before_configure_and_names_bad_fields() {
    let Some(host) = component("component_fails_closed_before_configure_and_names_bad_fields") else { return };
    let mut d = host.instantiate().unwrap();
    let out = d.decide(&refund(wit::Caller::Token("x".into()), "{}")).unwrap();
    assert_eq!((out.effect, core_reason(out.reason)), (wit::Effect::Deny, Reason::NotConfigured));
    assert_eq!(core_reason(d.verify("x", NOW).unwrap().unwrap_err().reason), Reason::NotConfigured);
    let err = d.configure(r#"{"policy": {"rules": [{"id": "r", "effect": "maybe"}]}}"#).unwrap().unwrap_err();
    assert_eq!(err.field, "policy.rules[0].effect", "{err:?}");
    // A refused configuration leaves the instance as it was: still unconfigured, still denying.
    let out = d.decide(&refund(wit::Caller::Token("x".into()), "{}")).unwrap();
    assert_eq!(core_reason(out.reason), Reason::NotConfigured);
}

/// The WIT's reason enum is Reason::ALL, in order, spelled with `-`.
#[test]
fn wit_reason_enum_is_every_core_reason_in_order() {
    let text = std::fs::read_to_string(repo().join("wit/mandate.wit")).unwrap();
    let body = text.split("enum reason {").nth(1).unwrap().split('}').next().unwrap();
    let wit_cases: Vec<String> = body
        .lines()
        .map(|l| l.trim().trim_end_matches(','))
        .filter(|l| !l.is_empty() && !l.starts_with("//"))
        .map(str::to_string)
        .collect();
    let core: Vec<String> = Reason::ALL.iter().map(|r| r.code().replace('_', "-")).collect();
    assert_eq!(wit_cases, core);
}

/// `mandate run --engine component` and the proxy-wasm filter on the test host (what `mandate
/// run --engine plugin` drives) read the same HTTP request and agree: an allowed tool call, one above its
/// argument limit, a forged token, a missing intent, a malformed JSON-RPC body.
#[test]
fn mandate_run_component_and_plugin_agree_on_http_requests() {
    if component("mandate_run_component_and_plugin_agree_on_http_requests").is_none() {
        return;
    }
    let Some(host) = common::host("mandate_run_component_and_plugin_agree_on_http_requests") else { return };
    let key = TestKey::es256("k1");
    host.set_time_secs(NOW);
    let mut vm = host.new_vm(b"", token_config(&key).as_bytes()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.json");
    std::fs::write(&cfg, token_config(&key)).unwrap();
    let token = key.sign(&svid_claims(SUB, AUD, NOW - 10, NOW + 300));
    let forged = TestKey::es256("k1").sign(&svid_claims(SUB, AUD, NOW - 10, NOW + 300));
    let call = |amount: i64| json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "refund", "arguments": {"amount": amount}}}).to_string();
    let cases = [
        ("allowed", token.as_str(), Some("support.refund"), call(42)),
        ("argument_not_allowed", token.as_str(), Some("support.refund"), call(420)),
        ("signature_invalid", forged.as_str(), Some("support.refund"), call(1)),
        ("intent_required", token.as_str(), None, call(1)),
        ("mcp_malformed", token.as_str(), Some("support.refund"), r#"{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "method": "tools/list"}"#.to_string()),
    ];
    for (want, tok, intent, body) in cases {
        let mut headers = vec![json!(["authorization", format!("Bearer {tok}")]), json!(["content-type", "application/json"])];
        if let Some(i) = intent {
            headers.push(json!(["x-agent-intent", i]));
        }
        let spec = json!({"method": "POST", "authority": "mcp.internal", "path": "/mcp", "headers": headers, "body": body, "time": NOW});
        let req = dir.path().join("request.json");
        std::fs::write(&req, spec.to_string()).unwrap();
        // The filter on the test host (in process: one compilation), as `mandate run` drives it.
        let spec_parsed: mandate_host_test::RequestSpec = serde_json::from_value(spec.clone()).unwrap();
        let plugin = serde_json::to_value(mandate_host_test::run_request(&host, &mut vm, &spec_parsed).unwrap()).unwrap();
        let run = |engine: &str| -> Value {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mandate"));
            cmd.args(["run", "--engine", engine, "--config"]).arg(&cfg).arg("--request").arg(&req).arg("--compact");
            cmd.arg("--component").arg(std::env::var_os("MANDATE_COMPONENT_WASM").map(PathBuf::from).unwrap_or_else(default_component_path));
            let out = cmd.output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            if want == "mcp_malformed" && engine == "component" {
                // The filter's strict JSON-RPC reader refuses it before the component is asked.
                assert_eq!(out.status.code(), Some(1), "{stdout}");
                assert!(String::from_utf8_lossy(&out.stderr).contains("mcp_malformed"));
                return json!({"reason": "mcp_malformed"});
            }
            assert!(out.status.success(), "{engine}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
            serde_json::from_str(&stdout).unwrap()
        };
        // The filter's verdict: forwarded, or a local reply naming its reason (JSON-RPC error
        // data for MCP calls).
        let reason = if plugin["verdict"] == json!("forwarded") {
            json!("allowed")
        } else {
            let body: Value = serde_json::from_str(plugin["local_reply"]["body"].as_str().unwrap()).unwrap();
            body.pointer("/error/data/reason").or_else(|| body.get("reason")).cloned().unwrap_or_else(|| panic!("no reason: {body}"))
        };
        let comp = run("component");
        assert_eq!(reason, json!(want), "plugin: {plugin}");
        assert_eq!(comp["reason"], json!(want), "component: {comp}");
        if want == "allowed" {
            assert_eq!(comp["effect"], json!("allow"));
            assert_eq!(comp["scopes"], json!(["refunds:write"]));
            assert_eq!(comp["record"]["identity"], json!(SUB));
        }
    }
}
