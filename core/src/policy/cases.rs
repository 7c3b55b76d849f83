//! Policy test cases: a request described in plain terms → the expected
//! effect, reason and rule. Used by `mandate policy test` and by the tests of
//! the `policies/` library. The request goes through the same shape checks as
//! live traffic (path and authority normalisation, intent and task syntax).

use super::path::{normalize, normalize_authority};
use super::{Policy, PolicyConfig, PolicyDecision, PolicyInput, SignedIntent};
use crate::delegation::context::TxnContext;
use crate::delegation::judge::{self, Judgement};
use crate::delegation::TxnToken;
use crate::config::ConfigError;
use crate::reason::Reason;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseFile {
    /// Policy file, relative to the case file: a `policy` object, or a plugin configuration containing one.
    pub policy: String,
    #[serde(default)]
    pub description: Option<String>,
    /// The deployment has a minter (default for every case that does not say otherwise).
    #[serde(default)]
    pub minter: bool,
    pub cases: Vec<Case>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    pub request: CaseRequest,
    pub expect: Expect,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CaseRequest {
    /// Verified identity (SPIFFE ID, or mapped OIDC identity).
    pub principal: String,
    /// Token lifetime `exp - iat`, seconds (default 300). Ignored when `iat`/`exp` are set.
    #[serde(default)]
    pub token_lifetime_s: Option<u64>,
    #[serde(default)]
    pub iat: Option<u64>,
    #[serde(default)]
    pub exp: Option<u64>,
    #[serde(default)]
    pub intent: Option<String>,
    #[serde(default)]
    pub task: Option<String>,
    /// Claims of a verified signed intent token.
    #[serde(default)]
    pub signed_intent: Option<CaseSignedIntent>,
    #[serde(default = "default_method")]
    pub method: String,
    pub authority: String,
    pub path: String,
    /// RFC 3339 UTC (`2026-11-25T10:00:00Z`) or Unix seconds as a string.
    pub time: String,
    #[serde(default)]
    pub environment: Option<String>,
    #[serde(default)]
    pub standing_secret: bool,
    /// A minter is configured (it checks task registration at every exchange, and needs a
    /// matched resource to mint for). Default: the case file's `minter`, else false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minter: Option<bool>,
    /// An MCP call (the request is then a POST with this JSON-RPC message as its body).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp: Option<CaseMcp>,
    /// A delegated request: the Txn-Token the caller presents, described (taken as verified).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegation: Option<CaseDelegation>,
}

/// A verified Txn-Token in a case: its chain and its grants.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CaseDelegation {
    /// Original principal first, current actor last (normally the request's `principal`).
    pub chain: Vec<String>,
    /// `tctx.intent` (default: the request's intent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<String>,
    /// `tctx.task` (default: the request's task, else `case-task`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// The token's `scope` (default: the intent's scopes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<String>>,
    /// `tctx.arguments`, as in the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub may_act: Option<String>,
}

impl CaseDelegation {
    /// The token as the filter would hold it once verified (`tctx` read by the same strict
    /// reader: `Err` is `delegation_token_invalid`).
    pub fn token(&self, policy: &Policy, intent: Option<&str>, task: Option<&str>, iat: u64, exp: u64) -> Result<TxnToken, Reason> {
        let intent = self.intent.as_deref().or(intent).unwrap_or_default().to_string();
        let task = self.task.as_deref().or(task).unwrap_or("case-task").to_string();
        let mut tctx = serde_json::Map::new();
        tctx.insert("task".into(), task.into());
        tctx.insert("intent".into(), intent.clone().into());
        if let Some(v) = &self.resources {
            tctx.insert("resources".into(), serde_json::json!(v));
        }
        if let Some(v) = &self.tools {
            tctx.insert("tools".into(), serde_json::json!(v));
        }
        if let Some(v) = &self.arguments {
            tctx.insert("arguments".into(), v.clone());
        }
        let ctx = serde_json::from_value(serde_json::Value::Object(tctx)).ok().and_then(|raw| TxnContext::from_raw(raw).ok()).ok_or(Reason::DelegationTokenInvalid)?;
        let scope = self.scope.clone().unwrap_or_else(|| policy.intent_index(&intent).and_then(|i| policy.intents.get(i)).map(|i| i.scopes.clone()).unwrap_or_default());
        if self.chain.is_empty() {
            return Err(Reason::DelegationTokenInvalid);
        }
        Ok(TxnToken::described(self.chain.clone(), ctx, scope, self.may_act.clone(), iat, exp))
    }
}

