//! The minter's request bodies: the token-exchange form, task and revocation bodies, and
//! Txn-Token claims.

use crate::input::{replace, with_svid_key};
use axum::http::{header, HeaderMap, HeaderValue};
use mandate_minter::auth::{Client, Roles};
use mandate_minter::config::MinterConfig;
use mandate_minter::server::{revoke_fields, revoke_request, AppState};
use mandate_minter::store::Kind;
use mandate_minter::{exchange, tasks, txn, values};
use serde_json::{json, Value};
use std::collections::HashSet;

pub const SUB: &str = "spiffe://example.org/agent/a";
pub const ACTOR: &str = "spiffe://example.org/sub/b";

struct Minter {
    state: AppState,
    // Dropped (and removed) with the state: the smoke cleans up after itself.
    _dir: tempfile::TempDir,
}

fn minter() -> Minter {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("temp dir for the minter: {e}"),
    };
    let bundle = with_svid_key(|k| json!({"keys": [k.svid_jwk()]}));
    let cfg = json!({
        "listen": "127.0.0.1:0",
        "issuer": "https://minter.fuzz",
        "state_dir": dir.path().join("state"),
        "workers": 1,
        "log_level": "off",
        "dev": true,
        "identity": {"audiences": ["mandate-minter"], "trust_domains": [{"name": "example.org", "bundle": {"inline": bundle}}]},
        "audiences": {"example.org": ["payments-api", "crm", "legacy-crm"]},
        "scopes": {"payments-api": ["payments:read", "payments:write"]},
        "tasks": {"require_registered": false},
        "ttl": {"default_s": 120, "max_s": 300}
    });
    let state = MinterConfig::from_json(cfg).and_then(AppState::new);
    match state {
        Ok(state) => Minter { state, _dir: dir },
        Err(e) => panic!("the fuzz minter does not start: {e:#}"),
    }
}

thread_local! {
    static MINTER: Minter = minter();
}

fn client() -> Client {
    Client { client_id: "fuzz-proxy".into(), roles: Roles::all(), audiences: None }
}

/// A form body; `@SVID` and `@ACTOR` stand for JWT-SVIDs signed here (agent and sub-agent).
///
/// Never a panic; a refusal is an RFC 6749 error (4xx or 5xx, an error code); an issued answer
/// carries a token for an audience the configuration allows.
pub fn minter_form(data: &[u8]) {
    let now = mandate_minter::now();
    let sign = |sub: &str| with_svid_key(|k| k.sign(&json!({"sub": sub, "aud": "mandate-minter", "iat": now - 5, "exp": now + 300})));
    let body = replace(&replace(data, b"@SVID", sign(SUB).as_bytes()), b"@ACTOR", sign(ACTOR).as_bytes());
    MINTER.with(|m| {
        match exchange::exchange(&m.state, &client(), &body, now) {
            Ok(x) => {
                assert!(x.body.get("access_token").and_then(Value::as_str).is_some_and(|t| !t.is_empty()), "issued without a token: {}", x.body);
                let allowed: HashSet<&str> = ["payments-api", "crm", "legacy-crm", "example.org"].into_iter().collect();
                assert!(allowed.contains(x.aud.as_str()), "issued for audience {:?}", x.aud);
            }
            Err(e) => {
                assert!(e.status.is_client_error() || e.status.is_server_error(), "refusal with status {}", e.status);
                assert!(!e.error.is_empty());
            }
        }
    });
}

fn headers(content_type: &'static str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h
}

/// Any bytes as a task-creation body, a revocation (JSON and form) and Txn-Token claims:
/// what is accepted is validated, and accepted claims round-trip.
pub fn minter_json(data: &[u8]) {
    MINTER.with(|m| {
        let st = &m.state;
        if let Ok(t) = tasks::parse_create(data, &st.config.tasks) {
            assert!((1..=tasks::MAX_SUBJECTS).contains(&t.subjects.len()), "{} subjects accepted", t.subjects.len());
            assert!(t.subjects.iter().all(|s| values::subject(s).is_ok()), "an invalid subject accepted");
            let distinct: HashSet<&String> = t.subjects.iter().collect();
            assert_eq!(distinct.len(), t.subjects.len(), "a subject listed twice");
            assert!(t.intents.len() <= tasks::MAX_INTENTS && t.intents.iter().all(|i| values::intent(i).is_ok()));
            assert!((1..=st.config.tasks.max_ttl_s).contains(&t.ttl_s), "ttl {} accepted", t.ttl_s);
        }
        for ct in ["application/json", "application/x-www-form-urlencoded", "text/plain"] {
            let fields = revoke_fields(&headers(ct), data);
            if ct == "text/plain" {
                assert!(fields.is_err(), "a revocation read from text/plain");
            }
            if let Ok(req) = fields.and_then(|f| revoke_request(st, &f)) {
                let ok = match req.kind {
                    Kind::Task => values::task(&req.value).is_ok() && req.subject.as_deref().is_none_or(|s| values::subject(s).is_ok()),
                    Kind::Jti => values::jti(&req.value).is_ok() && req.subject.is_none(),
                    Kind::Subject => values::subject(&req.value).is_ok() && req.subject.is_none(),
                };
                assert!(ok, "revocation accepted with invalid values: {:?} {:?}", req.value, req.subject);
            }
        }
    });
    if let Ok(v) = serde_json::from_slice::<Value>(data) {
        if let Ok(t) = txn::TxnToken::from_claims(&v) {
            let again = txn::TxnToken::from_claims(&t.to_claims());
            assert_eq!(again.as_ref(), Ok(&t), "Txn-Token claims do not round-trip");
        }
    }
}
