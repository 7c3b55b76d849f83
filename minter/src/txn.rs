//! Transaction Tokens (issue 13): the mandate profile of RFC 8693 delegation.
//!
//! Three exchanges at `POST /token` (`docs/delegation.md` has the wire format):
//! - **root**: a workload's JWT-SVID → a Txn-Token naming it as `sub`, with the task, intent,
//!   scope and optional narrowing (`tctx`) and next actor (`delegate` → `may_act`);
//! - **replacement**: a Txn-Token + the next actor's JWT-SVID → a Txn-Token with the actor put
//!   in front of the chain (`act`). Rights only narrow: scope and `tctx` lists become subsets,
//!   `arguments` constraints are kept verbatim, `exp` never moves later (a `requested_ttl` that
//!   would end later is refused, not capped), the chain never loops and stays within
//!   `txn_tokens.max_delegations`;
//! - **access token**: a Txn-Token + the current actor's JWT-SVID → the usual access token
//!   (`exchange`), with `sub` = the original principal, `act` = the token's chain, and `txn`.
//!
//! A Txn-Token is verified here, against the minter's own published keys (the current one and
//! any retired key still in the JWKS), with its `typ`, `iss`, `aud`, `exp` and every claim's
//! shape checked strictly. Every principal in a chain is checked against subject revocations,
//! and the task (bound to the original `sub`) against the registered-task rules, at every hop.

use crate::auth::Client;
use crate::config::{Role, TOKEN_TYPE_TXN_TOKEN};
use crate::error::OAuthError;
use crate::exchange::{check, parse_scope, parse_ttl, random_id, verify, Exchanged, Params, Subject};
use crate::server::AppState;
use crate::store::{IssuedRecord, Kind};
use crate::values;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use mandate_core::identity::spiffe_id::SpiffeId;
use serde_json::{Map, Value};

/// JOSE `typ` of a Txn-Token.
pub const TXN_TYP: &str = "txntoken+jwt";
/// Largest Txn-Token issued or accepted, bytes.
pub const MAX_TXN_TOKEN_BYTES: usize = 8192;
/// Most scope tokens in a Txn-Token; each is 1-128 characters.
pub const MAX_SCOPES: usize = 32;
pub const MAX_SCOPE_TOKEN: usize = 128;
/// Most entries in `tctx.resources` and in `tctx.tools`.
pub const MAX_LIST: usize = 32;
/// Most entries in `tctx.arguments`.
pub const MAX_ARGUMENTS: usize = 16;
/// Longest `equals` string of an `arguments` entry, bytes (pointers: `values::MAX_POINTER`).
pub const MAX_EQUALS: usize = 256;

/// `mandate_reason` codes of delegation refusals.
pub const ACTOR_MISMATCH: &str = "delegation_actor_mismatch";
pub const LOOP: &str = "delegation_loop";
pub const TOO_DEEP: &str = "delegation_chain_too_deep";
pub const SCOPE_EXCEEDED: &str = "delegation_scope_exceeded";
pub const TOKEN_INVALID: &str = "delegation_token_invalid";

/// The immutable context (`tctx`).
#[derive(Debug, Clone, PartialEq)]
pub struct Tctx {
    pub task: String,
    pub intent: String,
    /// Resource names the token may be used for (None: no constraint beyond the intent).
    pub resources: Option<Vec<String>>,
    /// MCP tool names (None: no constraint beyond the intent).
    pub tools: Option<Vec<String>>,
    /// Argument constraints, each a validated object (None: none).
    pub arguments: Option<Vec<Value>>,
}

/// A verified (or about to be signed) Txn-Token.
#[derive(Debug, Clone, PartialEq)]
pub struct TxnToken {
    pub iss: String,
    pub aud: String,
    pub iat: u64,
    pub exp: u64,
    pub jti: String,
    pub txn: String,
    /// The original principal.
    pub sub: String,
    pub scope: Vec<String>,
    pub req_wl: String,
    pub tctx: Tctx,
    /// The actors, current (outermost `act.sub`) first; empty for a root token.
    pub chain: Vec<String>,
    pub may_act: Option<String>,
}

impl TxnToken {
    /// The current actor: the outermost `act.sub`, else `sub`.
    pub fn current_actor(&self) -> &str {
        self.chain.first().map_or(self.sub.as_str(), String::as_str)
    }

