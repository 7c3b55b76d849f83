//! The minter's production mode end to end: Envoy reaches the minter over mutual TLS.
//!
//! ```text
//! agent ──SVID──▶ Envoy (mandate filter) ──Bearer <minted>──▶ echo
//!                      │ cluster `minter`: UpstreamTlsContext (client cert, CA, sni localhost)
//!                      ▼
//!                   mandate-minter (in-process, client_auth.mode = mtls)
//! ```
//!
//! A throw-away PKI is generated at test time by `scripts/gen-test-certs`. With the client
//! certificate the exchange succeeds and the minted token's `client_id` is the certificate's
//! URI SAN; a second Envoy whose `minter` cluster has TLS but no client certificate is refused
//! by the minter, and the plugin fails closed (503 `credential_unavailable`, nothing upstream).
//! Skipped like the other Envoy tests when Envoy or the wasm module is missing (a failure with
//! MANDATE_REQUIRE_ENVOY set).

use mandate_e2e::{prerequisites, Envoy, MockServer, SvidIssuer, Vars};
use mandate_minter::config::MinterConfig;
use serde_json::json;

mod orders_story;
use orders_story::*;

/// The client certificate's URI SAN: the proxy's identity at the minter.
const CLIENT_ID: &str = "spiffe://example.org/proxy/envoy-1";

#[test]
fn minter_over_mutual_tls_mints_for_the_certified_proxy_and_refuses_without_a_client_cert() {
    if !prerequisites(
        "minter_over_mutual_tls_mints_for_the_certified_proxy_and_refuses_without_a_client_cert",
    ) {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = dir.path().join("pki");
    gen_test_certs(&pki, &[CLIENT_ID]);

    let issuer = SvidIssuer::new();
    let minter = mandate_minter::spawn(
        MinterConfig::from_json(minter_config(&issuer, &dir.path().join("state"), json!({
            "client_auth": {"mode": "mtls", "clients": [{"client_id": CLIENT_ID, "roles": ["mint", "feed"], "audiences": [RESOURCE_AUDIENCE]}]},
            "tls": {"cert": pki.join("server.pem"), "key": pki.join("server.key"), "client_ca": pki.join("ca.pem")}
        })))
            .expect("minter config"),
    )
    .expect("minter starts");
    let port = minter.addr.port();
    let echo = MockServer::echo().expect("echo upstream");
    let svid = agent_svid(&issuer);

    // ---- 1. With the client certificate: minted, injected, client_id = the certificate's identity.
    let envoy = Envoy::start(
        "mandate.yaml",
        Vars::new()
            .plugin_config_json(&plugin_config(&issuer, json!({"cluster": "minter", "timeout_ms": 2000})))
            .upstream_port(echo.port())
            .cluster_yaml(&minter_tls_cluster_yaml(port, &pki, true)),
    )
    .expect("envoy (mTLS) starts");
    let resp = get_order(&envoy, &svid, "T-1");
    assert_eq!(
        resp.status,
        200,
        "body: {}\nenvoy log:\n{}",
        resp.text(),
        envoy.log()
    );
    let seen = echo
        .requests()
        .pop()
        .expect("the echo upstream got the request");
    let auth = seen
        .header("authorization")
        .expect("a credential reached the upstream");
    let minted = auth.strip_prefix("Bearer ").expect("Bearer scheme");
    assert_ne!(minted, svid, "the agent's SVID reached the upstream");
    let claims = jwt_claims(minted);
    assert_eq!(claims["iss"], MINTER_ISSUER, "{claims}");
    assert_eq!(
        claims["sub"],
        format!("spiffe://{}{AGENT}", issuer.trust_domain).as_str(),
        "{claims}"
    );
    assert_eq!(claims["aud"], RESOURCE_AUDIENCE, "{claims}");
    assert_eq!(claims["task"], "T-1", "{claims}");
    assert_eq!(claims["client_id"], CLIENT_ID, "{claims}");
    assert!(
        envoy
            .stat("cluster.minter.ssl.handshake")
            .expect("admin /stats")
            .unwrap_or(0)
            >= 1
    );
    drop(envoy);

    // ---- 2. TLS but no client certificate: the minter refuses, the plugin fails closed.
    let envoy = Envoy::start(
        "mandate.yaml",
        Vars::new()
            .plugin_config_json(&plugin_config(&issuer, json!({"cluster": "minter", "timeout_ms": 2000})))
            .upstream_port(echo.port())
            .cluster_yaml(&minter_tls_cluster_yaml(port, &pki, false)),
    )
    .expect("envoy (TLS, no client cert) starts");
    let echo_before = echo.request_count();
    let refused = get_order(&envoy, &svid, "T-2");
    assert_eq!(
        (refused.status, reason(&refused).as_str()),
        (503, "credential_unavailable"),
        "body: {}",
        refused.text()
    );
    assert_eq!(
        echo.request_count(),
        echo_before,
        "a request went upstream without a credential"
    );
    // The TLS handshake itself succeeds (the minter asks for, but does not demand, a client
    // certificate); the minter then refuses the exchange as `invalid_client` (401).
    assert_eq!(
        envoy
            .stat("cluster.minter.upstream_rq_401")
            .expect("admin /stats"),
        Some(1)
    );
    assert!(
        envoy
            .stat("wasmcustom.mandate.minter.failures")
            .expect("admin /stats")
            .unwrap_or(0)
            >= 1
    );
    drop(envoy);
    minter.shutdown().expect("minter stops");
}
