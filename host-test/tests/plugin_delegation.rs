//! Delegation (issue 13) through the built filter: a sub-agent calling with its own SVID and a
//! Transaction Token signed by a test minter key (configured as `delegation.keys`). The allowed
//! hop and the exchange it sends; every refusal with its status and reason and no exchange;
//! the `txn-token` header stripped or forwarded; the chain in the decision record.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{json, Value};

const TXN_TYPE: &str = "urn:ietf:params:oauth:token-type:txn_token";
const JWT_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
const ISS: &str = "https://minter.example";
const B: &str = "spiffe://example.org/sub/b1";
const C: &str = "spiffe://example.org/sub/c1";
const D: &str = "spiffe://example.org/sub/d1";
const TXN_ID: &str = "txnAAAAAAAAAAAAAAAAAAA";

/// The shared policy plus: a `subagent` class allowed `ticket.read`, delegation rules for it,
/// and a resource that takes the Txn-Token upstream (served by B).
fn delegation(cfg: &mut Value, txn_key: &TestKey) {
    cfg["delegation"] = json!({"issuer": ISS, "audience": TD, "keys": {"inline": plain_jwks(&[txn_key])}});
    let p = &mut cfg["policy"];
    p["classes"].as_array_mut().unwrap().push(json!(
        {"name": "subagent", "principals": ["spiffe://example.org/sub/*"], "intent_required": true}));
    p["resources"].as_array_mut().unwrap().push(json!(
        {"name": "sub-b", "hosts": ["b.internal"], "paths": ["/work/**"], "txn_token": "forward", "workload": B}));
    p["intents"][0]["operations"].as_array_mut().unwrap().push(json!({"resource": "sub-b", "methods": ["POST"]}));
    p["rules"].as_array_mut().unwrap().push(json!(
        {"id": "subagents", "effect": "allow", "classes": ["subagent"], "intents": ["ticket.read"]}));
    p["delegation_rules"] = json!([
        {"id": "agent-to-sub", "intents": ["ticket.read"], "from": ["agent"], "to": ["subagent"]},
        {"id": "sub-to-sub", "intents": ["ticket.read"], "from": ["subagent"], "to": ["subagent"]}
    ]);
}

struct Deleg {
    rig: Rig,
    txn_key: TestKey,
}

fn start_delegation(test: &str, minter: Value) -> Option<Deleg> {
    let txn_key = TestKey::es256("txn-k1");
    let rig = start_configured(test, minter, true, |cfg| delegation(cfg, &txn_key))?;
    Some(Deleg { rig, txn_key })
}

/// Txn-Token claims for `chain` (original principal first, current actor last).
fn claims(chain: &[&str]) -> Value {
    let mut act = Value::Null;
    for p in chain.iter().skip(1) {
        act = if act.is_null() {
            json!({"sub": p})
        } else {
            json!({"sub": p, "act": act})
        };
    }
    let mut c = json!({
        "iss": ISS, "aud": TD, "iat": T0, "exp": T0 + 300, "jti": "jtiAAAAAAAAAAAAAAAAAAA", "txn": TXN_ID,
        "sub": chain[0], "scope": "tickets:read tickets:list", "req_wl": chain[chain.len() - 1],
        "tctx": {"task": "T-1", "intent": "ticket.read"}
    });
    if !act.is_null() {
        c["act"] = act;
    }
    c
}

fn sign(key: &TestKey, claims: &Value) -> String {
    key.sign_with_header(
        "ES256",
        &json!({"alg": "ES256", "kid": key.kid, "typ": "txntoken+jwt"}),
        claims,
    )
}

impl Deleg {
    fn txn(&self, chain: &[&str]) -> String {
        sign(&self.txn_key, &claims(chain))
    }

    /// `GET tickets.internal/tickets/1` as `caller`, intent `ticket.read`, with this Txn-Token.
    fn hop(&self, caller: &str, txn: &str) -> Req {
        self.rig
            .tickets()
            .bearer(&self.rig.svid_for(caller))
            .with("txn-token", txn)
    }

    /// The request is refused locally, with no exchange sent.
    fn refused(&mut self, req: &Req, status: u32, reason: &str) -> Value {
        let s = self.rig.send(req);
        self.rig.denied(s, status, reason);
        assert!(
            self.rig.mint_calls().is_empty(),
            "{reason}: no exchange on a refusal"
        );
        let recs = self.rig.records();
        recs.last().cloned().unwrap()
    }
}

