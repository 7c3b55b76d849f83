//! Signatures checked by Envoy's own crypto (`verify_signature` foreign function): the filter
//! self-tests it at configuration and then delegates ES256/RS* checks, keeping every claim
//! check. Verdicts must not change: valid tokens pass, forged ones fail, PS256 stays in wasm.
//! ES384 is accepted by the default build (no pure-Rust P-384 in it): only Envoy checks it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mandate_e2e::{http_get, open_policy, prerequisites, testkit, unix_now, Envoy, MockServer, Vars};
use serde_json::json;

#[test]
fn envoy_crypto_passes_self_test_and_keeps_verdicts() {
    if !prerequisites("envoy_crypto_passes_self_test_and_keeps_verdicts") {
        return;
    }
    let aud = "spiffe://example.org/gateway";
    let es = testkit::TestKey::es256("es");
    let rsa = testkit::TestKey::rsa("rsa", 0);
    // SPIRE's `jwt_key_type: ec-p384`: the default build checks it with Envoy's crypto.
    let p384 = testkit::TestKey::es384("p384");
    let config = json!({
        "identity": {"audiences": [aud], "cache_size": 0,
            "trust_domains": [{"name": "example.org", "bundle": {"inline": testkit::spiffe_bundle(&[&es, &rsa, &p384], None)}}]},
        "policy": open_policy()
    });
    let echo = MockServer::echo().unwrap();
    let envoy = Envoy::start("mandate.yaml", Vars::new().plugin_config_json(&config).upstream_port(echo.port())).unwrap();
    envoy
        .wait_for_log("checked by the host's crypto (self-test passed)", std::time::Duration::from_secs(5))
        .expect("Envoy's verify_signature was adopted");
    let now = unix_now();
    let claims = testkit::svid_claims("spiffe://example.org/agent/a", aud, now, now + 300);
    let h = |alg: &str, kid: &str| json!({"alg": alg, "kid": kid, "typ": "JWT"});
    let cases = [
        (es.sign(&claims), 200, None),
        (testkit::TestKey::es256("es").sign(&claims), 401, Some("signature_invalid")),
        (rsa.sign_with_header("RS256", &h("RS256", "rsa"), &claims), 200, None),
        (rsa.sign_with_header("RS512", &h("RS512", "rsa"), &claims), 200, None),
        (testkit::TestKey::rsa("rsa", 1).sign_with_header("RS256", &h("RS256", "rsa"), &claims), 401, Some("signature_invalid")),
        (rsa.sign_with_header("PS256", &h("PS256", "rsa"), &claims), 200, None),
        (p384.sign(&claims), 200, None),
        (testkit::TestKey::es384("p384").sign(&claims), 401, Some("signature_invalid")),
        // Alg swaps between the curves: a P-384 key never checks ES256, nor P-256 ES384.
        (es.sign_with_header("ES256", &h("ES256", "p384"), &claims), 401, None),
        (p384.sign_with_header("ES384", &h("ES384", "es"), &claims), 401, None),
    ];
    for (i, (token, status, reason)) in cases.iter().enumerate() {
        let auth = format!("Bearer {token}");
        let r = http_get(&envoy.url("/x"), &[("authorization", auth.as_str())]).unwrap();
        assert_eq!(r.status, *status, "case {i}: {}", r.text());
        if let Some(reason) = reason {
            assert_eq!(r.json().unwrap()["reason"], *reason, "case {i}");
        }
    }
}
