//! Workload identity: SPIFFE JWT-SVIDs and OIDC tokens, verified inline
//! against trust bundles, to the JWT-SVID specification.
//!
//! Order of checks: size and shape, `alg` (before anything else), `typ`,
//! `crit`, `kid`; then the claims pick the bundle (`sub`'s trust domain, or an
//! exact `iss` match for OIDC); then the cheap claim checks (`exp`, `nbf`,
//! `iat`, `aud`); the signature last. A verified token is cached (keyed by its
//! exact bytes, as Envoy's `jwt_authn` cache is) until its `exp`, tied to the
//! bundle generation that verified it.

pub mod bundles;
pub mod host_crypto;
pub mod jwks;
pub mod jws;
pub mod spiffe_id;

use crate::config::IdentityConfig;
use crate::reason::Reason;
use bundles::{BundleStore, SourceId};
use jwks::{Alg, TrustedKey, VerifyingKey};
use lru::LruCache;
use sha2::{Digest, Sha256};
use spiffe_id::SpiffeId;
use std::num::NonZeroUsize;
use std::rc::Rc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityKind {
    JwtSvid,
    Oidc,
}

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub kind: IdentityKind,
    /// SPIFFE ID (SVIDs, or OIDC mapped by template), else `iss#sub`.
    pub principal: String,
    pub trust_domain: Option<String>,
    pub issuer: Option<String>,
    pub subject: String,
    pub iat: Option<u64>,
    pub exp: u64,
    /// Short hash of the token, for logs. Never the token.
    pub token_hash: String,
    /// Unique per successful verification in this VM: what cached decisions are tied to, so a
    /// decision never outlives the verified token it was made for (re-verification renews it).
    pub serial: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdentityStats {
    pub cache_hits: u64,
    pub cache_misses: u64,
}

struct Cached {
    identity: Rc<Identity>,
    source: SourceId,
    generation: u64,
}

struct Issuer {
    issuer: String,
    audiences: Vec<String>,
    source: SourceId,
    template: Option<String>,
}

/// Verifies a signature with the host's crypto: takes the encoded request, answers with the
/// host's raw reply, or `None` when the host cannot (then the pure-Rust verifier decides).
pub type HostVerify = Rc<dyn Fn(&[u8]) -> Option<Vec<u8>>>;

pub struct Verifier {
    audiences: Vec<String>,
    skew: u64,
    max_token_bytes: usize,
    issuers: Vec<Issuer>,
    pub bundles: BundleStore,
    /// Verified tokens by their exact bytes: a hit costs one fast hash and one comparison, no
    /// SHA-256. Only tokens that passed every check get in, so callers cannot fill it.
    cache: Option<LruCache<Box<[u8]>, Cached>>,
    pub stats: IdentityStats,
    host: Option<HostVerify>,
    serials: u64,
}

/// First 16 bytes of SHA-256: what a token's short hash is made from.
pub fn token_digest(token: &[u8]) -> [u8; 16] {
    let full: [u8; 32] = Sha256::digest(token).into();
    let mut out = [0u8; 16];
    out.copy_from_slice(full.get(..16).unwrap_or(&[0u8; 16]));
    out
}

