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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MinterConfig {
    /// Envoy cluster of the minter (mTLS in production, loopback in development).
    pub cluster: String,
    /// `:authority` of minter calls; defaults to the cluster name.
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default = "default_path")]
    pub path: String,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Header the minted credential goes in upstream.
    #[serde(default = "default_header")]
    pub header: String,
    #[serde(default = "default_scheme")]
    pub scheme: String,
    /// Reuse a credential until this many seconds before it expires.
    #[serde(default = "default_margin")]
    pub refresh_margin_s: u64,
    /// Credential cache entries per worker.
    #[serde(default = "default_cache")]
    pub cache_size: usize,
    #[serde(default)]
    pub revocations: Option<RevocationConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationConfig {
    #[serde(default = "default_poll_path")]
    pub path: String,
    #[serde(default = "default_poll_ms")]
    pub interval_ms: u64,
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
    pub subject_token: Vec<u8>,
    pub audience: String,
    pub scopes: Vec<String>,
    pub ttl_s: Option<u64>,
    pub task: Option<String>,
    pub intent: Option<String>,
}

impl MintRequest {
    /// The form-encoded RFC 8693 body.
    pub fn form_body(&self) -> Vec<u8> {
        let mut f = form_urlencoded::Serializer::new(String::new());
        f.append_pair("grant_type", GRANT_TYPE);
        f.append_pair("subject_token", &String::from_utf8_lossy(&self.subject_token));
        f.append_pair("subject_token_type", JWT_TOKEN_TYPE);
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
        f.finish().into_bytes()
    }

    /// Cache key of this exchange's credential.
    pub fn cache_key(&self, subject: &str) -> [u8; 16] {
        credential_key(subject, &self.audience, &self.scopes, self.task.as_deref(), self.intent.as_deref())
    }
}

/// Credential cache key: (subject, audience, scopes, task, intent). Delegation chains join later.
pub fn credential_key(subject: &str, audience: &str, scopes: &[String], task: Option<&str>, intent: Option<&str>) -> [u8; 16] {
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
}

impl std::fmt::Display for MintError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MintError::NoResponse => write!(f, "no response (timeout, reset or no healthy endpoint)"),
            MintError::Status(s) => write!(f, "minter answered HTTP {s}"),
            MintError::Malformed(w) => write!(f, "malformed minter answer: {w}"),
            MintError::TooLarge => write!(f, "minter answer too large"),
            MintError::Dispatch(e) => write!(f, "cannot call the minter: {e}"),
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
}

fn header_value_ok(v: &str) -> bool {
    !v.is_empty() && v.bytes().all(|b| b == b' ' || b == b'\t' || (0x21..0x7f).contains(&b))
}

/// Parses the minter's answer into the credential to inject.
pub fn parse_response(
    cfg: &MinterConfig,
    status: u16,
    body: &[u8],
    now: u64,
    subject: &str,
    task: Option<&str>,
) -> Result<Credential, MintError> {
    if status != 200 {
        return Err(MintError::Status(status));
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
    // jti and exp for the record and the cache.
    let peek = token
        .split('.')
        .nth(1)
        .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
        .and_then(|b| serde_json::from_slice::<JwtPeek>(&b).ok());
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
                RevocationKind::Task => cred.task.as_deref() == Some(r.value.as_str()),
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevocationKind {
    Task,
    Jti,
    Subject,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Revocation {
    pub kind: RevocationKind,
    pub value: String,
    #[serde(default)]
    pub at: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RevocationBatch {
    pub cursor: u64,
    pub revocations: Vec<Revocation>,
}

pub fn parse_revocations(status: u16, body: &[u8]) -> Result<RevocationBatch, MintError> {
    if status != 200 {
        return Err(MintError::Status(status));
    }
    if body.len() > 4 * MAX_RESPONSE_BYTES {
        return Err(MintError::TooLarge);
    }
    serde_json::from_slice(body).map_err(|_| MintError::Malformed("not a revocation feed"))
}

/// Revoked tasks and subjects this worker has heard of (bounded; oldest dropped first).
pub struct RevokedSet {
    tasks: LruCache<String, ()>,
    subjects: LruCache<String, ()>,
    jtis: LruCache<String, ()>,
    pub cursor: u64,
    /// Unix time of the last successful poll.
    pub last_poll: Option<u64>,
}

impl Default for RevokedSet {
    fn default() -> Self {
        let cap = NonZeroUsize::new(65_536).unwrap_or(NonZeroUsize::MIN);
        RevokedSet { tasks: LruCache::new(cap), subjects: LruCache::new(cap), jtis: LruCache::new(cap), cursor: 0, last_poll: None }
    }
}

impl RevokedSet {
    pub fn add(&mut self, r: &Revocation) {
        match r.kind {
            RevocationKind::Task => {
                self.tasks.put(r.value.clone(), ());
            }
            RevocationKind::Subject => {
                self.subjects.put(r.value.clone(), ());
            }
            RevocationKind::Jti => {
                // Remembered too: a credential may land after its jti was revoked.
                self.jtis.put(r.value.clone(), ());
            }
        }
    }

    pub fn jti_revoked(&self, jti: &str) -> bool {
        self.jtis.contains(jti)
    }

    pub fn task_revoked(&self, task: &str) -> bool {
        self.tasks.contains(task)
    }

    pub fn subject_revoked(&self, subject: &str) -> bool {
        self.subjects.contains(subject)
    }

    pub fn revoked_tasks(&self) -> HashSet<String> {
        self.tasks.iter().map(|(k, _)| k.clone()).collect()
    }
}
