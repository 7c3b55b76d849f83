use super::*;
use crate::policy::cases::{evaluate_request, CaseFile};
use crate::testkit::{spiffe_bundle, svid_claims, TestKey};
use serde_json::{json, Value};
use std::path::Path;

// Wednesday 2026-11-25 10:00 UTC.
const NOW: u64 = 1_795_564_800 + 10 * 3600;
const AUD: &str = "spiffe://example.org/gw";
const SUB: &str = "spiffe://example.org/agent/a1";

fn config(key: &TestKey) -> Value {
    json!({
        "identity": {"audiences": [AUD], "trust_domains": [{"name": "example.org", "bundle": {"inline": spiffe_bundle(&[key], None)}}]},
        "policy": {
            "classes": [{"name": "agent", "principals": ["spiffe://example.org/agent/*"], "intent_required": true}],
            "resources": [{"name": "tickets", "hosts": ["tickets.internal"], "paths": ["/tickets/**"]}],
            "intents": [{"name": "ticket.read", "operations": [{"resource": "tickets", "methods": ["GET"]}], "scopes": ["tickets:read"]}],
            "rules": [{"id": "agents", "effect": "allow", "classes": ["agent"], "intents": ["ticket.read"]}]
        }
    })
}

fn decider(cfg: &Value) -> Decider {
    Decider::configure(cfg.to_string().as_bytes()).unwrap()
}

fn request(caller: Caller) -> DecideRequest {
    DecideRequest {
        caller,
        intent: Some("ticket.read".into()),
        task: None,
        intent_proof: None,
        method: "GET".into(),
        authority: "tickets.internal".into(),
        path: "/tickets/7".into(),
        mcp: None,
        delegation: None,
        now: NOW,
        environment: None,
        standing_secret: false,
    }
}

#[test]
fn raw_token_is_verified_then_decided_with_a_record() {
    let key = TestKey::es256("k1");
    let mut d = decider(&config(&key));
    let token = key.sign(&svid_claims(SUB, AUD, NOW - 10, NOW + 300));
    let out = d.decide(&request(Caller::Token(token.clone())));
    assert_eq!((out.effect, out.reason), (Effect::Allow, Reason::Allowed), "{out:?}");
    assert_eq!(out.rule_id.as_deref(), Some("agents"));
    assert_eq!(out.scopes, vec!["tickets:read".to_string()]);
    let rec: Value = serde_json::from_str(&out.record).unwrap();
    assert_eq!(rec["decision_id"], json!(out.decision_id));
    assert_eq!(rec["identity"], json!(SUB));
    assert_eq!(rec["reason"], json!("allowed"));
    assert_eq!(rec["ts_ms"], json!(NOW * 1000));
    // The token itself never appears in the record, only its short hash.
    assert!(!out.record.contains(&token));
    assert!(rec["token_hash"].as_str().is_some_and(|h| !h.is_empty() && h.len() < 40));
}

#[test]
fn forged_token_signature_is_denied_fail_closed() {
    let key = TestKey::es256("k1");
    let other = TestKey::es256("k1");
    let mut d = decider(&config(&key));
    // Same kid, another key: a forger who knows the key id.
    let forged = other.sign(&svid_claims(SUB, AUD, NOW - 10, NOW + 300));
    let out = d.decide(&request(Caller::Token(forged.clone())));
    assert_eq!(out.effect, Effect::Deny);
    assert_eq!(out.reason, d.verify(&forged, NOW).unwrap_err());
    let rec: Value = serde_json::from_str(&out.record).unwrap();
    assert_eq!(rec["identity"], Value::Null, "a refused token names no identity");
}

#[test]
fn expired_token_replayed_later_is_refused_by_verify() {
    let key = TestKey::es256("k1");
    let mut d = decider(&config(&key));
    let token = key.sign(&svid_claims(SUB, AUD, NOW - 10, NOW + 300));
    assert_eq!(d.verify(&token, NOW).unwrap().principal, SUB);
    let late = d.verify(&token, NOW + 3600).unwrap_err();
    assert_eq!(d.decide(&DecideRequest { now: NOW + 3600, ..request(Caller::Token(token)) }).reason, late);
}