/// Short printable token hash for logs and records (`sha256:` + 12 hex digits).
pub fn short_hash(digest: &[u8; 16]) -> String {
    let mut s = String::with_capacity(19);
    s.push_str("sha256:");
    for b in digest.iter().take(6) {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

impl Verifier {
    pub fn new(config: &IdentityConfig) -> Result<Verifier, String> {
        let mut bundles = BundleStore::default();
        for td in &config.trust_domains {
            bundles.add_trust_domain(&td.name, &td.bundle)?;
        }
        let mut issuers = Vec::new();
        for o in &config.oidc_issuers {
            let source = bundles.add_issuer(&o.issuer, &o.jwks)?;
            issuers.push(Issuer {
                issuer: o.issuer.clone(),
                audiences: o.audiences.clone(),
                source,
                template: o.spiffe_template.clone(),
            });
        }
        Ok(Verifier {
            audiences: config.audiences.clone(),
            skew: config.clock_skew_s,
            max_token_bytes: config.max_token_bytes,
            issuers,
            bundles,
            cache: NonZeroUsize::new(config.cache_size).map(LruCache::new),
            stats: IdentityStats::default(),
            host: None,
            serials: 0,
        })
    }

    /// Lets the host's crypto check ES256 and RS* signatures (see [`host_crypto`]).
    pub fn set_host_verify(&mut self, host: Option<HostVerify>) {
        self.host = host;
    }

    /// Verifies a bearer token at time `now` (Unix seconds).
    pub fn verify(&mut self, token: &[u8], now: u64) -> Result<Rc<Identity>, Reason> {
        if token.len() > self.max_token_bytes {
            return Err(Reason::TokenMalformed);
        }
        if let Some(hit) = self.cached(token, now)? {
            self.stats.cache_hits += 1;
            return Ok(hit);
        }
        self.stats.cache_misses += 1;

        let parsed = jws::parse(token, self.max_token_bytes)?;
        let claims = &parsed.claims;

        // Which bundle may verify this token: OIDC by exact issuer, else the
        // trust domain named in the SPIFFE ID `sub` — never another one.
        let issuer = claims.iss.as_deref().and_then(|iss| self.issuers.iter().find(|i| i.issuer == iss));
        let subject = claims.sub.as_deref().filter(|s| !s.is_empty()).ok_or(Reason::SubjectMissing)?;
        let (source, audiences, kind, principal, trust_domain) = match issuer {
            Some(issuer) => {
                let (principal, td) = match &issuer.template {
                    Some(t) => {
                        let id = render_template(t, subject).ok_or(Reason::SpiffeIdInvalid)?;
                        let id = SpiffeId::parse(&id).map_err(|_| Reason::SpiffeIdInvalid)?;
                        (id.as_str().to_string(), Some(id.trust_domain().to_string()))
                    }
                    None => (format!("{}#{}", issuer.issuer, subject), None),
                };
                (issuer.source, &issuer.audiences, IdentityKind::Oidc, principal, td)
            }
            None => {
                let id = SpiffeId::parse(subject).map_err(|_| Reason::SpiffeIdInvalid)?;
                let source = self.bundles.trust_domain(id.trust_domain()).ok_or(Reason::TrustDomainUnknown)?;
                let td = id.trust_domain().to_string();
                (source, &self.audiences, IdentityKind::JwtSvid, id.as_str().to_string(), Some(td))
            }
        };
        let (bundle, generation) = self.bundles.current(source, now).ok_or(Reason::BundleUnavailable)?;
        let key = bundle.key(&parsed.kid).ok_or(Reason::KidUnknown)?;
        if !key.accepts(parsed.alg) {
            return Err(Reason::SignatureInvalid);
        }

        let exp = claims.exp.ok_or(Reason::ExpMissing)?;
        if now > exp.saturating_add(self.skew) {
            return Err(Reason::TokenExpired);
        }
        if claims.nbf.is_some_and(|nbf| nbf > now.saturating_add(self.skew)) {
            return Err(Reason::TokenNotYetValid);
        }
        if claims.iat.is_some_and(|iat| iat > now.saturating_add(self.skew)) {
            return Err(Reason::IssuedInFuture);
        }
        let aud = claims.aud.as_ref().ok_or(Reason::AudienceMissing)?;
        if !aud.contains_any(audiences) {
            return Err(Reason::AudienceMismatch);
        }

        self.check_signature(&parsed, key)?;

        let identity = Rc::new(Identity {
            kind,
            principal,
            trust_domain,
            issuer: claims.iss.clone(),
            subject: subject.to_string(),
            iat: claims.iat,
            exp,
            token_hash: short_hash(&token_digest(token)),
            serial: self.serials,
        });
        self.serials = self.serials.wrapping_add(1);
        if let Some(cache) = self.cache.as_mut() {
            cache.put(token.into(), Cached { identity: identity.clone(), source, generation });
        }
        Ok(identity)
    }

    fn cached(&mut self, token: &[u8], now: u64) -> Result<Option<Rc<Identity>>, Reason> {
        let Some(cache) = self.cache.as_mut() else { return Ok(None) };
        let Some(entry) = cache.get(token) else { return Ok(None) };
        let fresh = self.bundles.generation(entry.source) == Some(entry.generation);
        if fresh && !self.bundles.usable(entry.source, now) {
            // The bundle that verified it is past `max_bundle_age_s`: nothing vouches any more.
            cache.pop(token);
            return Err(Reason::BundleUnavailable);
        }
        if !fresh {
            // The bundle changed (rotation or revocation): verify again.
            cache.pop(token);
            return Ok(None);
        }
        if now > entry.identity.exp.saturating_add(self.skew) {
            cache.pop(token);
            return Err(Reason::TokenExpired);
        }
        Ok(Some(entry.identity.clone()))
    }

    pub fn cache_len(&self) -> usize {
        self.cache.as_ref().map_or(0, LruCache::len)
    }

    /// Tolerated clock skew, seconds.
    pub fn skew(&self) -> u64 {
        self.skew
    }

    /// Longest token accepted, bytes.
    pub fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
    }

    /// Checks a parsed token's signature with `key`: the host's crypto when it can, else the
    /// pure-Rust verifier. For other token kinds verified against these bundles (Txn-Tokens).
    #[inline(never)]
    pub(crate) fn check_signature(&self, parsed: &jws::Parsed<'_>, key: &TrustedKey) -> Result<(), Reason> {
        match self.host.as_ref().and_then(|h| host_signature_check(h, parsed, key)) {
            Some(true) => Ok(()),
            Some(false) => Err(Reason::SignatureInvalid),
            None => verify_signature(parsed, key),
        }
    }

    /// Drops every cached verification (e.g. on reconfiguration).
    pub fn clear_cache(&mut self) {
        if let Some(c) = self.cache.as_mut() {
            c.clear();
        }
    }
}

/// `Some(valid)` when the host could judge the signature, `None` to fall back.
fn host_signature_check(host: &HostVerify, parsed: &jws::Parsed<'_>, key: &TrustedKey) -> Option<bool> {
    let spki = key.spki.as_deref()?;
    let hash = match (&key.key, parsed.alg) {
        (VerifyingKey::P256(_), Alg::ES256) => "sha256",
        (VerifyingKey::P384(_), Alg::ES384) => "sha384",
        (VerifyingKey::Rsa(_), Alg::RS256) => "sha256",
        (VerifyingKey::Rsa(_), Alg::RS384) => "sha384",
        (VerifyingKey::Rsa(_), Alg::RS512) => "sha512",
        // PSS padding and other curves stay with the pure-Rust verifier.
        _ => return None,
    };
    let (signing_input, sig_b64) = parsed.token.rsplit_once('.')?;
    let raw = base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, sig_b64).ok();
    let Some(raw) = raw else { return Some(false) };
    let scalar_len = match parsed.alg {
        Alg::ES256 => Some(32),
        Alg::ES384 => Some(48),
        _ => None,
    };
    let signature = match scalar_len {
        Some(n) => match host_crypto::ecdsa_sig_der(&raw, n) {
            Some(d) => d,
            None => return Some(false),
        },
        None => raw,
    };
    let answer = host(&host_crypto::request(hash, spki, &signature, signing_input.as_bytes()))?;
    Some(host_crypto::answer_is_valid(&answer))
}

