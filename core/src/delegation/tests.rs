//! Delegation through the engine: each bad input is named after the attack it stands for.

use crate::config;
use crate::decision::Effect;
use crate::engine::*;
use crate::headers::Headers;
use crate::reason::Reason;
use crate::record::DecisionRecord;
use crate::testkit::{plain_jwks, spiffe_bundle, svid_claims, TestKey};
use serde_json::{json, Value};

const NOW: u64 = 1_795_564_800 + 10 * 3600;
const AUD: &str = "spiffe://example.org/gw";
const ISS: &str = "https://minter.example";
const TD: &str = "example.org";
const A: &str = "spiffe://example.org/agent/a";
const B: &str = "spiffe://example.org/sub/b";
const C: &str = "spiffe://example.org/sub/c";
const D: &str = "spiffe://example.org/sub/d";
/// A sub-agent the policy denies everything.
const UNTRUSTED: &str = "spiffe://example.org/sub/untrusted";
/// A tool workload: no delegation rule hands work to its class.
const TOOL: &str = "spiffe://example.org/tool/t";
const HOST: &str = "mcp.acme.internal";

struct Keys {
    svid: TestKey,
    minter: TestKey,
}

fn keys() -> Keys {
    Keys { svid: TestKey::es256("svid-k"), minter: TestKey::es256("txn-k") }
}

fn policy() -> Value {
    json!({
        "classes": [
            {"name": "agent", "principals": ["spiffe://example.org/agent/*"], "intent_required": true},
            {"name": "subagent", "principals": ["spiffe://example.org/sub/*"], "intent_required": true},
            {"name": "tool", "principals": ["spiffe://example.org/tool/*"]}
        ],
        "resources": [
            {"name": "cases", "hosts": ["cases.internal"], "paths": ["/cases/**"], "audience": "https://cases.internal"},
            {"name": "billing", "hosts": ["billing.internal"], "paths": ["/billing/**"], "audience": "https://billing.internal"},
            {"name": "subagent-b", "hosts": ["b.internal"], "paths": ["/**"], "txn_token": "forward", "workload": B},
            {"name": "support-mcp", "hosts": [HOST], "paths": ["/mcp"], "audience": "support-mcp", "mcp": {"body": "when_needed"}}
        ],
        "intents": [
            {"name": "case.resolve", "scopes": ["cases:write"], "operations": [
                {"resource": "cases", "methods": ["GET", "POST"]},
                {"resource": "billing", "methods": ["GET"]},
                {"resource": "subagent-b", "methods": ["POST"]},
                {"resource": "support-mcp", "tools": ["lookup", "refund"]}]},
            {"name": "case.read", "scopes": ["cases:read"], "operations": [{"resource": "cases", "methods": ["GET"]}]}
        ],
        "rules": [
            {"id": "no-untrusted", "effect": "deny", "principals": [UNTRUSTED]},
            {"id": "no-billing-for-subagents", "effect": "deny", "classes": ["subagent"], "resources": ["billing"]},
            {"id": "workers", "effect": "allow", "classes": ["agent", "subagent", "tool"]}
        ],
        "delegation_rules": [
            {"id": "agent-to-sub", "intents": ["case.resolve"], "from": ["agent"], "to": ["subagent"]},
            {"id": "sub-to-sub", "intents": ["case.resolve"], "from": ["subagent"], "to": ["subagent"]},
            {"id": "sub-to-agent", "intents": ["case.resolve"], "from": ["subagent"], "to": ["agent"]}
        ]
    })
}

fn cfg(k: &Keys, minter: bool, edit: impl FnOnce(&mut Value)) -> Value {
    let mut c = json!({
        "identity": {"audiences": [AUD], "trust_domains": [{"name": TD, "bundle": {"inline": spiffe_bundle(&[&k.svid], None)}}]},
        "policy": policy(),
        "delegation": {"issuer": ISS, "audience": TD, "keys": {"inline": plain_jwks(&[&k.minter])}}
    });
    if minter {
        c["minter"] = json!({"cluster": "minter", "timeout_ms": 300});
    }
    edit(&mut c);
    c
}

fn engine_from(c: &Value) -> Engine {
    Engine::new(config::parse(c.to_string().as_bytes()).unwrap(), 7, None).unwrap()
}

fn engine(k: &Keys) -> Engine {
    engine_from(&cfg(k, false, |_| {}))
}

fn svid(k: &Keys, who: &str) -> String {
    k.svid.sign(&svid_claims(who, AUD, NOW, NOW + 300))
}

/// Claims of a Txn-Token whose chain is `chain` (original principal first, current actor last).
fn claims(chain: &[&str]) -> Value {
    let mut act = Value::Null;
    for p in chain.iter().skip(1) {
        act = if act.is_null() { json!({"sub": p}) } else { json!({"sub": p, "act": act}) };
    }
    let mut c = json!({
        "iss": ISS, "aud": TD, "iat": NOW - 10, "exp": NOW + 120, "jti": "j0AAAAAAAAAAAAAAAAAAAA", "txn": "tx0AAAAAAAAAAAAAAAAAAA",
        "sub": chain[0], "scope": "cases:write cases:read", "req_wl": chain[chain.len() - 1],
        "tctx": {"task": "T-1", "intent": "case.resolve"}
    });
    if !act.is_null() {
        c["act"] = act;
    }
    c
}

fn sign_txn(key: &TestKey, claims: &Value) -> String {
    key.sign_with_header("ES256", &json!({"alg": "ES256", "kid": key.kid, "typ": "txntoken+jwt"}), claims)
}

fn txn(k: &Keys, chain: &[&str]) -> String {
    sign_txn(&k.minter, &claims(chain))
}

