//! Delegation: Transaction Tokens from the minter, verified and read strictly.

use crate::input::{with_svid_key, with_txn_key, Reader};
use crate::jwt::{AUD, TD};
use crate::NOW;
use mandate_core::config;
use mandate_core::delegation::verify::DelegationVerifier;
use mandate_core::identity::spiffe_id::SpiffeId;
use mandate_core::identity::Verifier;
use serde_json::json;

pub const ISS: &str = "https://minter.example";

fn verifiers() -> (Verifier, DelegationVerifier) {
    let svid = with_svid_key(|k| json!({"keys": [k.svid_jwk()]}));
    let txn = with_txn_key(|k| json!({"keys": [k.jwk()]}));
    let raw = json!({
        "identity": {"audiences": [AUD], "trust_domains": [{"name": TD, "bundle": {"inline": svid}}]},
        "delegation": {"issuer": ISS, "audience": TD, "keys": {"inline": txn}}
    });
    let cfg = match config::parse(raw.to_string().as_bytes()) {
        Ok(c) => c,
        Err(e) => panic!("the fuzz delegation configuration is refused: {e}"),
    };
    let Ok(mut ids) = Verifier::new(&cfg.identity) else { panic!("identity verifier") };
    let Some(dc) = cfg.delegation.as_ref() else { panic!("no delegation section") };
    match DelegationVerifier::new(dc, &mut ids.bundles) {
        Ok(d) => (ids, d),
        Err(e) => panic!("delegation verifier: {e}"),
    }
}

/// Input: a selector byte, the claims JSON (signed here as a Txn-Token), NUL, then edits of
/// the signed token. A verified token's chain runs from `sub` to `req_wl`, every principal a
/// SPIFFE ID, within its times; an edited token, or bytes signed elsewhere, never verify.
pub fn txn_token(data: &[u8]) {
    let mut r = Reader::new(data);
    let sel = r.byte();
    let claims = r.field();
    let ops = r.rest();
    let typ = if sel & 1 == 0 { "txntoken+jwt" } else { "application/txntoken+jwt" };
    let header = json!({"alg": "ES256", "kid": "fz-txn", "typ": typ});
    let token = with_txn_key(|k| k.sign_raw("ES256", &header.to_string(), &String::from_utf8_lossy(claims)));
    let (ids, mut dv) = verifiers();
    let classify = |_: &str| None;
    let verified = dv.verify(&ids, token.as_bytes(), NOW, &classify);
    if let Ok(t) = &verified {
        assert!(!t.chain.is_empty(), "a verified chain is empty");
        assert_eq!(t.chain.first(), Some(&t.sub), "the chain does not start at sub");
        assert_eq!(t.actor(), t.req_wl, "the current actor is not req_wl");
        assert_eq!(t.depth() + 1, t.chain.len());
        assert!(t.chain.iter().all(|p| SpiffeId::parse(p).is_ok()), "a chain principal is not a SPIFFE ID: {:?}", t.chain);
        assert!(t.exp.saturating_add(ids.skew()) >= NOW && t.iat <= NOW + ids.skew(), "verified outside its times");
        assert!(t.exp >= t.iat);
        assert!(!t.jti.is_empty() && !t.txn.is_empty());
        assert_eq!(t.raw, token.as_bytes());
        // Again, from the cache: the same token.
        let again = dv.verify(&ids, token.as_bytes(), NOW, &classify);
        assert!(again.is_ok_and(|a| a.serial == t.serial), "cached verification differs");
    }
    // Edited bytes never verify (checked by a fresh verifier and by the one that cached it).
    let edited = crate::jwt::edit(token.as_bytes(), ops);
    if edited != token.as_bytes() {
        assert!(dv.verify(&ids, &edited, NOW, &classify).is_err(), "an edited Txn-Token verified");
        let (ids2, mut fresh) = verifiers();
        assert!(fresh.verify(&ids2, &edited, NOW, &classify).is_err(), "an edited Txn-Token verified (fresh)");
    }
    // The raw input is not a token this process signed.
    assert!(dv.verify(&ids, data, NOW, &classify).is_err(), "unsigned bytes verified as a Txn-Token");
    // Signed as an SVID or intent, the same claims are refused as a Txn-Token.
    let svid_typed = with_txn_key(|k| k.sign_raw("ES256", &json!({"alg": "ES256", "kid": "fz-txn", "typ": "JWT"}).to_string(), &String::from_utf8_lossy(claims)));
    assert!(dv.verify(&ids, svid_typed.as_bytes(), NOW, &classify).is_err(), "a JWT-typed token verified as a Txn-Token");
}
