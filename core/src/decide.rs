//! The embedded face: configure once, then `verify` tokens and `decide` described requests.
//!
//! This is what the WebAssembly component (component/, `wit/mandate.wit`) exports and what
//! `mandate policy test` runs natively. A described request takes the same path as a case in a
//! `*.cases.json` file (the shape checks of live traffic, the policy, delegation steps 5 to 7),
//! so a decision never differs between hosts. What it does not do: fetch bundles, mint
//! credentials or read headers. The host mints with the decision's scopes and TTL itself.

use std::hash::BuildHasher;
use std::rc::Rc;

use sha2::{Digest, Sha256};

use crate::config::{self, Config, ConfigError};
use crate::decision::{DecisionIds, Effect};
use crate::engine::{Decision, McpInfo};
use crate::identity::{Identity, IdentityKind, Verifier};
use crate::policy::cases::{self, CaseDelegation, CaseMcp, CaseRequest, CaseSignedIntent};
use crate::policy::intent::IntentVerifier;
use crate::policy::{Policy, PolicyDecision};
use crate::reason::Reason;
use crate::record::DecisionRecord;

/// Who is asking: an identity the host already verified, or a raw token for [`Decider::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Verified(CallerIdentity),
    Token(String),
}

/// A verified caller as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerIdentity {
    /// SPIFFE ID, or the mapped OIDC identity.
    pub principal: String,
    pub trust_domain: Option<String>,
    pub issued_at: Option<u64>,
    pub expires_at: u64,
    /// Short hash of the token (never the token); empty when the host verified it.
    pub token_hash: String,
}

impl CallerIdentity {
    fn from_verified(i: &Identity) -> CallerIdentity {
        CallerIdentity {
            principal: i.principal.clone(),
            trust_domain: i.trust_domain.clone(),
            issued_at: i.iat,
            expires_at: i.exp,
            token_hash: i.token_hash.clone(),
        }
    }
}

/// Proof of a signed intent: claims the host verified, or a raw intent token
/// (`typ: intent+jwt`) checked against the policy's `intent_issuers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntentProof {
    Claims { intents: Vec<String>, task: Option<String> },
    Token(String),
}

/// An MCP JSON-RPC call, described. The core writes its message and reads it with the filter's
/// own body parser, so a described call is judged exactly as the same call in a body would be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McpRequest {
    /// `tools/call`, `tools/list`, `resources/read`, `prompts/get`, ...
    pub method: String,
    /// The tool (tools/call) or prompt (prompts/get).
    pub name: Option<String>,
    pub uri: Option<String>,
    /// The tool's arguments as JSON text (an object), read as strictly as a body: a duplicate
    /// key, deep nesting or anything after the value makes the call malformed.
    pub arguments: Option<String>,
}

impl McpRequest {
    /// A case's call (its JSON-RPC `id` and header switch change no decision).
    pub fn from_case(c: &CaseMcp) -> McpRequest {
        McpRequest { method: c.method.clone(), name: c.name.clone(), uri: c.uri.clone(), arguments: c.arguments.as_ref().map(|a| a.to_string()) }
    }

    /// The JSON-RPC request text (`None`: the arguments are not one JSON value).
    pub fn message(&self) -> Option<String> {
        cases::mcp_message(&self.method, self.name.as_deref(), self.uri.as_deref(), self.arguments.as_deref())
    }
}

/// One request, described.
#[derive(Debug, Clone)]
pub struct DecideRequest {
    pub caller: Caller,
    pub intent: Option<String>,
    pub task: Option<String>,
    pub intent_proof: Option<IntentProof>,
    pub method: String,
    pub authority: String,
    pub path: String,
    /// An MCP call (the request is then a POST carrying it).
    pub mcp: Option<McpRequest>,
    /// A delegated request: the Txn-Token the host verified, described.
    pub delegation: Option<CaseDelegation>,
    /// Unix seconds: the component has no clock of its own.
    pub now: u64,
    /// Overrides the policy's `environment` (as node metadata would).
    pub environment: Option<String>,
    /// The request carries a standing secret (a static API key the policy may refuse).
    pub standing_secret: bool,
}