/// An MCP call in a case: the JSON-RPC message is built from it, and (unless `headers` is
/// false) the 2026-07-28 headers that mirror it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CaseMcp {
    pub method: String,
    /// Tool (tools/call) or prompt (prompts/get).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<serde_json::Value>,
    /// Send the 2026-07-28 headers too (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<bool>,
}

impl CaseMcp {
    /// The JSON-RPC request message.
    pub fn body(&self) -> serde_json::Value {
        let mut params = serde_json::Map::new();
        if let Some(n) = &self.name {
            params.insert("name".into(), n.clone().into());
        }
        if let Some(u) = &self.uri {
            params.insert("uri".into(), u.clone().into());
        }
        if let Some(a) = &self.arguments {
            params.insert("arguments".into(), a.clone());
        }
        let mut m = serde_json::Map::new();
        m.insert("jsonrpc".into(), "2.0".into());
        if !self.method.starts_with("notifications/") {
            m.insert("id".into(), self.id.clone().unwrap_or(serde_json::Value::from(1)));
        }
        m.insert("method".into(), self.method.clone().into());
        if !params.is_empty() {
            m.insert("params".into(), serde_json::Value::Object(params));
        }
        serde_json::Value::Object(m)
    }

    /// The JSON-RPC message as text: what a client would send, for the filter's own parser.
    pub fn message(&self) -> String {
        self.body().to_string()
    }
}

/// The JSON-RPC request text of a described MCP call (id 1, none for a notification), for the
/// filter's own strict parser, which judges it as it would a body. `arguments` is written as
/// sent, so it must be exactly one JSON value (`None` otherwise): text around it could rewrite
/// the message (`{}, "name": "other"`). The parser then checks it (an object, strict JSON).
pub fn mcp_message(method: &str, name: Option<&str>, uri: Option<&str>, arguments: Option<&str>) -> Option<String> {
    #[derive(Serialize)]
    struct Message<'a> {
        jsonrpc: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u8>,
        method: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        params: Option<Params<'a>>,
    }
    #[derive(Serialize)]
    struct Params<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        uri: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        arguments: Option<&'a serde_json::value::RawValue>,
    }
    let arguments = match arguments {
        None => None,
        Some(text) => Some(serde_json::from_str::<&serde_json::value::RawValue>(text).ok()?),
    };
    let params = (name.is_some() || uri.is_some() || arguments.is_some()).then_some(Params { name, uri, arguments });
    let id = (!method.starts_with("notifications/")).then_some(1);
    serde_json::to_string(&Message { jsonrpc: "2.0", id, method, params }).ok()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CaseSignedIntent {
    pub intents: Vec<String>,
    #[serde(default)]
    pub task: Option<String>,
}

