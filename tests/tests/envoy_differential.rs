//! Issue 14 item 6: a differential check of mandate's identity verification against Envoy's
//! stock `jwt_authn`.
//!
//! One Envoy, two listeners, the same keys, audience and clock skew:
//!
//! ```text
//!   test ──Bearer <token>──▶ listener `mandate`: mandate (identity only, any verified caller) ──▶ echo
//!        ──Bearer <token>──▶ listener `jwt_authn`: envoy.filters.http.jwt_authn ──▶ direct 200
//! ```
//!
//! A seeded generator builds a corpus of more than 500 tokens in families (valid, expired,
//! wrong key, kid games, alg swaps, audiences, subjects, mutated bytes, padding, sizes, …).
//! Every token goes to both listeners over keep-alive connections and the verdicts (accepted:
//! the request got through; denied: anything else) are compared.
//!
//! They must agree, except in the named exception classes below, each of which the generator
//! attaches to the cases that exercise it: a disagreement counts as explained only when the case
//! carries that class, the direction is the class's direction (mandate stricter, or for one
//! framing class, mandate more lenient) and mandate's denial names one of the class's reasons.
//! Anything else fails the test, as does an anchor case (a plainly valid token, or a plain
//! attack: wrong key, expired, `alg: none`, …) that either side judges the wrong way.
//! `docs/reliability.md` lists and justifies each class.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::alphabet::URL_SAFE;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE_NO_PAD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use mandate_e2e::testkit::TestKey;
use mandate_e2e::{open_policy, prerequisites, unix_now, yaml_quote, Envoy, MockServer, Vars};
use p256::ecdsa::signature::hazmat::PrehashSigner;
use p256::ecdsa::signature::Signer as _;
use serde_json::{json, Value};
use sha2::{Digest, Sha256, Sha384};

/// The accepted audience, on both sides.
const AUD: &str = "spiffe://example.org/gateway";
/// Clock skew, on both sides (mandate's `clock_skew_s`, jwt_authn's `clock_skew_seconds`).
const SKEW: u64 = 30;
/// mandate's `max_token_bytes` (its default).
const MAX_TOKEN_BYTES: usize = 8192;
/// The corpus seed: the same seed gives the same families, cases and mutations.
const SEED: u64 = 0x6d61_6e64_6174_6514;
/// Random mutations of valid tokens.
const MUTATIONS: usize = 300;

// ---------------------------------------------------------------------------------------------
// Exception classes
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    KidRequired,
    SpiffeSubject,
    TrustDomainKeys,
    SvidTyp,
    CritRefused,
    IatInFuture,
    AlgMatchesKey,
    ExactAudience,
    CompactSerialization,
    StrictJson,
    IntegerNumericDate,
    HeaderParamType,
    TokenSize,
    SchemeCaseInsensitive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// jwt_authn accepts, mandate denies with one of the class's reasons.
    MandateStricter,
    /// mandate accepts, jwt_authn denies.
    MandateLenient,
}

impl Class {
    fn name(self) -> &'static str {
        match self {
            Class::KidRequired => "SPIFFE stricter: kid required",
            Class::SpiffeSubject => "SPIFFE stricter: sub must be a valid SPIFFE ID",
            Class::TrustDomainKeys => "SPIFFE stricter: keys never cross trust domains",
            Class::SvidTyp => "SPIFFE stricter: typ absent, JWT or JOSE",
            Class::CritRefused => "stricter: crit is never understood (RFC 7515)",
            Class::IatInFuture => "stricter: iat in the future",
            Class::AlgMatchesKey => "stricter: alg must be the key's algorithm",
            Class::ExactAudience => "SPIFFE stricter: aud compared exactly",
            Class::CompactSerialization => "stricter: strict JWS compact serialization",
            Class::StrictJson => "stricter: RFC 8259 JSON, nesting <= 64",
            Class::IntegerNumericDate => "stricter: NumericDate integer <= 2^53-1",
            Class::HeaderParamType => "stricter: typed JOSE header parameters",
            Class::TokenSize => "stricter: max_token_bytes (8192)",
            Class::SchemeCaseInsensitive => "lenient: auth scheme is case-insensitive (RFC 7235)",
        }
    }

    fn direction(self) -> Direction {
        match self {
            Class::SchemeCaseInsensitive => Direction::MandateLenient,
            _ => Direction::MandateStricter,
        }
    }

    /// mandate's denial reasons that show the class's rule at work.
    fn reasons(self) -> &'static [&'static str] {
        match self {
            Class::KidRequired => &["kid_missing"],
            Class::SpiffeSubject => &["subject_missing", "spiffe_id_invalid"],
            Class::TrustDomainKeys => &["trust_domain_unknown", "kid_unknown"],
            Class::SvidTyp => &["typ_not_allowed"],
            Class::CritRefused => &["crit_not_allowed"],
            Class::IatInFuture => &["issued_in_future"],
            Class::AlgMatchesKey => &["signature_invalid", "alg_not_allowed"],
            Class::ExactAudience => &["audience_mismatch"],
            // Non-canonical trailing bits in the signature surface when it is decoded for checking.
            Class::CompactSerialization => &["token_malformed", "signature_invalid"],
            Class::StrictJson => &["token_malformed"],
            Class::IntegerNumericDate => &["token_malformed"],
            Class::HeaderParamType => &["token_malformed"],
            Class::TokenSize => &["token_malformed"],
            Class::SchemeCaseInsensitive => &[],
        }
    }

    const ALL: [Class; 14] = [
        Class::KidRequired,
        Class::SpiffeSubject,
        Class::TrustDomainKeys,
        Class::SvidTyp,
        Class::ExactAudience,
        Class::CritRefused,
        Class::IatInFuture,
        Class::AlgMatchesKey,
        Class::CompactSerialization,
        Class::StrictJson,
        Class::IntegerNumericDate,
        Class::HeaderParamType,
        Class::TokenSize,
        Class::SchemeCaseInsensitive,
    ];
}

// ---------------------------------------------------------------------------------------------
// Corpus
// ---------------------------------------------------------------------------------------------

/// What both sides must do with an anchor case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Anchor {
    /// A plainly valid token: both accept.
    Accept,
    /// A plain attack or plainly bad token: both deny.
    Deny,
}

/// A generated case before it is pushed: name, bytes (a token part or a header value), class, anchor.
type RawCase = (&'static str, Vec<u8>, Option<Class>, Option<Anchor>);

struct Case {
    family: &'static str,
    name: String,
    /// The whole `authorization` header value.
    auth: Vec<u8>,
    /// The exception class this case exercises, if it may legitimately disagree.
    class: Option<Class>,
    anchor: Option<Anchor>,
}

/// SplitMix64: small, seeded, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

enum Signer {
    P256(p256::ecdsa::SigningKey),
    P384(p384::ecdsa::SigningKey),
    Rsa(Box<TestKey>),
}

/// A signing key with a deterministic secret (derived from a label) and its kid.
struct Key {
    kid: String,
    signer: Signer,
}

fn b64(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

fn seeded_scalar(label: &str, len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0u8;
    while out.len() < len {
        out.extend_from_slice(&Sha256::digest(format!("mandate-differential/{SEED}/{label}/{i}").as_bytes()));
        i += 1;
    }
    out.truncate(len);
    out[0] &= 0x7f; // below the group order
    out
}

impl Key {
    fn p256(kid: &str) -> Key {
        let k = p256::ecdsa::SigningKey::from_slice(&seeded_scalar(kid, 32)).expect("P-256 scalar");
        Key { kid: kid.into(), signer: Signer::P256(k) }
    }
    fn p384(kid: &str) -> Key {
        let k = p384::ecdsa::SigningKey::from_slice(&seeded_scalar(kid, 48)).expect("P-384 scalar");
        Key { kid: kid.into(), signer: Signer::P384(k) }
    }
    /// One of the fixture RSA keys (2048 bits).
    fn rsa(kid: &str, which: u8) -> Key {
        Key { kid: kid.into(), signer: Signer::Rsa(Box::new(TestKey::rsa(kid, which))) }
    }

    /// The public key as a SPIFFE bundle entry (`use: jwt-svid`).
    fn jwk(&self) -> Value {
        let mut j = match &self.signer {
            Signer::P256(k) => {
                let p = k.verifying_key().to_encoded_point(false);
                json!({"kty": "EC", "crv": "P-256", "x": b64(p.x().unwrap()), "y": b64(p.y().unwrap())})
            }
            Signer::P384(k) => {
                let p = k.verifying_key().to_encoded_point(false);
                json!({"kty": "EC", "crv": "P-384", "x": b64(p.x().unwrap()), "y": b64(p.y().unwrap())})
            }
            Signer::Rsa(k) => k.jwk(),
        };
        j["kid"] = json!(self.kid);
        j["use"] = json!("jwt-svid");
        j
    }

    /// The key's natural algorithm.
    fn alg(&self) -> &'static str {
        match self.signer {
            Signer::P256(_) => "ES256",
            Signer::P384(_) => "ES384",
            Signer::Rsa(_) => "RS256",
        }
    }

    /// Signs `input` as `alg` would (RSA: that padding and hash; EC: the key's own curve hash).
    fn sign(&self, alg: &str, input: &[u8]) -> Vec<u8> {
        match &self.signer {
            Signer::P256(k) => {
                let s: p256::ecdsa::Signature = k.sign(input);
                s.to_bytes().to_vec()
            }
            Signer::P384(k) => {
                let s: p384::ecdsa::Signature = k.sign(input);
                s.to_bytes().to_vec()
            }
            Signer::Rsa(k) => k.signature(alg, input),
        }
    }

    /// P-256 signature over SHA-384 of `input` (what an `ES384` header on a P-256 key means to a
    /// verifier that only looks at the hash).
    fn sign_p256_sha384(&self, input: &[u8]) -> Vec<u8> {
        let Signer::P256(k) = &self.signer else { panic!("not a P-256 key") };
        let s: p256::ecdsa::Signature = k.sign_prehash(Sha384::digest(input).as_ref()).expect("prehash signature");
        s.to_bytes().to_vec()
    }
}

/// `header.claims.signature` with the signature made by `key` as `alg`.
fn jws(key: &Key, alg: &str, header: &str, claims: &str) -> String {
    let input = format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()));
    let sig = key.sign(alg, input.as_bytes());
    format!("{input}.{}", b64(&sig))
}

