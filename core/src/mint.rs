//! Just-in-time credentials: the RFC 8693 token-exchange protocol with the
//! minter, the credential cache, and the revocation feed.
//!
//! Host-independent: the engine builds the exchange request and parses the
//! answer here; the shell only moves bytes.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use lru::LruCache;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::rc::Rc;

pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const STATIC_SECRET_TYPE: &str = "urn:mandate:token-type:static-secret";
/// Largest minter answer read.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

fn default_path() -> String {
    "/token".into()
}
fn default_timeout() -> u64 {
    500
}
fn default_margin() -> u64 {
    10
}
fn default_cache() -> usize {
    1024
}
fn default_header() -> String {
    "authorization".into()
}
fn default_scheme() -> String {
    "Bearer".into()
}
fn default_poll_path() -> String {
    "/revocations".into()
}
fn default_poll_ms() -> u64 {
    1000
}
fn default_max_stale() -> u64 {
    30
}
fn default_feed_bytes() -> u64 {
    MAX_FEED_PAGE_BYTES
}

/// Largest revocation-feed answer read (the callout limit): never more is copied in.
pub const MAX_FEED_BYTES: usize = 256 * 1024;
/// Largest page the plugin asks for (`max_bytes`), well below [`MAX_FEED_BYTES`]; also the
/// minter's own cap.
pub const MAX_FEED_PAGE_BYTES: u64 = 196_608;
/// Smallest `max_bytes` the minter accepts.
pub const MIN_FEED_PAGE_BYTES: u64 = 4096;
/// Page size (`limit`) asked for after a page came back over [`MAX_FEED_BYTES`] (a minter that
/// ignores `max_bytes`); halved on every further oversized page, kept until the epoch changes.
const FEED_LIMIT_START: u32 = 500;

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct MinterConfig {
    /// Envoy cluster of the minter (mTLS in production, loopback in development).
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    pub cluster: String,
    /// `:authority` of minter calls; defaults to the cluster name.
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default = "default_path")]
    #[cfg_attr(feature = "schema", schemars(pattern(r"^/")))]
    pub path: String,
    #[serde(default = "default_timeout")]
    #[cfg_attr(feature = "schema", schemars(range(min = 10, max = 60000)))]
    pub timeout_ms: u64,
    /// Header the minted credential goes in upstream.
    #[serde(default = "default_header")]
    #[cfg_attr(feature = "schema", schemars(pattern(crate::config::HEADER_NAME_PATTERN), extend("not" = {"pattern": "^x-mandate-"})))]
    pub header: String,
    #[serde(default = "default_scheme")]
    #[cfg_attr(feature = "schema", schemars(pattern(r"^[A-Za-z0-9-]*$")))]
    pub scheme: String,
    /// Reuse a credential until this many seconds before it expires.
    #[serde(default = "default_margin")]
    #[cfg_attr(feature = "schema", schemars(range(max = 300)))]
    pub refresh_margin_s: u64,
    /// Credential cache entries per worker.
    #[serde(default = "default_cache")]
    #[cfg_attr(feature = "schema", schemars(range(max = 1000000)))]
    pub cache_size: usize,
    /// The revocation feed: always polled when a minter is configured (defaults if absent).
    #[serde(default)]
    pub revocations: RevocationConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RevocationConfig {
    #[serde(default = "default_poll_path")]
    #[cfg_attr(feature = "schema", schemars(pattern(r"^/[^?#]*$")))]
    pub path: String,
    #[serde(default = "default_poll_ms")]
    #[cfg_attr(feature = "schema", schemars(range(min = 100, max = 3600000)))]
    pub interval_ms: u64,
    /// Past this age of the last good poll (or, before one, of the moment this VM started
    /// polling) the filter neither uses cached credentials nor mints: 503 `revocations_stale`.
    #[serde(default = "default_max_stale")]
    #[cfg_attr(feature = "schema", schemars(range(min = 5, max = 3600)))]
    pub max_stale_s: u64,
    /// Page size in bytes asked of the minter (`max_bytes`).
    #[serde(default = "default_feed_bytes")]
    #[cfg_attr(feature = "schema", schemars(range(min = 4096, max = 196608)))]
    pub max_bytes: u64,
}

impl Default for RevocationConfig {
    fn default() -> Self {
        RevocationConfig {
            path: default_poll_path(),
            interval_ms: default_poll_ms(),
            max_stale_s: default_max_stale(),
            max_bytes: default_feed_bytes(),
        }
    }
}

impl RevocationConfig {
    /// Longest wait between failed polls: a quarter of `max_stale_s` (at least one interval),
    /// so a feed that comes back is heard from well before the filter goes stale.
    pub fn max_backoff_ms(&self) -> u64 {
        (self.max_stale_s.saturating_mul(1000) / 4).max(self.interval_ms)
    }
}

/// A credential to inject upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// Header name and full value (scheme included). The value is a secret.
    pub header: String,
    pub value: String,
    pub exp: u64,
    pub jti: Option<String>,
    pub task: Option<String>,
    pub subject: String,
    /// A legacy static secret stood in for a minted token.
    pub legacy: bool,
}

impl std::fmt::Display for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the value.
        write!(f, "credential(jti={:?}, exp={})", self.jti, self.exp)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintRequest {
    /// The caller's SVID, or for a delegated request the Txn-Token.
    pub subject_token: Vec<u8>,
    /// `JWT_TOKEN_TYPE`, or `TXN_TOKEN_TYPE` for a delegated request.
    pub subject_token_type: &'static str,
    /// Delegated requests: the caller's SVID as received (type jwt).
    pub actor_token: Option<Vec<u8>>,
    pub audience: String,
    pub scopes: Vec<String>,
    pub ttl_s: Option<u64>,
    pub task: Option<String>,
    pub intent: Option<String>,
    /// MCP: the tool the credential is for (`tool` extension parameter; claim checked).
    pub tool: Option<String>,
}

