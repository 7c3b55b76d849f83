//! Issue 13, minter side: delegation with Transaction Tokens. Each test is named after the
//! attack it models (or the flow it proves); `docs/delegation.md` is the contract.
//!
//! Topology: agent A works task T; A delegates to B (`delegate`), B exchanges A's Txn-Token for
//! a replacement naming itself, and the proxy in front of C mints C's credential from it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mandate_minter::config::{MinterConfig, GRANT_TOKEN_EXCHANGE, TOKEN_TYPE_JWT, TOKEN_TYPE_TXN_TOKEN};
use mandate_minter::Handle;
use mandate_core::testkit::TestKey;
use serde_json::{json, Value};

mod common;
use common::{claims_of, header_of, now, request, start, Body, Env};

const A: &str = "spiffe://example.org/agent/a";
const B: &str = "spiffe://example.org/agent/b";
const C: &str = "spiffe://example.org/agent/c";
const D: &str = "spiffe://example.org/agent/d";
const INTENT: &str = "case.resolve";
const SCOPE: &str = "tickets:read tickets:write";
const DEST: &str = "billing-api";
const ISSUER: &str = "https://minter.test";

struct Fx {
    env: Env,
    h: Handle,
    task: String,
}

/// Clients: one per agent with `txn`, the proxy with `mint`, an orchestrator, and a proxy
/// that also has `txn`. Task T is bound to A for `case.resolve`.
fn fixture_with(edit: impl FnOnce(&mut Value)) -> Fx {
    let env = Env::new();
    let mut c = env.base();
    let clients: &[(&str, &[&str])] = &[
        ("agent-a", &["txn"]),
        ("agent-b", &["txn"]),
        ("agent-c", &["txn"]),
        ("agent-d", &["txn"]),
        ("proxy", &["mint", "feed"]),
        ("proxy-txn", &["mint", "txn"]),
        ("orchestrator", &["tasks", "revoke"]),
    ];
    let list: Vec<Value> = clients
        .iter()
        .map(|(id, roles)| json!({"client_id": id, "secret_sha256": mandate_minter::auth::hash_secret(&format!("{id}-secret")), "roles": roles}))
        .collect();
    c["client_auth"] = json!({"mode": "shared_secret", "clients": list});
    c["audiences"] = json!({"example.org": [DEST, "crm"]});
    c["scopes"] = json!({DEST: ["tickets:read", "tickets:write"]});
    c["reload_check_s"] = json!(1);
    edit(&mut c);
    let h = start(c);
    let a = request(&h, "POST", "/tasks", Body::Json(json!({"subjects": [A], "intents": [INTENT]})), Some(&basic("orchestrator")));
    assert_eq!(a.status, 201, "{}", a.raw);
    let task = a.body["task"].as_str().unwrap().to_string();
    Fx { env, h, task }
}

fn fixture() -> Fx {
    fixture_with(|_| {})
}

fn basic(id: &str) -> String {
    common::basic(id, &format!("{id}-secret"))
}

impl Fx {
    fn svid(&self, who: &str) -> String {
        self.env.svid(who, 600)
    }

    fn post(&self, client: &str, pairs: &[(&str, &str)]) -> (u16, Value) {
        let a = request(&self.h, "POST", "/token", Body::Form(pairs), Some(&basic(client)));
        (a.status, a.body)
    }

    /// A root Txn-Token request by `who` (its own SVID), through `client`.
    fn root_as(&self, client: &str, who: &str, extra: &[(&str, &str)]) -> (u16, Value) {
        let svid = self.svid(who);
        let mut p = vec![
            ("grant_type", GRANT_TOKEN_EXCHANGE),
            ("subject_token", svid.as_str()),
            ("subject_token_type", TOKEN_TYPE_JWT),
            ("requested_token_type", TOKEN_TYPE_TXN_TOKEN),
            ("task", self.task.as_str()),
            ("intent", INTENT),
            ("scope", SCOPE),
        ];
        merge(&mut p, extra);
        self.post(client, &p)
    }

    /// A's root Txn-Token (A's client).
    fn root(&self, extra: &[(&str, &str)]) -> (u16, Value) {
        self.root_as("agent-a", A, extra)
    }

    /// A replacement of `txn` for `actor` (its SVID as `actor_token`), through `client`.
    fn replace(&self, client: &str, txn: &str, actor: &str, extra: &[(&str, &str)]) -> (u16, Value) {
        let svid = self.svid(actor);
        let mut p = vec![
            ("grant_type", GRANT_TOKEN_EXCHANGE),
            ("subject_token", txn),
            ("subject_token_type", TOKEN_TYPE_TXN_TOKEN),
            ("actor_token", svid.as_str()),
            ("actor_token_type", TOKEN_TYPE_JWT),
            ("requested_token_type", TOKEN_TYPE_TXN_TOKEN),
        ];
        p.extend_from_slice(extra);
        self.post(client, &p)
    }

    /// What the proxy in front of C sends: the Txn-Token, the caller's SVID as actor, the
    /// destination, scope, task and intent.
    fn access(&self, txn: &str, actor: Option<&str>, extra: &[(&str, &str)]) -> (u16, Value) {
        self.access_as("proxy", txn, actor, extra)
    }

    fn access_as(&self, client: &str, txn: &str, actor: Option<&str>, extra: &[(&str, &str)]) -> (u16, Value) {
        let svid = actor.map(|a| self.svid(a));
        let mut p = vec![
            ("grant_type", GRANT_TOKEN_EXCHANGE),
            ("subject_token", txn),
            ("subject_token_type", TOKEN_TYPE_TXN_TOKEN),
            ("audience", DEST),
            ("task", self.task.as_str()),
            ("intent", INTENT),
        ];
        if let Some(s) = &svid {
            p.push(("actor_token", s.as_str()));
            p.push(("actor_token_type", TOKEN_TYPE_JWT));
        }
        merge(&mut p, extra);
        self.post(client, &p)
    }