    /// `sub`, then every actor (current first).
    pub fn principals(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.sub.as_str()).chain(self.chain.iter().map(String::as_str))
    }

    /// The nested RFC 8693 `act` claim (current actor outermost), if any.
    pub fn act_claim(&self) -> Option<Value> {
        self.chain.iter().rev().fold(None, |inner, sub| {
            let mut o = Map::new();
            o.insert("sub".into(), Value::String(sub.clone()));
            if let Some(i) = inner {
                o.insert("act".into(), i);
            }
            Some(Value::Object(o))
        })
    }

    pub fn to_claims(&self) -> Value {
        let mut tctx = Map::new();
        tctx.insert("task".into(), self.tctx.task.clone().into());
        tctx.insert("intent".into(), self.tctx.intent.clone().into());
        if let Some(r) = &self.tctx.resources {
            tctx.insert("resources".into(), r.clone().into());
        }
        if let Some(t) = &self.tctx.tools {
            tctx.insert("tools".into(), t.clone().into());
        }
        if let Some(a) = &self.tctx.arguments {
            tctx.insert("arguments".into(), Value::Array(a.clone()));
        }
        let mut o = Map::new();
        o.insert("iss".into(), self.iss.clone().into());
        o.insert("aud".into(), self.aud.clone().into());
        o.insert("iat".into(), self.iat.into());
        o.insert("exp".into(), self.exp.into());
        o.insert("jti".into(), self.jti.clone().into());
        o.insert("txn".into(), self.txn.clone().into());
        o.insert("sub".into(), self.sub.clone().into());
        o.insert("scope".into(), self.scope.join(" ").into());
        o.insert("req_wl".into(), self.req_wl.clone().into());
        o.insert("tctx".into(), Value::Object(tctx));
        if let Some(act) = self.act_claim() {
            o.insert("act".into(), act);
        }
        if let Some(m) = &self.may_act {
            let mut may = Map::new();
            may.insert("sub".into(), m.clone().into());
            o.insert("may_act".into(), Value::Object(may));
        }
        Value::Object(o)
    }

    /// Parses claims strictly: every member known and well-formed. (Time, issuer and audience
    /// are checked by [`verify_token`].)
    pub fn from_claims(v: &Value) -> Result<TxnToken, &'static str> {
        let o = v.as_object().ok_or("claims are not an object")?;
        const KNOWN: [&str; 12] = ["iss", "aud", "iat", "exp", "jti", "txn", "sub", "scope", "req_wl", "tctx", "act", "may_act"];
        if o.keys().any(|k| !KNOWN.contains(&k.as_str())) {
            return Err("unknown claim");
        }
        let string = |k: &str| o.get(k).and_then(Value::as_str).ok_or("missing or non-string claim");
        let int = |k: &str| o.get(k).and_then(Value::as_u64).ok_or("`iat`/`exp` must be integers");
        let iss = string("iss")?;
        if iss.is_empty() {
            return Err("empty `iss`");
        }
        let aud = string("aud")?;
        values::audience(aud).map_err(|_| "malformed `aud`")?;
        let (jti, txn) = (string("jti")?, string("txn")?);
        if values::jti(jti).is_err() || values::jti(txn).is_err() {
            return Err("`jti` and `txn` must be base64url");
        }
        let sub = string("sub")?;
        let req_wl = string("req_wl")?;
        if !spiffe_ok(sub) || !spiffe_ok(req_wl) {
            return Err("`sub` and `req_wl` must be SPIFFE IDs");
        }
        let scope = token_scope(string("scope")?)?;
        let tctx = o.get("tctx").ok_or("missing `tctx`")?;
        let m = members(tctx.as_object().ok_or("`tctx` must be an object")?, true)?;
        let (Some(task), Some(intent)) = (m.task, m.intent) else { return Err("`tctx` needs `task` and `intent`") };
        let chain = match o.get("act") {
            None => Vec::new(),
            Some(a) => parse_act(a)?,
        };
        let may_act = match o.get("may_act") {
            None => None,
            Some(m) => {
                let mo = m.as_object().filter(|mo| mo.len() == 1).ok_or("`may_act` must be {\"sub\": <SPIFFE ID>}")?;
                let s = mo.get("sub").and_then(Value::as_str).filter(|s| spiffe_ok(s)).ok_or("`may_act` must be {\"sub\": <SPIFFE ID>}")?;
                Some(s.to_string())
            }
        };
        Ok(TxnToken {
            iss: iss.to_string(),
            aud: aud.to_string(),
            iat: int("iat")?,
            exp: int("exp")?,
            jti: jti.to_string(),
            txn: txn.to_string(),
            sub: sub.to_string(),
            scope,
            req_wl: req_wl.to_string(),
            tctx: Tctx { task, intent, resources: m.resources, tools: m.tools, arguments: m.arguments },
            chain,
            may_act,
        })
    }
}

fn spiffe_ok(s: &str) -> bool {
    values::spiffe_id(s).is_ok()
}

/// A scope token: RFC 6749 §3.3 characters, 1-128 of them.
fn scope_token_ok(t: &str) -> bool {
    (1..=MAX_SCOPE_TOKEN).contains(&t.len()) && t.bytes().all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
}

