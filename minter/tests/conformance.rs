//! RFC 6749 §5.2 / RFC 8693 §2.2.2 conformance of the token endpoint's error answers: every
//! bad request gets the right status and `error` code, as JSON (`content-type:
//! application/json`) with `cache-control: no-store`, including the answers the HTTP layer
//! produces itself (unknown path, wrong method, oversize body, undecodable path).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mandate_minter::config::{GRANT_TOKEN_EXCHANGE, TOKEN_TYPE_JWT};
use mandate_minter::Handle;
use mandate_core::testkit::{svid_claims, TestKey};
use serde_json::json;

mod common;
use common::{agent, answer, request, start, Answer, Body, Env, ACTOR, SUB};

const STATIC: &str = "urn:mandate:token-type:static-secret";

struct Minter {
    h: Handle,
    env: Env,
}

fn minter() -> Minter {
    let env = Env::new();
    let secrets = env.file("secrets.json", &json!({"legacy-crm": {"secret": "sk_live_123", "header": "x-api-key"}}).to_string());
    let mut cfg = env.dev();
    cfg.as_object_mut().unwrap().remove("ttl");
    cfg["audiences"] = json!({"example.org": ["payments-api", "legacy-crm"]});
    cfg["require_task"] = json!(true);
    // Ad-hoc task names: these tests are about the answers' shape, not task registration.
    cfg["tasks"] = json!({"require_registered": false});
    cfg["legacy"] = json!({"audiences": ["legacy-crm"], "secrets_file": secrets});
    cfg["max_body_bytes"] = json!(8192);
    Minter { h: start(cfg), env }
}

impl Minter {
    fn svid(&self, sub: &str) -> String {
        self.env.svid(sub, 600)
    }
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.h.base_url())
    }
}

fn post(m: &Minter, path: &str, content_type: &str, body: Vec<u8>) -> Answer {
    request(&m.h, "POST", path, Body::Raw(content_type, body), None)
}

fn form(pairs: &[(&str, &str)]) -> Vec<u8> {
    serde_urlencoded::to_string(pairs).unwrap().into_bytes()
}

/// A complete, valid exchange; cases remove, repeat or change parameters.
fn good(subject: &str) -> Vec<(&str, &str)> {
    vec![
        ("grant_type", GRANT_TOKEN_EXCHANGE),
        ("subject_token", subject),
        ("subject_token_type", TOKEN_TYPE_JWT),
        ("audience", "payments-api"),
        ("scope", "payments:read"),
        ("task", "task-1"),
        ("intent", "pay"),
    ]
}

fn without<'a>(pairs: &[(&'a str, &'a str)], name: &str) -> Vec<(&'a str, &'a str)> {
    pairs.iter().filter(|(k, _)| *k != name).cloned().collect()
}

fn with<'a>(pairs: &[(&'a str, &'a str)], extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    pairs.iter().chain(extra.iter()).cloned().collect()
}

fn replaced<'a>(pairs: &[(&'a str, &'a str)], name: &str, value: &'a str) -> Vec<(&'a str, &'a str)> {
    pairs.iter().map(|(k, v)| if *k == name { (*k, value) } else { (*k, *v) }).collect()
}

/// The RFC 6749 §5.2 shape: status, code, JSON, no-store, a description, never a token.
fn check(what: &str, a: &Answer, status: u16, error: &str, secrets: &[&str]) {
    assert_eq!(a.status, status, "{what}: {}", a.raw);
    assert_eq!(a.body["error"], error, "{what}: {}", a.raw);
    assert!(a.body["error_description"].as_str().is_some_and(|d| !d.is_empty()), "{what}: {}", a.raw);
    assert!(a.content_type.starts_with("application/json"), "{what}: content-type {:?}", a.content_type);
    assert_eq!(a.cache, "no-store", "{what}");
    for s in secrets {
        assert!(!a.raw.contains(s), "{what}: a token leaked into the error");
    }
}