#[test]
fn garbage_intent_token_is_intent_token_invalid() {
    let key = TestKey::es256("k1");
    let mut d = decider(&config(&key));
    let caller = d.verify(&key.sign(&svid_claims(SUB, AUD, NOW - 10, NOW + 300)), NOW).unwrap();
    let req = DecideRequest { intent_proof: Some(IntentProof::Token("not.a.token".into())), ..request(Caller::Verified(caller)) };
    let out = d.decide(&req);
    assert_eq!((out.effect, out.reason), (Effect::Deny, Reason::IntentTokenInvalid));
}

#[test]
fn without_a_policy_every_request_is_denied() {
    let key = TestKey::es256("k1");
    let mut cfg = config(&key);
    cfg.as_object_mut().unwrap().remove("policy");
    let mut d = decider(&cfg);
    let out = d.decide(&request(Caller::Token(key.sign(&svid_claims(SUB, AUD, NOW - 10, NOW + 300)))));
    assert_eq!((out.effect, out.reason), (Effect::Deny, Reason::NoRuleMatched));
}

#[test]
fn invalid_config_is_refused_naming_the_field() {
    let Err(e) = Decider::configure(br#"{"policy": {"rules": [{"id": "r", "effect": "maybe"}]}}"#) else { panic!("accepted") };
    assert!(e.to_string().contains("policy.rules[0].effect"), "{e}");
    let Err(e) = Decider::configure(b"{not json") else { panic!("accepted") };
    assert!(!e.to_string().is_empty());
}

#[test]
fn decision_ids_differ_per_decision() {
    let key = TestKey::es256("k1");
    let mut d = decider(&config(&key));
    let r = request(Caller::Token(key.sign(&svid_claims(SUB, AUD, NOW - 10, NOW + 300))));
    let (a, b) = (d.decide(&r).decision_id, d.decide(&r).decision_id);
    assert_ne!(a, b);
    assert_eq!(a.len(), 24);
}

/// Every case in policies/ decides the same through the embedded API as through
/// `mandate policy test` (effect, reason, rule, dry-run rule, scopes, TTL), and as expected.
#[test]
fn every_policies_case_decides_as_policy_test() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let p = entry.path();
        if !p.to_string_lossy().ends_with(".cases.json") {
            continue;
        }
        let file: CaseFile = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        let doc_path = p.parent().unwrap().join(&file.policy);
        let doc: Value = serde_json::from_slice(&std::fs::read(&doc_path).unwrap()).unwrap();
        let policy = cases::load_policy(&doc_path).unwrap();
        let mut with = decider(&cases::case_config(&doc, true));
        let mut without = decider(&cases::case_config(&doc, false));
        for case in &file.cases {
            let mut r = case.request.clone();
            let minter = r.minter.unwrap_or(file.minter);
            r.minter = Some(minter);
            let native = evaluate_request(&policy, &r).unwrap();
            let out = (if minter { &mut with } else { &mut without }).decide(&DecideRequest::from_case(&r).unwrap());
            let got = (out.effect, out.reason, out.rule_id.clone(), out.dry_run_rule_id.clone(), out.scopes.clone(), out.ttl_s);
            let want = (native.effect, native.reason, native.rule_id, native.dry_run_rule_id, native.scopes, native.ttl_s);
            assert_eq!(got, want, "{}: {}", p.display(), case.name);
            n += 1;
        }
    }
    assert!(n > 50, "only {n} cases found");
}

/// The MCP support policy (policies/), a verified agent working task `TASK`, and a refund call.
mod mcp {
    use super::*;

    const TASK: &str = "tsk_7Qm2xL9pV4cR8nB1sK3wJd";

    fn support() -> Decider {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/mcp-support.policy.json");
        let doc: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        decider(&cases::case_config(&doc, true))
    }

    fn call(name: &str, arguments: &str) -> DecideRequest {
        let agent = CallerIdentity { principal: "spiffe://acme.example/agent/support/a1".into(), trust_domain: None, issued_at: Some(NOW - 10), expires_at: NOW + 290, token_hash: String::new() };
        DecideRequest {
            intent: Some("refund.small".into()),
            task: Some(TASK.into()),
            method: "POST".into(),
            authority: "mcp.acme.internal".into(),
            path: "/mcp".into(),
            mcp: Some(McpRequest { method: "tools/call".into(), name: Some(name.into()), uri: None, arguments: Some(arguments.into()) }),
            ..request(Caller::Verified(agent))
        }
    }

