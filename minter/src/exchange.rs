//! RFC 8693 token exchange: parameter checks, subject/actor verification,
//! policy ceilings, and minting. Transaction Tokens (issuing them, and minting an
//! access token from one) live in `txn`; this module dispatches to it.

use crate::auth::Client;
use crate::config::{Role, GRANT_TOKEN_EXCHANGE, TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_JWT, TOKEN_TYPE_STATIC_SECRET, TOKEN_TYPE_TXN_TOKEN};
use crate::error::OAuthError;
use crate::server::AppState;
use crate::store::{IssuedRecord, Kind};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::Serialize;
use serde_json::Value;

/// Deepest accepted `act` nesting in an actor or subject token.
pub const MAX_ACT_DEPTH: usize = 8;

#[derive(Default)]
pub(crate) struct Params {
    pub grant_type: Option<String>,
    pub subject_token: Option<String>,
    pub subject_token_type: Option<String>,
    pub actor_token: Option<String>,
    pub actor_token_type: Option<String>,
    pub audiences: Vec<String>,
    pub resource: bool,
    pub scope: Option<String>,
    pub requested_token_type: Option<String>,
    pub task: Option<String>,
    pub intent: Option<String>,
    /// MCP: the tool the credential is for (mandate extension parameter; `tool` claim).
    pub tool: Option<String>,
    pub requested_ttl: Option<String>,
    /// Txn-Tokens: the SPIFFE ID that may exchange the issued token next (`may_act`).
    pub delegate: Option<String>,
    /// Txn-Tokens: JSON object narrowing the context (`resources`, `tools`, `arguments`).
    pub tctx: Option<String>,
}

fn set_once(slot: &mut Option<String>, name: &str, value: String) -> Result<(), OAuthError> {
    if slot.is_some() {
        return Err(OAuthError::invalid_request(format!("parameter `{name}` repeated")));
    }
    *slot = Some(value);
    Ok(())
}

fn parse_params(body: &[u8]) -> Result<Params, OAuthError> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_bytes(body).map_err(|_| OAuthError::invalid_request("malformed form body"))?;
    let mut p = Params::default();
    for (k, v) in pairs {
        match k.as_str() {
            "grant_type" => set_once(&mut p.grant_type, &k, v)?,
            "subject_token" => set_once(&mut p.subject_token, &k, v)?,
            "subject_token_type" => set_once(&mut p.subject_token_type, &k, v)?,
            "actor_token" => set_once(&mut p.actor_token, &k, v)?,
            "actor_token_type" => set_once(&mut p.actor_token_type, &k, v)?,
            "scope" => set_once(&mut p.scope, &k, v)?,
            "requested_token_type" => set_once(&mut p.requested_token_type, &k, v)?,
            "task" => set_once(&mut p.task, &k, v)?,
            "intent" => set_once(&mut p.intent, &k, v)?,
            "tool" => set_once(&mut p.tool, &k, v)?,
            "requested_ttl" => set_once(&mut p.requested_ttl, &k, v)?,
            "delegate" => set_once(&mut p.delegate, &k, v)?,
            "tctx" => set_once(&mut p.tctx, &k, v)?,
            "audience" => p.audiences.push(v),
            "resource" => p.resource = true,
            _ => {} // RFC 6749 §3.2: unrecognized parameters are ignored.
        }
    }
    Ok(p)
}

/// Values that end up in tokens, logs and the feed: one validation (`values`).
pub(crate) fn check(r: Result<(), crate::values::Invalid>) -> Result<(), OAuthError> {
    r.map_err(|e| OAuthError::invalid_request(e.0))
}