fn default_method() -> String {
    "GET".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// `allow`, `deny` or `dry_run_deny`.
    pub effect: String,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub rule: Option<String>,
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
pub struct CaseResult {
    pub name: String,
    pub passed: bool,
    pub got: String,
    pub want: String,
}

/// Parses `YYYY-MM-DDTHH:MM:SSZ` (UTC only) or Unix seconds.
pub fn parse_time(s: &str) -> Option<u64> {
    if let Some(n) = Some(s).filter(|s| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit())).and_then(|s| s.parse::<u64>().ok()) {
        return Some(n);
    }
    let b = s.as_bytes();
    if b.len() != 20 || b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') || b.get(10) != Some(&b'T') || b.get(19) != Some(&b'Z') {
        return None;
    }
    // Digits only: `parse` alone would take a sign (`2027-+1-01`).
    let num = |r: std::ops::Range<usize>| s.get(r).filter(|x| x.bytes().all(|c| c.is_ascii_digit())).and_then(|x| x.parse::<i64>().ok());
    let (y, m, d, hh, mm, ss) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let month_days = match m {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    // A day the month does not have (`02-30`) is refused, never rolled into the next month.
    if !(1..=12).contains(&m) || !(1..=month_days).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from civil (proleptic Gregorian), after Howard Hinnant's algorithm.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

fn valid_name(v: &str, extra: &[u8]) -> bool {
    (1..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || extra.contains(&b))
}

/// Evaluates one described request: the same shape checks as live traffic, then the policy.
pub fn evaluate_request(policy: &Policy, r: &CaseRequest) -> Result<PolicyDecision, String> {
    Ok(match judge_request(policy, r)? {
        Ok(d) => d,
        Err(reason) => PolicyDecision::with(crate::decision::Effect::Deny, reason),
    })
}

/// Builds the policy input for a described request (`Err(reason)` = refused before the policy).
pub fn with_input<T>(
    policy: &Policy,
    r: &CaseRequest,
    signed: &mut Option<SignedIntent>,
    f: impl FnOnce(&PolicyInput<'_>, Option<&TxnToken>) -> T,
) -> Result<Result<T, Reason>, String> {
    let now = parse_time(&r.time).ok_or_else(|| format!("bad time `{}`", r.time))?;
    let message = r.mcp.as_ref().map(CaseMcp::message);
    let view = Described {
        principal: &r.principal,
        token_lifetime_s: r.token_lifetime_s,
        iat: r.iat,
        exp: r.exp,
        intent: r.intent.as_deref(),
        task: r.task.as_deref(),
        signed_intent: r.signed_intent.as_ref(),
        method: &r.method,
        authority: &r.authority,
        path: &r.path,
        now,
        environment: r.environment.as_deref(),
        standing_secret: r.standing_secret,
        minter: r.minter.unwrap_or(false),
        mcp_message: message.as_deref(),
        delegation: r.delegation.as_ref(),
    };
    Ok(with_described(policy, &view, signed, f))
}

/// A request described, borrowed: what [`with_described`] reads (a case, or the embedded
/// face's request, without copying either).
#[derive(Debug, Clone, Copy)]
pub struct Described<'a> {
    pub principal: &'a str,
    /// Token lifetime when `iat`/`exp` are not given (default 300 s).
    pub token_lifetime_s: Option<u64>,
    pub iat: Option<u64>,
    pub exp: Option<u64>,
    pub intent: Option<&'a str>,
    pub task: Option<&'a str>,
    pub signed_intent: Option<&'a CaseSignedIntent>,
    pub method: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    /// Unix seconds.
    pub now: u64,
    pub environment: Option<&'a str>,
    pub standing_secret: bool,
    pub minter: bool,
    /// The MCP call as its JSON-RPC text: the filter's body parser reads it, and the policy
    /// judges its arguments in place, as sent.
    pub mcp_message: Option<&'a str>,
    pub delegation: Option<&'a CaseDelegation>,
}

/// [`with_input`] for a borrowed description.
pub fn with_described<T>(
    policy: &Policy,
    r: &Described<'_>,
    signed: &mut Option<SignedIntent>,
    f: impl FnOnce(&PolicyInput<'_>, Option<&TxnToken>) -> T,
) -> Result<T, Reason> {
    let now = r.now;
    let call = match r.mcp_message.map(|m| crate::mcp::jsonrpc::parse(m.as_bytes())) {
        None => None,
        Some(Ok(m)) => Some(m.into_call()),
        Some(Err(e)) => return Err(e.reason),
    };
    // An MCP call is a POST (the default method, GET, becomes POST).
    let method = if call.is_some() && r.method == "GET" { "POST" } else { r.method };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(Reason::MethodInvalid);
    }
    if let Some(i) = r.intent {
        if !valid_name(i, b"._-") {
            return Err(Reason::IntentMalformed);
        }
    }
    if let Some(t) = r.task {
        if !(1..=128).contains(&t.len()) || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b)) {
            return Err(Reason::TaskMalformed);
        }
    }
    let Ok(path) = normalize(r.path.as_bytes()) else { return Err(Reason::PathAmbiguous) };
    let Some(authority) = normalize_authority(r.authority.as_bytes()) else { return Err(Reason::AuthorityInvalid) };
    let (iat, exp) = match (r.iat, r.exp) {
        (Some(i), Some(e)) => (Some(i), e),
        (i, Some(e)) => (i, e),
        _ => {
            let iat = now.saturating_sub(10);
            (Some(iat), iat + r.token_lifetime_s.unwrap_or(300))
        }
    };
    *signed = r.signed_intent.map(|s| SignedIntent { intents: s.intents.clone(), task: s.task.clone(), exp: now + 300, from_txn_token: false });
    // As live traffic: a task in the signed token binds the request to it.
    if let (Some(st), Some(ht)) = (signed.as_ref().and_then(|s| s.task.as_deref()), r.task) {
        if st != ht {
            return Err(Reason::IntentTokenInvalid);
        }
    }
    let mut task = r.task.map(str::to_string).or_else(|| signed.as_ref().and_then(|s| s.task.clone()));
    // The policy's configured environment applies unless the case names one (as node metadata would).
    let environment = r.environment.or(policy.environment.as_deref());
    let intent = r.intent.map(str::to_string).or_else(|| match signed.as_ref().map(|s| s.intents.as_slice()) {
        Some([only]) => Some(only.clone()),
        _ => None,
    });
    // Delegation: the filter's steps 2 and 3 (the chain, the context), as live traffic.
    let txn = match r.delegation {
        None => None,
        Some(cd) => {
            let t = cd.token(policy, r.intent, r.task, iat.unwrap_or(now), exp)?;
            let cap = policy.max_delegations.unwrap_or(crate::delegation::DEFAULT_MAX_DELEGATIONS);
            judge::check_chain(&t, r.principal, cap).and_then(|()| judge::check_context(&t, intent.as_deref(), task.as_deref()))?;
            task = Some(t.ctx.task.clone());
            if signed.is_none() {
                *signed = Some(t.vouched_intent());
            }
            Some(t)
        }
    };
    let input = PolicyInput {
        principal: r.principal,
        iat,
        exp,
        intent: intent.as_deref(),
        signed_intent: signed.as_ref(),
        task: task.as_deref(),
        method,
        authority: &authority,
        path: &path.path,
        now,
        environment,
        standing_secret: r.standing_secret,
        minter: r.minter,
        mcp: call.as_ref(),
    };
    Ok(f(&input, txn.as_ref()))
}