/// The `scope` claim: 1-32 distinct tokens separated by single spaces.
fn token_scope(s: &str) -> Result<Vec<String>, &'static str> {
    let mut out: Vec<String> = Vec::new();
    for t in s.split(' ') {
        if !scope_token_ok(t) || out.iter().any(|x| x == t) {
            return Err("malformed `scope`");
        }
        out.push(t.to_string());
    }
    if out.len() > MAX_SCOPES {
        return Err("too many scopes");
    }
    Ok(out)
}

/// The `act` chain, current actor first. Each level is exactly `{"sub": <SPIFFE ID>}` plus an
/// optional nested `act`.
fn parse_act(v: &Value) -> Result<Vec<String>, &'static str> {
    let mut out = Vec::new();
    let mut cur = v;
    loop {
        let o = cur.as_object().ok_or("`act` must be an object")?;
        if o.keys().any(|k| k != "sub" && k != "act") {
            return Err("an `act` level holds a member other than `sub` and `act`");
        }
        let sub = o.get("sub").and_then(Value::as_str).filter(|s| spiffe_ok(s)).ok_or("each `act` level needs `sub`, a SPIFFE ID")?;
        out.push(sub.to_string());
        if out.len() > crate::config::MAX_DELEGATIONS_LIMIT {
            return Err("`act` nested too deeply");
        }
        match o.get("act") {
            Some(next) => cur = next,
            None => return Ok(out),
        }
    }
}

/// `tctx` members, as found in a token (`context`: task and intent allowed) or in the `tctx`
/// parameter (only the narrowing members).
#[derive(Default)]
struct Members {
    task: Option<String>,
    intent: Option<String>,
    resources: Option<Vec<String>>,
    tools: Option<Vec<String>>,
    arguments: Option<Vec<Value>>,
}

fn members(o: &Map<String, Value>, context: bool) -> Result<Members, &'static str> {
    let mut m = Members::default();
    for (k, v) in o {
        match k.as_str() {
            "task" if context => m.task = Some(v.as_str().filter(|s| values::task(s).is_ok()).ok_or("malformed `tctx.task`")?.to_string()),
            "intent" if context => m.intent = Some(v.as_str().filter(|s| values::intent(s).is_ok()).ok_or("malformed `tctx.intent`")?.to_string()),
            "resources" => m.resources = Some(string_list(v, |s| values::resource_name(s).is_ok()).map_err(|_| "`tctx.resources` must be 0-32 distinct resource names ([a-z0-9._-]{1,128})")?),
            "tools" => m.tools = Some(string_list(v, |s| values::tool(s).is_ok()).map_err(|_| "`tctx.tools` must be 0-32 distinct tool names (1-128 visible ASCII)")?),
            "arguments" => {
                let list = v.as_array().filter(|a| a.len() <= MAX_ARGUMENTS).ok_or("`tctx.arguments` must be an array of at most 16 constraints")?;
                let mut out = Vec::with_capacity(list.len());
                for a in list {
                    let a = argument(a)?;
                    if out.contains(&a) {
                        return Err("`tctx.arguments` lists a constraint twice");
                    }
                    out.push(a);
                }
                m.arguments = Some(out);
            }
            _ if context => return Err("unknown `tctx` member"),
            _ => return Err("the `tctx` parameter may only hold `resources`, `tools` and `arguments`"),
        }
    }
    Ok(m)
}

fn string_list(v: &Value, ok: impl Fn(&str) -> bool) -> Result<Vec<String>, ()> {
    let arr = v.as_array().filter(|a| a.len() <= MAX_LIST).ok_or(())?;
    let mut out: Vec<String> = Vec::with_capacity(arr.len());
    for e in arr {
        let s = e.as_str().filter(|s| ok(s)).ok_or(())?;
        if out.iter().any(|x| x == s) {
            return Err(());
        }
        out.push(s.to_string());
    }
    Ok(out)
}

/// One `arguments` constraint: `{"tool"?, "pointer", "max"?, "min"?, "equals"?}`: either
/// `equals` or at least one of `max`, `min` (`min` ≤ `max`).
fn argument(v: &Value) -> Result<Value, &'static str> {
    const SHAPE: &str = "each `tctx.arguments` entry must be {\"tool\"?, \"pointer\", \"max\"?, \"min\"?, \"equals\"?} with at least one condition";
    let o = v.as_object().ok_or(SHAPE)?;
    let mut conditions = 0;
    for (k, val) in o {
        let ok = match k.as_str() {
            "tool" => val.as_str().is_some_and(|t| values::tool(t).is_ok()),
            "pointer" => val.as_str().is_some_and(|p| values::json_pointer(p).is_ok()),
            "max" | "min" => {
                conditions += 1;
                val.is_number()
            }
            "equals" => {
                conditions += 1;
                match val {
                    Value::String(s) => s.len() <= MAX_EQUALS && !s.chars().any(char::is_control),
                    Value::Number(_) | Value::Bool(_) => true,
                    _ => false,
                }
            }
            _ => false,
        };
        if !ok {
            return Err(SHAPE);
        }
    }
    if !o.contains_key("pointer") || conditions == 0 {
        return Err(SHAPE);
    }
    // The proxies read an entry as either an equality or a range, never both (the profile).
    if o.contains_key("equals") && (o.contains_key("min") || o.contains_key("max")) {
        return Err("a `tctx.arguments` entry is either `equals` or a `min`/`max` range, not both");
    }
    if let (Some(min), Some(max)) = (o.get("min").and_then(Value::as_f64), o.get("max").and_then(Value::as_f64)) {
        if min > max {
            return Err("a `tctx.arguments` entry has `min` greater than `max`");
        }
    }
    Ok(v.clone())
}