/// RFC 6749 §3.3 scope tokens, de-duplicated in order.
pub(crate) fn parse_scope(scope: Option<&str>) -> Result<Vec<String>, OAuthError> {
    let mut out: Vec<String> = Vec::new();
    for tok in scope.unwrap_or("").split(' ').filter(|t| !t.is_empty()) {
        if !tok.bytes().all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b)) {
            return Err(OAuthError::invalid_scope("malformed scope token"));
        }
        if !out.iter().any(|s| s == tok) {
            out.push(tok.to_string());
        }
    }
    Ok(out)
}

/// The claims of an already verified JWT.
fn claims_of(token: &str) -> Result<Value, OAuthError> {
    let payload = token.split('.').nth(1).ok_or_else(|| OAuthError::invalid_grant("malformed token"))?;
    let raw = URL_SAFE_NO_PAD.decode(payload).map_err(|_| OAuthError::invalid_grant("malformed token"))?;
    serde_json::from_slice(&raw).map_err(|_| OAuthError::invalid_grant("malformed token"))
}

/// `may_act.sub` of verified claims, if the claim is present (RFC 8693 §4.4).
fn may_act_sub(claims: &Value) -> Result<Option<String>, OAuthError> {
    match claims.get("may_act") {
        None => Ok(None),
        Some(m) => match m.get("sub").and_then(Value::as_str) {
            Some(sub) if m.is_object() && !sub.is_empty() => Ok(Some(sub.to_string())),
            _ => Err(OAuthError::invalid_grant("malformed `may_act` claim in the subject token")),
        },
    }
}

/// The `act` claim of verified claims, if any, and its depth (bounded).
fn act_claim(claims: &Value) -> Result<(Option<Value>, usize), OAuthError> {
    let Some(act) = claims.get("act") else { return Ok((None, 0)) };
    let mut depth = 0;
    let mut cur = act;
    loop {
        depth += 1;
        let sub_ok = cur.get("sub").is_some_and(Value::is_string);
        if !cur.is_object() || !sub_ok || depth > MAX_ACT_DEPTH {
            return Err(OAuthError::invalid_grant("malformed or too deeply nested `act` claim"));
        }
        match cur.get("act") {
            Some(next) => cur = next,
            None => break,
        }
    }
    Ok((Some(act.clone()), depth))
}

/// Claims of an issued token.
#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    iat: u64,
    nbf: u64,
    exp: u64,
    jti: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    intent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    task: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    act: Option<Value>,
    /// The transaction (`txn` of the Txn-Token the credential was minted from).
    #[serde(skip_serializing_if = "Option::is_none")]
    txn: Option<&'a str>,
    client_id: &'a str,
}

pub(crate) struct Verified {
    pub principal: String,
    /// Trust domain, or the OIDC issuer for principals without one.
    pub domain: String,
    pub exp: u64,
    pub hash: String,
}

/// Who an access token is for, once the subject (and actor) verified and every check on
/// them passed: from a JWT-SVID here, or from a Txn-Token (`txn`).
pub(crate) struct Subject {
    pub principal: String,
    /// Trust domain (or OIDC issuer) whose ceilings apply.
    pub domain: String,
    /// The issued token never outlives this (None: no cap).
    pub exp_cap: Option<u64>,
    pub act: Option<Value>,
    pub task: Option<String>,
    pub intent: Option<String>,
    /// The registered task's expiry, if any.
    pub task_expires_at: Option<u64>,
    pub txn: Option<String>,
    /// Short hash of the subject token, for logs.
    pub hash: String,
}

pub(crate) fn verify(st: &AppState, which: &str, token: &str, now: u64) -> Result<Verified, OAuthError> {
    st.identity
        .verify(token.as_bytes(), now, |id| Verified {
            principal: id.principal.clone(),
            domain: id.trust_domain.clone().or_else(|| id.issuer.clone()).unwrap_or_default(),
            exp: id.exp,
            hash: id.token_hash.clone(),
        })
        .map_err(|reason| OAuthError::invalid_grant(format!("{which} rejected: {}", reason.code())))
}