impl MintRequest {
    /// The form-encoded RFC 8693 body.
    pub fn form_body(&self) -> Vec<u8> {
        let mut f = form_urlencoded::Serializer::new(String::new());
        f.append_pair("grant_type", GRANT_TYPE);
        f.append_pair("subject_token", &String::from_utf8_lossy(&self.subject_token));
        f.append_pair("subject_token_type", self.subject_token_type);
        if let Some(a) = &self.actor_token {
            f.append_pair("actor_token", &String::from_utf8_lossy(a));
            f.append_pair("actor_token_type", JWT_TOKEN_TYPE);
        }
        f.append_pair("audience", &self.audience);
        if !self.scopes.is_empty() {
            f.append_pair("scope", &self.scopes.join(" "));
        }
        if let Some(t) = self.ttl_s {
            f.append_pair("requested_ttl", &t.to_string());
        }
        if let Some(t) = &self.task {
            f.append_pair("task", t);
        }
        if let Some(i) = &self.intent {
            f.append_pair("intent", i);
        }
        if let Some(t) = &self.tool {
            f.append_pair("tool", t);
        }
        f.finish().into_bytes()
    }

    /// Cache key of this exchange's credential.
    pub fn cache_key(&self, subject: &str) -> [u8; 16] {
        let txn = self.actor_token.as_ref().map(|_| crate::identity::token_digest(&self.subject_token));
        credential_key(subject, &self.audience, &self.scopes, self.task.as_deref(), self.intent.as_deref(), self.tool.as_deref(), txn.as_ref())
    }
}

/// Credential cache key: (subject, audience, scopes, task, intent, tool, and for a delegated
/// request the Txn-Token's digest: different chains never share a credential).
pub fn credential_key(subject: &str, audience: &str, scopes: &[String], task: Option<&str>, intent: Option<&str>, tool: Option<&str>, txn: Option<&[u8; 16]>) -> [u8; 16] {
    let mut h = Sha256::new();
    let mut part = |p: &str| {
        h.update((p.len() as u32).to_le_bytes());
        h.update(p.as_bytes());
    };
    part(subject);
    part(audience);
    part(&scopes.len().to_string());
    for s in scopes {
        part(s);
    }
    part(task.unwrap_or(""));
    part(intent.unwrap_or(""));
    // Absent and empty differ: a tool name is never empty, so "" stands for none.
    if let Some(t) = tool {
        part("tool");
        part(t);
    }
    if let Some(d) = txn {
        h.update(b"txn");
        h.update(d);
    }
    let full: [u8; 32] = h.finalize().into();
    let mut out = [0u8; 16];
    out.copy_from_slice(full.get(..16).unwrap_or(&[0u8; 16]));
    out
}

/// Why no credential could be obtained. Details go to logs, never to the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MintError {
    NoResponse,
    Status(u16),
    Malformed(&'static str),
    TooLarge,
    Dispatch(String),
    /// The minter refused the exchange for a reason the caller must hear (a refusal, not an
    /// outage): an ended, expired or unregistered task, a revoked subject.
    Refused(crate::reason::Reason),
    /// The minted token is not what was asked for (audience, subject or task).
    Mismatch(&'static str),
}

impl std::fmt::Display for MintError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MintError::NoResponse => write!(f, "no response (timeout, reset or no healthy endpoint)"),
            MintError::Status(s) => write!(f, "minter answered HTTP {s}"),
            MintError::Malformed(w) => write!(f, "malformed minter answer: {w}"),
            MintError::TooLarge => write!(f, "minter answer too large"),
            MintError::Dispatch(e) => write!(f, "cannot call the minter: {e}"),
            MintError::Refused(r) => write!(f, "the minter refused the exchange: {}", r.code()),
            MintError::Mismatch(w) => write!(f, "minted token refused: {w}"),
        }
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: Option<String>,
    issued_token_type: Option<String>,
    // `token_type` is not read: `Bearer` for a JWT, `N_A` for a static secret (RFC 6749 §7.1).
    expires_in: Option<u64>,
    /// Static secrets: the header to send it in, and its scheme (`authorization` only).
    #[serde(default)]
    mandate_header: Option<String>,
    #[serde(default)]
    mandate_scheme: Option<String>,
}

#[derive(Deserialize)]
struct JwtPeek {
    jti: Option<String>,
    exp: Option<u64>,
    sub: Option<String>,
    aud: Option<Audience>,
    task: Option<String>,
    #[serde(default)]
    tool: Option<String>,
    #[serde(default)]
    act: Option<ActPeek>,
    #[serde(default)]
    txn: Option<String>,
}

#[derive(Deserialize)]
struct ActPeek {
    sub: Option<String>,
}

/// What a minted token must say, beyond its audience, task and tool.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    /// `sub`: the caller, or for a delegated request the original principal.
    pub subject: &'a str,
    /// Delegated requests: `act.sub` (the caller; `None` for a root Txn-Token, whose
    /// credential names no actor) and `txn` (the Txn-Token's).
    pub actor: Option<&'a str>,
    pub txn: Option<&'a str>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn names(&self, audience: &str) -> bool {
        match self {
            Audience::One(a) => a == audience,
            Audience::Many(list) => list.iter().any(|a| a == audience),
        }
    }
}