#[test]
fn every_bad_token_request_gets_its_rfc6749_error() {
    let m = minter();
    let subject = m.svid(SUB);
    let actor = m.svid(ACTOR);
    let g = good(&subject);
    let n = mandate_minter::now();
    let forged = TestKey::es256("td-key-1").sign(&svid_claims(SUB, "mandate-minter", n, n + 600));
    let expired = m.env.key.sign(&svid_claims(SUB, "mandate-minter", n - 600, n - 300));
    let wrong_aud = m.env.key.sign(&svid_claims(SUB, "someone-else", n, n + 600));
    let foreign_td = m.env.key.sign(&svid_claims("spiffe://other.org/agent/a", "mandate-minter", n, n + 600));
    let may_act_subject = {
        let mut c = svid_claims(SUB, "mandate-minter", n, n + 600);
        c["may_act"] = json!({"sub": "spiffe://example.org/orchestrator/someone-else"});
        m.env.key.sign(&c)
    };
    let secrets = [subject.as_str(), actor.as_str(), forged.as_str(), "sk_live_123"];

    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("missing grant_type", without(&g, "grant_type"), 400, "invalid_request"),
        ("repeated grant_type", with(&g, &[("grant_type", GRANT_TOKEN_EXCHANGE)]), 400, "invalid_request"),
        ("wrong grant_type", replaced(&g, "grant_type", "client_credentials"), 400, "unsupported_grant_type"),
        ("authorization_code grant", replaced(&g, "grant_type", "authorization_code"), 400, "unsupported_grant_type"),
        ("missing subject_token", without(&g, "subject_token"), 400, "invalid_request"),
        ("empty subject_token", replaced(&g, "subject_token", ""), 400, "invalid_request"),
        ("repeated subject_token", with(&g, &[("subject_token", &subject)]), 400, "invalid_request"),
        ("missing subject_token_type", without(&g, "subject_token_type"), 400, "invalid_request"),
        ("saml2 subject_token_type", replaced(&g, "subject_token_type", "urn:ietf:params:oauth:token-type:saml2"), 400, "invalid_request"),
        ("access_token subject_token_type", replaced(&g, "subject_token_type", "urn:ietf:params:oauth:token-type:access_token"), 400, "invalid_request"),
        ("repeated subject_token_type", with(&g, &[("subject_token_type", TOKEN_TYPE_JWT)]), 400, "invalid_request"),
        ("actor_token without actor_token_type", with(&g, &[("actor_token", &actor)]), 400, "invalid_request"),
        ("actor_token_type without actor_token", with(&g, &[("actor_token_type", TOKEN_TYPE_JWT)]), 400, "invalid_request"),
        ("wrong actor_token_type", with(&g, &[("actor_token", &actor), ("actor_token_type", "urn:ietf:params:oauth:token-type:id_token")]), 400, "invalid_request"),
        ("repeated actor_token", with(&g, &[("actor_token", &actor), ("actor_token", &actor), ("actor_token_type", TOKEN_TYPE_JWT)]), 400, "invalid_request"),
        ("unknown requested_token_type", with(&g, &[("requested_token_type", "urn:ietf:params:oauth:token-type:saml1")]), 400, "invalid_request"),
        ("static secret requested for a JWT audience", with(&g, &[("requested_token_type", STATIC)]), 400, "invalid_request"),
        ("jwt requested for a legacy audience", with(&without(&replaced(&g, "audience", "legacy-crm"), "scope"), &[("requested_token_type", TOKEN_TYPE_JWT)]), 400, "invalid_request"),
        ("repeated requested_token_type", with(&g, &[("requested_token_type", TOKEN_TYPE_JWT), ("requested_token_type", TOKEN_TYPE_JWT)]), 400, "invalid_request"),
        ("resource", with(&g, &[("resource", "https://payments.example")]), 400, "invalid_target"),
        ("missing audience", without(&g, "audience"), 400, "invalid_request"),
        ("two audiences", with(&g, &[("audience", "legacy-crm")]), 400, "invalid_target"),
        ("empty audience", replaced(&g, "audience", ""), 400, "invalid_target"),
        ("audience not allowed", replaced(&g, "audience", "crm"), 400, "invalid_target"),
        ("malformed scope", replaced(&g, "scope", "payments:read \"x"), 400, "invalid_scope"),
        ("scope not allowed", replaced(&g, "scope", "payments:write"), 400, "invalid_scope"),
        ("repeated scope", with(&g, &[("scope", "payments:read")]), 400, "invalid_request"),
        ("negative ttl", with(&g, &[("requested_ttl", "-5")]), 400, "invalid_request"),
        ("zero ttl", with(&g, &[("requested_ttl", "0")]), 400, "invalid_request"),
        ("non-numeric ttl", with(&g, &[("requested_ttl", "60s")]), 400, "invalid_request"),
        ("huge ttl", with(&g, &[("requested_ttl", "99999999999999999999999")]), 400, "invalid_request"),
        ("missing task (required)", without(&g, "task"), 400, "invalid_request"),
        ("task with a space", replaced(&g, "task", "task 1"), 400, "invalid_request"),
        ("task with a newline", replaced(&g, "task", "t\n1"), 400, "invalid_request"),
        ("intent with a control character", replaced(&g, "intent", "pay\u{1}"), 400, "invalid_request"),
        ("garbage subject_token", replaced(&g, "subject_token", "not.a.jwt"), 400, "invalid_grant"),
        ("forged subject_token", replaced(&g, "subject_token", &forged), 400, "invalid_grant"),
        ("expired subject_token", replaced(&g, "subject_token", &expired), 400, "invalid_grant"),
        ("subject_token for another audience", replaced(&g, "subject_token", &wrong_aud), 400, "invalid_grant"),
        ("subject_token from an unknown trust domain", replaced(&g, "subject_token", &foreign_td), 400, "invalid_grant"),
        ("forged actor_token", with(&g, &[("actor_token", &forged), ("actor_token_type", TOKEN_TYPE_JWT)]), 400, "invalid_grant"),
        ("actor not named by may_act", with(&replaced(&g, "subject_token", &may_act_subject), &[("actor_token", &actor), ("actor_token_type", TOKEN_TYPE_JWT)]), 400, "invalid_grant"),
    ];
    for (what, pairs, status, error) in &cases {
        let a = post(&m, "/token", "application/x-www-form-urlencoded", form(pairs));
        check(what, &a, *status, error, &secrets);
    }

    // Transport-level mistakes.
    let body = form(&g);
    check("JSON content type", &post(&m, "/token", "application/json", body.clone()), 400, "invalid_request", &secrets);
    check("text content type", &post(&m, "/token", "text/plain", body.clone()), 400, "invalid_request", &secrets);
    let no_ct = answer(agent().post(m.url("/token")).send(body.clone()));
    check("no content type", &no_ct, 400, "invalid_request", &secrets);
    let mut big = body.clone();
    big.extend(b"&pad=".iter().chain(vec![b'x'; 16 * 1024].iter()));
    check("body over max_body_bytes", &post(&m, "/token", "application/x-www-form-urlencoded", big), 413, "invalid_request", &secrets);

    // The valid request really is valid (so the refusals above are about what they change).
    let ok = post(&m, "/token", "application/x-www-form-urlencoded", form(&g));
    assert_eq!(ok.status, 200, "{}", ok.raw);
    assert_eq!(ok.cache, "no-store");
    assert_eq!(ok.body["token_type"], "Bearer");
    assert_eq!(ok.body["scope"], "payments:read");
    let no_scope = post(&m, "/token", "application/x-www-form-urlencoded", form(&without(&g, "scope")));
    assert_eq!(no_scope.status, 200, "{}", no_scope.raw);
    assert!(no_scope.body.get("scope").is_none(), "an empty scope is omitted: {}", no_scope.raw);
    let legacy = post(&m, "/token", "application/x-www-form-urlencoded", form(&without(&replaced(&g, "audience", "legacy-crm"), "scope")));
    assert_eq!(legacy.status, 200, "{}", legacy.raw);
    assert_eq!((legacy.body["token_type"].as_str(), legacy.body["issued_token_type"].as_str()), (Some("N_A"), Some(STATIC)));
}

