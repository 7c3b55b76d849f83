//! Gap 7 end to end: the minter's signing key rotates while stock Envoy `jwt_authn` verifies
//! the tokens it mints, and not one token is refused.
//!
//! ```text
//! test ──POST /token (RFC 8693)──▶ mandate-minter (in-process, keys.jwks_max_age_s = 3)
//!   │                                   ▲ GET /.well-known/jwks.json (remote_jwks, cache_duration 3 s)
//!   └──Bearer <minted>──▶ Envoy listener `rs`: envoy.filters.http.jwt_authn ──▶ direct 200
//! ```
//!
//! Before the fix a rotated key signed within `reload_check_s` while jwt_authn still held the
//! JWKS it had fetched before the rotation, so tokens were refused (`Jwks doesn't have key to
//! match kid`) for up to one cache period. Now a key is published for `publish_before_use_s`
//! (≥ the JWKS cache period) before it signs. Needs Envoy only (no wasm module); skipped when
//! Envoy is missing (a failure with MANDATE_REQUIRE_ENVOY set).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use mandate_e2e::{envoy_prerequisite, http, loopback_cluster_yaml, testkit, unix_now, wait_until, Envoy, SvidIssuer, Vars};
use mandate_minter::config::{MinterConfig, GRANT_TOKEN_EXCHANGE, TOKEN_TYPE_JWT};
use serde_json::{json, Value};

mod orders_story;
use orders_story::{resource_listener_yaml, Jwks, MINTER_AUDIENCE, MINTER_ISSUER as ISSUER, RESOURCE_AUDIENCE as RESOURCE};

/// The JWKS cache period, on both sides: the minter's max-age and jwt_authn's cache_duration.
const CACHE_S: u64 = 3;

/// Envoy bootstrap with only the admin endpoint, the listeners and the clusters added: no
/// wasm module is needed here.
const TEMPLATE: &str = r#"admin:
  address:
    socket_address: { address: 127.0.0.1, port_value: {{ADMIN_PORT}} }
static_resources:
  listeners:
  {{EXTRA_LISTENERS}}
  clusters:
  {{EXTRA_CLUSTERS}}
"#;

fn kid_of(jwt: &str) -> String {
    let head = jwt.split('.').next().unwrap();
    let v: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(head).unwrap()).unwrap();
    v["kid"].as_str().unwrap().to_string()
}

fn stat(envoy: &Envoy, name: &str) -> i64 {
    envoy.stat(name).expect("admin /stats").unwrap_or(0)
}