/// An RFC 6749 error answer with the minter's `mandate_reason` extension.
#[derive(Deserialize)]
struct ErrorAnswer {
    error: Option<String>,
    mandate_reason: Option<String>,
}

/// The refusal a minter's error answer carries, if it is one the caller must hear (403), not
/// an outage (503). Only `400 invalid_grant` with a known `mandate_reason` counts.
pub fn refusal(status: u16, body: &[u8]) -> Option<crate::reason::Reason> {
    use crate::reason::Reason;
    if status != 400 || body.len() > MAX_RESPONSE_BYTES {
        return None;
    }
    let e: ErrorAnswer = serde_json::from_slice(body).ok()?;
    let reason = e.mandate_reason.as_deref()?;
    // A widened scope is `invalid_scope` (RFC 6749); every other refusal is `invalid_grant`.
    match (e.error.as_deref(), reason) {
        (Some("invalid_grant"), _) | (Some("invalid_scope"), "delegation_scope_exceeded") => {}
        _ => return None,
    }
    match reason {
        "task_ended" => Some(Reason::TaskRevoked),
        // The minter's view of a delegation chain (the Txn-Token revoked since the proxy
        // verified it, or a chain the minter refuses): the caller hears it as the proxy's own.
        "delegation_token_invalid" => Some(Reason::DelegationTokenInvalid),
        "delegation_actor_mismatch" => Some(Reason::DelegationActorMismatch),
        "delegation_loop" => Some(Reason::DelegationLoop),
        "delegation_chain_too_deep" => Some(Reason::DelegationChainTooDeep),
        "delegation_scope_exceeded" => Some(Reason::DelegationScopeExceeded),
        "subject_revoked" | "actor_revoked" => Some(Reason::SubjectRevoked),
        "task_unknown" | "task_not_bound" | "intent_not_in_task" => Some(Reason::TaskUnregistered),
        "task_expired" => Some(Reason::TaskExpired),
        _ => None,
    }
}

/// Checks that a minted JWT is the one asked for: `aud` names the audience, `sub` is the
/// verified caller, `task` is the requested task (both absent or equal).
fn check_minted(peek: Option<&JwtPeek>, audience: &str, expected: Expected<'_>, task: Option<&str>, tool: Option<&str>) -> Result<(), MintError> {
    let subject = expected.subject;
    let p = peek.ok_or(MintError::Mismatch("the minted token's claims are unreadable"))?;
    if !p.aud.as_ref().is_some_and(|a| a.names(audience)) {
        return Err(MintError::Mismatch("the minted token is for another audience"));
    }
    if p.sub.as_deref() != Some(subject) {
        return Err(MintError::Mismatch("the minted token is for another subject"));
    }
    if p.task.as_deref() != task {
        return Err(MintError::Mismatch("the minted token is for another task"));
    }
    if p.tool.as_deref() != tool {
        return Err(MintError::Mismatch("the minted token is for another tool"));
    }
    match (expected.actor, expected.txn) {
        (Some(actor), _) if p.act.as_ref().and_then(|a| a.sub.as_deref()) != Some(actor) => {
            return Err(MintError::Mismatch("the minted token names another current actor"));
        }
        // A root Txn-Token (no delegation yet): the credential names no actor either.
        (None, Some(_)) if p.act.is_some() => return Err(MintError::Mismatch("the minted token names an actor the chain does not have")),
        _ => {}
    }
    if expected.txn.is_some() && p.txn.as_deref() != expected.txn {
        return Err(MintError::Mismatch("the minted token is for another transaction"));
    }
    Ok(())
}

fn header_value_ok(v: &str) -> bool {
    !v.is_empty() && v.bytes().all(|b| b == b' ' || b == b'\t' || (0x21..0x7f).contains(&b))
}

/// Parses the minter's answer into the credential to inject.
#[allow(clippy::too_many_arguments)]
pub fn parse_response(
    cfg: &MinterConfig,
    status: u16,
    body: &[u8],
    now: u64,
    expected: Expected<'_>,
    task: Option<&str>,
    audience: &str,
    tool: Option<&str>,
) -> Result<Credential, MintError> {
    let subject = expected.subject;
    if status != 200 {
        return Err(refusal(status, body).map_or(MintError::Status(status), MintError::Refused));
    }
    if body.len() > MAX_RESPONSE_BYTES {
        return Err(MintError::TooLarge);
    }
    let r: TokenResponse = serde_json::from_slice(body).map_err(|_| MintError::Malformed("not a token response"))?;
    let token = r.access_token.filter(|t| header_value_ok(t)).ok_or(MintError::Malformed("access_token missing or not a header value"))?;
    let expires_in = r.expires_in.filter(|e| *e > 0).ok_or(MintError::Malformed("expires_in missing"))?;
    let mut exp = now.saturating_add(expires_in);
    // A static secret is recognised by its issued type (its `token_type` is `N_A`, RFC 6749 §7.1).
    if r.issued_token_type.as_deref() == Some(STATIC_SECRET_TYPE) {
        let header = r.mandate_header.unwrap_or_else(|| "authorization".into()).to_ascii_lowercase();
        // The minter names the header; never let it name a pseudo-header or ours.
        if crate::config::check_header_name("minter.mandate_header", &header).is_err()
            || header.starts_with(crate::headers::RESERVED_PREFIX)
        {
            return Err(MintError::Malformed("bad legacy header name"));
        }
        let value = match r.mandate_scheme.as_deref() {
            Some(s) if header == "authorization" && !s.is_empty() => format!("{s} {token}"),
            _ => token,
        };
        if !header_value_ok(&value) {
            return Err(MintError::Malformed("legacy secret is not a header value"));
        }
        return Ok(Credential { header, value, exp, jti: None, task: task.map(str::to_string), subject: subject.to_string(), legacy: true });
    }
    if r.issued_token_type.as_deref().is_some_and(|t| t != JWT_TOKEN_TYPE && t != "urn:ietf:params:oauth:token-type:access_token") {
        return Err(MintError::Malformed("unexpected issued_token_type"));
    }
    // The JWT comes from our own minter over an authenticated channel; read (not verify) its
    // claims: it must be the token asked for, and its jti and exp go to the record and cache.
    let peek = token
        .split('.')
        .nth(1)
        .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
        .and_then(|b| serde_json::from_slice::<JwtPeek>(&b).ok());
    check_minted(peek.as_ref(), audience, expected, task, tool)?;
    let jti = peek.as_ref().and_then(|p| p.jti.clone());
    if let Some(e) = peek.and_then(|p| p.exp) {
        exp = exp.min(e);
    }
    let value = if cfg.scheme.is_empty() { token } else { format!("{} {token}", cfg.scheme) };
    Ok(Credential { header: cfg.header.clone(), value, exp, jti, task: task.map(str::to_string), subject: subject.to_string(), legacy: false })
}