/// HMAC-SHA-256, for `HS256` tokens keyed with public key material.
fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut k = if key.len() > 64 { Sha256::digest(key).to_vec() } else { key.to_vec() };
    k.resize(64, 0);
    let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    let inner = Sha256::digest([ipad.as_slice(), msg].concat());
    Sha256::digest([opad.as_slice(), &inner[..]].concat()).to_vec()
}

/// P-256 group order.
const P256_N: [u8; 32] = [
    0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xBC, 0xE6, 0xFA,
    0xAD, 0xA7, 0x17, 0x9E, 0x84, 0xF3, 0xB9, 0xCA, 0xC2, 0xFC, 0x63, 0x25, 0x51,
];

/// `(r, n - s)`: the other valid ECDSA signature of the same message (malleability).
fn high_s(sig: &[u8]) -> Vec<u8> {
    let (r, s) = sig.split_at(32);
    let mut out = r.to_vec();
    let mut diff = [0u8; 32];
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let mut d = i16::from(P256_N[i]) - i16::from(s[i]) - borrow;
        borrow = i16::from(d < 0);
        if d < 0 {
            d += 256;
        }
        diff[i] = d as u8;
    }
    out.extend_from_slice(&diff);
    out
}

/// The raw `r || s` signature as DER, which JWS does not use (RFC 7518 §3.4).
fn der_signature(sig: &[u8]) -> Vec<u8> {
    fn int(v: &[u8]) -> Vec<u8> {
        let start = v.iter().position(|b| *b != 0).unwrap_or(v.len() - 1);
        let mut body = v[start..].to_vec();
        if body[0] & 0x80 != 0 {
            body.insert(0, 0);
        }
        let mut out = vec![0x02, body.len() as u8];
        out.extend_from_slice(&body);
        out
    }
    let (r, s) = sig.split_at(sig.len() / 2);
    let ints = [int(r), int(s)].concat();
    let mut out = vec![0x30, ints.len() as u8];
    out.extend_from_slice(&ints);
    out
}

/// A base64url decoder that ignores padding and non-zero trailing bits: what a lax decoder sees.
fn lax_decode(s: &str) -> Option<Vec<u8>> {
    let lax = GeneralPurpose::new(
        &URL_SAFE,
        GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true).with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    lax.decode(s).ok()
}

/// True when a lax reader sees exactly `original` in `mutated`: the same bytes in three segments
/// once whitespace is dropped, empty segments are skipped and base64url is decoded ignoring
/// padding and unused trailing bits. Such a change must not be accepted as another token, but a
/// lax reader verifies it as the original.
fn lax_reader_sees_original(mutated: &str, original: &str) -> bool {
    let cleaned: String = mutated.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let m: Vec<&str> = cleaned.split('.').filter(|s| !s.is_empty()).collect();
    let o: Vec<&str> = original.split('.').collect();
    mutated != original
        && m.len() == 3
        && o.len() == 3
        && m.iter().zip(&o).all(|(a, b)| lax_decode(a).is_some() && lax_decode(a) == lax_decode(b))
}

struct Gen {
    now: u64,
    rng: Rng,
    /// example.org: P-256 `k1`, RSA `r1`, P-384 `p384`.
    k1: Key,
    r1: Key,
    e384: Key,
    /// other.org: P-256 `o1`.
    o1: Key,
    /// In no bundle.
    evil: Key,
    evil_rsa: Key,
    cases: Vec<Case>,
}

const PATHS: [&str; 8] =
    ["/ns/prod/sa/web", "/agent/support", "/ns/billing/sa/worker", "/a", "/x/y/z", "/svc-1.2_3", "/ns/default/sa/default", "/AGENT/Upper"];

impl Gen {
    fn new(now: u64) -> Gen {
        Gen {
            now,
            rng: Rng(SEED),
            k1: Key::p256("k1"),
            r1: Key::rsa("r1", 0),
            e384: Key::p384("p384"),
            o1: Key::p256("o1"),
            evil: Key::p256("evil"),
            evil_rsa: Key::rsa("r1", 1),
            cases: Vec::new(),
        }
    }

    fn sub(&mut self) -> String {
        format!("spiffe://example.org{}", self.rng.pick(&PATHS))
    }

    /// Standard claims for `sub`, valid for five minutes.
    fn claims(&self, sub: &str) -> Value {
        json!({"sub": sub, "aud": AUD, "iat": self.now - 5, "exp": self.now + 300})
    }

    fn header(key: &Key, alg: &str) -> Value {
        json!({"alg": alg, "kid": key.kid, "typ": "JWT"})
    }

    /// A standard token from `key` with `claims`.
    fn token(&self, key: &Key, claims: &Value) -> String {
        jws(key, key.alg(), &Self::header(key, key.alg()).to_string(), &claims.to_string())
    }

    fn push(&mut self, family: &'static str, name: impl Into<String>, token: &str, class: Option<Class>, anchor: Option<Anchor>) {
        let auth = format!("Bearer {token}").into_bytes();
        self.push_auth(family, name, auth, class, anchor);
    }

    fn push_auth(&mut self, family: &'static str, name: impl Into<String>, auth: Vec<u8>, class: Option<Class>, anchor: Option<Anchor>) {
        self.cases.push(Case { family, name: name.into(), auth, class, anchor });
    }