/// Delegation steps 5 to 7 over the caller's decision: a refusal denies with its reason (the
/// refused principal's own rule as the rule); in dry run, a refused principal makes the
/// decision a dry-run denial.
pub fn apply_delegation(policy: &Policy, t: &TxnToken, input: &PolicyInput<'_>, mut d: PolicyDecision) -> (PolicyDecision, Judgement) {
    let j = judge::judge(policy, t, input, &d);
    if let Some((reason, failed)) = &j.failure {
        d.effect = crate::decision::Effect::Deny;
        d.reason = *reason;
        d.rule_id = failed.rule.clone();
        d.scopes.clear();
        d.ttl_s = None;
    } else if j.dry_run.is_some() && d.effect == crate::decision::Effect::Allow {
        d.effect = crate::decision::Effect::DryRunDeny;
        d.reason = Reason::DelegationNotAllowed;
        d.dry_run_reason = Some(Reason::DelegationNotAllowed);
    }
    (d, j)
}

fn judge_request(policy: &Policy, r: &CaseRequest) -> Result<Result<PolicyDecision, Reason>, String> {
    let mut signed = None;
    with_input(policy, r, &mut signed, |input, txn| {
        let d = policy.evaluate(input);
        match txn {
            Some(t) => apply_delegation(policy, t, input, d).0,
            None => d,
        }
    })
}