fn request(k: &Keys, caller: &str, txn: Option<&str>, extra: &[(&str, &str)]) -> Headers {
    let mut v: Vec<(String, String)> = vec![
        (":method".into(), "GET".into()),
        (":authority".into(), "cases.internal".into()),
        (":path".into(), "/cases/7".into()),
        ("authorization".into(), format!("Bearer {}", svid(k, caller))),
        ("x-agent-intent".into(), "case.resolve".into()),
    ];
    if let Some(t) = txn {
        v.push(("txn-token".into(), t.into()));
    }
    for (name, val) in extra {
        v.retain(|(n, _)| n != name);
        v.push((name.to_string(), val.to_string()));
    }
    Headers::new(v)
}

fn run(e: &mut Engine, h: &Headers) -> Outcome {
    e.on_request(&Request { headers: h, now: NOW })
}

fn refused(out: &Outcome) -> (u16, Reason) {
    match &out.verdict {
        Verdict::Reply(r) => (r.status, out.decision.reason()),
        other => panic!("not refused: {other:?}"),
    }
}

fn forwarded(out: Outcome) -> HeaderEdits {
    match out.verdict {
        Verdict::Forward(e) => e,
        other => panic!("not forwarded: {other:?} / {:?} {:?}", out.decision.reason(), out.decision.delegation),
    }
}

fn invalid_word(out: &Outcome) -> Option<&'static str> {
    out.decision.delegation.as_ref().and_then(|d| d.invalid)
}

/// A refusal at verification: 401 `delegation_token_invalid`, for the reason named.
fn assert_invalid(k: &Keys, token: &str, caller: &str, word: &str) {
    let mut e = engine(k);
    let out = run(&mut e, &request(k, caller, Some(token), &[]));
    assert_eq!(refused(&out), (401, Reason::DelegationTokenInvalid), "{word}");
    assert_eq!(invalid_word(&out), Some(word));
    let Verdict::Reply(r) = &out.verdict else { unreachable!() };
    assert!(!r.body.contains(token) && !r.headers.iter().any(|(_, v)| v.contains(token)), "the token is never echoed");
}

// ------------------------------------------------------------------ allowed

#[test]
fn allowed_two_hop_chain_is_judged_for_every_principal_and_recorded() {
    let k = keys();
    let mut e = engine(&k);
    let t = txn(&k, &[A, B, C]);
    let out = run(&mut e, &request(&k, C, Some(&t), &[]));
    assert_eq!(out.decision.effect(), Effect::Allow, "{:?}", out.decision);
    assert_eq!(out.decision.task.as_deref(), Some("T-1"), "the token's task is used when none is declared");
    let info = out.decision.delegation.clone().unwrap();
    assert_eq!(info.depth, Some(2));
    let chain: Vec<(&str, Option<&str>)> = info.chain.iter().map(|c| (c.principal.as_str(), c.class.as_deref())).collect();
    assert_eq!(chain, [(A, Some("agent")), (B, Some("subagent")), (C, Some("subagent"))]);
    assert!(info.txn.as_deref().is_some_and(|h| h.starts_with("sha256:")));
    let rec = DecisionRecord::new(&out.decision, None, "", 0, 0).to_json();
    let v: Value = serde_json::from_str(&rec).unwrap();
    assert_eq!(v["delegation"]["depth"], 2);
    assert_eq!(v["delegation"]["chain"][0], json!({"principal": A, "class": "agent"}));
    assert!(!rec.contains(&t) && !rec.contains("tx0AAAA"), "tokens and the txn id appear as hashes only");
    let edits = forwarded(out);
    assert!(edits.remove.contains(&"txn-token".to_string()), "stripped before forwarding: {edits:?}");
}

#[test]
fn root_token_presented_by_its_subject_is_depth_zero() {
    let k = keys();
    let mut e = engine(&k);
    let out = run(&mut e, &request(&k, A, Some(&txn(&k, &[A])), &[]));
    assert_eq!(out.decision.effect(), Effect::Allow, "{:?}", out.decision.delegation);
    assert_eq!(out.decision.delegation.unwrap().depth, Some(0));
}

#[test]
fn request_without_the_header_takes_todays_path() {
    let k = keys();
    let mut e = engine(&k);
    let out = run(&mut e, &request(&k, A, None, &[]));
    assert_eq!(out.decision.effect(), Effect::Allow);
    assert!(out.decision.delegation.is_none());
}

#[test]
fn warm_delegated_call_reuses_the_verification_and_the_decision() {
    let k = keys();
    let mut e = engine(&k);
    let t = txn(&k, &[A, B]);
    let h = request(&k, B, Some(&t), &[]);
    assert_eq!(run(&mut e, &h).decision.effect(), Effect::Allow);
    let out = run(&mut e, &h);
    assert!(out.decision.decision_cache_hit && out.decision.identity_cache_hit);
    assert_eq!(out.decision.delegation.as_ref().map(|d| d.depth), Some(Some(1)));
    // Another chain (same caller, same request) never shares the cached decision.
    let other = sign_txn(&k.minter, &{
        let mut c = claims(&[A, B]);
        c["jti"] = json!("j1AAAAAAAAAAAAAAAAAAAA");
        c
    });
    assert!(!run(&mut e, &request(&k, B, Some(&other), &[])).decision.decision_cache_hit);
    // Nor does the same caller without a token.
    assert!(!run(&mut e, &request(&k, B, None, &[])).decision.decision_cache_hit);
}

// ------------------------------------------------------------------ step 1: the token

#[test]
fn forged_signature_is_refused() {
    let k = keys();
    let forger = TestKey::es256("txn-k");
    assert_invalid(&k, &sign_txn(&forger, &claims(&[A, B])), B, "signature");
}

#[test]
fn wrong_typ_is_refused() {
    let k = keys();
    let t = k.minter.sign(&claims(&[A, B]));
    assert_invalid(&k, &t, B, "typ");
    let t = k.minter.sign_intent(&claims(&[A, B]));
    assert_invalid(&k, &t, B, "typ");
}

#[test]
fn svid_presented_as_a_txn_token_is_refused() {
    let k = keys();
    // The caller's own SVID, and an SVID signed with the minter's key, as the Txn-Token.
    assert_invalid(&k, &svid(&k, B), B, "typ");
    assert_invalid(&k, &k.minter.sign(&svid_claims(B, TD, NOW, NOW + 60)), B, "typ");
}