    fn orchestrate(&self, path: &str, body: Body<'_>) -> Value {
        let a = request(&self.h, "POST", path, body, Some(&basic("orchestrator")));
        assert_eq!(a.status, 200, "{}", a.raw);
        a.body
    }

    /// Signs `claims` with the minter's own current key and JOSE `typ` (a forged token that
    /// only the checks after the signature can refuse).
    fn sign_as_minter(&self, claims: &Value, typ: &str) -> String {
        self.h.state.current_keys().sign_typed(claims, typ).unwrap()
    }
}

/// `extra` replaces the parameters of the same name in `base` (repeated in `extra`: sent twice).
fn merge<'a>(base: &mut Vec<(&'a str, &'a str)>, extra: &[(&'a str, &'a str)]) {
    base.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
    base.extend_from_slice(extra);
}

fn token(r: (u16, Value)) -> String {
    assert_eq!(r.0, 200, "{}", r.1);
    r.1["access_token"].as_str().unwrap().to_string()
}

fn refusal(r: &(u16, Value)) -> (u16, &str, &str) {
    (r.0, r.1["error"].as_str().unwrap_or(""), r.1["mandate_reason"].as_str().unwrap_or(""))
}

const MISMATCH: (u16, &str, &str) = (400, "invalid_grant", "delegation_actor_mismatch");
const LOOP: (u16, &str, &str) = (400, "invalid_grant", "delegation_loop");
const TOO_DEEP: (u16, &str, &str) = (400, "invalid_grant", "delegation_chain_too_deep");
const EXCEEDED: (u16, &str, &str) = (400, "invalid_grant", "delegation_scope_exceeded");
const SCOPE_EXCEEDED: (u16, &str, &str) = (400, "invalid_scope", "delegation_scope_exceeded");
const INVALID: (u16, &str, &str) = (400, "invalid_grant", "delegation_token_invalid");

// ---------------------------------------------------------------- the allowed flow

