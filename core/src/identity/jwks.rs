//! Trust bundles: SPIFFE bundles (JWKS with `use: "jwt-svid"` keys) and plain
//! JWKS (as SPIRE's Workload API and OIDC issuers publish them).
//!
//! Keys are decoded into verification-ready key objects once, when the bundle
//! loads, so the request path never parses key material.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// Largest bundle document accepted (fetched or inline).
pub const MAX_BUNDLE_BYTES: usize = 512 * 1024;
/// Smallest RSA modulus accepted (bits).
pub const MIN_RSA_BITS: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alg {
    RS256,
    RS384,
    RS512,
    ES256,
    ES384,
    ES512,
    PS256,
    PS384,
    PS512,
}

impl Alg {
    /// Only the asymmetric algorithms the JWT-SVID spec allows. `none`, HS*,
    /// EdDSA and anything else yield `None`.
    pub fn parse(s: &str) -> Option<Alg> {
        Some(match s {
            "RS256" => Alg::RS256,
            "RS384" => Alg::RS384,
            "RS512" => Alg::RS512,
            "ES256" => Alg::ES256,
            "ES384" => Alg::ES384,
            "ES512" => Alg::ES512,
            "PS256" => Alg::PS256,
            "PS384" => Alg::PS384,
            "PS512" => Alg::PS512,
            _ => return None,
        })
    }
}

/// A public key ready to verify tokens: the module's own (pure-Rust, RustCrypto) verifiers,
/// the fallback when the host's crypto is not there.
#[derive(Clone)]
pub enum VerifyingKey {
    P256(p256::ecdsa::VerifyingKey),
    /// P-384 (SPIRE's `jwt_key_type: ec-p384`): checked by the host's crypto. The pure-Rust
    /// verifier costs ~100 KB of wasm and is built only with the `es384` feature.
    P384(P384Key),
    Rsa(Box<rsa::RsaPublicKey>),
}

/// A P-384 key. Its DER form (in [`TrustedKey::spki`]) is what the host verifies with.
#[derive(Clone)]
pub struct P384Key {
    #[cfg(feature = "es384")]
    pub rust: p384::ecdsa::VerifyingKey,
}

#[derive(Clone)]
pub struct TrustedKey {
    pub kid: String,
    /// If the JWK pins an algorithm, tokens must use exactly that one.
    pub alg: Option<Alg>,
    pub key: VerifyingKey,
    /// DER SubjectPublicKeyInfo, precomputed for host-side verification (P-256 and RSA).
    pub spki: Option<Vec<u8>>,
}

impl TrustedKey {
    pub fn accepts(&self, alg: Alg) -> bool {
        if self.alg.is_some_and(|pinned| pinned != alg) {
            return false;
        }
        matches!(
            (&self.key, alg),
            (VerifyingKey::P256(_), Alg::ES256)
                | (VerifyingKey::P384(_), Alg::ES384)
                | (
                    VerifyingKey::Rsa(_),
                    Alg::RS256 | Alg::RS384 | Alg::RS512 | Alg::PS256 | Alg::PS384 | Alg::PS512
                )
        )
    }
}

impl std::fmt::Debug for TrustedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.key {
            VerifyingKey::P256(_) => "P-256",
            VerifyingKey::P384(_) => "P-384",
            VerifyingKey::Rsa(_) => "RSA",
        };
        write!(f, "TrustedKey({}, {kind})", self.kid)
    }
}

/// A parsed bundle: the JWT signing keys of one trust domain or issuer.
#[derive(Debug, Clone)]
pub struct Bundle {
    keys: HashMap<String, TrustedKey>,
    pub sequence: Option<u64>,
    /// Seconds, from `spiffe_refresh_hint`.
    pub refresh_hint: Option<u64>,
    /// Digest of the accepted key material: a change invalidates cached verifications.
    pub digest: [u8; 32],
    /// Keys skipped because mandate cannot use them (e.g. P-521), for logging.
    pub skipped: Vec<String>,
}

impl Bundle {
    pub fn key(&self, kid: &str) -> Option<&TrustedKey> {
        self.keys.get(kid)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleError {
    TooLarge,
    Json(String),
    DuplicateKid(String),
    BadKey { kid: String, why: String },
}

impl std::fmt::Display for BundleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BundleError::TooLarge => write!(f, "bundle larger than {MAX_BUNDLE_BYTES} bytes"),
            BundleError::Json(e) => write!(f, "bundle is not a valid JWKS: {e}"),
            BundleError::DuplicateKid(k) => write!(f, "bundle has two keys with kid `{k}`"),
            BundleError::BadKey { kid, why } => write!(f, "key `{kid}`: {why}"),
        }
    }
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<RawJwk>,
    #[serde(default)]
    spiffe_sequence: Option<u64>,
    #[serde(default)]
    spiffe_refresh_hint: Option<u64>,
}

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    d: Option<serde_json::Value>,
}

