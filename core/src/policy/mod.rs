//! Intent-aware request-time policy. Default deny.
//!
//! Evaluation, in order: workload class (first matching pattern) → class
//! limits (token lifetime, standing secrets) → declared intent → destination
//! resource → intent binding and sensitivity ceilings → signed-intent
//! requirements → rules (any matching deny wins; otherwise a matching allow
//! is required) → with a minter, a matched resource (its audience is what is
//! minted for) → in `tasks: registered` mode, a task something vouches for. The policy is compiled once from configuration; evaluation
//! is pure and takes the time as input, so tests and the CLI drive it directly.

pub mod cases;
pub mod intent;
pub mod lint;
pub mod mcp;
pub mod path;
pub mod pattern;
pub mod window;

use crate::config::ConfigError;
use crate::decision::Effect;
use crate::reason::Reason;
use mcp::{ArgCheck, ArgContext, ArgOutcome, Glob, McpCall, McpOp, McpResource, McpSource};
use pattern::{HostPattern, SegPattern};
use serde::{Deserialize, Serialize};
use window::{Window, WindowConfig};

pub const DEFAULT_LEVELS: [&str; 4] = ["public", "internal", "confidential", "restricted"];

fn default_levels() -> Vec<String> {
    DEFAULT_LEVELS.iter().map(|s| s.to_string()).collect()
}
fn default_secret_headers() -> Vec<String> {
    ["x-api-key", "api-key", "proxy-authorization"].iter().map(|s| s.to_string()).collect()
}
fn default_any() -> Vec<String> {
    vec!["*".to_string()]
}
fn default_all_paths() -> Vec<String> {
    vec!["/**".to_string()]
}
fn default_intent_ttl() -> u64 {
    120
}
fn default_decision_ttl() -> u64 {
    30
}
fn default_decision_cache_size() -> usize {
    4096
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Ordered sensitivity labels, least sensitive first.
    #[serde(default = "default_levels")]
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    #[cfg_attr(feature = "schema", schemars(inner(pattern(r"^[a-z0-9._-]{1,128}$"))))]
    pub sensitivity_levels: Vec<String>,
    /// The environment this proxy runs in (e.g. `prod`), for rule conditions.
    #[serde(default)]
    pub environment: Option<String>,
    /// Read the environment from this key of Envoy's node metadata instead.
    #[serde(default)]
    pub environment_from_node_metadata: Option<String>,
    /// Record would-be denials but let requests continue (policy stage only).
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub decision_cache: DecisionCacheConfig,
    /// Headers that carry static credentials (plus `authorization: Basic`).
    #[serde(default = "default_secret_headers")]
    #[cfg_attr(feature = "schema", schemars(inner(pattern(crate::config::HEADER_NAME_PATTERN))))]
    pub standing_secret_headers: Vec<String>,
    /// Resources more sensitive than this level need a signed intent.
    #[serde(default)]
    pub require_signed_intent_above: Option<String>,
    #[serde(default)]
    pub classes: Vec<ClassConfig>,
    /// Callers matching no class: `deny` (default when classes are defined) or `allow`
    /// (default when none are, so identity-only policies work).
    #[serde(default)]
    pub unclassified: Option<Unclassified>,
    #[serde(default)]
    pub resources: Vec<ResourceConfig>,
    #[serde(default)]
    pub intents: Vec<IntentConfig>,
    #[serde(default)]
    pub intent_issuers: Vec<IntentIssuerConfig>,
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    /// Where task ids may come from: `registered` (a minter checks them at every exchange, or
    /// a verified signed intent token carries them) or `declared` (any `x-agent-task` value).
    #[serde(default)]
    pub tasks: TaskMode,
    /// Delegation (issue 13): which (delegator class → delegate class) edges a chain may have,
    /// per intent.
    #[serde(default)]
    pub delegation_rules: Vec<DelegationRuleConfig>,
    /// At most this many delegations in a chain (at most the configuration's
    /// `delegation.max_delegations`, which applies when this is absent).
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(range(max = 8)))]
    pub max_delegations: Option<u32>,
}

/// One allowed delegation edge: a principal of a `from` class may hand work on one of the
/// `intents` to a principal of a `to` class.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct DelegationRuleConfig {
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    pub id: String,
    #[serde(default)]
    pub description: Option<String>,
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    pub intents: Vec<String>,
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    pub from: Vec<String>,
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    pub to: Vec<String>,
}

/// What happens to a verified `txn-token` header at a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum TxnTokenMode {
    /// Removed before the request goes upstream (default).
    #[default]
    Strip,
    /// Sent upstream (verified, unchanged): the service is a delegate that exchanges it.
    Forward,
}

