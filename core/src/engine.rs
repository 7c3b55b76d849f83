//! The request path: identity → intent → policy → mint → inject → log.
//!
//! Host-independent: the proxy-wasm shell gathers the inputs (headers, time)
//! in as few host calls as it can, calls [`Engine::on_request`] and applies
//! the returned [`Verdict`].

use crate::config::{Config, ConfigError};
use crate::decision::{DecisionIds, Effect, LocalReply};
use crate::delegation::{self, DelegationInfo, DelegationVerifier, TxnToken};
use crate::headers::{Duplicate, Headers};
use crate::identity::{short_hash, token_digest, Identity, Verifier};
use crate::mint::{self, Credential, CredentialCache, MintError, MintRequest, RevocationFeed};
use crate::record::CredentialInfo;
use crate::policy::intent::{self, IntentVerifier};
use crate::policy::path::{normalize, normalize_authority};
use crate::mcp;
use crate::policy::mcp::{BodyMode, McpArgs, McpCall, McpSource};
use crate::policy::{Policy, PolicyDecision, PolicyInput, SignedIntent};
use crate::reason::Reason;
use lru::LruCache;
use std::num::NonZeroUsize;
use std::rc::Rc;

/// Header edits to apply before the request goes upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderEdits {
    pub remove: Vec<String>,
    pub set: Vec<(String, Vec<u8>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Forward upstream after applying these edits.
    Forward(HeaderEdits),
    /// Answer locally; the request never reaches the service.
    Reply(LocalReply),
    /// Obtain a credential from the minter first, then finish with [`Engine::finish_mint`].
    Mint(Box<MintPlan>),
    /// MCP: the headers allow the call as far as they go, but the body must still be judged.
    /// First apply [`BodyPlan::take_header_verdict`] (forward, or mint then forward): the
    /// headers go on (a proxy holds a body back from a filter that paused its headers, so the
    /// body can only be judged after they continue). Then buffer the body (at most
    /// `max_body_bytes`; over it, [`Engine::body_too_large`]) and finish with
    /// [`Engine::on_request_body`], which forwards the body or refuses the call.
    NeedBody(Box<BodyPlan>),
}

/// A request whose body is still to be judged: what was read from the headers.
#[derive(Clone)]
pub struct BodyPlan {
    inputs: Rc<JudgeInputs>,
    identity: Rc<Identity>,
    /// The tool the header phase minted the credential for (`Mcp-Name`), if any.
    tool: Option<String>,
    /// What to do with the headers now.
    header: Option<Box<Verdict>>,
    pub max_body_bytes: usize,
}

impl BodyPlan {
    /// The header phase's verdict (forward, mint, or refuse): taken once.
    pub fn take_header_verdict(&mut self) -> Option<Verdict> {
        self.header.take().map(|v| *v)
    }
}

impl std::fmt::Debug for BodyPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        write!(f, "BodyPlan(max_body_bytes={})", self.max_body_bytes)
    }
}

impl PartialEq for BodyPlan {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}
impl Eq for BodyPlan {}

/// Everything judged from the request headers, kept while the body is read.
#[derive(Clone)]
struct JudgeInputs {
    method: Rc<str>,
    authority: Rc<str>,
    path: Rc<str>,
    rewrite: Option<Vec<u8>>,
    intent: Option<Rc<str>>,
    task: Option<Rc<str>>,
    signed: Option<SignedIntent>,
    standing_secret: bool,
    /// MCP: the headers (checked against the body when it is read).
    mcp: Option<mcp::headers::McpHeaders>,
    max_body_bytes: usize,
    /// Delegation: the verified Txn-Token (chain checked).
    txn: Option<Rc<TxnToken>>,
}

enum Judgement {
    Done(Judged),
    /// Allowed as far as the headers go (this judgement); the body decides.
    NeedBody(Box<(JudgeInputs, Judged)>),
}

/// An MCP request: how it is answered and what the record says about the call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct McpInfo {
    pub method: Option<String>,
    pub tool: Option<String>,
    /// `header` or `body`: which path decided.
    pub path: Option<&'static str>,
    /// A POST: refusals answer with a JSON-RPC error.
    pub jsonrpc: bool,
    /// RFC 9728 metadata URL for `WWW-Authenticate` on 401s.
    pub resource_metadata: Option<String>,
    pub filter_tools_list: bool,
    /// The body path: what the credential minted in the header phase is scoped to
    /// (`tool`: the `Mcp-Name` tool; `intent`: the intent on this resource, the tool not being
    /// known from old-protocol headers).
    pub credential_scope: Option<&'static str>,
}

/// A `tools/list` answer to narrow for its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolsFilter {
    pub intent: Option<Rc<str>>,
    pub resource: String,
    pub decision_id: String,
}

/// Path of the RFC 9728 metadata documents.
pub const WELL_KNOWN: &str = "/.well-known/oauth-protected-resource";

/// The path of an http(s) URL (`/` when it has none); `None` when it is not one.
fn resource_path(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"))?;
    Some(rest.find('/').and_then(|i| rest.get(i..)).unwrap_or("/"))
}

/// RFC 9728 §3.1: the metadata URL inserts the well-known path between the resource's
/// authority and its path. Built from configuration only, never from the request.
fn metadata_url(resource: &str) -> Option<String> {
    let scheme_len = if resource.starts_with("https://") { 8 } else if resource.starts_with("http://") { 7 } else { return None };
    let rest = resource.get(scheme_len..)?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (rest.get(..i)?, rest.get(i..)?),
        None => (rest, ""),
    };
    let path = if path == "/" { "" } else { path };
    Some(format!("{}{authority}{WELL_KNOWN}{path}", resource.get(..scheme_len)?))
}

/// A pending credential exchange: what to send, and the edits to apply once it lands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintPlan {
    /// Credential cache key: requests sharing it share one exchange (single flight).
    pub key: [u8; 16],
    /// The minted token's expected `sub`: the caller, or the Txn-Token's original principal.
    pub subject: String,
    /// Delegated requests: the expected `act.sub` (the caller) and `txn`.
    pub actor: Option<String>,
    pub txn: Option<String>,
    pub request: MintRequest,
    pub edits: HeaderEdits,
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub timeout_ms: u64,
}

impl MintPlan {
    pub fn body(&self) -> Vec<u8> {
        self.request.form_body()
    }
}

/// What one revocation poll brought.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedReport {
    /// Entries applied (revoked set updated, matching credentials purged).
    pub received: usize,
    /// Entries of unknown kinds, skipped.
    pub skipped: usize,
    /// The minter's epoch changed from a known one (or it said `reset`): its cursor was taken.
    pub reset: bool,
    pub more: bool,
    pub cursor: u64,
}

/// A revocation poll the shell should dispatch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollPlan {
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub timeout_ms: u64,
}

/// What was decided about one request, and on what grounds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    pub id: String,
    pub effect: Option<Effect>,
    pub reason: Option<Reason>,
    pub identity: Option<Rc<Identity>>,
    pub intent: Option<Rc<str>>,
    pub task: Option<Rc<str>>,
    pub intent_signed: bool,
    pub method: Option<Rc<str>>,
    pub authority: Option<Rc<str>>,
    pub path: Option<Rc<str>>,
    pub policy: Option<Rc<PolicyDecision>>,
    pub identity_cache_hit: bool,
    pub decision_cache_hit: bool,
    pub credential_cache_hit: bool,
    /// Whether a token was found and verification attempted (for cache hit/miss counting).
    pub identity_checked: bool,
    pub credential: Option<crate::record::CredentialInfo>,
    /// Why no credential was minted although a minter is configured (`dry_run`: a would-be
    /// denial goes upstream, but never with a credential).
    pub credential_withheld: Option<&'static str>,
    /// Set when the request went upstream with a weaker credential than a minted one.
    pub degraded: Option<&'static str>,
    pub request_id: Option<String>,
    pub traceparent: Option<String>,
    /// MCP requests: the call and how to answer.
    pub mcp: Option<Rc<McpInfo>>,
    /// The JSON-RPC `id` of the request, once its body was read.
    pub mcp_id: Option<serde_json::Value>,
    /// The body was not JSON (error code -32700).
    pub mcp_not_json: bool,
    /// Delegated requests: the chain (and where it was refused).
    pub delegation: Option<Rc<DelegationInfo>>,
}

