//! Delegation end to end (issue 13): agent A hands part of its task to sub-agent B, and B calls
//! the payments service C. Two real Envoys with mandate, the real minter over mTLS, and Envoy's
//! stock `jwt_authn` in front of C checking the credential mandate minted for the chain.
//!
//! ```text
//!  A ──SVID + Txn-Token(root)──▶ Envoy 1 (mandate; resource billing-agent: forward) ──▶ B (echo)
//!  B ──own cert──▶ minter /token: Txn-Token(root) + B's SVID ─▶ Txn-Token naming B
//!  B ──SVID + Txn-Token(B)────▶ Envoy 2 (mandate) ──minted(sub A, act B)──▶ jwt_authn ──▶ C (echo)
//! ```
//!
//! B's side of the story is played by the test: it reads what Envoy 1 forwarded to B's echo and
//! makes B's calls with B's own certificate and SVID. Every refusal is checked to leave the
//! services untouched.

use std::time::Duration;

use mandate_e2e::{prerequisites, testkit, unix_now, wait_until, Envoy, HttpResponse, MockServer, SvidIssuer, TlsClient, Vars};
use mandate_minter::config::MinterConfig;
use serde_json::{json, Value};

mod orders_story;
use orders_story::{form, gen_test_certs, jwt_authn_listener_yaml, jwt_claims, minter_tls_cluster_yaml, Jwks, MINTER_AUDIENCE, MINTER_ISSUER};

const GATEWAY: &str = "spiffe://example.org/proxy/envoy-1";
const ORCHESTRATOR: &str = "spiffe://example.org/orchestrator";
const A: &str = "spiffe://example.org/ns/agents/sa/triage-bot";
const B: &str = "spiffe://example.org/ns/agents/sa/billing-bot";
const D: &str = "spiffe://example.org/ns/agents/sa/ledger-bot";
const E: &str = "spiffe://example.org/ns/agents/sa/archive-bot";
const X: &str = "spiffe://example.org/ns/tools/sa/scraper";
const INTENT: &str = "case.resolve";
const BILLING_AUD: &str = "https://billing.internal";
const PAYMENTS_AUD: &str = "https://payments.internal";
const SCOPE: &str = "payments:write";
const TXN_TOKEN: &str = "urn:ietf:params:oauth:token-type:txn_token";
const JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
const POLL_MS: u64 = 300;

fn body(r: &HttpResponse) -> Value {
    r.json().unwrap_or(Value::Null)
}

fn reason(r: &HttpResponse) -> String {
    body(r)["reason"].as_str().unwrap_or_default().to_string()
}

/// A JWT-SVID for `sub`, good at the gateways and at the minter.
fn svid(issuer: &SvidIssuer, sub: &str) -> String {
    let now = unix_now();
    let mut claims = testkit::svid_claims(sub, &issuer.audience, now.saturating_sub(5), now + 300);
    claims["aud"] = json!([issuer.audience, MINTER_AUDIENCE]);
    issuer.key.sign(&claims)
}

/// The policy both listeners enforce: triage agents (class `agent`) may hand `case.resolve` work
/// to billing agents (class `subagent`), billing agents to each other; the scraper (class
/// `tool`) is never a delegate. Only triage agents read the ledger (the intersection).
fn policy(max_delegations: u64) -> Value {
    json!({
        "tasks": "registered",
        "max_delegations": max_delegations,
        "classes": [
            {"name": "agent", "principals": [A], "intent_required": true},
            {"name": "subagent", "principals": [B, D, E], "intent_required": true},
            {"name": "tool", "principals": [X], "intent_required": true}
        ],
        "resources": [
            {"name": "billing-agent", "paths": ["/delegate/**"], "methods": ["POST"], "audience": BILLING_AUD,
             "txn_token": "forward", "workload": B},
            {"name": "payments", "paths": ["/payments/**"], "methods": ["POST"], "audience": PAYMENTS_AUD},
            {"name": "refunds", "paths": ["/refunds/**"], "methods": ["POST"], "audience": PAYMENTS_AUD},
            {"name": "ledger", "paths": ["/ledger/**"], "methods": ["GET"], "audience": PAYMENTS_AUD}
        ],
        "intents": [{"name": INTENT, "scopes": [SCOPE], "ttl_s": 60, "operations": [
            {"resource": "billing-agent", "methods": ["POST"]},
            {"resource": "payments", "methods": ["POST"]},
            {"resource": "refunds", "methods": ["POST"]},
            {"resource": "ledger", "methods": ["GET"]}
        ]}],
        "rules": [
            {"id": "agents-resolve-cases", "effect": "allow", "classes": ["agent", "subagent", "tool"], "intents": [INTENT],
             "resources": ["billing-agent", "payments", "refunds"]},
            {"id": "triage-reads-ledger", "effect": "allow", "classes": ["agent"], "intents": [INTENT], "resources": ["ledger"]}
        ],
        "delegation_rules": [
            {"id": "triage-hands-billing", "intents": [INTENT], "from": ["agent"], "to": ["subagent"]},
            {"id": "billing-hands-billing", "intents": [INTENT], "from": ["subagent"], "to": ["subagent"]}
        ]
    })
}