/// The module's own signature check (pure Rust): the signature over the JWS signing input,
/// nothing else. Every claim (time, audience, subject, type) is checked by the caller, as on the
/// host's path.
#[inline(never)]
pub(crate) fn verify_signature(parsed: &jws::Parsed<'_>, key: &TrustedKey) -> Result<(), Reason> {
    let bad = Reason::SignatureInvalid;
    let (input, sig_b64) = parsed.token.rsplit_once('.').ok_or(bad)?;
    let sig = base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, sig_b64).map_err(|_| bad)?;
    let input = input.as_bytes();
    let ok = match (&key.key, parsed.alg) {
        (VerifyingKey::P256(k), Alg::ES256) => {
            use p256::ecdsa::signature::Verifier as _;
            p256::ecdsa::Signature::from_slice(&sig).is_ok_and(|s| k.verify(input, &s).is_ok())
        }
        #[cfg(feature = "es384")]
        (VerifyingKey::P384(k), Alg::ES384) => {
            use p384::ecdsa::signature::Verifier as _;
            p384::ecdsa::Signature::from_slice(&sig).is_ok_and(|s| k.rust.verify(input, &s).is_ok())
        }
        (VerifyingKey::Rsa(k), alg) => rsa_signature_ok(k, alg, input, &sig),
        // No pure-Rust P-384 in this build (only the host's crypto checks it), and a key never
        // checks another family's algorithm: fail closed.
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(bad)
    }
}