/// The `tctx` request parameter: a JSON object with only `resources`, `tools`, `arguments`.
fn tctx_param(raw: &str) -> Result<Members, OAuthError> {
    let v: Value = serde_json::from_str(raw).map_err(|_| OAuthError::invalid_request("`tctx` must be a JSON object"))?;
    let o = v.as_object().ok_or_else(|| OAuthError::invalid_request("`tctx` must be a JSON object"))?;
    members(o, false).map_err(OAuthError::invalid_request)
}

/// `aud` of the Txn-Tokens of `sub`: the configured one, else `sub`'s trust domain.
fn audience_for(st: &AppState, sub: &str) -> Result<String, OAuthError> {
    if let Some(a) = &st.config.txn_tokens.audience {
        return Ok(a.clone());
    }
    SpiffeId::parse(sub)
        .map(|id| id.trust_domain().to_string())
        .map_err(|_| OAuthError::invalid_grant("Txn-Tokens are issued for SPIFFE principals only"))
}

fn invalid(why: &str) -> OAuthError {
    OAuthError::refused(TOKEN_INVALID, format!("subject_token rejected: {why}"))
}

/// Verifies a Txn-Token issued by this minter: size, JOSE header (`alg` ES256, `typ`
/// `txntoken+jwt`, a published `kid`, nothing else), signature, claim shapes, `iss`, `aud`,
/// `exp` and `iat`, `req_wl` = the current actor, and that its `jti` is not revoked.
/// Refusals: `invalid_grant` with `mandate_reason` `delegation_token_invalid`.
pub fn verify_token(st: &AppState, token: &str, now: u64) -> Result<TxnToken, OAuthError> {
    if token.len() > MAX_TXN_TOKEN_BYTES {
        return Err(invalid("too_large"));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(invalid("malformed"));
    };
    let json = |part: &str| -> Option<Value> { serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).ok()?).ok() };
    let header = json(h).ok_or_else(|| invalid("malformed"))?;
    let header = header.as_object().ok_or_else(|| invalid("malformed"))?;
    if header.keys().any(|k| !["alg", "typ", "kid"].contains(&k.as_str())) {
        return Err(invalid("header_invalid"));
    }
    if header.get("alg").and_then(Value::as_str) != Some("ES256") {
        return Err(invalid("alg_invalid"));
    }
    if header.get("typ").and_then(Value::as_str) != Some(TXN_TYP) {
        return Err(invalid("typ_invalid"));
    }
    let kid = header.get("kid").and_then(Value::as_str).ok_or_else(|| invalid("kid_unknown"))?;
    let keys = st.current_keys();
    if !keys.kids.iter().any(|k| k == kid) {
        return Err(invalid("kid_unknown"));
    }
    let sig = URL_SAFE_NO_PAD.decode(s).map_err(|_| invalid("malformed"))?;
    let signing_input = token.get(..h.len() + 1 + p.len()).ok_or_else(|| invalid("malformed"))?;
    if !keys.verify_es256(kid, signing_input.as_bytes(), &sig) {
        return Err(invalid("signature_invalid"));
    }
    let claims = json(p).ok_or_else(|| invalid("malformed"))?;
    let t = TxnToken::from_claims(&claims).map_err(|why| invalid(&format!("claims_invalid ({why})")))?;
    if t.iss != st.config.issuer {
        return Err(invalid("issuer_mismatch"));
    }
    if audience_for(st, &t.sub).ok().as_deref() != Some(t.aud.as_str()) {
        return Err(invalid("audience_mismatch"));
    }
    if t.exp <= now {
        return Err(invalid("token_expired"));
    }
    let skew = st.config.identity().map_or(60, |i| i.clock_skew_s);
    if t.iat > now.saturating_add(skew) || t.iat >= t.exp {
        return Err(invalid("iat_invalid"));
    }
    if t.req_wl != t.current_actor() {
        return Err(invalid("claims_invalid (`req_wl` is not the current actor)"));
    }
    if st.store.is_revoked(Kind::Jti, &t.jti) {
        return Err(invalid("revoked"));
    }
    Ok(t)
}

