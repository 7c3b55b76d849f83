//! The "order-bot reads orders" story shared by the minting end-to-end tests: the agent, the
//! minter's and the plugin's configurations, and small request helpers. Each test adds only
//! what it is about (revocation polling, mutual TLS, ...).
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use mandate_e2e::{http_get, testkit, unix_now, wait_until, workspace_root, yaml_quote, Envoy, HttpResponse, SvidIssuer};
use serde_json::{json, Value};

pub const AGENT: &str = "/ns/agents/sa/order-bot";
pub const MINTER_ISSUER: &str = "https://minter.test";
/// What subject tokens must name for the minter to accept them.
pub const MINTER_AUDIENCE: &str = "mandate-minter";
/// The `orders` resource's audience: what minted credentials are for.
pub const RESOURCE_AUDIENCE: &str = "https://orders.internal";
pub const SCOPE: &str = "orders:read";
pub const INTENT: &str = "orders.read";
/// The intent's credential lifetime.
pub const TTL_S: u64 = 60;

/// The claims of a JWT (no verification).
pub fn jwt_claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT has a payload");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url payload")).expect("JSON claims")
}

/// A JWT-SVID whose `aud` names both the plugin's audience and the minter's: the plugin
/// verifies it, then hands the same token to the minter as `subject_token`.
pub fn agent_svid(issuer: &SvidIssuer) -> String {
    let now = unix_now();
    let sub = format!("spiffe://{}{AGENT}", issuer.trust_domain);
    let mut claims = testkit::svid_claims(&sub, &issuer.audience, now.saturating_sub(5), now + 300);
    claims["aud"] = json!([issuer.audience, MINTER_AUDIENCE]);
    issuer.key.sign(&claims)
}

/// The minter trusting `issuer`'s domain for the orders audience and scope; `extra` fields
/// (client auth, TLS, limits) are merged in.
pub fn minter_config(issuer: &SvidIssuer, state_dir: &Path, extra: Value) -> Value {
    let mut c = json!({
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
        // These stories send ad-hoc task names (`x-agent-task: T-1`), as before registered tasks.
        "tasks": {"require_registered": false}
    });
    merge(&mut c, extra);
    c
}

/// The plugin: identity for `issuer`, a policy granting `orders.read` on `/orders/**`, and
/// the `minter` section given.
pub fn plugin_config(issuer: &SvidIssuer, minter: Value) -> Value {
    json!({
        "identity": {
            "audiences": [issuer.audience],
            "trust_domains": [{"name": issuer.trust_domain, "bundle": {"inline": issuer.bundle()}}]
        },
        "policy": {
            "resources": [{"name": "orders", "paths": ["/orders/**"], "audience": RESOURCE_AUDIENCE}],
            "intents": [{"name": INTENT, "operations": [{"resource": "orders", "methods": ["GET"]}],
                         "scopes": [SCOPE], "ttl_s": TTL_S}],
            "rules": [{"id": "agents-read-orders", "effect": "allow", "intents": [INTENT], "resources": ["orders"]}]
        },
        "minter": minter
    })
}

fn merge(into: &mut Value, extra: Value) {
    if let (Some(obj), Value::Object(extra)) = (into.as_object_mut(), extra) {
        obj.extend(extra);
    }
}

/// The agent reads order 42 for `task` through the mandate listener.
pub fn get_order(envoy: &Envoy, svid: &str, task: &str) -> HttpResponse {
    let bearer = format!("Bearer {svid}");
    http_get(&envoy.url("/orders/42"), &[("authorization", &bearer), ("x-agent-intent", INTENT), ("x-agent-task", task)])
        .expect("request through the mandate listener")
}

/// The reason code of a local reply (empty if none).
pub fn reason(resp: &HttpResponse) -> String {
    resp.json().ok().and_then(|v| v["reason"].as_str().map(String::from)).unwrap_or_default()
}

/// Asks for order 42 for `task` every 50 ms until it is refused (any status but 200) or
/// `timeout` passes: the refusal, if any, and the time taken.
pub fn wait_for_refusal(envoy: &Envoy, svid: &str, task: &str, timeout: Duration) -> (Option<HttpResponse>, Duration) {
    wait_until(timeout, || {
        let r = get_order(envoy, svid, task);
        (r.status != 200).then_some(r)
    })
}

