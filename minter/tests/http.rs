//! HTTP tests against real minters on loopback (ephemeral ports, temp state dirs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jwt_simple::prelude::{ECDSAP256PublicKeyLike, ES256PublicKey, NoCustomClaims, VerificationOptions};
use mandate_minter::config::{MinterConfig, GRANT_TOKEN_EXCHANGE, TOKEN_TYPE_JWT};
use mandate_minter::Handle;
use mandate_core::testkit::{spiffe_bundle, svid_claims, TestKey};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::Path;

mod common;
use common::{agent, basic, claims_of, header_of, https, now, pki, request, start, Body, Env, Pki, ACTOR, SUB};

impl Env {
    /// Dev mode with ad-hoc task names, a 1 s reload check, and a write scope too.
    fn config(&self) -> Value {
        let mut c = self.dev();
        c["reload_check_s"] = json!(1);
        c["tasks"] = json!({"require_registered": false});
        c["scopes"] = json!({"payments-api": ["payments:read", "payments:write"]});
        c
    }
}

fn post_form(h: &Handle, path: &str, pairs: &[(&str, &str)], auth: Option<&str>) -> (u16, Value, String) {
    let a = request(h, "POST", path, Body::Form(pairs), auth);
    (a.status, a.body, a.cache)
}

fn get_json(h: &Handle, path: &str, auth: Option<&str>) -> (u16, Value) {
    let a = request(h, "GET", path, Body::None, auth);
    (a.status, a.body)
}

fn exchange_pairs<'a>(token: &'a str, aud: &'a str, scope: &'a str, task: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("grant_type", GRANT_TOKEN_EXCHANGE),
        ("subject_token", token),
        ("subject_token_type", TOKEN_TYPE_JWT),
        ("audience", aud),
        ("scope", scope),
        ("task", task),
        ("intent", "pay-invoice"),
    ]
}

fn exchange(h: &Handle, token: &str, aud: &str, scope: &str, task: &str) -> (u16, Value) {
    let (s, v, _) = post_form(h, "/token", &exchange_pairs(token, aud, scope, task), None);
    (s, v)
}

/// Verifies `jwt` with the key the minter publishes for its `kid`.
fn verify_with_jwks(h: &Handle, jwt: &str) {
    let (s, jwks) = get_json(h, "/.well-known/jwks.json", None);
    assert_eq!(s, 200);
    let kid = header_of(jwt)["kid"].as_str().unwrap().to_string();
    let jwk = jwks["keys"].as_array().unwrap().iter().find(|k| k["kid"] == kid.as_str()).expect("kid published");
    assert_eq!(jwk["alg"], "ES256");
    assert_eq!(jwk["use"], "sig");
    assert_eq!(jwk["kty"], "EC");
    let mut point = vec![4u8];
    point.extend(URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap());
    point.extend(URL_SAFE_NO_PAD.decode(jwk["y"].as_str().unwrap()).unwrap());
    let pk = ES256PublicKey::from_bytes(&point).unwrap();
    let opts = VerificationOptions {
        allowed_issuers: Some(HashSet::from(["https://minter.test".to_string()])),
        required_key_id: Some(kid),
        ..Default::default()
    };
    pk.verify_token::<NoCustomClaims>(jwt, Some(opts)).expect("issued token verifies with the published JWKS");
}

#[test]
fn happy_path_claims_and_jwks() {
    let env = Env::new();
    let h = start(env.config());
    let tok = env.svid(SUB, 600);
    let t0 = now();
    let (s, v, cache) = post_form(&h, "/token", &exchange_pairs(&tok, "payments-api", "payments:read", "task-1"), None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(cache, "no-store");
    assert_eq!(v["issued_token_type"], "urn:ietf:params:oauth:token-type:jwt");
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["expires_in"], 120);
    assert_eq!(v["scope"], "payments:read");
    let jwt = v["access_token"].as_str().unwrap();
    let hdr = header_of(jwt);
    assert_eq!(hdr["alg"], "ES256");
    assert_eq!(hdr["kid"], h.state.current_keys().current_kid.as_str());
    let c = claims_of(jwt);
    assert_eq!(c["iss"], "https://minter.test");
    assert_eq!(c["sub"], SUB);
    assert_eq!(c["aud"], "payments-api");
    assert_eq!(c["scope"], "payments:read");
    assert_eq!(c["intent"], "pay-invoice");
    assert_eq!(c["task"], "task-1");
    assert_eq!(c["client_id"], "loopback");
    assert!(c.get("act").is_none());
    let iat = c["iat"].as_u64().unwrap();
    assert!(iat >= t0 && iat <= now());
    assert_eq!(c["exp"].as_u64().unwrap(), iat + 120);
    let jti = c["jti"].as_str().unwrap();
    assert!(jti.len() >= 16);
    verify_with_jwks(&h, jwt);

    // A second exchange gets a distinct jti.
    let (_, v2) = exchange(&h, &tok, "payments-api", "payments:read", "task-1");
    assert_ne!(claims_of(v2["access_token"].as_str().unwrap())["jti"], c["jti"]);

    // Health.
    let (s, health) = get_json(&h, "/healthz", None);
    assert_eq!(s, 200);
    assert_eq!(health["status"], "ok");
    h.shutdown().unwrap();
    // Every issued jti was recorded.
    assert!(mandate_minter::store::issued_exists(&env.dir.path().join("state"), jti).unwrap());
}

#[test]
fn request_errors_follow_rfc6749() {
    let env = Env::new();
    let h = start(env.config());
    let tok = env.svid(SUB, 600);
    let mut bad_grant = exchange_pairs(&tok, "payments-api", "payments:read", "t");
    bad_grant[0] = ("grant_type", "client_credentials");
    let (s, v, cache) = post_form(&h, "/token", &bad_grant, None);
    assert_eq!((s, v["error"].as_str()), (400, Some("unsupported_grant_type")));
    assert_eq!(cache, "no-store");
    assert!(v["error_description"].is_string());

    let no_subject: Vec<_> = exchange_pairs(&tok, "payments-api", "", "t").into_iter().filter(|(k, _)| *k != "subject_token").collect();
    let (s, v, _) = post_form(&h, "/token", &no_subject, None);
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_request")));
    assert!(v["error_description"].as_str().unwrap().contains("subject_token"));

    let no_grant: Vec<_> = exchange_pairs(&tok, "payments-api", "", "t").into_iter().filter(|(k, _)| *k != "grant_type").collect();
    let (s, v, _) = post_form(&h, "/token", &no_grant, None);
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_request")));

    let mut wrong_type = exchange_pairs(&tok, "payments-api", "", "t");
    wrong_type[2] = ("subject_token_type", "urn:ietf:params:oauth:token-type:saml2");
    let (s, v, _) = post_form(&h, "/token", &wrong_type, None);
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_request")));

    let mut two_aud = exchange_pairs(&tok, "payments-api", "", "t");
    two_aud.push(("audience", "crm"));
    let (s, v, _) = post_form(&h, "/token", &two_aud, None);
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_target")));

    let mut ttl = exchange_pairs(&tok, "payments-api", "", "t");
    ttl.push(("requested_ttl", "-5"));
    let (s, v, _) = post_form(&h, "/token", &ttl, None);
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_request")));

    // Wrong content type.
    let mut resp = agent().post(format!("{}/token", h.base_url())).header("content-type", "application/json").send("{}").unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let v: Value = serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(v["error"], "invalid_request");
}