/// Per-worker credential cache, purged by revocations.
pub struct CredentialCache {
    entries: Option<LruCache<[u8; 16], Rc<Credential>>>,
    margin: u64,
}

impl CredentialCache {
    pub fn new(size: usize, margin: u64) -> Self {
        CredentialCache { entries: NonZeroUsize::new(size).map(LruCache::new), margin }
    }

    pub fn get(&mut self, key: &[u8; 16], now: u64) -> Option<Rc<Credential>> {
        let c = self.entries.as_mut()?;
        let fresh = c.get(key).filter(|cred| now.saturating_add(self.margin) < cred.exp).cloned();
        if fresh.is_none() {
            c.pop(key);
        }
        fresh
    }

    pub fn put(&mut self, key: [u8; 16], cred: Rc<Credential>) {
        if let Some(c) = self.entries.as_mut() {
            c.put(key, cred);
        }
    }

    pub fn len(&self) -> usize {
        self.entries.as_ref().map_or(0, LruCache::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every credential matching the revocation. Returns how many.
    pub fn purge(&mut self, r: &Revocation) -> usize {
        let Some(c) = self.entries.as_mut() else { return 0 };
        let doomed: Vec<[u8; 16]> = c
            .iter()
            .filter(|(_, cred)| match r.kind {
                RevocationKind::Task => {
                    cred.task.as_deref() == Some(r.value.as_str()) && r.subject.as_ref().is_none_or(|s| *s == cred.subject)
                }
                RevocationKind::Jti => cred.jti.as_deref() == Some(r.value.as_str()),
                RevocationKind::Subject => cred.subject == r.value,
            })
            .map(|(k, _)| *k)
            .collect();
        for k in &doomed {
            c.pop(k);
        }
        doomed.len()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevocationKind {
    Task,
    Jti,
    Subject,
}

/// One feed entry the plugin understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    pub kind: RevocationKind,
    pub value: String,
    /// Task entries only: the revocation covers this subject's use of the task, not the task.
    pub subject: Option<String>,
}

/// One page of the revocation feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedPage {
    pub epoch: Option<String>,
    pub cursor: u64,
    pub reset: bool,
    pub more: bool,
    pub revocations: Vec<Revocation>,
    /// Entries of a kind this plugin does not know: skipped, the cursor still moves past them.
    pub skipped: usize,
    /// The minter's offer of long polls: it holds a poll with `wait_ms` up to this long.
    pub wait_max_ms: Option<u64>,
}

#[derive(Deserialize)]
struct RawPage {
    #[serde(default)]
    epoch: Option<String>,
    cursor: u64,
    #[serde(default)]
    reset: bool,
    #[serde(default)]
    more: bool,
    #[serde(default)]
    wait_max_ms: Option<u64>,
    revocations: Vec<serde_json::Value>,
}

/// The minter's epoch goes back into a query string: only URL-safe characters, bounded.
fn epoch_ok(e: &str) -> bool {
    (1..=128).contains(&e.len()) && e.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b))
}

/// One entry: `Ok(None)` for a kind this plugin does not know (skipped); an entry of a known
/// kind that is malformed fails the page (the minter validates what it publishes, so this is
/// a broken minter: better stale and loud than a revocation silently dropped).
fn parse_entry(v: &serde_json::Value) -> Result<Option<Revocation>, MintError> {
    let kind = match v.get("kind").and_then(serde_json::Value::as_str) {
        Some("task") => RevocationKind::Task,
        Some("jti") => RevocationKind::Jti,
        Some("subject") => RevocationKind::Subject,
        _ => return Ok(None),
    };
    let value = v
        .get("value")
        .and_then(serde_json::Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or(MintError::Malformed("revocation entry without a value"))?;
    let subject = match v.get("subject") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(_) => return Err(MintError::Malformed("revocation entry with a bad subject")),
    };
    let subject = if kind == RevocationKind::Task { subject } else { None };
    Ok(Some(Revocation { kind, value: value.to_string(), subject }))
}