fn plugin_config(issuer: &SvidIssuer, minter_jwks: &Value, max_delegations: u64) -> Value {
    json!({
        "identity": {"audiences": [issuer.audience],
                     "trust_domains": [{"name": issuer.trust_domain, "bundle": {"inline": issuer.bundle()}}]},
        "delegation": {"issuer": MINTER_ISSUER, "audience": issuer.trust_domain, "keys": {"inline": minter_jwks}, "max_delegations": 2},
        "policy": policy(max_delegations),
        "minter": {"cluster": "minter", "authority": "localhost", "timeout_ms": 2000,
                   "revocations": {"interval_ms": POLL_MS}}
    })
}

struct Rig {
    issuer: SvidIssuer,
    _dir: tempfile::TempDir,
    minter: mandate_minter::server::Handle,
    mport: u16,
    orchestrator: TlsClient,
    /// Envoy 1, in front of B; Envoy 2, in front of C (behind jwt_authn).
    front_of_b: Envoy,
    front_of_c: Envoy,
    b_service: MockServer,
    c_service: MockServer,
    pki: std::path::PathBuf,
}

impl Rig {
    fn start(proxy_max_delegations: u64) -> Rig {
        let issuer = SvidIssuer::new();
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = dir.path().join("pki");
        let named = |n: &str, id: &str| format!("{n}={id}");
        gen_test_certs(&pki, &[GATEWAY, &named("orchestrator", ORCHESTRATOR), &named("a", A), &named("b", B), &named("d", D), &named("e", E), &named("x", X)]);
        let p = |f: &str| pki.join(f);
        let minter = mandate_minter::spawn(
            MinterConfig::from_json(json!({
                "listen": "127.0.0.1:0",
                "issuer": MINTER_ISSUER,
                "state_dir": dir.path().join("state"),
                "workers": 1,
                "log_level": "off",
                "identity": {"audiences": [MINTER_AUDIENCE],
                             "trust_domains": [{"name": issuer.trust_domain, "bundle": {"inline": issuer.bundle()}}]},
                "audiences": {issuer.trust_domain.as_str(): [BILLING_AUD, PAYMENTS_AUD]},
                "scopes": {BILLING_AUD: [SCOPE], PAYMENTS_AUD: [SCOPE]},
                "tls": {"cert": p("server.pem"), "key": p("server.key"), "client_ca": p("ca.pem")},
                "client_auth": {"mode": "mtls", "clients": [
                    {"client_id": GATEWAY, "roles": ["mint", "feed"]},
                    {"client_id": ORCHESTRATOR, "roles": ["tasks", "revoke"]},
                    {"client_id": A, "roles": ["txn"]},
                    {"client_id": B, "roles": ["txn"]},
                    {"client_id": D, "roles": ["txn"]},
                    {"client_id": E, "roles": ["txn"]},
                    {"client_id": X, "roles": ["txn"]}
                ]},
                "require_task": true,
                "tasks": {"require_registered": true},
                "txn_tokens": {"max_delegations": 2, "max_ttl_s": 300},
                "ttl": {"default_s": 120, "max_s": 300}
            }))
            .expect("minter config"),
        )
        .expect("minter starts");
        let mport = minter.addr.port();
        let orchestrator = TlsClient::new(&pki, Some("orchestrator")).expect("orchestrator TLS");
        let jwks = orchestrator.request(mport, "GET", "/.well-known/jwks.json", &[], b"").expect("minter JWKS");
        assert_eq!(jwks.status, 200, "{}", jwks.text());
        let jwks_doc = jwks.text();
        let jwks: Value = serde_json::from_str(&jwks_doc).expect("JWKS JSON");

        let b_service = MockServer::echo().expect("B");
        let c_service = MockServer::echo().expect("C");
        let start = |upstream: u16, extra: Vars, max: u64| {
            Envoy::start(
                "mandate.yaml",
                extra
                    .plugin_config_json(&plugin_config(&issuer, &jwks, max))
                    .upstream_port(upstream)
                    .cluster_yaml(&minter_tls_cluster_yaml(mport, &pki, true)),
            )
            .expect("envoy starts")
        };
        let front_of_b = start(b_service.port(), Vars::new(), 2);
        // Envoy 2 routes to its own jwt_authn listener, which routes to C: the listener's port
        // is only known once it runs, so the `upstream` cluster points at a fixed free port.
        let rs_port = free_port();
        let c_cluster = mandate_e2e::loopback_cluster_yaml("payments", c_service.port(), Duration::from_secs(5));
        // Envoy's stock jwt_authn for the payments audience in front of C.
        let rs = jwt_authn_listener_yaml(rs_port, Jwks::Inline(&jwks_doc), Some("payments"), PAYMENTS_AUD,
                                         &[("x-verified-sub", "sub"), ("x-verified-txn", "txn")]);
        let front_of_c = start(rs_port, Vars::new().listener_yaml(&rs).cluster_yaml(&c_cluster), proxy_max_delegations);
        Rig { issuer, _dir: dir, minter, mport, orchestrator, front_of_b, front_of_c, b_service, c_service, pki }
    }