impl Decision {
    pub fn effect(&self) -> Effect {
        self.effect.unwrap_or(Effect::Deny)
    }
    pub fn reason(&self) -> Reason {
        self.reason.unwrap_or(Reason::InternalError)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub decision: Decision,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub decision_cache_hits: u64,
    pub decision_cache_misses: u64,
    pub credential_cache_hits: u64,
    pub credential_cache_misses: u64,
    pub revocation_polls: u64,
    pub revocation_poll_failures: u64,
}

/// The policy's judgement of one operation by one verified token, with everything derived
/// from the request that the warm path would otherwise parse again.
struct Judged {
    policy: Rc<PolicyDecision>,
    method: Rc<str>,
    authority: Rc<str>,
    /// Normalised.
    path: Rc<str>,
    intent: Option<Rc<str>>,
    task: Option<Rc<str>>,
    intent_signed: bool,
    /// The normalised request target, when it differs from what was sent.
    rewrite: Option<Vec<u8>>,
    /// Set when a minter is configured and the policy allowed a matched resource.
    credential_key: Option<[u8; 16]>,
    expires_at: u64,
    /// MCP calls decided from the headers (never from a body: those are not cached).
    mcp: Option<Rc<McpInfo>>,
    /// Allowed as far as the headers go, the body decides: what the body is judged with. The
    /// header phase is cached like any judgement (its inputs are all in the key); the body
    /// never is.
    body: Option<Rc<JudgeInputs>>,
    /// Delegation: the verified Txn-Token, what the record says, and the refusal of steps 5
    /// to 7 (reported after the revocation checks, step 4, which run on every request).
    txn: Option<Rc<TxnToken>>,
    delegation: Option<Rc<DelegationInfo>>,
    delegation_failure: Option<Reason>,
    /// The grants within the token need the MCP body.
    delegation_needs_body: bool,
    /// The matched resource takes the verified Txn-Token upstream.
    forward_txn: bool,
}

/// Longest decision-cache key kept (serial, flags and the six fields as sent): with the path
/// stored twice more in the entry, at most ~6 KB per entry.
const MAX_CACHED_KEY_BYTES: usize = 2048;

/// The request's inputs to the policy exactly as sent (before any parsing), so that a
/// repeat of the same bytes by the same verified token can reuse the judgement.
struct Sent<'h> {
    fields: [Result<Option<&'h [u8]>, Duplicate>; 6],
    /// Some `mcp-*` header was sent (looked for only when the policy has MCP resources).
    mcp: bool,
}

impl<'h> Sent<'h> {
    const NAMES: [&'static str; 6] = [":method", ":authority", ":path", intent::INTENT_HEADER, intent::TASK_HEADER, intent::INTENT_TOKEN_HEADER];

    /// One pass over the headers.
    fn read(h: &'h Headers, look_for_mcp: bool) -> Self {
        let mut fields: [Result<Option<&'h [u8]>, Duplicate>; 6] = [Ok(None); 6];
        let mut mcp = false;
        for (k, v) in h.pairs() {
            if let Some(i) = Sent::NAMES.iter().position(|n| n.len() == k.len() && k.eq_ignore_ascii_case(n.as_bytes())) {
                if let Some(f) = fields.get_mut(i) {
                    *f = match f {
                        Ok(None) => Ok(Some(v)),
                        _ => Err(Duplicate),
                    };
                }
            } else if look_for_mcp && !mcp && is_mcp_header(k) {
                mcp = true;
            }
        }
        Sent { fields, mcp }
    }

    /// A repeated header is judged (and refused) on the slow path, never looked up.
    fn unambiguous(&self) -> bool {
        self.fields.iter().all(Result::is_ok)
    }

    /// The decision-cache key: the verified token's serial and every field, length-prefixed;
    /// then, if any, every `mcp-*` header in order (an MCP call decided from its headers).
    fn key_into(&self, buf: &mut Vec<u8>, serial: u64, txn: Option<u64>, standing_secret: bool, h: &Headers) {
        buf.clear();
        buf.extend_from_slice(&serial.to_le_bytes());
        // A delegated request: the verified Txn-Token's serial (another chain, another key).
        match txn {
            Some(t) => {
                buf.push(1);
                buf.extend_from_slice(&t.to_le_bytes());
            }
            None => buf.push(0),
        }
        buf.push(u8::from(standing_secret));
        let put = |buf: &mut Vec<u8>, v: &[u8]| {
            buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
            buf.extend_from_slice(v);
        };
        for field in &self.fields {
            match field {
                Ok(Some(v)) => {
                    buf.push(1);
                    put(buf, v);
                }
                _ => buf.push(0),
            }
        }
        if self.mcp {
            for (k, v) in h.pairs().filter(|(k, _)| is_mcp_header(k)) {
                buf.push(2);
                put(buf, k);
                put(buf, v);
            }
        }
    }
}

fn is_mcp_header(name: &[u8]) -> bool {
    name.get(..4).is_some_and(|p| p.eq_ignore_ascii_case(b"mcp-"))
}

pub struct Engine {
    config: Config,
    ids: DecisionIds,
    pub identity: Verifier,
    policy: Option<Policy>,
    intents: IntentVerifier,
    environment: Option<String>,
    decisions: Option<LruCache<Box<[u8]>, Rc<Judged>, std::collections::hash_map::RandomState>>,
    /// Reused for decision-cache keys: no allocation on a hit.
    key_buf: Vec<u8>,
    credentials: CredentialCache,
    /// The revocation feed: revoked set, cursor, epoch, freshness and poll schedule.
    pub feed: RevocationFeed,
    pub stats: EngineStats,
    /// The policy has MCP resources (MCP work is skipped entirely otherwise).
    has_mcp: bool,
    /// Some MCP resource publishes RFC 9728 metadata.
    mcp_metadata: bool,
    /// Delegation: the Txn-Token verifier (its keys live in the identity bundle store).
    delegation: Option<DelegationVerifier>,
    /// The effective `max_delegations` (the policy's when lower than the configuration's).
    delegation_cap: u32,
}

/// Inputs gathered by the shell for one request.
pub struct Request<'a> {
    pub headers: &'a Headers,
    /// Unix time, seconds.
    pub now: u64,
}

type Step<T> = Result<T, Reason>;

impl Engine {
    /// `host_environment` is the environment read from the host (node metadata), if configured.
    pub fn new(config: Config, id_seed: u64, host_environment: Option<String>) -> Result<Engine, ConfigError> {
        let mut identity = Verifier::new(&config.identity).map_err(|e| ConfigError::new("identity", e))?;
        let delegation = match &config.delegation {
            Some(dc) => Some(DelegationVerifier::new(dc, &mut identity.bundles).map_err(|e| ConfigError::new("delegation.keys", e))?),
            None => None,
        };
        let (policy, intents) = match &config.policy {
            Some(p) => (
                Some(Policy::compile(p, "policy")?),
                IntentVerifier::new(&p.intent_issuers, config.identity.clock_skew_s, "policy.intent_issuers")?,
            ),
            None => (None, IntentVerifier::new(&[], 0, "policy.intent_issuers")?),
        };
        let environment = policy.as_ref().and_then(|p| p.environment.clone()).or(host_environment);
        // Keys carry caller-chosen bytes: SipHash with per-VM random keys, so no caller can
        // aim entries at one bucket.
        let decisions = policy
            .as_ref()
            .and_then(|p| NonZeroUsize::new(p.cache.size))
            .map(|n| LruCache::with_hasher(n, std::collections::hash_map::RandomState::new()));
        let credentials = config.minter.as_ref().map_or(CredentialCache::new(0, 0), |m| CredentialCache::new(m.cache_size, m.refresh_margin_s));
        let has_mcp = policy.as_ref().is_some_and(|p| p.resources.iter().any(|r| r.mcp.is_some()));
        let mcp_metadata = policy.as_ref().is_some_and(|p| p.resources.iter().any(|r| r.mcp.as_ref().is_some_and(|m| m.metadata.is_some())));
        let delegation_cap = config
            .delegation
            .as_ref()
            .map_or(0, |dc| policy.as_ref().and_then(|p| p.max_delegations).map_or(dc.max_delegations, |pm| pm.min(dc.max_delegations)));
        Ok(Engine {
            delegation,
            delegation_cap,
            has_mcp,
            mcp_metadata,
            credentials,
            feed: RevocationFeed::default(),
            config,
            ids: DecisionIds::new(id_seed),
            identity,
            policy,
            intents,
            environment,
            decisions,
            key_buf: Vec::with_capacity(256),
            stats: EngineStats::default(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn environment(&self) -> Option<&str> {
        self.environment.as_deref()
    }

    pub fn policy(&self) -> Option<&Policy> {
        self.policy.as_ref()
    }

    /// The request path, top to bottom: identity → intent → policy → (mint) → inject → log.
    pub fn on_request(&mut self, req: &Request<'_>) -> Outcome {
        let mut d = Decision { id: self.ids.next_id(), ..Decision::default() };
        let header = |name| req.headers.single(name).ok().flatten().and_then(crate::record::correlation_value);
        d.request_id = header("x-request-id");
        d.traceparent = header("traceparent");
        // A VM polls the feed once it serves requests; its staleness clock starts here.
        if self.config.minter.is_some() {
            self.feed.activate(req.now);
        }
        match self.decide(req, &mut d) {
            Ok(verdict) => Outcome { verdict, decision: d },
            Err(reason) => self.deny(d, reason),
        }
    }

    fn decide(&mut self, req: &Request<'_>, d: &mut Decision) -> Step<Verdict> {
        let h = req.headers;

        // 0. RFC 9728 protected-resource metadata of MCP resources: served without a token.
        if self.mcp_metadata {
            if let Some(reply) = self.metadata_reply(h, d) {
                return Ok(Verdict::Reply(reply));
            }
        }

        // 1. Identity: a token verified against the trust bundles.
        let token = bearer_token(h, &self.config).inspect_err(|_| self.mark_mcp_target(h, d))?;
        d.identity_checked = true;
        let hits_before = self.identity.stats.cache_hits;
        let identity = match self.identity.verify(token, req.now) {
            Ok(i) => i,
            Err(r) => {
                self.mark_mcp_target(h, d);
                return Err(r);
            }
        };
        d.identity_cache_hit = self.identity.stats.cache_hits > hits_before;
        d.identity = Some(identity.clone());

        // 1b. Delegation: a Txn-Token verified (cached by its bytes) and its chain checked
        // against the caller, before anything is judged.
        let txn = self.delegation_stage(h, &identity, req.now, d).inspect_err(|_| self.mark_mcp_target(h, d))?;

        // 2 and 3. The operation (for an MCP resource: the call), the declared intent and the
        // policy's judgement of them, reused when this verified token sent exactly these bytes
        // before (MCP calls: only when decided from the headers, which are part of the key).
        let sent = Sent::read(h, self.has_mcp);
        let standing_secret = self.standing_secret_presented(h);
        let mut cacheable = self.decisions.is_some() && sent.unambiguous();
        if cacheable {
            sent.key_into(&mut self.key_buf, identity.serial, txn.as_ref().map(|t| t.serial), standing_secret, h);
            // Bounded entries: a caller with a valid token cannot grow the cache by sending long
            // paths (the entry keeps the key and up to two forms of the path). Longer requests
            // are judged every time.
            cacheable = self.key_buf.len() <= MAX_CACHED_KEY_BYTES;
        }
        let cached = if cacheable {
            let key = self.key_buf.as_slice();
            self.decisions.as_mut().and_then(|c| c.get(key)).filter(|j| j.expires_at > req.now).cloned()
        } else {
            None
        };
        let judged = match cached {
            Some(hit) => {
                self.stats.decision_cache_hits += 1;
                d.decision_cache_hit = true;
                hit
            }
            None => {
                self.stats.decision_cache_misses += 1;
                let judged = match self.judge(h, &identity, txn, standing_secret, req.now, d)? {
                    Judgement::Done(judged) => judged,
                    Judgement::NeedBody(pair) => {
                        let (inputs, mut judged) = *pair;
                        judged.body = Some(Rc::new(inputs));
                        judged
                    }
                };
                let judged = Rc::new(judged);
                if cacheable {
                    if let Some(c) = self.decisions.as_mut() {
                        c.put(self.key_buf.as_slice().into(), judged.clone());
                    }
                }
                judged
            }
        };
        let Some(inputs) = judged.body.clone() else {
            return self.conclude(&judged, Some(h), None, token, &identity, req.now, d);
        };
        // The header phase: edits and (tool- or intent-scoped) credential now; the body is
        // judged once the headers have gone on.
        let header = self.conclude(&judged, Some(h), None, token, &identity, req.now, d)?;
        let tool = judged.mcp.as_ref().and_then(|m| m.tool.clone());
        let max_body_bytes = inputs.max_body_bytes;
        Ok(Verdict::NeedBody(Box::new(BodyPlan { inputs, identity, tool, header: Some(Box::new(header)), max_body_bytes })))
    }

    /// Delegation steps 1 and 2: the Txn-Token (if the request carries one) verified, and its
    /// chain checked against the caller. `None` for a request that carries none.
    fn delegation_stage(&mut self, h: &Headers, identity: &Identity, now: u64, d: &mut Decision) -> Step<Option<Rc<TxnToken>>> {
        let Some(dv) = self.delegation.as_mut() else { return Ok(None) };
        let raw = match h.single(&dv.header) {
            Ok(None) => return Ok(None),
            Ok(Some(v)) => v.trim_ascii(),
            Err(_) => {
                // Two tokens: ambiguous, refused rather than one picked.
                d.delegation = Some(Rc::new(DelegationInfo { invalid: Some("repeated"), ..DelegationInfo::default() }));
                return Err(Reason::DelegationTokenInvalid);
            }
        };
        let policy = self.policy.as_ref();
        let classify = |p: &str| policy.and_then(|pl| pl.class_name(p)).map(str::to_string);
        let t = match dv.verify(&self.identity, raw, now, &classify) {
            Ok(t) => t,
            Err(word) => {
                d.delegation = Some(Rc::new(DelegationInfo { token_hash: short_hash(&token_digest(raw)), invalid: Some(word), ..DelegationInfo::default() }));
                return Err(Reason::DelegationTokenInvalid);
            }
        };
        // A Txn-Token the minter revoked by its `jti` (the feed): refused on every request, the
        // verification cache, cached decisions and cached credentials notwithstanding.
        if self.feed.revoked.jti_revoked(&t.jti) {
            d.delegation = Some(Rc::new(DelegationInfo { invalid: Some("revoked"), ..(*t.info).clone() }));
            return Err(Reason::DelegationTokenInvalid);
        }
        d.delegation = Some(t.info.clone());
        delegation::judge::check_chain(&t, &identity.principal, self.delegation_cap)?;
        Ok(Some(t))
    }

    /// After the judgement: revocations, the effect, the edits, the credential.
    #[allow(clippy::too_many_arguments)]
    fn conclude(
        &mut self,
        judged: &Judged,
        h: Option<&Headers>,
        prepared: Option<HeaderEdits>,
        token: &[u8],
        identity: &Rc<Identity>,
        now: u64,
        d: &mut Decision,
    ) -> Step<Verdict> {
        let decision = &judged.policy;
        d.method = Some(judged.method.clone());
        d.authority = Some(judged.authority.clone());
        d.path = Some(judged.path.clone());
        d.intent = judged.intent.clone();
        d.task = judged.task.clone();
        d.intent_signed = judged.intent_signed;
        d.policy = Some(decision.clone());
        if judged.mcp.is_some() {
            d.mcp = judged.mcp.clone();
        }
        if judged.delegation.is_some() {
            d.delegation = judged.delegation.clone();
        }
        // Revocations apply to cached decisions too: checked on every request.
        if let Some(t) = &judged.txn {
            // 4. The task, for the subject and every delegate; then every principal.
            if t.chain.iter().any(|p| self.feed.revoked.task_revoked(&t.ctx.task, p)) {
                return Err(Reason::TaskRevoked);
            }
            if t.chain.iter().any(|p| self.feed.revoked.subject_revoked(p)) {
                return Err(Reason::SubjectRevoked);
            }
            // 5 to 7: the edges, the intersection, the grants within the token.
            if let Some(r) = judged.delegation_failure {
                return Err(r);
            }
        }
        if d.task.as_deref().is_some_and(|t| self.feed.revoked.task_revoked(t, &identity.principal)) {
            return Err(Reason::TaskRevoked);
        }
        if self.feed.revoked.subject_revoked(&identity.principal) {
            return Err(Reason::SubjectRevoked);
        }
        if decision.effect == Effect::Deny {
            return Err(decision.reason);
        }
        d.effect = Some(decision.effect);
        d.reason = Some(decision.reason);

        // 4. Inject: strip what the caller must not control, set what mandate vouches for.
        let mut edits = match (prepared, h) {
            (Some(e), _) => e,
            (None, Some(h)) => {
                // A reserved header whose name is not UTF-8 could not be named for removal: refuse.
                if h.reserved_name_unreadable() {
                    return Err(Reason::InternalError);
                }
                let mut e = self.upstream_edits(h, &d.id, identity, judged.forward_txn);
                if let Some(target) = &judged.rewrite {
                    e.set.push((":path".to_string(), target.clone()));
                }
                e
            }
            (None, None) => return Err(Reason::InternalError),
        };

        // 5. Just-in-time credential: only now, after every check passed.
        let Some(m) = &self.config.minter else { return Ok(Verdict::Forward(edits)) };
        if decision.effect == Effect::DryRunDeny {
            // A would-be denial is let through to be observed, never armed: no exchange.
            d.credential_withheld = Some("dry_run");
            return Ok(Verdict::Forward(edits));
        }
        // The audience comes from the matched resource only (the policy refuses an allow
        // without one when a minter is configured): never from the caller's `:authority`.
        let (Some(key), Some(audience)) = (judged.credential_key, decision.audience.as_deref()) else {
            return Err(Reason::NoResourceMatched);
        };
        // Revocations not heard of for too long: no cached credential, no new one.
        if self.feed.stale(&m.revocations, now) {
            return Err(Reason::RevocationsStale);
        }
        if let Some(cred) = self.credentials.get(&key, now) {
            self.stats.credential_cache_hits += 1;
            d.credential_cache_hit = true;
            inject(&mut edits, &cred, d, h);
            return Ok(Verdict::Forward(edits));
        }
        // A delegated request: the Txn-Token is the subject, the caller's SVID the actor.
        let (subject_token, subject_token_type, actor_token) = match &judged.txn {
            Some(t) => (t.raw.clone(), delegation::TXN_TOKEN_TYPE, Some(token.to_vec())),
            None => (token.to_vec(), mint::JWT_TOKEN_TYPE, None),
        };
        let request = MintRequest {
            subject_token,
            subject_token_type,
            actor_token,
            audience: audience.to_string(),
            scopes: decision.scopes.clone(),
            ttl_s: decision.ttl_s,
            task: d.task.as_deref().map(str::to_string),
            intent: d.intent.as_deref().map(str::to_string),
            tool: judged.mcp.as_ref().and_then(|m| m.tool.clone()),
        };
        self.stats.credential_cache_misses += 1;
        Ok(Verdict::Mint(Box::new(MintPlan {
            key,
            subject: judged.txn.as_ref().map_or_else(|| identity.principal.clone(), |t| t.sub.clone()),
            actor: judged.txn.as_ref().filter(|t| t.depth() > 0).map(|_| identity.principal.clone()),
            txn: judged.txn.as_ref().map(|t| t.txn.clone()),
            request,
            edits,
            cluster: m.cluster.clone(),
            authority: m.authority.clone().unwrap_or_else(|| m.cluster.clone()),
            path: m.path.clone(),
            timeout_ms: m.timeout_ms,
        })))
    }

    /// Parses and judges the operation and the declared intent: the uncached half of the
    /// request path. Fills `d` as it goes, so a refusal is recorded with what was known.
    /// A POST to an MCP resource is judged from its headers when they say enough, else the
    /// judgement waits for the body.
    fn judge(&mut self, h: &Headers, identity: &Identity, txn: Option<Rc<TxnToken>>, standing_secret: bool, now: u64, d: &mut Decision) -> Step<Judgement> {
        let method = pseudo(h, ":method").ok_or(Reason::MethodInvalid)?;
        // Methods are case-sensitive tokens; `delete` must not slip past a `DELETE` rule.
        if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(Reason::MethodInvalid);
        }
        let authority = pseudo(h, ":authority").and_then(|a| normalize_authority(a.as_bytes())).ok_or(Reason::AuthorityInvalid)?;
        let raw_path = h.single(":path").ok().flatten().ok_or(Reason::PathAmbiguous)?;
        let path = normalize(raw_path).map_err(|_| Reason::PathAmbiguous)?;
        let (method, authority, path_str): (Rc<str>, Rc<str>, Rc<str>) = (method.into(), authority.into(), path.path.as_str().into());
        d.method = Some(method.clone());
        d.authority = Some(authority.clone());
        d.path = Some(path_str.clone());
        // The MCP target first: every refusal from here on answers in JSON-RPC.
        let mcp_res = self.mcp_resource(&authority, &path_str, &method);
        if let Some(m) = &mcp_res {
            d.mcp = Some(m.clone());
        }
        let mut intent_name = intent::declared_intent(h)?;
        let mut task = intent::declared_task(h)?;
        let intent_token = match h.single(intent::INTENT_TOKEN_HEADER) {
            Ok(t) => t,
            Err(_) => return Err(Reason::IntentTokenInvalid),
        };
        d.intent = intent_name.as_deref().map(Rc::from);
        d.task = task.as_deref().map(Rc::from);

        if self.policy.is_none() {
            return Err(Reason::NoRuleMatched);
        }
        let mut signed = match intent_token {
            Some(t) => {
                let s = self.intents.verify(t, &identity.principal, now)?;
                // A task named in the token binds the request to it.
                match (&s.task, &task) {
                    (Some(st), Some(ht)) if st != ht => return Err(Reason::IntentTokenInvalid),
                    _ => {}
                }
                Some(s)
            }
            None => None,
        };
        if intent_name.is_none() {
            if let Some([only]) = signed.as_ref().map(|s| s.intents.as_slice()) {
                intent_name = Some(only.clone());
            }
        }
        if task.is_none() {
            task = signed.as_ref().and_then(|s| s.task.clone());
        }
        if let Some(t) = &txn {
            // 3. The context: the token's intent, and its task (declared or taken from it).
            delegation::judge::check_context(t, intent_name.as_deref(), task.as_deref())?;
            task = Some(t.ctx.task.clone());
            // The minter vouched for the intent and task when it issued the token.
            if signed.is_none() {
                signed = Some(t.vouched_intent());
            }
        }
        let rewrite = self.config.upstream.rewrite_path.then(|| path.target().into_bytes()).filter(|t| t.as_slice() != raw_path);
        let intent = intent_name.as_deref().map(Rc::from).or(d.intent.take());
        let mut inputs = JudgeInputs {
            method,
            authority,
            path: path_str,
            rewrite,
            intent,
            task: task.as_deref().map(Rc::from),
            signed,
            standing_secret,
            mcp: None,
            max_body_bytes: 0,
            txn,
        };
        let Some(target) = mcp_res else { return Ok(Judgement::Done(self.evaluate(&inputs, None, identity, now))) };
        // An MCP call: the headers, then (if they do not say enough) the body.
        let headers = mcp::headers::read(h)?;
        let (body_mode, max_body) = self.mcp_body_settings(&inputs);
        inputs.max_body_bytes = max_body;
        let header_method = headers.method.clone();
        // With 2026-07-28 headers, the call they mirror; without, a call not known yet (the
        // policy then says whether the intent grants some MCP operation here).
        let call = headers.call().unwrap_or(McpCall {
            method: String::new(),
            name: None,
            uri: None,
            arguments: McpArgs::default(),
            source: McpSource::Unknown,
        });
        inputs.mcp = Some(headers);
        let mut judged = self.evaluate(&inputs, Some(&call), identity, now);
        let unknown = call.source == McpSource::Unknown;
        if unknown {
            judged.mcp = Some(Rc::new(McpInfo { method: header_method.clone(), path: Some("header"), ..(*target).clone() }));
        }
        let body_needed = judged.policy.needs_body || judged.delegation_needs_body || unknown || body_mode == BodyMode::Always;
        if !body_needed || judged.policy.effect == Effect::Deny || judged.delegation_failure.is_some() {
            // Decided by the headers (an allow only with `when_needed`), or refused by them.
            return Ok(Judgement::Done(judged));
        }
        let tool = call.tool().map(str::to_string);
        let info = McpInfo {
            method: header_method,
            credential_scope: Some(if tool.is_some() { "tool" } else { "intent" }),
            tool,
            path: Some("body"),
            ..(*target).clone()
        };
        judged.mcp = Some(Rc::new(info));
        d.mcp = judged.mcp.clone();
        Ok(Judgement::NeedBody(Box::new((inputs, judged))))
    }

    /// The policy's judgement of prepared inputs (and the MCP call, if any).
    fn evaluate(&self, inp: &JudgeInputs, call: Option<&McpCall>, identity: &Identity, now: u64) -> Judged {
        self.evaluate_keyed(inp, call, identity, now, true)
    }

    /// `credential`: whether the judgement needs its credential key (a body's judgement does
    /// not: the header phase already chose the credential).
    fn evaluate_keyed(&self, inp: &JudgeInputs, call: Option<&McpCall>, identity: &Identity, now: u64, credential: bool) -> Judged {
        let input = PolicyInput {
            principal: &identity.principal,
            iat: identity.iat,
            exp: identity.exp,
            intent: inp.intent.as_deref(),
            signed_intent: inp.signed.as_ref(),
            task: inp.task.as_deref(),
            method: &inp.method,
            authority: &inp.authority,
            path: &inp.path,
            now,
            environment: self.environment.as_deref(),
            standing_secret: inp.standing_secret,
            minter: self.config.minter.is_some(),
            mcp: call,
        };
        let (mut decision, ttl) = match &self.policy {
            Some(policy) => (policy.evaluate(&input), policy.cache.ttl_s),
            None => (PolicyDecision::with(Effect::Deny, Reason::NoRuleMatched), 0),
        };
        // Delegation, steps 5 to 7: the edges, every principal of the chain, the token's grants.
        let (mut delegation, mut delegation_failure, mut delegation_needs_body, mut forward_txn) = (None, None, false, false);
        if let (Some(t), Some(policy)) = (&inp.txn, &self.policy) {
            let j = delegation::judge::judge(policy, t, &input, &decision);
            delegation_needs_body = j.needs_body;
            delegation = Some(t.info.clone());
            if let Some((reason, failed)) = j.failure {
                delegation_failure = Some(reason);
                delegation = Some(Rc::new(DelegationInfo { failed: Some(failed), ..(*t.info).clone() }));
            } else if let Some(failed) = j.dry_run {
                if decision.effect == Effect::Allow {
                    decision.effect = Effect::DryRunDeny;
                    decision.reason = Reason::DelegationNotAllowed;
                    decision.dry_run_reason = Some(Reason::DelegationNotAllowed);
                }
                delegation = Some(Rc::new(DelegationInfo { failed: Some(failed), ..(*t.info).clone() }));
            }
            forward_txn = decision
                .resource
                .as_deref()
                .and_then(|name| policy.resources.iter().find(|r| r.name == name))
                .is_some_and(|r| r.txn_token == crate::policy::TxnTokenMode::Forward);
        }
        let decision = Rc::new(decision);
        let ttl_end = now.saturating_add(ttl);
        let txn_exp = inp.txn.as_ref().map_or(u64::MAX, |t| t.exp);
        let expires_at = [ttl_end, identity.exp, decision.valid_until, inp.signed.as_ref().map_or(u64::MAX, |s| s.exp), txn_exp]
            .into_iter()
            .min()
            .unwrap_or(now);
        let tool = call.and_then(McpCall::tool);
        let credential_key = match (&self.config.minter, decision.effect, decision.audience.as_deref()) {
            (Some(_), Effect::Allow, Some(audience)) if credential => Some(mint::credential_key(
                &identity.principal,
                audience,
                &decision.scopes,
                inp.task.as_deref(),
                inp.intent.as_deref(),
                tool,
                inp.txn.as_ref().map(|t| &t.digest),
            )),
            _ => None,
        };
        let mcp = call.map(|c| {
            let target = self.mcp_resource(&inp.authority, &inp.path, &inp.method);
            Rc::new(McpInfo {
                method: Some(c.method.clone()),
                tool: tool.map(str::to_string),
                path: Some(match c.source {
                    McpSource::Header | McpSource::Unknown => "header",
                    McpSource::Body => "body",
                }),
                ..target.map(|t| (*t).clone()).unwrap_or_default()
            })
        });
        Judged {
            policy: decision,
            method: inp.method.clone(),
            authority: inp.authority.clone(),
            path: inp.path.clone(),
            intent: inp.intent.clone(),
            task: inp.task.clone(),
            intent_signed: inp.signed.is_some(),
            rewrite: inp.rewrite.clone(),
            credential_key,
            expires_at,
            mcp,
            body: None,
            txn: inp.txn.clone(),
            delegation,
            delegation_failure,
            delegation_needs_body,
            forward_txn,
        }
    }

    /// Finishes a request that waited for its body ([`Verdict::NeedBody`]): parses the JSON-RPC
    /// message, checks it agrees with the MCP headers, judges the call, and goes on as
    /// [`Engine::on_request`] would (forward, refuse, or mint).
    pub fn on_request_body(&mut self, plan: &BodyPlan, body: &[u8], now: u64, d: &mut Decision) -> Verdict {
        match self.decide_body(plan, body, now, d) {
            Ok(v) => v,
            Err(reason) => self.deny_with(d, reason),
        }
    }

    /// A body over the resource's `max_body_bytes`: 413, and the record says so.
    pub fn body_too_large(&self, d: &mut Decision) -> Verdict {
        self.refuse_body(d, Reason::McpBodyTooLarge)
    }

    /// Refuses a request whose body was awaited (413, trailers, an unreadable body), with the
    /// same reply every other refusal gets (JSON-RPC for an MCP call).
    pub fn refuse_body(&self, d: &mut Decision, reason: Reason) -> Verdict {
        self.deny_with(d, reason)
    }

    fn decide_body(&mut self, plan: &BodyPlan, body: &[u8], now: u64, d: &mut Decision) -> Step<Verdict> {
        if body.len() > plan.max_body_bytes {
            return Err(Reason::McpBodyTooLarge);
        }
        let msg = match mcp::jsonrpc::parse(body) {
            Ok(m) => m,
            Err(e) => {
                d.mcp_id = e.id;
                d.mcp_not_json = e.not_json;
                return Err(e.reason);
            }
        };
        d.mcp_id = msg.id.clone();
        if let Some(h) = plan.inputs.mcp.as_ref().filter(|h| h.present()) {
            if !mcp::headers::agree(h, &msg) {
                return Err(Reason::McpHeaderMismatch);
            }
        }
        let call = msg.into_call();
        // The credential went upstream scoped to the header's tool: the body must call that one.
        if let Some(tool) = plan.tool.as_deref() {
            if call.tool() != Some(tool) {
                return Err(Reason::McpHeaderMismatch);
            }
        }
        let judged = self.evaluate_keyed(&plan.inputs, Some(&call), &plan.identity, now, false);
        let scope = d.mcp.as_ref().and_then(|m| m.credential_scope);
        if let Some(m) = judged.mcp.as_deref() {
            d.mcp = Some(Rc::new(McpInfo { credential_scope: scope, ..m.clone() }));
        }
        d.policy = Some(judged.policy.clone());
        if judged.delegation.is_some() {
            d.delegation = judged.delegation.clone();
        }
        if let Some(r) = judged.delegation_failure {
            return Err(r);
        }
        if judged.policy.effect == Effect::Deny {
            return Err(judged.policy.reason);
        }
        // The headers (and credential) are upstream already: the body follows them, unchanged.
        d.effect = Some(judged.policy.effect);
        d.reason = Some(judged.policy.reason);
        Ok(Verdict::Forward(HeaderEdits::default()))
    }

    /// The MCP settings of the resource the inputs target.
    fn mcp_body_settings(&self, inp: &JudgeInputs) -> (BodyMode, usize) {
        self.policy
            .as_ref()
            .and_then(|p| p.resource_of(&inp.authority, &inp.path, &inp.method).and_then(|i| p.resources.get(i)))
            .and_then(|r| r.mcp.as_ref())
            .map_or((BodyMode::Always, crate::policy::mcp::DEFAULT_MAX_BODY), |m| (m.body, m.max_body_bytes))
    }

    /// For a request to an MCP resource: how to answer it (JSON-RPC errors for POSTs, the
    /// resource-metadata URL in 401s).
    fn mcp_resource(&self, authority: &str, path: &str, method: &str) -> Option<Rc<McpInfo>> {
        if !self.has_mcp {
            return None;
        }
        let p = self.policy.as_ref()?;
        let r = p.resources.get(p.resource_of(authority, path, method)?)?;
        let m = r.mcp.as_ref()?;
        Some(Rc::new(McpInfo {
            jsonrpc: method == "POST",
            resource_metadata: m.metadata.as_ref().and_then(|md| metadata_url(&md.resource)),
            filter_tools_list: m.filter_tools_list,
            ..McpInfo::default()
        }))
    }

    /// Identity refused the request: if it targets an MCP resource, answer as MCP asks.
    fn mark_mcp_target(&self, h: &Headers, d: &mut Decision) {
        if !self.has_mcp {
            return;
        }
        let authority = pseudo(h, ":authority").and_then(|a| normalize_authority(a.as_bytes()));
        let path = h.single(":path").ok().flatten().and_then(|p| normalize(p).ok());
        let method = pseudo(h, ":method");
        if let (Some(a), Some(p), Some(m)) = (authority, path, method) {
            d.mcp = self.mcp_resource(&a, &p.path, &m);
        }
    }

    /// `GET /.well-known/oauth-protected-resource<path>` for an MCP resource with `metadata`.
    fn metadata_reply(&self, h: &Headers, d: &mut Decision) -> Option<LocalReply> {
        let path = h.single(":path").ok().flatten()?;
        let rest = path.strip_prefix(WELL_KNOWN.as_bytes())?;
        if h.single(":method").ok().flatten() != Some(b"GET") {
            return None;
        }
        let rest = rest.split(|b| *b == b'?').next().unwrap_or_default();
        let authority = pseudo(h, ":authority").and_then(|a| normalize_authority(a.as_bytes()))?;
        let p = self.policy.as_ref()?;
        let md = p.resources.iter().find_map(|r| {
            let md = r.mcp.as_ref()?.metadata.as_ref()?;
            let rpath = resource_path(&md.resource)?;
            let served = if rpath == "/" { rest.is_empty() || rest == b"/" } else { rest == rpath.as_bytes() };
            (served && p.resource_of(&authority, if rpath.is_empty() { "/" } else { rpath }, "POST").is_some()).then_some(md)
        })?;
        let body = serde_json::json!({
            "resource": md.resource,
            "authorization_servers": md.authorization_servers,
            "scopes_supported": md.scopes_supported,
            "bearer_methods_supported": ["header"],
        })
        .to_string();
        d.effect = Some(Effect::Allow);
        d.reason = Some(Reason::Allowed);
        d.method = Some(Rc::from("GET"));
        d.authority = Some(Rc::from(authority.as_str()));
        d.path = std::str::from_utf8(path).ok().map(Rc::from);
        Some(LocalReply {
            status: 200,
            headers: vec![
                ("content-type".to_string(), "application/json".to_string()),
                ("cache-control".to_string(), "max-age=300".to_string()),
                (self.config.upstream.decision_id_header.clone(), d.id.clone()),
            ],
            body,
        })
    }

    /// Finishes a request paused on a credential exchange. Any failure denies (503): the
    /// request never goes upstream without the credential, and the minter's answer never
    /// reaches the caller.
    /// Returns the verdict, and the failure (for logs and metrics) when it is a denial.
    pub fn finish_mint(&mut self, plan: &MintPlan, answer: Result<(u16, &[u8]), MintError>, now: u64, d: &mut Decision) -> (Verdict, Option<MintError>) {
        let Some(m) = &self.config.minter else {
            return (self.deny_mint(d), Some(MintError::Dispatch("no minter configured".into())));
        };
        let request = &plan.request;
        let expected = mint::Expected { subject: &plan.subject, actor: plan.actor.as_deref(), txn: plan.txn.as_deref() };
        let parsed = answer.and_then(|(status, body)| mint::parse_response(m, status, body, now, expected, request.task.as_deref(), &request.audience, request.tool.as_deref()));
        let revoked = &self.feed.revoked;
        // Delegated: every principal of the chain, re-checked as for the subject.
        let chain: &[delegation::ChainEntry] = d.delegation.as_deref().map_or(&[], |i| i.chain.as_slice());
        let task = request.task.as_deref();
        if parsed.is_ok() && chain.iter().any(|c| task.is_some_and(|t| revoked.task_revoked(t, &c.principal))) {
            return (self.deny_with(d, Reason::TaskRevoked), None);
        }
        if parsed.is_ok() && chain.iter().any(|c| revoked.subject_revoked(&c.principal)) {
            return (self.deny_with(d, Reason::SubjectRevoked), None);
        }
        match parsed {
            // A revocation may have arrived while the exchange was in flight: re-check.
            Ok(cred) if cred.task.as_deref().is_some_and(|t| revoked.task_revoked(t, &cred.subject)) => (self.deny_with(d, Reason::TaskRevoked), None),
            Ok(cred) if revoked.subject_revoked(&cred.subject) => (self.deny_with(d, Reason::SubjectRevoked), None),
            Ok(cred) if cred.jti.as_deref().is_some_and(|j| revoked.jti_revoked(j)) => {
                (self.deny_mint(d), Some(MintError::Malformed("the minted credential's jti is already revoked")))
            }
            // The feed went stale while the exchange was in flight: not used, not cached.
            Ok(_) if self.feed.stale(&m.revocations, now) => (self.deny_with(d, Reason::RevocationsStale), None),
            Ok(cred) => {
                let cred = Rc::new(cred);
                self.credentials.put(plan.key, cred.clone());
                let mut edits = plan.edits.clone();
                inject(&mut edits, &cred, d, None);
                (Verdict::Forward(edits), None)
            }
            // The minter refused the task or the caller: a refusal (403), not an outage.
            Err(MintError::Refused(reason)) => (self.deny_with(d, reason), Some(MintError::Refused(reason))),
            Err(e) => (self.deny_mint(d), Some(e)),
        }
    }

    fn deny_mint(&self, d: &mut Decision) -> Verdict {
        self.deny_with(d, Reason::CredentialUnavailable)
    }

    fn deny_with(&self, d: &mut Decision, reason: Reason) -> Verdict {
        d.effect = Some(Effect::Deny);
        d.reason = Some(reason);
        Verdict::Reply(self.reply_for(d, reason))
    }

    /// The denial reply: plain JSON, or for an MCP request the JSON-RPC error with the request's
    /// `id`, `resource_metadata` on 401s and `insufficient_scope` when the intent does not cover
    /// the call.
    fn reply_for(&self, d: &Decision, reason: Reason) -> LocalReply {
        let mut r = LocalReply::deny(reason, &d.id, &self.config.upstream.decision_id_header);
        let Some(m) = d.mcp.as_deref() else { return r };
        if m.jsonrpc {
            r.body = mcp::error_body(reason, d.mcp_not_json, d.mcp_id.as_ref(), &d.id);
        }
        let rm = m.resource_metadata.as_deref().map(|u| format!("resource_metadata=\"{u}\""));
        if r.status == 401 {
            if let (Some(rm), Some((_, v))) = (&rm, r.headers.iter_mut().find(|(k, _)| k == "www-authenticate")) {
                let rest = v.strip_prefix("Bearer").unwrap_or_default().trim().to_string();
                *v = if rest.is_empty() { format!("Bearer {rm}") } else { format!("Bearer {rm}, {rest}") };
            }
        } else if m.jsonrpc && matches!(reason, Reason::ToolNotAllowed | Reason::IntentMismatch | Reason::IntentRequired) {
            let scopes = d.policy.as_ref().map(|p| p.needed_scopes.join(" ")).unwrap_or_default();
            // RFC 6750 §3: `scope` lists what would suffice; when no intent would, leave it out.
            let mut v = if scopes.is_empty() {
                "Bearer error=\"insufficient_scope\"".to_string()
            } else {
                format!("Bearer error=\"insufficient_scope\", scope=\"{scopes}\"")
            };
            if let Some(rm) = &rm {
                v.push_str(", ");
                v.push_str(rm);
            }
            r.headers.push(("www-authenticate".to_string(), v));
        }
        r
    }

    /// A revocation poll, if a minter is configured, this VM serves requests, and one is due.
    pub fn due_poll(&mut self, now_ms: u64) -> Option<PollPlan> {
        let m = self.config.minter.as_ref()?;
        let timeout_ms = m.timeout_ms.max(1000);
        let path = self.feed.due(&m.revocations, timeout_ms, now_ms)?;
        Some(PollPlan { cluster: m.cluster.clone(), authority: m.authority.clone().unwrap_or_else(|| m.cluster.clone()), path, timeout_ms })
    }

    /// Takes a revocation feed answer (or the poll's failure): remembers revoked tasks,
    /// (task, subject) pairs, subjects and jtis, purges matching credentials, and drops cached
    /// decisions. A failure schedules the retry with backoff.
    pub fn on_revocations(&mut self, answer: Result<(u16, &[u8]), MintError>, now_ms: u64) -> Result<FeedReport, MintError> {
        self.stats.revocation_polls += 1;
        let Some(m) = &self.config.minter else { return Err(MintError::Dispatch("no minter configured".into())) };
        let epoch_before = self.feed.epoch.clone();
        let page = self.feed.on_answer(&m.revocations, answer, now_ms).inspect_err(|_| {
            self.stats.revocation_poll_failures += 1;
        })?;
        for r in &page.revocations {
            self.credentials.purge(r);
        }
        if !page.revocations.is_empty() {
            if let Some(c) = self.decisions.as_mut() {
                c.clear();
            }
        }
        Ok(FeedReport {
            received: page.revocations.len(),
            skipped: page.skipped,
            // The first answer always starts a cursor; a reset is a change from a known epoch.
            reset: epoch_before.is_some() && (page.reset || page.epoch != epoch_before),
            more: page.more,
            cursor: self.feed.cursor,
        })
    }

    /// Seconds since the feed was last heard from (0 until this VM starts polling).
    pub fn feed_lag_s(&self, now_s: u64) -> u64 {
        self.feed.lag_s(now_s)
    }

    /// Hands the feed state to the engine of a new configuration: the revoked set, cursor,
    /// epoch and freshness carry over (no replay, nothing forgotten); the schedule restarts.
    pub fn take_feed_from(&mut self, old: Engine) {
        self.feed = old.feed.carried();
    }

    pub fn credential_cache_len(&self) -> usize {
        self.credentials.len()
    }

    fn standing_secret_presented(&self, h: &Headers) -> bool {
        let Some(p) = &self.policy else { return false };
        p.standing_secret_headers.iter().any(|name| h.contains(name))
            || h.all("authorization").any(|v| v.len() >= 6 && v.get(..6).is_some_and(|s| s.eq_ignore_ascii_case(b"basic ")))
    }

    /// A denial for a request the filter could not judge (host failure).
    pub fn fail_closed(&mut self, reason: Reason) -> Outcome {
        let d = Decision { id: self.ids.next_id(), ..Decision::default() };
        self.deny(d, reason)
    }

    fn deny(&self, mut d: Decision, reason: Reason) -> Outcome {
        let verdict = self.deny_with(&mut d, reason);
        Outcome { decision: d, verdict }
    }

    fn upstream_edits(&self, headers: &Headers, id: &str, identity: &Identity, forward_txn: bool) -> HeaderEdits {
        let mut remove = headers.reserved_names();
        let mut set = Vec::with_capacity(3);
        let decision_header = &self.config.upstream.decision_id_header;
        set.push((decision_header.clone(), id.as_bytes().to_vec()));
        if let Some(h) = &self.config.identity.upstream_header {
            set.push((h.clone(), identity.principal.as_bytes().to_vec()));
        }
        // Anything we set is removed first, whatever its name: never merge with a spoofed copy.
        for (name, _) in &set {
            if headers.contains(name) && !remove.contains(name) {
                remove.push(name.clone());
            }
        }
        if !self.config.identity.forward_token && headers.contains(&self.config.identity.header) {
            remove.push(self.config.identity.header.clone());
        }
        // The intent token is a credential too: it never reaches the service.
        if headers.contains(intent::INTENT_TOKEN_HEADER) {
            remove.push(intent::INTENT_TOKEN_HEADER.to_string());
        }
        // The Txn-Token goes upstream only verified, and only to a resource that takes it;
        // without delegation configured it is never verified, so never forwarded.
        // With another header configured, the standard `txn-token` is never verified either:
        // always removed.
        let txn_header = self.delegation.as_ref().map_or(delegation::DEFAULT_HEADER, |v| v.header.as_str());
        if !forward_txn && headers.contains(txn_header) {
            remove.push(txn_header.to_string());
        }
        if txn_header != delegation::DEFAULT_HEADER && headers.contains(delegation::DEFAULT_HEADER) {
            remove.push(delegation::DEFAULT_HEADER.to_string());
        }
        HeaderEdits { remove, set }
    }

    /// For an allowed `tools/list` to a resource with `filter_tools_list`: what the answer must
    /// be narrowed to (the caller's intent on that resource).
    pub fn tools_filter(&self, d: &Decision) -> Option<ToolsFilter> {
        let m = d.mcp.as_deref()?;
        if !m.filter_tools_list || m.method.as_deref() != Some("tools/list") || d.effect() == Effect::Deny {
            return None;
        }
        let resource = d.policy.as_ref()?.resource.clone()?;
        Some(ToolsFilter { intent: d.intent.clone(), resource, decision_id: d.id.clone() })
    }

    /// Narrows a `tools/list` answer to the tools the caller's intent may call.
    /// `sse`: the answer is a (complete) `text/event-stream`.
    pub fn filter_tools(&self, f: &ToolsFilter, body: &[u8], sse: bool) -> Result<Vec<u8>, mcp::Unfilterable> {
        let Some(p) = &self.policy else { return Err(mcp::Unfilterable::NotAToolsList) };
        let allowed = |tool: &str| p.tool_allowed(f.intent.as_deref(), &f.resource, tool);
        if sse {
            mcp::filter_tools_list_sse(body, allowed)
        } else {
            mcp::filter_tools_list(body, allowed)
        }
    }

    pub fn decision_cache_len(&self) -> usize {
        self.decisions.as_ref().map_or(0, LruCache::len)
    }
}

/// Sets the credential header (replacing any incoming one) and records what was injected.
/// With the request's headers at hand, a header the caller sent at most once is overwritten
/// by the set itself (Envoy's replace): no separate removal, one host call fewer. Sent twice
/// or more, or unknown, it is removed first.
fn inject(edits: &mut HeaderEdits, cred: &Credential, d: &mut Decision, sent: Option<&Headers>) {
    if sent.is_some_and(|h| h.all(&cred.header).nth(1).is_none()) {
        edits.remove.retain(|n| *n != cred.header);
    } else if !edits.remove.contains(&cred.header) {
        edits.remove.push(cred.header.clone());
    }
    edits.set.push((cred.header.clone(), cred.value.as_bytes().to_vec()));
    d.credential = Some(CredentialInfo {
        jti: cred.jti.clone(),
        exp: Some(cred.exp),
        kind: Some(if cred.legacy { "legacy_static_secret" } else { "jwt" }),
    });
    if cred.legacy {
        d.degraded = Some("legacy_static_secret");
    }
}

fn pseudo(h: &Headers, name: &str) -> Option<String> {
    h.single(name).ok().flatten().and_then(|v| std::str::from_utf8(v).ok()).map(str::to_string)
}

/// Extracts the caller's token from the configured header and scheme.
pub fn bearer_token<'h>(headers: &'h Headers, config: &Config) -> Result<&'h [u8], Reason> {
    let value = match headers.single(&config.identity.header) {
        Ok(Some(v)) => v,
        Ok(None) => return Err(Reason::TokenMissing),
        // Two credentials in one request is ambiguous: refuse rather than pick one.
        Err(_) => return Err(Reason::TokenMalformed),
    };
    let value = value.trim_ascii();
    let scheme = config.identity.scheme.as_bytes();
    let token = if scheme.is_empty() {
        value
    } else {
        match value.split_at_checked(scheme.len()) {
            Some((s, rest)) if s.eq_ignore_ascii_case(scheme) && rest.first() == Some(&b' ') => {
                rest.trim_ascii()
            }
            // Another scheme (e.g. Basic) is not a bearer token.
            _ => return Err(Reason::TokenMissing),
        }
    };
    if token.is_empty() {
        return Err(Reason::TokenMissing);
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use crate::testkit::{plain_jwks, spiffe_bundle, svid_claims, TestKey};
    use serde_json::json;

    // Wednesday 2026-11-25 10:00 UTC.
    const NOW: u64 = 1_795_564_800 + 10 * 3600;
    const AUD: &str = "spiffe://example.org/gw";
    const SUB: &str = "spiffe://example.org/agent/a1";

    fn headers(pairs: &[(&str, &str)]) -> Headers {
        Headers::new(pairs.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect())
    }

    fn policy() -> serde_json::Value {
        json!({
            "classes": [{"name": "agent", "principals": ["spiffe://example.org/agent/*"], "intent_required": true,
                         "refuse_standing_secrets": true, "max_token_lifetime_s": 600}],
            "resources": [
                {"name": "tickets", "hosts": ["tickets.internal"], "paths": ["/tickets/**"], "sensitivity": "internal"},
                {"name": "crm", "hosts": ["crm.internal"], "paths": ["/customers/**"], "sensitivity": "restricted"}
            ],
            "intents": [
                {"name": "ticket.read", "operations": [{"resource": "tickets", "methods": ["GET"]}], "scopes": ["tickets:read"]},
                {"name": "customer.lookup", "operations": [{"resource": "crm", "methods": ["GET"]}], "require_signed": true}
            ],
            "rules": [
                {"id": "agents", "effect": "allow", "classes": ["agent"], "intents": ["ticket.read"]},
                {"id": "crm-office-hours", "effect": "allow", "classes": ["agent"], "intents": ["customer.lookup"], "when": {"hours": ["08:00-10:30"]}}
            ]
        })
    }

    fn engine_with(key: &TestKey, identity_extra: serde_json::Value, policy: Option<serde_json::Value>) -> Engine {
        let mut identity = json!({"audiences": [AUD], "upstream_header": "x-mandate-identity",
            "trust_domains": [{"name": "example.org", "bundle": {"inline": spiffe_bundle(&[key], None)}}]});
        if let (Some(obj), Some(extra)) = (identity.as_object_mut(), identity_extra.as_object()) {
            obj.extend(extra.clone());
        }
        let mut cfg = json!({"identity": identity});
        if let Some(p) = policy {
            cfg["policy"] = p;
        }
        let cfg = config::parse(cfg.to_string().as_bytes()).unwrap();
        Engine::new(cfg, 7, None).unwrap()
    }

    fn engine(key: &TestKey) -> Engine {
        engine_with(key, json!({}), Some(policy()))
    }

    fn bearer(key: &TestKey) -> String {
        format!("Bearer {}", key.sign(&svid_claims(SUB, AUD, NOW, NOW + 300)))
    }

    fn get<'a>(extra: &[(&'a str, &'a str)], auth: &'a str) -> Vec<(&'a str, &'a str)> {
        let mut v = vec![(":method", "GET"), (":authority", "tickets.internal"), (":path", "/tickets/1"), ("authorization", auth), ("x-agent-intent", "ticket.read")];
        for (k, val) in extra {
            v.retain(|(n, _)| n != k);
            v.push((k, val));
        }
        v
    }

    fn run_at(e: &mut Engine, pairs: &[(&str, &str)], now: u64) -> Outcome {
        e.on_request(&Request { headers: &headers(pairs), now })
    }

    fn run(e: &mut Engine, pairs: &[(&str, &str)]) -> Outcome {
        run_at(e, pairs, NOW)
    }

    fn edits(out: Outcome) -> HeaderEdits {
        match out.verdict {
            Verdict::Forward(e) => e,
            Verdict::Reply(r) => panic!("expected forward, got {} {}", r.status, r.body),
            Verdict::Mint(_) => panic!("expected forward, got a mint plan"),
            Verdict::NeedBody(_) => panic!("expected forward, got a body request"),
        }
    }

    #[test]
    fn missing_token_is_denied_with_401() {
        let k = TestKey::es256("k");
        let out = run(&mut engine(&k), &[(":path", "/")]);
        assert_eq!(out.decision.reason(), Reason::TokenMissing);
        let Verdict::Reply(r) = out.verdict else { panic!() };
        assert_eq!(r.status, 401);
    }

    #[test]
    fn basic_auth_is_not_a_bearer_token() {
        let k = TestKey::es256("k");
        let out = run(&mut engine(&k), &get(&[], "Basic dXNlcjpwYXNz"));
        assert_eq!(out.decision.reason(), Reason::TokenMissing);
    }

    #[test]
    fn duplicate_authorization_is_malformed() {
        let k = TestKey::es256("k");
        let b = bearer(&k);
        let mut h = get(&[], &b);
        h.push(("authorization", &b));
        assert_eq!(run(&mut engine(&k), &h).decision.reason(), Reason::TokenMalformed);
    }

    #[test]
    fn empty_bearer_is_missing() {
        let k = TestKey::es256("k");
        assert_eq!(run(&mut engine(&k), &get(&[], "Bearer   ")).decision.reason(), Reason::TokenMissing);
    }

    #[test]
    fn allowed_request_strips_token_and_spoofed_headers() {
        let k = TestKey::es256("k");
        let b = bearer(&k).replace("Bearer", "bearer");
        let out = run(&mut engine(&k), &get(&[("x-mandate-identity", "spiffe://example.org/admin"), ("x-mandate-decision-id", "forged")], &b));
        assert_eq!(out.decision.effect(), Effect::Allow, "{:?}", out.decision);
        let id = out.decision.id.clone();
        let e = edits(out);
        for name in ["authorization", "x-mandate-identity", "x-mandate-decision-id"] {
            assert!(e.remove.contains(&name.to_string()), "{name} not removed");
        }
        assert_eq!(e.set[0], ("x-mandate-decision-id".to_string(), id.into_bytes()));
        assert_eq!(e.set[1], ("x-mandate-identity".to_string(), SUB.as_bytes().to_vec()));
    }

    #[test]
    fn no_policy_means_default_deny() {
        let k = TestKey::es256("k");
        let mut e = engine_with(&k, json!({}), None);
        let out = run(&mut e, &get(&[], &bearer(&k)));
        assert_eq!(out.decision.reason(), Reason::NoRuleMatched);
    }

    #[test]
    fn custom_identity_header_is_stripped_when_spoofed() {
        let k = TestKey::es256("k");
        let mut e = engine_with(&k, json!({"upstream_header": "x-caller"}), Some(policy()));
        let b = bearer(&k);
        let e = edits(run(&mut e, &get(&[("x-caller", "spiffe://example.org/admin")], &b)));
        assert!(e.remove.contains(&"x-caller".to_string()));
    }

    #[test]
    fn forward_token_keeps_authorization() {
        let k = TestKey::es256("k");
        let mut e = engine_with(&k, json!({"forward_token": true}), Some(policy()));
        let b = bearer(&k);
        assert!(!edits(run(&mut e, &get(&[], &b))).remove.contains(&"authorization".to_string()));
    }

    #[test]
    fn forged_token_is_denied_without_echo() {
        let k = TestKey::es256("k");
        let forger = TestKey::es256("k");
        let b = bearer(&forger);
        let out = run(&mut engine(&k), &get(&[], &b));
        assert_eq!(out.decision.reason(), Reason::SignatureInvalid);
        let Verdict::Reply(r) = out.verdict else { panic!() };
        let token = b.trim_start_matches("Bearer ");
        assert!(!r.body.contains(token) && !r.headers.iter().any(|(_, v)| v.contains(token)));
        assert!(!r.body.contains(&token[token.len() - 20..]), "no fragment of the signature either");
    }

    #[test]
    fn traversal_is_judged_normalised_and_forwarded_normalised() {
        let k = TestKey::es256("k");
        let b = bearer(&k);
        let e = edits(run(&mut engine(&k), &get(&[(":path", "/public/../tickets/%31?x=1")], &b)));
        assert!(e.set.contains(&(":path".to_string(), b"/tickets/1?x=1".to_vec())));
        // Escaping the resource by traversal is judged where it lands.
        let out = run(&mut engine(&k), &get(&[(":path", "/tickets/../admin")], &b));
        assert_eq!(out.decision.reason(), Reason::IntentMismatch);
    }

    #[test]
    fn ambiguous_path_is_400() {
        let k = TestKey::es256("k");
        let out = run(&mut engine(&k), &get(&[(":path", "/tickets/a%2F..%2Fadmin")], &bearer(&k)));
        assert_eq!(out.decision.reason(), Reason::PathAmbiguous);
        let Verdict::Reply(r) = out.verdict else { panic!() };
        assert_eq!(r.status, 400);
    }

    #[test]
    fn malformed_intent_is_400() {
        let k = TestKey::es256("k");
        let out = run(&mut engine(&k), &get(&[("x-agent-intent", "ticket.read, repo.write")], &bearer(&k)));
        assert_eq!(out.decision.reason(), Reason::IntentMalformed);
    }

    #[test]
    fn standing_secret_next_to_svid_is_refused() {
        let k = TestKey::es256("k");
        let out = run(&mut engine(&k), &get(&[("x-api-key", "sk_live_123")], &bearer(&k)));
        assert_eq!(out.decision.reason(), Reason::StandingSecretPresented);
    }

    #[test]
    fn decision_cache_hits_and_respects_window_boundary() {
        let k = TestKey::es256("k");
        let ik = TestKey::es256("intent-key");
        let mut p = policy();
        p["intent_issuers"] = json!([{"issuer": "https://intent", "jwks": plain_jwks(&[&ik]), "audiences": [AUD]}]);
        let mut e = engine_with(&k, json!({}), Some(p));
        let b = format!("Bearer {}", k.sign(&svid_claims(SUB, AUD, NOW + 1700, NOW + 2200)));
        let it = ik.sign_intent(&json!({"iss": "https://intent", "sub": SUB, "aud": AUD, "exp": NOW + 7200, "intents": ["customer.lookup"], "task": "T-9"}));
        let h = get(&[(":authority", "crm.internal"), (":path", "/customers/7"), ("x-agent-intent", "customer.lookup"), ("x-agent-intent-token", &it)], &b);
        // 10:29:50 — allowed, cached until the window closes at 10:30.
        let t = NOW + 29 * 60 + 50;
        let out = run_at(&mut e, &h, t);
        assert_eq!(out.decision.effect(), Effect::Allow, "{:?}", out.decision);
        assert_eq!(out.decision.task.as_deref(), Some("T-9"));
        assert!(out.decision.intent_signed);
        let e2 = edits(out);
        assert!(e2.remove.contains(&"x-agent-intent-token".to_string()));
        let out = run_at(&mut e, &h, t + 5);
        assert!(out.decision.decision_cache_hit);
        assert_eq!(out.decision.effect(), Effect::Allow);
        let out = run_at(&mut e, &h, t + 10);
        assert!(!out.decision.decision_cache_hit, "entry must expire at the window boundary");
        assert_eq!(out.decision.reason(), Reason::NoRuleMatched);
        assert_eq!((e.stats.decision_cache_hits, e.stats.decision_cache_misses), (1, 2));
    }

    #[test]
    fn cached_decision_does_not_cover_a_different_request() {
        let k = TestKey::es256("k");
        let mut e = engine(&k);
        let b = bearer(&k);
        assert_eq!(run(&mut e, &get(&[], &b)).decision.effect(), Effect::Allow);
        let out = run(&mut e, &get(&[(":method", "DELETE")], &b));
        assert_eq!(out.decision.reason(), Reason::IntentMismatch);
        let out = run(&mut e, &get(&[("x-api-key", "k")], &b));
        assert_eq!(out.decision.reason(), Reason::StandingSecretPresented);
    }

    #[test]
    fn repeated_intent_header_after_a_cached_allow_is_still_refused() {
        let k = TestKey::es256("k");
        let mut e = engine(&k);
        let b = bearer(&k);
        assert_eq!(run(&mut e, &get(&[], &b)).decision.effect(), Effect::Allow);
        let mut h = get(&[], &b);
        h.push(("x-agent-intent", "ticket.read"));
        let out = run(&mut e, &h);
        assert!(!out.decision.decision_cache_hit, "an ambiguous request never takes the cache path");
        assert_eq!(out.decision.reason(), Reason::IntentMalformed);
        h.pop();
        h.push((":path", "/tickets/1"));
        assert_eq!(run(&mut e, &h).decision.reason(), Reason::PathAmbiguous);
    }

    #[test]
    fn cached_decision_serves_only_the_token_it_was_made_for() {
        let k = TestKey::es256("k");
        let mut e = engine(&k);
        let first = bearer(&k);
        let second = format!("Bearer {}", k.sign(&svid_claims(SUB, AUD, NOW, NOW + 301)));
        assert_eq!(run(&mut e, &get(&[], &first)).decision.effect(), Effect::Allow);
        assert!(run(&mut e, &get(&[], &first)).decision.decision_cache_hit);
        let out = run(&mut e, &get(&[], &second));
        assert!(!out.decision.decision_cache_hit, "same subject, another token: judged afresh");
        assert!(!out.decision.identity_cache_hit);
        assert_eq!(out.decision.effect(), Effect::Allow);
    }

    #[test]
    fn field_boundary_shift_cannot_alias_a_cached_decision() {
        // intent "ticket.rea" + task "dT-1" must not share a key with intent "ticket.read" + task "T-1".
        let k = TestKey::es256("k");
        let mut e = engine(&k);
        let b = bearer(&k);
        let out = run(&mut e, &get(&[("x-agent-task", "T-1")], &b));
        assert_eq!(out.decision.effect(), Effect::Allow);
        let out = run(&mut e, &get(&[("x-agent-intent", "ticket.rea"), ("x-agent-task", "dT-1")], &b));
        assert!(!out.decision.decision_cache_hit);
        assert_ne!(out.decision.effect(), Effect::Allow);
        let h = Headers::new(get(&[("x-agent-intent", "ab"), ("x-agent-task", "c")], &b));
        let h2 = Headers::new(get(&[("x-agent-intent", "a"), ("x-agent-task", "bc")], &b));
        let (mut k1, mut k2) = (Vec::new(), Vec::new());
        Sent::read(&h, false).key_into(&mut k1, 7, None, false, &h);
        Sent::read(&h2, false).key_into(&mut k2, 7, None, false, &h2);
        assert_ne!(k1, k2);
        Sent::read(&h, false).key_into(&mut k2, 8, None, false, &h);
        assert_ne!(k1, k2, "another verified token, another key");
        Sent::read(&h, false).key_into(&mut k2, 7, None, true, &h);
        assert_ne!(k1, k2, "a standing secret changes the key");
    }

    #[test]
    fn cached_traversal_still_forwards_the_normalised_path() {
        let k = TestKey::es256("k");
        let mut e = engine(&k);
        let b = bearer(&k);
        for round in 0..2 {
            let out = run(&mut e, &get(&[(":path", "/tickets/x/../1?x=1")], &b));
            assert_eq!(out.decision.decision_cache_hit, round == 1);
            assert_eq!(out.decision.path.as_deref(), Some("/tickets/1"));
            assert!(edits(out).set.contains(&(":path".to_string(), b"/tickets/1?x=1".to_vec())));
        }
    }

    #[test]
    fn long_paths_are_judged_every_time_and_never_fill_the_cache() {
        let k = TestKey::es256("k");
        let mut e = engine(&k);
        let b = bearer(&k);
        let long = format!("/tickets/{}", "a".repeat(MAX_CACHED_KEY_BYTES));
        for _ in 0..3 {
            let out = run(&mut e, &get(&[(":path", &long)], &b));
            assert!(!out.decision.decision_cache_hit);
            assert_eq!(out.decision.effect(), Effect::Allow, "judged, and judged the same: {:?}", out.decision.reason());
        }
        assert_eq!(e.decision_cache_len(), 0, "nothing stored for an oversized request");
        assert_eq!(run(&mut e, &get(&[], &b)).decision.effect(), Effect::Allow);
        assert_eq!(e.decision_cache_len(), 1);
    }

    #[test]
    fn spoofed_reserved_header_with_non_utf8_name_fails_closed() {
        let k = TestKey::es256("k");
        let mut e = engine(&k);
        let b = bearer(&k);
        let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = get(&[], &b).into_iter().map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())).collect();
        pairs.push((b"x-mandate-identity\xff".to_vec(), b"spiffe://example.org/admin".to_vec()));
        let h = Headers::new(pairs);
        let out = e.on_request(&Request { headers: &h, now: NOW });
        assert_eq!(out.decision.reason(), Reason::InternalError);
        assert!(matches!(out.verdict, Verdict::Reply(_)), "never forwarded");
    }