impl DecideRequest {
    /// A case of a `*.cases.json` file as a request by an already verified caller (the token
    /// times default as in [`cases::with_input`]). `Err` names a bad `time`.
    pub fn from_case(r: &CaseRequest) -> Result<DecideRequest, String> {
        let now = cases::parse_time(&r.time).ok_or_else(|| format!("bad time `{}`", r.time))?;
        let (iat, exp) = match (r.iat, r.exp) {
            (i, Some(e)) => (i, e),
            _ => {
                let iat = now.saturating_sub(10);
                (Some(iat), iat.saturating_add(r.token_lifetime_s.unwrap_or(300)))
            }
        };
        Ok(DecideRequest {
            caller: Caller::Verified(CallerIdentity {
                principal: r.principal.clone(),
                trust_domain: None,
                issued_at: iat,
                expires_at: exp,
                token_hash: String::new(),
            }),
            intent: r.intent.clone(),
            task: r.task.clone(),
            intent_proof: r.signed_intent.as_ref().map(|s| IntentProof::Claims { intents: s.intents.clone(), task: s.task.clone() }),
            method: r.method.clone(),
            authority: r.authority.clone(),
            path: r.path.clone(),
            mcp: r.mcp.as_ref().map(McpRequest::from_case),
            delegation: r.delegation.clone(),
            now,
            environment: r.environment.clone(),
            standing_secret: r.standing_secret,
        })
    }
}

/// What was decided, and the decision record the filter would have written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decided {
    pub effect: Effect,
    pub reason: Reason,
    pub rule_id: Option<String>,
    pub dry_run_rule_id: Option<String>,
    pub scopes: Vec<String>,
    pub ttl_s: Option<u64>,
    pub decision_id: String,
    /// The decision record, JSON (docs/decision-records.md).
    pub record: String,
}

pub struct Decider {
    config: Config,
    verifier: Verifier,
    intents: IntentVerifier,
    policy: Option<Policy>,
    ids: DecisionIds,
    policy_hash: String,
}