/// How far the filter trusts a task id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum TaskMode {
    /// Every request carries a task, and the task is vouched for: by the minter, which refuses
    /// unknown, ended, expired or unbound tasks at every exchange, or by a verified signed
    /// intent token that names it. Anything else is `task_unregistered`.
    Registered,
    /// The caller's `x-agent-task` is taken as sent (and only required where an intent says
    /// `require_task`). The agent can name a fresh task whenever one ends.
    #[default]
    Declared,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Unclassified {
    Deny,
    Allow,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct DecisionCacheConfig {
    #[serde(default = "default_decision_cache_size")]
    #[cfg_attr(feature = "schema", schemars(range(max = 1000000)))]
    pub size: usize,
    #[serde(default = "default_decision_ttl")]
    #[cfg_attr(feature = "schema", schemars(range(max = 3600)))]
    pub ttl_s: u64,
}

impl Default for DecisionCacheConfig {
    fn default() -> Self {
        DecisionCacheConfig { size: default_decision_cache_size(), ttl_s: default_decision_ttl() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ClassConfig {
    #[cfg_attr(feature = "schema", schemars(pattern(r"^[a-z0-9._-]{1,128}$")))]
    pub name: String,
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    #[cfg_attr(feature = "schema", schemars(inner(pattern(crate::policy::pattern::PRINCIPAL_PATTERN_SCHEMA))))]
    pub principals: Vec<String>,
    /// Longest accepted token lifetime (`exp - iat`), seconds.
    #[serde(default)]
    pub max_token_lifetime_s: Option<u64>,
    #[serde(default)]
    pub intent_required: bool,
    #[serde(default)]
    pub max_sensitivity: Option<String>,
    #[serde(default)]
    pub refuse_standing_secrets: bool,
    /// Who answers for this class's principals (a team or a contact); in every decision record.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(length(min = 1, max = 128)))]
    pub owner: Option<String>,
    /// When the owner should next review what the class is granted (`YYYY-MM-DD`, UTC); lint
    /// warns once it is past.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(pattern(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")))]
    pub review_by: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ResourceConfig {
    #[cfg_attr(feature = "schema", schemars(pattern(r"^[a-z0-9._-]{1,128}$")))]
    pub name: String,
    #[serde(default = "default_any")]
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    pub hosts: Vec<String>,
    #[serde(default = "default_all_paths")]
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    #[cfg_attr(feature = "schema", schemars(inner(pattern(r"^/"))))]
    pub paths: Vec<String>,
    /// Methods this resource covers; empty = all.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(inner(pattern(r"^[A-Z]+$"))))]
    pub methods: Vec<String>,
    #[serde(default)]
    pub sensitivity: Option<String>,
    /// Served by a legacy service that only takes a static secret (see the minter).
    #[serde(default)]
    pub legacy: bool,
    /// Audience for credentials minted for this resource; defaults to the name.
    #[serde(default)]
    pub audience: Option<String>,
    /// The resource is an MCP server (may be `{}`; see [`mcp::McpConfig`]).
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::policy::mcp::schema::mcp"))]
    pub mcp: Option<serde_json::Value>,
    /// Delegation: whether a verified `txn-token` header goes upstream (`forward`) or not.
    #[serde(default)]
    pub txn_token: TxnTokenMode,
    /// Delegation, `forward` resources: the SPIFFE ID of the workload serving this resource; a
    /// forwarded token must name it in `may_act` (a token meant for another delegate is refused).
    #[serde(default)]
    pub workload: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct OperationConfig {
    pub resource: String,
    /// Methods allowed on the resource for this intent; empty = the resource's methods.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(inner(pattern(r"^[A-Z]+$"))))]
    pub methods: Vec<String>,
    /// MCP resources: JSON-RPC methods (globs) this operation may call.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::policy::mcp::schema::globs"))]
    pub mcp_methods: Option<serde_json::Value>,
    /// MCP resources: tools (globs) this operation may call; implies `tools/call`.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::policy::mcp::schema::globs"))]
    pub tools: Option<serde_json::Value>,
    /// MCP resources: resource URIs (globs, `**` too) `resources/read` may read.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::policy::mcp::schema::globs"))]
    pub uris: Option<serde_json::Value>,
    /// MCP resources: prompts (globs) `prompts/get` may get.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::policy::mcp::schema::globs"))]
    pub prompts: Option<serde_json::Value>,
    /// Constraints on `params.arguments`, for every tool or prompt of this operation
    /// (see [`mcp::ArgumentConfig`]).
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::policy::mcp::schema::arguments"))]
    pub arguments: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct IntentConfig {
    #[cfg_attr(feature = "schema", schemars(pattern(r"^[a-z0-9._-]{1,128}$")))]
    pub name: String,
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    pub operations: Vec<OperationConfig>,
    #[serde(default)]
    pub max_sensitivity: Option<String>,
    /// Credential scopes granted for this intent.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Lifetime of credentials granted for this intent, seconds.
    #[serde(default = "default_intent_ttl")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = 3600)))]
    pub ttl_s: u64,
    #[serde(default)]
    pub require_signed: bool,
    /// A task id is required (from the signed intent token when `require_signed`).
    #[serde(default)]
    pub require_task: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct IntentIssuerConfig {
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    pub issuer: String,
    /// The issuer's public keys (JWKS).
    pub jwks: serde_json::Value,
    /// Audiences that name this gateway: an intent token must name one of them, so a token
    /// issued for another gateway cannot be replayed here. Required, non-empty.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    #[cfg_attr(feature = "schema", schemars(inner(length(min = 1))))]
    pub audiences: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum RuleEffect {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    pub id: String,
    pub effect: RuleEffect,
    #[serde(default)]
    pub description: Option<String>,
    /// Principal patterns; empty = any.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(inner(pattern(crate::policy::pattern::PRINCIPAL_PATTERN_SCHEMA))))]
    pub principals: Vec<String>,
    #[serde(default)]
    pub classes: Vec<String>,
    #[serde(default)]
    pub intents: Vec<String>,
    #[serde(default)]
    pub resources: Vec<String>,
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(inner(pattern(r"^[A-Z]+$"))))]
    pub methods: Vec<String>,
    /// Matches only MCP `tools/call` requests for these tools (globs).
    #[serde(default)]
    pub tools: Vec<String>,
    /// Matches only MCP requests with these JSON-RPC methods (globs).
    #[serde(default)]
    pub mcp_methods: Vec<String>,
    /// Matches only resources at most this sensitive.
    #[serde(default)]
    pub max_sensitivity: Option<String>,
    /// Matches only resources at least this sensitive.
    #[serde(default)]
    pub min_sensitivity: Option<String>,
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(inner(length(min = 1))))]
    pub environments: Vec<String>,
    #[serde(default)]
    pub when: Option<WindowConfig>,
    /// Deny rules only: record matches without enforcing them.
    #[serde(default)]
    pub dry_run: bool,
    /// Who answers for this rule (a team or a contact); overrides the class's owner in records.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(length(min = 1, max = 128)))]
    pub owner: Option<String>,
    /// When the owner should next review this rule (`YYYY-MM-DD`, UTC).
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(pattern(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")))]
    pub review_by: Option<String>,
}

// ---------------------------------------------------------------- compiled

#[derive(Debug, Clone)]
pub struct Class {
    pub name: String,
    principals: Vec<SegPattern>,
    max_lifetime: Option<u64>,
    intent_required: bool,
    max_sensitivity: Option<usize>,
    refuse_standing_secrets: bool,
    pub owner: Option<String>,
    /// `review_by`, `YYYY-MM-DD` (for lint).
    pub review_by: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Resource {
    pub name: String,
    hosts: Vec<HostPattern>,
    paths: Vec<SegPattern>,
    methods: Vec<String>,
    pub sensitivity: usize,
    pub legacy: bool,
    pub audience: String,
    pub mcp: Option<McpResource>,
    pub txn_token: TxnTokenMode,
    pub workload: Option<String>,
}

/// A compiled delegation rule.
#[derive(Debug, Clone)]
pub struct DelegationRule {
    pub id: String,
    pub intents: Vec<usize>,
    pub from: Vec<usize>,
    pub to: Vec<usize>,
}

#[derive(Debug, Clone)]
pub struct Intent {
    pub name: String,
    /// (resource index, methods; empty = the resource's).
    operations: Vec<(usize, Vec<String>)>,
    /// MCP operations: (resource index, what they may call).
    mcp_ops: Vec<(usize, McpOp)>,
    max_sensitivity: Option<usize>,
    pub scopes: Vec<String>,
    pub ttl_s: u64,
    require_signed: bool,
    require_task: bool,
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub id: String,
    pub effect: RuleEffect,
    principals: Vec<SegPattern>,
    classes: Vec<usize>,
    intents: Vec<usize>,
    resources: Vec<usize>,
    methods: Vec<String>,
    tools: Vec<Glob>,
    mcp_methods: Vec<Glob>,
    max_sensitivity: Option<usize>,
    min_sensitivity: Option<usize>,
    environments: Vec<String>,
    window: Option<Window>,
    dry_run: bool,
    pub owner: Option<String>,
    /// `review_by`, `YYYY-MM-DD` (for lint).
    pub review_by: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub levels: Vec<String>,
    pub environment: Option<String>,
    pub dry_run: bool,
    pub standing_secret_headers: Vec<String>,
    signed_above: Option<usize>,
    pub classes: Vec<Class>,
    pub unclassified: Unclassified,
    pub resources: Vec<Resource>,
    pub intents: Vec<Intent>,
    pub rules: Vec<Rule>,
    pub cache: DecisionCacheConfig,
    pub tasks: TaskMode,
    pub delegation_rules: Vec<DelegationRule>,
    pub max_delegations: Option<u32>,
}

/// Verified claims of a signed intent token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedIntent {
    pub intents: Vec<String>,
    pub task: Option<String>,
    pub exp: u64,
    /// Stands in for a signed intent: the intent and task a Txn-Token carries (the minter
    /// checked the task's registration when it issued the token, no intent issuer signed
    /// anything). It vouches for the task, never satisfies `require_signed`.
    pub from_txn_token: bool,
}

impl SignedIntent {
    /// Signed by one of the policy's intent issuers (not merely carried by a Txn-Token).
    pub fn by_issuer(&self) -> bool {
        !self.from_txn_token
    }
}

/// Everything the policy judges, already verified and normalised.
#[derive(Debug, Clone)]
pub struct PolicyInput<'a> {
    pub principal: &'a str,
    pub iat: Option<u64>,
    pub exp: u64,
    pub intent: Option<&'a str>,
    pub signed_intent: Option<&'a SignedIntent>,
    /// Task id from `x-agent-task` or the signed intent token.
    pub task: Option<&'a str>,
    pub method: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub now: u64,
    pub environment: Option<&'a str>,
    pub standing_secret: bool,
    /// A minter is configured: every allow is exchanged for a credential there, and the minter
    /// checks the task's registration at every exchange.
    pub minter: bool,
    /// The MCP call, for a POST to an MCP resource.
    pub mcp: Option<&'a McpCall<'a>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyDecision {
    pub effect: Effect,
    pub reason: Reason,
    /// The rule that decided (allow or deny), if any.
    pub rule_id: Option<String>,
    /// Who answers for the decision: the deciding rule's owner, else the caller's class's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Dry-run: the reason this would have been denied, and the dry-run rule that would have.
    pub dry_run_reason: Option<Reason>,
    pub dry_run_rule_id: Option<String>,
    pub class: Option<String>,
    pub resource: Option<String>,
    pub sensitivity: Option<String>,
    pub legacy: bool,
    pub audience: Option<String>,
    pub scopes: Vec<String>,
    pub ttl_s: Option<u64>,
    /// Until when this decision may be reused (earliest time-window boundary consulted).
    pub valid_until: u64,
    /// MCP: the headers do not carry what the policy needs; judge again with the body.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub needs_body: bool,
    /// MCP: the argument constraints checked (values hashed where marked sensitive).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mcp_checked: Vec<ArgCheck>,
    /// MCP: scopes of the intents that would allow a refused call (`insufficient_scope`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub needed_scopes: Vec<String>,
}

impl PolicyDecision {
    /// A decision with nothing matched yet.
    pub fn with(effect: Effect, reason: Reason) -> PolicyDecision {
        PolicyDecision {
            effect,
            reason,
            rule_id: None,
            owner: None,
            dry_run_reason: None,
            dry_run_rule_id: None,
            class: None,
            resource: None,
            sensitivity: None,
            legacy: false,
            audience: None,
            scopes: Vec::new(),
            ttl_s: None,
            valid_until: 0,
            needs_body: false,
            mcp_checked: Vec::new(),
            needed_scopes: Vec::new(),
        }
    }
}

fn level(levels: &[String], field: &str, name: &Option<String>) -> Result<Option<usize>, ConfigError> {
    match name {
        None => Ok(None),
        Some(n) => levels
            .iter()
            .position(|l| l == n)
            .map(Some)
            .ok_or_else(|| ConfigError::new(field, format!("unknown sensitivity level `{n}` (levels: {})", levels.join(", ")))),
    }
}

fn methods(field: &str, m: &[String]) -> Result<Vec<String>, ConfigError> {
    for x in m {
        if x.is_empty() || !x.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(ConfigError::new(field, format!("method `{x}` must be an uppercase HTTP method")));
        }
    }
    Ok(m.to_vec())
}

/// An owner: a team or a contact, printable, at most 128 bytes (it goes into every record).
fn owner_ok(field: &str, o: &Option<String>) -> Result<Option<String>, ConfigError> {
    match o {
        None => Ok(None),
        Some(v) if (1..=128).contains(&v.len()) && !v.chars().any(char::is_control) => Ok(Some(v.clone())),
        Some(_) => Err(ConfigError::new(field, "must be 1 to 128 printable characters")),
    }
}

/// A review date `YYYY-MM-DD` (UTC), a day the calendar has; the filter never reads it, lint does.
fn review_date(field: &str, d: &Option<String>) -> Result<Option<String>, ConfigError> {
    match d {
        None => Ok(None),
        Some(v) if v.len() == 10 && cases::parse_time(&format!("{v}T00:00:00Z")).is_some() => Ok(Some(v.clone())),
        Some(v) => Err(ConfigError::new(field, format!("`{v}` is not a date YYYY-MM-DD"))),
    }
}

fn name_ok(field: &str, n: &str) -> Result<(), ConfigError> {
    if n.is_empty() || n.len() > 128 || !n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)) {
        return Err(ConfigError::new(field, format!("`{n}` must match [a-z0-9._-]{{1,128}}")));
    }
    Ok(())
}

fn index_of(field: &str, kind: &str, names: &[&str], wanted: &[String]) -> Result<Vec<usize>, ConfigError> {
    wanted
        .iter()
        .enumerate()
        .map(|(i, w)| {
            names
                .iter()
                .position(|n| n == w)
                .ok_or_else(|| ConfigError::new(format!("{field}[{i}]"), format!("unknown {kind} `{w}`")))
        })
        .collect()
}

impl Policy {
    /// Validates and compiles. `prefix` is the config path of the policy (e.g. `policy`).
    pub fn compile(c: &PolicyConfig, prefix: &str) -> Result<Policy, ConfigError> {
        let f = |s: &str| format!("{prefix}.{s}");
        if c.sensitivity_levels.is_empty() {
            return Err(ConfigError::new(f("sensitivity_levels"), "at least one level is required"));
        }
        for (i, l) in c.sensitivity_levels.iter().enumerate() {
            name_ok(&f(&format!("sensitivity_levels[{i}]")), l)?;
            if c.sensitivity_levels.iter().filter(|x| *x == l).count() > 1 {
                return Err(ConfigError::new(f(&format!("sensitivity_levels[{i}]")), format!("`{l}` is listed twice")));
            }
        }
        let levels = c.sensitivity_levels.clone();
        if c.environment.is_some() && c.environment_from_node_metadata.is_some() {
            return Err(ConfigError::new(f("environment"), "set either environment or environment_from_node_metadata"));
        }
        for (i, h) in c.standing_secret_headers.iter().enumerate() {
            crate::config::check_header_name(&f(&format!("standing_secret_headers[{i}]")), h)?;
        }
        if c.decision_cache.ttl_s > 3600 {
            return Err(ConfigError::new(f("decision_cache.ttl_s"), "must be at most 3600"));
        }
        if c.decision_cache.size > 1_000_000 {
            return Err(ConfigError::new(f("decision_cache.size"), "must be at most 1000000"));
        }
        let signed_above = level(&levels, &f("require_signed_intent_above"), &c.require_signed_intent_above)?;

        let mut classes = Vec::new();
        for (i, cl) in c.classes.iter().enumerate() {
            let field = f(&format!("classes[{i}]"));
            name_ok(&format!("{field}.name"), &cl.name)?;
            if c.classes.iter().filter(|x| x.name == cl.name).count() > 1 {
                return Err(ConfigError::new(format!("{field}.name"), format!("class `{}` is defined twice", cl.name)));
            }
            if cl.principals.is_empty() {
                return Err(ConfigError::new(format!("{field}.principals"), "at least one pattern is required"));
            }
            let principals = cl
                .principals
                .iter()
                .enumerate()
                .map(|(j, p)| SegPattern::compile(p, false).map_err(|e| ConfigError::new(format!("{field}.principals[{j}]"), e)))
                .collect::<Result<_, _>>()?;
            classes.push(Class {
                name: cl.name.clone(),
                principals,
                max_lifetime: cl.max_token_lifetime_s,
                intent_required: cl.intent_required,
                max_sensitivity: level(&levels, &format!("{field}.max_sensitivity"), &cl.max_sensitivity)?,
                refuse_standing_secrets: cl.refuse_standing_secrets,
                owner: owner_ok(&format!("{field}.owner"), &cl.owner)?,
                review_by: review_date(&format!("{field}.review_by"), &cl.review_by)?,
            });
        }

        let mut resources = Vec::new();
        for (i, r) in c.resources.iter().enumerate() {
            let field = f(&format!("resources[{i}]"));
            name_ok(&format!("{field}.name"), &r.name)?;
            if c.resources.iter().filter(|x| x.name == r.name).count() > 1 {
                return Err(ConfigError::new(format!("{field}.name"), format!("resource `{}` is defined twice", r.name)));
            }
            if r.hosts.is_empty() || r.paths.is_empty() {
                return Err(ConfigError::new(format!("{field}.hosts"), "hosts and paths must not be empty lists"));
            }
            let hosts = r
                .hosts
                .iter()
                .enumerate()
                .map(|(j, h)| HostPattern::compile(h).map_err(|e| ConfigError::new(format!("{field}.hosts[{j}]"), e)))
                .collect::<Result<_, _>>()?;
            let paths = r
                .paths
                .iter()
                .enumerate()
                .map(|(j, p)| {
                    if !p.starts_with('/') {
                        return Err(ConfigError::new(format!("{field}.paths[{j}]"), "must start with `/`"));
                    }
                    SegPattern::compile(p, true).map_err(|e| ConfigError::new(format!("{field}.paths[{j}]"), e))
                })
                .collect::<Result<_, _>>()?;
            let sensitivity = level(&levels, &format!("{field}.sensitivity"), &r.sensitivity)?.unwrap_or(0);
            let mcp = match &r.mcp {
                Some(m) => {
                    let mf = format!("{field}.mcp");
                    Some(McpResource::compile(&mcp::McpConfig::from_value(m, &mf)?, &mf, |fl, n| level(&levels, fl, n), sensitivity)?)
                }
                None => None,
            };
            if let Some(w) = &r.workload {
                if r.txn_token != TxnTokenMode::Forward {
                    return Err(ConfigError::new(format!("{field}.workload"), "applies only to resources with \"txn_token\": \"forward\""));
                }
                crate::identity::spiffe_id::SpiffeId::parse(w)
                    .map_err(|e| ConfigError::new(format!("{field}.workload"), format!("`{w}` is not a valid SPIFFE ID ({e:?})")))?;
            }
            resources.push(Resource {
                txn_token: r.txn_token,
                workload: r.workload.clone(),
                name: r.name.clone(),
                hosts,
                paths,
                methods: methods(&format!("{field}.methods"), &r.methods)?,
                sensitivity,
                legacy: r.legacy,
                audience: r.audience.clone().unwrap_or_else(|| r.name.clone()),
                mcp,
            });
        }
        let resource_names: Vec<&str> = c.resources.iter().map(|r| r.name.as_str()).collect();

        let mut intents = Vec::new();
        for (i, it) in c.intents.iter().enumerate() {
            let field = f(&format!("intents[{i}]"));
            name_ok(&format!("{field}.name"), &it.name)?;
            if c.intents.iter().filter(|x| x.name == it.name).count() > 1 {
                return Err(ConfigError::new(format!("{field}.name"), format!("intent `{}` is defined twice", it.name)));
            }
            if it.operations.is_empty() {
                return Err(ConfigError::new(format!("{field}.operations"), "an intent must allow at least one operation"));
            }
            if it.ttl_s == 0 || it.ttl_s > 3600 {
                return Err(ConfigError::new(format!("{field}.ttl_s"), "must be between 1 and 3600"));
            }
            let mut operations = Vec::new();
            let mut mcp_ops = Vec::new();
            for (j, op) in it.operations.iter().enumerate() {
                let ofield = format!("{field}.operations[{j}]");
                let idx = resource_names
                    .iter()
                    .position(|n| *n == op.resource)
                    .ok_or_else(|| ConfigError::new(format!("{ofield}.resource"), format!("unknown resource `{}`", op.resource)))?;
                let list = |name: &str, v: &Option<serde_json::Value>| mcp::opt_strings(v.as_ref(), &format!("{ofield}.{name}"));
                let (mm, tl, ur, pr) = (list("mcp_methods", &op.mcp_methods)?, list("tools", &op.tools)?, list("uris", &op.uris)?, list("prompts", &op.prompts)?);
                match McpOp::compile(&ofield, &mm, &tl, &ur, &pr, &op.arguments)? {
                    Some(m) => {
                        if resources.get(idx).is_none_or(|r| r.mcp.is_none()) {
                            return Err(ConfigError::new(format!("{ofield}.resource"), format!("`{}` is not an MCP resource (no `mcp` object)", op.resource)));
                        }
                        if !op.methods.is_empty() {
                            return Err(ConfigError::new(format!("{ofield}.methods"), "an MCP operation names mcp_methods, not HTTP methods"));
                        }
                        mcp_ops.push((idx, m));
                    }
                    None => operations.push((idx, methods(&format!("{ofield}.methods"), &op.methods)?)),
                }
            }
            for (j, s) in it.scopes.iter().enumerate() {
                if s.is_empty() || s.bytes().any(|b| b == b' ' || b == b'"' || b == b'\\' || b.is_ascii_control()) {
                    return Err(ConfigError::new(format!("{field}.scopes[{j}]"), "scopes are non-empty tokens without spaces or quotes"));
                }
            }
            intents.push(Intent {
                name: it.name.clone(),
                operations,
                mcp_ops,
                max_sensitivity: level(&levels, &format!("{field}.max_sensitivity"), &it.max_sensitivity)?,
                scopes: it.scopes.clone(),
                ttl_s: it.ttl_s,
                require_signed: it.require_signed,
                require_task: it.require_task,
            });
        }
        let intent_names: Vec<&str> = c.intents.iter().map(|x| x.name.as_str()).collect();
        let class_names: Vec<&str> = c.classes.iter().map(|x| x.name.as_str()).collect();

        let mut rules = Vec::new();
        for (i, r) in c.rules.iter().enumerate() {
            let field = f(&format!("rules[{i}]"));
            if r.id.is_empty() {
                return Err(ConfigError::new(format!("{field}.id"), "must not be empty"));
            }
            if c.rules.iter().filter(|x| x.id == r.id).count() > 1 {
                return Err(ConfigError::new(format!("{field}.id"), format!("rule id `{}` is used twice", r.id)));
            }
            if r.dry_run && r.effect == RuleEffect::Allow {
                return Err(ConfigError::new(format!("{field}.dry_run"), "only deny rules can be dry-run"));
            }
            let principals = r
                .principals
                .iter()
                .enumerate()
                .map(|(j, p)| SegPattern::compile(p, false).map_err(|e| ConfigError::new(format!("{field}.principals[{j}]"), e)))
                .collect::<Result<_, _>>()?;
            let window = match &r.when {
                Some(w) => Some(Window::compile(w).map_err(|e| ConfigError::new(format!("{field}.when"), e))?),
                None => None,
            };
            for (j, e) in r.environments.iter().enumerate() {
                if e.is_empty() {
                    return Err(ConfigError::new(format!("{field}.environments[{j}]"), "must not be empty"));
                }
            }
            rules.push(Rule {
                id: r.id.clone(),
                effect: r.effect,
                principals,
                classes: index_of(&format!("{field}.classes"), "class", &class_names, &r.classes)?,
                intents: index_of(&format!("{field}.intents"), "intent", &intent_names, &r.intents)?,
                resources: index_of(&format!("{field}.resources"), "resource", &resource_names, &r.resources)?,
                methods: methods(&format!("{field}.methods"), &r.methods)?,
                tools: mcp::rule_globs(&format!("{field}.tools"), &r.tools)?,
                mcp_methods: mcp::rule_globs(&format!("{field}.mcp_methods"), &r.mcp_methods)?,
                max_sensitivity: level(&levels, &format!("{field}.max_sensitivity"), &r.max_sensitivity)?,
                min_sensitivity: level(&levels, &format!("{field}.min_sensitivity"), &r.min_sensitivity)?,
                environments: r.environments.clone(),
                window,
                dry_run: r.dry_run,
                owner: owner_ok(&format!("{field}.owner"), &r.owner)?,
                review_by: review_date(&format!("{field}.review_by"), &r.review_by)?,
            });
        }

        let mut delegation_rules = Vec::new();
        for (i, r) in c.delegation_rules.iter().enumerate() {
            let field = f(&format!("delegation_rules[{i}]"));
            if r.id.is_empty() {
                return Err(ConfigError::new(format!("{field}.id"), "must not be empty"));
            }
            if c.delegation_rules.iter().filter(|x| x.id == r.id).count() > 1 {
                return Err(ConfigError::new(format!("{field}.id"), format!("delegation rule id `{}` is used twice", r.id)));
            }
            for (name, list) in [("intents", &r.intents), ("from", &r.from), ("to", &r.to)] {
                if list.is_empty() {
                    return Err(ConfigError::new(format!("{field}.{name}"), "at least one name is required (a delegation rule is never a wildcard)"));
                }
            }
            delegation_rules.push(DelegationRule {
                id: r.id.clone(),
                intents: index_of(&format!("{field}.intents"), "intent", &intent_names, &r.intents)?,
                from: index_of(&format!("{field}.from"), "class", &class_names, &r.from)?,
                to: index_of(&format!("{field}.to"), "class", &class_names, &r.to)?,
            });
        }
        if let Some(m) = c.max_delegations {
            if m > crate::delegation::MAX_DELEGATIONS_CAP {
                return Err(ConfigError::new(f("max_delegations"), format!("must be at most {}", crate::delegation::MAX_DELEGATIONS_CAP)));
            }
        }

        Ok(Policy {
            delegation_rules,
            max_delegations: c.max_delegations,
            levels,
            environment: c.environment.clone(),
            dry_run: c.dry_run,
            standing_secret_headers: c.standing_secret_headers.clone(),
            signed_above,
            unclassified: c.unclassified.unwrap_or(if c.classes.is_empty() { Unclassified::Allow } else { Unclassified::Deny }),
            classes,
            resources,
            intents,
            rules,
            cache: c.decision_cache.clone(),
            tasks: c.tasks,
        })
    }

    pub fn class_of(&self, principal: &str) -> Option<usize> {
        self.classes.iter().position(|c| c.principals.iter().any(|p| p.matches(principal)))
    }

    pub fn resource_of(&self, authority: &str, path: &str, method: &str) -> Option<usize> {
        self.resources.iter().position(|r| {
            r.hosts.iter().any(|h| h.matches(authority))
                && r.paths.iter().any(|p| p.matches(path))
                && (r.methods.is_empty() || r.methods.iter().any(|m| m == method))
        })
    }

    /// Whether the intent may call this tool on this resource (by name; arguments aside): what
    /// a filtered `tools/list` shows. Without an intent, no tool.
    pub fn tool_allowed(&self, intent: Option<&str>, resource: &str, tool: &str) -> bool {
        let (Some(i), Some(r)) = (intent.and_then(|n| self.intent_index(n)), self.resources.iter().position(|r| r.name == resource)) else {
            return false;
        };
        self.intents.get(i).is_some_and(|it| {
            it.mcp_ops.iter().any(|(ri, op)| *ri == r && op.tools.as_ref().is_some_and(|t| mcp::any_glob(t, tool)))
        })
    }

    /// The delegation rule allowing `from` to hand work on `intent` to `to`, if any. A
    /// principal matching no class can be on no edge.
    pub fn delegation_rule(&self, intent: &str, from: &str, to: &str) -> Option<&DelegationRule> {
        let i = self.intent_index(intent)?;
        let (fc, tc) = (self.class_of(from)?, self.class_of(to)?);
        self.delegation_rules.iter().find(|r| r.intents.contains(&i) && r.from.contains(&fc) && r.to.contains(&tc))
    }

    /// The class name of a principal, if it matches one.
    pub fn class_name(&self, principal: &str) -> Option<&str> {
        self.class_of(principal).and_then(|i| self.classes.get(i)).map(|c| c.name.as_str())
    }

    pub fn intent_index(&self, name: &str) -> Option<usize> {
        self.intents.iter().position(|i| i.name == name)
    }

    /// Judges one request. Every path that is not an explicit allow denies.
    // Called for the caller and for every principal of a delegation chain: one copy.
    #[inline(never)]
    pub fn evaluate(&self, input: &PolicyInput<'_>) -> PolicyDecision {
        let mut d = PolicyDecision::with(Effect::Allow, Reason::Allowed);
        d.valid_until = u64::MAX;
        match self.judge(input, &mut d) {
            Ok(()) => d,
            Err((reason, rule)) => {
                d.rule_id = rule;
                if self.dry_run {
                    d.effect = Effect::DryRunDeny;
                    d.dry_run_reason = Some(reason);
                    d.reason = reason;
                } else {
                    d.effect = Effect::Deny;
                    d.reason = reason;
                    d.scopes.clear();
                    d.ttl_s = None;
                }
                d
            }
        }
    }

    fn judge(&self, input: &PolicyInput<'_>, d: &mut PolicyDecision) -> Result<(), (Reason, Option<String>)> {
        let deny = |r: Reason| Err((r, None));
        let class_idx = self.class_of(input.principal);
        let class = class_idx.and_then(|i| self.classes.get(i));
        d.class = class.map(|c| c.name.clone());
        d.owner = class.and_then(|c| c.owner.clone());
        if class.is_none() && self.unclassified == Unclassified::Deny {
            return deny(Reason::UnclassifiedPrincipal);
        }

        if let Some(max) = class.and_then(|c| c.max_lifetime) {
            // Without `iat` the lifetime is unknown: a class with a limit refuses it.
            match input.iat {
                Some(iat) if input.exp.saturating_sub(iat) <= max => {}
                _ => return deny(Reason::TokenLifetimeExceeded),
            }
        }
        if input.standing_secret && class.is_some_and(|c| c.refuse_standing_secrets) {
            return deny(Reason::StandingSecretPresented);
        }

        let res_idx = self.resource_of(input.authority, input.path, input.method);
        let resource = res_idx.and_then(|i| self.resources.get(i));
        // MCP: the call on an MCP resource. A POST there is always a call; without one it is
        // malformed (the filter and the CLI both build it).
        let mcp_res = resource.and_then(|r| r.mcp.as_ref());
        let call = match (mcp_res, input.mcp) {
            (Some(_), Some(c)) => Some(c),
            (Some(_), None) if input.method == "POST" => return deny(Reason::McpMalformed),
            _ => None,
        };
        // Not known yet (the header phase of an old-protocol call): without an intent it may be
        // a session method; the body decides.
        let unknown = call.is_some_and(|c| c.source == McpSource::Unknown);
        d.needs_body = unknown;
        let session = call.is_some_and(|c| mcp::is_session_method(&c.method)) || (unknown && input.intent.is_none());

        let intent_idx = match input.intent {
            None => {
                if class.is_some_and(|c| c.intent_required) && !session {
                    if let (Some(c), Some(ri)) = (call, res_idx) {
                        d.needed_scopes = self.scopes_covering(c, ri);
                    }
                    return deny(Reason::IntentRequired);
                }
                None
            }
            Some(name) => match self.intent_index(name) {
                Some(i) => Some(i),
                None => return deny(Reason::IntentUnknown),
            },
        };
        let intent = intent_idx.and_then(|i| self.intents.get(i));
        // A signed intent token vouches for one declared intent, never for "whatever it lists".
        if input.signed_intent.is_some() && intent.is_none() {
            return deny(Reason::IntentRequired);
        }
        if let (Some(signed), Some(intent)) = (input.signed_intent, intent) {
            if !signed.intents.contains(&intent.name) {
                return deny(Reason::IntentTokenInvalid);
            }
        }

        if let Some(r) = resource {
            d.resource = Some(r.name.clone());
            d.sensitivity = self.levels.get(r.sensitivity).cloned();
            d.legacy = r.legacy;
            d.audience = Some(r.audience.clone());
        }
        // An unknown destination is treated as the most sensitive: fail closed.
        let mut sensitivity = resource.map_or(self.levels.len().saturating_sub(1), |r| r.sensitivity);

        if let (Some(call), Some(mres), Some(ri)) = (call, mcp_res, res_idx) {
            sensitivity = mcp::call_sensitivity(mres, call, sensitivity);
            d.sensitivity = self.levels.get(sensitivity).cloned();
            if !session {
                self.judge_mcp_call(input, call, ri, intent, d)?;
            }
            if let Some(intent) = intent {
                if intent.max_sensitivity.is_some_and(|max| sensitivity > max) {
                    return deny(Reason::SensitivityExceeded);
                }
            }
        } else if let Some(intent) = intent {
            let bound = match (res_idx, resource) {
                (Some(ri), Some(r)) => intent.operations.iter().any(|(op_res, op_methods)| {
                    *op_res == ri
                        && if op_methods.is_empty() {
                            r.methods.is_empty() || r.methods.iter().any(|m| m == input.method)
                        } else {
                            op_methods.iter().any(|m| m == input.method)
                        }
                }),
                _ => false,
            };
            if !bound {
                return deny(Reason::IntentMismatch);
            }
            if intent.max_sensitivity.is_some_and(|max| sensitivity > max) {
                return deny(Reason::SensitivityExceeded);
            }
        }
        if class.and_then(|c| c.max_sensitivity).is_some_and(|max| sensitivity > max) {
            return deny(Reason::SensitivityExceeded);
        }
        let needs_signed = intent.is_some_and(|i| i.require_signed) || self.signed_above.is_some_and(|lvl| sensitivity > lvl);
        if needs_signed && !input.signed_intent.is_some_and(SignedIntent::by_issuer) {
            return deny(Reason::IntentTokenRequired);
        }
        if let Some(intent) = intent.filter(|i| i.require_task) {
            // With a signed intent the task must be bound in the token, not just claimed in a header.
            let bound = if intent.require_signed { input.signed_intent.filter(|s| s.by_issuer()).and_then(|s| s.task.as_deref()) } else { input.task };
            if bound.is_none() {
                return deny(Reason::TaskRequired);
            }
        }

        // Rules: any enforced matching deny wins; otherwise an allow must match (an MCP
        // session method needs none: it is allowed to a verified caller unless denied).
        let mut allow: Option<&Rule> = None;
        let mut dry_deny: Option<&Rule> = None;
        for rule in &self.rules {
            if !self.rule_matches(rule, input, class_idx, intent_idx, res_idx, sensitivity, d) {
                continue;
            }
            match rule.effect {
                RuleEffect::Deny if rule.dry_run => {
                    dry_deny = dry_deny.or(Some(rule));
                }
                RuleEffect::Deny => {
                    if rule.owner.is_some() {
                        d.owner = rule.owner.clone();
                    }
                    return Err((Reason::DeniedByRule, Some(rule.id.clone())));
                }
                RuleEffect::Allow => allow = allow.or(Some(rule)),
            }
        }
        if allow.is_none() && !session {
            return deny(Reason::NoRuleMatched);
        }
        // A credential is minted only for a resource the policy names, with its audience:
        // never for whatever `:authority` the caller sent (confused deputy).
        if input.minter && resource.is_none() {
            return deny(Reason::NoResourceMatched);
        }
        if self.tasks == TaskMode::Registered {
            let Some(task) = input.task else { return deny(Reason::TaskRequired) };
            // Vouched for by the minter (registration is checked at every exchange, and with a
            // minter every allow is exchanged) or by the verified signed intent token.
            let signed = input.signed_intent.and_then(|s| s.task.as_deref()) == Some(task);
            if !input.minter && !signed {
                return deny(Reason::TaskUnregistered);
            }
        }
        d.rule_id = allow.map(|a| a.id.clone());
        if let Some(o) = allow.and_then(|a| a.owner.as_ref()) {
            d.owner = Some(o.clone());
        }
        if let Some(dr) = dry_deny {
            d.effect = Effect::DryRunDeny;
            d.dry_run_reason = Some(Reason::DeniedByRule);
            d.reason = Reason::DeniedByRule;
            d.dry_run_rule_id = Some(dr.id.clone());
        }
        if let Some(intent) = intent {
            d.scopes = intent.scopes.clone();
            d.ttl_s = Some(intent.ttl_s);
        }
        Ok(())
    }

    /// A non-session MCP call: an intent operation on this resource must name it, and its
    /// argument constraints must hold. Sets `needs_body` when the headers do not say enough.
    fn judge_mcp_call(&self, input: &PolicyInput<'_>, call: &McpCall, ri: usize, intent: Option<&Intent>, d: &mut PolicyDecision) -> Result<(), (Reason, Option<String>)> {
        let Some(intent) = intent else {
            d.needed_scopes = self.scopes_covering(call, ri);
            return Err((Reason::IntentRequired, None));
        };
        if call.source == McpSource::Unknown {
            // Some operation of the intent on this resource could allow the call: the body says.
            if intent.mcp_ops.iter().any(|(r, _)| *r == ri) {
                d.needs_body = true;
                return Ok(());
            }
            return Err((Reason::IntentMismatch, None));
        }
        let mut on_resource = false;
        let mut covered = false;
        let mut need_body = false;
        let mut failed: Option<Vec<ArgCheck>> = None;
        let ctx = ArgContext { task: input.task, principal: input.principal, intent: Some(intent.name.as_str()) };
        for (_, op) in intent.mcp_ops.iter().filter(|(r, _)| *r == ri) {
            on_resource = true;
            if !op.covers(call) {
                continue;
            }
            covered = true;
            match op.check_arguments(call, &ctx) {
                ArgOutcome::Pass(checked) => {
                    d.mcp_checked = checked;
                    return Ok(());
                }
                ArgOutcome::NeedBody => need_body = true,
                ArgOutcome::Fail(checked) => {
                    failed.get_or_insert(checked);
                }
            }
        }
        if need_body {
            // Allowed as far as the headers go; the arguments they do not mirror are judged
            // with the body.
            d.needs_body = true;
            return Ok(());
        }
        if let Some(checked) = failed {
            d.mcp_checked = checked;
            // An argument bound to the task cannot match a request without one: the task is
            // what is missing (as the filter finds from the headers, before any argument).
            let binds_task = || intent.mcp_ops.iter().any(|(r, op)| *r == ri && op.covers(call) && op.binds_task());
            if input.task.is_none() && binds_task() {
                return Err((Reason::TaskRequired, None));
            }
            return Err((Reason::ArgumentNotAllowed, None));
        }
        debug_assert!(!covered);
        d.needed_scopes = self.scopes_covering(call, ri);
        Err((if on_resource { Reason::ToolNotAllowed } else { Reason::IntentMismatch }, None))
    }

    /// Scopes of every intent with an operation on this resource that names the call (for
    /// `insufficient_scope`). Refusals only: never on the allow path.
    fn scopes_covering(&self, call: &McpCall, ri: usize) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for it in &self.intents {
            if it.mcp_ops.iter().any(|(r, op)| *r == ri && op.covers(call)) {
                for s in &it.scopes {
                    if !out.contains(s) {
                        out.push(s.clone());
                    }
                }
            }
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn rule_matches(
        &self,
        rule: &Rule,
        input: &PolicyInput<'_>,
        class: Option<usize>,
        intent: Option<usize>,
        resource: Option<usize>,
        sensitivity: usize,
        d: &mut PolicyDecision,
    ) -> bool {
        match self.rule_mismatch(rule, input, class, intent, resource, sensitivity) {
            None => {
                if let Some(w) = &rule.window {
                    d.valid_until = d.valid_until.min(w.next_boundary(input.now));
                }
                true
            }
            Some(Mismatch::Window) => {
                // Everything but the clock matched: the decision expires at the next boundary.
                if let Some(w) = &rule.window {
                    d.valid_until = d.valid_until.min(w.next_boundary(input.now));
                }
                false
            }
            Some(_) => false,
        }
    }

    /// Why `rule` does not match, or `None` if it does. Allocation-free: this runs per rule per request.
    #[allow(clippy::too_many_arguments)]
    fn rule_mismatch(
        &self,
        rule: &Rule,
        input: &PolicyInput<'_>,
        class: Option<usize>,
        intent: Option<usize>,
        resource: Option<usize>,
        sensitivity: usize,
    ) -> Option<Mismatch> {
        if !rule.classes.is_empty() && !class.is_some_and(|c| rule.classes.contains(&c)) {
            return Some(Mismatch::Class);
        }
        if !rule.intents.is_empty() && !intent.is_some_and(|i| rule.intents.contains(&i)) {
            return Some(Mismatch::Intent);
        }
        if !rule.resources.is_empty() && !resource.is_some_and(|r| rule.resources.contains(&r)) {
            return Some(Mismatch::Resource);
        }
        if !rule.methods.is_empty() && !rule.methods.iter().any(|m| m == input.method) {
            return Some(Mismatch::Method);
        }
        if input.mcp.is_some_and(|c| c.source == McpSource::Unknown) && !(rule.mcp_methods.is_empty() && rule.tools.is_empty()) {
            // The call is not known yet: an allow rule for MCP operations may match it, a deny
            // rule is left to the body's judgement (which runs before anything executes).
            if rule.effect == RuleEffect::Deny {
                return Some(Mismatch::McpMethod);
            }
        } else {
            if !rule.mcp_methods.is_empty() && !input.mcp.is_some_and(|c| mcp::any_glob(&rule.mcp_methods, &c.method)) {
                return Some(Mismatch::McpMethod);
            }
            if !rule.tools.is_empty() && !input.mcp.and_then(McpCall::tool).is_some_and(|t| mcp::any_glob(&rule.tools, t)) {
                return Some(Mismatch::Tool);
            }
        }
        if rule.max_sensitivity.is_some_and(|m| sensitivity > m) {
            return Some(Mismatch::TooSensitive);
        }
        if rule.min_sensitivity.is_some_and(|m| sensitivity < m) {
            return Some(Mismatch::NotSensitiveEnough);
        }
        if !rule.environments.is_empty() && !input.environment.is_some_and(|e| rule.environments.iter().any(|x| x == e)) {
            return Some(Mismatch::Environment);
        }
        // String matching last: the index checks above reject most rules cheaply.
        if !rule.principals.is_empty() && !rule.principals.iter().any(|p| p.matches(input.principal)) {
            return Some(Mismatch::Principal);
        }
        if let Some(w) = &rule.window {
            if !w.contains(input.now) {
                return Some(Mismatch::Window);
            }
        }
        None
    }

    fn describe(&self, rule: &Rule, m: Mismatch, input: &PolicyInput<'_>) -> String {
        match m {
            Mismatch::Principal => {
                let pats: Vec<&str> = rule.principals.iter().map(SegPattern::source).collect();
                format!("principal matches none of {pats:?}")
            }
            Mismatch::Class => format!("class is not one of {:?}", self.names(&rule.classes, |i| self.classes.get(i).map(|c| c.name.as_str()))),
            Mismatch::Intent => format!("intent is not one of {:?}", self.names(&rule.intents, |i| self.intents.get(i).map(|x| x.name.as_str()))),
            Mismatch::Resource => format!("resource is not one of {:?}", self.names(&rule.resources, |i| self.resources.get(i).map(|x| x.name.as_str()))),
            Mismatch::Method => format!("method is not one of {:?}", rule.methods),
            Mismatch::McpMethod => format!("MCP method is not one of {:?}", rule.mcp_methods.iter().map(Glob::source).collect::<Vec<_>>()),
            Mismatch::Tool => format!("not a tools/call for one of {:?}", rule.tools.iter().map(Glob::source).collect::<Vec<_>>()),
            Mismatch::TooSensitive => "resource is more sensitive than the rule's max_sensitivity".into(),
            Mismatch::NotSensitiveEnough => "resource is less sensitive than the rule's min_sensitivity".into(),
            Mismatch::Environment => format!("environment {:?} is not one of {:?}", input.environment, rule.environments),
            Mismatch::Window => "outside the rule's time window".into(),
        }
    }

    fn names<'a>(&'a self, idx: &[usize], f: impl Fn(usize) -> Option<&'a str>) -> Vec<&'a str> {
        idx.iter().filter_map(|i| f(*i)).collect()
    }

    /// Each rule, and why it matched or not, next to the decision itself.
    pub fn explain(&self, input: &PolicyInput<'_>) -> Explanation {
        let decision = self.evaluate(input);
        let class = self.class_of(input.principal);
        let intent = input.intent.and_then(|n| self.intent_index(n));
        let resource = self.resource_of(input.authority, input.path, input.method);
        let res = resource.and_then(|r| self.resources.get(r));
        let mut sensitivity = res.map_or(self.levels.len().saturating_sub(1), |r| r.sensitivity);
        if let (Some(m), Some(call)) = (res.and_then(|r| r.mcp.as_ref()), input.mcp) {
            sensitivity = mcp::call_sensitivity(m, call, sensitivity);
        }
        let rules = self
            .rules
            .iter()
            .map(|r| {
                let why_not = self.rule_mismatch(r, input, class, intent, resource, sensitivity).map(|m| self.describe(r, m, input));
                RuleTrace { id: r.id.clone(), effect: r.effect, dry_run: r.dry_run, matched: why_not.is_none(), why_not }
            })
            .collect();
        Explanation { decision, rules, delegation: None }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mismatch {
    Principal,
    Class,
    Intent,
    Resource,
    Method,
    McpMethod,
    Tool,
    TooSensitive,
    NotSensitiveEnough,
    Environment,
    Window,
}

#[derive(Debug, Clone, Serialize)]
pub struct RuleTrace {
    pub id: String,
    pub effect: RuleEffect,
    pub dry_run: bool,
    pub matched: bool,
    pub why_not: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub decision: PolicyDecision,
    pub rules: Vec<RuleTrace>,
    /// A delegated request: each edge and each principal's judgement.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delegation: Option<crate::delegation::judge::Judgement>,
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod mcp_tests;