/// The chain of a verified token: no principal twice, no deeper than the cap.
fn check_chain(st: &AppState, t: &TxnToken) -> Result<(), OAuthError> {
    let all: Vec<&str> = t.principals().collect();
    if all.iter().enumerate().any(|(i, p)| all.iter().skip(i + 1).any(|q| q == p)) {
        return Err(OAuthError::refused(LOOP, "a principal appears twice in the delegation chain"));
    }
    if t.chain.len() > st.config.txn_tokens.max_delegations {
        return Err(OAuthError::refused(TOO_DEEP, "delegation chain too deep"));
    }
    Ok(())
}

/// Revocations and the task, for every principal in the chain (and `extra`, the new actor):
/// any subject revoked → `subject_revoked`; the task ended for any of them → `task_ended`;
/// then the registered-task checks against the original `sub`. Returns the task's expiry.
fn check_revocations_and_task(st: &AppState, t: &TxnToken, extra: Option<&str>, now: u64) -> Result<Option<u64>, OAuthError> {
    for who in t.principals().chain(extra) {
        if st.store.is_revoked(Kind::Subject, who) {
            return Err(OAuthError::refused("subject_revoked", "subject revoked"));
        }
    }
    let task_expires_at = crate::tasks::check_for_token(st, &t.tctx.task, &t.sub, Some(&t.tctx.intent), now)?;
    for who in t.chain.iter().map(String::as_str).chain(extra) {
        if st.store.task_revoked_for(&t.tctx.task, who) {
            return Err(OAuthError::refused("task_ended", "task ended"));
        }
    }
    Ok(task_expires_at)
}

/// `task`/`intent` parameters, when given, must be the token's.
fn check_context_params(p: &Params, t: &TxnToken) -> Result<(), OAuthError> {
    if p.task.as_deref().is_some_and(|x| x != t.tctx.task) || p.intent.as_deref().is_some_and(|x| x != t.tctx.intent) {
        return Err(OAuthError::refused(SCOPE_EXCEEDED, "`task` and `intent` must be the Txn-Token's"));
    }
    Ok(())
}

/// `POST /token` with `requested_token_type=…:txn_token`: a root token (subject = JWT-SVID) or
/// a replacement (subject = Txn-Token). Needs the role `txn`.
pub(crate) fn issue(st: &AppState, client: &Client, p: &Params, subject_token: &str, subject_is_txn: bool, now: u64) -> Result<Exchanged, OAuthError> {
    if !client.roles.has(Role::Txn) {
        return Err(OAuthError::unauthorized_client("client lacks role `txn`"));
    }
    if p.tool.is_some() {
        return Err(OAuthError::invalid_request("`tool` does not apply to a Txn-Token: narrow it with `tctx.tools`"));
    }
    let audience = match p.audiences.as_slice() {
        [] => None,
        [a] => Some(a.as_str()),
        _ => return Err(OAuthError::invalid_target("at most one `audience` is supported")),
    };
    if let Some(t) = &p.task {
        check(values::task(t))?;
    }
    if let Some(i) = &p.intent {
        check(values::intent(i))?;
    }
    let requested_ttl = parse_ttl(p.requested_ttl.as_deref())?;
    let scopes = match &p.scope {
        None => None,
        Some(s) => {
            let list = parse_scope(Some(s))?;
            if list.is_empty() {
                return Err(OAuthError::invalid_scope("a Txn-Token needs at least one scope"));
            }
            if list.len() > MAX_SCOPES || list.iter().any(|t| t.len() > MAX_SCOPE_TOKEN) {
                return Err(OAuthError::invalid_scope(format!("a Txn-Token holds at most {MAX_SCOPES} scopes of at most {MAX_SCOPE_TOKEN} characters")));
            }
            Some(list)
        }
    };
    let narrowing = p.tctx.as_deref().map(tctx_param).transpose()?.unwrap_or_default();
    if let Some(d) = &p.delegate {
        if !spiffe_ok(d) {
            return Err(OAuthError::invalid_request("`delegate` must be a SPIFFE ID"));
        }
    }
    let draft = if subject_is_txn {
        replacement(st, p, subject_token, scopes, narrowing, requested_ttl, now)?
    } else {
        root(st, p, subject_token, scopes, narrowing, requested_ttl, now)?
    };
    let (mut token, subject_hash) = draft;
    if audience.is_some_and(|a| a != token.aud) {
        return Err(OAuthError::invalid_target(format!("the `audience` of a Txn-Token is `{}` (or leave it out)", token.aud)));
    }
    if let Some(d) = &p.delegate {
        if token.principals().any(|x| x == d) {
            return Err(OAuthError::refused(LOOP, "`delegate` is already in the delegation chain"));
        }
    }
    token.may_act = p.delegate.clone();
    token.iss = st.config.issuer.clone();
    token.iat = now;
    token.jti = random_id();
    let jwt = st.current_keys().sign_typed(&token.to_claims(), TXN_TYP).map_err(|_| OAuthError::server_error("signing failed"))?;
    if jwt.len() > MAX_TXN_TOKEN_BYTES {
        return Err(OAuthError::invalid_request(format!("the Txn-Token would exceed {MAX_TXN_TOKEN_BYTES} bytes: narrow `tctx`")));
    }
    let record = IssuedRecord {
        jti: token.jti.clone(),
        sub: token.sub.clone(),
        task: Some(token.tctx.task.clone()),
        aud: token.aud.clone(),
        client_id: client.client_id.clone(),
        iat: now,
        exp: token.exp,
    };
    let body = serde_json::json!({
        "access_token": jwt,
        "issued_token_type": TOKEN_TYPE_TXN_TOKEN,
        "token_type": "N_A",
        "expires_in": token.exp.saturating_sub(now),
        "scope": token.scope.join(" "),
    });
    Ok(Exchanged { body, sub: token.sub, aud: token.aud, jti: token.jti, subject_hash, record })
}