#[test]
fn txn_token_presented_as_an_svid_is_refused() {
    let k = keys();
    let mut e = engine(&k);
    let t = txn(&k, &[A, B]);
    let mut h = request(&k, B, None, &[]);
    h = Headers::new(h.pairs().map(|(n, v)| if n == b"authorization" { (n.to_vec(), format!("Bearer {t}").into_bytes()) } else { (n.to_vec(), v.to_vec()) }).collect());
    assert_eq!(run(&mut e, &h).decision.reason(), Reason::TypNotAllowed);
}

#[test]
fn expired_txn_token_is_refused_even_from_the_cache() {
    let k = keys();
    let mut c = claims(&[A, B]);
    c["iat"] = json!(NOW - 300);
    c["exp"] = json!(NOW - 31);
    assert_invalid(&k, &sign_txn(&k.minter, &c), B, "expired");
    let mut e = engine(&k);
    let t = txn(&k, &[A, B]);
    let h = request(&k, B, Some(&t), &[]);
    assert_eq!(run(&mut e, &h).decision.effect(), Effect::Allow);
    let later = e.on_request(&Request { headers: &h, now: NOW + 200 });
    assert_eq!((later.decision.reason(), invalid_word(&later)), (Reason::DelegationTokenInvalid, Some("expired")));
    let mut c = claims(&[A, B]);
    c["exp"] = json!(NOW + 20);
    let t = sign_txn(&k.minter, &c);
    let h = request(&k, B, Some(&t), &[]);
    assert_eq!(run(&mut e, &h).decision.effect(), Effect::Allow);
    let later = e.on_request(&Request { headers: &h, now: NOW + 60 });
    assert_eq!((later.decision.reason(), invalid_word(&later)), (Reason::DelegationTokenInvalid, Some("expired")));
}

#[test]
fn issued_in_the_future_is_refused() {
    let k = keys();
    let mut c = claims(&[A, B]);
    c["iat"] = json!(NOW + 100);
    c["exp"] = json!(NOW + 200);
    assert_invalid(&k, &sign_txn(&k.minter, &c), B, "not_yet_valid");
}

#[test]
fn wrong_audience_is_refused() {
    let k = keys();
    let mut c = claims(&[A, B]);
    c["aud"] = json!("other.org");
    assert_invalid(&k, &sign_txn(&k.minter, &c), B, "aud");
    c["aud"] = json!([TD]);
    assert_invalid(&k, &sign_txn(&k.minter, &c), B, "claims");
}

#[test]
fn wrong_issuer_is_refused() {
    let k = keys();
    let mut c = claims(&[A, B]);
    c["iss"] = json!("https://evil.example");
    assert_invalid(&k, &sign_txn(&k.minter, &c), B, "iss");
}

#[test]
fn unknown_tctx_member_is_refused() {
    let k = keys();
    let mut c = claims(&[A, B]);
    c["tctx"]["allow_everything"] = json!(true);
    assert_invalid(&k, &sign_txn(&k.minter, &c), B, "claims");
    let mut c = claims(&[A, B]);
    c["tctx"]["arguments"] = json!([{"pointer": "/amount", "max": 10, "pattern": "*"}]);
    assert_invalid(&k, &sign_txn(&k.minter, &c), B, "claims");
}

#[test]
fn missing_or_misshapen_claims_are_refused() {
    let k = keys();
    for (what, edit) in [
        ("no txn", json!({"txn": null})),
        ("scope not a string", json!({"scope": ["cases:write"]})),
        ("empty scope", json!({"scope": ""})),
        ("double space in scope", json!({"scope": "a  b"})),
        ("sub not a SPIFFE ID", json!({"sub": "agent-a"})),
        ("iat as a string", json!({"iat": "1"})),
        ("tctx without a task", json!({"tctx": {"intent": "case.resolve"}})),
        ("tctx intent malformed", json!({"tctx": {"task": "T-1", "intent": "Case Resolve"}})),
        ("argument equals an object", json!({"tctx": {"task": "T-1", "intent": "case.resolve", "arguments": [{"pointer": "/a", "equals": {}}]}})),
        ("argument with no check", json!({"tctx": {"task": "T-1", "intent": "case.resolve", "arguments": [{"pointer": "/a"}]}})),
        ("may_act with extra members", json!({"may_act": {"sub": C, "scope": "x"}})),
    ] {
        let mut c = claims(&[A, B]);
        for (name, v) in edit.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(name);
            } else {
                c[name] = v.clone();
            }
        }
        let mut e = engine(&k);
        let out = run(&mut e, &request(&k, B, Some(&sign_txn(&k.minter, &c)), &[]));
        assert_eq!(refused(&out), (401, Reason::DelegationTokenInvalid), "{what}");
    }
}

#[test]
fn requesting_workload_other_than_the_current_actor_is_refused() {
    let k = keys();
    let mut c = claims(&[A, B]);
    c["req_wl"] = json!(A);
    assert_invalid(&k, &sign_txn(&k.minter, &c), B, "req_wl");
}

#[test]
fn malformed_act_is_refused() {
    let k = keys();
    let mut c = claims(&[A, B]);
    c["act"] = json!({"sub": B, "iss": ISS});
    assert_invalid(&k, &sign_txn(&k.minter, &c), B, "claims");
    c["act"] = json!({"sub": "not-a-spiffe-id"});
    c["req_wl"] = json!("not-a-spiffe-id");
    assert_invalid(&k, &sign_txn(&k.minter, &c), B, "act");
    c["act"] = json!("spiffe://example.org/sub/b");
    assert_invalid(&k, &sign_txn(&k.minter, &c), B, "claims");
}