/// A successful exchange: the JSON body, plus what to log.
pub struct Exchanged {
    pub body: Value,
    pub sub: String,
    pub aud: String,
    pub jti: String,
    pub subject_hash: String,
    /// The issued token's record: the caller answers `body` only once it is committed
    /// (`Store::record_issued`).
    pub record: IssuedRecord,
}

pub fn exchange(st: &AppState, client: &Client, body: &[u8], now: u64) -> Result<Exchanged, OAuthError> {
    let p = parse_params(body)?;
    match p.grant_type.as_deref() {
        None => return Err(OAuthError::invalid_request("missing `grant_type`")),
        Some(GRANT_TOKEN_EXCHANGE) => {}
        Some(_) => return Err(OAuthError::unsupported_grant_type("only token exchange (RFC 8693) is supported")),
    }
    let subject_token = p.subject_token.as_deref().filter(|t| !t.is_empty()).ok_or_else(|| OAuthError::invalid_request("missing `subject_token`"))?;
    let subject_is_txn = match p.subject_token_type.as_deref() {
        Some(TOKEN_TYPE_JWT) => false,
        Some(TOKEN_TYPE_TXN_TOKEN) => true,
        None => return Err(OAuthError::invalid_request("missing `subject_token_type`")),
        Some(_) => return Err(OAuthError::invalid_request(format!("`subject_token_type` must be {TOKEN_TYPE_JWT} or {TOKEN_TYPE_TXN_TOKEN}"))),
    };
    if p.actor_token.is_some() != p.actor_token_type.is_some() {
        return Err(OAuthError::invalid_request("`actor_token` and `actor_token_type` go together"));
    }
    if p.actor_token_type.as_deref().is_some_and(|t| t != TOKEN_TYPE_JWT) {
        return Err(OAuthError::invalid_request(format!("`actor_token_type` must be {TOKEN_TYPE_JWT}")));
    }
    if p.resource {
        return Err(OAuthError::invalid_target("`resource` is not supported; name the destination with `audience`"));
    }
    if p.requested_token_type.as_deref() == Some(TOKEN_TYPE_TXN_TOKEN) {
        return crate::txn::issue(st, client, &p, subject_token, subject_is_txn, now);
    }
    // Never ignored: a caller who believes it narrowed a credential must learn that it did not.
    if p.delegate.is_some() || p.tctx.is_some() {
        return Err(OAuthError::invalid_request(format!("`delegate` and `tctx` apply only with `requested_token_type={TOKEN_TYPE_TXN_TOKEN}`")));
    }
    let audience = match p.audiences.as_slice() {
        [a] if !a.is_empty() => a.clone(),
        [] => return Err(OAuthError::invalid_request("missing `audience`")),
        _ => return Err(OAuthError::invalid_target("exactly one non-empty `audience` is supported")),
    };
    check(crate::values::audience(&audience))?;
    let legacy = st.config.is_legacy(&audience);
    // Roles: a static secret needs `mint_legacy`, a JWT `mint`.
    let role = if legacy { Role::MintLegacy } else { Role::Mint };
    if !client.roles.has(role) {
        return Err(OAuthError::unauthorized_client(format!("client lacks role `{}`", role.as_str())));
    }
    // RFC 8693 §2.1: a type that cannot be issued is refused, never silently replaced.
    match (p.requested_token_type.as_deref(), legacy) {
        (None, _) | (Some(TOKEN_TYPE_JWT | TOKEN_TYPE_ACCESS_TOKEN), false) | (Some(TOKEN_TYPE_STATIC_SECRET), true) => {}
        (Some(TOKEN_TYPE_JWT | TOKEN_TYPE_ACCESS_TOKEN), true) => {
            return Err(OAuthError::invalid_request(format!("this audience is served a static secret: `requested_token_type` must be {TOKEN_TYPE_STATIC_SECRET} or absent")))
        }
        (Some(_), _) => {
            return Err(OAuthError::invalid_request(format!(
                "`requested_token_type` must be {TOKEN_TYPE_JWT}, {TOKEN_TYPE_ACCESS_TOKEN}, {TOKEN_TYPE_TXN_TOKEN} or absent"
            )))
        }
    }
    let scopes = parse_scope(p.scope.as_deref())?;
    if let Some(t) = &p.task {
        check(crate::values::task(t))?;
    } else if st.config.require_task && !subject_is_txn {
        // A Txn-Token always names its task.
        return Err(OAuthError::invalid_request("missing `task`"));
    }
    if let Some(i) = &p.intent {
        check(crate::values::intent(i))?;
    }
    if let Some(t) = &p.tool {
        check(crate::values::tool(t))?;
    }
    let requested_ttl = parse_ttl(p.requested_ttl.as_deref())?;

    let subject = if subject_is_txn {
        crate::txn::subject_for_access_token(st, &p, subject_token, &scopes, now)?
    } else {
        plain_subject(st, &p, subject_token, now)?
    };

    // Ceilings: destinations per trust domain, per client, scopes per destination.
    let allowed = st.allowed_audiences.get(&subject.domain).is_some_and(|set| set.contains(&audience) || set.contains("*"));
    if !allowed {
        return Err(OAuthError::invalid_target(format!("audience not allowed for trust domain `{}`", subject.domain)));
    }
    if let Some(auds) = &client.audiences {
        if !auds.iter().any(|a| a == &audience || a == "*") {
            return Err(OAuthError::unauthorized_client("this client may not obtain tokens for the audience"));
        }
    }
    // An audience without a scope list allows no scope; `["*"]` allows any.
    let allowed_scopes = st.scopes.get(&audience);
    if !allowed_scopes.is_some_and(|set| set.contains("*")) {
        let denied: Vec<&str> =
            scopes.iter().filter(|s| !allowed_scopes.is_some_and(|set| set.contains(s.as_str()))).map(String::as_str).collect();
        if !denied.is_empty() {
            return Err(OAuthError::invalid_scope(format!("scope not allowed for the audience: {}", denied.join(" "))));
        }
    }

    let ttl_cfg = &st.config.ttl;
    let mut ttl = requested_ttl.unwrap_or(ttl_cfg.default_s).min(ttl_cfg.max_s);
    if let Some(cap) = subject.exp_cap {
        let left = cap.saturating_sub(now);
        if left == 0 {
            return Err(OAuthError::invalid_grant("subject_token expires now"));
        }
        ttl = ttl.min(left);
    }
    // Never past the task's expiry.
    if let Some(task_exp) = subject.task_expires_at {
        let left = task_exp.saturating_sub(now);
        if left == 0 {
            return Err(OAuthError::refused("task_expired", "task expired"));
        }
        ttl = ttl.min(left);
    }
    let exp = now + ttl;
    let scope_str = scopes.join(" ");
    let jti = random_id();
    let Subject { principal, act, task, intent, txn, hash, .. } = subject;

    let body = if legacy {
        let secrets = st.legacy_secrets();
        let secret = secrets
            .secrets
            .get(&audience)
            .ok_or_else(|| OAuthError::invalid_target("no credential is configured for this legacy audience"))?;
        // RFC 6749 §7.1 / RFC 8693 §2.2.1: a static secret is not an OAuth access token, so
        // `token_type` is `N_A`; where and how to send it are mandate extension members.
        let mut body = serde_json::json!({
            "access_token": secret.secret,
            "issued_token_type": TOKEN_TYPE_STATIC_SECRET,
            "token_type": "N_A",
            "expires_in": ttl,
            "mandate_header": secret.header,
        });
        if let (Some(o), Some(scheme)) = (body.as_object_mut(), secret.scheme.as_ref().filter(|s| !s.is_empty())) {
            o.insert("mandate_scheme".into(), Value::String(scheme.clone()));
        }
        body
    } else {
        let claims = Claims {
            iss: &st.config.issuer,
            sub: &principal,
            aud: &audience,
            iat: now,
            nbf: now,
            exp,
            jti: &jti,
            scope: (!scope_str.is_empty()).then_some(scope_str.as_str()),
            intent: intent.as_deref(),
            task: task.as_deref(),
            tool: p.tool.as_deref(),
            act,
            txn: txn.as_deref(),
            client_id: &client.client_id,
        };
        let token = st.current_keys().sign_jwt(&claims).map_err(|_| OAuthError::server_error("signing failed"))?;
        let mut body = serde_json::json!({
            "access_token": token,
            "issued_token_type": TOKEN_TYPE_JWT,
            "token_type": "Bearer",
            "expires_in": ttl,
        });
        if let Some(o) = body.as_object_mut().filter(|_| !scope_str.is_empty()) {
            o.insert("scope".into(), Value::String(scope_str.clone()));
        }
        body
    };

    let record = IssuedRecord {
        jti: jti.clone(),
        sub: principal.clone(),
        task,
        aud: audience.clone(),
        client_id: client.client_id.clone(),
        iat: now,
        exp,
    };
    Ok(Exchanged { body, sub: principal, aud: audience, jti, subject_hash: hash, record })
}

