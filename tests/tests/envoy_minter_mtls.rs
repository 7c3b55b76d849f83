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

use std::path::Path;
use std::process::Command;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use mandate_e2e::{
    http_get, prerequisites, testkit, unix_now, workspace_root, yaml_quote, Envoy, HttpResponse,
    MockServer, SvidIssuer, Vars,
};
use mandate_minter::config::MinterConfig;
use serde_json::{json, Value};

const AGENT: &str = "/ns/agents/sa/order-bot";
const MINTER_ISSUER: &str = "https://minter.test";
const MINTER_AUDIENCE: &str = "mandate-minter";
const RESOURCE_AUDIENCE: &str = "https://orders.internal";
const SCOPE: &str = "orders:read";
const INTENT: &str = "orders.read";
/// The client certificate's URI SAN: the proxy's identity at the minter.
const CLIENT_ID: &str = "spiffe://example.org/proxy/envoy-1";

fn jwt_claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT has a payload");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url payload"))
        .expect("JSON claims")
}

fn agent_svid(issuer: &SvidIssuer) -> String {
    let now = unix_now();
    let sub = format!("spiffe://{}{AGENT}", issuer.trust_domain);
    let mut claims = testkit::svid_claims(&sub, &issuer.audience, now.saturating_sub(5), now + 300);
    claims["aud"] = json!([issuer.audience, MINTER_AUDIENCE]);
    issuer.key.sign(&claims)
}

fn minter_config(issuer: &SvidIssuer, state_dir: &Path, pki: &Path) -> Value {
    json!({
        "listen": "127.0.0.1:0",
        "issuer": MINTER_ISSUER,
        "state_dir": state_dir,
        "workers": 1,
        "log_level": "off",
        "identity": {
            "audiences": [MINTER_AUDIENCE],
            "trust_domains": [{"name": issuer.trust_domain, "bundle": {"inline": issuer.bundle()}}]
        },
        "audiences": {issuer.trust_domain.as_str(): [RESOURCE_AUDIENCE]},
        "scopes": {RESOURCE_AUDIENCE: [SCOPE]},
        "client_auth": {"mode": "mtls", "clients": [{"client_id": CLIENT_ID, "audiences": [RESOURCE_AUDIENCE]}]},
        "tls": {
            "cert": pki.join("server.pem"),
            "key": pki.join("server.key"),
            "client_ca": pki.join("ca.pem")
        }
    })
}

fn plugin_config(issuer: &SvidIssuer) -> Value {
    json!({
        "identity": {
            "audiences": [issuer.audience],
            "trust_domains": [{"name": issuer.trust_domain, "bundle": {"inline": issuer.bundle()}}]
        },
        "policy": {
            "resources": [{"name": "orders", "paths": ["/orders/**"], "audience": RESOURCE_AUDIENCE}],
            "intents": [{"name": INTENT, "operations": [{"resource": "orders", "methods": ["GET"]}],
                         "scopes": [SCOPE], "ttl_s": 60}],
            "rules": [{"id": "agents-read-orders", "effect": "allow", "intents": [INTENT], "resources": ["orders"]}]
        },
        "minter": {"cluster": "minter", "timeout_ms": 2000}
    })
}

/// Cluster `minter` over TLS to `127.0.0.1:port`, verifying the minter against `ca.pem` for
/// the SAN `localhost`; with `client_cert`, it presents `client.pem` (mutual TLS).
fn minter_tls_cluster_yaml(port: u16, pki: &Path, client_cert: bool) -> String {
    let path = |f: &str| yaml_quote(&pki.join(f).to_string_lossy());
    let certs = if client_cert {
        format!(
            "        tls_certificates:\n        - certificate_chain: {{ filename: {} }}\n          private_key: {{ filename: {} }}\n",
            path("client.pem"),
            path("client.key")
        )
    } else {
        String::new()
    };
    format!(
        r#"- name: minter
  type: STATIC
  connect_timeout: 1s
  load_assignment:
    cluster_name: minter
    endpoints:
    - lb_endpoints:
      - endpoint:
          address:
            socket_address: {{ address: 127.0.0.1, port_value: {port} }}
  transport_socket:
    name: envoy.transport_sockets.tls
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
      sni: localhost
      common_tls_context:
{certs}        validation_context:
          trusted_ca: {{ filename: {ca} }}
          match_typed_subject_alt_names:
          - san_type: DNS
            matcher: {{ exact: localhost }}
"#,
        ca = path("ca.pem"),
    )
}

fn get_order(envoy: &Envoy, svid: &str, task: &str) -> HttpResponse {
    let bearer = format!("Bearer {svid}");
    http_get(
        &envoy.url("/orders/42"),
        &[
            ("authorization", &bearer),
            ("x-agent-intent", INTENT),
            ("x-agent-task", task),
        ],
    )
    .expect("request through the mandate listener")
}

fn reason(resp: &HttpResponse) -> String {
    resp.json()
        .ok()
        .and_then(|v| v["reason"].as_str().map(String::from))
        .unwrap_or_default()
}

#[test]
fn minter_over_mutual_tls_mints_for_the_certified_proxy_and_refuses_without_a_client_cert() {
    if !prerequisites(
        "minter_over_mutual_tls_mints_for_the_certified_proxy_and_refuses_without_a_client_cert",
    ) {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = dir.path().join("pki");
    let out = Command::new("bash")
        .arg(workspace_root().join("scripts/gen-test-certs"))
        .arg(&pki)
        .arg(CLIENT_ID)
        .output()
        .expect("run scripts/gen-test-certs");
    assert!(
        out.status.success(),
        "gen-test-certs: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let issuer = SvidIssuer::new();
    let minter = mandate_minter::spawn(
        MinterConfig::from_json(minter_config(&issuer, &dir.path().join("state"), &pki))
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
            .plugin_config_json(&plugin_config(&issuer))
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
            .plugin_config_json(&plugin_config(&issuer))
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
