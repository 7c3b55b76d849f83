//! Identity verification tests. Each bad-input test is named after the attack
//! or mistake it models; tokens are built and signed by hand with real keys.

use super::*;
use crate::config::{self, IdentityConfig};
use crate::testkit::{b64, plain_jwks, spiffe_bundle, svid_claims, TestKey};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{json, Value};

const NOW: u64 = 1_800_000_000;
const AUD: &str = "spiffe://example.org/gateway";
const SUB: &str = "spiffe://example.org/ns/prod/sa/agent";

struct Fx {
    key: TestKey,
    other_td_key: TestKey,
    verifier: Verifier,
}

fn identity_config(v: Value) -> IdentityConfig {
    config::parse(json!({ "identity": v }).to_string().as_bytes()).unwrap().identity
}

fn fixture() -> Fx {
    let key = TestKey::es256("k1");
    let other_td_key = TestKey::es256("k-partner");
    let cfg = identity_config(json!({
        "audiences": [AUD],
        "trust_domains": [
            {"name": "example.org", "bundle": {"inline": spiffe_bundle(&[&key], None)}},
            {"name": "partner.net", "bundle": {"inline": plain_jwks(&[&other_td_key])}}
        ]
    }));
    Fx { key, other_td_key, verifier: Verifier::new(&cfg).unwrap() }
}

fn good_claims() -> Value {
    svid_claims(SUB, AUD, NOW - 10, NOW + 300)
}

fn verify(v: &mut Verifier, token: &str) -> Result<Rc<Identity>, Reason> {
    v.verify(token.as_bytes(), NOW)
}

fn expect(v: &mut Verifier, token: &str, want: Reason) {
    assert_eq!(verify(v, token).map(|i| i.principal.clone()), Err(want));
}

fn header(alg: &str, kid: &str) -> Value {
    json!({"alg": alg, "kid": kid, "typ": "JWT"})
}

// ---------- valid shapes ----------

#[test]
fn valid_es256_svid() {
    let mut fx = fixture();
    let t = fx.key.sign(&good_claims());
    let id = verify(&mut fx.verifier, &t).unwrap();
    assert_eq!(id.principal, SUB);
    assert_eq!(id.trust_domain.as_deref(), Some("example.org"));
    assert_eq!(id.kind, IdentityKind::JwtSvid);
    assert!(id.token_hash.starts_with("sha256:") && !t.contains(&id.token_hash[7..]));
}

#[test]
fn valid_array_audience() {
    let mut fx = fixture();
    let t = fx.key.sign(&json!({"sub": SUB, "aud": ["other", AUD], "exp": NOW + 60}));
    assert!(verify(&mut fx.verifier, &t).is_ok());
}

#[test]
fn valid_typ_jose_and_no_typ() {
    let mut fx = fixture();
    let t = fx.key.sign_with_header("ES256", &json!({"alg": "ES256", "kid": "k1", "typ": "JOSE"}), &good_claims());
    assert!(verify(&mut fx.verifier, &t).is_ok());
    let t = fx.key.sign_with_header("ES256", &json!({"alg": "ES256", "kid": "k1"}), &good_claims());
    assert!(verify(&mut fx.verifier, &t).is_ok());
}

#[test]
fn valid_second_trust_domain_with_plain_jwks() {
    let mut fx = fixture();
    let t = fx.other_td_key.sign(&svid_claims("spiffe://partner.net/svc", AUD, NOW, NOW + 60));
    let id = verify(&mut fx.verifier, &t).unwrap();
    assert_eq!(id.trust_domain.as_deref(), Some("partner.net"));
}

#[test]
fn valid_es384_rs_and_ps_families() {
    let ec = TestKey::es384("e384");
    let rsa = TestKey::rsa("r1", 0);
    let cfg = identity_config(json!({
        "audiences": [AUD],
        "trust_domains": [{"name": "example.org", "bundle": {"inline": spiffe_bundle(&[&ec, &rsa], Some(60))}}]
    }));
    let mut v = Verifier::new(&cfg).unwrap();
    let t = ec.sign(&good_claims());
    assert!(v.verify(t.as_bytes(), NOW).is_ok(), "ES384");
    for alg in ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"] {
        let t = rsa.sign_with_header(alg, &header(alg, "r1"), &good_claims());
        assert!(v.verify(t.as_bytes(), NOW).is_ok(), "{alg}");
    }
}

#[test]
fn valid_oidc_token_mapped_by_template() {
    let key = TestKey::rsa("sa-key", 1);
    let cfg = identity_config(json!({
        "oidc_issuers": [{
            "issuer": "https://kubernetes.default.svc",
            "audiences": ["mandate"],
            "jwks": {"inline": plain_jwks(&[&key])},
            "spiffe_template": "spiffe://cluster.local/ns/{sub:2}/sa/{sub:3}"
        }]
    }));
    let mut v = Verifier::new(&cfg).unwrap();
    let claims = json!({"iss": "https://kubernetes.default.svc", "sub": "system:serviceaccount:prod:billing",
        "aud": ["mandate"], "iat": NOW, "exp": NOW + 600});
    let id = v.verify(key.sign(&claims).as_bytes(), NOW).unwrap();
    assert_eq!(id.principal, "spiffe://cluster.local/ns/prod/sa/billing");
    assert_eq!(id.kind, IdentityKind::Oidc);
    // Wrong audience for this issuer.
    let claims = json!({"iss": "https://kubernetes.default.svc", "sub": "system:serviceaccount:prod:billing", "aud": AUD, "exp": NOW + 600});
    assert_eq!(v.verify(key.sign(&claims).as_bytes(), NOW).err(), Some(Reason::AudienceMismatch));
}

#[test]
fn oidc_subject_cannot_inject_path_segments_through_template() {
    let key = TestKey::es256("sa");
    let cfg = identity_config(json!({
        "oidc_issuers": [{"issuer": "https://issuer", "audiences": ["m"], "jwks": {"inline": plain_jwks(&[&key])},
            "spiffe_template": "spiffe://cluster.local/ns/{sub:2}/sa/{sub:3}"}]
    }));
    let mut v = Verifier::new(&cfg).unwrap();
    for sub in ["system:serviceaccount:prod/../admin:x", "system:serviceaccount:a", "system:serviceaccount:..:x"] {
        let t = key.sign(&json!({"iss": "https://issuer", "sub": sub, "aud": "m", "exp": NOW + 60}));
        assert_eq!(v.verify(t.as_bytes(), NOW).err(), Some(Reason::SpiffeIdInvalid), "{sub}");
    }
}

// ---------- header attacks ----------