    fn tls(&self, who: &str) -> TlsClient {
        TlsClient::new(&self.pki, Some(who)).expect("agent TLS")
    }

    /// The orchestrator opens a task for A with the case intent.
    fn open_task(&self) -> String {
        let r = self.orchestrator
            .request(self.mport, "POST", "/tasks", &[("content-type", "application/json")],
                     json!({"subjects": [A], "intents": [INTENT], "ttl_s": 600}).to_string().as_bytes())
            .expect("open task");
        assert_eq!(r.status, 201, "{}", r.text());
        body(&r)["task"].as_str().expect("task id").to_string()
    }

    fn end_task(&self, task: &str) {
        let r = self.orchestrator.request(self.mport, "POST", &format!("/tasks/{task}/end"), &[], b"").expect("end task");
        assert_eq!(r.status, 200, "{}", r.text());
    }

    /// `who` (a certificate name) asks the minter for a Txn-Token: form parameters as given.
    fn exchange(&self, who: &str, params: &[(&str, &str)]) -> HttpResponse {
        let mut all = vec![("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"), ("requested_token_type", TXN_TOKEN)];
        all.extend_from_slice(params);
        self.tls(who)
            .request(self.mport, "POST", "/token", &[("content-type", "application/x-www-form-urlencoded")], form(&all).as_bytes())
            .expect("minter /token")
    }

    /// A's root Txn-Token for `task`, naming `delegate` as the one who may act next.
    fn root(&self, task: &str, delegate: &str, tctx: &Value) -> String {
        let a = svid(&self.issuer, A);
        let tctx = tctx.to_string();
        let r = self.exchange("a", &[("subject_token", &a), ("subject_token_type", JWT), ("task", task), ("intent", INTENT),
                                      ("scope", SCOPE), ("delegate", delegate), ("tctx", &tctx)]);
        assert_eq!(r.status, 200, "root Txn-Token: {}", r.text());
        assert_eq!(body(&r)["issued_token_type"], TXN_TOKEN);
        body(&r)["access_token"].as_str().expect("txn token").to_string()
    }

    /// `actor` (certificate name, SPIFFE ID) exchanges `token` for a replacement naming it.
    fn hop(&self, token: &str, actor: (&str, &str), extra: &[(&str, &str)]) -> HttpResponse {
        let actor_svid = svid(&self.issuer, actor.1);
        let mut params = vec![("subject_token", token), ("subject_token_type", TXN_TOKEN), ("actor_token", actor_svid.as_str()),
                              ("actor_token_type", JWT)];
        params.extend_from_slice(extra);
        self.exchange(actor.0, &params)
    }

    fn hop_ok(&self, token: &str, actor: (&str, &str), extra: &[(&str, &str)]) -> String {
        let r = self.hop(token, actor, extra);
        assert_eq!(r.status, 200, "hop to {}: {}", actor.1, r.text());
        body(&r)["access_token"].as_str().expect("txn token").to_string()
    }

