//! Issue 11, minter side: adversarial tests for the trust gaps. Each test is
//! named after the attack it models and would pass the attack on the code
//! before the fix.
//!
//! - gap 1: clients are named and have roles; configurations that open the minter are refused.
//! - gap 2: tasks have a lifecycle the agent cannot forge; ad-hoc revocations are per subject.
//! - gap 3: the revocation feed (epoch, reset, live entries only, byte-bounded pages).
//! - gap 9: one validation for every value the minter signs or publishes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mandate_minter::config::{MinterConfig, GRANT_TOKEN_EXCHANGE, TOKEN_TYPE_JWT};
use mandate_minter::Handle;
use serde_json::{json, Value};
use std::collections::HashMap;

mod common;
use common::{claims_of, https, now, pki, request, start, Body, ClientCert, Env, Pki, SUB};

const BOB: &str = "spiffe://example.org/agent/bob";

impl Env {
    /// Named shared-secret clients (secret = client id + "-secret") with the roles given.
    fn with_clients(&self, clients: &[(&str, &[&str])]) -> Value {
        let mut c = self.base();
        let list: Vec<Value> = clients
            .iter()
            .map(|(id, roles)| json!({"client_id": id, "secret_sha256": mandate_minter::auth::hash_secret(&format!("{id}-secret")), "roles": roles}))
            .collect();
        c["client_auth"] = json!({"mode": "shared_secret", "clients": list});
        c
    }
}

/// `Authorization: Basic` for the shared-secret client `id` (see [`Env::with_clients`]).
fn basic(id: &str) -> String {
    common::basic(id, &format!("{id}-secret"))
}

/// One request as the shared-secret client named, if any. Returns status, JSON body, raw text.
fn call(h: &Handle, method: &str, path: &str, body: Body<'_>, client: Option<&str>) -> (u16, Value, String) {
    let a = request(h, method, path, body, client.map(basic).as_deref());
    (a.status, a.body, a.raw)
}

fn exchange_with(h: &Handle, client: Option<&str>, token: &str, aud: &str, task: Option<&str>, intent: Option<&str>, extra: &[(&str, &str)]) -> (u16, Value) {
    let mut pairs = vec![("grant_type", GRANT_TOKEN_EXCHANGE), ("subject_token", token), ("subject_token_type", TOKEN_TYPE_JWT), ("audience", aud)];
    if let Some(t) = task {
        pairs.push(("task", t));
    }
    if let Some(i) = intent {
        pairs.push(("intent", i));
    }
    pairs.extend_from_slice(extra);
    let (s, v, _) = call(h, "POST", "/token", Body::Form(&pairs), client);
    (s, v)
}

fn exchange(h: &Handle, token: &str, aud: &str, task: Option<&str>, intent: Option<&str>) -> (u16, Value) {
    exchange_with(h, None, token, aud, task, intent, &[])
}

fn create_task(h: &Handle, client: Option<&str>, body: Value) -> String {
    let (s, v, _) = call(h, "POST", "/tasks", Body::Json(body), client);
    assert_eq!(s, 201, "{v}");
    v["task"].as_str().unwrap().to_string()
}

fn refusal(v: &Value) -> (&str, &str) {
    (v["error"].as_str().unwrap_or(""), v["mandate_reason"].as_str().unwrap_or(""))
}

// ---------------------------------------------------------------- gap 1

fn config_error(cfg: Value) -> String {
    format!("{:#}", MinterConfig::from_json(cfg).unwrap_err())
}

#[test]
fn configurations_that_open_the_minter_to_any_caller_are_refused() {
    let env = Env::new();
    // No client auth named at all: none_loopback is the default and needs dev.
    let e = config_error(env.base());
    assert!(e.contains("client_auth.mode"), "{e}");
    let mut c = env.base();
    c["client_auth"] = json!({"mode": "none_loopback"});
    assert!(config_error(c).contains("client_auth.mode"));
    assert!(MinterConfig::from_json(env.dev()).is_ok());
    // mtls with no clients: any certificate from the CA would do.
    let mut c = env.base();
    c["tls"] = json!({"cert": "s.pem", "key": "s.key", "client_ca": "ca.pem"});
    c["client_auth"] = json!({"mode": "mtls"});
    assert!(config_error(c.clone()).contains("client_auth.clients"));
    c["client_auth"] = json!({"mode": "mtls", "clients": []});
    assert!(config_error(c.clone()).contains("client_auth.clients"));
    // A client without roles.
    c["client_auth"] = json!({"mode": "mtls", "clients": [{"client_id": "spiffe://example.org/proxy/p"}]});
    assert!(config_error(c.clone()).contains("roles"));
    c["client_auth"] = json!({"mode": "mtls", "clients": [{"client_id": "spiffe://example.org/proxy/p", "roles": []}]});
    assert!(config_error(c.clone()).contains("roles"));
    c["client_auth"] = json!({"mode": "mtls", "clients": [{"client_id": "spiffe://example.org/proxy/p", "roles": ["mint", "admin"]}]});
    assert!(MinterConfig::from_json(c.clone()).is_err());
    c["client_auth"] = json!({"mode": "mtls", "clients": [{"client_id": "spiffe://example.org/proxy/p", "roles": ["mint", "feed"]}]});
    assert!(MinterConfig::from_json(c).is_ok());
    // shared_secret sends secrets: TLS off loopback.
    let mut c = env.with_clients(&[("proxy", &["mint"])]);
    assert!(MinterConfig::from_json(c.clone()).is_ok());
    c["listen"] = json!("0.0.0.0:0");
    assert!(config_error(c.clone()).contains("tls"));
    c["tls"] = json!({"cert": "s.pem", "key": "s.key"});
    assert!(MinterConfig::from_json(c).is_ok());
    // Dev mode stays loopback-only.
    let mut c = env.dev();
    c["listen"] = json!("0.0.0.0:0");
    assert!(config_error(c).contains("loopback"));
    // `*` is the explicit any-scope opt-in, alone.
    let mut c = env.dev();
    c["scopes"] = json!({"crm": ["*", "x"]});
    assert!(config_error(c).contains("scopes.crm"));
    // Configured audiences are validated like requested ones.
    let mut c = env.dev();
    c["audiences"] = json!({"example.org": ["pay ments"]});
    assert!(MinterConfig::from_json(c).is_err());
}