#[test]
fn oversized_act_is_refused_as_malformed() {
    let k = keys();
    let chain: Vec<String> = (0..18).map(|i| format!("spiffe://example.org/sub/s{i}")).collect();
    let refs: Vec<&str> = chain.iter().map(String::as_str).collect();
    let last = refs[refs.len() - 1];
    assert_invalid(&k, &txn(&k, &refs), last, "act_oversized");
}

#[test]
fn repeated_txn_token_header_is_refused() {
    let k = keys();
    let mut e = engine(&k);
    let t = txn(&k, &[A, B]);
    let h = request(&k, B, Some(&t), &[]);
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = h.pairs().map(|(n, v)| (n.to_vec(), v.to_vec())).collect();
    pairs.push((b"txn-token".to_vec(), t.clone().into_bytes()));
    let out = run(&mut e, &Headers::new(pairs));
    assert_eq!(refused(&out), (401, Reason::DelegationTokenInvalid));
    assert_eq!(invalid_word(&out), Some("repeated"));
}

// ------------------------------------------------------------------ step 2: the chain

#[test]
fn loop_a_to_b_to_a_is_refused() {
    let k = keys();
    let mut e = engine(&k);
    let out = run(&mut e, &request(&k, A, Some(&txn(&k, &[A, B, A])), &[]));
    assert_eq!(refused(&out), (403, Reason::DelegationLoop));
    assert_eq!(out.decision.delegation.unwrap().chain.len(), 3, "the record shows the chain");
}

#[test]
fn chain_one_hop_too_deep_is_refused() {
    let k = keys();
    let mut e = engine(&k);
    let out = run(&mut e, &request(&k, D, Some(&txn(&k, &[A, B, C, D])), &[]));
    assert_eq!(refused(&out), (403, Reason::DelegationChainTooDeep));
    // A policy cap below the configuration's applies.
    let mut e = engine_from(&cfg(&k, false, |c| c["policy"]["max_delegations"] = json!(1)));
    let out = run(&mut e, &request(&k, C, Some(&txn(&k, &[A, B, C])), &[]));
    assert_eq!(refused(&out), (403, Reason::DelegationChainTooDeep));
}

#[test]
fn actor_mismatch_b_replaying_as_root_token_is_refused() {
    // A's root token (no act: A is the current actor), presented by B as its own.
    let k = keys();
    let mut e = engine(&k);
    let out = run(&mut e, &request(&k, B, Some(&txn(&k, &[A])), &[]));
    assert_eq!(refused(&out), (403, Reason::DelegationActorMismatch));
    // And B's token lifted by C.
    let out = run(&mut e, &request(&k, C, Some(&txn(&k, &[A, B])), &[]));
    assert_eq!(refused(&out), (403, Reason::DelegationActorMismatch));
}

// ------------------------------------------------------------------ step 3: the context

#[test]
fn intent_or_task_mismatch_is_scope_exceeded() {
    let k = keys();
    let mut e = engine(&k);
    let t = txn(&k, &[A, B]);
    for extra in [
        vec![("x-agent-intent", "case.read")],
        vec![("x-agent-task", "T-2")],
    ] {
        let out = run(&mut e, &request(&k, B, Some(&t), &extra));
        assert_eq!(refused(&out), (403, Reason::DelegationScopeExceeded), "{extra:?}");
    }
    let h: Vec<(Vec<u8>, Vec<u8>)> = request(&k, B, Some(&t), &[]).pairs().filter(|(n, _)| *n != b"x-agent-intent").map(|(n, v)| (n.to_vec(), v.to_vec())).collect();
    let out = run(&mut e, &Headers::new(h));
    assert_eq!(refused(&out), (403, Reason::DelegationScopeExceeded), "the intent must be declared, and be the token's");
    // The token's own task, declared: allowed.
    assert_eq!(run(&mut e, &request(&k, B, Some(&t), &[("x-agent-task", "T-1")])).decision.effect(), Effect::Allow);
}

// ------------------------------------------------------------------ step 4: revocations

fn revoke(e: &mut Engine, entries: Value) {
    let ms = NOW * 1000;
    e.due_poll(ms).expect("a poll is due");
    let page = json!({"epoch": "E1", "cursor": 1, "reset": false, "more": false, "revocations": entries}).to_string();
    e.on_revocations(Ok((200, page.as_bytes())), ms).unwrap();
}

#[test]
fn revoked_task_refuses_every_hop() {
    let k = keys();
    let mut e = engine_from(&cfg(&k, true, |_| {}));
    let t = txn(&k, &[A, B]);
    assert!(matches!(run(&mut e, &request(&k, B, Some(&t), &[])).verdict, Verdict::Mint(_)));
    revoke(&mut e, json!([{"seq": 1, "kind": "task", "value": "T-1", "subject": A, "at": NOW}]));
    assert_eq!(refused(&run(&mut e, &request(&k, B, Some(&t), &[]))), (403, Reason::TaskRevoked), "the task ended for A ends it for B");
}

#[test]
fn revoked_middle_principal_refuses_the_chain() {
    let k = keys();
    let mut e = engine_from(&cfg(&k, true, |_| {}));
    let t = txn(&k, &[A, B, C]);
    assert!(matches!(run(&mut e, &request(&k, C, Some(&t), &[])).verdict, Verdict::Mint(_)));
    revoke(&mut e, json!([{"seq": 1, "kind": "subject", "value": B, "at": NOW}]));
    assert_eq!(refused(&run(&mut e, &request(&k, C, Some(&t), &[]))), (403, Reason::SubjectRevoked));
}