    /// `who` calls `path` through Envoy 2 (in front of C) with its SVID and `txn`.
    fn call_c(&self, who: &str, txn: &str, method: &str, path: &str, intent: &str, task: &str) -> HttpResponse {
        let bearer = format!("Bearer {}", svid(&self.issuer, who));
        mandate_e2e::http(method, &self.front_of_c.url(path),
                          &[("authorization", &bearer), ("txn-token", txn), ("x-agent-intent", intent), ("x-agent-task", task)], b"{}")
            .expect("request through Envoy 2")
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

fn refused(r: &HttpResponse, status: u16, why: &str) {
    assert_eq!((r.status, reason(r).as_str()), (status, why), "{}", r.text());
    assert!(r.header("x-mandate-decision-id").is_some(), "no decision id: {:?}", r.headers);
}

fn minter_refused(r: &HttpResponse, why: &str) {
    assert!(r.status == 400 || r.status == 403, "{} {}", r.status, r.text());
    assert_eq!(body(r)["mandate_reason"].as_str(), Some(why), "{}", r.text());
    assert!(body(r).get("access_token").is_none());
}

#[test]
fn a_hands_b_part_of_the_task_and_b_cannot_escape_it() {
    if !prerequisites("a_hands_b_part_of_the_task_and_b_cannot_escape_it") {
        return;
    }
    let rig = Rig::start(2);
    let task = rig.open_task();
    let tctx = json!({"resources": ["billing-agent", "payments", "ledger"]});
    let root = rig.root(&task, B, &tctx);

    // ---- A calls B through Envoy 1: B receives the root token, never A's SVID.
    let a_bearer = format!("Bearer {}", svid(&rig.issuer, A));
    let handoff = mandate_e2e::http("POST", &rig.front_of_b.url("/delegate/refund"),
        &[("authorization", &a_bearer), ("txn-token", &root), ("x-agent-intent", INTENT), ("x-agent-task", &task)], b"{}")
        .expect("A → B");
    assert_eq!(handoff.status, 200, "{}", handoff.text());
    let seen = rig.b_service.requests().pop().expect("B was called");
    assert_eq!(seen.header("txn-token").as_deref(), Some(root.as_str()), "the root token is forwarded to B (resource says forward)");
    let b_cred = seen.header("authorization").expect("B's credential");
    let b_cred = jwt_claims(b_cred.trim_start_matches("Bearer "));
    assert_eq!((b_cred["iss"].as_str(), b_cred["sub"].as_str(), b_cred["aud"].as_str()), (Some(MINTER_ISSUER), Some(A), Some(BILLING_AUD)),
               "B gets a minted credential, never A's SVID: {b_cred}");
    assert!(b_cred.get("act").is_none(), "A calls B itself: no actor yet");

    // ---- B exchanges it for a token naming B, then calls C: allowed, one hop.
    let b_token = rig.hop_ok(&root, ("b", B), &[]);
    let b_claims = jwt_claims(&b_token);
    assert_eq!((b_claims["sub"].as_str(), b_claims["act"]["sub"].as_str()), (Some(A), Some(B)), "{b_claims}");
    assert_eq!(b_claims["txn"], jwt_claims(&root)["txn"], "the transaction id never changes");
    let ok = rig.call_c(B, &b_token, "POST", "/payments/refund", INTENT, &task);
    assert_eq!(ok.status, 200, "{}", ok.text());
    let at_c = rig.c_service.requests().pop().expect("C was called");
    assert!(at_c.header("txn-token").is_none(), "the Txn-Token is stripped before C (resource says strip)");
    assert_eq!(at_c.header("x-verified-sub").as_deref(), Some(A), "jwt_authn verified the minted credential: sub = A");
    assert_eq!(at_c.header("x-verified-txn"), b_claims["txn"].as_str().map(String::from));
    let minted = jwt_claims(at_c.header("authorization").expect("credential").trim_start_matches("Bearer "));
    assert_eq!((minted["sub"].as_str(), minted["act"]["sub"].as_str(), minted["aud"].as_str()), (Some(A), Some(B), Some(PAYMENTS_AUD)), "{minted}");
    let record = rig.front_of_c.wait_access_log(1, Duration::from_secs(5)).expect("access log").pop().expect("a line");
    let decision: Value = serde_json::from_str(record["mandate_decision"].as_str().unwrap_or("{}")).unwrap_or(Value::Null);
    let chain: Vec<&str> = decision["delegation"]["chain"].as_array().map(|c| c.iter().filter_map(|h| h["principal"].as_str()).collect()).unwrap_or_default();
    assert_eq!(chain, [A, B], "the record replays the chain: {decision}");

    let c_before = rig.c_service.request_count();
    // ---- B replays A's root token as its own: the current actor is A, not B.
    refused(&rig.call_c(B, &root, "POST", "/payments/refund", INTENT, &task), 403, "delegation_actor_mismatch");
    // ---- Another workload lifts B's token: useless without being B.
    refused(&rig.call_c(D, &b_token, "POST", "/payments/refund", INTENT, &task), 403, "delegation_actor_mismatch");
    // ---- B uses its token for another intent, or a resource outside the token's context.
    refused(&rig.call_c(B, &b_token, "POST", "/payments/refund", "case.close", &task), 403, "delegation_scope_exceeded");
    refused(&rig.call_c(B, &b_token, "POST", "/refunds/all", INTENT, &task), 403, "delegation_scope_exceeded");
    // ---- The intersection: A may read the ledger, B may not; the chain gets only what both may.
    refused(&rig.call_c(B, &b_token, "GET", "/ledger/2026", INTENT, &task), 403, "delegation_not_allowed");
    // ---- A forged token: same claims, another key.
    let forged = testkit::TestKey::es256("minter-k1").sign(&b_claims);
    refused(&rig.call_c(B, &forged, "POST", "/payments/refund", INTENT, &task), 401, "delegation_token_invalid");
    assert_eq!(rig.c_service.request_count(), c_before, "a refused request reached C");

    // ---- Widening at the minter: scope, context, lifetime.
    minter_refused(&rig.hop(&root, ("b", B), &[("scope", "payments:write ledger:admin")]), "delegation_scope_exceeded");
    minter_refused(&rig.hop(&root, ("b", B), &[("tctx", &json!({"resources": ["billing-agent", "payments", "ledger", "refunds"]}).to_string())]),
                   "delegation_scope_exceeded");
    minter_refused(&rig.hop(&root, ("b", B), &[("requested_ttl", "86400")]), "delegation_scope_exceeded");
    // Someone the root token does not name cannot take it over.
    minter_refused(&rig.hop(&root, ("d", D), &[]), "delegation_actor_mismatch");

    // ---- A loop: B tries to hand the task back to A (already in the chain).
    minter_refused(&rig.hop(&root, ("b", B), &[("delegate", A)]), "delegation_loop");

    // ---- A hop that policy does not allow: A → the scraper (class `tool`).
    let to_x = rig.root(&task, X, &tctx);
    let x_token = rig.hop_ok(&to_x, ("x", X), &[]);
    refused(&rig.call_c(X, &x_token, "POST", "/payments/refund", INTENT, &task), 403, "delegation_not_allowed");

    // ---- Two hops are fine (A → B → D); a third is one too deep for the minter.
    let b_to_d = rig.hop_ok(&root, ("b", B), &[("delegate", D)]);
    let d_token = rig.hop_ok(&b_to_d, ("d", D), &[("delegate", E)]);
    assert_eq!(rig.call_c(D, &d_token, "POST", "/payments/refund", INTENT, &task).status, 200);
    minter_refused(&rig.hop(&d_token, ("e", E), &[]), "delegation_chain_too_deep");
    assert_eq!(rig.c_service.request_count(), c_before + 1);

    // ---- The task ends mid-chain: B's next call and any further exchange are refused.
    rig.end_task(&task);
    let (gone, took) = wait_until(Duration::from_secs(5), || {
        let r = rig.call_c(B, &b_token, "POST", "/payments/refund", INTENT, &task);
        (r.status != 200).then_some(r)
    });
    let gone = gone.expect("B was still served 5 s after the task ended");
    eprintln!("ended task refused mid-chain after {took:?}");
    refused(&gone, 403, "task_revoked");
    minter_refused(&rig.hop(&root, ("b", B), &[]), "task_ended");
    drop(rig.minter);
}

#[test]
fn a_proxy_caps_the_chain_below_the_minter() {
    if !prerequisites("a_proxy_caps_the_chain_below_the_minter") {
        return;
    }
    // The payments proxy allows one delegation; the minter allows two.
    let rig = Rig::start(1);
    let task = rig.open_task();
    let root = rig.root(&task, B, &json!({}));
    let b_token = rig.hop_ok(&root, ("b", B), &[("delegate", D)]);
    assert_eq!(rig.call_c(B, &b_token, "POST", "/payments/refund", INTENT, &task).status, 200);
    let d_token = rig.hop_ok(&b_token, ("d", D), &[]);
    let c_before = rig.c_service.request_count();
    refused(&rig.call_c(D, &d_token, "POST", "/payments/refund", INTENT, &task), 403, "delegation_chain_too_deep");
    assert_eq!(rig.c_service.request_count(), c_before);
    // Subject revocation of the middle principal refuses the whole chain.
    let r = rig.orchestrator
        .request(rig.mport, "POST", "/revoke", &[("content-type", "application/json")], json!({"subject": B}).to_string().as_bytes())
        .expect("revoke B");
    assert_eq!(r.status, 200, "{}", r.text());
    let (gone, _) = wait_until(Duration::from_secs(5), || {
        let r = rig.call_c(B, &b_token, "POST", "/payments/refund", INTENT, &task);
        (r.status != 200).then_some(r)
    });
    refused(&gone.expect("B still served after its revocation"), 403, "subject_revoked");
}