#[test]
fn listen_override_cannot_move_shared_secrets_or_dev_mode_off_loopback() {
    let env = Env::new();
    let any: std::net::SocketAddr = "0.0.0.0:0".parse().unwrap();
    let cfg = MinterConfig::from_json(env.with_clients(&[("proxy", &["mint"])])).unwrap();
    let e = mandate_minter::server::prepare_on(cfg, Some(any)).err().map(|e| format!("{e:#}")).unwrap_or_default();
    assert!(e.contains("tls"), "{e}");
    let cfg = MinterConfig::from_json(env.dev()).unwrap();
    assert!(mandate_minter::server::prepare_on(cfg, Some(any)).is_err());
    let cfg = MinterConfig::from_json(env.dev()).unwrap();
    assert!(mandate_minter::server::prepare_on(cfg, Some("127.0.0.1:0".parse().unwrap())).is_ok());
}

/// One HTTPS request presenting `cert`; returns status and JSON body.
fn https_as(h: &Handle, pki: &Pki, cert: &ClientCert, method: &str, path: &str, ctype: &str, body: String) -> (u16, Value) {
    https(h, pki, Some(cert), method, path, ctype, body).unwrap()
}

#[test]
fn agent_with_a_ca_issued_certificate_calling_the_minter_directly_is_refused() {
    let env = Env::new();
    let pki = pki();
    let proxy = pki.client("spiffe://example.org/proxy/envoy-1");
    let agent = pki.client(SUB);
    let mut cfg = env.base();
    cfg["tls"] = env.tls(&pki);
    cfg["client_auth"] = json!({"mode": "mtls", "clients": [{"client_id": "spiffe://example.org/proxy/envoy-1", "roles": ["mint", "feed"]}]});
    cfg["legacy"] = json!({"audiences": ["legacy-crm"], "secrets_file": env.file("secrets.json", &json!({"legacy-crm": {"secret": "sk_live_123", "header": "x-api-key"}}).to_string())});
    let h = start(cfg);
    let tok = env.svid(SUB, 600);
    let form = |aud: &str| {
        serde_urlencoded::to_string([
            ("grant_type", GRANT_TOKEN_EXCHANGE),
            ("subject_token", tok.as_str()),
            ("subject_token_type", TOKEN_TYPE_JWT),
            ("audience", aud),
            ("scope", "payments:read"),
        ])
        .unwrap()
    };
    const FORM: &str = "application/x-www-form-urlencoded";
    // The agent presents its own X.509-SVID (same CA) and its own JWT-SVID: refused everywhere.
    for aud in ["payments-api", "legacy-crm"] {
        let (s, v) = https_as(&h, &pki, &agent, "POST", "/token", FORM, form(aud));
        assert_eq!((s, v["error"].as_str()), (401, Some("invalid_client")), "{v}");
        assert!(!v.to_string().contains("sk_live"));
    }
    assert_eq!(https_as(&h, &pki, &agent, "GET", "/revocations", FORM, String::new()).0, 401);
    assert_eq!(https_as(&h, &pki, &agent, "POST", "/tasks", "application/json", json!({"subjects": [SUB]}).to_string()).0, 401);
    assert_eq!(https_as(&h, &pki, &agent, "POST", "/revoke", "application/json", json!({"subject": BOB}).to_string()).0, 401);
    // The named proxy mints (task-less: this deployment does not require tasks) and reads the feed…
    let (s, v) = https_as(&h, &pki, &proxy, "POST", "/token", FORM, form("payments-api"));
    assert_eq!(s, 200, "{v}");
    assert_eq!(https_as(&h, &pki, &proxy, "GET", "/revocations", FORM, String::new()).0, 200);
    // …but has no `mint_legacy`, `revoke` or `tasks` role.
    let (s, v) = https_as(&h, &pki, &proxy, "POST", "/token", FORM, form("legacy-crm"));
    assert_eq!((s, v["error"].as_str()), (400, Some("unauthorized_client")), "{v}");
    assert!(!v.to_string().contains("sk_live"));
    let (s, v) = https_as(&h, &pki, &proxy, "POST", "/revoke", "application/json", json!({"subject": BOB}).to_string());
    assert_eq!((s, v["error"].as_str()), (403, Some("access_denied")), "{v}");
    let (s, _) = https_as(&h, &pki, &proxy, "POST", "/tasks", "application/json", json!({"subjects": [SUB]}).to_string());
    assert_eq!(s, 403);
}