#[test]
fn revoked_txn_token_jti_still_served_from_the_credential_cache() {
    // The minter revokes a leaked Txn-Token by its `jti`: the feed says so, and the filter must
    // stop honouring the token at once, not keep serving the credential it cached for it.
    let k = keys();
    let mut e = engine_from(&cfg(&k, true, |_| {}));
    let t = txn(&k, &[A, B]);
    let out = run(&mut e, &request(&k, B, Some(&t), &[]));
    let Verdict::Mint(plan) = out.verdict else { panic!("{:?}", out.decision.reason()) };
    let mut d = out.decision;
    let (v, _) = e.finish_mint(&plan, Ok((200, &minted(A, Some(B), "tx0AAAAAAAAAAAAAAAAAAA"))), NOW, &mut d);
    assert!(matches!(v, Verdict::Forward(_)), "{:?}", d.reason());
    assert!(run(&mut e, &request(&k, B, Some(&t), &[])).decision.credential_cache_hit, "warm");
    revoke(&mut e, json!([{"seq": 1, "kind": "jti", "value": "j0AAAAAAAAAAAAAAAAAAAA", "at": NOW}]));
    let out = run(&mut e, &request(&k, B, Some(&t), &[]));
    assert_eq!(refused(&out), (401, Reason::DelegationTokenInvalid), "a revoked Txn-Token is refused, cached credential or not");
    assert_eq!(invalid_word(&out), Some("revoked"));
}

// ------------------------------------------------------------------ steps 5 and 6

#[test]
fn edge_not_allowed_is_refused_naming_it() {
    let k = keys();
    let mut e = engine(&k);
    let out = run(&mut e, &request(&k, TOOL, Some(&txn(&k, &[A, TOOL])), &[]));
    assert_eq!(refused(&out), (403, Reason::DelegationNotAllowed));
    let f = out.decision.delegation.unwrap().failed.clone().unwrap();
    assert_eq!((f.principal.as_str(), f.from.as_deref()), (TOOL, Some(A)));
    // An edge for another intent does not count.
    let mut c = claims(&[A, B]);
    c["tctx"]["intent"] = json!("case.read");
    let out = run(&mut e, &request(&k, B, Some(&sign_txn(&k.minter, &c)), &[("x-agent-intent", "case.read")]));
    assert_eq!(refused(&out), (403, Reason::DelegationNotAllowed));
}

#[test]
fn intersection_a_allowed_but_b_not_is_refused_naming_b() {
    let k = keys();
    let mut e = engine(&k);
    let out = run(&mut e, &request(&k, UNTRUSTED, Some(&txn(&k, &[A, UNTRUSTED])), &[]));
    assert_eq!(refused(&out), (403, Reason::DelegationNotAllowed));
    let f = out.decision.delegation.unwrap().failed.clone().unwrap();
    assert_eq!((f.principal.as_str(), f.reason, f.rule.as_deref()), (UNTRUSTED, Reason::DeniedByRule, Some("no-untrusted")));
}

#[test]
fn intersection_b_allowed_but_a_not_is_refused_naming_a() {
    // Sub-agents may not touch billing: A (an agent) may, but a chain through B may not; and a
    // chain whose original principal may not cannot be laundered through one that may.
    let k = keys();
    let mut e = engine(&k);
    let h = request(&k, B, Some(&txn(&k, &[A, B])), &[(":authority", "billing.internal"), (":path", "/billing/1")]);
    let out = run(&mut e, &h);
    assert_eq!(refused(&out), (403, Reason::DelegationNotAllowed));
    assert_eq!(out.decision.delegation.unwrap().failed.clone().unwrap().principal, B);
    let h = request(&k, A, Some(&txn(&k, &[UNTRUSTED, A])), &[]);
    let mut e = engine_from(&cfg(&k, false, |c| {
        c["policy"]["delegation_rules"].as_array_mut().unwrap().push(json!({"id": "x", "intents": ["case.resolve"], "from": ["subagent"], "to": ["agent"]}))
    }));
    let out = run(&mut e, &h);
    assert_eq!(refused(&out), (403, Reason::DelegationNotAllowed));
    let f = out.decision.delegation.unwrap().failed.clone().unwrap();
    assert_eq!((f.principal.as_str(), f.reason), (UNTRUSTED, Reason::DeniedByRule));
}

#[test]
fn self_minted_root_txn_token_stands_in_for_an_orchestrator_signed_intent() {
    // `case.secret` needs an intent token from the policy's intent issuer (the orchestrator).
    // An agent with role `txn` gets a root Txn-Token for it from the minter on its own (the
    // minter checks the task's registration, not any intent token), and presents that instead.
    let k = keys();
    let ik = TestKey::es256("intent-k");
    let mut e = engine_from(&cfg(&k, false, |c| {
        let p = &mut c["policy"];
        p["intents"].as_array_mut().unwrap().push(json!({"name": "case.secret", "scopes": ["cases:write"], "require_signed": true,
            "operations": [{"resource": "cases", "methods": ["GET"]}]}));
        p["intent_issuers"] = json!([{"issuer": "https://intent", "jwks": plain_jwks(&[&ik]), "audiences": [AUD]}]);
        p["delegation_rules"][0]["intents"] = json!(["case.resolve", "case.secret"]);
    }));
    let secret = |c: &mut Value| c["tctx"]["intent"] = json!("case.secret");
    let hdr = [("x-agent-intent", "case.secret")];
    assert_eq!(refused(&run(&mut e, &request(&k, A, None, &hdr))), (403, Reason::IntentTokenRequired), "no intent token");
    let mut root = claims(&[A]);
    secret(&mut root);
    let root = sign_txn(&k.minter, &root);
    let out = run(&mut e, &request(&k, A, Some(&root), &hdr));
    assert_eq!(refused(&out), (403, Reason::DelegationNotAllowed), "a self-minted root token signs nothing");
    assert_eq!(out.decision.delegation.unwrap().failed.clone().unwrap().reason, Reason::IntentTokenRequired);
    let mut hop = claims(&[A, B]);
    secret(&mut hop);
    let hop = sign_txn(&k.minter, &hop);
    let out = run(&mut e, &request(&k, B, Some(&hop), &hdr));
    assert_eq!(refused(&out), (403, Reason::DelegationNotAllowed), "nor does a delegated one");
    assert_eq!(out.decision.delegation.unwrap().failed.clone().unwrap().reason, Reason::IntentTokenRequired);
    // The caller's own intent token from the orchestrator is what the intent asks for; with it,
    // the hop is judged for every principal as usual.
    let it = ik.sign_intent(&json!({"iss": "https://intent", "sub": B, "aud": AUD, "exp": NOW + 60, "intents": ["case.secret"], "task": "T-1"}));
    let out = run(&mut e, &request(&k, B, Some(&hop), &[("x-agent-intent", "case.secret"), ("x-agent-intent-token", &it)]));
    assert_eq!(out.decision.effect(), Effect::Allow, "{:?} {:?}", out.decision.reason(), out.decision.delegation);
}