#[test]
fn forged_and_expired_subject_tokens_are_invalid_grant() {
    let env = Env::new();
    let h = start(env.config());
    // Signed by a key the bundle does not hold, under an unknown kid and under the trusted kid.
    let rogue = TestKey::es256("rogue");
    let n = now();
    let forged = rogue.sign(&svid_claims(SUB, "mandate-minter", n, n + 600));
    let (s, v) = exchange(&h, &forged, "payments-api", "", "t");
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_grant")));
    assert!(v["error_description"].as_str().unwrap().contains("kid_unknown"), "{v}");
    let impostor = TestKey::es256("td-key-1");
    let forged = impostor.sign(&svid_claims(SUB, "mandate-minter", n, n + 600));
    let (s, v) = exchange(&h, &forged, "payments-api", "", "t");
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_grant")));
    assert!(v["error_description"].as_str().unwrap().contains("signature_invalid"), "{v}");
    // Expired (beyond the 30 s skew).
    let expired = env.key.sign(&svid_claims(SUB, "mandate-minter", n - 600, n - 120));
    let (s, v) = exchange(&h, &expired, "payments-api", "", "t");
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_grant")));
    assert!(v["error_description"].as_str().unwrap().contains("token_expired"), "{v}");
    // Wrong audience in the SVID (meant for someone else, not the minter).
    let other = env.key.sign(&svid_claims(SUB, "some-other-service", n, n + 600));
    let (s, v) = exchange(&h, &other, "payments-api", "", "t");
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_grant")));
    // Another trust domain.
    let foreign = env.key.sign(&svid_claims("spiffe://evil.org/agent", "mandate-minter", n, n + 600));
    let (s, v) = exchange(&h, &foreign, "payments-api", "", "t");
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_grant")));
}

#[test]
fn audience_scope_and_ttl_ceilings() {
    let env = Env::new();
    let mut cfg = env.config();
    cfg["ttl"]["cap_to_subject_exp"] = json!(false);
    let h = start(cfg);
    let tok = env.svid(SUB, 600);
    let (s, v) = exchange(&h, &tok, "billing-db", "", "t");
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_target")), "{v}");
    let (s, v) = exchange(&h, &tok, "payments-api", "payments:read payments:admin", "t");
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_scope")), "{v}");
    assert!(v["error_description"].as_str().unwrap().contains("payments:admin"));
    // No scope list for crm: no scope at all (any scope is an explicit opt-in).
    let (s, v) = exchange(&h, &tok, "crm", "contacts:read", "t");
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_scope")), "{v}");
    assert_eq!(exchange(&h, &tok, "crm", "", "t").0, 200);

    // TTL: requested above the max is capped; below is honoured.
    let mut pairs = exchange_pairs(&tok, "payments-api", "payments:read", "t");
    pairs.push(("requested_ttl", "3600"));
    let (s, v, _) = post_form(&h, "/token", &pairs, None);
    assert_eq!(s, 200);
    assert_eq!(v["expires_in"], 300);
    let c = claims_of(v["access_token"].as_str().unwrap());
    assert_eq!(c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(), 300);
    let mut pairs = exchange_pairs(&tok, "payments-api", "payments:read", "t");
    pairs.push(("requested_ttl", "30"));
    let (_, v, _) = post_form(&h, "/token", &pairs, None);
    assert_eq!(v["expires_in"], 30);
}

#[test]
fn ttl_never_outlives_the_subject_token() {
    let env = Env::new();
    let h = start(env.config());
    let tok = env.svid(SUB, 45);
    let (s, v) = exchange(&h, &tok, "payments-api", "", "t");
    assert_eq!(s, 200);
    let ttl = v["expires_in"].as_u64().unwrap();
    assert!((40..=45).contains(&ttl), "{ttl}");
}

fn post_json(h: &Handle, path: &str, body: Value) -> (u16, Value) {
    let a = request(h, "POST", path, Body::Json(body), None);
    (a.status, a.body)
}

/// Registers a task bound to `subjects`; returns its id.
fn create_task(h: &Handle, subjects: &[&str]) -> String {
    let (s, v) = post_json(h, "/tasks", json!({"subjects": subjects}));
    assert_eq!(s, 201, "{v}");
    v["task"].as_str().unwrap().to_string()
}

#[test]
fn revocation_persists_across_restart_and_ended_task_is_refused() {
    let env = Env::new();
    let mut cfg = env.config();
    cfg["tasks"] = json!({"require_registered": true});
    let tok = env.svid(SUB, 600);
    let bob = "spiffe://example.org/agent/bob";
    let h = start(cfg.clone());
    let task_a = create_task(&h, &[SUB, bob]);
    let task_b = create_task(&h, &[SUB]);
    let (s, v) = exchange(&h, &tok, "payments-api", "", &task_a);
    assert_eq!(s, 200, "{v}");
    let jti = claims_of(v["access_token"].as_str().unwrap())["jti"].as_str().unwrap().to_string();
    let (s, v, _) = post_form(&h, &format!("/tasks/{task_a}/end"), &[], None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["kind"], "task");
    assert_eq!(v["value"], task_a.as_str());
    assert_eq!(v["created"], true);
    assert_eq!(v["jtis"], json!([jti]));
    let (s, v) = exchange(&h, &tok, "payments-api", "", &task_a);
    assert_eq!((s, v["error"].as_str(), v["error_description"].as_str()), (400, Some("invalid_grant"), Some("task ended")));
    assert_eq!(v["mandate_reason"], "task_ended");
    // Other tasks still work; then revoke the subject (JSON body).
    assert_eq!(exchange(&h, &tok, "payments-api", "", &task_b).0, 200);
    let (s, v) = post_json(&h, "/revoke", json!({"subject": SUB}));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["kind"], "subject");
    assert_eq!(v["jtis"].as_array().unwrap().len(), 2);
    h.shutdown().unwrap();

    // Same state dir, new process state: nothing lost.
    let h = start(cfg);
    let (s, v) = exchange(&h, &tok, "payments-api", "", &task_b);
    assert_eq!((s, v["error_description"].as_str(), v["mandate_reason"].as_str()), (400, Some("subject revoked"), Some("subject_revoked")));
    let other = env.svid(bob, 600);
    let (s, v) = exchange(&h, &other, "payments-api", "", &task_a);
    assert_eq!((s, v["error_description"].as_str()), (400, Some("task ended")));
    let (s, v) = get_json(&h, &format!("/tasks/{task_a}"), None);
    assert_eq!((s, v["state"].as_str()), (200, Some("ended")));
    let task_d = create_task(&h, &[bob]);
    assert_eq!(exchange(&h, &other, "payments-api", "", &task_d).0, 200);
    // Ending again is idempotent.
    let (s, v, _) = post_form(&h, &format!("/tasks/{task_a}/end"), &[], None);
    assert_eq!((s, v["created"].as_bool()), (200, Some(false)));
}