#[test]
fn proxy_without_revoke_role_cannot_end_tasks_or_revoke() {
    let env = Env::new();
    let h = start(env.with_clients(&[("proxy", &["mint", "feed"]), ("orchestrator", &["tasks", "revoke"])]));
    let task = create_task(&h, Some("orchestrator"), json!({"subjects": [SUB]}));
    let (s, v, text) = call(&h, "POST", &format!("/tasks/{task}/end"), Body::None, Some("proxy"));
    assert_eq!(s, 403, "{text}");
    assert_eq!(v, json!({"error": "access_denied", "error_description": "client lacks role `revoke`"}));
    for body in [json!({"task": task}), json!({"subject": SUB}), json!({"jti": "AAAA"})] {
        let (s, v, _) = call(&h, "POST", "/revoke", Body::Json(body), Some("proxy"));
        assert_eq!((s, v["error"].as_str()), (403, Some("access_denied")));
    }
    // Nothing was revoked: the task is still active, the feed is empty.
    let (s, v, _) = call(&h, "GET", &format!("/tasks/{task}"), Body::None, Some("orchestrator"));
    assert_eq!((s, v["state"].as_str()), (200, Some("active")));
    let (_, v, _) = call(&h, "GET", "/revocations", Body::None, Some("proxy"));
    assert_eq!(v["revocations"], json!([]));
    // Unauthenticated: 401 as before.
    assert_eq!(call(&h, "POST", &format!("/tasks/{task}/end"), Body::None, None).0, 401);
    // The orchestrator ends it.
    let (s, v, _) = call(&h, "POST", &format!("/tasks/{task}/end"), Body::None, Some("orchestrator"));
    assert_eq!(s, 200, "{v}");
}

#[test]
fn client_without_feed_role_cannot_read_the_revocation_feed() {
    let env = Env::new();
    let h = start(env.with_clients(&[("minting-only", &["mint"]), ("orchestrator", &["tasks", "revoke"]), ("proxy", &["mint", "feed"])]));
    for who in ["minting-only", "orchestrator"] {
        let (s, v, _) = call(&h, "GET", "/revocations?since=0", Body::None, Some(who));
        assert_eq!(s, 403);
        assert_eq!(v, json!({"error": "access_denied", "error_description": "client lacks role `feed`"}));
    }
    assert_eq!(call(&h, "GET", "/revocations?since=0", Body::None, Some("proxy")).0, 200);
}

#[test]
fn client_with_mint_but_not_mint_legacy_cannot_obtain_a_static_secret() {
    let env = Env::new();
    let secrets = env.dir.path().join("secrets.json");
    std::fs::write(&secrets, json!({"legacy-crm": {"secret": "sk_live_123", "header": "x-api-key"}}).to_string()).unwrap();
    let mut cfg = env.with_clients(&[("proxy", &["mint"]), ("legacy-proxy", &["mint_legacy"]), ("feeder", &["feed"])]);
    cfg["legacy"] = json!({"audiences": ["legacy-crm"], "secrets_file": secrets});
    cfg["tasks"] = json!({"require_registered": false});
    let h = start(cfg);
    let tok = env.svid(SUB, 600);
    let (s, v) = exchange_with(&h, Some("proxy"), &tok, "legacy-crm", None, None, &[]);
    assert_eq!((s, v["error"].as_str()), (400, Some("unauthorized_client")), "{v}");
    assert_eq!(v["error_description"], "client lacks role `mint_legacy`");
    assert!(!v.to_string().contains("sk_live"));
    // The role works the other way too: mint_legacy alone mints no JWT.
    let (s, v) = exchange_with(&h, Some("legacy-proxy"), &tok, "payments-api", None, None, &[]);
    assert_eq!((s, v["error_description"].as_str()), (400, Some("client lacks role `mint`")));
    let (s, v) = exchange_with(&h, Some("feeder"), &tok, "payments-api", None, None, &[]);
    assert_eq!((s, v["error"].as_str()), (400, Some("unauthorized_client")));
    let (s, v) = exchange_with(&h, Some("legacy-proxy"), &tok, "legacy-crm", None, None, &[]);
    assert_eq!((s, v["access_token"].as_str()), (200, Some("sk_live_123")), "{v}");
    assert_eq!(exchange_with(&h, Some("proxy"), &tok, "payments-api", None, None, &[]).0, 200);
}