#[test]
fn dry_run_policy_records_a_refused_principal_and_forwards_without_a_credential() {
    let k = keys();
    let mut e = engine_from(&cfg(&k, true, |c| c["policy"]["dry_run"] = json!(true)));
    let out = run(&mut e, &request(&k, UNTRUSTED, Some(&txn(&k, &[A, UNTRUSTED])), &[]));
    assert_eq!(out.decision.effect(), Effect::DryRunDeny);
    assert!(matches!(out.verdict, Verdict::Forward(_)));
    assert_eq!(out.decision.credential_withheld, Some("dry_run"));
}

// ------------------------------------------------------------------ step 7: within the token

fn widened(k: &Keys, tctx_extra: Value, scope: &str, extra: &[(&str, &str)]) -> (u16, Reason, Option<&'static str>) {
    let mut e = engine(k);
    let mut c = claims(&[A, B]);
    for (n, v) in tctx_extra.as_object().unwrap() {
        c["tctx"][n] = v.clone();
    }
    c["scope"] = json!(scope);
    let out = run(&mut e, &request(k, B, Some(&sign_txn(&k.minter, &c)), extra));
    let (status, reason) = match &out.verdict {
        Verdict::Reply(r) => (r.status, out.decision.reason()),
        _ => (200, out.decision.reason()),
    };
    (status, reason, out.decision.delegation.as_ref().and_then(|d| d.failed.as_ref()).and_then(|f| f.exceeded))
}

#[test]
fn tctx_widening_attempts_at_the_proxy_are_refused() {
    let k = keys();
    let exceeded = |what| (403, Reason::DelegationScopeExceeded, Some(what));
    // A resource outside the token's list.
    assert_eq!(widened(&k, json!({"resources": ["billing"]}), "cases:write", &[]), exceeded("resource"));
    assert_eq!(widened(&k, json!({"resources": ["cases"]}), "cases:write", &[]).1, Reason::Allowed);
    // The intent's scopes are not all in the token.
    assert_eq!(widened(&k, json!({}), "cases:read", &[]), exceeded("scope"));
    // A forwarded token must name the workload that receives it.
    let to_b = [(":authority", "b.internal"), (":path", "/work"), (":method", "POST")];
    assert_eq!(widened(&k, json!({}), "cases:write", &to_b), exceeded("workload"));
}

#[test]
fn forward_resource_gets_the_verified_token_when_may_act_names_its_workload() {
    let k = keys();
    let mut e = engine(&k);
    let mut c = claims(&[A]);
    c["may_act"] = json!({"sub": B});
    let t = sign_txn(&k.minter, &c);
    let h = request(&k, A, Some(&t), &[(":authority", "b.internal"), (":path", "/work"), (":method", "POST")]);
    let edits = forwarded(run(&mut e, &h));
    assert!(!edits.remove.contains(&"txn-token".to_string()), "forwarded: {edits:?}");
    // The same token to a resource that strips it.
    let edits = forwarded(run(&mut e, &request(&k, A, Some(&t), &[])));
    assert!(edits.remove.contains(&"txn-token".to_string()));
}

#[test]
fn txn_token_header_is_stripped_when_delegation_is_not_configured() {
    let k = keys();
    let mut e = engine_from(&cfg(&k, false, |c| {
        c.as_object_mut().unwrap().remove("delegation");
        c["policy"]["resources"][2]["txn_token"] = json!("strip");
        c["policy"]["resources"][2].as_object_mut().unwrap().remove("workload");
    }));
    let edits = forwarded(run(&mut e, &request(&k, A, Some("anything"), &[])));
    assert!(edits.remove.contains(&"txn-token".to_string()), "never forwarded unverified");
}

#[test]
fn forged_txn_token_in_the_standard_header_slips_past_a_custom_header_name() {
    // The filter reads Txn-Tokens from `x-txn`; a caller sends a forged one in the standard
    // `txn-token` header, which the filter never verifies: it must not reach the service.
    let k = keys();
    let mut e = engine_from(&cfg(&k, false, |c| c["delegation"]["header"] = json!("x-txn")));
    let edits = forwarded(run(&mut e, &request(&k, A, Some("forged.by.caller"), &[])));
    assert!(edits.remove.contains(&"txn-token".to_string()), "never forwarded unverified: {edits:?}");
    // The configured header carries the real one, verified, and is stripped too.
    let t = txn(&k, &[A, B]);
    let edits = forwarded(run(&mut e, &request(&k, B, None, &[("x-txn", &t)])));
    assert!(edits.remove.contains(&"x-txn".to_string()), "{edits:?}");
}