/// A root Txn-Token for the subject's own JWT-SVID (no `act`).
fn root(
    st: &AppState,
    p: &Params,
    subject_token: &str,
    scopes: Option<Vec<String>>,
    narrowing: Members,
    requested_ttl: Option<u64>,
    now: u64,
) -> Result<(TxnToken, String), OAuthError> {
    if p.actor_token.is_some() {
        return Err(OAuthError::invalid_request("a root Txn-Token takes no `actor_token`: its subject is the actor"));
    }
    let task = p.task.clone().ok_or_else(|| OAuthError::invalid_request("missing `task`: a Txn-Token names its task"))?;
    let intent = p.intent.clone().ok_or_else(|| OAuthError::invalid_request("missing `intent`: a Txn-Token names its intent"))?;
    let scope = scopes.ok_or_else(|| OAuthError::invalid_scope("a Txn-Token needs at least one scope"))?;
    let subject = verify(st, "subject_token", subject_token, now)?;
    if !spiffe_ok(&subject.principal) {
        return Err(OAuthError::invalid_grant("Txn-Tokens are issued for SPIFFE principals only"));
    }
    let aud = audience_for(st, &subject.principal)?;
    let draft = TxnToken {
        iss: String::new(),
        aud,
        iat: now,
        exp: 0,
        jti: String::new(),
        txn: random_id(),
        sub: subject.principal.clone(),
        scope,
        req_wl: subject.principal.clone(),
        tctx: Tctx { task, intent, resources: narrowing.resources, tools: narrowing.tools, arguments: narrowing.arguments },
        chain: Vec::new(),
        may_act: None,
    };
    let task_expires_at = check_revocations_and_task(st, &draft, None, now)?;
    let max = st.config.txn_tokens.max_ttl_s;
    let mut exp = now.saturating_add(requested_ttl.unwrap_or(max).min(max)).min(subject.exp);
    if let Some(t) = task_expires_at {
        if t <= now {
            return Err(OAuthError::refused("task_expired", "task expired"));
        }
        exp = exp.min(t);
    }
    if exp <= now {
        return Err(OAuthError::invalid_grant("subject_token expires now"));
    }
    Ok((TxnToken { exp, ..draft }, subject.hash))
}