/// Parses one feed page. Entries of unknown kinds are counted and skipped.
pub fn parse_feed(status: u16, body: &[u8]) -> Result<FeedPage, MintError> {
    if status != 200 {
        return Err(MintError::Status(status));
    }
    if body.len() > MAX_FEED_BYTES {
        return Err(MintError::TooLarge);
    }
    let raw: RawPage = serde_json::from_slice(body).map_err(|_| MintError::Malformed("not a revocation feed page"))?;
    if raw.epoch.as_deref().is_some_and(|e| !epoch_ok(e)) {
        return Err(MintError::Malformed("revocation feed epoch is not a short URL-safe string"));
    }
    let mut revocations = Vec::with_capacity(raw.revocations.len());
    let mut skipped = 0;
    for v in &raw.revocations {
        match parse_entry(v)? {
            Some(r) => revocations.push(r),
            None => skipped += 1,
        }
    }
    Ok(FeedPage { epoch: raw.epoch, cursor: raw.cursor, reset: raw.reset, more: raw.more, revocations, skipped, wait_max_ms: raw.wait_max_ms })
}

/// Subject-scoped revocations kept per task (a registered task names at most 16 subjects).
const MAX_SUBJECTS_PER_TASK: usize = 256;

/// Revoked tasks, (task, subject) pairs, subjects and jtis this worker has heard of. Bounded
/// (oldest dropped first), and never reset by the feed: a new epoch adds, it never forgets.
pub struct RevokedSet {
    tasks: LruCache<String, ()>,
    task_subjects: LruCache<String, Vec<String>>,
    subjects: LruCache<String, ()>,
    jtis: LruCache<String, ()>,
}

/// Most entries each part of [`RevokedSet`] keeps.
const MAX_REVOKED: usize = 65_536;

impl Default for RevokedSet {
    fn default() -> Self {
        // Unbounded tables that grow with use, capped by `put_capped`: `LruCache::new(cap)`
        // allocates its whole table up front (four 65 536-entry tables: ~4.7 MB of every VM's
        // linear memory before a single revocation is heard of).
        RevokedSet { tasks: LruCache::unbounded(), task_subjects: LruCache::unbounded(), subjects: LruCache::unbounded(), jtis: LruCache::unbounded() }
    }
}

/// `put`, dropping the least recently used entry first when a new key would exceed `MAX_REVOKED`.
fn put_capped<V>(map: &mut LruCache<String, V>, key: String, value: V) {
    if map.len() >= MAX_REVOKED && !map.contains(&key) {
        map.pop_lru();
    }
    map.put(key, value);
}

impl RevokedSet {
    pub fn add(&mut self, r: &Revocation) {
        match (r.kind, &r.subject) {
            (RevocationKind::Task, None) => {
                put_capped(&mut self.tasks, r.value.clone(), ());
            }
            (RevocationKind::Task, Some(s)) => {
                if let Some(list) = self.task_subjects.get_mut(&r.value) {
                    if !list.contains(s) {
                        if list.len() >= MAX_SUBJECTS_PER_TASK {
                            list.remove(0);
                        }
                        list.push(s.clone());
                    }
                } else {
                    put_capped(&mut self.task_subjects, r.value.clone(), vec![s.clone()]);
                }
            }
            (RevocationKind::Subject, _) => {
                put_capped(&mut self.subjects, r.value.clone(), ());
            }
            (RevocationKind::Jti, _) => {
                // Remembered too: a credential may land after its jti was revoked.
                put_capped(&mut self.jtis, r.value.clone(), ());
            }
        }
    }

    pub fn jti_revoked(&self, jti: &str) -> bool {
        self.jtis.contains(jti)
    }

    /// Whether `task` is revoked for `subject`: globally, or for that subject alone.
    pub fn task_revoked(&self, task: &str, subject: &str) -> bool {
        self.tasks.contains(task) || self.task_subjects.peek(task).is_some_and(|l| l.iter().any(|s| s == subject))
    }

    pub fn subject_revoked(&self, subject: &str) -> bool {
        self.subjects.contains(subject)
    }

    pub fn revoked_tasks(&self) -> HashSet<String> {
        self.tasks.iter().map(|(k, _)| k.clone()).collect()
    }
}

/// Back-to-back pages fetched while the minter says `more` before waiting an interval.
const MAX_MORE_STREAK: u32 = 100;

/// The revocation feed client of one VM: what it knows, where it is in the feed, how fresh
/// that is, and when to ask next. Host-independent; the shell dispatches and delivers.
///
/// A VM starts polling with its first request ([`RevocationFeed::activate`]): Envoy's
/// main-thread VM never serves requests, so it never polls. The staleness clock starts then.
/// The state (not the schedule) survives reconfiguration: the revoked set is never forgotten
/// and the feed is not replayed.
#[derive(Default)]
pub struct RevocationFeed {
    pub revoked: RevokedSet,
    pub cursor: u64,
    pub epoch: Option<String>,
    /// Unix time, s, of the last good poll.
    pub last_good: Option<u64>,
    /// Unix time, s, at which this VM started polling (its first request).
    pub started: Option<u64>,
    /// Failed polls in a row.
    pub failures: u32,
    /// `limit` asked for after pages over [`MAX_FEED_BYTES`] (a minter ignoring `max_bytes`).
    limit: Option<u32>,
    next_poll_ms: u64,
    dispatched_ms: u64,
    /// Set while a poll is out; a poll whose answer never comes is given up after this.
    in_flight_until_ms: Option<u64>,
    more_streak: u32,
    /// The minter's long-poll offer (`wait_max_ms` of its last good page); dropped on a failed
    /// poll, so a minter that stops holding polls is polled plainly again.
    long_poll_offer: Option<u64>,
    /// The `wait_ms` of the poll in flight (0: a plain poll).
    asked_wait_ms: u64,
}

/// Shortest long poll worth asking for, ms.
const MIN_LONG_POLL_MS: u64 = 100;