/// Gap 8: 404 and 405 had empty bodies, 413 and an undecodable path were text/plain.
#[test]
fn http_layer_errors_are_json_too() {
    let m = minter();
    let a = answer(agent().get(m.url("/nope")).call());
    check("unknown path", &a, 404, "not_found", &[]);
    let a = answer(agent().post(m.url("/token/extra")).header("content-type", "application/x-www-form-urlencoded").send("a=b"));
    check("unknown path under /token", &a, 404, "not_found", &[]);
    let a = answer(agent().get(m.url("/token")).call());
    check("GET /token", &a, 405, "invalid_request", &[]);
    assert_eq!(a.allow.as_deref(), Some("POST"), "405 names the allowed method");
    let a = answer(agent().put(m.url("/token")).header("content-type", "application/x-www-form-urlencoded").send("a=b"));
    check("PUT /token", &a, 405, "invalid_request", &[]);
    let a = answer(agent().post(m.url("/.well-known/jwks.json")).send("x"));
    check("POST to the JWKS", &a, 405, "invalid_request", &[]);
    let a = answer(agent().post(m.url("/tasks/%FF%FE/end")).send(""));
    check("non-UTF-8 task id", &a, 400, "invalid_request", &[]);
    let a = post(&m, "/revoke", "application/json", vec![b' '; 9000]);
    check("oversize /revoke body", &a, 413, "invalid_request", &[]);
    let a = answer(agent().get(m.url("/revocations?since=abc")).call());
    assert!(a.content_type.starts_with("application/json") && a.status == 400, "{} {}", a.status, a.raw);
}