#[test]
fn null_members_are_not_read_as_absent_constraints() {
    // The profile has no `null`: the minter never issues one and refuses one. A token whose
    // `tctx.tools` is `null` must not be read as "no tool constraint" (nor `resources`,
    // `may_act`, `act`, or an argument's `tool`/`min`/`max`/`equals` as absent).
    let k = keys();
    let ctx = |extra: Value| {
        let mut t = json!({"task": "T-1", "intent": "case.resolve"});
        for (n, v) in extra.as_object().unwrap() {
            t[n] = v.clone();
        }
        json!({"tctx": t})
    };
    for (what, edit) in [
        ("tools null", ctx(json!({"tools": null}))),
        ("resources null", ctx(json!({"resources": null}))),
        ("arguments null", ctx(json!({"arguments": null}))),
        ("argument tool null", ctx(json!({"arguments": [{"pointer": "/a", "max": 1, "tool": null}]}))),
        ("argument min null", ctx(json!({"arguments": [{"pointer": "/a", "max": 1, "min": null}]}))),
        ("may_act null", json!({"may_act": null})),
        ("nbf null", json!({"nbf": null})),
    ] {
        let mut c = claims(&[A, B]);
        for (name, v) in edit.as_object().unwrap() {
            c[name] = v.clone();
        }
        let mut e = engine(&k);
        let out = run(&mut e, &request(&k, B, Some(&sign_txn(&k.minter, &c)), &[]));
        assert_eq!(refused(&out), (401, Reason::DelegationTokenInvalid), "{what}");
    }
    let mut c = claims(&[A]);
    c["act"] = Value::Null;
    assert_invalid(&k, &sign_txn(&k.minter, &c), A, "claims");
}

fn mcp_call(k: &Keys, caller: &str, t: &str, tool: &str, amount: &str) -> Headers {
    request(k, caller, Some(t), &[
        (":method", "POST"),
        (":authority", HOST),
        (":path", "/mcp"),
        ("mcp-protocol-version", "2026-07-28"),
        ("mcp-method", "tools/call"),
        ("mcp-name", tool),
        ("mcp-param-amount", amount),
    ])
}

#[test]
fn mcp_tool_and_arguments_outside_the_token_are_refused() {
    let k = keys();
    let mut c = claims(&[A, B]);
    c["tctx"]["tools"] = json!(["refund"]);
    c["tctx"]["arguments"] = json!([{"tool": "refund", "pointer": "/amount", "max": 50}]);
    let t = sign_txn(&k.minter, &c);
    let mut e = engine(&k);
    let out = run(&mut e, &mcp_call(&k, B, &t, "lookup", "1"));
    assert_eq!(refused(&out), (403, Reason::DelegationScopeExceeded));
    assert_eq!(out.decision.delegation.unwrap().failed.clone().unwrap().exceeded, Some("tool"));
    let out = run(&mut e, &mcp_call(&k, B, &t, "refund", "80"));
    assert_eq!(refused(&out), (403, Reason::DelegationScopeExceeded));
    assert_eq!(out.decision.delegation.unwrap().failed.clone().unwrap().exceeded, Some("arguments"));
    assert_eq!(run(&mut e, &mcp_call(&k, B, &t, "refund", "40")).decision.effect(), Effect::Allow);
}

#[test]
fn mcp_arguments_only_in_the_body_are_judged_against_the_token_there() {
    let k = keys();
    let mut c = claims(&[A, B]);
    c["tctx"]["arguments"] = json!([{"pointer": "/amount", "max": 50}]);
    let t = sign_txn(&k.minter, &c);
    let mut e = engine(&k);
    let h = request(&k, B, Some(&t), &[(":method", "POST"), (":authority", HOST), (":path", "/mcp"),
        ("mcp-protocol-version", "2026-07-28"), ("mcp-method", "tools/call"), ("mcp-name", "refund")]);
    for (amount, ok) in [(80, false), (40, true)] {
        let out = run(&mut e, &h);
        let Verdict::NeedBody(mut plan) = out.verdict else { panic!("the body is needed: {:?}", out.decision.reason()) };
        let mut d = out.decision;
        assert!(matches!(plan.take_header_verdict(), Some(Verdict::Forward(_))));
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "refund", "arguments": {"amount": amount}}}).to_string();
        let v = e.on_request_body(&plan, body.as_bytes(), NOW, &mut d);
        assert_eq!(matches!(v, Verdict::Forward(_)), ok, "{amount}: {:?}", d.reason());
        if !ok {
            assert_eq!(d.reason(), Reason::DelegationScopeExceeded);
        }
    }
}

// ------------------------------------------------------------------ step 8: minting

#[test]
fn delegated_mint_sends_the_txn_token_as_subject_and_the_svid_as_actor() {
    let k = keys();
    let mut e = engine_from(&cfg(&k, true, |_| {}));
    let t = txn(&k, &[A, B]);
    let caller = svid(&k, B);
    let out = run(&mut e, &request(&k, B, Some(&t), &[]));
    let Verdict::Mint(plan) = out.verdict else { panic!("{:?}", out.decision.reason()) };
    let form: Vec<(String, String)> = form_urlencoded::parse(&plan.body()).into_owned().collect();
    let get = |n: &str| form.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
    assert_eq!(get("subject_token"), Some(t.as_str()));
    assert_eq!(get("subject_token_type"), Some(crate::delegation::TXN_TOKEN_TYPE));
    assert_eq!(get("actor_token"), Some(caller.as_str()));
    assert_eq!(get("actor_token_type"), Some(crate::mint::JWT_TOKEN_TYPE));
    assert_eq!((get("audience"), get("scope"), get("task"), get("intent")), (Some("https://cases.internal"), Some("cases:write"), Some("T-1"), Some("case.resolve")));
    assert_eq!((plan.subject.as_str(), plan.actor.as_deref(), plan.txn.as_deref()), (A, Some(B), Some("tx0AAAAAAAAAAAAAAAAAAA")));
    // Another chain to the same place never shares the credential.
    let mut c = claims(&[A, B]);
    c["jti"] = json!("j2AAAAAAAAAAAAAAAAAAAA");
    let Verdict::Mint(other) = run(&mut e, &request(&k, B, Some(&sign_txn(&k.minter, &c)), &[])).verdict else { panic!() };
    assert_ne!(plan.key, other.key);
    let Verdict::Mint(plain) = run(&mut e, &request(&k, B, None, &[])).verdict else { panic!() };
    assert_ne!(plan.key, plain.key);
}