#[test]
fn key_rotation_under_stock_jwt_authn_refuses_no_token() {
    if !envoy_prerequisite("key_rotation_under_stock_jwt_authn_refuses_no_token") {
        return;
    }
    let issuer = SvidIssuer::new();
    let state = tempfile::tempdir().expect("minter state dir");
    let state_dir = state.path().join("state");
    let config = json!({
        "listen": "127.0.0.1:0",
        "issuer": ISSUER,
        "state_dir": state_dir,
        "workers": 1,
        "log_level": "error",
        "dev": true,
        "reload_check_s": 1,
        "identity": {
            "audiences": [MINTER_AUDIENCE],
            "trust_domains": [{"name": issuer.trust_domain, "bundle": {"inline": issuer.bundle()}}]
        },
        "audiences": {issuer.trust_domain.as_str(): [RESOURCE]},
        "ttl": {"default_s": 60, "max_s": 60},
        "keys": {"jwks_max_age_s": CACHE_S, "publish_before_use_s": CACHE_S}
    });
    let minter = mandate_minter::spawn(MinterConfig::from_json(config).expect("minter config")).expect("minter starts");
    let policy = mandate_minter::keys::Policy::from_config(&minter.state.config);
    let minter_url = minter.base_url();

    let tpl_dir = tempfile::tempdir().expect("template dir");
    let tpl = tpl_dir.path().join("rotation.yaml");
    std::fs::write(&tpl, TEMPLATE).unwrap();
    // Listener `rs`: jwt_authn with the minter's JWKS fetched over HTTP and cached `CACHE_S`
    // seconds, then a direct 200.
    let jwks_uri = format!("{minter_url}/.well-known/jwks.json");
    let envoy = Envoy::start(
        tpl.to_str().unwrap(),
        Vars::new()
            .listener_yaml(&resource_listener_yaml(0, Jwks::Remote { uri: &jwks_uri, cluster: "minter_jwks", cache_s: CACHE_S }, None))
            .cluster_yaml(&loopback_cluster_yaml("minter_jwks", minter.addr.port(), Duration::from_secs(1))),
    )
    .expect("envoy starts");
    let rs = format!("http://127.0.0.1:{}/orders/42", envoy.listener_port_named("rs"));

    let now = unix_now();
    let mut claims = testkit::svid_claims(&format!("spiffe://{}/agent/a1", issuer.trust_domain), MINTER_AUDIENCE, now - 5, now + 600);
    claims["aud"] = json!(MINTER_AUDIENCE);
    let subject = issuer.key.sign(&claims);
    // Every value is form-safe as is (base64url, dots, URNs, an https URL).
    let body = format!("grant_type={GRANT_TOKEN_EXCHANGE}&subject_token={subject}&subject_token_type={TOKEN_TYPE_JWT}&audience={RESOURCE}");
    let mint = || {
        let r = http("POST", &format!("{minter_url}/token"), &[("content-type", "application/x-www-form-urlencoded")], body.as_bytes()).unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        r.json().unwrap()["access_token"].as_str().unwrap().to_string()
    };

    // Mint and verify continuously; rotate twice on the way.
    let first_kid = kid_of(&mint());
    let t0 = Instant::now();
    let mut rotations: Vec<(Duration, String)> = Vec::new();
    let mut signing: Vec<(Duration, String)> = vec![(Duration::ZERO, first_kid.clone())];
    let (mut sent, mut refused) = (0u32, Vec::new());
    wait_until(Duration::from_secs(40), || {
        let elapsed = t0.elapsed();
        let want_rotation = match rotations.len() {
            0 => elapsed >= Duration::from_secs(1),
            1 => signing.last().is_some_and(|(_, k)| *k == rotations[0].1) && elapsed >= rotations[0].0 + Duration::from_secs(CACHE_S + 3),
            _ => false,
        };
        if want_rotation {
            let r = mandate_minter::keys::rotate(&state_dir, &policy).expect("rotate");
            eprintln!("{elapsed:?}: rotated to pending {} (signs from {})", r.kid, r.not_before);
            rotations.push((elapsed, r.kid));
        }
        let token = mint();
        let kid = kid_of(&token);
        if signing.last().is_none_or(|(_, k)| *k != kid) {
            eprintln!("{elapsed:?}: now signing with {kid}");
            signing.push((elapsed, kid.clone()));
        }
        let resp = http("GET", &rs, &[("authorization", &format!("Bearer {token}"))], b"").unwrap();
        sent += 1;
        if resp.status != 200 {
            refused.push((elapsed, kid, resp.status, resp.text()));
        }
        let done = rotations.len() == 2
            && signing.last().is_some_and(|(at, k)| *k == rotations[1].1 && elapsed >= *at + Duration::from_secs(CACHE_S + 1));
        done.then_some(())
    });
    eprintln!("sent {sent} tokens through jwt_authn in {:?}; signing history {signing:?}", t0.elapsed());
    assert!(refused.is_empty(), "jwt_authn refused {} of {sent} tokens, first: {:?}", refused.len(), refused.first());
    assert_eq!(rotations.len(), 2, "rotated only {} times", rotations.len());
    let kids: Vec<&String> = signing.iter().map(|(_, k)| k).collect();
    assert_eq!(kids, [&first_kid, &rotations[0].1, &rotations[1].1], "each rotated key signed, in order");
    // Each key signed only after it had been published for a full cache period.
    for ((rotated_at, _), (signed_at, _)) in rotations.iter().zip(signing.iter().skip(1)) {
        assert!(*signed_at >= *rotated_at + Duration::from_secs(CACHE_S), "signed {:?} after rotation", *signed_at - *rotated_at);
    }
    assert_eq!(stat(&envoy, "http.rs.jwt_authn.denied"), 0);
    assert_eq!(stat(&envoy, "http.rs.jwt_authn.allowed"), i64::from(sent));
    // Three keys published: the two new ones and the first.
    let jwks = http("GET", &format!("{minter_url}/.well-known/jwks.json"), &[], b"").unwrap();
    assert_eq!(jwks.header("cache-control"), Some(format!("public, max-age={CACHE_S}").as_str()));
    assert_eq!(jwks.json().unwrap()["keys"].as_array().map(Vec::len), Some(3));
}