/// `requested_ttl`: absent, or a positive number of seconds.
pub(crate) fn parse_ttl(v: Option<&str>) -> Result<Option<u64>, OAuthError> {
    match v {
        None => Ok(None),
        Some(s) => match s.parse::<u64>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(OAuthError::invalid_request("`requested_ttl` must be a positive integer (seconds)")),
        },
    }
}

/// The subject of an exchange whose subject token is a JWT-SVID (or OIDC token): verified,
/// with its actor, delegation chain, revocations and task checked.
fn plain_subject(st: &AppState, p: &Params, subject_token: &str, now: u64) -> Result<Subject, OAuthError> {
    // The minter verifies the subject itself: it is never an open token oracle. Claims are
    // read from a token only after it verified.
    let subject = verify(st, "subject_token", subject_token, now)?;
    let subject_claims = claims_of(subject_token)?;
    let (subject_act, subject_depth) = act_claim(&subject_claims)?;
    let may_act = may_act_sub(&subject_claims)?;
    let actor = match &p.actor_token {
        Some(a) => Some(verify(st, "actor_token", a, now)?),
        None => None,
    };
    // RFC 8693 §4.4: when the subject names who may act for it, no one else may.
    if let (Some(allowed), Some(a)) = (&may_act, &actor) {
        if *allowed != a.principal {
            return Err(OAuthError::invalid_grant("the actor is not the one the subject token's `may_act` names"));
        }
    }
    // RFC 8693 §4.1: the new actor goes in front of the subject's delegation chain, which is
    // kept whole (the actor token's own history is not the subject's and is not copied).
    let act = match &actor {
        Some(a) => {
            if subject_depth >= MAX_ACT_DEPTH {
                return Err(OAuthError::invalid_grant("delegation chain too deep"));
            }
            let mut o = serde_json::Map::new();
            o.insert("sub".into(), Value::String(a.principal.clone()));
            if let Some(prev) = subject_act {
                o.insert("act".into(), prev);
            }
            Some(Value::Object(o))
        }
        None => subject_act,
    };

    if st.store.is_revoked(Kind::Subject, &subject.principal) {
        return Err(OAuthError::refused("subject_revoked", "subject revoked"));
    }
    if let Some(a) = &actor {
        if st.store.is_revoked(Kind::Subject, &a.principal) {
            return Err(OAuthError::refused("actor_revoked", "actor revoked"));
        }
    }
    // Registered tasks: active, bound to this subject, the intent listed;
    // ad-hoc names only when the configuration allows them.
    let task_expires_at = match &p.task {
        Some(t) => crate::tasks::check_for_token(st, t, &subject.principal, p.intent.as_deref(), now)?,
        None => None,
    };

    let exp_cap = st.config.ttl.cap_to_subject_exp.then(|| match &actor {
        Some(a) => subject.exp.min(a.exp),
        None => subject.exp,
    });
    Ok(Subject {
        principal: subject.principal,
        domain: subject.domain,
        exp_cap,
        act,
        task: p.task.clone(),
        intent: p.intent.clone(),
        task_expires_at,
        txn: None,
        hash: subject.hash,
    })
}