fn minted(sub: &str, act: Option<&str>, txn: &str) -> Vec<u8> {
    let mut c = json!({"sub": sub, "aud": "https://cases.internal", "jti": "m1", "exp": NOW + 60, "task": "T-1", "txn": txn});
    if let Some(a) = act {
        c["act"] = json!({"sub": a, "act": {"sub": "ignored"}});
    }
    let tok = format!("{}.{}.c2ln", crate::testkit::b64(br#"{"alg":"ES256"}"#), crate::testkit::b64(c.to_string().as_bytes()));
    json!({"access_token": tok, "issued_token_type": "urn:ietf:params:oauth:token-type:jwt", "token_type": "Bearer", "expires_in": 60}).to_string().into_bytes()
}

#[test]
fn minted_credential_must_name_the_original_principal_and_the_caller_as_actor() {
    let k = keys();
    let t = txn(&k, &[A, B]);
    for (what, answer, ok) in [
        ("right", minted(A, Some(B), "tx0AAAAAAAAAAAAAAAAAAA"), true),
        ("sub is the caller", minted(B, Some(B), "tx0AAAAAAAAAAAAAAAAAAA"), false),
        ("no act", minted(A, None, "tx0AAAAAAAAAAAAAAAAAAA"), false),
        ("act is another", minted(A, Some(C), "tx0AAAAAAAAAAAAAAAAAAA"), false),
        ("another transaction", minted(A, Some(B), "other"), false),
    ] {
        let mut e = engine_from(&cfg(&k, true, |_| {}));
        let out = run(&mut e, &request(&k, B, Some(&t), &[]));
        let Verdict::Mint(plan) = out.verdict else { panic!() };
        let mut d = out.decision;
        let (v, _) = e.finish_mint(&plan, Ok((200, &answer)), NOW, &mut d);
        assert_eq!(matches!(v, Verdict::Forward(_)), ok, "{what}: {:?}", d.reason());
    }
    // A root token (no delegation yet), used by its own subject: the credential names A and
    // no actor, and still the token's transaction.
    let root = txn(&k, &[A]);
    for (what, answer, ok) in [
        ("right", minted(A, None, "tx0AAAAAAAAAAAAAAAAAAA"), true),
        ("an actor appears", minted(A, Some(B), "tx0AAAAAAAAAAAAAAAAAAA"), false),
        ("another transaction", minted(A, None, "other"), false),
    ] {
        let mut e = engine_from(&cfg(&k, true, |_| {}));
        let out = run(&mut e, &request(&k, A, Some(&root), &[]));
        let Verdict::Mint(plan) = out.verdict else { panic!("{:?}", out.decision.reason()) };
        let mut d = out.decision;
        let (v, _) = e.finish_mint(&plan, Ok((200, &answer)), NOW, &mut d);
        assert_eq!(matches!(v, Verdict::Forward(_)), ok, "root, {what}: {:?}", d.reason());
    }
}

// ------------------------------------------------------------------ configuration

#[test]
fn invalid_delegation_config_is_refused_naming_the_field() {
    let k = keys();
    for (edit, field) in [
        (json!({"delegation": {"issuer": "", "audience": TD, "keys": {"inline": plain_jwks(&[&k.minter])}}}), "delegation.issuer"),
        (json!({"delegation": {"issuer": ISS, "audience": "", "keys": {"inline": plain_jwks(&[&k.minter])}}}), "delegation.audience"),
        (json!({"delegation": {"issuer": ISS, "audience": TD, "keys": {}}}), "delegation.keys"),
        (json!({"delegation": {"issuer": ISS, "audience": TD, "keys": {"inline": plain_jwks(&[&k.minter])}, "header": "authorization"}}), "delegation.header"),
        (json!({"delegation": {"issuer": ISS, "audience": TD, "keys": {"inline": plain_jwks(&[&k.minter])}, "header": "Txn-Token"}}), "delegation.header"),
        (json!({"delegation": {"issuer": ISS, "audience": TD, "keys": {"inline": plain_jwks(&[&k.minter])}, "max_delegations": 9}}), "delegation.max_delegations"),
        (json!({"delegation": {"issuer": ISS, "audience": TD, "keys": {"inline": plain_jwks(&[&k.minter])}, "bogus": 1}}), "delegation.bogus"),
    ] {
        let mut c = cfg(&k, false, |_| {});
        c["delegation"] = edit["delegation"].clone();
        let e = config::parse(c.to_string().as_bytes()).unwrap_err();
        assert_eq!(e.field, field, "{e}");
    }
    for (edit, field) in [
        (json!({"max_delegations": 3}), "policy.max_delegations"),
        (json!({"delegation_rules": [{"id": "r", "intents": ["nope"], "from": ["agent"], "to": ["subagent"]}]}), "policy.delegation_rules[0].intents[0]"),
        (json!({"delegation_rules": [{"id": "r", "intents": ["case.resolve"], "from": ["agent"], "to": ["ghost"]}]}), "policy.delegation_rules[0].to[0]"),
        (json!({"delegation_rules": [{"id": "r", "intents": ["case.resolve"], "from": [], "to": ["agent"]}]}), "policy.delegation_rules[0].from"),
    ] {
        let mut c = cfg(&k, false, |_| {});
        for (n, v) in edit.as_object().unwrap() {
            c["policy"][n] = v.clone();
        }
        let e = config::parse(c.to_string().as_bytes()).unwrap_err();
        assert_eq!(e.field, field, "{e}");
    }
    let mut c = cfg(&k, false, |_| {});
    c["policy"]["resources"][0]["workload"] = json!(B);
    assert_eq!(config::parse(c.to_string().as_bytes()).unwrap_err().field, "policy.resources[0].workload");
    c["policy"]["resources"][0]["txn_token"] = json!("forward");
    c["policy"]["resources"][0]["workload"] = json!("spiffe://example.org/");
    assert_eq!(config::parse(c.to_string().as_bytes()).unwrap_err().field, "policy.resources[0].workload");
    c["policy"]["resources"][0]["workload"] = json!(B);
    c.as_object_mut().unwrap().remove("delegation");
    assert_eq!(config::parse(c.to_string().as_bytes()).unwrap_err().field, "policy.resources[0].txn_token");
}