    fn refund(amount: &str) -> String {
        format!(r#"{{"ticket_id":"{TASK}","amount":{amount}}}"#)
    }

    #[test]
    fn a_refund_within_the_limit_is_allowed_and_above_it_refused() {
        let mut d = support();
        let ok = d.decide(&call("refund", &refund("42.5")));
        assert_eq!((ok.effect, ok.reason), (Effect::Allow, Reason::Allowed), "{ok:?}");
        assert_eq!(d.decide(&call("refund", &refund("5000"))).reason, Reason::ArgumentNotAllowed);
        // The record names the call and the constraints tested, as the filter's body path does.
        let rec: Value = serde_json::from_str(&ok.record).unwrap();
        assert_eq!((&rec["mcp"]["method"], &rec["mcp"]["tool"], &rec["mcp"]["path"]), (&json!("tools/call"), &json!("refund"), &json!("body")), "{rec}");
        let pointers: Vec<&Value> = rec["mcp"]["checked"].as_array().unwrap().iter().map(|c| &c["pointer"]).collect();
        assert_eq!(pointers, [&json!("/amount"), &json!("/ticket_id")], "{rec}");
    }

    #[test]
    fn arguments_that_close_the_object_cannot_rewrite_the_message() {
        // Text spliced after the arguments would add members to `params` (another tool) or to
        // the envelope (another method): the text must be one JSON value, or the call is malformed.
        let mut d = support();
        for trick in [
            format!(r#"{}, "name": "delete_customer""#, refund("1")),
            format!(r#"{}}}, "method": "tools/list", "x": {{"#, refund("1")),
            format!(r#"{} {{"amount": 5000}}"#, refund("1")),
            format!("{}]", refund("1")),
            String::new(),
        ] {
            assert_eq!(cases::mcp_message("tools/call", Some("refund"), None, Some(&trick)), None, "{trick}");
            let out = d.decide(&call("refund", &trick));
            assert_eq!((out.effect, out.reason), (Effect::Deny, Reason::McpMalformed), "{trick}");
        }
    }

    #[test]
    fn duplicate_argument_keys_are_malformed_not_merged() {
        // A lenient reader keeps the last `amount` (or the first): the filter refuses both ways.
        let mut d = support();
        for dup in [
            format!(r#"{{"ticket_id":"{TASK}","amount":1,"amount":5000}}"#),
            format!(r#"{{"ticket_id":"{TASK}","amount":1,"\u0061mount":5000}}"#),
            format!(r#"{{"ticket_id":"{TASK}","amount":1,"meta":{{"a":1,"a":2}}}}"#),
        ] {
            assert_eq!(d.decide(&call("refund", &dup)).reason, Reason::McpMalformed, "{dup}");
        }
    }

    #[test]
    fn arguments_that_are_not_an_object_are_malformed() {
        let mut d = support();
        for bad in ["[1,2]", "\"amount\"", "42", "null", "{\"amount\":1e400}", &"[".repeat(200)] {
            assert_eq!(d.decide(&call("refund", bad)).reason, Reason::McpMalformed, "{bad}");
        }
    }

    #[test]
    fn a_tool_name_with_quotes_is_escaped_not_spliced() {
        // `refund","name":"get_ticket` is one (odd) tool name, never a second `name` member.
        let mut d = support();
        let out = d.decide(&call(r#"get_ticket","name":"refund"#, &refund("1")));
        assert_eq!(out.effect, Effect::Deny, "{out:?}");
        let m = cases::mcp_message("tools/call", Some(r#"a","name":"b"#), Some("x\"y"), None).unwrap();
        let v: Value = serde_json::from_str(&m).unwrap();
        assert_eq!(v["params"]["name"], json!(r#"a","name":"b"#));
        assert_eq!(v["params"]["uri"], json!("x\"y"));
    }

    #[test]
    fn a_notification_has_no_id_and_a_call_without_params_none() {
        let n: Value = serde_json::from_str(&cases::mcp_message("notifications/initialized", None, None, None).unwrap()).unwrap();
        assert_eq!(n, json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
        let l: Value = serde_json::from_str(&cases::mcp_message("tools/list", None, None, Some(" {} ")).unwrap()).unwrap();
        assert_eq!(l, json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"arguments": {}}}));
    }
}