#[test]
fn scope_for_an_audience_without_a_scope_list_is_refused_unless_star_is_configured() {
    let env = Env::new();
    let mut cfg = env.dev();
    cfg["tasks"] = json!({"require_registered": false});
    cfg["scopes"] = json!({"payments-api": ["payments:read"], "crm": ["*"], "legacy-crm": []});
    let h = start(cfg);
    let tok = env.svid(SUB, 600);
    let scoped = |aud: &str, scope: &str| exchange_with(&h, None, &tok, aud, None, None, &[("scope", scope)]);
    // Unlisted audience (audiences map allows it, scopes map does not name it).
    let mut cfg2 = env.dev();
    cfg2["state_dir"] = json!(env.dir.path().join("state2"));
    cfg2["scopes"] = json!({});
    let h2 = start(cfg2);
    let (s, v) = exchange_with(&h2, None, &tok, "crm", None, None, &[("scope", "contacts:admin")]);
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_scope")), "{v}");
    assert_eq!(exchange_with(&h2, None, &tok, "crm", None, None, &[]).0, 200);
    // Empty list: no scope. `*`: any. A list: those.
    assert_eq!(scoped("legacy-crm", "x").1["error"], "invalid_scope");
    let (s, v) = scoped("crm", "contacts:admin anything");
    assert_eq!(s, 200, "{v}");
    assert_eq!(scoped("payments-api", "payments:read").0, 200);
    assert_eq!(scoped("payments-api", "payments:write").1["error"], "invalid_scope");
}

// ---------------------------------------------------------------- gap 2

#[test]
fn agent_declaring_a_fresh_task_id_after_its_task_ended_is_refused() {
    let env = Env::new();
    let h = start(env.dev());
    let tok = env.svid(SUB, 600);
    let task = create_task(&h, None, json!({"subjects": [SUB], "intents": ["pay-invoice"], "label": "CASE-7"}));
    assert!(task.starts_with("tsk_") && task.len() == 26, "{task}");
    let (s, v) = exchange(&h, &tok, "payments-api", Some(&task), Some("pay-invoice"));
    assert_eq!(s, 200, "{v}");
    assert_eq!(claims_of(v["access_token"].as_str().unwrap())["task"], task.as_str());
    let (s, v, _) = call(&h, "POST", &format!("/tasks/{task}/end"), Body::None, None);
    assert_eq!(s, 200, "{v}");
    let (s, v) = exchange(&h, &tok, "payments-api", Some(&task), Some("pay-invoice"));
    assert_eq!((s, refusal(&v)), (400, ("invalid_grant", "task_ended")), "{v}");
    // The agent moves on to a task id it made up, of any shape: unknown.
    let forged_issued_shape = format!("tsk_{}", "A".repeat(22));
    for forged in ["T-8", "CASE-8", forged_issued_shape.as_str(), "tsk_x"] {
        let (s, v) = exchange(&h, &tok, "payments-api", Some(forged), Some("pay-invoice"));
        assert_eq!((s, refusal(&v)), (400, ("invalid_grant", "task_unknown")), "{forged}: {v}");
        assert_eq!(v["error_description"], "task unknown");
    }
    // Unknown ids cannot be ended or read either.
    let (s, v, text) = call(&h, "POST", "/tasks/T-8/end", Body::None, None);
    assert_eq!((s, v["error"].as_str()), (404, Some("not_found")), "{text}");
    assert_eq!(call(&h, "GET", "/tasks/T-8", Body::None, None).1["error"], "not_found");
}

#[test]
fn ad_hoc_name_shaped_like_an_issued_task_id_is_unknown_even_when_ad_hoc_tasks_are_allowed() {
    let env = Env::new();
    let mut cfg = env.dev();
    cfg["tasks"] = json!({"require_registered": false});
    let h = start(cfg);
    let tok = env.svid(SUB, 600);
    assert_eq!(exchange(&h, &tok, "payments-api", Some("CASE-7"), None).0, 200);
    let (s, v) = exchange(&h, &tok, "payments-api", Some(&format!("tsk_{}", "B".repeat(22))), None);
    assert_eq!((s, refusal(&v)), (400, ("invalid_grant", "task_unknown")));
}

#[test]
fn task_bound_to_agent_x_refuses_agent_y() {
    let env = Env::new();
    let h = start(env.dev());
    let task = create_task(&h, None, json!({"subjects": [SUB]}));
    let (s, v) = exchange(&h, &env.svid(BOB, 600), "payments-api", Some(&task), None);
    assert_eq!((s, refusal(&v)), (400, ("invalid_grant", "task_not_bound")), "{v}");
    assert_eq!(exchange(&h, &env.svid(SUB, 600), "payments-api", Some(&task), None).0, 200);
}

