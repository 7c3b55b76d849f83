//! Signed intent tokens (`x-agent-intent-token`): bound to the caller and to this gateway.

use crate::input::{with_svid_key, Reader};
use crate::NOW;
use mandate_core::policy::intent::IntentVerifier;
use mandate_core::policy::IntentIssuerConfig;
use serde_json::{json, Value};

const ISSUER: &str = "https://intents.example";
const GW: &str = "gw";
const SKEW: u64 = 30;

fn verifier() -> IntentVerifier {
    let jwks = with_svid_key(|k| json!({"keys": [k.jwk()]}));
    let cfg = IntentIssuerConfig { issuer: ISSUER.into(), jwks, audiences: vec![GW.into()] };
    match IntentVerifier::new(&[cfg], SKEW, "policy.intent_issuers") {
        Ok(v) => v,
        Err(e) => panic!("the fuzz intent issuer is refused: {e}"),
    }
}

/// Input: a selector, the caller, NUL, the claims JSON (signed here as `intent+jwt`), NUL,
/// edits of the signed token. A verified intent token names the caller as `sub`, this gateway
/// in `aud`, is within its times and carries only well-formed intents and task; an edited
/// token, a token typed as an SVID, or bytes not signed here never verify.
pub fn intent_token(data: &[u8]) {
    let mut r = Reader::new(data);
    let sel = r.byte();
    let principal = r.text();
    let claims_raw = r.field();
    let ops = r.rest();
    let claims_text = String::from_utf8_lossy(claims_raw);
    let typ = if sel & 1 == 0 { "intent+jwt" } else { "JWT" };
    let token = with_svid_key(|k| k.sign_raw("ES256", &json!({"alg": "ES256", "kid": k.kid, "typ": typ}).to_string(), &claims_text));
    let v = verifier();
    if let Ok(si) = v.verify(token.as_bytes(), &principal, NOW) {
        assert_eq!(typ, "intent+jwt", "an SVID-typed token verified as an intent token");
        let claims: Value = serde_json::from_str(&claims_text).unwrap_or_else(|e| panic!("verified claims are not JSON: {e}"));
        assert_eq!(claims.get("sub").and_then(Value::as_str), Some(principal.as_str()), "not bound to the caller");
        assert_eq!(claims.get("iss").and_then(Value::as_str), Some(ISSUER));
        let aud = claims.get("aud");
        assert!(aud.and_then(Value::as_str) == Some(GW) || aud.and_then(Value::as_array).is_some_and(|a| a.iter().any(|x| x == GW)), "not bound to this gateway");
        assert!(si.exp.saturating_add(SKEW) >= NOW, "expired intent token verified");
        assert!(!si.intents.is_empty());
        for i in &si.intents {
            assert!((1..=128).contains(&i.len()) && i.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)), "intent {i:?}");
        }
        if let Some(t) = &si.task {
            assert!((1..=128).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b)), "task {t:?}");
        }
        assert!(!si.from_txn_token);
        // Another caller cannot use it.
        assert!(v.verify(token.as_bytes(), &format!("{principal}x"), NOW).is_err(), "verified for another caller");
    }
    let edited = crate::jwt::edit(token.as_bytes(), ops);
    if edited != token.as_bytes() {
        assert!(v.verify(&edited, &principal, NOW).is_err(), "an edited intent token verified");
    }
    assert!(v.verify(data, &principal, NOW).is_err(), "bytes not signed here verified as an intent token");
}