/// Loads a policy file: either a bare policy object or a plugin configuration with `policy`.
pub fn load_policy(path: &Path) -> Result<Policy, String> {
    let raw = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_policy(&raw).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn parse_policy(raw: &[u8]) -> Result<Policy, ConfigError> {
    let v: serde_json::Value = serde_json::from_slice(raw).map_err(|e| ConfigError::new(".", e.to_string()))?;
    let (value, prefix) = match v.get("policy") {
        Some(p) if v.get("identity").is_some() || v.as_object().is_some_and(|o| o.len() <= 3) => (p.clone(), "policy"),
        _ => (v, "policy"),
    };
    let text = value.to_string();
    let cfg: PolicyConfig = crate::config::from_json(text.as_bytes(), prefix)?;
    Policy::compile(&cfg, prefix)
}

/// A case file's policy document (a bare policy or a plugin configuration) as the plugin
/// configuration an embedded decider is configured with: a minter section exactly when the
/// case has a minter (the decider reads "has a minter" from its configuration).
pub fn case_config(doc: &serde_json::Value, minter: bool) -> serde_json::Value {
    let is_config = doc.get("policy").is_some() && (doc.get("identity").is_some() || doc.as_object().is_some_and(|o| o.len() <= 3));
    let mut cfg = if is_config { doc.clone() } else { serde_json::json!({ "policy": doc }) };
    if let Some(o) = cfg.as_object_mut() {
        if minter {
            o.entry("minter").or_insert_with(|| serde_json::json!({"cluster": "minter"}));
        } else {
            o.remove("minter");
        }
        // Forwarding Txn-Tokens needs the delegation section; cases describe verified tokens,
        // so its keys are never used.
        if doc.to_string().contains("\"txn_token\"") && !o.contains_key("delegation") {
            o.insert(
                "delegation".into(),
                serde_json::json!({"issuer": "https://minter.case", "audience": "case", "keys": {"inline": {"keys": []}}}),
            );
        }
    }
    cfg
}

/// Runs a case file; the policy path is resolved against the case file's directory.
pub fn run_file(path: &Path) -> Result<(PathBuf, Vec<CaseResult>), String> {
    let raw = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file: CaseFile = serde_json::from_slice(&raw).map_err(|e| format!("{}: {e}", path.display()))?;
    let policy_path = path.parent().unwrap_or(Path::new(".")).join(&file.policy);
    let policy = load_policy(&policy_path)?;
    let mut results = Vec::new();
    for case in &file.cases {
        let mut request = case.request.clone();
        request.minter = request.minter.or(Some(file.minter));
        let d = evaluate_request(&policy, &request).map_err(|e| format!("{}: case `{}`: {e}", path.display(), case.name))?;
        results.push(check(case, &d));
    }
    Ok((policy_path, results))
}

fn effect_name(d: &PolicyDecision) -> &'static str {
    match d.effect {
        crate::decision::Effect::Allow => "allow",
        crate::decision::Effect::Deny => "deny",
        crate::decision::Effect::DryRunDeny => "dry_run_deny",
    }
}