#[test]
fn intent_outside_the_registered_task_is_refused() {
    let env = Env::new();
    let h = start(env.dev());
    let tok = env.svid(SUB, 600);
    let task = create_task(&h, None, json!({"subjects": [SUB], "intents": ["ticket.read"]}));
    let (s, v) = exchange(&h, &tok, "payments-api", Some(&task), Some("ticket.delete"));
    assert_eq!((s, refusal(&v)), (400, ("invalid_grant", "intent_not_in_task")));
    let (s, v) = exchange(&h, &tok, "payments-api", Some(&task), None);
    assert_eq!((s, refusal(&v)), (400, ("invalid_grant", "intent_not_in_task")));
    assert_eq!(exchange(&h, &tok, "payments-api", Some(&task), Some("ticket.read")).0, 200);
    // A task with no intents allows any.
    let any = create_task(&h, None, json!({"subjects": [SUB]}));
    assert_eq!(exchange(&h, &tok, "payments-api", Some(&any), Some("whatever")).0, 200);
}

#[test]
fn expired_task_is_refused_and_no_token_outlives_its_task() {
    let env = Env::new();
    let h = start(env.dev());
    let tok = env.svid(SUB, 600);
    let short = create_task(&h, None, json!({"subjects": [SUB], "ttl_s": 2}));
    let long = create_task(&h, None, json!({"subjects": [SUB], "ttl_s": 60}));
    let (s, v) = exchange_with(&h, None, &tok, "payments-api", Some(&long), None, &[("requested_ttl", "300")]);
    assert_eq!(s, 200, "{v}");
    let (_, t, _) = call(&h, "GET", &format!("/tasks/{long}"), Body::None, None);
    let c = claims_of(v["access_token"].as_str().unwrap());
    assert!(c["exp"].as_u64().unwrap() <= t["expires_at"].as_u64().unwrap(), "{c} {t}");
    assert!(v["expires_in"].as_u64().unwrap() <= 60);
    std::thread::sleep(std::time::Duration::from_millis(2200));
    let (s, v) = exchange(&h, &tok, "payments-api", Some(&short), None);
    assert_eq!((s, refusal(&v)), (400, ("invalid_grant", "task_expired")), "{v}");
    let (_, t, _) = call(&h, "GET", &format!("/tasks/{short}"), Body::None, None);
    assert_eq!(t["state"], "expired");
}

#[test]
fn ending_agent_x_ad_hoc_task_does_not_block_agent_y_task_of_the_same_name() {
    let env = Env::new();
    let mut cfg = env.dev();
    cfg["tasks"] = json!({"require_registered": false});
    let h = start(cfg);
    let (x, y) = (env.svid(SUB, 600), env.svid(BOB, 600));
    assert_eq!(exchange(&h, &x, "payments-api", Some("T-1"), None).0, 200);
    assert_eq!(exchange(&h, &y, "payments-api", Some("T-1"), None).0, 200);
    // Without a subject, an ad-hoc name is refused: it is not globally unique.
    let (s, v, _) = call(&h, "POST", "/revoke", Body::Json(json!({"task": "T-1"})), None);
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_request")), "{v}");
    let (s, v, _) = call(&h, "POST", "/revoke", Body::Form(&[("task", "T-1"), ("subject", SUB)]), None);
    assert_eq!(s, 200, "{v}");
    assert_eq!((v["kind"].as_str(), v["value"].as_str(), v["subject"].as_str()), (Some("task"), Some("T-1"), Some(SUB)));
    assert_eq!(v["jtis"].as_array().unwrap().len(), 1, "only X's credential is covered: {v}");
    let (s, v) = exchange(&h, &x, "payments-api", Some("T-1"), None);
    assert_eq!((s, refusal(&v)), (400, ("invalid_grant", "task_ended")));
    assert_eq!(exchange(&h, &y, "payments-api", Some("T-1"), None).0, 200);
    // The feed entry carries the subject, and it survives a restart.
    let (_, feed, _) = call(&h, "GET", "/revocations", Body::None, None);
    assert_eq!(feed["revocations"][0]["subject"], SUB);
    assert!(feed["revocations"][0].get("until").is_none());
    h.shutdown().unwrap();
    let mut cfg = env.dev();
    cfg["tasks"] = json!({"require_registered": false});
    let h = start(cfg);
    assert_eq!(exchange(&h, &x, "payments-api", Some("T-1"), None).1["mandate_reason"], "task_ended");
    assert_eq!(exchange(&h, &y, "payments-api", Some("T-1"), None).0, 200);
}

