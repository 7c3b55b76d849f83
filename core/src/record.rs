//! Decision records: one per request that reaches the filter, built in the
//! core, delivered by the shell as a log line and as Envoy filter state.
//!
//! Records carry hashes and ids, never credentials: the caller's token appears
//! as a short hash, a minted credential as its `jti` and expiry.

use crate::decision::Effect;
use crate::engine::Decision;
use serde::Serialize;

/// Fixed prefix of the decision log line, for log pipelines to select on.
pub const LOG_PREFIX: &str = "mandate.decision ";
/// Filter-state key (Envoy exposes it as `wasm.mandate.decision`).
pub const FILTER_STATE_KEY: &str = "mandate.decision";

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct CredentialInfo {
    pub jti: Option<String>,
    pub exp: Option<u64>,
    pub kind: Option<&'static str>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct CacheHits {
    pub identity: bool,
    pub decision: bool,
    pub credential: bool,
}

/// The MCP call of a request: method, tool, which path decided, the arguments checked.
#[derive(Debug, Clone, Serialize)]
pub struct McpRecord<'a> {
    pub method: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<&'a str>,
    pub path: Option<&'static str>,
    /// Body path: what the credential minted from the headers is scoped to (`tool`, `intent`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential_scope: Option<&'static str>,
    pub checked: &'a [crate::policy::mcp::ArgCheck],
}

#[derive(Debug, Clone, Serialize)]
pub struct DecisionRecord<'a> {
    /// Unix time of the decision, milliseconds.
    pub ts_ms: u64,
    pub decision_id: &'a str,
    pub effect: Effect,
    pub reason: &'static str,
    pub dry_run: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dry_run_rule_id: Option<&'a str>,
    pub identity: Option<&'a str>,
    pub trust_domain: Option<&'a str>,
    pub class: Option<&'a str>,
    /// Who answers for the decision (the deciding rule's `owner`, else the class's).
    pub owner: Option<&'a str>,
    pub token_hash: Option<&'a str>,
    pub intent: Option<&'a str>,
    pub task: Option<&'a str>,
    pub intent_signed: bool,
    /// Delegated requests: the chain, original principal first (`null` otherwise).
    pub delegation: Option<&'a crate::delegation::DelegationInfo>,
    pub method: Option<&'a str>,
    pub authority: Option<&'a str>,
    pub path: Option<&'a str>,
    pub resource: Option<&'a str>,
    pub sensitivity: Option<&'a str>,
    pub environment: Option<&'a str>,
    pub scopes: &'a [String],
    pub ttl_s: Option<u64>,
    pub credential: Option<&'a CredentialInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mcp: Option<McpRecord<'a>>,
    /// Why no credential went upstream although a minter is configured (`dry_run`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential_withheld: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub degraded: Option<&'static str>,
    pub cache: CacheHits,
    pub duration_us: u64,
    pub request_id: Option<&'a str>,
    pub traceparent: Option<&'a str>,
    pub plugin_version: &'static str,
    pub policy_hash: &'a str,
}

const EMPTY: &[String] = &[];

impl<'a> DecisionRecord<'a> {
    pub fn new(d: &'a Decision, environment: Option<&'a str>, policy_hash: &'a str, ts_ms: u64, duration_us: u64) -> Self {
        let p = d.policy.as_deref();
        let id = d.identity.as_deref();
        DecisionRecord {
            ts_ms,
            decision_id: &d.id,
            effect: d.effect(),
            reason: d.reason().code(),
            dry_run: d.effect() == Effect::DryRunDeny,
            rule_id: p.and_then(|p| p.rule_id.as_deref()),
            dry_run_rule_id: p.and_then(|p| p.dry_run_rule_id.as_deref()),
            identity: id.map(|i| i.principal.as_str()),
            trust_domain: id.and_then(|i| i.trust_domain.as_deref()),
            class: p.and_then(|p| p.class.as_deref()),
            owner: p.and_then(|p| p.owner.as_deref()),
            token_hash: id.map(|i| i.token_hash.as_str()).filter(|h| !h.is_empty()),
            intent: d.intent.as_deref(),
            task: d.task.as_deref(),
            intent_signed: d.intent_signed,
            delegation: d.delegation.as_deref(),
            method: d.method.as_deref(),
            authority: d.authority.as_deref(),
            path: d.path.as_deref(),
            resource: p.and_then(|p| p.resource.as_deref()),
            sensitivity: p.and_then(|p| p.sensitivity.as_deref()),
            environment,
            scopes: p.map_or(EMPTY, |p| p.scopes.as_slice()),
            ttl_s: p.and_then(|p| p.ttl_s),
            credential: d.credential.as_ref(),
            mcp: d.mcp.as_deref().map(|m| McpRecord {
                method: m.method.as_deref(),
                tool: m.tool.as_deref(),
                path: m.path,
                credential_scope: m.credential_scope.filter(|_| d.credential.is_some()),
                checked: p.map_or(&[][..], |p| p.mcp_checked.as_slice()),
            }),
            credential_withheld: d.credential_withheld,
            degraded: d.degraded,
            cache: CacheHits { identity: d.identity_cache_hit, decision: d.decision_cache_hit, credential: d.credential_cache_hit },
            duration_us,
            request_id: d.request_id.as_deref(),
            traceparent: d.traceparent.as_deref(),
            plugin_version: crate::VERSION,
            policy_hash,
        }
    }

    pub fn to_json(&self) -> String {
        let mut out = Vec::with_capacity(1024);
        self.write_json(&mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// Appends the record's JSON to `out` (a buffer the caller reuses across requests).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let start = out.len();
        if serde_json::to_writer(&mut *out, self).is_err() {
            out.truncate(start);
            out.extend_from_slice(b"{\"error\":\"record serialisation failed\"}");
        }
    }
}

/// Copies a correlation header only if it is short, printable ASCII: it is
/// caller-controlled and ends up in logs.
pub fn correlation_value(v: &[u8]) -> Option<String> {
    if v.is_empty() || v.len() > 128 || !v.iter().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    std::str::from_utf8(v).ok().map(str::to_string)
}