/// Parses a SPIFFE bundle or a plain JWKS.
pub fn parse_bundle(raw: &[u8]) -> Result<Bundle, BundleError> {
    if raw.len() > MAX_BUNDLE_BYTES {
        return Err(BundleError::TooLarge);
    }
    let jwks: RawJwks = serde_json::from_slice(raw).map_err(|e| BundleError::Json(e.to_string()))?;
    let mut keys = HashMap::new();
    let mut skipped = Vec::new();
    let mut hasher = Sha256::new();
    for jwk in jwks.keys {
        // SPIFFE bundles mix X.509 roots and JWT keys; only `jwt-svid` keys
        // verify JWTs. A plain JWKS has no `use`, or `sig`.
        match jwk.use_.as_deref() {
            None | Some("jwt-svid") | Some("sig") => {}
            Some(_) => continue,
        }
        let kid = match jwk.kid.as_deref() {
            Some(k) if !k.is_empty() => k.to_string(),
            // Tokens must name their key; a key without a kid can never be selected.
            _ => {
                skipped.push("(no kid)".to_string());
                continue;
            }
        };
        if jwk.d.is_some() {
            return Err(BundleError::BadKey { kid, why: "private key material in a trust bundle".into() });
        }
        let alg = match jwk.alg.as_deref() {
            None => None,
            Some(a) => match Alg::parse(a) {
                Some(alg) => Some(alg),
                None => {
                    skipped.push(kid);
                    continue;
                }
            },
        };
        let key = match decode_key(&jwk) {
            Ok(Some(key)) => key,
            Ok(None) => {
                skipped.push(kid);
                continue;
            }
            Err(why) => return Err(BundleError::BadKey { kid, why }),
        };
        hasher.update((kid.len() as u32).to_le_bytes());
        hasher.update(kid.as_bytes());
        hasher.update(key_fingerprint(&jwk).as_bytes());
        let spki = spki_of(&jwk, &key);
        if keys.insert(kid.clone(), TrustedKey { kid: kid.clone(), alg, key, spki }).is_some() {
            return Err(BundleError::DuplicateKid(kid));
        }
    }
    Ok(Bundle {
        keys,
        sequence: jwks.spiffe_sequence,
        refresh_hint: jwks.spiffe_refresh_hint,
        digest: hasher.finalize().into(),
        skipped,
    })
}

fn spki_of(jwk: &RawJwk, key: &VerifyingKey) -> Option<Vec<u8>> {
    use super::host_crypto::{spki_p256, spki_p384, spki_rsa};
    let d = |v: &Option<String>| v.as_deref().and_then(|s| URL_SAFE_NO_PAD.decode(s).ok());
    match key {
        VerifyingKey::P256(_) => Some(spki_p256(&d(&jwk.x)?, &d(&jwk.y)?)),
        VerifyingKey::P384(_) => Some(spki_p384(&d(&jwk.x)?, &d(&jwk.y)?)),
        VerifyingKey::Rsa(_) => Some(spki_rsa(&d(&jwk.n)?, &d(&jwk.e)?)),
    }
}

fn key_fingerprint(jwk: &RawJwk) -> String {
    format!(
        "{}|{}|{}|{}|{}|{}|{}",
        jwk.kty,
        jwk.alg.as_deref().unwrap_or(""),
        jwk.crv.as_deref().unwrap_or(""),
        jwk.x.as_deref().unwrap_or(""),
        jwk.y.as_deref().unwrap_or(""),
        jwk.n.as_deref().unwrap_or(""),
        jwk.e.as_deref().unwrap_or("")
    )
}

fn b64(field: &str, v: Option<&str>) -> Result<Vec<u8>, String> {
    let v = v.ok_or_else(|| format!("missing `{field}`"))?;
    URL_SAFE_NO_PAD.decode(v).map_err(|_| format!("`{field}` is not base64url"))
}

/// `Ok(None)` for well-formed keys mandate does not support (they are skipped).
fn decode_key(jwk: &RawJwk) -> Result<Option<VerifyingKey>, String> {
    match jwk.kty.as_str() {
        "EC" => {
            let x = b64("x", jwk.x.as_deref())?;
            let y = b64("y", jwk.y.as_deref())?;
            let (len, crv) = match jwk.crv.as_deref() {
                Some("P-256") => (32, 256),
                Some("P-384") => (48, 384),
                // P-521 (ES512) has no verifier in our crypto stack: skip, never accept.
                Some("P-521") => return Ok(None),
                other => return Err(format!("unsupported curve {other:?}")),
            };
            if x.len() != len || y.len() != len {
                return Err("coordinate length does not match the curve".into());
            }
            let mut sec1 = Vec::with_capacity(1 + 2 * len);
            sec1.push(0x04);
            sec1.extend_from_slice(&x);
            sec1.extend_from_slice(&y);
            if crv == 256 {
                let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1).map_err(|_| "not a P-256 point".to_string())?;
                return Ok(Some(VerifyingKey::P256(key)));
            }
            #[cfg(feature = "es384")]
            return Ok(Some(VerifyingKey::P384(P384Key {
                rust: p384::ecdsa::VerifyingKey::from_sec1_bytes(&sec1).map_err(|_| "not a P-384 point".to_string())?,
            })));
            // Without the pure-Rust verifier the point is not checked here: the host's crypto
            // refuses a key that is not on the curve, so its tokens are refused, never accepted.
            #[cfg(not(feature = "es384"))]
            Ok(Some(VerifyingKey::P384(P384Key {})))
        }
        "RSA" => {
            let n = b64("n", jwk.n.as_deref())?;
            let e = b64("e", jwk.e.as_deref())?;
            let n_trimmed: &[u8] = match n.iter().position(|b| *b != 0) {
                Some(i) => n.get(i..).unwrap_or(&[]),
                None => &[],
            };
            let bits = n_trimmed.len() * 8;
            if bits < MIN_RSA_BITS {
                return Err(format!("RSA modulus of {bits} bits is below {MIN_RSA_BITS}"));
            }
            let key = rsa::RsaPublicKey::new(rsa::BigUint::from_bytes_be(&n), rsa::BigUint::from_bytes_be(&e))
                .map_err(|_| "invalid RSA components".to_string())?;
            Ok(Some(VerifyingKey::Rsa(Box::new(key))))
        }
        // Symmetric (`oct`) keys have no place in a trust bundle; OKP (EdDSA) is not allowed by the spec.
        "oct" => Err("symmetric key in a trust bundle".into()),
        _ => Ok(None),
    }
}