/// The `wait_ms` to ask for: the minter's offer, but well within the callout timeout (a
/// quarter of it, at least 250 ms, left for the answer to travel).
pub fn long_poll_wait_ms(offer: Option<u64>, timeout_ms: u64) -> u64 {
    let Some(offer) = offer else { return 0 };
    let wait = offer.min(timeout_ms.saturating_sub((timeout_ms / 4).max(250)));
    if wait < MIN_LONG_POLL_MS {
        0
    } else {
        wait
    }
}

impl RevocationFeed {
    /// Starts polling (idempotent): the first poll is due at once, and the staleness clock runs.
    pub fn activate(&mut self, now_s: u64) {
        if self.started.is_none() {
            self.started = Some(now_s);
        }
    }

    pub fn active(&self) -> bool {
        self.started.is_some()
    }

    /// The same knowledge with a fresh schedule, for a new configuration.
    pub fn carried(self) -> RevocationFeed {
        RevocationFeed { next_poll_ms: 0, dispatched_ms: 0, in_flight_until_ms: None, more_streak: 0, asked_wait_ms: 0, ..self }
    }

    /// The path and query of the next poll, if one is due (and marks it in flight).
    pub fn due(&mut self, cfg: &RevocationConfig, timeout_ms: u64, now_ms: u64) -> Option<String> {
        if !self.active() || self.in_flight_until_ms.is_some_and(|until| now_ms < until) {
            return None;
        }
        // Host timers fire a little early or late; a tenth of the interval of slack keeps
        // polls on schedule instead of slipping a whole tick.
        if now_ms.saturating_add(cfg.interval_ms / 10) < self.next_poll_ms {
            return None;
        }
        self.in_flight_until_ms = Some(now_ms.saturating_add(timeout_ms).saturating_add(5000));
        self.dispatched_ms = now_ms;
        // Long-poll only from a known position (an epoch): a first poll answers at once anyway.
        self.asked_wait_ms = if self.epoch.is_some() { long_poll_wait_ms(self.long_poll_offer, timeout_ms) } else { 0 };
        Some(self.query(cfg))
    }

    fn query(&self, cfg: &RevocationConfig) -> String {
        let mut q = format!("{}?since={}", cfg.path, self.cursor);
        if let Some(e) = &self.epoch {
            q.push_str("&epoch=");
            q.push_str(e);
        }
        q.push_str(&format!("&max_bytes={}", cfg.max_bytes));
        if let Some(l) = self.limit {
            q.push_str(&format!("&limit={l}"));
        }
        if self.asked_wait_ms > 0 {
            q.push_str(&format!("&wait_ms={}", self.asked_wait_ms));
        }
        q
    }

    /// Delay before the next poll after `failures` failed ones: the interval, doubled per
    /// failure, capped at [`RevocationConfig::max_backoff_ms`].
    pub fn backoff_ms(cfg: &RevocationConfig, failures: u32) -> u64 {
        let doublings = failures.saturating_sub(1).min(20);
        cfg.interval_ms.saturating_mul(1u64 << doublings).min(cfg.max_backoff_ms())
    }