impl Decider {
    /// Reads a plugin configuration (the filter's own document and parser: errors name the
    /// field). Trust bundles must be inline: nothing is fetched.
    pub fn configure(raw: &[u8]) -> Result<Decider, ConfigError> {
        let config = config::parse(raw)?;
        let verifier = Verifier::new(&config.identity).map_err(|e| ConfigError::new("identity", e))?;
        let (policy, intents) = match &config.policy {
            Some(p) => (
                Some(Policy::compile(p, "policy")?),
                IntentVerifier::new(&p.intent_issuers, config.identity.clock_skew_s, "policy.intent_issuers")?,
            ),
            None => (None, IntentVerifier::new(&[], 0, "policy.intent_issuers")?),
        };
        let digest = Sha256::digest(raw);
        let policy_hash = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
        // Decision ids need uniqueness, not secrecy: std's per-process random hash keys seed them
        // (the randomness the platform gives std anyway; no extra import).
        let seed = std::collections::hash_map::RandomState::new().hash_one(0_u64);
        Ok(Decider { config, verifier, intents, policy, ids: DecisionIds::new(seed), policy_hash })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Verifies a JWT-SVID (or mapped OIDC token) as the filter does, at `now` (Unix seconds).
    pub fn verify(&mut self, token: &str, now: u64) -> Result<CallerIdentity, Reason> {
        self.verifier.verify(token.as_bytes(), now).map(|i| CallerIdentity::from_verified(&i))
    }

    /// Decides one request. Every failure is a denial with its reason code (fail closed).
    pub fn decide(&mut self, req: &DecideRequest) -> Decided {
        let mut d = Decision { id: self.ids.next_id(), ..Decision::default() };
        let judged = self.judge(req, &mut d);
        let pd = match judged {
            Ok(pd) => pd,
            Err(reason) => PolicyDecision::with(Effect::Deny, reason),
        };
        d.effect = Some(pd.effect);
        d.reason = Some(pd.reason);
        let out = Decided {
            effect: pd.effect,
            reason: pd.reason,
            rule_id: pd.rule_id.clone(),
            dry_run_rule_id: pd.dry_run_rule_id.clone(),
            scopes: pd.scopes.clone(),
            ttl_s: pd.ttl_s,
            decision_id: d.id.clone(),
            record: String::new(),
        };
        d.policy = Some(Rc::new(pd));
        let env = req.environment.as_deref().or_else(|| self.policy.as_ref().and_then(|p| p.environment.as_deref()));
        let record = DecisionRecord::new(&d, env, &self.policy_hash, req.now.saturating_mul(1000), 0).to_json();
        Decided { record, ..out }
    }

    fn judge(&mut self, req: &DecideRequest, d: &mut Decision) -> Result<PolicyDecision, Reason> {
        let verified;
        let who = match &req.caller {
            Caller::Verified(c) => c,
            Caller::Token(t) => {
                d.identity_checked = true;
                verified = self.verify(t, req.now)?;
                &verified
            }
        };
        d.identity = Some(Rc::new(Identity {
            kind: if who.principal.starts_with("spiffe://") { IdentityKind::JwtSvid } else { IdentityKind::Oidc },
            principal: who.principal.clone(),
            trust_domain: who.trust_domain.clone(),
            issuer: None,
            subject: who.principal.clone(),
            iat: who.issued_at,
            exp: who.expires_at,
            token_hash: who.token_hash.clone(),
            serial: 0,
        }));
        let signed_intent = match &req.intent_proof {
            None => None,
            Some(IntentProof::Claims { intents, task }) => Some(CaseSignedIntent { intents: intents.clone(), task: task.clone() }),
            Some(IntentProof::Token(t)) => {
                let s = self.intents.verify(t.as_bytes(), &who.principal, req.now)?;
                Some(CaseSignedIntent { intents: s.intents, task: s.task })
            }
        };
        let Some(policy) = self.policy.as_ref() else {
            // As the filter: without a policy every request is denied.
            return Err(Reason::NoRuleMatched);
        };
        let message = match req.mcp.as_ref().map(McpRequest::message) {
            None => None,
            Some(Some(m)) => Some(m),
            Some(None) => return Err(Reason::McpMalformed),
        };
        let described = cases::Described {
            principal: &who.principal,
            token_lifetime_s: None,
            iat: who.issued_at,
            exp: Some(who.expires_at),
            intent: req.intent.as_deref(),
            task: req.task.as_deref(),
            signed_intent: signed_intent.as_ref(),
            method: &req.method,
            authority: &req.authority,
            path: &req.path,
            now: req.now,
            environment: req.environment.as_deref(),
            standing_secret: req.standing_secret,
            minter: self.config.minter.is_some(),
            mcp_message: message.as_deref(),
            delegation: req.delegation.as_ref(),
        };
        let mut signed = None;
        cases::with_described(policy, &described, &mut signed, |input, txn| {
            d.intent = input.intent.map(Rc::from);
            d.task = input.task.map(Rc::from);
            d.intent_signed = input.signed_intent.is_some_and(|s| !s.from_txn_token);
            d.method = Some(Rc::from(input.method));
            d.authority = Some(Rc::from(input.authority));
            d.path = Some(Rc::from(input.path));
            // The described call was read by the body parser: the record says so, as the filter's.
            d.mcp = input.mcp.map(|c| {
                Rc::new(McpInfo { method: Some(c.method.clone()), tool: c.tool().map(str::to_string), path: Some("body"), jsonrpc: true, ..McpInfo::default() })
            });
            let pd = policy.evaluate(input);
            match txn {
                Some(t) => cases::apply_delegation(policy, t, input, pd).0,
                None => pd,
            }
        })
    }
}

#[cfg(test)]
mod tests;