#[test]
fn registered_task_revoked_for_one_subject_stays_active_for_the_others() {
    let env = Env::new();
    let h = start(env.dev());
    let task = create_task(&h, None, json!({"subjects": [SUB, BOB]}));
    let (s, v, _) = call(&h, "POST", "/revoke", Body::Json(json!({"task": task, "subject": BOB})), None);
    assert_eq!(s, 200, "{v}");
    assert!(v["until"].as_u64().is_some());
    assert_eq!(exchange(&h, &env.svid(BOB, 600), "payments-api", Some(&task), None).1["mandate_reason"], "task_ended");
    assert_eq!(exchange(&h, &env.svid(SUB, 600), "payments-api", Some(&task), None).0, 200);
    assert_eq!(call(&h, "GET", &format!("/tasks/{task}"), Body::None, None).1["state"], "active");
    // Without a subject, `/revoke` ends a registered task like `/tasks/{id}/end`.
    let (s, _, _) = call(&h, "POST", "/revoke", Body::Json(json!({"task": task})), None);
    assert_eq!(s, 200);
    assert_eq!(call(&h, "GET", &format!("/tasks/{task}"), Body::None, None).1["state"], "ended");
}

#[test]
fn registered_tasks_survive_a_restart_and_need_the_tasks_role() {
    let env = Env::new();
    let cfg = env.with_clients(&[("orchestrator", &["tasks"]), ("proxy", &["mint"]), ("revoker", &["revoke"])]);
    let h = start(cfg.clone());
    let tok = env.svid(SUB, 600);
    let (s, v, _) = call(&h, "POST", "/tasks", Body::Json(json!({"subjects": [SUB]})), Some("proxy"));
    assert_eq!((s, v["error"].as_str()), (403, Some("access_denied")));
    assert_eq!(v["error_description"], "client lacks role `tasks`");
    let (s, v, _) = call(&h, "POST", "/tasks", Body::Json(json!({"subjects": [SUB], "intents": ["a", "b"], "ttl_s": 600, "label": "CASE-7"})), Some("orchestrator"));
    assert_eq!(s, 201, "{v}");
    let task = v["task"].as_str().unwrap().to_string();
    assert_eq!(v["subjects"], json!([SUB]));
    assert_eq!(v["intents"], json!(["a", "b"]));
    assert_eq!(v["label"], "CASE-7");
    assert_eq!(v["state"], "active");
    assert_eq!(v["expires_at"].as_u64().unwrap(), v["created_at"].as_u64().unwrap() + 600);
    // The orchestrator ends no tasks without `revoke`; the proxy reads none.
    assert_eq!(call(&h, "POST", &format!("/tasks/{task}/end"), Body::None, Some("orchestrator")).0, 403);
    assert_eq!(call(&h, "GET", &format!("/tasks/{task}"), Body::None, Some("proxy")).0, 403);
    assert_eq!(call(&h, "GET", &format!("/tasks/{task}"), Body::None, Some("revoker")).0, 200);
    h.shutdown().unwrap();
    let h = start(cfg);
    let (s, got, _) = call(&h, "GET", &format!("/tasks/{task}"), Body::None, Some("orchestrator"));
    assert_eq!(s, 200);
    assert_eq!(got, v);
    assert_eq!(exchange_with(&h, Some("proxy"), &tok, "payments-api", Some(&task), Some("a"), &[]).0, 200);
}

// ---------------------------------------------------------------- gap 3

#[test]
fn thousand_ended_tasks_with_long_ids_page_within_the_byte_budget_and_each_entry_is_seen_once() {
    let env = Env::new();
    let mut cfg = env.dev();
    cfg["tasks"] = json!({"require_registered": false});
    cfg["workers"] = json!(2);
    let h = start(cfg);
    // ~128-byte ad-hoc names, ended per subject; concurrent so the writer batches commits.
    let names: Vec<String> = (0..1000).map(|i| format!("{i:04}-{}", "x".repeat(123))).collect();
    assert!(names.iter().all(|n| n.len() == 128));
    std::thread::scope(|s| {
        for chunk in names.chunks(250) {
            let h = &h;
            s.spawn(move || {
                for n in chunk {
                    let (st, v, _) = call(h, "POST", "/revoke", Body::Form(&[("task", n), ("subject", SUB)]), None);
                    assert_eq!(st, 200, "{v}");
                }
            });
        }
    });
    for max_bytes in [4096usize, 16384, 1_000_000] {
        let budget = max_bytes.min(196_608);
        let mut seen: HashMap<String, usize> = HashMap::new();
        let (mut cursor, mut epoch, mut pages) = (0i64, String::new(), 0);
        loop {
            let (s, v, text) = call(&h, "GET", &format!("/revocations?since={cursor}&epoch={epoch}&max_bytes={max_bytes}"), Body::None, None);
            assert_eq!(s, 200);
            assert!(text.len() <= budget, "page of {} bytes over {budget}", text.len());
            assert_eq!(v["reset"], pages == 0, "{}", v["reset"]);
            epoch = v["epoch"].as_str().unwrap().to_string();
            for r in v["revocations"].as_array().unwrap() {
                *seen.entry(r["value"].as_str().unwrap().to_string()).or_default() += 1;
            }
            let next = v["cursor"].as_i64().unwrap();
            pages += 1;
            if v["more"] == false {
                break;
            }
            assert!(next > cursor, "cursor stuck at {cursor}");
            cursor = next;
            assert!(pages < 2000);
        }
        assert_eq!(seen.len(), 1000, "max_bytes {max_bytes}");
        assert!(seen.values().all(|n| *n == 1));
        if max_bytes == 4096 {
            assert!(pages >= 50, "{pages} pages");
        }
    }
    // Count bound too.
    let (_, v, _) = call(&h, "GET", "/revocations?limit=10", Body::None, None);
    assert_eq!((v["revocations"].as_array().unwrap().len(), v["more"].as_bool()), (10, Some(true)));
}