    #[test]
    fn signed_intent_task_conflict_is_refused() {
        let k = TestKey::es256("k");
        let ik = TestKey::es256("ik");
        let mut p = policy();
        p["intent_issuers"] = json!([{"issuer": "https://intent", "jwks": plain_jwks(&[&ik]), "audiences": [AUD]}]);
        let mut e = engine_with(&k, json!({}), Some(p));
        let b = bearer(&k);
        let it = ik.sign_intent(&json!({"iss": "https://intent", "sub": SUB, "aud": AUD, "exp": NOW + 60, "intents": ["ticket.read"], "task": "T-1"}));
        let out = run(&mut e, &get(&[("x-agent-intent-token", &it), ("x-agent-task", "T-2")], &b));
        assert_eq!(out.decision.reason(), Reason::IntentTokenInvalid);
    }

    // ---------------- just-in-time credentials ----------------

    fn minting_engine(key: &TestKey) -> Engine {
        let mut identity = json!({"audiences": [AUD],
            "trust_domains": [{"name": "example.org", "bundle": {"inline": spiffe_bundle(&[key], None)}}]});
        identity["upstream_header"] = json!("x-mandate-identity");
        let mut p = policy();
        p["resources"][0]["audience"] = json!("https://tickets.internal");
        p["resources"].as_array_mut().unwrap().push(json!({"name": "legacy-crm", "hosts": ["old-crm.internal"], "legacy": true}));
        p["intents"].as_array_mut().unwrap().push(json!({"name": "crm.sync", "operations": [{"resource": "legacy-crm"}], "scopes": ["crm"]}));
        p["rules"].as_array_mut().unwrap().push(json!({"id": "sync", "effect": "allow", "intents": ["crm.sync"]}));
        let cfg = json!({"identity": identity, "policy": p,
            "minter": {"cluster": "minter", "timeout_ms": 300, "refresh_margin_s": 10, "revocations": {"interval_ms": 500}}});
        Engine::new(config::parse(cfg.to_string().as_bytes()).unwrap(), 7, None).unwrap()
    }