/// `wait_ms`: the SQLite writer's commit wakes a held poll at once; with nothing new the poll
/// returns at its wait (capped server-side: a huge `wait_ms` is not refused), cursor unchanged.
#[test]
fn a_long_poll_is_woken_by_the_sqlite_writer_and_bounded() {
    let env = Env::new();
    let h = start(env.config());
    let (_, v) = get_json(&h, "/revocations?since=0", None);
    let (epoch, cursor) = (v["epoch"].as_str().unwrap().to_string(), v["cursor"].as_i64().unwrap());
    let url = format!("{}/revocations?since={cursor}&epoch={epoch}&wait_ms=10000", h.base_url());
    let poll = std::thread::spawn(move || {
        let started = std::time::Instant::now();
        let a = common::answer(agent().get(&url).call());
        (a.body, started.elapsed())
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (s, _, _) = post_form(&h, "/revoke", &[("jti", "held-poll")], None);
    assert_eq!(s, 200);
    let (page, waited) = poll.join().unwrap();
    assert!(waited >= std::time::Duration::from_millis(250) && waited < std::time::Duration::from_secs(5), "{waited:?}");
    assert_eq!(page["revocations"][0]["value"], "held-poll", "{page}");
    let cursor = page["cursor"].as_i64().unwrap();
    let started = std::time::Instant::now();
    let (s, v) = get_json(&h, &format!("/revocations?since={cursor}&epoch={epoch}&wait_ms=300"), None);
    assert_eq!((s, v["cursor"].as_i64(), v["revocations"].as_array().map(Vec::len)), (200, Some(cursor), Some(0)));
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    // A stale epoch is answered at once (a reset), whatever the wait.
    let started = std::time::Instant::now();
    let (_, v) = get_json(&h, "/revocations?since=5&epoch=other&wait_ms=99999999", None);
    assert_eq!(v["reset"], true);
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    for bad in ["-1", "x", "1.5"] {
        assert_eq!(get_json(&h, &format!("/revocations?since=0&wait_ms={bad}"), None).0, 400, "{bad}");
    }
    assert_eq!(get_json(&h, "/readyz", None).0, 200);
}

#[test]
fn revocations_feed_with_cursor() {
    let env = Env::new();
    let h = start(env.config());
    let (s, v) = get_json(&h, "/revocations?since=0", None);
    assert_eq!(s, 200);
    let epoch = v["epoch"].as_str().unwrap().to_string();
    assert_eq!(epoch.len(), 22);
    assert_eq!(v, json!({"epoch": epoch, "cursor": 0, "reset": true, "more": false, "wait_max_ms": 25_000, "revocations": []}));
    let t1 = create_task(&h, &[SUB]);
    post_form(&h, &format!("/tasks/{t1}/end"), &[], None);
    post_form(&h, "/revoke", &[("jti", "abc")], None);
    post_form(&h, "/revoke", &[("subject", "spiffe://example.org/x")], None);
    let (_, v) = get_json(&h, &format!("/revocations?since=0&epoch={epoch}"), None);
    assert_eq!(v["reset"], false);
    let list = v["revocations"].as_array().unwrap();
    assert_eq!(list.len(), 3);
    let kinds: Vec<_> = list.iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["task", "jti", "subject"]);
    // A registered task's entry lives until the task's expiry plus the longest token lifetime.
    let (_, task) = get_json(&h, &format!("/tasks/{t1}"), None);
    assert_eq!(list[0]["until"].as_u64().unwrap(), task["expires_at"].as_u64().unwrap() + 300);
    assert!(list[2].get("until").is_none());
    let seqs: Vec<i64> = list.iter().map(|r| r["seq"].as_i64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(v["cursor"].as_i64().unwrap(), *seqs.last().unwrap());
    assert!(list[0]["at"].as_u64().unwrap() >= now() - 5);
    // Page by cursor.
    let (_, v1) = get_json(&h, &format!("/revocations?since={}&limit=1&epoch={epoch}", seqs[0]), None);
    assert_eq!(v1["revocations"].as_array().unwrap().len(), 1);
    assert_eq!(v1["revocations"][0]["value"], "abc");
    assert_eq!(v1["more"], true);
    let (_, v2) = get_json(&h, &format!("/revocations?since={}&epoch={epoch}", v["cursor"]), None);
    assert_eq!(v2["revocations"], json!([]));
    assert_eq!(v2["cursor"], v["cursor"]);
    let t2 = create_task(&h, &[SUB]);
    post_form(&h, &format!("/tasks/{t2}/end"), &[], None);
    let (_, v3) = get_json(&h, &format!("/revocations?since={}&epoch={epoch}", v["cursor"]), None);
    assert_eq!(v3["revocations"][0]["value"], t2.as_str());
    // Bad requests.
    assert_eq!(get_json(&h, "/revocations?since=x", None).0, 400);
    assert_eq!(get_json(&h, "/revocations?max_bytes=100", None).0, 400);
    let (s, v, _) = post_form(&h, "/revoke", &[("jti", "a"), ("task", "b")], None);
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_request")));
}

#[test]
fn legacy_audience_gets_the_static_secret() {
    let env = Env::new();
    let secrets = env.dir.path().join("secrets.json");
    std::fs::write(&secrets, json!({"legacy-crm": {"secret": "sk_live_123", "header": "x-api-key"}}).to_string()).unwrap();
    let mut cfg = env.config();
    cfg["legacy"] = json!({"audiences": ["legacy-crm", "legacy-other"], "secrets_file": secrets});
    cfg["audiences"]["example.org"] = json!(["payments-api", "legacy-crm", "legacy-other"]);
    let h = start(cfg);
    let tok = env.svid(SUB, 600);
    let (s, v) = exchange(&h, &tok, "legacy-crm", "", "t");
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["access_token"], "sk_live_123");
    assert_eq!(v["issued_token_type"], "urn:mandate:token-type:static-secret");
    // RFC 6749 §7.1: not an access token, so `N_A`; where to put it is mandate's extension.
    assert_eq!(v["token_type"], "N_A");
    assert!(v.get("mandate_legacy").is_none(), "{v}");
    assert_eq!(v["mandate_header"], "x-api-key");
    assert!(v.get("mandate_scheme").is_none(), "no scheme configured: {v}");
    assert!(v.get("scope").is_none(), "empty scope is omitted: {v}");
    assert_eq!(v["expires_in"], 120);
    // Same checks as any audience: a forged subject gets nothing.
    let forged = TestKey::es256("td-key-1").sign(&svid_claims(SUB, "mandate-minter", now(), now() + 60));
    let (s, v) = exchange(&h, &forged, "legacy-crm", "", "t");
    assert_eq!(s, 400);
    assert!(!v.to_string().contains("sk_live"));
    // A legacy audience without a secret.
    let (s, v) = exchange(&h, &tok, "legacy-other", "", "t");
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_target")));
}

#[test]
fn delegation_sets_and_nests_act() {
    let env = Env::new();
    let h = start(env.config());
    let tok = env.svid(SUB, 600);
    let actor = env.svid(ACTOR, 600);
    let mut pairs = exchange_pairs(&tok, "payments-api", "payments:read", "t");
    pairs.push(("actor_token", &actor));
    pairs.push(("actor_token_type", TOKEN_TYPE_JWT));
    let (s, v, _) = post_form(&h, "/token", &pairs, None);
    assert_eq!(s, 200, "{v}");
    let c = claims_of(v["access_token"].as_str().unwrap());
    assert_eq!(c["sub"], SUB);
    assert_eq!(c["act"], json!({"sub": ACTOR}));

    // An actor token that is itself delegated: the new act names the actor in front of the
    // SUBJECT's chain (here: none); the actor's own history is not the subject's.
    let n = now();
    let mut claims = svid_claims(ACTOR, "mandate-minter", n, n + 600);
    claims["act"] = json!({"sub": "spiffe://example.org/human-proxy/h1"});
    let nested_actor = env.key.sign(&claims);
    let mut pairs = exchange_pairs(&tok, "payments-api", "payments:read", "t");
    pairs.push(("actor_token", &nested_actor));
    pairs.push(("actor_token_type", TOKEN_TYPE_JWT));
    let (s, v, _) = post_form(&h, "/token", &pairs, None);
    assert_eq!(s, 200, "{v}");
    let c = claims_of(v["access_token"].as_str().unwrap());
    assert_eq!(c["act"], json!({"sub": ACTOR}));

    // A forged actor token is refused; actor_token without its type too.
    let forged = TestKey::es256("nope").sign(&svid_claims(ACTOR, "mandate-minter", n, n + 600));
    let mut pairs = exchange_pairs(&tok, "payments-api", "", "t");
    pairs.push(("actor_token", &forged));
    pairs.push(("actor_token_type", TOKEN_TYPE_JWT));
    let (s, v, _) = post_form(&h, "/token", &pairs, None);
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_grant")));
    assert!(v["error_description"].as_str().unwrap().starts_with("actor_token"));
    let mut pairs = exchange_pairs(&tok, "payments-api", "", "t");
    pairs.push(("actor_token", &actor));
    let (s, _, _) = post_form(&h, "/token", &pairs, None);
    assert_eq!(s, 400);
}

#[test]
fn tokens_never_appear_in_error_bodies() {
    let env = Env::new();
    let h = start(env.config());
    let n = now();
    let tokens = [
        env.svid(SUB, 600),
        env.key.sign(&svid_claims(SUB, "mandate-minter", n - 900, n - 300)),
        TestKey::es256("x").sign(&svid_claims(SUB, "mandate-minter", n, n + 60)),
        "not-a-jwt-but-a-secret-value".to_string(),
    ];
    for t in &tokens {
        for (aud, scope) in [("payments-api", "payments:admin"), ("nowhere", ""), ("payments-api", "bad\"scope")] {
            let mut pairs = exchange_pairs(t, aud, scope, "t");
            pairs.push(("actor_token", t));
            for variant in [pairs.clone(), pairs[..pairs.len() - 1].to_vec()] {
                let (s, v, _) = post_form(&h, "/token", &variant, None);
                assert_eq!(s, 400);
                let text = v.to_string();
                assert!(!text.contains(t.as_str()), "token echoed: {text}");
                for part in t.split('.').filter(|p| p.len() > 8) {
                    assert!(!text.contains(part), "token part echoed: {text}");
                }
            }
        }
    }
}

fn shared_secret_config(env: &Env) -> Value {
    let mut cfg = env.config();
    cfg["client_auth"] = json!({
        "mode": "shared_secret",
        "clients": [
            {"client_id": "proxy-a", "secret_sha256": mandate_minter::auth::hash_secret("s3cret:with+chars"), "roles": ["mint", "feed"]},
            {"client_id": "proxy-b", "secret_sha256": mandate_minter::auth::hash_secret("other"), "roles": ["mint"], "audiences": ["crm"]}
        ]
    });
    cfg
}

#[test]
fn shared_secret_client_auth() {
    let env = Env::new();
    let h = start(shared_secret_config(&env));
    let tok = env.svid(SUB, 600);
    let pairs = exchange_pairs(&tok, "payments-api", "payments:read", "t");
    let (s, v, _) = post_form(&h, "/token", &pairs, None);
    assert_eq!((s, v["error"].as_str()), (401, Some("invalid_client")));
    let (s, v, _) = post_form(&h, "/token", &pairs, Some(&basic("proxy-a", "wrong")));
    assert_eq!((s, v["error"].as_str()), (401, Some("invalid_client")));
    let (s, _, _) = post_form(&h, "/token", &pairs, Some(&basic("nobody", "s3cret:with+chars")));
    assert_eq!(s, 401);
    let (s, v, _) = post_form(&h, "/token", &pairs, Some(&basic("proxy-a", "s3cret:with+chars")));
    assert_eq!(s, 200, "{v}");
    assert_eq!(claims_of(v["access_token"].as_str().unwrap())["client_id"], "proxy-a");
    // Per-client audience restriction.
    let (s, v, _) = post_form(&h, "/token", &pairs, Some(&basic("proxy-b", "other")));
    assert_eq!((s, v["error"].as_str()), (400, Some("unauthorized_client")));
    // Revocation endpoints are authenticated too; JWKS and health are public.
    assert_eq!(post_form(&h, "/tasks/x/end", &[], None).0, 401);
    assert_eq!(get_json(&h, "/revocations", None).0, 401);
    assert_eq!(get_json(&h, "/revocations", Some(&basic("proxy-a", "s3cret:with+chars"))).0, 200);
    assert_eq!(get_json(&h, "/.well-known/jwks.json", None).0, 200);
    assert_eq!(get_json(&h, "/healthz", None).0, 200);
}

fn rotation_config(env: &Env) -> Value {
    let mut cfg = env.config();
    cfg["keys"] = json!({"jwks_max_age_s": 2, "publish_before_use_s": 2});
    cfg
}

fn kids_of(h: &Handle) -> (Vec<String>, String) {
    let a = request(h, "GET", "/.well-known/jwks.json", Body::None, None);
    (a.body["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap().to_string()).collect(), a.cache)
}

fn signing_kid(h: &Handle, tok: &str) -> (String, String) {
    let (s, v) = exchange(h, tok, "payments-api", "", "t");
    assert_eq!(s, 200, "{v}");
    let jwt = v["access_token"].as_str().unwrap().to_string();
    (header_of(&jwt)["kid"].as_str().unwrap().to_string(), jwt)
}

/// Gap 7: a rotated key used to sign within `reload_check_s` while resource servers still held
/// a JWKS without it. Now it is published at once and signs only after `publish_before_use_s`.
#[test]
fn new_key_is_published_before_it_signs() {
    let env = Env::new();
    let h = start(rotation_config(&env));
    let tok = env.svid(SUB, 600);
    let (old_kid, old) = signing_kid(&h, &tok);
    let (_, cache) = kids_of(&h);
    assert_eq!(cache, "public, max-age=2");
    let policy = mandate_minter::keys::Policy::from_config(&h.state.config);
    let r = mandate_minter::keys::rotate(&env.dir.path().join("state"), &policy).unwrap();
    assert_ne!(old_kid, r.kid);
    // Published within reload_check_s ...
    let t0 = std::time::Instant::now();
    while !kids_of(&h).0.contains(&r.kid) {
        assert!(t0.elapsed() < std::time::Duration::from_secs(4), "the pending key was not published");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let published_at = now();
    // ... and not signing while one JWKS cache period has not passed since.
    let mut switched_at = None;
    while switched_at.is_none() {
        let (kid, jwt) = signing_kid(&h, &tok);
        if kid == r.kid {
            switched_at = Some(now());
        } else {
            assert_eq!(kid, old_kid);
            verify_with_jwks(&h, &jwt);
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(10), "the new key never signed");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let switched_at = switched_at.unwrap();
    // (Whole seconds on both sides: one second of rounding.)
    assert!(switched_at + 1 >= published_at + 2, "signed {}s after it was published (max-age 2)", switched_at - published_at);
    let (_, new) = signing_kid(&h, &tok);
    verify_with_jwks(&h, &new);
    verify_with_jwks(&h, &old);
    // The key file is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(mandate_minter::keys::key_path(&env.dir.path().join("state"))).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// Gap 7: only two keys were kept, so two rotations within a token's lifetime unpublished a key
/// that live tokens were signed with.
#[test]
fn two_quick_rotations_keep_every_live_tokens_key_published() {
    let env = Env::new();
    let h = start(rotation_config(&env));
    let tok = env.svid(SUB, 600);
    let (first_kid, first) = signing_kid(&h, &tok);
    let policy = mandate_minter::keys::Policy::from_config(&h.state.config);
    let a = mandate_minter::keys::rotate(&env.dir.path().join("state"), &policy).unwrap();
    let b = mandate_minter::keys::rotate(&env.dir.path().join("state"), &policy).unwrap();
    let c = mandate_minter::keys::rotate(&env.dir.path().join("state"), &policy).unwrap();
    assert!(c.dropped.is_empty(), "{c:?}");
    let t0 = std::time::Instant::now();
    loop {
        let (kids, _) = kids_of(&h);
        if kids.len() == 4 {
            assert_eq!(kids, [c.kid.clone(), b.kid.clone(), a.kid.clone(), first_kid.clone()]);
            break;
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(4), "{kids:?}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    verify_with_jwks(&h, &first);
}

/// Gap 7: rotation on a schedule (`keys.rotate_every_s`).
#[test]
fn keys_rotate_on_a_schedule() {
    let env = Env::new();
    let mut cfg = rotation_config(&env);
    cfg["keys"]["rotate_every_s"] = json!(2);
    let h = start(cfg);
    let t0 = std::time::Instant::now();
    while kids_of(&h).0.len() < 3 {
        assert!(t0.elapsed() < std::time::Duration::from_secs(10), "{:?}", kids_of(&h).0);
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn toml_config_and_validation() {
    let env = Env::new();
    let dir = env.dir.path();
    let bundle = spiffe_bundle(&[&env.key], None).to_string();
    let toml = format!(
        r#"
listen = "127.0.0.1:0"
issuer = "https://minter.test"
state_dir = "state"
dev = true
[identity]
audiences = ["mandate-minter"]
[[identity.trust_domains]]
name = "example.org"
bundle = {{ inline = {bundle_toml} }}
[audiences]
"example.org" = ["payments-api"]
[ttl]
max_s = 60
default_s = 30
"#,
        bundle_toml = json_to_toml_inline(&serde_json::from_str(&bundle).unwrap())
    );
    let path = dir.join("minter.toml");
    std::fs::write(&path, toml).unwrap();
    let cfg = MinterConfig::load(&path).unwrap();
    assert_eq!(cfg.state_dir, dir.join("state"));
    assert_eq!(cfg.ttl.max_s, 60);

    // Invalid configurations are refused with a useful message.
    let mut bad = env.config();
    bad["ttl"] = json!({"default_s": 600, "max_s": 300});
    assert!(MinterConfig::from_json(bad).unwrap_err().to_string().contains("ttl"));
    let mut bad = env.config();
    bad["listen"] = json!("0.0.0.0:0");
    assert!(format!("{:#}", MinterConfig::from_json(bad).unwrap_err()).contains("loopback"));
    let mut bad = env.config();
    bad["client_auth"] = json!({"mode": "mtls"});
    assert!(MinterConfig::from_json(bad).is_err());
    let mut bad = env.config();
    bad["identity"]["trust_domains"][0]["name"] = json!("");
    assert!(MinterConfig::from_json(bad).is_err());
    let mut bad = env.config();
    bad["unknown_field"] = json!(1);
    assert!(MinterConfig::from_json(bad).is_err());
}

#[test]
fn limits_and_store_knobs_are_validated_naming_the_field() {
    let env = Env::new();
    let cfg = MinterConfig::from_json(env.config()).unwrap();
    assert_eq!((cfg.limits.max_connections, cfg.limits.header_read_timeout_ms, cfg.limits.body_read_timeout_ms), (1000, 10_000, 10_000));
    assert_eq!(cfg.store.max_pages, None);
    for (field, value, named) in [
        ("limits", json!({"max_connections": 0}), "limits.max_connections"),
        ("limits", json!({"max_connections": 2_000_000}), "limits.max_connections"),
        ("limits", json!({"header_read_timeout_ms": 99}), "limits.header_read_timeout_ms"),
        ("limits", json!({"body_read_timeout_ms": 600_001}), "limits.body_read_timeout_ms"),
        ("limits", json!({"idle_timeout_ms": 5}), "idle_timeout_ms"),
        ("store", json!({"max_pages": 0}), "store.max_pages"),
    ] {
        let mut bad = env.config();
        bad[field] = value;
        let err = format!("{:#}", MinterConfig::from_json(bad).unwrap_err());
        assert!(err.contains(named), "{named}: {err}");
    }
    let mut ok = env.config();
    ok["limits"] = json!({"max_connections": 1, "header_read_timeout_ms": 100, "body_read_timeout_ms": 600_000});
    ok["store"] = json!({"max_pages": 64});
    let cfg = MinterConfig::from_json(ok).unwrap();
    assert_eq!(cfg.limits.max_connections, 1);
    assert_eq!(cfg.store.max_pages, Some(64));
}

#[test]
fn a_body_that_does_not_arrive_in_time_is_408_and_the_connection_closes() {
    use std::io::{Read, Write};
    let env = Env::new();
    let mut cfg = env.dev();
    cfg["limits"] = json!({"header_read_timeout_ms": 5000, "body_read_timeout_ms": 300});
    let h = start(cfg);
    let mut s = std::net::TcpStream::connect(h.addr).unwrap();
    s.write_all(b"POST /token HTTP/1.1\r\nhost: m\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: 100\r\n\r\ngrant_type=").unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    assert!(text.contains(r#""error":"invalid_request""#), "{text}");
    let v = request(&h, "GET", "/healthz", Body::None, None).body;
    assert_eq!(v["connections"]["body_timeouts"], 1, "{v}");
}

fn json_to_toml_inline(v: &Value) -> String {
    match v {
        Value::Object(m) => format!("{{ {} }}", m.iter().map(|(k, v)| format!("{k:?} = {}", json_to_toml_inline(v))).collect::<Vec<_>>().join(", ")),
        Value::Array(a) => format!("[{}]", a.iter().map(json_to_toml_inline).collect::<Vec<_>>().join(", ")),
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

#[test]
fn bundle_url_is_fetched() {
    // A tiny bundle server on loopback.
    let env = Env::new();
    let bundle = spiffe_bundle(&[&env.key], None).to_string();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut s in listener.incoming().flatten() {
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf);
            let _ = write!(s, "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{bundle}", bundle.len());
        }
    });
    let mut cfg = env.config();
    cfg["identity"]["trust_domains"] = json!([{"name": "example.org", "bundle_url": format!("http://{addr}/bundle"), "refresh_s": 30}]);
    let h = start(cfg);
    let tok = env.svid(SUB, 600);
    let mut status = 0;
    for _ in 0..50 {
        status = exchange(&h, &tok, "payments-api", "", "t").0;
        if status == 200 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(status, 200);
}

// ---- mTLS ----

#[test]
fn mtls_client_certificates() {
    let env = Env::new();
    let pki = pki();
    let client = pki.client("spiffe://example.org/proxy/envoy-1");
    let other = pki.client("spiffe://example.org/proxy/unregistered");
    let mut cfg = env.config();
    cfg["tls"] = env.tls(&pki);
    cfg["client_auth"] = json!({"mode": "mtls", "clients": [{"client_id": "spiffe://example.org/proxy/envoy-1", "roles": ["mint"]}]});
    let h = start(cfg);
    assert!(h.base_url().starts_with("https://"));
    let tok = env.svid(SUB, 600);
    let body = serde_urlencoded::to_string(exchange_pairs(&tok, "payments-api", "payments:read", "t")).unwrap();
    let https_post = |cert: Option<&common::ClientCert>, body: String| https(&h, &pki, cert, "POST", "/token", "application/x-www-form-urlencoded", body);

    // No certificate: refused.
    let (s, v) = https_post(None, body.clone()).unwrap();
    assert_eq!((s, v["error"].as_str()), (401, Some("invalid_client")));
    // A CA-issued certificate that is not registered: refused.
    let (s, _) = https_post(Some(&other), body.clone()).unwrap();
    assert_eq!(s, 401);
    // A self-signed client certificate fails the handshake (or is refused).
    let rogue_key = rcgen::KeyPair::generate().unwrap();
    let rogue = rcgen::CertificateParams::new(vec!["rogue".to_string()]).unwrap().self_signed(&rogue_key).unwrap();
    match https_post(Some(&(rogue.der().to_vec(), rogue_key.serialize_der())), body.clone()) {
        Err(_) => {}
        Ok((s, _)) => assert_eq!(s, 401),
    }
    // The registered client works; its identity is the client_id.
    let (s, v) = https_post(Some(&client), body).unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(claims_of(v["access_token"].as_str().unwrap())["client_id"], "spiffe://example.org/proxy/envoy-1");

}

#[test]
fn binary_prints_bound_address_and_rotates_keys() {
    use std::io::BufRead as _;
    let env = Env::new();
    let cfg_path = env.dir.path().join("minter.json");
    let mut cfg = env.config();
    cfg["listen"] = json!("127.0.0.1:9"); // overridden by --listen
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let exe = env!("CARGO_BIN_EXE_mandate-minter");
    let mut child = std::process::Command::new(exe)
        .args(["--config", cfg_path.to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    let addr = v["listening"].as_str().unwrap().to_string();
    assert!(addr.starts_with("127.0.0.1:") && !addr.ends_with(":0") && !addr.ends_with(":9"), "{addr}");
    let mut resp = agent().get(format!("http://{addr}/healthz")).call().unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let kid = serde_json::from_str::<Value>(&resp.body_mut().read_to_string().unwrap()).unwrap()["kid"].as_str().unwrap().to_string();
    let out = std::process::Command::new(exe).args(["rotate-key", "--config", cfg_path.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success());
    let rotated: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_ne!(rotated["rotated"].as_str().unwrap(), kid);
    // SIGTERM: a clean stop.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn example_config_is_valid() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("minter.example.json");
    let cfg = MinterConfig::load(&path).unwrap();
    assert_eq!(cfg.bundle_urls.len(), 1);
    assert_eq!(cfg.client_auth.mode, mandate_minter::config::ClientAuthMode::Mtls);
    assert_eq!(cfg.txn_tokens.max_delegations, 2);
    assert!(cfg.client_auth.clients.iter().any(|c| c.roles.contains(&mandate_minter::config::Role::Txn)));
}

#[test]
fn load_tool_fixture_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let exe = env!("CARGO_BIN_EXE_minter-load");
    let out = std::process::Command::new(exe).args(["fixture", "--dir", dir.path().to_str().unwrap()]).output().unwrap();
    assert!(out.status.success());
    let fx: Value = serde_json::from_slice(&out.stdout).unwrap();
    let cfg = MinterConfig::load(Path::new(fx["config"].as_str().unwrap())).unwrap();
    let h = mandate_minter::spawn(cfg).unwrap();
    let out = std::process::Command::new(exe)
        .args(["--url", &h.base_url(), "--subject-token-file", fx["subject_token_file"].as_str().unwrap(), "-n", "40", "-c", "2", "--warmup", "5"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["errors"], 0);
    assert!(r["exchanges_per_s"].as_f64().unwrap() > 0.0);
    assert!(r["p99_ms"].as_f64().unwrap() >= r["p50_ms"].as_f64().unwrap());
}

// ---- Gap 8: RFC 8693 conformance of the answers and of delegation ----

/// Gap 8: a subject token's `act` chain (who delegated to whom before) used to be replaced by
/// the actor token's chain, erasing the subject's delegation history.
#[test]
fn actor_chain_cannot_erase_the_subjects_delegation_history() {
    let env = Env::new();
    let h = start(env.config());
    let n = now();
    let mut subject = svid_claims(SUB, "mandate-minter", n, n + 600);
    subject["act"] = json!({"sub": "spiffe://example.org/orchestrator/first", "act": {"sub": "spiffe://example.org/human/h1"}});
    let subject = env.key.sign(&subject);
    // The actor brings its own, unrelated history: it must not replace the subject's.
    let mut actor = svid_claims(ACTOR, "mandate-minter", n, n + 600);
    actor["act"] = json!({"sub": "spiffe://example.org/innocent/looking"});
    let actor = env.key.sign(&actor);
    let mut pairs = exchange_pairs(&subject, "payments-api", "payments:read", "t");
    pairs.push(("actor_token", &actor));
    pairs.push(("actor_token_type", TOKEN_TYPE_JWT));
    let (s, v, _) = post_form(&h, "/token", &pairs, None);
    assert_eq!(s, 200, "{v}");
    let c = claims_of(v["access_token"].as_str().unwrap());
    assert_eq!(
        c["act"],
        json!({"sub": ACTOR, "act": {"sub": "spiffe://example.org/orchestrator/first", "act": {"sub": "spiffe://example.org/human/h1"}}})
    );
}

/// Gap 8: a chain at the depth limit cannot grow past it.
#[test]
fn delegation_chain_cannot_grow_past_the_depth_limit() {
    let env = Env::new();
    let h = start(env.config());
    let n = now();
    let mut chain = json!({"sub": "spiffe://example.org/a/0"});
    for i in 1..mandate_minter::exchange::MAX_ACT_DEPTH {
        chain = json!({"sub": format!("spiffe://example.org/a/{i}"), "act": chain});
    }
    let mut subject = svid_claims(SUB, "mandate-minter", n, n + 600);
    subject["act"] = chain;
    let subject = env.key.sign(&subject);
    let actor = env.svid(ACTOR, 600);
    let (s, _) = exchange(&h, &subject, "payments-api", "", "t");
    assert_eq!(s, 200, "the chain itself is within the limit");
    let mut pairs = exchange_pairs(&subject, "payments-api", "", "t");
    pairs.push(("actor_token", &actor));
    pairs.push(("actor_token_type", TOKEN_TYPE_JWT));
    let (s, v, _) = post_form(&h, "/token", &pairs, None);
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_grant")), "{v}");
}

/// Gap 8: `may_act` in the subject token (RFC 8693 §4.4) was ignored: any verified workload
/// could make itself the actor.
#[test]
fn may_act_names_who_may_act() {
    let env = Env::new();
    let h = start(env.config());
    let n = now();
    let mut subject = svid_claims(SUB, "mandate-minter", n, n + 600);
    subject["may_act"] = json!({"sub": ACTOR});
    let subject = env.key.sign(&subject);
    let with_actor = |actor: &str| {
        let mut pairs = exchange_pairs(&subject, "payments-api", "", "t");
        pairs.push(("actor_token", actor));
        pairs.push(("actor_token_type", TOKEN_TYPE_JWT));
        let (s, v, _) = post_form(&h, "/token", &pairs, None);
        (s, v)
    };
    // Someone else, with a perfectly valid token of its own, is not who may act.
    let intruder = env.svid("spiffe://example.org/agent/mallory", 600);
    let (s, v) = with_actor(&intruder);
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_grant")), "{v}");
    assert!(v["error_description"].as_str().unwrap().contains("may_act"), "{v}");
    // A forged token naming the allowed actor is refused as a token first: claims of an
    // unverified actor token are never trusted.
    let forged = TestKey::es256("td-key-1").sign(&svid_claims(ACTOR, "mandate-minter", n, n + 600));
    let (s, v) = with_actor(&forged);
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_grant")), "{v}");
    assert!(v["error_description"].as_str().unwrap().starts_with("actor_token rejected"), "{v}");
    // The named actor is accepted.
    let (s, v) = with_actor(&env.svid(ACTOR, 600));
    assert_eq!(s, 200, "{v}");
    assert_eq!(claims_of(v["access_token"].as_str().unwrap())["act"], json!({"sub": ACTOR}));
    // Without an actor the subject's own exchange is unaffected.
    assert_eq!(exchange(&h, &subject, "payments-api", "", "t").0, 200);
}

/// Gap 8: a `requested_token_type` that cannot be issued was answered with another type (a JWT
/// request for a legacy audience got the static secret) or with `invalid_target`.
#[test]
fn requested_token_type_that_cannot_be_issued_is_invalid_request() {
    let env = Env::new();
    let secrets = env.dir.path().join("secrets.json");
    std::fs::write(&secrets, json!({"legacy-crm": {"secret": "sk_live_123", "header": "authorization", "scheme": "Basic"}}).to_string()).unwrap();
    let mut cfg = env.config();
    cfg["legacy"] = json!({"audiences": ["legacy-crm"], "secrets_file": secrets});
    let h = start(cfg);
    let tok = env.svid(SUB, 600);
    let ask = |aud: &str, rtt: &str| {
        let mut pairs = exchange_pairs(&tok, aud, "", "t");
        pairs.push(("requested_token_type", rtt));
        let (s, v, cache) = post_form(&h, "/token", &pairs, None);
        (s, v, cache)
    };
    for (aud, rtt) in [
        ("legacy-crm", TOKEN_TYPE_JWT),
        ("legacy-crm", "urn:ietf:params:oauth:token-type:access_token"),
        ("payments-api", "urn:mandate:token-type:static-secret"),
        ("payments-api", "urn:ietf:params:oauth:token-type:saml2"),
        ("payments-api", "urn:ietf:params:oauth:token-type:id_token"),
    ] {
        let (s, v, cache) = ask(aud, rtt);
        assert_eq!((s, v["error"].as_str()), (400, Some("invalid_request")), "{aud} {rtt}: {v}");
        assert!(!v.to_string().contains("sk_live"), "{v}");
        assert_eq!(cache, "no-store");
    }
    let (s, v, _) = ask("legacy-crm", "urn:mandate:token-type:static-secret");
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["token_type"], "N_A");
    assert_eq!(v["mandate_header"], "authorization");
    assert_eq!(v["mandate_scheme"], "Basic");
    let (s, v, _) = ask("payments-api", "urn:ietf:params:oauth:token-type:access_token");
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["token_type"], "Bearer");
    assert!(v.get("scope").is_none(), "empty scope is omitted: {v}");
}

// ---- Gap 5: trust bundles fetched by the minter ----

/// A bundle server on loopback: answers the queued (status, body) pairs in order, then repeats
/// the last one; counts requests. With `tls`, serves HTTPS.
fn bundle_server(answers: Vec<(u16, String)>, tls: Option<std::sync::Arc<rustls::ServerConfig>>) -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let i = seen.load(std::sync::atomic::Ordering::SeqCst);
            let (status, body) = answers.get(i).or(answers.last()).cloned().unwrap();
            let reply = format!("HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
            let mut buf = [0u8; 4096];
            match &tls {
                None => {
                    let mut s = stream;
                    let _ = s.read(&mut buf);
                    let _ = s.write_all(reply.as_bytes());
                }
                Some(cfg) => {
                    let Ok(conn) = rustls::ServerConnection::new(cfg.clone()) else { continue };
                    let mut s = rustls::StreamOwned::new(conn, stream);
                    if s.read(&mut buf).is_err() {
                        continue; // handshake refused by the client
                    }
                    let _ = s.write_all(reply.as_bytes());
                    s.conn.send_close_notify();
                    let _ = s.flush();
                }
            }
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    (addr, count)
}

fn tls_server_config(pki: &Pki) -> std::sync::Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<rustls::pki_types::CertificateDer<'static>> =
        rustls::pki_types::CertificateDer::pem_slice_iter(pki.server_cert_pem.as_bytes()).collect::<Result<_, _>>().unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(pki.server_key_pem.as_bytes()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    std::sync::Arc::new(cfg)
}

/// Exchanges until `want(status, body)` holds or `secs` pass; returns the last answer.
fn exchange_until(h: &Handle, tok: &str, secs: u64, want: impl Fn(u16, &Value) -> bool) -> (u16, Value) {
    let t0 = std::time::Instant::now();
    loop {
        let (s, v) = exchange(h, tok, "payments-api", "", "t");
        if want(s, &v) || t0.elapsed() > std::time::Duration::from_secs(secs) {
            return (s, v);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Gap 5: bundles were fetched over plain HTTP from any host: anyone on the path could hand the
/// minter their own keys.
#[test]
fn plain_http_bundle_url_to_remote_host_is_refused() {
    let env = Env::new();
    for url in ["http://bundles.example.org/bundle", "http://10.0.0.7:8543/bundle", "http://[2001:db8::1]/b", "http://127.0.0.1@evil.example/b", "ftp://127.0.0.1/b"] {
        let mut cfg = env.config();
        cfg["identity"]["trust_domains"] = json!([{"name": "example.org", "bundle_url": url}]);
        let err = format!("{:#}", MinterConfig::from_json(cfg).unwrap_err());
        assert!(err.contains("bundle_url"), "{url}: {err}");
    }
    for url in ["http://127.0.0.1:8543/bundle", "http://127.9.9.9/b", "http://[::1]:80/b", "http://localhost:9/b"] {
        let mut cfg = env.config();
        cfg["identity"]["trust_domains"] = json!([{"name": "example.org", "bundle_url": url}]);
        assert!(MinterConfig::from_json(cfg).is_ok(), "{url}");
    }
}

/// Gap 5: https bundle URLs need a pinned CA; no system roots are trusted.
#[test]
fn https_bundle_url_without_a_pinned_ca_is_refused() {
    let env = Env::new();
    let mut cfg = env.config();
    cfg["identity"]["trust_domains"] = json!([{"name": "example.org", "bundle_url": "https://bundles.example.org/bundle"}]);
    let err = format!("{:#}", MinterConfig::from_json(cfg).unwrap_err());
    assert!(err.contains("bundle_ca"), "{err}");
    let mut cfg = env.config();
    cfg["identity"]["trust_domains"] = json!([{"name": "example.org", "bundle_url": "http://127.0.0.1:1/b", "bundle_ca": "/x.pem"}]);
    assert!(MinterConfig::from_json(cfg).is_err(), "bundle_ca on plain http");
}

/// Gap 5: an https bundle is fetched trusting only `bundle_ca`: a server whose certificate
/// chains to another CA (a man in the middle with a "real" certificate) is not believed.
#[test]
fn https_bundle_is_fetched_with_the_pinned_ca_only() {
    let env = Env::new();
    let pki_a = pki();
    let pki_b = pki();
    let bundle = spiffe_bundle(&[&env.key], None).to_string();
    let (addr, count) = bundle_server(vec![(200, bundle)], Some(tls_server_config(&pki_a)));
    let tok = env.svid(SUB, 600);
    let start_with_ca = |ca_pem: &str, name: &str| {
        let ca = env.dir.path().join(name);
        std::fs::write(&ca, ca_pem).unwrap();
        let mut cfg = env.config();
        cfg["state_dir"] = json!(env.dir.path().join(format!("state-{name}")));
        cfg["identity"]["trust_domains"] =
            json!([{"name": "example.org", "bundle_url": format!("https://localhost:{}/bundle", addr.port()), "bundle_ca": ca}]);
        start(cfg)
    };
    // The wrong CA: the handshake fails, no bundle, tokens refused.
    let wrong = start_with_ca(&pki_b.ca_pem, "wrong-ca.pem");
    std::thread::sleep(std::time::Duration::from_millis(800));
    let (s, v) = exchange(&wrong, &tok, "payments-api", "", "t");
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_grant")), "{v}");
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 0, "a bundle was served over an untrusted connection");
    drop(wrong);
    // The pinned CA: fetched and used.
    let right = start_with_ca(&pki_a.ca_pem, "right-ca.pem");
    let (s, v) = exchange_until(&right, &tok, 5, |s, _| s == 200);
    assert_eq!(s, 200, "{v}");
}

/// Gap 5: a bundle server (or someone in its place) could roll the bundle back to an older
/// `spiffe_sequence`, bringing back withdrawn keys.
#[test]
fn bundle_rollback_to_older_sequence_is_refused() {
    let env = Env::new();
    let withdrawn = TestKey::es256("withdrawn-key");
    let mut current = spiffe_bundle(&[&env.key], None);
    current["spiffe_sequence"] = json!(5);
    let mut old = spiffe_bundle(&[&withdrawn], None);
    old["spiffe_sequence"] = json!(4);
    let (addr, count) = bundle_server(vec![(200, current.to_string()), (200, old.to_string())], None);
    let mut cfg = env.config();
    cfg["log_level"] = json!("error");
    cfg["identity"]["trust_domains"] = json!([{"name": "example.org", "bundle_url": format!("http://{addr}/bundle"), "refresh_s": 5}]);
    let h = start(cfg);
    let tok = env.svid(SUB, 600);
    assert_eq!(exchange_until(&h, &tok, 5, |s, _| s == 200).0, 200);
    // Wait for the rollback to be offered (the second fetch, refresh_s later).
    let t0 = std::time::Instant::now();
    while count.load(std::sync::atomic::Ordering::SeqCst) < 2 {
        assert!(t0.elapsed() < std::time::Duration::from_secs(10), "no second fetch");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let n = now();
    let with_withdrawn = withdrawn.sign(&svid_claims(SUB, "mandate-minter", n, n + 600));
    let (s, v) = exchange(&h, &with_withdrawn, "payments-api", "", "t");
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_grant")), "a withdrawn key is trusted again: {v}");
    assert_eq!(exchange(&h, &tok, "payments-api", "", "t").0, 200, "the current bundle stays");
}

/// Gap 5: the last good bundle was trusted forever while the bundle endpoint was down (keys
/// revoked in the meantime stayed valid). After `max_bundle_age_s` that domain's tokens are
/// refused with `bundle_unavailable`.
#[test]
fn stale_bundle_stops_vouching_after_max_bundle_age() {
    let env = Env::new();
    let bundle = spiffe_bundle(&[&env.key], None).to_string();
    let (addr, _count) = bundle_server(vec![(200, bundle), (503, "{}".into())], None);
    let mut cfg = env.config();
    cfg["identity"]["trust_domains"] =
        json!([{"name": "example.org", "bundle_url": format!("http://{addr}/bundle"), "refresh_s": 5, "max_bundle_age_s": 5}]);
    let h = start(cfg);
    let tok = env.svid(SUB, 600);
    assert_eq!(exchange_until(&h, &tok, 5, |s, _| s == 200).0, 200);
    let (s, v) = exchange_until(&h, &tok, 12, |s, _| s != 200);
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid_grant")), "{v}");
    assert_eq!(v["error_description"], "subject_token rejected: bundle_unavailable");
}