#[test]
fn restored_or_restarted_minter_changes_epoch_and_stale_cursor_is_reset() {
    let env = Env::new();
    let h = start(env.dev());
    call(&h, "POST", "/revoke", Body::Json(json!({"subject": BOB})), None);
    let (_, v, _) = call(&h, "GET", "/revocations", Body::None, None);
    let (epoch, cursor) = (v["epoch"].as_str().unwrap().to_string(), v["cursor"].as_i64().unwrap());
    assert_eq!(v["reset"], true);
    let (_, v, _) = call(&h, "GET", &format!("/revocations?since={cursor}&epoch={epoch}"), Body::None, None);
    assert_eq!((v["reset"].as_bool(), v["revocations"].as_array().unwrap().len(), v["cursor"].as_i64()), (Some(false), 0, Some(cursor)));
    h.shutdown().unwrap();
    let h = start(env.dev());
    let (_, v, _) = call(&h, "GET", &format!("/revocations?since={cursor}&epoch={epoch}"), Body::None, None);
    assert_ne!(v["epoch"].as_str().unwrap(), epoch);
    // The old cursor is ignored: the snapshot from the beginning.
    assert_eq!(v["reset"], true);
    assert_eq!(v["revocations"][0]["value"], BOB);
    // A made-up epoch is treated the same.
    let (_, v, _) = call(&h, "GET", "/revocations?since=999&epoch=forged", Body::None, None);
    assert_eq!((v["reset"].as_bool(), v["revocations"].as_array().unwrap().len()), (Some(true), 1));
}