/// A decision against the case's expectation (shared by every engine `mandate policy test` runs).
pub fn check(case: &Case, d: &PolicyDecision) -> CaseResult {
    let e = &case.expect;
    let mut ok = e.effect == effect_name(d);
    if let Some(r) = &e.reason {
        ok &= r == d.reason.code();
    }
    if let Some(rule) = &e.rule {
        // For a dry-run deny the rule of interest is the dry-run rule; otherwise the deciding rule.
        let decided = if d.effect == crate::decision::Effect::DryRunDeny { d.dry_run_rule_id.as_deref().or(d.rule_id.as_deref()) } else { d.rule_id.as_deref() };
        ok &= decided == Some(rule.as_str());
    }
    if let Some(scopes) = &e.scopes {
        ok &= *scopes == d.scopes;
    }
    CaseResult {
        name: case.name.clone(),
        passed: ok,
        got: format!(
            "{} {} rule={} scopes={:?}",
            effect_name(d),
            d.reason.code(),
            d.rule_id.as_deref().or(d.dry_run_rule_id.as_deref()).unwrap_or("-"),
            d.scopes
        ),
        want: format!(
            "{} {} rule={} scopes={}",
            e.effect,
            e.reason.as_deref().unwrap_or("*"),
            e.rule.as_deref().unwrap_or("*"),
            e.scopes.as_ref().map_or("*".to_string(), |s| format!("{s:?}"))
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rfc3339_utc() {
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Some(0));
        // Days a month does not have are refused, not rolled over.
        assert_eq!(parse_time("2027-02-29T00:00:00Z"), None);
        // Signs are not digits (`str::parse` would take them).
        assert_eq!(parse_time("2027-+1-01T00:00:00Z"), None);
        assert_eq!(parse_time("+202-11-25T00:00:00Z"), None);
        assert_eq!(parse_time("+1795564800"), None);
        assert_eq!(parse_time(""), None);
        assert_eq!(parse_time("2027-04-31T00:00:00Z"), None);
        assert_eq!(parse_time("1900-02-29T00:00:00Z"), None, "1900 was not a leap year");
        assert!(parse_time("2028-02-29T00:00:00Z").is_some());
        assert!(parse_time("2000-02-29T00:00:00Z").is_some());
        assert_eq!(parse_time("2026-11-25T00:00:00Z"), Some(1_795_564_800));
        assert_eq!(parse_time("2000-02-29T12:30:15Z"), Some(951_827_415));
        assert_eq!(parse_time("2026-11-25T00:00:00+01:00"), None);
        assert_eq!(parse_time("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_time("1795564800"), Some(1_795_564_800));
    }

    #[test]
    fn case_requests_carry_mcp_calls() {
        let policy = parse_policy(
            serde_json::json!({
                "resources": [{"name": "support-mcp", "hosts": ["mcp.acme.internal"], "paths": ["/mcp"], "mcp": {}}],
                "intents": [{"name": "support.refund", "operations": [{"resource": "support-mcp", "tools": ["refund"],
                             "arguments": [{"pointer": "/amount", "max": 100}]}]}],
                "rules": [{"id": "all", "effect": "allow"}]
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        let req = |mcp: serde_json::Value| -> CaseRequest {
            serde_json::from_value(serde_json::json!({"principal": "spiffe://example.org/agent/a1", "intent": "support.refund",
                "authority": "mcp.acme.internal", "path": "/mcp", "time": "2026-11-25T10:00:00Z", "mcp": mcp}))
            .unwrap()
        };
        let d = evaluate_request(&policy, &req(serde_json::json!({"method": "tools/call", "name": "refund", "arguments": {"amount": 42}, "id": 1}))).unwrap();
        assert_eq!(d.reason, Reason::Allowed, "{d:?}");
        let d = evaluate_request(&policy, &req(serde_json::json!({"method": "tools/call", "name": "refund", "arguments": {"amount": 420}}))).unwrap();
        assert_eq!(d.reason, Reason::ArgumentNotAllowed);
        let d = evaluate_request(&policy, &req(serde_json::json!({"method": "tools/call", "name": "delete_customer"}))).unwrap();
        assert_eq!(d.reason, Reason::ToolNotAllowed);
        // Through the same strict parser as live traffic: a tool call without a name is malformed.
        let d = evaluate_request(&policy, &req(serde_json::json!({"method": "tools/call"}))).unwrap();
        assert_eq!(d.reason, Reason::McpMalformed);
        let d = evaluate_request(&policy, &req(serde_json::json!({"method": "tools/list", "headers": false}))).unwrap();
        assert_eq!(d.reason, Reason::Allowed);
    }

    /// Every case file in policies/ passes: the library is tested code.
    #[test]
    fn policies_library_cases_pass() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let Ok(entries) = std::fs::read_dir(&dir) else { return };
        let mut files = 0;
        let mut failures = Vec::new();
        for entry in entries.flatten() {
            let p = entry.path();
            if p.to_string_lossy().ends_with(".cases.json") {
                files += 1;
                let (_, results) = run_file(&p).unwrap();
                for r in results.iter().filter(|r| !r.passed) {
                    failures.push(format!("{}: {}: got {}, want {}", p.display(), r.name, r.got, r.want));
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        eprintln!("{files} case files passed");
    }
}