/// A throw-away PKI in `dir` from `scripts/gen-test-certs`: `args` are the client certificate's
/// URI SAN, then any `name=uri` extra certificates.
pub fn gen_test_certs(dir: &Path, args: &[&str]) {
    let out = Command::new("bash")
        .arg(workspace_root().join("scripts/gen-test-certs"))
        .arg(dir)
        .args(args)
        .output()
        .expect("run scripts/gen-test-certs");
    assert!(out.status.success(), "gen-test-certs: {}", String::from_utf8_lossy(&out.stderr));
}

/// Cluster `minter` over TLS to `127.0.0.1:port`, verifying the minter against `ca.pem` for
/// the SAN `localhost`; with `client_cert`, it presents `client.pem` (mutual TLS).
pub fn minter_tls_cluster_yaml(port: u16, pki: &Path, client_cert: bool) -> String {
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

/// Where listener `rs`'s jwt_authn gets the minter's keys.
pub enum Jwks<'a> {
    /// The JWKS document itself (`local_jwks`), fetched before rendering.
    Inline(&'a str),
    /// Fetched by Envoy from `uri` over cluster `cluster` and cached `cache_s` seconds
    /// (`remote_jwks`).
    Remote { uri: &'a str, cluster: &'a str, cache_s: u64 },
}

/// Listener `rs` on `port` (0: any), a YAML list item for [`mandate_e2e::Vars::listener_yaml`]:
/// stock jwt_authn with the minter as provider for the orders audience, then cluster
/// `upstream`, or a direct `200 verified` without one. `forward: true` keeps the token for an
/// echo to show; `claim_to_headers` (`x-verified-sub`, `x-verified-task`) proves which claims
/// jwt_authn verified.
pub fn resource_listener_yaml(port: u16, jwks: Jwks<'_>, upstream: Option<&str>) -> String {
    jwt_authn_listener_yaml(port, jwks, upstream, RESOURCE_AUDIENCE, &[("x-verified-sub", "sub"), ("x-verified-task", "task")])
}

/// [`resource_listener_yaml`] for another `audience`, with `claims` copied into request headers
/// (`(header, claim)`) for the upstream to show.
pub fn jwt_authn_listener_yaml(port: u16, jwks: Jwks<'_>, upstream: Option<&str>, audience: &str, claims: &[(&str, &str)]) -> String {
    let jwks = match jwks {
        Jwks::Inline(doc) => format!("local_jwks:\n                  inline_string: {}", yaml_quote(doc)),
        Jwks::Remote { uri, cluster, cache_s } => format!(
            "remote_jwks:\n                  http_uri:\n                    uri: {}\n                    cluster: {cluster}\n                    timeout: 2s\n                  cache_duration: {cache_s}s",
            yaml_quote(uri)
        ),
    };
    let action = match upstream {
        Some(cluster) => format!("route: {{ cluster: {cluster}, timeout: 5s }}"),
        None => r#"direct_response: { status: 200, body: { inline_string: "verified" } }"#.to_string(),
    };
    format!(
        r#"- name: rs
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {port} }}
  filter_chains:
  - filters:
    - name: envoy.filters.network.http_connection_manager
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
        stat_prefix: rs
        codec_type: AUTO
        route_config:
          name: rs
          virtual_hosts:
          - name: rs
            domains: ["*"]
            routes:
            - match: {{ prefix: "/" }}
              {action}
        http_filters:
        - name: envoy.filters.http.jwt_authn
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication
            providers:
              minter:
                issuer: {issuer}
                audiences: [{aud}]
                forward: true
                claim_to_headers:
{claims}                {jwks}
            rules:
            - match: {{ prefix: "/" }}
              requires: {{ provider_name: minter }}
        - name: envoy.filters.http.router
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#,
        issuer = yaml_quote(MINTER_ISSUER),
        aud = yaml_quote(audience),
        claims = claims.iter().map(|(h, c)| format!("                - {{ header_name: {h}, claim_name: {c} }}\n")).collect::<String>(),
    )
}

/// An `application/x-www-form-urlencoded` body (RFC 3986 unreserved characters kept).
pub fn form(pairs: &[(&str, &str)]) -> String {
    let mut s = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            s.push('&');
        }
        s.push_str(k);
        s.push('=');
        for b in v.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                s.push(b as char);
            } else {
                s.push_str(&format!("%{b:02X}"));
            }
        }
    }
    s
}