#[test]
fn entry_past_its_until_is_not_listed_but_the_cursor_moves_past_it() {
    let env = Env::new();
    let mut cfg = env.dev();
    cfg["tasks"] = json!({"require_registered": false});
    let h = start(cfg);
    let tok = env.svid(SUB, 600);
    // The entry lives until the end of the next second: start at the beginning of a second,
    // so that the exchange, the revocation (an fsync) and the first read fit before it.
    let t = now();
    while now() == t {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let (s, v) = exchange_with(&h, None, &tok, "payments-api", None, None, &[("requested_ttl", "1")]);
    assert_eq!(s, 200);
    let jti = claims_of(v["access_token"].as_str().unwrap())["jti"].as_str().unwrap().to_string();
    let (s, r, _) = call(&h, "POST", "/revoke", Body::Json(json!({"jti": jti})), None);
    assert_eq!(s, 200, "{r}");
    let until = r["until"].as_u64().unwrap();
    let (_, v, _) = call(&h, "GET", "/revocations", Body::None, None);
    let epoch = v["epoch"].as_str().unwrap().to_string();
    assert_eq!(v["revocations"][0]["until"], until);
    while now() < until + 1 {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // Only the dead entry: an empty page whose cursor is past it.
    let (_, v, _) = call(&h, "GET", &format!("/revocations?since=0&epoch={epoch}"), Body::None, None);
    assert_eq!(v["revocations"], json!([]));
    assert_eq!(v["cursor"].as_i64(), r["seq"].as_i64());
    // A live entry after it is listed alone.
    let (_, s2, _) = call(&h, "POST", "/revoke", Body::Json(json!({"subject": BOB})), None);
    let (_, v, _) = call(&h, "GET", "/revocations", Body::None, None);
    assert_eq!(v["revocations"].as_array().unwrap().len(), 1);
    assert_eq!(v["revocations"][0]["value"], BOB);
    assert_eq!(v["cursor"], s2["seq"]);
}

#[test]
fn database_from_before_subject_scoped_revocations_is_migrated_without_losing_entries() {
    let env = Env::new();
    let state = env.dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    {
        let conn = rusqlite::Connection::open(state.join("minter.sqlite3")).unwrap();
        conn.execute_batch(
            "CREATE TABLE revocations (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, value TEXT NOT NULL,
                 at INTEGER NOT NULL, client_id TEXT NOT NULL, UNIQUE(kind, value));
             INSERT INTO revocations (kind, value, at, client_id) VALUES ('task', 'T-1', 1, 'loopback');
             INSERT INTO revocations (kind, value, at, client_id) VALUES ('subject', 'spiffe://example.org/agent/bob', 2, 'loopback');
             INSERT INTO revocations (kind, value, at, client_id) VALUES ('task', 'has space', 3, 'loopback');",
        )
        .unwrap();
    }
    let mut cfg = env.dev();
    cfg["tasks"] = json!({"require_registered": false});
    let h = start(cfg);
    // Old entries still block.
    assert_eq!(exchange(&h, &env.svid(SUB, 600), "payments-api", Some("T-1"), None).1["mandate_reason"], "task_ended");
    assert_eq!(exchange(&h, &env.svid(BOB, 600), "payments-api", Some("T-2"), None).1["mandate_reason"], "subject_revoked");
    // The feed lists the valid ones (not a value no endpoint accepts any more); seqs continue.
    let (_, v, _) = call(&h, "GET", "/revocations", Body::None, None);
    let values: Vec<&str> = v["revocations"].as_array().unwrap().iter().map(|r| r["value"].as_str().unwrap()).collect();
    assert_eq!(values, ["T-1", BOB]);
    let (_, r, _) = call(&h, "POST", "/revoke", Body::Json(json!({"task": "T-1", "subject": BOB})), None);
    assert_eq!((r["seq"].as_i64(), r["created"].as_bool()), (Some(4), Some(true)));
}

// ---------------------------------------------------------------- gap 9

#[test]
fn audience_with_control_chars_non_ascii_or_60kb_is_never_signed() {
    let env = Env::new();
    let mut cfg = env.dev();
    cfg["audiences"] = json!({"example.org": ["*"]});
    cfg["tasks"] = json!({"require_registered": false});
    let h = start(cfg);
    let tok = env.svid(SUB, 600);
    let huge = "a".repeat(60 * 1024);
    for aud in ["pay\nments", "pay\rments", "pay\u{0}", "pay ments", "paymënts", "\u{1b}[2J", huge.as_str()] {
        let (s, v) = exchange(&h, &tok, aud, None, None);
        assert_eq!((s, v["error"].as_str()), (400, Some("invalid_request")), "{aud:.20?}: {v}");
        assert!(v.get("access_token").is_none());
    }
    // Task and intent values are held to the same rules.
    for bad in ["T 1", "T\n1", "tâche"] {
        assert_eq!(exchange(&h, &tok, "payments-api", Some(bad), None).1["error"], "invalid_request");
        assert_eq!(exchange(&h, &tok, "payments-api", None, Some(bad)).1["error"], "invalid_request");
    }
    assert_eq!(exchange(&h, &tok, "payments-api", Some(&"t".repeat(129)), None).1["error"], "invalid_request");
    assert_eq!(exchange(&h, &tok, "payments-api", None, None).0, 200);
}

#[test]
fn revocation_values_with_newline_nul_space_non_ascii_or_2kb_are_never_published() {
    let env = Env::new();
    let mut cfg = env.dev();
    cfg["tasks"] = json!({"require_registered": false});
    cfg["max_body_bytes"] = json!(16384);
    let h = start(cfg);
    // 2048 bytes: too long for a task or a jti; subjects may have 2048, not more.
    let long = "x".repeat(2048);
    let long_subject = "x".repeat(2049);
    let bad = ["a\nb", "a\u{0}b", "a b", "tâche", long.as_str()];
    for v in bad {
        let subject_value = if v == long { long_subject.as_str() } else { v };
        for body in [
            json!({"task": v, "subject": SUB}),
            json!({"task": "T-1", "subject": subject_value}),
            json!({"jti": v}),
            json!({"subject": subject_value}),
            json!({"subject": format!("spiffe://example.org/{v}")}),
        ] {
            let (s, r, _) = call(&h, "POST", "/revoke", Body::Json(body.clone()), None);
            assert_eq!((s, r["error"].as_str()), (400, Some("invalid_request")), "{body}: {r}");
        }
        let (s, r, _) = call(&h, "POST", "/revoke", Body::Form(&[("task", v), ("subject", SUB)]), None);
        assert_eq!(s, 400, "{r}");
        // In the path: percent-encoded.
        let enc: String = v.bytes().map(|b| format!("%{b:02X}")).collect();
        let (s, r, _) = call(&h, "POST", &format!("/tasks/{enc}/end"), Body::None, None);
        assert!(s == 400 || s == 404, "{s} {r}");
        assert_eq!(r["error"].as_str().map(|e| e == "invalid_request" || e == "not_found"), Some(true), "{r}");
        let (s, _, _) = call(&h, "POST", "/tasks", Body::Json(json!({"subjects": [subject_value]})), None);
        assert_eq!(s, 400);
        let (s, _, _) = call(&h, "POST", "/tasks", Body::Json(json!({"subjects": [SUB], "intents": [v]})), None);
        assert_eq!(s, 400);
    }
    // Non-string JSON values are refused, not ignored.
    assert_eq!(call(&h, "POST", "/revoke", Body::Json(json!({"subject": 7})), None).0, 400);
    // A non-UTF-8 path is a JSON refusal too.
    let (s, r, _) = call(&h, "POST", "/tasks/%FF%FE/end", Body::None, None);
    assert_eq!((s, r["error"].as_str()), (400, Some("invalid_request")));
    let (_, feed, _) = call(&h, "GET", "/revocations", Body::None, None);
    assert_eq!(feed["revocations"], json!([]));
}