fn form_get(call: &mandate_host_test::HttpCallout, name: &str) -> Option<String> {
    let f = form(call);
    let v: Vec<&String> = f.iter().filter(|(k, _)| k == name).map(|(_, v)| v).collect();
    assert!(v.len() <= 1, "{name} sent {} times", v.len());
    v.first().map(|s| s.to_string())
}

/// A minted access token as the minter issues it for a delegated exchange.
fn minted_for_chain(sub: &str, actor: &str, jti: &str, exp: u64) -> String {
    let header = b64(br#"{"alg":"ES256","typ":"JWT","kid":"minter-k1"}"#);
    let c = json!({"iss": "https://minter", "sub": sub, "act": {"sub": actor}, "txn": TXN_ID,
                   "aud": TICKETS_AUD, "jti": jti, "exp": exp, "task": "T-1"});
    format!("{header}.{}.{MINTED_SIG}", b64(c.to_string().as_bytes()))
}

#[test]
fn allowed_hop_exchanges_the_txn_token_with_the_callers_svid_as_actor() {
    let Some(mut t) = start_delegation("allowed_hop", minter()) else {
        return;
    };
    let txn = t.txn(&[AGENT, B]);
    let s = t.rig.send(&t.hop(B, &txn));
    let call = t.rig.one_mint_call();
    let get = |n: &str| form_get(&call, n);
    assert_eq!(
        get("grant_type").as_deref(),
        Some("urn:ietf:params:oauth:grant-type:token-exchange")
    );
    assert_eq!(get("subject_token"), Some(txn.clone()), "the Txn-Token is the subject");
    assert_eq!(get("subject_token_type").as_deref(), Some(TXN_TYPE));
    assert_eq!(
        get("actor_token"),
        Some(t.rig.svid_for(B)),
        "the caller's SVID as received is the actor"
    );
    assert_eq!(get("actor_token_type").as_deref(), Some(JWT_TYPE));
    assert_eq!(get("audience").as_deref(), Some(TICKETS_AUD));
    assert_eq!(get("scope").as_deref(), Some("tickets:read tickets:list"));
    assert_eq!(get("task").as_deref(), Some("T-1"), "the token's task");
    assert_eq!(get("intent").as_deref(), Some("ticket.read"));
    assert_eq!(get("requested_ttl").as_deref(), Some("120"));
    assert_eq!(form(&call).len(), 10, "{:?}", form(&call));

    let token = minted_for_chain(AGENT, B, "jti-d1", T0 + 120);
    let body = json!({"access_token": token, "issued_token_type": JWT_TYPE, "token_type": "Bearer", "expires_in": 120});
    t.rig.answer(&call, json_reply(200, &body));
    let up = t.rig.forwarded(s);
    assert_eq!(header(&up, "authorization"), Some(format!("Bearer {token}")));
    assert!(header(&up, "txn-token").is_none(), "stripped: the resource does not take it");
    let rec = t.rig.records().pop().unwrap();
    assert_eq!(rec["effect"], "allow");
    assert_eq!(rec["delegation"]["depth"], 1);
    assert_eq!(
        rec["delegation"]["chain"],
        json!([{"principal": AGENT, "class": "agent"}, {"principal": B, "class": "subagent"}])
    );
    assert!(rec["delegation"]["txn"].as_str().unwrap().starts_with("sha256:"));
    let text = rec.to_string();
    assert!(!text.contains(&txn) && !text.contains(TXN_ID), "hashes only");

    // Warm: the same call again is served from every cache, no exchange.
    let s = t.rig.send(&t.hop(B, &txn));
    assert!(t.rig.mint_calls().is_empty());
    t.rig.forwarded(s);
    let rec = t.rig.records().pop().unwrap();
    assert_eq!(rec["cache"], json!({"identity": true, "decision": true, "credential": true}));
}

#[test]
fn minted_token_without_the_chain_is_not_injected() {
    let Some(mut t) = start_delegation("minted_token_without_the_chain", minter()) else {
        return;
    };
    let txn = t.txn(&[AGENT, B]);
    let s = t.rig.send(&t.hop(B, &txn));
    let call = t.rig.one_mint_call();
    // A token for the caller itself, as a minter ignoring the chain would mint it.
    t.rig.answer(&call, token_reply_for(&call, "jti-x", T0 + 120, T0));
    t.rig.denied(s, 503, "credential_unavailable");
}

#[test]
fn each_refusal_has_its_status_and_reason_and_sends_no_exchange() {
    let Some(mut t) = start_delegation("each_refusal", minter()) else {
        return;
    };
    let forger = TestKey::es256("txn-k1");
    let cases: Vec<(&str, Req, u32, &str)> = vec![
        ("forged", t.hop(B, &sign(&forger, &claims(&[AGENT, B]))), 401, "delegation_token_invalid"),
        ("an SVID as the Txn-Token", t.hop(B, &t.rig.svid_for(AGENT)), 401, "delegation_token_invalid"),
        ("repeated header", t.hop(B, &t.txn(&[AGENT, B])).with("txn-token", &t.txn(&[AGENT, B])), 401, "delegation_token_invalid"),
        ("loop", t.hop(AGENT, &t.txn(&[AGENT, B, AGENT])), 403, "delegation_loop"),
        ("too deep", t.hop(D, &t.txn(&[AGENT, B, C, D])), 403, "delegation_chain_too_deep"),
        ("B replays A's root token", t.hop(B, &t.txn(&[AGENT])), 403, "delegation_actor_mismatch"),
        ("another intent", t.hop(B, &t.txn(&[AGENT, B])).intent("report.read"), 403, "delegation_scope_exceeded"),
        ("another task", t.hop(B, &t.txn(&[AGENT, B])).task("T-2"), 403, "delegation_scope_exceeded"),
        ("edge not allowed", t.hop(AGENT, &t.txn(&[B, AGENT])), 403, "delegation_not_allowed"),
        ("A not allowed, B is", t.hop(B, &t.txn(&[BLOCKED, B])), 403, "delegation_not_allowed"),
    ];
    for (what, req, status, reason) in cases {
        let rec = t.refused(&req, status, reason);
        assert_eq!(rec["reason"], reason, "{what}: {rec}");
        assert!(!rec["delegation"].is_null(), "{what}: the record says why");
    }
    let rec = t.refused(&t.hop(B, &t.txn(&[BLOCKED, B])), 403, "delegation_not_allowed");
    assert_eq!(
        rec["delegation"]["failed"],
        json!({"principal": BLOCKED, "reason": "denied_by_rule", "rule": "blocked-agent"}),
        "the intersection names the principal and its own reason"
    );
    assert_eq!(t.rig.metric("mandate.decisions.deny.delegation_loop"), 1);
}

#[test]
fn revoked_task_refuses_the_delegated_hop() {
    let Some(mut t) = start_delegation("revoked_task_refuses_the_delegated_hop", minter()) else {
        return;
    };
    let txn = t.txn(&[AGENT, B]);
    t.rig.send_minted(&t.hop(B, &txn), "jti-r1");
    t.rig.vm.advance(std::time::Duration::from_millis(1100)).unwrap();
    let polls = t.rig.polls();
    assert!(!polls.is_empty(), "the feed is polled");
    let page = json!({"epoch": "E1", "cursor": 1, "more": false,
        "revocations": [{"seq": 1, "kind": "task", "value": "T-1", "subject": AGENT, "at": T0}]});
    t.rig.answer(&polls[0], json_reply(200, &page));
    t.refused(&t.hop(B, &txn), 403, "task_revoked");
}

#[test]
fn txn_token_is_forwarded_only_to_a_resource_that_takes_it() {
    let Some(mut t) = start_delegation("txn_token_is_forwarded", Value::Null) else {
        return;
    };
    let mut c = claims(&[AGENT]);
    c["may_act"] = json!({"sub": B});
    let root = sign(&t.txn_key, &c);
    let to_b = Req::new("POST", "b.internal", "/work/1")
        .intent("ticket.read")
        .bearer(&t.rig.svid())
        .with("txn-token", &root);
    let s = t.rig.send(&to_b);
    assert_eq!(header(&t.rig.forwarded(s), "txn-token"), Some(root.clone()));
    // The same token to a resource that does not take it: stripped.
    let s = t.rig.send(&t.rig.tickets().with("txn-token", &root));
    assert!(header(&t.rig.forwarded(s), "txn-token").is_none());
    // A root token naming another delegate is not forwarded to B.
    let mut c = claims(&[AGENT]);
    c["may_act"] = json!({"sub": C});
    let for_c = sign(&t.txn_key, &c);
    t.refused(&to_b.clone().set("txn-token", &for_c), 403, "delegation_scope_exceeded");
}