#[test]
fn allowed_root_one_hop_and_access_token_carry_the_chain() {
    let fx = fixture();
    let r = fx.root(&[("delegate", B), ("tctx", r#"{"tools":["get_ticket","refund"],"resources":["billing"]}"#)]);
    assert_eq!(r.0, 200, "{}", r.1);
    assert_eq!(r.1["issued_token_type"], TOKEN_TYPE_TXN_TOKEN);
    assert_eq!(r.1["token_type"], "N_A");
    assert_eq!(r.1["scope"], SCOPE);
    let expires_in = r.1["expires_in"].as_u64().unwrap();
    assert!((299..=300).contains(&expires_in), "default txn_tokens.max_ttl_s: {expires_in}");
    let root = token(r);
    assert_eq!(header_of(&root)["typ"], "txntoken+jwt");
    assert_eq!(header_of(&root)["alg"], "ES256");
    let rc = claims_of(&root);
    assert_eq!((rc["iss"].as_str(), rc["aud"].as_str(), rc["sub"].as_str(), rc["req_wl"].as_str()), (Some(ISSUER), Some("example.org"), Some(A), Some(A)));
    assert_eq!(rc["scope"], SCOPE);
    assert_eq!(rc["tctx"], json!({"task": fx.task, "intent": INTENT, "tools": ["get_ticket", "refund"], "resources": ["billing"]}));
    assert_eq!(rc["may_act"], json!({"sub": B}));
    assert!(rc.get("act").is_none(), "a root token has no act");
    assert_eq!(rc["txn"].as_str().unwrap().len(), 22);
    assert_eq!(rc["jti"].as_str().unwrap().len(), 22);
    assert_ne!(rc["txn"], rc["jti"]);

    // B exchanges it for a replacement naming itself, narrowing tools and scope.
    let hop = token(fx.replace("agent-b", &root, B, &[("scope", "tickets:read"), ("tctx", r#"{"tools":["get_ticket"]}"#)]));
    let hc = claims_of(&hop);
    assert_eq!(header_of(&hop)["typ"], "txntoken+jwt");
    assert_eq!((hc["txn"].clone(), hc["sub"].clone(), hc["aud"].clone()), (rc["txn"].clone(), rc["sub"].clone(), rc["aud"].clone()), "txn, sub, aud unchanged");
    assert_ne!(hc["jti"], rc["jti"]);
    assert_eq!(hc["act"], json!({"sub": B}));
    assert_eq!(hc["req_wl"], B);
    assert_eq!(hc["scope"], "tickets:read");
    assert_eq!(hc["tctx"], json!({"task": fx.task, "intent": INTENT, "tools": ["get_ticket"], "resources": ["billing"]}), "resources kept, tools narrowed");
    assert!(hc.get("may_act").is_none(), "no delegate: no next actor");
    assert!(hc["exp"].as_u64() <= rc["exp"].as_u64());

    // The proxy in front of C mints C's credential from it, with B's SVID as the actor.
    let r = fx.access(&hop, Some(B), &[("scope", "tickets:read"), ("tool", "get_ticket")]);
    assert_eq!(r.0, 200, "{}", r.1);
    assert_eq!(r.1["issued_token_type"], TOKEN_TYPE_JWT);
    let at = token(r);
    let ac = claims_of(&at);
    assert_eq!(ac["sub"], A, "the original principal");
    assert_eq!(ac["act"], json!({"sub": B}), "the chain, unchanged");
    assert_eq!(ac["txn"], rc["txn"]);
    assert_eq!((ac["task"].as_str(), ac["intent"].as_str(), ac["tool"].as_str()), (Some(fx.task.as_str()), Some(INTENT), Some("get_ticket")));
    assert_eq!(ac["aud"], DEST);
    assert!(ac["exp"].as_u64() <= hc["exp"].as_u64(), "never past the Txn-Token");

    // Without `task`/`intent` parameters the token's are used.
    let svid_b = fx.svid(B);
    let r = fx.post(
        "proxy",
        &[
            ("grant_type", GRANT_TOKEN_EXCHANGE),
            ("subject_token", &hop),
            ("subject_token_type", TOKEN_TYPE_TXN_TOKEN),
            ("actor_token", &svid_b),
            ("actor_token_type", TOKEN_TYPE_JWT),
            ("audience", DEST),
        ],
    );
    assert_eq!(claims_of(&token(r))["task"], fx.task.as_str());

    // A root token can be used by A itself (no act): the actor is absent or A.
    let solo = token(fx.root(&[]));
    let ac = claims_of(&token(fx.access(&solo, None, &[])));
    assert_eq!((ac["sub"].as_str(), ac.get("act")), (Some(A), None));
    assert_eq!(fx.access(&solo, Some(A), &[]).0, 200);
}

#[test]
fn stock_jwt_library_verifies_the_txn_token_and_the_chain_access_token() {
    use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
    let fx = fixture();
    let root = token(fx.root(&[("delegate", B)]));
    let hop = token(fx.replace("agent-b", &root, B, &[]));
    let at = token(fx.access(&hop, Some(B), &[("scope", "tickets:read")]));
    let jwks = request(&fx.h, "GET", "/.well-known/jwks.json", Body::None, None).body;
    let key_for = |tok: &str| {
        let kid = decode_header(tok).unwrap().kid.unwrap();
        let jwk = jwks["keys"].as_array().unwrap().iter().find(|k| k["kid"] == kid.as_str()).unwrap().clone();
        DecodingKey::from_ec_components(jwk["x"].as_str().unwrap(), jwk["y"].as_str().unwrap()).unwrap()
    };
    let validation = |aud: &str| {
        let mut v = Validation::new(Algorithm::ES256);
        v.set_issuer(&[ISSUER]);
        v.set_audience(&[aud]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.leeway = 0;
        v
    };
    for (tok, aud, typ) in [(&root, "example.org", "txntoken+jwt"), (&hop, "example.org", "txntoken+jwt"), (&at, DEST, "JWT")] {
        assert_eq!(decode_header(tok).unwrap().typ.as_deref(), Some(typ));
        let data = decode::<Value>(tok, &key_for(tok), &validation(aud)).unwrap_or_else(|e| panic!("{aud}: {e}"));
        assert_eq!(data.claims["sub"], A);
        assert_eq!(data.claims["txn"], claims_of(&root)["txn"]);
        // The same library refuses it for another audience or issuer.
        assert!(decode::<Value>(tok, &key_for(tok), &validation("other.org")).is_err());
        let mut wrong_iss = validation(aud);
        wrong_iss.set_issuer(&["https://other.test"]);
        assert!(decode::<Value>(tok, &key_for(tok), &wrong_iss).is_err());
    }
    assert_eq!(decode::<Value>(&at, &key_for(&at), &validation(DEST)).unwrap().claims["act"], json!({"sub": B}));
    // A tampered chain does not verify.
    let parts: Vec<&str> = hop.split('.').collect();
    let mut claims = claims_of(&hop);
    claims["act"] = json!({"sub": C});
    let tampered = format!("{}.{}.{}", parts[0], mandate_core::testkit::b64(claims.to_string().as_bytes()), parts[2]);
    assert!(decode::<Value>(&tampered, &key_for(&hop), &validation("example.org")).is_err());
}

// ---------------------------------------------------------------- actor attacks

#[test]
fn sub_agent_replaying_the_root_token_without_exchange_is_an_actor_mismatch() {
    let fx = fixture();
    let root = token(fx.root(&[("delegate", B)]));
    // B presents A's root token as its own: the current actor is A, the caller B.
    assert_eq!(refusal(&fx.access(&root, Some(B), &[])), MISMATCH);
    // Or any other workload that lifted it.
    assert_eq!(refusal(&fx.access(&root, Some(C), &[])), MISMATCH);
    // A replacement naming B is useless to C as well.
    let hop = token(fx.replace("agent-b", &root, B, &[]));
    assert_eq!(refusal(&fx.access(&hop, Some(C), &[])), MISMATCH);
    // And B cannot drop the actor token to pass as A.
    let r = fx.access(&hop, None, &[]);
    assert_eq!((r.0, r.1["error"].as_str()), (400, Some("invalid_request")), "{}", r.1);
}

#[test]
fn exchange_by_an_actor_not_named_in_may_act_is_refused() {
    let fx = fixture();
    let root = token(fx.root(&[("delegate", B)]));
    assert_eq!(refusal(&fx.replace("agent-c", &root, C, &[])), MISMATCH);
    // The client does not matter: the actor's SVID does.
    assert_eq!(refusal(&fx.replace("agent-b", &root, C, &[])), MISMATCH);
    // Without an actor token there is no one to name.
    let r = fx.post(
        "agent-b",
        &[
            ("grant_type", GRANT_TOKEN_EXCHANGE),
            ("subject_token", &root),
            ("subject_token_type", TOKEN_TYPE_TXN_TOKEN),
            ("requested_token_type", TOKEN_TYPE_TXN_TOKEN),
        ],
    );
    assert_eq!((r.0, r.1["error"].as_str()), (400, Some("invalid_request")));
    assert_eq!(fx.replace("agent-b", &root, B, &[]).0, 200);
}

#[test]
fn txn_token_without_may_act_cannot_be_exchanged() {
    let fx = fixture();
    let root = token(fx.root(&[]));
    assert_eq!(refusal(&fx.replace("agent-b", &root, B, &[])), MISMATCH);
    // A hop that names no delegate ends the chain there.
    let root = token(fx.root(&[("delegate", B)]));
    let hop = token(fx.replace("agent-b", &root, B, &[]));
    assert_eq!(refusal(&fx.replace("agent-c", &hop, C, &[])), MISMATCH);
}

// ---------------------------------------------------------------- widening attacks

#[test]
fn replacement_widening_scope_is_refused() {
    let fx = fixture();
    let root = token(fx.root(&[("delegate", B), ("scope", "tickets:read")]));
    assert_eq!(claims_of(&root)["scope"], "tickets:read");
    assert_eq!(refusal(&fx.replace("agent-b", &root, B, &[("scope", "tickets:read tickets:write")])), SCOPE_EXCEEDED);
    assert_eq!(refusal(&fx.replace("agent-b", &root, B, &[("scope", "tickets:write")])), SCOPE_EXCEEDED);
    let r = fx.replace("agent-b", &root, B, &[("scope", "")]);
    assert_eq!((r.0, r.1["error"].as_str()), (400, Some("invalid_scope")));
    // The credential minted from the token cannot widen it either.
    let hop = token(fx.replace("agent-b", &root, B, &[("scope", "tickets:read")]));
    assert_eq!(refusal(&fx.access(&hop, Some(B), &[("scope", "tickets:write")])), SCOPE_EXCEEDED);
    assert_eq!(fx.access(&hop, Some(B), &[("scope", "tickets:read")]).0, 200);
}

#[test]
fn replacement_widening_tctx_tools_or_resources_is_refused() {
    let fx = fixture();
    let root = token(fx.root(&[("delegate", B), ("tctx", r#"{"tools":["get_ticket"],"resources":["billing"]}"#)]));
    for widen in [r#"{"tools":["get_ticket","refund"]}"#, r#"{"tools":["refund"]}"#, r#"{"resources":["billing","crm"]}"#, r#"{"resources":["crm"]}"#] {
        assert_eq!(refusal(&fx.replace("agent-b", &root, B, &[("tctx", widen)])), EXCEEDED, "{widen}");
    }
    // The context itself cannot be swapped: task/intent parameters must be the token's.
    assert_eq!(refusal(&fx.replace("agent-b", &root, B, &[("intent", "case.close")])), EXCEEDED);
    let r = fx.replace("agent-b", &root, B, &[("tctx", r#"{"intent":"case.close"}"#)]);
    assert_eq!((r.0, r.1["error"].as_str()), (400, Some("invalid_request")), "{}", r.1);
    // Narrowing is fine: a subset, or an empty list (nothing left).
    let hop = token(fx.replace("agent-b", &root, B, &[("tctx", r#"{"tools":[]}"#)]));
    assert_eq!(claims_of(&hop)["tctx"]["tools"], json!([]));
    // The minted credential must name a tool inside the token's list, and the token's intent.
    let root2 = token(fx.root(&[("tctx", r#"{"tools":["get_ticket"]}"#)]));
    assert_eq!(refusal(&fx.access(&root2, None, &[("tool", "refund")])), EXCEEDED);
    assert_eq!(fx.access(&root2, None, &[("tool", "get_ticket")]).0, 200);
    let r = fx.post(
        "proxy",
        &[
            ("grant_type", GRANT_TOKEN_EXCHANGE),
            ("subject_token", &root2),
            ("subject_token_type", TOKEN_TYPE_TXN_TOKEN),
            ("audience", DEST),
            ("intent", "case.close"),
        ],
    );
    assert_eq!(refusal(&r), EXCEEDED);
    // A root token with no tool list constrains nothing beyond the intent; a hop may add one.
    let open = token(fx.root(&[("delegate", B)]));
    let hop = token(fx.replace("agent-b", &open, B, &[("tctx", r#"{"tools":["get_ticket"]}"#)]));
    assert_eq!(claims_of(&hop)["tctx"]["tools"], json!(["get_ticket"]));
}

#[test]
fn replacement_dropping_or_loosening_an_arguments_constraint_is_refused() {
    let fx = fixture();
    let limits = r#"{"arguments":[{"tool":"refund","pointer":"/amount","max":100},{"pointer":"/currency","equals":"EUR"}]}"#;
    let root = token(fx.root(&[("delegate", B), ("tctx", limits)]));
    for weaker in [
        r#"{"arguments":[{"tool":"refund","pointer":"/amount","max":100}]}"#,
        r#"{"arguments":[]}"#,
        r#"{"arguments":[{"tool":"refund","pointer":"/amount","max":1000},{"pointer":"/currency","equals":"EUR"}]}"#,
        r#"{"arguments":[{"pointer":"/amount","max":100},{"pointer":"/currency","equals":"EUR"}]}"#,
    ] {
        assert_eq!(refusal(&fx.replace("agent-b", &root, B, &[("tctx", weaker)])), EXCEEDED, "{weaker}");
    }
    // Kept verbatim (order aside) with one more: allowed. Left out of `tctx`: kept as is.
    let stronger = r#"{"arguments":[{"pointer":"/currency","equals":"EUR"},{"tool":"refund","pointer":"/amount","max":100},{"pointer":"/note","equals":"x"}]}"#;
    let hop = token(fx.replace("agent-b", &root, B, &[("tctx", stronger)]));
    assert_eq!(claims_of(&hop)["tctx"]["arguments"].as_array().map(Vec::len), Some(3));
    let root = token(fx.root(&[("delegate", B), ("tctx", limits)]));
    let hop = token(fx.replace("agent-b", &root, B, &[("tctx", r#"{"tools":["refund"]}"#)]));
    assert_eq!(claims_of(&hop)["tctx"]["arguments"], claims_of(&root)["tctx"]["arguments"]);
    // Malformed constraints never reach a token.
    for bad in [
        r#"{"arguments":[{"pointer":"/amount"}]}"#,
        r#"{"arguments":[{"pointer":"amount","max":1}]}"#,
        r#"{"arguments":[{"pointer":"/amount","max":"100"}]}"#,
        r#"{"arguments":[{"pointer":"/amount","max":1,"regex":".*"}]}"#,
        r#"{"arguments":[{"pointer":"/a","equals":null}]}"#,
        r#"{"arguments":{"pointer":"/a","max":1}}"#,
    ] {
        let r = fx.root(&[("tctx", bad)]);
        assert_eq!((r.0, r.1["error"].as_str()), (400, Some("invalid_request")), "{bad}: {}", r.1);
    }
}

#[test]
fn replacement_extending_exp_with_requested_ttl_is_refused_not_capped() {
    let fx = fixture();
    let r = fx.root(&[("delegate", B), ("requested_ttl", "60")]);
    assert!(r.1["expires_in"].as_u64().unwrap() <= 60);
    let root = token(r);
    let root_exp = claims_of(&root)["exp"].as_u64().unwrap();
    for longer in ["120", "300", "86400"] {
        assert_eq!(refusal(&fx.replace("agent-b", &root, B, &[("requested_ttl", longer)])), EXCEEDED, "{longer}");
    }
    let hop = token(fx.replace("agent-b", &root, B, &[("requested_ttl", "30")]));
    assert!(claims_of(&hop)["exp"].as_u64().unwrap() <= now() + 30);
    // No requested_ttl: the previous exp, never later.
    let hop = token(fx.replace("agent-b", &token(fx.root(&[("delegate", B), ("requested_ttl", "60")])), B, &[]));
    assert!(claims_of(&hop)["exp"].as_u64().unwrap() <= root_exp + 2);
    // A root token is capped by txn_tokens.max_ttl_s.
    let long = token(fx.root(&[("requested_ttl", "86400")]));
    let c = claims_of(&long);
    assert!(c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap() <= 300);
}

// ---------------------------------------------------------------- chain attacks

#[test]
fn delegation_loop_a_to_b_to_a_is_refused() {
    let fx = fixture();
    let root = token(fx.root(&[("delegate", B)]));
    // B hands the task back to A.
    assert_eq!(refusal(&fx.replace("agent-b", &root, B, &[("delegate", A)])), LOOP);
    // A cannot name itself either.
    assert_eq!(refusal(&fx.root(&[("delegate", A)])), LOOP);
    // A token that somehow names A as the next actor (signed by the minter's own key) is still
    // refused when A exchanges it.
    let mut claims = claims_of(&token(fx.replace("agent-b", &root, B, &[("delegate", C)])));
    claims["may_act"] = json!({"sub": A});
    let back = fx.sign_as_minter(&claims, "txntoken+jwt");
    assert_eq!(refusal(&fx.replace("agent-a", &back, A, &[])), LOOP);
    // A chain with a principal twice is refused wherever it is presented.
    claims["act"] = json!({"sub": B, "act": {"sub": B}});
    claims["may_act"] = json!({"sub": C});
    let twice = fx.sign_as_minter(&claims, "txntoken+jwt");
    assert_eq!(refusal(&fx.access(&twice, Some(B), &[])), LOOP);
    assert_eq!(refusal(&fx.replace("agent-c", &twice, C, &[])), LOOP);
}

#[test]
fn one_hop_too_deep_is_refused() {
    let fx = fixture();
    let root = token(fx.root(&[("delegate", B)]));
    let one = token(fx.replace("agent-b", &root, B, &[("delegate", C)]));
    let two = token(fx.replace("agent-c", &one, C, &[("delegate", D)]));
    assert_eq!(claims_of(&two)["act"], json!({"sub": C, "act": {"sub": B}}));
    assert_eq!(fx.access(&two, Some(C), &[]).0, 200, "two delegations: at the cap");
    // The third delegation goes past `txn_tokens.max_delegations` (2).
    assert_eq!(refusal(&fx.replace("agent-d", &two, D, &[])), TOO_DEEP);
    // A deeper chain signed by the minter (a lowered cap, say) is refused when used.
    let mut claims = claims_of(&two);
    claims["act"] = json!({"sub": D, "act": {"sub": C, "act": {"sub": B}}});
    claims["req_wl"] = json!(D);
    claims.as_object_mut().unwrap().remove("may_act");
    let deep = fx.sign_as_minter(&claims, "txntoken+jwt");
    assert_eq!(refusal(&fx.access(&deep, Some(D), &[])), TOO_DEEP);
    // The cap is configurable.
    let fx = fixture_with(|c| c["txn_tokens"] = json!({"max_delegations": 1}));
    let root = token(fx.root(&[("delegate", B)]));
    let one = token(fx.replace("agent-b", &root, B, &[("delegate", C)]));
    assert_eq!(refusal(&fx.replace("agent-c", &one, C, &[])), TOO_DEEP);
}

// ---------------------------------------------------------------- revocation

#[test]
fn task_ended_mid_chain_refuses_replacement_and_access_token() {
    let fx = fixture();
    let root = token(fx.root(&[("delegate", B)]));
    let hop = token(fx.replace("agent-b", &root, B, &[("delegate", C)]));
    assert_eq!(fx.access(&hop, Some(B), &[]).0, 200);
    let out = fx.orchestrate(&format!("/tasks/{}/end", fx.task), Body::None);
    // Both Txn-Tokens were recorded against the task: ending it lists them.
    let jtis: Vec<&str> = out["jtis"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    for t in [&root, &hop] {
        let jti = claims_of(t)["jti"].as_str().unwrap().to_string();
        assert!(jtis.contains(&jti.as_str()), "{jti} not in {jtis:?}");
    }
    assert_eq!(refusal(&fx.replace("agent-c", &hop, C, &[])), (400, "invalid_grant", "task_ended"));
    assert_eq!(refusal(&fx.access(&hop, Some(B), &[])), (400, "invalid_grant", "task_ended"));
    assert_eq!(refusal(&fx.root(&[])), (400, "invalid_grant", "task_ended"));
}

#[test]
fn task_revoked_for_a_delegate_refuses_its_hop() {
    let fx = fixture();
    let root = token(fx.root(&[("delegate", B)]));
    fx.orchestrate("/revoke", Body::Json(json!({"task": fx.task, "subject": B})));
    assert_eq!(refusal(&fx.replace("agent-b", &root, B, &[])), (400, "invalid_grant", "task_ended"));
    assert_eq!(fx.access(&root, None, &[]).0, 200, "A still works the task");
}

#[test]
fn subject_revocation_of_the_middle_principal_refuses_the_chain() {
    // Room for a third hop, so that D's exchange reaches the revocation check.
    let fx = fixture_with(|c| c["txn_tokens"] = json!({"max_delegations": 3}));
    let root = token(fx.root(&[("delegate", B)]));
    let one = token(fx.replace("agent-b", &root, B, &[("delegate", C)]));
    let two = token(fx.replace("agent-c", &one, C, &[("delegate", D)]));
    assert_eq!(fx.access(&two, Some(C), &[]).0, 200);
    fx.orchestrate("/revoke", Body::Json(json!({"subject": B})));
    let revoked = (400, "invalid_grant", "subject_revoked");
    assert_eq!(refusal(&fx.access(&two, Some(C), &[])), revoked);
    assert_eq!(refusal(&fx.replace("agent-d", &two, D, &[])), revoked);
    assert_eq!(refusal(&fx.replace("agent-b", &root, B, &[])), revoked, "B can no longer join a chain");
    // The original principal and the next actor are checked too.
    let fx = fixture();
    let root = token(fx.root(&[("delegate", B)]));
    fx.orchestrate("/revoke", Body::Json(json!({"subject": A})));
    assert_eq!(refusal(&fx.replace("agent-b", &root, B, &[])), revoked);
    assert_eq!(refusal(&fx.access(&root, None, &[])), revoked);
}

#[test]
fn revoked_txn_token_jti_is_refused() {
    let fx = fixture();
    let root = token(fx.root(&[("delegate", B)]));
    let jti = claims_of(&root)["jti"].as_str().unwrap().to_string();
    fx.orchestrate("/revoke", Body::Json(json!({"jti": jti})));
    assert_eq!(refusal(&fx.replace("agent-b", &root, B, &[])), INVALID);
    assert_eq!(refusal(&fx.access(&root, None, &[])), INVALID);
}

// ---------------------------------------------------------------- forged tokens

#[test]
fn forged_or_tampered_txn_token_is_refused() {
    let fx = fixture();
    let root = token(fx.root(&[("delegate", B)]));
    let good = claims_of(&root);
    let kid = header_of(&root)["kid"].as_str().unwrap().to_string();
    let parts: Vec<&str> = root.split('.').collect();
    let b64 = |v: &Value| mandate_core::testkit::b64(v.to_string().as_bytes());
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = good.clone();
        f(&mut c);
        fx.sign_as_minter(&c, "txntoken+jwt")
    };
    let other_key = TestKey::es256(&kid);
    let mut cases: Vec<(&str, String)> = vec![
        // Signature: another key under the minter's kid; a payload swapped under the real signature.
        ("signed by another key", other_key.sign_with_header("ES256", &json!({"alg": "ES256", "typ": "txntoken+jwt", "kid": kid}), &good)),
        ("tampered payload", {
            let mut c = good.clone();
            c["scope"] = json!("tickets:read tickets:write admin");
            format!("{}.{}.{}", parts[0], b64(&c), parts[2])
        }),
        ("unknown kid", TestKey::es256("nope").sign_with_header("ES256", &json!({"alg": "ES256", "typ": "txntoken+jwt", "kid": "nope"}), &good)),
        ("alg none", format!("{}.{}.", b64(&json!({"alg": "none", "typ": "txntoken+jwt", "kid": kid})), parts[1])),
        ("no signature", format!("{}.{}", parts[0], parts[1])),
        // Header: the typ of an access token, none, or an extra member.
        ("typ JWT", fx.sign_as_minter(&good, "JWT")),
        ("typ case", fx.sign_as_minter(&good, "TXNTOKEN+JWT")),
        ("iss", with(&|c| c["iss"] = json!("https://evil.test"))),
        ("aud", with(&|c| c["aud"] = json!("other.org"))),
        ("aud array", with(&|c| c["aud"] = json!(["example.org"]))),
        ("expired", with(&|c| {
            c["iat"] = json!(now() - 600);
            c["exp"] = json!(now() - 1);
        })),
        ("issued in the future", with(&|c| c["iat"] = json!(now() + 3600))),
        ("unknown tctx member", with(&|c| c["tctx"]["admin"] = json!(true))),
        ("unknown claim", with(&|c| c["role"] = json!("admin"))),
        ("act with extra member", with(&|c| {
            c["act"] = json!({"sub": B, "role": "admin"});
            c["req_wl"] = json!(B);
        })),
        ("act sub not a SPIFFE ID", with(&|c| {
            c["act"] = json!({"sub": "bob"});
            c["req_wl"] = json!("bob");
        })),
        ("act as a string", with(&|c| c["act"] = json!(B))),
        ("req_wl not the current actor", with(&|c| c["req_wl"] = json!(B))),
        ("may_act malformed", with(&|c| c["may_act"] = json!({"sub": B, "act": {"sub": C}}))),
        ("scope missing", with(&|c| {
            c.as_object_mut().unwrap().remove("scope");
        })),
        ("txn missing", with(&|c| {
            c.as_object_mut().unwrap().remove("txn");
        })),
    ];
    let mut hdr = header_of(&root);
    hdr["jku"] = json!("https://evil.test/jwks");
    cases.push(("extra header member", format!("{}.{}.{}", b64(&hdr), parts[1], parts[2])));
    for (what, forged) in &cases {
        let r = fx.replace("agent-b", forged, B, &[]);
        assert_eq!(refusal(&r), INVALID, "{what}: {}", r.1);
        let r = fx.access(forged, Some(B), &[]);
        assert_eq!(refusal(&r), INVALID, "{what}: {}", r.1);
        assert!(!r.1.to_string().contains(forged.as_str()), "a token echoed");
    }
    // The untouched token still works.
    assert_eq!(fx.replace("agent-b", &root, B, &[]).0, 200);
}

#[test]
fn txn_token_presented_as_svid_and_svid_presented_as_txn_token_are_refused() {
    let fx = fixture();
    let root = token(fx.root(&[("delegate", B)]));
    // A Txn-Token where an SVID is expected: as subject (root request or plain exchange)…
    let r = fx.post(
        "agent-b",
        &[
            ("grant_type", GRANT_TOKEN_EXCHANGE),
            ("subject_token", &root),
            ("subject_token_type", TOKEN_TYPE_JWT),
            ("requested_token_type", TOKEN_TYPE_TXN_TOKEN),
            ("task", &fx.task),
            ("intent", INTENT),
            ("scope", SCOPE),
        ],
    );
    assert_eq!((r.0, r.1["error"].as_str()), (400, Some("invalid_grant")), "{}", r.1);
    assert!(r.1["error_description"].as_str().unwrap().starts_with("subject_token rejected"));
    let r = fx.post(
        "proxy",
        &[("grant_type", GRANT_TOKEN_EXCHANGE), ("subject_token", &root), ("subject_token_type", TOKEN_TYPE_JWT), ("audience", DEST), ("task", &fx.task)],
    );
    assert_eq!((r.0, r.1["error"].as_str()), (400, Some("invalid_grant")), "{}", r.1);
    // …or as the actor token.
    let r = fx.post(
        "agent-b",
        &[
            ("grant_type", GRANT_TOKEN_EXCHANGE),
            ("subject_token", &root),
            ("subject_token_type", TOKEN_TYPE_TXN_TOKEN),
            ("actor_token", &root),
            ("actor_token_type", TOKEN_TYPE_JWT),
            ("requested_token_type", TOKEN_TYPE_TXN_TOKEN),
        ],
    );
    assert!(r.1["error_description"].as_str().unwrap().starts_with("actor_token rejected"), "{}", r.1);
    // An SVID where a Txn-Token is expected.
    let svid = fx.svid(B);
    assert_eq!(refusal(&fx.replace("agent-b", &svid, B, &[])), INVALID);
    assert_eq!(refusal(&fx.access(&svid, Some(B), &[])), INVALID);
    // An access token minted by this very minter is not a Txn-Token either (typ JWT).
    let at = token(fx.access(&root, None, &[]));
    assert_eq!(refusal(&fx.access(&at, None, &[])), INVALID);
    // The type is not guessed: an unknown subject_token_type is refused.
    let r = fx.post("proxy", &[("grant_type", GRANT_TOKEN_EXCHANGE), ("subject_token", &root), ("subject_token_type", "urn:x"), ("audience", DEST)]);
    assert_eq!((r.0, r.1["error"].as_str()), (400, Some("invalid_request")));
}

// ---------------------------------------------------------------- roles and parameters

#[test]
fn client_without_txn_role_cannot_obtain_txn_tokens() {
    let fx = fixture();
    for client in ["proxy", "orchestrator"] {
        let r = fx.root_as(client, A, &[]);
        assert_eq!((r.0, r.1["error"].as_str(), r.1["error_description"].as_str()), (400, Some("unauthorized_client"), Some("client lacks role `txn`")), "{client}");
    }
    let root = token(fx.root(&[("delegate", B)]));
    let r = fx.replace("proxy", &root, B, &[]);
    assert_eq!((r.0, r.1["error"].as_str()), (400, Some("unauthorized_client")));
    // `txn` alone does not mint access tokens.
    let r = fx.access_as("agent-b", &root, None, &[]);
    assert_eq!((r.0, r.1["error_description"].as_str()), (400, Some("client lacks role `mint`")));
}

#[test]
fn proxy_mint_client_cannot_obtain_txn_tokens_unless_it_has_txn() {
    let fx = fixture();
    let r = fx.root_as("proxy", A, &[("delegate", B)]);
    assert_eq!(r.1["error_description"], "client lacks role `txn`");
    let root = token(fx.root_as("proxy-txn", A, &[("delegate", B)]));
    assert_eq!(refusal(&fx.replace("proxy", &root, B, &[])).1, "unauthorized_client");
    assert_eq!(fx.replace("proxy-txn", &root, B, &[]).0, 200);
}

#[test]
fn root_txn_token_needs_task_intent_scope_and_a_task_bound_to_the_subject() {
    let fx = fixture();
    let svid = fx.svid(A);
    let base = [
        ("grant_type", GRANT_TOKEN_EXCHANGE),
        ("subject_token", svid.as_str()),
        ("subject_token_type", TOKEN_TYPE_JWT),
        ("requested_token_type", TOKEN_TYPE_TXN_TOKEN),
    ];
    let with = |extra: &[(&str, &str)]| {
        let mut p = base.to_vec();
        p.extend_from_slice(extra);
        fx.post("agent-a", &p)
    };
    let t = fx.task.as_str();
    assert_eq!(with(&[("intent", INTENT), ("scope", SCOPE)]).1["error"], "invalid_request", "no task");
    assert_eq!(with(&[("task", t), ("scope", SCOPE)]).1["error"], "invalid_request", "no intent");
    assert_eq!(with(&[("task", t), ("intent", INTENT)]).1["error"], "invalid_scope", "no scope");
    assert_eq!(with(&[("task", t), ("intent", INTENT), ("scope", " ")]).1["error"], "invalid_scope");
    // Registered-task checks, as for access tokens.
    assert_eq!(refusal(&with(&[("task", t), ("intent", "case.close"), ("scope", SCOPE)])).2, "intent_not_in_task");
    assert_eq!(refusal(&with(&[("task", "tsk_AAAAAAAAAAAAAAAAAAAAAA"), ("intent", INTENT), ("scope", SCOPE)])).2, "task_unknown");
    assert_eq!(refusal(&fx.root_as("agent-b", B, &[])).2, "task_not_bound", "B cannot root a chain in A's task");
    // `audience` is absent or the token's; `tool` and `actor_token` do not apply; `delegate` is a SPIFFE ID.
    assert_eq!(fx.root(&[("audience", "example.org")]).0, 200);
    assert_eq!(fx.root(&[("audience", DEST)]).1["error"], "invalid_target");
    assert_eq!(fx.root(&[("tool", "get_ticket")]).1["error"], "invalid_request");
    let b = fx.svid(B);
    assert_eq!(fx.root(&[("actor_token", &b), ("actor_token_type", TOKEN_TYPE_JWT)]).1["error"], "invalid_request");
    for bad in ["bob", "spiffe://example.org/../b", "spiffe://example.org/b\n", ""] {
        assert_eq!(fx.root(&[("delegate", bad)]).1["error"], "invalid_request", "{bad:?}");
    }
    assert_eq!(fx.root(&[("delegate", B), ("delegate", C)]).1["error"], "invalid_request", "repeated");
    // `delegate`/`tctx` never silently ignored on a plain exchange.
    let r = fx.post(
        "proxy",
        &[("grant_type", GRANT_TOKEN_EXCHANGE), ("subject_token", &svid), ("subject_token_type", TOKEN_TYPE_JWT), ("audience", DEST), ("task", t), ("delegate", B)],
    );
    assert_eq!(r.1["error"], "invalid_request", "{}", r.1);
}

#[test]
fn txn_token_signed_by_a_retired_but_published_key_still_verifies() {
    let fx = fixture();
    let root = token(fx.root(&[("delegate", B)]));
    let old_kid = header_of(&root)["kid"].as_str().unwrap().to_string();
    // A new key that signs at once (its publication period long past).
    let state = fx.env.dir.path().join("state");
    let policy = mandate_minter::keys::Policy { publish_before_use_s: 300, keep: 3, retire_after_s: 1_000_000, notice_slack_s: 1 };
    let rotated = mandate_minter::keys::rotate_at(&state, &policy, now() - 10_000).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while fx.h.state.current_keys().current_kid != rotated.kid {
        assert!(std::time::Instant::now() < deadline, "the minter did not switch keys");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let hop = token(fx.replace("agent-b", &root, B, &[]));
    assert_eq!(header_of(&hop)["kid"], rotated.kid.as_str());
    assert_ne!(rotated.kid, old_kid);
    assert_eq!(fx.access(&hop, Some(B), &[]).0, 200);
    // The root token, signed by the old (still published) key, is still accepted.
    assert_eq!(fx.access(&root, None, &[]).0, 200);
}

#[test]
fn txn_tokens_config_is_validated_with_the_field_named() {
    let env = Env::new();
    let err = |edit: &dyn Fn(&mut Value)| {
        let mut c = env.dev();
        edit(&mut c);
        MinterConfig::from_json(c).err().map(|e| format!("{e:#}")).unwrap_or_default()
    };
    assert!(err(&|c| c["txn_tokens"] = json!({"max_delegations": 0})).contains("txn_tokens.max_delegations"));
    assert!(err(&|c| c["txn_tokens"] = json!({"max_delegations": 9})).contains("txn_tokens.max_delegations"));
    assert!(err(&|c| c["txn_tokens"] = json!({"max_ttl_s": 0})).contains("txn_tokens.max_ttl_s"));
    assert!(err(&|c| c["txn_tokens"] = json!({"max_ttl_s": 86401})).contains("txn_tokens.max_ttl_s"));
    assert!(err(&|c| c["txn_tokens"] = json!({"audience": "a b"})).contains("txn_tokens.audience"));
    assert!(!err(&|c| c["txn_tokens"] = json!({"max_delegation": 2})).is_empty(), "unknown fields refused");
    assert!(err(&|c| c["txn_tokens"] = json!({"max_delegations": 8, "max_ttl_s": 600, "audience": "example.org"})).is_empty());
    let mut c = env.base();
    c["client_auth"] = json!({"mode": "shared_secret", "clients": [{"client_id": "a", "secret_sha256": "0".repeat(64), "roles": []}]});
    let e = format!("{:#}", MinterConfig::from_json(c).unwrap_err());
    assert!(e.contains("txn"), "{e}");
}

#[test]
fn configured_txn_audience_is_issued_and_required() {
    let fx = fixture_with(|c| c["txn_tokens"] = json!({"audience": "txn.example.org", "max_ttl_s": 60}));
    let r = fx.root(&[("delegate", B)]);
    assert!(r.1["expires_in"].as_u64().unwrap() <= 60);
    let root = token(r);
    assert_eq!(claims_of(&root)["aud"], "txn.example.org");
    assert_eq!(fx.replace("agent-b", &root, B, &[]).0, 200);
    // The trust-domain audience is no longer accepted.
    let mut c = claims_of(&root);
    c["aud"] = json!("example.org");
    assert_eq!(refusal(&fx.access(&fx.sign_as_minter(&c, "txntoken+jwt"), None, &[])), INVALID);
}