    const TICKETS: &str = "https://tickets.internal";

    fn jwt_with(claims: &serde_json::Value) -> String {
        use crate::testkit::b64;
        format!("{}.{}.sig", b64(br#"{"alg":"ES256","kid":"m"}"#), b64(claims.to_string().as_bytes()))
    }

    /// A minted token as the minter issues it for SUB at the tickets audience, for `task`.
    fn minted_jwt_for(jti: &str, exp: u64, task: Option<&str>) -> String {
        let mut c = json!({"jti": jti, "exp": exp, "aud": TICKETS, "sub": SUB});
        if let Some(t) = task {
            c["task"] = json!(t);
        }
        jwt_with(&c)
    }

    fn minted_jwt(jti: &str, exp: u64) -> String {
        minted_jwt_for(jti, exp, None)
    }

    fn answer_with(token: &str, exp: u64) -> Vec<u8> {
        json!({"access_token": token, "issued_token_type": mint::JWT_TOKEN_TYPE, "token_type": "Bearer", "expires_in": exp - NOW}).to_string().into_bytes()
    }

    fn token_answer_for(jti: &str, exp: u64, task: Option<&str>) -> Vec<u8> {
        answer_with(&minted_jwt_for(jti, exp, task), exp)
    }

    fn token_answer(jti: &str, exp: u64) -> Vec<u8> {
        token_answer_for(jti, exp, None)
    }

    /// One good (empty) revocation poll at `now`, so the feed is not stale.
    fn fresh_feed(e: &mut Engine, now: u64) {
        e.due_poll(now * 1000).expect("a poll is due");
        let page = json!({"epoch": "E1", "cursor": e.feed.cursor, "revocations": []}).to_string();
        e.on_revocations(Ok((200, page.as_bytes())), now * 1000).unwrap();
    }

    fn plan(out: Outcome) -> (Box<MintPlan>, Decision) {
        match out.verdict {
            Verdict::Mint(p) => (p, out.decision),
            other => panic!("expected a mint plan, got {other:?} / {:?}", out.decision),
        }
    }

    #[test]
    fn allow_asks_the_minter_with_an_rfc8693_form() {
        let k = TestKey::es256("k");
        let mut e = minting_engine(&k);
        let b = bearer(&k);
        let (p, _) = plan(run(&mut e, &get(&[("x-agent-task", "T-1")], &b)));
        let form: std::collections::HashMap<String, String> = form_urlencoded::parse(&p.body()).into_owned().collect();
        assert_eq!(form["grant_type"], mint::GRANT_TYPE);
        assert_eq!(form["subject_token"], b.trim_start_matches("Bearer "));
        assert_eq!(form["subject_token_type"], mint::JWT_TOKEN_TYPE);
        assert_eq!(form["audience"], "https://tickets.internal");
        assert_eq!(form["scope"], "tickets:read");
        assert_eq!(form["task"], "T-1");
        assert_eq!(form["intent"], "ticket.read");
        assert_eq!(form["requested_ttl"], "120");
        assert_eq!((p.cluster.as_str(), p.path.as_str(), p.timeout_ms), ("minter", "/token", 300));
    }

    #[test]
    fn minted_token_replaces_the_callers_and_is_reused_until_near_expiry() {
        let k = TestKey::es256("k");
        let mut e = minting_engine(&k);
        let b = bearer(&k);
        let (p, mut d) = plan(run(&mut e, &get(&[], &b)));
        let body = token_answer("jti-1", NOW + 60);
        let (v, failure) = e.finish_mint(&p, Ok((200, &body)), NOW, &mut d);
        assert!(failure.is_none());
        let Verdict::Forward(edits) = v else { panic!() };
        assert!(edits.remove.contains(&"authorization".to_string()));
        let auth = edits.set.iter().find(|(k, _)| k == "authorization").unwrap();
        assert_eq!(String::from_utf8_lossy(&auth.1), format!("Bearer {}", minted_jwt("jti-1", NOW + 60)));
        assert_eq!(d.credential.as_ref().unwrap().jti.as_deref(), Some("jti-1"));
        fresh_feed(&mut e, NOW + 40);
        // Same subject, audience, scopes, task: reused from the cache, no exchange.
        let out = run_at(&mut e, &get(&[], &b), NOW + 40);
        assert!(out.decision.credential_cache_hit);
        let Verdict::Forward(warm) = out.verdict else { panic!("expected a cached credential") };
        // The caller's single authorization header is overwritten by the set (a replace).
        assert!(!warm.remove.contains(&"authorization".to_string()), "{warm:?}");
        assert_eq!(warm.set.iter().filter(|(k, _)| k == "authorization").count(), 1);
        // Within the 10 s margin of exp: a fresh exchange.
        let out = run_at(&mut e, &get(&[], &b), NOW + 51);
        let _ = plan(out);
    }

    #[test]
    fn every_minter_failure_is_503_and_never_forwards() {
        let k = TestKey::es256("k");
        let b = bearer(&k);
        let answers: Vec<Result<(u16, Vec<u8>), MintError>> = vec![
            Err(MintError::NoResponse),
            Ok((500, b"{\"error\":\"boom\",\"detail\":\"secret-internal\"}".to_vec())),
            Ok((400, b"{\"error\":\"invalid_grant\"}".to_vec())),
            Ok((200, b"not json".to_vec())),
            Ok((200, b"{\"token_type\":\"Bearer\",\"expires_in\":60}".to_vec())),
            Ok((200, b"{\"access_token\":\"a\\r\\nb\",\"expires_in\":60}".to_vec())),
            Ok((200, b"{\"access_token\":\"x\",\"expires_in\":60,\"issued_token_type\":\"urn:mandate:token-type:static-secret\",\"token_type\":\"N_A\",\"mandate_header\":\":path\"}".to_vec())),
            Err(MintError::Dispatch("BadArgument".into())),
        ];
        for a in answers {
            let mut e = minting_engine(&k);
            let (p, mut d) = plan(run(&mut e, &get(&[], &b)));
            let (v, failure) = e.finish_mint(&p, a.as_ref().map(|(s, b)| (*s, b.as_slice())).map_err(Clone::clone), NOW, &mut d);
            assert!(failure.is_some(), "{a:?}");
            let Verdict::Reply(r) = v else { panic!("{a:?} forwarded") };
            assert_eq!(r.status, 503);
            assert!(r.body.contains("credential_unavailable") && !r.body.contains("secret-internal") && !r.body.contains("boom"));
            assert_eq!(d.reason(), Reason::CredentialUnavailable);
            assert_eq!(e.credential_cache_len(), 0);
        }
    }

    #[test]
    fn legacy_destination_gets_the_static_secret_and_is_marked_degraded() {
        let k = TestKey::es256("k");
        let mut e = minting_engine(&k);
        let b = bearer(&k);
        let (p, mut d) = plan(run(&mut e, &get(&[(":authority", "old-crm.internal"), (":path", "/sync"), ("x-agent-intent", "crm.sync")], &b)));
        let body = json!({"access_token": "sk_live_abc", "issued_token_type": mint::STATIC_SECRET_TYPE, "token_type": "N_A",
                          "expires_in": 60, "mandate_header": "x-api-key", "mandate_scheme": "ApiKey"}).to_string();
        let (v, _) = e.finish_mint(&p, Ok((200, body.as_bytes())), NOW, &mut d);
        let Verdict::Forward(edits) = v else { panic!() };
        assert!(edits.set.contains(&("x-api-key".to_string(), b"sk_live_abc".to_vec())));
        assert_eq!(d.degraded, Some("legacy_static_secret"));
    }

    #[test]
    fn legacy_token_type_n_a_is_never_sent_as_a_scheme() {
        // RFC 6749 §7.1: a static secret's token_type is `N_A`; the scheme is `mandate_scheme`.
        for (scheme, want) in [(None, "c3ZjOnB3".to_string()), (Some("Basic"), "Basic c3ZjOnB3".to_string())] {
            let k = TestKey::es256("k");
            let mut e = minting_engine(&k);
            let b = bearer(&k);
            let (p, mut d) = plan(run(&mut e, &get(&[(":authority", "old-crm.internal"), (":path", "/sync"), ("x-agent-intent", "crm.sync")], &b)));
            let mut body = json!({"access_token": "c3ZjOnB3", "issued_token_type": mint::STATIC_SECRET_TYPE, "token_type": "N_A",
                                  "expires_in": 60, "mandate_header": "authorization"});
            if let Some(s) = scheme {
                body["mandate_scheme"] = json!(s);
            }
            let (v, _) = e.finish_mint(&p, Ok((200, body.to_string().as_bytes())), NOW, &mut d);
            let Verdict::Forward(edits) = v else { panic!("{scheme:?}: not forwarded") };
            assert!(edits.set.contains(&("authorization".to_string(), want.clone().into_bytes())), "{scheme:?}: {:?}", edits.set);
        }
    }

    #[test]
    fn credential_header_smuggled_twice_is_removed_before_the_set() {
        // A legacy credential header that is not a standing-secret header, sent twice by the
        // caller: a replace would overwrite only one copy on older proxies, so both are removed.
        let k = TestKey::es256("k");
        let mut e = minting_engine(&k);
        let b = bearer(&k);
        let req = get(&[(":authority", "old-crm.internal"), (":path", "/sync"), ("x-agent-intent", "crm.sync")], &b);
        let (p, mut d) = plan(run(&mut e, &req));
        let body = json!({"access_token": "sk_live_abc", "issued_token_type": mint::STATIC_SECRET_TYPE, "token_type": "N_A",
                          "expires_in": 60, "mandate_header": "x-legacy-key"}).to_string();
        let _ = e.finish_mint(&p, Ok((200, body.as_bytes())), NOW, &mut d);
        let mut twice = req.clone();
        twice.push(("x-legacy-key", "forged-1"));
        twice.push(("x-legacy-key", "forged-2"));
        let out = run(&mut e, &twice);
        assert!(out.decision.credential_cache_hit, "{:?}", out.decision);
        let edits = edits(out);
        assert!(edits.remove.contains(&"x-legacy-key".to_string()), "{edits:?}");
        assert!(edits.set.contains(&("x-legacy-key".to_string(), b"sk_live_abc".to_vec())));
    }

    #[test]
    fn revocation_feed_purges_credentials_and_refuses_the_task() {
        let k = TestKey::es256("k");
        let mut e = minting_engine(&k);
        let b = bearer(&k);
        let (p, mut d) = plan(run(&mut e, &get(&[("x-agent-task", "T-7")], &b)));
        let body = token_answer_for("jti-7", NOW + 100, Some("T-7"));
        e.finish_mint(&p, Ok((200, &body)), NOW, &mut d);
        assert_eq!(e.credential_cache_len(), 1);
        let poll = e.due_poll(NOW * 1000).unwrap();
        assert_eq!(poll.path, "/revocations?since=0&max_bytes=196608", "no epoch known yet");
        assert!(e.due_poll(NOW * 1000 + 100).is_none(), "one poll in flight");
        let feed = json!({"epoch": "E1", "cursor": 5, "revocations": [{"seq": 5, "kind": "task", "value": "T-7", "at": NOW}]}).to_string();
        let r = e.on_revocations(Ok((200, feed.as_bytes())), NOW * 1000).unwrap();
        assert_eq!((r.received, r.skipped, r.cursor, r.reset), (1, 0, 5, false), "the first answer is no reset");
        assert_eq!(e.credential_cache_len(), 0);
        let out = run(&mut e, &get(&[("x-agent-task", "T-7")], &b));
        assert_eq!(out.decision.reason(), Reason::TaskRevoked);
        let poll = e.due_poll(NOW * 1000 + 600).unwrap();
        assert_eq!(poll.path, "/revocations?since=5&epoch=E1&max_bytes=196608");
        // Other tasks are unaffected.
        let (_, _) = plan(run(&mut e, &get(&[("x-agent-task", "T-8")], &b)));
    }

    // ---------------- revocation feed (issue 11, gap 3) ----------------

    const MS: u64 = NOW * 1000;

    fn feed_page(epoch: &str, cursor: u64, entries: serde_json::Value, more: bool) -> String {
        json!({"epoch": epoch, "cursor": cursor, "reset": false, "more": more, "revocations": entries}).to_string()
    }

    fn task_entry(seq: u64, task: &str) -> serde_json::Value {
        json!({"seq": seq, "kind": "task", "value": task, "at": NOW})
    }

    /// A minting engine that has served a request (so it polls) and taken one empty page.
    fn polling_engine(k: &TestKey) -> Engine {
        let mut e = minting_engine(k);
        let _ = run(&mut e, &get(&[], &bearer(k)));
        e.due_poll(MS).unwrap();
        e.on_revocations(Ok((200, feed_page("E1", 0, json!([]), false).as_bytes())), MS).unwrap();
        e
    }

    #[test]
    fn vm_that_serves_no_requests_never_polls() {
        // Envoy's main-thread VM has a root context and ticks, but never serves a request.
        let k = TestKey::es256("k");
        let mut e = minting_engine(&k);
        for t in 0..100 {
            assert!(e.due_poll(MS + t * 1000).is_none());
        }
        assert_eq!(e.feed_lag_s(NOW + 100), 0, "no staleness before it serves");
        let _ = run_at(&mut e, &get(&[], &bearer(&k)), NOW + 100);
        assert!(e.due_poll(MS + 100_000).is_some(), "polls from its first request on");
        assert_eq!(e.feed_lag_s(NOW + 103), 3, "the staleness clock starts with the first request");
    }

    #[test]
    fn oversized_feed_page_cannot_freeze_revocations() {
        let k = TestKey::es256("k");
        let mut e = polling_engine(&k);
        // The plugin asks for pages below its read limit.
        let p = e.due_poll(MS + 500).unwrap();
        assert!(p.path.contains("&max_bytes=196608"), "{}", p.path);
        // A minter that ignores max_bytes sends ~1000 entries of 210-byte task ids (> 256 KiB).
        let entries: Vec<_> = (1..=1000).map(|i| task_entry(i, &format!("{i:0>210}"))).collect();
        let big = feed_page("E1", 1000, json!(entries), false);
        assert!(big.len() > mint::MAX_FEED_BYTES);
        assert_eq!(e.on_revocations(Ok((200, big.as_bytes())), MS + 500), Err(MintError::TooLarge));
        // The shell refuses to read it (TooLarge) the same way; either way the next poll asks
        // for fewer entries instead of the same page forever.
        let p = e.due_poll(MS + 1500).unwrap();
        assert_eq!(p.path, "/revocations?since=0&epoch=E1&max_bytes=196608&limit=500");
        assert_eq!(e.on_revocations(Err(MintError::TooLarge), MS + 1500), Err(MintError::TooLarge));
        let p = e.due_poll(MS + 3500).unwrap();
        assert!(p.path.ends_with("&limit=250"), "{}", p.path);
        let half: Vec<_> = (1..=250).map(|i| task_entry(i, &format!("{i:0>210}"))).collect();
        let page = feed_page("E1", 250, json!(half), true);
        let r = e.on_revocations(Ok((200, page.as_bytes())), MS + 3500).unwrap();
        assert_eq!((r.received, r.cursor), (250, 250));
        let p = e.due_poll(MS + 3500).expect("more: the next page at once");
        assert_eq!(p.path, "/revocations?since=250&epoch=E1&max_bytes=196608&limit=250");
        assert!(e.feed.revoked.task_revoked(&format!("{:0>210}", 7), SUB));
    }

    #[test]
    fn unknown_revocation_kind_does_not_stall_the_cursor() {
        let k = TestKey::es256("k");
        let mut e = polling_engine(&k);
        e.due_poll(MS + 500).unwrap();
        let page = feed_page("E1", 9, json!([
            {"seq": 7, "kind": "audience", "value": "https://tickets.internal", "at": NOW},
            {"seq": 8, "kind": {"nested": true}},
            "not even an object",
            task_entry(9, "T-9"),
        ]), false);
        let r = e.on_revocations(Ok((200, page.as_bytes())), MS + 500).unwrap();
        assert_eq!((r.received, r.skipped, r.cursor), (1, 3, 9));
        assert_eq!(e.due_poll(MS + 1000).unwrap().path, "/revocations?since=9&epoch=E1&max_bytes=196608");
        assert_eq!(run(&mut e, &get(&[("x-agent-task", "T-9")], &bearer(&k))).decision.reason(), Reason::TaskRevoked);
    }

    #[test]
    fn malformed_entry_of_a_known_kind_fails_the_page_and_backs_off() {
        let k = TestKey::es256("k");
        for bad in [json!({"seq": 1, "kind": "task"}), json!({"seq": 1, "kind": "task", "value": 7}), json!({"seq": 1, "kind": "task", "value": "T", "subject": 3})] {
            let mut e = polling_engine(&k);
            e.due_poll(MS + 500).unwrap();
            let page = feed_page("E1", 1, json!([bad]), false);
            assert!(matches!(e.on_revocations(Ok((200, page.as_bytes())), MS + 500), Err(MintError::Malformed(_))), "{bad}");
            assert_eq!(e.feed.cursor, 0);
        }
        let mut e = polling_engine(&k);
        e.due_poll(MS + 500).unwrap();
        let page = json!({"epoch": "E 1\n", "cursor": 1, "revocations": []}).to_string();
        assert!(e.on_revocations(Ok((200, page.as_bytes())), MS + 500).is_err(), "an epoch that cannot go in a query");
    }

    #[test]
    fn restored_minter_epoch_resets_the_cursor() {
        let k = TestKey::es256("k");
        let mut e = polling_engine(&k);
        e.due_poll(MS + 500).unwrap();
        e.on_revocations(Ok((200, feed_page("E1", 500, json!([task_entry(500, "T-7")]), false).as_bytes())), MS + 500).unwrap();
        assert_eq!(e.due_poll(MS + 1000).unwrap().path, "/revocations?since=500&epoch=E1&max_bytes=196608");
        // The minter's database is restored from a backup: a new epoch, seq restarts low.
        let restored = json!({"epoch": "E2", "cursor": 3, "reset": true, "more": false, "revocations": [task_entry(3, "T-9")]}).to_string();
        let r = e.on_revocations(Ok((200, restored.as_bytes())), MS + 1000).unwrap();
        assert!(r.reset);
        assert_eq!(r.cursor, 3, "the answer's cursor, not max(500, 3)");
        assert_eq!(e.due_poll(MS + 1500).unwrap().path, "/revocations?since=3&epoch=E2&max_bytes=196608");
        // New revocations after the restore are heard; old ones are not forgotten.
        e.on_revocations(Ok((200, feed_page("E2", 4, json!([task_entry(4, "T-10")]), false).as_bytes())), MS + 1500).unwrap();
        for t in ["T-7", "T-9", "T-10"] {
            assert_eq!(run(&mut e, &get(&[("x-agent-task", t)], &bearer(&k))).decision.reason(), Reason::TaskRevoked, "{t}");
        }
        // An epoch change without `reset` is a reset too.
        e.due_poll(MS + 2000).unwrap();
        let r = e.on_revocations(Ok((200, feed_page("E3", 1, json!([]), false).as_bytes())), MS + 2000).unwrap();
        assert_eq!((r.reset, r.cursor), (true, 1));
    }

    #[test]
    fn more_pages_are_fetched_at_once_but_never_in_a_hot_loop() {
        let k = TestKey::es256("k");
        let mut e = polling_engine(&k);
        e.due_poll(MS + 500).unwrap();
        e.on_revocations(Ok((200, feed_page("E1", 2, json!([task_entry(1, "A"), task_entry(2, "B")]), true).as_bytes())), MS + 520).unwrap();
        assert_eq!(e.due_poll(MS + 520).unwrap().path, "/revocations?since=2&epoch=E1&max_bytes=196608");
        // `more` without progress (a broken minter): wait an interval, not a loop.
        e.on_revocations(Ok((200, feed_page("E1", 2, json!([]), true).as_bytes())), MS + 530).unwrap();
        assert!(e.due_poll(MS + 530).is_none());
        assert!(e.due_poll(MS + 1020).is_some());
    }

    #[test]
    fn feed_that_never_catches_up_does_not_count_as_fresh() {
        // Pages that answer `more: true` forever (a flood, or a feed serving a stale tail) are
        // not a caught-up feed: past max_stale_s the cached credential is no longer used.
        let k = TestKey::es256("k");
        let mut e = polling_engine(&k);
        let b = bearer(&k);
        let (p, mut d) = plan(run(&mut e, &get(&[], &b)));
        e.finish_mint(&p, Ok((200, &token_answer("jti-1", NOW + 200))), NOW, &mut d);
        let mut t = MS + 500;
        let mut cursor = 0u64;
        while t < MS + 40_000 {
            if e.due_poll(t).is_some() {
                cursor += 1;
                let page = feed_page("E1", cursor, json!([task_entry(cursor, &format!("other-{cursor}"))]), true);
                let _ = e.on_revocations(Ok((200, page.as_bytes())), t);
            }
            t += 100;
        }
        assert!(cursor > 10, "pages kept coming ({cursor})");
        assert_eq!(run_at(&mut e, &get(&[], &b), NOW + 31).decision.reason(), Reason::RevocationsStale);
    }

    #[test]
    fn failed_polls_back_off_exponentially_up_to_a_quarter_of_max_stale() {
        let k = TestKey::es256("k");
        let mut e = polling_engine(&k);
        // interval 500 ms, max_stale_s 30: 500, 1000, 2000, 4000, then 7500 ms at most.
        let mut t = MS + 500;
        let mut gaps = Vec::new();
        e.due_poll(t).unwrap();
        for _ in 0..7 {
            e.on_revocations(Err(MintError::NoResponse), t).unwrap_err();
            let mut next = t + 1;
            while e.due_poll(next).is_none() {
                next += 1;
            }
            gaps.push(next - t);
            t = next;
        }
        // Less the tenth-of-interval (50 ms) slack allowed for early timers.
        assert_eq!(gaps, [450, 950, 1950, 3950, 7450, 7450, 7450]);
        assert_eq!(mint::RevocationFeed::backoff_ms(&e.config().minter.as_ref().unwrap().revocations, 1), 500);
        assert_eq!(mint::RevocationFeed::backoff_ms(&e.config().minter.as_ref().unwrap().revocations, 3), 2000);
    }

    #[test]
    fn dead_feed_stops_cached_credentials_after_max_stale() {
        let k = TestKey::es256("k");
        let mut e = polling_engine(&k);
        let b = bearer(&k);
        let (p, mut d) = plan(run(&mut e, &get(&[], &b)));
        e.finish_mint(&p, Ok((200, &token_answer("jti-1", NOW + 200))), NOW, &mut d);
        assert!(run_at(&mut e, &get(&[], &b), NOW + 30).decision.credential_cache_hit, "30 s after the last good poll: still fresh");
        // The feed dies: every poll fails.
        let mut t = MS + 500;
        while t < MS + 40_000 {
            if e.due_poll(t).is_some() {
                let _ = e.on_revocations(Err(MintError::NoResponse), t);
            }
            t += 100;
        }
        let out = run_at(&mut e, &get(&[], &b), NOW + 31);
        assert_eq!(out.decision.reason(), Reason::RevocationsStale);
        let Verdict::Reply(r) = out.verdict else { panic!("a stale filter forwarded") };
        assert_eq!(r.status, 503);
        // Nor does it mint: another task (no cached credential) is refused the same way.
        assert_eq!(run_at(&mut e, &get(&[("x-agent-task", "T-2")], &b), NOW + 31).decision.reason(), Reason::RevocationsStale);
        // An exchange that lands after the feed went stale is not used nor cached.
        let (p2, mut d2) = plan(run_at(&mut e, &get(&[("x-agent-task", "T-3")], &b), NOW + 29));
        let (v, _) = e.finish_mint(&p2, Ok((200, &token_answer_for("jti-3", NOW + 200, Some("T-3")))), NOW + 31, &mut d2);
        assert!(matches!(v, Verdict::Reply(_)));
        assert_eq!(d2.reason(), Reason::RevocationsStale);
        // The feed comes back: served from the cache again.
        let p = loop {
            if let Some(p) = e.due_poll(t) {
                break p;
            }
            t += 100;
        };
        assert!(p.path.contains("since=0&epoch=E1"));
        e.on_revocations(Ok((200, feed_page("E1", 0, json!([]), false).as_bytes())), (NOW + 32) * 1000).unwrap();
        assert!(run_at(&mut e, &get(&[], &b), NOW + 32).decision.credential_cache_hit);
    }

    #[test]
    fn fresh_vm_whose_feed_never_answers_goes_stale_from_its_first_request() {
        let k = TestKey::es256("k");
        let mut e = minting_engine(&k);
        let b = bearer(&k);
        let _ = plan(run(&mut e, &get(&[], &b)));
        assert!(matches!(run_at(&mut e, &get(&[], &b), NOW + 30).verdict, Verdict::Mint(_)));
        assert_eq!(run_at(&mut e, &get(&[], &b), NOW + 31).decision.reason(), Reason::RevocationsStale);
        assert_eq!(e.feed_lag_s(NOW + 31), 31);
    }

    #[test]
    fn task_revoked_for_one_subject_spares_the_others() {
        let k = TestKey::es256("k");
        let mut e = polling_engine(&k);
        let b = bearer(&k);
        let other = format!("Bearer {}", k.sign(&svid_claims("spiffe://example.org/agent/a2", AUD, NOW, NOW + 300)));
        let (p, mut d) = plan(run(&mut e, &get(&[("x-agent-task", "CASE-7")], &b)));
        e.finish_mint(&p, Ok((200, &token_answer_for("jti-a1", NOW + 100, Some("CASE-7")))), NOW, &mut d);
        e.due_poll(MS + 500).unwrap();
        let page = feed_page("E1", 1, json!([{"seq": 1, "kind": "task", "value": "CASE-7", "subject": SUB, "at": NOW}]), false);
        e.on_revocations(Ok((200, page.as_bytes())), MS + 500).unwrap();
        assert_eq!(e.credential_cache_len(), 0, "that subject's credential for the task is purged");
        assert_eq!(run(&mut e, &get(&[("x-agent-task", "CASE-7")], &b)).decision.reason(), Reason::TaskRevoked);
        let out = run(&mut e, &get(&[("x-agent-task", "CASE-7")], &other));
        assert!(matches!(out.verdict, Verdict::Mint(_)), "another agent's CASE-7 is not ended: {:?}", out.decision.reason());
    }

    #[test]
    fn feed_state_survives_reconfiguration_without_replay() {
        let k = TestKey::es256("k");
        let mut old = polling_engine(&k);
        old.due_poll(MS + 500).unwrap();
        old.on_revocations(Ok((200, feed_page("E1", 42, json!([task_entry(42, "T-7")]), false).as_bytes())), MS + 500).unwrap();
        let mut e = minting_engine(&k);
        e.take_feed_from(old);
        assert_eq!(e.due_poll(MS + 600).unwrap().path, "/revocations?since=42&epoch=E1&max_bytes=196608", "at once, from where it was");
        assert_eq!(run(&mut e, &get(&[("x-agent-task", "T-7")], &bearer(&k))).decision.reason(), Reason::TaskRevoked);
    }

    // ---------------- minted token checks (gap 8) and minter refusals (gap 2) ----------------

    #[test]
    fn minted_token_for_another_audience_is_not_injected() {
        let k = TestKey::es256("k");
        let b = bearer(&k);
        let exp = NOW + 100;
        let cases = [
            ("another audience", json!({"jti": "j", "exp": exp, "aud": "https://payments.internal", "sub": SUB, "task": "T-1"})),
            ("audience list without ours", json!({"jti": "j", "exp": exp, "aud": ["https://payments.internal"], "sub": SUB, "task": "T-1"})),
            ("no audience", json!({"jti": "j", "exp": exp, "sub": SUB, "task": "T-1"})),
            ("another subject", json!({"jti": "j", "exp": exp, "aud": TICKETS, "sub": "spiffe://example.org/agent/admin", "task": "T-1"})),
            ("no subject", json!({"jti": "j", "exp": exp, "aud": TICKETS, "task": "T-1"})),
            ("another task", json!({"jti": "j", "exp": exp, "aud": TICKETS, "sub": SUB, "task": "T-2"})),
            ("no task", json!({"jti": "j", "exp": exp, "aud": TICKETS, "sub": SUB})),
            ("task as a number", json!({"jti": "j", "exp": exp, "aud": TICKETS, "sub": SUB, "task": 1})),
        ];
        for (what, claims) in cases {
            let mut e = minting_engine(&k);
            let (p, mut d) = plan(run(&mut e, &get(&[("x-agent-task", "T-1")], &b)));
            let token = jwt_with(&claims);
            let (v, failure) = e.finish_mint(&p, Ok((200, &answer_with(&token, exp))), NOW, &mut d);
            let Verdict::Reply(r) = v else { panic!("{what}: injected") };
            assert_eq!((r.status, d.reason()), (503, Reason::CredentialUnavailable), "{what}");
            assert!(matches!(failure, Some(MintError::Mismatch(_))), "{what}: {failure:?}");
            assert!(!failure.unwrap().to_string().contains(&token), "{what}: the error names the token");
            assert_eq!(e.credential_cache_len(), 0, "{what}: cached");
        }
        for (what, token) in [("opaque", "opaque-token-value".to_string()), ("unreadable claims", "a.b.c".to_string())] {
            let mut e = minting_engine(&k);
            let (p, mut d) = plan(run(&mut e, &get(&[], &b)));
            let (v, _) = e.finish_mint(&p, Ok((200, &answer_with(&token, exp))), NOW, &mut d);
            assert!(matches!(v, Verdict::Reply(_)), "{what}");
        }
        // The audience as a list naming ours, the right subject and task: injected.
        let mut e = minting_engine(&k);
        let (p, mut d) = plan(run(&mut e, &get(&[("x-agent-task", "T-1")], &b)));
        let token = jwt_with(&json!({"jti": "j", "exp": exp, "aud": ["x", TICKETS], "sub": SUB, "task": "T-1"}));
        assert!(matches!(e.finish_mint(&p, Ok((200, &answer_with(&token, exp))), NOW, &mut d).0, Verdict::Forward(_)));
    }

    #[test]
    fn ended_task_refused_by_minter_is_403_not_503() {
        let k = TestKey::es256("k");
        let b = bearer(&k);
        for (minter_reason, reason) in [
            ("task_ended", Reason::TaskRevoked),
            ("subject_revoked", Reason::SubjectRevoked),
            ("actor_revoked", Reason::SubjectRevoked),
            ("task_unknown", Reason::TaskUnregistered),
            ("task_not_bound", Reason::TaskUnregistered),
            ("intent_not_in_task", Reason::TaskUnregistered),
            ("task_expired", Reason::TaskExpired),
        ] {
            let mut e = minting_engine(&k);
            let (p, mut d) = plan(run(&mut e, &get(&[("x-agent-task", "T-1")], &b)));
            let body = json!({"error": "invalid_grant", "error_description": "no", "mandate_reason": minter_reason}).to_string();
            let (v, failure) = e.finish_mint(&p, Ok((400, body.as_bytes())), NOW, &mut d);
            let Verdict::Reply(r) = v else { panic!("{minter_reason}: forwarded") };
            assert_eq!((r.status, d.reason()), (403, reason), "{minter_reason}");
            assert!(r.body.contains(reason.code()) && !r.body.contains(minter_reason) || reason.code() == minter_reason, "{minter_reason}: {}", r.body);
            assert_eq!(failure, Some(MintError::Refused(reason)));
        }
        // Anything else stays an outage: 503 credential_unavailable.
        for (status, body) in [
            (400, json!({"error": "invalid_grant", "mandate_reason": "something_new"})),
            (400, json!({"error": "invalid_request", "mandate_reason": "task_ended"})),
            (500, json!({"error": "invalid_grant", "mandate_reason": "task_ended"})),
            (400, json!({"error": "invalid_grant"})),
        ] {
            let mut e = minting_engine(&k);
            let (p, mut d) = plan(run(&mut e, &get(&[("x-agent-task", "T-1")], &b)));
            let (v, _) = e.finish_mint(&p, Ok((status, body.to_string().as_bytes())), NOW, &mut d);
            let Verdict::Reply(r) = v else { panic!() };
            assert_eq!((r.status, d.reason()), (503, Reason::CredentialUnavailable), "{status} {body}");
        }
    }

    #[test]
    fn credential_values_never_appear_in_decision_debug_or_display() {
        let cred = Credential { header: "authorization".into(), value: "Bearer SECRET".into(), exp: 1, jti: Some("j".into()), task: None, subject: "s".into(), legacy: false };
        assert!(!cred.to_string().contains("SECRET"));
    }

    // ---------------- issue 11: no confused deputy, dry run, registered tasks ----------------

    fn minting_engine_with(key: &TestKey, p: serde_json::Value) -> Engine {
        let identity = json!({"audiences": [AUD], "upstream_header": "x-mandate-identity",
            "trust_domains": [{"name": "example.org", "bundle": {"inline": spiffe_bundle(&[key], None)}}]});
        let cfg = json!({"identity": identity, "policy": p, "minter": {"cluster": "minter", "timeout_ms": 300}});
        Engine::new(config::parse(cfg.to_string().as_bytes()).unwrap(), 7, None).unwrap()
    }

    #[test]
    fn host_header_cannot_choose_the_credential_audience() {
        // A catch-all allow: before, an unmatched request was minted a credential for whatever
        // `:authority` the caller sent, e.g. the payments service's audience.
        let k = TestKey::es256("k");
        let mut e = minting_engine_with(&k, json!({
            "resources": [{"name": "tickets", "hosts": ["tickets.internal"], "paths": ["/tickets/**"]}],
            "rules": [{"id": "anyone", "effect": "allow"}]
        }));
        let b = bearer(&k);
        let no_intent = |extra: &[(&'static str, &'static str)], b: &str| -> Vec<(String, String)> {
            get(extra, "").into_iter().filter(|(n, _)| *n != "x-agent-intent").map(|(n, v)| (n.to_string(), if n == "authorization" { b.to_string() } else { v.to_string() })).collect()
        };
        let send = |e: &mut Engine, h: Vec<(String, String)>| {
            let pairs: Vec<(&str, &str)> = h.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            run(e, &pairs)
        };
        let out = send(&mut e, no_intent(&[(":authority", "payments.internal"), (":path", "/transfer")], &b));
        assert_eq!(out.decision.reason(), Reason::NoResourceMatched);
        let Verdict::Reply(r) = out.verdict else { panic!("an unmatched destination was forwarded or minted for") };
        assert_eq!(r.status, 403);
        // A matched resource without an explicit audience: its name, never the authority sent.
        let (p, _) = plan(send(&mut e, no_intent(&[], &b)));
        assert_eq!(p.request.audience, "tickets");
    }

    #[test]
    fn dry_run_denial_forwards_without_any_credential() {
        let k = TestKey::es256("k");
        let b = bearer(&k);
        // Policy-wide dry run: a would-be intent mismatch goes upstream, with no exchange.
        let mut p = policy();
        p["dry_run"] = json!(true);
        p["resources"][0]["audience"] = json!("https://tickets.internal");
        let mut e = minting_engine_with(&k, p);
        let out = run(&mut e, &get(&[(":method", "POST")], &b));
        assert_eq!((out.decision.effect(), out.decision.reason()), (Effect::DryRunDeny, Reason::IntentMismatch));
        assert_eq!(out.decision.credential_withheld, Some("dry_run"));
        assert!(out.decision.credential.is_none());
        let ed = edits(out);
        assert!(!ed.set.iter().any(|(n, _)| n == "authorization"), "{ed:?}");
        assert!(ed.remove.contains(&"authorization".to_string()), "the caller's own token never goes upstream either");
        // Even a would-be denial with no resource at all: forwarded bare, never minted for the authority.
        let out = run(&mut e, &get(&[(":authority", "payments.internal"), (":path", "/x")], &b));
        assert_eq!(out.decision.effect(), Effect::DryRunDeny);
        assert!(matches!(out.verdict, Verdict::Forward(_)));
        // A dry-run deny rule over an allowed request: recorded, forwarded, not minted.
        let mut p = policy();
        p["resources"][0]["audience"] = json!("https://tickets.internal");
        p["rules"].as_array_mut().unwrap().insert(0, json!({"id": "trial", "effect": "deny", "intents": ["ticket.read"], "dry_run": true}));
        let mut e = minting_engine_with(&k, p);
        let out = run(&mut e, &get(&[], &b));
        assert_eq!(out.decision.effect(), Effect::DryRunDeny);
        assert_eq!(out.decision.credential_withheld, Some("dry_run"));
        let ed = edits(out);
        assert!(!ed.set.iter().any(|(n, _)| n == "authorization"), "{ed:?}");
        assert_eq!(e.credential_cache_len(), 0);
    }

    #[test]
    fn registered_tasks_need_a_task_and_a_voucher() {
        let k = TestKey::es256("k");
        let ik = TestKey::es256("ik");
        let b = bearer(&k);
        let mut p = policy();
        p["tasks"] = json!("registered");
        p["intent_issuers"] = json!([{"issuer": "https://intent", "jwks": plain_jwks(&[&ik]), "audiences": [AUD]}]);
        // No minter: a header task is only a claim.
        let mut e = engine_with(&k, json!({}), Some(p.clone()));
        assert_eq!(run(&mut e, &get(&[], &b)).decision.reason(), Reason::TaskRequired);
        assert_eq!(run(&mut e, &get(&[("x-agent-task", "T-8")], &b)).decision.reason(), Reason::TaskUnregistered);
        let it = ik.sign_intent(&json!({"iss": "https://intent", "sub": SUB, "aud": AUD, "exp": NOW + 60, "intents": ["ticket.read"], "task": "T-8"}));
        assert_eq!(run(&mut e, &get(&[("x-agent-intent-token", &it)], &b)).decision.effect(), Effect::Allow);
        // With a minter, the minter checks registration at the exchange every allow goes through.
        let mut e = minting_engine_with(&k, p);
        assert_eq!(run(&mut e, &get(&[], &b)).decision.reason(), Reason::TaskRequired);
        let (plan, _) = plan(run(&mut e, &get(&[("x-agent-task", "tsk_AAAAAAAAAAAAAAAAAAAAAA")], &b)));
        assert_eq!(plan.request.task.as_deref(), Some("tsk_AAAAAAAAAAAAAAAAAAAAAA"));
    }

    #[test]
    fn svid_replayed_as_intent_token_is_refused() {
        // The agent's own SVID (a JWT with `sub` = the agent) sent as the intent token, where
        // the intent issuer and the trust domain share a key.
        let k = TestKey::es256("k");
        let mut p = policy();
        p["intent_issuers"] = json!([{"issuer": "https://intent", "jwks": plain_jwks(&[&k]), "audiences": [AUD]}]);
        let mut e = engine_with(&k, json!({}), Some(p));
        let b = bearer(&k);
        let svid = k.sign(&json!({"iss": "https://intent", "sub": SUB, "aud": AUD, "iat": NOW, "exp": NOW + 60, "intents": ["customer.lookup"]}));
        let h = get(&[(":authority", "crm.internal"), (":path", "/customers/7"), ("x-agent-intent", "customer.lookup"), ("x-agent-intent-token", &svid)], &b);
        assert_eq!(run(&mut e, &h).decision.reason(), Reason::IntentTokenInvalid);
    }
}

#[cfg(test)]
#[path = "engine_mcp_tests.rs"]
mod mcp_tests;