/// RS* (PKCS #1 v1.5) and PS* (PSS, salt as long as the hash, RFC 7518 §3.5).
fn rsa_signature_ok(k: &rsa::RsaPublicKey, alg: Alg, input: &[u8], sig: &[u8]) -> bool {
    use rsa::{Pkcs1v15Sign, Pss};
    use sha2::{Digest as _, Sha256, Sha384, Sha512};
    let verdict = match alg {
        Alg::RS256 => k.verify(Pkcs1v15Sign::new::<Sha256>(), &Sha256::digest(input), sig),
        Alg::RS384 => k.verify(Pkcs1v15Sign::new::<Sha384>(), &Sha384::digest(input), sig),
        Alg::RS512 => k.verify(Pkcs1v15Sign::new::<Sha512>(), &Sha512::digest(input), sig),
        Alg::PS256 => k.verify(Pss::new::<Sha256>(), &Sha256::digest(input), sig),
        Alg::PS384 => k.verify(Pss::new::<Sha384>(), &Sha384::digest(input), sig),
        Alg::PS512 => k.verify(Pss::new::<Sha512>(), &Sha512::digest(input), sig),
        _ => return false,
    };
    verdict.is_ok()
}

/// Checks an OIDC → SPIFFE template at configuration time.
pub fn check_template(t: &str) -> Result<(), String> {
    let sample = render_template(t, "a:b:c:d:e:f:g:h").ok_or("unbalanced braces or unknown placeholder")?;
    SpiffeId::parse(&sample).map_err(|e| format!("does not produce a valid SPIFFE ID ({e:?})"))?;
    Ok(())
}

/// Renders `{sub}` and `{sub:N}` placeholders. A subject part containing `/`
/// could add path segments, so it is refused.
fn render_template(t: &str, sub: &str) -> Option<String> {
    let mut out = String::with_capacity(t.len() + sub.len());
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        out.push_str(rest.get(..open)?);
        let after = rest.get(open + 1..)?;
        let close = after.find('}')?;
        let name = after.get(..close)?;
        let value = if name == "sub" {
            sub
        } else {
            let n: usize = name.strip_prefix("sub:")?.parse().ok()?;
            sub.split(':').nth(n)?
        };
        if value.is_empty() || value.contains('/') {
            return None;
        }
        out.push_str(value);
        rest = after.get(close + 1..)?;
    }
    if rest.contains('}') {
        return None;
    }
    out.push_str(rest);
    Some(out)
}

#[cfg(test)]
mod tests;
