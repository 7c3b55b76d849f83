//! Test helpers: keys, bundles and hand-built JWTs (feature `testkit`).
//!
//! Tokens are assembled by hand so tests can craft any header or claims,
//! including malformed ones, and sign them with a real key.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rsa::pkcs8::DecodePrivateKey;
use rsa::signature::{RandomizedSigner, SignatureEncoding, Signer};
use rsa::traits::PublicKeyParts;
use serde_json::{json, Value};

const RSA1: &str = include_str!("../testdata/rsa1.pem");
const RSA2: &str = include_str!("../testdata/rsa2.pem");
const RSA_WEAK: &str = include_str!("../testdata/rsa_weak_1024.pem");

enum Inner {
    P256(p256::ecdsa::SigningKey),
    P384(p384::ecdsa::SigningKey),
    Rsa(Box<rsa::RsaPrivateKey>),
}

pub struct TestKey {
    pub kid: String,
    inner: Inner,
}

pub fn b64(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

impl TestKey {
    pub fn es256(kid: &str) -> TestKey {
        TestKey { kid: kid.into(), inner: Inner::P256(p256::ecdsa::SigningKey::random(&mut rand_core::OsRng)) }
    }
    pub fn es384(kid: &str) -> TestKey {
        TestKey { kid: kid.into(), inner: Inner::P384(p384::ecdsa::SigningKey::random(&mut rand_core::OsRng)) }
    }
    /// One of the fixture RSA keys (0 or 1), or the weak 1024-bit one (99).
    pub fn rsa(kid: &str, which: u8) -> TestKey {
        let pem = match which {
            0 => RSA1,
            1 => RSA2,
            _ => RSA_WEAK,
        };
        TestKey { kid: kid.into(), inner: Inner::Rsa(Box::new(rsa::RsaPrivateKey::from_pkcs8_pem(pem).unwrap())) }
    }

    /// The public JWK (no `use`).
    pub fn jwk(&self) -> Value {
        match &self.inner {
            Inner::P256(k) => {
                let p = k.verifying_key().to_encoded_point(false);
                json!({"kty": "EC", "crv": "P-256", "kid": self.kid, "x": b64(p.x().unwrap()), "y": b64(p.y().unwrap())})
            }
            Inner::P384(k) => {
                let p = k.verifying_key().to_encoded_point(false);
                json!({"kty": "EC", "crv": "P-384", "kid": self.kid, "x": b64(p.x().unwrap()), "y": b64(p.y().unwrap())})
            }
            Inner::Rsa(k) => json!({"kty": "RSA", "kid": self.kid, "n": b64(&k.n().to_bytes_be()), "e": b64(&k.e().to_bytes_be())}),
        }
    }

    /// The JWK as a SPIFFE bundle entry.
    pub fn svid_jwk(&self) -> Value {
        let mut j = self.jwk();
        j["use"] = json!("jwt-svid");
        j
    }

    /// Signs `header.claims` (raw JSON strings) with the algorithm's hash and padding.
    pub fn sign_raw(&self, alg: &str, header_json: &str, claims_json: &str) -> String {
        let input = format!("{}.{}", b64(header_json.as_bytes()), b64(claims_json.as_bytes()));
        let sig = self.signature(alg, input.as_bytes());
        format!("{input}.{}", b64(&sig))
    }

    pub fn signature(&self, alg: &str, msg: &[u8]) -> Vec<u8> {
        use rsa::{pkcs1v15, pss};
        use sha2::{Sha256, Sha384, Sha512};
        let mut rng = rand_core::OsRng;
        match (&self.inner, alg) {
            (Inner::P256(k), _) => {
                let s: p256::ecdsa::Signature = k.sign(msg);
                s.to_bytes().to_vec()
            }
            (Inner::P384(k), _) => {
                let s: p384::ecdsa::Signature = k.sign(msg);
                s.to_bytes().to_vec()
            }
            (Inner::Rsa(k), "RS384") => pkcs1v15::SigningKey::<Sha384>::new((**k).clone()).sign(msg).to_vec(),
            (Inner::Rsa(k), "RS512") => pkcs1v15::SigningKey::<Sha512>::new((**k).clone()).sign(msg).to_vec(),
            (Inner::Rsa(k), "PS256") => pss::SigningKey::<Sha256>::new((**k).clone()).sign_with_rng(&mut rng, msg).to_vec(),
            (Inner::Rsa(k), "PS384") => pss::SigningKey::<Sha384>::new((**k).clone()).sign_with_rng(&mut rng, msg).to_vec(),
            (Inner::Rsa(k), "PS512") => pss::SigningKey::<Sha512>::new((**k).clone()).sign_with_rng(&mut rng, msg).to_vec(),
            (Inner::Rsa(k), _) => pkcs1v15::SigningKey::<Sha256>::new((**k).clone()).sign(msg).to_vec(),
        }
    }

    /// The natural algorithm for this key.
    pub fn alg(&self) -> &'static str {
        match self.inner {
            Inner::P256(_) => "ES256",
            Inner::P384(_) => "ES384",
            Inner::Rsa(_) => "RS256",
        }
    }

    /// Signs claims with a standard header (`alg`, `kid`, `typ: JWT`).
    pub fn sign(&self, claims: &Value) -> String {
        let header = json!({"alg": self.alg(), "kid": self.kid, "typ": "JWT"});
        self.sign_raw(self.alg(), &header.to_string(), &claims.to_string())
    }

    /// Signs a signed intent token: standard header with `typ: intent+jwt`.
    pub fn sign_intent(&self, claims: &Value) -> String {
        let header = json!({"alg": self.alg(), "kid": self.kid, "typ": "intent+jwt"});
        self.sign_raw(self.alg(), &header.to_string(), &claims.to_string())
    }

    pub fn sign_with_header(&self, alg: &str, header: &Value, claims: &Value) -> String {
        self.sign_raw(alg, &header.to_string(), &claims.to_string())
    }
}

/// A SPIFFE bundle document with these keys.
pub fn spiffe_bundle(keys: &[&TestKey], refresh_hint: Option<u64>) -> Value {
    let mut b = json!({"keys": keys.iter().map(|k| k.svid_jwk()).collect::<Vec<_>>(), "spiffe_sequence": 1});
    if let Some(h) = refresh_hint {
        b["spiffe_refresh_hint"] = json!(h);
    }
    b
}

/// A plain JWKS with these keys.
pub fn plain_jwks(keys: &[&TestKey]) -> Value {
    json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()})
}

/// Standard SVID claims.
pub fn svid_claims(sub: &str, aud: &str, iat: u64, exp: u64) -> Value {
    json!({"sub": sub, "aud": aud, "iat": iat, "exp": exp})
}