    fn valid(&mut self) {
        let f = "valid";
        for i in 0..24 {
            let sub = self.sub();
            let mut c = self.claims(&sub);
            match i % 6 {
                1 => c["aud"] = json!([AUD]),
                2 => c["aud"] = json!(["spiffe://example.org/other", AUD, "https://x.test"]),
                3 => c["jti"] = json!(format!("jti-{i}")),
                4 => c["nbf"] = json!(self.now - 60),
                5 => c["iss"] = json!("https://issuer.example.org"),
                _ => {}
            }
            let header = match i % 4 {
                1 => json!({"alg": "ES256", "kid": "k1"}),
                2 => json!({"alg": "ES256", "kid": "k1", "typ": "JOSE"}),
                3 => json!({"alg": "ES256", "kid": "k1", "typ": "JWT", "x-extra": {"a": [1, 2]}}),
                _ => Self::header(&self.k1, "ES256"),
            };
            let t = jws(&self.k1, "ES256", &header.to_string(), &c.to_string());
            self.push(f, format!("es256-{i}"), &t, None, Some(Anchor::Accept));
        }
        for alg in ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"] {
            for i in 0..3 {
                let sub = self.sub();
                let c = self.claims(&sub);
                let t = jws(&self.r1, alg, &Self::header(&self.r1, alg).to_string(), &c.to_string());
                self.push(f, format!("{alg}-{i}"), &t, None, Some(Anchor::Accept));
            }
        }
        for i in 0..6 {
            let sub = format!("spiffe://other.org{}", self.rng.pick(&PATHS));
            let c = self.claims(&sub);
            let t = self.token(&self.o1, &c);
            self.push(f, format!("other-td-{i}"), &t, None, Some(Anchor::Accept));
        }
        // The trust domain alone is a SPIFFE ID; a year-long token; a long path.
        let c = self.claims("spiffe://example.org");
        let t = self.token(&self.k1, &c);
        self.push(f, "td-only", &t, None, Some(Anchor::Accept));
        let mut c = self.claims("spiffe://example.org/long-lived");
        c["exp"] = json!(self.now + 365 * 86400);
        let t = self.token(&self.k1, &c);
        self.push(f, "year-long", &t, None, Some(Anchor::Accept));
        let long = format!("spiffe://example.org{}", "/seg".repeat(500));
        let c = self.claims(&long);
        let t = self.token(&self.k1, &c);
        self.push(f, "path-2000-bytes", &t, None, Some(Anchor::Accept));
        // Malleability: (r, n - s) verifies as well as (r, s) in both.
        for i in 0..4 {
            let sub = self.sub();
            let t = self.token(&self.k1, &self.claims(&sub));
            let (input, sig) = t.rsplit_once('.').unwrap();
            let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
            self.push(f, format!("high-s-{i}"), &format!("{input}.{}", b64(&high_s(&sig))), None, None);
        }
        // Surrounding whitespace and a double space are framing, not token.
        let t = self.token(&self.k1, &self.claims("spiffe://example.org/ws"));
        self.push_auth(f, "double-space", format!("Bearer  {t}").into_bytes(), None, Some(Anchor::Accept));
        self.push_auth(f, "trailing-space", format!("Bearer {t}  ").into_bytes(), None, Some(Anchor::Accept));
        self.push_auth(f, "leading-space", format!("  Bearer {t}").into_bytes(), None, Some(Anchor::Accept));
    }

    fn time(&mut self) {
        let f = "time";
        let now = self.now;
        let k1 = Key::p256("k1");
        let add = |g: &mut Gen, name: &str, patch: Value, class: Option<Class>, anchor: Option<Anchor>| {
            let mut c = g.claims("spiffe://example.org/time");
            for (k, v) in patch.as_object().unwrap() {
                if v.is_null() {
                    c.as_object_mut().unwrap().remove(k);
                } else {
                    c[k] = v.clone();
                }
            }
            let t = g.token(&k1, &c);
            g.push(f, name, &t, class, anchor);
        };
        // Margins of at least 25 s from every skew boundary: the corpus is judged within seconds.
        for (name, exp) in [("expired-1h", now - 3600), ("expired-past-skew", now - SKEW - 30), ("expired-1d", now - 86400)] {
            add(self, name, json!({"exp": exp, "iat": exp - 300}), None, Some(Anchor::Deny));
        }
        for (name, exp) in [("exp-zero", 0), ("exp-one", 1)] {
            add(self, name, json!({"exp": exp, "iat": null}), None, Some(Anchor::Deny));
        }
        add(self, "expired-within-skew", json!({"exp": now - 3}), None, Some(Anchor::Accept));
        add(self, "exp-missing", json!({"exp": null}), None, Some(Anchor::Deny));
        add(self, "exp-missing-nbf", json!({"exp": null, "nbf": now - 10}), None, Some(Anchor::Deny));
        for (name, nbf) in [("nbf-future", now + 120), ("nbf-1h", now + 3600), ("nbf-far", now + 86400 * 365)] {
            add(self, name, json!({"nbf": nbf}), None, Some(Anchor::Deny));
        }
        add(self, "nbf-within-skew", json!({"nbf": now + 3}), None, Some(Anchor::Accept));
        add(self, "nbf-past", json!({"nbf": now - 3600}), None, Some(Anchor::Accept));
        add(self, "nbf-after-exp", json!({"nbf": now + 600, "exp": now + 300}), None, Some(Anchor::Deny));
        for (name, iat) in [("iat-future", now + 120), ("iat-1h", now + 3600), ("iat-far", now + 86400 * 365)] {
            add(self, name, json!({"iat": iat}), Some(Class::IatInFuture), None);
        }
        add(self, "iat-within-skew", json!({"iat": now + 3}), None, Some(Anchor::Accept));
        add(self, "iat-missing", json!({"iat": null}), None, Some(Anchor::Accept));
        add(self, "iat-ancient", json!({"iat": 1}), None, Some(Anchor::Accept));
        // Formats of NumericDate.
        let sub = "spiffe://example.org/time";
        let raw = |g: &mut Gen, name: &str, claims: String, class: Option<Class>, anchor: Option<Anchor>| {
            let t = jws(&k1, "ES256", &Gen::header(&k1, "ES256").to_string(), &claims);
            g.push(f, name, &t, class, anchor);
        };
        let exp = now + 300;
        raw(self, "exp-fraction", format!(r#"{{"sub":"{sub}","aud":"{AUD}","exp":{exp}.5}}"#), Some(Class::IntegerNumericDate), None);
        raw(self, "exp-exponent", format!(r#"{{"sub":"{sub}","aud":"{AUD}","exp":{exp}e0}}"#), Some(Class::IntegerNumericDate), None);
        raw(self, "exp-dot-zero", format!(r#"{{"sub":"{sub}","aud":"{AUD}","exp":{exp}.0}}"#), Some(Class::IntegerNumericDate), None);
        raw(self, "nbf-fraction", format!(r#"{{"sub":"{sub}","aud":"{AUD}","exp":{exp},"nbf":{}.25}}"#, now - 100), Some(Class::IntegerNumericDate), None);
        raw(self, "iat-fraction", format!(r#"{{"sub":"{sub}","aud":"{AUD}","exp":{exp},"iat":{}.75}}"#, now - 100), Some(Class::IntegerNumericDate), None);
        raw(self, "expired-fraction", format!(r#"{{"sub":"{sub}","aud":"{AUD}","exp":{}.5}}"#, now - 3600), None, Some(Anchor::Deny));
        raw(self, "exp-string", format!(r#"{{"sub":"{sub}","aud":"{AUD}","exp":"{exp}"}}"#), None, Some(Anchor::Deny));
        raw(self, "exp-null", format!(r#"{{"sub":"{sub}","aud":"{AUD}","exp":null}}"#), None, Some(Anchor::Deny));
        raw(self, "exp-bool", format!(r#"{{"sub":"{sub}","aud":"{AUD}","exp":true}}"#), None, Some(Anchor::Deny));
        raw(self, "exp-array", format!(r#"{{"sub":"{sub}","aud":"{AUD}","exp":[{exp}]}}"#), None, Some(Anchor::Deny));
        raw(self, "exp-object", format!(r#"{{"sub":"{sub}","aud":"{AUD}","exp":{{"v":{exp}}}}}"#), None, Some(Anchor::Deny));
        raw(self, "exp-negative", format!(r#"{{"sub":"{sub}","aud":"{AUD}","exp":-{exp}}}"#), None, Some(Anchor::Deny));
        raw(self, "exp-leading-zero", format!(r#"{{"sub":"{sub}","aud":"{AUD}","exp":0{exp}}}"#), None, Some(Anchor::Deny));
        raw(self, "exp-hex", format!(r#"{{"sub":"{sub}","aud":"{AUD}","exp":0x{exp:x}}}"#), None, Some(Anchor::Deny));
        raw(self, "nbf-string", format!(r#"{{"sub":"{sub}","aud":"{AUD}","exp":{exp},"nbf":"0"}}"#), None, Some(Anchor::Deny));
        raw(self, "iat-string", format!(r#"{{"sub":"{sub}","aud":"{AUD}","exp":{exp},"iat":"0"}}"#), None, Some(Anchor::Deny));
        raw(self, "nbf-negative", format!(r#"{{"sub":"{sub}","aud":"{AUD}","exp":{exp},"nbf":-1}}"#), None, Some(Anchor::Deny));
    }

    fn huge_numbers(&mut self) {
        let f = "huge-numbers";
        let sub = "spiffe://example.org/huge";
        let exp = self.now + 300;
        let cases: Vec<(&str, String, Option<Class>, Option<Anchor>)> = vec![
            ("exp-2^53-1", r#""exp":9007199254740991"#.to_string(), None, Some(Anchor::Accept)),
            ("exp-2^53+1", r#""exp":9007199254740993"#.to_string(), Some(Class::IntegerNumericDate), None),
            ("exp-2^63", r#""exp":9223372036854775808"#.to_string(), Some(Class::IntegerNumericDate), None),
            ("exp-2^64-1", r#""exp":18446744073709551615"#.to_string(), None, Some(Anchor::Deny)),
            ("exp-2^64", r#""exp":18446744073709551616"#.to_string(), None, Some(Anchor::Deny)),
            ("exp-30-digits", r#""exp":123456789012345678901234567890"#.to_string(), None, Some(Anchor::Deny)),
            ("exp-1e300", r#""exp":1e300"#.to_string(), None, Some(Anchor::Deny)),
            ("exp-1e400", r#""exp":1e400"#.to_string(), None, Some(Anchor::Deny)),
            ("exp-tiny", r#""exp":1e-300"#.to_string(), None, Some(Anchor::Deny)),
            ("nbf-2^64-1", format!(r#""exp":{exp},"nbf":18446744073709551615"#), None, Some(Anchor::Deny)),
            ("nbf-1e300", format!(r#""exp":{exp},"nbf":1e300"#), None, Some(Anchor::Deny)),
            ("iat-2^64-1", format!(r#""exp":{exp},"iat":18446744073709551615"#), None, Some(Anchor::Deny)),
            ("iat-1e300", format!(r#""exp":{exp},"iat":1e300"#), None, Some(Anchor::Deny)),
            ("claim-1e400", format!(r#""exp":{exp},"big":1e400"#), None, Some(Anchor::Deny)),
            ("claim-300-digits", format!(r#""exp":{exp},"big":{}"#, "9".repeat(300)), None, None),
            ("claim-neg-2^64", format!(r#""exp":{exp},"big":-18446744073709551616"#), None, None),
        ];
        for (name, tail, class, anchor) in cases {
            let claims = format!(r#"{{"sub":"{sub}","aud":"{AUD}",{tail}}}"#);
            let t = jws(&self.k1, "ES256", &Self::header(&self.k1, "ES256").to_string(), &claims);
            self.push(f, name, &t, class, anchor);
        }
    }

    fn audiences(&mut self) {
        let f = "aud";
        let auds: Vec<(&str, Value, Option<Anchor>)> = vec![
            ("wrong", json!("spiffe://example.org/other"), Some(Anchor::Deny)),
            ("wrong-array", json!(["spiffe://example.org/a", "spiffe://example.org/b"]), Some(Anchor::Deny)),
            ("case", json!("SPIFFE://example.org/gateway"), Some(Anchor::Deny)),
            ("trailing-slash", json!("spiffe://example.org/gateway/"), None),
            ("https-prefix", json!("https://spiffe://example.org/gateway"), None),
            ("http-prefix", json!("http://spiffe://example.org/gateway"), None),
            ("https-prefix-trailing-slash", json!(["x", "https://spiffe://example.org/gateway/"]), None),
            ("two-trailing-slashes", json!("spiffe://example.org/gateway//"), None),
            ("prefix", json!("spiffe://example.org/gate"), Some(Anchor::Deny)),
            ("suffix", json!("spiffe://example.org/gateway2"), Some(Anchor::Deny)),
            ("whitespace", json!(" spiffe://example.org/gateway"), Some(Anchor::Deny)),
            ("empty-string", json!(""), Some(Anchor::Deny)),
            ("empty-array", json!([]), Some(Anchor::Deny)),
            ("null", Value::Null, Some(Anchor::Deny)),
            ("number", json!(5), Some(Anchor::Deny)),
            ("object", json!({"aud": AUD}), Some(Anchor::Deny)),
            ("nested-array", json!([[AUD]]), Some(Anchor::Deny)),
            ("mixed-types", json!([AUD, 5]), Some(Anchor::Deny)),
            ("array-first", json!([AUD, "spiffe://example.org/x"]), Some(Anchor::Accept)),
            ("array-last", json!(["spiffe://example.org/x", "https://y", AUD]), Some(Anchor::Accept)),
            ("array-twice", json!([AUD, AUD]), Some(Anchor::Accept)),
            ("array-many", json!((0..50).map(|i| format!("spiffe://example.org/a{i}")).chain([AUD.to_string()]).collect::<Vec<_>>()), Some(Anchor::Accept)),
            ("array-many-wrong", json!((0..50).map(|i| format!("spiffe://example.org/a{i}")).collect::<Vec<_>>()), Some(Anchor::Deny)),
        ];
        for (name, aud, anchor) in auds {
            let mut c = self.claims("spiffe://example.org/aud");
            c["aud"] = aud;
            let t = self.token(&Key::p256("k1"), &c);
            // jwt_authn drops an `http(s)://` prefix and a trailing `/` before comparing.
            let class = anchor.is_none().then_some(Class::ExactAudience);
            self.push(f, name, &t, class, anchor);
        }
        let mut c = self.claims("spiffe://example.org/aud");
        c.as_object_mut().unwrap().remove("aud");
        let t = self.token(&Key::p256("k1"), &c);
        self.push(f, "missing", &t, None, Some(Anchor::Deny));
        // RSA too.
        let mut c = self.claims("spiffe://example.org/aud");
        c["aud"] = json!("spiffe://example.org/other");
        let t = self.token(&Key::rsa("r1", 0), &c);
        self.push(f, "wrong-rs256", &t, None, Some(Anchor::Deny));
    }

    fn issuers(&mut self) {
        let f = "iss";
        // JWT-SVIDs constrain no issuer; jwt_authn is configured without one (see the doc).
        for (name, iss, anchor) in [
            ("wrong", json!("https://evil.test"), Some(Anchor::Accept)),
            ("spiffe", json!("spiffe://example.org"), Some(Anchor::Accept)),
            ("empty", json!(""), Some(Anchor::Accept)),
            ("number", json!(5), Some(Anchor::Deny)),
            ("array", json!(["a"]), Some(Anchor::Deny)),
            ("null", Value::Null, Some(Anchor::Deny)),
        ] {
            let mut c = self.claims("spiffe://example.org/iss");
            c["iss"] = iss;
            let t = self.token(&Key::p256("k1"), &c);
            self.push(f, name, &t, None, anchor);
        }
    }

    fn subjects(&mut self) {
        let f = "sub";
        let bad_syntax: Vec<(&str, String)> = vec![
            ("https", "https://example.org/ns/prod".into()),
            ("plain", "admin".into()),
            ("email", "agent@example.org".into()),
            ("empty", String::new()),
            ("scheme-upper", "SPIFFE://example.org/a".into()),
            ("scheme-one-slash", "spiffe:/example.org/a".into()),
            ("td-upper", "spiffe://Example.org/a".into()),
            ("td-port", "spiffe://example.org:443/a".into()),
            ("td-userinfo", "spiffe://user@example.org/a".into()),
            ("td-empty", "spiffe:///a".into()),
            ("td-percent", "spiffe://example%2eorg/a".into()),
            ("query", "spiffe://example.org/a?x=1".into()),
            ("fragment", "spiffe://example.org/a#x".into()),
            ("trailing-slash", "spiffe://example.org/a/".into()),
            ("td-trailing-slash", "spiffe://example.org/".into()),
            ("empty-segment", "spiffe://example.org/a//b".into()),
            ("dot-segment", "spiffe://example.org/a/./b".into()),
            ("dotdot-segment", "spiffe://example.org/a/../admin".into()),
            ("percent-path", "spiffe://example.org/a%2Fb".into()),
            ("space-path", "spiffe://example.org/a b".into()),
            ("unicode-path", "spiffe://example.org/caf\u{e9}".into()),
            ("nul-path", "spiffe://example.org/a\u{0}b".into()),
            ("too-long", format!("spiffe://example.org/{}", "a".repeat(2040))),
            ("td-too-long", format!("spiffe://{}.org/a", "a".repeat(252))),
        ];
        for (name, sub) in bad_syntax {
            let t = self.token(&Key::p256("k1"), &self.claims(&sub));
            self.push(f, name, &t, Some(Class::SpiffeSubject), None);
        }
        let mut c = self.claims("x");
        c.as_object_mut().unwrap().remove("sub");
        let t = self.token(&Key::p256("k1"), &c);
        self.push(f, "missing", &t, Some(Class::SpiffeSubject), None);
        for (name, sub) in [("null", Value::Null), ("number", json!(5)), ("array", json!(["spiffe://example.org/a"])), ("object", json!({}))] {
            let mut c = self.claims("x");
            c["sub"] = sub;
            let t = self.token(&Key::p256("k1"), &c);
            self.push(f, name, &t, None, Some(Anchor::Deny));
        }
        // The trust domain decides the keys: another (trusted or unknown) domain's subject
        // signed by example.org's key, and the reverse.
        for (name, sub, key) in [
            ("other-td-signed-by-example", "spiffe://other.org/ns/prod/sa/web", "k1"),
            ("example-signed-by-other-td", "spiffe://example.org/ns/prod/sa/web", "o1"),
            ("unknown-td", "spiffe://unknown.org/ns/prod/sa/web", "k1"),
            ("unknown-td-rsa", "spiffe://evil.org/a", "r1"),
            ("sub-td-lookalike", "spiffe://example.org.evil.test/a", "k1"),
            ("sub-td-suffix", "spiffe://evil-example.org/a", "k1"),
        ] {
            let key = match key {
                "k1" => Key::p256("k1"),
                "o1" => Key::p256("o1"),
                _ => Key::rsa("r1", 0),
            };
            let t = self.token(&key, &self.claims(sub));
            self.push(f, name, &t, Some(Class::TrustDomainKeys), None);
        }
        // Escapes decode to the same SPIFFE ID in both.
        let claims = format!(r#"{{"sub":"spiffe:\/\/example.org\/\u0061gent","aud":"{AUD}","exp":{}}}"#, self.now + 300);
        let t = jws(&self.k1, "ES256", &Self::header(&self.k1, "ES256").to_string(), &claims);
        self.push(f, "escaped", &t, None, Some(Anchor::Accept));
    }

    fn kids(&mut self) {
        let f = "kid";
        let sub = "spiffe://example.org/kid";
        let c = self.claims(sub).to_string();
        let k1 = Key::p256("k1");
        let r1 = Key::rsa("r1", 0);
        let o1 = Key::p256("o1");
        let evil = Key::p256("evil");
        let add = |g: &mut Gen, name: &str, key: &Key, alg: &str, header: Value, class: Option<Class>, anchor: Option<Anchor>| {
            let t = jws(key, alg, &header.to_string(), &c);
            g.push(f, name, &t, class, anchor);
        };
        add(self, "none-es256", &k1, "ES256", json!({"alg": "ES256", "typ": "JWT"}), Some(Class::KidRequired), None);
        add(self, "none-rs256", &r1, "RS256", json!({"alg": "RS256"}), Some(Class::KidRequired), None);
        add(self, "none-ps512", &r1, "PS512", json!({"alg": "PS512"}), Some(Class::KidRequired), None);
        add(self, "empty", &k1, "ES256", json!({"alg": "ES256", "kid": ""}), Some(Class::KidRequired), None);
        add(self, "null", &k1, "ES256", json!({"alg": "ES256", "kid": null}), None, Some(Anchor::Deny));
        add(self, "unknown", &k1, "ES256", json!({"alg": "ES256", "kid": "k9"}), None, Some(Anchor::Deny));
        add(self, "case", &k1, "ES256", json!({"alg": "ES256", "kid": "K1"}), None, Some(Anchor::Deny));
        add(self, "space", &k1, "ES256", json!({"alg": "ES256", "kid": "k1 "}), None, Some(Anchor::Deny));
        add(self, "number", &k1, "ES256", json!({"alg": "ES256", "kid": 1}), None, Some(Anchor::Deny));
        add(self, "array", &k1, "ES256", json!({"alg": "ES256", "kid": ["k1"]}), None, Some(Anchor::Deny));
        add(self, "points-at-rsa", &k1, "ES256", json!({"alg": "ES256", "kid": "r1"}), None, Some(Anchor::Deny));
        add(self, "points-at-p384", &k1, "ES256", json!({"alg": "ES256", "kid": "p384"}), None, Some(Anchor::Deny));
        add(self, "points-at-other-td", &k1, "ES256", json!({"alg": "ES256", "kid": "o1"}), None, Some(Anchor::Deny));
        add(self, "other-td-key-own-kid", &o1, "ES256", json!({"alg": "ES256", "kid": "o1"}), Some(Class::TrustDomainKeys), None);
        add(self, "other-td-key-kid-k1", &o1, "ES256", json!({"alg": "ES256", "kid": "k1"}), None, Some(Anchor::Deny));
        add(self, "rsa-kid-k1", &r1, "RS256", json!({"alg": "RS256", "kid": "k1"}), None, Some(Anchor::Deny));
        add(self, "evil-kid-k1", &evil, "ES256", json!({"alg": "ES256", "kid": "k1"}), None, Some(Anchor::Deny));
        add(self, "evil-kid-o1", &evil, "ES256", json!({"alg": "ES256", "kid": "o1"}), None, Some(Anchor::Deny));
        add(self, "evil-no-kid", &evil, "ES256", json!({"alg": "ES256"}), None, Some(Anchor::Deny));
        add(self, "evil-own-kid", &evil, "ES256", json!({"alg": "ES256", "kid": "evil"}), None, Some(Anchor::Deny));
        // Keys carried in the token are never trusted.
        let evil_jwk = evil.jwk();
        add(self, "evil-embedded-jwk", &evil, "ES256", json!({"alg": "ES256", "kid": "evil", "jwk": evil_jwk}), None, Some(Anchor::Deny));
        add(self, "evil-embedded-jwk-kid-k1", &evil, "ES256", json!({"alg": "ES256", "kid": "k1", "jwk": evil_jwk}), None, Some(Anchor::Deny));
        add(self, "evil-jku", &evil, "ES256", json!({"alg": "ES256", "kid": "evil", "jku": "https://evil.test/jwks"}), None, Some(Anchor::Deny));
        add(self, "evil-x5u", &evil, "ES256", json!({"alg": "ES256", "x5u": "https://evil.test/cert"}), None, Some(Anchor::Deny));
        add(self, "k1-embedded-own-jwk", &k1, "ES256", json!({"alg": "ES256", "kid": "k1", "jwk": k1.jwk()}), None, Some(Anchor::Accept));
    }

    fn wrong_keys(&mut self) {
        let f = "wrong-key";
        for i in 0..16 {
            let sub = self.sub();
            let c = self.claims(&sub);
            let (key, kid) = match i % 4 {
                0 => (&self.evil, "k1"),
                1 => (&self.evil, "o1"),
                2 => (&self.evil_rsa, "r1"),
                _ => (&self.evil, "evil"),
            };
            let header = json!({"alg": key.alg(), "kid": kid, "typ": "JWT"});
            let t = jws(key, key.alg(), &header.to_string(), &c.to_string());
            self.push(f, format!("{kid}-{i}"), &t, None, Some(Anchor::Deny));
        }
        // Right key, signature of other bytes: spliced from another token.
        for i in 0..6 {
            let a = self.token(&self.k1, &self.claims("spiffe://example.org/a"));
            let b = self.token(&self.k1, &self.claims(&format!("spiffe://example.org/admin{i}")));
            let sig_a = a.rsplit_once('.').unwrap().1;
            let input_b = b.rsplit_once('.').unwrap().0;
            self.push(f, format!("spliced-{i}"), &format!("{input_b}.{sig_a}"), None, Some(Anchor::Deny));
        }
    }

    fn algs(&mut self) {
        let f = "alg";
        let sub = "spiffe://example.org/alg";
        let claims = self.claims(sub).to_string();
        let k1 = Key::p256("k1");
        let r1 = Key::rsa("r1", 0);
        let input = |h: &Value| format!("{}.{}", b64(h.to_string().as_bytes()), b64(claims.as_bytes()));
        let mut out: Vec<(String, String, Option<Class>, Option<Anchor>)> = Vec::new();
        // alg: none, unsigned and with a real signature.
        for (i, name) in ["none", "None", "NONE", "nOnE"].into_iter().enumerate() {
            let h = json!({"alg": name, "kid": "k1", "typ": "JWT"});
            let inp = input(&h);
            out.push((format!("{name}-empty-sig"), format!("{inp}."), None, Some(Anchor::Deny)));
            if i == 0 {
                let sig = k1.sign("ES256", inp.as_bytes());
                out.push((format!("{name}-with-sig"), format!("{inp}.{}", b64(&sig)), None, Some(Anchor::Deny)));
                out.push((format!("{name}-two-parts"), inp.clone(), None, Some(Anchor::Deny)));
            }
        }
        // HS* keyed with public key material (the classic RS/ES → HS confusion).
        let jwk = k1.jwk();
        let x = URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap();
        let y = URL_SAFE_NO_PAD.decode(jwk["y"].as_str().unwrap()).unwrap();
        let sec1 = [&[4u8][..], &x, &y].concat();
        let secrets: Vec<(&str, Vec<u8>)> = vec![
            ("jwk-json", jwk.to_string().into_bytes()),
            ("jwks-json", json!({"keys": [jwk]}).to_string().into_bytes()),
            ("sec1", sec1),
            ("x", x.clone()),
            ("x-b64", jwk["x"].as_str().unwrap().as_bytes().to_vec()),
            ("empty", Vec::new()),
        ];
        for (name, secret) in secrets {
            for kid in ["k1", "r1"] {
                let h = json!({"alg": "HS256", "kid": kid, "typ": "JWT"});
                let inp = input(&h);
                out.push((format!("hs256-{kid}-{name}"), format!("{inp}.{}", b64(&hmac_sha256(&secret, inp.as_bytes()))), None, Some(Anchor::Deny)));
            }
        }
        for hs in ["HS384", "HS512"] {
            let h = json!({"alg": hs, "kid": "k1"});
            let inp = input(&h);
            out.push((format!("{hs}-k1"), format!("{inp}.{}", b64(&hmac_sha256(&sec1_of(&k1), inp.as_bytes()))), None, Some(Anchor::Deny)));
        }
        // Headers that do not match the key.
        let swaps: Vec<(&str, &Key, &str, Value)> = vec![
            ("rs256-header-ec-sig", &k1, "ES256", json!({"alg": "RS256", "kid": "k1"})),
            ("ps256-header-ec-sig", &k1, "ES256", json!({"alg": "PS256", "kid": "k1"})),
            ("es256-header-rsa-sig", &r1, "RS256", json!({"alg": "ES256", "kid": "r1"})),
            ("es384-header-sha256-sig", &k1, "ES256", json!({"alg": "ES384", "kid": "k1"})),
            ("es512-header", &k1, "ES256", json!({"alg": "ES512", "kid": "k1"})),
            ("ps256-header-rs256-sig", &r1, "RS256", json!({"alg": "PS256", "kid": "r1"})),
            ("rs256-header-ps256-sig", &r1, "PS256", json!({"alg": "RS256", "kid": "r1"})),
            ("rs384-header-rs256-sig", &r1, "RS256", json!({"alg": "RS384", "kid": "r1"})),
            ("rs256-header-rs512-sig", &r1, "RS512", json!({"alg": "RS256", "kid": "r1"})),
            ("eddsa", &k1, "ES256", json!({"alg": "EdDSA", "kid": "k1"})),
            ("es256k", &k1, "ES256", json!({"alg": "ES256K", "kid": "k1"})),
            ("lowercase", &k1, "ES256", json!({"alg": "es256", "kid": "k1"})),
            ("trailing-space", &k1, "ES256", json!({"alg": "ES256 ", "kid": "k1"})),
            ("missing", &k1, "ES256", json!({"kid": "k1"})),
            ("null", &k1, "ES256", json!({"alg": null, "kid": "k1"})),
            ("number", &k1, "ES256", json!({"alg": 256, "kid": "k1"})),
            ("array", &k1, "ES256", json!({"alg": ["ES256"], "kid": "k1"})),
        ];
        for (name, key, alg, h) in swaps {
            let inp = input(&h);
            // jwt_authn picks the verification by the key's type and the hash by `alg`: an
            // RS256, PS256 or EdDSA header over a P-256 signature of SHA-256 verifies there.
            let (class, anchor) = if ["rs256-header-ec-sig", "ps256-header-ec-sig", "eddsa"].contains(&name) {
                (Some(Class::AlgMatchesKey), None)
            } else {
                (None, Some(Anchor::Deny))
            };
            out.push((name.to_string(), format!("{inp}.{}", b64(&key.sign(alg, inp.as_bytes()))), class, anchor));
        }
        // An ES384 header over a P-256 signature of the SHA-384 hash: only the hash changed.
        for i in 0..3 {
            let h = if i == 0 { json!({"alg": "ES384", "kid": "k1"}) } else { json!({"alg": "ES384", "kid": "k1", "typ": "JWT", "n": i}) };
            let inp = input(&h);
            out.push((format!("es384-header-p256-key-{i}"), format!("{inp}.{}", b64(&k1.sign_p256_sha384(inp.as_bytes()))), Some(Class::AlgMatchesKey), None));
        }
        for (name, t, class, anchor) in out {
            self.push(f, name, &t, class, anchor);
        }
        // Valid ES384 with the P-384 key.
        for i in 0..4 {
            let sub = self.sub();
            let t = self.token(&Key::p384("p384"), &self.claims(&sub));
            self.push("es384", format!("p384-{i}"), &t, None, Some(Anchor::Accept));
        }
    }

    fn headers(&mut self) {
        let f = "header";
        let sub = "spiffe://example.org/hdr";
        let claims = self.claims(sub).to_string();
        let k1 = Key::p256("k1");
        let typ = |t: Value| json!({"alg": "ES256", "kid": "k1", "typ": t});
        let mut list: Vec<(&str, String, Option<Class>, Option<Anchor>)> = vec![
            ("typ-at+jwt", typ(json!("at+jwt")).to_string(), Some(Class::SvidTyp), None),
            ("typ-lowercase-jwt", typ(json!("jwt")).to_string(), Some(Class::SvidTyp), None),
            ("typ-jws", typ(json!("JWS")).to_string(), Some(Class::SvidTyp), None),
            ("typ-application-jwt", typ(json!("application/jwt")).to_string(), Some(Class::SvidTyp), None),
            ("typ-intent+jwt", typ(json!("intent+jwt")).to_string(), Some(Class::SvidTyp), None),
            ("typ-txntoken+jwt", typ(json!("txntoken+jwt")).to_string(), Some(Class::SvidTyp), None),
            ("typ-empty", typ(json!("")).to_string(), Some(Class::SvidTyp), None),
            ("typ-null", typ(Value::Null).to_string(), Some(Class::HeaderParamType), None),
            ("typ-number", typ(json!(5)).to_string(), Some(Class::HeaderParamType), None),
            ("typ-object", typ(json!({"t": "JWT"})).to_string(), Some(Class::HeaderParamType), None),
            ("crit-exp", json!({"alg": "ES256", "kid": "k1", "crit": ["exp"]}).to_string(), Some(Class::CritRefused), None),
            ("crit-custom", json!({"alg": "ES256", "kid": "k1", "crit": ["x"], "x": 1}).to_string(), Some(Class::CritRefused), None),
            ("crit-empty", json!({"alg": "ES256", "kid": "k1", "crit": []}).to_string(), Some(Class::CritRefused), None),
            ("crit-b64", json!({"alg": "ES256", "kid": "k1", "crit": ["b64"], "b64": false}).to_string(), Some(Class::CritRefused), None),
            ("extra-params", json!({"alg": "ES256", "kid": "k1", "cty": "JWT", "x5t": "abc", "zip": 1}).to_string(), None, None),
            ("dup-alg", r#"{"alg":"none","alg":"ES256","kid":"k1"}"#.into(), None, Some(Anchor::Deny)),
            ("dup-alg-reverse", r#"{"alg":"ES256","alg":"none","kid":"k1"}"#.into(), None, Some(Anchor::Deny)),
            ("dup-kid", r#"{"alg":"ES256","kid":"k9","kid":"k1"}"#.into(), None, Some(Anchor::Deny)),
            ("dup-unknown", r#"{"alg":"ES256","kid":"k1","x":1,"x":2}"#.into(), None, Some(Anchor::Deny)),
            ("crit-null", json!({"alg": "ES256", "kid": "k1", "crit": null}).to_string(), Some(Class::CritRefused), None),
            ("dup-escaped-alg", r#"{"alg":"ES256","\u0061lg":"ES256","kid":"k1"}"#.into(), None, Some(Anchor::Deny)),
            ("not-json", "alg=ES256".into(), None, Some(Anchor::Deny)),
            ("array", r#"["ES256","k1"]"#.into(), None, Some(Anchor::Deny)),
            ("array-of-fields", r#"["ES256","k1","JWT",null]"#.into(), None, Some(Anchor::Deny)),
            ("string", r#""ES256""#.into(), None, Some(Anchor::Deny)),
            ("null", "null".into(), None, Some(Anchor::Deny)),
            ("empty-object", "{}".into(), None, Some(Anchor::Deny)),
            ("bom", "\u{feff}{\"alg\":\"ES256\",\"kid\":\"k1\"}".into(), None, Some(Anchor::Deny)),
            ("trailing-garbage", r#"{"alg":"ES256","kid":"k1"}x"#.into(), None, Some(Anchor::Deny)),
            ("trailing-whitespace", "{\"alg\":\"ES256\",\"kid\":\"k1\"} \n".into(), None, None),
            ("escaped-values", r#"{"alg":"\u0045S256","kid":"\u006b1"}"#.into(), None, None),
        ];
        // A non-UTF-8 byte in an unknown header member.
        let latin1 = b"{\"alg\":\"ES256\",\"kid\":\"k1\",\"x\":\"\xe9\"}".to_vec();
        for (name, h, class, anchor) in list.drain(..) {
            let t = jws(&k1, "ES256", &h, &claims);
            self.push(f, name, &t, class, anchor);
        }
        let inp = format!("{}.{}", b64(&latin1), b64(claims.as_bytes()));
        let t = format!("{inp}.{}", b64(&k1.sign("ES256", inp.as_bytes())));
        self.push(f, "latin1-unknown-member", &t, None, Some(Anchor::Deny));
    }

    fn payloads(&mut self) {
        let f = "payload";
        let sub = "spiffe://example.org/pl";
        let exp = self.now + 300;
        let base = format!(r#""sub":"{sub}","aud":"{AUD}","exp":{exp}"#);
        let nested = |depth: usize| format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        let bodies: Vec<RawCase> = vec![
            ("not-json", b"sub=spiffe".to_vec(), None, Some(Anchor::Deny)),
            ("array", format!("[{{{base}}}]").into_bytes(), None, Some(Anchor::Deny)),
            ("array-of-fields", format!(r#"["{sub}","https://issuer.test","{AUD}",{exp},{},{},"jti-1"]"#, exp - 400, exp - 400).into_bytes(), None, Some(Anchor::Deny)),
            ("null", b"null".to_vec(), None, Some(Anchor::Deny)),
            ("string", b"\"x\"".to_vec(), None, Some(Anchor::Deny)),
            ("number", b"5".to_vec(), None, Some(Anchor::Deny)),
            ("empty", Vec::new(), None, Some(Anchor::Deny)),
            ("empty-object", b"{}".to_vec(), None, Some(Anchor::Deny)),
            ("trailing-garbage", format!("{{{base}}}x").into_bytes(), None, Some(Anchor::Deny)),
            ("two-objects", format!("{{{base}}}{{{base}}}").into_bytes(), None, Some(Anchor::Deny)),
            ("trailing-whitespace", format!("{{{base}}}\n \t").into_bytes(), None, None),
            ("leading-whitespace", format!(" \n{{{base}}}").into_bytes(), None, None),
            ("bom", format!("\u{feff}{{{base}}}").into_bytes(), None, Some(Anchor::Deny)),
            ("comment", format!("{{/*c*/{base}}}").into_bytes(), None, Some(Anchor::Deny)),
            ("trailing-comma", format!("{{{base},}}").into_bytes(), Some(Class::StrictJson), None),
            ("single-quotes", format!("{{'sub':'{sub}','aud':'{AUD}','exp':{exp}}}").into_bytes(), Some(Class::StrictJson), None),
            ("unquoted-keys", format!("{{sub:\"{sub}\",aud:\"{AUD}\",exp:{exp}}}").into_bytes(), Some(Class::StrictJson), None),
            ("nan", format!("{{{base},\"x\":NaN}}").into_bytes(), None, Some(Anchor::Deny)),
            ("latin1-unknown-claim", [format!("{{{base},\"x\":\"").as_bytes(), b"\xe9\"}"].concat(), None, Some(Anchor::Deny)),
            ("lone-surrogate-unknown-claim", format!("{{{base},\"x\":\"\\ud800\"}}").into_bytes(), None, Some(Anchor::Deny)),
            ("nul-in-unknown-claim", format!("{{{base},\"x\":\"a\\u0000b\"}}").into_bytes(), None, None),
            ("raw-control-char", format!("{{{base},\"x\":\"a\u{1}b\"}}").into_bytes(), Some(Class::StrictJson), None),
            ("nested-20", format!("{{{base},\"x\":{}}}", nested(20)).into_bytes(), None, Some(Anchor::Accept)),
            ("nested-63", format!("{{{base},\"x\":{}}}", nested(63)).into_bytes(), None, Some(Anchor::Accept)),
            ("nested-64", format!("{{{base},\"x\":{}}}", nested(64)).into_bytes(), Some(Class::StrictJson), None),
            ("nested-99", format!("{{{base},\"x\":{}}}", nested(99)).into_bytes(), Some(Class::StrictJson), None),
            ("nested-100", format!("{{{base},\"x\":{}}}", nested(100)).into_bytes(), None, Some(Anchor::Deny)),
            ("nested-200", format!("{{{base},\"x\":{}}}", nested(200)).into_bytes(), None, Some(Anchor::Deny)),
            ("nested-1000", format!("{{{base},\"x\":{}}}", nested(1000)).into_bytes(), None, Some(Anchor::Deny)),
            ("unicode-claims", format!("{{{base},\"name\":\"caf\u{e9} \u{1f600}\"}}").into_bytes(), None, None),
        ];
        for (name, body, class, anchor) in bodies {
            let inp = format!("{}.{}", b64(Self::header(&self.k1, "ES256").to_string().as_bytes()), b64(&body));
            let t = format!("{inp}.{}", b64(&self.k1.sign("ES256", inp.as_bytes())));
            self.push(f, name, &t, class, anchor);
        }
    }

    fn duplicates(&mut self) {
        let f = "duplicate";
        let exp = self.now + 300;
        let a = "spiffe://example.org/a";
        let admin = "spiffe://example.org/admin";
        let bodies: Vec<(&str, String)> = vec![
            ("sub-differs", format!(r#"{{"sub":"{a}","sub":"{admin}","aud":"{AUD}","exp":{exp}}}"#)),
            ("sub-same", format!(r#"{{"sub":"{a}","sub":"{a}","aud":"{AUD}","exp":{exp}}}"#)),
            ("sub-escaped-key", format!(r#"{{"sub":"{a}","\u0073ub":"{admin}","aud":"{AUD}","exp":{exp}}}"#)),
            ("aud", format!(r#"{{"sub":"{a}","aud":"spiffe://example.org/x","aud":"{AUD}","exp":{exp}}}"#)),
            ("aud-reverse", format!(r#"{{"sub":"{a}","aud":"{AUD}","aud":"spiffe://example.org/x","exp":{exp}}}"#)),
            ("exp-expired-last", format!(r#"{{"sub":"{a}","aud":"{AUD}","exp":{exp},"exp":1}}"#)),
            ("exp-expired-first", format!(r#"{{"sub":"{a}","aud":"{AUD}","exp":1,"exp":{exp}}}"#)),
            ("nbf", format!(r#"{{"sub":"{a}","aud":"{AUD}","exp":{exp},"nbf":1,"nbf":{}}}"#, exp + 1000)),
            ("iss", format!(r#"{{"sub":"{a}","aud":"{AUD}","exp":{exp},"iss":"a","iss":"b"}}"#)),
            ("unknown", format!(r#"{{"sub":"{a}","aud":"{AUD}","exp":{exp},"role":"user","role":"admin"}}"#)),
            ("unknown-nested", format!(r#"{{"sub":"{a}","aud":"{AUD}","exp":{exp},"act":{{"sub":"{a}","sub":"{admin}"}}}}"#)),
            ("unknown-deep", format!(r#"{{"sub":"{a}","aud":"{AUD}","exp":{exp},"x":[{{"y":{{"z":1,"z":2}}}}]}}"#)),
        ];
        for (name, body) in bodies {
            let t = jws(&self.k1, "ES256", &Self::header(&self.k1, "ES256").to_string(), &body);
            self.push(f, name, &t, None, Some(Anchor::Deny));
        }
    }

    fn padding(&mut self) {
        let f = "padding";
        for i in 0..6 {
            let sub = format!("spiffe://example.org/pad{}", "x".repeat(i));
            let t = self.token(&self.k1, &self.claims(&sub));
            let segs: Vec<&str> = t.split('.').collect();
            for seg in 0..3 {
                let s = segs[seg];
                let pad = (4 - s.len() % 4) % 4;
                let mut parts: Vec<String> = segs.iter().map(|s| s.to_string()).collect();
                if pad > 0 {
                    parts[seg] = format!("{s}{}", "=".repeat(pad));
                    let m = parts.join(".");
                    let class = lax_reader_sees_original(&m, &t).then_some(Class::CompactSerialization);
                    self.push(f, format!("seg{seg}-padded-{i}"), &m, class, None);
                }
                // A wrong amount of padding.
                parts[seg] = format!("{s}{}", "=".repeat(pad + 1));
                self.push(f, format!("seg{seg}-overpadded-{i}"), &parts.join("."), None, Some(Anchor::Deny));
            }
        }
    }

    fn sizes(&mut self) {
        let f = "size";
        for (name, pad, class) in [
            ("1k", 700usize, None),
            ("4k", 2900, None),
            ("near-limit", 5800, None),
            ("just-over-limit", 6200, Some(Class::TokenSize)),
            ("12k", 9000, Some(Class::TokenSize)),
            ("32k", 24000, Some(Class::TokenSize)),
            ("48k", 36000, Some(Class::TokenSize)),
            ("100k", 75000, None),
        ] {
            let mut c = self.claims("spiffe://example.org/big");
            c["pad"] = json!("p".repeat(pad));
            let t = self.token(&self.k1, &c);
            let class = class.filter(|_| t.len() > MAX_TOKEN_BYTES);
            let anchor = if t.len() <= MAX_TOKEN_BYTES { Some(Anchor::Accept) } else if t.len() > 64 * 1024 { Some(Anchor::Deny) } else { None };
            self.push(f, format!("{name}-{}", t.len()), &t, class, anchor);
        }
        // Many claims, and a big audience list.
        let mut c = self.claims("spiffe://example.org/many");
        for i in 0..300 {
            c[format!("c{i}")] = json!(i);
        }
        let t = self.token(&self.k1, &c);
        self.push(f, format!("300-claims-{}", t.len()), &t, None, Some(Anchor::Accept));
    }

    fn framing(&mut self) {
        let f = "framing";
        let t = self.token(&self.k1, &self.claims("spiffe://example.org/framing"));
        let variants: Vec<RawCase> = vec![
            ("scheme-lowercase", format!("bearer {t}").into_bytes(), Some(Class::SchemeCaseInsensitive), None),
            ("scheme-uppercase", format!("BEARER {t}").into_bytes(), Some(Class::SchemeCaseInsensitive), None),
            ("scheme-tab", format!("Bearer\t{t}").into_bytes(), None, Some(Anchor::Deny)),
            ("scheme-no-space", format!("Bearer{t}").into_bytes(), None, Some(Anchor::Deny)),
            ("scheme-missing", t.clone().into_bytes(), None, Some(Anchor::Deny)),
            ("scheme-basic", format!("Basic {t}").into_bytes(), None, Some(Anchor::Deny)),
            ("junk-after", format!("Bearer {t} junk").into_bytes(), None, Some(Anchor::Deny)),
            ("junk-before", format!("Bearer junk {t}").into_bytes(), None, Some(Anchor::Deny)),
            ("two-tokens-comma", format!("Bearer {t}, Bearer {t}").into_bytes(), None, Some(Anchor::Deny)),
            ("quoted", format!("Bearer \"{t}\"").into_bytes(), None, Some(Anchor::Deny)),
            ("semicolon", format!("Bearer {t};").into_bytes(), None, Some(Anchor::Deny)),
            ("empty", b"Bearer ".to_vec(), None, Some(Anchor::Deny)),
        ];
        let (input, sig) = t.rsplit_once('.').unwrap();
        let mut variants = variants;
        for (i, ws) in [" ", "\t", "  ", " \t "].into_iter().enumerate() {
            let at = 10 + 17 * i;
            let m = format!("{input}.{}{ws}{}", &sig[..at], &sig[at..]);
            let class = lax_reader_sees_original(&m, &t).then_some(Class::CompactSerialization);
            let name = ["space-in-signature", "tab-in-signature", "two-spaces-in-signature", "mixed-in-signature"][i];
            variants.push((name, format!("Bearer {m}").into_bytes(), class, None));
        }
        let (h, rest) = t.split_once('.').unwrap();
        for (name, m) in [("space-in-header", format!("{} {}.{rest}", &h[..8], &h[8..])), ("space-before-dot", format!("{h} .{rest}"))] {
            variants.push((name, format!("Bearer {m}").into_bytes(), None, Some(Anchor::Deny)));
        }
        for (name, auth, class, anchor) in variants {
            self.push_auth(f, name, auth, class, anchor);
        }
    }

    /// Seeded mutations of valid tokens.
    fn mutations(&mut self) {
        let f = "mutation";
        let bases: Vec<String> = (0..10)
            .map(|i| {
                let sub = format!("spiffe://example.org/m{i}");
                let c = self.claims(&sub);
                match i % 5 {
                    3 => self.token(&self.r1, &c),
                    4 => self.token(&self.o1, &self.claims(&format!("spiffe://other.org/m{i}"))),
                    _ => self.token(&self.k1, &c),
                }
            })
            .collect();
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        const FOREIGN: &[u8] = b"+/=*!~%$#&@^|\\`'\"(),:;<>?[]{} \t";
        for n in 0..MUTATIONS {
            let base = &bases[self.rng.below(bases.len())];
            let bytes = base.as_bytes();
            let op = self.rng.below(12);
            let (kind, m): (&str, String) = match op {
                0..=2 => {
                    // Flip one bit of a decoded segment and re-encode it.
                    let seg = self.rng.below(3);
                    let mut parts: Vec<String> = base.split('.').map(str::to_string).collect();
                    let mut raw = URL_SAFE_NO_PAD.decode(&parts[seg]).unwrap();
                    let at = self.rng.below(raw.len());
                    raw[at] ^= 1 << self.rng.below(8);
                    parts[seg] = b64(&raw);
                    (["bitflip-header", "bitflip-payload", "bitflip-signature"][seg], parts.join("."))
                }
                3 | 4 => {
                    // Replace one character with another base64url character.
                    let mut v = bytes.to_vec();
                    let at = self.rng.below(v.len());
                    if v[at] == b'.' {
                        v[at] = *self.rng.pick(ALPHABET);
                    } else {
                        let mut c = *self.rng.pick(ALPHABET);
                        if c == v[at] {
                            c = if c == b'A' { b'B' } else { b'A' };
                        }
                        v[at] = c;
                    }
                    ("char-substitution", String::from_utf8(v).unwrap())
                }
                5 => {
                    // The last character of the signature. Its 4 low bits are unused (a 64- or
                    // 256-byte signature is 2 bits short of a whole character): flipping only
                    // those keeps the bytes (non-canonical encoding), flipping bit 4 or 5 does not.
                    let mut v = bytes.to_vec();
                    let last = v.len() - 1;
                    let idx = ALPHABET.iter().position(|c| *c == v[last]).unwrap();
                    let flip = if self.rng.below(3) == 0 { 16 << self.rng.below(2) } else { 1 + self.rng.below(15) };
                    v[last] = ALPHABET[idx ^ flip];
                    ("signature-last-char", String::from_utf8(v).unwrap())
                }
                6 => {
                    // Insert a character outside base64url.
                    let mut v = bytes.to_vec();
                    let at = 1 + self.rng.below(v.len() - 1);
                    v.insert(at, *self.rng.pick(FOREIGN));
                    ("foreign-char", String::from_utf8(v).unwrap())
                }
                7 => {
                    let at = 1 + self.rng.below(bytes.len() - 1);
                    ("truncation", base[..at].to_string())
                }
                8 => {
                    let mut v = bytes.to_vec();
                    v.remove(self.rng.below(v.len()));
                    ("deletion", String::from_utf8(v).unwrap())
                }
                9 => {
                    let (h, rest) = base.split_once('.').unwrap();
                    let m = match self.rng.below(4) {
                        0 => format!("{base}."),
                        1 => format!("{base}.e30"),
                        2 => format!("{base}.{}", base.rsplit_once('.').unwrap().1),
                        _ => format!("{h}..{rest}"),
                    };
                    ("extra-segment", m)
                }
                10 => {
                    // Swap two adjacent characters, or flip a letter's case.
                    let mut v = bytes.to_vec();
                    let at = self.rng.below(v.len() - 1);
                    if self.rng.below(2) == 0 {
                        v.swap(at, at + 1);
                        ("swap", String::from_utf8(v).unwrap())
                    } else {
                        let at = (at..v.len()).find(|i| v[*i].is_ascii_alphabetic()).unwrap_or(0);
                        v[at] ^= 0x20;
                        ("case-flip", String::from_utf8(v).unwrap())
                    }
                }
                _ => {
                    let parts: Vec<&str> = base.split('.').collect();
                    match self.rng.below(4) {
                        0 => ("segments-swapped", format!("{}.{}.{}", parts[1], parts[0], parts[2])),
                        1 => ("signature-der", {
                            let sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
                            format!("{}.{}.{}", parts[0], parts[1], b64(&der_signature(&sig)))
                        }),
                        2 => ("signature-doubled", format!("{}.{}.{}{}", parts[0], parts[1], parts[2], parts[2])),
                        _ => ("signature-zeroed", {
                            let sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
                            format!("{}.{}.{}", parts[0], parts[1], b64(&vec![0u8; sig.len()]))
                        }),
                    }
                }
            };
            if m == *base {
                continue;
            }
            let class = lax_reader_sees_original(&m, base).then_some(Class::CompactSerialization);
            // Surrounding whitespace is trimmed by HTTP itself; everything else changes the token.
            let anchor = class.is_none().then_some(Anchor::Deny);
            self.push(f, format!("{n:03}-{kind}"), &m, class, anchor);
        }
    }
}

fn sec1_of(k: &Key) -> Vec<u8> {
    let j = k.jwk();
    let x = URL_SAFE_NO_PAD.decode(j["x"].as_str().unwrap()).unwrap();
    let y = URL_SAFE_NO_PAD.decode(j["y"].as_str().unwrap()).unwrap();
    [&[4u8][..], &x, &y].concat()
}

fn corpus(now: u64) -> Vec<Case> {
    let mut g = Gen::new(now);
    g.valid();
    g.kids();
    g.wrong_keys();
    g.algs();
    g.headers();
    g.payloads();
    g.duplicates();
    g.audiences();
    g.issuers();
    g.subjects();
    g.huge_numbers();
    g.padding();
    g.sizes();
    g.framing();
    g.mutations();
    // Time-sensitive cases last, closest to the run.
    g.now = unix_now();
    g.time();
    g.cases
}

// ---------------------------------------------------------------------------------------------
// Keep-alive HTTP client
// ---------------------------------------------------------------------------------------------

struct Client {
    port: u16,
    conn: Option<TcpStream>,
    connections: usize,
}

struct Answer {
    status: u16,
    body: Vec<u8>,
}

impl Client {
    fn new(port: u16) -> Client {
        Client { port, conn: None, connections: 0 }
    }

    fn get(&mut self, auth: &[u8]) -> Result<Answer> {
        match self.try_get(auth) {
            Ok(a) => Ok(a),
            // A connection the server closed while idle: once more on a new one.
            Err(_) => {
                self.conn = None;
                self.try_get(auth)
            }
        }
    }

    fn try_get(&mut self, auth: &[u8]) -> Result<Answer> {
        if self.conn.is_none() {
            let s = TcpStream::connect(("127.0.0.1", self.port))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            self.conn = Some(s);
            self.connections += 1;
        }
        let conn = self.conn.as_mut().unwrap();
        let mut req = Vec::with_capacity(auth.len() + 80);
        req.extend_from_slice(b"GET /differential HTTP/1.1\r\nhost: differential.test\r\nauthorization: ");
        req.extend_from_slice(auth);
        req.extend_from_slice(b"\r\n\r\n");
        conn.write_all(&req)?;
        let mut buf = Vec::with_capacity(2048);
        let mut chunk = [0u8; 8192];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = conn.read(&mut chunk)?;
            if n == 0 {
                bail!("connection closed before a response");
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| anyhow!("bad status line: {head}"))?;
        let mut length = None;
        let mut chunked = false;
        let mut close = false;
        for line in head.lines().skip(1) {
            let Some((k, v)) = line.split_once(':') else { continue };
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
            match k.as_str() {
                "content-length" => length = v.parse::<usize>().ok(),
                "transfer-encoding" => chunked = v.contains("chunked"),
                "connection" => close = v.contains("close"),
                _ => {}
            }
        }
        let mut body = buf[head_end..].to_vec();
        if chunked {
            loop {
                if let Some(decoded) = dechunk(&body) {
                    body = decoded;
                    break;
                }
                let n = conn.read(&mut chunk)?;
                if n == 0 {
                    bail!("connection closed inside a chunked body");
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(len) = length {
            while body.len() < len {
                let n = conn.read(&mut chunk)?;
                if n == 0 {
                    bail!("connection closed inside a body");
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(len);
        } else {
            close = true;
            conn.read_to_end(&mut body)?;
        }
        if close {
            self.conn = None;
        }
        Ok(Answer { status, body })
    }
}

/// The body of a complete chunked encoding, or `None` when more bytes are needed.
fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&data[..line_end]).ok()?.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return data.windows(2).any(|w| w == b"\r\n").then_some(out);
        }
        if data.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

/// Listener `jwt_authn`: stock jwt_authn with the same keys, audience and skew, no issuer (a
/// JWT-SVID constrains none), `exp` required; a direct 200 when the token verifies.
fn jwt_authn_listener(jwks: &Value) -> String {
    format!(
        r#"- name: jwt_authn
  address:
    socket_address: {{ address: 127.0.0.1, port_value: 0 }}
  filter_chains:
  - filters:
    - name: envoy.filters.network.http_connection_manager
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
        stat_prefix: jwt_authn
        codec_type: AUTO
        route_config:
          name: jwt_authn
          virtual_hosts:
          - name: jwt_authn
            domains: ["*"]
            routes:
            - match: {{ prefix: "/" }}
              direct_response: {{ status: 200, body: {{ inline_string: "verified" }} }}
        http_filters:
        - name: envoy.filters.http.jwt_authn
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication
            providers:
              svid:
                audiences: [{aud}]
                clock_skew_seconds: {SKEW}
                require_expiration: true
                local_jwks:
                  inline_string: {jwks}
            rules:
            - match: {{ prefix: "/" }}
              requires: {{ provider_name: svid }}
        - name: envoy.filters.http.router
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#,
        aud = yaml_quote(AUD),
        jwks = yaml_quote(&jwks.to_string()),
    )
}

#[derive(Debug, Clone)]
struct Verdict {
    accepted: bool,
    /// mandate: the denial reason; jwt_authn: its reply body.
    why: String,
    status: u16,
}

fn mandate_verdict(a: &Answer) -> Verdict {
    let accepted = a.status == 200 && serde_json::from_slice::<Value>(&a.body).is_ok_and(|v| v["path"].is_string());
    let why = if accepted {
        String::new()
    } else {
        serde_json::from_slice::<Value>(&a.body)
            .ok()
            .and_then(|v| v["reason"].as_str().map(str::to_string))
            .unwrap_or_else(|| format!("status {}: {}", a.status, String::from_utf8_lossy(&a.body).chars().take(80).collect::<String>()))
    };
    Verdict { accepted, why, status: a.status }
}

fn jwt_authn_verdict(a: &Answer) -> Verdict {
    let accepted = a.status == 200 && a.body == b"verified";
    let why = if accepted { String::new() } else { String::from_utf8_lossy(&a.body).chars().take(100).collect() };
    Verdict { accepted, why, status: a.status }
}

#[test]
fn corpus_verdicts_agree_with_stock_jwt_authn_except_named_classes() {
    if !prerequisites("corpus_verdicts_agree_with_stock_jwt_authn_except_named_classes") {
        return;
    }
    let t0 = Instant::now();
    let g = Gen::new(0);
    let example = json!({"keys": [g.k1.jwk(), g.r1.jwk(), g.e384.jwk()], "spiffe_sequence": 1});
    let other = json!({"keys": [g.o1.jwk()], "spiffe_sequence": 1});
    let union = json!({"keys": [g.k1.jwk(), g.r1.jwk(), g.e384.jwk(), g.o1.jwk()]});
    let config = json!({
        "identity": {
            "audiences": [AUD],
            "clock_skew_s": SKEW,
            "max_token_bytes": MAX_TOKEN_BYTES,
            "trust_domains": [
                {"name": "example.org", "bundle": {"inline": example}},
                {"name": "other.org", "bundle": {"inline": other}},
            ],
        },
        "policy": open_policy(),
        // Decision records through filter state only: ~700 log lines help no one.
        "records": {"log": false},
    });
    let echo = MockServer::echo().expect("echo");
    let envoy = Envoy::start(
        "mandate.yaml",
        Vars::new().plugin_config_json(&config).upstream_port(echo.port()).listener_yaml(&jwt_authn_listener(&union)),
    )
    .expect("envoy starts");
    let started = t0.elapsed();

    let cases = corpus(unix_now());
    let generated = t0.elapsed();
    assert!(cases.len() >= 500, "corpus has {} cases", cases.len());
    let mut mandate = Client::new(envoy.listener_port());
    let mut jwt = Client::new(envoy.listener_port_named("jwt_authn"));
    let mut results = Vec::with_capacity(cases.len());
    for case in &cases {
        let m = mandate_verdict(&mandate.get(&case.auth).with_context(|| format!("mandate: {}/{}", case.family, case.name)).unwrap());
        let j = jwt_authn_verdict(&jwt.get(&case.auth).with_context(|| format!("jwt_authn: {}/{}", case.family, case.name)).unwrap());
        results.push((m, j));
    }
    let sent = t0.elapsed();

    // Judge every case.
    let mut failures = Vec::new();
    let mut per_class: BTreeMap<Class, usize> = BTreeMap::new();
    // family → (cases, both accept, both deny, explained disagreements)
    let mut per_family: BTreeMap<&str, [usize; 4]> = BTreeMap::new();
    let mut lenient = 0usize;
    for (case, (m, j)) in cases.iter().zip(&results) {
        let row = per_family.entry(case.family).or_default();
        row[0] += 1;
        let label = format!("{}/{} (mandate: {} {}, jwt_authn: {} {:?})", case.family, case.name,
            if m.accepted { "accept" } else { "deny" }, m.why, if j.accepted { "accept" } else { "deny" }, j.why);
        match case.anchor {
            Some(Anchor::Accept) if !(m.accepted && j.accepted) => failures.push(format!("anchor accept: {label}")),
            Some(Anchor::Deny) if m.accepted || j.accepted => failures.push(format!("anchor deny: {label}")),
            _ => {}
        }
        if m.accepted == j.accepted {
            row[if m.accepted { 1 } else { 2 }] += 1;
            continue;
        }
        if m.accepted {
            lenient += 1;
        }
        let direction = if m.accepted { Direction::MandateLenient } else { Direction::MandateStricter };
        match case.class {
            Some(c) if c.direction() == direction && (direction == Direction::MandateLenient || c.reasons().contains(&m.why.as_str())) => {
                *per_class.entry(c).or_default() += 1;
                row[3] += 1;
            }
            Some(c) => failures.push(format!("disagreement not explained by its class {:?}: {label}", c.name())),
            None => failures.push(format!("unexplained disagreement: {label}")),
        }
    }
    let agreed: usize = per_family.values().map(|r| r[1] + r[2]).sum();
    let both_accept: usize = per_family.values().map(|r| r[1]).sum();
    let both_deny: usize = per_family.values().map(|r| r[2]).sum();
    let explained: usize = per_class.values().sum();

    let mut report = String::new();
    report += &format!("{:<14} {:>6} {:>12} {:>10} {:>10}\n", "family", "cases", "both accept", "both deny", "explained");
    for (f, r) in &per_family {
        report += &format!("{f:<14} {:>6} {:>12} {:>10} {:>10}\n", r[0], r[1], r[2], r[3]);
    }
    report += &format!("{:<14} {:>6} {:>12} {:>10} {:>10}\n", "total", cases.len(), both_accept, both_deny, explained);
    report += &format!("\nagreement: {agreed}/{} ({:.1}%); disagreements: {} ({explained} explained, {} unexplained)\n",
        cases.len(), 100.0 * agreed as f64 / cases.len() as f64, cases.len() - agreed, failures.iter().filter(|f| !f.starts_with("anchor")).count());
    report += "\nexception class                                          disagreements\n";
    for c in Class::ALL {
        report += &format!("{:<56} {:>6}\n", c.name(), per_class.get(&c).copied().unwrap_or(0));
    }
    report += &format!("\nmandate more lenient than jwt_authn: {lenient} case(s)\n");
    let anchors = |a: Anchor| cases.iter().filter(|c| c.anchor == Some(a)).count();
    report += &format!("anchors: {} must be accepted by both, {} denied by both\n", anchors(Anchor::Accept), anchors(Anchor::Deny));
    report += &format!(
        "timing: Envoy ready {:?}, corpus generated {:?}, {} requests sent {:?} ({} + {} connections), total {:?}\n",
        started, generated - started, 2 * cases.len(), sent - generated, mandate.connections, jwt.connections, t0.elapsed()
    );
    eprintln!("{report}");
    if std::env::var_os("MANDATE_DIFFERENTIAL_VERBOSE").is_some() {
        for (case, (m, j)) in cases.iter().zip(&results) {
            eprintln!("{:<12} {:<40} mandate {:>3} {:<22} jwt_authn {:>3} {}", case.family, case.name, m.status, m.why, j.status, j.why);
        }
    }

    // Every request mandate accepted reached the echo, and no other.
    let accepted_by_mandate = results.iter().filter(|(m, _)| m.accepted).count();
    assert_eq!(echo.request_count(), accepted_by_mandate, "the echo saw exactly mandate's accepts");
    assert!(both_accept >= 50 && both_deny >= 200, "too few agreements on each side to mean anything: {both_accept} / {both_deny}");
    assert!(failures.is_empty(), "{} failure(s):\n{}", failures.len(), failures.join("\n"));
    assert!(t0.elapsed() < Duration::from_secs(60), "the differential took {:?}", t0.elapsed());
}
