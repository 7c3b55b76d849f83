//! The "order-bot reads orders" story shared by the minting end-to-end tests: the agent, the
//! minter's and the plugin's configurations, and small request helpers. Each test adds only
//! what it is about (revocation polling, mutual TLS, ...).
#![allow(dead_code)]

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use mandate_e2e::{http_get, testkit, unix_now, Envoy, HttpResponse, SvidIssuer};
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