#[test]
fn alg_none_unsigned_token() {
    let mut fx = fixture();
    let t = format!("{}.{}.", b64(br#"{"alg":"none","kid":"k1"}"#), b64(good_claims().to_string().as_bytes()));
    expect(&mut fx.verifier, &t, Reason::AlgNotAllowed);
}

#[test]
fn alg_none_case_variant() {
    let mut fx = fixture();
    let t = format!("{}.{}.AAAA", b64(br#"{"alg":"None","kid":"k1"}"#), b64(good_claims().to_string().as_bytes()));
    expect(&mut fx.verifier, &t, Reason::AlgNotAllowed);
}

#[test]
fn hs256_signed_with_public_key_as_secret() {
    // The classic key-confusion attack: HMAC keyed with the public key bytes.
    let mut fx = fixture();
    let pubkey = fx.key.jwk().to_string();
    let input = format!("{}.{}", b64(header("HS256", "k1").to_string().as_bytes()), b64(good_claims().to_string().as_bytes()));
    let mac = hmac_sha256(pubkey.as_bytes(), input.as_bytes());
    expect(&mut fx.verifier, &format!("{input}.{}", b64(&mac)), Reason::AlgNotAllowed);
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        let d: [u8; 32] = Sha256::digest(key).into();
        k[..32].copy_from_slice(&d);
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    let inner = Sha256::digest([ipad.as_slice(), msg].concat());
    Sha256::digest([opad.as_slice(), &inner[..]].concat()).to_vec()
}

#[test]
fn eddsa_not_in_svid_alg_list() {
    let mut fx = fixture();
    let t = fx.key.sign_with_header("ES256", &header("EdDSA", "k1"), &good_claims());
    expect(&mut fx.verifier, &t, Reason::AlgNotAllowed);
}

#[test]
fn alg_missing() {
    let mut fx = fixture();
    let t = fx.key.sign_with_header("ES256", &json!({"kid": "k1"}), &good_claims());
    expect(&mut fx.verifier, &t, Reason::AlgNotAllowed);
}

#[test]
fn alg_swapped_to_rsa_on_ec_key() {
    let mut fx = fixture();
    let t = fx.key.sign_with_header("ES256", &header("RS256", "k1"), &good_claims());
    expect(&mut fx.verifier, &t, Reason::SignatureInvalid);
}

#[test]
fn es512_is_never_silently_accepted() {
    let mut fx = fixture();
    let t = fx.key.sign_with_header("ES256", &header("ES512", "k1"), &good_claims());
    expect(&mut fx.verifier, &t, Reason::SignatureInvalid);
}

#[test]
fn typ_access_token_refused() {
    let mut fx = fixture();
    let t = fx.key.sign_with_header("ES256", &json!({"alg": "ES256", "kid": "k1", "typ": "at+jwt"}), &good_claims());
    expect(&mut fx.verifier, &t, Reason::TypNotAllowed);
}

#[test]
fn intent_token_replayed_as_svid_is_refused() {
    // A signed intent token carries `sub` and `aud` too; if its issuer's key is also trusted
    // for SVIDs (one key for both), only its type tells them apart.
    let mut fx = fixture();
    for typ in ["intent+jwt", "application/intent+jwt", "INTENT+JWT"] {
        let t = fx.key.sign_with_header("ES256", &json!({"alg": "ES256", "kid": "k1", "typ": typ}), &good_claims());
        expect(&mut fx.verifier, &t, Reason::TypNotAllowed);
    }
    let t = fx.key.sign_intent(&good_claims());
    expect(&mut fx.verifier, &t, Reason::TypNotAllowed);
}

#[test]
fn crit_header_refused() {
    let mut fx = fixture();
    let t = fx.key.sign_with_header("ES256", &json!({"alg": "ES256", "kid": "k1", "crit": ["exp"]}), &good_claims());
    expect(&mut fx.verifier, &t, Reason::CritNotAllowed);
}

#[test]
fn crit_empty_array_still_refused() {
    let mut fx = fixture();
    let t = fx.key.sign_with_header("ES256", &json!({"alg": "ES256", "kid": "k1", "crit": []}), &good_claims());
    expect(&mut fx.verifier, &t, Reason::CritNotAllowed);
}

#[test]
fn kid_missing() {
    let mut fx = fixture();
    let t = fx.key.sign_with_header("ES256", &json!({"alg": "ES256", "typ": "JWT"}), &good_claims());
    expect(&mut fx.verifier, &t, Reason::KidMissing);
}

#[test]
fn kid_empty() {
    let mut fx = fixture();
    let t = fx.key.sign_with_header("ES256", &header("ES256", ""), &good_claims());
    expect(&mut fx.verifier, &t, Reason::KidMissing);
}

#[test]
fn kid_unknown() {
    let mut fx = fixture();
    let rogue = TestKey::es256("rogue");
    expect(&mut fx.verifier, &rogue.sign(&good_claims()), Reason::KidUnknown);
}

#[test]
fn kid_from_another_trust_domain() {
    // A partner-domain key must never vouch for example.org identities.
    let mut fx = fixture();
    let t = fx.other_td_key.sign(&good_claims());
    expect(&mut fx.verifier, &t, Reason::KidUnknown);
}

#[test]
fn embedded_jwk_header_is_not_trusted() {
    let mut fx = fixture();
    let attacker = TestKey::es256("k1");
    let h = json!({"alg": "ES256", "kid": "k1", "jwk": attacker.jwk()});
    expect(&mut fx.verifier, &attacker.sign_with_header("ES256", &h, &good_claims()), Reason::SignatureInvalid);
}

#[test]
fn jku_and_x5u_headers_are_not_followed() {
    let mut fx = fixture();
    let attacker = TestKey::es256("k1");
    let h = json!({"alg": "ES256", "kid": "k1", "jku": "https://evil.example/jwks", "x5u": "https://evil.example/cert"});
    expect(&mut fx.verifier, &attacker.sign_with_header("ES256", &h, &good_claims()), Reason::SignatureInvalid);
}

#[test]
fn duplicate_alg_in_header() {
    let mut fx = fixture();
    let t = fx.key.sign_raw("ES256", r#"{"alg":"ES256","alg":"none","kid":"k1"}"#, &good_claims().to_string());
    expect(&mut fx.verifier, &t, Reason::TokenMalformed);
}

#[test]
fn header_not_json() {
    let mut fx = fixture();
    let t = fx.key.sign_raw("ES256", "not json", &good_claims().to_string());
    expect(&mut fx.verifier, &t, Reason::TokenMalformed);
}

// ---------- structure attacks ----------

#[test]
fn two_segments() {
    let mut fx = fixture();
    let t = fx.key.sign(&good_claims());
    let two: Vec<&str> = t.split('.').take(2).collect();
    expect(&mut fx.verifier, &two.join("."), Reason::TokenMalformed);
}

#[test]
fn four_segments_jwe_like() {
    let mut fx = fixture();
    let t = format!("{}.extra", fx.key.sign(&good_claims()));
    expect(&mut fx.verifier, &t, Reason::TokenMalformed);
}

#[test]
fn bad_base64_in_payload() {
    let mut fx = fixture();
    let t = fx.key.sign(&good_claims());
    let parts: Vec<&str> = t.split('.').collect();
    expect(&mut fx.verifier, &format!("{}.{}!!.{}", parts[0], parts[1], parts[2]), Reason::TokenMalformed);
}

#[test]
fn padded_base64_refused() {
    let mut fx = fixture();
    let t = fx.key.sign(&good_claims());
    let parts: Vec<&str> = t.split('.').collect();
    expect(&mut fx.verifier, &format!("{}==.{}.{}", parts[0], parts[1], parts[2]), Reason::TokenMalformed);
}

#[test]
fn standard_base64_alphabet_refused() {
    let mut fx = fixture();
    let t = fx.key.sign(&good_claims());
    let parts: Vec<&str> = t.split('.').collect();
    let sig = parts[2].replace('-', "+").replace('_', "/");
    let sig = if sig == parts[2] { format!("{sig}+") } else { sig };
    expect(&mut fx.verifier, &format!("{}.{}.{}", parts[0], parts[1], sig), Reason::TokenMalformed);
}

#[test]
fn empty_signature_segment() {
    let mut fx = fixture();
    let t = fx.key.sign(&good_claims());
    let parts: Vec<&str> = t.split('.').collect();
    expect(&mut fx.verifier, &format!("{}.{}.", parts[0], parts[1]), Reason::TokenMalformed);
}

#[test]
fn one_megabyte_token() {
    let mut fx = fixture();
    let t = format!("{}.{}.sig", b64(header("ES256", "k1").to_string().as_bytes()), "A".repeat(1 << 20));
    expect(&mut fx.verifier, &t, Reason::TokenMalformed);
}

#[test]
fn deeply_nested_json_claims() {
    let mut fx = fixture();
    let nested = format!("{{\"sub\":\"{SUB}\",\"x\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
    let t = fx.key.sign_raw("ES256", &header("ES256", "k1").to_string(), &nested);
    expect(&mut fx.verifier, &t, Reason::TokenMalformed);
}

#[test]
fn duplicate_sub_claim() {
    // One parser reads the first `sub`, another the last: refuse both.
    let mut fx = fixture();
    let claims = format!(r#"{{"sub":"{SUB}","sub":"spiffe://example.org/admin","aud":"{AUD}","exp":{}}}"#, NOW + 60);
    let t = fx.key.sign_raw("ES256", &header("ES256", "k1").to_string(), &claims);
    expect(&mut fx.verifier, &t, Reason::TokenMalformed);
}

// ---------- parser differentials (found by tests/tests/envoy_differential.rs) ----------

/// Signs `claims` (raw JSON) with the standard header.
fn raw_claims(fx: &Fx, claims: &str) -> String {
    fx.key.sign_raw("ES256", &header("ES256", "k1").to_string(), claims)
}

fn base_members() -> String {
    format!(r#""sub":"{SUB}","aud":"{AUD}","exp":{}"#, NOW + 60)
}

#[test]
fn duplicate_unread_claim_smuggled_past_a_last_wins_parser() {
    // mandate never reads `role` or `act`, but the token may travel on (forward_token) to a
    // service whose parser keeps the other duplicate: refuse it, at any depth, as jwt_authn does.
    let mut fx = fixture();
    let base = base_members();
    for extra in [
        r#""role":"user","role":"admin""#,
        r#""act":{"sub":"spiffe://example.org/a","sub":"spiffe://example.org/admin"}"#,
        r#""x":[{"y":{"z":1,"z":2}}]"#,
        r#""role":"admin","role":"user""#,
    ] {
        let t = raw_claims(&fx, &format!("{{{base},{extra}}}"));
        expect(&mut fx.verifier, &t, Reason::TokenMalformed);
    }
    // The same names in different objects are not duplicates.
    let t = raw_claims(&fx, &format!(r#"{{{base},"a":{{"sub":"x"}},"b":[{{"sub":"y"}},{{"sub":"z"}}]}}"#));
    assert!(verify(&mut fx.verifier, &t).is_ok());
}

#[test]
fn header_or_claims_as_a_json_array_read_as_struct_fields() {
    // serde's derived structs also accept an array, field by field in declaration order: a header
    // `["ES256","k1"]` or a claims array [sub, iss, aud, exp, nbf, iat, jti] must not verify.
    let mut fx = fixture();
    let t = fx.key.sign_raw("ES256", r#"["ES256","k1"]"#, &good_claims().to_string());
    expect(&mut fx.verifier, &t, Reason::TokenMalformed);
    let t = fx.key.sign_raw("ES256", r#"["ES256","k1","JWT",null]"#, &good_claims().to_string());
    expect(&mut fx.verifier, &t, Reason::TokenMalformed);
    let claims = format!(r#"["{SUB}","https://issuer.test","{AUD}",{},{},{},"jti-1"]"#, NOW + 60, NOW - 10, NOW - 10);
    let t = raw_claims(&fx, &claims);
    expect(&mut fx.verifier, &t, Reason::TokenMalformed);
}

#[test]
fn duplicate_unread_header_parameter() {
    let mut fx = fixture();
    let t = fx.key.sign_raw("ES256", r#"{"alg":"ES256","kid":"k1","x5t":"a","x5t":"b"}"#, &good_claims().to_string());
    expect(&mut fx.verifier, &t, Reason::TokenMalformed);
}

#[test]
fn invalid_utf8_or_lone_surrogate_in_an_unread_claim() {
    // RFC 8259 §8.1: JSON is UTF-8; an unpaired surrogate escape is no Unicode text either.
    // A parser that skips unread members unchecked accepted what a strict one refuses.
    let mut fx = fixture();
    let base = base_members();
    let latin1 = [format!("{{{base},\"x\":\"").as_bytes(), b"\xe9\"}"].concat();
    let input = format!("{}.{}", b64(header("ES256", "k1").to_string().as_bytes()), b64(&latin1));
    let t = format!("{input}.{}", b64(&fx.key.signature("ES256", input.as_bytes())));
    expect(&mut fx.verifier, &t, Reason::TokenMalformed);
    let t = raw_claims(&fx, &format!(r#"{{{base},"x":"\ud800"}}"#));
    expect(&mut fx.verifier, &t, Reason::TokenMalformed);
    let t = fx.key.sign_raw("ES256", r#"{"alg":"ES256","kid":"k1","x":"\udc00"}"#, &good_claims().to_string());
    expect(&mut fx.verifier, &t, Reason::TokenMalformed);
    // A proper pair is fine.
    let t = raw_claims(&fx, &format!(r#"{{{base},"x":"\ud83d\ude00"}}"#));
    assert!(verify(&mut fx.verifier, &t).is_ok());
}

#[test]
fn json_nesting_bomb_below_the_size_limit() {
    // 1000 levels fit in a few KB: deeper than any parser downstream should be asked to go.
    let mut fx = fixture();
    let base = base_members();
    let nested = |levels: usize| format!("{{{base},\"x\":{}1{}}}", "[".repeat(levels), "]".repeat(levels));
    for levels in [64, 99, 1000] {
        let t = raw_claims(&fx, &nested(levels));
        expect(&mut fx.verifier, &t, Reason::TokenMalformed);
    }
    // The claims object plus 63 levels: the most accepted.
    let t = raw_claims(&fx, &nested(63));
    assert!(verify(&mut fx.verifier, &t).is_ok());
}

#[test]
fn out_of_range_number_in_an_unread_claim() {
    let mut fx = fixture();
    let t = raw_claims(&fx, &format!(r#"{{{},"big":1e400}}"#, base_members()));
    expect(&mut fx.verifier, &t, Reason::TokenMalformed);
}

#[test]
fn null_registered_claim_read_as_absent() {
    // `"nbf": null` is not "no nbf": a null registered member is malformed, never skipped.
    let mut fx = fixture();
    for member in ["nbf", "iat", "iss", "jti", "sub", "aud", "exp"] {
        let mut c = good_claims();
        c[member] = Value::Null;
        let t = fx.key.sign(&c);
        expect(&mut fx.verifier, &t, Reason::TokenMalformed);
    }
    for (param, want) in [("typ", Reason::TokenMalformed), ("kid", Reason::TokenMalformed), ("alg", Reason::TokenMalformed), ("crit", Reason::CritNotAllowed)] {
        let mut h = header("ES256", "k1");
        h[param] = Value::Null;
        let t = fx.key.sign_with_header("ES256", &h, &good_claims());
        expect(&mut fx.verifier, &t, want);
    }
}

#[test]
fn numeric_date_beyond_exact_double_range() {
    // 2^64 - 1 is an exact u64 but a double-based parser reads 2^64 (Envoy's jwt_authn refuses
    // it, JavaScript rounds it): NumericDates stop at 2^53 - 1, where all parsers agree.
    let mut fx = fixture();
    for exp in ["18446744073709551615", "9223372036854775808", "9007199254740993", "9007199254740992"] {
        let t = raw_claims(&fx, &format!(r#"{{"sub":"{SUB}","aud":"{AUD}","exp":{exp}}}"#));
        expect(&mut fx.verifier, &t, Reason::TokenMalformed);
    }
    let t = raw_claims(&fx, &format!(r#"{{"sub":"{SUB}","aud":"{AUD}","exp":{}}}"#, jws::MAX_NUMERIC_DATE));
    assert!(verify(&mut fx.verifier, &t).is_ok());
    for fraction in [format!("{}.5", NOW + 60), format!("{}e0", NOW + 60), format!("{}.0", NOW + 60)] {
        let t = raw_claims(&fx, &format!(r#"{{"sub":"{SUB}","aud":"{AUD}","exp":{fraction}}}"#));
        expect(&mut fx.verifier, &t, Reason::TokenMalformed);
    }
}

#[test]
fn claims_not_an_object() {
    let mut fx = fixture();
    let t = fx.key.sign_raw("ES256", &header("ES256", "k1").to_string(), "[1,2,3]");
    expect(&mut fx.verifier, &t, Reason::TokenMalformed);
}

#[test]
fn exp_as_string() {
    let mut fx = fixture();
    let t = fx.key.sign(&json!({"sub": SUB, "aud": AUD, "exp": (NOW + 60).to_string()}));
    expect(&mut fx.verifier, &t, Reason::TokenMalformed);
}

#[test]
fn non_utf8_token_bytes() {
    let mut fx = fixture();
    assert_eq!(fx.verifier.verify(&[0xff, 0xfe, b'.', b'a', b'.', b'b'], NOW).err(), Some(Reason::TokenMalformed));
}

// ---------- signature attacks ----------

#[test]
fn signature_from_wrong_key_same_kid() {
    let mut fx = fixture();
    let forger = TestKey::es256("k1");
    expect(&mut fx.verifier, &forger.sign(&good_claims()), Reason::SignatureInvalid);
}

#[test]
fn payload_tampered_after_signing() {
    let mut fx = fixture();
    let t = fx.key.sign(&good_claims());
    let parts: Vec<&str> = t.split('.').collect();
    let evil = b64(svid_claims("spiffe://example.org/admin", AUD, NOW, NOW + 60).to_string().as_bytes());
    expect(&mut fx.verifier, &format!("{}.{}.{}", parts[0], evil, parts[2]), Reason::SignatureInvalid);
}

#[test]
fn signature_truncated() {
    let mut fx = fixture();
    let t = fx.key.sign(&good_claims());
    expect(&mut fx.verifier, &t[..t.len() - 8], Reason::SignatureInvalid);
}

#[test]
fn weak_rsa_key_in_bundle_refused_at_load() {
    let weak = TestKey::rsa("weak", 99);
    let raw = serde_json::to_vec(&plain_jwks(&[&weak])).unwrap();
    assert!(matches!(jwks::parse_bundle(&raw), Err(jwks::BundleError::BadKey { .. })));
}

#[test]
fn symmetric_key_in_bundle_refused_at_load() {
    let raw = br#"{"keys":[{"kty":"oct","kid":"h","k":"c2VjcmV0"}]}"#;
    assert!(jwks::parse_bundle(raw).is_err());
}

#[test]
fn x509_svid_keys_are_ignored_for_jwts() {
    let key = TestKey::es256("x");
    let mut jwk = key.jwk();
    jwk["use"] = json!("x509-svid");
    let raw = serde_json::to_vec(&json!({"keys": [jwk]})).unwrap();
    let b = jwks::parse_bundle(&raw).unwrap();
    assert!(b.key("x").is_none());
}

#[test]
fn key_pinned_to_other_alg_refuses_token() {
    let rsa = TestKey::rsa("r", 0);
    let mut jwk = rsa.svid_jwk();
    jwk["alg"] = json!("PS256");
    let cfg = identity_config(json!({"audiences": [AUD],
        "trust_domains": [{"name": "example.org", "bundle": {"inline": {"keys": [jwk]}}}]}));
    let mut v = Verifier::new(&cfg).unwrap();
    let t = rsa.sign_with_header("RS256", &header("RS256", "r"), &good_claims());
    assert_eq!(v.verify(t.as_bytes(), NOW).err(), Some(Reason::SignatureInvalid));
    let t = rsa.sign_with_header("PS256", &header("PS256", "r"), &good_claims());
    assert!(v.verify(t.as_bytes(), NOW).is_ok());
}

// ---------- claim attacks ----------

#[test]
fn expired_token() {
    let mut fx = fixture();
    expect(&mut fx.verifier, &fx.key.sign(&svid_claims(SUB, AUD, NOW - 600, NOW - 31)), Reason::TokenExpired);
}

#[test]
fn expired_within_skew_is_accepted() {
    let mut fx = fixture();
    assert!(verify(&mut fx.verifier, &fx.key.sign(&svid_claims(SUB, AUD, NOW - 600, NOW - 29))).is_ok());
}

#[test]
fn nbf_in_the_future() {
    let mut fx = fixture();
    let t = fx.key.sign(&json!({"sub": SUB, "aud": AUD, "exp": NOW + 600, "nbf": NOW + 120}));
    expect(&mut fx.verifier, &t, Reason::TokenNotYetValid);
}

#[test]
fn iat_in_the_future() {
    let mut fx = fixture();
    expect(&mut fx.verifier, &fx.key.sign(&svid_claims(SUB, AUD, NOW + 120, NOW + 600)), Reason::IssuedInFuture);
}

#[test]
fn missing_exp() {
    let mut fx = fixture();
    expect(&mut fx.verifier, &fx.key.sign(&json!({"sub": SUB, "aud": AUD})), Reason::ExpMissing);
}

#[test]
fn missing_aud() {
    let mut fx = fixture();
    expect(&mut fx.verifier, &fx.key.sign(&json!({"sub": SUB, "exp": NOW + 60})), Reason::AudienceMissing);
}

#[test]
fn missing_sub() {
    let mut fx = fixture();
    expect(&mut fx.verifier, &fx.key.sign(&json!({"aud": AUD, "exp": NOW + 60})), Reason::SubjectMissing);
}

#[test]
fn audience_mismatch() {
    let mut fx = fixture();
    expect(&mut fx.verifier, &fx.key.sign(&svid_claims(SUB, "spiffe://example.org/other", NOW, NOW + 60)), Reason::AudienceMismatch);
}

#[test]
fn empty_audience_array() {
    let mut fx = fixture();
    expect(&mut fx.verifier, &fx.key.sign(&json!({"sub": SUB, "aud": [], "exp": NOW + 60})), Reason::AudienceMismatch);
}

#[test]
fn subject_uppercase_trust_domain() {
    let mut fx = fixture();
    expect(&mut fx.verifier, &fx.key.sign(&svid_claims("spiffe://Example.org/a", AUD, NOW, NOW + 60)), Reason::SpiffeIdInvalid);
}

#[test]
fn subject_with_port() {
    let mut fx = fixture();
    expect(&mut fx.verifier, &fx.key.sign(&svid_claims("spiffe://example.org:443/a", AUD, NOW, NOW + 60)), Reason::SpiffeIdInvalid);
}

#[test]
fn subject_with_query() {
    let mut fx = fixture();
    expect(&mut fx.verifier, &fx.key.sign(&svid_claims("spiffe://example.org/a?admin=1", AUD, NOW, NOW + 60)), Reason::SpiffeIdInvalid);
}

#[test]
fn subject_with_dot_segments() {
    let mut fx = fixture();
    expect(&mut fx.verifier, &fx.key.sign(&svid_claims("spiffe://example.org/a/../admin", AUD, NOW, NOW + 60)), Reason::SpiffeIdInvalid);
}

#[test]
fn subject_percent_encoded() {
    let mut fx = fixture();
    expect(&mut fx.verifier, &fx.key.sign(&svid_claims("spiffe://example.org/%61dmin", AUD, NOW, NOW + 60)), Reason::SpiffeIdInvalid);
}

#[test]
fn subject_2049_bytes() {
    let mut fx = fixture();
    let base = "spiffe://example.org/";
    let sub = format!("{base}{}", "a".repeat(2049 - base.len()));
    expect(&mut fx.verifier, &fx.key.sign(&svid_claims(&sub, AUD, NOW, NOW + 60)), Reason::SpiffeIdInvalid);
}

#[test]
fn subject_not_spiffe_scheme() {
    let mut fx = fixture();
    expect(&mut fx.verifier, &fx.key.sign(&svid_claims("https://example.org/a", AUD, NOW, NOW + 60)), Reason::SpiffeIdInvalid);
}

#[test]
fn unknown_trust_domain() {
    let mut fx = fixture();
    let k = TestKey::es256("k1");
    expect(&mut fx.verifier, &k.sign(&svid_claims("spiffe://evil.org/a", AUD, NOW, NOW + 60)), Reason::TrustDomainUnknown);
}

#[test]
fn trust_domain_suffix_confusion() {
    let mut fx = fixture();
    expect(&mut fx.verifier, &fx.key.sign(&svid_claims("spiffe://example.org.evil.net/a", AUD, NOW, NOW + 60)), Reason::TrustDomainUnknown);
}

#[test]
fn issuer_claim_cannot_select_oidc_keys_for_svid() {
    // A token naming an unconfigured issuer is judged as an SVID: its sub's domain decides.
    let mut fx = fixture();
    let k = TestKey::es256("k1");
    let t = k.sign(&json!({"iss": "https://evil", "sub": SUB, "aud": AUD, "exp": NOW + 60}));
    expect(&mut fx.verifier, &t, Reason::SignatureInvalid);
}

// ---------- bundles ----------

#[test]
fn empty_bundle_refuses_every_svid() {
    let key = TestKey::es256("k1");
    let cfg = identity_config(json!({"audiences": [AUD],
        "trust_domains": [{"name": "example.org", "bundle": {"inline": {"keys": []}}}]}));
    let mut v = Verifier::new(&cfg).unwrap();
    assert_eq!(v.verify(key.sign(&good_claims()).as_bytes(), NOW).err(), Some(Reason::KidUnknown));
}

fn remote_fixture() -> (TestKey, Verifier) {
    let key = TestKey::es256("k1");
    let cfg = identity_config(json!({"audiences": [AUD],
        "trust_domains": [{"name": "example.org", "bundle": {"cluster": "spire", "path": "/bundle", "refresh_s": 300, "retry_s": 10}}]}));
    (key, Verifier::new(&cfg).unwrap())
}

#[test]
fn no_bundle_yet_refuses() {
    let (key, mut v) = remote_fixture();
    assert_eq!(v.verify(key.sign(&good_claims()).as_bytes(), NOW).err(), Some(Reason::BundleUnavailable));
}

#[test]
fn fetch_schedule_follows_refresh_hint_and_retry() {
    let (key, mut v) = remote_fixture();
    let plans = v.bundles.due_fetches(NOW);
    assert_eq!(plans.len(), 1);
    assert_eq!(plans[0].cluster, "spire");
    assert_eq!(plans[0].path, "/bundle");
    assert!(v.bundles.due_fetches(NOW).is_empty(), "in flight: no duplicate fetch");
    let body = serde_json::to_vec(&spiffe_bundle(&[&key], Some(60))).unwrap();
    let r = v.bundles.on_fetch(plans[0].source, Ok(&body), NOW).unwrap();
    assert!(matches!(r, bundles::FetchReport::Updated { keys: 1, .. }));
    assert!(v.verify(key.sign(&good_claims()).as_bytes(), NOW).is_ok());
    assert!(v.bundles.due_fetches(NOW + 59).is_empty());
    let plans = v.bundles.due_fetches(NOW + 60);
    assert_eq!(plans.len(), 1, "refresh at the hint");
    // A failed fetch keeps the last good bundle and retries after retry_s.
    let r = v.bundles.on_fetch(plans[0].source, Err("503".into()), NOW + 60).unwrap();
    assert!(matches!(r, bundles::FetchReport::Failed { kept_previous: true, .. }));
    assert!(v.verify(key.sign(&svid_claims(SUB, AUD, NOW + 60, NOW + 300)).as_bytes(), NOW + 61).is_ok());
    assert!(v.bundles.due_fetches(NOW + 69).is_empty());
    assert_eq!(v.bundles.due_fetches(NOW + 70).len(), 1);
}

#[test]
fn garbage_bundle_keeps_previous() {
    let (key, mut v) = remote_fixture();
    let p = v.bundles.due_fetches(NOW);
    let body = serde_json::to_vec(&spiffe_bundle(&[&key], None)).unwrap();
    v.bundles.on_fetch(p[0].source, Ok(&body), NOW);
    let p = v.bundles.due_fetches(NOW + 300);
    let r = v.bundles.on_fetch(p[0].source, Ok(b"<html>oops</html>"), NOW + 300).unwrap();
    assert!(matches!(r, bundles::FetchReport::Failed { kept_previous: true, .. }));
    assert!(v.verify(key.sign(&svid_claims(SUB, AUD, NOW + 300, NOW + 600)).as_bytes(), NOW + 301).is_ok());
}

fn bundle_with(keys: &[&TestKey], sequence: Option<u64>) -> Vec<u8> {
    let mut b = spiffe_bundle(keys, None);
    match sequence {
        Some(n) => b["spiffe_sequence"] = json!(n),
        None => {
            b.as_object_mut().unwrap().remove("spiffe_sequence");
        }
    }
    serde_json::to_vec(&b).unwrap()
}

#[test]
fn bundle_rollback_to_older_sequence_is_refused() {
    // The attacker replays an old bundle (sequence 7) that still holds the key withdrawn
    // at sequence 8: the held bundle stays, the fetch counts as failed.
    let (current, mut v) = remote_fixture();
    let withdrawn = TestKey::es256("old");
    let p = v.bundles.due_fetches(NOW);
    v.bundles.on_fetch(p[0].source, Ok(&bundle_with(&[&current], Some(8))), NOW).unwrap();
    let p = v.bundles.due_fetches(NOW + 300);
    let r = v.bundles.on_fetch(p[0].source, Ok(&bundle_with(&[&current, &withdrawn], Some(7))), NOW + 300).unwrap();
    match r {
        bundles::FetchReport::Failed { error, kept_previous, .. } => {
            assert!(error.contains("rollback") && error.contains('7') && error.contains('8'), "{error}");
            assert!(kept_previous);
        }
        other => panic!("rollback accepted: {other:?}"),
    }
    assert_eq!(v.bundles.sources()[0].fetches_failed, 1);
    let old = withdrawn.sign(&svid_claims(SUB, AUD, NOW + 300, NOW + 600));
    assert_eq!(v.verify(old.as_bytes(), NOW + 301).err(), Some(Reason::KidUnknown), "the withdrawn key stays withdrawn");
    assert!(v.verify(current.sign(&svid_claims(SUB, AUD, NOW + 300, NOW + 600)).as_bytes(), NOW + 301).is_ok());
    // Dropping the sequence altogether is a rollback too.
    let p = v.bundles.due_fetches(NOW + 310);
    let r = v.bundles.on_fetch(p[0].source, Ok(&bundle_with(&[&current, &withdrawn], None)), NOW + 310).unwrap();
    assert!(matches!(r, bundles::FetchReport::Failed { kept_previous: true, .. }), "{r:?}");
    // The same sequence again, and a newer one, are accepted.
    let p = v.bundles.due_fetches(NOW + 320);
    assert!(matches!(v.bundles.on_fetch(p[0].source, Ok(&bundle_with(&[&current], Some(8))), NOW + 320), Some(bundles::FetchReport::Unchanged { .. })));
    let p = v.bundles.due_fetches(NOW + 620);
    let r = v.bundles.on_fetch(p[0].source, Ok(&bundle_with(&[&withdrawn], Some(9))), NOW + 620).unwrap();
    assert!(matches!(r, bundles::FetchReport::Updated { keys: 1, .. }), "{r:?}");
}

#[test]
fn stale_bundle_stops_verifying_after_max_age() {
    // The bundle endpoint goes down (or is blocked by the attacker) after one good fetch:
    // the last good bundle must not be trusted forever.
    let key = TestKey::es256("k1");
    let cfg = identity_config(json!({"audiences": [AUD],
        "trust_domains": [{"name": "example.org", "bundle": {"cluster": "spire", "refresh_s": 300, "retry_s": 10, "max_bundle_age_s": 900}}]}));
    let mut v = Verifier::new(&cfg).unwrap();
    let p = v.bundles.due_fetches(NOW);
    v.bundles.on_fetch(p[0].source, Ok(&bundle_with(&[&key], Some(1))), NOW);
    let token = key.sign(&svid_claims(SUB, AUD, NOW + 800, NOW + 2000));
    assert!(v.verify(token.as_bytes(), NOW + 850).is_ok(), "fresh enough");
    let p = v.bundles.due_fetches(NOW + 860);
    let r = v.bundles.on_fetch(p[0].source, Err("503".into()), NOW + 860).unwrap();
    assert!(matches!(r, bundles::FetchReport::Failed { kept_previous: true, .. }));
    assert!(v.verify(token.as_bytes(), NOW + 900).is_ok(), "a cached verification until the bundle is too old");
    assert_eq!(v.verify(token.as_bytes(), NOW + 901).err(), Some(Reason::BundleUnavailable), "cached verification refused too");
    let fresh = key.sign(&svid_claims(SUB, AUD, NOW + 900, NOW + 2000));
    assert_eq!(v.verify(fresh.as_bytes(), NOW + 901).err(), Some(Reason::BundleUnavailable));
    let p = v.bundles.due_fetches(NOW + 910);
    let r = v.bundles.on_fetch(p[0].source, Err("503".into()), NOW + 910).unwrap();
    assert!(matches!(r, bundles::FetchReport::Failed { kept_previous: false, .. }), "reported as no usable bundle");
    // The endpoint is back: the same bundle, confirmed, verifies again.
    let p = v.bundles.due_fetches(NOW + 920);
    v.bundles.on_fetch(p[0].source, Ok(&bundle_with(&[&key], Some(1))), NOW + 920);
    assert!(v.verify(fresh.as_bytes(), NOW + 921).is_ok());
}

#[test]
fn unchanged_bundle_fetches_keep_it_fresh_and_default_age_is_an_hour() {
    let (key, mut v) = remote_fixture();
    let mut t = NOW;
    let token = |now: u64| key.sign(&svid_claims(SUB, AUD, now, now + 60));
    for _ in 0..20 {
        let p = v.bundles.due_fetches(t);
        v.bundles.on_fetch(p[0].source, Ok(&bundle_with(&[&key], Some(1))), t);
        assert!(v.verify(token(t).as_bytes(), t + 1).is_ok());
        t += 300;
    }
    let last_good = t - 300;
    assert!(v.verify(token(last_good + 3600).as_bytes(), last_good + 3600).is_ok());
    assert_eq!(v.verify(token(last_good + 3601).as_bytes(), last_good + 3601).err(), Some(Reason::BundleUnavailable));
}

#[test]
fn inline_bundle_never_ages() {
    let mut fx = fixture();
    let later = NOW + 365 * 86_400;
    assert!(fx.verifier.verify(fx.key.sign(&svid_claims(SUB, AUD, later, later + 60)).as_bytes(), later).is_ok());
}

#[test]
fn config_bounds_max_bundle_age() {
    let err = |bundle: Value| {
        config::parse(json!({"identity": {"audiences": ["a"], "trust_domains": [{"name": "example.org", "bundle": bundle}]}}).to_string().as_bytes())
            .unwrap_err()
            .field
    };
    let field = "identity.trust_domains[0].bundle.max_bundle_age_s";
    assert_eq!(err(json!({"cluster": "c", "max_bundle_age_s": 59})), field);
    assert_eq!(err(json!({"cluster": "c", "max_bundle_age_s": 604_801})), field);
    assert_eq!(err(json!({"cluster": "c", "refresh_s": 600, "max_bundle_age_s": 600})), field, "stale before its refresh");
    assert_eq!(err(json!({"cluster": "c", "refresh_s": 7200})), field, "the default (3600) must exceed refresh_s too");
    assert_eq!(err(json!({"inline": {"keys": []}, "max_bundle_age_s": 600})), field, "inline bundles never age");
    let ok = json!({"identity": {"audiences": ["a"], "trust_domains": [{"name": "example.org", "bundle": {"cluster": "c", "max_bundle_age_s": 604_800}}]}});
    assert!(config::parse(ok.to_string().as_bytes()).is_ok());
}

// ---------- cache ----------

#[test]
fn cache_hits_until_exp_then_expires() {
    let mut fx = fixture();
    let t = fx.key.sign(&svid_claims(SUB, AUD, NOW, NOW + 100));
    assert!(fx.verifier.verify(t.as_bytes(), NOW).is_ok());
    assert!(fx.verifier.verify(t.as_bytes(), NOW + 50).is_ok());
    assert_eq!(fx.verifier.stats, IdentityStats { cache_hits: 1, cache_misses: 1 });
    assert_eq!(fx.verifier.verify(t.as_bytes(), NOW + 131).err(), Some(Reason::TokenExpired));
    assert_eq!(fx.verifier.cache_len(), 0);
}

#[test]
fn cache_dropped_when_bundle_rotates() {
    let (key, mut v) = remote_fixture();
    let p = v.bundles.due_fetches(NOW);
    v.bundles.on_fetch(p[0].source, Ok(&serde_json::to_vec(&spiffe_bundle(&[&key], None)).unwrap()), NOW);
    let t = key.sign(&good_claims());
    assert!(v.verify(t.as_bytes(), NOW).is_ok());
    assert!(v.verify(t.as_bytes(), NOW).is_ok());
    assert_eq!(v.stats.cache_hits, 1);
    // The key is removed from the bundle (revoked): the cached verification must not survive.
    let p = v.bundles.due_fetches(NOW + 300);
    v.bundles.on_fetch(p[0].source, Ok(br#"{"keys":[],"spiffe_sequence":2}"#), NOW + 300);
    assert_eq!(v.verify(t.as_bytes(), NOW + 300).err(), Some(Reason::KidUnknown));
}

#[test]
fn cache_is_bounded() {
    let key = TestKey::es256("k1");
    let cfg = identity_config(json!({"audiences": [AUD], "cache_size": 3,
        "trust_domains": [{"name": "example.org", "bundle": {"inline": spiffe_bundle(&[&key], None)}}]}));
    let mut v = Verifier::new(&cfg).unwrap();
    for i in 0..10 {
        let t = key.sign(&svid_claims(&format!("{SUB}{i}"), AUD, NOW, NOW + 60));
        assert!(v.verify(t.as_bytes(), NOW).is_ok());
    }
    assert_eq!(v.cache_len(), 3);
}

#[test]
fn failed_verifications_are_not_cached() {
    let mut fx = fixture();
    let forger = TestKey::es256("k1");
    let t = forger.sign(&good_claims());
    for _ in 0..3 {
        assert_eq!(verify(&mut fx.verifier, &t).err(), Some(Reason::SignatureInvalid));
    }
    assert_eq!(fx.verifier.cache_len(), 0);
}

// ---------- configuration ----------

#[test]
fn config_refuses_bad_inline_bundle_naming_field() {
    let e = config::parse(br#"{"identity":{"audiences":["a"],"trust_domains":[{"name":"example.org","bundle":{"inline":{"keys":[{"kty":"oct","kid":"x","k":"AA"}]}}}]}}"#).unwrap_err();
    assert_eq!(e.field, "identity.trust_domains[0].bundle.inline");
}

#[test]
fn config_refuses_bad_trust_domain_name() {
    let e = config::parse(br#"{"identity":{"audiences":["a"],"trust_domains":[{"name":"Example.org","bundle":{"cluster":"c"}}]}}"#).unwrap_err();
    assert_eq!(e.field, "identity.trust_domains[0].name");
}

#[test]
fn config_requires_audience_for_svids() {
    let e = config::parse(br#"{"identity":{"trust_domains":[{"name":"example.org","bundle":{"cluster":"c"}}]}}"#).unwrap_err();
    assert_eq!(e.field, "identity.audiences");
}

#[test]
fn config_refuses_bad_template() {
    let e = config::parse(br#"{"identity":{"oidc_issuers":[{"issuer":"i","audiences":["a"],"jwks":{"cluster":"c"},"spiffe_template":"spiffe://X/{sub}"}]}}"#).unwrap_err();
    assert_eq!(e.field, "identity.oidc_issuers[0].spiffe_template");
}

// ---------- host crypto (Envoy's verify_signature) gives the same verdicts ----------

#[test]
fn host_crypto_path_agrees_with_pure_rust() {
    use super::host_crypto::tests::fake_envoy;
    let es = TestKey::es256("es");
    let rsa = TestKey::rsa("rsa", 0);
    let cfg = identity_config(json!({"audiences": [AUD], "cache_size": 0,
        "trust_domains": [{"name": "example.org", "bundle": {"inline": spiffe_bundle(&[&es, &rsa], None)}}]}));
    let calls = Rc::new(std::cell::Cell::new(0));
    let mut host = Verifier::new(&cfg).unwrap();
    let counted = calls.clone();
    host.set_host_verify(Some(Rc::new(move |req: &[u8]| {
        counted.set(counted.get() + 1);
        fake_envoy(req)
    })));
    let mut pure = Verifier::new(&cfg).unwrap();
    let claims = good_claims();
    let forged_es = TestKey::es256("es").sign(&claims);
    let good_es = es.sign(&claims);
    let truncated = good_es[..good_es.len() - 4].to_string();
    let tokens = vec![
        good_es.clone(),
        forged_es,
        truncated,
        rsa.sign_with_header("RS256", &header("RS256", "rsa"), &claims),
        rsa.sign_with_header("RS512", &header("RS512", "rsa"), &claims),
        rsa.sign_with_header("PS256", &header("PS256", "rsa"), &claims),
        TestKey::rsa("rsa", 1).sign_with_header("RS256", &header("RS256", "rsa"), &claims),
    ];
    for t in &tokens {
        let a = host.verify(t.as_bytes(), NOW).map(|i| i.principal.clone());
        let b = pure.verify(t.as_bytes(), NOW).map(|i| i.principal.clone());
        assert_eq!(a, b, "host and pure-Rust verdicts differ");
    }
    assert!(calls.get() >= 5, "ES256 and RS* went to the host ({} calls)", calls.get());
}

#[test]
fn host_crypto_that_says_yes_to_everything_is_caught_by_the_self_test() {
    assert!(!super::host_crypto::self_test(&|_| Some(vec![0x08, 0x01])));
}

// ---------- ES384 (SPIRE's ec-p384) through the host's crypto ----------

/// A verifier whose host crypto is `fake_envoy`, counting the calls and the hashes asked for.
fn host_verifier(keys: &[&TestKey]) -> (Verifier, Rc<std::cell::RefCell<Vec<String>>>) {
    use super::host_crypto::tests::fake_envoy;
    let cfg = identity_config(json!({"audiences": [AUD], "cache_size": 0,
        "trust_domains": [{"name": "example.org", "bundle": {"inline": spiffe_bundle(keys, None)}}]}));
    let mut v = Verifier::new(&cfg).unwrap();
    let hashes = Rc::new(std::cell::RefCell::new(Vec::new()));
    let seen = hashes.clone();
    v.set_host_verify(Some(Rc::new(move |req: &[u8]| {
        // Field 1 of VerifySignatureArguments: the hash name.
        let len = usize::from(req[1]);
        seen.borrow_mut().push(String::from_utf8_lossy(&req[2..2 + len]).into_owned());
        fake_envoy(req)
    })));
    (v, hashes)
}

#[test]
fn es384_svid_is_checked_by_the_host_with_sha384() {
    let p384 = TestKey::es384("p384");
    let (mut v, hashes) = host_verifier(&[&p384]);
    let good = p384.sign(&good_claims());
    assert!(v.verify(good.as_bytes(), NOW).is_ok(), "ES384 from a P-384 bundle key");
    assert_eq!(hashes.borrow().as_slice(), ["sha384"], "the host checked it, with SHA-384");
    let forged = TestKey::es384("p384").sign(&good_claims());
    assert_eq!(v.verify(forged.as_bytes(), NOW).err(), Some(Reason::SignatureInvalid), "another P-384 key, same kid");
}

#[test]
fn es384_signature_of_the_wrong_length_is_refused_not_padded() {
    let p384 = TestKey::es384("p384");
    let (mut v, _) = host_verifier(&[&p384]);
    let good = p384.sign(&good_claims());
    let (input, sig) = good.rsplit_once('.').unwrap();
    let raw = URL_SAFE_NO_PAD.decode(sig).unwrap();
    // An ES256-sized (64-byte) signature under an ES384 header, and a truncated one.
    for cut in [&raw[..64], &raw[..95]] {
        let t = format!("{input}.{}", URL_SAFE_NO_PAD.encode(cut));
        assert_eq!(v.verify(t.as_bytes(), NOW).err(), Some(Reason::SignatureInvalid));
    }
}

#[test]
fn p384_key_cannot_verify_an_es256_header_nor_p256_an_es384_one() {
    let p384 = TestKey::es384("k384");
    let p256 = TestKey::es256("k256");
    let (mut v, hashes) = host_verifier(&[&p384, &p256]);
    let claims = good_claims();
    // Alg swap: the P-384 key's kid with an ES256 header (signed by the P-256 key), and back.
    let swapped_down = p256.sign_with_header("ES256", &header("ES256", "k384"), &claims);
    let swapped_up = p384.sign_with_header("ES384", &header("ES384", "k256"), &claims);
    for t in [swapped_down, swapped_up] {
        let r = v.verify(t.as_bytes(), NOW);
        assert!(r.is_err(), "alg/key mismatch accepted");
    }
    assert!(hashes.borrow().is_empty(), "refused before any signature check");
    // Each key still verifies its own algorithm.
    assert!(v.verify(p384.sign(&claims).as_bytes(), NOW).is_ok());
    assert!(v.verify(p256.sign(&claims).as_bytes(), NOW).is_ok());
}

#[test]
fn p384_spki_is_what_a_der_parser_reads() {
    use p384::pkcs8::DecodePublicKey;
    let k = TestKey::es384("k");
    let jwk = k.jwk();
    let d = |v: &serde_json::Value| URL_SAFE_NO_PAD.decode(v.as_str().unwrap()).unwrap();
    let spki = super::host_crypto::spki_p384(&d(&jwk["x"]), &d(&jwk["y"]));
    let parsed = p384::PublicKey::from_public_key_der(&spki).unwrap();
    assert_eq!(parsed.to_sec1_bytes().len(), 97);
}