/// A replacement naming the actor, whose JWT-SVID comes as `actor_token`.
fn replacement(
    st: &AppState,
    p: &Params,
    subject_token: &str,
    scopes: Option<Vec<String>>,
    narrowing: Members,
    requested_ttl: Option<u64>,
    now: u64,
) -> Result<(TxnToken, String), OAuthError> {
    let prev = verify_token(st, subject_token, now)?;
    let actor_token = p.actor_token.as_deref().ok_or_else(|| OAuthError::invalid_request("a replacement Txn-Token needs the next actor's JWT-SVID as `actor_token`"))?;
    let actor = verify(st, "actor_token", actor_token, now)?;
    match &prev.may_act {
        None => return Err(OAuthError::refused(ACTOR_MISMATCH, "the Txn-Token names no next actor (`may_act`): it cannot be exchanged")),
        Some(m) if *m != actor.principal => return Err(OAuthError::refused(ACTOR_MISMATCH, "the actor is not the one the Txn-Token's `may_act` names")),
        Some(_) => {}
    }
    check_chain(st, &prev)?;
    if prev.principals().any(|x| x == actor.principal) {
        return Err(OAuthError::refused(LOOP, "the actor is already in the delegation chain"));
    }
    if prev.chain.len() + 1 > st.config.txn_tokens.max_delegations {
        return Err(OAuthError::refused(TOO_DEEP, "delegation chain too deep"));
    }
    check_context_params(p, &prev)?;
    let scope = match scopes {
        None => prev.scope.clone(),
        Some(s) if s.iter().all(|x| prev.scope.contains(x)) => s,
        Some(_) => return Err(OAuthError::refused_scope(SCOPE_EXCEEDED, "a replacement's scope must be a subset of the Txn-Token's")),
    };
    let subset = |new: Option<Vec<String>>, old: &Option<Vec<String>>, what: &str| -> Result<Option<Vec<String>>, OAuthError> {
        match (new, old) {
            (None, old) => Ok(old.clone()),
            (Some(n), Some(o)) if !n.iter().all(|x| o.contains(x)) => {
                Err(OAuthError::refused(SCOPE_EXCEEDED, format!("a replacement's `tctx.{what}` must be a subset of the Txn-Token's")))
            }
            (Some(n), _) => Ok(Some(n)),
        }
    };
    let resources = subset(narrowing.resources, &prev.tctx.resources, "resources")?;
    let tools = subset(narrowing.tools, &prev.tctx.tools, "tools")?;
    let arguments = match (narrowing.arguments, &prev.tctx.arguments) {
        (None, old) => old.clone(),
        (Some(n), Some(o)) if !o.iter().all(|x| n.contains(x)) => {
            return Err(OAuthError::refused(SCOPE_EXCEEDED, "a replacement must keep every `tctx.arguments` constraint verbatim"))
        }
        (Some(n), _) => Some(n),
    };
    let max = st.config.txn_tokens.max_ttl_s;
    let mut exp = prev.exp.min(now.saturating_add(max));
    if let Some(r) = requested_ttl {
        let wanted = now.saturating_add(r);
        if wanted > prev.exp {
            return Err(OAuthError::refused(SCOPE_EXCEEDED, "`requested_ttl` would end after the Txn-Token it replaces"));
        }
        exp = exp.min(wanted);
    }
    if st.config.ttl.cap_to_subject_exp {
        exp = exp.min(actor.exp);
    }
    let task_expires_at = check_revocations_and_task(st, &prev, Some(&actor.principal), now)?;
    if let Some(t) = task_expires_at {
        if t <= now {
            return Err(OAuthError::refused("task_expired", "task expired"));
        }
        exp = exp.min(t);
    }
    if exp <= now {
        return Err(OAuthError::invalid_grant("actor_token expires now"));
    }
    let mut chain = Vec::with_capacity(prev.chain.len() + 1);
    chain.push(actor.principal.clone());
    chain.extend(prev.chain.iter().cloned());
    let tctx = Tctx { task: prev.tctx.task.clone(), intent: prev.tctx.intent.clone(), resources, tools, arguments };
    let next = TxnToken { exp, scope, req_wl: actor.principal, tctx, chain, may_act: None, ..prev };
    Ok((next, crate::short_hash(subject_token.as_bytes())))
}