    /// Takes a poll's outcome. On success returns the page (its entries are now in the
    /// revoked set); on failure schedules the retry with backoff.
    pub fn on_answer(&mut self, cfg: &RevocationConfig, answer: Result<(u16, &[u8]), MintError>, now_ms: u64) -> Result<FeedPage, MintError> {
        self.in_flight_until_ms = None;
        let page = match answer.and_then(|(status, body)| parse_feed(status, body)) {
            Ok(p) => p,
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                self.more_streak = 0;
                self.long_poll_offer = None;
                if e == MintError::TooLarge {
                    self.limit = Some(self.limit.map_or(FEED_LIMIT_START, |l| (l / 2).max(1)));
                }
                self.next_poll_ms = now_ms.saturating_add(Self::backoff_ms(cfg, self.failures));
                return Err(e);
            }
        };
        self.failures = 0;
        // Fresh only once caught up: while pages remain, newer revocations may be unread.
        if !page.more {
            self.last_good = Some(now_ms / 1000);
        }
        let new_epoch = page.epoch != self.epoch;
        let progress = if page.reset || new_epoch {
            // A restored or restarted minter (or our first poll): its cursor, our knowledge.
            let progress = new_epoch || page.cursor > self.cursor;
            self.cursor = page.cursor;
            self.epoch = page.epoch.clone();
            progress
        } else {
            let progress = page.cursor > self.cursor;
            self.cursor = self.cursor.max(page.cursor);
            progress
        };
        if new_epoch {
            // Another minter store: it may honour `max_bytes`; ask without a limit again.
            self.limit = None;
        }
        for r in &page.revocations {
            self.revoked.add(r);
        }
        let asked = std::mem::take(&mut self.asked_wait_ms);
        self.long_poll_offer = page.wait_max_ms;
        // A long poll that was held (or brought news) is followed by the next one at once: the
        // minter answers it the moment a revocation commits. One answered early with nothing
        // new (a minter not holding polls) waits an interval, as a plain poll does.
        // A plain poll whose answer offers long polls switches to them at once.
        let held = if asked > 0 { progress || now_ms.saturating_sub(self.dispatched_ms) >= asked / 2 } else { page.wait_max_ms.is_some() };
        if page.more && progress && self.more_streak < MAX_MORE_STREAK {
            self.more_streak += 1;
            self.next_poll_ms = now_ms;
        } else if held && !page.more && self.long_poll_offer.is_some() {
            self.more_streak = 0;
            self.next_poll_ms = now_ms;
        } else {
            self.more_streak = 0;
            self.next_poll_ms = self.dispatched_ms.saturating_add(cfg.interval_ms);
        }
        Ok(page)
    }

    /// Seconds since the last good poll (or since polling started); 0 before it starts.
    pub fn lag_s(&self, now_s: u64) -> u64 {
        self.last_good.or(self.started).map_or(0, |t| now_s.saturating_sub(t))
    }

    /// Past `max_stale_s` without a good poll: cached credentials and minting are refused.
    pub fn stale(&self, cfg: &RevocationConfig, now_s: u64) -> bool {
        self.active() && self.lag_s(now_s) > cfg.max_stale_s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reason::Reason;
    use serde_json::json;

    #[test]
    fn epoch_with_query_characters_cannot_inject_poll_parameters() {
        for epoch in ["E1&since=0", "E1#x", "E 1", "E1\n", "é", "", &"e".repeat(129)] {
            let body = json!({"epoch": epoch, "cursor": 1, "revocations": []}).to_string();
            assert!(matches!(parse_feed(200, body.as_bytes()), Err(MintError::Malformed(_))), "{epoch:?}");
        }
        let body = json!({"epoch": "Zm9v-YmFy_0.~", "cursor": 1, "revocations": []}).to_string();
        assert!(parse_feed(200, body.as_bytes()).is_ok());
    }

    #[test]
    fn feed_page_that_is_not_a_page_is_refused() {
        for body in [
            json!({"cursor": -1, "revocations": []}),
            json!({"cursor": "7", "revocations": []}),
            json!({"revocations": []}),
            json!({"cursor": 1}),
            json!({"cursor": 1, "revocations": {"kind": "task"}}),
            json!([1, 2]),
        ] {
            assert!(parse_feed(200, body.to_string().as_bytes()).is_err(), "{body}");
        }
        assert_eq!(parse_feed(503, b"{}"), Err(MintError::Status(503)));
        let mut big = br#"{"cursor":1,"revocations":[]}"#.to_vec();
        big.resize(MAX_FEED_BYTES + 1, b' ');
        assert_eq!(parse_feed(200, &big), Err(MintError::TooLarge), "never parsed past the callout limit");
    }

    #[test]
    fn subject_field_on_other_kinds_cannot_narrow_them() {
        // A subject or jti entry is global whatever else it carries.
        let body = json!({"cursor": 2, "revocations": [
            {"seq": 1, "kind": "subject", "value": "spiffe://td/a", "subject": "spiffe://td/b"},
            {"seq": 2, "kind": "jti", "value": "j1", "subject": "spiffe://td/b"}]})
        .to_string();
        let page = parse_feed(200, body.as_bytes()).unwrap();
        assert!(page.revocations.iter().all(|r| r.subject.is_none()));
    }

    #[test]
    fn minter_error_body_cannot_turn_an_outage_into_a_refusal_or_back() {
        let ended = json!({"error": "invalid_grant", "mandate_reason": "task_ended"}).to_string();
        assert_eq!(refusal(400, ended.as_bytes()), Some(Reason::TaskRevoked));
        let widened = json!({"error": "invalid_scope", "mandate_reason": "delegation_scope_exceeded"}).to_string();
        assert_eq!(refusal(400, widened.as_bytes()), Some(Reason::DelegationScopeExceeded));
        let lifted = json!({"error": "invalid_grant", "mandate_reason": "delegation_token_invalid"}).to_string();
        assert_eq!(refusal(400, lifted.as_bytes()), Some(Reason::DelegationTokenInvalid));
        for (status, body) in [
            (400, json!({"error": "invalid_scope", "mandate_reason": "task_ended"}).to_string()),
            (401, ended.clone()),
            (500, ended.clone()),
            (400, json!({"error": "invalid_client", "mandate_reason": "task_ended"}).to_string()),
            (400, json!({"error": "invalid_grant", "mandate_reason": ["task_ended"]}).to_string()),
            (400, json!({"error": "invalid_grant", "mandate_reason": "TASK_ENDED"}).to_string()),
            (400, "task_ended".to_string()),
            (400, format!("{}{}", ended, " ".repeat(MAX_RESPONSE_BYTES))),
        ] {
            assert_eq!(refusal(status, body.as_bytes()), None, "{status} {}", body.get(..80).unwrap_or(&body));
        }
    }

    fn page(cursor: u64, offer: Option<u64>) -> String {
        let mut v = json!({"epoch": "E1", "cursor": cursor, "revocations": []});
        if let Some(o) = offer {
            v["wait_max_ms"] = json!(o);
        }
        v.to_string()
    }

    fn started() -> (RevocationFeed, RevocationConfig) {
        let mut f = RevocationFeed::default();
        f.activate(1);
        (f, RevocationConfig::default())
    }

    #[test]
    fn long_poll_is_asked_for_when_offered_and_stays_within_the_callout_timeout() {
        let (mut f, cfg) = started();
        let q = f.due(&cfg, 1000, 0).unwrap();
        assert!(!q.contains("wait_ms"), "no long poll before the minter offers one: {q}");
        f.on_answer(&cfg, Ok((200, page(3, Some(25_000)).as_bytes())), 10).unwrap();
        // The minter offered: the next poll goes out at once and asks for a held answer,
        // a quarter (≥ 250 ms) of the 1 s callout timeout short of it.
        let q = f.due(&cfg, 1000, 10).unwrap();
        assert!(q.ends_with("&wait_ms=750"), "{q}");
        // Held, then answered with nothing new: the next long poll at once again.
        f.on_answer(&cfg, Ok((200, page(3, Some(25_000)).as_bytes())), 760).unwrap();
        assert!(f.due(&cfg, 1000, 760).is_some_and(|q| q.contains("wait_ms=750")));
        // News ends a poll early: the next one goes out at once too.
        f.on_answer(&cfg, Ok((200, page(4, Some(25_000)).as_bytes())), 800).unwrap();
        assert!(f.due(&cfg, 1000, 800).is_some());
        // A longer callout timeout allows a longer wait; a small offer is taken as it is.
        assert_eq!(long_poll_wait_ms(Some(25_000), 10_000), 7500);
        assert_eq!(long_poll_wait_ms(Some(400), 10_000), 400);
    }

    #[test]
    fn a_huge_long_poll_offer_cannot_hold_a_poll_past_the_callout_timeout() {
        for timeout in [1000, 5000, 60_000, u64::MAX] {
            let w = long_poll_wait_ms(Some(u64::MAX), timeout);
            assert!(w < timeout && w > 0, "{timeout}: {w}");
        }
        assert_eq!(long_poll_wait_ms(Some(25_000), 300), 0, "no room in a 300 ms timeout: plain polling");
        assert_eq!(long_poll_wait_ms(Some(50), 1000), 0, "too short to be worth it");
        assert_eq!(long_poll_wait_ms(None, 1000), 0);
    }

    #[test]
    fn without_an_offer_or_after_a_failure_the_filter_polls_plainly() {
        let (mut f, cfg) = started();
        f.due(&cfg, 1000, 0).unwrap();
        f.on_answer(&cfg, Ok((200, page(3, None).as_bytes())), 10).unwrap();
        assert!(f.due(&cfg, 1000, 10).is_none(), "a plain poll waits its interval");
        let q = f.due(&cfg, 1000, cfg.interval_ms).unwrap();
        assert!(!q.contains("wait_ms"), "{q}");
        f.on_answer(&cfg, Ok((200, page(3, Some(25_000)).as_bytes())), cfg.interval_ms + 5).unwrap();
        assert!(f.due(&cfg, 1000, cfg.interval_ms + 5).unwrap().contains("wait_ms="));
        // The long poll fails (a timeout, a 503): backoff, and the next poll is a plain one.
        let _ = f.on_answer(&cfg, Err(MintError::Status(503)), cfg.interval_ms + 900);
        assert!(f.due(&cfg, 1000, cfg.interval_ms + 900).is_none(), "backoff, not a hot loop");
        let q = f.due(&cfg, 1000, 10 * cfg.interval_ms).unwrap();
        assert!(!q.contains("wait_ms"), "{q}");
    }

    #[test]
    fn a_minter_answering_long_polls_at_once_cannot_make_the_filter_spin() {
        // A minter that offers long polls but answers them at once with nothing new: polled
        // at the interval, not in a loop.
        let (mut f, cfg) = started();
        f.due(&cfg, 1000, 0).unwrap();
        f.on_answer(&cfg, Ok((200, page(3, Some(25_000)).as_bytes())), 5).unwrap();
        assert!(f.due(&cfg, 1000, 5).unwrap().contains("wait_ms=750"));
        f.on_answer(&cfg, Ok((200, page(3, Some(25_000)).as_bytes())), 8).unwrap();
        assert!(f.due(&cfg, 1000, 8).is_none(), "answered at once with nothing: wait an interval");
        assert!(f.due(&cfg, 1000, 5 + cfg.interval_ms).is_some());
    }

    #[test]
    fn feed_page_with_a_bogus_long_poll_offer_is_refused() {
        for offer in [json!(-1), json!("25000"), json!(1.5), json!({"ms": 1})] {
            let body = json!({"epoch": "E1", "cursor": 1, "wait_max_ms": offer, "revocations": []}).to_string();
            assert!(matches!(parse_feed(200, body.as_bytes()), Err(MintError::Malformed(_))), "{offer}");
        }
        let body = json!({"epoch": "E1", "cursor": 1, "wait_max_ms": null, "revocations": []}).to_string();
        assert_eq!(parse_feed(200, body.as_bytes()).map(|p| p.wait_max_ms), Ok(None));
    }

    #[test]
    fn revoked_set_is_a_union_across_resets() {
        let mut set = RevokedSet::default();
        set.add(&Revocation { kind: RevocationKind::Task, value: "T".into(), subject: Some("a".into()) });
        set.add(&Revocation { kind: RevocationKind::Task, value: "T".into(), subject: Some("b".into()) });
        assert!(set.task_revoked("T", "a") && set.task_revoked("T", "b") && !set.task_revoked("T", "c"));
        set.add(&Revocation { kind: RevocationKind::Task, value: "T".into(), subject: None });
        assert!(set.task_revoked("T", "c"), "a global entry covers everyone");
    }

    #[test]
    fn revoked_set_grows_with_use_and_stays_bounded() {
        let mut set = RevokedSet::default();
        assert_eq!(set.tasks.cap().get(), usize::MAX, "no table allocated up front");
        let task = |i: usize| Revocation { kind: RevocationKind::Task, value: format!("T{i}"), subject: None };
        for i in 0..=MAX_REVOKED {
            set.add(&task(i));
        }
        assert_eq!(set.tasks.len(), MAX_REVOKED);
        assert!(!set.task_revoked("T0", "a"), "the oldest went first");
        assert!(set.task_revoked("T1", "a") && set.task_revoked(&format!("T{MAX_REVOKED}"), "a"));
        set.add(&task(1));
        assert_eq!(set.tasks.len(), MAX_REVOKED, "a known entry is refreshed, nothing dropped");
    }
}