/// 128 random bits, base64url.
pub fn random_id() -> String {
    let mut b = [0u8; 16];
    if getrandom::getrandom(&mut b).is_err() {
        // getrandom failing means no entropy source: never issue a guessable id.
        b = fallback_random();
    }
    URL_SAFE_NO_PAD.encode(b)
}

fn fallback_random() -> [u8; 16] {
    use sha2::{Digest, Sha256};
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let c = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = Sha256::digest(format!("{t}:{c}:{:p}", &c).as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(d.get(..16).unwrap_or(&[0u8; 16]));
    out
}

static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_checked_and_deduplicated() {
        assert_eq!(parse_scope(Some("a b  a")).ok(), Some(vec!["a".to_string(), "b".to_string()]));
        assert!(parse_scope(Some("a \"b")).is_err());
        assert_eq!(parse_scope(None).ok(), Some(vec![]));
    }

    #[test]
    fn repeated_parameters_are_refused() {
        let e = parse_params(b"grant_type=a&grant_type=b").err().map(|e| e.error);
        assert_eq!(e, Some("invalid_request"));
        let p = parse_params(b"audience=a&audience=b&foo=bar").ok().map(|p| p.audiences.len());
        assert_eq!(p, Some(2));
    }

    #[test]
    fn tool_parameter_is_read_once_and_validated_like_an_intent() {
        let p = parse_params(b"tool=get_ticket").ok().and_then(|p| p.tool);
        assert_eq!(p.as_deref(), Some("get_ticket"));
        let e = parse_params(b"tool=get_ticket&tool=delete_customer").err().map(|e| e.error);
        assert_eq!(e, Some("invalid_request"), "a second tool cannot widen the credential");
        assert!(crate::values::tool("get_ticket").is_ok());
        for bad in ["", "a b", "caf\u{e9}", &"x".repeat(129), "a\nb"] {
            assert!(crate::values::tool(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn act_nesting() {
        let claims = serde_json::json!({"sub": "x", "act": {"sub": "a", "act": {"sub": "b"}}});
        let tok = format!("e30.{}.sig", URL_SAFE_NO_PAD.encode(claims.to_string()));
        let act = claims_of(&tok).and_then(|c| act_claim(&c)).ok();
        assert_eq!(act, Some((Some(serde_json::json!({"sub": "a", "act": {"sub": "b"}})), 2)));
        let mut deep = serde_json::json!({"sub": "z"});
        for _ in 0..MAX_ACT_DEPTH {
            deep = serde_json::json!({"sub": "y", "act": deep});
        }
        assert!(act_claim(&serde_json::json!({"act": deep})).is_err());
    }

    #[test]
    fn malformed_may_act_is_refused() {
        assert_eq!(may_act_sub(&serde_json::json!({})).ok(), Some(None));
        assert_eq!(may_act_sub(&serde_json::json!({"may_act": {"sub": "a"}})).ok(), Some(Some("a".to_string())));
        for bad in [serde_json::json!("a"), serde_json::json!({}), serde_json::json!({"sub": 1}), serde_json::json!({"sub": ""})] {
            assert!(may_act_sub(&serde_json::json!({"may_act": bad})).is_err(), "{bad}");
        }
    }

    #[test]
    fn ids_are_random() {
        assert_ne!(random_id(), random_id());
        assert_eq!(random_id().len(), 22);
    }
}