/// The subject of an access token minted from a Txn-Token: the token verified, the actor's
/// JWT-SVID verified and equal to the token's current actor, the request inside the token
/// (task, intent, tool, scope), every principal unrevoked and the task active for `sub`.
pub(crate) fn subject_for_access_token(st: &AppState, p: &Params, subject_token: &str, scopes: &[String], now: u64) -> Result<Subject, OAuthError> {
    let t = verify_token(st, subject_token, now)?;
    check_chain(st, &t)?;
    let actor = match &p.actor_token {
        Some(a) => Some(verify(st, "actor_token", a, now)?),
        None if !t.chain.is_empty() => {
            return Err(OAuthError::invalid_request("`actor_token` is required: the Txn-Token's current actor must present its JWT-SVID"))
        }
        None => None,
    };
    let acting = actor.as_ref().map_or(t.sub.as_str(), |a| a.principal.as_str());
    if acting != t.current_actor() {
        return Err(OAuthError::refused(ACTOR_MISMATCH, "the actor is not the Txn-Token's current actor"));
    }
    check_context_params(p, &t)?;
    if let (Some(tool), Some(tools)) = (&p.tool, &t.tctx.tools) {
        if !tools.contains(tool) {
            return Err(OAuthError::refused(SCOPE_EXCEEDED, "`tool` is not in the Txn-Token's `tctx.tools`"));
        }
    }
    if !scopes.iter().all(|s| t.scope.contains(s)) {
        return Err(OAuthError::refused_scope(SCOPE_EXCEEDED, "scope is not within the Txn-Token's scope"));
    }
    let task_expires_at = check_revocations_and_task(st, &t, None, now)?;
    let domain = SpiffeId::parse(&t.sub).map(|id| id.trust_domain().to_string()).map_err(|_| invalid("claims_invalid"))?;
    let mut exp_cap = t.exp;
    if let (Some(a), true) = (&actor, st.config.ttl.cap_to_subject_exp) {
        exp_cap = exp_cap.min(a.exp);
    }
    let act = t.act_claim();
    Ok(Subject {
        principal: t.sub,
        domain,
        exp_cap: Some(exp_cap),
        act,
        task: Some(t.tctx.task),
        intent: Some(t.tctx.intent),
        task_expires_at,
        txn: Some(t.txn),
        hash: crate::short_hash(subject_token.as_bytes()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Value {
        json!({
            "iss": "https://minter.test", "aud": "example.org", "iat": 100, "exp": 400,
            "jti": "AAAAAAAAAAAAAAAAAAAAAA", "txn": "BBBBBBBBBBBBBBBBBBBBBB",
            "sub": "spiffe://example.org/agent/a", "scope": "tickets:read tickets:write",
            "req_wl": "spiffe://example.org/agent/b",
            "tctx": {"task": "tsk_x", "intent": "case.resolve", "resources": ["billing"], "tools": ["get_ticket"],
                     "arguments": [{"tool": "refund", "pointer": "/amount", "max": 100}]},
            "act": {"sub": "spiffe://example.org/agent/b"},
            "may_act": {"sub": "spiffe://example.org/agent/c"}
        })
    }

    #[test]
    fn claims_round_trip() {
        let t = TxnToken::from_claims(&sample()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.current_actor(), "spiffe://example.org/agent/b");
        assert_eq!(t.principals().count(), 2);
        assert_eq!(t.to_claims(), sample());
    }

    #[test]
    fn malformed_claims_are_refused() {
        let cases: Vec<(&str, Value)> = vec![
            ("/extra", json!(1)),
            ("/tctx/unknown", json!(1)),
            ("/act/role", json!("admin")),
            ("/act/sub", json!("not-a-spiffe-id")),
            ("/act/sub", json!(7)),
            ("/act", json!("spiffe://example.org/agent/b")),
            ("/may_act/extra", json!(1)),
            ("/may_act", json!({"sub": "x"})),
            ("/scope", json!("")),
            ("/scope", json!("a  b")),
            ("/scope", json!("a a")),
            ("/iat", json!("100")),
            ("/exp", json!(1.5)),
            ("/sub", json!("spiffe://example.org/../x")),
            ("/tctx/resources", json!(["Billing"])),
            ("/tctx/resources", json!(["a", "a"])),
            ("/tctx/tools", json!(["a b"])),
            ("/tctx/tools", json!("get_ticket")),
            ("/tctx/arguments", json!([{"pointer": "/a"}])),
            ("/tctx/arguments", json!([{"pointer": "a", "max": 1}])),
            ("/tctx/arguments", json!([{"pointer": "/a~2", "max": 1}])),
            ("/tctx/arguments", json!([{"pointer": "/a", "equals": null}])),
            ("/tctx/arguments", json!([{"pointer": "/a", "equals": [1]}])),
            ("/tctx/arguments", json!([{"pointer": "/a", "min": 5, "max": 1}])),
            ("/tctx/arguments", json!([{"pointer": "/a", "max": 1, "regex": ".*"}])),
            ("/tctx/task", json!("a b")),
        ];
        for (path, value) in cases {
            let mut c = sample();
            let (parent, key) = path.rsplit_once('/').unwrap_or(("", path));
            match c.pointer_mut(parent).and_then(Value::as_object_mut) {
                Some(o) => {
                    o.insert(key.to_string(), value.clone());
                }
                None => panic!("{path}"),
            }
            assert!(TxnToken::from_claims(&c).is_err(), "{path} = {value}");
        }
        let mut deep = json!({"sub": "spiffe://example.org/x0"});
        for i in 1..=crate::config::MAX_DELEGATIONS_LIMIT {
            deep = json!({"sub": format!("spiffe://example.org/x{i}"), "act": deep});
        }
        let mut c = sample();
        c["act"] = deep;
        assert!(TxnToken::from_claims(&c).is_err());
        let mut c = sample();
        c.as_object_mut().map(|o| o.remove("tctx"));
        assert!(TxnToken::from_claims(&c).is_err());
    }

    #[test]
    fn tctx_parameter_holds_only_narrowing_members() {
        assert!(tctx_param(r#"{"tools":["a"],"resources":[],"arguments":[{"pointer":"/x","equals":"y"}]}"#).is_ok());
        // Both an equality and a range: the proxies would refuse the token, so it is never issued.
        assert!(tctx_param(r#"{"arguments":[{"pointer":"/x","equals":5,"max":10}]}"#).is_err());
        for bad in [r#"{"task":"t"}"#, r#"{"intent":"i"}"#, r#"{"other":1}"#, r#"[1]"#, "not json", r#"{"tools":"a"}"#] {
            assert!(tctx_param(bad).is_err(), "{bad}");
        }
    }
}
